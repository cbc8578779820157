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

from evoprune.ops import direct

IMPLEMENTATIONS = ("auto", "xla", "cpu")

Padding = str | Sequence[tuple[int, int]]


# Set by `use()`: what impl='auto' stages while tracing (None: as `EVOPRUNE_OPS` says).
_USE = contextvars.ContextVar("evoprune_ops", default=None)


def _checked(impl: str, name: str) -> str:
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"{name}={impl!r} is unknown; use one of {IMPLEMENTATIONS}")
  return impl


def mode() -> str:
  """What `impl='auto'` stages now: 'auto' (the CPU formulations where the program is
  compiled for CPU, the plain XLA ops elsewhere), 'xla' or 'cpu' (those on every backend).

  Set by `use()`, else by the environment variable `EVOPRUNE_OPS` (unset: 'auto').
  """
  forced = _USE.get()
  if forced is not None:
    return forced
  return _checked(os.environ.get("EVOPRUNE_OPS", "") or "auto", "EVOPRUNE_OPS")


def _check_impl(impl: str) -> str:
  return mode() if _checked(impl, "impl") == "auto" else impl


def _stage(impl: str, cpu, reference, *operands):
  """reference(*operands) for impl 'xla', cpu(*operands) for 'cpu'; for 'auto' both, staged
  with `lax.platform_dependent` and resolved when the program is lowered."""
  if impl == "xla":
    return reference(*operands)
  if impl == "cpu":
    return cpu(*operands)
  return lax.platform_dependent(*operands, cpu=cpu, default=reference)


@contextlib.contextmanager
def use(impl: str):
  """Within this context, `impl='auto'` stages `impl`'s ops, whatever `EVOPRUNE_OPS` says.

  'xla': the plain XLA ops on every backend, for analyses of the network rather than of how
  it runs on CPU (`cost` counts the MACs of the plain convolutions; the space-to-depth RGB
  forward does ~1.4x as many) and to time them against the CPU formulations. 'cpu': the CPU
  formulations on every backend, to time them on a GPU or TPU. 'auto': by backend.
  The choice is made when a function is traced: `jit` binds it to a program.
  """
  token = _USE.set(_checked(impl, "impl"))
  try:
    yield
  finally:
    _USE.reset(token)


def jit(fn, **jit_kwargs):
  """`jax.jit(fn, compiler_options=compiler_options(), **jit_kwargs)`, traced under the ops
  mode in effect now (`mode()`, and `direct.uses_kernels()`) whenever it is traced,
  so a program made within `use()` keeps its ops outside it (and the other way round)."""
  staged, kernels = mode(), direct.uses_kernels()

  @functools.wraps(fn)
  def bound(*args, **kwargs):
    with use(staged), direct.use_kernels(kernels):
      return fn(*args, **kwargs)

  return jax.jit(bound, compiler_options=compiler_options(), **jit_kwargs)


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
  `_CPU_COMPILER_OPTIONS`); empty on other backends, where the plain ops are staged
  (`use('xla')`, `EVOPRUNE_OPS=xla`), and where the installed jaxlib does not know the
  option.
  """
  backend = backend or jax.default_backend()
  if backend != "cpu" or _staged(backend) != "cpu":
    return {}
  return dict(_CPU_COMPILER_OPTIONS) if _cpu_options_supported() else {}


def _staged(backend: str | None) -> str:
  """'cpu' or 'xla': what `impl='auto'` stages for a program compiled for `backend`."""
  staged = mode()
  if staged == "auto":
    return "cpu" if (backend or jax.default_backend()) == "cpu" else "xla"
  return staged


def describe(backend: str | None = None) -> str:
  """What `impl='auto'` runs on `backend` (default: JAX's default backend)."""
  if _staged(backend) == "xla":
    return "xla (lax.conv_general_dilated, reduce_window max pool)"
  kernels = ("stride-1 forward/input grad and all weight grads of dense k x k convs in "
             "evoprune's C++ kernels "
             "(float32, C_out % 16 == 0); otherwise " if direct.available()
             else "(C++ kernels not built) ")
  return (f"cpu (conv: {kernels}XLA forward/input grad (Eigen in training programs), "
          "weight grad as a canonical conv (stride 1) or chunked im2col matmuls (strided), "
          "few-channel "
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
