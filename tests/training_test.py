"""Tests for evoprune.training: compiled epochs, resume equivalence, the NaN stop."""

import dataclasses
import json
import pathlib
import re
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import evoprune as ep
from evoprune import training


class TinyMLP(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))


def blobs(n: int, seed: int) -> ep.data.Split:
  """Three separable Gaussian blobs in 4-D."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n).astype(np.int32)
  centers = np.eye(3, 4, dtype=np.float32) * 3.0
  x = centers[y] + rng.normal(size=(n, 4)).astype(np.float32)
  return ep.data.Split(x=x, y=y)


DATASET = ep.data.Dataset(name="blobs", num_classes=3, input_shape=(4,),
                          train=blobs(256, 0), val=blobs(64, 1), test=blobs(64, 2))


def make(lr: float = 0.05, epochs: int = 4):
  model = TinyMLP()
  tx = optax.sgd(training.learning_rate_schedule("cosine", lr, epochs * 8), momentum=0.9)
  state = training.create_train_state(model, tx, jax.random.key(0), jnp.zeros((1, 4)))
  config = training.FitConfig(epochs=epochs, batch_size=32, seed=3, progress=False,
                              checkpoint_every_epochs=1, eval_every_epochs=1)
  return model, tx, state, config


class Interrupt(Exception):
  pass


def cross_entropy_objective(logits, y, x, objective_args):
  """The default loss as an `objective`; objective_args is a scale of 1."""
  del x
  return training.cross_entropy(logits, y) * objective_args


class TrainingTest(parameterized.TestCase):

  def test_fit_learns_and_logs(self):
    model, tx, state, config = make()
    with tempfile.TemporaryDirectory() as workdir:
      state, last = training.fit(model, tx, state, DATASET, config, workdir=workdir)
      events = [json.loads(l) for l in
                (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    self.assertEqual(int(state.step), 4 * 8)
    self.assertGreater(last["val_accuracy"], 0.9)
    self.assertEqual([e["epoch"] for e in events], [1, 2, 3, 4])

  def test_epoch_compiles_once(self):
    model, tx, state, _ = make()
    train_epoch = training.make_train_epoch(model, tx)
    x, y = jnp.asarray(DATASET.train.x), jnp.asarray(DATASET.train.y)
    idx = jnp.asarray(ep.data.epoch_batch_indices(256, 32, seed=0, epoch=0))
    state, _ = train_epoch(state, x, y, idx)
    idx = jnp.asarray(ep.data.epoch_batch_indices(256, 32, seed=0, epoch=1))
    state, metrics = train_epoch(state, x, y, idx)
    self.assertEqual(train_epoch._cache_size(), 1)  # pylint: disable=protected-access
    self.assertEqual(metrics["loss"].shape, (8,))

  def test_programs_are_memoized_per_ops_mode(self):
    model, tx, _, _ = make()
    for make_program in (lambda: training.make_train_epoch(model, tx),
                         lambda: training.make_seeds_train_epoch(model, tx),
                         lambda: training.make_evaluate(model)):
      auto = make_program()
      self.assertIs(make_program(), auto)
      with ep.ops.use("xla"):
        plain = make_program()
        self.assertIs(make_program(), plain)
      self.assertIsNot(plain, auto)

  def test_objective_equal_to_cross_entropy_gives_identical_params(self):
    model, tx, state, config = make()
    config = dataclasses.replace(config, steps_per_call=3)  # calls of 3, 3 and 2 steps
    default, _ = training.fit(model, tx, state, DATASET, config)
    custom, _ = training.fit(model, tx, state, DATASET, config,
                             objective=cross_entropy_objective, objective_args=jnp.float32(1))
    for want, got in zip(jax.tree.leaves(default.params), jax.tree.leaves(custom.params)):
      np.testing.assert_array_equal(want, got)

  @parameterized.named_parameters(("default", None), ("objective", cross_entropy_objective))
  def test_one_step_call_compiles_without_a_loop(self, objective):
    # XLA:CPU runs a backward pass slower inside a loop body (compression_study.py).
    model, tx, state, _ = make()
    train_epoch = training.make_train_epoch(model, tx, objective=objective)
    x, y = jnp.asarray(DATASET.train.x), jnp.asarray(DATASET.train.y)
    args = None if objective is None else jnp.float32(1)
    hlo = lambda steps: train_epoch.lower(state, x, y, jnp.zeros((steps, 32), jnp.int32),
                                          args).compile().as_text()
    loop = re.compile(r"\swhile\(")  # the instruction, not "while/body" in op names
    self.assertIsNotNone(loop.search(hlo(2)))
    self.assertIsNone(loop.search(hlo(1)))
    _, metrics = train_epoch(state, x, y, jnp.zeros((1, 32), jnp.int32), args)
    self.assertEqual(metrics["loss"].shape, (1,))

  def test_resume_gives_identical_results(self):
    model, tx, state, config = make()
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
      full, full_eval = training.fit(model, tx, state, DATASET, config, workdir=a)

      def stop_after_two(state, event):
        if event["epoch"] == 2:
          raise Interrupt()

      _, _, state2, _ = make()
      with self.assertRaises(Interrupt):
        training.fit(model, tx, state2, DATASET, config, workdir=b,
                     on_epoch_end=stop_after_two)
      _, _, fresh, _ = make()  # a new process would start from a fresh state
      resumed, resumed_eval = training.fit(model, tx, fresh, DATASET, config, workdir=b)
      events_a = (pathlib.Path(a) / "metrics.jsonl").read_text().splitlines()
      events_b = (pathlib.Path(b) / "metrics.jsonl").read_text().splitlines()
    for want, got in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
      np.testing.assert_array_equal(want, got)
    self.assertEqual(full_eval["val_accuracy"], resumed_eval["val_accuracy"])
    self.assertEqual(full_eval["val_loss"], resumed_eval["val_loss"])
    strip = lambda lines: [{k: v for k, v in json.loads(l).items() if k != "time"}
                           for l in lines]
    self.assertEqual(strip(events_a), strip(events_b))

  def test_resume_mid_epoch_from_step_checkpoints(self):
    model, tx, state, config = make()
    config = dataclasses.replace(config, steps_per_call=3, checkpoint_every_steps=5)
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
      full, _ = training.fit(model, tx, state, DATASET, config, workdir=a)

      def stop_after_two(state, event):
        if event["epoch"] == 2:
          raise Interrupt()

      with self.assertRaises(Interrupt):
        training.fit(model, tx, make()[2], DATASET, config, workdir=b,
                     on_epoch_end=stop_after_two)
      # Calls end at steps 3, 6, 8, 11, 14, 16; checkpoints where a multiple of 5 is
      # passed: 6, 11, 16. Drop 16, as if the process died before writing it: the run
      # resumes from step 11, in the middle of epoch 2.
      checkpoints = pathlib.Path(b) / "checkpoints" / "train"
      self.assertEqual(sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()),
                       [11, 16])
      shutil.rmtree(checkpoints / "16")
      resumed, _ = training.fit(model, tx, make()[2], DATASET, config, workdir=b)
      strip = lambda d: [{k: v for k, v in json.loads(l).items() if k != "time"}
                         for l in (pathlib.Path(d) / "metrics.jsonl").read_text().splitlines()]
      events_a, events_b = strip(a), strip(b)
    for want, got in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
      np.testing.assert_array_equal(want, got)
    self.assertEqual(events_a, events_b)
    self.assertEqual([e["step"] for e in events_a][:4], [3, 6, 8, 11])

  def test_non_finite_loss_stops_and_keeps_checkpoint(self):
    model, tx, state, config = make(lr=1e6)
    with tempfile.TemporaryDirectory() as workdir:
      with self.assertRaisesRegex(training.NonFiniteLossError, r"non-finite loss at step \d+"):
        training.fit(model, tx, state, DATASET, config, workdir=workdir)
      checkpoints = list((pathlib.Path(workdir) / "checkpoints" / "train").iterdir())
    # Whatever was saved before the blow-up is still there (possibly nothing if epoch 1 failed).
    self.assertTrue(all(p.name.isdigit() for p in checkpoints if not p.name.startswith(".")))

  @parameterized.named_parameters(("sgd", "sgd"), ("adam", "adam"), ("adamw", "adamw"))
  def test_optimizers(self, name):
    tx = training.make_optimizer(name, 0.1, weight_decay=1e-4)
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    self.assertTrue(np.all(np.asarray(updates["w"]) < 0))

  def test_unknown_optimizer_and_schedule(self):
    with self.assertRaisesRegex(ValueError, "optimizer='rmsprop'"):
      training.make_optimizer("rmsprop", 0.1)
    with self.assertRaisesRegex(ValueError, "lr_schedule='exp'"):
      training.learning_rate_schedule("exp", 0.1, 10)

  def test_step_schedule_and_warmup(self):
    s = training.learning_rate_schedule("step", 1.0, 100, warmup_steps=20)
    self.assertAlmostEqual(float(s(10)), 0.5)
    self.assertAlmostEqual(float(s(25)), 1.0)
    self.assertAlmostEqual(float(s(20 + 41)), 0.1)
    self.assertAlmostEqual(float(s(20 + 61)), 0.01, places=6)

  def test_evaluate_is_exact_with_padding(self):
    model, _, state, _ = make()
    evaluate = training.make_evaluate(model, batch_size=30)  # 64 = 2*30 + 4 padded
    got = evaluate(state.params, state.batch_stats, jnp.asarray(DATASET.val.x),
                   jnp.asarray(DATASET.val.y))
    logits = model.apply({"params": state.params}, jnp.asarray(DATASET.val.x))
    want = np.mean(np.argmax(np.asarray(logits), -1) == DATASET.val.y)
    self.assertAlmostEqual(float(got["accuracy"]), want, places=6)


if __name__ == "__main__":
  absltest.main()
