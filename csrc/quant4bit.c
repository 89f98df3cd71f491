/*
 * quant4bit.c: CPU kernels for 4-bit NF4 / FP4 blockwise quantization (leantune).
 *
 * Plain C ABI over raw pointers, loaded with ctypes by quant/cpu_kernels.py, which
 * compiles this file on first use. The PyTorch reference in quant/functional.py is the
 * spec; every kernel here is bit-exact against it (the GEMVs excepted: their weights are
 * bit-exact, their dot products are summed in another order).
 *
 * Layout (bitsandbytes' serialization, see quant/state.py):
 *
 *   packed  uint8 [ceil(numel / 2)]   two 4-bit codes a byte; element 2j in the HIGH
 *                                     nibble, element 2j + 1 in the low nibble
 *   absmax  fp32  [ceil(numel / bs)]  one scale per block of bs consecutive elements
 *                                     (the last block may be short)
 *   code    fp32  [16]                the NF4 / FP4 value table, index = 4-bit code
 *
 *   nibble(i) = (packed[i / 2] >> (i % 2 ? 0 : 4)) & 15
 *   w[i]      = code[nibble(i)] * absmax[i / bs]                    (one fp32 multiply)
 *
 * Because w[i] is a single fp32 product, a per-block table lut[c] = code[c] * absmax[b]
 * gives exactly the same values; all dequantizing kernels decode through such a table.
 *
 * Quantizing one block (bitsandbytes' CPU path, `quantize_4bit` "default" kernel):
 *
 *   amax = max_i |x[i]|                                   (NaN if any x[i] is NaN)
 *   full block:  absmax[b] = amax,                 s[i] = x[i] * (1.0f / max(amax, 1e-38f))
 *   tail block:  absmax[b] = max(amax, 1e-38f),    s[i] = x[i] / absmax[b]
 *                (the tail is the short last block when numel % bs != 0; it is the
 *                 whole tensor when numel < bs)
 *   q[i]    = #{ j < 15 : !(s[i] <= bounds[j]) }      (torch.bucketize, right=False;
 *                                                        NaN lands past the last bound)
 *   code[i] = order[q[i]]
 *
 * where bounds[j] = (code[order[j]] + code[order[j + 1]]) / 2 over the sorted table and
 * order = argsort(code); both are computed by the Python wrapper with the same torch
 * expressions bitsandbytes uses, so ties and the two zeros of FP4 resolve identically.
 * The clamp of s to [-1, 1] that the reference applies does not change q (every bound
 * lies strictly inside (-1, 1)), so it is not done here. When numel is odd the low
 * nibble of the last byte holds the code of s = 0 (the reference pads with a zero).
 *
 * ISA: the AVX2 paths are compiled when the loader passes -mavx2 -mfma -mf16c (it does
 * so only when the CPU has them), the AVX-512 decode loop when it also passes -mavx512f
 * -mavx512bw; otherwise the scalar loops below are the whole kernel.
 * Threads: OpenMP with an explicit thread count from the caller (torch.get_num_threads());
 * loaded into a process that already holds torch's libgomp, so both share one pool.
 */
#define _DEFAULT_SOURCE /* madvise */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef __linux__
#include <sys/mman.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LT_AVX2 1
#else
#define LT_AVX2 0
#endif

/* AVX-512 only changes the decode loop (one 16-entry permute instead of two 8-entry ones
 * and a blend); everything else runs the AVX2 code. */
#if LT_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__)
#define LT_AVX512 1
#else
#define LT_AVX512 0
#endif

#define LT_EXPORT __attribute__((visibility("default")))

/* Output element types of the dequantizing kernels. */
enum { LT_F32 = 0, LT_BF16 = 1, LT_F16 = 2 };

/* Work below this many elements per thread is not worth waking another thread for. */
#define LT_MIN_ELEMS_PER_THREAD (1 << 15)

static int lt_threads_for(int64_t work, int64_t min_per_thread, int nthreads)
{
    int64_t nt = work / min_per_thread;
    if (nt > nthreads) nt = nthreads;
    return nt < 1 ? 1 : (int)nt;
}

/* ------------------------------------------------------------------------------------ */
/* Scalar conversions, bit-exact with c10::BFloat16 / c10::Half (round to nearest even). */

