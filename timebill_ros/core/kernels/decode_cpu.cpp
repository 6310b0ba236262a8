// One-token (decode) kernels for x86 CPUs with AVX2 + FMA.
//
// Built once per ISA by build.py (avx2; avx512 adds VNNI's fused multiply-add of int16 pairs
// and EVEX encodings with 32 vector registers); the loader picks the variant the CPU runs.
//
// A decode step multiplies one activation row by every weight once, so its time is the bytes
// read plus the work to unpack them. torch's int4 CPU kernel is fast only on AVX-512 with bf16
// inputs; here the activation row is quantised to int16 per block of 32 and
// multiplied with 4-bit or 8-bit weights by integer multiply-adds, 32 weights per few
// instructions. Attention for one query reads each cached key and value once, split along the
// cache so both cores share even a single KV head, and merges the splits by log-sum-exp.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  lo = _mm_add_ss(lo, sh);
  return _mm_cvtss_f32(lo);
}

// The horizontal sums of eight vectors, as one vector.
inline __m256 hsum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// exp for x <= 0 (softmax after subtracting the max): 2^n * poly(r), |r| <= ln2/2, rel. err ~1e-7.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  __m256i n = _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
}

// Activation rows [M, K] -> int16 codes per block of 32, the block's scale, scale * sum(codes).
// 16 bits keep the activations' error (~2e-5) far under the weights' own 4-bit error: with
// 8-bit activations (llama.cpp's Q8_1) this 135M model's logits moved ~3 % and answers changed.
struct Q16Rows {
  std::vector<int16_t> q;
  std::vector<float> d, s;
};

Q16Rows quantize_rows(const float* x, int64_t m, int64_t k) {
  const int64_t nb = k / kGroup;
  Q16Rows out;
  out.q.resize(m * k);
  out.d.resize(m * nb);
  out.s.resize(m * nb);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < m * nb; ++i) {
    const float* xb = x + i * kGroup;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(xb + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 a = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    a = _mm_max_ps(a, _mm_movehl_ps(a, a));
    a = _mm_max_ss(a, _mm_movehdup_ps(a));
    const float mx = _mm_cvtss_f32(a);
    const float d = mx / 32767.0f;
    const __m256 inv = _mm256_set1_ps(mx > 0.0f ? 32767.0f / mx : 0.0f);
    __m256i acc = _mm256_setzero_si256();
    __m256i q32[4];
    for (int j = 0; j < 4; ++j) {
      q32[j] = _mm256_cvtps_epi32(
          _mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      acc = _mm256_add_epi32(acc, q32[j]);
    }
    // packs interleaves 128-bit lanes; permute back to element order
    const __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(q32[0], q32[1]), 0xD8);
    const __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(q32[2], q32[3]), 0xD8);
    int16_t* qb = out.q.data() + i * kGroup;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + 16), hi);
    out.d[i] = d;
    out.s[i] = d * hsum(_mm256_cvtepi32_ps(acc));
  }
  return out;
}

// acc + madd(a, b) + madd(c, d): VNNI fuses each multiply-add (same wrapping int32 sums).
inline __m256i madd2(__m256i a, __m256i b, __m256i c, __m256i d) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(_mm256_madd_epi16(a, b), c, d);
#else
  return _mm256_add_epi32(_mm256_madd_epi16(a, b), _mm256_madd_epi16(c, d));
#endif
}

// Every tensor a kernel reads must live in CPU memory: a CUDA pointer would be read as host
// memory (garbage or a segfault), so refuse it by name first.
void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
}

// One Q4_1 block's codes · one int16 activation block, as 8 int32 partial sums.
inline __m256i q4_block_dot(const uint8_t* p, const int16_t* a) {
  // 16 bytes: low nibbles are elements 0..15, high nibbles 16..31 (GGUF Q4_1 order)
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(raw, mask));
  const __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), mask));
  const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16));
  return madd2(lo, a0, hi, a1);
}

// One int8 weight block · one int16 activation block, as 8 int32 partial sums.
inline __m256i q8_block_dot(const int8_t* w, const int16_t* a) {
  const __m128i w0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i w1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16));
  const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16));
  return madd2(_mm256_cvtepi8_epi16(w0), a0, _mm256_cvtepi8_epi16(w1), a1);
}

