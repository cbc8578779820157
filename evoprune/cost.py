"""Cost accounting: parameters, nonzeros, MACs (dense and effective) and bytes on disk.

`report(model, params, masks, input_shape)` traces one forward pass of a flax.linen model
on a single example and counts the multiply-accumulates of every matrix product and
convolution in the traced program (`dot_general` and `conv_general_dilated`, at any
depth: inside jit, custom_jvp, scan bodies, ...). Nothing is hard-coded per model:
strides, padding, dilation and depthwise/grouped convolutions all show up in the traced
shapes, and attention's `q @ k^T` and `att @ v` are counted like any other matmul.

Attribution: while tracing, every module call is wrapped in a `jax.named_scope` that
records the module's path, so each primitive knows the innermost module that ran it. A
product is charged to that module's weight leaf (its `kernel`, or else its only leaf with
ndim >= 2, e.g. an embedding used as a tied output head) when one operand has that leaf's
size; otherwise to the module itself as a parameter-free layer (e.g. "h_00/attn" for
the attention matmuls).

MAC conventions: one multiply-add = 1 MAC (XLA reports 2 flops); elementwise work
(bias, activations, normalisation, pooling, softmax) is not counted, so XLA's
`cost_analysis()` flops / 2 are slightly higher for plain networks (+0.2% for the MLP,
+1.4% for LeNet-5). A convolution is charged its full kernel at every output position,
padded taps included (the usual convention of MAC counters); XLA skips padded taps,
so it reports ~7% fewer for ResNet-20 on 32x32 inputs. Effective MACs
assume unstructured sparsity skips the products of zero weights: a layer's dense MACs
times the fraction of nonzero entries of `params * mask` in its weight (this equals the
mask's density unless kept weights are themselves zero). Physical MACs (`physical=True`)
are those of the model that `evoprune.surgery.shrink` builds (non-strict: pruned channels
whose constants cannot be folded exactly stay), i.e. what structured pruning really buys;
unstructured zeros inside the remaining layers are not subtracted from them.

Latency: `latency(calls)` times several compiled calls side by side (interleaved rounds,
median after warm-up, `block_until_ready`); on a shared CPU only their ratios mean much.

Bytes: `fp32_dense` = 4 bytes per parameter; `sparse` = for each prunable leaf (mask not
None; with `masks=None`, `evoprune.models.prunable`) 4 bytes per nonzero value plus a
1-bit-per-entry bitmask rounded up to whole bytes, and 4 bytes per entry for every other
leaf. Non-parameter collections (BatchNorm statistics) are not counted.
"""

import math
from collections.abc import Callable, Mapping, Sequence
import time
from typing import Any

import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

from evoprune import models
from evoprune import ops
from evoprune.types import Masks, Params

_SCOPE_PREFIX = "evoprune_cost_module_"
_BYTES_PER_VALUE = 4  # fp32


