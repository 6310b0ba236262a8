// Decode (one token) and prefill (many rows) kernels for x86 CPUs with AVX2 + FMA.
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
#include <cstring>
#include <type_traits>
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

// ------------------------------------------------------------------ many rows (prefill)
//
// Prefill multiplies hundreds of activation rows by each weight, so the work is compute, not
// bytes: here rows are quantised to int8 per block of 32 (llama.cpp's Q8_1: a scale and the
// scaled sum of codes), the weights of 32 output columns are unpacked once into a panel of
// bytes laid out for vertical multiply-adds (a 32-bit lane is one column, four k's), and a
// tile of rows x columns accumulates each 32-block in int32 registers: AVX-512 VNNI's dpbusd
// (u8 x s8, four products per lane) in the avx512 variant, AVX2's maddubs (pairs into int16,
// eight 4-bit x 8-bit blocks summed exactly in int16) then madd in the avx2 one. Each block's
// int32 sums are scaled by d_w * d_a into fp32 accumulators; Q4_1's minimum adds m * sum(x).
// Blocks whose int8 rounding is coarse (an outlier sets the scale) get a second pass on the
// rounding residual (see quantize_rows8). Tasks are (panel, row chunk) pairs, panel-major, so a
// thread packs a panel once and reuses it. On one Zen 4 core: ~300 int8 GOP/s (single pass)
// vs ~100 GFLOP/s fp32 and ~205 bf16 for torch's dense GEMMs.
namespace {

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
constexpr int kLanes = 16;  // output columns per vector
constexpr int kRowTile = 6;
constexpr int kVecTile = 2;  // vectors per micro tile (of a panel's kPanel / kLanes)
using VecI = __m512i;
using VecF = __m512;
inline VecI vload(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline VecI vbcast(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}
inline VecF fzero() { return _mm512_setzero_ps(); }
inline VecF fload(const float* p) { return _mm512_loadu_ps(p); }
inline VecF fset(float v) { return _mm512_set1_ps(v); }
inline VecF fmadd(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF fmul(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
inline VecF tofloat(VecI v) { return _mm512_cvtepi32_ps(v); }
inline void fstore(float* p, VecF v) { _mm512_storeu_ps(p, v); }
#else
constexpr int kLanes = 8;
constexpr int kRowTile = 4;
constexpr int kVecTile = 2;
using VecI = __m256i;
using VecF = __m256;
inline VecI vload(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline VecI vbcast(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
inline VecF fzero() { return _mm256_setzero_ps(); }
inline VecF fload(const float* p) { return _mm256_loadu_ps(p); }
inline VecF fset(float v) { return _mm256_set1_ps(v); }
inline VecF fmadd(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF fmul(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
inline VecF tofloat(VecI v) { return _mm256_cvtepi32_ps(v); }
inline void fstore(float* p, VecF v) { _mm256_storeu_ps(p, v); }
#endif

constexpr int kPanel = 32;                      // output columns packed together
constexpr int kBlockBytes = kGroup * kPanel;    // one 32-block of a panel: 8 quads x 32 x 4
constexpr int64_t kRowChunk = 96;               // rows per task (a multiple of kRowTile)

// Activation rows -> int8 codes per block of 32 (d = max|x| / 127), laid out by tiles of
// kRowTile rows (the last one padded with zeros) so a tile's broadcasts are at fixed offsets
// from one pointer: codes [tile][block][quad][row][4], scales [tile][block][row].
//
// Int8 rounding costs the most where one large value (LLM activations have outlier channels)
// sets a block's scale for 31 small ones. A row's block whose max exceeds `outlier` x its mean
// |x| also gets the rounding residual as a second code, r = round((x - d q) * 256 / d), ~15-bit
// activations there; a tile's block is multiplied a second time (r at scale d / 256) when one
// of its rows has them, the others' residual codes adding exact zeros: a row's result never
// depends on the rows beside it (chunked and one-pass prefills agree). outlier 0: every block;
// infinite: none (plain Q8_1). `offset`: codes + 128 as u8 (VNNI's unsigned operand, for int8
// weights); a residual code without the pass is a plain 0 (no +128 to undo).
struct Q8Rows {
  std::vector<int8_t> q, r;    // first and second (residual) codes
  std::vector<float> d, s;     // the block's scale; the row's factor of the weights' term
  std::vector<uint8_t> twice;  // [tile][block]: the residual pass runs
  std::vector<uint8_t> tile_twice;  // [tile]: some block's does
  int64_t tiles = 0;
};

// 32 floats times `inv`, rounded -> 32 int8 (in [-127, 127]) in element order; sum of codes.
inline __m256i round_codes(const __m256 v[4], __m256 inv, int32_t* sum) {
  __m256i q32[4];
  __m256i acc = _mm256_setzero_si256();
  for (int j = 0; j < 4; ++j) {
    q32[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    q32[j] = _mm256_max_epi32(_mm256_min_epi32(q32[j], _mm256_set1_epi32(127)),
                              _mm256_set1_epi32(-127));
    acc = _mm256_add_epi32(acc, q32[j]);
  }
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  const __m128i s2 = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  *sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xB1)));
  // packs interleave 128-bit lanes: the permute puts the 32 codes back in order
  const __m256i q8 = _mm256_packs_epi16(_mm256_packs_epi32(q32[0], q32[1]),
                                        _mm256_packs_epi32(q32[2], q32[3]));
  return _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Store one row's 32 codes as 8 quads at stride kRowTile * 4 (the tile layout).
inline void store_quads(__m256i q8, bool offset, int8_t* dst) {
  if (offset) q8 = _mm256_xor_si256(q8, _mm256_set1_epi8(static_cast<char>(0x80)));
  alignas(32) int32_t quads[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(quads), q8);
  for (int q = 0; q < 8; ++q) std::memcpy(dst + q * kRowTile * 4, quads + q, 4);
}

Q8Rows quantize_rows8(const float* x, int64_t m, int64_t k, bool offset, float outlier) {
  const int64_t nb = k / kGroup;
  Q8Rows out;
  out.tiles = (m + kRowTile - 1) / kRowTile;
  const int8_t zero = offset ? static_cast<int8_t>(-128) : 0;
  out.q.assign(out.tiles * kRowTile * k, zero);
  out.r.assign(out.tiles * kRowTile * k, 0);
  out.d.assign(out.tiles * kRowTile * nb, 0.0f);
  out.s.assign(out.tiles * kRowTile * nb, 0.0f);
  out.twice.assign(out.tiles * nb, 0);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  at::parallel_for(0, out.tiles * nb, 16, [&](int64_t begin, int64_t end) {
    for (int64_t tb = begin; tb < end; ++tb) {
      const int64_t t = tb / nb, b = tb % nb;
      const int rows = static_cast<int>(std::min<int64_t>(kRowTile, m - t * kRowTile));
      float mx[kRowTile];
      bool twice[kRowTile] = {}, any = false;
      for (int r = 0; r < rows; ++r) {
        const float* xb = x + ((t * kRowTile + r) * nb + b) * kGroup;
        __m256 amax = _mm256_setzero_ps(), asum = _mm256_setzero_ps();
        for (int j = 0; j < 4; ++j) {
          const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + 8 * j));
          amax = _mm256_max_ps(amax, a);
          asum = _mm256_add_ps(asum, a);
        }
        __m128 a = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        a = _mm_max_ps(a, _mm_movehl_ps(a, a));
        mx[r] = _mm_cvtss_f32(_mm_max_ss(a, _mm_movehdup_ps(a)));
        twice[r] = mx[r] > 0.0f && mx[r] * kGroup >= outlier * hsum(asum);
        any |= twice[r];
      }
      out.twice[tb] = any;
      for (int r = 0; r < rows; ++r) {
        const float* xb = x + ((t * kRowTile + r) * nb + b) * kGroup;
        __m256 v[4];
        for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(xb + 8 * j);
        const float d = mx[r] / 127.0f;
        int32_t sum = 0, sum2 = 0;
        const __m256i q = round_codes(v, _mm256_set1_ps(mx[r] > 0.0f ? 127.0f / mx[r] : 0.0f), &sum);
        const int64_t at = tb * kRowTile + r;  // this row's slot in its tile's block
        int8_t* dst = out.q.data() + tb * kRowTile * kGroup + r * 4;
        store_quads(q, offset, dst);
        if (twice[r]) {  // the residual after the first rounding, in steps of d / 256
          __m256 res[4];
          const __m256 vd = _mm256_set1_ps(d);
          const __m128i q8lo = _mm256_castsi256_si128(q), q8hi = _mm256_extracti128_si256(q, 1);
          const __m256i q32[4] = {_mm256_cvtepi8_epi32(q8lo),
                                  _mm256_cvtepi8_epi32(_mm_srli_si128(q8lo, 8)),
                                  _mm256_cvtepi8_epi32(q8hi),
                                  _mm256_cvtepi8_epi32(_mm_srli_si128(q8hi, 8))};
          for (int j = 0; j < 4; ++j) res[j] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(q32[j]), vd, v[j]);
          const __m256 inv2 = _mm256_set1_ps(mx[r] > 0.0f ? 256.0f * 127.0f / mx[r] : 0.0f);
          store_quads(round_codes(res, inv2, &sum2), offset, out.r.data() + (dst - out.q.data()));
          // int8 weights (offset): undo the +128 of both codes, at d and at d / 256
          out.s[at] = offset ? d * (257.0f / 256.0f) : d * sum + d / 256.0f * sum2;
        } else {
          out.s[at] = offset ? d : d * sum;
        }
        out.d[at] = d;
      }
    }
  });
  out.tile_twice.assign(out.tiles, 0);
  for (int64_t tb = 0; tb < out.tiles * nb; ++tb) out.tile_twice[tb / nb] |= out.twice[tb];
  return out;
}

// Four columns' 16 bytes (4 dwords each) -> four vectors whose dword c is column c's dword q.
inline void transpose4(const __m128i in[4], __m128i out[4]) {
  const __m128i t0 = _mm_unpacklo_epi32(in[0], in[1]), t1 = _mm_unpackhi_epi32(in[0], in[1]);
  const __m128i t2 = _mm_unpacklo_epi32(in[2], in[3]), t3 = _mm_unpackhi_epi32(in[2], in[3]);
  out[0] = _mm_unpacklo_epi64(t0, t2);
  out[1] = _mm_unpackhi_epi64(t0, t2);
  out[2] = _mm_unpacklo_epi64(t1, t3);
  out[3] = _mm_unpackhi_epi64(t1, t3);
}

// A packed panel: bytes [nb][8 quads][kPanel columns][4 k's], and per block and column the
// weight scale ds and the term mv multiplied by the row's second scalar (Q4_1: m and d*sum;
// int8 with VNNI: -128 * scale * sum(w) and d, undoing the +128 of the unsigned codes).
struct Panel {
  std::vector<uint8_t> w;
  std::vector<float> ds, mv;
  void resize(int64_t nb) {
    w.resize(nb * kBlockBytes);
    ds.resize(nb * kPanel);
    mv.resize(nb * kPanel);
  }
};

// Q4_1 columns c0 .. c0 + 32 (those past n are zero) into `p`.
void pack_q4(const Q4Weight& w, int64_t c0, Panel& p) {
  const int64_t nb = w.k / kGroup, n = w.n;
  const uint8_t* qp = w.blocks.data_ptr<uint8_t>();
  const float* dp = w.d.data_ptr<float>();
  const float* mp = w.m.data_ptr<float>();
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* dst = p.w.data() + b * kBlockBytes;
    for (int j0 = 0; j0 < kPanel; j0 += 4) {
      __m128i in[4], t[4];
      for (int j = 0; j < 4; ++j) {
        const int64_t c = c0 + j0 + j;
        in[j] = c < n ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(qp + (c * nb + b) * 16))
                      : _mm_setzero_si128();
      }
      transpose4(in, t);
      for (int q = 0; q < 4; ++q) {  // low nibbles: k 4q..4q+3, high: 16+4q..
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + q * kPanel * 4 + j0 * 4),
                         _mm_and_si128(t[q], mask));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (4 + q) * kPanel * 4 + j0 * 4),
                         _mm_and_si128(_mm_srli_epi16(t[q], 4), mask));
      }
    }
    for (int j = 0; j < kPanel; ++j) {
      const int64_t c = c0 + j;
      p.ds[b * kPanel + j] = c < n ? dp[c * nb + b] : 0.0f;
      p.mv[b * kPanel + j] = c < n ? mp[c * nb + b] : 0.0f;
    }
  }
}

