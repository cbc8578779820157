r"""LeNet-300-100 on MNIST from the official raw files.

Launch:
  python -m experiments.main --config=experiments/configs/mnist_mlp.py \
      --config.data.dir=../shared/data/mnist --workdir=runs/mnist_mlp

Expected runtime: about 3 minutes on a 2-core CPU (3 seeds).
Expected result (measured): dense test accuracy 0.9835; magnitude and evolution of weights
at 90% sparsity 0.975 after 3 fine-tuning epochs.
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.seeds = (0, 1, 2)
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
