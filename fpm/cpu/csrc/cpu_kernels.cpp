// fpm's CPU kernels (JIT-built by fpm.models.kernels with OpenMP, so at::parallel_for uses the
// threads torch uses; each is checked against a torch reference before use and in
// tests/test_kernels.py).
//
// dropout_mask: element i of the mask is kept when 16-bit field i % 4 of SplitMix64's output for
// (seed + (i / 4) * 0x9E3779B97F4A7C15) is >= thr. One pass, parallel over the elements, no generator
// state beyond the seed: the same (seed, shape) always gives the same mask. Reference
// implementation in Python: fpm.models.kernels.keep_bits. dropout_apply multiplies by that mask
// without writing it (bf16, AVX-512): forward and backward each one pass, nothing saved but the seed.
//
// transpose16: a contiguous copy of the transpose of a 2-D tensor of 16-bit elements (bf16/fp16),
// 16x16 tiles transposed in AVX2 registers (4 unpack stages and a lane permute), 32-row strips so
// each output row gets whole 64-byte lines; scalar at the edges and without AVX2. ~2.5x torch's
// `x.t().contiguous()` here, which is what makes weight gradients from a contiguous transposed
// operand pay (fpm.models.kernels.Linear).
//
// sumsq16 / adamw16: the optimizer step of fpm.engine.master in two passes instead of five. bf16
// gradients are read directly (no fp32 copy), the clipping factor is applied in registers, and
// AdamW (decoupled weight decay, as torch.optim.AdamW) updates the fp32 master weights and moments
// and writes the bf16-rounded weights into the model parameters in the same pass.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull, kMix1 = 0xBF58476D1CE4E5B9ull, kMix2 = 0x94D049BB133111EBull;

inline uint64_t splitmix64(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + counter * kGamma;
  z = (z ^ (z >> 30)) * kMix1;
  z = (z ^ (z >> 27)) * kMix2;
  return z ^ (z >> 31);
}

// Element i of the mask seeded with `seed` is kept when 16-bit field i % 4 of SplitMix64's output
// for counter i / 4 is >= thr: four elements per hash (as Philox on GPUs gives four per call).
inline bool kept(uint64_t seed, int64_t i, uint64_t thr) {
  return ((splitmix64(seed, static_cast<uint64_t>(i) >> 2) >> (16 * (i & 3))) & 0xFFFFull) >= thr;
}

// Writes `keep` (the bit pattern of the scale in the output dtype) or 0 per element, one hash per
// four elements.
template <typename bits_t>
void fill(bits_t* out, int64_t n, uint64_t seed, uint64_t thr, bits_t keep) {
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin >> 2; g <= (end - 1) >> 2; ++g) {
      const uint64_t z = splitmix64(seed, static_cast<uint64_t>(g));
      for (int64_t f = 0; f < 4; ++f) {
        const int64_t i = 4 * g + f;
        if (i < begin || i >= end) continue;
        const bool k = ((z >> (16 * f)) & 0xFFFFull) >= thr;
        out[i] = static_cast<bits_t>(keep & static_cast<bits_t>(0 - static_cast<bits_t>(k)));
      }
    }
  });
}

template <typename scalar_t, typename bits_t>
void fill_as(torch::Tensor& out, uint64_t seed, uint64_t thr, double scale) {
  const scalar_t value = static_cast<scalar_t>(static_cast<float>(scale));
  bits_t keep;
  std::memcpy(&keep, &value, sizeof(bits_t));
  fill<bits_t>(reinterpret_cast<bits_t*>(out.data_ptr<scalar_t>()), out.numel(), seed, thr, keep);
}

#ifdef __AVX2__
// One 16x16 tile: rows of `src` (stride ls) become rows of `dst` (stride ld).
inline void tile16(const uint16_t* src, int64_t ls, uint16_t* dst, int64_t ld) {
  __m256i r[16], u[16], v[16], w[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * ls));
  for (int k = 0; k < 8; ++k) {  // pairs of rows interleaved: 32-bit units (a[2k][c], a[2k+1][c])
    u[2 * k] = _mm256_unpacklo_epi16(r[2 * k], r[2 * k + 1]);
    u[2 * k + 1] = _mm256_unpackhi_epi16(r[2 * k], r[2 * k + 1]);
  }
  for (int m = 0; m < 4; ++m) {  // 64-bit units: one column of four rows
    v[4 * m + 0] = _mm256_unpacklo_epi32(u[4 * m], u[4 * m + 2]);
    v[4 * m + 1] = _mm256_unpackhi_epi32(u[4 * m], u[4 * m + 2]);
    v[4 * m + 2] = _mm256_unpacklo_epi32(u[4 * m + 1], u[4 * m + 3]);
    v[4 * m + 3] = _mm256_unpackhi_epi32(u[4 * m + 1], u[4 * m + 3]);
  }
  for (int n = 0; n < 2; ++n)  // 128-bit lanes: column c (low) and c + 8 (high) of eight rows
    for (int s = 0; s < 4; ++s) {
      w[8 * n + 2 * s] = _mm256_unpacklo_epi64(v[8 * n + s], v[8 * n + 4 + s]);
      w[8 * n + 2 * s + 1] = _mm256_unpackhi_epi64(v[8 * n + s], v[8 * n + 4 + s]);
    }
  for (int c = 0; c < 8; ++c) {  // rows 0-7 from w[c], rows 8-15 from w[8 + c]
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c * ld), _mm256_permute2x128_si256(w[c], w[8 + c], 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (c + 8) * ld),
                        _mm256_permute2x128_si256(w[c], w[8 + c], 0x31));
  }
}
#endif

