r"""Train-step time of the zoo against the same network in PyTorch eager, side by side.

  python -m benchmarks.training_speed [--out=training_speed.json] [--models=...] [--smoke]
  python -m benchmarks.training_speed --plain_ops   # also the plain XLA ops, same rounds
  python -m benchmarks.training_speed --cpu_ops     # on a GPU: also the CPU formulations
  taskset -c 1 python -m benchmarks.training_speed   # one core each (PyTorch follows affinity)

For LeNet-300-100 (MNIST-shaped), LeNet-5, the thesis CNN, ResNet-20 and MobileNet v1
(CIFAR-shaped), batch 128, SGD with momentum 0.9 and softmax cross-entropy: evoprune's own
train step (`evoprune.training.train_step`, run `STEPS_PER_CALL` steps per compiled call of
`training.make_train_epoch`, as `fit` runs it) and an equivalent PyTorch eager step
(`zero_grad`, forward, `backward`, `step`; NCHW, the default thread count; on the GPU when
JAX runs on one and PyTorch sees CUDA), measured in the same process in alternating blocks
of steps, so both see the same load on a shared machine (see `measure`). Each figure is
the median per step after warm-up; `jax_over_torch` is the ratio of the medians. PyTorch
is optional (`pip install torch`); without it the comparison is skipped with a line saying
so, and `torch_ms` and `jax_over_torch` are null.

On a machine shared with other (niced) processes, prefer the one-core comparison: XLA's
worker threads, which sleep between tasks, are woken on the core of the thread that woke
them and then share it with that thread, while PyTorch's spinning OpenMP threads are
spread over both cores; PyTorch's team of two in turn slows down by 10x and more whenever
another process takes one of its cores. Ratios on two busy cores say more about the
scheduler than about either framework.

JSON: {"<model>": {"jax_ms", "torch_ms", "jax_over_torch", "round_ratios", "impl",
"plain_ms", "plain_over_jax", "cpu_ms", "cpu_over_jax", "xla_forms_ms",
"xla_forms_over_jax"}} where `round_ratios` are the
ratios of each round's medians (the spread behind `jax_over_torch`; printed as a range),
`impl` says which convolution / pooling implementation evoprune used (see `evoprune.ops`),
with `--plain_ops` `plain_ms` is evoprune's step with the plain XLA ops on every backend
(`ops.use('xla')`, as `EVOPRUNE_OPS=xla`) and `plain_over_jax` its ratio to the default
step, and with `--cpu_ops` `cpu_ms` and `cpu_over_jax` the same for the CPU formulations
on every backend (`ops.use('cpu')`): on a GPU or TPU, whether the plain ops that evoprune
stages there by default are the faster; with `--xla_forms` `xla_forms_ms` and
`xla_forms_over_jax` the same for the CPU formulations without evoprune's C++ kernels
(`ep.ops.direct.use_kernels(False)`, as `EVOPRUNE_KERNELS=0`). Each is timed in the same alternating rounds, and
null without its flag.
"""

import json
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import numpy as np

import evoprune as ep
from evoprune import training
from evoprune.ops import direct
from benchmarks.side_by_side import (INPUT_SHAPES, alternate, example_batch, machine,
                                     torch_device, train_epoch)

_OUT = flags.DEFINE_string("out", "", "Write the results as JSON to this file.")
_SMOKE = flags.DEFINE_bool(
    "smoke", False, "Few repetitions of 2-step calls (a quick check, not a measure).")
_MODELS = flags.DEFINE_list(
    "models", ["lenet300_100", "lenet5", "thesis_cnn", "resnet20", "mobilenet"],
    "Models to measure.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds of 3 timed steps per framework.")
_PLAIN_OPS = flags.DEFINE_bool(
    "plain_ops", False,
    "Also time evoprune's step with the plain XLA ops and compiler defaults (as under "
    "EVOPRUNE_OPS=xla), in the same rounds: whether the CPU formulations pay on this machine. "
    "Slow: XLA:CPU runs the plain weight gradients as naive loops inside the training "
    "program's scan (LeNet-5 ~18x, ResNet-20 rounds take many minutes).")
_CPU_OPS = flags.DEFINE_bool(
    "cpu_ops", False,
    "Also time evoprune's step with the CPU formulations on every backend (as "
    "EVOPRUNE_OPS=cpu), in the same rounds: on a GPU or TPU, whether the plain XLA ops that "
    "evoprune stages there are the faster (on CPU it is the default step again).")

