"""Convolution, max pooling and batch norm with fast XLA:CPU formulations, selected by backend.

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (the zoo passes it to
`flax.linen.Conv(conv_general_dilated=...)`) and `max_pool` one for `flax.linen.max_pool`.
Under `impl="auto"` (what the models use) each call stages both versions with
`lax.platform_dependent`: the CPU formulation where the program is compiled for CPU, the
plain XLA op everywhere else (GPU/TPU keep exactly the code they had), resolved when the
program is lowered, so the compiler never sees a conditional. Values and gradients equal
the plain ops' to float rounding (tests/ops_test.py).

Why: on XLA:CPU (jax 0.10) the training step of a small CNN spent most of its time in a
few pathological kernels. Measured on one core of the 2-core machine, batch 128, ms, the
plain XLA op -> this module:

  depthwise 3x3, 32 ch at 32x32      forward 270 -> 4, input grad 250 -> 3, weight grad 150 -> 30
  1x1 conv 32->64 at 32x32           weight gradient 175 -> 19
  3x3 conv 3->32 (RGB) at 32x32      forward 27 -> 11, weight gradient 37 -> 12
  3x3 conv 32->64 at 15x15           weight gradient 69 -> 28
  2x2 max pool, 128x30x30x32         forward 3.1 -> 0.7, forward + backward 139 -> 11

Whole train steps (same machine, one core, the same network in PyTorch 2.13 eager = 1):
thesis CNN 2.6 -> 1.2-1.4, LeNet-5 2.8 -> 1.6-2.3, ResNet-20 2.0 -> 1.7, MobileNet
5.8 -> 1.3 (see the README's performance section for the benchmark). The stride-1 weight
gradient as a canonical convolution then took train steps (2-core AMD EPYC, two cores,
same process) to 0.73 (ResNet-20), 0.74 (LeNet-5), 0.80 (thesis CNN) of the im2col
version; MobileNet (one dense convolution) 0.99. Few-channel convolutions on the
space-to-depth input (forward, input and weight gradients, below): LeNet-5 0.78 of the
RGB-only version.

The formulations:
  - dense convolutions with float32 operands and a multiple of 16 output channels run in
    evoprune's C++ kernels, called through XLA's FFI (`direct`; built on first use with
    the system's C++ compiler): every weight gradient (each tap's sums kept in registers
    over the batch) and the stride-1 forward passes and input gradients (tiles of
    pixels by output channels in registers, over a channel-major padded copy of each
    image), split over XLA's threads. One core, ms, XLA form -> kernel: ResNet-20's
    first-stage weight gradient 15.7 -> 5.2, forward 11.0 -> 7.1; train step 0.74 of the
    XLA forms (same process, two cores). Without a compiler, or with
    `EVOPRUNE_KERNELS=0`, the XLA forms below run instead;
  - dense k x k convolutions keep XLA's forward and input-gradient convolutions (they go
    to YNNPACK or Eigen) and, with stride 1, state the weight gradient as a forward
    convolution in canonical layout (batch as the contracted feature axis), which Eigen
    runs without patches where XLA's own form runs as a naive loop inside `lax.scan`
    (`_weight_grad_as_conv`); in training, the layer input is computed into its own buffer
    (`_materialized`), read by the forward pass's padded copies and the backward pass,
    instead of recomputing batch norm, ReLU and residual sums in each of them
    (`materialize` does the same for a model's values with several consumers);
    Strided convolutions compute the weight gradient as im2col matmuls summed over
    small batch chunks with `lax.scan`, each chunk's patch matrix built channel-major
    (cheap block copies) while it stays in cache, the input laid out once as padded
    channel-major chunks before the loop, and the input gradient as one stride-1
    convolution of g that computes every phase of the stride at once (a sub-kernel per
    phase, the results interleaved back), where XLA convolves g dilated by the stride,
    zeros included, outside Eigen (ResNet-20 step 0.96). Stride-1 convolutions (forward
    and input gradient) with few channels (fewer than 8 out, or fewer than 8 in and at most 16
    out) run on the 2x2 space-to-depth rearrangement of their input, 4x the channels
    both ways, where Eigen's kernels run at a few GFLOP/s with fewer than 8; so do
    weight gradients with fewer than 8 output channels. The other stride-1 convolutions
    with at most 16 channels on both sides (ResNet-20's first stage) run on pixel pairs
    along the width, 2x the channels for 4/3 the multiply-adds of a 3x3 kernel, where
    Eigen ran at half its 32-channel rate (ResNet-20 step 0.925 on an AVX-512 EPYC).
    Input gradients of stride-1 convolutions with fewer than 4 input channels, or fewer
    than 8 in and at least 16 out, are that form's transpose written out: one matmul of
    the output gradient's squares with all taps of the rearranged kernel, then each tap's
    product added in at its offset (col2im on squares), read by the layer below from its
    own buffer; as a convolution of the zero-padded output gradient they multiply the
    padding too (LeNet-5's 6->16 5x5 input gradient 5.1 -> 2.6 ms, train step 0.93). Strided
    convolutions of RGB inputs run as chunked im2col matmuls;
  - 1x1 convolutions are matmuls, the weight gradient again summed over batch chunks;
  - depthwise convolutions are sums of kh*kw shifted, channel-scaled views of the input
    (one loop fusion), their weight gradient per-tap reductions over batch chunks;
  - max pooling with window == strides and VALID padding is an elementwise maximum of
    the strided window views; its gradient goes to the first maximum of each window in
    row-major order, exactly as XLA's select-and-scatter does, so ties are broken alike,
    written by one compare-and-select against that position, stored as int8;
  - training-mode batch norm (`batch_norm`, optionally fused with ReLU) has its gradient
    written out: two reductions and one elementwise pass over x, which autodiff of flax's
    arithmetic spread over four reductions and a stored x - mean.

Tried and dropped (slower in the whole step): col2im input gradients in pixels (6 channels
minor: the shifted sums alone took 4 ms for LeNet-5's conv2), im2col forward for
all convolutions, padding channels so XLA picks YNNPACK, chunked XLA convolutions, strided
weight gradients as convolutions with a kernel dilated by the stride, materialising the
output gradient too, im2col input gradients with few channels on one core (space-to-depth
is faster on one core and on two: 16->6 5x5 at 14x14, 9.9 -> 6.9 ms on one core), a
stride-1 weight gradient with the images stacked along the height (one transpose instead of
two; ResNet-20 step 1.08x slower), weight gradients split over batch halves or quarters,
the max-pool gradient as one fusion interleaving the window positions (and as a sum of
interior-padded masked copies, the version before the stored positions).

`describe()` names the implementation `auto` uses on the default backend. Setting the
environment variable `EVOPRUNE_OPS=xla` before tracing turns the CPU formulations off
(every call then stages the plain XLA op), e.g. to compare against them, and
`EVOPRUNE_OPS=cpu` stages them on every backend, e.g. to time them on a GPU; `use('xla')`
and `use('cpu')` do the same for what is traced inside them (`cost` counts MACs under
`use('xla')`), and `mode()` says which is in effect. The choice is made when a function is
traced; `jit` binds it, with `compiler_options()`, to the program it makes (the training
and evaluation programs are made so).

Modules: `backend` (which implementation is staged, compiler options, `materialize`),
`convolution` (the public convolutions and the dense formulation), `direct` (the C++
kernels: build, cache, FFI calls), `space_to_depth`
(few-channel stride-1 convolutions on 2x2 squares), `separable` (pointwise and depthwise),
`patches` (output sizes, shifted views, im2col, batch chunks), `pooling` and
`normalization`.
"""

from evoprune.ops.backend import IMPLEMENTATIONS
from evoprune.ops.backend import compiler_options
from evoprune.ops.backend import describe
from evoprune.ops.backend import materialize
from evoprune.ops.backend import jit
from evoprune.ops.backend import mode
from evoprune.ops.backend import use
from evoprune.ops.convolution import conv
from evoprune.ops.convolution import conv_general_dilated
from evoprune.ops.normalization import batch_norm
from evoprune.ops.pooling import max_pool

__all__ = ["IMPLEMENTATIONS", "batch_norm", "compiler_options", "conv", "conv_general_dilated",
           "describe", "jit", "materialize", "max_pool", "mode", "use"]
