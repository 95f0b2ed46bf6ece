// Unit tests of the torch-free CPU kernels (csrc/cpu), built and run by CMake/ctest without torch.
// The Python suite (tests/) checks the same kernels against torch through the bindings; these
// check what is hard to reach from there: every instruction-set variant in one process, thread-count
// independence, the 16-bit conversions exhaustively, and accuracy on large inputs.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <chrono>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../cpu/chunks.h"
#include "../cpu/clip_kernels.h"
#include "../cpu/float_convert.h"
#include "../cpu/pieces.h"
#include "../cpu/simd.h"
#include "../cpu/value_clip_kernels.h"

using namespace fastclip;
using namespace fastclip::cpu;
using fastclip::cpu::simd::Isa;

namespace {

int failures = 0;

#define CHECK(condition, ...)                                          \
  do {                                                                 \
    if (!(condition)) {                                                \
      ++failures;                                                      \
      std::printf("FAILED %s:%d: %s: ", __FILE__, __LINE__, #condition); \
      std::printf(__VA_ARGS__);                                        \
      std::printf("\n");                                               \
    }                                                                  \
  } while (0)

// Splits [begin, end) into `threads` contiguous pieces run on their own std::threads.
ParallelFor threads_parallel_for(int threads) {
  return [threads](int64_t begin, int64_t end, int64_t, const std::function<void(int64_t, int64_t)>& body) {
    std::vector<std::thread> pool;
    const int64_t step = (end - begin + threads - 1) / threads;
    for (int64_t b = begin; b < end; b += step) pool.emplace_back(body, b, std::min(end, b + step));
    for (auto& t : pool) t.join();
  };
}

const ParallelFor serial = threads_parallel_for(1);

uint64_t bits_of(double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

double norm_of(const TensorView* views, int64_t count, Norm norm, DType total, const ParallelFor& pf = serial) {
  std::vector<double> norms(count);
  tensor_norms(views, count, norm, pf, norms.data());
  return total_norm(norms.data(), count, norm, total);
}

// Dyadic values whose sum of squares is exact: the L2 norm must be exact in every variant.
void test_exact_l2_every_dtype_and_variant() {
  for (Isa isa : {simd::Isa::kGeneric, simd::Isa::kAvx2, simd::Isa::kAvx512}) {
    const Isa active = simd::set_active_isa_for_testing(isa);
    std::vector<float> f32(1000, 0.0f);
    f32[0] = 3.0f, f32[999] = 4.0f;  // 5, with the 4 in the scalar tail
    std::vector<double> f64(70001, 0.0);
    f64[65536] = 12.0, f64[3] = 5.0;  // 13, across two chunks
    std::vector<uint16_t> bf16(4096, float_to_bf16(0.0f)), f16(33, float_to_fp16(0.0f));
    bf16[100] = float_to_bf16(6.0f), bf16[4000] = float_to_bf16(8.0f);  // 10
    f16[32] = float_to_fp16(-7.0f);                                       // 7
    TensorView views[] = {{f32.data(), 1000, DType::kFloat32},
                          {f64.data(), 70001, DType::kFloat64},
                          {bf16.data(), 4096, DType::kBFloat16},
                          {f16.data(), 33, DType::kFloat16}};
    std::vector<double> norms(4);
    tensor_norms(views, 4, {NormKind::kL2, 2.0}, serial, norms.data());
    CHECK(norms[0] == 5.0 && norms[1] == 13.0 && norms[2] == 10.0 && norms[3] == 7.0, "variant %s: %g %g %g %g",
          simd::isa_name(active), norms[0], norms[1], norms[2], norms[3]);
    tensor_norms(views, 4, {NormKind::kInf, INFINITY}, serial, norms.data());
    CHECK(norms[0] == 4.0 && norms[1] == 12.0 && norms[2] == 8.0 && norms[3] == 7.0, "inf, variant %s",
          simd::isa_name(active));
    tensor_norms(views, 4, {NormKind::kL1, 1.0}, serial, norms.data());
    CHECK(norms[0] == 7.0 && norms[1] == 17.0 && norms[2] == 14.0 && norms[3] == 7.0, "L1, variant %s",
          simd::isa_name(active));
  }
  simd::set_active_isa_for_testing(simd::Isa::kAvx512);
}

// Random data: every variant and every thread count gives the same bits.
void test_variants_and_thread_counts_agree_bitwise() {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> f32(300001);
  std::vector<uint16_t> bf16(131075), f16(99999);
  std::vector<double> f64(65537);
  for (auto& v : f32) v = normal(rng);
  for (auto& v : bf16) v = float_to_bf16(normal(rng));
  for (auto& v : f16) v = float_to_fp16(normal(rng));
  for (auto& v : f64) v = normal(rng);
  TensorView views[] = {{f32.data(), (int64_t)f32.size(), DType::kFloat32},
                        {bf16.data(), (int64_t)bf16.size(), DType::kBFloat16},
                        {f16.data(), (int64_t)f16.size(), DType::kFloat16},
                        {f64.data(), (int64_t)f64.size(), DType::kFloat64}};
  for (Norm norm : {Norm{NormKind::kL2, 2.0}, Norm{NormKind::kL1, 1.0}, Norm{NormKind::kInf, INFINITY}, Norm{NormKind::kP, 3.0}}) {
    simd::set_active_isa_for_testing(simd::Isa::kGeneric);
    const double reference = norm_of(views, 4, norm, DType::kFloat64);
    for (Isa isa : {simd::Isa::kGeneric, simd::Isa::kAvx2, simd::Isa::kAvx512}) {
      const Isa active = simd::set_active_isa_for_testing(isa);
      for (int threads : {1, 2, 3, 8}) {
        const double got = norm_of(views, 4, norm, DType::kFloat64, threads_parallel_for(threads));
        CHECK(bits_of(got) == bits_of(reference), "norm kind %d, variant %s, %d threads: %.17g vs %.17g",
              (int)norm.kind, simd::isa_name(active), threads, got, reference);
      }
    }
  }
  simd::set_active_isa_for_testing(simd::Isa::kAvx512);
}

// clip_with_norms_from, given the first `known` norms as span_norm computes them (as a caller that
// reduces while it gathers the tensors does), gives clip()'s bits (total, coefficient, scaled
// values) for known = 0, in the middle and = count, with empty, one-element and multi-chunk tensors.
void test_clip_with_norms_from_matches_clip() {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  std::vector<int64_t> sizes = {419, 1, 0, 65536, 37, 200001, 3, 1, 5000};
  std::vector<std::vector<float>> data;
  for (int64_t n : sizes) {
    data.emplace_back(n);
    for (float& v : data.back()) v = normal(rng);
  }
  const int64_t count = static_cast<int64_t>(sizes.size());
  for (Norm norm : {Norm{NormKind::kL2, 2.0}, Norm{NormKind::kL1, 1.0}, Norm{NormKind::kP, 0.5}}) {
    std::vector<std::vector<float>> expected_data = data;
    std::vector<TensorView> expected_views;
    for (auto& d : expected_data) expected_views.push_back({d.data(), (int64_t)d.size(), DType::kFloat32});
    const ClipResult expected = clip(expected_views.data(), count, norm, DType::kFloat32, 1e-3, serial, nullptr);
    // Workers that computed the known norms: none given, one per tensor in turn (as many as the
    // pool has threads, or more than the 3 given: the last one takes the rest).
    const std::vector<uint16_t> in_turn = {0, 1, 2, 0, 1, 2, 0, 1, 2}, beyond = {0, 7, 1, 9, 2, 2, 5, 0, 1};
    for (int64_t known : {int64_t{0}, int64_t{4}, count}) {
      for (const std::vector<uint16_t>* workers : {static_cast<const std::vector<uint16_t>*>(nullptr), &in_turn, &beyond}) {
        std::vector<std::vector<float>> got_data = data;
        std::vector<TensorView> views;
        for (auto& d : got_data) views.push_back({d.data(), (int64_t)d.size(), DType::kFloat32});
        std::vector<double> norms(count);
        for (int64_t t = 0; t < known; ++t) norms[t] = span_norm(views[t].dtype, views[t].data, views[t].numel, norm);
        const KnownNorms known_norms{known, workers ? workers->data() : nullptr, workers ? 3 : 0};
        const ClipResult got = clip_with_norms_from(views.data(), count, known_norms, norms.data(), norm, DType::kFloat32,
                                                    1e-3, threads_parallel_for(3));
        CHECK(bits_of(got.total_norm) == bits_of(expected.total_norm) && bits_of(got.coefficient) == bits_of(expected.coefficient),
              "norm kind %d, known %lld: %.17g vs %.17g", (int)norm.kind, (long long)known, got.total_norm, expected.total_norm);
        CHECK(got_data == expected_data, "norm kind %d, known %lld, workers %s: scaled values differ", (int)norm.kind,
              (long long)known, workers == nullptr ? "none" : workers == &in_turn ? "in turn" : "beyond");
      }
    }
  }
}

// span_norm (one tensor, as the reduction while taking gradients computes it) gives tensor_norms' bits
// for every dtype and norm, one chunk or several, with sums beyond float's range and NaN; and a
// narrow dtype's L2 norm of an exact sum of squares is the float of the double square root, as torch
// roots its double accumulator (finished in double, not through x87's long double root).
void test_span_norm_matches_tensor_norms() {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  const Norm norms[] = {{NormKind::kL2, 2.0}, {NormKind::kL1, 1.0}, {NormKind::kInf, INFINITY}, {NormKind::kP, 3.0}};
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kFloat64}) {
    for (int64_t n : {int64_t{2}, int64_t{33}, int64_t{419}, int64_t{65536}, int64_t{65537}, int64_t{200001}}) {
      for (int special = 0; special < 3; ++special) {  // plain, a huge element (sum beyond float), a NaN
        std::vector<double> values(n);
        for (double& v : values) v = normal(rng);
        if (special == 1) values[n / 2] = 3e19;  // a bf16/fp32 square beyond float's range (fp16: inf)
        if (special == 2) values[n - 1] = NAN;
        std::vector<uint64_t> storage(n);  // room for any dtype
        for (int64_t i = 0; i < n; ++i) {
          switch (dtype) {
            case DType::kFloat32: reinterpret_cast<float*>(storage.data())[i] = static_cast<float>(values[i]); break;
            case DType::kFloat16: reinterpret_cast<uint16_t*>(storage.data())[i] = float_to_fp16(static_cast<float>(values[i])); break;
            case DType::kBFloat16: reinterpret_cast<uint16_t*>(storage.data())[i] = float_to_bf16(static_cast<float>(values[i])); break;
            case DType::kFloat64: reinterpret_cast<double*>(storage.data())[i] = values[i]; break;
          }
        }
        const TensorView view{storage.data(), n, dtype};
        for (Norm norm : norms) {
          double expected;
          tensor_norms(&view, 1, norm, serial, &expected);
          const double got = span_norm(dtype, view.data, n, norm);
          CHECK(bits_of(got) == bits_of(expected), "dtype %d, n %lld, case %d, norm kind %d: %.17g vs %.17g", (int)dtype,
                (long long)n, special, (int)norm.kind, got, expected);
        }
      }
    }
  }
  std::uniform_int_distribution<int> small(-1023, 1023);
  for (int trial = 0; trial < 2000; ++trial) {
    const int64_t n = 2 + trial % 300;
    std::vector<float> x(n);
    double sum = 0;  // exact: every square is a multiple of 2^-12 below 2^8, and there are under 2^9
    for (float& v : x) {
      v = small(rng) / 64.0f;
      sum += static_cast<double>(v) * v;
    }
    const double got = span_norm(DType::kFloat32, x.data(), n, {NormKind::kL2, 2.0});
    const double expected = static_cast<float>(std::sqrt(sum));
    CHECK(bits_of(got) == bits_of(expected), "n %lld: %.17g vs %.17g", (long long)n, got, expected);
  }
}

// A large fp32 tensor: the compensated double accumulation stays within 2 ulp of float64's answer
// computed in long double (torch's own fp32 CPU sum is off by ~0.3% at this size).
void test_large_tensor_accuracy() {
  const int64_t n = int64_t{1} << 25;
  std::vector<float> x(n);
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  long double exact = 0;
  for (auto& v : x) {
    v = uniform(rng);
    exact += static_cast<long double>(v) * v;
  }
  const TensorView view{x.data(), n, DType::kFloat32};
  const double got = norm_of(&view, 1, {NormKind::kL2, 2.0}, DType::kFloat32, threads_parallel_for(2));
  const double truth = static_cast<double>(std::sqrt(exact));
  CHECK(std::abs(got - truth) <= 2 * std::ldexp(truth, -23), "%.9g vs %.9g", got, truth);
}

// NaN anywhere makes the inf norm NaN, as torch's; an infinity makes it inf.
void test_inf_norm_propagates_nan() {
  for (Isa isa : {simd::Isa::kGeneric, simd::Isa::kAvx2, simd::Isa::kAvx512}) {
    simd::set_active_isa_for_testing(isa);
    std::vector<float> x(5000, 1.0f);
    x[4096] = NAN;
    x[17] = INFINITY;
    const TensorView view{x.data(), 5000, DType::kFloat32};
    CHECK(std::isnan(norm_of(&view, 1, {NormKind::kInf, INFINITY}, DType::kFloat32)), "NaN lost");
    x[4096] = -NAN;
    CHECK(std::isnan(norm_of(&view, 1, {NormKind::kInf, INFINITY}, DType::kFloat32)), "negative NaN lost");
    x[4096] = 1.0f;
    CHECK(norm_of(&view, 1, {NormKind::kInf, INFINITY}, DType::kFloat32) == INFINITY, "inf lost");
  }
  simd::set_active_isa_for_testing(simd::Isa::kAvx512);
}

// Every fp16 and bf16 value survives float and back (NaNs become c10's canonical NaN), and the
// vector conversions of every variant give the scalar conversions' bits.
void test_16_bit_conversions_exhaustive() {
  std::vector<uint16_t> all(65536), scaled_scalar(65536);
  for (int i = 0; i < 65536; ++i) all[i] = static_cast<uint16_t>(i);
  int fp16_errors = 0, bf16_errors = 0;
  for (int i = 0; i < 65536; ++i) {
    const uint16_t h = all[i];
    const float f = fp16_to_float(h);
    const uint16_t expected = std::isnan(f) ? static_cast<uint16_t>((h & 0x8000) | 0x7E00) : h;
    fp16_errors += float_to_fp16(f) != expected;
    const float b = bf16_to_float(h);
    bf16_errors += float_to_bf16(b) != (std::isnan(b) ? 0x7FC0 : h);
  }
  CHECK(fp16_errors == 0, "%d fp16 values do not round-trip", fp16_errors);
  CHECK(bf16_errors == 0, "%d bf16 values do not round-trip", bf16_errors);
  // Ties round to even: 1 + 2^-11 is halfway between fp16 1 and 1 + 2^-10.
  CHECK(float_to_fp16(1.0f + std::ldexp(1.0f, -11)) == 0x3C00, "fp16 tie");
  CHECK(float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3F80, "bf16 tie");
  // 0.75 turns 8 or 11 significant bits into 10 or 13: many products are ties between two results.
  for (const float coefficient : {0.3f, 0.75f})
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    for (int i = 0; i < 65536; ++i) {
      const float f = dtype == DType::kFloat16 ? fp16_to_float(all[i]) : bf16_to_float(all[i]);
      scaled_scalar[i] = dtype == DType::kFloat16 ? float_to_fp16(f * coefficient) : float_to_bf16(f * coefficient);
    }
    for (Isa isa : {simd::Isa::kGeneric, simd::Isa::kAvx2, simd::Isa::kAvx512}) {
      const Isa active = simd::set_active_isa_for_testing(isa);
      std::vector<uint16_t> x = all;
      const TensorView view{x.data(), 65536, dtype};
      scale(&view, 1, coefficient, serial);
      int mismatches = 0;
      for (int i = 0; i < 65536; ++i) mismatches += x[i] != scaled_scalar[i];
      CHECK(mismatches == 0, "dtype %d variant %s, coefficient %g: %d scaled values differ from the scalar path",
            (int)dtype, simd::isa_name(active), coefficient, mismatches);
    }
  }
  simd::set_active_isa_for_testing(simd::Isa::kAvx512);
}

