/* bnorm._bnorm: argument checking, array bookkeeping and the per-feature arithmetic around the
 * kernels.  Every check happens before anything is written, so a raised exception leaves every
 * argument as it was. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "buffers.h"
#include "kernels.h"

static PyObject *AxisError; /* numpy.exceptions.AxisError */

/* NumPy's memory handler (NEP 49) over buffers.c, current only while a large output is made. */
static PyDataMem_Handler buffer_handler = {
    "bnorm_buffers", 1, {NULL, bn_buffer_malloc, bn_buffer_calloc, bn_buffer_realloc, bn_buffer_free}};
static PyObject *buffer_handler_capsule;

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
    /* bool has __index__, but axis=True is a slip, not a request for axis 1: NumPy rejects it
     * too. */
    const int is_bool = PyBool_Check(item) || PyArray_IsScalar(item, Bool);
    PyObject *index = is_bool ? NULL : PyNumber_Index(item);
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
        /* A tuple copy owns the items: an item's __index__ may empty a list while we hold its
         * items borrowed. */
        PyObject *seq = PySequence_Tuple(axis);
        if (!seq)
            return -1;
        const Py_ssize_t n = PyTuple_GET_SIZE(seq);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (parse_axis_item(PyTuple_GET_ITEM(seq, i), ndim, is_kept, axis) < 0) {
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

/* obj itself when it is an array: PyArray_FromAny's dtype and shape discovery costs a tenth of
 * a small call. */
static PyArrayObject *as_array(PyObject *obj)
{
    if (PyArray_Check(obj)) {
        Py_INCREF(obj);
        return (PyArrayObject *)obj;
    }
    return (PyArrayObject *)PyArray_FromAny(obj, NULL, 0, 0, 0, NULL);
}

/* obj as a float32/float64 array in native byte order, without copying an array that is one. */
static PyArrayObject *as_data_array(PyObject *obj, const char *name)
{
    PyArrayObject *arr = as_array(obj);
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
    PyArrayObject *arr = as_array(obj);
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

static double get(const char *src, npy_intp f, int type_num);
static int gather_broadcast(const layout *L, PyArrayObject *arr, double *dst);

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
    if (has_feature_shape(L, arr) && PyArray_IS_C_CONTIGUOUS(arr) && PyArray_ISALIGNED(arr) &&
        PyArray_ISNOTSWAPPED(arr) && is_supported_float(PyArray_TYPE(arr))) {
        /* the common case, read as it is: an F-shaped float32/float64 vector */
        for (npy_intp f = 0; f < L->nfeat; f++)
            dst[f] = get(PyArray_BYTES(arr), f, PyArray_TYPE(arr));
    } else if (gather_broadcast(L, arr, dst) < 0) {
        Py_DECREF(arr);
        return -1;
    }
    if (shape_of)
        *shape_of = arr;
    else
        Py_DECREF(arr);
    return 0;
}

/* per_feature for an argument without a default (mean, rstd, gradient sums): None there is a
 * mistake, not "all zeros", so it is a TypeError like any other non-number. */
static int required_per_feature(PyObject *obj, const char *name, const layout *L, int exact,
                                double *dst)
{
    if (obj == Py_None) {
        PyErr_Format(PyExc_TypeError, "bnorm: %s is required (an array of the feature shape), "
                     "got None", name);
        return -1;
    }
    return per_feature(obj, name, L, exact, 0.0, dst, NULL);
}

/* dst = arr broadcast to F, converted to float64.  Forced: as_param_array admitted every real
 * dtype, and long double to float64 is not a "safe" cast. */
static int gather_broadcast(const layout *L, PyArrayObject *arr, double *dst)
{
    PyArrayObject *dbl = (PyArrayObject *)PyArray_FromArray(
        arr, PyArray_DescrFromType(NPY_DOUBLE),
        NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_FORCECAST);
    npy_intp *map = PyMem_Malloc(sizeof(npy_intp) * (size_t)(L->nfeat ? L->nfeat : 1));
    if (!dbl || !map) {
        Py_XDECREF(dbl);
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
    const int large = (size_t)PyArray_NBYTES(x) >= BN_BUFFER_MIN;
    PyObject *numpy_handler = large ? PyDataMem_SetHandler(buffer_handler_capsule) : NULL;
    if (large && !numpy_handler)
        return NULL;
    Py_INCREF(PyArray_DESCR(x));
    PyArrayObject *result =
        (PyArrayObject *)PyArray_NewLikeArray(x, NPY_KEEPORDER, PyArray_DESCR(x), 0);
    if (large) {
        PyObject *ours = PyDataMem_SetHandler(numpy_handler);
        Py_DECREF(numpy_handler);
        if (!ours) {
            Py_XDECREF(result);
            return NULL;
        }
        Py_DECREF(ours);
    }
    return result;
}

/* ---- one call's state ---- */

/* Everything a call computes per feature, float64 unless noted, in one allocation. */
typedef struct {
    double *gamma, *beta, *mean, *var, *rstd;
    double *resid; /* mean minus shift: the low part the data's dtype cannot hold */
    double *acc;   /* BN_NACC * nfeat reduction sums */
    char *shift, *scale, *offset, *dyscale; /* in the data's dtype */
    void *block;
} scratch;

typedef struct {
    PyArrayObject *x, *dy;   /* owned */
    PyArrayObject *out;      /* borrowed: the caller's out=, or NULL */
    PyArrayObject *result;   /* owned: what the elementwise pass writes (out, new, or temporary) */
    layout L;
    int type_num;
    const bn_dtype_kernels *K;
    scratch s;
} call;

static void call_clear(call *c)
{
    PyMem_Free(c->s.block);
    Py_XDECREF(c->x);
    Py_XDECREF(c->dy);
    Py_XDECREF(c->result);
}

static int scratch_alloc(scratch *s, npy_intp nfeat, size_t itemsize)
{
    const size_t n = (size_t)(nfeat ? nfeat : 1);
    enum { NDOUBLES = 6 + BN_NACC, NTYPED = 4 };
    s->block = PyMem_Calloc(n, NDOUBLES * sizeof(double) + NTYPED * itemsize);
    if (!s->block) {
        PyErr_NoMemory();
        return -1;
    }
    double *d = s->block;
    double **vectors[] = {&s->gamma, &s->beta, &s->mean, &s->var, &s->rstd, &s->resid};
    for (size_t i = 0; i < sizeof vectors / sizeof *vectors; i++)
        *vectors[i] = d + i * n;
    s->acc = d + 6 * n;
    char *t = (char *)(d + NDOUBLES * n);
    char **typed[] = {&s->shift, &s->scale, &s->offset, &s->dyscale};
    for (size_t i = 0; i < NTYPED; i++)
        *typed[i] = t + i * n * itemsize;
    return 0;
}

/* x (and dy, if dy_obj is given) as data arrays, the layout of axis, and the scratch. */
static int call_data(call *c, PyObject *x_obj, PyObject *dy_obj, PyObject *axis)
{
    c->x = as_data_array(x_obj, "x");
    if (!c->x || parse_layout(axis, c->x, &c->L) < 0)
        return -1;
    c->type_num = PyArray_TYPE(c->x);
    c->K = c->type_num == NPY_FLOAT ? &bn_kernels_float : &bn_kernels_double;
    if (dy_obj) {
        c->dy = as_data_array(dy_obj, "dy");
        if (!c->dy)
            return -1;
        if (PyArray_NDIM(c->dy) != PyArray_NDIM(c->x) ||
            !PyArray_CompareLists(PyArray_DIMS(c->dy), PyArray_DIMS(c->x), PyArray_NDIM(c->x))) {
            shape_error(PyExc_ValueError, "dy", PyArray_NDIM(c->dy), PyArray_DIMS(c->dy),
                        "but x has shape", PyArray_NDIM(c->x), PyArray_DIMS(c->x));
            return -1;
        }
        if (PyArray_TYPE(c->dy) != c->type_num) {
            /* the one copy bnorm makes: dy of the other float dtype, cast to x's (forced:
             * float64 to float32 is not a "safe" cast) */
            Py_SETREF(c->dy, (PyArrayObject *)PyArray_FromArray(
                                 c->dy, PyArray_DescrFromType(c->type_num), NPY_ARRAY_FORCECAST));
            if (!c->dy)
                return -1;
        }
    }
    return scratch_alloc(&c->s, c->L.nfeat, c->K->itemsize);
}

static int require_batch(const call *c)
{
    if (c->L.m == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "bnorm: no elements to reduce over (a batch axis has length 0)");
        return -1;
    }
    return 0;
}

/* Check out= and choose the array the elementwise pass writes. */
static int call_out(call *c, PyObject *out_obj)
{
    if (out_obj != Py_None) {
        if (check_out(out_obj, c->x) < 0)
            return -1;
        c->out = (PyArrayObject *)out_obj;
    }
    c->result = result_array(c->out, c->x, c->dy);
    return c->result ? 0 : -1;
}

/* The elementwise result as the caller sees it: out (filled from a temporary if one was
 * needed), or the new array.  Returns a borrowed reference, NULL on error. */
static PyObject *call_finish(call *c)
{
    if (c->out && c->out != c->result && PyArray_CopyInto(c->out, c->result) < 0)
        return NULL;
    return c->out ? (PyObject *)c->out : (PyObject *)c->result;
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

static PyArrayObject *feature_array(const call *c, int type_num, const double *values)
{
    PyArrayObject *a = (PyArrayObject *)PyArray_SimpleNew(c->L.nkept, c->L.fshape, type_num);
    if (a)
        for (npy_intp f = 0; f < c->L.nfeat; f++)
            put(PyArray_BYTES(a), f, values[f], type_num);
    return a;
}

/* Walk the operands with the plan the layout gives and run one pass. */
static int run_pass(const call *c, bn_kernel kernel, const bn_coefs *coefs, npy_intp nops,
                    PyArrayObject **ops)
{
    char *data[BN_MAXOPS];
    const npy_intp *strides[BN_MAXOPS];
    for (npy_intp k = 0; k < nops; k++) {
        data[k] = PyArray_BYTES(ops[k]);
        strides[k] = PyArray_STRIDES(ops[k]);
    }
    bn_plan plan;
    bn_plan_init(&plan, c->L.ndim, PyArray_DIMS(ops[0]), c->L.fstride, nops, data, strides);
    return bn_run(&plan, kernel, coefs);
}

/* ---- the steps: each runs without the GIL and returns 0, or -1 when out of memory ---- */

/* Split each mean into shift (the data's dtype) + resid, the mean's low bits that a float32 mean
 * would lose: (x - shift) is exact near the mean, and resid goes into the per-feature offset. */
static void split_mean(call *c)
{
    scratch *s = &c->s;
    for (npy_intp f = 0; f < c->L.nfeat; f++) {
        put(s->shift, f, s->mean[f], c->type_num);
        s->resid[f] = s->mean[f] - get(s->shift, f, c->type_num);
    }
}

/* Batch mean and biased variance of x per feature: one pass, float64 sums of data shifted by
 * each feature's first element (close to its mean, so no cancellation). */
static int step_stats(call *c)
{
    scratch *s = &c->s;
    const layout *L = &c->L;
    npy_intp kept_strides[BN_MAXDIMS];
    for (npy_intp i = 0; i < L->nkept; i++)
        kept_strides[i] = PyArray_STRIDE(c->x, L->kept[i]);
    bn_gather_first(L->nkept, L->fshape, kept_strides, PyArray_BYTES(c->x), c->K->itemsize,
                    s->shift);
    const bn_coefs sums = {.shift = s->shift, .acc = s->acc, .nfeat = L->nfeat};
    if (run_pass(c, c->K->stats, &sums, 1, &c->x) < 0)
        return -1;
    const double *sum0 = s->acc, *sum1 = s->acc + L->nfeat;
    for (npy_intp f = 0; f < L->nfeat; f++) {
        const double d = sum0[f] / (double)L->m;
        const double var = sum1[f] / (double)L->m - d * d;
        s->mean[f] = get(s->shift, f, c->type_num) + d;
        s->var[f] = var < 0 ? 0 : var; /* rounding only; NaN stays NaN */
    }
    return 0;
}

static int step_rstd(call *c, double eps)
{
    for (npy_intp f = 0; f < c->L.nfeat; f++)
        c->s.rstd[f] = 1.0 / sqrt(c->s.var[f] + eps);
    return 0;
}

/* result = (x - mean) * (rstd * gamma) + beta, as (x - shift) * scale + (beta - resid * scale):
 * one subtraction and one fused multiply-add per element. */
static int step_normalize(call *c)
{
    scratch *s = &c->s;
    split_mean(c);
    for (npy_intp f = 0; f < c->L.nfeat; f++) {
        put(s->scale, f, s->rstd[f] * s->gamma[f], c->type_num);
        const double scale = get(s->scale, f, c->type_num);
        put(s->offset, f, s->beta[f] - s->resid[f] * scale, c->type_num);
    }
    const bn_coefs coefs = {.shift = s->shift, .scale = s->scale, .offset = s->offset,
                            .nfeat = c->L.nfeat};
    PyArrayObject *ops[2] = {c->x, c->result};
    return run_pass(c, c->K->normalize, &coefs, 2, ops);
}

/* acc[0] = sum(dy), acc[1] = sum(dy * (x - mean)) per feature.  batch_mean: mean is x's own batch
 * mean, so its low part is recomputed from the data (exact even when mean was rounded to
 * float32); otherwise mean is taken as given. */
static int step_bwd_sums(call *c, int batch_mean)
{
    scratch *s = &c->s;
    const npy_intp nf = c->L.nfeat;
    split_mean(c);
    const bn_coefs sums = {.shift = s->shift, .acc = s->acc, .nfeat = nf};
    PyArrayObject *ops[2] = {c->x, c->dy};
    if (run_pass(c, c->K->bwd_sums, &sums, 2, ops) < 0)
        return -1;
    double *sum_dy = s->acc, *sum_dyv = s->acc + nf, *sum_v = s->acc + 2 * nf;
    for (npy_intp f = 0; f < nf; f++) {
        if (batch_mean)
            s->resid[f] = sum_v[f] / (double)c->L.m;
        sum_dyv[f] -= s->resid[f] * sum_dy[f];
    }
    return 0;
}

/* dx from the sums step_bwd_sums leaves in acc, taken over count elements per feature:
 * training: dx = gamma * rstd * (dy - sum_dy / count - xhat * rstd * sum_dy_xmu / count);
 * otherwise dx = gamma * rstd * dy. */
static int step_bwd_apply(call *c, double count, int training)
{
    scratch *s = &c->s;
    const npy_intp nf = c->L.nfeat;
    const double *sum_dy = s->acc, *sum_dy_xmu = s->acc + nf;
    for (npy_intp f = 0; f < nf; f++) {
        const double r = s->rstd[f], a = s->gamma[f] * r;
        put(s->scale, f, training ? -a * r * r * sum_dy_xmu[f] / count : a, c->type_num);
        const double scale = get(s->scale, f, c->type_num);
        put(s->offset, f, training ? -a * sum_dy[f] / count - s->resid[f] * scale : 0.0,
            c->type_num);
        put(s->dyscale, f, a, c->type_num);
        if (!training)
            put(s->shift, f, 0.0, c->type_num);
    }
    const bn_coefs coefs = {.shift = s->shift, .scale = s->scale, .offset = s->offset,
                            .dyscale = s->dyscale, .nfeat = nf};
    if (training) {
        PyArrayObject *ops[3] = {c->x, c->dy, c->result};
        return run_pass(c, c->K->bwd_apply, &coefs, 3, ops);
    }
    /* dx = a * dy does not read x: the normalize pass over dy, with zero shift and offset */
    PyArrayObject *ops[2] = {c->dy, c->result};
    return run_pass(c, c->K->normalize, &coefs, 2, ops);
}

/* step_bwd_apply with sums reduced elsewhere (over several workers) and mean as given. */
static int step_bwd_apply_given(call *c, double count)
{
    split_mean(c);
    return step_bwd_apply(c, count, 1);
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

static int check_nargs(Py_ssize_t nargs, Py_ssize_t want, const char *name)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "_bnorm.%s takes %zd positional arguments", name, want);
        return -1;
    }
    return 0;
}

