// CPU kernels for the steps of a KV-cache decode (fp32, AVX2 + FMA), as XLA FFI handlers that share
// their work out to XLA's intra-op threads. Built and registered by cpu_decode.py.
//
// Mg5jaxPackedMatmul: `y [..., N] = x [..., K] @ w [K, N]` for a few rows, with `w` packed ahead of
// time into 16-column panels `p [ceil(N / 16), K, 16]` (zero-padded) so that each panel is one
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

// Ranges of panels handed out through an atomic counter. The calling thread works too and then waits
// only for ranges other threads have taken, so a helper that a busy pool never starts stalls nothing
// (it finds no work left when it does run; the shared_ptr keeps the job alive until then).
struct Job {
  const float* x;
  const float* p;
  float* y;
  int64_t rows, K, N, panels, per_chunk, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      const int64_t end = std::min(panels, (c + 1) * per_chunk);
      for (int64_t t = c * per_chunk; t < end; ++t)
        for (int64_t m = 0; m < rows; m += kMaxRows)
          kPanelFns[std::min<int64_t>(kMaxRows, rows - m)](x + m * K, p + t * K * kPanel, y + m * N, K, N,
                                                           t * kPanel);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> p,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto pd = p.dimensions();
  const auto yd = y->dimensions();
  if (pd.size() != 3 || pd[2] != kPanel || pd[1] < 1 || xd.size() < 1 || xd.back() != pd[1] ||
      yd.size() != xd.size() || yd.back() < 1 || yd.back() > pd[0] * kPanel ||
      x.element_count() / pd[1] != y->element_count() / yd.back())
    return ffi::Error::InvalidArgument("mg5jax_packed_matmul: expected x [..., K], p [T, K, 16], y [..., N <= 16 T]");
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->p = p.typed_data();
  job->y = y->typed_data();
  job->K = pd[1];
  job->N = yd.back();
  job->rows = x.element_count() / job->K;
  job->panels = pd[0];
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  job->per_chunk = std::max<int64_t>(1, job->panels / (4 * threads));  // about four ranges per thread
  job->chunks = (job->panels + job->per_chunk - 1) / job->per_chunk;
  for (int64_t t = 1; t < std::min(threads, job->chunks); ++t) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->chunks) _mm_pause();
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
  int64_t s = 0;
  const __m256 vmx = _mm256_set1_ps(mx);
  for (; s + 8 <= S; s += 8) {
    const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(w + s), vmx));
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, e);
    for (int j = 0; j < 8; ++j) w[s + j] = valid == 0 ? 1.f : (mask[s + j] ? tmp[j] : 0.f);
  }
  for (; s < S; ++s) w[s] = valid == 0 ? 1.f : (mask[s] ? std::exp(w[s] - mx) : 0.f);
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

// Query rows (b, h) handed out in ranges through an atomic counter, as Job does for panels; each
// thread keeps its own score buffer.
struct AttentionJob {
  const float *q, *k, *v;
  const bool* mask;
  float* out;
  int64_t heads, kv_heads, S, D, per_chunk, chunks, pairs;
  float scale;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    std::vector<float> w(S);
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      const int64_t end = std::min(pairs, (c + 1) * per_chunk);
      for (int64_t i = c * per_chunk; i < end; ++i) {
        const int64_t b = i / heads, h = i % heads, g = h / (heads / kv_heads);
        const int64_t kv = (b * kv_heads + g) * S * D;
        AttendRow(q + i * D, k + kv, v + kv, mask + b * S, out + i * D, S, D, scale, w.data());
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, float scale,
                           ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[1] != 1 || kd[0] != qd[0] || kd[3] != qd[3] || kd[1] < 1 ||
      qd[2] % kd[1] != 0 || v.element_count() != k.element_count() || v.dimensions()[2] != kd[2] ||
      mask.element_count() != kd[0] * kd[2])
    return ffi::Error::InvalidArgument(
        "mg5jax_decode_attention: expected q [B, 1, H, D], k and v [B, Hkv, S, D] (H a multiple of Hkv), "
        "mask [B, 1, 1, S]");
  auto job = std::make_shared<AttentionJob>();
  job->q = q.typed_data();
  job->k = k.typed_data();
  job->v = v.typed_data();
  job->mask = mask.typed_data();
  job->out = out->typed_data();
  job->heads = qd[2];
  job->kv_heads = kd[1];
  job->S = kd[2];
  job->D = kd[3];
  job->scale = scale;
  job->pairs = qd[0] * qd[2];
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  job->per_chunk = std::max<int64_t>(1, job->pairs / (4 * threads));
  job->chunks = (job->pairs + job->per_chunk - 1) / job->per_chunk;
  for (int64_t t = 1; t < std::min(threads, job->chunks); ++t) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->chunks) _mm_pause();
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
