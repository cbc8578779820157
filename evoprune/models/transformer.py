"""Transformers: a small Vision Transformer and a character-level GPT.

Both stack the same pre-LayerNorm block: `x + attn(x)`, then `x + mlp(x)`, where `attn`
is LayerNorm -> one fused q/k/v Dense -> (causal) softmax attention -> output Dense, and
`mlp` is LayerNorm -> Dense 4x -> GELU/ReLU -> Dense. The attention matmuls `q @ k^T` and
`att @ v` run directly in the `attn` module's scope, so `cost.report` attributes their
MACs to it (a layer like "h_00/attn" with no parameters of its own).

Names follow forward order under lexicographic sorting:
  GPT: embed_pos, embed_tok, h_00 ... h_NN (attn{ln, qkv, w_out}, mlp{ln, w_in, w_out}),
       head{ln, w_out}
  ViT: embed{patch, pos}, h_00 ... h_NN, head{ln, w_out}

TinyGPT (the seed paper's 10.79M model) is Karpathy's "Let's build GPT" character model,
which nanoGPT's shakespeare_char config resembles: vocab 65, block 256, 6 layers, 6 heads,
384 channels. Its exact size fixes the bias and tying choices. Per block:
  qkv without bias 384*1152 = 442,368; output 384*384 + 384 = 147,840;
  MLP 384*1536 + 1536 + 1536*384 + 384 = 1,181,568; two LayerNorms with bias 1,536
  -> 1,773,312 per block, 10,639,872 for six.
Plus token embedding 65*384 = 24,960, positions 256*384 = 98,304, final LayerNorm 768,
and an untied head with bias 384*65 + 65 = 25,025: total 10,788,929 = 10.79M. nanoGPT's
own choices (tied head, all or no biases) give 10.75M-10.80M but never 10.79M.
"""

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from evoprune.models import layers

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}
_LN_EPSILON = 1e-5  # PyTorch's default, used by nanoGPT and the lecture code


def _check_dropout(rate: float) -> None:
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout={rate} is outside [0, 1); pass e.g. 0.0 or 0.2")


def _check_heads(width: int, heads: int, width_name: str, heads_name: str) -> None:
  if width < 1 or heads < 1 or width % heads:
    raise ValueError(
        f"{width_name}={width} must be a positive multiple of {heads_name}={heads}; "
        f"pass e.g. {width_name}={max(heads, 1) * 64}")


class SelfAttention(nn.Module):
  """Pre-LN multi-head self-attention branch (the residual is added by the caller).

  Attributes:
    num_heads: attention heads; the width must be divisible by it.
    causal: mask future positions (language models).
    dropout: rate on attention probabilities and on the output.
    use_bias: bias in the LayerNorm and the output Dense.
    qkv_bias: bias in the fused q/k/v Dense.
    kernel_init: initializer of the q/k/v kernel.
    out_init: initializer of the output kernel (GPT scales it by depth).
  """

  num_heads: int
  causal: bool
  dropout: float = 0.0
  use_bias: bool = True
  qkv_bias: bool = True
  kernel_init: Callable = nn.initializers.xavier_uniform()
  out_init: Callable = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, T, C] -> [B, T, C]."""
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    h = nn.LayerNorm(epsilon=_LN_EPSILON, use_bias=self.use_bias, name="ln")(x)
    qkv = nn.Dense(
        3 * width, use_bias=self.qkv_bias, kernel_init=self.kernel_init, name="qkv")(h)
    q, k, v = jnp.split(qkv.reshape(batch, length, 3 * self.num_heads, head_dim), 3, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    logits = logits.astype(jnp.float32)  # a stable softmax under low-precision inputs
    if self.causal:
      allowed = jnp.tril(jnp.ones((length, length), dtype=bool))
      logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    probs = nn.Dropout(self.dropout, deterministic=not train)(probs)
    y = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, width)
    y = nn.Dense(width, use_bias=self.use_bias, kernel_init=self.out_init, name="w_out")(y)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


class FeedForward(nn.Module):
  """Pre-LN MLP branch: LayerNorm -> Dense(hidden) -> activation -> Dense(C).

  Attributes:
    hidden: inner width (4 * C in GPT).
    activation: a key of `ACTIVATIONS`.
    dropout: rate on the output.
    use_bias: bias in the LayerNorm and both Dense layers.
    kernel_init: initializer of the first kernel.
    out_init: initializer of the second kernel.
  """

  hidden: int
  activation: str = "gelu"
  dropout: float = 0.0
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.xavier_uniform()
  out_init: Callable = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, T, C] -> [B, T, C]."""
    h = nn.LayerNorm(epsilon=_LN_EPSILON, use_bias=self.use_bias, name="ln")(x)
    h = nn.Dense(self.hidden, use_bias=self.use_bias, kernel_init=self.kernel_init,
                 name="w_in")(h)
    h = ACTIVATIONS[self.activation](h)
    h = nn.Dense(x.shape[-1], use_bias=self.use_bias, kernel_init=self.out_init,
                 name="w_out")(h)
    return nn.Dropout(self.dropout, deterministic=not train)(h)