def report(
    model: nn.Module,
    params: Params,
    masks: Masks | None,
    input_shape: Sequence[int],
    *,
    batch_stats: Any = None,
    input_dtype: Any = None,
    physical: bool = False,
) -> dict[str, Any]:
  """Counts parameters, nonzeros, per-example MACs and storage of a (masked) model.

  Args:
    model: a flax.linen Module whose `__call__(x, train=False)` runs the forward pass.
    params: its `variables['params']` (concrete arrays: nonzeros are counted).
    masks: a tree like `params` with bool leaves or None for unpruned leaves, or None for
      a dense model (nonzeros are then those of `params` itself).
    input_shape: shape of ONE example, without the batch axis, e.g. (32, 32, 3) or, for a
      language model, (T,).
    batch_stats: the model's `variables['batch_stats']` if it has any; shapes are
      derived from `model.init` otherwise (only shapes matter for the counts).
    input_dtype: dtype of the dummy input; defaults to the model's `input_dtype`
      attribute (GPT: int32) or float32.
    physical: also count the model after structured surgery (`evoprune.surgery.shrink`):
      adds `params["physical"]`, `macs["physical"]` and per layer `params_physical` and
      `macs_physical`. Needs a model that surgery supports, and `batch_stats` for
      BatchNorm models.

  Returns:
    A dict of plain Python ints and lists (JSON-serialisable):
      {"params": {"total", "nonzero"}, "macs": {"dense", "effective"},
       "bytes": {"fp32_dense", "sparse"},
       "layers": {path: {"params", "nonzero", "macs_dense", "macs_effective", "shape",
                         "prunable"}}}
    `layers` has one entry per parameter leaf (path like "Dense_0/kernel") plus one per
    parameter-free module that performs matmuls (e.g. "h_00/attn"), in `jax.tree`
    flatten order.

  Raises:
    ValueError: a bad `input_shape`, `masks` that do not match `params`, or with
      `physical=True` a model surgery does not support or missing `batch_stats`.
  """
  input_shape = _check_input_shape(input_shape)
  leaves = _leaves_with_mask(params, masks)
  prunable_rule = None if masks is not None else _prunable_paths(params, model)

  layers: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, leaf, mask in leaves:
    value = np.asarray(leaf)
    nonzero = int(np.count_nonzero(value if mask is None else value * np.asarray(mask)))
    is_prunable = mask is not None if masks is not None else path in prunable_rule
    layers[path] = dict(params=int(value.size), nonzero=nonzero, macs_dense=0,
                        macs_effective=0, shape=list(value.shape), prunable=is_prunable)

  dtype = input_dtype or getattr(model, "input_dtype", jnp.float32)
  for module_path, macs, operand_sizes in _matmuls(
      model, params, batch_stats, (1, *input_shape), dtype):
    key = _charge_to(params, module_path, operand_sizes)
    entry = layers.setdefault(key, dict(params=0, nonzero=0, macs_dense=0, macs_effective=0,
                                        shape=[], prunable=False))
    entry["macs_dense"] += macs

  for entry in layers.values():
    if entry["params"]:
      entry["macs_effective"] = entry["macs_dense"] * entry["nonzero"] // entry["params"]
    else:
      entry["macs_effective"] = entry["macs_dense"]

  ordered = {_path_string(path): layers[path] for path in sorted(layers)}
  param_entries = [e for e in ordered.values() if e["params"]]
  sparse_bytes = sum(
      _BYTES_PER_VALUE * e["nonzero"] + math.ceil(e["params"] / 8) if e["prunable"]
      else _BYTES_PER_VALUE * e["params"] for e in param_entries)
  total = sum(e["params"] for e in param_entries)
  result = {
      "params": {"total": total, "nonzero": sum(e["nonzero"] for e in param_entries)},
      "macs": {"dense": sum(e["macs_dense"] for e in ordered.values()),
               "effective": sum(e["macs_effective"] for e in ordered.values())},
      "bytes": {"fp32_dense": _BYTES_PER_VALUE * total, "sparse": sparse_bytes},
      "layers": ordered,
  }
  if physical:
    _add_physical(result, model, params, masks, input_shape, batch_stats, input_dtype)
  return result


def _add_physical(result: dict[str, Any], model: nn.Module, params: Params,
                  masks: Masks | None, input_shape: tuple[int, ...], batch_stats: Any,
                  input_dtype: Any) -> None:
  """Adds the counts of the shrunk model to a `report` result, layer by layer."""
  from evoprune import surgery  # pylint: disable=g-import-not-at-top  (surgery imports models)
  variables = {"params": params}
  if batch_stats is not None:
    variables["batch_stats"] = batch_stats
  elif "batch_stats" in jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                         jnp.zeros((1, *input_shape), input_dtype or jnp.float32),
                         train=False)):
    raise ValueError(f"physical=True needs the batch_stats of {type(model).__name__} (its "
                     "BatchNorm statistics decide which channels fold); pass batch_stats=")
  small_model, small = surgery.shrink(model, variables, masks, strict=False)
  small_cost = report(small_model, small["params"], None, input_shape,
                      batch_stats=small.get("batch_stats"), input_dtype=input_dtype)
  for path, entry in result["layers"].items():
    other = small_cost["layers"].get(path, {})
    entry["params_physical"] = other.get("params", 0)
    entry["macs_physical"] = other.get("macs_dense", 0)
  result["params"]["physical"] = small_cost["params"]["total"]
  result["macs"]["physical"] = small_cost["macs"]["dense"]