static inline uint32_t lt_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float lt_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t lt_f32_to_bf16(float f)
{
    if (f != f) return 0x7fc0; /* c10 maps every NaN to this quiet NaN */
    uint32_t u = lt_f32_bits(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* fp16_ieee_from_fp32_value from the FP16 library, which c10::Half uses. */
static inline uint16_t lt_f32_to_f16(float f)
{
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = lt_f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xff000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = lt_bits_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = lt_f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007c00u;
    const uint32_t mantissa_bits = bits & 0x00000fffu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}

/* ------------------------------------------------------------------------------------ */
/* AVX2 helpers. */

#if LT_AVX2
/* 16-entry float table lookup: table[idx] for 8 int32 indices in 0..15.
 * permutevar8x32 uses the low 3 bits; bit 3 picks the upper half (via the sign bit). */
static inline __m256 lt_lut16_ps(__m256i idx, __m256 table_lo, __m256 table_hi)
{
    __m256 from_lo = _mm256_permutevar8x32_ps(table_lo, idx);
    __m256 from_hi = _mm256_permutevar8x32_ps(table_hi, idx);
    return _mm256_blendv_ps(from_lo, from_hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* 16 packed bytes -> the 32 nibbles in element order (high nibble first), as 32 bytes. */
static inline void lt_unpack32(const uint8_t *p, __m128i *nib_0_15, __m128i *nib_16_31)
{
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    __m128i lo = _mm_and_si128(bytes, mask);
    *nib_0_15 = _mm_unpacklo_epi8(hi, lo);
    *nib_16_31 = _mm_unpackhi_epi8(hi, lo);
}

/* 8 fp32 -> 8 bf16 (round to nearest even, NaN -> 0x7fc0) in the low 16 bits of int32s. */
static inline __m256i lt_cvt_bf16_epi32(__m256 v)
{
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m256 is_nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r),
                                                _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)), is_nan));
}

/* Store 8 floats at out + t in the output type `kind`. */
static inline void lt_store8(void *out, int64_t t, __m256 v, int kind)
{
    if (kind == LT_F32) {
        _mm256_storeu_ps((float *)out + t, v);
    } else if (kind == LT_BF16) {
        __m256i r = lt_cvt_bf16_epi32(v);
        __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)out + t), h);
    } else {
        __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)((uint16_t *)out + t), h);
    }
}
#endif

#if LT_AVX512
/* Store 16 floats at out + t in the output type `kind`. */
static inline void lt_store16(void *out, int64_t t, __m512 v, int kind)
{
    if (kind == LT_F32) {
        _mm512_storeu_ps((float *)out + t, v);
    } else {
        lt_store8(out, t, _mm512_castps512_ps256(v), kind);
        lt_store8(out, t + 8, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)), kind);
    }
}
#endif

static inline void lt_store1(void *out, int64_t t, float v, int kind)
{
    if (kind == LT_F32)
        ((float *)out)[t] = v;
    else if (kind == LT_BF16)
        ((uint16_t *)out)[t] = lt_f32_to_bf16(v);
    else
        ((uint16_t *)out)[t] = lt_f32_to_f16(v);
}

#if LT_AVX2
/* One block's table lut[c] = code[c] * scale in registers, and 32 weights decoded through
 * it into LT_NV vectors of LT_VW floats (AVX-512: 2 x 16 by permute; AVX2: 4 x 8 by blend).
 * Every dequantizing loop below is built on these two. */
#if LT_AVX512
#define LT_NV 2
#define LT_VW 16
typedef __m512 lt_vec;
typedef struct { __m512 v; } lt_table;
#define lt_vfmadd _mm512_fmadd_ps
#define lt_vload _mm512_loadu_ps
#define lt_vzero _mm512_setzero_ps
#else
#define LT_NV 4
#define LT_VW 8
typedef __m256 lt_vec;
typedef struct { __m256 lo, hi; } lt_table;
#define lt_vfmadd _mm256_fmadd_ps
#define lt_vload _mm256_loadu_ps
#define lt_vzero _mm256_setzero_ps
#endif

static inline __attribute__((always_inline)) lt_table lt_make_table(const float *code, float scale)
{
    lt_table tb;
#if LT_AVX512
    tb.v = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
#else
    const __m256 vscale = _mm256_set1_ps(scale);
    tb.lo = _mm256_mul_ps(_mm256_loadu_ps(code), vscale);
    tb.hi = _mm256_mul_ps(_mm256_loadu_ps(code + 8), vscale);
#endif
    return tb;
}

static inline __attribute__((always_inline)) void lt_decode32(const uint8_t *p, lt_table tb, lt_vec w[LT_NV])
{
    __m128i nib_a, nib_b;
    lt_unpack32(p, &nib_a, &nib_b);
#if LT_AVX512
    w[0] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nib_a), tb.v);
    w[1] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nib_b), tb.v);
#else
    w[0] = lt_lut16_ps(_mm256_cvtepu8_epi32(nib_a), tb.lo, tb.hi);
    w[1] = lt_lut16_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(nib_a, nib_a)), tb.lo, tb.hi);
    w[2] = lt_lut16_ps(_mm256_cvtepu8_epi32(nib_b), tb.lo, tb.hi);
    w[3] = lt_lut16_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(nib_b, nib_b)), tb.lo, tb.hi);
