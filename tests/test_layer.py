"""bnorm.BatchNorm: the layer's API (docs/api.md, "The layer") and its equivalence to the post's
layer.

Expected values come from the float64 oracle of tests/helpers.py, from NumPy's mean and var, from
finite differences, or from the post's own layer (bnorm.reference.PostBatchNorm); nothing is a
number copied from bnorm's output.
"""
import numpy as np
import pytest
from helpers import AxisError, mean_var, oracle_forward

import bnorm
from bnorm.reference import PostBatchNorm


def _bn_numpy(x, mean, var, gamma, beta, eps, axis):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta in float64, feature axes ``axis``, from
    the given statistics (the oracle's inference mode)."""
    return oracle_forward(x, gamma, beta, axis, eps, training=False, running_mean=mean,
                          running_var=var)[0]


def _f32_close(a, b, scale=1.0):
    # float32 results of O(1) quantities: a few ulps (eps32 = 1.2e-7) times a small growth factor.
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * scale)


# --------------------------------------------------------------------------- construction
def test_defaults_are_plain_arrays_of_shape_F():
    layer = bnorm.BatchNorm(5)
    for name, fill in [("gamma", 1), ("beta", 0), ("running_mean", 0), ("running_var", 1)]:
        a = getattr(layer, name)
        assert type(a) is np.ndarray, name
        assert a.shape == (5,) and a.dtype == np.float32, name
        assert np.all(a == fill), name
        assert a.flags.writeable and a.flags.owndata, name
    assert layer.eps == 1e-8 and layer.momentum == 0.9 and layer.axis == -1 and layer.affine
    assert layer.dgamma is None and layer.dbeta is None
    assert "BatchNorm" in bnorm.__all__ and bnorm.BatchNorm is bnorm.layer.BatchNorm


def test_float64_layer():
    layer = bnorm.BatchNorm(3, dtype=np.float64)
    assert all(getattr(layer, n).dtype == np.float64
               for n in ("gamma", "beta", "running_mean", "running_var"))
    x = np.random.default_rng(0).standard_normal((7, 3))
    m, v = mean_var(x, -1)
    np.testing.assert_allclose(layer.forward(x), _bn_numpy(x, m, v, 1, 0, 1e-8, -1),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, exc", [
    (dict(num_features=0), ValueError),
    (dict(num_features=(3, -1)), ValueError),
    (dict(num_features=2.5), TypeError),
    (dict(num_features=4, dtype=np.int32), TypeError),
    (dict(num_features=4, momentum=1.5), ValueError),
    (dict(num_features=4, eps=-1.0), ValueError),
    (dict(num_features=(3, 4), axis=-1), ValueError),   # 2-d F but one axis
    (dict(num_features=(3, 4), axis=(1, 1)), ValueError),
    # as bnorm.forward: eps a finite number >= 0, momentum in [0, 1], NaN neither
    (dict(num_features=4, eps=np.inf), ValueError),
    (dict(num_features=4, eps=np.nan), ValueError),
    (dict(num_features=4, momentum=np.nan), ValueError),
    # a bool is an int to Python, but not a sensible eps or momentum
    (dict(num_features=4, eps=True), TypeError),
    (dict(num_features=4, momentum=np.True_), TypeError),
    (dict(num_features=4, eps="1e-5"), TypeError),
])
def test_bad_construction(kwargs, exc):
    nf = kwargs.pop("num_features")
    with pytest.raises(exc):
        bnorm.BatchNorm(nf, **kwargs)


# --------------------------------------------------------------------------- forward
def test_forward_training_matches_numpy_and_updates_running_stats_in_place():
    rng = np.random.default_rng(1)
    layer = bnorm.BatchNorm(6, momentum=0.7)
    layer.gamma[:] = rng.uniform(0.5, 2, 6)
    layer.beta[:] = rng.standard_normal(6)
    rm, rv = layer.running_mean, layer.running_var
    exp_rm, exp_rv = np.zeros(6), np.ones(6)
    for step in range(3):
        x = (3 + 2 * rng.standard_normal((16, 6))).astype(np.float32)
        y = layer.forward(x)
        m, v = mean_var(x, -1)
        assert y.shape == x.shape and y.dtype == np.float32
        _f32_close(y, _bn_numpy(x, m, v, layer.gamma, layer.beta, 1e-8, -1))
        exp_rm = 0.7 * exp_rm + 0.3 * m
        exp_rv = 0.7 * exp_rv + 0.3 * v            # biased variance, as the post
        assert layer.running_mean is rm and layer.running_var is rv   # same arrays, in place
        _f32_close(rm, exp_rm, scale=3)
        _f32_close(rv, exp_rv, scale=4)


