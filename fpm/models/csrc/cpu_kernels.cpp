// fpm's CPU kernels (JIT-built by fpm.models.kernels with OpenMP, so at::parallel_for uses the
// threads torch uses; each is checked against a torch reference before use and in
// tests/test_kernels.py).
//
// dropout_mask: element i of the mask is kept when the low 16 bits of SplitMix64's output for
// (seed + i * 0x9E3779B97F4A7C15) are >= thr. One pass, parallel over the elements, no generator
// state beyond the seed: the same (seed, shape) always gives the same mask. Reference
// implementation in Python: fpm.models.kernels.keep_bits.
//
// transpose16: a contiguous copy of the transpose of a 2-D tensor of 16-bit elements (bf16/fp16),
// 16x16 tiles transposed in AVX2 registers (4 unpack stages and a lane permute), 32-row strips so
// each output row gets whole 64-byte lines; scalar at the edges and without AVX2. ~2.5x torch's
// `x.t().contiguous()` here, which is what makes weight gradients from a contiguous transposed
// operand pay (fpm.models.kernels.Linear).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

// Writes `keep` (the bit pattern of the scale in the output dtype) or 0 per element, as plain
// integers so that the compiler vectorises the loop.
template <typename bits_t>
void fill(bits_t* out, int64_t n, uint64_t seed, uint64_t thr, bits_t keep) {
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint64_t z = seed + static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      const bits_t kept = static_cast<bits_t>((z & 0xFFFFull) >= thr);
      out[i] = static_cast<bits_t>(keep & static_cast<bits_t>(0 - kept));
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

}  // namespace

torch::Tensor transpose16(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.element_size() == 2 && x.device().is_cpu(),
              "transpose16: a 2-D CPU tensor of 16-bit elements");
  const auto src = x.contiguous();
  auto out = torch::empty({src.size(1), src.size(0)}, src.options());
  transpose_u16(reinterpret_cast<const uint16_t*>(src.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()),
                src.size(0), src.size(1));
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dropout_mask", &dropout_mask, "SplitMix64 dropout mask (scale where kept, 0 where dropped)");
  m.def("transpose16", &transpose16, "contiguous transpose of a 2-D 16-bit tensor");
}
