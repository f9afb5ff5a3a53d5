// CPU kernels of ops of a bf16/fp16 decode step that PyTorch runs as many small ops, per-head calls or slowly:
//
// torchvlm::decode_attention(q, k, v, mask, scale): the attention of one query per row and head
// over a KV cache in bf16/fp16, computed in float32, for the decode steps of torchvlm.nn.attention.attention:
//   q [B, Hq, 1, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] (Hq % Hkv == 0: query head h reads K/V head
//   h / (Hq / Hkv)); mask: none, or bool [B or 1, 1 or Hq, 1, L], True where the query may attend.
//   Returns [B, Hq, 1, Dv] in q's dtype: softmax(scale * q k^T) v over the keys it may attend, each output
//   one float32 sum rounded once; zeros for a query that may attend no key (as float32 SDPA gives).
// The last dimension of q, k and v must be contiguous; the others may have any strides (a KV cache's
// filled prefix is a view).
//
// Why: for one query PyTorch's SDPA runs its flash kernel, whose per-head GEMMs on tiny shapes (MKL packs
// the keys for each) and float32 copies of the cache cost ~50 us a layer for SmolLM2-135M's 9 heads over
// ~100 keys, where the arithmetic is ~130 thousand multiply-adds.
//
// torchvlm::rms_norm(x, weight, eps, unit_offset): torchvlm.nn.norm.RMSNorm's forward for bf16/fp16 x [..., D]
// and weight [D] in one pass per row, in the same arithmetic: h = float(x) * rsqrt(mean(float(x)^2) + eps),
// then T(h) * w rounded to T, or with unit_offset T(h * (1 + float(w))). Only the float32 sum of squares is
// summed in another order than PyTorch's mean. Eager PyTorch runs ~8 ops for it, ~40 us for one SmolLM2 row.
//
// torchvlm::rope(x, cos, sin): torchvlm.nn.rope.apply_rope for bf16/fp16 x [B, H, T, D] and tables
// [B or 1, 1 or H, T, D]: x * cos + cat(x2, x1) * sin, each product and the sum rounded to T as PyTorch's
// elementwise ops round them (bit-identical), in one pass instead of roll, two products and a sum.
//
// torchvlm::argmax(x): the greedy pick, torch.argmax(x, -1) for float32 scores [R, V] (the first index of
// the largest value, a NaN counting as the largest). PyTorch's reduction takes ~2 ns a value (~90 us for
// SmolLM2's 49152 logits); two vectorized passes (the largest value, then its first index) take ~9 us.
//
// torchvlm.nn.cpu_kernel builds this with PyTorch Inductor's C++ toolchain, linked against libtorch; it
// registers the ops' CPU kernels with the dispatcher, so a compiled graph calls them without Python.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

using fV = at::vec::Vectorized<float>;

// widen n values of p into float32 at o
template <typename T>
static inline void widen(const T* p, float* o, int64_t n) {
    using tV = at::vec::Vectorized<T>;
    int64_t i = 0;
    for (; i + tV::size() <= n; i += tV::size()) {
        auto f = at::vec::convert<float, 2, T, 1>(tV::loadu(p + i));
        f[0].store(o + i);
        f[1].store(o + i + fV::size());
    }
    for (; i < n; ++i) o[i] = static_cast<float>(p[i]);
}

// sum_i a[i] * b[i] for float a and T b, n values
template <typename T>
static inline float dot(const float* a, const T* b, int64_t n) {
    using tV = at::vec::Vectorized<T>;
    fV s0(0), s1(0);
    int64_t i = 0;
    for (; i + tV::size() <= n; i += tV::size()) {
        auto f = at::vec::convert<float, 2, T, 1>(tV::loadu(b + i));
        s0 = at::vec::fmadd(f[0], fV::loadu(a + i), s0);
        s1 = at::vec::fmadd(f[1], fV::loadu(a + i + fV::size()), s1);
    }
    float s = at::vec::vec_reduce_all<float>(std::plus<fV>(), s0 + s1);
    for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
    return s;
}

// acc[i] += p * b[i] for T b, n values
template <typename T>
static inline void axpy(float p, const T* b, float* acc, int64_t n) {
    using tV = at::vec::Vectorized<T>;
    const fV pv(p);
    int64_t i = 0;
    for (; i + tV::size() <= n; i += tV::size()) {
        auto f = at::vec::convert<float, 2, T, 1>(tV::loadu(b + i));
        at::vec::fmadd(f[0], pv, fV::loadu(acc + i)).store(acc + i);
        at::vec::fmadd(f[1], pv, fV::loadu(acc + i + fV::size())).store(acc + i + fV::size());
    }
    for (; i < n; ++i) acc[i] += p * static_cast<float>(b[i]);
}