def latency(calls: Mapping[Any, Callable[[], Any]], *, rounds: int = 9,
            warmup: int = 2) -> dict[Any, float]:
  """Median wall time of each call in milliseconds, measured side by side.

  Every round runs every call once, in order, so a change in machine load hits all of
  them alike; compare them as ratios.

  Args:
    calls: name -> zero-argument callable returning arrays (e.g. a jitted forward pass
      with its arguments bound); each call ends with `jax.block_until_ready`.
    rounds: timed rounds, >= 1.
    warmup: untimed calls of each before timing (compilation, caches), >= 0.

  Returns:
    name -> median milliseconds.

  Raises:
    ValueError: rounds < 1 or warmup < 0.
  """
  if rounds < 1 or warmup < 0:
    raise ValueError(f"rounds={rounds}, warmup={warmup}: need rounds >= 1 and warmup >= 0, "
                     "e.g. rounds=9, warmup=2")
  for call in calls.values():
    for _ in range(warmup):
      jax.block_until_ready(call())
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def format_table(cost: Mapping[str, Any]) -> str:
  """Renders a `report` as a fixed-width text table (one row per layer, then totals).

  Args:
    cost: the dict returned by `report`.

  Returns:
    A multi-line string.
  """
  physical = "physical" in cost["macs"]
  header = ("layer", "shape", "params", "nonzero", "density", "MACs dense", "MACs eff.",
            *(("MACs phys.",) if physical else ()))
  rows = []
  for path, e in cost["layers"].items():
    density = f"{e['nonzero'] / e['params']:.3f}" if e["params"] else "-"
    shape = "x".join(map(str, e["shape"])) or "-"
    rows.append((path + (" *" if e["prunable"] else ""), shape, f"{e['params']:,}",
                 f"{e['nonzero']:,}", density, f"{e['macs_dense']:,}",
                 f"{e['macs_effective']:,}",
                 *((f"{e['macs_physical']:,}",) if physical else ())))
  p, m, b = cost["params"], cost["macs"], cost["bytes"]
  density = f"{p['nonzero'] / p['total']:.3f}" if p["total"] else "-"
  rows.append(("total", "", f"{p['total']:,}", f"{p['nonzero']:,}", density,
               f"{m['dense']:,}", f"{m['effective']:,}",
               *((f"{m['physical']:,}",) if physical else ())))
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

  def line(row: tuple[str, ...]) -> str:
    cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
    cells += [cell.rjust(w) for cell, w in zip(row[2:], widths[2:])]
    return "  ".join(cells).rstrip()

  rule = "-" * len(line(header))
  body = [line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])]
  body.append(f"bytes: fp32 dense {b['fp32_dense']:,}, sparse (values + bitmask) "
              f"{b['sparse']:,} ({b['sparse'] / max(b['fp32_dense'], 1):.3f}x); "
              "* = prunable; MACs per example")
  return "\n".join(body)


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
  try:
    shape = None if isinstance(input_shape, str) else tuple(int(d) for d in input_shape)
  except (TypeError, ValueError):
    shape = None
  if not shape or any(d < 1 for d in shape):
    raise ValueError(
        f"input_shape={input_shape!r} must be the shape of one example without the batch "
        "axis, e.g. (28, 28, 1) or (32, 32, 3)")
  return shape


def _path_string(path: tuple[str, ...]) -> str:
  return "/".join(path) or "(root)"


def _leaves_with_mask(
    params: Params, masks: Masks | None) -> list[tuple[tuple[str, ...], Any, Any]]:
  """[(path names, param leaf, mask leaf or None)] in flatten order; checks `masks`."""
  flat, treedef = jax.tree.flatten_with_path(params)
  if masks is None:
    return [(models.path_names(path), leaf, None) for path, leaf in flat]
  mask_leaves, mask_treedef = jax.tree.flatten(masks, is_leaf=lambda x: x is None)
  if mask_treedef != treedef:
    raise ValueError(
        "masks do not have the structure of params; build them from params (e.g. with "
        f"ep.masks.topk), with None for unpruned leaves. params: {treedef}, masks: "
        f"{mask_treedef}")
  out = []
  for (path, leaf), mask in zip(flat, mask_leaves):
    names = models.path_names(path)
    if mask is not None and np.shape(mask) != np.shape(leaf):
      raise ValueError(
          f"mask of {_path_string(names)} has shape {np.shape(mask)} but the parameter "
          f"has shape {np.shape(leaf)}; pass a mask of the parameter's shape")
    out.append((names, leaf, mask))
  return out


