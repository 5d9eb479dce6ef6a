/* The iteration scheme: one way to walk any number of strided arrays of one shape.
 *
 * Features are numbered 0..F-1 in C order of the kept axes.  Every pass walks the same N-d box;
 * each dimension carries a byte stride per operand and a "feature stride" (how far the feature
 * number moves along it, 0 on batch dimensions), so a reduction and an elementwise pass see any
 * layout the same way.  The innermost two dimensions form a 2-D block handed to a kernel; the
 * rest are walked by an odometer.  The box is cut into pieces that the pool's threads take.
 * No part of this needs the GIL or the Python C API.
 */
#ifndef BNORM_ITER_H
#define BNORM_ITER_H

#include "kernels.h"

#define BN_MAXDIMS 64 /* NumPy 2 allows 64 dimensions */

/* The box that a pass walks, built by bn_plan_init from the arrays' shape and strides. */
typedef struct {
    npy_intp ndim; /* >= 2 after bn_plan_init */
    npy_intp nops;
    npy_intp shape[BN_MAXDIMS];
    npy_intp fstride[BN_MAXDIMS];
    npy_intp pstride[BN_MAXDIMS]; /* the parameter number's, as fstride (0 without parameters) */
    npy_intp stride[BN_MAXOPS][BN_MAXDIMS];
    char *data[BN_MAXOPS];
    npy_intp fbase; /* feature number of the box's first element */
    npy_intp pbase; /* its parameter number */
    npy_intp size;  /* elements in the box */
} bn_plan;

/* Build a plan over arrays of the given shape: strides[k] are operand k's byte strides, fstride
 * the feature stride of every dimension (0 on batch dimensions), pstride the parameter number's
 * (NULL: none; layer norm's parameters are per element of the normalized axes, its features
 * the other axes').  In named steps: drop length-1 dimensions, turn negative strides of operand
 * 0 around, order dimensions from the largest strides to the smallest, merge dimensions that are
 * contiguous in every operand and in both numberings, pad to 2-D. */
void bn_plan_init(bn_plan *plan, npy_intp ndim, const npy_intp *shape, const npy_intp *fstride,
                  const npy_intp *pstride, npy_intp nops, char *const *data,
                  const npy_intp *const *strides);

/* Run a kernel over the plan.  For a reduction (coefs->acc or coefs->pacc != NULL) the
 * accumulators must be zeroed; the work is split into pieces that depend only on the plan, never on the thread count,
 * and partial sums are added in a fixed order, so results are bitwise reproducible.
 * Returns 0, or -1 if memory for partial sums could not be had.  Call without the GIL. */
int bn_run(const bn_plan *plan, bn_kernel kernel, const bn_coefs *coefs);

/* Copy each feature's first batch element of x (shape/strides of the kept axes, in order) to
 * dst, packed: the shift that the statistics pass subtracts.  itemsize: 2, 4 or 8 bytes. */
void bn_gather_first(npy_intp nkept, const npy_intp *fshape, const npy_intp *fstrides,
                     const char *data, size_t itemsize, char *dst);

#endif
