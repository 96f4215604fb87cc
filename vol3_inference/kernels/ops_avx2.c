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
 *   paged_decode_attention_f32: one query token per sequence against its cached keys and values,
 *     read in place through the block table (Kwon et al. 2023, PagedAttention, section 4.1): no
 *     gather, no padding. Softmax in two passes over a score buffer (max, then exp and sum).
 *   matmul_packed_f32: y = x @ W^T with W packed in 16-column panels, the fused step's matmul.
 *   forward_step_f32: a whole engine step (embedding, every layer, the LM head) for any mix of decode
 *     rows and prefill chunks, built from the pieces above (see "A whole engine step" below).
 *   argmax_rows_f32: the greedy token of each of a step's logits rows, as torch.argmax gives it.
 *
 * float32 activations; the caller (vol3_inference/cpu_kernels.py) checks shapes, dtypes and
 * contiguity, and each kernel checks every index it reads through.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax_ps(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline float dot(const float *a, const float *b, int64_t n) {  /* n % 8 == 0 */
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum_ps(acc);
}

/* out[r] = the index of the largest of row r's V >= 1 floats (R rows, row r at xs + r * stride), as
 * torch.argmax gives it: the first NaN if the row has one, else the first index of the largest value
 * (-0.0 and 0.0 are equal). Two passes, 8 floats at a time: the maximum (and whether a NaN is there),
 * then the first 8 that hold it, and the index within them. A step's greedy tokens
 * (sampling.greedy_tokens), where torch's argmax along a row is a scalar loop. */
void argmax_rows_f32(const float *xs, int64_t R, int64_t V, int64_t stride, int64_t *out) {
    for (int64_t r = 0; r < R; r++) {
        const float *x = xs + r * stride;
        __m256 mv = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= V; i += 8) {
            __m256 v = _mm256_loadu_ps(x + i);
            mv = _mm256_max_ps(mv, v);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float m = hmax_ps(mv);
        int has_nan = _mm256_movemask_ps(nan) != 0;
        for (; i < V; i++) {
            if (isnan(x[i])) has_nan = 1;
            else if (x[i] > m) m = x[i];
        }
        __m256 target = _mm256_set1_ps(m);
        int64_t j = 0;
        for (; j + 8 <= V; j += 8) {  /* the first lane that is NaN, or equal to m */
            __m256 v = _mm256_loadu_ps(x + j);
            int hit = _mm256_movemask_ps(has_nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, target, _CMP_EQ_OQ));
            if (hit) break;
        }
        while (j < V - 1 && (has_nan ? !isnan(x[j]) : x[j] != m)) j++;
        out[r] = j;
    }
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

/* ---- Matmul on packed weights (the fused step's) --------------------------------------------------
 *
 * A weight W (N, K) packed in panels of 16 output columns: panel p is W[16p : 16p + 16, :]^T stored
 * (K, 16) row by row, contiguous, and the panels follow each other (the last one zero-padded).
 * A panel is 64 bytes per k, read front to back; the whole matrix is read in order, once per call,
 * whatever the number of rows. (The column-major (K, N) layout read 16 columns at a time instead
 * jumps N floats per k: with N = 1024 or 2048 every line of a panel falls into the same L1 set and
 * a new page, and two rows measured two to three times slower than one.) */

#define PANEL 16

/* MB (1..6) rows of x (MB, K) against one panel (K, 16): out[j, 0:16] = x[j] @ panel. Each output
 * is one chain of FMAs, k = 0, 1, ..., K - 1 in order, and every kernel below sums in that order, so
 * an output's bits depend on its row and column only: how many rows share its block, or which kernel
 * runs it, changes nothing (batch-invariant; tests check it bit for bit). An FMA takes about 4 cycles
 * to finish and two start per cycle, so about 8 independent chains must be in flight: a block of 6
 * rows x 2 vectors gives 12 (the most that fit: 12 accumulators, 2 weight vectors and a broadcast fill
 * 15 of the 16 vector registers; a block of 2-3 rows has only 4-6, which costs speed, not bits); each
 * pair of weight vectors loaded serves all MB rows. MB is a compile-time constant in each copy.
 * pf: NULL, or the next panel, prefetched into L1 one 64-byte line per k (see matmul_packed). */
#define ROWS_KERNEL(MB)                                                                                    \
    static void rows_##MB(const float *x, int64_t K, const float *panel, float *out, const float *pf) {    \
        __m256 a0[MB], a1[MB];                                                                             \
        for (int j = 0; j < MB; j++) a0[j] = a1[j] = _mm256_setzero_ps();                                  \
        for (int64_t k = 0; k < K; k++) {                                                                  \
            if (pf) _mm_prefetch((const char *)(pf + k * PANEL), _MM_HINT_T0);                             \
            __m256 w0 = _mm256_loadu_ps(panel + k * PANEL), w1 = _mm256_loadu_ps(panel + k * PANEL + 8);   \
            for (int j = 0; j < MB; j++) {                                                                 \
                __m256 xk = _mm256_broadcast_ss(x + j * K + k);                                            \
                a0[j] = _mm256_fmadd_ps(w0, xk, a0[j]);                                                    \
                a1[j] = _mm256_fmadd_ps(w1, xk, a1[j]);                                                    \
            }                                                                                              \
        }                                                                                                  \
        for (int j = 0; j < MB; j++) {                                                                     \
            _mm256_storeu_ps(out + j * PANEL, a0[j]);                                                      \
            _mm256_storeu_ps(out + j * PANEL + 8, a1[j]);                                                  \
        }                                                                                                  \
    }
