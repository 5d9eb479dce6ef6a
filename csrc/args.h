/* Argument binding and converters: from a call's Python arguments to named, typed C locals.
 *
 * Each entry point declares its parameters once, in a bn_spec (name, default, converter, where
 * the converted value goes), in the style of CPython's Argument Clinic and NumPy's npy_argparse;
 * bn_bind binds positional and keyword arguments to it the way Python binds a def's, applies the
 * defaults and runs the converters.  The same spec yields the function's text signature, so
 * inspect.signature, the docs and the binding cannot disagree.
 *
 * The arrays are converted here too: x and dy to data arrays, the axes to a layout, per-feature
 * parameters to float64 vectors, running statistics and out= checked.  All checks happen before
 * anything is written, so a raised exception leaves every argument as it was.
 */
#ifndef BNORM_ARGS_H
#define BNORM_ARGS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
/* NumPy's C API table is one for the module: module.c, which defines BN_IMPORTS_ARRAY, fills it
 * with import_array; the other files use it. */
#define PY_ARRAY_UNIQUE_SYMBOL bnorm_ARRAY_API
#ifndef BN_IMPORTS_ARRAY
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include <stddef.h>

#include "passes.h"

/* ---- binding ---- */

/* obj (the argument given, or the parameter's default) into the typed local at `local`.  Returns
 * 0, or -1 with an exception set.  `name` is the parameter's, for the message. */
typedef int (*bn_converter)(PyObject *obj, void *local, const char *name);

typedef struct {
    const char *name;
    const char *default_text; /* a Python literal (None, True, -1, 1e-08); NULL: required */
    bn_converter convert;
    size_t offset; /* of the typed local in the entry point's struct of arguments */
} bn_param;

#define BN_MAX_PARAMS 12

typedef struct {
    const char *fname;  /* as Python calls it: "forward" */
    Py_ssize_t npos;    /* the first npos parameters may come by position; the rest keyword-only */
    bn_param params[BN_MAX_PARAMS]; /* in order, then unused entries (name NULL) */
    const char *doc;    /* the docstring after the signature */
    /* made by bn_spec_init, at import */
    Py_ssize_t nparams; /* the params given */
    PyObject *interned[BN_MAX_PARAMS]; /* the names */
    PyObject *defaults[BN_MAX_PARAMS]; /* NULL for required parameters */
    char *signed_doc;                  /* "fname($module, ...)\n--\n\n" + doc */
} bn_spec;

/* A parameter whose converted value is field `field` of struct `type`. */
#define BN_PARAM(type, field, default_text, converter)                                             \
    {#field, default_text, converter, offsetof(type, field)}

int bn_spec_init(bn_spec *spec);

/* Bind a METH_FASTCALL | METH_KEYWORDS call to spec: locals receives every parameter's converted
 * value (references stay borrowed).  Returns 0, or -1 with TypeError/ValueError set. */
int bn_bind(const bn_spec *spec, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
            void *locals);

/* Converters: the object itself (PyObject *, borrowed); a truth value (int); eps, a finite
 * double >= 0; momentum, a double in [0, 1]; a variance's ddof, the int 0 or 1; an element count,
 * a double > 0. */
int bn_to_object(PyObject *obj, void *local, const char *name);
int bn_to_bool(PyObject *obj, void *local, const char *name);
int bn_to_eps(PyObject *obj, void *local, const char *name);
int bn_to_momentum(PyObject *obj, void *local, const char *name);
int bn_to_ddof(PyObject *obj, void *local, const char *name);
/* an activation fused after the normalization: None (0) or "relu" (1) */
int bn_to_activation(PyObject *obj, void *local, const char *name);
int bn_to_count(PyObject *obj, void *local, const char *name);

/* ---- arrays ---- */

/* What an entry point's axis names: the kept (feature) axes (batch norm), the normalized axes
 * (layer and RMS norm: the other axes carry the statistics, these the parameters) or the
 * channel axis (group norm: statistics per (sample, channel) pair, axis 0 the samples). */
typedef enum { BN_AXIS_KEPT, BN_AXIS_NORMALIZED, BN_AXIS_CHANNEL } bn_axis_role;

/* One call's arrays around its plain-C state (core): what it owns, and what out= asked for. */
typedef struct {
    PyArrayObject *x, *dy;   /* owned */
    PyArrayObject *out;      /* borrowed: the caller's out=, or NULL */
    PyArrayObject *result;   /* owned: what the elementwise pass writes (out, new, or temporary) */
    int type_num;            /* x's */
    int half_precision;      /* x is float16 or bfloat16 */
    int stats_type_num;      /* of mean and rstd: x's, float32 for half precision */
    bn_call core;
    /* the parameters' layout (not BN_AXIS_KEPT): the normalized axes, or the channel axis */
    bn_layout P;
} call;

/* x (and dy, if dy_obj is given) as data arrays, the layouts of axis in its role, the kernels,
 * the scratch (per parameter too, except for BN_AXIS_KEPT). */
int call_data(call *c, PyObject *x_obj, PyObject *dy_obj, PyObject *axis, bn_axis_role role);
/* ValueError when training has fewer than two elements per feature to reduce over. */
int call_require_batch(const call *c);
/* Check out= (Py_None: a new array) and choose the array the elementwise pass writes. */
int call_out(call *c, PyObject *out_obj);
/* The elementwise result as the caller sees it: out (filled from a temporary if one was needed),
 * or the new array.  Borrowed; NULL on error. */
PyObject *call_finish(call *c);
void call_clear(call *c);

/* Fill dst[0..nfeat) with obj broadcast to F (exact: obj must have shape F), or with dflt when obj
 * is None.  If shape_of is given it receives the parameter array (for dgamma's shape). */
int per_feature(PyObject *obj, const char *name, const bn_layout *L, int exact, double dflt,
                double *dst, PyArrayObject **shape_of);
/* per_feature for an argument without a default (mean, rstd, gradient sums): None is a
 * TypeError. */
int required_per_feature(PyObject *obj, const char *name, const bn_layout *L, int exact,
                         double *dst);
/* Running statistics are updated in place: a writable float ndarray of shape F (or keepdims). */
int check_running(PyObject *obj, const char *name, const bn_layout *L);

/* The shape a per-feature parameter is read in (returns its ndim, points dims at it): its own,
 * or for x's keepdims shape (x.ndim axes, length 1 on every batch axis: (1, C, 1, 1) for NCHW)
 * the lengths of its feature axes alone, written to keepdims_buffer (BN_MAXDIMS long).  The two
 * have the same elements in the same C order. */
npy_intp param_dims(const bn_layout *L, PyArrayObject *arr, const npy_intp **dims,
                    npy_intp *keepdims_buffer);
/* Whether param_dims of arr is F itself. */
int has_feature_shape(const bn_layout *L, PyArrayObject *arr);

/* For every feature f (C order over F), the C-order element index of an array of src_shape that
 * broadcasts onto it. */
void broadcast_map(const bn_layout *L, npy_intp src_ndim, const npy_intp *src_shape,
                   npy_intp *map);

/* Whether descr is ml_dtypes' bfloat16 (never imports ml_dtypes). */
int is_bfloat16(PyArray_Descr *descr);

/* At import: numpy's AxisError and the output buffers' memory handler. */
int bn_args_init(void);

#endif
