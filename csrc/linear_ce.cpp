// fused_linear_cross_entropy on the CPU.
//
// Which code runs (cpu_plan below):
//   one chunk      all the logits fit the scratch budget (PyTorch's chunk rule, below) or 1 MiB:
//                  one GEMM for all logits, one C++ pass per row (rows in parallel), the gradient
//                  GEMMs; a small head (MNIST: 64 x 10 logits) costs a handful of ATen calls.
//   three GEMMs    fp32/fp64 when forward computes the gradients (a scalar loss that needs them)
//                  in row chunks: PyTorch's chunk rows where they are at least kThreeGemmMinRows,
//                  or an explicit chunk_size. Each chunk's logits, one GEMM, stay in a (rows, V)
//                  scratch until its softmax statistics are known; then they become the gradient
//                  in place and feed grad_x and grad_weight (ThreeGemmForward). Backward only
//                  scales what forward stored.
//   vocabulary     the default otherwise, for fp32/fp64: two parallel phases (BlockEngine), each
//   blocks         one parallel region whose threads take tiles from a shared counter, run their
//                  GEMMs single-threaded and never wait on each other inside the phase:
//                    A (row tiles)    each tile's rows against every class block: online
//                                     log-sum-exp and, flash-style, grad_x (sum of
//                                     exp(z - running max) w_j, rescaled when the max moves);
//                    B (class blocks) each block's logits again for all rows, its softmax
//                                     gradient, that block's rows of grad_weight and grad_bias.
//                  4 GEMMs in all, no buffer larger than one tile per thread, and no two threads
//                  ever write the same output.
//   row chunks     an explicit chunk_size (rows per chunk) where the three GEMMs do not run,
//                  softcap and class weights outside the three GEMMs, and every bf16/fp16
//                  call: the chunk loops of linear_ce.h, with the row kernels CpuKernels below
//                  (the same loops the CUDA kernels run).
// The three GEMMs and the vocabulary blocks also gather each row's argmax (return_predicted) and
// the sums behind the per-row outputs (entropy, log_sum_sq_probs, mean_logits) where asked, in
// the same pass over each tile, and take a temperature as the scale of the logits GEMM; the
// blocks' backward also takes the entropy's gradient. The three GEMMs also take a softcap and
// class weights. The one-chunk pass leaves those options to the row kernels, in one chunk.
// Each row's log-sum-exp is formed from z - max, and long sums are pairwise (pairwise_sum) or
// blocked, so fp32 keeps its precision over a vocabulary of 2**20.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/max.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "cpu_threads.h"
#include "linear_ce.h"

namespace gpufit {
namespace {

using linear_ce::kOp;
using linear_ce::Options;
using linear_ce::Reduction;

inline void check_target(int64_t t, int64_t ignore_index, int64_t V) {
  // A ValueError in Python, like every other bad argument the wrapper refuses.
  TORCH_CHECK_VALUE(t == ignore_index || (t >= 0 && t < V), kOp, ": target ", t,
                    " is out of range for ", V, " classes (and is not ignore_index=", ignore_index,
                    ")");
}

// Rows per parallel task of a row-wise pass: enough work per task to amortise the scheduling,
// so that a small chunk runs on the calling thread alone.
inline int64_t grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// f(begin, end) over [0, rows) in tasks of `grain` rows, in one parallel region (cpu_threads.h)
// when there is more than one task.
template <typename F>
void parallel_rows(int64_t rows, int64_t grain, const F& f) {
  const int64_t tasks = (rows + grain - 1) / grain;
  if (tasks <= 1) {
    if (rows > 0) f(0, rows);
    return;
  }
  cpu_threads::run_tasks(tasks, at::get_num_threads(), [&](int64_t k, int64_t) {
    f(k * grain, std::min(rows, (k + 1) * grain));
  });
}

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// (a + b) - s exactly, for s = a + b rounded (Knuth's two-sum).
template <typename T>
inline T two_sum_lo(T a, T b, T s) {
  const T back = s - a;
  return (a - (s - back)) + (b - back);
}

constexpr int64_t kSumLeaf = 256;

// sum_{j in [begin, end)} term(j): leaves of up to kSumLeaf terms, each summed in 8 independent
// lanes, added pairwise, so the rounding error grows with log(n) and not n. term(j) is called
// once per j, in order within a leaf (it may also store something).
template <typename acc_t, typename Term>
acc_t pairwise_sum(int64_t begin, int64_t end, const Term& term) {
  const int64_t n = end - begin;
  if (n <= kSumLeaf) {
    acc_t lane[8] = {};
    int64_t j = begin;
    for (; j + 8 <= end; j += 8) {
      for (int k = 0; k < 8; ++k) lane[k] += term(j + k);
    }
    acc_t total = ((lane[0] + lane[1]) + (lane[2] + lane[3])) +
                  ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    for (; j < end; ++j) total += term(j);
    return total;
  }
  const int64_t left = (n / 2 + 7) / 8 * 8;
  return pairwise_sum<acc_t>(begin, begin + left, term) +
         pairwise_sum<acc_t>(begin + left, end, term);
}

template <typename scalar_t, typename acc_t>
acc_t row_max(const scalar_t* row, int64_t cols) {
  acc_t m = neg_inf<acc_t>();
  for (int64_t j = 0; j < cols; ++j) {
    const acc_t v = static_cast<acc_t>(row[j]);
    m = v > m ? v : m;
  }
  return m;
}

// The row's max, and in *arg the first column that holds it (0 when every column is -inf). A
// nan is the max, as for torch.argmax: the first nan and its column are returned.
template <typename scalar_t, typename acc_t>
acc_t row_max(const scalar_t* row, int64_t cols, int64_t* arg) {
  acc_t m = neg_inf<acc_t>();
  *arg = 0;
  for (int64_t j = 0; j < cols; ++j) {
    const acc_t v = static_cast<acc_t>(row[j]);
    if (std::isnan(v)) {
      *arg = j;
      return v;
    }
    if (v > m) {
      m = v;
      *arg = j;
    }
  }
  return m;
}

// ---------------------------------------------------------------- row kernels of linear_ce.h

struct CpuKernels {
  static void stats(const at::Tensor& z, int64_t col0, const at::Tensor& target, int64_t V,
                    const Options& o, const linear_ce::ClassWeights& cw,
                    linear_ce::RowStats& st) {
    const int64_t rows = z.size(0), cols = z.size(1);
    const int64_t ignore_index = o.ignore_index;
    const bool smoothing = o.smoothing();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), kOp, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      const int64_t* tp = target.const_data_ptr<int64_t>();
      acc_t* mp = st.m.data_ptr<acc_t>();
      acc_t* sp = st.s.data_ptr<acc_t>();
      acc_t* ztp = st.zt.data_ptr<acc_t>();
      acc_t* zrp = st.zrel.data_ptr<acc_t>();
      int64_t* pp = st.pred.defined() ? st.pred.data_ptr<int64_t>() : nullptr;
      acc_t* up = st.u.defined() ? st.u.data_ptr<acc_t>() : nullptr;
      acc_t* qp = st.q.defined() ? st.q.data_ptr<acc_t>() : nullptr;
      acc_t* zsp = st.zsum.defined() ? st.zsum.data_ptr<acc_t>() : nullptr;
      // the class weights of this block's columns, and the weight of the columns before it
      const acc_t* wp = cw.defined() ? cw.w.const_data_ptr<acc_t>() + col0 : nullptr;
      const acc_t before_weight =
          cw.defined() ? cw.prefix.const_data_ptr<acc_t>()[col0] : static_cast<acc_t>(col0);
      parallel_rows(rows, grain(cols), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t* row = zp + i * cols;
          const int64_t t = tp[i];
          check_target(t, ignore_index, V);
          if (t >= col0 && t < col0 + cols) ztp[i] = static_cast<acc_t>(row[t - col0]);
          const acc_t m_old = mp[i];
          int64_t arg = 0;
          const acc_t bmax = pp != nullptr ? row_max<scalar_t, acc_t>(row, cols, &arg)
                                           : row_max<scalar_t, acc_t>(row, cols);
          // a nan max (only row_max with arg returns one) wins over numbers, an earlier nan
          // over later ones: torch.argmax's rule; a nan m makes s and the loss nan
          const bool nan_block = std::isnan(bmax) && !std::isnan(m_old);
          if (pp != nullptr && (bmax > m_old || nan_block)) pp[i] = col0 + arg;
          const acc_t m = bmax > m_old || nan_block ? bmax : m_old;
          const auto z_at = [&](int64_t j) { return static_cast<acc_t>(row[j]); };
          if (zsp != nullptr) zsp[i] += pairwise_sum<acc_t>(0, cols, z_at);
          if (m == neg_inf<acc_t>()) {  // every column so far is -inf: s stays 0
            if (smoothing && cols > 0) zrp[i] = neg_inf<acc_t>();
            continue;
          }
          const acc_t sum = pairwise_sum<acc_t>(
              0, cols, [&](int64_t j) { return std::exp(static_cast<acc_t>(row[j]) - m); });
          // the earlier blocks' sums re-expressed relative to the new max: factor exp(m_old - m)
          const bool fresh = m_old == neg_inf<acc_t>();
          const acc_t rescale = fresh ? acc_t(0) : std::exp(m_old - m);
          if (up != nullptr) {  // sum e (z - m) = rescale (u_old + (m_old - m) s_old) + block's
            const acc_t block = pairwise_sum<acc_t>(0, cols, [&](int64_t j) {
              const acc_t d = z_at(j) - m;
              const acc_t e = std::exp(d);
              return e > acc_t(0) ? e * d : acc_t(0);
            });
            up[i] = (fresh ? acc_t(0) : rescale * (up[i] + (m_old - m) * sp[i])) + block;
          }
          if (qp != nullptr) {
            const acc_t block = pairwise_sum<acc_t>(
                0, cols, [&](int64_t j) { return std::exp(acc_t(2) * (z_at(j) - m)); });
            qp[i] = (fresh ? acc_t(0) : rescale * rescale * qp[i]) + block;
          }
          sp[i] = (fresh ? acc_t(0) : sp[i] * rescale) + sum;
          if (smoothing) {
            const acc_t rel =
                wp != nullptr
                    ? pairwise_sum<acc_t>(
                          0, cols, [&](int64_t j) { return wp[j] * (static_cast<acc_t>(row[j]) - m); })
                    : pairwise_sum<acc_t>(
                          0, cols, [&](int64_t j) { return static_cast<acc_t>(row[j]) - m; });
            // the earlier blocks' sum re-expressed relative to the new max
            const acc_t before = col0 == 0 ? acc_t(0) : zrp[i] + before_weight * (m_old - m);
            zrp[i] = before + rel;
          }
          mp[i] = m;
        }
      });
    });
  }

  static void grad(at::Tensor& z, int64_t col0, const at::Tensor& target, int64_t V,
                   const linear_ce::BackwardRows& r, const Options& o,
                   const linear_ce::ClassWeights& cw) {
    const at::Tensor &lse = r.lse, &lse_lo = r.lse_lo, &scale = r.scale, &grad_lse = r.grad_lse;
    const bool per_row = r.per_row;
    const int64_t rows = z.size(0), cols = z.size(1);
    const int64_t ignore_index = o.ignore_index;
    const double eps = o.label_smoothing;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), kOp, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* zp = z.data_ptr<scalar_t>();
      const int64_t* tp = target.const_data_ptr<int64_t>();
      const acc_t* lp = lse.const_data_ptr<acc_t>();
      const acc_t* lop = lse_lo.const_data_ptr<acc_t>();
      const acc_t* cp = scale.const_data_ptr<acc_t>();
      const acc_t* gp = grad_lse.defined() ? grad_lse.const_data_ptr<acc_t>() : nullptr;
      const acc_t* gep =
          r.grad_entropy.defined() ? r.grad_entropy.const_data_ptr<acc_t>() : nullptr;
      const acc_t* hp = gep != nullptr ? r.entropy.const_data_ptr<acc_t>() : nullptr;
      const acc_t* wp = cw.defined() ? cw.w.const_data_ptr<acc_t>() : nullptr;
      const acc_t total_weight = wp != nullptr ? cw.prefix.const_data_ptr<acc_t>()[V] : acc_t(V);
      const acc_t smooth = static_cast<acc_t>(eps / static_cast<double>(V));
      const acc_t keep = static_cast<acc_t>(1.0 - eps);
      const acc_t two_z_loss = static_cast<acc_t>(2.0 * o.z_loss);
      const acc_t cap = static_cast<acc_t>(o.tempered_cap());
      const bool capped = o.capped();
      const acc_t inv_t = static_cast<acc_t>(o.inv_temperature());
      parallel_rows(rows, grain(cols), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          scalar_t* row = zp + i * cols;
          const int64_t t = tp[i];
          check_target(t, ignore_index, V);
          const bool ignored = t == ignore_index;
          const acc_t g = gp != nullptr ? gp[i] : acc_t(0);
          const acc_t e = gep != nullptr ? gep[i] : acc_t(0);  // the entropy's gradient
          const acc_t entropy = hp != nullptr ? hp[i] : acc_t(0);
          if (ignored && g == acc_t(0) && e == acc_t(0)) {
            std::fill(row, row + cols, scalar_t(0));
            continue;
          }
          const acc_t c = ignored ? acc_t(0) : cp[per_row ? i : 0];
          const acc_t l = lp[i];
          const acc_t lo = lop[i];
          const acc_t wt = wp != nullptr && !ignored ? wp[t] : acc_t(1);
          const acc_t a =
              wp != nullptr
                  ? c * (keep * wt + smooth * total_weight + two_z_loss * l) + g
                  : c * (acc_t(1) + two_z_loss * l) + g;
          const acc_t b = c * smooth;
          const bool has_target = !ignored && t >= col0 && t < col0 + cols;
          const acc_t z_target = has_target ? static_cast<acc_t>(row[t - col0]) : acc_t(0);
          // d z / d (the GEMM's logit) at the final logit v: softcap and temperature
          const auto chain = [&](acc_t v) {
            return (capped ? acc_t(1) - (v / cap) * (v / cap) : acc_t(1)) * inv_t;
          };
          // d loss / d z_j from the final logit v = z_j, without the one-hot term
          const auto dz = [&](acc_t v, int64_t j) {
            const acc_t log_p = (v - l) - lo;
            const acc_t p = std::exp(log_p);
            acc_t d = p * a - (wp != nullptr ? b * wp[col0 + j] : b);
            if (e != acc_t(0) && p > acc_t(0)) d -= e * p * (log_p + entropy);
            return d * chain(v);
          };
          for (int64_t j = 0; j < cols; ++j) {
            row[j] = static_cast<scalar_t>(dz(static_cast<acc_t>(row[j]), j));
          }
          // The one-hot term, computed from the saved logit so half types round only once.
          if (has_target) {
            const acc_t onehot = c * keep * wt;
            row[t - col0] =
                static_cast<scalar_t>(dz(z_target, t - col0) - onehot * chain(z_target));
          }
        }
      });
    });
  }
};