def test_forward_accepts_lists():
    layer = bnorm.BatchNorm(2, dtype=np.float64)
    x = [[1.0, 2.0], [3.0, 6.0]]
    np.testing.assert_allclose(layer.forward(x), [[-1, -1], [1, 1]], atol=1e-7)
    assert layer.backward(np.ones((2, 2))).shape == (2, 2)


def test_eval_mode_uses_running_stats_and_changes_nothing():
    rng = np.random.default_rng(2)
    layer = bnorm.BatchNorm(4)
    layer.running_mean[:] = [1.0, -2.0, 0.5, 0.0]
    layer.running_var[:] = [4.0, 0.25, 1.0, 9.0]
    layer.gamma[:] = [1.0, 2.0, 3.0, 4.0]
    layer.beta[:] = [0.0, 1.0, -1.0, 2.0]
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    x = rng.standard_normal((10, 4)).astype(np.float32)
    y = layer.forward(x, training=False)
    _f32_close(y, _bn_numpy(x, layer.running_mean, layer.running_var, layer.gamma, layer.beta,
                            1e-8, -1), scale=10)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    # a batch of one works in eval mode and gives that row of the batch result (no batch stats)
    _f32_close(layer.forward(x[3:4], training=False), y[3:4], scale=10)
    # and it is not the training-mode (batch statistics) answer
    assert not np.allclose(layer.forward(x, training=True), y, atol=1e-2)


def test_tuple_num_features_with_axis_tuple():
    rng = np.random.default_rng(3)
    N, C, H, W = 4, 3, 5, 2
    x = rng.standard_normal((N, C, H, W)).astype(np.float32) * 2 + 1
    for axis in [(1, 3), (3, 1), (-3, -1)]:
        layer = bnorm.BatchNorm((C, W), axis=axis)      # F is in increasing axis order
        layer.gamma[:] = rng.uniform(0.5, 2, (C, W))
        layer.beta[:] = rng.standard_normal((C, W))
        y = layer.forward(x)
        m, v = mean_var(x, axis)
        assert m.shape == (C, W)
        _f32_close(y, _bn_numpy(x, m, v, layer.gamma, layer.beta, 1e-8, axis), scale=3)
        _f32_close(layer.running_mean, 0.1 * m)
        _f32_close(layer.running_var, 0.9 + 0.1 * v)
        dx = layer.backward(np.ones_like(x))
        assert dx.shape == x.shape and layer.dgamma.shape == (C, W)
        _f32_close(layer.dbeta, np.full((C, W), N * H))
    # NCHW with an int axis
    layer = bnorm.BatchNorm(C, axis=1)
    m, v = mean_var(x, 1)
    _f32_close(layer.forward(x), _bn_numpy(x, m, v, 1, 0, 1e-8, 1), scale=3)


def test_feature_shape_mismatch_raises():
    layer = bnorm.BatchNorm(4)
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"num_features=\(4,\)"):   # the layer's own message
        layer.forward(np.zeros((8, 5), np.float32))
    with pytest.raises(ValueError):
        bnorm.BatchNorm((3, 4), axis=(1, 2)).forward(np.zeros((2, 4, 3), np.float32))
    with pytest.raises(AxisError):
        bnorm.BatchNorm(4, axis=2).forward(np.zeros((8, 4), np.float32))
    with pytest.raises(AxisError):
        layer.forward(np.float32(1.0))
    with pytest.raises(TypeError):
        layer.forward(np.zeros((8, 4), np.int64))
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


# --------------------------------------------------------------------------- backward
def _loss_and_grad_fd(f, x, w, h=1e-6):
    """Central differences of sum(f(x) * w) w.r.t. every element of x (float64)."""
    g = np.empty_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (np.sum(f(xp) * w) - np.sum(f(xm) * w)) / (2 * h)
    return g


