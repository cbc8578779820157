r"""The main job: the digits MLP trained dense, pruned to 90% by evolution of weights, fine-tuned.

Every field any experiment reads is declared here; other configs start from this one and
override fields. Runs offline on a fresh machine (the `digits` data ships with scikit-learn).

Launch:
  python -m experiments.main --config=experiments/configs/default.py --workdir=runs/default

Expected runtime: about a minute on a 2-core CPU, first compile included.
Expected result (3 seeds): dense test accuracy about 0.97; `evolution` at 0.90 target
sparsity reaches 0.90 achieved sparsity with test accuracy about 0.95 after fine-tuning.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The default configuration."""
  config = ml_collections.ConfigDict()
  # prune: experiments/pipeline.py (methods x targets); allocation: experiments/
  # allocation_study.py (per-layer allocations incl. the evolutionary search); compression:
  # experiments/compression_study.py (pruning x PTQ/QAT/weight sharing, thesis_cifar10.py).
  config.study = "prune"
  config.seeds = (0, 1, 2)

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"  # mnist | fashion_mnist | cifar10 | digits | tfds:NAME
  config.data.dir = ""  # folder of the official raw files (or TFDS data_dir); '' = none
  config.data.val_size = 0.1  # carved from the training split: a count or a fraction
  config.data.split_seed = 0  # fixes the validation split across training seeds

  config.model = ml_collections.ConfigDict()
  config.model.name = "mlp"
  config.model.kwargs = ml_collections.ConfigDict({"widths": (128, 64)})

  config.train = ml_collections.ConfigDict()
  config.train.epochs = 30
  config.train.batch_size = 64
  config.train.optimizer = "sgd"  # sgd | adam | adamw
  config.train.learning_rate = 0.05
  config.train.momentum = 0.9
  config.train.weight_decay = 0.0
  config.train.lr_schedule = "cosine"  # constant | cosine | step | linear
  config.train.warmup_epochs = 0
  config.train.label_smoothing = 0.0
  config.train.augment = False  # CIFAR random crop + flip, inside the compiled step
  config.train.checkpoint_every_epochs = 5
  config.train.checkpoint_every_steps = 0  # > 0: checkpoint every N steps instead
  config.train.steps_per_call = 0  # steps per compiled call; 0 = one epoch
  config.train.eval_every_epochs = 5
  # Train the dense baseline's seeds as one vmapped program (training.fit_seeds): vmap |
  # sequential | auto (= ep.parallel.seed_strategy: vmap for small convolution-free models).
  config.train.seeds_in_one_program = "auto"

  config.prune = ml_collections.ConfigDict()
  # One result row per (method, target). Methods: see experiments/checks.py METHODS.
  config.prune.methods = ("magnitude", "evolution")
  # A float or a tuple of floats (a sweep).
  config.prune.target_sparsity = ml_collections.FieldReference((0.9,), field_type=object)
  # 'after': prune the trained dense model once, then fine-tune (`config.finetune`).
  # 'during': train from scratch while `schedule` raises the sparsity.
  config.prune.when = "after"
  config.prune.schedule = "polynomial_decay"  # for when='during': constant | polynomial_decay
  config.prune.begin_epoch = 0.0  # for when='during': schedule window, in epochs
  config.prune.end_epoch = 0.75  # as a fraction of train.epochs when <= 1
  config.prune.frequency = 10  # steps between mask updates (when='during')
  config.prune.allocation = "uniform"  # uniform | global | erk
  config.prune.granularity = "unstructured"  # unstructured | neuron | filter | n:m e.g. '2:4'
  # Evolution of weights: the running average of the weights kept during training.
  config.prune.average = "linear"  # linear | sqrt_window | ema
  config.prune.average_window = 50  # snapshots, for sqrt_window
  config.prune.average_decay = 0.99  # for ema
  config.prune.average_every = 0  # snapshot cadence in steps; 0 = once per epoch (the paper)
  # The seed paper's rules.
  # Bezier smart pruning: control values (a, b, c, d), a the largest (near-zero bins cut
  # most); its strength u is searched so that the turns reach the target sparsity.
  config.prune.bezier = ml_collections.ConfigDict(
      {"control": (1.0, 0.8, 0.2, 0.0), "mode": "scale", "turns": 3})

  config.finetune = ml_collections.ConfigDict()
  config.finetune.epochs = 10
  config.finetune.optimizer = "sgd"
  config.finetune.learning_rate = 0.01
  config.finetune.lr_schedule = "cosine"

  # The evolutionary search over per-layer sparsity (ep.search; allocation='evolutionary').
  config.search = ml_collections.ConfigDict()
  config.search.strategy = "ga"  # a name of ep.search.STRATEGIES: ga | cma_es
  config.search.population_size = 32
  config.search.generations = 25
  config.search.metric = "accuracy_loss"  # accuracy | loss | accuracy_loss
  config.search.fitness_examples = 5000  # the first N validation examples (never test)
  config.search.evaluation = "auto"  # auto | vmap | map | loop
  config.search.lower = 0.0  # per-layer sparsity bounds
  config.search.upper = 0.99
  config.search.compare = ("uniform", "global", "erk", "evolutionary")
  config.search.seed_allocations = ("uniform", "global", "erk")
  # With when='during': search when the schedule begins (on the weights trained so far; at
  # begin_epoch=0 these are the initial weights) and again every N epochs while masks
  # change, warm-started from the last answer; 0 = search once.
  config.search.research_every_epochs = 0

  # The compression study (study='compression', experiments/compression_study.py).
  config.quant = ml_collections.ConfigDict()
  config.quant.weight_bits = 8
  config.quant.act_bits = 8  # 0 = weight-only
  config.quant.calibration = "minmax"  # minmax | percentile
  config.quant.percentile = 99.99
  config.quant.calibration_examples = 1000  # the first N training images
  config.quant.ptq_weight_bits = (8, 4)  # one PTQ row each: 'ptq', 'ptq_w4'
  config.quant.qat_epochs = 1
  config.quant.qat_learning_rate = 1e-4

  # Knowledge distillation: fine-tune pruned/quantized students against the dense model.
  config.distill = ml_collections.ConfigDict()
  config.distill.enabled = False  # prune study: fine-tune against the dense model too
  config.distill.temperature = 4.0
  config.distill.alpha = 0.9

  # Deep Compression weight sharing: per-layer k-means codebooks, fine-tuned.
  config.share = ml_collections.ConfigDict()
  config.share.bits = 4  # codebook of 2**bits entries (0 = no weight-sharing row)
  config.share.iterations = 30
  config.share.epochs = 1
  config.share.learning_rate = 1e-4

  config.compression = ml_collections.ConfigDict()
  config.compression.schedules = ("constant", "polynomial_decay")
  config.compression.combine = "polynomial_decay@0.8"  # '' = no combination rows
  config.compression.train_examples = 0  # 0 = all
  config.compression.eval_examples = 0  # val and test; 0 = all
  config.compression.latency_batch = 256
  config.compression.latency_rounds = 15

  # Scale-out (evoprune.parallel); experiments/main.py applies cpu_devices and the
  # multi-host fields before anything touches JAX.
  config.parallel = ml_collections.ConfigDict()
  config.parallel.data_parallel = False  # fit over ep.parallel.data_mesh() (all devices)
  config.parallel.cpu_devices = 0  # > 0: split the host CPU into this many devices
  config.parallel.sharding_rule = "replicate"  # replicate | fsdp (data_parallel only)
  config.parallel.coordinator_address = ""  # 'host:port' of process 0; '' = one process
  config.parallel.num_processes = 0  # with coordinator_address: the job's process count
  config.parallel.process_id = 0  # this process's index in [0, num_processes)

  config.eval_batch_size = 1000
  config.progress = True  # tqdm bars
  return config