// ---------------------------------------------------------------- the CPU plan

// Rows of logits per chunk in PyTorch's own chunked linear_cross_entropy (its "aspect_ratio"
// rule: a chunk of logits about as large as x): next_pow2(ceil(N / ceil(V / H))). gpufit's CPU
// scratch, with no chunk_size given, is never larger than that many rows of logits.
inline int64_t torch_chunk_rows(int64_t N, int64_t V, int64_t H) {
  const int64_t per_row = (V + std::max<int64_t>(H, 1) - 1) / std::max<int64_t>(H, 1);
  return linear_ce::next_pow2((N + per_row - 1) / per_row);
}

struct CpuPlan {
  enum class Kind { OneChunk, RowChunks, Blocks } kind;
  int64_t rows;    // rows per chunk (Blocks: of a row chunk within the same scratch)
  int64_t budget;  // Blocks: scratch elements for all threads together
};

// Logits this small (1 MiB of fp32) are computed in one chunk whatever PyTorch's rule says: a
// few hundred tiny tiles would cost more than the memory they save.
constexpr int64_t kOneChunkMax = int64_t(1) << 18;

inline CpuPlan cpu_plan(int64_t N, int64_t V, int64_t H, int64_t chunk_size) {
  using Kind = CpuPlan::Kind;
  if (chunk_size > 0) {
    if (chunk_size >= N) return {Kind::OneChunk, N, 0};
    return {Kind::RowChunks, chunk_size, 0};
  }
  const int64_t rows = torch_chunk_rows(N, V, H);
  if (N <= 0 || rows >= N || N * V <= kOneChunkMax) return {Kind::OneChunk, N, 0};
  return {Kind::Blocks, rows, rows * V};
}

// softcap and class weights run in the row kernels (CpuKernels, through linear_ce.h's chunk
// loops) for fp32/fp64 too, in row chunks of the plan's scratch, wherever the three GEMMs do not
// run: the block engine and the one-chunk pass know only the other options. The one-chunk pass
// knows neither return_predicted, a temperature nor the per-row outputs (entropy,
// log_sum_sq_probs, mean_logits): those run the row kernels in one chunk.
inline bool needs_row_kernels(const Options& o) { return o.capped() || o.weighted(); }

inline bool one_chunk_pass_serves(const Options& o) {
  return !o.return_predicted && !o.tempered() && !o.row_outputs();
}

constexpr int64_t kThreeGemmMinRows = 64;  // see the three-GEMM plan below

// The three-GEMM forward (ThreeGemmForward below) runs where forward computes the gradients, in
// row chunks of the plan (an explicit chunk_size, or PyTorch's rule where it leaves at least
// kThreeGemmMinRows rows), with every option. A softcap or class weights take it below that
// too: the vocabulary blocks do not know them, and the row kernels, the other choice, ran
// slower in the same chunks (fp32, one core, N=1020 H=256 V=32000 in PyTorch's 16-row chunks:
// softcap 2.5 s against 3.1 s, class weights with smoothing 2.4 s against 3.0 s).
inline bool uses_three_gemms(const CpuPlan& plan, const Options& o, bool with_grads) {
  const bool worth_it = plan.rows >= kThreeGemmMinRows || needs_row_kernels(o);
  const bool chunked = plan.kind == CpuPlan::Kind::RowChunks ||
                       (plan.kind == CpuPlan::Kind::Blocks && worth_it);
  return with_grads && chunked;
}

// d loss / d (row loss) of a reduced loss on the CPU: 1/denominator (mean: cpu_denominator),
// 1/num_items (sum with it; read here, a CPU tensor's value costs no wait) or 1.
inline double cpu_scale(const Options& o, double denominator) {
  if (o.reduction == Reduction::Mean) return 1.0 / denominator;
  if (o.num_items.defined()) return 1.0 / o.num_items.to(at::kCPU, at::kDouble).item<double>();
  return 1.0;
}

