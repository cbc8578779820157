"""Compression study: pruning, PTQ, QAT, their combination and weight sharing, made real.

For each seed the dense model is trained once; then, each from the trained dense model:
  - pruned rows `<schedule>@<target>`: fine-tuned while a TF-MOT schedule (constant sparsity
    or polynomial decay, by magnitude) raises the sparsity to the target;
  - `ptq` (and `ptq_w4`): post-training quantization, weights per channel, activations per
    tensor calibrated on training images, evaluated on the int8 path;
  - `qat`: quantization-aware fine-tuning (fake quantization, straight-through gradients),
    evaluated as the fake-quant model (its weights are still float32);
  - `qat+ptq`: the QAT model converted to int8 (bit-identical to its fake-quant outputs);
  - combinations on the pruned model `config.compression.combine` (e.g.
    polynomial_decay@0.8): `+ptq`, `+qat+ptq` (QAT with the pruning masks held fixed) and
    `+share<bits>` (k-means weight sharing with fine-tuned codebooks).
Every row's model is written with `evoprune.storage` (`models/seed<s>/<row>.npz`); `bytes`
reports that file (`model`) and, for the same weights, the fp32 dense, sparse (best of
bitmask/CSR), int8 and sparse+int8 encodings, all as written to disk. Latency is the row's
forward pass against the dense fp32 one, timed side by side (`cost.latency`). With
`config.distill.enabled`, fine-tuning stages learn from the dense model (Hinton et al.).

Results go to summary.json (the pipeline's schema plus `bytes`, `size_ratio`, `latency`),
report.md and compression.png. Finished rows are stored under results/ and skipped on a
restart; training stages resume from their checkpoints.
"""

import dataclasses
import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import evoprune as ep
from evoprune import distillation
from evoprune import quantization as quant
from evoprune import storage
from evoprune import training
from evoprune import weight_sharing
from experiments import checks
from experiments import pipeline
from experiments import report

SCHEDULES = ("constant", "polynomial_decay")