// The sum of 16 int8 (by sad of the +128 codes).
inline int sum_i8(__m128i v) {
  const __m128i s = _mm_sad_epu8(_mm_xor_si128(v, _mm_set1_epi8(static_cast<char>(0x80))),
                                 _mm_setzero_si128());
  return _mm_cvtsi128_si32(s) + _mm_extract_epi16(s, 4) - 16 * 128;
}

// int8 columns c0 .. c0 + 32 with one scale per column into `p`.
void pack_q8(const int8_t* wp, const float* sp, int64_t n, int64_t k, int64_t c0, Panel& p) {
  const int64_t nb = k / kGroup;
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* dst = p.w.data() + b * kBlockBytes;
    for (int j0 = 0; j0 < kPanel; j0 += 4) {
      int sums[4] = {0, 0, 0, 0};
      for (int half = 0; half < 2; ++half) {  // quads 0..3, then 4..7
        __m128i in[4], t[4];
        for (int j = 0; j < 4; ++j) {
          const int64_t c = c0 + j0 + j;
          const int8_t* src = wp + c * k + b * kGroup + 16 * half;
          in[j] = c < n ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(src))
                        : _mm_setzero_si128();
          sums[j] += sum_i8(in[j]);
        }
        transpose4(in, t);
        for (int q = 0; q < 4; ++q)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (4 * half + q) * kPanel * 4 + j0 * 4),
                           t[q]);
      }
      for (int j = 0; j < 4; ++j) {
        const int64_t c = c0 + j0 + j;
        p.ds[b * kPanel + j0 + j] = c < n ? sp[c] : 0.0f;
        p.mv[b * kPanel + j0 + j] = c < n ? -128.0f * sp[c] * static_cast<float>(sums[j]) : 0.0f;
      }
    }
  }
}

