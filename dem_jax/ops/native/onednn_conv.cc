// 2-D convolution (NHWC activations, HWIO kernel), its two gradients and an inference form with a bias, residual
// and ReLU folded in, as XLA FFI handlers on oneDNN; max-pooling over NHWC with its gradient and per-channel sums
// as plain loops.
//
// dem_jax/ops/onednn.py compiles this file against jaxlib's FFI headers and the oneDNN wheel, registers the handlers
// below as CPU custom-call targets and wraps them (the convolution in a differentiable `conv2d_onednn`). Every
// convolution handler takes the attributes stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right; the
// inference ones also relu (0 or 1).
//
//   DemOnednnConvForward(x[N,H,W,C], kernel[KH,KW,C,O]) -> y[N,OH,OW,O]
//   DemOnednnConvBackwardData(dy[N,OH,OW,O], kernel) -> dx[N,H,W,C]
//   DemOnednnConvBackwardWeights(x, dy) -> dkernel[KH,KW,C,O]
//   DemOnednnConvBias(x, kernel, bias[O]) -> y                 inference: conv + bias, then max(., 0) if relu != 0
//   DemOnednnConvBiasAdd(x, kernel, bias, residual[N,OH,OW,O]) -> y    the same with the residual added before it
//   DemMaxPoolForward(x[N,H,W,C]) -> y[N,OH,OW,C]            attributes: window, stride, pad
//   DemMaxPoolBackward(x, y, dy[N,OH,OW,C]) -> dx[N,H,W,C]
//   DemChannelSums(a[..., C], b[..., C]) -> sums[2, C]          float32: sum(a) and sum(a * b) over all but C
//   DemMaskedChannelSums(a, b, mask) -> sums[2, C]              the same where mask > 0
//
// Activations are float32 or bfloat16 (x, y, dy and dx share one type); the kernel and its gradient are float32,
// or bfloat16 with bfloat16 activations. oneDNN accumulates in float32 either way, so a float32 kernel with
// bfloat16 activations gets its gradient summed over the whole batch in float32, never rounded to bfloat16.
//
// Activations stay in XLA's row-major NHWC buffers (oneDNN reads and writes them in place); only the kernel is
// reordered into the blocked layout (and type) oneDNN's primitive asks for. Primitives are built once per geometry
// and type, and cached.
// One convolution runs at a time: each already spreads over every core through OpenMP, and XLA may call two
// handlers at once from its own threads, which would oversubscribe the cores.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using Type = memory::data_type;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

std::mutex& ExecutionMutex() {
  static std::mutex mutex;
  return mutex;
}

struct Geometry {
  int64_t n, h, w, c, o, kh, kw, oh, ow;
  int64_t stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right;
  Type activations, kernel;

  auto Key() const {
    return std::make_tuple(n, h, w, c, o, kh, kw, oh, ow, stride_h, stride_w, pad_top, pad_bottom, pad_left,
                           pad_right, activations, kernel);
  }
};

// Primitives are built to take a scratchpad with each execution (`Scratchpad`) instead of oneDNN's global, per-thread
// one: with that, the im2col-and-GEMM kernel gradients oneDNN 3.2 picks below AVX-512 for maps of a position or two
// wrote through a null buffer when XLA's threads called them (tests/test_onednn.py keeps that case covered).
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// A scratchpad of the size `pd` asks for, for one execution.
template <typename PrimitiveDesc>
memory Scratchpad(const PrimitiveDesc& pd) {
  return memory(pd.scratchpad_desc(), Engine());
}

struct Primitives {
  memory::desc user_weights;  // HWIO, as the kernel lives in XLA
  memory::desc user_src, user_dst;  // NHWC, as activations live in XLA
  dnnl::convolution_forward::primitive_desc forward_pd;
  dnnl::convolution_forward forward;
  dnnl::convolution_backward_data::primitive_desc backward_data_pd;
  dnnl::convolution_backward_data backward_data;
  dnnl::convolution_backward_weights::primitive_desc backward_weights_pd;
  dnnl::convolution_backward_weights backward_weights;
};

