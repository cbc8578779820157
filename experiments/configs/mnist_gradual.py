r"""LeNet-300-100 on MNIST pruned *during* training to 95% by evolution of weights.

The Pruner raises the sparsity along TF-MOT's polynomial decay (0 -> 0.95 between 10% and
60% of training, masks updated every 100 steps inside the compiled step), ranking weights
by |running average of the weights| and hitting each layer's target exactly with top-k.
Magnitude pruning under the same schedule is the baseline.

Launch:
  python -m experiments.main --config=experiments/configs/mnist_gradual.py \
      --config.data.dir=../shared/data/mnist --workdir=runs/mnist_gradual

Expected runtime: about 4 minutes on a 2-core CPU (3 seeds).
Expected result: every layer at 0.95 sparsity; test accuracy >= 0.975 for evolution.
"""

from experiments.configs import mnist_mlp


def get_config():
  config = mnist_mlp.get_config()
  config.train.epochs = 20
  config.prune.when = "during"
  config.prune.methods = ("magnitude", "evolution")
  config.prune.target_sparsity = 0.95
  config.prune.schedule = "polynomial_decay"
  config.prune.begin_epoch = 0.1
  config.prune.end_epoch = 0.6
  config.prune.frequency = 100
  config.prune.average_every = 1  # a snapshot every step: the TinyGPT-style per-step average
  return config