// One block's int32 sums of R rows x V vectors of the panel (columns v0 * kLanes ...); `a`:
// the tile's codes of this block, [quad][row][4].
// kSigned: int8 weights (the activations are the unsigned operand with VNNI; without it
// maddubs takes |w| and the activations with w's sign, as llama.cpp's AVX2 q8 dot does).
template <int R, int V, bool kSigned>
inline void block_dot(const int8_t* a, const uint8_t* wb, int v0, VecI acc[R][V]) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_si512();
  for (int q = 0; q < 8; ++q) {
    VecI w[V];
    for (int v = 0; v < V; ++v) w[v] = vload(wb + q * kPanel * 4 + (v0 + v) * kLanes * 4);
    for (int r = 0; r < R; ++r) {
      const VecI x = vbcast(a + (q * R + r) * 4);
      for (int v = 0; v < V; ++v)
        acc[r][v] = kSigned ? _mm512_dpbusd_epi32(acc[r][v], x, w[v])
                            : _mm512_dpbusd_epi32(acc[r][v], w[v], x);
    }
  }
#else
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (kSigned) {
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_si256();
    for (int q = 0; q < 8; ++q) {
      VecI w[V], aw[V];
      for (int v = 0; v < V; ++v) {
        w[v] = vload(wb + q * kPanel * 4 + (v0 + v) * kLanes * 4);
        aw[v] = _mm256_sign_epi8(w[v], w[v]);
      }
      for (int r = 0; r < R; ++r) {
        const VecI x = vbcast(a + (q * R + r) * 4);
        for (int v = 0; v < V; ++v) {
          const VecI p = _mm256_maddubs_epi16(aw[v], _mm256_sign_epi8(x, w[v]));
          acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(p, ones));
        }
      }
    }
  } else {
    // 4-bit codes (<= 15) x |int8| (<= 127): a pair is <= 3810, a block's 8 quads <= 30480,
    // so the int16 sums are exact and one madd per block widens them
    VecI s16[R][V];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) s16[r][v] = _mm256_setzero_si256();
    for (int q = 0; q < 8; ++q) {
      VecI w[V];
      for (int v = 0; v < V; ++v) w[v] = vload(wb + q * kPanel * 4 + (v0 + v) * kLanes * 4);
      for (int r = 0; r < R; ++r) {
        const VecI x = vbcast(a + (q * R + r) * 4);
        for (int v = 0; v < V; ++v)
          s16[r][v] = _mm256_add_epi16(s16[r][v], _mm256_maddubs_epi16(w[v], x));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = _mm256_madd_epi16(s16[r][v], ones);
  }
#endif
}