// Number of rows whose target is not ignore_index; also rejects out-of-range targets before any
// GEMM runs.
int64_t count_valid(const at::Tensor& target, int64_t ignore_index, int64_t V) {
  const int64_t* tp = target.const_data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0, n = target.numel(); i < n; ++i) {
    check_target(tp[i], ignore_index, V);
    count += tp[i] != ignore_index;
  }
  return count;
}

// The denominator of reduction="mean": the number of kept rows (count_valid's) or, with class
// weights, the sum of their targets' weights (linear_ce::mean_denominator, the row kernels').
double cpu_denominator(const linear_ce::Flat& f, const Options& o, int64_t count) {
  if (!o.weighted()) return static_cast<double>(count);
  const at::ScalarType acc = linear_ce::acc_type(f.x.scalar_type());
  const linear_ce::ClassWeights cw = linear_ce::ClassWeights::of(o, f.x.options().dtype(acc));
  return linear_ce::mean_denominator(f.target, f.target != o.ignore_index, cw, acc)
      .item<double>();
}

double sum_as_double(const at::Tensor& t) {
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), kOp, [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (int64_t i = 0, n = t.numel(); i < n; ++i) total += static_cast<double>(p[i]);
  });
  return total;
}

// The outputs of a CPU forward before the loss is reduced.
struct Partial {
  at::Tensor row_loss, lse, lse_lo, grad_x, grad_w, grad_b;
  at::Tensor predicted;  // (N,) int64 for return_predicted, else undefined
  at::Tensor entropy, log_sum_sq_probs, mean_logits;  // (N,) where asked, else undefined
};

inline at::Tensor none_like(const at::Tensor& t) { return at::empty({0}, t.options()); }

// ---------------------------------------------------------------- one chunk

// One pass per row of the logits for the fp32/fp64 one-chunk forward: max, log-sum-exp, the
// row's loss and, with grads, d loss / d z in place. Each exp is taken once and kept in the row
// for the gradient, which is then one multiply-add per element.
template <typename scalar_t>
struct RowPass {
  const int64_t* target;
  int64_t ignore_index, V;
  scalar_t eps, z_loss, scale;  // scale: d loss / d (row loss), 1/count (mean) or 1 (sum)
  bool with_grads;

  // Returns the row's loss (0 when ignored) and writes its log-sum-exp as lse + lse_lo.
  scalar_t operator()(scalar_t* row, int64_t i, scalar_t& lse_out, scalar_t& lse_lo_out) const {
    const int64_t t = target[i];  // in range: count_valid checked every target already
    const bool ignored = t == ignore_index;
    const bool smoothing = eps != scalar_t(0);
    const scalar_t m = row_max<scalar_t, scalar_t>(row, V);
    const scalar_t zt = ignored ? scalar_t(0) : row[t];
    const scalar_t zrel =
        smoothing ? pairwise_sum<scalar_t>(0, V, [&](int64_t j) { return row[j] - m; })
                  : scalar_t(0);
    const bool keep = with_grads && !ignored;
    const scalar_t s = pairwise_sum<scalar_t>(0, V, [&](int64_t j) {
      const scalar_t e = std::exp(row[j] - m);
      if (keep) row[j] = e;
      return e;
    });
    const scalar_t ls = std::log(s);
    const scalar_t lse = m + ls;
    lse_out = lse;
    lse_lo_out = std::isfinite(lse) ? two_sum_lo(m, ls, lse) : scalar_t(0);
    if (ignored) {
      if (with_grads) std::fill(row, row + V, scalar_t(0));
      return scalar_t(0);
    }
    if (with_grads) {
      // scale * (softmax * (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == t]), softmax = e / s
      const scalar_t f = scale * (scalar_t(1) + scalar_t(2) * z_loss * lse) / s;
      const scalar_t b = scale * eps / static_cast<scalar_t>(V);
      for (int64_t j = 0; j < V; ++j) row[j] = row[j] * f - b;
      row[t] -= scale * (scalar_t(1) - eps);
    }
    scalar_t loss = ls - (scalar_t(1) - eps) * (zt - m);
    if (smoothing) loss -= eps / static_cast<scalar_t>(V) * zrel;
    return loss + z_loss * lse * lse;
  }
};

// All rows in one chunk (3 GEMMs).
Partial one_chunk_forward(const linear_ce::Flat& f, double denominator, const Options& o,
                          bool with_grads, std::array<bool, 3> grad_mask) {
  const int64_t N = f.N, V = f.V;
  Partial out;
  out.lse = at::empty({N}, f.x.options());
  out.lse_lo = at::empty({N}, f.x.options());
  out.row_loss = at::empty({N}, f.x.options());
  out.grad_x = none_like(f.x);
  out.grad_w = none_like(f.x);
  out.grad_b = none_like(f.x);
  if (N == 0) {
    if (with_grads && grad_mask[0]) out.grad_x = at::zeros({0, f.H}, f.x.options());
    if (with_grads && grad_mask[1]) out.grad_w = at::zeros({V, f.H}, f.x.options());
    if (with_grads && grad_mask[2] && f.bias.defined()) out.grad_b = at::zeros({V}, f.x.options());
    return out;
  }
  at::Tensor z = at::empty({N, V}, f.x.options());
  linear_ce::logits_into(z, f.x, f.weight, f.bias);
  AT_DISPATCH_FLOATING_TYPES(f.x.scalar_type(), kOp, [&] {
    const double scale = cpu_scale(o, denominator);
    const RowPass<scalar_t> pass{f.target.const_data_ptr<int64_t>(), o.ignore_index, V,
                                 static_cast<scalar_t>(o.label_smoothing),
                                 static_cast<scalar_t>(o.z_loss), static_cast<scalar_t>(scale),
                                 with_grads};
    scalar_t* lp = out.lse.data_ptr<scalar_t>();
    scalar_t* lop = out.lse_lo.data_ptr<scalar_t>();
    scalar_t* rp = out.row_loss.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    parallel_rows(N, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) rp[i] = pass(zp + i * V, i, lp[i], lop[i]);
    });
  });
  if (with_grads) {
    if (grad_mask[0]) out.grad_x = at::mm(z, f.weight);
    if (grad_mask[1]) out.grad_w = at::mm(z.t(), f.x);
    if (grad_mask[2] && f.bias.defined()) out.grad_b = at::sum(z, {0});
  }
  return out;
}

// ---------------------------------------------------------------- vocabulary blocks, in parallel

struct EnginePlan {
  int64_t workers;
  int64_t tile;    // scratch elements per worker
  int64_t rows_a;  // phase A: rows per tile
  int64_t cols_a;  //          classes per block
  int64_t rows_b;  // phase B: rows per tile
  int64_t cols_b;  //          classes per block (one task)
};

inline int64_t round_down16(int64_t v) { return v >= 16 ? v / 16 * 16 : v; }

// Measured on one core (AVX2, N=2048 H=512 V=32000 and N=256 H=256 V=32000, fp32): phase A ran
// fastest with tiles of 256 rows x 128 classes, phase B with 256 x 256 (64K elements, 256 KiB,
// about a core's L2), both 10-40% faster than with 64-row or 32-column tiles. Fewer rows per
// phase-A tile only to give every worker a tile. At most `budget` elements of scratch in all:
// where that leaves less than kTileMin per worker, fewer workers.
constexpr int64_t kTileMax = 1 << 16;
constexpr int64_t kTileMin = 1 << 14;
constexpr int64_t kTileA = 1 << 15;
constexpr int64_t kRowsMax = 256;
// Below this many multiply-adds per worker a phase is not worth a second thread.
constexpr int64_t kWorkPerWorker = int64_t(1) << 24;

inline EnginePlan engine_plan(int64_t N, int64_t V, int64_t H, int64_t budget) {
  EnginePlan p;
  const int64_t work = N * V * std::max<int64_t>(H, 1);
  p.workers = std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), budget / kTileMin, work / kWorkPerWorker}));
  p.tile = std::max<int64_t>(256, std::min(kTileMax, budget / p.workers));
  const int64_t per_worker = (N + p.workers - 1) / p.workers;
  p.rows_a = std::min<int64_t>(
      N, std::clamp<int64_t>(linear_ce::next_pow2(per_worker), 64, kRowsMax));
  p.cols_a = std::min(V, std::max<int64_t>(16, round_down16(std::min(p.tile, kTileA) / p.rows_a)));
  p.rows_b = std::min<int64_t>(N, kRowsMax);
  p.cols_b = std::min(V, std::max<int64_t>(16, round_down16(p.tile / p.rows_b)));
  p.rows_b = std::max<int64_t>(1, std::min(p.rows_b, p.tile / p.cols_b));
  p.tile = std::max(p.rows_a * p.cols_a, p.rows_b * p.cols_b);
  return p;
}

// Per-row coefficients of d loss / d z (z the GEMM's logits, before the temperature) for given
// statistics (see linear_ce.h), with t_ij = z_ij / T - lse_i:
//   dz_ij = exp(t_ij) * (a_i - beta_i t_ij) - b_i - o_i [j == t_i],
// a_i = (c_i (1 + 2 z_loss lse_i) + g_i - e_i (H_i - lse_lo_i)) exp(-lse_lo_i) / T,
// beta_i = e_i exp(-lse_lo_i) / T (the entropy's term, -e p (log p + H); empty without it),
// b_i = c_i eps / V / T, o_i = c_i (1 - eps) / T, c_i the row's loss scale (0 when ignored),
// g_i its lse gradient, e_i its entropy gradient and H_i its entropy.
template <typename scalar_t>
struct GradRows {
  std::vector<scalar_t> a, b, o, beta;
};

