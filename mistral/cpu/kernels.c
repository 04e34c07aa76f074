/* The CPU kernels of a decode step: few-row matrix products, a layer's attention and its SwiGLU FFN, RMSNorm, a
mixture of experts, whole blocks one after another (the one entry point a step calls), and greedy picking.

Each replaces torch calls that cost more in dispatch than in arithmetic at decode's sizes, or (the products)
that read memory at half speed. mistral/cpu/kernels.py compiles and calls them for the engine in
mistral/cpu/decoder.py; the model's torch code (mistral/model.py) stays the definition, and tests/test_kernels.py checks
each kernel against a float64 computation.

1. Few-row matrix products: y (M, N) = x (M, K) @ w (N, K)^T, for M from 1 to 16, of up to three w at once.

Decoding is bound by reading the weights: each one is read from memory once per step and used for only M
multiply-adds. So this kernel streams every row of w once, on every core, and multiplies it by all M rows
of x, which stay in cache. w is fp32 or bf16 (an fp32 with the low 16 bits cut off); x, y and all arithmetic are
fp32. int8 and int4 weights multiply x rounded to int8 per group instead (1b), with integer multiply-adds.

Why it is faster than MKL there (bench/kernels.py measures it): on the 2-core AVX2 machine, MKL's fp32
matrix-vector product reads memory at about half the speed that the two cores reach together, because it
barely uses the second core. Here the rows of w are split between the threads (OpenMP), and each thread
reads its rows front to back, one row at a time: a single stream that the hardware prefetcher follows.
(Interleaving 2 to 8 rows, the usual register tiling, ran int8 at half the speed.) Along the row, U
independent partial sums per row of x keep the multiply-add units busy while memory streams in.

Letters: M rows of x (tokens), N rows of w (output features), K the length of both (input features). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define INLINE static inline __attribute__((always_inline))

typedef float v8 __attribute__((vector_size(32)));  /* 8 floats: one AVX register, two NEON ones */
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

enum wtype { F32, BF16, I8, I4, GG };  /* I4: see section 1b; GG: llama.cpp's block formats, 1c */

INLINE int wsize(enum wtype t) { return t == F32 ? 4 : 2; }  /* bytes per fp32 or bf16 weight */

/* w[i : i + 8] as fp32. With AVX2, intrinsics: GCC 12 turns the portable conversions into one scalar
instruction per weight. */
INLINE v8 load8(const void *w, int64_t i, enum wtype t) {
    v8 v;
    if (t == F32) {
        memcpy(&v, (const float *)w + i, sizeof v);
    } else {  /* a bf16 is the top half of an fp32 */
#ifdef __AVX2__
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
        v = (v8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
#else
        u16x8 h;
        memcpy(&h, (const uint16_t *)w + i, sizeof h);
        v = (v8)(__builtin_convertvector(h, u32x8) << 16);
#endif
    }
    return v;
}

INLINE float load1(const void *w, int64_t i, enum wtype t) {
    if (t == F32) return ((const float *)w)[i];
    uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* With 2 or 3 rows of x, each fp32 or bf16 weight takes 2 or 3 multiply-adds and the hardware prefetcher
alone falls behind: asking for the weights this many bytes ahead read M = 3 1.1-1.6x faster (measured on the
2-core AVX2 machine). M = 1 streamed at the bandwidth without it there, but not on the 2-core Xeon VM, where one row
of a 14336 x 4096 matrix took 15.8 ms in fp32 and 6.9 in bf16 without, 10.8 and 3.5 with (a 7B bf16 decode step:
0.9x the time). 4 rows or more did not gain. */
#define PREFETCH 4096

/* y[(m0 + m) * ldy] for m < MB: one row wn of w (K weights) against rows m0 .. m0 + MB - 1 of x, with U partial sums
each. MB * U <= 8 accumulators stay in registers (AVX2 has 16). Every caller takes U = 2, so that a row of x sums in
the same order, and gets the same bits, whatever other rows share its pass (a batch, a verified draft). */
INLINE void row(const float *x, const void *wn, float *y, int64_t ldy, int64_t K, int64_t m0, const int MB,
                const int U, const int prefetch, enum wtype t) {
    const float *xm = x + m0 * K;
    v8 acc[4][4];  /* [u][m], u < U, m < MB */
    for (int u = 0; u < U; u++)
        for (int m = 0; m < MB; m++) acc[u][m] = (v8){0};
    int64_t k = 0;
    for (; k + 8 * U <= K; k += 8 * U)
        for (int u = 0; u < U; u++) {
            if (prefetch && u == 0) __builtin_prefetch((const char *)wn + k * wsize(t) + prefetch);
            v8 wv = load8(wn, k + 8 * u, t);
            for (int m = 0; m < MB; m++) {
                v8 xv;
                memcpy(&xv, xm + m * K + k + 8 * u, sizeof xv);
                acc[u][m] += wv * xv;
            }
        }
    for (; k + 8 <= K; k += 8) {
        v8 wv = load8(wn, k, t);
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
        for (int64_t kk = k; kk < K; kk++) s += load1(wn, kk, t) * xm[m * K + kk];
        y[(m0 + m) * ldy] = s;
    }
}

/* Up to three weight matrices of K columns, stacked: n[j] rows each (0: absent), int8 and int4 ones with their
scales (int4's are fp16, behind the same pointer type); for the block formats of 1c (GG), scales[j] points to the
matrix's type number, as a float. */
typedef struct {
    const void *w[3];
    const float *scales[3];
    int64_t n[3];
} stack;

/* Column n of y (M rows, ldy apart): row n of the stacked matrices against all M rows of x, four at a time. */
INLINE void column(const float *x, stack st, float *y, int64_t ldy, int64_t M, int64_t K, int64_t n, enum wtype t) {
    int j = 0;
    while (n >= st.n[j]) n -= st.n[j++];  /* matrix j, its row n */
    const void *wn = (const char *)st.w[j] + n * K * wsize(t);
    if (M == 1) { row(x, wn, y, ldy, K, 0, 1, 2, PREFETCH, t); return; }
    if (M == 2) { row(x, wn, y, ldy, K, 0, 2, 2, PREFETCH, t); return; }
    if (M == 3) { row(x, wn, y, ldy, K, 0, 3, 2, PREFETCH, t); return; }
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) row(x, wn, y, ldy, K, m, 4, 2, 0, t);
    if (m + 3 == M) row(x, wn, y, ldy, K, m, 3, 2, 0, t);
    else if (m + 2 == M) row(x, wn, y, ldy, K, m, 2, 2, 0, t);
    else if (m + 1 == M) row(x, wn, y, ldy, K, m, 1, 2, 0, t);
}

/* 1b. 4-bit weights (mistral/quantize.py's int4_rows): each row of w is G = ceil(K / 32) groups of 32 weights in 16
bytes (the last group padded with zeros), and one fp16 scale d per group: weight = d (nibble - 8). Byte j of a group
holds the nibble of weight j in its low four bits and that of weight j + 16 in its high four. The scales of row n are
s[n G : (n + 1) G].

Widening each weight to fp32 (as the other types do) would cost more instructions than memory can feed at 4 bits.
So x is rounded too, per group of 32 along its row: xq = round(x / e), e = max|x| / 127, an int8 in -127 .. 127.
A group's dot product is then d e (sum_j nibble_j xq_j - 8 sum_j xq_j): the first sum is integer multiply-adds
(AVX2: maddubs multiplies 32 unsigned bytes by 32 signed ones and adds pairs, at most 2 * 15 * 127 in an int16;
madd adds those pairs into int32s), and the second is known per group of x before any weight is read. This is
what makes the format not weight-only: x carries up to e / 2 of rounding error per element. */

/* x rounded per group: xq (M, G * 32), zero past K; e (M, G) the scales; c (M, G) = 8 e sum(xq), the correction.

With AVX2, row_i4 takes groups eight at a time, and two at a time within those (16 + 16 bytes of weights in one
register: the low nibbles are weights 0..15 of both groups, the high nibbles weights 16..31), so there xq holds each
pair of groups g, g + 1 in that order: g's first 16, g + 1's first 16, g's last 16, g + 1's last 16. The groups from
paired_groups(K) on keep their own order.

1c's K-quants take x rounded per super-block of 256 instead (llama.cpp's Q8_K), when asked (PER_SUPER): kq (M, K)
in order, ke (M, K / 256) its scales, and the sums of kq over each 16 and each 32 along the row, s16 (M, K / 16) and
s32 (M, K / 32). */
typedef struct {
    const int8_t *xq, *kq;
    const float *e, *c, *ke;
    const int16_t *s16, *s32;
} rounded;

enum { PER_GROUP = 1, PER_SUPER = 2 };  /* the roundings round_rows makes */

/* The groups a row's x holds in pairs (AVX2): the whole groups of 32 of K inputs, a multiple of eight of them. Only
whole groups, so that an int8 row (K weights, not padded) is never read past its end 32 at a time. */
INLINE int64_t paired_groups(int64_t K) {
#ifdef __AVX2__
    return K / 32 / 8 * 8;
#else
    return 0 * K;
#endif
}

/* Each thread rounds x into a buffer of its own for the few rows of a decode step (M K is at most 16 x the hidden
size: some 10 us of work, where a shared copy would need a barrier): no thread waits for another, and nothing is
allocated per call. The many rows of a pre-fill are rounded once, by all the threads, into the buffer of one. */
#define ROUND_FROM 16  /* more rows than this (a pre-fill): rounded by all the threads together */
static __thread int8_t *round_q;
static __thread float *round_f;
static __thread int16_t *round_s;
static __thread int64_t round_cap;

/* This thread's buffers, grown to M rows of G groups (room for both roundings). */
static rounded round_buffers(int64_t M, int64_t G) {
    const int64_t n = M * G;
    if (n > round_cap) {
        free(round_q);
        free(round_f);
        free(round_s);
        round_q = malloc(2 * n * 32);
        round_f = malloc(3 * n * sizeof(float));
        round_s = malloc(3 * n * sizeof(int16_t));
        round_cap = n;
    }
    return (rounded){round_q, round_q + n * 32, round_f, round_f + n, round_f + 2 * n, round_s, round_s + 2 * n};
}

/* The largest |x[j]| of j < n. */
INLINE float max_abs(const float *x, int64_t n) {
    float top = 0;
    int64_t j = 0;
#ifdef __AVX2__
    __m256 v = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8)
        v = _mm256_max_ps(v, _mm256_and_ps(_mm256_loadu_ps(x + j), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))));
    const v8 a = (v8)v;
    for (int i = 0; i < 8; i++) top = fmaxf(top, a[i]);
