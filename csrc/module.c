/* bnorm._bnorm: the entry points, the result objects they return, and the method table.
 *
 * Top-down, an entry point binds its arguments (args.c: a spec per function, converters, the
 * arrays checked), runs the passes without the GIL (passes.c, over iter.c's plans and kernels.c's
 * kernels on pool.c's threads), and turns per-feature results into arrays.  Every check happens
 * before anything is written, so a raised exception leaves every argument as it was.
 */
#define BN_IMPORTS_ARRAY /* import_array fills NumPy's C API table here, for every file */
#include "args.h"

#include <stdlib.h>
#include <string.h>

#include "buffers.h"
#include "caches.h"
#include "pool.h"

#define RUN_WITHOUT_GIL(failed, steps)                                                             \
    do {                                                                                           \
        Py_BEGIN_ALLOW_THREADS;                                                                    \
        failed = (steps);                                                                          \
        Py_END_ALLOW_THREADS;                                                                      \
        if (failed)                                                                                \
            PyErr_NoMemory();                                                                      \
    } while (0)

/* ---- result objects ---- */

/* A new array of shape dims holding values (one per element, in C order): filled_array for
 * float32 or float64 (type_num), written directly; values_array in descr's dtype, float32 and
 * float64 the same way (the usual case, without NumPy's casting machinery, a third of a small
 * call's time), others (float16, bfloat16, long double, swapped) cast. */
static PyArrayObject *filled_array(npy_intp nd, const npy_intp *dims, int type_num,
                                   const double *values)
{
    PyArrayObject *a = (PyArrayObject *)PyArray_SimpleNew(nd, (npy_intp *)dims, type_num);
    if (a) {
        char *data = PyArray_BYTES(a);
        const size_t itemsize = (size_t)PyArray_ITEMSIZE(a);
        const npy_intp n = PyArray_SIZE(a);
        for (npy_intp i = 0; i < n; i++)
            bn_store_as(data, i, values[i], itemsize);
    }
    return a;
}

static PyArrayObject *values_array(npy_intp nd, const npy_intp *dims, PyArray_Descr *descr,
                                   const double *values)
{
    const int type_num = descr->type_num;
    if ((type_num == NPY_FLOAT || type_num == NPY_DOUBLE) && PyArray_ISNBO(descr->byteorder))
        return filled_array(nd, dims, type_num, values);
    PyArrayObject *tmp = (PyArrayObject *)PyArray_SimpleNewFromData(nd, (npy_intp *)dims,
                                                                    NPY_DOUBLE, (void *)values);
    if (!tmp)
        return NULL;
    Py_INCREF(descr); /* PyArray_CastToType steals it */
    PyArrayObject *cast = (PyArrayObject *)PyArray_CastToType(tmp, descr, 0);
    Py_DECREF(tmp);
    return cast;
}

/* values in a new float32 or float64 (type_num) array of shape F */
static PyArrayObject *feature_array(const bn_layout *L, int type_num, const double *values)
{
    return filled_array(L->nkept, L->fshape, type_num, values);
}

/* momentum * r + (1 - momentum) * batch_scale * batch, computed in float64 and cast to r's own
 * dtype and shape (F or keepdims), as a new array: the cast can raise (a float16 statistic overflowing under np.errstate(over="raise") or
 * with warnings as errors), so it is done before anything is written; the copy into r at the end
 * is between equal dtypes and cannot. */
static PyArrayObject *new_running(PyObject *obj, const double *batch, double batch_scale,
                                  double momentum, const bn_layout *L, double *work)
{
    if (per_feature(obj, "running statistic", L, 1, 0.0, work, NULL) < 0)
        return NULL;
    bn_running_update(work, batch, batch_scale, momentum, L->nfeat);
    PyArrayObject *r = (PyArrayObject *)obj;
    return values_array(PyArray_NDIM(r), PyArray_DIMS(r), PyArray_DESCR(r), work);
}

/* Write new_running's result into r (same dtype and shape: cannot fail but for memory). */
static int store_running(PyObject *r, PyArrayObject *values)
{
    PyArrayObject *dst = (PyArrayObject *)r;
    if (PyArray_IS_C_CONTIGUOUS(dst)) {
        memcpy(PyArray_DATA(dst), PyArray_DATA(values), (size_t)PyArray_NBYTES(values));
        return 0;
    }
    return PyArray_CopyInto(dst, values);
}

/* dgamma in gamma's shape: per-feature values summed over what gamma was broadcast over (a
 * keepdims gamma broadcasts over nothing: the values, in its shape).  The
 * sums get a buffer of their own: gamma can have more elements than there are features (a
 * length-1 axis of gamma broadcast to a length-0 feature axis), so no per-feature scratch fits. */
static PyArrayObject *sum_to_param(const bn_layout *L, PyArrayObject *param,
                                   PyArray_Descr *descr, const double *values)
{
    if (!param)
        return values_array(L->nkept, L->fshape, descr, values);
    const npy_intp n = PyArray_SIZE(param);
    npy_intp *map = PyMem_Malloc(sizeof(npy_intp) * (size_t)(L->nfeat ? L->nfeat : 1));
    double *work = PyMem_Calloc((size_t)(n ? n : 1), sizeof(double));
    if (!map || !work) {
        PyMem_Free(map);
        PyMem_Free(work);
        return (PyArrayObject *)PyErr_NoMemory();
    }
    npy_intp buffer[BN_MAXDIMS];
    const npy_intp *dims;
    const npy_intp nd = param_dims(L, param, &dims, buffer);
    broadcast_map(L, nd, dims, map);
    for (npy_intp f = 0; f < L->nfeat; f++)
        work[map[f]] += values[f];
    PyArrayObject *a = values_array(PyArray_NDIM(param), PyArray_DIMS(param), descr, work);
    PyMem_Free(map);
    PyMem_Free(work);
    return a;
}

/* dgamma's and dbeta's dtype (a new reference): x's; for half-precision x, gamma's when it is a
 * float array (mixed precision keeps float32 parameters, and their gradients with them, as
 * PyTorch does), else float32. */
static PyArray_Descr *param_grad_descr(const call *c, PyObject *gamma)
{
    if (!c->half_precision)
        return PyArray_DescrFromType(c->type_num);
    if (PyArray_Check(gamma)) {
        PyArray_Descr *descr = PyArray_DESCR((PyArrayObject *)gamma);
        if (PyDataType_ISFLOAT(descr) || is_bfloat16(descr)) {
            Py_INCREF(descr);
            return descr;
        }
    }
    return PyArray_DescrFromType(NPY_FLOAT);
}

/* ---- forward, backward ---- */

static const char forward_doc[] =
    "Batch-normalize ``x`` over every axis except the feature axes ``axis``.\n"
    "\n"
    "Returns ``(y, mean, rstd)``.  ``axis`` (int or tuple, negative allowed; ``()`` reduces\n"
    "over everything) names the feature axes that are kept; the feature shape ``F`` is their\n"
    "lengths in axis order.  ``mean`` and ``rstd = 1/sqrt(var + eps)`` have shape ``F`` and\n"
    "``x``'s dtype; with ``x`` they are all that ``backward`` needs.\n"
    "\n"
    "training=True: batch statistics, with the biased variance; it needs two or more values\n"
    "per feature (M >= 2: with one, ``y`` would be ``beta``, so it is a ValueError).  If\n"
    "``running_mean`` / ``running_var`` (writable float arrays of shape ``F``) are given they\n"
    "are updated in place as ``r = momentum * r + (1 - momentum) * batch_stat`` (momentum is\n"
    "the weight of the old value, as in the post and Keras; PyTorch's ``momentum=m`` is ours\n"
    "``1 - m``).  The running variance folds in the biased variance (``running_var_ddof=0``,\n"
    "the post, Keras, Flax) or the unbiased one, ``var * M / (M - 1)`` (``running_var_ddof=1``,\n"
    "PyTorch); normalization always uses the biased one.\n"
    "\n"
    "training=False: ``running_mean`` / ``running_var`` (shape ``F``) are required and used\n"
    "as the statistics; the returned ``mean`` equals ``running_mean``.\n"
    "\n"
    "``gamma`` / ``beta``: None (1 and 0), a scalar, or anything broadcasting to ``F``.\n"
    "Every per-feature argument may also come in ``x``'s keepdims shape (length 1 on the\n"
    "batch axes: ``(1, C, 1, 1)`` for NCHW with ``axis=1``); running statistics are updated\n"
    "in their own shape.\n"
    "``y = (x - mean) * (rstd * gamma) + beta`` (never folded to ``x * a + b``, which\n"
    "cancels for data far from zero).  Statistics are accumulated in float64 from shifted\n"
    "data, so float32 input far from zero (``1e4 + randn``) is normalized to float32\n"
    "precision.\n"
    "``out``: an array of ``x``'s shape and dtype to write ``y`` into (``out=x`` works in\n"
    "place).  ``activation=\"relu\"``: ``y = max(0, bn(x))`` in the same pass (pass the same\n"
    "``beta`` and ``activation`` to ``backward``); None: no activation.\n"
    "\n"
    "Errors (nothing is modified when one is raised): TypeError for non-float dtypes,\n"
    "AxisError for 0-d ``x`` or an axis out of range, ValueError for repeated axes, shapes\n"
    "that do not fit ``F``, fewer than two values per feature (M < 2) in training, missing\n"
    "running statistics when not training, read-only ``out`` or running statistics.  NaN and\n"
    "inf propagate only to the features they touch.";

