/*
 * lora_mixed.c: the LoRA products of bf16 activations with fp32 adapter weights (leantune).
 *
 * On a bf16 base, PEFT runs an fp32 adapter in fp32: x is cast up, the two thin products
 * run in fp32, and the sum is cast back to bf16. In PyTorch that is three full-size casts
 * and two allocations a linear each way. These kernels read the bf16 tensors directly and
 * convert in registers (fp32 math, one rounding to nearest even per bf16 output), so the
 * casts disappear. Loaded with ctypes by quant/lora_mixed.py, whose PyTorch functions are
 * the spec; tests/test_lora_mixed.py compares both with float64.
 *
 *   down    out[m,k]  = sum_i x[m,i] W[k,i]                  x (M,n) bf16, W (r,n) fp32
 *   up      y[m,j]    = bf16(y[m,j] + s sum_k u[m,k] V[k,j])  y (M,n) bf16, u (M,r), V (r,n) fp32
 *   tgrad   out[k,j]  = s sum_m u[m,k] x[m,j]                 u (M,r) fp32, x (M,n) bf16
 *
 * In the fused 4-bit LoRA Function: forward  xa = down(x, A),  y = up(y, xa, B^T, s);
 * backward  gb = down(g, B^T),  dx = up(dx, gb, A, s),  dA = tgrad(gb, x, s),
 * dB^T = tgrad(xa, g, s).  Threads: OpenMP over rows (down, up) or 16-column slices (tgrad).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* a * b + c on the vectors below as one FMA (ISO C mode leaves contraction off) */
#pragma GCC optimize("fp-contract=fast")

#define LT_API __attribute__((visibility("default")))

static inline float lt_bf(uint16_t u) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)u << 16};
    return v.f;
}

static inline uint16_t lt_to_bf(float f) {
    union { float f; uint32_t u; } v = {.f = f};
    if (f != f) return 0x7fc0;
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
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

/* Register-blocked products on 16-lane float vectors (GCC vector extensions: one zmm with
 * AVX-512, two ymm with AVX2, scalar code otherwise). KB independent accumulators keep the FMA
 * units busy instead of waiting on one chain (the straight loops were latency-bound: 0.33 ms
 * for x (1024, 576) times A^T (576, 16) on a 2-core EPYC, where the FMAs need 0.05 ms). */
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
#if defined(__AVX512F__)
#define KB 16
#else
#define KB 8
#endif

static inline v16f ld16(const float *p) { v16f v; memcpy(&v, p, sizeof v); return v; }
static inline void st16(float *p, v16f v) { memcpy(p, &v, sizeof v); }
static inline v16f bcast(float a) { return (v16f){0} + a; }

static inline v16f ldbf16(const uint16_t *p) {
    v16h h;
    memcpy(&h, p, sizeof h);
    v16u w = __builtin_convertvector(h, v16u) << 16;
    v16f f;
    memcpy(&f, &w, sizeof f);
    return f;
}

/* 16 floats to bf16, rounded to nearest even (NaN -> 0x7fc0), as lt_to_bf */
static inline void stbf16(uint16_t *p, v16f f) {
    v16u w;
    memcpy(&w, &f, sizeof w);
    v16u r = (w + 0x7fffu + ((w >> 16) & 1u)) >> 16;
    v16u nan = (v16u)(f != f);
    r = (r & ~nan) | (0x7fc0u & nan);
    v16h h = __builtin_convertvector(r, v16h);
    memcpy(p, &h, sizeof h);
}

static inline float hsum(v16f v) {
    float t = 0.0f;
    for (int l = 0; l < 16; l++) t += v[l];
    return t;
}

/* RB rows of x at a time share each vector of W they are dotted with: W (r x n fp32, 37 KB
 * for n = 576 and r = 16) comes from L2 for every block of rows instead of every row. */
#define RB 4
#define KD 4

/* out[m0 + a, k0 + b] for a < rows, b < kd: xf holds the RB rows converted to fp32 (stride
 * n, rows past ``rows`` zero); a block the compiler keeps in registers when kd is KD */
static inline __attribute__((always_inline)) void down_tile(const float *xf, int rows, int64_t n,
                                                            const float *W, int64_t k0, int kd,
                                                            float *o, int64_t r) {
    const int64_t nv = n & ~(int64_t)15;
    v16f acc[RB][KD];
    for (int a = 0; a < RB; a++)
        for (int b = 0; b < KD; b++) acc[a][b] = (v16f){0};
    for (int64_t i = 0; i < nv; i += 16) {
        v16f xv[RB];
        for (int a = 0; a < RB; a++) xv[a] = ld16(xf + a * n + i);
        for (int b = 0; b < kd; b++) {
            const v16f w = ld16(W + (k0 + b) * n + i);
            for (int a = 0; a < RB; a++) acc[a][b] += xv[a] * w;
        }
    }
    for (int a = 0; a < rows; a++)
        for (int b = 0; b < kd; b++) {
            float t = hsum(acc[a][b]);
            const float *wk = W + (k0 + b) * n, *xa = xf + a * n;
            for (int64_t i = nv; i < n; i++) t += xa[i] * wk[i];
            o[a * r + k0 + b] = t;
        }
}

/* out[m,k] = sum_i x[m,i] * W[k,i]: RB rows of x (converted once) against KD rows of W */
LT_API void lt_lora_down_bf16(const uint16_t *x, int64_t M, int64_t n, const float *W, int64_t r,
                              float *out, int nt) {
    const int64_t blocks = (M + RB - 1) / RB;
#pragma omp parallel num_threads(nt) if (nt > 1 && M * n * r >= (1 << 20))
    {
        float *xf = (float *)malloc((size_t)(RB * n) * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; blk++) {
            const int64_t m0 = blk * RB;
            const int rows = M - m0 < RB ? (int)(M - m0) : RB;
            if (!xf) {  /* no buffer: the plain sums */
                for (int64_t m = m0; m < m0 + rows; m++)
                    for (int64_t k = 0; k < r; k++) {
                        float t = 0.0f;
                        for (int64_t i = 0; i < n; i++) t += lt_bf(x[m * n + i]) * W[k * n + i];
                        out[m * r + k] = t;
                    }
                continue;
            }
            for (int a = 0; a < RB; a++) {
                float *xa = xf + a * n;
                if (a < rows) {
                    const uint16_t *xm = x + (m0 + a) * n;
                    for (int64_t i = 0; i < n; i++) xa[i] = lt_bf(xm[i]);
                } else {
                    memset(xa, 0, (size_t)n * sizeof(float));
                }
            }
            int64_t k0 = 0;
            for (; k0 + KD <= r; k0 += KD) down_tile(xf, rows, n, W, k0, KD, out + m0 * r, r);
            if (k0 < r) down_tile(xf, rows, n, W, k0, (int)(r - k0), out + m0 * r, r);
        }
        free(xf);
    }
}

/* y_out[m,j] = bf16(y_in[m,j] + s * sum_k u[m,k] * V[k,j]) (y_out may be y_in): RB rows at a
 * time, two 16-column vectors each, so that each vector of V serves RB rows */
LT_API void lt_lora_up_bf16(const uint16_t *y_in, uint16_t *y_out, int64_t M, int64_t n, const float *u,
                            int64_t r, const float *V, float s, int nt) {
    const int64_t blocks = (M + RB - 1) / RB, n2 = n & ~(int64_t)31;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && M * n * r >= (1 << 20))
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t m0 = blk * RB;
        const int rows = M - m0 < RB ? (int)(M - m0) : RB;
        if (rows < RB) {  /* the last rows: one at a time */
            for (int64_t m = m0; m < M; m++) {
                const float *um = u + m * r;
                for (int64_t j = 0; j < n; j++) {
                    float t = 0.0f;
                    for (int64_t k = 0; k < r; k++) t += s * um[k] * V[k * n + j];
                    y_out[m * n + j] = lt_to_bf(lt_bf(y_in[m * n + j]) + t);
                }
            }
            continue;
        }
        int64_t j = 0;
        for (; j < n2; j += 32) {
            v16f acc[RB][2];
            for (int a = 0; a < RB; a++) acc[a][0] = acc[a][1] = (v16f){0};
            for (int64_t k = 0; k < r; k++) {
                const v16f v0 = ld16(V + k * n + j), v1 = ld16(V + k * n + j + 16);
                for (int a = 0; a < RB; a++) {
                    const v16f c = bcast(s * u[(m0 + a) * r + k]);
                    acc[a][0] += c * v0;
                    acc[a][1] += c * v1;
                }
            }
            for (int a = 0; a < RB; a++) {
                const int64_t o = (m0 + a) * n + j;
                stbf16(y_out + o, ldbf16(y_in + o) + acc[a][0]);
                stbf16(y_out + o + 16, ldbf16(y_in + o + 16) + acc[a][1]);
            }
        }
        for (int a = 0; a < RB; a++) {  /* the last n % 32 columns */
            const float *um = u + (m0 + a) * r;
            for (int64_t jj = j; jj < n; jj++) {
                float t = 0.0f;
                for (int64_t k = 0; k < r; k++) t += s * um[k] * V[k * n + jj];
                y_out[(m0 + a) * n + jj] = lt_to_bf(lt_bf(y_in[(m0 + a) * n + jj]) + t);
            }
        }
    }
}