const Primitives& GetPrimitives(const Geometry& g) {
  static std::mutex mutex;
  static std::map<decltype(g.Key()), std::unique_ptr<Primitives>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  std::unique_ptr<Primitives>& slot = cache[g.Key()];
  if (slot) return *slot;
  const memory::desc src({g.n, g.c, g.h, g.w}, g.activations, Tag::nhwc);
  const memory::desc dst({g.n, g.o, g.oh, g.ow}, g.activations, Tag::nhwc);
  // The forward pass and the input gradient read the kernel in the activations' type; the kernel gradient is
  // written in the kernel's own type (float32 for a float32 kernel, so nothing is lost in the batch sum).
  const memory::desc any_weights({g.o, g.c, g.kh, g.kw}, g.activations, Tag::any);
  const memory::desc any_diff_weights({g.o, g.c, g.kh, g.kw}, g.kernel, Tag::any);
  const memory::dims strides = {g.stride_h, g.stride_w};
  const memory::dims pad_before = {g.pad_top, g.pad_left};
  const memory::dims pad_after = {g.pad_bottom, g.pad_right};
  const dnnl::primitive_attr attr = UserScratchpad();
  auto p = std::make_unique<Primitives>();
  p->user_weights = memory::desc({g.o, g.c, g.kh, g.kw}, g.kernel, Tag::hwio);
  p->forward_pd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src, any_weights, dst,
      strides, pad_before, pad_after, attr);
  p->forward = dnnl::convolution_forward(p->forward_pd);
  p->backward_data_pd = dnnl::convolution_backward_data::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, src, any_weights, dst, strides, pad_before, pad_after,
      p->forward_pd, attr);
  p->backward_data = dnnl::convolution_backward_data(p->backward_data_pd);
  p->user_src = src;
  p->user_dst = dst;
  p->backward_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, src, any_diff_weights, dst, strides, pad_before, pad_after,
      p->forward_pd, attr);
  const bool strided = g.stride_h > 1 || g.stride_w > 1;
  if (g.activations == Type::bf16 && strided && g.c > 1 &&
      std::string(p->backward_weights_pd.impl_info_str()).rfind("brg", 0) != 0) {
    // Without a brgemm kernel for it, oneDNN's bfloat16 kernel gradient of a strided layer reads NHWC activations
    // 10-50x slower than its blocked layout; reordering both activations into that layout costs far less. (Not
    // for the one-channel stem, whose NHWC kernel is the faster.)
    const memory::desc any_src({g.n, g.c, g.h, g.w}, g.activations, Tag::any);
    const memory::desc any_dst({g.n, g.o, g.oh, g.ow}, g.activations, Tag::any);
    p->backward_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, any_src, any_diff_weights, any_dst, strides, pad_before,
        pad_after, p->forward_pd, attr);
  }
  p->backward_weights = dnnl::convolution_backward_weights(p->backward_weights_pd);
  slot = std::move(p);
  return *slot;
}

// oneDNN's name for an XLA element type this file handles, or undef.
Type OnednnType(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32: return Type::f32;
    case ffi::DataType::BF16: return Type::bf16;
    default: return Type::undef;
  }
}

// x, kernel and y buffers in XLA's terms (x and y may be gradients); checks that they describe one convolution in
// types this file handles.
ffi::ErrorOr<Geometry> MakeGeometry(const ffi::AnyBuffer& x_buffer, const ffi::AnyBuffer& kernel_buffer,
                                    const ffi::AnyBuffer& y_buffer, int64_t stride_h, int64_t stride_w,
                                    int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  const auto x = x_buffer.dimensions(), kernel = kernel_buffer.dimensions(), y = y_buffer.dimensions();
  if (x.size() != 4 || kernel.size() != 4 || y.size() != 4) {
    return ffi::Error::InvalidArgument("onednn_conv: expected rank-4 NHWC activations and an HWIO kernel");
  }
  const Type activations = OnednnType(x_buffer.element_type()), kernel_type = OnednnType(kernel_buffer.element_type());
  const bool types_ok = activations != Type::undef && kernel_type != Type::undef &&
                        y_buffer.element_type() == x_buffer.element_type() &&
                        (kernel_type == Type::f32 || kernel_type == activations);
  if (!types_ok) {
    return ffi::Error::InvalidArgument(
        "onednn_conv: activations must be float32 or bfloat16 (input and output alike), the kernel float32 or "
        "the activations' type");
  }
  Geometry g{x[0], x[1], x[2], x[3], kernel[3], kernel[0], kernel[1], y[1], y[2],
             stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, activations, kernel_type};
  const bool consistent = kernel[2] == g.c && y[0] == g.n && y[3] == g.o && stride_h > 0 && stride_w > 0 &&
                          g.oh == (g.h + pad_top + pad_bottom - g.kh) / stride_h + 1 &&
                          g.ow == (g.w + pad_left + pad_right - g.kw) / stride_w + 1;
  if (!consistent) {
    return ffi::Error::InvalidArgument("onednn_conv: input, kernel and output shapes do not match one convolution");
  }
  return g;
}

