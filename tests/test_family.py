"""The normalization family (docs/api.md, "The normalization family, on the same engine"):
``layer_norm``, ``rms_norm``, ``group_norm``, their backwards and the layers ``LayerNorm``,
``RMSNorm``, ``GroupNorm``.

Oracles: PyTorch's autograd in float64 (``F.layer_norm``, ``F.rms_norm``, ``F.group_norm`` and the
modules; the normalized axes moved last, or the channel axis to 1, for torch), and the float64
formulas of tests/helpers.py where torch has no counterpart (the statistics, gamma in a broadcast
or keepdims shape, float32 data far from zero, half precision).  Layouts: trailing axes, the
channels-first layer norm of ConvNeXt (``axis=1`` on NCHW), several normalized axes, strided
views (steps, negative strides, transposes), group norm NCHW and NHWC, instance norm, one group.
"""
import re
import warnings

import ml_dtypes
import numpy as np
import pytest
from helpers import (F32, F64, TOL32, TOL64, AxisError, assert_close, assert_raises_untouched,
                     norm_axes, oracle_group_norm, oracle_group_norm_backward, oracle_layer_norm,
                     oracle_layer_norm_backward, oracle_rms_norm, oracle_rms_norm_backward,
                     readonly, stable_seed, to_param_shape, ulp)

import bnorm
from bnorm import reference

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALVES = [F16, BF16]
HALF_IDS = ["float16", "bfloat16"]
ALL_DTYPES = [np.dtype(F32), np.dtype(F64), F16, BF16]
ALL_IDS = ["float32", "float64", "float16", "bfloat16"]


def stat_dtype(dtype):
    """mean, rstd, rrms: x's dtype, float32 for half x."""
    return np.dtype(F32) if np.dtype(dtype).itemsize == 2 else np.dtype(dtype)


def make_view(base, view):
    """None: base itself; "T": its axes reversed; "nhwc": an NCHW base seen as NHWC; else an
    index (slices)."""
    if view is None:
        return base
    if view == "T":
        return base.transpose()
    if view == "nhwc":
        return base.transpose(0, 2, 3, 1)
    return base[view]


def data(key, base_shape, view, dtype=F64, loc=0.0, scale=1.0):
    """x and dy, both laid out as ``view`` of a base of ``base_shape``, and the generator."""
    rng = np.random.default_rng(stable_seed(*key))
    x = make_view((loc + scale * rng.standard_normal(base_shape)).astype(dtype), view)
    dy = make_view(rng.standard_normal(base_shape).astype(dtype), view)
    return rng, x, dy


# ---------------------------------------------------------------------------------- layouts
S2, S3 = slice(None, None, 2), slice(1, None, 3)
# name: (base shape, normalized axes, view of the base)
LN_LAYOUTS = {
    "2d": ((64, 48), -1, None),
    "transformer-3d": ((4, 16, 48), -1, None),
    "nchw-axis1-convnext": ((4, 6, 7, 5), 1, None),
    "two-trailing": ((4, 6, 7, 5), (-2, -1), None),
    "two-apart": ((4, 6, 7, 5), (1, 3), None),
    "first-and-last": ((3, 4, 5), (0, 2), None),
    "every-axis": ((3, 4, 5), (0, 1, 2), None),
    "steps": ((8, 10, 24), -1, (S2, S3, S2)),
    "negative-strides": ((6, 5, 24), (1, 2), (slice(None, None, -1), slice(None),
                                                slice(None, None, -2))),
    "transposed": ((24, 5, 6), -1, "T"),
    "transposed-axis1": ((16, 8, 6), 1, "T"),
    "transposed-steps-two": ((20, 9, 6), (0, 1), (slice(None, None, -3), S2, slice(None))),
}
# name: (base shape, channel axis, num_groups, view of the base)
GN_LAYOUTS = {
    "nchw": ((4, 12, 5, 6), 1, 3, None),
    "nhwc": ((4, 5, 6, 12), -1, 3, None),
    "ncl": ((4, 12, 20), 1, 4, None),
    "ncdhw": ((2, 8, 3, 4, 5), 1, 2, None),
    "nc": ((16, 12), 1, 4, None),
    "channels-axis2": ((4, 5, 12, 6), 2, 4, None),
    "instance-nchw": ((4, 12, 5, 6), 1, 12, None),
    "instance-nhwc": ((4, 5, 6, 12), -1, 12, None),
    "one-group-nchw": ((4, 12, 5, 6), 1, 1, None),
    "one-group-nhwc": ((4, 5, 6, 12), -1, 1, None),
    "nchw-steps": ((8, 12, 10, 12), 1, 4, (S2, slice(None), slice(None, None, -2), S3)),
    "nhwc-view-of-nchw": ((4, 12, 5, 6), -1, 6, "nhwc"),
}


def ln_shapes(x, axis):
    """(G, the statistics' shape) of a layer or RMS norm."""
    norm, other = norm_axes(x.ndim, axis)
    return tuple(x.shape[a] for a in norm), tuple(x.shape[a] for a in other)


# ---------------------------------------------------------------------------------- PyTorch
def torch_f64(a, grad=True):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(np.array(a, dtype=F64))
    return t.requires_grad_(True) if grad else t


def torch_layer_or_rms(x, dy, gamma, beta, axis, eps, rms=False):
    """PyTorch's F.layer_norm (or F.rms_norm) under autograd in float64, the normalized axes
    moved last: y, dx, dgamma, dbeta (None where there is no such parameter)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    norm, other = norm_axes(x.ndim, axis)
    perm = other + norm
    back = np.argsort(perm)
    G = tuple(x.shape[a] for a in norm)
    xt = torch_f64(np.transpose(x, perm))
    w = None if gamma is None else torch_f64(np.broadcast_to(gamma, G))
    b = None if beta is None else torch_f64(np.broadcast_to(beta, G))
    if rms:
        yt = F.rms_norm(xt, G, w, eps)
    else:
        yt = F.layer_norm(xt, G, w, b, eps)
    yt.backward(torch_f64(np.transpose(dy, perm), grad=False))
    grads = [None if p is None else p.grad.numpy() for p in (w, b)]
    return (yt.detach().numpy().transpose(back), xt.grad.numpy().transpose(back), *grads)


def torch_group_norm(x, dy, num_groups, gamma, beta, axis, eps):
    """PyTorch's F.group_norm under autograd in float64, the channel axis moved to 1."""
    torch = pytest.importorskip("torch")
    xt = torch_f64(np.moveaxis(x, axis, 1))
    w = None if gamma is None else torch_f64(gamma)
    b = None if beta is None else torch_f64(beta)
    yt = torch.nn.functional.group_norm(xt, num_groups, w, b, eps)
    yt.backward(torch_f64(np.moveaxis(dy, axis, 1), grad=False))
    grads = [None if p is None else p.grad.numpy() for p in (w, b)]
    return (np.moveaxis(yt.detach().numpy(), 1, axis), np.moveaxis(xt.grad.numpy(), 1, axis),
            *grads)


# ---------------------------------------------------------------------------------- against PyTorch
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout", LN_LAYOUTS)
def test_layer_norm_against_torch(layout, affine):
    base, axis, view = LN_LAYOUTS[layout]
    rng, x, dy = data(("ln", layout), base, view, loc=0.5, scale=2.0)
    G, stats = ln_shapes(x, axis)
    gamma = rng.uniform(0.5, 2.0, G) if affine else None
    beta = rng.standard_normal(G) if affine else None
    y, mean, rstd = bnorm.layer_norm(x, gamma, beta, axis=axis, eps=1e-5)
    dx, dgamma, dbeta = bnorm.layer_norm_backward(dy, x, mean, rstd, gamma, axis=axis)
    ty, tdx, tdgamma, tdbeta = torch_layer_or_rms(x, dy, gamma, beta, axis, 1e-5)
    _, om, ors = oracle_layer_norm(x, gamma, beta, axis, 1e-5)
    assert y.dtype == dx.dtype == mean.dtype == rstd.dtype == F64
    assert mean.shape == rstd.shape == stats and dgamma.shape == dbeta.shape == G
    assert_close(y, ty, TOL64, "y")
    assert_close(mean, om, TOL64, "mean")
    assert_close(rstd, ors, TOL64, "rstd")
    assert_close(dx, tdx, TOL64, "dx")
    _, odgamma, odbeta = oracle_layer_norm_backward(dy, x, om, ors, gamma, axis)
    assert_close(dgamma, tdgamma if affine else odgamma, TOL64, "dgamma")
    assert_close(dbeta, tdbeta if affine else odbeta, TOL64, "dbeta")


