// fused_linear_cross_entropy: loss = cross_entropy(x @ weight.T + bias, target) without ever
// holding the (N, V) logits. The chunk loops, GEMMs and per-row bookkeeping live here, shared by
// the CPU (linear_ce.cpp) and CUDA (cuda/linear_ce.cu) implementations; each of those supplies
// two row-wise kernels over one chunk of logits z (rows x cols, contiguous):
//
//   Kernels::stats(z, rows, cols, col0, target, ignore_index, V, m, s, zt, zsum)
//       online log-sum-exp over columns [col0, col0 + cols) of each row: running max m and
//       running sum s of exp(z - m), the target's logit zt (when it falls in this block) and the
//       sum of the logits zsum (for label smoothing). All in the accumulation type (fp32 for
//       half inputs). Raises on a target outside [0, V) other than ignore_index.
//   Kernels::grad(z, rows, cols, col0, target, ignore_index, V, lse, scale, scale_stride,
//                 label_smoothing, z_loss)
//       overwrites z in place with d loss / d z:
//           scale_i * (softmax_ij * (1 + 2 z_loss lse_i) - eps / V - (1 - eps) [j == t_i])
//       and zero on ignored rows.
//
// Two strategies:
//   row chunks (fp32/fp64): chunk the rows, each chunk sees the whole vocabulary. For a scalar
//       loss the gradients are computed in forward (3 GEMMs per chunk in total; backward only
//       scales them), grad_weight accumulates across chunks in its own dtype (fp32 or fp64).
//   vocabulary blocks (bf16/fp16): chunk the classes; forward runs the online log-sum-exp over
//       blocks, backward recomputes each block's logits and writes that block's rows of
//       grad_weight with one GEMM over all N rows, so grad_weight is accumulated in fp32 inside
//       the GEMM and rounded once, with no (V, H) fp32 accumulator; grad_x (N, H) is the only
//       cross-block sum and accumulates in fp32.
// The CPU's fp32/fp64 forward (linear_ce.cpp) has its own loops and may also take vocabulary
// blocks, still computing the gradients in forward (see cpu_plan()).
#pragma once
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <array>
#include <tuple>

#include "checks.h"

namespace gpufit {
namespace linear_ce {

constexpr const char* kOp = "fused_linear_cross_entropy";

enum class Reduction { None, Mean, Sum };

inline Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "mean") return Reduction::Mean;
  if (reduction == "sum") return Reduction::Sum;
  if (reduction == "none") return Reduction::None;
  TORCH_CHECK(false, kOp, ": reduction must be 'mean', 'sum' or 'none', got '",
              std::string(reduction.data(), reduction.size()), "'");
}

