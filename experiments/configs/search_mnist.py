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

Expected runtime: about 15 minutes on a 2-core CPU (3 seeds: dense training 3 x 10
epochs, 9 searches of 25 generations x 32 candidates, 36 two-epoch fine-tunes).
Expected result: dense test accuracy about 0.98. One-shot, `alloc:evolutionary` has the best
mean validation accuracy at every target (at 0.95 and 0.98 at least that of the best of
uniform/global/ERK, by construction of the elitist, seeded search and measured well above);
uniform collapses at 0.98 while global/ERK/evolutionary keep most of the accuracy; after
fine-tuning the allocations move closer together.

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
