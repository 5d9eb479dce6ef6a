"""Run by every rank under an MPI launcher: ``mpiexec -n 3 python tests/mpi/check_sync.py``.

Each rank holds a slice of one global batch (even, uneven and empty slices, split along a leading
or an inner batch axis) and runs ``bnorm.mpi.SyncBatchNorm`` on it; every rank also runs
single-process ``bnorm.BatchNorm`` on the whole batch (the reference).  Outputs, gradients
(dx, dgamma, dbeta) and running statistics must agree to float32/float64 rounding, over several
training steps (parameters updated from the layers' own gradients, the data's mean jumping by
thousands of standard deviations) and in eval mode; global results must be bit-identical on all
ranks.  The same with the conventions' keywords (``momentum=None``, ``running_var_ddof=1`` with
the global count, ``track_running_stats=False``) and ``num_batches_tracked``.  Also: the number
of Allreduce calls, bad input on one rank (errors, no hang, nothing modified), an empty global
batch, a global batch of one value per feature, NaN in one feature, ``allreduce_stats``,
``broadcast_state`` and ``SyncBatchNorm.from_torch`` (when torch is installed).

Prints one line per failed check and exits 1 on any mismatch on any rank (every rank exits 1);
an unexpected exception aborts the whole job (exit 2) rather than leaving the others hanging.
"""
import importlib.util
import sys
import traceback
from pathlib import Path

import numpy as np
from mpi4py import MPI

import bnorm
from bnorm.mpi import SyncBatchNorm, allreduce_stats

# tests/helpers.py: this script runs under mpiexec, where pytest does not put tests/ on the path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import (assert_layer_unchanged, axes_of, expand, fshape, layer_snapshot,  # noqa: E402
                     mean_var)

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
EPS = {np.dtype(t): np.finfo(t).eps for t in (np.float32, np.float64)}
EPS64 = np.finfo(np.float64).eps
# Allowed error, in units of the dtype's eps times the quantity's own scale and condition (see
# _tol).  The measured worst cases are reported at the end; they stay well below this.
K = 16.0

failures = []
checks = 0
worst = {}   # dtype name -> (largest err / tol seen, the check's name)


def fail(msg):
    failures.append(msg)
    print(f"[rank {RANK}/{SIZE}] FAIL {msg}", flush=True)


def check(name, got, want, tol, dtype):
    """``|got - want| <= tol`` elementwise (tol broadcast), NaN only where expected."""
    global checks
    checks += 1
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        fail(f"{name}: shape {got.shape} != expected {want.shape}")
        return
    nan_g, nan_w = np.isnan(got), np.isnan(want)
    if not np.array_equal(nan_g, nan_w):
        fail(f"{name}: NaN at {np.argwhere(nan_g != nan_w)[:3].tolist()} differs")
        return
    ok = ~nan_w
    err = np.abs(got - want)[ok]
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), got.shape)[ok]
    if err.size == 0:
        return
    ratio = float(np.max(err / np.maximum(tol, np.finfo(np.float64).tiny)))
    key = np.dtype(dtype).name
    if ratio > worst.get(key, (0.0, ""))[0]:
        worst[key] = (ratio, name)
    if not ratio <= 1.0:
        i = int(np.argmax(err / np.maximum(tol, 1e-300)))
        fail(f"{name}: max error {err[i]:.3g} > tolerance {tol[i]:.3g} (ratio {ratio:.3g})")


def same_on_all_ranks(name, a):
    """Global results must be bitwise identical on every rank."""
    global checks
    checks += 1
    a = np.ascontiguousarray(a)
    root = a.copy()
    COMM.Bcast(root, root=0)
    if not np.array_equal(a, root, equal_nan=True):
        fail(f"{name}: differs from rank 0's")


class CountingComm:
    """Forwards to a communicator and counts the Allreduce calls."""

    def __init__(self, comm):
        self.comm, self.allreduces = comm, 0

    def Allreduce(self, *args, **kwargs):
        self.allreduces += 1
        return self.comm.Allreduce(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.comm, name)


