/* The batch-norm passes for one dtype and CPU target.  kernels.c includes this file (through
 * kernels_target.h) once per pair with
 *   BN_T            the element type as stored (float, double, or uint16_t for half precision)
 *   BN_C            the type the elementwise arithmetic and the coefficients use (BN_T, or
 *                   float for half precision)
 *   BN_WIDEN(v)     a BN_T as a BN_C, and BN_NARROW(v) back, rounded to nearest even
 *   BN_NAME(n)      n suffixed with the dtype's and the target's names
 *   BN_TARGET_ATTR  the target's function attribute (empty for the baseline)
 * defined.  Every loop is written once; bn_reduce and bn_apply call their body with the layout's
 * strides as compile-time constants where the layout is contiguous, so that GCC vectorizes those
 * copies, and with run-time strides otherwise.  Loads and stores go through memcpy: unaligned
 * buffers are legal input, and GCC turns these into plain (vector) moves.
 */

static BN_TARGET_ATTR BN_INLINE BN_C BN_NAME(load)(const char *p)
{
    BN_T v;
    memcpy(&v, p, sizeof v);
    return BN_WIDEN(v);
}

static BN_TARGET_ATTR BN_INLINE void BN_NAME(store)(char *p, BN_C v)
{
    const BN_T t = BN_NARROW(v);
    memcpy(p, &t, sizeof t);
}

/* dy where the forward's ReLU passed the element (its pre-activation p > 0; the ReLU's gradient
 * at 0 is 0, as PyTorch's), else 0.  A select, as PyTorch's threshold_backward is: a NaN in a
 * masked dy does not reach the sums.  Not a product with a 0/1 mask: (double)(p > 0) kept GCC
 * from vectorizing the float64 sums for AVX2 (backward_sums on (8,112,112,32) float32 with
 * x86-64-v3: 28 ms scalar).  The reductions compute p in float64 beside their other terms, the
 * elementwise pass in the compute type as the forward's normalize does; the two differ only for
 * a pre-activation within rounding of zero. */
static BN_TARGET_ATTR BN_INLINE double BN_NAME(relu_grad_sums)(double dy, double p)
{
    return p > 0 ? dy : 0.0;
}

static BN_TARGET_ATTR BN_INLINE BN_C BN_NAME(relu_grad)(BN_C dy, BN_C p)
{
    return p > 0 ? dy : (BN_C)0;
}

/* A reduction's weight of one element: dy (x - shift itself in the statistics pass) through a
 * fused ReLU's mask, and with per-parameter gamma (BN_PARAMS: layer and RMS norm) gamma[q] * dy,
 * the mask's pre-activation then (v * act_scale + act_offset) * gamma[q] + beta[q]. */
static BN_TARGET_ATTR BN_INLINE double BN_NAME(sums_weight)(double w, double v, double as,
                                                           double ao, const BN_C *pgamma,
                                                           const BN_C *pbeta, npy_intp q,
                                                           const int flags)
{
    if (!(flags & BN_PARAMS))
        return flags & BN_RELU ? BN_NAME(relu_grad_sums)(w, v * as + ao) : w;
    const double g = (double)pgamma[q];
    if (flags & BN_RELU)
        w = BN_NAME(relu_grad_sums)(w, (v * as + ao) * g + (double)pbeta[q]);
    return w * g;
}

/* Whether a pass walks a block's batch rows (rows of n1 elements sharing their features) one
 * after another rather than a group of them side by side.  Side by side, a feature's sums or
 * coefficients are loaded once per group instead of once per row, which is what counts while the
 * data is in cache.  But memory is then read in interleaved streams, which the prefetchers of
 * the machine we measured (AMD EPYC) follow well only when a group spans a few cache lines (rows
 * up to short_row bytes) or when each row is a long stream of its own.  In between, a pass over
 * more than BN_STREAMED bytes goes one row after another: normalize on 1 KiB rows 11 -> 23 GB/s,
 * statistics 9 -> 13 GB/s.  long_row: the bytes from which a row counts as long.  The
 * reductions, whose float64 arithmetic costs the same per element in every dtype, count a
 * half-precision row as long from as many elements as a float32 row of BN_LONG_ROW bytes: one
 * row at a time, each element also loads and stores its feature's sums, which cost half
 * precision's 2 KiB rows more than their interleaved streams (float16 (4096,1024) on one
 * thread: batch_stats 1.75 -> 0.74 ms, backward_sums 2.6 -> 1.6 ms grouped). */
