/* The engine's small per-layer ops as single C calls (the "cpu" backend in vol3_inference/ops.py).
 *
 * At batch 1 a decode step is dozens of tiny PyTorch ops, each paying several microseconds of
 * dispatch for a few hundred floats of work: RMSNorm alone is six ATen ops, and decode attention is
 * two block gathers (copies of the whole context), views and an SDPA call. Here each is one call:
 *
 *   rmsnorm_f32: y = x / sqrt(mean(x^2) + eps) * w, per row (Zhang & Sennrich 2019, eq. 4).
 *   rope_qkv_cache_f32: split the fused qkv rows, rotate q and k by their positions' angles (RoPE,
 *     Su et al. 2021, eq. 34, Meta's interleaved pairs: (x0 + i x1)(cos + i sin)), and store k and v
 *     in their cache slots; the rotated q, k and v also go to `out` for attention.
 *   gemv_colmajor_f32: y = x @ W^T for a few rows x, with W stored column-major (the engine's fp32
 *     layout, engine.gemv_layout): four rows of W^T per pass are scaled by their x and added into y,
 *     which stays in L1/L2, so the weights stream through once, in order, with a software prefetch.
 *   paged_decode_attention_f32: one query token per sequence against its cached keys and values,
 *     read in place through the block table (Kwon et al. 2023, PagedAttention, section 4.1): no
 *     gather, no padding. Softmax in two passes over a score buffer (max, then exp and sum).
 *
 * float32 only; the caller (vol3_inference/cpu_kernels.py) checks shapes, dtypes and contiguity.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float dot(const float *a, const float *b, int64_t n) {  /* n % 8 == 0 */
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum_ps(acc);
}

/* x, y (N, D), w (D,); D % 8 == 0. */
void rmsnorm_f32(const float *x, const float *w, float *y, int64_t N, int64_t D, float eps) {
    for (int64_t n = 0; n < N; n++) {
        const float *r = x + n * D;
        float ss = dot(r, r, D);
        __m256 inv = _mm256_set1_ps(1.0f / sqrtf(ss / (float)D + eps));
        for (int64_t i = 0; i < D; i += 8)
            _mm256_storeu_ps(y + n * D + i,
                             _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(r + i), inv), _mm256_loadu_ps(w + i)));
    }
}

/* Columns [n0, n1) of y (N,) = x (K,) @ wt, wt (K, N) row-major. */
static void gemv_cols(const float *x, const float *wt, float *y, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    int64_t n8 = n0 + (n1 - n0) / 8 * 8;
    memset(y + n0, 0, (n1 - n0) * sizeof(float));
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
        const float *r0 = wt + k * N, *r1 = r0 + N, *r2 = r1 + N, *r3 = r2 + N;
        __m256 x0 = _mm256_set1_ps(x[k]), x1 = _mm256_set1_ps(x[k + 1]);
        __m256 x2 = _mm256_set1_ps(x[k + 2]), x3 = _mm256_set1_ps(x[k + 3]);
        for (int64_t n = n0; n < n8; n += 8) {
            _mm_prefetch((const char *)(r0 + n + 4 * N), _MM_HINT_T0);
            _mm_prefetch((const char *)(r1 + n + 4 * N), _MM_HINT_T0);
            _mm_prefetch((const char *)(r2 + n + 4 * N), _MM_HINT_T0);
            _mm_prefetch((const char *)(r3 + n + 4 * N), _MM_HINT_T0);
            __m256 acc = _mm256_loadu_ps(y + n);
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + n), x0, acc);
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(r1 + n), x1, acc);
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(r2 + n), x2, acc);
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(r3 + n), x3, acc);
            _mm256_storeu_ps(y + n, acc);
        }
        for (int64_t n = n8; n < n1; n++) y[n] += r0[n] * x[k] + r1[n] * x[k + 1] + r2[n] * x[k + 2] + r3[n] * x[k + 3];
    }
    for (; k < K; k++)
        for (int64_t n = n0; n < n1; n++) y[n] += wt[k * N + n] * x[k];
}

/* x (M, K), y (M, N); wt (K, N) row-major, i.e. W (N, K) stored column-major. Any N, K. With
 * n_threads > 1, each OpenMP thread (torch's: see w8a16_avx2.c) takes one contiguous range of columns,
 * so it still reads long runs of every row of wt (short strided pieces stream badly: 64-column blocks
 * measured 0.7x of one thread's whole rows). */
void gemv_colmajor_f32(const float *x, const float *wt, float *y, int64_t M, int64_t N, int64_t K,
                       int64_t n_threads) {
    for (int64_t m = 0; m < M; m++) {
        #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
        for (int64_t j = 0; j < n_threads; j++) {
            int64_t a = N * j / n_threads / 8 * 8, b = j == n_threads - 1 ? N : N * (j + 1) / n_threads / 8 * 8;
            gemv_cols(x + m * K, wt, y + m * N, N, K, a, b);
        }
    }
}

