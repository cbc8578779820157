"""Which test modules compile without most of XLA's optimisations (one rule for the suite)."""

import pathlib

import jax
import pytest

# Modules dominated by compiling whole programs: end-to-end runs of the pipeline and the
# studies, the search (a population program per test), surgery of every zoo model. Here
# unoptimised XLA compiles several times faster, and nothing checked depends on the
# optimisations; every other module compiles as users do (numerics with XLA's defaults).
# The setting is made per module, so no module inherits it from the one before.
UNOPTIMIZED_MODULES = frozenset({
    "benchmarks_search_test",
    "compression_study_test",
    "experiments_parallel_test",
    "experiments_test",
    "search_test",
    "surgery_test",
})


@pytest.fixture(autouse=True, scope="module")
def xla_optimizations(request):
  """Sets `jax_disable_most_optimizations` for the module's tests, restores it after."""
  unoptimized = pathlib.Path(str(request.module.__file__)).stem in UNOPTIMIZED_MODULES
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", unoptimized)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