#endif
    for (; j < n; j++) top = fmaxf(top, fabsf(x[j]));
    return top;
}

/* x[0 .. 16) times inv, each rounded to the nearest integer, ties to even (lrintf; AVX2's conversion rounds the same
way in the default mode), into q; returns their sum. */
INLINE int round16(const float *x, float inv, int8_t *q) {
#ifdef __AVX2__
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), _mm256_set1_ps(inv)));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), _mm256_set1_ps(inv)));
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8);  /* the 16 as int16, in order */
    _mm_storeu_si128((__m128i *)q, _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
    const __m256i ab = _mm256_add_epi32(a, b);
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(ab), _mm256_extracti128_si256(ab, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1)));
#else
    int sum = 0;
    for (int j = 0; j < 16; j++) sum += q[j] = (int8_t)lrintf(x[j] * inv);
    return sum;
#endif
}

/* Row m of x (M, K) rounded into r, as `want` asks. */
static void round_row(const float *x, rounded r, int64_t m, int64_t K, int want) {
    const int64_t G = (K + 31) / 32;
    for (int64_t g = 0; g < G && want & PER_GROUP; g++) {
        const float *xg = x + m * K + 32 * g;
        const int64_t n = K - 32 * g < 32 ? K - 32 * g : 32;
        const float top = max_abs(xg, n);
        const float scale = top / 127, inv = top > 0 ? 127 / top : 0;
        int8_t *q = (int8_t *)r.xq + (m * G + g) * 32;
        int64_t at[2] = {0, 16};  /* where the group's two halves go */
        if (g < paired_groups(K)) {
            q = (int8_t *)r.xq + (m * G + (g & ~1)) * 32;
            at[0] = g & 1 ? 16 : 0;
            at[1] = at[0] + 32;
        }
        int sum = 0;
        if (n == 32) {
            sum = round16(xg, inv, q + at[0]) + round16(xg + 16, inv, q + at[1]);
        } else {  /* the last group, short: zeros past K */
            for (int64_t j = 0; j < 32; j++) {
                const int8_t v = j < n ? (int8_t)lrintf(xg[j] * inv) : 0;
                q[at[j / 16] + j % 16] = v;
                sum += v;
            }
        }
        ((float *)r.e)[m * G + g] = scale;
        ((float *)r.c)[m * G + g] = 8 * scale * (float)sum;
    }
    for (int64_t s = 0; s < K / 256 && want & PER_SUPER; s++) {
        const float *xs = x + m * K + 256 * s;
        const float top = max_abs(xs, 256), inv = top > 0 ? 127 / top : 0;
        int16_t *s16 = (int16_t *)r.s16 + m * (K / 16) + 16 * s, *s32 = (int16_t *)r.s32 + m * (K / 32) + 8 * s;
        int8_t *q = (int8_t *)r.kq + m * K + 256 * s;
        for (int h = 0; h < 16; h++) s16[h] = (int16_t)round16(xs + 16 * h, inv, q + 16 * h);
        for (int g = 0; g < 8; g++) s32[g] = (int16_t)(s16[2 * g] + s16[2 * g + 1]);
        ((float *)r.ke)[m * (K / 256) + s] = top / 127;
    }
}

/* x (M, K) rounded as `want` asks, for the threads of an enclosing parallel region: each thread alone for a few rows,
else all of them together (an orphaned `omp for`, whose barrier all must reach). */
static rounded round_rows(const float *x, int64_t M, int64_t K, int want) {
    rounded r;
    if (M <= ROUND_FROM) {
        r = round_buffers(M, (K + 31) / 32);
        for (int64_t m = 0; m < M; m++) round_row(x, r, m, K, want);
        return r;
    }
    #pragma omp single copyprivate(r)
    r = round_buffers(M, (K + 31) / 32);
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) round_row(x, r, m, K, want);
    return r;
}

INLINE float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023;
    uint32_t u;
    if (exp == 31) u = sign | 0x7f800000 | man << 13;
    else if (exp) u = sign | (exp + 112) << 23 | man << 13;
    else if (!man) u = sign;
    else {  /* subnormal: normalize */
        int e = -1;
        uint32_t m = man;
        do { e++; m <<= 1; } while (!(m & 1024));
        u = sign | (uint32_t)(112 - e) << 23 | (m & 1023) << 13;
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

/* A CPU with VNNI (AVX-512 VNNI with VL, or AVX-VNNI) multiplies unsigned by signed bytes and adds each four
products into an int32 lane in one instruction, where AVX2 takes maddubs, an add and madd. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#endif

/* The integer dot product of one group: its 16 bytes of nibbles against 32 int8 of x, as 8 int32 partial sums
(AVX2), or one. */
#ifdef __AVX2__
INLINE __m256i nibbles(const uint8_t *wg) {
    const __m128i b = _mm_loadu_si128((const __m128i *)wg);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(15));  /* weights 0..15 | 16..31 */
}
INLINE __m256i group_dot(__m256i u, const int8_t *xq) {
    const __m256i pairs = _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)xq));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}
#endif

/* How far ahead the int4 product asks for its weights: 2048 bytes ran 4-row steps as fast as 3072 and faster than
1024 or 4096, and 1-row steps 1.2x as fast as with the hardware prefetcher alone. */
#define PREFETCH_I4 2048

/* y[(m0 + m) * ldy] for m < MB: row wn (G groups, scales sn) against rows m0 .. m0 + MB - 1 of the rounded x. */
INLINE void row_i4(rounded r, const uint8_t *wn, const uint16_t *sn, float *y, int64_t ldy, int64_t K, int64_t G,
                   int64_t m0, const int MB) {
    float corr[4] = {0};
#ifdef __AVX2__
    __m256 acc[4], corr8[4];
    for (int m = 0; m < MB; m++) acc[m] = corr8[m] = _mm256_setzero_ps();
    /* Eight groups at a time: their eight weight scales converted in one instruction and multiplied by x's eight,
    and each pair of groups' dot products in one register, lanes 0-3 the first group's and 4-7 the second's. */
    const int64_t G8 = paired_groups(K);
    for (int64_t g0 = 0; g0 < G8; g0 += 8) {
        /* The 128 bytes of weights this iteration reads, PREFETCH_I4 ahead (into the next row, which this thread
        reads next): without it a step of 4 rows, with 4 times the arithmetic between the loads, left memory idle
        in between and took 1.6x as long as one of 1 row; with it 1.0-1.1x (the 7B int4 folder, 2 threads). */
        __builtin_prefetch(wn + 16 * g0 + PREFETCH_I4);
        __builtin_prefetch(wn + 16 * g0 + PREFETCH_I4 + 64);
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sn + g0)));
        __m256 de[4];
        for (int m = 0; m < MB; m++) {
            const int64_t at = (m0 + m) * G + g0;
            de[m] = _mm256_mul_ps(d8, _mm256_loadu_ps(r.e + at));
            corr8[m] = _mm256_fmadd_ps(d8, _mm256_loadu_ps(r.c + at), corr8[m]);
        }
        for (int pair = 0; pair < 4; pair++) {
            const __m256i b = _mm256_loadu_si256((const __m256i *)(wn + 16 * (g0 + 2 * pair)));
            const __m256i lo = _mm256_and_si256(b, _mm256_set1_epi8(15));
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(15));
            const __m256i lanes = _mm256_setr_epi32(2 * pair, 2 * pair, 2 * pair, 2 * pair, 2 * pair + 1,
                                                    2 * pair + 1, 2 * pair + 1, 2 * pair + 1);
            for (int m = 0; m < MB; m++) {
                const int8_t *xq = r.xq + 32 * ((m0 + m) * G + g0 + 2 * pair);
#ifdef DPBUSD  /* the same integer sums in two instructions: each lane adds four u8 * s8 products, exactly */
                const __m256i p32 = DPBUSD(DPBUSD(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const __m256i *)xq)),
                                           hi, _mm256_loadu_si256((const __m256i *)(xq + 32)));
                const __m256 p = _mm256_cvtepi32_ps(p32);
#else
                const __m256i p16 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xq)),
                    _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + 32))));  /* |.| <= 7620 */
                const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
#endif
                acc[m] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(de[m], lanes), p, acc[m]);
            }
        }
    }
    for (int m = 0; m < MB; m++) {
        v8 c = (v8)corr8[m];
        for (int j = 0; j < 8; j++) corr[m] += c[j];
    }
    for (int64_t g = G8; g < G; g++) {
        const __m256i u = nibbles(wn + 16 * g);
        const float d = half_to_float(sn[g]);
        for (int m = 0; m < MB; m++) {
            const int64_t at = (m0 + m) * G + g;
            const __m256 p = _mm256_cvtepi32_ps(group_dot(u, r.xq + 32 * at));
            acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(d * r.e[at]), p, acc[m]);
            corr[m] += d * r.c[at];
        }
    }
    for (int m = 0; m < MB; m++) {
        v8 a = (v8)acc[m];
        float s = 0;
        for (int j = 0; j < 8; j++) s += a[j];
        y[(m0 + m) * ldy] = s - corr[m];
    }