// scale() and scale_each() give every element the scalar product's bits (E(math(x) * math(c)), in
// double for a 0-dim tensor that asks for it; untouched where c is 1), in every variant and thread
// count, over tensors whose chunks group into runs of full chunks of one dtype and coefficient
// (scaled several streams at once on AVX-512) and break them: a partial chunk, another dtype or
// coefficient, a tensor scaled in double. A chunk scaled twice, or left out of a group, fails it.
void test_scale_matches_elementwise_products() {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  struct Tensor {
    DType dtype;
    int64_t numel;
    bool in_double;
    double own_coefficient;  // scale_each's; scale() uses 0.3 for all
  };
  const Tensor shapes[] = {{DType::kFloat32, 5 * kChunkElements + 100, false, 0.3}, {DType::kFloat32, 3 * kChunkElements, false, 0.3},
                           {DType::kBFloat16, 4 * kChunkElements + 7, false, 0.7},  {DType::kFloat16, 4 * kChunkElements, false, 1.0},
                           {DType::kFloat32, 1, true, 0.3},                         {DType::kFloat64, 2 * kChunkElements + 1, false, 0.3},
                           {DType::kFloat32, 33, false, 0.7},                       {DType::kBFloat16, 6 * kChunkElements, false, 0.3},
                           {DType::kBFloat16, 2 * kChunkElements, false, 0.7}};
  constexpr size_t kCount = std::size(shapes);
  // Each tensor's elements as 64-bit words (one element per word, in its dtype's bits).
  std::vector<std::vector<uint64_t>> original;
  for (const Tensor& t : shapes) {
    std::vector<uint64_t> bits(t.numel);
    for (int64_t i = 0; i < t.numel; ++i) {
      const float v = normal(rng);
      switch (t.dtype) {
        case DType::kFloat32: {
          uint32_t a;
          std::memcpy(&a, &v, 4);
          bits[i] = a;
          break;
        }
        case DType::kFloat64: bits[i] = bits_of(static_cast<double>(v) * 1.0000001); break;
        case DType::kBFloat16: bits[i] = float_to_bf16(v); break;
        case DType::kFloat16: bits[i] = float_to_fp16(v); break;
      }
    }
    original.push_back(std::move(bits));
  }
  // The scalar product of one element's bits.
  const auto product = [](const Tensor& t, uint64_t bits, double c) -> uint64_t {
    if (c == 1.0) return bits;
    switch (t.dtype) {
      case DType::kFloat32: {
        float v, p;
        const auto word = static_cast<uint32_t>(bits);
        std::memcpy(&v, &word, 4);
        p = t.in_double ? static_cast<float>(static_cast<double>(v) * c) : v * static_cast<float>(c);
        uint32_t out;
        std::memcpy(&out, &p, 4);
        return out;
      }
      case DType::kFloat64: {
        double v;
        std::memcpy(&v, &bits, 8);
        return bits_of(v * c);
      }
      case DType::kBFloat16: return float_to_bf16(bf16_to_float(static_cast<uint16_t>(bits)) * static_cast<float>(c));
      case DType::kFloat16: return float_to_fp16(fp16_to_float(static_cast<uint16_t>(bits)) * static_cast<float>(c));
    }
    return bits;
  };
  std::vector<double> own(kCount);
  for (size_t t = 0; t < kCount; ++t) own[t] = shapes[t].own_coefficient;
  for (Isa isa : {simd::Isa::kGeneric, simd::Isa::kAvx2, simd::Isa::kAvx512}) {
    const Isa active = simd::set_active_isa_for_testing(isa);
    for (int threads : {1, 2, 3, 8}) {
      for (const bool each : {false, true}) {
        // The tensors in their own dtypes' storage, made from the words.
        std::vector<std::vector<unsigned char>> storage;
        std::vector<TensorView> views;
        for (size_t t = 0; t < kCount; ++t) {
          const size_t size = element_size(shapes[t].dtype);
          storage.emplace_back(shapes[t].numel * size);
          for (int64_t i = 0; i < shapes[t].numel; ++i) std::memcpy(&storage.back()[i * size], &original[t][i], size);
        }
        for (size_t t = 0; t < kCount; ++t) views.push_back({storage[t].data(), shapes[t].numel, shapes[t].dtype, shapes[t].in_double});
        if (each) scale_each(views.data(), kCount, own.data(), threads_parallel_for(threads));
        else scale(views.data(), kCount, 0.3, threads_parallel_for(threads));
        for (size_t t = 0; t < kCount; ++t) {
          const size_t size = element_size(shapes[t].dtype);
          const double c = each ? own[t] : 0.3;
          int64_t mismatches = 0;
          for (int64_t i = 0; i < shapes[t].numel; ++i) {
            uint64_t got = 0;
            std::memcpy(&got, &storage[t][i * size], size);
            mismatches += got != product(shapes[t], original[t][i], c);
          }
          CHECK(mismatches == 0, "%s, variant %s, %d threads, tensor %zu: %lld products differ", each ? "scale_each" : "scale",
                simd::isa_name(active), threads, t, (long long)mismatches);
        }
      }
    }
  }
  simd::set_active_isa_for_testing(simd::Isa::kAvx512);
}

