// The CPU kernels of two ops, for decode-sized products on CPUs where oneDNN has no bf16/fp16 GEMM (AVX2):
//   torchvlm::lowp_linear(x, weight, bias): y = x @ weight^T + bias for a bf16/fp16 weight [N, K] and rows
//       x [..., K], bias [N] and y of the same type;
//   torchvlm::int8_linear(x, qweight, scale): y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] for int8 codes
//       q [N, K] (an Int8Linear's), x [M, K] and scale [N] bf16, fp16 or fp32 (the layer adds its bias).
// Each output is one float32 sum rounded once to the rows' type, as the bf16 F.linear rounds, only summed in
// another order.
//
// torchvlm.nn.cpu_kernel builds this with PyTorch Inductor's C++ toolchain (the compiler, flags, vector ISA
// and OpenMP that torch.compile uses on the CPU), linked against libtorch: it registers the ops' CPU kernels
// with the dispatcher, so a compiled graph calls them without Python. The Python wrappers check the operands
// (torchvlm.nn.cpu_kernel); operands that do not fit are an error here, not a silent other path.
//
// Threads split the weight rows, and each thread reads its rows one after the other: one memory stream per
// thread, which measured faster than interleaving several weight rows (docs/performance.md). Each weight
// vector is widened to float32 in registers once and multiplied with fused multiply-adds against up to 4
// input rows; the even and odd halves of a step and unrolled steps have their own accumulators, 8 in all,
// to hide the FMA latency. The input rows are widened to float32 once per call.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <type_traits>
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

using fV = at::vec::Vectorized<float>;
// The weights are prefetched this many bytes ahead (the rest of a row, then the next rows'): 1.03-1.08x on
// SmolLM2-135M's products at one row on a 2-core AVX2 EPYC (512 B or 1.5-4 KB ahead were no faster).
constexpr int64_t kPrefetch = 1024;
constexpr int64_t H = fV::size();
constexpr int64_t S = 2 * H;  // weights per step

#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
// AVX2 bf16: a 32-bit lane holds weights 2i (low half) and 2i+1 (high half); a shift and a mask widen
// them, the even weights into a and the odd ones into b, without the cross-lane shuffles of an in-order
// widening. The input rows are laid out to match (see run()).
template <typename W>
constexpr bool kPaired = std::is_same<W, at::BFloat16>::value;
static inline void widen(const at::BFloat16* p, fV& a, fV& b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#else
template <typename W>
constexpr bool kPaired = false;
static inline void widen(const at::BFloat16* p, fV& a, fV& b) {
    auto f = at::vec::convert<float, 2, at::BFloat16, 1>(at::vec::Vectorized<at::BFloat16>::loadu(p));
    a = f[0];
    b = f[1];
}
#endif
// weights 0..H-1 into a, H..2H-1 into b
static inline void widen(const int8_t* p, fV& a, fV& b) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
    a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + H))));
#else
    alignas(64) float t[S];
    for (int64_t i = 0; i < S; ++i) t[i] = static_cast<float>(p[i]);
    a = fV::loadu(t);
    b = fV::loadu(t + H);
#endif
}
static inline void widen(const at::Half* p, fV& a, fV& b) {
    auto f = at::vec::convert<float, 2, at::Half, 1>(at::vec::Vectorized<at::Half>::loadu(p));
    a = f[0];
    b = f[1];
}

// MR input rows x [MR, K] against one weight row w [K], U steps unrolled: y[i * N] for i < MR. For int8
// weights b is the row's scale (the sum is multiplied by it), else its bias (added).
template <typename T, typename W, int MR, int U>
static inline void tile(const W* w, const float* x, float b, T* y, int64_t K, int64_t N) {
    const int64_t Ku = K - K % (S * U), Ks = K - K % S;
    fV acc[U][MR][2];
    for (int u = 0; u < U; ++u)
        for (int i = 0; i < MR; ++i) acc[u][i][0] = acc[u][i][1] = fV(0);
    for (int64_t k = 0; k < Ku; k += S * U) {
        for (int64_t c = 0; c < S * U * static_cast<int64_t>(sizeof(W)); c += 64)  // a cache line at a time
            __builtin_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetch + c, 0, 3);
        for (int u = 0; u < U; ++u) {
            fV wa, wb;
            widen(w + k + u * S, wa, wb);
            for (int i = 0; i < MR; ++i) {
                acc[u][i][0] = at::vec::fmadd(wa, fV::loadu(x + i * K + k + u * S), acc[u][i][0]);
                acc[u][i][1] = at::vec::fmadd(wb, fV::loadu(x + i * K + k + u * S + H), acc[u][i][1]);
            }
        }
    }
    for (int64_t k = Ku; k < Ks; k += S) {  // whole steps left over from the unrolled loop
        fV wa, wb;
        widen(w + k, wa, wb);
        for (int i = 0; i < MR; ++i) {
            acc[0][i][0] = at::vec::fmadd(wa, fV::loadu(x + i * K + k), acc[0][i][0]);
            acc[0][i][1] = at::vec::fmadd(wb, fV::loadu(x + i * K + k + H), acc[0][i][1]);
        }
    }
    for (int i = 0; i < MR; ++i) {
        fV t = acc[0][i][0] + acc[0][i][1];
        for (int u = 1; u < U; ++u) t = t + acc[u][i][0] + acc[u][i][1];
        float s = at::vec::vec_reduce_all<float>(std::plus<fV>(), t);
        for (int64_t k = Ks; k < K; ++k) s += x[i * K + k] * static_cast<float>(w[k]);  // the K % S tail
        y[i * N] = static_cast<T>(std::is_same<W, int8_t>::value ? s * b : s + b);
    }
}

