/* int8 weights x int16 activations on AVX2: the engine's CPU int8 matmul (route "w8a16").
 *
 * y (M, N) = x (M, K) @ W^T with W ~= q * scale[:, None], q (N, K) int8 (vol3_inference/quant.py).
 * Each row of x is first rounded to int16 with its own scale, x ~= xq * sx[m], sx = max|x_m| / 32767,
 * so an output is
 *
 *     y[m, n] = sx[m] * scale[n] * sum_k xq[m, k] * q[n, k]       (an exact int32 sum),
 *
 * computed 16 products at a time by vpmaddwd (_mm256_madd_epi16: int16 x int16, adjacent pairs added
 * into int32 lanes). The only rounding besides the weights' own is xq's: at most sx/2 per activation,
 * 1/65534 of the row's largest value, where bf16 activations would keep 8 bits. Per 16 weights the
 * loop issues one sign-extending load (int8 -> int16), one vpmaddwd per activation row and one add,
 * where converting each weight to float takes 4 instructions per 8 weights. At batch 1 one core is
 * bound by how many cache misses it keeps in flight (~14 GB/s of int8 weights from DRAM on this
 * project's VM, whatever the prefetch distance), not by DRAM itself.
 *
 * Overflow: a lane adds K/16 pairs of products of at most 127 * 32767, so the int32 lanes are flushed
 * to float every KCHUNK = 2048 columns (2048/16 * 2 * 127 * 32767 < 2^31), and the 8 lanes are added
 * in float (their int32 sum could overflow).
 * Weights stream once per call: output rows go in tiles of NTILE, and every block of up to 4
 * activation rows runs over a tile while it is still in cache.
 *
 * Plain C with intrinsics, compiled at first use by vol3_inference/cpu_kernels.py with
 * `cc -O3 -mavx2 -mfma -fopenmp`; called through ctypes. Requires K % 16 == 0 (the caller checks).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define KCHUNK 2048
#define NTILE 64
#define PREFETCH 8192

/* Lanes i + (i + 4), i = 0..3, in float: the first add of hsum_i32 and hsum4_i32. */
static inline __m128 halves(__m256i v) {
    __m256 f = _mm256_cvtepi32_ps(v);
    return _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
}

/* The sum of 8 int32 lanes, added in float: each lane fits in int32, their sum may not. */
static inline float hsum_i32(__m256i v) {
    __m128 s = halves(v);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256i load_w16(const int8_t *p) {  /* 16 int8 weights, sign-extended to int16 */
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
}

static inline __m256i load_x16(const int16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* One activation row against one weight row, two accumulators, 32 weights per step: batch 1's last
 * N % 4 rows (the rest go 4 at a time, rows4_1 below). */
static void row_1(const int16_t *x, int64_t K, const int8_t *w, float *acc) {
    for (int64_t c = 0; c < K; c += KCHUNK) {
        int64_t e = c + KCHUNK < K ? c + KCHUNK : K, k = c;
        __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
        for (; k + 32 <= e; k += 32) {
            _mm_prefetch((const char *)(w + k + PREFETCH), _MM_HINT_T0);
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(load_w16(w + k), load_x16(x + k)));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(load_w16(w + k + 16), load_x16(x + k + 16)));
        }
        if (k < e) a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(load_w16(w + k), load_x16(x + k)));
        acc[0] += hsum_i32(_mm256_add_epi32(a0, a1));
    }
}

/* One activation row (decode at batch 1, the memory-bound case) against 4 consecutive weight rows w
 * (4, K): acc[i] = x . w[i]. Each pair of activation vectors is loaded once for the 4 rows, and the 4
 * rows are one contiguous run of 4K bytes, prefetched in order PREFETCH bytes ahead (two 64-byte lines
 * per 128 bytes consumed): the hardware prefetcher alone does not run far enough ahead. (The prefetch
 * walks the block in address order while the loads walk its 4 rows side by side, so row j's line at
 * column k is fetched in time only while j K - PREFETCH <= 3 k: for K above ~2.7k the first lines of
 * rows 2-3 are demand misses. The engine's presets have K <= 1376.)
 * Measured on this project's 2-core EPYC VM, over seed512's whole int8 decode step on two threads
 * (interleaved runs in one process; the matrices come from DRAM): 4 rows at a time decoded 1.02-1.34x
 * faster than one row at a time with the same prefetch; 2, 4 and 8 KB ahead were within the noise of
 * each other; with no software prefetch one thread streamed ~35% slower. Handing the tiles to the
 * threads interleaved (OpenMP dynamic, guided or static with chunk 4) instead of in two contiguous
 * halves was 1.1-1.5x slower. */
