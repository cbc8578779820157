"""Quantization: PTQ, QAT (fake quantization with a straight-through estimator), int8 path.

    config = ep.quantization.QuantConfig(weight_bits=8, act_bits=8, calibration="minmax")
    qmodel, qparams = ep.quantization.ptq(model, params, calibration_x, config)
    logits = qmodel.apply({"params": qparams}, x)          # int8 operands, int32 accumulation

    ranges = ep.quantization.calibrate(model, params, calibration_x, config)
    qat_model = ep.quantization.qat(model, config, ranges)  # train it like `model`
    tx = ep.Pruner(...).wrap(optax.adam(1e-4))               # masks and quantization compose
    state, _ = ep.training.fit(qat_model, tx, state, dataset, fit_config)
    qmodel, qparams = ep.quantization.convert(qat_model, state.params)

Scheme. Weights: symmetric, one scale per output channel (the last kernel axis of Dense and
Conv kernels), `scale = max|w| / qmax` with `qmax = 2**(bits-1) - 1` (127 for 8 bits, 7 for
4), codes `clip(round(w / scale), -qmax, qmax)`. A zero weight has code 0, so pruned weights
stay exactly zero after quantization. Activations (the input of every quantized layer):
symmetric, one static scale per tensor, calibrated on a calibration batch by min-max
(`max|x|`) or a percentile of `|x|` (clips outliers); symmetric because an asymmetric zero
point costs a second convolution (the padded border is not zero in the integer domain).

Two executions share one code path, so they agree exactly. The integer model's params hold
the codes (int8 arrays, also for 4-bit codes) and the scales ('kernel_scale' [C_out] and
'input_scale' [] beside each quantized 'kernel'); its layers quantize the input to int8 and
call `lax.dot_general` / `lax.conv_general_dilated` on int8 operands with
`preferred_element_type=int32`, then rescale by `input_scale * kernel_scale`. The fake-quant
model (QAT) computes the same codes from float weights in float32, convolves them and
rescales the same way; integer sums below 2**24 are exact in float32, so both give the same
logits bit for bit on the zoo's models. Gradients pass straight through the rounding
(Bengio et al. 2013), zeroed where an activation is clipped (as TF's FakeQuant does).

Why not qwix (Google's JAX quantization library; AQT is end-of-life). qwix 0.1.8 was
installed and tried here with jax 0.10.2 on XLA:CPU: w8a8 works (int8 x int8 -> int32
dot and conv), but the rest of this module's job does not: int4 operands are rejected by the
CPU backend ("does not support custom element sizes"), its conv requires the activation and
weight types to be equal (no w4a8 and no weight-only PTQ of a CNN), it has no percentile
calibration, its static activation scales average per-example statistics instead of using
the batch's range, and asymmetric activation ranges add a second full-size convolution for
the zero point. The layer substitution here is ~100 lines and keeps one code path.

Latency on XLA:CPU (`cost.latency`, interleaved medians, thesis CNN, batch 256, shared
2-core machine): the integer path took 0.8x to 2.4x the float32 time depending on the load,
i.e. no dependable gain. XLA:CPU runs int8 convolutions through YNNPACK and float32 ones
(fused with bias, ReLU and pooling) through kernels that are as fast or faster, and an int8
convolution with 3 input channels is slow. Int8's latency gain needs an int8 runtime
(TFLite/XNNPACK on ARM, TensorRT); what carries over here is the size: 4x smaller weights,
or more with pruning (see `evoprune.storage`).
"""

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from evoprune.types import Params

CALIBRATIONS = ("minmax", "percentile")
WEIGHT_BITS = (4, 8)
ACT_BITS = (None, 8)
MODES = ("fake", "integer")
# Layers whose `__call__` is substituted: linen Dense and Conv (their kernels' last axis
# is the output channel, and their outputs carry channels last).
QUANTIZABLE = (nn.Dense, nn.Conv)


