"""Multi-layer perceptrons: the seed paper's MNIST network and LeNet-300-100.

Presets (see `evoprune.models.MODELS`):
  - `mlp_paper`: 784-256-128-64-10 with ReLU, the seed paper's MNIST / Fashion-MNIST
    model: 242,762 parameters.
  - `lenet300_100`: 784-300-100-10 (LeCun et al. 1998; Han et al. 2015's pruning
    benchmark): 266,610 parameters.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax

from evoprune.models import layers


class MLP(nn.Module):
  """Fully connected ReLU network on flattened inputs.

  Parameters are `Dense_0 ... Dense_L` (zero-padded past ten layers), so the flatten
  order of `params` is the forward order.

  Attributes:
    widths: hidden layer sizes, e.g. (300, 100).
    num_classes: output logits.
  """

  widths: Sequence[int] = (256, 128, 64)
  num_classes: int = 10

  def __post_init__(self):
    if not self.widths or any(int(w) < 1 for w in self.widths):
      raise ValueError(
          f"widths={tuple(self.widths)!r} must be a non-empty sequence of positive "
          "hidden sizes; pass e.g. widths=(300, 100)")
    if self.num_classes < 1:
      raise ValueError(f"num_classes={self.num_classes} must be >= 1; pass e.g. 10")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: [B, ...] inputs of any trailing shape (e.g. [B, 28, 28, 1]); flattened.
      train: unused (no dropout or normalisation); kept for the common signature.

    Returns:
      [B, num_classes] logits.
    """
    del train
    x = x.reshape((x.shape[0], -1))
    names = layers.indexed_names("Dense", len(self.widths) + 1)
    for width, name in zip(self.widths, names):
      x = nn.relu(nn.Dense(int(width), name=name)(x))
    return nn.Dense(self.num_classes, name=names[-1])(x)