void check_rows(const torch::Tensor& x, int64_t k) {
  check_cpu(x, "x");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "x must be fp32");
  TORCH_CHECK(x.is_contiguous() && x.dim() == 2 && x.size(1) == k, "x must be [M, ", k, "]");
  TORCH_CHECK(k % kGroup == 0, "K must be a multiple of 32");
}

// Q4_1 weights [N, K]: blocks [N, K/2] bytes, d and m [N, K/32] fp32, optional bias [N].
struct Q4Weight {
  torch::Tensor blocks, d, m, bias;
  int64_t n = 0, k = 0;
  Q4Weight() = default;
  Q4Weight(torch::Tensor b, torch::Tensor d_, torch::Tensor m_, torch::Tensor bias_)
      : blocks(b), d(d_), m(m_), bias(bias_), n(b.size(0)), k(b.size(1) * 2) {
    check_cpu(blocks, "Q4_1 blocks");
    check_cpu(d, "Q4_1 d");
    check_cpu(m, "Q4_1 m");
    if (bias.defined()) check_cpu(bias, "bias");
    TORCH_CHECK(blocks.scalar_type() == torch::kUInt8 && blocks.is_contiguous() && blocks.dim() == 2,
                "blocks: contiguous uint8 [N, K/2]");
    TORCH_CHECK(k % kGroup == 0, "K must be a multiple of 32");
    TORCH_CHECK(d.scalar_type() == torch::kFloat32 && m.scalar_type() == torch::kFloat32 &&
                    d.is_contiguous() && m.is_contiguous() && d.numel() == n * k / kGroup &&
                    m.numel() == n * k / kGroup, "d and m must be fp32 [N, K/32]");
    TORCH_CHECK(!bias.defined() || bias.numel() == 0 ||
                    (bias.scalar_type() == torch::kFloat32 && bias.is_contiguous() && bias.numel() == n),
                "bias: contiguous fp32 [N]");
  }
  const float* bias_ptr() const {
    return bias.defined() && bias.numel() ? bias.data_ptr<float>() : nullptr;
  }
};

// y[rows, N] = quantised x[rows, K] · W^T (+ bias)
void q4_gemv(const Q16Rows& xq, int64_t rows, const Q4Weight& w, float* y) {
  const int64_t n = w.n, k = w.k, nb = k / kGroup;
  const uint8_t* qp = w.blocks.data_ptr<uint8_t>();
  const float* dp = w.d.data_ptr<float>();
  const float* mp = w.m.data_ptr<float>();
  const float* bp = w.bias_ptr();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* wq = qp + r * nb * 16;
      const float* wd = dp + r * nb;
      const float* wm = mp + r * nb;
      for (int64_t i = 0; i < rows; ++i) {
        const int16_t* a = xq.q.data() + i * k;
        const float* ad = xq.d.data() + i * nb;
        const float* as = xq.s.data() + i * nb;
        __m256 acc = _mm256_setzero_ps();
        float mins = 0.0f;
        for (int64_t b = 0; b < nb; ++b) {
          const __m256i p = q4_block_dot(wq + 16 * b, a + kGroup * b);
          acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(wd[b] * ad[b]), acc);
          mins += wm[b] * as[b];
        }
        y[i * n + r] = hsum(acc) + mins + (bp ? bp[r] : 0.0f);
      }
    }
  });
}

// y[rows, N] = quantised x[rows, K] · W^T for W int8 [N, K] with one fp32 scale per row.
void q8_gemv(const Q16Rows& xq, int64_t rows, const torch::Tensor& w, const torch::Tensor& scale,
             float* y) {
  const int64_t n = w.size(0), k = w.size(1), nb = k / kGroup;
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int8_t* wr = wp + r * k;
      for (int64_t i = 0; i < rows; ++i) {
        const int16_t* a = xq.q.data() + i * k;
        const float* ad = xq.d.data() + i * nb;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
          const __m256i p = q8_block_dot(wr + kGroup * b, a + kGroup * b);
          acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(ad[b]), acc);
        }
        y[i * n + r] = hsum(acc) * sp[r];
      }
    }
  });
}