typedef struct {
    PyObject *x, *gamma, *beta, *axis;
    double eps;
    int training;
    PyObject *running_mean, *running_var;
    double momentum;
    int running_var_ddof;
    int activation;
    PyObject *out;
} forward_args;

static bn_spec forward_spec = {
    "forward", 3, {
        BN_PARAM(forward_args, x, NULL, bn_to_object),
        BN_PARAM(forward_args, gamma, "None", bn_to_object),
        BN_PARAM(forward_args, beta, "None", bn_to_object),
        BN_PARAM(forward_args, axis, "-1", bn_to_object),
        BN_PARAM(forward_args, eps, "1e-08", bn_to_eps),
        BN_PARAM(forward_args, training, "True", bn_to_bool),
        BN_PARAM(forward_args, running_mean, "None", bn_to_object),
        BN_PARAM(forward_args, running_var, "None", bn_to_object),
        BN_PARAM(forward_args, momentum, "0.9", bn_to_momentum),
        BN_PARAM(forward_args, running_var_ddof, "0", bn_to_ddof),
        BN_PARAM(forward_args, activation, "None", bn_to_activation),
        BN_PARAM(forward_args, out, "None", bn_to_object),
    }, forward_doc};

static PyObject *bn_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames)
{
    forward_args a;
    if (bn_bind(&forward_spec, args, nargs, kwnames, &a) < 0)
        return NULL;
    call c = {0};
    bn_call *core = &c.core;
    bn_scratch *s = &core->s;
    PyObject *result = NULL;
    PyArrayObject *mean = NULL, *rstd = NULL, *new_rmean = NULL, *new_rvar = NULL;
    int failed;
    if (call_data(&c, a.x, NULL, a.axis, BN_AXIS_KEPT) < 0 || (a.training && call_require_batch(&c) < 0) ||
        per_feature(a.gamma, "gamma", &core->L, 0, 1.0, s->gamma, NULL) < 0 ||
        per_feature(a.beta, "beta", &core->L, 0, 0.0, s->beta, NULL) < 0)
        goto done;
    if (a.training) {
        if ((a.running_mean != Py_None &&
             check_running(a.running_mean, "running_mean", &core->L) < 0) ||
            (a.running_var != Py_None && check_running(a.running_var, "running_var", &core->L) < 0))
            goto done;
    } else if (a.running_mean == Py_None || a.running_var == Py_None) {
        PyErr_SetString(PyExc_ValueError,
                        "bnorm: training=False needs running_mean and running_var");
        goto done;
    } else if (per_feature(a.running_mean, "running_mean", &core->L, 1, 0.0, s->mean, NULL) < 0 ||
               per_feature(a.running_var, "running_var", &core->L, 1, 0.0, s->var, NULL) < 0) {
        goto done;
    }
    if (call_out(&c, a.out) < 0)
        goto done;
    RUN_WITHOUT_GIL(failed, a.training && bn_step_stats(core) < 0);
    if (failed)
        goto done;
    /* The running statistics' new values, before out is written (see new_running).  acc is free
     * once bn_step_stats has turned its sums into mean and var. */
    if (a.training && a.running_mean != Py_None &&
        !(new_rmean = new_running(a.running_mean, s->mean, 1.0, a.momentum, &core->L, s->acc)))
        goto done;
    if (a.training && a.running_var != Py_None) {
        /* ddof 1: PyTorch's unbiased running variance (training has M >= 2) */
        const double m = (double)core->L.m, to_unbiased = a.running_var_ddof ? m / (m - 1) : 1.0;
        new_rvar = new_running(a.running_var, s->var, to_unbiased, a.momentum, &core->L, s->acc);
        if (!new_rvar)
            goto done;
    }
    RUN_WITHOUT_GIL(failed,
                    bn_step_rstd(core, a.eps) < 0 || bn_step_normalize(core, a.activation) < 0);
    if (failed)
        goto done;
    mean = feature_array(&c.core.L, c.stats_type_num, s->mean);
    rstd = feature_array(&c.core.L, c.stats_type_num, s->rstd);
    PyObject *y = mean && rstd ? call_finish(&c) : NULL;
    if (!y ||
        (new_rmean && store_running(a.running_mean, new_rmean) < 0) ||
        (new_rvar && store_running(a.running_var, new_rvar) < 0))
        goto done;
    result = PyTuple_Pack(3, y, (PyObject *)mean, (PyObject *)rstd);
done:
    Py_XDECREF(mean);
    Py_XDECREF(rstd);
    Py_XDECREF(new_rmean);
    Py_XDECREF(new_rvar);
    call_clear(&c);
    return result;
}

static const char backward_doc[] =
    "Gradients of batch norm: returns ``(dx, dgamma, dbeta)``.\n"
    "\n"
    "``dy`` has ``x``'s shape; ``mean`` and ``rstd`` are what ``forward`` returned, ``gamma``\n"
    "what it got.  With ``xhat = (x - mean) * rstd`` and sums over the batch axes (``M``\n"
    "elements each): ``dbeta = sum(dy)``, ``dgamma = sum(dy * xhat)`` and\n"
    "\n"
    "* training=True: ``dx = gamma * rstd * (dy - dbeta / M - xhat * dgamma / M)``;\n"
    "* training=False (the statistics were constants): ``dx = gamma * rstd * dy``.\n"
    "\n"
    "``dgamma`` has ``gamma``'s shape (a scalar gamma gets a 0-d sum over everything it\n"
    "broadcast over; gamma None gives shape ``F``); ``dbeta`` has shape ``F``, or gamma's\n"
    "keepdims shape when gamma came in it.  Training needs M >= 2 as in ``forward``.  ``dy``\n"
    "of the other float dtype is cast to ``x``'s.  In training mode ``mean`` is taken to be the\n"
    "batch mean of ``x``: the small residual between it and the exact batch mean (a float32\n"
    "``mean`` is rounded) is recomputed in float64, so gradients stay float32-accurate for\n"
    "data far from zero.  ``out`` as in ``forward`` (``out=dy`` works in place).\n"
    "\n"
    "``activation=\"relu\"`` (with the ``beta`` forward got): the gradient through the fused\n"
    "ReLU, whose mask is recomputed from ``x``, ``mean``, ``rstd``, ``gamma`` and ``beta``\n"
    "(nothing was saved); ``beta`` is read only then.";

typedef struct {
    PyObject *dy, *x, *mean, *rstd, *gamma, *axis;
    int training;
    PyObject *beta;
    int activation;
    PyObject *out;
} backward_args;

