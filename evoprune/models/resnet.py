"""CIFAR ResNets (He et al. 2016, Sec. 4.2), ResNet-20 by default.

A 3x3 stem convolution with 16 filters, three stages of `n` basic blocks with 16, 32 and
64 filters (the first block of stages 2 and 3 halves the resolution), global average
pooling and a dense classifier; depth = 6n + 2.

Shortcuts use **option A** of the paper: parameter-free identity, and where the shape
changes the input is subsampled with stride 2 and its channels are zero-padded (half
the new channels on each side). So every parameter sits in a convolution, a BatchNorm
or the classifier, and ResNet-20 has, by hand:

  convs  3*3*3*16 + 6*(3*3*16*16) + 3*3*16*32 + 5*(3*3*32*32) + 3*3*32*64 + 5*(3*3*64*64)
         = 432 + 13,824 + 4,608 + 46,080 + 18,432 + 184,320 = 267,696
  BN     2 * (16 + 6*16 + 6*32 + 6*64) = 1,376
  dense  64*10 + 10 = 650
  total  269,722

Names: `block_00` is the stem, `block_01 ...` the residual blocks, `head` the classifier;
inside, `unit_0 < unit_1` and `conv < norm`, so flatten order is forward order.

Per-layer widths (`stage_widths`, `inner_widths`) and explicit shortcut channel maps
(`shortcuts`) default to the paper's network; structured surgery
(`evoprune.surgery.shrink`) passes its own to build the smaller model.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evoprune import ops
from evoprune.models import layers


class BasicBlock(nn.Module):
  """Two 3x3 ConvBN units with an option-A shortcut.

  Attributes:
    features: output channels.
    strides: stride of the first convolution (2 at the start of stages 2 and 3).
    inner: output channels of the first convolution (default `features`).
    shortcut: for each output channel, the input channel the shortcut carries there, or
      -1 for a zero channel; None: option A's zero channels split evenly on both sides.
  """

  features: int
  strides: int = 1
  inner: int | None = None
  shortcut: Sequence[int] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, H, W, C_in] activations.
      train: BatchNorm mode.

    Returns:
      [B, H / strides, W / strides, features] activations.
    """
    inner = self.features if self.inner is None else self.inner
    y = layers.ConvBN(inner, strides=self.strides, name="unit_0")(x, train)
    y = layers.ConvBN(self.features, relu=False, name="unit_1")(y, train)
    shortcut = x
    if self.strides != 1:
      shortcut = shortcut[:, ::self.strides, ::self.strides, :]
    extra = self.features - x.shape[-1]
    if self.shortcut is not None:
      # Index -1 wraps to an appended zero channel, so one gather does the whole map.
      index = np.asarray(self.shortcut, np.int32) % (x.shape[-1] + 1)
      padded = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, 1)))
      shortcut = jnp.take(padded, index, axis=-1)
    elif extra:
      # Option A: zero channels, split evenly on both sides, add no parameters.
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    y = nn.relu(y + shortcut)
    # Training: its own buffer on CPU, read by the next block twice (ops.materialize). In
    # inference XLA's fusion is no slower (dense ResNet-20, batch 256: 1.03x with it).
    return ops.materialize(y) if train else y


class CifarResNet(nn.Module):
  """ResNet for 32x32 inputs with option-A shortcuts.

  Attributes:
    depth: 6n + 2 layers (20, 32, 44, 56, 110).
    num_classes: output logits.
    width: channels of the first stage (doubled at each later stage).
    stage_widths: channels of the three stages (stem and block outputs); default
      (width, 2 * width, 4 * width).
    inner_widths: output channels of each block's first convolution, one per block;
      default the stage's width.
    shortcuts: the channel maps of the first blocks of stages 2 and 3 (see
      `BasicBlock.shortcut`); default option A's even zero-padding.
  """

  depth: int = 20
  num_classes: int = 10
  width: int = 16
  stage_widths: Sequence[int] | None = None
  inner_widths: Sequence[int] | None = None
  shortcuts: Sequence[Sequence[int]] | None = None

  def __post_init__(self):
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(
          f"depth={self.depth} is not of the form 6n + 2 with n >= 1; pass e.g. 20, 32 or 56")
    if self.width < 1:
      raise ValueError(f"width={self.width} must be >= 1; pass e.g. 16")
    blocks = (self.depth - 2) // 2
    for name, value, size in (("stage_widths", self.stage_widths, 3),
                              ("inner_widths", self.inner_widths, blocks)):
      if value is not None and (len(value) != size or any(int(w) < 1 for w in value)):
        raise ValueError(f"{name}={tuple(value)!r} must hold {size} positive widths; pass "
                         "None for the paper's widths")
    if self.shortcuts is not None and len(self.shortcuts) != 2:
      raise ValueError(f"shortcuts has {len(self.shortcuts)} maps; pass one per stage "
                       "transition (2) or None for option A")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: [B, H, W, 3] images.
      train: BatchNorm mode; with True, apply with `mutable=['batch_stats']`.

    Returns:
      [B, num_classes] logits.
    """
    blocks_per_stage = (self.depth - 2) // 6
    names = layers.indexed_names("block", 3 * blocks_per_stage + 1, min_width=2)
    stages = self.stage_widths or tuple(self.width * 2**s for s in range(3))
    x = layers.ConvBN(int(stages[0]), name=names[0])(x, train)
    index = 1
    for stage in range(3):
      for block in range(blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        inner = None if self.inner_widths is None else int(self.inner_widths[index - 1])
        shortcut = None
        if self.shortcuts is not None and stage > 0 and block == 0:
          shortcut = tuple(int(i) for i in self.shortcuts[stage - 1])
        x = BasicBlock(int(stages[stage]), strides, inner, shortcut, name=names[index])(
            x, train)
        index += 1
    x = layers.global_avg_pool(x)
    return nn.Dense(self.num_classes, name="head")(x)
