r"""The seed poster's Table 1 (MACs by sparsity ratio), unstructured and structured, timed.

The poster reports MACs falling linearly with the sparsity ratio (72.3M dense -> 7.24M at
0.9): unstructured pruning's *effective* MACs, which dense hardware does not skip. This
table puts beside them what structured pruning buys for real: the *physical* MACs of the
network after `evoprune.surgery.shrink` (filters removed with their next layer's input
channels, so MACs fall roughly with the square of the kept fraction), and the measured
latency of each at batch 256 (median of interleaved runs after warm-up).

  unstructured  per-layer magnitude masks at the ratio; MACs = `cost.report` effective;
                latency of the masked model as XLA runs it (dense).
  structured    `surgery.structured` at the ratio (filters/neurons per layer, residual
                groups tied, logits kept); MACs = `cost.report(physical=True)`; latency
                of the shrunk model.

  python -m benchmarks.macs_table [--out=macs_table.json] [--models=...] [--multiple_of=1]
      [--smoke]

JSON: {"<model>": {"dense_macs", "dense_ms", "batch",
                   "unstructured" | "structured": {"<ratio>": {"macs", "macs_ratio",
                                                   "latency_ms", "speedup"}}}}
(`macs_ratio` = macs / dense_macs; `speedup` = dense_ms / latency_ms). MACs are per example.

Measured (2-core AMD EPYC, AVX2, load 1-2; every model compiled with
`ep.ops.compiler_options()`, as evoprune's training programs are): unstructured latency stays at
1.0x at every ratio; the shrunk thesis CNN runs 3.1x / 3.6x / 8.4x faster at 0.5 / 0.7 / 0.9,
ResNet-20 2.5x / 2.6x / 10.8x. At 0.1-0.3 exact ratios leave odd widths (29, 58, ...) that
XLA:CPU runs slower than the dense widths (down to 0.67x); `--multiple_of=16` gave the thesis
CNN 2.8x at 0.3 (earlier run, XLA's default options).
"""

import functools
import json
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import evoprune as ep

INPUT_SHAPES = {"thesis_cnn": (32, 32, 3), "resnet20": (32, 32, 3), "lenet5": (32, 32, 3),
                "mobilenet": (32, 32, 3), "squeezenet": (32, 32, 3),
                "lenet300_100": (28, 28, 1), "mlp_paper": (28, 28, 1)}

_OUT = flags.DEFINE_string("out", "", "Write the results as JSON to this file.")
_MODELS = flags.DEFINE_list("models", ["thesis_cnn", "resnet20"], "Models to measure.")
_RATIOS = flags.DEFINE_list("ratios", ["0.0", "0.1", "0.3", "0.5", "0.7", "0.9"],
                            "Sparsity ratios (the poster's Table 1 rows).")
_BATCH = flags.DEFINE_integer("batch", 256, "Batch size of the latency measurement.")
_ROUNDS = flags.DEFINE_integer("rounds", 9, "Timed rounds (each runs every variant once).")
_MULTIPLE_OF = flags.DEFINE_integer(
    "multiple_of", 1, "structured: keep a multiple of this many channels per layer (1: the "
    "exact ratio; 8 or 16 align widths with the CPU's vectors).")
_SMOKE = flags.DEFINE_bool("smoke", False, "thesis_cnn at ratios 0.0 and 0.5, batch 32, "
                           "2 rounds: a quick check that the benchmark runs.")


def magnitude_masks(model: Any, params: Any, ratio: float) -> Any:
  """Per-layer unstructured masks: the `ratio` fraction of smallest |w| of every layer."""
  scores = jax.tree.map(lambda f, p: None if f is None else jnp.abs(p),
                        ep.models.prunable(params, model), params, is_leaf=lambda x: x is None)
  return ep.masks.topk(scores, ratio)


