/* One layer of the pool attention on a CPU, in one call: write the pass's new keys and values
 * into their slots, then attend over each row's slot where it lives (no copy of the past).
 *
 * Built at hub start by `pool_kernel.py` with the machine's C compiler (-O3 -march=native) and
 * called through ctypes from `PoolPass.attend`. What it replaces is ATen's SDPA, whose CPU
 * kernel pays a fixed cost per (row, head) that dominates the few dozen columns of a short
 * context; here a (row, kv head) is four small tiled steps: the slot's keys transposed (16 x 16
 * blocks in registers), scores (4 queries x 32 columns a tile, eight accumulators to cover the
 * multiply-add's latency), softmax (tree reductions across the lanes), weighted values (4
 * queries x 16 dims, even and odd columns apart). GCC/Clang vector extensions keep the tiles in
 * registers on any target the compiler knows.
 *
 * Layouts (floats, the last axis contiguous):
 *   q      [rows', Hq, S, D] by the given strides (rows' >= rows: the pass's padding rows)
 *   k, v   [rows', H, S, D] by the given strides
 *   pool   keys, values [slots, H, capacity, D], contiguous
 *   bias   [rows, S, width]: 0 where a query sees a column, -inf where not
 *   out    [rows', S, Hq, D], contiguous; padding rows are zeros
 * Token t (of `tokens` real ones) sits at place sources[t] of the flattened [rows', S] rows and
 * goes to column columns[t] of slot slots[t]; row b reads slot row_slots[b].
 * D must be a multiple of 8.
 */
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4))); /* an unaligned load or store */
typedef int32_t i8 __attribute__((vector_size(32)));
typedef float v16 __attribute__((vector_size(64))); /* one AVX-512 register, two AVX ones */
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64)));

#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE __builtin_shufflevector /* the 16 x 16 transpose in registers */
#endif

