/*
 * The fused CPU step of FusionOptimizer: each tensor is read and written once per step.
 *
 * Per element of a parameter viewed as (rows, row_len) it reads p, g, the momentum m and writes p, m
 * (20 bytes for fp32 p, g, m); the SM3 accumulators are O(rows + row_len) and stay in cache. The rule
 * is the one of fusedbun/engines/single_tensor.py, computed in fp32 in the same order of operations
 * (a multiply and an add may fuse into one FMA, as in torch's vectorized kernels):
 *
 *   g    = (maximize ? -1 : 1) * grad_unscale * g - (centralize ? row mean : 0)
 *   mask = eps < |g| < 2^64 (false for NaN and Inf, and where g^2 would overflow fp32);  g = mask ? g : 0
 *          a task's `nonfinite` is set when an entry fails the upper bound (fusedbun.adalite.eps_mask)
 *   prev = SM3: min(a0[i], rest[j]) (all >= 0)  factored: a0[i] * rest[j]  dense (0-D/1-D, cover="dense"): v[i]
 *   nu   = mask ? beta * prev + (1 - beta) * g^2 : prev
 *          SM3: new a0[i] = max_j nu, column maxima max_i nu -> colmax[j]    dense: v[i] = nu
 *          factored: new a0[i] = mean_j nu, column sums sum_i nu -> colmax[j] (see below)
 *          a dense v stored in bf16 is read widened and written rounded stochastically, with the stream of
 *          (v_k0, v_k1) and the element's flat index; nu is then the value as stored
 *   u    = use_rms ? g / (sqrt(nu) + eps) : g
 *   m    = lerp(m, u, 1 - momentum_beta), rounded to m's dtype;  u = m (the momentum as stored)
 *   p    = p * (1 - lr * Lambda) - lr * u, rounded once to p's dtype (to nearest even, or stochastically
 *          with the random word of the element's flat index: see fusedbun/rounding.py)
 *
 * rest[j] is min over the accumulators of dims 1.. (computed by the caller, O(row_len)); the caller also
 * turns colmax into the accumulators of dims 1... Rows are split among threads in contiguous ranges of
 * about equal element counts (threads of torch's OpenMP runtime when built with -fopenmp, else POSIX
 * threads); each thread keeps its own column maxima, combined at the end, in scratch memory that the
 * caller allocates (so every byte the step uses is visible to torch's memory profiler).
 *
 * Factored tensors (cover="factored", fusedbun/factored.py) need sums, whose rounding depends on the order
 * of addition. Their rows are grouped in blocks of FB_SUM_ROWS, and a thread's range always holds whole
 * blocks. Each block sums its rows' nu in row order into its own slot of colmax (which holds
 * ceil(rows / FB_SUM_ROWS) * row_len floats for such a task); after the pass the slots are added in block
 * order into the first. The order is fixed by the shape alone, so the result does not depend on the
 * number of threads. rest[j] is then prod_{k>=1} a_k / S^(d-1), also from the caller; for a matrix
 * (FB_FACTORED_2D) the kernel forms rest = a1 / S itself before the pass, with S = mean(a0) summed in
 * row order, and writes the new a1, the column sums over the rows, after it.
 *
 * Compiled at first use by fusedbun/engines/fused_cpu.py; the layout of fb_task and fb_hyper is mirrored
 * there with ctypes and checked against fb_layout() when the build is loaded.
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#else
#include <pthread.h>
#endif
#include <stdint.h>
#include <string.h>

#include <stddef.h>

#define FB_TILE 512   /* elements per tile: the tile's fp32 temporaries stay in L1 */
#define FB_LANES 16   /* independent partial results for the sums and maxima, so they vectorize */
#define FB_AHEAD (256 * 1024) /* bytes ahead in each stream that a tile prefetches one line from */

/* The rule's constants and the interface version come from Python (fusedbun/engines/fused_cpu.py) as
 * compile-time definitions, so that they are written once. */
#ifndef FB_GRAD_LIMIT
#error "FB_GRAD_LIMIT (fusedbun.adalite.GRAD_LIMIT) must be defined by the build"
#endif
#ifndef FB_ABI_VERSION
#error "FB_ABI_VERSION must be defined by the build"
#endif
#ifndef FB_SUM_ROWS
#error "FB_SUM_ROWS (rows per block of a factored tensor's column sums) must be defined by the build"
#endif

enum { FB_F32 = 0, FB_BF16 = 1, FB_F16 = 2 };
/* FB_FACTORED_2D: a factored matrix whose rest the kernel forms itself (a1 / mean(a0), into the tail of
 * its colmax buffer) and whose new a1 it writes (through rest, which then points at a1). */
enum { FB_DENSE = 0, FB_SM3 = 1, FB_FACTORED = 2, FB_FACTORED_2D = 3 };
enum { FB_CENTRALIZE = 1, FB_USE_RMS = 2, FB_MAXIMIZE = 4 };

typedef struct {
    void *p;
    const void *g;
    void *m;            /* NULL without momentum */
    float *acc;         /* SM3, factored: a0, one number per row; dense: v, one number per element, of v_dtype
                           (FB_F32, or FB_BF16: then read as uint16_t) */
    const float *rest;  /* SM3: min of the other accumulators, row_len numbers; factored: their product
                           over S^(d-1); dense: NULL */
    float *colmax;      /* SM3: out, max of nu over the rows, row_len numbers; factored: out, the sum of nu
                           over the rows in the first row_len of its ceil(rows / FB_SUM_ROWS) * row_len
                           numbers (the blocks' sums); dense: NULL */
    int64_t rows;       /* SM3, factored: size of dim 0; dense: number of elements */
    int64_t row_len;    /* SM3, factored: product of the other dims; dense: 1 */
    int32_t p_dtype, g_dtype, m_dtype;
    int32_t v_dtype;    /* dense: FB_F32 or FB_BF16; SM3, factored: FB_F32 */
    int32_t kind;
    float beta, one_minus_beta;
    int32_t nonfinite;  /* out: set to 1 when the gradient held NaN, Inf or |g| >= 2^64 (masked) */
    int32_t stochastic; /* 1: round p (bf16, fp16) stochastically with the stream of (round_k0, round_k1) */
    uint32_t round_k0, round_k1;
    uint32_t v_k0, v_k1; /* the stream that rounds a bf16 v (always stochastically), a stream of its own */
} fb_task;

