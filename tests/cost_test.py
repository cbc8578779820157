"""Tests for cost accounting: MACs against XLA and by hand, nonzeros, bytes, the table."""

import json

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import evoprune as ep

_KEY = jax.random.key(0)


def _init(model, shape, dtype=jnp.float32):
  """Variables of `model` filled with ones: counts do not depend on the values, and
  skipping the real initialisation keeps the tests fast."""
  abstract = jax.eval_shape(model.init, {"params": _KEY}, jnp.zeros((1, *shape), dtype))
  return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), abstract)


def _xla_macs(fn, *args):
  """XLA's flop count of `fn(*args)` / 2 with the plain XLA ops (cost_analysis is a dict in
  jax 0.10; a one-element list of dicts in older releases)."""
  with ep.ops.use("xla"):  # the network's convolutions, not a CPU formulation's
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return cost["flops"] / 2


class _Single(nn.Module):
  """One layer, to count by hand."""

  layer: nn.Module

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return self.layer(x)


class XlaAgreementTest(absltest.TestCase):

  def test_mlp_forward_matches_xla(self):
    model = ep.models.create("mlp_paper")
    variables = _init(model, (28, 28, 1))
    cost = ep.cost.report(model, variables["params"], None, (28, 28, 1))
    # 784*256 + 256*128 + 128*64 + 64*10, by hand.
    self.assertEqual(cost["macs"]["dense"], 242_304)
    xla = _xla_macs(lambda v, x: model.apply(v, x), variables, jnp.zeros((1, 28, 28, 1)))
    # XLA also counts bias adds and ReLUs (1 flop per element): +0.2%.
    self.assertLess(abs(xla / cost["macs"]["dense"] - 1), 0.01)

  def test_lenet5_matches_xla(self):
    model = ep.models.create("lenet5")
    x = jnp.zeros((1, 32, 32, 3))
    variables = _init(model, (32, 32, 3))
    cost = ep.cost.report(model, variables["params"], None, (32, 32, 3))
    # By hand: 28*28*6*75 + 10*10*16*150 + 400*120 + 120*84 + 84*10.
    self.assertEqual(cost["macs"]["dense"], 352_800 + 240_000 + 48_000 + 10_080 + 840)

    # Every Conv/Dense call of the forward pass, compiled alone: its XLA flops / 2 are
    # its MACs plus one bias add per output, within 1% per layer and in total.
    calls = []

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, (nn.Conv, nn.Dense)):
        calls.append((context.module.path, context.module.clone(parent=None), args[0]))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      model.apply(variables, x)
    self.assertLen(calls, 5)
    xla_total = 0.0
    for path, layer, inputs in calls:
      layer_params = variables["params"][path[0]]
      xla = _xla_macs(lambda p, x: layer.apply({"params": p}, x), layer_params, inputs)
      ours = cost["layers"][f"{path[0]}/kernel"]["macs_dense"]
      self.assertLess(abs(xla / ours - 1), 0.01, msg=path)
      xla_total += xla
    self.assertLess(abs(xla_total / cost["macs"]["dense"] - 1), 0.01)

    # The whole forward pass: XLA adds ReLU and max-pool work (1.4% here), which MACs
    # leave out by convention, so the bound is looser.
    xla_forward = _xla_macs(lambda v, x: model.apply(v, x), variables, x)
    self.assertBetween(xla_forward / cost["macs"]["dense"], 1.0, 1.02)


class HandCountTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("dense", nn.Dense(3), (4,), 4 * 3, (4, 3)),
      ("dense_on_tokens", nn.Dense(3), (5, 4), 5 * 4 * 3, (4, 3)),
      # 5x5 input, stride 2, SAME: 3x3 outputs x 4 filters x (3*3*2) taps.
      ("conv_strided_same", nn.Conv(4, (3, 3), strides=2, padding="SAME"), (5, 5, 2),
       3 * 3 * 4 * 18, (3, 3, 2, 4)),
      ("conv_valid", nn.Conv(4, (3, 3), padding="VALID"), (6, 6, 2), 4 * 4 * 4 * 18,
       (3, 3, 2, 4)),
      # Depthwise: each of the 5*5*4 outputs reads one 3x3 patch of one channel.
      ("conv_depthwise", nn.Conv(4, (3, 3), feature_group_count=4), (5, 5, 4), 5 * 5 * 4 * 9,
       (3, 3, 1, 4)),
      # Two groups: each output reads 4 / 2 input channels.
      ("conv_grouped_1x1", nn.Conv(6, (1, 1), feature_group_count=2), (2, 2, 4), 2 * 2 * 6 * 2,
       (1, 1, 2, 6)),
      ("conv_dilated", nn.Conv(1, (3, 3), kernel_dilation=2, padding="VALID"), (7, 7, 1),
       3 * 3 * 1 * 9, (3, 3, 1, 1)),
  )
  def test_single_layer(self, layer, shape, macs, kernel_shape):
    model = _Single(layer)
    params = _init(model, shape)["params"]
    cost = ep.cost.report(model, params, None, shape)
    entry = cost["layers"]["layer/kernel"]
    self.assertEqual(entry["macs_dense"], macs)
    self.assertEqual(entry["shape"], list(kernel_shape))
    self.assertEqual(cost["macs"]["dense"], macs)
    self.assertEqual(cost["layers"]["layer/bias"]["macs_dense"], 0)

  def test_attention_matmuls_are_charged_to_the_attention_layer(self):
    model = ep.models.create("gpt", vocab_size=7, block_size=4, n_layer=1, n_head=2, n_embd=8,
                             tie_embeddings=False)
    params = _init(model, (4,), jnp.int32)["params"]
    cost = ep.cost.report(model, params, None, (4,))
    layers = cost["layers"]
    t, c = 4, 8
    expected = {
        "h_00/attn/qkv/kernel": t * c * 3 * c,
        "h_00/attn": 2 * t * t * c,  # q @ k^T and att @ v over both heads
        "h_00/attn/w_out/kernel": t * c * c,
        "h_00/mlp/w_in/kernel": t * c * 4 * c,
        "h_00/mlp/w_out/kernel": t * 4 * c * c,
        "head/w_out/kernel": t * c * 7,
    }
    self.assertEqual({k: layers[k]["macs_dense"] for k in expected}, expected)
    self.assertEqual(cost["macs"]["dense"], sum(expected.values()))
    self.assertEqual(layers["h_00/attn"]["params"], 0)
    self.assertEqual(layers["embed_tok/embedding"]["macs_dense"], 0)  # a lookup, no MACs

  def test_tied_head_is_charged_to_the_embedding(self):
    model = ep.models.create("gpt", vocab_size=7, block_size=4, n_layer=1, n_head=2, n_embd=8)
    params = _init(model, (4,), jnp.int32)["params"]
    cost = ep.cost.report(model, params, None, (4,))
    self.assertEqual(cost["layers"]["embed_tok/embedding"]["macs_dense"], 4 * 8 * 7)
    self.assertFalse(cost["layers"]["embed_tok/embedding"]["prunable"])

  def test_resnet20_macs(self):
    model = ep.models.create("resnet20")
    params = _init(model, (32, 32, 3))["params"]
    cost = ep.cost.report(model, params, None, (32, 32, 3))
    # Stem 32*32*16*27; stage 1: 6 convs of 32*32*16*144; stages 2 and 3: each
    # 16*16*32*144 (or 8*8*64*288) for the strided conv + 5 convs of 2,359,296; head 640.
    stage = 1_179_648 + 5 * 2_359_296
    self.assertEqual(cost["macs"]["dense"], 442_368 + 6 * 2_359_296 + 2 * stage + 640)


class SparsityTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    # 4 -> 3 -> 2 MLP with every parameter 1, so nonzeros are exactly the kept entries.
    self.model = ep.models.create("mlp", widths=(3,), num_classes=2)
    self.params = _init(self.model, (4,))["params"]
    keep_first = np.zeros((4, 3), bool)
    keep_first[:2] = True  # 6 of 12
    keep_last = np.zeros((3, 2), bool)
    keep_last[0, 1] = True  # 1 of 6
    self.masks = {"Dense_0": {"kernel": jnp.asarray(keep_first), "bias": None},
                  "Dense_1": {"kernel": jnp.asarray(keep_last), "bias": None}}

  def test_masked_counts(self):
    cost = ep.cost.report(self.model, self.params, self.masks, (4,))
    self.assertEqual(cost["params"], {"total": 12 + 3 + 6 + 2, "nonzero": 6 + 3 + 1 + 2})
    self.assertEqual(cost["macs"], {"dense": 12 + 6, "effective": 6 + 1})
    first = cost["layers"]["Dense_0/kernel"]
    self.assertEqual((first["params"], first["nonzero"], first["macs_dense"],
                      first["macs_effective"], first["prunable"]), (12, 6, 12, 6, True))
    self.assertFalse(cost["layers"]["Dense_0/bias"]["prunable"])
    # Dense: 4 bytes x 23. Sparse: kernels 4 x nonzeros + ceil(entries / 8) bitmask
    # bytes (4*6 + 2 and 4*1 + 1), biases dense (4*3 + 4*2).
    self.assertEqual(cost["bytes"], {"fp32_dense": 92, "sparse": 26 + 5 + 20})

  def test_effective_macs_scale_with_density_on_conv(self):
    model = _Single(nn.Conv(2, (3, 3), padding="VALID"))
    params = _init(model, (4, 4, 1))["params"]
    mask = np.zeros((3, 3, 1, 2), bool)
    mask[..., 0] = True  # keep filter 0: half of the kernel
    mask[0, 0, 0, 1] = True  # and one tap of filter 1
    masks = {"layer": {"kernel": jnp.asarray(mask), "bias": None}}
    cost = ep.cost.report(model, params, masks, (4, 4, 1))
    # 2x2 outputs per filter; filter 0 reads 9 taps, filter 1 reads 1.
    self.assertEqual(cost["macs"], {"dense": 2 * 2 * 2 * 9, "effective": 2 * 2 * (9 + 1)})

  def test_dense_masks_none_counts_zeros_of_params(self):
    params = jax.tree.map(lambda p: p, self.params)
    params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].at[0].set(0.0)  # 3 zeros
    cost = ep.cost.report(self.model, params, None, (4,))
    self.assertEqual(cost["params"]["nonzero"], 23 - 3)
    self.assertEqual(cost["layers"]["Dense_0/kernel"]["macs_effective"], 9)
    # Without masks the prunable leaves are the kernels (models.prunable).
    self.assertEqual(cost["bytes"]["sparse"], (4 * 9 + 2) + (4 * 6 + 1) + 20)

  def test_masked_weights_that_are_already_zero_count_once(self):
    params = jax.tree.map(lambda p: p, self.params)
    params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].at[0, 0].set(0.0)
    cost = ep.cost.report(self.model, params, self.masks, (4,))
    self.assertEqual(cost["layers"]["Dense_0/kernel"]["nonzero"], 5)

  def test_mask_tree_mismatch_raises(self):
    with self.assertRaisesRegex(ValueError, "structure of params"):
      ep.cost.report(self.model, self.params, {"Dense_0": self.masks["Dense_0"]}, (4,))

  def test_mask_shape_mismatch_raises(self):
    masks = {"Dense_0": {"kernel": jnp.ones((3, 4), bool), "bias": None},
             "Dense_1": self.masks["Dense_1"]}
    with self.assertRaisesRegex(ValueError, "Dense_0/kernel"):
      ep.cost.report(self.model, self.params, masks, (4,))

  def test_bad_input_shape_raises(self):
    for shape in ((), (0, 4), "4"):
      with self.assertRaisesRegex(ValueError, "input_shape"):
        ep.cost.report(self.model, self.params, None, shape)


class ReportFormatTest(absltest.TestCase):

  def test_layers_follow_flatten_order_and_serialise(self):
    model = ep.models.create("gpt", vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)
    params = _init(model, (4,), jnp.int32)["params"]
    cost = ep.cost.report(model, params, None, (4,))
    leaf_paths = ["/".join(ep.models.path_names(p))
                  for p, _ in jax.tree.flatten_with_path(params)[0]]
    self.assertEqual([k for k in cost["layers"] if k != "h_00/attn"], leaf_paths)
    self.assertEqual(json.loads(json.dumps(cost)), cost)

  def test_batch_stats_are_optional(self):
    model = ep.models.create("resnet20", width=2)
    variables = _init(model, (8, 8, 3))
    with_stats = ep.cost.report(model, variables["params"], None, (8, 8, 3),
                                batch_stats=variables["batch_stats"])
    without = ep.cost.report(model, variables["params"], None, (8, 8, 3))
    self.assertEqual(with_stats, without)
    self.assertEqual(with_stats["params"]["total"], sum(
        p.size for p in jax.tree.leaves(variables["params"])))

  def test_format_table(self):
    model = ep.models.create("lenet300_100")
    params = _init(model, (28, 28, 1))["params"]
    masks = jax.tree.map(lambda p, f: jnp.zeros(p.shape, bool).at[0].set(True) if f else None,
                         params, ep.models.prunable(params), is_leaf=lambda x: x is None)
    table = ep.cost.format_table(ep.cost.report(model, params, masks, (28, 28, 1)))
    lines = table.splitlines()
    self.assertEqual(lines[0].split()[:3], ["layer", "shape", "params"])
    kernel_row = next(line for line in lines if line.startswith("Dense_0/kernel *"))
    # 784x300 kernel, 300 kept (the first row), dense MACs 235,200.
    self.assertEqual(kernel_row.split()[2:], ["784x300", "235,200", "300", "0.001", "235,200",
                                              "300"])
    self.assertIn("266,610", table)
    self.assertIn("bytes: fp32 dense 1,066,440", table)


if __name__ == "__main__":
  absltest.main()