@pytest.mark.parametrize("eps", [1e-6, None], ids=["eps1e-6", "eps-None"])
@pytest.mark.parametrize("layout", LN_LAYOUTS)
def test_rms_norm_against_torch(layout, eps):
    base, axis, view = LN_LAYOUTS[layout]
    rng, x, dy = data(("rms", layout), base, view, loc=0.5, scale=2.0)
    G, stats = ln_shapes(x, axis)
    gamma = rng.uniform(0.5, 2.0, G)
    y, rrms = bnorm.rms_norm(x, gamma, axis=axis, eps=eps)
    dx, dgamma = bnorm.rms_norm_backward(dy, x, rrms, gamma, axis=axis)
    ty, tdx, tdgamma, _ = torch_layer_or_rms(x, dy, gamma, None, axis, eps, rms=True)
    assert rrms.shape == stats and rrms.dtype == F64 and dgamma.shape == G
    assert_close(y, ty, TOL64, "y")
    assert_close(rrms, oracle_rms_norm(x, gamma, axis, eps)[1], TOL64, "rrms")
    assert_close(dx, tdx, TOL64, "dx")
    assert_close(dgamma, tdgamma, TOL64, "dgamma")


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_rms_norm_default_eps_is_the_dtypes_epsilon(dtype):
    """eps=None is np.finfo(x.dtype).eps, as PyTorch's; on data whose mean square is 1e-8 it
    weighs: float32's 1.2e-7 changes y by a factor of about 3.6, float64's by nothing."""
    torch = pytest.importorskip("torch")
    x = (1e-4 * np.random.default_rng(4).standard_normal((32, 64))).astype(dtype)
    y, rrms = bnorm.rms_norm(x)
    ty = torch.nn.functional.rms_norm(torch.from_numpy(x), (64,)).numpy()
    oy, orrms = oracle_rms_norm(x, eps=float(np.finfo(dtype).eps))
    tol = TOL32 if dtype == F32 else TOL64
    assert_close(y, ty, 4 * tol, "y vs torch")
    assert_close(y, oy, tol, "y")
    assert_close(rrms, orrms, tol, "rrms")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout", GN_LAYOUTS)
def test_group_norm_against_torch(layout, affine):
    base, axis, groups, view = GN_LAYOUTS[layout]
    rng, x, dy = data(("gn", layout), base, view, loc=0.5, scale=2.0)
    C = x.shape[axis]
    gamma = rng.uniform(0.5, 2.0, C) if affine else None
    beta = rng.standard_normal(C) if affine else None
    y, mean, rstd = bnorm.group_norm(x, groups, gamma, beta, axis=axis, eps=1e-5)
    dx, dgamma, dbeta = bnorm.group_norm_backward(dy, x, mean, rstd, groups, gamma, axis=axis)
    ty, tdx, tdgamma, tdbeta = torch_group_norm(x, dy, groups, gamma, beta, axis, 1e-5)
    _, om, ors = oracle_group_norm(x, groups, gamma, beta, axis, 1e-5)
    assert y.dtype == dx.dtype == mean.dtype == rstd.dtype == F64
    assert mean.shape == rstd.shape == (x.shape[0], groups)
    assert dgamma.shape == dbeta.shape == (C,)
    assert_close(y, ty, TOL64, "y")
    assert_close(mean, om, TOL64, "mean")
    assert_close(rstd, ors, TOL64, "rstd")
    assert_close(dx, tdx, TOL64, "dx")
    _, odgamma, odbeta = oracle_group_norm_backward(dy, x, om, ors, groups, gamma, axis)
    assert_close(dgamma, tdgamma if affine else odgamma, TOL64, "dgamma")
    assert_close(dbeta, tdbeta if affine else odbeta, TOL64, "dbeta")


def test_oracles_are_not_vacuous():
    """The float64 formulas the other tests lean on agree with torch here, and a wrong axis or
    group count makes them disagree by far more than any tolerance used."""
    rng, x, dy = data(("vacuous",), (4, 12, 5, 6), None)
    ty = torch_group_norm(x, dy, 3, None, None, 1, 1e-5)[0]
    assert_close(oracle_group_norm(x, 3, axis=1)[0], ty, TOL64)
    assert np.max(np.abs(oracle_group_norm(x, 4, axis=1)[0] - ty)) > 1e-2
    ty = torch_layer_or_rms(x, dy, None, None, (2, 3), 1e-5)[0]
    assert_close(oracle_layer_norm(x, axis=(2, 3))[0], ty, TOL64)
    assert np.max(np.abs(oracle_layer_norm(x, axis=(1, 3))[0] - ty)) > 1e-2


# ---------------------------------------------------------------------------------- gamma forms
# G = (6, 5) for x of shape (4, 6, 7, 5) normalized over axes (1, 3)
GAMMA_FORMS = {"G": (6, 5), "broadcast-row": (5,), "broadcast-col": (6, 1), "scalar": (),
               "keepdims": (1, 6, 1, 5), "keepdims-partial": (1, 1, 1, 5)}


