/* One layer of the pool attention on a CPU, in one call: write the pass's new keys and values
 * into their blocks, then attend over each row's view of its session's blocks where they live
 * (no copy of the past).
 *
 * Built at hub start by `kernel.py` with the machine's C compiler (-O3 -march=native) and
 * called through ctypes from `KernelPass.attend`. What it replaces is ATen's SDPA, whose CPU
 * kernel pays a fixed cost per (row, head) that dominates the few dozen columns of a short
 * context; here a (row, kv head) is four small tiled steps: the view's keys transposed (W x W
 * blocks in registers, W the target's lanes: 16 with AVX-512, 8 with AVX, 4 otherwise), scores
 * (4 queries x 2W columns a tile: eight accumulators cover the multiply-add's latency; the bias
 * added and each query's largest score kept as they are written), softmax (tree reductions
 * across the lanes), weighted values (4 queries x 2W dims a tile; W dims with even and odd
 * columns apart where fewer are left). Scores and weighted values sweep the view in spans of
 * columns that stay in a core's L2 cache while every tile reads them. GCC/Clang vector extensions keep the tiles in registers
 * on any target the compiler knows; arguments come packed in two structs (ctypes converts each
 * argument of a call: 34 cost ~4 us).
 *
 * Layouts (floats, the last axis contiguous):
 *   q      [rows', Hq, S, D] by the given strides (rows' >= rows: the pass's padding rows)
 *   k, v   [rows', H, S, D] by the given strides
 *   pool   keys, values [positions, H, D], contiguous (the blocks seen as one row per position)
 *   places [rows, width]: the pool row each column of a row's view reads
 *   bias   [rows, S, width]: 0 where a query sees a column, -inf where not
 *   out    [rows', S, Hq, D], contiguous; padding rows are zeros
 * Token t (of `tokens` real ones) sits at place sources[t] of the flattened [rows', S] rows and
 * goes to pool row targets[t].
 * D must be a multiple of 8.
 */
#include <stdint.h>
#include <string.h>

/* Lanes a vector: the widest register the target has (GCC lowers a wider vector through the
 * stack: 16 lanes built for AVX2 ran ~13x slower than for AVX-512). */
#if defined(__AVX512F__)
#define W 16
#elif defined(__AVX__)
#define W 8
#else
#define W 4 /* SSE, NEON */
#endif
typedef float vec __attribute__((vector_size(4 * W)));
typedef float vecu __attribute__((vector_size(4 * W), aligned(4))); /* an unaligned load or store */
typedef int32_t ivec __attribute__((vector_size(4 * W)));
#if W == 16 /* heads of 8k dims: the last 8 in a half vector */
typedef float half __attribute__((vector_size(32)));
typedef float halfu __attribute__((vector_size(32), aligned(4)));
#endif

#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE __builtin_shufflevector /* the keys' transpose in registers */
#endif

static inline vec splat(float x) {
    vec v = {0};
    return v + x;
}

static inline vec vmax(vec a, vec b) {
    ivec m = a > b;
    return (vec)(((ivec)a & m) | ((ivec)b & ~m));
}

/* The largest and the sum of a vector's lanes, halving it (a tree, not W steps in a row). */
static inline float most(vec x) {
    float t[W];
    memcpy(t, &x, sizeof t);
    for (int w = W / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) t[j] = t[j] > t[j + w] ? t[j] : t[j + w];
    return t[0];
}

static inline float sum(vec x) {
    float t[W];
    memcpy(t, &x, sizeof t);
    for (int w = W / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) t[j] += t[j + w];
    return t[0];
}

/* e^x for x <= 0, W lanes, within ~2 ulp of expf; 0 below -87 (a masked score, -inf included). */
static inline vec vexp(vec x) {
    ivec kept = x >= -87.f;
    x = vmax(x, splat(-88.f)); /* keeps the conversion below in range */
    ivec whole = __builtin_convertvector(x * 1.44269504f - 0.5f, ivec); /* round(x / ln 2) */
    vec n = __builtin_convertvector(whole, vec);
    vec r = x - n * 0.693145752f; /* ln 2 in two parts: r exact to float */
    r = r - n * 1.42860677e-6f;
    vec p = splat(1.98756912e-4f);
    p = p * r + 1.39819994e-3f;
    p = p * r + 8.33345205e-3f;
    p = p * r + 4.16657962e-2f;
    p = p * r + 1.66666672e-1f;
    p = p * r + 5.0e-1f;
    p = p * r * r + r + 1.f;
    vec scale = (vec)((whole + 127) << 23); /* 2^n */
    return (vec)((ivec)(p * scale) & kept);
}