// The L2 norm of fp16 and bf16 (squares added in pairs in float, see kSquarePairsInFloat): on random
// data of every length class (below one step, steps with tails, many blocks, two chunks) each norm is
// the float64 truth rounded to the dtype the way finish_norm rounds it, in every variant. The pairs'
// float rounding is ~1e-8 relative, so a norm could round the other way only within that distance of
// a rounding boundary; none of these does. bf16's range: squares that underflow float (|x| < 2^-63)
// are summed in double instead, where they are exact; squares beyond float (|x| >= 2^64) give inf,
// as torch's float accumulation does.
void test_16_bit_l2_norms() {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  const int64_t lengths[] = {2, 31, 63, 64, 65, 127, 130, 2048 + 17, 4096, 9999, kChunkElements + 100};
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    auto to16 = [dtype](float f) { return dtype == DType::kFloat16 ? float_to_fp16(f) : float_to_bf16(f); };
    auto from16 = [dtype](uint16_t h) { return dtype == DType::kFloat16 ? fp16_to_float(h) : bf16_to_float(h); };
    std::vector<std::vector<uint16_t>> data;
    std::vector<TensorView> views;
    std::vector<uint16_t> expected;
    for (int repeat = 0; repeat < 20; ++repeat) {
      for (int64_t n : lengths) {
        std::vector<uint16_t> x(n);
        long double exact = 0;
        const float magnitude = std::ldexp(1.0f, repeat % 5 - 2);
        for (auto& v : x) {
          v = to16(normal(rng) * magnitude);
          exact += static_cast<long double>(from16(v)) * from16(v);
        }
        expected.push_back(to16(static_cast<float>(static_cast<double>(std::sqrt(exact)))));
        data.push_back(std::move(x));
      }
    }
    for (auto& x : data) views.push_back({x.data(), (int64_t)x.size(), dtype});
    for (Isa isa : {simd::Isa::kGeneric, simd::Isa::kAvx2, simd::Isa::kAvx512}) {
      const Isa active = simd::set_active_isa_for_testing(isa);
      std::vector<double> norms(views.size());
      tensor_norms(views.data(), (int64_t)views.size(), {NormKind::kL2, 2.0}, threads_parallel_for(2), norms.data());
      int wrong = 0;
      for (size_t t = 0; t < views.size(); ++t) wrong += to16(static_cast<float>(norms[t])) != expected[t];
      CHECK(wrong == 0, "dtype %d variant %s: %d of %zu norms differ from the rounded truth", (int)dtype,
            simd::isa_name(active), wrong, views.size());
    }
  }
  for (Isa isa : {simd::Isa::kGeneric, simd::Isa::kAvx2, simd::Isa::kAvx512}) {
    const Isa active = simd::set_active_isa_for_testing(isa);
    std::vector<uint16_t> tiny(1000, float_to_bf16(std::ldexp(1.0f, -80)));  // squares 2^-160: below float
    tiny[999] = float_to_bf16(std::ldexp(-1.0f, -75));
    const double tiny_truth = std::sqrt(999.0 * std::ldexp(1.0, -160) + std::ldexp(1.0, -150));
    std::vector<uint16_t> huge(100, float_to_bf16(0.0f)), large(100, float_to_bf16(0.0f));
    huge[70] = float_to_bf16(std::ldexp(1.0f, 64));    // square 2^128: beyond float
    large[3] = large[80] = float_to_bf16(std::ldexp(1.0f, 63));  // squares 2^126: their sum fits
    const TensorView views[] = {{tiny.data(), 1000, DType::kBFloat16}, {huge.data(), 100, DType::kBFloat16},
                                {large.data(), 100, DType::kBFloat16}};
    double norms[3];
    tensor_norms(views, 3, {NormKind::kL2, 2.0}, serial, norms);
    CHECK(norms[0] == bf16_to_float(float_to_bf16(static_cast<float>(tiny_truth))), "variant %s: tiny bf16 norm %g",
          simd::isa_name(active), norms[0]);
    CHECK(norms[1] == INFINITY, "variant %s: norm of 2^64 is %g, torch's float sum gives inf", simd::isa_name(active),
          norms[1]);
    CHECK(norms[2] == bf16_to_float(float_to_bf16(std::sqrt(2.0f) * std::ldexp(1.0f, 63))),
          "variant %s: norm of two 2^63 is %g", simd::isa_name(active), norms[2]);
  }
  simd::set_active_isa_for_testing(simd::Isa::kAvx512);
}

