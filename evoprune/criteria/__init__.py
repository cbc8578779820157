"""Mask rules beyond plain top-k: the seed paper's rules and the corrected variant.

The seed paper (Islam & Belhaouari, "Smart Pruning of Deep Neural Networks Using Curve
Fitting and Evolution of Weights", and its extended version) prunes every layer with a
threshold `r * std(...)` of that layer, one multiplier r shared by all layers, or with a
Bezier-curve-shaped random pruning per neuron. The functions named `*_paper` and
`std_threshold` reproduce what the authors' code computes (so their numbers can be
reproduced); `evolution` is the corrected rule a user should prefer: rank by the running
average and hit the target sparsity exactly with top-k.

All rules take trees (a single array is a one-leaf tree) and return masks of the same
structure: bool leaves, True = keep, `None` leaves passed through. They are per layer:
each leaf's statistics use that leaf only. Every rule is jit-safe; `search_r` is a
one-shot host-side search whose grid evaluation is one compiled, vmapped call.

Modules: `threshold` (the std-threshold rules, `evolution`, `compression` and `search_r`)
and `smart` (Bezier smart pruning); `get` looks a rule up by name in `CRITERIA`.
"""

from typing import Any, Callable

from evoprune.criteria.smart import BEZIER_MODES
from evoprune.criteria.smart import bezier
from evoprune.criteria.smart import bezier_fractions
from evoprune.criteria.smart import bezier_num_bins
from evoprune.criteria.smart import bezier_to_target
from evoprune.criteria.threshold import PAPER_R_GRID
from evoprune.criteria.threshold import RSearchResult
from evoprune.criteria.threshold import SCOPES
from evoprune.criteria.threshold import compression
from evoprune.criteria.threshold import evolution
from evoprune.criteria.threshold import evolution_paper
from evoprune.criteria.threshold import evolution_paper_tinygpt
from evoprune.criteria.threshold import search_r
from evoprune.criteria.threshold import std_threshold

__all__ = [
    "BEZIER_MODES", "CRITERIA", "PAPER_R_GRID", "RSearchResult", "SCOPES", "bezier",
    "bezier_fractions", "bezier_num_bins", "bezier_to_target", "compression", "evolution",
    "evolution_paper", "evolution_paper_tinygpt", "get", "search_r", "std_threshold",
]

CRITERIA: dict[str, Callable[..., Any]] = {
    "std_threshold": std_threshold,
    "evolution_paper": evolution_paper,
    "evolution_paper_tinygpt": evolution_paper_tinygpt,
    "bezier": bezier,
    "evolution": evolution,
}


def get(name: str) -> Callable[..., Any]:
  """Returns the criterion registered as `name` in `CRITERIA`.

  Raises:
    ValueError: if `name` is not registered; the message lists the valid names.
  """
  if name not in CRITERIA:
    raise ValueError(f"unknown criterion {name!r}; pass one of {sorted(CRITERIA)}")
  return CRITERIA[name]
