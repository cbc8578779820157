r"""Inference latency of sparse formats against the dense model, measured honestly.

For each model and sparsity, every format in `FORMATS` is built, compiled with XLA, and
timed side by side, interleaved, in one process (median after warm-up, with
`block_until_ready`), at batch 1 and batch 256:

  dense   the unpruned model: the reference (listed under sparsity "0.0").
  masked  unstructured magnitude masks (per layer) applied to the dense weights: the
          "mock sparsity" that most pruning libraries ship; zeros are still multiplied.
  bcoo    the same masks with every Dense layer as a BCOO matrix (jax.experimental.sparse,
          `evoprune.sparse`); convolutions stay masked dense (jax has no sparse conv).
  shrunk  structured masks (`evoprune.surgery.structured`: that fraction of filters and
          neurons in every layer, residual groups tied) and `evoprune.surgery.shrink`.

  python -m benchmarks.sparse_eval [--out=sparse_eval.json] [--models=...] [--multiple_of=1]
      [--breakdown] [--smoke]

JSON: {"<model>": {"<format>": {"<sparsity>": {"batch1_ms", "batch256_ms", "speedup"}}}},
speedup = dense / format at batch 256; with --breakdown also "resnet20_convs" (see
`conv_breakdown`). Target: `shrunk` at 0.5 runs >= 2x faster than dense
at batch 256 for thesis_cnn and resnet20 (their MACs fall ~3.4x and ~4x). On XLA:CPU
sparse formats lose to dense unless the layer is extremely sparse; the table says so.

Every format is compiled as evoprune compiles its training programs (`ep.ops.compiler_options()`:
on CPU, dense convolutions on Eigen instead of YNNPACK, which ran them single-threaded).
Measured (`--models=thesis_cnn,resnet20 --sparsities=0.5`, shrunk, dense = 1, batch 256):

  machine                                   thesis_cnn   resnet20     dense ms (thesis, resnet20)
  2-core AMD EPYC, AVX2, load 1-2, 2 runs   3.25-3.29x   2.35-2.40x   61-70, 429-490
  same, XLA's default options               3.22x        3.06x        146, 625
  2-core AVX-512 CPU, default options,      3.60-3.86x   2.03-2.21x   (earlier runs)
  idle

With XLA's default options the ResNet-20 ratio looks better only because dense is slower
(YNNPACK's convolution); with Eigen both get faster and shrunk ResNet-20 still runs 2.4x
faster. masked and bcoo stay at ~1.0x on the CNNs; on LeNet-300-100 bcoo is 50-100x slower
than dense at 0.5-0.8 and only catches up at 0.99.

Why ResNet-20 gains less than its MACs (`--breakdown` times each 3x3 conv size at dense and half
widths side by side; batch 256, ms per convolution, idle machine):

  conv (count in the network)        dense   shrunk  ratio   GMAC/s dense / shrunk
  16->16 / 8->8 at 32x32 (6)         14.3     9.1    1.56    42 / 17
  32->32 / 16->16 at 16x16 (5)       15.7     3.7    4.22    38 / 41
  64->64 / 32->32 at 8x8 (5)         13.3     4.1    3.21    45 / 36

XLA:CPU's 3x3 convolution throughput collapses at 8 channels (on the loaded machine 7
GMAC/s against 30-65 at 32-64 channels: stage-1 ratio 1.37x, whole network 1.80x), so the
shrunk stage 1 gains ~1.5x instead of 4x, and normalisation and ReLU only scale with
channels (2x). The shrunk widths are already aligned (8/16/32) and its shortcuts are plain
zero padding (no gather). Evaluating in batch chunks helps dense more (the ratio falls to
1.7x). Packing 2-8 images into channels with a block-diagonal kernel, channel-major im2col
matmuls, NCHW, padding 8 channels to 16, per-tap matmuls, a fused broadcast multiply-add,
Winograd F(2x2, 3x3) and space-to-depth (8->8 3x3 as a 2x2 32->32 convolution or matmul)
written in jax.numpy all ran 8->8 at 0.1-1.1x of XLA's convolution; the XLA flags
xla_cpu_use_xnnpack, xla_cpu_use_onednn (+ xla_cpu_experimental_onednn_custom_call: the
oneDNN rewriter does not take convolutions in this jaxlib) and
xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION left the
8->8 / 16->16 ratio at 1.5-1.7x.
"""

from collections.abc import Callable
import json
from typing import Any

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import evoprune as ep
from evoprune import sparse

_OUT = flags.DEFINE_string("out", "", "Write the results as JSON to this file.")
_MODELS = flags.DEFINE_list("models", ["lenet300_100", "thesis_cnn", "resnet20"],
                            "Models to measure.")
_SPARSITIES = flags.DEFINE_list("sparsities", ["0.5", "0.8", "0.9", "0.95", "0.99"],
                                "Sparsities to measure.")
