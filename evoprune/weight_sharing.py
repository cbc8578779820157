"""Weight sharing (Deep Compression, Han et al. 2016): per-layer k-means of nonzero weights.

    shared = ep.weight_sharing.share(params, bits=4)   # kernels -> uint8 indices + codebooks
    shared = ep.weight_sharing.finetune(model, shared, x_train, y_train, epochs=1)
    params = ep.weight_sharing.reconstruct(shared)     # float params for the model
    ep.storage.save("model.npz", shared, sparse="auto")  # 4-bit indices, codebooks in fp32

Each prunable kernel (by default a leaf named 'kernel' with ndim >= 2) becomes uint8
indices of its shape plus a float32 codebook of `2**bits` entries stored beside it as
'kernel_codebook'. Entry 0 is fixed at 0.0 and holds exactly the zero (pruned) weights, so
sparsity survives sharing; the nonzero weights are clustered into the other `2**bits - 1`
centroids by Lloyd's k-means in one dimension, initialised linearly between the smallest
and largest nonzero weight (the initialisation Han et al. found best: it keeps the few
large weights, which matter most, represented). The clusters of 1-D k-means are intervals,
so assignments are a `searchsorted` on the midpoints between sorted centroids: O(n log k).

Fine-tuning trains the codebooks only: the gradient of a centroid is the sum of the
gradients of the weights that share it (what `jax.grad` gives through the gather), and
entry 0 receives none, so pruned weights stay zero. The storage report counts the
codebooks, since they are ordinary leaves of the saved tree.
"""

import functools
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from evoprune import data as data_lib
from evoprune import masks as masks_lib
from evoprune import training
from evoprune.types import Params

CODEBOOK_SUFFIX = "_codebook"
MAX_BITS = 8  # indices are uint8


def kmeans_1d(values: jax.Array, valid: jax.Array, k: int, iterations: int = 30
              ) -> tuple[jax.Array, jax.Array]:
  """Lloyd's k-means of the `valid` entries of a 1-D array, linear initialisation.

  Args:
    values: [n] floats.
    valid: [n] bool; only these entries are clustered (at least one should be True).
    k: number of centroids (>= 1).
    iterations: Lloyd steps (a fixed count: the function compiles to one loop).

  Returns:
    (centroids [k] sorted ascending, assignment [n] int32 in [0, k)). A centroid whose
    cluster empties keeps its position.
  """
  values = values.astype(jnp.float32)
  low = jnp.min(jnp.where(valid, values, jnp.inf))
  high = jnp.max(jnp.where(valid, values, -jnp.inf))
  centroids = jnp.linspace(low, high, k)

  def assign(centroids):
    return jnp.searchsorted((centroids[1:] + centroids[:-1]) / 2, values).astype(jnp.int32)

  def step(centroids, _):
    labels = assign(centroids)
    weight = valid.astype(jnp.float32)
    sums = jax.ops.segment_sum(values * weight, labels, num_segments=k)
    counts = jax.ops.segment_sum(weight, labels, num_segments=k)
    moved = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), centroids)
    return jnp.sort(moved), None

  centroids, _ = jax.lax.scan(step, centroids, None, length=iterations)
  return centroids, assign(centroids)


@functools.partial(jax.jit, static_argnames=("bits", "iterations"))
def _share_leaf(kernel: jax.Array, bits: int, iterations: int) -> tuple[jax.Array, jax.Array]:
  flat = kernel.ravel()
  nonzero = flat != 0
  centroids, labels = kmeans_1d(flat, nonzero, 2 ** bits - 1, iterations)
  codebook = jnp.concatenate([jnp.zeros((1,), jnp.float32), centroids])
  indices = jnp.where(nonzero, labels + 1, 0).astype(jnp.uint8)
  return indices.reshape(kernel.shape), codebook


def share(params: Params, bits: int = 4, *, iterations: int = 30,  # pylint: disable=redefined-builtin
          filter: masks_lib.Filter = masks_lib.default_filter) -> Params:
  """Replaces every prunable kernel by codebook indices and adds its codebook.

  Args:
    params: float params (nested dicts, as linen makes them); zeros are pruned weights.
    bits: index width: `2**bits` codebook entries, entry 0 being the zero weight.
    iterations: k-means steps per layer.
    filter: `filter(path_keys, leaf) -> bool` selects the kernels to share.

  Returns:
    A tree like `params` where each shared leaf 'name' is uint8 indices [shape of the
    kernel] and a new sibling 'name_codebook' is float32 [2**bits].

  Raises:
    ValueError: bits outside [1, 8], or a kernel without nonzero weights.
  """
  if not 1 <= bits <= MAX_BITS:
    raise ValueError(f"bits={bits!r} is outside [1, {MAX_BITS}] (uint8 indices); pass e.g. 4 "
                     "(16 shared values per layer) or 5.")

  def visit(node: Any, path: tuple[str, ...]) -> Any:
    if not isinstance(node, Mapping):
      return node
    out = {}
    for key, leaf in node.items():
      if not isinstance(leaf, Mapping) and filter((*path, key), leaf):
        kernel = jnp.asarray(leaf)
        if not bool(jnp.any(kernel != 0)):
          raise ValueError(f"{'/'.join((*path, key))} has no nonzero weight to cluster; "
                           "exclude it with filter=.")
        out[key], out[key + CODEBOOK_SUFFIX] = _share_leaf(kernel, bits, iterations)
      else:
        out[key] = visit(leaf, (*path, key))
    return out

  return visit(params, ())


