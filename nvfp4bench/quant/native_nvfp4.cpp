// NVFP4 fake quantization (quantize, then dequantize to fp32) on the CPU, in C++: the
// arithmetic of nvfp4bench/quant/nvfp4.py, operation for operation and in the same order, so
// that every result has the same bits as the eager PyTorch path (the tests check both against
// the NumPy reference). Built and loaded by native.py; called by kernels.py.
//
// Rounding rules kept from the PyTorch code (docs/nvfp4.md section 2):
//   S_enc = min(fl(2688 / amax), FLT_MAX), 1 where amax is 0 or S_enc is 0;  S_dec = fl(1 / S_enc)
//   s_b   = e4m3(min(fl(bamax * fl(S_enc * fl(1/6))), 448))                  (RNE, subnormals)
//   enc_b = min(fl(1 / fl(s_b * S_dec)), FLT_MAX)
//   x_hat = fl(fl(e2m1(fl(x * enc_b)) * s_b) * S_dec)
// Every maximum and clamp lets a NaN through, as torch.amax and torch.clamp do. Built with
// -ffp-contract=off and without -ffast-math: no product is fused into a sum, nothing is
// reassociated, a division is an IEEE division and nearbyint/floor round as torch.round/floor.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;
constexpr float kE2M1Max = 6.0f;
constexpr float kE4M3Max = 448.0f;
constexpr float kEncodeNumerator = 2688.0f;  // E2M1 max * E4M3 max
constexpr float kFltMax = std::numeric_limits<float>::max();
constexpr int32_t kExponentMask = 0x7F800000;
constexpr int32_t kExponentOne = 1 << 23;
constexpr int32_t kE4M3MinStep = 0x3B000000;    // 2^-9, the E4M3 subnormal step
constexpr int32_t kExponentNegate = 0x7F000000;  // minus the bits of 2^s: the bits of 2^-s

enum Mode : int64_t { kRN = 0, kSRHardware = 1, kSRIdeal = 2 };