// The buffer `data` laid out as `have`, in the layout `want`: the buffer itself, or a reordered copy.
memory As(const memory::desc& want, const memory::desc& have, void* data, dnnl::stream& stream) {
  memory user(have, Engine(), data);
  if (want == have) return user;
  memory blocked(want, Engine());
  dnnl::reorder(user, blocked).execute(stream, user, blocked);
  return blocked;
}

// Runs `body(primitives, stream)` for one convolution under the execution lock, with the primitives `get` builds
// (or finds cached) for its geometry; oneDNN errors become FFI errors.
template <typename Body, typename Get = decltype(&GetPrimitives)>
ffi::Error Execute(ffi::ErrorOr<Geometry> g, Body body, Get get = &GetPrimitives) {
  if (g.has_error()) return g.error();
  try {
    const auto& p = get(*g);
    std::lock_guard<std::mutex> lock(ExecutionMutex());
    dnnl::stream stream(Engine());
    body(p, stream);
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_conv: oneDNN failed: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> y, int64_t stride_h,
                   int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  auto g = MakeGeometry(x, kernel, *y, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right);
  return Execute(g, [&](const Primitives& p, dnnl::stream& stream) {
    memory src(p.forward_pd.src_desc(), Engine(), x.untyped_data());
    memory dst(p.forward_pd.dst_desc(), Engine(), y->untyped_data());
    memory weights = As(p.forward_pd.weights_desc(), p.user_weights, kernel.untyped_data(), stream);
    p.forward.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst},
                              {DNNL_ARG_SCRATCHPAD, Scratchpad(p.forward_pd)}});
  });
}

ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> dx, int64_t stride_h,
                        int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  auto g = MakeGeometry(*dx, kernel, dy, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right);
  return Execute(g, [&](const Primitives& p, dnnl::stream& stream) {
    memory diff_dst(p.backward_data_pd.diff_dst_desc(), Engine(), dy.untyped_data());
    memory diff_src(p.backward_data_pd.diff_src_desc(), Engine(), dx->untyped_data());
    memory weights = As(p.backward_data_pd.weights_desc(), p.user_weights, kernel.untyped_data(), stream);
    p.backward_data.execute(
        stream, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DIFF_SRC, diff_src},
                 {DNNL_ARG_SCRATCHPAD, Scratchpad(p.backward_data_pd)}});
  });
}

ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dkernel,
                           int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                           int64_t pad_right) {
  auto g = MakeGeometry(x, *dkernel, dy, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right);
  return Execute(g, [&](const Primitives& p, dnnl::stream& stream) {
    memory src = As(p.backward_weights_pd.src_desc(), p.user_src, x.untyped_data(), stream);
    memory diff_dst = As(p.backward_weights_pd.diff_dst_desc(), p.user_dst, dy.untyped_data(), stream);
    memory user(p.user_weights, Engine(), dkernel->untyped_data());
    const memory::desc want = p.backward_weights_pd.diff_weights_desc();
    memory diff_weights = want == p.user_weights ? user : memory(want, Engine());
    p.backward_weights.execute(
        stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, diff_weights},
                 {DNNL_ARG_SCRATCHPAD, Scratchpad(p.backward_weights_pd)}});
    if (!(want == p.user_weights)) dnnl::reorder(diff_weights, user).execute(stream, diff_weights, user);
  });
}

