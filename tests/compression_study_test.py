"""End to end: thesis_cifar10.py:smoke on the real CIFAR-10 files, every kind of row."""

import json
import os
import pathlib
import tempfile

from absl.testing import absltest
import jax
import numpy as np

import evoprune as ep
from evoprune import quantization
from evoprune import storage
from experiments import compression_study
from experiments.configs import thesis_cifar10

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


class CompressionStudyTest(absltest.TestCase):

  def test_data_parallel_is_rejected(self):
    config = thesis_cifar10.get_config("smoke")
    config.parallel.data_parallel = True
    with self.assertRaisesRegex(ValueError, "one device"):
      compression_study.validate(config)

  def test_smoke_end_to_end(self):
    if not (DATA / "cifar-10-batches-bin").exists():
      if os.environ.get("CI"):
        self.fail(f"{DATA} has no CIFAR-10 (CI must have the shared data)")
      self.skipTest(f"{DATA} has no CIFAR-10")
    config = thesis_cifar10.get_config("smoke")
    config.data.dir = str(DATA)
    workdir = pathlib.Path(tempfile.mkdtemp())
    summary = compression_study.run(config, workdir)

    rows = {(r["method"], r["target_sparsity"]): r for r in summary["results"]}
    self.assertEqual(set(rows), {
        ("dense", 0.0), ("polynomial_decay", 0.8), ("ptq", 0.0), ("ptq_w4", 0.0),
        ("qat", 0.0), ("qat+ptq", 0.0), ("polynomial_decay+ptq", 0.8),
        ("polynomial_decay+qat+ptq", 0.8), ("polynomial_decay+share4", 0.8)})
    for r in summary["results"]:
      self.assertEqual(set(r["bytes"]), {"fp32_dense", "sparse", "int8", "sparse_int8",
                                         "model"})
      self.assertGreater(r["latency"]["ratio"]["mean"], 0)
      self.assertTrue(0.0 <= r["test_accuracy"]["mean"] <= 1.0)
    dense = rows[("dense", 0.0)]
    self.assertAlmostEqual(dense["size_ratio"]["mean"], 1.0, places=3)  # + metadata
    # What the files weigh does not depend on training: int8 ~0.26x, 4-bit ~0.14x,
    # 80% sparse fp32 ~0.24x, 80% sparse + int8 under 0.10x, + 4-bit codebook ~0.07x.
    self.assertLess(rows[("ptq", 0.0)]["size_ratio"]["mean"], 0.27)
    self.assertLess(rows[("qat+ptq", 0.0)]["size_ratio"]["mean"], 0.27)
    self.assertLess(rows[("ptq_w4", 0.0)]["size_ratio"]["mean"], 0.15)
    self.assertLess(rows[("polynomial_decay", 0.8)]["size_ratio"]["mean"], 0.25)
    self.assertLess(rows[("polynomial_decay+qat+ptq", 0.8)]["size_ratio"]["mean"], 0.10)
    self.assertLess(rows[("polynomial_decay+share4", 0.8)]["size_ratio"]["mean"], 0.08)
    self.assertAlmostEqual(rows[("polynomial_decay+qat+ptq", 0.8)]["sparsity"]["global"], 0.8,
                           delta=0.01)
    self.assertEqual(rows[("qat", 0.0)]["bytes"]["model"] // 1000,
                     dense["bytes"]["model"] // 1000)  # QAT alone keeps float weights

    # The saved int8 model predicts exactly what was measured: reload and compare.
    model_file = workdir / "models" / "seed0" / "polynomial_decay+qat+ptq@0.8.npz"
    params, metadata = storage.load(model_file)
    self.assertEqual(metadata["row"], "polynomial_decay+qat+ptq@0.8")
    self.assertEqual(params["Conv_1"]["kernel"].dtype, np.int8)
    self.assertGreater(np.mean(params["Conv_1"]["kernel"] == 0), 0.75)
    int8_model = quantization.QuantizedModel(
        ep.models.create("thesis_cnn"), quantization.QuantConfig(),
        mode="integer")
    logits = int8_model.apply({"params": jax.tree.map(np.asarray, params)},
                              np.zeros((2, 32, 32, 3), np.float32))
    self.assertEqual(logits.shape, (2, 10))
    self.assertTrue(np.all(np.isfinite(logits)))

    for name in ("summary.json", "report.md", "compression.png", "config.json"):
      self.assertTrue((workdir / name).exists(), name)
    self.assertEqual(json.loads((workdir / "summary.json").read_text()), summary)
    self.assertIn("polynomial_decay+qat+ptq", (workdir / "report.md").read_text())
    # Finished rows are stored, so a restarted run reads them back instead of recomputing.
    self.assertLen(list((workdir / "results" / "seed0").glob("*.json")), len(rows))


if __name__ == "__main__":
  absltest.main()