template <typename scalar_t>
GradRows<scalar_t> grad_rows(const int64_t* target, int64_t N, int64_t V, const scalar_t* lse,
                             const scalar_t* lse_lo, const scalar_t* scale, bool per_row,
                             const scalar_t* grad_lse, const Options& o,
                             const scalar_t* grad_entropy = nullptr,
                             const scalar_t* entropy = nullptr) {
  const int64_t ignore_index = o.ignore_index;
  const double eps = o.label_smoothing, z_loss = o.z_loss;
  const scalar_t inv_t = static_cast<scalar_t>(o.inv_temperature());
  GradRows<scalar_t> r{std::vector<scalar_t>(N), std::vector<scalar_t>(N),
                       std::vector<scalar_t>(N), std::vector<scalar_t>()};
  if (grad_entropy != nullptr) r.beta.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    const scalar_t c = target[i] == ignore_index ? scalar_t(0) : scale[per_row ? i : 0];
    const scalar_t g = grad_lse != nullptr ? grad_lse[i] : scalar_t(0);
    const scalar_t back = std::exp(-lse_lo[i]) * inv_t;
    scalar_t a = c * (scalar_t(1) + scalar_t(2 * z_loss) * lse[i]) + g;
    if (grad_entropy != nullptr) {
      a -= grad_entropy[i] * (entropy[i] - lse_lo[i]);
      r.beta[i] = grad_entropy[i] * back;
    }
    r.a[i] = a * back;
    r.b[i] = c * static_cast<scalar_t>(eps / static_cast<double>(V)) * inv_t;
    r.o[i] = c * static_cast<scalar_t>(1.0 - eps) * inv_t;
  }
  return r;
}

// fp32/fp64 vocabulary blocks; see the top of this file.
template <typename scalar_t>
struct BlockEngine {
  const linear_ce::Flat& f;
  EnginePlan plan;
  int64_t ignore_index;
  double eps, z_loss;  // the options' label_smoothing and z_loss
  double inv_t;        // 1 / temperature: the GEMM's scale
  bool predicted;      // return_predicted
  bool entropy, squares, mean;  // the per-row outputs asked for
  at::Tensor buffers;  // (workers, tile)
  at::Tensor scratch;  // (workers, tile) for the entropy and log_sum_sq_probs sums, else empty

  BlockEngine(const linear_ce::Flat& flat, const EnginePlan& p, const Options& o)
      : f(flat), plan(p), ignore_index(o.ignore_index), eps(o.label_smoothing), z_loss(o.z_loss),
        inv_t(o.inv_temperature()), predicted(o.return_predicted), entropy(o.return_entropy),
        squares(o.return_log_sum_sq_probs), mean(o.return_mean_logits),
        buffers(at::empty({p.workers, p.tile}, flat.x.options())),
        scratch(at::empty({entropy || squares ? p.workers * p.tile : 0}, flat.x.options())) {}

  at::Tensor logits(int64_t worker, int64_t r0, int64_t rows, int64_t c0, int64_t cols) const {
    at::Tensor z = linear_ce::chunk_view(buffers[worker], rows, cols);
    linear_ce::logits_into(z, f.x.narrow(0, r0, rows), f.weight.narrow(0, c0, cols),
                           f.bias.defined() ? f.bias.narrow(0, c0, cols) : at::Tensor(), inv_t);
    return z;
  }