/* qkv, out (N, (H + 2 Hkv) hd): per row [q heads | k heads | v heads]; table (max_pos, hd/2, 2) holds
 * (cos, sin) per position and pair; pos, slots (N,) int64; k_cache, v_cache (n_slots, Hkv, hd).
 * Returns 0, or before writing anything: 1 if a position is outside [0, max_pos), 2 if a slot is
 * outside [0, n_slots). hd is even. */
int64_t rope_qkv_cache_f32(const float *qkv, float *out, const float *table, const int64_t *pos,
                           const int64_t *slots, float *k_cache, float *v_cache, int64_t N, int64_t H,
                           int64_t Hkv, int64_t hd, int64_t max_pos, int64_t n_slots) {
    for (int64_t n = 0; n < N; n++) {
        if (pos[n] < 0 || pos[n] >= max_pos) return 1;
        if (slots[n] < 0 || slots[n] >= n_slots) return 2;
    }
    int64_t width = (H + 2 * Hkv) * hd, kv = Hkv * hd;
    for (int64_t n = 0; n < N; n++) {
        const float *x = qkv + n * width, *t = table + pos[n] * hd;
        float *o = out + n * width;
        for (int64_t h = 0; h < H + Hkv; h++)  /* q and k heads */
            for (int64_t i = 0; i < hd; i += 2) {
                float a = x[h * hd + i], b = x[h * hd + i + 1], c = t[i], s = t[i + 1];
                o[h * hd + i] = a * c - b * s;
                o[h * hd + i + 1] = a * s + b * c;
            }
        for (int64_t i = 0; i < kv; i++) o[(H + Hkv) * hd + i] = x[(H + Hkv) * hd + i];  /* v */
        float *kc = k_cache + slots[n] * kv, *vc = v_cache + slots[n] * kv;
        for (int64_t i = 0; i < kv; i++) {
            kc[i] = o[H * hd + i];
            vc[i] = o[(H + Hkv) * hd + i];
        }
    }
    return 0;
}

/* q (B, H, hd) with q_stride floats between sequences; out (B, H, hd); k_cache, v_cache (NB, bs, Hkv, hd); tables (B, W) int64; lens (B,) int64
 * (positions cached, this step's included); scores: scratch of W * bs floats.
 * Query head h reads key/value head h / (H / Hkv) (GQA). hd % 8 == 0.
 * Returns 0, or before touching `out`: 1 if a length is outside [1, W * bs], 2 if a block id that
 * a length reaches is outside [0, NB) (so bad input is an error, not a read out of bounds). */
int64_t paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                                   const int64_t *tables, const int64_t *lens, float *out, float *scores,
                                   int64_t B, int64_t H, int64_t Hkv, int64_t hd, int64_t bs, int64_t W,
                                   int64_t NB, int64_t q_stride, float scale) {
    int64_t group = H / Hkv, row = Hkv * hd;  /* floats per cached token */
    for (int64_t b = 0; b < B; b++) {
        if (lens[b] < 1 || lens[b] > W * bs) return 1;
        for (int64_t j = 0; j < (lens[b] + bs - 1) / bs; j++)
            if (tables[b * W + j] < 0 || tables[b * W + j] >= NB) return 2;
    }
    for (int64_t b = 0; b < B; b++) {
        const int64_t *table = tables + b * W;
        int64_t S = lens[b];
        for (int64_t h = 0; h < H; h++) {
            int64_t kvh = h / group;
            const float *qh = q + b * q_stride + h * hd;
            float m = -INFINITY;
            for (int64_t s = 0; s < S; s++) {
                const float *k = k_cache + (table[s / bs] * bs + s % bs) * row + kvh * hd;
                float z = dot(qh, k, hd) * scale;
                scores[s] = z;
                if (z > m) m = z;
            }
            float l = 0.f;
            for (int64_t s = 0; s < S; s++) {
                float e = expf(scores[s] - m);
                scores[s] = e;
                l += e;
            }
            float *o = out + (b * H + h) * hd;
            for (int64_t i = 0; i < hd; i += 8) _mm256_storeu_ps(o + i, _mm256_setzero_ps());
            for (int64_t s = 0; s < S; s++) {
                const float *v = v_cache + (table[s / bs] * bs + s % bs) * row + kvh * hd;
                __m256 p = _mm256_set1_ps(scores[s] / l);
                for (int64_t i = 0; i < hd; i += 8)
                    _mm256_storeu_ps(o + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(v + i), _mm256_loadu_ps(o + i)));
            }
        }
    }
    return 0;
}
