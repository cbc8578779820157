"""Structured surgery: remove pruned neurons and filters, and every slice that depends on them.

    masks = ep.surgery.structured(model, params, 0.5)        # whole filters, groups tied
    small_model, small_variables = ep.surgery.shrink(model, variables, masks)

`shrink` returns a model of the same linen class built with narrower layers (through the
model's width fields) and its parameters, computing what the masked model computes
(`model.apply` with `ep.masks.apply(params, masks)`) in inference mode.

Channel graphs (`evoprune.surgery.graphs`) describe each supported zoo class: which
kernel's outputs feed which kernels' inputs, which BatchNorm and bias follow, where a
flatten or a concatenation happens, and which spaces are tied (a residual stage, a
depthwise layer and its input) and so keep or lose each channel together.

Which channels go. A value analysis of the masked model finds, for every channel of every
space, whether it is live or a known constant (a pruned filter outputs its bias or its
BatchNorm shift, through ReLU and pooling). A channel is removed only when this cannot
change the outputs: it is zero, or no layer reads it (e.g. its depthwise filter is pruned),
or its constant folds exactly into every reader: a dense layer (also after flatten or
global pooling) or an unpadded (VALID or 1x1) convolution takes `c * sum(weights)` into its
bias or, when it has none, into its BatchNorm running mean; a shortcut takes it into the
BatchNorm shift of the block's last convolution. A zero-padded 3x3 convolution cannot
absorb a constant (the border sees the padding), so a pruned channel that still carries
one raises a ValueError (or, with `strict=False`, is kept). Masks that cover the pruned
units' biases and BatchNorm scales and shifts never carry such constants: those of
`ep.Pruner(granularity='filter' | 'neuron')` do (`ep.masks.cover_dependents`), so a model
trained with them shrinks exactly. For other masks (e.g. `structured` below, which masks
kernels only), `zero_pruned` first zeroes the biases and BatchNorm scales and shifts of
pruned channels (this changes the outputs; fine-tune or re-evaluate after). Channels
whose tied members disagree (pruned in one residual layer, kept in another) are kept;
`structured` builds masks that agree. Model inputs and outputs are never shrunk. Constants are computed with running statistics, so equality
holds in inference mode; in training mode (BatchNorm on batch statistics) it holds when
pruned channels carry no BatchNorm constants, e.g. after `zero_pruned`.
"""

import collections
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from evoprune import masks as masks_lib
from evoprune.models import layers as zoo_layers
from evoprune.surgery import graphs
# Re-exported: the channel-graph types and the group-aware structured masks.
from evoprune.surgery.graphs import GRAPHS, Graph, Layer, Space, graph, structured
from evoprune.types import Masks, Params

__all__ = ["shrink", "plan", "zero_pruned", "structured", "graph", "GRAPHS", "Graph",
           "Layer", "Space"]


def _to_numpy(tree: Any) -> Any:
  """Nested plain dicts of float64 numpy arrays (FrozenDicts included)."""
  if isinstance(tree, Mapping):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)


def _like(new: Any, old: Any) -> Any:
  """`new` (numpy, same structure as `old`) as jax arrays with `old`'s dtypes."""
  leaves, treedef = jax.tree.flatten(new)
  return treedef.unflatten([jax.numpy.asarray(x, np.asarray(o).dtype)
                            for x, o in zip(leaves, jax.tree.leaves(old))])


# ---------------------------------------------------------------------------------------
# Analysis of the masked model.


