"""Smoke tests: benchmarks/sparse_eval.py and benchmarks/macs_table.py run and write JSON."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl.testing import absltest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(module: str, out: pathlib.Path, *flags: str) -> str:
  proc = subprocess.run(
      [sys.executable, "-m", f"benchmarks.{module}", "--smoke", f"--out={out}", *flags],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      # Unoptimised XLA compiles several times faster; the smoke run checks the outputs.
      env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1"))
  if proc.returncode:
    raise AssertionError(proc.stderr[-3000:])
  return proc.stdout


class CompressionBenchmarksTest(absltest.TestCase):

  def test_sparse_eval_smoke(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "sparse_eval.json"
      stdout = _run("sparse_eval", out, "--breakdown")
      results = json.loads(out.read_text())
    self.assertEqual(set(results), {"thesis_cnn", "resnet20_convs"})
    convs = results["resnet20_convs"]
    self.assertEqual(set(convs), {"16@32", "32@16", "64@8"})
    for r in convs.values():
      self.assertAlmostEqual(r["ratio"], r["dense_ms"] / r["shrunk_ms"])
      self.assertGreater(r["dense_gmacs"], 0)
    self.assertEqual([convs[k]["count"] for k in ("16@32", "32@16", "64@8")], [6, 5, 5])
    formats = results["thesis_cnn"]
    self.assertEqual(set(formats), {"dense", "masked", "bcoo", "shrunk"})
    self.assertEqual(set(formats["dense"]), {"0.0"})
    self.assertEqual(set(formats["shrunk"]), {"0.5"})
    for per_sparsity in formats.values():
      for r in per_sparsity.values():
        self.assertEqual(set(r), {"batch1_ms", "batch256_ms", "speedup"})
        self.assertTrue(all(v > 0 for v in r.values()))
    self.assertEqual(formats["dense"]["0.0"]["speedup"], 1.0)
    shrunk = formats["shrunk"]["0.5"]
    self.assertAlmostEqual(
        shrunk["speedup"], formats["dense"]["0.0"]["batch256_ms"] / shrunk["batch256_ms"])
    self.assertIn("target: shrunk at 0.5", stdout)
    self.assertIn("resnet20 3x3 convolutions", stdout)

  def test_macs_table_smoke(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "macs_table.json"
      stdout = _run("macs_table", out)
      results = json.loads(out.read_text())
    r = results["thesis_cnn"]
    self.assertEqual(r["dense_macs"], 4_548_608)
    self.assertEqual(set(r["unstructured"]), {"0.0", "0.5"})
    # Half of every layer's weights: exactly half of every layer's MACs.
    self.assertEqual(r["unstructured"]["0.5"]["macs"], 2_274_304)
    # Half the filters and neurons: 30*30*16*27 + 13*13*32*144 + 4*4*32*288 + 512*32 + 320.
    self.assertEqual(r["structured"]["0.5"]["macs"], 1_331_712)
    self.assertEqual(r["structured"]["0.0"]["macs"], 4_548_608)
    for kind in ("unstructured", "structured"):
      for row in r[kind].values():
        self.assertEqual(set(row), {"macs", "macs_ratio", "latency_ms", "speedup"})
        self.assertGreater(row["latency_ms"], 0)
    self.assertIn("structured MACs (phys.)", stdout)


if __name__ == "__main__":
  absltest.main()
