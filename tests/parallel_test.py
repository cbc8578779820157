"""Tests for evoprune.parallel and the scale-out paths of evoprune.training.

Multi-device checks run in subprocesses that force 8 CPU devices before JAX starts; the
multi-host check runs two processes that join one job over loopback (gloo collectives).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

import evoprune as ep
from evoprune import parallel
from evoprune import training

REPO = pathlib.Path(__file__).resolve().parents[1]

# Shared by this process and the subprocesses: tiny data and models.
COMMON = textwrap.dedent("""
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np, optax
    import evoprune as ep
    from evoprune import parallel, training

    def split(n, seed):
      rng = np.random.default_rng(seed)
      y = rng.integers(0, 3, n).astype(np.int32)
      x = (np.eye(3, 4)[y] * 3 + rng.normal(size=(n, 4))).astype(np.float32)
      return ep.data.Split(x=x, y=y)

    DATASET = ep.data.Dataset(name="blobs", num_classes=3, input_shape=(4,),
                              train=split(64, 0), val=split(16, 1), test=split(16, 2))

    class Mlp(nn.Module):
      @nn.compact
      def __call__(self, x, train=False):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(3)(nn.relu(nn.Dense(64)(x)))

    class ConvBN(nn.Module):  # batch norm: statistics over the whole (split) batch
      @nn.compact
      def __call__(self, x, train=False):
        x = x.reshape((x.shape[0], 2, 2, 1))
        x = ep.models.layers.Conv(4, (2, 2), padding="SAME")(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(nn.relu(x).reshape((x.shape[0], -1)))

    def run(model, mesh=None, rule="replicate", epochs=2, workdir=None, teacher=None):
      tx = optax.sgd(0.1, momentum=0.9)
      state = training.create_train_state(model, tx, jax.random.key(0), jnp.zeros((1, 4)))
      config = training.FitConfig(epochs=epochs, batch_size=16, seed=1, progress=False)
      objective, objective_args = (ep.distillation.objective(teacher, temperature=2.0)
                                   if teacher is not None else (None, None))
      return training.fit(model, tx, state, DATASET, config, mesh=mesh, sharding_rule=rule,
                          workdir=workdir, objective=objective, objective_args=objective_args)

    def flat(state):
      return np.concatenate([np.asarray(l, np.float64).ravel()
                             for l in jax.tree.leaves((state.params, state.batch_stats))])
""")

EIGHT_DEVICES = COMMON + textwrap.dedent("""
    import json
    assert jax.device_count() == 8, jax.devices()
    mesh = parallel.data_mesh()
    out = {}
    for name, model in (("mlp", Mlp()), ("convbn", ConvBN())):
      one, one_eval = run(model)
      for rule in ("replicate", "fsdp"):
        many, many_eval = run(model, mesh, rule)
        out[f"{name}/{rule}"] = dict(
            diff=float(np.abs(flat(one) - flat(many)).max()),
            scale=float(np.abs(flat(one)).max()),
            val_diff=abs(one_eval["val_loss"] - many_eval["val_loss"]),
            devices=len(many.params["Dense_0"]["kernel"].sharding.device_set))
    # Distillation: the teacher's variables are replicated, its logits split with the batch.
    dense, _ = run(ConvBN())
    teacher = ep.distillation.Teacher(ConvBN(), dense.params, dense.batch_stats)
    one, one_eval = run(Mlp(), teacher=teacher)
    many, many_eval = run(Mlp(), mesh, teacher=teacher)
    out["distill/replicate"] = dict(
        diff=float(np.abs(flat(one) - flat(many)).max()), scale=float(np.abs(flat(one)).max()),
        val_diff=abs(one_eval["val_loss"] - many_eval["val_loss"]),
        devices=len(many.params["Dense_0"]["kernel"].sharding.device_set))
    # The epoch compiles once: a third epoch reuses the program of the first two.
    epoch = training.make_train_epoch(Mlp(), optax.sgd(0.1), mesh=mesh)
    state = training.create_train_state(Mlp(), optax.sgd(0.1), jax.random.key(0),
                                        jnp.zeros((1, 4)))
    state = parallel.put(state, parallel.tree_shardings(state, mesh))
    x = parallel.global_array(DATASET.train.x, parallel.replicated(mesh))
    y = parallel.global_array(DATASET.train.y, parallel.replicated(mesh))
    for e in range(3):
      idx = ep.data.epoch_batch_indices(64, 16, seed=0, epoch=e)
      state, _ = epoch(state, x, y,
                       parallel.global_array(idx, parallel.batch_sharding(mesh, 2, 1)))
    out["compiles"] = epoch._cache_size()
    out["specs"] = {str(shape): str(parallel.leaf_spec(np.zeros(shape), mesh, "fsdp"))
                    for shape in ((256, 64), (64, 32), (3, 5), (128, 128), (7, 3000))}
    print("RESULT " + json.dumps(out))
""")

WORKER = COMMON + textwrap.dedent("""
    import json, sys
    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    parallel.initialize(f"localhost:{port}", 2, process_id)
    state, last = run(Mlp(), parallel.data_mesh(), workdir=workdir)
    print("RESULT " + json.dumps(dict(
        processes=jax.process_count(), devices=jax.device_count(),
        writer=parallel.is_writer(), params=flat(state).tolist(),
        val_loss=last["val_loss"])))
    jax.distributed.shutdown()
""")


def _result(proc: subprocess.CompletedProcess) -> dict:
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  raise AssertionError(f"no result; exit {proc.returncode}\n{proc.stderr[-3000:]}")


def _env(**extra: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)
  env.pop("XLA_FLAGS", None)
  env.update(extra)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


namespace: dict = {}
exec(COMMON, namespace)  # pylint: disable=exec-used


class DataParallelTest(absltest.TestCase):

  def test_eight_devices_match_one(self):
    proc = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES], capture_output=True, text=True, timeout=600,
        cwd=REPO, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    out = _result(proc)
    for key in ("mlp/replicate", "mlp/fsdp", "convbn/replicate", "convbn/fsdp",
                "distill/replicate"):
      with self.subTest(key):
        self.assertLess(out[key]["diff"], 1e-5 * out[key]["scale"])
        self.assertLess(out[key]["val_diff"], 1e-5)
        self.assertEqual(out[key]["devices"], 8)
    self.assertEqual(out["compiles"], 1)
    self.assertEqual(out["specs"], {
        "(256, 64)": "P('data', None)",  # 16384 entries: the largest axis divisible by 8
        "(64, 32)": "P()",               # 2048 entries: below FSDP_MIN_SIZE, replicated
        "(3, 5)": "P()",
        "(128, 128)": "P('data', None)",  # a tie: the first axis
        "(7, 3000)": "P(None, 'data')",   # 7 is not divisible by 8
    })

  def test_two_processes_on_loopback(self):
    port = str(_free_port())
    with tempfile.TemporaryDirectory() as workdir:
      env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
      procs = [subprocess.Popen(
          [sys.executable, "-c", WORKER, str(i), port, workdir], cwd=REPO, env=env,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
      outs = []
      for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        outs.append(_result(subprocess.CompletedProcess(proc.args, proc.returncode, stdout,
                                                        stderr)))
      events = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    self.assertEqual([o["processes"] for o in outs], [2, 2])
    self.assertEqual([o["devices"] for o in outs], [4, 4])
    self.assertEqual([o["writer"] for o in outs], [True, False])
    self.assertLen(events, 2)  # one evaluation per epoch, written by process 0 only
    reference, _ = namespace["run"](namespace["Mlp"]())
    for out in outs:
      np.testing.assert_allclose(out["params"], namespace["flat"](reference), atol=1e-5)


class SeedsTest(parameterized.TestCase):

  def test_fit_seeds_matches_separate_runs(self):
    model, tx = namespace["Mlp"](), optax.sgd(0.1, momentum=0.9)
    dataset = namespace["DATASET"]
    seeds = (3, 5, 8)
    config = training.FitConfig(epochs=2, batch_size=16, progress=False)
    init = [training.create_train_state(model, tx, jax.random.key(s), jnp.zeros((1, 4)))
            for s in seeds]
    with tempfile.TemporaryDirectory() as workdir:
      stacked, evals = training.fit_seeds(model, tx, parallel.stack(init), dataset, config,
                                          seeds, workdir=workdir, stage="dense")
      events = [json.loads(l) for l in
                (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    self.assertEqual(sorted({e["stage"] for e in events}),
                     ["dense/seed3", "dense/seed5", "dense/seed8"])
    for i, seed in enumerate(seeds):
      alone, alone_eval = training.fit(model, tx, init[i], dataset,
                                       training.FitConfig(epochs=2, batch_size=16, seed=seed,
                                                          progress=False))
      for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(parallel.unstack(stacked, i))):
        np.testing.assert_allclose(a, b, atol=1e-5)
      self.assertAlmostEqual(alone_eval["val_loss"], evals[i]["val_loss"], places=5)
      self.assertEqual(evals[i]["stage"], f"dense/seed{seed}")
    # Different seeds really trained differently.
    self.assertFalse(np.allclose(*(parallel.unstack(stacked.params, i)["Dense_0"]["kernel"]
                                   for i in (0, 1))))

  def test_fit_seeds_rejects_mismatched_seeds(self):
    model, tx = namespace["Mlp"](), optax.sgd(0.1)
    state = training.create_train_state(model, tx, jax.random.key(0), jnp.zeros((1, 4)))
    config = training.FitConfig(epochs=1, batch_size=16, progress=False)
    with self.assertRaisesRegex(ValueError, "one stacked state per seed"):
      training.fit_seeds(model, tx, parallel.stack([state, state]), namespace["DATASET"],
                         config, seeds=(0, 1, 2))

  @parameterized.named_parameters(
      ("mlp_vmaps", "lenet300_100", (2, 28, 28, 1), 3, "vmap"),
      ("one_seed_is_sequential", "lenet300_100", (2, 28, 28, 1), 1, "sequential"),
      ("conv_is_sequential", "lenet5", (2, 32, 32, 3), 3, "sequential"),
      ("too_big_is_sequential", "lenet300_100", (2, 28, 28, 1), 8, "sequential"),
  )
  def test_seed_strategy(self, name, shape, seeds, expected):
    model = ep.models.create(name)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    self.assertEqual(parallel.seed_strategy(model, x, seeds), expected)
    self.assertEqual(parallel.seed_strategy(model, x, seeds, "vmap"), "vmap")

  def test_stack_and_unstack(self):
    trees = [{"a": jnp.full((2,), i), "b": (jnp.asarray(i),)} for i in range(3)]
    stacked = parallel.stack(trees)
    self.assertEqual(stacked["a"].shape, (3, 2))
    np.testing.assert_array_equal(parallel.unstack(stacked, 2)["a"], [2, 2])
    self.assertEqual(int(parallel.unstack(stacked, 1)["b"][0]), 1)


class ValidationTest(absltest.TestCase):

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "seed strategy"):
      parallel.seed_strategy(namespace["Mlp"](), jnp.zeros((1, 4)), 2, "pmap")
    with self.assertRaisesRegex(ValueError, "sharding rule"):
      parallel.check_rule("zero3")
    with self.assertRaisesRegex(ValueError, "together"):
      parallel.initialize("localhost:1234")
    with self.assertRaisesRegex(ValueError, "process_id=2"):
      parallel.initialize("localhost:1234", 2, 2)
    with self.assertRaisesRegex(ValueError, "count=0"):
      parallel.use_cpu_devices(0)

  def test_cpu_devices_are_fixed_once_jax_runs(self):
    jnp.zeros(1).block_until_ready()
    with self.assertRaisesRegex(RuntimeError, "already initialised"):
      parallel.use_cpu_devices(2)

  def test_one_device_mesh_runs_the_plain_program(self):
    out, last = namespace["run"](namespace["Mlp"](), parallel.data_mesh(jax.devices()[:1]))
    reference, reference_eval = namespace["run"](namespace["Mlp"]())
    np.testing.assert_allclose(namespace["flat"](out), namespace["flat"](reference), atol=1e-6)
    self.assertAlmostEqual(last["val_loss"], reference_eval["val_loss"], places=6)
    self.assertTrue(parallel.is_writer())


if __name__ == "__main__":
  absltest.main()
