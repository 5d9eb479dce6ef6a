/* kernels_impl.h for every dtype, compiled for the target that kernels.c has defined:
 * BN_TARGET_ATTR (a function attribute) and BN_SUFFIX (the target in the kernels' names). */
#define BN_T float
#include "kernels_impl.h"
#undef BN_T

#define BN_T double
#include "kernels_impl.h"
#undef BN_T
