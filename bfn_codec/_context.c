/* The context network of format 7 at coding time: one call per stripe (context.py).

The same arithmetic as exact.py's int8 grids, with every float operation written out here
so that it is one IEEE-754 double operation in a fixed order: products of int8 rows are
integer sums (int32, exact in any order, whatever SIMD the compiler picks); what is not
(layer norm, softmax, GELU, rotary angles, the scales) uses only +, -, *, /, sqrt and rint,
each correctly rounded, in the order written, with exp, erf, sin and cos defined below from
those. Compiled with -ffp-contract=off and without -ffast-math, every machine computes the
same bits: the context states no longer depend on the math library or the SIMD width.

Layout (all row-major): a linear layer is int8 weights (out, in), one double scale per output
channel and a double bias; the cache keeps, per layer, lane and key/value head, `capacity`
rows of int8 keys and values (head_dim each) with one double scale per row.
*/
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "the kernel needs double arithmetic in double precision (SSE2 or the like, not x87)"
#endif
#pragma STDC FP_CONTRACT OFF
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")   /* GCC ignores the STDC pragma: no fused multiply-adds, whatever the flags */
#endif

#define KERNEL_VERSION 3      /* context.py checks it: a stale build is an error, not other bits */

typedef struct {
    const int8_t *weight;   /* (out, in) */
    const double *scale;    /* (out,) */
    const double *bias;     /* (out,) */
    const int8_t *packed;   /* the weight as (out / 16, in / 4, 16, 4) for the VNNI product, or NULL */
    const int32_t *offset;  /* (out,): 128 times the sum of each output channel's weights */
} Linear;

typedef struct {
    const double *ln1_weight, *ln1_bias, *ln2_weight, *ln2_bias;   /* (d,) each */
    Linear qkv, proj, fc1, fc2;
} Layer;

typedef struct {
    int32_t d, n_heads, kv_heads, n_layers, local_layers, local_window, window, hidden, ds;
    const double *embedding;            /* (257, d) */
    const Layer *layers;                /* (n_layers,) */
    const double *ln_weight, *ln_bias;  /* the final layer norm */
    Linear out;                         /* (ds, d) */
} Net;

typedef struct {
    int8_t *keys;                       /* (n_layers, lanes, kv_heads, capacity / 16, padded / 4, 16, 4):
                                           blocks of 16 rows, 4 channels of a row together (key_at) */
    int8_t *values;                     /* (n_layers, lanes, kv_heads, capacity, head_dim) */
    double *key_scales, *value_scales;  /* (n_layers, lanes, kv_heads, capacity) */
    int32_t *key_sums;                  /* (n_layers, lanes, kv_heads, capacity): each key row's sum */
    int32_t lanes, capacity;            /* capacity: a multiple of 16 */
} Cache;

/* A key row's channels are padded to a multiple of 4; where channel j of row a lies. */
static inline int padded(int hd) { return (hd + 3) / 4 * 4; }
static inline size_t key_at(int a, int j, int hd) {
    return (size_t)(a / 16) * 16 * padded(hd) + (size_t)(j / 4) * 64 + (a % 16) * 4 + j % 4;
}

/* ---- elementary functions from +, -, *, /, rint (the same bits on every IEEE machine) ---- */

static const double LN2_HI = 6.93147180369123816490e-01;    /* ln 2 in two parts: k LN2_HI is exact */
static const double LN2_LO = 1.90821492927058770002e-10;
static const double INV_LN2 = 1.44269504088896338700e+00;
static const double PIO2_1 = 1.57079632673412561417e+00;    /* pi / 2 in three parts of 33 bits */
static const double PIO2_2 = 6.07710050630396597660e-11;
static const double PIO2_3 = 2.02226624871116645580e-21;
static const double INV_PIO2 = 6.36619772367581382433e-01;
static const double LN_10000 = 9.21034037197618273607e+00;

/* exp(x) for x <= 0 (x below -708 counts as -708): x = k ln 2 + r, |r| <= ln 2 / 2, and e^r
   by its Taylor series to r^13 (relative error below 2e-16), times 2^k (exact: the result is a
   normal number). Branch-free, so that loops over it vectorise. */
static inline double exp_neg(double x) {
    x = x < -708.0 ? -708.0 : x;
    double k = rint(x * INV_LN2);
    double r = (x - k * LN2_HI) - k * LN2_LO;
    double p = 1.0 / 6227020800.0;                         /* 1/13! */
    static const double inv_fact[13] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
        1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
        1.0 / 6.0, 1.0 / 2.0, 1.0, 1.0};
    for (int i = 0; i < 13; i++) p = p * r + inv_fact[i];
    union { uint64_t bits; double value; } two_k = {(uint64_t)((int64_t)k + 1023) << 52};
    return p * two_k.value;
}