/* Python's binding of call arguments to parameters, for forward and backward, which are called
 * directly from Python: a wrapper in Python around them made a (32,64) forward 2.10 us instead
 * of 1.80 (backward 2.37 instead of 2.21).  The first npos parameters may come by position, the
 * first nreq of them must come; the rest are keyword-only.  bound[] holds the defaults on entry
 * and borrowed references on return. */
typedef struct {
    const char *fname;
    Py_ssize_t nparams, npos, nreq;
    const char *const *names;
    PyObject **interned; /* the names as interned str, made at import */
} signature;

#define MAX_PARAMS 10

static int bind_args(const signature *sig, PyObject *const *args, Py_ssize_t nargs,
                     PyObject *kwnames, PyObject **bound)
{
    char given[MAX_PARAMS] = {0};
    if (nargs > sig->npos) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd positional arguments (%zd given)",
                     sig->fname, sig->npos, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        bound[i] = args[i];
        given[i] = 1;
    }
    const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        Py_ssize_t i = 0;
        while (i < sig->nparams && sig->interned[i] != key) /* keywords in code are interned */
            i++;
        if (i == sig->nparams) /* a keyword made at run time: compare the text */
            for (i = 0; i < sig->nparams; i++)
                if (PyUnicode_Compare(sig->interned[i], key) == 0)
                    break;
        if (i == sig->nparams) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                         sig->fname, key);
            return -1;
        }
        if (given[i]) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
                         sig->fname, sig->names[i]);
            return -1;
        }
        bound[i] = args[nargs + k];
        given[i] = 1;
    }
    for (Py_ssize_t i = 0; i < sig->nreq; i++)
        if (!given[i]) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s' (pos %zd)",
                         sig->fname, sig->names[i], i + 1);
            return -1;
        }
    return 0;
}

