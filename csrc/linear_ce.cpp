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
  TORCH_CHECK(t == ignore_index || (t >= 0 && t < V), kOp, ": target ", t,
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

}  // namespace

TORCH_LIBRARY_IMPL(gpufit, CPU, m) {
  m.impl("fused_linear_cross_entropy", &linear_ce::forward<CpuKernels>);
  m.impl("fused_linear_cross_entropy_backward", &linear_ce::backward<CpuKernels>);
}

}  // namespace gpufit
