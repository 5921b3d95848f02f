// CPU kernels for LLM inference (fp32, AVX2 + FMA): KV-cache decode steps and prefills, as XLA FFI
// handlers that share their work out to XLA's intra-op threads. Built and registered by cpu_decode.py.
//
// Mg5jaxPackedMatmul: `y [..., N] = x [..., K] @ w [K, N]` for any number of rows, with `w` packed ahead
// of time into 16-column panels `p [ceil(N / 16), K, 16]` (zero-padded) so that each panel is one
// contiguous stream. Each panel meets every block of up to six rows while it is in cache.
//
// Mg5jaxDecodeAttention: one query per row against its KV cache, softmax(q k^T * scale) v over the
// unmasked slots, in one call where XLA runs about ten small programs.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 16;  // columns per panel: two 8-float registers

// R rows of x [R, K] against one panel p [K, 16], into columns n0.. of y [R, N]. U independent partial
// sums per row along k keep the FMA pipelines full when R is small. Every loop over u, r and h is
// unrolled, so the accumulators live in registers (R = 6: 12 of the 16). A pass of three or more rows
// (the first over a panel) prefetches 2 KiB ahead: at batch 8 the arithmetic hides the memory latency
// less than a single row's pass does, where the hardware prefetcher alone keeps up.
template <int R, int U>
void Panel(const float* x, const float* p, float* y, int64_t K, int64_t N, int64_t n0) {
  __m256 acc[U][R][2];
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[u][r][0] = acc[u][r][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + U <= K; k += U) {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      if (R >= 3) _mm_prefetch(reinterpret_cast<const char*>(p + (k + u + 32) * kPanel), _MM_HINT_T0);
      const __m256 w0 = _mm256_loadu_ps(p + (k + u) * kPanel);
      const __m256 w1 = _mm256_loadu_ps(p + (k + u) * kPanel + 8);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m256 xb = _mm256_broadcast_ss(x + r * K + k + u);
        acc[u][r][0] = _mm256_fmadd_ps(xb, w0, acc[u][r][0]);
        acc[u][r][1] = _mm256_fmadd_ps(xb, w1, acc[u][r][1]);
      }
    }
  }
  for (; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(p + k * kPanel);
    const __m256 w1 = _mm256_loadu_ps(p + k * kPanel + 8);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * K + k);
      acc[0][r][0] = _mm256_fmadd_ps(xb, w0, acc[0][r][0]);
      acc[0][r][1] = _mm256_fmadd_ps(xb, w1, acc[0][r][1]);
    }
  }
#pragma GCC unroll 16
  for (int u = 1; u < U; ++u)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      acc[0][r][0] = _mm256_add_ps(acc[0][r][0], acc[u][r][0]);
      acc[0][r][1] = _mm256_add_ps(acc[0][r][1], acc[u][r][1]);
    }
  const int64_t width = std::min<int64_t>(kPanel, N - n0);  // the last panel may be partly padding
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    alignas(32) float tmp[kPanel];
    float* out = width == kPanel ? y + r * N + n0 : tmp;
    _mm256_storeu_ps(out, acc[0][r][0]);
    _mm256_storeu_ps(out + 8, acc[0][r][1]);
    if (width != kPanel) std::copy(tmp, tmp + width, y + r * N + n0);
  }
}

using PanelFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t);
constexpr int kMaxRows = 6;
constexpr PanelFn kPanelFns[kMaxRows + 1] = {nullptr,      Panel<1, 4>, Panel<2, 2>, Panel<3, 1>,
                                             Panel<4, 1>, Panel<5, 1>, Panel<6, 1>};

