"""Tests for evoprune.pruner: the optax wrapper that prunes inside the compiled step."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import evoprune as ep
from evoprune import pruner as pruner_lib


def tiny_params(seed: int = 0):
  k0, k1 = jax.random.split(jax.random.key(seed))
  return {"Dense_0": {"kernel": jax.random.normal(k0, (20, 10)), "bias": jnp.zeros(10)},
          "Dense_1": {"kernel": jax.random.normal(k1, (10, 4)), "bias": jnp.zeros(4)}}


def run(tx, params, steps: int):
  """`steps` updates with random gradients; returns (params, state, compiled step)."""

  @jax.jit
  def step(params, state, key):
    grads = jax.tree.map(lambda x: jax.random.normal(key, x.shape), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for i in range(steps):
    params, state = step(params, state, jax.random.key(i))
  return params, state, step


def layer_sparsity(tree):
  return {k: float(np.mean(np.asarray(v["kernel"]) == 0)) for k, v in tree.items()}


class PrunerTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("sgd_momentum", optax.sgd(0.1, momentum=0.9)),
      ("adam", optax.adam(0.01)),
      ("adamw_decay", optax.adamw(0.01, weight_decay=0.1)),
      ("sgd_l2", optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9))),
  )
  def test_pruned_weights_stay_exactly_zero(self, inner):
    schedule = ep.schedules.polynomial_decay(0.0, 0.8, begin_step=0, end_step=100,
                                             frequency=10)
    pruner = ep.Pruner(importance="wbar", average=ep.importance.RunningAverage("linear"),
                       schedule=schedule)
    params, state, step = run(pruner.wrap(inner), tiny_params(), 200)
    self.assertEqual(step._cache_size(), 1)  # pylint: disable=protected-access
    # 0.8 of 200 and of 40 weights exactly, and pruned means exactly zero.
    self.assertEqual(layer_sparsity(params), {"Dense_0": 0.8, "Dense_1": 0.8})
    for name in ("Dense_0", "Dense_1"):
      mask = np.asarray(state.masks[name]["kernel"])
      kernel = np.asarray(params[name]["kernel"])
      self.assertTrue(np.all(kernel[~mask] == 0.0))
      self.assertTrue(np.all(kernel[mask] != 0.0))
      self.assertIsNone(state.masks[name]["bias"])
    self.assertAlmostEqual(float(state.sparsity), 0.8, places=6)

  def test_moments_of_pruned_weights_are_reset(self):
    pruner = ep.Pruner(schedule=ep.schedules.one_shot(0.5, step=5))
    params, state, _ = run(pruner.wrap(optax.sgd(0.1, momentum=0.9)), tiny_params(), 6)
    trace = state.inner_state[0].trace
    mask = np.asarray(state.masks["Dense_0"]["kernel"])
    # At the update step the moments of pruned weights were zeroed; the masked gradient
    # keeps them zero afterwards.
    self.assertTrue(np.all(np.asarray(trace["Dense_0"]["kernel"])[~mask] == 0.0))
    self.assertTrue(np.any(np.asarray(trace["Dense_0"]["kernel"])[mask] != 0.0))
    self.assertEqual(layer_sparsity(params)["Dense_0"], 0.5)

  def test_instant_magnitude_by_hand(self):
    params = {"Dense_0": {"kernel": jnp.array([[0.1, -3.0], [2.0, -0.5]]),
                          "bias": jnp.array([9.0, 9.0])}}
    masks = ep.Pruner().instant(params, 0.5)
    np.testing.assert_array_equal(masks["Dense_0"]["kernel"], [[False, True], [True, False]])
    self.assertIsNone(masks["Dense_0"]["bias"])

  def test_wbar_ranks_by_the_running_average(self):
    pruner = ep.Pruner(importance="wbar", average=ep.importance.RunningAverage("linear"))
    tx = pruner.wrap(optax.sgd(1.0))
    params = {"Dense_0": {"kernel": jnp.array([[1.0, 1.0]])}}
    state = tx.init(params)
    # Weight 0 has been large for a long time, weight 1 only just became large.
    for w in ([4.0, 0.0], [4.0, 0.0], [1.0, 2.0]):
      params = {"Dense_0": {"kernel": jnp.array([w])}}
      _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    wbar_masks = pruner.instant(params, 0.5, importance_state=state.importance)
    magnitude_masks = ep.Pruner().instant(params, 0.5)
    np.testing.assert_array_equal(wbar_masks["Dense_0"]["kernel"], [[True, False]])
    np.testing.assert_array_equal(magnitude_masks["Dense_0"]["kernel"], [[False, True]])

  def test_erk_follows_the_schedule_globally(self):
    schedule = ep.schedules.polynomial_decay(0.0, 0.9, begin_step=0, end_step=50,
                                             frequency=5)
    pruner = ep.Pruner(schedule=schedule, allocation="erk")
    params, state, _ = run(pruner.wrap(optax.sgd(0.01)), tiny_params(), 51)
    want = ep.allocation.erk(ep.masks.init(params), 0.9)
    got = layer_sparsity(params)
    for name in got:
      self.assertAlmostEqual(got[name], want[name]["kernel"], delta=1.0 / 40)
    self.assertAlmostEqual(ep.masks.summary(state.masks)["sparsity"], 0.9, delta=1e-2)

  def test_global_allocation(self):
    params = {"a": {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]])},
              "b": {"kernel": jnp.array([[0.5, 5.0]])}}
    masks = ep.Pruner(allocation="global").instant(params, 0.5)
    np.testing.assert_array_equal(masks["a"]["kernel"], [[False, False], [True, True]])
    np.testing.assert_array_equal(masks["b"]["kernel"], [[False, True]])

  def test_neuron_and_nm_granularity(self):
    params = tiny_params()
    neuron = ep.Pruner(granularity="neuron").instant(params, 0.5)
    kernel = np.asarray(neuron["Dense_0"]["kernel"])
    self.assertTrue(np.all(kernel.all(axis=0) | ~kernel.any(axis=0)))  # whole columns
    self.assertEqual(int((~kernel.any(axis=0)).sum()), 5)
    params["Dense_1"]["kernel"] = jax.random.normal(jax.random.key(3), (12, 4))
    nm = ep.Pruner(granularity="2:4").instant(params, 0.5)
    groups = np.asarray(nm["Dense_0"]["kernel"]).reshape(5, 4, 10).sum(axis=1)
    np.testing.assert_array_equal(groups, np.full((5, 10), 2))

  def test_random_and_saliency_scores(self):
    params = tiny_params()
    a = ep.Pruner(importance="random", seed=1).instant(params, 0.5)
    b = ep.Pruner(importance="random", seed=2).instant(params, 0.5)
    self.assertFalse(np.array_equal(a["Dense_0"]["kernel"], b["Dense_0"]["kernel"]))
    grads = jax.tree.map(jnp.ones_like, params)
    sal = ep.Pruner(importance="saliency").instant(params, 0.5, grads=grads)
    mag = ep.Pruner().instant(params, 0.5)
    np.testing.assert_array_equal(sal["Dense_0"]["kernel"], mag["Dense_0"]["kernel"])
    with self.assertRaisesRegex(ValueError, "needs gradients"):
      ep.Pruner(importance="saliency").instant(params, 0.5)

  def test_movement_prunes_weights_moving_to_zero(self):
    schedule = ep.schedules.one_shot(0.5, step=3)
    pruner = ep.Pruner(importance="movement", schedule=schedule)
    tx = pruner.wrap(optax.sgd(0.0))
    params = {"d": {"kernel": jnp.array([[1.0, 1.0, -1.0, -1.0]])}}
    state = tx.init(params)
    grads = {"d": {"kernel": jnp.array([[1.0, -1.0, 1.0, -1.0]])}}  # -w*g: -1, 1, 1, -1
    for _ in range(4):
      _, state = tx.update(grads, state, params)
    np.testing.assert_array_equal(state.masks["d"]["kernel"], [[False, True, True, False]])

  def test_nnx_model(self):
    model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu,
                           nnx.Linear(16, 2, rngs=nnx.Rngs(1)))
    graphdef, params = nnx.split(model, nnx.Param)
    pruner = ep.Pruner(schedule=ep.schedules.constant(0.75, begin_step=0, frequency=10))
    tx = pruner.wrap(optax.adam(1e-2))
    state = tx.init(params)
    x = jax.random.normal(jax.random.key(0), (32, 8))
    y = (x[:, 0] > 0).astype(jnp.int32)

    @jax.jit
    def step(params, state):
      def loss(p):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      grads = jax.grad(loss)(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    for _ in range(30):
      params, state = step(params, state)
    pruned = nnx.merge(graphdef, params)
    for layer in (pruned.layers[0], pruned.layers[2]):
      self.assertAlmostEqual(float(jnp.mean(layer.kernel[...] == 0)), 0.75)
      self.assertTrue(bool(jnp.all(layer.bias[...] != 0)))

  def test_filter_masks_cover_bias_and_batchnorm_by_hand(self):
    # Filter L1 norms 3, 1, 2 (conv) and neuron norms 1, 4 (dense): at 1/3, filter 1
    # (round(1/3 * 3) = 1) and neuron 0 (round(1/3 * 2) = 1) go with their dependents.
    params = {"unit": {"conv": {"kernel": jnp.array([[[[1.0, 0.5, -2.0], [2.0, 0.5, 0.0]]]])},
                       "norm": {"scale": jnp.ones(3), "bias": jnp.ones(3)}},
              "z": {"kernel": jnp.array([[1.0, -4.0]]), "bias": jnp.ones(2)}}
    masks = ep.Pruner(granularity="filter").instant(params, 1 / 3)
    np.testing.assert_array_equal(masks["unit"]["conv"]["kernel"][0, 0],
                                  [[True, False, True]] * 2)
    np.testing.assert_array_equal(masks["unit"]["norm"]["scale"], [True, False, True])
    np.testing.assert_array_equal(masks["unit"]["norm"]["bias"], [True, False, True])
    np.testing.assert_array_equal(masks["z"]["bias"], [False, True])
    kernels_only = ep.Pruner(granularity="filter", dependents=None).instant(params, 1 / 3)
    self.assertIsNone(kernels_only["unit"]["norm"]["scale"])
    self.assertIsNone(kernels_only["z"]["bias"])
    # Unstructured masks never cover dependents.
    self.assertIsNone(ep.Pruner().instant(params, 1 / 3)["z"]["bias"])

  def test_unit_owner_names(self):
    self.assertEqual(ep.masks.unit_owner(("b", "unit_0", "norm", "scale")),
                     ("b", "unit_0", "conv", "kernel"))
    self.assertEqual(ep.masks.unit_owner(("Dense_0", "bias")), ("Dense_0", "kernel"))
    self.assertIsNone(ep.masks.unit_owner(("ln_f", "scale")))
    self.assertIsNone(ep.masks.unit_owner(("Dense_0", "kernel")))

  @parameterized.named_parameters(("covered", ep.masks.unit_owner, True),
                                  ("kernels_only", None, False))
  def test_pruned_units_stay_pruned_when_covered(self, dependents, stays):
    # Random scores are redrawn at every update: with dependents covered the pruned
    # neurons (which could not relearn) rank lowest and stay; without, the masks move.
    pruner = ep.Pruner(importance="random", granularity="neuron", dependents=dependents,
                       schedule=ep.schedules.constant(0.5, begin_step=0, frequency=1))
    tx = pruner.wrap(optax.sgd(0.1))
    params = tiny_params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for _ in range(4):
      updates, state = update(jax.tree.map(jnp.ones_like, params), state, params)
      params = optax.apply_updates(params, updates)
      history.append(np.asarray(state.masks["Dense_0"]["kernel"]))
    self.assertEqual(int((~history[-1].any(0)).sum()), 5)
    self.assertEqual(all(np.array_equal(h, history[0]) for h in history), stays)
    if stays:
      bias = np.asarray(params["Dense_0"]["bias"])
      np.testing.assert_array_equal(bias == 0, ~history[-1].any(0))

  @parameterized.named_parameters(
      ("importance", dict(importance="weight"), "importance='weight'"),
      ("wbar_without_average", dict(importance="wbar"), "RunningAverage"),
      ("granularity", dict(granularity="channels"), "granularity='channels'"),
      ("nm_order", dict(granularity="4:2"), "granularity='4:2'"),
      ("allocation", dict(allocation="erdos"), "erdos"),
      ("average_of", dict(average_of="grad"), "average_of='grad'"),
      ("dependents", dict(dependents="norm"), "dependents='norm'"),
  )
  def test_invalid_configuration(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      ep.Pruner(**kwargs)

  def test_allocation_callable(self):
    allocate = functools.partial(ep.allocation.uniform, first_last="dense")
    params = {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((4, 4))},
              "c": {"kernel": jnp.ones((4, 4))}}
    masks = ep.Pruner(allocation=allocate).instant(params, 0.25)
    self.assertEqual([int(m["kernel"].sum()) for m in masks.values()], [16, 4, 16])

  def test_state_is_checkpointable_pytree(self):
    tx = ep.Pruner(importance="wbar", average=ep.importance.RunningAverage("ema")).wrap(
        optax.sgd(0.1))
    state = tx.init(tiny_params())
    self.assertIsInstance(state, pruner_lib.PrunerState)
    self.assertTrue(all(isinstance(x, jax.Array) for x in jax.tree.leaves(state)))


if __name__ == "__main__":
  absltest.main()
