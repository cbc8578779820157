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

Expected runtime: 6.5 minutes measured on a 2-core CPU shared with other jobs (load ~8); 3
seeds: dense training 3 x 10 epochs (one vmapped program, `config.train.
seeds_in_one_program='auto'`), 9 searches of 25 generations x 32 candidates (the first
dense layer computed once per search, see `evoprune.search.fitness`), 36 two-epoch
fine-tunes.
Expected result (measured, mean over seeds 0-2, validation / test accuracy):
  dense                      0.980 / 0.983
  one-shot @0.90  uniform 0.719 / 0.727, global 0.954 / 0.961, ERK 0.954 / 0.961,
                  evolutionary 0.959 / 0.963
  one-shot @0.95  uniform 0.477 / 0.493, global 0.886 / 0.896, ERK 0.875 / 0.886,
                  evolutionary 0.903 / 0.912
  one-shot @0.98  uniform 0.241 / 0.246, global 0.550 / 0.561, ERK 0.524 / 0.533,
                  evolutionary 0.611 / 0.618
  +2 epochs fine-tuning (val at 0.90 / 0.95 / 0.98): uniform 0.967 / 0.952 / 0.792;
  global 0.975 / 0.966 / 0.939; ERK 0.974 / 0.968 / 0.947; evolutionary 0.975 / 0.967 /
  0.945 (test: ERK and evolutionary within 0.001 of each other at every target).
The search's fitness is computed on the validation split, so the evolutionary validation
numbers are selected on it; the test column is the unbiased comparison, and there too the
evolutionary allocation beats the best heuristic one-shot at every target (+0.2, +1.6 and
+5.7 points). It prunes the 784x300 input layer hardest and keeps more of the small
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
