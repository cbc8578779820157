r"""The default job at tiny sizes, for the test suite (seconds, not minutes).

  python -m experiments.main --config=experiments/configs/test.py --workdir=/tmp/evoprune-test
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.seeds = (0, 1)
  config.model.kwargs.widths = (32,)
  config.train.epochs = 4
  config.train.checkpoint_every_epochs = 1
  config.train.eval_every_epochs = 2
  config.finetune.epochs = 2
  config.progress = False
  return config