@pytest.mark.parametrize("form", GAMMA_FORMS)
def test_layer_norm_gamma_forms(form):
    """gamma and beta broadcast to G or come in x's keepdims shape; dgamma has gamma's shape,
    dbeta G's values."""
    rng, x, dy = data(("forms", form), (4, 6, 7, 5), None)
    axis = (1, 3)
    shape = GAMMA_FORMS[form]
    gamma = rng.uniform(0.5, 2.0, shape)
    beta = rng.standard_normal(shape)
    y, mean, rstd = bnorm.layer_norm(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = bnorm.layer_norm_backward(dy, x, mean, rstd, gamma, axis=axis)
    oy, om, ors = oracle_layer_norm(x, gamma, beta, axis)
    odx, odgamma, odbeta = oracle_layer_norm_backward(dy, x, om, ors, gamma, axis)
    assert_close(y, oy, TOL64, "y")
    assert_close(dx, odx, TOL64, "dx")
    assert dgamma.shape == shape
    assert_close(dgamma, odgamma, TOL64, "dgamma")
    # dbeta: the sums of dy over the other axes, in G (as batch norm's dbeta in F) or in gamma's
    # shape (as dgamma); the contract says either
    if dbeta.shape == (6, 5):
        assert_close(dbeta, odbeta, TOL64, "dbeta")
    else:
        assert dbeta.shape == shape
        assert_close(dbeta, to_param_shape(dy, gamma, axis), TOL64, "dbeta")


@pytest.mark.parametrize("form", GAMMA_FORMS)
def test_rms_norm_gamma_forms(form):
    rng, x, dy = data(("rms-forms", form), (4, 6, 7, 5), None)
    axis = (1, 3)
    gamma = rng.uniform(0.5, 2.0, GAMMA_FORMS[form])
    y, rrms = bnorm.rms_norm(x, gamma, axis=axis, eps=1e-6)
    dx, dgamma = bnorm.rms_norm_backward(dy, x, rrms, gamma, axis=axis)
    oy, orrms = oracle_rms_norm(x, gamma, axis, 1e-6)
    odx, odgamma = oracle_rms_norm_backward(dy, x, orrms, gamma, axis)
    assert_close(y, oy, TOL64, "y")
    assert_close(dx, odx, TOL64, "dx")
    assert dgamma.shape == gamma.shape
    assert_close(dgamma, odgamma, TOL64, "dgamma")


# ------------------------------------------------------------------------- float32 precision
FAR = [(1e4, 1.0), (-1e3, 0.01)]
FAR_LN = {"rows": ((256, 512), -1), "convnext": ((8, 32, 6, 6), 1), "two": ((16, 24, 40), (0, 2))}
FAR_GN = {"nchw": ((4, 32, 8, 8), 1, 8), "nhwc": ((4, 8, 8, 32), -1, 8),
          "instance": ((4, 8, 8, 32), -1, 32)}


@pytest.mark.parametrize("loc, scale", FAR, ids=["1e4", "-1e3x0.01"])
@pytest.mark.parametrize("case", FAR_LN)
def test_layer_norm_float32_far_from_zero(case, loc, scale):
    """float32 data far from zero, against the float64 evaluation: within a few float32 ulps of
    the normalized output (TOL32, relative to the largest value), forward and backward."""
    shape, axis = FAR_LN[case]
    rng, x, dy = data(("far-ln", case, loc), shape, None, F32, loc, scale)
    G, _ = ln_shapes(x, axis)
    gamma = rng.uniform(0.5, 2.0, G).astype(F32)
    beta = rng.standard_normal(G).astype(F32)
    y, mean, rstd = bnorm.layer_norm(x, gamma, beta, axis=axis)
    oy, om, ors = oracle_layer_norm(x, gamma, beta, axis)
    assert y.dtype == mean.dtype == rstd.dtype == F32
    assert_close(y, oy, TOL32, "y")
    assert_close(mean, om, TOL32, "mean")
    assert_close(rstd, ors, TOL32, "rstd")
    dx, dgamma, dbeta = bnorm.layer_norm_backward(dy, x, mean, rstd, gamma, axis=axis)
    odx, odgamma, odbeta = oracle_layer_norm_backward(dy, x, om, ors, gamma, axis)
    assert_close(dx, odx, TOL32, "dx")
    assert_close(dgamma, odgamma, TOL32, "dgamma")
    assert_close(dbeta, odbeta, TOL32, "dbeta")


@pytest.mark.parametrize("loc, scale", FAR, ids=["1e4", "-1e3x0.01"])
@pytest.mark.parametrize("case", FAR_LN)
def test_rms_norm_float32_far_from_zero(case, loc, scale):
    shape, axis = FAR_LN[case]
    rng, x, dy = data(("far-rms", case, loc), shape, None, F32, loc, scale)
    G, _ = ln_shapes(x, axis)
    gamma = rng.uniform(0.5, 2.0, G).astype(F32)
    y, rrms = bnorm.rms_norm(x, gamma, axis=axis)
    oy, orrms = oracle_rms_norm(x, gamma, axis)
    assert y.dtype == rrms.dtype == F32
    assert_close(y, oy, TOL32, "y")
    assert_close(rrms, orrms, TOL32, "rrms")
    dx, dgamma = bnorm.rms_norm_backward(dy, x, rrms, gamma, axis=axis)
    odx, odgamma = oracle_rms_norm_backward(dy, x, orrms, gamma, axis)
    assert_close(dx, odx, TOL32, "dx")
    assert_close(dgamma, odgamma, TOL32, "dgamma")


@pytest.mark.parametrize("loc, scale", FAR, ids=["1e4", "-1e3x0.01"])
@pytest.mark.parametrize("case", FAR_GN)
def test_group_norm_float32_far_from_zero(case, loc, scale):
    shape, axis, groups = FAR_GN[case]
    rng, x, dy = data(("far-gn", case, loc), shape, None, F32, loc, scale)
    C = x.shape[axis]
    gamma = rng.uniform(0.5, 2.0, C).astype(F32)
    beta = rng.standard_normal(C).astype(F32)
    y, mean, rstd = bnorm.group_norm(x, groups, gamma, beta, axis=axis)
    oy, om, ors = oracle_group_norm(x, groups, gamma, beta, axis)
    assert y.dtype == mean.dtype == rstd.dtype == F32
    assert_close(y, oy, TOL32, "y")
    assert_close(mean, om, TOL32, "mean")
    assert_close(rstd, ors, TOL32, "rstd")
    dx, dgamma, dbeta = bnorm.group_norm_backward(dy, x, mean, rstd, groups, gamma, axis=axis)
    odx, odgamma, odbeta = oracle_group_norm_backward(dy, x, om, ors, groups, gamma, axis)
    assert_close(dx, odx, TOL32, "dx")
    assert_close(dgamma, odgamma, TOL32, "dgamma")
    assert_close(dbeta, odbeta, TOL32, "dbeta")


def test_far_from_zero_tolerance_is_meaningful():
    """The textbook float32 layer norm and group norm (bnorm.reference) miss the float64
    evaluation by far more than TOL32 on this data: the tests above demand more than float32
    arithmetic done the usual way gives."""
    rng, x, dy = data(("far-ln", "rows", 1e4), (256, 512), None, F32, 1e4, 1.0)
    g, b = np.ones(512, F32), np.zeros(512, F32)
    y, cache = reference.layer_norm_forward(x, g, b)
    dx = reference.layer_norm_backward(dy, cache)[0]
    oy, om, ors = oracle_layer_norm(x, g, b)
    odx = oracle_layer_norm_backward(dy, x, om, ors, g)[0]
    assert np.max(np.abs(y - oy)) > 10 * TOL32 * np.max(np.abs(oy))
    assert np.max(np.abs(dx - odx)) > 10 * TOL32 * np.max(np.abs(odx))
    x = x.reshape(4, 32, 32, 32)
    y = reference.group_norm_forward(x, np.ones(32, F32), np.zeros(32, F32), 8)[0]
    oy = oracle_group_norm(x, 8)[0]
    assert np.max(np.abs(y - oy)) > 10 * TOL32 * np.max(np.abs(oy))


# ---------------------------------------------------------------------------------- threads
# each x a few MiB, so that the work is split; one row or group alone may be split too
THREAD_CASES = {
    "ln-rows": ("ln", (2048, 512), -1, None),
    "ln-two-long-rows": ("ln", (2, 1 << 19), -1, None),
    "ln-axis0": ("ln", (4096, 256), 0, None),
    "rms-rows": ("rms", (2048, 512), -1, None),
    "gn-nchw": ("gn", (8, 32, 64, 64), 1, 8),
    "gn-nhwc-one-group": ("gn", (2, 128, 128, 16), -1, 1),
}


def run_family(kind, x, dy, axis, groups):
    """Forward and backward of one kind with gamma and beta; every result, in a tuple."""
    rng = np.random.default_rng(1)
    if kind == "gn":
        C = x.shape[axis]
        gamma, beta = rng.uniform(0.5, 2, C).astype(x.dtype), rng.standard_normal(C).astype(x.dtype)
        y, mean, rstd = bnorm.group_norm(x, groups, gamma, beta, axis=axis)
        return (y, mean, rstd) + bnorm.group_norm_backward(dy, x, mean, rstd, groups, gamma,
                                                           axis=axis)
    G, _ = ln_shapes(x, axis)
    gamma, beta = rng.uniform(0.5, 2, G).astype(x.dtype), rng.standard_normal(G).astype(x.dtype)
    if kind == "rms":
        y, rrms = bnorm.rms_norm(x, gamma, axis=axis)
        return (y, rrms) + bnorm.rms_norm_backward(dy, x, rrms, gamma, axis=axis)
    y, mean, rstd = bnorm.layer_norm(x, gamma, beta, axis=axis)
    return (y, mean, rstd) + bnorm.layer_norm_backward(dy, x, mean, rstd, gamma, axis=axis)


@pytest.mark.parametrize("case, dtype", [(c, F32) for c in THREAD_CASES] +
                         [("ln-rows", F64), ("gn-nchw", F64)],
                         ids=[f"{c}-float32" for c in THREAD_CASES] + ["ln-rows-float64",
                                                                       "gn-nchw-float64"])
def test_bitwise_identical_for_1_and_2_threads(case, dtype):
    kind, shape, axis, groups = THREAD_CASES[case]
    _, x, dy = data(("threads", case), shape, None, dtype, loc=3.0)
    before = bnorm.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, 2):
            bnorm.set_num_threads(n)
            results.append(run_family(kind, x, dy, axis, groups))
    finally:
        bnorm.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()
    # and it is the right answer
    if kind == "gn":
        want = oracle_group_norm(x, groups, axis=axis)[1]
    elif kind == "ln":
        want = oracle_layer_norm(x, axis=axis)[1]
    else:
        want = oracle_rms_norm(x, axis=axis)[1]
    assert_close(results[0][1], want, TOL32 if dtype == F32 else TOL64, "statistics")