# --------------------------------------------------------------------------- batches and slices
def splits(n):
    """Row counts per rank for a global batch of ``n``: even, uneven with empty slices, skewed."""
    even = [len(a) for a in np.array_split(np.arange(n), SIZE)]
    out = [even]
    if SIZE == 2:
        out += [[0, n], [n - 1, 1], [n, 0]]
    elif SIZE == 3:
        out += [[5, 0, n - 5], [1, n - 3, 2], [0, 0, n]]
    else:
        out += [[0] * (SIZE - 1) + [n], [n - SIZE + 1] + [1] * (SIZE - 1)]
    return out


def my_slice(counts, split_axis, ndim):
    start = sum(counts[:RANK])
    idx = [slice(None)] * ndim
    idx[split_axis] = slice(start, start + counts[RANK])
    return tuple(idx)


def make_batch(rng, shape, axis, dtype, offsets, scales):
    """x with per-feature means ``offsets`` and standard deviations ``scales``; dy."""
    red, _ = axes_of(len(shape), axis)
    F = fshape(shape, axis)
    z = rng.standard_normal(shape)
    x = expand(offsets, red, F) + expand(scales, red, F) * z
    dy = rng.standard_normal(shape) * 0.5 + 0.1
    return x.astype(dtype), dy.astype(dtype)


# --------------------------------------------------------------------------- tolerances
def _cond(x, axis, mean, var):
    """Per-feature condition of batch norm on x: (max|x| + |mean|) / std (>= 1): the float error
    of x - mean (mean: the batch's or, in eval mode, the running one), relative to the spread, is
    about eps * cond."""
    red, _ = axes_of(x.ndim, axis)
    x64 = x.astype(np.float64)
    amax = np.abs(x64).max(axis=red) if x.size else np.zeros_like(mean)
    amax = amax + np.abs(np.asarray(mean, np.float64))
    return np.maximum(1.0, amax / np.sqrt(np.asarray(var, np.float64) + 1e-300))


def _tol(eps, cond, scale):
    """K times the output's rounding (``eps`` of its dtype) plus float64 rounding amplified by the
    conditioning (the statistics are float64 whatever the data's dtype), times the scale."""
    return K * (eps + EPS64 * cond) * scale


