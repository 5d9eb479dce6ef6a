"""Property-based tests: bnorm on random shapes, axes, layouts and parameters against docs/api.md's
formulas evaluated in float64 (the oracle of tests/helpers.py).

Every example draws: a rank 1-6 shape with sides of 1 and sometimes a 0; feature axes as an int or
a tuple (negative, unsorted, empty); x and dy as arbitrary strided views of their values
(transposed, steps, negative steps, unaligned, zero strides from np.broadcast_to); float32 or
float64 (dy sometimes of the other dtype); gamma/beta as None, Python scalars, 0-d arrays, lists
or arrays of any shape that broadcasts to F (in any dtype of real numbers and any layout);
running statistics (strided, either float dtype); out= as None, a strided view or in place.

Checked: forward and backward in training and eval mode against the float64 oracle, shapes and
dtypes of every result, the running-statistics update, the errors docs/api.md asks for where the
example is invalid (an empty batch in training), and that no input is ever modified (byte for
byte, including gamma, beta, mean and rstd passed to backward).  The split-phase functions
(batch_stats, normalize, backward_sums, backward_apply) get the same treatment.

Tolerances.  ``t`` is helpers' TOL32 / TOL64 for the result's dtype, applied normwise as there
(``|got - want| <= t * (|want| + max|want|)``).  Random data also produces results that cancel:
a mean near 0 of data near +-100, a feature whose spread is far below its magnitude (x - mean then
depends on the last bits of a float64 mean), sums of dy * xhat that nearly vanish.  No float64
evaluation is better there than the rounding of its terms, so each comparison also allows
``(M + 4) * 4 * eps64`` (the bound of a float64 sum of M terms) times the magnitude of the terms
the result is made of (``hi`` below).  For float32 that is still ~1e-12 of the terms, so the
float32-precision promise for data far from zero is tested as in test_core.py.

Profiles (tests/conftest.py): ``ci`` by default, ``HYPOTHESIS_PROFILE=deep`` for many more
examples.
"""
import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from helpers import (F32, F64, TOL32, TOL64, amax, axes_of, expand, oracle_backward,
                     oracle_forward, sum_to)

import bnorm

MAX_SIDE = {1: 40, 2: 12, 3: 7, 4: 5, 5: 4, 6: 3}  # at most 1,728 elements


def tol_of(*dtypes):
    return TOL32 if any(np.dtype(d) == F32 for d in dtypes) else TOL64


# --------------------------------------------------------------------------- strategies
@st.composite
def shapes(draw):
    ndim = draw(st.integers(1, 6))
    shape = draw(st.lists(st.integers(1, MAX_SIDE[ndim]), min_size=ndim, max_size=ndim))
    if draw(st.integers(0, 7)) == 0:  # sometimes an empty axis (a batch or a feature axis)
        shape[draw(st.integers(0, ndim - 1))] = 0
    return tuple(shape)


@st.composite
def feature_axes(draw, ndim):
    """An int (negative allowed) or a tuple of distinct axes, each maybe negative, any order."""
    if draw(st.booleans()):
        return draw(st.integers(-ndim, ndim - 1))
    return draw(hnp.valid_tuple_axes(ndim))


@st.composite
def layouts(draw, ndim):
    """How to lay values out in memory: axis order, signed step per axis, unaligned or not."""
    perm = draw(st.permutations(range(ndim)))
    steps = draw(st.lists(st.sampled_from([1, 1, 2, 3, -1, -2]), min_size=ndim, max_size=ndim))
    return tuple(perm), tuple(steps), draw(st.booleans())


