// 2-D convolution (NHWC activations, HWIO kernel, float32) and its two gradients as XLA FFI handlers on oneDNN.
//
// dem_jax/onednn.py compiles this file against jaxlib's FFI headers and the oneDNN wheel, registers the three
// handlers below as CPU custom-call targets and wraps them in a differentiable `conv2d_onednn`. Every handler takes
// the same attributes: stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right.
//
//   DemOnednnConvForward(x[N,H,W,C], kernel[KH,KW,C,O]) -> y[N,OH,OW,O]
//   DemOnednnConvBackwardData(dy[N,OH,OW,O], kernel) -> dx[N,H,W,C]
//   DemOnednnConvBackwardWeights(x, dy) -> dkernel[KH,KW,C,O]
//
// Activations stay in XLA's row-major NHWC buffers (oneDNN reads and writes them in place); only the kernel is
// reordered into the blocked layout oneDNN's primitive asks for. Primitives are built once per geometry and cached.
// One convolution runs at a time: each already spreads over every core through OpenMP, and XLA may call two
// handlers at once from its own threads, which would oversubscribe the cores.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;

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

  auto Key() const {
    return std::make_tuple(n, h, w, c, o, kh, kw, oh, ow, stride_h, stride_w, pad_top, pad_bottom, pad_left,
                           pad_right);
  }
};

struct Primitives {
  memory::desc user_weights;  // HWIO, as the kernel lives in XLA
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
  const memory::desc src({g.n, g.c, g.h, g.w}, memory::data_type::f32, Tag::nhwc);
  const memory::desc dst({g.n, g.o, g.oh, g.ow}, memory::data_type::f32, Tag::nhwc);
  const memory::desc any_weights({g.o, g.c, g.kh, g.kw}, memory::data_type::f32, Tag::any);
  const memory::dims strides = {g.stride_h, g.stride_w};
  const memory::dims pad_before = {g.pad_top, g.pad_left};
  const memory::dims pad_after = {g.pad_bottom, g.pad_right};
  auto p = std::make_unique<Primitives>();
  p->user_weights = memory::desc({g.o, g.c, g.kh, g.kw}, memory::data_type::f32, Tag::hwio);
  p->forward_pd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src, any_weights, dst,
      strides, pad_before, pad_after);
  p->forward = dnnl::convolution_forward(p->forward_pd);
  p->backward_data_pd = dnnl::convolution_backward_data::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, src, any_weights, dst, strides, pad_before, pad_after,
      p->forward_pd);
  p->backward_data = dnnl::convolution_backward_data(p->backward_data_pd);
  p->backward_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, src, any_weights, dst, strides, pad_before, pad_after,
      p->forward_pd);
  p->backward_weights = dnnl::convolution_backward_weights(p->backward_weights_pd);
  slot = std::move(p);
  return *slot;
}

// x, kernel and y shapes in XLA's terms; checks that they describe one convolution.
ffi::ErrorOr<Geometry> MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                                    ffi::Span<const int64_t> y, int64_t stride_h, int64_t stride_w,
                                    int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  if (x.size() != 4 || kernel.size() != 4 || y.size() != 4) {
    return ffi::Error::InvalidArgument("onednn_conv: expected rank-4 NHWC activations and an HWIO kernel");
  }
  Geometry g{x[0], x[1], x[2], x[3], kernel[3], kernel[0], kernel[1], y[1], y[2],
             stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right};
  const bool consistent = kernel[2] == g.c && y[0] == g.n && y[3] == g.o && stride_h > 0 && stride_w > 0 &&
                          g.oh == (g.h + pad_top + pad_bottom - g.kh) / stride_h + 1 &&
                          g.ow == (g.w + pad_left + pad_right - g.kw) / stride_w + 1;
  if (!consistent) {
    return ffi::Error::InvalidArgument("onednn_conv: input, kernel and output shapes do not match one convolution");
  }
  return g;
}

