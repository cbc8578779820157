"""Tests for evoprune.masks."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from evoprune import masks

_F = False
_T = True


def _tree(rng, shapes, low=-3, high=3):
  """Integer-valued float scores (many ties), one Dense-like entry per shape."""
  return {f"Dense_{i}": {"kernel": jnp.asarray(rng.integers(low, high, s), jnp.float32),
                         "bias": None}
          for i, s in enumerate(shapes)}


def _pruned(tree):
  return [int(np.sum(~np.asarray(m))) for m in jax.tree.leaves(tree)]


class PathsAndInitTest(parameterized.TestCase):

  def test_path_str_of_dict_and_list(self):
    tree = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "layers": [jnp.ones(1), jnp.ones(1)]}
    self.assertEqual(masks.paths(tree), ["Dense_0/kernel", "layers/0", "layers/1"])

  def test_path_str_drops_nnx_value(self):
    state = nnx.state(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Param)
    self.assertEqual(masks.paths(state), ["bias", "kernel"])

  def test_default_filter(self):
    self.assertTrue(masks.default_filter(("Dense_0", "kernel"), np.ones((2, 3))))
    self.assertFalse(masks.default_filter(("Dense_0", "bias"), np.ones((2, 3))))
    self.assertFalse(masks.default_filter(("Norm", "kernel"), np.ones(3)))

  def test_init_marks_kernels_only(self):
    params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
              "Conv_0": {"kernel": jnp.ones((3, 3, 1, 2))}}
    m = masks.init(params)
    self.assertIsNone(m["Dense_0"]["bias"])
    self.assertEqual(m["Dense_0"]["kernel"].dtype, jnp.bool_)
    self.assertTrue(bool(m["Conv_0"]["kernel"].all()))
    self.assertEqual(m["Conv_0"]["kernel"].shape, (3, 3, 1, 2))

  def test_init_custom_filter(self):
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    m = masks.init(params, filter=lambda path, x: path == ("a",))
    self.assertIsNone(m["b"])
    self.assertEqual(m["a"].shape, (3,))


class TopkTest(parameterized.TestCase):

  def test_hand_example(self):
    scores = {"k": jnp.array([[3.0, 1.0], [2.0, 0.0]]), "b": None}
    m = masks.topk(scores, 0.5)
    np.testing.assert_array_equal(m["k"], [[_T, _F], [_T, _F]])
    self.assertIsNone(m["b"])

  def test_ties_prune_lower_index_first(self):
    m = masks.topk({"k": jnp.ones((2, 3))}, 0.5)
    np.testing.assert_array_equal(m["k"], [[_F, _F, _F], [_T, _T, _T]])

  def test_nan_is_lowest_and_signed_zeros_tie(self):
    m = masks.topk({"k": jnp.array([[1.0, jnp.nan, 0.0, -0.0, -1.0]])}, 0.4)
    np.testing.assert_array_equal(m["k"], [[_T, _F, _T, _T, _F]])
    m = masks.topk({"k": jnp.array([[1.0, 0.0, 5.0, -0.0]])}, 0.25)
    np.testing.assert_array_equal(m["k"], [[_T, _F, _T, _T]])

  def test_negative_scores_order(self):
    m = masks.topk({"k": jnp.array([[-1.0, -3.0, 2.0, -2.0]])}, 0.5)
    np.testing.assert_array_equal(m["k"], [[_T, _F, _T, _F]])

  def test_extremes(self):
    scores = {"k": jnp.arange(6.0).reshape(2, 3)}
    self.assertTrue(bool(masks.topk(scores, 0.0)["k"].all()))
    self.assertFalse(bool(masks.topk(scores, 1.0)["k"].any()))

  def test_round_half_to_even(self):
    # 0.5 * 3 = 1.5 -> 2 and 0.5 * 5 = 2.5 -> 2, as jnp.round and Python round.
    self.assertEqual(_pruned(masks.topk({"k": jnp.arange(3.0)[None]}, 0.5)), [2])
    self.assertEqual(_pruned(masks.topk({"k": jnp.arange(5.0)[None]}, 0.5)), [2])
    self.assertEqual(masks.num_pruned(0.5, 5), 2)

  @parameterized.named_parameters(("seed0", 0), ("seed1", 1), ("seed2", 2))
  def test_matches_stable_argsort_under_jit(self, seed):
    rng = np.random.default_rng(seed)
    shapes = [(37, 29), (1, 1), (3, 1100)]  # 3300 > 1024 exercises several layout rows
    scores = _tree(rng, shapes)
    sparsity = jnp.asarray(rng.uniform(0, 1, 3), jnp.float32)
    got = jax.jit(masks.topk)(scores, sparsity)
    want = jax.jit(masks.argsort_topk)(scores, sparsity)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(g, w)
    expected = [masks.num_pruned(s, int(np.prod(sh))) for s, sh in zip(sparsity, shapes)]
    self.assertEqual(_pruned(got), expected)

  def test_sparsity_forms_agree(self):
    scores = _tree(np.random.default_rng(3), [(4, 5), (6, 2)])
    vec = masks.topk(scores, jnp.array([0.25, 0.5]))
    lst = masks.topk(scores, [0.25, 0.5])
    tree = masks.topk(scores, {"Dense_0": {"kernel": 0.25, "bias": None},
                               "Dense_1": {"kernel": 0.5, "bias": None}})
    self.assertEqual(_pruned(vec), [5, 6])
    for a, b, c in zip(jax.tree.leaves(vec), jax.tree.leaves(lst), jax.tree.leaves(tree)):
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(a, c)
    self.assertEqual(_pruned(masks.topk(scores, 0.5)), [10, 6])

  def test_vmap_population_exact_counts(self):
    rng = np.random.default_rng(4)
    shapes = [(30, 20), (20, 7), (7, 3)]
    scores = _tree(rng, shapes, -2, 2)  # heavy ties
    population = jnp.asarray(rng.uniform(0, 1, (16, 3)), jnp.float32)
    m = jax.jit(jax.vmap(masks.topk, in_axes=(None, 0)))(scores, population)
    ref = jax.jit(jax.vmap(masks.argsort_topk, in_axes=(None, 0)))(scores, population)
    for layer, (leaf, ref_leaf) in enumerate(zip(jax.tree.leaves(m), jax.tree.leaves(ref))):
      self.assertEqual(leaf.shape, (16,) + shapes[layer])
      np.testing.assert_array_equal(leaf, ref_leaf)
      size = int(np.prod(shapes[layer]))
      want = [masks.num_pruned(population[p, layer], size) for p in range(16)]
      got = np.sum(~np.asarray(leaf).reshape(16, -1), axis=1).tolist()
      self.assertEqual(got, want)

  def test_traced_sparsity_does_not_recompile(self):
    scores = {"k": jnp.arange(12.0).reshape(3, 4)}
    f = jax.jit(lambda scores, s: masks.topk(scores, s))  # a fresh cache
    a = f(scores, jnp.float32(0.25))
    b = f(scores, jnp.float32(0.75))
    self.assertEqual(f._cache_size(), 1)  # pylint: disable=protected-access
    self.assertEqual(_pruned(a) + _pruned(b), [3, 9])

  def test_bfloat16_scores(self):
    scores = {"k": jnp.array([[0.5, -2.0, 3.0, 0.25]], jnp.bfloat16)}
    np.testing.assert_array_equal(masks.topk(scores, 0.5)["k"], [[_T, _F, _T, _F]])

  @parameterized.named_parameters(("too_big", 1.5), ("negative", -0.1))
  def test_bad_sparsity_raises(self, value):
    with self.assertRaisesRegex(ValueError, "outside"):
      masks.topk({"k": jnp.ones((2, 2))}, value)

  def test_wrong_vector_length_raises(self):
    with self.assertRaisesRegex(ValueError, "2 prunable leaves"):
      masks.topk({"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}, jnp.array([0.1, 0.2, 0.3]))

  def test_mismatched_tree_raises(self):
    with self.assertRaisesRegex(ValueError, "does not match"):
      masks.topk({"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}, {"a": 0.5})


class GlobalTopkTest(parameterized.TestCase):

  def test_hand_example_ties_across_leaves(self):
    scores = {"a": jnp.array([[1.0, 2.0]]), "b": jnp.array([[1.0, 0.0]]), "c": None}
    m = masks.global_topk(scores, 0.5)
    np.testing.assert_array_equal(m["a"], [[_F, _T]])
    np.testing.assert_array_equal(m["b"], [[_T, _F]])
    self.assertIsNone(m["c"])

  def test_exact_total_and_matches_concatenated_argsort(self):
    rng = np.random.default_rng(5)
    shapes = [(40, 30), (5, 7), (1, 3)]
    scores = _tree(rng, shapes)
    s = 0.37
    m = jax.jit(masks.global_topk)(scores, s)
    flat = np.concatenate([np.asarray(x).reshape(-1) for x in jax.tree.leaves(scores)])
    k = masks.num_pruned(s, flat.size)
    order = np.argsort(flat, kind="stable")
    want = np.ones(flat.size, bool)
    want[order[:k]] = False
    got = np.concatenate([np.asarray(x).reshape(-1) for x in jax.tree.leaves(m)])
    np.testing.assert_array_equal(got, want)


  def test_count_form_traced(self):
    scores = {"a": jnp.array([[3.0, 1.0]]), "b": jnp.array([[2.0, 0.0, 5.0]])}
    f = jax.jit(masks.global_topk_count)
    np.testing.assert_array_equal(f(scores, 3)["a"], [[_T, _F]])
    np.testing.assert_array_equal(f(scores, 3)["b"], [[_F, _F, _T]])
    self.assertEqual(_pruned(f(scores, 9)), [2, 3])  # clipped to the total


class StructuredTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # Column 0 = [3, 0], column 1 = [2, -2]: l1 3 < 4; l2 3 > 2.83; linf 3 > 2.
      ("l1", "l1", [_F, _T]),
      ("l2", "l2", [_T, _F]),
      ("linf", "linf", [_T, _F]),
  )
  def test_neuron_norms(self, norm, keep):
    kernel = jnp.array([[3.0, 2.0], [0.0, -2.0]])
    m = masks.structured({"k": kernel}, 0.5, granularity="neuron", norm=norm)
    np.testing.assert_array_equal(m["k"], [keep, keep])

  def test_filter_of_conv_kernel(self):
    kernel = jnp.zeros((2, 2, 1, 3)).at[..., 0].set(1.0).at[..., 2].set(-2.0)
    kernel = kernel.at[0, 0, 0, 1].set(0.5)
    m = masks.structured({"conv": kernel, "b": None}, 1 / 3, granularity="filter", norm="l1")
    self.assertEqual(m["conv"].shape, (2, 2, 1, 3))
    np.testing.assert_array_equal(m["conv"][0, 0, 0], [_T, _F, _T])
    self.assertTrue(bool((m["conv"] == m["conv"][:1, :1, :1]).all()))
    self.assertIsNone(m["b"])

  def test_vmap_traced_unit_counts(self):
    rng = np.random.default_rng(6)
    scores = {"a": jnp.asarray(rng.normal(size=(5, 8)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(3, 3, 2, 6)), jnp.float32)}
    pop = jnp.asarray(rng.uniform(0, 1, (8, 2)), jnp.float32)
    m = jax.jit(jax.vmap(lambda s: masks.structured(scores, s)))(pop)
    for p in range(8):
      self.assertEqual(int(np.sum(~np.asarray(m["a"][p, 0]))), masks.num_pruned(pop[p, 0], 8))
      self.assertEqual(int(np.sum(~np.asarray(m["b"][p, 0, 0, 0]))),
                       masks.num_pruned(pop[p, 1], 6))

  def test_bad_names_raise(self):
    with self.assertRaisesRegex(ValueError, "granularity='channel'"):
      masks.structured({"k": jnp.ones((2, 2))}, 0.5, granularity="channel")
    with self.assertRaisesRegex(ValueError, "norm='l3'"):
      masks.structured({"k": jnp.ones((2, 2))}, 0.5, norm="l3")


class BlocksTest(parameterized.TestCase):

  def test_two_by_two_blocks(self):
    kernel = jnp.array([[1.0, 1.0, 5.0, 5.0],
                        [1.0, 1.0, 5.0, 5.0],
                        [3.0, 3.0, 0.0, 0.0],
                        [3.0, 3.0, 0.0, 0.0]])
    m = masks.blocks({"k": kernel}, 0.5, block_shape=(2, 2))
    want = np.array([[_F, _F, _T, _T]] * 2 + [[_T, _T, _F, _F]] * 2)
    np.testing.assert_array_equal(m["k"], want)

  def test_partial_edge_blocks_and_conv(self):
    kernel = jnp.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    norms = masks.block_norms({"k": kernel}, (2, 2), "l1")["k"]
    # Blocks: rows {0,1} x cols {0,1}: 1+2+4+5; cols {2}: 3+6; row {2}: 7+8; corner: 9.
    np.testing.assert_allclose(norms, [[12.0, 9.0], [15.0, 9.0]])
    m = masks.blocks({"k": kernel}, 0.25, block_shape=(2, 2), norm="l1")["k"]
    np.testing.assert_array_equal(m[0, 0], [[_T, _T, _F], [_T, _T, _F], [_T, _T, _T]])

  def test_bad_block_shape_raises(self):
    with self.assertRaisesRegex(ValueError, "block_shape"):
      masks.blocks({"k": jnp.ones((4, 4))}, 0.5, block_shape=(0, 2))


class NMTest(parameterized.TestCase):

  def test_two_of_four_along_input_axis(self):
    kernel = jnp.array([[4.0, 1.0], [1.0, 1.0], [3.0, 1.0], [2.0, 1.0],
                        [-9.0, 0.0], [8.0, 0.0], [0.5, 7.0], [0.0, 6.0]])
    m = masks.nm({"k": kernel, "b": None}, 2, 4)
    want = [[_T, _F], [_F, _F], [_T, _T], [_F, _T],
            [_F, _F], [_T, _F], [_T, _T], [_F, _T]]
    np.testing.assert_array_equal(m["k"], want)
    self.assertIsNone(m["b"])

  def test_conv_every_group_has_n(self):
    rng = np.random.default_rng(7)
    kernel = jnp.asarray(rng.integers(-2, 2, (3, 3, 8, 5)), jnp.float32)
    m = masks.nm({"k": kernel}, 1, 4, axis=2)["k"]
    counts = np.asarray(m).reshape(3, 3, 2, 4, 5).sum(axis=3)
    self.assertTrue(np.all(counts == 1))

  def test_bad_arguments_raise(self):
    with self.assertRaisesRegex(ValueError, "multiple of m=4"):
      masks.nm({"k": jnp.ones((6, 2))}, 2, 4)
    with self.assertRaisesRegex(ValueError, "1 <= n <= m"):
      masks.nm({"k": jnp.ones((8, 2))}, 5, 4)


class ApplySummaryCheckTest(parameterized.TestCase):

  def test_apply_zeroes_and_keeps_dtype(self):
    params = {"k": jnp.array([[1.0, jnp.nan], [3.0, 4.0]], jnp.bfloat16), "b": jnp.ones(2)}
    m = {"k": jnp.array([[_T, _F], [_F, _T]]), "b": None}
    out = masks.apply(params, m)
    self.assertEqual(out["k"].dtype, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out["k"], np.float32), [[1.0, 0.0], [0.0, 4.0]])
    self.assertIs(out["b"], params["b"])

  def test_summary_of_masks(self):
    m = {"Dense_0": {"kernel": jnp.array([[_T, _F], [_F, _F]]), "bias": None},
         "Dense_1": {"kernel": jnp.ones((2, 3), bool), "bias": None}}
    s = masks.summary(m)
    self.assertEqual(s["total"], 10)
    self.assertEqual(s["nonzeros"], 7)
    self.assertAlmostEqual(s["sparsity"], 0.3)
    self.assertEqual(s["layers"]["Dense_0/kernel"],
                     {"sparsity": 0.75, "nonzeros": 1, "total": 4})
    self.assertEqual(s["layers"]["Dense_1/kernel"]["sparsity"], 0.0)

  def test_summary_of_params_counts_zeros_of_kernels(self):
    params = {"Dense_0": {"kernel": jnp.array([[0.0, 1.0], [0.0, 2.0]]), "bias": jnp.zeros(2)}}
    s = masks.summary(params)
    self.assertEqual(list(s["layers"]), ["Dense_0/kernel"])
    self.assertAlmostEqual(s["sparsity"], 0.5)
    self.assertEqual(masks.summary(params, filter=None)["total"], 6)

  def test_check_accepts_init(self):
    params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
    masks.check(params, masks.init(params))

  def test_check_names_shape_mismatch(self):
    params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
    bad = {"Dense_0": {"kernel": jnp.ones((3, 2), bool), "bias": None}}
    with self.assertRaisesRegex(ValueError, "Dense_0/kernel"):
      masks.check(params, bad)

  def test_check_names_missing_leaf(self):
    params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
    with self.assertRaisesRegex(ValueError, "Dense_0/bias"):
      masks.check(params, {"Dense_0": {"kernel": jnp.ones((2, 3), bool)}})


if __name__ == "__main__":
  absltest.main()