void transpose_u16(const uint16_t* src, uint16_t* dst, int64_t rows, int64_t cols) {
  at::parallel_for(0, (rows + 31) / 32, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t i0 = s * 32, i1 = std::min(rows, i0 + 32);
      int64_t j = 0;
#ifdef __AVX2__
      if (i1 - i0 == 32) {
        for (; j + 16 <= cols; j += 16) {
          tile16(src + i0 * cols + j, cols, dst + j * rows + i0, rows);
          tile16(src + (i0 + 16) * cols + j, cols, dst + j * rows + i0 + 16, rows);
        }
      }
#endif
      for (; j < cols; ++j)
        for (int64_t i = i0; i < i1; ++i) dst[j * rows + i] = src[i * cols + j];
    }
  });
}

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {  // round to nearest even (NaN stays NaN)
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FPM_AVX512 1
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}
inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline void store_bf16(uint16_t* p, __mmask16 m, __m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
#endif

#if defined(FPM_AVX512) && defined(__AVX512DQ__)
// kept() for elements i .. i+15 at once: four 64-bit hashes whose 16-bit fields, in memory order,
// are the 16 elements' (i a multiple of 4; otherwise element by element)
inline __mmask16 keep16(uint64_t seed, int64_t i, uint64_t thr) {
  if (thr == 0) return static_cast<__mmask16>(0xFFFF);
  if (i & 3) {
    unsigned m = 0;
    for (int j = 0; j < 16; ++j) m |= static_cast<unsigned>(kept(seed, i + j, thr)) << j;
    return static_cast<__mmask16>(m);
  }
  const auto c = [](uint64_t k) { return _mm256_set1_epi64x(static_cast<long long>(k)); };
  const __m256i ctr = _mm256_add_epi64(_mm256_set1_epi64x(i >> 2), _mm256_set_epi64x(3, 2, 1, 0));
  __m256i z = _mm256_add_epi64(c(seed), _mm256_mullo_epi64(ctr, c(kGamma)));
  z = _mm256_mullo_epi64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 30)), c(kMix1));
  z = _mm256_mullo_epi64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), c(kMix2));
  z = _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
  return _mm256_cmpge_epu16_mask(z, _mm256_set1_epi16(static_cast<short>(thr)));
}
#endif

// y = x * scale where the element is kept, 0 where dropped (bf16 in and out, product in float,
// rounded to nearest even: what x * dropout_mask(...) gives), without writing the mask.
void dropout_apply_u16(const uint16_t* x, uint16_t* y, int64_t n, uint64_t seed, uint64_t thr, float scale) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
#if defined(FPM_AVX512) && defined(__AVX512DQ__)
    for (; i < end && (i & 3); ++i) y[i] = kept(seed, i, thr) ? float_to_bf16_bits(bf16_bits_to_float(x[i]) * scale) : 0;
    const __m512 s = _mm512_set1_ps(scale);
    for (; i < end; i += 16) {
      const __mmask16 k = tail_mask(end - i);
      store_bf16(y + i, k, _mm512_maskz_mul_ps(keep16(seed, i, thr), load_bf16(x + i, k), s));
    }
#endif
    for (; i < end; ++i) y[i] = kept(seed, i, thr) ? float_to_bf16_bits(bf16_bits_to_float(x[i]) * scale) : 0;
  });
}

double sumsq_u16(const uint16_t* x, int64_t n) {
  return at::parallel_reduce(0, n, 1 << 16, 0.0, [&](int64_t begin, int64_t end, double acc) {
    int64_t i = begin;
#ifdef FPM_AVX512
    __m512 sum = _mm512_setzero_ps();
    for (; i < end; i += 16) {
      const __m512 v = load_bf16(x + i, tail_mask(end - i));
      sum = _mm512_fmadd_ps(v, v, sum);
    }
    acc += static_cast<double>(_mm512_reduce_add_ps(sum));
#endif
    for (; i < end; ++i) {
      const float v = bf16_bits_to_float(x[i]);
      acc += static_cast<double>(v) * v;
    }
    return acc;
  }, std::plus<double>());
}

struct AdamW {
  float lr, beta1, beta2, eps, decay, step_size, inv_bc2_sqrt, scale;
};

void adamw_u16(const AdamW& a, float* w, float* m, float* v, const uint16_t* g, uint16_t* out, int64_t n) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
#ifdef FPM_AVX512
    const __m512 b1 = _mm512_set1_ps(a.beta1), c1 = _mm512_set1_ps(1.0f - a.beta1);
    const __m512 b2 = _mm512_set1_ps(a.beta2), c2 = _mm512_set1_ps(1.0f - a.beta2);
    const __m512 scale = _mm512_set1_ps(a.scale), decay = _mm512_set1_ps(a.decay);
    const __m512 step = _mm512_set1_ps(a.step_size), inv = _mm512_set1_ps(a.inv_bc2_sqrt), eps = _mm512_set1_ps(a.eps);
    for (; i < end; i += 16) {
      const __mmask16 k = tail_mask(end - i);
      const __m512 gi = _mm512_mul_ps(load_bf16(g + i, k), scale);
      const __m512 mi = _mm512_fmadd_ps(b1, _mm512_maskz_loadu_ps(k, m + i), _mm512_mul_ps(c1, gi));
      const __m512 vi = _mm512_fmadd_ps(b2, _mm512_maskz_loadu_ps(k, v + i), _mm512_mul_ps(c2, _mm512_mul_ps(gi, gi)));
      const __m512 denom = _mm512_fmadd_ps(_mm512_sqrt_ps(vi), inv, eps);
      __m512 wi = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, w + i), decay);
      wi = _mm512_fnmadd_ps(step, _mm512_div_ps(mi, denom), wi);
      _mm512_mask_storeu_ps(m + i, k, mi);
      _mm512_mask_storeu_ps(v + i, k, vi);
      _mm512_mask_storeu_ps(w + i, k, wi);
      store_bf16(out + i, k, wi);
    }
