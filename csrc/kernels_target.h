/* kernels_impl.h for every dtype, compiled for the target that kernels.c has defined:
 * BN_TARGET_ATTR (a function attribute) and BN_SUFFIX (the target in the kernels' names).
 * BN_TNAME names the dtype in the kernels' names. */

/* rstd = 1 / sqrt(var + eps) per feature: square root and division are exact-rounded in IEEE
 * arithmetic, so every target gives the same bits, the wider ones sooner (64 features in 2 us
 * calls: 0.2 us with SSE2's two lanes). */
static BN_TARGET_ATTR void BN_CAT(rstd, all, BN_SUFFIX)(const double *var, double eps,
                                                         double *rstd, npy_intp n)
{
    for (npy_intp i = 0; i < n; i++)
        rstd[i] = 1.0 / sqrt(var[i] + eps);
}

#define BN_T float
#define BN_C float
#define BN_TNAME float
#define BN_WIDEN(v) (v)
#define BN_NARROW(v) (v)
#include "kernels_impl.h"
#undef BN_T
#undef BN_C
#undef BN_TNAME

#define BN_T double
#define BN_C double
#define BN_TNAME double
#include "kernels_impl.h"
#undef BN_T
#undef BN_C
#undef BN_TNAME
#undef BN_WIDEN
#undef BN_NARROW

/* half precision: stored in 2 bytes, computed in float32 */
#define BN_T uint16_t
#define BN_C float
#define BN_TNAME float16
#define BN_WIDEN(v) f16_to_f32(v)
#define BN_NARROW(v) f32_to_f16(v)
#include "kernels_impl.h"
#undef BN_TNAME
#undef BN_WIDEN
#undef BN_NARROW

#define BN_TNAME bfloat16
#define BN_WIDEN(v) bf16_to_f32(v)
#define BN_NARROW(v) f32_to_bf16(v)
#include "kernels_impl.h"
#undef BN_T
#undef BN_C
#undef BN_TNAME
#undef BN_WIDEN
#undef BN_NARROW
