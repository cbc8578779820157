"""Tests for evoprune.criteria: the seed paper's rules, on hand-computed layers."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from evoprune import criteria

# std_threshold layer. Nonzero |W|: 0.1, 0.4, 0.3, 0.2, 0.6; mean 0.32; squared deviations
# 0.0484 + 0.0064 + 0.0004 + 0.0144 + 0.0784 = 0.148.
# ddof=1 (torch): std = sqrt(0.148 / 4) = 0.192354; ddof=0: sqrt(0.148 / 5) = 0.172047.
W_STD = jnp.array([[0.1, -0.4, 0.0], [0.3, -0.2, 0.6]])

# Bezier neuron of fan-in 36 -> B = 6 bins of width 1 over [-3, 3]; bin counts
# 5, 6, 7, 7, 6, 5 (bin 0 = [-3, -2) holds -3 and four -2.5; the last bin holds 3).
BIN_COUNTS = np.array([5, 6, 7, 7, 6, 5])
NEURON = jnp.array([-3.0] + [-2.5] * 4 + [-1.5] * 6 + [-0.5] * 7 + [0.5] * 7 + [1.5] * 6
                   + [2.5] * 4 + [3.0])
NEURON_BINS = np.repeat(np.arange(6), BIN_COUNTS)
CONTROLS = (1.0, 0.5, 0.25, 0.0)


def _cuts_per_bin(keep_column):
  cut = ~np.asarray(keep_column)
  return np.array([cut[NEURON_BINS == j].sum() for j in range(6)])


class ThresholdTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # r = 1.1: thresholds 0.211589 (ddof 1) and 0.189252 (ddof 0): only the second
      # keeps the 0.2.
      ("torch_unbiased", 1, [[False, True, False], [True, False, True]]),
      ("population", 0, [[False, True, False], [True, True, True]]),
  )
  def test_std_threshold_by_hand(self, ddof, expected):
    masks = criteria.std_threshold({"w": W_STD, "bias": None}, 1.1, ddof=ddof)
    self.assertIsNone(masks["bias"])
    np.testing.assert_array_equal(masks["w"], expected)

  def test_std_threshold_default_is_torch_unbiased(self):
    np.testing.assert_array_equal(
        criteria.std_threshold(W_STD, 1.1), criteria.std_threshold(W_STD, 1.1, ddof=1))

  def test_std_threshold_ignores_zeros_in_the_std(self):
    # Padding the layer with zeros changes a std over all entries, not over the nonzeros.
    padded = jnp.concatenate([W_STD, jnp.zeros((2, 3))], axis=0)
    np.testing.assert_array_equal(criteria.std_threshold(padded, 1.1)[:2],
                                  criteria.std_threshold(W_STD, 1.1))

  def test_evolution_paper_average_moves_the_threshold(self):
    w = jnp.array([[0.5, -0.1, 0.3], [-0.35, 0.2, 0.05]])
    # Wbar = +-1: mean 0, signed std sqrt(6/5) = 1.095445; r = 0.3 -> threshold 0.328634.
    wbar_wide = jnp.array([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]])
    np.testing.assert_array_equal(
        criteria.evolution_paper(w, wbar_wide, 0.3),
        [[True, False, False], [True, False, False]])
    # Wbar / 10: threshold 0.0328634 keeps every current weight, even 0.05.
    np.testing.assert_array_equal(
        criteria.evolution_paper(w, wbar_wide / 10, 0.3), np.ones((2, 3), bool))

  def test_evolution_paper_uses_the_signed_average(self):
    # |Wbar| is constant (std 0), the signed Wbar is not: a threshold > 0 proves the sign.
    w = jnp.array([[0.2, 0.5]])
    np.testing.assert_array_equal(
        criteria.evolution_paper(w, jnp.array([[1.0, -1.0]]), 0.3), [[False, True]])

  @parameterized.named_parameters(
      # |Wbar| = 0.2 0.4 0.6 0.8 1.0 0; over all six: mean 0.5, squared deviations sum 0.7,
      # std sqrt(0.7 / 5) = 0.374166, r = 1.2 -> 0.449.
      ("all_entries", False, [[False, False, True], [True, True, False]]),
      # Over the five nonzeros: mean 0.6, sum 0.4, std sqrt(0.1) = 0.316228 -> 0.379.
      ("nonzero_only", True, [[False, True, True], [True, True, False]]),
  )
  def test_evolution_paper_tinygpt_by_hand(self, nonzero_only, expected):
    wbar = jnp.array([[0.2, -0.4, 0.6], [-0.8, 1.0, 0.0]])
    masks = criteria.evolution_paper_tinygpt(wbar, 1.2, nonzero_only=nonzero_only)
    np.testing.assert_array_equal(masks, expected)

  def test_single_nonzero_weight_gives_zero_std_not_nan(self):
    # torch's unbiased std of one value is nan; ours is 0, so the nonzero weight is kept.
    np.testing.assert_array_equal(
        criteria.std_threshold(jnp.array([0.0, 0.7, 0.0]), 1.0), [False, True, False])

  def test_rules_are_jit_safe_with_traced_r(self):
    f = jax.jit(criteria.std_threshold)
    np.testing.assert_array_equal(f(W_STD, jnp.float32(1.1)),
                                  criteria.std_threshold(W_STD, 1.1))


class SearchRTest(parameterized.TestCase):
  # Kernel |W| = 1, 2, 3, 1, 2, 3: mean 2, std sqrt(4/5) = 0.894427 (ddof 1). r <= 1.1
  # keeps all six (threshold <= 0.984), r in 1.2..2.2 prunes the 1s (1.073..1.968), r >= 2.3
  # prunes the 1s and 2s (>= 2.057). The bias (not prunable) holds one zero. Compression
  # over all 8 parameters: 1/8, 3/8 or 5/8.
  KERNEL = jnp.array([[1.0, -2.0, 3.0], [-1.0, 2.0, -3.0]])
  PARAMS = {"kernel": KERNEL, "bias": jnp.array([0.0, 0.5])}
  PRUNABLE = {"kernel": KERNEL, "bias": None}

  @parameterized.named_parameters(
      ("first_r_reaching", 0.3, 1.2, 0.375, [[False, True, True], [False, True, True]]),
      ("exact_hit", 0.625, 2.3, 0.625, [[False, False, True], [False, False, True]]),
      ("zero_target", 0.0, 0.1, 0.125, [[True, True, True], [True, True, True]]),
  )
  def test_reaches_target(self, target, r, sparsity, kernel_mask):
    res = criteria.search_r(criteria.std_threshold, (self.PRUNABLE,), target,
                            params=self.PARAMS)
    self.assertTrue(res.reached)
    self.assertAlmostEqual(res.r, r)
    self.assertAlmostEqual(res.sparsity, sparsity)
    self.assertIsNone(res.masks["bias"])
    np.testing.assert_array_equal(res.masks["kernel"], kernel_mask)
    self.assertIn("reached", res.message)

  def test_unreachable_returns_closest_and_reports_it(self):
    res = criteria.search_r(criteria.std_threshold, (self.PRUNABLE,), 0.8,
                            params=self.PARAMS)
    self.assertFalse(res.reached)
    self.assertAlmostEqual(res.r, 2.3)  # smallest r with the highest compression
    self.assertAlmostEqual(res.sparsity, 0.625)
    self.assertIn("0.625", res.message)
    self.assertIn("unreachable", res.message)
    np.testing.assert_array_equal(res.masks["kernel"],
                                  [[False, False, True], [False, False, True]])

  def test_grid_sparsities(self):
    res = criteria.search_r(criteria.std_threshold, (self.PRUNABLE,), 0.3,
                            params=self.PARAMS)
    expected = np.array([0.125] * 11 + [0.375] * 11 + [0.625] * 2)
    np.testing.assert_allclose(res.sparsities, expected)
    self.assertEqual(criteria.PAPER_R_GRID[0], 0.1)
    self.assertEqual(criteria.PAPER_R_GRID[-1], 2.4)
    self.assertLen(criteria.PAPER_R_GRID, 24)

  def test_params_default_to_the_masked_tree(self):
    # Without params only the 6 kernel weights count: 2/6 at r = 1.2.
    res = criteria.search_r(criteria.std_threshold, (self.KERNEL,), 0.3)
    self.assertAlmostEqual(res.r, 1.2)
    self.assertAlmostEqual(res.sparsity, 2 / 6)

  def test_evolution_paper_with_partial(self):
    # Wbar = +-1: mean 0, signed std 1 with ddof=0, so the threshold is r itself; the
    # kernel's 1s go from r = 1.0 (|1| > 1.0 is false), the 2s from r = 2.0: 4 of 6.
    wbar = jnp.sign(self.KERNEL)
    rule = functools.partial(criteria.evolution_paper, ddof=0)
    res = criteria.search_r(rule, (self.KERNEL, wbar), 0.5)
    self.assertTrue(res.reached)
    self.assertAlmostEqual(res.r, 2.0)
    self.assertAlmostEqual(res.sparsity, 4 / 6)

  def test_compression_counts_all_parameters(self):
    masks = {"kernel": jnp.array([[True, False, True], [True, True, False]]), "bias": None}
    # Kernel: 2 masked; bias: 1 exact zero; 3 of 8.
    self.assertAlmostEqual(float(criteria.compression(self.PARAMS, masks)), 3 / 8)

  @parameterized.named_parameters(("one", 1.0), ("negative", -0.1))
  def test_invalid_target_raises(self, target):
    with self.assertRaisesRegex(ValueError, "target="):
      criteria.search_r(criteria.std_threshold, (self.KERNEL,), target)


class BezierTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("784", 784, 28), ("256", 256, 16), ("128", 128, 12), ("150", 150, 14),
      ("36", 36, 6), ("25", 25, 6), ("37", 37, 8), ("1", 1, 2))
  def test_num_bins_is_sqrt_rounded_up_to_even(self, fan_in, bins):
    self.assertEqual(criteria.bezier_num_bins(fan_in), bins)

  @parameterized.named_parameters(
      # t = 0, 0.5, 1: beta(0.5) = (1 + 3*0.5 + 3*0.25 + 0) / 8 = 0.40625; mirrored curve
      # [0, .40625, 1, 1, .40625, 0] is already min-max normalised.
      ("scale", CONTROLS, 0.8, "scale", [0.0, 0.325, 0.8, 0.8, 0.325, 0.0]),
      ("shift", CONTROLS, 0.3, "shift", [0.3, 0.70625, 1.0, 1.0, 0.70625, 0.3]),
      # (3, 2, 2, 1): beta(0.5) = (3 + 6 + 6 + 1) / 8 = 2; curve [1, 2, 3, 3, 2, 1],
      # normalised [0, .5, 1, 1, .5, 0].
      ("normalised", (3.0, 2.0, 2.0, 1.0), 0.5, "scale", [0, 0.25, 0.5, 0.5, 0.25, 0]),
      ("capped", (3.0, 2.0, 2.0, 1.0), 2.0, "scale", [0, 1.0, 1.0, 1.0, 1.0, 0]),
      ("flat", (1.0, 1.0, 1.0, 1.0), 0.4, "shift", [0.4] * 6),
  )
  def test_fractions_by_hand(self, controls, u, mode, expected):
    np.testing.assert_allclose(criteria.bezier_fractions(6, controls, u, mode), expected,
                               rtol=1e-6, atol=1e-7)

  def test_fractions_eight_bins(self):
    # t = 0, 1/3, 2/3, 1 with (1, 0.5, 0.25, 0):
    # beta(1/3) = (8*1 + 12*0.5 + 6*0.25 + 0) / 27 = 15.5/27,
    # beta(2/3) = (1*1 + 6*0.5 + 12*0.25 + 0) / 27 = 7/27.
    half = [1.0, 15.5 / 27, 7 / 27, 0.0]
    np.testing.assert_allclose(criteria.bezier_fractions(8, CONTROLS, 1.0),
                               half[::-1] + half, rtol=1e-6, atol=1e-7)

  @parameterized.named_parameters(
      # scale 0.8: f*c = 0, 1.95, 5.6, 5.6, 1.95, 0.
      ("scale", 0.8, "scale", [0, 2, 6, 6, 2, 0]),
      # shift 0.3: f*c = 1.5, 4.2375, 7, 7, 4.2375, 1.5.
      ("shift", 0.3, "shift", [2, 4, 7, 7, 4, 2]),
  )
  def test_pruned_count_per_bin_is_round_fraction_times_count(self, u, mode, cuts):
    fractions = np.asarray(criteria.bezier_fractions(6, CONTROLS, u, mode))
    np.testing.assert_array_equal(np.round(fractions * BIN_COUNTS), cuts)
    # A Dense kernel [36, 3] whose columns are the neuron in three different orders.
    rng = np.random.default_rng(0)
    perms = [rng.permutation(36) for _ in range(3)]
    kernel = jnp.stack([NEURON[p] for p in perms], axis=1)
    keep = np.asarray(criteria.bezier({"k": kernel}, jax.random.key(0), controls=CONTROLS,
                                      u=u, mode=mode)["k"])
    for col, p in enumerate(perms):
      unshuffled = np.empty(36, bool)
      unshuffled[p] = keep[:, col]
      np.testing.assert_array_equal(_cuts_per_bin(unshuffled), cuts)

  def test_conv_filter_is_one_unit_over_h_w_in(self):
    # [3, 3, 4, 2]: fan-in 3*3*4 = 36 per output channel.
    kernel = jnp.stack([NEURON, NEURON[::-1]], axis=1).reshape(3, 3, 4, 2)
    keep = criteria.bezier(kernel, jax.random.key(3), controls=CONTROLS, u=0.8)
    self.assertEqual(keep.shape, (3, 3, 4, 2))
    cols = np.asarray(keep).reshape(36, 2)
    np.testing.assert_array_equal(_cuts_per_bin(cols[:, 0]), [0, 2, 6, 6, 2, 0])
    np.testing.assert_array_equal(_cuts_per_bin(cols[::-1, 1]), [0, 2, 6, 6, 2, 0])

  def test_deterministic_given_key_and_differs_with_another_key(self):
    kernel = jnp.stack([NEURON] * 4, axis=1)
    run = functools.partial(criteria.bezier, kernel, controls=CONTROLS, u=0.8)
    m1, m2 = run(jax.random.key(7)), run(jax.random.key(7))
    m3 = run(jax.random.key(8))
    np.testing.assert_array_equal(m1, m2)
    self.assertFalse(np.array_equal(m1, m3))
    # Same counts, different weights: the choice within a bin is random.
    self.assertEqual(int(np.sum(~np.asarray(m1))), int(np.sum(~np.asarray(m3))))
    # Identical columns draw independently.
    self.assertFalse(np.array_equal(m1[:, 0], m1[:, 1]))

  def test_ands_with_previous_masks(self):
    kernel = jnp.stack([NEURON, -NEURON], axis=1)
    key = jax.random.key(1)
    previous = jax.random.bernoulli(jax.random.key(2), 0.7, kernel.shape)
    fresh = criteria.bezier({"k": kernel, "b": None}, key, controls=CONTROLS, u=0.8)
    anded = criteria.bezier({"k": kernel, "b": None}, key, controls=CONTROLS, u=0.8,
                            masks={"k": previous, "b": None})
    self.assertIsNone(anded["b"])
    np.testing.assert_array_equal(anded["k"], np.logical_and(fresh["k"], previous))
    self.assertFalse(np.any(np.asarray(anded["k"]) & ~np.asarray(previous)))

  def test_jit_matches_eager(self):
    kernel = jnp.stack([NEURON, -NEURON], axis=1)
    f = jax.jit(functools.partial(criteria.bezier, controls=CONTROLS, mode="shift"))
    key = jax.random.key(4)
    np.testing.assert_array_equal(
        f(kernel, key, u=jnp.float32(0.3)),
        criteria.bezier(kernel, key, controls=CONTROLS, u=0.3, mode="shift"))

  @parameterized.named_parameters(
      ("mode", dict(mode="stretch"), "mode='stretch'"),
      ("controls", dict(controls=(1.0, 0.5, 0.0)), "four values"),
      ("u", dict(u=-0.5), "u=-0.5"),
  )
  def test_invalid_arguments_raise(self, override, pattern):
    kwargs = dict(controls=CONTROLS, u=0.5, mode="scale") | override
    with self.assertRaisesRegex(ValueError, pattern):
      criteria.bezier(NEURON, jax.random.key(0), **kwargs)

  def test_odd_num_bins_raises(self):
    with self.assertRaisesRegex(ValueError, "num_bins=5"):
      criteria.bezier_fractions(5, CONTROLS, 0.5)


class EvolutionTest(parameterized.TestCase):
  # |Wbar|: a = .05 .6 .07 .02, b = 2 .1 .3 4. The signed -0.6 and -4.0 rank by magnitude.
  WBAR = {"a": jnp.array([[0.05, -0.6], [0.07, -0.02]]),
          "b": jnp.array([2.0, -0.1, 0.3, -4.0]), "bias": None}

  def test_per_layer_hits_the_target_exactly(self):
    # Half of each layer: a loses .02 and .05, b loses .1 and .3.
    masks = criteria.evolution(self.WBAR, 0.5)
    self.assertIsNone(masks["bias"])
    np.testing.assert_array_equal(masks["a"], [[False, True], [True, False]])
    np.testing.assert_array_equal(masks["b"], [True, False, False, True])

  def test_global_ranks_across_layers(self):
    # The 4 lowest of all 8: .02, .05, .07 (all in a) and .1.
    masks = criteria.evolution(self.WBAR, 0.5, scope="global")
    np.testing.assert_array_equal(masks["a"], [[False, True], [False, False]])
    np.testing.assert_array_equal(masks["b"], [True, False, True, True])

  def test_traced_sparsity_under_jit(self):
    masks = jax.jit(criteria.evolution)(self.WBAR, jnp.float32(0.25))
    # One of four per layer: a loses .02, b loses .1.
    np.testing.assert_array_equal(masks["a"], [[True, True], [True, False]])
    np.testing.assert_array_equal(masks["b"], [True, False, True, True])


class RegistryTest(absltest.TestCase):

  def test_get_returns_registered(self):
    self.assertIs(criteria.get("std_threshold"), criteria.std_threshold)
    self.assertIs(criteria.get("bezier"), criteria.bezier)

  def test_get_unknown_lists_names(self):
    with self.assertRaisesRegex(ValueError, "bezier.*evolution"):
      criteria.get("han")

  def test_evolution_rejects_unknown_scope(self):
    with self.assertRaisesRegex(ValueError, "scope='network'"):
      criteria.evolution({"w": W_STD}, 0.5, scope="network")


if __name__ == "__main__":
  absltest.main()
