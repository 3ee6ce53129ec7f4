// fused_linear_cross_entropy on the CPU: the chunk loops and GEMMs are in linear_ce.h; here are
// the two row-wise passes over a chunk of logits, parallel over rows (at::parallel_for, OpenMP).
// Each row is a few hundred KB at most, so its two sweeps (max, then exp-sum) stay in cache.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "linear_ce.h"

namespace gpufit {
namespace {

using linear_ce::kOp;

inline void check_target(int64_t t, int64_t ignore_index, int64_t V) {
  // A ValueError in Python, like every other bad argument the wrapper refuses.
  TORCH_CHECK_VALUE(t == ignore_index || (t >= 0 && t < V), kOp, ": target ", t,
              " is out of range for ", V, " classes (and is not ignore_index=", ignore_index, ")");
}

// Rows per parallel task: enough work per task to amortise the scheduling.
inline int64_t grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

struct CpuKernels {
  static void stats(const at::Tensor& z, int64_t col0, const at::Tensor& target,
                    int64_t ignore_index, int64_t V, at::Tensor& m, at::Tensor& s, at::Tensor& zt,
                    at::Tensor& zsum) {
    const int64_t rows = z.size(0), cols = z.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), kOp, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      const int64_t* tp = target.const_data_ptr<int64_t>();
      acc_t* mp = m.data_ptr<acc_t>();
      acc_t* sp = s.data_ptr<acc_t>();
      acc_t* ztp = zt.data_ptr<acc_t>();
      acc_t* zsp = zsum.data_ptr<acc_t>();
      at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t* row = zp + i * cols;
          const int64_t t = tp[i];
          check_target(t, ignore_index, V);
          acc_t block_max = -std::numeric_limits<acc_t>::infinity();
          acc_t total = acc_t(0);
          for (int64_t j = 0; j < cols; ++j) {
            const acc_t v = static_cast<acc_t>(row[j]);
            block_max = v > block_max ? v : block_max;
            total += v;
          }
          const acc_t m_old = mp[i];
          const acc_t m_new = block_max > m_old ? block_max : m_old;
          if (m_new != -std::numeric_limits<acc_t>::infinity()) {
            acc_t sum = acc_t(0);
            for (int64_t j = 0; j < cols; ++j) sum += std::exp(static_cast<acc_t>(row[j]) - m_new);
            sp[i] = sp[i] * std::exp(m_old - m_new) + sum;
            mp[i] = m_new;
          }
          zsp[i] += total;
          if (t >= col0 && t < col0 + cols) ztp[i] = static_cast<acc_t>(row[t - col0]);
        }
      });
    });
  }

  static void grad(at::Tensor& z, int64_t col0, const at::Tensor& target, int64_t ignore_index,
                   int64_t V, const at::Tensor& lse, const at::Tensor& scale, bool per_row,
                   double eps, double z_loss) {
    const int64_t rows = z.size(0), cols = z.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), kOp, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* zp = z.data_ptr<scalar_t>();
      const int64_t* tp = target.const_data_ptr<int64_t>();
      const acc_t* lp = lse.const_data_ptr<acc_t>();
      const acc_t* cp = scale.const_data_ptr<acc_t>();
      const acc_t smooth = static_cast<acc_t>(eps / static_cast<double>(V));
      at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          scalar_t* row = zp + i * cols;
          const int64_t t = tp[i];
          check_target(t, ignore_index, V);
          if (t == ignore_index) {
            std::fill(row, row + cols, scalar_t(0));
            continue;
          }
          const acc_t c = cp[per_row ? i : 0];
          const acc_t l = lp[i];
          const acc_t a = c * (acc_t(1) + acc_t(2 * z_loss) * l);
          const acc_t b = c * smooth;
          const bool has_target = t >= col0 && t < col0 + cols;
          const acc_t z_target = has_target ? static_cast<acc_t>(row[t - col0]) : acc_t(0);
          for (int64_t j = 0; j < cols; ++j) {
            row[j] = static_cast<scalar_t>(std::exp(static_cast<acc_t>(row[j]) - l) * a - b);
          }
          // The one-hot term, computed from the saved logit so half types round only once.
          if (has_target) {
            row[t - col0] = static_cast<scalar_t>(std::exp(z_target - l) * a - b -
                                                  c * static_cast<acc_t>(1.0 - eps));
          }
        }
      });
    });
  }
};

// One pass per row of a chunk of logits for the fp32/fp64 row-chunk forward: max, log-sum-exp,
// the row's loss and, with grads, d loss / d z in place. Each exp is taken once and kept in the
// row (still in cache) for the gradient, which is then one multiply-add per element.
template <typename scalar_t>
struct RowPass {
  const int64_t* target;
  int64_t ignore_index, V;
  scalar_t eps, z_loss, scale;  // scale: d loss / d (row loss), 1/count (mean) or 1 (sum)
  bool with_grads;

