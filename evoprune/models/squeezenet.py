"""SqueezeNet v1.0 (Iandola et al. 2016), CIFAR-sized.

Fire modules (a 1x1 "squeeze" convolution, then 1x1 and 3x3 "expand" convolutions whose
outputs are concatenated) with the paper's channel counts for fire2 ... fire9, max
pooling after the stem, fire4 and fire8, dropout, a 1x1 classifier convolution with ReLU
and global average pooling, no BatchNorm (as in the paper). For 32x32 inputs the stem is
a 3x3 stride-1 convolution with 96 filters (ImageNet: 7x7 stride 2) and pooling is 2x2.

The eight Fire modules hold 721,216 parameters, as in the ImageNet model; with the stem
(2,688) and a 10-class head (5,130) the CIFAR model has 729,034.

Names: `block_00` (stem), `block_01 ... block_08` (fire2 ... fire9) each with
`conv_squeeze < expand_1x1 < expand_3x3`, `head`; flatten order is forward order.

`stem` and `fires` (per-branch widths) default to the paper's; structured surgery
(`evoprune.surgery.shrink`) passes its own to build the smaller model.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from evoprune.models import layers

# (squeeze channels, expand channels per branch) of fire2 ... fire9.
_FIRES = ((16, 64), (16, 64), (32, 128), (32, 128), (48, 192), (48, 192), (64, 256), (64, 256))
# Max pooling follows these fire indices (0-based: after fire4 and fire8).
_POOL_AFTER = (2, 6)


def _conv(features: int, size: int, name: str) -> nn.Conv:
  return layers.Conv(
      features, (size, size), padding=layers.same_padding((size, size)),
      kernel_init=nn.initializers.he_uniform(), name=name)


class Fire(nn.Module):
  """Squeeze 1x1 -> ReLU -> [expand 1x1, expand 3x3] -> ReLU -> concatenate.

  Attributes:
    squeeze: squeeze channels.
    expand: channels of each expand branch (output has 2 * expand).
    expand_3x3: channels of the 3x3 branch if they differ from `expand`.
  """

  squeeze: int
  expand: int
  expand_3x3: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C_in] -> [B, H, W, expand + expand_3x3]."""
    x = nn.relu(_conv(self.squeeze, 1, "conv_squeeze")(x))
    left = nn.relu(_conv(self.expand, 1, "expand_1x1")(x))
    right_width = self.expand if self.expand_3x3 is None else self.expand_3x3
    right = nn.relu(_conv(right_width, 3, "expand_3x3")(x))
    return jnp.concatenate([left, right], axis=-1)


class SqueezeNet(nn.Module):
  """SqueezeNet v1.0 for small images.

  Attributes:
    num_classes: output logits.
    dropout: dropout rate before the classifier (paper: 0.5); needs a 'dropout' rng
      when `train=True` and rate > 0.
    stem: output channels of the stem convolution.
    fires: (squeeze, expand 1x1, expand 3x3) channels of each Fire module; None for the
      paper's.
  """

  num_classes: int = 10
  dropout: float = 0.5
  stem: int = 96
  fires: Sequence[Sequence[int]] | None = None

  def __post_init__(self):
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout={self.dropout} is outside [0, 1); pass e.g. 0.5")
    if self.stem < 1 or self.fires is not None and (
        len(self.fires) != len(_FIRES) or
        any(len(f) != 3 or min(int(c) for c in f) < 1 for f in self.fires)):
      raise ValueError(
          f"stem={self.stem}, fires={self.fires!r}: pass a positive stem width and "
          f"{len(_FIRES)} triples (squeeze, expand 1x1, expand 3x3), or None for the paper's")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: [B, H, W, 3] images.
      train: enables dropout (pass `rngs={'dropout': key}`).

    Returns:
      [B, num_classes] logits.
    """
    names = layers.indexed_names("block", len(_FIRES) + 1, min_width=2)
    x = layers.max_pool(nn.relu(_conv(self.stem, 3, names[0])(x)))
    fires = self.fires or [(squeeze, expand, expand) for squeeze, expand in _FIRES]
    for i, ((squeeze, expand, expand_3x3), name) in enumerate(zip(fires, names[1:])):
      x = Fire(int(squeeze), int(expand), int(expand_3x3), name=name)(x)
      if i in _POOL_AFTER:
        x = layers.max_pool(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    # The paper's classifier: a 1x1 convolution, ReLU, then global average pooling.
    x = nn.relu(layers.Conv(
        self.num_classes, (1, 1), kernel_init=nn.initializers.normal(0.01), name="head")(x))
    return layers.global_avg_pool(x)
