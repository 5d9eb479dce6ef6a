"""The layer's conventions from other frameworks (docs/api.md, "Conventions users bring from other
frameworks"): ``momentum=None``, ``track_running_stats``, ``running_var_ddof`` and
``num_batches_tracked`` on ``bnorm.BatchNorm``; ``BatchNorm.from_torch`` and
``torch_state_dict``.

Expected values come from PyTorch itself (its modules, trained step by step with autograd: the
tests that need torch skip without it, and only those), from the float64 oracle of
tests/helpers.py, or from NumPy; never from bnorm's own output.  ``SyncBatchNorm``'s side of the
same keywords is checked under MPI in tests/mpi/check_sync.py.

Tolerances against PyTorch: float64 modules ``TOL64`` (two correct float64 computations differ by
summation order only); float32 modules ``2 * TOL32``, since each of the two float32 results is
within ``TOL32`` of the exact one (measured: about 2e-7, normwise).
"""
import subprocess
import sys

import numpy as np
import pytest
from helpers import (BNORM_PARENT, TOL32, TOL64, assert_close, assert_layer_unchanged,
                     child_env, layer_snapshot, mean_var, oracle_backward, oracle_forward)

import bnorm


def _torch():
    return pytest.importorskip("torch")


# --------------------------------------------------------------------------- against PyTorch
def _torch_module(torch, kind, C, dtype, **kw):
    module = getattr(torch.nn, kind)(C, **kw).to(dtype)
    if module.affine:   # not PyTorch's ones and zeros: a wrong gamma or beta must show
        gen = torch.Generator().manual_seed(C)
        with torch.no_grad():
            module.weight.copy_(torch.rand(C, generator=gen, dtype=dtype) * 1.5 + 0.5)
            module.bias.copy_(torch.randn(C, generator=gen, dtype=dtype))
    return module


def _torch_step(torch, module, x, dy):
    """``module``'s output, input gradient (autograd, upstream gradient ``dy``) and parameter
    gradients, as NumPy arrays."""
    xt = torch.tensor(x, requires_grad=True)
    yt = module(xt)
    yt.backward(torch.tensor(dy))
    grads = [None, None]
    if module.affine:
        grads = [module.weight.grad.numpy().copy(), module.bias.grad.numpy().copy()]
        module.weight.grad = module.bias.grad = None
    return yt.detach().numpy(), xt.grad.numpy(), grads[0], grads[1]


