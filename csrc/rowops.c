/*
 * rowops.c: fused CPU kernels for the decoder's elementwise and per-row ops (leantune).
 *
 * Plain C ABI over raw pointers, loaded with ctypes by quant/rowops.py, which compiles
 * this file on first use (the loader of quant/cpu_kernels.py). The PyTorch expressions in
 * peft_core/model.py (RMSNorm, SwiGLU) are the spec; these kernels compute the same math in
 * one pass over memory where PyTorch's autograd takes four to eight, and the tests compare
 * them with the spec in float64. Tensors are fp32 (or bf16: the twins at the end), contiguous,
 * rows of C elements.
 *
 *   RMSNorm     r[i]  = 1 / sqrt(mean_c x[i,c]^2 + eps)            (sum of squares in double)
 *               y     = w * (x * r)
 *       dX      xh    = x * r,  g = dy * w
 *               dx    = r * (g - xh * mean_c(g * xh))
 *   SwiGLU      s     = 1 / (1 + exp(-a))                          (a: gate, b: up)
 *               h     = (a * s) * b
 *       d       da    = dh * b * s * (1 + a * (1 - s)),   db = dh * (a * s)
 *
 * exp is a Cephes-style polynomial (range reduction by ln 2, degree-6 polynomial, exponent
 * by bit shift), within 2 ulp of expf on [-87, 88] and written without calls so the compiler
 * vectorises the loops; arguments below -87.3 return 2^-126 (~1e-38) instead of underflowing,
 * which moves a sigmoid of an input below -87 by less than 1e-37.
 *
 * Threads: OpenMP over rows (or over chunks of a flat array) with the caller's count.
 */
#include <math.h>
#include <stdint.h>

#define LT_API __attribute__((visibility("default")))

static inline float lt_exp(float x) {
    x = x < -87.3f ? -87.3f : x; /* NaN passes through both clamps */
    x = x > 88.7f ? 88.7f : x;
    float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(n, -0.693359375f, x); /* ln 2 in two parts (Cody-Waite) */
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23}; /* 2^n */
    return p * scale.f;
}

LT_API int lt_isa_level(void) {
#if defined(__AVX512F__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

LT_API int lt_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* y[i,:] = w * x[i,:] * rstd[i] */
LT_API void lt_rmsnorm_fwd_f32(const float *x, const float *w, float *y, float *rstd, int64_t rows,
                               int64_t C, float eps, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && rows * C >= 65536)
    for (int64_t i = 0; i < rows; i++) {
        const float *xi = x + i * C;
        float *yi = y + i * C;
        double ss = 0.0;
#pragma omp simd reduction(+ : ss)
        for (int64_t c = 0; c < C; c++) ss += (double)xi[c] * (double)xi[c];
        float r = (float)(1.0 / sqrt(ss / (double)C + (double)eps));
        rstd[i] = r;
        for (int64_t c = 0; c < C; c++) yi[c] = w[c] * (xi[c] * r);
    }
}

/* dx[i,:] = rstd * (dy * w - xh * mean(dy * w * xh)), xh = x * rstd */
LT_API void lt_rmsnorm_bwd_f32(const float *x, const float *w, const float *rstd, const float *dy,
                               float *dx, int64_t rows, int64_t C, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && rows * C >= 65536)
    for (int64_t i = 0; i < rows; i++) {
        const float *xi = x + i * C, *dyi = dy + i * C;
        float *dxi = dx + i * C;
        const float r = rstd[i];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < C; c++) dot += dyi[c] * w[c] * (xi[c] * r);
        const float m = dot / (float)C;
        for (int64_t c = 0; c < C; c++) dxi[c] = r * (dyi[c] * w[c] - (xi[c] * r) * m);
    }
}

#define LT_CHUNK 16384 /* elements per OpenMP work item in the flat kernels */

/* h = silu(a) * b */
LT_API void lt_swiglu_fwd_f32(const float *restrict a, const float *restrict b, float *restrict h, int64_t n, int nt) {
    const int64_t chunks = (n + LT_CHUNK - 1) / LT_CHUNK;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && chunks > 1)
    for (int64_t k = 0; k < chunks; k++) {
        const int64_t lo = k * LT_CHUNK, hi = lo + LT_CHUNK < n ? lo + LT_CHUNK : n;
#pragma omp simd
        for (int64_t j = lo; j < hi; j++) {
            const float s = 1.0f / (1.0f + lt_exp(-a[j]));
            h[j] = (a[j] * s) * b[j];
        }
    }
}

/* da = dh * b * s * (1 + a * (1 - s)), db = dh * a * s; no aliasing */
LT_API void lt_swiglu_bwd_f32(const float *restrict a, const float *restrict b, const float *restrict dh,
                              float *restrict da, float *restrict db,
                              int64_t n, int nt) {
    const int64_t chunks = (n + LT_CHUNK - 1) / LT_CHUNK;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && chunks > 1)
    for (int64_t k = 0; k < chunks; k++) {
        const int64_t lo = k * LT_CHUNK, hi = lo + LT_CHUNK < n ? lo + LT_CHUNK : n;
#pragma omp simd
        for (int64_t j = lo; j < hi; j++) {
            const float aj = a[j], g = dh[j];
            const float s = 1.0f / (1.0f + lt_exp(-aj));
            const float ds = s * (1.0f + aj * (1.0f - s));
            da[j] = g * b[j] * ds;
            db[j] = g * (aj * s);
        }
    }
}

