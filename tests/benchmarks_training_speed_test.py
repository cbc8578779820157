"""Smoke test: benchmarks/training_speed.py runs and writes its documented JSON."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl.testing import absltest

REPO = pathlib.Path(__file__).resolve().parents[1]


class TrainingSpeedBenchmarkTest(absltest.TestCase):

  def test_smoke(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "speed.json"
      proc = subprocess.run(
          [sys.executable, "-m", "benchmarks.training_speed", "--smoke",
           "--models=lenet300_100,lenet5", "--plain_ops", "--cpu_ops", "--xla_forms",
           f"--out={out}"],
          cwd=REPO, capture_output=True, text=True, timeout=600,
          # Unoptimised XLA compiles several times faster; the smoke run checks the outputs.
          env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1"))
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      results = json.loads(out.read_text())
    self.assertEqual(set(results), {"lenet300_100", "lenet5"})
    has_torch = importlib.util.find_spec("torch") is not None
    for r in results.values():
      self.assertEqual(set(r), {"jax_ms", "torch_ms", "jax_over_torch", "round_ratios", "impl",
                                "plain_ms", "plain_over_jax", "cpu_ms", "cpu_over_jax",
                                "xla_forms_ms", "xla_forms_over_jax"})
      self.assertGreater(r["jax_ms"], 0)
      for key in ("plain", "cpu", "xla_forms"):  # --plain_ops, --cpu_ops, --xla_forms
        self.assertGreater(r[f"{key}_ms"], 0)
        self.assertAlmostEqual(r[f"{key}_over_jax"], r[f"{key}_ms"] / r["jax_ms"])
      self.assertTrue(r["impl"].startswith("cpu"))
      if has_torch:
        self.assertGreater(r["torch_ms"], 0)
        self.assertAlmostEqual(r["jax_over_torch"], r["jax_ms"] / r["torch_ms"])
        self.assertLen(r["round_ratios"], 1)  # --smoke: one round of one step each
        self.assertAlmostEqual(r["round_ratios"][0], r["jax_over_torch"], places=3)
      else:
        self.assertIsNone(r["torch_ms"])
        self.assertIsNone(r["jax_over_torch"])
        self.assertIsNone(r["round_ratios"])
    if not has_torch:
      self.assertIn("PyTorch is not installed", proc.stdout)


if __name__ == "__main__":
  absltest.main()
