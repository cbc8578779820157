"""Tests for evoprune.ops.direct: the C++ convolution kernels against
lax.conv_general_dilated and its vjp, their batching, threading, build and fallback."""

import os
import pathlib
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from evoprune import ops
from evoprune.ops import direct

_NHWC = ("NHWC", "HWIO", "NHWC")


def _random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _reference_weight_grad(x, g, window, strides, padding):
  conv = lambda k: lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=_NHWC)
  k = jnp.zeros((*window, x.shape[-1], g.shape[-1]), jnp.float32)
  return jax.vjp(conv, k)[1](g)[0]


def _output_shape(x_shape, window, strides, padding, c_out):
  hw = [(x_shape[1 + a] + sum(padding[a]) - window[a]) // strides[a] + 1 for a in range(2)]
  return (x_shape[0], *hw, c_out)


class _KernelsFixture(parameterized.TestCase):
  """Every test starts and ends with the library as the environment builds it."""

  def setUp(self):
    super().setUp()
    direct._library.cache_clear()
    self.addCleanup(direct._library.cache_clear)
    if jax.default_backend() != "cpu":
      self.skipTest("the kernels run on the CPU; programs here compile for an accelerator")
    if not direct.available():
      self.skipTest("no working C++ compiler here")


# (name, x shape, window, strides, padding, C_out)
_CASES = (
    ("resnet_first_stage", (2, 8, 8, 16), (3, 3), (1, 1), ((1, 1), (1, 1)), 16),
    ("rgb_stem", (2, 9, 9, 3), (3, 3), (1, 1), ((1, 1), (1, 1)), 32),
    ("channel_remainder", (3, 7, 6, 20), (3, 3), (1, 1), ((1, 1), (1, 1)), 16),
    ("valid_5x4", (2, 9, 10, 6), (5, 4), (1, 1), ((0, 0), (0, 0)), 16),
    ("asymmetric_padding", (2, 7, 8, 5), (4, 3), (1, 1), ((2, 0), (1, 2)), 32),
    ("padding_beyond_window", (2, 5, 5, 8), (3, 3), (1, 1), ((3, 2), (2, 3)), 16),
    ("stride2_same", (2, 8, 8, 16), (3, 3), (2, 2), ((0, 1), (0, 1)), 32),
    ("stride2_pad1_odd", (2, 9, 9, 4), (3, 3), (2, 2), ((1, 1), (1, 1)), 16),
    ("mixed_strides", (2, 9, 8, 7), (3, 2), (1, 3), ((1, 0), (0, 2)), 16),
    ("pointwise_stride2", (2, 8, 8, 16), (1, 1), (2, 2), ((0, 0), (0, 0)), 32),
)


class WeightGradTest(_KernelsFixture):

  @parameterized.named_parameters(*_CASES)
  def test_matches_the_vjp_of_lax_conv(self, x_shape, window, strides, padding, c_out):
    x = _random(x_shape, 0)
    g = _random(_output_shape(x_shape, window, strides, padding, c_out), 1)
    expected = _reference_weight_grad(x, g, window, strides, padding)
    for threaded in (True, False):
      actual = jax.jit(lambda x, g, t=threaded: direct.weight_grad(
          x, g, window, strides, padding, threaded=t))(x, g)
      self.assertEqual(actual.shape, expected.shape)
      np.testing.assert_allclose(actual, expected, rtol=1e-5,
                                 atol=1e-5 * float(jnp.max(jnp.abs(expected))))

  def test_threads_do_not_change_a_bit(self):
    x, g = _random((4, 16, 16, 24), 0), _random((4, 16, 16, 32), 1)
    run = lambda t: jax.jit(lambda x, g: direct.weight_grad(
        x, g, (3, 3), (1, 1), ((1, 1), (1, 1)), threaded=t))(x, g)
    np.testing.assert_array_equal(run(True), run(False))
    np.testing.assert_array_equal(run(True), run(True))

  def test_vmap_over_one_and_two_leading_axes(self):
    x, g = _random((2, 3, 2, 6, 6, 5), 0), _random((2, 3, 2, 6, 6, 16), 1)
    wg = lambda x, g: direct.weight_grad(x, g, (3, 3), (1, 1), ((1, 1), (1, 1)))
    batched = jax.jit(jax.vmap(jax.vmap(wg)))(x, g)
    self.assertEqual(batched.shape, (2, 3, 3, 3, 5, 16))
    for a in range(2):
      for b in range(3):
        np.testing.assert_allclose(
            batched[a, b], _reference_weight_grad(x[a, b], g[a, b], (3, 3), (1, 1),
                                                  ((1, 1), (1, 1))), rtol=1e-5, atol=1e-4)
    # One operand batched, the other broadcast to it.
    shared = jax.jit(jax.vmap(wg, in_axes=(None, 0)))(x[0, 0], g[0])
    np.testing.assert_allclose(shared[1], _reference_weight_grad(
        x[0, 0], g[0, 1], (3, 3), (1, 1), ((1, 1), (1, 1))), rtol=1e-5, atol=1e-4)

  def test_handles_float32_and_multiples_of_16_outputs_only(self):
    self.assertTrue(direct.handles(jnp.float32, 32))
    self.assertFalse(direct.handles(jnp.float32, 24))
    self.assertFalse(direct.handles(jnp.bfloat16, 16))

  def test_not_built_where_the_default_backend_is_an_accelerator(self):
    direct._library.cache_clear()
    with mock.patch.object(jax, "default_backend", return_value="gpu"), \
        mock.patch.object(direct, "_build") as build:
      self.assertFalse(direct.handles(jnp.float32, 16))
    build.assert_not_called()


# (name, x shape, kernel shape, padding)
_FORWARD_CASES = (
    ("resnet_first_stage", (2, 8, 8, 16), (3, 3, 16, 16), ((1, 1), (1, 1))),
    ("two_output_vectors", (2, 6, 6, 32), (3, 3, 32, 64), ((1, 1), (1, 1))),
    ("rgb_wide_row_tiles", (2, 7, 37, 3), (3, 3, 3, 16), ((1, 1), (1, 1))),
    ("valid_5x4", (3, 9, 10, 6), (5, 4, 6, 32), ((0, 0), (0, 0))),
    ("asymmetric_padding", (2, 7, 8, 5), (4, 3, 5, 16), ((2, 0), (1, 2))),
    # Negative pads crop x: the input gradient of a convolution padded beyond its window.
    ("cropping", (2, 9, 9, 16), (3, 3, 16, 16), ((-1, 2), (2, -2))),
)


class ForwardTest(_KernelsFixture):

  @parameterized.named_parameters(*_FORWARD_CASES)
  def test_matches_lax_conv(self, x_shape, k_shape, padding):
    x, k = _random(x_shape, 0), _random(k_shape, 1)
    expected = lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=_NHWC)
    for threaded in (True, False):
      actual = jax.jit(lambda x, k, t=threaded: direct.forward(x, k, padding, threaded=t))(
          x, k)
      self.assertEqual(actual.shape, expected.shape)
      np.testing.assert_allclose(actual, expected, rtol=1e-5,
                                 atol=1e-5 * float(jnp.max(jnp.abs(expected))))

  def test_vmap_with_a_shared_input_or_kernel(self):
    pad = ((1, 1), (1, 1))
    x, k = _random((3, 2, 6, 6, 8), 0), _random((3, 3, 3, 8, 16), 1)
    conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), pad, dimension_numbers=_NHWC)
    fwd = lambda x, k: direct.forward(x, k, pad)
    for in_axes, args in (((0, 0), (x, k)), ((None, 0), (x[0], k)), ((0, None), (x, k[0]))):
      actual = jax.jit(jax.vmap(fwd, in_axes=in_axes))(*args)
      expected = jax.vmap(conv, in_axes=in_axes)(*args)
      np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)