#else
    float acc[4] = {0};
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *wg = wn + 16 * g;
        const float d = half_to_float(sn[g]);
        for (int m = 0; m < MB; m++) {
            const int64_t at = (m0 + m) * G + g;
            const int8_t *xq = r.xq + 32 * at;
            int32_t dot = 0;
            for (int j = 0; j < 16; j++) dot += (wg[j] & 15) * xq[j] + (wg[j] >> 4) * xq[j + 16];
            acc[m] += d * r.e[at] * (float)dot;
            corr[m] += d * r.c[at];
        }
    }
    for (int m = 0; m < MB; m++) y[(m0 + m) * ldy] = acc[m] - corr[m];
#endif
}

/* y[(m0 + m) * ldy] for m < MB: int8 row wn (K weights, G groups of 32; times scale) against rows m0 .. m0 + MB - 1
of the rounded x. Widening each weight to fp32 instead ran 0.78-0.89x as fast at decode's 1 to 4 rows (one 7B
layer's products, interleaved), and in a pre-fill, which is compute-bound, integer multiply-adds do 4x the work of
fp32 ones per instruction. maddubs wants one unsigned operand: |w| times xq with w's sign, as much as
2 * 128 * 127 in an int16. A group's dot product is e (sum_j w_j xq_j); the row's scale comes last. */
INLINE void row_i8q(rounded r, const int8_t *wn, float scale, float *y, int64_t ldy, int64_t K, int64_t G, int64_t m0,
                    const int MB) {
    float tail[4] = {0};
    const int64_t full = K / 32;  /* groups of 32 weights; one more of K % 32 */
#ifdef __AVX2__
    __m256 acc[4];
    for (int m = 0; m < MB; m++) acc[m] = _mm256_setzero_ps();
    /* As row_i4: groups eight at a time, their x in pairs; a pair of groups' weights gathered into the same order. */
    const int64_t G8 = paired_groups(K);
    for (int64_t g0 = 0; g0 < G8; g0 += 8) {
        __m256 e8[4];
        for (int m = 0; m < MB; m++) e8[m] = _mm256_loadu_ps(r.e + (m0 + m) * G + g0);
        for (int pair = 0; pair < 4; pair++) {
            const int8_t *wg = wn + 32 * (g0 + 2 * pair);
            const __m256i wa = _mm256_loadu2_m128i((const __m128i *)(wg + 32), (const __m128i *)wg);
            const __m256i wb = _mm256_loadu2_m128i((const __m128i *)(wg + 48), (const __m128i *)(wg + 16));
            const __m256i ua = _mm256_abs_epi8(wa), ub = _mm256_abs_epi8(wb);
            const __m256i lanes = _mm256_setr_epi32(2 * pair, 2 * pair, 2 * pair, 2 * pair, 2 * pair + 1,
                                                    2 * pair + 1, 2 * pair + 1, 2 * pair + 1);
            for (int m = 0; m < MB; m++) {
                const int8_t *xq = r.xq + 32 * ((m0 + m) * G + g0 + 2 * pair);
                const __m256i sa = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xq), wa);
                const __m256i sb = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xq + 32)), wb);
                const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(ua, sa), _mm256_set1_epi16(1)),
                                                   _mm256_madd_epi16(_mm256_maddubs_epi16(ub, sb), _mm256_set1_epi16(1)));
                acc[m] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(e8[m], lanes), _mm256_cvtepi32_ps(p), acc[m]);
            }
        }
    }
    for (int64_t g = G8; g < full; g++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(wn + 32 * g));
        const __m256i u = _mm256_abs_epi8(w);
        for (int m = 0; m < MB; m++) {
            const int64_t at = (m0 + m) * G + g;
            const __m256i sx = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(r.xq + 32 * at)), w);
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, sx), _mm256_set1_epi16(1));
            acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(r.e[at]), _mm256_cvtepi32_ps(p), acc[m]);
        }
    }
#else
    float acc[4] = {0};
    for (int64_t g = 0; g < full; g++)
        for (int m = 0; m < MB; m++) {
            const int64_t at = (m0 + m) * G + g;
            int32_t dot = 0;
            for (int j = 0; j < 32; j++) dot += wn[32 * g + j] * r.xq[32 * at + j];
            acc[m] += r.e[at] * (float)dot;
        }
#endif
    /* The last group, of fewer than 32 weights (past G8, so its x is in its own order): w ends at K. */
    if (full < G)
        for (int m = 0; m < MB; m++) {
            const int64_t at = (m0 + m) * G + full;
            int32_t dot = 0;
            for (int64_t j = 0; j < K - 32 * full; j++) dot += wn[32 * full + j] * r.xq[32 * at + j];
            tail[m] = r.e[at] * (float)dot;
        }
    for (int m = 0; m < MB; m++) {
#ifdef __AVX2__
        v8 a = (v8)acc[m];
        float s = 0;
        for (int j = 0; j < 8; j++) s += a[j];
#else
        float s = acc[m];
#endif
        y[(m0 + m) * ldy] = (s + tail[m]) * scale;
    }
}

/* Column n of y: row n of the stacked int4 (or int8) matrices against rows m0 .. m1 - 1 of the rounded x, four at a
time and the 1 to 3 left in one more pass: each pass unpacks the row again, so a 3-row step (a speculative draft of 2,
mistral/speculate.py) taken as 2 + 1 cost 1.57 one-row steps on the 7B int4 folder, and as 3 cost 1.39. */
INLINE void column_rounded(rounded r, stack st, float *y, int64_t ldy, int64_t m0, int64_t m1, int64_t K, int64_t n,
                           enum wtype t) {
    const int64_t G = (K + 31) / 32;
    int j = 0;
    while (n >= st.n[j]) n -= st.n[j++];
    int64_t m = m0;
    if (t == I4) {
        const uint8_t *wn = (const uint8_t *)st.w[j] + n * G * 16;
        const uint16_t *sn = (const uint16_t *)(const void *)st.scales[j] + n * G;
        for (; m + 4 <= m1; m += 4) row_i4(r, wn, sn, y, ldy, K, G, m, 4);
        if (m + 3 == m1) row_i4(r, wn, sn, y, ldy, K, G, m, 3);
        else if (m + 2 == m1) row_i4(r, wn, sn, y, ldy, K, G, m, 2);
        else if (m + 1 == m1) row_i4(r, wn, sn, y, ldy, K, G, m, 1);
    } else {
        const int8_t *wn = (const int8_t *)st.w[j] + n * K;
        const float scale = st.scales[j][n];
        for (; m + 4 <= m1; m += 4) row_i8q(r, wn, scale, y, ldy, K, G, m, 4);
        if (m + 3 == m1) row_i8q(r, wn, scale, y, ldy, K, G, m, 3);
        else if (m + 2 == m1) row_i8q(r, wn, scale, y, ldy, K, G, m, 2);
        else if (m + 1 == m1) row_i8q(r, wn, scale, y, ldy, K, G, m, 1);
    }
}

/* The rows of rounded x a pass over the weights takes: each row of w is read against a block of x that stays in L2
(256 KB of its 1 MB here, at 40 bytes a group: its 32 integers and two floats), not against all of x, which at 512
rows of 14336 features (9 MB) would come from L3 for every row of w. On one core, 1.06-1.12x faster at 256 and 512
rows than without blocks (512 KB blocks gained less), even at 63. The blocks are of equal size, a multiple of 4 rows,
so that none is left with a few. */
static int64_t x_block(int64_t M, int64_t G) {
    int64_t most = (1 << 18) / (40 * G) / 4 * 4;
    if (most < 4) most = 4;
    const int64_t blocks = (M + most - 1) / most;
    return ((M + blocks - 1) / blocks + 3) / 4 * 4;
}

/* The stacked int4 or int8 matrices against x rounded per group: N rows of w against blocks of x that stay in L2. */
static void rounded_products(const float *x, stack st, float *y, int64_t M, int64_t K, enum wtype t) {
    const int64_t N = st.n[0] + st.n[1] + st.n[2], XB = x_block(M, (K + 31) / 32);
    const rounded r = round_rows(x, M, K, PER_GROUP);
    /* Each thread takes the same rows of w for every block (static): no thread waits for another between them. */
    for (int64_t m0 = 0; m0 < M; m0 += XB) {
        const int64_t m1 = m0 + XB < M ? m0 + XB : M;
        if (t == I4) {
            #pragma omp for schedule(static) nowait
            for (int64_t n = 0; n < N; n++) column_rounded(r, st, y + n, N, m0, m1, K, n, I4);
        } else {
            #pragma omp for schedule(static) nowait
            for (int64_t n = 0; n < N; n++) column_rounded(r, st, y + n, N, m0, m1, K, n, I8);
        }
    }
    #pragma omp barrier
}

