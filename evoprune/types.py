"""Type aliases shared across evoprune.

Every core object is a pytree. `Masks` and `Scores` have exactly the structure of the
`Params` they describe, with `None` for leaves that are not prunable. A *population* is
the same tree with a leading axis `P` on every leaf.
"""

from typing import Any

import jax

Params = Any  # pytree of float arrays (linen `variables['params']`, an nnx.State, a dict)
Masks = Any  # like Params: bool leaves, None where a leaf is not prunable
Scores = Any  # like Params: float leaves (higher = more important), None where not prunable
PRNGKey = jax.Array
# A sparsity: a float, a tree like Scores with one float per prunable leaf, or a 1-D array
# with one value per prunable leaf in `jax.tree` flatten order. Traced values are allowed.
Sparsity = Any