static bn_spec backward_spec = {
    "backward", 5, {
        BN_PARAM(backward_args, dy, NULL, bn_to_object),
        BN_PARAM(backward_args, x, NULL, bn_to_object),
        BN_PARAM(backward_args, mean, NULL, bn_to_object),
        BN_PARAM(backward_args, rstd, NULL, bn_to_object),
        BN_PARAM(backward_args, gamma, "None", bn_to_object),
        BN_PARAM(backward_args, axis, "-1", bn_to_object),
        BN_PARAM(backward_args, training, "True", bn_to_bool),
        BN_PARAM(backward_args, beta, "None", bn_to_object),
        BN_PARAM(backward_args, activation, "None", bn_to_activation),
        BN_PARAM(backward_args, out, "None", bn_to_object),
    }, backward_doc};

static PyObject *bn_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    backward_args a;
    if (bn_bind(&backward_spec, args, nargs, kwnames, &a) < 0)
        return NULL;
    call c = {0};
    bn_call *core = &c.core;
    bn_scratch *s = &core->s;
    PyObject *result = NULL;
    PyArrayObject *gamma = NULL, *dgamma = NULL, *dbeta = NULL;
    int failed;
    if (call_data(&c, a.x, a.dy, a.axis, BN_AXIS_KEPT) < 0 || (a.training && call_require_batch(&c) < 0) ||
        required_per_feature(a.mean, "mean", &core->L, 0, s->mean) < 0 ||
        required_per_feature(a.rstd, "rstd", &core->L, 0, s->rstd) < 0 ||
        per_feature(a.gamma, "gamma", &core->L, 0, 1.0, s->gamma, &gamma) < 0 ||
        per_feature(a.beta, "beta", &core->L, 0, 0.0, s->beta, NULL) < 0 ||
        call_out(&c, a.out) < 0)
        goto done;
    RUN_WITHOUT_GIL(failed,
                    bn_step_bwd_sums(core, a.training, a.activation) < 0 ||
                        bn_step_bwd_apply(core, (double)core->L.m, a.training, a.activation) < 0);
    if (failed)
        goto done;
    /* dgamma = rstd * sum(dy * (x - mean)), dbeta = sum(dy) */
    PyArray_Descr *grad = param_grad_descr(&c, a.gamma);
    if (!grad)
        goto done;
    dgamma = sum_to_param(&core->L, gamma, grad, bn_step_dgamma(core));
    /* dbeta has shape F, or gamma's when gamma is F in keepdims shape (1, C, 1, 1) */
    const int keepdims = gamma && PyArray_NDIM(gamma) != core->L.nkept &&
                         has_feature_shape(&core->L, gamma);
    dbeta = values_array(keepdims ? PyArray_NDIM(gamma) : core->L.nkept,
                         keepdims ? PyArray_DIMS(gamma) : core->L.fshape, grad, s->acc);
    Py_DECREF(grad);
    PyObject *dx = dgamma && dbeta ? call_finish(&c) : NULL;
    if (dx)
        result = PyTuple_Pack(3, dx, (PyObject *)dgamma, (PyObject *)dbeta);
done:
    Py_XDECREF(gamma);
    Py_XDECREF(dgamma);
    Py_XDECREF(dbeta);
    call_clear(&c);
    return result;
}

/* ---- the split phases, for statistics over several workers (bnorm/phases.py) ---- */

static const char batch_stats_doc[] =
    "Local statistics of ``x`` per feature: ``(count, mean, m2)``.\n"
    "\n"
    "``count`` is the number of elements reduced per feature (an int, 0 for an empty batch),\n"
    "``mean`` and ``m2 = sum((x - mean)**2)`` are float64 arrays of the feature shape (zeros\n"
    "when count is 0).  Computed in one pass with float64 sums of shifted data: exact for\n"
    "float32 data far from zero.";

typedef struct {
    PyObject *x, *axis;
} batch_stats_args;

static bn_spec batch_stats_spec = {
    "batch_stats", 1, {
        BN_PARAM(batch_stats_args, x, NULL, bn_to_object),
        BN_PARAM(batch_stats_args, axis, "-1", bn_to_object),
    }, batch_stats_doc};

static PyObject *bn_batch_stats(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    batch_stats_args a;
    if (bn_bind(&batch_stats_spec, args, nargs, kwnames, &a) < 0)
        return NULL;
    call c = {0};
    PyObject *result = NULL;
    int failed = 0;
    if (call_data(&c, a.x, NULL, a.axis, BN_AXIS_KEPT) < 0)
        goto done;
    if (c.core.L.m > 0) {
        RUN_WITHOUT_GIL(failed, bn_step_stats(&c.core) < 0);
        if (failed)
            goto done;
    }
    bn_step_m2(&c.core);
    PyArrayObject *mean = feature_array(&c.core.L, NPY_DOUBLE, c.core.s.mean);
    PyArrayObject *m2 = feature_array(&c.core.L, NPY_DOUBLE, c.core.s.var);
    if (mean && m2)
        result = Py_BuildValue("nOO", (Py_ssize_t)c.core.L.m, mean, m2);
    Py_XDECREF(mean);
    Py_XDECREF(m2);
done:
    call_clear(&c);
    return result;
}

static const char normalize_doc[] =
    "``y = (x - mean) * rstd * gamma + beta`` with given per-feature ``mean`` and ``rstd``.\n"
    "\n"
    "``mean`` may be float64 even for float32 ``x``: its low bits are kept (``y`` is formed as\n"
    "``(x - round(mean)) * scale + (beta - residual * scale)``).  ``out`` and\n"
    "``activation`` as in ``bnorm.forward``.";

typedef struct {
    PyObject *x, *mean, *rstd, *gamma, *beta, *axis;
    int activation;
    PyObject *out;
} normalize_args;

static bn_spec normalize_spec = {
    "normalize", 5, {
        BN_PARAM(normalize_args, x, NULL, bn_to_object),
        BN_PARAM(normalize_args, mean, NULL, bn_to_object),
        BN_PARAM(normalize_args, rstd, NULL, bn_to_object),
        BN_PARAM(normalize_args, gamma, "None", bn_to_object),
        BN_PARAM(normalize_args, beta, "None", bn_to_object),
        BN_PARAM(normalize_args, axis, "-1", bn_to_object),
        BN_PARAM(normalize_args, activation, "None", bn_to_activation),
        BN_PARAM(normalize_args, out, "None", bn_to_object),
    }, normalize_doc};

static PyObject *bn_normalize(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames)
{
    normalize_args a;
    if (bn_bind(&normalize_spec, args, nargs, kwnames, &a) < 0)
        return NULL;
    call c = {0};
    bn_scratch *s = &c.core.s;
    PyObject *result = NULL;
    int failed;
    if (call_data(&c, a.x, NULL, a.axis, BN_AXIS_KEPT) < 0 ||
        required_per_feature(a.mean, "mean", &c.core.L, 0, s->mean) < 0 ||
        required_per_feature(a.rstd, "rstd", &c.core.L, 0, s->rstd) < 0 ||
        per_feature(a.gamma, "gamma", &c.core.L, 0, 1.0, s->gamma, NULL) < 0 ||
        per_feature(a.beta, "beta", &c.core.L, 0, 0.0, s->beta, NULL) < 0 ||
        call_out(&c, a.out) < 0)
        goto done;
    RUN_WITHOUT_GIL(failed, bn_step_normalize(&c.core, a.activation) < 0);
    if (!failed) {
        result = call_finish(&c);
        Py_XINCREF(result);
    }
done:
    call_clear(&c);
    return result;
}

static const char backward_sums_doc[] =
    "Local gradient sums per feature, float64: ``(sum(dy), sum(dy * (x - mean)))``.\n"
    "\n"
    "``mean`` is used as given (pass the global mean of a split batch).  After a forward with\n"
    "``activation=\"relu\"``, pass it here with that forward's ``rstd``, ``gamma`` and ``beta``:\n"
    "the sums are of ``dy`` through the ReLU's mask.";

typedef struct {
    PyObject *dy, *x, *mean, *axis, *rstd, *gamma, *beta;
    int activation;
} backward_sums_args;