inline bool is_half(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Gradients are computed in forward only on the row-chunk path and only for a scalar loss.
// gpufit/ops.py repeats this rule in the fake kernel: keep the two the same.
inline bool grads_in_forward(at::ScalarType dtype, Reduction reduction,
                             std::array<bool, 3> grad_mask) {
  return !is_half(dtype) && reduction != Reduction::None &&
         (grad_mask[0] || grad_mask[1] || grad_mask[2]);
}

inline int64_t floor_pow2(int64_t v) {
  int64_t p = 1;
  while (p * 2 <= v) p *= 2;
  return p;
}

// Rows per chunk (fp32/fp64) or classes per block (half types). The chunk of logits is kept near
// `budget` bytes: large enough that each GEMM runs near peak (the weight is re-read once per row
// chunk), small next to the (N, V) logits that eager PyTorch holds several times over.
// Measured on one CPU core (N=2048, H=512, fp32): at V=32000, 128-row chunks took 3.8 s and
// 64-row chunks 6.1 s (the budget picks 128 there); at V=128256, 64-row chunks were no slower
// than 128-row ones (16 s vs 21 s, on a loaded machine) and save 31 MiB, so the CPU floor is
// 64 rows.
inline int64_t auto_chunk(bool half, bool cuda, int64_t N, int64_t V, int64_t elem) {
  const int64_t budget = cuda ? (half ? (32LL << 20) : (128LL << 20)) : (16LL << 20);
  if (half) {
    const int64_t cols = floor_pow2(std::max<int64_t>(1, budget / (std::max<int64_t>(N, 1) * elem)));
    return std::min(V, std::max<int64_t>(cols, 128));
  }
  const int64_t min_rows = cuda ? 8 : 64;
  const int64_t rows = floor_pow2(std::max<int64_t>(1, budget / (std::max<int64_t>(V, 1) * elem)));
  return std::max<int64_t>(1, std::min(std::max<int64_t>(N, 1), std::max<int64_t>(rows, min_rows)));
}

// How the CPU splits fp32/fp64 work (see linear_ce.cpp): row chunks of `size` rows, or
// vocabulary blocks of `size` classes.
struct CpuPlan {
  bool vocab_blocks;
  int64_t size;
};

inline int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// Below this many rows per chunk the CPU GEMMs fall off peak: each chunk re-reads the (V, H)
// weight and re-writes grad_weight. Measured on one core (N=2048, H=512, V=32000, fp32):
// 32-row chunks 6.9 s, 64 rows 4.6 s, 128 rows 3.5 s, eager PyTorch 4.0-4.7 s.
constexpr int64_t kCpuMinRows = 64;

// The CPU plan for fp32/fp64 when the caller gives no chunk_size. The scratch is never larger
// than PyTorch's own chunked linear_cross_entropy uses (its "aspect_ratio" rule: a chunk of
// logits about as large as x, next_pow2(ceil(N / ceil(V / H))) rows). Where that allows
// kCpuMinRows rows or more, row chunks (3 GEMMs); otherwise vocabulary blocks of the same or
// smaller size (4 GEMMs, but each over all N rows). Measured on one core (N=2048, H=512,
// V=128256): rows of 64 took 21.0 s and 287 MiB, blocks of 512 classes 20.6 s and 259 MiB,
// eager 19.1-19.5 s and 3006 MiB.
inline CpuPlan cpu_plan(int64_t N, int64_t V, int64_t H, int64_t chunk_size) {
  if (chunk_size > 0) return {false, std::max<int64_t>(1, std::min(N, chunk_size))};
  if (N <= 0) return {false, 1};
  const int64_t per_row = (V + std::max<int64_t>(H, 1) - 1) / std::max<int64_t>(H, 1);
  const int64_t rows = next_pow2((N + per_row - 1) / per_row);
  if (rows >= N) return {false, N};
  if (rows >= kCpuMinRows) return {false, rows};
  const int64_t cols = floor_pow2(std::max<int64_t>(1, rows * V / N));
  return {true, std::min(V, std::max<int64_t>(cols, 64))};
}

inline void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                         const c10::optional<at::Tensor>& bias, double label_smoothing,
                         double z_loss) {
  check_linear_inputs(kOp, x, weight, bias);
  TORCH_CHECK(target.scalar_type() == at::kLong, kOp, ": target must be int64 class indices, got ",
              target.scalar_type());
  TORCH_CHECK(target.device() == x.device(), kOp, ": device mismatch, x is on ", x.device(),
              " but target is on ", target.device());
  TORCH_CHECK(target.sizes() == x.sizes().slice(0, x.dim() - 1), kOp, ": target shape ",
              target.sizes(), " must equal the leading dimensions of x ", x.sizes());
  TORCH_CHECK(weight.size(0) >= 1, kOp, ": weight must have at least one class (row)");
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, kOp,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(z_loss >= 0.0, kOp, ": z_loss must be >= 0, got ", z_loss);
}

