"""What the test files share: dtypes and tolerances, docs/api.md's formulas as float64 oracles,
seeding, and small utilities (read-only arrays, child interpreters, threads, memory).

Test files import it as ``from helpers import ...``: pytest's default ("prepend") import mode puts
tests/ on ``sys.path`` for the test files and their conftest.py, and a test file run as a script
(``tests/test_hardening.py fuzz``, ``tests/mpi/check_sync.py``) has its own directory there or
adds tests/.

Tolerances (all "normwise" in ``assert_close``: ``|got - expected| <= tol * (|expected| +
max|expected|)``, so an element is compared against the magnitude of the whole result, which is
what the cancellations in ``x - mean`` and ``dy - dbeta/M - xhat*dgamma/M`` allow):

* float64 (eps 2.2e-16): two correct implementations differ only by summation order over at most
  a few hundred elements, i.e. ~1e-14 relative; ``TOL64 = 1e-10`` leaves four orders of headroom
  and still catches any wrong formula, factor or index (those give errors of order 1).
* float32 vs the float64 oracle: the result rounded to float32 (half an ulp, 6e-8) plus a handful of
  float32 roundings in the elementwise pass. ``TOL32 = 16 * eps32 = 1.9e-6``. The post's float32
  code is off by 3e-3 on ``1e4 + randn`` data, so this tolerance is what "float32 precision" means.
* float32 vs the post's float32 code: the post's code itself accumulates in float32 (errors up to
  ~M * eps32 for the small M used with it, relative to the terms it sums), so ``TOL32_REF = 1e-4``
  of those terms.
"""
import os
import threading
import zlib

import numpy as np

import bnorm

try:
    from numpy.exceptions import AxisError
except ImportError:  # NumPy < 1.25
    from numpy import AxisError
try:
    from numpy.lib.array_utils import normalize_axis_tuple
except ImportError:  # NumPy < 2.0
    from numpy.core.numeric import normalize_axis_tuple

__all__ = ["AxisError", "F32", "F64", "DTYPES", "TOL64", "TOL32", "TOL32_REF", "tol_oracle",
           "tol_ref", "axes_of", "fshape", "expand", "sum_to", "oracle_forward",
           "oracle_backward", "mean_var", "amax", "assert_close", "ulp", "stable_seed",
           "rng_for", "randn", "readonly", "layer_snapshot", "assert_layer_unchanged",
           "norm_axes", "oracle_layer_norm", "oracle_layer_norm_backward", "oracle_rms_norm",
           "oracle_rms_norm_backward", "oracle_group_norm", "oracle_group_norm_backward",
           "to_param_shape",
           "assert_raises_untouched", "BNORM_PARENT", "child_env", "run_threads", "rss_bytes",
           "asan_loaded"]

# --------------------------------------------------------------------------- dtypes, tolerances
F32, F64 = np.float32, np.float64
DTYPES = [F32, F64]
TOL64 = 1e-10
TOL32 = 16 * float(np.finfo(F32).eps)
TOL32_REF = 1e-4


def tol_oracle(dtype):
    """Tolerance of a result of ``dtype`` against the float64 oracle."""
    return TOL32 if dtype == F32 else TOL64


def tol_ref(dtype):
    """Tolerance of a result of ``dtype`` against the post's code run in that dtype."""
    return TOL32_REF if dtype == F32 else TOL64


# --------------------------------------------------------------------------- axes
def axes_of(ndim, axis):
    """(reduced axes, kept axes sorted) as docs/api.md defines them."""
    kept = sorted(normalize_axis_tuple(axis, ndim))
    red = tuple(a for a in range(ndim) if a not in kept)
    return red, tuple(kept)


def fshape(shape, axis):
    """The feature shape F of an x of ``shape``: the kept axes' lengths, in axis order."""
    _, kept = axes_of(len(shape), axis)
    return tuple(shape[a] for a in kept)


