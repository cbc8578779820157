"""Scale-out in the experiment pipeline: the dense seeds as one vmapped program, data
parallelism over forced CPU devices through experiments/main.py, and the config checks."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax._src import test_util as jtu
import jax.numpy as jnp
import numpy as np

import evoprune as ep
from evoprune import parallel
from experiments import checks
from experiments import pipeline
from experiments.configs import test as test_config

REPO = pathlib.Path(__file__).resolve().parents[1]
# The per-seed results the comparisons read (results/seed<s>/<name>.json).
RESULTS = ("dense", "evolution@0.9")
METRICS = ("val_accuracy", "test_accuracy", "val_loss", "test_loss")


def small_config(strategy: str):
  """The test config cut to what these checks need: 2 seeds, one pruning method."""
  config = test_config.get_config()
  config.seeds = (0, 1)
  config.train.epochs = 2
  config.train.checkpoint_every_epochs = 2  # orbax saves cost more than these epochs
  config.finetune.epochs = 1
  config.prune.methods = ("evolution",)
  config.train.seeds_in_one_program = strategy
  return config


def config_flags(strategy: str) -> list[str]:
  """`small_config(strategy)` as command-line overrides of configs/test.py."""
  return ["--config=experiments/configs/test.py", "--config.seeds=(0,1)",
          "--config.train.epochs=2", "--config.train.checkpoint_every_epochs=2",
          "--config.finetune.epochs=1",
          "--config.prune.methods=('evolution',)",
          f"--config.train.seeds_in_one_program={strategy}"]


def read_results(workdir: pathlib.Path) -> dict[str, dict]:
  return {f"seed{s}/{name}": json.loads((workdir / "results" / f"seed{s}" / f"{name}.json")
                                        .read_text())
          for s in (0, 1) for name in RESULTS}


class PipelineScaleOutTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    root = pathlib.Path(cls._tmp.name)
    cls.dirs = {name: root / name for name in ("sequential", "vmap", "data_parallel")}
    # The 2-device run goes through the launcher in its own process (the device count is
    # fixed when JAX starts); it runs while this process trains the other two.
    # Unoptimised, as this module (tests/conftest.py).
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    env.pop("XLA_FLAGS", None)
    cls.proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.main", *config_flags("auto"),
         "--config.parallel.data_parallel=True", "--config.parallel.cpu_devices=2",
         f"--workdir={cls.dirs['data_parallel']}", "--verbosity=0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cls.summaries = {name: pipeline.run(small_config(name), cls.dirs[name])
                     for name in ("sequential", "vmap")}
    cls.stdout, cls.stderr = cls.proc.communicate(timeout=600)

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def test_vmap_seeds_match_sequential_seeds(self):
    # The vmapped program really ran: one stacked checkpoint, no per-seed dense ones.
    self.assertTrue((self.dirs["vmap"] / "checkpoints" / "seeds0-1" / "dense").is_dir())
    self.assertFalse((self.dirs["vmap"] / "checkpoints" / "seed0" / "dense").exists())
    self.assertTrue((self.dirs["sequential"] / "checkpoints" / "seed0" / "dense").is_dir())
    sequential, vmapped = (read_results(self.dirs[name]) for name in ("sequential", "vmap"))
    for stage, result in sequential.items():
      for metric in METRICS:
        self.assertAlmostEqual(vmapped[stage][metric], result[metric], delta=1e-5,
                               msg=f"{stage} {metric}")
    # The seeds differ, so equal results are not one seed twice.
    self.assertNotEqual(sequential["seed0/dense"]["val_loss"],
                        sequential["seed1/dense"]["val_loss"])
    # Every seed's dense events are logged under its own stage, as when sequential.
    stages = {json.loads(line)["stage"] for line in
              (self.dirs["vmap"] / "metrics.jsonl").read_text().splitlines()}
    self.assertLessEqual({"seed0/dense", "seed1/dense"}, stages)

  def test_vmap_run_resumes_from_the_stacked_checkpoint(self):
    workdir = self.dirs["vmap"]
    before = read_results(workdir)
    events = (workdir / "metrics.jsonl").read_text()
    for name in RESULTS:  # seed 1 is recomputed; seed 0 is all cached and asks for nothing
      (workdir / "results" / "seed1" / f"{name}.json").unlink()
    pipeline.run(small_config("vmap"), workdir)
    after = read_results(workdir)
    for stage, result in before.items():
      for metric in METRICS:
        self.assertAlmostEqual(after[stage][metric], result[metric], delta=1e-6)
    # Restored, not retrained: no new training events.
    self.assertEqual((workdir / "metrics.jsonl").read_text(), events)

  def test_data_parallel_on_two_devices_matches_one(self):
    self.assertEqual(self.proc.returncode, 0, self.stderr[-3000:])
    self.assertIn("CpuDevice(id=1)", self.stderr)  # main.py applied cpu_devices=2
    # 'auto' never vmaps a data-parallel run: the per-seed dense checkpoints exist.
    self.assertTrue((self.dirs["data_parallel"] / "checkpoints" / "seed1" / "dense").is_dir())
    one = read_results(self.dirs["sequential"])
    two = read_results(self.dirs["data_parallel"])
    for stage, result in one.items():
      for metric in ("val_loss", "test_loss"):
        self.assertAlmostEqual(two[stage][metric], result[metric], delta=1e-4,
                               msg=f"{stage} {metric}")
      for metric in ("val_accuracy", "test_accuracy"):  # at most one example flips
        self.assertAlmostEqual(two[stage][metric], result[metric], delta=0.006,
                               msg=f"{stage} {metric}")
    summary = json.loads((self.dirs["data_parallel"] / "summary.json").read_text())
    self.assertEqual([r["method"] for r in summary["results"]],
                     [r["method"] for r in self.summaries["sequential"]["results"]])


class SeedStrategyTest(parameterized.TestCase):
  """The pieces train_dense uses: `parallel.stack`/`unstack` and the 'auto' rule."""

  def test_stack_and_unstack_compile_nothing(self):
    trees = [{"w": jnp.full((2, 3), float(i)), "step": jnp.asarray(i, jnp.int32),
              "key": jax.random.key(i)} for i in range(3)]
    stacked = parallel.stack(trees)  # typed keys stay on the device (compiled once, here)
    self.assertEqual(stacked["w"].shape, (3, 2, 3))
    parallel.unstack(stacked, 0)
    with jtu.count_jit_and_pmap_lowerings() as count:
      again = parallel.stack(trees)
      seeds = [parallel.unstack(stacked, i) for i in (0, 1, 2, -1)]
    self.assertEqual(count(), 0)  # host copies: no program per leaf shape or per seed
    np.testing.assert_array_equal(again["w"], stacked["w"])
    self.assertEqual([int(s["step"]) for s in seeds], [0, 1, 2, 2])
    np.testing.assert_array_equal(seeds[1]["w"], np.ones((2, 3)))
    np.testing.assert_array_equal(jax.random.key_data(seeds[2]["key"]),
                                  jax.random.key_data(jax.random.key(2)))
    with self.assertRaisesRegex(IndexError, "index=3"):
      parallel.unstack(stacked, 3)

  @parameterized.named_parameters(
      ("mlp_on_cpu", "lenet300_100", 3, "cpu", "vmap"),
      ("conv_on_cpu", "lenet5", 3, "cpu", "sequential"),  # measured 1.81x slower vmapped
      ("conv_on_gpu", "lenet5", 3, "gpu", "vmap"),  # measured 0.74 of sequential on an H200
      ("one_seed", "lenet5", 1, "gpu", "sequential"),
  )
  def test_auto_strategy_by_backend(self, name, seeds, backend, expected):
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    self.assertEqual(parallel.seed_strategy(ep.models.create(name), x, seeds, backend=backend),
                     expected)


class ValidationTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("strategy", "train.seeds_in_one_program", "pmap", "seeds_in_one_program='pmap'"),
      ("rule", "parallel.sharding_rule", "zero3", "sharding_rule='zero3'"),
      ("cpu_devices", "parallel.cpu_devices", -1, "cpu_devices=-1"),
      ("vmap_and_data_parallel", "parallel.data_parallel", True, "cannot be combined"),
      ("processes_without_coordinator", "parallel.num_processes", 2, "coordinator_address"),
      ("duplicate_seeds", "seeds", (0, 0), "repeats a seed"),
  )
  def test_bad_value_is_named(self, field, value, message):
    config = small_config("vmap")
    section, _, name = field.rpartition(".")
    setattr(config[section] if section else config, name, value)
    with self.assertRaisesRegex(ValueError, message):
      checks.validate(config)

  @parameterized.named_parameters(
      ("no_process_count", 0, 0, False, "num_processes=0"),
      ("id_out_of_range", 2, 2, True, "process_id=2"),
      ("not_data_parallel", 2, 1, False, "data_parallel=True"),
  )
  def test_bad_multi_host_fields(self, num_processes, process_id, data_parallel, message):
    config = small_config("auto")
    config.parallel.coordinator_address = "localhost:1234"
    config.parallel.num_processes = num_processes
    config.parallel.process_id = process_id
    config.parallel.data_parallel = data_parallel
    with self.assertRaisesRegex(ValueError, message):
      checks.validate_parallel(config)

  def test_multi_host_fields_pass(self):
    config = small_config("auto")
    config.parallel.coordinator_address = "localhost:1234"
    config.parallel.num_processes = 2
    config.parallel.process_id = 1
    config.parallel.data_parallel = True
    checks.validate(config)


if __name__ == "__main__":
  absltest.main()
