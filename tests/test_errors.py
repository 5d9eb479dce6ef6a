"""Bad input: every row of docs/api.md's table, for forward, backward and the split phases.

Each case starts from a call that is known to succeed (``test_baseline_is_valid``), changes one
thing, and checks that

* the exception is the type docs/api.md names, with a message that names what is wrong;
* no argument was modified: every array argument (``out=`` and running statistics included) is
  compared bitwise with a copy taken before the call.

A crash of the interpreter fails the whole run; a SystemError never matches the expected types.
"""
import re
import warnings

import ml_dtypes
import numpy as np
import pytest
from helpers import AxisError, assert_raises_untouched, axes_of, readonly

import bnorm

RNG = np.random.default_rng(20240601)


# ---- layouts and valid calls ----

# (x's shape, axis, F): channels-last, NCHW, two feature axes, no feature axis (axis=()).
LAYOUTS = {
    "nf": ((4, 3), -1, (3,)),
    "nchw": ((2, 3, 4, 5), 1, (3,)),
    "two_axes": ((2, 3, 4, 5), (1, 3), (3, 5)),
    "no_feature_axis": ((5,), (), ()),
}


def valid_call(name, layout="nf", dtype=np.float64):
    """(function, kwargs) of a call that succeeds, with every optional array argument given."""
    shape, axis, F = LAYOUTS[layout]
    x = RNG.standard_normal(shape).astype(dtype)
    dy = RNG.standard_normal(shape).astype(dtype)
    red, _ = axes_of(len(shape), axis)
    mean = np.asarray(x.mean(axis=red))   # 0-d arrays, not NumPy scalars, when F == ()
    rstd = np.asarray(1 / np.sqrt(x.var(axis=red) + 1e-5))
    gamma = RNG.uniform(0.5, 2, F).astype(dtype)
    beta = RNG.standard_normal(F).astype(dtype)
    out = RNG.standard_normal(shape).astype(dtype)   # not empty: untouched must mean something
    if name == "forward":
        kw = dict(x=x, gamma=gamma, beta=beta, axis=axis, eps=1e-5, training=True,
                  running_mean=RNG.standard_normal(F).astype(dtype),
                  running_var=RNG.uniform(0.5, 2, F).astype(dtype), momentum=0.9, out=out)
    elif name == "forward_eval":
        kw = dict(x=x, gamma=gamma, beta=beta, axis=axis, eps=1e-5, training=False,
                  running_mean=mean.copy(), running_var=np.asarray(x.var(axis=red)), out=out)
        return bnorm.forward, kw
    elif name == "backward":
        kw = dict(dy=dy, x=x, mean=mean, rstd=rstd, gamma=gamma, axis=axis, training=True, out=out)
    elif name == "batch_stats":
        kw = dict(x=x, axis=axis)
    elif name == "normalize":
        kw = dict(x=x, mean=mean, rstd=rstd, gamma=gamma, beta=beta, axis=axis, out=out)
    elif name == "backward_sums":
        kw = dict(dy=dy, x=x, mean=mean, axis=axis)
    elif name == "backward_apply":
        m = np.prod([shape[d] for d in red], dtype=np.int64)
        kw = dict(dy=dy, x=x, mean=mean, rstd=rstd, sum_dy=np.asarray(dy.sum(axis=red)),
                  sum_dy_xmu=np.asarray((dy * (x - x.mean(axis=red, keepdims=True))).sum(axis=red)),
                  count=int(m), gamma=gamma, axis=axis, out=out)
    else:
        raise AssertionError(name)
    return getattr(bnorm, name), kw


FUNCS = ["forward", "forward_eval", "backward", "batch_stats", "normalize", "backward_sums",
         "backward_apply"]
WITH_OUT = ["forward", "forward_eval", "backward", "normalize", "backward_apply"]
# Float data, converted but never cast from another kind: x, and dy where there is one.
DATA_ARGS = [(f, a) for f in FUNCS for a in ("x", "dy") if a in valid_call(f)[1]]
# Per-feature arrays that broadcast to F, and those that must have exactly shape F.
BROADCAST_ARGS = [("forward", "gamma"), ("forward", "beta"), ("forward_eval", "gamma"),
                  ("backward", "mean"), ("backward", "rstd"), ("backward", "gamma"),
                  ("normalize", "mean"), ("normalize", "rstd"), ("normalize", "gamma"),
                  ("normalize", "beta"), ("backward_sums", "mean"), ("backward_apply", "mean"),
                  ("backward_apply", "rstd"), ("backward_apply", "gamma")]