typedef struct {
    float neg_lr;           /* -lr */
    float decay;            /* 1 - lr * Lambda */
    float eps;
    float momentum_weight;  /* 1 - momentum_beta */
    int32_t flags;
    int32_t nthreads;
    float grad_unscale; /* multiplies every gradient first: 1 / the loss scale of torch.amp.GradScaler, else 1 */
} fb_hyper;

/* ---- dtype conversions: fp32 arithmetic, round-to-nearest-even when storing ---------------------- */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0u : (uint16_t)rounded; /* NaN stays NaN */
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0x1fu) {
        u = sign | 0x7f800000u | (man << 13);          /* Inf, NaN */
    } else if (exp != 0) {
        u = sign | ((exp + 112u) << 23) | (man << 13); /* normal: rebias 15 -> 127 */
    } else {
        float f = (float)man * 5.9604644775390625e-8f; /* subnormal: man * 2^-24, exact */
        memcpy(&u, &f, sizeof u);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);        /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);       /* rounds to >= 65520: Inf */
    if (a < 0x38800000u) {                                         /* below 2^-14: subnormal or 0 */
        float mag;
        memcpy(&mag, &a, sizeof mag);
        /* Adding 0.5 shifts the value so that the fp32 adder rounds (to nearest even) at 2^-24. */
        float shifted = mag + 0.5f;
        uint32_t s;
        memcpy(&s, &shifted, sizeof s);
        return (uint16_t)(sign | (s - 0x3f000000u));
    }
    uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);               /* round to nearest even at bit 13 */
    return (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));     /* rebias 127 -> 15 */
}

/* ---- stochastic rounding (fusedbun/rounding.py has the same rule, as the reference) -------------- */

/* MurmurHash3's 32-bit finalizer: a bijection of 32-bit words with good avalanche. */
static inline uint32_t fb_fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

/* The random word of the element at flat index `index` in the stream (k0, k1): the finalizer of the
 * counter times an odd multiplier plus an offset, both chosen by the stream. */
static inline uint32_t fb_random(int64_t index, uint32_t k0, uint32_t k1) {
    uint32_t counter = (uint32_t)index + 0x9e3779b9u * (uint32_t)((uint64_t)index >> 32);
    return fb_fmix32(counter * (k1 | 1u) + k0);
}

/* Up with probability equal to the dropped 16 bits: add the top 16 random bits below the kept ones. Branch
 * free, so that it vectorizes: every bf16 store rounded stochastically (p and v) goes through here. */
static inline uint16_t f32_to_bf16_sr(float f, uint32_t r) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t up = (u + (r >> 16)) >> 16; /* also exact for +-Inf: the added bits stay below the kept */
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : up); /* NaN as f32_to_bf16 gives it */
}

static inline uint16_t f32_to_f16_sr(float f, uint32_t r) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return f32_to_f16(f); /* NaN, Inf: as to nearest */
    if (a >= 0x38800000u) {                     /* fp16's normal range: 13 dropped bits */
        uint32_t kept = (a + (r >> 19)) & ~0x1fffu;
        float y;
        memcpy(&y, &kept, sizeof y);
        return (uint16_t)(sign | f32_to_f16(y)); /* exact, or Inf at 2^16 and beyond */
    }
    /* Subnormal range, a grid of 2^-24: up with probability frac, from the top 24 random bits. */
    const float n = fabsf(f) * 16777216.0f, low = floorf(n);
    const uint32_t up = (float)(r >> 8) < (n - low) * 16777216.0f;
    return (uint16_t)(sign | ((uint32_t)low + up)); /* 1024 is 0x0400, the smallest normal */
}

/* The common case of store_f32_sr for bf16, as one vector loop: the counter of fb_random is base + j. */
static void store_bf16_sr_run(uint16_t *restrict d, const float *restrict src, int n, uint32_t base, uint32_t mult,
                              uint32_t k0) {
#pragma omp simd
    for (int j = 0; j < n; j++) d[j] = f32_to_bf16_sr(src[j], fb_fmix32((base + (uint32_t)j) * mult + k0));
}

static void store_f32_sr(void *dst, int32_t dtype, int64_t offset, const float *restrict src, int n, uint32_t k0,
                         uint32_t k1) {
    uint16_t *restrict d = (uint16_t *)dst + offset;
    const uint32_t hi = (uint32_t)((uint64_t)offset >> 32);
    if (dtype == FB_BF16 && hi == (uint32_t)((uint64_t)(offset + n - 1) >> 32)) {
        /* fb_random's counter with the tile's high index word folded in once (the tile stays in one 2^32 block) */
        store_bf16_sr_run(d, src, n, (uint32_t)offset + 0x9e3779b9u * hi, k1 | 1u, k0);
        return;
    }
    for (int j = 0; j < n; j++) {
        const uint32_t r = fb_random(offset + j, k0, k1);
        d[j] = dtype == FB_BF16 ? f32_to_bf16_sr(src[j], r) : f32_to_f16_sr(src[j], r);
    }
}

/* min(a, b) for a, b >= 0, taken on the bit patterns: for non-negative floats the order of the patterns as
 * integers is the order of the floats. The SM3 accumulators are >= 0 by construction (they start at +0 and
 * are maxima of nu >= 0). In the loops below, a float select here would merge with the mask selects into a
 * chain of mask-register operations; this compiles to one integer vector min. */