/* 1c. llama.cpp's block formats (mistral/ggml.py), multiplied as a GGUF file stores them. A row of w is K / 256
super-blocks: one block of Q4_K, Q5_K or Q6_K, or eight 34-byte blocks of Q8_0.

Q8_0 is 1b's int8 with a factor d per group of 32 (weight = d q), and takes x rounded per group as 1b does.

The K-quants take x rounded per super-block instead (round_row's kq = x / e, one e per 256, as llama.cpp rounds x
for them), so that all the integer sums of a super-block meet one float factor. A Q4_K or Q5_K weight is
d sc q - dmin m, with q unsigned (4 or 5 bits) and sc, m 6-bit integers per group of 32; a Q6_K weight is
d sc (q - 32), with q of 6 bits, unsigned, and sc a signed byte per 16. A super-block's dot product with x is then

    Q4_K, Q5_K:  e d sum_g sc_g sum(q kq over g) - e dmin sum_g m_g sum(kq over g)
    Q6_K:        e d sum_h sc_h (sum(q kq over h) - 32 sum(kq over h))

where the sums of kq come with the rounding (s32, s16). With AVX2 a group's 32 integers are unpacked in order into
one register (k_pair); maddubs multiplies them by kq and adds pairs (at most 2 * 63 * 127, an int16), and madd (VNNI:
dpwssd) multiplies each pair by its scale as it adds them into int32 lanes; one float multiply-add a super-block.
With x rounded per 32, each group's sums needed a float factor of their own: one row of a 7B ffn_gate in cache
(Q4_K) took 70 µs against 62-67 now, four rows of Q6_K's ffn_down 990 against 490-560 (docs/performance-diary.md).
Without AVX2, plain loops take each weight's integer (weight_q). */
enum gtype { GQ8_0 = 8, GQ4_K = 12, GQ5_K = 13, GQ6_K = 14 };  /* llama.cpp's type numbers */

INLINE int64_t super_bytes(int t) { return t == GQ4_K ? 144 : t == GQ5_K ? 176 : t == GQ6_K ? 210 : 272; }

INLINE float f16_at(const uint8_t *p) { return half_to_float((uint16_t)(p[0] | p[1] << 8)); }

/* Q4_K's and Q5_K's 12 bytes of eight 6-bit scales and mins (mistral/ggml.py, _scale_min), four to a 32-bit word
(little-endian): scales 0-3 and mins 0-3 are the low six bits of bytes 0-3 and 4-7; scales 4-7 the low nibbles of bytes
8-11 under the top two bits of bytes 0-3, mins 4-7 the high nibbles under the top two bits of bytes 4-7. */
INLINE void scales_mins(const uint8_t *s, uint64_t *sc, uint64_t *mn) {
    uint32_t w[3];
    memcpy(w, s, 12);
    const uint32_t six = 0x3f3f3f3f, four = 0x0f0f0f0f, two = 0x03030303;
    *sc = (w[0] & six) | (uint64_t)((w[2] & four) | (w[0] >> 6 & two) << 4) << 32;
    *mn = (w[1] & six) | (uint64_t)((w[2] >> 4 & four) | (w[1] >> 6 & two) << 4) << 32;
}

/* The integer of weight j (0 .. 255) of a super-block as stored: 0 .. 15 (Q4_K), 0 .. 31 (Q5_K), 0 .. 63 (Q6_K),
int8 (Q8_0). In a K-quant block, each 32 bytes of q hold sub-block 2c in their low nibbles and 2c + 1 in their high
ones; Q5_K's fifth bits are bit j of qh[l] for weight l of sub-block j; Q6_K's halves of 128 take runs k of 32 from the
low, then the high nibbles of ql[0 .. 63], with bits 2k and 2k + 1 of qh[0 .. 31] on top. */
INLINE int weight_q(int t, const uint8_t *blk, int j) {
    const int g = j / 32, l = j % 32;
    if (t == GQ4_K || t == GQ5_K) {
        const uint8_t b = blk[(t == GQ5_K ? 48 : 16) + 32 * (g / 2) + l];
        const int q = g & 1 ? b >> 4 : b & 15;
        return t == GQ5_K ? q | (blk[16 + l] >> g & 1) << 4 : q;
    }
    if (t == GQ6_K) {
        const int n = g / 4, k = g % 4, b = blk[64 * n + 32 * (k & 1) + l];
        return (k < 2 ? b & 15 : b >> 4) | (blk[128 + 32 * n + l] >> (2 * k) & 3) << 4;
    }
    return ((const int8_t *)blk)[34 * g + 2 + l];
}

/* A super-block's float factors, as mistral/ggml.py's dequantize computes them: f per 16 weights (d sc; Q8_0: d) and
b per 32 (dmin m; zero but for Q4_K and Q5_K). */
INLINE void block_factors(int t, const uint8_t *blk, float f[16], float b[8]) {
    if (t == GQ4_K || t == GQ5_K) {
        const float d = f16_at(blk), dmin = f16_at(blk + 2);
        uint64_t sc, mn;
        scales_mins(blk + 4, &sc, &mn);
        for (int g = 0; g < 8; g++) {
            f[2 * g] = f[2 * g + 1] = d * (float)(uint8_t)(sc >> 8 * g);
            b[g] = dmin * (float)(uint8_t)(mn >> 8 * g);
        }
    } else {
        for (int h = 0; h < 16; h++)
            f[h] = t == GQ6_K ? f16_at(blk + 208) * (float)((const int8_t *)blk)[192 + h] : f16_at(blk + 34 * (h / 2));
        for (int g = 0; g < 8; g++) b[g] = 0;
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPWSSD(acc, a, b) _mm256_dpwssd_epi32(acc, a, b)
#elif defined(__AVXVNNI__)
#define DPWSSD(acc, a, b) _mm256_dpwssd_avx_epi32(acc, a, b)
#else
#define DPWSSD(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#endif

#ifdef __AVX2__
/* Groups 2p and 2p + 1 of a K-quant super-block, their 32 integers each in order, as stored (unsigned). */
INLINE void k_pair(int t, const uint8_t *blk, int p, __m256i *lo, __m256i *hi) {
    const __m256i low4 = _mm256_set1_epi8(15);
    if (t == GQ6_K) {  /* runs 2 (p % 2) and 2 (p % 2) + 1 of half p / 2; qh's bits 2k, 2k + 1 put at 4 and 5 */
        const uint8_t *ql = blk + 64 * (p / 2);
        const __m256i a = _mm256_loadu_si256((const __m256i *)ql), b = _mm256_loadu_si256((const __m256i *)(ql + 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * (p / 2))), top = _mm256_set1_epi8(48);
        if (p % 2 == 0) {
            *lo = _mm256_or_si256(_mm256_and_si256(a, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), top));
            *hi = _mm256_or_si256(_mm256_and_si256(b, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), top));
        } else {
            *lo = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low4), _mm256_and_si256(qh, top));
            *hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), low4),
                                  _mm256_and_si256(_mm256_srli_epi16(qh, 2), top));
        }
        return;
    }
    const __m256i b = _mm256_loadu_si256((const __m256i *)(blk + (t == GQ5_K ? 48 : 16) + 32 * p));
    *lo = _mm256_and_si256(b, low4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
    if (t == GQ5_K) {  /* bits 2p and 2p + 1 of qh, put at 4 */
        const __m256i qh = _mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)(blk + 16)), 2 * p);
        const __m256i five = _mm256_set1_epi8(16);
        *lo = _mm256_or_si256(*lo, _mm256_and_si256(_mm256_slli_epi16(qh, 4), five));
        *hi = _mm256_or_si256(*hi, _mm256_and_si256(_mm256_slli_epi16(qh, 3), five));
    }
}

/* The integer dot products of unsigned q and int8 x, 32 bytes each, as 8 int32 partial sums of four. */
INLINE __m256i dot_u8(__m256i q, __m256i xq) {
#ifdef DPBUSD
    return DPBUSD(_mm256_setzero_si256(), q, xq);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, xq), _mm256_set1_epi16(1));  /* pairs: |.| <= 2 * 128 * 127 */
#endif
}
#endif

#ifdef __AVX2__
/* Q6_K's - 32 sum_h sc_h sum(kq over h), sc its 16 scales, s16 the sums of a super-block of kq: 8 int32 to add. */
INLINE __m256i q6_offset(__m128i sc, const int16_t *s16) {
    const __m256i sums = _mm256_madd_epi16(_mm256_cvtepi8_epi16(sc), _mm256_loadu_si256((const __m256i *)s16));
    return _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sums, 5));
}

/* Q4_K's and Q5_K's dmin e sum_g m_g sum(kq over g), mn16 the eight mins, s32 the sums: 4 floats to subtract. */
INLINE __m128 k_mins(__m128i mn16, const int16_t *s32, float dmin_e) {
    const __m128i sums = _mm_madd_epi16(mn16, _mm_loadu_si128((const __m128i *)s32));
    return _mm_mul_ps(_mm_cvtepi32_ps(sums), _mm_set1_ps(dmin_e));
}
#endif

#ifdef __AVX512BW__
#define K512  /* block_dequantize, 16 weights an instruction: 1.4x as fast as with AVX2 (the products gained nothing) */
/* Groups 2p and 2p + 1 of a K-quant super-block in one 512-bit register, in order, as stored (unsigned): the 32 bytes
that hold both (Q4_K, Q5_K) in each half, shifted by 0 and 4 bits, or (Q6_K) the 64 low bits of both, with the two top
bits of each from qh. */
INLINE __m512i k_pair512(int t, const uint8_t *blk, int p) {
    const __m512i low4 = _mm512_set1_epi8(15);
    const __m256i zero = _mm256_setzero_si256();
    if (t == GQ6_K) {
        const __m512i ql = _mm512_loadu_si512((const void *)(blk + 64 * (p / 2)));
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * (p / 2))));
        const __m512i top = _mm512_set1_epi8(48);
        if (p % 2 == 0)  /* bits 0-1 and 2-3 of qh to 4-5 */
            return _mm512_or_si512(_mm512_and_si512(ql, low4), _mm512_and_si512(_mm512_sllv_epi16(qh,
                _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1)), top));
        return _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low4), _mm512_and_si512(_mm512_srlv_epi16(qh,
            _mm512_inserti64x4(_mm512_castsi256_si512(zero), _mm256_set1_epi16(2), 1)), top));  /* 4-5, 6-7 */
    }
    const uint8_t *qs = blk + (t == GQ5_K ? 48 : 16) + 32 * p;
    const __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)qs));
    __m512i q = _mm512_and_si512(_mm512_srlv_epi16(b, _mm512_inserti64x4(_mm512_castsi256_si512(zero),
                                                                          _mm256_set1_epi16(4), 1)), low4);
    if (t == GQ5_K) {  /* bits 2p and 2p + 1 of qh, put at 4 */
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 16)));
        const __m512i at = _mm512_inserti64x4(_mm512_set1_epi16((short)(2 * p)),
                                              _mm256_set1_epi16((short)(2 * p + 1)), 1);
        q = _mm512_or_si512(q, _mm512_and_si512(_mm512_slli_epi16(_mm512_srlv_epi16(qh, at), 4), _mm512_set1_epi8(16)));
    }
    return q;
}
#endif

