r"""ResNet-20's convolutions, pass by pass, against PyTorch's (oneDNN on CPU), side by side.

  python -m benchmarks.conv_speed [--out=conv_speed.json] [--layers=...] [--smoke]
  taskset -c 1 python -m benchmarks.conv_speed   # one core each (PyTorch follows affinity)
  python -m benchmarks.conv_speed --xla_forms    # also evoprune without its C++ kernels

Where `training_speed`'s ResNet-20 ratio comes from. For each distinct 3x3 convolution of
ResNet-20 (batch 128, CIFAR-shaped; padding 1 as in both models), the three passes of a
training step, each a compiled call of its own: evoprune's forward (`ep.ops.conv`), input
gradient and weight gradient (`jax.vjp` of it, the other cotangent pruned by XLA), made by
`ep.ops.jit` as the training programs are; PyTorch's `conv2d` and
`aten.convolution_backward` with one output selected (NCHW, the default thread count).
All passes alternate in blocks (`side_by_side.alternate`), so both frameworks see the
same load; each figure is the median ms per call. The stem's input gradient is not timed
(neither framework computes it in training). `step` sums each pass times its count in
ResNet-20 (e.g. six 16 -> 16 convolutions): the convolutions' share of one train step.
With `--xla_forms`, evoprune's passes are also timed as traced within
`ep.ops.direct.use_kernels(False)` (the XLA formulations instead of the C++ kernels), in the
same alternation.

JSON: {"<layer>": {"count", "jax_ms", "torch_ms", "jax_over_torch", "xla_forms_ms",
"jax_over_xla_forms"}, "step": {...}} where each figure maps each pass ("forward",
"input_grad", "weight_grad") to a number (null where not timed; the torch fields are null
without PyTorch, the xla_forms ones without `--xla_forms`).
"""

import functools
import json
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import evoprune as ep
from benchmarks import side_by_side
from evoprune.ops import direct

# name: (input height = width, C_in, C_out, stride, count in ResNet-20)
LAYERS = {
    "stem": (32, 3, 16, 1, 1),
    "stage1": (32, 16, 16, 1, 6),
    "down1": (32, 16, 32, 2, 1),
    "stage2": (16, 32, 32, 1, 5),
    "down2": (16, 32, 64, 2, 1),
    "stage3": (8, 64, 64, 1, 5),
}
PASSES = ("forward", "input_grad", "weight_grad")

_OUT = flags.DEFINE_string("out", "", "Write the results as JSON to this file.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Few repetitions (a quick check, not a measure).")
_LAYERS = flags.DEFINE_list("layers", list(LAYERS), "Layers to measure.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds of 3 timed calls per pass.")
_XLA_FORMS = flags.DEFINE_bool("xla_forms", False,
                               "Also time evoprune's passes without its C++ kernels.")
flags.register_validator("layers", lambda names: set(names) <= LAYERS.keys(),
                         f"--layers names layers from {list(LAYERS)}, comma-separated.")


def jax_passes(x: np.ndarray, kernel: np.ndarray, g: np.ndarray, stride: int
               ) -> dict[str, Callable[[], None]]:
  """evoprune's forward, input-gradient and weight-gradient calls on NHWC / HWIO arrays,
  compiled now (so under whatever context the caller is in)."""
  conv = functools.partial(ep.ops.conv, strides=(stride, stride), padding=((1, 1), (1, 1)))
  x, kernel, g = jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(g)
  programs = {
      "forward": (ep.ops.jit(conv), (x, kernel)),
      "input_grad": (ep.ops.jit(lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0]),
                     (x, kernel, g)),
      "weight_grad": (ep.ops.jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0]),
                      (x, kernel, g)),
  }
  compiled = {name: (f.lower(*args).compile(), args) for name, (f, args) in programs.items()}
  return {name: functools.partial(lambda f, args: jax.block_until_ready(f(*args)), f, args)
          for name, (f, args) in compiled.items()}


def torch_passes(x: np.ndarray, kernel: np.ndarray, g: np.ndarray, stride: int
                 ) -> dict[str, Callable[[], None]]:
  """PyTorch's passes on the same arrays, NCHW / OIHW (on the GPU where JAX runs on one)."""
  import torch  # pylint: disable=g-import-not-at-top

  device = side_by_side.torch_device()
  xt, wt, gt = (torch.from_numpy(np.ascontiguousarray(a.transpose(order))).to(device)
                for a, order in ((x, (0, 3, 1, 2)), (kernel, (3, 2, 0, 1)), (g, (0, 3, 1, 2))))
  wait = torch.cuda.synchronize if device == "cuda" else lambda: None

  def timed(call):
    return lambda: (call(), wait())

  def backward(mask):
    return timed(lambda: torch.ops.aten.convolution_backward(
        gt, xt, wt, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1, mask))

  return {"forward": timed(lambda: torch.nn.functional.conv2d(xt, wt, stride=stride,
                                                              padding=1)),
          "input_grad": backward([True, False, False]),
          "weight_grad": backward([False, True, False])}