EXACT_ARGS = [("forward", "running_mean"), ("forward", "running_var"),
              ("forward_eval", "running_mean"), ("forward_eval", "running_var"),
              ("backward_apply", "sum_dy"), ("backward_apply", "sum_dy_xmu")]
# Arguments without a default: None is not "1" or "0" for them.
REQUIRED_ARGS = ([(f, "x") for f in FUNCS] + [(f, "dy") for f, a in DATA_ARGS if a == "dy"] +
                 [(f, a) for f, a in BROADCAST_ARGS if a in ("mean", "rstd")] +
                 [("backward_apply", "sum_dy"), ("backward_apply", "sum_dy_xmu"),
                  ("backward_apply", "count")])


def shapes_pattern(name, bad, good):
    """'<name> ... <bad shape> ... <good shape>': the message names both shapes."""
    return rf"{re.escape(name)}\b.*{re.escape(str(bad))}.*{re.escape(str(good))}"


def dtype_pattern(name, dtype):
    dtype = np.dtype(dtype)
    names = "|".join(re.escape(s) for s in {str(dtype), repr(dtype), dtype.name})
    return rf"{re.escape(name)}\b.*({names})"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", FUNCS)
def test_baseline_is_valid(name, layout):
    # Every case below is one change away from this call: the error comes from that change.
    fn, kw = valid_call(name, layout)
    fn(**kw)


# ---- dtypes ----

# float16, bfloat16, float32 and float64 have kernels (docs/api.md); long double and ml_dtypes'
# other small floats do not.
BAD_DATA_DTYPES = [np.int8, np.int64, np.uint32, np.bool_, np.longdouble, np.complex64,
                   np.complex128, object, "U8", "S8", ml_dtypes.float8_e4m3fn]


@pytest.mark.parametrize("dtype", BAD_DATA_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name,arg", DATA_ARGS)
def test_data_of_unsupported_dtype(name, arg, dtype):
    fn, kw = valid_call(name)
    kw[arg] = kw[arg].astype(dtype)
    assert_raises_untouched(fn, kw, TypeError, dtype_pattern(arg, dtype))


# Per-feature parameters are read, not written: integers (like the post's scalar gamma, or any
# array NumPy would promote) and any float dtype are fine; these are not numbers on a real line.
BAD_PARAM_DTYPES = [np.bool_, np.complex128, object, "U8", "S8"]


@pytest.mark.parametrize("dtype", BAD_PARAM_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name,arg", BROADCAST_ARGS + EXACT_ARGS)
def test_parameter_of_unsupported_dtype(name, arg, dtype):
    fn, kw = valid_call(name)
    kw[arg] = kw[arg].astype(dtype)
    assert_raises_untouched(fn, kw, TypeError, dtype_pattern(arg, dtype))


@pytest.mark.parametrize("dtype", [np.int32, np.float16, np.float32])
@pytest.mark.parametrize("name,arg", BROADCAST_ARGS)
def test_parameter_of_other_real_dtype_is_accepted(name, arg, dtype):
    fn, kw = valid_call(name)
    kw[arg] = np.ones_like(kw[arg], dtype=dtype)
    fn(**kw)


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex128, object])
@pytest.mark.parametrize("arg", ["running_mean", "running_var"])
def test_running_stat_updated_in_place_must_be_float(arg, dtype):
    fn, kw = valid_call("forward")
    kw[arg] = kw[arg].astype(dtype)
    assert_raises_untouched(fn, kw, TypeError, dtype_pattern(arg, dtype))


# ---- axes ----

@pytest.mark.parametrize("x", [np.array(1.0), np.float32(1.0), 1.0], ids=["0d", "np_scalar", "float"])
@pytest.mark.parametrize("name", FUNCS)
def test_zero_d_x(name, x):
    fn, kw = valid_call(name)
    kw["x"] = x
    if "dy" in kw:
        kw["dy"] = np.array(1.0)
    kw.pop("out", None)
    assert_raises_untouched(fn, kw, AxisError, "0-d")


@pytest.mark.parametrize("axis", [2, -3, (0, 2), (-3,), 2**31, -2**31 - 1, 2**63, 2**200,
                                  np.int64(7), np.uint64(2**64 - 1)], ids=repr)
@pytest.mark.parametrize("name", FUNCS)
def test_axis_out_of_range(name, axis):
    fn, kw = valid_call(name)   # x has 2 dims
    kw["axis"] = axis
    assert_raises_untouched(fn, kw, AxisError, "out of bounds")


