"""Tests for distillation: Hinton et al.'s loss by hand, the objective in training.fit."""

import dataclasses
import functools
import math
import pathlib
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import evoprune as ep
from evoprune import distillation as kd
from evoprune import training


class _MLP(nn.Module):
  width: int = 16

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Dense(self.width)(x.reshape((x.shape[0], -1))))
    return nn.Dense(3)(x)


def _dataset(n=96):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 6)).astype(np.float32)
  y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0)).astype(np.int32)
  split = lambda a, b: ep.data.Split(x[a:b], y[a:b])
  return ep.data.Dataset("toy", 3, (6,), split(0, 64), split(64, 80), split(80, 96))


class KdLossTest(parameterized.TestCase):

  @parameterized.named_parameters(("t1", 1.0), ("t2", 2.0))
  def test_soft_term_by_hand(self, temperature):
    # Uniform teacher over 2 classes; student logits (ln 3, 0): q1 = 3^(1/T) / (3^(1/T) + 1).
    q1 = 3 ** (1 / temperature) / (3 ** (1 / temperature) + 1)
    kl = 0.5 * math.log(0.5 / q1) + 0.5 * math.log(0.5 / (1 - q1))
    loss = kd.kd_loss(jnp.array([[math.log(3.0), 0.0]]), jnp.zeros((1, 2)), jnp.array([0]),
                      temperature=temperature, alpha=1.0)
    self.assertAlmostEqual(float(loss), temperature ** 2 * kl, places=6)

  def test_alpha_zero_is_cross_entropy(self):
    s = jnp.array([[2.0, -1.0, 0.5], [0.0, 1.0, 0.0]])
    y = jnp.array([0, 2])
    expected = optax.softmax_cross_entropy_with_integer_labels(s, y).mean()
    loss = kd.kd_loss(s, jnp.array([[9.0, 0.0, 0.0]] * 2), y, temperature=3.0, alpha=0.0)
    self.assertAlmostEqual(float(loss), float(expected), places=6)

  def test_gradients(self):
    # d/ds of T^2 KL = T (softmax(s/T) - softmax(t/T)) / B; the teacher gets no gradient.
    s = jnp.array([[1.0, 0.0, -1.0]])
    t = jnp.array([[0.0, 2.0, 0.0]])
    y = jnp.array([1])
    g_s, g_t = jax.grad(lambda s, t: kd.kd_loss(s, t, y, temperature=2.0, alpha=1.0),
                        argnums=(0, 1))(s, t)
    expected = 2.0 * (jax.nn.softmax(s / 2.0) - jax.nn.softmax(t / 2.0))
    np.testing.assert_allclose(g_s, expected, rtol=1e-5)
    np.testing.assert_array_equal(g_t, jnp.zeros_like(t))
    self.assertAlmostEqual(float(kd.kd_loss(t, t, y, temperature=2.0, alpha=1.0)), 0.0,
                           places=6)

  @parameterized.named_parameters(("temperature", 0.0, 0.5, "temperature"),
                                  ("alpha", 2.0, 1.5, "alpha"))
  def test_invalid(self, temperature, alpha, message):
    with self.assertRaisesRegex(ValueError, message):
      kd.check_hyperparameters(temperature, alpha)


