/* Argument binding and converters (see args.h). */
#include "args.h"

#include <math.h>
#include <string.h>

#include "buffers.h"

static PyObject *AxisError; /* numpy.exceptions.AxisError */

/* NumPy's memory handler (NEP 49) over buffers.c, current only while a large output is made. */
static PyDataMem_Handler buffer_handler = {
    "bnorm_buffers",
    1,
    {NULL, bn_buffer_malloc, bn_buffer_calloc, bn_buffer_realloc, bn_buffer_free},
};
static PyObject *buffer_handler_capsule;

/* ---- binding ---- */

/* Interned names, defaults made from their literals, and the docstring led by the signature
 * inspect.signature reads. */
int bn_spec_init(bn_spec *spec)
{
    spec->nparams = 0;
    while (spec->nparams < BN_MAX_PARAMS && spec->params[spec->nparams].name)
        spec->nparams++;
    size_t doc_size = strlen(spec->fname) + strlen(spec->doc) + 32;
    for (Py_ssize_t i = 0; i < spec->nparams; i++) {
        const bn_param *p = &spec->params[i];
        if (!(spec->interned[i] = PyUnicode_InternFromString(p->name)))
            return -1;
        doc_size += strlen(p->name) + (p->default_text ? strlen(p->default_text) : 0) + 8;
        if (!p->default_text)
            continue;
        PyObject *text = PyUnicode_FromString(p->default_text);
        PyObject *ast = text ? PyImport_ImportModule("ast") : NULL;
        spec->defaults[i] = ast ? PyObject_CallMethod(ast, "literal_eval", "O", text) : NULL;
        Py_XDECREF(ast);
        Py_XDECREF(text);
        if (!spec->defaults[i])
            return -1;
    }
    char *doc = PyMem_Malloc(doc_size);
    if (!doc) {
        PyErr_NoMemory();
        return -1;
    }
    char *end = doc + sprintf(doc, "%s($module", spec->fname);
    for (Py_ssize_t i = 0; i < spec->nparams; i++) {
        const bn_param *p = &spec->params[i];
        if (i == spec->npos)
            end += sprintf(end, ", *");
        end += sprintf(end, p->default_text ? ", %s=%s" : ", %s", p->name, p->default_text);
    }
    sprintf(end, ")\n--\n\n%s", spec->doc);
    spec->signed_doc = doc;
    return 0;
}

/* The index of keyword key among spec's parameters, or nparams. */
static Py_ssize_t find_param(const bn_spec *spec, PyObject *key)
{
    for (Py_ssize_t i = 0; i < spec->nparams; i++)
        if (spec->interned[i] == key) /* keywords in code are interned */
            return i;
    for (Py_ssize_t i = 0; i < spec->nparams; i++) /* a keyword made at run time */
        if (PyUnicode_Compare(spec->interned[i], key) == 0)
            return i;
    return spec->nparams;
}

int bn_bind(const bn_spec *spec, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
            void *locals)
{
    PyObject *bound[BN_MAX_PARAMS] = {NULL};
    if (nargs > spec->npos) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd positional arguments (%zd given)",
                     spec->fname, spec->npos, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        bound[i] = args[i];
    const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        const Py_ssize_t i = find_param(spec, key);
        if (i == spec->nparams) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                         spec->fname, key);
            return -1;
        }
        if (bound[i]) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
                         spec->fname, spec->params[i].name);
            return -1;
        }
        bound[i] = args[nargs + k];
    }
    for (Py_ssize_t i = 0; i < spec->nparams; i++) {
        const bn_param *p = &spec->params[i];
        PyObject *value = bound[i] ? bound[i] : spec->defaults[i];
        if (!value) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s' (pos %zd)",
                         spec->fname, p->name, i + 1);
            return -1;
        }
        if (p->convert(value, (char *)locals + p->offset, p->name) < 0)
            return -1;
    }
    return 0;
}

int bn_to_object(PyObject *obj, void *local, const char *name)
{
    *(PyObject **)local = obj;
    return 0;
}