static const char *const forward_names[] = {"x", "gamma", "beta", "axis", "eps", "training",
                                            "running_mean", "running_var", "momentum", "out"};
static const char *const backward_names[] = {"dy", "x", "mean", "rstd", "gamma", "axis",
                                             "training", "out"};
#define NPARAMS(names) ((Py_ssize_t)(sizeof names / sizeof *names))
_Static_assert(NPARAMS(forward_names) <= MAX_PARAMS && NPARAMS(backward_names) <= MAX_PARAMS,
               "bind_args' given[] is too small");
static PyObject *forward_interned[NPARAMS(forward_names)];
static PyObject *backward_interned[NPARAMS(backward_names)];
static const signature forward_sig = {"forward", NPARAMS(forward_names), 3, 1, forward_names,
                                      forward_interned};
static const signature backward_sig = {"backward", NPARAMS(backward_names), 5, 4,
                                       backward_names, backward_interned};
static PyObject *default_axis, *default_eps, *default_momentum; /* -1, 1e-8, 0.9 */

/* At import: the interned names and the defaults that are not singletons. */
static int init_signatures(void)
{
    for (Py_ssize_t i = 0; i < forward_sig.nparams; i++)
        if (!(forward_interned[i] = PyUnicode_InternFromString(forward_names[i])))
            return -1;
    for (Py_ssize_t i = 0; i < backward_sig.nparams; i++)
        if (!(backward_interned[i] = PyUnicode_InternFromString(backward_names[i])))
            return -1;
    default_axis = PyLong_FromLong(-1);
    default_eps = PyFloat_FromDouble(1e-8);
    default_momentum = PyFloat_FromDouble(0.9);
    return default_axis && default_eps && default_momentum ? 0 : -1;
}

