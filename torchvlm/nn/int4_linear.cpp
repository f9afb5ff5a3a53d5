// torchvlm::int4_linear(x, qweight, group_size, scale_zeros) on the CPU: the product of rows x [M, K] with an
// int4 weight in PyTorch's AVX2 CPU layout, the one torch._convert_weight_to_int4pack_for_cpu makes on an AVX2
// CPU (torchvlm.nn.quant checks it before calling this op):
//   qweight: blocks of 32 output rows, [K, 16] bytes each; byte j of step k holds the code of the block's
//       row j in its low nibble and of row j + 16 in its high one. When N % 32 == 16 the last block has 16
//       rows, [K, 8] bytes, row 2j low and row 2j + 1 high.
//   scale_zeros: [K / G, N, 2], (scale, zero) of each group of G inputs and output row, in x's dtype.
// y[m, n] = sum_k x[m, k] * (q[n, k] * s[g, n] + z[g, n] - 8 s[g, n]), g = k / G, as
// torch._weight_int4pack_mm_for_cpu computes it, summed in float32 and rounded once to x's dtype.
//
// torchvlm.nn.cpu_kernel builds this with PyTorch Inductor's C++ toolchain, linked against libtorch (it
// registers the op's CPU kernel with the dispatcher, so a compiled graph calls it without Python). It is the
// outer-product form of a GEMM micro-kernel: a block's codes of a step multiply a broadcast input value, and
// each group's sums are scaled once at its end, using the sum of the group's inputs for the zero point.
// Threads split the blocks.
//
// bf16 rows: each group of G inputs of a row is rounded to int16 with its own scale (max |x| / 32767: a bf16
// value keeps all its 8 significant bits unless it is 2^7 times smaller than the group's largest, and each
// input moves by at most 1/65534 of that largest), and two steps of codes (zero-extended to 16 bits)
// multiply two inputs in one vpmaddwd into exact int32 sums. That does 64 weights in ~19 instructions where
// widening the codes to float32 takes ~30.
// fp16 and fp32 rows (more significant bits than int16 keeps of a small input): the codes are widened to
// float32 and multiply the inputs exactly, summed in float32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_weight_int4pack_mm_for_cpu.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#ifndef __AVX2__
#error "int4_linear.cpp needs AVX2 (the compiler targets a CPU without it)"
#endif

// scale and offset (zero - 8 scale) of 8 output rows of one group from their (scale, zero) pairs: lane i
// reads the pair p[2 * i * step], p[2 * i * step + 1]
template <typename T>
static inline void scales(const T* p, int step, __m256& s, __m256& off) {
    if constexpr (std::is_same<T, at::BFloat16>::value) {
        if (step == 1) {  // a 32-bit lane holds (scale, zero): a shift and a mask widen them
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
            s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            const __m256 z = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
            off = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, z);
            return;
        }
    }
    alignas(32) float a[8], b[8];
    for (int i = 0; i < 8; ++i) {
        a[i] = static_cast<float>(p[2 * i * step]);
        b[i] = static_cast<float>(p[2 * i * step + 1]) - 8.0f * a[i];
    }
    s = _mm256_load_ps(a);
    off = _mm256_load_ps(b);
}

// 8 codes (bytes p[0..7]) widened to 32-bit lanes: their low nibbles are one row group, high nibbles another
static inline __m256i bytes8(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
static inline __m256 lo(__m256i b) { return _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15))); }
static inline __m256 hi(__m256i b) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)); }

// The rows of a block of W (32 or 16) output rows come in pairs of vectors of 8: the codes of 8 bytes p
// (bytes 8p..8p+7 of each step) widen to one vector from the low nibbles (h = 0) and one from the high ones
// (h = 1). Lane i of that vector is the block's row first(p, h) + i * step:
static constexpr int first(int W, int p, int h) { return W == 32 ? 8 * p + 16 * h : h; }
static constexpr int step(int W) { return W == 32 ? 1 : 2; }

// The sums of pairs p0 .. p0+P-1 against MR rows, rounded to T, into their places in out (rows y + n0)
template <typename T, int W, int P, int MR>
static inline void store(const __m256 (&acc)[MR][P][2], int p0, T* out, int64_t N) {
    alignas(32) float r[8];
    for (int i = 0; i < MR; ++i)
        for (int p = 0; p < P; ++p)
            for (int h = 0; h < 2; ++h) {
                _mm256_store_ps(r, acc[i][p][h]);
                for (int j = 0; j < 8; ++j) out[i * N + first(W, p0 + p, h) + j * step(W)] = static_cast<T>(r[j]);
            }
}