@pytest.mark.parametrize("axis", [(0, 0), (1, -1), [1, 1], (0, 1, 0)], ids=repr)
@pytest.mark.parametrize("name", FUNCS)
def test_repeated_axes(name, axis):
    fn, kw = valid_call(name)
    kw["axis"] = axis
    # NumPy says "duplicate value in 'axis'"; any wording of that is fine.
    assert_raises_untouched(fn, kw, ValueError, "repeat|duplicate")


# NumPy itself rejects all of these (np.sum(x, axis=...)) with TypeError; None in particular does
# not mean "all axes" here, since axis names the axes that are kept (``()`` keeps none).
@pytest.mark.parametrize("axis", ["0", b"0", 1.0, None, True, np.True_, [[0]], (0, "1"),
                                  np.array([0, 1]), {0: 1}], ids=repr)
@pytest.mark.parametrize("name", FUNCS)
def test_axis_of_wrong_type(name, axis):
    fn, kw = valid_call(name)
    kw["axis"] = axis
    assert_raises_untouched(fn, kw, TypeError, "axis")


# ---- shapes ----

def not_broadcasting_to(F):
    """Shapes NumPy cannot broadcast to F."""
    wrong_last = [F[:-1] + (F[-1] + 1,)] if F else []
    return wrong_last + [F + (2,), F + (1,)]


def not_exactly(F):
    """Shapes other than F, including ones that broadcast to it."""
    return not_broadcasting_to(F) + [(1,) + F] + ([(1,) * len(F)] if F else [])


def keepdims_shape(layout):
    """x's shape with every batch axis 1: a per-feature argument may come in it (docs/api.md)."""
    shape, axis, _ = LAYOUTS[layout]
    _, kept = axes_of(len(shape), axis)
    return tuple(n if d in kept else 1 for d, n in enumerate(shape))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,arg", BROADCAST_ARGS + EXACT_ARGS)
def test_per_feature_array_not_fitting_F(name, arg, layout):
    F = LAYOUTS[layout][2]
    for bad in (not_exactly if (name, arg) in EXACT_ARGS else not_broadcasting_to)(F):
        if bad == keepdims_shape(layout):
            continue  # valid (test_keepdims_parameters_are_accepted)
        fn, kw = valid_call(name, layout)
        kw[arg] = np.ones(bad, kw[arg].dtype)
        assert_raises_untouched(fn, kw, ValueError, shapes_pattern(arg, bad, F))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,arg", BROADCAST_ARGS + EXACT_ARGS)
def test_keepdims_parameters_are_accepted(name, arg, layout):
    """The same call with one per-feature argument in x's keepdims shape gives the same results;
    a running statistic is updated in its own shape (tests/test_core.py checks the values)."""
    fn, kw = valid_call(name, layout)
    want = fn(**{k: v.copy() if isinstance(v, np.ndarray) else v for k, v in kw.items()})
    kw[arg] = kw[arg].reshape(keepdims_shape(layout)).copy()
    got = fn(**kw)
    assert kw[arg].shape == keepdims_shape(layout)
    for g, w in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        np.testing.assert_array_equal(np.asarray(g).ravel(), np.asarray(w).ravel())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["forward", "backward"])
def test_training_with_one_value_per_feature(name, layout):
    """M == 1 in training: y would be beta, dx zero.  A ValueError naming x's shape, nothing
    modified; inference with M == 1 works."""
    one = keepdims_shape(layout)  # one batch row: every batch axis of length 1
    fn, kw = valid_call(name, layout)
    for k in ("x", "dy", "out"):
        if k in kw:
            kw[k] = kw[k][tuple(slice(0, n) for n in one)].copy()
    assert_raises_untouched(fn, kw, ValueError,
                            rf"x of shape {re.escape(str(one))} has one per feature")
    if name == "forward":
        kw.update(training=False)
        assert fn(**kw)[0].shape == one


@pytest.mark.parametrize("value,exc", [(2, ValueError), (-1, ValueError), (2**70, ValueError),
                                       (0.5, TypeError), ("1", TypeError), (None, TypeError),
                                       ([1], TypeError)], ids=repr)
def test_running_var_ddof_bad(value, exc):
    fn, kw = valid_call("forward")
    kw["running_var_ddof"] = value
    assert_raises_untouched(fn, kw, exc, "running_var_ddof")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", [f for f, a in DATA_ARGS if a == "dy"])