#endif
    for (; i < end; ++i) {
      const float gi = bf16_bits_to_float(g[i]) * a.scale;
      m[i] = a.beta1 * m[i] + (1.0f - a.beta1) * gi;
      v[i] = a.beta2 * v[i] + (1.0f - a.beta2) * gi * gi;
      const float denom = std::sqrt(v[i]) * a.inv_bc2_sqrt + a.eps;
      w[i] = w[i] * a.decay - a.step_size * (m[i] / denom);
      out[i] = float_to_bf16_bits(w[i]);
    }
  });
}


// ---- padding-free BERT (fpm.models.bert_unpadded) ----------------------------------------------
// to_heads: rows [N, G*H*D] of the kept positions -> G tensors [B, H, T, D], zeros at positions not
// kept (row_of[b*T + t] < 0). to_rows: the inverse gather. Plain row copies of D elements, any dtype.
// With `bias` (bf16 only, [G*H*D]), kept rows get row + bias (rounded to bf16): the projection's
// bias added here instead of by the matmul, which copies it into its whole output first.
void to_heads_impl(const char* src, const int64_t* row_of, std::vector<char*>& out, int64_t B, int64_t T,
                   int64_t G, int64_t H, int64_t D, size_t es, const uint16_t* bias) {
  at::parallel_for(0, G * B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i / (B * H), b = (i / H) % B, h = i % H;
      char* dst = out[g] + (b * H + h) * T * D * es;
      const uint16_t* bh = bias != nullptr ? bias + (g * H + h) * D : nullptr;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = row_of[b * T + t];
        if (r < 0) {
          std::memset(dst + t * D * es, 0, D * es);
        } else if (bh == nullptr) {
          std::memcpy(dst + t * D * es, src + ((r * G + g) * H + h) * D * es, D * es);
        } else {
          const uint16_t* x = reinterpret_cast<const uint16_t*>(src) + ((r * G + g) * H + h) * D;
          uint16_t* y = reinterpret_cast<uint16_t*>(dst) + t * D;
          int64_t c = 0;
#ifdef FPM_AVX512
          for (; c < D; c += 16) {
            const __mmask16 k = tail_mask(D - c);
            store_bf16(y + c, k, _mm512_add_ps(load_bf16(x + c, k), load_bf16(bh + c, k)));
          }
#endif
          for (; c < D; ++c) y[c] = float_to_bf16_bits(bf16_bits_to_float(x[c]) + bf16_bits_to_float(bh[c]));
        }
      }
    }
  });
}

void to_rows_impl(const std::vector<const char*>& heads, const int64_t* index, char* out, int64_t N, int64_t T,
                  int64_t G, int64_t H, int64_t D, size_t es) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = index[n] / T, t = index[n] % T;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t h = 0; h < H; ++h)
          std::memcpy(out + ((n * G + g) * H + h) * D * es, heads[g] + ((b * H + h) * T + t) * D * es, D * es);
    }
  });
}

// dropout + residual add + LayerNorm over rows of C bf16 elements (fpm.models.kernels.dropout_add_layer_norm):
// r = x + dropout(h) (dropout as dropout_apply on h's flat index, each sum rounded to bf16 as the
// composite rounds it), y = LayerNorm(r) computed in float. Backward: the gradient reaching r is
// dr + LayerNorm's backward of dy; dh is that times the same dropout mask.
inline float round_bf16(float f) { return bf16_bits_to_float(float_to_bf16_bits(f)); }

#if defined(FPM_AVX512) && defined(__AVX512DQ__)
#define FPM_AVX512DQ 1
inline __m512 round_bf16_ps(__m512 v) {  // to the nearest bf16 value, kept in float
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#endif

void dal_forward_u16(const uint16_t* h, const uint16_t* hb, const uint16_t* x, const uint16_t* gamma, const uint16_t* beta,
                     uint16_t* r, uint16_t* y, float* mean, float* rstd, int64_t N, int64_t C,
                     uint64_t seed, uint64_t thr, float scale, float eps) {
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(C);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t o = n * C;
      float mu, rs;
#ifdef FPM_AVX512DQ
      const __m512 sv = _mm512_set1_ps(scale);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; c += 16) {
        const __mmask16 k = tail_mask(C - c);
        __m512 hv = load_bf16(h + o + c, k);
        if (hb != nullptr) hv = round_bf16_ps(_mm512_add_ps(hv, load_bf16(hb + c, k)));  // h's bias, added here
        const __m512 hd = round_bf16_ps(_mm512_maskz_mul_ps(keep16(seed, o + c, thr), hv, sv));
        const __m512 v = round_bf16_ps(_mm512_add_ps(load_bf16(x + o + c, k), hd));
        _mm512_mask_storeu_ps(buf.data() + c, k, v);
        store_bf16(r + o + c, k, v);
        acc = _mm512_add_ps(acc, v);  // zero in the tail lanes
      }
      mu = _mm512_reduce_add_ps(acc) / C;
      const __m512 m = _mm512_set1_ps(mu);
      __m512 vacc = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; c += 16) {
        const __mmask16 k = tail_mask(C - c);
        const __m512 d = _mm512_maskz_sub_ps(k, _mm512_maskz_loadu_ps(k, buf.data() + c), m);
        vacc = _mm512_fmadd_ps(d, d, vacc);
      }
      rs = 1.f / std::sqrt(_mm512_reduce_add_ps(vacc) / C + eps);
      const __m512 rsv = _mm512_set1_ps(rs);
      for (int64_t c = 0; c < C; c += 16) {
        const __mmask16 k = tail_mask(C - c);
        const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, buf.data() + c), m), rsv);
        store_bf16(y + o + c, k, _mm512_fmadd_ps(xh, load_bf16(gamma + c, k), load_bf16(beta + c, k)));
      }