static bn_spec backward_sums_spec = {
    "backward_sums", 3, {
        BN_PARAM(backward_sums_args, dy, NULL, bn_to_object),
        BN_PARAM(backward_sums_args, x, NULL, bn_to_object),
        BN_PARAM(backward_sums_args, mean, NULL, bn_to_object),
        BN_PARAM(backward_sums_args, axis, "-1", bn_to_object),
        BN_PARAM(backward_sums_args, rstd, "None", bn_to_object),
        BN_PARAM(backward_sums_args, gamma, "None", bn_to_object),
        BN_PARAM(backward_sums_args, beta, "None", bn_to_object),
        BN_PARAM(backward_sums_args, activation, "None", bn_to_activation),
    }, backward_sums_doc};

static PyObject *bn_backward_sums(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames)
{
    backward_sums_args a;
    if (bn_bind(&backward_sums_spec, args, nargs, kwnames, &a) < 0)
        return NULL;
    call c = {0};
    PyObject *result = NULL;
    int failed;
    bn_scratch *s = &c.core.s;
    if (call_data(&c, a.x, a.dy, a.axis, BN_AXIS_KEPT) < 0 ||
        required_per_feature(a.mean, "mean", &c.core.L, 0, s->mean) < 0 ||
        (a.activation && (required_per_feature(a.rstd, "rstd", &c.core.L, 0, s->rstd) < 0 ||
                          per_feature(a.gamma, "gamma", &c.core.L, 0, 1.0, s->gamma, NULL) < 0 ||
                          per_feature(a.beta, "beta", &c.core.L, 0, 0.0, s->beta, NULL) < 0)))
        goto done;
    RUN_WITHOUT_GIL(failed, bn_step_bwd_sums(&c.core, 0, a.activation) < 0);
    if (failed)
        goto done;
    const bn_layout *L = &c.core.L;
    PyArrayObject *sum_dy = feature_array(L, NPY_DOUBLE, c.core.s.acc);
    PyArrayObject *sum_dy_xmu = feature_array(L, NPY_DOUBLE, c.core.s.acc + L->nfeat);
    if (sum_dy && sum_dy_xmu)
        result = PyTuple_Pack(2, (PyObject *)sum_dy, (PyObject *)sum_dy_xmu);
    Py_XDECREF(sum_dy);
    Py_XDECREF(sum_dy_xmu);
done:
    call_clear(&c);
    return result;
}

static const char backward_apply_doc[] =
    "``dx`` of a training-mode batch norm from sums over the whole batch of ``count``\n"
    "elements per feature:\n"
    "``dx = gamma * rstd * (dy - sum_dy / count - xhat * rstd * sum_dy_xmu / count)`` with\n"
    "``xhat = (x - mean) * rstd``.  ``out``, ``beta`` and ``activation`` as in\n"
    "``bnorm.backward`` (the sums then through the ReLU's mask, from ``backward_sums``).";

typedef struct {
    PyObject *dy, *x, *mean, *rstd, *sum_dy, *sum_dy_xmu;
    double count;
    PyObject *gamma, *axis, *beta;
    int activation;
    PyObject *out;
} backward_apply_args;

static bn_spec backward_apply_spec = {
    "backward_apply", 8, {
        BN_PARAM(backward_apply_args, dy, NULL, bn_to_object),
        BN_PARAM(backward_apply_args, x, NULL, bn_to_object),
        BN_PARAM(backward_apply_args, mean, NULL, bn_to_object),
        BN_PARAM(backward_apply_args, rstd, NULL, bn_to_object),
        BN_PARAM(backward_apply_args, sum_dy, NULL, bn_to_object),
        BN_PARAM(backward_apply_args, sum_dy_xmu, NULL, bn_to_object),
        BN_PARAM(backward_apply_args, count, NULL, bn_to_count),
        BN_PARAM(backward_apply_args, gamma, "None", bn_to_object),
        BN_PARAM(backward_apply_args, axis, "-1", bn_to_object),
        BN_PARAM(backward_apply_args, beta, "None", bn_to_object),
        BN_PARAM(backward_apply_args, activation, "None", bn_to_activation),
        BN_PARAM(backward_apply_args, out, "None", bn_to_object),
    }, backward_apply_doc};

static PyObject *bn_backward_apply(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                   PyObject *kwnames)
{
    backward_apply_args a;
    if (bn_bind(&backward_apply_spec, args, nargs, kwnames, &a) < 0)
        return NULL;
    call c = {0};
    bn_scratch *s = &c.core.s;
    const bn_layout *L = &c.core.L;
    PyObject *result = NULL;
    int failed;
    if (call_data(&c, a.x, a.dy, a.axis, BN_AXIS_KEPT) < 0 ||
        required_per_feature(a.mean, "mean", L, 0, s->mean) < 0 ||
        required_per_feature(a.rstd, "rstd", L, 0, s->rstd) < 0 ||
        per_feature(a.gamma, "gamma", L, 0, 1.0, s->gamma, NULL) < 0 ||
        per_feature(a.beta, "beta", L, 0, 0.0, s->beta, NULL) < 0 ||
        required_per_feature(a.sum_dy, "sum_dy", L, 1, s->acc) < 0 ||
        required_per_feature(a.sum_dy_xmu, "sum_dy_xmu", L, 1, s->acc + L->nfeat) < 0 ||
        call_out(&c, a.out) < 0)
        goto done;
    RUN_WITHOUT_GIL(failed, bn_step_bwd_apply_given(&c.core, a.count, a.activation) < 0);
    if (!failed) {
        result = call_finish(&c);
        Py_XINCREF(result);
    }
done:
    call_clear(&c);
    return result;
}

/* ---- the normalization family: layer, RMS and group norm on the same passes ---- */

/* Layer and RMS norm need a value to normalize in each row (as batch norm's training a batch). */
static int require_normalized(const call *c)
{
    if (c->core.L.m == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "bnorm: no elements to normalize over (a normalized axis has length 0)");
        return -1;
    }
    return 0;
}

/* RMS norm's eps: None is the epsilon of x's dtype (PyTorch's default). */
static int rms_eps(PyObject *obj, const call *c, double *eps)
{
    if (obj != Py_None)
        return bn_to_eps(obj, eps, "eps");
    switch (c->type_num) {
    case NPY_DOUBLE:
        *eps = 2.220446049250313e-16; /* 2^-52 */
        break;
    case NPY_FLOAT:
        *eps = 1.1920928955078125e-07; /* 2^-23 */
        break;
    case NPY_HALF:
        *eps = 0.0009765625; /* 2^-10 */
        break;
    default: /* bfloat16 */
        *eps = 0.0078125; /* 2^-7 */
    }
    return 0;
}

/* num_groups: an int that divides the C channels. */
static int group_count(PyObject *obj, npy_intp C, npy_intp *G)
{
    const Py_ssize_t n = PyBool_Check(obj) ? -1 : PyNumber_AsSsize_t(obj, PyExc_OverflowError);
    if (n == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "bnorm: num_groups must be an int, got %R", obj);
        return -1;
    }
    if (n < 1 || C % n != 0) {
        PyErr_Format(PyExc_ValueError,
                     "bnorm: num_groups=%zd does not divide the %zd channels into groups", n,
                     (Py_ssize_t)C);
        return -1;
    }
    *G = n;
    return 0;
}

/* Group norm's per-(sample, group) statistics given to backward: shape (N, G) exactly. */
static int read_group_stats(PyObject *obj, const char *name, npy_intp N, npy_intp G,
                            double *dst)
{
    if (obj == Py_None) {
        PyErr_Format(PyExc_TypeError, "bnorm: %s is required (shape (N, num_groups)), got None",
                     name);
        return -1;
    }
    PyArrayObject *arr = (PyArrayObject *)PyArray_FromAny(obj, NULL, 0, 0, 0, NULL);
    if (!arr)
        return -1;
    if (PyArray_ISBOOL(arr) || !(PyArray_ISFLOAT(arr) || PyArray_ISINTEGER(arr) ||
                                 is_bfloat16(PyArray_DESCR(arr)))) {
        PyErr_Format(PyExc_TypeError, "bnorm: %s has dtype %R; expected real numbers", name,
                     (PyObject *)PyArray_DESCR(arr));
        Py_DECREF(arr);
        return -1;
    }
    const npy_intp want[2] = {N, G};
    if (PyArray_NDIM(arr) != 2 || !PyArray_CompareLists(PyArray_DIMS(arr), want, 2)) {
        PyObject *got = PyObject_GetAttrString((PyObject *)arr, "shape");
        if (got)
            PyErr_Format(PyExc_ValueError,
                         "bnorm: %s has shape %R, but the statistics' shape is (%zd, %zd)", name,
                         got, (Py_ssize_t)N, (Py_ssize_t)G);
        Py_XDECREF(got);
        Py_DECREF(arr);
        return -1;
    }
    PyArrayObject *dbl = (PyArrayObject *)PyArray_FromArray(
        arr, PyArray_DescrFromType(NPY_DOUBLE),
        NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_FORCECAST);
    Py_DECREF(arr);
    if (!dbl)
        return -1;
    memcpy(dst, PyArray_DATA(dbl), sizeof(double) * (size_t)(N * G));
    Py_DECREF(dbl);
    return 0;
}

