"""Tests for evoprune.ops: values and gradients against lax.conv_general_dilated, max pool
and flax's BatchNorm."""

import functools
import os
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from evoprune import ops
from evoprune.ops import backend
from evoprune.ops import convolution
from evoprune.ops import patches
from evoprune.ops import space_to_depth
from evoprune.models import layers

_NHWC = ("NHWC", "HWIO", "NHWC")


def _random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _reference_conv(x, kernel, strides, padding, groups):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC,
                                  feature_group_count=groups)


def _assert_close(test, actual, expected, rtol=2e-6):
  scale = float(jnp.max(jnp.abs(expected))) or 1.0
  test.assertEqual(actual.shape, expected.shape)
  test.assertLess(float(jnp.max(jnp.abs(actual - expected))), rtol * 10 * scale)


def _value_and_vjp(fn, *args):
  y, vjp = jax.vjp(fn, *args)
  return y, vjp(_random(y.shape, 99))


# (name, x shape, kernel shape, strides, padding, groups)
_CONVS = (
    ("rgb_valid_5x5", (3, 9, 9, 3), (5, 5, 3, 6), (1, 1), "VALID", 1),
    ("rgb_same_3x3", (2, 8, 8, 3), (3, 3, 3, 4), (1, 1), "SAME", 1),
    ("rgb_odd_window_asymmetric_pad", (2, 7, 8, 3), (4, 3, 3, 5), (1, 1), ((2, 0), (1, 2)), 1),
    ("rgb_stride2", (2, 9, 9, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1)), 1),
    ("dense_valid", (2, 7, 7, 5), (3, 3, 5, 4), (1, 1), "VALID", 1),
    ("dense_8_channels_same", (3, 6, 6, 8), (3, 3, 8, 5), (1, 1), "SAME", 1),
    ("dense_5x5_6_channels", (2, 9, 9, 6), (5, 5, 6, 7), (1, 1), ((2, 1), (0, 2)), 1),
    ("dense_stride2_pad1", (2, 9, 9, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1)), 1),
    ("dense_asymmetric_pad", (2, 6, 7, 4), (3, 2, 4, 3), (1, 2), ((0, 2), (1, 0)), 1),
    ("dense_stride2_same_even", (2, 8, 8, 4), (3, 3, 4, 6), (2, 2), "SAME", 1),
    ("dense_on_pixel_pairs_odd_width", (2, 6, 7, 12), (3, 3, 12, 10), (1, 1), "SAME", 1),
    ("dense_on_pixel_pairs_5x4_valid", (2, 9, 10, 9), (5, 4, 9, 16), (1, 1), "VALID", 1),
    ("dense_on_pixel_pairs_padding_beyond_window", (2, 6, 6, 10), (3, 3, 10, 8), (1, 1),
     ((0, 3), (4, 0)), 1),
    ("dense_5x5_stride3", (2, 11, 10, 5), (5, 5, 5, 6), (3, 3), ((2, 1), (0, 2)), 1),
    ("dense_window_equals_stride_unused_edge", (2, 8, 9, 4), (2, 2, 4, 3), (2, 2), "VALID", 1),
    ("dense_stride2_padding_beyond_window", (2, 7, 7, 4), (3, 3, 4, 5), (2, 2),
     ((4, 0), (0, 3)), 1),
    ("dense_padding_beyond_window", (2, 6, 6, 4), (3, 3, 4, 5), (1, 1), ((3, 0), (0, 3)), 1),
    ("pointwise", (2, 5, 5, 6), (1, 1, 6, 7), (1, 1), "VALID", 1),
    ("pointwise_stride2", (2, 5, 5, 6), (1, 1, 6, 7), (2, 2), "VALID", 1),
    ("depthwise", (2, 6, 6, 5), (3, 3, 1, 5), (1, 1), ((1, 1), (1, 1)), 5),
    ("depthwise_stride2", (2, 7, 7, 4), (3, 3, 1, 4), (2, 2), ((1, 1), (1, 1)), 4),
    ("depthwise_5x5_valid", (2, 8, 8, 3), (5, 5, 1, 3), (1, 1), "VALID", 3),
    ("few_inputs_many_outputs", (2, 11, 10, 6), (5, 4, 6, 16), (1, 1), ((1, 0), (0, 2)), 1),
    ("rgb_padding_beyond_window", (2, 6, 7, 3), (3, 3, 3, 5), (1, 1), ((3, 0), (0, 4)), 1),
)


class ConvTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    # On GPUs the reference convolutions default to TF32; compare at full float32.
    self.enter_context(jax.default_matmul_precision("highest"))

  @parameterized.named_parameters(*_CONVS)
  def test_value_and_gradients_match_lax(self, x_shape, k_shape, strides, padding, groups):
    x, kernel = _random(x_shape, 0), _random(k_shape, 1)
    expected, (dx_ref, dk_ref) = _value_and_vjp(
        lambda x, k: _reference_conv(x, k, strides, padding, groups), x, kernel)
    # On CPU 'auto' compiles to the same program as 'cpu' (the staging is checked by
    # test_auto_stages_both_versions_and_xla_only_one); elsewhere it is the plain op.
    impls = ("cpu",) if jax.default_backend() == "cpu" else ("cpu", "auto")
    for impl in impls:
      with self.subTest(impl):
        conv = jax.jit(lambda x, k, impl=impl: ops.conv(
            x, k, strides, padding, feature_group_count=groups, impl=impl))
        y, (dx, dk) = _value_and_vjp(conv, x, kernel)
        _assert_close(self, y, expected)
        _assert_close(self, dx, dx_ref)
        _assert_close(self, dk, dk_ref)

  @parameterized.named_parameters(*(_CONVS[i] for i in (0, 3, 5, 8, 10)))
  def test_batch_chunks_give_the_same_gradients(self, x_shape, k_shape, strides, padding,
                                                groups):
    # One example per chunk: the scanned weight gradients and the mapped forward.
    x, kernel = _random(x_shape, 2), _random(k_shape, 3)
    fn = lambda x, k: ops.conv(x, k, strides, padding, feature_group_count=groups, impl="cpu")
    grads = lambda x, k: _value_and_vjp(fn, x, k)
    whole = jax.jit(grads)(x, kernel)
    with mock.patch.object(patches, "CHUNK_BYTES", 1):
      self.assertEqual(patches.chunks(x_shape[0], 100), x_shape[0])
      chunked = jax.jit(grads)(x, kernel)
    for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole)):
      _assert_close(self, a, b)

  @parameterized.named_parameters(
      # (x shape, kernel shape, padding, forward and input-gradient convolutions on
      # squares, on pixel pairs, weight gradients on squares, input gradients as the
      # squares' transpose)
      ("lenet5_conv1", (2, 12, 12, 3), (5, 5, 3, 6), "VALID", 1, 0, 1, 1),
      ("lenet5_conv2", (2, 14, 14, 6), (5, 5, 6, 16), "VALID", 1, 0, 0, 1),
      ("rgb_many_outputs", (2, 8, 8, 3), (3, 3, 3, 32), "VALID", 0, 0, 0, 1),
      ("few_channels_both_ways", (2, 9, 9, 6), (5, 5, 6, 7), "SAME", 2, 0, 1, 0),
      ("few_output_channels_same", (2, 8, 8, 16), (3, 3, 16, 6), "SAME", 2, 0, 0, 0),
      ("resnet20_first_stage", (2, 8, 9, 16), (3, 3, 16, 16), "SAME", 0, 2, 0, 0),
      ("up_to_16_channels_valid", (2, 9, 10, 8), (3, 3, 8, 12), "VALID", 0, 2, 0, 0),
      ("many_channels", (2, 8, 8, 16), (3, 3, 16, 32), "SAME", 0, 0, 0, 0),
  )
  def test_few_channel_convolutions_run_on_squares(self, x_shape, k_shape, padding,
                                                   convs_on_squares, convs_on_pairs,
                                                   weight_grads_on_squares,
                                                   transposed_input_grads):
    # Which stride-1 convolutions run on 2x2 space-to-depth squares or pixel pairs (values
    # are checked against lax in the tests above and below).
    x, kernel = _random(x_shape, 15), _random(k_shape, 16)
    fn = lambda x, k: ops.conv(x, k, (1, 1), padding, impl="cpu")
    # pylint: disable=protected-access
    with mock.patch.object(space_to_depth, "conv", wraps=space_to_depth.conv) as conv, \
        mock.patch.object(convolution, "_space_to_depth_weight_grad",
                          wraps=convolution._space_to_depth_weight_grad) as weight_grad, \
        mock.patch.object(space_to_depth, "input_grad",
                          wraps=space_to_depth.input_grad) as input_grad:
      jax.make_jaxpr(lambda x, k: _value_and_vjp(fn, x, k))(x, kernel)
    blocks = [call.args[3] if len(call.args) > 3 else space_to_depth.SQUARES
              for call in conv.call_args_list]
    self.assertEqual(blocks.count(space_to_depth.SQUARES), convs_on_squares)
    self.assertEqual(blocks.count(space_to_depth.PAIRS), convs_on_pairs)
    self.assertEqual(weight_grad.call_count, weight_grads_on_squares)
    self.assertEqual(input_grad.call_count, transposed_input_grads)

  @parameterized.named_parameters(
      # x as the kernel: size-preserving padding, >= 8 input channels (mirrored padding).
      ("x_as_kernel_same", (3, 8, 8, 8), (3, 3, 8, 5), "SAME"),
      ("x_as_kernel_even_window", (2, 7, 6, 9), (4, 2, 9, 3), ((1, 2), (1, 0))),
      # g as the kernel: everything else.
      ("g_as_kernel_valid", (2, 9, 9, 8), (3, 3, 8, 4), "VALID"),
      ("g_as_kernel_few_channels", (2, 8, 8, 3), (3, 3, 3, 4), "SAME"),
      ("g_as_kernel_shrinking_pad", (2, 9, 8, 6), (5, 3, 6, 7), ((2, 1), (0, 2))),
  )
  def test_weight_gradient_inside_scan_matches_lax(self, x_shape, k_shape, padding):
    # Inside `lax.scan`, where training runs (and where XLA's own form is a naive loop).
    x, kernel = _random(x_shape, 20), _random(k_shape, 21)
    ref = lambda k: _reference_conv(x, k, (1, 1), padding, 1)
    y, vjp = jax.vjp(ref, kernel)
    g = _random(y.shape, 22)
    dk_ref = vjp(g)[0]

    def grads(kernel):
      def body(total, _):
        _, vjp = jax.vjp(lambda k: ops.conv(x, k, (1, 1), padding, impl="cpu"), kernel)
        return total + vjp(g)[0], None
      return lax.scan(body, jnp.zeros_like(kernel), None, length=2)[0] / 2

    _assert_close(self, jax.jit(grads)(kernel), dk_ref)

  def test_materialized_is_the_identity_even_for_nan(self):
    for value in (1.5, float("nan")):
      x = jnp.full((2, 3, 3, 2), value).at[1].set(2.0)
      np.testing.assert_array_equal(jax.jit(backend._materialized)(x), x)  # pylint: disable=protected-access
      batched = jax.vmap(backend._materialized)(jnp.stack([x, -x]))  # pylint: disable=protected-access
      np.testing.assert_array_equal(batched, jnp.stack([x, -x]))

  def test_materialize_is_the_identity_with_identity_gradients(self):
    x = _random((2, 3, 3, 2), 30).at[0, 0, 0, 0].set(jnp.nan)
    f = lambda x: jnp.sum(jnp.sin(ops.materialize(x * 2.0)))
    reference = lambda x: jnp.sum(jnp.sin(x * 2.0))
    np.testing.assert_array_equal(jax.jit(ops.materialize)(x), x)
    np.testing.assert_array_equal(jax.jit(jax.grad(f))(x), jax.grad(reference)(x))
    _, tangent = jax.jvp(ops.materialize, (x,), (jnp.ones_like(x),))
    np.testing.assert_array_equal(tangent, jnp.ones_like(x))
    np.testing.assert_array_equal(jax.vmap(ops.materialize)(x), x)
    self.assertIn("platform_index", str(jax.make_jaxpr(ops.materialize)(x)))
    with ops.use("xla"):  # a fresh function: jaxprs are cached per function
      self.assertNotIn("platform_index", str(jax.make_jaxpr(lambda v: ops.materialize(v))(x)))

  def test_chunks_divide_the_batch(self):
    chunks = patches.chunks
    with mock.patch.object(patches, "CHUNK_BYTES", 1000):
      self.assertEqual(chunks(12, 300), 4)  # 3 examples per chunk
      self.assertEqual(chunks(10, 300), 5)  # 3 does not divide 10: 2 per chunk
      self.assertEqual(chunks(7, 5000), 7)  # bigger than a chunk: one each
      self.assertEqual(chunks(7, 10), 1)

  @parameterized.named_parameters(
      ("squares", (3, 2, 6, 6, 4), (3, 3, 3, 4, 5), (1, 1)),
      ("pixel_pairs", (3, 2, 6, 7, 12), (3, 3, 3, 12, 10), (1, 1)),
      ("strided", (3, 2, 7, 8, 8), (3, 3, 3, 8, 12), (2, 2)),
      # Through the C++ kernels where they are built (16 and 32 outputs).
      ("kernels", (3, 2, 6, 6, 16), (3, 3, 3, 16, 16), (1, 1)),
      ("kernels_strided", (3, 2, 7, 8, 16), (3, 3, 3, 16, 32), (2, 2)),
      ("kernels_shared_input", (2, 6, 6, 16), (3, 3, 3, 16, 32), (1, 1)),
  )
  def test_vmap_over_a_seed_axis(self, x_shape, k_shape, strides):
    x, kernel = _random(x_shape, 4), _random(k_shape, 5)
    in_axes = (0 if len(x_shape) == 5 else None, 0)  # 4-D x: one input for every seed
    conv = lambda x, k: ops.conv(x, k, strides, padding="SAME", impl="cpu")
    loss = lambda x, k: jnp.sum(jnp.sin(jax.vmap(conv, in_axes)(x, k)))
    ref = lambda x, k: jnp.sum(jnp.sin(jax.vmap(
        lambda x, k: _reference_conv(x, k, strides, "SAME", 1), in_axes)(x, k)))
    for a, b in zip(jax.jit(jax.grad(loss, (0, 1)))(x, kernel),
                    jax.grad(ref, (0, 1))(x, kernel)):
      _assert_close(self, a, b, rtol=1e-5)

  def test_drop_in_passes_unsupported_convolutions_to_lax(self):
    x, kernel = _random((2, 7, 7, 4), 6), _random((3, 3, 2, 6), 7)
    cases = (
        dict(feature_group_count=2),  # grouped, not depthwise
        dict(rhs_dilation=(2, 2)),
        dict(lhs_dilation=(2, 1)),
    )
    for kwargs in cases:
      with self.subTest(str(kwargs)):
        k = kernel if "feature_group_count" in kwargs else _random((3, 3, 4, 6), 8)
        args = (x, k, (1, 1), ((1, 1), (1, 1)))
        fn = lambda x, k, kw=kwargs: ops.conv_general_dilated(
            x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC, **kw)
        self.assertNotIn("platform_index", str(jax.make_jaxpr(fn)(x, k)))
        _assert_close(self, fn(x, k),
                      lax.conv_general_dilated(*args, dimension_numbers=_NHWC, **kwargs))

  def test_drop_in_handles_nchw_by_passing_through(self):
    x, kernel = _random((2, 4, 7, 7), 9), _random((6, 4, 3, 3), 10)
    dn = ("NCHW", "OIHW", "NCHW")
    fn = lambda x, k: ops.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=dn)
    self.assertNotIn("platform_index", str(jax.make_jaxpr(fn)(x, kernel)))
    _assert_close(self, fn(x, kernel),
                  lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=dn))

  def test_auto_stages_both_versions_and_xla_only_one(self):
    x, kernel = _random((2, 6, 6, 4), 11), _random((3, 3, 4, 4), 12)
    auto = str(jax.make_jaxpr(lambda x, k: ops.conv(x, k))(x, kernel))
    self.assertIn("platform_index", auto)
    self.assertIn("custom_vjp_call", auto)
    plain = str(jax.make_jaxpr(lambda x, k: ops.conv(x, k, impl="xla"))(x, kernel))
    self.assertNotIn("platform_index", plain)
    with mock.patch.dict(os.environ, {"EVOPRUNE_OPS": "xla"}):
      env = str(jax.make_jaxpr(lambda x, k: ops.conv(x, k))(x, kernel))
    self.assertNotIn("platform_index", env)
    self.assertIn("conv_general_dilated", env)

  def test_bad_arguments(self):
    x = jnp.zeros((1, 4, 4, 4))
    with self.assertRaisesRegex(ValueError, "impl='gpu'"):
      ops.conv(x, jnp.zeros((3, 3, 4, 4)), impl="gpu")
    with self.assertRaisesRegex(ValueError, "feature_group_count=2"):
      ops.conv(x, jnp.zeros((3, 3, 2, 4)), feature_group_count=2)
    with self.assertRaisesRegex(ValueError, "impl="):
      ops.max_pool(x, impl="")

  def test_use_stages_one_implementation_on_every_backend(self):
    x, kernel = _random((2, 8, 8, 3), 30), _random((3, 3, 3, 4), 31)
    for impl in ("xla", "cpu"):
      with self.subTest(impl):
        # Fresh functions each time: jaxprs are cached per function.
        with ops.use(impl):
          self.assertEqual(ops.mode(), impl)
          used = str(jax.make_jaxpr(lambda x, k: ops.conv(x, k, (1, 1), "SAME"))(x, kernel))
          self.assertEqual(ops.describe("cpu"), ops.describe("gpu"))
          self.assertTrue(ops.describe("gpu").startswith(impl))
          self.assertEqual(ops.compiler_options("gpu"), {})
        explicit = str(jax.make_jaxpr(
            lambda x, k, i=impl: ops.conv(x, k, (1, 1), "SAME", impl=i))(x, kernel))
        self.assertEqual(used, explicit)
        self.assertNotIn("platform_index", used)
    self.assertEqual(ops.mode(), "auto")  # reset on exit
    self.assertNotEqual(ops.describe("cpu"), ops.describe("gpu"))
    with mock.patch.dict(os.environ, {"EVOPRUNE_OPS": "xla"}), ops.use("auto"):
      self.assertEqual(ops.mode(), "auto")  # the context wins over the environment

  def test_environment_chooses_and_is_checked(self):
    for value, expected in (("", "auto"), ("xla", "xla"), ("cpu", "cpu")):
      with mock.patch.dict(os.environ, {"EVOPRUNE_OPS": value}):
        self.assertEqual(ops.mode(), expected)
    with mock.patch.dict(os.environ, {"EVOPRUNE_OPS": "eigen"}):
      with self.assertRaisesRegex(ValueError, "EVOPRUNE_OPS='eigen'"):
        ops.conv(jnp.zeros((1, 4, 4, 4)), jnp.zeros((3, 3, 4, 4)))
    with self.assertRaisesRegex(ValueError, "impl='gpu'"):
      with ops.use("gpu"):
        pass

  def test_jit_binds_the_mode_in_effect_when_made(self):
    x, kernel = _random((2, 8, 8, 4), 32), _random((3, 3, 4, 4), 33)
    with ops.use("xla"):
      plain = ops.jit(lambda x, k: ops.conv(x, k, (1, 1), "SAME"))
    auto = ops.jit(lambda x, k: ops.conv(x, k, (1, 1), "SAME"))
    # Traced outside the context, and the other way round.
    self.assertNotIn("platform_index", str(plain.trace(x, kernel).jaxpr))
    with ops.use("xla"):
      self.assertIn("platform_index", str(auto.trace(x, kernel).jaxpr))
    _assert_close(self, plain(x, kernel), auto(x, kernel))

  def test_describe_names_the_backend_choice(self):
    self.assertTrue(ops.describe("cpu").startswith("cpu"))
    self.assertTrue(ops.describe("gpu").startswith("xla"))