# ---------------------------------------------------------------------------------- out=
def calls(kind):
    """(forward, backward) taking (x, dy, out) for one kind, with gamma and beta."""
    if kind == "ln":
        def fwd(x, out=None):
            return bnorm.layer_norm(x, 1.5, 0.25, axis=(1, 2), out=out)

        def bwd(dy, x, stats, out=None):
            return bnorm.layer_norm_backward(dy, x, *stats, 1.5, axis=(1, 2), out=out)
    elif kind == "rms":
        def fwd(x, out=None):
            return bnorm.rms_norm(x, 1.5, axis=-1, out=out)

        def bwd(dy, x, stats, out=None):
            return bnorm.rms_norm_backward(dy, x, *stats, 1.5, axis=-1, out=out)
    else:
        def fwd(x, out=None):
            return bnorm.group_norm(x, 2, np.full(6, 1.5), np.full(6, 0.25), axis=1, out=out)

        def bwd(dy, x, stats, out=None):
            return bnorm.group_norm_backward(dy, x, *stats, 2, np.full(6, 1.5), axis=1, out=out)
    return fwd, bwd


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ALL_IDS)
@pytest.mark.parametrize("kind", ["ln", "rms", "gn"])
def test_out_and_in_place(kind, dtype):
    """out= is written and returned; out=x (forward) and out=dy (backward) in place give the
    same bits as fresh outputs; an out that is a strided view works too."""
    _, x, dy = data(("out", kind, dtype.name), (5, 6, 7), None, dtype, loc=1.0)
    fwd, bwd = calls(kind)
    y, *stats = fwd(x)
    grads = bwd(dy, x, stats)
    out = np.empty_like(x)
    got = fwd(x, out=out)
    assert got[0] is out and out.tobytes() == y.tobytes()
    for a, b in zip(got[1:], stats):
        assert a.tobytes() == b.tobytes()
    strided = np.empty((10, 6, 14), dtype)[::2, :, ::-2]
    assert fwd(x, out=strided)[0] is strided and np.array_equal(strided, y)
    dout = np.empty_like(dy)
    got = bwd(dy, x, stats, out=dout)
    assert got[0] is dout and dout.tobytes() == grads[0].tobytes()
    # in place: dy's values are consumed as dx is written
    dy_copy = dy.copy()
    got = bwd(dy_copy, x, stats, out=dy_copy)
    assert got[0] is dy_copy and dy_copy.tobytes() == grads[0].tobytes()
    for a, b in zip(got[1:], grads[1:]):
        assert a.tobytes() == b.tobytes()
    x_copy = x.copy()
    got = fwd(x_copy, out=x_copy)
    assert got[0] is x_copy and x_copy.tobytes() == y.tobytes()
    for a, b in zip(got[1:], stats):
        assert a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------- half precision
HALF_LN = {"rows": ((64, 96), -1), "convnext": ((8, 12, 6, 5), 1), "two": ((6, 4, 3, 10), (1, 3))}
HALF_GN = {"nchw": ((8, 12, 6, 5), 1, 3), "nhwc": ((8, 6, 5, 12), -1, 4)}


def within_one_ulp(y, oy):
    return np.all(np.abs(y.astype(F64) - oy) <= ulp(oy, y.dtype))


def max_err(a, b):
    return float(np.max(np.abs(np.asarray(a).astype(F64) - b)))


def torch_half(a):
    torch = pytest.importorskip("torch")
    return torch.from_numpy(a.astype(F32)).to(torch.float16 if a.dtype == F16 else torch.bfloat16)


@pytest.mark.parametrize("loc", [0.0, 100.0])
@pytest.mark.parametrize("dtype", HALVES, ids=HALF_IDS)
@pytest.mark.parametrize("case", HALF_LN)
def test_layer_norm_half(case, dtype, loc):
    """float16 / bfloat16 x with float32 gamma and beta: y within one ulp of the float64 result
    from the same half input; mean, rstd float32; dx half and dx, dgamma no less accurate than
    PyTorch's CPU layer norm on the same input."""
    torch = pytest.importorskip("torch")
    shape, axis = HALF_LN[case]
    rng, x, dy = data(("half-ln", case, dtype.name, loc), shape, None, dtype, loc, 2.0)
    G, _ = ln_shapes(x, axis)
    gamma = rng.uniform(0.5, 2, G).astype(F32)
    beta = rng.standard_normal(G).astype(F32)
    y, mean, rstd = bnorm.layer_norm(x, gamma, beta, axis=axis)
    assert y.dtype == dtype and mean.dtype == rstd.dtype == F32
    oy, om, ors = oracle_layer_norm(x, gamma, beta, axis)
    assert within_one_ulp(y, oy), f"y beyond one ulp: max error {max_err(y, oy):.3g}"
    np.testing.assert_allclose(mean, om, rtol=2e-7, atol=2e-7 * abs(loc))
    np.testing.assert_allclose(rstd, ors, rtol=4e-7)
    dx, dgamma, dbeta = bnorm.layer_norm_backward(dy, x, mean, rstd, gamma, axis=axis)
    assert dx.dtype == dtype and dgamma.dtype == dbeta.dtype == F32
    odx, odgamma, odbeta = oracle_layer_norm_backward(dy, x, om, ors, gamma, axis)
    norm, other = norm_axes(x.ndim, axis)
    perm = other + norm
    xt = torch_half(x.transpose(perm)).requires_grad_(True)
    w = torch.from_numpy(gamma).requires_grad_(True)
    b = torch.from_numpy(beta).requires_grad_(True)
    torch.nn.functional.layer_norm(xt, G, w, b, 1e-5).backward(torch_half(dy.transpose(perm)))
    tdx = xt.grad.float().numpy().transpose(np.argsort(perm))
    assert max_err(dx, odx) <= max_err(tdx, odx)
    assert max_err(dgamma, odgamma) <= max_err(w.grad.numpy(), odgamma)
    assert_close(dbeta, odbeta, TOL32, "dbeta")


@pytest.mark.parametrize("loc", [0.0, 100.0])
@pytest.mark.parametrize("dtype", HALVES, ids=HALF_IDS)
@pytest.mark.parametrize("case", HALF_LN)
def test_rms_norm_half(case, dtype, loc):
    """As layer norm's; eps=None is the half dtype's epsilon, as PyTorch's."""
    torch = pytest.importorskip("torch")
    shape, axis = HALF_LN[case]
    rng, x, dy = data(("half-rms", case, dtype.name, loc), shape, None, dtype, loc, 2.0)
    G, _ = ln_shapes(x, axis)
    gamma = rng.uniform(0.5, 2, G).astype(F32)
    y, rrms = bnorm.rms_norm(x, gamma, axis=axis)
    assert y.dtype == dtype and rrms.dtype == F32
    oy, orrms = oracle_rms_norm(x, gamma, axis)      # eps: the half dtype's epsilon
    assert within_one_ulp(y, oy), f"y beyond one ulp: max error {max_err(y, oy):.3g}"
    np.testing.assert_allclose(rrms, orrms, rtol=4e-7)
    dx, dgamma = bnorm.rms_norm_backward(dy, x, rrms, gamma, axis=axis)
    assert dx.dtype == dtype and dgamma.dtype == F32
    odx, odgamma = oracle_rms_norm_backward(dy, x, orrms, gamma, axis)
    norm, other = norm_axes(x.ndim, axis)
    perm = other + norm
    xt = torch_half(x.transpose(perm)).requires_grad_(True)
    w = torch.from_numpy(gamma).requires_grad_(True)
    with warnings.catch_warnings():
        # torch: half x with a float32 weight has no fused kernel (its problem, not ours)
        warnings.simplefilter("ignore", UserWarning)
        torch.nn.functional.rms_norm(xt, G, w).backward(torch_half(dy.transpose(perm)))
    tdx = xt.grad.float().numpy().transpose(np.argsort(perm))
    assert max_err(dx, odx) <= max_err(tdx, odx)
    assert max_err(dgamma, odgamma) <= max_err(w.grad.numpy(), odgamma)


@pytest.mark.parametrize("loc", [0.0, 100.0])
@pytest.mark.parametrize("dtype", HALVES, ids=HALF_IDS)
@pytest.mark.parametrize("case", HALF_GN)
def test_group_norm_half(case, dtype, loc):
    torch = pytest.importorskip("torch")
    shape, axis, groups = HALF_GN[case]
    rng, x, dy = data(("half-gn", case, dtype.name, loc), shape, None, dtype, loc, 2.0)
    C = x.shape[axis]
    gamma = rng.uniform(0.5, 2, C).astype(F32)
    beta = rng.standard_normal(C).astype(F32)
    y, mean, rstd = bnorm.group_norm(x, groups, gamma, beta, axis=axis)
    assert y.dtype == dtype and mean.dtype == rstd.dtype == F32
    oy, om, ors = oracle_group_norm(x, groups, gamma, beta, axis)
    assert within_one_ulp(y, oy), f"y beyond one ulp: max error {max_err(y, oy):.3g}"
    np.testing.assert_allclose(mean, om, rtol=2e-7, atol=2e-7 * abs(loc))
    np.testing.assert_allclose(rstd, ors, rtol=4e-7)
    dx, dgamma, dbeta = bnorm.group_norm_backward(dy, x, mean, rstd, groups, gamma, axis=axis)
    assert dx.dtype == dtype and dgamma.dtype == dbeta.dtype == F32
    odx, odgamma, odbeta = oracle_group_norm_backward(dy, x, om, ors, groups, gamma, axis)
    xt = torch_half(np.moveaxis(x, axis, 1)).requires_grad_(True)
    w = torch.from_numpy(gamma).requires_grad_(True)
    b = torch.from_numpy(beta).requires_grad_(True)
    torch.nn.functional.group_norm(xt, groups, w, b, 1e-5).backward(
        torch_half(np.moveaxis(dy, axis, 1)))
    tdx = np.moveaxis(xt.grad.float().numpy(), 1, axis)
    assert max_err(dx, odx) <= max_err(tdx, odx)
    assert max_err(dgamma, odgamma) <= max_err(w.grad.numpy(), odgamma)