#else
      float sum = 0.f;
      for (int64_t c = 0; c < C; ++c) {
        const float hv = hb != nullptr ? round_bf16(bf16_bits_to_float(h[o + c]) + bf16_bits_to_float(hb[c]))
                                       : bf16_bits_to_float(h[o + c]);
        const float hd = (thr == 0 || kept(seed, o + c, thr)) ? round_bf16(hv * scale) : 0.f;
        const float v = round_bf16(bf16_bits_to_float(x[o + c]) + hd);
        buf[c] = v;
        r[o + c] = float_to_bf16_bits(v);
        sum += v;
      }
      mu = sum / C;
      float var = 0.f;
      for (int64_t c = 0; c < C; ++c) var += (buf[c] - mu) * (buf[c] - mu);
      rs = 1.f / std::sqrt(var / C + eps);
      for (int64_t c = 0; c < C; ++c)
        y[o + c] = float_to_bf16_bits((buf[c] - mu) * rs * bf16_bits_to_float(gamma[c]) + bf16_bits_to_float(beta[c]));
#endif
      mean[n] = mu;
      rstd[n] = rs;
    }
  });
}

void dal_backward_u16(const uint16_t* dy, const uint16_t* dr, const uint16_t* r, const uint16_t* gamma,
                      const float* mean, const float* rstd, uint16_t* dx, uint16_t* dh, float* dgamma, float* dbeta,
                      int64_t N, int64_t C, uint64_t seed, uint64_t thr, float scale) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N));
  std::vector<float> acc(parts * 2 * C, 0.f);
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t part = pb; part < pe; ++part) {
      float* dga = acc.data() + part * 2 * C;
      float* dba = dga + C;
      for (int64_t n = part * N / parts; n < (part + 1) * N / parts; ++n) {
        const int64_t o = n * C;
        const float mu = mean[n], rs = rstd[n];
#ifdef FPM_AVX512DQ
        const __m512 m = _mm512_set1_ps(mu), rsv = _mm512_set1_ps(rs), sv = _mm512_set1_ps(scale);
        __m512 sa = _mm512_setzero_ps(), sb = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; c += 16) {
          const __mmask16 k = tail_mask(C - c);
          const __m512 d = load_bf16(dy + o + c, k);
          const __m512 xh = _mm512_maskz_mul_ps(k, _mm512_sub_ps(load_bf16(r + o + c, k), m), rsv);
          const __m512 g = _mm512_mul_ps(d, load_bf16(gamma + c, k));
          sa = _mm512_add_ps(sa, g);
          sb = _mm512_fmadd_ps(g, xh, sb);
          _mm512_mask_storeu_ps(dga + c, k, _mm512_fmadd_ps(d, xh, _mm512_maskz_loadu_ps(k, dga + c)));
          _mm512_mask_storeu_ps(dba + c, k, _mm512_add_ps(d, _mm512_maskz_loadu_ps(k, dba + c)));
        }
        const __m512 a = _mm512_set1_ps(_mm512_reduce_add_ps(sa) / C), b = _mm512_set1_ps(_mm512_reduce_add_ps(sb) / C);
        for (int64_t c = 0; c < C; c += 16) {
          const __mmask16 k = tail_mask(C - c);
          const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(load_bf16(r + o + c, k), m), rsv);
          const __m512 g = _mm512_mul_ps(load_bf16(dy + o + c, k), load_bf16(gamma + c, k));
          __m512 v = _mm512_mul_ps(rsv, _mm512_sub_ps(_mm512_sub_ps(g, a), _mm512_mul_ps(xh, b)));
          if (dr != nullptr) v = _mm512_add_ps(v, load_bf16(dr + o + c, k));
          v = round_bf16_ps(v);
          store_bf16(dx + o + c, k, v);
          store_bf16(dh + o + c, k, _mm512_maskz_mul_ps(keep16(seed, o + c, thr), v, sv));
        }
#else
        float sa = 0.f, sb = 0.f;
        for (int64_t c = 0; c < C; ++c) {
          const float d = bf16_bits_to_float(dy[o + c]);
          const float xh = (bf16_bits_to_float(r[o + c]) - mu) * rs;
          const float gc = d * bf16_bits_to_float(gamma[c]);
          sa += gc;
          sb += gc * xh;
          dga[c] += d * xh;
          dba[c] += d;
        }
        const float a = sa / C, b = sb / C;
        for (int64_t c = 0; c < C; ++c) {
          const float xh = (bf16_bits_to_float(r[o + c]) - mu) * rs;
          const float gc = bf16_bits_to_float(dy[o + c]) * bf16_bits_to_float(gamma[c]);
          float v = rs * (gc - a - xh * b);
          if (dr != nullptr) v += bf16_bits_to_float(dr[o + c]);
          const uint16_t vb = float_to_bf16_bits(v);
          dx[o + c] = vb;
          dh[o + c] = (thr == 0 || kept(seed, o + c, thr)) ? float_to_bf16_bits(bf16_bits_to_float(vb) * scale) : 0;
        }
#endif
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    float ga = 0.f, ba = 0.f;
    for (int64_t part = 0; part < parts; ++part) {
      ga += acc[part * 2 * C + c];
      ba += acc[part * 2 * C + C + c];
    }
    dgamma[c] = ga;
    dbeta[c] = ba;
  }
}


// softmax over the last dimension of attention scores plus an additive key mask, then dropout
// (fpm.models.kernels.attention): the probabilities P (kept for backward) and P times the dropout
// mask (dropout_apply's mask for P's flat index) in one pass; backward dS = P * (dPd*mask - sum(P*dPd*mask)).
#ifdef FPM_AVX512DQ
inline __m512 exp512(__m512 x) {  // e^x for x <= 0 (relative error ~2e-7), exactly 0 below -87
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GT_OQ);
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);  // 2^t = 2^n * 2^f, f in [0, 1)
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}
#endif