// y [M, N] from w [N, K] and rows x [M, K]; bias (scale for int8 weights) [N] or nullptr
template <typename T, typename W>
static void run(const W* w, const T* x, const T* bias, T* y, int64_t M, int64_t N, int64_t K) {
    // the few rows, widened once; where widen() pairs weights, each step's inputs are laid out as its
    // even-indexed elements, then its odd-indexed ones
    std::unique_ptr<float[]> xf(new float[M * K]);
    const int64_t Ks = K - K % S;
    for (int64_t m = 0; m < M; ++m) {
        const T* xr = x + m * K;
        float* o = xf.get() + m * K;
        for (int64_t k = 0; k < Ks; k += S)
            for (int64_t i = 0; i < H; ++i) {
                o[k + i] = static_cast<float>(xr[k + (kPaired<W> ? 2 * i : i)]);
                o[k + H + i] = static_cast<float>(xr[k + (kPaired<W> ? 2 * i + 1 : H + i)]);
            }
        for (int64_t k = Ks; k < K; ++k) o[k] = static_cast<float>(xr[k]);
    }
    const float* xs = xf.get();
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
            const W* wn = w + n * K;
            const float b = bias ? static_cast<float>(bias[n]) : 0.0f;
            int64_t m = 0;
            for (; m + 4 <= M; m += 4) tile<T, W, 4, 1>(wn, xs + m * K, b, y + m * N + n, K, N);
            if (m + 2 <= M) {
                tile<T, W, 2, 2>(wn, xs + m * K, b, y + m * N + n, K, N);
                m += 2;
            }
            if (m < M) tile<T, W, 1, 4>(wn, xs + m * K, b, y + m * N + n, K, N);
        }
    });
}

template <typename T, typename W>
static void run(const at::Tensor& w, const at::Tensor& x, const at::Tensor* bias, at::Tensor& y) {
    run<T, W>(w.data_ptr<W>(), x.data_ptr<T>(), bias ? bias->data_ptr<T>() : nullptr, y.data_ptr<T>(),
              x.size(0), w.size(0), w.size(1));
}

static void check_vector(const at::Tensor& v, const char* name, const at::Tensor& x, int64_t N, const char* op) {
    TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == x.scalar_type() && v.dim() == 1 && v.size(0) == N
                    && v.is_contiguous(),
                op, ": ", name, " must be a contiguous [", N, "] CPU tensor of the rows' dtype ",
                x.scalar_type(), ", got ", v.scalar_type(), " ", v.sizes());
}

static at::Tensor lowp_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias) {
    const auto t = weight.scalar_type();
    TORCH_CHECK((t == at::kBFloat16 || t == at::kHalf) && x.scalar_type() == t && weight.dim() == 2
                    && weight.is_contiguous() && x.dim() >= 1 && x.size(-1) == weight.size(1),
                "torchvlm::lowp_linear: needs a contiguous bf16/fp16 weight [N, K] and rows [..., K] of its "
                "dtype, got weight ", t, " ", weight.sizes(), " and rows ", x.scalar_type(), " ", x.sizes());
    const int64_t N = weight.size(0), K = weight.size(1);
    const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
    if (b) check_vector(*b, "bias", x, N, "torchvlm::lowp_linear");
    const at::Tensor rows = x.reshape({-1, K}).contiguous();
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N;
    at::Tensor y = at::empty(shape, x.options());
    if (t == at::kBFloat16)
        run<at::BFloat16, at::BFloat16>(weight, rows, b, y);
    else
        run<at::Half, at::Half>(weight, rows, b, y);
    return y;
}

static at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale) {
    const auto t = x.scalar_type();
    TORCH_CHECK((t == at::kBFloat16 || t == at::kHalf || t == at::kFloat) && x.dim() == 2 && x.is_contiguous()
                    && qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.is_contiguous()
                    && qweight.size(1) == x.size(1),
                "torchvlm::int8_linear: needs contiguous int8 codes [N, K] and rows [M, K] in bf16, fp16 or "
                "fp32, got codes ", qweight.scalar_type(), " ", qweight.sizes(), " and rows ", t, " ", x.sizes());
    check_vector(scale, "scale", x, qweight.size(0), "torchvlm::int8_linear");
    at::Tensor y = at::empty({x.size(0), qweight.size(0)}, x.options());
    if (t == at::kBFloat16)
        run<at::BFloat16, int8_t>(qweight, x, &scale, y);
    else if (t == at::kHalf)
        run<at::Half, int8_t>(qweight, x, &scale, y);
    else
        run<float, int8_t>(qweight, x, &scale, y);
    return y;
}

TORCH_LIBRARY_IMPL(torchvlm, CPU, m) {
    m.impl("lowp_linear", &lowp_linear_cpu);
    m.impl("int8_linear", &int8_linear_cpu);
}

// torchvlm.nn.cpu_kernel checks that the library loaded by this symbol
extern "C" int torchvlm_lowp_linear_loaded() { return 1; }