static BN_TARGET_ATTR BN_INLINE int BN_NAME(rows_one_by_one)(const bn_block *b,
                                                            npy_intp short_row, npy_intp long_row)
{
    const npy_intp row_bytes = b->n1 * (npy_intp)sizeof(BN_T);
    return row_bytes > short_row && row_bytes < long_row &&
           b->pass_size > BN_STREAMED / (npy_intp)sizeof(BN_T);
}

/* A tile: up to BN_LANES elements of a row, p + l * stride, in the compute type.  A dtype that
 * converts whole tiles (BN_WIDEN_TILE: float16 with F16C) reads them into an array first; the
 * others load and convert each element in the loop that uses it, which vectorizes. */
#ifdef BN_WIDEN_TILE
static BN_TARGET_ATTR BN_INLINE void
BN_NAME(read_tile)(const char *p, npy_intp stride, npy_intp m, BN_C *dst)
{
    if (m == BN_LANES && stride == (npy_intp)sizeof(BN_T)) { /* contiguous: straight from memory */
        BN_WIDEN_TILE(p, dst);
        return;
    }
    BN_T raw[BN_LANES];
    for (npy_intp l = 0; l < m; l++)
        memcpy(&raw[l], p + l * stride, sizeof(BN_T));
    for (npy_intp l = 0; l < BN_LANES; l++) /* a partial tile's lanes past m: never used */
        if (l >= m)
            raw[l] = 0;
    BN_WIDEN_TILE(raw, dst);
}
#define BN_TILE_READ(t, p, stride, m) BN_NAME(read_tile)(p, stride, m, t)
#define BN_TILE_AT(t, p, stride, l) ((t)[l])
#else
#define BN_TILE_READ(t, p, stride, m) ((void)(t))
#define BN_TILE_AT(t, p, stride, l) BN_NAME(load)((p) + (l) * (stride))
#endif

/* Features along the inner dimension: `rows` rows (at most BN_STATS_ROWS) of m <= BN_LANES
 * elements starting at feature f, rows that have the same features when rows > 1 (batch rows,
 * fs0 == 0), fs1 != 0.  Each feature's rows are summed in registers, in row order, before touching
 * its sums, each of which costs a load and a store. */
static BN_TARGET_ATTR BN_INLINE void BN_NAME(reduce_tile)(
    npy_intp rows, npy_intp m, const char *x, npy_intp xs0, npy_intp xs1, const char *dy,
    npy_intp ds0, npy_intp ds1, npy_intp f, npy_intp fs1, const bn_param_walk *pw,
    const BN_C *restrict shift, const BN_C *restrict act_scale, const BN_C *restrict act_offset,
    double *restrict sum0, double *restrict sum1, double *restrict sum2, const int flags)
{
    const int has_dy = flags & BN_HAS_DY, relu = flags & BN_RELU;
    const BN_C *pgamma = (const BN_C *)pw->gamma, *pbeta = (const BN_C *)pw->beta;
    BN_C xt[BN_STATS_ROWS][BN_LANES], dyt[BN_STATS_ROWS][BN_LANES];
    for (npy_intp r = 0; r < rows; r++) {
        BN_TILE_READ(xt[r], x + r * xs0, xs1, m);
        if (has_dy)
            BN_TILE_READ(dyt[r], dy + r * ds0, ds1, m);
    }
#pragma omp simd
    for (npy_intp l = 0; l < m; l++) {
        const npy_intp g = f + l * fs1; /* distinct for every l: fs1 != 0 */
        const double k = (double)shift[g];
        const double as = relu ? (double)act_scale[g] : 0, ao = relu ? (double)act_offset[g] : 0;
        double s0 = 0, s1 = 0, s2 = 0;
        for (npy_intp r = 0; r < rows; r++) {
            const double v = (double)BN_TILE_AT(xt[r], x + r * xs0, xs1, l) - k;
            double w = has_dy ? (double)BN_TILE_AT(dyt[r], dy + r * ds0, ds1, l) : v;
            w = BN_NAME(sums_weight)(w, v, as, ao, pgamma, pbeta,
                                     pw->p + r * pw->ps0 + l * pw->ps1, flags);
            s0 += w;
            s1 += w * v;
            s2 += v;
        }
        sum0[g] += s0;
        sum1[g] += s1;
        if (has_dy)
            sum2[g] += s2;
    }
}

/* `rows` rows of n1 elements from feature f, a tile at a time: full tiles apart, so that their
 * length is a constant GCC vectorizes */