  // z (rows r0.., classes c0..) overwritten with d loss / d z.
  void softmax_grad(at::Tensor& z, int64_t r0, int64_t c0, const scalar_t* lse,
                    const GradRows<scalar_t>& g) const {
    const int64_t rows = z.size(0), cols = z.size(1);
    const auto col = [&](const scalar_t* v) {
      return at::from_blob(const_cast<scalar_t*>(v) + r0, {rows, 1}, z.options());
    };
    z.sub_(col(lse));
    if (g.beta.empty()) {
      z.exp_().mul_(col(g.a.data()));
    } else {  // exp(t) (a - beta t), 0 where t = -inf (p = 0)
      at::Tensor coef = col(g.a.data()) - z * col(g.beta.data());
      coef.masked_fill_(z == -std::numeric_limits<double>::infinity(), 0);
      z.exp_().mul_(coef);
    }
    if (eps != 0.0) z.sub_(col(g.b.data()));
    scalar_t* zp = z.data_ptr<scalar_t>();
    const int64_t* tp = f.target.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t t = tp[r0 + i];
      if (t != ignore_index && t >= c0 && t < c0 + cols) zp[i * cols + t - c0] -= g.o[r0 + i];
    }
  }

  // Phase B: grad_weight and grad_bias, one class block per task, from final statistics.
  void class_blocks(const scalar_t* lse, const GradRows<scalar_t>& g, at::Tensor* grad_w,
                    at::Tensor* grad_b) const {
    const int64_t N = f.N, V = f.V;
    const int64_t blocks = (V + plan.cols_b - 1) / plan.cols_b;
    cpu_threads::run_tasks(blocks, std::min(plan.workers, blocks), [&](int64_t k, int64_t w) {
      const int64_t c0 = k * plan.cols_b, cols = std::min(plan.cols_b, V - c0);
      for (int64_t r0 = 0; r0 < N; r0 += plan.rows_b) {
        const int64_t rows = std::min(plan.rows_b, N - r0);
        at::Tensor z = logits(w, r0, rows, c0, cols);
        softmax_grad(z, r0, c0, lse, g);
        const at::Tensor xr = f.x.narrow(0, r0, rows);
        if (grad_w != nullptr) {
          at::Tensor gw = grad_w->narrow(0, c0, cols);
          if (r0 == 0) {
            at::mm_out(gw, z.t(), xr);
          } else {
            gw.addmm_(z.t(), xr);
          }
        }
        if (grad_b != nullptr) {
          at::Tensor gb = grad_b->narrow(0, c0, cols);
          if (r0 == 0) {
            at::sum_out(gb, z, {0});
          } else {
            gb.add_(at::sum(z, {0}));
          }
        }
      }
    });
  }

  // Phase A of the forward: statistics and loss of every row and, with grad_x (the loss's, for
  // the given per-row scale), flash-style: grad_x_i = a_i / s_i sum_j exp(z_ij - m_i) w_j
  // - o_i w_{t_i} - b_i sum_j w_j (each divided by the temperature). With `out` (the per-row
  // outputs: Partial's predicted, entropy, log_sum_sq_probs, mean_logits, where defined), also
  // each row's argmax and the sums behind the others.
  void row_tiles_forward(scalar_t* lse, scalar_t* lse_lo, scalar_t* row_loss, scalar_t scale,
                         at::Tensor* grad_x, Partial& out) const {
    const int64_t N = f.N, V = f.V, H = f.H;
    const bool smoothing = eps != 0.0;
    const scalar_t* bp = nullptr;
    at::Tensor wsum;  // sum_j w_j, for the smoothing term of grad_x
    if (grad_x != nullptr && smoothing) {
      wsum = at::sum(f.weight, {0});
      bp = wsum.const_data_ptr<scalar_t>();
    }
    const int64_t* tp = f.target.const_data_ptr<int64_t>();
    const scalar_t* wp = f.weight.const_data_ptr<scalar_t>();
    int64_t* pred = predicted ? out.predicted.data_ptr<int64_t>() : nullptr;
    scalar_t* ent = entropy ? out.entropy.data_ptr<scalar_t>() : nullptr;
    scalar_t* lss = squares ? out.log_sum_sq_probs.data_ptr<scalar_t>() : nullptr;
    scalar_t* mean_out = mean ? out.mean_logits.data_ptr<scalar_t>() : nullptr;
    const int64_t tiles = (N + plan.rows_a - 1) / plan.rows_a;
    cpu_threads::run_tasks(tiles, std::min(plan.workers, tiles), [&](int64_t k, int64_t w) {
      const int64_t r0 = k * plan.rows_a, rows = std::min(plan.rows_a, N - r0);
      std::vector<scalar_t> m(rows, neg_inf<scalar_t>()), s(rows, 0), zt(rows, 0), zrel(rows, 0),
          factor(rows), shift(rows), u(rows, 0), q(rows, 0), zsum(rows, 0);
      std::vector<int64_t> arg(rows, 0);
      at::Tensor acc;
      if (grad_x != nullptr) acc = grad_x->narrow(0, r0, rows).zero_();
      scalar_t* accp = acc.defined() ? acc.data_ptr<scalar_t>() : nullptr;
      const auto opts = f.x.options();
      const at::Tensor shift_col = at::from_blob(shift.data(), {rows, 1}, opts);
      at::Tensor bmax = at::empty({rows}, opts), bsum = at::empty({rows}, opts),
                 rel = at::empty({rows}, opts), bidx = at::empty({rows}, opts.dtype(at::kLong)),
                 bu = at::empty({rows}, opts), bq = at::empty({rows}, opts),
                 bz = at::empty({rows}, opts);
      const scalar_t* bm = bmax.const_data_ptr<scalar_t>();
      const scalar_t* bs = bsum.const_data_ptr<scalar_t>();
      const scalar_t* rp = rel.const_data_ptr<scalar_t>();
      const int64_t* bi = bidx.const_data_ptr<int64_t>();
      const scalar_t* bup = bu.const_data_ptr<scalar_t>();
      const scalar_t* bqp = bq.const_data_ptr<scalar_t>();
      const scalar_t* bzp = bz.const_data_ptr<scalar_t>();
      for (int64_t c0 = 0; c0 < V; c0 += plan.cols_a) {
        const int64_t cols = std::min(plan.cols_a, V - c0);
        at::Tensor z = logits(w, r0, rows, c0, cols);
        if (predicted) {
          at::max_out(bmax, bidx, z, 1);  // torch's rule: a nan is the max, the first one wins
        } else {
          at::amax_out(bmax, z, {1});
        }
        if (mean) at::sum_out(bz, z, {1});
        const scalar_t* zp = z.const_data_ptr<scalar_t>();
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t t = tp[r0 + i];
          if (t != ignore_index && t >= c0 && t < c0 + cols) zt[i] = zp[i * cols + t - c0];
          if (predicted && (bm[i] > m[i] || (std::isnan(bm[i]) && !std::isnan(m[i])))) {
            arg[i] = c0 + bi[i];
          }
          if (mean) zsum[i] += bzp[i];
          const scalar_t m_new = bm[i] > m[i] || std::isnan(bm[i]) ? bm[i] : m[i];
          factor[i] = m[i] == neg_inf<scalar_t>() ? scalar_t(0) : std::exp(m[i] - m_new);
          shift[i] = m_new == neg_inf<scalar_t>() ? scalar_t(0) : m_new;
          if (smoothing) {  // the earlier blocks' sum relative to the new max (c0 columns)
            zrel[i] = m_new == neg_inf<scalar_t>()   ? neg_inf<scalar_t>()
                      : c0 == 0                      ? scalar_t(0)
                                                     : zrel[i] + scalar_t(c0) * (m[i] - m_new);
          }
          // the entropy's sum so far relative to the new max (uses the old s)
          if (entropy && factor[i] != scalar_t(0)) {
            u[i] = factor[i] * (u[i] + (m[i] - m_new) * s[i]);
          }
          if (squares) q[i] *= factor[i] * factor[i];
          // grad_x's sum so far was taken relative to the old max (nothing yet while it was -inf)
          if (accp != nullptr && m_new != m[i] && m[i] != neg_inf<scalar_t>()) {
            scalar_t* ai = accp + i * H;
            for (int64_t h = 0; h < H; ++h) ai[h] *= factor[i];
          }
          m[i] = m_new;
        }
        z.sub_(shift_col);
        if (smoothing) {
          at::sum_out(rel, z, {1});
          for (int64_t i = 0; i < rows; ++i) {
            if (m[i] != neg_inf<scalar_t>()) zrel[i] += rp[i];
          }
        }
        at::Tensor d;  // z - shift, kept for the entropy's sum of exp(d) d
        if (entropy || squares) {
          d = scratch.narrow(0, w * plan.tile, rows * cols).view({rows, cols});
        }
        if (entropy) d.copy_(z);
        z.exp_();
        at::sum_out(bsum, z, {1});
        if (entropy) {  // sum exp(d) d, 0 where exp(d) is 0
          d.mul_(z).nan_to_num_(0.0, 0.0, 0.0);
          at::sum_out(bu, d, {1});
        }
        if (squares) {
          at::mul_out(d, z, z);
          at::sum_out(bq, d, {1});
        }
        for (int64_t i = 0; i < rows; ++i) {
          if (m[i] == neg_inf<scalar_t>()) continue;  // every column so far is -inf
          if (entropy) u[i] += bup[i];
          if (squares) q[i] += bqp[i];
        }
        for (int64_t i = 0; i < rows; ++i) s[i] = s[i] * factor[i] + bs[i];
        if (acc.defined()) acc.addmm_(z, f.weight.narrow(0, c0, cols));
      }
      scalar_t* gx = accp;
      const scalar_t inv_temperature = static_cast<scalar_t>(inv_t);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t t = tp[r0 + i];
        const bool ignored = t == ignore_index;
        const scalar_t ls = std::log(s[i]);
        const scalar_t l = m[i] + ls;
        lse[r0 + i] = l;
        lse_lo[r0 + i] = std::isfinite(l) ? two_sum_lo(m[i], ls, l) : scalar_t(0);
        if (pred != nullptr) pred[r0 + i] = ignored ? ignore_index : arg[i];
        if (ent != nullptr) ent[r0 + i] = ls - u[i] / s[i];
        if (lss != nullptr) lss[r0 + i] = std::log(q[i]) - scalar_t(2) * ls;
        if (mean_out != nullptr) mean_out[r0 + i] = zsum[i] / static_cast<scalar_t>(V);
        scalar_t loss = ls - scalar_t(1.0 - eps) * (zt[i] - m[i]);
        if (smoothing) loss -= static_cast<scalar_t>(eps / static_cast<double>(V)) * zrel[i];
        row_loss[r0 + i] = ignored ? scalar_t(0) : loss + static_cast<scalar_t>(z_loss) * l * l;
        if (gx == nullptr) continue;
        scalar_t* gi = gx + i * H;
        if (ignored) {
          std::fill(gi, gi + H, scalar_t(0));
          continue;
        }
        const scalar_t a =
            scale * (scalar_t(1) + scalar_t(2 * z_loss) * l) / s[i] * inv_temperature;
        const scalar_t o = scale * scalar_t(1.0 - eps) * inv_temperature;
        const scalar_t* wt = wp + t * H;
        for (int64_t h = 0; h < H; ++h) gi[h] = gi[h] * a - o * wt[h];
        if (bp != nullptr) {
          const scalar_t b =
              scale * static_cast<scalar_t>(eps / static_cast<double>(V)) * inv_temperature;
          for (int64_t h = 0; h < H; ++h) gi[h] -= b * bp[h];
        }
      }
    });
  }

  // Phase A of the backward: grad_x from known statistics, one row tile per task.
  void row_tiles_backward(const scalar_t* lse, const GradRows<scalar_t>& g,
                          at::Tensor& grad_x) const {
    const int64_t N = f.N, V = f.V;
    const int64_t tiles = (N + plan.rows_a - 1) / plan.rows_a;
    cpu_threads::run_tasks(tiles, std::min(plan.workers, tiles), [&](int64_t k, int64_t w) {
      const int64_t r0 = k * plan.rows_a, rows = std::min(plan.rows_a, N - r0);
      at::Tensor gx = grad_x.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < V; c0 += plan.cols_a) {
        const int64_t cols = std::min(plan.cols_a, V - c0);
        at::Tensor z = logits(w, r0, rows, c0, cols);
        softmax_grad(z, r0, c0, lse, g);
        const at::Tensor wb = f.weight.narrow(0, c0, cols);
        if (c0 == 0) {
          at::mm_out(gx, z, wb);
        } else {
          gx.addmm_(z, wb);
        }
      }
    });
  }
};

// ---------------------------------------------------------------- three GEMMs in row chunks

// The forward with gradients, for fp32/fp64 and a scalar loss: each chunk of rows is multiplied
// with the weight once, and the chunk's logits stay in a (rows, V) scratch, in class blocks,
// until the chunk's softmax statistics are known; then each block becomes its softmax gradient
// in place and feeds grad_x and grad_weight. Three GEMMs in all (logits, grad_x, grad_weight),
// the floor for this math. Each step is one parallel region over the class blocks, taken from a
// shared counter; a block's task first finishes the previous chunk there (gradient, its grad_x
// share, that block's rows of grad_weight and grad_bias) and then starts the next chunk there
// (logits, block statistics), so each block of the weight is read from memory once for both.
// No two tasks write the same rows of grad_weight; each worker sums its grad_x share apart.
// Every option runs here: with a softcap a tile keeps the capped logits until its gradient is
// formed (their factor 1 - (z / cap)^2 needs them), its exponentials go to a worker's buffer.
struct ChunkPlan {
  int64_t rows;     // rows per chunk
  int64_t cols;     // classes per block
  int64_t blocks;   // ceil(V / cols)
  int64_t workers;  // threads of each region
};

// Classes per block: a block's (rows, 512) tile and its (512, H) slices of the weight and of
// grad_weight stay in a core's L2 between the block's GEMMs; blocks of 256 to 1024 classes ran
// alike (one core, fp32, N=1020 H=256 V=128256).
constexpr int64_t kBlockCols = 512;

// kThreeGemmMinRows (above): the weight is streamed from memory once per chunk, so with few
// rows per chunk the three GEMMs are bound by memory (a (rows x H) x (H x V) GEMM does 2 rows
// flops per weight element read); the four-GEMM vocabulary blocks keep their tiles in cache.
// Measured on one core (fp32, CPU time, a busy machine): N=2048 H=512 V=32000, the three-GEMM
// plan in chunks of 16 to 64 rows took 0.77x to 0.83x the blocks' time; N=1020 H=256 V=128256,
// chunks of 64 rows 2.9 s, of 16 rows 5.8 s, the blocks 3.2 to 3.7 s. So 64 rows at least
// (PyTorch's rule gives 4 rows at N=1020 H=256 V=128256: the blocks run there).

inline ChunkPlan chunk_plan(int64_t rows, int64_t V) {
  ChunkPlan p;
  p.rows = std::max<int64_t>(1, rows);
  p.cols = std::min(V, kBlockCols);
  p.blocks = (V + p.cols - 1) / p.cols;
  p.workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.blocks));
  return p;
}

