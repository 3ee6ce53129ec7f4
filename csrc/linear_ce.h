// fused_linear_cross_entropy: loss = cross_entropy(x @ weight.T + bias, target) without ever
// holding the (N, V) logits. The chunk loops, GEMMs and per-row bookkeeping shared by the CUDA
// kernels (cuda/linear_ce.cu) and the CPU's bf16/fp16 path and explicit chunk_size path
// (linear_ce.cpp) live here; each supplies two row-wise kernels over one chunk of logits z
// (rows x cols, contiguous):
//
//   Kernels::stats(z, col0, target, V, options, class_weights, stats)
//       online log-sum-exp over columns [col0, col0 + cols) of each row (RowStats below): the
//       running max m, the running sum s of exp(z - m), the target's logit zt (when it falls in
//       this block), with smoothing zrel = sum of w_j (z - m) over the columns seen so far
//       (w_j the class weights, all 1 without them; stats of earlier blocks cover exactly the
//       columns [0, col0)), for return_predicted the first column of the largest logit, and
//       where asked u = sum exp(z - m) (z - m) (entropy), q = sum exp(2 (z - m))
//       (log_sum_sq_probs) and zsum = sum z (mean_logits). All in the accumulation type (fp32
//       for half inputs).
//   Kernels::grad(z, col0, target, V, rows, options, class_weights)
//       overwrites z in place with d (sum_i scale_i loss_i + grad_lse_i lse_i
//       + grad_entropy_i H_i) / d z (rows: BackwardRows below):
//           softmax_ij * (c_i A_i + g_i - e_i (log softmax_ij + H_i)) - c_i w_j eps / V
//           - c_i (1 - eps) w_t [j == t_i]
//       with A_i = (1 - eps) w_t + eps W / V + 2 z_loss lse_i (= 1 + 2 z_loss lse_i without
//       class weights), W = sum_j w_j, c_i = scale_i (0 on ignored rows), g_i = grad_lse_i,
//       e_i = grad_entropy_i (0 when undefined), H_i the row's entropy and softmax_ij =
//       exp((z_ij - lse_i) - lse_lo_i); with a softcap, z is the capped logit (apply_softcap
//       runs before both kernels) and the result is multiplied by 1 - (z_ij / cap)^2; with a
//       temperature T, z is the tempered logit (the GEMM's scale, linear_ce_options.h), cap is
//       softcap / T, and the result is multiplied by 1 / T.
//
// Precision with a large common logit (all logits near 1e5, say): the loss is formed from
// z - m (log s - (1 - eps) (zt - m) - eps/V zrel), never as (m + log s) - zt, and backward's
// softmax from (z - lse) - lse_lo, where lse + lse_lo is the log-sum-exp to twice the precision
// of lse alone (lse_lo is what rounding m + log s to lse lost).
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
// The loss and lse are returned in the accumulation type: fp32 for bf16/fp16 inputs. For those
// the chunk of logits is fp32 too: the product of the half inputs is accumulated and kept in
// fp32 (CUDA: a GEMM with fp32 output; CPU: a GEMM of the operands upcast to fp32, x once per
// call, each weight block once per use), so no logit is rounded to 8 or 11 bits before the
// log-sum-exp or the gradient. Backward rounds each block's fp32 gradient to the input type for
// the two gradient GEMMs on CUDA (fp32 on the CPU), which accumulate in fp32.
#pragma once
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
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
#include <limits>
#include <tuple>

#include "autocast.h"
#include "checks.h"
#include "linear_ce_options.h"