def _compare_with_torch(torch, module, layer, shape, modes, dtype, tol, seed=0, lr=0.1):
    """Run ``module`` and ``layer`` side by side on ``dtype`` data: for each mode (True:
    training, False: eval), a fresh batch, forward, backward with a random upstream gradient,
    then an SGD step of the parameters from each one's own gradients.  Everything observable
    must agree at every step."""
    rng = np.random.default_rng(seed)
    C = shape[1]
    offsets = rng.uniform(-3, 3, C).reshape((1, C) + (1,) * (len(shape) - 2))
    for step, training in enumerate(modes):
        what = f"step {step} ({'train' if training else 'eval'})"
        x = (offsets + rng.uniform(0.5, 2) * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        module.train(training)
        y_t, dx_t, dw_t, db_t = _torch_step(torch, module, x, dy)
        y = layer.forward(x, training=training)
        dx = layer.backward(dy)
        assert y.dtype == dx.dtype == dtype, what
        assert_close(y, y_t, tol, f"y, {what}")
        assert_close(dx, dx_t, tol, f"dx, {what}")
        if module.affine:
            assert_close(layer.dgamma, dw_t, tol, f"dgamma, {what}")
            assert_close(layer.dbeta, db_t, tol, f"dbeta, {what}")
            with torch.no_grad():
                module.weight -= lr * torch.from_numpy(dw_t)
                module.bias -= lr * torch.from_numpy(db_t)
            layer.gamma -= (lr * layer.dgamma).astype(layer.dtype)
            layer.beta -= (lr * layer.dbeta).astype(layer.dtype)
        else:
            assert layer.dgamma is None and layer.dbeta is None
        if module.track_running_stats:
            assert_close(layer.running_mean, module.running_mean.numpy(), tol,
                         f"running_mean, {what}")
            assert_close(layer.running_var, module.running_var.numpy(), tol,
                         f"running_var, {what}")
            assert layer.num_batches_tracked == int(module.num_batches_tracked), what
        else:
            assert layer.running_mean is None and layer.running_var is None
            assert layer.num_batches_tracked is None and module.num_batches_tracked is None


TRAIN_EVAL = [True, True, True, False, True, False, True]

# (module class, input shape, module keywords)
TORCH_CASES = {
    "2d momentum 0.1": ("BatchNorm2d", (6, 4, 5, 3), dict(momentum=0.1)),
    "2d momentum None": ("BatchNorm2d", (6, 4, 5, 3), dict(momentum=None)),
    "2d momentum 0.3 eps 1e-3": ("BatchNorm2d", (5, 3, 4, 4), dict(momentum=0.3, eps=1e-3)),
    "2d no running stats": ("BatchNorm2d", (6, 4, 5, 3), dict(track_running_stats=False)),
    "2d affine=False": ("BatchNorm2d", (6, 4, 5, 3), dict(affine=False)),
    "2d affine=False, no running stats": ("BatchNorm2d", (4, 3, 2, 5),
                                          dict(affine=False, track_running_stats=False)),
    "1d (N, C)": ("BatchNorm1d", (16, 7), dict()),
    "1d (N, C, L) momentum None": ("BatchNorm1d", (5, 6, 9), dict(momentum=None)),
    "3d": ("BatchNorm3d", (3, 4, 3, 5, 2), dict(momentum=0.2)),
    "SyncBatchNorm (one process)": ("SyncBatchNorm", (6, 3, 7), dict()),
}


@pytest.mark.parametrize("case", TORCH_CASES)
def test_from_torch_trains_like_torch_float64(case):
    torch = _torch()
    kind, shape, kw = TORCH_CASES[case]
    module = _torch_module(torch, kind, shape[1], torch.float64, **kw)
    layer = bnorm.BatchNorm.from_torch(module)
    holds_state = module.affine or module.track_running_stats   # (else bnorm's default dtype)
    assert layer.dtype == (np.float64 if holds_state else np.float32)
    assert layer.axis == 1 and layer.running_var_ddof == 1
    _compare_with_torch(torch, module, layer, shape, TRAIN_EVAL, np.float64, TOL64)


@pytest.mark.parametrize("case", ["2d momentum 0.1", "2d momentum None", "2d no running stats"])
def test_from_torch_trains_like_torch_float32(case):
    torch = _torch()
    kind, _, kw = TORCH_CASES[case]
    shape = (16, 8, 6, 5)   # larger than the float64 cases': rounding errors have room to grow
    module = _torch_module(torch, kind, shape[1], torch.float32, **kw)
    layer = bnorm.BatchNorm.from_torch(module)
    assert layer.dtype == np.float32
    _compare_with_torch(torch, module, layer, shape, TRAIN_EVAL, np.float32, 2 * TOL32, seed=1)


def test_from_torch_copies_configuration_and_state():
    torch = _torch()
    module = _torch_module(torch, "BatchNorm2d", 5, torch.float64, eps=1e-3, momentum=0.25)
    module(torch.randn(4, 5, 3, 3, dtype=torch.float64))   # running stats and count move
    module(torch.randn(4, 5, 3, 3, dtype=torch.float64))
    layer = bnorm.BatchNorm.from_torch(module)
    assert layer.num_features == (5,) and layer.axis == 1 and layer.eps == 1e-3
    assert layer.momentum == 1 - 0.25 and layer.affine and layer.track_running_stats
    assert layer.num_batches_tracked == 2 and type(layer.num_batches_tracked) is int
    for ours, theirs in [("gamma", "weight"), ("beta", "bias"), ("running_mean", "running_mean"),
                         ("running_var", "running_var")]:
        t = getattr(module, theirs).detach().numpy()
        np.testing.assert_array_equal(getattr(layer, ours), t, err_msg=ours)
        assert not np.shares_memory(getattr(layer, ours), t), f"{ours} shares the module's memory"
    with torch.no_grad():   # the module changing later does not reach the layer
        module.weight += 1
    assert not np.array_equal(layer.gamma, module.weight.detach().numpy())
    # momentum None stays None; affine / tracking as the module's
    plain = torch.nn.BatchNorm1d(3, momentum=None, affine=False, track_running_stats=False)
    layer = bnorm.BatchNorm.from_torch(plain)
    assert layer.momentum is None and not layer.affine and not layer.track_running_stats
    assert layer.gamma is None and layer.running_mean is None and layer.dtype == np.float32


@pytest.mark.parametrize("case", ["2d momentum 0.1", "2d momentum None", "2d affine=False",
                                  "2d no running stats", "1d (N, C)"])
def test_torch_state_dict_loads_into_a_fresh_module(case):
    torch = _torch()
    kind, shape, kw = TORCH_CASES[case]
    module = _torch_module(torch, kind, shape[1], torch.float64, **kw)
    layer = bnorm.BatchNorm.from_torch(module)
    rng = np.random.default_rng(7)
    for _ in range(3):   # running statistics and the count away from their initial values
        layer.forward(2 + 3 * rng.standard_normal(shape))
        if layer.affine:
            layer.gamma *= 1.5
            layer.beta += 0.5
    state = layer.torch_state_dict()
    assert all(type(v) is np.ndarray for v in state.values())
    fresh = getattr(torch.nn, kind)(shape[1], **kw).double()
    assert set(state) == set(fresh.state_dict())   # exactly the module's keys
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})   # strict
    if layer.track_running_stats:
        assert state["num_batches_tracked"].dtype == np.int64
        assert state["num_batches_tracked"].shape == () and int(fresh.num_batches_tracked) == 3
    # the same outputs, and the same next steps (with momentum=None the count matters)
    x = 1 + 2 * rng.standard_normal(shape)
    fresh.eval()
    np.testing.assert_allclose(fresh(torch.from_numpy(x)).detach().numpy(),
                               layer.forward(x, training=False), rtol=TOL64, atol=TOL64)
    _compare_with_torch(torch, fresh, layer, shape, [True, True, False], np.float64, TOL64,
                        seed=8)