def measure(name: str, rounds: int, block: int = 3, warmup: int = 2,
            xla_forms: bool = False) -> dict[str, Any]:
  """Median ms per call of each pass of layer `name` in both frameworks (and, with
  `xla_forms`, evoprune without its kernels), and their ratios."""
  hw, c_in, c_out, stride, count = LAYERS[name]
  rng = np.random.default_rng(0)
  batch = side_by_side.BATCH_SIZE
  x = rng.normal(size=(batch, hw, hw, c_in)).astype(np.float32)
  kernel = (rng.normal(size=(3, 3, c_in, c_out)) / np.sqrt(9 * c_in)).astype(np.float32)
  g = rng.normal(size=(batch, hw // stride, hw // stride, c_out)).astype(np.float32)
  # Nobody needs the gradient of the images.
  passes = ("forward", "weight_grad") if name == "stem" else PASSES
  calls = {("jax", p): f for p, f in jax_passes(x, kernel, g, stride).items() if p in passes}
  if xla_forms:
    with direct.use_kernels(False):
      calls.update({("xla_forms", p): f for p, f in jax_passes(x, kernel, g, stride).items()
                    if p in passes})
  try:
    calls.update({("torch", p): f for p, f in torch_passes(x, kernel, g, stride).items()
                  if p in passes})
  except ImportError:
    pass
  times = side_by_side.alternate(calls, rounds, block, warmup)
  result = {"count": count, "jax_ms": dict.fromkeys(PASSES), "torch_ms": None,
            "jax_over_torch": None, "xla_forms_ms": None, "jax_over_xla_forms": None}
  if xla_forms:
    result["xla_forms_ms"] = dict.fromkeys(PASSES)
    result["jax_over_xla_forms"] = dict.fromkeys(PASSES)
  if ("torch", "forward") in times:
    result["torch_ms"], result["jax_over_torch"] = dict.fromkeys(PASSES), dict.fromkeys(PASSES)
  for (framework, p), t in times.items():
    result[f"{framework}_ms"][p] = float(1e3 * np.median(t))
  for other in ("torch", "xla_forms"):
    if result[f"{other}_ms"] is not None:
      for p in passes:
        result[f"jax_over_{other}"][p] = result["jax_ms"][p] / result[f"{other}_ms"][p]
  return result


def step_total(results: dict[str, dict[str, Any]], framework: str) -> dict[str, float] | None:
  """Each pass's ms summed over the measured layers, times their count in ResNet-20."""
  if any(r[f"{framework}_ms"] is None for r in results.values()):
    return None
  return {p: sum(r["count"] * (r[f"{framework}_ms"][p] or 0.0) for r in results.values())
          for p in PASSES}


def main(argv):
  del argv
  print(side_by_side.machine())
  print(f"evoprune ops: {ep.ops.describe()}")
  rounds = 1 if _SMOKE.value else _ROUNDS.value
  results = {}
  print(f"{'layer':<8} {'shape':<22} {'count':>5}  "
        + "  ".join(f"{p + ' jax/torch ms':>26}" for p in PASSES))
  for name in _LAYERS.value:
    r = measure(name, rounds, block=1 if _SMOKE.value else 3, warmup=1 if _SMOKE.value else 2,
                xla_forms=_XLA_FORMS.value)
    results[name] = r
    hw, c_in, c_out, stride, count = LAYERS[name]
    cells = []
    for p in PASSES:
      jax_ms = r["jax_ms"][p]
      torch_ms = None if r["torch_ms"] is None else r["torch_ms"][p]
      cells.append("-" if jax_ms is None else
                   f"{jax_ms:.2f}" if torch_ms is None else
                   f"{jax_ms:.2f}/{torch_ms:.2f} = {jax_ms / torch_ms:.2f}")
    shape = f"{c_in}->{c_out} s{stride} at {hw}x{hw}"
    print(f"{name:<8} {shape:<22} {count:>5}  " + "  ".join(f"{c:>26}" for c in cells),
          flush=True)
    if r["xla_forms_ms"] is not None:
      print(f"{'':<8} {'without C++ kernels':<22} {'':>5}  " + "  ".join(
          f"{'-':>26}" if r["xla_forms_ms"][p] is None else
          f"{r['xla_forms_ms'][p]:>20.2f} ({r['jax_over_xla_forms'][p]:.2f})" for p in PASSES))
  step = {"count": 1, "jax_ms": step_total(results, "jax"),
          "torch_ms": step_total(results, "torch"), "jax_over_torch": None,
          "xla_forms_ms": step_total(results, "xla_forms"), "jax_over_xla_forms": None}
  if step["xla_forms_ms"] is not None:
    step["jax_over_xla_forms"] = {p: step["jax_ms"][p] / step["xla_forms_ms"][p]
                                  for p in PASSES}
    print("per step without the C++ kernels (x count): " + ", ".join(
        f"{p} {step['xla_forms_ms'][p]:.1f} ms" for p in PASSES))
  if step["torch_ms"] is not None:
    step["jax_over_torch"] = {p: step["jax_ms"][p] / step["torch_ms"][p] for p in PASSES}
    total = sum(step["jax_ms"].values()) / sum(step["torch_ms"].values())
    print("per step (x count): " + ", ".join(
        f"{p} {step['jax_ms'][p]:.1f}/{step['torch_ms'][p]:.1f} ms" for p in PASSES)
        + f"; all passes jax/torch {total:.3f}")
  else:
    print("PyTorch is not installed: evoprune only (pip install torch to compare).")
  results["step"] = step
  if _OUT.value:
    ep.training.write_json_atomic(_OUT.value, results)
  print(json.dumps({"backend": jax.default_backend(), "smoke": _SMOKE.value}))


if __name__ == "__main__":
  app.run(main)