/* dim floats (a multiple of 8) times `scale`, from one place to another (1: the pool writes' copy). */
static inline void scaled(float *restrict to, const float *restrict from, float scale, int64_t dim) {
    int64_t d = 0;
    for (; d + W <= dim; d += W) *(vecu *)(to + d) = *(const vecu *)(from + d) * scale;
#if W == 16
    if (d < dim) *(halfu *)(to + d) = *(const halfu *)(from + d) * scale;
#endif
}

/* One step of a tile of 4 queries x 2W lanes (eight accumulators: enough to cover the
 * multiply-add's latency): query r's weight, w[r * stride], times x into a[r] and y into z[r]. */
static inline void step(vec a[4], vec z[4], const float *restrict w, int64_t stride, vec x, vec y) {
    for (int r = 0; r < 4; r++) {
        float weight = w[r * stride];
        a[r] += weight * x, z[r] += weight * y;
    }
}

/* Scores plus their bias, written to `to`; returns them. */
static inline vec store(float *restrict to, vec scores, const float *restrict bias) {
    vec x = scores + *(const vecu *)bias;
    *(vecu *)to = x;
    return x;
}

/* One round of the W x W transpose: swap the b x b blocks off the diagonal of each 2b x 2b block
 * (rows r and r + b exchange lanes); log2(W) rounds transpose the whole block. */