void check_q8(const torch::Tensor& w, const torch::Tensor& scale) {
  check_cpu(w, "w");
  check_cpu(scale, "scale");
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.is_contiguous() && w.dim() == 2,
              "w must be int8 [N, K]");
  TORCH_CHECK(w.size(1) % kGroup == 0, "K must be a multiple of 32");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() &&
                  scale.numel() == w.size(0), "scale: fp32 [N]");
}

}  // namespace

// y[M, N] = x[M, K] · W^T for W in Q4_1 blocks: qs [N, K/2] bytes, d and m [N, K/32] fp32.
torch::Tensor q4_1_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m) {
  const Q4Weight w(qs, d, m, torch::Tensor());
  check_rows(x, w.k);
  const int64_t rows = x.size(0);
  const Q16Rows xq = quantize_rows(x.data_ptr<float>(), rows, w.k);
  auto y = torch::empty({rows, w.n}, x.options());
  q4_gemv(xq, rows, w, y.data_ptr<float>());
  return y;
}

// y[M, N] = x[M, K] · W^T for W int8 [N, K] with one fp32 scale per output row.
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  check_q8(w, scale);
  check_rows(x, w.size(1));
  const int64_t rows = x.size(0);
  const Q16Rows xq = quantize_rows(x.data_ptr<float>(), rows, w.size(1));
  auto y = torch::empty({rows, w.size(0)}, x.options());
  q8_gemv(xq, rows, w, scale, y.data_ptr<float>());
  return y;
}

namespace {

// One query token's attention: q [Hq, D] against the first `length` entries of keys/values
// laid out [Hkv, cap, D] with strides (h, t); out [Hq, D]. The Hq / Hkv query heads of a group
// share its cache reads.
struct KV {
  const float* k;
  const float* v;
  int64_t ks_h, ks_t, vs_h, vs_t, hkv;
};

void attend(const float* qp, int64_t hq, int64_t dim, const KV& kv, int64_t length, float sc,
            float* op) {
  const int64_t hkv = kv.hkv, group = hq / hkv, nv = dim / 8;
  const int64_t threads = at::get_num_threads();
  // enough splits that every thread has work, each long enough to amortise its merge
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(length / 256, (2 * threads + hkv - 1) / hkv));
  const int64_t per = (length + splits - 1) / splits;
  splits = (length + per - 1) / per;
  std::vector<float> part_out(hkv * splits * group * dim), part_max(hkv * splits * group),
      part_sum(hkv * splits * group);
  const float* kp = kv.k;
  const float* vp = kv.v;
  const int64_t ks_h = kv.ks_h, ks_t = kv.ks_t, vs_h = kv.vs_h, vs_t = kv.vs_t;
  at::parallel_for(0, hkv * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t h = job / splits, s = job % splits;
      const int64_t t0 = s * per, t1 = std::min(length, t0 + per), len = t1 - t0;
      scores.assign(group * len, 0.0f);
      int64_t t = 0;
      for (; t + 8 <= len; t += 8) {  // 8 positions at a time, reduced together
        const float* kr = kp + h * ks_h + (t0 + t) * ks_t;
        for (int64_t g = 0; g < group; ++g) {
          const float* qr = qp + (h * group + g) * dim;
          __m256 acc[8];
          for (int p = 0; p < 8; ++p) acc[p] = _mm256_setzero_ps();
          for (int64_t j = 0; j < nv; ++j) {
            const __m256 qv = _mm256_loadu_ps(qr + 8 * j);
            for (int p = 0; p < 8; ++p)
              acc[p] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr + p * ks_t + 8 * j), acc[p]);
          }
          _mm256_storeu_ps(scores.data() + g * len + t,
                           _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(sc)));
        }
      }
      for (; t < len; ++t) {
        const float* kr = kp + h * ks_h + (t0 + t) * ks_t;
        for (int64_t g = 0; g < group; ++g) {
          const float* qr = qp + (h * group + g) * dim;
          __m256 acc = _mm256_setzero_ps();
          for (int64_t j = 0; j < nv; ++j)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(qr + 8 * j), _mm256_loadu_ps(kr + 8 * j), acc);
          scores[g * len + t] = hsum(acc) * sc;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sr = scores.data() + g * len;
        const float mx = *std::max_element(sr, sr + len);
        __m256 vsum = _mm256_setzero_ps();
        const __m256 vmx = _mm256_set1_ps(mx);
        int64_t t = 0;
        for (; t + 8 <= len; t += 8) {
          const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(sr + t), vmx));
          _mm256_storeu_ps(sr + t, e);
          vsum = _mm256_add_ps(vsum, e);
        }
        float sum = hsum(vsum);
        for (; t < len; ++t) {
          sr[t] = std::exp(sr[t] - mx);
          sum += sr[t];
        }
        const int64_t slot = (h * splits + s) * group + g;
        part_max[slot] = mx;
        part_sum[slot] = sum;
      }
      // out[g] = sum_t p[g, t] v[t], each value row read once for the whole group
      std::vector<__m256> acc(group * nv, _mm256_setzero_ps());
      for (int64_t t = 0; t < len; ++t) {
        const float* vr = vp + h * vs_h + (t0 + t) * vs_t;
        for (int64_t j = 0; j < nv; ++j) {
          const __m256 vv = _mm256_loadu_ps(vr + 8 * j);
          for (int64_t g = 0; g < group; ++g)
            acc[g * nv + j] = _mm256_fmadd_ps(_mm256_set1_ps(scores[g * len + t]), vv, acc[g * nv + j]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* o = part_out.data() + ((h * splits + s) * group + g) * dim;
        for (int64_t j = 0; j < nv; ++j) _mm256_storeu_ps(o + 8 * j, acc[g * nv + j]);
      }
    }
  });
  for (int64_t h = 0; h < hkv; ++h) {
    for (int64_t g = 0; g < group; ++g) {
      float top = -INFINITY;
      for (int64_t s = 0; s < splits; ++s) top = std::max(top, part_max[(h * splits + s) * group + g]);
      float total = 0.0f;
      float* o = op + (h * group + g) * dim;
      std::fill(o, o + dim, 0.0f);
      for (int64_t s = 0; s < splits; ++s) {
        const int64_t slot = (h * splits + s) * group + g;
        const float w = std::exp(part_max[slot] - top);
        total += w * part_sum[slot];
        const float* po = part_out.data() + slot * dim;
        for (int64_t j = 0; j < dim; ++j) o[j] += w * po[j];
      }
      for (int64_t j = 0; j < dim; ++j) o[j] /= total;
    }
  }
}

