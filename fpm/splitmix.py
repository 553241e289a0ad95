"""SplitMix64's constants (Steele, Lea & Flood 2014), the one counter-based hash fpm uses: for the
data stream's keyed permutation (fpm.data.datasets) and the CPU dropout masks (fpm.cpu.kernels;
its C++ twin in fpm/cpu/csrc/cpu_kernels.cpp must use the same values)."""

GAMMA = 0x9E3779B97F4A7C15  # the golden-ratio increment
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB


def signed64(x: int) -> int:
    """``x`` as a two's-complement signed 64-bit integer (torch has no uint64 arithmetic)."""
    return x - (1 << 64) if x >= 1 << 63 else x