def qmax(bits: int) -> int:
  """Largest code of a symmetric signed `bits`-bit grid (127 for 8, 7 for 4)."""
  return 2 ** (bits - 1) - 1


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """What to quantize and how; validated at construction.

  Attributes:
    weight_bits: 8 or 4: per-channel symmetric weight codes (4-bit codes are held in int8
      arrays at run time and packed two per byte on disk).
    act_bits: 8, or None for weight-only quantization (float activations).
    calibration: per-tensor activation range: 'minmax' (max |x| on the calibration batch)
      or 'percentile' (the `percentile`-th percentile of |x|).
    percentile: in (0, 100], for calibration='percentile'.
    layers: regular expression a layer's module path ('Conv_0', 'block_00/conv') must
      match in full to be quantized.
  """
  weight_bits: int = 8
  act_bits: int | None = 8
  calibration: str = "minmax"
  percentile: float = 99.99
  layers: str = ".*"

  def __post_init__(self):
    if self.weight_bits not in WEIGHT_BITS:
      raise ValueError(f"weight_bits={self.weight_bits!r} is not supported; use one of "
                       f"{WEIGHT_BITS}.")
    if self.act_bits not in ACT_BITS:
      raise ValueError(f"act_bits={self.act_bits!r} is not supported; use 8, or None for "
                       "weight-only quantization.")
    if self.calibration not in CALIBRATIONS:
      raise ValueError(f"calibration={self.calibration!r} is unknown; use one of "
                       f"{CALIBRATIONS}.")
    if not 0.0 < self.percentile <= 100.0:
      raise ValueError(f"percentile={self.percentile!r} is outside (0, 100]; pass e.g. 99.99.")
    try:
      re.compile(self.layers)
    except re.error as e:
      raise ValueError(f"layers={self.layers!r} is not a regular expression ({e}); pass "
                       "e.g. '.*' or 'Conv_.*'.") from e


# ------------------------------------------------------------------------------ codes


def weight_scale(kernel: jax.Array, bits: int) -> jax.Array:
  """Per-output-channel scale [C_out] of a kernel [..., C_out]: max|w| / qmax.

  An all-zero channel (a pruned filter) gets scale 1 so its codes are 0, not NaN.
  """
  absmax = jnp.max(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)))
  return jnp.where(absmax > 0, absmax / qmax(bits), 1.0).astype(jnp.float32)


