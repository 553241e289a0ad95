// Dropout masks from a counter-based hash: element i of the mask is kept when the low 16 bits of
// SplitMix64's output for (seed + i * 0x9E3779B97F4A7C15) are >= thr. One pass, parallel over
// the elements, no generator state beyond the seed: the same (seed, shape) always gives the same
// mask. Reference implementation in Python: fpm.models.kernels.keep_bits.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

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

}  // namespace

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
}
