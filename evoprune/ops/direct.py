"""Direct convolution kernels for XLA:CPU, written in C++ (`direct.cc`), built on first use
with the system's C++ compiler and called through XLA's FFI.

Why by hand: the weight gradient of a stride-1 convolution with 16 output channels is a
contraction of 2,304 outputs over ~10^5 products (ResNet-20's first stage), which XLA:CPU
(jaxlib 0.10.2) can only give Eigen's contraction, after transposing both operands to put
the batch in the feature axis. Eigen ran it at ~50 GFLOP/s, the transposes took as long
again, and neither YNNPACK (slower on one thread everywhere else, and XLA routes all
convolutions or none to it) nor oneDNN (its kernels ship in jaxlib, but nothing rewrites a
convolution to them) is reachable per operation. A direct kernel keeps each tap's 16 x 16
sums in registers and reads x and g in place. Inside `lax.scan`, batch 128, one core of
the 2-core AVX-512 AMD EPYC, ms, XLA form (transposes included) -> this:
16->16 3x3 at 32x32 15.7 -> 5.2 (116 GFLOP/s), 32->32 at 16x16 8.8 -> 5.6, 64->64 at 8x8
7.4 -> 5.3. The stride-1 forward pass (which also gives the input gradient: g convolved
with the flipped kernel) keeps tiles of pixels by output channels in registers, over a
channel-major padded copy of each image: same setting, 16->16 11.0 -> 7.1 (pixel pairs
before), 64->64 6.6 -> 5.8, RGB 3->32 9.3 -> 2.9 (space-to-depth before).

The library is compiled once per source, compiler, jaxlib and CPU (`-march=native`) into
`$EVOPRUNE_CACHE_DIR` (default `~/.cache/evoprune`); where no compiler works, `available()`
is False and the convolutions keep their XLA formulation (one warning says why).
`EVOPRUNE_KERNELS=0` turns the kernels off for the process, `use_kernels(False)` for what
is traced inside it. The compiler is `$CXX`, else `c++`.
"""

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from evoprune.ops.patches import output_size

_SOURCE = pathlib.Path(__file__).with_name("direct.cc")
_WEIGHT_GRAD = "evoprune_conv_weight_grad"
_FORWARD = "evoprune_conv_forward"
# Output channels per register block in direct.cc.
LANES = 16
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
# Set by `use_kernels()`.
_USE_KERNELS = contextvars.ContextVar("evoprune_use_kernels", default=True)


def _cache_dir() -> pathlib.Path:
  default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
  return pathlib.Path(os.environ.get("EVOPRUNE_CACHE_DIR", default / "evoprune"))


def _cpu_signature() -> str:
  """What `-march=native` compiles for: the CPU's model and feature flags."""
  try:
    info = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.machine() + platform.processor()
  lines = [l for l in info.splitlines() if l.startswith(("model name", "flags", "Features"))]
  return platform.machine() + "".join(sorted(set(lines)))


def _build() -> pathlib.Path:
  """The kernels' shared library, compiled unless the cache has it; raises OSError or
  CalledProcessError when the compiler is missing or fails."""
  compiler = os.environ.get("CXX") or "c++"
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                           check=True).stdout
  key = hashlib.sha256("\0".join([
      _SOURCE.read_text(), compiler, version, " ".join(_FLAGS), jax.__version__,
      jax.ffi.include_dir(), _cpu_signature()]).encode()).hexdigest()[:16]
  path = _cache_dir() / f"direct-{key}.so"
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  # Compiled beside its final name, then renamed: concurrent builds (pytest workers) each
  # write their own file, and a reader never sees a partial one.
  with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
    built = pathlib.Path(scratch) / path.name
    subprocess.run([compiler, *_FLAGS, "-I", jax.ffi.include_dir(), str(_SOURCE), "-o",
                    str(built)], capture_output=True, text=True, check=True)
    os.replace(built, path)
  return path