#endif
}

/* Store one decoded vector at out + t in the output type `kind`. */
static inline __attribute__((always_inline)) void lt_store_vec(void *out, int64_t t, lt_vec v, int kind)
{
#if LT_AVX512
    lt_store16(out, t, v, kind);
#else
    lt_store8(out, t, v, kind);
#endif
}
#endif

/* ------------------------------------------------------------------------------------ */
/* Dequantize. */

/*
 * One block segment: elements [i0, i0 + n) of the flat tensor, all in one block with scale
 * `scale`. Writes out[t] = code[nibble(i0 + t)] * scale. The vector loops decode through
 * the scaled table code[c] * scale (the same fp32 products, so the same bits).
 */
static inline __attribute__((always_inline)) void
lt_dequant_segment(const uint8_t *packed, int64_t i0, int64_t n, const float *code, float scale,
                   void *out, int kind)
{
    int64_t t = 0;
    if ((i0 & 1) && n > 0) { /* odd start: the low nibble of its byte */
        lt_store1(out, 0, code[packed[i0 >> 1] & 15] * scale, kind);
        t = 1;
    }
    const uint8_t *p = packed + ((i0 + t) >> 1); /* element i0 + t is the high nibble of *p */
#if LT_AVX2
    if (t + 32 <= n) {
        const lt_table tb = lt_make_table(code, scale);
        for (; t + 32 <= n; t += 32, p += 16) {
            lt_vec w[LT_NV];
            lt_decode32(p, tb, w);
            for (int k = 0; k < LT_NV; k++) lt_store_vec(out, t + k * LT_VW, w[k], kind);
        }
    }
#endif
    for (; t + 2 <= n; t += 2, p++) {
        lt_store1(out, t, code[*p >> 4] * scale, kind);
        lt_store1(out, t + 1, code[*p & 15] * scale, kind);
    }
    if (t < n) lt_store1(out, t, code[*p >> 4] * scale, kind);
}

#if LT_AVX2
/* Whole blocks, blocksize a multiple of 32, starting at block `block`: the tight loop
 * behind lt_dequant_range (one scaled table a block, 32 elements an iteration). */
static inline __attribute__((always_inline)) void
lt_dequant_blocks(const uint8_t *packed, const float *absmax, const float *code, int64_t blocksize,
                  int64_t block, int64_t n_blocks, void *out, int kind)
{
    const uint8_t *p = packed + block * blocksize / 2;
    int64_t t = 0;
    for (int64_t b = 0; b < n_blocks; b++) {
        const lt_table tb = lt_make_table(code, absmax[block + b]);
        for (int64_t j = 0; j < blocksize; j += 32, t += 32, p += 16) {
            lt_vec w[LT_NV];
            lt_decode32(p, tb, w);
            for (int k = 0; k < LT_NV; k++) lt_store_vec(out, t + k * LT_VW, w[k], kind);
        }
    }
}
#endif

/* Serial: elements [i0, i0 + n) of the flat tensor into out[0 .. n), block by block. */
static inline __attribute__((always_inline)) void
lt_dequant_range(const uint8_t *packed, const float *absmax, const float *code, int64_t blocksize,
                 int64_t i0, int64_t n, void *out, int kind)
{
    const int64_t elem_size = kind == LT_F32 ? 4 : 2;
    int64_t block = i0 / blocksize;
    int64_t block_end = (block + 1) * blocksize - i0; /* where this block ends, relative to i0 */
    int64_t t0 = 0;
#if LT_AVX2
    if (blocksize % 32 == 0 && i0 % blocksize == 0 && n >= blocksize) { /* the common case */
        const int64_t n_blocks = n / blocksize;
        lt_dequant_blocks(packed, absmax, code, blocksize, block, n_blocks, out, kind);
        t0 = n_blocks * blocksize;
        block += n_blocks;
        block_end += n_blocks * blocksize;
    }
#endif
    for (int64_t t = t0; t < n; block++, block_end += blocksize) {
        const int64_t seg = (block_end < n ? block_end : n) - t;
        lt_dequant_segment(packed, i0 + t, seg, code, absmax[block], (char *)out + t * elem_size, kind);
        t += seg;
    }
}

