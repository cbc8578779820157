"""Small plain convolutional networks: the seed paper's LeNet-5 and the thesis CNN.

- `LeNet5`: conv6 5x5 VALID - maxpool 2 - conv16 5x5 VALID - maxpool 2 - fc120 - fc84 -
  fc10, ReLU; the seed paper's CIFAR-10 model (62,006 parameters on 32x32x3 inputs).
- `ThesisCNN`: the TensorFlow CIFAR-10 tutorial network used by the thesis seed:
  conv32 3x3 - maxpool 2 - conv64 3x3 - maxpool 2 - conv64 3x3 (all VALID) - dense64 -
  dense10, ReLU (122,570 parameters on 32x32x3 inputs).

Flax's automatic names `Conv_0 < Conv_1 < Dense_0 < ...` already sort in forward order.
`features` (one width per hidden layer) defaults to the published widths; structured
surgery (`evoprune.surgery.shrink`) builds the smaller model by passing its own.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax

from evoprune.models import layers


def _check_features(features: Sequence[int], default: Sequence[int]) -> None:
  if len(features) != len(default) or any(int(f) < 1 for f in features):
    raise ValueError(
        f"features={tuple(features)!r} must hold {len(default)} positive widths (one per "
        f"hidden layer); pass e.g. features={tuple(default)!r}")


class LeNet5(nn.Module):
  """LeNet-5 as in the seed paper (ReLU, max pooling).

  Attributes:
    num_classes: output logits.
    features: widths of conv1, conv2, fc1, fc2.
  """

  num_classes: int = 10
  features: Sequence[int] = (6, 16, 120, 84)

  def __post_init__(self):
    _check_features(self.features, (6, 16, 120, 84))
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: [B, H, W, C] images (32x32x3 for CIFAR-10).
      train: unused; kept for the common signature.

    Returns:
      [B, num_classes] logits.
    """
    del train
    c1, c2, f1, f2 = (int(f) for f in self.features)
    x = layers.max_pool(nn.relu(layers.Conv(c1, (5, 5), padding="VALID")(x)))
    x = layers.max_pool(nn.relu(layers.Conv(c2, (5, 5), padding="VALID")(x)))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(f1)(x))
    x = nn.relu(nn.Dense(f2)(x))
    return nn.Dense(self.num_classes)(x)


class ThesisCNN(nn.Module):
  """The TensorFlow CIFAR-10 tutorial CNN.

  Attributes:
    num_classes: output logits.
    features: widths of the three convolutions and the hidden dense layer.
  """

  num_classes: int = 10
  features: Sequence[int] = (32, 64, 64, 64)

  def __post_init__(self):
    _check_features(self.features, (32, 64, 64, 64))
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: [B, H, W, C] images (32x32x3 for CIFAR-10).
      train: unused; kept for the common signature.

    Returns:
      [B, num_classes] logits.
    """
    del train
    c1, c2, c3, f1 = (int(f) for f in self.features)
    x = layers.max_pool(nn.relu(layers.Conv(c1, (3, 3), padding="VALID")(x)))
    x = layers.max_pool(nn.relu(layers.Conv(c2, (3, 3), padding="VALID")(x)))
    x = nn.relu(layers.Conv(c3, (3, 3), padding="VALID")(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(f1)(x))
    return nn.Dense(self.num_classes)(x)