def expand(v, red, F):
    """An F-broadcastable per-feature float64 quantity laid out to broadcast against x."""
    return np.expand_dims(np.broadcast_to(np.asarray(v, F64), F), red)


def sum_to(g, shape):
    """Sum an F-shaped gradient down to ``shape`` (the shape gamma was broadcast from)."""
    shape = tuple(shape)
    lead = g.ndim - len(shape)
    g = g.sum(tuple(range(lead)))
    ones = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(ones, keepdims=True).reshape(shape)


# --------------------------------------------------------------------------- float64 oracles
def oracle_forward(x, gamma=None, beta=None, axis=-1, eps=1e-8, training=True,
                   running_mean=None, running_var=None, momentum=0.9, running_var_ddof=0):
    """docs/api.md's forward in float64. Returns y, mean, rstd, new running mean, new running
    var (folding in the biased batch variance, or with ``running_var_ddof=1`` the unbiased
    ``var * M / (M - 1)``)."""
    x64 = np.asarray(x).astype(F64)
    red, kept = axes_of(x64.ndim, axis)
    F = tuple(x64.shape[a] for a in kept)
    new_rm = new_rv = None
    if training:
        # shifted by the first element of each feature: exact for constant features (x - mean == 0)
        shift = x64[tuple(0 if a in red else slice(None) for a in range(x64.ndim))]
        d = x64 - expand(shift, red, F)
        dmean = d.mean(red)
        mean = shift + dmean
        var = ((d - expand(dmean, red, F)) ** 2).mean(red)  # two-pass, biased
        if running_mean is not None:
            M = int(np.prod([x64.shape[a] for a in red], dtype=np.int64))
            var_folded = var * M / (M - running_var_ddof)
            new_rm = momentum * np.asarray(running_mean, F64) + (1 - momentum) * mean
            new_rv = momentum * np.asarray(running_var, F64) + (1 - momentum) * var_folded
    else:
        mean = np.asarray(running_mean, F64)
        var = np.asarray(running_var, F64)
    rstd = 1.0 / np.sqrt(var + eps)
    g = 1.0 if gamma is None else gamma
    b = 0.0 if beta is None else beta
    y = (x64 - expand(mean, red, F)) * expand(rstd, red, F) * expand(g, red, F) + expand(b, red, F)
    return y, np.asarray(mean), np.asarray(rstd), new_rm, new_rv


def oracle_backward(dy, x, mean, rstd, gamma=None, axis=-1, training=True):
    """docs/api.md's backward in float64 (mean, rstd given in float64). Returns dx, dgamma,
    dbeta."""
    x64 = np.asarray(x).astype(F64)
    dy64 = np.asarray(dy).astype(F64)
    red, kept = axes_of(x64.ndim, axis)
    F = tuple(x64.shape[a] for a in kept)
    M = int(np.prod([x64.shape[a] for a in red], dtype=np.int64))
    xhat = (x64 - expand(mean, red, F)) * expand(rstd, red, F)
    dbeta = dy64.sum(red)
    dgamma_F = (dy64 * xhat).sum(red)
    g = expand(1.0 if gamma is None else gamma, red, F)
    if training:
        dx = g * expand(rstd, red, F) * (dy64 - expand(dbeta, red, F) / M
                                         - xhat * expand(dgamma_F, red, F) / M)
    else:
        dx = g * expand(rstd, red, F) * dy64
    dgamma = dgamma_F if gamma is None else sum_to(np.asarray(dgamma_F), np.shape(gamma))
    return dx, np.asarray(dgamma), np.asarray(dbeta)


def mean_var(x, axis):
    """NumPy's float64 mean and biased variance of ``x`` per feature (feature axes ``axis``)."""
    red, _ = axes_of(np.ndim(x), axis)
    x64 = np.asarray(x).astype(F64)
    return x64.mean(red), x64.var(red)