def _codes(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
  q = qmax(bits)
  return jnp.clip(jnp.round(x / scale), -q, q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ste_codes(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
  """Float codes of x; the gradient is d(x/scale)/dx inside the grid and 0 where clipped."""
  return _codes(x, scale, bits)


def _ste_fwd(x, scale, bits):
  return _codes(x, scale, bits), (x, scale)


def _ste_bwd(bits, residuals, g):
  x, scale = residuals
  inside = jnp.abs(x) <= qmax(bits) * scale
  return jnp.where(inside, g / scale, 0.0).astype(x.dtype), jnp.zeros_like(scale)


_ste_codes.defvjp(_ste_fwd, _ste_bwd)


def fake_codes(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
  """`clip(round(x / scale), -qmax, qmax)` as floats, with a straight-through gradient.

  Args:
    x: any array.
    scale: broadcastable to x; treated as a constant (no gradient).
    bits: bit width of the grid.

  Returns:
    Codes like x (float). `fake_codes(x, s, b) * s` is x fake-quantized.
  """
  return _ste_codes(x, lax.stop_gradient(scale), bits)


def fake_quantize(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
  """x rounded to the symmetric grid `scale * {-qmax..qmax}` (straight-through gradient)."""
  return fake_codes(x, scale, bits) * scale


def activation_scale(absmax: float | jax.Array, bits: int = 8) -> jax.Array:
  """Per-tensor activation scale for a calibrated clip value |x| <= absmax."""
  absmax = jnp.asarray(absmax, jnp.float32)
  return jnp.where(absmax > 0, absmax / qmax(bits), 1.0).astype(jnp.float32)


# ------------------------------------------------------------------- layer substitution


def module_path(module: nn.Module) -> str:
  """A bound module's path as 'Conv_0' or 'block_00/conv' (the key of its params)."""
  return "/".join(str(p) for p in module.path)


def _quantizable(context: Any, config: "QuantConfig") -> bool:
  module = context.module
  if context.method_name != "__call__" or not isinstance(module, QUANTIZABLE):
    return False
  # A module that already replaces its primitive is left alone rather than overridden.
  if getattr(module, "dot_general_cls", None) or getattr(module, "conv_general_dilated_cls",
                                                         None):
    return False
  return re.fullmatch(config.layers, module_path(module)) is not None


def _keep_kernel(inputs, kernel, bias=None, *, dtype=None, inexact=True):
  """`promote_dtype` that leaves an integer kernel integer (flax would cast it to float)."""
  del inexact
  dtype = dtype or jnp.result_type(inputs, jnp.float32)
  return inputs.astype(dtype), kernel, None if bias is None else bias.astype(dtype)


def _quantized_primitive(primitive: Callable, kernel_codes: jax.Array | None,
                         kernel_scale: jax.Array, input_scale: jax.Array | None,
                         act_bits: int | None, integer: bool) -> Callable:
  """A drop-in for `lax.dot_general` / `lax.conv_general_dilated` on quantized operands.

  The output is `primitive(x_codes, w_codes) * input_scale * kernel_scale` (channels last),
  computed on int8 operands with int32 accumulation when `integer`, else in float32.
  """

  def call(lhs, rhs, *args, precision=None, preferred_element_type=None, **kwargs):
    del precision, preferred_element_type  # the accumulation type is ours to choose
    codes = rhs if kernel_codes is None else kernel_codes
    if input_scale is None:  # weight-only: float activations times dequantized codes
      return primitive(lhs, codes.astype(lhs.dtype) * kernel_scale, *args, **kwargs)
    if integer:
      x = _codes(lhs, input_scale, act_bits).astype(jnp.int8)
      acc = primitive(x, codes, *args, preferred_element_type=jnp.int32, **kwargs)
    else:
      x = fake_codes(lhs, input_scale, act_bits)
      acc = primitive(x, codes, *args, **kwargs)
    return acc.astype(jnp.float32) * (input_scale * kernel_scale)

  return call


def _call_substituted(module: nn.Module, next_fun: Callable, args: tuple, kwargs: dict,
                      primitive: Callable, integer: bool) -> Any:
  """Runs the layer's own `__call__` (padding, bias, reshapes) with `primitive` swapped in."""
  attr = "dot_general" if isinstance(module, nn.Dense) else "conv_general_dilated"
  saved = {name: getattr(module, name) for name in (attr, "promote_dtype")}
  # Linen modules are frozen dataclasses; the swap is undone before anything else runs.
  object.__setattr__(module, attr, primitive)
  if integer:
    object.__setattr__(module, "promote_dtype", _keep_kernel)
  try:
    return next_fun(*args, **kwargs)
  finally:
    for name, value in saved.items():
      object.__setattr__(module, name, value)


def _raw_primitive(module: nn.Module) -> Callable:
  return lax.dot_general if isinstance(module, nn.Dense) else lax.conv_general_dilated


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
  """A linen model whose Dense and Conv layers run quantized; use it like the model.

  `init` and `apply` have the wrapped model's signatures (so `training.train_step`, `fit`
  and `make_evaluate` accept it); other attributes are the wrapped model's.

  Attributes:
    model: the float linen Module.
    config: the quantization settings.
    mode: 'fake' (float params, fake quantization; for QAT and as the reference) or
      'integer' (params from `quantize_params`: int8 codes and scales; the int8 path).
    ranges: ((module path, activation clip value), ...) for mode 'fake' with act_bits;
      the integer mode reads its scales from the params.
  """
  model: nn.Module
  config: QuantConfig
  mode: str = "fake"
  ranges: tuple[tuple[str, float], ...] = ()

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r} is unknown; use one of {MODES}.")
    if self.mode == "fake" and self.config.act_bits and not self.ranges:
      raise ValueError("fake quantization of activations needs calibrated ranges: pass "
                       "ranges=ep.quantization.calibrate(model, params, x, config), or use "
                       "act_bits=None for weight-only quantization.")

  def __getattr__(self, name: str) -> Any:
    if name == "model":  # not yet set (copying): avoid recursion
      raise AttributeError(name)
    return getattr(self.model, name)

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def apply(self, variables, *args, **kwargs):
    with nn.intercept_methods(self._interceptor):
      return self.model.apply(variables, *args, **kwargs)

  def _interceptor(self, next_fun, args, kwargs, context):
    if not _quantizable(context, self.config):
      return next_fun(*args, **kwargs)
    module = context.module
    bits, act_bits = self.config.weight_bits, self.config.act_bits
    if self.mode == "integer":
      node = module.variables["params"]
      if "kernel_scale" not in node:  # a layer quantize_params skipped stays float
        return next_fun(*args, **kwargs)
      primitive = _quantized_primitive(
          _raw_primitive(module), None, node["kernel_scale"], node.get("input_scale"),
          act_bits, integer=True)
      return _call_substituted(module, next_fun, args, kwargs, primitive, integer=True)
    path = module_path(module)
    clip = dict(self.ranges).get(path)
    if act_bits and clip is None:
      raise ValueError(f"layer {path!r} has no calibrated range; calibrate with the same "
                       "model and config (ranges cover: "
                       f"{sorted(dict(self.ranges))}).")
    input_scale = None if not act_bits else activation_scale(clip, act_bits)
    raw = _raw_primitive(module)

    def fake(lhs, rhs, *a, **k):
      scale = weight_scale(lax.stop_gradient(rhs), bits)
      return _quantized_primitive(raw, fake_codes(rhs, scale, bits), scale, input_scale,
                                  act_bits, integer=False)(lhs, rhs, *a, **k)

    return _call_substituted(module, next_fun, args, kwargs, fake, integer=False)


# --------------------------------------------------------------------------- calibration


@functools.lru_cache(maxsize=32)
def _calibration_program(model: nn.Module, config: QuantConfig
                         ) -> tuple[Callable, list[str]]:
  """A compiled pass returning the statistic of every quantized layer's input, and the
  layers' paths (filled in when the program is first traced)."""
  paths: list[str] = []
  stats: list[jax.Array] = []

  def record(next_fun, args, kwargs, context):
    if _quantizable(context, config):
      a = jnp.abs(args[0])
      stats.append(jnp.max(a) if config.calibration == "minmax"
                   else jnp.percentile(a, config.percentile))
      paths.append(module_path(context.module))
    return next_fun(*args, **kwargs)

  def run(params, batch_stats, x):
    stats.clear()
    paths.clear()
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    with nn.intercept_methods(record):
      model.apply(variables, x, train=False)
    return list(stats)

  return jax.jit(run), paths


def calibrate(model: nn.Module, params: Params, x: jax.Array,
              config: QuantConfig = QuantConfig(), *, batch_stats: Any = None
              ) -> dict[str, float]:
  """Per-tensor activation clip values of the quantized layers on a calibration batch.

  Args:
    model: a linen model.
    params: its float params.
    x: [N, ...] calibration inputs (from the training split, never the test split).
    config: `calibration` chooses max|x| ('minmax') or a percentile of |x|.
    batch_stats: the model's batch-norm statistics, if any.

  Returns:
    {module path: clip value}, one entry per quantized layer in call order; a layer called
    several times gets the largest value.
  """
  try:
    run, paths = _calibration_program(model, config)
  except TypeError:  # an unhashable model (e.g. a list attribute): build it uncached
    run, paths = _calibration_program.__wrapped__(model, config)
  values = run(params, batch_stats, jnp.asarray(x))
  ranges: dict[str, float] = {}
  for path, value in zip(paths, values):
    ranges[path] = max(ranges.get(path, 0.0), float(value))
  if not ranges:
    raise ValueError(f"no Dense or Conv layer of {type(model).__name__} matches "
                     f"layers={config.layers!r}; nothing to quantize.")
  return ranges


# ----------------------------------------------------------------------- PTQ and QAT


def _node(tree: Params, path: str) -> Mapping[str, Any]:
  node = tree
  for key in path.split("/") if path else ():  # '' is a model that is a single layer
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(f"params have no layer {path!r}; were they made by this model?")
    node = node[key]
  return node


def _replace_nodes(tree: Params, paths: Any, fn: Callable[[Mapping, str], dict],
                   prefix: str = "") -> Params:
  """A copy of nested dicts `tree` with the node at each of `paths` replaced by `fn(node, path)`."""
  if prefix in paths:
    return fn(tree, prefix)
  if not isinstance(tree, Mapping):
    return tree
  return {k: _replace_nodes(v, paths, fn, f"{prefix}/{k}" if prefix else str(k))
          for k, v in tree.items()}


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize_kernel(kernel: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  scale = weight_scale(kernel, bits)
  return _codes(kernel, scale, bits).astype(jnp.int8), scale


def quantize_params(params: Params, ranges: Mapping[str, float], config: QuantConfig
                    ) -> Params:
  """Integer params for `QuantizedModel(mode='integer')`.

  Each quantized layer's 'kernel' becomes int8 codes, with 'kernel_scale' [C_out] float32
  and (with act_bits) 'input_scale' [] float32 beside it; other leaves are kept.

  Args:
    params: float params (nested dicts, as linen makes them).
    ranges: `calibrate`'s output: the layers to quantize and their activation clip values.
    config: bit widths.

  Returns:
    A new params tree.
  """
  def quantize(node, path):
    codes, scale = _quantize_kernel(jnp.asarray(node["kernel"]), config.weight_bits)
    new = dict(node, kernel=codes, kernel_scale=scale)
    if config.act_bits:
      new["input_scale"] = activation_scale(ranges[path], config.act_bits)
    return new

  for path in ranges:
    _node(params, path)  # raises, naming the layer, when params lack it
  return _replace_nodes(params, set(ranges), quantize)


def dequantize_params(qparams: Params) -> Params:
  """Float params equal to what the integer model computes with: kernel = codes * scale.

  Drops 'kernel_scale' and 'input_scale'; the result fits the float model (for costs,
  float storage, or further training).
  """
  if not isinstance(qparams, Mapping):
    return qparams
  if "kernel_scale" in qparams:
    node = {k: v for k, v in qparams.items() if k not in ("kernel_scale", "input_scale")}
    node["kernel"] = (jnp.asarray(qparams["kernel"], jnp.float32)
                      * jnp.asarray(qparams["kernel_scale"]))
    return node
  return {k: dequantize_params(v) for k, v in qparams.items()}


def ptq(model: nn.Module, params: Params, calibration_x: jax.Array,
        config: QuantConfig = QuantConfig(), *, batch_stats: Any = None
        ) -> tuple[QuantizedModel, Params]:
  """Post-training quantization: calibrate, quantize the weights, return the int8 model.

  Args:
    model: a linen model.
    params: its trained float params (pruned zeros stay zero).
    calibration_x: [N, ...] calibration inputs from the training split.
    config: bit widths and calibration.
    batch_stats: batch-norm statistics, if any (passed to `apply` as usual afterwards).

  Returns:
    (integer model, integer params): `qmodel.apply({'params': qparams}, x)`.
  """
  ranges = calibrate(model, params, calibration_x, config, batch_stats=batch_stats)
  return (QuantizedModel(model, config, mode="integer"),
          quantize_params(params, ranges, config))


def qat(model: nn.Module, config: QuantConfig = QuantConfig(),
        ranges: Mapping[str, float] | None = None) -> QuantizedModel:
  """The fake-quant model for quantization-aware training (float params, STE gradients).

  Train it with the usual train step and optimizer (a Pruner's masks keep pruned weights
  at zero, and zero weights quantize to zero). Activation ranges stay fixed at `ranges`.

  Args:
    model: a linen model.
    config: bit widths.
    ranges: `calibrate`'s output (required when `config.act_bits` is set).

  Returns:
    A `QuantizedModel` in mode 'fake'.
  """
  return QuantizedModel(model, config, mode="fake",
                        ranges=tuple((k, float(v)) for k, v in (ranges or {}).items()))


def convert(fake_model: QuantizedModel, params: Params) -> tuple[QuantizedModel, Params]:
  """The integer model computing what `fake_model` computes with `params` (QAT -> int8)."""
  if fake_model.mode != "fake":
    raise ValueError(f"convert expects a fake-quant model (mode='fake'); got "
                     f"mode={fake_model.mode!r}.")
  ranges = dict(fake_model.ranges)
  if not ranges:
    raise ValueError("the fake-quant model has no ranges: weight-only models need the "
                     "quantized layers; build it with qat(model, config, calibrate(...)).")
  return (QuantizedModel(fake_model.model, fake_model.config, mode="integer"),
          quantize_params(params, ranges, fake_model.config))