def _combine(config: ml_collections.ConfigDict) -> tuple[str, float] | None:
  if not config.compression.combine:
    return None
  schedule, _, target = config.compression.combine.partition("@")
  try:
    target = float(target)
  except ValueError:
    target = -1.0
  if schedule not in config.compression.schedules or target not in checks.targets(config):
    raise ValueError(f"config.compression.combine={config.compression.combine!r} must name a "
                     "pruned row, '<schedule>@<target>' with a schedule of "
                     f"config.compression.schedules and a target of config.prune."
                     "target_sparsity (e.g. 'polynomial_decay@0.8'), or be ''.")
  return schedule, target


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any training, on invalid study settings."""
  checks.targets(config)
  if not config.seeds:
    raise ValueError("config.seeds is empty; give at least one seed, e.g. (0, 1).")
  if config.parallel.data_parallel or config.parallel.num_processes > 1:
    # Its fits (the quantization-aware ones a step per call) run on one device in one process.
    raise ValueError("the compression study trains on one device; set "
                     "config.parallel.data_parallel=False and run a single process.")
  for schedule in config.compression.schedules:
    if schedule not in SCHEDULES:
      raise ValueError(f"config.compression.schedules contains {schedule!r}; use {SCHEDULES}.")
  _combine(config)
  for bits in (config.quant.weight_bits, *config.quant.ptq_weight_bits):
    _quant_config(config, bits)
  distillation.check_hyperparameters(config.distill.temperature, config.distill.alpha)
  if config.share.bits and not 1 <= config.share.bits <= weight_sharing.MAX_BITS:
    raise ValueError(f"config.share.bits={config.share.bits}; use 1..8, or 0 for no row.")
  for name in ("train.epochs", "finetune.epochs", "quant.qat_epochs",
               "quant.calibration_examples", "compression.latency_batch",
               "compression.latency_rounds"):
    section, field = name.split(".")
    if getattr(config[section], field) < 1:
      raise ValueError(f"config.{name}={getattr(config[section], field)} must be >= 1.")


def _quant_config(config: ml_collections.ConfigDict, weight_bits: int | None = None
                  ) -> quant.QuantConfig:
  q = config.quant
  return quant.QuantConfig(weight_bits=weight_bits or q.weight_bits, act_bits=q.act_bits or None,
                           calibration=q.calibration, percentile=q.percentile)


def _subset(dataset: ep.data.Dataset, train: int, evaluation: int) -> ep.data.Dataset:
  """The first `train` training and `evaluation` val/test examples (0 = all)."""
  cut = lambda s, n: ep.data.Split(s.x[:n], s.y[:n]) if n else s
  return dataclasses.replace(dataset, train=cut(dataset.train, train),
                             val=cut(dataset.val, evaluation), test=cut(dataset.test, evaluation))


# ------------------------------------------------------------------------------ stages


def _schedule(ctx: pipeline.Context, name: str, target: float, epochs: int):
  p = ctx.config.prune
  total = epochs * ctx.steps_per_epoch
  to_steps = lambda e: int(round((e * epochs if e <= 1 else e) * ctx.steps_per_epoch))
  if name == "constant":
    return ep.schedules.constant(target, begin_step=to_steps(p.begin_epoch),
                                 end_step=total, frequency=p.frequency)
  return ep.schedules.polynomial_decay(0.0, target, begin_step=to_steps(p.begin_epoch),
                                       end_step=min(to_steps(p.end_epoch), total),
                                       frequency=p.frequency)


def _teacher(ctx: pipeline.Context, dense: training.TrainState) -> distillation.Teacher | None:
  return (distillation.Teacher(ctx.model, dense.params, dense.batch_stats)
          if ctx.config.distill.enabled else None)


def prune_finetune(ctx: pipeline.Context, dense: training.TrainState, schedule: str,
                   target: float, seed: int, stage: str) -> training.TrainState:
  """Fine-tunes the dense model while `schedule` raises its sparsity to `target` (TF-MOT's
  'prune a trained model' workflow); the masks are in `state.opt_state.masks`."""
  config = ctx.config
  epochs = config.finetune.epochs
  tx = ctx.pruner("magnitude", schedule=_schedule(ctx, schedule, target, epochs),
                  seed=seed).wrap(ctx.optimizer(config.finetune, epochs))
  state = training.TrainState(step=jnp.zeros((), jnp.int32), params=dense.params,
                              batch_stats=dense.batch_stats, opt_state=tx.init(dense.params),
                              rng=jax.random.key_data(jax.random.key(seed + 20_000)))
  return _fit(ctx, ctx.model, tx, state, ctx.fit_config(epochs, seed), stage,
              _teacher(ctx, dense))


def _fit(ctx: pipeline.Context, model: Any, tx: Any, state: training.TrainState,
         config: training.FitConfig, stage: str, teacher: distillation.Teacher | None
         ) -> training.TrainState:
  """`training.fit` in the workdir, learning from `teacher` (Hinton et al.) if there is one."""
  objective, objective_args = None, None
  if teacher is not None:
    objective, objective_args = distillation.objective(
        teacher, temperature=ctx.config.distill.temperature, alpha=ctx.config.distill.alpha)
  state, _ = training.fit(model, tx, state, ctx.dataset, config, workdir=ctx.workdir,
                          stage=stage, objective=objective, objective_args=objective_args)
  return state


def qat_finetune(ctx: pipeline.Context, start: training.TrainState, masks: Any,
                 teacher: distillation.Teacher | None, seed: int, stage: str
                 ) -> tuple[quant.QuantizedModel, training.TrainState]:
  """Quantization-aware fine-tuning from `start` (masks, if any, held fixed)."""
  config = ctx.config
  qconfig = _quant_config(config)
  calibration_x = ctx.dataset.train.x[:config.quant.calibration_examples]
  ranges = quant.calibrate(ctx.model, start.params, calibration_x, qconfig,
                           batch_stats=start.batch_stats)
  fake = quant.qat(ctx.model, qconfig, ranges)
  epochs = config.quant.qat_epochs
  section = ml_collections.ConfigDict(dict(
      optimizer=config.finetune.optimizer, lr_schedule=config.finetune.lr_schedule,
      learning_rate=config.quant.qat_learning_rate))
  inner = ctx.optimizer(section, epochs)
  if masks is not None:
    tx = ep.Pruner(importance="magnitude").wrap(inner)
    opt_state = ep.pruner.set_masks(tx.init(start.params), masks)
  else:
    tx, opt_state = inner, inner.init(start.params)
  state = training.TrainState(step=jnp.zeros((), jnp.int32), params=start.params,
                              batch_stats=start.batch_stats, opt_state=opt_state,
                              rng=jax.random.key_data(jax.random.key(seed + 30_000)))
  # One optimizer step per compiled call, not an epoch's `lax.scan`: XLA:CPU runs the
  # backward pass of the fake-quant thesis CNN 10-25x slower inside a loop body than in a
  # plain call (measured: 3.2 s vs 0.14 s per step at batch 128; the float model is
  # unaffected). No augmentation, as this fine-tune has always run.
  fit_config = dataclasses.replace(ctx.fit_config(epochs, seed), steps_per_call=1,
                                   checkpoint_every_epochs=1, checkpoint_every_steps=0,
                                   augment=False)
  return fake, _fit(ctx, fake, tx, state, fit_config, stage, teacher)


# --------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class Row:
  """One compressed model to measure.

  Attributes:
    eval_model: what computes the predictions (the float model, a fake-quant or an
      integer `QuantizedModel`).
    eval_params: its params (float, or integer codes and scales).
    float_params: float params of the same weights (costs, fp32/sparse/int8 sizes).
    masks: pruning masks or None.
    saved: the tree written as the row's model file, and its `storage.save` sparse mode.
    info: extra fields for the result (e.g. quantization settings).
  """
  eval_model: Any
  eval_params: Any
  float_params: Any
  masks: Any
  saved: tuple[Any, str]
  info: dict


class Measurer:
  """Evaluates rows of one seed against its dense model: accuracy, costs, files, latency."""

  def __init__(self, ctx: pipeline.Context, dense: training.TrainState, seed: int):
    self.ctx, self.dense, self.seed = ctx, dense, seed
    self.batch_stats = dense.batch_stats
    c = ctx.config.compression
    self.latency_x = jnp.asarray(ctx.dataset.test.x[:c.latency_batch])
    self.models_dir = ctx.workdir / "models" / f"seed{seed}"
    self.models_dir.mkdir(parents=True, exist_ok=True)
    # Which layers quantize: the paths a calibration pass meets (cheap, on 2 examples).
    self.layers = quant.calibrate(ctx.model, dense.params, ctx.dataset.train.x[:2],
                                  quant.QuantConfig(act_bits=None), batch_stats=self.batch_stats)

  def _forward(self, model, params):
    variables = {"params": params, **({"batch_stats": self.batch_stats}
                                      if self.batch_stats else {})}
    fn = _forward_fn(model)
    return lambda: fn(variables, self.latency_x)

  def __call__(self, name: str, row: Row) -> dict[str, Any]:
    ctx = self.ctx
    evaluate = training.make_evaluate(row.eval_model, ctx.config.eval_batch_size)
    result: dict[str, Any] = {}
    for split in ("val", "test"):
      s = getattr(ctx.dataset, split)
      m = evaluate(row.eval_params, self.batch_stats, jnp.asarray(s.x), jnp.asarray(s.y))
      result[f"{split}_accuracy"] = float(m["accuracy"])
      result[f"{split}_loss"] = float(m["loss"])
    summary = ep.masks.summary(row.masks) if row.masks is not None else None
    cost = ep.cost.report(ctx.model, row.float_params, row.masks, ctx.dataset.input_shape,
                          batch_stats=self.batch_stats)
    int8 = quant.quantize_params(row.float_params, {p: 0.0 for p in self.layers},
                                 quant.QuantConfig(act_bits=None))
    tree, sparse = row.saved
    metadata = {"model": ctx.config.model.name, "row": name, "seed": self.seed, **row.info}
    bytes_ = {"fp32_dense": storage.size(row.float_params),
              "sparse": storage.size(row.float_params, sparse="auto"),
              "int8": storage.size(int8), "sparse_int8": storage.size(int8, sparse="auto"),
              "model": storage.save(self.models_dir / f"{name}.npz", tree, sparse=sparse,
                                    metadata=metadata)}
    rounds = ctx.config.compression.latency_rounds
    ms = ep.cost.latency({"dense": self._forward(ctx.model, self.dense.params),
                          "row": self._forward(row.eval_model, row.eval_params)}, rounds=rounds)
    result.update(
        sparsity_global=summary["sparsity"] if summary else 0.0,
        sparsity_per_layer=({k: v["sparsity"] for k, v in summary["layers"].items()}
                            if summary else {}),
        params_total=cost["params"]["total"], params_nonzero=cost["params"]["nonzero"],
        macs_dense=cost["macs"]["dense"], macs_effective=cost["macs"]["effective"],
        bytes_fp32_dense=bytes_["fp32_dense"], bytes_sparse=bytes_["sparse"], bytes=bytes_,
        latency_ms=ms["row"], latency_dense_ms=ms["dense"],
        latency_ratio=ms["row"] / ms["dense"], **row.info)
    return result


@functools.lru_cache(maxsize=32)
def _forward_fn(model: Any):
  """One compiled forward pass per model (rows of the same model share it)."""
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def _float_row(model: Any, state: training.TrainState, masks: Any, sparse: str) -> Row:
  return Row(model, state.params, state.params, masks, (state.params, sparse), {})


# ------------------------------------------------------------------------------ the run


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Runs the study; returns (and writes) `summary.json`'s content."""
  validate(config)
  ctx = pipeline.setup(config, workdir)
  dataset = _subset(ctx.dataset, config.compression.train_examples,
                    config.compression.eval_examples)
  ctx = dataclasses.replace(ctx, dataset=dataset, steps_per_epoch=ep.data.steps_per_epoch(
      dataset.train, config.train.batch_size))
  workdir, model = ctx.workdir, ctx.model
  combine = _combine(config)
  calibration_x = dataset.train.x[:config.quant.calibration_examples]
  rows: dict[tuple[str, float], list[dict]] = {}
  for seed in config.seeds:
    results_dir = workdir / "results" / f"seed{seed}"
    memo: dict[str, Any] = {}

    def once(key, compute):
      if key not in memo:
        memo[key] = compute()
      return memo[key]

    dense = lambda seed=seed: once("dense", lambda: pipeline.train_dense(ctx, seed))
    measurer = lambda: once("measurer", lambda: Measurer(ctx, dense(), seed))

    def pruned(schedule, target, seed=seed):
      return once(("pruned", schedule, target), lambda: prune_finetune(
          ctx, dense(), schedule, target, seed, f"seed{seed}/{schedule}@{target:g}"))

    def add(method, target, compute):
      def measured():
        name = method if not target else f"{method}@{target:g}"
        return measurer()(name, compute())
      rows.setdefault((method, target), []).append(pipeline.cached(
          results_dir / f"{method}@{target:g}.json", measured))

    add("dense", 0.0, lambda: _float_row(model, dense(), None, "none"))
    for schedule in config.compression.schedules:
      for target in checks.targets(config):
        add(schedule, target, lambda s=schedule, t=target: _float_row(
            model, pruned(s, t), pruned(s, t).opt_state.masks, "auto"))

    for bits in config.quant.ptq_weight_bits:

      def ptq_row(bits=bits):
        qconfig = _quant_config(config, bits)
        qmodel, qparams = quant.ptq(model, dense().params, calibration_x, qconfig,
                                    batch_stats=dense().batch_stats)
        if bits == 8:
          return Row(qmodel, qparams, quant.dequantize_params(qparams), None,
                     (qparams, "none"), _quant_info(qconfig, "int8 path"))
        # 4-bit codes run as fake quantization (same outputs as int8 containers).
        ranges = quant.calibrate(model, dense().params, calibration_x, qconfig,
                                 batch_stats=dense().batch_stats)
        return Row(quant.qat(model, qconfig, ranges), dense().params,
                   quant.dequantize_params(qparams), None, (qparams, "none"),
                   _quant_info(qconfig, "fake quantization"))
      add("ptq" if bits == 8 else f"ptq_w{bits}", 0.0, ptq_row)

    def qat_dense(seed=seed):
      return once("qat", lambda: qat_finetune(ctx, dense(), None, _teacher(ctx, dense()),
                                              seed, f"seed{seed}/qat"))

    add("qat", 0.0, lambda: Row(qat_dense()[0], qat_dense()[1].params, qat_dense()[1].params,
                                None, (qat_dense()[1].params, "none"),
                                _quant_info(qat_dense()[0].config, "fake quantization")))
    add("qat+ptq", 0.0, lambda: _converted(*qat_dense(), None))

    if combine is not None:
      schedule, target = combine
      base = lambda: pruned(schedule, target)

      def ptq_pruned():
        qconfig = _quant_config(config)
        qmodel, qparams = quant.ptq(model, base().params, calibration_x, qconfig,
                                    batch_stats=base().batch_stats)
        return Row(qmodel, qparams, quant.dequantize_params(qparams), base().opt_state.masks,
                   (qparams, "auto"), _quant_info(qconfig, "int8 path"))

      def qat_pruned(seed=seed):
        return once("qat_pruned", lambda: qat_finetune(
            ctx, base(), base().opt_state.masks, _teacher(ctx, dense()), seed,
            f"seed{seed}/{schedule}@{target:g}+qat"))

      add(f"{schedule}+ptq", target, ptq_pruned)
      add(f"{schedule}+qat+ptq", target,
          lambda: _converted(*qat_pruned(), base().opt_state.masks))
      if config.share.bits:
        add(f"{schedule}+share{config.share.bits}", target,
            lambda: _shared_row(ctx, base(), seed))

  summary = summarize(config, rows)
  training.write_json_atomic(workdir / "summary.json", summary)
  (workdir / "report.md").write_text(format_report(summary), encoding="utf-8")
  plot(summary, workdir)
  return summary