class CompilerOptionsTest(absltest.TestCase):

  def test_only_cpu_programs_get_options(self):
    self.assertEqual(ops.compiler_options("gpu"), {})
    self.assertEqual(ops.compiler_options("tpu"), {})
    with mock.patch.dict(os.environ, {"EVOPRUNE_OPS": "xla"}):
      self.assertEqual(ops.compiler_options("cpu"), {})

  def test_convolutions_leave_ynnpack_with_the_same_values(self):
    options = ops.compiler_options("cpu")
    if not options:
      self.skipTest("this jaxlib does not know the YNNPACK fusion option")
    x, kernel = _random((4, 9, 9, 8), 0), _random((3, 3, 8, 16), 1)
    conv = lambda x, k: _reference_conv(x, k, (1, 1), "SAME", 1)
    plain = jax.jit(conv).lower(x, kernel).compile()
    eigen = jax.jit(conv, compiler_options=options).lower(x, kernel).compile()
    if "ynn_fusion" in plain.as_text():  # this jaxlib's default sends it to YNNPACK
      self.assertNotIn("ynn_fusion", eigen.as_text())
    _assert_close(self, eigen(x, kernel), plain(x, kernel))

  def test_options_are_missing_where_jaxlib_rejects_them(self):
    backend._cpu_options_supported.cache_clear()  # pylint: disable=protected-access
    try:
      with mock.patch.object(backend, "_CPU_COMPILER_OPTIONS",
                             (("xla_cpu_experimental_ynn_fusion_type", "NO_SUCH_TYPE"),)):
        self.assertEqual(ops.compiler_options("cpu"), {})
    finally:
      backend._cpu_options_supported.cache_clear()  # pylint: disable=protected-access


