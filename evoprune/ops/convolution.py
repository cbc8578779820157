"""Convolutions with fast XLA:CPU formulations (see `evoprune.ops` for the overview)."""

import functools
import math
from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp

from evoprune.ops import direct
from evoprune.ops import patches
from evoprune.ops import separable
from evoprune.ops import space_to_depth
from evoprune.ops.backend import Padding, _check_impl, _materialized, _stage
from evoprune.ops.patches import NHWC, channel_major_patches, chunks, output_size


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Padding, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None) -> jax.Array:
  """`lax.conv_general_dilated` with the CPU formulations where they apply.

  Same signature and result as `lax.conv_general_dilated`. 2-D NHWC/HWIO convolutions
  without dilation, with `feature_group_count` 1 or depthwise (one filter per input
  channel), default precision and dtype, go through `conv(impl='auto')`; anything else
  is passed to `lax.conv_general_dilated` unchanged.
  """
  plain = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  if lhs.ndim != 4 or rhs.ndim != 4:
    return plain(lhs, rhs)
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
  given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  groups = feature_group_count
  supported = (
      given == nhwc and batch_group_count == 1 and precision is None
      and preferred_element_type is None
      and all(d == 1 for d in (lhs_dilation or (1, 1)))
      and all(d == 1 for d in (rhs_dilation or (1, 1)))
      and (groups == 1 or (groups == lhs.shape[-1] and rhs.shape[2:] == (1, groups))))
  if not supported:
    return plain(lhs, rhs)
  return conv(lhs, rhs, window_strides, padding, feature_group_count=groups)


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
         padding: Padding = "VALID", *, feature_group_count: int = 1,
         impl: str = "auto") -> jax.Array:
  """2-D convolution, NHWC activations and HWIO kernel.

  Args:
    x: [B, H, W, C_in] inputs.
    kernel: [kh, kw, C_in / groups, C_out]; depthwise: [kh, kw, 1, C_in].
    strides: (sh, sw).
    padding: 'VALID', 'SAME' or ((lo, hi), (lo, hi)).
    feature_group_count: 1 (dense) or C_in (depthwise, C_out == C_in).
    impl: 'auto' (CPU formulation on CPU, the plain op elsewhere), 'xla' or 'cpu'.

  Returns:
    [B, H', W', C_out], equal to `lax.conv_general_dilated` up to float rounding.

  Raises:
    ValueError: an unknown `impl`, or a grouped convolution that is not depthwise.
  """
  impl = _check_impl(impl)
  strides = tuple(int(s) for s in strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  groups = int(feature_group_count)
  if groups != 1 and not (groups == x.shape[-1] and kernel.shape[2:] == (1, groups)):
    raise ValueError(
        f"feature_group_count={groups} with kernel shape {kernel.shape}: only dense (1) and "
        f"depthwise ({x.shape[-1]}, kernel [kh, kw, 1, {x.shape[-1]}]) convolutions are "
        "supported; use lax.conv_general_dilated for other groupings")
  reference = functools.partial(_conv_xla, strides=strides, padding=padding, groups=groups)
  if groups > 1:
    cpu = functools.partial(separable.depthwise, strides=strides, padding=padding)
  elif kernel.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)):
    cpu = functools.partial(separable.pointwise, strides=strides)
  else:
    cpu = functools.partial(_dense, strides=strides, padding=padding)
  return _stage(impl, cpu, reference, x, kernel)


def _conv_xla(x, kernel, *, strides, padding, groups):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC,
                                  feature_group_count=groups)


# Dense k x k. Forward and input gradient: XLA's convolutions (Eigen in the training
# programs; the input gradient written out as a plain convolution, see `_input_grad`),
# except: stride-1 convolutions with few channels on either side run on the 2x2
# space-to-depth input (`space_to_depth.conv`), those with at most `_PAIRED_CHANNELS` on
# both sides on its pixel pairs, stride-1 input gradients with few input
# channels as that form's transpose (`space_to_depth.input_grad`), and strided
# convolutions with fewer than `_SMALL_C_IN` input channels (RGB images) as chunked im2col
# matmuls. Weight gradient: one canonical convolution with stride 1
# (`_weight_grad_as_conv`), else chunked im2col matmuls.
_SMALL_C_IN = 4
# Below this many channels Eigen's convolution kernels run at a few GFLOP/s (they block
# the feature axes by 8: AVX2 lanes).
_FEW_CHANNELS = 8
# Up to this many channels on both sides, stride-1 convolutions that do not run on 2x2
# squares run on pixel pairs along the width (see `_stride1_conv`).
_PAIRED_CHANNELS = 16