def test_dy_not_of_x_shape(name, layout):
    S = LAYOUTS[layout][0]
    # broadcastable, transposed, flattened, one more axis, one element more
    for bad in [(1,) + S[1:], S[::-1], (int(np.prod(S)),), S + (1,), S[:-1] + (S[-1] + 1,)]:
        if bad == S:
            continue
        fn, kw = valid_call(name, layout)
        kw["dy"] = np.ones(bad)
        assert_raises_untouched(fn, kw, ValueError, shapes_pattern("dy", bad, S))


# ---- out= ----

# As with NumPy's ufuncs: out of the wrong shape or read-only is a ValueError, of a dtype the
# result cannot be written to without a cast a TypeError.
def out_of_wrong_shape(x):
    return [np.zeros(s, x.dtype) for s in [(1,) + x.shape[1:], x.shape[::-1], (x.size,),
                                            x.shape + (1,)]]


@pytest.mark.parametrize("name", WITH_OUT)
def test_out_of_wrong_shape(name):
    _, kw = valid_call(name)
    for out in out_of_wrong_shape(kw["x"]):
        fn, kw = valid_call(name)
        kw["out"] = out
        assert_raises_untouched(fn, kw, ValueError, shapes_pattern("out", out.shape, kw["x"].shape))


@pytest.mark.parametrize("out_dtype", [np.float32, np.float16, np.int64, np.complex128, object,
                                       ">f8"], ids=lambda d: np.dtype(d).str)
@pytest.mark.parametrize("name", WITH_OUT)
def test_out_of_wrong_dtype(name, out_dtype):
    fn, kw = valid_call(name)   # float64
    kw["out"] = kw["out"].astype(out_dtype)
    assert_raises_untouched(fn, kw, TypeError, "out")


@pytest.mark.parametrize("name", WITH_OUT)
def test_float64_out_for_float32_result(name):
    fn, kw = valid_call(name, dtype=np.float32)
    kw["out"] = kw["out"].astype(np.float64)
    assert_raises_untouched(fn, kw, TypeError, "out")


@pytest.mark.parametrize("name", WITH_OUT)
def test_read_only_out(name):
    fn, kw = valid_call(name)
    kw["out"] = readonly(kw["out"])
    assert_raises_untouched(fn, kw, ValueError, "out.*read-only")


@pytest.mark.parametrize("out", [[0.0] * 12, 0.0, "out", memoryview(bytearray(96))],
                         ids=["list", "float", "str", "memoryview"])
@pytest.mark.parametrize("name", WITH_OUT)
def test_out_not_an_array(name, out):
    # out is written in place, so an array-like that np.asarray would copy cannot be it.
    fn, kw = valid_call(name)
    kw["out"] = out
    assert_raises_untouched(fn, kw, TypeError, "out")


@pytest.mark.parametrize("name", ["forward", "backward", "normalize", "backward_apply"])
def test_failing_in_place_call_leaves_x_alone(name):
    # out=x (out=dy in backward) with one bad argument: the data must survive the error.
    fn, kw = valid_call(name)
    target = "dy" if "dy" in kw else "x"
    kw["out"] = kw[target]
    kw["gamma"] = np.ones(7)
    assert_raises_untouched(fn, kw, ValueError, "gamma")


# ---- running statistics ----

@pytest.mark.parametrize("given", [(), ("running_mean",), ("running_var",)], ids=repr)
def test_eval_without_running_stats(given):
    fn, kw = valid_call("forward_eval")
    for arg in {"running_mean", "running_var"} - set(given):
        kw[arg] = None
    assert_raises_untouched(fn, kw, ValueError, "running")


@pytest.mark.parametrize("which", [("running_mean",), ("running_var",),
                                   ("running_mean", "running_var")], ids=repr)
def test_read_only_running_stats_in_training(which):
    # One read-only statistic: the other one (and out) must not have been updated either.
    fn, kw = valid_call("forward")
    for arg in which:
        kw[arg] = readonly(kw[arg])
    assert_raises_untouched(fn, kw, ValueError, f"{which[0]}.*read-only")


def test_read_only_running_stats_are_fine_in_eval():
    # Not an error: they are only read.
    fn, kw = valid_call("forward_eval")
    kw["running_mean"], kw["running_var"] = readonly(kw["running_mean"]), readonly(kw["running_var"])
    fn(**kw)