/* y[(m0 + m) * ldy] for m < MB: K-quant row wn (K / 256 super-blocks of type t) against rows m0 .. m0 + MB - 1 of x
rounded per super-block. (A 512-bit version, two groups an instruction, ran no faster: one row of a 7B ffn_gate in
cache 63-72 µs against 62-67, four rows 147-156 against 139-155.) */
INLINE void row_k(rounded r, const uint8_t *wn, const int t, float *y, int64_t ldy, int64_t K, int64_t m0,
                  const int MB) {
    const int64_t S = K / 256, bytes = super_bytes(t);
    float out[4] = {0};
#ifdef __AVX2__
    __m256 acc[4];
    __m256i isum[4];
    for (int m = 0; m < MB; m++) acc[m] = _mm256_setzero_ps();
    __m128 mins[4];
    for (int m = 0; m < MB; m++) mins[m] = _mm_setzero_ps();
    for (int64_t s = 0; s < S; s++) {
        const uint8_t *blk = wn + s * bytes;
        for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(blk + PREFETCH_I4 + at);
        float d, e[4];
        for (int m = 0; m < MB; m++) e[m] = r.ke[(m0 + m) * S + s];
        __m256i scales;  /* 16-bit: a group's (or its two halves') in word g of each 128-bit half */
        if (t == GQ6_K) {
            d = f16_at(blk + 208);
            const __m128i sc = _mm_loadu_si128((const __m128i *)(blk + 192));
            const __m128i evens_odds = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
            scales = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, evens_odds));
            for (int m = 0; m < MB; m++) isum[m] = q6_offset(sc, r.s16 + (m0 + m) * (K / 16) + 16 * s);
        } else {
            d = f16_at(blk);
            const float dmin = f16_at(blk + 2);
            uint64_t sc, mn;
            scales_mins(blk + 4, &sc, &mn);
            const __m128i sc16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc));
            const __m128i mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)mn));
            scales = _mm256_set_m128i(sc16, sc16);
            for (int m = 0; m < MB; m++) {
                mins[m] = _mm_add_ps(mins[m], k_mins(mn16, r.s32 + (m0 + m) * (K / 32) + 8 * s, dmin * e[m]));
                isum[m] = _mm256_setzero_si256();
            }
        }
        for (int p = 0; p < 4; p++) {
            __m256i q[2];
            k_pair(t, blk, p, q, q + 1);
            for (int i = 0; i < 2; i++) {
                const int g = 2 * p + i;
                const __m256i scale = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short)((2 * g + 1) << 8 | 2 * g)));
                for (int m = 0; m < MB; m++) {
                    const __m256i x = _mm256_loadu_si256((const __m256i *)(r.kq + (m0 + m) * K + 256 * s + 32 * g));
                    isum[m] = DPWSSD(isum[m], _mm256_maddubs_epi16(q[i], x), scale);
                }
            }
        }
        for (int m = 0; m < MB; m++)
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), _mm256_set1_ps(d * e[m]), acc[m]);
    }
    for (int m = 0; m < MB; m++) {
        v8 a = (v8)acc[m];
        for (int j = 0; j < 8; j++) out[m] += a[j];
        float b[4];
        _mm_storeu_ps(b, mins[m]);
        out[m] -= (b[0] + b[1]) + (b[2] + b[3]);
    }
#else
    for (int64_t s = 0; s < S; s++) {
        const uint8_t *blk = wn + s * bytes;
        int sc[16], mn[8];
        float d, dmin = 0;
        if (t == GQ6_K) {
            d = f16_at(blk + 208);
            for (int h = 0; h < 16; h++) sc[h] = ((const int8_t *)blk)[192 + h];
        } else {
            d = f16_at(blk), dmin = f16_at(blk + 2);
            uint64_t s8, m8;
            scales_mins(blk + 4, &s8, &m8);
            for (int g = 0; g < 8; g++) {
                sc[2 * g] = sc[2 * g + 1] = (uint8_t)(s8 >> 8 * g);
                mn[g] = (uint8_t)(m8 >> 8 * g);
            }
        }
        for (int m = 0; m < MB; m++) {
            const int8_t *x = r.kq + (m0 + m) * K + 256 * s;
            int32_t isum = 0, msum = 0;
            for (int j = 0; j < 256; j++) isum += sc[j / 16] * weight_q(t, blk, j) * x[j];
            for (int h = 0; h < 16 && t == GQ6_K; h++) isum -= 32 * sc[h] * r.s16[(m0 + m) * (K / 16) + 16 * s + h];
            for (int g = 0; g < 8 && t != GQ6_K; g++) msum += mn[g] * r.s32[(m0 + m) * (K / 32) + 8 * s + g];
            const float e = r.ke[(m0 + m) * S + s];
            out[m] += d * e * (float)isum - dmin * e * (float)msum;
        }
    }
#endif
    for (int m = 0; m < MB; m++) y[(m0 + m) * ldy] = out[m];
}

/* y[(m0 + m) * ldy] for m < MB: Q8_0 row wn (K / 32 blocks) against rows m0 .. m0 + MB - 1 of x rounded per group, as
1b's int8 (|q| times x with q's sign), the factor d e of each group applied to its sums. */
INLINE void row_q8_0(rounded r, const uint8_t *wn, float *y, int64_t ldy, int64_t K, int64_t m0, const int MB) {
    const int64_t G = K / 32;
    float out[4] = {0};
#ifdef __AVX2__
    const int64_t S = K / 256;
    __m256 acc[4];
    for (int m = 0; m < MB; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t s = 0; s < S; s++) {
        const uint8_t *blk = wn + s * 272;
        for (int at = 0; at < 272; at += 64) __builtin_prefetch(blk + PREFETCH_I4 + at);
        float f[8];
        for (int g = 0; g < 8; g++) f[g] = f16_at(blk + 34 * g);
        __m256 fe[4];
        for (int m = 0; m < MB; m++)
            fe[m] = _mm256_mul_ps(_mm256_loadu_ps(f), _mm256_loadu_ps(r.e + (m0 + m) * G + 8 * s));
        for (int p = 0; p < 4; p++) {  /* groups 2p and 2p + 1: lanes 0-3 of the sums are the first's, 4-7 the 2nd's */
            const uint8_t *b0 = blk + 34 * (2 * p) + 2, *b1 = b0 + 34;
            const __m256i A = _mm256_loadu2_m128i((const __m128i *)b1, (const __m128i *)b0);  /* as 1b's pairs */
            const __m256i B = _mm256_loadu2_m128i((const __m128i *)(b1 + 16), (const __m128i *)(b0 + 16));
            const __m256i uA = _mm256_abs_epi8(A), uB = _mm256_abs_epi8(B);
            const __m256i lanes = _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1, 2 * p + 1,
                                                    2 * p + 1);
            for (int m = 0; m < MB; m++) {
                const int8_t *xq = r.xq + 32 * ((m0 + m) * G + 8 * s + 2 * p);
                const __m256i XA = _mm256_loadu_si256((const __m256i *)xq);
                const __m256i XB = _mm256_loadu_si256((const __m256i *)(xq + 32));
                const __m256i I = _mm256_add_epi32(dot_u8(uA, _mm256_sign_epi8(XA, A)),
                                                   dot_u8(uB, _mm256_sign_epi8(XB, B)));
                acc[m] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(fe[m], lanes), _mm256_cvtepi32_ps(I), acc[m]);
            }
        }
    }
    for (int m = 0; m < MB; m++) {
        v8 a = (v8)acc[m];
        for (int j = 0; j < 8; j++) out[m] += a[j];
    }
#else
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *blk = wn + 34 * g;
        for (int m = 0; m < MB; m++) {
            const int64_t at = (m0 + m) * G + g;
            int32_t dot = 0;
            for (int j = 0; j < 32; j++) dot += ((const int8_t *)blk)[2 + j] * r.xq[32 * at + j];
            out[m] += f16_at(blk) * r.e[at] * (float)dot;
        }
    }
#endif
    for (int m = 0; m < MB; m++) y[(m0 + m) * ldy] = out[m];
}

INLINE void row_blocks(rounded r, const uint8_t *wn, const int t, float *y, int64_t ldy, int64_t K, int64_t m0,
                       const int MB) {
    if (t == GQ8_0)
        row_q8_0(r, wn, y, ldy, K, m0, MB);
    else
        row_k(r, wn, t, y, ldy, K, m0, MB);
}

/* Column n of y: row n of w, of type t, against rows m0 .. m1 - 1 of the rounded x, four at a time and the rest in
one pass (as column_rounded). Each case calls row_blocks with a constant type, so the compiler specializes it. */
static void column_blocks(rounded r, int t, const uint8_t *w, float *y, int64_t ldy, int64_t m0, int64_t m1,
                          int64_t K, int64_t n) {
    const uint8_t *wn = w + n * (K / 256) * super_bytes(t);
#define ROWS(T)                                                                      \
    {                                                                                \
        int64_t m = m0;                                                              \
        for (; m + 4 <= m1; m += 4) row_blocks(r, wn, T, y, ldy, K, m, 4);           \
        if (m + 3 == m1) row_blocks(r, wn, T, y, ldy, K, m, 3);                      \
        else if (m + 2 == m1) row_blocks(r, wn, T, y, ldy, K, m, 2);                 \
        else if (m + 1 == m1) row_blocks(r, wn, T, y, ldy, K, m, 1);                 \
    }
    switch (t) {
    case GQ4_K: ROWS(GQ4_K) break;
    case GQ5_K: ROWS(GQ5_K) break;
    case GQ6_K: ROWS(GQ6_K) break;
    default: ROWS(GQ8_0)
    }
#undef ROWS
}