// A coefficient of 1 writes nothing: a signalling NaN (which a multiply would quiet) keeps its bits.
void test_coefficient_one_writes_nothing() {
  const uint32_t signalling_nan = 0x7F800001u;
  std::vector<float> x(100, 2.0f);
  std::memcpy(&x[50], &signalling_nan, 4);
  const TensorView view{x.data(), 100, DType::kFloat32};
  scale(&view, 1, 1.0, serial);
  uint32_t bits;
  std::memcpy(&bits, &x[50], 4);
  CHECK(bits == signalling_nan && x[0] == 2.0f, "the tensor was rewritten");
}

// torch's coefficient: reciprocal(total + 1e-6) * max_norm, each step rounded, clamped at 1.
void test_clip_coefficient_roundings() {
  const float total = 3.7f, max_norm = 1.3f;
  const float expected = (1.0f / (total + static_cast<float>(1e-6))) * max_norm;
  CHECK(clip_coefficient(total, max_norm, DType::kFloat32) == expected, "fp32 coefficient");
  CHECK(clip_coefficient(0.5, 1.0, DType::kFloat32) == 1.0, "clamped at 1");
  CHECK(std::isnan(clip_coefficient(NAN, 1.0, DType::kFloat32)), "NaN must propagate through the clamp");
  CHECK(clip_coefficient(3.0, 1.0, DType::kFloat64) == (1.0 / (3.0 + 1e-6)) * 1.0, "fp64 coefficient");
}

}  // namespace

