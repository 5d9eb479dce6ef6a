"""bnorm.forward / bnorm.backward: correctness against three independent oracles.

1. ``bnorm.reference``: the blog post's own NumPy code (computed in the input's dtype).
2. ``oracle_forward`` / ``oracle_backward`` (tests/helpers.py): docs/api.md's formulas written out
   in float64 from ``x.astype(float64)``; float32 results must match them to float32 precision,
   even for data far from zero where the post's float32 code itself is not accurate.
3. Central finite differences (float64) and PyTorch (``torch.nn.functional.batch_norm`` and its
   autograd) where torch is installed.

No expected number here is copied from bnorm's output.

Tolerances: ``TOL64``, ``TOL32`` and ``TOL32_REF``, applied normwise by ``assert_close``; the
docstring of tests/helpers.py explains them.

Random data comes from seeds fixed per test (``stable_seed``), so a failure reproduces.
"""
import inspect
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import (BNORM_PARENT, DTYPES, F32, F64, TOL32, TOL64, amax, assert_close, axes_of,
                     child_env, expand, fshape, mean_var, oracle_backward, oracle_forward, randn,
                     stable_seed, tol_oracle, tol_ref)

import bnorm
from bnorm import reference


# --------------------------------------------------------------------------- helpers
def dx_terms(dy, rstd, gamma, axis):
    """max |gamma * rstd * dy|: the size of the terms whose difference is the training-mode dx.
    For M = 1 or 2, dx is exactly 0 while its terms are not (e.g. rstd = 1e4 for var = 0), so
    float32 rounding is relative to this, not to |dx|."""
    dy = np.asarray(dy, F64)
    red, kept = axes_of(dy.ndim, axis)
    F = tuple(dy.shape[a] for a in kept)
    g = 1.0 if gamma is None else gamma
    return amax(dy * expand(rstd, red, F) * expand(g, red, F))


def params(rng, F, dtype):
    """gamma (signed, |gamma| in [0.5, 2]), beta, running mean, running var (positive)."""
    gamma = (rng.uniform(0.5, 2.0, F) * rng.choice([-1.0, 1.0], F)).astype(dtype)
    beta = rng.standard_normal(F).astype(dtype)
    rm = (0.5 * rng.standard_normal(F)).astype(dtype)
    rv = rng.uniform(0.5, 2.0, F).astype(dtype)
    return gamma, beta, rm, rv


def check_all(x, dy, gamma, beta, axis, training, rm, rv, momentum=0.9, eps=1e-8, ref=True):
    """Run bnorm forward + backward on (possibly strided) arrays; check against the float64
    oracle and, when ``ref``, against the post's code run on contiguous copies."""
    dtype = np.asarray(x).dtype.type
    snap_x, snap_dy = np.array(x), np.array(dy)
    rm_b = None if rm is None else np.array(rm)
    rv_b = None if rv is None else np.array(rv)

    y, mean, rstd = bnorm.forward(x, gamma, beta, axis=axis, eps=eps, training=training,
                                  running_mean=rm_b, running_var=rv_b, momentum=momentum)
    dx, dgamma, dbeta = bnorm.backward(dy, x, mean, rstd, gamma, axis=axis, training=training)

    # inputs untouched
    np.testing.assert_array_equal(x, snap_x)
    np.testing.assert_array_equal(dy, snap_dy)

    S = np.shape(x)
    F = fshape(S, axis)
    for name, a, shp in [("y", y, S), ("mean", mean, F), ("rstd", rstd, F), ("dx", dx, S),
                         ("dbeta", dbeta, F),
                         ("dgamma", dgamma, F if gamma is None else np.shape(gamma))]:
        assert isinstance(a, np.ndarray), name
        assert a.shape == tuple(shp), (name, a.shape, shp)
        assert a.dtype == dtype, (name, a.dtype)

    # float64 oracle
    t = tol_oracle(dtype)
    oy, om, ors, orm, orv = oracle_forward(x, gamma, beta, axis, eps, training, rm, rv, momentum)
    assert_close(y, oy, t, "y")
    assert_close(mean, om, t, "mean")
    assert_close(rstd, ors, t, "rstd")
    odx, odg, odb = oracle_backward(dy, x, om, ors, gamma, axis, training)
    assert_close(dx, odx, t, "dx", scale=dx_terms(dy, ors, gamma, axis))
    assert_close(dgamma, odg, t, "dgamma")
    assert_close(dbeta, odb, t, "dbeta")
    if training and rm is not None:
        assert_close(rm_b, orm, t, "running_mean")
        assert_close(rv_b, orv, t, "running_var")
    elif rm is not None:
        np.testing.assert_array_equal(rm_b, rm)
        np.testing.assert_array_equal(rv_b, rv)

    if ref:
        t = tol_ref(dtype)
        xc, dyc = np.ascontiguousarray(x), np.ascontiguousarray(dy)
        rm_r = None if rm is None else np.array(rm)
        rv_r = None if rv is None else np.array(rv)
        ry, rmean, rrstd = reference.forward(xc, gamma, beta, axis=axis, eps=eps,
                                             training=training, running_mean=rm_r,
                                             running_var=rv_r, momentum=momentum)
        rdx, rdg, rdb = reference.backward(dyc, xc, rmean, rrstd, gamma, axis=axis,
                                           training=training)
        # The post's code rounds each partial sum to float32: its error in a sum (mean, dgamma,
        # dbeta) is relative to the terms summed, not to the sum, which can be near zero (a mean
        # of 2e-5 from data of size 2 is 0.1% off in the post's code).
        red, _ = axes_of(np.ndim(x), axis)
        abs_x, abs_dy = np.abs(np.asarray(x, F64)), np.abs(np.asarray(dy, F64))
        abs_xhat = np.abs(np.asarray(x, F64) - expand(om, red, F)) * expand(ors, red, F)
        terms = {"mean": amax(abs_x),
                 "dgamma": float(np.sum(abs_dy * abs_xhat)), "dbeta": float(np.sum(abs_dy))}
        for name, a, b in [("y", y, ry), ("mean", mean, rmean), ("rstd", rstd, rrstd),
                           ("dgamma", dgamma, rdg), ("dbeta", dbeta, rdb)]:
            assert_close(a, b, t, "reference " + name, scale=terms.get(name, 0.0))
        assert_close(dx, rdx, t, "reference dx", scale=dx_terms(dy, ors, gamma, axis))
        if training and rm is not None:
            assert_close(rm_b, rm_r, t, "reference running_mean", scale=terms["mean"])
            assert_close(rv_b, rv_r, t, "reference running_var")
    return y, mean, rstd, dx, dgamma, dbeta