class ConvModuleTest(absltest.TestCase):

  def test_layers_conv_is_flax_conv_with_the_same_params(self):
    x = _random((2, 8, 8, 3), 13)
    for kwargs in (dict(features=4, kernel_size=(3, 3)),
                   dict(features=3, kernel_size=(3, 3), strides=2, feature_group_count=3,
                        padding=((1, 1), (1, 1)))):
      ours, theirs = layers.Conv(**kwargs), nn.Conv(**kwargs)
      self.assertIsInstance(ours, nn.Conv)
      variables = jax.jit(theirs.init)(jax.random.key(0), x)
      ours_variables = jax.jit(ours.init)(jax.random.key(0), x)
      self.assertEqual(jax.tree.map(jnp.shape, ours_variables),
                       jax.tree.map(jnp.shape, variables))
      np.testing.assert_array_equal(ours_variables["params"]["kernel"],
                                    variables["params"]["kernel"])
      _assert_close(self, jax.jit(ours.apply)(variables, x), jax.jit(theirs.apply)(variables, x))

  def test_automatic_names_are_unchanged(self):

    class Two(nn.Module):
      @nn.compact
      def __call__(self, x):
        return layers.Conv(2, (3, 3))(layers.Conv(2, (3, 3))(x))

    params = jax.eval_shape(Two().init, jax.random.key(0), jnp.zeros((1, 6, 6, 1)))["params"]
    self.assertEqual(sorted(params), ["Conv_0", "Conv_1"])