@pytest.mark.parametrize("module", ["Linear", "LayerNorm", "InstanceNorm2d", "GroupNorm",
                                    "Sequential", "not a module"])
def test_from_torch_rejects_other_modules(module):
    torch = _torch()
    made = {"Linear": lambda: torch.nn.Linear(3, 3), "LayerNorm": lambda: torch.nn.LayerNorm(3),
            # a _NormBase with running statistics, but instance norm: not ours to imitate
            "InstanceNorm2d": lambda: torch.nn.InstanceNorm2d(3, track_running_stats=True),
            "GroupNorm": lambda: torch.nn.GroupNorm(1, 3),
            "Sequential": lambda: torch.nn.Sequential(torch.nn.BatchNorm2d(3)),
            "not a module": lambda: {"weight": np.ones(3)}}[module]()
    with pytest.raises(TypeError, match=type(made).__name__):
        bnorm.BatchNorm.from_torch(made)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_from_torch_rejects_half_modules(dtype):
    torch = _torch()
    module = torch.nn.BatchNorm2d(3).to(getattr(torch, dtype))
    with pytest.raises(TypeError, match=dtype):
        bnorm.BatchNorm.from_torch(module)
    no_params = torch.nn.BatchNorm2d(3, affine=False).to(getattr(torch, dtype))
    with pytest.raises(TypeError, match=dtype):   # its running statistics are half too
        bnorm.BatchNorm.from_torch(no_params)


def test_torch_state_dict_of_several_feature_axes_raises():
    layer = bnorm.BatchNorm((3, 4), axis=(1, 2))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        layer.torch_state_dict()


