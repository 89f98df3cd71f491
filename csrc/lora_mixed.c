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
 * dB^T = tgrad(xa, g, s).  Threads: OpenMP over rows (down, up) or column chunks (tgrad).
 */
#include <stdint.h>
#include <string.h>

#define LT_API __attribute__((visibility("default")))
#define CHUNK 512

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

/* out[m,k] = sum_i x[m,i] * W[k,i]: each row converted a chunk at a time, dotted with W's rows */
LT_API void lt_lora_down_bf16(const uint16_t *x, int64_t M, int64_t n, const float *W, int64_t r,
                              float *out, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && M * n * r >= (1 << 20))
    for (int64_t m = 0; m < M; m++) {
        float xf[CHUNK];
        float *o = out + m * r;
        for (int64_t k = 0; k < r; k++) o[k] = 0.0f;
        for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
            const int64_t len = n - i0 < CHUNK ? n - i0 : CHUNK;
            const uint16_t *xm = x + m * n + i0;
#pragma omp simd
            for (int64_t i = 0; i < len; i++) xf[i] = lt_bf(xm[i]);
            for (int64_t k = 0; k < r; k++) {
                const float *wk = W + k * n + i0;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t i = 0; i < len; i++) acc += xf[i] * wk[i];
                o[k] += acc;
            }
        }
    }
}

/* y_out[m,j] = bf16(y_in[m,j] + s * sum_k u[m,k] * V[k,j]) (y_out may be y_in) */
LT_API void lt_lora_up_bf16(const uint16_t *y_in, uint16_t *y_out, int64_t M, int64_t n, const float *u,
                            int64_t r, const float *V, float s, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && M * n * r >= (1 << 20))
    for (int64_t m = 0; m < M; m++) {
        float acc[CHUNK];
        const float *um = u + m * r;
        for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
            const int64_t len = n - j0 < CHUNK ? n - j0 : CHUNK;
            for (int64_t j = 0; j < len; j++) acc[j] = 0.0f;
            for (int64_t k = 0; k < r; k++) {
                const float c = s * um[k];
                const float *vk = V + k * n + j0;
#pragma omp simd
                for (int64_t j = 0; j < len; j++) acc[j] += c * vk[j];
            }
            const uint16_t *yi = y_in + m * n + j0;
            uint16_t *yo = y_out + m * n + j0;
#pragma omp simd
            for (int64_t j = 0; j < len; j++) yo[j] = lt_to_bf(lt_bf(yi[j]) + acc[j]);
        }
    }
}

/* out[k,j] = s * sum_m u[m,k] * x[m,j]: each thread owns column chunks and walks every row */
#define TCHUNK 128
LT_API void lt_lora_tgrad_bf16(const float *u, int64_t M, int64_t r, const uint16_t *x, int64_t n, float s,
                               float *out, int nt) {
    const int64_t chunks = (n + TCHUNK - 1) / TCHUNK;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && M * n * r >= (1 << 20))
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t j0 = c * TCHUNK, len = n - j0 < TCHUNK ? n - j0 : TCHUNK;
        float xf[TCHUNK];
        for (int64_t k = 0; k < r; k++) memset(out + k * n + j0, 0, (size_t)len * sizeof(float));
        for (int64_t m = 0; m < M; m++) {
            const uint16_t *xm = x + m * n + j0;
#pragma omp simd
            for (int64_t j = 0; j < len; j++) xf[j] = lt_bf(xm[j]);
            const float *um = u + m * r;
            for (int64_t k = 0; k < r; k++) {
                const float a = um[k];
                float *ok = out + k * n + j0;
#pragma omp simd
                for (int64_t j = 0; j < len; j++) ok[j] += a * xf[j];
            }
        }
        for (int64_t k = 0; k < r; k++) {
            float *ok = out + k * n + j0;
#pragma omp simd
            for (int64_t j = 0; j < len; j++) ok[j] *= s;
        }
    }
}
