r"""Where a train step's time goes: XLA's trace of one compiled call, by operation and shape.

  python -m benchmarks.step_profile [--model=resnet20] [--steps=4] [--top=30] [--out=f.json]
  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 1 python -m benchmarks.step_profile

Compiles the model's train epoch as `fit` runs it (`training.make_train_epoch`, batch 128,
SGD with momentum, `--steps` steps per call), warms it up, and traces one more call with
`jax.profiler`. Each operation of the compiled program (an HLO instruction: a convolution,
a fusion, a YNNPACK call, a copy) is timed from its start to its end (XLA:CPU runs
convolutions asynchronously; they end at their `end:` event), and the times are summed over
the operations of the same kind, result shape, operand shapes and window, per step.

On two cores operations overlap and share the threads, so their times add up to more than
the step. On one core with Eigen run inline (the second command) they add up to the step
(the rest is control flow), which makes them comparable between variants of the code and
with PyTorch's per-operator profile; the README's "Where ResNet-20's time goes" was read
that way.

JSON: {"model", "steps", "step_ms", "ops_ms", "ops": [{"kind", "opcode", "shape",
"operands", "window", "count", "ms"}]} where `step_ms` is the traced call's wall time per
step (profiler overhead included), `ops_ms` the sum of `ms`, and each entry of `ops` (the
largest first) a group of operations: `kind` the instruction name without its number (e.g.
`conv_general_dilated`, `transpose_copy_fusion`), `count` how many run per step (a
fraction for those run once per call, outside the loop over steps), `ms` their summed time
per step.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
import jax

import evoprune as ep
from benchmarks import side_by_side

_MODEL = flags.DEFINE_enum("model", "resnet20", sorted(side_by_side.INPUT_SHAPES), "Model to profile.")
_STEPS = flags.DEFINE_integer("steps", 4, "Train steps per compiled call.", lower_bound=2)
_TOP = flags.DEFINE_integer("top", 30, "Print this many groups, the largest first.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON to this file.")

# Control flow: its time is its body's, which is timed operation by operation.
_CONTROL_FLOW = frozenset({"while", "call", "conditional"})
# `%name = f32[128,8,8,64]{3,2,1,0} opcode(%a, %b), window={size=3x3 pad=1_1x1_1}, ...`
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%(?P<name>[^ ]+) = (?P<shape>\S+) (?P<opcode>[\w-]+)\((?P<operands>[^)]*)\)"
    r"(?P<attributes>.*)$")


def instructions(hlo_text: str) -> dict[str, dict[str, Any]]:
  """Every instruction of a compiled module's text by name: its result shape (layout
  dropped), opcode, operand names and window."""
  table = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      window = re.search(r"window=\{([^}]*)\}", match["attributes"])
      table[match["name"]] = {
          "shape": match["shape"].split("{")[0], "opcode": match["opcode"],
          "operands": re.findall(r"%([^ ,]+)", match["operands"]),
          "window": window.group(1) if window else ""}
  return table


def op_intervals(events: list[dict[str, Any]], names: set[str]) -> list[tuple[str, float]]:
  """(instruction name, microseconds) of every traced execution of an instruction in
  `names`; an asynchronous one (followed by an `end: <name>` event) lasts until that
  event ends."""
  starts, ends = collections.defaultdict(list), collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    name = e["name"]
    if name in names:
      starts[name].append(e)
    elif name.startswith("end: ") and name[5:] in names:
      ends[name[5:]].append(e["ts"] + e["dur"])
  intervals = []
  for name, runs in starts.items():
    runs.sort(key=lambda e: e["ts"])
    finished = sorted(ends[name])
    for i, e in enumerate(runs):
      end = finished[i] if len(finished) == len(runs) else e["ts"] + e["dur"]
      intervals.append((name, end - e["ts"]))
  return intervals


def profile(name: str, steps: int) -> dict[str, Any]:
  """Traces one call of `steps` train steps of model `name`; the documented JSON."""
  epoch, (state, x, y, batches) = side_by_side.train_epoch(
      name, *side_by_side.example_batch(name), steps)
  # The compiled program itself runs, so the trace names the instructions of its text.
  epoch = epoch.lower(state, x, y, batches).compile()
  table = instructions(epoch.as_text())
  for _ in range(2):
    state, metrics = epoch(state, x, y, batches)
    jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      state, metrics = epoch(state, x, y, batches)
      jax.block_until_ready(metrics)
      seconds = time.perf_counter() - start
    (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                        recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  timed = {n for n, i in table.items() if i["opcode"] not in _CONTROL_FLOW}
  groups = collections.defaultdict(lambda: [0, 0.0])
  for op, micros in op_intervals(events, timed):
    i = table[op]
    key = (re.sub(r"\.\d+$", "", op), i["opcode"], i["shape"],
           tuple(table[o]["shape"] if o in table else o for o in i["operands"]), i["window"])
    groups[key][0] += 1
    groups[key][1] += micros
  ops = [{"kind": kind, "opcode": opcode, "shape": shape, "operands": list(operands),
          "window": window, "count": runs / steps, "ms": micros / 1e3 / steps}
         for (kind, opcode, shape, operands, window), (runs, micros) in groups.items()]
  ops.sort(key=lambda o: -o["ms"])
  return {"model": name, "steps": steps, "step_ms": 1e3 * seconds / steps,
          "ops_ms": sum(o["ms"] for o in ops), "ops": ops}


def main(argv):
  del argv
  print(side_by_side.machine())
  print(f"evoprune ops: {ep.ops.describe()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  result = profile(_MODEL.value, _STEPS.value)
  print(f"{result['model']}: {result['step_ms']:.1f} ms a step (traced), operations "
        f"{result['ops_ms']:.1f} ms a step")
  print(f"{'ms/step':>8} {'count':>5}  operation")
  for o in result["ops"][:_TOP.value]:
    window = f"  [{o['window']}]" if o["window"] else ""
    print(f"{o['ms']:8.2f} {o['count']:5.3g}  {o['kind']} {o['shape']} <- "
          f"{' x '.join(o['operands'])}{window}")
  if _OUT.value:
    ep.training.write_json_atomic(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