def _quant_info(qconfig: quant.QuantConfig, execution: str) -> dict:
  return {"quantization": {"weight_bits": qconfig.weight_bits, "act_bits": qconfig.act_bits,
                           "calibration": qconfig.calibration, "execution": execution}}


def _converted(fake: quant.QuantizedModel, state: training.TrainState, masks: Any) -> Row:
  qmodel, qparams = quant.convert(fake, state.params)
  return Row(qmodel, qparams, quant.dequantize_params(qparams), masks,
             (qparams, "none" if masks is None else "auto"),
             _quant_info(fake.config, "int8 path"))


def _shared_row(ctx: pipeline.Context, base: training.TrainState, seed: int) -> Row:
  s = ctx.config.share
  shared = weight_sharing.share(base.params, s.bits, iterations=s.iterations)
  shared, _ = weight_sharing.finetune(
      ctx.model, shared, ctx.dataset.train.x, ctx.dataset.train.y, epochs=s.epochs,
      batch_size=ctx.config.train.batch_size, learning_rate=s.learning_rate, seed=seed,
      batch_stats=base.batch_stats)
  params = weight_sharing.reconstruct(shared)
  return Row(ctx.model, params, params, base.opt_state.masks, (shared, "auto"),
             {"weight_sharing": {"bits": s.bits, "codebook_entries": 2 ** s.bits}})


