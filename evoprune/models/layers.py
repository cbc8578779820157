"""Building blocks shared by the model zoo: ordered layer names, Conv, Conv + BatchNorm units.

Every model names its submodules so that the `jax.tree` flatten order of its `params`
(dict keys sorted lexicographically) equals the order in which the layers run. Allocation
code relies on this to find the first and last prunable layer, so deep models use
zero-padded indices (`block_00`, `block_01`, ...) rather than flax's `Conv_10` < `Conv_2`.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from evoprune import ops

# PyTorch's BatchNorm defaults: the published CIFAR models were trained with them, and a
# momentum of 0.9 lets running statistics settle within the few epochs of a short run.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def indexed_names(prefix: str, count: int, min_width: int = 1) -> list[str]:
  """Names `prefix_0, prefix_1, ...` whose lexicographic order is their numeric order.

  Args:
    prefix: name stem, e.g. "block".
    count: number of names.
    min_width: pad the index to at least this many digits.

  Returns:
    `count` names, zero-padded to a common width (e.g. `block_00` ... `block_12`).
  """
  width = max(min_width, len(str(max(count - 1, 0))))
  return [f"{prefix}_{i:0{width}d}" for i in range(count)]


def same_padding(kernel_size: Sequence[int]) -> list[tuple[int, int]]:
  """Symmetric padding `k // 2` per spatial axis (PyTorch's `padding=k//2`).

  Flax's "SAME" pads strided convolutions asymmetrically; the published CIFAR models
  pad symmetrically, which keeps their feature maps aligned with the paper.
  """
  return [(k // 2, k // 2) for k in kernel_size]


class Conv(nn.Conv):
  """`flax.linen.Conv` running `evoprune.ops.conv_general_dilated`.

  Same parameters (`kernel` [kh, kw, C_in / groups, C_out], `bias`), initialisers and
  outputs as `nn.Conv`; the class name keeps flax's automatic names (`Conv_0`, ...). On
  CPU the convolution uses the fast formulations of `evoprune.ops`; elsewhere it is
  `lax.conv_general_dilated` itself.
  """

  conv_general_dilated: Any = ops.conv_general_dilated


def max_pool(x: jax.Array, window: int = 2) -> jax.Array:
  """Non-overlapping `window` x `window` max pooling (VALID), `evoprune.ops.max_pool`."""
  return ops.max_pool(x, (window, window), (window, window))


class ConvBN(nn.Module):
  """Convolution (no bias) -> BatchNorm -> optional ReLU.

  Submodule names `conv` < `norm` keep the flatten order equal to the forward order.

  Attributes:
    features: output channels.
    kernel_size: spatial kernel size, e.g. (3, 3).
    strides: spatial stride (same on every axis).
    feature_group_count: 1 for a dense convolution, `in_channels` for a depthwise one.
    relu: apply ReLU after the normalisation.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: int = 1
  feature_group_count: int = 1
  relu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the unit.

    Args:
      x: [B, H, W, C_in] images.
      train: use batch statistics (and update the running ones) when True.

    Returns:
      [B, H', W', features] activations.
    """
    x = Conv(
        self.features,
        self.kernel_size,
        strides=self.strides,
        padding=same_padding(self.kernel_size),
        feature_group_count=self.feature_group_count,
        use_bias=False,  # the BatchNorm shift makes a bias redundant
        kernel_init=nn.initializers.he_normal(),
        name="conv",
    )(x)
    return BatchNorm(use_running_average=not train, relu=self.relu, name="norm")(x)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over the channel axis, fused with an optional ReLU.

  The same variables (params `scale`, `bias`; batch_stats `mean`, `var`) and arithmetic
  as `nn.BatchNorm(momentum, epsilon)` followed by `nn.relu`; in training the batch
  normalization is `evoprune.ops.batch_norm`, whose gradient on CPU is written out.

  Attributes:
    use_running_average: normalize with the running statistics (inference) instead of the
      batch's (and update the running ones).
    relu: apply ReLU to the output.
    momentum: decay of the running statistics.
    epsilon: added to the variance.
  """

  use_running_average: bool = False
  relu: bool = False
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., C] -> [..., C]."""
    features = (x.shape[-1],)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
    scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
    if self.use_running_average:
      y = (x - running_mean.value) * (
          scale * jax.lax.rsqrt(running_var.value + self.epsilon)) + bias
      return nn.relu(y) if self.relu else y
    y, mean, var = ops.batch_norm(x, scale, bias, epsilon=self.epsilon, relu=self.relu)
    if not self.is_initializing():
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
      running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    return y


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes: [B, H, W, C] -> [B, C]."""
  return jnp.mean(x, axis=(1, 2))