def test_half_gradients_take_gammas_dtype():
    """dgamma and dbeta have gamma's dtype (float32 when gamma is None)."""
    _, x, dy = data(("half-dtypes",), (16, 24), None, F16)
    y, mean, rstd = bnorm.layer_norm(x)
    _, dgamma, dbeta = bnorm.layer_norm_backward(dy, x, mean, rstd)
    assert dgamma.dtype == dbeta.dtype == F32
    for gdtype in (F32, F64, F16):
        g = np.ones(24, gdtype)
        _, dgamma, dbeta = bnorm.layer_norm_backward(dy, x, mean, rstd, g)
        assert dgamma.dtype == dbeta.dtype == gdtype
        _, rrms = bnorm.rms_norm(x, g)
        assert bnorm.rms_norm_backward(dy, x, rrms, g)[1].dtype == gdtype


# ---------------------------------------------------------------------------------- fused ReLU
RELU_LN = {"rows": ((64, 24), -1, None), "convnext": ((6, 10, 5, 4), 1, None),
           "view": ((12, 9, 20), (1, 2), (S2, slice(None), slice(None, None, -2)))}
RELU_GN = {"nchw": ((6, 12, 5, 4), 1, 3, None), "nhwc": ((6, 5, 4, 12), -1, 4, None),
           "instance-view": ((12, 9, 4, 10), -1, 10, (S2, slice(None, None, -2)))}


def near_zero(x, y0, mean_x, rstd_x, gamma_x, beta_x):
    """Elements whose pre-activation is within rounding of zero (a few units in the last place
    of the compute type of the terms it is made of): the fused backward recomputes it from the
    returned (rounded) statistics, so its mask may differ there from forward's.  The statistics
    and parameters come laid out against x."""
    f = np.abs
    terms = (f(x.astype(F64)) + f(mean_x)) * f(rstd_x * gamma_x) + f(beta_x)
    eps = float(np.finfo(F64 if x.dtype == F64 else F32).eps)
    return f(y0.astype(F64)) <= 8 * eps * terms


def assert_fused_equals_unfused(x, y0, fused_y, got, want, ambiguous, dirty_x, dirty_params):
    """forward: max(0, y) bit for bit; backward: bit for bit outside what the ambiguous
    elements can change (dirty_x: x-shaped, dirty_params: per parameter element)."""
    assert fused_y.dtype == x.dtype
    np.testing.assert_array_equal(fused_y.astype(F64), np.maximum(y0.astype(F64), 0))
    print(f"{ambiguous.sum()} of {x.size} pre-activations within rounding of zero")
    assert ambiguous.sum() <= max(2, x.size // 1000)
    clean = ~np.broadcast_to(dirty_x, x.shape)
    np.testing.assert_array_equal(got[0].astype(F64)[clean], want[0].astype(F64)[clean])
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(g[~dirty_params], w[~dirty_params])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ALL_IDS)
@pytest.mark.parametrize("case", RELU_LN)
def test_layer_norm_fused_relu_equals_unfused(case, dtype):
    base, axis, view = RELU_LN[case]
    rng, x, dy = data(("relu-ln", case, dtype.name), base, view, dtype, 1.0, 2.0)
    G, _ = ln_shapes(x, axis)
    pdtype = F32 if dtype.itemsize == 2 else dtype
    gamma = rng.uniform(0.5, 2, G).astype(pdtype)
    beta = rng.standard_normal(G).astype(pdtype)
    y0, mean, rstd = bnorm.layer_norm(x, gamma, beta, axis=axis)
    y, mean_f, rstd_f = bnorm.layer_norm(x, gamma, beta, axis=axis, activation="relu")
    np.testing.assert_array_equal(mean_f, mean)
    np.testing.assert_array_equal(rstd_f, rstd)
    masked = (dy.astype(F64) * (y0.astype(F64) > 0)).astype(dtype)
    want = bnorm.layer_norm_backward(masked, x, mean, rstd, gamma, axis=axis)
    got = bnorm.layer_norm_backward(dy, x, mean, rstd, gamma, axis=axis, beta=beta,
                                    activation="relu")
    norm, other = norm_axes(x.ndim, axis)

    def on_x(a, axes):
        return np.expand_dims(np.asarray(a, F64), axes)
    amb = near_zero(x, y0, on_x(mean, norm), on_x(rstd, norm), on_x(gamma, other),
                    on_x(beta, other))
    # an ambiguous element changes its row's dx and its own position's dgamma, dbeta
    assert_fused_equals_unfused(x, y0, y, got, want, amb, amb.any(norm, keepdims=True),
                                amb.any(other))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ALL_IDS)