KV kv_of(const torch::Tensor& keys, const torch::Tensor& values) {
  return KV{keys.data_ptr<float>(), values.data_ptr<float>(), keys.stride(0), keys.stride(1),
            values.stride(0), values.stride(1), keys.size(0)};
}

void check_norm(const torch::Tensor& w, const char* name) {
  check_cpu(w, name);
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.is_contiguous(), name, ": contiguous fp32");
}

void check_kv(const torch::Tensor& keys, const torch::Tensor& values, int64_t dim) {
  check_cpu(keys, "keys");
  check_cpu(values, "values");
  TORCH_CHECK(keys.scalar_type() == torch::kFloat32 && values.scalar_type() == torch::kFloat32,
              "keys/values must be fp32");
  TORCH_CHECK(keys.dim() == 3 && values.dim() == 3 && keys.stride(2) == 1 && values.stride(2) == 1,
              "keys/values must be [Hkv, cap, D] with unit stride in D");
  TORCH_CHECK(keys.size(2) == dim && values.size(2) == dim && keys.size(0) == values.size(0),
              "keys/values head shapes differ from the query's");
}

}  // namespace

// One query token's attention. q [Hq, D]; keys/values [Hkv, cap, D] (the first `length`
// entries are read); returns [Hq, D].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values,
                               int64_t length, double scale) {
  check_cpu(q, "q");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.is_contiguous() && q.dim() == 2,
              "q must be fp32 [Hq, D]");
  const int64_t hq = q.size(0), dim = q.size(1);
  check_kv(keys, values, dim);
  TORCH_CHECK(dim % 8 == 0 && hq % keys.size(0) == 0, "bad head shapes");
  TORCH_CHECK(length > 0 && length <= keys.size(1), "length out of range");
  auto out = torch::empty({hq, dim}, q.options());
  attend(q.data_ptr<float>(), hq, dim, kv_of(keys, values), length, static_cast<float>(scale),
         out.data_ptr<float>());
  return out;
}