static inline float min_nonneg(float a, float b) {
    int32_t ia, ib;
    memcpy(&ia, &a, sizeof ia);
    memcpy(&ib, &b, sizeof ib);
    int32_t im = ia < ib ? ia : ib;
    float m;
    memcpy(&m, &im, sizeof m);
    return m;
}

static void load_f32(float *restrict dst, const void *src, int32_t dtype, int64_t offset, int n) {
    if (dtype == FB_BF16) {
        const uint16_t *s = (const uint16_t *)src + offset;
        for (int j = 0; j < n; j++) dst[j] = bf16_to_f32(s[j]);
    } else if (dtype == FB_F16) {
        const uint16_t *s = (const uint16_t *)src + offset;
        for (int j = 0; j < n; j++) dst[j] = f16_to_f32(s[j]);
    } else {
        memcpy(dst, (const float *)src + offset, (size_t)n * sizeof(float));
    }
}

static void store_f32(void *dst, int32_t dtype, int64_t offset, const float *restrict src, int n) {
    if (dtype == FB_BF16) {
        uint16_t *d = (uint16_t *)dst + offset;
        for (int j = 0; j < n; j++) d[j] = f32_to_bf16(src[j]);
    } else if (dtype == FB_F16) {
        uint16_t *d = (uint16_t *)dst + offset;
        for (int j = 0; j < n; j++) d[j] = f32_to_f16(src[j]);
    } else {
        memcpy((float *)dst + offset, src, (size_t)n * sizeof(float));
    }
}

/* ---- one tile ------------------------------------------------------------------------------------ */

/* Mask, second moment and normalization of one tile; kind (FB_DENSE, FB_SM3, FB_FACTORED) and use_rms are
 * constants at each call site, so every variant compiles to its own branch-free vector loop. SM3 folds nu
 * into the column maxima col, factored adds it to the column sums col. */
static inline __attribute__((always_inline)) void second_moment_tile(
    int n, const float *restrict g, float sign, float mean, float eps, float beta, float omb,
    float a0, const float *restrict rest, float *restrict col, float *restrict v,
    float *restrict nu_out, float *restrict u_out, int *restrict bad_out, const int kind, const int use_rms) {
    const int sm3 = kind == FB_SM3, factored = kind == FB_FACTORED;
    int bad = 0;
    for (int j = 0; j < n; j++) {
        float gj = sign * g[j] - mean;
        const float mag = fabsf(gj);
        const int usable = mag < FB_GRAD_LIMIT;
        bad |= !usable;
        float keep = mag > eps && usable ? 1.0f : 0.0f;
        gj = keep != 0.0f ? gj : 0.0f; /* a select: gj * 0 would keep a NaN */
        float prev;
        if (sm3) {
            prev = min_nonneg(a0, rest[j]);
        } else if (factored) {
            prev = a0 * rest[j];
        } else {
            prev = v[j];
        }
        float ema = beta * prev + omb * (gj * gj);
        float nu = keep != 0.0f ? ema : prev;
        if (sm3) {
            float c = col[j];
            col[j] = nu > c ? nu : c;
            nu_out[j] = nu;
        } else if (factored) {
            col[j] += nu;
            nu_out[j] = nu;
        } else {
            v[j] = nu;
        }
        u_out[j] = use_rms ? gj / (sqrtf(nu) + eps) : gj;
    }
    *bad_out |= bad;
}

/* Momentum, then the parameter update, for one tile whose update is u. */
static inline void update_tile(const fb_task *t, const fb_hyper *h, int64_t off, int n, float *restrict u) {
    float mbuf[FB_TILE], pbuf[FB_TILE];
    const float *restrict step = u;
    if (t->m != NULL) {
        float *restrict m = t->m_dtype == FB_F32 ? (float *)t->m + off : mbuf;
        if (t->m_dtype != FB_F32) load_f32(mbuf, t->m, t->m_dtype, off, n);
        const float w = h->momentum_weight;
        /* torch.lerp's two forms, so the rounding matches it: start + w (end - start) for w < 0.5 */
        if (w < 0.5f) {
            for (int j = 0; j < n; j++) m[j] = m[j] + w * (u[j] - m[j]);
        } else {
            const float wc = 1.0f - w;
            for (int j = 0; j < n; j++) m[j] = u[j] - (u[j] - m[j]) * wc;
        }
        if (t->m_dtype != FB_F32) {
            store_f32(t->m, t->m_dtype, off, mbuf, n);
            load_f32(mbuf, t->m, t->m_dtype, off, n); /* the update uses the momentum as stored */
        }
        step = m;
    }
    float *restrict p = t->p_dtype == FB_F32 ? (float *)t->p + off : pbuf;
    if (t->p_dtype != FB_F32) load_f32(pbuf, t->p, t->p_dtype, off, n);
    const float decay = h->decay, neg_lr = h->neg_lr;
    if (h->decay != 1.0f) {
        for (int j = 0; j < n; j++) {
            float q = p[j] * decay;
            p[j] = q + neg_lr * step[j];
        }
    } else {
        for (int j = 0; j < n; j++) p[j] = p[j] + neg_lr * step[j];
    }
    if (t->p_dtype != FB_F32) {
        if (t->stochastic)
            store_f32_sr(t->p, t->p_dtype, off, pbuf, n, t->round_k0, t->round_k1);
        else
            store_f32(t->p, t->p_dtype, off, pbuf, n);
    }
}

static inline const float *grad_tile(const fb_task *t, int64_t off, int n, float *restrict buf) {
    if (t->g_dtype == FB_F32) return (const float *)t->g + off;
    load_f32(buf, t->g, t->g_dtype, off, n);
    return buf;
}