template <typename scalar_t>
struct ThreeGemmForward {
  const linear_ce::Flat& f;
  const ChunkPlan p;
  const int64_t ignore_index;
  const double eps, z_loss;
  const scalar_t scale;  // d loss / d (row loss) of a kept row
  const bool predicted;
  const double inv_t;                 // 1 / temperature: the GEMM's scale
  const bool entropy, squares, mean;  // the per-row outputs asked for
  const Options& options;             // for the softcap (linear_ce::apply_softcap)
  const bool capped;                  // a softcap: the tiles keep the capped logits
  const double cap;                   // the softcap, divided by the temperature
  const linear_ce::ClassWeights cw;   // undefined without class weights
  const scalar_t* weights;            // cw's w (V,), or null without class weights
  const scalar_t total_weight;        // their sum W (V without them)
  at::Tensor* grad_x;  // each may be null: not wanted
  at::Tensor* grad_w;
  at::Tensor* grad_b;

  at::Tensor tiles;    // p.rows * V: block b's (rows, cols_b) tile at offset b * rows * cols
  at::Tensor partial;  // (workers, rows, H): each worker's share of the chunk's grad_x
  // (workers, buffers, rows * cols): with a softcap, exp(z - shift) and then the gradient
  // before the softcap's factor; for the entropy's and log_sum_sq_probs' sums, z - shift
  at::Tensor scratch;
  // Per block b and chunk row i, at b * rows + i: the block's max, sum of exp(z - max), sum of
  // w_j (z_j - max) (label smoothing; w_j = 1 without class weights), first column of the max
  // (return_predicted), the subtracted shift (the max, 0 where it is -inf), the gradient's
  // factor exp(max - lse) a_i, and where asked the sums of exp(z - shift) (z - shift),
  // exp(2 (z - shift)) and z.
  std::vector<scalar_t> bmax, bsum, brel, shift, factor, bu, bq, bz;
  std::vector<int64_t> barg;
  std::vector<scalar_t> zt;  // per chunk row: the target's logit

  ThreeGemmForward(const linear_ce::Flat& flat, const ChunkPlan& plan, const Options& o,
                   double loss_scale, at::Tensor* gx, at::Tensor* gw, at::Tensor* gb)
      : f(flat), p(plan), ignore_index(o.ignore_index), eps(o.label_smoothing), z_loss(o.z_loss),
        scale(static_cast<scalar_t>(loss_scale)), predicted(o.return_predicted),
        inv_t(o.inv_temperature()), entropy(o.return_entropy),
        squares(o.return_log_sum_sq_probs), mean(o.return_mean_logits), options(o),
        capped(o.capped()), cap(o.tempered_cap()),
        cw(linear_ce::ClassWeights::of(o, flat.x.options())),
        weights(cw.defined() ? cw.w.const_data_ptr<scalar_t>() : nullptr),
        total_weight(cw.defined() ? cw.prefix.const_data_ptr<scalar_t>()[flat.V]
                                  : static_cast<scalar_t>(flat.V)),
        grad_x(gx), grad_w(gw), grad_b(gb) {
    const auto opts = f.x.options();
    tiles = at::empty({p.rows * f.V}, opts);
    if (grad_x != nullptr) partial = at::empty({p.workers, p.rows, f.H}, opts);
    const int64_t buffers = int64_t(capped) + int64_t(entropy || squares);
    if (buffers > 0) scratch = at::empty({p.workers, buffers, p.rows * p.cols}, opts);
    const size_t n = static_cast<size_t>(p.blocks * p.rows);
    bmax.resize(n);
    bsum.resize(n);
    brel.resize(n);
    shift.resize(n);
    factor.resize(n);
    if (predicted) barg.resize(n);
    if (entropy) bu.resize(n);
    if (squares) bq.resize(n);
    if (mean) bz.resize(n);
    zt.resize(static_cast<size_t>(p.rows));
  }

  int64_t cols_of(int64_t b) const { return std::min(p.cols, f.V - b * p.cols); }

  // The sum of block b's class weights (its number of classes without them).
  scalar_t weight_of(int64_t b) const {
    if (weights == nullptr) return static_cast<scalar_t>(cols_of(b));
    const scalar_t* prefix = cw.prefix.const_data_ptr<scalar_t>();
    return prefix[b * p.cols + cols_of(b)] - prefix[b * p.cols];
  }

  // Worker w's buffer k of scratch, as a (rows, cols) tile.
  at::Tensor buffer(int64_t w, int64_t k, int64_t rows, int64_t cols) const {
    return scratch[w][k].narrow(0, 0, rows * cols).view({rows, cols});
  }

  at::Tensor tile(int64_t b, int64_t rows) const {
    return tiles.narrow(0, b * p.rows * p.cols, rows * cols_of(b)).view({rows, cols_of(b)});
  }

  // A (rows, 1) column over a per-block vector (block b), for broadcasting over a tile.
  template <typename T>
  at::Tensor column(std::vector<T>& v, int64_t b, int64_t rows, at::ScalarType type) const {
    return at::from_blob(v.data() + b * p.rows, {rows, 1}, f.x.options().dtype(type));
  }

