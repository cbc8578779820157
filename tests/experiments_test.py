"""End-to-end tests of the experiment launcher: CLI run, summary schema, config errors."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from experiments import allocation_study
from experiments import checks
from experiments import pipeline
from experiments.configs import default
from experiments.configs import test as test_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def launch(*flags: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.main", *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


class ExperimentsTest(parameterized.TestCase):

  def test_cli_end_to_end(self):
    with tempfile.TemporaryDirectory() as workdir:
      proc = launch("--config=experiments/configs/test.py", f"--workdir={workdir}")
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      summary = json.loads((pathlib.Path(workdir) / "summary.json").read_text())
      files = {p.name for p in pathlib.Path(workdir).iterdir()}
    self.assertEqual(summary["dataset"], "digits")
    self.assertIn("| evolution | 0.900 |", proc.stdout)
    self.assertTrue({"config.json", "metrics.jsonl", "summary.json", "report.md",
                     "accuracy_vs_sparsity.png", "per_layer_sparsity.png",
                     "checkpoints", "results"} <= files, files)
    rows = {r["method"]: r for r in summary["results"]}
    self.assertEqual(set(rows), {"dense", "magnitude", "evolution"})
    for name in ("magnitude", "evolution"):
      r = rows[name]
      self.assertEqual(r["seeds"], [0, 1])
      self.assertGreaterEqual(r["sparsity"]["global"], 0.89)
      self.assertLess(r["params"]["nonzero"], 0.2 * r["params"]["total"])
      self.assertLess(r["macs"]["effective"], 0.2 * r["macs"]["dense"])
      self.assertLess(r["bytes"]["sparse"], r["bytes"]["fp32_dense"])
      for key in ("val_accuracy", "test_accuracy"):
        self.assertEqual(set(r[key]), {"mean", "std"})
        self.assertGreater(r[key]["mean"], 0.5)
      self.assertEqual(set(r["sparsity"]["per_layer"]), {"Dense_0/kernel", "Dense_1/kernel"})
    self.assertGreater(rows["dense"]["test_accuracy"]["mean"], 0.8)

  @parameterized.named_parameters(
      ("sparsity", "--config.prune.target_sparsity=1.5", "target_sparsity contains 1.5"),
      ("dataset", "--config.data.name=imagenet22k", "imagenet22k"),
      ("method", "--config.prune.methods=('magnitud',)", "magnitud"),
      ("typo", "--config.trian.epochs=3", "trian"),
  )
  def test_bad_config_fails_at_start(self, flag, message):
    with tempfile.TemporaryDirectory() as workdir:
      proc = launch("--config=experiments/configs/test.py", f"--workdir={workdir}", flag)
      self.assertFalse((pathlib.Path(workdir) / "checkpoints").exists())
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn(message, proc.stderr)

  def test_every_method_runs(self):
    config = test_config.get_config()
    config.seeds = (0,)
    config.train.epochs = 2
    config.finetune.epochs = 1
    config.prune.methods = ("random", "saliency", "taylor", "global_magnitude",
                            "std_threshold", "evolution_paper", "bezier")
    config.prune.target_sparsity = 0.5
    with tempfile.TemporaryDirectory() as workdir:
      summary = pipeline.run(config, workdir)
    rows = {r["method"]: r for r in summary["results"]}
    self.assertEqual(set(rows), {"dense", *config.prune.methods})
    for name in ("random", "saliency", "taylor", "global_magnitude"):
      self.assertAlmostEqual(rows[name]["sparsity"]["global"], 0.5, delta=0.005)
    # The paper's rules stop at the first r of their grid that reaches the target (they may
    # overshoot); Bezier reaches it in turns, never above it.
    self.assertGreaterEqual(rows["std_threshold"]["sparsity"]["global"], 0.45)
    self.assertLessEqual(rows["bezier"]["sparsity"]["global"], 0.5 + 1e-6)
    self.assertGreater(rows["bezier"]["sparsity"]["global"], 0.4)

  def test_pruning_during_training(self):
    config = test_config.get_config()
    config.seeds = (0,)
    config.train.epochs = 3
    config.prune.when = "during"
    config.prune.methods = ("evolution", "movement")
    config.prune.target_sparsity = (0.5, 0.8)
    config.prune.frequency = 5
    with tempfile.TemporaryDirectory() as workdir:
      summary = pipeline.run(config, workdir)
    for r in summary["results"]:
      if r["method"] != "dense":
        for value in r["sparsity"]["per_layer"].values():
          self.assertAlmostEqual(value, r["target_sparsity"], delta=0.01)

  def test_allocation_study(self):
    config = test_config.get_config()
    config.study = "allocation"
    config.seeds = (0,)
    config.train.epochs = 3
    config.finetune.epochs = 1
    config.prune.target_sparsity = (0.9,)
    config.search.population_size = 6
    config.search.generations = 3
    config.search.fitness_examples = 10_000  # the whole validation split
    with tempfile.TemporaryDirectory() as workdir:
      summary = allocation_study.run(config, workdir)
      files = {p.name for p in pathlib.Path(workdir).iterdir()}
    self.assertTrue({"summary.json", "search_history.json", "search_fitness.png",
                     "per_layer_allocation.png", "report.md"} <= files, files)
    rows = {r["method"]: r for r in summary["results"]}
    names = ("uniform", "global", "erk", "evolutionary")
    self.assertEqual(set(rows), {"dense", *(f"alloc:{n}" for n in names),
                                 *(f"alloc:{n}+ft" for n in names)})
    for n in names:
      self.assertAlmostEqual(rows[f"alloc:{n}"]["sparsity"]["global"], 0.9, delta=0.002)
    # Elitist and seeded with the others, on the validation split it cannot do worse.
    best_heuristic = max(rows[f"alloc:{n}"]["val_accuracy"]["mean"] for n in names[:3])
    self.assertGreaterEqual(rows["alloc:evolutionary"]["val_accuracy"]["mean"], best_heuristic)

  def test_evolutionary_allocation_in_the_pipeline(self):
    config = test_config.get_config()
    config.seeds = (0,)
    config.train.epochs = 2
    config.finetune.epochs = 1
    config.prune.methods = ("evolution",)
    config.prune.allocation = "evolutionary"
    config.search.population_size = 4
    config.search.generations = 2
    with tempfile.TemporaryDirectory() as workdir:
      summary = pipeline.run(config, workdir)
    row = [r for r in summary["results"] if r["method"] == "evolution"][0]
    self.assertAlmostEqual(row["sparsity"]["global"], 0.9, delta=0.002)

  def test_evolutionary_allocation_during_training_searches_again(self):
    config = test_config.get_config()
    config.seeds = (0,)
    config.train.epochs = 4
    config.prune.when = "during"
    config.prune.methods = ("evolution",)
    config.prune.target_sparsity = (0.8,)
    config.prune.allocation = "evolutionary"
    config.prune.begin_epoch = 0.25  # epoch 1: search on weights trained for an epoch
    config.prune.end_epoch = 0.75  # the last mask update is in epoch 3
    config.prune.frequency = 5
    config.search.population_size = 4
    config.search.generations = 2
    config.search.research_every_epochs = 1
    with tempfile.TemporaryDirectory() as workdir:
      summary = pipeline.run(config, workdir)
      checkpoints = {p.name for p in (pathlib.Path(workdir) / "checkpoints" / "seed0").iterdir()}
    # Searches at epochs 1 and 2 (masks change until epoch 3): a segment up to each.
    self.assertEqual({p for p in checkpoints if p.startswith("evolution")},
                     {"evolution@0.8-to1", "evolution@0.8-to2", "evolution@0.8"})
    row = [r for r in summary["results"] if r["method"] == "evolution"][0]
    self.assertAlmostEqual(row["sparsity"]["global"], 0.8, delta=0.002)
    per_layer = list(row["sparsity"]["per_layer"].values())
    self.assertGreater(max(per_layer) - min(per_layer), 0.01)  # not the uniform allocation

  def test_finetune_by_distillation(self):
    config = test_config.get_config()
    config.seeds = (0,)
    config.train.epochs = 2
    config.finetune.epochs = 1
    config.prune.methods = ("magnitude",)
    config.distill.enabled = True
    with tempfile.TemporaryDirectory() as workdir:
      summary = pipeline.run(config, workdir)
      stages = {p.name for p in (pathlib.Path(workdir) / "checkpoints" / "seed0").iterdir()}
    self.assertIn("magnitude@0.9", stages)  # the distilled fine-tune's checkpoints
    row = [r for r in summary["results"] if r["method"] == "magnitude"][0]
    self.assertAlmostEqual(row["sparsity"]["global"], 0.9, delta=0.002)
    self.assertGreater(row["val_accuracy"]["mean"], 0.2)  # 2 + 1 epochs; chance is 0.1
    config.distill.alpha = 1.5
    with self.assertRaisesRegex(ValueError, "alpha"):
      checks.validate(config)

  def test_configs_validate(self):
    for config in (default.get_config(), test_config.get_config()):
      checks.validate(config)

  def test_paper_rules_need_after(self):
    config = test_config.get_config()
    config.prune.when = "during"
    config.prune.methods = ("bezier",)
    with self.assertRaisesRegex(ValueError, "when='after'"):
      checks.validate(config)


if __name__ == "__main__":
  absltest.main()