# ----------------------------------------------------------------------------- reports


def summarize(config: ml_collections.ConfigDict, rows: dict) -> dict:
  """The pipeline's summary plus on-disk bytes, size and latency relative to dense."""
  summary = report.summarize(config, rows)
  dense_rows = rows[("dense", 0.0)]
  for entry, per_seed in zip(summary["results"], rows.values()):
    kinds = per_seed[0]["bytes"].keys()
    entry["bytes"] = {k: int(np.mean([r["bytes"][k] for r in per_seed])) for k in kinds}
    entry["size_ratio"] = report.mean_std([r["bytes"]["model"] / d["bytes"]["fp32_dense"]
                                           for r, d in zip(per_seed, dense_rows)])
    entry["latency"] = {"ms": report.mean_std([r["latency_ms"] for r in per_seed]),
                        "dense_ms": report.mean_std([r["latency_dense_ms"] for r in per_seed]),
                        "ratio": report.mean_std([r["latency_ratio"] for r in per_seed]),
                        "batch": config.compression.latency_batch}
    for key in ("quantization", "weight_sharing"):
      if key in per_seed[0]:
        entry[key] = per_seed[0][key]
  return summary


def format_table(summary: dict) -> str:
  """The results as a Markdown table: accuracy, size on disk and latency vs dense."""
  pm = lambda d, f="{:.4f}": f"{f.format(d['mean'])} ± {f.format(d['std'])}"
  lines = [
      f"{summary['model']} on {summary['dataset']}\n",
      "| method | sparsity | test acc | size on disk | x dense | latency x dense | "
      "fp32 dense | sparse | int8 | sparse+int8 |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in summary["results"]:
    b = r["bytes"]
    lines.append(
        f"| {r['method']} | {r['sparsity']['global']:.3f} | {pm(r['test_accuracy'])} | "
        f"{b['model']:,} | {r['size_ratio']['mean']:.3f} | "
        f"{pm(r['latency']['ratio'], '{:.2f}')} | {b['fp32_dense']:,} | {b['sparse']:,} | "
        f"{b['int8']:,} | {b['sparse_int8']:,} |")
  return "\n".join(lines)


def format_report(summary: dict) -> str:
  seeds = summary["results"][0]["seeds"] if summary["results"] else []
  batch = summary["results"][0]["latency"]["batch"] if summary["results"] else 0
  return (f"# Compression results\n\nMean ± std over seeds {seeds}. Sizes are the files "
          f"written by evoprune.storage (bytes); 'x dense' divides the row's file by the "
          f"dense fp32 file. Latency: forward pass on {batch} test images, median of "
          f"interleaved rounds against the dense fp32 model.\n\n{format_table(summary)}\n")


def plot(summary: dict, workdir: pathlib.Path) -> None:
  """compression.png: test accuracy against size on disk and against latency (x dense)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for r in summary["results"]:
    label = r["method"] + (f"@{r['target_sparsity']:g}" if r["target_sparsity"] else "")
    for ax, x in zip(axes, (r["size_ratio"]["mean"], r["latency"]["ratio"]["mean"])):
      ax.errorbar(x, r["test_accuracy"]["mean"], yerr=r["test_accuracy"]["std"], marker="o",
                  ls="none", label=label)
  axes[0].set_xscale("log")
  axes[0].set_xlabel("size on disk (x dense fp32)")
  axes[1].set_xlabel("latency (x dense fp32)")
  for ax in axes:
    ax.set_ylabel("test accuracy")
  axes[1].legend(fontsize="x-small", loc="best")
  fig.tight_layout()
  fig.savefig(workdir / "compression.png", dpi=120)
  plt.close(fig)
