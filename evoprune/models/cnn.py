"""Small plain convolutional networks: the seed paper's LeNet-5 and the thesis CNN.

- `LeNet5`: conv6 5x5 VALID - maxpool 2 - conv16 5x5 VALID - maxpool 2 - fc120 - fc84 -
  fc10, ReLU; the seed paper's CIFAR-10 model (62,006 parameters on 32x32x3 inputs).
- `ThesisCNN`: the TensorFlow CIFAR-10 tutorial network used by the thesis seed:
  conv32 3x3 - maxpool 2 - conv64 3x3 - maxpool 2 - conv64 3x3 (all VALID) - dense64 -
  dense10, ReLU (122,570 parameters on 32x32x3 inputs).

Flax's automatic names `Conv_0 < Conv_1 < Dense_0 < ...` already sort in forward order.
"""

import flax.linen as nn
import jax


def _max_pool(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))


class LeNet5(nn.Module):
  """LeNet-5 as in the seed paper (ReLU, max pooling).

  Attributes:
    num_classes: output logits.
  """

  num_classes: int = 10

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
    x = _max_pool(nn.relu(nn.Conv(6, (5, 5), padding="VALID")(x)))
    x = _max_pool(nn.relu(nn.Conv(16, (5, 5), padding="VALID")(x)))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(120)(x))
    x = nn.relu(nn.Dense(84)(x))
    return nn.Dense(self.num_classes)(x)


class ThesisCNN(nn.Module):
  """The TensorFlow CIFAR-10 tutorial CNN.

  Attributes:
    num_classes: output logits.
  """

  num_classes: int = 10

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
    x = _max_pool(nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x)))
    x = _max_pool(nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x)))
    x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(self.num_classes)(x)
