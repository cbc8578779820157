"""The two halves of a depthwise-separable convolution: pointwise (1x1) convolutions as
matmuls and depthwise ones as shifted multiply-adds, each with a written-out gradient."""

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp

from evoprune.ops.patches import chunks, map_chunks, output_size, scan_sum, taps


# Pointwise (1x1, unpadded): matmuls. The weight gradient x^T g contracts the batch axis,
# the major axis of both operands; XLA transposes one of them in memory first (fused with
# whatever produced it: 100 ms for a 128x32x32x64 batch-norm backward), so it is summed
# over batch chunks whose transposes stay in cache.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def pointwise(x, kernel, strides):
  """1x1 convolution of x [B, H, W, C_in] with kernel [1, 1, C_in, C_out], unpadded."""
  if strides != (1, 1):
    x = x[:, ::strides[0], ::strides[1]]
  return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))


def _pointwise_fwd(x, kernel, strides):
  return pointwise(x, kernel, strides), (x, kernel)


def _pointwise_bwd(strides, residuals, g):
  x, kernel = residuals
  _, c_out = kernel.shape[2:]
  dx = lax.dot_general(g, kernel[0, 0], (((3,), (1,)), ((), ())))
  if strides != (1, 1):
    dx = jnp.zeros(x.shape, dx.dtype).at[:, ::strides[0], ::strides[1]].set(dx)
    x = x[:, ::strides[0], ::strides[1]]

  def weight_grad(x, g):
    return x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, c_out)

  num_chunks = chunks(x.shape[0], math.prod(x.shape[1:]) * x.dtype.itemsize)
  dk = scan_sum(weight_grad, (x, g), num_chunks, jnp.zeros(kernel.shape[2:], kernel.dtype))
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


# Depthwise: shifted multiply-adds; per-tap weight-gradient reductions over batch chunks.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise(x, kernel, strides, padding):
  """Depthwise convolution of x [B, H, W, C] with kernel [kh, kw, 1, C]."""
  return _depthwise_taps(x, kernel, strides, padding)


def _depthwise_taps(x, kernel, strides, padding):
  kh, kw = kernel.shape[:2]
  out_hw = output_size(x.shape, (kh, kw), strides, padding)
  views = taps(x, (kh, kw), strides, padding, out_hw)
  return sum(t * kernel[i // kw, i % kw, 0] for i, t in enumerate(views))


def _depthwise_fwd(x, kernel, strides, padding):
  return depthwise(x, kernel, strides, padding), (x, kernel)


def _depthwise_bwd(strides, padding, residuals, g):
  x, kernel = residuals
  # The input gradient reads g kh*kw times; over batch chunks in a loop, g is computed
  # once before the loop (XLA fused its producer, a batch-norm and ReLU backward, into
  # the kh*kw-term sum and recomputed it per term: 2-3x slower), and each chunk's sum
  # stays in cache.
  input_grad = functools.partial(_depthwise_input_grad, kernel=kernel, x_hw=x.shape[1:3],
                                 strides=strides, padding=padding)
  dx = map_chunks(input_grad, g,
                  chunks(x.shape[0], math.prod(x.shape[1:]) * x.dtype.itemsize))
  kh, kw, _, c = kernel.shape
  out_hw = g.shape[1:3]

  def weight_grad(x, g):
    views = taps(x, (kh, kw), strides, padding, out_hw)
    return jnp.stack([jnp.sum(t * g, axis=(0, 1, 2)) for t in views])

  num_chunks = chunks(x.shape[0], math.prod(out_hw) * c * x.dtype.itemsize)
  dk = scan_sum(weight_grad, (x, g), num_chunks, jnp.zeros((kh * kw, c), kernel.dtype))
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


def _depthwise_input_grad(g, *, kernel, x_hw, strides, padding):
  """dL/dx of `_depthwise_taps`: each tap's g * k put back at its offset (interior
  padding by the stride undoes the strided view), summed; [b, H', W', C] -> [b, H, W, C]."""
  kh, kw = kernel.shape[:2]
  (ho, wo), (sh, sw) = g.shape[1:3], strides
  hp, wp = x_hw[0] + sum(padding[0]), x_hw[1] + sum(padding[1])
  zero = jnp.zeros((), g.dtype)
  dx = None
  for i in range(kh):
    for j in range(kw):
      part = lax.pad(g * kernel[i, j, 0], zero,
                     ((0, 0, 0), (i, hp - i - (ho - 1) * sh - 1, sh - 1),
                      (j, wp - j - (wo - 1) * sw - 1, sw - 1), (0, 0, 0)))
      dx = part if dx is None else dx + part
  (top, _), (left, _) = padding
  return dx[:, top:top + x_hw[0], left:left + x_hw[1]]


depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)
