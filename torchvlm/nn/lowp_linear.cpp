// The CPU kernels of three ops, for decode-sized products on CPUs where oneDNN has no bf16/fp16 GEMM (AVX2):
//   torchvlm::lowp_linear(x, weight, bias): y = x @ weight^T + bias for a bf16/fp16 weight [N, K] and rows
//       x [..., K], bias [N] and y of the same type;
//   torchvlm::int8_linear(x, qweight, scale): y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] for int8 codes
//       q [N, K] (an Int8Linear's), x [M, K] and scale [N] bf16, fp16 or fp32 (the layer adds its bias);
//   torchvlm::panel_linear(x, panels, bias, N) (AVX2 builds): lowp_linear's product for a weight laid out in
//       panels of 16 output rows (below).
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

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>
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
    // "#pragma GCC unroll" on every loop over acc's indices: unrolled only later, GCC 12 kept acc in memory
    // and stored all of it every step (the panel kernel below ran slower than this one until this)
    #pragma GCC unroll 16
    for (int u = 0; u < U; ++u)
        #pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) acc[u][i][0] = acc[u][i][1] = fV(0);
    for (int64_t k = 0; k < Ku; k += S * U) {
        for (int64_t c = 0; c < S * U * static_cast<int64_t>(sizeof(W)); c += 64)  // a cache line at a time
            __builtin_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetch + c, 0, 3);
        #pragma GCC unroll 16
        for (int u = 0; u < U; ++u) {
            fV wa, wb;
            widen(w + k + u * S, wa, wb);
            #pragma GCC unroll 16
            for (int i = 0; i < MR; ++i) {
                acc[u][i][0] = at::vec::fmadd(wa, fV::loadu(x + i * K + k + u * S), acc[u][i][0]);
                acc[u][i][1] = at::vec::fmadd(wb, fV::loadu(x + i * K + k + u * S + H), acc[u][i][1]);
            }
        }
    }
    for (int64_t k = Ku; k < Ks; k += S) {  // whole steps left over from the unrolled loop
        fV wa, wb;
        widen(w + k, wa, wb);
        #pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
            acc[0][i][0] = at::vec::fmadd(wa, fV::loadu(x + i * K + k), acc[0][i][0]);
            acc[0][i][1] = at::vec::fmadd(wb, fV::loadu(x + i * K + k + H), acc[0][i][1]);
        }
    }
    #pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
        fV t = acc[0][i][0] + acc[0][i][1];
        #pragma GCC unroll 16
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

// rows x [..., K] as contiguous [M, K], and the output [..., N] of a product of them
static std::pair<at::Tensor, at::Tensor> rows_and_output(const at::Tensor& x, int64_t K, int64_t N) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N;
    return {x.reshape({-1, K}).contiguous(), at::empty(shape, x.options())};
}

// ---- panel layout (AVX2): y = x @ weight^T + bias for a bf16/fp16 weight kept as panels [P, K, 16],
// P = ceil(N / 16). Panel p holds output rows 16p..16p+15 (zeros past N), one 16-weight vector per input
// index k, whose 32-bit pair i holds rows i (low half) and i + 8 (high half): for bf16 a shift and a mask
// widen rows 0-7 and 8-15 into two float32 vectors; fp16 pairs are first sorted by a byte shuffle (F16C
// widens them). The layout is the same for every dtype. torchvlm.nn.cpu_kernel.pack_panels /
// unpack_panels make and undo it.
//
// The outer-product form of a GEMM micro-kernel: each widened weight vector is multiplied with fused
// multiply-adds against MR broadcast input values (one per row), so a product needs no horizontal sums and
// widens each weight vector once per MR rows; a panel (16 K-long rows: 18 KB for K = 576) stays in L1/L2
// for the next MR rows. Threads split the panels; each reads its panels one after the other.
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
constexpr bool kPanels = true;
static inline void widen16(const at::BFloat16* p, __m256& a, __m256& b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
static inline void widen16(const at::Half* p, __m256& a, __m256& b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    // in each 128-bit lane the low halves (rows 0-3, then 4-7) before the high ones (rows 8-11, 12-15) ...
    const __m256i lanes = _mm256_shuffle_epi8(
        v, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                            0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
    // ... then rows 0-7 in the low 128 bits, 8-15 in the high ones
    const __m256i rows = _mm256_permute4x64_epi64(lanes, 0xD8);  // 64-bit parts 0, 2, 1, 3
    a = _mm256_cvtph_ps(_mm256_castsi256_si128(rows));
    b = _mm256_cvtph_ps(_mm256_extracti128_si256(rows, 1));
}

// rows x [MR, K] (float32, row stride K) against one panel w [K, 16], U steps unrolled: y[i * N + j] for
// i < MR, j < nj (the panel's rows that exist); bias b[j] or nullptr
template <typename T, int MR, int U>
static inline void panel_tile(const T* w, const float* x, const T* b, T* y, int64_t K, int64_t N, int64_t nj) {
    __m256 acc[U][MR][2];
    #pragma GCC unroll 16
    for (int u = 0; u < U; ++u)
        #pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) acc[u][i][0] = acc[u][i][1] = _mm256_setzero_ps();
    const int64_t Ku = K - K % U;
    for (int64_t k = 0; k < Ku; k += U) {
        #pragma GCC unroll 16
        for (int u = 0; u < U; u += 2)  // a 64-byte cache line per two steps
            __builtin_prefetch(reinterpret_cast<const char*>(w + 16 * (k + u)) + kPrefetch, 0, 3);
        #pragma GCC unroll 16
        for (int u = 0; u < U; ++u) {
            __m256 wa, wb;
            widen16(w + 16 * (k + u), wa, wb);
            #pragma GCC unroll 16
            for (int i = 0; i < MR; ++i) {
                const __m256 xv = _mm256_broadcast_ss(x + i * K + k + u);
                acc[u][i][0] = _mm256_fmadd_ps(wa, xv, acc[u][i][0]);
                acc[u][i][1] = _mm256_fmadd_ps(wb, xv, acc[u][i][1]);
            }
        }
    }
    for (int64_t k = Ku; k < K; ++k) {  // the K % U tail
        __m256 wa, wb;
        widen16(w + 16 * k, wa, wb);
        #pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
            const __m256 xv = _mm256_broadcast_ss(x + i * K + k);
            acc[0][i][0] = _mm256_fmadd_ps(wa, xv, acc[0][i][0]);
            acc[0][i][1] = _mm256_fmadd_ps(wb, xv, acc[0][i][1]);
        }
    }
    alignas(32) float s[16];
    #pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
        __m256 lo = acc[0][i][0], hi = acc[0][i][1];
        #pragma GCC unroll 16
        for (int u = 1; u < U; ++u) {
            lo = _mm256_add_ps(lo, acc[u][i][0]);
            hi = _mm256_add_ps(hi, acc[u][i][1]);
        }
        _mm256_store_ps(s, lo);
        _mm256_store_ps(s + 8, hi);
        for (int64_t j = 0; j < nj; ++j) y[i * N + j] = static_cast<T>(b ? s[j] + static_cast<float>(b[j]) : s[j]);
    }
}