@pytest.mark.parametrize("case", RELU_GN)
def test_group_norm_fused_relu_equals_unfused(case, dtype):
    base, axis, groups, view = RELU_GN[case]
    rng, x, dy = data(("relu-gn", case, dtype.name), base, view, dtype, 1.0, 2.0)
    C = x.shape[axis]
    pdtype = F32 if dtype.itemsize == 2 else dtype
    gamma = rng.uniform(0.5, 2, C).astype(pdtype)
    beta = rng.standard_normal(C).astype(pdtype)
    y0, mean, rstd = bnorm.group_norm(x, groups, gamma, beta, axis=axis)
    y, mean_f, rstd_f = bnorm.group_norm(x, groups, gamma, beta, axis=axis, activation="relu")
    np.testing.assert_array_equal(mean_f, mean)
    np.testing.assert_array_equal(rstd_f, rstd)
    masked = (dy.astype(F64) * (y0.astype(F64) > 0)).astype(dtype)
    want = bnorm.group_norm_backward(masked, x, mean, rstd, groups, gamma, axis=axis)
    got = bnorm.group_norm_backward(dy, x, mean, rstd, groups, gamma, axis=axis, beta=beta,
                                    activation="relu")
    ax = axis % x.ndim
    per_channel = [n if a == ax else 1 for a, n in enumerate(x.shape)]
    # (N, groups) statistics laid out against x: each channel gets its group's
    channel_group = np.arange(C) // (C // groups)

    def stats_on_x(s):
        s = np.asarray(s, F64)[:, channel_group]                      # (N, C)
        return s.reshape([x.shape[0]] + per_channel[1:])
    amb = near_zero(x, y0, stats_on_x(mean), stats_on_x(rstd),
                    np.asarray(gamma, F64).reshape(per_channel),
                    np.asarray(beta, F64).reshape(per_channel))
    # an ambiguous element changes its (sample, group)'s dx and its channel's dgamma, dbeta
    red = tuple(a for a in range(1, x.ndim) if a != ax)
    per_sample_channel = amb.any(red, keepdims=True)
    grouped = np.moveaxis(per_sample_channel, ax, 1).reshape(x.shape[0], groups, -1)
    dirty = np.repeat(grouped.any(2), C // groups, axis=1)            # (N, C)
    dirty_x = dirty.reshape([x.shape[0]] + per_channel[1:])
    assert_fused_equals_unfused(x, y0, y, got, want, amb, dirty_x,
                                amb.any(tuple(a for a in range(x.ndim) if a != ax)))


def test_fused_relu_gradient_at_zero_is_zero():
    """A pre-activation of exactly 0 passes no gradient (as PyTorch's ReLU): a row of two equal
    values normalizes to (0, 0)."""
    x = np.array([[2.0, 2.0], [1.0, 3.0]])
    y, mean, rstd = bnorm.layer_norm(x, activation="relu")
    np.testing.assert_array_equal(y[0], [0.0, 0.0])
    dx, dgamma, dbeta = bnorm.layer_norm_backward(np.ones_like(x), x, mean, rstd,
                                                  activation="relu")
    np.testing.assert_array_equal(dbeta, [0.0, 1.0])
    np.testing.assert_array_equal(dx[0], [0.0, 0.0])


@pytest.mark.parametrize("value", ["gelu", "ReLU", 1, True, ["relu"]], ids=repr)
def test_other_activations_are_value_errors(value):
    _, x, dy = data(("act",), (4, 6, 5), None)
    out = np.zeros_like(x)
    assert_raises_untouched(bnorm.layer_norm, dict(activation=value, out=out), ValueError,
                            "activation", args=(x,))
    assert_raises_untouched(bnorm.group_norm, dict(activation=value, out=out), ValueError,
                            "activation", args=(x, 3))
    y, mean, rstd = bnorm.layer_norm(x)
    assert_raises_untouched(bnorm.layer_norm_backward, dict(activation=value, out=out),
                            ValueError, "activation", args=(dy, x, mean, rstd))
    y, mean, rstd = bnorm.group_norm(x, 3)
    assert_raises_untouched(bnorm.group_norm_backward, dict(activation=value, out=out),
                            ValueError, "activation", args=(dy, x, mean, rstd, 3))
    for make in (lambda: bnorm.LayerNorm(5, activation=value),
                 lambda: bnorm.GroupNorm(3, 6, activation=value)):
        with pytest.raises(ValueError, match="activation"):
            make()


# ---------------------------------------------------------------------------------- NaN, edges
def test_nonfinite_values_stay_in_their_row_and_group():
    _, x, dy = data(("nan",), (6, 4, 5, 3), None)
    x[2, 1, 3, 0] = np.nan
    y = bnorm.layer_norm(x, axis=(1, 2, 3))[0]
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()
    y = bnorm.group_norm(x, 2, axis=1)[0]
    assert np.isnan(y[2, :2]).all() and np.isfinite(y[2, 2:]).all()
    assert np.isfinite(np.delete(y, 2, axis=0)).all()
    x[4, 0, 0, 0] = np.inf
    y = bnorm.rms_norm(x, axis=-1)[0]
    bad = ~np.isfinite(y)
    assert bad[2, 1, 3].all() and bad[4, 0, 0, 0]
    bad[2, 1, 3] = bad[4, 0, 0] = False
    assert not bad.any()


def test_lists_are_converted():
    x = [[1.0, 2.0, 4.0], [0.5, -1.0, 3.0]]
    np.testing.assert_array_equal(bnorm.layer_norm(x)[0], bnorm.layer_norm(np.asarray(x))[0])
    np.testing.assert_array_equal(bnorm.rms_norm(x)[0], bnorm.rms_norm(np.asarray(x))[0])


def test_zero_rows_give_empty_results():
    """No row to normalize is not an error (nothing is reduced over an empty axis): empty y and
    statistics, zero gradients of the parameters."""
    x = np.zeros((0, 5))
    y, mean, rstd = bnorm.layer_norm(x, np.ones(5), np.zeros(5))
    assert y.shape == (0, 5) and mean.shape == rstd.shape == (0,)
    dx, dgamma, dbeta = bnorm.layer_norm_backward(x, x, mean, rstd, np.ones(5))
    assert dx.shape == (0, 5)
    np.testing.assert_array_equal(dgamma, np.zeros(5))
    np.testing.assert_array_equal(dbeta, np.zeros(5))


# ---------------------------------------------------------------------------------- bad input
POSITIONAL = {"layer_norm": ("x", "gamma", "beta"),
              "layer_norm_backward": ("dy", "x", "mean", "rstd", "gamma"),
              "rms_norm": ("x", "gamma"), "rms_norm_backward": ("dy", "x", "rrms", "gamma"),
              "group_norm": ("x", "num_groups", "gamma", "beta"),
              "group_norm_backward": ("dy", "x", "mean", "rstd", "num_groups", "gamma")}
FUNCS = list(POSITIONAL)
LN_FUNCS = FUNCS[:4]
GN_FUNCS = FUNCS[4:]
BACKWARDS = [f for f in FUNCS if f.endswith("backward")]
STATS = {"layer_norm_backward": ("mean", "rstd"), "rms_norm_backward": ("rrms",),
         "group_norm_backward": ("mean", "rstd")}


def valid_call(name, dtype=F64):
    """kwargs of a call that succeeds, with every optional array given: x of shape (4, 6, 5),
    layer/RMS norm over the last axis (G = (5,), statistics (4, 6)), group norm of 6 channels
    on axis 1 in 3 groups (statistics (4, 3))."""
    rng = np.random.default_rng(stable_seed("valid", name))
    x = rng.standard_normal((4, 6, 5)).astype(dtype)
    kw = dict(x=x, out=rng.standard_normal(x.shape).astype(dtype))  # not empty: untouched counts
    if name.endswith("backward"):
        kw["dy"] = rng.standard_normal(x.shape).astype(dtype)
    if name.startswith("group"):
        kw.update(num_groups=3, gamma=rng.uniform(0.5, 2, 6), axis=1)
        _, mean, rstd = oracle_group_norm(x, 3)
    else:
        kw.update(gamma=rng.uniform(0.5, 2, 5), axis=-1)
        _, mean, rstd = oracle_layer_norm(x)
    if name in ("layer_norm", "group_norm"):
        kw.update(beta=rng.standard_normal(kw["gamma"].shape), eps=1e-5)
    elif name == "rms_norm":
        kw.update(eps=1e-6)
    elif name == "rms_norm_backward":
        kw["rrms"] = oracle_rms_norm(x)[1]
    else:
        kw.update(mean=mean, rstd=rstd)
    return kw


def call(name, kw):
    kw = dict(kw)
    args = [kw.pop(p) for p in POSITIONAL[name] if p in kw]
    return getattr(bnorm, name)(*args, **kw)


def raises_untouched(name, kw, exc, match=None):
    """The call raises exc (matching match) and modifies none of its arrays."""
    kw = dict(kw)
    args = tuple(kw.pop(p) for p in POSITIONAL[name] if p in kw)
    return assert_raises_untouched(getattr(bnorm, name), kw, exc, match, args=args)


def names_all(*parts):
    """A pattern matching a message that contains every part (in any order)."""
    return "(?s)" + "".join(f"(?=.*{re.escape(str(p))})" for p in parts)


@pytest.mark.parametrize("name", FUNCS)
def test_baseline_is_valid(name):
    call(name, valid_call(name))


@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.uint16, np.bool_, np.complex128, object,
                                   np.longdouble, "U4"], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name, arg", [(f, a) for f in FUNCS for a in ("x", "dy")
                                       if a in valid_call(f)])
def test_data_of_unsupported_dtype(name, arg, dtype):
    kw = valid_call(name)
    kw[arg] = kw[arg].astype(dtype)
    d = np.dtype(dtype)
    names = "|".join(re.escape(n) for n in {str(d), repr(d), d.name})
    raises_untouched(name, kw, TypeError, rf"{re.escape(arg)}\b.*({names})")


@pytest.mark.parametrize("name", FUNCS)
def test_zero_d_x(name):
    kw = valid_call(name)
    kw["x"] = np.array(1.0)
    if "dy" in kw:
        kw["dy"] = np.array(1.0)
    kw.pop("out")
    raises_untouched(name, kw, AxisError)


@pytest.mark.parametrize("name", FUNCS)
def test_axis_out_of_range(name):
    for axis in ([3, -4, (0, 3)] if name in LN_FUNCS else [3, -4]):
        kw = valid_call(name)
        kw["axis"] = axis
        raises_untouched(name, kw, AxisError)


@pytest.mark.parametrize("name", LN_FUNCS)
def test_repeated_axes(name):
    for axis in [(2, 2), (-1, 2), (0, 1, 0)]:
        kw = valid_call(name)
        kw["axis"] = axis
        raises_untouched(name, kw, ValueError, "repeat|duplicate")


@pytest.mark.parametrize("name", GN_FUNCS)
def test_group_norm_channel_axis_0(name):
    for axis in (0, -3):
        kw = valid_call(name)
        kw["axis"] = axis
        raises_untouched(name, kw, ValueError, "axis")


@pytest.mark.parametrize("num_groups", [4, 5, 12, 0, -3])
@pytest.mark.parametrize("name", GN_FUNCS)
def test_num_groups_not_dividing_channels(name, num_groups):
    kw = valid_call(name)
    kw["num_groups"] = num_groups
    if name == "group_norm_backward" and num_groups > 0:
        # statistics of that many groups, so that only the division is wrong
        kw["mean"], kw["rstd"] = np.zeros((4, num_groups)), np.ones((4, num_groups))
    raises_untouched(name, kw, ValueError, "num_groups|group")


PARAM_ARGS = [(f, a) for f in FUNCS for a in ("gamma", "beta") if a in valid_call(f)]