int bn_to_bool(PyObject *obj, void *local, const char *name)
{
    const int truth = PyObject_IsTrue(obj);
    *(int *)local = truth;
    return truth < 0 ? -1 : 0;
}

static int to_double(PyObject *obj, double *v, const char *name)
{
    *v = PyFloat_AsDouble(obj);
    if (*v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "bnorm: %s must be a real number, got %R", name, obj);
        return -1;
    }
    return 0;
}

int bn_to_eps(PyObject *obj, void *local, const char *name)
{
    double *v = local;
    if (to_double(obj, v, name) < 0)
        return -1;
    if (!(*v >= 0 && *v < INFINITY)) {
        PyErr_Format(PyExc_ValueError, "bnorm: %s must be a finite number >= 0, got %R", name, obj);
        return -1;
    }
    return 0;
}

int bn_to_momentum(PyObject *obj, void *local, const char *name)
{
    double *v = local;
    if (to_double(obj, v, name) < 0)
        return -1;
    if (!(*v >= 0 && *v <= 1)) {
        PyErr_Format(PyExc_ValueError, "bnorm: %s must be in [0, 1], got %R", name, obj);
        return -1;
    }
    return 0;
}

int bn_to_ddof(PyObject *obj, void *local, const char *name)
{
    PyObject *index = PyNumber_Index(obj); /* True is 1, as NumPy's ddof takes it */
    if (!index) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "bnorm: %s must be the int 0 or 1, got %R", name, obj);
        return -1;
    }
    int overflow;
    const long v = PyLong_AsLongAndOverflow(index, &overflow);
    Py_DECREF(index);
    if (overflow || (v != 0 && v != 1)) {
        PyErr_Format(PyExc_ValueError, "bnorm: %s must be 0 (biased) or 1 (unbiased), got %R",
                     name, obj);
        return -1;
    }
    *(int *)local = (int)v;
    return 0;
}

int bn_to_activation(PyObject *obj, void *local, const char *name)
{
    if (obj == Py_None) {
        *(int *)local = 0;
        return 0;
    }
    if (PyUnicode_Check(obj) && PyUnicode_CompareWithASCIIString(obj, "relu") == 0) {
        *(int *)local = 1;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "bnorm: %s must be None or 'relu', got %R", name, obj);
    return -1;
}

int bn_to_count(PyObject *obj, void *local, const char *name)
{
    double *v = local;
    if (to_double(obj, v, name) < 0)
        return -1;
    if (!(*v > 0)) {
        PyErr_Format(PyExc_ValueError, "bnorm: %s must be > 0, got %R", name, obj);
        return -1;
    }
    return 0;
}

/* ---- the axes: which are kept (features), how features are numbered ---- */

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

/* The axes axis names (an int or a sequence of them) as flags per axis of x. */
static int parse_axes(PyObject *axis, PyArrayObject *x, char *is_kept)
{
    const npy_intp ndim = PyArray_NDIM(x);
    if (ndim == 0) {
        PyErr_SetString(AxisError, "bnorm: x is 0-d; it needs at least one axis");
        return -1;
    }
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
    return 0;
}

/* The layout keeping the axes flagged in is_kept. */
static void layout_of(const char *is_kept, PyArrayObject *x, bn_layout *L)
{
    const npy_intp ndim = PyArray_NDIM(x);
    const npy_intp *shape = PyArray_DIMS(x);
    L->ndim = ndim;
    L->shape = shape;
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
    L->nparam = 0;
}