inline int32_t bits_of(float v) {
  int32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

inline float float_of(int32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

inline float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }  // torch.amax
inline float clamp_max(float v, float hi) { return v > hi ? hi : v; }        // torch.clamp(max=)
inline float clamp_min(float v, float lo) { return v < lo ? lo : v; }        // torch.clamp(min=)

// nvfp4.e4m3_round: a multiple of 2^max(e - 3, -9), ties to even
inline float e4m3_round(float v) {
  const int32_t step_bits = std::max((bits_of(v) & kExponentMask) - 3 * kExponentOne, kE4M3MinStep);
  return std::nearbyint(v * float_of(kExponentNegate - step_bits)) * float_of(step_bits);
}

struct TensorScales {
  float s_dec;
  float multiplier;  // fl(S_enc * fl(1/6))
};

inline TensorScales tensor_scales(float amax) {
  float s_enc = clamp_max(kEncodeNumerator / amax, kFltMax);
  if (amax == 0.0f || s_enc == 0.0f) s_enc = 1.0f;
  const float sixth = 1.0f / kE2M1Max;
  return {1.0f / s_enc, s_enc * sixth};
}

struct BlockScales {
  float scale;   // s_b
  float encode;  // enc_b
};

inline BlockScales block_scales(float bamax, const TensorScales& t) {
  const float scale = e4m3_round(clamp_max(bamax * t.multiplier, kE4M3Max));
  return {scale, clamp_max(1.0f / (scale * t.s_dec), kFltMax)};
}

// nvfp4.grid_steps_compare: the E2M1 grid step around |y| <= 6 and its reciprocal
inline void grid_steps(float magnitude, float& step, float& inverse) {
  const bool below_2 = magnitude < 2.0f, below_4 = magnitude < 4.0f;
  step = below_2 ? 0.5f : (below_4 ? 1.0f : 2.0f);
  inverse = below_2 ? 2.0f : (below_4 ? 1.0f : 0.5f);
}

// nvfp4._round_rn of fl(x * enc_b)
inline float e2m1_rn(float x, float encode) {
  const float y = clamp_max(clamp_min(x * encode, -kE2M1Max), kE2M1Max);
  float step, inverse;
  grid_steps(std::fabs(y), step, inverse);
  return std::nearbyint(y * inverse) * step;
}

// nvfp4.round_sr_abs of fl(|x| * enc_b), x's sign restored; `draw` is the element's noise
// (its 8 random bits as a float for hardware SR, a uniform in [0, 1) for ideal SR)
template <bool Hardware>
inline float e2m1_sr(float x, float encode, float draw) {
  const float a = clamp_max(std::fabs(x) * encode, kE2M1Max);
  float step, inverse;
  grid_steps(a, step, inverse);
  const float t = a * inverse;
  const float low = std::floor(t);
  const float fraction = t - low;
  const bool up = draw < (Hardware ? std::floor(fraction * 256.0f) : fraction);
  return std::copysign((low + (up ? 1.0f : 0.0f)) * step, x);
}

// One block of 16: dst[e] = x_hat of src[e]; `bits` / `uniform`: the block's draws (SR only).
// Simple loops of 16 with the rounding mode fixed at compile time: the compiler vectorises them.
template <int64_t Mode>
inline void quantize_block(const float* __restrict src, float* __restrict dst, BlockScales b,
                           float s_dec, const uint8_t* __restrict bits,
                           const float* __restrict uniform) {
  float draws[kBlock];  // hardware SR: the 8-bit draws as floats first (both loops vectorise)
  if constexpr (Mode == kSRHardware)
    for (int64_t e = 0; e < kBlock; ++e) draws[e] = float(bits[e]);
  for (int64_t e = 0; e < kBlock; ++e) {
    float v;
    if constexpr (Mode == kRN) v = e2m1_rn(src[e], b.encode);
    if constexpr (Mode == kSRHardware) v = e2m1_sr<true>(src[e], b.encode, draws[e]);
    if constexpr (Mode == kSRIdeal) v = e2m1_sr<false>(src[e], b.encode, uniform[e]);
    dst[e] = (v * b.scale) * s_dec;
  }
}

// The draws of an SR cast: uint8 random bits (hardware) or fp32 uniforms (ideal), one per
// element of the result, in its layout.
struct Draws {
  const uint8_t* bits = nullptr;
  const float* uniform = nullptr;
};

Draws draws_of(const c10::optional<torch::Tensor>& noise, int64_t mode) {
  Draws d;
  if (mode == kSRHardware) d.bits = noise->data_ptr<uint8_t>();
  if (mode == kSRIdeal) d.uniform = noise->data_ptr<float>();
  return d;
}

// Blocks [i0, i1) of the result (block i: elements i * 16 ...); source_of(i) points at block i's
// 16 inputs, scales_of(i) gives its BlockScales. The mode is fixed once per call, not per block.
template <int64_t Mode, class Source, class Scales>
void quantize_blocks(int64_t i0, int64_t i1, Source source_of, Scales scales_of, float* out,
                     const TensorScales& t, const Draws& draws) {
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t base = i * kBlock;
    quantize_block<Mode>(source_of(i), out + base, scales_of(i), t.s_dec,
                         Mode == kSRHardware ? draws.bits + base : nullptr,
                         Mode == kSRIdeal ? draws.uniform + base : nullptr);
  }
}

template <class Source, class Scales>
void quantize_blocks(int64_t mode, int64_t i0, int64_t i1, Source source_of, Scales scales_of,
                     float* out, const TensorScales& t, const Draws& draws) {
  switch (mode) {
    case kRN: return quantize_blocks<kRN>(i0, i1, source_of, scales_of, out, t, draws);
    case kSRHardware:
      return quantize_blocks<kSRHardware>(i0, i1, source_of, scales_of, out, t, draws);
    default: return quantize_blocks<kSRIdeal>(i0, i1, source_of, scales_of, out, t, draws);
  }
}