  // Block b of the chunk at rows [r0, r0 + rows): logits (capped), the block's statistics, and
  // the tile left holding exp(z - shift), or with a softcap the capped z, which its gradient
  // needs (worker w's scratch for exp(z - shift) then, and for the per-row outputs' sums).
  void start_block(int64_t b, int64_t r0, int64_t rows, int64_t w) {
    const int64_t c0 = b * p.cols, cols = cols_of(b);
    at::Tensor z = tile(b, rows);
    linear_ce::logits_into(z, f.x.narrow(0, r0, rows), f.weight.narrow(0, c0, cols),
                           f.bias.defined() ? f.bias.narrow(0, c0, cols) : at::Tensor(), inv_t);
    linear_ce::apply_softcap(z, options);
    const at::ScalarType st = f.x.scalar_type();
    if (mean) {
      at::Tensor sums = column(bz, b, rows, st).view({rows});
      at::sum_out(sums, z, {1});
    }
    at::Tensor maxima = column(bmax, b, rows, st).view({rows});
    if (predicted) {
      at::Tensor args = column(barg, b, rows, at::kLong).view({rows});
      at::max_out(maxima, args, z, 1);  // torch's rule: a nan is the max, the first one wins
    } else {
      at::amax_out(maxima, z, {1});
    }
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const int64_t* tp = f.target.const_data_ptr<int64_t>() + r0;
    scalar_t* m = bmax.data() + b * p.rows;
    scalar_t* sh = shift.data() + b * p.rows;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t t = tp[i];
      if (t != ignore_index && t >= c0 && t < c0 + cols) zt[i] = zp[i * cols + t - c0];
      sh[i] = m[i] == neg_inf<scalar_t>() ? scalar_t(0) : m[i];
    }
    at::Tensor e = capped ? buffer(w, 0, rows, cols) : z;  // z - shift, then exp(z - shift)
    at::sub_out(e, z, column(shift, b, rows, st));
    if (eps != 0.0) {
      at::Tensor rel = column(brel, b, rows, st).view({rows});
      if (weights != nullptr) {
        at::mv_out(rel, e, cw.w.narrow(0, c0, cols));
      } else {
        at::sum_out(rel, e, {1});
      }
    }
    at::Tensor d;  // z - shift, kept for the entropy's sum of exp(d) d
    if (entropy || squares) d = buffer(w, capped ? 1 : 0, rows, cols);
    if (entropy) d.copy_(e);
    e.exp_();
    at::Tensor sums = column(bsum, b, rows, st).view({rows});
    at::sum_out(sums, e, {1});
    if (entropy) {  // 0 where exp(d) is 0
      d.mul_(e).nan_to_num_(0.0, 0.0, 0.0);
      at::Tensor u = column(bu, b, rows, st).view({rows});
      at::sum_out(u, d, {1});
    }
    if (squares) {
      at::mul_out(d, e, e);
      at::Tensor q = column(bq, b, rows, st).view({rows});
      at::sum_out(q, d, {1});
    }
  }

  // Block b of the chunk at rows [r0, r0 + rows), whose statistics are final: the tile becomes
  // d loss / d z in place, then its share of grad_x (worker w's), its rows of grad_weight and
  // grad_bias (first: the first chunk, which writes instead of adding). With a softcap the
  // gradient w.r.t. the capped logits is formed in worker w's buffer from exp(z - shift) again,
  // and the tile's capped z becomes its factor 1 - (z / cap)^2.
  void finish_block(int64_t b, int64_t r0, int64_t rows, int64_t w, bool first) {
    const int64_t c0 = b * p.cols, cols = cols_of(b);
    const at::ScalarType st = f.x.scalar_type();
    at::Tensor z = tile(b, rows);
    at::Tensor g = capped ? buffer(w, 0, rows, cols) : z;
    if (capped) at::sub_out(g, z, column(shift, b, rows, st)).exp_();
    g.mul_(column(factor, b, rows, st));
    scalar_t* gp = g.data_ptr<scalar_t>();
    const int64_t* tp = f.target.const_data_ptr<int64_t>() + r0;
    const scalar_t back = scale * static_cast<scalar_t>(inv_t);  // through the temperature
    const scalar_t smooth = back * static_cast<scalar_t>(eps / static_cast<double>(f.V));
    const scalar_t onehot = back * static_cast<scalar_t>(1.0 - eps);
    const scalar_t* wb_class = weights != nullptr ? weights + c0 : nullptr;
    for (int64_t i = 0; i < rows; ++i) {
      scalar_t* row = gp + i * cols;
      const int64_t t = tp[i];
      if (t == ignore_index) continue;  // zeroed below
      if (eps != 0.0 && wb_class != nullptr) {
        for (int64_t j = 0; j < cols; ++j) row[j] -= smooth * wb_class[j];
      } else if (eps != 0.0) {
        for (int64_t j = 0; j < cols; ++j) row[j] -= smooth;
      }
      if (t >= c0 && t < c0 + cols) {
        row[t - c0] -= onehot * (weights != nullptr ? weights[t] : scalar_t(1));
      }
    }
    if (capped) {  // z = g (1 - (z / cap)^2) = g - g z^2 / cap^2, in two sweeps
      z.mul_(z);
      at::addcmul_out(z, g, g, z, -1.0 / (cap * cap));
    }
    scalar_t* zp = z.data_ptr<scalar_t>();
    for (int64_t i = 0; i < rows; ++i) {
      if (tp[i] == ignore_index) std::fill(zp + i * cols, zp + (i + 1) * cols, scalar_t(0));
    }
    const at::Tensor wb = f.weight.narrow(0, c0, cols);
    if (grad_x != nullptr) partial[w].narrow(0, 0, rows).addmm_(z, wb);
    const at::Tensor xr = f.x.narrow(0, r0, rows);
    if (grad_w != nullptr) {
      at::Tensor gw = grad_w->narrow(0, c0, cols);
      if (first) {
        at::mm_out(gw, z.t(), xr);
      } else {
        gw.addmm_(z.t(), xr);
      }
    }
    if (grad_b != nullptr) {
      at::Tensor gb = grad_b->narrow(0, c0, cols);
      if (first) {
        at::sum_out(gb, z, {0});
      } else {
        gb.add_(at::sum(z, {0}));
      }
    }
  }

  // The chunk's rows from the blocks' statistics: lse, lse_lo, the row loss, the argmax, the
  // per-row outputs asked for (Partial's), and each block's gradient factor.
  void finish_rows(int64_t r0, int64_t rows, scalar_t* lse, scalar_t* lse_lo, scalar_t* row_loss,
                   int64_t* pred, Partial& out) {
    scalar_t* ent = entropy ? out.entropy.data_ptr<scalar_t>() : nullptr;
    scalar_t* lss = squares ? out.log_sum_sq_probs.data_ptr<scalar_t>() : nullptr;
    scalar_t* mean_out = mean ? out.mean_logits.data_ptr<scalar_t>() : nullptr;
    const int64_t* tp = f.target.const_data_ptr<int64_t>() + r0;
    const bool smoothing = eps != 0.0;
    for (int64_t i = 0; i < rows; ++i) {
      scalar_t m = neg_inf<scalar_t>();
      int64_t arg = 0;
      for (int64_t b = 0; b < p.blocks; ++b) {
        const scalar_t mb = bmax[b * p.rows + i];
        // a nan max wins over any number, and the first nan over later ones (torch.argmax)
        if (mb > m || (std::isnan(mb) && !std::isnan(m))) {
          m = mb;
          if (predicted) arg = b * p.cols + barg[b * p.rows + i];
        }
      }
      scalar_t s = 0, zrel = 0, u = 0, q = 0, zsum = 0;
      for (int64_t b = 0; b < p.blocks; ++b) {
        const int64_t k = b * p.rows + i;
        if (mean) zsum += bz[k];
        if (bmax[k] == neg_inf<scalar_t>()) {
          if (smoothing) zrel = neg_inf<scalar_t>();
          continue;
        }
        const scalar_t rescale = std::exp(shift[k] - m);
        s += bsum[k] * rescale;
        if (smoothing) zrel += brel[k] + weight_of(b) * (shift[k] - m);
        if (entropy) u += rescale * (bu[k] + (shift[k] - m) * bsum[k]);
        if (squares) q += rescale * rescale * bq[k];
      }
      const int64_t t = tp[i];
      const bool ignored = t == ignore_index;
      const scalar_t ls = std::log(s);
      const scalar_t l = m + ls;
      const scalar_t lo = std::isfinite(l) ? two_sum_lo(m, ls, l) : scalar_t(0);
      lse[r0 + i] = l;
      lse_lo[r0 + i] = lo;
      if (ent != nullptr) ent[r0 + i] = ls - u / s;
      if (lss != nullptr) lss[r0 + i] = std::log(q) - scalar_t(2) * ls;
      if (mean_out != nullptr) mean_out[r0 + i] = zsum / static_cast<scalar_t>(f.V);
      if (pred != nullptr) pred[r0 + i] = ignored ? ignore_index : arg;
      const scalar_t keep = static_cast<scalar_t>(1.0 - eps);
      const scalar_t smooth = static_cast<scalar_t>(eps / static_cast<double>(f.V));
      // the target's weight, and A_i of linear_ce.h without the z-loss: (1 - eps) w_t + eps W / V
      // (1 without class weights)
      const scalar_t wt = weights != nullptr && !ignored ? weights[t] : scalar_t(1);
      const scalar_t weighted =
          weights != nullptr ? keep * wt + smooth * total_weight : scalar_t(1);
      scalar_t loss;
      if (weights != nullptr) {  // F.cross_entropy's weighted form, as linear_ce::row_losses
        loss = (ls - (zt[i] - m)) * wt * keep;
        if (smoothing) loss += (ls * total_weight - zrel) * smooth;
      } else {
        loss = ls - keep * (zt[i] - m);
        if (smoothing) loss -= smooth * zrel;
      }
      row_loss[r0 + i] = ignored ? scalar_t(0) : loss + static_cast<scalar_t>(z_loss) * l * l;
      // softmax_ij a_i = exp(z_ij - shift_ib) exp((shift_ib - lse_i) - lse_lo_i) a_i
      const scalar_t a = ignored ? scalar_t(0)
                                 : scale * (weighted + static_cast<scalar_t>(2 * z_loss) * l) *
                                       static_cast<scalar_t>(inv_t);
      for (int64_t b = 0; b < p.blocks; ++b) {
        const int64_t k = b * p.rows + i;
        factor[k] = bmax[k] == neg_inf<scalar_t>() ? scalar_t(0)
                                                   : std::exp((shift[k] - l) - lo) * a;
      }
    }
  }

  void run(scalar_t* lse, scalar_t* lse_lo, scalar_t* row_loss, int64_t* pred, Partial& out) {
    const int64_t N = f.N;
    int64_t pending = -1, pending_rows = 0;  // the chunk whose gradients are still to come
    for (int64_t r0 = 0; pending >= 0 || r0 < N; r0 += p.rows) {
      const int64_t rows = r0 < N ? std::min(p.rows, N - r0) : 0;
      if (grad_x != nullptr && pending >= 0) partial.zero_();
      cpu_threads::run_tasks(p.blocks, p.workers, [&](int64_t b, int64_t w) {
        if (pending >= 0) finish_block(b, pending, pending_rows, w, pending == 0);
        if (rows > 0) start_block(b, r0, rows, w);
      });
      if (grad_x != nullptr && pending >= 0) {
        at::Tensor gx = grad_x->narrow(0, pending, pending_rows);
        at::sum_out(gx, partial.narrow(1, 0, pending_rows), {0});
      }
      if (rows > 0) finish_rows(r0, rows, lse, lse_lo, row_loss, pred, out);
      pending = rows > 0 ? r0 : -1;
      pending_rows = rows;
    }
  }
};

Partial three_gemm_forward(const linear_ce::Flat& f, int64_t rows, double denominator,
                           const Options& o, std::array<bool, 3> grad_mask) {
  const int64_t N = f.N, H = f.H, V = f.V;
  const auto opts = f.x.options();
  Partial out{at::empty({N}, opts), at::empty({N}, opts), at::empty({N}, opts),
              none_like(f.x),       none_like(f.x),       none_like(f.x)};
  if (grad_mask[0]) out.grad_x = at::empty({N, H}, opts);
  if (grad_mask[1]) out.grad_w = at::empty({V, H}, opts);
  const bool want_b = grad_mask[2] && f.bias.defined();
  if (want_b) out.grad_b = at::empty({V}, opts);
  if (o.return_predicted) out.predicted = at::empty({N}, f.target.options());
  if (o.return_entropy) out.entropy = at::empty({N}, opts);
  if (o.return_log_sum_sq_probs) out.log_sum_sq_probs = at::empty({N}, opts);
  if (o.return_mean_logits) out.mean_logits = at::empty({N}, opts);
  AT_DISPATCH_FLOATING_TYPES(f.x.scalar_type(), kOp, [&] {
    ThreeGemmForward<scalar_t> engine(f, chunk_plan(std::min(rows, N), V), o,
                                      cpu_scale(o, denominator),
                                      grad_mask[0] ? &out.grad_x : nullptr,
                                      grad_mask[1] ? &out.grad_w : nullptr,
                                      want_b ? &out.grad_b : nullptr);
    engine.run(out.lse.data_ptr<scalar_t>(), out.lse_lo.data_ptr<scalar_t>(),
               out.row_loss.data_ptr<scalar_t>(),
               o.return_predicted ? out.predicted.data_ptr<int64_t>() : nullptr, out);
  });
  return out;
}

