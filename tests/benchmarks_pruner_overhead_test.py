"""Smoke test: benchmarks/pruner_overhead.py runs and writes its documented JSON."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl.testing import absltest

REPO = pathlib.Path(__file__).resolve().parents[1]


class PrunerOverheadBenchmarkTest(absltest.TestCase):

  def test_smoke(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "overhead.json"
      proc = subprocess.run(
          [sys.executable, "-m", "benchmarks.pruner_overhead", "--smoke",
           "--models=lenet300_100", f"--out={out}"],
          cwd=REPO, capture_output=True, text=True, timeout=600,
          # Unoptimised XLA compiles several times faster; the smoke run checks the outputs.
          env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1"))
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      results = json.loads(out.read_text())
    # The CNN takes a minute to compile three train steps on 2 cores; the full run covers it.
    self.assertEqual(set(results), {"lenet300_100"})
    for r in results.values():
      self.assertEqual(set(r), {"plain_ms", "pruned_ms", "update_ms", "pruned_over_plain",
                                "update_over_plain"})
      self.assertTrue(all(v > 0 for v in r.values()))
      self.assertAlmostEqual(r["pruned_over_plain"], r["pruned_ms"] / r["plain_ms"])
    self.assertIn("update/plain", proc.stdout)


if __name__ == "__main__":
  absltest.main()