static void lt_dequant_parallel(const uint8_t *packed, const float *absmax, const float *code,
                                int64_t blocksize, int64_t numel, void *out, int kind, int nthreads)
{
    const int nt = lt_threads_for(numel, LT_MIN_ELEMS_PER_THREAD, nthreads);
    (void)nt; /* unused without OpenMP */
    const int64_t elem_size = kind == LT_F32 ? 4 : 2;
    /* Contiguous chunks, cut at multiples of 64 elements (whole cache lines of output).
     * (Non-temporal stores were tried for outputs beyond the caches: no gain here.) */
    const int64_t chunk = ((numel + nt - 1) / nt + 63) / 64 * 64;
#pragma omp parallel for num_threads(nt) schedule(static, 1) if (nt > 1)
    for (int tid = 0; tid < nt; tid++) {
        int64_t begin = (int64_t)tid * chunk;
        int64_t end = begin + chunk < numel ? begin + chunk : numel;
        if (begin >= end) continue;
        void *chunk_out = (char *)out + begin * elem_size;
        const int64_t n = end - begin;
        if (kind == LT_F32)
            lt_dequant_range(packed, absmax, code, blocksize, begin, n, chunk_out, LT_F32);
        else if (kind == LT_BF16)
            lt_dequant_range(packed, absmax, code, blocksize, begin, n, chunk_out, LT_BF16);
        else
            lt_dequant_range(packed, absmax, code, blocksize, begin, n, chunk_out, LT_F16);
    }
}

/*
 * out[i] = code[nibble(i)] * absmax[i / blocksize] for i in [0, numel), as fp32 / bf16 / fp16.
 */
LT_EXPORT void lt_dequant4_f32(const uint8_t *packed, const float *absmax, const float *code,
                               int64_t blocksize, int64_t numel, float *out, int nthreads)
{
    lt_dequant_parallel(packed, absmax, code, blocksize, numel, out, LT_F32, nthreads);
}

LT_EXPORT void lt_dequant4_bf16(const uint8_t *packed, const float *absmax, const float *code,
                                int64_t blocksize, int64_t numel, uint16_t *out, int nthreads)
{
    lt_dequant_parallel(packed, absmax, code, blocksize, numel, out, LT_BF16, nthreads);
}

LT_EXPORT void lt_dequant4_f16(const uint8_t *packed, const float *absmax, const float *code,
                               int64_t blocksize, int64_t numel, uint16_t *out, int nthreads)
{
    lt_dequant_parallel(packed, absmax, code, blocksize, numel, out, LT_F16, nthreads);
}

/*
 * A tile of the matrix W [rows, cols] (row-major, flat index r * cols + c) to fp32 or bf16:
 *   out[r * ld_out + c] = W[row0 + r, col0 + c]   for r < n_rows, c < n_cols.
 * Used by the tiled linear: row tiles (n_cols == cols) for y = x @ W^T, column tiles for
 * y = x @ W. Threads split the rows. The bf16 tile rounds the fp32 products to nearest even.
 */
static void lt_dequant_tile(const uint8_t *packed, const float *absmax, const float *code,
                            int64_t blocksize, int64_t cols, int64_t row0, int64_t n_rows,
                            int64_t col0, int64_t n_cols, void *out, int64_t ld_out, int kind,
                            int nthreads)
{
    const int nt = lt_threads_for(n_rows * n_cols, LT_MIN_ELEMS_PER_THREAD / 2,
                                  (int64_t)nthreads < n_rows ? nthreads : (int)n_rows);
    const int64_t elem_size = kind == LT_F32 ? 4 : 2;
    (void)nt; /* unused without OpenMP */
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t r = 0; r < n_rows; r++) {
        void *row_out = (char *)out + r * ld_out * elem_size;
        if (kind == LT_F32)
            lt_dequant_range(packed, absmax, code, blocksize, (row0 + r) * cols + col0, n_cols, row_out, LT_F32);
        else
            lt_dequant_range(packed, absmax, code, blocksize, (row0 + r) * cols + col0, n_cols, row_out, LT_BF16);
    }
}

LT_EXPORT void lt_dequant4_tile_f32(const uint8_t *packed, const float *absmax, const float *code,
                                    int64_t blocksize, int64_t cols,
                                    int64_t row0, int64_t n_rows, int64_t col0, int64_t n_cols,
                                    float *out, int64_t ld_out, int nthreads)
{
    lt_dequant_tile(packed, absmax, code, blocksize, cols, row0, n_rows, col0, n_cols, out, ld_out,
                    LT_F32, nthreads);
}

LT_EXPORT void lt_dequant4_tile_bf16(const uint8_t *packed, const float *absmax, const float *code,
                                     int64_t blocksize, int64_t cols,
                                     int64_t row0, int64_t n_rows, int64_t col0, int64_t n_cols,
                                     uint16_t *out, int64_t ld_out, int nthreads)
{
    lt_dequant_tile(packed, absmax, code, blocksize, cols, row0, n_rows, col0, n_cols, out, ld_out,
                    LT_BF16, nthreads);
}