/* The common cases in one loop per tile: p and g both fp32 or both bf16 (a bf16 p rounded to nearest or
 * stochastically), momentum absent, fp32 or bf16, and the lerp form of weights below 0.5 (momentum_beta >
 * 0.5). kind (dense, SM3, factored), v16 (a dense v in bf16), use_rms, mom, shift (maximize, centralize or a
 * loss scale), half (bf16 p and g) and sr are constants at each call site, so each of the 144 variants
 * compiles to its own vector loop, with the row maximum (SM3) or the row sum (factored) as a vector
 * reduction. Same arithmetic as second_moment_tile + update_tile (+ dense_v16_tile), element by element,
 * so a tile gives the same bits on either path: a bf16 load is exact, and the stores are the integer
 * rounding of f32_to_bf16 and f32_to_bf16_sr. `sr_base` is fb_random's counter of the tile's first element,
 * its high index word folded in (with sr or v16 the caller keeps the tile in one 2^32 block): the streams
 * of p and of v count the same flat indices. */
enum { FB_MOM_NONE = 0, FB_MOM_F32 = 1, FB_MOM_BF16 = 2 };

static inline __attribute__((always_inline)) float fast_tile_variant(
    const fb_task *t, const fb_hyper *h, int64_t off, int n, float sign, float mean, float a0,
    const float *restrict rest, float *restrict col, int *restrict bad_out, uint32_t sr_base, const int kind,
    const int v16, const int use_rms, const int mom, const int shift, const int half, const int sr, const int plain) {
    const int sm3 = kind == FB_SM3, factored = kind == FB_FACTORED;
    const float *restrict g32 = half ? NULL : (const float *)t->g + off;
    const uint16_t *restrict g16 = half ? (const uint16_t *)t->g + off : NULL;
    float *restrict p32 = half ? NULL : (float *)t->p + off;
    uint16_t *restrict p16 = half ? (uint16_t *)t->p + off : NULL;
    float *restrict m32 = mom == FB_MOM_F32 ? (float *)t->m + off : NULL;
    uint16_t *restrict m16 = mom == FB_MOM_BF16 ? (uint16_t *)t->m + off : NULL;
    float *restrict v = kind == FB_DENSE && !v16 ? t->acc + off : NULL;
    uint16_t *restrict v16p = v16 ? (uint16_t *)(void *)t->acc + off : NULL;
    const float eps = h->eps, beta = t->beta, omb = t->one_minus_beta;
    const float w = h->momentum_weight, decay = h->decay, neg_lr = h->neg_lr;
    /* fb_random's argument of the element, (sr_base + j) * mult + k0, as a linear induction variable: one
     * vector add per step instead of a multiply (unused, and removed, without sr); xv the same in v's stream */
    const uint32_t mult = t->round_k1 | 1u, vmult = t->v_k1 | 1u;
    uint32_t x = sr_base * mult + t->round_k0, xv = sr_base * vmult + t->v_k0;
    /* One line FB_AHEAD bytes ahead in each streamed array. The hardware prefetchers stop at the 4 KiB pages,
     * whose translations (after a step of another tensor, not cached) then cost a page walk out of memory
     * each time a stream enters a page; touching each page well before the stream reaches it overlaps those
     * walks with the streaming (-5 to -15% on the fp32 step, 10.5M parameters). A prefetch never faults, so
     * one past the end of an array is harmless; the address is formed as an integer for that reason. */
    __builtin_prefetch((const void *)((uintptr_t)(half ? (const void *)g16 : (const void *)g32) + FB_AHEAD), 0, 3);
    __builtin_prefetch((const void *)((uintptr_t)(half ? (void *)p16 : (void *)p32) + FB_AHEAD), 0, 3);
    if (mom == FB_MOM_F32) __builtin_prefetch((const void *)((uintptr_t)m32 + FB_AHEAD), 0, 3);
    if (mom == FB_MOM_BF16) __builtin_prefetch((const void *)((uintptr_t)m16 + FB_AHEAD), 0, 3);
    float rowmax = -INFINITY, rowsum = 0.0f;
    int bad = 0;
#pragma omp simd reduction(max : rowmax) reduction(+ : rowsum) reduction(| : bad) linear(x : mult) linear(xv : vmult)
    for (int j = 0; j < n; j++) {
        const float graw = half ? bf16_to_f32(g16[j]) : g32[j];
        float gj = shift ? sign * graw - mean : graw;
        const float mag = fabsf(gj);
        const int usable = mag < FB_GRAD_LIMIT;
        bad |= !usable;
        const int keep = mag > eps && usable;
        gj = keep ? gj : 0.0f;
        float prev;
        if (sm3) {
            prev = min_nonneg(a0, rest[j]);
        } else if (factored) {
            prev = a0 * rest[j];
        } else {
            prev = v16 ? bf16_to_f32(v16p[j]) : v[j];
        }
        float ema = beta * prev + omb * (gj * gj);
        float nu = keep ? ema : prev;
        if (sm3) {
            float c = col[j];
            col[j] = nu > c ? nu : c;
            rowmax = nu > rowmax ? nu : rowmax;
        } else if (factored) {
            col[j] += nu;
            rowsum += nu;
        } else if (v16) {
            const uint16_t stored = f32_to_bf16_sr(nu, fb_fmix32(xv));
            v16p[j] = stored;
            nu = bf16_to_f32(stored); /* the step normalizes by v as stored */
        } else {
            v[j] = nu;
        }
        float u = use_rms ? gj / (sqrtf(nu) + eps) : gj;
        if (mom == FB_MOM_F32) {
            float mj = m32[j];
            mj = mj + w * (u - mj);
            m32[j] = mj;
            u = mj;
        } else if (mom == FB_MOM_BF16) {
            float mj = bf16_to_f32(m16[j]);
            mj = mj + w * (u - mj);
            uint16_t stored = f32_to_bf16(mj);
            m16[j] = stored;
            u = bf16_to_f32(stored); /* the update uses the momentum as stored */
        }
        const float pin = half ? bf16_to_f32(p16[j]) : p32[j];
        float pj;
        if (plain) {
            pj = pin + neg_lr * u;
        } else {
            float q = pin * decay;
            pj = q + neg_lr * u;
        }
        if (!half) {
            p32[j] = pj;
        } else if (!sr) {
            p16[j] = f32_to_bf16(pj);
        } else {
            p16[j] = f32_to_bf16_sr(pj, fb_fmix32(x));
        }
        x += mult;
        xv += vmult;
    }
    *bad_out |= bad;
    return factored ? rowsum : rowmax;
}