template <typename T>
static void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mask,
                int64_t mask_sb, int64_t mask_sh, int64_t mask_sl, float scale, at::Tensor& out) {
    const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), L = k.size(2), D = q.size(3), Dv = v.size(3);
    const int64_t group = Hq / Hkv;
    const T* qp = q.data_ptr<T>();
    const T* kp = k.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    T* op = out.data_ptr<T>();
    // a few heads per thread at least: one head is ~L * (D + Dv) multiply-adds, too little to split
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, L * (D + Dv)));
    at::parallel_for(0, B * Hq, grain, [&](int64_t i0, int64_t i1) {
        std::vector<float> qf(D), p(L), acc(Dv);
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t b = i / Hq, h = i % Hq, g = h / group;
            widen(qp + b * q.stride(0) + h * q.stride(1), qf.data(), D);
            const T* kb = kp + b * k.stride(0) + g * k.stride(1);
            const T* vb = vp + b * v.stride(0) + g * v.stride(1);
            const bool* mb = mask ? mask + b * mask_sb + h * mask_sh : nullptr;
            float top = -std::numeric_limits<float>::infinity();
            for (int64_t l = 0; l < L; ++l) {
                if (mb && !mb[l * mask_sl]) {
                    p[l] = -std::numeric_limits<float>::infinity();
                    continue;
                }
                p[l] = dot(qf.data(), kb + l * k.stride(2), D) * scale;
                top = std::max(top, p[l]);
            }
            std::fill(acc.begin(), acc.end(), 0.0f);
            T* o = op + i * Dv;
            if (top == -std::numeric_limits<float>::infinity()) {  // no key to attend
                for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<T>(0.0f);
                continue;
            }
            // p = exp(s - top), vectorized; masked keys (-inf) give 0
            int64_t l = 0;
            for (; l + fV::size() <= L; l += fV::size()) (fV::loadu(p.data() + l) - fV(top)).exp().store(p.data() + l);
            for (; l < L; ++l) p[l] = std::exp(p[l] - top);
            float sum = 0.0f;
            for (l = 0; l < L; ++l) {
                if (p[l] == 0.0f) continue;
                sum += p[l];
                axpy(p[l], vb + l * v.stride(2), acc.data(), Dv);
            }
            for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<T>(acc[d] / sum);
        }
    });
}

static at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& mask, double scale) {
    const auto t = q.scalar_type();
    TORCH_CHECK((t == at::kBFloat16 || t == at::kHalf) && k.scalar_type() == t && v.scalar_type() == t
                    && q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1,
                "torchvlm::decode_attention: needs bf16/fp16 q [B, Hq, 1, D], k [B, Hkv, L, D] and v [B, Hkv, L, Dv] "
                "of one dtype, got q ", t, " ", q.sizes(), ", k ", k.scalar_type(), " ", k.sizes(), ", v ",
                v.scalar_type(), " ", v.sizes());
    const int64_t B = q.size(0), Hq = q.size(1), L = k.size(2);
    TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == k.size(1) && v.size(2) == L && k.size(3) == q.size(3)
                    && k.size(1) > 0 && Hq % k.size(1) == 0 && q.stride(3) == 1 && k.stride(3) == 1
                    && v.stride(3) == 1,
                "torchvlm::decode_attention: shapes or strides do not fit: q ", q.sizes(), ", k ", k.sizes(), ", v ",
                v.sizes(), " (Hq a multiple of Hkv, the last dimension contiguous)");
    const bool* mp = nullptr;
    int64_t sb = 0, sh = 0, sl = 0;
    if (mask.has_value()) {
        const at::Tensor& m = *mask;
        TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && (m.size(0) == 1 || m.size(0) == B)
                        && (m.size(1) == 1 || m.size(1) == Hq) && m.size(2) == 1 && m.size(3) == L,
                    "torchvlm::decode_attention: mask must be bool [B or 1, 1 or Hq, 1, ", L, "], got ",
                    m.scalar_type(), " ", m.sizes());
        mp = m.data_ptr<bool>();
        sb = m.size(0) == 1 ? 0 : m.stride(0);
        sh = m.size(1) == 1 ? 0 : m.stride(1);
        sl = m.stride(3);
    }
    at::Tensor out = at::empty({B, Hq, 1, v.size(3)}, q.options());
    const float s = static_cast<float>(scale);
    if (t == at::kBFloat16)
        run<at::BFloat16>(q, k, v, mp, sb, sh, sl, s, out);
    else
        run<at::Half>(q, k, v, mp, sb, sh, sl, s, out);
    return out;
}