// The overflow-safe norm: right where sums of squares overflow (fp64 1e200, whose square is beyond
// double) or underflow (1e-200), the same bits in every variant and thread count, and inf and NaN
// kept. Long double (x87: 15-bit exponent) holds the squares for the reference.
void test_overflow_safe_norm() {
  std::vector<double> huge(70001, 1e200), tiny(1000, -1e-200);
  std::vector<float> mid(4099, 3.0f);
  const TensorView views[] = {{huge.data(), (int64_t)huge.size(), DType::kFloat64},
                              {tiny.data(), (int64_t)tiny.size(), DType::kFloat64},
                              {mid.data(), (int64_t)mid.size(), DType::kFloat32}};
  const long double huge_truth = std::sqrt(70001.0L) * 1e200L;
  const long double tiny_truth = std::sqrt(1000.0L) * 1e-200L;
  const double reference = overflow_safe_norm(views, 3, {NormKind::kL2, 2.0}, serial);
  CHECK(std::abs(reference - (double)huge_truth) <= 2 * DBL_EPSILON * (double)huge_truth, "huge: %.17g", reference);
  const double tiny_norm = overflow_safe_norm(&views[1], 1, {NormKind::kL2, 2.0}, serial);
  CHECK(std::abs(tiny_norm - (double)tiny_truth) <= 2 * DBL_EPSILON * (double)tiny_truth, "tiny: %.17g", tiny_norm);
  CHECK(std::isinf(norm_of(views, 3, {NormKind::kL2, 2.0}, DType::kFloat64)), "the plain norm of 1e200s overflows");
  for (Isa isa : {simd::Isa::kGeneric, simd::Isa::kAvx2, simd::Isa::kAvx512}) {
    const Isa active = simd::set_active_isa_for_testing(isa);
    for (int threads : {1, 2, 3}) {
      const double got = overflow_safe_norm(views, 3, {NormKind::kL2, 2.0}, threads_parallel_for(threads));
      CHECK(bits_of(got) == bits_of(reference), "variant %s, %d threads: %.17g vs %.17g", simd::isa_name(active),
            threads, got, reference);
    }
  }
  huge[5] = INFINITY;
  CHECK(std::isinf(overflow_safe_norm(views, 3, {NormKind::kL2, 2.0}, serial)), "inf lost");
  mid[4000] = NAN;
  CHECK(std::isnan(overflow_safe_norm(views, 3, {NormKind::kL2, 2.0}, serial)), "NaN lost");
}