_ROUNDS = flags.DEFINE_integer("rounds", 9, "Timed rounds (each runs every variant once).")
_MULTIPLE_OF = flags.DEFINE_integer(
    "multiple_of", 1, "shrunk: keep a multiple of this many channels per layer (1: exact).")
_BREAKDOWN = flags.DEFINE_bool(
    "breakdown", False, "Also time ResNet-20's 3x3 convolutions at dense and half widths "
    "side by side (why the shrunk ResNet-20 gains less than its MACs).")
_SMOKE = flags.DEFINE_bool("smoke", False, "thesis_cnn at 0.5, 2 rounds: a quick check "
                           "that the benchmark runs, not a measurement.")

INPUT_SHAPES = {"lenet300_100": (28, 28, 1), "mlp_paper": (28, 28, 1),
                "lenet5": (32, 32, 3), "thesis_cnn": (32, 32, 3), "resnet20": (32, 32, 3),
                "mobilenet": (32, 32, 3), "squeezenet": (32, 32, 3)}
BATCHES = (1, 256)
TARGETS = {"thesis_cnn": 2.0, "resnet20": 2.0}  # shrunk at 0.5, batch 256
Forward = tuple[Callable[..., Any], tuple[Any, ...]]  # (compiled fn, args before x)


def magnitude_masks(model: nn.Module, params: Any, sparsity: float) -> Any:
  """Unstructured per-layer masks: the `sparsity` fraction of smallest |w| of every layer."""
  flags_tree = ep.models.prunable(params, model)
  scores = jax.tree.map(lambda f, p: None if f is None else jnp.abs(p), flags_tree, params,
                        is_leaf=lambda x: x is None)
  return ep.masks.topk(scores, sparsity)


def _compile(fn: Callable) -> Callable:
  """fn compiled as evoprune compiles its training programs (`ep.ops.compiler_options()`)."""
  return jax.jit(fn, compiler_options=ep.ops.compiler_options())


def _dense(model, variables, sparsity, multiple_of=1):
  del sparsity, multiple_of
  return _compile(model.apply), (variables,)


def _masked(model, variables, sparsity, multiple_of=1):
  del multiple_of
  masks = magnitude_masks(model, variables["params"], sparsity)
  masked = {**variables, "params": ep.masks.apply(variables["params"], masks)}
  return _compile(model.apply), (masked,)


def _bcoo(model, variables, sparsity, multiple_of=1):
  del multiple_of
  masks = magnitude_masks(model, variables["params"], sparsity)
  kernels = sparse.bcoo_kernels(variables["params"], masks)
  masked = {**variables, "params": ep.masks.apply(variables["params"], masks)}
  fn = _compile(lambda v, k, x: sparse.apply(model, v, k, x))
  return fn, (masked, kernels)


def _shrunk(model, variables, sparsity, multiple_of=1):
  masks = ep.surgery.structured(model, variables["params"], sparsity,
                                multiple_of=multiple_of)
  small_model, small = ep.surgery.shrink(model, variables, masks, strict=False)
  return _compile(small_model.apply), (small,)


# Format name -> builder(model, variables, sparsity, multiple_of) -> (compiled forward,
# its arguments before the input).
FORMATS: dict[str, Callable[..., Forward]] = {
    "dense": _dense, "masked": _masked, "bcoo": _bcoo, "shrunk": _shrunk,
}


def measure(name: str, sparsities: list[float], rounds: int,
            multiple_of: int = 1) -> dict[str, Any]:
  """{format: {sparsity: {batch1_ms, batch256_ms, speedup}}} for one model."""
  model = ep.models.create(name, num_classes=10)
  shape = INPUT_SHAPES[name]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(max(BATCHES), *shape)), jnp.float32)
  variables = dict(jax.jit(model.init)(jax.random.key(0), x[:1]))
  variants = {("dense", "0.0"): FORMATS["dense"](model, variables, 0.0)}
  for s in sparsities:
    for fmt in ("masked", "bcoo", "shrunk"):
      variants[(fmt, str(s))] = FORMATS[fmt](model, variables, s, multiple_of)
  results: dict[str, dict[str, dict[str, float]]] = {}
  for batch in BATCHES:
    xb = x[:batch]
    calls = {key: (lambda f=f, a=a: f(*a, xb)) for key, (f, a) in variants.items()}
    for (fmt, s), ms in ep.cost.latency(calls, rounds=rounds).items():
      results.setdefault(fmt, {}).setdefault(s, {})[f"batch{batch}_ms"] = ms
  dense = results["dense"]["0.0"][f"batch{max(BATCHES)}_ms"]
  for per_sparsity in results.values():
    for r in per_sparsity.values():
      r["speedup"] = dense / r[f"batch{max(BATCHES)}_ms"]
  return results


# ResNet-20's 3x3 convolutions: (C, spatial size, count in the network); stride-1, SAME.
RESNET20_CONVS = ((16, 32, 6), (32, 16, 5), (64, 8, 5))