/* momentum * r + (1 - momentum) * batch, computed in float64 and cast to r's own dtype, as a new
 * array: the cast can raise (a float16 statistic overflowing under np.errstate(over="raise") or
 * with warnings as errors), so it is done before anything is written; the copy into r at the end
 * is between equal dtypes and cannot. */
static PyArrayObject *new_running(PyObject *obj, const double *batch, double momentum,
                                  const layout *L, double *work)
{
    if (per_feature(obj, "running statistic", L, 1, 0.0, work, NULL) < 0)
        return NULL;
    for (npy_intp f = 0; f < L->nfeat; f++)
        work[f] = momentum * work[f] + (1.0 - momentum) * batch[f];
    PyArray_Descr *descr = PyArray_DESCR((PyArrayObject *)obj);
    const int type_num = descr->type_num;
    if ((type_num == NPY_FLOAT || type_num == NPY_DOUBLE) && PyArray_ISNBO(descr->byteorder)) {
        /* the usual case, without NumPy's casting machinery (a third of a small call's time) */
        PyArrayObject *a =
            (PyArrayObject *)PyArray_SimpleNew(L->nkept, (npy_intp *)L->fshape, type_num);
        if (a)
            for (npy_intp f = 0; f < L->nfeat; f++)
                put(PyArray_BYTES(a), f, work[f], type_num);
        return a;
    }
    PyArrayObject *tmp = (PyArrayObject *)PyArray_SimpleNewFromData(
        L->nkept, (npy_intp *)L->fshape, NPY_DOUBLE, work);
    if (!tmp)
        return NULL;
    Py_INCREF(descr); /* PyArray_CastToType steals it */
    PyArrayObject *cast = (PyArrayObject *)PyArray_CastToType(tmp, descr, 0);
    Py_DECREF(tmp);
    return cast;
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

/* dgamma in gamma's shape: per-feature values summed over what gamma was broadcast over.  The
 * sums get a buffer of their own: gamma can have more elements than there are features (a
 * length-1 axis of gamma broadcast to a length-0 feature axis), so no per-feature scratch fits. */
static PyArrayObject *sum_to_param(const call *c, PyArrayObject *param, const double *values)
{
    if (!param)
        return feature_array(c, c->type_num, values);
    const npy_intp n = PyArray_SIZE(param);
    npy_intp *map = PyMem_Malloc(sizeof(npy_intp) * (size_t)(c->L.nfeat ? c->L.nfeat : 1));
    double *work = PyMem_Calloc((size_t)(n ? n : 1), sizeof(double));
    PyArrayObject *a = (PyArrayObject *)PyArray_SimpleNew(PyArray_NDIM(param),
                                                          PyArray_DIMS(param), c->type_num);
    if (!map || !work || !a) {
        PyMem_Free(map);
        PyMem_Free(work);
        Py_XDECREF(a);
        return (PyArrayObject *)(PyErr_Occurred() ? NULL : PyErr_NoMemory());
    }
    broadcast_map(&c->L, PyArray_NDIM(param), PyArray_DIMS(param), map);
    for (npy_intp f = 0; f < c->L.nfeat; f++)
        work[map[f]] += values[f];
    for (npy_intp g = 0; g < n; g++)
        put(PyArray_BYTES(a), g, work[g], c->type_num);
    PyMem_Free(map);
    PyMem_Free(work);
    return a;
}

#define RUN_WITHOUT_GIL(failed, steps)                                                             \
    do {                                                                                           \
        Py_BEGIN_ALLOW_THREADS;                                                                    \
        failed = (steps);                                                                          \
        Py_END_ALLOW_THREADS;                                                                      \
        if (failed)                                                                                \
            PyErr_NoMemory();                                                                      \
    } while (0)

/* ---- forward, backward ---- */

static PyObject *bn_forward(PyObject *self, PyObject *const *given, Py_ssize_t nargs,
                            PyObject *kwnames)
{
    /* x, gamma, beta, axis, eps, training, running_mean, running_var, momentum, out */
    PyObject *args[NPARAMS(forward_names)] = {NULL,    Py_None, Py_None, default_axis,
                                              default_eps, Py_True, Py_None, Py_None,
                                              default_momentum, Py_None};
    if (bind_args(&forward_sig, given, nargs, kwnames, args) < 0)
        return NULL;
    PyObject *rmean_obj = args[6], *rvar_obj = args[7];
    call c = {0};
    PyObject *result = NULL;
    PyArrayObject *mean = NULL, *rstd = NULL, *new_rmean = NULL, *new_rvar = NULL;
    int err = 0, failed;
    const double eps = as_double_arg(args[4], "eps", &err);
    const double momentum = err ? 0 : as_double_arg(args[8], "momentum", &err);
    const int training = err ? 0 : PyObject_IsTrue(args[5]);
    if (err || training < 0)
        return NULL;
    if (!(eps >= 0 && eps < INFINITY)) {
        PyErr_Format(PyExc_ValueError, "bnorm: eps must be a finite number >= 0, got %R", args[4]);
        return NULL;
    }
    if (!(momentum >= 0 && momentum <= 1)) {
        PyErr_Format(PyExc_ValueError, "bnorm: momentum must be in [0, 1], got %R", args[8]);
        return NULL;
    }
    if (call_data(&c, args[0], NULL, args[3]) < 0 || (training && require_batch(&c) < 0) ||
        per_feature(args[1], "gamma", &c.L, 0, 1.0, c.s.gamma, NULL) < 0 ||
        per_feature(args[2], "beta", &c.L, 0, 0.0, c.s.beta, NULL) < 0)
        goto done;
    if (training) {
        if ((rmean_obj != Py_None && check_running(rmean_obj, "running_mean", &c.L) < 0) ||
            (rvar_obj != Py_None && check_running(rvar_obj, "running_var", &c.L) < 0))
            goto done;
    } else if (rmean_obj == Py_None || rvar_obj == Py_None) {
        PyErr_SetString(PyExc_ValueError,
                        "bnorm: training=False needs running_mean and running_var");
        goto done;
    } else if (per_feature(rmean_obj, "running_mean", &c.L, 1, 0.0, c.s.mean, NULL) < 0 ||
               per_feature(rvar_obj, "running_var", &c.L, 1, 0.0, c.s.var, NULL) < 0) {
        goto done;
    }
    if (call_out(&c, args[9]) < 0)
        goto done;
    RUN_WITHOUT_GIL(failed, training && step_stats(&c) < 0);
    if (failed)
        goto done;
    /* The running statistics' new values, before out is written (see new_running).  acc is free
     * once step_stats has turned its sums into mean and var. */
    if (training && rmean_obj != Py_None &&
        !(new_rmean = new_running(rmean_obj, c.s.mean, momentum, &c.L, c.s.acc)))
        goto done;
    if (training && rvar_obj != Py_None &&
        !(new_rvar = new_running(rvar_obj, c.s.var, momentum, &c.L, c.s.acc)))
        goto done;
    RUN_WITHOUT_GIL(failed, step_rstd(&c, eps) < 0 || step_normalize(&c) < 0);
    if (failed)
        goto done;
    mean = feature_array(&c, c.type_num, c.s.mean);
    rstd = feature_array(&c, c.type_num, c.s.rstd);
    PyObject *y = mean && rstd ? call_finish(&c) : NULL;
    if (!y ||
        (new_rmean && store_running(rmean_obj, new_rmean) < 0) ||
        (new_rvar && store_running(rvar_obj, new_rvar) < 0))
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

static PyObject *bn_backward(PyObject *self, PyObject *const *given, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    /* dy, x, mean, rstd, gamma, axis, training, out */
    PyObject *args[NPARAMS(backward_names)] = {NULL,    NULL,         NULL,    NULL,
                                               Py_None, default_axis, Py_True, Py_None};
    if (bind_args(&backward_sig, given, nargs, kwnames, args) < 0)
        return NULL;
    call c = {0};
    PyObject *result = NULL;
    PyArrayObject *gamma = NULL, *dgamma = NULL, *dbeta = NULL;
    int failed;
    const int training = PyObject_IsTrue(args[6]);
    if (training < 0)
        return NULL;
    if (call_data(&c, args[1], args[0], args[5]) < 0 || (training && require_batch(&c) < 0) ||
        required_per_feature(args[2], "mean", &c.L, 0, c.s.mean) < 0 ||
        required_per_feature(args[3], "rstd", &c.L, 0, c.s.rstd) < 0 ||
        per_feature(args[4], "gamma", &c.L, 0, 1.0, c.s.gamma, &gamma) < 0 ||
        call_out(&c, args[7]) < 0)
        goto done;
    RUN_WITHOUT_GIL(failed, step_bwd_sums(&c, training) < 0 ||
                                step_bwd_apply(&c, (double)c.L.m, training) < 0);
    if (failed)
        goto done;
    /* dgamma = rstd * sum(dy * (x - mean)), dbeta = sum(dy) */
    const npy_intp nf = c.L.nfeat;
    double *dgamma_f = c.s.var; /* var is free in backward */
    for (npy_intp f = 0; f < nf; f++)
        dgamma_f[f] = c.s.rstd[f] * c.s.acc[nf + f];
    dgamma = sum_to_param(&c, gamma, dgamma_f);
    dbeta = feature_array(&c, c.type_num, c.s.acc);
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

/* ---- the split phases, for statistics over several workers ---- */

/* batch_stats(x, axis) -> (count, mean, m2): float64 per feature, m2 = sum((x - mean)^2). */
static PyObject *bn_batch_stats(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs(nargs, 2, "batch_stats") < 0)
        return NULL;
    call c = {0};
    PyObject *result = NULL;
    int failed = 0;
    if (call_data(&c, args[0], NULL, args[1]) < 0)
        goto done;
    if (c.L.m > 0) {
        RUN_WITHOUT_GIL(failed, step_stats(&c) < 0);
        if (failed)
            goto done;
    }
    for (npy_intp f = 0; f < c.L.nfeat; f++)
        c.s.var[f] *= (double)c.L.m;
    PyArrayObject *mean = feature_array(&c, NPY_DOUBLE, c.s.mean);
    PyArrayObject *m2 = feature_array(&c, NPY_DOUBLE, c.s.var);
    if (mean && m2)
        result = Py_BuildValue("nOO", (Py_ssize_t)c.L.m, mean, m2);
    Py_XDECREF(mean);
    Py_XDECREF(m2);
done:
    call_clear(&c);
    return result;
}

/* normalize(x, mean, rstd, gamma, beta, axis, out) -> y */
static PyObject *bn_normalize(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs(nargs, 7, "normalize") < 0)
        return NULL;
    call c = {0};
    PyObject *result = NULL;
    int failed;
    if (call_data(&c, args[0], NULL, args[5]) < 0 ||
        required_per_feature(args[1], "mean", &c.L, 0, c.s.mean) < 0 ||
        required_per_feature(args[2], "rstd", &c.L, 0, c.s.rstd) < 0 ||
        per_feature(args[3], "gamma", &c.L, 0, 1.0, c.s.gamma, NULL) < 0 ||
        per_feature(args[4], "beta", &c.L, 0, 0.0, c.s.beta, NULL) < 0 ||
        call_out(&c, args[6]) < 0)
        goto done;
    RUN_WITHOUT_GIL(failed, step_normalize(&c) < 0);
    if (!failed) {
        result = call_finish(&c);
        Py_XINCREF(result);
    }
done:
    call_clear(&c);
    return result;
}

/* backward_sums(dy, x, mean, axis) -> (sum_dy, sum_dy_xmu): float64 per feature. */
static PyObject *bn_backward_sums(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs(nargs, 4, "backward_sums") < 0)
        return NULL;
    call c = {0};
    PyObject *result = NULL;
    int failed;
    if (call_data(&c, args[1], args[0], args[3]) < 0 ||
        required_per_feature(args[2], "mean", &c.L, 0, c.s.mean) < 0)
        goto done;
    RUN_WITHOUT_GIL(failed, step_bwd_sums(&c, 0) < 0);
    if (failed)
        goto done;
    PyArrayObject *sum_dy = feature_array(&c, NPY_DOUBLE, c.s.acc);
    PyArrayObject *sum_dy_xmu = feature_array(&c, NPY_DOUBLE, c.s.acc + c.L.nfeat);
    if (sum_dy && sum_dy_xmu)
        result = PyTuple_Pack(2, (PyObject *)sum_dy, (PyObject *)sum_dy_xmu);
    Py_XDECREF(sum_dy);
    Py_XDECREF(sum_dy_xmu);
done:
    call_clear(&c);
    return result;
}