static BN_TARGET_ATTR BN_INLINE void BN_NAME(reduce_rows)(
    npy_intp rows, npy_intp n1, const char *x, npy_intp xs0, npy_intp xs1, const char *dy,
    npy_intp ds0, npy_intp ds1, npy_intp f, npy_intp fs1, const bn_param_walk *pw,
    const BN_C *restrict shift, const BN_C *restrict act_scale, const BN_C *restrict act_offset,
    double *restrict sum0, double *restrict sum1, double *restrict sum2, const int flags)
{
    bn_param_walk tile = *pw;
    npy_intp j = 0;
    for (; j + BN_LANES <= n1; j += BN_LANES) {
        tile.p = pw->p + j * pw->ps1;
        BN_NAME(reduce_tile)(rows, BN_LANES, x + j * xs1, xs0, xs1, dy + j * ds1, ds0, ds1,
                             f + j * fs1, fs1, &tile, shift, act_scale, act_offset, sum0, sum1,
                             sum2, flags);
    }
    tile.p = pw->p + j * pw->ps1;
    if (j < n1)
        BN_NAME(reduce_tile)(rows, n1 - j, x + j * xs1, xs0, xs1, dy + j * ds1, ds0, ds1,
                             f + j * fs1, fs1, &tile, shift, act_scale, act_offset, sum0, sum1,
                             sum2, flags);
}

/* Reductions accumulate in float64 from data shifted by a per-feature value near the mean
 * (shift), which keeps the one-pass variance exact for data far from zero; dy = NULL means the
 * statistics pass, where the "weight" w is the shifted value itself:
 *   sum0 += w,  sum1 += w * (x - shift),  sum2 += x - shift (with dy only).
 * Features along the inner dimension (fs1 != 0) accumulate into the per-feature sums, a group
 * of batch rows at a time when grouped (rows of the batch, see rows_one_by_one): BN_STATS_ROWS
 * rows of x alone, BN_ROWS of x and dy (8 rows of both, 4 KiB apart, are 16 lines in one set of
 * an 8-way L1: backward_sums (256,1024) float64 takes 88 us with 4 rows, 186 us with 8); batch along the
 * inner dimension (fs1 == 0) sums each row in BN_LANES independent lanes first, added in a fixed
 * order, which both vectorizes and shortens the rounding chains. */
static BN_TARGET_ATTR BN_INLINE void BN_NAME(reduce_body)(
    npy_intp n0, npy_intp n1, const char *x, npy_intp xs0, npy_intp xs1, const char *dy,
    npy_intp ds0, npy_intp ds1, npy_intp f0, npy_intp fs0, npy_intp fs1, const bn_param_walk *pw,
    npy_intp ps1, const BN_C *restrict shift, const BN_C *restrict act_scale,
    const BN_C *restrict act_offset, double *restrict sum0, double *restrict sum1,
    double *restrict sum2, const int grouped, const int flags)
{
    const int has_dy = flags & BN_HAS_DY, relu = flags & BN_RELU;
    const BN_C *pgamma = (const BN_C *)pw->gamma, *pbeta = (const BN_C *)pw->beta;
    bn_param_walk row = *pw;
    row.ps1 = ps1;
    if (fs1 != 0) {
        npy_intp i = 0;
        /* full groups apart, so that their row count is a constant */
        const npy_intp group = has_dy ? BN_ROWS : BN_STATS_ROWS;
        if (grouped)
            for (; i + group <= n0; i += group) {
                row.p = pw->p + i * pw->ps0;
                BN_NAME(reduce_rows)(group, n1, x + i * xs0, xs0, xs1, dy + i * ds0, ds0, ds1,
                                     f0, fs1, &row, shift, act_scale, act_offset, sum0, sum1,
                                     sum2, flags);
            }
        for (; i < n0; i++) {
            row.p = pw->p + i * pw->ps0;
            BN_NAME(reduce_rows)(1, n1, x + i * xs0, xs0, xs1, dy + i * ds0, ds0, ds1,
                                 f0 + i * fs0, fs1, &row, shift, act_scale, act_offset, sum0,
                                 sum1, sum2, flags);
        }
        return;
    }
    for (npy_intp i = 0; i < n0; i++) {
        const char *xrow = x + i * xs0, *dyrow = dy + i * ds0;
        const npy_intp f = f0 + i * fs0;
        const double k = (double)shift[f];
        const double as = relu ? (double)act_scale[f] : 0, ao = relu ? (double)act_offset[f] : 0;
        const npy_intp prow = pw->p + i * pw->ps0;
        double lane0[BN_LANES] = {0}, lane1[BN_LANES] = {0}, lane2[BN_LANES] = {0};
        npy_intp j = 0;
        for (; j + BN_LANES <= n1; j += BN_LANES) {
            const char *xt0 = xrow + j * xs1, *dyt0 = dyrow + j * ds1;
            const npy_intp pt = prow + j * ps1;
            BN_C xt[BN_LANES], dyt[BN_LANES];
            BN_TILE_READ(xt, xt0, xs1, BN_LANES);
            if (has_dy)
                BN_TILE_READ(dyt, dyt0, ds1, BN_LANES);
#pragma omp simd
            for (npy_intp l = 0; l < BN_LANES; l++) {
                const double v = (double)BN_TILE_AT(xt, xt0, xs1, l) - k;
                double w = has_dy ? (double)BN_TILE_AT(dyt, dyt0, ds1, l) : v;
                w = BN_NAME(sums_weight)(w, v, as, ao, pgamma, pbeta, pt + l * ps1, flags);
                lane0[l] += w;
                lane1[l] += w * v;
                if (has_dy)
                    lane2[l] += v;
            }
        }
        double t0 = 0, t1 = 0, t2 = 0;
        for (npy_intp l = 0; l < BN_LANES; l++) {
            t0 += lane0[l];
            t1 += lane1[l];
            t2 += lane2[l];
        }
        /* the tail apart, so that the lanes are indexed by constants only and stay in registers */
        for (; j < n1; j++) {
            const double v = (double)BN_NAME(load)(xrow + j * xs1) - k;
            double w = has_dy ? (double)BN_NAME(load)(dyrow + j * ds1) : v;
            w = BN_NAME(sums_weight)(w, v, as, ao, pgamma, pbeta, prow + j * ps1, flags);
            t0 += w;
            t1 += w * v;
            t2 += v;
        }
        sum0[f] += t0;
        sum1[f] += t1;
        if (has_dy)
            sum2[f] += t2;
    }
}