// Max-pooling. XLA:CPU's pooling gradient (and even a gradient written as maxima of strided slices) makes several
// passes over the largest activation of the network, the stem's; these loops make one pass forward and two back.
// Channels are innermost (NHWC), so every loop over them runs over contiguous memory.

struct PoolGeometry {
  int64_t n, h, w, c, oh, ow, window, stride, pad;
};

[[gnu::always_inline]] inline float Load(const float* p, int64_t i) { return p[i]; }
[[gnu::always_inline]] inline float Load(const uint16_t* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
[[gnu::always_inline]] inline void Store(float* p, int64_t i, float value) { p[i] = value; }
// To bfloat16, rounding to nearest even.
[[gnu::always_inline]] inline void Store(uint16_t* p, int64_t i, float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  p[i] = std::isnan(value) ? 0x7fc0 : static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// The window positions of output row (or column) o that fall inside the input's `size` rows: [first, last).
std::pair<int64_t, int64_t> Taps(int64_t o, const PoolGeometry& g, int64_t size) {
  const int64_t start = o * g.stride - g.pad;
  return {std::max<int64_t>(start, 0), std::min<int64_t>(start + g.window, size)};
}

template <typename T>
[[gnu::always_inline]] inline void MaxPoolForward(const T* x, T* y, const PoolGeometry& g) {
#pragma omp parallel for collapse(2)
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t i = 0; i < g.oh; ++i) {
      std::vector<float> best(g.c);
      const auto [h0, h1] = Taps(i, g, g.h);
      for (int64_t j = 0; j < g.ow; ++j) {
        const auto [w0, w1] = Taps(j, g, g.w);
        std::fill(best.begin(), best.end(), -INFINITY);
        for (int64_t a = h0; a < h1; ++a) {
          for (int64_t b = w0; b < w1; ++b) {
            const int64_t at = ((n * g.h + a) * g.w + b) * g.c;
            for (int64_t c = 0; c < g.c; ++c) {
              const float value = Load(x, at + c);
              best[c] = value != value ? value : std::max(best[c], value);  // a NaN wins, as in jnp.maximum
            }
          }
        }
        const int64_t out = ((n * g.oh + i) * g.ow + j) * g.c;
        for (int64_t c = 0; c < g.c; ++c) Store(y, out + c, best[c]);
      }
    }
  }
}

// Each output's gradient is shared equally among the window elements equal to its maximum (all of them, for an
// all-zero window after a ReLU), as dem_jax.ops.conv.max_pool_slices does.
template <typename T>
[[gnu::always_inline]] inline void MaxPoolBackward(const T* x, const T* y, const T* dy, T* dx, const PoolGeometry& g) {
#pragma omp parallel for
  for (int64_t n = 0; n < g.n; ++n) {
    // Pass 1: each output's share, dy / (elements tied for the maximum).
    std::vector<float> share(g.oh * g.ow * g.c);
    for (int64_t i = 0; i < g.oh; ++i) {
      const auto [h0, h1] = Taps(i, g, g.h);
      for (int64_t j = 0; j < g.ow; ++j) {
        const auto [w0, w1] = Taps(j, g, g.w);
        const int64_t out = ((n * g.oh + i) * g.ow + j) * g.c;
        float* s = &share[(i * g.ow + j) * g.c];
        std::fill(s, s + g.c, 0.0f);
        for (int64_t a = h0; a < h1; ++a) {
          for (int64_t b = w0; b < w1; ++b) {
            const int64_t at = ((n * g.h + a) * g.w + b) * g.c;
            for (int64_t c = 0; c < g.c; ++c) s[c] += Load(x, at + c) == Load(y, out + c) ? 1.0f : 0.0f;
          }
        }
        for (int64_t c = 0; c < g.c; ++c) s[c] = Load(dy, out + c) / s[c];
      }
    }
    // Pass 2: each input element sums the shares of the (at most ceil(window / stride)^2) windows whose maximum it is.
    std::vector<float> sum(g.c);
    for (int64_t a = 0; a < g.h; ++a) {
      const int64_t i0 = std::max<int64_t>(0, (a + g.pad - g.window + g.stride) / g.stride);
      const int64_t i1 = std::min<int64_t>(g.oh, (a + g.pad) / g.stride + 1);
      for (int64_t b = 0; b < g.w; ++b) {
        const int64_t j0 = std::max<int64_t>(0, (b + g.pad - g.window + g.stride) / g.stride);
        const int64_t j1 = std::min<int64_t>(g.ow, (b + g.pad) / g.stride + 1);
        const int64_t at = ((n * g.h + a) * g.w + b) * g.c;
        std::fill(sum.begin(), sum.end(), 0.0f);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t out = ((n * g.oh + i) * g.ow + j) * g.c;
            const float* s = &share[(i * g.ow + j) * g.c];
            for (int64_t c = 0; c < g.c; ++c) {
              const float part = s[c];  // read unconditionally, so that the choice below is a vector select
              sum[c] += Load(x, at + c) == Load(y, out + c) ? part : 0.0f;
            }
          }
        }
        for (int64_t c = 0; c < g.c; ++c) Store(dx, at + c, sum[c]);
      }
    }
  }
}

