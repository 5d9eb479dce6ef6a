"""Half precision (docs/api.md, "Half precision"): float16 and bfloat16 data, float32 statistics.

* The kernels convert half <-> float32 themselves: every one of the 65536 values of each format
  goes through them and must come back as NumPy (float16) or ml_dtypes (bfloat16) converts it.
* ``y`` is within one unit in the last place of x's dtype of the float64 result computed from the
  same half input; ``dx`` and ``dgamma`` are no less accurate than PyTorch's CPU result.
* dtypes: ``mean``/``rstd`` float32, ``y``/``dx`` x's, ``dgamma``/``dbeta`` gamma's (float32 when
  gamma is None or not an array).
"""
import ml_dtypes
import numpy as np
import pytest
from helpers import F32, F64, axes_of, oracle_backward, oracle_forward, stable_seed, ulp

import bnorm

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALVES = [F16, BF16]
IDS = ["float16", "bfloat16"]


def every_value(dtype):
    return np.arange(65536, dtype=np.uint16).view(dtype)


def same_values(got, want):
    """Equal as numbers (so -0 == +0, which (x - 0) * 1 + 0 makes), nan where nan."""
    got, want = got.astype(F64), want.astype(F64)
    return np.all((got == want) | (np.isnan(got) & np.isnan(want)))


@pytest.mark.parametrize("dtype", HALVES, ids=IDS)
@pytest.mark.parametrize("scale", [1.0, 3.0, 0.75, 2.0**-10, 2.0**-20, 2.0**12, -5.0])
def test_every_value_converts_as_numpy_does(dtype, scale):
    """y = x * scale (mean 0, rstd 1): widening is exact and narrowing rounds to nearest even,
    into subnormals and to inf as NumPy / ml_dtypes do, on this CPU target's kernels."""
    x = every_value(dtype)
    y = bnorm.normalize(x, np.zeros(()), np.ones(()), scale, axis=())
    with np.errstate(all="ignore"):
        want = (x.astype(F32) * np.float32(scale)).astype(dtype)
    assert y.dtype == dtype
    assert same_values(y, want)


CASES = [((64, 24), -1), ((8, 6, 5, 12), -1), ((8, 12, 6, 5), 1), ((6, 4, 3, 10), (1, 3))]


def case_data(dtype, shape, axis, loc):
    rng = np.random.default_rng(stable_seed(dtype.name, shape, axis, loc))
    x = (rng.standard_normal(shape) * 2 + loc).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    F = tuple(shape[a] for a in axes_of(len(shape), axis)[1])
    return rng, x, dy, F


@pytest.mark.parametrize("dtype", HALVES, ids=IDS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("loc", [0.0, 100.0])
@pytest.mark.parametrize("param_dtype", [F32, F64, "x", None], ids=str)
def test_forward_within_one_ulp_of_float64(dtype, case, loc, param_dtype):
    shape, axis = case
    rng, x, _, F = case_data(dtype, shape, axis, loc)
    pdt = dtype if param_dtype == "x" else param_dtype
    gamma = None if pdt is None else rng.uniform(0.5, 2, F).astype(pdt)
    beta = None if pdt is None else rng.standard_normal(F).astype(pdt)
    rm = np.zeros(F, pdt or F32)
    rv = np.ones(F, pdt or F32)
    y, mean, rstd = bnorm.forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv)
    assert y.dtype == dtype and mean.dtype == F32 and rstd.dtype == F32
    assert rm.dtype == (pdt or F32) and rv.dtype == (pdt or F32)
    oy, om, ors, orm, orv = oracle_forward(x, gamma, beta, axis)
    assert np.all(np.abs(y.astype(F64) - oy) <= ulp(oy, dtype)), "y beyond one ulp"
    np.testing.assert_allclose(mean, om, rtol=2e-7, atol=2e-7 * abs(loc))
    np.testing.assert_allclose(rstd, ors, rtol=4e-7)
    # the running statistics in their own dtype, from the float64 batch statistics
    np.testing.assert_array_equal(rm.astype(F64), ((1 - 0.9) * om).astype(rm.dtype).astype(F64))
    # inference: the same one-ulp bound
    yi = bnorm.forward(x, gamma, beta, axis=axis, training=False, running_mean=mean,
                       running_var=(1 / rstd.astype(F64) ** 2 - 1e-8))[0]
    oyi = oracle_forward(x, gamma, beta, axis, training=False, running_mean=mean.astype(F64),
                         running_var=1 / rstd.astype(F64) ** 2 - 1e-8)[0]
    assert yi.dtype == dtype
    assert np.all(np.abs(yi.astype(F64) - oyi) <= ulp(oyi, dtype))