/* rows k0.. (kb of them) of out's 16-column slice at j, summed over every row m in registers
 * (unrolled when kb is the constant KB) */
static inline __attribute__((always_inline)) void tgrad_block(const float *u, int64_t M, int64_t r,
                                                              const uint16_t *x, int64_t n, float s,
                                                              float *out, int64_t j, int64_t k0, int kb) {
    v16f acc[KB];
    for (int kk = 0; kk < kb; kk++) acc[kk] = (v16f){0};
    for (int64_t m = 0; m < M; m++) {
        const v16f xv = ldbf16(x + m * n + j);
        const float *um = u + m * r + k0;
        for (int kk = 0; kk < kb; kk++) acc[kk] += bcast(um[kk]) * xv;
    }
    for (int kk = 0; kk < kb; kk++) st16(out + (k0 + kk) * n + j, acc[kk] * bcast(s));
}

/* out[k,j] = s * sum_m u[m,k] * x[m,j]: each thread owns 16-column slices; KB rows of out
 * accumulate in registers over every row m */
LT_API void lt_lora_tgrad_bf16(const float *u, int64_t M, int64_t r, const uint16_t *x, int64_t n, float s,
                               float *out, int nt) {
    const int64_t slices = n / 16, nv = slices * 16;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && M * n * r >= (1 << 20))
    for (int64_t c = 0; c < slices; c++) {
        int64_t k0 = 0;
        for (; k0 + KB <= r; k0 += KB) tgrad_block(u, M, r, x, n, s, out, c * 16, k0, KB);
        if (k0 < r) tgrad_block(u, M, r, x, n, s, out, c * 16, k0, (int)(r - k0));
    }
    for (int64_t k = 0; k < r; k++) {  /* the last n % 16 columns */
        for (int64_t jj = nv; jj < n; jj++) {
            float t = 0.0f;
            for (int64_t m = 0; m < M; m++) t += u[m * r + k] * lt_bf(x[m * n + jj]);
            out[k * n + jj] = s * t;
        }
    }
}