static BN_TARGET_ATTR BN_INLINE void
BN_NAME(reduce)(const bn_block *b, const bn_coefs *c, const int flags)
{
    const int has_dy = flags & BN_HAS_DY;
    const BN_C *shift = (const BN_C *)c->shift;
    const BN_C *act_scale = (const BN_C *)c->act_scale, *act_offset = (const BN_C *)c->act_offset;
    double *sum0 = c->acc, *sum1 = sum0 + c->nfeat, *sum2 = sum1 + c->nfeat;
    /* without dy, dy aliases x so that every pointer stays valid */
    const npy_intp op_dy = has_dy ? 1 : 0;
    const char *x = b->ptr[0], *dy = b->ptr[op_dy];
    const npy_intp xs0 = b->s0[0], ds0 = b->s0[op_dy];
    const npy_intp isz = (npy_intp)sizeof(BN_T);
    const int contiguous = b->s1[0] == isz && b->s1[op_dy] == isz;
    /* long from BN_LONG_ROW bytes, or half precision's rows of as many elements as float32's */
    const npy_intp long_row =
        isz < (npy_intp)sizeof(float) ? BN_LONG_ROW / (npy_intp)sizeof(float) * isz : BN_LONG_ROW;
    const int grouped =
        b->fs0 == 0 && !BN_NAME(rows_one_by_one)(b, BN_SHORT_ROW_REDUCE, long_row);
    const bn_param_walk pw = {c->pgamma, c->pbeta, b->p0, b->ps0, b->ps1};
    if (contiguous && b->fs1 == 1)
        BN_NAME(reduce_body)(b->n0, b->n1, x, xs0, isz, dy, ds0, isz, b->f0, b->fs0, 1, &pw,
                             b->ps1, shift, act_scale, act_offset, sum0, sum1, sum2, grouped,
                             flags);
    else if (contiguous && b->fs1 == 0 && b->ps1 == 1) /* layer norm's rows */
        BN_NAME(reduce_body)(b->n0, b->n1, x, xs0, isz, dy, ds0, isz, b->f0, b->fs0, 0, &pw, 1,
                             shift, act_scale, act_offset, sum0, sum1, sum2, grouped, flags);
    else if (contiguous && b->fs1 == 0)
        BN_NAME(reduce_body)(b->n0, b->n1, x, xs0, isz, dy, ds0, isz, b->f0, b->fs0, 0, &pw,
                             b->ps1, shift, act_scale, act_offset, sum0, sum1, sum2, grouped,
                             flags);
    else
        BN_NAME(reduce_body)(b->n0, b->n1, x, xs0, b->s1[0], dy, ds0, b->s1[op_dy], b->f0,
                             b->fs0, b->fs1, &pw, b->ps1, shift, act_scale, act_offset, sum0,
                             sum1, sum2, grouped, flags);
}