_XLA_FORMS = flags.DEFINE_bool(
    "xla_forms", False,
    "Also time evoprune's step without its C++ convolution kernels (as EVOPRUNE_KERNELS=0), "
    "in the same rounds: what the kernels gain on this machine.")

flags.register_validator(
    "models", lambda names: set(names) <= INPUT_SHAPES.keys(),
    f"--models names models from {sorted(INPUT_SHAPES)}, comma-separated.")
# evoprune's steps run in compiled calls of this many steps (`fit` runs a whole epoch per
# call, e.g. 390 steps of CIFAR-10 at batch 128); PyTorch's run one per call, as in its
# training loops. Each call also pays once for what an epoch pays once: on CPU, XLA maps the
# program's temporary buffer afresh (ResNet-20: 246 MB, ~60,000 page faults per call) and
# starts cold. 16 steps share that as an epoch would: ResNet-20's step took 0.955 of its
# time at 4 steps per call and the same at 48 (1.01; same process, AVX-512 EPYC).
STEPS_PER_CALL = 16


# ------------------------------------------------------------------------- PyTorch side


def torch_model(name: str) -> Any:
  """The zoo model `name` written in PyTorch (same layers, shapes and options)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  def conv_bn(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1,
              relu: bool = True) -> nn.Module:
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(c_out, momentum=0.1, eps=1e-5)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))

  class BasicBlock(nn.Module):
    """ResNet basic block with the option-A (subsample + zero-pad) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
      super().__init__()
      self.body = nn.Sequential(conv_bn(c_in, c_out, stride=stride),
                                conv_bn(c_out, c_out, relu=False))
      self.stride, self.extra = stride, c_out - c_in

    def forward(self, x):
      shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride != 1 else x
      if self.extra:
        shortcut = nn.functional.pad(
            shortcut, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
      return torch.relu(self.body(x) + shortcut)

  if name == "lenet300_100":
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100),
                         nn.ReLU(), nn.Linear(100, 10))
  if name == "lenet5":
    return nn.Sequential(
        nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84),
        nn.ReLU(), nn.Linear(84, 10))
  if name == "thesis_cnn":
    return nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(1024, 64), nn.ReLU(), nn.Linear(64, 10))
  if name == "resnet20":
    blocks, c_in = [conv_bn(3, 16)], 16
    for stage in range(3):
      for block in range(3):
        c_out = 16 * 2**stage
        blocks.append(BasicBlock(c_in, c_out, 2 if stage and not block else 1))
        c_in = c_out
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
  if name == "mobilenet":
    from evoprune.models import mobilenet  # pylint: disable=g-import-not-at-top
    c_in = mobilenet._STEM_CHANNELS  # pylint: disable=protected-access
    blocks = [conv_bn(3, c_in)]
    for c_out, stride in mobilenet._BLOCKS:  # pylint: disable=protected-access
      blocks += [conv_bn(c_in, c_in, stride=stride, groups=c_in), conv_bn(c_in, c_out, k=1)]
      c_in = c_out
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))
  raise ValueError(f"no PyTorch version of {name!r}; valid: {sorted(INPUT_SHAPES)}")


def torch_step(name: str, x: np.ndarray, y: np.ndarray) -> Callable[[], None]:
  """One PyTorch eager SGD-momentum step on a fixed batch (NHWC numpy in, NCHW inside)."""
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  device = torch_device()
  net = torch_model(name).to(device).train()
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
  yt = torch.from_numpy(y.astype(np.int64)).to(device)
  opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(net(xt), yt)
    loss.backward()
    opt.step()
    loss.item()  # wait for the step, as block_until_ready does on the JAX side

  return step


# ----------------------------------------------------------------------------- JAX side


def jax_step(name: str, x: np.ndarray, y: np.ndarray, steps: int = STEPS_PER_CALL,
             ops: str = "auto", kernels: bool = True) -> Callable[[], None]:
  """`steps` of evoprune's train step on a fixed batch, as `fit` runs them.

  One call of the compiled `training.make_train_epoch` program (a `lax.scan` over the
  steps, state donated): how `training.fit` trains, so the per-step time has no Python
  dispatch in it, as it has none in a real run. `ops`: the program is made within
  `ep.ops.use(ops)` ('xla': the plain XLA ops and XLA's default compiler options; 'cpu':
  the CPU formulations, on every backend). `kernels=False`: made within
  `ep.ops.direct.use_kernels(False)`.
  """
  with direct.use_kernels(kernels):
    train_steps, (state, x, y, batches) = train_epoch(name, x, y, steps, ops)
  box = [state]

  def run():
    box[0], metrics = train_steps(box[0], x, y, batches)
    jax.block_until_ready(metrics)

  return run


