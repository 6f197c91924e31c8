/* Attention of query tokens over a paged KV cache, on CPUs.
 *
 * Query token t (a row's newest token in decode, or one of a few tokens after a cached prefix)
 * attends to the keys at positions 0..positions[t] of its own sequence; they live in fixed-size
 * blocks of the KV pool listed by that sequence's block table. Keys and values are read in
 * place, block by block: no gathered copy of a sequence's keys is made (torch's SDPA would need
 * one: a write and a read of every key on top of the read the attention itself does).
 *
 * Layouts (row-major, in elements):
 *   q      [n_tokens, n_heads, head_dim], strides (q_stride_t, q_stride_h, 1)
 *   k, v   [n_slots, n_heads, head_dim], contiguous; slot = block * block_size + offset
 *   out    [n_tokens, n_heads, head_dim], contiguous
 *   tables[table_rows[t] * table_stride + i] = the block holding positions i*block_size ...
 * One task per (token, group of heads): it streams each key's heads of the group once, keeps
 * the scores in fp32, takes the softmax, then streams the values. Built and loaded by
 * model/cpu_kernels.py; checked against torch's SDPA in tests/test_attention.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_load(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_store(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f32_load(float x) { return x; }
static inline float f32_store(float x) { return x; }

/* exp(x) for x <= 0 (softmax after subtracting the max), in a form the compiler vectorizes:
 * 2^(x log2 e) = 2^n * 2^f, n integer, f in [-0.5, 0.5], 2^f by a degree-6 polynomial.
 * Relative error < 2e-7; inputs below -87 give 0. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504088896341f;
    const float n = __builtin_roundf(t);
    const float f = t - n;
    float p = 1.5353362e-4f;
    p = p * f + 1.3398874e-3f;
    p = p * f + 9.6180778e-3f;
    p = p * f + 5.5504109e-2f;
    p = p * f + 2.4022650e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return x <= -87.0f ? 0.0f : p * scale;
}

#define PAGED_ATTENTION(NAME, T, LOAD, STORE)                                                          \
    int NAME(const T *q, int64_t q_stride_t, int64_t q_stride_h, const T *k, const T *v, T *out,      \
             const int64_t *tables, int64_t table_stride, const int64_t *table_rows,                  \
             const int64_t *positions, int64_t n_tokens, int64_t n_heads, int64_t head_dim,           \
             int64_t block_size, int64_t max_keys, float scale, int n_threads) {                      \
        int failed = 0;                                                                                \
        /* head groups: enough tasks for every thread, each still reading whole rows of heads */       \
        int64_t groups = 1;                                                                            \
        while (groups < n_heads && n_tokens * groups < 4 * (int64_t)n_threads && n_heads % (groups * 2) == 0) \
            groups *= 2;                                                                               \
        const int64_t g_heads = n_heads / groups;                                                      \
        _Pragma("omp parallel num_threads(n_threads)") {                                              \
            float *scores = (float *)malloc(sizeof(float) * (size_t)(max_keys * g_heads));             \
            float *qf = (float *)malloc(sizeof(float) * (size_t)(g_heads * head_dim));                 \
            float *acc = (float *)malloc(sizeof(float) * (size_t)(g_heads * head_dim));                \
            const int ok = scores && qf && acc;                                                        \
            if (!ok) {                                                                                 \
                _Pragma("omp atomic write") failed = 1;                                                \
            }                                                                                          \
            _Pragma("omp for schedule(dynamic, 1)") for (int64_t task = 0; task < n_tokens * groups;  \
                                                         task++) {                                     \
                if (!ok) continue;                                                                     \
                const int64_t t = task / groups, h0 = (task % groups) * g_heads;                       \
                for (int64_t h = 0; h < g_heads; h++) {                                                \
                    const T *qp = q + t * q_stride_t + (h0 + h) * q_stride_h;                          \
                    for (int64_t d = 0; d < head_dim; d++) qf[h * head_dim + d] = LOAD(qp[d]) * scale; \
                }                                                                                      \
                const int64_t n = positions[t] + 1;                                                    \
                const int64_t *table = tables + table_rows[t] * table_stride;                          \
                for (int64_t j0 = 0; j0 < n; j0 += block_size) { /* scores, block by block */          \
                    const T *kb = k + (table[j0 / block_size] * block_size * n_heads + h0) * head_dim;  \
                    const int64_t jn = n - j0 < block_size ? n - j0 : block_size;                      \
                    for (int64_t j = 0; j < jn; j++) {                                                 \
                        const T *kp = kb + j * n_heads * head_dim;                                     \
                        for (int64_t h = 0; h < g_heads; h++) {                                        \
                            const float *qh = qf + h * head_dim;                                       \
                            const T *kh = kp + h * head_dim;                                           \
                            float s = 0.0f;                                                            \
                            _Pragma("omp simd reduction(+ : s)") for (int64_t d = 0; d < head_dim; d++) \
                                s += qh[d] * LOAD(kh[d]);                                              \
                            scores[h * max_keys + j0 + j] = s;                                         \
                        }                                                                              \
                    }                                                                                  \
                }                                                                                      \
                for (int64_t h = 0; h < g_heads; h++) { /* softmax per head; weights unnormalised */   \
                    float *sh = scores + h * max_keys;                                                 \
                    float m = -INFINITY;                                                               \
                    for (int64_t j = 0; j < n; j++) m = sh[j] > m ? sh[j] : m;                         \
                    float sum = 0.0f;                                                                  \
                    _Pragma("omp simd reduction(+ : sum)") for (int64_t j = 0; j < n; j++) {           \
                        sh[j] = exp_nonpositive(sh[j] - m);                                            \
                        sum += sh[j];                                                                  \
                    }                                                                                  \
                    const float inv = 1.0f / sum;                                                      \
                    _Pragma("omp simd") for (int64_t j = 0; j < n; j++) sh[j] *= inv;                  \
                }                                                                                      \
                memset(acc, 0, sizeof(float) * (size_t)(g_heads * head_dim));                          \
                for (int64_t j0 = 0; j0 < n; j0 += block_size) { /* weighted sum of values */          \
                    const T *vb = v + (table[j0 / block_size] * block_size * n_heads + h0) * head_dim;  \
                    const int64_t jn = n - j0 < block_size ? n - j0 : block_size;                      \
                    for (int64_t j = 0; j < jn; j++) {                                                 \
                        const T *vp = vb + j * n_heads * head_dim;                                     \
                        for (int64_t h = 0; h < g_heads; h++) {                                        \
                            const float w = scores[h * max_keys + j0 + j];                             \
                            float *ah = acc + h * head_dim;                                            \
                            const T *vh = vp + h * head_dim;                                           \
                            _Pragma("omp simd") for (int64_t d = 0; d < head_dim; d++) ah[d] += w * LOAD(vh[d]); \
                        }                                                                              \
                    }                                                                                  \
                }                                                                                      \
                T *op = out + (t * n_heads + h0) * head_dim;                                           \
                for (int64_t i = 0; i < g_heads * head_dim; i++) op[i] = STORE(acc[i]);                \
            }                                                                                          \
            free(scores);                                                                              \
            free(qf);                                                                                  \
            free(acc);                                                                                 \
        }                                                                                              \
        return failed;                                                                                 \
    }

PAGED_ATTENTION(paged_attention_f32, float, f32_load, f32_store)
PAGED_ATTENTION(paged_attention_bf16, uint16_t, bf16_load, bf16_store)

#ifdef __FLT16_MAX__ /* compilers with _Float16 (GCC >= 12 on x86-64, clang) */
static inline float f16_load(_Float16 x) { return (float)x; }
static inline _Float16 f16_store(float x) { return (_Float16)x; }
PAGED_ATTENTION(paged_attention_f16, _Float16, f16_load, f16_store)
#endif