/* acc[l] += lanes[l] for a tile, as whole vectors: told so (omp simd), since after inlining GCC
 * no longer knew that acc is not the tile's own lanes and added them one by one (layer norm
 * backward (4096,1024) float32 took 6.6 ms on one thread against 2.2 for batch norm's). */
static BN_TARGET_ATTR BN_INLINE void BN_NAME(add_lanes)(double *restrict acc,
                                                       const double *restrict lanes)
{
#pragma omp simd
    for (npy_intp l = 0; l < BN_LANES; l++)
        acc[l] += lanes[l];
}

/* Elementwise: out = (x - shift) * scale + offset [+ dy * dyscale], in the data's
 * dtype, on `rows` rows of m <= BN_LANES elements starting at feature f (the rows share their
 * features).  The coefficients are loaded once for all the rows: streaming x and out through L1
 * evicts them, and reloading them for every row made this pass twice as slow as a copy.  All of a
 * row's tile is loaded before any of it is stored, so out may be x or dy itself (in place) and
 * the loops still vectorize.  stream: write with non-temporal stores (see streams_out). */
static BN_TARGET_ATTR BN_INLINE void BN_NAME(apply_tile)(
    npy_intp rows, npy_intp m, const char *x, npy_intp xs0, npy_intp xs1, const char *dy,
    npy_intp ds0, npy_intp ds1, char *out, npy_intp os0, npy_intp os1, npy_intp f, npy_intp fs1,
    npy_intp p, npy_intp ps1, const BN_C *restrict shift, const BN_C *restrict scale,
    const BN_C *restrict offset, const BN_C *restrict dyscale, const BN_C *restrict act_scale,
    const BN_C *restrict act_offset, const BN_C *restrict pgamma, const BN_C *restrict pbeta,
    double *restrict pacc, npy_intp nparam, const int flags, const int stream)
{
    const int has_dy = flags & BN_HAS_DY, relu = flags & BN_RELU, params = flags & BN_PARAMS;
    /* the mask's and (with parameters) x-hat's coefficients, which backward needs */
    const int act = has_dy && (relu || params);
    BN_C k[BN_LANES], s[BN_LANES], o[BN_LANES], d[BN_LANES], as[BN_LANES], ao[BN_LANES];
    BN_C pg[BN_LANES], pb[BN_LANES];
    for (npy_intp l = 0; l < m; l++) {
        const npy_intp g = f + l * fs1;
        k[l] = shift[g];
        s[l] = scale[g];
        o[l] = offset[g];
        d[l] = has_dy ? dyscale[g] : 0;
        as[l] = act ? act_scale[g] : 0;
        ao[l] = act ? act_offset[g] : 0;
        pg[l] = params ? pgamma[p + l * ps1] : 0;
        pb[l] = params ? pbeta[p + l * ps1] : 0;
    }
    /* backward's per-parameter sums of dy and dy * x-hat over the tile's rows, per lane */
    double dbeta[BN_LANES] = {0}, dgamma[BN_LANES] = {0};
    for (npy_intp r = 0; r < rows; r++) {
        /* the row's elements as stored, then converted: memory and conversion in loops of their
         * own, which vectorize (a load that converts did not, for half precision) */
        BN_T t[BN_LANES];
        BN_C v[BN_LANES];
#ifdef BN_WIDEN_TILE
        /* the whole tile converted at once, so that the loop below computes on BN_C alone; a
         * partial tile's lanes past m are zeros, computed and never stored */
        BN_C xc[BN_LANES], dyc[BN_LANES];
        BN_TILE_READ(xc, x + r * xs0, xs1, m);
        if (has_dy)
            BN_TILE_READ(dyc, dy + r * ds0, ds1, m);
#define BN_XV(l) xc[l]
#define BN_DYV(l) dyc[l]
#else
        BN_T xr[BN_LANES], dyr[BN_LANES];
        for (npy_intp l = 0; l < m; l++)
            memcpy(&xr[l], x + r * xs0 + l * xs1, sizeof(BN_T));
        if (has_dy)
            for (npy_intp l = 0; l < m; l++)
                memcpy(&dyr[l], dy + r * ds0 + l * ds1, sizeof(BN_T));
#define BN_XV(l) BN_WIDEN(xr[l])
#define BN_DYV(l) BN_WIDEN(dyr[l])
#endif
#pragma omp simd
        for (npy_intp l = 0; l < m; l++) {
            const BN_C xv = BN_XV(l);
            v[l] = (xv - k[l]) * s[l] + o[l];
            if (has_dy && params) {
                BN_C dyv = BN_DYV(l);
                const BN_C xhat = (xv - k[l]) * as[l] + ao[l];
                if (relu)
                    dyv = BN_NAME(relu_grad)(dyv, xhat * pg[l] + pb[l]);
                v[l] += dyv * d[l] * pg[l];
                dbeta[l] += (double)dyv;
                dgamma[l] += (double)dyv * (double)xhat;
            } else if (has_dy) {
                BN_C dyv = BN_DYV(l);
                if (relu)
                    dyv = BN_NAME(relu_grad)(dyv, (xv - k[l]) * as[l] + ao[l]);
                v[l] += dyv * d[l];
            } else {
                if (params)
                    v[l] = v[l] * pg[l] + pb[l];
                if (relu)
                    v[l] = v[l] < 0 ? 0 : v[l]; /* max(0, v), NaN kept */
            }
#ifndef BN_NARROW_TILE
            t[l] = BN_NARROW(v[l]);
#endif
        }
#undef BN_XV
#undef BN_DYV
        char *orow = out + r * os0;
#ifdef BN_NARROW_TILE
        if (!stream && m == BN_LANES && os1 == (npy_intp)sizeof(BN_T)) { /* straight to memory */
            BN_NARROW_TILE(v, orow);
            continue;
        }
        for (npy_intp l = 0; l < BN_LANES; l++)
            if (l >= m)
                v[l] = 0;
        BN_NARROW_TILE(v, t);
#endif
        if (stream) {
            BN_KEEP_IN_MEMORY(t);
            stream_store(orow, t, (size_t)m * sizeof(BN_T));
        }
        else
            for (npy_intp l = 0; l < m; l++)
                memcpy(orow + l * os1, &t[l], sizeof(BN_T));
    }
    if (has_dy && params) {
        /* in lane order: the same sums however the block was cut into pieces' blocks */
        if (ps1 == 1 && m == BN_LANES) { /* layer norm's rows: whole vectors */
            BN_NAME(add_lanes)(pacc + p, dbeta);
            BN_NAME(add_lanes)(pacc + nparam + p, dgamma);
        } else if (ps1 != 0) {
            for (npy_intp l = 0; l < m; l++) {
                pacc[p + l * ps1] += dbeta[l];
                pacc[nparam + p + l * ps1] += dgamma[l];
            }
        } else {
            double tb = 0, tg = 0;
            for (npy_intp l = 0; l < m; l++) {
                tb += dbeta[l];
                tg += dgamma[l];
            }
            pacc[p] += tb;
            pacc[nparam + p] += tg;
        }
    }
}

