r"""Allocation study: LeNet-300-100 on MNIST, magnitude pruning under four per-layer allocations.

The dense network is trained once per seed, then pruned one-shot at global sparsity 0.90,
0.95 and 0.98 by magnitude with the per-layer sparsities of `uniform`, `global` (one global
threshold), `erk` (Erdos-Renyi-Kernel) and `evolutionary` (a GA over per-layer sparsity,
fitness = validation accuracy with the loss as tie-break on the 5,000-example validation
split, seeded with the other three); rows `alloc:<name>`. The same masks are then fine-tuned
for two epochs (`alloc:<name>+ft`). Mean and std over 3 seeds; the test split is only
reported. See experiments/allocation_study.py.

Launch:
  python -m experiments.main --config=experiments/configs/search_mnist.py \
      --config.data.dir=../shared/data/mnist --workdir=runs/search_mnist

Expected runtime: 13 minutes measured on a 2-core CPU shared with other jobs (load ~7); 3
seeds: dense training 3 x 10 epochs, 9 searches of 25 generations x 32 candidates (about
50 s each), 36 two-epoch fine-tunes.
Expected result (measured, mean over seeds 0-2, validation / test accuracy):
  dense                      0.980 / 0.983
  one-shot @0.90  uniform 0.729 / 0.739, global 0.955 / 0.960, ERK 0.956 / 0.959,
                  evolutionary 0.960 / 0.962
  one-shot @0.95  uniform 0.520 / 0.528, global 0.886 / 0.896, ERK 0.877 / 0.886,
                  evolutionary 0.907 / 0.913
  one-shot @0.98  uniform 0.266 / 0.273, global 0.538 / 0.543, ERK 0.548 / 0.558,
                  evolutionary 0.641 / 0.643
  +2 epochs fine-tuning (val at 0.90 / 0.95 / 0.98): uniform 0.967 / 0.953 / 0.805;
  global 0.975 / 0.966 / 0.939; ERK 0.974 / 0.968 / 0.947; evolutionary 0.975 / 0.968 /
  0.947 (test: ERK and evolutionary within 0.001 of each other at every target).
The search's fitness is computed on the validation split, so the evolutionary validation
numbers are selected on it; the test column is the unbiased comparison, and there too the
evolutionary allocation beats the best heuristic one-shot at every target (+0.2, +1.7 and
+8.5 points). It prunes the 784x300 input layer hardest and keeps more of the small
layers; after fine-tuning it ties ERK.

The search settings are default.py's `config.search` (override any, e.g.
`--config.search.strategy=cma_es --config.search.generations=40`).
"""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.study = "allocation"  # experiments/main.py dispatches to allocation_study.run
  config.seeds = (0, 1, 2)
  config.data.name = "mnist"
  config.data.val_size = 5000
  config.model.name = "lenet300_100"
  config.model.kwargs = ml_collections.ConfigDict()
  config.train.epochs = 10
  config.train.batch_size = 128
  config.train.learning_rate = 0.05
  config.train.checkpoint_every_epochs = 5
  config.train.eval_every_epochs = 5
  config.prune.target_sparsity = (0.9, 0.95, 0.98)
  config.finetune.epochs = 2
  config.finetune.learning_rate = 0.01

  # config.search keeps default.py's GA: population 32, 25 generations, fitness =
  # accuracy with the loss as tie-break on the 5,000 validation examples, bounds [0, 0.99],
  # seeded with uniform, global and ERK.
  return config
