/* One layer of the pool attention on a CPU, in one call: write the pass's new keys and values
 * into their slots, then attend over each row's slot where it lives (no copy of the past).
 *
 * Built at hub start by `pool_kernel.py` with the machine's C compiler (-O3 -march=native) and
 * called through ctypes from `PoolPass.attend`. What it replaces is ATen's SDPA, whose CPU
 * kernel pays a fixed cost per (row, head) that dominates the few dozen columns of a short
 * context; here a (row, kv head) is three small tiled loops: scores (4 queries x 16 columns a
 * tile), softmax, weighted values (4 queries x 16 dims a tile). GCC/Clang vector extensions
 * keep the tiles in registers on any target the compiler knows.
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

static inline v16 splat(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

static inline v16 max16(v16 a, v16 b) {
    i16 m = a > b;
    return (v16)(((i16)a & m) | ((i16)b & ~m));
}

/* e^x for x <= 0, 16 lanes, within ~2 ulp of expf; 0 below -87 (a masked score, -inf included). */
static inline v16 exp16(v16 x) {
    i16 kept = x >= -87.f;
    x = max16(x, splat(-88.f)); /* keeps the conversion below in range */
    v16 n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f - 0.5f, i16), v16); /* round(x / ln 2) */
    v16 r = x - n * 0.693145752f; /* ln 2 in two parts: r exact to float */
    r = r - n * 1.42860677e-6f;
    v16 p = splat(1.98756912e-4f);
    p = p * r + 1.39819994e-3f;
    p = p * r + 8.33345205e-3f;
    p = p * r + 4.16657962e-2f;
    p = p * r + 1.66666672e-1f;
    p = p * r + 5.0e-1f;
    p = p * r * r + r + 1.f;
    v16 scale = (v16)((__builtin_convertvector(n, i16) + 127) << 23); /* 2^n */
    return (v16)((i16)(p * scale) & kept);
}

/* Floats of scratch a call needs. */
int64_t pool_scratch(int64_t dim, int64_t block, int64_t width) {
    int64_t wp = (width + 15) / 16 * 16, bp = (block + 3) / 4 * 4;
    return dim * wp + bp * wp + bp * dim + bp;
}

