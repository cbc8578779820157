"""evoprune: evolutionary pruning and model compression for JAX/Flax.

Submodules are imported on first use (`ep.masks`, `ep.search`, ...), so `import evoprune`
stays cheap and a module's optional dependencies are only needed when it is used.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "allocation", "cost", "criteria", "data", "distillation", "importance", "masks",
    "models", "ops", "parallel", "pruner", "quantization", "schedules", "search", "sparse",
    "storage", "surgery", "training", "types", "weight_sharing",
)
# Public names that live in a submodule: name -> module.
_ATTRIBUTES = {"Pruner": "pruner"}

__all__ = [*_SUBMODULES, *_ATTRIBUTES]


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"evoprune.{name}")
  if name in _ATTRIBUTES:
    return getattr(importlib.import_module(f"evoprune.{_ATTRIBUTES[name]}"), name)
  raise AttributeError(f"module 'evoprune' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *__all__])