def test_import_bnorm_does_not_import_torch():
    """torch is imported by from_torch only: not by ``import bnorm``, nor by the layer's other
    calls (torch_state_dict included, which returns NumPy arrays)."""
    code = ("import sys, numpy as np, bnorm\n"
            "assert 'torch' not in sys.modules, 'import bnorm imported torch'\n"
            "layer = bnorm.BatchNorm(3, momentum=None, running_var_ddof=1)\n"
            "layer.forward(np.ones((4, 3)) * np.arange(4)[:, None])\n"
            "layer.backward(np.ones((4, 3)))\n"
            "layer.load_state_dict(layer.state_dict())\n"
            "d = layer.torch_state_dict()\n"
            "assert 'torch' not in sys.modules, 'the layer imported torch'\n"
            "print('ok')\n")
    # from the bnorm under test's parent: a source tree in the working directory would shadow it
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=child_env(), cwd=BNORM_PARENT, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


# --------------------------------------------------------------------------- momentum=None
def test_momentum_none_is_the_mean_of_all_batches():
    """PyTorch's cumulative moving average: after n training batches the running statistics are
    the plain mean of the n batch statistics; the first batch replaces the initial values."""
    rng = np.random.default_rng(1)
    layer = bnorm.BatchNorm(4, momentum=None, dtype=np.float64)
    layer.running_mean[:] = 100.0   # replaced by the first batch, not averaged with it
    layer.running_var[:] = 100.0
    means, vars_ = [], []
    for n in range(1, 8):
        x = rng.uniform(-5, 5, 4) + rng.uniform(0.5, 3) * rng.standard_normal((9, 4))
        layer.forward(x)
        if n % 3 == 0:   # inference forwards do not count
            layer.forward(x + 50, training=False)
        m, v = mean_var(x, -1)
        means.append(m)
        vars_.append(v)
        assert layer.num_batches_tracked == n
        np.testing.assert_allclose(layer.running_mean, np.mean(means, 0), rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(layer.running_var, np.mean(vars_, 0), rtol=1e-13)


def test_momentum_none_continues_from_a_loaded_count():
    """The count decides the next batch's weight: a layer loaded with count 4 gives the next
    batch weight 1/5."""
    rng = np.random.default_rng(2)
    layer = bnorm.BatchNorm(3, momentum=None, running_var_ddof=1, dtype=np.float64)
    state = dict(layer.state_dict(), running_mean=np.array([1.0, 2.0, 3.0]),
                 running_var=np.array([4.0, 5.0, 6.0]), num_batches_tracked=np.int64(4))
    layer.load_state_dict(state)
    x = rng.standard_normal((6, 3))
    layer.forward(x)
    _, _, _, rm, rv = oracle_forward(x, running_mean=state["running_mean"],
                                     running_var=state["running_var"], momentum=1 - 1 / 5,
                                     running_var_ddof=1)
    np.testing.assert_allclose(layer.running_mean, rm, rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, rv, rtol=1e-13)
    assert layer.num_batches_tracked == 5


@pytest.mark.parametrize("momentum", [0.9, 0.0, 1.0, None])
def test_num_batches_tracked_counts_training_forwards(momentum):
    layer = bnorm.BatchNorm(2, momentum=momentum)
    assert layer.num_batches_tracked == 0
    x = np.arange(8.0).reshape(4, 2)
    for n in range(1, 4):
        layer.forward(x)
        layer.forward(x, training=False)
        layer.backward(x)
        assert layer.num_batches_tracked == n and type(layer.num_batches_tracked) is int
    assert layer.state_dict()["num_batches_tracked"] == 3


# --------------------------------------------------------------------------- running_var_ddof
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("shape, axis", [((7, 3), -1), ((2, 3, 4, 5), 1)])
def test_running_var_ddof(ddof, shape, axis):
    rng = np.random.default_rng(3)
    F = 3
    layer = bnorm.BatchNorm(F, axis=axis, momentum=0.6, running_var_ddof=ddof,
                            dtype=np.float64)
    rm, rv = np.zeros(F), np.ones(F)
    for _ in range(3):
        x = 4 + 2 * rng.standard_normal(shape)
        y = layer.forward(x)
        y_exp, _, _, rm, rv = oracle_forward(x, np.ones(F), np.zeros(F), axis, 1e-8,
                                             running_mean=rm, running_var=rv, momentum=0.6,
                                             running_var_ddof=ddof)
        assert_close(y, y_exp, TOL64, "y: the biased variance normalizes, whatever the ddof")
        assert_close(layer.running_mean, rm, TOL64, "running_mean")
        assert_close(layer.running_var, rv, TOL64, "running_var")


# --------------------------------------------------------------------------- no running stats
@pytest.mark.parametrize("shape, axis", [((9, 4), -1), ((3, 4, 2, 5), 1)])
def test_without_running_stats_both_modes_use_the_batch(shape, axis):
    rng = np.random.default_rng(4)
    layer = bnorm.BatchNorm(4, axis=axis, track_running_stats=False, dtype=np.float64)
    assert layer.running_mean is None and layer.running_var is None
    assert layer.num_batches_tracked is None
    assert set(layer.state_dict()) == {"gamma", "beta"}
    layer.gamma[:] = rng.uniform(0.5, 2, 4)
    layer.beta[:] = rng.standard_normal(4)
    for training in (True, False, False, True):
        x = 3 + rng.standard_normal(shape)
        dy = rng.standard_normal(shape)
        y = layer.forward(x, training=training)
        y_exp, mean, rstd, _, _ = oracle_forward(x, layer.gamma, layer.beta, axis, 1e-8)
        assert_close(y, y_exp, TOL64, f"y, training={training}")
        # the statistics depend on x in both modes: the training-mode gradient (as PyTorch)
        dx = layer.backward(dy)
        dx_exp, dg_exp, db_exp = oracle_backward(dy, x, mean, rstd, layer.gamma, axis,
                                                 training=True)
        assert_close(dx, dx_exp, TOL64, f"dx, training={training}")
        assert_close(layer.dgamma, dg_exp, TOL64, "dgamma")
        assert_close(layer.dbeta, db_exp, TOL64, "dbeta")
    assert layer.running_mean is None and layer.num_batches_tracked is None
    assert "track_running_stats=False" in repr(layer)


def test_without_running_stats_inference_needs_two_values_per_feature():
    layer = bnorm.BatchNorm(3, track_running_stats=False)
    layer.forward(np.random.default_rng(5).standard_normal((4, 3)).astype(np.float32))
    snap = layer_snapshot(layer)
    for training in (True, False):
        with pytest.raises(ValueError, match=r"\(1, 3\)"):
            layer.forward(np.ones((1, 3), np.float32), training=training)
        assert_layer_unchanged(layer, snap, f"training={training}")


def test_without_running_stats_state_dict():
    layer = bnorm.BatchNorm(3, track_running_stats=False)
    full = bnorm.BatchNorm(3).state_dict()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        layer.load_state_dict(full)
    layer.load_state_dict(dict(full, gamma=np.full(3, 2.0)), strict=False)
    np.testing.assert_array_equal(layer.gamma, 2.0)
    assert layer.running_mean is None and layer.num_batches_tracked is None
    # and the other way: a layer with running statistics misses them
    with pytest.raises(ValueError, match="running_mean"):
        bnorm.BatchNorm(3).load_state_dict(layer.state_dict())


# --------------------------------------------------------------------------- one value per feature
@pytest.mark.parametrize("kw", [dict(), dict(momentum=None), dict(running_var_ddof=1)])
def test_training_with_one_value_per_feature_raises_untouched(kw):
    layer = bnorm.BatchNorm(3, axis=1, **kw)
    layer.forward(np.random.default_rng(6).standard_normal((4, 3, 2)).astype(np.float32))
    snap = layer_snapshot(layer)
    with pytest.raises(ValueError, match=r"\(1, 3, 1\)"):   # names x's shape
        layer.forward(np.ones((1, 3, 1), np.float32))
    assert_layer_unchanged(layer, snap)
    assert layer.forward(np.ones((1, 3, 1), np.float32), training=False).shape == (1, 3, 1)


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kw, exc", [
    (dict(momentum="0.9"), TypeError), (dict(momentum=True), TypeError),
    (dict(momentum=[0.9]), TypeError), (dict(momentum=1.5), ValueError),
    (dict(momentum=-0.1), ValueError), (dict(momentum=np.nan), ValueError),
    (dict(track_running_stats=None), TypeError), (dict(track_running_stats="no"), TypeError),
    (dict(track_running_stats=1), TypeError),
    (dict(running_var_ddof=0.5), TypeError), (dict(running_var_ddof="1"), TypeError),
    (dict(running_var_ddof=None), TypeError), (dict(running_var_ddof=np.float64(1)), TypeError),
    (dict(running_var_ddof=2), ValueError), (dict(running_var_ddof=-1), ValueError),
    (dict(running_var_ddof=2**70), ValueError),
], ids=repr)
def test_bad_new_keywords(kw, exc):
    name = next(iter(kw))
    with pytest.raises(exc, match=name):
        bnorm.BatchNorm(3, **kw)