def _prunable_paths(params: Params, model: nn.Module) -> set[tuple[str, ...]]:
  flags = models.prunable(params, model)
  flat = jax.tree.flatten_with_path(flags, is_leaf=lambda x: x is None)[0]
  return {models.path_names(path) for path, flag in flat if flag}


def _matmuls(model: nn.Module, params: Params, batch_stats: Any, shape: tuple[int, ...],
             dtype: Any) -> list[tuple[tuple[str, ...], int, tuple[int, ...]]]:
  """Traces `model` on a dummy input; returns [(module path, MACs, operand sizes)]."""
  x = jax.ShapeDtypeStruct(shape, dtype)
  key = jax.random.key(0)
  variables = dict(jax.eval_shape(
      lambda: model.init({"params": key, "dropout": key}, jnp.zeros(shape, dtype),
                         train=False)))
  variables["params"] = params
  if batch_stats is not None:
    variables["batch_stats"] = batch_stats
  variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), variables)

  module_paths: list[tuple[str, ...]] = []

  def interceptor(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
    module_paths.append(tuple(context.module.path))
    with jax.named_scope(f"{_SCOPE_PREFIX}{len(module_paths) - 1}"):
      return next_fun(*args, **kwargs)

  # The network's own products, not those of a CPU formulation (`ops.use`).
  with nn.intercept_methods(interceptor), ops.use("xla"):
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  events: list[tuple[int | None, int, tuple[int, ...]]] = []
  _walk(closed.jaxpr, None, 1, events)
  return [(module_paths[i] if i is not None else (), macs, sizes)
          for i, macs, sizes in events]


def _scope_index(eqn: jax_core.JaxprEqn) -> int | None:
  """Index of the innermost recorded module in the equation's name stack, if any."""
  for part in reversed(str(eqn.source_info.name_stack).split("/")):
    if part.startswith(_SCOPE_PREFIX):
      return int(part[len(_SCOPE_PREFIX):])
  return None


def _eqn_macs(eqn: jax_core.JaxprEqn) -> int:
  out = math.prod(eqn.outvars[0].aval.shape)
  if eqn.primitive.name == "dot_general":
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return out * math.prod(lhs[d] for d in contract)
  if eqn.primitive.name == "conv_general_dilated":
    # Each output element reads one kernel slice: all of the kernel but its
    # output-feature axis (whose in-feature axis is already C_in / groups).
    rhs = eqn.invars[1].aval.shape
    out_axis = eqn.params["dimension_numbers"].rhs_spec[0]
    return out * math.prod(rhs) // rhs[out_axis]
  return 0


def _sub_jaxprs(value: Any) -> list[jax_core.Jaxpr]:
  if isinstance(value, jax_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jax_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _walk(jaxpr: jax_core.Jaxpr, scope: int | None, factor: int, events: list) -> None:
  """Appends (module index, MACs, operand sizes) for every matmul/conv in `jaxpr`."""
  for eqn in jaxpr.eqns:
    # Name stacks inside a sub-jaxpr are relative to the equation that calls it.
    own = _scope_index(eqn)
    own = scope if own is None else own
    macs = _eqn_macs(eqn)
    if macs:
      sizes = tuple(math.prod(v.aval.shape) for v in eqn.invars)
      events.append((own, macs * factor, sizes))
    if eqn.primitive.name == "cond":
      # Only one branch runs: charge the most expensive.
      branches = []
      for branch in _sub_jaxprs(eqn.params["branches"]):
        branch_events: list = []
        _walk(branch, own, factor, branch_events)
        branches.append(branch_events)
      events.extend(max(branches, key=lambda b: sum(e[1] for e in b), default=[]))
      continue
    inner = factor * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        _walk(sub, own, inner, events)


def _charge_to(params: Params, module_path: tuple[str, ...],
               operand_sizes: tuple[int, ...]) -> tuple[str, ...]:
  """The layer a product belongs to: the module's weight leaf if it is an operand."""
  node = params
  for name in module_path:
    if not isinstance(node, Mapping) or name not in node:
      return module_path
    node = node[name]
  if not isinstance(node, Mapping):
    return module_path
  weights = [k for k, v in node.items() if not isinstance(v, Mapping) and np.ndim(v) >= 2]
  if "kernel" in weights:
    weights = ["kernel"]
  if len(weights) == 1 and np.size(node[weights[0]]) in operand_sizes:
    return (*module_path, weights[0])
  return module_path