// The plain loops below compiled for AVX-512, AVX2 and baseline x86-64, picked when the library loads: wider vectors
// for the per-channel loops without building for one CPU.
#define DEM_LOOP_TARGETS [[gnu::target_clones("avx512f", "avx2", "default")]]
template <typename T>
DEM_LOOP_TARGETS void PoolForwardLoop(const T* x, T* y, const PoolGeometry& g) {
  MaxPoolForward(x, y, g);
}
template <typename T>
DEM_LOOP_TARGETS void PoolBackwardLoop(const T* x, const T* y, const T* dy, T* dx, const PoolGeometry& g) {
  MaxPoolBackward(x, y, dy, dx, g);
}

// Calls body(T{}) with the C++ type of `type`'s elements: float for float32, uint16_t (the bits) for bfloat16, the
// two types the handlers accept.
template <typename Body>
void WithElementType(ffi::DataType type, Body body) {
  if (type == ffi::DataType::F32) {
    body(float{});
  } else {
    body(uint16_t{});
  }
}

// Per-channel sums for BatchNorm (dem_jax/ops/norm.py): sum(a) and sum(a * b) over every axis but the last, read
// straight from bfloat16 or float32 and summed in float32. XLA:CPU converts a bfloat16 operand of a reduction into a
// float32 copy first, which costs more than the sums. The rows are cut into a fixed number of chunks whatever the
// thread count, each summed in order and the chunks added in order, so the result never depends on the threads.
constexpr int64_t kSumChunks = 64;

template <typename T, bool kMasked>
[[gnu::always_inline]] inline void ChannelSums(const T* a, const T* b, const T* mask, int64_t rows, int64_t c,
                                               float* out) {
  const int64_t chunks = std::max<int64_t>(1, std::min(kSumChunks, rows));
  std::vector<float> partial(chunks * 2 * c, 0.0f);
#pragma omp parallel for
  for (int64_t k = 0; k < chunks; ++k) {
    float* sum_a = &partial[k * 2 * c];
    float* sum_ab = sum_a + c;
    for (int64_t r = rows * k / chunks; r < rows * (k + 1) / chunks; ++r) {
      for (int64_t j = 0; j < c; ++j) {
        float va = Load(a, r * c + j);
        if constexpr (kMasked) va = Load(mask, r * c + j) > 0.0f ? va : 0.0f;
        sum_a[j] += va;
        sum_ab[j] += va * Load(b, r * c + j);
      }
    }
  }
  std::fill(out, out + 2 * c, 0.0f);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t j = 0; j < 2 * c; ++j) out[j] += partial[k * 2 * c + j];
  }
}

template <typename T, bool kMasked>
DEM_LOOP_TARGETS void ChannelSumsLoop(const T* a, const T* b, const T* mask, int64_t rows, int64_t c, float* out) {
  ChannelSums<T, kMasked>(a, b, mask, rows, c, out);
}

