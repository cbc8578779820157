"""Tests for the model zoo: parameter counts, shapes, modes, flatten order, prunable leaves."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

import evoprune as ep
from evoprune.models import resnet

# RBG keys compile much faster than threefry on XLA:CPU; the values do not matter here.
_KEY = jax.random.key(0, impl="rbg")
_IMAGE = (32, 32, 3)


def _fast_jit(fun=None, **kwargs):
  """jax.jit without XLA's backend optimisations: compiling each model's many random
  initialisers dominates this file's run time, and halves this way (on this call
  only, unlike the global `jax_disable_most_optimizations`)."""
  options = {"xla_backend_optimization_level": 0}
  if fun is None:
    return lambda f: jax.jit(f, compiler_options=options, **kwargs)
  return jax.jit(fun, compiler_options=options, **kwargs)


# name, create() kwargs, one example's input shape.
_ZOO = (
    ("mlp", {}, (28, 28, 1)),
    ("mlp_paper", {}, (28, 28, 1)),
    ("lenet300_100", {}, (28, 28, 1)),
    ("lenet5", {}, _IMAGE),
    ("thesis_cnn", {}, _IMAGE),
    ("resnet20", {}, _IMAGE),
    ("mobilenet", dict(width_multiplier=0.25), _IMAGE),  # small: unoptimised init runs slowly
    ("squeezenet", {}, _IMAGE),
    ("vit", {}, _IMAGE),
    ("gpt", {}, (8,)),
    ("tinygpt", dict(n_layer=1), (8,)),  # the preset's choices, one block for speed
)


def _dummy(model, shape, batch=2):
  dtype = getattr(model, "input_dtype", jnp.float32)
  if dtype == jnp.int32:
    return jnp.arange(batch * shape[0], dtype=dtype).reshape(batch, *shape) % 7
  return jax.random.normal(jax.random.key(1), (batch, *shape))


def _abstract_variables(model, x):
  return jax.eval_shape(
      lambda: model.init({"params": _KEY, "dropout": _KEY}, x, train=False))


def _count(params):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def _mobilenet_count(alpha, classes):
  """MobileNet v1 (paper Table 1, stride-1 stem) with BatchNorm scale+bias, by hand."""
  channels = lambda c: max(1, int(c * alpha))
  outs = (64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
  c_in = channels(32)
  total = 3 * 3 * 3 * c_in + 2 * c_in
  for out in map(channels, outs):
    total += 3 * 3 * c_in + 2 * c_in + c_in * out + 2 * out  # depthwise, pointwise
    c_in = out
  return total + c_in * classes + classes


def _transformer_block_count(width, hidden, qkv_bias=True):
  return (2 * width                                  # LayerNorm
          + width * 3 * width + qkv_bias * 3 * width  # fused q/k/v
          + width * width + width                     # attention output
          + 2 * width                                 # LayerNorm
          + width * hidden + hidden + hidden * width + width)  # MLP


class ParameterCountTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("lenet300_100", "lenet300_100", {}, (28, 28, 1), 266_610),
      ("mlp_paper", "mlp_paper", {}, (28, 28, 1), 242_762),
      ("mlp_default_is_paper", "mlp", {}, (28, 28, 1), 242_762),
      ("lenet5", "lenet5", {}, _IMAGE, 62_006),
      ("thesis_cnn", "thesis_cnn", {}, _IMAGE, 122_570),
      # Option A shortcuts; hand count in resnet.py's docstring.
      ("resnet20", "resnet20", {}, _IMAGE, 269_722),
      # torchvision's SqueezeNet 1.0 fire modules (721,216) + 3x3x3x96 stem + 1x1 head.
      ("squeezenet", "squeezenet", {}, _IMAGE, 721_216 + 2_688 + 5_130),
      ("mobilenet", "mobilenet", {}, _IMAGE, _mobilenet_count(1.0, 10)),
      ("mobilenet_half", "mobilenet", dict(width_multiplier=0.5, num_classes=100), _IMAGE,
       _mobilenet_count(0.5, 100)),
      ("vit", "vit", {}, _IMAGE,
       (4 * 4 * 3 * 128 + 128 + 64 * 128) + 4 * _transformer_block_count(128, 512)
       + 2 * 128 + 128 * 10 + 10),
      ("gpt_tied", "gpt", {}, (8,),
       65 * 128 + 64 * 128 + 4 * _transformer_block_count(128, 512) + 2 * 128),
      ("tinygpt", "tinygpt", {}, (8,), 10_788_929),
  )
  def test_parameter_count(self, name, kwargs, shape, expected):
    model = ep.models.create(name, **kwargs)
    variables = _abstract_variables(model, _dummy(model, shape))
    self.assertEqual(_count(variables["params"]), expected)

  def test_tinygpt_is_the_papers_10_79m(self):
    model = ep.models.create("tinygpt")
    count = _count(_abstract_variables(model, _dummy(model, (8,)))["params"])
    self.assertEqual(round(count / 1e6, 2), 10.79)

  def test_resnet_count_is_the_published_0_27m(self):
    model = ep.models.create("resnet20")
    count = _count(_abstract_variables(model, _dummy(model, _IMAGE))["params"])
    self.assertEqual(round(count / 1e6, 2), 0.27)


class ForwardTest(parameterized.TestCase):

  @parameterized.named_parameters((name, name, kwargs, shape) for name, kwargs, shape in _ZOO)
  def test_eval_and_train_modes(self, name, kwargs, shape):
    model = ep.models.create(name, **kwargs)
    x = _dummy(model, shape)
    variables = _fast_jit(model.init, static_argnames="train")(
        {"params": _KEY, "dropout": _KEY}, x, train=False)
    classes = 65 if "gpt" in name else 10
    expected = (2, shape[0], classes) if "gpt" in name else (2, classes)

    @_fast_jit  # one compilation for both modes
    def run(variables, x):
      train = lambda key: model.apply(
          variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
      return (model.apply(variables, x, train=False), train(jax.random.key(2, impl="rbg")),
              train(jax.random.key(3, impl="rbg"))[0])

    logits, (logits_a, updates), logits_b = run(variables, x)
    self.assertEqual(logits.shape, expected)
    self.assertEqual(logits.dtype, jnp.float32)
    self.assertTrue(bool(jnp.all(jnp.isfinite(logits))))
    self.assertEqual(logits_a.shape, expected)
    self.assertTrue(bool(jnp.all(jnp.isfinite(logits_a))))
    if "batch_stats" in variables:
      old = jax.tree.leaves(variables["batch_stats"])
      new = jax.tree.leaves(updates["batch_stats"])
      self.assertLen(new, len(old))
      self.assertTrue(any(not np.allclose(a, b) for a, b in zip(old, new)))
    else:
      self.assertEqual(dict(updates), {})
    uses_dropout = name in ("squeezenet", "tinygpt")  # rate > 0 by default
    self.assertEqual(not np.allclose(logits_a, logits_b), uses_dropout)

  def test_gpt_is_causal(self):
    model = ep.models.create("gpt", vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)
    tokens = jnp.array([[1, 2, 3, 4, 5, 6]])
    variables = _fast_jit(model.init)({"params": _KEY}, tokens)
    changed = tokens.at[0, 3].set(9)
    before, after = _fast_jit(jax.vmap(model.apply, (None, 0)))(
        variables, jnp.stack([tokens, changed]))
    np.testing.assert_allclose(before[:, :3], after[:, :3], rtol=1e-6)
    self.assertFalse(np.allclose(before[:, 3:], after[:, 3:]))

  def test_gpt_tied_head_uses_the_token_embedding(self):
    tokens = jnp.zeros((1, 4), jnp.int32)
    model = ep.models.create("gpt", vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)
    params = _abstract_variables(model, tokens)["params"]
    self.assertNotIn("w_out", params["head"])
    untied = ep.models.create("gpt", vocab_size=5, block_size=4, n_layer=1, n_head=1,
                              n_embd=4, tie_embeddings=False)
    params = _abstract_variables(untied, tokens)["params"]
    self.assertEqual(params["head"]["w_out"]["kernel"].shape, (4, 5))

  def test_resnet_option_a_shortcut(self):
    # With all variables zero the residual branch is 0 (BatchNorm scale and shift 0),
    # so the block returns relu(shortcut): x subsampled with stride 2 and zero-padded
    # from 4 to 8 channels, 2 on each side.
    block = resnet.BasicBlock(8, strides=2)
    x = jax.random.normal(jax.random.key(4), (1, 4, 4, 4))
    variables = jax.eval_shape(block.init, _KEY, x)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
    out = _fast_jit(block.apply)(zeros, x)
    expected = np.zeros((1, 2, 2, 8), np.float32)
    expected[..., 2:6] = np.maximum(np.asarray(x)[:, ::2, ::2, :], 0)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    self.assertEqual(sorted(variables["params"]), ["unit_0", "unit_1"])


def _module_use_order(model, variables, x):
  """Modules owning parameters, in the order the forward pass first reads them."""
  rest = {k: v for k, v in variables.items() if k != "params"}
  closed = jax.make_jaxpr(
      lambda p, rest: model.apply({"params": p, **rest}, x, train=False))(
          variables["params"], rest)
  paths = [ep.models.path_names(p) for p, _ in
           jax.tree.flatten_with_path(variables["params"])[0]]
  owner = dict(zip(closed.jaxpr.invars, [path[:-1] for path in paths]))
  order = []
  for eqn in closed.jaxpr.eqns:
    for var in eqn.invars:
      if isinstance(var, jax_core.Var) and var in owner and owner[var] not in order:
        order.append(owner[var])
  return order


def _module_flatten_order(params):
  order = []
  for path, _ in jax.tree.flatten_with_path(params)[0]:
    module = ep.models.path_names(path)[:-1]
    if module not in order:
      order.append(module)
  return order


class FlattenOrderTest(parameterized.TestCase):

  @parameterized.named_parameters((name, name, kwargs, shape) for name, kwargs, shape in _ZOO)
  def test_flatten_order_is_forward_order(self, name, kwargs, shape):
    model = ep.models.create(name, **kwargs)
    x = _dummy(model, shape, batch=1)
    variables = _abstract_variables(model, x)
    self.assertEqual(_module_flatten_order(variables["params"]),
                     _module_use_order(model, variables, x))

  @parameterized.named_parameters(
      ("lenet300_100", "lenet300_100", (28, 28, 1), "Dense_0/kernel", "Dense_2/kernel", 3),
      ("lenet5", "lenet5", _IMAGE, "Conv_0/kernel", "Dense_2/kernel", 5),
      ("resnet20", "resnet20", _IMAGE, "block_00/conv/kernel", "head/kernel", 20),
      ("mobilenet", "mobilenet", _IMAGE, "block_00/conv/kernel", "head/kernel", 28),
      ("squeezenet", "squeezenet", _IMAGE, "block_00/kernel", "head/kernel", 26),
      ("vit", "vit", _IMAGE, "embed/patch/kernel", "head/w_out/kernel", 18),
      ("gpt_tied", "gpt", (8,), "h_00/attn/qkv/kernel", "h_03/mlp/w_out/kernel", 16),
      ("tinygpt", "tinygpt", (8,), "h_00/attn/qkv/kernel", "head/w_out/kernel", 25),
  )
  def test_first_and_last_prunable_leaves(self, name, shape, first, last, count):
    model = ep.models.create(name)
    params = _abstract_variables(model, _dummy(model, shape, batch=1))["params"]
    flags = ep.models.prunable(params, model)
    flat = jax.tree.flatten_with_path(flags, is_leaf=lambda v: v is None)[0]
    names = ["/".join(ep.models.path_names(p)) for p, flag in flat if flag]
    self.assertLen(names, count)
    self.assertEqual((names[0], names[-1]), (first, last))

  def test_deep_mlp_uses_zero_padded_names(self):
    model = ep.models.create("mlp", widths=(4,) * 11)
    params = _abstract_variables(model, jnp.zeros((1, 3)))["params"]
    self.assertEqual(list(params), [f"Dense_{i:02d}" for i in range(12)])


class PrunableTest(absltest.TestCase):

  def test_default_rule(self):
    params = {
        "Dense_0": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)},
        "LayerNorm_0": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)},
        "embed": {"embedding": jnp.zeros((5, 4))},
        "conv": {"kernel": jnp.zeros((3, 3, 1, 4))},
        "odd": {"kernel": jnp.zeros(4)},  # a 1-D "kernel" is not a weight matrix
    }
    expected = {
        "Dense_0": {"kernel": True, "bias": None},
        "LayerNorm_0": {"scale": None, "bias": None},
        "embed": {"embedding": None},
        "conv": {"kernel": True},
        "odd": {"kernel": None},
    }
    self.assertEqual(ep.models.prunable(params), expected)

  def test_mobilenet_can_keep_depthwise_dense(self):
    x = jnp.zeros((1, *_IMAGE))
    model = ep.models.create("mobilenet", prune_depthwise=False)
    params = _abstract_variables(model, x)["params"]
    flags = ep.models.prunable(params, model)
    self.assertIsNone(flags["block_01"]["dw"]["conv"]["kernel"])
    self.assertTrue(flags["block_01"]["pw"]["conv"]["kernel"])
    self.assertTrue(ep.models.prunable(params)["block_01"]["dw"]["conv"]["kernel"])
    self.assertLen([f for f in jax.tree.leaves(flags) if f], 28 - 13)


class CreateTest(parameterized.TestCase):

  def test_unknown_name_lists_valid_names(self):
    with self.assertRaisesRegex(ValueError, "resnet20.*"):
      ep.models.create("resnet18")

  def test_unknown_keyword(self):
    with self.assertRaisesRegex(ValueError, "width_multiplier"):
      ep.models.create("lenet5", width_multiplier=2.0)

  @parameterized.named_parameters(
      ("mlp_widths", "mlp", dict(widths=()), "widths"),
      ("resnet_depth", "resnet20", dict(depth=21), "depth=21"),
      ("mobilenet_width", "mobilenet", dict(width_multiplier=0.0), "width_multiplier"),
      ("squeezenet_dropout", "squeezenet", dict(dropout=1.5), "dropout=1.5"),
      ("vit_heads", "vit", dict(width=30, num_heads=4), "width=30"),
      ("gpt_heads", "gpt", dict(n_embd=10, n_head=3), "n_embd=10"),
      ("gpt_activation", "gpt", dict(activation="tanh"), "tanh"),
      ("num_classes", "lenet5", dict(num_classes=0), "num_classes=0"),
      ("vocab_mismatch", "gpt", dict(num_classes=10, vocab_size=65), "vocab_size"),
  )
  def test_invalid_values(self, name, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      ep.models.create(name, **kwargs)

  def test_num_classes_sets_the_vocabulary_of_a_language_model(self):
    self.assertEqual(ep.models.create("tinygpt", num_classes=50).vocab_size, 50)
    self.assertEqual(ep.models.create("tinygpt").vocab_size, 65)

  def test_preset_keywords_can_be_overridden(self):
    model = ep.models.create("tinygpt", dropout=0.0, n_layer=2)
    self.assertEqual((model.dropout, model.n_layer, model.n_embd), (0.0, 2, 384))

  def test_too_long_sequence_raises(self):
    model = ep.models.create("gpt", block_size=4)
    with self.assertRaisesRegex(ValueError, "block_size=4"):
      model.init({"params": _KEY}, jnp.zeros((1, 5), jnp.int32))

  def test_patch_size_must_divide_the_image(self):
    model = ep.models.create("vit", patch_size=5)
    with self.assertRaisesRegex(ValueError, "patch_size=5"):
      jax.eval_shape(model.init, {"params": _KEY}, jnp.zeros((1, *_IMAGE)))


class InitTest(parameterized.TestCase):
  """`ep.models.init`: flax's variables, its threefry numbers drawn flat."""

  def test_flat_draws_are_threefrys_numbers(self):
    key = jax.random.key(3)
    draws = jax.jit(lambda k: (jax.random.normal(k, (2, 3, 4, 5)),
                               jax.random.bits(k, (3, 1, 7))))
    for a, e in zip(draws(ep.models._flat_draws(key)), draws(key)):  # pylint: disable=protected-access
      np.testing.assert_array_equal(a, e)

  @parameterized.named_parameters(
      ("typed_key", "lenet5", {}, lambda: jax.random.key(3)),
      ("raw_key", "lenet5", {}, lambda: jax.random.PRNGKey(3)),
      ("dict_of_keys", "gpt", dict(n_layer=1, n_embd=16, n_head=2, block_size=8),
       lambda: {"params": jax.random.key(3), "dropout": jax.random.key(4)}),
      ("rbg_key", "lenet5", {}, lambda: jax.random.key(3, impl="rbg")),
      ("unhashable_module", "mlp", dict(widths=[4]), lambda: jax.random.key(3)),
  )
  def test_same_variables_as_flax_init(self, name, kwargs, rngs):
    model = ep.models.create(name, **kwargs)
    x = jnp.zeros((1, 8), jnp.int32) if name == "gpt" else jnp.zeros((1, 32, 32, 3))
    expected = _fast_jit(model.init, static_argnames="train")(rngs(), x, train=False)
    actual = ep.models.init(model, rngs(), x, train=False)
    self.assertEqual(jax.tree.structure(actual), jax.tree.structure(expected))
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-9)


if __name__ == "__main__":
  absltest.main()
