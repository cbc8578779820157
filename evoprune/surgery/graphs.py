"""Channel graphs: the description of a network that structured surgery works on.

A graph has *spaces* (sets of channels: a layer's output, a residual stream, the model's
input, the logits) and *layers* (a kernel that reads the concatenation of some spaces and
writes one, with its BatchNorm and ReLU, and whether zero padding reaches its window).
Layers writing the same space are summed; a space may add a shortcut from another space
through a channel map (ResNet option A: subsample, zero channels on both sides). A
depthwise layer's output and an identity shortcut's ends are *tied*: tied spaces form a
family that keeps or loses each channel together.

Each supported zoo class registers a builder in `GRAPHS` that reads the layer sizes from
params and returns the graph together with `rebuild(sizes, maps)`, which constructs the
same class with new widths (the zoo models' width fields) and shortcut channel maps.
`structured` builds filter/neuron masks over a graph's families (re-exported as
`evoprune.surgery.structured`).
"""

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from evoprune import masks as masks_lib
from evoprune import models
from evoprune.types import Masks, Params


@dataclasses.dataclass(frozen=True)
class Layer:
  """A kernel layer of a channel graph; its parameters live under `path` in params.

  Attributes:
    path: module path, e.g. ("block_01", "unit_0", "conv"): `kernel` and maybe `bias`.
    src: spaces read, concatenated along the channel axis in this order.
    dst: the space written (layers writing the same space are summed).
    norm: path of the BatchNorm applied to the output, if any.
    relu: ReLU after the (normalised) output, before any sum.
    padded: zero padding reaches the window (3x3 SAME): input constants cannot fold.
    positions: spatial positions per input channel (a dense layer after a flatten).
    depthwise: one filter per channel; the output space is tied to the input space.
  """
  path: tuple[str, ...]
  src: tuple[str, ...]
  dst: str
  norm: tuple[str, ...] | None = None
  relu: bool = True
  padded: bool = False
  positions: int = 1
  depthwise: bool = False


@dataclasses.dataclass(frozen=True)
class Space:
  """A set of channels.

  Attributes:
    size: number of channels.
    fixed: a model input or output; never shrunk.
    relu: ReLU after summing the producers and the shortcut.
    shortcut: a space added through `index` (a residual shortcut).
    index: for each channel, the shortcut channel added to it, or -1.
  """
  size: int
  fixed: bool = False
  relu: bool = False
  shortcut: str | None = None
  index: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Graph:
  """Spaces and layers in forward order, and how to build the model from new sizes.

  Attributes:
    spaces: name -> Space, in forward order.
    layers: in forward order.
    rebuild: `rebuild(sizes, maps)` -> the same model class with `sizes[space]` channels
      per space and `maps[space]` (new shortcut channel maps, -1 = zero) per shortcut.
  """
  spaces: dict[str, Space]
  layers: tuple[Layer, ...]
  rebuild: Callable[[dict[str, int], dict[str, tuple[int, ...]]], nn.Module]


def kernel(params: Params, path: tuple[str, ...]) -> Any:
  """The `kernel` leaf of the module at `path`."""
  node = params
  for name in (*path, "kernel"):
    node = node[name]
  return node