/* hsum_i32 of 4 vectors at once, adding in exactly its order ((s0 + s2) + (s1 + s3) of the halves), so
 * that an output is the same to the last bit whichever kernel computed it: the engine's step is
 * batch-invariant (a sequence's logits do not depend on the rows beside it; tests/test_vol3_fused.py). */
static inline __m128 hsum4_i32(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
    __m128 s0 = halves(a0), s1 = halves(a1), s2 = halves(a2), s3 = halves(a3);
    _MM_TRANSPOSE4_PS(s0, s1, s2, s3);  /* s0 = the four vectors' first partial sums, ... */
    return _mm_add_ps(_mm_add_ps(s0, s2), _mm_add_ps(s1, s3));
}
#define MADD4(k, xv) do {                                                               \
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(load_w16(w + (k)), xv));          \
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(load_w16(w + K + (k)), xv));      \
        a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(load_w16(w + 2 * K + (k)), xv));  \
        a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(load_w16(w + 3 * K + (k)), xv));  \
    } while (0)
static void rows4_1(const int16_t *x, int64_t K, const int8_t *w, float *acc) {
    __m128 sum = _mm_setzero_ps();
    for (int64_t c = 0; c < K; c += KCHUNK) {
        int64_t e = c + KCHUNK < K ? c + KCHUNK : K, k = c;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (; k + 32 <= e; k += 32) {
            _mm_prefetch((const char *)(w + 4 * k + PREFETCH), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + 4 * k + 64 + PREFETCH), _MM_HINT_T0);
            __m256i x0 = load_x16(x + k), x1 = load_x16(x + k + 16);
            MADD4(k, x0);
            MADD4(k + 16, x1);
        }
        if (k < e) { __m256i x0 = load_x16(x + k); MADD4(k, x0); }
        sum = _mm_add_ps(sum, hsum4_i32(a0, a1, a2, a3));
    }
    _mm_storeu_ps(acc, sum);
}

/* MB (2..4) activation rows x (MB, K) against one weight row w (K,): acc[j] += x[j] . w.
 * MB is a compile-time constant in each copy, so the accumulators live in registers. */
#define ROW_KERNEL(MB)                                                                          \
    static void row_##MB(const int16_t *x, int64_t K, const int8_t *w, float *acc) {          \
        for (int64_t c = 0; c < K; c += KCHUNK) {                                               \
            int64_t e = c + KCHUNK < K ? c + KCHUNK : K;                                        \
            __m256i a[MB];                                                                      \
            for (int j = 0; j < MB; j++) a[j] = _mm256_setzero_si256();                         \
            for (int64_t k = c; k < e; k += 16) {                                               \
                _mm_prefetch((const char *)(w + k + PREFETCH), _MM_HINT_T0);                    \
                __m256i wk = load_w16(w + k);                                                   \
                for (int j = 0; j < MB; j++)                                                    \
                    a[j] = _mm256_add_epi32(a[j], _mm256_madd_epi16(wk, load_x16(x + j * K + k))); \
            }                                                                                   \
            for (int j = 0; j < MB; j++) acc[j] += hsum_i32(a[j]);                       \
        }                                                                                       \
    }
ROW_KERNEL(2)
ROW_KERNEL(3)
ROW_KERNEL(4)