/* ------------------------------------------------------------------------------------ */
/* Quantize. */

/* q = order[#{ j < 15 : !(s <= bounds[j]) }] for one scaled value. */
static inline uint8_t lt_code_of(float s, const float *bounds, const uint8_t *order)
{
    int q = 0;
    for (int j = 0; j < 15; j++) q += !(s <= bounds[j]);
    return order[q];
}

/* max |x[i]| over n values, NaN when any is NaN (as torch.max does). */
static float lt_absmax(const float *x, int64_t n)
{
    float amax = 0.0f;
    int has_nan = 0;
    int64_t i = 0;
#if LT_AVX2
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax0 = _mm256_setzero_ps(), vmax1 = _mm256_setzero_ps();
    __m256 vnan = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask);
        __m256 b = _mm256_and_ps(_mm256_loadu_ps(x + i + 8), abs_mask);
        vmax0 = _mm256_max_ps(vmax0, a);
        vmax1 = _mm256_max_ps(vmax1, b);
        vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_max_ps(vmax0, vmax1));
    for (int l = 0; l < 8; l++) amax = lanes[l] > amax ? lanes[l] : amax;
    has_nan = _mm256_movemask_ps(vnan) != 0;
#endif
    for (; i < n; i++) {
        float a = fabsf(x[i]);
        if (a != a) has_nan = 1;
        amax = a > amax ? a : amax;
    }
    return has_nan ? NAN : amax;
}

#if LT_AVX2
/* Codes of 8 scaled values as int32 (see lt_code_of). */
static inline __m256i lt_codes8(__m256 s, const __m256 *bounds, __m256 order_lo, __m256 order_hi)
{
    __m256i q = _mm256_setzero_si256();
    for (int j = 0; j < 15; j++) /* the compare mask is -1 where s > bound (or NaN) */
        q = _mm256_sub_epi32(q, _mm256_castps_si256(_mm256_cmp_ps(s, bounds[j], _CMP_NLE_UQ)));
    return _mm256_castps_si256(lt_lut16_ps(q, order_lo, order_hi));
}

/* 16 codes (int32, element order) -> 8 packed bytes, element 2j in the high nibble. */
static inline void lt_pack16(__m256i c_0_7, __m256i c_8_15, uint8_t *dst)
{
    __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(c_0_7, c_8_15), 0xd8); /* 16 x i16 */
    __m128i c8 = _mm_packus_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
    /* each 16-bit lane is c_even | c_odd << 8; make it c_even << 4 | c_odd */
    __m128i even = _mm_and_si128(_mm_slli_epi16(c8, 4), _mm_set1_epi16(0x00f0));
    __m128i odd = _mm_srli_epi16(c8, 8);
    __m128i bytes = _mm_packus_epi16(_mm_or_si128(even, odd), _mm_setzero_si128());
    _mm_storel_epi64((__m128i *)dst, bytes);
}
#endif

/*
 * One block of n values starting at an even flat index (so it starts a byte): writes the
 * block's absmax and its ceil(n / 2) bytes. `is_tail` selects the tail-block formulas.
 */
static void lt_quant_block(const float *x, int64_t n, int is_tail, const float *bounds,
                           const uint8_t *order, uint8_t *dst, float *absmax_out)
{
    const float amax = lt_absmax(x, n);
    const float clamped = amax < 1e-38f ? 1e-38f : amax; /* NaN stays NaN */
    const float inv = 1.0f / clamped;
    *absmax_out = is_tail ? clamped : amax;
    int64_t i = 0;
#if LT_AVX2
    __m256 vb[15];
    for (int j = 0; j < 15; j++) vb[j] = _mm256_set1_ps(bounds[j]);
    float order_f[16];
    for (int c = 0; c < 16; c++) order_f[c] = lt_bits_f32(order[c]); /* ints carried in floats */
    const __m256 order_lo = _mm256_loadu_ps(order_f), order_hi = _mm256_loadu_ps(order_f + 8);
    const __m256 vinv = _mm256_set1_ps(inv), vdiv = _mm256_set1_ps(clamped);
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        if (is_tail) {
            a = _mm256_div_ps(a, vdiv);
            b = _mm256_div_ps(b, vdiv);
        } else {
            a = _mm256_mul_ps(a, vinv);
            b = _mm256_mul_ps(b, vinv);
        }
        lt_pack16(lt_codes8(a, vb, order_lo, order_hi), lt_codes8(b, vb, order_lo, order_hi), dst + i / 2);
    }