// Add a tile's blocks to f: every block's first codes at scale d with the weights' term
// (kTerm), or (kResidual) the residual codes of the blocks that have them, at scale d / 256.
template <int R, int V, bool kSigned, bool kTerm, bool kResidual>
inline void add_blocks(const Q8Rows& xq, int64_t nb, int64_t t, const Panel& p, int v0,
                       VecF f[R][V]) {
  const int8_t* a = (kResidual ? xq.r.data() : xq.q.data()) + t * nb * kGroup * R;
  const float* ad = xq.d.data() + t * nb * R;
  const float* as = xq.s.data() + t * nb * R;
  const uint8_t* twice = xq.twice.data() + t * nb;
  const float unit = kResidual ? 1.0f / 256.0f : 1.0f;
  for (int64_t b = 0; b < nb; ++b) {
    if (kResidual && !twice[b]) continue;
    VecI acc[R][V];
    block_dot<R, V, kSigned>(a + b * kGroup * R, p.w.data() + b * kBlockBytes, v0, acc);
    for (int v = 0; v < V; ++v) {
      const VecF ds = fmul(fload(p.ds.data() + b * kPanel + (v0 + v) * kLanes), fset(unit));
      for (int r = 0; r < R; ++r)
        f[r][v] = fmadd(tofloat(acc[r][v]), fmul(ds, fset(ad[b * R + r])), f[r][v]);
      if constexpr (kTerm && !kResidual) {
        const VecF mv = fload(p.mv.data() + b * kPanel + (v0 + v) * kLanes);
        for (int r = 0; r < R; ++r) f[r][v] = fmadd(mv, fset(as[b * R + r]), f[r][v]);
      }
    }
  }
}