namespace gpufit {
namespace linear_ce {

inline bool is_half(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Gradients are computed in forward only for fp32/fp64 and only for a scalar loss.
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

inline int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// Rows per chunk (fp32/fp64) or classes per block (half types) where the caller gives no
// chunk_size (CUDA, and the CPU's half types). The chunk of logits is kept near `budget` bytes:
// large enough that each GEMM runs near peak (the weight is re-read once per row chunk), small
// next to the (N, V) logits that eager PyTorch holds several times over.
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

inline void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                         const c10::optional<at::Tensor>& bias, const Options& o) {
  check_linear_inputs(kOp, x, weight, bias);
  TORCH_CHECK(target.scalar_type() == at::kLong, kOp, ": target must be int64 class indices, got ",
              target.scalar_type());
  TORCH_CHECK(target.device() == x.device(), kOp, ": device mismatch, x is on ", x.device(),
              " but target is on ", target.device());
  TORCH_CHECK(target.sizes() == x.sizes().slice(0, x.dim() - 1), kOp, ": target shape ",
              target.sizes(), " must equal the leading dimensions of x ", x.sizes());
  TORCH_CHECK(weight.size(0) >= 1, kOp, ": weight must have at least one class (row)");
  if (o.weighted()) {
    TORCH_CHECK(o.class_weight.size(0) == weight.size(0), kOp, ": class_weight must have shape (",
                weight.size(0), ",), got ", o.class_weight.sizes());
    TORCH_CHECK(o.class_weight.device() == x.device(), kOp, ": device mismatch, x is on ",
                x.device(), " but class_weight is on ", o.class_weight.device());
  }
}

// The class weights in the accumulation type, w (V,), and their exclusive prefix sums (V + 1,):
// prefix[c] = w_0 + ... + w_{c-1}, prefix[V] = W, the sum of all. Undefined without weights
// (every weight 1: prefix[c] = c).
struct ClassWeights {
  at::Tensor w, prefix;