void softmax_dropout_fwd_u16(const uint16_t* scores, const uint16_t* mask, uint16_t* probs, uint16_t* dropped,
                             int64_t rows, int64_t rows_per_batch, int64_t T, uint64_t seed, uint64_t thr, float scale) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(T);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * T;
      const uint16_t* m = mask != nullptr ? mask + (r / rows_per_batch) * T : nullptr;
#ifdef FPM_AVX512DQ
      __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t c = 0; c < T; c += 16) {
        const __mmask16 k = tail_mask(T - c);
        __m512 v = load_bf16(scores + o + c, k);
        if (m != nullptr) v = _mm512_add_ps(v, load_bf16(m + c, k));
        _mm512_mask_storeu_ps(buf.data() + c, k, v);
        mx = _mm512_mask_max_ps(mx, k, mx, v);
      }
      const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t c = 0; c < T; c += 16) {
        const __mmask16 k = tail_mask(T - c);
        const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, buf.data() + c), top)));
        _mm512_mask_storeu_ps(buf.data() + c, k, e);
        sum = _mm512_add_ps(sum, e);
      }
      const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum)), sv = _mm512_set1_ps(scale);
      for (int64_t c = 0; c < T; c += 16) {
        const __mmask16 k = tail_mask(T - c);
        const __m512 p = round_bf16_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, buf.data() + c), inv));
        store_bf16(probs + o + c, k, p);
        if (dropped != nullptr) store_bf16(dropped + o + c, k, _mm512_maskz_mul_ps(keep16(seed, o + c, thr), p, sv));
      }
#else
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < T; ++c) {
        buf[c] = bf16_bits_to_float(scores[o + c]) + (m != nullptr ? bf16_bits_to_float(m[c]) : 0.f);
        top = std::max(top, buf[c]);
      }
      float sum = 0.f;
      for (int64_t c = 0; c < T; ++c) {
        buf[c] = std::exp(buf[c] - top);
        sum += buf[c];
      }
      for (int64_t c = 0; c < T; ++c) {
        const uint16_t p = float_to_bf16_bits(buf[c] / sum);
        probs[o + c] = p;
        if (dropped != nullptr)
          dropped[o + c] = (thr == 0 || kept(seed, o + c, thr)) ? float_to_bf16_bits(bf16_bits_to_float(p) * scale) : 0;
      }
#endif
    }
  });
}

// `dropped` (the forward's output) stands in for the dropout mask: where P > 0, P*scale > 0 in bf16,
// so dropped != 0 exactly where kept; where P == 0 the gradient is P * (...) = 0 either way. Reading
// it is cheaper here than hashing the seed again.
void softmax_dropout_bwd_u16(const uint16_t* grad, const uint16_t* probs, const uint16_t* dropped, uint16_t* out,
                             int64_t rows, int64_t T, float scale) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(T);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * T;
#ifdef FPM_AVX512DQ
      const __m512 sv = _mm512_set1_ps(scale);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < T; c += 16) {
        const __mmask16 k = tail_mask(T - c);
        // the dropout backward rounds to bf16, as the separate dropout kernel's output is bf16
        const __mmask16 keep = dropped == nullptr ? k : _mm512_mask_test_epi16_mask(
            k, _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(k, dropped + o + c)),
            _mm512_castsi256_si512(_mm256_set1_epi16(0x7FFF)));
        const __m512 g = round_bf16_ps(_mm512_maskz_mul_ps(keep, load_bf16(grad + o + c, k), sv));
        _mm512_mask_storeu_ps(buf.data() + c, k, g);
        acc = _mm512_fmadd_ps(g, load_bf16(probs + o + c, k), acc);
      }
      const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
      for (int64_t c = 0; c < T; c += 16) {
        const __mmask16 k = tail_mask(T - c);
        store_bf16(out + o + c, k, _mm512_mul_ps(load_bf16(probs + o + c, k),
                                                 _mm512_sub_ps(_mm512_maskz_loadu_ps(k, buf.data() + c), dot)));
      }
#else
      float dot = 0.f;
      for (int64_t c = 0; c < T; ++c) {
        const bool keep = dropped == nullptr || (dropped[o + c] & 0x7FFF) != 0;
        buf[c] = keep ? round_bf16(bf16_bits_to_float(grad[o + c]) * scale) : 0.f;
        dot += buf[c] * bf16_bits_to_float(probs[o + c]);
      }
      for (int64_t c = 0; c < T; ++c) out[o + c] = float_to_bf16_bits(bf16_bits_to_float(probs[o + c]) * (buf[c] - dot));
#endif
    }
  });
}


// cross-entropy over rows of bf16 logits (fpm.models.losses): overwrites each row with
// (softmax(x) - onehot(target)) * scale[row], x = logits (+ bias), and returns the summed loss
// lse(x) - x[target] over rows with scale > 0. Float math, one row (<= a few hundred KB) at a time.
double xent_grad_u16(uint16_t* logits, const int64_t* target, const float* scale, const float* bias, int64_t rows,
                     int64_t V) {
  return at::parallel_reduce(0, rows, 1, 0.0, [&](int64_t begin, int64_t end, double acc) {
    std::vector<float> buf(V);
    for (int64_t r = begin; r < end; ++r) {
      uint16_t* row = logits + r * V;
      float top = -std::numeric_limits<float>::infinity();
      int64_t c = 0;
#ifdef FPM_AVX512DQ
      __m512 mx = _mm512_set1_ps(top);
      for (; c < V; c += 16) {
        const __mmask16 k = tail_mask(V - c);
        __m512 v = load_bf16(row + c, k);
        if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias + c));
        _mm512_mask_storeu_ps(buf.data() + c, k, v);
        mx = _mm512_mask_max_ps(mx, k, mx, v);
      }
      top = _mm512_reduce_max_ps(mx);
      const __m512 tv = _mm512_set1_ps(top);
      __m512 sv = _mm512_setzero_ps();
      for (c = 0; c < V; c += 16) {
        const __mmask16 k = tail_mask(V - c);
        const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, buf.data() + c), tv)));
        _mm512_mask_storeu_ps(buf.data() + c, k, e);
        sv = _mm512_add_ps(sv, e);
      }
      const float sum = _mm512_reduce_add_ps(sv);