// Pairs p0 .. p0+P-1 of a block against MR input rows. qb: the block's codes [K, W / 2]; x: [MR, K] float32;
// xsum: [MR, K / G] the group sums of x; out: y + n0. 2 x 4 or 4 x 2 vectors of sums, enough to hide the
// FMA latency (a second set for 1 row over unrolled steps measured no faster: the widening is the limit).
template <typename T, int W, int P, int MR>
static void panel(const uint8_t* qb, int p0, const float* x, const float* xsum, const T* sz, T* out,
                  int64_t K, int64_t G, int64_t N, int64_t n0) {
    constexpr int B = W / 2;
    __m256 acc[MR][P][2];
    for (int i = 0; i < MR; ++i)
        for (int p = 0; p < P; ++p) acc[i][p][0] = acc[i][p][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / G; ++g) {
        __m256 ga[MR][P][2];  // this group's sums of x * code
        for (int i = 0; i < MR; ++i)
            for (int p = 0; p < P; ++p) ga[i][p][0] = ga[i][p][1] = _mm256_setzero_ps();
        for (int64_t k = g * G; k < (g + 1) * G; ++k) {
            __m256 w[P][2];
            for (int p = 0; p < P; ++p) {
                const __m256i b = bytes8(qb + k * B + 8 * (p0 + p));
                w[p][0] = lo(b);
                w[p][1] = hi(b);
            }
            for (int i = 0; i < MR; ++i) {
                const __m256 xb = _mm256_broadcast_ss(x + i * K + k);
                for (int p = 0; p < P; ++p)
                    for (int h = 0; h < 2; ++h) ga[i][p][h] = _mm256_fmadd_ps(w[p][h], xb, ga[i][p][h]);
            }
        }
        for (int p = 0; p < P; ++p)
            for (int h = 0; h < 2; ++h) {
                __m256 s, off;
                scales(sz + (g * N + n0 + first(W, p0 + p, h)) * 2, step(W), s, off);
                for (int i = 0; i < MR; ++i) {
                    acc[i][p][h] = _mm256_fmadd_ps(ga[i][p][h], s, acc[i][p][h]);
                    acc[i][p][h] = _mm256_fmadd_ps(_mm256_set1_ps(xsum[i * (K / G) + g]), off, acc[i][p][h]);
                }
            }
    }
    store<T, W, P, MR>(acc, p0, out, N);
}

// How far ahead (bytes) panel16 asks for the codes it will read: a small model's matrices (SmolLM2's are
// 0.2-1.8 MB) stream too briefly for the hardware prefetcher to get far ahead (measured 1.0-1.1x on the
// products of SmolLM2 and Qwen2-1.5B layers, in one process against no prefetch)
static constexpr int64_t kPrefetch = 2048;