  static ClassWeights of(const Options& o, const at::TensorOptions& acc_opts) {
    if (!o.weighted()) return {};
    const at::Tensor w = o.class_weight.to(acc_opts.dtype().toScalarType()).contiguous();
    return {w, at::cat({at::zeros({1}, acc_opts), w.cumsum(0)})};
  }
  bool defined() const { return w.defined(); }
};

// Gemma 2's final logit softcapping, in place: z = softcap * tanh(z / softcap). The gradient
// kernels multiply by d z' / d z = 1 - (z' / softcap)^2, from the capped z' they overwrite.
// With a temperature z is already divided by it, and so is the cap (linear_ce_options.h).
inline void apply_softcap(at::Tensor& z, const Options& o) {
  if (o.capped()) z.div_(o.tempered_cap()).tanh_().mul_(o.tempered_cap());
}

// w_{t_i} for kept rows, 0 for ignored ones.
inline at::Tensor target_weights(const at::Tensor& target, const at::Tensor& valid,
                                 const ClassWeights& cw) {
  const at::Tensor safe = at::where(valid, target, at::zeros({}, target.options()));
  return at::where(valid, cw.w.index_select(0, safe), at::zeros({}, cw.w.options()));
}

// The denominator of reduction="mean": the number of kept rows or, with class weights, the sum
// of their targets' weights (F.cross_entropy's), in the accumulation type.
inline at::Tensor mean_denominator(const at::Tensor& target, const at::Tensor& valid,
                                   const ClassWeights& cw, at::ScalarType acc) {
  if (!cw.defined()) return valid.sum().to(acc);
  return target_weights(target, valid, cw).sum();
}

// d loss / d (row loss) of a reduced loss, as a 0-dim tensor: 1 / mean's denominator, or for
// "sum" 1 / num_items (1 without it).
inline at::Tensor reduced_scale(const Options& o, const at::Tensor& count,
                                const at::TensorOptions& acc_opts) {
  if (o.reduction == Reduction::Mean) return count.reciprocal();
  if (o.num_items.defined()) {
    return o.num_items.to(acc_opts.device(), acc_opts.dtype().toScalarType()).reciprocal();
  }
  return at::ones({}, acc_opts);
}

// The GEMM chunk buffers are flat so that a short last chunk is still a contiguous (r, c) view.
inline at::Tensor chunk_view(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// z = (x2d @ w.T (+ b)) * scale into z. An fp32 z of half operands (CUDA) is a GEMM with fp32
// output: the products are accumulated and stored in fp32.
inline void logits_into(at::Tensor& z, const at::Tensor& x2d, const at::Tensor& w,
                        const at::Tensor& b, double scale = 1.0) {
  if (z.scalar_type() != x2d.scalar_type()) {
    at::mm_out(z, x2d, w.t(), z.scalar_type());
    if (b.defined()) z.add_(b);
  } else if (b.defined()) {
    at::addmm_out(z, b, x2d, w.t(), scale, scale);
    return;
  } else {
    at::mm_out(z, x2d, w.t());
  }
  if (scale != 1.0) z.mul_(scale);
}

// A GEMM operand of the half types' logits: on CUDA the tensor itself (logits_into multiplies
// it with fp32 output), on the CPU the tensor upcast to fp32 (no fp32-output GEMM of half
// inputs there).
inline at::Tensor half_operand(const at::Tensor& t, at::ScalarType acc) {
  return t.defined() && !t.is_cuda() ? t.to(acc) : t;
}

// One vocabulary block's share of the half types' gradients from its fp32 gradient dz (N,
// cols): grad_x_acc (fp32) += dz @ w, grad_w (the block's rows, input type) = dz^T @ x, with
// x and w the block's operands (half_operand). CUDA rounds dz to the input type for the GEMMs
// (into half_dz), which accumulate in fp32 (grad_x through gx_block, an (N, H) fp32 buffer).
inline void half_block_grads(const at::Tensor& dz, const at::Tensor& x, const at::Tensor& w,
                             at::Tensor& grad_x_acc, at::Tensor& grad_w, at::Tensor& half_dz,
                             at::Tensor& gx_block) {
  if (dz.scalar_type() == x.scalar_type()) {  // CPU: fp32 operands
    if (grad_x_acc.defined()) grad_x_acc.addmm_(dz, w);
    if (grad_w.defined()) grad_w.copy_(at::mm(dz.t(), x));
    return;
  }
  at::Tensor dzh = chunk_view(half_dz, dz.size(0), dz.size(1));
  dzh.copy_(dz);
  if (grad_x_acc.defined()) {
    at::mm_out(gx_block, dzh, w, grad_x_acc.scalar_type());
    grad_x_acc.add_(gx_block);
  }
  if (grad_w.defined()) at::mm_out(grad_w, dzh.t(), x);
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

// The online softmax statistics of N rows (see Kernels::stats above), in the accumulation type.
// With class weights zrel is sum_j w_j (z_j - m). pred (int64, only for return_predicted) is the
// first column of the largest logit so far; u, q and zsum (only where their output is asked
// for) the sums of exp(z - m) (z - m), exp(2 (z - m)) and z.
struct RowStats {
  at::Tensor m, s, zt, zrel, pred, u, q, zsum;

  static RowStats start(int64_t N, const at::TensorOptions& acc_opts, const Options& o) {
    const auto zeros_if = [&](bool wanted) {
      return wanted ? at::zeros({N}, acc_opts) : at::Tensor();
    };
    return {at::full({N}, -std::numeric_limits<double>::infinity(), acc_opts),
            at::zeros({N}, acc_opts),
            at::zeros({N}, acc_opts),
            at::zeros({N}, acc_opts),
            o.return_predicted ? at::zeros({N}, acc_opts.dtype(at::kLong)) : at::Tensor(),
            zeros_if(o.return_entropy),
            zeros_if(o.return_log_sum_sq_probs),
            zeros_if(o.return_mean_logits)};
  }
  RowStats narrow(int64_t start, int64_t length) const {
    const auto part = [&](const at::Tensor& t) {
      return t.defined() ? t.narrow(0, start, length) : at::Tensor();
    };
    return {part(m), part(s), part(zt), part(zrel), part(pred), part(u), part(q), part(zsum)};
  }
};

// entropy = log s - u / s, log_sum_sq_probs = log q - 2 log s, mean_logits = zsum / V of each
// row, shaped as the target, where asked (else empty).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> row_outputs(const RowStats& st, int64_t V,
                                                                  at::IntArrayRef shape) {
  const auto none = [&] { return at::empty({0}, st.m.options()); };
  return {st.u.defined() ? (st.s.log() - st.u / st.s).view(shape) : none(),
          st.q.defined() ? (st.q.log() - st.s.log() * 2.0).view(shape) : none(),
          st.zsum.defined() ? (st.zsum / static_cast<double>(V)).view(shape) : none()};
}

// lse = m + log s rounded, and lse_lo = (m + log s) - lse exactly (Knuth's two-sum; each ATen
// op rounds once). Rows whose lse is not finite get lse_lo = 0.
inline std::tuple<at::Tensor, at::Tensor> lse_parts(const at::Tensor& m, const at::Tensor& s) {
  const at::Tensor ls = s.log();
  const at::Tensor lse = m + ls;
  const at::Tensor back = lse - m;
  const at::Tensor lo = (m - (lse - back)) + (ls - back);
  return {lse, at::where(lse.isfinite(), lo, at::zeros({}, lo.options()))};
}

// Per-row loss from the statistics, zero on ignored rows:
//   log s - (1 - eps) (zt - m) - eps/V zrel + z_loss lse^2
// (= lse - (1 - eps) zt - eps/V sum_j z_j + z_loss lse^2). The smoothing term only for eps != 0:
// a -inf logit (a masked class) makes zrel -inf, and 0 * -inf would be nan. With class weights
// w (sum W), as F.cross_entropy's weight=:
//   (1 - eps) w_t (log s - (zt - m)) + eps/V (W log s - zrel) + z_loss lse^2.
inline at::Tensor row_losses(const RowStats& st, const at::Tensor& lse, const at::Tensor& valid,
                             const at::Tensor& target, int64_t V, const Options& o,
                             const ClassWeights& cw) {
  const double eps = o.label_smoothing;
  at::Tensor loss;
  if (cw.defined()) {
    const at::Tensor log_s = st.s.log();
    loss = (log_s - (st.zt - st.m)) * target_weights(target, valid, cw) * (1.0 - eps);
    if (eps != 0.0) {
      loss = loss + (log_s * cw.prefix.narrow(0, cw.prefix.size(0) - 1, 1) - st.zrel) *
                        (eps / static_cast<double>(V));
    }
  } else {
    loss = st.s.log() - (st.zt - st.m) * (1.0 - eps);
    if (eps != 0.0) loss = loss - st.zrel * (eps / static_cast<double>(V));
  }
  if (o.z_loss != 0.0) loss = loss + lse * lse * o.z_loss;
  return at::where(valid, loss, at::zeros({}, loss.options()));
}

// Scalar loss = sum or mean over non-ignored rows, as cross_entropy does (mean over zero rows is
// 0/0 = nan, as in PyTorch); a sum divided by num_items where given.
inline at::Tensor reduce(const at::Tensor& loss, const at::Tensor& count, const Options& o) {
  at::Tensor total = loss.sum();
  if (o.reduction == Reduction::Mean) return total / count;
  if (o.num_items.defined()) return total / o.num_items.to(total.device(), total.scalar_type());
  return total;
}

// Each row's argmax as returned: ignore_index on ignored rows; empty without return_predicted.
inline at::Tensor predicted_output(const RowStats& st, const at::Tensor& valid, const Options& o,
                                   const at::Tensor& target_in) {
  if (!st.pred.defined()) return at::empty({0}, target_in.options());
  return at::where(valid, st.pred, at::full({}, o.ignore_index, st.pred.options()))
      .view(target_in.sizes());
}

// The outputs of the forward op: loss and lse in the accumulation type, lse_lo (see above), the
// predicted classes (or empty), entropy, log_sum_sq_probs and mean_logits (or empty) and the
// gradients computed in forward (empty where not).
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The per-row inputs of Kernels::grad, each (N,) contiguous in the accumulation type: the loss's
// scale (0-dim for a reduced loss, unless per_row), grad_lse and grad_entropy (undefined: that
// output unused), lse, lse_lo and the entropy (with grad_entropy).
struct BackwardRows {
  at::Tensor scale, grad_lse, lse, lse_lo, grad_entropy, entropy;
  bool per_row;

  BackwardRows narrow(int64_t start, int64_t length) const {
    const auto part = [&](const at::Tensor& t) {
      return t.defined() ? t.narrow(0, start, length) : at::Tensor();
    };
    return {per_row ? part(scale) : scale, part(grad_lse), part(lse), part(lse_lo),
            part(grad_entropy), part(entropy), per_row};
  }
};
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

template <typename Kernels>
Outputs forward(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& target_in,
                const c10::optional<at::Tensor>& bias_in, const Options& o,
                std::array<bool, 3> grad_mask) {
  NoAutocast no_autocast;
  check_inputs(x_in, weight_in, target_in, bias_in, o);
  const Reduction reduction = o.reduction;
  const Flat f = flatten(x_in, weight_in, target_in, bias_in);
  const int64_t N = f.N, H = f.H, V = f.V;
  const at::ScalarType dtype = f.x.scalar_type();
  const bool half = is_half(dtype);
  const bool cuda = f.x.is_cuda();
  const auto acc_opts = f.x.options().dtype(acc_type(dtype));
  const bool with_grads = grads_in_forward(dtype, reduction, grad_mask);
  const bool want_bias_grad = with_grads && grad_mask[2] && f.bias.defined();
  const int64_t chunk = o.chunk_size > 0 ? o.chunk_size : auto_chunk(half, cuda, N, V, 4);

  RowStats stats = RowStats::start(N, acc_opts, o);
  const ClassWeights cw = ClassWeights::of(o, acc_opts);
  const at::Tensor valid = f.target != o.ignore_index;
  const at::Tensor count = mean_denominator(f.target, valid, cw, acc_type(dtype));

  at::Tensor grad_x = at::empty({0}, f.x.options());
  at::Tensor grad_w = at::empty({0}, f.x.options());
  at::Tensor grad_b = at::empty({0}, f.x.options());
  at::Tensor scale;  // d loss / d (row loss): 1/count (mean) or 1 (sum), a 0-dim tensor
  if (with_grads) {
    if (grad_mask[0]) grad_x = at::empty({N, H}, f.x.options());
    if (grad_mask[1]) grad_w = at::zeros({V, H}, f.x.options());
    if (want_bias_grad) grad_b = at::zeros({V}, f.x.options());
    scale = reduced_scale(o, count, acc_opts);
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
        logits_into(z, xc, f.weight, f.bias, o.inv_temperature());
        apply_softcap(z, o);
        RowStats sc = stats.narrow(r0, rows);
        Kernels::stats(z, 0, tc, V, o, cw, sc);
        if (!with_grads) continue;
        auto [lse_c, lse_lo_c] = lse_parts(sc.m, sc.s);
        const BackwardRows rows_c{scale, at::Tensor(), lse_c, lse_lo_c, at::Tensor(), at::Tensor(),
                                  /*per_row=*/false};
        Kernels::grad(z, 0, tc, V, rows_c, o, cw);
        if (grad_mask[0]) {
          at::Tensor gx = grad_x.narrow(0, r0, rows);
          at::mm_out(gx, z, f.weight);
        }
        if (grad_mask[1]) grad_w.addmm_(z.t(), xc);
        if (want_bias_grad) grad_b.add_(at::sum(z, {0}));
      }
    } else {
      // Vocabulary blocks: online log-sum-exp across blocks, over fp32 logits.
      const int64_t cols_max = std::min(chunk, V);
      at::Tensor buf = at::empty({N * cols_max}, acc_opts);
      const at::Tensor xg = half_operand(f.x, acc_type(dtype));
      for (int64_t c0 = 0; c0 < V; c0 += cols_max) {
        const int64_t cols = std::min(cols_max, V - c0);
        at::Tensor z = chunk_view(buf, N, cols);
        logits_into(z, xg, half_operand(f.weight.narrow(0, c0, cols), acc_type(dtype)),
                    half_operand(f.bias.defined() ? f.bias.narrow(0, c0, cols) : at::Tensor(),
                                 acc_type(dtype)),
                    o.inv_temperature());
        apply_softcap(z, o);
        Kernels::stats(z, c0, f.target, V, o, cw, stats);
      }
    }
  }
  auto [lse, lse_lo] = lse_parts(stats.m, stats.s);
  at::Tensor per_row = row_losses(stats, lse, valid, f.target, V, o, cw);
  at::Tensor loss = reduction == Reduction::None ? per_row.view(target_in.sizes())
                                                 : reduce(per_row, count, o);
  if (with_grads && grad_mask[0]) grad_x = grad_x.view(x_in.sizes());
  auto [entropy, log_sum_sq_probs, mean_logits] = row_outputs(stats, V, target_in.sizes());
  return {loss,
          lse.view(target_in.sizes()),
          lse_lo.view(target_in.sizes()),
          predicted_output(stats, valid, o, target_in),
          entropy,
          log_sum_sq_probs,
          mean_logits,
          grad_x,
          grad_w,
          grad_b};
}

// A per-row argument of the backward op (grad_lse, grad_entropy, entropy) as (N,) contiguous
// in the accumulation type; undefined where not given.
inline at::Tensor backward_row_arg(const c10::optional<at::Tensor>& arg, const char* name,
                                   const at::Tensor& target_in, const Flat& f,
                                   at::ScalarType acc) {
  if (!arg.has_value() || !arg->defined()) return at::Tensor();
  TORCH_CHECK(arg->sizes() == target_in.sizes() && arg->device() == f.x.device(), kOp,
              "_backward: ", name, " must have the target's shape ", target_in.sizes(), " on ",
              f.x.device(), ", got ", arg->sizes(), " on ", arg->device());
  return arg->reshape({-1}).to(acc).contiguous();
}

// Checks of the backward op's own arguments; returns its BackwardRows.
inline BackwardRows backward_rows(const at::Tensor& grad_loss,
                                  const c10::optional<at::Tensor>& grad_lse,
                                  const c10::optional<at::Tensor>& grad_entropy,
                                  const at::Tensor& target_in, const Flat& f,
                                  const at::Tensor& lse_in, const at::Tensor& lse_lo_in,
                                  const c10::optional<at::Tensor>& entropy, const Options& o) {
  const Reduction reduction = o.reduction;
  const at::ScalarType acc = acc_type(f.x.scalar_type());
  TORCH_CHECK(lse_in.sizes() == target_in.sizes() && lse_lo_in.sizes() == target_in.sizes(), kOp,
              "_backward: lse and lse_lo must have the target's shape ", target_in.sizes(),
              ", got ", lse_in.sizes(), " and ", lse_lo_in.sizes());
  TORCH_CHECK(lse_in.device() == f.x.device() && lse_lo_in.device() == f.x.device() &&
                  grad_loss.device() == f.x.device(),
              kOp, "_backward: lse, lse_lo and grad_loss must be on ", f.x.device());
  BackwardRows out;
  out.per_row = reduction == Reduction::None;
  if (out.per_row) {
    TORCH_CHECK(grad_loss.sizes() == target_in.sizes(), kOp, "_backward: grad_loss must have ",
                "the target's shape ", target_in.sizes(), " for reduction='none', got ",
                grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.dim() == 0, kOp, "_backward: grad_loss must be a scalar for a ",
                "reduced loss, got shape ", grad_loss.sizes());
  }
  out.grad_lse = backward_row_arg(grad_lse, "grad_lse", target_in, f, acc);
  out.grad_entropy = backward_row_arg(grad_entropy, "grad_entropy", target_in, f, acc);
  out.entropy = backward_row_arg(entropy, "entropy", target_in, f, acc);
  TORCH_CHECK(!out.grad_entropy.defined() || out.entropy.defined(), kOp,
              "_backward: grad_entropy needs the forward's entropy");
  out.lse = lse_in.reshape({-1}).to(acc).contiguous();
  out.lse_lo = lse_lo_in.reshape({-1}).to(acc).contiguous();
  // d loss / d (row loss): grad_loss per row, or for all rows grad_loss / mean's denominator
  // (mean) or / num_items (sum).
  out.scale = (out.per_row ? grad_loss.reshape({-1}) : grad_loss).to(acc).contiguous();
  if (!out.per_row) {
    const auto acc_opts = f.x.options().dtype(acc);
    const at::Tensor valid = f.target != o.ignore_index;
    const at::Tensor count = o.reduction == Reduction::Mean
                                 ? mean_denominator(f.target, valid, ClassWeights::of(o, acc_opts), acc)
                                 : at::Tensor();
    out.scale = out.scale * reduced_scale(o, count, acc_opts);
  }
  return out;
}

template <typename Kernels>
Grads backward(const at::Tensor& grad_loss, const c10::optional<at::Tensor>& grad_lse_in,
               const c10::optional<at::Tensor>& grad_entropy_in, const at::Tensor& x_in,
               const at::Tensor& weight_in, const at::Tensor& target_in,
               const c10::optional<at::Tensor>& bias_in, const at::Tensor& lse_in,
               const at::Tensor& lse_lo_in, const c10::optional<at::Tensor>& entropy_in,
               const Options& o, std::array<bool, 3> grad_mask) {
  NoAutocast no_autocast;
  check_inputs(x_in, weight_in, target_in, bias_in, o);
  const Flat f = flatten(x_in, weight_in, target_in, bias_in);
  const int64_t N = f.N, H = f.H, V = f.V;
  const at::ScalarType dtype = f.x.scalar_type();
  const at::ScalarType acc = acc_type(dtype);
  const bool half = is_half(dtype);
  const bool cuda = f.x.is_cuda();
  const BackwardRows r = backward_rows(grad_loss, grad_lse_in, grad_entropy_in, target_in, f,
                                       lse_in, lse_lo_in, entropy_in, o);
  const ClassWeights cw = ClassWeights::of(o, f.x.options().dtype(acc));
  const bool want_bias_grad = grad_mask[2] && f.bias.defined();
  const int64_t chunk = o.chunk_size > 0 ? o.chunk_size : auto_chunk(half, cuda, N, V, 4);

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
      logits_into(z, xc, f.weight, f.bias, o.inv_temperature());
      apply_softcap(z, o);
      Kernels::grad(z, 0, f.target.narrow(0, r0, rows), V, r.narrow(r0, rows), o, cw);
      if (grad_mask[0]) {
        at::Tensor gx = grad_x.narrow(0, r0, rows);
        at::mm_out(gx, z, f.weight);
      }
      if (grad_mask[1]) grad_w.addmm_(z.t(), xc);
      if (want_bias_grad) grad_b.add_(at::sum(z, {0}));
    }
  } else {
    const auto acc_opts = f.x.options().dtype(acc);
    at::Tensor grad_x_acc = grad_mask[0] ? at::zeros({N, H}, acc_opts) : at::Tensor();
    if (grad_mask[1]) grad_w = at::empty({V, H}, f.x.options());
    if (want_bias_grad) grad_b = at::empty({V}, f.x.options());
    const int64_t cols_max = std::max<int64_t>(1, std::min(chunk, V));
    at::Tensor buf = at::empty({N * cols_max}, acc_opts);  // fp32 logits, then their gradient
    const at::Tensor xg = half_operand(f.x, acc);
    // CUDA: the gradient rounded to the input type, and a block's grad_x in fp32
    at::Tensor half_dz, gx_block;
    if (cuda) {
      half_dz = at::empty({N * cols_max}, f.x.options());
      if (grad_mask[0]) gx_block = at::empty({N, H}, acc_opts);
    }
    for (int64_t c0 = 0; c0 < V; c0 += cols_max) {
      const int64_t cols = std::min(cols_max, V - c0);
      at::Tensor z = chunk_view(buf, N, cols);
      const at::Tensor wg = half_operand(f.weight.narrow(0, c0, cols), acc);
      logits_into(z, xg, wg,
                  half_operand(f.bias.defined() ? f.bias.narrow(0, c0, cols) : at::Tensor(), acc),
                  o.inv_temperature());
      apply_softcap(z, o);
      Kernels::grad(z, c0, f.target, V, r, o, cw);
      at::Tensor gw = grad_mask[1] ? grad_w.narrow(0, c0, cols) : at::Tensor();
      half_block_grads(z, xg, wg, grad_x_acc, gw, half_dz, gx_block);
      if (want_bias_grad) grad_b.narrow(0, c0, cols).copy_(at::sum(z, {0}));
    }
    if (grad_mask[0]) grad_x = grad_x_acc.to(dtype);
  }
  if (grad_mask[0]) grad_x = grad_x.view(x_in.sizes());
  return {grad_x, grad_w, grad_b};
}

}  // namespace linear_ce
}  // namespace gpufit