// body(begin, end) over the items [0, n), in about four ranges per thread handed out through an atomic
// counter. The calling thread works too and then waits only for ranges other threads have taken, so a
// helper that a busy pool never starts stalls nothing (it finds no range left when it does run; the
// shared_ptr keeps the counters alive until then, and it never calls body).
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, Body body) {
  struct Shared {
    Shared(Body body, int64_t n, int64_t per_range)
        : body(body), n(n), per_range(per_range), ranges((n + per_range - 1) / per_range) {}
    Body body;
    int64_t n, per_range, ranges;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};

    void Work() {
      for (int64_t r; (r = next.fetch_add(1, std::memory_order_relaxed)) < ranges;) {
        body(r * per_range, std::min(n, (r + 1) * per_range));
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto shared = std::make_shared<Shared>(body, n, std::max<int64_t>(1, n / (4 * threads)));
  for (int64_t t = 1; t < std::min(threads, shared->ranges); ++t) pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  while (shared->done.load(std::memory_order_acquire) < shared->ranges) _mm_pause();
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> p,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto pd = p.dimensions();
  const auto yd = y->dimensions();
  if (pd.size() != 3 || pd[2] != kPanel || pd[1] < 1 || xd.size() < 1 || xd.back() != pd[1] ||
      yd.size() != xd.size() || yd.back() < 1 || yd.back() > pd[0] * kPanel ||
      x.element_count() / pd[1] != y->element_count() / yd.back())
    return ffi::Error::InvalidArgument("mg5jax_packed_matmul: expected x [..., K], p [T, K, 16], y [..., N <= 16 T]");
  const float* xs = x.typed_data();
  const float* ps = p.typed_data();
  float* ys = y->typed_data();
  const int64_t K = pd[1], N = yd.back(), rows = x.element_count() / K;
  ParallelFor(pool, pd[0], [=](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t m = 0; m < rows; m += kMaxRows)
        kPanelFns[std::min<int64_t>(kMaxRows, rows - m)](xs + m * K, ps + t * K * kPanel, ys + m * N, K, N,
                                                         t * kPanel);
  });
  return ffi::Error::Success();
}

// exp(x) for 8 floats (Cephes' single-precision polynomial; x clamped to [-88.38, 88.38]).
inline __m256 Exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float Dot(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  s0 = _mm256_add_ps(s0, s1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float s = _mm_cvtss_f32(h);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// One query row (batch b, head h) of a decode step: softmax(q k^T * scale, masked) v over S slots.
void AttendRow(const float* q, const float* k, const float* v, const bool* mask, float* out, int64_t S, int64_t D,
               float scale, float* w) {
  float mx = -FLT_MAX;
  int64_t valid = 0;
  for (int64_t s = 0; s < S; ++s) {
    w[s] = 0.f;
    if (mask[s]) {
      w[s] = Dot(q, k + s * D, D) * scale;
      mx = std::max(mx, w[s]);
      ++valid;
    }
  }
  // as the reference's softmax over finfo.min-masked scores: masked slots weigh exactly 0; a row with
  // no valid slot weighs all slots equally
  if (valid == 0) {
    std::fill(w, w + S, 1.f);
  } else {
    int64_t s = 0;
    const __m256 vmx = _mm256_set1_ps(mx);
    for (; s + 8 <= S; s += 8) {
      alignas(32) float e[8];
      _mm256_store_ps(e, Exp8(_mm256_sub_ps(_mm256_loadu_ps(w + s), vmx)));
      for (int j = 0; j < 8; ++j) w[s + j] = mask[s + j] ? e[j] : 0.f;
    }
    for (; s < S; ++s) w[s] = mask[s] ? std::exp(w[s] - mx) : 0.f;
  }
  float total = 0.f;
  std::fill(out, out + D, 0.f);
  for (int64_t t = 0; t < S; ++t) {
    if (w[t] == 0.f) continue;
    total += w[t];
    const __m256 wt = _mm256_set1_ps(w[t]);
    const float* vt = v + t * D;
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      _mm256_storeu_ps(out + d, _mm256_fmadd_ps(wt, _mm256_loadu_ps(vt + d), _mm256_loadu_ps(out + d)));
    for (; d < D; ++d) out[d] += w[t] * vt[d];
  }
  const float inv = 1.f / total;
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, float scale,
                           ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[1] != 1 || kd[0] != qd[0] || kd[3] != qd[3] || kd[1] < 1 ||
      qd[2] % kd[1] != 0 || v.dimensions().size() != 4 || v.element_count() != k.element_count() ||
      v.dimensions()[2] != kd[2] || static_cast<int64_t>(mask.element_count()) != kd[0] * kd[2])
    return ffi::Error::InvalidArgument(
        "mg5jax_decode_attention: expected q [B, 1, H, D], k and v [B, Hkv, S, D] (H a multiple of Hkv), "
        "mask [B, 1, 1, S]");
  const float *qs = q.typed_data(), *ks = k.typed_data(), *vs = v.typed_data();
  const bool* masks = mask.typed_data();
  float* outs = out->typed_data();
  const int64_t heads = qd[2], kv_heads = kd[1], S = kd[2], D = kd[3];
  ParallelFor(pool, qd[0] * heads, [=](int64_t begin, int64_t end) {  // query rows (b, h)
    std::vector<float> w(S);  // the row's scores, then weights
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / heads, g = i % heads / (heads / kv_heads);
      const int64_t kv = (b * kv_heads + g) * S * D;
      AttendRow(qs + i * D, ks + kv, vs + kv, masks + b * S, outs + i * D, S, D, scale, w.data());
    }
  });
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Mg5jaxDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Mg5jaxPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