class ConvolutionUsesTheKernelTest(_KernelsFixture):

  def _grad(self, x, k, strides, padding):
    def loss(k, x):
      with ops.use("cpu"):
        y = ops.conv(x, k, strides, padding)
      return jnp.sum(jnp.sin(y) * _random(y.shape, 7))  # nonlinear: the forward pass stays
    return jax.jit(jax.grad(loss, argnums=(0, 1)))

  def test_cpu_programs_call_the_kernel_and_match_lax(self):
    x, k = _random((2, 8, 8, 16), 0), _random((3, 3, 16, 32), 1)
    for strides in ((1, 1), (2, 2)):
      grad = self._grad(x, k, strides, "SAME")
      text = grad.lower(k, x).as_text()
      self.assertIn(direct._WEIGHT_GRAD, text)
      # The forward pass and, with stride 1, the input gradient.
      self.assertEqual(text.count(f"@{direct._FORWARD}("), 2 if strides == (1, 1) else 0)
      dk, dx = grad(k, x)

      def reference(k, x):
        y = lax.conv_general_dilated(x, k, strides, "SAME", dimension_numbers=_NHWC)
        return jnp.sum(jnp.sin(y) * _random(y.shape, 7))
      rk, rx = jax.grad(reference, argnums=(0, 1))(k, x)
      for actual, expected in ((dk, rk), (dx, rx)):
        np.testing.assert_allclose(actual, expected, rtol=1e-5,
                                   atol=2e-5 * float(jnp.max(jnp.abs(expected))))

  def test_other_platforms_get_the_xla_form(self):
    x, k = _random((2, 8, 8, 16), 0), _random((3, 3, 16, 16), 1)
    exported = jax.export.export(self._grad(x, k, (1, 1), "SAME"), platforms=["cuda"])(k, x)
    self.assertNotIn(direct._WEIGHT_GRAD, exported.mlir_module())
    self.assertNotIn(direct._FORWARD, exported.mlir_module())

  def test_disabled_for_what_is_traced_inside(self):
    x, k = _random((2, 8, 8, 16), 0), _random((3, 3, 16, 16), 1)
    with direct.use_kernels(False):
      self.assertFalse(direct.handles(jnp.float32, 16))
      off = self._grad(x, k, (1, 1), "SAME").lower(k, x).as_text()
    self.assertTrue(direct.handles(jnp.float32, 16))
    on = self._grad(x, k, (1, 1), "SAME").lower(k, x).as_text()
    self.assertNotIn(direct._WEIGHT_GRAD, off)
    self.assertIn(direct._WEIGHT_GRAD, on)

  def test_ops_jit_binds_the_choice_when_made(self):
    x, k = _random((2, 8, 8, 16), 0), _random((3, 3, 16, 16), 1)
    conv = lambda x, k: ops.conv(x, k, (1, 1), "SAME", impl="cpu")
    with direct.use_kernels(False):
      made_off = ops.jit(conv)
    made_on = ops.jit(conv)
    with direct.use_kernels(False):  # traced here, made outside: kernels
      self.assertIn(direct._FORWARD, made_on.lower(x, k).as_text())
    self.assertNotIn(direct._FORWARD, made_off.lower(x, k).as_text())

  def test_turned_off_by_the_environment(self):
    x, k = _random((2, 8, 8, 16), 0), _random((3, 3, 16, 16), 1)
    with mock.patch.dict(os.environ, {"EVOPRUNE_KERNELS": "0"}):
      direct._library.cache_clear()
      self.assertFalse(direct.available())
      text = self._grad(x, k, (1, 1), "SAME").lower(k, x).as_text()
    self.assertNotIn(direct._WEIGHT_GRAD, text)
    self.assertNotIn(direct._FORWARD, text)
    self.assertIn("convolution", text)
    with self.assertRaisesRegex(RuntimeError, "not available"):
      direct._library.cache_clear()
      with mock.patch.dict(os.environ, {"EVOPRUNE_KERNELS": "0"}):
        direct.weight_grad(x, x, (3, 3), (1, 1), ((1, 1), (1, 1)))


class BuildTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    direct._library.cache_clear()
    self.addCleanup(direct._library.cache_clear)
    self.cache = tempfile.mkdtemp()

  def test_a_missing_compiler_warns_and_falls_back(self):
    env = {"CXX": "/nonexistent/c++", "EVOPRUNE_CACHE_DIR": self.cache}
    with mock.patch.dict(os.environ, env), self.assertWarnsRegex(RuntimeWarning,
                                                                 "could not be built"):
      self.assertFalse(direct.available())
    self.assertEqual(list(pathlib.Path(self.cache).iterdir()), [])

  def test_built_once_into_the_cache(self):
    with mock.patch.dict(os.environ, {"EVOPRUNE_CACHE_DIR": self.cache}):
      try:
        first = direct._build()
      except (OSError, direct.subprocess.CalledProcessError):
        self.skipTest("no working C++ compiler here")
      built_at = first.stat().st_mtime_ns
      second = direct._build()
    self.assertEqual(first, second)
    self.assertEqual(second.stat().st_mtime_ns, built_at)
    self.assertEqual([p.name for p in pathlib.Path(self.cache).iterdir()], [first.name])


if __name__ == "__main__":
  absltest.main()