ROWS_KERNEL(1)
ROWS_KERNEL(2)
ROWS_KERNEL(3)
ROWS_KERNEL(4)
ROWS_KERNEL(5)
ROWS_KERNEL(6)

/* One row against 4 consecutive panels (out: 4 x 16): the 8 chains a lone row needs, in the same
 * order as rows_1 (decode at batch 1). */
static void row_x4(const float *x, int64_t K, const float *panel, float *out) {
    const float *p1 = panel + K * PANEL, *p2 = p1 + K * PANEL, *p3 = p2 + K * PANEL;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
    for (int64_t k = 0; k < K; k++) {
        __m256 xk = _mm256_broadcast_ss(x + k);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(panel + k * PANEL), xk, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(panel + k * PANEL + 8), xk, a1);
        b0 = _mm256_fmadd_ps(_mm256_loadu_ps(p1 + k * PANEL), xk, b0);
        b1 = _mm256_fmadd_ps(_mm256_loadu_ps(p1 + k * PANEL + 8), xk, b1);
        c0 = _mm256_fmadd_ps(_mm256_loadu_ps(p2 + k * PANEL), xk, c0);
        c1 = _mm256_fmadd_ps(_mm256_loadu_ps(p2 + k * PANEL + 8), xk, c1);
        d0 = _mm256_fmadd_ps(_mm256_loadu_ps(p3 + k * PANEL), xk, d0);
        d1 = _mm256_fmadd_ps(_mm256_loadu_ps(p3 + k * PANEL + 8), xk, d1);
    }
    _mm256_storeu_ps(out, a0);
    _mm256_storeu_ps(out + 8, a1);
    _mm256_storeu_ps(out + 16, b0);
    _mm256_storeu_ps(out + 24, b1);
    _mm256_storeu_ps(out + 32, c0);
    _mm256_storeu_ps(out + 40, c1);
    _mm256_storeu_ps(out + 48, d0);
    _mm256_storeu_ps(out + 56, d1);
}

/* y[0:cols] = o (+ y with `accumulate`), cols <= 16. */
static inline void put_panel(float *y, const float *o, int64_t cols, int accumulate) {
    if (cols == PANEL && accumulate) {
        _mm256_storeu_ps(y, _mm256_add_ps(_mm256_loadu_ps(y), _mm256_loadu_ps(o)));
        _mm256_storeu_ps(y + 8, _mm256_add_ps(_mm256_loadu_ps(y + 8), _mm256_loadu_ps(o + 8)));
    } else if (cols == PANEL) {
        memcpy(y, o, PANEL * sizeof(float));
    } else {
        for (int64_t c = 0; c < cols; c++) y[c] = (accumulate ? y[c] : 0.f) + o[c];
    }
}

/* y (M, N) = x (M, K) @ W^T, or y += with `accumulate`, W packed (see above). A single row goes 4
 * panels at a time; several rows go one panel at a time, in blocks of up to 6 rows sized evenly
 * (M = 16: 5, 5, 6), each panel running over every block while it is in L1/L2. Work units (panels,
 * or groups of 4) are split over n_threads OpenMP threads in contiguous ranges. The first block of a
 * panel would wait on its lines from L3 or memory, so the second block, which finds the panel in L1
 * and leaves the memory system idle, prefetches the thread's next panel (the only block does, when
 * there is one). (Units handed out one at a time instead, OpenMP's dynamic schedule, ran slower.) */