static const char layer_norm_doc[] =
    "Layer norm: normalize ``x`` over the axes ``axis`` names; returns ``(y, mean, rstd)``.\n"
    "\n"
    "``axis`` (int or tuple) names the normalized axes, as every framework's layer norm does\n"
    "(PyTorch's ``normalized_shape=(H, W)`` is ``axis=(-2, -1)``); ConvNeXt's channels-first\n"
    "layer norm is ``axis=1``.  ``mean`` and ``rstd = 1/sqrt(var + eps)`` have ``x``'s shape\n"
    "without the normalized axes (x's dtype; float32 for half precision).  ``gamma`` / ``beta``:\n"
    "None, or anything broadcasting to the normalized axes' shape ``G`` (or x's keepdims shape).\n"
    "``y = (x - mean) * rstd * gamma + beta`` from float64 sums of shifted data.  ``out`` and\n"
    "``activation`` as in ``bnorm.forward``.";

typedef struct {
    PyObject *x, *gamma, *beta, *axis;
    double eps;
    int activation;
    PyObject *out;
} layer_norm_args;

static bn_spec layer_norm_spec = {
    "layer_norm", 3, {
        BN_PARAM(layer_norm_args, x, NULL, bn_to_object),
        BN_PARAM(layer_norm_args, gamma, "None", bn_to_object),
        BN_PARAM(layer_norm_args, beta, "None", bn_to_object),
        BN_PARAM(layer_norm_args, axis, "-1", bn_to_object),
        BN_PARAM(layer_norm_args, eps, "1e-05", bn_to_eps),
        BN_PARAM(layer_norm_args, activation, "None", bn_to_activation),
        BN_PARAM(layer_norm_args, out, "None", bn_to_object),
    }, layer_norm_doc};

/* y and the per-row statistics as the tuple (y, stats...) */
static PyObject *pack_forward(call *c, int nstats, const double *const *stats)
{
    PyObject *items[3] = {NULL, NULL, NULL};
    PyObject *result = NULL;
    for (int i = 0; i < nstats; i++)
        if (!(items[1 + i] = (PyObject *)feature_array(&c->core.L, c->stats_type_num, stats[i])))
            goto done;
    items[0] = call_finish(c);
    if (!items[0])
        goto done;
    Py_INCREF(items[0]);
    result = nstats == 2 ? PyTuple_Pack(3, items[0], items[1], items[2])
                         : PyTuple_Pack(2, items[0], items[1]);
done:
    for (int i = 0; i < 3; i++)
        Py_XDECREF(items[i]);
    return result;
}

static PyObject *bn_layer_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    layer_norm_args a;
    if (bn_bind(&layer_norm_spec, args, nargs, kwnames, &a) < 0)
        return NULL;
    call c = {0};
    bn_call *core = &c.core;
    PyObject *result = NULL;
    int failed;
    if (call_data(&c, a.x, NULL, a.axis, BN_AXIS_NORMALIZED) < 0 || require_normalized(&c) < 0 ||
        per_feature(a.gamma, "gamma", &c.P, 0, 1.0, core->p.gamma, NULL) < 0 ||
        per_feature(a.beta, "beta", &c.P, 0, 0.0, core->p.beta, NULL) < 0 ||
        call_out(&c, a.out) < 0)
        goto done;
    bn_params_prepare(core);
    RUN_WITHOUT_GIL(failed, bn_step_stats(core) < 0 || bn_step_rstd(core, a.eps) < 0 ||
                                bn_step_normalize(core, a.activation) < 0);
    if (!failed) {
        const double *stats[2] = {core->s.mean, core->s.rstd};
        result = pack_forward(&c, 2, stats);
    }
done:
    call_clear(&c);
    return result;
}

static const char rms_norm_doc[] =
    "RMS norm: ``y = x * rrms * gamma`` with ``rrms = 1/sqrt(mean(x**2 over axis) + eps)``;\n"
    "returns ``(y, rrms)``.  ``eps=None`` is ``np.finfo(x.dtype).eps`` (PyTorch's default).\n"
    "Axes, shapes and ``out`` as in ``bnorm.layer_norm``.";

typedef struct {
    PyObject *x, *gamma, *axis, *eps, *out;
} rms_norm_args;

static bn_spec rms_norm_spec = {
    "rms_norm", 2, {
        BN_PARAM(rms_norm_args, x, NULL, bn_to_object),
        BN_PARAM(rms_norm_args, gamma, "None", bn_to_object),
        BN_PARAM(rms_norm_args, axis, "-1", bn_to_object),
        BN_PARAM(rms_norm_args, eps, "None", bn_to_object),
        BN_PARAM(rms_norm_args, out, "None", bn_to_object),
    }, rms_norm_doc};

static PyObject *bn_rms_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    rms_norm_args a;
    if (bn_bind(&rms_norm_spec, args, nargs, kwnames, &a) < 0)
        return NULL;
    call c = {0};
    bn_call *core = &c.core;
    PyObject *result = NULL;
    double eps;
    int failed;
    if (call_data(&c, a.x, NULL, a.axis, BN_AXIS_NORMALIZED) < 0 || require_normalized(&c) < 0 ||
        rms_eps(a.eps, &c, &eps) < 0 ||
        per_feature(a.gamma, "gamma", &c.P, 0, 1.0, core->p.gamma, NULL) < 0 ||
        call_out(&c, a.out) < 0)
        goto done;
    bn_params_prepare(core); /* beta: zeros */
    RUN_WITHOUT_GIL(failed, bn_step_mean_square(core) < 0 || bn_step_rstd(core, eps) < 0 ||
                                bn_step_normalize(core, 0) < 0);
    if (!failed) {
        const double *stats[1] = {core->s.rstd};
        result = pack_forward(&c, 1, stats);
    }
done:
    call_clear(&c);
    return result;
}

static const char layer_norm_backward_doc[] =
    "Gradients of layer norm: returns ``(dx, dgamma, dbeta)``.\n"
    "\n"
    "``mean`` and ``rstd`` are what ``layer_norm`` returned (``mean`` is taken to be each row's\n"
    "own: its low bits are recomputed from ``x`` in float64).  With ``xhat = (x - mean) * rstd``\n"
    "and ``g = dy * gamma``: ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` over the\n"
    "normalized axes; ``dgamma = sum(dy * xhat)`` and ``dbeta = sum(dy)`` over the others, in\n"
    "gamma's shape (``G`` when gamma is None).  ``beta`` and ``activation`` as in\n"
    "``bnorm.backward``; ``out`` (``out=dy`` works in place).";

typedef struct {
    PyObject *dy, *x, *mean, *rstd, *gamma, *axis, *beta;
    int activation;
    PyObject *out;
} layer_norm_backward_args;

static bn_spec layer_norm_backward_spec = {
    "layer_norm_backward", 5, {
        BN_PARAM(layer_norm_backward_args, dy, NULL, bn_to_object),
        BN_PARAM(layer_norm_backward_args, x, NULL, bn_to_object),
        BN_PARAM(layer_norm_backward_args, mean, NULL, bn_to_object),
        BN_PARAM(layer_norm_backward_args, rstd, NULL, bn_to_object),
        BN_PARAM(layer_norm_backward_args, gamma, "None", bn_to_object),
        BN_PARAM(layer_norm_backward_args, axis, "-1", bn_to_object),
        BN_PARAM(layer_norm_backward_args, beta, "None", bn_to_object),
        BN_PARAM(layer_norm_backward_args, activation, "None", bn_to_activation),
        BN_PARAM(layer_norm_backward_args, out, "None", bn_to_object),
    }, layer_norm_backward_doc};

