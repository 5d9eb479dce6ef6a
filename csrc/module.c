/* bnorm._bnorm: argument checking, array bookkeeping and the per-feature arithmetic around the
 * kernels.  Every check happens before anything is written, so a raised exception leaves every
 * argument as it was. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static PyObject *AxisError; /* numpy.exceptions.AxisError */

/* ---- the axes: which are kept (features), how features are numbered ---- */

typedef struct {
    npy_intp ndim;                  /* of x */
    npy_intp nkept;                 /* feature axes, ascending */
    npy_intp kept[BN_MAXDIMS];
    npy_intp fshape[BN_MAXDIMS];    /* F */
    npy_intp fstride[BN_MAXDIMS];   /* per axis of x: feature-number stride, 0 on batch axes */
    npy_intp nfeat;                 /* prod(F) */
    npy_intp m;                     /* elements reduced per feature */
} layout;

static int parse_axis_item(PyObject *item, npy_intp ndim, char *is_kept, PyObject *axis)
{
    PyObject *index = PyNumber_Index(item);
    if (!index) {
        PyErr_Format(PyExc_TypeError, "bnorm: axis must be an int or a tuple of ints, got %R", axis);
        return -1;
    }
    const Py_ssize_t a = PyLong_AsSsize_t(index);
    Py_DECREF(index);
    if (a == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(AxisError, "axis %R is out of bounds for array of dimension %zd", item,
                     (Py_ssize_t)ndim);
        return -1;
    }
    if (a < -ndim || a >= ndim) {
        PyObject *err = PyObject_CallFunction(AxisError, "nn", a, (Py_ssize_t)ndim);
        if (err) {
            PyErr_SetObject(AxisError, err);
            Py_DECREF(err);
        }
        return -1;
    }
    const npy_intp normalized = a < 0 ? a + ndim : a;
    if (is_kept[normalized]) {
        PyErr_Format(PyExc_ValueError, "bnorm: axis %R repeats axis %zd", axis,
                     (Py_ssize_t)normalized);
        return -1;
    }
    is_kept[normalized] = 1;
    return 0;
}

static int parse_layout(PyObject *axis, PyArrayObject *x, layout *L)
{
    const npy_intp ndim = PyArray_NDIM(x);
    const npy_intp *shape = PyArray_DIMS(x);
    if (ndim == 0) {
        PyErr_SetString(AxisError, "bnorm: x is 0-d; it needs at least one axis");
        return -1;
    }
    char is_kept[BN_MAXDIMS] = {0};
    if (PyTuple_Check(axis) || PyList_Check(axis)) {
        PyObject *seq = PySequence_Fast(axis, "axis");
        if (!seq)
            return -1;
        const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (parse_axis_item(PySequence_Fast_GET_ITEM(seq, i), ndim, is_kept, axis) < 0) {
                Py_DECREF(seq);
                return -1;
            }
        }
        Py_DECREF(seq);
    } else if (parse_axis_item(axis, ndim, is_kept, axis) < 0) {
        return -1;
    }
    L->ndim = ndim;
    L->nkept = 0;
    L->nfeat = 1;
    L->m = 1;
    for (npy_intp d = 0; d < ndim; d++) {
        if (is_kept[d]) {
            L->kept[L->nkept] = d;
            L->fshape[L->nkept++] = shape[d];
            L->nfeat *= shape[d];
        } else {
            L->m *= shape[d];
        }
    }
    npy_intp step = 1;
    for (npy_intp d = ndim - 1; d >= 0; d--) {
        L->fstride[d] = is_kept[d] ? step : 0;
        if (is_kept[d])
            step *= shape[d];
    }
    return 0;
}

/* ---- arrays ---- */