/* backward_apply(dy, x, mean, rstd, gamma, sum_dy, sum_dy_xmu, count, axis, out) -> dx */
static PyObject *bn_backward_apply(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs(nargs, 10, "backward_apply") < 0)
        return NULL;
    call c = {0};
    PyObject *result = NULL;
    int err = 0, failed;
    const double count = as_double_arg(args[7], "count", &err);
    if (err)
        return NULL;
    if (!(count > 0)) {
        PyErr_Format(PyExc_ValueError, "bnorm: count must be > 0, got %R", args[7]);
        return NULL;
    }
    if (call_data(&c, args[1], args[0], args[8]) < 0 ||
        required_per_feature(args[2], "mean", &c.L, 0, c.s.mean) < 0 ||
        required_per_feature(args[3], "rstd", &c.L, 0, c.s.rstd) < 0 ||
        per_feature(args[4], "gamma", &c.L, 0, 1.0, c.s.gamma, NULL) < 0 ||
        required_per_feature(args[5], "sum_dy", &c.L, 1, c.s.acc) < 0 ||
        required_per_feature(args[6], "sum_dy_xmu", &c.L, 1, c.s.acc + c.L.nfeat) < 0 ||
        call_out(&c, args[9]) < 0)
        goto done;
    RUN_WITHOUT_GIL(failed, step_bwd_apply_given(&c, count) < 0);
    if (!failed) {
        result = call_finish(&c);
        Py_XINCREF(result);
    }