  // Returns the row's loss (0 when ignored) and writes its log-sum-exp.
  scalar_t operator()(scalar_t* row, int64_t i, scalar_t& lse_out) const {
    const int64_t t = target[i];  // in range: count_valid checked every target already
    const bool ignored = t == ignore_index;
    scalar_t m = -std::numeric_limits<scalar_t>::infinity();
    scalar_t zsum = scalar_t(0);
    for (int64_t j = 0; j < V; ++j) {
      const scalar_t v = row[j];
      m = v > m ? v : m;
      zsum += v;
    }
    const scalar_t zt = ignored ? scalar_t(0) : row[t];
    scalar_t s = scalar_t(0);
    if (with_grads && !ignored) {
      for (int64_t j = 0; j < V; ++j) {
        const scalar_t e = std::exp(row[j] - m);
        row[j] = e;
        s += e;
      }
    } else {
      for (int64_t j = 0; j < V; ++j) s += std::exp(row[j] - m);
    }
    const scalar_t lse = m + std::log(s);
    lse_out = lse;
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
    return lse - (scalar_t(1) - eps) * zt - eps / static_cast<scalar_t>(V) * zsum +
           z_loss * lse * lse;
  }
};

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
  at::Tensor row_loss, lse, grad_x, grad_w, grad_b;
};

// Row chunks (each chunk sees the whole vocabulary, 3 GEMMs per chunk): per-row work in one C++
// pass, so a small head (MNIST: 64 x 10 logits) costs a handful of ATen calls.
Partial rows_forward(const linear_ce::Flat& f, int64_t rows_max, int64_t count,
                     int64_t ignore_index, linear_ce::Reduction reduction, double eps,
                     double z_loss, bool with_grads, std::array<bool, 3> grad_mask) {
  const int64_t N = f.N, H = f.H, V = f.V;
  const bool want_bias_grad = with_grads && grad_mask[2] && f.bias.defined();
  const bool one_chunk = N > 0 && rows_max >= N;
  Partial out;
  out.lse = at::empty({N}, f.x.options());
  out.row_loss = at::empty({N}, f.x.options());
  out.grad_x = at::empty({0}, f.x.options());
  out.grad_w = at::empty({0}, f.x.options());
  out.grad_b = at::empty({0}, f.x.options());
  if (with_grads && grad_mask[0]) out.grad_x = at::empty({N, H}, f.x.options());
  // Several chunks accumulate into grad_w / grad_b; a single chunk writes them in one go.
  if (with_grads && grad_mask[1] && !one_chunk) out.grad_w = at::zeros({V, H}, f.x.options());
  if (want_bias_grad && !one_chunk) out.grad_b = at::zeros({V}, f.x.options());

  at::Tensor buf = at::empty({N > 0 ? rows_max * V : 0}, f.x.options());
  AT_DISPATCH_FLOATING_TYPES(f.x.scalar_type(), kOp, [&] {
    const double scale =
        reduction == linear_ce::Reduction::Mean ? 1.0 / static_cast<double>(count) : 1.0;
    const RowPass<scalar_t> pass{f.target.const_data_ptr<int64_t>(), ignore_index, V,
                                 static_cast<scalar_t>(eps), static_cast<scalar_t>(z_loss),
                                 static_cast<scalar_t>(scale), with_grads};
    scalar_t* lp = out.lse.data_ptr<scalar_t>();
    scalar_t* rp = out.row_loss.data_ptr<scalar_t>();
    for (int64_t r0 = 0; r0 < N; r0 += rows_max) {
      const int64_t rows = std::min(rows_max, N - r0);
      at::Tensor xc = f.x.narrow(0, r0, rows);
      at::Tensor z = linear_ce::chunk_view(buf, rows, V);
      linear_ce::logits_into(z, xc, f.weight, f.bias);
      scalar_t* zp = z.data_ptr<scalar_t>();
      at::parallel_for(0, rows, grain(V), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) rp[r0 + i] = pass(zp + i * V, r0 + i, lp[r0 + i]);
      });
      if (!with_grads) continue;
      if (grad_mask[0]) {
        at::Tensor gx = out.grad_x.narrow(0, r0, rows);
        at::mm_out(gx, z, f.weight);
      }
      if (grad_mask[1]) {
        if (one_chunk) {
          out.grad_w = at::mm(z.t(), xc);
        } else {
          out.grad_w.addmm_(z.t(), xc);
        }
      }
      if (want_bias_grad) {
        if (one_chunk) {
          out.grad_b = at::sum(z, {0});
        } else {
          out.grad_b.add_(at::sum(z, {0}));
        }
      }
    }
  });
  return out;
}