// The int16 form of panel: pairs F .. F+P-1 of a block against MR input rows qx [MR, K] (int16, each group
// g of row i scaled by sx[i * K / G + g]). Per two steps k, k + 1 the codes of both are interleaved byte by
// byte and zero-extended to 16 bits, so that a 32-bit lane holds (q[n, k], q[n, k + 1]) and one vpmaddwd
// with the broadcast pair (x[k], x[k + 1]) adds both products. A lane's int32 sum over a group stays below
// G / 2 * 2 * 15 * 32767 < 2^31 for any G up to 2^11.
template <typename T, int W, int F, int P, int MR>
static void panel16(const uint8_t* qb, const int16_t* qx, const float* sx, const float* xsum, const T* sz,
                    T* out, int64_t K, int64_t G, int64_t N, int64_t n0) {
    static_assert(W == 32 || (F == 0 && P == 1), "a 16-row block has one pair of vectors");
    constexpr int B = W / 2;
    const int64_t ng = K / G;
    const __m256i mask = _mm256_set1_epi16(15);
    __m256 acc[MR][P][2];
    for (int i = 0; i < MR; ++i)
        for (int p = 0; p < P; ++p) acc[i][p][0] = acc[i][p][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        __m256i ga[MR][P][2];  // this group's int32 sums of qx * code
        for (int i = 0; i < MR; ++i)
            for (int p = 0; p < P; ++p) ga[i][p][0] = ga[i][p][1] = _mm256_setzero_si256();
        for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
            __m256i w[P][2];
            _mm_prefetch(reinterpret_cast<const char*>(qb + k * B + kPrefetch), _MM_HINT_T0);
            if constexpr (W == 32) {  // steps k and k + 1: 16 bytes each, byte j = rows j (low) and j + 16
                const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + k * B));
                const __m128i a = _mm256_castsi256_si128(v), b = _mm256_extracti128_si256(v, 1);
                for (int p = 0; p < P; ++p) {  // pair p: bytes 8p .. 8p + 7
                    const __m256i c = _mm256_cvtepu8_epi16(F + p == 0 ? _mm_unpacklo_epi8(a, b)
                                                                      : _mm_unpackhi_epi8(a, b));
                    w[p][0] = _mm256_and_si256(c, mask);
                    w[p][1] = _mm256_srli_epi16(c, 4);
                }
            } else {  // 8 bytes each, byte j = rows 2j (low) and 2j + 1
                const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + k * B));
                const __m256i c = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(v, _mm_srli_si128(v, 8)));
                w[0][0] = _mm256_and_si256(c, mask);
                w[0][1] = _mm256_srli_epi16(c, 4);
            }
            for (int i = 0; i < MR; ++i) {
                int32_t pair;
                std::memcpy(&pair, qx + i * K + k, sizeof(pair));
                const __m256i xb = _mm256_set1_epi32(pair);
                for (int p = 0; p < P; ++p)
                    for (int h = 0; h < 2; ++h)
                        ga[i][p][h] = _mm256_add_epi32(ga[i][p][h], _mm256_madd_epi16(w[p][h], xb));
            }
        }
        for (int p = 0; p < P; ++p)
            for (int h = 0; h < 2; ++h) {
                __m256 s, off;
                scales(sz + (g * N + n0 + first(W, F + p, h)) * 2, step(W), s, off);
                for (int i = 0; i < MR; ++i) {
                    const __m256 si = _mm256_mul_ps(s, _mm256_set1_ps(sx[i * ng + g]));
                    acc[i][p][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ga[i][p][h]), si, acc[i][p][h]);
                    acc[i][p][h] = _mm256_fmadd_ps(_mm256_set1_ps(xsum[i * ng + g]), off, acc[i][p][h]);
                }
            }
    }
    store<T, W, P, MR>(acc, F, out, N);
}

// The rows as the panels read them: float32 (x), each group's input sum (xsum, for the zero points), and for
// the int16 form the rounded rows (qx) and their scales (sx)
struct Rows {
    const float* x;
    const float* xsum;
    const int16_t* qx;
    const float* sx;
};

// One block against all M rows: 4 rows at a time against one pair of vectors at a time, then 2 rows or 1
// against the whole block
template <typename T, int W, bool I16>
static void block(const uint8_t* qb, const Rows& r, const T* sz, T* out, int64_t M, int64_t K, int64_t G,
                  int64_t N, int64_t n0) {
    constexpr int P = W / 16;
    const int64_t ng = K / G;
    int64_t m = 0;
    if constexpr (I16) {
        for (; m + 4 <= M; m += 4) {
            panel16<T, W, 0, 1, 4>(qb, r.qx + m * K, r.sx + m * ng, r.xsum + m * ng, sz, out + m * N, K, G, N, n0);
            if constexpr (P == 2)
                panel16<T, W, 1, 1, 4>(qb, r.qx + m * K, r.sx + m * ng, r.xsum + m * ng, sz, out + m * N, K, G, N,
                                       n0);
        }
        if (m + 2 <= M) {
            panel16<T, W, 0, P, 2>(qb, r.qx + m * K, r.sx + m * ng, r.xsum + m * ng, sz, out + m * N, K, G, N, n0);
            m += 2;
        }
        if (m < M)
            panel16<T, W, 0, P, 1>(qb, r.qx + m * K, r.sx + m * ng, r.xsum + m * ng, sz, out + m * N, K, G, N, n0);
        return;
    }
    for (; m + 4 <= M; m += 4)
        for (int p0 = 0; p0 < P; ++p0)
            panel<T, W, 1, 4>(qb, p0, r.x + m * K, r.xsum + m * ng, sz, out + m * N, K, G, N, n0);
    if (m + 2 <= M) {
        panel<T, W, P, 2>(qb, 0, r.x + m * K, r.xsum + m * ng, sz, out + m * N, K, G, N, n0);
        m += 2;
    }
    if (m < M) panel<T, W, P, 1>(qb, 0, r.x + m * K, r.xsum + m * ng, sz, out + m * N, K, G, N, n0);
}