done:
    call_clear(&c);
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

/* bnorm.forward and bnorm.backward's docstrings, led by the signature inspect.signature reads. */
PyDoc_STRVAR(forward_doc,
    "forward($module, x, gamma=None, beta=None, *, axis=-1, eps=1e-08, training=True,"
    " running_mean=None, running_var=None, momentum=0.9, out=None)\n"
    "--\n"
    "\n"
    "Batch-normalize ``x`` over every axis except the feature axes ``axis``.\n"
    "\n"
    "Returns ``(y, mean, rstd)``.  ``axis`` (int or tuple, negative allowed; ``()`` reduces\n"
    "over everything) names the feature axes that are kept; the feature shape ``F`` is their\n"
    "lengths in axis order.  ``mean`` and ``rstd = 1/sqrt(var + eps)`` have shape ``F`` and\n"
    "``x``'s dtype; with ``x`` they are all that ``backward`` needs.\n"
    "\n"
    "training=True: batch statistics, with the biased variance.  If ``running_mean`` /\n"
    "``running_var`` (writable float arrays of shape ``F``) are given they are updated in\n"
    "place as ``r = momentum * r + (1 - momentum) * batch_stat`` (momentum is the weight of\n"
    "the old value, as in the post and Keras; PyTorch's ``momentum=m`` is ours ``1 - m``);\n"
    "the running variance is the same biased variance used to normalize.\n"
    "\n"
    "training=False: ``running_mean`` / ``running_var`` (shape ``F``) are required and used\n"
    "as the statistics; the returned ``mean`` equals ``running_mean``.\n"
    "\n"
    "``gamma`` / ``beta``: None (1 and 0), a scalar, or anything broadcasting to ``F``.\n"
    "``y = (x - mean) * (rstd * gamma) + beta`` (never folded to ``x * a + b``, which\n"
    "cancels for data far from zero).  Statistics are accumulated in float64 from shifted\n"
    "data, so float32 input far from zero (``1e4 + randn``) is normalized to float32\n"
    "precision.\n"
    "``out``: an array of ``x``'s shape and dtype to write ``y`` into (``out=x`` works in\n"
    "place).\n"
    "\n"
    "Errors (nothing is modified when one is raised): TypeError for non-float dtypes,\n"
    "AxisError for 0-d ``x`` or an axis out of range, ValueError for repeated axes, shapes\n"
    "that do not fit ``F``, an empty batch (M == 0) in training, missing running statistics\n"
    "when not training, read-only ``out`` or running statistics.  NaN and inf propagate only\n"
    "to the features they touch.");