def test_good_new_keywords():
    layer = bnorm.BatchNorm(3, momentum=None, track_running_stats=np.False_,
                            running_var_ddof=np.int64(1))
    assert layer.momentum is None and layer.track_running_stats is False
    assert layer.running_var_ddof == 1 and type(layer.running_var_ddof) is int
    r = repr(layer)
    for part in ["momentum=None", "track_running_stats=False", "running_var_ddof=1"]:
        assert part in r, (part, r)
    # as bnorm.forward (and NumPy's ddof): True is the integer 1
    assert bnorm.BatchNorm(3, running_var_ddof=True).running_var_ddof == 1


@pytest.mark.parametrize("count, exc", [
    (True, TypeError), (np.True_, TypeError), (3.0, TypeError), (np.float64(3), TypeError),
    ("3", TypeError), (None, TypeError), (-1, ValueError), (np.int64(-5), ValueError),
    (np.array([3]), ValueError), (np.arange(2), ValueError),
], ids=repr)
def test_load_state_dict_bad_num_batches_tracked(count, exc):
    rng = np.random.default_rng(9)
    layer = bnorm.BatchNorm(3)
    layer.forward(rng.standard_normal((5, 3)).astype(np.float32))
    snap = layer_snapshot(layer)
    good = {k: v + 1 for k, v in layer.state_dict().items()}   # every entry would change
    with pytest.raises(exc, match="num_batches_tracked"):
        layer.load_state_dict(dict(good, num_batches_tracked=count))
    assert_layer_unchanged(layer, snap)


