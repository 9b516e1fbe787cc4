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
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

/* GCC/Clang vector extensions: 16 float lanes are one AVX-512 register, or two AVX2 ones where the
 * CPU has no AVX-512. Unaligned loads and stores go through the `u` types. */
typedef float vf __attribute__((vector_size(64), aligned(64)));
typedef int32_t vi __attribute__((vector_size(64), aligned(64)));

static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
#if defined(__AVX512F__)
/* one vmaxps; gcc compiles the select below to a compare and two masked xors */
static inline vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
#else
static inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }
#endif
/* e^x for x <= 0 (a score minus its row's running maximum), zero below e^-80: Cephes' expf
 * polynomial in vector code (a libm call per vector spills every register of the tile). Below
 * e^-80 a weight times a value can land in the subnormal range, which x86 computes slowly. */
static inline vf vexp(vf x) {
    const vi tiny = x < -80.0f;
    x = vsel(tiny, (vf){} - 80.0f, x);
    const vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi);
    const vf nf = __builtin_convertvector(n, vf);
    const vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const vf scale = (vf)((n + 127) << 23);
    return vsel(tiny, (vf){}, p * scale);
}

typedef float vfu __attribute__((vector_size(64), aligned(4)));
typedef uint32_t vu __attribute__((vector_size(64), aligned(64)));
typedef uint16_t vhu __attribute__((vector_size(32), aligned(2)));

static inline vf vload_f32(const float *p) { return *(const vfu *)p; }
#if defined(__AVX512F__)
/* gcc 12 splits the generic widening below into 128-bit pieces and reassembles them (three
 * instructions more per load); one vpmovzxwd does it */
static inline vf vload_bf16(const uint16_t *p) {
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
}
#else
static inline vf vload_bf16(const uint16_t *p) { return (vf)(__builtin_convertvector(*(const vhu *)p, vu) << 16); }
#endif
static inline void vstore_f32(float *p, vf v) { *(vfu *)p = v; }
static inline void vstore_bf16(uint16_t *p, vf v) {
    vu u = (vu)v;
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even, as bf16_store */
    *(vhu *)p = __builtin_convertvector(u >> 16, vhu);
}

/* The sums of 16 vectors' lanes, as one vector (lane i: the sum of p[i]'s lanes): a transposing
 * tree of 15 shuffle pairs and adds, where 16 separate reductions take 4 of each apiece. */
/* Two-vector lane shuffles: clang and gcc 12+ take constant indices (__builtin_shufflevector),
 * older gcc an index vector (__builtin_shuffle); the worker image's compiler may be either. */
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

