/* Few-row matrix products for decoding on a CPU: y (M, N) = x (M, K) @ w (N, K)^T, for M from 1 to 16.

Decoding is bound by reading the weights: each one is read from memory once per step and used for only M
multiply-adds. So this kernel streams every row of w once, on every core, and multiplies it by all M rows
of x, which stay in cache. w is fp32, bf16 (an fp32 with the low 16 bits cut off) or int8 (times one fp32
scale per row of w); x, y and all arithmetic are fp32. mistral/matvec.py compiles and calls it.

Why it is faster than MKL there (bench/kernels.py measures it): on the 2-core AVX2 machine, MKL's fp32
matrix-vector product reads memory at about half the speed that the two cores reach together, because it
barely uses the second core. Here the rows of w are split between the threads (OpenMP), and each thread
reads its rows front to back, one row at a time: a single stream that the hardware prefetcher follows.
(Interleaving 2 to 8 rows, the usual register tiling, ran int8 at half the speed.) Along the row, U
independent partial sums per row of x keep the multiply-add units busy while memory streams in.

Letters: M rows of x (tokens), N rows of w (output features), K the length of both (input features). */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define INLINE static inline __attribute__((always_inline))

typedef float v8 __attribute__((vector_size(32)));  /* 8 floats: one AVX register, two NEON ones */
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int8_t i8x8 __attribute__((vector_size(8)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

enum wtype { F32, BF16, I8 };

/* w[i : i + 8] as fp32. With AVX2, intrinsics: GCC 12 turns the portable conversions into one scalar
instruction per weight. */
INLINE v8 load8(const void *w, int64_t i, enum wtype t) {
    v8 v;
    if (t == F32) {
        memcpy(&v, (const float *)w + i, sizeof v);
    } else if (t == BF16) {  /* a bf16 is the top half of an fp32 */
#ifdef __AVX2__
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
        v = (v8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
#else
        u16x8 h;
        memcpy(&h, (const uint16_t *)w + i, sizeof h);
        v = (v8)(__builtin_convertvector(h, u32x8) << 16);
#endif
    } else {
#ifdef __AVX2__
        __m128i b = _mm_loadl_epi64((const __m128i *)((const int8_t *)w + i));
        v = (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
#else
        i8x8 b;
        memcpy(&b, (const int8_t *)w + i, sizeof b);
        v = __builtin_convertvector(__builtin_convertvector(b, i32x8), v8);
#endif
    }
    return v;
}

INLINE float load1(const void *w, int64_t i, enum wtype t) {
    if (t == F32) return ((const float *)w)[i];
    if (t == BF16) {
        uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    return (float)((const int8_t *)w)[i];
}

/* y[m0 + m, n] for m < MB: row n of w against rows m0 .. m0 + MB - 1 of x, with U partial sums each.
MB * U <= 8 accumulators stay in registers (AVX2 has 16). */
INLINE void row(const float *x, const void *w, const float *scales, float *y, int64_t N, int64_t K, int64_t n,
                int64_t m0, const int MB, const int U, enum wtype t) {
    const float *xm = x + m0 * K;
    v8 acc[4][4];  /* [u][m], u < U, m < MB */
    for (int u = 0; u < U; u++)
        for (int m = 0; m < MB; m++) acc[u][m] = (v8){0};
    int64_t k = 0;
    for (; k + 8 * U <= K; k += 8 * U)
        for (int u = 0; u < U; u++) {
            v8 wv = load8(w, n * K + k + 8 * u, t);
            for (int m = 0; m < MB; m++) {
                v8 xv;
                memcpy(&xv, xm + m * K + k + 8 * u, sizeof xv);
                acc[u][m] += wv * xv;
            }
        }
    for (; k + 8 <= K; k += 8) {
        v8 wv = load8(w, n * K + k, t);
        for (int m = 0; m < MB; m++) {
            v8 xv;
            memcpy(&xv, xm + m * K + k, sizeof xv);
            acc[0][m] += wv * xv;
        }
    }
    for (int m = 0; m < MB; m++) {
        v8 a = acc[0][m];
        for (int u = 1; u < U; u++) a += acc[u][m];
        float s = 0;
        for (int j = 0; j < 8; j++) s += a[j];
        for (int64_t kk = k; kk < K; kk++) s += load1(w, n * K + kk, t) * xm[m * K + kk];
        y[(m0 + m) * N + n] = t == I8 ? s * scales[n] : s;
    }
}

/* Column n of y: all M rows of x, four at a time. */
INLINE void column(const float *x, const void *w, const float *scales, float *y, int64_t M, int64_t N, int64_t K,
                   int64_t n, enum wtype t) {
    if (M == 1) { row(x, w, scales, y, N, K, n, 0, 1, 4, t); return; }
    if (M == 2) { row(x, w, scales, y, N, K, n, 0, 2, 2, t); return; }
    if (M == 3) { row(x, w, scales, y, N, K, n, 0, 3, 2, t); return; }
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) row(x, w, scales, y, N, K, n, m, 4, 2, t);
    for (; m < M; m++) row(x, w, scales, y, N, K, n, m, 1, 4, t);
}

void matvec_f32(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K) {
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) column(x, w, 0, y, M, N, K, n, F32);
}

void matvec_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K) {
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) column(x, w, 0, y, M, N, K, n, BF16);
}

void matvec_int8(const float *x, const int8_t *w, const float *scales, float *y, int64_t M, int64_t N, int64_t K) {
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) column(x, w, scales, y, M, N, K, n, I8);
}
