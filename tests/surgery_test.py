"""Tests for structured surgery: equality with the masked model, ties, folding, errors, reload."""

import functools
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import evoprune as ep
from evoprune import training

# name, create() keywords, input shape, whether pruned channels can carry constants into
# zero-padded 3x3 convolutions (then `zero_pruned` comes first).
_ZOO = {
    "mlp": ("mlp", dict(widths=(12, 10)), (6, 6, 1), False),
    "lenet5": ("lenet5", {}, (32, 32, 3), False),
    "thesis_cnn": ("thesis_cnn", {}, (32, 32, 3), False),
    "resnet20": ("resnet20", dict(width=4), (8, 8, 3), True),
    "mobilenet": ("mobilenet", dict(width_multiplier=0.0625), (16, 16, 3), False),
    "squeezenet": ("squeezenet", dict(dropout=0.0), (8, 8, 3), True),
}


def _random_variables(model, x, seed=0):
  """Random variables with the model's shapes, drawn with numpy (compiling the real
  initialisers costs seconds per model). Biases, BatchNorm affine parameters and statistics
  are random too: init's 0 and 1 would hide every constant a pruned channel carries."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  out = []
  for path, leaf in flat:
    name, shape = ep.masks.path_str(path), leaf.shape
    if name.endswith("kernel"):
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif name.endswith("var"):
      value = rng.uniform(0.5, 2.0, shape)
    else:
      value = 0.3 * rng.normal(size=shape)
    out.append(jnp.asarray(value, jnp.float32))
  return treedef.unflatten(out)


def _setup(name):
  zoo_name, kwargs, shape, padded = _ZOO[name]
  model = ep.models.create(zoo_name, **kwargs)
  x = jax.random.normal(jax.random.key(1), (2, *shape))
  return model, dict(_random_variables(model, x)), x, padded


def _apply(model, variables, x):
  # One compiled call is much faster than op-by-op dispatch for the deeper models.
  return jax.jit(model.apply)(variables, x)


def _masked_apply(model, variables, masks, x):
  return _apply(model, {**variables, "params": ep.masks.apply(variables["params"], masks)}, x)


def _size(tree):
  return sum(a.size for a in jax.tree.leaves(tree))


class ShrinkEqualityTest(parameterized.TestCase):

  @parameterized.product(name=list(_ZOO), sparsity=[0.3, 0.7])
  def test_same_outputs_as_masked_model(self, name, sparsity):
    model, variables, x, padded = _setup(name)
    masks = ep.surgery.structured(model, variables["params"], sparsity)
    if padded:
      variables = ep.surgery.zero_pruned(model, variables, masks)
    small_model, small = ep.surgery.shrink(model, variables, masks)
    self.assertIs(type(small_model), type(model))
    self.assertLess(_size(small["params"]), 0.85 * _size(variables["params"]))
    np.testing.assert_allclose(_apply(small_model, small, x),
                               _masked_apply(model, variables, masks, x), atol=1e-5)

  def test_no_pruning_keeps_the_model(self):
    model, variables, x, _ = _setup("resnet20")
    masks = ep.surgery.structured(model, variables["params"], 0.0)
    small_model, small = ep.surgery.shrink(model, variables, masks)
    self.assertEqual(_size(small), _size(variables))
    np.testing.assert_allclose(_apply(small_model, small, x), _apply(model, variables, x),
                               atol=1e-6)


class FoldingTest(absltest.TestCase):

  def test_pruned_neuron_bias_folds_into_next_bias(self):
    # 2 -> 2 -> 1 MLP; neuron 0 is pruned but emits relu(0.5) = 0.5, which reaches the
    # output through weight 1: the shrunk output bias is 0.1 + 0.5 * 1 = 0.6.
    model = ep.models.create("mlp", widths=(2,), num_classes=1)
    params = {"Dense_0": {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]]),
                          "bias": jnp.array([0.5, -1.0])},
              "Dense_1": {"kernel": jnp.array([[1.0], [2.0]]), "bias": jnp.array([0.1])}}
    masks = {"Dense_0": {"kernel": jnp.array([[False, True], [False, True]]), "bias": None},
             "Dense_1": {"kernel": jnp.ones((2, 1), bool), "bias": None}}
    small_model, small = ep.surgery.shrink(model, params, masks)
    self.assertEqual(tuple(small_model.widths), (1,))
    np.testing.assert_allclose(small["Dense_0"]["kernel"], [[2.0], [4.0]])
    np.testing.assert_allclose(small["Dense_0"]["bias"], [-1.0])
    np.testing.assert_allclose(small["Dense_1"]["kernel"], [[2.0]])
    np.testing.assert_allclose(small["Dense_1"]["bias"], [0.6], rtol=1e-6)

  def test_flatten_rows_follow_channels(self):
    model, variables, x, _ = _setup("thesis_cnn")
    masks = ep.surgery.structured(model, variables["params"], 0.5)
    small_model, small = ep.surgery.shrink(model, variables["params"], masks)
    self.assertEqual(tuple(small_model.features), (16, 32, 32, 32))
    self.assertEqual(small["Dense_0"]["kernel"].shape, (4 * 4 * 32, 32))
    np.testing.assert_allclose(_apply(small_model, {"params": small}, x),
                               _masked_apply(model, variables, masks, x), atol=1e-5)

  def test_zero_columns_shrink_without_masks(self):
    model, variables, x, _ = _setup("mlp")
    params = jax.tree.map(lambda a: a, variables["params"])
    params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].at[:, :5].set(0.0)
    small_model, small = ep.surgery.shrink(model, params)
    self.assertEqual(tuple(small_model.widths), (7, 10))
    np.testing.assert_allclose(_apply(small_model, {"params": small}, x),
                               _apply(model, {"params": params}, x), atol=1e-5)


class PrunerFilterTest(parameterized.TestCase):
  """A model trained with ep.Pruner(granularity='filter') shrinks to what it computes."""

  def _train(self, dependents):
    # ResNet-8 (one block per stage): the residual groups and stage transitions of
    # ResNet-20 at a third of the compile time.
    model = ep.models.create("resnet20", width=4, depth=8)
    x = jax.random.normal(jax.random.key(1), (16, 8, 8, 3))
    y = jnp.arange(16) % 10
    pruner = ep.Pruner(granularity="filter", dependents=dependents,
                       schedule=ep.schedules.polynomial_decay(0.0, 0.5, begin_step=0,
                                                              end_step=6, frequency=3))
    tx = pruner.wrap(optax.sgd(0.05, momentum=0.9))
    state = training.create_train_state(model, tx, jax.random.key(0), x[:1])
    step = jax.jit(lambda s: training.train_step(s, x, y, model=model, tx=tx))
    for _ in range(10):  # BatchNorm trains on batch statistics, running ones update
      state, _ = step(state)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return model, variables, state.opt_state.masks, x

  def test_trained_model_shrinks_exactly(self):
    model, variables, masks, x = self._train(ep.masks.unit_owner)
    small_model, small = ep.surgery.shrink(model, variables, masks)  # strict: nothing kept
    # Half the filters of every unit_0 (inner) convolution go: 4 -> 2, 8 -> 4, 16 -> 8.
    self.assertEqual(tuple(small_model.inner_widths), (2, 4, 8))
    masked = {**variables, "params": ep.masks.apply(variables["params"], masks)}
    self.assertLessEqual(float(jnp.max(jnp.abs(_apply(small_model, small, x) -
                                               _apply(model, masked, x)))), 1e-5)
    train = lambda m, v: jax.jit(functools.partial(m.apply, train=True,
                                                   mutable=["batch_stats"]))(v, x)[0]
    np.testing.assert_allclose(train(small_model, small), train(model, masked), atol=1e-5)

  def test_kernel_only_masks_leave_batchnorm_shifts(self):
    model, variables, masks, _ = self._train(None)
    with self.assertRaisesRegex(ValueError, "zero-padded convolution"):
      ep.surgery.shrink(model, variables, masks)


class TiedChannelsTest(absltest.TestCase):

  def test_resnet_residual_groups_shrink_together(self):
    model, variables, x, _ = _setup("resnet20")
    masks = ep.surgery.structured(model, variables["params"], 0.5)
    variables = ep.surgery.zero_pruned(model, variables, masks)
    keep = ep.surgery.plan(model, variables, masks)
    for stage in ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9)):
      for b in stage[1:]:
        np.testing.assert_array_equal(keep[f"block_{b:02d}"], keep[f"block_{stage[0]:02d}"])
    # Option A carries stage-1 channel c to stage-2 channel c + 2: kept ones stay kept.
    kept_1 = np.flatnonzero(keep["block_00"])
    self.assertTrue(keep["block_04"][kept_1 + 2].all())
    small_model, small = ep.surgery.shrink(model, variables, masks)
    self.assertEqual(tuple(small_model.stage_widths), (2, 4, 8))
    self.assertEqual(tuple(small_model.inner_widths), (2,) * 3 + (4,) * 3 + (8,) * 3)
    # Channels are ordered so that the shortcuts are plain option-A padding again.
    self.assertIsNone(small_model.shortcuts)
    np.testing.assert_allclose(_apply(small_model, small, x),
                               _masked_apply(model, variables, masks, x), atol=1e-5)

  def test_resnet_training_mode_after_zero_pruned(self):
    model, variables, x, _ = _setup("resnet20")
    masks = ep.surgery.structured(model, variables["params"], 0.5)
    variables = ep.surgery.zero_pruned(model, variables, masks)
    small_model, small = ep.surgery.shrink(model, variables, masks)
    train = lambda m, v: jax.jit(functools.partial(m.apply, train=True,
                                                   mutable=["batch_stats"]))(v, x)
    out, _ = train(model, {**variables, "params": ep.masks.apply(variables["params"], masks)})
    small_out, _ = train(small_model, small)
    np.testing.assert_allclose(small_out, out, atol=1e-5)

  def test_resnet_untied_masks_keep_disagreeing_channels(self):
    # Per-layer filter masks disagree inside residual groups: those channels stay.
    model, variables, x, _ = _setup("resnet20")
    masks = ep.masks.structured(variables["params"], 0.5, granularity="filter")
    variables = ep.surgery.zero_pruned(model, variables, masks)
    small_model, small = ep.surgery.shrink(model, variables, masks)
    self.assertGreater(small_model.stage_widths[0], 2)
    self.assertEqual(tuple(small_model.inner_widths), (2,) * 3 + (4,) * 3 + (8,) * 3)
    np.testing.assert_allclose(_apply(small_model, small, x),
                               _masked_apply(model, variables, masks, x), atol=1e-5)

  def test_resnet_explicit_shortcut_maps(self):
    # Shortcuts that carry only stage-1 channel 0 and reverse stage 2: two stage-1
    # channels stay, so padding cannot carry them and an explicit map remains.
    model = ep.models.create("resnet20", width=4, shortcuts=(
        (-1, -1, 0, -1, -1, -1, -1, -1), tuple(range(7, -1, -1)) + (-1,) * 8))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    variables = dict(_random_variables(model, x))
    masks = ep.surgery.structured(model, variables["params"], 0.5)
    variables = ep.surgery.zero_pruned(model, variables, masks)
    small_model, small = ep.surgery.shrink(model, variables, masks)
    self.assertIsNotNone(small_model.shortcuts)
    self.assertLess(_size(small["params"]), 0.6 * _size(variables["params"]))
    np.testing.assert_allclose(_apply(small_model, small, x),
                               _masked_apply(model, variables, masks, x), atol=1e-5)

  def test_mobilenet_depthwise_follows_its_input(self):
    model, variables, _, _ = _setup("mobilenet")
    masks = ep.surgery.structured(model, variables["params"], 0.5)
    _, small = ep.surgery.shrink(model, variables, masks)
    p = small["params"]
    for b in range(1, 14):
      prev = p[f"block_{b - 1:02d}"]["pw" if b > 1 else "conv"]
      prev = prev["conv"]["kernel"] if b > 1 else prev["kernel"]
      self.assertEqual(p[f"block_{b:02d}"]["dw"]["conv"]["kernel"].shape[-1], prev.shape[-1])

  def test_squeezenet_concatenation_feeds_next_squeeze(self):
    model, variables, _, _ = _setup("squeezenet")
    masks = ep.surgery.structured(model, variables["params"], 0.5)
    variables = ep.surgery.zero_pruned(model, variables, masks)
    small_model, small = ep.surgery.shrink(model, variables, masks)
    squeeze, e1, e3 = small_model.fires[0]
    self.assertEqual((squeeze, e1, e3), (8, 32, 32))
    self.assertEqual(small["params"]["block_02"]["conv_squeeze"]["kernel"].shape[-2], e1 + e3)


class StructuredMasksTest(absltest.TestCase):

  def test_counts_per_family_and_output_kept(self):
    model, variables, _, _ = _setup("thesis_cnn")
    masks = ep.surgery.structured(model, variables["params"], 0.3)
    kept = {k: int(v["kernel"][..., :].reshape(-1, v["kernel"].shape[-1]).all(0).sum())
            for k, v in masks.items()}
    # round(0.3 * 32) = 10 and round(0.3 * 64) = 19 filters pruned; logits never.
    self.assertEqual(kept, {"Conv_0": 22, "Conv_1": 45, "Conv_2": 45, "Dense_0": 45,
                            "Dense_1": 10})
    self.assertIsNone(masks["Conv_0"]["bias"])

  def test_lowest_norm_filters_go(self):
    model = ep.models.create("mlp", widths=(4,), num_classes=2)
    params = {"Dense_0": {"kernel": jnp.array([[3.0, -1.0, 0.5, 2.0]]), "bias": jnp.zeros(4)},
              "Dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
    masks = ep.surgery.structured(model, params, 0.5)
    np.testing.assert_array_equal(masks["Dense_0"]["kernel"][0], [True, False, False, True])

  def test_multiple_of_rounds_kept_channels(self):
    model, variables, _, _ = _setup("thesis_cnn")
    masks = ep.surgery.structured(model, variables["params"], 0.3, multiple_of=8)
    kept = [int(masks[k]["kernel"].reshape(-1, masks[k]["kernel"].shape[-1]).all(0).sum())
            for k in ("Conv_0", "Conv_1", "Conv_2", "Dense_0")]
    # 22 -> 24 of 32, 45 -> 48 of 64.
    self.assertEqual(kept, [24, 48, 48, 48])
    with self.assertRaisesRegex(ValueError, "multiple_of=0"):
      ep.surgery.structured(model, variables["params"], 0.3, multiple_of=0)

  def test_keeps_one_channel(self):
    model, variables, _, _ = _setup("mlp")
    masks = ep.surgery.structured(model, variables["params"], 0.99)
    small_model, _ = ep.surgery.shrink(model, variables["params"], masks)
    self.assertEqual(tuple(small_model.widths), (1, 1))

  def test_bad_sparsity(self):
    model, variables, _, _ = _setup("mlp")
    with self.assertRaisesRegex(ValueError, "sparsity=1.0"):
      ep.surgery.structured(model, variables["params"], 1.0)


class ErrorsTest(absltest.TestCase):

  def test_unfoldable_constant_is_an_error_or_kept(self):
    model, variables, x, _ = _setup("resnet20")
    masks = ep.surgery.structured(model, variables["params"], 0.5)
    with self.assertRaisesRegex(ValueError, "zero-padded convolution.*zero_pruned"):
      ep.surgery.shrink(model, variables, masks)
    small_model, small = ep.surgery.shrink(model, variables, masks, strict=False)
    self.assertGreater(_size(small), 0)
    np.testing.assert_allclose(_apply(small_model, small, x),
                               _masked_apply(model, variables, masks, x), atol=1e-5)

  def test_unsupported_model(self):
    model = ep.models.create("vit", num_classes=10, patch_size=4, width=8, depth=1,
                             num_heads=2, mlp_dim=8)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    with self.assertRaisesRegex(ValueError, "does not support ViT.*CifarResNet"):
      ep.surgery.shrink(model, params, None)

  def test_batchnorm_needs_variables(self):
    model, variables, _, _ = _setup("resnet20")
    with self.assertRaisesRegex(ValueError, "batch_stats"):
      ep.surgery.shrink(model, variables["params"], None)

  def test_masks_must_fit(self):
    model, variables, _, _ = _setup("mlp")
    masks = ep.masks.init(variables["params"])
    masks["Dense_0"]["kernel"] = masks["Dense_0"]["kernel"][:, :3]
    with self.assertRaisesRegex(ValueError, "Dense_0/kernel"):
      ep.surgery.shrink(model, variables["params"], masks)


class PhysicalCostTest(absltest.TestCase):

  def test_thesis_cnn_half_filters_by_hand(self):
    model, variables, _, _ = _setup("thesis_cnn")
    masks = ep.surgery.structured(model, variables["params"], 0.5)
    cost = ep.cost.report(model, variables["params"], masks, (32, 32, 3), physical=True)
    # 30*30*16*27 + 13*13*32*144 + 4*4*32*288 + 512*32 + 32*10
    self.assertEqual(cost["macs"]["physical"], 1_331_712)
    self.assertEqual(cost["layers"]["Conv_1/kernel"]["macs_physical"], 778_752)
    self.assertEqual(cost["macs"]["dense"], 4_548_608)
    self.assertIn("MACs phys.", ep.cost.format_table(cost))


class TrainAndReloadTest(absltest.TestCase):

  def test_shrunk_model_trains_and_reloads(self):
    model, variables, x, _ = _setup("thesis_cnn")
    masks = ep.surgery.structured(model, variables["params"], 0.5)
    small_model, small = ep.surgery.shrink(model, variables["params"], masks)
    tx = optax.sgd(0.01)
    state = training.create_train_state(small_model, tx, jax.random.key(0), x[:1])
    state = state.replace(params=small, opt_state=tx.init(small))
    y = jnp.array([1, 3])
    step = jax.jit(lambda s: training.train_step(s, x, y, model=small_model, tx=tx))
    losses = []
    for _ in range(5):
      state, metrics = step(state)
      losses.append(float(metrics["loss"]))
    self.assertLess(losses[-1], losses[0])
    with tempfile.TemporaryDirectory() as tmp:
      checkpointer = ocp.StandardCheckpointer()
      checkpointer.save(f"{tmp}/ckpt", state.params)
      checkpointer.wait_until_finished()
      # The smaller model is rebuilt from its width fields alone.
      rebuilt = ep.models.create("thesis_cnn", features=small_model.features)
      target = jax.eval_shape(rebuilt.init, jax.random.key(0), x[:1])["params"]
      restored = checkpointer.restore(f"{tmp}/ckpt", target)
    np.testing.assert_allclose(rebuilt.apply({"params": restored}, x),
                               small_model.apply({"params": state.params}, x), atol=1e-6)


if __name__ == "__main__":
  absltest.main()