static inline __attribute__((always_inline)) vf hsum16(const vf *p) {
    vf w[8], x[4], y[2];
    for (int k = 0; k < 8; k++)
        w[k] = SHUFFLE(p[2 * k], p[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + SHUFFLE(p[2 * k], p[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int k = 0; k < 4; k++)
        x[k] = SHUFFLE(w[2 * k], w[2 * k + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27)
             + SHUFFLE(w[2 * k], w[2 * k + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int k = 0; k < 2; k++)
        y[k] = SHUFFLE(x[2 * k], x[2 * k + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
             + SHUFFLE(x[2 * k], x[2 * k + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    const vf z = SHUFFLE(y[0], y[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
               + SHUFFLE(y[0], y[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    /* lane l of z holds p[bit-reversed l] */
    return SHUFFLE(z, z, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

static inline float hsum(vf v) {
    float f[16];
    memcpy(f, &v, sizeof f);
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += f[i];
    return s;
}

static inline float hmax(vf v) {
    float f[16];
    memcpy(f, &v, sizeof f);
    float m = f[0];
    for (int i = 1; i < 16; i++) m = f[i] > m ? f[i] : m;
    return m;
}


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

/* The same for head sizes that are a multiple of 16, in vector code, 16 keys at a time for every
 * head: a block's key and value rows (contiguous in the pool, one 4 KB page for small-llama in
 * bfloat16) are read from memory once, in order, and stay in L1 for all heads. Scores: each
 * key's products with a query head are one vector of partial sums, and `hsum16` reduces 16 of
 * them together; the softmax in vector code (vexp); the value sums per head in D / 16 vectors,
 * kept in scratch between blocks. Per (key, head): D / 16 loads and FMAs plus a sixteenth of the
 * reduction tree, where the scalar form above pays a whole reduction per dot product. At 32
 * sequences of ~160 tokens (small-llama, bfloat16, one core) that form took 2.5 of a 4.5 ms
 * decode forward; this one, head by head over all keys, took 1.6 of 3.7, and block by block
 * (each row's lines fetched together rather than in one pass per KV head), with bfloat16 pairs
 * (vdpbf16ps) for both products where the CPU has them, 1.5 of 3.1 (float32: 1.9 -> 1.7 of
 * 4.6). Software prefetch of the next block's rows and huge pages for the pool were each worth
 * under 6 % in a 32-sequence micro-benchmark: not kept.
 * work: H * D floats of queries, H * D of sums, then H rows of n rounded up to 16 scores, each
 * 64-byte aligned. */
/* A query head as a block's dot products take it (`PREP`), and 16 keys' scores against it
 * (`SCORES`): in float vectors, the query pre-scaled (float32, and bfloat16 without the pair
 * instructions); or as bfloat16 pairs (vdpbf16ps: one load and one instruction per 32 elements
 * of a key, no widening), scaled after the sums. */
#define DEFINE_FLOAT_SCORES(PREP, SCORES, VSUM, T, VLOAD)                                          \
    static inline void PREP(vf *qv, const T *q, int64_t H, int64_t D, float scale) {              \
        for (int64_t i = 0; i < H * D / 16; i++) qv[i] = VLOAD(q + 16 * i) * scale;               \
    }                                                                                             \
    static inline __attribute__((always_inline)) vf SCORES(                                      \
        const vf *qi, const T *key, const int64_t *row, int64_t t0, int64_t n, int64_t offset,    \
        int64_t slot_stride, const int64_t D, float scale) {                                      \
        (void)scale;                                                                              \
        vf p[16];                                                                                 \
        const int full = t0 + 16 <= n; /* every key present: no test per key */                  \
        _Pragma("GCC unroll 16")                                                                  \
        for (int j = 0; j < 16; j++) {                                                            \
            p[j] = (vf){};                                                                        \
            if (full || t0 + j < n) {                                                             \
                const T *k = key + row[t0 + j] * slot_stride + offset;                            \
                for (int64_t c = 0; c < D / 16; c++) p[j] += qi[c] * VLOAD(k + 16 * c);           \
            }                                                                                     \
        }                                                                                         \
        return hsum16(p);                                                                         \
    }                                                                                             \
    static inline __attribute__((always_inline)) void VSUM(                                       \
        vf *acc, const T *value, const int64_t *row, int64_t t0, int64_t t1, int64_t offset,      \
        int64_t slot_stride, const int64_t D, const float *w) {                                   \
        vf a[D / 16], b[D / 16]; /* two chains: one waited on each FMA's latency */               \
        for (int64_t c = 0; c < D / 16; c++) { a[c] = acc[c]; b[c] = (vf){}; }                   \
        int64_t t = t0;                                                                           \
        for (; t + 1 < t1; t += 2) {                                                              \
            const T *v0 = value + row[t] * slot_stride + offset;                                  \
            const T *v1 = value + row[t + 1] * slot_stride + offset;                              \
            for (int64_t c = 0; c < D / 16; c++) {                                                \
                a[c] += w[t] * VLOAD(v0 + 16 * c);                                                \
                b[c] += w[t + 1] * VLOAD(v1 + 16 * c);                                            \
            }                                                                                     \
        }                                                                                         \
        if (t < t1)                                                                               \
            for (int64_t c = 0; c < D / 16; c++) a[c] += w[t] * VLOAD(value + row[t] * slot_stride + offset + 16 * c); \
        for (int64_t c = 0; c < D / 16; c++) acc[c] = a[c] + b[c];                                \
    }

DEFINE_FLOAT_SCORES(prep_f32, scores_f32, vsum_f32, float, vload_f32)
#if defined(__AVX512BF16__)
static inline void prep_bf16(vf *qv, const uint16_t *q, int64_t H, int64_t D, float scale) {
    (void)scale; /* raw bfloat16, head i at vector i * D / 16 as in the float layout (half used) */
    for (int64_t i = 0; i < H; i++) memcpy(qv + i * D / 16, q + i * D, sizeof(uint16_t) * (size_t)D);
}

static inline __attribute__((always_inline)) vf scores_bf16(
    const vf *qi, const uint16_t *key, const int64_t *row, int64_t t0, int64_t n, int64_t offset,
    int64_t slot_stride, const int64_t D, float scale) {
    const __m512bh *qp = (const __m512bh *)qi;
    vf p[16];
    const int full = t0 + 16 <= n;
    _Pragma("GCC unroll 16")
    for (int j = 0; j < 16; j++) {
        p[j] = (vf){};
        if (full || t0 + j < n) {
            const uint16_t *k = key + row[t0 + j] * slot_stride + offset;
            for (int64_t c = 0; c < D / 32; c++)
                p[j] = (vf)_mm512_dpbf16_ps((__m512)p[j], qp[c], (__m512bh)_mm512_loadu_si512(k + 32 * c));
        }
    }
    return hsum16(p) * scale;
}

/* The weighted value sum over keys [t0, t1) two keys at a time: their rows interleaved into
 * (v_t, v_t+1) pairs per dimension (vpermt2w) against the weights' pair (w_t, w_t+1) in
 * bfloat16, the rounding P gets in torch's and vLLM's bfloat16 attention. */
static inline __attribute__((always_inline)) void vsum_bf16(
    vf *acc, const uint16_t *value, const int64_t *row, int64_t t0, int64_t t1, int64_t offset,
    int64_t slot_stride, const int64_t D, const float *w) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                        55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
    uint32_t pairs[8];
    /* w[t1 .. t0 + 16) are the softmax's zeros for the padding keys */
    _mm256_storeu_si256((__m256i *)pairs, (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(w + t0)));
    vf a[D / 16], b[D / 16]; /* two chains: one waited on each vdpbf16ps's latency */
    for (int64_t c = 0; c < D / 16; c++) { a[c] = acc[c]; b[c] = (vf){}; }
    for (int64_t t = t0; t < t1; t += 4) { /* keys t, t+1 into a; t+2, t+3 into b */
        const uint16_t *v0 = value + row[t] * slot_stride + offset;
        const uint16_t *v1 = t + 1 < t1 ? value + row[t + 1] * slot_stride + offset : v0; /* weight 0 */
        const uint16_t *v2 = t + 2 < t1 ? value + row[t + 2] * slot_stride + offset : v0;
        const uint16_t *v3 = t + 3 < t1 ? value + row[t + 3] * slot_stride + offset : v0;
        const __m512bh wa = (__m512bh)_mm512_set1_epi32((int)pairs[(t - t0) / 2]);
        const __m512bh wb = (__m512bh)_mm512_set1_epi32((int)pairs[(t - t0) / 2 + 1]);
        for (int64_t c = 0; c < D / 32; c++) {
            const __m512i x0 = _mm512_loadu_si512(v0 + 32 * c), x1 = _mm512_loadu_si512(v1 + 32 * c);
            const __m512i x2 = _mm512_loadu_si512(v2 + 32 * c), x3 = _mm512_loadu_si512(v3 + 32 * c);
            a[2 * c] = (vf)_mm512_dpbf16_ps((__m512)a[2 * c], (__m512bh)_mm512_permutex2var_epi16(x0, lo, x1), wa);
            a[2 * c + 1] = (vf)_mm512_dpbf16_ps((__m512)a[2 * c + 1], (__m512bh)_mm512_permutex2var_epi16(x0, hi, x1), wa);
            b[2 * c] = (vf)_mm512_dpbf16_ps((__m512)b[2 * c], (__m512bh)_mm512_permutex2var_epi16(x2, lo, x3), wb);
            b[2 * c + 1] = (vf)_mm512_dpbf16_ps((__m512)b[2 * c + 1], (__m512bh)_mm512_permutex2var_epi16(x2, hi, x3), wb);
        }
    }
    for (int64_t c = 0; c < D / 16; c++) acc[c] = a[c] + b[c];
}
#define BF16_SCORE_ALIGN 32 /* the pair paths want whole 32-element vectors of a head */
#else
DEFINE_FLOAT_SCORES(prep_bf16, scores_bf16, vsum_bf16, uint16_t, vload_bf16)
#define BF16_SCORE_ALIGN 16
#endif

#define DEFINE_SEQUENCE_VEC(NAME, T, VSTORE, PREP, SCORES, VSUM)                                   \
    static inline __attribute__((always_inline)) void NAME(                                       \
        const T *q, T *out, const T *key, const T *value, int64_t slot_stride, const int64_t *row, \
        int64_t n, int64_t H, int64_t KVH, const int64_t D, float scale, float *work) {           \
        const int64_t G = H / KVH, C = D / 16, padded = (n + 15) / 16 * 16;                       \
        vf *qv = (vf *)work, *acc = qv + H * C;                                                   \
        float *sc = (float *)(acc + H * C);                                                       \
        PREP(qv, q, H, D, scale);                                                                 \
        for (int64_t i = 0; i < H * C; i++) acc[i] = (vf){};                                      \
        for (int64_t t0 = 0; t0 < n; t0 += 16) {                                                  \
            for (int64_t kh = 0, i = 0; kh < KVH; kh++) /* no division in these loops: an idiv */ \
                for (int64_t g = 0; g < G; g++, i++)   /* per block and head was ~1/3 of them */ \
                    *(vf *)(sc + i * padded + t0) =                                               \
                        SCORES(qv + i * C, key, row, t0, n, kh * D, slot_stride, D, scale);       \
        }                                                                                         \
        float inv[H];                                                                             \
        for (int64_t i = 0; i < H; i++) {                                                         \
            float *si = sc + i * padded;                                                          \
            for (int64_t t = n; t < padded; t++) si[t] = -1e30f;                                  \
            vf m = (vf){} - 1e30f;                                                                \
            for (int64_t t = 0; t < padded; t += 16) m = vmax(m, *(vf *)(si + t));                \
            const float mx = hmax(m);                                                             \
            vf sum = (vf){};                                                                      \
            for (int64_t t = 0; t < padded; t += 16) {                                            \
                const vf e = vexp(*(vf *)(si + t) - mx);                                          \
                *(vf *)(si + t) = e;                                                              \
                sum += e;                                                                         \
            }                                                                                     \
            inv[i] = 1.0f / hsum(sum);                                                            \
        }                                                                                         \
        for (int64_t t0 = 0; t0 < n; t0 += 16) {                                                  \
            const int64_t t1 = t0 + 16 < n ? t0 + 16 : n;                                         \
            for (int64_t kh = 0, i = 0; kh < KVH; kh++)                                           \
                for (int64_t g = 0; g < G; g++, i++)                                              \
                    VSUM(acc + i * C, value, row, t0, t1, kh * D, slot_stride, D, sc + i * padded); \
        }                                                                                         \
        for (int64_t i = 0; i < H; i++)                                                           \
            for (int64_t c = 0; c < C; c++) VSTORE(out + i * D + 16 * c, acc[i * C + c] * inv[i]); \
    }

/* q, out: (B, H, D) contiguous. key/value: rows of one slot, `slot_stride` elements apart, head h
 * at h * D. slots: row b at b * slots_stride. Sequence b attends slots[b][starts[b] .. ends[b]).
 * Sequences run in parallel, each with its own scratch. */
#define DEFINE_KERNEL(NAME, SEQUENCE, SEQUENCE_VEC, T, ALIGN)                                      \
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
            const size_t bytes = sizeof(float) * (size_t)(H * (max_span + 16) + 2 * H * D + 32);   \
            float *scores = aligned_alloc(64, (bytes + 63) / 64 * 64);                            \
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
                case 32: SEQUENCE_VEC(qb, ob, key, value, slot_stride, row, n, H, KVH, 32, scale, scores); break; \
                case 64: SEQUENCE_VEC(qb, ob, key, value, slot_stride, row, n, H, KVH, 64, scale, scores); break; \
                case 128: SEQUENCE_VEC(qb, ob, key, value, slot_stride, row, n, H, KVH, 128, scale, scores); break; \
                default:                                                                          \
                    if (D % ALIGN == 0) {                                                         \
                        SEQUENCE_VEC(qb, ob, key, value, slot_stride, row, n, H, KVH, D, scale, scores); \
                        break;                                                                    \
                    }                                                                             \
                    SEQUENCE(qb, ob, key, value, slot_stride, row, n, H, KVH, D, scale, scores, qf, acc); \
                }                                                                                 \
            }                                                                                     \
            free(scores);                                                                         \
        }                                                                                         \
        return failed ? -1 : 0;                                                                   \
    }

DEFINE_SEQUENCE(sequence_f32, float, f32_load, f32_store)
DEFINE_SEQUENCE(sequence_bf16, uint16_t, bf16_load, bf16_store)
DEFINE_SEQUENCE_VEC(sequence_vec_f32, float, vstore_f32, prep_f32, scores_f32, vsum_f32)
DEFINE_SEQUENCE_VEC(sequence_vec_bf16, uint16_t, vstore_bf16, prep_bf16, scores_bf16, vsum_bf16)
DEFINE_KERNEL(decode_f32, sequence_f32, sequence_vec_f32, float, 16)
DEFINE_KERNEL(decode_bf16, sequence_bf16, sequence_vec_bf16, uint16_t, BF16_SCORE_ALIGN)

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

/* Projections of a few rows (a decode step's tokens): y (M, N) = x (M, K) W (N, K)^T + bias, K a
 * multiple of 16, W in the checkpoint's own layout. A tile is MB rows by 16 / MB outputs: 16 dot
 * products accumulated along K in vectors (each x and W vector loaded once per tile and K step),
 * reduced together by `hsum16`, bias added and rounded once, as oneDNN and MKL do (float sums,
 * another order). Why: a library GEMM call costs 12-40 us of set-up per projection at one to
 * eight rows (small-llama, one core), against 1-5 us of arithmetic; these tiles go straight to
 * the arithmetic. Tiles run in parallel over the output columns. */
/* One K step of a tile in float vectors: 16 elements of each row, widened where bfloat16. */
#define LINEAR_STEP_FLOAT(T, VLOAD)                                                                 \
    for (int64_t k = 0; k < K; k += 16) {                                                          \
        vf xv[MB];                                                                                 \
        _Pragma("GCC unroll 16")                                                                   \
        for (int64_t i = 0; i < MB; i++) xv[i] = VLOAD(xr[i] + k);                                 \
        _Pragma("GCC unroll 16")                                                                   \
        for (int64_t j = 0; j < NB; j++) {                                                         \
            const vf wv = VLOAD(wr[j] + k);                                                        \
            _Pragma("GCC unroll 16")                                                               \
            for (int64_t i = 0; i < MB; i++) acc[i * NB + j] += xv[i] * wv;                        \
        }                                                                                          \
    }

#if defined(__AVX512BF16__)
/* bfloat16 pairs straight into float sums (vdpbf16ps: 32 products an instruction, exact, summed
 * in float): twice the float path's products per instruction and no widening. K % 32 == 0. */
#define LINEAR_STEP_BF16_PAIRS(T, VLOAD)                                                            \
    for (int64_t k = 0; k < K; k += 32) {                                                          \
        __m512bh xv[MB];                                                                           \
        _Pragma("GCC unroll 16")                                                                   \
        for (int64_t i = 0; i < MB; i++) xv[i] = (__m512bh)_mm512_loadu_si512(xr[i] + k);          \
        _Pragma("GCC unroll 16")                                                                   \
        for (int64_t j = 0; j < NB; j++) {                                                         \
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr[j] + k);                           \
            _Pragma("GCC unroll 16")                                                               \
            for (int64_t i = 0; i < MB; i++)                                                       \
                acc[i * NB + j] = (vf)_mm512_dpbf16_ps((__m512)acc[i * NB + j], xv[i], wv);        \
        }                                                                                          \
    }
#endif

#define DEFINE_LINEAR_TILE(NAME, T, STEP, VLOAD, LOAD, STORE)                                       \
    static inline __attribute__((always_inline)) void NAME(                                        \
        const T *x, const T *w, const T *bias, T *y, int64_t M, int64_t N, int64_t K, int64_t m0,  \
        int64_t n0, const int64_t MB) {                                                            \
        const int64_t NB = 16 / MB;                                                                \
        const T *xr[MB], *wr[16 / MB];                                                             \
        for (int64_t i = 0; i < MB; i++) xr[i] = x + (m0 + i < M ? m0 + i : M - 1) * K;            \
        for (int64_t j = 0; j < NB; j++) wr[j] = w + (n0 + j < N ? n0 + j : N - 1) * K;            \
        vf acc[16];                                                                                \
        _Pragma("GCC unroll 16")                                                                   \
        for (int a = 0; a < 16; a++) acc[a] = (vf){};                                              \
        STEP(T, VLOAD)                                                                             \
        float sums[16];                                                                            \
        const vf s = hsum16(acc);                                                                  \
        memcpy(sums, &s, sizeof sums);                                                             \
        for (int64_t i = 0; i < MB && m0 + i < M; i++)                                             \
            for (int64_t j = 0; j < NB && n0 + j < N; j++)                                         \
                STORE(&y[(m0 + i) * N + n0 + j], sums[i * NB + j] + (bias ? LOAD(&bias[n0 + j]) : 0.0f)); \
    }

#define DEFINE_LINEAR(NAME, TILE, T)                                                               \
    static void NAME(const T *x, const T *w, const T *bias, T *y, int64_t M, int64_t N, int64_t K, \
                     int threads) {                                                                \
        const int64_t MB = M >= 4 ? 4 : M >= 2 ? 2 : 1, NB = 16 / MB;                              \
        const int64_t col_tiles = (N + NB - 1) / NB, tiles = (M + MB - 1) / MB * col_tiles;        \
        _Pragma("omp parallel for num_threads(threads) if (M * N * K >= (1 << 22))")              \
        for (int64_t t = 0; t < tiles; t++) {                                                      \
            const int64_t m0 = t / col_tiles * MB, n0 = t % col_tiles * NB;                        \
            switch (MB) { /* constant tile shapes: the inner loops unroll into registers */        \
            case 4: TILE(x, w, bias, y, M, N, K, m0, n0, 4); break;                                \
            case 2: TILE(x, w, bias, y, M, N, K, m0, n0, 2); break;                                \
            default: TILE(x, w, bias, y, M, N, K, m0, n0, 1);                                      \
            }                                                                                      \
        }                                                                                          \
    }

DEFINE_LINEAR_TILE(linear_tile_f32, float, LINEAR_STEP_FLOAT, vload_f32, f32_load, f32_store)
DEFINE_LINEAR_TILE(linear_tile_bf16, uint16_t, LINEAR_STEP_FLOAT, vload_bf16, bf16_load, bf16_store)
DEFINE_LINEAR(linear_f32, linear_tile_f32, float)
DEFINE_LINEAR(linear_bf16, linear_tile_bf16, uint16_t)
#if defined(__AVX512BF16__)
DEFINE_LINEAR_TILE(linear_tile_bf16_pairs, uint16_t, LINEAR_STEP_BF16_PAIRS, vload_bf16, bf16_load, bf16_store)
DEFINE_LINEAR(linear_bf16_pairs, linear_tile_bf16_pairs, uint16_t)
#endif

/* bias may be NULL. Returns 0, -2 for a bad dtype, -3 when K is not a multiple of 16. */
int small_linear(const void *x, const void *w, const void *bias, void *y, int64_t M, int64_t N,
                 int64_t K, int dtype, int threads) {
    if (K % 16 != 0) return -3;
    if (dtype == 0) linear_f32(x, w, bias, y, M, N, K, threads);
#if defined(__AVX512BF16__)
    else if (dtype == 1 && K % 32 == 0) linear_bf16_pairs(x, w, bias, y, M, N, K, threads);
#endif
    else if (dtype == 1) linear_bf16(x, w, bias, y, M, N, K, threads);
    else return -2;
    return 0;
}

/* bfloat16 projections on AMX (Intel's tile matrix unit, Sapphire Rapids on): y (M, N) = x (M, K)
 * W^T + bias with W packed once (`pack_amx`: for each 16 outputs and 32-wide K slab, one 16 x 16
 * tile of bfloat16 pairs, the layout tdpbf16ps takes), K a multiple of 32. A pass holds 16 rows
 * by 64 outputs in four float tiles and walks K one slab a step: one x tile, four weight tiles,
 * four tile products (16 x 16 x 32 each). Why: oneDNN's AMX path costs ~20 us of set-up a call,
 * which at a decode step's 1-32 rows is most of a small model's projection. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_permitted = 0; /* 0: not asked yet, 1: granted, -1: refused (old kernel, no AMX) */

int amx_available(void) {
    if (amx_permitted == 0) /* the permission is per process; asking twice is harmless */
        amx_permitted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    return amx_permitted == 1;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static void amx_configure(int rows) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 4; t++) { cfg.rows[t] = (uint8_t)rows; cfg.colsb[t] = 64; } /* float sums */
    cfg.rows[4] = (uint8_t)rows; cfg.colsb[4] = 64;                                 /* x slab */
    for (int t = 5; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }             /* weights */
    _tile_loadconfig(&cfg);
}

#define AMX_GROUP 4 /* output tiles of 16 a pass */

int amx_linear(const uint16_t *x, const uint16_t *wp, const uint16_t *bias, uint16_t *y, int64_t M,
               int64_t N, int64_t K, int threads) {
    if (K % 32 != 0) return -3;
    if (!amx_available()) return -4;
    const int64_t slabs = K / 32, nblocks = (N + 15) / 16, groups = (nblocks + AMX_GROUP - 1) / AMX_GROUP;
    const int64_t mblocks = (M + 15) / 16, items = mblocks * groups;
    _Pragma("omp parallel num_threads(threads) if (M * N * K >= (1 << 24))")
    {
        int configured = 0;
        float out[16 * 16 * AMX_GROUP] __attribute__((aligned(64)));
        _Pragma("omp for schedule(static)")
        for (int64_t it = 0; it < items; it++) {
            /* Row blocks vary fastest: a thread's consecutive items share one group's weight
             * slabs, which stay in its L2 while every row block passes them (row blocks
             * outermost, each streamed the whole weight from memory again: at 32-64 rows
             * of a 4096 x 4096 projection 2-2.3x slower than oneDNN). */
            const int64_t m0 = it % mblocks * 16, g0 = it / mblocks * AMX_GROUP;
            const int rows = (int)(M - m0 < 16 ? M - m0 : 16);
            if (configured != rows) { amx_configure(rows); configured = rows; }
            const int64_t nb = nblocks - g0 < AMX_GROUP ? nblocks - g0 : AMX_GROUP;
            const uint16_t *w0 = wp + g0 * slabs * 512;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t k = 0; k < slabs; k++) {
                _tile_loadd(4, x + m0 * K + k * 32, K * 2);
                _tile_loadd(5, w0 + k * 512, 64);
                _tile_dpbf16ps(0, 4, 5);
                if (nb > 1) { _tile_loadd(6, w0 + (slabs + k) * 512, 64); _tile_dpbf16ps(1, 4, 6); }
                if (nb > 2) { _tile_loadd(7, w0 + (2 * slabs + k) * 512, 64); _tile_dpbf16ps(2, 4, 7); }
                if (nb > 3) { _tile_loadd(5, w0 + (3 * slabs + k) * 512, 64); _tile_dpbf16ps(3, 4, 5); }
            }
            _tile_stored(0, out, 64 * AMX_GROUP);
            _tile_stored(1, out + 16, 64 * AMX_GROUP);
            _tile_stored(2, out + 32, 64 * AMX_GROUP);
            _tile_stored(3, out + 48, 64 * AMX_GROUP);
            const int64_t n0 = g0 * 16, width = N - n0 < 16 * nb ? N - n0 : 16 * nb;
            for (int r = 0; r < rows; r++) {
                uint16_t *yr = y + (m0 + r) * N + n0;
                const float *o = out + r * 16 * AMX_GROUP;
                for (int64_t j = 0; j < width; j++) bf16_store(&yr[j], o[j] + (bias ? bf16_load(&bias[n0 + j]) : 0.0f));
            }
        }
        if (configured) _tile_release();
    }
    return 0;
}

static void amx_configure_square(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
}

/* r[i] lane j -> r[j] lane i: a 16 x 16 transpose of 32-bit units (a unit here: two bfloat16). */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}


/* bfloat16 projections of a few rows (3-64) on AMX with W in the checkpoint's own layout (N, K),
 * for weights too large to stay in cache: y^T = W x^T, W the A operand as it lies (16 output rows
 * of 32 K values a tile, each row 2K bytes on), x the B operand, its rows transposed into VNNI
 * pairs once a call. A pass holds 32 outputs by 32 rows in four float tiles, so each weight line
 * is read from memory once, and asks for the next pass's 32 weight rows a line per K step ahead
 * of use. Why: such a decode step's projections are memory-bound, and oneDNN streamed them at
 * ~11 GB/s of the ~16 one core reads; this reaches 12.5-14 (32 rows, one core, weights cycled
 * through 800 MB: 2048 x 2048 to 11264 x 2048). No packed copy of W. N % 16 == 0, K % 32 == 0. */
int amx_linear_plain(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M,
                     int64_t N, int64_t K, int threads) {
    if (K % 32 != 0 || N % 16 != 0 || M < 1 || M > 64) return -3;
    if (!amx_available()) return -4;
    const int64_t S = K / 32, TB = (M + 15) / 16, pairs = (N + 31) / 32;
    uint32_t *xb = aligned_alloc(64, (size_t)TB * (size_t)S * 1024);
    if (xb == NULL) return -1;
    /* xb: token block tb, K pair u (= 16 s + p), token t at unit (tb S 16 + u) 16 + t */
    const uint32_t *x32 = (const uint32_t *)x;
    for (int64_t tb = 0; tb < TB; tb++)
        for (int64_t u0 = 0; u0 < K / 2; u0 += 16) {
            __m512i r[16];
            for (int t = 0; t < 16; t++)
                r[t] = tb * 16 + t < M ? _mm512_loadu_si512(x32 + (tb * 16 + t) * (K / 2) + u0) : _mm512_setzero_si512();
            transpose16(r);
            for (int i = 0; i < 16; i++) _mm512_store_si512((__m512i *)(xb + (tb * S * 16 + u0 + i) * 16), r[i]);
        }
    _Pragma("omp parallel num_threads(threads) if (M * N * K >= (1 << 24))")
    {
        amx_configure_square();
        float out[4][256] __attribute__((aligned(64)));
        _Pragma("omp for schedule(static)")
        for (int64_t pi = 0; pi < pairs; pi++) {
            const int64_t n0 = pi * 32;
            const int two_n = n0 + 16 < N;
            const uint16_t *a0 = w + n0 * K, *a1 = w + (two_n ? n0 + 16 : n0) * K;
            const char *next = n0 + 32 < N ? (const char *)(w + (n0 + 32) * K) : NULL;
            const int64_t next_rows = next == NULL ? 0 : N - n0 - 32 < 32 ? N - n0 - 32 : 32;
            for (int64_t tb = 0; tb < TB; tb += 2) {
                const int two_t = tb + 1 < TB;
                const uint32_t *b0 = xb + tb * S * 256, *b1 = xb + (two_t ? tb + 1 : tb) * S * 256;
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int64_t s = 0; s < S; s++) {
                    if (tb == 0)
                        for (int64_t r = 0; r < next_rows; r++) _mm_prefetch(next + r * K * 2 + s * 64, _MM_HINT_T0);
                    _tile_loadd(4, a0 + s * 32, K * 2);
                    _tile_loadd(6, b0 + s * 256, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    if (two_n) { _tile_loadd(5, a1 + s * 32, K * 2); _tile_dpbf16ps(2, 5, 6); }
                    if (two_t) {
                        _tile_loadd(7, b1 + s * 256, 64);
                        _tile_dpbf16ps(1, 4, 7);
                        if (two_n) _tile_dpbf16ps(3, 5, 7);
                    }
                }
                /* tile (output block i, token block j) holds 16 outputs x 16 tokens: transposed to
                 * a token's 16 outputs a row, bias added, rounded to bfloat16 */
                _tile_stored(0, out[0], 64);
                if (two_t) _tile_stored(1, out[1], 64);
                if (two_n) _tile_stored(2, out[2], 64);
                if (two_n && two_t) _tile_stored(3, out[3], 64);
                for (int i = 0; i < (two_n ? 2 : 1); i++) {
                    const __m512 b = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                         _mm256_loadu_si256((const __m256i *)(bias + n0 + 16 * i))), 16))
                                          : _mm512_setzero_ps();
                    for (int j = 0; j < (two_t ? 2 : 1); j++) {
                        __m512i r[16];
                        for (int o = 0; o < 16; o++) r[o] = _mm512_load_si512((const __m512i *)(out[2 * i + j] + 16 * o));
                        transpose16(r);
                        for (int t = 0; t < 16 && (tb + j) * 16 + t < M; t++)
                            _mm256_storeu_si256((__m256i *)(y + ((tb + j) * 16 + t) * N + n0 + 16 * i),
                                                (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_castsi512_ps(r[t]), b)));
                    }
                }
            }
        }
        _tile_release();
    }
    free(xb);
    return 0;
}
#else
int amx_available(void) { return 0; }
int amx_linear(const uint16_t *x, const uint16_t *wp, const uint16_t *bias, uint16_t *y, int64_t M,
               int64_t N, int64_t K, int threads) {
    (void)x; (void)wp; (void)bias; (void)y; (void)M; (void)N; (void)K; (void)threads;
    return -4;
}
int amx_linear_plain(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M,
                     int64_t N, int64_t K, int threads) {
    (void)x; (void)w; (void)bias; (void)y; (void)M; (void)N; (void)K; (void)threads;
    return -4;
}
#endif

/* Rows small enough not to wake the thread team for. */
#define PARALLEL_MIN_ELEMENTS 65536

/* x, out: (T, N); out = x * rsqrt(mean(x^2) + eps) * w. bfloat16 as RMSNorm.forward: normalise in
 * float32, round, then weight * normalised rounded again. 16 columns at a time in vector code,
 * the tail in scalar: the scalar form (bfloat16 rounded per element) took 4.5 ms for 2048 x 2048
 * in bfloat16, six times a copy's time (17 of them in a medium-llama prefill step). */
static inline vf vround_bf16(vf v) { /* to bfloat16's precision, still a float (as bf16_store) */
    vu u = (vu)v;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (vf)(u & 0xFFFF0000u);
}
static inline vf vround_none(vf v) { return v; }
/* One row; the kernels below run it per row, on the thread team where rows are many. */
#define DEFINE_RMS_NORM_ROW(NAME, T, LOAD, STORE, VLOAD, VSTORE, VROUND, ROUND_TWICE)              \
    static inline __attribute__((always_inline)) void NAME(const T *xr, const T *w, T *orow,     \
                                                           int64_t n, float eps) {               \
        const int64_t nv = n / 16 * 16;                                                           \
        vf sq = (vf){};                                                                           \
        for (int64_t i = 0; i < nv; i += 16) {                                                    \
            const vf v = VLOAD(xr + i);                                                           \
            sq += v * v;                                                                          \
        }                                                                                         \
        float sum = hsum(sq);                                                                     \
        for (int64_t i = nv; i < n; i++) {                                                        \
            const float v = LOAD(&xr[i]);                                                         \
            sum += v * v;                                                                         \
        }                                                                                         \
        const float inv = 1.0f / sqrtf(sum / (float)n + eps);                                     \
        for (int64_t i = 0; i < nv; i += 16) {                                                    \
            if (ROUND_TWICE) VSTORE(orow + i, VLOAD(w + i) * VROUND(VLOAD(xr + i) * inv));        \
            else VSTORE(orow + i, VLOAD(xr + i) * inv * VLOAD(w + i));                            \
        }                                                                                         \
        for (int64_t i = nv; i < n; i++) {                                                        \
            if (ROUND_TWICE) {                                                                    \
                T normed;                                                                         \
                STORE(&normed, LOAD(&xr[i]) * inv);                                               \
                STORE(&orow[i], LOAD(&w[i]) * LOAD(&normed));                                     \
            } else {                                                                              \
                STORE(&orow[i], LOAD(&xr[i]) * inv * LOAD(&w[i]));                                \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_RMS_NORM_ROW(rms_norm_row_f32, float, f32_load, f32_store, vload_f32, vstore_f32, vround_none, 0)
DEFINE_RMS_NORM_ROW(rms_norm_row_bf16, uint16_t, bf16_load, bf16_store, vload_bf16, vstore_bf16, vround_bf16, 1)

#define DEFINE_RMS_NORM(NAME, ROW, T)                                                              \
    static void NAME(const T *x, const T *w, T *out, int64_t rows, int64_t n, float eps,          \
                     int threads) {                                                               \
        _Pragma("omp parallel for num_threads(threads) if (rows * n >= PARALLEL_MIN_ELEMENTS)")   \
        for (int64_t r = 0; r < rows; r++) ROW(x + r * n, w, out + r * n, n, eps);                \
    }

DEFINE_RMS_NORM(rms_norm_f32, rms_norm_row_f32, float)
DEFINE_RMS_NORM(rms_norm_bf16, rms_norm_row_bf16, uint16_t)

int rms_norm(const void *x, const void *w, void *out, int64_t rows, int64_t n, float eps, int dtype,
             int threads) {
    if (dtype == 0) rms_norm_f32(x, w, out, rows, n, eps, threads);
    else if (dtype == 1) rms_norm_bf16(x, w, out, rows, n, eps, threads);
    else return -2;
    return 0;
}

/* The residual add before a norm, fused: x += delta (rounded to x's type, as torch's add), then
 * out = rms_norm(x) as `rms_norm`. A decode step of a small model made 8 such adds a step, each a
 * torch op and an allocation; here the sum is written back while the row is in cache. */
#define DEFINE_ADD_RMS_NORM(NAME, ROW, T, LOAD, STORE)                                             \
    static void NAME(T *x, const T *delta, const T *w, T *out, int64_t rows, int64_t n, float eps, \
                     int threads) {                                                               \
        _Pragma("omp parallel for num_threads(threads) if (rows * n >= PARALLEL_MIN_ELEMENTS)")   \
        for (int64_t r = 0; r < rows; r++) {                                                      \
            T *xr = x + r * n;                                                                    \
            const T *dr = delta + r * n;                                                          \
            _Pragma("omp simd")                                                                   \
            for (int64_t i = 0; i < n; i++) STORE(&xr[i], LOAD(&xr[i]) + LOAD(&dr[i]));          \
            ROW(xr, w, out + r * n, n, eps);                                                      \
        }                                                                                         \
    }

DEFINE_ADD_RMS_NORM(add_rms_norm_f32, rms_norm_row_f32, float, f32_load, f32_store)
DEFINE_ADD_RMS_NORM(add_rms_norm_bf16, rms_norm_row_bf16, uint16_t, bf16_load, bf16_store)

int add_rms_norm(void *x, const void *delta, const void *w, void *out, int64_t rows, int64_t n, float eps,
                 int dtype, int threads) {
    if (dtype == 0) add_rms_norm_f32(x, delta, w, out, rows, n, eps, threads);
    else if (dtype == 1) add_rms_norm_bf16(x, delta, w, out, rows, n, eps, threads);
    else return -2;
    return 0;
}

/* In place: `heads` heads of D in each of `rows` rows (row r at r * row_stride), rotated by the
 * row's cos/sin (rows, D): x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1). Each
 * product and the sum rounded as torch's three ops round them. */
#define DEFINE_ROTARY(NAME, T, LOAD, STORE, VLOAD, VSTORE, VROUND)                              \
    static void NAME(T *x, int64_t rows, int64_t heads, int64_t D, int64_t row_stride,            \
                     const T *cos, const T *sin, int threads) {                                   \
        const int64_t half = D / 2;                                                               \
        _Pragma("omp parallel for num_threads(threads) if (rows * heads * D >= PARALLEL_MIN_ELEMENTS)") \
        for (int64_t r = 0; r < rows; r++) {                                                      \
            const T *c = cos + r * D, *s = sin + r * D;                                           \
            for (int64_t h = 0; h < heads; h++) {                                                 \
                T *xh = x + r * row_stride + h * D;                                               \
                int64_t j = 0;                                                                    \
                for (; j + 16 <= half; j += 16) { /* the same roundings, 16 columns a step */     \
                    const vf x1 = VLOAD(xh + j), x2 = VLOAD(xh + j + half);                       \
                    const vf a = VROUND(x1 * VLOAD(c + j)), b = VROUND(-x2 * VLOAD(s + j));       \
                    const vf e = VROUND(x2 * VLOAD(c + j + half)), f = VROUND(x1 * VLOAD(s + j + half)); \
                    VSTORE(xh + j, a + b);                                                        \
                    VSTORE(xh + j + half, e + f);                                                 \
                }                                                                                 \
                for (; j < half; j++) {                                                           \
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

DEFINE_ROTARY(rotary_f32, float, f32_load, f32_store, vload_f32, vstore_f32, vround_none)
DEFINE_ROTARY(rotary_bf16, uint16_t, bf16_load, bf16_store, vload_bf16, vstore_bf16, vround_bf16)

int rotary(void *x, int64_t rows, int64_t heads, int64_t D, int64_t row_stride, const void *cos,
           const void *sin, int dtype, int threads) {
    if (D % 2) return -3;
    if (dtype == 0) rotary_f32(x, rows, heads, D, row_stride, cos, sin, threads);
    else if (dtype == 1) rotary_bf16(x, rows, heads, D, row_stride, cos, sin, threads);
    else return -2;
    return 0;
}

/* A step's fused Q/K/V rows into attention's inputs, in one call: rotate the Q and K heads in place
 * (as `rotary`), copy each row's Q heads into q_out (rows, heads * D), and its K and V heads into
 * the KV pool at that row's slot (key/value: slot s at s * slot_stride). Why: in torch that was
 * the rotary call, two contiguous copies, two index_copy_ and their views, ~10 ops of dispatch a
 * layer, which in a decode step of a small model cost more than the bytes they move. */
int rotary_cache(void *qkv, int64_t rows, int64_t heads, int64_t kv_heads, int64_t D, int64_t row_stride,
                 const void *cos, const void *sin, void *q_out, void *key, void *value,
                 int64_t slot_stride, const int64_t *slots, int dtype, int threads) {
    if (D % 2) return -3;
    const size_t size = dtype == 0 ? 4 : dtype == 1 ? 2 : 0;
    if (size == 0) return -2;
    if (dtype == 0) rotary_f32(qkv, rows, heads + kv_heads, D, row_stride, cos, sin, threads);
    else rotary_bf16(qkv, rows, heads + kv_heads, D, row_stride, cos, sin, threads);
    const size_t q_bytes = (size_t)(heads * D) * size, kv_bytes = (size_t)(kv_heads * D) * size;
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)qkv + (size_t)(r * row_stride) * size;
        char *slot_k = (char *)key + (size_t)(slots[r] * slot_stride) * size;
        char *slot_v = (char *)value + (size_t)(slots[r] * slot_stride) * size;
        memcpy((char *)q_out + r * q_bytes, row, q_bytes);
        memcpy(slot_k, row + q_bytes, kv_bytes);
        memcpy(slot_v, row + q_bytes + kv_bytes, kv_bytes);
    }
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

/* Prompt attention (fresh prompts, later chunks of a prompt, the prompt part of a mixed step):
 * causal, optionally windowed, over the pool (this step's keys and values are already in it).
 * Flash-style with the vector lanes across 16 queries of one head, not across the head size:
 * a score tile is 16 keys x 16 queries in 16 registers, each key element broadcast against a
 * column of transposed queries, so the running maximum and sum of the online softmax are
 * per-lane vector ops with no horizontal reduction, and the value sum is a broadcast FMA per
 * (key, dimension) into transposed accumulators. Key blocks wholly after a tile's queries are
 * skipped (the causal half), and only the blocks the causal or window edge crosses are masked.
 * A work item is 64 queries of one sequence for all the query heads of one KV head; it first
 * copies the keys and values it reads into contiguous float rows, so the tile loops see one
 * layout whatever the slots and dtype. Written with GCC/Clang vector extensions: 16 lanes are
 * one AVX-512 register, or two AVX2 ones where the CPU has no AVX-512. Measured on small-llama
 * (4 x 512-token prompts, 8 heads of 32, one core): 5.6 ms a layer against 9.9 for torch's
 * flash kernel; an earlier version with a row of scores per query and a libm call per exp
 * vector was 16 ms. */
#define LANES 16
#define KEYS 16
#define QCHUNK 64
/* One key block of the online softmax over 16 query lanes (positions posv): masks the keys a lane
 * must not see (causal, window), turns the scores s into weights against the lanes' new running
 * maximum *m, adds them to the running sums *l, and returns the factor the sums and outputs so
 * far must be scaled by. EXP: e^x for the float tiles, the cubic 2^x (scores in log2 units) for
 * the bfloat16 AMX items. */
#define DEFINE_SOFTMAX_BLOCK(NAME, NKEYS, EXP)                                                     \
    static inline __attribute__((always_inline)) vf NAME(vf *s, int64_t j0, vf posv, int64_t pmin, \
                                                         int64_t pmax, int64_t window, vf *m,      \
                                                         vf *l) {                                  \
        const int masked = j0 + NKEYS - 1 > pmin || (window > 0 && j0 <= pmax - window);          \
        vi valid[NKEYS];                                                                           \
        if (masked) {                                                                              \
            _Pragma("GCC unroll 32")                                                               \
            for (int j = 0; j < NKEYS; j++) {                                                      \
                const vf key = (vf){} + (float)(j0 + j);                                           \
                valid[j] = key <= posv;                                                            \
                if (window > 0) valid[j] &= key > posv - (float)window;                            \
                s[j] = vsel(valid[j], s[j], (vf){} - 1e30f);                                       \
            }                                                                                      \
        }                                                                                          \
        vf bm = s[0];                                                                              \
        _Pragma("GCC unroll 32")                                                                   \
        for (int j = 1; j < NKEYS; j++) bm = vmax(bm, s[j]);                                       \
        const vf mn = vmax(*m, bm), corr = EXP(*m - mn);                                           \
        vf sum = (vf){};                                                                           \
        _Pragma("GCC unroll 32")                                                                   \
        for (int j = 0; j < NKEYS; j++) {                                                          \
            s[j] = EXP(s[j] - mn);                                                                 \
            if (masked) s[j] = vsel(valid[j], s[j], (vf){});                                       \
            sum += s[j];                                                                           \
        }                                                                                          \
        *l = *l * corr + sum;                                                                      \
        *m = mn;                                                                                   \
        return corr;                                                                               \
    }

DEFINE_SOFTMAX_BLOCK(softmax_block, KEYS, vexp)

/* A tile's 16 lanes: rows r0.. of an item's (head of the group, query position) pairs, a run of
 * `per` positions for every head of the group before the next run, so a tile's lanes are full
 * whenever the item has 16 rows: a verification step's 2-5 queries per sequence fill them with
 * the group's heads instead of using 2-5 lanes of a tile per head. Lanes past the item's rows
 * repeat its last. lane_h / lane_p: each lane's head and query index in the item's sequence,
 * *posv their positions; *pmin, *pmax the smallest and largest. Returns the lanes in use. */
static inline int64_t tile_lanes(int64_t r0, int64_t nq, int64_t G, int64_t kh, int64_t c0, int64_t first,
                                 int64_t *lane_h, int64_t *lane_p, vf *posv, int64_t *pmin, int64_t *pmax) {
    const int64_t per = G >= LANES ? 1 : LANES / G, rows = nq * G;
    const int64_t nl = rows - r0 < LANES ? rows - r0 : LANES;
    float posf[LANES] __attribute__((aligned(64)));
    *pmin = INT64_MAX;
    *pmax = -1;
    for (int l = 0; l < LANES; l++) {
        const int64_t r = r0 + (l < nl ? l : nl - 1), run = r / (per * G);
        const int64_t within = r - run * per * G;
        const int64_t len = nq - run * per < per ? nq - run * per : per;
        lane_h[l] = kh * G + within / len;
        lane_p[l] = c0 + run * per + within % len;
        posf[l] = (float)(first + lane_p[l]);
        if (first + lane_p[l] < *pmin) *pmin = first + lane_p[l];
        if (first + lane_p[l] > *pmax) *pmax = first + lane_p[l];
    }
    memcpy(posv, posf, sizeof *posv);
    return nl;
}

/* One tile: 16 query lanes (transposed, pre-scaled queries qt[D]) over the keys they see.
 * posv: each lane's position; acc[D] gets the lanes' outputs, transposed. */
static inline __attribute__((always_inline)) void prompt_tile(
    const float *kbuf, const float *vbuf, int64_t klo, const vf *qt, vf *acc, vf posv,
    int64_t pmin, int64_t pmax, int64_t window, const int64_t D) {
    int64_t lo = window > 0 ? pmin - window + 1 : 0;
    if (lo < klo) lo = klo;
    lo = klo + (lo - klo) / KEYS * KEYS;
    vf m = (vf){} - 1e30f, l = (vf){};
    for (int64_t d = 0; d < D; d++) acc[d] = (vf){};
    for (int64_t j0 = lo; j0 <= pmax; j0 += KEYS) {
        const float *kb = kbuf + (j0 - klo) * D, *vb = vbuf + (j0 - klo) * D;
        vf s[KEYS];
        _Pragma("GCC unroll 16")
        for (int j = 0; j < KEYS; j++) s[j] = (vf){};
        for (int64_t d = 0; d < D; d++) {
            const vf qd = qt[d];
            _Pragma("GCC unroll 16")
            for (int j = 0; j < KEYS; j++) s[j] += kb[j * D + d] * qd;
        }
        const vf corr = softmax_block(s, j0, posv, pmin, pmax, window, &m, &l);
        for (int64_t d = 0; d < D; d++) {
            vf a = acc[d] * corr;
            _Pragma("GCC unroll 16")
            for (int j = 0; j < KEYS; j++) a += vb[j * D + d] * s[j];
            acc[d] = a;
        }
    }
    const vf inv = 1.0f / l;
    for (int64_t d = 0; d < D; d++) acc[d] *= inv;
}

/* The tile compiled once per common head size (float math only: shared by both dtypes' items),
 * not inlined into every (dtype, head size) item: eight inlined copies took gcc 5 s to build. */
#define DEFINE_TILE_FOR(NAME, DIM)                                                                 \
    static __attribute__((noinline)) void NAME(const float *kbuf, const float *vbuf, int64_t klo,  \
                                               const vf *qt, vf *acc, vf posv, int64_t pmin,       \
                                               int64_t pmax, int64_t window, int64_t D) {          \
        prompt_tile(kbuf, vbuf, klo, qt, acc, posv, pmin, pmax, window, DIM);                     \
    }
DEFINE_TILE_FOR(prompt_tile_32, 32)
DEFINE_TILE_FOR(prompt_tile_64, 64)
DEFINE_TILE_FOR(prompt_tile_128, 128)
DEFINE_TILE_FOR(prompt_tile_any, D)

typedef void (*tile_fn)(const float *, const float *, int64_t, const vf *, vf *, vf, int64_t, int64_t,
                        int64_t, int64_t);

static tile_fn tile_for(int64_t D) {
    return D == 32 ? prompt_tile_32 : D == 64 ? prompt_tile_64 : D == 128 ? prompt_tile_128 : prompt_tile_any;
}

/* One work item: queries [c0, c1) of sequence b (positions ctx - qlen + c0 ...), all G heads of KV
 * head kh. Copies the keys/values it reads into float scratch rows first (once for all its queries
 * and heads), so the tile loops read one contiguous buffer whatever the slots and dtype. */
#define DEFINE_PROMPT_ITEM(NAME, T, LOAD, STORE)                                                   \
    static inline __attribute__((always_inline)) void NAME(                                       \
        const T *q, T *out, const T *key, const T *value, int64_t slot_stride, const int64_t *row, \
        int64_t qstart, int64_t qlen, int64_t ctx, int64_t c0, int64_t c1, int64_t kh,            \
        int64_t window, int64_t H, int64_t KVH, const int64_t D, float scale, float *kbuf,        \
        float *vbuf, vf *qt, vf *acc, tile_fn tile) {                                             \
        const int64_t G = H / KVH, first = ctx - qlen;                                            \
        const int64_t hi = first + c1 - 1;                                                        \
        int64_t klo = window > 0 ? first + c0 - window + 1 : 0;                                   \
        if (klo < 0) klo = 0;                                                                     \
        for (int64_t j = klo; j <= hi; j++) {                                                     \
            const T *k = key + row[j] * slot_stride + kh * D, *v = value + row[j] * slot_stride + kh * D; \
            float *kd = kbuf + (j - klo) * D, *vd = vbuf + (j - klo) * D;                         \
            for (int64_t d = 0; d < D; d++) { kd[d] = LOAD(&k[d]); vd[d] = LOAD(&v[d]); }         \
        }                                                                                         \
        /* the last tile may read up to KEYS - 1 rows past hi: zeros, masked anyway */            \
        memset(kbuf + (hi + 1 - klo) * D, 0, sizeof(float) * (size_t)(KEYS * D));                 \
        memset(vbuf + (hi + 1 - klo) * D, 0, sizeof(float) * (size_t)(KEYS * D));                 \
        /* Rows are (head of the group, query position) pairs: see tile_lanes */                  \
        const int64_t nq = c1 - c0;                                                                \
        for (int64_t r0 = 0; r0 < nq * G; r0 += LANES) {                                           \
            int64_t lane_h[LANES], lane_p[LANES], pmin, pmax;                                      \
            vf posv;                                                                               \
            const int64_t nl = tile_lanes(r0, nq, G, kh, c0, first, lane_h, lane_p, &posv, &pmin, &pmax); \
            float *qtf = (float *)qt;                                                              \
            for (int l = 0; l < LANES; l++) {                                                      \
                const T *qr = q + (qstart + lane_p[l]) * H * D + lane_h[l] * D;                    \
                for (int64_t d = 0; d < D; d++) qtf[d * LANES + l] = LOAD(&qr[d]) * scale;         \
            }                                                                                      \
            tile(kbuf, vbuf, klo, qt, acc, posv, pmin, pmax, window, D);                           \
            const float *af = (const float *)acc;                                                  \
            for (int64_t l = 0; l < nl; l++) {                                                     \
                T *orow = out + (qstart + lane_p[l]) * H * D + lane_h[l] * D;                      \
                for (int64_t d = 0; d < D; d++) STORE(&orow[d], af[d * LANES + l]);                \
            }                                                                                      \
        }                                                                                          \
    }

DEFINE_PROMPT_ITEM(prompt_item_f32, float, f32_load, f32_store)
DEFINE_PROMPT_ITEM(prompt_item_bf16, uint16_t, bf16_load, bf16_store)

#define DEFINE_PROMPT_KERNEL(NAME, ITEM, T)                                                        \
    static int NAME(const T *q, T *out, const T *key, const T *value, int64_t slot_stride,        \
                    const int64_t *slots, int64_t slots_stride, const int64_t *qstarts,           \
                    const int64_t *qlens, const int64_t *ctxs, int64_t window, int64_t B,         \
                    int64_t H, int64_t KVH, int64_t D, float scale, int threads) {                \
        int64_t items = 0, max_keys = 1;                                                          \
        for (int64_t b = 0; b < B; b++) {                                                         \
            items += (qlens[b] + QCHUNK - 1) / QCHUNK * KVH;                                      \
            const int64_t span = window > 0 && window + QCHUNK < ctxs[b] ? window + QCHUNK : ctxs[b]; \
            if (span > max_keys) max_keys = span;                                                 \
        }                                                                                         \
        int failed = 0;                                                                           \
        _Pragma("omp parallel num_threads(threads)")                                             \
        {                                                                                         \
            const size_t rows = (size_t)(max_keys + KEYS);                                        \
            /* aligned_alloc wants a multiple of the alignment (macOS enforces it) */              \
            const size_t bytes = sizeof(float) * (2 * rows * (size_t)D + 2 * (size_t)(D * LANES)); \
            float *scratch = aligned_alloc(64, (bytes + 63) / 64 * 64);                            \
            if (scratch == NULL) {                                                                \
                _Pragma("omp atomic write") failed = 1;                                           \
            }                                                                                     \
            vf *qt = (vf *)scratch, *acc = qt + D;                                                \
            float *kbuf = scratch + 2 * D * LANES, *vbuf = kbuf + rows * D;                       \
            _Pragma("omp for schedule(dynamic)")                                                  \
            for (int64_t it = 0; it < items; it++) {                                              \
                if (scratch == NULL) continue;                                                    \
                int64_t b = 0, rest = it;                                                         \
                while (rest >= (qlens[b] + QCHUNK - 1) / QCHUNK * KVH) {                          \
                    rest -= (qlens[b] + QCHUNK - 1) / QCHUNK * KVH;                               \
                    b++;                                                                          \
                }                                                                                 \
                const int64_t kh = rest % KVH, c0 = rest / KVH * QCHUNK;                          \
                const int64_t c1 = c0 + QCHUNK < qlens[b] ? c0 + QCHUNK : qlens[b];               \
                const int64_t *row = slots + b * slots_stride;                                    \
                ITEM(q, out, key, value, slot_stride, row, qstarts[b], qlens[b], ctxs[b], c0, c1, kh,  \
                     window, H, KVH, D, scale, kbuf, vbuf, qt, acc, tile_for(D));                  \
            }                                                                                     \
            free(scratch);                                                                        \
        }                                                                                         \
        return failed ? -1 : 0;                                                                   \
    }

DEFINE_PROMPT_KERNEL(prompt_f32, prompt_item_f32, float)
DEFINE_PROMPT_KERNEL(prompt_bf16, prompt_item_bf16, uint16_t)

/* bfloat16 prompt attention on AMX tiles, for head sizes that are multiples of 32. The same work
 * items and lanes as the vector tiles above (the softmax in three passes: prompt_item_amx), the
 * two products on the tile unit: scores transposed, S^T (32 keys x 16 query lanes) = K Q^T, so that each stored row is one
 * key's scores across the lanes (the layout the softmax code works in), and the output transposed,
 * O^T (16 dims x 16 lanes) += V^T P^T, with P rounded to bfloat16 (as torch's and vLLM's bfloat16
 * attention round it). Keys are copied once per item as rows (the A operand as is), values
 * transposed (V^T rows), the item's queries per tile as VNNI pairs (the B operand); items are
 * 512 queries, so a prompt's values are transposed once, not once per 64 queries. The softmax
 * works in log2 units with a cubic exp2 good to bfloat16's precision. On small-llama (4 x
 * 512-token prompts, 8 heads of 32, one core): 3.1 ms a layer against 6.5 for the float32
 * vector tiles; in a bfloat16 prefill step attention went from 23.6 to 14.3 of 44 -> 34 ms. The
 * three-pass items took it to 2.7 ms a layer there, and from 26 to 13 on medium-llama (16 heads of
 * 128). */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__linux__)
#define AMX_KEYS 32
#define AMX_QCHUNK 512 /* queries an item: its keys are copied (values transposed) once an item */

static inline vf vload_plain(const float *p) { return *(const vf *)p; }

/* 2^x for x <= 0 to bfloat16's precision (relative error ~1e-4 where bfloat16 rounds at 4e-3):
 * a cubic on the fraction and vscalefps for the power of two, 7 instructions where vexp takes
 * ~16; clamped at 2^-126, so nothing subnormal comes out (masked keys are zeroed by their mask,
 * and a weight of 2^-126 next to the row maximum's 1 is nothing). */
static inline vf vexp2_bf16(vf x) {
    x = (vf)_mm512_max_ps((__m512)x, _mm512_set1_ps(-126.0f));
    const vf n = (vf)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vf f = x - n;
    const vf p = ((0.0555041086648216f * f + 0.2402264923172690f) * f + 0.6931471805599453f) * f + 1.0f;
    return (vf)_mm512_scalef_ps((__m512)p, (__m512)n);
}

DEFINE_SOFTMAX_BLOCK(softmax_block_log2, AMX_KEYS, vexp2_bf16)

/* One item (see DEFINE_PROMPT_ITEM). kb: keys as rows (keys x D); vt: values transposed (D x
 * padded keys); qb: D / 32 tiles of query pairs; sb: 16 floats a key (a tile's scores, one row per
 * key); pb: 512 bfloat16 a 32-key block (P^T as VNNI pairs); acc: D vectors.
 * A tile's lanes take three passes over its keys, not one online pass: every block's scores
 * (S^T = K Q^T) into sb, then the exact row maximum, then the weights in bfloat16 pairs with their
 * sums; the output O^T = V^T P^T then accumulates in four tiles over all the blocks, stored once.
 * Why: the online form rescaled the output by each block's correction, so every block stored its
 * D / 16 output tiles and added them into vectors, one dependent tile product after another
 * (~3,300 cycles a 32-key block at head size 128, against ~16 tile products' 260). The queries
 * go into their pairs, the values into V^T and the outputs back out by 16 x 16 transposes of
 * pairs, not element by element (that was a third of the time left). */
static void prompt_item_amx(const uint16_t *q, uint16_t *out, const uint16_t *key, const uint16_t *value,
                            int64_t slot_stride, const int64_t *row, int64_t qstart, int64_t qlen, int64_t ctx,
                            int64_t c0, int64_t c1, int64_t kh, int64_t window, int64_t H, int64_t KVH,
                            int64_t D, float scale, uint16_t *kb, uint16_t *vt, uint16_t *qb, float *sb,
                            uint16_t *pb, vf *acc) {
    const int64_t G = H / KVH, first = ctx - qlen, DS = D / 32, DT = D / 16;
    const float scale2 = scale * 1.4426950408889634f; /* scores in log2 units: exp2 below */
    const int64_t hi = first + c1 - 1;
    int64_t klo = window > 0 ? first + c0 - window + 1 : 0;
    if (klo < 0) klo = 0;
    const int64_t nk = hi - klo + 1, padded = (nk + AMX_KEYS - 1) / AMX_KEYS * AMX_KEYS;
    for (int64_t j = 0; j < nk; j++)
        memcpy(kb + j * D, key + row[klo + j] * slot_stride + kh * D, sizeof(uint16_t) * (size_t)D);
    memset(kb + nk * D, 0, sizeof(uint16_t) * (size_t)((padded - nk) * D));
    /* V^T 32 keys by 32 dimensions at a time: each key pair's rows interleaved (dimension d of both
     * keys, one 32-bit unit), 16 pairs transposed into rows of vt (zeros past the last key) */
    {
        const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                            39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
        const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                            55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
        uint32_t *vt32 = (uint32_t *)vt;
        for (int64_t j0 = 0; j0 < padded; j0 += AMX_KEYS) {
            const uint16_t *v[AMX_KEYS];
            for (int j = 0; j < AMX_KEYS; j++)
                v[j] = j0 + j < nk ? value + row[klo + j0 + j] * slot_stride + kh * D : NULL;
            for (int64_t d = 0; d < D; d += 32) {
                __m512i a16[16], b16[16];
                for (int i = 0; i < 16; i++) {
                    const __m512i x0 = v[2 * i] ? _mm512_loadu_si512(v[2 * i] + d) : _mm512_setzero_si512();
                    const __m512i x1 = v[2 * i + 1] ? _mm512_loadu_si512(v[2 * i + 1] + d) : _mm512_setzero_si512();
                    a16[i] = _mm512_permutex2var_epi16(x0, lo, x1);
                    b16[i] = _mm512_permutex2var_epi16(x0, hi, x1);
                }
                transpose16(a16);
                transpose16(b16);
                for (int k = 0; k < 16; k++) {
                    _mm512_store_si512((__m512i *)(vt32 + (d + k) * (padded / 2) + j0 / 2), a16[k]);
                    _mm512_store_si512((__m512i *)(vt32 + (d + 16 + k) * (padded / 2) + j0 / 2), b16[k]);
                }
            }
        }
    }
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const int64_t nq = c1 - c0;
    for (int64_t r0 = 0; r0 < nq * G; r0 += LANES) {
        int64_t lane_h[LANES], lane_p[LANES], pmin, pmax;
        vf posv;
        const int64_t nl = tile_lanes(r0, nq, G, kh, c0, first, lane_h, lane_p, &posv, &pmin, &pmax);
        /* each lane's row of q (and of out) in 32-bit units: a pair of dimensions a unit */
        int32_t base[LANES] __attribute__((aligned(64)));
        for (int l = 0; l < LANES; l++) base[l] = (int32_t)(((qstart + lane_p[l]) * H * D + lane_h[l] * D) / 2);
        /* B operand: row p of slab s holds dims 32s + 2p, +1 of each lane, i.e. unit u = 16s + p of
         * every lane at qb32[16 u + lane]: the lanes' rows transposed, 16 units at a time */
        for (int64_t u0 = 0; u0 < D / 2; u0 += 16) {
            __m512i r[16];
            for (int ln = 0; ln < LANES; ln++) r[ln] = _mm512_loadu_si512((const uint32_t *)q + base[ln] + u0);
            transpose16(r);
            for (int i = 0; i < 16; i++) _mm512_store_si512((__m512i *)(qb + 32 * (u0 + i)), r[i]);
        }
        int64_t lo = window > 0 ? pmin - window + 1 : 0;
        if (lo < klo) lo = klo;
        lo = klo + (lo - klo) / AMX_KEYS * AMX_KEYS;
        const int64_t blocks = (pmax - lo) / AMX_KEYS + 1;
        /* pass 1: scores, row (j0 - lo + j) of sb holding key j0 + j across the lanes */
        if (DS == 1) _tile_loadd(2, qb, 64);
        for (int64_t bi = 0; bi < blocks; bi++) {
            const uint16_t *kj = kb + (lo - klo + bi * AMX_KEYS) * D;
            _tile_zero(0);
            _tile_zero(1);
            for (int64_t ds = 0; ds < DS; ds++) {
                if (DS > 1) _tile_loadd(2, qb + ds * 512, 64);
                _tile_loadd(3, kj + ds * 32, D * 2);
                _tile_loadd(4, kj + 16 * D + ds * 32, D * 2);
                _tile_dpbf16ps(0, 3, 2);
                _tile_dpbf16ps(1, 4, 2);
            }
            _tile_stored(0, sb + bi * AMX_KEYS * 16, 64);
            _tile_stored(1, sb + bi * AMX_KEYS * 16 + 256, 64);
        }
        /* pass 2: each lane's maximum over the keys it sees */
        vf m = (vf){} - 1e30f, l = (vf){};
        for (int64_t bi = 0; bi < blocks; bi++) {
            const int64_t j0 = lo + bi * AMX_KEYS;
            const int masked = j0 + AMX_KEYS - 1 > pmin || (window > 0 && j0 <= pmax - window);
            for (int j = 0; j < AMX_KEYS; j++) {
                vf sj = vload_plain(sb + (bi * AMX_KEYS + j) * 16) * scale2;
                if (masked) {
                    const vf keyv = (vf){} + (float)(j0 + j);
                    vi valid = keyv <= posv;
                    if (window > 0) valid &= keyv > posv - (float)window;
                    sj = vsel(valid, sj, (vf){} - 1e30f);
                }
                m = vmax(m, sj);
            }
        }
        /* pass 3: weights against that maximum (the block's correction is then 1), their sums, and
         * P^T as VNNI pairs: row kp of a block holds keys 2kp, 2kp+1 of each lane */
        for (int64_t bi = 0; bi < blocks; bi++) {
            vf sv[AMX_KEYS];
            for (int j = 0; j < AMX_KEYS; j++) sv[j] = vload_plain(sb + (bi * AMX_KEYS + j) * 16) * scale2;
            (void)softmax_block_log2(sv, lo + bi * AMX_KEYS, posv, pmin, pmax, window, &m, &l);
            for (int kp = 0; kp < 16; kp++) {
                const __m512bh both = _mm512_cvtne2ps_pbh((__m512)sv[2 * kp + 1], (__m512)sv[2 * kp]);
                _mm512_store_si512((__m512i *)(pb + bi * 512 + kp * 32), _mm512_permutexvar_epi16(pairs, (__m512i)both));
            }
        }
        /* pass 4: O^T, four 16-dimension tiles at a time over every block, straight into acc */
        for (int64_t d0 = 0; d0 < DT; d0 += 4) {
            const int64_t nt = DT - d0 < 4 ? DT - d0 : 4;
            _tile_zero(0);
            if (nt > 1) _tile_zero(1);
            if (nt > 2) _tile_zero(2);
            if (nt > 3) _tile_zero(3);
            for (int64_t bi = 0; bi < blocks; bi++) {
                const uint16_t *vj = vt + d0 * 16 * padded + (lo - klo + bi * AMX_KEYS);
                _tile_loadd(4, pb + bi * 512, 64);
                _tile_loadd(5, vj, padded * 2);
                _tile_dpbf16ps(0, 5, 4);
                if (nt > 1) { _tile_loadd(6, vj + 16 * padded, padded * 2); _tile_dpbf16ps(1, 6, 4); }
                if (nt > 2) { _tile_loadd(7, vj + 32 * padded, padded * 2); _tile_dpbf16ps(2, 7, 4); }
                if (nt > 3) { _tile_loadd(5, vj + 48 * padded, padded * 2); _tile_dpbf16ps(3, 5, 4); }
            }
            _tile_stored(0, acc + d0 * 16, 64);
            if (nt > 1) _tile_stored(1, acc + (d0 + 1) * 16, 64);
            if (nt > 2) _tile_stored(2, acc + (d0 + 2) * 16, 64);
            if (nt > 3) _tile_stored(3, acc + (d0 + 3) * 16, 64);
        }
        /* out: dims 2u, 2u + 1 of each lane rounded to bfloat16 as one 32-bit unit, transposed back
         * into the lanes' rows (lanes past nl repeat the last row: left out) */
        const vf inv = 1.0f / l;
        for (int64_t u0 = 0; u0 < D / 2; u0 += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) {
                const int64_t u = u0 + i;
                const __m512i lo16 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh((__m512)(acc[2 * u] * inv)));
                const __m512i hi16 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh((__m512)(acc[2 * u + 1] * inv)));
                r[i] = _mm512_or_si512(lo16, _mm512_slli_epi32(hi16, 16));
            }
            transpose16(r);
            for (int64_t ln = 0; ln < nl; ln++) _mm512_storeu_si512((uint32_t *)out + base[ln] + u0, r[ln]);
        }
    }
}

static int prompt_bf16_amx(const uint16_t *q, uint16_t *out, const uint16_t *key, const uint16_t *value,
                           int64_t slot_stride, const int64_t *slots, int64_t slots_stride, const int64_t *qstarts,
                           const int64_t *qlens, const int64_t *ctxs, int64_t window, int64_t B, int64_t H,
                           int64_t KVH, int64_t D, float scale, int threads) {
    int64_t items = 0, max_keys = 1;
    for (int64_t b = 0; b < B; b++) {
        items += (qlens[b] + AMX_QCHUNK - 1) / AMX_QCHUNK * KVH;
        const int64_t span = window > 0 && window + AMX_QCHUNK < ctxs[b] ? window + AMX_QCHUNK : ctxs[b];
        if (span > max_keys) max_keys = span;
    }
    int failed = 0;
    _Pragma("omp parallel num_threads(threads)")
    {
        const size_t keys = (size_t)((max_keys + AMX_KEYS - 1) / AMX_KEYS * AMX_KEYS);
        /* acc (D vectors), sb (16 floats a key), then bfloat16: pb (16 a key), qb (16 D), kb, vt */
        const size_t bytes = 64 * (size_t)D + 4 * 16 * keys + 2 * (16 * keys + 16 * (size_t)D + 2 * keys * (size_t)D);
        char *scratch = aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (scratch == NULL) {
            _Pragma("omp atomic write") failed = 1;
        }
        vf *acc = (vf *)scratch;
        float *sb = (float *)(scratch + 64 * D);
        uint16_t *pb = (uint16_t *)(sb + 16 * keys), *qb = pb + 16 * keys, *kb = qb + 16 * D, *vt = kb + keys * D;
        if (scratch != NULL) amx_configure_square();
        _Pragma("omp for schedule(dynamic)")
        for (int64_t it = 0; it < items; it++) {
            if (scratch == NULL) continue;
            int64_t b = 0, rest = it;
            while (rest >= (qlens[b] + AMX_QCHUNK - 1) / AMX_QCHUNK * KVH) {
                rest -= (qlens[b] + AMX_QCHUNK - 1) / AMX_QCHUNK * KVH;
                b++;
            }
            const int64_t kh = rest % KVH, c0 = rest / KVH * AMX_QCHUNK;
            const int64_t c1 = c0 + AMX_QCHUNK < qlens[b] ? c0 + AMX_QCHUNK : qlens[b];
            prompt_item_amx(q, out, key, value, slot_stride, slots + b * slots_stride, qstarts[b], qlens[b], ctxs[b],
                            c0, c1, kh, window, H, KVH, D, scale, kb, vt, qb, sb, pb, acc);
        }
        if (scratch != NULL) _tile_release();
        free(scratch);
    }
    return failed ? -1 : 0;
}
#define PROMPT_AMX 1
#endif

int paged_prompt_attention(const void *q, void *out, const void *key, const void *value,
                           int64_t slot_stride, const int64_t *slots, int64_t slots_stride,
                           const int64_t *qstarts, const int64_t *qlens, const int64_t *ctxs,
                           int64_t window, int64_t B, int64_t H, int64_t KVH, int64_t D,
                           float scale, int dtype, int threads) {
    if (dtype == 0)
        return prompt_f32(q, out, key, value, slot_stride, slots, slots_stride, qstarts, qlens, ctxs,
                          window, B, H, KVH, D, scale, threads);
#ifdef PROMPT_AMX
    if (dtype == 1 && D % 32 == 0 && amx_available())
        return prompt_bf16_amx(q, out, key, value, slot_stride, slots, slots_stride, qstarts, qlens, ctxs,
                               window, B, H, KVH, D, scale, threads);
#endif
    if (dtype == 1)
        return prompt_bf16(q, out, key, value, slot_stride, slots, slots_stride, qstarts, qlens,
                           ctxs, window, B, H, KVH, D, scale, threads);
    return -2;
}