@pytest.mark.parametrize("count", [0, 7, np.int32(7), np.uint8(7), np.array(7), 2**40])
def test_load_state_dict_num_batches_tracked(count, tmp_path):
    layer = bnorm.BatchNorm(3)
    layer.load_state_dict(dict(layer.state_dict(), num_batches_tracked=count))
    assert layer.num_batches_tracked == int(count)
    assert type(layer.num_batches_tracked) is int
    # through np.savez / np.load: a 0-d int64 array and back
    np.savez(tmp_path / "bn.npz", **layer.state_dict())
    other = bnorm.BatchNorm(3)
    with np.load(tmp_path / "bn.npz") as d:
        other.load_state_dict(d)
    assert other.num_batches_tracked == int(count)


def test_load_state_dict_without_num_batches_tracked_keeps_the_count():
    """bnorm 0.1's state dicts have no count: they load (strict too), the count unchanged."""
    layer = bnorm.BatchNorm(3, momentum=None)
    layer.forward(np.arange(12.0).reshape(4, 3))
    old = {k: np.full(3, 2.0) for k in ("gamma", "beta", "running_mean", "running_var")}
    layer.load_state_dict(old, strict=True)
    np.testing.assert_array_equal(layer.running_var, 2.0)
    assert layer.num_batches_tracked == 1
