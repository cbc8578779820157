"""Smoke test: benchmarks/ptq_mnist.py on the real MNIST files meets the issue's targets."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl.testing import absltest

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "mnist"


class PtqMnistBenchmarkTest(absltest.TestCase):

  def test_smoke(self):
    if not DATA.exists():
      if os.environ.get("CI"):
        self.fail(f"{DATA} is missing (CI must have the shared data)")
      self.skipTest(f"{DATA} is missing")
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "ptq.json"
      proc = subprocess.run(
          [sys.executable, "-m", "benchmarks.ptq_mnist", "--smoke", f"--data_dir={DATA}",
           f"--out={out}"],
          cwd=REPO, capture_output=True, text=True, timeout=600,
          # Unoptimised XLA compiles several times faster; the smoke run checks the outputs.
          env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1"))
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      results = json.loads(out.read_text())
    variants = results["variants"]
    self.assertEqual(set(variants), {"fp32", "int8", "int8_percentile", "w4a8",
                                     "sparse90_fp32", "sparse90_int8"})
    # Sizes do not depend on training: int8 ~0.26x, 4-bit ~0.13x, 90% sparse + int8 ~0.065x.
    self.assertLessEqual(variants["int8"]["size_ratio"], 0.27)
    self.assertGreater(variants["int8"]["size_ratio"], 0.25)
    self.assertLess(variants["w4a8"]["size_ratio"], 0.14)
    self.assertLessEqual(variants["sparse90_int8"]["size_ratio"], 0.10)
    self.assertGreater(variants["fp32"]["test_accuracy"], 0.9)  # one epoch on 10k images
    self.assertLessEqual(variants["int8"]["accuracy_drop_points"], 0.5)
    self.assertTrue(results["passed"])
    self.assertGreater(results["latency_ms"]["int8"], 0)
    # Each target is stated with its verdict.
    self.assertEqual(proc.stdout.count(", met\n"), 3, proc.stdout)
    self.assertIn("target: 90% sparse + int8 file / fp32 file <= 0.1:", proc.stdout)
    self.assertIn("all targets: PASS", proc.stdout)


if __name__ == "__main__":
  absltest.main()