// sum(a) and sum(a * b) per channel; with `mask`, only where mask > 0 (the positions a ReLU let through).
ffi::Error SumsOfChannels(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b, const ffi::AnyBuffer* mask,
                          ffi::Result<ffi::Buffer<ffi::F32>>& sums) {
  const auto dims = a.dimensions();
  const auto same = [&](const ffi::AnyBuffer& other) {
    return other.element_type() == a.element_type() &&
           std::equal(dims.begin(), dims.end(), other.dimensions().begin(), other.dimensions().end());
  };
  if (dims.size() == 0 || !same(b) || (mask != nullptr && !same(*mask)) ||
      (a.element_type() != ffi::DataType::F32 && a.element_type() != ffi::DataType::BF16)) {
    return ffi::Error::InvalidArgument("channel_sums: expected float32 or bfloat16 arrays of one shape and type");
  }
  const int64_t c = dims.back();
  const int64_t rows = c ? a.element_count() / c : 0;
  if (sums->element_count() != static_cast<size_t>(2 * c)) {
    return ffi::Error::InvalidArgument("channel_sums: the output must hold 2 x channels floats");
  }
  std::lock_guard<std::mutex> lock(ExecutionMutex());
  float* out = sums->typed_data();
  WithElementType(a.element_type(), [&](auto zero) {
    using T = decltype(zero);
    const auto* pa = static_cast<const T*>(a.untyped_data());
    const auto* pb = static_cast<const T*>(b.untyped_data());
    if (mask == nullptr) {
      ChannelSumsLoop<T, false>(pa, pb, nullptr, rows, c, out);
    } else {
      ChannelSumsLoop<T, true>(pa, pb, static_cast<const T*>(mask->untyped_data()), rows, c, out);
    }
  });
  return ffi::Error::Success();
}

ffi::Error ChannelSumsHandler(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::Buffer<ffi::F32>> sums) {
  return SumsOfChannels(a, b, nullptr, sums);
}

ffi::Error MaskedChannelSumsHandler(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer mask,
                                    ffi::Result<ffi::Buffer<ffi::F32>> sums) {
  return SumsOfChannels(a, b, &mask, sums);
}

ffi::ErrorOr<PoolGeometry> MakePoolGeometry(const ffi::AnyBuffer& x, const ffi::AnyBuffer& y, int64_t window,
                                            int64_t stride, int64_t pad) {
  const auto in = x.dimensions(), out = y.dimensions();
  if (in.size() != 4 || out.size() != 4 || x.element_type() != y.element_type() ||
      (x.element_type() != ffi::DataType::F32 && x.element_type() != ffi::DataType::BF16)) {
    return ffi::Error::InvalidArgument("max_pool: expected float32 or bfloat16 NHWC input and output of one type");
  }
  PoolGeometry g{in[0], in[1], in[2], in[3], out[1], out[2], window, stride, pad};
  const bool consistent = window > 0 && stride > 0 && pad >= 0 && pad < window && out[0] == g.n && out[3] == g.c &&
                          g.oh == (g.h + 2 * pad - window) / stride + 1 &&
                          g.ow == (g.w + 2 * pad - window) / stride + 1;
  if (!consistent) return ffi::Error::InvalidArgument("max_pool: input and output shapes do not match the window");
  return g;
}

ffi::Error PoolForward(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, int64_t window, int64_t stride, int64_t pad) {
  auto g = MakePoolGeometry(x, *y, window, stride, pad);
  if (g.has_error()) return g.error();
  std::lock_guard<std::mutex> lock(ExecutionMutex());
  WithElementType(x.element_type(), [&](auto zero) {
    using T = decltype(zero);
    PoolForwardLoop(static_cast<const T*>(x.untyped_data()), static_cast<T*>(y->untyped_data()), *g);
  });
  return ffi::Error::Success();
}