class Block(nn.Module):
  """Pre-LN transformer block: `x + attn(x)`, then `x + mlp(x)`.

  Attributes:
    num_heads, causal, hidden, activation, dropout, use_bias, qkv_bias, kernel_init,
    out_init: passed to `SelfAttention` and `FeedForward`.
  """

  num_heads: int
  causal: bool
  hidden: int
  activation: str = "gelu"
  dropout: float = 0.0
  use_bias: bool = True
  qkv_bias: bool = True
  kernel_init: Callable = nn.initializers.xavier_uniform()
  out_init: Callable = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, T, C] -> [B, T, C]."""
    x = x + SelfAttention(
        self.num_heads, self.causal, self.dropout, self.use_bias, self.qkv_bias,
        self.kernel_init, self.out_init, name="attn")(x, train)
    return x + FeedForward(
        self.hidden, self.activation, self.dropout, self.use_bias, self.kernel_init,
        self.out_init, name="mlp")(x, train)


class Head(nn.Module):
  """Final LayerNorm, optional mean pooling over tokens, then the output projection.

  Attributes:
    features: outputs (classes or vocabulary).
    pool: average over the token axis first (ViT classification).
    use_bias: bias in the LayerNorm.
    out_bias: bias in the output Dense.
    tied_embed: when set, project with this embedding's transpose (no `w_out`).
    kernel_init: initializer of `w_out`.
  """

  features: int
  pool: bool = False
  use_bias: bool = True
  out_bias: bool = True
  tied_embed: nn.Embed | None = None
  kernel_init: Callable = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, C] -> [B, features] if pool else [B, T, features]."""
    x = nn.LayerNorm(epsilon=_LN_EPSILON, use_bias=self.use_bias, name="ln")(x)
    if self.pool:
      x = jnp.mean(x, axis=1)
    if self.tied_embed is not None:
      return self.tied_embed.attend(x)
    return nn.Dense(self.features, use_bias=self.out_bias, kernel_init=self.kernel_init,
                    name="w_out")(x)


