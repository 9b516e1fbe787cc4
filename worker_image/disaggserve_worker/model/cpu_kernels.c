/* The CPU kernels of the built-in engine (see cpu_kernels.py for why each exists).
 *
 * Decode attention straight over the paged KV pool:
 * One query token per sequence: for sequence b and KV head h, the G = H / KVH query heads that
 * share h read the keys and values of b's context slots where they lie in the pool, with no
 * gathered copy. Two passes per (b, h): scores (each key row read once for all G heads), then a
 * softmax per head and the value sum (each value row read once). Work items run in parallel on
 * the OpenMP runtime torch already loaded (same soname, so the loader reuses it).
 *
 * RMSNorm, rotary embedding and SiLU-and-multiply: one pass each over rows that torch walks five
 * to seven times (its CPU rms_norm, for one, is pow, mean, add, rsqrt and two muls). In bfloat16
 * they round where torch's ops round, so the results are torch's bit for bit in either dtype
 * up to float summation order.
 *
 * Built by cpu_kernels.py with the host's compiler; plain C with a C ABI, no torch headers, so
 * it builds in about a second.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_load(const uint16_t *p) {
    uint32_t u = (uint32_t)(*p) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline void bf16_store(uint16_t *p, float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even, as torch does */
    *p = (uint16_t)(u >> 16);
}

static inline float f32_load(const float *p) { return *p; }
static inline void f32_store(float *p, float f) { *p = f; }

/* One sequence: q, out (H, D); its context rows `row[0..n)` of the pool. All heads of a row are
 * handled while it is in cache (a row holds every KV head side by side), so each key and value
 * row is read from memory once. scores: H * n floats; acc: H * D floats. Inlined with D a
 * constant for the common head sizes, so the dot products unroll into a few vector FMAs. */
#define DEFINE_SEQUENCE(NAME, T, LOAD, STORE)                                                      \
    static inline __attribute__((always_inline)) void NAME(                                       \
        const T *q, T *out, const T *key, const T *value, int64_t slot_stride, const int64_t *row, \
        int64_t n, int64_t H, int64_t KVH, const int64_t D, float scale, float *scores,            \
        float *qf, float *acc) {                                                                  \
        const int64_t G = H / KVH;                                                                \
        for (int64_t i = 0; i < H * D; i++) qf[i] = LOAD(&q[i]) * scale;                          \
        for (int64_t t = 0; t < n; t++) {                                                         \
            const T *k = key + row[t] * slot_stride;                                              \
            for (int64_t i = 0; i < H; i++) {                                                     \
                const float *qi = qf + i * D;                                                     \
                const T *kh = k + (i / G) * D;                                                    \
                float s = 0.0f;                                                                   \
                _Pragma("omp simd reduction(+:s)")                                                \
                for (int64_t d = 0; d < D; d++) s += qi[d] * LOAD(&kh[d]);                        \
                scores[i * n + t] = s;                                                            \
            }                                                                                     \
        }                                                                                         \
        for (int64_t i = 0; i < H; i++) {                                                         \
            float *si = scores + i * n;                                                           \
            float m = -FLT_MAX, sum = 0.0f;                                                      \
            for (int64_t t = 0; t < n; t++) m = si[t] > m ? si[t] : m;                            \
            _Pragma("omp simd reduction(+:sum)")                                                  \
            for (int64_t t = 0; t < n; t++) {                                                     \
                /* below e^-87 a weight is subnormal: zero instead (subnormal math is slow) */   \
                si[t] = si[t] - m < -87.0f ? 0.0f : expf(si[t] - m);                              \
                sum += si[t];                                                                     \
            }                                                                                     \
            const float inv = 1.0f / sum;                                                         \
            _Pragma("omp simd")                                                                   \
            for (int64_t t = 0; t < n; t++) si[t] *= inv;                                         \
        }                                                                                         \
        memset(acc, 0, sizeof(float) * (size_t)(H * D));                                          \
        for (int64_t t = 0; t < n; t++) {                                                         \
            const T *v = value + row[t] * slot_stride;                                            \
            for (int64_t i = 0; i < H; i++) {                                                     \
                const float p = scores[i * n + t];                                                \
                const T *vh = v + (i / G) * D;                                                    \
                float *ai = acc + i * D;                                                          \
                _Pragma("omp simd")                                                               \
                for (int64_t d = 0; d < D; d++) ai[d] += p * LOAD(&vh[d]);                        \
            }                                                                                     \
        }                                                                                         \
        for (int64_t i = 0; i < H * D; i++) STORE(&out[i], acc[i]);                               \
    }

/* q, out: (B, H, D) contiguous. key/value: rows of one slot, `slot_stride` elements apart, head h
 * at h * D. slots: row b at b * slots_stride. Sequence b attends slots[b][starts[b] .. ends[b]).
 * Sequences run in parallel, each with its own scratch. */