@functools.cache
def _library() -> ctypes.CDLL | None:
  if os.environ.get("EVOPRUNE_KERNELS", "1") == "0":
    return None
  try:
    library = ctypes.CDLL(str(_build()))
  except (OSError, subprocess.CalledProcessError) as error:
    detail = getattr(error, "stderr", "") or str(error)
    warnings.warn("evoprune.ops.direct: the C++ kernels could not be built, convolutions "
                  f"keep their XLA formulation ({detail.strip()[-2000:]})", RuntimeWarning)
    return None
  jax.ffi.register_ffi_target(_WEIGHT_GRAD, jax.ffi.pycapsule(library.EvopruneConvWeightGrad),
                              platform="cpu")
  jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(library.EvopruneConvForward),
                              platform="cpu")
  return library


def available() -> bool:
  """Whether the kernels are built and registered (building them on the first call)."""
  return _library() is not None


def _require_available():
  if not available():
    raise RuntimeError("evoprune.ops.direct: the C++ kernels are not available (built "
                       "without a working C++ compiler, or EVOPRUNE_KERNELS=0)")


@contextlib.contextmanager
def use_kernels(enabled: bool):
  """Within this context, convolutions traced use the kernels where they apply (True, the
  default outside) or their XLA forms (False: `handles()` is False), e.g. to time both
  side by side in one process. `ops.jit` binds the choice in effect when it is called."""
  token = _USE_KERNELS.set(bool(enabled))
  try:
    yield
  finally:
    _USE_KERNELS.reset(token)


def uses_kernels() -> bool:
  """What `use_kernels()` set here (True outside any)."""
  return _USE_KERNELS.get()


def handles(dtype, c_out: int) -> bool:
  """Whether `forward` and `weight_grad` take a convolution with these operands' dtype and
  C_out outputs: float32, C_out % 16 == 0, on a machine whose default backend is the CPU
  (elsewhere the programs run on the accelerator, so the kernels are not built)."""
  return (dtype == jnp.float32 and c_out % LANES == 0 and _USE_KERNELS.get()
          and jax.default_backend() == "cpu" and available())


def weight_grad(x: jax.Array, g: jax.Array, window: tuple[int, int],
                strides: tuple[int, int], padding: tuple[tuple[int, int], ...], *,
                threaded: bool = True) -> jax.Array:
  """dL/dkernel [kh, kw, C_in, C_out] of a dense convolution, on CPU only.

  Args:
    x: [B, H, W, C_in] the convolution's input.
    g: [B, H', W', C_out] the output's cotangent, C_out a multiple of 16.
    window: (kh, kw).
    strides: (sh, sw).
    padding: ((lo, hi), (lo, hi)); only the lows are read (g's shape implies the rest).
    threaded: split the taps and channel blocks over XLA's intra-op threads.

  Sums in a fixed order whatever the thread count; batched (vmapped) calls loop inside.

  Raises:
    RuntimeError: the kernels are not available (see `available()`).
  """
  _require_available()
  out = jax.ShapeDtypeStruct((*window, x.shape[-1], g.shape[-1]), jnp.float32)
  call = jax.ffi.ffi_call(_WEIGHT_GRAD, out, vmap_method="expand_dims")
  return call(x, g, sh=np.int64(strides[0]), sw=np.int64(strides[1]),
              lo_h=np.int64(padding[0][0]), lo_w=np.int64(padding[1][0]),
              threaded=bool(threaded))


def forward(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], ...], *,
            threaded: bool = True) -> jax.Array:
  """A stride-1 dense convolution [B, H', W', C_out] of x [B, H, W, C_in] with kernel
  [kh, kw, C_in, C_out] (C_out a multiple of 16), on CPU only."""
  _require_available()
  out_hw = output_size(x.shape, kernel.shape[:2], (1, 1), padding)
  out = jax.ShapeDtypeStruct((x.shape[0], *out_hw, kernel.shape[-1]), jnp.float32)
  call = jax.ffi.ffi_call(_FORWARD, out, vmap_method="expand_dims")
  return call(x, kernel, lo_h=np.int64(padding[0][0]), lo_w=np.int64(padding[1][0]),
              threaded=bool(threaded))
