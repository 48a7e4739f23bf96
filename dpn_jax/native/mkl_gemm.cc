// XLA FFI handler: C = op(A) op(B) with bfloat16 A, B and a float32 C, computed by MKL's
// cblas_gemm_bf16bf16f32 (AMX tiles on CPUs that have them). Built and loaded by
// dpn_jax/nn/mkl_matmul.py, which resolves the MKL function at run time and hands it over, so
// this file needs only jaxlib's FFI headers to compile.
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// MKL's LP64 interface: enums and MKL_INT are int.
using GemmFn = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                        const void* a, int lda, const void* b, int ldb, float beta, float* c,
                        int ldc);
static GemmFn gemm = nullptr;
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr int64_t kMaxInt = 2147483647;

extern "C" void dpn_jax_set_gemm(void* fn) { gemm = reinterpret_cast<GemmFn>(fn); }

static ffi::Error Bf16Gemm(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                           ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  if (gemm == nullptr) return ffi::Error::Internal("dpn_jax: the MKL gemm was not set");
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) {
    return ffi::Error::InvalidArgument("dpn_jax bf16 gemm: 2-D operands expected");
  }
  const int64_t m = trans_a ? ad[1] : ad[0], k = trans_a ? ad[0] : ad[1];
  const int64_t n = trans_b ? bd[0] : bd[1];
  if ((trans_b ? bd[1] : bd[0]) != k) {
    return ffi::Error::InvalidArgument("dpn_jax bf16 gemm: contracting dimensions differ");
  }
  if (m > kMaxInt || n > kMaxInt || k > kMaxInt || ad[1] > kMaxInt || bd[1] > kMaxInt) {
    return ffi::Error::InvalidArgument("dpn_jax bf16 gemm: a dimension exceeds MKL's 32-bit ints");
  }
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum; MKL rejects a leading dimension of 0
    std::memset(c->typed_data(), 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }
  gemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k, 1.0f,
       a.typed_data(), ad[1], b.typed_data(), bd[1], 0.0f, c->typed_data(), n);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpnJaxBf16Gemm, Bf16Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