static BN_TARGET_ATTR BN_INLINE void BN_NAME(apply_body)(
    npy_intp n0, npy_intp n1, const char *x, npy_intp xs0, npy_intp xs1, const char *dy,
    npy_intp ds0, npy_intp ds1, char *out, npy_intp os0, npy_intp os1, npy_intp f0, npy_intp fs0,
    npy_intp fs1, npy_intp p0, npy_intp ps0, npy_intp ps1, const bn_coefs *c,
    const npy_intp group, const int flags, const int stream)
{
    /* in locals: a store through out (a char *) would otherwise make GCC reload them */
    const BN_C *shift = (const BN_C *)c->shift, *scale = (const BN_C *)c->scale;
    const BN_C *offset = (const BN_C *)c->offset;
    const BN_C *dyscale = (const BN_C *)c->dyscale;
    const BN_C *act_scale = (const BN_C *)c->act_scale, *act_offset = (const BN_C *)c->act_offset;
    const BN_C *pgamma = (const BN_C *)c->pgamma, *pbeta = (const BN_C *)c->pbeta;
    double *pacc = c->pacc;
    const npy_intp nparam = c->nparam;
    /* the rows of a group share their coefficients: a group of them per tile */
    for (npy_intp i = 0; i < n0; i += group) {
        const npy_intp rows = n0 - i < group ? n0 - i : group;
        const char *xrow = x + i * xs0, *dyrow = dy + i * ds0;
        char *orow = out + i * os0;
        const npy_intp frow = f0 + i * fs0, prow = p0 + i * ps0;
        npy_intp j = 0;
        /* full tiles apart, so that their length is a constant GCC vectorizes */
        for (; j + BN_LANES <= n1; j += BN_LANES)
            BN_NAME(apply_tile)(rows, BN_LANES, xrow + j * xs1, xs0, xs1, dyrow + j * ds1, ds0, ds1,
                                orow + j * os1, os0, os1, frow + j * fs1, fs1, prow + j * ps1,
                                ps1, shift, scale, offset, dyscale, act_scale, act_offset,
                                pgamma, pbeta, pacc, nparam, flags, stream);
        if (j < n1)
            BN_NAME(apply_tile)(rows, n1 - j, xrow + j * xs1, xs0, xs1, dyrow + j * ds1, ds0, ds1,
                                orow + j * os1, os0, os1, frow + j * fs1, fs1, prow + j * ps1,
                                ps1, shift, scale, offset, dyscale, act_scale, act_offset,
                                pgamma, pbeta, pacc, nparam, flags, stream);
    }
}