static int fast_tile_applies(const fb_task *t, const fb_hyper *h) {
    const int f32 = t->p_dtype == FB_F32 && t->g_dtype == FB_F32;
    const int bf16 = t->p_dtype == FB_BF16 && t->g_dtype == FB_BF16;
    if (!f32 && !bf16) return 0;
    if (t->m == NULL) return 1;
    return (t->m_dtype == FB_F32 || t->m_dtype == FB_BF16) && h->momentum_weight < 0.5f;
}

/* The tile of n elements at flat index off can take the fast loop: its task can (fast_tile_applies), and
 * with stochastic rounding (of p, or of a bf16 v) it lies in one 2^32 block of indices, so that one counter
 * base covers it. */
static inline int fast_tile_fits(const fb_task *t, int fast, int64_t off, int n) {
    const int rounds = (t->stochastic && t->p_dtype != FB_F32) || t->v_dtype == FB_BF16;
    if (!fast || !rounds) return fast;
    return (uint64_t)off >> 32 == (uint64_t)(off + n - 1) >> 32;
}

static inline int is_factored(const fb_task *t) { return t->kind == FB_FACTORED || t->kind == FB_FACTORED_2D; }

/* Returns the maximum of nu over the tile (SM3 tensors) or its sum (factored tensors). */
static float fast_tile(const fb_task *t, const fb_hyper *h, int64_t off, int n, float sign, float mean, float a0,
                       const float *restrict rest, float *restrict col, int *restrict bad) {
    const int kind = is_factored(t) ? FB_FACTORED : t->kind, rms = (h->flags & FB_USE_RMS) != 0;
    const int half = t->p_dtype == FB_BF16, sr = half && t->stochastic, plain = half && h->decay == 1.0f;
    /* sign * g - mean is g itself for sign 1 and mean 0 (-0 included), so the shift is exact either way: the
     * bf16 tiles always take it, as second_moment_tile does, which halves their variants */
    const int shift = half || (h->flags & (FB_MAXIMIZE | FB_CENTRALIZE)) != 0 || h->grad_unscale != 1.0f;
    const int mom = t->m == NULL ? FB_MOM_NONE : t->m_dtype == FB_F32 ? FB_MOM_F32 : FB_MOM_BF16;
    const uint32_t hi = (uint32_t)((uint64_t)off >> 32);
    const uint32_t sr_base = (uint32_t)off + 0x9e3779b9u * hi; /* fb_random's counter at off */
    /* precision (0: fp32; 1, 2: bf16 to nearest, stochastically; 3, 4: the same without decay), the form of
     * the second moment (the kind, or 3: dense with a bf16 v), then the flags: a dense switch */
    const int prec = half ? 1 + sr + 2 * plain : 0;
    const int form = kind == FB_DENSE && t->v_dtype == FB_BF16 ? 3 : kind;
    const int variant = (((prec * 4 + form) * 2 + rms) * 2 + shift) * 3 + mom;
    switch (variant) {
#define FB_CASE(PREC, FORM, RMS, SHIFT, MOM)                                                          \
    case (((PREC * 4 + FORM) * 2 + RMS) * 2 + SHIFT) * 3 + MOM:                                      \
        return fast_tile_variant(t, h, off, n, sign, mean, a0, rest, col, bad, sr_base,               \
                                 FORM == 3 ? FB_DENSE : FORM, FORM == 3, RMS, MOM, SHIFT, PREC > 0,   \
                                 PREC == 2 || PREC == 4, PREC >= 3);
#define FB_CASES(PREC, FORM, RMS, SHIFT) \
    FB_CASE(PREC, FORM, RMS, SHIFT, 0) FB_CASE(PREC, FORM, RMS, SHIFT, 1) FB_CASE(PREC, FORM, RMS, SHIFT, 2)
#define FB_FORM(PREC, FORM) \
    FB_CASES(PREC, FORM, 0, 0) FB_CASES(PREC, FORM, 0, 1) FB_CASES(PREC, FORM, 1, 0) FB_CASES(PREC, FORM, 1, 1)
#define FB_FORM_HALF(PREC, FORM) FB_CASES(PREC, FORM, 0, 1) FB_CASES(PREC, FORM, 1, 1)
#define FB_PREC(PREC) FB_FORM(PREC, 0) FB_FORM(PREC, 1) FB_FORM(PREC, 2) FB_FORM(PREC, 3)
#define FB_PREC_HALF(PREC) FB_FORM_HALF(PREC, 0) FB_FORM_HALF(PREC, 1) FB_FORM_HALF(PREC, 2) FB_FORM_HALF(PREC, 3)
        FB_PREC(0) FB_PREC_HALF(1) FB_PREC_HALF(2) FB_PREC_HALF(3) FB_PREC_HALF(4)
#undef FB_PREC_HALF
#undef FB_PREC
#undef FB_FORM_HALF
#undef FB_FORM
#undef FB_CASES
#undef FB_CASE
    }
    return NAN; /* unreachable */
}

/* ---- one SM3 row, one dense range ----------------------------------------------------------------- */

/* Several threads may set the flag of one task; a relaxed atomic store keeps that well defined. */
static inline void flag_nonfinite(const fb_task *t) {
    __atomic_store_n((int32_t *)&t->nonfinite, 1, __ATOMIC_RELAXED);
}