static void matmul_packed(const float *x, const float *packed, float *y, int64_t M, int64_t N, int64_t K,
                          int accumulate, int64_t n_threads) {
    int64_t panels = (N + PANEL - 1) / PANEL, per = M == 1 ? 4 : 1, units = (panels + per - 1) / per;
    int64_t blocks = (M + 5) / 6;
    if (n_threads > units) n_threads = units;
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t t = 0; t < n_threads; t++)
        for (int64_t u = units * t / n_threads; u < units * (t + 1) / n_threads; u++) {
            int64_t p0 = u * per, np = panels - p0 < per ? panels - p0 : per;
            const float *panel = packed + p0 * K * PANEL;
            float out[6 * PANEL];
            if (M == 1) {
                if (np == 4) row_x4(x, K, panel, out);
                else
                    for (int64_t q = 0; q < np; q++) rows_1(x, K, panel + q * K * PANEL, out + q * PANEL, NULL);
                for (int64_t q = 0; q < np; q++) {
                    int64_t n = (p0 + q) * PANEL;
                    put_panel(y + n, out + q * PANEL, N - n < PANEL ? N - n : PANEL, accumulate);
                }
                continue;
            }
            int64_t n = p0 * PANEL, cols = N - n < PANEL ? N - n : PANEL;
            const float *next = u + 1 < units * (t + 1) / n_threads ? panel + K * PANEL : NULL;
            for (int64_t b = 0; b < blocks; b++) {
                int64_t m = M * b / blocks, mb = M * (b + 1) / blocks - m;
                const float *xb = x + m * K, *pf = b == (blocks > 1) ? next : NULL;
                switch (mb) {
                    case 1: rows_1(xb, K, panel, out, pf); break;
                    case 2: rows_2(xb, K, panel, out, pf); break;
                    case 3: rows_3(xb, K, panel, out, pf); break;
                    case 4: rows_4(xb, K, panel, out, pf); break;
                    case 5: rows_5(xb, K, panel, out, pf); break;
                    default: rows_6(xb, K, panel, out, pf); break;
                }
                for (int64_t j = 0; j < mb; j++) put_panel(y + (m + j) * N + n, out + j * PANEL, cols, accumulate);
            }
        }
}

/* The packed matmul on its own (for tests, and the probe). */
void matmul_packed_f32(const float *x, const float *packed, float *y, int64_t M, int64_t N, int64_t K,
                       int64_t accumulate, int64_t n_threads) {
    matmul_packed(x, packed, y, M, N, K, (int)accumulate, n_threads);
}


/* qkv, out (N, (H + 2 Hkv) hd): per row [q heads | k heads | v heads] (out may be qkv itself);
 * table (max_pos, hd/2, 2) holds (cos, sin) per position and pair; pos, slots (N,) int64, already
 * checked; k_cache, v_cache (n_slots, Hkv, hd). hd is even. */
static void rope_rows(const float *qkv, float *out, const float *table, const int64_t *pos, const int64_t *slots,
                      float *k_cache, float *v_cache, int64_t N, int64_t H, int64_t Hkv, int64_t hd) {
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
        if (o != x) memcpy(o + (H + Hkv) * hd, x + (H + Hkv) * hd, kv * sizeof(float));  /* v */
        memcpy(k_cache + slots[n] * kv, o + H * hd, kv * sizeof(float));
        memcpy(v_cache + slots[n] * kv, o + (H + Hkv) * hd, kv * sizeof(float));
    }
}

static int64_t check_pos_slots(const int64_t *pos, const int64_t *slots, int64_t N, int64_t max_pos, int64_t n_slots) {
    for (int64_t n = 0; n < N; n++) {
        if (pos[n] < 0 || pos[n] >= max_pos) return 1;
        if (slots[n] < 0 || slots[n] >= n_slots) return 2;
    }
    return 0;
}

/* rope_rows, after checking. Returns 0, or before writing anything: 1 if a position is outside
 * [0, max_pos), 2 if a slot is outside [0, n_slots). */
int64_t rope_qkv_cache_f32(const float *qkv, float *out, const float *table, const int64_t *pos,
                           const int64_t *slots, float *k_cache, float *v_cache, int64_t N, int64_t H,
                           int64_t Hkv, int64_t hd, int64_t max_pos, int64_t n_slots) {
    int64_t err = check_pos_slots(pos, slots, N, max_pos, n_slots);
    if (err == 0) rope_rows(qkv, out, table, pos, slots, k_cache, v_cache, N, H, Hkv, hd);
    return err;
}

