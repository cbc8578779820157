"""Output sizes, shifted views, im2col patches and batch chunks: the pieces the convolution
formulations of `evoprune.ops` share."""

import jax
from jax import lax
import jax.numpy as jnp

# NHWC activations, HWIO kernels: the layout of flax.linen.Conv and of the zoo.
NHWC = ("NHWC", "HWIO", "NHWC")
# Bytes of im2col patches (or per-tap products) per scanned batch chunk: small enough to
# stay in a core's L2 / the shared L3 while the matmul consumes them.
CHUNK_BYTES = 1 << 20


def output_size(x_shape, window, strides, padding) -> tuple[int, int]:
  """(H', W') of a convolution of x [B, H, W, C] with explicit ((lo, hi), (lo, hi)) padding."""
  return tuple((x_shape[1 + a] + sum(padding[a]) - window[a]) // strides[a] + 1
               for a in range(2))


def taps(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
         padding: tuple[tuple[int, int], ...], out_hw: tuple[int, int]) -> list[jax.Array]:
  """The kh*kw shifted (strided) views of padded x: each [B, H', W', C], row-major taps."""
  (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  return [lax.slice(x, (0, i, j, 0), (x.shape[0], i + (ho - 1) * sh + 1,
                                      j + (wo - 1) * sw + 1, x.shape[3]), (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]


def channel_major_patches(xt: jax.Array, window: tuple[int, int], strides: tuple[int, int],
                          out_hw: tuple[int, int]) -> jax.Array:
  """im2col of padded channel-major xt [C, B, H + pads, W + pads]: [kh * kw * C, B * H' * W']."""
  (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
  c, b = xt.shape[:2]
  patches = jnp.stack([
      lax.slice(xt, (0, 0, i, j), (c, b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1),
                (1, 1, sh, sw)) for i in range(kh) for j in range(kw)])
  return patches.reshape(kh * kw * c, b * ho * wo)


def chunks(batch: int, bytes_per_example: int, chunk_bytes: int | None = None) -> int:
  """Number of equal batch chunks so that each holds about `chunk_bytes` (`CHUNK_BYTES`)."""
  chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
  per_chunk = max(1, chunk_bytes // max(bytes_per_example, 1))
  size = max(d for d in range(1, min(per_chunk, batch) + 1) if batch % d == 0)
  return batch // size


def scan_sum(fn, xs: tuple[jax.Array, ...], num_chunks: int, init: jax.Array) -> jax.Array:
  """sum_k fn(*chunk_k(xs)) over `num_chunks` equal chunks of the leading (batch) axis."""
  if num_chunks == 1:
    return fn(*xs)
  split = tuple(a.reshape(num_chunks, a.shape[0] // num_chunks, *a.shape[1:]) for a in xs)
  total, _ = lax.scan(lambda acc, chunk: (acc + fn(*chunk), None), init, split)
  return total


def map_chunks(fn, x: jax.Array, num_chunks: int) -> jax.Array:
  """fn over `num_chunks` equal batch chunks of x, outputs concatenated along the batch."""
  if num_chunks == 1:
    return fn(x)
  out = lax.map(fn, x.reshape(num_chunks, x.shape[0] // num_chunks, *x.shape[1:]))
  return out.reshape(x.shape[0], *out.shape[2:])
