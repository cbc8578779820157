// Direct convolution kernels for XLA:CPU, called through XLA's FFI (see direct.py).
//
// The weight gradient of a convolution, NHWC activations, HWIO kernel, strides (sh, sw):
//   dk[i, j, c, o] = sum_{b, y, x} x[b, sh y + i - lo_h, sw x + j - lo_w, c] * g[b, y, x, o]
// (taps outside x are zero padding). Each unit of work is one tap (i, j), a block of up
// to 16 input channels and 16 output channels: 16 x 16 sums kept in 16 vector registers
// over a fixed range of images, one image at a time so that the image's x and g stay in
// L2 while every unit of a thread reads them. Each unit's sums are added in one fixed
// order, so the result does not depend on the number of threads.
//
// Vectors are GCC/Clang vector extensions: the compiler maps a 16-float vector to one
// AVX-512 register, two AVX registers or four SSE registers (-march=native).

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
// The weight gradient sums the batch in this many fixed ranges of images (see WeightGrad).
constexpr int64_t kBatchChunks = 4;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

struct Shape {
  int64_t batch, h, w, c;  // x
  int64_t ho, wo, o;       // g
  int64_t kh, kw, sh, sw, lo_h, lo_w;
};

// The first and one past the last output position whose tap at offset `tap - lo` falls
// inside an input of `size`: stride * y + tap - lo in [0, size).
inline std::pair<int64_t, int64_t> Inside(int64_t size, int64_t out, int64_t stride,
                                          int64_t tap, int64_t lo) {
  const int64_t first = std::max<int64_t>(0, (lo - tap + stride - 1) / stride);
  const int64_t top = size - 1 + lo - tap;  // largest stride * y
  const int64_t last = top < 0 ? 0 : std::min<int64_t>(out, top / stride + 1);
  return {first, std::max(first, last)};
}

// Adds image b's contribution to the unit (tap i, j; channels c0 .. c0 + R; outputs
// o0 .. o0 + 16) of dk: R registers of 16 sums, loaded from dk and stored back.
template <int R>
void AddImage(const float* x, const float* g, float* dk, const Shape& s, int64_t b,
              int64_t i, int64_t j, int64_t c0, int64_t o0) {
  float* out = dk + ((i * s.kw + j) * s.c + c0) * s.o + o0;
  Vec acc[R];
  for (int r = 0; r < R; ++r) std::memcpy(&acc[r], out + r * s.o, sizeof(Vec));
  // The output rows and columns whose tap (i, j) falls inside x.
  const auto [y0, y1] = Inside(s.h, s.ho, s.sh, i, s.lo_h);
  const auto [x0, x1] = Inside(s.w, s.wo, s.sw, j, s.lo_w);
  for (int64_t y = y0; y < y1; ++y) {
    const float* g_row = g + ((b * s.ho + y) * s.wo) * s.o + o0;
    const float* x_row = x + ((b * s.h + s.sh * y + i - s.lo_h) * s.w + j - s.lo_w) * s.c + c0;
    for (int64_t col = x0; col < x1; ++col) {
      Vec gv;
      std::memcpy(&gv, g_row + col * s.o, sizeof(Vec));
      const float* xv = x_row + s.sw * col * s.c;
      for (int r = 0; r < R; ++r) acc[r] += xv[r] * gv;
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(out + r * s.o, &acc[r], sizeof(Vec));
}

using AddImageFn = void (*)(const float*, const float*, float*, const Shape&, int64_t,
                            int64_t, int64_t, int64_t, int64_t);

template <int... R>
constexpr auto MakeTable(std::integer_sequence<int, R...>) {
  return std::array<AddImageFn, sizeof...(R)>{&AddImage<R + 1>...};
}
// kAddImage[r - 1] handles a block of r input channels.
constexpr auto kAddImage = MakeTable(std::make_integer_sequence<int, kLanes>{});

// Unit u of the weight gradient: tap (i, j), input channels c0 .. c0 + rows, outputs
// o0 .. o0 + 16.
struct Unit {
  Unit(const Shape& s, int64_t u) {
    const int64_t c_blocks = (s.c + kLanes - 1) / kLanes, o_blocks = s.o / kLanes;
    const int64_t tap = u / (c_blocks * o_blocks);
    i = tap / s.kw;
    j = tap % s.kw;
    c0 = u / o_blocks % c_blocks * kLanes;
    o0 = u % o_blocks * kLanes;
    rows = std::min(kLanes, s.c - c0);
  }
  int64_t i, j, c0, o0, rows;
};

// Units [first, last) of one (x, g, dk) triple over images [b0, b1), image by image.
void WeightGradUnits(const float* x, const float* g, float* dk, const Shape& s,
                     int64_t first, int64_t last, int64_t b0, int64_t b1) {
  for (int64_t u = first; u < last; ++u) {  // zero this unit's slice of dk
    const Unit unit(s, u);
    float* out = dk + ((unit.i * s.kw + unit.j) * s.c + unit.c0) * s.o + unit.o0;
    for (int64_t r = 0; r < unit.rows; ++r) std::memset(out + r * s.o, 0, sizeof(Vec));
  }
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t u = first; u < last; ++u) {
      const Unit unit(s, u);
      kAddImage[unit.rows - 1](x, g, dk, s, b, unit.i, unit.j, unit.c0, unit.o0);
    }
  }
}