def _option_a(size: int, source: int) -> tuple[int, ...]:
  """The channel map of option A: `source` channels centred in `size`, zeros around."""
  extra = size - source
  return (-1,) * (extra // 2) + tuple(range(source)) + (-1,) * (extra - extra // 2)


def _chain(model: nn.Module, params: Params, field: str) -> Graph:
  """MLPs, LeNet-5 and the thesis CNN: VALID convs, pooling, a flatten, dense layers."""
  names = sorted(params)  # the zoo names layers so that this is forward order
  spaces = {"input": Space(kernel(params, (names[0],)).shape[-2], fixed=True)}
  layers, prev = [], "input"
  for i, name in enumerate(names):
    weights, last = kernel(params, (name,)), i == len(names) - 1
    positions = weights.shape[0] // spaces[prev].size if weights.ndim == 2 else 1
    spaces[name] = Space(weights.shape[-1], fixed=last)
    layers.append(Layer((name,), (prev,), name, relu=not last, positions=positions))
    prev = name
  return Graph(spaces, tuple(layers), lambda sizes, maps: model.clone(
      **{field: tuple(sizes[n] for n in names[:-1])}))


def _resnet(model: nn.Module, params: Params) -> Graph:
  """CIFAR ResNets: a stage's stem/block outputs are tied by identity shortcuts; the
  first block of stages 2 and 3 maps channels (option A or the model's `shortcuts`)."""
  blocks = sorted(k for k in params if k.startswith("block_"))
  stem, per_stage = blocks[0], (model.depth - 2) // 6
  spaces = {"input": Space(kernel(params, (stem, "conv")).shape[-2], fixed=True),
            stem: Space(kernel(params, (stem, "conv")).shape[-1])}
  layers = [Layer((stem, "conv"), ("input",), stem, (stem, "norm"), padded=True)]
  prev, transitions = stem, []
  for i, b in enumerate(blocks[1:]):
    inner, out = f"{b}/inner", kernel(params, (b, "unit_1", "conv")).shape[-1]
    spaces[inner] = Space(kernel(params, (b, "unit_0", "conv")).shape[-1])
    layers += [Layer((b, "unit_0", "conv"), (prev,), inner, (b, "unit_0", "norm"), padded=True),
               Layer((b, "unit_1", "conv"), (inner,), b, (b, "unit_1", "norm"), relu=False,
                     padded=True)]
    stage, block = divmod(i, per_stage)
    index = _option_a(out, spaces[prev].size)
    if stage and not block:
      transitions.append(b)
      if model.shortcuts is not None:
        index = tuple(int(j) for j in model.shortcuts[stage - 1])
    spaces[b] = Space(out, relu=True, shortcut=prev, index=index)
    prev = b
  spaces["head"] = Space(kernel(params, ("head",)).shape[-1], fixed=True)
  layers.append(Layer(("head",), (prev,), "head", relu=False))

  def rebuild(sizes, maps):
    firsts = [stem] + transitions
    shortcuts = tuple(maps[t] for t in transitions)
    if all(maps[t] == _option_a(sizes[t], sizes[f]) for f, t in zip(firsts, transitions)):
      shortcuts = None  # the model's own padding is cheaper than a gather
    return model.clone(stage_widths=tuple(sizes[b] for b in firsts),
                       inner_widths=tuple(sizes[f"{b}/inner"] for b in blocks[1:]),
                       shortcuts=shortcuts)

  return Graph(spaces, tuple(layers), rebuild)


def _mobilenet(model: nn.Module, params: Params) -> Graph:
  """MobileNet v1: each depthwise layer's output is tied to its input channels."""
  blocks = sorted(k for k in params if k.startswith("block_"))
  stem = blocks[0]
  spaces = {"input": Space(kernel(params, (stem, "conv")).shape[-2], fixed=True),
            stem: Space(kernel(params, (stem, "conv")).shape[-1])}
  layers, prev = [Layer((stem, "conv"), ("input",), stem, (stem, "norm"), padded=True)], stem
  for b in blocks[1:]:
    dw = f"{b}/dw"
    spaces[dw] = Space(spaces[prev].size)
    spaces[b] = Space(kernel(params, (b, "pw", "conv")).shape[-1])
    layers += [Layer((b, "dw", "conv"), (prev,), dw, (b, "dw", "norm"), padded=True,
                     depthwise=True),
               Layer((b, "pw", "conv"), (dw,), b, (b, "pw", "norm"))]
    prev = b
  spaces["head"] = Space(kernel(params, ("head",)).shape[-1], fixed=True)
  layers.append(Layer(("head",), (prev,), "head", relu=False))
  return Graph(spaces, tuple(layers), lambda sizes, maps: model.clone(
      channels=tuple(sizes[b] for b in blocks)))


def _squeezenet(model: nn.Module, params: Params) -> Graph:
  """SqueezeNet: a Fire's readers see its 1x1 and 3x3 expand branches concatenated."""
  blocks = sorted(k for k in params if k.startswith("block_"))
  stem = blocks[0]
  spaces = {"input": Space(kernel(params, (stem,)).shape[-2], fixed=True),
            stem: Space(kernel(params, (stem,)).shape[-1])}
  layers, prev = [Layer((stem,), ("input",), stem, padded=True)], (stem,)
  for b in blocks[1:]:
    sq, e1, e3 = f"{b}/squeeze", f"{b}/e1", f"{b}/e3"
    for space, name in ((sq, "conv_squeeze"), (e1, "expand_1x1"), (e3, "expand_3x3")):
      spaces[space] = Space(kernel(params, (b, name)).shape[-1])
    layers += [Layer((b, "conv_squeeze"), prev, sq), Layer((b, "expand_1x1"), (sq,), e1),
               Layer((b, "expand_3x3"), (sq,), e3, padded=True)]
    prev = (e1, e3)  # Fire concatenates its two expand branches
  spaces["head"] = Space(kernel(params, ("head",)).shape[-1], fixed=True)
  layers.append(Layer(("head",), prev, "head"))
  return Graph(spaces, tuple(layers), lambda sizes, maps: model.clone(
      stem=sizes[stem], fires=tuple(
          (sizes[f"{b}/squeeze"], sizes[f"{b}/e1"], sizes[f"{b}/e3"]) for b in blocks[1:])))


# Channel graphs of the zoo, by model class.
GRAPHS: dict[type, Callable[[nn.Module, Params], Graph]] = {
    models.MLP: lambda model, params: _chain(model, params, "widths"),
    models.LeNet5: lambda model, params: _chain(model, params, "features"),
    models.ThesisCNN: lambda model, params: _chain(model, params, "features"),
    models.CifarResNet: _resnet,
    models.MobileNetV1: _mobilenet,
    models.SqueezeNet: _squeezenet,
}


def graph(model: nn.Module, params: Params) -> Graph:
  """The channel graph of a zoo model.

  Raises:
    ValueError: a model class without a registered graph (e.g. ViT, GPT: attention heads
      need head-aware surgery, which is not implemented).
  """
  builder = GRAPHS.get(type(model))
  if builder is None:
    raise ValueError(
        f"surgery does not support {type(model).__name__}; supported classes: "
        f"{sorted(c.__name__ for c in GRAPHS)}. Register a channel graph in "
        "evoprune.surgery.GRAPHS to add one.")
  return builder(model, params)


def identity(g: Graph, name: str) -> bool:
  """Whether a space's shortcut is the identity (its ends are then tied)."""
  space = g.spaces[name]
  return (space.shortcut is not None and space.size == g.spaces[space.shortcut].size
          and tuple(space.index) == tuple(range(space.size)))


def families(g: Graph) -> dict[str, str]:
  """Maps every space to the first space of its family (spaces tied channel by channel)."""
  parent = {s: s for s in g.spaces}

  def find(s):
    while parent[s] != s:
      s = parent[s]
    return s

  for layer in g.layers:
    if layer.depthwise:
      parent[find(layer.dst)] = find(layer.src[0])
  for name, space in g.spaces.items():
    if identity(g, name):
      parent[find(name)] = find(space.shortcut)
  return {s: find(s) for s in g.spaces}


def structured(model: nn.Module, params: Params, sparsity: float, *,
               scores: Any = None, norm: str = "l2", multiple_of: int = 1) -> Masks:
  """Filter/neuron masks that prune tied channels together, per family of spaces.

  In every family (a layer's outputs, a residual stage with its stem or first convolution,
  a depthwise layer with its input) exactly `round(sparsity * channels)` channels are pruned
  (keeping at least one), ranked by the sum over the family's producing kernels of the
  norm of their output columns, lowest first, ties by lower index. A channel that a kept
  shortcut channel feeds (ResNet's channels entering the next stage) is never pruned, so
  `shrink` removes exactly the pruned channels. Outputs (logits) are never pruned.
  With `multiple_of` > 1 the number kept is rounded to the nearest multiple (at least one
  multiple, at most all): XLA:CPU convolutions run slower on odd widths (measured: 29->58
  channels slower than 32->64 on AVX-512), so aligned widths turn MACs into time.

  Args:
    model: a supported zoo model.
    params: its `variables['params']` (or the whole variables dict).
    sparsity: fraction of channels to prune in each family, in [0, 1).
    scores: a tree like params (higher = more important); default |params|.
    norm: 'l1', 'l2' or 'linf' over a column.
    multiple_of: keep a multiple of this many channels per family (e.g. 8 or 16).

  Returns:
    Masks like params: bool leaves for prunable leaves (`ep.models.prunable`), None
    elsewhere, constant along all axes but the last.
  """
  if not 0.0 <= float(sparsity) < 1.0:
    raise ValueError(f"sparsity={sparsity!r} is outside [0, 1); pass e.g. 0.5")
  if int(multiple_of) != multiple_of or multiple_of < 1:
    raise ValueError(f"multiple_of={multiple_of!r} must be a positive int, e.g. 1 or 8")
  if isinstance(params, Mapping) and "params" in params:
    params = params["params"]
  g = graph(model, params)
  scores = params if scores is None else scores
  prunable = models.prunable(params, model)
  family = families(g)
  if norm not in masks_lib.NORMS:
    raise ValueError(f"norm={norm!r} is not one of {list(masks_lib.NORMS)}; pick one of those")
  columns = {}
  for layer in g.layers:
    if kernel(prunable, layer.path) and kernel(scores, layer.path) is not None:
      w = np.abs(np.asarray(kernel(scores, layer.path), np.float64))
      w = w.reshape(-1, w.shape[-1])
      columns[layer.path] = {"l1": lambda: w.sum(0), "l2": lambda: np.sqrt((w * w).sum(0)),
                             "linf": lambda: w.max(0)}[norm]()
  forced = {f: np.zeros(g.spaces[f].size, bool) for f in set(family.values())}
  keep = {}
  for name in g.spaces:  # forward order: a stage is decided before the next one
    f = family[name]
    if f in keep:
      continue
    members = [s for s in g.spaces if family[s] == f]
    producers = [l for l in g.layers if l.dst in members and l.path in columns]
    keep[f] = np.ones(g.spaces[f].size, bool)
    if g.spaces[f].fixed or any(g.spaces[s].fixed for s in members) or not producers:
      continue
    score = sum(columns[l.path] for l in producers)
    n = g.spaces[f].size
    kept = n - masks_lib.num_pruned(sparsity, n)
    kept = min(n, max(multiple_of, multiple_of * round(kept / multiple_of)))
    k = min(n - kept, n - max(1, int(forced[f].sum())))
    order = sorted((j for j in range(n) if not forced[f][j]), key=lambda j: (score[j], j))
    keep[f][order[:max(k, 0)]] = False
    for s in g.spaces:
      space = g.spaces[s]
      if space.shortcut in members and family[s] != f:
        index = np.asarray(space.index)
        forced[family[s]] |= (index >= 0) & keep[f][np.maximum(index, 0)]

  def mask(path, leaf, flag):
    if flag is None:
      return None
    layer = next((l for l in g.layers if (*l.path, "kernel") == path), None)
    column = keep[family[layer.dst]] if layer is not None else np.ones(leaf.shape[-1], bool)
    return jax.numpy.asarray(np.broadcast_to(column, leaf.shape))

  return jax.tree_util.tree_map_with_path(
      lambda p, leaf, flag: mask(masks_lib.path_keys(p), leaf, flag), params, prunable,
      is_leaf=lambda x: x is None)