def measure(name: str, ratios: list[float], batch: int, rounds: int,
            multiple_of: int = 1) -> dict[str, Any]:
  """MACs and latency of one model at every ratio, unstructured and structured."""
  model = ep.models.create(name, num_classes=10)
  shape = INPUT_SHAPES[name]
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, *shape)), jnp.float32)
  variables = dict(jax.jit(model.init)(jax.random.key(0), x[:1]))
  params, stats = variables["params"], variables.get("batch_stats")
  dense_macs = ep.cost.report(model, params, None, shape, batch_stats=stats)["macs"]["dense"]
  # Compiled as evoprune compiles its training programs (on CPU: Eigen convolutions).
  compile_ = functools.partial(jax.jit, compiler_options=ep.ops.compiler_options())
  calls = {("dense", None): (compile_(model.apply), variables)}
  macs = {}
  for r in ratios:
    masks = magnitude_masks(model, params, r)
    macs[("unstructured", r)] = ep.cost.report(
        model, params, masks, shape, batch_stats=stats)["macs"]["effective"]
    calls[("unstructured", r)] = (compile_(model.apply),
                                  {**variables, "params": ep.masks.apply(params, masks)})
    masks = ep.surgery.structured(model, params, r, multiple_of=multiple_of)
    macs[("structured", r)] = ep.cost.report(
        model, params, masks, shape, batch_stats=stats, physical=True)["macs"]["physical"]
    small_model, small = ep.surgery.shrink(model, variables, masks, strict=False)
    calls[("structured", r)] = (compile_(small_model.apply), small)
  times = ep.cost.latency(
      {key: (lambda f=f, v=v: f(v, x)) for key, (f, v) in calls.items()}, rounds=rounds)
  dense_ms = times[("dense", None)]
  out = {"dense_macs": dense_macs, "dense_ms": dense_ms, "batch": batch}
  for (kind, r), m in macs.items():
    out.setdefault(kind, {})[str(r)] = {
        "macs": m, "macs_ratio": m / dense_macs, "latency_ms": times[(kind, r)],
        "speedup": dense_ms / times[(kind, r)]}
  return out


def format_table(name: str, result: dict[str, Any]) -> str:
  """Table 1 form: one row per sparsity ratio, MACs and latency for both kinds."""
  lines = [f"{name}: dense {result['dense_macs'] / 1e6:.2f}M MACs per example, "
           f"{result['dense_ms']:.1f} ms per batch of {result['batch']}",
           f"{'ratio':>5}  {'unstructured MACs (eff.)':>24}  {'ms (speedup)':>15}  "
           f"{'structured MACs (phys.)':>23}  {'ms (speedup)':>15}"]
  for r in result["unstructured"]:
    u, s = result["unstructured"][r], result["structured"][r]
    lines.append(
        f"{r:>5}  {u['macs'] / 1e6:>15.2f}M ({u['macs_ratio']:.2f})  "
        f"{u['latency_ms']:>7.1f} ({u['speedup']:.2f}x)  "
        f"{s['macs'] / 1e6:>14.2f}M ({s['macs_ratio']:.2f})  "
        f"{s['latency_ms']:>7.1f} ({s['speedup']:.2f}x)")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  models, batch, rounds = _MODELS.value, _BATCH.value, _ROUNDS.value
  ratios = [float(r) for r in _RATIOS.value]
  if _SMOKE.value:
    models, ratios, batch, rounds = ["thesis_cnn"], [0.0, 0.5], 32, 2
  unknown = sorted(set(models) - set(INPUT_SHAPES))
  if unknown:
    raise ValueError(f"--models has unknown {unknown}; valid: "
                     f"{sorted(INPUT_SHAPES)}")
  if any(not 0.0 <= r < 1.0 for r in ratios):
    raise ValueError(f"--ratios={ratios} must lie in [0, 1); pass e.g. 0.0,0.5,0.9")
  out = {}
  for name in models:
    out[name] = measure(name, ratios, batch, rounds, _MULTIPLE_OF.value)
    print(format_table(name, out[name]) + "\n", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