/* The call's layouts from axis, per the role axis has (see bn_axis_role). */
static int parse_layouts(PyObject *axis, PyArrayObject *x, bn_axis_role role, bn_layout *L,
                         bn_layout *P)
{
    char flagged[BN_MAXDIMS] = {0}, other[BN_MAXDIMS] = {0};
    if (role == BN_AXIS_CHANNEL && (PyTuple_Check(axis) || PyList_Check(axis))) {
        PyErr_Format(PyExc_TypeError, "bnorm: axis (the channel axis) must be an int, got %R",
                     axis);
        return -1;
    }
    if (parse_axes(axis, x, flagged) < 0)
        return -1;
    const npy_intp ndim = PyArray_NDIM(x);
    switch (role) {
    case BN_AXIS_KEPT:
        layout_of(flagged, x, L);
        break;
    case BN_AXIS_NORMALIZED:
        for (npy_intp d = 0; d < ndim; d++)
            other[d] = !flagged[d];
        layout_of(other, x, L);
        layout_of(flagged, x, P);
        memcpy(L->pstride, P->fstride, sizeof(npy_intp) * (size_t)ndim);
        L->nparam = P->nfeat;
        break;
    case BN_AXIS_CHANNEL:
        if (flagged[0]) {
            PyErr_SetString(PyExc_ValueError,
                            "bnorm: axis 0 holds the samples; the channel axis must be another");
            return -1;
        }
        layout_of(flagged, x, P);
        flagged[0] = 1;
        layout_of(flagged, x, L);
        break;
    }
    return 0;
}


/* ---- arrays ---- */

static int gather_broadcast(const bn_layout *L, PyArrayObject *arr, double *dst);

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

/* ml_dtypes' bfloat16 scalar type, found when the first array of a user-defined dtype comes: an
 * array of bfloat16 means ml_dtypes is imported, and bnorm never imports it itself. */
static PyObject *bfloat16_type;

int is_bfloat16(PyArray_Descr *descr)
{
    if (descr->type_num < NPY_USERDEF)
        return 0;
    if (!bfloat16_type) {
        PyObject *name = PyUnicode_FromString("ml_dtypes");
        PyObject *ml_dtypes = name ? PyImport_GetModule(name) : NULL;
        bfloat16_type = ml_dtypes ? PyObject_GetAttrString(ml_dtypes, "bfloat16") : NULL;
        Py_XDECREF(ml_dtypes);
        Py_XDECREF(name);
        PyErr_Clear(); /* not imported, or without bfloat16: not bfloat16 */
    }
    return bfloat16_type && (PyObject *)descr->typeobj == bfloat16_type;
}