/* erf(x) by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7). */
static inline double erf_as(double x) {
    double a = fabs(x);
    double t = 1.0 / (1.0 + 0.3275911 * a);
    double poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    double y = 1.0 - poly * exp_neg(-(a * a));
    return x < 0 ? -y : y;
}

/* sin and cos of x >= 0 (below 2^22 pi / 2): x = k pi/2 + r, |r| <= pi/4, Taylor series to
   r^17 and r^18. */
static void sin_cos(double x, double *s, double *c) {
    double k = rint(x * INV_PIO2);
    double r = ((x - k * PIO2_1) - k * PIO2_2) - k * PIO2_3;
    static const double sin_terms[9] = {1.0, -1.0 / 6.0, 1.0 / 120.0, -1.0 / 5040.0, 1.0 / 362880.0,
        -1.0 / 39916800.0, 1.0 / 6227020800.0, -1.0 / 1307674368000.0, 1.0 / 355687428096000.0};  /* +-1/(2i+1)! */
    static const double cos_terms[10] = {1.0, -1.0 / 2.0, 1.0 / 24.0, -1.0 / 720.0, 1.0 / 40320.0,
        -1.0 / 3628800.0, 1.0 / 479001600.0, -1.0 / 87178291200.0, 1.0 / 20922789888000.0,
        -1.0 / 6402373705728000.0};                                                             /* +-1/(2i)! */
    double r2 = r * r, ps = 0.0, pc = 0.0;
    for (int i = 8; i >= 0; i--) ps = ps * r2 + sin_terms[i];
    for (int i = 9; i >= 0; i--) pc = pc * r2 + cos_terms[i];
    ps *= r;
    switch ((int64_t)k & 3) {
        case 0: *s = ps; *c = pc; break;
        case 1: *s = pc; *c = -ps; break;
        case 2: *s = -ps; *c = -pc; break;
        default: *s = -pc; *c = ps; break;
    }
}

/* ---- pieces of a block ---- */

static inline uint64_t abs_bits(double x) {     /* of a number (not NaN): ordered as |x| */
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits & 0x7fffffffffffffffULL;
}

/* A double's bits as an unsigned integer in the order of the numbers (not NaN), and back. */
static inline uint64_t order_key(double x) {
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits >> 63 ? ~bits : bits | 0x8000000000000000ULL;
}