def _prefers_space_to_depth(c_in: int, c_out: int) -> bool:
  """Whether a stride-1 C_in -> C_out convolution runs faster on the 2x2 space-to-depth
  input than as XLA's (Eigen's) convolution.

  Measured inside `lax.scan`, batch 128, 2-core AMD EPYC, 3x3 SAME at 32x32 and 16x16 and
  5x5 VALID at 14x14, C_in in {3, 6, 8, 16}, C_out in {6, 8, 16, 32}; space-to-depth /
  XLA: 0.15-0.6 with C_out < 8 (whatever C_in), 0.2-0.55 with C_in < 8 and C_out <= 16;
  0.85-1.2 for 8->8 and 16->8; 1.1-1.9 beyond (3->32 3x3 at 32x32: 1.4).
  """
  return c_out < _FEW_CHANNELS or (c_in < _FEW_CHANNELS and c_out <= 2 * _FEW_CHANNELS)


def _stride1_conv(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], ...]
                  ) -> jax.Array:
  """A stride-1 dense convolution: the direct C++ kernel (`direct.forward`) where it
  applies and the program runs on CPU, else `_stride1_xla_conv`.

  Inside `lax.scan`, batch 128, 3x3, 2-core AVX-512 AMD EPYC, ms, XLA form -> kernel, two
  cores: 16->16 SAME at 32x32 6.4 -> 3.5, 32->32 at 16x16 3.6 -> 3.3, 64->64 at 8x8
  3.6 -> 2.8, RGB 3->32 SAME at 32x32 9.6 -> 1.7, 32->64 VALID at 15x15 4.4 -> 3.9; one
  core 0.31-0.95 of XLA's.
  """
  xla_form = functools.partial(_stride1_xla_conv, padding=padding)
  if not direct.handles(jnp.result_type(x, kernel), kernel.shape[-1]):
    return xla_form(x, kernel)
  kernel_form = functools.partial(direct.forward, padding=padding)
  return lax.platform_dependent(x, kernel, cpu=kernel_form, default=xla_form)


def _stride1_xla_conv(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], ...]
                      ) -> jax.Array:
  """A stride-1 dense convolution, on the space-to-depth input where that is faster.

  With few channels on 2x2 squares (`_prefers_space_to_depth`); otherwise with at most
  `_PAIRED_CHANNELS` on both sides on pixel pairs along the width (2x the channels, 4/3 the
  multiply-adds of a 3x3 kernel), where Eigen ran at about half its 32-channel rate.
  Inside `lax.scan`, batch 128, 3x3 SAME, 2-core AVX-512 AMD EPYC, ms, XLA -> pairs:
  16->16 at 32x32 (ResNet-20's first stage) 9.6 -> 8.8 and 6.7 -> 5.9, at 16x16 2.9 -> 1.9;
  8->16 6.1 -> 3.9, 16->8 9.8 -> 7.3, 8->8 5.4 -> 3.1, 12->12 9.0 -> 5.7 at 32x32; but
  16->32 2.4 -> 2.8 at 16x16 and 10.7 -> 12.4 at 32x32, and 32->32 3.7 -> 5.0.
  """
  c_in, c_out = x.shape[-1], kernel.shape[-1]
  if _prefers_space_to_depth(c_in, c_out):
    return space_to_depth.conv(x, kernel, padding)
  if max(c_in, c_out) <= _PAIRED_CHANNELS:
    return space_to_depth.conv(x, kernel, padding, space_to_depth.PAIRS)
  return _conv_xla(x, kernel, strides=(1, 1), padding=padding, groups=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x, kernel, strides, padding):
  if strides == (1, 1):
    return _stride1_conv(x, kernel, padding)
  if x.shape[-1] >= _SMALL_C_IN:
    return _conv_xla(x, kernel, strides=strides, padding=padding, groups=1)
  return _dense_im2col(_channel_major_chunks(x, kernel.shape[:2], strides, padding), kernel,
                       strides, output_size(x.shape, kernel.shape[:2], strides, padding))