template <typename T>
static void rms_rows(const T* x, const T* w, T* y, int64_t R, int64_t D, float eps, bool unit_offset) {
    at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, D)), [&](int64_t r0, int64_t r1) {
        std::vector<float> h(D);
        for (int64_t r = r0; r < r1; ++r) {
            const T* xr = x + r * D;
            widen(xr, h.data(), D);
            fV s0(0), s1(0);
            int64_t i = 0;
            for (; i + 2 * fV::size() <= D; i += 2 * fV::size()) {
                const fV a = fV::loadu(h.data() + i), b = fV::loadu(h.data() + i + fV::size());
                s0 = at::vec::fmadd(a, a, s0);
                s1 = at::vec::fmadd(b, b, s1);
            }
            float ss = at::vec::vec_reduce_all<float>(std::plus<fV>(), s0 + s1);
            for (; i < D; ++i) ss += h[i] * h[i];
            const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
            T* yr = y + r * D;
            for (int64_t d = 0; d < D; ++d) {
                const float v = h[d] * inv;
                yr[d] = unit_offset ? static_cast<T>(v * (1.0f + static_cast<float>(w[d])))
                                    : static_cast<T>(static_cast<float>(static_cast<T>(v)) * static_cast<float>(w[d]));
            }
        }
    });
}

static at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps, bool unit_offset) {
    const auto t = x.scalar_type();
    TORCH_CHECK((t == at::kBFloat16 || t == at::kHalf) && weight.scalar_type() == t && weight.dim() == 1
                    && x.dim() >= 1 && x.size(-1) == weight.size(0) && weight.is_contiguous(),
                "torchvlm::rms_norm: needs bf16/fp16 x [..., D] and a contiguous weight [D] of its dtype, got x ", t,
                " ", x.sizes(), " and weight ", weight.scalar_type(), " ", weight.sizes());
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty(x.sizes(), x.options());
    const int64_t D = x.size(-1), R = D ? x.numel() / D : 0;
    if (t == at::kBFloat16)
        rms_rows<at::BFloat16>(xc.data_ptr<at::BFloat16>(), weight.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(),
                               R, D, static_cast<float>(eps), unit_offset);
    else
        rms_rows<at::Half>(xc.data_ptr<at::Half>(), weight.data_ptr<at::Half>(), y.data_ptr<at::Half>(), R, D,
                           static_cast<float>(eps), unit_offset);
    return y;
}

// a and b rounded to T and widened back: the value PyTorch stores after one bf16/fp16 elementwise op
template <typename T>
static inline void round_to(fV& a, fV& b) {
    auto f = at::vec::convert<float, 2, T, 1>(at::vec::convert<T, 1, float, 2>(at::vec::VectorizedN<float, 2>(a, b)));
    a = f[0];
    b = f[1];
}

template <typename T>
static inline float round_to(float v) {
    return static_cast<float>(static_cast<T>(v));
}

// one row of D values (D even, h = D / 2): o = x * c + cat(x2, x1) * s, each product and the sum rounded to T
template <typename T>
static inline void rope_row(const T* x, const T* c, const T* s, T* o, int64_t h) {
    using tV = at::vec::Vectorized<T>;
    int64_t j = 0;
    for (; j + tV::size() <= h; j += tV::size()) {
        auto x1 = at::vec::convert<float, 2, T, 1>(tV::loadu(x + j)), x2 = at::vec::convert<float, 2, T, 1>(tV::loadu(x + h + j));
        for (int64_t side = 0; side < 2; ++side) {  // side 0: o[j] from x1 * c + x2 * s; side 1: o[h + j] from x2 * c + x1 * s
            const int64_t at = side * h + j;
            auto cf = at::vec::convert<float, 2, T, 1>(tV::loadu(c + at)), sf = at::vec::convert<float, 2, T, 1>(tV::loadu(s + at));
            auto& a = side ? x2 : x1;
            auto& b = side ? x1 : x2;
            fV p0 = a[0] * cf[0], p1 = a[1] * cf[1], r0 = b[0] * sf[0], r1 = b[1] * sf[1];
            round_to<T>(p0, p1);
            round_to<T>(r0, r1);
            at::vec::convert<T, 1, float, 2>(at::vec::VectorizedN<float, 2>(p0 + r0, p1 + r1)).store(o + at);
        }
    }
    for (; j < h; ++j) {
        const float x1 = static_cast<float>(x[j]), x2 = static_cast<float>(x[h + j]);
        o[j] = static_cast<T>(round_to<T>(x1 * static_cast<float>(c[j])) + round_to<T>(x2 * static_cast<float>(s[j])));
        o[h + j] = static_cast<T>(round_to<T>(x2 * static_cast<float>(c[h + j])) + round_to<T>(x1 * static_cast<float>(s[h + j])));
    }
}