static PyObject *shape_tuple(npy_intp ndim, const npy_intp *dims)
{
    PyObject *t = PyTuple_New(ndim);
    if (!t)
        return NULL;
    for (npy_intp i = 0; i < ndim; i++) {
        PyObject *v = PyLong_FromSsize_t(dims[i]);
        if (!v) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

/* Raise exc with "bnorm: <name> has shape <a>, <what> <b>". */
static void shape_error(PyObject *exc, const char *name, npy_intp nda, const npy_intp *a,
                        const char *what, npy_intp ndb, const npy_intp *b)
{
    PyObject *ta = shape_tuple(nda, a), *tb = shape_tuple(ndb, b);
    if (ta && tb)
        PyErr_Format(exc, "bnorm: %s has shape %R, %s %R", name, ta, what, tb);
    Py_XDECREF(ta);
    Py_XDECREF(tb);
}

static int is_supported_float(int type_num)
{
    return type_num == NPY_FLOAT || type_num == NPY_DOUBLE;
}

/* obj as a float32/float64 array in native byte order, without copying an array that is one. */
static PyArrayObject *as_data_array(PyObject *obj, const char *name)
{
    PyArrayObject *arr = (PyArrayObject *)PyArray_FromAny(obj, NULL, 0, 0, 0, NULL);
    if (!arr)
        return NULL;
    if (!is_supported_float(PyArray_TYPE(arr))) {
        PyErr_Format(PyExc_TypeError,
                     "bnorm: %s has dtype %R; only float32 and float64 are supported", name,
                     (PyObject *)PyArray_DESCR(arr));
        Py_DECREF(arr);
        return NULL;
    }
    if (!PyArray_ISNOTSWAPPED(arr)) {
        PyArrayObject *native = (PyArrayObject *)PyArray_FromArray(
            arr, PyArray_DescrFromType(PyArray_TYPE(arr)), NPY_ARRAY_NOTSWAPPED);
        Py_DECREF(arr);
        return native;
    }
    return arr;
}

/* A per-feature parameter (scalar or array) as an array of real numbers. */
static PyArrayObject *as_param_array(PyObject *obj, const char *name)
{
    PyArrayObject *arr = (PyArrayObject *)PyArray_FromAny(obj, NULL, 0, 0, 0, NULL);
    if (!arr)
        return NULL;
    if (PyArray_ISBOOL(arr) || !(PyArray_ISFLOAT(arr) || PyArray_ISINTEGER(arr))) {
        PyErr_Format(PyExc_TypeError, "bnorm: %s has dtype %R; expected real numbers", name,
                     (PyObject *)PyArray_DESCR(arr));
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

/* For every feature f (C order over F), the C-order element index of arr that broadcasts onto
 * it; arr's shape must broadcast to F. */
static void broadcast_map(const layout *L, npy_intp src_ndim, const npy_intp *src_shape,
                          npy_intp *map)
{
    npy_intp sstride[BN_MAXDIMS], index[BN_MAXDIMS] = {0};
    const npy_intp lead = L->nkept - src_ndim;
    npy_intp step = 1;
    for (npy_intp d = L->nkept - 1; d >= 0; d--) {
        const npy_intp n = d < lead ? 1 : src_shape[d - lead];
        sstride[d] = n == 1 ? 0 : step;
        step *= n;
    }
    npy_intp off = 0;
    for (npy_intp f = 0; f < L->nfeat; f++) {
        map[f] = off;
        for (npy_intp d = L->nkept - 1; d >= 0; d--) {
            off += sstride[d];
            if (++index[d] < L->fshape[d])
                break;
            off -= sstride[d] * L->fshape[d];
            index[d] = 0;
        }
    }
}

static int broadcasts_to_features(const layout *L, PyArrayObject *arr)
{
    const npy_intp nd = PyArray_NDIM(arr), lead = L->nkept - nd;
    if (lead < 0)
        return 0;
    for (npy_intp d = 0; d < nd; d++) {
        const npy_intp n = PyArray_DIM(arr, d);
        if (n != 1 && n != L->fshape[lead + d])
            return 0;
    }
    return 1;
}

static int has_feature_shape(const layout *L, PyArrayObject *arr)
{
    if (PyArray_NDIM(arr) != L->nkept)
        return 0;
    for (npy_intp d = 0; d < L->nkept; d++)
        if (PyArray_DIM(arr, d) != L->fshape[d])
            return 0;
    return 1;
}

/* Fill dst[0..nfeat) with obj broadcast to F (exact: obj must have shape F), or with dflt when obj
 * is None.  If shape_of is given it receives the parameter array (for dgamma's shape). */
static int per_feature(PyObject *obj, const char *name, const layout *L, int exact, double dflt,
                       double *dst, PyArrayObject **shape_of)
{
    if (obj == Py_None) {
        for (npy_intp f = 0; f < L->nfeat; f++)
            dst[f] = dflt;
        return 0;
    }
    PyArrayObject *arr = as_param_array(obj, name);
    if (!arr)
        return -1;
    if (exact ? !has_feature_shape(L, arr) : !broadcasts_to_features(L, arr)) {
        shape_error(PyExc_ValueError, name, PyArray_NDIM(arr), PyArray_DIMS(arr),
                    exact ? "but the feature shape is" : "which does not broadcast to the feature shape",
                    L->nkept, L->fshape);
        Py_DECREF(arr);
        return -1;
    }
    PyArrayObject *dbl = (PyArrayObject *)PyArray_FromArray(
        arr, PyArray_DescrFromType(NPY_DOUBLE), NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    npy_intp *map = PyMem_Malloc(sizeof(npy_intp) * (size_t)(L->nfeat ? L->nfeat : 1));
    if (!dbl || !map) {
        Py_XDECREF(dbl);
        Py_DECREF(arr);
        PyMem_Free(map);
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        return -1;
    }
    broadcast_map(L, PyArray_NDIM(arr), PyArray_DIMS(arr), map);
    const double *src = (const double *)PyArray_DATA(dbl);
    for (npy_intp f = 0; f < L->nfeat; f++)
        dst[f] = src[map[f]];
    PyMem_Free(map);
    Py_DECREF(dbl);
    if (shape_of)
        *shape_of = arr;
    else
        Py_DECREF(arr);
    return 0;
}

/* Running statistics are updated in place: a writable float ndarray of shape F. */
static int check_running(PyObject *obj, const char *name, const layout *L)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError,
                     "bnorm: %s must be a NumPy array (it is updated in place), got %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    if (!PyArray_ISFLOAT(arr)) {
        PyErr_Format(PyExc_TypeError, "bnorm: %s has dtype %R; expected a float array", name,
                     (PyObject *)PyArray_DESCR(arr));
        return -1;
    }
    if (!has_feature_shape(L, arr)) {
        shape_error(PyExc_ValueError, name, PyArray_NDIM(arr), PyArray_DIMS(arr),
                    "but the feature shape is", L->nkept, L->fshape);
        return -1;
    }
    if (!PyArray_ISWRITEABLE(arr)) {
        PyErr_Format(PyExc_ValueError, "bnorm: %s is read-only; it is updated in place", name);
        return -1;
    }
    return 0;
}

/* out= must be a writable array of like's shape and dtype. */
static int check_out(PyObject *obj, PyArrayObject *like)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "bnorm: out must be a NumPy array, got %.100s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyArrayObject *out = (PyArrayObject *)obj;
    if (PyArray_NDIM(out) != PyArray_NDIM(like) ||
        !PyArray_CompareLists(PyArray_DIMS(out), PyArray_DIMS(like), PyArray_NDIM(like))) {
        shape_error(PyExc_ValueError, "out", PyArray_NDIM(out), PyArray_DIMS(out),
                    "but the result has shape", PyArray_NDIM(like), PyArray_DIMS(like));
        return -1;
    }
    if (PyArray_TYPE(out) != PyArray_TYPE(like) || !PyArray_ISNOTSWAPPED(out)) {
        PyErr_Format(PyExc_TypeError, "bnorm: out has dtype %R but the result has dtype %R",
                     (PyObject *)PyArray_DESCR(out), (PyObject *)PyArray_DESCR(like));
        return -1;
    }
    if (!PyArray_ISWRITEABLE(out)) {
        PyErr_SetString(PyExc_ValueError, "bnorm: out is read-only");
        return -1;
    }
    return 0;
}

static void byte_extent(PyArrayObject *a, char **lo, char **hi)
{
    *lo = *hi = PyArray_BYTES(a);
    for (npy_intp d = 0; d < PyArray_NDIM(a); d++) {
        const npy_intp span = (PyArray_DIM(a, d) - 1) * PyArray_STRIDE(a, d);
        if (span < 0)
            *lo += span;
        else
            *hi += span;
    }
    *hi += PyArray_ITEMSIZE(a);
}

/* out may be written element by element while a is read only if they share no memory, or share
 * it element for element (in place). */
static int needs_temporary(PyArrayObject *out, PyArrayObject *a)
{
    if (PyArray_SIZE(out) == 0 || PyArray_SIZE(a) == 0)
        return 0;
    if (PyArray_BYTES(out) == PyArray_BYTES(a) && PyArray_NDIM(out) == PyArray_NDIM(a) &&
        PyArray_CompareLists(PyArray_STRIDES(out), PyArray_STRIDES(a), PyArray_NDIM(a)))
        return 0;
    char *lo_o, *hi_o, *lo_a, *hi_a;
    byte_extent(out, &lo_o, &hi_o);
    byte_extent(a, &lo_a, &hi_a);
    return lo_o < hi_a && lo_a < hi_o;
}

/* The array the result is computed into: a new one laid out like x, out itself, or (when out
 * overlaps an input in another layout) a temporary copied to out at the end. */
static PyArrayObject *result_array(PyArrayObject *out, PyArrayObject *x, PyArrayObject *other)
{
    if (out && !needs_temporary(out, x) && !(other && needs_temporary(out, other))) {
        Py_INCREF(out);
        return out;
    }
    Py_INCREF(PyArray_DESCR(x));
    return (PyArrayObject *)PyArray_NewLikeArray(x, NPY_KEEPORDER, PyArray_DESCR(x), 0);
}

static int finish_result(PyArrayObject *out, PyArrayObject *result)
{
    if (out && out != result)
        return PyArray_CopyInto(out, result);
    return 0;
}

/* ---- per-feature scratch ---- */

/* Everything a call computes per feature, float64 unless noted, in one allocation. */
typedef struct {
    double *gamma, *beta, *mean, *var, *rstd, *acc; /* acc: BN_NACC * nfeat */
    char *shift, *center, *scale, *offset, *dyscale; /* in x's dtype */
    void *block;
} scratch;

static int scratch_alloc(scratch *s, npy_intp nfeat, size_t itemsize)
{
    const size_t n = (size_t)(nfeat ? nfeat : 1);
    s->block = PyMem_Calloc(n, (5 + BN_NACC) * sizeof(double) + 5 * itemsize);
    if (!s->block) {
        PyErr_NoMemory();
        return -1;
    }
    double *d = s->block;
    s->gamma = d;
    s->beta = d + n;
    s->mean = d + 2 * n;
    s->var = d + 3 * n;
    s->rstd = d + 4 * n;
    s->acc = d + 5 * n;
    char *c = (char *)(d + (5 + BN_NACC) * n);
    s->shift = c;
    s->center = c + n * itemsize;
    s->scale = c + 2 * n * itemsize;
    s->offset = c + 3 * n * itemsize;
    s->dyscale = c + 4 * n * itemsize;
    return 0;
}

/* Store v, rounded to the data's dtype, as element f of dst. */
static void put(char *dst, npy_intp f, double v, int type_num)
{
    if (type_num == NPY_FLOAT)
        ((float *)dst)[f] = (float)v;
    else
        ((double *)dst)[f] = v;
}

static double get(const char *src, npy_intp f, int type_num)
{
    return type_num == NPY_FLOAT ? (double)((const float *)src)[f] : ((const double *)src)[f];
}

/* Split each mean into shift (the data's dtype) + center, so (x - shift) - center keeps the
 * mean's low bits that a float32 mean would lose. */
static void split_mean(const scratch *s, npy_intp nfeat, int type_num)
{
    for (npy_intp f = 0; f < nfeat; f++) {
        put(s->shift, f, s->mean[f], type_num);
        put(s->center, f, s->mean[f] - get(s->shift, f, type_num), type_num);
    }
}

static const bn_dtype_kernels *kernels_for(int type_num)
{
    return type_num == NPY_FLOAT ? &bn_kernels_float : &bn_kernels_double;
}

/* Walk x (and the other operands) with the plan the layout gives and run one pass. */
static int run_pass(const layout *L, bn_kernel kernel, const bn_coefs *c, npy_intp nops,
                    PyArrayObject **ops)
{
    char *data[BN_MAXOPS];
    const npy_intp *strides[BN_MAXOPS];
    for (npy_intp k = 0; k < nops; k++) {
        data[k] = PyArray_BYTES(ops[k]);
        strides[k] = PyArray_STRIDES(ops[k]);
    }
    bn_plan plan;
    bn_plan_init(&plan, L->ndim, PyArray_DIMS(ops[0]), L->fstride, nops, data, strides);
    return bn_run(&plan, kernel, c);
}

static PyArrayObject *new_feature_array(const layout *L, int type_num)
{
    return (PyArrayObject *)PyArray_SimpleNew(L->nkept, L->fshape, type_num);
}

static double as_double_arg(PyObject *obj, const char *name, int *err)
{
    const double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "bnorm: %s must be a real number, got %R", name, obj);
        *err = 1;
    }
    return v;
}