#endif
    for (; i < n; i += 2) {
        float s0 = is_tail ? x[i] / clamped : x[i] * inv;
        float s1 = 0.0f; /* the reference pads an odd tensor with one zero */
        if (i + 1 < n) s1 = is_tail ? x[i + 1] / clamped : x[i + 1] * inv;
        dst[i / 2] = (uint8_t)(lt_code_of(s0, bounds, order) << 4 | lt_code_of(s1, bounds, order));
    }
}

/*
 * x fp32 [numel] -> packed uint8 [ceil(numel / 2)], absmax fp32 [ceil(numel / blocksize)].
 * blocksize must be even so that every block starts a byte (threads then never share one).
 * Returns the number of blocks holding a NaN or an Inf (their absmax is not finite); the
 * outputs are still written, as bitsandbytes would write them.
 */
LT_EXPORT int64_t lt_quant4_f32(const float *x, int64_t numel, const float *bounds, const uint8_t *order,
                             int64_t blocksize, uint8_t *packed, float *absmax, int nthreads)
{
    const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
    const int has_tail = numel % blocksize != 0;
    const int nt = lt_threads_for(numel, LT_MIN_ELEMS_PER_THREAD / 4, nthreads);
    (void)nt; /* unused without OpenMP */
    int64_t non_finite = 0;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1) reduction(+ : non_finite)
    for (int64_t b = 0; b < n_blocks; b++) {
        const int64_t begin = b * blocksize;
        const int64_t n = begin + blocksize <= numel ? blocksize : numel - begin;
        const int is_tail = has_tail && b == n_blocks - 1;
        lt_quant_block(x + begin, n, is_tail, bounds, order, packed + begin / 2, absmax + b);
        non_finite += !isfinite(absmax[b]);
    }
    return non_finite;
}

/* ------------------------------------------------------------------------------------ */
/* GEMV straight from the packed codes (small M, e.g. decoding one token). */

/* Horizontal sum of 8 lanes. */
#if LT_AVX2
static inline float lt_hsum(__m256 v)
{
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    return _mm_cvtss_f32(half);
}
#endif

/* y[k] += alpha * w[k] for k < n. */
static inline void lt_axpy(float *y, float alpha, const float *w, int64_t n)
{
    int64_t k = 0;
#if LT_AVX2
    const __m256 va = _mm256_set1_ps(alpha);
    for (; k + 16 <= n; k += 16) {
        _mm256_storeu_ps(y + k, _mm256_fmadd_ps(va, _mm256_loadu_ps(w + k), _mm256_loadu_ps(y + k)));
        _mm256_storeu_ps(y + k + 8, _mm256_fmadd_ps(va, _mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(y + k + 8)));
    }
#endif
    for (; k < n; k++) y[k] += alpha * w[k];
}

/* y[k] += sum_j alpha[j] * w_j[k] for the 4 rows w_j = w + j * ld_w: one load and store of y
 * per 4 FMAs. */
static inline void lt_axpy4(float *y, const float *alpha, const float *w, int64_t ld_w, int64_t n)
{
    const float *w0 = w, *w1 = w + ld_w, *w2 = w + 2 * ld_w, *w3 = w + 3 * ld_w;
    int64_t k = 0;
#if LT_AVX2
    const __m256 a0 = _mm256_set1_ps(alpha[0]), a1 = _mm256_set1_ps(alpha[1]);
    const __m256 a2 = _mm256_set1_ps(alpha[2]), a3 = _mm256_set1_ps(alpha[3]);
    for (; k + 8 <= n; k += 8) {
        __m256 acc = _mm256_loadu_ps(y + k);
        acc = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w0 + k), acc);
        acc = _mm256_fmadd_ps(a1, _mm256_loadu_ps(w1 + k), acc);
        acc = _mm256_fmadd_ps(a2, _mm256_loadu_ps(w2 + k), acc);
        acc = _mm256_fmadd_ps(a3, _mm256_loadu_ps(w3 + k), acc);
        _mm256_storeu_ps(y + k, acc);
    }
#endif
    for (; k < n; k++) y[k] += alpha[0] * w0[k] + alpha[1] * w1[k] + alpha[2] * w2[k] + alpha[3] * w3[k];
}

#if LT_AVX2
/* acc[r][k % 2] += x[r, t + 32-chunk] * w for the 32 weights at p (MR rows of x). */
static inline __attribute__((always_inline)) void
lt_dot32(const float *x, int64_t ld_x, int64_t t, const uint8_t *p, lt_table tb, lt_vec acc[4][2], const int MR)
{
    lt_vec w[LT_NV];
    lt_decode32(p, tb, w);
    for (int r = 0; r < MR; r++) {
        const float *xr = x + r * ld_x + t;
        for (int k = 0; k < LT_NV; k++) acc[r][k & 1] = lt_vfmadd(lt_vload(xr + k * LT_VW), w[k], acc[r][k & 1]);
    }
}
#endif