// max |src[e]| over a block of 16, NaN if any element is NaN (torch.amax)
inline float block_amax(const float* __restrict src) {
  float m = 0.0f;
  bool nan = false;
  for (int64_t e = 0; e < kBlock; ++e) {
    const float v = std::fabs(src[e]);
    nan |= v != v;
    m = v > m ? v : m;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

void check(const torch::Tensor& x, int64_t dims, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous() &&
                  x.dim() == dims,
              what, ": a contiguous fp32 CPU tensor of ", dims, " dims expected");
}

void check_noise(const c10::optional<torch::Tensor>& noise, int64_t mode, int64_t numel) {
  if (mode == kRN) return;
  TORCH_CHECK(mode == kSRHardware || mode == kSRIdeal, "unknown rounding mode ", mode);
  TORCH_CHECK(noise.has_value() && noise->is_contiguous() && noise->numel() == numel &&
                  noise->scalar_type() == (mode == kSRHardware ? torch::kUInt8 : torch::kFloat32),
              "SR needs one contiguous draw per element (uint8 for hardware, fp32 for ideal)");
}

float max_of(const float* v, int64_t n) {
  float m = 0.0f;  // every value is |x| >= 0 or NaN
  for (int64_t i = 0; i < n; ++i) m = max_nan(m, v[i]);
  return m;
}

float tensor_amax(const c10::optional<torch::Tensor>& amax, const float* bamax, int64_t n) {
  return amax.has_value() ? amax->item<float>() : max_of(bamax, n);
}

}  // namespace

// fake_quantize of a (R, C) tensor in 1 x 16 blocks along C, or in 16 x 16 tiles when
// tile_rows is 16 (R a multiple of 16); amax: the tensor amax to use (0-d), else x's own.
torch::Tensor fake_quantize_rows(torch::Tensor x, int64_t tile_rows,
                                 c10::optional<torch::Tensor> amax,
                                 c10::optional<torch::Tensor> noise, int64_t mode) {
  check(x, 2, "fake_quantize_rows");
  const int64_t rows = x.size(0), cols = x.size(1), blocks = cols / kBlock;
  TORCH_CHECK(cols % kBlock == 0 && (tile_rows == 1 || (tile_rows == kBlock && rows % kBlock == 0)),
              "fake_quantize_rows: C must be a multiple of 16 (and R too for 16 x 16 tiles)");
  check_noise(noise, mode, x.numel());
  const int64_t n_blocks = rows * blocks;
  const float* in = x.data_ptr<float>();
  auto bamax_t = torch::empty({n_blocks}, x.options());
  float* bamax = bamax_t.data_ptr<float>();
  at::parallel_for(0, n_blocks, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) bamax[i] = block_amax(in + i * kBlock);
  });
  if (tile_rows == kBlock)  // each 16 x 16 tile's amax on its 16 rows
    for (int64_t r = 0; r < rows; r += kBlock)
      for (int64_t j = 0; j < blocks; ++j) {
        float m = 0.0f;
        for (int64_t i = 0; i < kBlock; ++i) m = max_nan(m, bamax[(r + i) * blocks + j]);
        for (int64_t i = 0; i < kBlock; ++i) bamax[(r + i) * blocks + j] = m;
      }
  const TensorScales t = tensor_scales(tensor_amax(amax, bamax, n_blocks));
  // the block scales in a pass of their own (it vectorises across blocks)
  auto scales_t = torch::empty({2, n_blocks}, x.options());
  float* __restrict scale = scales_t.data_ptr<float>();
  float* __restrict encode = scale + n_blocks;
  for (int64_t i = 0; i < n_blocks; ++i) {
    const BlockScales b = block_scales(bamax[i], t);
    scale[i] = b.scale;
    encode[i] = b.encode;
  }
  const Draws draws = draws_of(noise, mode);
  auto out_t = torch::empty_like(x);
  float* out = out_t.data_ptr<float>();
  at::parallel_for(0, n_blocks, 4096, [&](int64_t i0, int64_t i1) {
    quantize_blocks(mode, i0, i1, [&](int64_t i) { return in + i * kBlock; },
                    [&](int64_t i) { return BlockScales{scale[i], encode[i]}; }, out, t, draws);
  });
  return out_t;
}