@pytest.mark.parametrize("training", [True, False])
def test_backward_is_the_gradient(training):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 3))
    w = rng.standard_normal((6, 3))            # loss = sum(y * w), so dy = w
    gamma, beta = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    rmean, rvar = rng.standard_normal(3), rng.uniform(0.5, 2, 3)

    def make():
        layer = bnorm.BatchNorm(3, dtype=np.float64)
        layer.gamma[:], layer.beta[:] = gamma, beta
        layer.running_mean[:], layer.running_var[:] = rmean, rvar
        return layer

    f = lambda xx: make().forward(xx, training=training)  # noqa: E731
    layer = make()
    layer.forward(x, training=training)
    dx = layer.backward(w)
    np.testing.assert_allclose(dx, _loss_and_grad_fd(f, x, w), rtol=1e-6, atol=1e-7)

    def f_gamma(g):
        lay = make()
        lay.gamma[:] = g
        return lay.forward(x, training=training)

    dgamma_fd = np.array([(np.sum(f_gamma(gamma + h) * w) - np.sum(f_gamma(gamma - h) * w)) / 2e-6
                          for h in np.eye(3) * 1e-6])
    np.testing.assert_allclose(layer.dgamma, dgamma_fd, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.dbeta, w.sum(0), rtol=1e-12)


def test_backward_before_forward_raises():
    layer = bnorm.BatchNorm(4)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.zeros((2, 4), np.float32))


def test_backward_shape_mismatch_raises():
    layer = bnorm.BatchNorm(4)
    layer.forward(np.random.default_rng(5).standard_normal((8, 4)).astype(np.float32))
    with pytest.raises(ValueError, match=r"forward.*\(8, 4\)"):   # names the saved x's shape
        layer.backward(np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError):
        layer.backward(np.zeros((8, 4, 1), np.float32))
    assert layer.dgamma is None      # nothing was set


def test_backward_uses_last_forward():
    rng = np.random.default_rng(6)
    x1 = rng.standard_normal((8, 4)).astype(np.float32)
    x2 = (5 * rng.standard_normal((12, 4)) - 3).astype(np.float32)
    dy = rng.standard_normal((12, 4)).astype(np.float32)
    a, b = bnorm.BatchNorm(4), bnorm.BatchNorm(4)
    a.forward(x1)
    a.forward(x2)
    b.forward(x2)
    np.testing.assert_array_equal(a.backward(dy), b.backward(dy))
    np.testing.assert_array_equal(a.dgamma, b.dgamma)
    # and it matches the post's layer on the same batch
    post = PostBatchNorm(4)
    post.forward(x2.astype(np.float64), 1.0, True)
    dx_post, dgamma_post = post.backward(dy.astype(np.float64))
    _f32_close(a.backward(dy), dx_post)
    _f32_close(a.dgamma, dgamma_post, scale=4)
    _f32_close(a.dbeta, dy.astype(np.float64).sum(0), scale=4)


def test_layer_keeps_x_by_reference_only():
    x = np.random.default_rng(7).standard_normal((64, 8)).astype(np.float32)
    layer = bnorm.BatchNorm(8)
    layer.forward(x)
    big = [v for v in vars(layer).values() if isinstance(v, np.ndarray) and v.size >= x.size]
    saved = [v for v in (layer._saved or ()) if isinstance(v, np.ndarray) and v.size >= x.size]
    assert big == []
    assert len(saved) == 1 and saved[0] is x


# --------------------------------------------------------------------------- affine=False
def test_affine_false():
    rng = np.random.default_rng(8)
    layer = bnorm.BatchNorm(3, affine=False)
    assert layer.gamma is None and layer.beta is None
    x = rng.standard_normal((10, 3)).astype(np.float32)
    m, v = mean_var(x, -1)
    _f32_close(layer.forward(x), _bn_numpy(x, m, v, 1, 0, 1e-8, -1))
    dy = rng.standard_normal((10, 3)).astype(np.float32)
    ref = bnorm.BatchNorm(3)                   # gamma = 1, beta = 0: same dx
    ref.forward(x)
    _f32_close(layer.backward(dy), ref.backward(dy))
    assert layer.dgamma is None and layer.dbeta is None
    sd = layer.state_dict()
    assert set(sd) == {"running_mean", "running_var", "num_batches_tracked"}
    with pytest.raises(ValueError, match="unexpected"):
        layer.load_state_dict(ref.state_dict())
    assert "affine=False" in repr(layer)