class _Net:
  """The masked model's arrays (float64 numpy) and derived per-layer quantities."""

  def __init__(self, model: nn.Module, variables: Mapping[str, Any], masks: Masks | None):
    params = variables["params"]
    self.graph = graphs.graph(model, params)  # first: unsupported models fail clearly
    if masks is not None:
      masks_lib.check(params, masks)
      params = masks_lib.apply(params, masks)
    self.params = _to_numpy(params)
    self.stats = _to_numpy(variables.get("batch_stats", {}))
    self._reduced = {}
    self.producers = collections.defaultdict(list)
    self.readers = collections.defaultdict(list)  # space -> [(layer, offset in its input)]
    self.successors = collections.defaultdict(list)  # space -> spaces it shortcuts into
    for layer in self.graph.layers:
      self.producers[layer.dst].append(layer)
      offset = 0
      for s in layer.src:
        self.readers[s].append((layer, offset))
        offset += self.graph.spaces[s].size
      if layer.norm and not self.stats:
        raise ValueError(f"{type(model).__name__} has BatchNorm; pass the whole variables "
                         "dict {'params': ..., 'batch_stats': ...} instead of params alone")
    for name, space in self.graph.spaces.items():
      if space.shortcut is not None:
        self.successors[space.shortcut].append(name)
    self.family = graphs.families(self.graph)
    self.values: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in self.graph.spaces:
      self.value(name)

  def leaf(self, tree: dict, path: tuple[str, ...], name: str) -> np.ndarray | None:
    node = tree
    for key in (*path, name):
      if not isinstance(node, Mapping) or key not in node:
        return None
      node = node[key]
    return node

  def identity(self, name: str) -> bool:
    return graphs.identity(self.graph, name)

  def reduced(self, layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """(sum of weights, any nonzero weight) per (input channel, output channel).

    Depthwise layers give vectors [C] (input channel = output channel).
    """
    if layer.path not in self._reduced:
      kernel = graphs.kernel(self.params, layer.path)
      if layer.depthwise:
        flat = kernel.reshape(-1, kernel.shape[-1])
      else:
        # Rows of a dense layer after a flatten are (position, channel), channel fastest.
        n_in = sum(self.graph.spaces[s].size for s in layer.src)
        flat = kernel.reshape(-1, n_in, kernel.shape[-1])
      self._reduced[layer.path] = (flat.sum(0), (flat != 0).any(0))
    return self._reduced[layer.path]

  def value(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(live [n], constant [n]) of a space's channels; constants are 0 where live."""
    if name in self.values:
      return self.values[name]
    space = self.graph.spaces[name]
    live, const = np.zeros(space.size, bool), np.zeros(space.size)
    if not self.producers[name] and space.shortcut is None:
      live[:] = True  # a model input
    for layer in self.producers[name]:
      layer_live, layer_const = self.layer_value(layer)
      live |= layer_live
      const += layer_const
    if space.shortcut is not None:
      src_live, src_const = self.value(space.shortcut)
      index = np.asarray(space.index)
      on = index >= 0
      live[on] |= src_live[index[on]]
      const[on] += src_const[index[on]]
    if space.relu:
      const = np.maximum(const, 0.0)
    self.values[name] = (live, np.where(live, 0.0, const))
    return self.values[name]

  def layer_value(self, layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    ins = [self.value(s) for s in layer.src]
    live_in = np.concatenate([v[0] for v in ins])
    const_in = np.concatenate([v[1] for v in ins])
    total, nonzero = self.reduced(layer)
    # A constant meeting zero padding is no longer constant at the border.
    reach = live_in | (layer.padded & (const_in != 0))
    if layer.depthwise:
      live, const = nonzero & reach, const_in * total
    else:
      live, const = (nonzero & reach[:, None]).any(0), const_in @ total
    bias = self.leaf(self.params, layer.path, "bias")
    if bias is not None:
      const = const + bias
    if layer.norm is not None:
      mean = self.leaf(self.stats, layer.norm, "mean")
      var = self.leaf(self.stats, layer.norm, "var")
      scale = self.leaf(self.params, layer.norm, "scale")
      shift = self.leaf(self.params, layer.norm, "bias")
      const = (const - mean) / np.sqrt(var + zoo_layers.BN_EPSILON) * scale + shift
    if layer.relu:
      const = np.maximum(const, 0.0)
    return live, np.where(live, 0.0, const)

  def can_fold(self, layer: Layer) -> bool:
    """Whether a constant input folds exactly into the layer (its bias or BN mean)."""
    return not layer.padded and (self.leaf(self.params, layer.path, "bias") is not None
                                 or layer.norm is not None)

  def shortcut_target(self, name: str) -> Layer | None:
    """A producer of `name` without ReLU whose BN shift (or bias) can take a constant."""
    for layer in self.producers[name]:
      if not layer.relu and (layer.norm is not None or
                             self.leaf(self.params, layer.path, "bias") is not None):
        return layer
    return None

  def blocker(self, name: str) -> tuple[np.ndarray, list[str]]:
    """Which channels of a space cannot be removed, and why (one reason per channel)."""
    live, const = self.values[name]
    space = self.graph.spaces[name]
    blocked = np.full(space.size, space.fixed)
    why = ["a model input or output" if space.fixed else ""] * space.size
    for layer, offset in self.readers[name]:
      if layer.depthwise:
        continue  # its output channel is tied to the input channel: removed with it
      used = self.reduced(layer)[1][offset:offset + space.size].any(1)
      ok = ~live & ((const == 0) | self.can_fold(layer))
      reader = "/".join(layer.path)
      cannot = ("a zero-padded convolution that cannot absorb it" if layer.padded else
                "which has neither bias nor BatchNorm to absorb it")
      for j in np.flatnonzero(used & ~ok & ~blocked):
        why[j] = (f"it is read by {reader}" if live[j] else
                  f"it carries the constant {const[j]:.4g} into {reader}, {cannot}")
      blocked |= used & ~ok
    for succ in self.successors[name]:
      if self.identity(succ):
        continue  # tied: removed together
      index = np.asarray(self.graph.spaces[succ].index)
      src = index[index >= 0]
      foldable = self.shortcut_target(succ) is not None
      bad = src[live[src] | ((const[src] != 0) & (not foldable))]
      for j in bad:
        if not blocked[j]:
          why[j] = f"its shortcut into {succ} is live or cannot absorb its constant"
      blocked[bad] = True
    return blocked, why

  def keep(self, strict: bool) -> dict[str, np.ndarray]:
    """Channels kept, per space (tied spaces share one array)."""
    by_family, dead, reasons = {}, {}, {}  # family -> kept, never live, why blocked
    for name in self.graph.spaces:
      f, (blocked, why), live = self.family[name], self.blocker(name), self.values[name][0]
      by_family[f] = by_family.get(f, np.zeros_like(blocked)) | blocked
      dead[f] = dead.get(f, np.ones_like(blocked)) & ~live
      for j in np.flatnonzero(blocked & ~live):
        reasons.setdefault((f, j), f"channel {j} of {name} is pruned but {why[j]}")
    fixed = {self.family[n] for n, s in self.graph.spaces.items() if s.fixed}
    for f, keep in by_family.items():
      stuck = np.flatnonzero(keep & dead[f])
      if strict and stuck.size and f not in fixed:
        raise ValueError(
            f"{reasons[(f, stuck[0])]} ({stuck.size} such channel(s) in its group). Prune "
            "with masks that cover the units' biases and BatchNorm leaves "
            "(ep.masks.cover_dependents; ep.Pruner(granularity='filter') does), or call "
            "evoprune.surgery.zero_pruned(model, variables, masks) first (it zeroes the "
            "biases and BatchNorm shifts of pruned channels; this changes the outputs, so "
            "re-evaluate or fine-tune), or pass strict=False to keep such channels.")
      if not keep.any():
        keep[0] = True  # a layer needs at least one channel; keeping is always exact
    return {name: by_family[self.family[name]] for name in self.graph.spaces}


def _channel_order(net: _Net, keep: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The kept channels of every space, in the order the smaller model stores them.

  Ascending, except in a family entered by a channel-changing shortcut (ResNet's stage
  transitions): there the channels the shortcut carries come as one block with the others
  split around it, so the smaller model's shortcut is again plain zero padding (option A)
  rather than a gather, which costs ~5% of ResNet-20's inference time on XLA:CPU.
  """
  family = net.family
  order = {f: np.flatnonzero(keep[f]) for f in set(family.values())}
  reordered = set()
  for name, space in net.graph.spaces.items():
    f = family[name]
    if space.shortcut is None or net.identity(name) or f in reordered:
      continue
    source = order[family[space.shortcut]]
    position = {int(j): i for i, j in enumerate(source)}
    index = np.asarray(space.index)
    carried = [t for t in order[f] if int(index[t]) in position]
    if len(carried) != len(source):
      continue  # a kept channel would be dropped by padding: keep the explicit map
    carried.sort(key=lambda t: position[int(index[t])])
    others = [t for t in order[f] if int(index[t]) not in position]
    left = (len(order[f]) - len(source)) // 2
    order[f] = np.asarray(others[:left] + carried + others[left:], int)
    reordered.add(f)
  return {name: order[family[name]] for name in net.graph.spaces}


# ---------------------------------------------------------------------------------------
# Public functions.


def _split(params: Any) -> tuple[dict[str, Any], bool]:
  """(variables, whether `params` was a whole variables dict)."""
  if isinstance(params, Mapping) and "params" in params:
    return dict(params), True
  return {"params": params}, False


def plan(model: nn.Module, params: Params, masks: Masks | None = None, *,
         strict: bool = True) -> dict[str, np.ndarray]:
  """The channels `shrink` keeps, per space of the model's channel graph.

  Args:
    model: a supported zoo model (see `GRAPHS`).
    params: `variables['params']`, or the whole `variables` (needed with BatchNorm).
    masks: like params, bool leaves or None; None uses params as they are.
    strict: raise when a pruned channel carries a constant that cannot be folded.

  Returns:
    {space name: bool [size]} (True = kept); tied spaces share values.
  """
  variables, _ = _split(params)
  return _Net(model, variables, masks).keep(strict)


def shrink(model: nn.Module, params: Params, masks: Masks | None = None, *,
           strict: bool = True) -> tuple[nn.Module, Params]:
  """Removes pruned neurons and filters and every parameter slice that depends on them.

  Args:
    model: a supported zoo model (MLP, LeNet5, ThesisCNN, CifarResNet, MobileNetV1,
      SqueezeNet).
    params: `variables['params']`, or the whole `variables` dict (BatchNorm models:
      `{'params': ..., 'batch_stats': ...}`); the result has the same form (other
      collections are dropped).
    masks: a tree like params with bool leaves (True = keep) or None; None shrinks
      whatever is already zero in params.
    strict: when a pruned channel carries a constant that no reader can absorb exactly,
      raise (True) or keep the channel (False). See the module docstring.

  Returns:
    (smaller model of the same class, its params or variables), equal in inference mode
    to `model` with `ep.masks.apply(params, masks)` up to float32 rounding.

  Raises:
    ValueError: unsupported model, masks that do not fit params, a BatchNorm model given
      params alone, or (strict) a pruned channel whose constant cannot be folded.
  """
  variables, whole = _split(params)
  net = _Net(model, variables, masks)
  keep = net.keep(strict)
  new_params, new_stats = _to_numpy(net.params), _to_numpy(net.stats)  # copies
  # Fold the constants of removed channels into their readers (before slicing).
  for layer in net.graph.layers:
    if layer.depthwise:
      continue
    gone = np.concatenate([~keep[s] for s in layer.src])
    const = np.concatenate([net.values[s][1] for s in layer.src])
    delta = np.where(gone, const, 0.0) @ net.reduced(layer)[0]
    if not np.any(delta != 0):
      continue
    bias = net.leaf(new_params, layer.path, "bias")
    if bias is not None:
      bias += delta
    else:  # BN(z + d) with running statistics equals BN(z) with mean - d
      net.leaf(new_stats, layer.norm, "mean")[...] -= delta
  for name, space in net.graph.spaces.items():
    if space.shortcut is None or net.identity(name):
      continue
    index = np.asarray(space.index)
    src_gone, src_const = ~keep[space.shortcut], net.values[space.shortcut][1]
    add = np.where(index >= 0, np.where(src_gone, src_const, 0.0)[np.maximum(index, 0)], 0.0)
    if np.any(add != 0):
      target = net.shortcut_target(name)
      leaf = net.leaf(new_params, target.norm or target.path, "bias")
      leaf += add
  order = _channel_order(net, keep)
  # Slice every kernel, bias and BatchNorm leaf.
  done = set()

  def take(tree, path, name, idx, axis):
    leaf = net.leaf(tree, path, name)
    if leaf is not None:
      node = tree
      for key in path:
        node = node[key]
      node[name] = np.take(leaf, idx, axis=axis)
      done.add((*path, name))

  for layer in net.graph.layers:
    out = order[layer.dst]
    take(new_params, layer.path, "kernel", out, -1)
    if not layer.depthwise:
      offsets = np.cumsum([0] + [net.graph.spaces[s].size for s in layer.src])
      inner = np.concatenate([o + order[s] for o, s in zip(offsets, layer.src)])
      rows = np.arange(layer.positions)[:, None] * offsets[-1] + inner[None, :]
      take(new_params, layer.path, "kernel", rows.reshape(-1), -2)
    take(new_params, layer.path, "bias", out, 0)
    if layer.norm is not None:
      for tree, names in ((new_params, ("scale", "bias")), (new_stats, ("mean", "var"))):
        for n in names:
          take(tree, layer.norm, n, out, 0)
  for tree in (new_params, new_stats):
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if masks_lib.path_keys(path) not in done:
        raise ValueError(
            f"leaf {masks_lib.path_str(path)!r} is not described by the channel graph of "
            f"{type(model).__name__}; surgery would leave it inconsistent. Update its graph "
            "in evoprune.surgery.GRAPHS.")
  sizes = {name: len(o) for name, o in order.items()}
  maps = {}
  for name, space in net.graph.spaces.items():
    if space.shortcut is not None:
      position = {int(j): i for i, j in enumerate(order[space.shortcut])}
      maps[name] = tuple(position.get(int(space.index[t]), -1) for t in order[name])
  new_model = net.graph.rebuild(sizes, maps)
  out = {"params": _like(new_params, variables["params"])}
  if "batch_stats" in variables:
    out["batch_stats"] = _like(new_stats, variables["batch_stats"])
  return new_model, (out if whole else out["params"])


def zero_pruned(model: nn.Module, params: Params, masks: Masks) -> Params:
  """Zeroes the bias and BatchNorm scale and shift of every pruned filter or neuron.

  A filter whose kernel column is fully masked then outputs exactly zero, so `shrink` can
  remove it wherever it sits. This changes the model's outputs (a pruned filter no longer
  emits its bias or BatchNorm shift): re-evaluate or fine-tune afterwards.

  Args:
    model: a supported zoo model.
    params: `variables['params']` or the whole `variables` dict.
    masks: like params, bool leaves or None.

  Returns:
    The same form as `params`, with those entries set to zero.
  """
  variables, whole = _split(params)
  masks_lib.check(variables["params"], masks)
  masked = masks_lib.apply(variables["params"], masks)
  new = _to_numpy(variables["params"])
  for layer in graphs.graph(model, new).layers:
    kernel = np.asarray(graphs.kernel(masked, layer.path))
    pruned = ~(kernel != 0).reshape(-1, kernel.shape[-1]).any(0)
    for path, name in ((layer.path, "bias"), (layer.norm, "scale"), (layer.norm, "bias")):
      node = new
      for key in path or ():
        node = node[key]
      if path is not None and name in node:
        node[name] = np.where(pruned, 0.0, node[name])
  new = _like(new, variables["params"])
  return {**variables, "params": new} if whole else new
