// y[m, n] = bias[n] + sum_k x[m, k] * w[n, k] for a bf16/fp16 weight w [N, K], rows x [M, K] and out y [M, N] of
// the same type (all contiguous), summed in float32 and rounded once.
//
// torchvlm.nn.cpu_kernel builds this with PyTorch Inductor's C++ toolchain (its cpp_prefix.h gives at::vec,
// the CPU's vector ISA and OpenMP; TORCHVLM_WEIGHT is defined to at::BFloat16 or at::Half in front of it).
// It is for decode-sized products on CPUs where oneDNN has no bf16/fp16 GEMM (AVX2): the weight is read
// once, widened to float32 in registers (as are the rows) and multiplied with fused multiply-adds into float32 accumulators,
// MR input rows at a time against NR weight rows, so each weight vector loaded serves MR rows and MR x NR
// independent accumulators hide the FMA latency. Threads split the weight rows (static schedule).
#include <cstdint>
#include <functional>

using T = TORCHVLM_WEIGHT;
using fV = at::vec::Vectorized<float>;
using wV = at::vec::Vectorized<T>;

template <int MR, int NR>
static inline void tile(const T* w, const T* x, const T* bias, T* y, int64_t K, int64_t N, int64_t R) {
    constexpr int64_t S = wV::size();  // one load of S values widens to two float vectors
    const int64_t Kv = K - K % S;
    fV acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = fV(0);
    for (int64_t k = 0; k < Kv; k += S) {
        fV lo[MR], hi[MR];
        for (int i = 0; i < MR; ++i) {
            auto r = at::vec::convert<float, 2, T, 1>(wV::loadu(x + i * K + k));
            lo[i] = r[0];
            hi[i] = r[1];
        }
        for (int j = 0; j < NR; ++j) {
            if (j < R) {
                auto f = at::vec::convert<float, 2, T, 1>(wV::loadu(w + j * K + k));
                for (int i = 0; i < MR; ++i) acc[i][j] = at::vec::fmadd(f[0], lo[i], acc[i][j]);
                for (int i = 0; i < MR; ++i) acc[i][j] = at::vec::fmadd(f[1], hi[i], acc[i][j]);
            }
        }
    }
    for (int i = 0; i < MR; ++i) {
        for (int j = 0; j < R; ++j) {
            float s = at::vec::vec_reduce_all<float>(std::plus<fV>(), acc[i][j]);
            for (int64_t k = Kv; k < K; ++k) s += static_cast<float>(x[i * K + k]) * static_cast<float>(w[j * K + k]);
            if (bias) s += static_cast<float>(bias[j]);
            y[i * N + j] = static_cast<T>(s);
        }
    }
}

template <int MR, int NR>
static void run(const T* w, const T* x, const T* bias, T* y, int64_t M, int64_t N, int64_t K) {
    const int64_t blocks = (N + NR - 1) / NR;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t n = b * NR, R = N - n < NR ? N - n : NR;
        const T* bn = bias ? bias + n : nullptr;
        int64_t m = 0;
        for (; m + MR <= M; m += MR) tile<MR, NR>(w + n * K, x + m * K, bn, y + m * N + n, K, N, R);
        for (; m < M; ++m) tile<1, NR>(w + n * K, x + m * K, bn, y + m * N + n, K, N, R);
    }
}

// has_bias = 0: bias is not read (any pointer).
extern "C" void kernel(const T* w, const T* x, const T* bias, T* y, int64_t M, int64_t N, int64_t K,
                       int64_t has_bias) {
    const T* b = has_bias ? bias : nullptr;
    if (M == 1) run<1, 8>(w, x, b, y, M, N, K);
    else if (M < 4) run<2, 4>(w, x, b, y, M, N, K);
    else run<4, 2>(w, x, b, y, M, N, K);
}