# --------------------------------------------------------------------------- state
def _trained_layer(rng, F=(5,), **kw):
    layer = bnorm.BatchNorm(F[0] if len(F) == 1 else F, **kw)
    layer.gamma[...] = rng.uniform(0.5, 2, F)
    layer.beta[...] = rng.standard_normal(F)
    for _ in range(3):
        layer.forward((rng.standard_normal((9,) + F) * 3 + 1).astype(np.float32))
    return layer


def test_state_dict_is_a_copy():
    layer = _trained_layer(np.random.default_rng(9))
    sd = layer.state_dict()
    assert set(sd) == {"gamma", "beta", "running_mean", "running_var", "num_batches_tracked"}
    assert sd["num_batches_tracked"].shape == () and sd["num_batches_tracked"] == 3
    for k, v in sd.items():
        np.testing.assert_array_equal(v, getattr(layer, k))
        assert not np.shares_memory(v, getattr(layer, k)), k
        v += 100                                   # does not reach the layer
        assert not np.array_equal(v, getattr(layer, k))


@pytest.mark.parametrize("F, axis", [((5,), -1), ((3, 2), (0, 2))])
def test_state_dict_round_trip_through_savez(tmp_path, F, axis):
    rng = np.random.default_rng(10)
    src = _trained_layer(rng, F, axis=-1 if len(F) == 1 else (-2, -1))
    path = tmp_path / "bn.npz"
    np.savez(path, **src.state_dict())
    dst = bnorm.BatchNorm(F[0] if len(F) == 1 else F, axis=axis)
    ids = {k: id(getattr(dst, k)) for k in ("gamma", "beta", "running_mean", "running_var")}
    with np.load(path) as d:
        dst.load_state_dict(d)
    for k in ids:
        assert id(getattr(dst, k)) == ids[k], f"{k} was replaced, not copied into"
        np.testing.assert_array_equal(getattr(dst, k), getattr(src, k), err_msg=k)
    # the restored layer infers like the original (features moved to dst's axes)
    x = rng.standard_normal((4, 7) + F).astype(np.float32)
    x_dst = x if len(F) == 1 else np.moveaxis(x, (2, 3), (0, 2))
    y_dst = dst.forward(x_dst, training=False)
    y_src = src.forward(x, training=False)
    np.testing.assert_array_equal(y_dst if len(F) == 1 else np.moveaxis(y_dst, (0, 2), (2, 3)),
                                  y_src)


def test_load_state_dict_validates_before_writing():
    rng = np.random.default_rng(11)
    layer = _trained_layer(rng)
    before = layer.state_dict()
    good = _trained_layer(rng).state_dict()
    bad_shape = dict(good, running_var=np.ones(6, np.float32))
    with pytest.raises(ValueError, match="running_var"):
        layer.load_state_dict(bad_shape)
    missing = {k: v for k, v in good.items() if k != "beta"}
    with pytest.raises(ValueError, match="beta"):
        layer.load_state_dict(missing)
    with pytest.raises(ValueError, match="extra"):
        layer.load_state_dict(dict(good, extra=np.zeros(5)))
    with pytest.raises(TypeError):
        layer.load_state_dict(dict(good, gamma=np.array(["a"] * 5)))
    for k, v in layer.state_dict().items():       # nothing was written by the failed loads
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    layer.load_state_dict(dict(good, extra=np.zeros(5)), strict=False)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, good[k], err_msg=k)
    # float64 values are cast into the float32 arrays (the count stays an integer)
    layer.load_state_dict({k: v.astype(np.float64) + 1 if v.dtype.kind == "f" else v
                           for k, v in good.items()})
    assert layer.gamma.dtype == np.float32
    np.testing.assert_allclose(layer.gamma, good["gamma"].astype(np.float64) + 1, rtol=1e-7)