class ViT(nn.Module):
  """A small Vision Transformer: patchify, learned positions, pre-LN blocks, mean pool.

  Mean pooling instead of a class token keeps the model simple and is as accurate for
  small ViTs (big_vision's "gap" head).

  Attributes:
    num_classes: output logits.
    patch_size: square patch side; H and W must be divisible by it.
    width: token dimension.
    depth: number of blocks.
    num_heads: attention heads.
    mlp_dim: MLP inner width.
    dropout: attention and residual dropout rate.
  """

  num_classes: int = 10
  patch_size: int = 4
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 512
  dropout: float = 0.0

  def __post_init__(self):
    _check_heads(self.width, self.num_heads, "width", "num_heads")
    _check_dropout(self.dropout)
    for name in ("patch_size", "depth", "mlp_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: [B, H, W, C] images with H and W divisible by `patch_size`.
      train: enables dropout (pass `rngs={'dropout': key}` when dropout > 0).

    Returns:
      [B, num_classes] logits.
    """
    if x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
      raise ValueError(
          f"image size {x.shape[1]}x{x.shape[2]} is not divisible by "
          f"patch_size={self.patch_size}; pass a patch size that divides it")
    x = PatchEmbed(self.patch_size, self.width, name="embed")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for name in layers.indexed_names("h", self.depth, min_width=2):
      x = Block(self.num_heads, False, self.mlp_dim, "gelu", self.dropout, name=name)(x, train)
    return Head(self.num_classes, pool=True, name="head")(x)


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> linear projection (a strided conv) + learned positions.

  Attributes:
    patch_size: square patch side.
    width: token dimension.
  """

  patch_size: int
  width: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, (H / p) * (W / p), width]."""
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="patch")(x)
    x = x.reshape(x.shape[0], -1, self.width)
    pos = self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
    return x + pos


class GPT(nn.Module):
  """Character-level GPT (nanoGPT-shaped): token + position embeddings, pre-LN causal
  blocks with a 4x MLP, final LayerNorm, linear head.

  Defaults are nanoGPT's small CPU configuration with nanoGPT's choices (biases
  everywhere, head tied to the token embedding, GELU). The `tinygpt` preset switches to
  the seed paper's model (see the module docstring).

  Attributes:
    vocab_size: tokens (65 characters for Tiny Shakespeare).
    block_size: maximum context length.
    n_layer: blocks.
    n_head: attention heads.
    n_embd: channels.
    dropout: embedding, attention and residual dropout rate.
    bias: biases in LayerNorms and Dense layers (nanoGPT's `bias`).
    qkv_bias: bias of the fused q/k/v projection; None means `bias`.
    tie_embeddings: reuse the token embedding as the output projection.
    activation: MLP nonlinearity, "gelu" or "relu".
  """

  vocab_size: int = 65
  block_size: int = 64
  n_layer: int = 4
  n_head: int = 4
  n_embd: int = 128
  dropout: float = 0.0
  bias: bool = True
  qkv_bias: bool | None = None
  tie_embeddings: bool = True
  activation: str = "gelu"

  # Read by `cost.report` to build a dummy input: GPT consumes token ids, not floats.
  input_dtype = jnp.int32

  def __post_init__(self):
    _check_heads(self.n_embd, self.n_head, "n_embd", "n_head")
    _check_dropout(self.dropout)
    for name in ("vocab_size", "block_size", "n_layer"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.activation not in ACTIVATIONS:
      raise ValueError(
          f"activation={self.activation!r} is unknown; pass one of {sorted(ACTIVATIONS)}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes next-token logits.

    Args:
      x: [B, T] int token ids, T <= block_size.
      train: enables dropout (pass `rngs={'dropout': key}` when dropout > 0).

    Returns:
      [B, T, vocab_size] logits.
    """
    length = x.shape[1]
    if length > self.block_size:
      raise ValueError(
          f"sequence length {length} exceeds block_size={self.block_size}; crop the input "
          "or build the model with a larger block_size")
    init = nn.initializers.normal(0.02)
    # nanoGPT's GPT-2 scheme: residual projections shrink with depth so the residual
    # stream's variance does not grow with the number of blocks.
    out_init = nn.initializers.normal(0.02 / math.sqrt(2 * self.n_layer))
    # Positions are looked up first so that parameters are first used in flatten order.
    pos = nn.Embed(self.block_size, self.n_embd, embedding_init=init,
                   name="embed_pos")(jnp.arange(length))
    tok_embed = nn.Embed(self.vocab_size, self.n_embd, embedding_init=init, name="embed_tok")
    h = tok_embed(x) + pos
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    qkv_bias = self.bias if self.qkv_bias is None else self.qkv_bias
    for name in layers.indexed_names("h", self.n_layer, min_width=2):
      h = Block(self.n_head, True, 4 * self.n_embd, self.activation, self.dropout,
                self.bias, qkv_bias, init, out_init, name=name)(h, train)
    return Head(self.vocab_size, use_bias=self.bias, out_bias=self.bias,
                tied_embed=tok_embed if self.tie_embeddings else None, kernel_init=init,
                name="head")(h)
