// Autocast and gpufit's kernels.
//
// gpufit's forward ops take part in autocast like PyTorch's own F.linear (a "lower precision"
// op): where autocast is on for the inputs' device, floating inputs other than float64 are cast
// to the autocast dtype before the op runs (csrc/autocast.cpp registers those casts for the
// AutocastCPU and AutocastCUDA keys). Inside, nothing may be cast again: a backend kernel's
// GEMMs are part of the op, not separate ops for autocast to pick a precision for. A kernel can
// also be reached with autocast on without passing the Autocast key (a backward op, which the
// autograd engine runs with the thread's autocast state), so every backend kernel opens with
// NoAutocast.
#pragma once
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace gpufit {

// While alive, no operator this thread calls is autocast.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace gpufit
