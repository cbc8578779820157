"""Reporting of experiment results: per-seed results -> summary.json, tables, report, plots.

`summarize` aggregates the per-seed result rows into summary.json's documented schema
(mean and std over seeds); `format_table`/`format_report` render a summary as Markdown
(report.md) and `plot` draws its PNGs.
"""

import pathlib

import ml_collections
import numpy as np


def mean_std(values: list[float]) -> dict[str, float]:
  """Mean and (population) standard deviation over seeds, as summary.json stores them."""
  return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def summarize(config: ml_collections.ConfigDict, rows: dict) -> dict:
  """Aggregates per-seed results into summary.json's documented schema."""
  results = []
  for (method, target), per_seed in rows.items():
    first = per_seed[0]
    per_layer = {k: float(np.mean([r["sparsity_per_layer"][k] for r in per_seed]))
                 for k in first["sparsity_per_layer"]}
    entry = {
        "method": method, "target_sparsity": target, "seeds": list(config.seeds),
        "val_accuracy": mean_std([r["val_accuracy"] for r in per_seed]),
        "test_accuracy": mean_std([r["test_accuracy"] for r in per_seed]),
        "sparsity": {"global": float(np.mean([r["sparsity_global"] for r in per_seed])),
                     "per_layer": per_layer},
        "params": {"total": int(first["params_total"]),
                   "nonzero": int(np.mean([r["params_nonzero"] for r in per_seed]))},
        "macs": {"dense": int(first["macs_dense"]),
                 "effective": int(np.mean([r["macs_effective"] for r in per_seed]))},
        "bytes": {"fp32_dense": int(first["bytes_fp32_dense"]),
                  "sparse": int(np.mean([r["bytes_sparse"] for r in per_seed]))},
        "wall_time_s": float(np.sum([r["wall_time_s"] for r in per_seed])),
    }
    if "oneshot_val_accuracy" in first:
      entry["oneshot_val_accuracy"] = mean_std([r["oneshot_val_accuracy"] for r in per_seed])
      entry["oneshot_test_accuracy"] = mean_std([r["oneshot_test_accuracy"] for r in per_seed])
    results.append(entry)
  return {"dataset": config.data.name, "model": config.model.name, "results": results}


def format_table(summary: dict) -> str:
  """The results as a Markdown table (accuracy as mean ± std over seeds)."""
  pm = lambda d: f"{d['mean']:.4f} ± {d['std']:.4f}"
  lines = [
      f"{summary['model']} on {summary['dataset']}\n",
      "| method | target | achieved | val acc | test acc | nonzero params | effective MACs "
      "| bytes (sparse) |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in summary["results"]:
    lines.append(
        f"| {r['method']} | {r['target_sparsity']:.3f} | {r['sparsity']['global']:.4f} | "
        f"{pm(r['val_accuracy'])} | {pm(r['test_accuracy'])} | {r['params']['nonzero']:,} | "
        f"{r['macs']['effective']:,} | {r['bytes']['sparse']:,} |")
  return "\n".join(lines)


def format_report(summary: dict) -> str:
  seeds = summary["results"][0]["seeds"] if summary["results"] else []
  return (f"# Results\n\nMean ± std over seeds {seeds}; the model is selected on the "
          f"validation split, test accuracy is only reported.\n\n{format_table(summary)}\n")


def plot(summary: dict, workdir: pathlib.Path) -> None:
  """Accuracy vs sparsity and per-layer sparsity plots (PNG)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4))
  methods = sorted({r["method"] for r in summary["results"]} - {"dense"})
  for method in methods:
    rs = sorted((r for r in summary["results"] if r["method"] == method),
                key=lambda r: r["sparsity"]["global"])
    ax.errorbar([r["sparsity"]["global"] for r in rs],
                [r["test_accuracy"]["mean"] for r in rs],
                yerr=[r["test_accuracy"]["std"] for r in rs], marker="o", label=method)
  for r in summary["results"]:
    if r["method"] == "dense":
      ax.axhline(r["test_accuracy"]["mean"], color="gray", ls="--", label="dense")
  ax.set_xlabel("achieved sparsity")
  ax.set_ylabel("test accuracy")
  ax.legend()
  fig.tight_layout()
  fig.savefig(workdir / "accuracy_vs_sparsity.png", dpi=120)
  plt.close(fig)

  pruned = [r for r in summary["results"] if r["sparsity"]["per_layer"]]
  if pruned:
    fig, ax = plt.subplots(figsize=(7, 4))
    layers = list(pruned[0]["sparsity"]["per_layer"])
    width = 0.8 / len(pruned)
    for i, r in enumerate(pruned):
      ax.bar(np.arange(len(layers)) + i * width,
             [r["sparsity"]["per_layer"][k] for k in layers], width,
             label=f"{r['method']}@{r['target_sparsity']:g}")
    ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, layers, rotation=30, ha="right")
    ax.set_ylabel("sparsity")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(workdir / "per_layer_sparsity.png", dpi=120)
    plt.close(fig)