Partial blocks_forward(const linear_ce::Flat& f, const CpuPlan& cp, double denominator,
                       const Options& o, bool with_grads, std::array<bool, 3> grad_mask) {
  const int64_t N = f.N, H = f.H, V = f.V;
  const auto opts = f.x.options();
  Partial out{at::empty({N}, opts), at::empty({N}, opts), at::empty({N}, opts),
              none_like(f.x),       none_like(f.x),       none_like(f.x)};
  const bool want_x = with_grads && grad_mask[0];
  const bool want_w = with_grads && grad_mask[1];
  const bool want_b = with_grads && grad_mask[2] && f.bias.defined();
  if (want_x) out.grad_x = at::empty({N, H}, opts);
  if (want_w) out.grad_w = at::empty({V, H}, opts);
  if (want_b) out.grad_b = at::empty({V}, opts);
  if (o.return_predicted) out.predicted = at::empty({N}, f.target.options());
  if (o.return_entropy) out.entropy = at::empty({N}, opts);
  if (o.return_log_sum_sq_probs) out.log_sum_sq_probs = at::empty({N}, opts);
  if (o.return_mean_logits) out.mean_logits = at::empty({N}, opts);
  AT_DISPATCH_FLOATING_TYPES(f.x.scalar_type(), kOp, [&] {
    const BlockEngine<scalar_t> engine(f, engine_plan(N, V, H, cp.budget), o);
    const scalar_t scale = static_cast<scalar_t>(cpu_scale(o, denominator));
    scalar_t* lse = out.lse.data_ptr<scalar_t>();
    engine.row_tiles_forward(lse, out.lse_lo.data_ptr<scalar_t>(),
                             out.row_loss.data_ptr<scalar_t>(), scale,
                             want_x ? &out.grad_x : nullptr, out);
    if (want_w || want_b) {
      const GradRows<scalar_t> g =
          grad_rows<scalar_t>(f.target.const_data_ptr<int64_t>(), N, V, lse,
                              out.lse_lo.const_data_ptr<scalar_t>(), &scale, false, nullptr, o);
      engine.class_blocks(lse, g, want_w ? &out.grad_w : nullptr, want_b ? &out.grad_b : nullptr);
    }
  });
  return out;
}

linear_ce::Grads blocks_backward(const linear_ce::Flat& f, const CpuPlan& cp,
                                 const linear_ce::BackwardRows& r, const Options& o,
                                 std::array<bool, 3> grad_mask) {
  const int64_t N = f.N, H = f.H, V = f.V;
  const auto opts = f.x.options();
  at::Tensor grad_x = grad_mask[0] ? at::empty({N, H}, opts) : none_like(f.x);
  at::Tensor grad_w = grad_mask[1] ? at::empty({V, H}, opts) : none_like(f.x);
  const bool want_b = grad_mask[2] && f.bias.defined();
  at::Tensor grad_b = want_b ? at::empty({V}, opts) : none_like(f.x);
  AT_DISPATCH_FLOATING_TYPES(f.x.scalar_type(), kOp, [&] {
    const BlockEngine<scalar_t> engine(f, engine_plan(N, V, H, cp.budget), o);
    const scalar_t* lse = r.lse.const_data_ptr<scalar_t>();
    const GradRows<scalar_t> g = grad_rows<scalar_t>(
        f.target.const_data_ptr<int64_t>(), N, V, lse, r.lse_lo.const_data_ptr<scalar_t>(),
        r.scale.const_data_ptr<scalar_t>(), r.per_row,
        r.grad_lse.defined() ? r.grad_lse.const_data_ptr<scalar_t>() : nullptr, o,
        r.grad_entropy.defined() ? r.grad_entropy.const_data_ptr<scalar_t>() : nullptr,
        r.grad_entropy.defined() ? r.entropy.const_data_ptr<scalar_t>() : nullptr);
    if (grad_mask[0]) engine.row_tiles_backward(lse, g, grad_x);
    if (grad_mask[1] || want_b) {
      engine.class_blocks(lse, g, grad_mask[1] ? &grad_w : nullptr, want_b ? &grad_b : nullptr);
    }
  });
  return {grad_x, grad_w, grad_b};
}

// ---------------------------------------------------------------- the registered kernels

// Small vocabulary blocks of half types (an explicit small chunk_size) run on the calling thread:
// a parallel region per tiny GEMM (and per small operator) costs more than the work, and far
// more on a busy machine.
constexpr int64_t kSerialBlockWork = 1 << 22;  // multiply-adds per block

bool serial_half_blocks(const linear_ce::Flat& f, int64_t chunk_size) {
  const int64_t cols =
      chunk_size > 0 ? chunk_size
                     : linear_ce::auto_chunk(true, false, f.N, f.V, 4);
  return f.N * std::min(cols, f.V) * std::max<int64_t>(f.H, 1) < kSerialBlockWork;
}

linear_ce::Outputs forward_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                               const at::Tensor& target_in,
                               const c10::optional<at::Tensor>& bias_in,
                               GPUFIT_LINEAR_CE_OPTION_PARAMS, std::array<bool, 3> grad_mask) {
  NoAutocast no_autocast;
  const Options o = Options::parse(GPUFIT_LINEAR_CE_OPTION_ARGS);
  linear_ce::check_inputs(x_in, weight_in, target_in, bias_in, o);
  const linear_ce::Flat f = linear_ce::flatten(x_in, weight_in, target_in, bias_in);
  const int64_t count = count_valid(f.target, o.ignore_index, f.V);
  if (linear_ce::is_half(f.x.scalar_type())) {
    std::optional<cpu_threads::OneThread> serial;
    if (serial_half_blocks(f, o.chunk_size)) serial.emplace();
    return linear_ce::forward<CpuKernels>(x_in, weight_in, target_in, bias_in, o, grad_mask);
  }
  const CpuPlan plan = cpu_plan(f.N, f.V, f.H, o.chunk_size);
  const bool with_grads = linear_ce::grads_in_forward(f.x.scalar_type(), o.reduction, grad_mask);
  const bool three_gemms = uses_three_gemms(plan, o, with_grads);
  if (!three_gemms && (plan.kind == CpuPlan::Kind::RowChunks || needs_row_kernels(o) ||
                      (plan.kind == CpuPlan::Kind::OneChunk && !one_chunk_pass_serves(o)))) {
    Options chunked = o;
    chunked.chunk_size = std::max<int64_t>(1, plan.rows);
    return linear_ce::forward<CpuKernels>(x_in, weight_in, target_in, bias_in, chunked,
                                          grad_mask);
  }
  const double denominator = cpu_denominator(f, o, count);
  Partial out = three_gemms ? three_gemm_forward(f, plan.rows, denominator, o, grad_mask)
                : plan.kind == CpuPlan::Kind::Blocks
                    ? blocks_forward(f, plan, denominator, o, with_grads, grad_mask)
                    : one_chunk_forward(f, denominator, o, with_grads, grad_mask);
  at::Tensor loss;
  if (o.reduction == Reduction::None) {
    loss = out.row_loss.view(target_in.sizes());
  } else {
    // a double sum of the row losses; mean over zero valid rows is 0/0 = nan, as in PyTorch
    loss = at::full({}, sum_as_double(out.row_loss) * cpu_scale(o, denominator), f.x.options());
  }
  if (with_grads && grad_mask[0]) out.grad_x = out.grad_x.view(x_in.sizes());
  const auto shaped = [&](const at::Tensor& t, const at::TensorOptions& opts) {
    return t.defined() ? t.view(target_in.sizes()) : at::empty({0}, opts);
  };
  return {loss,
          out.lse.view(target_in.sizes()),
          out.lse_lo.view(target_in.sizes()),
          shaped(out.predicted, f.target.options()),
          shaped(out.entropy, f.x.options()),
          shaped(out.log_sum_sq_probs, f.x.options()),
          shaped(out.mean_logits, f.x.options()),
          out.grad_x,
          out.grad_w,
          out.grad_b};
}

linear_ce::Grads backward_cpu(const at::Tensor& grad_loss,
                              const c10::optional<at::Tensor>& grad_lse,
                              const c10::optional<at::Tensor>& grad_entropy,
                              const at::Tensor& x_in, const at::Tensor& weight_in,
                              const at::Tensor& target_in,
                              const c10::optional<at::Tensor>& bias_in, const at::Tensor& lse,
                              const at::Tensor& lse_lo, const c10::optional<at::Tensor>& entropy,
                              GPUFIT_LINEAR_CE_OPTION_PARAMS, std::array<bool, 3> grad_mask) {
  NoAutocast no_autocast;
  const Options o = Options::parse(GPUFIT_LINEAR_CE_OPTION_ARGS);
  linear_ce::check_inputs(x_in, weight_in, target_in, bias_in, o);
  const linear_ce::Flat f = linear_ce::flatten(x_in, weight_in, target_in, bias_in);
  count_valid(f.target, o.ignore_index, f.V);
  const auto shared = [&](int64_t chunk) {
    Options chunked = o;
    chunked.chunk_size = chunk;
    return linear_ce::backward<CpuKernels>(grad_loss, grad_lse, grad_entropy, x_in, weight_in,
                                           target_in, bias_in, lse, lse_lo, entropy, chunked,
                                           grad_mask);
  };
  if (linear_ce::is_half(f.x.scalar_type())) {
    std::optional<cpu_threads::OneThread> serial;
    if (serial_half_blocks(f, o.chunk_size)) serial.emplace();
    return shared(o.chunk_size);
  }
  const CpuPlan plan = cpu_plan(f.N, f.V, f.H, o.chunk_size);
  if (plan.kind != CpuPlan::Kind::Blocks || needs_row_kernels(o)) {
    return shared(std::max<int64_t>(1, plan.rows));
  }
  const linear_ce::BackwardRows r = linear_ce::backward_rows(
      grad_loss, grad_lse, grad_entropy, target_in, f, lse, lse_lo, entropy, o);
  auto [grad_x, grad_w, grad_b] = blocks_backward(f, plan, r, o, grad_mask);
  if (grad_mask[0]) grad_x = grad_x.view(x_in.sizes());
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(gpufit, CPU, m) {
  m.impl("fused_linear_cross_entropy", &forward_cpu);
  m.impl("fused_linear_cross_entropy_backward", &backward_cpu);
}

}  // namespace gpufit