# --------------------------------------------------------------------------- the family's oracles
# docs/api.md's layer norm, RMS norm and group norm in float64 (the statistics in two passes),
# forward and backward, for gamma/beta of the normalized axes' shape G (or broadcasting to it)
# or of x's keepdims shape.
def norm_axes(ndim, axis):
    """(normalized axes sorted, the other axes) of a layer or RMS norm's ``axis``."""
    norm = tuple(sorted(normalize_axis_tuple(axis, ndim)))
    return norm, tuple(a for a in range(ndim) if a not in norm)


def _param_on_x(v, shape, norm, other, default):
    """gamma or beta (None, G-broadcastable or keepdims) laid out to broadcast against x."""
    if v is None:
        return np.asarray(default, F64)
    v = np.asarray(v, F64)
    if v.ndim == len(shape) and other and all(v.shape[a] == 1 for a in other):
        return v                                                    # keepdims
    return np.expand_dims(np.broadcast_to(v, tuple(shape[a] for a in norm)), other)


def to_param_shape(g_x, gamma, axis):
    """An x-shaped product (``dy * xhat``, ``dy``) of a layer or RMS norm summed over the axes
    that are not normalized, down to gamma's shape (G for None)."""
    norm, other = norm_axes(g_x.ndim, axis)
    if gamma is None:
        return g_x.sum(other)
    gshape = np.shape(gamma)
    if len(gshape) == g_x.ndim and other and all(gshape[a] == 1 for a in other):
        g = g_x.sum(other, keepdims=True)
        ones = tuple(i for i, n in enumerate(gshape) if n == 1 and g.shape[i] != 1)
        return g.sum(ones, keepdims=True)
    return sum_to(g_x.sum(other), gshape)


def oracle_layer_norm(x, gamma=None, beta=None, axis=-1, eps=1e-5, activation=None):
    """y, mean, rstd (mean and rstd of x's shape without the normalized axes)."""
    x64 = np.asarray(x).astype(F64)
    norm, other = norm_axes(x64.ndim, axis)
    mean = x64.mean(norm, keepdims=True)
    d = x64 - mean
    rstd = 1.0 / np.sqrt((d * d).mean(norm, keepdims=True) + eps)
    y = d * rstd * _param_on_x(gamma, x64.shape, norm, other, 1.0) + \
        _param_on_x(beta, x64.shape, norm, other, 0.0)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return y, mean.squeeze(norm), rstd.squeeze(norm)


def oracle_layer_norm_backward(dy, x, mean, rstd, gamma=None, axis=-1):
    """dx, dgamma (gamma's shape; G for None), dbeta (G)."""
    x64, dy64 = np.asarray(x).astype(F64), np.asarray(dy).astype(F64)
    norm, other = norm_axes(x64.ndim, axis)
    m = np.expand_dims(np.asarray(mean, F64), norm)
    r = np.expand_dims(np.asarray(rstd, F64), norm)
    xhat = (x64 - m) * r
    dxhat = dy64 * _param_on_x(gamma, x64.shape, norm, other, 1.0)
    dx = r * (dxhat - dxhat.mean(norm, keepdims=True)
              - xhat * (dxhat * xhat).mean(norm, keepdims=True))
    return dx, to_param_shape(dy64 * xhat, gamma, axis), dy64.sum(other)


def oracle_rms_norm(x, gamma=None, axis=-1, eps=None):
    """y, rrms; ``eps=None`` is x's dtype's epsilon (as bnorm.rms_norm and PyTorch)."""
    if eps is None:
        import ml_dtypes   # its finfo knows bfloat16 as well as NumPy's dtypes
        eps = float(ml_dtypes.finfo(np.asarray(x).dtype).eps)
    x64 = np.asarray(x).astype(F64)
    norm, other = norm_axes(x64.ndim, axis)
    rrms = 1.0 / np.sqrt((x64 * x64).mean(norm, keepdims=True) + eps)
    return x64 * rrms * _param_on_x(gamma, x64.shape, norm, other, 1.0), rrms.squeeze(norm)