// Vocabulary blocks (all N rows, `cols` classes per block): a first sweep takes the online
// log-sum-exp, a second recomputes each block's logits and writes its gradient (4 GEMMs in all
// instead of 3), so the scratch is N x cols however large V is, and grad_weight is written
// block by block instead of being re-read and re-written once per row chunk.
Partial blocks_forward(const linear_ce::Flat& f, int64_t cols_max, int64_t count,
                       int64_t ignore_index, linear_ce::Reduction reduction, double eps,
                       double z_loss, bool with_grads, std::array<bool, 3> grad_mask) {
  const int64_t N = f.N, H = f.H, V = f.V;
  const auto opts = f.x.options();
  at::Tensor m = at::full({N}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor s = at::zeros({N}, opts);
  at::Tensor zt = at::zeros({N}, opts);
  at::Tensor zsum = at::zeros({N}, opts);
  at::Tensor buf = at::empty({N * cols_max}, opts);
  auto block = [&](int64_t c0) {
    const int64_t cols = std::min(cols_max, V - c0);
    at::Tensor z = linear_ce::chunk_view(buf, N, cols);
    linear_ce::logits_into(z, f.x, f.weight.narrow(0, c0, cols),
                           f.bias.defined() ? f.bias.narrow(0, c0, cols) : at::Tensor());
    return z;
  };
  for (int64_t c0 = 0; c0 < V; c0 += cols_max) {
    at::Tensor z = block(c0);
    CpuKernels::stats(z, c0, f.target, ignore_index, V, m, s, zt, zsum);
  }
  Partial out;
  out.lse = m + s.log();
  const at::Tensor valid = f.target != ignore_index;
  out.row_loss = linear_ce::row_losses(out.lse, zt, zsum, valid, V, eps, z_loss);
  out.grad_x = at::empty({0}, opts);
  out.grad_w = at::empty({0}, opts);
  out.grad_b = at::empty({0}, opts);
  if (!with_grads) return out;
  const bool want_bias_grad = grad_mask[2] && f.bias.defined();
  if (grad_mask[0]) out.grad_x = at::zeros({N, H}, opts);
  if (grad_mask[1]) out.grad_w = at::empty({V, H}, opts);
  if (want_bias_grad) out.grad_b = at::empty({V}, opts);
  const at::Tensor scale = at::full(
      {}, reduction == linear_ce::Reduction::Mean ? 1.0 / static_cast<double>(count) : 1.0,
      opts);
  for (int64_t c0 = 0; c0 < V; c0 += cols_max) {
    const int64_t cols = std::min(cols_max, V - c0);
    at::Tensor z = block(c0);
    CpuKernels::grad(z, c0, f.target, ignore_index, V, out.lse, scale, /*per_row=*/false, eps,
                     z_loss);
    if (grad_mask[0]) out.grad_x.addmm_(z, f.weight.narrow(0, c0, cols));
    if (grad_mask[1]) {
      at::Tensor gw = out.grad_w.narrow(0, c0, cols);
      at::mm_out(gw, z.t(), f.x);
    }
    if (want_bias_grad) {
      at::Tensor gb = out.grad_b.narrow(0, c0, cols);
      at::sum_out(gb, z, {0});
    }
  }
  return out;
}

// The CPU forward for fp32/fp64 (half types take the shared vocabulary-block path in
// linear_ce.h, which computes gradients in backward). Same contract as linear_ce::forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& target_in,
    const c10::optional<at::Tensor>& bias_in, int64_t ignore_index, c10::string_view reduction_s,
    double eps, double z_loss, int64_t chunk_size, std::array<bool, 3> grad_mask) {
  if (linear_ce::is_half(x_in.scalar_type())) {
    return linear_ce::forward<CpuKernels>(x_in, weight_in, target_in, bias_in, ignore_index,
                                          reduction_s, eps, z_loss, chunk_size, grad_mask);
  }
  linear_ce::check_inputs(x_in, weight_in, target_in, bias_in, eps, z_loss);
  const auto reduction = linear_ce::parse_reduction(reduction_s);
  const linear_ce::Flat f = linear_ce::flatten(x_in, weight_in, target_in, bias_in);
  const int64_t N = f.N, V = f.V;
  const bool with_grads = linear_ce::grads_in_forward(f.x.scalar_type(), reduction, grad_mask);
  const int64_t count = count_valid(f.target, ignore_index, V);
  const auto plan = linear_ce::cpu_plan(N, V, f.H, chunk_size);
  Partial out = plan.vocab_blocks
                    ? blocks_forward(f, plan.size, count, ignore_index, reduction, eps, z_loss,
                                     with_grads, grad_mask)
                    : rows_forward(f, plan.size, count, ignore_index, reduction, eps, z_loss,
                                   with_grads, grad_mask);
  at::Tensor loss;
  if (reduction == linear_ce::Reduction::None) {
    loss = out.row_loss.view(target_in.sizes());
  } else {
    // a double sum of the row losses; mean over zero valid rows is 0/0 = nan, as in PyTorch
    const double total = sum_as_double(out.row_loss);
    loss = at::full({}, reduction == linear_ce::Reduction::Mean
                            ? total / static_cast<double>(count)
                            : total,
                    f.x.options());
  }
  if (with_grads && grad_mask[0]) out.grad_x = out.grad_x.view(x_in.sizes());
  return {loss, out.lse.view(target_in.sizes()), out.grad_x, out.grad_w, out.grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(gpufit, CPU, m) {
  m.impl("fused_linear_cross_entropy", &forward_cpu);
  m.impl("fused_linear_cross_entropy_backward", &linear_ce::backward<CpuKernels>);
}

}  // namespace gpufit
