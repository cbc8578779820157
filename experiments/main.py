r"""Runs an evoprune experiment: train -> prune -> fine-tune -> evaluate -> report.

  python -m experiments.main --config=experiments/configs/default.py --workdir=runs/default

Every hyperparameter lives in the config (override any field with --config.x.y=value). The
workdir defaults to ./runs/<config>-<timestamp>; a run restarted with the same workdir resumes.

Scale-out (`config.parallel`, README "Scale-out"): `cpu_devices` splits the host CPU into
devices and the multi-host fields join a `jax.distributed` job; both take effect here,
before anything touches JAX. Two processes on one machine:

  python -m experiments.main --config=experiments/configs/default.py --workdir=runs/mh \
      --config.parallel.data_parallel=True --config.parallel.num_processes=2 \
      --config.parallel.coordinator_address=localhost:1234 --config.parallel.process_id=0
  (and the same with --config.parallel.process_id=1 in a second shell)
"""

import importlib
import pathlib
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from evoprune import parallel
from experiments import checks
from experiments import report

# config.study -> the module whose run(config, workdir) carries it out.
STUDIES = {
    "prune": "experiments.pipeline",
    "allocation": "experiments.allocation_study",
    "compression": "experiments.compression_study",
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (default: ./runs/<config>-<timestamp>).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=experiments/configs/default.py")
  if not flags.FLAGS["verbosity"].present:  # orbax is chatty at INFO; tqdm shows progress
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  # The device count and the process group are fixed when JAX starts its backends, so
  # they come first (checked first, so a bad value fails before the job is joined).
  checks.validate_parallel(config)
  if config.parallel.cpu_devices:
    parallel.use_cpu_devices(config.parallel.cpu_devices)
  if config.parallel.coordinator_address:
    parallel.initialize(config.parallel.coordinator_address, config.parallel.num_processes,
                        config.parallel.process_id)
  workdir = _WORKDIR.value
  if not workdir:
    config_name = pathlib.Path(flags.FLAGS["config"].config_filename).stem
    workdir = f"runs/{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
  logging.info("JAX devices: %s; workdir: %s", jax.devices(), workdir)
  study = config.study
  if study not in STUDIES:
    raise ValueError(f"config.study={study!r} is unknown; use one of {sorted(STUDIES)}.")
  summary = importlib.import_module(STUDIES[study]).run(config, workdir)
  if parallel.is_writer():
    print(report.format_table(summary))
    print(f"\nResults written to {workdir}/ (summary.json, report.md, metrics.jsonl, plots).")


if __name__ == "__main__":
  jax.config.parse_flags_with_absl()
  app.run(main)