@pytest.mark.parametrize("bad", [np.ones(5, bool), [True] * 5, np.ones(5, complex)],
                         ids=["bool", "bool_list", "complex"])
def test_load_state_dict_takes_real_numbers_only(bad):
    layer = _trained_layer(np.random.default_rng(12))
    before = layer.state_dict()
    good = {k: v + 1 for k, v in before.items()}
    with pytest.raises(TypeError, match="gamma"):
        layer.load_state_dict(dict(good, gamma=bad))
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    # integers are real numbers: cast like floats
    layer.load_state_dict(dict(good, gamma=np.arange(5)))
    np.testing.assert_array_equal(layer.gamma, np.arange(5, dtype=np.float32))


def test_repr_shows_configuration():
    r = repr(bnorm.BatchNorm(7))
    assert r.startswith("BatchNorm(7") and "axis=-1" in r and "eps=1e-08" in r
    assert "momentum=0.9" in r and "affine=True" in r and "float32" in r
    r = repr(bnorm.BatchNorm((3, 4), axis=(1, 3), eps=1e-5, momentum=0.99, affine=False,
                             dtype=np.float64))
    for part in ["(3, 4)", "axis=(1, 3)", "eps=1e-05", "momentum=0.99", "affine=False",
                 "float64"]:
        assert part in r, (part, r)


# --------------------------------------------------------------------------- training equivalence
class _PostBN:
    """The post's layer (no beta) plus a separate bias for beta: what a NumPy user has today."""

    def __init__(self, n, dtype):
        self.layer = PostBatchNorm(n, dtype=dtype)
        self.gamma, self.beta = np.ones(n, dtype), np.zeros(n, dtype)

    def forward(self, x, training=True):
        return self.layer.forward(x, self.gamma, training) + self.beta

    def backward(self, dy):
        dx, self.dgamma = self.layer.backward(dy)
        self.dbeta = dy.sum(0)
        # the post's dx is float64 for float32 input (its `/ N` with N a NumPy int64 promotes);
        # keep the network float32 as a user with a float32 model would
        return dx.astype(dy.dtype, copy=False)

    @property
    def running(self):
        return self.layer._mv_mean.val, self.layer._mv_var.val


class _BnormBN(bnorm.BatchNorm):
    def __init__(self, n, dtype):
        super().__init__(n, dtype=dtype)

    @property
    def running(self):
        return self.running_mean, self.running_var


def _mlp(make_bn, dtype, seed=0, sizes=(12, 16, 16, 4)):
    rng = np.random.default_rng(seed)
    Ws = [(rng.standard_normal((a, b)) * np.sqrt(2 / a)).astype(dtype)
          for a, b in zip(sizes[:-1], sizes[1:])]
    bns = [make_bn(n, dtype) for n in sizes[1:-1]]
    return Ws, np.zeros(sizes[-1], dtype), bns


def _mlp_forward(net, x, training):
    Ws, b, bns = net
    acts = [x]
    for W, bn in zip(Ws[:-1], bns):
        z = bn.forward(acts[-1] @ W, training=training)
        acts.append(np.maximum(z, 0))
    return acts, acts[-1] @ Ws[-1] + b


def _sgd_step(net, x, labels, lr):
    Ws, b, bns = net
    acts, logits = _mlp_forward(net, x, True)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = p
    g[np.arange(len(labels)), labels] -= 1
    g /= len(labels)
    dWs = [None] * len(Ws)
    dWs[-1], db = acts[-1].T @ g, g.sum(0)
    g = g @ Ws[-1].T
    for i in range(len(bns) - 1, -1, -1):
        g = g * (acts[i + 1] > 0)
        g = bns[i].backward(g)
        dWs[i] = acts[i].T @ g
        g = g @ Ws[i].T
    for W, dW in zip(Ws, dWs):
        W -= lr * dW
    b -= lr * db
    for bn in bns:
        bn.gamma -= lr * bn.dgamma
        bn.beta -= lr * bn.dbeta


def _params(net):
    Ws, b, bns = net
    out = list(Ws) + [b]
    for bn in bns:
        out += [bn.gamma, bn.beta, *bn.running]
    return out


