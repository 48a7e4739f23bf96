// XLA FFI handler: lazy Adam on the embedding rows a batch used, in place.
//
// For each slot j with row r = slots[j] < V (slots hold each row once; V marks padding):
//   m = b1 m[r] + (1 - b1) g_j;  v = b2 v[r] + (1 - b2) g_j^2;
//   table[r] -= lr (m / bc1) / (sqrt(v / bc2) + eps);  m[r] = m;  v[r] = v
// the formulas of dpn_jax/train/lazy_adam.py, one pass over the rows instead of XLA's two
// gathers and three scatters (each an element-wise loop over all slots). table, m and v are
// aliased to the outputs (input_output_aliases), so the update is in place.
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error SparseAdam(ffi::Buffer<ffi::F32> table_in, ffi::Buffer<ffi::F32> mu_in,
                             ffi::Buffer<ffi::F32> nu_in, ffi::Buffer<ffi::S32> slots,
                             ffi::Buffer<ffi::F32> grads, ffi::Buffer<ffi::F32> scalars,
                             ffi::ResultBuffer<ffi::F32> table, ffi::ResultBuffer<ffi::F32> mu,
                             ffi::ResultBuffer<ffi::F32> nu, float b1, float b2, float eps) {
  auto td = table_in.dimensions();
  auto gd = grads.dimensions();
  if (td.size() != 2 || gd.size() != 2 || td[1] != gd[1] || slots.element_count() != gd[0] ||
      mu_in.element_count() != table_in.element_count() ||
      nu_in.element_count() != table_in.element_count() || scalars.element_count() != 3) {
    return ffi::Error::InvalidArgument("dpn_jax sparse adam: inconsistent shapes");
  }
  const int64_t rows = td[0], dim = td[1], n = gd[0];
  const size_t bytes = sizeof(float) * rows * dim;
  // aliased outputs are the inputs; copy only if XLA ever hands out separate buffers
  if (table->typed_data() != table_in.typed_data()) std::memcpy(table->typed_data(), table_in.typed_data(), bytes);
  if (mu->typed_data() != mu_in.typed_data()) std::memcpy(mu->typed_data(), mu_in.typed_data(), bytes);
  if (nu->typed_data() != nu_in.typed_data()) std::memcpy(nu->typed_data(), nu_in.typed_data(), bytes);
  float* t = table->typed_data();
  float* m = mu->typed_data();
  float* v = nu->typed_data();
  const int32_t* s = slots.typed_data();
  const float* g = grads.typed_data();
  const float lr = scalars.typed_data()[0], bc1 = scalars.typed_data()[1], bc2 = scalars.typed_data()[2];
  // Each row appears once, so slices of the slots update disjoint rows: split them over threads.
  // The rows are scattered over tables far larger than the caches; the loop waits on memory, so
  // each thread fetches a few rows ahead of use.
  auto update = [=](int64_t lo, int64_t hi) {
    constexpr int64_t kAhead = 32;
    for (int64_t j = lo; j < hi; ++j) {
      if (j + kAhead < hi) {
        const int64_t ra = s[j + kAhead];
        if (ra >= 0 && ra < rows) {  // first and last element: a row may span two cache lines
          for (float* base : {t, m, v}) {
            __builtin_prefetch(base + ra * dim, 1);
            __builtin_prefetch(base + ra * dim + dim - 1, 1);
          }
        }
      }
      const int64_t r = s[j];
      if (r < 0 || r >= rows) continue;  // padding slot
      float* tr = t + r * dim;
      float* mr = m + r * dim;
      float* vr = v + r * dim;
      const float* gj = g + j * dim;
      for (int64_t k = 0; k < dim; ++k) {
        const float mk = b1 * mr[k] + (1.0f - b1) * gj[k];
        const float vk = b2 * vr[k] + (1.0f - b2) * gj[k] * gj[k];
        tr[k] += -lr * (mk / bc1) / (std::sqrt(vk / bc2) + eps);
        mr[k] = mk;
        vr[k] = vk;
      }
    }
  };
  const int64_t threads = std::min<int64_t>({4, std::max(1u, std::thread::hardware_concurrency()),
                                             n / 16384 + 1});
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < threads; ++i) pool.emplace_back(update, n * i / threads, n * (i + 1) / threads);
  update(0, n / threads);
  for (auto& th : pool) th.join();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpnJaxSparseAdam, SparseAdam,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("eps"));