/* xq[m, :] = round(x[m, :] / sx[m]), sx[m] = max|x[m, :]| / 32767 (1 for an all-zero row). A row with
 * a NaN or an infinity gets sx = NaN, so its outputs are NaN rather than silently finite; the inverse
 * scale is computed in double, so rows with tiny values (down to float's subnormals) still round.
 * Rounding is to nearest even, 8 values at a time (what lrint does one at a time, at several
 * nanoseconds each: at 16 rows that was a visible part of a small int8 matmul). */
void quantize_rows_i16(const float *x, int16_t *xq, float *sx, int64_t M, int64_t K) {
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * K;
        float amax = 0.f;
        int finite = 1;
        for (int64_t k = 0; k < K; k++) {
            float a = fabsf(r[k]);
            if (!isfinite(a)) finite = 0;
            else if (a > amax) amax = a;
        }
        if (!finite) {
            sx[m] = NAN;
            for (int64_t k = 0; k < K; k++) xq[m * K + k] = 0;
            continue;
        }
        double inv = amax > 0.f ? 32767.0 / (double)amax : 1.0;
        sx[m] = amax > 0.f ? (float)((double)amax / 32767.0) : 1.f;
        /* r[k] * inv in double, rounded to nearest even as lrint does: 8 at a time (two conversions of 4) */
        __m256d iv = _mm256_set1_pd(inv);
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            __m128i lo = _mm256_cvtpd_epi32(_mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(r + k)), iv));
            __m128i hi = _mm256_cvtpd_epi32(_mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(r + k + 4)), iv));
            _mm_storeu_si128((__m128i *)(xq + m * K + k), _mm_packs_epi32(lo, hi));
        }
        for (; k < K; k++) xq[m * K + k] = (int16_t)lrint((double)r[k] * inv);
    }
}

/* y (M, N) float32 = (xq * sx) @ (q * scale)^T, output columns [n0, n1) only (so that threads can
 * share one call's columns); xq (M, K) int16, q (N, K) int8, K % 16 == 0. */
void w8a16_linear(const int16_t *xq, const float *sx, const int8_t *q, const float *scale, float *y,
                  int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    for (int64_t t0 = n0; t0 < n1; t0 += NTILE) {
        int64_t t1 = t0 + NTILE < n1 ? t0 + NTILE : n1;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            int64_t mb = M - m0 < 4 ? M - m0 : 4;
            const int16_t *x = xq + m0 * K;
            int64_t n = t0;
            if (mb == 1)
                for (; n + 4 <= t1; n += 4) {
                    float acc[4];
                    rows4_1(x, K, q + n * K, acc);
                    for (int j = 0; j < 4; j++) y[m0 * N + n + j] = acc[j] * sx[m0] * scale[n + j];
                }
            for (; n < t1; n++) {
                float acc[4] = {0.f, 0.f, 0.f, 0.f};
                const int8_t *w = q + n * K;
                switch (mb) {
                    case 1: row_1(x, K, w, acc); break;
                    case 2: row_2(x, K, w, acc); break;
                    case 3: row_3(x, K, w, acc); break;
                    default: row_4(x, K, w, acc); break;
                }
                for (int64_t j = 0; j < mb; j++) y[(m0 + j) * N + n] = acc[j] * sx[m0 + j] * scale[n];
            }
        }
    }
}

/* Both steps in one call: xq, sx are scratch of (M, K), (M,). With n_threads > 1 the output columns
 * are split over OpenMP threads in tiles (the process has one OpenMP runtime: this library is loaded
 * after torch, and its libgomp.so.1 is the one already in memory, so these are torch's threads). */
void w8a16_linear_f32(const float *x, int16_t *xq, float *sx, const int8_t *q, const float *scale, float *y,
                      int64_t M, int64_t N, int64_t K, int64_t n_threads) {
    quantize_rows_i16(x, xq, sx, M, K);
    int64_t ntiles = (N + NTILE - 1) / NTILE;
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t t = 0; t < ntiles; t++) {
        int64_t a = t * NTILE, b = a + NTILE < N ? a + NTILE : N;
        w8a16_linear(xq, sx, q, scale, y, M, N, K, a, b);
    }
}