static inline v16 splat(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

static inline v16 max16(v16 a, v16 b) {
    i16 m = a > b;
    return (v16)(((i16)a & m) | ((i16)b & ~m));
}

static inline v8 max8(v8 a, v8 b) {
    i8 m = a > b;
    return (v8)(((i8)a & m) | ((i8)b & ~m));
}

/* The largest and the sum of a vector's lanes, halving it (a tree, not 16 steps in a row). */
static inline float most16(v16 x) {
    v8 lo, hi;
    memcpy(&lo, &x, sizeof lo);
    memcpy(&hi, (char *)&x + sizeof lo, sizeof hi);
    v8 m = max8(lo, hi);
    float a = m[0] > m[4] ? m[0] : m[4], b = m[1] > m[5] ? m[1] : m[5];
    float c = m[2] > m[6] ? m[2] : m[6], d = m[3] > m[7] ? m[3] : m[7];
    a = a > c ? a : c, b = b > d ? b : d;
    return a > b ? a : b;
}

static inline float sum16(v16 x) {
    v8 lo, hi;
    memcpy(&lo, &x, sizeof lo);
    memcpy(&hi, (char *)&x + sizeof lo, sizeof hi);
    v8 s = lo + hi;
    return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

/* e^x for x <= 0, 16 lanes, within ~2 ulp of expf; 0 below -87 (a masked score, -inf included). */
static inline v16 exp16(v16 x) {
    i16 kept = x >= -87.f;
    x = max16(x, splat(-88.f)); /* keeps the conversion below in range */
    i16 whole = __builtin_convertvector(x * 1.44269504f - 0.5f, i16); /* round(x / ln 2) */
    v16 n = __builtin_convertvector(whole, v16);
    v16 r = x - n * 0.693145752f; /* ln 2 in two parts: r exact to float */
    r = r - n * 1.42860677e-6f;
    v16 p = splat(1.98756912e-4f);
    p = p * r + 1.39819994e-3f;
    p = p * r + 8.33345205e-3f;
    p = p * r + 4.16657962e-2f;
    p = p * r + 1.66666672e-1f;
    p = p * r + 5.0e-1f;
    p = p * r * r + r + 1.f;
    v16 scale = (v16)((whole + 127) << 23); /* 2^n */
    return (v16)((i16)(p * scale) & kept);
}

/* dim floats (a multiple of 8) from one place to another. */
static inline void copy(float *restrict to, const float *restrict from, int64_t dim) {
    int64_t d = 0;
    for (; d + 16 <= dim; d += 16) *(v16u *)(to + d) = *(const v16u *)(from + d);
    if (d < dim) *(v8u *)(to + d) = *(const v8u *)(from + d);
}

/* dim floats (a multiple of 8) times `scale`. */
static inline void scaled(float *restrict to, const float *restrict from, float scale, int64_t dim) {
    int64_t d = 0;
    for (; d + 16 <= dim; d += 16) *(v16u *)(to + d) = *(const v16u *)(from + d) * scale;
    if (d < dim) *(v8u *)(to + d) = *(const v8u *)(from + d) * scale;
}

/* Scores plus their bias, written to `to`; returns them. */
static inline v16 store(float *restrict to, v16 scores, const float *restrict bias) {
    v16 x = scores + *(const v16u *)bias;
    *(v16u *)to = x;
    return x;
}

/* kt[d, c] = K[c, d] for the slot's first `width` columns, zeros up to wp (a multiple of 16). */
static void transpose(float *restrict kt, const float *restrict K, int64_t width, int64_t wp, int64_t dim) {
    int64_t d0 = 0;
#ifdef SHUFFLE
    for (; d0 + 16 <= dim; d0 += 16)
        for (int64_t c0 = 0; c0 < wp; c0 += 16) {
            v16 t[16];
            for (int r = 0; r < 16; r++)
                t[r] = c0 + r < width ? *(const v16u *)(K + (c0 + r) * dim + d0) : splat(0.f);
            /* Four rounds; round b swaps the b x b blocks off the diagonal of each 2b x 2b block. */
            for (int r = 0; r < 16; r += 2) {
                v16 a = t[r], z = t[r + 1];
                t[r] = SHUFFLE(a, z, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
                t[r + 1] = SHUFFLE(a, z, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
            }
            for (int r = 0; r < 16; r++) {
                if (r & 2) continue;
                v16 a = t[r], z = t[r + 2];
                t[r] = SHUFFLE(a, z, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
                t[r + 2] = SHUFFLE(a, z, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
            }
            for (int r = 0; r < 16; r++) {
                if (r & 4) continue;
                v16 a = t[r], z = t[r + 4];
                t[r] = SHUFFLE(a, z, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
                t[r + 4] = SHUFFLE(a, z, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
            }
            for (int r = 0; r < 8; r++) {
                v16 a = t[r], z = t[r + 8];
                t[r] = SHUFFLE(a, z, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
                t[r + 8] = SHUFFLE(a, z, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
            }
            for (int r = 0; r < 16; r++) *(v16u *)(kt + (d0 + r) * wp + c0) = t[r];
        }
#endif
    for (int64_t c = 0; c < width; c++)
        for (int64_t d = d0; d < dim; d++) kt[d * wp + c] = K[c * dim + d];
    for (int64_t d = d0; d < dim; d++)
        for (int64_t c = width; c < wp; c++) kt[d * wp + c] = 0.f;
}

/* Floats of scratch a call needs. */
int64_t pool_scratch(int64_t dim, int64_t block, int64_t width) {
    int64_t wp = (width + 15) / 16 * 16, bp = (block + 3) / 4 * 4;
    return dim * wp + 2 * bp * wp + bp * dim + 2 * bp; /* the bias rows: S <= block */
}

/* What every layer of one kind shares in a pass (`PoolKernel.prepare` packs it once a pass). */
struct pass {
    int64_t heads, capacity, dim, tokens;
    const int64_t *sources, *slots, *columns;
    int64_t rows, padded_rows, span, qheads;
    const int64_t *row_slots;
    const float *bias;
    int64_t width;
};

/* One layer's tensors (`PoolKernel.attend` packs them: one argument to convert, not seventeen). */
struct layer {
    const float *q;
    int64_t qb, qh, qs;
    const float *k;
    int64_t kb, kh, ks;
    const float *v;
    int64_t vb, vh, vs;
    float *pool_keys, *pool_values, *out, *scratch;
    float scale;
};

void pool_attend(const struct layer *layer, const struct pass *pass) {
    const float *q = layer->q, *k = layer->k, *v = layer->v;
    int64_t qb = layer->qb, qh = layer->qh, qs = layer->qs, kb = layer->kb, kh = layer->kh, ks = layer->ks;
    int64_t vb = layer->vb, vh = layer->vh, vs = layer->vs;
    float *pool_keys = layer->pool_keys, *pool_values = layer->pool_values, *out = layer->out;
    float *scratch = layer->scratch, scale = layer->scale;
    int64_t heads = pass->heads, capacity = pass->capacity, dim = pass->dim, tokens = pass->tokens;
    const int64_t *sources = pass->sources, *slots = pass->slots, *columns = pass->columns;
    const int64_t *row_slots = pass->row_slots;
    int64_t rows = pass->rows, padded_rows = pass->padded_rows, span = pass->span, qheads = pass->qheads;
    const float *bias = pass->bias;
    int64_t width = pass->width;
    for (int64_t t = 0; t < tokens; t++) {
        int64_t b = sources[t] / span, s = sources[t] % span;
        for (int64_t h = 0; h < heads; h++) {
            int64_t to = ((slots[t] * heads + h) * capacity + columns[t]) * dim;
            copy(pool_keys + to, k + b * kb + h * kh + s * ks, dim);
            copy(pool_values + to, v + b * vb + h * vh + s * vs, dim);
        }
    }
    int64_t groups = qheads / heads, block = groups * span; /* a kv head's queries: its group's heads x S */
    int64_t wp = (width + 15) / 16 * 16, bp = (block + 3) / 4 * 4; /* padded to the tiles */
    float *restrict kt = scratch;       /* [D, wp]: the slot's keys, transposed */
    float *restrict p = kt + dim * wp;  /* [bp, wp]: scores, then weights */
    float *restrict qq = p + bp * wp;   /* [bp, D]: the block's queries, scaled */
    float *restrict inv = qq + bp * dim; /* [bp]: 1 / each query's sum of weights */
    float *restrict top = inv + bp;      /* [bp]: each query's largest score */
    float *restrict mask = top + bp;     /* [S, wp]: the row's bias, -3e38 past its width */
    for (int64_t b = 0; b < rows; b++) {
        for (int64_t s = 0; s < span; s++) { /* every head of the row reads the same bias */
            memcpy(mask + s * wp, bias + (b * span + s) * width, width * sizeof(float));
            for (int64_t c = width; c < wp; c++) mask[s * wp + c] = -3.0e38f;
        }
        for (int64_t h = 0; h < heads; h++) {
            const float *restrict K = pool_keys + (row_slots[b] * heads + h) * capacity * dim;
            const float *restrict V = pool_values + (row_slots[b] * heads + h) * capacity * dim;
            transpose(kt, K, width, wp, dim);
            for (int64_t i = 0; i < bp; i++) {
                if (i < block) {
                    int64_t hq = h * groups + i / span, s = i % span;
                    scaled(qq + i * dim, q + b * qb + hq * qh + s * qs, scale, dim);
                } else { /* a padding query of the last tile: its output is dropped */
                    memset(qq + i * dim, 0, dim * sizeof(float));
                }
            }
            for (int64_t i0 = 0; i0 < bp; i0 += 4) { /* scores, the bias added as they are written */
                const float *restrict q0 = qq + i0 * dim;
                float *restrict p0 = p + i0 * wp;
                const float *restrict bias0 = mask + (i0 < block ? i0 % span : 0) * wp;
                const float *restrict bias1 = mask + (i0 + 1 < block ? (i0 + 1) % span : 0) * wp;
                const float *restrict bias2 = mask + (i0 + 2 < block ? (i0 + 2) % span : 0) * wp;
                const float *restrict bias3 = mask + (i0 + 3 < block ? (i0 + 3) % span : 0) * wp;
                v16 m0 = splat(-3.0e38f), m1 = m0, m2 = m0, m3 = m0; /* each query's largest score so far */
                int64_t c0 = 0;
                for (; c0 + 32 <= wp; c0 += 32) {
                    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
                    for (int64_t d = 0; d < dim; d++) {
                        v16 key = *(const v16u *)(kt + d * wp + c0), next = *(const v16u *)(kt + d * wp + c0 + 16);
                        float w0 = q0[d], w1 = q0[dim + d], w2 = q0[2 * dim + d], w3 = q0[3 * dim + d];
                        a0 += w0 * key, b0 += w0 * next;
                        a1 += w1 * key, b1 += w1 * next;
                        a2 += w2 * key, b2 += w2 * next;
                        a3 += w3 * key, b3 += w3 * next;
                    }
                    m0 = max16(m0, max16(store(p0 + c0, a0, bias0 + c0), store(p0 + c0 + 16, b0, bias0 + c0 + 16)));
                    m1 = max16(m1, max16(store(p0 + wp + c0, a1, bias1 + c0), store(p0 + wp + c0 + 16, b1, bias1 + c0 + 16)));
                    m2 = max16(m2, max16(store(p0 + 2 * wp + c0, a2, bias2 + c0), store(p0 + 2 * wp + c0 + 16, b2, bias2 + c0 + 16)));
                    m3 = max16(m3, max16(store(p0 + 3 * wp + c0, a3, bias3 + c0), store(p0 + 3 * wp + c0 + 16, b3, bias3 + c0 + 16)));
                }
                if (c0 < wp) { /* the last 16 columns */
                    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                    for (int64_t d = 0; d < dim; d++) {
                        v16 key = *(const v16u *)(kt + d * wp + c0);
                        a0 += q0[d] * key;
                        a1 += q0[dim + d] * key;
                        a2 += q0[2 * dim + d] * key;
                        a3 += q0[3 * dim + d] * key;
                    }
                    m0 = max16(m0, store(p0 + c0, a0, bias0 + c0));
                    m1 = max16(m1, store(p0 + wp + c0, a1, bias1 + c0));
                    m2 = max16(m2, store(p0 + 2 * wp + c0, a2, bias2 + c0));
                    m3 = max16(m3, store(p0 + 3 * wp + c0, a3, bias3 + c0));
                }
                top[i0] = most16(m0), top[i0 + 1] = most16(m1), top[i0 + 2] = most16(m2), top[i0 + 3] = most16(m3);
            }
            for (int64_t i = 0; i < bp; i++) { /* softmax, the sum's inverse kept for the end */
                float *restrict pi = p + i * wp;
                if (i >= block) { /* a padding query: no weights */
                    memset(pi, 0, wp * sizeof(float));
                    continue;
                }
                v16 most = splat(top[i]), total = {0};
                for (int64_t c = 0; c < wp; c += 16) {
                    v16 e = exp16(*(v16u *)(pi + c) - most);
                    *(v16u *)(pi + c) = e;
                    total += e;
                }
                inv[i] = 1.f / sum16(total);
            }
            for (int64_t i0 = 0; i0 < bp; i0 += 4) { /* weighted values */
                const float *restrict p0 = p + i0 * wp;
                int64_t d0 = 0;
                for (; d0 + 32 <= dim; d0 += 32) { /* wide heads: 32 dims a tile, each weight read once for both halves */
                    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
                    for (int64_t c = 0; c < width; c++) {
                        v16 x = *(const v16u *)(V + c * dim + d0), y = *(const v16u *)(V + c * dim + d0 + 16);
                        float w0 = p0[c], w1 = p0[wp + c], w2 = p0[2 * wp + c], w3 = p0[3 * wp + c];
                        a0 += w0 * x, b0 += w0 * y;
                        a1 += w1 * x, b1 += w1 * y;
                        a2 += w2 * x, b2 += w2 * y;
                        a3 += w3 * x, b3 += w3 * y;
                    }
                    v16 lo[4] = {a0, a1, a2, a3}, hi[4] = {b0, b1, b2, b3};
                    for (int r = 0; r < 4 && i0 + r < block; r++) {
                        int64_t i = i0 + r, hq = h * groups + i / span, s = i % span;
                        float *restrict o = out + ((b * span + s) * qheads + hq) * dim + d0;
                        *(v16u *)o = lo[r] * inv[i];
                        *(v16u *)(o + 16) = hi[r] * inv[i];
                    }
                }
                for (; d0 + 16 <= dim; d0 += 16) { /* even and odd columns in their own sums */
                    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
                    int64_t c = 0;
                    for (; c + 2 <= width; c += 2) {
                        v16 x = *(const v16u *)(V + c * dim + d0), y = *(const v16u *)(V + (c + 1) * dim + d0);
                        a0 += p0[c] * x, b0 += p0[c + 1] * y;
                        a1 += p0[wp + c] * x, b1 += p0[wp + c + 1] * y;
                        a2 += p0[2 * wp + c] * x, b2 += p0[2 * wp + c + 1] * y;
                        a3 += p0[3 * wp + c] * x, b3 += p0[3 * wp + c + 1] * y;
                    }
                    if (c < width) {
                        v16 x = *(const v16u *)(V + c * dim + d0);
                        a0 += p0[c] * x, a1 += p0[wp + c] * x, a2 += p0[2 * wp + c] * x, a3 += p0[3 * wp + c] * x;
                    }
                    v16 sums[4] = {a0 + b0, a1 + b1, a2 + b2, a3 + b3};
                    for (int r = 0; r < 4 && i0 + r < block; r++) {
                        int64_t i = i0 + r, hq = h * groups + i / span, s = i % span;
                        *(v16u *)(out + ((b * span + s) * qheads + hq) * dim + d0) = sums[r] * inv[i];
                    }
                }
                if (d0 < dim) { /* the last 8 dims */
                    v8 a[4] = {{0}};
                    for (int64_t c = 0; c < width; c++) {
                        v8 x = *(const v8u *)(V + c * dim + d0);
                        for (int r = 0; r < 4; r++) a[r] += p0[r * wp + c] * x;
                    }
                    for (int r = 0; r < 4 && i0 + r < block; r++) {
                        int64_t i = i0 + r, hq = h * groups + i / span, s = i % span;
                        *(v8u *)(out + ((b * span + s) * qheads + hq) * dim + d0) = a[r] * inv[i];
                    }
                }
            }
        }
    }
    if (padded_rows > rows)
        memset(out + rows * span * qheads * dim, 0, (padded_rows - rows) * span * qheads * dim * sizeof(float));
}