def _is_shared(node: Mapping, key: str) -> bool:
  return key + CODEBOOK_SUFFIX in node and not isinstance(node[key], Mapping)


def codebooks(shared: Params) -> Params:
  """The trainable part of a shared tree: {path...: {name_codebook: [k]}} only."""
  if not isinstance(shared, Mapping):
    return None
  out = {}
  for key, value in shared.items():
    if key.endswith(CODEBOOK_SUFFIX):
      out[key] = value
    elif isinstance(value, Mapping):
      sub = codebooks(value)
      if sub:
        out[key] = sub
  return out


def replace_codebooks(shared: Params, new: Params) -> Params:
  """`shared` with its codebooks taken from `new` (a `codebooks`-shaped tree)."""
  if not isinstance(shared, Mapping):
    return shared
  return {key: (new[key] if key in new and not isinstance(new[key], Mapping)
                else replace_codebooks(value, new.get(key, {})))
          for key, value in shared.items()}


def reconstruct(shared: Params) -> Params:
  """Float params for the model: each shared kernel is `codebook[indices]`."""
  if not isinstance(shared, Mapping):
    return shared
  out = {}
  for key, value in shared.items():
    if key.endswith(CODEBOOK_SUFFIX) and key[:-len(CODEBOOK_SUFFIX)] in shared:
      continue
    if _is_shared(shared, key):
      out[key] = jnp.asarray(shared[key + CODEBOOK_SUFFIX])[jnp.asarray(value, jnp.int32)]
    else:
      out[key] = reconstruct(value)
  return out


def _zero_entry_zero(tree: Params) -> Params:
  """Gradients (or updates) with entry 0 of every codebook zeroed: the zero stays zero."""
  return jax.tree.map(lambda g: g.at[0].set(0.0), tree)


def finetune(model: nn.Module, shared: Params, x: np.ndarray, y: np.ndarray, *,
             epochs: int = 1, batch_size: int = 128, learning_rate: float = 1e-4,
             seed: int = 0, batch_stats: Any = None,
             optimizer: Callable[[float], optax.GradientTransformation] = optax.adam
             ) -> tuple[Params, list[float]]:
  """Trains the codebooks (indices fixed) on (x, y) with cross-entropy.

  Args:
    model: the linen model the reconstructed params belong to.
    shared: `share`'s output.
    x: [N, ...] training inputs; y: [N] integer labels.
    epochs, batch_size, learning_rate, seed: the loop (one compiled scan per epoch, batches
      from `data.epoch_batch_indices`).
    batch_stats: batch-norm statistics, if any (kept fixed: inference mode).
    optimizer: an optax constructor taking the learning rate.

  Returns:
    (shared tree with trained codebooks, mean training loss per epoch).
  """
  if epochs < 0 or batch_size < 1:
    raise ValueError(f"epochs={epochs} must be >= 0 and batch_size={batch_size} >= 1.")
  tx = optimizer(learning_rate)
  books = codebooks(shared)
  opt_state = tx.init(books)
  x_all, y_all = jnp.asarray(x), jnp.asarray(y)
  extra = {"batch_stats": batch_stats} if batch_stats else {}

  def loss_fn(books, fixed, xb, yb):
    params = reconstruct(replace_codebooks(fixed, books))
    logits = model.apply({"params": params, **extra}, xb, train=False)
    return training.cross_entropy(logits, yb)

  # Data and the fixed leaves are arguments, not closed-over constants baked into the program.
  @jax.jit
  def epoch_fn(books, opt_state, fixed, x_all, y_all, batch_indices):
    def body(carry, idx):
      books, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(books, fixed, x_all[idx], y_all[idx])
      updates, opt_state = tx.update(_zero_entry_zero(grads), opt_state, books)
      return (optax.apply_updates(books, _zero_entry_zero(updates)), opt_state), loss
    (books, opt_state), losses = jax.lax.scan(body, (books, opt_state), batch_indices)
    return books, opt_state, losses.mean()

  history = []
  for epoch in range(epochs):
    batch_indices = data_lib.epoch_batch_indices(len(y), batch_size, seed=seed, epoch=epoch)
    books, opt_state, loss = epoch_fn(books, opt_state, shared, x_all, y_all,
                                      jnp.asarray(batch_indices))
    history.append(float(loss))
  return replace_codebooks(shared, books), history