@pytest.mark.parametrize("name, arg", PARAM_ARGS)
def test_parameter_not_fitting(name, arg):
    """gamma or beta of a shape that neither broadcasts to G (C for group norm) nor is x's
    keepdims shape: ValueError naming both shapes."""
    good = (6,) if name.startswith("group") else (5,)
    for bad in [(good[0] - 1,), (good[0] + 1,), good + (2,), (2,) + good]:
        kw = valid_call(name)
        kw[arg] = np.ones(bad)
        raises_untouched(name, kw, ValueError, names_all(arg, bad, good))


@pytest.mark.parametrize("name", BACKWARDS)
def test_statistics_not_fitting(name):
    good = (4, 3) if name.startswith("group") else (4, 6)
    for arg in STATS[name]:
        for bad in [(good[0] + 1, good[1]), good[::-1], (good[0],), good + (2,)]:
            kw = valid_call(name)
            kw[arg] = np.ones(bad)
            raises_untouched(name, kw, ValueError, names_all(arg, bad, good))


@pytest.mark.parametrize("name", BACKWARDS)
def test_dy_not_of_x_shape(name):
    for bad in [(4, 6, 4), (5, 6, 4), (1, 6, 5), (4, 6, 5, 1), (120,)]:
        kw = valid_call(name)
        kw["dy"] = np.ones(bad)
        raises_untouched(name, kw, ValueError, names_all("dy", bad, (4, 6, 5)))


@pytest.mark.parametrize("name", FUNCS)
def test_bad_out(name):
    for out, exc in [(np.zeros((4, 6, 4)), ValueError), (np.zeros((6, 4, 5)), ValueError),
                     (np.zeros((4, 6, 5), F32), TypeError),
                     (np.zeros((4, 6, 5), np.int64), TypeError),
                     (readonly(np.zeros((4, 6, 5))), ValueError)]:
        kw = valid_call(name)
        kw["out"] = out
        raises_untouched(name, kw, exc, "out")


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "group_norm"])
def test_bad_eps(name):
    for eps, exc in [(-1e-5, ValueError), (np.nan, ValueError), (np.inf, ValueError),
                     ("1e-5", TypeError)]:
        kw = valid_call(name)
        kw["eps"] = eps
        raises_untouched(name, kw, exc, "eps")


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_nothing_to_normalize_over(name):
    """A normalized axis of length 0: no mean to take, a ValueError (as batch norm's empty
    batch)."""
    kw = valid_call(name)
    kw.update(x=np.zeros((4, 6, 0)), out=np.zeros((4, 6, 0)), gamma=None)
    kw.pop("beta", None)
    raises_untouched(name, kw, ValueError)


# ---------------------------------------------------------------------------------- reference
def test_reference_baselines_against_torch():
    """bnorm.reference's textbook layer, RMS and group norm (the benchmark's NumPy peers) are
    right: float64 against PyTorch's autograd."""
    rng, x, dy = data(("reference",), (4, 6, 10), None)
    g, b = rng.uniform(0.5, 2, 10), rng.standard_normal(10)
    y, cache = reference.layer_norm_forward(x, g, b, 1e-5)
    got = (y,) + reference.layer_norm_backward(dy, cache)
    for a, w in zip(got, torch_layer_or_rms(x, dy, g, b, -1, 1e-5)):
        assert_close(a, w, TOL64)
    y, cache = reference.rms_norm_forward(x, g, 1e-6)
    got = (y,) + reference.rms_norm_backward(dy, cache)
    for a, w in zip(got, torch_layer_or_rms(x, dy, g, None, -1, 1e-6, rms=True)):
        assert_close(a, w, TOL64)
    g, b = rng.uniform(0.5, 2, 6), rng.standard_normal(6)
    y, cache = reference.group_norm_forward(x, g, b, 3, 1e-5)
    got = (y,) + reference.group_norm_backward(dy, cache)
    for a, w in zip(got, torch_group_norm(x, dy, 3, g, b, 1, 1e-5)):
        assert_close(a, w, TOL64)


# ---------------------------------------------------------------------------------- the layers
def sgd_steps(layer, module, torch, shape, dtype, steps=3, layout=None, relu=False):
    """A few SGD steps of layer and module on the same data: outputs, input and parameter
    gradients equal, parameters updated alike.  layout: (to torch, back) for x's layout."""
    to_t, back = layout or (lambda a: a, lambda a: a)
    rng = np.random.default_rng(stable_seed("steps", repr(layer)))
    tol = TOL64 if dtype == F64 else 4e-6
    for _ in range(steps):
        x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        xt = torch.from_numpy(np.ascontiguousarray(to_t(x))).requires_grad_(True)
        yt = module(xt)
        if relu:
            yt = torch.relu(yt)
        yt.backward(torch.from_numpy(np.ascontiguousarray(to_t(dy))))
        y = layer.forward(x)
        dx = layer.backward(dy)
        assert y.dtype == dx.dtype == dtype
        assert_close(y, back(yt.detach().numpy()), tol, "y")
        assert_close(dx, back(xt.grad.numpy()), tol, "dx")
        params = [("gamma", "weight"), ("beta", "bias")]
        for ours, theirs in params:
            p = getattr(module, theirs, None)
            if p is None:
                assert getattr(layer, "d" + ours) is None
                continue
            grad = getattr(layer, "d" + ours)
            assert grad.dtype == dtype and grad.shape == tuple(p.shape)
            assert_close(grad, p.grad.numpy(), tol, "d" + ours)
            getattr(layer, ours)[...] -= 0.1 * grad
            with torch.no_grad():
                p -= 0.1 * p.grad
            p.grad = None
    for ours, theirs in [("gamma", "weight"), ("beta", "bias")]:
        if getattr(module, theirs, None) is not None:
            assert_close(getattr(layer, ours), getattr(module, theirs).detach().numpy(), tol)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape, normalized", [((4, 16, 48), 48), ((4, 6, 7, 5), (7, 5))],
                         ids=["transformer", "two-axes"])
def test_layer_norm_layer_against_torch(shape, normalized, dtype):
    torch = pytest.importorskip("torch")
    module = torch.nn.LayerNorm(normalized, eps=1e-5).to(torch.float64 if dtype == F64
                                                           else torch.float32)
    with torch.no_grad():   # parameters other than the defaults
        module.weight.uniform_(0.5, 2)
        module.bias.normal_()
    layer = bnorm.LayerNorm.from_torch(module)
    assert layer.dtype == dtype and layer.eps == 1e-5
    assert layer.normalized_shape == tuple(np.atleast_1d(normalized))
    sgd_steps(layer, module, torch, shape, dtype)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("eps", [None, 1e-6], ids=["eps-None", "eps1e-6"])
def test_rms_norm_layer_against_torch(eps, dtype):
    torch = pytest.importorskip("torch")
    module = torch.nn.RMSNorm(48, eps=eps).to(torch.float64 if dtype == F64 else torch.float32)
    with torch.no_grad():
        module.weight.uniform_(0.5, 2)
    layer = bnorm.RMSNorm.from_torch(module)
    assert layer.eps == eps and layer.beta is None
    sgd_steps(layer, module, torch, (4, 16, 48), dtype)
    assert layer.dbeta is None


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("groups", [4, 1, 12], ids=["groups4", "one-group", "instance"])
def test_group_norm_layer_against_torch(groups, dtype):
    torch = pytest.importorskip("torch")
    module = torch.nn.GroupNorm(groups, 12).to(torch.float64 if dtype == F64 else torch.float32)
    with torch.no_grad():
        module.weight.uniform_(0.5, 2)
        module.bias.normal_()
    layer = bnorm.GroupNorm.from_torch(module)
    assert (layer.num_groups, layer.num_channels, layer.axis) == (groups, 12, 1)
    sgd_steps(layer, module, torch, (4, 12, 5, 6), dtype)


def test_nhwc_group_norm_layer_against_torch():
    """GroupNorm(axis=-1) on NHWC data is torch's GroupNorm on the NCHW permutation."""
    torch = pytest.importorskip("torch")
    module = torch.nn.GroupNorm(3, 12).double()
    layer = bnorm.GroupNorm(3, 12, axis=-1, dtype=F64)
    layout = (lambda a: a.transpose(0, 3, 1, 2), lambda a: a.transpose(0, 2, 3, 1))
    sgd_steps(layer, module, torch, (4, 5, 6, 12), F64, layout=layout)