// Each group of a float32 row rounded to int16 with the scale max |x| / 32767 (0 for an all-zero group). A NaN
// or infinite input does not survive this, but it does the group's input sum, which every output adds.
static void to_int16(const float* x, int16_t* qx, float* sx, int64_t n, int64_t G) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int64_t g = 0; g < n / G; ++g) {
        const float* xg = x + g * G;
        __m256 mx = _mm256_setzero_ps();
        for (int64_t k = 0; k < G; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(xg + k), abs_mask));
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, mx);
        float top = 0.0f;
        for (float l : lanes) top = l > top ? l : top;
        sx[g] = top / 32767.0f;
        const __m256 inv = _mm256_set1_ps(top > 0.0f ? 32767.0f / top : 0.0f);
        for (int64_t k = 0; k < G; k += 8) {  // round to nearest (even), the default rounding mode
            const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + k), inv));
            const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(qx + g * G + k), q16);
        }
    }
}

template <typename T>
static void run(const uint8_t* qw, const T* x, const T* sz, T* y, int64_t M, int64_t N, int64_t K, int64_t G) {
    constexpr bool I16 = std::is_same<T, at::BFloat16>::value;  // bf16 rows: the int16 form
    const int64_t ng = K / G;
    // the rows widened once, each group's input sum, and for the int16 form the rounded rows and their scales
    std::unique_ptr<float[]> xf(new float[M * K + M * ng + (I16 ? M * ng : 0)]);
    std::unique_ptr<int16_t[]> qx(I16 ? new int16_t[M * K] : nullptr);
    float* xsum = xf.get() + M * K;
    float* sx = xsum + M * ng;
    Rows r{xf.get(), xsum, qx.get(), sx};
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t g = 0; g < ng; ++g) {
            float s = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; ++k) s += xf[m * K + k] = static_cast<float>(x[m * K + k]);
            xsum[m * ng + g] = s;
        }
        if constexpr (I16) to_int16(xf.get() + m * K, qx.get() + m * K, sx + m * ng, K, G);
    }
    const int64_t full = N / 32;
    at::parallel_for(0, full + (N % 32 ? 1 : 0), 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t n0 = b * 32;
            if (b < full)
                block<T, 32, I16>(qw + n0 * K / 2, r, sz, y + n0, M, K, G, N, n0);
            else
                block<T, 16, I16>(qw + n0 * K / 2, r, sz, y + n0, M, K, G, N, n0);
        }
    });
}

static at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, int64_t group_size,
                                  const at::Tensor& scale_zeros) {
    const int64_t K = x.size(-1), N = scale_zeros.size(1);
    const bool fits = x.dim() == 2 && x.is_contiguous() && scale_zeros.is_contiguous() && qweight.is_contiguous()
                      && qweight.scalar_type() == at::kByte && scale_zeros.scalar_type() == x.scalar_type()
                      && group_size > 0 && group_size % 32 == 0 && group_size <= 2048 && K % group_size == 0
                      && N % 16 == 0
                      && scale_zeros.dim() == 3 && scale_zeros.size(0) == K / group_size
                      && qweight.numel() == N * K / 2;
    if (!fits) return at::_weight_int4pack_mm_for_cpu(x, qweight, group_size, scale_zeros);
    at::Tensor y = at::empty({x.size(0), N}, x.options());
    const int64_t M = x.size(0);
    const uint8_t* qw = qweight.data_ptr<uint8_t>();
    switch (x.scalar_type()) {
        case at::kBFloat16:
            run<at::BFloat16>(qw, x.data_ptr<at::BFloat16>(), scale_zeros.data_ptr<at::BFloat16>(),
                              y.data_ptr<at::BFloat16>(), M, N, K, group_size);
            break;
        case at::kHalf:
            run<at::Half>(qw, x.data_ptr<at::Half>(), scale_zeros.data_ptr<at::Half>(), y.data_ptr<at::Half>(),
                          M, N, K, group_size);
            break;
        case at::kFloat:
            run<float>(qw, x.data_ptr<float>(), scale_zeros.data_ptr<float>(), y.data_ptr<float>(), M, N, K,
                       group_size);
            break;
        default:
            return at::_weight_int4pack_mm_for_cpu(x, qweight, group_size, scale_zeros);
    }
    return y;
}

TORCH_LIBRARY_IMPL(torchvlm, CPU, m) { m.impl("int4_linear", &int4_linear_cpu); }

// torchvlm.nn.cpu_kernel checks that the library loaded by this symbol
extern "C" int torchvlm_int4_linear_loaded() { return 1; }