class ObjectiveTest(parameterized.TestCase):

  def _teacher(self, data):
    teacher_model = _MLP(width=32)
    x = jnp.asarray(data.train.x)
    return kd.Teacher(teacher_model, jax.jit(teacher_model.init)(jax.random.key(7), x)["params"])

  def test_pruned_student_moves_toward_teacher(self):
    data = _dataset()
    x, y = jnp.asarray(data.train.x), jnp.asarray(data.train.y)
    objective, teacher_variables = kd.objective(self._teacher(data), temperature=2.0,
                                                alpha=1.0)
    student = _MLP()
    schedule = ep.schedules.constant(0.5, 0, frequency=1)
    pruner = ep.Pruner(importance="magnitude", schedule=schedule)
    tx = pruner.wrap(optax.adam(1e-2))
    state = training.create_train_state(student, tx, jax.random.key(1), x[:1])
    step = jax.jit(functools.partial(training.train_step, model=student, tx=tx,
                                     objective=objective))
    losses = []
    for _ in range(30):
      state, metrics = step(state, x, y, objective_args=teacher_variables)
      losses.append(float(metrics["loss"]))
    self.assertLess(losses[-1], 0.5 * losses[0])
    mask = np.asarray(state.opt_state.masks["Dense_0"]["kernel"])
    np.testing.assert_array_equal(np.asarray(state.params["Dense_0"]["kernel"])[~mask], 0)

  def test_loss_is_kd_loss_and_teacher_gets_no_gradient(self):
    data = _dataset()
    x, y = jnp.asarray(data.train.x), jnp.asarray(data.train.y)
    teacher = self._teacher(data)
    objective, teacher_variables = kd.objective(teacher, temperature=3.0, alpha=0.6)
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(len(y), 3)), jnp.float32)
    want = kd.kd_loss(logits, teacher.model.apply(teacher_variables, x), y, temperature=3.0,
                      alpha=0.6)
    self.assertAlmostEqual(float(objective(logits, y, x, teacher_variables)), float(want),
                           places=6)
    grads = jax.grad(lambda v: objective(logits, y, x, v))(teacher_variables)
    for g in jax.tree.leaves(grads):
      np.testing.assert_array_equal(g, jnp.zeros_like(g))

  def test_objective_hashes_by_value(self):
    # The Teacher holds arrays (unhashable); the objective holds only its model and floats,
    # so two teachers of one architecture share a compiled program.
    data = _dataset()
    teacher = self._teacher(data)
    other = kd.Teacher(teacher.model, jax.tree.map(lambda a: a + 1, teacher.params))
    a, _ = kd.objective(teacher, temperature=2.0, alpha=0.5)
    b, _ = kd.objective(other, temperature=2, alpha=0.5)
    self.assertEqual(a, b)
    self.assertEqual(hash(a), hash(b))
    tx = optax.sgd(0.1)
    self.assertIs(training.make_train_epoch(_MLP(), tx, objective=a),
                  training.make_train_epoch(_MLP(), tx, objective=b))
    self.assertNotEqual(a, kd.objective(teacher, temperature=3.0, alpha=0.5)[0])

  @parameterized.named_parameters(("temperature", -1.0, 0.5, "temperature=-1.0"),
                                  ("alpha", 2.0, 1.5, "alpha=1.5"))
  def test_invalid_hyperparameters(self, temperature, alpha, message):
    with self.assertRaisesRegex(ValueError, message):
      kd.objective(self._teacher(_dataset()), temperature=temperature, alpha=alpha)


class DistillFitTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.data = _dataset()
    teacher_model = _MLP(width=32)
    x = jnp.asarray(self.data.train.x)
    teacher_state = training.create_train_state(teacher_model, optax.adam(1e-2),
                                                jax.random.key(3), x[:1])
    teacher_state, _ = training.fit(teacher_model, optax.adam(1e-2), teacher_state, self.data,
                                    training.FitConfig(epochs=20, batch_size=16,
                                                       progress=False))
    self.teacher = kd.Teacher(teacher_model, teacher_state.params)
    self.student = _MLP(width=8)
    self.tx = optax.adam(1e-2)
    self.start = training.create_train_state(self.student, self.tx, jax.random.key(4), x[:1])

  def _fit(self, config, workdir, **kwargs):
    objective, objective_args = kd.objective(self.teacher, temperature=2.0, alpha=0.7)
    return training.fit(self.student, self.tx, self.start, self.data, config, workdir=workdir,
                        stage="student", objective=objective, objective_args=objective_args,
                        **kwargs)

  def test_fit_trains_and_resumes_mid_epoch(self):
    # Calls of 3 and 1 steps (4 per epoch); checkpoints past multiples of 5: 7, 11, 15, ...
    config = training.FitConfig(epochs=15, batch_size=16, progress=False, steps_per_call=3,
                                checkpoint_every_steps=5)
    full, metrics = self._fit(config, tempfile.mkdtemp())
    self.assertEqual(int(full.step), 15 * 4)
    self.assertGreater(metrics["val_accuracy"], 0.5)

    class Interrupt(Exception):
      pass

    def stop(state, event):
      if event["epoch"] == 7:
        raise Interrupt()

    workdir = tempfile.mkdtemp()
    with self.assertRaises(Interrupt):
      self._fit(config, workdir, on_epoch_end=stop)
    checkpoints = pathlib.Path(workdir) / "checkpoints" / "student"
    self.assertEqual(max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()), 27)
    resumed, _ = self._fit(config, workdir)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
      np.testing.assert_array_equal(a, b)

  def test_non_finite_loss_raises(self):
    x = self.data.train.x.copy()
    x[5, 0] = np.nan  # the teacher's logits and the student's for that example are NaN
    self.data = dataclasses.replace(self.data, train=ep.data.Split(x, self.data.train.y))
    config = training.FitConfig(epochs=2, batch_size=16, progress=False)
    with self.assertRaisesRegex(training.NonFiniteLossError, "student: non-finite loss"):
      self._fit(config, tempfile.mkdtemp())


if __name__ == "__main__":
  absltest.main()