#else
      for (; c < V; ++c) {
        buf[c] = bf16_bits_to_float(row[c]) + (bias != nullptr ? bias[c] : 0.f);
        top = std::max(top, buf[c]);
      }
      float sum = 0.f;
      for (c = 0; c < V; ++c) {
        buf[c] = std::exp(buf[c] - top);
        sum += buf[c];
      }
#endif
      const int64_t t = target[r];
      const float picked = bf16_bits_to_float(row[t]) + (bias != nullptr ? bias[t] : 0.f);
      if (scale[r] > 0.f) acc += static_cast<double>(top + std::log(sum) - picked);
      const float f = scale[r] / sum;
#ifdef FPM_AVX512DQ
      const __m512 fv = _mm512_set1_ps(f);
      for (c = 0; c < V; c += 16) {
        const __mmask16 k = tail_mask(V - c);
        store_bf16(row + c, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, buf.data() + c), fv));
      }
#else
      for (c = 0; c < V; ++c) row[c] = float_to_bf16_bits(buf[c] * f);
#endif
      row[t] = float_to_bf16_bits(buf[t] * f - scale[r]);
    }
    return acc;
  }, std::plus<double>());
}

}  // namespace

double sumsq16(const std::vector<torch::Tensor>& xs) {
  double total = 0.0;
  for (const auto& x : xs) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.device().is_cpu(), "sumsq16: contiguous bf16 CPU tensors");
    total += sumsq_u16(reinterpret_cast<const uint16_t*>(x.data_ptr()), x.numel());
  }
  return total;
}

// AdamW step t (1-based) over the flat fp32 master weights/moments of one parameter group;
// grads[i] and params[i] (bf16, contiguous) own the next params[i].numel() elements.
void adamw16(torch::Tensor master, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
             const std::vector<torch::Tensor>& grads, const std::vector<torch::Tensor>& params,
             double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step, double grad_scale) {
  TORCH_CHECK(master.scalar_type() == at::kFloat && exp_avg.scalar_type() == at::kFloat &&
              exp_avg_sq.scalar_type() == at::kFloat && master.is_contiguous() && exp_avg.is_contiguous() &&
              exp_avg_sq.is_contiguous() && grads.size() == params.size(), "adamw16: flat fp32 state, matching lists");
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const AdamW a{static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(eps),
                static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(lr / bc1),
                static_cast<float>(1.0 / std::sqrt(bc2)), static_cast<float>(grad_scale)};
  float* w = master.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  int64_t off = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& g = grads[i];
    const auto& p = params[i];
    TORCH_CHECK(g.scalar_type() == at::kBFloat16 && p.scalar_type() == at::kBFloat16 && g.is_contiguous() &&
                p.is_contiguous() && g.numel() == p.numel(), "adamw16: contiguous bf16 gradients and parameters");
    TORCH_CHECK(off + p.numel() <= master.numel(), "adamw16: parameters larger than the master weights");
    adamw_u16(a, w + off, m + off, v + off, reinterpret_cast<const uint16_t*>(g.data_ptr()),
              reinterpret_cast<uint16_t*>(p.data_ptr()), p.numel());
    off += p.numel();
  }
  TORCH_CHECK(off == master.numel(), "adamw16: parameters do not cover the master weights");
}

// With ones_row, one more output row of ones: (x^T; 1) @ g then holds g's column sums in its last
// row, a bias gradient for the price of one more row in the matmul.
torch::Tensor transpose16(const torch::Tensor& x, bool ones_row) {
  TORCH_CHECK(x.dim() == 2 && x.element_size() == 2 && x.device().is_cpu(),
              "transpose16: a 2-D CPU tensor of 16-bit elements");
  const auto src = x.contiguous();
  auto out = torch::empty({src.size(1) + (ones_row ? 1 : 0), src.size(0)}, src.options());
  transpose_u16(reinterpret_cast<const uint16_t*>(src.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()),
                src.size(0), src.size(1));
  if (ones_row) out[src.size(1)].fill_(1.0);
  return out;
}

torch::Tensor dropout_apply(const torch::Tensor& x, int64_t seed, int64_t thr, double scale) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.device().is_cpu(), "dropout_apply: a bf16 CPU tensor");
  const auto src = x.contiguous();
  auto out = torch::empty_like(src);
  const float s = static_cast<float>(c10::BFloat16(static_cast<float>(scale)));  // the mask's bf16 value
  dropout_apply_u16(reinterpret_cast<const uint16_t*>(src.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()),
                    src.numel(), static_cast<uint64_t>(seed), static_cast<uint64_t>(thr), s);
  return out;
}

torch::Tensor dropout_mask(const torch::Tensor& like, int64_t seed, int64_t thr, double scale) {
  auto out = torch::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  const auto s = static_cast<uint64_t>(seed);
  const auto t = static_cast<uint64_t>(thr);
  switch (out.scalar_type()) {
    case at::kBFloat16: fill_as<at::BFloat16, uint16_t>(out, s, t, scale); break;
    case at::kHalf: fill_as<at::Half, uint16_t>(out, s, t, scale); break;
    case at::kFloat: fill_as<float, uint32_t>(out, s, t, scale); break;
    case at::kDouble: {
      const double value = static_cast<double>(static_cast<float>(scale));  // as the float32 reference rounds it
      uint64_t keep;
      std::memcpy(&keep, &value, sizeof(keep));
      fill<uint64_t>(reinterpret_cast<uint64_t*>(out.data_ptr<double>()), out.numel(), s, t, keep);
      break;
    }
    default: TORCH_CHECK(false, "dropout_mask: unsupported dtype ", out.scalar_type());
  }
  return out;
}