/* Whether an elementwise pass writes its output with non-temporal stores: when it touches more
 * than BN_STREAM_OUT bytes (BN_STREAM_OUT_SHORT_ROWS for short rows) and every tile of the output
 * covers whole cache lines.  On the machine we measured, a row mixing such stores with plain
 * ones, or an output sharing lines with the input (in place), runs slower than plain stores alone
 * (normalize (4096,1024) float32 on one thread, output 32 bytes past a line: 0.80 ms plain,
 * 2.0 ms mixed; aligned: 0.66 ms). */
static BN_TARGET_ATTR BN_INLINE int
BN_NAME(streams_out)(const bn_block *b, const char *out, npy_intp op_out)
{
    const npy_intp isz = (npy_intp)sizeof(BN_T);
    const npy_intp limit =
        b->n1 * isz <= BN_SHORT_ROW_APPLY ? BN_STREAM_OUT_SHORT_ROWS : BN_STREAM_OUT;
    return b->pass_size * isz * (op_out + 1) > limit && b->s1[op_out] == isz &&
           b->n1 * isz % BN_LINE == 0 && b->s0[op_out] % BN_LINE == 0 &&
           (uintptr_t)out % BN_LINE == 0 && out != b->ptr[0] /* x */ &&
           out != b->ptr[op_out - 1] /* dy, or x again */;
}

static BN_TARGET_ATTR BN_INLINE void
BN_NAME(apply)(const bn_block *b, const bn_coefs *c, const int flags)
{
    const int has_dy = flags & BN_HAS_DY;
    const npy_intp op_dy = has_dy ? 1 : 0, op_out = has_dy ? 2 : 1;
    const char *x = b->ptr[0], *dy = b->ptr[op_dy];
    char *out = b->ptr[op_out];
    const npy_intp isz = (npy_intp)sizeof(BN_T);
    const int contiguous = b->s1[0] == isz && b->s1[op_dy] == isz && b->s1[op_out] == isz;
    const int stream = BN_NAME(streams_out)(b, out, op_out);
    /* Rows side by side: BN_ROWS, or 2 when rows are a multiple of BN_L1_WAY bytes apart: x, dy
     * and out in each of 4 such rows are 12 lines in one set of an 8-way L1, which evict each
     * other (float64 with 1024 features, in cache: normalize 197 -> 95 us, backward_apply
     * 360 -> 133 us with 2 rows instead of 4; other rows gain from 4: (8,112,112,32) float32
     * normalize on one thread about 10%, (32,64) float64 0.98 -> 0.90 us). */
    npy_intp group = 1;
    if (b->fs0 == 0 && (!(flags & BN_PARAMS) || b->ps0 == 0) &&
        !BN_NAME(rows_one_by_one)(b, BN_SHORT_ROW_APPLY, BN_LONG_ROW)) {
        group = BN_ROWS;
        for (npy_intp k = 0; k <= op_out; k++)
            if (b->s0[k] % BN_L1_WAY == 0)
                group = 2;
    }
    const npy_intp p0 = b->p0, ps0 = b->ps0;
    if (contiguous && b->fs1 == 1)
        BN_NAME(apply_body)(b->n0, b->n1, x, b->s0[0], isz, dy, b->s0[op_dy], isz, out,
                            b->s0[op_out], isz, b->f0, b->fs0, 1, p0, ps0, b->ps1, c, group, flags,
                            stream);
    else if (contiguous && b->fs1 == 0 && b->ps1 == 1) /* layer norm's rows */
        BN_NAME(apply_body)(b->n0, b->n1, x, b->s0[0], isz, dy, b->s0[op_dy], isz, out,
                            b->s0[op_out], isz, b->f0, b->fs0, 0, p0, ps0, 1, c, group, flags,
                            stream);
    else if (contiguous && b->fs1 == 0)
        BN_NAME(apply_body)(b->n0, b->n1, x, b->s0[0], isz, dy, b->s0[op_dy], isz, out,
                            b->s0[op_out], isz, b->f0, b->fs0, 0, p0, ps0, b->ps1, c, group, flags,
                            stream);
    else
        BN_NAME(apply_body)(b->n0, b->n1, x, b->s0[0], b->s1[0], dy, b->s0[op_dy], b->s1[op_dy],
                            out, b->s0[op_out], b->s1[op_out], b->f0, b->fs0, b->fs1, p0, ps0,
                            b->ps1, c, group, flags, stream);
    if (stream)
        stream_fence();
}