/* Rotary embedding, rotate-half convention, h = D / 2, for every (b, hd, t) row of x:
 *   forward:   out[i] = x[i] c[i] - x[i+h] s[i]        (i < h)
 *              out[i] = x[i] c[i] + x[i-h] s[i]        (i >= h)
 *   backward:  dx[i]  = g[i] c[i] + g[i+h] s[i+h]      (i < h)
 *              dx[i]  = g[i] c[i] - g[i-h] s[i-h]      (i >= h)
 * x is strided over (B, H, T) with unit stride over D; out is contiguous (B, H, T, D);
 * cos / sin are (B or 1, T, D) with batch stride cs_b (0 when shared). */
LT_API void lt_rope_f32(const float *x, int64_t sb, int64_t sh, int64_t st, float *out, const float *cos_,
                        const float *sin_, int64_t cs_b, int64_t B, int64_t H, int64_t T, int64_t D,
                        int backward, int nt) {
    const int64_t h = D / 2, rows = B * H * T;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && rows * D >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t b = r / (H * T), hd = (r / T) % H, t = r % T;
        const float *xr = x + b * sb + hd * sh + t * st;
        const float *c = cos_ + b * cs_b + t * D, *s = sin_ + b * cs_b + t * D;
        float *o = out + r * D;
        if (!backward) {
            for (int64_t i = 0; i < h; i++) o[i] = xr[i] * c[i] - xr[i + h] * s[i];
            for (int64_t i = h; i < D; i++) o[i] = xr[i] * c[i] + xr[i - h] * s[i];
        } else {
            for (int64_t i = 0; i < h; i++) o[i] = xr[i] * c[i] + xr[i + h] * s[i + h];
            for (int64_t i = h; i < D; i++) o[i] = xr[i] * c[i] - xr[i - h] * s[i - h];
        }
    }
}

/* Cross-entropy rows, in place: for each row i of z (rows x V) with target t = tgt[i],
 *   m = max_j z[j];  e[j] = exp(z[j] - m);  s = sum_j e[j]
 *   lse[i] = m + log(s);  zt[i] = z[t] (before the overwrite)
 *   z[j] = e[j] / s - (j == t)                      (the gradient of the row's loss)
 * The row (V floats) stays in L2 across the three passes; the sum is in double. */
LT_API void lt_xent_rows_f32(float *z, const int64_t *tgt, float *lse, float *zt, int64_t rows, int64_t V,
                             int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && rows > 1)
    for (int64_t i = 0; i < rows; i++) {
        float *zi = z + i * V;
        const int64_t t = tgt[i];
        float m = zi[0];
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < V; j++) m = zi[j] > m ? zi[j] : m;
        zt[i] = zi[t];
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < V; j++) {
            const float e = lt_exp(zi[j] - m);
            zi[j] = e;
            s += (double)e;
        }
        lse[i] = m + (float)log(s);
        const float inv = (float)(1.0 / s);
#pragma omp simd
        for (int64_t j = 0; j < V; j++) zi[j] *= inv;
        zi[t] -= 1.0f;
    }
}

/* ------------------------------------------------------------------------------------ */
/* bf16 twins: bf16 in and out, fp32 math inside, one rounding to nearest even per output
 * (c10's rounding; NaN as its quiet NaN). RMSNorm rounds x * r before the scale, as the
 * spec does; rstd and the cross-entropy rows stay fp32. */

static inline float lt_bf(uint16_t u) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)u << 16};
    return v.f;
}

static inline uint16_t lt_to_bf(float f) {
    union { float f; uint32_t u; } v = {.f = f};
    if (f != f) return 0x7fc0;
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

LT_API void lt_rmsnorm_fwd_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, float *rstd, int64_t rows,
                                int64_t C, float eps, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && rows * C >= 65536)
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *xi = x + i * C;
        uint16_t *yi = y + i * C;
        double ss = 0.0;
#pragma omp simd reduction(+ : ss)
        for (int64_t c = 0; c < C; c++) ss += (double)lt_bf(xi[c]) * (double)lt_bf(xi[c]);
        float r = (float)(1.0 / sqrt(ss / (double)C + (double)eps));
        rstd[i] = r;
#pragma omp simd
        for (int64_t c = 0; c < C; c++) yi[c] = lt_to_bf(lt_bf(w[c]) * lt_bf(lt_to_bf(lt_bf(xi[c]) * r)));
    }
}