// The GEMM chunk buffers are flat so that a short last chunk is still a contiguous (r, c) view.
inline at::Tensor chunk_view(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// z = x2d @ w.T (+ b) into z.
inline void logits_into(at::Tensor& z, const at::Tensor& x2d, const at::Tensor& w,
                        const at::Tensor& b) {
  if (b.defined()) {
    at::addmm_out(z, b, x2d, w.t());
  } else {
    at::mm_out(z, x2d, w.t());
  }
}

struct Flat {
  at::Tensor x;       // (N, H) contiguous
  at::Tensor weight;  // (V, H) contiguous
  at::Tensor target;  // (N,) contiguous
  at::Tensor bias;    // (V,) contiguous or undefined
  int64_t N, H, V;
};

inline Flat flatten(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                    const c10::optional<at::Tensor>& bias) {
  Flat f;
  f.H = weight.size(1);
  f.V = weight.size(0);
  f.N = target.numel();  // not x.reshape({-1, H}): that is ambiguous when H == 0
  f.x = x.reshape({f.N, f.H}).contiguous();
  f.weight = weight.contiguous();
  f.target = target.reshape({-1}).contiguous();
  f.bias = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  return f;
}

// Per-row loss from the online statistics: lse - (1 - eps) z_t - eps/V sum_j z_j + z_loss lse^2,
// zero on ignored rows.
inline at::Tensor row_losses(const at::Tensor& lse, const at::Tensor& zt, const at::Tensor& zsum,
                             const at::Tensor& valid, int64_t V, double eps, double z_loss) {
  at::Tensor loss = lse - zt * (1.0 - eps);
  if (eps != 0.0) loss = loss - zsum * (eps / static_cast<double>(V));
  if (z_loss != 0.0) loss = loss + lse * lse * z_loss;
  return at::where(valid, loss, at::zeros({}, loss.options()));
}

// Scalar loss = sum or mean over non-ignored rows, as cross_entropy does (mean over zero rows is
// 0/0 = nan, as in PyTorch).
inline at::Tensor reduce(const at::Tensor& loss, const at::Tensor& count, Reduction reduction) {
  at::Tensor total = loss.sum();
  return reduction == Reduction::Mean ? total / count : total;
}

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& target_in,
    const c10::optional<at::Tensor>& bias_in, int64_t ignore_index, c10::string_view reduction_s,
    double eps, double z_loss, int64_t chunk_size, std::array<bool, 3> grad_mask) {
  check_inputs(x_in, weight_in, target_in, bias_in, eps, z_loss);
  const Reduction reduction = parse_reduction(reduction_s);
  const Flat f = flatten(x_in, weight_in, target_in, bias_in);
  const int64_t N = f.N, H = f.H, V = f.V;
  const at::ScalarType dtype = f.x.scalar_type();
  const bool half = is_half(dtype);
  const bool cuda = f.x.is_cuda();
  const auto acc_opts = f.x.options().dtype(acc_type(dtype));
  const bool with_grads = grads_in_forward(dtype, reduction, grad_mask);
  const bool want_bias_grad = with_grads && grad_mask[2] && f.bias.defined();
  const int64_t chunk =
      chunk_size > 0 ? chunk_size : auto_chunk(half, cuda, N, V, f.x.element_size());

  at::Tensor m = at::full({N}, -std::numeric_limits<double>::infinity(), acc_opts);
  at::Tensor s = at::zeros({N}, acc_opts);
  at::Tensor zt = at::zeros({N}, acc_opts);
  at::Tensor zsum = at::zeros({N}, acc_opts);
  const at::Tensor valid = f.target != ignore_index;
  const at::Tensor count = valid.sum().to(acc_type(dtype));

  at::Tensor grad_x = at::empty({0}, f.x.options());
  at::Tensor grad_w = at::empty({0}, f.x.options());
  at::Tensor grad_b = at::empty({0}, f.x.options());
  at::Tensor scale;  // d loss / d (row loss): 1/count (mean) or 1 (sum), a 0-dim tensor
  if (with_grads) {
    if (grad_mask[0]) grad_x = at::empty({N, H}, f.x.options());
    if (grad_mask[1]) grad_w = at::zeros({V, H}, f.x.options());
    if (want_bias_grad) grad_b = at::zeros({V}, f.x.options());
    scale = reduction == Reduction::Mean ? count.reciprocal() : at::ones({}, acc_opts);
  }

  if (N > 0) {
    if (!half) {
      // Row chunks: each chunk's logits cover the whole vocabulary.
      const int64_t rows_max = std::min(chunk, N);
      at::Tensor buf = at::empty({rows_max * V}, f.x.options());
      for (int64_t r0 = 0; r0 < N; r0 += rows_max) {
        const int64_t rows = std::min(rows_max, N - r0);
        at::Tensor xc = f.x.narrow(0, r0, rows);
        at::Tensor tc = f.target.narrow(0, r0, rows);
        at::Tensor z = chunk_view(buf, rows, V);
        logits_into(z, xc, f.weight, f.bias);
        at::Tensor mc = m.narrow(0, r0, rows), sc = s.narrow(0, r0, rows);
        at::Tensor ztc = zt.narrow(0, r0, rows), zsc = zsum.narrow(0, r0, rows);
        Kernels::stats(z, 0, tc, ignore_index, V, mc, sc, ztc, zsc);
        if (!with_grads) continue;
        at::Tensor lse_c = mc + sc.log();
        Kernels::grad(z, 0, tc, ignore_index, V, lse_c, scale, /*scale_per_row=*/false, eps,
                      z_loss);
        if (grad_mask[0]) {
          at::Tensor gx = grad_x.narrow(0, r0, rows);
          at::mm_out(gx, z, f.weight);
        }
        if (grad_mask[1]) grad_w.addmm_(z.t(), xc);
        if (want_bias_grad) grad_b.add_(at::sum(z, {0}));
      }
    } else {
      // Vocabulary blocks: online log-sum-exp across blocks.
      const int64_t cols_max = std::min(chunk, V);
      at::Tensor buf = at::empty({N * cols_max}, f.x.options());
      for (int64_t c0 = 0; c0 < V; c0 += cols_max) {
        const int64_t cols = std::min(cols_max, V - c0);
        at::Tensor z = chunk_view(buf, N, cols);
        logits_into(z, f.x, f.weight.narrow(0, c0, cols),
                    f.bias.defined() ? f.bias.narrow(0, c0, cols) : at::Tensor());
        Kernels::stats(z, c0, f.target, ignore_index, V, m, s, zt, zsum);
      }
    }
  }
  at::Tensor lse = m + s.log();
  at::Tensor per_row = row_losses(lse, zt, zsum, valid, V, eps, z_loss);
  at::Tensor loss = reduction == Reduction::None ? per_row.to(dtype).view(target_in.sizes())
                                                 : reduce(per_row, count, reduction).to(dtype);
  if (with_grads && grad_mask[0]) grad_x = grad_x.view(x_in.sizes());
  return {loss, lse.view(target_in.sizes()), grad_x, grad_w, grad_b};
}

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_loss, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& target_in, const c10::optional<at::Tensor>& bias_in, const at::Tensor& lse_in,
    int64_t ignore_index, c10::string_view reduction_s, double eps, double z_loss,
    int64_t chunk_size, std::array<bool, 3> grad_mask) {
  check_inputs(x_in, weight_in, target_in, bias_in, eps, z_loss);
  const Reduction reduction = parse_reduction(reduction_s);
  const Flat f = flatten(x_in, weight_in, target_in, bias_in);
  const int64_t N = f.N, H = f.H, V = f.V;
  const at::ScalarType dtype = f.x.scalar_type();
  const at::ScalarType acc = acc_type(dtype);
  const bool half = is_half(dtype);
  const bool cuda = f.x.is_cuda();
  TORCH_CHECK(lse_in.sizes() == target_in.sizes(), kOp, "_backward: lse shape ", lse_in.sizes(),
              " must equal the target shape ", target_in.sizes());
  TORCH_CHECK(lse_in.device() == f.x.device() && grad_loss.device() == f.x.device(), kOp,
              "_backward: lse and grad_loss must be on ", f.x.device());
  const bool per_row = reduction == Reduction::None;
  if (per_row) {
    TORCH_CHECK(grad_loss.sizes() == target_in.sizes(), kOp, "_backward: grad_loss must have ",
                "the target's shape ", target_in.sizes(), " for reduction='none', got ",
                grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.dim() == 0, kOp, "_backward: grad_loss must be a scalar for a ",
                "reduced loss, got shape ", grad_loss.sizes());
  }
  const at::Tensor lse = lse_in.reshape({-1}).to(acc).contiguous();
  const at::Tensor valid = f.target != ignore_index;
  // d loss / d (row loss): grad_loss per row, or grad_loss (/ count for the mean) for all rows.
  at::Tensor scale = (per_row ? grad_loss.reshape({-1}) : grad_loss).to(acc).contiguous();
  if (reduction == Reduction::Mean) scale = scale / valid.sum().to(acc);
  const bool want_bias_grad = grad_mask[2] && f.bias.defined();
  const int64_t chunk =
      chunk_size > 0 ? chunk_size : auto_chunk(half, cuda, N, V, f.x.element_size());

  at::Tensor grad_x = at::empty({0}, f.x.options());
  at::Tensor grad_w = at::empty({0}, f.x.options());
  at::Tensor grad_b = at::empty({0}, f.x.options());
  if (!half) {
    if (grad_mask[0]) grad_x = at::empty({N, H}, f.x.options());
    if (grad_mask[1]) grad_w = at::zeros({V, H}, f.x.options());
    if (want_bias_grad) grad_b = at::zeros({V}, f.x.options());
    const int64_t rows_max = std::max<int64_t>(1, std::min(chunk, N));
    at::Tensor buf = at::empty({N > 0 ? rows_max * V : 0}, f.x.options());
    for (int64_t r0 = 0; r0 < N; r0 += rows_max) {
      const int64_t rows = std::min(rows_max, N - r0);
      at::Tensor xc = f.x.narrow(0, r0, rows);
      at::Tensor z = chunk_view(buf, rows, V);
      logits_into(z, xc, f.weight, f.bias);
      Kernels::grad(z, 0, f.target.narrow(0, r0, rows), ignore_index, V, lse.narrow(0, r0, rows),
                    per_row ? scale.narrow(0, r0, rows) : scale, per_row, eps, z_loss);
      if (grad_mask[0]) {
        at::Tensor gx = grad_x.narrow(0, r0, rows);
        at::mm_out(gx, z, f.weight);
      }
      if (grad_mask[1]) grad_w.addmm_(z.t(), xc);
      if (want_bias_grad) grad_b.add_(at::sum(z, {0}));
    }
  } else {
    at::Tensor grad_x_acc = grad_mask[0] ? at::zeros({N, H}, f.x.options().dtype(acc)) : at::Tensor();
    if (grad_mask[1]) grad_w = at::empty({V, H}, f.x.options());
    if (want_bias_grad) grad_b = at::empty({V}, f.x.options());
    const int64_t cols_max = std::max<int64_t>(1, std::min(chunk, V));
    at::Tensor buf = at::empty({N * cols_max}, f.x.options());
    for (int64_t c0 = 0; c0 < V; c0 += cols_max) {
      const int64_t cols = std::min(cols_max, V - c0);
      at::Tensor z = chunk_view(buf, N, cols);
      at::Tensor wb = f.weight.narrow(0, c0, cols);
      logits_into(z, f.x, wb, f.bias.defined() ? f.bias.narrow(0, c0, cols) : at::Tensor());
      Kernels::grad(z, c0, f.target, ignore_index, V, lse, scale, per_row, eps, z_loss);
      if (grad_mask[0]) grad_x_acc.add_(at::mm(z, wb));
      if (grad_mask[1]) {
        at::Tensor gw = grad_w.narrow(0, c0, cols);
        at::mm_out(gw, z.t(), f.x);
      }
      if (want_bias_grad) grad_b.narrow(0, c0, cols).copy_(at::sum(z, {0}, false, acc));
    }
    if (grad_mask[0]) grad_x = grad_x_acc.to(dtype);
  }
  if (grad_mask[0]) grad_x = grad_x.view(x_in.sizes());
  return {grad_x, grad_w, grad_b};
}

}  // namespace linear_ce
}  // namespace gpufit
