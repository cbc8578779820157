r"""What pruning costs inside the train step, as a ratio to the plain optax step.

For each model (batch 128): a plain SGD-momentum train step; the same step with the Pruner
wrapped around the optimizer, evolution of weights on (a running average updated every
step), on a step that does not update the masks; and on a step that recomputes the masks
(exact per-layer top-k of |running average| at 90% sparsity). All three are compiled
once and timed side by side, interleaved, in one process (median after warm-up, with
`block_until_ready`); the ratios are what count on a shared CPU.

  python -m benchmarks.pruner_overhead [--out=pruner_overhead.json] [--smoke]

Targets: pruned/plain <= 1.10 (MLP), <= 1.05 (CNN); update/plain <= 5 (MLP), <= 2 (CNN).
For comparison: jaxpruner's argsort-based mask update costs 75-80 plain steps on
LeNet-300-100 on this kind of CPU.
"""

import functools
import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import evoprune as ep
from evoprune import training

_OUT = flags.DEFINE_string("out", "", "Write the results as JSON to this file.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Few repetitions (a quick check, not a measure).")
_MODELS = flags.DEFINE_list("models", ["lenet300_100", "thesis_cnn"], "Models to measure.")

INPUT_SHAPES = {"lenet300_100": (28, 28, 1), "thesis_cnn": (32, 32, 3)}
TARGETS = {"lenet300_100": (1.10, 5.0), "thesis_cnn": (1.05, 2.0)}


def make_step(model, tx, state, x, y):
  """A compiled train step (buffers donated) and a fresh copy of its state."""
  step = jax.jit(functools.partial(training.train_step, model=model, tx=tx),
                 donate_argnums=(0,))
  fresh = training.create_train_state(model, tx, jax.random.key(0), x[:1])
  return step, fresh.replace(params=jax.tree.map(jnp.copy, state.params))


def measure(name: str, batch_size: int, repeats: int, rounds: int) -> dict[str, float]:
  """Median milliseconds of the plain, pruned and mask-updating steps, and their ratios."""
  model = ep.models.create(name, num_classes=10)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch_size, *INPUT_SHAPES[name])), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
  inner = optax.sgd(0.01, momentum=0.9)
  average = ep.importance.RunningAverage("linear", every=1)
  never = ep.schedules.constant(0.9, begin_step=0, frequency=10**9)  # updates at step 0 only
  always = ep.schedules.constant(0.9, begin_step=0, frequency=1)
  base = training.create_train_state(model, inner, jax.random.key(0), x[:1])
  variants = {
      "plain": inner,
      "pruned": ep.Pruner(importance="wbar", average=average, schedule=never).wrap(inner),
      "update": ep.Pruner(importance="wbar", average=average, schedule=always).wrap(inner),
  }
  steps, states = {}, {}
  for key, tx in variants.items():
    steps[key], states[key] = make_step(model, tx, base, x, y)
    for _ in range(2):  # compile, and move the pruned variant past its step-0 update
      states[key], _ = steps[key](states[key], x, y)
    jax.block_until_ready(states[key])
  times = {key: [] for key in variants}
  for _ in range(rounds):  # interleaved, so load changes hit all variants alike
    for key in variants:
      for _ in range(repeats):
        start = time.perf_counter()
        states[key], metrics = steps[key](states[key], x, y)
        jax.block_until_ready(metrics)
        times[key].append(time.perf_counter() - start)
  ms = {key: 1e3 * float(np.median(t)) for key, t in times.items()}
  return {"plain_ms": ms["plain"], "pruned_ms": ms["pruned"], "update_ms": ms["update"],
          "pruned_over_plain": ms["pruned"] / ms["plain"],
          "update_over_plain": ms["update"] / ms["plain"]}


def main(argv):
  del argv
  repeats, rounds = (2, 2) if _SMOKE.value else (10, 5)
  results = {}
  print(f"{'model':<14} {'plain ms':>9} {'pruned ms':>10} {'update ms':>10} "
        f"{'pruned/plain':>13} {'update/plain':>13}  targets")
  for name in _MODELS.value:
    r = measure(name, 128, repeats, rounds)
    results[name] = r
    t = TARGETS.get(name, (float("nan"),) * 2)
    print(f"{name:<14} {r['plain_ms']:9.2f} {r['pruned_ms']:10.2f} {r['update_ms']:10.2f} "
          f"{r['pruned_over_plain']:13.3f} {r['update_over_plain']:13.3f}  "
          f"<= {t[0]}, <= {t[1]}")
  if _OUT.value:
    training.write_json_atomic(_OUT.value, results)
  print(json.dumps({"backend": jax.default_backend(), "smoke": _SMOKE.value}))


if __name__ == "__main__":
  app.run(main)