/* n packed elements as float64 (exactly: every BN_T is a double). */
static BN_TARGET_ATTR void BN_NAME(widen)(const char *src, double *dst, npy_intp n)
{
    for (npy_intp i = 0; i < n; i++)
        dst[i] = (double)BN_NAME(load)(src + i * (npy_intp)sizeof(BN_T));
}

/* The entry points, compiled for the target: the helpers above are inlined into them and so
 * compiled for it too. */
static BN_TARGET_ATTR void BN_NAME(stats)(const bn_block *b, const bn_coefs *c)
{
    BN_NAME(reduce)(b, c, 0);
}

static BN_TARGET_ATTR void BN_NAME(bwd_sums)(const bn_block *b, const bn_coefs *c)
{
    BN_NAME(reduce)(b, c, BN_HAS_DY);
}

static BN_TARGET_ATTR void BN_NAME(bwd_sums_relu)(const bn_block *b, const bn_coefs *c)
{
    BN_NAME(reduce)(b, c, BN_HAS_DY | BN_RELU);
}

static BN_TARGET_ATTR void BN_NAME(normalize)(const bn_block *b, const bn_coefs *c)
{
    BN_NAME(apply)(b, c, 0);
}

static BN_TARGET_ATTR void BN_NAME(normalize_relu)(const bn_block *b, const bn_coefs *c)
{
    BN_NAME(apply)(b, c, BN_RELU);
}

static BN_TARGET_ATTR void BN_NAME(bwd_apply)(const bn_block *b, const bn_coefs *c)
{
    BN_NAME(apply)(b, c, BN_HAS_DY);
}

static BN_TARGET_ATTR void BN_NAME(bwd_apply_relu)(const bn_block *b, const bn_coefs *c)
{
    BN_NAME(apply)(b, c, BN_HAS_DY | BN_RELU);
}

/* layer and RMS norm's: per-parameter gamma and beta */
static BN_TARGET_ATTR void BN_NAME(params_normalize)(const bn_block *b, const bn_coefs *c)
{
    BN_NAME(apply)(b, c, BN_PARAMS);
}

static BN_TARGET_ATTR void BN_NAME(params_normalize_relu)(const bn_block *b, const bn_coefs *c)
{
    BN_NAME(apply)(b, c, BN_PARAMS | BN_RELU);
}

static BN_TARGET_ATTR void BN_NAME(params_bwd_sums)(const bn_block *b, const bn_coefs *c)
{
    BN_NAME(reduce)(b, c, BN_PARAMS | BN_HAS_DY);
}

static BN_TARGET_ATTR void BN_NAME(params_bwd_sums_relu)(const bn_block *b, const bn_coefs *c)
{
    BN_NAME(reduce)(b, c, BN_PARAMS | BN_HAS_DY | BN_RELU);
}

static BN_TARGET_ATTR void BN_NAME(params_bwd_apply)(const bn_block *b, const bn_coefs *c)
{
    BN_NAME(apply)(b, c, BN_PARAMS | BN_HAS_DY);
}

static BN_TARGET_ATTR void BN_NAME(params_bwd_apply_relu)(const bn_block *b, const bn_coefs *c)
{
    BN_NAME(apply)(b, c, BN_PARAMS | BN_HAS_DY | BN_RELU);
}

const bn_dtype_kernels BN_NAME(bn_kernels) = {
    BN_NAME(stats),          BN_NAME(bwd_sums),       BN_NAME(normalize), BN_NAME(bwd_apply),
    BN_NAME(normalize_relu), BN_NAME(bwd_sums_relu), BN_NAME(bwd_apply_relu),
    {BN_NAME(params_normalize), BN_NAME(params_normalize_relu)},
    {BN_NAME(params_bwd_sums), BN_NAME(params_bwd_sums_relu)},
    {BN_NAME(params_bwd_apply), BN_NAME(params_bwd_apply_relu)},
    BN_NAME(widen),          sizeof(BN_T),            sizeof(BN_C),
};

#undef BN_TILE_READ
#undef BN_TILE_AT