template <typename T>
static void run_panels(const T* w, const T* x, const T* bias, T* y, int64_t M, int64_t N, int64_t K) {
    std::unique_ptr<float[]> xf(new float[M * K]);
    for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(x[i]);
    const float* xs = xf.get();
    const int64_t P = (N + 15) / 16;
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
            const T* wp = w + p * K * 16;
            const T* b = bias ? bias + 16 * p : nullptr;
            const int64_t nj = std::min<int64_t>(16, N - 16 * p);
            T* yp = y + 16 * p;
            int64_t m = 0;
            for (; m + 6 <= M; m += 6) panel_tile<T, 6, 1>(wp, xs + m * K, b, yp + m * N, K, N, nj);
            if (m + 4 <= M) {
                panel_tile<T, 4, 1>(wp, xs + m * K, b, yp + m * N, K, N, nj);
                m += 4;
            }
            if (m + 2 <= M) {
                panel_tile<T, 2, 2>(wp, xs + m * K, b, yp + m * N, K, N, nj);
                m += 2;
            }
            if (m < M) panel_tile<T, 1, 4>(wp, xs + m * K, b, yp + m * N, K, N, nj);
        }
    });
}

static at::Tensor panel_linear_cpu(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                                   int64_t N) {
    const auto t = panels.scalar_type();
    TORCH_CHECK((t == at::kBFloat16 || t == at::kHalf) && x.scalar_type() == t && panels.dim() == 3
                    && panels.size(2) == 16 && panels.is_contiguous() && N > 0 && panels.size(0) == (N + 15) / 16
                    && x.dim() >= 1 && x.size(-1) == panels.size(1),
                "torchvlm::panel_linear: needs contiguous bf16/fp16 panels [ceil(N / 16), K, 16] and rows [..., K] "
                "of their dtype, got panels ", t, " ", panels.sizes(), " for N = ", N, " and rows ", x.scalar_type(),
                " ", x.sizes());
    const int64_t K = panels.size(1);
    const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
    if (b) check_vector(*b, "bias", x, N, "torchvlm::panel_linear");
    auto [rows, y] = rows_and_output(x, K, N);
    if (t == at::kBFloat16)
        run_panels<at::BFloat16>(panels.data_ptr<at::BFloat16>(), rows.data_ptr<at::BFloat16>(),
                                 b ? b->data_ptr<at::BFloat16>() : nullptr, y.data_ptr<at::BFloat16>(),
                                 rows.size(0), N, K);
    else
        run_panels<at::Half>(panels.data_ptr<at::Half>(), rows.data_ptr<at::Half>(),
                             b ? b->data_ptr<at::Half>() : nullptr, y.data_ptr<at::Half>(), rows.size(0), N, K);
    return y;
}
#else
constexpr bool kPanels = false;  // the panel kernel is AVX2 code; elsewhere torchvlm.nn.fast keeps UpcastLinear
#endif

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
    auto [rows, y] = rows_and_output(x, K, N);
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
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
    m.impl("panel_linear", &panel_linear_cpu);
#endif
}

// torchvlm.nn.cpu_kernel checks that the library loaded by this symbol
extern "C" int torchvlm_lowp_linear_loaded() { return 1; }
// and whether it has the panel kernel (torchvlm::panel_linear's CPU kernel; AVX2 builds only)
extern "C" int torchvlm_lowp_linear_panels() { return kPanels ? 1 : 0; }