/* The mean of a row's signed gradient, for centralization; the second read of the row comes from cache. */
static float row_mean(const fb_task *t, int64_t base, float sign, float *restrict gbuf) {
    const int64_t R = t->row_len;
    double lanes[FB_LANES] = {0};
    for (int64_t c = 0; c < R; c += FB_TILE) {
        int n = (int)(R - c < FB_TILE ? R - c : FB_TILE);
        const float *g = grad_tile(t, base + c, n, gbuf);
        int j = 0;
        for (; j + FB_LANES <= n; j += FB_LANES)
            for (int l = 0; l < FB_LANES; l++) lanes[l] += (double)g[j + l];
        for (; j < n; j++) lanes[0] += (double)g[j];
    }
    double sum = 0.0;
    for (int l = 0; l < FB_LANES; l++) sum += lanes[l];
    return (float)(sign * sum / (double)R);
}

static void sm3_row(const fb_task *t, const fb_hyper *h, int64_t i, float *restrict col) {
    float gbuf[FB_TILE], nubuf[FB_TILE], ubuf[FB_TILE];
    const int64_t R = t->row_len, base = i * R;
    const float sign = ((h->flags & FB_MAXIMIZE) ? -1.0f : 1.0f) * h->grad_unscale;
    const int use_rms = (h->flags & FB_USE_RMS) != 0;
    const float mean = (h->flags & FB_CENTRALIZE) ? row_mean(t, base, sign, gbuf) : 0.0f;
    const float a0 = t->acc[i];
    const int fast = fast_tile_applies(t, h);
    int bad = 0;
    float rowmax[FB_LANES];
    for (int l = 0; l < FB_LANES; l++) rowmax[l] = -INFINITY;
    for (int64_t c = 0; c < R; c += FB_TILE) {
        int n = (int)(R - c < FB_TILE ? R - c : FB_TILE);
        if (fast_tile_fits(t, fast, base + c, n)) {
            float mx = fast_tile(t, h, base + c, n, sign, mean, a0, t->rest + c, col + c, &bad);
            rowmax[0] = mx > rowmax[0] ? mx : rowmax[0];
            continue;
        } else {
            const float *g = grad_tile(t, base + c, n, gbuf);
            if (use_rms)
                second_moment_tile(n, g, sign, mean, h->eps, t->beta, t->one_minus_beta, a0, t->rest + c, col + c,
                                   NULL, nubuf, ubuf, &bad, FB_SM3, 1);
            else
                second_moment_tile(n, g, sign, mean, h->eps, t->beta, t->one_minus_beta, a0, t->rest + c, col + c,
                                   NULL, nubuf, ubuf, &bad, FB_SM3, 0);
        }
        int j = 0;
        for (; j + FB_LANES <= n; j += FB_LANES)
            for (int l = 0; l < FB_LANES; l++) rowmax[l] = nubuf[j + l] > rowmax[l] ? nubuf[j + l] : rowmax[l];
        for (; j < n; j++) rowmax[0] = nubuf[j] > rowmax[0] ? nubuf[j] : rowmax[0];
        update_tile(t, h, base + c, n, ubuf);
    }
    float mx = rowmax[0];
    for (int l = 1; l < FB_LANES; l++) mx = rowmax[l] > mx ? rowmax[l] : mx;
    t->acc[i] = mx;
    if (bad) flag_nonfinite(t);
}

/* Blocks of FB_SUM_ROWS rows of a factored task (its colmax holds that many rows of column sums). */
static inline int64_t sum_blocks(const fb_task *t) { return (t->rows + FB_SUM_ROWS - 1) / FB_SUM_ROWS; }

/* One row of a factored tensor: its nu summed into its block's column sums (the block's first row starts
 * them), and its mean the new a0[i]. */
static void factored_row(const fb_task *t, const fb_hyper *h, int64_t i) {
    float gbuf[FB_TILE], nubuf[FB_TILE], ubuf[FB_TILE];
    const int64_t R = t->row_len, base = i * R;
    const float sign = ((h->flags & FB_MAXIMIZE) ? -1.0f : 1.0f) * h->grad_unscale;
    const float mean = (h->flags & FB_CENTRALIZE) ? row_mean(t, base, sign, gbuf) : 0.0f;
    float *restrict col = t->colmax + (i / FB_SUM_ROWS) * R;
    if (i % FB_SUM_ROWS == 0) memset(col, 0, (size_t)R * sizeof(float));
    const float *restrict rest = t->kind == FB_FACTORED_2D ? t->colmax + sum_blocks(t) * R : t->rest;
    const float a0 = t->acc[i];
    const int fast = fast_tile_applies(t, h);
    int bad = 0;
    float lanes[FB_LANES] = {0};
    for (int64_t c = 0; c < R; c += FB_TILE) {
        int n = (int)(R - c < FB_TILE ? R - c : FB_TILE);
        if (fast_tile_fits(t, fast, base + c, n)) { /* the tile's sum into lane 0, tile after tile */
            lanes[0] += fast_tile(t, h, base + c, n, sign, mean, a0, rest + c, col + c, &bad);
            continue;
        }
        const float *g = grad_tile(t, base + c, n, gbuf);
        if (h->flags & FB_USE_RMS)
            second_moment_tile(n, g, sign, mean, h->eps, t->beta, t->one_minus_beta, a0, rest + c, col + c, NULL,
                               nubuf, ubuf, &bad, FB_FACTORED, 1);
        else
            second_moment_tile(n, g, sign, mean, h->eps, t->beta, t->one_minus_beta, a0, rest + c, col + c, NULL,
                               nubuf, ubuf, &bad, FB_FACTORED, 0);
        int j = 0;
        for (; j + FB_LANES <= n; j += FB_LANES)
            for (int l = 0; l < FB_LANES; l++) lanes[l] += nubuf[j + l];
        for (; j < n; j++) lanes[0] += nubuf[j];
        update_tile(t, h, base + c, n, ubuf);
    }
    float sum = 0.0f;
    for (int l = 0; l < FB_LANES; l++) sum += lanes[l];
    t->acc[i] = sum / (float)R;
    if (bad) flag_nonfinite(t);
}