/* r = momentum * r + (1 - momentum) * batch, in float64, written back in r's own dtype. */
static int update_running(PyObject *obj, const double *batch, double momentum, const layout *L,
                          double *work)
{
    if (per_feature(obj, "running statistic", L, 1, 0.0, work, NULL) < 0)
        return -1;
    for (npy_intp f = 0; f < L->nfeat; f++)
        work[f] = momentum * work[f] + (1.0 - momentum) * batch[f];
    PyArrayObject *tmp = (PyArrayObject *)PyArray_SimpleNewFromData(
        L->nkept, (npy_intp *)L->fshape, NPY_DOUBLE, work);
    if (!tmp)
        return -1;
    const int rc = PyArray_CopyInto((PyArrayObject *)obj, tmp);
    Py_DECREF(tmp);
    return rc;
}

/* ---- forward ---- */

static PyObject *bn_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "_bnorm.forward takes 10 positional arguments");
        return NULL;
    }
    PyObject *x_obj = args[0], *gamma_obj = args[1], *beta_obj = args[2], *axis = args[3];
    PyObject *rmean_obj = args[6], *rvar_obj = args[7], *out_obj = args[9];
    PyArrayObject *x = NULL, *out = NULL, *y = NULL, *mean = NULL, *rstd = NULL;
    PyObject *result = NULL;
    scratch s = {0};
    layout L;
    int err = 0;

    const double eps = as_double_arg(args[4], "eps", &err);
    const double momentum = as_double_arg(args[8], "momentum", &err);
    if (err)
        return NULL;
    const int training = PyObject_IsTrue(args[5]);
    if (training < 0)
        return NULL;
    if (!(eps >= 0 && eps < INFINITY)) {
        PyErr_Format(PyExc_ValueError, "bnorm: eps must be a finite number >= 0, got %R", args[4]);
        return NULL;
    }
    if (!(momentum >= 0 && momentum <= 1)) {
        PyErr_Format(PyExc_ValueError, "bnorm: momentum must be in [0, 1], got %R", args[8]);
        return NULL;
    }
    x = as_data_array(x_obj, "x");
    if (!x || parse_layout(axis, x, &L) < 0)
        goto done;
    const int type_num = PyArray_TYPE(x);
    const bn_dtype_kernels *K = kernels_for(type_num);
    if (training && L.m == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "bnorm: no elements to reduce over (a batch axis has length 0)");
        goto done;
    }
    if (scratch_alloc(&s, L.nfeat, K->itemsize) < 0 ||
        per_feature(gamma_obj, "gamma", &L, 0, 1.0, s.gamma, NULL) < 0 ||
        per_feature(beta_obj, "beta", &L, 0, 0.0, s.beta, NULL) < 0)
        goto done;
    if (training) {
        if ((rmean_obj != Py_None && check_running(rmean_obj, "running_mean", &L) < 0) ||
            (rvar_obj != Py_None && check_running(rvar_obj, "running_var", &L) < 0))
            goto done;
    } else {
        if (rmean_obj == Py_None || rvar_obj == Py_None) {
            PyErr_SetString(PyExc_ValueError,
                            "bnorm: training=False needs running_mean and running_var");
            goto done;
        }
        if (per_feature(rmean_obj, "running_mean", &L, 1, 0.0, s.mean, NULL) < 0 ||
            per_feature(rvar_obj, "running_var", &L, 1, 0.0, s.var, NULL) < 0)
            goto done;
    }
    if (out_obj != Py_None) {
        if (check_out(out_obj, x) < 0)
            goto done;
        out = (PyArrayObject *)out_obj;
    }
    y = result_array(out, x, NULL);
    mean = new_feature_array(&L, type_num);
    rstd = new_feature_array(&L, type_num);
    if (!y || !mean || !rstd)
        goto done;

    npy_intp kept_strides[BN_MAXDIMS];
    for (npy_intp i = 0; i < L.nkept; i++)
        kept_strides[i] = PyArray_STRIDE(x, L.kept[i]);
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS;
    if (training) {
        /* shift = each feature's first element: near the mean, so the one-pass sums stay exact */
        bn_gather_first(L.nkept, L.fshape, kept_strides, PyArray_BYTES(x), K->itemsize, s.shift);
        const bn_coefs sums = {.shift = s.shift, .acc = s.acc, .nfeat = L.nfeat};
        failed = run_pass(&L, K->stats, &sums, 1, &x);
        const double *sum0 = s.acc, *sum1 = s.acc + L.nfeat;
        for (npy_intp f = 0; f < L.nfeat && !failed; f++) {
            const double d = sum0[f] / (double)L.m;
            const double var = sum1[f] / (double)L.m - d * d;
            s.mean[f] = get(s.shift, f, type_num) + d;
            s.var[f] = var < 0 ? 0 : var; /* rounding only; NaN stays NaN */
        }
    }
    if (!failed) {
        split_mean(&s, L.nfeat, type_num);
        for (npy_intp f = 0; f < L.nfeat; f++) {
            s.rstd[f] = 1.0 / sqrt(s.var[f] + eps);
            put(s.scale, f, s.rstd[f] * s.gamma[f], type_num);
            put(s.offset, f, s.beta[f], type_num);
            put(PyArray_BYTES(mean), f, s.mean[f], type_num);
            put(PyArray_BYTES(rstd), f, s.rstd[f], type_num);
        }
        const bn_coefs coefs = {.shift = s.shift, .center = s.center, .scale = s.scale,
                                .offset = s.offset, .nfeat = L.nfeat};
        PyArrayObject *ops[2] = {x, y};
        failed = run_pass(&L, K->normalize, &coefs, 2, ops);
    }
    Py_END_ALLOW_THREADS;
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    if (finish_result(out, y) < 0)
        goto done;
    if (training && ((rmean_obj != Py_None &&
                      update_running(rmean_obj, s.mean, momentum, &L, s.acc) < 0) ||
                     (rvar_obj != Py_None &&
                      update_running(rvar_obj, s.var, momentum, &L, s.acc) < 0)))
        goto done;
    result = Py_BuildValue("OOO", out ? (PyObject *)out : (PyObject *)y, mean, rstd);