#define DEFINE_KERNEL(NAME, SEQUENCE, T)                                                           \
    static int NAME(const T *q, T *out, const T *key, const T *value, int64_t slot_stride,        \
                    const int64_t *slots, int64_t slots_stride, const int64_t *starts,            \
                    const int64_t *ends, int64_t B, int64_t H, int64_t KVH, int64_t D,            \
                    float scale, int threads) {                                                   \
        int64_t max_span = 1;                                                                     \
        for (int64_t b = 0; b < B; b++)                                                           \
            if (ends[b] - starts[b] > max_span) max_span = ends[b] - starts[b];                   \
        int failed = 0;                                                                           \
        _Pragma("omp parallel num_threads(threads)")                                             \
        {                                                                                         \
            float *scores = malloc(sizeof(float) * (size_t)(H * max_span + 2 * H * D));           \
            if (scores == NULL) {                                                                 \
                _Pragma("omp atomic write") failed = 1;                                           \
            }                                                                                     \
            float *qf = scores + H * max_span, *acc = qf + H * D;                                 \
            _Pragma("omp for schedule(dynamic)")                                                  \
            for (int64_t b = 0; b < B; b++) {                                                     \
                if (scores == NULL || ends[b] <= starts[b]) continue;                             \
                const int64_t *row = slots + b * slots_stride + starts[b];                        \
                const int64_t n = ends[b] - starts[b];                                            \
                const T *qb = q + b * H * D;                                                      \
                T *ob = out + b * H * D;                                                          \
                switch (D) { /* constant head sizes: unrolled dot products */                     \
                case 32: SEQUENCE(qb, ob, key, value, slot_stride, row, n, H, KVH, 32, scale, scores, qf, acc); break; \
                case 64: SEQUENCE(qb, ob, key, value, slot_stride, row, n, H, KVH, 64, scale, scores, qf, acc); break; \
                case 128: SEQUENCE(qb, ob, key, value, slot_stride, row, n, H, KVH, 128, scale, scores, qf, acc); break; \
                default: SEQUENCE(qb, ob, key, value, slot_stride, row, n, H, KVH, D, scale, scores, qf, acc); \
                }                                                                                 \
            }                                                                                     \
            free(scores);                                                                         \
        }                                                                                         \
        return failed ? -1 : 0;                                                                   \
    }

DEFINE_SEQUENCE(sequence_f32, float, f32_load, f32_store)
DEFINE_SEQUENCE(sequence_bf16, uint16_t, bf16_load, bf16_store)
DEFINE_KERNEL(decode_f32, sequence_f32, float)
DEFINE_KERNEL(decode_bf16, sequence_bf16, uint16_t)

/* dtype: 0 float32, 1 bfloat16. Returns 0, -1 when scratch memory ran out, -2 for a bad dtype. */
int paged_decode_attention(const void *q, void *out, const void *key, const void *value,
                           int64_t slot_stride, const int64_t *slots, int64_t slots_stride,
                           const int64_t *starts, const int64_t *ends, int64_t B, int64_t H,
                           int64_t KVH, int64_t D, float scale, int dtype, int threads) {
    if (dtype == 0)
        return decode_f32(q, out, key, value, slot_stride, slots, slots_stride, starts, ends, B, H,
                          KVH, D, scale, threads);
    if (dtype == 1)
        return decode_bf16(q, out, key, value, slot_stride, slots, slots_stride, starts, ends, B,
                           H, KVH, D, scale, threads);
    return -2;
}

/* Rows small enough not to wake the thread team for. */
#define PARALLEL_MIN_ELEMENTS 65536

/* x, out: (T, N); out = x * rsqrt(mean(x^2) + eps) * w. bfloat16 as RMSNorm.forward: normalise in
 * float32, round, then weight * normalised rounded again. */
