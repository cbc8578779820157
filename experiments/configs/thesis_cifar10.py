r"""The thesis seed: the TensorFlow-tutorial CNN on CIFAR-10, pruned, quantized, both.

Rows (see experiments/compression_study.py): the dense baseline; magnitude pruning while
fine-tuning the trained baseline under TF-MOT's constant sparsity and polynomial decay at
0.5 and 0.8; PTQ (int8 weights per channel, int8 activations per tensor, min-max on 1,000
training images; and 4-bit weights); QAT (1 epoch of fake-quant fine-tuning); QAT then PTQ
(int8); and the combinations with polynomial decay at 0.8 (+PTQ, +QAT+PTQ, and 4-bit
k-means weight sharing with fine-tuned codebooks). Each row reports test accuracy (mean ±
std over seeds), the size of its file on disk and its latency relative to the dense model.

Launch:
  python -m experiments.main --config=experiments/configs/thesis_cifar10.py \
      --config.data.dir=../shared/data --workdir=runs/thesis_cifar10

Expected runtime: 61 minutes measured on a 2-core CPU shared with other jobs (load ~8; 2
seeds x [8 dense epochs + 4 x 3 pruning fine-tune epochs + 2 QAT epochs + 1 codebook
epoch] of 351 steps of 128 images). Measured result: README, "Pruning and quantization of
the thesis CNN".
Expected result: dense test accuracy about 0.71; 0.5 sparsity at the baseline, 0.8 about
8 points below it after 3 fine-tuning epochs (the thesis fine-tuned longer); PTQ/QAT within
a point of the baseline; QAT+PTQ at 0.26x the dense file
(int8) and polynomial decay 0.8 + QAT + PTQ under 0.10x. Latency does NOT halve here:
XLA:CPU's int8 convolutions are slower than its fused float32 ones (see
evoprune/quantization.py); the thesis measured TFLite int8 kernels.

  --config=experiments/configs/thesis_cifar10.py:smoke runs every kind of row (polynomial
  decay at 0.8 only) on 512 training and 256 evaluation images for one epoch per stage (the
  test suite's end-to-end check).

The quantization, distillation, weight-sharing and compression fields are declared (with
the values this study uses) in default.py.
"""

import ml_collections

from experiments.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The full study, or with arg 'smoke' a tiny one for the test suite."""
  config = default.get_config()
  config.study = "compression"  # experiments/main.py dispatches to compression_study.run
  config.seeds = (0, 1)
  config.data.name = "cifar10"
  config.data.val_size = 5000
  config.model.name = "thesis_cnn"
  config.model.kwargs = ml_collections.ConfigDict()

  config.train.epochs = 8
  config.train.batch_size = 128
  config.train.optimizer = "adam"  # the TensorFlow tutorial's optimizer
  config.train.learning_rate = 1e-3
  config.train.lr_schedule = "cosine"
  config.train.checkpoint_every_epochs = 1
  config.train.eval_every_epochs = 2

  config.prune.methods = ("magnitude",)
  config.prune.target_sparsity = (0.5, 0.8)
  config.prune.begin_epoch = 0.0  # schedule window, as a fraction of the fine-tuning epochs
  config.prune.end_epoch = 0.5  # polynomial decay: final sparsity halfway, then recover
  config.prune.frequency = 100  # TF-MOT's default mask-update frequency (steps)

  config.finetune.epochs = 3  # pruning fine-tunes
  config.finetune.optimizer = "adam"
  config.finetune.learning_rate = 5e-4
  config.finetune.lr_schedule = "cosine"

  if arg == "smoke":
    config.seeds = (0,)
    config.train.epochs = 1
    config.train.batch_size = 64
    config.finetune.epochs = 1
    config.prune.target_sparsity = (0.8,)
    config.compression.schedules = ("polynomial_decay",)
    config.prune.frequency = 2
    config.quant.calibration_examples = 128
    config.share.iterations = 5
    config.compression.train_examples = 512
    config.compression.eval_examples = 256
    config.compression.latency_batch = 32
    config.compression.latency_rounds = 1
    config.progress = False
  elif arg:
    raise ValueError(f"thesis_cifar10 config arg {arg!r} is unknown; use ':smoke' or none.")
  return config
