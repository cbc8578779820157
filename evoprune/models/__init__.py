"""Flax (linen) model zoo and the rule that says which parameters are prunable.

    model = ep.models.create("lenet5", num_classes=10)
    variables = ep.models.init(model, {"params": key, "dropout": key}, x, train=False)
    logits = model.apply(variables, x, train=False)
    logits, updates = model.apply(variables, x, train=True, rngs={"dropout": key},
                                  mutable=["batch_stats"])  # BatchNorm models

Every model's `__call__(x, train=False)` takes NHWC float32 images (MLPs flatten any
input; GPT takes int tokens [B, T] and returns [B, T, vocab]). Submodules are named so
that the `jax.tree` flatten order of `params` is the forward order of the layers: the
first and last prunable leaves in flatten order are the first and last layers.

Prunable leaves: by default a leaf named `kernel` with ndim >= 2 (Dense and Conv
kernels, depthwise ones included); biases, norms and embeddings are not. A model may
narrow this with a method `is_prunable(path, leaf) -> bool` (MobileNet's
`prune_depthwise=False` does).
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from jax.extend import random as jax_random

from evoprune.models.cnn import LeNet5, ThesisCNN
from evoprune.models.mlp import MLP
from evoprune.models.mobilenet import MobileNetV1
from evoprune.models.resnet import CifarResNet
from evoprune.models.squeezenet import SqueezeNet
from evoprune.models.transformer import GPT, ViT
from evoprune.types import Params

__all__ = [
    "MODELS", "create", "init", "prunable", "default_is_prunable", "path_names",
    "MLP", "LeNet5", "ThesisCNN", "CifarResNet", "MobileNetV1", "SqueezeNet", "ViT", "GPT",
]

# The seed paper's TinyGPT (10,788,929 parameters; see transformer.py for the count).
TINYGPT = dict(
    vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2,
    bias=True, qkv_bias=False, tie_embeddings=False, activation="relu",
)

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "mlp_paper": functools.partial(MLP, widths=(256, 128, 64)),
    "lenet300_100": functools.partial(MLP, widths=(300, 100)),
    "lenet5": LeNet5,
    "thesis_cnn": ThesisCNN,
    "resnet20": functools.partial(CifarResNet, depth=20),
    "mobilenet": MobileNetV1,
    "squeezenet": SqueezeNet,
    "vit": ViT,
    "gpt": GPT,
    "tinygpt": functools.partial(GPT, **TINYGPT),
}


def create(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
  """Builds a model of the zoo by name.

  Args:
    name: a key of `MODELS`.
    num_classes: output classes of a classifier (default 10). For the language models
      ("gpt", "tinygpt") the classes are the vocabulary: a value sets `vocab_size`.
    **kwargs: the model's attributes, overriding a preset's (e.g. `widths=(512, 256)`,
      `width_multiplier=0.5`, `n_layer=2`).

  Returns:
    An unbound flax.linen Module.

  Raises:
    ValueError: unknown name, unknown keyword, or an invalid value.
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
  factory = MODELS[name]
  cls = factory.func if isinstance(factory, functools.partial) else factory
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(
        f"Model {name!r} has no attribute(s) {unknown}; valid keywords: {sorted(fields)}")
  if num_classes is not None and num_classes < 1:
    raise ValueError(f"num_classes={num_classes} must be >= 1; pass e.g. 10")
  if "num_classes" in fields:
    kwargs["num_classes"] = 10 if num_classes is None else num_classes
  elif num_classes is not None:
    if kwargs.get("vocab_size", num_classes) != num_classes:
      raise ValueError(
          f"num_classes={num_classes} and vocab_size={kwargs['vocab_size']} disagree for "
          f"{name!r}; pass only vocab_size")
    kwargs["vocab_size"] = num_classes
  return factory(**kwargs)