#define DEFINE_RMS_NORM(NAME, T, LOAD, STORE, ROUND_TWICE)                                         \
    static void NAME(const T *x, const T *w, T *out, int64_t rows, int64_t n, float eps,          \
                     int threads) {                                                               \
        _Pragma("omp parallel for num_threads(threads) if (rows * n >= PARALLEL_MIN_ELEMENTS)")   \
        for (int64_t r = 0; r < rows; r++) {                                                      \
            const T *xr = x + r * n;                                                              \
            T *orow = out + r * n;                                                                \
            float sum = 0.0f;                                                                     \
            _Pragma("omp simd reduction(+:sum)")                                                  \
            for (int64_t i = 0; i < n; i++) {                                                     \
                const float v = LOAD(&xr[i]);                                                     \
                sum += v * v;                                                                     \
            }                                                                                     \
            const float inv = 1.0f / sqrtf(sum / (float)n + eps);                                 \
            for (int64_t i = 0; i < n; i++) {                                                     \
                if (ROUND_TWICE) {                                                                \
                    T normed;                                                                     \
                    STORE(&normed, LOAD(&xr[i]) * inv);                                           \
                    STORE(&orow[i], LOAD(&w[i]) * LOAD(&normed));                                 \
                } else {                                                                          \
                    STORE(&orow[i], LOAD(&xr[i]) * inv * LOAD(&w[i]));                            \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_RMS_NORM(rms_norm_f32, float, f32_load, f32_store, 0)
DEFINE_RMS_NORM(rms_norm_bf16, uint16_t, bf16_load, bf16_store, 1)

int rms_norm(const void *x, const void *w, void *out, int64_t rows, int64_t n, float eps, int dtype,
             int threads) {
    if (dtype == 0) rms_norm_f32(x, w, out, rows, n, eps, threads);
    else if (dtype == 1) rms_norm_bf16(x, w, out, rows, n, eps, threads);
    else return -2;
    return 0;
}

/* In place: `heads` heads of D in each of `rows` rows (row r at r * row_stride), rotated by the
 * row's cos/sin (rows, D): x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1). Each
 * product and the sum rounded as torch's three ops round them. */
#define DEFINE_ROTARY(NAME, T, LOAD, STORE)                                                        \
    static void NAME(T *x, int64_t rows, int64_t heads, int64_t D, int64_t row_stride,            \
                     const T *cos, const T *sin, int threads) {                                   \
        const int64_t half = D / 2;                                                               \
        _Pragma("omp parallel for num_threads(threads) if (rows * heads * D >= PARALLEL_MIN_ELEMENTS)") \
        for (int64_t r = 0; r < rows; r++) {                                                      \
            const T *c = cos + r * D, *s = sin + r * D;                                           \
            for (int64_t h = 0; h < heads; h++) {                                                 \
                T *xh = x + r * row_stride + h * D;                                               \
                for (int64_t j = 0; j < half; j++) {                                              \
                    const float x1 = LOAD(&xh[j]), x2 = LOAD(&xh[j + half]);                      \
                    T a, b, e, f;                                                                 \
                    STORE(&a, x1 * LOAD(&c[j]));                                                  \
                    STORE(&b, -x2 * LOAD(&s[j]));                                                 \
                    STORE(&e, x2 * LOAD(&c[j + half]));                                           \
                    STORE(&f, x1 * LOAD(&s[j + half]));                                           \
                    STORE(&xh[j], LOAD(&a) + LOAD(&b));                                           \
                    STORE(&xh[j + half], LOAD(&e) + LOAD(&f));                                    \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_ROTARY(rotary_f32, float, f32_load, f32_store)
DEFINE_ROTARY(rotary_bf16, uint16_t, bf16_load, bf16_store)

int rotary(void *x, int64_t rows, int64_t heads, int64_t D, int64_t row_stride, const void *cos,
           const void *sin, int dtype, int threads) {
    if (D % 2) return -3;
    if (dtype == 0) rotary_f32(x, rows, heads, D, row_stride, cos, sin, threads);
    else if (dtype == 1) rotary_bf16(x, rows, heads, D, row_stride, cos, sin, threads);
    else return -2;
    return 0;
}

/* gate_up (rows, 2n): gate then up; out (rows, n) = silu(gate) * up, silu rounded first. */
#define DEFINE_SILU_MUL(NAME, T, LOAD, STORE)                                                      \
    static void NAME(const T *gate_up, T *out, int64_t rows, int64_t n, int threads) {            \
        _Pragma("omp parallel for num_threads(threads) if (rows * n >= PARALLEL_MIN_ELEMENTS)")   \
        for (int64_t r = 0; r < rows; r++) {                                                      \
            const T *g = gate_up + r * 2 * n, *u = g + n;                                         \
            T *o = out + r * n;                                                                   \
            _Pragma("omp simd")                                                                   \
            for (int64_t i = 0; i < n; i++) {                                                     \
                const float gv = LOAD(&g[i]);                                                     \
                T silu;                                                                           \
                STORE(&silu, gv / (1.0f + expf(-gv)));                                            \
                STORE(&o[i], LOAD(&silu) * LOAD(&u[i]));                                          \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_SILU_MUL(silu_mul_f32, float, f32_load, f32_store)
DEFINE_SILU_MUL(silu_mul_bf16, uint16_t, bf16_load, bf16_store)

int silu_mul(const void *gate_up, void *out, int64_t rows, int64_t n, int dtype, int threads) {
    if (dtype == 0) silu_mul_f32(gate_up, out, rows, n, threads);
    else if (dtype == 1) silu_mul_bf16(gate_up, out, rows, n, threads);
    else return -2;
    return 0;
}