// y rows of tile t (of `rows` valid), panel columns v0 * kLanes .. + V * kLanes (of n).
template <int V, bool kSigned, bool kTerm>
void micro_tile(const Q8Rows& xq, int64_t k, int64_t t, int64_t rows, const Panel& p, int v0,
                int64_t c0, int64_t n, float* y) {
  constexpr int R = kRowTile;
  const int64_t nb = k / kGroup;
  VecF f[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) f[r][v] = fzero();
  add_blocks<R, V, kSigned, kTerm, false>(xq, nb, t, p, v0, f);
  if (xq.tile_twice[t]) add_blocks<R, V, kSigned, kTerm, true>(xq, nb, t, p, v0, f);
  const int64_t cols = std::min<int64_t>(V * kLanes, n - c0 - v0 * kLanes);
  for (int r = 0; r < R && t * R + r < rows; ++r) {
    float* yr = y + (t * R + r) * n + c0 + v0 * kLanes;
    if (cols == V * kLanes) {
      for (int v = 0; v < V; ++v) fstore(yr + v * kLanes, f[r][v]);
    } else {
      alignas(64) float tmp[V * kLanes];
      for (int v = 0; v < V; ++v) fstore(tmp + v * kLanes, f[r][v]);
      std::copy(tmp, tmp + std::max<int64_t>(cols, 0), yr);
    }
  }
}

