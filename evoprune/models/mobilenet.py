"""MobileNet v1 (Howard et al. 2017), CIFAR-sized.

A 3x3 stem convolution (stride 1 instead of ImageNet's 2, so 32x32 inputs keep enough
resolution), then 13 depthwise-separable blocks (3x3 depthwise ConvBN + ReLU, 1x1
pointwise ConvBN + ReLU) with the paper's channels and strides, global average pooling
and a dense classifier. `width_multiplier` (the paper's alpha) scales every channel count.

Names: `block_00` (stem), `block_01 ... block_13` each with `dw < pw`, `head`.

Prunable leaves: all kernels, depthwise ones included (they are `kernel` leaves with
ndim 4, and `cost.report` counts their MACs). Set `prune_depthwise=False` to keep the
depthwise kernels dense: they hold ~1% of the weights but every one of them is a whole
3x3 filter of a channel, so pruning them hurts more per weight.

`channels` (stem and the 13 pointwise widths; depthwise layers keep their input's) lets
structured surgery (`evoprune.surgery.shrink`) build the smaller model.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from evoprune.models import layers

# (output channels, stride) of the 13 depthwise-separable blocks (paper Table 1).
_BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)
_STEM_CHANNELS = 32


class SeparableBlock(nn.Module):
  """Depthwise 3x3 ConvBN + ReLU, then pointwise 1x1 ConvBN + ReLU.

  Attributes:
    features: output channels.
    strides: stride of the depthwise convolution.
  """

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C_in] -> [B, H / strides, W / strides, features]."""
    channels = x.shape[-1]
    x = layers.ConvBN(
        channels, strides=self.strides, feature_group_count=channels, name="dw")(x, train)
    return layers.ConvBN(self.features, kernel_size=(1, 1), name="pw")(x, train)


class MobileNetV1(nn.Module):
  """MobileNet v1 for small images.

  Attributes:
    num_classes: output logits.
    width_multiplier: alpha; channels become `max(1, int(c * alpha))`.
    prune_depthwise: whether depthwise kernels are prunable (see module docstring).
    channels: output channels of the stem and of the 13 pointwise convolutions; None
      for the paper's channels times `width_multiplier` (which explicit values ignore).
  """

  num_classes: int = 10
  width_multiplier: float = 1.0
  prune_depthwise: bool = True
  channels: Sequence[int] | None = None

  def __post_init__(self):
    if not self.width_multiplier > 0:
      raise ValueError(
          f"width_multiplier={self.width_multiplier} must be > 0; pass e.g. 1.0 or 0.5")
    if self.channels is not None and (
        len(self.channels) != len(_BLOCKS) + 1 or any(int(c) < 1 for c in self.channels)):
      raise ValueError(f"channels={tuple(self.channels)!r} must hold {len(_BLOCKS) + 1} "
                       "positive widths (stem, then each block); pass None for the paper's")
    super().__post_init__()

  def _channels(self, c: int) -> int:
    return max(1, int(c * self.width_multiplier))

  def is_prunable(self, path: tuple[str, ...], leaf: Any) -> bool:
    """Default rule (a `kernel` with ndim >= 2), minus depthwise kernels if asked.

    Args:
      path: the leaf's keys, e.g. ("block_01", "dw", "conv", "kernel").
      leaf: the parameter (or anything with `ndim`).

    Returns:
      Whether the leaf is prunable.
    """
    if not (path and path[-1] == "kernel" and leaf.ndim >= 2):
      return False
    return self.prune_depthwise or "dw" not in path

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: [B, H, W, 3] images.
      train: BatchNorm mode; with True, apply with `mutable=['batch_stats']`.

    Returns:
      [B, num_classes] logits.
    """
    names = layers.indexed_names("block", len(_BLOCKS) + 1, min_width=2)
    channels = self.channels or [self._channels(c) for c in (_STEM_CHANNELS, *(
        features for features, _ in _BLOCKS))]
    x = layers.ConvBN(int(channels[0]), name=names[0])(x, train)
    for (_, strides), features, name in zip(_BLOCKS, channels[1:], names[1:]):
      x = SeparableBlock(int(features), strides, name=name)(x, train)
    x = layers.global_avg_pool(x)
    return nn.Dense(self.num_classes, name="head")(x)
