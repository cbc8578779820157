"""Tests for distillation: Hinton et al.'s loss by hand, the teacher-student step, fit."""

import functools
import math
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


class DistillStepTest(absltest.TestCase):

  def test_pruned_student_moves_toward_teacher(self):
    data = _dataset()
    x, y = jnp.asarray(data.train.x), jnp.asarray(data.train.y)
    teacher_model = _MLP(width=32)
    teacher = kd.Teacher(teacher_model, jax.jit(teacher_model.init)(jax.random.key(7), x)
                         ["params"])
    student = _MLP()
    schedule = ep.schedules.constant(0.5, 0, frequency=1)
    pruner = ep.Pruner(importance="magnitude", schedule=schedule)
    tx = pruner.wrap(optax.adam(1e-2))
    state = training.create_train_state(student, tx, jax.random.key(1), x[:1])
    step = jax.jit(functools.partial(kd.distill_step, model=student, tx=tx, teacher=teacher,
                                     temperature=2.0, alpha=1.0))
    losses = []
    for _ in range(30):
      state, metrics = step(state, x, y, teacher.variables)
      losses.append(float(metrics["loss"]))
    self.assertLess(losses[-1], 0.5 * losses[0])
    mask = np.asarray(state.opt_state.masks["Dense_0"]["kernel"])
    np.testing.assert_array_equal(np.asarray(state.params["Dense_0"]["kernel"])[~mask], 0)

  def test_fit_trains_and_resumes(self):
    data = _dataset()
    teacher_model = _MLP(width=32)
    x = jnp.asarray(data.train.x)
    teacher_state = training.create_train_state(teacher_model, optax.adam(1e-2),
                                                jax.random.key(3), x[:1])
    teacher_state, _ = training.fit(teacher_model, optax.adam(1e-2), teacher_state, data,
                                    training.FitConfig(epochs=20, batch_size=16,
                                                       progress=False))
    teacher = kd.Teacher(teacher_model, teacher_state.params)
    student = _MLP(width=8)
    tx = optax.adam(1e-2)
    start = training.create_train_state(student, tx, jax.random.key(4), x[:1])
    workdir = tempfile.mkdtemp()
    config = training.FitConfig(epochs=15, batch_size=16, progress=False)
    state, metrics = kd.fit(student, tx, start, data, config, teacher, temperature=2.0,
                            alpha=0.7, workdir=workdir, stage="student")
    self.assertEqual(int(state.step), 15 * 4)
    self.assertGreater(metrics["val_accuracy"], 0.5)
    again, _ = kd.fit(student, tx, start, data, config, teacher, temperature=2.0, alpha=0.7,
                      workdir=workdir, stage="student")  # resumes at the end: no training
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(again.params)):
      np.testing.assert_array_equal(a, b)


if __name__ == "__main__":
  absltest.main()