// y[rows, n] from quantised rows and a panel packer: tasks are (panel, row chunk), panel-major.
template <bool kSigned, bool kTerm, typename Pack>
void gemm_rows(const Q8Rows& xq, int64_t rows, int64_t k, int64_t n, Pack pack, float* y) {
  const int64_t nb = k / kGroup, panels = (n + kPanel - 1) / kPanel;
  const int64_t tiles = xq.tiles;
  const int64_t tiles_per_chunk = std::max<int64_t>(1, kRowChunk / kRowTile);
  const int64_t chunks = (tiles + tiles_per_chunk - 1) / tiles_per_chunk;
  at::parallel_for(0, panels * chunks, 1, [&](int64_t begin, int64_t end) {
    Panel p;
    p.resize(nb);
    int64_t packed = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t panel = task / chunks, chunk = task % chunks;
      if (panel != packed) {
        pack(panel * kPanel, p);
        packed = panel;
      }
      const int64_t t1 = std::min(tiles, (chunk + 1) * tiles_per_chunk);
      for (int64_t t = chunk * tiles_per_chunk; t < t1; ++t)
        for (int v0 = 0; v0 < kPanel / kLanes; v0 += kVecTile)
          micro_tile<kVecTile, kSigned, kTerm>(xq, k, t, rows, p, v0, panel * kPanel, n, y);
    }
  });
}

float outlier_of(double outlier) {
  TORCH_CHECK(outlier >= 0.0, "outlier must be >= 0 (0: two passes everywhere, inf: none)");
  return static_cast<float>(outlier);
}

}  // namespace

// y[M, N] = x[M, K] · W^T for many rows (prefill), W in Q4_1 blocks as q4_1_linear takes them;
// the rows are quantised to int8 per block of 32.
torch::Tensor q4_1_gemm(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m,
                        double outlier) {
  const Q4Weight w(qs, d, m, torch::Tensor());
  check_rows(x, w.k);
  const int64_t rows = x.size(0);
  const Q8Rows xq = quantize_rows8(x.data_ptr<float>(), rows, w.k, false, outlier_of(outlier));
  auto y = torch::empty({rows, w.n}, x.options());
  gemm_rows<false, true>(xq, rows, w.k, w.n, [&](int64_t c0, Panel& p) { pack_q4(w, c0, p); },
                         y.data_ptr<float>());
  return y;
}