/* The kernels' dtype for an array's, or -1 when there are no kernels for it. */
static int data_dtype(PyArray_Descr *descr)
{
    switch (descr->type_num) {
    case NPY_FLOAT:
        return BN_FLOAT32;
    case NPY_DOUBLE:
        return BN_FLOAT64;
    case NPY_HALF:
        return BN_FLOAT16;
    default:
        return is_bfloat16(descr) ? BN_BFLOAT16 : -1;
    }
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
    if (data_dtype(PyArray_DESCR(arr)) < 0) {
        PyErr_Format(PyExc_TypeError,
                     "bnorm: %s has dtype %R; only float16, bfloat16 (ml_dtypes), float32 and "
                     "float64 are supported", name,
                     (PyObject *)PyArray_DESCR(arr));
        Py_DECREF(arr);
        return NULL;
    }
    if (!PyArray_ISNOTSWAPPED(arr)) {
        PyArrayObject *native = (PyArrayObject *)PyArray_FromArray(
            arr, PyArray_DescrNewByteorder(PyArray_DESCR(arr), NPY_NATIVE), NPY_ARRAY_NOTSWAPPED);
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
    if (PyArray_ISBOOL(arr) ||
        !(PyArray_ISFLOAT(arr) || PyArray_ISINTEGER(arr) || is_bfloat16(PyArray_DESCR(arr)))) {
        PyErr_Format(PyExc_TypeError, "bnorm: %s has dtype %R; expected real numbers", name,
                     (PyObject *)PyArray_DESCR(arr));
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

/* For every feature f (C order over F), the C-order element index of arr that broadcasts onto
 * it; arr's shape must broadcast to F. */
void broadcast_map(const bn_layout *L, npy_intp src_ndim, const npy_intp *src_shape,
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

npy_intp param_dims(const bn_layout *L, PyArrayObject *arr, const npy_intp **dims,
                    npy_intp *keepdims_buffer)
{
    const npy_intp nd = PyArray_NDIM(arr);
    *dims = PyArray_DIMS(arr);
    if (nd != L->ndim || nd == L->nkept)
        return nd;
    for (npy_intp d = 0, i = 0; d < nd; d++) {
        if (i < L->nkept && L->kept[i] == d)
            keepdims_buffer[i++] = PyArray_DIM(arr, d);
        else if (PyArray_DIM(arr, d) != 1)
            return nd; /* not keepdims: its own shape (which does not fit) */
    }
    *dims = keepdims_buffer;
    return L->nkept;
}

/* dims (of a parameter, as param_dims gives them) broadcast to F, by NumPy's rules. */
static int broadcasts_to_features(const bn_layout *L, npy_intp nd, const npy_intp *dims)
{
    const npy_intp lead = L->nkept - nd;
    if (lead < 0)
        return 0;
    for (npy_intp d = 0; d < nd; d++)
        if (dims[d] != 1 && dims[d] != L->fshape[lead + d])
            return 0;
    return 1;
}

static int is_feature_shape(const bn_layout *L, npy_intp nd, const npy_intp *dims)
{
    return nd == L->nkept && PyArray_CompareLists(dims, L->fshape, nd);
}

int has_feature_shape(const bn_layout *L, PyArrayObject *arr)
{
    npy_intp buffer[BN_MAXDIMS];
    const npy_intp *dims;
    const npy_intp nd = param_dims(L, arr, &dims, buffer);
    return is_feature_shape(L, nd, dims);
}

int per_feature(PyObject *obj, const char *name, const bn_layout *L, int exact, double dflt,
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
    npy_intp buffer[BN_MAXDIMS];
    const npy_intp *dims;
    const npy_intp nd = param_dims(L, arr, &dims, buffer);
    const int shaped_f = is_feature_shape(L, nd, dims);
    if (exact ? !shaped_f : !broadcasts_to_features(L, nd, dims)) {
        shape_error(PyExc_ValueError, name, PyArray_NDIM(arr), PyArray_DIMS(arr),
                    exact ? "but the feature shape is"
                          : "which does not broadcast to the feature shape",
                    L->nkept, L->fshape);
        Py_DECREF(arr);
        return -1;
    }
    if (shaped_f && PyArray_IS_C_CONTIGUOUS(arr) && PyArray_ISALIGNED(arr) &&
        PyArray_ISNOTSWAPPED(arr) && is_supported_float(PyArray_TYPE(arr))) {
        /* the common case, read as it is: an F-shaped (or keepdims) float32/float64 vector */
        for (npy_intp f = 0; f < L->nfeat; f++)
            dst[f] = bn_load_as(PyArray_BYTES(arr), f, (size_t)PyArray_ITEMSIZE(arr));
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
int required_per_feature(PyObject *obj, const char *name, const bn_layout *L, int exact,
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
static int gather_broadcast(const bn_layout *L, PyArrayObject *arr, double *dst)
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
    npy_intp buffer[BN_MAXDIMS];
    const npy_intp *dims;
    const npy_intp nd = param_dims(L, arr, &dims, buffer);
    broadcast_map(L, nd, dims, map);
    const double *src = (const double *)PyArray_DATA(dbl);
    for (npy_intp f = 0; f < L->nfeat; f++)
        dst[f] = src[map[f]];
    PyMem_Free(map);
    Py_DECREF(dbl);
    return 0;
}

int check_running(PyObject *obj, const char *name, const bn_layout *L)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError,
                     "bnorm: %s must be a NumPy array (it is updated in place), got %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    if (!PyArray_ISFLOAT(arr) && !is_bfloat16(PyArray_DESCR(arr))) {
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


/* ---- one call's arrays ---- */

void call_clear(call *c)
{
    bn_scratch_free(&c->core.s);
    bn_scratch_free(&c->core.p);
    Py_XDECREF(c->x);
    Py_XDECREF(c->dy);
    Py_XDECREF(c->result);
}

static bn_operand operand(PyArrayObject *a)
{
    const bn_operand op = {PyArray_BYTES(a), PyArray_STRIDES(a)};
    return op;
}

int call_data(call *c, PyObject *x_obj, PyObject *dy_obj, PyObject *axis, bn_axis_role role)
{
    c->x = as_data_array(x_obj, "x");
    if (!c->x || parse_layouts(axis, c->x, role, &c->core.L, &c->P) < 0)
        return -1;
    c->type_num = PyArray_TYPE(c->x);
    const bn_dtype dtype = (bn_dtype)data_dtype(PyArray_DESCR(c->x));
    c->core.K = bn_kernels(dtype);
    /* half precision: statistics come back as float32, which keeps what the sums found */
    c->half_precision = dtype == BN_FLOAT16 || dtype == BN_BFLOAT16;
    c->stats_type_num = dtype == BN_FLOAT64 ? NPY_DOUBLE : NPY_FLOAT;
    c->core.x = operand(c->x);
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
            PyArray_Descr *descr = PyArray_DESCR(c->x);
            Py_INCREF(descr); /* PyArray_FromArray steals it */
            Py_SETREF(c->dy, (PyArrayObject *)PyArray_FromArray(c->dy, descr, NPY_ARRAY_FORCECAST));
            if (!c->dy)
                return -1;
        }
        c->core.dy = operand(c->dy);
    }
    if (bn_scratch_alloc(&c->core.s, c->core.L.nfeat, c->core.K->coef_itemsize) < 0 ||
        (role != BN_AXIS_KEPT &&
         bn_scratch_alloc(&c->core.p, c->P.nfeat, c->core.K->coef_itemsize) < 0)) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

int call_require_batch(const call *c)
{
    const bn_layout *L = &c->core.L;
    if (L->m == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "bnorm: no elements to reduce over (a batch axis has length 0)");
        return -1;
    }
    if (L->m == 1 && L->nfeat > 0) {
        /* y would be beta and dx zero: always a mistake, most often a 1-d x (every element its
         * own feature under axis=-1) or a batch of one */
        PyObject *shape = shape_tuple(L->ndim, L->shape), *fshape = shape_tuple(L->nkept, L->fshape);
        if (shape && fshape)
            PyErr_Format(PyExc_ValueError,
                         "bnorm: training needs more than one value per feature, but x of shape "
                         "%R has one per feature (feature shape %R: axis names the kept axes; "
                         "training=False normalizes with running statistics)", shape, fshape);
        Py_XDECREF(shape);
        Py_XDECREF(fshape);
        return -1;
    }
    return 0;
}

int call_out(call *c, PyObject *out_obj)
{
    if (out_obj != Py_None) {
        if (check_out(out_obj, c->x) < 0)
            return -1;
        c->out = (PyArrayObject *)out_obj;
    }
    c->result = result_array(c->out, c->x, c->dy);
    if (!c->result)
        return -1;
    c->core.result = operand(c->result);
    return 0;
}

PyObject *call_finish(call *c)
{
    if (c->out && c->out != c->result && PyArray_CopyInto(c->out, c->result) < 0)
        return NULL;
    return c->out ? (PyObject *)c->out : (PyObject *)c->result;
}

int bn_args_init(void)
{
    PyObject *exceptions = PyImport_ImportModule("numpy.exceptions");
    if (!exceptions) {
        /* NumPy < 1.25 */
        PyErr_Clear();
        exceptions = PyImport_ImportModule("numpy");
        if (!exceptions)
            return -1;
    }
    AxisError = PyObject_GetAttrString(exceptions, "AxisError");
    Py_DECREF(exceptions);
    if (!AxisError)
        return -1;
    buffer_handler_capsule = PyCapsule_New(&buffer_handler, "mem_handler", NULL);
    return buffer_handler_capsule ? 0 : -1;
}
