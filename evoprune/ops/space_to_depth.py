"""Stride-1 convolutions on the space-to-depth rearrangement of their input (2x2 pixel
squares, or 1x2 pixel pairs), and their input gradient as that form's transpose (see
`evoprune.ops` for when they are used).

A convolution with few channels on either side runs at a few GFLOP/s in Eigen's kernels
(they block the feature axes by 8, the AVX2 lanes); on the input's 2x2 pixel squares it has
4x the channels both ways, at the price of ~1.4x the multiply-adds. With 8 to 16 channels
Eigen runs at about half the rate it reaches with 32; on pixel pairs along the width
(`PAIRS`) the channels double, at 4/3 the multiply-adds for a 3x3 kernel.
"""

import functools
from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from evoprune.ops.backend import _materialized
from evoprune.ops.patches import NHWC, output_size

Block = tuple[int, int]
# The pixel blocks (height, width) that become pixels: 2x2 squares, or pairs along the width.
SQUARES: Block = (2, 2)
PAIRS: Block = (1, 2)


def square_taps(window: tuple[int, int], block: Block = SQUARES) -> list[int]:
  """The kernel's extent in blocks: a window of k pixels starts anywhere in a block of b,
  so it touches (k + b - 2) // b + 1 of them."""
  return [(k + b - 2) // b + 1 for k, b in zip(window, block)]


def to_squares(x: jax.Array, pads: Sequence[tuple[int, int]], block: Block = SQUARES
               ) -> jax.Array:
  """x [B, H, W, C], padded (or cropped, where negative) by `pads` to multiples of
  `block` (bh, bw): [B, H' / bh, W' / bw, bh * bw * C], channels in (p, q, c) order."""
  (b, c), (bh, bw) = (x.shape[0], x.shape[-1]), block
  zero = jnp.zeros((), x.dtype)
  x = lax.pad(x, zero, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  hs, ws = x.shape[1] // bh, x.shape[2] // bw
  x = x.reshape(b, hs, bh, ws, bw, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hs, ws, bh * bw * c)


def from_squares(y: jax.Array, block: Block = SQUARES) -> jax.Array:
  """The inverse rearrangement of `to_squares` (without its padding): y [B, S, S',
  bh * bw * C], channels in (p, q, c) order -> [B, bh * S, bw * S', C]."""
  (b, hs, ws, c), (bh, bw) = y.shape, block
  y = y.reshape(b, hs, ws, bh, bw, c // (bh * bw)).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, bh * hs, bw * ws, c // (bh * bw))


def squared_kernel(kernel: jax.Array, block: Block = SQUARES) -> jax.Array:
  """kernel [kh, kw, C_in, C_out] for `to_squares` inputs and outputs: [taps_h, taps_w,
  bh * bw * C_in, bh * bw * C_out], entry [U, V, (p, q, c), (r, s, o)] =
  kernel[bh*U + p - r, bw*V + q - s, c, o] (zero outside the window). Linear."""
  kh, kw, c_in, c_out = kernel.shape
  (bh, bw), taps = block, square_taps((kh, kw), block)
  padded = jnp.pad(kernel, ((bh - 1, bh * taps[0] - kh), (bw - 1, bw * taps[1] - kw),
                            (0, 0), (0, 0)))
  # Index into `padded` of kernel row bh*U + p - r ([U, p, r]), and of the columns alike.
  rows = bh * np.arange(taps[0])[:, None, None] + _offsets(bh)
  cols = bw * np.arange(taps[1])[:, None, None] + _offsets(bw)
  squared = padded[rows[:, None, :, None, :, None], cols[None, :, None, :, None, :]]
  return squared.transpose(0, 1, 2, 3, 6, 4, 5, 7).reshape(
      *taps, bh * bw * c_in, bh * bw * c_out)


def _offsets(b: int) -> np.ndarray:
  """[p, r] -> p - r + b - 1: the kernel offset of input pixel p for output pixel r of a
  block, shifted by the b - 1 rows (columns) of zeros `squared_kernel` pads in front."""
  return np.arange(b)[:, None] - np.arange(b)[None, :] + b - 1


def input_squares(x: jax.Array, window: tuple[int, int],
                  padding: tuple[tuple[int, int], ...], block: Block = SQUARES) -> jax.Array:
  """x as the blocks a stride-1 convolution reads (`to_squares`), padded to cover every
  output block the window touches."""
  taps = square_taps(window, block)
  squares = [-(-n // b) for n, b in zip(output_size(x.shape, window, (1, 1), padding), block)]
  pads = [(lo, b * (s + t - 1) - size - lo)
          for (lo, _), s, t, size, b in zip(padding, squares, taps, x.shape[1:3], block)]
  return to_squares(x, pads, block)


def output_squares(y: jax.Array) -> jax.Array:
  """A convolution's output (or its gradient) y [B, H', W', C] as the squares `conv`
  computes, zero-padded at the end to whole squares: [B, ceil(H' / 2), ceil(W' / 2), 4 C]."""
  return to_squares(y, [(0, -n % b) for n, b in zip(y.shape[1:3], SQUARES)])


def conv(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], ...],
         block: Block = SQUARES) -> jax.Array:
  """Stride-1 convolution of x as one on its space-to-depth rearrangement.

  x's pixel blocks (`SQUARES`: 2x2; `PAIRS`: 1x2) become pixels with bh * bw * C_in
  channels, each output block one pixel with bh * bw * C_out channels, and the kernel the
  matching `squared_kernel`: more multiply-adds (squares: 3x3 -> 2x2 taps of 4x the
  channels both ways, 16/9; 5x5 -> 3x3, 36/25; pairs: 3x3 -> 3x2 taps of 2x the channels,
  4/3), but channel counts that Eigen handles well (see `convolution._stride1_conv`).
  Inside `lax.scan`, batch 128, 2-core AMD EPYC, ms, XLA's convolution -> this: on squares
  3->6 5x5 VALID at 32x32 (LeNet-5) 12.5 -> 2.5, its 16->6 5x5 input gradient at 14x14
  10.9 -> 4.7, 3->16 3x3 SAME at 32x32 (ResNet-20) 10.9 -> 4.0.

  Args:
    x: [B, H, W, C_in].
    kernel: [kh, kw, C_in, C_out].
    padding: ((lo, hi), (lo, hi)); negative entries crop.
    block: `SQUARES` or `PAIRS` (any (bh, bw) works).

  Returns:
    [B, H', W', C_out], as `lax.conv_general_dilated` with stride 1.
  """
  ho, wo = output_size(x.shape, kernel.shape[:2], (1, 1), padding)
  xs = input_squares(x, kernel.shape[:2], padding, block)
  y = lax.conv_general_dilated(xs, squared_kernel(kernel, block), (1, 1), "VALID",
                               dimension_numbers=NHWC)
  return from_squares(y, block)[:, :ho, :wo]


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
  read_squares = lambda x: input_squares(x, kernel.shape[:2], padding)
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