def torch_batch_norm(x, dy, gamma, beta, axis):
    """PyTorch's CPU batch norm on the same half input (float32 weights, as its mixed precision
    has them): y, dx, dgamma, dbeta as float64."""
    torch = pytest.importorskip("torch")
    tdtype = torch.float16 if x.dtype == F16 else torch.bfloat16
    perm = (0, axis) + tuple(d for d in range(1, x.ndim) if d != axis) if axis != 1 else None
    xt = torch.from_numpy(x.astype(F32)).to(tdtype)
    dyt = torch.from_numpy(dy.astype(F32)).to(tdtype)
    if perm:
        xt, dyt = xt.permute(perm), dyt.permute(perm)
    xt.requires_grad_(True)
    w = torch.from_numpy(gamma).requires_grad_(True)
    b = torch.from_numpy(beta).requires_grad_(True)
    yt = torch.nn.functional.batch_norm(xt, None, None, w, b, training=True, eps=1e-8)
    yt.backward(dyt)
    back = np.argsort(perm) if perm else None
    y, dx = yt.detach().float().numpy(), xt.grad.float().numpy()
    if perm:
        y, dx = y.transpose(back), dx.transpose(back)
    return y.astype(F64), dx.astype(F64), w.grad.double().numpy(), b.grad.double().numpy()


@pytest.mark.parametrize("dtype", HALVES, ids=IDS)
@pytest.mark.parametrize("case", [((64, 24), -1), ((8, 6, 5, 12), -1), ((8, 12, 6, 5), 1)],
                         ids=str)
