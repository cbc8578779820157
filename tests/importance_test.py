"""Tests for evoprune.importance: scorers and running averages, on hand-computed values."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from evoprune import importance

W = {"a": jnp.array([[1.0, -2.0], [0.5, 0.0]]), "b": jnp.array([-3.0, 4.0])}
G = {"a": jnp.array([[0.5, 1.0], [-2.0, 7.0]]), "b": jnp.array([1.0, -0.25])}

# Four snapshots of a two-weight leaf; the second weight is the first times -1 plus 10, so
# any mix-up between weights or snapshots shows.
SNAPS = [jnp.array([1.0, 9.0]), jnp.array([2.0, 8.0]), jnp.array([4.0, 6.0]),
         jnp.array([8.0, 2.0])]
S2, S3 = math.sqrt(2.0), math.sqrt(3.0)


def _first_weight_after_each_snapshot(avg, snaps=SNAPS):
  """Values of weight 0 after each snapshot, fed at steps 0, 1, 2, ... with every=1."""
  state = avg.init(snaps[0])
  out = []
  for step, x in enumerate(snaps):
    state = avg.update(state, x, step)
    out.append(avg.value(state))
  return np.array([float(v[0]) for v in out]), np.array([float(v[1]) for v in out])


class ScorerTest(parameterized.TestCase):

  def test_magnitude_is_abs(self):
    s = importance.magnitude(W)
    np.testing.assert_array_equal(s["a"], [[1.0, 2.0], [0.5, 0.0]])
    np.testing.assert_array_equal(s["b"], [3.0, 4.0])

  def test_saliency_is_abs_w_times_g(self):
    s = importance.saliency(W, G)
    np.testing.assert_allclose(s["a"], [[0.5, 2.0], [1.0, 0.0]])
    np.testing.assert_allclose(s["b"], [3.0, 1.0])

  def test_taylor_per_weight_is_squared_w_times_g(self):
    s = importance.taylor(W, G)
    np.testing.assert_allclose(s["a"], [[0.25, 4.0], [1.0, 0.0]])
    np.testing.assert_allclose(s["b"], [9.0, 1.0])

  def test_taylor_per_output_squares_the_column_sum(self):
    # w*g of "a" = [[0.5, -2], [-1, 0]]; column sums 0.5 - 1 = -0.5 and -2 + 0 = -2,
    # squared 0.25 and 4, shared by every weight of the column.
    s = importance.taylor(W, G, per_output=True)
    np.testing.assert_allclose(s["a"], [[0.25, 4.0], [0.25, 4.0]])
    # A 1-D leaf has no fan-in axis: scored per weight.
    np.testing.assert_allclose(s["b"], [9.0, 1.0])

  def test_movement_is_minus_w_times_g(self):
    s = importance.movement(W, G)
    np.testing.assert_allclose(s["a"], [[-0.5, 2.0], [1.0, 0.0]])
    np.testing.assert_allclose(s["b"], [3.0, 1.0])

  def test_movement_accumulates_minus_w_times_g_over_steps(self):
    # Weight 0 moves away from zero (1 -> 2 -> 3 with g = -1, -1, -1): -w*g = 1 + 2 + 3.
    # Weight 1 moves towards zero (3 -> 2 -> 1 with g = 1, 1, 1): -(3 + 2 + 1).
    ws = [jnp.array([1.0, 3.0]), jnp.array([2.0, 2.0]), jnp.array([3.0, 1.0])]
    gs = [jnp.array([-1.0, 1.0])] * 3
    acc = importance.RunningAverage(kind="sum")
    state = acc.init(ws[0])
    for step, (w, g) in enumerate(zip(ws, gs)):
      state = acc.update(state, importance.movement(w, g), step)
    np.testing.assert_allclose(acc.value(state), [6.0, -6.0])

  def test_random_scores_same_key_same_scores_other_key_differs(self):
    key = jax.random.key(0)
    s1 = importance.random_scores(key, W)
    s2 = importance.random_scores(key, W)
    s3 = importance.random_scores(jax.random.key(1), W)
    for name in W:
      self.assertEqual(s1[name].shape, W[name].shape)
      np.testing.assert_array_equal(s1[name], s2[name])
      self.assertTrue(np.all((np.asarray(s1[name]) >= 0) & (np.asarray(s1[name]) < 1)))
    self.assertFalse(np.array_equal(s1["a"], s3["a"]))
    # The two leaves draw from different streams.
    self.assertFalse(np.array_equal(np.ravel(s1["a"])[:2], s1["b"]))

  @parameterized.named_parameters(
      ("magnitude", "magnitude"), ("random", "random"), ("saliency", "saliency"),
      ("taylor", "taylor"), ("movement", "movement"))
  def test_every_registered_scorer_takes_the_same_keywords(self, name):
    tree = {"a": W["a"], "skip": None}
    grads = {"a": G["a"], "skip": None}
    s = importance.get(name)(params=tree, grads=grads, key=jax.random.key(0))
    self.assertIsNone(s["skip"])
    self.assertEqual(s["a"].shape, (2, 2))

  def test_get_unknown_name_lists_valid_names(self):
    with self.assertRaisesRegex(ValueError, "magnitude.*saliency"):
      importance.get("snip")


class RunningAverageTest(parameterized.TestCase):

  def test_linear_by_hand(self):
    # Weights 1, 2, 3, 4 on the snapshots 1, 2, 4, 8:
    # 1; (1 + 4)/3; (1 + 4 + 12)/6; (1 + 4 + 12 + 32)/10.
    w0, w1 = _first_weight_after_each_snapshot(importance.RunningAverage("linear"))
    np.testing.assert_allclose(w0, [1.0, 5 / 3, 17 / 6, 4.9], rtol=1e-6)
    # Second weight: snapshots 9, 8, 6, 2.
    np.testing.assert_allclose(w1, [9.0, 25 / 3, 43 / 6, 5.1], rtol=1e-6)

  def test_sqrt_window_by_hand(self):
    avg = importance.RunningAverage("sqrt_window", window=3)
    w0, _ = _first_weight_after_each_snapshot(avg)
    expected = [
        1.0,  # one snapshot: weight sqrt(1)
        (1 * 1 + S2 * 2) / (1 + S2),  # fewer than k: weights sqrt(1), sqrt(2)
        (1 * 1 + S2 * 2 + S3 * 4) / (1 + S2 + S3),
        (1 * 2 + S2 * 4 + S3 * 8) / (1 + S2 + S3),  # window slid: the 1 is gone
    ]
    np.testing.assert_allclose(w0, expected, rtol=1e-6)

  def test_sqrt_window_wraps_the_ring_more_than_once(self):
    # k = 2, snapshots 1..5: the last two are 4, 5 with weights sqrt(1), sqrt(2).
    avg = importance.RunningAverage("sqrt_window", window=2)
    state = avg.init(jnp.zeros(()))
    for step in range(5):
      state = avg.update(state, jnp.float32(step + 1), step)
    np.testing.assert_allclose(avg.value(state), (4 + S2 * 5) / (1 + S2), rtol=1e-6)

  def test_ema_by_hand(self):
    # Debiased, decay 0.5: newest weight 1, then 0.5, 0.25, 0.125.
    avg = importance.RunningAverage("ema", decay=0.5)
    w0, _ = _first_weight_after_each_snapshot(avg)
    expected = [1.0, (0.5 + 2) / 1.5, (0.25 + 1 + 4) / 1.75,
                (0.125 + 0.5 + 2 + 8) / 1.875]
    np.testing.assert_allclose(w0, expected, rtol=1e-6)

  def test_sum_by_hand(self):
    w0, _ = _first_weight_after_each_snapshot(importance.RunningAverage("sum"))
    np.testing.assert_allclose(w0, [1.0, 3.0, 7.0, 15.0])

  def test_every_takes_snapshots_only_on_multiples(self):
    # Steps 0..6 see the values 1..7; with every=2 only steps 0, 2, 4, 6 (values 1, 3, 5,
    # 7) count: linear = (1*1 + 2*3 + 3*5 + 4*7) / 10 = 5.
    avg = importance.RunningAverage("linear", every=2)
    state = avg.init(jnp.zeros(()))
    values = []
    for step in range(7):
      state = avg.update(state, jnp.float32(step + 1), step)
      values.append(float(avg.value(state)))
    self.assertEqual(int(state.count), 4)
    np.testing.assert_allclose(values[:2], [1.0, 1.0])  # step 1 took no snapshot
    np.testing.assert_allclose(values[-1], 5.0, rtol=1e-6)

  @parameterized.named_parameters(
      ("linear", "linear", (1 * 1 + 2 * 3) / 3),
      ("sqrt_window", "sqrt_window", (1 * 1 + S2 * 3) / (1 + S2)),
      ("ema", "ema", (0.5 * 1 + 3) / 1.5),
  )
  def test_first_snapshot_counts(self, kind, expected):
    # The seed library kept a view of the live tensor, so its first snapshot equalled the
    # second; ours are values: changing the weights afterwards does not change them.
    avg = importance.RunningAverage(kind, window=3, decay=0.5)
    w = jnp.array([1.0])
    state = avg.update(avg.init(w), w, 0)
    w = w + 2.0  # the "live" weights move on
    state = avg.update(state, w, 1)
    np.testing.assert_allclose(avg.value(state), [expected], rtol=1e-6)
    self.assertNotAlmostEqual(float(avg.value(state)[0]), 3.0)

  @parameterized.named_parameters(
      ("linear", "linear"), ("sqrt_window", "sqrt_window"), ("ema", "ema"), ("sum", "sum"))
  def test_value_before_any_snapshot_is_zero_and_none_leaves_pass(self, kind):
    avg = importance.RunningAverage(kind, window=2, every=3)
    tree = {"w": jnp.ones((2,)), "bias": None}
    state = avg.update(avg.init(tree), tree, 1)  # 1 % 3 != 0: no snapshot
    value = avg.value(state)
    self.assertIsNone(value["bias"])
    np.testing.assert_array_equal(value["w"], [0.0, 0.0])

  def test_state_is_float32_for_bfloat16_values(self):
    avg = importance.RunningAverage("linear")
    state = avg.init(jnp.ones((2,), jnp.bfloat16))
    self.assertEqual(state.accum.dtype, jnp.float32)

  @parameterized.named_parameters(
      ("linear", "linear"), ("sqrt_window", "sqrt_window"), ("ema", "ema"), ("sum", "sum"))
  def test_update_with_traced_step_compiles_once(self, kind):
    avg = importance.RunningAverage(kind, window=3, decay=0.5, every=2)
    traces = []

    @jax.jit
    def step_fn(state, x, step):
      traces.append(1)  # runs only while tracing
      return avg.update(state, x, step)

    state = avg.init(SNAPS[0])
    eager = avg.init(SNAPS[0])
    for step in range(6):
      x = SNAPS[step % 4]
      state = step_fn(state, x, jnp.asarray(step, jnp.int32))
      eager = avg.update(eager, x, step)
    self.assertLen(traces, 1)
    self.assertEqual(int(state.count), 3)  # steps 0, 2, 4
    np.testing.assert_allclose(avg.value(state), avg.value(eager), rtol=1e-6)

  def test_update_inside_scan(self):
    avg = importance.RunningAverage("linear")

    def body(state, step):
      return avg.update(state, jnp.float32(1.0) + step.astype(jnp.float32), step), None

    state, _ = jax.lax.scan(body, avg.init(jnp.zeros(())), jnp.arange(4))
    # Snapshots 1, 2, 3, 4: (1 + 4 + 9 + 16) / 10.
    np.testing.assert_allclose(avg.value(state), 3.0, rtol=1e-6)

  @parameterized.named_parameters(
      ("kind", dict(kind="cubic"), "kind='cubic'.*linear"),
      ("window_zero", dict(window=0), "window=0"),
      ("window_float", dict(window=2.5), "window=2.5"),
      ("decay_one", dict(decay=1.0), "decay=1.0"),
      ("decay_zero", dict(decay=0.0), "decay=0.0"),
      ("every_zero", dict(every=0), "every=0"),
  )
  def test_invalid_construction_raises(self, kwargs, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      importance.RunningAverage(**kwargs)


if __name__ == "__main__":
  absltest.main()