@pytest.mark.parametrize("value", [[0.0, 0.0, 0.0], (0.0, 0.0, 0.0), 0.0, "0"], ids=repr)
@pytest.mark.parametrize("arg", ["running_mean", "running_var"])
def test_running_stat_to_update_is_not_an_array(arg, value):
    # Updated in place, so it must be an ndarray: a list would be silently copied and lost.
    fn, kw = valid_call("forward")
    kw[arg] = value
    assert_raises_untouched(fn, kw, TypeError, arg)


@pytest.mark.parametrize("raising", ["errstate", "warnings"])
def test_running_stat_cast_that_raises_comes_before_any_write(raising):
    # A float16 running variance overflows for data this spread: harmless (inf) by default, but
    # np.errstate(over="raise") or warnings as errors turn the cast into an exception, which must
    # leave out= and the other running statistic as they were.
    fn, kw = valid_call("forward")
    kw["x"] = kw["x"] * np.finfo(np.float16).max
    kw["running_mean"] = kw["running_mean"].astype(np.float16)
    kw["running_var"] = kw["running_var"].astype(np.float16)
    if raising == "errstate":
        with np.errstate(over="raise"):
            assert_raises_untouched(fn, kw, FloatingPointError)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            assert_raises_untouched(fn, kw, RuntimeWarning)


# ---- empty batch ----

@pytest.mark.parametrize("name", ["forward", "backward"])
def test_training_with_empty_batch(name):
    fn, kw = valid_call(name)
    for arg in ("x", "dy", "out"):
        if arg in kw:
            kw[arg] = np.zeros((0,) + kw[arg].shape[1:])
    assert_raises_untouched(fn, kw, ValueError, "no elements|empty|M == 0")


# ---- scalars: eps, momentum, count ----

# docs/api.md does not say; eps must keep var + eps >= 0 finite, and momentum weighs old and new.
@pytest.mark.parametrize("arg,value,exc", [
    ("eps", -1e-5, ValueError), ("eps", np.nan, ValueError), ("eps", np.inf, ValueError),
    ("eps", -np.inf, ValueError), ("eps", "1e-5", TypeError), ("eps", None, TypeError),
    ("eps", [1e-5, 1e-5], TypeError), ("eps", 1j, TypeError),
    ("momentum", -0.1, ValueError), ("momentum", 1.5, ValueError), ("momentum", np.nan, ValueError),
    ("momentum", "0.9", TypeError), ("momentum", None, TypeError),
], ids=lambda v: repr(v) if not isinstance(v, type) else "")
def test_bad_eps_momentum(arg, value, exc):
    fn, kw = valid_call("forward")
    kw[arg] = value
    assert_raises_untouched(fn, kw, exc, arg)


@pytest.mark.parametrize("value,exc", [(0, ValueError), (-3, ValueError), (np.nan, ValueError),
                                       ("12", TypeError), (None, TypeError)], ids=repr)
def test_backward_apply_bad_count(value, exc):
    fn, kw = valid_call("backward_apply")
    kw["count"] = value
    assert_raises_untouched(fn, kw, exc, "count")


def test_training_flag_without_a_truth_value():
    fn, kw = valid_call("forward")
    kw["training"] = np.array([True, False])
    assert_raises_untouched(fn, kw, ValueError, "ambiguous")


# ---- non-finite data: the one row of the table that is not an error ----

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", FUNCS)
def test_nonfinite_data_raises_nothing(name, bad):
    # Propagation itself is checked in test_core.py; here: no exception, not even a warning.
    fn, kw = valid_call(name)
    for arg in ("x", "dy"):
        if arg in kw:
            kw[arg][0, 0] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(**kw)


# ---- None and other non-arrays ----

@pytest.mark.parametrize("name,arg", REQUIRED_ARGS)
def test_none_where_required(name, arg):
    fn, kw = valid_call(name)
    kw[arg] = None
    assert_raises_untouched(fn, kw, TypeError, arg)


# What a new user might pass as x.  Array-likes are converted with np.asarray (so a list of ints
# is an int64 array: TypeError), everything else must fail cleanly.
NEW_USER_X = {
    "str": ("hello", TypeError),
    "bytes": (b"\x00" * 8, TypeError),
    "dict": ({"x": 1.0}, TypeError),
    "object": (object(), TypeError),
    "int_list": ([[1, 2], [3, 4]], TypeError),
    "bool_list": ([[True, False]], TypeError),
    "mixed_list": ([[1.0, "a"]], TypeError),
    "ragged_list": ([[1.0], [2.0, 3.0]], ValueError),
    "set": ({1.0, 2.0}, TypeError),
    "generator": ((v for v in [1.0, 2.0]), TypeError),
    "complex": (1j, TypeError),
    "int": (3, TypeError),
}