# --------------------------------------------------------------------------- shapes and axes
CASES = [
    ((7,), ()),                      # 1-D, everything reduced, F = ()
    ((7,), -1),                      # 1-D, nothing reduced: M = 1
    ((6, 3), -1),                    # design matrix, channels last
    ((6, 3), 0),
    ((6, 3), ()),
    ((1, 5), -1),                    # M = 1
    ((5, 1), -1),                    # one feature
    ((5, 4, 3), 1),
    ((5, 4, 3), (0, 2)),
    ((5, 4, 3), (-1, -3)),           # negative, unsorted: F = (5, 3)
    ((4, 3, 5, 2), 1),               # NCHW
    ((4, 3, 5, 2), -1),              # NHWC
    ((4, 3, 5, 2), (1, 3)),
    ((3, 2, 4, 2, 3), (1, -1)),
    ((3, 2, 4, 2, 3), (0, 1, 2, 3, 4)),  # every axis kept: M = 1
    ((2, 3, 2, 2, 3, 2), (0, 2, 5)),
    ((2, 3, 2, 2, 3, 2), 3),
    ((2, 3, 2, 2, 3, 2), ()),
]


def case_id(c):
    return f"{'x'.join(map(str, c[0]))}-axis{c[1]}".replace(" ", "")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference_and_oracle(case, dtype, training):
    shape, axis = case
    rng = np.random.default_rng(stable_seed(shape, axis, training))
    F = fshape(shape, axis)
    x = randn(rng, shape, dtype, loc=0.3, scale=2.0)
    dy = randn(rng, shape, dtype)
    gamma, beta, rm, rv = params(rng, F, dtype)
    if training and x.size == np.prod(F):
        # one value per feature (M = 1): y would be beta and dx zero, a ValueError naming the
        # shape (docs/api.md), with nothing modified; inference normalizes as usual
        snapshot = [a.copy() for a in (x, dy, rm, rv)]
        with pytest.raises(ValueError, match=re.escape(f"x of shape {shape}")):
            bnorm.forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv)
        with pytest.raises(ValueError, match=re.escape(f"x of shape {shape}")):
            bnorm.backward(dy, x, np.zeros(F, dtype), np.ones(F, dtype), gamma, axis=axis)
        for a, b in zip((x, dy, rm, rv), snapshot):
            np.testing.assert_array_equal(a, b)
        return
    check_all(x, dy, gamma, beta, axis, training, rm, rv, momentum=0.8)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", [((6, 3), -1), ((4, 3, 5, 2), (1, 3)), ((7,), ())],
                         ids=case_id)
def test_no_gamma_beta_no_running_stats(case, dtype):
    shape, axis = case
    rng = np.random.default_rng(3)
    x = randn(rng, shape, dtype)
    dy = randn(rng, shape, dtype)
    check_all(x, dy, None, None, axis, True, None, None)


def test_defaults_are_channels_last_eps_1e8_momentum_09():
    rng = np.random.default_rng(4)
    x = randn(rng, (5, 2, 3), F64)
    rm, rv = np.zeros(3), np.ones(3)
    y, mean, rstd = bnorm.forward(x, running_mean=rm, running_var=rv)
    oy, om, ors, orm, orv = oracle_forward(x, axis=-1, eps=1e-8, running_mean=np.zeros(3),
                                           running_var=np.ones(3), momentum=0.9)
    assert mean.shape == (3,)
    assert_close(y, oy, TOL64)
    assert_close(rstd, ors, TOL64)
    assert_close(rm, orm, TOL64)
    assert_close(rv, orv, TOL64)
    # eps matters: a constant feature has var 0, so rstd = 1/sqrt(eps) exactly
    xc = x.copy()
    xc[..., 1] = 2.5
    _, _, rstd = bnorm.forward(xc)
    assert_close(rstd[1], 1 / np.sqrt(1e-8), TOL64)
    _, _, rstd = bnorm.forward(xc, eps=1e-3)
    assert_close(rstd[1], 1 / np.sqrt(1e-3), TOL64)


def test_signatures_match_api():
    f = inspect.signature(bnorm.forward).parameters
    assert list(f)[:3] == ["x", "gamma", "beta"]
    for name, default in [("gamma", None), ("beta", None), ("axis", -1), ("eps", 1e-8),
                          ("training", True), ("running_mean", None), ("running_var", None),
                          ("momentum", 0.9), ("out", None)]:
        assert f[name].default == default, name
    for name in ["axis", "eps", "training", "running_mean", "running_var", "momentum", "out"]:
        assert f[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    b = inspect.signature(bnorm.backward).parameters
    assert list(b)[:5] == ["dy", "x", "mean", "rstd", "gamma"]
    assert b["gamma"].default is None
    for name, default in [("axis", -1), ("training", True), ("out", None)]:
        assert b[name].default == default and b[name].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis, F", [
    ((4, 5, 6), (2, 0), (4, 6)),
    ((4, 5, 6), (-1, 1), (5, 6)),
    ((4, 5, 6), (), ()),
    ((2, 3, 4, 5), (3, -3), (3, 5)),
    ((4, 5, 6), 0, (4,)),
])
def test_feature_shape_is_kept_axes_in_order(shape, axis, F, dtype):
    rng = np.random.default_rng(5)
    x = randn(rng, shape, dtype)
    y, mean, rstd = bnorm.forward(x, axis=axis)
    dx, dgamma, dbeta = bnorm.backward(x, x, mean, rstd, axis=axis)
    for a in (mean, rstd, dgamma, dbeta):
        assert isinstance(a, np.ndarray) and a.shape == F and a.dtype == dtype
    for a in (y, dx):
        assert isinstance(a, np.ndarray) and a.shape == shape and a.dtype == dtype


# --------------------------------------------------------------------------- layouts
def lay_c(c, rng):
    return c


def lay_f(c, rng):
    a = np.asfortranarray(c)
    assert c.ndim < 2 or not a.flags.c_contiguous
    return a


def lay_sliced(c, rng):
    big = np.zeros([2 * n + 3 for n in c.shape], c.dtype)
    v = big[tuple(slice(2, 2 * n + 2, 2) for n in c.shape)]
    v[...] = c
    return v