def oracle_rms_norm_backward(dy, x, rrms, gamma=None, axis=-1):
    """dx, dgamma (gamma's shape; G for None)."""
    x64, dy64 = np.asarray(x).astype(F64), np.asarray(dy).astype(F64)
    norm, other = norm_axes(x64.ndim, axis)
    r = np.expand_dims(np.asarray(rrms, F64), norm)
    xhat = x64 * r
    dxhat = dy64 * _param_on_x(gamma, x64.shape, norm, other, 1.0)
    dx = r * (dxhat - xhat * (dxhat * xhat).mean(norm, keepdims=True))
    return dx, to_param_shape(dy64 * xhat, gamma, axis)


def _groups(a, axis, num_groups):
    """x-shaped ``a`` as (N, num_groups, elements of a group), channel axis ``axis``."""
    a = np.moveaxis(a, axis, 1)
    return a.reshape(a.shape[0], num_groups, -1)


def _ungroups(g, shape, axis):
    """The inverse of ``_groups`` for an x of ``shape``."""
    moved = np.moveaxis(np.empty(shape, dtype=bool), axis, 1).shape
    return np.moveaxis(g.reshape(moved), 1, axis)


def _per_channel(v, shape, axis, default):
    if v is None:
        return np.asarray(default, F64)
    return np.asarray(v, F64).reshape([n if a == axis % len(shape) else 1
                                       for a, n in enumerate(shape)])


def oracle_group_norm(x, num_groups, gamma=None, beta=None, axis=1, eps=1e-5, activation=None):
    """y, mean, rstd (shape (N, num_groups)); gamma, beta per channel (C,)."""
    x64 = np.asarray(x).astype(F64)
    xg = _groups(x64, axis, num_groups)
    mean = xg.mean(2, keepdims=True)
    d = xg - mean
    rstd = 1.0 / np.sqrt((d * d).mean(2, keepdims=True) + eps)
    xhat = _ungroups(d * rstd, x64.shape, axis)
    y = xhat * _per_channel(gamma, x64.shape, axis, 1.0) + \
        _per_channel(beta, x64.shape, axis, 0.0)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return y, mean[..., 0], rstd[..., 0]


def oracle_group_norm_backward(dy, x, mean, rstd, num_groups, gamma=None, axis=1):
    """dx, dgamma, dbeta (per channel)."""
    x64, dy64 = np.asarray(x).astype(F64), np.asarray(dy).astype(F64)
    m = np.asarray(mean, F64)[..., None]
    r = np.asarray(rstd, F64)[..., None]
    xh = (_groups(x64, axis, num_groups) - m) * r
    dxh = _groups(dy64 * _per_channel(gamma, x64.shape, axis, 1.0), axis, num_groups)
    dx = r * (dxh - dxh.mean(2, keepdims=True) - xh * (dxh * xh).mean(2, keepdims=True))
    red = tuple(a for a in range(x64.ndim) if a != axis % x64.ndim)
    xhat = _ungroups(xh, x64.shape, axis)
    dgamma = (dy64 * xhat).sum(red)
    if gamma is not None:
        dgamma = sum_to(dgamma, np.shape(gamma))
    return _ungroups(dx, x64.shape, axis), dgamma, dy64.sum(red)


# --------------------------------------------------------------------------- comparisons
def amax(a):
    """max |a| as a float, 0 for an empty array."""
    return float(np.max(np.abs(a), initial=0.0))


def assert_close(got, expected, tol, what="", scale=0.0):
    """Normwise comparison (see the module docstring), plus shape equality. ``scale``: the
    magnitude of the terms the result was computed from, when it can exceed the result's."""
    got = np.asarray(got)
    expected = np.asarray(expected, dtype=F64)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    scale = max(scale, amax(expected))
    if scale == 0.0:
        scale = 1.0
    np.testing.assert_allclose(got.astype(F64), expected, rtol=tol, atol=tol * scale,
                               err_msg=what)


