"""Tests for evoprune.allocation."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from evoprune import allocation
from evoprune import masks


def _template(*shapes):
  """A masks-like template: Dense_i/kernel of each shape, biases not prunable."""
  return {f"Dense_{i}": {"kernel": jnp.ones(s, bool), "bias": None}
          for i, s in enumerate(shapes)}


def _values(tree):
  return [float(v) for v in jax.tree.leaves(tree)]


class UniformTest(parameterized.TestCase):

  def test_every_layer_at_target(self):
    out = allocation.uniform(_template((2, 3), (3, 4)), 0.7)
    self.assertEqual(out["Dense_0"], {"kernel": 0.7, "bias": None})
    self.assertEqual(_values(out), [0.7, 0.7])

  def test_first_last_dense_rescales_middle(self):
    t = _template((2, 5), (8, 10), (5, 2))  # 10, 80, 10 weights
    out = allocation.uniform(t, 0.5, first_last="dense")
    np.testing.assert_allclose(_values(out), [0.0, 0.625, 0.0], atol=1e-12)
    self.assertAlmostEqual(allocation.global_sparsity(t, out), 0.5, delta=1e-12)

  def test_first_last_cap(self):
    t = _template((2, 5), (8, 10), (5, 2))
    # Ends capped at 0.3 prune 3 + 3; the middle prunes the other 44 of 80.
    out = allocation.uniform(t, 0.5, first_last=0.3)
    np.testing.assert_allclose(_values(out), [0.3, 0.55, 0.3], atol=1e-12)
    # A cap above the uniform value does not bind.
    np.testing.assert_allclose(_values(allocation.uniform(t, 0.2, first_last=0.3)),
                               [0.2, 0.2, 0.2], atol=1e-12)

  def test_unreachable_names_max(self):
    t = _template((2, 5), (8, 10), (5, 2))
    with self.assertRaisesRegex(ValueError, r"target=0.9 .* reachable global sparsity is 0.8"):
      allocation.uniform(t, 0.9, first_last="dense")

  @parameterized.named_parameters(("one", 1.0), ("negative", -0.5))
  def test_bad_target(self, target):
    with self.assertRaisesRegex(ValueError, f"target={target}"):
      allocation.uniform(_template((2, 2)), target)

  def test_bad_first_last(self):
    with self.assertRaisesRegex(ValueError, "first_last='sparse'"):
      allocation.uniform(_template((2, 2)), 0.5, first_last="sparse")


class ErkTest(parameterized.TestCase):

  def test_two_layers_by_hand(self):
    # [4, 4]: ratio 8/16; [2, 8]: 10/16. 16 nonzeros of 32: eps * (8 + 10) = 16, eps = 8/9,
    # densities 4/9 and 5/9.
    t = _template((4, 4), (2, 8))
    out = allocation.erk(t, 0.5)
    np.testing.assert_allclose(_values(out), [5 / 9, 4 / 9], atol=1e-12)

  def test_dense_correction_by_hand(self):
    # [1, 2] (ratio 1.5) would get density 1.5 * 51/23 > 1: made dense, so [10, 10] holds
    # the remaining 49 nonzeros of the 51 allowed (target 0.5 of 102).
    t = _template((1, 2), (10, 10))
    out = allocation.erk(t, 0.5)
    np.testing.assert_allclose(_values(out), [0.0, 0.51], atol=1e-12)

  def test_conv_kernel_ratio(self):
    # [3, 3, 2, 4]: (3 + 3 + 2 + 4) / 72 = 1/6; [6, 6]: 12/36 = 1/3. n = 72 and 36.
    # 54 nonzeros: eps * (72/6 + 36/3) = 54, eps = 2.25: densities 0.375 and 0.75.
    t = {"conv": jnp.ones((3, 3, 2, 4), bool), "dense": jnp.ones((6, 6), bool)}
    out = allocation.erk(t, 0.5)
    self.assertAlmostEqual(out["conv"], 0.625, delta=1e-12)
    self.assertAlmostEqual(out["dense"], 0.25, delta=1e-12)

  @parameterized.named_parameters(("plain", None, 0.9), ("dense", "dense", 0.8),
                                  ("cap", 0.5, 0.9), ("scaled", None, 0.95))
  def test_global_target_met(self, first_last, target):
    t = _template((16, 32), (32, 64), (64, 32), (32, 10))
    out = allocation.erk(t, target, first_last=first_last,
                         power_scale=0.5 if target == 0.95 else 1.0)
    self.assertAlmostEqual(allocation.global_sparsity(t, out), target, delta=1e-6)
    values = _values(out)
    self.assertTrue(all(0.0 <= v <= 1.0 for v in values))
    if first_last == "dense":
      self.assertEqual([values[0], values[-1]], [0.0, 0.0])
    if first_last == 0.5:
      self.assertLessEqual(max(values[0], values[-1]), 0.5 + 1e-12)

  def test_power_scale_zero_is_uniform(self):
    t = _template((4, 4), (2, 8))
    np.testing.assert_allclose(_values(allocation.erk(t, 0.3, power_scale=0.0)), [0.3, 0.3],
                               atol=1e-12)


class ExplicitTest(parameterized.TestCase):

  def test_paths_and_regexes(self):
    t = _template((2, 2), (2, 2), (2, 2))
    out = allocation.explicit(t, {"Dense_1/kernel": 0.2, r"Dense_\d/kernel": 0.6})
    self.assertEqual(_values(out), [0.6, 0.2, 0.6])
    self.assertIsNone(out["Dense_0"]["bias"])

  def test_default_and_errors(self):
    t = _template((2, 2), (2, 2))
    self.assertEqual(_values(allocation.explicit(t, {"Dense_0/kernel": 0.5}, default=0.0)),
                     [0.5, 0.0])
    with self.assertRaisesRegex(ValueError, "no value for.*Dense_1/kernel"):
      allocation.explicit(t, {"Dense_0/kernel": 0.5})
    with self.assertRaisesRegex(ValueError, "Conv_0.*match no prunable leaf"):
      allocation.explicit(t, {"Conv_0/kernel": 0.5}, default=0.0)
    with self.assertRaisesRegex(ValueError, "target=1.5"):
      allocation.explicit(t, {"Dense_0/kernel": 1.5}, default=0.0)


class GlobalTest(parameterized.TestCase):

  def _scores(self):
    return {"a": jnp.array([[1.0, 2.0, 3.0, 4.0]]), "b": jnp.array([[5.0, 6.0, 7.0, 8.0]]),
            "c": jnp.array([[0.5, 9.0, 10.0, 11.0]]), "bias": None}

  def test_induced_by_hand(self):
    # 6 lowest of 12: 0.5, 1, 2, 3, 4, 5.
    out = allocation.global_(self._scores(), 0.5)
    self.assertEqual([out["a"], out["b"], out["c"]], [1.0, 0.25, 0.25])
    self.assertIsNone(out["bias"])

  def test_dense_ends(self):
    out = allocation.global_(self._scores(), 0.25, first_last="dense")
    self.assertEqual([float(out[k]) for k in "abc"], [0.0, 0.75, 0.0])

  def test_cap_one_pass(self):
    # a hits its cap (2 of 4); 4 more come from b and c: 0.5, 5, 6, 7.
    out = allocation.global_(self._scores(), 0.5, first_last=0.5)
    self.assertEqual([float(out[k]) for k in "abc"], [0.5, 0.75, 0.25])

  def test_cap_second_pass(self):
    # Unconstrained: a 4, c 2. Capping a pushes c to 4 > 2, so both are capped.
    scores = {"a": jnp.array([[1.0, 2.0, 3.0, 4.0]]), "b": jnp.array([[10.0, 11, 12, 13]]),
              "c": jnp.array([[5.0, 6.0, 7.0, 8.0]])}
    out = jax.jit(lambda s: allocation.global_(s, 0.5, first_last=0.5))(scores)
    self.assertEqual([float(out[k]) for k in "abc"], [0.5, 0.5, 0.5])

  def test_unreachable(self):
    with self.assertRaisesRegex(ValueError, "target=0.9 .* at most 4 of 12"):
      allocation.global_(self._scores(), 0.9, first_last="dense")

  def test_matches_global_topk_and_vmap(self):
    rng = np.random.default_rng(0)
    scores = {f"l{i}": jnp.asarray(rng.integers(-4, 4, s), jnp.float32)
              for i, s in enumerate([(20, 10), (10, 10), (10, 3)])}
    targets = jnp.asarray(rng.uniform(0, 0.99, 8), jnp.float32)
    per_layer = jax.jit(jax.vmap(lambda s: allocation.global_(scores, s)))(targets)
    total = 200 + 100 + 30
    for p in range(8):
      s = {k: v[p] for k, v in per_layer.items()}
      pruned = sum(float(s[k]) * scores[k].size for k in scores)
      self.assertAlmostEqual(pruned, masks.num_pruned(targets[p], total), delta=1e-3)
      got = masks.topk(scores, s)
      want = masks.global_topk(scores, targets[p])
      for k in scores:
        np.testing.assert_array_equal(got[k], want[k])

  def test_cap_meets_target_under_vmap(self):
    rng = np.random.default_rng(1)
    scores = {f"l{i}": jnp.asarray(rng.normal(size=s), jnp.float32)
              for i, s in enumerate([(8, 10), (10, 10), (10, 5)])}
    targets = jnp.linspace(0.0, 0.6, 8)  # 0.6 * 230 = 138 <= 24 + 100 + 15 reachable
    per_layer = jax.jit(jax.vmap(lambda s: allocation.global_(scores, s, first_last=0.3)))(
        targets)
    for p in range(8):
      counts = [float(per_layer[k][p]) * scores[k].size for k in scores]
      self.assertAlmostEqual(sum(counts), masks.num_pruned(targets[p], 230), delta=1e-3)
      self.assertLessEqual(counts[0], 24 + 1e-3)
      self.assertLessEqual(counts[2], 15 + 1e-3)


class RegistryTest(absltest.TestCase):

  def test_get(self):
    self.assertIs(allocation.get("global"), allocation.global_)
    self.assertEqual(set(allocation.ALLOCATIONS), {"uniform", "global", "erk", "explicit"})
    with self.assertRaisesRegex(ValueError, "valid names.*erk"):
      allocation.get("evolutionary")


if __name__ == "__main__":
  absltest.main()
