"""Stride-1 convolutions on the 2x2 space-to-depth rearrangement of their input, and
their input gradient as that form's transpose (see `evoprune.ops` for when they are used).

A convolution with few channels on either side runs at a few GFLOP/s in Eigen's kernels
(they block the feature axes by 8, the AVX2 lanes); on the input's 2x2 pixel squares it has
4x the channels both ways, at the price of ~1.4x the multiply-adds.
"""

import functools
from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from evoprune.ops.backend import _materialized
from evoprune.ops.patches import NHWC, output_size

# Side of the pixel squares that `conv` turns into pixels.
BLOCK = 2


def square_taps(window: tuple[int, int]) -> list[int]:
  """The kernel's extent in `BLOCK`-pixel squares: a window of k pixels starts anywhere
  in a square, so it touches (k + block - 2) // block + 1 of them."""
  return [(k + BLOCK - 2) // BLOCK + 1 for k in window]


def to_squares(x: jax.Array, pads: Sequence[tuple[int, int]]) -> jax.Array:
  """x [B, H, W, C], padded (or cropped, where negative) by `pads` to multiples of
  `BLOCK`: [B, H' / block, W' / block, block * block * C], channels in (p, q, c) order."""
  b, c = x.shape[0], x.shape[-1]
  zero = jnp.zeros((), x.dtype)
  x = lax.pad(x, zero, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  hs, ws = x.shape[1] // BLOCK, x.shape[2] // BLOCK
  x = x.reshape(b, hs, BLOCK, ws, BLOCK, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hs, ws, BLOCK * BLOCK * c)


def squared_kernel(kernel: jax.Array) -> jax.Array:
  """kernel [kh, kw, C_in, C_out] for `to_squares` inputs and outputs: [taps_h, taps_w,
  block^2 * C_in, block^2 * C_out], entry [U, V, (p, q, c), (r, s, o)] =
  kernel[block*U + p - r, block*V + q - s, c, o] (zero outside the window). Linear."""
  kh, kw, c_in, c_out = kernel.shape
  block = BLOCK
  taps = square_taps((kh, kw))
  padded = jnp.pad(kernel, ((block - 1, block * taps[0] - kh), (block - 1, block * taps[1] - kw),
                            (0, 0), (0, 0)))
  offsets = np.arange(block)[:, None] - np.arange(block)[None, :] + block - 1  # [p, r]
  rows = block * np.arange(taps[0])[:, None, None] + offsets                   # [U, p, r]
  cols = block * np.arange(taps[1])[:, None, None] + offsets                   # [V, q, s]
  squared = padded[rows[:, None, :, None, :, None], cols[None, :, None, :, None, :]]
  return squared.transpose(0, 1, 2, 3, 6, 4, 5, 7).reshape(
      *taps, block * block * c_in, block * block * c_out)


def input_squares(x: jax.Array, window: tuple[int, int],
                  padding: tuple[tuple[int, int], ...]) -> tuple[jax.Array, list[int]]:
  """x as the squares a stride-1 convolution reads: (`to_squares` input, output squares)."""
  taps = square_taps(window)
  squares = [-(-n // BLOCK) for n in output_size(x.shape, window, (1, 1), padding)]
  pads = [(lo, BLOCK * (s + t - 1) - size - lo)
          for (lo, _), s, t, size in zip(padding, squares, taps, x.shape[1:3])]
  return to_squares(x, pads), squares


def output_squares(y: jax.Array) -> jax.Array:
  """A convolution's output (or its gradient) y [B, H', W', C] as the squares `conv`
  computes, zero-padded at the end to whole squares: [B, ceil(H' / 2), ceil(W' / 2), 4 C]."""
  return to_squares(y, [(0, -n % BLOCK) for n in y.shape[1:3]])


def conv(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """Stride-1 convolution of x as one on its space-to-depth rearrangement.

  x's 2x2 pixel squares become pixels with 4 * C_in channels, each output square one pixel
  with 4 * C_out channels, and the kernel the matching `squared_kernel`: ~1.4x the
  multiply-adds (3x3 -> 2x2 taps of 4x the channels both ways: 16/9; 5x5 -> 3x3: 36/25),
  but channel counts that Eigen handles well (see `convolution._prefers_space_to_depth`).
  Inside `lax.scan`, batch 128, 2-core AMD EPYC, ms, XLA's convolution -> this: 3->6 5x5
  VALID at 32x32 (LeNet-5) 12.5 -> 2.5, its 16->6 5x5 input gradient at 14x14 10.9 -> 4.7,
  3->16 3x3 SAME at 32x32 (ResNet-20) 10.9 -> 4.0.

  Args:
    x: [B, H, W, C_in].
    kernel: [kh, kw, C_in, C_out].
    padding: ((lo, hi), (lo, hi)); negative entries crop.

  Returns:
    [B, H', W', C_out], as `lax.conv_general_dilated` with stride 1.
  """
  c_out = kernel.shape[-1]
  ho, wo = output_size(x.shape, kernel.shape[:2], (1, 1), padding)
  xs, squares = input_squares(x, kernel.shape[:2], padding)
  y = lax.conv_general_dilated(xs, squared_kernel(kernel), (1, 1), "VALID",
                               dimension_numbers=NHWC)
  y = y.reshape(x.shape[0], *squares, BLOCK, BLOCK, c_out).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(x.shape[0], BLOCK * squares[0], BLOCK * squares[1], c_out)[:, :ho, :wo]


def input_grad(g: jax.Array, kernel: jax.Array, x_shape: Sequence[int],
               padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """dL/dx of a stride-1 convolution as the transpose of `conv`.

  g's squares [B, S, S', 4 C_out] times the squared kernel, one matmul with every tap's
  [4 C_out, 4 C_in] block side by side, then each tap's product added in at its offset
  (`_shifted_sum`): the input squares' gradient, mapped back to pixels by the transpose of
  `input_squares`. Written as a convolution of g, the same gradient multiplies the
  (kh - 1)-wide zero border that padding g adds; here only g's own squares are multiplied.
  """
  gs = output_squares(g)
  squared = squared_kernel(kernel)                # [taps_h, taps_w, 4 C_in, 4 C_out]
  taps_h, taps_w, c_in, c_out = squared.shape
  weights = squared.transpose(3, 0, 1, 2).reshape(c_out, taps_h * taps_w * c_in)
  products = lax.dot_general(gs, weights, (((3,), (0,)), ((), ())))
  dxs = _shifted_sum(products.reshape(*gs.shape[:3], taps_h, taps_w, c_in))
  read_squares = lambda x: input_squares(x, kernel.shape[:2], padding)[0]
  dx = jax.linear_transpose(read_squares, jax.ShapeDtypeStruct(x_shape, g.dtype))(dxs)[0]
  # In its own buffer: XLA fused the shifted sum into the max-pool and ReLU backward below
  # (LeNet-5), which read each value four times (train step 0.93 with, 1.0 without).
  return _materialized(dx)


def _shifted_sum(products: jax.Array) -> jax.Array:
  """out[b, u, v] = sum_{U, V} products[b, u - U, v - V, U, V] (the col2im of a
  correlation): [B, S, S', th, tw, C] -> [B, S + th - 1, S' + tw - 1, C].

  Each row of taps is summed along W first, then the rows along H: th + th * tw shifted
  additions, against th * tw in one sum, but each a contiguous pad (LeNet-5's conv2
  input gradient 2.6 ms, against 2.9 in one sum).
  """
  th, tw = products.shape[3:5]
  products = _materialized(products)
  zero = jnp.zeros((), products.dtype)
  total = None
  for i in range(th):
    row = functools.reduce(jnp.add, [
        lax.pad(products[:, :, :, i, j], zero, ((0, 0, 0), (0, 0, 0), (j, tw - 1 - j, 0),
                                                (0, 0, 0))) for j in range(tw)])
    row = lax.pad(row, zero, ((0, 0, 0), (i, th - 1 - i, 0), (0, 0, 0), (0, 0, 0)))
    total = row if total is None else total + row
  return total