#define ROUND(b)                                                                                   \
    for (int r = 0; r < W; r++) {                                                                  \
        if (r & b) continue;                                                                       \
        vec x = t[r], y = t[r + b];                                                                \
        t[r] = SHUFFLE(x, y, LOW##b), t[r + b] = SHUFFLE(x, y, HIGH##b);                           \
    }
#if W == 16
#define LOW1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define HIGH1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
#define LOW2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define HIGH2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define LOW4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define HIGH4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define LOW8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HIGH8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define ROUNDS ROUND(1) ROUND(2) ROUND(4) ROUND(8)
#elif W == 8
#define LOW1 0, 8, 2, 10, 4, 12, 6, 14
#define HIGH1 1, 9, 3, 11, 5, 13, 7, 15
#define LOW2 0, 1, 8, 9, 4, 5, 12, 13
#define HIGH2 2, 3, 10, 11, 6, 7, 14, 15
#define LOW4 0, 1, 2, 3, 8, 9, 10, 11
#define HIGH4 4, 5, 6, 7, 12, 13, 14, 15
#define ROUNDS ROUND(1) ROUND(2) ROUND(4)
#else
#define LOW1 0, 4, 2, 6
#define HIGH1 1, 5, 3, 7
#define LOW2 0, 1, 4, 5
#define HIGH2 2, 3, 6, 7
#define ROUNDS ROUND(1) ROUND(2)
#endif

/* kt[d, c] = K[place[c] * stride + d] for the view's `width` columns, zeros up to wp (a multiple of 16). */
static void transpose(float *restrict kt, const float *restrict K, const int64_t *restrict place, int64_t stride,
                      int64_t width, int64_t wp, int64_t dim) {
    int64_t d0 = 0;
#ifdef SHUFFLE
    for (; d0 + W <= dim; d0 += W)
        for (int64_t c0 = 0; c0 < wp; c0 += W) {
            vec t[W];
            for (int r = 0; r < W; r++)
                t[r] = c0 + r < width ? *(const vecu *)(K + place[c0 + r] * stride + d0) : splat(0.f);
            ROUNDS
            for (int r = 0; r < W; r++) *(vecu *)(kt + (d0 + r) * wp + c0) = t[r];
        }
#endif
    for (int64_t c = 0; c < width; c++)
        for (int64_t d = d0; d < dim; d++) kt[d * wp + c] = K[place[c] * stride + d];
    for (int64_t d = d0; d < dim; d++)
        for (int64_t c = width; c < wp; c++) kt[d * wp + c] = 0.f;
}

/* Floats of scratch a call needs. */
int64_t pool_scratch(int64_t dim, int64_t block, int64_t width) {
    int64_t wp = (width + 15) / 16 * 16, bp = (block + 3) / 4 * 4;
    return dim * wp + 2 * bp * wp + 2 * bp * dim + 2 * bp; /* the bias rows: S <= block */
}

/* The view's columns a sweep of the query tiles covers: its transposed keys (or its values) stay
 * in a core's L2 cache (256 KiB) while every tile reads them. Over the whole view at once, a view
 * wider than the cache was read from memory once per tile: 2,048 columns of 256 dims took 4x the
 * time of 1,024. A multiple of 2W. */
static inline int64_t sweep_columns(int64_t dim) {
    int64_t columns = (64 * 1024 / dim) / (2 * W) * (2 * W);
    return columns > 2 * W ? columns : 2 * W;
}

/* What every layer of one kind shares in a pass (`PoolKernel.prepare` packs it once a pass). */
struct pass {
    int64_t heads, dim, tokens;
    const int64_t *sources, *targets;
    int64_t rows, padded_rows, span, qheads;
    const int64_t *places;
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

/* The two structs' sizes, which `PoolKernel` checks against what it packs. */
int64_t pool_struct_bytes(void) { return (int64_t)sizeof(struct layer) * 1000 + (int64_t)sizeof(struct pass); }

void pool_attend(const struct layer *layer, const struct pass *pass) {
    const float *q = layer->q, *k = layer->k, *v = layer->v;
    int64_t qb = layer->qb, qh = layer->qh, qs = layer->qs, kb = layer->kb, kh = layer->kh, ks = layer->ks;
    int64_t vb = layer->vb, vh = layer->vh, vs = layer->vs;
    float *pool_keys = layer->pool_keys, *pool_values = layer->pool_values, *out = layer->out;
    float *scratch = layer->scratch, scale = layer->scale;
    int64_t heads = pass->heads, dim = pass->dim, tokens = pass->tokens, stride = heads * dim;
    const int64_t *sources = pass->sources, *targets = pass->targets, *places = pass->places;
    int64_t rows = pass->rows, padded_rows = pass->padded_rows, span = pass->span, qheads = pass->qheads;
    const float *bias = pass->bias;
    int64_t width = pass->width;
    for (int64_t t = 0; t < tokens; t++) {
        int64_t b = sources[t] / span, s = sources[t] % span;
        for (int64_t h = 0; h < heads; h++) {
            int64_t to = (targets[t] * heads + h) * dim;
            scaled(pool_keys + to, k + b * kb + h * kh + s * ks, 1.f, dim);
            scaled(pool_values + to, v + b * vb + h * vh + s * vs, 1.f, dim);
        }
    }
    int64_t groups = qheads / heads, block = groups * span; /* a kv head's queries: its group's heads x S */
    int64_t wp = (width + 15) / 16 * 16, bp = (block + 3) / 4 * 4; /* padded to the tiles */
    float *restrict kt = scratch;       /* [D, wp]: the view's keys, transposed */
    float *restrict p = kt + dim * wp;  /* [bp, wp]: scores, then weights */
    float *restrict qq = p + bp * wp;   /* [bp, D]: the block's queries, scaled */
    float *restrict inv = qq + bp * dim; /* [bp]: 1 / each query's sum of weights */
    float *restrict top = inv + bp;      /* [bp]: each query's largest score */
    float *restrict acc = top + bp;      /* [bp, D]: each query's weighted values, summed over sweeps */
    float *restrict mask = acc + bp * dim; /* [S, wp]: the row's bias, -3e38 past its width */
    int64_t sweep = sweep_columns(dim);
    for (int64_t b = 0; b < rows; b++) {
        for (int64_t s = 0; s < span; s++) { /* every head of the row reads the same bias */
            memcpy(mask + s * wp, bias + (b * span + s) * width, width * sizeof(float));
            for (int64_t c = width; c < wp; c++) mask[s * wp + c] = -3.0e38f;
        }
        for (int64_t h = 0; h < heads; h++) {
            const int64_t *restrict place = places + b * width; /* the view's pool rows */
            const float *restrict K = pool_keys + h * dim, *restrict V = pool_values + h * dim;
            transpose(kt, K, place, stride, width, wp, dim);
            for (int64_t i = 0; i < bp; i++) {
                if (i < block) {
                    int64_t hq = h * groups + i / span, s = i % span;
                    scaled(qq + i * dim, q + b * qb + hq * qh + s * qs, scale, dim);
                } else { /* a padding query of the last tile: its output is dropped */
                    memset(qq + i * dim, 0, dim * sizeof(float));
                }
            }
            for (int64_t i = 0; i < bp; i++) top[i] = -3.0e38f;
            for (int64_t from = 0; from < wp; from += sweep) { /* scores, the bias added as they are written */
              int64_t until = from + sweep < wp ? from + sweep : wp;
              for (int64_t i0 = 0; i0 < bp; i0 += 4) {
                const float *restrict q0 = qq + i0 * dim;
                float *restrict p0 = p + i0 * wp;
                const float *restrict rb[4]; /* each query's bias row (a padding query reads the first) */
                vec m[4];                    /* each query's largest score in this sweep */
                for (int r = 0; r < 4; r++) {
                    rb[r] = mask + (i0 + r < block ? (i0 + r) % span : 0) * wp;
                    m[r] = splat(-3.0e38f);
                }
                int64_t c0 = from;
                for (; c0 + 2 * W <= until; c0 += 2 * W) {
                    vec a[4] = {{0}}, z[4] = {{0}};
                    for (int64_t d = 0; d < dim; d++)
                        step(a, z, q0 + d, dim, *(const vecu *)(kt + d * wp + c0), *(const vecu *)(kt + d * wp + c0 + W));
                    for (int r = 0; r < 4; r++) {
                        float *restrict pr = p0 + r * wp + c0;
                        m[r] = vmax(m[r], vmax(store(pr, a[r], rb[r] + c0), store(pr + W, z[r], rb[r] + c0 + W)));
                    }
                }
                for (; c0 < until; c0 += W) { /* the last W columns */
                    vec a[4] = {{0}};
                    for (int64_t d = 0; d < dim; d++) {
                        vec key = *(const vecu *)(kt + d * wp + c0);
                        for (int r = 0; r < 4; r++) a[r] += q0[r * dim + d] * key;
                    }
                    for (int r = 0; r < 4; r++) m[r] = vmax(m[r], store(p0 + r * wp + c0, a[r], rb[r] + c0));
                }
                for (int r = 0; r < 4; r++) {
                    float largest = most(m[r]);
                    top[i0 + r] = largest > top[i0 + r] ? largest : top[i0 + r];
                }
              }
            }
            for (int64_t i = 0; i < bp; i++) { /* softmax, the sum's inverse kept for the end */
                float *restrict pi = p + i * wp;
                if (i >= block) { /* a padding query: no weights */
                    memset(pi, 0, wp * sizeof(float));
                    continue;
                }
                vec largest = splat(top[i]), total = {0};
                for (int64_t c = 0; c < wp; c += W) {
                    vec e = vexp(*(vecu *)(pi + c) - largest);
                    *(vecu *)(pi + c) = e;
                    total += e;
                }
                inv[i] = 1.f / sum(total);
            }
            memset(acc, 0, bp * dim * sizeof(float));
            for (int64_t from = 0; from < width; from += sweep) { /* weighted values */
              int64_t until = from + sweep < width ? from + sweep : width;
              for (int64_t i0 = 0; i0 < bp; i0 += 4) {
                const float *restrict p0 = p + i0 * wp;
                float *restrict a0 = acc + i0 * dim;
                int64_t d0 = 0;
                for (; d0 + 2 * W <= dim; d0 += 2 * W) { /* 2W dims a tile, each weight read once for both halves */
                    vec a[4] = {{0}}, z[4] = {{0}};
                    for (int64_t c = from; c < until; c++) {
                        const float *restrict vc = V + place[c] * stride + d0;
                        step(a, z, p0 + c, wp, *(const vecu *)vc, *(const vecu *)(vc + W));
                    }
                    for (int r = 0; r < 4; r++) {
                        *(vecu *)(a0 + r * dim + d0) += a[r];
                        *(vecu *)(a0 + r * dim + d0 + W) += z[r];
                    }
                }
                for (; d0 + W <= dim; d0 += W) { /* W dims left: even and odd columns in their own sums */
                    vec a[4] = {{0}}, z[4] = {{0}};
                    int64_t c = from;
                    for (; c + 2 <= until; c += 2) {
                        vec x = *(const vecu *)(V + place[c] * stride + d0);
                        vec y = *(const vecu *)(V + place[c + 1] * stride + d0);
                        for (int r = 0; r < 4; r++) a[r] += p0[r * wp + c] * x, z[r] += p0[r * wp + c + 1] * y;
                    }
                    if (c < until) {
                        vec x = *(const vecu *)(V + place[c] * stride + d0);
                        for (int r = 0; r < 4; r++) a[r] += p0[r * wp + c] * x;
                    }
                    for (int r = 0; r < 4; r++) *(vecu *)(a0 + r * dim + d0) += a[r] + z[r];
                }
#if W == 16
                if (d0 < dim) { /* the last 8 dims */
                    half a[4] = {{0}};
                    for (int64_t c = from; c < until; c++) {
                        half x = *(const halfu *)(V + place[c] * stride + d0);
                        for (int r = 0; r < 4; r++) a[r] += p0[r * wp + c] * x;
                    }
                    for (int r = 0; r < 4; r++) *(halfu *)(a0 + r * dim + d0) += a[r];
                }
#endif
              }
            }
            for (int64_t i = 0; i < block; i++) { /* each query's output: its sweeps' sum, normalised */
                int64_t hq = h * groups + i / span, s = i % span;
                scaled(out + ((b * span + s) * qheads + hq) * dim, acc + i * dim, inv[i], dim);
            }
        }
    }
    if (padded_rows > rows)
        memset(out + rows * span * qheads * dim, 0, (padded_rows - rows) * span * qheads * dim * sizeof(float));
}