/* fp32 to bf16, rounding to nearest, ties to even, as torch's conversion (the weights are finite). */
INLINE uint16_t bf16_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7fff + (u >> 16 & 1)) >> 16);
}

#ifdef __AVX2__
INLINE void store8_bf16(uint16_t *at, __m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                                                         _mm256_and_si256(_mm256_srli_epi32(u, 16),
                                                                          _mm256_set1_epi32(1))), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  /* lanes 0 and 2: the 8 */
    _mm_storeu_si128((__m128i *)at, _mm256_castsi256_si128(packed));
}
#endif

#ifdef K512
/* 16 floats to bf16 as store8_bf16 does (AVX-512 BF16's conversion rounds the same way, to nearest even). */
INLINE void store16_bf16(uint16_t *at, __m512 v) {
#ifdef __AVX512BF16__
    _mm256_storeu_si256((__m256i *)at, (__m256i)_mm512_cvtneps_pbh(v));
#else
    const __m512i u = _mm512_castps_si512(v);
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                                         _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                          _mm512_set1_epi32(1))), 16);
    _mm256_storeu_si256((__m256i *)at, _mm512_cvtepi32_epi16(r));
#endif
}
#endif

/* Rows of w (N rows of K / 256 super-blocks of type t) as their weights, into out (N, K): fp32, or bf16 if `bf16`
(rounded as torch rounds), as mistral/ggml.py's dequantize computes them (f q - b; Q6_K: f (q - 32)), up to an ulp:
for the products of many rows of x (a pre-fill), which multiply the weights as floats, a block of rows at a time. */
void block_dequantize(int t, const uint8_t *w, void *out_, int64_t N, int64_t K, int bf16) {
    const int64_t S = K / 256, bytes = super_bytes(t);
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N * S; i++) {
        const uint8_t *blk = w + i * bytes;
        float *o = (float *)out_ + i * 256;
        uint16_t *ob = (uint16_t *)out_ + i * 256;
        float f[16], b[8];
        block_factors(t, blk, f, b);
#ifdef K512
        for (int p = 0; p < 4; p++) {  /* groups 2p and 2p + 1, sixteen weights at a time: half-group 4p + c */
            const uint8_t *q8 = blk + 34 * (2 * p) + 2;  /* Q8_0's two groups */
            const __m512i q = t != GQ8_0 ? k_pair512(t, blk, p)
                            : _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)q8)),
                                                 _mm256_loadu_si256((const __m256i *)(q8 + 34)), 1);
            for (int c = 0; c < 4; c++) {
                const __m128i sixteen = c == 0 ? _mm512_castsi512_si128(q) : c == 1 ? _mm512_extracti32x4_epi32(q, 1)
                                      : c == 2 ? _mm512_extracti32x4_epi32(q, 2) : _mm512_extracti32x4_epi32(q, 3);
                __m512i qi = t == GQ8_0 ? _mm512_cvtepi8_epi32(sixteen) : _mm512_cvtepu8_epi32(sixteen);
                if (t == GQ6_K) qi = _mm512_sub_epi32(qi, _mm512_set1_epi32(32));
                const int h = 4 * p + c;
                const __m512 v = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(f[h]), _mm512_cvtepi32_ps(qi)),
                                               _mm512_set1_ps(b[h / 2]));
                if (bf16)
                    store16_bf16(ob + 16 * h, v);
                else
                    _mm512_storeu_ps(o + 16 * h, v);
            }
        }
#elif defined(__AVX2__)
        for (int p = 0; p < 4; p++) {
            __m256i pair[2];
            if (t == GQ8_0) {
                pair[0] = _mm256_loadu_si256((const __m256i *)(blk + 34 * (2 * p) + 2));
                pair[1] = _mm256_loadu_si256((const __m256i *)(blk + 34 * (2 * p + 1) + 2));
            } else {
                k_pair(t, blk, p, pair, pair + 1);
            }
            for (int i = 0; i < 2; i++) {
                const int g = 2 * p + i;
                uint8_t q[32] __attribute__((aligned(32)));
                _mm256_store_si256((__m256i *)q, pair[i]);
                for (int j = 0; j < 4; j++) {  /* eight weights at a time */
                    const __m128i eight = _mm_loadl_epi64((const __m128i *)(q + 8 * j));
                    __m256i qi = t == GQ8_0 ? _mm256_cvtepi8_epi32(eight) : _mm256_cvtepu8_epi32(eight);
                    if (t == GQ6_K) qi = _mm256_sub_epi32(qi, _mm256_set1_epi32(32));
                    const __m256 fq = _mm256_mul_ps(_mm256_set1_ps(f[2 * g + j / 2]), _mm256_cvtepi32_ps(qi));
                    const __m256 v = _mm256_sub_ps(fq, _mm256_set1_ps(b[g]));
                    if (bf16)
                        store8_bf16(ob + 32 * g + 8 * j, v);
                    else
                        _mm256_storeu_ps(o + 32 * g + 8 * j, v);
                }
            }
        }
#else
        for (int j = 0; j < 256; j++) {
            const float v = f[j / 16] * (float)(weight_q(t, blk, j) - (t == GQ6_K ? 32 : 0)) - b[j / 32];
            if (bf16)
                ob[j] = bf16_of(v);
            else
                o[j] = v;
        }
#endif
    }
}

/* 4-bit rows (1b: N rows of G = ceil(K / 32) groups, their fp16 scales s (N, G)) as their weights d (q - 8), into
out (N, K): fp32, or bf16 if `bf16`, as mistral/quantize.py's int4_dequantized computes them (then torch's rounding
to bf16): for the products of many rows of x on a CPU that multiplies bf16 (mistral/quantize.py, INT4_BF16_ROWS). */
void int4_dequantize(const uint8_t *w, const uint16_t *s, void *out_, int64_t N, int64_t K, int bf16) {
    const int64_t G = (K + 31) / 32;
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *b = w + (n * G + g) * 16;
            const float d = half_to_float(s[n * G + g]);
            const int64_t at = n * K + 32 * g, count = K - 32 * g < 32 ? K - 32 * g : 32;
            float *o = (float *)out_ + at;
            uint16_t *ob = (uint16_t *)out_ + at;
#ifdef __AVX2__
            if (count == 32) {  /* weights 0..15: the low nibbles, 16..31: the high ones */
                const __m128i q = _mm_loadu_si128((const __m128i *)b), low4 = _mm_set1_epi8(15);
                const __m128i half[2] = {_mm_and_si128(q, low4), _mm_and_si128(_mm_srli_epi16(q, 4), low4)};
                for (int j = 0; j < 4; j++) {
                    const __m128i eight = j % 2 ? _mm_srli_si128(half[j / 2], 8) : half[j / 2];
                    const __m256i qi = _mm256_sub_epi32(_mm256_cvtepu8_epi32(eight), _mm256_set1_epi32(8));
                    const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(qi), _mm256_set1_ps(d));
                    if (bf16)
                        store8_bf16(ob + 8 * j, v);
                    else
                        _mm256_storeu_ps(o + 8 * j, v);
                }
                continue;
            }
#endif
            for (int64_t j = 0; j < count; j++) {
                const float v = (float)((j < 16 ? b[j] & 15 : b[j - 16] >> 4) - 8) * d;
                if (bf16)
                    ob[j] = bf16_of(v);
                else
                    o[j] = v;
            }
        }
}

/* The stacked block-format matrices (1c), each of its own type, against x rounded as they take it (per group for
Q8_0, per super-block for the K-quants), as rounded_products. */
static void block_products(const float *x, stack st, float *y, int64_t M, int64_t K) {
    const int64_t N = st.n[0] + st.n[1] + st.n[2], XB = x_block(M, K / 32);
    int want = 0;
    for (int j = 0; j < 3; j++)
        if (st.n[j]) want |= st.scales[j][0] == GQ8_0 ? PER_GROUP : PER_SUPER;
    const rounded r = round_rows(x, M, K, want);
    for (int64_t m0 = 0; m0 < M; m0 += XB) {
        const int64_t m1 = m0 + XB < M ? m0 + XB : M;
        #pragma omp for schedule(static) nowait
        for (int64_t n = 0; n < N; n++) {
            int j = 0;
            int64_t i = n;
            while (i >= st.n[j]) i -= st.n[j++];
            column_blocks(r, (int)st.scales[j][0], (const uint8_t *)st.w[j], y + n, N, m0, m1, K, i);
        }
    }
    #pragma omp barrier
}

/* The rows of the stacked matrices against the M rows of x (M, K): y (M, n0 + n1 + n2), the products side by side.
An orphaned `omp for`: the rows are split between the threads of the parallel region it is called in. Each case
calls column() with a constant type, so the compiler specializes the loops for it; int8 and int4 weights take x
rounded per group. */
static void products(const float *x, stack st, float *y, int64_t M, int64_t K, enum wtype t) {
    const int64_t N = st.n[0] + st.n[1] + st.n[2];
    if (t == I8 || t == I4) {
        rounded_products(x, st, y, M, K, t);
    } else if (t == GG) {
        block_products(x, st, y, M, K);
    } else if (t == F32) {
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) column(x, st, y + n, N, M, K, n, F32);
    } else {
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) column(x, st, y + n, N, M, K, n, BF16);
    }
}