def lay_step3(c, rng):
    big = np.zeros([3 * n + 1 for n in c.shape], c.dtype)
    v = big[tuple(slice(1, 3 * n + 1, 3) for n in c.shape)]
    v[...] = c
    return v


def lay_transposed(c, rng):
    perm = tuple(rng.permutation(c.ndim))
    if c.ndim > 1 and perm == tuple(range(c.ndim)):
        perm = perm[::-1]
    return np.ascontiguousarray(c.transpose(perm)).transpose(np.argsort(perm))


def lay_negative(c, rng):
    rev = tuple(slice(None, None, -1) for _ in range(c.ndim))
    v = np.ascontiguousarray(c[rev])[rev]
    assert all(s < 0 for s, n in zip(v.strides, v.shape) if n > 1)
    return v


def lay_mixed(c, rng):
    """transposed, then every other axis reversed, then a step-2 slice of a larger buffer"""
    perm = tuple(rng.permutation(c.ndim))
    big = np.zeros([2 * c.shape[p] for p in perm], c.dtype)
    sl = tuple(slice(None, None, -2) if i % 2 else slice(None, None, 2) for i in range(c.ndim))
    v = big[sl].transpose(np.argsort(perm))
    v[...] = c
    return v


def lay_unaligned(c, rng):
    buf = np.zeros(c.nbytes + 1, np.uint8)
    v = buf[1:].view(c.dtype).reshape(c.shape)
    v[...] = c
    assert not v.flags.aligned
    return v


def lay_unaligned_strided(c, rng):
    n = c.size * 2
    buf = np.zeros(n * c.itemsize + 1, np.uint8)
    v = buf[1:].view(c.dtype).reshape(c.shape[:-1] + (2 * c.shape[-1],))[..., ::-2]
    v[...] = c
    assert not v.flags.aligned
    return v


def zero_d_safe(f):
    def g(c, rng):
        return c.copy() if np.ndim(c) == 0 else f(c, rng)
    g.__name__ = f.__name__
    return g


LAYOUTS = [zero_d_safe(f) for f in (lay_c, lay_f, lay_sliced, lay_step3, lay_transposed,
                                    lay_negative, lay_mixed, lay_unaligned,
                                    lay_unaligned_strided)]
LAYOUT_CASES = [((6, 4), -1), ((5, 3, 4), 1), ((4, 3, 2, 5), (1, 3)), ((3, 4, 2, 3, 2), (0, -2)),
                ((9,), ())]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=case_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__[4:])