# --------------------------------------------------------------------------- the comparison
def run_case(label, shape, axis, split_axis, dtype, offsets, scales, counts, steps=3,
             layer_dtype=None, seed=0, independent=False, slack=1.0, jump=True, layer_kw=None):
    """``layer_kw``: more keywords for both layers (the conventions'), momentum 0.8 unless
    given."""
    dtype = np.dtype(dtype)
    layer_dtype = np.dtype(layer_dtype or dtype)
    eps = max(EPS[dtype], EPS[layer_dtype]) * slack
    ndim = len(shape)
    F = fshape(shape, axis)
    rng = np.random.default_rng(seed)     # the same global batches on every rank
    kw = {"momentum": 0.8, **(layer_kw or {})}
    ref = bnorm.BatchNorm(F, axis=axis, dtype=layer_dtype, **kw)
    comm = CountingComm(COMM)
    syn = SyncBatchNorm(comm, F, axis=axis, dtype=layer_dtype, **kw)
    tracked = ref.track_running_stats
    gamma0 = rng.uniform(0.5, 2.0, F)
    beta0 = rng.standard_normal(F)
    affine = ref.affine
    for layer in (ref, syn) if affine else ():
        layer.gamma[...] = gamma0
        layer.beta[...] = beta0
    sl = my_slice(counts, split_axis, ndim)
    lr = 0.05
    offsets = np.asarray(offsets, np.float64)
    prev_off = None
    for step in range(steps + 1):
        training = step < steps
        # the data's mean jumps at step 2 by thousands of standard deviations, and back at 3
        off = offsets + (3000.0 * (offsets != 0) if step == 2 and jump else 0.0)
        x, dy = make_batch(rng, shape, axis, dtype, off, np.asarray(scales, np.float64))
        tag = (f"{label} {dtype.name} counts={counts} step={step} training={training}"
               f"{' ' + repr(layer_kw) if layer_kw else ''}")
        uses_batch_stats = training or not tracked
        gamma_used = ref.gamma.copy() if affine else np.ones(F)
        beta_used = ref.beta.copy() if affine else np.zeros(F)
        n_before = comm.allreduces
        y_ref = ref.forward(x, training=training)
        y = syn.forward(x[sl], training=training)
        fwd_calls = comm.allreduces - n_before
        dx_ref = ref.backward(dy)
        dx = syn.backward(dy[sl])
        bwd_calls = comm.allreduces - n_before - fwd_calls

        # scales for the tolerances, per feature, from the reference's own numbers
        red, _ = axes_of(x.ndim, axis)
        x64 = x.astype(np.float64)
        if uses_batch_stats:
            mean, var = mean_var(x, axis)
        else:
            mean = ref.running_mean.astype(np.float64)
            var = ref.running_var.astype(np.float64)
        cond = _cond(x, axis, mean, var)
        rstd = 1.0 / np.sqrt(var + ref.eps)
        fv = lambda a: expand(a, red, F)
        xhat = (x64 - fv(mean)) * fv(rstd)
        y_scale = np.abs(gamma_used) * np.abs(xhat).max(axis=red) + np.abs(beta_used) + 1
        dy64 = dy.astype(np.float64)
        g_scale = np.abs(dy64 * xhat).sum(axis=red) + 1
        b_scale = np.abs(dy64).sum(axis=red) + 1
        dx_scale = np.abs(gamma_used) * rstd * (np.abs(dy64).max(axis=red)
                                                + (b_scale + g_scale * np.abs(xhat).max(axis=red))
                                                / max(1, x.size // max(1, int(np.prod(F)))))

        assert y.dtype == dx.dtype == dtype, (y.dtype, dx.dtype)
        check(f"y [{tag}]", y, y_ref[sl], fv(_tol(eps, cond, y_scale)), dtype)
        check(f"dx [{tag}]", dx, dx_ref[sl], fv(_tol(eps, cond, dx_scale)), dtype)
        if affine:
            check(f"dgamma [{tag}]", syn.dgamma, ref.dgamma, _tol(eps, cond, g_scale), dtype)
            check(f"dbeta [{tag}]", syn.dbeta, ref.dbeta, _tol(eps, 1.0, b_scale), dtype)
        elif syn.dgamma is not None or syn.dbeta is not None:
            fail(f"dgamma, dbeta of an affine=False layer are not None [{tag}]")
        global checks
        if tracked:
            rm_scale = np.abs(ref.running_mean.astype(np.float64)) + np.sqrt(var)
            check(f"running_mean [{tag}]", syn.running_mean, ref.running_mean,
                  _tol(eps, 1.0, rm_scale), dtype)
            check(f"running_var [{tag}]", syn.running_var, ref.running_var,
                  _tol(eps, cond, np.abs(ref.running_var.astype(np.float64))), dtype)
        checks += 1
        if (syn.num_batches_tracked != ref.num_batches_tracked
                or (syn.running_mean is None) != (ref.running_mean is None)):
            fail(f"num_batches_tracked / running stats [{tag}]: {syn.num_batches_tracked} "
                 f"(running_mean {type(syn.running_mean).__name__}), expected "
                 f"{ref.num_batches_tracked} ({type(ref.running_mean).__name__})")
        for name in ((("dgamma", "dbeta") if affine else ())
                     + (("running_mean", "running_var") if tracked else ())):
            same_on_all_ranks(f"{name} [{tag}]", getattr(syn, name))
        # Communication: no Allreduce in an eval forward with running statistics, one in a
        # forward with the batch's (two when the data's mean moved far from the last step's: the
        # first step on data far from zero and the jump at step 2), one in every backward.
        moved = (bool(np.any(np.abs(off) > 100 * np.asarray(scales))) if prev_off is None
                 else bool(np.any(off != prev_off)))
        allowed = {0} if not uses_batch_stats else ({1, 2} if moved else {1})
        prev_off = off
        checks += 1
        if fwd_calls not in allowed or bwd_calls != 1:
            fail(f"Allreduce calls [{tag}]: forward {fwd_calls} (expected {sorted(allowed)}), "
                 f"backward {bwd_calls} (expected 1)")
        if independent:   # an optimizer step, from each layer's own gradients
            for layer in (ref, syn) if affine else ():
                layer.gamma -= (lr * layer.dgamma).astype(layer.dtype)
                layer.beta -= (lr * layer.dbeta).astype(layer.dtype)
        else:
            # Each step starts from the same state, so that it is compared to rounding by itself
            # (last-bit differences of one step would otherwise be amplified by the next step's
            # conditioning); `independent=True` runs check the drift over several steps.
            if affine:
                ref.gamma -= (lr * ref.dgamma).astype(ref.dtype)
                ref.beta -= (lr * ref.dbeta).astype(ref.dtype)
            syn.load_state_dict(ref.state_dict())


def layout_cases(dtype):
    rng = np.random.default_rng(123)
    # Features near zero and far from it (1e4 / -3e3 std away) in the same batch, mixed scales.
    off5 = np.array([0.0, 1e4, -3e3, 1e6, 0.5])
    sc5 = np.array([1e-2, 2.0, 0.5, 1.0, 3.0])
    yield "(N,F) axis=-1", (37, 5), -1, 0, off5, sc5
    off6 = np.array([0.0, 1e4, 1.0, -50.0, 0.0, 2e3])
    sc6 = rng.uniform(0.5, 2.0, 6)
    yield "NHWC axis=-1", (11, 4, 3, 6), -1, 0, off6, sc6
    yield "NCHW axis=1", (11, 6, 4, 3), 1, 0, off6, sc6
    yield "NCHW axis=1 split along H", (3, 6, 13, 2), 1, 2, off6, sc6
    offCW = np.array([[0.0, 1e4], [2.0, -7e3], [0.0, 0.0]])
    scCW = np.array([[1.0, 1.0], [0.3, 2.0], [5.0, 1.0]])
    yield "axis=(1,3) F=(C,W)", (9, 3, 4, 2), (1, 3), 0, offCW, scCW


def test_layouts():
    for dtype in (np.float32, np.float64):
        for label, shape, axis, split_axis, off, sc in layout_cases(dtype):
            for counts in splits(shape[split_axis]):
                run_case(label, shape, axis, split_axis, dtype, off, sc, counts)
    # Several steps with each layer updated from its own gradients: the last-bit differences of
    # each step carry into the next (a looser tolerance), but nothing drifts away.  (No jump of
    # the data's mean here: the differences in gamma that ill-conditioned steps leave would be
    # measured against the tight tolerance of a well-conditioned one.)
    for dtype in (np.float32, np.float64):
        label, shape, axis, split_axis, off, sc = next(iter(layout_cases(dtype)))
        run_case(label + " independent", shape, axis, split_axis, dtype, off, sc,
                 splits(shape[split_axis])[1], steps=6, independent=True, slack=64.0,
                 jump=False)
    # float64 data through a float32 layer (y, dx float64; parameters and statistics float32)
    label, shape, axis, split_axis, off, sc = next(iter(layout_cases(np.float64)))
    run_case(label + " f64 data, f32 layer", shape, axis, split_axis, np.float64, off, sc,
             splits(shape[split_axis])[1], layer_dtype=np.float32)


def test_conventions():
    """momentum=None, running_var_ddof=1 (M: the global count), track_running_stats=False
    (the eval step normalizes with the global batch too, a collective) and the fused ReLU give
    what BatchNorm gives on the whole batch, on even, uneven and empty slices."""
    variants = [dict(momentum=None, running_var_ddof=1), dict(running_var_ddof=1),
                dict(track_running_stats=False), dict(track_running_stats=False, affine=False),
                dict(activation="relu"), dict(activation="relu", track_running_stats=False)]
    for dtype in (np.float32, np.float64):
        cases = list(layout_cases(dtype))
        for layer_kw in variants:
            for label, shape, axis, split_axis, off, sc in (cases[0], cases[2]):
                for counts in splits(shape[split_axis]):
                    run_case(label, shape, axis, split_axis, dtype, off, sc, counts,
                             layer_kw=layer_kw)
    # several steps of momentum=None from each layer's own state: the counts stay in step
    label, shape, axis, split_axis, off, sc = next(iter(layout_cases(np.float64)))
    run_case(label + " independent", shape, axis, split_axis, np.float64, off, sc,
             splits(shape[split_axis])[1], steps=6, independent=True, slack=64.0, jump=False,
             layer_kw=dict(momentum=None, running_var_ddof=1))


def test_one_value_per_feature_globally():
    """A global batch of one row (on one rank, the others empty): ValueError on every rank,
    collectively (all see the same count), nothing modified anywhere.  With
    track_running_stats=False inference raises too.  A rank holding one row of a larger global
    batch is fine."""
    F = 3
    holder = SIZE - 1
    x = np.full((1 if RANK == holder else 0, F), 2.0, np.float32)
    for kw in (dict(), dict(momentum=None, running_var_ddof=1),
               dict(track_running_stats=False)):
        layer = SyncBatchNorm(COMM, F, **kw)
        layer.forward(np.random.default_rng(RANK).standard_normal((4, F)).astype(np.float32))
        snap = layer_snapshot(layer)
        modes = (True, False) if not layer.track_running_stats else (True,)
        for training in modes:
            expect_raise(f"global count 1 {kw} training={training}",
                         lambda: layer.forward(x, training=training), ValueError)
            try:
                assert_layer_unchanged(layer, snap, f"global count 1 {kw}")
            except AssertionError as e:
                fail(str(e))
        # and the layer still works, with all ranks in step
        layer.forward(np.ones((2, F), np.float32) * np.arange(2, dtype=np.float32)[:, None])
        same_on_all_ranks(f"dgamma after global count 1 {kw}",
                          layer.backward(np.ones((2, F), np.float32)).sum(0))
    if SIZE > 1:   # one row on each rank: a global batch of SIZE rows trains
        layer = SyncBatchNorm(COMM, F, running_var_ddof=1, momentum=0.0, dtype=np.float64)
        rows = np.arange(SIZE * F, dtype=np.float64).reshape(SIZE, F) ** 2
        layer.forward(rows[RANK:RANK + 1])
        check("one row per rank, running_var (ddof 1, global M)", layer.running_var,
              rows.var(0, ddof=1), 1e-12 * rows.var(0, ddof=1), np.float64)


def test_from_torch():
    """SyncBatchNorm.from_torch(module, comm): the configuration and state BatchNorm.from_torch
    gives, over comm; a training step on a split batch equals BatchNorm's on the whole one."""
    if importlib.util.find_spec("torch") is None:
        return
    import torch
    module = torch.nn.SyncBatchNorm(4, momentum=None, eps=1e-3).double()
    with torch.no_grad():
        module.weight.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(1))
    syn = SyncBatchNorm.from_torch(module, comm=COMM)
    ref = bnorm.BatchNorm.from_torch(module)
    global checks
    checks += 1
    if repr(syn) != repr(ref).replace("BatchNorm(", f"SyncBatchNorm(<comm of {SIZE} ranks>, "):
        fail(f"from_torch: {syn!r} is not {ref!r} over comm")
    expect_raise("SyncBatchNorm.from_torch without comm",
                 lambda: SyncBatchNorm.from_torch(module), TypeError)
    x = 3 + np.random.default_rng(4).standard_normal((13, 4, 5))
    counts = splits(13)[1]
    y = syn.forward(x[my_slice(counts, 0, 3)])
    y_ref = ref.forward(x)
    check("from_torch y", y, y_ref[my_slice(counts, 0, 3)], 1e-12, np.float64)
    check("from_torch running_var", syn.running_var, ref.running_var, 1e-12, np.float64)
    check("from_torch count", syn.num_batches_tracked, 1, 0, np.float64)


# --------------------------------------------------------------------------- the rest
def expect_raise(name, fn, exc_types):
    global checks
    checks += 1
    try:
        fn()
    except exc_types:
        return True
    except Exception as exc:   # noqa: BLE001
        fail(f"{name}: raised {type(exc).__name__}: {exc} instead of {exc_types}")
        return False
    fail(f"{name}: did not raise {exc_types}")
    return False


def test_errors_do_not_hang():
    F = 4
    layer = SyncBatchNorm(COMM, F)
    layer.forward(np.random.default_rng(RANK).standard_normal((6, F)).astype(np.float32))
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    # one rank passes the wrong feature shape: it gets ValueError, the others RuntimeError
    bad_rank = SIZE - 1
    x = np.ones((3, F + 1 if RANK == bad_rank else F), np.float32)
    expect_raise("wrong shape on one rank", lambda: layer.forward(x),
                 ValueError if RANK == bad_rank else RuntimeError)
    # an integer array on one rank: TypeError there
    x = np.ones((3, F), np.int64 if RANK == 0 else np.float32)
    expect_raise("int dtype on one rank", lambda: layer.forward(x),
                 TypeError if RANK == 0 else RuntimeError)
    # nothing was modified
    for k, v in layer.state_dict().items():
        check(f"{k} unchanged after errors", v, before[k], 0.0, np.float32)
    # an empty global batch: ValueError on every rank
    expect_raise("empty global batch", lambda: layer.forward(np.zeros((0, F), np.float32)),
                 ValueError)
    # backward: dy of the wrong shape on rank 0
    layer.forward(np.random.default_rng(RANK).standard_normal((5, F)).astype(np.float32))
    dy = np.ones((4 if RANK == 0 else 5, F), np.float32)
    expect_raise("backward dy shape on one rank", lambda: layer.backward(dy),
                 ValueError if RANK == 0 else RuntimeError)
    # backward before forward on one rank
    fresh = SyncBatchNorm(COMM, F)
    if RANK != 0:
        fresh.forward(np.ones((2, F), np.float32), training=False)
    expect_raise("backward before forward on one rank",
                 lambda: fresh.backward(np.ones((2, F), np.float32)), RuntimeError)
    # and the layer still works afterwards, with all ranks in step
    y = layer.forward(np.full((2, F), float(RANK), np.float32))
    dx = layer.backward(np.ones_like(y))
    same_on_all_ranks("running_mean after errors", layer.running_mean)
    check("dx shape after errors", dx.shape, (2, F), 0, np.float32)


def test_configuration_is_checked_as_in_batchnorm():
    """SyncBatchNorm takes and rejects what BatchNorm (and bnorm.forward) does: eps a finite
    number >= 0 (eps=inf once gave y = beta), momentum in [0, 1], no bools, state dicts of real
    numbers."""
    F = 4
    bad = [(dict(eps=np.inf), ValueError), (dict(eps=np.nan), ValueError),
           (dict(eps=-1.0), ValueError), (dict(momentum=np.nan), ValueError),
           (dict(momentum=1.5), ValueError), (dict(eps=True), TypeError),
           (dict(momentum=np.True_), TypeError), (dict(momentum="0.9"), TypeError),
           (dict(running_var_ddof=2), ValueError), (dict(running_var_ddof=0.5), TypeError),
           (dict(track_running_stats=None), TypeError)]
    x = np.random.default_rng(RANK).standard_normal((6, F)).astype(np.float32)
    for name, make in both_layers(F).items():
        for kw, exc in bad:
            expect_raise(f"{name}({kw})", lambda: make(**kw), exc)
        # eps changed after construction: the forward checks it too (every rank fails alike)
        layer = make()
        layer.eps = np.inf
        expect_raise(f"{name} forward with eps=inf", lambda: layer.forward(x), ValueError)
        layer = make()
        good = {k: v + 1 for k, v in layer.state_dict().items()}
        expect_raise(f"{name}.load_state_dict of bools",
                     lambda: layer.load_state_dict(dict(good, gamma=np.ones(F, bool))), TypeError)
        for count, exc in [(True, TypeError), (2.0, TypeError), (-1, ValueError)]:
            expect_raise(f"{name}.load_state_dict num_batches_tracked={count!r}",
                         lambda: layer.load_state_dict(dict(good, num_batches_tracked=count)),
                         exc)
        check(f"{name} gamma after a failed load", layer.gamma, np.ones(F), 0.0, np.float32)
        check(f"{name} count after a failed load", layer.num_batches_tracked, 0, 0.0, np.float32)


def test_failed_running_update_changes_nothing():
    """A float16 running_var overflows for data of this spread (var ~1e8): an exception under
    np.errstate(over="raise"), after which neither running statistic may have changed (as in
    bnorm.forward)."""
    F = 4
    x = (1e4 * np.random.default_rng(RANK).standard_normal((6, F))).astype(np.float32)
    for name, make in both_layers(F).items():
        layer = make()
        layer.running_mean[...] = 0.5
        layer.running_var = np.ones(F, np.float16)
        with np.errstate(over="raise"):
            expect_raise(f"{name} running_var cast overflow", lambda: layer.forward(x),
                         FloatingPointError)
        check(f"{name} running_mean after a failed update", layer.running_mean,
              np.full(F, 0.5), 0.0, np.float32)
        check(f"{name} running_var after a failed update", layer.running_var, np.ones(F), 0.0,
              np.float32)


def both_layers(F):
    """Constructors of a BatchNorm and a SyncBatchNorm of F features, by name."""
    return {"BatchNorm": lambda **kw: bnorm.BatchNorm(F, **kw),
            "SyncBatchNorm": lambda **kw: SyncBatchNorm(COMM, F, **kw)}


def test_nan_stays_in_its_feature():
    F, N = 3, 17
    rng = np.random.default_rng(5)
    x = (1e3 + rng.standard_normal((N, F))).astype(np.float32)
    x[N - 1, 1] = np.nan                      # on the last rank's slice
    dy = rng.standard_normal((N, F)).astype(np.float32)
    counts = splits(N)[0]
    sl = my_slice(counts, 0, 2)
    ref, syn = bnorm.BatchNorm(F), SyncBatchNorm(COMM, F)
    y_ref, y = ref.forward(x), syn.forward(x[sl])
    dx_ref, dx = ref.backward(dy), syn.backward(dy[sl])
    tol = K * EPS[np.dtype(np.float32)] * 2e3
    check("NaN feature y", y, y_ref[sl], tol, np.float32)
    check("NaN feature dx", dx, dx_ref[sl], tol, np.float32)
    check("NaN feature running_var", syn.running_var, ref.running_var, tol, np.float32)
    check("NaN feature dgamma", syn.dgamma, ref.dgamma, tol * N, np.float32)
    # the next step (the shift of the NaN feature is reset, not NaN forever)
    x2 = (1e3 + rng.standard_normal((N, F))).astype(np.float32)
    check("after NaN, y", syn.forward(x2[sl]), ref.forward(x2)[sl], tol, np.float32)


def test_allreduce_stats_and_shift_mismatch():
    rng = np.random.default_rng(9)
    x = (5e4 + 3 * rng.standard_normal((29, 4)))
    counts = splits(29)[1]
    part = x[my_slice(counts, 0, 2)]
    n, mean, m2 = allreduce_stats(COMM, *bnorm.batch_stats(part))
    check("allreduce_stats count", n, 29, 0, np.float64)
    check("allreduce_stats mean", mean, x.mean(0), K * EPS[np.dtype(np.float64)] * 5e4,
          np.float64)
    check("allreduce_stats m2", m2, 29 * x.var(0),
          K * EPS[np.dtype(np.float64)] * 29 * 9 * 2e4, np.float64)
    # different shifts on different ranks cannot corrupt the result
    _, mean2, m22 = allreduce_stats(COMM, *bnorm.batch_stats(part), shift=np.full(4, RANK * 7.0))
    check("shift mismatch mean", mean2, x.mean(0), K * EPS[np.dtype(np.float64)] * 5e4,
          np.float64)
    check("shift mismatch m2", m22, 29 * x.var(0), K * EPS[np.dtype(np.float64)] * 29 * 9 * 2e4,
          np.float64)
    # all ranks empty
    n0, mean0, _ = allreduce_stats(COMM, 0, np.zeros(4), np.zeros(4))
    check("allreduce_stats empty", n0, 0, 0, np.float64)
    if mean0 is not None:
        fail("allreduce_stats of an empty batch: mean is not None")
    # a layer whose internal shift differs on one rank still gives the reference's answer
    ref, syn = bnorm.BatchNorm(4, dtype=np.float64), SyncBatchNorm(COMM, 4, dtype=np.float64)
    if RANK == 0:
        syn._shift = np.full(4, 123.0)
    y_ref, y = ref.forward(x), syn.forward(part)
    check("shift mismatch layer y", y, y_ref[my_slice(counts, 0, 2)],
          K * EPS[np.dtype(np.float64)] * 2e4, np.float64)


def test_broadcast_state():
    layer = SyncBatchNorm(COMM, (2, 3), axis=(1, 2))
    layer.gamma[...] = RANK + 1.0
    layer.running_var[...] = 10.0 * (RANK + 1)
    layer.num_batches_tracked = 5 + RANK
    layer.broadcast_state(root=0)
    check("broadcast gamma", layer.gamma, np.ones((2, 3)), 0, np.float32)
    check("broadcast running_var", layer.running_var, np.full((2, 3), 10.0), 0, np.float32)
    check("broadcast num_batches_tracked", layer.num_batches_tracked, 5, 0, np.float32)
    untracked = SyncBatchNorm(COMM, 3, track_running_stats=False)
    untracked.beta[...] = RANK
    untracked.broadcast_state(root=SIZE - 1)
    check("broadcast without running stats", untracked.beta, np.full(3, SIZE - 1.0), 0,
          np.float32)
    r = repr(layer)
    global checks
    checks += 1
    if not r.startswith("SyncBatchNorm(") or isinstance(layer, bnorm.BatchNorm) is False:
        fail(f"repr/isinstance: {r}")
    y = layer(np.ones((2, 2, 3), np.float32))     # __call__ is SyncBatchNorm.forward
    if not np.all(y == 0):
        fail("layer(x) is not SyncBatchNorm.forward")


def main():
    expected = int(sys.argv[1]) if len(sys.argv) > 1 else None
    if expected is not None and SIZE != expected:
        # e.g. an mpiexec of another MPI than the one mpi4py loaded: every rank a singleton
        print(f"check_sync: launched for {expected} ranks but COMM_WORLD has {SIZE} "
              f"(mpiexec and mpi4py's MPI library do not match?)", flush=True)
        return 3
    bnorm.set_num_threads(1)
    try:
        test_layouts()
        test_conventions()
        test_one_value_per_feature_globally()
        test_from_torch()
        test_errors_do_not_hang()
        test_configuration_is_checked_as_in_batchnorm()
        test_failed_running_update_changes_nothing()
        test_nan_stays_in_its_feature()
        test_allreduce_stats_and_shift_mismatch()
        test_broadcast_state()
    except Exception:   # a bug, not a mismatch: stop every rank instead of hanging
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        COMM.Abort(2)
    total_failures = COMM.allreduce(len(failures), op=MPI.SUM)
    total_checks = COMM.allreduce(checks, op=MPI.SUM)
    all_worst = COMM.gather(worst, root=0)
    if RANK == 0:
        w = {}
        for d in all_worst:
            for k, v in d.items():
                w[k] = max(w.get(k, v), v)
        shown = "; ".join(f"{k} {r:.3f} ({n})" for k, (r, n) in sorted(w.items()))
        lib = " ".join(MPI.Get_library_version().splitlines()[0].split(",")[0].split())
        print(f"check_sync: {SIZE} ranks ({lib}), "
              f"{total_checks} checks, {total_failures} failed; worst error/tolerance: {shown}",
              flush=True)
    return 1 if total_failures else 0


if __name__ == "__main__":
    sys.exit(main())
