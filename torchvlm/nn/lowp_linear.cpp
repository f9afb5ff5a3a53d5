// y[m, n] = bias[n] + sum_k x[m, k] * w[n, k], summed in float32 and rounded once, for a bf16/fp16 weight
// w [N, K] and rows x [M, K], out y [M, N] and bias [N] of the same type. All contiguous.
//
// torchvlm.nn.cpu_kernel builds this with PyTorch Inductor's C++ toolchain (its cpp_prefix.h gives at::vec,
// the CPU's vector ISA and OpenMP; TORCHVLM_WEIGHT is defined in front of it). It is for decode-sized
// products on CPUs where oneDNN has no bf16/fp16 GEMM (AVX2): the weight is read once, widened to float32
// in registers and multiplied with fused multiply-adds into float32 accumulators, MR input rows at a time
// against NR weight rows, so each weight vector loaded serves MR rows and MR x NR independent accumulators
// hide the FMA latency. The rows are widened to float32 once per call. Threads split the weight rows.
#include <cstdint>
#include <functional>
#include <memory>

using T = TORCHVLM_WEIGHT;  // weight, rows, bias and out
using fV = at::vec::Vectorized<float>;
constexpr int64_t H = fV::size();

// 2 H weights at p widened to two float vectors
static inline void widen(const at::BFloat16* p, fV& a, fV& b) {
    auto f = at::vec::convert<float, 2, at::BFloat16, 1>(at::vec::Vectorized<at::BFloat16>::loadu(p));
    a = f[0];
    b = f[1];
}
static inline void widen(const at::Half* p, fV& a, fV& b) {
    auto f = at::vec::convert<float, 2, at::Half, 1>(at::vec::Vectorized<at::Half>::loadu(p));
    a = f[0];
    b = f[1];
}

template <int MR, int NR>
static inline void tile(const T* w, const float* x, const T* bias, T* y, int64_t K, int64_t N) {
    constexpr int64_t S = 2 * H;  // weights per step
    const int64_t Kv = K - K % S;
    fV acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = fV(0);
    for (int64_t k = 0; k < Kv; k += S) {
        for (int j = 0; j < NR; ++j) {
            fV a, b;
            widen(w + j * K + k, a, b);
            for (int i = 0; i < MR; ++i) acc[i][j] = at::vec::fmadd(a, fV::loadu(x + i * K + k), acc[i][j]);
            for (int i = 0; i < MR; ++i) acc[i][j] = at::vec::fmadd(b, fV::loadu(x + i * K + k + H), acc[i][j]);
        }
    }
    for (int i = 0; i < MR; ++i) {
        for (int j = 0; j < NR; ++j) {
            float s = at::vec::vec_reduce_all<float>(std::plus<fV>(), acc[i][j]);
            for (int64_t k = Kv; k < K; ++k) s += x[i * K + k] * static_cast<float>(w[j * K + k]);
            if (bias) s += static_cast<float>(bias[j]);
            y[i * N + j] = static_cast<T>(s);
        }
    }
}

// all M rows against NR weight rows: MR rows at a time, then a pair, then a single row
template <int MR, int NR>
static inline void rows(const T* w, const float* x, const T* bias, T* y, int64_t M, int64_t K, int64_t N) {
    int64_t m = 0;
    for (; m + MR <= M; m += MR) tile<MR, NR>(w, x + m * K, bias, y + m * N, K, N);
    if (MR > 2 && m + 2 <= M) {
        tile<2, NR>(w, x + m * K, bias, y + m * N, K, N);
        m += 2;
    }
    if (m < M) tile<1, NR>(w, x + m * K, bias, y + m * N, K, N);
}

// threads split the weight rows: N / NR blocks of NR rows, and one more block for the N % NR rows left
template <int MR, int NR>
static void run(const T* w, const float* x, const T* bias, T* y, int64_t M, int64_t N, int64_t K) {
    const int64_t blocks = N / NR;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b <= blocks; ++b) {
        if (b < blocks) {
            const int64_t n = b * NR;
            rows<MR, NR>(w + n * K, x, bias ? bias + n : nullptr, y + n, M, K, N);
        } else {
            for (int64_t n = blocks * NR; n < N; ++n)
                rows<MR, 1>(w + n * K, x, bias ? bias + n : nullptr, y + n, M, K, N);
        }
    }
}

// has_bias = 0: bias is not read (any pointer).
extern "C" void kernel(const T* w, const T* x, const T* bias, T* y, int64_t M, int64_t N, int64_t K,
                       int64_t has_bias) {
    std::unique_ptr<float[]> xf(new float[M * K]);  // the few rows, widened once
    for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(x[i]);
    const T* b = has_bias ? bias : nullptr;
    if (M == 1) run<1, 8>(w, xf.get(), b, y, M, N, K);
    else if (M < 4) run<2, 4>(w, xf.get(), b, y, M, N, K);
    else run<4, 3>(w, xf.get(), b, y, M, N, K);  // 4 x 3 measured 5-15% faster than 4 x 2 at 4-8 rows
}