/* e^x for 8 floats: x = n ln2 + r with |r| <= ln2/2, e^r = 1 + r + r^2 P(r) (Cephes expf's degree-5
 * P), and 2^n built in the exponent bits. Within 2 ulp of expf over [-87, 88]; x is clamped to that
 * range (so e^x >= 2^-126 for very negative x, harmless where it is used: softmax weights and the
 * sigmoid); NaN stays NaN (the clamps are ordered so that a NaN operand passes through). */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), _mm256_min_ps(_mm256_set1_ps(88.0f), x));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* ln2 in two parts, exact n * hi */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* s[i] = e^(s[i] - m) for i < S; returns their sum. */
static float exp_shift_sum(float *s, int64_t S, float m) {
    __m256 mv = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= S; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
        _mm256_storeu_ps(s + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float l = hsum_ps(acc);
    for (; i < S; i++) {
        s[i] = expf(s[i] - m);
        l += s[i];
    }
    return l;
}

static int64_t check_tables(const int64_t *tables, const int64_t *lens, int64_t B, int64_t bs, int64_t W, int64_t NB) {
    for (int64_t b = 0; b < B; b++) {
        if (lens[b] < 1 || lens[b] > W * bs) return 1;
        for (int64_t j = 0; j < (lens[b] + bs - 1) / bs; j++)
            if (tables[b * W + j] < 0 || tables[b * W + j] >= NB) return 2;
    }
    return 0;
}

/* The sums of v0..v7's lanes, as one vector (lane j: the sum of vj). */
static inline __m256 hsum8(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5, __m256 v6, __m256 v7) {
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));  /* v0..v3: low, high halves */
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v4, v5), _mm256_hadd_ps(v6, v7));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* sc[0:n) = scale * (q . k_t) for the n keys of one block (kb: its first key, keys `row` floats
 * apart). 8 keys at a time: eight dot products side by side, added across lanes together (hsum8),
 * since a lone dot product of a short head would spend more on its final sum than on its products. */
static inline void scores_block(const float *qh, const float *kb, int64_t n, int64_t row, int64_t hd, __m256 scale_v,
                                float *sc) {
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        const float *k0 = kb + t * row;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int64_t i = 0; i < hd; i += 8) {
            __m256 qi = _mm256_loadu_ps(qh + i);
            a0 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k0 + i), a0);
            a1 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k0 + row + i), a1);
            a2 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k0 + 2 * row + i), a2);
            a3 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k0 + 3 * row + i), a3);
            a4 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k0 + 4 * row + i), a4);
            a5 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k0 + 5 * row + i), a5);
            a6 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k0 + 6 * row + i), a6);
            a7 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k0 + 7 * row + i), a7);
        }
        _mm256_storeu_ps(sc + t, _mm256_mul_ps(hsum8(a0, a1, a2, a3, a4, a5, a6, a7), scale_v));
    }
    for (; t < n; t++) sc[t] = dot(qh, kb + t * row, hd) * _mm256_cvtss_f32(scale_v);
}

/* max(s[0:S)). */
static float max_of(const float *s, int64_t S) {
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= S; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + i));
    float m = hmax_ps(mv);
    for (; i < S; i++) if (s[i] > m) m = s[i];
    return m;
}

/* acc[0:n) += sum of p[t] v_t[0:n) over one block's even positions t < m, acc[n:2n) over its odd
 * ones (two sets of accumulators, so that eight sums, not four, are in flight). 32 floats at a time
 * stay in registers across the block, then 8 at a time. n % 8 == 0. */