// y[M, N] = x[M, K] · W^T for many rows, W int8 [N, K] with one fp32 scale per output row.
torch::Tensor q8_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor scale, double outlier) {
  check_q8(w, scale);
  const int64_t rows = x.size(0), n = w.size(0), k = w.size(1);
  check_rows(x, k);
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  constexpr bool kOffset = true;  // u8 activations: the +128 is undone by the panel's mv term
#else
  constexpr bool kOffset = false;
#endif
  const Q8Rows xq = quantize_rows8(x.data_ptr<float>(), rows, k, kOffset, outlier_of(outlier));
  auto y = torch::empty({rows, n}, x.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  gemm_rows<true, kOffset>(xq, rows, k, n,
                           [&](int64_t c0, Panel& p) { pack_q8(wp, sp, n, k, c0, p); },
                           y.data_ptr<float>());
  return y;
}

namespace {

// Eight cached elements as fp32: the cache is fp32, fp16 (F16C) or bf16 (its high half of an
// fp32). Widened in registers as they are read: a 16-bit cache is never copied to fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const at::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// One query token's attention: q [Hq, D] against the first `length` entries of keys/values
// laid out [Hkv, cap, D] with strides (h, t); out [Hq, D]. The Hq / Hkv query heads of a group
// share its cache reads. T: the cache's element (float, at::Half, at::BFloat16); the arithmetic
// is fp32 whatever it is. Both ISA variants run these 8-lane loops (Zen 4 splits 512-bit ops).
template <typename T>
struct KV {
  const T* k;
  const T* v;
  int64_t ks_h, ks_t, vs_h, vs_t, hkv;
};

template <typename T>
void attend(const float* qp, int64_t hq, int64_t dim, const KV<T>& kv, int64_t length, float sc,
            float* op) {
  const int64_t hkv = kv.hkv, group = hq / hkv, nv = dim / 8;
  const int64_t threads = at::get_num_threads();
  // enough splits that every thread has work, each long enough to amortise its merge
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(length / 256, (2 * threads + hkv - 1) / hkv));
  const int64_t per = (length + splits - 1) / splits;
  splits = (length + per - 1) / per;
  std::vector<float> part_out(hkv * splits * group * dim), part_max(hkv * splits * group),
      part_sum(hkv * splits * group);
  const T* kp = kv.k;
  const T* vp = kv.v;
  const int64_t ks_h = kv.ks_h, ks_t = kv.ks_t, vs_h = kv.vs_h, vs_t = kv.vs_t;
  at::parallel_for(0, hkv * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    // a 16-bit cache's 8 keys widened once into L1 for the whole group (not once per head)
    std::vector<float> tile(std::is_same_v<T, float> ? 0 : 8 * dim);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t h = job / splits, s = job % splits;
      const int64_t t0 = s * per, t1 = std::min(length, t0 + per), len = t1 - t0;
      scores.assign(group * len, 0.0f);
      int64_t t = 0;
      for (; t + 8 <= len; t += 8) {  // 8 positions at a time, reduced together
        const float* kr;
        int64_t kst;
        if constexpr (std::is_same_v<T, float>) {
          kr = kp + h * ks_h + (t0 + t) * ks_t;
          kst = ks_t;
        } else {
          const T* src = kp + h * ks_h + (t0 + t) * ks_t;
          for (int p = 0; p < 8; ++p)
            for (int64_t j = 0; j < nv; ++j)
              _mm256_storeu_ps(tile.data() + p * dim + 8 * j, load8(src + p * ks_t + 8 * j));
          kr = tile.data();
          kst = dim;
        }
        for (int64_t g = 0; g < group; ++g) {
          const float* qr = qp + (h * group + g) * dim;
          __m256 acc[8];
          for (int p = 0; p < 8; ++p) acc[p] = _mm256_setzero_ps();
          for (int64_t j = 0; j < nv; ++j) {
            const __m256 qv = _mm256_loadu_ps(qr + 8 * j);
            for (int p = 0; p < 8; ++p)
              acc[p] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr + p * kst + 8 * j), acc[p]);
          }
          _mm256_storeu_ps(scores.data() + g * len + t,
                           _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(sc)));
        }
      }
      for (; t < len; ++t) {
        const T* kr = kp + h * ks_h + (t0 + t) * ks_t;
        for (int64_t g = 0; g < group; ++g) {
          const float* qr = qp + (h * group + g) * dim;
          __m256 acc = _mm256_setzero_ps();
          for (int64_t j = 0; j < nv; ++j)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(qr + 8 * j), load8(kr + 8 * j), acc);
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
        const T* vr = vp + h * vs_h + (t0 + t) * vs_t;
        for (int64_t j = 0; j < nv; ++j) {
          const __m256 vv = load8(vr + 8 * j);
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

template <typename T>
KV<T> kv_of(const torch::Tensor& keys, const torch::Tensor& values) {
  return KV<T>{keys.data_ptr<T>(), values.data_ptr<T>(), keys.stride(0), keys.stride(1),
               values.stride(0), values.stride(1), keys.size(0)};
}

// f(kv) with the cache's element type (checked by check_kv).
template <typename F>
void with_kv(const torch::Tensor& keys, const torch::Tensor& values, F&& f) {
  switch (keys.scalar_type()) {
    case torch::kHalf: f(kv_of<at::Half>(keys, values)); break;
    case torch::kBFloat16: f(kv_of<at::BFloat16>(keys, values)); break;
    default: f(kv_of<float>(keys, values));
  }
}

// n fp32 values into a cache row, rounded to nearest even as torch's .to(dtype) does.
template <typename T>
void store_row(const float* src, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = T(src[i]);
  }
}

void check_norm(const torch::Tensor& w, const char* name) {
  check_cpu(w, name);
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.is_contiguous(), name, ": contiguous fp32");
}