// An inf among many elements: the L2 sum is inf (the compensation of an inf lane is NaN, and must
// not leak into the result).
void test_inf_element_gives_inf() {
  std::vector<float> x(1000, 1.0f);
  x[500] = INFINITY;
  const TensorView view{x.data(), 1000, DType::kFloat32};
  for (Norm norm : {Norm{NormKind::kL2, 2.0}, Norm{NormKind::kL1, 1.0}, Norm{NormKind::kP, 3.0}})
    CHECK(norm_of(&view, 1, norm, DType::kFloat32) == INFINITY, "norm kind %d", (int)norm.kind);
}

// clamp_values against a scalar reference written from torch's definition (clamp_min then clamp_max,
// bounds converted double -> float -> 16-bit), in every variant and thread count, across chunk
// boundaries and scalar tails; a chunk with nothing outside the interval is not written (a
// signalling NaN's payload survives there), one with something outside is.
void test_clamp_values_every_dtype_and_variant() {
  std::mt19937 rng(2);
  std::normal_distribution<float> normal;
  const double clip = 0.3;  // not representable in any of the dtypes
  const float lo = static_cast<float>(-clip), hi = static_cast<float>(clip);
  const float lo16 = fp16_to_float(float_to_fp16(lo)), hi16 = fp16_to_float(float_to_fp16(hi));
  const float lob = bf16_to_float(float_to_bf16(lo)), hib = bf16_to_float(float_to_bf16(hi));
  const uint32_t signalling_nan = 0x7F800001u;
  for (Isa isa : {simd::Isa::kGeneric, simd::Isa::kAvx2, simd::Isa::kAvx512}) {
    for (int threads : {1, 3}) {
      const Isa active = simd::set_active_isa_for_testing(isa);
      std::vector<float> f32(kChunkElements + 1003), quiet(kChunkElements + 5, 0.1f);
      std::vector<double> f64(70001);
      std::vector<uint16_t> bf16(4099), f16(33);
      for (auto& v : f32) v = normal(rng);
      for (auto& v : f64) v = normal(rng);
      for (auto& v : bf16) v = float_to_bf16(normal(rng));
      for (auto& v : f16) v = float_to_fp16(normal(rng));
      f32[7] = NAN, f32[kChunkElements + 1001] = -INFINITY, f64[3] = INFINITY;
      std::memcpy(&quiet[100], &signalling_nan, 4);                 // chunk 0 of `quiet`: all inside
      quiet[kChunkElements + 4] = 5.0f;                             // chunk 1: one outside
      const std::vector<float> f32_in = f32;
      const std::vector<double> f64_in = f64;
      const std::vector<uint16_t> bf16_in = bf16, f16_in = f16;
      TensorView views[] = {{f32.data(), (int64_t)f32.size(), DType::kFloat32},
                            {f64.data(), (int64_t)f64.size(), DType::kFloat64},
                            {bf16.data(), (int64_t)bf16.size(), DType::kBFloat16},
                            {f16.data(), (int64_t)f16.size(), DType::kFloat16},
                            {quiet.data(), (int64_t)quiet.size(), DType::kFloat32}};
      clamp_values(views, 5, clip, threads_parallel_for(threads));
      auto clamp = [](auto x, auto l, auto h) { x = x < l ? l : x; return x > h ? h : x; };
      int wrong = 0;
      for (size_t i = 0; i < f32.size(); ++i) {
        const float e = clamp(f32_in[i], lo, hi);
        wrong += !(f32[i] == e || (f32[i] != f32[i] && e != e));
      }
      for (size_t i = 0; i < f64.size(); ++i) wrong += f64[i] != clamp(f64_in[i], -clip, clip);
      for (size_t i = 0; i < bf16.size(); ++i) wrong += bf16[i] != float_to_bf16(clamp(bf16_to_float(bf16_in[i]), lob, hib));
      for (size_t i = 0; i < f16.size(); ++i) wrong += f16[i] != float_to_fp16(clamp(fp16_to_float(f16_in[i]), lo16, hi16));
      uint32_t bits;
      std::memcpy(&bits, &quiet[100], 4);
      CHECK(wrong == 0 && f32[7] != f32[7] && f32[kChunkElements + 1001] == lo && f64[3] == clip,
            "variant %s, %d threads: %d elements differ from the reference", simd::isa_name(active), threads, wrong);
      CHECK(bits == signalling_nan && quiet[kChunkElements + 4] == hi && quiet[kChunkElements] == 0.1f,
            "variant %s: a chunk inside the interval was rewritten, or one outside was not clamped",
            simd::isa_name(active));
    }
  }
  // A clip value of 0: the interval is [-0, +0]; a negative element becomes -0.0 (clamp_min) and
  // stays so (clamp_max keeps -0.0, which is not above +0.0), as in torch.
  for (Isa isa : {simd::Isa::kGeneric, simd::Isa::kAvx2, simd::Isa::kAvx512}) {
    const Isa active = simd::set_active_isa_for_testing(isa);
    std::vector<float> x(19);
    for (size_t i = 0; i < x.size(); ++i) x[i] = i % 2 ? -0.5f : 0.5f;
    const TensorView view{x.data(), (int64_t)x.size(), DType::kFloat32};
    clamp_values(&view, 1, 0.0, serial);
    bool ok = true;
    for (size_t i = 0; i < x.size(); ++i) ok &= x[i] == 0.0f && std::signbit(x[i]) == (i % 2 == 1);
    CHECK(ok, "variant %s: clamping to [-0, 0] lost the sign of zero", simd::isa_name(active));
  }
  simd::set_active_isa_for_testing(simd::Isa::kAvx512);
}