static inline void values_block(const float *p, const float *vb, int64_t m, int64_t row, int64_t n, float *acc) {
    float *accb = acc + n;
    int64_t c = 0;
    for (; c + 32 <= n; c += 32) {
        __m256 a0 = _mm256_loadu_ps(acc + c), a1 = _mm256_loadu_ps(acc + c + 8), a2 = _mm256_loadu_ps(acc + c + 16),
               a3 = _mm256_loadu_ps(acc + c + 24);
        __m256 b0 = _mm256_loadu_ps(accb + c), b1 = _mm256_loadu_ps(accb + c + 8), b2 = _mm256_loadu_ps(accb + c + 16),
               b3 = _mm256_loadu_ps(accb + c + 24);
        int64_t t = 0;
        for (; t + 2 <= m; t += 2) {
            const float *v = vb + t * row + c, *w = v + row;
            __m256 pv = _mm256_set1_ps(p[t]), pw = _mm256_set1_ps(p[t + 1]);
            a0 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v), a0);
            a1 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 8), a1);
            a2 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 16), a2);
            a3 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 24), a3);
            b0 = _mm256_fmadd_ps(pw, _mm256_loadu_ps(w), b0);
            b1 = _mm256_fmadd_ps(pw, _mm256_loadu_ps(w + 8), b1);
            b2 = _mm256_fmadd_ps(pw, _mm256_loadu_ps(w + 16), b2);
            b3 = _mm256_fmadd_ps(pw, _mm256_loadu_ps(w + 24), b3);
        }
        if (t < m) {
            const float *v = vb + t * row + c;
            __m256 pv = _mm256_set1_ps(p[t]);
            a0 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v), a0);
            a1 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 8), a1);
            a2 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 16), a2);
            a3 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 24), a3);
        }
        _mm256_storeu_ps(acc + c, a0); _mm256_storeu_ps(acc + c + 8, a1);
        _mm256_storeu_ps(acc + c + 16, a2); _mm256_storeu_ps(acc + c + 24, a3);
        _mm256_storeu_ps(accb + c, b0); _mm256_storeu_ps(accb + c + 8, b1);
        _mm256_storeu_ps(accb + c + 16, b2); _mm256_storeu_ps(accb + c + 24, b3);
    }
    for (; c < n; c += 8) {
        __m256 a0 = _mm256_loadu_ps(acc + c), b0 = _mm256_loadu_ps(accb + c);
        int64_t t = 0;
        for (; t + 2 <= m; t += 2) {
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(vb + t * row + c), a0);
            b0 = _mm256_fmadd_ps(_mm256_set1_ps(p[t + 1]), _mm256_loadu_ps(vb + (t + 1) * row + c), b0);
        }
        if (t < m) a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(vb + t * row + c), a0);
        _mm256_storeu_ps(acc + c, a0);
        _mm256_storeu_ps(accb + c, b0);
    }
}

/* Floats of scratch that attend_rows needs per thread: the scores of one GQA group's heads over
 * W * bs positions, their accumulators (2 * hd each) and their softmax sums. */
int64_t attend_scratch_floats(int64_t H, int64_t Hkv, int64_t hd, int64_t W, int64_t bs) {
    return H / Hkv * (W * bs + 2 * hd + 1);
}

/* Ask for floats p[0:n) to be brought into L1 (a hint: no fault, no effect on results). */
static inline void prefetch_lines(const float *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) _mm_prefetch((const char *)(p + i), _MM_HINT_T0);
}

/* Attention of B query rows, each over the first lens[b] cached positions of its sequence, read in
 * place through its block table: tables + (row_table ? row_table[b] : b) * W (a prefill chunk's rows
 * share their sequence's table and see one more position each, which makes them causal). Tables and
 * lengths are already checked (see below). With n_threads > 1 the rows are split over OpenMP
 * threads, each with its own attend_scratch_floats of `scratch`.
 * The query heads that share a KV head (a GQA group) go together: block by block, every head of the
 * group scores the block's keys while they are in L1; after the softmax, block by block again, every
 * head adds its share of the block's values. So the cache is read from L2/L3 once per KV head, not
 * once per query head (same bits as head by head). Positions are walked block by block (a block's
 * keys are contiguous), with no division per position. Every row's result depends on its own length
 * and the block size only, never on the other rows.
 * A block is a short run of memory (one layer's keys of a block: 4 KiB, a page, for the trained
 * model), and a sequence's next block lies wherever the free list had it (under continuous batching
 * the running sequences take blocks in turn), so a hardware prefetcher, which follows a stream
 * within a page, starts over at every block. So while a block's keys are scored (first KV head),
 * this block's values and the next block's keys, every KV head's, are prefetched by hand. */