def ulp(v, dtype):
    """The spacing of a 2-byte float ``dtype`` (float16, bfloat16) at each value of v (float64),
    from the value rounded to it."""
    r = np.asarray(v).astype(dtype)
    # one more in the bits is the next value away from zero (inf after the largest)
    away = (r.view(np.uint16) + np.uint16(1)).view(dtype)
    with np.errstate(invalid="ignore"):
        return np.abs(away.astype(F64) - r.astype(F64))


def assert_raises_untouched(fn, kw, exc, match=None, args=()):
    """fn(*args, **kw) raises exc (matching match), and leaves every array argument bit for bit as
    it was."""
    import pytest
    arrays = [(f"argument {i}", v) for i, v in enumerate(args) if isinstance(v, np.ndarray)]
    arrays += [(k, v) for k, v in kw.items() if isinstance(v, np.ndarray)]
    before = [v.copy() for _, v in arrays]
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kw)
    assert not isinstance(info.value, SystemError)
    for (k, a), b in zip(arrays, before):
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert a.tobytes() == b.tobytes(), f"{k} was modified by a failing call"
    return info.value


def layer_snapshot(layer):
    """Copies of everything a BatchNorm (or SyncBatchNorm) call may change: its state (arrays and
    ``num_batches_tracked``), its gradients and what its forward saved for backward."""
    arrays = ("gamma", "beta", "running_mean", "running_var", "dgamma", "dbeta")
    snap = {k: None if getattr(layer, k) is None else np.array(getattr(layer, k), copy=True)
            for k in arrays}
    snap["num_batches_tracked"] = layer.num_batches_tracked
    # what forward saved for backward, by identity (the snapshot's reference keeps it alive, so
    # a new context cannot reuse its address)
    snap["saved"] = getattr(layer, "_ctx", None) or getattr(layer, "_saved", None)
    return snap


def assert_layer_unchanged(layer, snap, what=""):
    """``layer`` is as ``layer_snapshot`` found it: arrays bit for bit, count, saved context."""
    now = layer_snapshot(layer)
    for k, before in snap.items():
        after = now[k]
        if k == "saved":
            assert after is before, f"{what}: what forward saved for backward was replaced"
        elif isinstance(before, np.ndarray):
            assert after is not None and after.dtype == before.dtype, f"{what}: {k}"
            assert after.tobytes() == before.tobytes(), f"{what}: {k} was modified"
        else:
            assert after == before, f"{what}: {k} was modified ({before!r} -> {after!r})"


# --------------------------------------------------------------------------- seeds and data
# Seeds derived from a test's name or parameters, the same in every process (hash() of a str is
# salted per process), so that a failure reproduces.
def stable_seed(*key):
    """A seed from the test's parameters."""
    return zlib.crc32(repr(key).encode())


def rng_for(name):
    """A generator seeded by a name."""
    return np.random.default_rng(zlib.crc32(name.encode()))


def randn(rng, shape, dtype, loc=0.0, scale=1.0):
    """Normal data of mean ``loc`` and standard deviation ``scale``, drawn in float64, in
    ``dtype``."""
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def readonly(a):
    """A read-only copy of ``a``."""
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


# --------------------------------------------------------------------------- processes, threads
# The directory holding the bnorm this session imported (installed, or a source tree).
BNORM_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(bnorm.__file__)))


def child_env(**variables):
    """``os.environ`` plus ``variables``, with ``PYTHONPATH`` leading to the bnorm this session
    imported, for child interpreters (benchmarks, MPI ranks, fresh processes)."""
    paths = [BNORM_PARENT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, **variables, PYTHONPATH=os.pathsep.join(paths))


def run_threads(target, n, timeout=120):
    """Run ``target(i)`` in threads ``i < n`` at once; fail if one raises or does not finish."""
    errors = []

    def wrapped(i):
        try:
            target(i)
        except BaseException as e:  # reported below: a thread's exception must fail the test
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=wrapped, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "threads hang (deadlock?)"
    assert not errors, errors


def rss_bytes():
    """This process's resident memory (Linux's /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def asan_loaded():
    """Whether AddressSanitizer runs in this process (a sanitized build, .ci/sanitize)."""
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()