PyDoc_STRVAR(backward_doc,
    "backward($module, dy, x, mean, rstd, gamma=None, *, axis=-1, training=True, out=None)\n"
    "--\n"
    "\n"
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
    "broadcast over; gamma None gives shape ``F``); ``dbeta`` has shape ``F``.  ``dy`` of the\n"
    "other float dtype is cast to ``x``'s.  In training mode ``mean`` is taken to be the\n"
    "batch mean of ``x``: the small residual between it and the exact batch mean (a float32\n"
    "``mean`` is rounded) is recomputed in float64, so gradients stay float32-accurate for\n"
    "data far from zero.  ``out`` as in ``forward`` (``out=dy`` works in place).");

static PyMethodDef methods[] = {
    {"forward", (PyCFunction)(void (*)(void))bn_forward, METH_FASTCALL | METH_KEYWORDS,
     forward_doc},
    {"backward", (PyCFunction)(void (*)(void))bn_backward, METH_FASTCALL | METH_KEYWORDS,
     backward_doc},
    {"batch_stats", (PyCFunction)(void (*)(void))bn_batch_stats, METH_FASTCALL,
     "batch_stats(x, axis) -> (count, mean, m2)"},
    {"normalize", (PyCFunction)(void (*)(void))bn_normalize, METH_FASTCALL,
     "normalize(x, mean, rstd, gamma, beta, axis, out) -> y"},
    {"backward_sums", (PyCFunction)(void (*)(void))bn_backward_sums, METH_FASTCALL,
     "backward_sums(dy, x, mean, axis) -> (sum_dy, sum_dy_xmu)"},
    {"backward_apply", (PyCFunction)(void (*)(void))bn_backward_apply, METH_FASTCALL,
     "backward_apply(dy, x, mean, rstd, gamma, sum_dy, sum_dy_xmu, count, axis, out) -> dx"},
    {"get_num_threads", bn_py_get_num_threads, METH_NOARGS,
     "get_num_threads() -> int: threads the kernels use."},
    {"set_num_threads", bn_py_set_num_threads, METH_O,
     "set_num_threads(n): let the kernels use n >= 1 threads (all callers, all threads)."},
    {"set_buffer_cache", bn_py_set_buffer_cache, METH_O,
     "set_buffer_cache(max_bytes) -> previous max_bytes: freed large outputs kept for reuse."},
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
    if (!AxisError || init_num_threads() < 0 || init_signatures() < 0)
        return NULL;
    if (bn_buffers_init() != 0) {
        PyErr_SetString(PyExc_RuntimeError, "bnorm: could not register a fork handler");
        return NULL;
    }
    buffer_handler_capsule = PyCapsule_New(&buffer_handler, "mem_handler", NULL);
    if (!buffer_handler_capsule)
        return NULL;
    return PyModule_Create(&module);
}