static at::Tensor rope_cpu(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
    const auto t = x_in.scalar_type();
    TORCH_CHECK((t == at::kBFloat16 || t == at::kHalf) && cos_in.scalar_type() == t && sin_in.scalar_type() == t
                    && x_in.dim() == 4 && cos_in.dim() == 4 && sin_in.dim() == 4 && x_in.size(3) % 2 == 0,
                "torchvlm::rope: needs bf16/fp16 x [B, H, T, D] (D even) and tables cos, sin [B or 1, 1 or H, T, D] of its "
                "dtype, got x ", t, " ", x_in.sizes(), ", cos ", cos_in.scalar_type(), " ", cos_in.sizes(), ", sin ",
                sin_in.scalar_type(), " ", sin_in.sizes());
    // rows of D values are read contiguously; other strides are free
    auto rows = [](const at::Tensor& a) { return a.stride(3) == 1 ? a : a.contiguous(); };
    const at::Tensor x = rows(x_in), cos = rows(cos_in), sin = rows(sin_in);
    const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
    for (const at::Tensor* tab : {&cos, &sin})
        TORCH_CHECK((tab->size(0) == 1 || tab->size(0) == B) && (tab->size(1) == 1 || tab->size(1) == H)
                        && tab->size(2) == T && tab->size(3) == D,
                    "torchvlm::rope: tables ", tab->sizes(), " do not fit x ", x.sizes());
    // the memory order PyTorch's elementwise ops would give: heads inside tokens for a transposed [B, T, H, D]
    const bool heads_inner = x.stride(1) < x.stride(2);
    at::Tensor out = heads_inner ? at::empty({B, T, H, D}, x.options()).transpose(1, 2) : at::empty({B, H, T, D}, x.options());
    auto offset = [](const at::Tensor& a, int64_t b, int64_t h, int64_t i) {
        return (a.size(0) == 1 ? 0 : b * a.stride(0)) + (a.size(1) == 1 ? 0 : h * a.stride(1)) + i * a.stride(2);
    };
    AT_DISPATCH_REDUCED_FLOATING_TYPES(t, "torchvlm_rope", [&] {
        const scalar_t *xp = x.data_ptr<scalar_t>(), *cp = cos.data_ptr<scalar_t>(), *sp = sin.data_ptr<scalar_t>();
        scalar_t* op = out.data_ptr<scalar_t>();
        at::parallel_for(0, B * H * T, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, D)), [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
                const int64_t b = r / (H * T), h = (r / T) % H, i = r % T;
                rope_row(xp + offset(x, b, h, i), cp + offset(cos, b, h, i), sp + offset(sin, b, h, i),
                         op + offset(out, b, h, i), D / 2);
            }
        });
    });
    return out;
}

// the index of each row's largest value (the first of equal ones; a NaN counts as the largest), as torch.argmax
static at::Tensor argmax_cpu(const at::Tensor& x) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) > 0,
                "torchvlm::argmax: needs float32 scores [R, V] (V > 0), got ", x.scalar_type(), " ", x.sizes());
    const at::Tensor xc = x.contiguous();
    const int64_t R = x.size(0), V = x.size(1);
    at::Tensor out = at::empty({R}, x.options().dtype(at::kLong));
    const float* xp = xc.data_ptr<float>();
    int64_t* op = out.data_ptr<int64_t>();
    at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* row = xp + r * V;
            int64_t j = 0;
            fV m(-std::numeric_limits<float>::infinity());
            for (; j + fV::size() <= V; j += fV::size()) m = at::vec::maximum(m, fV::loadu(row + j));  // keeps NaN
            float top = at::vec::vec_reduce_all<float>([](const fV& a, const fV& b) { return at::vec::maximum(a, b); }, m);
            for (; j < V; ++j) top = (std::isnan(row[j]) || row[j] > top) ? row[j] : top;
            int64_t pick = 0;
            if (std::isnan(top)) {
                while (!std::isnan(row[pick])) ++pick;
            } else {
                const fV tv(top);
                for (j = 0; j + fV::size() <= V && (fV::loadu(row + j) == tv).zero_mask() == (1 << fV::size()) - 1;)
                    j += fV::size();  // whole vectors without the top value
                for (pick = j; row[pick] != top;) ++pick;
            }
            op[r] = pick;
        }
    });
    return out;
}

TORCH_LIBRARY_IMPL(torchvlm, CPU, m) {
    m.impl("decode_attention", &decode_attention_cpu);
    m.impl("rms_norm", &rms_norm_cpu);
    m.impl("rope", &rope_cpu);
    m.impl("argmax", &argmax_cpu);
}

// torchvlm.nn.cpu_kernel checks that the library loaded by this symbol
extern "C" int torchvlm_decode_ops_loaded() { return 1; }