@pytest.mark.parametrize("loc", [0.0, 30.0])
def test_backward_no_less_accurate_than_pytorch(dtype, case, loc):
    shape, axis = case
    rng, x, dy, F = case_data(dtype, shape, axis, loc)
    gamma = rng.uniform(0.5, 2, F).astype(F32)
    beta = rng.standard_normal(F).astype(F32)
    y, mean, rstd = bnorm.forward(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = bnorm.backward(dy, x, mean, rstd, gamma, axis=axis)
    assert dx.dtype == dtype and dgamma.dtype == F32 and dbeta.dtype == F32
    _, om, ors, _, _ = oracle_forward(x, gamma, beta, axis)
    odx, odgamma, odbeta = oracle_backward(dy, x, om, ors, gamma, axis)
    ty, tdx, tdgamma, tdbeta = torch_batch_norm(x, dy, gamma, beta, axis % x.ndim)

    def err(a, b):
        return float(np.max(np.abs(a.astype(F64) - b)))

    # no less accurate than PyTorch: ours is at most its error (both round dx to x's dtype, so
    # the two often agree to the bit)
    assert err(dx, odx) <= err(tdx, odx)
    assert err(dgamma, odgamma) <= err(tdgamma, odgamma)
    assert err(dbeta, odbeta) <= err(tdbeta, odbeta) + 1e-6 * float(np.abs(odbeta).max())
    oy = oracle_forward(x, gamma, beta, axis)[0]
    assert err(y, oy) <= err(ty, oy)


@pytest.mark.parametrize("dtype", HALVES, ids=IDS)
def test_gradient_dtypes_follow_gamma(dtype):
    rng, x, dy, F = case_data(dtype, (16, 5), -1, 0.0)
    y, mean, rstd = bnorm.forward(x)
    for gamma, want in [(None, F32), (1.5, F32), (np.ones(F, F64), F64),
                        (np.ones(F, dtype), dtype), (np.ones((1, 5), F32), F32)]:
        dx, dgamma, dbeta = bnorm.backward(dy, x, mean, rstd, gamma)
        assert dx.dtype == dtype
        assert dgamma.dtype == want and dbeta.dtype == want, (gamma, want)
    # the split phases: float64 statistics and sums, y and dx in x's dtype
    n, bmean, m2 = bnorm.batch_stats(x)
    assert bmean.dtype == F64 and n == 16
    np.testing.assert_allclose(bmean, x.astype(F64).mean(0), rtol=1e-12)
    y2 = bnorm.normalize(x, bmean, 1 / np.sqrt(m2 / n + 1e-8))
    assert y2.dtype == dtype
    sdy, sdyx = bnorm.backward_sums(dy, x, bmean)
    dx2 = bnorm.backward_apply(dy, x, bmean, 1 / np.sqrt(m2 / n + 1e-8), sdy, sdyx, n)
    assert dx2.dtype == dtype
    dx1 = bnorm.backward(dy, x, mean, rstd)[0]
    assert np.max(np.abs(dx2.astype(F64) - dx1.astype(F64))) <= 2 * float(
        np.max(ulp(dx1.astype(F64), dtype)))


@pytest.mark.parametrize("dtype", HALVES, ids=IDS)
def test_out_and_in_place(dtype):
    rng, x, dy, F = case_data(dtype, (32, 3, 16), 1, 5.0)
    want, mean, rstd = bnorm.forward(x.copy(), axis=1)
    out = np.empty_like(x)
    assert bnorm.forward(x, axis=1, out=out)[0] is out
    assert np.array_equal(out.view(np.uint16), want.view(np.uint16))
    bnorm.forward(x, axis=1, out=x)
    assert np.array_equal(x.view(np.uint16), want.view(np.uint16))
    with pytest.raises(TypeError, match="out has dtype"):
        bnorm.forward(x, axis=1, out=np.empty(x.shape, F32))


@pytest.mark.parametrize("dtype", HALVES, ids=IDS)
def test_mixed_precision_layer(dtype):
    """BatchNorm(dtype=float32) fed half x: y and dx half, parameters, their gradients and the
    running statistics float32."""
    rng, x, dy, F = case_data(dtype, (32, 8), -1, 1.0)
    layer = bnorm.BatchNorm(8, dtype=F32)
    y = layer.forward(x)
    dx = layer.backward(dy)
    assert y.dtype == dtype and dx.dtype == dtype
    assert layer.dgamma.dtype == F32 and layer.running_var.dtype == F32
    oy = oracle_forward(x, axis=-1)[0]
    assert np.all(np.abs(y.astype(F64) - oy) <= ulp(oy, dtype))


@pytest.mark.parametrize("dtype", HALVES, ids=IDS)
def test_half_layer_and_its_state(dtype):
    """BatchNorm(dtype=half): parameters, gradients and running statistics as narrow as x."""
    rng, x, dy, F = case_data(dtype, (32, 3, 4), 1, 300.0)
    layer = bnorm.BatchNorm(3, axis=1, dtype=dtype)
    y = layer.forward(x)
    dx = layer.backward(dy)
    for a in (y, dx, layer.gamma, layer.dgamma, layer.dbeta, layer.running_mean):
        assert a.dtype == dtype
    oy, om, _, _, orv = oracle_forward(x, layer.gamma, layer.beta, 1,
                                       running_mean=np.zeros(3), running_var=np.ones(3))
    assert np.all(np.abs(y.astype(F64) - oy) <= ulp(oy, dtype))
    np.testing.assert_array_equal(layer.running_mean, ((1 - 0.9) * om).astype(dtype))
    other = bnorm.BatchNorm(3, axis=1, dtype=dtype)
    other.load_state_dict(layer.state_dict())
    assert np.array_equal(other.running_var.view(np.uint16), layer.running_var.view(np.uint16))


@pytest.mark.parametrize("dtype", HALVES, ids=IDS)
def test_sync_batch_norm_on_one_rank_equals_batch_norm(dtype):
    """SyncBatchNorm's own path (batch_stats, an Allreduce, normalize, backward_sums,
    backward_apply) on half x: what BatchNorm gives, to float32 rounding before the narrowing.
    (tests/test_mpi.py runs it on several ranks.)"""
    MPI = pytest.importorskip("mpi4py.MPI")
    from bnorm.mpi import SyncBatchNorm
    rng, x, dy, F = case_data(dtype, (24, 6), -1, 50.0)
    sync, single = SyncBatchNorm(MPI.COMM_SELF, 6), bnorm.BatchNorm(6)
    ys, ysingle = sync.forward(x), single.forward(x)
    dxs, dxsingle = sync.backward(dy), single.backward(dy)
    assert ys.dtype == dtype and dxs.dtype == dtype
    for got, want in [(ys, ysingle), (dxs, dxsingle)]:
        assert np.all(np.abs(got.astype(F64) - want.astype(F64)) <= ulp(want.astype(F64), dtype))
    np.testing.assert_allclose(sync.running_var, single.running_var, rtol=1e-6)
    np.testing.assert_allclose(sync.dgamma, single.dgamma, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", HALVES, ids=IDS)
def test_constant_channels_and_nan_stay_per_feature(dtype):
    """A constant channel far from zero normalizes to beta exactly; NaN and inf reach only the
    features they are in, as for float32."""
    rng, x, dy, F = case_data(dtype, (16, 4), -1, 0.0)
    x[:, 1] = np.asarray(300.0, dtype)
    x[3, 2] = np.asarray(np.nan, dtype)
    x[5, 3] = np.asarray(np.inf, dtype)
    y, mean, rstd = bnorm.forward(x, None, 0.5)
    assert np.all(y[:, 1].astype(F64) == 0.5)
    assert np.isnan(y[:, 2].astype(F64)).all() and np.isnan(y[:, 3].astype(F64)).all()
    oy = oracle_forward(x[:, :1], None, 0.5)[0]
    assert np.all(np.abs(y[:, :1].astype(F64) - oy) <= ulp(oy, dtype))
    dx = bnorm.backward(dy, x, mean, rstd)[0]
    assert np.isfinite(dx[:, :2].astype(F64)).all()
    assert np.isnan(dx[:, 2].astype(F64)).all()


def test_bfloat16_is_recognized_without_importing_ml_dtypes_in_bnorm():
    import subprocess
    import sys

    from helpers import child_env
    code = ("import sys, bnorm, numpy as np; assert 'ml_dtypes' not in sys.modules; "
            "import ml_dtypes; x = np.ones((4, 2), ml_dtypes.bfloat16); x[0] = 3; "
            "print(bnorm.forward(x)[0].dtype)")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), cwd="/",
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "bfloat16"