def lay_out(values, layout):
    """A writable view holding ``values``, laid out as ``layout`` says, in a fresh buffer."""
    perm, steps, unaligned = layout
    dtype = values.dtype
    shape = values.shape
    # the buffer in memory order perm, each axis |step| times longer
    big = [shape[p] * abs(steps[p]) for p in perm]
    nbytes = int(np.prod(big, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + 1, np.uint8)
    start = 1 if unaligned else 0
    buf = raw[start:start + nbytes].view(dtype).reshape(big)
    v = buf.transpose(np.argsort(perm))
    v = v[tuple(slice(None, None, s) for s in steps) + (Ellipsis,)]  # a view even when 0-d
    assert v.shape == shape
    v[...] = values
    return v


def elements(dtype, lo, hi):
    return hnp.from_dtype(np.dtype(dtype), min_value=lo, max_value=hi, allow_nan=False,
                          allow_infinity=False)


@st.composite
def data_arrays(draw, shape, dtype, lo, hi, loc=0.0):
    """Values of ``shape`` as a strided view, or (sometimes) a zero-stride np.broadcast_to view of
    a smaller array: read-only, as users pass it."""
    ndim = len(shape)
    bcast = draw(st.lists(st.sampled_from([False, False, False, True]), min_size=ndim,
                          max_size=ndim))
    base_shape = tuple(1 if b else n for b, n in zip(bcast, shape))
    base = draw(hnp.arrays(dtype, base_shape, elements=elements(dtype, lo, hi)))
    if loc:
        base = (base.astype(F64) + loc).astype(dtype)
    v = lay_out(base, draw(layouts(ndim)))
    return np.broadcast_to(v, shape) if any(bcast) else v


@st.composite
def params(draw, F, xdtype, lo, hi, allow_none=True):
    """gamma or beta: None, a Python float or int, a NumPy scalar, a 0-d array, a list, or an array
    of a shape that broadcasts to F, in x's dtype, the other float dtype or int64, in any layout
    (zero strides included)."""
    kinds = ["py_float", "py_int", "np_scalar", "array", "array", "array", "list"]
    kind = draw(st.sampled_from((["none"] if allow_none else []) + kinds))
    if kind == "none":
        return None
    if kind == "py_float":
        return draw(st.floats(lo, hi))
    if kind == "py_int":
        return draw(st.integers(int(lo), int(hi)))
    dtype = draw(st.sampled_from([xdtype, xdtype, F32, F64, np.int64]))
    if kind == "np_scalar":
        return np.dtype(dtype).type(draw(elements(dtype, lo, hi)))
    nd = draw(st.integers(0, len(F)))
    shape = tuple(n if draw(st.booleans()) else 1 for n in F[len(F) - nd:])
    if kind == "list" and 0 not in shape:  # (tolist() of an empty array loses its shape)
        return draw(hnp.arrays(dtype, shape, elements=elements(dtype, lo, hi))).tolist()
    return draw(data_arrays(shape, dtype, lo, hi))


@st.composite
def running_stats(draw, F, lo, hi):
    dtype = draw(st.sampled_from([F32, F64]))
    values = draw(hnp.arrays(dtype, F, elements=elements(dtype, lo, hi)))
    return lay_out(values, draw(layouts(len(F))))


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([F32, F64]))
    shape = draw(shapes())
    axis = draw(feature_axes(len(shape)))
    red, kept = axes_of(len(shape), axis)
    F = tuple(shape[a] for a in kept)
    M = int(np.prod([shape[a] for a in red], dtype=np.int64))
    # data near zero or far from it (float32 must stay float32-accurate there too)
    loc = draw(st.sampled_from([0.0, 0.0, 0.0, 1e4, -300.0]))
    x = draw(data_arrays(shape, dtype, -100, 100, loc))
    dy_dtype = draw(st.sampled_from([dtype, dtype, dtype, F32, F64]))
    dy = draw(data_arrays(shape, dy_dtype, -10, 10))
    gamma = draw(params(F, dtype, -3, 3))
    beta = draw(params(F, dtype, -3, 3))
    training = draw(st.booleans())
    have_running = not training or draw(st.booleans())
    rm = draw(running_stats(F, -3, 3)) if have_running else None
    rv = draw(running_stats(F, 0.0625, 4)) if have_running else None
    eps = draw(st.sampled_from([1e-8, 1e-5, 1e-3, 0.5]))
    momentum = draw(st.sampled_from([0.0, 0.1, 0.9, 1.0]) | st.floats(0, 1))
    out = draw(st.sampled_from(["none", "none", "view", "inplace"]))
    out_layout = draw(layouts(len(shape)))
    return dict(dtype=dtype, shape=shape, axis=axis, F=F, M=M, x=x, dy=dy, gamma=gamma,
                beta=beta, training=training, rm=rm, rv=rv, eps=eps, momentum=momentum, out=out,
                out_layout=out_layout)


