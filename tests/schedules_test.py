"""Tests for evoprune.schedules (TF Model Optimization semantics)."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from evoprune import schedules

_STEPS = np.arange(-3, 700)


def _run(schedule, steps=_STEPS):
  """Evaluates a schedule under jit with a traced step, at every step of `steps`."""
  update, sparsity = jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32))
  return np.asarray(update), np.asarray(sparsity)


def _tf_update(steps, begin, end, frequency):
  in_range = (steps >= begin) & ((steps <= end) | (end < 0))
  return in_range & (np.mod(steps - begin, frequency) == 0)


class ConstantTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("forever", 0.5, 0, -1, 100),
      ("window", 0.8, 10, 410, 50),
      ("every_step", 0.0, 3, 7, 1),
      ("end_equals_begin", 0.9, 200, 200, 100),
  )
  def test_matches_formula(self, target, begin, end, frequency):
    update, sparsity = _run(schedules.constant(target, begin, end, frequency))
    np.testing.assert_array_equal(update, _tf_update(_STEPS, begin, end, frequency))
    np.testing.assert_array_equal(sparsity, np.float32(target))
    self.assertEqual(sparsity.dtype, np.float32)

  def test_boundaries_by_hand(self):
    update, _ = _run(schedules.constant(0.5, 10, 210, 100), np.array([-1, 9, 10, 11, 110, 210,
                                                                      211, 310]))
    np.testing.assert_array_equal(update, [False, False, True, False, True, True, False, False])

  def test_defaults_prune_at_step_zero_forever(self):
    update, _ = _run(schedules.constant(0.5), np.array([-100, 0, 1, 100, 10**6]))
    np.testing.assert_array_equal(update, [False, True, False, True, True])


class PolynomialDecayTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("tf_default", 0.0, 0.8, 0, 500, 3, 100),
      ("offset_begin", 0.5, 0.8, 37, 437, 3, 20),
      ("linear", 0.1, 0.9, 5, 605, 1, 7),
      ("float_power", 0.2, 0.95, 0, 300, 2.5, 1),
      ("decreasing", 0.6, 0.3, 100, 200, 3, 10),
  )
  def test_matches_formula(self, initial, final, begin, end, power, frequency):
    update, sparsity = _run(
        schedules.polynomial_decay(initial, final, begin, end, power, frequency))
    p = np.clip((_STEPS - begin) / (end - begin), 0.0, 1.0)
    want = final + (initial - final) * (1.0 - p)**power
    np.testing.assert_allclose(sparsity, want, atol=1e-6)
    np.testing.assert_array_equal(update, _tf_update(_STEPS, begin, end, frequency))

  def test_hand_values(self):
    # begin 100, end 300, cubic, 0 -> 0.8: at the midpoint s = 0.8 - 0.8 * 0.5**3 = 0.7.
    schedule = schedules.polynomial_decay(0.0, 0.8, 100, 300, frequency=100)
    update, sparsity = _run(schedule, np.array([0, 100, 200, 300, 400, 250]))
    np.testing.assert_allclose(sparsity, [0.0, 0.0, 0.7, 0.8, 0.8, 0.8 - 0.8 * 0.25**3],
                               atol=1e-7)
    np.testing.assert_array_equal(update, [False, True, True, True, False, False])

  def test_end_must_follow_begin(self):
    with self.assertRaisesRegex(ValueError, "end_step=100 must be > begin_step=100"):
      schedules.polynomial_decay(0.0, 0.5, 100, 100)
    with self.assertRaisesRegex(ValueError, "end_step=-1 is negative"):
      schedules.polynomial_decay(0.0, 0.5, 0, -1)


class OneShotAndIterativeTest(parameterized.TestCase):

  def test_one_shot(self):
    update, sparsity = _run(schedules.one_shot(0.9, step=50))
    np.testing.assert_array_equal(np.flatnonzero(update), [np.flatnonzero(_STEPS == 50)[0]])
    np.testing.assert_array_equal(sparsity, np.float32(0.9))

  @parameterized.named_parameters(("three_rounds", 0.875, 100, 3, 20),
                                  ("one_round", 0.5, 10, 1, 0),
                                  ("five_rounds", 0.99, 64, 5, 7))
  def test_iterative_matches_formula(self, final, per_round, rounds, begin):
    schedule = schedules.iterative(final, per_round, rounds, begin)
    update, sparsity = _run(schedule)
    want_update = ((_STEPS >= begin) & ((_STEPS - begin) % per_round == 0)
                   & (_STEPS < begin + rounds * per_round))
    np.testing.assert_array_equal(update, want_update)
    done = np.clip((_STEPS - begin) // per_round + 1, 0, rounds)
    np.testing.assert_allclose(sparsity, 1.0 - (1.0 - final)**(done / rounds), atol=1e-6)
    self.assertEqual(schedule.end_step, begin + (rounds - 1) * per_round)

  def test_iterative_by_hand(self):
    # 87.5% in 3 rounds keeps half of the remaining weights each round: 0.5, 0.75, 0.875.
    update, sparsity = _run(schedules.iterative(0.875, 100, 3),
                            np.array([-1, 0, 99, 100, 200, 299, 300]))
    np.testing.assert_allclose(sparsity, [0.0, 0.5, 0.5, 0.75, 0.875, 0.875, 0.875],
                               atol=1e-6)
    np.testing.assert_array_equal(update, [False, True, False, True, True, False, False])


class ValidationTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("sparsity_one", lambda: schedules.constant(1.0), "target_sparsity=1.0"),
      ("sparsity_negative", lambda: schedules.one_shot(-0.1), "target_sparsity=-0.1"),
      ("initial", lambda: schedules.polynomial_decay(1.2, 0.5, 0, 10), "initial_sparsity=1.2"),
      ("negative_begin", lambda: schedules.constant(0.5, -1), "begin_step=-1"),
      ("end_before_begin", lambda: schedules.constant(0.5, 10, 5), "end_step=5"),
      ("end_negative", lambda: schedules.constant(0.5, 0, -2), "end_step=-2"),
      ("zero_frequency", lambda: schedules.constant(0.5, frequency=0), "frequency=0"),
      ("float_step", lambda: schedules.constant(0.5, 1.5), "begin_step=1.5"),
      ("zero_power", lambda: schedules.polynomial_decay(0, 0.5, 0, 10, power=0), "power=0"),
      ("zero_rounds", lambda: schedules.iterative(0.9, 10, 0), "rounds=0"),
  )
  def test_raises(self, make, message):
    with self.assertRaisesRegex(ValueError, message):
      make()

  def test_registry(self):
    self.assertIs(schedules.get("polynomial_decay"), schedules.polynomial_decay)
    with self.assertRaisesRegex(ValueError, "valid names.*constant"):
      schedules.get("cosine")

  def test_hashable_and_static(self):
    a = schedules.constant(0.5, 0, -1, 10)
    self.assertEqual(a, schedules.constant(0.5, 0, -1, 10))
    self.assertEqual(hash(a), hash(schedules.constant(0.5, 0, -1, 10)))
    f = jax.jit(lambda step, schedule: schedule(step)[0], static_argnums=1)
    self.assertTrue(bool(f(20, a)))
    self.assertFalse(bool(f(21, a)))


if __name__ == "__main__":
  absltest.main()