std::vector<torch::Tensor> to_heads(const torch::Tensor& rows, const torch::Tensor& row_of, int64_t batch, int64_t seq,
                                    int64_t groups, int64_t heads, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(rows.dim() == 2 && rows.device().is_cpu() && row_of.scalar_type() == at::kLong &&
              row_of.numel() == batch * seq && rows.size(1) % (groups * heads) == 0, "to_heads: bad arguments");
  const auto src = rows.contiguous();
  const auto ro = row_of.contiguous();
  const int64_t d = src.size(1) / (groups * heads);
  std::vector<torch::Tensor> outs;
  std::vector<char*> ptrs;
  for (int64_t g = 0; g < groups; ++g) {
    outs.push_back(torch::empty({batch, heads, seq, d}, src.options()));
    ptrs.push_back(static_cast<char*>(outs.back().data_ptr()));
  }
  if (bias.has_value())
    TORCH_CHECK(src.scalar_type() == at::kBFloat16 && bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() &&
                bias->numel() == src.size(1), "to_heads: a bias needs bf16 rows and a bf16 [groups * heads * d] bias");
  to_heads_impl(static_cast<const char*>(src.data_ptr()), ro.data_ptr<int64_t>(), ptrs, batch, seq, groups, heads, d,
                src.element_size(), bias.has_value() ? reinterpret_cast<const uint16_t*>(bias->data_ptr()) : nullptr);
  return outs;
}

torch::Tensor to_rows(const std::vector<torch::Tensor>& heads, const torch::Tensor& index) {
  TORCH_CHECK(!heads.empty() && index.scalar_type() == at::kLong, "to_rows: bad arguments");
  const int64_t h = heads[0].size(1), seq = heads[0].size(2), d = heads[0].size(3);
  std::vector<torch::Tensor> keep;  // contiguous copies where needed, alive until the copy is done
  std::vector<const char*> ptrs;
  for (const auto& x : heads) {
    TORCH_CHECK(x.sizes() == heads[0].sizes() && x.scalar_type() == heads[0].scalar_type() && x.device().is_cpu(),
                "to_rows: heads of one shape and dtype");
    keep.push_back(x.contiguous());
    ptrs.push_back(static_cast<const char*>(keep.back().data_ptr()));
  }
  const auto idx = index.contiguous();
  const int64_t n = idx.numel(), groups = static_cast<int64_t>(heads.size());
  auto out = torch::empty({n, groups * h * d}, heads[0].options().memory_format(at::MemoryFormat::Contiguous));
  to_rows_impl(ptrs, idx.data_ptr<int64_t>(), static_cast<char*>(out.data_ptr()), n, seq, groups, h, d,
               heads[0].element_size());
  return out;
}

namespace {
const uint16_t* u16(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
uint16_t* u16m(torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }
void check_bf16(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.device().is_cpu(), what,
              ": contiguous bf16 CPU tensors");
}
}  // namespace

// h_bias: None, or a bf16 [C] bias added to h first (h is then a matmul's output without its bias)
std::vector<torch::Tensor> dropout_add_ln_forward(const torch::Tensor& h, const c10::optional<torch::Tensor>& h_bias,
                                                  const torch::Tensor& x, const torch::Tensor& gamma,
                                                  const torch::Tensor& beta, int64_t seed, int64_t thr, double scale,
                                                  double eps) {
  for (const auto* t : {&h, &x, &gamma, &beta}) check_bf16(*t, "dropout_add_ln_forward");
  if (h_bias.has_value()) {
    check_bf16(*h_bias, "dropout_add_ln_forward");
    TORCH_CHECK(h_bias->numel() == gamma.numel(), "dropout_add_ln_forward: h_bias shape");
  }
  const int64_t c = gamma.numel(), n = h.numel() / c;
  TORCH_CHECK(h.sizes() == x.sizes() && h.size(-1) == c && beta.numel() == c, "dropout_add_ln_forward: shapes");
  auto r = torch::empty_like(h), y = torch::empty_like(h);
  auto mean = torch::empty({n}, h.options().dtype(at::kFloat)), rstd = torch::empty({n}, h.options().dtype(at::kFloat));
  const float s = static_cast<float>(c10::BFloat16(static_cast<float>(scale)));  // the mask's bf16 value
  dal_forward_u16(u16(h), h_bias.has_value() ? u16(*h_bias) : nullptr, u16(x), u16(gamma), u16(beta), u16m(r), u16m(y), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                  n, c, static_cast<uint64_t>(seed), static_cast<uint64_t>(thr), s, static_cast<float>(eps));
  return {r, y, mean, rstd};
}

std::vector<torch::Tensor> dropout_add_ln_backward(const torch::Tensor& dy, const c10::optional<torch::Tensor>& dr,
                                                   const torch::Tensor& r, const torch::Tensor& gamma,
                                                   const torch::Tensor& mean, const torch::Tensor& rstd, int64_t seed,
                                                   int64_t thr, double scale) {
  for (const auto* t : {&dy, &r, &gamma}) check_bf16(*t, "dropout_add_ln_backward");
  if (dr.has_value()) check_bf16(*dr, "dropout_add_ln_backward");
  const int64_t c = gamma.numel(), n = r.numel() / c;
  auto dx = torch::empty_like(r), dh = torch::empty_like(r);
  auto dgamma = torch::empty({c}, r.options().dtype(at::kFloat)), dbeta = torch::empty({c}, r.options().dtype(at::kFloat));
  const float s = static_cast<float>(c10::BFloat16(static_cast<float>(scale)));
  dal_backward_u16(u16(dy), dr.has_value() ? u16(*dr) : nullptr, u16(r), u16(gamma), mean.data_ptr<float>(),
                   rstd.data_ptr<float>(), u16m(dx), u16m(dh), dgamma.data_ptr<float>(), dbeta.data_ptr<float>(), n, c,
                   static_cast<uint64_t>(seed), static_cast<uint64_t>(thr), s);
  return {dx, dh, dgamma, dbeta};
}