ffi::Error PoolBackward(ffi::AnyBuffer x, ffi::AnyBuffer y, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx,
                        int64_t window, int64_t stride, int64_t pad) {
  auto g = MakePoolGeometry(x, y, window, stride, pad);
  if (g.has_error()) return g.error();
  if (dy.element_type() != x.element_type() || dx->element_type() != x.element_type() ||
      dy.dimensions().size() != 4 || dx->dimensions().size() != 4 ||
      !std::equal(dy.dimensions().begin(), dy.dimensions().end(), y.dimensions().begin()) ||
      !std::equal(dx->dimensions().begin(), dx->dimensions().end(), x.dimensions().begin())) {
    return ffi::Error::InvalidArgument("max_pool: the gradients must match the output's and the input's shapes");
  }
  std::lock_guard<std::mutex> lock(ExecutionMutex());
  WithElementType(x.element_type(), [&](auto zero) {
    using T = decltype(zero);
    PoolBackwardLoop(static_cast<const T*>(x.untyped_data()), static_cast<const T*>(y.untyped_data()),
                     static_cast<const T*>(dy.untyped_data()), static_cast<T*>(dx->untyped_data()), *g);
  });
  return ffi::Error::Success();
}

// Inference: one convolution with a per-channel bias (a BatchNorm folded into it), optionally a residual added and a
// ReLU, in oneDNN's post-ops, so that the output is written once instead of being read and written again by each.
struct InferencePrimitives {
  memory::desc user_weights;
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward forward;
};

const InferencePrimitives& GetInferencePrimitives(const Geometry& g, bool residual, bool relu) {
  static std::mutex mutex;
  static std::map<std::tuple<decltype(g.Key()), bool, bool>, std::unique_ptr<InferencePrimitives>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  std::unique_ptr<InferencePrimitives>& slot = cache[{g.Key(), residual, relu}];
  if (slot) return *slot;
  const memory::desc src({g.n, g.c, g.h, g.w}, g.activations, Tag::nhwc);
  const memory::desc dst({g.n, g.o, g.oh, g.ow}, g.activations, Tag::nhwc);
  const memory::desc any_weights({g.o, g.c, g.kh, g.kw}, g.activations, Tag::any);
  const memory::desc bias({g.o}, Type::f32, Tag::a);
  dnnl::post_ops ops;
  if (residual) ops.append_binary(dnnl::algorithm::binary_add, dst);
  if (relu) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
  dnnl::primitive_attr attr = UserScratchpad();
  attr.set_post_ops(ops);
  auto p = std::make_unique<InferencePrimitives>();
  p->user_weights = memory::desc({g.o, g.c, g.kh, g.kw}, g.kernel, Tag::hwio);
  p->pd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, src, any_weights, bias, dst,
      {g.stride_h, g.stride_w}, {g.pad_top, g.pad_left}, {g.pad_bottom, g.pad_right}, attr);
  p->forward = dnnl::convolution_forward(p->pd);
  slot = std::move(p);
  return *slot;
}

ffi::Error InferenceForward(const ffi::AnyBuffer& x, const ffi::AnyBuffer& kernel, const ffi::AnyBuffer& bias,
                            const ffi::AnyBuffer* residual, ffi::Result<ffi::AnyBuffer>& y, int64_t stride_h,
                            int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                            int64_t pad_right, int64_t relu) {
  auto g = MakeGeometry(x, kernel, *y, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right);
  if (g.has_error()) return g.error();
  if (bias.element_type() != ffi::DataType::F32 || bias.element_count() != static_cast<size_t>(g->o)) {
    return ffi::Error::InvalidArgument("onednn_conv: the bias must be float32 with one value per output channel");
  }
  if (residual != nullptr &&
      (residual->element_type() != y->element_type() ||
       !std::equal(residual->dimensions().begin(), residual->dimensions().end(), y->dimensions().begin(),
                   y->dimensions().end()))) {
    return ffi::Error::InvalidArgument("onednn_conv: the residual must have the output's shape and type");
  }
  const auto get = [&](const Geometry& geometry) -> const InferencePrimitives& {
    return GetInferencePrimitives(geometry, residual != nullptr, relu != 0);
  };
  return Execute(g, [&](const InferencePrimitives& p, dnnl::stream& stream) {
    memory src(p.pd.src_desc(), Engine(), x.untyped_data());
    memory dst(p.pd.dst_desc(), Engine(), y->untyped_data());
    memory bias_memory(p.pd.bias_desc(), Engine(), bias.untyped_data());
    memory weights = As(p.pd.weights_desc(), p.user_weights, kernel.untyped_data(), stream);
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_BIAS, bias_memory}, {DNNL_ARG_DST, dst},
        {DNNL_ARG_SCRATCHPAD, Scratchpad(p.pd)}};
    if (residual != nullptr) {
      args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] =
          memory(p.pd.dst_desc(), Engine(), residual->untyped_data());
    }
    p.forward.execute(stream, args);
  }, get);
}