static inline double from_order_key(uint64_t key) {
    uint64_t bits = key >> 63 ? key & 0x7fffffffffffffffULL : ~key;
    double x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* x (n, k) -> int8 rows q and scales: x ~ q scale, q = rint(x (127 / max |x|)), scale = max |x| / 127
   (max |x| at least 1e-30). */
static void int8_rows(const double *x, int n, int k, int8_t *q, double *scale) {
    for (int r = 0; r < n; r++) {
        const double *row = x + (size_t)r * k;
        uint64_t top_bits = abs_bits(1e-30);     /* the largest |x| as the largest bit pattern: vectorises */
        for (int j = 0; j < k; j++) { uint64_t b = abs_bits(row[j]); top_bits = b > top_bits ? b : top_bits; }
        double top;
        memcpy(&top, &top_bits, sizeof top);
        double inverse = 127.0 / top;
        for (int j = 0; j < k; j++) q[(size_t)r * k + j] = (int8_t)rint(row[j] * inverse);
        scale[r] = top / 127.0;
    }
}

static int32_t dot8(const int8_t *a, const int8_t *b, int k) {
    int32_t acc = 0;
    for (int j = 0; j < k; j++) acc += (int32_t)a[j] * (int32_t)b[j];
    return acc;
}

/* acc (n, out) = the integer products of int8 rows q (n, in) with the layer's weights. Where
   the CPU has AVX-512 VNNI, by vpdpbusd on (q + 128) as unsigned bytes, less 128 times the
   weights' sums: the same integers as dot8, 64 products per instruction. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_VNNI_PATH 1
static inline int32_t load4(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void products_vnni(const Linear *f, int in, int out, const int8_t *q, int n, uint8_t *shifted, int32_t *acc) {
    for (size_t j = 0; j < (size_t)n * in; j++) shifted[j] = (uint8_t)(q[j] + 128);
    for (int block = 0; block < out / 16; block++) {
        const int8_t *w = f->packed + (size_t)block * in * 16;
        __m512i offset = _mm512_loadu_si512(f->offset + block * 16);
        int r = 0;
        for (; r < n; r += 4) {
            int rows = n - r < 4 ? n - r : 4;
            const uint8_t *x[4];
            for (int i = 0; i < 4; i++) x[i] = shifted + (size_t)(r + (i < rows ? i : 0)) * in;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            for (int k = 0; k < in; k += 4) {
                __m512i wk = _mm512_loadu_si512(w + (size_t)k * 16);
                a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(load4(x[0] + k)), wk);
                a1 = _mm512_dpbusd_epi32(a1, _mm512_set1_epi32(load4(x[1] + k)), wk);
                a2 = _mm512_dpbusd_epi32(a2, _mm512_set1_epi32(load4(x[2] + k)), wk);
                a3 = _mm512_dpbusd_epi32(a3, _mm512_set1_epi32(load4(x[3] + k)), wk);
            }
            __m512i a[4] = {a0, a1, a2, a3};
            for (int i = 0; i < rows; i++)
                _mm512_storeu_si512(acc + (size_t)(r + i) * out + block * 16, _mm512_sub_epi32(a[i], offset));
        }
    }
}

/* dots (group, 16 per block) = the integer products of the group's int8 query rows q (group,
   hd) with the key rows of blocks first..last (16 rows each): vpdpbusd on (q + 128) as
   unsigned bytes, less 128 times each key row's sum. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void key_dots_vnni(const int8_t *q, int group, int hd, const int8_t *keys, const int32_t *key_sums,
                          int first, int last, int32_t *dots) {
    const int hp = padded(hd), blocks = last - first + 1;
    for (int g = 0; g < group; g++) {
        uint8_t shifted[hp];
        for (int j = 0; j < hp; j++) shifted[j] = j < hd ? (uint8_t)(q[g * hd + j] + 128) : 0;
        for (int b = first; b <= last; b++) {
            const int8_t *block = keys + (size_t)b * 16 * hp;
            __m512i acc = _mm512_setzero_si512();
            for (int j = 0; j < hp; j += 4)
                acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(load4(shifted + j)),
                                          _mm512_loadu_si512(block + (size_t)j * 16));
            __m512i sums = _mm512_slli_epi32(_mm512_loadu_si512(key_sums + b * 16), 7);
            _mm512_storeu_si512(dots + (size_t)g * blocks * 16 + (b - first) * 16, _mm512_sub_epi32(acc, sums));
        }
    }
}

static int vnni(void) {
    static int known = -1;
    if (known < 0) { __builtin_cpu_init(); known = __builtin_cpu_supports("avx512vnni") ? 1 : 0; }
    return known;
}

static int avx512(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") ? 1 : 0;
    }
    return known;
}
#endif

static void key_dots(const int8_t *q, int group, int hd, const int8_t *keys, const int32_t *key_sums,
                     int first, int last, int32_t *dots, int portable) {
#ifdef HAVE_VNNI_PATH
    if (!portable && vnni()) { key_dots_vnni(q, group, hd, keys, key_sums, first, last, dots); return; }
#endif
    const int blocks = last - first + 1;
    for (int g = 0; g < group; g++)
        for (int a = first * 16; a < (last + 1) * 16; a++) {
            int32_t acc = 0;
            for (int j = 0; j < hd; j++) acc += (int32_t)q[g * hd + j] * (int32_t)keys[key_at(a, j, hd)];
            dots[(size_t)g * blocks * 16 + a - first * 16] = acc;
        }
}

static void products(const Linear *f, int in, int out, const int8_t *q, int n, uint8_t *shifted, int32_t *acc,
                     int portable) {
#ifdef HAVE_VNNI_PATH
    if (f->packed && !portable && vnni()) { products_vnni(f, in, out, q, n, shifted, acc); return; }
#endif
    for (int o = 0; o < out; o++)
        for (int r = 0; r < n; r++)
            acc[(size_t)r * out + o] = dot8(q + (size_t)r * in, f->weight + (size_t)o * in, in);
}

/* y (n, out) = the layer applied to int8 rows (q, scale) of its input: (sum q w) scale
   w_scale + bias; add: y += that (the residual stream). work: n in bytes and n out int32. */
static void linear(const Linear *f, int in, int out, const int8_t *q, const double *scale, int n,
                   double *y, int add, uint8_t *work, int portable) {
    int32_t *acc = (int32_t *)(work + (((size_t)n * in + 63) & ~(size_t)63));
    products(f, in, out, q, n, work, acc, portable);
    for (int r = 0; r < n; r++)
        for (int o = 0; o < out; o++) {
            double v = (double)acc[(size_t)r * out + o] * scale[r] * f->scale[o] + f->bias[o];
            double *dst = y + (size_t)r * out + o;
            *dst = add ? *dst + v : v;
        }
}

/* sum x_j (j < d) as 8 sums of the j = i mod 8 in index order, added as ((0 + 1) + (2 + 3)) +
   ((4 + 5) + (6 + 7)): a fixed order that vectorises. */
static inline double sum8(const double *x, int d) {
    double part[8] = {0.0};
    int j = 0;
    for (; j + 8 <= d; j += 8)
        for (int i = 0; i < 8; i++) part[i] += x[j + i];
    for (int i = 0; j < d; j++, i++) part[i] += x[j];
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

/* nn.LayerNorm (eps 1e-5); its sums by sum8. */
static void layer_norm(const double *x, int n, int d, const double *w, const double *b, double *y) {
    double deviation[d];
    for (int r = 0; r < n; r++) {
        const double *row = x + (size_t)r * d;
        double mean = sum8(row, d) / d;
        for (int j = 0; j < d; j++) deviation[j] = (row[j] - mean) * (row[j] - mean);
        double var = sum8(deviation, d);
        double rstd = 1.0 / sqrt(var / d + 1e-5);
        for (int j = 0; j < d; j++) y[(size_t)r * d + j] = (row[j] - mean) * rstd * w[j] + b[j];
    }
}

/* Rotate channel pairs (x_j, x_{j+half}) by angle pos 10000^(-j / half) (layers.rotary). */
static void rotate(double *x, int hd, const double *cos_, const double *sin_) {
    int half = hd / 2;
    for (int j = 0; j < half; j++) {
        double a = x[j], b = x[j + half];
        x[j] = a * cos_[j] - b * sin_[j];
        x[j + half] = b * cos_[j] + a * sin_[j];
    }
}

/* The `group` query rows (int8 q (group, hd), scales) that share one lane's key/value head,
   over its keys lo..last: softmax weights times each value row's scale over the largest, on
   the grid 2^-16, times the int8 values (exact.IntBlock.attend); each key and value row is
   read once for the group. logits: group (last - lo + 1) doubles; dots: group times the
   blocks of 16 keys that hold lo..last int32; acc: group hd floats;
   out: row g at out + g stride. */
static void attend(const int8_t *q, const double *q_scales, int group, const int8_t *keys,
                   const int32_t *key_sums, const double *key_scales, const int8_t *values,
                   const double *value_scales, int lo, int last, int hd, double *logits, int32_t *dots,
                   float *acc, double *out, int stride, int portable) {
    const int S = last - lo + 1, first_block = lo / 16, blocks = last / 16 - first_block + 1;
    key_dots(q, group, hd, keys, key_sums, first_block, last / 16, dots, portable);
    uint64_t top_bits = 0;                   /* the largest value scale (all positive) */
    for (int s = lo; s <= last; s++) { uint64_t b = abs_bits(value_scales[s]); top_bits = b > top_bits ? b : top_bits; }
    double top;
    memcpy(&top, &top_bits, sizeof top);
    for (int g = 0; g < group; g++) {
        const double qs = q_scales[g] * (1.0 / sqrt((double)hd));
        const int32_t *dot = dots + (size_t)g * blocks * 16 + lo - first_block * 16;
        for (int s = 0; s < S; s++) logits[g * S + s] = (double)dot[s] * qs * key_scales[lo + s];
    }
    for (int g = 0; g < group; g++) {
        double *l = logits + g * S, sum = 0.0;
        uint64_t mx_key = 0;
        for (int s = 0; s < S; s++) { uint64_t k = order_key(l[s]); mx_key = k > mx_key ? k : mx_key; }
        double mx = from_order_key(mx_key);
        for (int s = 0; s < S; s++) l[s] = exp_neg(l[s] - mx);
        for (int s = 0; s < S; s++) sum += l[s];
        double grid = 65536.0 / (sum * top);
        for (int s = 0; s < S; s++) l[s] = rint(l[s] * grid * value_scales[lo + s]);
    }
    float row[hd];                           /* integers below 2^24 in float32: exact, as in int32 */
    memset(acc, 0, sizeof(float) * group * hd);
    for (int s = 0; s < S; s++) {
        const int8_t *v = values + (size_t)(lo + s) * hd;
        for (int j = 0; j < hd; j++) row[j] = (float)v[j];
        for (int g = 0; g < group; g++) {
            float w = (float)logits[g * S + s], *a = acc + g * hd;
            for (int j = 0; j < hd; j++) a[j] += w * row[j];
        }
    }
    for (int g = 0; g < group; g++)
        for (int j = 0; j < hd; j++) out[(size_t)g * stride + j] = (double)acc[g * hd + j] * (top / 65536.0);
}

/* The stripe: m new tokens of each of the first `lanes` lanes (tokens (lanes, m), token
   numbers pos.., written at cache rows at..at+m-1, the window's rows before them kept), all
   layers, then the context state (lanes, ds) of each lane's last token. Returns 0, or -1
   when out of memory. */
static int context_step(const Net *net, Cache *cache, int32_t lanes, int32_t m, const int32_t *tokens,
                        int64_t pos, int32_t at, double *states, int portable) {
    const int d = net->d, H = net->n_heads, KV = net->kv_heads, hd = d / H, group = H / KV;
    const int n = lanes * m, hidden = net->hidden, qkv_out = d + 2 * KV * hd;
    int wide = hidden > qkv_out ? hidden : qkv_out;       /* the widest row of any layer here */
    wide = wide > net->ds ? wide : net->ds;
    const int capacity = cache->capacity;
    double *h = malloc(sizeof(double) * n * d), *a = malloc(sizeof(double) * n * wide);
    double *att = malloc(sizeof(double) * n * d), *scales = malloc(sizeof(double) * n * (H + 2 * KV));
    double *logits = malloc(sizeof(double) * group * (at + m)), *cos_ = malloc(sizeof(double) * m * hd);
    int8_t *q = malloc((size_t)n * wide);
    float *acc = malloc(sizeof(float) * group * hd);
    int32_t *dots = malloc(sizeof(int32_t) * group * (capacity + 16));
    uint8_t *work = malloc((size_t)n * wide * 5 + 64);
    int status = (h && a && att && scales && logits && cos_ && q && acc && dots && work) ? 0 : -1;
    if (status) goto done;
    double *sin_ = cos_ + m * hd / 2;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < hd / 2; j++)
            sin_cos((double)(pos + i) * exp_neg(-((double)j / (hd / 2)) * LN_10000),
                    sin_ + i * hd / 2 + j, cos_ + i * hd / 2 + j);
    for (int r = 0; r < n; r++)
        memcpy(h + (size_t)r * d, net->embedding + (size_t)tokens[r] * d, sizeof(double) * d);
    for (int layer = 0; layer < net->n_layers; layer++) {
        const Layer *L = net->layers + layer;
        int local = layer < net->local_layers;
        int reach = local ? (net->window < net->local_window - 1 ? net->window : net->local_window - 1) : net->window;
        int lo = at - reach > 0 ? at - reach : 0;
        size_t block = (size_t)layer * cache->lanes * KV * capacity;
        layer_norm(h, n, d, L->ln1_weight, L->ln1_bias, a);
        int8_rows(a, n, d, q, scales);
        linear(&L->qkv, d, qkv_out, q, scales, n, a, 0, work, portable);           /* a: (n, heads q k v, hd) */
        for (int r = 0; r < n; r++) {
            double *row = a + (size_t)r * qkv_out;
            int i = r % m;
            for (int head = 0; head < H + KV; head++)
                rotate(row + head * hd, hd, cos_ + i * hd / 2, sin_ + i * hd / 2);
            for (int kv = 0; kv < KV; kv++) {                    /* the new keys and values: into the cache */
                size_t at_row = block + ((size_t)(r / m) * KV + kv) * capacity + at + i;
                int8_t key[hd];
                int32_t sum = 0;
                int8_rows(row + (H + kv) * hd, 1, hd, key, cache->key_scales + at_row);
                int8_t *keys = cache->keys + (at_row - (at + i)) * padded(hd);
                for (int j = 0; j < hd; j++) { keys[key_at(at + i, j, hd)] = key[j]; sum += key[j]; }
                cache->key_sums[at_row] = sum;
                int8_rows(row + (H + KV + kv) * hd, 1, hd, cache->values + at_row * hd, cache->value_scales + at_row);
            }
            int8_rows(row, H, hd, q + (size_t)r * d, scales + (size_t)r * H);
        }
        for (int r = 0; r < n; r++) {
            int i = r % m, last = at + i;
            int first = local && last - (net->local_window - 1) > lo ? last - (net->local_window - 1) : lo;
            for (int kv = 0; kv < KV; kv++) {      /* query heads kv group .. (kv + 1) group - 1 */
                size_t base = block + ((size_t)(r / m) * KV + kv) * capacity;
                attend(q + (size_t)r * d + kv * group * hd, scales + (size_t)r * H + kv * group, group,
                       cache->keys + base * padded(hd), cache->key_sums + base, cache->key_scales + base,
                       cache->values + base * hd, cache->value_scales + base,
                       first, last, hd, logits, dots, acc, att + (size_t)r * d + kv * group * hd, hd, portable);
            }
        }
        int8_rows(att, n, d, q, scales);
        linear(&L->proj, d, d, q, scales, n, h, 1, work, portable);
        layer_norm(h, n, d, L->ln2_weight, L->ln2_bias, a);
        int8_rows(a, n, d, q, scales);
        linear(&L->fc1, d, hidden, q, scales, n, a, 0, work, portable);
        for (size_t j = 0; j < (size_t)n * hidden; j++)            /* GELU: x Phi(x) */
            a[j] = (erf_as(a[j] * 0.70710678118654752440) + 1.0) * a[j] * 0.5;
        int8_rows(a, n, hidden, q, scales);
        linear(&L->fc2, hidden, d, q, scales, n, h, 1, work, portable);
    }
    for (int l = 0; l < lanes; l++)                                 /* each lane's last token */
        layer_norm(h + ((size_t)l * m + m - 1) * d, 1, d, net->ln_weight, net->ln_bias, a + (size_t)l * d);
    int8_rows(a, lanes, d, q, scales);
    linear(&net->out, d, net->ds, q, scales, lanes, states, 0, work, portable);
done:
    free(h); free(a); free(att); free(scales); free(logits); free(cos_); free(q); free(acc); free(dots); free(work);
    return status;
}

/* ---- the per-step network (sar.SARNet.forward for one-byte chunks) ----
   Float64, but for the dense layers' products: float32 weights and inputs, each output's sum
   in float32 over its inputs in index order (vectorised across outputs, the same bits on
   every machine), the bias added in float64. */

typedef struct {
    const float *weight_t;    /* (in, out) */
    const double *bias;       /* (out,) or NULL */
} Dense;

typedef struct {
    const double *ln1_weight, *ln1_bias, *ln2_weight, *ln2_bias;
    Dense value, proj, fc1, fc2;
} StepLayer;

typedef struct {
    int32_t V, ds, n_layers, hidden, residual;
    Dense bits_in, soft_emb, time_in, time_out, prior, head;
    const double *position;               /* pos_emb[0] (ds,) */
    const StepLayer *layers;
    const double *ln_weight, *ln_bias;    /* ln_out */
} StepNet;

/* y (n, out) = x (n, in) W + bias; add: y += that. Each output's float32 sum runs over k in
   order from 0 and the bias comes last, in both loops below (the same bits): the blocked one
   keeps 4 rows by 64 outputs in registers for outputs in multiples of 64. */
#define ROWS 4
#define COLS 64
static void dense(const Dense *f, int in, int out, const double *x, int n, double *y, int add) {
    for (int o0 = 0; o0 < out; o0 += COLS) {
        int blocked = out % COLS == 0;
        for (int r0 = 0; r0 < n; r0 += blocked ? ROWS : 1) {
            if (blocked) {
                float acc[ROWS][COLS] = {{0.0f}};
                const double *xr[ROWS];
                for (int r = 0; r < ROWS; r++) xr[r] = x + (size_t)(r0 + r < n ? r0 + r : r0) * in;
                for (int k = 0; k < in; k++) {
                    const float *w = f->weight_t + (size_t)k * out + o0;
                    for (int r = 0; r < ROWS; r++) {
                        const float xk = (float)xr[r][k];
                        for (int o = 0; o < COLS; o++) acc[r][o] += xk * w[o];
                    }
                }
                for (int r = 0; r < ROWS && r0 + r < n; r++)
                    for (int o = 0; o < COLS; o++) {
                        double v = f->bias ? (double)acc[r][o] + f->bias[o0 + o] : (double)acc[r][o];
                        double *dst = y + (size_t)(r0 + r) * out + o0 + o;
                        *dst = add ? *dst + v : v;
                    }
            } else {
                int width = out - o0 < COLS ? out - o0 : COLS;
                float acc[COLS] = {0.0f};
                for (int k = 0; k < in; k++) {
                    const float xk = (float)x[(size_t)r0 * in + k], *w = f->weight_t + (size_t)k * out + o0;
                    for (int o = 0; o < width; o++) acc[o] += xk * w[o];
                }
                for (int o = 0; o < width; o++) {
                    double v = f->bias ? (double)acc[o] + f->bias[o0 + o] : (double)acc[o];
                    double *dst = y + (size_t)r0 * out + o0 + o;
                    *dst = add ? *dst + v : v;
                }
            }
        }
    }
}

static inline double gelu(double x) {
    return (erf_as(x * 0.70710678118654752440) + 1.0) * x * 0.5;
}

/* log x for x >= 1 (a softmax's sum): x = 2^k m, m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s),
   s = (m - 1) / (m + 1), by its series to s^23. */
static double log_ge1(double x) {
    int k;
    double m = frexp(x, &k);              /* x = m 2^k, m in [1/2, 1): exact */
    if (m < 0.70710678118654752440) { m *= 2.0; k -= 1; }
    double s = (m - 1.0) / (m + 1.0), s2 = s * s, p = 0.0;
    for (int i = 11; i >= 0; i--) p = p * s2 + 1.0 / (2 * i + 1);
    return (k * LN2_HI + 2.0 * s * p) + k * LN2_LO;
}

/* x (n,) -> x - max - log sum exp(x - max), the sum in index order. */
static void log_softmax(double *x, int n) {
    double mx = x[0], sum = 0.0;
    for (int i = 1; i < n; i++) if (x[i] > mx) mx = x[i];
    double e[n];
    for (int i = 0; i < n; i++) e[i] = exp_neg(x[i] - mx);
    for (int i = 0; i < n; i++) sum += e[i];
    double norm = mx + log_ge1(sum);
    for (int i = 0; i < n; i++) x[i] -= norm;
}

/* The chunk's t = 0 prediction, read from the context state alone: prior (lanes, 256). */
int bfn_step_prior(const StepNet *net, int32_t lanes, const double *states, double *prior) {
    dense(&net->prior, net->ds, 256, states, lanes, prior, 0);
    return 0;
}

/* log p_O (lanes, 256) of one-byte chunks at time t: beliefs (lanes, V) are the bits' logits.
   Returns 0, or -1 when out of memory. */
static int step(const StepNet *net, int32_t lanes, const double *states, const double *prior,
                const double *beliefs, double t, double *log_p) {
    const int V = net->V, ds = net->ds, hidden = net->hidden, n = lanes;
    double features[32], time_hidden[ds], time_state[ds];
    double *e = malloc(sizeof(double) * n * 256), *p = malloc(sizeof(double) * n * 256);
    double *bits = malloc(sizeof(double) * n * V), *h = malloc(sizeof(double) * n * ds);
    double *a = malloc(sizeof(double) * n * ds), *v = malloc(sizeof(double) * n * ds);
    double *hid = malloc(sizeof(double) * n * hidden);
    int status = (e && p && bits && h && a && v && hid) ? 0 : -1;
    if (status) goto done;
    for (int j = 0; j < 16; j++)            /* layers.time_features: pi 2^j / 16, pi in float32 as there */
        sin_cos(t * (3.14159274101257324219 * (double)(1 << j) / 16.0), features + j, features + 16 + j);
    dense(&net->time_in, 32, ds, features, 1, time_hidden, 0);
    for (int j = 0; j < ds; j++) time_hidden[j] = gelu(time_hidden[j]);
    dense(&net->time_out, ds, ds, time_hidden, 1, time_state, 0);
    for (int l = 0; l < n; l++) {
        const double *s = beliefs + (size_t)l * V;
        double *el = e + (size_t)l * 256, *pl = p + (size_t)l * 256;
        el[0] = 0.0;                         /* the flow's evidence for every byte: its set bits' logits */
        for (int d = 0, size = 1; d < V; d++, size *= 2)     /* summed, most significant first */
            for (int b = size - 1; b >= 0; b--) {
                el[2 * b + 1] = el[b] + s[d];
                el[2 * b] = el[b];
            }
        double mx = el[0], total = 0.0;      /* the soft embedding's weights: softmax of the evidence */
        for (int b = 1; b < 256; b++) if (el[b] > mx) mx = el[b];
        for (int b = 0; b < 256; b++) pl[b] = exp_neg(el[b] - mx);
        for (int b = 0; b < 256; b++) total += pl[b];
        for (int b = 0; b < 256; b++) pl[b] /= total;
        for (int d = 0; d < V; d++) {       /* 2 theta - 1, theta = sigmoid(s) */
            double z = exp_neg(-fabs(s[d]));
            bits[(size_t)l * V + d] = 2.0 * (s[d] >= 0 ? 1.0 / (1.0 + z) : z / (1.0 + z)) - 1.0;
        }
    }
    dense(&net->bits_in, V, ds, bits, n, h, 0);
    dense(&net->soft_emb, 256, ds, p, n, h, 1);
    for (int l = 0; l < n; l++)
        for (int j = 0; j < ds; j++)
            h[(size_t)l * ds + j] = (h[(size_t)l * ds + j] + net->position[j]) + (states[(size_t)l * ds + j] + time_state[j]);
    for (int i = 0; i < net->n_layers; i++) {      /* layers.Block.alone */
        const StepLayer *L = net->layers + i;
        layer_norm(h, n, ds, L->ln1_weight, L->ln1_bias, a);
        dense(&L->value, ds, ds, a, n, v, 0);
        dense(&L->proj, ds, ds, v, n, h, 1);
        layer_norm(h, n, ds, L->ln2_weight, L->ln2_bias, a);
        dense(&L->fc1, ds, hidden, a, n, hid, 0);
        for (size_t j = 0; j < (size_t)n * hidden; j++) hid[j] = gelu(hid[j]);
        dense(&L->fc2, hidden, ds, hid, n, h, 1);
    }
    layer_norm(h, n, ds, net->ln_weight, net->ln_bias, a);
    dense(&net->head, ds, 256, a, n, log_p, 0);
    for (int l = 0; l < n; l++) {
        double *out = log_p + (size_t)l * 256;
        for (int b = 0; b < 256; b++)
            out[b] = (net->residual ? e[(size_t)l * 256 + b] + out[b] : out[b]) + prior[(size_t)l * 256 + b];
        log_softmax(out, 256);
    }
done:
    free(e); free(p); free(bits); free(h); free(a); free(v); free(hid);
    return status;
}

/* The stripe's entry point: context_step compiled for AVX-512 where the CPU has it, for the
   baseline instruction set otherwise (portable != 0 forces the baseline build and the plain
   integer products: the tests compare the two, bit for bit). */
#ifdef HAVE_VNNI_PATH
__attribute__((flatten, target("arch=x86-64-v4")))
static int context_step_avx512(const Net *net, Cache *cache, int32_t lanes, int32_t m, const int32_t *tokens,
                               int64_t pos, int32_t at, double *states) {
    return context_step(net, cache, lanes, m, tokens, pos, at, states, 0);
}
#endif

__attribute__((flatten))
static int context_step_baseline(const Net *net, Cache *cache, int32_t lanes, int32_t m, const int32_t *tokens,
                                 int64_t pos, int32_t at, double *states, int portable) {
    return context_step(net, cache, lanes, m, tokens, pos, at, states, portable);
}

int bfn_context_step(const Net *net, Cache *cache, int32_t lanes, int32_t m, const int32_t *tokens,
                     int64_t pos, int32_t at, double *states, int32_t portable) {
#ifdef HAVE_VNNI_PATH
    if (!portable && avx512()) return context_step_avx512(net, cache, lanes, m, tokens, pos, at, states);
#endif
    return context_step_baseline(net, cache, lanes, m, tokens, pos, at, states, portable);
}

#ifdef HAVE_VNNI_PATH
__attribute__((flatten, target("arch=x86-64-v4")))
static int step_avx512(const StepNet *net, int32_t lanes, const double *states, const double *prior,
                       const double *beliefs, double t, double *log_p) {
    return step(net, lanes, states, prior, beliefs, t, log_p);
}
#endif

__attribute__((flatten))
static int step_baseline(const StepNet *net, int32_t lanes, const double *states, const double *prior,
                         const double *beliefs, double t, double *log_p) {
    return step(net, lanes, states, prior, beliefs, t, log_p);
}

int bfn_step(const StepNet *net, int32_t lanes, const double *states, const double *prior,
             const double *beliefs, double t, double *log_p, int32_t portable) {
#ifdef HAVE_VNNI_PATH
    if (!portable && avx512()) return step_avx512(net, lanes, states, prior, beliefs, t, log_p);
#endif
    return step_baseline(net, lanes, states, prior, beliefs, t, log_p);
}

/* What the load-time check and the tests check the elementary functions with: y = f(x) for f 0: exp (x <= 0), 1: erf,
   2: sin, 3: cos (x >= 0), 4: log (x >= 1). */
static void elementary(int32_t which, const double *x, double *y, int32_t n) {
    for (int i = 0; i < n; i++) {
        double s, c;
        switch (which) {
            case 0: y[i] = exp_neg(x[i]); break;
            case 1: y[i] = erf_as(x[i]); break;
            case 2: sin_cos(x[i], &s, &c); y[i] = s; break;
            case 3: sin_cos(x[i], &s, &c); y[i] = c; break;
            default: y[i] = log_ge1(x[i]); break;
        }
    }
}

#ifdef HAVE_VNNI_PATH
__attribute__((flatten, target("arch=x86-64-v4")))
static void elementary_avx512(int32_t which, const double *x, double *y, int32_t n) { elementary(which, x, y, n); }
#endif

__attribute__((flatten))
static void elementary_baseline(int32_t which, const double *x, double *y, int32_t n) { elementary(which, x, y, n); }

/* in the build the networks use (portable: the baseline build), so that the load-time check
   covers the code that runs */
void bfn_elementary(int32_t which, const double *x, double *y, int32_t n, int32_t portable) {
#ifdef HAVE_VNNI_PATH
    if (!portable && avx512()) { elementary_avx512(which, x, y, n); return; }
#endif
    elementary_baseline(which, x, y, n);
}

int32_t bfn_kernel_version(void) { return KERNEL_VERSION; }

/* Move rows from..from+keep-1 of every layer's, lane's and head's cache to rows 0..keep-1
   (from > 0; in increasing order, so overlapping ranges are safe). */
void bfn_cache_compact(const Net *net, Cache *cache, int32_t from, int32_t keep) {
    const int KV = net->kv_heads, hd = net->d / net->n_heads, capacity = cache->capacity;
    const size_t heads = (size_t)net->n_layers * cache->lanes * KV;
    for (size_t head = 0; head < heads; head++) {
        int8_t *keys = cache->keys + head * capacity * padded(hd), *values = cache->values + head * capacity * hd;
        double *key_scales = cache->key_scales + head * capacity, *value_scales = cache->value_scales + head * capacity;
        int32_t *key_sums = cache->key_sums + head * capacity;
        for (int r = 0; r < keep; r++) {
            for (int j = 0; j < hd; j++) keys[key_at(r, j, hd)] = keys[key_at(from + r, j, hd)];
            memmove(values + (size_t)r * hd, values + (size_t)(from + r) * hd, hd);
            key_scales[r] = key_scales[from + r];
            value_scales[r] = value_scales[from + r];
            key_sums[r] = key_sums[from + r];
        }
    }
}