static void attend_rows(const float *q, const float *k_cache, const float *v_cache, const int64_t *tables,
                        const int64_t *row_table, const int64_t *lens, float *out, float *scratch, int64_t B,
                        int64_t H, int64_t Hkv, int64_t hd, int64_t bs, int64_t W, int64_t q_stride, float scale,
                        int64_t n_threads) {
    int64_t group = H / Hkv, row = Hkv * hd, SW = W * bs, per_thread = attend_scratch_floats(H, Hkv, hd, W, bs);
    __m256 scale_v = _mm256_set1_ps(scale);
    #pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1) if (n_threads > 1)
    for (int64_t b = 0; b < B; b++) {
        float *scores = scratch + (n_threads > 1 ? omp_get_thread_num() : 0) * per_thread;  /* (group, SW) */
        float *acc = scores + group * SW, *inv = acc + 2 * group * hd;  /* (group, 2 hd), (group,) */
        const int64_t *table = tables + (row_table ? row_table[b] : b) * W;
        int64_t S = lens[b];
        for (int64_t kvh = 0; kvh < Hkv; kvh++) {
            const float *q0 = q + b * q_stride + kvh * group * hd;
            const float *kbase = k_cache + kvh * hd, *vbase = v_cache + kvh * hd;
            for (int64_t j = 0, s0 = 0; s0 < S; j++, s0 += bs) {
                const float *kb = kbase + table[j] * bs * row;
                int64_t n = S - s0 < bs ? S - s0 : bs;
                if (kvh == 0) {  /* every KV head's values of this block, and keys of the next */
                    int64_t next = S - s0 - bs < bs ? S - s0 - bs : bs;  /* positions in the next block */
                    prefetch_lines(v_cache + table[j] * bs * row, n * row);
                    if (next > 0) prefetch_lines(k_cache + table[j + 1] * bs * row, next * row);
                }
                for (int64_t g = 0; g < group; g++) scores_block(q0 + g * hd, kb, n, row, hd, scale_v, scores + g * SW + s0);
            }
            for (int64_t g = 0; g < group; g++) {
                float *sc = scores + g * SW;
                inv[g] = 1.0f / exp_shift_sum(sc, S, max_of(sc, S));
            }
            memset(acc, 0, 2 * group * hd * sizeof(float));
            for (int64_t j = 0, s0 = 0; s0 < S; j++, s0 += bs) {
                const float *vb = vbase + table[j] * bs * row;
                int64_t m = S - s0 < bs ? S - s0 : bs;
                for (int64_t g = 0; g < group; g++) values_block(scores + g * SW + s0, vb, m, row, hd, acc + 2 * g * hd);
            }
            for (int64_t g = 0; g < group; g++) {
                float *o = out + (b * H + kvh * group + g) * hd, *a = acc + 2 * g * hd;
                __m256 iv = _mm256_set1_ps(inv[g]);
                for (int64_t c = 0; c < hd; c += 8)
                    _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(a + hd + c)), iv));
            }
        }
    }
}

/* q (B, H, hd) with q_stride floats between sequences; out (B, H, hd); k_cache, v_cache (NB, bs, Hkv, hd); tables (B, W) int64; lens (B,) int64
 * (positions cached, this step's included); scratch: attend_scratch_floats(H, Hkv, hd, W, bs) floats.
 * Query head h reads key/value head h / (H / Hkv) (GQA). hd % 8 == 0.
 * Returns 0, or before touching `out`: 1 if a length is outside [1, W * bs], 2 if a block id that
 * a length reaches is outside [0, NB) (so bad input is an error, not a read out of bounds). */
int64_t paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                                   const int64_t *tables, const int64_t *lens, float *out, float *scratch,
                                   int64_t B, int64_t H, int64_t Hkv, int64_t hd, int64_t bs, int64_t W,
                                   int64_t NB, int64_t q_stride, float scale) {
    int64_t err = check_tables(tables, lens, B, bs, W, NB);
    if (err == 0) attend_rows(q, k_cache, v_cache, tables, NULL, lens, out, scratch, B, H, Hkv, hd, bs, W, q_stride, scale, 1);
    return err;
}

/* ---- A whole engine step in one call ---------------------------------------------------------------
 *
 * What Engine.forward does for a step (decode rows, prefill chunks, any mix), without returning to
 * Python between ops: at batch 1 on a small model the op-by-op path spends more time in dispatch than
 * in arithmetic (chapter 3, "the fused step"). The same math, op for op:
 *
 *   x = tok_embeddings[token]
 *   per layer: h = RMSNorm(x) ; qkv = h Wqkv^T ; RoPE on q, k and the cache write ; a = attention ;
 *              x += a Wo^T ; h = RMSNorm(x) ; [g | u] = h W13^T ; x += (silu(g) * u) W2^T
 *   logits = RMSNorm(x) Wout^T
 *
 * float32 activations; weight matrices float32 packed in panels (matmul_packed) or int8 (w8a16); the
 * model described once by a StepModel that Python builds with the engine (cpu_kernels.FusedStep).
 * Every row's result is independent of the other rows in the step (each op works per row, the
 * matmuls are batch-invariant, the int8 sums are exact), so a request gets the same logits alone, in
 * any batch, and with its prompt prefilled at once or in chunks. */