/* Second moment and normalization of a dense tile whose v is stored in bf16, off the fast loop: v widened,
 * nu from second_moment_tile (with u the masked gradient), v rounded stochastically from it, then u
 * normalized by v as stored. */
static void dense_v16_tile(const fb_task *t, const fb_hyper *h, int64_t off, int n, const float *restrict g, float sign,
                           float *restrict ubuf, int *restrict bad) {
    float vbuf[FB_TILE];
    load_f32(vbuf, t->acc, FB_BF16, off, n);
    second_moment_tile(n, g, sign, 0.0f, h->eps, t->beta, t->one_minus_beta, 0.0f, NULL, NULL, vbuf, NULL, ubuf, bad,
                       FB_DENSE, 0);
    store_f32_sr(t->acc, FB_BF16, off, vbuf, n, t->v_k0, t->v_k1);
    if (h->flags & FB_USE_RMS) {
        load_f32(vbuf, t->acc, FB_BF16, off, n);
        const float eps = h->eps;
        for (int j = 0; j < n; j++) ubuf[j] = ubuf[j] / (sqrtf(vbuf[j]) + eps);
    }
}

static void dense_range(const fb_task *t, const fb_hyper *h, int64_t begin, int64_t end) {
    float gbuf[FB_TILE], ubuf[FB_TILE];
    const float sign = ((h->flags & FB_MAXIMIZE) ? -1.0f : 1.0f) * h->grad_unscale;
    const int fast = fast_tile_applies(t, h);
    int bad = 0;
    for (int64_t c = begin; c < end; c += FB_TILE) {
        int n = (int)(end - c < FB_TILE ? end - c : FB_TILE);
        if (fast_tile_fits(t, fast, c, n)) {
            fast_tile(t, h, c, n, sign, 0.0f, 0.0f, NULL, NULL, &bad);
            continue;
        }
        const float *g = grad_tile(t, c, n, gbuf);
        if (t->v_dtype == FB_BF16)
            dense_v16_tile(t, h, c, n, g, sign, ubuf, &bad);
        else if (h->flags & FB_USE_RMS)
            second_moment_tile(n, g, sign, 0.0f, h->eps, t->beta, t->one_minus_beta, 0.0f, NULL, NULL, t->acc + c,
                               NULL, ubuf, &bad, FB_DENSE, 1);
        else
            second_moment_tile(n, g, sign, 0.0f, h->eps, t->beta, t->one_minus_beta, 0.0f, NULL, NULL, t->acc + c,
                               NULL, ubuf, &bad, FB_DENSE, 0);
        update_tile(t, h, c, n, ubuf);
    }
    if (bad) flag_nonfinite(t);
}

/* rest = a1 / S, S = mean(a0) (summed in row order), 0 everywhere while S is 0, into the tail of colmax:
 * before any row changes a0. fusedbun/factored.py's factored_rest, for a matrix. */
static void factored_rest_2d(const fb_task *t) {
    float *restrict rest = t->colmax + sum_blocks(t) * t->row_len;
    const float *restrict a1 = t->rest;
    double sum = 0.0;
    for (int64_t i = 0; i < t->rows; i++) sum += (double)t->acc[i];
    const float scale = (float)(sum / (double)t->rows);
    for (int64_t j = 0; j < t->row_len; j++) rest[j] = scale > 0.0f ? a1[j] / scale : 0.0f;
}

/* ---- the work split and the threads --------------------------------------------------------------- */

typedef struct {
    const fb_task *tasks;
    int64_t ntasks;
    const fb_hyper *h;
    int64_t total_elems, total_cols;
    float *scratch; /* nthreads * total_cols column maxima, from the caller */
    int nthreads;
} fb_plan;

typedef struct {
    const fb_plan *plan;
    int thread;
} fb_worker;

/* First row of a task (whose elements start at elem_offset over all tasks) that belongs to thread
 * `thread`: threads take contiguous ranges of about total_elems / nthreads elements, rounded to whole
 * rows (to whole blocks of FB_SUM_ROWS rows for a factored task). Monotone in `thread`, so the ranges
 * partition every task's rows. */
static int64_t first_row(const fb_plan *plan, const fb_task *t, int64_t elem_offset, int thread) {
    if (thread >= plan->nthreads) return t->rows;
    int64_t start = (int64_t)((double)plan->total_elems * thread / plan->nthreads);
    int64_t x = start - elem_offset;
    if (x <= 0) return 0;
    int64_t r = (x + t->row_len - 1) / t->row_len;
    if (is_factored(t)) r = (r + FB_SUM_ROWS - 1) / FB_SUM_ROWS * FB_SUM_ROWS;
    return r < t->rows ? r : t->rows;
}

static void *run_worker(void *arg) {
    const fb_worker *w = (const fb_worker *)arg;
    const fb_plan *plan = w->plan;
    int64_t elem_offset = 0, col_offset = 0;
    for (int64_t k = 0; k < plan->ntasks; k++) {
        const fb_task *t = &plan->tasks[k];
        int64_t r0 = first_row(plan, t, elem_offset, w->thread), r1 = first_row(plan, t, elem_offset, w->thread + 1);
        if (r0 < r1) {
            if (t->kind == FB_SM3) {
                float *col = plan->scratch + (int64_t)w->thread * plan->total_cols + col_offset;
                for (int64_t j = 0; j < t->row_len; j++) col[j] = -INFINITY;
                for (int64_t i = r0; i < r1; i++) sm3_row(t, plan->h, i, col);
            } else if (is_factored(t)) {
                for (int64_t i = r0; i < r1; i++) factored_row(t, plan->h, i);
            } else {
                dense_range(t, plan->h, r0, r1);
            }
        }
        elem_offset += t->rows * t->row_len;
        if (t->kind == FB_SM3) col_offset += t->row_len;
    }
    return NULL;
}