def _prefers_transposed_input_grad(c_in: int, c_out: int) -> bool:
  """Whether the input gradient of a stride-1 C_in -> C_out convolution runs faster as
  `space_to_depth.input_grad` than as a convolution of g (on squares, since C_in < 8).

  Measured inside `lax.scan`, batch 128, 2-core AMD EPYC, ms, convolution of g on squares
  -> transposed: 3x3 SAME at 32x32 3->6 5.8 -> 3.2, 3->16 16 -> 5.8, 6->16 9.6 -> 9.4,
  6->32 22 -> 17, but 6->6 3.8 -> 4.8, 6->8 4.9 -> 5.9, 8->6 4.5 -> 6.3; 5x5 VALID at
  14x14 6->16 (LeNet-5's conv2) 5.1 -> 2.6; at 16x16 alike.
  """
  return c_in < _SMALL_C_IN or (c_in < _FEW_CHANNELS and c_out >= 2 * _FEW_CHANNELS)


def _dense_im2col(xt: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                  out_hw: tuple[int, int]) -> jax.Array:
  """Forward pass over channel-major chunks xt [n, C_in, B / n, H + pads, W + pads]:
  each chunk's patch matrix times the kernel; -> [B, H', W', C_out]."""
  kh, kw, c_in, c_out = kernel.shape
  num_chunks, _, size = xt.shape[:3]
  weights = kernel.reshape(kh * kw * c_in, c_out)

  def forward(xc):
    columns = channel_major_patches(xc, (kh, kw), strides, out_hw)
    return lax.dot_general(weights, columns, (((0,), (0,)), ((), ())))  # [C_out, b*H'*W']

  y = forward(xt[0])[None] if num_chunks == 1 else lax.map(forward, xt)
  # One transpose of the whole output back to NHWC.
  y = y.reshape(num_chunks, c_out, size, *out_hw).transpose(0, 2, 3, 4, 1)
  return y.reshape(num_chunks * size, *out_hw, c_out)