/* From w8a16_avx2.c, built into the same library: y (M, N) = x @ (q * scale)^T, x rounded per row to
 * int16 (xq, sx: scratch of M x K and M). */
void w8a16_linear_f32(const float *x, int16_t *xq, float *sx, const int8_t *q, const float *scale, float *y,
                      int64_t M, int64_t N, int64_t K, int64_t n_threads);

typedef struct {
    int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, ffn_dim, vocab, block_size, n_blocks, max_pos;
    const void *tok_embeddings;               /* token t, feature i at t * emb_stride_tok + i * emb_stride_dim: */
    const float *emb_scale;                   /* float32, or int8 times emb_scale[t] when this is not NULL */
    int64_t emb_stride_tok, emb_stride_dim;
    const void *const *layers;                /* n_layers x 12: attention_norm (D,); wqkv, its scale; wo, scale;
                                                 ffn_norm (D,); w13, scale; w2, scale; k_cache, v_cache
                                                 (NB, bs, Hkv, hd). A matrix is float32 packed (see
                                                 matmul_packed) when its scale is NULL, else int8 (N, K)
                                                 row-major with per-row scales (N,) (w8a16_avx2.c). */
    const void *norm, *output, *output_scale; /* (D,); the LM head (V, D), as a layer's matrices */
    const float *rope;                        /* (max_pos, hd/2, 2): cos, sin */
    int64_t parallel_min;                     /* split a matmul over threads from this many weights */
    float eps;
} StepModel;

typedef struct {  /* a step's scratch: int16 activations and their scales for the int8 matmul */
    int16_t *xq;
    float *sx;
} Int8Scratch;

/* y (M, N) = x (M, K) @ W^T, or y += with `accumulate` (through tmp, M x N, for int8 weights). */
static void linear(const float *x, const void *w, const float *scale, float *y, float *tmp, int64_t M, int64_t N,
                   int64_t K, int accumulate, int64_t n_threads, Int8Scratch *s) {
    if (scale == NULL) {
        matmul_packed(x, (const float *)w, y, M, N, K, accumulate, n_threads);
        return;
    }
    float *out = accumulate ? tmp : y;
    w8a16_linear_f32(x, s->xq, s->sx, (const int8_t *)w, scale, out, M, N, K, n_threads);
    if (accumulate)
        for (int64_t i = 0; i < M * N; i++) y[i] += out[i];
}