/* One step over `ntasks` tensors, on h->nthreads threads (the calling one included). `scratch` holds
 * nthreads times the summed row_len of the SM3 tasks, in floats. Allocates nothing on the heap.
 * Returns the number of threads used. */
int fb_fused_step(const fb_task *tasks, int64_t ntasks, const fb_hyper *h, float *scratch) {
    if (ntasks <= 0) return 0;
    int nthreads = h->nthreads > 0 ? h->nthreads : 1;
    fb_plan plan = {tasks, ntasks, h, 0, 0, scratch, nthreads};
    for (int64_t k = 0; k < ntasks; k++) {
        plan.total_elems += tasks[k].rows * tasks[k].row_len;
        if (tasks[k].kind == FB_SM3) plan.total_cols += tasks[k].row_len;
        if (tasks[k].kind == FB_FACTORED_2D) factored_rest_2d(&tasks[k]);
    }
#ifdef _OPENMP
    /* torch's own OpenMP runtime (the loader checks that this library shares it): its worker threads,
     * already running and spinning after torch's last parallel region, take the shares at once. */
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp single
        plan.nthreads = omp_get_num_threads(); /* the runtime may give fewer threads than asked */
        fb_worker w = {&plan, omp_get_thread_num()};
        run_worker(&w);
    }
    nthreads = plan.nthreads;
    int used = nthreads;
#else
    fb_worker workers[nthreads];
    pthread_t threads[nthreads];
    char started[nthreads];
    for (int w = 0; w < nthreads; w++) workers[w] = (fb_worker){&plan, w};
    for (int w = 1; w < nthreads; w++) started[w] = pthread_create(&threads[w], NULL, run_worker, &workers[w]) == 0;
    run_worker(&workers[0]);
    int used = 1;
    for (int w = 1; w < nthreads; w++) {
        if (started[w]) {
            pthread_join(threads[w], NULL);
            used++;
        } else {
            run_worker(&workers[w]); /* no thread could be started: do its share here */
        }
    }
#endif
    /* Combine the column maxima of the threads that worked on each SM3 tensor. */
    int64_t elem_offset = 0, col_offset = 0;
    for (int64_t k = 0; k < ntasks; k++) {
        const fb_task *t = &tasks[k];
        if (t->kind == FB_SM3) {
            int first = 1;
            for (int w = 0; w < nthreads; w++) {
                if (first_row(&plan, t, elem_offset, w) >= first_row(&plan, t, elem_offset, w + 1)) continue;
                const float *col = scratch + (int64_t)w * plan.total_cols + col_offset;
                if (first) {
                    memcpy(t->colmax, col, (size_t)t->row_len * sizeof(float));
                    first = 0;
                } else {
                    for (int64_t j = 0; j < t->row_len; j++)
                        t->colmax[j] = col[j] > t->colmax[j] ? col[j] : t->colmax[j];
                }
            }
            col_offset += t->row_len;
        } else if (is_factored(t)) {
            /* The blocks' column sums, added in block order into the first block's. */
            const int64_t R = t->row_len, blocks = sum_blocks(t);
            float *restrict dst = t->colmax;
            for (int64_t b = 1; b < blocks; b++) {
                const float *restrict src = t->colmax + b * R;
                for (int64_t j = 0; j < R; j++) dst[j] += src[j];
            }
            if (t->kind == FB_FACTORED_2D) { /* the new a1: the means over the rows */
                float *restrict a1 = (float *)t->rest;
                const float rows = (float)t->rows;
                for (int64_t j = 0; j < R; j++) a1[j] = dst[j] / rows;
            }
        }
        elem_offset += t->rows * t->row_len;
    }
    return used;
}

/* The version of this file's interface; the loader checks it. */
int fb_abi_version(void) { return FB_ABI_VERSION; }

/* The mask's upper bound as compiled; the loader checks it against fusedbun.adalite.GRAD_LIMIT. */
float fb_grad_limit(void) { return FB_GRAD_LIMIT; }

/* sizeof and the offset of every field of fb_task, then of fb_hyper, in declaration order, for the loader
 * to compare with its ctypes mirrors. Returns how many numbers were written (at most n). */
int64_t fb_layout(int64_t *out, int64_t n) {
    const int64_t layout[] = {
        sizeof(fb_task), offsetof(fb_task, p), offsetof(fb_task, g), offsetof(fb_task, m),
        offsetof(fb_task, acc), offsetof(fb_task, rest), offsetof(fb_task, colmax), offsetof(fb_task, rows),
        offsetof(fb_task, row_len), offsetof(fb_task, p_dtype), offsetof(fb_task, g_dtype),
        offsetof(fb_task, m_dtype), offsetof(fb_task, v_dtype), offsetof(fb_task, kind), offsetof(fb_task, beta),
        offsetof(fb_task, one_minus_beta), offsetof(fb_task, nonfinite), offsetof(fb_task, stochastic),
        offsetof(fb_task, round_k0), offsetof(fb_task, round_k1), offsetof(fb_task, v_k0), offsetof(fb_task, v_k1),
        sizeof(fb_hyper), offsetof(fb_hyper, neg_lr), offsetof(fb_hyper, decay), offsetof(fb_hyper, eps),
        offsetof(fb_hyper, momentum_weight), offsetof(fb_hyper, flags), offsetof(fb_hyper, nthreads),
        offsetof(fb_hyper, grad_unscale),
    };
    int64_t count = (int64_t)(sizeof layout / sizeof layout[0]);
    if (count > n) count = n;
    for (int64_t i = 0; i < count; i++) out[i] = layout[i];
    return count;
}

/* 1 if built with OpenMP (threads from the OpenMP runtime), 0 for POSIX threads started per step. */
int fb_uses_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