// The kernel in the layout `want`: the HWIO buffer itself, or a reordered copy.
memory KernelAs(const memory::desc& want, const Primitives& p, void* data, dnnl::stream& stream) {
  memory user(p.user_weights, Engine(), data);
  if (want == p.user_weights) return user;
  memory blocked(want, Engine());
  dnnl::reorder(user, blocked).execute(stream, user, blocked);
  return blocked;
}

// Runs `body(primitives, stream)` for one convolution under the execution lock; oneDNN errors become FFI errors.
template <typename Body>
ffi::Error Execute(ffi::ErrorOr<Geometry> g, Body body) {
  if (g.has_error()) return g.error();
  try {
    const Primitives& p = GetPrimitives(*g);
    std::lock_guard<std::mutex> lock(ExecutionMutex());
    dnnl::stream stream(Engine());
    body(p, stream);
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_conv: oneDNN failed: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                   int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                   int64_t pad_right) {
  auto g = MakeGeometry(x.dimensions(), kernel.dimensions(), y->dimensions(), stride_h, stride_w, pad_top,
                        pad_bottom, pad_left, pad_right);
  return Execute(g, [&](const Primitives& p, dnnl::stream& stream) {
    memory src(p.forward_pd.src_desc(), Engine(), x.typed_data());
    memory dst(p.forward_pd.dst_desc(), Engine(), y->typed_data());
    memory weights = KernelAs(p.forward_pd.weights_desc(), p, kernel.typed_data(), stream);
    p.forward.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}});
  });
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> dx,
                        int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                        int64_t pad_right) {
  auto g = MakeGeometry(dx->dimensions(), kernel.dimensions(), dy.dimensions(), stride_h, stride_w, pad_top,
                        pad_bottom, pad_left, pad_right);
  return Execute(g, [&](const Primitives& p, dnnl::stream& stream) {
    memory diff_dst(p.backward_data_pd.diff_dst_desc(), Engine(), dy.typed_data());
    memory diff_src(p.backward_data_pd.diff_src_desc(), Engine(), dx->typed_data());
    memory weights = KernelAs(p.backward_data_pd.weights_desc(), p, kernel.typed_data(), stream);
    p.backward_data.execute(
        stream, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DIFF_SRC, diff_src}});
  });
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dkernel,
                           int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                           int64_t pad_right) {
  auto g = MakeGeometry(x.dimensions(), dkernel->dimensions(), dy.dimensions(), stride_h, stride_w, pad_top,
                        pad_bottom, pad_left, pad_right);
  return Execute(g, [&](const Primitives& p, dnnl::stream& stream) {
    memory src(p.backward_weights_pd.src_desc(), Engine(), x.typed_data());
    memory diff_dst(p.backward_weights_pd.diff_dst_desc(), Engine(), dy.typed_data());
    memory user(p.user_weights, Engine(), dkernel->typed_data());
    const memory::desc want = p.backward_weights_pd.diff_weights_desc();
    memory diff_weights = want == p.user_weights ? user : memory(want, Engine());
    p.backward_weights.execute(
        stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, diff_weights}});
    if (!(want == p.user_weights)) dnnl::reorder(diff_weights, user).execute(stream, diff_weights, user);
  });
}

}  // namespace

#define DEM_CONV_BINDING                                                                                     \
  ffi::Ffi::Bind()                                                                                           \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                          \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                          \
      .Ret<ffi::Buffer<ffi::F32>>()                                                                          \
      .Attr<int64_t>("stride_h")                                                                             \
      .Attr<int64_t>("stride_w")                                                                             \
      .Attr<int64_t>("pad_top")                                                                              \
      .Attr<int64_t>("pad_bottom")                                                                           \
      .Attr<int64_t>("pad_left")                                                                             \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(DemOnednnConvForward, Forward, DEM_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DemOnednnConvBackwardData, BackwardData, DEM_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DemOnednnConvBackwardWeights, BackwardWeights, DEM_CONV_BINDING);
