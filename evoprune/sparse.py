"""Sparse-format inference: a model's dense layers as BCOO matrices (`jax.experimental.sparse`).

    kernels = sparse.bcoo_kernels(params, masks)            # {"Dense_0": BCOO, ...}
    masked = {"params": ep.masks.apply(params, masks)}      # convolutions stay dense
    logits = jax.jit(sparse.apply, static_argnums=0)(model, masked, kernels, x)

Every `nn.Dense` whose kernel is in `kernels` computes `x @ W` as a sparse-dense product
(`bcoo_dot_general`) on the stored nonzeros only, and adds its bias; every other layer runs
as usual (convolutions stay dense: jax has no sparse convolution). The swap is done by
intercepting the Dense modules' calls while the model is traced, so it works for any linen
model, under `jax.jit`, with the unchanged params tree.

This is a measurement, not a promise of speed: on XLA:CPU a BCOO product is a gather,
multiply and scatter-add over the nonzeros, which loses to a dense matmul unless the layer
is very sparse (about 99% for a 784x300 layer at batch 256; see
`benchmarks/sparse_eval.py`). Structured surgery (`evoprune.surgery.shrink`) is the way to
real speed on dense hardware. Kept in its own module because it is a storage format for
unstructured sparsity, unrelated to surgery's change of the network's shape.
"""

from typing import Any

import flax.linen as nn
import jax
from jax.experimental import sparse as jsparse
import jax.numpy as jnp
import numpy as np

from evoprune import masks as masks_lib
from evoprune.types import Masks, Params


def bcoo_kernels(params: Params, masks: Masks | None = None) -> dict[str, jsparse.BCOO]:
  """BCOO copies of the (masked) 2-D `kernel` leaves, keyed by their module path.

  Args:
    params: `variables['params']`.
    masks: like params (bool leaves or None); None takes every 2-D kernel as it is.
      With masks, only leaves with a mask are converted.

  Returns:
    {"Dense_0": BCOO [in, out], ...}: "/"-joined module paths (the kernel's path without
    its last key); each holds exactly the nonzeros of `params * mask`.

  Raises:
    ValueError: masks that do not fit params.
  """
  if masks is not None:
    masks_lib.check(params, masks)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  mask_leaves = (jax.tree.leaves(masks, is_leaf=lambda x: x is None) if masks is not None
                 else [True] * len(flat))
  out = {}
  for (path, leaf), mask in zip(flat, mask_leaves):
    keys = masks_lib.path_keys(path)
    if mask is None or keys[-1] != "kernel" or np.ndim(leaf) != 2:
      continue
    dense = np.asarray(leaf) if mask is True else np.where(np.asarray(mask), leaf, 0)
    # Build from numpy so that nse (a static size) is exactly the number of nonzeros.
    out["/".join(keys[:-1])] = jsparse.BCOO.fromdense(
        dense, nse=int(np.count_nonzero(dense)))
  return out


def apply(model: nn.Module, variables: dict[str, Any], kernels: dict[str, jsparse.BCOO],
          x: jax.Array, **kwargs: Any) -> Any:
  """Runs `model.apply(variables, x, train=False)` with BCOO products in the Dense layers.

  Args:
    model: any flax.linen Module built from `nn.Dense` (and other) layers.
    variables: its variables (mask them for the layers that stay dense, e.g. with
      `ep.masks.apply`); the kernels of layers in `kernels` are not read.
    kernels: from `bcoo_kernels`.
    x: the model's input, e.g. [B, H, W, C].
    **kwargs: passed to `model.apply` (default `train=False`).

  Returns:
    What `model.apply` returns.
  """
  kwargs.setdefault("train", False)

  def interceptor(next_fun, args, call_kwargs, context):
    module = context.module
    name = "/".join(module.path)
    if (context.method_name != "__call__" or not isinstance(module, nn.Dense)
        or name not in kernels):
      return next_fun(*args, **call_kwargs)
    inputs = args[0]
    flat = inputs.reshape(-1, inputs.shape[-1])
    y = jsparse.bcoo_dot_general(flat, kernels[name],
                                 dimension_numbers=(([1], [0]), ([], [])))
    y = y.reshape(*inputs.shape[:-1], y.shape[-1])
    if module.use_bias:
      y = y + module.get_variable("params", "bias")
    return y.astype(jnp.result_type(inputs.dtype, y.dtype))

  with nn.intercept_methods(interceptor):
    return model.apply(variables, x, **kwargs)
