// y[m, n] = bias[n] + sum_k x[m, k] * w[n, k], summed in float32 and rounded once, for a bf16/fp16 weight
// w [N, K] and rows x [M, K], out y [M, N] and bias [N] of the same type. All contiguous.
// With TORCHVLM_INT8 defined, w is int8 (an Int8Linear's codes) and the "bias" argument is the per-row
// scale: y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] (the layer adds its bias itself).
//
// torchvlm.nn.cpu_kernel builds this with PyTorch Inductor's C++ toolchain (its cpp_prefix.h gives at::vec,
// the CPU's vector ISA and OpenMP; TORCHVLM_WEIGHT, the type of x, bias and y, is defined in front of it). It
// is for decode-sized products on CPUs where oneDNN has no bf16/fp16 GEMM (AVX2). Threads split the weight
// rows, and each thread reads its rows one after the other: one memory stream per thread, which measured
// faster than interleaving several weight rows (docs/performance.md). Each weight vector is widened to
// float32 in registers once and multiplied with fused multiply-adds against up to 4 input rows; the even
// and odd halves of a step and unrolled steps have their own accumulators, 8 in all, to hide the FMA
// latency. The input rows are widened to float32 once per call.
#include <cstdint>
#include <functional>
#include <memory>
#include <type_traits>

using T = TORCHVLM_WEIGHT;  // rows, bias (scale) and out; the weight too unless TORCHVLM_INT8
#ifdef TORCHVLM_INT8
using W = int8_t;
#else
using W = T;
#endif
using fV = at::vec::Vectorized<float>;
constexpr int64_t H = fV::size();
constexpr int64_t S = 2 * H;  // weights per step

#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
// AVX2 bf16: a 32-bit lane holds weights 2i (low half) and 2i+1 (high half); a shift and a mask widen
// them, the even weights into a and the odd ones into b, without the cross-lane shuffles of an in-order
// widening. The input rows are laid out to match (see kernel()).
constexpr bool kPaired = std::is_same<W, at::BFloat16>::value;
static inline void widen(const at::BFloat16* p, fV& a, fV& b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#else
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

// MR input rows x [MR, K] against one weight row w [K], U steps unrolled: y[i * N] for i < MR
template <int MR, int U>
static inline void tile(const W* w, const float* x, float bias, T* y, int64_t K, int64_t N) {
    const int64_t Ku = K - K % (S * U), Ks = K - K % S;
    fV acc[U][MR][2];
    for (int u = 0; u < U; ++u)
        for (int i = 0; i < MR; ++i) acc[u][i][0] = acc[u][i][1] = fV(0);
    for (int64_t k = 0; k < Ku; k += S * U) {
        for (int u = 0; u < U; ++u) {
            fV a, b;
            widen(w + k + u * S, a, b);
            for (int i = 0; i < MR; ++i) {
                acc[u][i][0] = at::vec::fmadd(a, fV::loadu(x + i * K + k + u * S), acc[u][i][0]);
                acc[u][i][1] = at::vec::fmadd(b, fV::loadu(x + i * K + k + u * S + H), acc[u][i][1]);
            }
        }
    }
    for (int64_t k = Ku; k < Ks; k += S) {  // whole steps left over from the unrolled loop
        fV a, b;
        widen(w + k, a, b);
        for (int i = 0; i < MR; ++i) {
            acc[0][i][0] = at::vec::fmadd(a, fV::loadu(x + i * K + k), acc[0][i][0]);
            acc[0][i][1] = at::vec::fmadd(b, fV::loadu(x + i * K + k + H), acc[0][i][1]);
        }
    }
    for (int i = 0; i < MR; ++i) {
        fV t = acc[0][i][0] + acc[0][i][1];
        for (int u = 1; u < U; ++u) t = t + acc[u][i][0] + acc[u][i][1];
        float s = at::vec::vec_reduce_all<float>(std::plus<fV>(), t);
        for (int64_t k = Ks; k < K; ++k) s += x[i * K + k] * static_cast<float>(w[k]);  // the K % S tail
#ifdef TORCHVLM_INT8
        y[i * N] = static_cast<T>(s * bias);
#else
        y[i * N] = static_cast<T>(s + bias);
#endif
    }
}

// has_bias = 0: bias is not read (any pointer); TORCHVLM_INT8: it is the scale, always read.
extern "C" void kernel(const W* w, const T* x, const T* bias, T* y, int64_t M, int64_t N, int64_t K,
                       int64_t has_bias) {
    // the few rows, widened once; where widen() pairs weights, each step's inputs are laid out as its
    // even-indexed elements, then its odd-indexed ones
    std::unique_ptr<float[]> xf(new float[M * K]);
    const int64_t Ks = K - K % S;
    for (int64_t m = 0; m < M; ++m) {
        const T* xr = x + m * K;
        float* o = xf.get() + m * K;
        for (int64_t k = 0; k < Ks; k += S)
            for (int64_t i = 0; i < H; ++i) {
                o[k + i] = static_cast<float>(xr[k + (kPaired ? 2 * i : i)]);
                o[k + H + i] = static_cast<float>(xr[k + (kPaired ? 2 * i + 1 : H + i)]);
            }
        for (int64_t k = Ks; k < K; ++k) o[k] = static_cast<float>(xr[k]);
    }
    const float* xs = xf.get();
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const W* wn = w + n * K;
        const float b = has_bias ? static_cast<float>(bias[n]) : 0.0f;  // the scale if TORCHVLM_INT8
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) tile<4, 1>(wn, xs + m * K, b, y + m * N + n, K, N);
        if (m + 2 <= M) {
            tile<2, 2>(wn, xs + m * K, b, y + m * N + n, K, N);
            m += 2;
        }
        if (m < M) tile<1, 4>(wn, xs + m * K, b, y + m * N + n, K, N);
    }
}
