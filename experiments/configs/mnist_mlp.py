r"""LeNet-300-100 on MNIST from the official raw files.

Launch:
  python -m experiments.main --config=experiments/configs/mnist_mlp.py \
      --config.data.dir=../shared/data/mnist --workdir=runs/mnist_mlp

Expected runtime: about 5 minutes on a 2-core CPU (one seed).
Expected result: dense test accuracy >= 0.980; evolution of weights at 90% sparsity within
about 0.3 points of dense after fine-tuning.
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.seeds = (0,)
  config.data.name = "mnist"
  config.data.val_size = 5000
  config.model.name = "lenet300_100"
  config.model.kwargs = {}
  config.train.epochs = 15
  config.train.batch_size = 128
  config.train.learning_rate = 0.05
  config.train.checkpoint_every_epochs = 1
  config.train.eval_every_epochs = 1
  config.finetune.epochs = 3
  return config