# --------------------------------------------------------------------------- helpers
EPS64 = float(np.finfo(F64).eps)


def check(got, want, t, what, lo=0.0, hi=0.0, M=0):
    """|got - want| <= t * (|want| + max(lo, max|want|)) + (M + 4) * 4 * eps64 * hi, elementwise.
    ``lo``: the magnitude of terms the result is computed from in its own dtype (float32
    rounding); ``hi``: the magnitude of terms whose float64 rounding it inherits."""
    got = np.asarray(got)
    want = np.asarray(want, dtype=F64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.size == 0:
        return
    atol = t * max(lo, amax(want)) + (M + 4) * 4 * EPS64 * hi
    if atol == 0.0:
        atol = t  # everything is exactly 0
    # nothing below the dtype's smallest normal number survives rounding to it (float32 gets
    # float64 running statistics of 1e-200)
    atol += float(np.finfo(got.dtype).tiny) if got.dtype.kind == "f" else 0.0
    np.testing.assert_allclose(got.astype(F64), want, rtol=t, atol=atol, err_msg=what)


def snapshot(*objs):
    """Deep copies of the arguments (None, scalars and lists included) to compare against."""
    return [None if o is None else np.array(o, copy=True) for o in objs]


def assert_unchanged(objs, snaps, what):
    for i, (o, s) in enumerate(zip(objs, snaps)):
        if o is None:
            continue
        a = np.asarray(o)
        assert a.dtype == s.dtype and a.shape == s.shape, (what, i)
        assert a.tobytes() == s.tobytes(), f"{what}: argument {i} was modified"


def check_result(a, shape, dtype, name):
    assert isinstance(a, np.ndarray), name
    assert a.shape == tuple(shape), (name, a.shape, shape)
    assert a.dtype == dtype, (name, a.dtype, dtype)


def writable_like(x, layout, fill):
    """A writable array of x's shape and dtype in the given layout, filled with ``fill``."""
    return lay_out(np.full(x.shape, fill, x.dtype), layout)


class Terms:
    """Magnitudes of the terms each result is computed from, for ``check``'s lo and hi."""

    def __init__(self, x, axis, mean, rstd, gamma, beta=None, dy=None):
        x64 = np.asarray(x, F64)
        self.red, kept = axes_of(x64.ndim, axis)
        self.F = tuple(x64.shape[a] for a in kept)
        self.M = int(np.prod([x64.shape[a] for a in self.red], dtype=np.int64))
        E = self.E
        self.g = np.abs(np.broadcast_to(np.asarray(1.0 if gamma is None else gamma, F64),
                                        self.F))
        b = np.abs(np.broadcast_to(np.asarray(0.0 if beta is None else beta, F64), self.F))
        self.gamma_shape = self.F if gamma is None else np.shape(gamma)
        self.mean = amax(x64)  # a mean is a sum of x / M
        # |x - mean| * rstd, with the magnitudes x and mean have before they cancel
        self.X = (np.abs(x64) + np.abs(E(mean))) * E(rstd)
        xhat = np.abs(x64 - E(mean)) * E(rstd)
        self.y_hi = amax(self.X * E(self.g)) + amax(b)
        if dy is None:
            return
        dy64 = np.abs(np.asarray(dy, F64))
        M = max(self.M, 1)
        self.dbeta = amax(dy64.sum(self.red)) if dy64.size else 0.0
        dgF_hi = (dy64 * self.X).sum(self.red)
        dgF_lo = (dy64 * xhat).sum(self.red)
        self.dgamma = amax(sum_to(dgF_hi, self.gamma_shape)) if dgF_hi.size else 0.0
        # rstd in x's dtype rounds every feature's share: a dgamma summed over features that
        # cancel is accurate relative to the shares, not to the sum
        self.dgamma_lo = amax(sum_to(dgF_lo, self.gamma_shape)) if dgF_lo.size else 0.0
        grs = E(self.g * rstd)
        self.dx_eval = amax(grs * dy64)
        sdy = E(dy64.sum(self.red)) / M
        self.dx_lo = amax(grs * (dy64 + sdy + xhat * E(dgF_lo) / M))
        self.dx_hi = amax(grs * (dy64 + sdy + self.X * E(dgF_hi) / M))

    def E(self, v):
        return expand(v, self.red, self.F)


# --------------------------------------------------------------------------- forward/backward
@given(cases())
def test_forward_backward_match_float64_oracle(case):
    c = case
    x, dy, gamma, beta, rm, rv = c["x"], c["dy"], c["gamma"], c["beta"], c["rm"], c["rv"]
    dtype, shape, axis, F, training = c["dtype"], c["shape"], c["axis"], c["F"], c["training"]
    M = c["M"]
    note(f"shape={shape} axis={axis} F={F} M={M} dtype={np.dtype(dtype).name} "
         f"training={training} out={c['out']} x.strides={x.strides} dy.dtype={dy.dtype}")
    kw = dict(axis=axis, eps=c["eps"], training=training, momentum=c["momentum"])
    x0, dy0, g0, b0, rm0, rv0 = snapshot(x, dy, gamma, beta, rm, rv)

    inplace = c["out"] == "inplace" and x.flags.writeable  # not a broadcast (zero-stride) view
    if c["out"] == "view" or (c["out"] == "inplace" and not inplace):
        out = writable_like(x, c["out_layout"], -7.0)
    elif inplace:
        out = x
    else:
        out = None
    out0 = None if out is None or inplace else np.array(out)

    if training and (M == 0 or (M == 1 and np.prod(F) > 0)):
        # docs/api.md: nothing to reduce over, or one value per feature (y would be beta), is a
        # ValueError, and nothing has been modified
        with pytest.raises(ValueError):
            bnorm.forward(x, gamma, beta, running_mean=rm, running_var=rv, out=out, **kw)
        with pytest.raises(ValueError):
            bnorm.backward(dy, x, np.zeros(F, dtype), np.ones(F, dtype), gamma, axis=axis,
                           training=True, out=out)
        assert_unchanged([x, dy, gamma, beta, rm, rv], [x0, dy0, g0, b0, rm0, rv0], "M == 0")
        if out0 is not None:
            assert_unchanged([out], [out0], "M == 0 out")
        return

    # ---- forward
    y, mean, rstd = bnorm.forward(x, gamma, beta, running_mean=rm, running_var=rv, out=out, **kw)
    check_result(y, shape, dtype, "y")
    check_result(mean, F, dtype, "mean")
    check_result(rstd, F, dtype, "rstd")
    if out is not None:
        assert y is out
    oy, om, ors, orm, orv = oracle_forward(x0, gamma, beta, axis, c["eps"], training, rm0, rv0,
                                           c["momentum"])
    T = Terms(x0, axis, om, ors, gamma, beta)
    t = tol_of(dtype)
    check(y, oy, t, "y", hi=T.y_hi, M=M)
    check(mean, om, t, "mean", hi=T.mean if training else 0.0, M=M)
    check(rstd, ors, t, "rstd")
    if training and rm is not None:
        check(rm, orm, tol_of(dtype, rm.dtype), "running_mean", hi=T.mean + amax(rm0), M=M)
        check(rv, orv, tol_of(dtype, rv.dtype), "running_var")
        assert_unchanged([gamma, beta], [g0, b0], "forward")
    else:
        assert_unchanged([gamma, beta, rm, rv], [g0, b0, rm0, rv0], "forward")
    if not inplace:
        assert_unchanged([x], [x0], "forward x")
    assert_unchanged([dy], [dy0], "forward dy")

    # ---- backward, from what forward returned (x as it was before an in-place forward)
    xb = x0 if inplace else x
    mean0, rstd0 = snapshot(mean, rstd)
    dinplace = c["out"] == "inplace" and dy.flags.writeable and dy.dtype == dtype
    if dinplace:
        dout = dy
    elif c["out"] != "none":
        dout = writable_like(x, c["out_layout"], -9.0)
    else:
        dout = None
    dx, dgamma, dbeta = bnorm.backward(dy, xb, mean, rstd, gamma, axis=axis, training=training,
                                       out=dout)
    check_result(dx, shape, dtype, "dx")
    check_result(dbeta, F, dtype, "dbeta")
    check_result(dgamma, F if gamma is None else np.shape(gamma), dtype, "dgamma")
    if dout is not None:
        assert dx is dout
    # docs/api.md: in training, mean and rstd are the batch statistics (bnorm recomputes the part of
    # the mean that rounding to x's dtype lost); in eval they are constants, taken as given.
    # dy of the other float dtype is cast to x's (the docstring).
    bm, br = (om, ors) if training else (mean0.astype(F64), rstd0.astype(F64))
    dyc = dy0.astype(dtype)
    odx, odg, odb = oracle_backward(dyc, x0, bm, br, gamma, axis, training)
    T = Terms(x0, axis, bm, br, gamma, dy=dyc)
    t = tol_of(dtype)
    if training:
        check(dx, odx, t, "dx", lo=T.dx_lo, hi=T.dx_hi, M=M)
    else:
        check(dx, odx, t, "dx", lo=T.dx_eval)
    check(dgamma, odg, t, "dgamma", lo=T.dgamma_lo, hi=T.dgamma, M=M)
    check(dbeta, odb, t, "dbeta", hi=T.dbeta, M=M)
    assert_unchanged([xb, gamma, mean, rstd], [x0, g0, mean0, rstd0], "backward")
    if not dinplace:
        assert_unchanged([dy], [dy0], "backward dy")


@given(cases())
def test_split_phases_match_float64_oracle(case):
    """batch_stats / normalize / backward_sums / backward_apply: the same formulas in phases."""
    c = case
    x, dy, gamma, beta = c["x"], c["dy"], c["gamma"], c["beta"]
    dtype, shape, axis, F, M = c["dtype"], c["shape"], c["axis"], c["F"], c["M"]
    red, kept = axes_of(len(shape), axis)
    note(f"shape={shape} axis={axis} F={F} M={M} dtype={np.dtype(dtype).name}")
    x0, dy0, g0, b0 = snapshot(x, dy, gamma, beta)
    x64 = x0.astype(F64)

    n, mean, m2 = bnorm.batch_stats(x, axis=axis)
    assert n == M and isinstance(n, int)
    check_result(mean, F, F64, "mean")
    check_result(m2, F, F64, "m2")
    if M == 0:
        np.testing.assert_array_equal(mean, 0)
        np.testing.assert_array_equal(m2, 0)
        assert_unchanged([x], [x0], "batch_stats")
        return
    _, om, _, _, _ = oracle_forward(x0, axis=axis)
    T = Terms(x0, axis, om, np.ones(F), None)
    # m2 from data shifted by each feature's first element, as test_core's oracle computes the
    # variance: x - mean with a float64-rounded mean would lose the spread of data like
    # [1e4 + 1e-8, 1e4, 1e4]
    d = x64 - T.E(x64[tuple(0 if a in red else slice(None) for a in range(len(shape)))])
    om2 = ((d - T.E(d.mean(red))) ** 2).sum(red)
    # statistics are float64 whatever x's dtype: float64 accuracy for float32 data too
    check(mean, om, TOL64, "batch_stats mean", hi=T.mean, M=M)
    check(m2, om2, TOL64, "batch_stats m2")

    rstd = 1.0 / np.sqrt(m2 / n + c["eps"])
    y = bnorm.normalize(x, mean, rstd, gamma, beta, axis=axis)
    check_result(y, shape, dtype, "y")
    g64 = np.broadcast_to(np.asarray(1.0 if gamma is None else gamma, F64), F)
    b64 = np.broadcast_to(np.asarray(0.0 if beta is None else beta, F64), F)
    T = Terms(x0, axis, mean, rstd, gamma, beta, dy=dy0.astype(dtype))
    oy = (x64 - T.E(mean)) * T.E(rstd * g64) + T.E(b64)
    t = tol_of(dtype)
    check(y, oy, t, "normalize", hi=T.y_hi, M=M)

    sum_dy, sum_dy_xmu = bnorm.backward_sums(dy, x, mean, axis=axis)
    check_result(sum_dy, F, F64, "sum_dy")
    check_result(sum_dy_xmu, F, F64, "sum_dy_xmu")
    dy64 = dy0.astype(dtype).astype(F64)  # dy is cast to x's dtype
    check(sum_dy, dy64.sum(red), TOL64, "sum_dy", hi=T.dbeta, M=M)
    check(sum_dy_xmu, (dy64 * (x64 - T.E(mean))).sum(red), TOL64, "sum_dy_xmu",
          hi=amax((np.abs(dy64) * (np.abs(x64) + np.abs(T.E(mean)))).sum(red)), M=M)

    dx = bnorm.backward_apply(dy, x, mean, rstd, sum_dy, sum_dy_xmu, n, gamma, axis=axis)
    check_result(dx, shape, dtype, "dx")
    odx, _, _ = oracle_backward(dy64, x0, mean, rstd, gamma, axis, True)
    check(dx, odx, t, "backward_apply", lo=T.dx_lo, hi=T.dx_hi, M=M)
    assert_unchanged([x, dy, gamma, beta], [x0, dy0, g0, b0], "phases")


@given(st.data())
def test_dgamma_keeps_gamma_shape_even_with_more_gamma_elements_than_features(data):
    """dgamma has gamma's shape, summed over what gamma was broadcast over, including a length-1
    gamma axis broadcast to a length-0 feature axis: more gamma elements than features (once a
    heap overflow in backward), where every sum is over nothing and dgamma is 0."""
    dtype = data.draw(st.sampled_from([F32, F64]))
    ndim = data.draw(st.integers(1, 4))
    shape = data.draw(st.lists(st.integers(1, 12), min_size=ndim, max_size=ndim))
    axis = data.draw(hnp.valid_tuple_axes(ndim, min_size=1))
    red, kept = axes_of(ndim, axis)
    broadcast = data.draw(st.lists(st.booleans(), min_size=len(kept), max_size=len(kept)))
    if any(broadcast) and data.draw(st.booleans()):
        # a feature axis that gamma broadcasts over gets length 0
        shape[kept[data.draw(st.sampled_from([i for i, b in enumerate(broadcast) if b]))]] = 0
    shape = tuple(shape)
    F = tuple(shape[a] for a in kept)
    gshape = tuple(1 if b else shape[a] for a, b in zip(kept, broadcast))
    M = int(np.prod([shape[a] for a in red], dtype=np.int64))
    x = data.draw(hnp.arrays(dtype, shape, elements=elements(dtype, -10, 10)))
    dy = data.draw(hnp.arrays(dtype, shape, elements=elements(dtype, -10, 10)))
    gamma = data.draw(hnp.arrays(dtype, gshape, elements=elements(dtype, 0.5, 2)))
    # training needs two values per feature (or no feature at all)
    trains = M > 1 or (M == 1 and 0 in F)
    for training in ([False, True] if trains else [False]):
        if training:  # backward takes mean and rstd to be x's batch statistics
            _, om, ors, _, _ = oracle_forward(x, axis=axis)
        else:
            om, ors = np.full(F, 0.25), np.full(F, 1.5)
        mean, rstd = om.astype(dtype), ors.astype(dtype)
        T = Terms(x, axis, om, ors, gamma, dy=dy)
        dx, dg, db = bnorm.backward(dy, x, mean, rstd, gamma, axis=axis, training=training)
        check_result(dg, gshape, dtype, "dgamma")
        check_result(db, F, dtype, "dbeta")
        _, odg, odb = oracle_backward(dy, x, om if training else mean, ors if training else rstd,
                                      gamma, axis, training)
        check(dg, odg, tol_of(dtype), "dgamma", lo=T.dgamma_lo, hi=T.dgamma, M=M)
        check(db, odb, tol_of(dtype), "dbeta", hi=T.dbeta, M=M)
        if 0 in F:
            np.testing.assert_array_equal(dg, 0)