def _channel_major_chunks(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
                          padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """x [B, H, W, C] as padded channel-major batch chunks [n, C, B / n, H + pads, W + pads].

  One transpose-and-pad pass over x before the loop over chunks, so each iteration reads
  its chunk as one contiguous block; transposing inside the loop (a strided slice of the
  batch per chunk) cost up to 1.3x more (16->16 3x3 weight gradient at 32x32, batch 128,
  one core: 22 -> 17 ms; RGB 3x3 forwards 10-20% less). The chunk size (a quarter of
  `patches.CHUNK_BYTES` of patches) depends only on the shapes, so the forward pass and the
  weight gradient of a convolution split the batch alike (measured 256 KiB < 1 MiB < 4 MiB).
  """
  (kh, kw), c = window, x.shape[-1]
  out_hw = output_size(x.shape, window, strides, padding)
  num_chunks = chunks(x.shape[0], math.prod(out_hw) * kh * kw * c * x.dtype.itemsize,
                       patches.CHUNK_BYTES // 4)
  xt = x.reshape(num_chunks, x.shape[0] // num_chunks, *x.shape[1:]).transpose(0, 4, 1, 2, 3)
  return jnp.pad(xt, ((0, 0), (0, 0), (0, 0), padding[0], padding[1]))


def _dense_fwd(x, kernel, strides, padding):
  # x in its own buffer, read by this pass and the backward pass alike. The backward pass
  # needs it there (else the weight gradient's transposes recompute batch norm, ReLU and
  # residual sums, see `_materialized`); read from it, the forward pass's padded pixel pairs
  # and squares are a copy, where XLA fused batch norm and ReLU into them and computed those
  # twice (ResNet-20, one core: the pads 18-24 -> 8-13 ms a step).
  x = _materialized(x)
  if x.shape[-1] >= _SMALL_C_IN or strides == (1, 1):
    return _dense(x, kernel, strides, padding), (x, None, kernel)
  # A strided convolution's weight gradient reuses the forward pass's channel-major chunks.
  xt = _channel_major_chunks(x, kernel.shape[:2], strides, padding)
  out_hw = output_size(x.shape, kernel.shape[:2], strides, padding)
  return _dense_im2col(xt, kernel, strides, out_hw), (x, xt, kernel)


def _input_grad(g, kernel, x_shape, strides, padding):
  """dL/dx of a dense convolution: g convolved with the flipped kernel, its in/out axes
  swapped in memory; stride-1 convolutions with few input channels as the written-out
  transpose of their space-to-depth form (`space_to_depth.input_grad`), strided ones one
  phase of the stride at a time (`_strided_input_grad`).

  JAX's own transpose rule expresses the same convolution with a reversed kernel and
  swapped kernel dimension labels; XLA:CPU runs that form 5-18x slower inside a
  `lax.scan` body (where `training.fit` trains: the kernel is loop state), e.g. 109 ms
  instead of 6 for a 16->16 3x3 convolution at 32x32, batch 128.
  """
  if strides != (1, 1):
    return _strided_input_grad(g, kernel, x_shape, strides, padding)
  if _prefers_transposed_input_grad(*kernel.shape[2:]):
    return space_to_depth.input_grad(g, kernel, x_shape, padding)
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  # g padded so that the flipped kernel's window at x's position u covers g's u - low + j.
  pads = tuple((k - 1 - low, size - out + low)
               for size, k, (low, _), out in zip(x_shape[1:3], kernel.shape[:2], padding,
                                                 g.shape[1:3]))
  return _stride1_conv(g, flipped, pads)


def _strided_input_grad(g: jax.Array, kernel: jax.Array, x_shape: tuple[int, ...],
                        strides: tuple[int, int], padding: tuple[tuple[int, int], ...]
                        ) -> jax.Array:
  """dL/dx [B, H, W, C_in] of a strided dense convolution, split by output phase.

  Input position n = s * m + r (in padded coordinates) receives g[m - t] K[s * t + r],
  t = 0 .. T - 1, T = ceil(k / s), per axis: for each phase r a stride-1 correlation of
  g with a T x T sub-kernel. All sy * sx phases are one stride-1 convolution of g with a
  [Ty, Tx, C_out, sy * sx * C_in] kernel (taps past k are zero), whose output is
  interleaved back (depth to space) and cropped to x. XLA's form, a convolution of g
  dilated by the stride, multiplies the inserted zeros too and is no Eigen convolution:
  ResNet-20's 16->32 layer (batch 128, 2-core AVX-512 AMD EPYC, inside `lax.scan`) 12.0 ->
  3.9 ms, its 32->64 layer 5.0 -> 3.3; train step 0.96 of the dilated form (same process).
  """
  kh, kw, c_in, c_out = kernel.shape
  (sy, sx), (ty, tx) = strides, (-(-kh // strides[0]), -(-kw // strides[1]))
  # phases[a, b, o, (ry, rx, c)] = K[sy * (Ty - 1 - a) + ry, sx * (Tx - 1 - b) + rx, c, o]
  phases = jnp.pad(kernel, ((0, ty * sy - kh), (0, tx * sx - kw), (0, 0), (0, 0)))
  phases = phases.reshape(ty, sy, tx, sx, c_in, c_out)[::-1, :, ::-1]
  phases = phases.transpose(0, 2, 5, 1, 3, 4).reshape(ty, tx, c_out, sy * sx * c_in)
  g_pads, offsets = [], []
  for size, t, s, (low, _), out in zip(x_shape[1:3], (ty, tx), strides, padding,
                                       g.shape[1:3]):
    first, last = low // s, (low + size - 1) // s  # the m that x's positions fall in
    g_pads.append((t - 1 - first, last - (out - 1), 0))  # negative: cropped
    offsets.append(low - s * first)
  g = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), *g_pads, (0, 0, 0)))
  z = lax.conv_general_dilated(g, phases, (1, 1), "VALID", dimension_numbers=NHWC)
  z = space_to_depth.from_squares(z, strides)  # the phases interleaved back
  return z[:, offsets[0]:offsets[0] + x_shape[1], offsets[1]:offsets[1] + x_shape[2]]


def _dense_bwd(strides, padding, residuals, g):
  x, xt, kernel = residuals  # x from its own buffer (`_dense_fwd`)
  # g in its own buffer too: otherwise the batch norm backward that produces it is fused into
  # (recomputed in transposed loop order by) the weight gradient's transpose of g, 30 ms each
  # in ResNet-20.
  g = _materialized(g)
  dx = _input_grad(g, kernel, x.shape, strides, padding)
  dk = _weight_grad(x, xt, g, kernel.shape[:2], strides, padding)
  return dx, dk.astype(kernel.dtype)


def _weight_grad(x: jax.Array, xt: jax.Array | None, g: jax.Array, window: tuple[int, int],
                 strides: tuple[int, int], padding: tuple[tuple[int, int], ...]
                 ) -> jax.Array:
  """dL/dkernel [kh, kw, C_in, C_out] of a dense convolution: the direct C++ kernel
  (`direct.weight_grad`) where it applies and the program runs on CPU; else, with stride 1,
  one canonical convolution (`_weight_grad_as_conv`), strided, chunked im2col matmuls over
  x's channel-major chunks xt (`_channel_major_chunks`, made here when None).

  ResNet-20 train step, 2-core AVX-512 AMD EPYC, same process: 0.854 of the XLA forms for
  the 17 stride-1 weight gradients.
  """
  def as_xla(x, g):
    if strides == (1, 1):
      return _weight_grad_as_conv(x, g, padding)
    chunks = _channel_major_chunks(x, window, strides, padding) if xt is None else xt
    return _dense_weight_grad(chunks, g, window, strides).reshape(*window, x.shape[-1],
                                                                  g.shape[-1])

  if not direct.handles(jnp.result_type(x, g), g.shape[-1]):
    return as_xla(x, g)
  kernel = functools.partial(direct.weight_grad, window=window, strides=strides,
                             padding=padding)
  return lax.platform_dependent(x, g, cpu=kernel, default=as_xla)


# The weight gradient's form from `_weight_grad_as_conv` for size-preserving convolutions with
# at least this many input channels (fewer: x as the kernel gives Eigen too few output
# features; RGB 3->32 3x3 SAME at 32x32 ran 34 ms against 9).
_MIN_C_IN_FOR_X_AS_KERNEL = 8


def _weight_grad_as_conv(x: jax.Array, g: jax.Array, padding: tuple[tuple[int, int], ...]
                         ) -> jax.Array:
  """dL/dkernel [kh, kw, C_in, C_out] of a stride-1 dense convolution as one forward
  convolution in canonical NHWC/HWIO form, which Eigen runs without materialising patches.

  JAX's own transpose rule states the weight gradient as a convolution with non-canonical
  dimension labels, which XLA:CPU hands to Eigen outside loops but runs as a naive loop in a
  `lax.scan` body (where `training.fit` trains): ~300x slower. Two canonical forms, chosen
  by measurement (inside `lax.scan`, 2-core AMD EPYC, batch 128, ms, chunked im2col matmuls
  -> this):

  - size-preserving ('SAME') padding and >= 8 input channels: g [C_out, H', W', B] (batch
    as features) correlated with x as an [H, W, B, C_in] kernel, g padded as x mirrored,
    the output flipped: 16->16 3x3 at 32x32 48 -> 24, 32->32 at 16x16 22 -> 12, 64->64 at
    8x8 22 -> 10. x's transpose keeps its channels minor, so batch norm and ReLU fused
    into it stay cheap;
  - otherwise: x [C_in, H, W, B] correlated with g as an [H', W', B, C_out] kernel: 32->64
    3x3 VALID at 15x15 30 -> 14, 3->6 5x5 VALID at 32x32 18 -> 8, 6->16 5x5 at 14x14
    3.6 -> 1.5, RGB 3->32 3x3 SAME 11 -> 9. (The first form ran 10-20x slower for VALID
    convolutions, where g is padded by kh - 1 on each side.) With fewer than 8 output
    channels the same form runs on the space-to-depth squares of x and g
    (`_space_to_depth_weight_grad`): 3->6 5x5 VALID at 32x32 (LeNet-5) 8.0 -> 4.2; with
    16 and 32 output channels that was no faster (3->16 3x3 SAME 7.1 -> 6.9, 3->32 8.2 ->
    10.6).
  """
  if g.shape[1:3] == x.shape[1:3] and x.shape[-1] >= _MIN_C_IN_FOR_X_AS_KERNEL:
    # out[o, kh-1-i, kw-1-j, c] = sum_{b,u,v} g[b, u - i + lo, v - j + lo', o] x[b, u, v, c]
    mirrored = tuple((hi, lo) for lo, hi in padding)
    out = lax.conv_general_dilated(g.transpose(3, 1, 2, 0), x.transpose(1, 2, 0, 3), (1, 1),
                                   mirrored, dimension_numbers=NHWC)
    return out[:, ::-1, ::-1, :].transpose(1, 2, 3, 0)
  if g.shape[-1] < _FEW_CHANNELS:
    window = tuple(x.shape[1 + a] + sum(padding[a]) - g.shape[1 + a] + 1 for a in range(2))
    return _space_to_depth_weight_grad(x, g, window, padding)
  return _g_as_kernel_weight_grad(x, g, padding)


def _g_as_kernel_weight_grad(x: jax.Array, g: jax.Array,
                             padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """`_weight_grad_as_conv`'s second form: x [C_in, H, W, B] correlated with g as an
  [H', W', B, C_out] kernel; -> [kh, kw, C_in, C_out]."""
  out = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1),
                                 padding, dimension_numbers=NHWC)
  return out.transpose(1, 2, 0, 3)


def _space_to_depth_weight_grad(x: jax.Array, g: jax.Array, window: tuple[int, int],
                                padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """dL/dkernel of a stride-1 convolution computed on squares, as `space_to_depth.conv`:
  the squared kernel's weight gradient (g as the kernel, see `_weight_grad_as_conv`) mapped
  back through the transpose of `space_to_depth.squared_kernel` (sums of the entries each
  tap feeds)."""
  xs = space_to_depth.input_squares(x, window, padding)
  gs = space_to_depth.output_squares(g)
  # The squares in their own buffers: XLA fused the rearrangement into the transposes of
  # `_g_as_kernel_weight_grad` (RGB 32x32 x, batch 128: 1.8 ms, against 0.7 in two
  # passes; LeNet-5 train step 0.96 of without, same process).
  squared = _g_as_kernel_weight_grad(_materialized(xs), _materialized(gs), ((0, 0), (0, 0)))
  shape = jax.ShapeDtypeStruct((*window, x.shape[-1], g.shape[-1]), squared.dtype)
  return jax.linear_transpose(space_to_depth.squared_kernel, shape)(squared)[0]


def _dense_weight_grad(xt: jax.Array, g: jax.Array, window: tuple[int, int],
                       strides: tuple[int, int]) -> jax.Array:
  """dL/dkernel of a dense convolution as [kh * kw * C_in, C_out], rows in (i, j, c) order.

  Args:
    xt: the input as `_channel_major_chunks` [n, C_in, B / n, H + pads, W + pads].
    g: [B, H', W', C_out] output cotangent.
    window: (kh, kw).
    strides: (sh, sw).

  Returns:
    The sum over the n chunks of each chunk's patch matrix
    [kh * kw * C_in, (B / n) * H' * W'] times g's chunk [(B / n) * H' * W', C_out]: plain
    matmuls (XLA's own weight-gradient convolution transposes both operands in memory and
    ran 10-100x slower inside `lax.scan`).
  """
  kh, kw = window
  num_chunks, c_in, size = xt.shape[:3]
  ho, wo, c_out = g.shape[1:]
  gt = g.reshape(num_chunks, size * ho * wo, c_out)

  def add_chunk(total, chunk):
    xc, gc = chunk
    return total + channel_major_patches(xc, window, strides, (ho, wo)) @ gc, None

  init = jnp.zeros((kh * kw * c_in, c_out), g.dtype)
  if num_chunks == 1:
    return add_chunk(init, (xt[0], gt[0]))[0]
  return lax.scan(add_chunk, init, (xt, gt))[0]


_dense.defvjp(_dense_fwd, _dense_bwd)