LT_API void lt_rmsnorm_bwd_bf16(const uint16_t *x, const uint16_t *w, const float *rstd, const uint16_t *dy,
                                uint16_t *dx, int64_t rows, int64_t C, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && rows * C >= 65536)
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *xi = x + i * C, *dyi = dy + i * C;
        uint16_t *dxi = dx + i * C;
        const float r = rstd[i];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < C; c++) dot += lt_bf(dyi[c]) * lt_bf(w[c]) * (lt_bf(xi[c]) * r);
        const float m = dot / (float)C;
#pragma omp simd
        for (int64_t c = 0; c < C; c++)
            dxi[c] = lt_to_bf(r * (lt_bf(dyi[c]) * lt_bf(w[c]) - (lt_bf(xi[c]) * r) * m));
    }
}

LT_API void lt_swiglu_fwd_bf16(const uint16_t *restrict a, const uint16_t *restrict b, uint16_t *restrict h,
                               int64_t n, int nt) {
    const int64_t chunks = (n + LT_CHUNK - 1) / LT_CHUNK;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && chunks > 1)
    for (int64_t k = 0; k < chunks; k++) {
        const int64_t lo = k * LT_CHUNK, hi = lo + LT_CHUNK < n ? lo + LT_CHUNK : n;
#pragma omp simd
        for (int64_t j = lo; j < hi; j++) {
            const float aj = lt_bf(a[j]);
            const float s = 1.0f / (1.0f + lt_exp(-aj));
            h[j] = lt_to_bf((aj * s) * lt_bf(b[j]));
        }
    }
}

LT_API void lt_swiglu_bwd_bf16(const uint16_t *restrict a, const uint16_t *restrict b, const uint16_t *restrict dh,
                               uint16_t *restrict da, uint16_t *restrict db, int64_t n, int nt) {
    const int64_t chunks = (n + LT_CHUNK - 1) / LT_CHUNK;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && chunks > 1)
    for (int64_t k = 0; k < chunks; k++) {
        const int64_t lo = k * LT_CHUNK, hi = lo + LT_CHUNK < n ? lo + LT_CHUNK : n;
#pragma omp simd
        for (int64_t j = lo; j < hi; j++) {
            const float aj = lt_bf(a[j]), g = lt_bf(dh[j]);
            const float s = 1.0f / (1.0f + lt_exp(-aj));
            const float ds = s * (1.0f + aj * (1.0f - s));
            da[j] = lt_to_bf(g * lt_bf(b[j]) * ds);
            db[j] = lt_to_bf(g * (aj * s));
        }
    }
}

LT_API void lt_rope_bf16(const uint16_t *x, int64_t sb, int64_t sh, int64_t st, uint16_t *out,
                         const uint16_t *cos_, const uint16_t *sin_, int64_t cs_b, int64_t B, int64_t H,
                         int64_t T, int64_t D, int backward, int nt) {
    const int64_t h = D / 2, rows = B * H * T;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && rows * D >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t b = r / (H * T), hd = (r / T) % H, t = r % T;
        const uint16_t *xr = x + b * sb + hd * sh + t * st;
        const uint16_t *c = cos_ + b * cs_b + t * D, *s = sin_ + b * cs_b + t * D;
        uint16_t *o = out + r * D;
        const float sign = backward ? -1.0f : 1.0f; /* backward: the transposed rotation */
        for (int64_t i = 0; i < h; i++)
            o[i] = lt_to_bf(lt_bf(xr[i]) * lt_bf(c[i]) - sign * lt_bf(xr[i + h]) * lt_bf(s[backward ? i + h : i]));
        for (int64_t i = h; i < D; i++)
            o[i] = lt_to_bf(lt_bf(xr[i]) * lt_bf(c[i]) + sign * lt_bf(xr[i - h]) * lt_bf(s[backward ? i - h : i]));
    }
}

/* The cross-entropy rows of bf16 logits: z (rows, V) bf16 is overwritten with
 * bf16(softmax(z) - onehot(t)); lse and z[t] in fp32. The same fp32 math as lt_xent_rows_f32
 * on the (exact) fp32 values of z, exp recomputed in the last pass instead of stored, so the
 * result equals the fp32 kernel's rounded once to bf16, with no fp32 copy of the logits. */
LT_API void lt_xent_rows_bf16(uint16_t *z, const int64_t *tgt, float *lse, float *zt, int64_t rows, int64_t V,
                              int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && rows > 1)
    for (int64_t i = 0; i < rows; i++) {
        uint16_t *zi = z + i * V;
        const int64_t t = tgt[i];
        float m = lt_bf(zi[0]);
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < V; j++) m = lt_bf(zi[j]) > m ? lt_bf(zi[j]) : m;
        zt[i] = lt_bf(zi[t]);
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < V; j++) s += (double)lt_exp(lt_bf(zi[j]) - m);
        lse[i] = m + (float)log(s);
        const float inv = (float)(1.0 / s);
        const float e_t = lt_exp(lt_bf(zi[t]) - m) * inv;
#pragma omp simd
        for (int64_t j = 0; j < V; j++) zi[j] = lt_to_bf(lt_exp(lt_bf(zi[j]) - m) * inv);
        zi[t] = lt_to_bf(e_t - 1.0f);
    }
}
