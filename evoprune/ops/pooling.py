"""Max pooling: the elementwise maximum of strided window views on CPU (see `evoprune.ops`)."""

import functools
from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from evoprune.ops.backend import Padding, _check_impl, _stage


def max_pool(x: jax.Array, window_shape: Sequence[int] = (2, 2),
             strides: Sequence[int] | None = None, padding: Padding = "VALID", *,
             impl: str = "auto") -> jax.Array:
  """Max pooling over the spatial axes, as `flax.linen.max_pool`.

  Args:
    x: [B, H, W, C] activations.
    window_shape: pooling window (wh, ww).
    strides: window strides; default (1, 1), as in flax.
    padding: 'VALID', 'SAME' or ((lo, hi), (lo, hi)).
    impl: 'auto' (CPU formulation on CPU, `reduce_window` elsewhere), 'xla' or 'cpu'.

  Returns:
    [B, H', W', C] maxima; on CPU with window == strides and VALID padding the trailing
    rows/columns that do not fill a window are dropped, as in `reduce_window`.
  """
  impl = _check_impl(impl)
  window = tuple(int(w) for w in window_shape)
  strides = tuple(int(s) for s in strides) if strides is not None else (1,) * len(window)
  reference = functools.partial(_max_pool_xla, window=window, strides=strides,
                                padding=padding)
  fast = x.ndim == 4 and len(window) == 2 and window == strides and (
      padding == "VALID" or padding == ((0, 0), (0, 0)) or padding == [(0, 0), (0, 0)])
  if not fast:
    return reference(x)
  cpu = lambda x: _max_pool_views(x, window, x.shape[1:3])
  return _stage(impl, cpu, reference, x)


def _max_pool_xla(x: jax.Array, *, window: tuple[int, ...], strides: tuple[int, ...],
                  padding: Padding) -> jax.Array:
  dims = (1, *window, 1) if x.ndim == len(window) + 2 else window
  strides_full = (1, *strides, 1) if x.ndim == len(window) + 2 else strides
  if not isinstance(padding, str):
    padding = ((0, 0), *tuple(tuple(p) for p in padding), (0, 0))
  return lax.reduce_window(x, -jnp.inf, lax.max, dims, strides_full, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool_views(x: jax.Array, window: tuple[int, int], size: tuple[int, int]
                    ) -> jax.Array:
  """Max pool of x [B, *size, C] with window == strides, VALID."""
  return _max_and_first(x, window)[0]


def _window_views(x: jax.Array, window: tuple[int, int]) -> list[jax.Array]:
  """The wh*ww strided views [B, H // wh, W // ww, C] of x, one per window position.

  A maximum over these views is one elementwise loop; the same maximum as a reduction
  over the axes of x.reshape(B, H', wh, W', ww, C) ran 10x slower on XLA:CPU.
  """
  b, h, w, c = x.shape
  (wh, ww), (ho, wo) = window, (h // window[0], w // window[1])
  return [lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * wh + 1, j + (wo - 1) * ww + 1, c),
                    (1, wh, ww, 1)) for i in range(wh) for j in range(ww)]


def _max_and_first(x: jax.Array, window: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """The window maxima [B, H', W', C] and the row-major position of each window's first
  maximum (`_position_dtype`)."""
  views = _window_views(x, window)
  y = functools.reduce(jnp.maximum, views)
  dtype = _position_dtype(window)
  first = jnp.full(y.shape, len(views) - 1, dtype)
  for position in reversed(range(len(views) - 1)):
    first = jnp.where(views[position] == y, jnp.asarray(position, dtype), first)
  return y, first


def _position_dtype(window: tuple[int, int]) -> np.dtype:
  """int8 (a quarter of a float's bytes) where it holds every window position."""
  return np.dtype(np.int8 if window[0] * window[1] <= np.iinfo(np.int8).max else np.int32)


def _max_pool_fwd(x, window, size):
  return _max_and_first(x, window)


def _max_pool_bwd(window, size, first, g):
  # Only the first maximum of each window (row-major) gets the gradient: XLA's
  # select-and-scatter (the gradient of reduce_window max) keeps the earliest element that
  # compares >= to the rest, and ties (zeros after ReLU) are common. dx is written in its
  # own layout, [B, H', wh, W', ww, C], by one broadcast-compare-select over (first, g);
  # the earlier sum of wh*ww interior-padded, masked copies of g re-read x and the pool
  # output and recomputed their producers (thesis CNN train step 0.92 of that, same
  # process; LeNet-5 equal).
  (wh, ww), (b, ho, wo, c) = window, g.shape
  positions = np.arange(wh * ww, dtype=_position_dtype(window))
  positions = positions.reshape(1, 1, wh, 1, ww, 1)
  dx = jnp.where(first[:, :, None, :, None, :] == positions, g[:, :, None, :, None, :],
                 jnp.zeros((), g.dtype)).reshape(b, ho * wh, wo * ww, c)
  # Rows and columns that fill no window get no gradient.
  return (jnp.pad(dx, ((0, 0), (0, size[0] - ho * wh), (0, size[1] - wo * ww), (0, 0))),)


_max_pool_views.defvjp(_max_pool_fwd, _max_pool_bwd)
