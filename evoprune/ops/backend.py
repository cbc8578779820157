"""Which implementation `evoprune.ops` stages, how its CPU programs are compiled, and
`materialize` (a value in its own buffer on XLA:CPU)."""

import contextlib
import contextvars
import functools
import os
from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cpu")

Padding = str | Sequence[tuple[int, int]]


# Set by `plain_ops()`: 'auto' stages only the plain XLA ops while tracing.
_PLAIN = contextvars.ContextVar("evoprune_plain_ops", default=False)


def _check_impl(impl: str) -> str:
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl={impl!r} is unknown; use one of {IMPLEMENTATIONS}")
  if impl == "auto" and (os.environ.get("EVOPRUNE_OPS", "") == "xla" or _PLAIN.get()):
    return "xla"
  return impl


def _stage(impl: str, cpu, reference, *operands):
  """reference(*operands) for impl 'xla', cpu(*operands) for 'cpu'; for 'auto' both, staged
  with `lax.platform_dependent` and resolved when the program is lowered."""
  if impl == "xla":
    return reference(*operands)
  if impl == "cpu":
    return cpu(*operands)
  return lax.platform_dependent(*operands, cpu=cpu, default=reference)


@contextlib.contextmanager
def plain_ops():
  """Within this context, `impl='auto'` stages only the plain XLA ops, as `EVOPRUNE_OPS=xla`.

  For analyses of the network rather than of how it runs on CPU: `cost` counts the MACs of
  the plain convolutions (the space-to-depth RGB forward does ~1.4x as many).
  """
  token = _PLAIN.set(True)
  try:
    yield
  finally:
    _PLAIN.reset(token)


# XLA:CPU (jaxlib 0.10.2) hands dense convolutions, dots and reductions to YNNPACK
# (`xla_cpu_experimental_ynn_fusion_type` = INDIVIDUAL_CONVOLUTION, INDIVIDUAL_DOT, REDUCE).
# Its convolution ran on one thread: 32->64 3x3 VALID at 15x15, batch 128, 13.0 ms on one
# core and on two (31 GMAC/s), where Eigen's, XLA's fallback, took 8.7 ms on one core and
# 5.1 ms on two, as fast as PyTorch's oneDNN (5.2). The training programs keep YNNPACK for
# dots and reductions and give convolutions back to Eigen. Measured in one process, train
# step (2-core AMD EPYC, batch 128, default / these options): thesis CNN 0.86-0.91,
# ResNet-20 0.92, LeNet-5 0.97-1.02, MobileNet 0.98-1.06 (it has almost no dense convolution).
_CPU_COMPILER_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type",
                          "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"),)


@functools.cache
def _cpu_options_supported() -> bool:
  """Whether this jaxlib knows `_CPU_COMPILER_OPTIONS` (the names are experimental)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(_CPU_COMPILER_OPTIONS)).lower(
        jnp.zeros((), jnp.float32)).compile()
  except jax.errors.JaxRuntimeError:
    return False
  return True


def compiler_options(backend: str | None = None) -> dict[str, str]:
  """`jax.jit(..., compiler_options=...)` for the programs that train the zoo on `backend`.

  On CPU, convolutions go to Eigen's multithreaded kernels instead of YNNPACK's (see
  `_CPU_COMPILER_OPTIONS`); empty on other backends, under `EVOPRUNE_OPS=xla`, and where
  the installed jaxlib does not know the option.
  """
  backend = backend or jax.default_backend()
  if backend != "cpu" or _check_impl("auto") == "xla" or not _cpu_options_supported():
    return {}
  return dict(_CPU_COMPILER_OPTIONS)


def describe(backend: str | None = None) -> str:
  """What `impl='auto'` runs on `backend` (default: JAX's default backend)."""
  backend = backend or jax.default_backend()
  if backend != "cpu" or _check_impl("auto") == "xla":
    return "xla (lax.conv_general_dilated, reduce_window max pool)"
  return ("cpu (conv: XLA forward/input grad (Eigen in training programs), weight grad "
          "as a canonical conv (stride 1) or chunked im2col matmuls (strided), few-channel "
          "stride-1 convs on the space-to-depth input; 1x1 as matmul; depthwise as "
          "shifted multiply-adds; max pool: max of strided views, first-max grad; batch "
          "norm: written-out gradient)")


def _materialized(x: jax.Array) -> jax.Array:
  """x, read from its own buffer by the backward pass instead of recomputed there.

  XLA:CPU fuses cheap elementwise producers into every consumer: the weight gradient's
  transposes and patch copies recomputed the batch norm, ReLU and, in a ResNet, the whole
  chain of residual sums since the last downsampling, in transposed loop order (one such
  transpose took 29 ms where a plain one takes 2-4). `lax.optimization_barrier` is removed
  before fusion on CPU, but nothing is fused across a conditional, so x passes through one
  whose branches both return it (the predicate only has to be unknown to the compiler; the
  branches must differ as jaxprs, or JAX inlines them: `v * 1` is x bit for bit, and XLA
  folds it). Train step with / without, same process: ResNet-20 0.89, LeNet-5 0.89.
  """
  first = x.ravel()[0]
  return lax.cond(first == first, lambda v: v, lambda v: v * 1, x)


def materialize(x: jax.Array) -> jax.Array:
  """x, computed into its own buffer on CPU; the identity (no op) on other backends.

  For values with several consumers, such as a ResNet block's output (the next block's
  convolution and its residual sum): XLA:CPU fuses cheap elementwise producers into each
  consumer, so every residual sum recomputed the batch norms, ReLUs and sums of all
  blocks since the last downsampling, as did the strided shortcut slice (11 ms per
  ResNet-20 step in one fusion). With each block's output materialized: ResNet-20 train
  step 0.95-0.98 of without (same process). Gradients pass through unchanged.
  """
  return _stage(_check_impl("auto"), _materialized_forward, lambda v: v, x)


@jax.custom_jvp
def _materialized_forward(x):
  return _materialized(x)


@_materialized_forward.defjvp
def _materialized_forward_jvp(primals, tangents):
  # Tangents (and so cotangents) pass through as they are: only the primal is materialized.
  return _materialized(primals[0]), tangents[0]