ffi::Error BiasHandler(ffi::AnyBuffer x, ffi::AnyBuffer kernel, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                       int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                       int64_t pad_right, int64_t relu) {
  return InferenceForward(x, kernel, bias, nullptr, y, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right,
                          relu);
}

ffi::Error BiasAddHandler(ffi::AnyBuffer x, ffi::AnyBuffer kernel, ffi::AnyBuffer bias, ffi::AnyBuffer residual,
                          ffi::Result<ffi::AnyBuffer> y, int64_t stride_h, int64_t stride_w, int64_t pad_top,
                          int64_t pad_bottom, int64_t pad_left, int64_t pad_right, int64_t relu) {
  return InferenceForward(x, kernel, bias, &residual, y, stride_h, stride_w, pad_top, pad_bottom, pad_left,
                          pad_right, relu);
}

}  // namespace

// Whether bfloat16 convolutions have native kernels here: oneDNN detects AVX512-BF16 (or AMX, its superset) and
// picks no reference (scalar) implementation for a ResNet 3x3 layer's three primitives. Writes the implementations'
// names, or why not, into `message`; returns 1 or 0.
extern "C" int DemOnednnBf16Kernels(char* message, size_t size) {
  std::string text;
  int ok = 0;
  try {
    const auto bf16 = static_cast<unsigned>(dnnl::cpu_isa::avx512_core_bf16);
    const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
    if ((isa & bf16) != bf16) {
      text = "oneDNN finds no AVX512-BF16 or AMX instructions on this CPU";
    } else {
      const Geometry g{8, 16, 16, 32, 32, 3, 3, 16, 16, 1, 1, 1, 1, 1, 1, Type::bf16, Type::f32};
      const Primitives& p = GetPrimitives(g);
      const std::string names[] = {p.forward_pd.impl_info_str(), p.backward_data_pd.impl_info_str(),
                                   p.backward_weights_pd.impl_info_str()};
      ok = 1;
      for (const std::string& name : names) {
        ok &= name.find("ref") == std::string::npos;
        text += (text.empty() ? "" : ", ") + name;
      }
      if (!ok) text = "oneDNN has only reference bfloat16 kernels here (" + text + ")";
    }
  } catch (const dnnl::error& e) {
    text = std::string("oneDNN failed: ") + e.what();
  }
  std::snprintf(message, size, "%s", text.c_str());
  return ok;
}

// The attributes of every convolution handler: its strides and padding.
#define DEM_CONV_ATTRIBUTES           \
  .Attr<int64_t>("stride_h")          \
      .Attr<int64_t>("stride_w")      \
      .Attr<int64_t>("pad_top")       \
      .Attr<int64_t>("pad_bottom")    \
      .Attr<int64_t>("pad_left")      \
      .Attr<int64_t>("pad_right")

#define DEM_CONV_BINDING \
  ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>() DEM_CONV_ATTRIBUTES

XLA_FFI_DEFINE_HANDLER_SYMBOL(DemOnednnConvForward, Forward, DEM_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DemOnednnConvBackwardData, BackwardData, DEM_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DemOnednnConvBackwardWeights, BackwardWeights, DEM_CONV_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(DemOnednnConvBias, BiasHandler,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() DEM_CONV_ATTRIBUTES
                                  .Attr<int64_t>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DemOnednnConvBiasAdd, BiasAddHandler,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() DEM_CONV_ATTRIBUTES
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DemMaxPoolForward, PoolForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DemMaxPoolBackward, PoolBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DemChannelSums, ChannelSumsHandler,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DemMaskedChannelSums, MaskedChannelSumsHandler,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