/* dx, then the parameters' gradients (sums per parameter, nsums of them, into gamma's shape) */
static PyObject *pack_backward(call *c, PyObject *gamma_obj, PyArrayObject *gamma, int nsums,
                               const double *const *sums)
{
    PyObject *items[3] = {NULL, NULL, NULL};
    PyObject *result = NULL;
    PyArray_Descr *grad = param_grad_descr(c, gamma_obj);
    if (!grad)
        return NULL;
    for (int i = 0; i < nsums; i++)
        if (!(items[1 + i] = (PyObject *)sum_to_param(&c->P, gamma, grad, sums[i])))
            goto done;
    items[0] = call_finish(c);
    if (!items[0])
        goto done;
    Py_INCREF(items[0]);
    result = nsums == 2 ? PyTuple_Pack(3, items[0], items[1], items[2])
                        : PyTuple_Pack(2, items[0], items[1]);
done:
    Py_DECREF(grad);
    for (int i = 0; i < 3; i++)
        Py_XDECREF(items[i]);
    return result;
}

static PyObject *bn_layer_norm_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                        PyObject *kwnames)
{
    layer_norm_backward_args a;
    if (bn_bind(&layer_norm_backward_spec, args, nargs, kwnames, &a) < 0)
        return NULL;
    call c = {0};
    bn_call *core = &c.core;
    PyObject *result = NULL;
    PyArrayObject *gamma = NULL;
    int failed;
    if (call_data(&c, a.x, a.dy, a.axis, BN_AXIS_NORMALIZED) < 0 || require_normalized(&c) < 0 ||
        required_per_feature(a.mean, "mean", &core->L, 0, core->s.mean) < 0 ||
        required_per_feature(a.rstd, "rstd", &core->L, 0, core->s.rstd) < 0 ||
        per_feature(a.gamma, "gamma", &c.P, 0, 1.0, core->p.gamma, &gamma) < 0 ||
        per_feature(a.beta, "beta", &c.P, 0, 0.0, core->p.beta, NULL) < 0 ||
        call_out(&c, a.out) < 0)
        goto done;
    bn_params_prepare(core);
    RUN_WITHOUT_GIL(failed,
                    bn_step_bwd_sums(core, 1, a.activation) < 0 ||
                        bn_step_bwd_apply(core, (double)core->L.m, 1, a.activation) < 0);
    if (!failed) {
        const double *sums[2] = {core->p.acc + core->L.nparam, core->p.acc};
        result = pack_backward(&c, a.gamma, gamma, 2, sums);
    }
done:
    Py_XDECREF(gamma);
    call_clear(&c);
    return result;
}

static const char rms_norm_backward_doc[] =
    "Gradients of RMS norm: returns ``(dx, dgamma)``: with ``g = dy * gamma``,\n"
    "``dx = rrms * (g - x * rrms**2 * mean(g * x))`` over the normalized axes and\n"
    "``dgamma = sum(dy * x * rrms)`` over the others, in gamma's shape.";

typedef struct {
    PyObject *dy, *x, *rrms, *gamma, *axis, *out;
} rms_norm_backward_args;

static bn_spec rms_norm_backward_spec = {
    "rms_norm_backward", 4, {
        BN_PARAM(rms_norm_backward_args, dy, NULL, bn_to_object),
        BN_PARAM(rms_norm_backward_args, x, NULL, bn_to_object),
        BN_PARAM(rms_norm_backward_args, rrms, NULL, bn_to_object),
        BN_PARAM(rms_norm_backward_args, gamma, "None", bn_to_object),
        BN_PARAM(rms_norm_backward_args, axis, "-1", bn_to_object),
        BN_PARAM(rms_norm_backward_args, out, "None", bn_to_object),
    }, rms_norm_backward_doc};

static PyObject *bn_rms_norm_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                      PyObject *kwnames)
{
    rms_norm_backward_args a;
    if (bn_bind(&rms_norm_backward_spec, args, nargs, kwnames, &a) < 0)
        return NULL;
    call c = {0};
    bn_call *core = &c.core;
    PyObject *result = NULL;
    PyArrayObject *gamma = NULL;
    int failed;
    if (call_data(&c, a.x, a.dy, a.axis, BN_AXIS_NORMALIZED) < 0 || require_normalized(&c) < 0 ||
        required_per_feature(a.rrms, "rrms", &core->L, 0, core->s.rstd) < 0 ||
        per_feature(a.gamma, "gamma", &c.P, 0, 1.0, core->p.gamma, &gamma) < 0 ||
        call_out(&c, a.out) < 0)
        goto done;
    bn_params_prepare(core); /* mean and beta: zeros */
    RUN_WITHOUT_GIL(failed, bn_step_rms_bwd_sums(core) < 0 ||
                                bn_step_bwd_apply(core, (double)core->L.m, 1, 0) < 0);
    if (!failed) {
        const double *sums[1] = {core->p.acc + core->L.nparam};
        result = pack_backward(&c, a.gamma, gamma, 1, sums);
    }
done:
    Py_XDECREF(gamma);
    call_clear(&c);
    return result;
}

static const char group_norm_doc[] =
    "Group norm: returns ``(y, mean, rstd)``.\n"
    "\n"
    "Axis 0 holds the samples, ``axis`` is the channel axis (1: NCHW, -1: NHWC).  Its ``C``\n"
    "channels split into ``num_groups`` consecutive groups; statistics per (sample, group)\n"
    "over the group's channels and every other axis: ``mean``, ``rstd`` of shape\n"
    "``(N, num_groups)``.  ``gamma``, ``beta`` per channel.  ``num_groups == C`` is instance\n"
    "norm.  ``out`` and ``activation`` as in ``bnorm.forward``.";

typedef struct {
    PyObject *x, *num_groups, *gamma, *beta, *axis;
    double eps;
    int activation;
    PyObject *out;
} group_norm_args;

static bn_spec group_norm_spec = {
    "group_norm", 4, {
        BN_PARAM(group_norm_args, x, NULL, bn_to_object),
        BN_PARAM(group_norm_args, num_groups, NULL, bn_to_object),
        BN_PARAM(group_norm_args, gamma, "None", bn_to_object),
        BN_PARAM(group_norm_args, beta, "None", bn_to_object),
        BN_PARAM(group_norm_args, axis, "1", bn_to_object),
        BN_PARAM(group_norm_args, eps, "1e-05", bn_to_eps),
        BN_PARAM(group_norm_args, activation, "None", bn_to_activation),
        BN_PARAM(group_norm_args, out, "None", bn_to_object),
    }, group_norm_doc};

/* the samples, channels and groups of a group-norm call; its (N, G) statistics' scratch */
typedef struct {
    npy_intp N, C, G;
    double *mean, *rstd;
} groups;

static int group_setup(call *c, PyObject *num_groups, groups *g)
{
    g->C = c->P.nfeat;
    g->N = PyArray_DIM(c->x, 0);
    if (group_count(num_groups, g->C, &g->G) < 0)
        return -1;
    const npy_intp stats = g->N * g->G;
    const size_t n = (size_t)(stats > 0 ? stats : 1);
    g->mean = PyMem_Calloc(2 * n, sizeof(double));
    if (!g->mean) {
        PyErr_NoMemory();
        return -1;
    }
    g->rstd = g->mean + n;
    return 0;
}

/* (N, G) statistics as arrays of the statistics' dtype */
static PyArrayObject *group_array(const call *c, const groups *g, const double *values)
{
    const npy_intp dims[2] = {g->N, g->G};
    return filled_array(2, dims, c->stats_type_num, values);
}