def measure(name: str, rounds: int, block: int = 3, warmup: int = 2, plain: bool = False,
            cpu: bool = False, steps_per_call: int = STEPS_PER_CALL,
            xla_forms: bool = False) -> dict[str, Any]:
  """Median ms per step of both frameworks, the ratio of the medians (jax/torch), and the
  ratio of each round's medians (its spread); with `plain` (`cpu`), also evoprune's step
  with the plain XLA ops (the CPU formulations) on every backend, `plain_ms` (`cpu_ms`), and
  its ratio to the default step, `plain_over_jax` (`cpu_over_jax`); with `xla_forms`, the
  step without the C++ kernels, `xla_forms_ms` and `xla_forms_over_jax`.

  The two frameworks alternate in blocks of `block` calls, `rounds` times (`alternate`);
  evoprune's calls run `steps_per_call` steps each.
  """
  x, y = example_batch(name)
  steps = {"jax": jax_step(name, x, y, steps_per_call)}
  if plain:
    steps["plain"] = jax_step(name, x, y, steps_per_call, ops="xla")
  if cpu:
    steps["cpu"] = jax_step(name, x, y, steps_per_call, ops="cpu")
  if xla_forms:
    steps["xla_forms"] = jax_step(name, x, y, steps_per_call, kernels=False)
  try:
    steps["torch"] = torch_step(name, x, y)
  except ImportError:
    pass
  times = alternate(steps, rounds, block, warmup)
  # seconds per call -> ms per step, [rounds, block]
  blocks = {key: (1e3 if key == "torch" else 1e3 / steps_per_call) * t
            for key, t in times.items()}
  result = {"jax_ms": float(np.median(blocks["jax"])), "torch_ms": None,
            "jax_over_torch": None, "round_ratios": None, "impl": ep.ops.describe(),
            "plain_ms": None, "plain_over_jax": None, "cpu_ms": None, "cpu_over_jax": None,
            "xla_forms_ms": None, "xla_forms_over_jax": None}
  for key in ("plain", "cpu", "xla_forms"):
    if key in blocks:
      result[f"{key}_ms"] = float(np.median(blocks[key]))
      result[f"{key}_over_jax"] = result[f"{key}_ms"] / result["jax_ms"]
  if "torch" in blocks:
    result["torch_ms"] = float(np.median(blocks["torch"]))
    result["jax_over_torch"] = result["jax_ms"] / result["torch_ms"]
    # The spread of the ratio: each round's medians, taken a few seconds apart.
    result["round_ratios"] = (np.median(blocks["jax"], 1) /
                              np.median(blocks["torch"], 1)).round(4).tolist()
  return result


def main(argv):
  del argv
  print(machine())
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print("PyTorch is not installed: measuring evoprune only, no comparison "
          "(pip install torch to compare).")
  rounds = 1 if _SMOKE.value else _ROUNDS.value
  results = {}
  print(f"evoprune ops: {ep.ops.describe()}")
  extra = [key for key, flag in (("plain", _PLAIN_OPS), ("cpu", _CPU_OPS),
                                 ("xla_forms", _XLA_FORMS)) if flag.value]
  columns = "".join(f" {key + '/jax':>10}" for key in extra)
  print(f"{'model':<14} {'jax ms':>9} {'torch ms':>9} {'jax/torch':>10}{columns}  per round")
  for name in _MODELS.value:
    r = measure(name, rounds, block=1 if _SMOKE.value else 3, warmup=1 if _SMOKE.value else 2,
                steps_per_call=2 if _SMOKE.value else STEPS_PER_CALL,
                plain=_PLAIN_OPS.value, cpu=_CPU_OPS.value, xla_forms=_XLA_FORMS.value)
    results[name] = r
    torch_ms = "-" if r["torch_ms"] is None else f"{r['torch_ms']:.2f}"
    ratio = "-" if r["jax_over_torch"] is None else f"{r['jax_over_torch']:.3f}"
    ratios = "".join(f" {r[key + '_over_jax']:>10.3f}" for key in extra)
    spread = ("" if r["round_ratios"] is None else
              f"{min(r['round_ratios']):.3f}-{max(r['round_ratios']):.3f}")
    print(f"{name:<14} {r['jax_ms']:9.2f} {torch_ms:>9} {ratio:>10}{ratios}  {spread}",
          flush=True)
  if _OUT.value:
    training.write_json_atomic(_OUT.value, results)
  print(json.dumps({"backend": jax.default_backend(), "devices": jax.device_count(),
                    "smoke": _SMOKE.value}))


if __name__ == "__main__":
  app.run(main)