/* silu(g) * u for the fused [g | u] rows gu (B, 2F) -> act (B, F). */
static void swiglu_rows(const float *gu, float *act, int64_t B, int64_t F) {
    __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t b = 0; b < B; b++) {
        const float *g = gu + b * 2 * F, *u = g + F;
        float *a = act + b * F;
        int64_t i = 0;
        for (; i + 8 <= F; i += 8) {
            __m256 gv = _mm256_loadu_ps(g + i);
            __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
            _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
        }
        for (; i < F; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* One step of the model over N token rows of B sequences (any mix of decode rows and prefill chunks):
 * tokens, pos, slots (N,): row n is token tokens[n] at position pos[n] of sequence row_table[n],
 * stored at cache slot slots[n]; tables (B, W): each sequence's block table; it attends to positions
 * 0..pos[n] of its sequence (its own chunk's earlier rows included: every row's k and v are written
 * before any row attends). out_rows (R,): the rows whose logits go to logits (R, V). n_threads:
 * torch's thread count. Returns 0, or before writing anything: 1 a position outside [0, max_pos),
 * 2 a slot outside the cache, 3 a position past the table's W * bs, 4 a block id outside [0, NB),
 * 5 a token id outside [0, V), 6 out of memory, 7 a row_table entry outside [0, B), 8 an out_rows
 * entry outside [0, N) or R > N. */
int64_t forward_step_f32(const StepModel *m, const int64_t *tokens, const int64_t *pos, const int64_t *slots,
                         const int64_t *row_table, const int64_t *tables, const int64_t *out_rows, float *logits,
                         int64_t N, int64_t B, int64_t R, int64_t W, int64_t n_threads) {
    int64_t D = m->dim, H = m->n_heads, Hkv = m->n_kv_heads, hd = m->head_dim, F = m->ffn_dim, V = m->vocab;
    int64_t Wqkv = (H + 2 * Hkv) * hd, bs = m->block_size;
    int64_t err = check_pos_slots(pos, slots, N, m->max_pos, m->n_blocks * bs);
    if (err) return err;
    if (R > N) return 8;
    for (int64_t r = 0; r < R; r++)
        if (out_rows[r] < 0 || out_rows[r] >= N) return 8;
    for (int64_t n = 0; n < N; n++) {
        if (tokens[n] < 0 || tokens[n] >= V) return 5;
        if (row_table[n] < 0 || row_table[n] >= B) return 7;
        if (pos[n] + 1 > W * bs) return 3;
    }
    int64_t kmax = D > H * hd ? D : H * hd;
    if (F > kmax) kmax = F;
    int64_t nt = n_threads > 1 ? n_threads : 1;
    int64_t per_thread = attend_scratch_floats(H, Hkv, hd, W, bs);
    size_t floats = (size_t)N * (2 * D + Wqkv + H * hd + 3 * F + 1) + (size_t)nt * per_thread;
    int64_t *buf = malloc(sizeof(int64_t) * (N + B) + sizeof(float) * floats + sizeof(int16_t) * N * kmax);
    if (!buf) return 6;
    int64_t *lens = buf, *longest = lens + N;  /* int64 first, then float, then int16: each aligned */
    float *x = (float *)(longest + B), *h = x + N * D, *qkv = h + N * D, *att = qkv + N * Wqkv;
    float *gu = att + N * H * hd, *act = gu + N * 2 * F, *sx = act + N * F, *scratch = sx + N;
    Int8Scratch s8 = {(int16_t *)(scratch + nt * per_thread), sx};
    int64_t keys = 0;  /* the step's attention work, in cached positions read */
    for (int64_t b = 0; b < B; b++) longest[b] = 0;
    for (int64_t n = 0; n < N; n++) {
        lens[n] = pos[n] + 1;
        keys += lens[n];
        if (lens[n] > longest[row_table[n]]) longest[row_table[n]] = lens[n];
    }
    for (int64_t b = 0; b < B; b++)  /* each block a row will read: in the cache */
        for (int64_t j = 0; j < (longest[b] + bs - 1) / bs; j++)
            if (tables[b * W + j] < 0 || tables[b * W + j] >= m->n_blocks) {
                free(buf);
                return 4;
            }
#define THREADS(work) ((work) >= m->parallel_min ? n_threads : 1)
    for (int64_t n = 0; n < N; n++) {
        int64_t t = tokens[n] * m->emb_stride_tok;
        for (int64_t i = 0; i < D; i++)
            x[n * D + i] = m->emb_scale ? ((const int8_t *)m->tok_embeddings)[t + i * m->emb_stride_dim] * m->emb_scale[tokens[n]]
                                        : ((const float *)m->tok_embeddings)[t + i * m->emb_stride_dim];
    }
    float scale = (float)(1.0 / sqrt((double)hd));
    for (int64_t l = 0; l < m->n_layers; l++) {
        const void *const *w = m->layers + 12 * l;
        float *kc = (float *)w[10], *vc = (float *)w[11];
        rmsnorm_f32(x, w[0], h, N, D, m->eps);
        linear(h, w[1], w[2], qkv, NULL, N, Wqkv, D, 0, THREADS(N * Wqkv * D), &s8);
        rope_rows(qkv, qkv, m->rope, pos, slots, kc, vc, N, H, Hkv, hd);
        attend_rows(qkv, kc, vc, tables, row_table, lens, att, scratch, N, H, Hkv, hd, bs, W, Wqkv, scale,
                    N > 1 ? THREADS(keys * H * hd) : 1);
        linear(att, w[3], w[4], x, h, N, D, H * hd, 1, THREADS(N * D * H * hd), &s8);  /* h is free: tmp */
        rmsnorm_f32(x, w[5], h, N, D, m->eps);
        linear(h, w[6], w[7], gu, NULL, N, 2 * F, D, 0, THREADS(N * 2 * F * D), &s8);
        swiglu_rows(gu, act, N, F);
        linear(act, w[8], w[9], x, h, N, D, F, 1, THREADS(N * D * F), &s8);
    }
    for (int64_t r = 0; r < R; r++) rmsnorm_f32(x + out_rows[r] * D, m->norm, h + r * D, 1, D, m->eps);
    linear(h, m->output, m->output_scale, logits, NULL, R, V, D, 0, THREADS(R * V * D), &s8);
#undef THREADS
    free(buf);
    return 0;
}