/*
 * Fused decode + dot of MR (1..4) rows of x with one row segment of W:
 *   dots[j] = sum_{t < n} x[j * ld_x + t] * w[i0 + t],   w[i] = code[nibble(i)] * absmax[i / bs]
 * The weights are decoded into registers (the same fp32 values dequantize writes) and
 * never stored; each decoded vector feeds MR FMAs.
 */
static inline __attribute__((always_inline)) void
lt_dot_codes(const float *x, int64_t ld_x, const uint8_t *packed, const float *absmax, const float *code,
             int64_t blocksize, int64_t i0, int64_t n, float *dots, const int MR)
{
    float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f}; /* the scalar edges of each segment */
#if LT_AVX2
    lt_vec acc[4][2];
    for (int j = 0; j < MR; j++) acc[j][0] = acc[j][1] = lt_vzero();
#endif
    int64_t block = i0 / blocksize;
    int64_t block_end = (block + 1) * blocksize - i0; /* relative to i0 */
    int64_t t0 = 0;
#if LT_AVX2
    if (blocksize % 32 == 0 && i0 % blocksize == 0) { /* whole blocks first: the tight loop */
        const uint8_t *p = packed + i0 / 2;
        const int64_t n_blocks = n / blocksize;
        for (int64_t b = 0; b < n_blocks; b++) {
            const lt_table tb = lt_make_table(code, absmax[block + b]);
            for (int64_t j = 0; j < blocksize; j += 32, t0 += 32, p += 16) lt_dot32(x, ld_x, t0, p, tb, acc, MR);
        }
        block += n_blocks;
        block_end += n_blocks * blocksize;
    }
#endif
    for (int64_t t = t0; t < n; block++, block_end += blocksize) {
        const int64_t end = block_end < n ? block_end : n;
        const float scale = absmax[block];
        if (((i0 + t) & 1) && t < end) { /* odd start: the low nibble of its byte */
            const float w = code[packed[(i0 + t) >> 1] & 15] * scale;
            for (int j = 0; j < MR; j++) tail[j] += x[j * ld_x + t] * w;
            t++;
        }
        const uint8_t *p = packed + ((i0 + t) >> 1);
#if LT_AVX2
        if (t + 32 <= end) {
            const lt_table tb = lt_make_table(code, scale);
            for (; t + 32 <= end; t += 32, p += 16) lt_dot32(x, ld_x, t, p, tb, acc, MR);
        }
#endif
        for (; t + 2 <= end; t += 2, p++) {
            const float w_even = code[*p >> 4] * scale, w_odd = code[*p & 15] * scale;
            for (int j = 0; j < MR; j++) tail[j] += x[j * ld_x + t] * w_even + x[j * ld_x + t + 1] * w_odd;
        }
        if (t < end) {
            const float w = code[*p >> 4] * scale;
            for (int j = 0; j < MR; j++) tail[j] += x[j * ld_x + t] * w;
            t++;
        }
    }
    for (int j = 0; j < MR; j++) {
#if LT_AVX512
        dots[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][0], acc[j][1])) + tail[j];
#elif LT_AVX2
        dots[j] = lt_hsum(_mm256_add_ps(acc[j][0], acc[j][1])) + tail[j];
#else
        dots[j] = tail[j];
#endif
    }
}

/*
 * y = x @ W^T:   x fp32 [M, K] (row stride ld_x), W 4-bit [N, K], y fp32 [M, N] (row stride ld_y)
 *   y[m, n] = sum_k x[m, k] * W[n, k]
 * Threads split the rows n of W; each row is decoded in registers (lt_dot_codes) once per
 * group of 4 rows of x. Returns 0.
 */
LT_EXPORT int lt_gemv4_f32(const float *x, int64_t ld_x, int64_t M,
                           const uint8_t *packed, const float *absmax, const float *code, int64_t blocksize,
                           int64_t N, int64_t K, float *y, int64_t ld_y, int nthreads)
{
    const int nt = lt_threads_for(N * K, LT_MIN_ELEMS_PER_THREAD, nthreads);
    (void)nt; /* unused without OpenMP */
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m += 4) {
            float dots[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            const float *x_m = x + m * ld_x;
            /* dots = x[m:m+4, :] @ W[n, :] */
            switch (M - m >= 4 ? 4 : (int)(M - m)) {
            case 4: lt_dot_codes(x_m, ld_x, packed, absmax, code, blocksize, n * K, K, dots, 4); break;
            case 3: lt_dot_codes(x_m, ld_x, packed, absmax, code, blocksize, n * K, K, dots, 3); break;
            case 2: lt_dot_codes(x_m, ld_x, packed, absmax, code, blocksize, n * K, K, dots, 2); break;
            default: lt_dot_codes(x_m, ld_x, packed, absmax, code, blocksize, n * K, K, dots, 1); break;
            }
            for (int64_t j = 0; j < 4 && m + j < M; j++) y[(m + j) * ld_y + n] = dots[j];
        }
    }
    return 0;
}

