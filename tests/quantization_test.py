"""Tests for quantization: codes by hand, calibration, the int8 path, QAT with pruning."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import evoprune as ep

Q = ep.quantization


class _TinyCNN(nn.Module):
  """Conv (SAME padding, stride 2) -> ReLU -> Dense: both layer kinds, tiny."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME")(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


class _OneDense(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(1, name="d")(x)


def _setup(model=None, shape=(6, 6, 2), batch=8):
  model = model or _TinyCNN()
  x = jax.random.normal(jax.random.key(0), (batch, *shape))
  params = ep.models.init(model, jax.random.key(1), x[:1])["params"]  # one compile, not per op
  return model, params, x


class CodesTest(parameterized.TestCase):

  def test_weight_codes_by_hand(self):
    # Per output channel (columns): scales 1/127 and 0.5/127; the zero stays zero.
    kernel = jnp.array([[1.0, -0.5], [0.6, 0.0], [-0.25, 0.125]])
    params = {"Dense_0": {"kernel": kernel, "bias": jnp.zeros(2)}}
    q = Q.quantize_params(params, {"Dense_0": 1.0}, Q.QuantConfig(act_bits=None))
    np.testing.assert_allclose(q["Dense_0"]["kernel_scale"], [1 / 127, 0.5 / 127], rtol=1e-6)
    np.testing.assert_array_equal(q["Dense_0"]["kernel"], [[127, -127], [76, 0], [-32, 32]])
    self.assertEqual(q["Dense_0"]["kernel"].dtype, jnp.int8)
    self.assertNotIn("input_scale", q["Dense_0"])

  def test_four_bit_codes_by_hand(self):
    kernel = jnp.array([[0.7], [-0.36], [0.1], [0.0]])  # scale 0.1: codes 7, -3.6->-4, 1, 0
    q = Q.quantize_params({"d": {"kernel": kernel}}, {"d": 2.0}, Q.QuantConfig(weight_bits=4))
    np.testing.assert_array_equal(q["d"]["kernel"].ravel(), [7, -4, 1, 0])
    np.testing.assert_allclose(q["d"]["input_scale"], 2.0 / 127, rtol=1e-6)

  def test_all_zero_channel_is_finite(self):
    kernel = jnp.array([[0.0, 1.0], [0.0, -2.0]])
    np.testing.assert_allclose(Q.weight_scale(kernel, 8), [1.0, 2.0 / 127], rtol=1e-6)
    np.testing.assert_array_equal(Q.dequantize_params(Q.quantize_params(
        {"d": {"kernel": kernel}}, {"d": 1.0}, Q.QuantConfig()))["d"]["kernel"][:, 0], [0, 0])

  def test_straight_through_gradient(self):
    # scale 0.5 on 8 bits: the grid ends at +-63.5; the gradient of x is 1 inside, 0 outside.
    x = jnp.array([-100.0, -1.3, 0.2, 10.0, 63.0, 70.0])
    grad = jax.grad(lambda x: Q.fake_quantize(x, jnp.float32(0.5), 8).sum())(x)
    np.testing.assert_array_equal(grad, [0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(Q.fake_quantize(x, jnp.float32(0.5), 8),
                                  [-63.5, -1.5, 0.0, 10.0, 63.0, 63.5])

  @parameterized.named_parameters(
      ("minmax", "minmax", None, 7.0), ("percentile", "percentile", 50.0, 2.5))
  def test_calibration_by_hand(self, calibration, percentile, expected):
    model = _OneDense()
    x = jnp.array([[1.0, -2.0], [3.0, -7.0]])  # |x| = 1, 2, 3, 7: max 7, median 2.5
    params = model.init(jax.random.key(0), x)["params"]
    kwargs = {"percentile": percentile} if percentile else {}
    ranges = Q.calibrate(model, params, x, Q.QuantConfig(calibration=calibration, **kwargs))
    self.assertEqual(ranges, {"d": expected})

  @parameterized.named_parameters(
      ("weight_bits", dict(weight_bits=3), "weight_bits"),
      ("act_bits", dict(act_bits=4), "act_bits"),
      ("calibration", dict(calibration="kl"), "calibration"),
      ("percentile", dict(percentile=0.0), "percentile"),
      ("layers", dict(layers="("), "layers"))
  def test_invalid_config(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      Q.QuantConfig(**kwargs)

  def test_fake_model_needs_ranges(self):
    with self.assertRaisesRegex(ValueError, "calibrate"):
      Q.qat(_TinyCNN(), Q.QuantConfig())


class IntegerPathTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("w8a8", Q.QuantConfig(), 0.05), ("w4a8", Q.QuantConfig(weight_bits=4), 0.3),
      ("w8_weight_only", Q.QuantConfig(act_bits=None), 0.05),
      # Clipping the top 1% of a tiny batch's activations costs more than rounding.
      ("percentile", Q.QuantConfig(calibration="percentile", percentile=99.0), 0.15))
  def test_integer_path_equals_fake_quant(self, config, tolerance):
    model, params, x = _setup()
    ranges = Q.calibrate(model, params, x, config)
    self.assertEqual(list(ranges), ["Conv_0", "Dense_0"])
    qmodel, qparams = Q.ptq(model, params, x, config)
    fake = Q.qat(model, config, ranges)
    y_int = jax.jit(lambda p: qmodel.apply({"params": p}, x))(qparams)
    y_fake = jax.jit(lambda p: fake.apply({"params": p}, x))(params)
    np.testing.assert_array_equal(y_int, y_fake)
    y_float = model.apply({"params": params}, x)
    self.assertGreater(float(jnp.abs(y_int - y_float).max()), 0.0)  # quantization happened
    np.testing.assert_allclose(y_int, y_float, atol=tolerance * float(jnp.abs(y_float).max()))

  def test_int8_operands_and_int32_accumulation(self):
    model, params, x = _setup()
    qmodel, qparams = Q.ptq(model, params, x)
    text = jax.jit(lambda p: qmodel.apply({"params": p}, x)).lower(qparams).as_text()
    ops = [line for line in text.splitlines()
           if "stablehlo.convolution" in line or "stablehlo.dot_general" in line]
    self.assertLen(ops, 2)
    for line in ops:
      signature = line.rsplit(":", 1)[-1]
      self.assertRegex(signature, r"\(tensor<[0-9x]*xi8>, tensor<[0-9x]*xi8>\) -> "
                       r"tensor<[0-9x]*xi32>")

  def test_dequantized_params_reproduce_weight_only_model(self):
    model, params, x = _setup()
    config = Q.QuantConfig(act_bits=None)
    qmodel, qparams = Q.ptq(model, params, x, config)
    y_int = jax.jit(lambda p: qmodel.apply({"params": p}, x))(qparams)
    y_deq = jax.jit(lambda p: model.apply({"params": p}, x))(Q.dequantize_params(qparams))
    np.testing.assert_allclose(y_int, y_deq, rtol=1e-5, atol=1e-6)

  def test_layers_regex_leaves_other_layers_float(self):
    model, params, x = _setup()
    config = Q.QuantConfig(layers="Dense_.*")
    qmodel, qparams = Q.ptq(model, params, x, config)
    self.assertEqual(qparams["Conv_0"]["kernel"].dtype, jnp.float32)
    self.assertEqual(qparams["Dense_0"]["kernel"].dtype, jnp.int8)
    self.assertTrue(bool(jnp.all(jnp.isfinite(qmodel.apply({"params": qparams}, x)))))

  def test_pruned_weights_stay_zero(self):
    model, params, x = _setup()
    masks = ep.masks.topk(ep.importance.magnitude(params), 0.5)
    masks = jax.tree.map(lambda m, p: m if p.ndim >= 2 else None, masks, params)
    pruned = ep.masks.apply(params, masks)
    _, qparams = Q.ptq(model, pruned, x)
    for layer in ("Conv_0", "Dense_0"):
      zero = np.asarray(pruned[layer]["kernel"]) == 0
      self.assertGreater(zero.mean(), 0.45)
      np.testing.assert_array_equal(np.asarray(qparams[layer]["kernel"])[zero], 0)


class QatTest(absltest.TestCase):

  def test_qat_with_pruner_in_one_train_step(self):
    model, params, x = _setup()
    y = jnp.arange(8) % 3
    config = Q.QuantConfig()
    fake = Q.qat(model, config, Q.calibrate(model, params, x, config))
    pruner = ep.Pruner(importance="magnitude", schedule=ep.schedules.constant(0.5, 0, frequency=1))
    tx = pruner.wrap(optax.adam(1e-2))
    state = ep.training.create_train_state(fake, tx, jax.random.key(1), x[:1])
    step = jax.jit(functools.partial(ep.training.train_step, model=fake, tx=tx))
    start = state.params
    losses = []
    for _ in range(20):
      state, metrics = step(state, x, y)
      losses.append(float(metrics["loss"]))
    self.assertLess(losses[-1], losses[0])  # the STE lets the quantized model learn
    masks = state.opt_state.masks
    for layer in ("Conv_0", "Dense_0"):
      kernel, mask = np.asarray(state.params[layer]["kernel"]), np.asarray(masks[layer]["kernel"])
      self.assertAlmostEqual(1 - mask.mean(), 0.5, delta=0.02)
      np.testing.assert_array_equal(kernel[~mask], 0)
      self.assertFalse(np.array_equal(kernel, np.asarray(start[layer]["kernel"])))
    qmodel, qparams = Q.convert(fake, state.params)
    for layer in ("Conv_0", "Dense_0"):
      mask = np.asarray(masks[layer]["kernel"])
      np.testing.assert_array_equal(np.asarray(qparams[layer]["kernel"])[~mask], 0)
    np.testing.assert_array_equal(qmodel.apply({"params": qparams}, x),
                                  fake.apply({"params": state.params}, x))


if __name__ == "__main__":
  absltest.main()