done:
    PyMem_Free(s.block);
    Py_XDECREF(x);
    Py_XDECREF(y);
    Py_XDECREF(mean);
    Py_XDECREF(rstd);
    return result;
}

/* ---- backward ---- */

static PyObject *bn_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "_bnorm.backward takes 8 positional arguments");
        return NULL;
    }
    PyObject *dy_obj = args[0], *x_obj = args[1], *mean_obj = args[2], *rstd_obj = args[3];
    PyObject *gamma_obj = args[4], *axis = args[5], *out_obj = args[7];
    PyArrayObject *x = NULL, *dy = NULL, *out = NULL, *dx = NULL, *gamma = NULL;
    PyArrayObject *dgamma = NULL, *dbeta = NULL;
    PyObject *result = NULL;
    scratch s = {0};
    layout L;

    const int training = PyObject_IsTrue(args[6]);
    if (training < 0)
        return NULL;
    x = as_data_array(x_obj, "x");
    if (!x)
        goto done;
    dy = as_data_array(dy_obj, "dy");
    if (!dy || parse_layout(axis, x, &L) < 0)
        goto done;
    const int type_num = PyArray_TYPE(x);
    const bn_dtype_kernels *K = kernels_for(type_num);
    if (PyArray_NDIM(dy) != PyArray_NDIM(x) ||
        !PyArray_CompareLists(PyArray_DIMS(dy), PyArray_DIMS(x), PyArray_NDIM(x))) {
        shape_error(PyExc_ValueError, "dy", PyArray_NDIM(dy), PyArray_DIMS(dy),
                    "but x has shape", PyArray_NDIM(x), PyArray_DIMS(x));
        goto done;
    }
    if (PyArray_TYPE(dy) != type_num) {
        /* the one copy bnorm makes: dy of the other float dtype, cast to x's */
        PyArrayObject *cast =
            (PyArrayObject *)PyArray_FromArray(dy, PyArray_DescrFromType(type_num), 0);
        Py_SETREF(dy, cast);
        if (!dy)
            goto done;
    }
    if (training && L.m == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "bnorm: no elements to reduce over (a batch axis has length 0)");
        goto done;
    }
    if (scratch_alloc(&s, L.nfeat, K->itemsize) < 0 ||
        per_feature(mean_obj, "mean", &L, 0, 0.0, s.mean, NULL) < 0 ||
        per_feature(rstd_obj, "rstd", &L, 0, 0.0, s.rstd, NULL) < 0 ||
        per_feature(gamma_obj, "gamma", &L, 0, 1.0, s.gamma, &gamma) < 0)
        goto done;
    if (out_obj != Py_None) {
        if (check_out(out_obj, x) < 0)
            goto done;
        out = (PyArrayObject *)out_obj;
    }
    dx = result_array(out, x, dy);
    dbeta = new_feature_array(&L, type_num);
    dgamma = gamma ? (PyArrayObject *)PyArray_SimpleNew(PyArray_NDIM(gamma), PyArray_DIMS(gamma),
                                                        type_num)
                   : new_feature_array(&L, type_num);
    if (!dx || !dbeta || !dgamma)
        goto done;

    /* acc holds, per feature: sum(dy), sum(dy * (x - shift)), sum(x - shift); then dgamma's
     * per-feature values replace the second and its gamma-shaped sums go in the third. */
    double *sum_dy = s.acc, *sum_dyv = s.acc + L.nfeat, *sum_v = s.acc + 2 * L.nfeat;
    double *dgamma_f = sum_dyv, *dgamma_g = sum_v;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS;
    split_mean(&s, L.nfeat, type_num);
    const bn_coefs sums = {.shift = s.shift, .acc = s.acc, .nfeat = L.nfeat};
    PyArrayObject *sum_ops[2] = {x, dy};
    failed = run_pass(&L, K->bwd_sums, &sums, 2, sum_ops);
    const double m = (double)L.m;
    for (npy_intp f = 0; f < L.nfeat && !failed; f++) {
        /* Training: mean is the batch mean, so the residual of x - shift is recomputed exactly
         * from the data; inference: it is the passed mean's own low part. */
        const double d = training ? sum_v[f] / m : s.mean[f] - get(s.shift, f, type_num);
        const double r = s.rstd[f], a = s.gamma[f] * r;
        dgamma_f[f] = r * (sum_dyv[f] - d * sum_dy[f]);
        if (training) {
            put(s.center, f, d, type_num);
            put(s.scale, f, -a * r * dgamma_f[f] / m, type_num);
            put(s.offset, f, -a * sum_dy[f] / m, type_num);
            put(s.dyscale, f, a, type_num);
        } else {
            /* dx = a * dy, run as normalize over dy with zero shift and center */
            put(s.shift, f, 0.0, type_num);
            put(s.center, f, 0.0, type_num);
            put(s.scale, f, a, type_num);
            put(s.offset, f, 0.0, type_num);
        }
        put(PyArray_BYTES(dbeta), f, sum_dy[f], type_num);
    }
    if (!failed) {
        const bn_coefs coefs = {.shift = s.shift, .center = s.center, .scale = s.scale,
                                .offset = s.offset, .dyscale = s.dyscale, .nfeat = L.nfeat};
        PyArrayObject *apply_ops[3] = {x, dy, dx}, *dy_ops[2] = {dy, dx};
        failed = training ? run_pass(&L, K->bwd_apply, &coefs, 3, apply_ops)
                          : run_pass(&L, K->normalize, &coefs, 2, dy_ops);
    }
    Py_END_ALLOW_THREADS;
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    if (gamma) {
        /* sum dgamma over everything gamma was broadcast over, in feature order */
        npy_intp *map = PyMem_Malloc(sizeof(npy_intp) * (size_t)(L.nfeat ? L.nfeat : 1));
        if (!map) {
            PyErr_NoMemory();
            goto done;
        }
        broadcast_map(&L, PyArray_NDIM(gamma), PyArray_DIMS(gamma), map);
        const npy_intp ng = PyArray_SIZE(gamma);
        memset(dgamma_g, 0, sizeof(double) * (size_t)ng);
        for (npy_intp f = 0; f < L.nfeat; f++)
            dgamma_g[map[f]] += dgamma_f[f];
        PyMem_Free(map);
        for (npy_intp g = 0; g < ng; g++)
            put(PyArray_BYTES(dgamma), g, dgamma_g[g], type_num);
    } else {
        for (npy_intp f = 0; f < L.nfeat; f++)
            put(PyArray_BYTES(dgamma), f, dgamma_f[f], type_num);
    }
    if (finish_result(out, dx) < 0)
        goto done;
    result = Py_BuildValue("OOO", out ? (PyObject *)out : (PyObject *)dx, dgamma, dbeta);