def conv_breakdown(rounds: int, batch: int = max(BATCHES)) -> dict[str, Any]:
  """Times ResNet-20's stride-1 3x3 convolutions at full (C->C) and half (C/2->C/2) width.

  Both run `evoprune.ops.conv`, the op the zoo's layers call, side by side.

  Returns:
    {"<C>@<size>": {"count", "dense_ms", "shrunk_ms", "ratio", "dense_gmacs",
                    "shrunk_gmacs"}} (GMAC/s = multiply-adds per second / 1e9).
  """
  rng = np.random.default_rng(0)
  calls, macs = {}, {}
  for c, size, _ in RESNET20_CONVS:
    for kind, width in (("dense", c), ("shrunk", c // 2)):
      x = jnp.asarray(rng.normal(size=(batch, size, size, width)), jnp.float32)
      k = jnp.asarray(rng.normal(size=(3, 3, width, width)), jnp.float32)
      fn = jax.jit(lambda x, k: ep.ops.conv(x, k, (1, 1), ((1, 1), (1, 1))))
      calls[(c, kind)] = lambda fn=fn, x=x, k=k: fn(x, k)
      macs[(c, kind)] = batch * size * size * 9 * width * width
  ms = ep.cost.latency(calls, rounds=rounds)
  out = {}
  for c, size, count in RESNET20_CONVS:
    d, s = ms[(c, "dense")], ms[(c, "shrunk")]
    out[f"{c}@{size}"] = {"count": count, "dense_ms": d, "shrunk_ms": s, "ratio": d / s,
                          "dense_gmacs": macs[(c, "dense")] / d / 1e6,
                          "shrunk_gmacs": macs[(c, "shrunk")] / s / 1e6}
  return out


def format_breakdown(results: dict[str, Any]) -> str:
  """The conv breakdown as text: one row per convolution size."""
  lines = ["resnet20 3x3 convolutions, C->C vs C/2->C/2 (MACs ratio 4): ms and GMAC/s"]
  for name, r in results.items():
    c, size = name.split("@")
    lines.append(f"  {c:>2}->{c:<2} vs {int(c) // 2:>2}->{int(c) // 2:<2} at {size}x{size} "
                 f"(x{r['count']}): {r['dense_ms']:7.2f} vs {r['shrunk_ms']:7.2f} ms = "
                 f"{r['ratio']:.2f}x; {r['dense_gmacs']:5.1f} vs {r['shrunk_gmacs']:5.1f} "
                 "GMAC/s")
  return "\n".join(lines)


def format_table(name: str, results: dict[str, Any]) -> str:
  """One model's results as text: rows = sparsity, columns = formats (ms and speedup)."""
  formats = [f for f in FORMATS if f != "dense" and f in results]
  dense = results["dense"]["0.0"]
  lines = [f"{name}: dense {dense['batch1_ms']:.2f} ms (batch 1), "
           f"{dense['batch256_ms']:.1f} ms (batch 256); speedup = dense / format at 256",
           f"{'sparsity':>8}" + "".join(f"  {f + ' b1/b256 ms (x)':>30}" for f in formats)]
  for s in results[formats[0]]:
    cells = []
    for f in formats:
      r = results[f][s]
      cells.append(f"{r['batch1_ms']:.2f} / {r['batch256_ms']:.1f} ({r['speedup']:.2f}x)")
    lines.append(f"{s:>8}" + "".join(f"  {c:>30}" for c in cells))
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  models, rounds = _MODELS.value, _ROUNDS.value
  sparsities = [float(s) for s in _SPARSITIES.value]
  if _SMOKE.value:
    models, rounds, sparsities = ["thesis_cnn"], 2, [0.5]
  unknown = sorted(set(models) - set(INPUT_SHAPES))
  if unknown:
    raise ValueError(f"--models has unknown {unknown}; valid: {sorted(INPUT_SHAPES)}")
  if any(not 0.0 <= s < 1.0 for s in sparsities):
    raise ValueError(f"--sparsities={sparsities} must lie in [0, 1); pass e.g. 0.5,0.9")
  out = {}
  for name in models:
    out[name] = measure(name, sparsities, rounds, _MULTIPLE_OF.value)
    print(format_table(name, out[name]), flush=True)
    if name in TARGETS and "0.5" in out[name]["shrunk"]:
      speedup = out[name]["shrunk"]["0.5"]["speedup"]
      verdict = "met" if speedup >= TARGETS[name] else "NOT met"
      print(f"target: shrunk at 0.5 >= {TARGETS[name]}x at batch 256: {speedup:.2f}x, "
            f"{verdict}\n", flush=True)
  if _BREAKDOWN.value:
    out["resnet20_convs"] = conv_breakdown(rounds, batch=16 if _SMOKE.value else max(BATCHES))
    print(format_breakdown(out["resnet20_convs"]), flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