namespace {

void rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = hsum(acc);
  for (; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

// HF's rotate-half RoPE on `heads` rows of `dim`, cos/sin of this position ([dim]).
void rope(float* x, int64_t heads, int64_t dim, const float* cs, const float* sn) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* r = x + h * dim;
    for (int64_t i = 0; i < half; ++i) {
      const float a = r[i], b = r[i + half];
      r[i] = a * cs[i] - b * sn[i];
      r[i + half] = b * cs[i + half] + a * sn[i + half];
    }
  }
}

// g <- silu(g) * u
void silu_mul(float* g, const float* u, int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 e = exp_ps(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), x),
                                          _mm256_set1_ps(87.0f)));
    const __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, e));
    _mm256_storeu_ps(g + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace

// A Llama-family decoder's one-token step with Q4_1 linears and an int8 head, all in C++.
//
// Per layer: RMSNorm, q/k/v, RoPE, the new key/value written at the layer's cache length,
// attention over the cache, o, residual, RMSNorm, SiLU-gated MLP, residual. The caller owns
// the cache buffers (it evicts and grows them) and advances their lengths after the step.
class Decoder {
 public:
  // layer: [input_norm, post_norm, then (blocks, d, m, bias) for q, k, v, o, gate, up, down]
  Decoder(std::vector<std::vector<torch::Tensor>> layers, torch::Tensor final_norm,
          torch::Tensor head, torch::Tensor head_scale, int64_t heads, int64_t kv_heads,
          int64_t head_dim, double eps, double scale)
      : final_norm_(final_norm.contiguous()), head_(head), head_scale_(head_scale), hq_(heads),
        hkv_(kv_heads), dim_(head_dim), eps_(static_cast<float>(eps)),
        scale_(static_cast<float>(scale)) {
    check_q8(head_, head_scale_);
    check_norm(final_norm_, "final_norm");
    TORCH_CHECK(dim_ % 8 == 0 && hq_ % hkv_ == 0, "head_dim must be a multiple of 8, GQA exact");
    for (auto& t : layers) {
      TORCH_CHECK(t.size() == 30, "a layer is 2 norms + 7 x (blocks, d, m, bias)");
      Layer l;
      l.in_norm = t[0].contiguous();
      l.post_norm = t[1].contiguous();
      check_norm(l.in_norm, "input norm");
      check_norm(l.post_norm, "post-attention norm");
      Q4Weight* w[7] = {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down};
      for (int j = 0; j < 7; ++j) *w[j] = Q4Weight(t[2 + 4 * j], t[3 + 4 * j], t[4 + 4 * j], t[5 + 4 * j]);
      hidden_ = l.q.k;
      TORCH_CHECK(l.q.n == hq_ * dim_ && l.k.n == hkv_ * dim_ && l.v.n == hkv_ * dim_ &&
                      l.o.k == hq_ * dim_ && l.o.n == hidden_ && l.gate.k == hidden_ &&
                      l.up.n == l.gate.n && l.down.k == l.gate.n && l.down.n == hidden_,
                  "layer shapes do not chain");
      TORCH_CHECK(l.in_norm.numel() == hidden_ && l.post_norm.numel() == hidden_, "norm size");
      inter_ = l.gate.n;
      layers_.push_back(std::move(l));
    }
    TORCH_CHECK(head_.size(1) == hidden_ && final_norm_.numel() == hidden_, "head shape");
  }

  // x: the token's embedding [hidden]; cos/sin [head_dim]; keys/values per layer
  // [1, Hkv, cap, D] buffers holding lengths[l] entries. Returns logits [vocab].
  torch::Tensor step(torch::Tensor x, torch::Tensor cos, torch::Tensor sin,
                     std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                     std::vector<int64_t> lengths) {
    const int64_t nl = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == nl && static_cast<int64_t>(values.size()) == nl &&
                    static_cast<int64_t>(lengths.size()) == nl, "one cache per layer");
    check_cpu(x, "x");
    check_cpu(cos, "cos");
    check_cpu(sin, "sin");
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.numel() == hidden_, "x: fp32 [hidden]");
    TORCH_CHECK(cos.numel() == dim_ && sin.numel() == dim_ && cos.scalar_type() == torch::kFloat32 &&
                    sin.scalar_type() == torch::kFloat32, "cos/sin: fp32 [head_dim]");
    const torch::Tensor xc = x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
    std::vector<float> res(xc.data_ptr<float>(), xc.data_ptr<float>() + hidden_);
    std::vector<float> h(hidden_), q(hq_ * dim_), att(hq_ * dim_), tmp(hidden_), g(inter_), u(inter_);
    const float* cs = cc.data_ptr<float>();
    const float* sn = sc.data_ptr<float>();
    for (int64_t li = 0; li < nl; ++li) {
      const Layer& l = layers_[li];
      const torch::Tensor kb = keys[li].select(0, 0), vb = values[li].select(0, 0);
      check_kv(kb, vb, dim_);
      TORCH_CHECK(kb.size(0) == hkv_ && lengths[li] >= 0 && lengths[li] < kb.size(1),
                  "cache of layer ", li, " has no room for the new entry");
      const int64_t len = lengths[li];
      float* kp = kb.data_ptr<float>();
      float* vp = vb.data_ptr<float>();
      rms_norm(res.data(), l.in_norm.data_ptr<float>(), hidden_, eps_, h.data());
      const Q16Rows hq8 = quantize_rows(h.data(), 1, hidden_);
      q4_gemv(hq8, 1, l.q, q.data());
      std::vector<float> k(hkv_ * dim_), v(hkv_ * dim_);
      q4_gemv(hq8, 1, l.k, k.data());
      q4_gemv(hq8, 1, l.v, v.data());
      rope(q.data(), hq_, dim_, cs, sn);
      rope(k.data(), hkv_, dim_, cs, sn);
      for (int64_t hh = 0; hh < hkv_; ++hh) {
        std::copy(k.begin() + hh * dim_, k.begin() + (hh + 1) * dim_,
                  kp + hh * kb.stride(0) + len * kb.stride(1));
        std::copy(v.begin() + hh * dim_, v.begin() + (hh + 1) * dim_,
                  vp + hh * vb.stride(0) + len * vb.stride(1));
      }
      attend(q.data(), hq_, dim_, kv_of(kb, vb), len + 1, scale_, att.data());
      q4_gemv(quantize_rows(att.data(), 1, hq_ * dim_), 1, l.o, tmp.data());
      for (int64_t i = 0; i < hidden_; ++i) res[i] += tmp[i];
      rms_norm(res.data(), l.post_norm.data_ptr<float>(), hidden_, eps_, h.data());
      const Q16Rows hm = quantize_rows(h.data(), 1, hidden_);
      q4_gemv(hm, 1, l.gate, g.data());
      q4_gemv(hm, 1, l.up, u.data());
      silu_mul(g.data(), u.data(), inter_);
      q4_gemv(quantize_rows(g.data(), 1, inter_), 1, l.down, tmp.data());
      for (int64_t i = 0; i < hidden_; ++i) res[i] += tmp[i];
    }
    rms_norm(res.data(), final_norm_.data_ptr<float>(), hidden_, eps_, h.data());
    auto logits = torch::empty({head_.size(0)}, x.options());
    q8_gemv(quantize_rows(h.data(), 1, hidden_), 1, head_, head_scale_, logits.data_ptr<float>());
    return logits;
  }

 private:
  struct Layer {
    torch::Tensor in_norm, post_norm;
    Q4Weight q, k, v, o, gate, up, down;
  };
  std::vector<Layer> layers_;
  torch::Tensor final_norm_, head_, head_scale_;
  int64_t hq_, hkv_, dim_, hidden_ = 0, inter_ = 0;
  float eps_, scale_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("q4_1_linear", &q4_1_linear, "x · W^T, W in Q4_1 blocks (AVX2)");
  mod.def("q8_linear", &q8_linear, "x · W^T, W int8 per output row (AVX2)");
  mod.def("decode_attention", &decode_attention, "one query token's attention (AVX2)");
  pybind11::class_<Decoder>(mod, "Decoder")
      .def(pybind11::init<std::vector<std::vector<torch::Tensor>>, torch::Tensor, torch::Tensor,
                          torch::Tensor, int64_t, int64_t, int64_t, double, double>())
      .def("step", &Decoder::step, "one token through every layer; returns logits",
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