// fake_quantize of each x[b]^T for a (B, M, C) tensor: blocks of 16 consecutive tokens of one
// column, the tokens zero-padded to mp; the result is (B * C, mp), the transposed layout.
// Element [b * C + c, t] draws noise[(b * C + c) * mp + t].
torch::Tensor fake_quantize_columns(torch::Tensor x, int64_t mp, c10::optional<torch::Tensor> amax,
                                    c10::optional<torch::Tensor> noise, int64_t mode) {
  check(x, 3, "fake_quantize_columns");
  const int64_t batch = x.size(0), m = x.size(1), c = x.size(2), token_blocks = mp / kBlock;
  TORCH_CHECK(mp % kBlock == 0 && mp >= m && mp < m + kBlock,
              "fake_quantize_columns: mp must be M rounded up to a multiple of 16");
  check_noise(noise, mode, batch * c * mp);
  const float* in = x.data_ptr<float>();
  auto bamax_t = torch::empty({batch, token_blocks, c}, x.options());
  float* bamax = bamax_t.data_ptr<float>();
  // pass 1: block amaxes, a token row at a time (contiguous along the columns)
  at::parallel_for(0, batch * token_blocks, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = g / token_blocks, tb = g % token_blocks;
      float* __restrict acc = bamax + g * c;
      std::fill(acc, acc + c, 0.0f);  // padding tokens are zeros
      const int64_t t1 = std::min(m, (tb + 1) * kBlock);
      for (int64_t tok = tb * kBlock; tok < t1; ++tok) {
        const float* __restrict row = in + (b * m + tok) * c;
        for (int64_t k = 0; k < c; ++k) {
          const float v = std::fabs(row[k]);
          acc[k] = (v > acc[k] || v != v) ? v : acc[k];  // a NaN stays
        }
      }
    }
  });
  const TensorScales t = tensor_scales(tensor_amax(amax, bamax, batch * token_blocks * c));
  const Draws draws = draws_of(noise, mode);
  auto out_t = torch::empty({batch * c, mp}, x.options());
  float* out = out_t.data_ptr<float>();
  // pass 2: each 16-token slab transposed into a (C, 16) tile, then quantized block by block
  at::parallel_for(0, batch * token_blocks, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> tile(c * kBlock);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = g / token_blocks, tb = g % token_blocks;
      for (int64_t e = 0; e < kBlock; ++e) {
        const int64_t tok = tb * kBlock + e;
        if (tok < m) {
          const float* row = in + (b * m + tok) * c;
          for (int64_t k = 0; k < c; ++k) tile[k * kBlock + e] = row[k];
        } else {
          for (int64_t k = 0; k < c; ++k) tile[k * kBlock + e] = 0.0f;  // padding tokens
        }
      }
      // the tile's row k is block (b * C + k) * token_blocks + tb of the result
      const float* slab = tile.data();
      const float* slab_amax = bamax + g * c;
      for (int64_t k = 0; k < c; ++k) {
        const int64_t i = (b * c + k) * token_blocks + tb;
        quantize_blocks(mode, i, i + 1, [&](int64_t) { return slab + k * kBlock; },
                        [&](int64_t) { return block_scales(slab_amax[k], t); }, out, t, draws);
      }
    }
  });
  return out_t;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("fake_quantize_rows", &fake_quantize_rows);
  module.def("fake_quantize_columns", &fake_quantize_columns);
}