def test_layouts(layout, case, dtype, training):
    shape, axis = case
    rng = np.random.default_rng(6)
    F = fshape(shape, axis)
    xc = randn(rng, shape, dtype, loc=-0.7, scale=1.5)
    dyc = randn(rng, shape, dtype)
    gamma, beta, rm, rv = params(rng, F, dtype)
    x = layout(xc, rng)
    dy = layout(dyc, rng)
    # the per-feature arrays in the same kind of layout
    gamma_l, beta_l = layout(gamma, rng), layout(beta, rng)
    res = check_all(x, dy, gamma_l, beta_l, axis, training, rm, rv)
    # and the layout does not change the result beyond summation order
    expected = check_all(xc, dyc, gamma, beta, axis, training, rm, rv, ref=False)
    for a, b, name in zip(res, expected, ["y", "mean", "rstd", "dx", "dgamma", "dbeta"]):
        assert_close(a, b, tol_oracle(dtype), name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("bshape, shape, axis", [
    ((4, 1, 3), (4, 5, 3), -1),          # zero stride along a batch axis
    ((1, 5, 3), (4, 5, 3), -1),
    ((4, 5, 1), (4, 5, 3), -1),          # zero stride along the feature axis: equal features
    ((4, 1, 3), (4, 5, 3), (1, 2)),      # zero stride along a kept axis
    ((3, 1, 2, 1), (3, 4, 2, 5), 0),
    ((1, 1), (6, 4), ()),                # every element the same (var = 0)
])
def test_zero_strides_broadcast_to(bshape, shape, axis, dtype):
    rng = np.random.default_rng(7)
    small = randn(rng, bshape, dtype, loc=0.25)
    x = np.broadcast_to(small, shape)
    assert 0 in x.strides and not x.flags.writeable
    dy = np.broadcast_to(randn(rng, bshape, dtype), shape)
    F = fshape(shape, axis)
    gamma, beta, rm, rv = params(rng, F, dtype)
    gamma_b = np.broadcast_to(gamma.reshape(-1)[:1].reshape(()), F)  # a zero-stride gamma too
    for training in (True, False):
        # float64 oracle only: for constant features the post's float32 mean is not exactly the
        # constant, which turns y = 0 into rounding noise amplified by 1/sqrt(eps)
        check_all(x, dy, gamma_b, beta, axis, training, rm, rv, ref=False)
    y, mean, rstd = bnorm.forward(x, axis=axis)
    if np.prod(bshape) == 1:
        np.testing.assert_array_equal(mean, np.broadcast_to(small.reshape(()), F))
        np.testing.assert_array_equal(y, 0)


def test_per_feature_arrays_may_be_strided_views():
    rng = np.random.default_rng(8)
    x = randn(rng, (7, 4, 5), F64)
    dy = randn(rng, (7, 4, 5), F64)
    F = (4, 5)
    buf = rng.standard_normal((6, 8, 10))
    gamma, beta = buf[0, ::2, ::2], buf[1, ::-2, 1::2]
    rmb, rvb = np.zeros((2, 4, 5)), np.ones((2, 8, 5))
    rm, rv = rmb[1], rvb[0, ::-2]  # non-contiguous running stats, updated through the views
    orm, orv = rm.copy(), rv.copy()
    y, mean, rstd = bnorm.forward(x, gamma, beta, axis=(1, 2), running_mean=rm, running_var=rv,
                                  momentum=0.6)
    oy, om, ors, nrm, nrv = oracle_forward(x, gamma, beta, (1, 2), 1e-8, True, orm, orv, 0.6)
    assert_close(y, oy, TOL64)
    assert_close(rmb[1], nrm, TOL64)
    assert_close(rvb[0, ::-2], nrv, TOL64)
    np.testing.assert_array_equal(rmb[0], 0)
    np.testing.assert_array_equal(rvb[0, -2::-2], 1)
    np.testing.assert_array_equal(rvb[1], 1)
    # backward with mean / rstd passed as strided views
    mb, rb = np.zeros((4, 10)), np.zeros((8, 5))
    mb[:, ::2], rb[::-2] = mean, rstd
    dx, dg, db = bnorm.backward(dy, x, mb[:, ::2], rb[::-2], gamma, axis=(1, 2))
    odx, odg, odb = oracle_backward(dy, x, om, ors, gamma, (1, 2))
    assert_close(dx, odx, TOL64)
    assert_close(dg, odg, TOL64)
    assert_close(db, odb, TOL64)
    assert F == mean.shape


# --------------------------------------------------------------------------- float32 precision
@pytest.mark.parametrize("loc, scale", [(1e4, 1.0), (-1e3, 0.01)])
@pytest.mark.parametrize("shape, axis", [((4096, 8), -1), ((32, 4, 16, 8), 1),
                                         ((16, 256, 3), (0, 2))], ids=["NC", "NCHW", "F2d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float32_far_from_zero_is_float32_accurate(shape, axis, loc, scale, training):
    rng = np.random.default_rng(9)
    x = randn(rng, shape, F32, loc=loc, scale=scale)
    dy = randn(rng, shape, F32)
    F = fshape(shape, axis)
    gamma = rng.uniform(0.5, 2.0, F).astype(F32)
    beta = rng.standard_normal(F).astype(F32)
    batch_mean, batch_var = mean_var(x, axis)
    # running stats near the data (as after training), in float32
    rm = (batch_mean + 0.1 * scale * rng.standard_normal(F)).astype(F32)
    rv = (batch_var * rng.uniform(0.8, 1.2, F)).astype(F32)
    rm_b, rv_b = rm.copy(), rv.copy()
    y, mean, rstd = bnorm.forward(x, gamma, beta, axis=axis, training=training,
                                  running_mean=rm_b, running_var=rv_b)
    oy, om, ors, orm, orv = oracle_forward(x, gamma, beta, axis, 1e-8, training, rm, rv)
    assert_close(y, oy, TOL32, "y")
    assert_close(mean, om, TOL32, "mean")
    assert_close(rstd, ors, TOL32, "rstd")
    if training:
        assert_close(rm_b, orm, TOL32, "running_mean")
        assert_close(rv_b, orv, TOL32, "running_var")
    dx, dgamma, dbeta = bnorm.backward(dy, x, mean, rstd, gamma, axis=axis, training=training)
    odx, odg, odb = oracle_backward(dy, x, om, ors, gamma, axis, training)
    assert_close(dx, odx, TOL32, "dx")
    assert_close(dgamma, odg, TOL32, "dgamma")
    assert_close(dbeta, odb, TOL32, "dbeta")


def test_float32_far_from_zero_tolerance_is_meaningful():
    """The post's float32 code misses the float64 oracle by far more than TOL32 on this data, so
    the test above really demands more than the naive float32 computation gives."""
    rng = np.random.default_rng(9)
    x = randn(rng, (4096, 8), F32, loc=1e4)
    dy = randn(rng, (4096, 8), F32)
    ry, rmean, rrstd = reference.forward(x)
    oy, om, ors, _, _ = oracle_forward(x)
    rdx, rdg, rdb = reference.backward(dy, x, rmean, rrstd)
    odx, odg, odb = oracle_backward(dy, x, om, ors)
    for got, exp in [(ry, oy), (rdg, odg)]:
        err = np.max(np.abs(got - exp)) / np.max(np.abs(exp))
        assert err > 10 * TOL32


# --------------------------------------------------------------------------- finite differences
def loss_and_grads(x, gamma, beta, w, axis, training, rm, rv, eps):
    y, mean, rstd = bnorm.forward(x, gamma, beta, axis=axis, eps=eps, training=training,
                                  running_mean=None if training else rm,
                                  running_var=None if training else rv)
    return float(np.sum(w * y)), mean, rstd


def central_diff(f, a, h):
    g = np.zeros(np.shape(a))
    flat = np.asarray(a).reshape(-1) if np.ndim(a) else None
    if flat is None:
        return np.asarray((f(a + h) - f(a - h)) / (2 * h))
    for i in range(flat.size):
        ap, am = flat.copy(), flat.copy()
        ap[i] += h
        am[i] -= h
        g.reshape(-1)[i] = (f(ap.reshape(np.shape(a))) - f(am.reshape(np.shape(a)))) / (2 * h)
    return g


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape, axis, gshape", [
    ((6, 3), -1, (3,)),
    ((3, 4, 5), 1, (4,)),
    ((2, 3, 2, 2), (1, 3), (3, 2)),
    ((2, 3, 2, 2), (1, 3), (1, 2)),      # broadcast gamma: dgamma keeps its shape
    ((5, 4), 0, ()),                     # scalar gamma: 0-d dgamma
    ((4, 2, 3), (), ()),                 # every axis reduced
])
def test_finite_differences_float64(shape, axis, gshape, training):
    rng = np.random.default_rng(10)
    F = fshape(shape, axis)
    x = rng.standard_normal(shape) * 1.3 + 0.2
    w = rng.standard_normal(shape)
    gamma = rng.uniform(0.5, 2.0, gshape)
    beta = rng.standard_normal(F)
    rm, rv = 0.3 * rng.standard_normal(F), rng.uniform(0.5, 2.0, F)
    eps = 1e-5
    args = dict(axis=axis, training=training, rm=rm, rv=rv, eps=eps)
    L, mean, rstd = loss_and_grads(x, gamma, beta, w, **args)
    dx, dgamma, dbeta = bnorm.backward(w, x, mean, rstd, gamma, axis=axis, training=training)
    h = 1e-6
    fdx = central_diff(lambda a: loss_and_grads(a, gamma, beta, w, **args)[0], x, h)
    fdg = central_diff(lambda a: loss_and_grads(x, a, beta, w, **args)[0], gamma, h)
    fdb = central_diff(lambda a: loss_and_grads(x, gamma, a, w, **args)[0], beta, h)
    # central differences: truncation O(h^2) ~ 1e-12, cancellation ~ eps64 * |L| / h ~ 1e-9
    assert np.shape(dgamma) == gshape and np.shape(dbeta) == F and dx.shape == shape
    assert_close(dx, fdx, 1e-6, "dx")
    assert_close(dgamma, fdg, 1e-6, "dgamma")
    assert_close(dbeta, fdb, 1e-6, "dbeta")


# --------------------------------------------------------------------------- PyTorch
def _to_torch_2d(a, axis):
    """(batch..., features...) -> (M, prod F): the layout torch's batch_norm reduces over."""
    red, kept = axes_of(a.ndim, axis)
    t = np.transpose(a, red + kept)
    M = int(np.prod([a.shape[i] for i in red], dtype=np.int64))
    return np.ascontiguousarray(t.reshape(M, -1))


def _from_torch_2d(a2, shape, axis):
    red, kept = axes_of(len(shape), axis)
    perm = red + kept
    t = a2.reshape([shape[i] for i in perm])
    return np.transpose(t, np.argsort(perm))


TORCH_CASES = [((16, 5), -1, "2d"), ((4, 3, 5, 6), 1, "nchw"), ((4, 5, 6, 3), -1, "2d"),
               ((3, 4, 2, 5), (1, 2), "2d"), ((6, 3, 4), (0, 2), "2d"), ((5, 2, 3), -1, "2d")]  # last: M = 10


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: case_id(c[:2]))
def test_agrees_with_torch(case, dtype, training):
    torch = pytest.importorskip("torch")
    tF = torch.nn.functional
    shape, axis, mode = case
    rng = np.random.default_rng(11)
    F = fshape(shape, axis)
    red, kept = axes_of(len(shape), axis)
    M = int(np.prod([shape[i] for i in red]))
    x = randn(rng, shape, dtype, loc=0.5, scale=2.0)
    dy = randn(rng, shape, dtype)
    gamma, beta, rm, rv = params(rng, F, dtype)
    eps, momentum = 1e-5, 0.7

    rm_b, rv_b = rm.copy(), rv.copy()
    y, mean, rstd = bnorm.forward(x, gamma, beta, axis=axis, eps=eps, training=training,
                                  running_mean=rm_b, running_var=rv_b, momentum=momentum)
    dx, dgamma, dbeta = bnorm.backward(dy, x, mean, rstd, gamma, axis=axis, training=training)

    if mode == "nchw":
        xt_np, dyt_np = x, dy
    else:
        xt_np, dyt_np = _to_torch_2d(x, axis), _to_torch_2d(dy, axis)
    xt = torch.tensor(xt_np, requires_grad=True)
    wt = torch.tensor(gamma.reshape(-1), requires_grad=True)
    bt = torch.tensor(beta.reshape(-1), requires_grad=True)
    rmt, rvt = torch.tensor(rm.reshape(-1)), torch.tensor(rv.reshape(-1))
    # PyTorch's momentum is the weight of the new value (ours: of the old one)
    yt = tF.batch_norm(xt, rmt, rvt, wt, bt, training=training, momentum=1 - momentum, eps=eps)
    yt.backward(torch.tensor(dyt_np))

    def back(t):
        a = t.detach().numpy()
        return a if mode == "nchw" else _from_torch_2d(a, shape, axis)

    t = tol_ref(dtype)
    assert_close(y, back(yt), t, "y")
    assert_close(dx, back(xt.grad), t, "dx", scale=dx_terms(dy, rstd, gamma, axis))
    assert_close(dgamma, wt.grad.numpy().reshape(F), t, "dgamma")
    assert_close(dbeta, bt.grad.numpy().reshape(F), t, "dbeta")
    if training:
        assert_close(rm_b, rmt.numpy().reshape(F), t, "running_mean")
        # torch's running_var uses the unbiased batch variance; ours the biased one
        torch_unbiased = (rvt.numpy().reshape(F).astype(F64) - momentum * rv) / (1 - momentum)
        assert_close(rv_b, momentum * rv + (1 - momentum) * torch_unbiased * (M - 1) / M, t,
                     "running_var")
    else:
        np.testing.assert_array_equal(mean, rm)
        np.testing.assert_array_equal(rm_b, rm)
        np.testing.assert_array_equal(rv_b, rv)