def _train(make_bn, dtype, steps=10, lr=0.1):
    rng = np.random.default_rng(123)
    centers = rng.standard_normal((4, 12)) * 2
    net = _mlp(make_bn, dtype)
    for _ in range(steps):
        labels = rng.integers(0, 4, 32)
        x = (centers[labels] + rng.standard_normal((32, 12)) + 3).astype(dtype)
        _sgd_step(net, x, labels, lr)
    x_test = (centers[rng.integers(0, 4, 50)] + rng.standard_normal((50, 12)) + 3).astype(dtype)
    return net, x_test


def test_training_matches_post_layer():
    """A few SGD steps of a small MLP with the post's layer and with bnorm.BatchNorm, same seed.

    Tolerances:
    * float64: both layers compute the same formulas and differ only in rounding order, so after
      10 steps all parameters agree to ~1e-15; we ask 1e-10.  Any difference in the math (eps,
      momentum convention, biased vs unbiased running variance, dbeta, the dx formula) moves the
      parameters by >= 1e-6 in this set-up, so this is the test of "same math".
    * float32: per step the layers' outputs differ by a few float32 ulps (bnorm accumulates the
      statistics in float64, the post in float32); SGD with lr 0.1 over 10 steps of a well-
      conditioned 3-layer net amplifies that by a modest factor.  The reference for the size of
      rounding noise is the post's own float32 run against float64: bnorm's float32 run must be
      within 1e-5 relative of the post's float32 run (~100 ulps), and no farther from the float64
      answer than 4x the post's own float32 error plus 1e-6.  (Few steps on purpose: once a ReLU
      input within rounding of zero falls on different sides in two float32 runs, they drift
      apart by far more than rounding; examples/digits_mlp.py shows that after ~25 steps.)
    """
    post64, xt64 = _train(_PostBN, np.float64)
    bn64, _ = _train(_BnormBN, np.float64)
    for i, (a, b) in enumerate(zip(_params(post64), _params(bn64))):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-10, err_msg=f"param {i}")

    post32, xt32 = _train(_PostBN, np.float32)
    bn32, _ = _train(_BnormBN, np.float32)
    for i, (p64, p32, b32) in enumerate(zip(_params(post64), _params(post32), _params(bn32))):
        assert b32.dtype == np.float32, i
        np.testing.assert_allclose(b32, p32, rtol=1e-5, atol=1e-5, err_msg=f"param {i}")
        post_err = np.abs(p32 - p64).max()
        bn_err = np.abs(b32 - p64).max()
        assert bn_err <= 4 * post_err + 1e-6 * max(1.0, np.abs(p64).max()), (i, bn_err, post_err)

    # the parameters did move (the test would be vacuous otherwise)
    start = _mlp(_BnormBN, np.float32)
    assert max(np.abs(a - b).max() for a, b in zip(_params(start)[:3], _params(bn32)[:3])) > 1e-2

    # inference after training uses the running statistics, identically in both
    _, logits_post = _mlp_forward(post32, xt32, training=False)
    _, logits_bn = _mlp_forward(bn32, xt32, training=False)
    np.testing.assert_allclose(logits_bn, logits_post, rtol=1e-4, atol=1e-4)
    # ... computed from layer.running_mean / running_var (NumPy formula, float64)
    Ws, b, bns = bn32
    h = xt32.astype(np.float64)
    for W, bn in zip(Ws[:-1], bns):
        h = np.maximum(_bn_numpy(h @ W, bn.running_mean, bn.running_var, bn.gamma, bn.beta,
                                 1e-8, -1), 0)
    np.testing.assert_allclose(logits_bn, h @ Ws[-1] + b, rtol=1e-4, atol=1e-4)
    # ... so a sample's prediction does not depend on the rest of the batch
    _, one = _mlp_forward(bn32, xt32[:1], training=False)
    np.testing.assert_allclose(one, logits_bn[:1], rtol=1e-5, atol=1e-5)
    # ... and differs from using the batch statistics
    _, logits_batch = _mlp_forward(bn32, xt32, training=True)
    assert not np.allclose(logits_batch, logits_bn, atol=1e-3)