// scores [..., Tq, T] (bf16, contiguous), mask: an additive bf16 key mask [batch, T] or None, where
// batch = scores.size(0); returns (P, P with dropout) — the same tensor twice when thr == 0.
std::vector<torch::Tensor> softmax_dropout_forward(const torch::Tensor& scores, const c10::optional<torch::Tensor>& mask,
                                                   int64_t seed, int64_t thr, double scale) {
  check_bf16(scores, "softmax_dropout_forward");
  const int64_t T = scores.size(-1), rows = scores.numel() / T;
  if (mask.has_value()) {
    check_bf16(*mask, "softmax_dropout_forward");
    TORCH_CHECK(mask->numel() == scores.size(0) * T, "softmax_dropout_forward: mask must be [batch, keys]");
  }
  auto probs = torch::empty_like(scores);
  auto dropped = thr == 0 ? probs : torch::empty_like(scores);
  const float s = static_cast<float>(c10::BFloat16(static_cast<float>(scale)));
  softmax_dropout_fwd_u16(u16(scores), mask.has_value() ? u16(*mask) : nullptr, u16m(probs),
                          thr == 0 ? nullptr : u16m(dropped), rows, rows / scores.size(0), T,
                          static_cast<uint64_t>(seed), static_cast<uint64_t>(thr), s);
  return {probs, dropped};
}

// dropped: softmax_dropout_forward's second output, or None when there was no dropout
torch::Tensor softmax_dropout_backward(const torch::Tensor& grad, const torch::Tensor& probs,
                                       const c10::optional<torch::Tensor>& dropped, double scale) {
  check_bf16(grad, "softmax_dropout_backward");
  check_bf16(probs, "softmax_dropout_backward");
  TORCH_CHECK(grad.sizes() == probs.sizes(), "softmax_dropout_backward: shapes");
  if (dropped.has_value()) {
    check_bf16(*dropped, "softmax_dropout_backward");
    TORCH_CHECK(dropped->sizes() == probs.sizes(), "softmax_dropout_backward: shapes");
  }
  auto out = torch::empty_like(probs);
  const int64_t T = probs.size(-1);
  const float s = static_cast<float>(c10::BFloat16(static_cast<float>(scale)));
  softmax_dropout_bwd_u16(u16(grad), u16(probs), dropped.has_value() ? u16(*dropped) : nullptr, u16m(out),
                          probs.numel() / T, T, s);
  return out;
}

// logits [rows, V] bf16 (overwritten with the gradient), target [rows] int64 in [0, V), scale [rows]
// float32, bias [V] float32 or None; returns the summed loss of the rows with scale > 0
double xent_grad16(torch::Tensor logits, const torch::Tensor& target, const torch::Tensor& scale,
                   const c10::optional<torch::Tensor>& bias) {
  check_bf16(logits, "xent_grad16");
  TORCH_CHECK(logits.dim() == 2 && target.scalar_type() == at::kLong && target.is_contiguous() &&
              target.numel() == logits.size(0) && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
              scale.numel() == logits.size(0), "xent_grad16: target int64 [rows], scale float32 [rows]");
  const int64_t V = logits.size(1);
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == V, "xent_grad16: bias float32 [V]");
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t r = 0; r < target.numel(); ++r) TORCH_CHECK(t[r] >= 0 && t[r] < V, "xent_grad16: target out of range");
  return xent_grad_u16(u16m(logits), t, scale.data_ptr<float>(), bias.has_value() ? bias->data_ptr<float>() : nullptr,
                       logits.size(0), V);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dropout_mask", &dropout_mask, "SplitMix64 dropout mask (scale where kept, 0 where dropped)");
  m.def("dropout_apply", &dropout_apply, "x times its SplitMix64 dropout mask, without writing the mask (bf16)");
  m.def("transpose16", &transpose16, "contiguous transpose of a 2-D 16-bit tensor (optionally a row of ones below)",
        py::arg("x"), py::arg("ones_row") = false);
  m.def("sumsq16", &sumsq16, "sum of squares of bf16 tensors (float accumulation)");
  m.def("to_heads", &to_heads, "rows of kept positions (+ bias) -> zero-padded (batch, heads, seq, d) tensors",
        py::arg("rows"), py::arg("row_of"), py::arg("batch"), py::arg("seq"), py::arg("groups"), py::arg("heads"),
        py::arg("bias") = py::none());
  m.def("to_rows", &to_rows, "(batch, heads, seq, d) tensors -> rows of the positions in index");
  m.def("dropout_add_ln_forward", &dropout_add_ln_forward, "r = x + dropout(h + h_bias), y = layer_norm(r) (bf16)");
  m.def("dropout_add_ln_backward", &dropout_add_ln_backward, "gradients of dropout_add_ln_forward (bf16)");
  m.def("softmax_dropout_forward", &softmax_dropout_forward, "softmax(scores + key mask) and its dropout (bf16)");
  m.def("softmax_dropout_backward", &softmax_dropout_backward, "gradient of softmax_dropout_forward's dropped output (bf16)");
  m.def("xent_grad16", &xent_grad16, "cross-entropy gradient of bf16 logits in place; returns the summed loss");
  m.def("adamw16", &adamw16, "AdamW on flat fp32 master weights from bf16 gradients, bf16 weights written back");
}