// Calls batched by vmap (vmap_method="expand_dims") carry leading axes: the result's are
// the batch, each operand's are the result's or 1 (an operand shared by the batch).
bool LeadingMatch(ffi::Span<const int64_t> operand, ffi::Span<const int64_t> result,
                  size_t rank) {
  for (size_t a = 0; a < rank; ++a) {
    if (operand[a] != 1 && operand[a] != result[a]) return false;
  }
  return true;
}

// Offset in elements of the operand's block for the result's block l (row-major over the
// leading axes), with `block` elements in each block.
int64_t LeadingOffset(ffi::Span<const int64_t> operand, ffi::Span<const int64_t> result,
                      size_t rank, int64_t block, int64_t l) {
  int64_t offset = 0, stride = block;
  for (size_t a = rank; a-- > 0;) {
    const int64_t index = l % result[a];
    l /= result[a];
    if (operand[a] != 1) offset += index * stride;
    stride *= operand[a];
  }
  return offset;
}

// Runs fn(part) for part in [0, parts) on the caller and the pool's threads.
// Parts are claimed from a shared counter, so the caller never waits on a part that no
// thread has started: no deadlock when every pool thread is inside such a call.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t parts, Fn fn) {
  struct State {
    explicit State(int64_t n, Fn f) : parts(n), fn(std::move(f)) {}
    const int64_t parts;
    Fn fn;
    std::atomic<int64_t> next{0}, done{0};
  };
  if (parts <= 1) {
    if (parts == 1) fn(0);
    return;
  }
  auto state = std::make_shared<State>(parts, std::move(fn));
  auto work = [state] {
    for (int64_t p; (p = state->next.fetch_add(1)) < state->parts;) {
      state->fn(p);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  // A task per part beyond the caller's, not one per other thread: each claims parts
  // until none is left, so surplus tasks return at once; but a single task often did not
  // wake an idle worker in time (ResNet-20's 16->16 forward, separate calls on two cores:
  // 7.0 ms with one task, 3.7-4.4 with one per part).
  for (int64_t t = 1; t < parts; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

ffi::Error WeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                      ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dk,
                      int64_t sh, int64_t sw, int64_t lo_h, int64_t lo_w, bool threaded) {
  // x [..., B, H, W, C], g [..., B, H', W', O], dk [..., kh, kw, C, O].
  const auto xd = x.dimensions(), gd = g.dimensions(), kd = dk->dimensions();
  const size_t n = kd.size(), lead = n - 4;
  if (n < 4 || xd.size() != n || gd.size() != n || !LeadingMatch(xd, kd, lead) ||
      !LeadingMatch(gd, kd, lead)) {
    return ffi::Error::InvalidArgument("weight_grad: x, g and dk need the same rank >= 4");
  }
  const Shape s{xd[n - 4], xd[n - 3], xd[n - 2], xd[n - 1], gd[n - 3], gd[n - 2], gd[n - 1],
                kd[n - 4], kd[n - 3], sh, sw, lo_h, lo_w};
  if (s.o % kLanes != 0 || gd[n - 4] != s.batch || kd[n - 2] != s.c || kd[n - 1] != s.o) {
    return ffi::Error::InvalidArgument("weight_grad: shapes do not match (C_out % 16 == 0)");
  }
  const int64_t x_size = s.batch * s.h * s.w * s.c, g_size = s.batch * s.ho * s.wo * s.o;
  const int64_t k_size = s.kh * s.kw * s.c * s.o;
  const int64_t units = s.kh * s.kw * ((s.c + kLanes - 1) / kLanes) * (s.o / kLanes);
  // Each part: a contiguous range of one batch element's units over one of `chunks`
  // fixed ranges of images, whose sums it writes to the chunk's own copy of dk (the
  // first chunk's is dk); the copies are then added in chunk order. Parts come in
  // several per thread, so a worker that starts late still takes its share, and the sums
  // do not depend on the thread count.
  const int64_t chunks = std::clamp<int64_t>(s.batch, 1, kBatchChunks);
  const int64_t split = threaded ? std::clamp<int64_t>(pool.num_threads(), 1, units) : 1;
  const int64_t blocks = k_size ? dk->element_count() / k_size : 0;
  std::unique_ptr<float[]> partial(new float[blocks * (chunks - 1) * k_size]);
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  float* kp = dk->typed_data();
  float* pp = partial.get();
  auto part = [=](int64_t p) {
    const int64_t l = p / (split * chunks), q = p / chunks % split, chunk = p % chunks;
    float* out = chunk == 0 ? kp + l * k_size : pp + (l * (chunks - 1) + chunk - 1) * k_size;
    WeightGradUnits(xp + LeadingOffset(xd, kd, lead, x_size, l),
                    gp + LeadingOffset(gd, kd, lead, g_size, l), out, s,
                    units * q / split, units * (q + 1) / split, s.batch * chunk / chunks,
                    s.batch * (chunk + 1) / chunks);
  };
  ParallelFor(pool, blocks * split * chunks, part);
  for (int64_t l = 0; l < blocks; ++l) {
    for (int64_t chunk = 1; chunk < chunks; ++chunk) {
      const float* add = pp + (l * (chunks - 1) + chunk - 1) * k_size;
      float* out = kp + l * k_size;
      for (int64_t e = 0; e < k_size; ++e) out[e] += add[e];
    }
  }
  return ffi::Error::Success();
}


// The forward pass of a stride-1 convolution (and, on g with the flipped kernel, its input
// gradient): y[b, y, x, o] = sum_{i, j, c} x[b, y + i - lo_h, x + j - lo_w, c] k[i, j, c, o].
// Each image is first copied into a zero-padded scratch laid out [H'+ kh - 1][C][W' + kw - 1]
// (channels major within a row), so that one channel of a tile's P neighbouring pixels is
// contiguous; a tile keeps P pixels x V vectors of 16 outputs in registers.
template <int P, int V>
void ForwardTile(const float* pad, int64_t c_in, int64_t wp, const float* k, int64_t kh,
                 int64_t kw, int64_t o, float* y) {
  Vec acc[P][V] = {};
  // Channels innermost: consecutive steps read different rows, so each product broadcasts
  // its input straight from memory (with taps innermost, GCC shuffled values between steps).
  for (int64_t i = 0; i < kh; ++i) {
    for (int64_t j = 0; j < kw; ++j) {
      const float* taps = k + (i * kw + j) * c_in * o;
      for (int64_t c = 0; c < c_in; ++c) {
        const float* row = pad + (i * c_in + c) * wp + j;
        Vec kv[V];
        for (int v = 0; v < V; ++v) std::memcpy(&kv[v], taps + c * o + kLanes * v, sizeof(Vec));
        for (int p = 0; p < P; ++p) {
          for (int v = 0; v < V; ++v) acc[p][v] += row[p] * kv[v];
        }
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    for (int v = 0; v < V; ++v) std::memcpy(y + p * o + kLanes * v, &acc[p][v], sizeof(Vec));
  }
}

using ForwardTileFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t,
                               int64_t, int64_t, float*);

template <int V, int... P>
constexpr auto MakeForwardTable(std::integer_sequence<int, P...>) {
  return std::array<ForwardTileFn, sizeof...(P)>{&ForwardTile<P + 1, V>...};
}
// Tiles of 1 .. 16 pixels by one vector and 1 .. 8 by two: 16 accumulators at the widest.
constexpr auto kForward1 = MakeForwardTable<1>(std::make_integer_sequence<int, 16>{});
constexpr auto kForward2 = MakeForwardTable<2>(std::make_integer_sequence<int, 8>{});

// Images [first, last) of one (x, k, y) triple.
void ForwardImages(const float* x, const float* k, float* y, const Shape& s, int64_t first,
                   int64_t last) {
  const int64_t hp = s.ho + s.kh - 1, wp = s.wo + s.kw - 1;
  // Two vectors of outputs by 8 pixels where the outputs allow (64->64 at 8x8, one core:
  // 5.8 ms against 6.0 for one by 16 and 7.0 for four by 4), else one by 16.
  const int vectors = s.o % (2 * kLanes) == 0 ? 2 : 1;
  const ForwardTileFn* table = vectors == 2 ? kForward2.data() : kForward1.data();
  const int64_t widest = vectors == 2 ? 8 : 16;
  std::unique_ptr<float[]> pad(new float[hp * s.c * wp]);
  for (int64_t b = first; b < last; ++b) {
    std::fill(pad.get(), pad.get() + hp * s.c * wp, 0.0f);
    for (int64_t r = std::max<int64_t>(0, -s.lo_h); r < std::min(s.h, hp - s.lo_h); ++r) {
      const int64_t c0 = std::max<int64_t>(0, -s.lo_w), c1 = std::min(s.w, wp - s.lo_w);
      const float* src = x + (b * s.h + r) * s.w * s.c;
      float* dst = pad.get() + (r + s.lo_h) * s.c * wp + s.lo_w;
      for (int64_t col = c0; col < c1; ++col) {
        for (int64_t c = 0; c < s.c; ++c) dst[c * wp + col] = src[col * s.c + c];
      }
    }
    for (int64_t row = 0; row < s.ho; ++row) {
      float* out = y + (b * s.ho + row) * s.wo * s.o;
      const float* rows = pad.get() + row * s.c * wp;
      for (int64_t o0 = 0; o0 < s.o; o0 += vectors * kLanes) {
        for (int64_t col = 0; col < s.wo; col += widest) {
          const int64_t tile = std::min(widest, s.wo - col);
          table[tile - 1](rows + col, s.c, wp, k + o0, s.kh, s.kw, s.o,
                          out + col * s.o + o0);
        }
      }
    }
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y, int64_t lo_h, int64_t lo_w, bool threaded) {
  // x [..., B, H, W, C], k [..., kh, kw, C, O], y [..., B, H', W', O].
  const auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  const size_t n = yd.size(), lead = n - 4;
  if (n < 4 || xd.size() != n || kd.size() != n || !LeadingMatch(xd, yd, lead) ||
      !LeadingMatch(kd, yd, lead)) {
    return ffi::Error::InvalidArgument("forward: x, k and y need the same rank >= 4");
  }
  const Shape s{xd[n - 4], xd[n - 3], xd[n - 2], xd[n - 1], yd[n - 3], yd[n - 2], yd[n - 1],
                kd[n - 4], kd[n - 3], 1, 1, lo_h, lo_w};
  if (s.o % kLanes != 0 || yd[n - 4] != s.batch || kd[n - 2] != s.c || kd[n - 1] != s.o) {
    return ffi::Error::InvalidArgument("forward: shapes do not match (C_out % 16 == 0)");
  }
  const int64_t x_size = s.batch * s.h * s.w * s.c, y_size = s.batch * s.ho * s.wo * s.o;
  const int64_t k_size = s.kh * s.kw * s.c * s.o;
  // Each part: a contiguous range of one batch element's images, 8 parts per thread: when
  // a worker starts late (after idling), the others take its share part by part instead
  // of all or nothing (ResNet-20's 16->16 forward, two cores, separate calls alternating
  // with PyTorch's: 5.6 -> 3.7 ms).
  const int64_t split = threaded ? std::clamp<int64_t>(8 * pool.num_threads(), 1, s.batch) : 1;
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  float* yp = y->typed_data();
  auto part = [=](int64_t p) {
    const int64_t l = p / split, q = p % split;
    ForwardImages(xp + LeadingOffset(xd, yd, lead, x_size, l),
                  kp + LeadingOffset(kd, yd, lead, k_size, l), yp + l * y_size, s,
                  s.batch * q / split, s.batch * (q + 1) / split);
  };
  ParallelFor(pool, (y_size ? y->element_count() / y_size : 0) * split, part);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EvopruneConvWeightGrad, WeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("lo_h")
                                  .Attr<int64_t>("lo_w")
                                  .Attr<bool>("threaded"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EvopruneConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("lo_h")
                                  .Attr<int64_t>("lo_w")
                                  .Attr<bool>("threaded"));