@pytest.mark.parametrize("x,exc", NEW_USER_X.values(), ids=NEW_USER_X.keys())
@pytest.mark.parametrize("name", FUNCS)
def test_new_user_x(name, x, exc):
    fn, kw = valid_call(name)
    kw["x"] = x
    assert_raises_untouched(fn, kw, exc)


NEW_USER_VALID = {
    "float_list": [[1.0, 2.0], [3.0, 5.0], [-1.0, 0.5]],
    "tuple_of_lists": ([0.5, 2.0, 1.0], [4.0, 3.0, 1.5]),
    "empty_list": [],
    "empty_rows": [[]],
    "one_value": [2.0],
}


@pytest.mark.parametrize("x", NEW_USER_VALID.values(), ids=NEW_USER_VALID.keys())
def test_new_user_lists_work_like_arrays(x):
    a = np.asarray(x, dtype=np.float64)
    if a.size == 1:  # one value per feature: training raises for the list as for the array
        for data in (x, a):
            with pytest.raises(ValueError, match="one per feature"):
                bnorm.forward(data)
        x, a = [x, x], np.stack([a, a])  # and two of them work like an array
    y, mean, rstd = bnorm.forward(x)
    y_a, mean_a, rstd_a = bnorm.forward(a)
    for got, want in [(y, y_a), (mean, mean_a), (rstd, rstd_a)]:
        np.testing.assert_array_equal(got, want)
    dx, dgamma, dbeta = bnorm.backward(x, x, mean.tolist(), rstd.tolist())
    np.testing.assert_array_equal(dx, bnorm.backward(a, a, mean, rstd)[0])


@pytest.mark.parametrize("value", ["abc", {1: 2}, object(), [1.0, "a"], b"ab", 1j, True],
                         ids=repr)
@pytest.mark.parametrize("name,arg", BROADCAST_ARGS)
def test_new_user_parameters(name, arg, value):
    # Strings, dicts, bools and complex numbers are not a gamma, a mean, ...: TypeError.
    fn, kw = valid_call(name)
    kw[arg] = value
    assert_raises_untouched(fn, kw, TypeError, arg)


def test_zero_elements_are_not_an_error_where_nothing_is_reduced():
    # For contrast with test_training_with_empty_batch: eval mode and the split phases take an
    # empty batch (a worker may hold no rows).
    x = np.zeros((0, 3))
    y, mean, rstd = bnorm.forward(x, training=False, running_mean=np.zeros(3), running_var=np.ones(3))
    assert y.shape == (0, 3) and mean.shape == rstd.shape == (3,)
    n, mean, m2 = bnorm.batch_stats(x)
    assert n == 0 and mean.shape == m2.shape == (3,)


# ---- combine_stats (pure Python, but part of the split-phase API) ----

@pytest.mark.parametrize("counts,means,m2s,match", [
    ([1, 2], np.zeros((3, 4)), np.zeros((3, 4)), "shape"),
    ([1, 2], np.zeros((2, 4)), np.zeros((2, 5)), "shape"),
    ([[1, 2]], np.zeros((2, 4)), np.zeros((2, 4)), "shape"),
    (3, np.zeros(4), np.zeros(4), "shape"),
    ([1, -2], np.zeros((2, 4)), np.zeros((2, 4)), ">= 0"),
])
def test_combine_stats_bad_input(counts, means, m2s, match):
    assert_raises_untouched(bnorm.combine_stats, dict(counts=counts, means=means, m2s=m2s),
                            ValueError, match)


@pytest.mark.parametrize("counts", [[2.5, 1], ["2", 1], [np.nan, 1], [np.inf, 1], [None, 1]])
def test_combine_stats_counts_must_be_integers(counts):
    # a fractional count is a mistake: it used to be truncated silently (2.5 -> 2)
    assert_raises_untouched(bnorm.combine_stats,
                            dict(counts=counts, means=np.zeros((2, 4)), m2s=np.ones((2, 4))),
                            TypeError, "integer counts")


def test_combine_stats_takes_integral_float_counts():
    # what an Allreduce of float64 buffers delivers
    n, mean, m2 = bnorm.combine_stats(np.array([2.0, 3.0]), np.array([[0.0], [5.0]]),
                                      np.array([[2.0], [8.0]]))
    assert n == 5 and type(n) is int
    np.testing.assert_allclose(mean, [3.0])
    np.testing.assert_allclose(m2, [2.0 + 8.0 + 25.0 * 2 * 3 / 5])