/*
 * y = x @ W:   x fp32 [M, N] (row stride ld_x), W 4-bit [N, K], y fp32 [M, K] (row stride ld_y)
 *   y[m, k] = sum_n x[m, n] * W[n, k]
 * Each thread owns a range of columns k0:k1; it walks the rows n of W four at a time,
 * decodes W[n:n+4, k0:k1] into a buffer and adds x[m, n:n+4] @ W[n:n+4, k0:k1] to
 * y[m, k0:k1] (the y slice stays in L1).
 */
#define LT_GEMV_T_COLS 512
#define LT_GEMV_T_ROWS 4
LT_EXPORT int lt_gemv4_t_f32(const float *x, int64_t ld_x, int64_t M,
                             const uint8_t *packed, const float *absmax, const float *code, int64_t blocksize,
                             int64_t N, int64_t K, float *y, int64_t ld_y, int nthreads)
{
    const int64_t n_chunks = (K + LT_GEMV_T_COLS - 1) / LT_GEMV_T_COLS;
    int nt = lt_threads_for(N * K, LT_MIN_ELEMS_PER_THREAD, nthreads);
    (void)nt; /* unused without OpenMP */
    /* at least as many column chunks as threads: shrink the chunk when K is small */
    const int64_t chunk = n_chunks >= nt ? LT_GEMV_T_COLS : ((K + nt - 1) / nt + 15) / 16 * 16;
    const int64_t n_work = (K + chunk - 1) / chunk;
    int failed = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float *w_seg = (float *)malloc((size_t)(LT_GEMV_T_ROWS * chunk) * sizeof(float));
        if (w_seg == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < n_work; c++) {
            if (w_seg == NULL) continue;
            const int64_t k0 = c * chunk;
            const int64_t kn = k0 + chunk <= K ? chunk : K - k0;
            for (int64_t m = 0; m < M; m++) memset(y + m * ld_y + k0, 0, (size_t)kn * sizeof(float));
            int64_t n = 0;
            for (; n + LT_GEMV_T_ROWS <= N; n += LT_GEMV_T_ROWS) {
                /* w_seg = W[n:n+4, k0:k0+kn] (row stride kn) */
                for (int j = 0; j < LT_GEMV_T_ROWS; j++)
                    lt_dequant_range(packed, absmax, code, blocksize, (n + j) * K + k0, kn, w_seg + j * kn, LT_F32);
                /* y[m, k0:k0+kn] += x[m, n:n+4] @ w_seg */
                for (int64_t m = 0; m < M; m++) lt_axpy4(y + m * ld_y + k0, x + m * ld_x + n, w_seg, kn, kn);
            }
            for (; n < N; n++) {
                lt_dequant_range(packed, absmax, code, blocksize, n * K + k0, kn, w_seg, LT_F32);
                for (int64_t m = 0; m < M; m++) lt_axpy(y + m * ld_y + k0, x[m * ld_x + n], w_seg, kn);
            }
        }
        free(w_seg);
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------ */
/*
 * Ask for transparent huge pages on the 2 MiB-aligned interior of a fresh, untouched
 * allocation (what torch's THP_MEM_ALLOC_ENABLE does for its own): writing a large new
 * output then takes one page fault per 2 MiB instead of one per 4 KiB. Advisory only;
 * returns 0 when advised, 1 when there is nothing to advise or no madvise here.
 */
LT_EXPORT int lt_advise_hugepages(void *ptr, int64_t nbytes)
{
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    uintptr_t begin = ((uintptr_t)ptr + huge - 1) & ~(huge - 1);
    uintptr_t end = ((uintptr_t)ptr + (uintptr_t)nbytes) & ~(huge - 1);
    if (end <= begin) return 1;
    return madvise((void *)begin, end - begin, MADV_HUGEPAGE) == 0 ? 0 : 1;
#else
    (void)ptr;
    (void)nbytes;
    return 1;
#endif
}

/* ------------------------------------------------------------------------------------ */
/* What this build is: 2 = AVX-512 decode + AVX2, 1 = AVX2 + FMA + F16C, 0 = scalar only. */
LT_EXPORT int lt_isa_level(void) { return LT_AVX512 ? 2 : LT_AVX2; }

/* Whether OpenMP threads are compiled in. */
LT_EXPORT int lt_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