# --------------------------------------------------------------------------- running statistics
@pytest.mark.parametrize("momentum", [0.9, 0.5, 0.0, 1.0])
@pytest.mark.parametrize("xdtype, sdtype", [(F32, F32), (F64, F64), (F32, F64), (F64, F32)])
def test_running_stats_updated_in_place(xdtype, sdtype, momentum):
    rng = np.random.default_rng(12)
    x = randn(rng, (6, 4, 3), xdtype, loc=2.0, scale=3.0)
    rm = rng.standard_normal((4, 3)).astype(sdtype)
    rv = rng.uniform(0.5, 2, (4, 3)).astype(sdtype)
    rm0, rv0 = rm.copy(), rv.copy()
    ptr_m, ptr_v = rm.ctypes.data, rv.ctypes.data
    y, mean, rstd = bnorm.forward(x, axis=(1, 2), running_mean=rm, running_var=rv,
                                  momentum=momentum)
    assert rm.ctypes.data == ptr_m and rv.ctypes.data == ptr_v
    assert rm.dtype == sdtype and rv.dtype == sdtype and rm.shape == (4, 3)
    bm, bv = mean_var(x, (1, 2))  # biased
    t = TOL32 if F32 in (xdtype, sdtype) else TOL64
    assert_close(rm, momentum * rm0.astype(F64) + (1 - momentum) * bm, t, "running_mean")
    assert_close(rv, momentum * rv0.astype(F64) + (1 - momentum) * bv, t, "running_var")
    if momentum == 1.0:
        np.testing.assert_array_equal(rm, rm0)
        np.testing.assert_array_equal(rv, rv0)
    # the returned statistics are the batch's, not the running ones
    assert_close(mean, bm, tol_oracle(xdtype))
    assert_close(rstd, 1 / np.sqrt(bv + 1e-8), tol_oracle(xdtype))