static PyObject *bn_group_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    group_norm_args a;
    if (bn_bind(&group_norm_spec, args, nargs, kwnames, &a) < 0)
        return NULL;
    call c = {0};
    bn_call *core = &c.core;
    groups g = {0};
    PyObject *result = NULL;
    PyArrayObject *mean = NULL, *rstd = NULL;
    int failed;
    if (call_data(&c, a.x, NULL, a.axis, BN_AXIS_CHANNEL) < 0 ||
        group_setup(&c, a.num_groups, &g) < 0 ||
        per_feature(a.gamma, "gamma", &c.P, 0, 1.0, core->p.gamma, NULL) < 0 ||
        per_feature(a.beta, "beta", &c.P, 0, 0.0, core->p.beta, NULL) < 0 ||
        call_out(&c, a.out) < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS;
    failed = bn_step_stats(core) < 0;
    if (!failed) {
        bn_group_combine(core, g.C, g.G, g.mean, g.rstd);
        bn_rstd(g.rstd, a.eps, g.rstd, g.N * g.G);
        bn_group_expand(core, g.C, g.G, g.mean, g.rstd, core->p.gamma, core->p.beta);
        failed = bn_step_normalize(core, a.activation) < 0;
    }
    Py_END_ALLOW_THREADS;
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    mean = group_array(&c, &g, g.mean);
    rstd = group_array(&c, &g, g.rstd);
    PyObject *y = mean && rstd ? call_finish(&c) : NULL;
    if (y)
        result = PyTuple_Pack(3, y, (PyObject *)mean, (PyObject *)rstd);
done:
    Py_XDECREF(mean);
    Py_XDECREF(rstd);
    PyMem_Free(g.mean);
    call_clear(&c);
    return result;
}

static const char group_norm_backward_doc[] =
    "Gradients of group norm: returns ``(dx, dgamma, dbeta)`` (per channel, in gamma's\n"
    "shape).  ``mean`` and ``rstd`` are what ``group_norm`` returned, shape\n"
    "``(N, num_groups)``; the means are taken to be x's own (their low bits recomputed in\n"
    "float64).  ``beta``, ``activation`` and ``out`` as in ``bnorm.backward``.";

typedef struct {
    PyObject *dy, *x, *mean, *rstd, *num_groups, *gamma, *axis, *beta;
    int activation;
    PyObject *out;
} group_norm_backward_args;

static bn_spec group_norm_backward_spec = {
    "group_norm_backward", 6, {
        BN_PARAM(group_norm_backward_args, dy, NULL, bn_to_object),
        BN_PARAM(group_norm_backward_args, x, NULL, bn_to_object),
        BN_PARAM(group_norm_backward_args, mean, NULL, bn_to_object),
        BN_PARAM(group_norm_backward_args, rstd, NULL, bn_to_object),
        BN_PARAM(group_norm_backward_args, num_groups, NULL, bn_to_object),
        BN_PARAM(group_norm_backward_args, gamma, "None", bn_to_object),
        BN_PARAM(group_norm_backward_args, axis, "1", bn_to_object),
        BN_PARAM(group_norm_backward_args, beta, "None", bn_to_object),
        BN_PARAM(group_norm_backward_args, activation, "None", bn_to_activation),
        BN_PARAM(group_norm_backward_args, out, "None", bn_to_object),
    }, group_norm_backward_doc};

static PyObject *bn_group_norm_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                        PyObject *kwnames)
{
    group_norm_backward_args a;
    if (bn_bind(&group_norm_backward_spec, args, nargs, kwnames, &a) < 0)
        return NULL;
    call c = {0};
    bn_call *core = &c.core;
    groups g = {0};
    PyObject *result = NULL;
    PyArrayObject *gamma = NULL;
    double *grads = NULL;
    int failed;
    if (call_data(&c, a.x, a.dy, a.axis, BN_AXIS_CHANNEL) < 0 ||
        group_setup(&c, a.num_groups, &g) < 0 ||
        read_group_stats(a.mean, "mean", g.N, g.G, g.mean) < 0 ||
        read_group_stats(a.rstd, "rstd", g.N, g.G, g.rstd) < 0 ||
        per_feature(a.gamma, "gamma", &c.P, 0, 1.0, core->p.gamma, &gamma) < 0 ||
        per_feature(a.beta, "beta", &c.P, 0, 0.0, core->p.beta, NULL) < 0 ||
        call_out(&c, a.out) < 0)
        goto done;
    grads = PyMem_Calloc((size_t)(2 * (g.C ? g.C : 1)), sizeof(double));
    if (!grads) {
        PyErr_NoMemory();
        goto done;
    }
    bn_group_expand(core, g.C, g.G, g.mean, g.rstd, core->p.gamma, core->p.beta);
    RUN_WITHOUT_GIL(failed, bn_step_group_backward(core, g.C, g.G, a.activation, grads,
                                                   grads + g.C) < 0);
    if (!failed) {
        const double *sums[2] = {grads, grads + g.C};
        result = pack_backward(&c, a.gamma, gamma, 2, sums);
    }
done:
    Py_XDECREF(gamma);
    PyMem_Free(grads);
    PyMem_Free(g.mean);
    call_clear(&c);
    return result;
}

static PyObject *bn_py_get_num_threads(PyObject *self, PyObject *unused)
{
    return PyLong_FromSsize_t(bn_get_num_threads());
}

static PyObject *bn_py_set_num_threads(PyObject *self, PyObject *arg)
{
    PyObject *index = PyNumber_Index(arg);
    if (!index) {
        PyErr_Format(PyExc_TypeError, "bnorm: set_num_threads needs an int, got %R", arg);
        return NULL;
    }
    const Py_ssize_t n = PyLong_AsSsize_t(index);
    Py_DECREF(index);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 1) {
        PyErr_Format(PyExc_ValueError, "bnorm: the number of threads must be >= 1, got %zd", n);
        return NULL;
    }
    bn_set_num_threads(n);
    Py_RETURN_NONE;
}

/* The first of BNORM_NUM_THREADS and OMP_NUM_THREADS that is set (MPI and HPC jobs set the
 * latter to keep one thread per rank), else the CPUs this process may use. */
static int init_num_threads(void)
{
    static const char *const names[] = {"BNORM_NUM_THREADS", "OMP_NUM_THREADS"};
    if (bn_threads_init() != 0) {
        PyErr_SetString(PyExc_RuntimeError, "bnorm: could not register a fork handler");
        return -1;
    }
    npy_intp n = bn_default_num_threads();
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const char *env = getenv(names[i]);
        if (!env || !*env)
            continue;
        char *end;
        const long v = strtol(env, &end, 10);
        if (*end == '\0' && v >= 1) {
            n = v;
            break;
        }
        if (PyErr_WarnFormat(PyExc_RuntimeWarning, 1, "bnorm: ignoring %s=%s (not an int >= 1)",
                             names[i], env) < 0)
            return -1;
    }
    bn_set_num_threads(n);
    return 0;
}

static PyObject *bn_py_set_buffer_cache(PyObject *self, PyObject *arg)
{
    const Py_ssize_t n = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "bnorm: the buffer cache size must be >= 0 bytes, got %zd", n);
        return NULL;
    }
    return PyLong_FromSize_t(bn_buffers_set_limit((size_t)n));
}

/* ---- the CPU target ---- */

static PyObject *bn_py_cpu_target(PyObject *self, PyObject *unused)
{
    return PyUnicode_FromString(bn_target_name(bn_current_target()));
}

/* The best target the CPU has, capped by BNORM_CPU (a target's name): one the CPU lacks falls back
 * to the best it has, an unknown name is ignored, each with a warning. */
static int init_cpu_target(void)
{
    const bn_target best = bn_best_target();
    bn_target use = best;
    const char *env = getenv("BNORM_CPU");
    if (env && *env) {
        bn_target asked = BN_NTARGETS;
        for (int t = 0; t < BN_NTARGETS; t++)
            if (strcmp(env, bn_target_name((bn_target)t)) == 0)
                asked = (bn_target)t;
        if (asked == BN_NTARGETS) {
            PyObject *names = PyUnicode_FromString("");
            for (int t = 0; names && t < BN_NTARGETS; t++)
                Py_SETREF(names, PyUnicode_FromFormat("%U%s%s", names, t ? ", " : "",
                                                      bn_target_name((bn_target)t)));
            if (!names)
                return -1;
            const int err = PyErr_WarnFormat(
                PyExc_RuntimeWarning, 1, "bnorm: ignoring BNORM_CPU=%s (not one of: %U); using %s",
                env, names, bn_target_name(best));
            Py_DECREF(names);
            if (err < 0)
                return -1;
        } else if (asked > best) {
            if (PyErr_WarnFormat(PyExc_RuntimeWarning, 1,
                                 "bnorm: BNORM_CPU=%s, but this CPU lacks it; using %s", env,
                                 bn_target_name(best)) < 0)
                return -1;
        } else {
            use = asked;
        }
    }
    bn_use_target(use);
    return 0;
}