void pool_attend(const float *q, int64_t qb, int64_t qh, int64_t qs, const float *k, int64_t kb, int64_t kh,
                 int64_t ks, const float *v, int64_t vb, int64_t vh, int64_t vs, float *pool_keys,
                 float *pool_values, int64_t heads, int64_t capacity, int64_t dim, int64_t tokens,
                 const int64_t *sources, const int64_t *slots, const int64_t *columns, int64_t rows,
                 int64_t padded_rows, int64_t span, int64_t qheads, const int64_t *row_slots, const float *bias,
                 int64_t width, float scale, float *out, float *scratch) {
    for (int64_t t = 0; t < tokens; t++) {
        int64_t b = sources[t] / span, s = sources[t] % span;
        for (int64_t h = 0; h < heads; h++) {
            int64_t to = ((slots[t] * heads + h) * capacity + columns[t]) * dim;
            memcpy(pool_keys + to, k + b * kb + h * kh + s * ks, dim * sizeof(float));
            memcpy(pool_values + to, v + b * vb + h * vh + s * vs, dim * sizeof(float));
        }
    }
    int64_t groups = qheads / heads, block = groups * span; /* a kv head's queries: its group's heads x S */
    int64_t wp = (width + 15) / 16 * 16, bp = (block + 3) / 4 * 4; /* padded to the tiles */
    float *restrict kt = scratch;       /* [D, wp]: the slot's keys, transposed */
    float *restrict p = kt + dim * wp;  /* [bp, wp]: scores, then weights */
    float *restrict qq = p + bp * wp;   /* [bp, D]: the block's queries, scaled */
    float *restrict inv = qq + bp * dim; /* [bp]: 1 / each query's sum of weights */
    for (int64_t b = 0; b < rows; b++)
        for (int64_t h = 0; h < heads; h++) {
            const float *restrict K = pool_keys + (row_slots[b] * heads + h) * capacity * dim;
            const float *restrict V = pool_values + (row_slots[b] * heads + h) * capacity * dim;
            for (int64_t c = 0; c < width; c++)
                for (int64_t d = 0; d < dim; d++) kt[d * wp + c] = K[c * dim + d];
            for (int64_t d = 0; d < dim; d++)
                for (int64_t c = width; c < wp; c++) kt[d * wp + c] = 0.f;
            for (int64_t i = 0; i < bp; i++) {
                float *restrict pi = p + i * wp;
                if (i < block) {
                    int64_t hq = h * groups + i / span, s = i % span;
                    const float *restrict qi = q + b * qb + hq * qh + s * qs;
                    for (int64_t d = 0; d < dim; d++) qq[i * dim + d] = qi[d] * scale;
                    memcpy(pi, bias + (b * span + s) * width, width * sizeof(float));
                } else { /* a padding query of the last tile: sees everything, its output is dropped */
                    for (int64_t d = 0; d < dim; d++) qq[i * dim + d] = 0.f;
                    for (int64_t c = 0; c < width; c++) pi[c] = 0.f;
                }
                for (int64_t c = width; c < wp; c++) pi[c] = -3.0e38f;
            }
            for (int64_t i0 = 0; i0 < bp; i0 += 4) /* scores */
                for (int64_t c0 = 0; c0 < wp; c0 += 16) {
                    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                    const float *restrict q0 = qq + i0 * dim;
                    for (int64_t d = 0; d < dim; d++) {
                        v16 key = *(const v16u *)(kt + d * wp + c0);
                        a0 += q0[d] * key;
                        a1 += q0[dim + d] * key;
                        a2 += q0[2 * dim + d] * key;
                        a3 += q0[3 * dim + d] * key;
                    }
                    float *restrict p0 = p + i0 * wp + c0;
                    *(v16u *)p0 += a0;
                    *(v16u *)(p0 + wp) += a1;
                    *(v16u *)(p0 + 2 * wp) += a2;
                    *(v16u *)(p0 + 3 * wp) += a3;
                }
            for (int64_t i = 0; i < bp; i++) { /* softmax, the sum's inverse kept for the end */
                float *restrict pi = p + i * wp;
                v16 top = splat(-3.0e38f), total = {0};
                for (int64_t c = 0; c < wp; c += 16) top = max16(*(v16u *)(pi + c), top);
                float most = top[0], sum = 0.f;
                for (int j = 1; j < 16; j++) most = top[j] > most ? top[j] : most;
                for (int64_t c = 0; c < wp; c += 16) {
                    v16 e = exp16(*(v16u *)(pi + c) - most);
                    *(v16u *)(pi + c) = e;
                    total += e;
                }
                for (int j = 0; j < 16; j++) sum += total[j];
                inv[i] = 1.f / sum;
            }
            for (int64_t i0 = 0; i0 < bp; i0 += 4) /* weighted values */
                for (int64_t d0 = 0; d0 < dim; d0 += 16) {
                    int halves = dim - d0 >= 16 ? 2 : 1;
                    v8 a[8] = {{0}};
                    const float *restrict p0 = p + i0 * wp;
                    for (int64_t c = 0; c < width; c++) {
                        v8 lo = *(const v8u *)(V + c * dim + d0);
                        v8 hi = halves == 2 ? *(const v8u *)(V + c * dim + d0 + 8) : lo;
                        for (int r = 0; r < 4; r++) {
                            float w = p0[r * wp + c];
                            a[2 * r] += w * lo;
                            a[2 * r + 1] += w * hi;
                        }
                    }
                    for (int r = 0; r < 4 && i0 + r < block; r++) {
                        int64_t i = i0 + r, hq = h * groups + i / span, s = i % span;
                        float *restrict o = out + ((b * span + s) * qheads + hq) * dim + d0;
                        *(v8u *)o = a[2 * r] * inv[i];
                        if (halves == 2) *(v8u *)(o + 8) = a[2 * r + 1] * inv[i];
                    }
                }
        }
    if (padded_rows > rows)
        memset(out + rows * span * qheads * dim, 0, (padded_rows - rows) * span * qheads * dim * sizeof(float));
}