def init(model: nn.Module, rngs: jax.Array | dict[str, jax.Array], *args: Any,
         **kwargs: Any) -> dict[str, Any]:
  """`model.init(rngs, *args, **kwargs)`, compiled in a fraction of the time.

  One compiled call (`jax.jit`, cached per model and keywords) instead of flax's op-by-op
  initialisation, with every threefry key's random numbers drawn as one flat vector and
  reshaped (`_FLAT_THREEFRY`). The variables equal `jax.jit(model.init)`'s bit for bit,
  and eager `model.init`'s up to float rounding (XLA fuses the scaling). Time to
  initialise (2-core AMD EPYC, jax 0.10.2, fresh process, eager `model.init` -> this):
  ResNet-20 13.3 -> 3.5 s, thesis CNN 7.7 -> 1.6 s, MobileNet 22 -> 5.7 s.

  Args:
    model: a flax module.
    rngs: a key, or a dict of keys by collection ('params', 'dropout').
    *args: the example inputs of `model.__call__`.
    **kwargs: its keyword arguments, static (e.g. `train=False`).

  Returns:
    The variables dict.
  """
  rngs = jax.tree.map(_flat_draws, rngs)
  try:
    compiled = _compiled_init(model, tuple(sorted(kwargs.items())))
  except TypeError:  # an unhashable module or keyword: compiled for this call only
    compiled = jax.jit(functools.partial(model.init, **kwargs))
  return compiled(rngs, *args)


@functools.lru_cache(maxsize=64)
def _compiled_init(model: nn.Module, kwargs: tuple[tuple[str, Any], ...]) -> Callable:
  return jax.jit(functools.partial(model.init, **dict(kwargs)))


# XLA:CPU (jax 0.10.2) compiles a random draw of an N-D shape far more slowly than of its
# flattened shape: 2.4-3.5 s for a [3, 3, 16, 16] kernel against 0.3 s for [2304]. Threefry
# numbers each element by its position in the flattened array, so this implementation
# (threefry's own key derivation, its bits drawn flat) gives threefry's values exactly.
_THREEFRY = jax_random.threefry_prng_impl
_FLAT_THREEFRY = jax_random.define_prng_impl(
    key_shape=_THREEFRY.key_shape, seed=_THREEFRY.seed, split=_THREEFRY.split,
    fold_in=_THREEFRY.fold_in, name="threefry2x32_flat_bits",
    random_bits=lambda key, bit_width, shape: _THREEFRY.random_bits(
        key, bit_width, (math.prod(shape),)).reshape(shape))


def _flat_draws(key: jax.Array) -> jax.Array:
  """A threefry key (typed, or raw uint32 under the default threefry implementation) as the
  same key of `_FLAT_THREEFRY`; any other key unchanged."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if str(jax.random.key_impl(key)) != "threefry2x32":
      return key
    key = jax.random.key_data(key)
  elif jax.config.jax_default_prng_impl != "threefry2x32":
    return key
  return jax.random.wrap_key_data(key, impl=_FLAT_THREEFRY)


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """A `jax.tree_util` key path as plain strings, e.g. ("Dense_0", "kernel")."""
  names = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
    else:
      names.append(str(entry))
  return tuple(names)


def default_is_prunable(path: tuple[str, ...], leaf: Any) -> bool:
  """A leaf named `kernel` with ndim >= 2 (Dense and Conv kernels) is prunable."""
  return bool(path) and path[-1] == "kernel" and getattr(leaf, "ndim", 0) >= 2


def prunable(params: Params, model: nn.Module | None = None) -> Any:
  """Which leaves of `params` may be pruned.

  Args:
    params: a pytree of arrays (or `jax.ShapeDtypeStruct`s), e.g. `variables['params']`.
    model: optional; if it has a method `is_prunable(path, leaf) -> bool`, that rule
      replaces `default_is_prunable`.

  Returns:
    A tree with the structure of `params`: True for prunable leaves, None elsewhere
    (use `is_leaf=lambda x: x is None` when mapping over it together with `params`).
  """
  rule = getattr(model, "is_prunable", None) or default_is_prunable
  return jax.tree.map_with_path(
      lambda path, leaf: True if rule(path_names(path), leaf) else None, params)