/* y (M, n0 + n1 + n2) = x @ [w0; w1; w2]^T in one parallel pass over all the rows. w[j] with scales s[j] (int8
only, else NULL) and n[j] rows; n[j] = 0 for an absent matrix. */
void matvec(int t, const float *x, const void *const *w, const float *const *s, const int64_t *n, float *y,
            int64_t M, int64_t K) {
    const stack st = {{w[0], w[1], w[2]}, {s[0], s[1], s[2]}, {n[0], n[1], n[2]}};
    #pragma omp parallel
    products(x, st, y, M, K, (enum wtype)t);
}

/* 2. A layer's attention at decode, from its normalized input x (M, dim) to the output projection. Row m of x is
the one new token of cache row rows[m], where step (4, M) holds rows, slots, lengths and positions one after
another: its query, key and value are one stacked product; query and key heads are rotated (RoPE); the key and
value go into slot slots[m] of that row; the query attends to the row's first lengths[m] slots; wo projects the
result. All in one parallel region: between phases the threads wait for each other
(the barrier at the end of each `omp for`) instead of being started again for each, as separate calls would.

Attention reads the cache as stored, (B, Hkv, W, D) for this layer. Query head h reads kv head h / (H / Hkv)
(grouped-query attention). The slots are in rotated order, which does not matter: a single query sees every valid
slot. Softmax is computed online over blocks of keys: each block's scores are exponentiated against the running
maximum, and what was summed before is rescaled when the maximum grows. */
#define KEY_BLOCK 64

INLINE float dot(const float *a, const float *b, int64_t D) {
    v8 acc = {0};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
        v8 x, y;
        memcpy(&x, a + d, sizeof x);
        memcpy(&y, b + d, sizeof y);
        acc += x * y;
    }
    float s = 0;
    for (int j = 0; j < 8; j++) s += acc[j];
    for (; d < D; d++) s += a[d] * b[d];
    return s;
}

/* One head (D channels) rotated in place: channels (2i, 2i+1) as the complex number x[2i] + x[2i+1] j, times
cs[2i] + cs[2i+1] j = cos + j sin of the token's angle i. */
INLINE void rotate(float *x, const float *cs, int64_t D) {
    for (int64_t i = 0; i < D; i += 2) {
        const float a = x[i], b = x[i + 1];
        x[i] = a * cs[i] - b * cs[i + 1];
        x[i + 1] = a * cs[i + 1] + b * cs[i];
    }
}

/* Query heads h0 .. h0 + G - 1 (D each) against slots [lo, hi) and [lo2, hi2) of k and v (P slots of D, the second
range empty but where a window wraps around the ring): out (G, D). */
static void attend(const float *q, const float *k, const float *v, int64_t lo, int64_t hi, int64_t lo2, int64_t hi2,
                   float *out, int64_t G, int64_t D, float scale) {
    for (int64_t h = 0; h < G; h++) {
        const float *qh = q + h * D;
        float *o = out + h * D, s[KEY_BLOCK], max = -INFINITY, sum = 0;
        for (int64_t d = 0; d < D; d++) o[d] = 0;
        for (int r = 0; r < 2; r++) {
            const int64_t a = r ? lo2 : lo, b = r ? hi2 : hi;
            for (int64_t j0 = a; j0 < b; j0 += KEY_BLOCK) {
                const int64_t nj = b - j0 < KEY_BLOCK ? b - j0 : KEY_BLOCK;
                float block_max = -INFINITY;
                for (int64_t j = 0; j < nj; j++) {
                    s[j] = dot(qh, k + (j0 + j) * D, D) * scale;
                    block_max = s[j] > block_max ? s[j] : block_max;
                }
                const float new_max = block_max > max ? block_max : max, rescale = expf(max - new_max);
                sum *= rescale;
                for (int64_t d = 0; d < D; d++) o[d] *= rescale;
                for (int64_t j = 0; j < nj; j++) {
                    const float p = expf(s[j] - new_max), *vj = v + (j0 + j) * D;
                    sum += p;
                    for (int64_t d = 0; d < D; d++) o[d] += p * vj[d];
                }
                max = new_max;
            }
        }
        for (int64_t d = 0; d < D; d++) o[d] /= sum;
    }
}

/* RoPE's rotations for M tokens: rope (M, D/2, 2) the cos and sin of angle i of position p, p * inv_freq[i],
computed in fp32 as mistral/rope.py computes it. */
static void rope_table(const int64_t *positions, const float *inv_freq, float *rope, int64_t M, int64_t D) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < D / 2; i++) {
            const float angle = (float)positions[m] * inv_freq[i];
            rope[m * D + 2 * i] = cosf(angle);
            rope[m * D + 2 * i + 1] = sinf(angle);
        }
}

/* The phases, for the threads of an enclosing parallel region. w and s: wq, wk, wv, wo and their scales (int8
only, else NULL). rope (M, D/2, 2): cos and sin of each token's angles. qkv (M, (H + 2 Hkv) D) and heads (M, H D):
scratch. out (M, dim). window: this layer's, where narrower than its W slots (a cache with spare slots; 0: it sees
every valid slot); a query then sees the slots of its last `window` positions only, counted back from its own around
the ring: W=6, slot 1 newest, window 3: slots 0..1 and 5. */
static void attention_phases(enum wtype t, const float *x, const void *const *w, const float *const *s,
                             float *cache_k, float *cache_v, const int64_t *step, const float *rope, float *qkv,
                             float *heads, float *out, int64_t M, int64_t dim, int64_t H, int64_t Hkv, int64_t D,
                             int64_t W, int64_t window) {
    const int64_t nq = H * D, nk = Hkv * D, N = nq + 2 * nk, G = H / Hkv;
    const int64_t *rows = step, *slots = step + M, *lengths = step + 2 * M;
    const stack st_qkv = {{w[0], w[1], w[2]}, {s[0], s[1], s[2]}, {nq, nk, nk}}, st_o = {{w[3]}, {s[3]}, {dim}};
    products(x, st_qkv, qkv, M, dim, t);  /* (M, N): the queries, keys and values of every token */
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < M * (H + Hkv); i++) {  /* every query and key head: RoPE; keys and values cached */
        const int64_t m = i / (H + Hkv), h = i % (H + Hkv);
        float *head = qkv + m * N + h * D;
        rotate(head, rope + m * D, D);
        if (h >= H) {
            const int64_t at = ((rows[m] * Hkv + h - H) * W + slots[m]) * D;
            memcpy(cache_k + at, head, D * sizeof(float));
            memcpy(cache_v + at, head + nk, D * sizeof(float));
        }
    }
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < M * Hkv; i++) {  /* (token, kv head): its G query heads share the keys */
        const int64_t m = i / Hkv, g = i % Hkv, at = (rows[m] * Hkv + g) * W * D;
        int64_t lo = 0, hi = lengths[m], lo2 = 0, hi2 = 0;
        if (window > 0 && window < lengths[m]) {
            lo = slots[m] + 1 - window, hi = slots[m] + 1;
            if (lo < 0) lo2 = W + lo, hi2 = W, lo = 0;  /* the window wraps: its oldest slots are the ring's last */
        }
        attend(qkv + m * N + g * G * D, cache_k + at, cache_v + at, lo, hi, lo2, hi2, heads + m * nq + g * G * D, G,
               D, 1 / sqrtf((float)D));
    }
    products(heads, st_o, out, M, nq, t);
}

/* 3. RMSNorm: y[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w, for the M rows of x (M, K). One thread: a row is
a few KB. */
void rms_norm_f32(const float *x, const float *w, float *y, int64_t M, int64_t K, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        const float r = 1.0f / sqrtf(dot(xm, xm, K) / K + eps);
        for (int64_t k = 0; k < K; k++) y[m * K + k] = xm[k] * r * w[k];
    }
}

/* 4. A SwiGLU feed-forward at decode: out (M, dim) = w2 (silu(w1 x) * w3 x) for x (M, dim), in one parallel region
as the attention above. w and s: w1, w3, w2 and their scales (int8 and int4, else NULL). gate_up (M, 2 hidden) and
act (M, hidden): scratch. */
static void ffn_phases(enum wtype t, const float *x, const void *const *w, const float *const *s, float *gate_up,
                       float *act, float *out, int64_t M, int64_t dim, int64_t hidden) {
    const stack st_13 = {{w[0], w[1]}, {s[0], s[1]}, {hidden, hidden}}, st_2 = {{w[2]}, {s[2]}, {dim}};
    products(x, st_13, gate_up, M, dim, t);  /* (M, 2 hidden): gate | up */
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < M * hidden; i++) {
        const int64_t m = i / hidden, j = i % hidden;
        const float g = gate_up[m * 2 * hidden + j];
        act[i] = g / (1 + expf(-g)) * gate_up[m * 2 * hidden + hidden + j];
    }
    products(act, st_2, out, M, hidden, t);
}