/* ---- the caches and the thresholds derived from them ---- */

static bn_caches caches; /* as found at import */

/* Read the caches (BNORM_CACHES, "L1D,L2,L3", replaces their sizes: for tests and experiments;
 * text that does not parse is ignored with a warning) and derive the kernels' thresholds: at
 * import, under the GIL, before any kernel runs. */
static int init_caches(void)
{
    bn_caches_detect(&caches);
    const char *env = getenv("BNORM_CACHES");
    if (env && *env && bn_caches_parse(env, &caches) < 0 &&
        PyErr_WarnFormat(PyExc_RuntimeWarning, 1,
                         "bnorm: ignoring BNORM_CACHES=%s (not \"L1D,L2,L3\" sizes such as "
                         "\"32K,1M,32M\", L1d and L2 > 0)",
                         env) < 0)
        return -1;
    bn_tune_for(&caches);
    return 0;
}

/* d[key] = v, an int; -1 on failure */
static int set_int(PyObject *d, const char *key, npy_intp v)
{
    PyObject *o = PyLong_FromSsize_t(v);
    const int err = o ? PyDict_SetItemString(d, key, o) : -1;
    Py_XDECREF(o);
    return err;
}

static PyObject *bn_py_config(PyObject *self, PyObject *unused)
{
    PyObject *result = PyDict_New(), *c = PyDict_New(), *t = PyDict_New();
    PyObject *target = PyUnicode_FromString(bn_target_name(bn_current_target()));
    PyObject *source = PyUnicode_FromString(caches.source);
    const bn_thresholds *th = &bn_tune;
    if (!result || !c || !t || !target || !source || PyDict_SetItemString(c, "source", source) < 0 ||
        set_int(c, "l1d", caches.l1d) < 0 || set_int(c, "l1d_ways", caches.l1d_ways) < 0 ||
        set_int(c, "line", caches.line) < 0 || set_int(c, "l2", caches.l2) < 0 ||
        set_int(c, "l3", caches.l3) < 0 || set_int(t, "l1_way", th->l1_way) < 0 ||
        set_int(t, "line", th->line) < 0 || set_int(t, "short_row_apply", th->short_row_apply) < 0 ||
        set_int(t, "short_row_reduce", th->short_row_reduce) < 0 ||
        set_int(t, "long_row", th->long_row) < 0 || set_int(t, "streamed", th->streamed) < 0 ||
        set_int(t, "stream_out", th->stream_out) < 0 ||
        set_int(t, "stream_out_short_rows", th->stream_out_short_rows) < 0 ||
        PyDict_SetItemString(result, "target", target) < 0 ||
        set_int(result, "threads", bn_get_num_threads()) < 0 ||
        PyDict_SetItemString(result, "caches", c) < 0 ||
        PyDict_SetItemString(result, "thresholds", t) < 0)
        Py_CLEAR(result);
    Py_XDECREF(c);
    Py_XDECREF(t);
    Py_XDECREF(target);
    Py_XDECREF(source);
    return result;
}

static PyMethodDef methods[] = {
    {"forward", (PyCFunction)(void (*)(void))bn_forward, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"backward", (PyCFunction)(void (*)(void))bn_backward, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"batch_stats", (PyCFunction)(void (*)(void))bn_batch_stats, METH_FASTCALL | METH_KEYWORDS,
     NULL},
    {"normalize", (PyCFunction)(void (*)(void))bn_normalize, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"backward_sums", (PyCFunction)(void (*)(void))bn_backward_sums,
     METH_FASTCALL | METH_KEYWORDS, NULL},
    {"backward_apply", (PyCFunction)(void (*)(void))bn_backward_apply,
     METH_FASTCALL | METH_KEYWORDS, NULL},
    {"layer_norm", (PyCFunction)(void (*)(void))bn_layer_norm, METH_FASTCALL | METH_KEYWORDS,
     NULL},
    {"layer_norm_backward", (PyCFunction)(void (*)(void))bn_layer_norm_backward,
     METH_FASTCALL | METH_KEYWORDS, NULL},
    {"rms_norm", (PyCFunction)(void (*)(void))bn_rms_norm, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"rms_norm_backward", (PyCFunction)(void (*)(void))bn_rms_norm_backward,
     METH_FASTCALL | METH_KEYWORDS, NULL},
    {"group_norm", (PyCFunction)(void (*)(void))bn_group_norm, METH_FASTCALL | METH_KEYWORDS,
     NULL},
    {"group_norm_backward", (PyCFunction)(void (*)(void))bn_group_norm_backward,
     METH_FASTCALL | METH_KEYWORDS, NULL},
    {"get_num_threads", bn_py_get_num_threads, METH_NOARGS,
     "get_num_threads($module)\n--\n\nThreads the kernels use."},
    {"set_num_threads", bn_py_set_num_threads, METH_O,
     "set_num_threads($module, n, /)\n--\n\n"
     "Let the kernels use n >= 1 threads (all callers, all threads)."},
    {"set_buffer_cache", bn_py_set_buffer_cache, METH_O,
     "set_buffer_cache($module, max_bytes, /)\n--\n\n"
     "Keep at most max_bytes of freed large outputs for reuse; returns the previous limit."},
    {"cpu_target", bn_py_cpu_target, METH_NOARGS,
     "cpu_target($module)\n--\n\n"
     "The name of the CPU target whose kernels are in use: \"baseline\", \"x86-64-v3\" or\n"
     "\"x86-64-v4\" (the best the CPU has, capped by the environment variable BNORM_CPU\n"
     "at import); \"neon\" on aarch64."},
    {"_config", bn_py_config, METH_NOARGS,
     "_config($module)\n--\n\n"
     "The CPU target, the thread count, the data caches found at import (bytes; 0: none\n"
     "reported) and where from, and the size thresholds derived from them, as a dict\n"
     "(bnorm.show_config prints it)."},
    {NULL, NULL, 0, NULL},
};

/* methods[]'s entry for each spec, which gets the docstring the spec signs */
static bn_spec *const specs[] = {&forward_spec,        &backward_spec,
                                 &batch_stats_spec,    &normalize_spec,
                                 &backward_sums_spec,  &backward_apply_spec,
                                 &layer_norm_spec,     &layer_norm_backward_spec,
                                 &rms_norm_spec,       &rms_norm_backward_spec,
                                 &group_norm_spec,     &group_norm_backward_spec};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "bnorm._bnorm", "bnorm's C kernels; use the functions in bnorm.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__bnorm(void)
{
    import_array();
    for (size_t i = 0; i < sizeof specs / sizeof *specs; i++) {
        if (bn_spec_init(specs[i]) < 0)
            return NULL;
        methods[i].ml_doc = specs[i]->signed_doc;
    }
    if (bn_args_init() < 0 || init_num_threads() < 0 || init_cpu_target() < 0 ||
        init_caches() < 0)
        return NULL;
    if (bn_buffers_init() != 0) {
        PyErr_SetString(PyExc_RuntimeError, "bnorm: could not register a fork handler");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    PyObject *targets = m ? PyTuple_New(BN_NTARGETS) : NULL;
    for (int t = 0; targets && t < BN_NTARGETS; t++) {
        PyObject *name = PyUnicode_FromString(bn_target_name((bn_target)t));
        if (!name)
            Py_CLEAR(targets);
        else
            PyTuple_SET_ITEM(targets, t, name);
    }
    /* the targets this build has kernels for, from the most widely runnable to the fastest */
    if (!targets || PyModule_AddObject(m, "compiled_targets", targets) < 0) {
        Py_XDECREF(targets);
        Py_XDECREF(m);
        return NULL;
    }
    return m;
}
