"""Mask pytrees: exact top-k at a (traced) sparsity, structured groups, N:M, apply, summaries.

A mask tree has exactly the structure of the params it describes: bool leaves (True = keep)
for prunable leaves and `None` for the rest. Masks that prune whole units may also cover the
units' biases and BatchNorm affine parameters (`cover_dependents`), so that a pruned unit
outputs exactly zero. Scores trees look the same with float leaves
(higher = more important).

Paths. Every function that names a leaf uses `path_str`: the keys of the leaf's pytree path
joined by '/', e.g. 'Dense_0/kernel' for `params['Dense_0']['kernel']` and 'layers/1/kernel'
for a list entry. A trailing `.value` attribute (the payload of an `nnx.Variable`) is dropped,
so an `nnx.State` names its leaves like the equivalent linen dict.

Counts are exact. A leaf of `n` entries at sparsity `s` has exactly `round(s * n)` False
entries, with the product evaluated in float32 and rounded half to even (`jnp.round`), the same
way for Python floats and traced values, so a search and a pruner that agree on `s` agree on
the mask. Ties are broken deterministically: among equal scores the lower flat (row-major)
index is pruned first. This is the order a stable sort gives, so the result does not depend on
the backend's sort or on `vmap`, and it is the rule the argsort reference in the tests uses.
NaN scores rank below every number (they are pruned first); -0.0 equals +0.0.

Speed. Masks are recomputed inside the train step, so `topk` does not sort. Each float32 score
is mapped to an order-preserving uint32 key; the k-th smallest key is found by a 32-step
bitwise bisection whose step is a single counting pass, and ties at the threshold are resolved
by locating the flat index of the last tie to prune (row sums over a [rows, 1024] layout, then
one cumulative sum over a single row). Measured on LeNet-300-100 (266k weights, 2-core CPU,
jit, median of 30, several runs on a shared machine): 2.2-3.6 ms per full mask update, i.e.
1.5-1.9 plain SGD train steps at batch 128, versus 76-155 ms (64-98 steps) for the
stable-argsort update `argsort_topk`.

Modules: `trees` (mask trees and their bookkeeping: paths, filters, `init`, `apply`,
`check`, `summary`), `selection` (unstructured selection: the sort-free `topk`,
`global_topk` and their `argsort_topk` reference) and `granularities` (structured
granularities: unit norms, neurons/filters, blocks, N:M, unit owners and dependents).
"""

from evoprune.masks.granularities import GRANULARITIES
from evoprune.masks.granularities import NORMS
from evoprune.masks.granularities import Owner
from evoprune.masks.granularities import block_norms
from evoprune.masks.granularities import blocks
from evoprune.masks.granularities import cover_dependents
from evoprune.masks.granularities import nm
from evoprune.masks.granularities import structured
from evoprune.masks.granularities import unit_norms
from evoprune.masks.granularities import unit_owner
from evoprune.masks.selection import argsort_topk
from evoprune.masks.selection import global_topk
from evoprune.masks.selection import global_topk_count
from evoprune.masks.selection import num_pruned
from evoprune.masks.selection import topk
from evoprune.masks.trees import Filter
from evoprune.masks.trees import apply
from evoprune.masks.trees import check
from evoprune.masks.trees import default_filter
from evoprune.masks.trees import init
from evoprune.masks.trees import path_keys
from evoprune.masks.trees import path_str
from evoprune.masks.trees import paths
from evoprune.masks.trees import summary

__all__ = [
    "Filter", "GRANULARITIES", "NORMS", "Owner", "apply", "argsort_topk", "block_norms",
    "blocks", "check", "cover_dependents", "default_filter", "global_topk",
    "global_topk_count", "init", "nm", "num_pruned", "path_keys", "path_str", "paths",
    "structured", "summary", "topk", "unit_norms", "unit_owner",
]