@pytest.mark.parametrize("kind", ["ln", "gn"])
def test_layers_with_fused_relu_against_torch(kind):
    torch = pytest.importorskip("torch")
    if kind == "ln":
        module = torch.nn.LayerNorm(20).double()
        layer = bnorm.LayerNorm(20, dtype=F64, activation="relu")
        shape = (8, 3, 20)
    else:
        module = torch.nn.GroupNorm(2, 6).double()
        layer = bnorm.GroupNorm(2, 6, dtype=F64, activation="relu")
        shape = (8, 6, 5)
    sgd_steps(layer, module, torch, shape, F64, relu=True)


def test_layer_norm_without_bias_or_affine_from_torch():
    torch = pytest.importorskip("torch")
    module = torch.nn.LayerNorm(16, bias=False).double()
    layer = bnorm.LayerNorm.from_torch(module)
    assert layer.beta is None and set(layer.state_dict()) == {"gamma"}
    assert set(layer.torch_state_dict()) == set(module.state_dict()) == {"weight"}
    sgd_steps(layer, module, torch, (5, 16), F64)
    module = torch.nn.LayerNorm(16, elementwise_affine=False)
    layer = bnorm.LayerNorm.from_torch(module)
    assert layer.gamma is None and layer.beta is None and layer.state_dict() == {}
    sgd_steps(layer, module, torch, (5, 16), F32)
    assert layer.dgamma is None and layer.dbeta is None


@pytest.mark.parametrize("kind", ["ln", "rms", "gn"])
def test_torch_state_dict_loads_into_torch(kind):
    """torch_state_dict() has the module's keys; loaded into a fresh module it gives the
    layer's outputs."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    if kind == "ln":
        layer, module, shape = bnorm.LayerNorm(10), torch.nn.LayerNorm(10), (3, 4, 10)
    elif kind == "rms":
        layer, module, shape = bnorm.RMSNorm(10, eps=1e-6), torch.nn.RMSNorm(10, eps=1e-6), \
            (3, 4, 10)
    else:
        layer, module, shape = bnorm.GroupNorm(2, 10), torch.nn.GroupNorm(2, 10), (3, 10, 4)
    for name in layer.state_dict():
        getattr(layer, name)[...] = rng.standard_normal(getattr(layer, name).shape)
    d = layer.torch_state_dict()
    assert set(d) == set(module.state_dict())
    module.load_state_dict({k: torch.from_numpy(v) for k, v in d.items()})
    x = rng.standard_normal(shape).astype(F32)
    with torch.no_grad():
        assert_close(layer.forward(x), module(torch.from_numpy(x)).numpy(), 4e-6)


def make_layer(kind, **kw):
    return {"ln": lambda: bnorm.LayerNorm((3, 4), **kw), "rms": lambda: bnorm.RMSNorm(4, **kw),
            "gn": lambda: bnorm.GroupNorm(2, 4, **kw)}[kind]()


LAYER_X = {"ln": (5, 3, 4), "rms": (5, 3, 4), "gn": (5, 4, 3)}


@pytest.mark.parametrize("kind", ["ln", "rms", "gn"])
def test_state_dict_round_trip_through_savez(kind, tmp_path):
    rng = np.random.default_rng(8)
    layer = make_layer(kind)
    for name in layer.state_dict():
        getattr(layer, name)[...] = rng.standard_normal(getattr(layer, name).shape)
    np.savez(tmp_path / "s.npz", **layer.state_dict())
    other = make_layer(kind)
    arrays = {k: getattr(other, k) for k in other.state_dict()}
    with np.load(tmp_path / "s.npz") as f:
        other.load_state_dict(f)
    for k, a in arrays.items():
        assert getattr(other, k) is a                     # loaded in place
        np.testing.assert_array_equal(a, getattr(layer, k))
    x = rng.standard_normal(LAYER_X[kind]).astype(F32)
    np.testing.assert_array_equal(other.forward(x), layer.forward(x))
    # a copy: changing the dict changes nothing
    d = layer.state_dict()
    d["gamma"][...] = 0
    assert layer.gamma.any()


@pytest.mark.parametrize("kind", ["ln", "rms", "gn"])
def test_load_state_dict_validates_before_writing(kind):
    layer = make_layer(kind)
    good = {k: np.full(v.shape, 3.0) for k, v in layer.state_dict().items()}
    before = layer.state_dict()
    bad_cases = [({**good, "extra": np.ones(4)}, ValueError),
                 ({k: v for k, v in good.items() if k != "gamma"}, ValueError),
                 ({**good, "gamma": np.ones(7)}, ValueError),
                 ({**good, "gamma": np.ones(good["gamma"].shape, complex)}, TypeError)]
    if kind == "rms":
        bad_cases.append(({**good, "beta": np.ones(4)}, ValueError))
    for bad, exc in bad_cases:
        with pytest.raises(exc):
            layer.load_state_dict(bad)
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(v, before[k])
    layer.load_state_dict({**good, "extra": np.ones(4)}, strict=False)
    assert (layer.gamma == 3).all()


@pytest.mark.parametrize("kind", ["ln", "rms", "gn"])
def test_layer_errors(kind):
    layer = make_layer(kind)
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones(LAYER_X[kind]))
    bad_x = {"ln": (5, 4, 3), "rms": (5, 3, 5), "gn": (5, 3, 4)}[kind]
    with pytest.raises(ValueError, match=names_all(bad_x)):
        layer.forward(np.ones(bad_x))
    layer.forward(np.ones(LAYER_X[kind]))
    with pytest.raises(ValueError, match="dy"):
        layer.backward(np.ones(bad_x))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="from_torch"):
        type(layer).from_torch(torch.nn.BatchNorm1d(4))
    half = {"ln": torch.nn.LayerNorm(4), "rms": torch.nn.RMSNorm(4),
            "gn": torch.nn.GroupNorm(2, 4)}[kind].to(torch.bfloat16)
    with pytest.raises(TypeError, match="dtype"):
        type(layer).from_torch(half)


@pytest.mark.parametrize("args, kw, exc", [
    ((3, 8), {}, ValueError), ((0, 8), {}, ValueError), ((2, 8), {"axis": 0}, ValueError),
    ((2.0, 8), {}, TypeError), ((2, 8), {"eps": -1.0}, ValueError),
    ((2, 8), {"dtype": np.int32}, TypeError)])
def test_group_norm_bad_construction(args, kw, exc):
    with pytest.raises(exc):
        bnorm.GroupNorm(*args, **kw)


@pytest.mark.parametrize("cls", [bnorm.LayerNorm, bnorm.RMSNorm])
def test_layer_or_rms_norm_bad_construction(cls):
    for shape, exc in [((), ValueError), ((3, 0), ValueError), (2.5, TypeError)]:
        with pytest.raises(exc, match="normalized_shape"):
            cls(shape)
    with pytest.raises(ValueError):
        cls(4, eps=np.nan)


@pytest.mark.parametrize("kind", ["ln", "rms", "gn"])
def test_mixed_precision_layer(kind):
    """A float32 layer fed float16 x: y and dx float16, the parameters' gradients float32, and
    the same values as the functions give."""
    layer = make_layer(kind)
    _, x, dy = data(("mixed", kind), LAYER_X[kind], None, F16)
    y = layer.forward(x)
    dx = layer.backward(dy)
    assert y.dtype == dx.dtype == F16 and layer.dgamma.dtype == F32
    if kind == "ln":
        want = bnorm.layer_norm(x, layer.gamma, layer.beta, axis=(-2, -1))[0]
    elif kind == "rms":
        want = bnorm.rms_norm(x, layer.gamma)[0]
    else:
        want = bnorm.group_norm(x, 2, layer.gamma, layer.beta)[0]
    np.testing.assert_array_equal(y, want)


def test_layers_keep_x_by_reference_and_use_the_last_forward():
    layer = bnorm.LayerNorm(6, dtype=F64)
    rng = np.random.default_rng(2)
    x1, x2 = rng.standard_normal((4, 6)), rng.standard_normal((4, 6)) * 3 + 1
    dy = rng.standard_normal((4, 6))
    layer.forward(x1)
    layer.forward(x2)
    assert layer._saved[0] is x2
    dx = layer.backward(dy)
    _, om, ors = oracle_layer_norm(x2)
    assert_close(dx, oracle_layer_norm_backward(dy, x2, om, ors)[0], TOL64)


def test_exported():
    for name in ("layer_norm", "layer_norm_backward", "rms_norm", "rms_norm_backward",
                 "group_norm", "group_norm_backward", "LayerNorm", "RMSNorm", "GroupNorm"):
        assert hasattr(bnorm, name), name
    for name in ("LayerNorm", "RMSNorm", "GroupNorm"):
        assert name in bnorm.__all__
