/* bnorm kernels: one iteration scheme over strided arrays, and four passes that batch norm is
 * made of, generated for float32 and float64 from kernels_impl.h.
 *
 * Features are numbered 0..F-1 in C order of the kept axes.  Every pass walks the same N-d box;
 * each dimension carries a byte stride per operand and a "feature stride" (how far the feature
 * number moves along it, 0 on batch dimensions), so a reduction and an elementwise pass see any
 * layout the same way.  The innermost two dimensions form a 2-D block handed to a kernel; the
 * rest are walked by an odometer.  No part of this file needs the GIL or the Python C API.
 */
#ifndef BNORM_KERNELS_H
#define BNORM_KERNELS_H

#include <stddef.h>

#ifndef NPY_NO_DEPRECATED_API
#define NPY_NO_DEPRECATED_API NPY_1_25_API_VERSION
#endif
#include <numpy/npy_common.h>

#define BN_MAXDIMS 64 /* NumPy 2 allows 64 dimensions */
#define BN_MAXOPS 3   /* x, dy, out */

/* Accumulators per feature that a reduction pass fills (all float64). */
enum { BN_ACC_SUM0, BN_ACC_SUM1, BN_ACC_SUM2, BN_NACC };

/* The box that a pass walks, built by bn_plan_init from the arrays' shape and strides. */
typedef struct {
    npy_intp ndim; /* >= 2 after bn_plan_init */
    npy_intp nops;
    npy_intp shape[BN_MAXDIMS];
    npy_intp fstride[BN_MAXDIMS];
    npy_intp stride[BN_MAXOPS][BN_MAXDIMS];
    char *data[BN_MAXOPS];
    npy_intp fbase; /* feature number of the box's first element */
    npy_intp size;  /* elements in the box */
} bn_plan;

/* One 2-D block: n0 rows of n1 elements. */
typedef struct {
    npy_intp n0, n1;
    char *ptr[BN_MAXOPS];
    npy_intp s0[BN_MAXOPS], s1[BN_MAXOPS];
    npy_intp f0, fs0, fs1;
    npy_intp pass_size; /* elements in the whole pass (whether they stay in cache) */
} bn_block;

/* Per-feature vectors a pass reads (in the data's dtype) or fills (acc, float64, BN_NACC * nfeat).
 * The elementwise passes compute  out = (x - shift) * scale + offset [+ dy * dyscale]: shift is
 * the mean rounded to the data's dtype, so that x - shift is exact for data near the mean, also
 * far from zero; the mean's low bits, which the dtype cannot hold, are folded into offset. */
typedef struct {
    const void *shift, *scale, *offset, *dyscale;
    double *acc;
    npy_intp nfeat;
} bn_coefs;

typedef void (*bn_kernel)(const bn_block *block, const bn_coefs *coefs);

/* The passes, per dtype.  Operands (plan order): stats: x.  bwd_sums: x, dy.  normalize: x, out.
 * bwd_apply: x, dy, out. */
typedef struct {
    bn_kernel stats;     /* SUM0 += x - shift, SUM1 += (x - shift)^2 */
    bn_kernel bwd_sums;  /* SUM0 += dy, SUM1 += dy * (x - shift), SUM2 += x - shift */
    bn_kernel normalize; /* out = (x - shift) * scale + offset */
    bn_kernel bwd_apply; /* out = (x - shift) * scale + offset + dy * dyscale */
    size_t itemsize;
} bn_dtype_kernels;

extern const bn_dtype_kernels bn_kernels_float;
extern const bn_dtype_kernels bn_kernels_double;

/* Build a plan over arrays of the given shape: strides[k] are operand k's byte strides, fstride
 * the feature stride of every dimension (0 on batch dimensions).  Drops length-1 dimensions,
 * turns negative strides of operand 0 around, orders dimensions from the largest strides to the
 * smallest and merges dimensions that are contiguous in every operand. */
void bn_plan_init(bn_plan *plan, npy_intp ndim, const npy_intp *shape, const npy_intp *fstride,
                  npy_intp nops, char *const *data, const npy_intp *const *strides);

/* Run a kernel over the plan.  For a reduction (coefs->acc != NULL) the accumulators must be
 * zeroed; the work is split into pieces that depend only on the plan, never on the thread count,
 * and partial sums are added in a fixed order, so results are bitwise reproducible.
 * Returns 0, or -1 if memory for partial sums could not be had.  Call without the GIL. */
int bn_run(const bn_plan *plan, bn_kernel kernel, const bn_coefs *coefs);

/* Copy each feature's first batch element of x (shape/strides of the kept axes, in order) to
 * dst, packed: the shift that the statistics pass subtracts.  itemsize: a float's or a double's. */
void bn_gather_first(npy_intp nkept, const npy_intp *fshape, const npy_intp *fstrides,
                     const char *data, size_t itemsize, char *dst);

/* Threads the passes may use (>= 1), and the default: the CPUs this process may run on.
 * bn_threads_init registers the fork handlers: call it once, returns 0 or an errno value. */
int bn_threads_init(void);
npy_intp bn_default_num_threads(void);
npy_intp bn_get_num_threads(void);
void bn_set_num_threads(npy_intp n);

#endif