/* 5. A mixture of experts at decode (Mixtral's FFN), for the threads of an enclosing parallel region: out (M, dim) is,
for each row of x (M, dim), the sum of its K chosen experts' SwiGLU FFNs, weighted by a softmax over their router
logits, as mistral/moe.py computes it. router (E, dim) fp32; w and s: w1, w3, w2 of each expert, 3 E of them.

A row's experts are the K largest of its E logits (the lower index first among equal ones); their weights are the
softmax of those K logits alone. Each expert runs once per step, on the rows that chose it gathered together, and an
expert no row chose is never read: decode reads only the active parameters. Each row's sum is taken in increasing
expert order, from zero. Scratch: logits and weights (M, E); members (E, M) int64, the rows that chose each expert, and
count (E); gathered and ye (M, dim); gate_up and act as for ffn_phases. */
static void route(const float *logits, int64_t M, int64_t E, int64_t K, float *weights, int64_t *members,
                  int64_t *count) {
    for (int64_t e = 0; e < E; e++) count[e] = 0;
    for (int64_t m = 0; m < M; m++) {
        const float *l = logits + m * E;
        float *wm = weights + m * E, sum = 0;
        int64_t picked[K];
        for (int64_t k = 0; k < K; k++) {  /* the k-th largest; of equal ones the lower index (torch.topk leaves that open) */
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                int taken = 0;
                for (int64_t j = 0; j < k; j++) taken |= picked[j] == e;
                if (!taken && (best < 0 || l[e] > l[best])) best = e;
            }
            picked[k] = best;
        }
        for (int64_t k = 0; k < K; k++) sum += wm[picked[k]] = expf(l[picked[k]] - l[picked[0]]);
        for (int64_t k = 0; k < K; k++) wm[picked[k]] /= sum;
        for (int64_t e = 0; e < E; e++)  /* in increasing order, so each expert's rows are in increasing order */
            for (int64_t k = 0; k < K; k++)
                if (picked[k] == e) members[e * M + count[e]++] = m;
    }
}

static void moe_phases(enum wtype t, const float *x, const float *router, const void *const *w, const float *const *s,
                       float *logits, float *weights, int64_t *members, int64_t *count, float *gathered, float *ye,
                       float *gate_up, float *act, float *out, int64_t M, int64_t dim, int64_t hidden, int64_t E,
                       int64_t K) {
    const stack st_router = {{router}, {NULL}, {E}};
    products(x, st_router, logits, M, dim, F32);  /* (M, E) */
    #pragma omp single
    {
        route(logits, M, E, K, weights, members, count);
        for (int64_t i = 0; i < M * dim; i++) out[i] = 0;
    }
    for (int64_t e = 0; e < E; e++) {
        const int64_t Me = count[e], *rows = members + e * M;
        if (Me == 0) continue;
        const float *xe = x;  /* every row chose e: they are x's rows, in order */
        if (Me < M) {
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < Me * dim; i++) gathered[i] = x[rows[i / dim] * dim + i % dim];
            xe = gathered;
        }
        ffn_phases(t, xe, w + 3 * e, s + 3 * e, gate_up, act, ye, Me, dim, hidden);
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < Me * dim; i++) {
            const int64_t m = rows[i / dim];
            out[m * dim + i % dim] += weights[m * E + e] * ye[i];
        }
    }
}

/* 6. The transformer blocks of a decode step, one after another, in one parallel region: for each layer l,
    h = x + attention(rms_norm(x) * attention_norm[l]);  x = h + ffn(rms_norm(h) * ffn_norm[l])
where ffn is a SwiGLU feed-forward, or with routers a mixture of E experts of which each token takes K.
norms: attention_norm and ffn_norm of each layer, 2 L pointers to dim floats. w and s: for each layer wq, wk, wv, wo
and then w1, w3, w2 of each expert (one for a dense FFN, E = 1), 4 + 3 E pointers a layer, and their scales.
routers: NULL for dense layers, else L pointers to (E, dim) fp32. cache_k, cache_v: L pointers each, layer l's
cache (B, Hkv, slots[l], D); steps: L pointers, the step of layer l's cache (4, M), as attention_phases takes it
(layers whose caches keep as many slots share one; the positions, its last row, are every layer's); windows: L, layer
l's window where narrower than its slots (spare slots kept for speculation), else 0. y (M, dim) carries the running
x from layer to layer and ends as the last layer's output (x is not written). inv_freq (D/2): RoPE's frequencies, from
which each token's rotations are computed once for all layers. scratch: M (4 dim + (2 H + 2 Hkv + 1) D + 3 hidden + 2 E) floats; routing: E (M + 1) int64. The rest as
for attention_phases. */
void blocks(int type, int64_t L, const float *x, const float *const *norms, float eps, const void *const *w,
            const float *const *s, const float *const *routers, int64_t E, int64_t K, float *const *cache_k,
            float *const *cache_v, const int64_t *const *steps, const int64_t *slots, const int64_t *windows,
            const float *inv_freq, float *scratch, int64_t *routing, float *y, int64_t M, int64_t dim, int64_t H,
            int64_t Hkv, int64_t D, int64_t hidden) {
    const enum wtype t = (enum wtype)type;
    const int64_t P = 4 + 3 * E;  /* pointers of a layer */
    float *xn = scratch, *out = xn + M * dim, *qkv = out + M * dim, *heads = qkv + M * (H + 2 * Hkv) * D;
    float *gate_up = heads + M * H * D, *act = gate_up + M * 2 * hidden, *rope = act + M * hidden;
    float *logits = rope + M * D, *weights = logits + M * E, *gathered = weights + M * E, *ye = gathered + M * dim;
    rope_table(steps[0] + 3 * M, inv_freq, rope, M, D);
    #pragma omp parallel
    for (int64_t l = 0; l < L; l++) {
        const float *in = l == 0 ? x : y;
        #pragma omp single
        rms_norm_f32(in, norms[2 * l], xn, M, dim, eps);
        attention_phases(t, xn, w + P * l, s + P * l, cache_k[l], cache_v[l], steps[l], rope, qkv, heads, out, M, dim,
                         H, Hkv, D, slots[l], windows[l]);
        #pragma omp single
        {
            for (int64_t i = 0; i < M * dim; i++) y[i] = in[i] + out[i];
            rms_norm_f32(y, norms[2 * l + 1], xn, M, dim, eps);
        }
        if (routers)
            moe_phases(t, xn, routers[l], w + P * l + 4, s + P * l + 4, logits, weights, routing, routing + E * M,
                       gathered, ye, gate_up, act, out, M, dim, hidden, E, K);
        else
            ffn_phases(t, xn, w + P * l + 4, s + P * l + 4, gate_up, act, out, M, dim, hidden);
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < M * dim; i++) y[i] += out[i];
    }
}

/* 7. Greedy decoding's last step: for each of the M rows of logits x (M, V), the index of its largest entry (the
first, on ties; the first NaN, if any, as torch.argmax) and that entry's log-softmax, x[i] - log(sum_j e^(x[j])).
Torch's own argmax and log_softmax take 40-90 us each on one row of 32000 (their reductions with an index do not
vectorize); this is one pass for the maximum and one for the sum. */

typedef int32_t i32v8 __attribute__((vector_size(32)));

/* e^x for x <= 0, to about 1e-7 relative: 2^n * 2^f with x log2(e) = n + f, n an integer and |f| <= 1/2, 2^f by its
Taylor series to f^6. Below -87 (where e^x leaves the normal floats) the answer is e^-87, not 0: against a sum
that holds e^0 = 1 for the maximum, that is nothing. */
INLINE v8 exp_nonpositive(v8 x) {
    const v8 lo = (v8){0} - 87.0f, round = (v8){0} + 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer */
    const i32v8 below = x < lo;
    x = (v8)((below & (i32v8)lo) | (~below & (i32v8)x));
    const v8 t = x * 1.44269504f, n = (t + round) - round, f = t - n;
    v8 p = 1.5403530e-4f * f + 1.3333558e-3f;
    p = p * f + 9.6181291e-3f;
    p = p * f + 5.5504109e-2f;
    p = p * f + 2.4022651e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    const i32v8 scale = (__builtin_convertvector(n, i32v8) + 127) << 23;  /* 2^n, built from its exponent bits */
    return p * (v8)scale;
}

void greedy(const float *x, int64_t M, int64_t V, int64_t *index, float *logprob) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * V;
        /* Pass 1: two sets of 8 lanes, each with its largest entry so far and where it was (the first, as the
        comparison is strict), and whether any entry was NaN. */
        v8 best[2] = {(v8){0} - INFINITY, (v8){0} - INFINITY};
        i32v8 at[2] = {{0}, {0}}, nan = {0}, js = {0, 1, 2, 3, 4, 5, 6, 7};
        int64_t j = 0;
        for (; j + 16 <= V; j += 16, js += 16)
            for (int u = 0; u < 2; u++) {
                v8 v;
                memcpy(&v, xm + j + 8 * u, sizeof v);
                const i32v8 more = v > best[u];
                best[u] = (v8)((more & (i32v8)v) | (~more & (i32v8)best[u]));
                at[u] = (more & (js + 8 * u)) | (~more & at[u]);
                nan |= v != v;
            }
        float max = -INFINITY;
        int64_t i = 0;
        int any_nan = 0;
        for (int u = 0; u < 2; u++)
            for (int l = 0; l < 8; l++) {
                any_nan |= nan[l];
                if (best[u][l] > max || (best[u][l] == max && at[u][l] < i)) max = best[u][l], i = at[u][l];
            }
        for (; j < V; j++) {
            any_nan |= xm[j] != xm[j];
            if (xm[j] > max) max = xm[j], i = j;
        }
        if (any_nan) {
            for (i = 0; xm[i] == xm[i]; i++) {}
            index[m] = i, logprob[m] = NAN;
            continue;
        }
        index[m] = i;  /* a row of -inf: 0, as torch */
        if (!isfinite(max)) {  /* +inf (inf - inf) or all -inf: NaN, as torch */
            logprob[m] = NAN;
            continue;
        }
        /* Pass 2: the sum of e^(x - max), two sums at a time. */
        v8 acc[2] = {{0}, {0}};
        const v8 vmax = (v8){0} + max;
        for (j = 0; j + 16 <= V; j += 16)
            for (int u = 0; u < 2; u++) {
                v8 v;
                memcpy(&v, xm + j + 8 * u, sizeof v);
                acc[u] += exp_nonpositive(v - vmax);
            }
        float sum = 0;
        for (int l = 0; l < 8; l++) sum += acc[0][l] + acc[1][l];
        for (; j < V; j++) sum += expf(xm[j] - max);
        logprob[m] = -logf(sum);
    }
}