void check_kv(const torch::Tensor& keys, const torch::Tensor& values, int64_t dim) {
  check_cpu(keys, "keys");
  check_cpu(values, "values");
  const auto kt = keys.scalar_type();
  TORCH_CHECK(kt == torch::kFloat32 || kt == torch::kHalf || kt == torch::kBFloat16,
              "keys/values must be fp32, fp16 or bf16, not ", kt);
  TORCH_CHECK(values.scalar_type() == kt, "keys and values must share one dtype");
  TORCH_CHECK(keys.dim() == 3 && values.dim() == 3 && keys.stride(2) == 1 && values.stride(2) == 1,
              "keys/values must be [Hkv, cap, D] with unit stride in D");
  TORCH_CHECK(keys.size(2) == dim && values.size(2) == dim && keys.size(0) == values.size(0),
              "keys/values head shapes differ from the query's");
}

}  // namespace

// One query token's attention. q [Hq, D]; keys/values [Hkv, cap, D] fp32, fp16 or bf16 (the
// first `length` entries are read); returns [Hq, D] fp32.
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
  with_kv(keys, values, [&](const auto& kv) {
    attend(q.data_ptr<float>(), hq, dim, kv, length, static_cast<float>(scale),
           out.data_ptr<float>());
  });
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
  // [1, Hkv, cap, D] buffers (fp32, fp16 or bf16) holding lengths[l] entries; the new entry is
  // rounded to the cache's dtype as it is written. Returns logits [vocab].
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
      rms_norm(res.data(), l.in_norm.data_ptr<float>(), hidden_, eps_, h.data());
      const Q16Rows hq8 = quantize_rows(h.data(), 1, hidden_);
      q4_gemv(hq8, 1, l.q, q.data());
      std::vector<float> k(hkv_ * dim_), v(hkv_ * dim_);
      q4_gemv(hq8, 1, l.k, k.data());
      q4_gemv(hq8, 1, l.v, v.data());
      rope(q.data(), hq_, dim_, cs, sn);
      rope(k.data(), hkv_, dim_, cs, sn);
      with_kv(kb, vb, [&](const auto& kv) {
        using T = std::remove_cv_t<std::remove_pointer_t<decltype(kv.k)>>;
        T* kp = const_cast<T*>(kv.k);
        T* vp = const_cast<T*>(kv.v);
        for (int64_t hh = 0; hh < hkv_; ++hh) {
          store_row(k.data() + hh * dim_, dim_, kp + hh * kv.ks_h + len * kv.ks_t);
          store_row(v.data() + hh * dim_, dim_, vp + hh * kv.vs_h + len * kv.vs_t);
        }
        attend(q.data(), hq_, dim_, kv, len + 1, scale_, att.data());
      });
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
  mod.def("q4_1_gemm", &q4_1_gemm, "x · W^T for many rows, W in Q4_1 blocks (int8 rows)",
          pybind11::arg("x"), pybind11::arg("qs"), pybind11::arg("d"), pybind11::arg("m"),
          pybind11::arg("outlier") = INFINITY, pybind11::call_guard<pybind11::gil_scoped_release>());
  mod.def("q8_gemm", &q8_gemm, "x · W^T for many rows, W int8 per output row (int8 rows)",
          pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("scale"),
          pybind11::arg("outlier") = INFINITY, pybind11::call_guard<pybind11::gil_scoped_release>());
  mod.def("decode_attention", &decode_attention,
          "one query token's attention over an fp32, fp16 or bf16 cache (AVX2)");
  pybind11::class_<Decoder>(mod, "Decoder")
      .def(pybind11::init<std::vector<std::vector<torch::Tensor>>, torch::Tensor, torch::Tensor,
                          torch::Tensor, int64_t, int64_t, int64_t, double, double>())
      .def("step", &Decoder::step, "one token through every layer; returns logits",
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