def test_running_stats_accumulate_over_steps():
    rng = np.random.default_rng(13)
    rm, rv = np.zeros(3), np.ones(3)
    em, ev = rm.copy(), rv.copy()
    for _ in range(5):
        x = rng.standard_normal((8, 3)) * [1, 2, 3] + [0, 1, -1]
        bnorm.forward(x, running_mean=rm, running_var=rv)
        em = 0.9 * em + 0.1 * x.mean(0)
        ev = 0.9 * ev + 0.1 * x.var(0)
    assert_close(rm, em, TOL64)
    assert_close(rv, ev, TOL64)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_eval_mode_uses_running_stats(dtype):
    rng = np.random.default_rng(14)
    x = randn(rng, (5, 3, 4), dtype, loc=1.0)
    dy = randn(rng, (5, 3, 4), dtype)
    rm = rng.standard_normal(3).astype(dtype)
    rv = rng.uniform(0.5, 2, 3).astype(dtype)
    rm.flags.writeable = False  # eval mode never writes them: read-only is fine
    rv.flags.writeable = False
    gamma, beta = rng.uniform(0.5, 2, 3).astype(dtype), rng.standard_normal(3).astype(dtype)
    y, mean, rstd = bnorm.forward(x, gamma, beta, axis=1, training=False, running_mean=rm,
                                  running_var=rv, eps=1e-3)
    np.testing.assert_array_equal(mean, rm)
    assert mean.dtype == dtype and mean.shape == (3,)
    assert_close(rstd, 1 / np.sqrt(rv.astype(F64) + 1e-3), tol_oracle(dtype))
    e = lambda v: np.asarray(v, F64)[None, :, None]  # noqa: E731
    assert_close(y, (x.astype(F64) - e(rm)) / np.sqrt(e(rv) + 1e-3) * e(gamma) + e(beta),
                 tol_oracle(dtype))
    # the batch statistics are not used: a very different batch gives the same affine map
    y2, _, _ = bnorm.forward(x * 10 + 5, gamma, beta, axis=1, training=False, running_mean=rm,
                             running_var=rv, eps=1e-3)
    assert_close(y2, (x.astype(F64) * 10 + 5 - e(rm)) / np.sqrt(e(rv) + 1e-3) * e(gamma)
                 + e(beta), tol_oracle(dtype))
    # eval-mode backward: dx = gamma * rstd * dy (no batch-statistics terms)
    dx, dgamma, dbeta = bnorm.backward(dy, x, mean, rstd, gamma, axis=1, training=False)
    assert_close(dx, e(gamma) * e(rstd) * dy.astype(F64), tol_oracle(dtype), "dx")
    xhat = (x.astype(F64) - e(rm)) * e(rstd)
    assert_close(dgamma, (dy * xhat).sum((0, 2)), tol_oracle(dtype), "dgamma")
    assert_close(dbeta, dy.astype(F64).sum((0, 2)), tol_oracle(dtype), "dbeta")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_eval_mode_with_empty_batch_is_fine(dtype):
    x = np.zeros((0, 3), dtype)
    rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
    y, mean, rstd = bnorm.forward(x, training=False, running_mean=rm, running_var=rv)
    assert y.shape == (0, 3) and mean.shape == (3,) and rstd.shape == (3,)
    dx, dg, db = bnorm.backward(x, x, mean, rstd, training=False)
    assert dx.shape == (0, 3)
    np.testing.assert_array_equal(dg, 0)
    np.testing.assert_array_equal(db, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_zero_features(dtype):
    x = np.zeros((4, 0), dtype)
    y, mean, rstd = bnorm.forward(x)
    assert y.shape == (4, 0) and mean.shape == (0,) and rstd.shape == (0,)
    dx, dg, db = bnorm.backward(x, x, mean, rstd)
    assert dx.shape == (4, 0) and dg.shape == (0,) and db.shape == (0,)


# --------------------------------------------------------------------------- gamma and beta
GAMMAS = [
    ("none", None),
    ("py_float", 1.7),
    ("py_int", 2),
    ("np_scalar", "np_scalar"),
    ("0d", "0d"),
    ("ones1", (1,)),
    ("C", (4,)),
    ("H1", (3, 1)),
    ("1C", (1, 4)),
    ("F", (3, 4)),
    ("list", "list"),
    ("other_dtype", "other_dtype"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("gname, gspec", GAMMAS, ids=[g[0] for g in GAMMAS])
def test_gamma_forms(gname, gspec, training, dtype):
    """F = (H, C) = (3, 4); gamma and beta in every form that broadcasts to F."""
    rng = np.random.default_rng(15)
    shape, axis, F = (5, 3, 2, 4), (1, 3), (3, 4)
    x = randn(rng, shape, dtype, loc=0.5)
    dy = randn(rng, shape, dtype)
    if gspec is None or isinstance(gspec, (float, int)):
        gamma = gspec
    elif gspec == "np_scalar":
        gamma = dtype(-1.25)
    elif gspec == "0d":
        gamma = np.array(0.75, dtype)
    elif gspec == "list":
        gamma = [[0.5, 1.0, 1.5, 2.0]]  # shape (1, 4)
    elif gspec == "other_dtype":
        gamma = rng.uniform(0.5, 2, F).astype(F64 if dtype == F32 else F32)
    else:
        gamma = rng.uniform(0.5, 2, gspec).astype(dtype)
    gshape = F if gamma is None else np.shape(gamma)
    beta = None if gamma is None else rng.standard_normal(gshape).astype(dtype)
    _, _, rm, rv = params(rng, F, dtype)
    y, mean, rstd, dx, dgamma, dbeta = check_all(x, dy, gamma, beta, axis, training, rm, rv)
    assert np.shape(dgamma) == gshape and np.asarray(dgamma).dtype == dtype
    assert dbeta.shape == F


# --------------------------------------------------------------------------- out=
def _fwd_expected(x, gamma, beta, axis):
    return oracle_forward(np.array(x), gamma, beta, axis)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["fresh", "fortran", "strided_view", "negative_view"])
def test_out_forward_and_backward(kind, dtype):
    rng = np.random.default_rng(16)
    shape, axis = (6, 3, 4), 1
    x = randn(rng, shape, dtype, loc=1.0)
    dy = randn(rng, shape, dtype)
    gamma, beta, _, _ = params(rng, (3,), dtype)
    sentinel = -123.0

    index = {"strided_view": (slice(None, None, 2), slice(None), slice(1, None, 2)),
             "negative_view": (slice(None, None, -2), slice(None, None, -1),
                               slice(-2, None, -2))}.get(kind)

    def make():
        if kind == "fresh":
            return np.empty(shape, dtype), None
        if kind == "fortran":
            return np.empty(shape, dtype, order="F"), None
        buf = np.full((12, 3, 9), sentinel, dtype)
        v = buf[index]
        assert v.shape == shape and not v.flags.contiguous
        return v, buf

    out, buf = make()
    y, mean, rstd = bnorm.forward(x, gamma, beta, axis=axis, out=out)
    assert y is out
    oy, om, ors, _, _ = oracle_forward(x, gamma, beta, axis)
    assert_close(out, oy, tol_oracle(dtype))
    if buf is not None:  # nothing outside the view was written
        mask = np.ones(buf.shape, bool)
        mask[index] = False
        np.testing.assert_array_equal(buf[mask], sentinel)

    dout, dbuf = make()
    dx, dg, db = bnorm.backward(dy, x, mean, rstd, gamma, axis=axis, out=dout)
    assert dx is dout
    odx, odg, odb = oracle_backward(dy, x, om, ors, gamma, axis)
    assert_close(dout, odx, tol_oracle(dtype))
    assert_close(dg, odg, tol_oracle(dtype))
    assert_close(db, odb, tol_oracle(dtype))
    if dbuf is not None:
        np.testing.assert_array_equal(dbuf[mask], sentinel)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", [lay_c, lay_transposed, lay_negative, lay_unaligned],
                         ids=lambda f: f.__name__[4:])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_out_in_place(layout, training, dtype):
    """out=x for forward, out=dy for backward (docs/api.md): results as if computed from
    copies."""
    rng = np.random.default_rng(17)
    shape, axis = (7, 3, 5), (0, 2)
    F = fshape(shape, axis)
    xc = randn(rng, shape, dtype, loc=-2.0, scale=0.5)
    dyc = randn(rng, shape, dtype)
    gamma, beta, rm, rv = params(rng, F, dtype)
    x = layout(xc.copy(), rng)
    rm_b, rv_b = rm.copy(), rv.copy()
    y, mean, rstd = bnorm.forward(x, gamma, beta, axis=axis, training=training, out=x,
                                  running_mean=rm_b, running_var=rv_b)
    assert y is x
    oy, om, ors, orm, orv = oracle_forward(xc, gamma, beta, axis, 1e-8, training, rm, rv)
    t = tol_oracle(dtype)
    assert_close(x, oy, t, "y in place")
    assert_close(mean, om, t, "mean")
    assert_close(rstd, ors, t, "rstd")
    if training:
        assert_close(rm_b, orm, t)
        assert_close(rv_b, orv, t)

    dy = layout(dyc.copy(), rng)
    dx, dg, db = bnorm.backward(dy, xc, mean, rstd, gamma, axis=axis, training=training, out=dy)
    assert dx is dy
    odx, odg, odb = oracle_backward(dyc, xc, om, ors, gamma, axis, training)
    assert_close(dy, odx, t, "dx in place")
    assert_close(dg, odg, t, "dgamma")
    assert_close(db, odb, t, "dbeta")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_views_that_share_memory(dtype):
    """Arguments that overlap each other: results are those of the same call on copies."""
    rng = np.random.default_rng(18)
    shape, axis = (8, 5), -1
    xc = randn(rng, shape, dtype, loc=0.5)
    dyc = randn(rng, shape, dtype)
    gamma, beta, _, _ = params(rng, (5,), dtype)
    t = tol_oracle(dtype)
    oy, om, ors, _, _ = oracle_forward(xc, gamma, beta, axis)

    # out is x reversed (overlapping, not identical)
    x = xc.copy()
    y, mean, rstd = bnorm.forward(x, gamma, beta, out=x[::-1])
    assert_close(x[::-1], oy, t, "out = x[::-1]")
    assert_close(mean, om, t)

    # out = x, and beta is a row of x (read after x is overwritten?)
    x = xc.copy()
    bnorm.forward(x, gamma, x[2], out=x)
    oy2 = oracle_forward(xc, gamma, xc[2].copy(), axis)[0]
    assert_close(x, oy2, t, "out = x with beta = x[2]")

    # out = x, and gamma is a row of x
    x = xc.copy()
    bnorm.forward(x, x[0], beta, out=x)
    oy3 = oracle_forward(xc, xc[0].copy(), beta, axis)[0]
    assert_close(x, oy3, t, "out = x with gamma = x[0]")

    # backward: dy is x itself (dx is then ~0: its terms cancel, see dx_terms), or x reversed
    for dy in (xc, xc[::-1]):
        dx, dg, db = bnorm.backward(dy, xc, om.astype(dtype), ors.astype(dtype), gamma)
        odx, odg, odb = oracle_backward(dy, xc, om, ors, gamma, axis)
        assert_close(dx, odx, t, "dy shares x's memory", scale=dx_terms(dy, ors, gamma, axis))
        assert_close(dg, odg, t)
        assert_close(db, odb, t)

    # backward: out = x (x is needed for xhat while dx is written)
    _, m32, r32 = bnorm.forward(xc, gamma, beta)
    odx, odg, odb = oracle_backward(dyc, xc, om, ors, gamma, axis)
    x = xc.copy()
    dx, dg, db = bnorm.backward(dyc, x, m32, r32, gamma, out=x)
    assert dx is x
    assert_close(x, odx, t, "backward out = x")
    assert_close(dg, odg, t, "dgamma with out = x")
    assert_close(db, odb, t, "dbeta with out = x")

    # backward: out = dy reversed (overlapping, not identical)
    dy = dyc.copy()
    dx, dg, db = bnorm.backward(dy, xc, m32, r32, gamma, out=dy[::-1])
    assert_close(dy[::-1], odx, t, "backward out = dy[::-1]")
    assert_close(dg, odg, t)
    assert_close(db, odb, t)


# --------------------------------------------------------------------------- array-likes
def test_lists_are_converted():
    rng = np.random.default_rng(19)
    x = rng.standard_normal((5, 3))
    dy = rng.standard_normal((5, 3))
    gamma, beta = [1.5, -0.5, 2.0], [0.1, 0.2, 0.3]
    y, mean, rstd = bnorm.forward(x.tolist(), gamma, beta)
    assert isinstance(y, np.ndarray) and y.dtype == F64 and y.shape == (5, 3)
    oy, om, ors, _, _ = oracle_forward(x, np.array(gamma), np.array(beta))
    assert_close(y, oy, TOL64)
    assert_close(mean, om, TOL64)
    dx, dg, db = bnorm.backward(dy.tolist(), x.tolist(), mean.tolist(), rstd.tolist(), gamma)
    odx, odg, odb = oracle_backward(dy, x, om, ors, np.array(gamma))
    assert_close(dx, odx, TOL64)
    assert_close(dg, odg, TOL64)
    assert_close(db, odb, TOL64)
    # a nested tuple and axis as a list-free tuple
    y2, _, _ = bnorm.forward(tuple(map(tuple, x.T.tolist())), axis=(0,))
    assert_close(y2, oracle_forward(x.T, axis=0)[0], TOL64)


# --------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis, feat, pos", [
    ((9, 4), -1, (2,), (5, 2)),
    ((3, 4, 2, 5), 1, (1,), (2, 1, 0, 3)),
    ((3, 4, 5), (0, 2), (1, 4), (1, 2, 4)),
])
def test_nonfinite_propagates_to_its_feature_only(shape, axis, feat, pos, dtype, bad):
    rng = np.random.default_rng(20)
    F = fshape(shape, axis)
    red, kept = axes_of(len(shape), axis)
    clean = randn(rng, shape, dtype)
    dy = randn(rng, shape, dtype)
    gamma, beta, rm, rv = params(rng, F, dtype)
    dirty = clean.copy()
    dirty[pos] = bad
    # index of everything that belongs to feature `feat`
    sel = [slice(None)] * len(shape)
    for a, i in zip(kept, feat):
        sel[a] = i
    sel = tuple(sel)
    other = np.ones(shape, bool)
    other[sel] = False
    fother = np.ones(F, bool)
    fother[feat] = False

    # training forward (with running stats) and backward
    rmc, rvc, rmd, rvd = rm.copy(), rv.copy(), rm.copy(), rv.copy()
    yc, mc, rc = bnorm.forward(clean, gamma, beta, axis=axis, running_mean=rmc, running_var=rvc)
    yd, md, rd = bnorm.forward(dirty, gamma, beta, axis=axis, running_mean=rmd, running_var=rvd)
    assert not np.isfinite(yd[sel]).any()
    assert not np.isfinite(md[feat]) and not np.isfinite(rmd[feat])
    assert not np.isfinite(rd[feat]) or rd[feat] == 0
    np.testing.assert_array_equal(yd[other], yc[other])
    for a, b in [(md, mc), (rd, rc), (rmd, rmc), (rvd, rvc)]:
        np.testing.assert_array_equal(a[fother], b[fother])
    assert_close(yd[other], oracle_forward(clean, gamma, beta, axis)[0][other],
                 tol_oracle(dtype))

    # backward with the bad value in dy
    dyd = dy.copy()
    dyd[pos] = bad
    dxc, dgc, dbc = bnorm.backward(dy, clean, mc, rc, gamma, axis=axis)
    dxd, dgd, dbd = bnorm.backward(dyd, clean, mc, rc, gamma, axis=axis)
    assert not np.isfinite(dxd[sel]).any()
    assert not np.isfinite(dgd[feat]) and not np.isfinite(dbd[feat])
    np.testing.assert_array_equal(dxd[other], dxc[other])
    np.testing.assert_array_equal(dgd[fother], dgc[fother])
    np.testing.assert_array_equal(dbd[fother], dbc[fother])

    # backward with the bad value in x (stats finite): dgamma and dx of that feature break,
    # dbeta = sum(dy) does not depend on x
    dxd, dgd, dbd = bnorm.backward(dy, dirty, mc, rc, gamma, axis=axis)
    assert not np.isfinite(dxd[sel]).any() and not np.isfinite(dgd[feat])
    np.testing.assert_array_equal(dbd, dbc)
    np.testing.assert_array_equal(dxd[other], dxc[other])
    np.testing.assert_array_equal(dgd[fother], dgc[fother])

    # eval mode: statistics are constants, so only the element itself is affected
    yc, _, _ = bnorm.forward(clean, gamma, beta, axis=axis, training=False, running_mean=rm,
                             running_var=rv)
    yd, md, _ = bnorm.forward(dirty, gamma, beta, axis=axis, training=False, running_mean=rm,
                              running_var=rv)
    assert not np.isfinite(yd[pos])
    only = np.ones(shape, bool)
    only[pos] = False
    np.testing.assert_array_equal(yd[only], yc[only])
    np.testing.assert_array_equal(md, rm)