done:
    PyMem_Free(s.block);
    Py_XDECREF(x);
    Py_XDECREF(dy);
    Py_XDECREF(dx);
    Py_XDECREF(gamma);
    Py_XDECREF(dgamma);
    Py_XDECREF(dbeta);
    return result;
}

/* ---- threads ---- */

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

static npy_intp default_num_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* BNORM_NUM_THREADS, else OpenMP's default (OMP_NUM_THREADS or the CPUs this process may use). */
static int init_num_threads(void)
{
    npy_intp n = default_num_threads();
    const char *env = getenv("BNORM_NUM_THREADS");
    if (env && *env) {
        char *end;
        const long v = strtol(env, &end, 10);
        if (*end == '\0' && v >= 1)
            n = v;
        else if (PyErr_WarnFormat(PyExc_RuntimeWarning, 1,
                                  "bnorm: ignoring BNORM_NUM_THREADS=%s (not an int >= 1)",
                                  env) < 0)
            return -1;
    }
    bn_set_num_threads(n);
    return 0;
}

static PyMethodDef methods[] = {
    {"forward", (PyCFunction)(void (*)(void))bn_forward, METH_FASTCALL,
     "forward(x, gamma, beta, axis, eps, training, running_mean, running_var, momentum, out)"},
    {"backward", (PyCFunction)(void (*)(void))bn_backward, METH_FASTCALL,
     "backward(dy, x, mean, rstd, gamma, axis, training, out)"},
    {"get_num_threads", bn_py_get_num_threads, METH_NOARGS,
     "get_num_threads() -> int: threads the kernels use."},
    {"set_num_threads", bn_py_set_num_threads, METH_O,
     "set_num_threads(n): let the kernels use n >= 1 threads (all callers, all threads)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "bnorm._bnorm", "bnorm's C kernels; use the functions in bnorm.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__bnorm(void)
{
    import_array();
    PyObject *exceptions = PyImport_ImportModule("numpy.exceptions");
    if (!exceptions) {
        /* NumPy < 1.25 */
        PyErr_Clear();
        exceptions = PyImport_ImportModule("numpy");
        if (!exceptions)
            return NULL;
    }
    AxisError = PyObject_GetAttrString(exceptions, "AxisError");
    Py_DECREF(exceptions);
    if (!AxisError || init_num_threads() < 0)
        return NULL;
    return PyModule_Create(&module);
}