// StealingRuns hands every piece to exactly one thread; a thread takes its own run first, in
// ascending order, then only pieces from the backs of other runs (descending within each). Thread 0
// sleeps at each of its pieces in the second half of the cases, so that the others steal from it.
void test_stealing_runs_hand_out_each_piece_once() {
  for (int threads : {1, 2, 3, 8}) {
    for (int64_t pieces : {0, 1, 2, 7, 64, 1000}) {
      for (bool slow_first : {false, true}) {
        StealingRuns runs(pieces, threads);
        std::vector<std::vector<int64_t>> taken(threads);
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            runs.work(t, [&](int64_t piece) {
              taken[t].push_back(piece);
              if (slow_first && t == 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
            });
          });
        for (auto& thread : pool) thread.join();
        std::vector<int> times(pieces, 0);
        for (int t = 0; t < threads; ++t) {
          const int64_t own_front = pieces * t / threads, own_back = pieces * (t + 1) / threads;
          size_t k = 0;
          for (int64_t expected = own_front; k < taken[t].size() && taken[t][k] >= own_front && taken[t][k] < own_back; ++k, ++expected)
            CHECK(taken[t][k] == expected, "threads %d pieces %lld: thread %d took %lld of its run, expected %lld", threads,
                  (long long)pieces, t, (long long)taken[t][k], (long long)expected);
          std::vector<int64_t> last_stolen(threads, pieces);  // per run this thread stole from
          for (; k < taken[t].size(); ++k) {  // stolen: from the other runs, each one's from its back
            const int64_t piece = taken[t][k];
            int run = 0;
            while (run + 1 < threads && piece >= pieces * (run + 1) / threads) ++run;
            CHECK(run != t, "threads %d pieces %lld: thread %d took own piece %lld after stealing", threads,
                  (long long)pieces, t, (long long)piece);
            CHECK(piece < last_stolen[run], "threads %d pieces %lld: thread %d stole %lld after %lld from run %d",
                  threads, (long long)pieces, t, (long long)piece, (long long)last_stolen[run], run);
            last_stolen[run] = piece;
          }
          for (int64_t piece : taken[t]) {
            CHECK(piece >= 0 && piece < pieces, "piece %lld out of range", (long long)piece);
            if (piece >= 0 && piece < pieces) ++times[piece];
          }
        }
        for (int64_t piece = 0; piece < pieces; ++piece)
          CHECK(times[piece] == 1, "threads %d pieces %lld: piece %lld taken %d times", threads, (long long)pieces,
                (long long)piece, times[piece]);
      }
    }
  }
}

int main() {
  test_exact_l2_every_dtype_and_variant();
  test_variants_and_thread_counts_agree_bitwise();
  test_clip_with_norms_from_matches_clip();
  test_span_norm_matches_tensor_norms();
  test_large_tensor_accuracy();
  test_inf_norm_propagates_nan();
  test_16_bit_conversions_exhaustive();
  test_16_bit_l2_norms();
  test_scale_matches_elementwise_products();
  test_coefficient_one_writes_nothing();
  test_clip_coefficient_roundings();
  test_overflow_safe_norm();
  test_inf_element_gives_inf();
  test_clamp_values_every_dtype_and_variant();
  test_stealing_runs_hand_out_each_piece_once();
  std::printf("%s (best variant on this CPU: %s)\n", failures == 0 ? "all CPU kernel tests passed" : "FAILURES",
              simd::isa_name(simd::set_active_isa_for_testing(simd::Isa::kAvx512)));
  return failures == 0 ? 0 : 1;
}
