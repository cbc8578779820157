"""Smoke test: benchmarks/conv_speed.py runs and writes its documented JSON."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl.testing import absltest

REPO = pathlib.Path(__file__).resolve().parents[1]
PASSES = {"forward", "input_grad", "weight_grad"}


class ConvSpeedBenchmarkTest(absltest.TestCase):

  def test_smoke(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "conv.json"
      proc = subprocess.run(
          [sys.executable, "-m", "benchmarks.conv_speed", "--smoke", "--layers=stem,stage3",
           "--xla_forms", f"--out={out}"],
          cwd=REPO, capture_output=True, text=True, timeout=300,
          env=dict(os.environ, JAX_PLATFORMS="cpu"))
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      results = json.loads(out.read_text())
    self.assertEqual(set(results), {"stem", "stage3", "step"})
    has_torch = importlib.util.find_spec("torch") is not None
    self.assertEqual((results["stem"]["count"], results["stage3"]["count"]), (1, 5))
    for name in ("stem", "stage3"):
      r = results[name]
      self.assertEqual(set(r), {"count", "jax_ms", "torch_ms", "jax_over_torch",
                                "xla_forms_ms", "jax_over_xla_forms"})
      self.assertEqual(set(r["jax_ms"]), PASSES)
      timed = PASSES - {"input_grad"} if name == "stem" else PASSES  # no image gradient
      for p in PASSES:
        if p in timed:
          self.assertGreater(r["jax_ms"][p], 0)
        else:
          self.assertIsNone(r["jax_ms"][p])
      for p in timed:  # --xla_forms: evoprune without its C++ kernels, side by side
        self.assertGreater(r["xla_forms_ms"][p], 0)
        self.assertAlmostEqual(r["jax_over_xla_forms"][p],
                               r["jax_ms"][p] / r["xla_forms_ms"][p])
      if has_torch:
        for p in timed:
          self.assertAlmostEqual(r["jax_over_torch"][p], r["jax_ms"][p] / r["torch_ms"][p])
      else:
        self.assertIsNone(r["torch_ms"])
    step = results["step"]
    for p in PASSES:  # the passes times their count in ResNet-20
      expected = sum(results[n]["count"] * (results[n]["jax_ms"][p] or 0) for n in ("stem",
                                                                                  "stage3"))
      self.assertAlmostEqual(step["jax_ms"][p], expected)
    if not has_torch:
      self.assertIn("PyTorch is not installed", proc.stdout)


if __name__ == "__main__":
  absltest.main()
