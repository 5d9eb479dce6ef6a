"""Fused ReLU (docs/api.md, "Fused activation"): ``forward(..., activation="relu")`` writes
``max(0, bn(x))`` in the normalize pass; ``backward(..., beta=beta, activation="relu")``
recomputes the ReLU's mask from x, mean, rstd, gamma and beta inside its passes.

The oracle is the unfused computation a user writes today: ``np.maximum(y, 0)`` after
``bnorm.forward`` and ``bnorm.backward`` of the masked ``dy * (y > 0)``.  The fused backward
recomputes each pre-activation with the ``mean`` forward returned (rounded to x's dtype in
training, where forward used the unrounded one), so an element whose pre-activation is within
rounding of zero may fall on the other side of the mask: only those elements' features may
differ, and each test counts them.
"""
import ml_dtypes
import numpy as np
import pytest
from helpers import F32, F64, axes_of, stable_seed

import bnorm

DTYPES = [F32, F64, np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
IDS = ["float32", "float64", "float16", "bfloat16"]
# channels-last, NCHW, a design matrix, two feature axes, a strided view with a negative stride
LAYOUTS = [((64, 24), -1, None), ((6, 5, 4, 10), -1, None), ((6, 10, 5, 4), 1, None),
           ((6, 5, 4, 10), (1, 3), None), ((12, 9, 4, 10), -1, (slice(None, None, 2),
                                                                slice(None, None, -2)))]


def make_case(dtype, shape, axis, view, training):
    rng = np.random.default_rng(stable_seed(np.dtype(dtype).name, shape, axis, training))
    base = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    x = base[view] if view else base
    dy = rng.standard_normal(x.shape).astype(dtype)
    _, kept = axes_of(x.ndim, axis)
    F = tuple(x.shape[a] for a in kept)
    gamma = rng.uniform(0.5, 2, F).astype(F32 if dtype.itemsize == 2 else dtype)
    beta = rng.standard_normal(F).astype(gamma.dtype)
    kw = dict(axis=axis, training=training)
    if not training:
        kw.update(running_mean=rng.standard_normal(F).astype(gamma.dtype),
                  running_var=rng.uniform(0.5, 2, F).astype(gamma.dtype))
    return x, dy, gamma, beta, kw, kept


def near_zero(x, y_unfused, mean, rstd, gamma, beta, kept):
    """Elements whose pre-activation is within rounding of zero: a few units in the last place of
    the compute type (float32 for half x) of the terms it is made of."""
    shape = [x.shape[a] if a in kept else 1 for a in range(x.ndim)]
    scale = np.abs(rstd.astype(F64) * gamma.astype(F64)).reshape(shape)
    terms = (np.abs(x.astype(F64)) + np.abs(mean.astype(F64)).reshape(shape)) * scale + \
        np.abs(beta.astype(F64)).reshape(shape)
    eps = float(np.finfo(F64 if x.dtype == F64 else F32).eps)
    return np.abs(y_unfused.astype(F64)) <= 8 * eps * terms


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda c: f"{c[0]}-axis{c[1]}-{bool(c[2])}")
def test_fused_equals_unfused(layout, dtype, training):
    shape, axis, view = layout
    x, dy, gamma, beta, kw, kept = make_case(dtype, shape, axis, view, training)
    y0, mean, rstd = bnorm.forward(x, gamma, beta, **{k: (v.copy() if isinstance(v, np.ndarray)
                                                          else v) for k, v in kw.items()})
    y, mean_f, rstd_f = bnorm.forward(x, gamma, beta, activation="relu", **kw)
    # forward: the same normalize pass, then max(0, .): bit for bit
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y.astype(F64), np.maximum(y0.astype(F64), 0))
    np.testing.assert_array_equal(mean_f, mean)
    np.testing.assert_array_equal(rstd_f, rstd)

    mask = y0.astype(F64) > 0
    masked = (dy.astype(F64) * mask).astype(dtype)
    want = bnorm.backward(masked, x, mean, rstd, gamma, axis=axis, training=training)
    got = bnorm.backward(dy, x, mean, rstd, gamma, axis=axis, training=training, beta=beta,
                         activation="relu")
    ambiguous = near_zero(x, y0, mean, rstd, gamma, beta, kept)
    # features holding an ambiguous element may differ through the sums; the others may not
    reduced = tuple(a for a in range(x.ndim) if a not in kept)
    clean = ~ambiguous.any(axis=reduced, keepdims=True)
    print(f"{ambiguous.sum()} of {x.size} pre-activations within rounding of zero")
    assert ambiguous.sum() <= max(2, x.size // 1000)
    assert np.array_equal(got[0].astype(F64)[np.broadcast_to(clean, x.shape)],
                          want[0].astype(F64)[np.broadcast_to(clean, x.shape)])
    clean_f = clean.reshape(gamma.shape)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(g[clean_f], w[clean_f])


def test_mask_passes_positive_pre_activations_only():
    """dy passes where the pre-activation is > 0; at exactly 0 the ReLU's gradient is 0, as
    PyTorch's: feature 0 normalizes to (-rstd, +rstd), feature 1 (constant) to (0, 0)."""
    x = np.array([[1.0, 2.0], [3.0, 2.0]])
    y, mean, rstd = bnorm.forward(x, activation="relu")
    np.testing.assert_array_equal(y, [[0.0, 0.0], [rstd[0], 0.0]])
    dy = np.array([[5.0, 1.0], [7.0, 1.0]])
    dx, dgamma, dbeta = bnorm.backward(dy, x, mean, rstd, activation="relu")
    np.testing.assert_array_equal(dbeta, [7.0, 0.0])
    np.testing.assert_array_equal(dx[:, 1], [0.0, 0.0])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_masked_nan_gradient_does_not_propagate(dtype):
    """The mask selects dy (PyTorch's threshold_backward does the same): a NaN in dy where the
    ReLU blocked the element reaches neither dx nor the sums, so the result equals the one with
    a zero there."""
    x, dy, gamma, beta, kw, _ = make_case(dtype, (64, 24), -1, None, True)
    y, mean, rstd = bnorm.forward(x, gamma, beta, activation="relu", **kw)
    blocked = y.astype(F64) == 0
    assert blocked.sum() > 100
    with_nan, with_zero = dy.copy(), dy.copy()
    with_nan[blocked] = np.nan
    with_zero[blocked] = 0
    got = bnorm.backward(with_nan, x, mean, rstd, gamma, beta=beta, activation="relu")
    want = bnorm.backward(with_zero, x, mean, rstd, gamma, beta=beta, activation="relu")
    assert all(np.isfinite(g.astype(F64)).all() for g in got)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("value", ["gelu", "ReLU", 1, True, b"relu", ["relu"]], ids=repr)
def test_other_activations_are_value_errors_and_modify_nothing(value):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 3))
    out = np.zeros_like(x)
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="activation"):
        bnorm.forward(x, running_mean=rm, running_var=rv, out=out, activation=value)
    assert not out.any() and not rm.any() and (rv == 1).all()
    y, mean, rstd = bnorm.forward(x)
    with pytest.raises(ValueError, match="activation"):
        bnorm.backward(x, x, mean, rstd, out=out, activation=value)
    assert not out.any()
    with pytest.raises(ValueError, match="activation"):
        bnorm.BatchNorm(3, activation=value)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_layer_with_relu_against_pytorch(dtype):
    """BatchNorm(activation="relu") over a few SGD steps equals torch's BatchNorm2d + ReLU under
    autograd: outputs, input and weight gradients, running statistics."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    tdtype = torch.float64 if dtype == F64 else torch.float32
    module = torch.nn.BatchNorm2d(6, eps=1e-5).to(tdtype)
    layer = bnorm.BatchNorm.from_torch(module)
    layer.activation = "relu"
    tol = 1e-10 if dtype == F64 else 2e-5
    for step in range(4):
        training = step != 2
        module.train(training)
        x = (rng.standard_normal((8, 6, 5, 4)) + 0.5).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        yt = torch.relu(module(xt))
        yt.backward(torch.from_numpy(dy))
        y = layer.forward(x, training=training)
        dx = layer.backward(dy)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(layer.dgamma, module.weight.grad.numpy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(layer.dbeta, module.bias.grad.numpy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(layer.running_var, module.running_var.numpy(), rtol=tol)
        with torch.no_grad():
            for p, g in ((module.weight, layer.dgamma), (module.bias, layer.dbeta)):
                p -= 0.1 * p.grad
                p.grad = None
        layer.gamma -= 0.1 * layer.dgamma
        layer.beta -= 0.1 * layer.dbeta


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_split_phases_and_sync_batch_norm_on_one_rank(training):
    """SyncBatchNorm(activation="relu") runs the split phases with the ReLU (normalize,
    backward_sums, backward_apply): on one rank it is BatchNorm(activation="relu").
    (tests/mpi/check_sync.py runs it on several ranks.)"""
    MPI = pytest.importorskip("mpi4py.MPI")
    from bnorm.mpi import SyncBatchNorm
    rng = np.random.default_rng(12)
    sync = SyncBatchNorm(MPI.COMM_SELF, 5, axis=1, activation="relu", dtype=F64)
    single = bnorm.BatchNorm(5, axis=1, activation="relu", dtype=F64)
    for layer in (sync, single):
        layer.gamma[:] = np.linspace(0.5, 2, 5)
        layer.beta[:] = np.linspace(-1, 1, 5)
    x = rng.standard_normal((16, 5, 3)) + 0.2
    dy = rng.standard_normal(x.shape)
    if not training:  # running statistics of one training step first
        sync.forward(x), single.forward(x)
    ys, y1 = sync.forward(x, training=training), single.forward(x, training=training)
    dxs, dx1 = sync.backward(dy), single.backward(dy)
    assert (ys >= 0).all() and (ys == 0).any()
    np.testing.assert_allclose(ys, y1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dxs, dx1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sync.dgamma, single.dgamma, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sync.dbeta, single.dbeta, rtol=1e-10, atol=1e-12)