# --------------------------------------------------------------------------- threads
def test_num_threads_round_trip():
    before = bnorm.get_num_threads()
    assert isinstance(before, int) and before >= 1
    try:
        bnorm.set_num_threads(1)
        assert bnorm.get_num_threads() == 1
        bnorm.set_num_threads(2)
        assert bnorm.get_num_threads() == 2
    finally:
        bnorm.set_num_threads(before)
    assert bnorm.get_num_threads() == before


def test_num_threads_env_variable():
    out = subprocess.run([sys.executable, "-c", "import bnorm; print(bnorm.get_num_threads())"],
                         env=child_env(BNORM_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=60, cwd=BNORM_PARENT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis", [((4096, 256), -1), ((16, 64, 32, 32), 1),
                                         ((64, 128, 128), (0,))], ids=["NC", "NCHW", "first"])
def test_results_bitwise_identical_for_1_and_2_threads(shape, axis, dtype):
    rng = np.random.default_rng(21)
    x = randn(rng, shape, dtype, loc=3.0)
    dy = randn(rng, shape, dtype)
    F = fshape(shape, axis)
    gamma, beta, rm, rv = params(rng, F, dtype)
    before = bnorm.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, 2):
            bnorm.set_num_threads(n)
            rm_b, rv_b = rm.copy(), rv.copy()
            y, mean, rstd = bnorm.forward(x, gamma, beta, axis=axis, running_mean=rm_b,
                                          running_var=rv_b)
            dx, dg, db = bnorm.backward(dy, x, mean, rstd, gamma, axis=axis)
            results.append((y, mean, rstd, rm_b, rv_b, dx, dg, db))
    finally:
        bnorm.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()
    # and it is the right answer
    assert_close(results[0][1], x.astype(F64).mean(axes_of(x.ndim, axis)[0]), tol_oracle(dtype))


# --------------------------------------------------------------------------- misc
def test_version_is_a_string():
    assert isinstance(bnorm.__version__, str)
    assert re.match(r"^\d+\.\d+", bnorm.__version__)


def test_reference_is_a_module_in_the_package():
    assert bnorm.reference is reference
    assert callable(reference.forward) and callable(reference.backward)