class BatchNormTest(parameterized.TestCase):

  def _flax(self, variables, x, relu):
    """flax's BatchNorm (training mode) then ReLU: output and updated batch_stats."""
    y, updates = nn.BatchNorm(use_running_average=False, momentum=layers.BN_MOMENTUM,
                              epsilon=layers.BN_EPSILON).apply(
                                  variables, x, mutable=["batch_stats"])
    return (nn.relu(y) if relu else y), updates

  def _variables(self, x):
    variables = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    # Non-trivial scale, shift and running statistics; one channel with scale 0 (pruned).
    variables = jax.tree.map(lambda v: v + _random(v.shape, v.size) * 0.5, variables)
    variables["params"]["scale"] = variables["params"]["scale"].at[0].set(0.0)
    return variables

  @parameterized.product(relu=(False, True), impl=("cpu", "xla", "auto"))
  def test_value_gradients_and_statistics_match_flax(self, relu, impl):
    x = _random((6, 5, 4, 3), 40) * 3 + 1
    variables = self._variables(x)
    cotangent = _random(x.shape, 41)

    def loss(module_fn, variables, x):
      y, updates = module_fn(variables, x)
      return jnp.sum(y * cotangent), (y, updates)

    def ours(variables, x):
      with mock.patch.object(ops, "batch_norm", functools.partial(ops.batch_norm, impl=impl)):
        return layers.BatchNorm(relu=relu).apply(variables, x, mutable=["batch_stats"])

    grad = lambda fn: jax.jit(jax.grad(functools.partial(loss, fn), (0, 1), has_aux=True))
    (dvars, dx), (y, updates) = grad(ours)(variables, x)
    (dvars_ref, dx_ref), (y_ref, updates_ref) = grad(
        functools.partial(self._flax, relu=relu))(variables, x)
    _assert_close(self, y, y_ref)
    _assert_close(self, dx, dx_ref, rtol=1e-5)
    for name in ("scale", "bias"):
      _assert_close(self, dvars["params"][name], dvars_ref["params"][name], rtol=1e-5)
    for name in ("mean", "var"):
      _assert_close(self, updates["batch_stats"][name], updates_ref["batch_stats"][name])

  def test_statistics_carry_no_gradient(self):
    x = _random((4, 3, 3, 2), 42)
    for impl in ("cpu", "xla"):
      grad = jax.grad(lambda x: jnp.sum(ops.batch_norm(
          x, jnp.ones(2), jnp.zeros(2), epsilon=1e-5, impl=impl)[1] ** 2))(x)
      np.testing.assert_array_equal(grad, jnp.zeros_like(x))

  def test_module_has_flax_variables_and_inference(self):
    x = _random((4, 3, 3, 5), 43)
    ours = jax.eval_shape(layers.BatchNorm().init, jax.random.key(0), x)
    theirs = jax.eval_shape(nn.BatchNorm(use_running_average=False).init, jax.random.key(0), x)
    self.assertEqual(jax.tree.map(lambda v: (v.shape, v.dtype), ours),
                     jax.tree.map(lambda v: (v.shape, v.dtype), theirs))
    variables = self._variables(x)
    for relu in (False, True):
      y = layers.BatchNorm(use_running_average=True, relu=relu).apply(variables, x)
      y_ref = nn.BatchNorm(use_running_average=True, epsilon=layers.BN_EPSILON).apply(variables, x)
      _assert_close(self, y, nn.relu(y_ref) if relu else y_ref)

  def test_auto_stages_both_versions(self):
    x = _random((2, 3, 3, 2), 44)
    fn = lambda x, impl: ops.batch_norm(x, jnp.ones(2), jnp.zeros(2), epsilon=1e-5, impl=impl)
    self.assertIn("platform_index", str(jax.make_jaxpr(lambda x: fn(x, "auto"))(x)))
    self.assertNotIn("custom_vjp", str(jax.make_jaxpr(lambda x: fn(x, "xla"))(x)))
    with self.assertRaisesRegex(ValueError, "impl='tpu'"):
      fn(x, "tpu")


class MaxPoolTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("even", (2, 8, 6, 3), (2, 2)),
      ("odd_sizes_drop_the_remainder", (2, 7, 9, 3), (2, 2)),
      ("rectangular_window", (1, 6, 9, 2), (2, 3)),
      ("window_3", (1, 9, 9, 2), (3, 3)),
      ("more_positions_than_int8", (1, 12, 24, 2), (12, 12)),
  )
  def test_value_and_gradient_match_flax(self, shape, window):
    # Integer values: many ties inside windows, which must be broken as XLA does.
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, size=shape), jnp.float32)
    expected, (dx_ref,) = _value_and_vjp(lambda x: nn.max_pool(x, window, window), x)
    for impl in ("cpu", "auto"):
      with self.subTest(impl):
        y, (dx,) = _value_and_vjp(jax.jit(lambda x, impl=impl: ops.max_pool(
            x, window, window, impl=impl)), x)
        np.testing.assert_array_equal(y, expected)
        np.testing.assert_array_equal(dx, dx_ref)

  def test_ties_go_to_the_first_maximum(self):
    x = jnp.asarray([[1.0, 1.0], [1.0, 0.0]]).reshape(1, 2, 2, 1)
    dx = jax.grad(lambda x: ops.max_pool(x, (2, 2), (2, 2), impl="cpu").sum())(x)
    np.testing.assert_array_equal(dx.reshape(2, 2), [[1.0, 0.0], [0.0, 0.0]])

  @parameterized.named_parameters(
      ("overlapping", (3, 3), (2, 2), "VALID"),
      ("same_padding", (2, 2), (2, 2), "SAME"),
      ("default_strides", (2, 2), None, "VALID"),
  )
  def test_other_pools_use_reduce_window(self, window, strides, padding):
    x = _random((2, 7, 7, 3), 14)
    fn = lambda x: ops.max_pool(x, window, strides, padding)
    self.assertNotIn("platform_index", str(jax.make_jaxpr(fn)(x)))
    expected, (dx_ref,) = _value_and_vjp(lambda x: nn.max_pool(x, window, strides, padding), x)
    y, (dx,) = _value_and_vjp(fn, x)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(dx, dx_ref)


if __name__ == "__main__":
  absltest.main()
