"""Smoke test: benchmarks/step_profile.py traces a train step and writes its documented JSON."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl.testing import absltest

from benchmarks import step_profile
from evoprune.ops import direct

REPO = pathlib.Path(__file__).resolve().parents[1]


class StepProfileTest(absltest.TestCase):

  def test_instructions_parses_shapes_operands_and_windows(self):
    text = """
ENTRY %main (p: f32[2,4,4,3], k: f32[3,3,3,8]) -> f32[2,4,4,8] {
  %p = f32[2,4,4,3]{3,2,1,0} parameter(0)
  %k = f32[3,3,3,8]{3,2,1,0} parameter(1)
  ROOT %conv.1 = f32[2,4,4,8]{3,2,1,0} convolution(%p, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}"""
    table = step_profile.instructions(text)
    self.assertEqual(table["conv.1"], {"shape": "f32[2,4,4,8]", "opcode": "convolution",
                                       "operands": ["p", "k"],
                                       "window": "size=3x3 pad=1_1x1_1"})
    self.assertEqual(table["p"]["opcode"], "parameter")

  def test_op_intervals_end_asynchronous_ops_at_their_end_event(self):
    events = [
        {"ph": "X", "name": "conv.1", "ts": 0, "dur": 2},
        {"ph": "X", "name": "end: conv.1", "ts": 40, "dur": 5},
        {"ph": "X", "name": "fusion.2", "ts": 50, "dur": 7},
        {"ph": "X", "name": "while.3", "ts": 0, "dur": 100},
        {"ph": "M", "name": "thread_name"},
    ]
    self.assertCountEqual(step_profile.op_intervals(events, {"conv.1", "fusion.2"}),
                          [("conv.1", 45), ("fusion.2", 7)])

  def test_smoke(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "profile.json"
      proc = subprocess.run(
          [sys.executable, "-m", "benchmarks.step_profile", "--model=lenet5", "--steps=2",
           "--top=5", f"--out={out}"],
          cwd=REPO, capture_output=True, text=True, timeout=300,
          env=dict(os.environ, JAX_PLATFORMS="cpu"))
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      result = json.loads(out.read_text())
    self.assertEqual(set(result), {"model", "steps", "step_ms", "ops_ms", "ops"})
    self.assertEqual((result["model"], result["steps"]), ("lenet5", 2))
    self.assertGreater(result["step_ms"], 0)
    ops = result["ops"]
    self.assertAlmostEqual(result["ops_ms"], sum(o["ms"] for o in ops), places=6)
    self.assertEqual([o["ms"] for o in ops], sorted((o["ms"] for o in ops), reverse=True))
    for o in ops:
      self.assertEqual(set(o), {"kind", "opcode", "shape", "operands", "window", "count",
                                "ms"})
      self.assertGreater(o["count"], 0)
      self.assertNotIn(o["opcode"], {"while", "call", "conditional"})
    # LeNet-5's two convolutions: the first one's forward pass and weight gradient are XLA
    # convolutions (6 outputs), the second one's evoprune's C++ kernels where they are
    # built (16 outputs; its input gradient is a matmul, the first needs none).
    convolutions = [o for o in ops if o["opcode"] == "convolution"]
    kernels = [o for o in ops if o["opcode"] == "custom-call"]
    built = 2 if direct.available() else 0
    self.assertEqual(sum(o["count"] for o in convolutions), 4 - built)
    self.assertEqual(sum(o["count"] for o in kernels), built)
    self.assertTrue(all(o["ms"] > 0 and o["window"] for o in convolutions))
    self.assertTrue(all(o["ms"] > 0 for o in kernels))
    self.assertIn("lenet5:", proc.stdout)


if __name__ == "__main__":
  absltest.main()
