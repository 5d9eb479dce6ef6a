"""Hardening: leaks, threads, arrays of more than 2**31 elements, and fuzzed arguments.

* Leaks: every public function, on valid input and on every error path of csrc/module.c, called
  many times: the arguments' reference counts, tracemalloc's traced memory and the process's RSS
  must not grow.
* Threads: Python threads calling forward/backward at once (on their own inputs and on shared
  read-only ones) get the bits a serial call gets; so do calls racing with set_num_threads.
* Large arrays: zero-stride views of more than 2**31 elements (cheap in memory, not in time:
  marked slow) and views whose byte offsets pass 2**31 and 2**32 (a sparse buffer the kernel reads
  only a few pages of), against closed forms.
* Fuzzing: odd Python objects as every argument of every public function, in a subprocess: the
  interpreter must never crash, and only ordinary exceptions (never SystemError) may come out.
"""
import gc
import json
import os
import random
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest
from helpers import (F32, F64, AxisError, asan_loaded, child_env, fshape, readonly, rng_for,
                     rss_bytes, run_threads)
from numpy.lib.stride_tricks import as_strided

import bnorm
from bnorm import _bnorm

HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------- error paths
class ArrayRaises:
    """An array-like whose conversion fails."""

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("__array__ refuses")


class IndexRaises:
    def __index__(self):
        raise RuntimeError("__index__ refuses")


class FloatRaises:
    def __float__(self):
        raise RuntimeError("__float__ refuses")


class BoolRaises:
    def __bool__(self):
        raise RuntimeError("__bool__ refuses")


def error_cases():
    """(name, function, args, kwargs, exception) for every error path of csrc/module.c that the
    public API reaches, plus the raw _bnorm entry points with wrong argument counts.  Fresh
    objects on every call, so a test can hold references and watch their counts."""
    rng = rng_for("error_cases")
    x = rng.standard_normal((6, 4))
    x32 = x.astype(F32)
    dy = rng.standard_normal((6, 4))
    y, mean, rstd = bnorm.forward(x)
    F = (4,)
    ro = readonly(np.ones(F))
    ro_out = readonly(np.empty_like(x))
    cases = [
        # argument binding (forward and backward are C functions taking keywords), and
        # _bnorm's positional argument counts
        ("forward axis by position", bnorm.forward, (x, None, None, -1), {}, TypeError),
        ("forward without x", bnorm.forward, (), dict(gamma=None), TypeError),
        ("forward unknown keyword", bnorm.forward, (x,), dict(axes=0), TypeError),
        ("forward x twice", bnorm.forward, (x,), dict(x=x), TypeError),
        ("backward without rstd", bnorm.backward, (dy, x, x[0]), {}, TypeError),
        ("backward training by position", bnorm.backward, (dy, x, x[0], x[0], None, -1), {},
         TypeError),
        ("backward gamma twice", bnorm.backward, (dy, x, x[0], x[0], None), dict(gamma=None),
         TypeError),
        ("batch_stats nargs", _bnorm.batch_stats, (x, -1, None), {}, TypeError),
        ("normalize nargs", _bnorm.normalize, (x,), {}, TypeError),
        ("backward_sums nargs", _bnorm.backward_sums, (), {}, TypeError),
        ("backward_apply nargs", _bnorm.backward_apply, (dy, x), {}, TypeError),
        # scalars
        ("eps not a number", bnorm.forward, (x,), dict(eps="small"), TypeError),
        ("eps raises", bnorm.forward, (x,), dict(eps=FloatRaises()), TypeError),
        ("eps negative", bnorm.forward, (x,), dict(eps=-1.0), ValueError),
        ("eps nan", bnorm.forward, (x,), dict(eps=float("nan")), ValueError),
        ("eps inf", bnorm.forward, (x,), dict(eps=float("inf")), ValueError),
        ("momentum not a number", bnorm.forward, (x,), dict(momentum=[0.5]), TypeError),
        ("momentum > 1", bnorm.forward, (x,), dict(momentum=1.5), ValueError),
        ("training raises", bnorm.forward, (x,), dict(training=BoolRaises()), RuntimeError),
        ("bwd training raises", bnorm.backward, (dy, x, mean, rstd),
         dict(training=BoolRaises()), RuntimeError),
        ("count not a number", bnorm.backward_apply, (dy, x, mean, rstd, mean, mean, "n"), {},
         TypeError),
        ("count <= 0", bnorm.backward_apply, (dy, x, mean, rstd, mean, mean, 0), {}, ValueError),
        # x
        ("x __array__ raises", bnorm.forward, (ArrayRaises(),), {}, RuntimeError),
        ("x int", bnorm.forward, (np.arange(12).reshape(3, 4),), {}, TypeError),
        ("x bool", bnorm.forward, (np.ones((3, 4), bool),), {}, TypeError),
        ("x complex", bnorm.forward, (np.ones((3, 4), complex),), {}, TypeError),
        ("x object", bnorm.forward, (np.array([[None, 1.0]], dtype=object),), {}, TypeError),
        ("x str", bnorm.forward, ("abc",), {}, TypeError),
        ("x ragged", bnorm.forward, ([[1.0], [1.0, 2.0]],), {}, ValueError),
        ("x 0-d", bnorm.forward, (np.float64(1.0),), {}, AxisError),
        ("x long double", bnorm.forward, (np.ones((3, 4), np.longdouble),), {}, TypeError),
        # axis
        ("axis not int", bnorm.forward, (x,), dict(axis="0"), TypeError),
        ("axis float", bnorm.forward, (x,), dict(axis=1.0), TypeError),
        ("axis item raises", bnorm.forward, (x,), dict(axis=(IndexRaises(),)), TypeError),
        ("axis out of range", bnorm.forward, (x,), dict(axis=2), AxisError),
        ("axis negative out of range", bnorm.forward, (x,), dict(axis=(-3,)), AxisError),
        ("axis huge", bnorm.forward, (x,), dict(axis=2**100), AxisError),
        ("axis repeated", bnorm.forward, (x,), dict(axis=(1, -1)), ValueError),
        ("axis list repeated", bnorm.forward, (x,), dict(axis=[0, 0]), ValueError),
        ("batch_stats axis", bnorm.batch_stats, (x,), dict(axis=5), AxisError),
        # dy
        ("dy shape", bnorm.backward, (dy[:3], x, mean, rstd), {}, ValueError),
        ("dy int", bnorm.backward, (np.ones((6, 4), int), x, mean, rstd), {}, TypeError),
        ("dy raises", bnorm.backward, (ArrayRaises(), x, mean, rstd), {}, RuntimeError),
        ("backward_sums dy shape", bnorm.backward_sums, (dy.T, x, mean), {}, ValueError),
        # per-feature parameters
        ("gamma shape", bnorm.forward, (x, np.ones(3)), {}, ValueError),
        ("gamma too many dims", bnorm.forward, (x, np.ones((1, 1, 4))), {}, ValueError),
        ("gamma complex", bnorm.forward, (x, np.ones(4, complex)), {}, TypeError),
        ("gamma bool", bnorm.forward, (x, True), {}, TypeError),
        ("gamma str", bnorm.forward, (x, "1"), {}, TypeError),
        ("gamma raises", bnorm.forward, (x, ArrayRaises()), {}, RuntimeError),
        ("beta shape", bnorm.forward, (x, None, np.zeros((2, 4))), {}, ValueError),
        ("mean shape", bnorm.backward, (dy, x, np.zeros(5), rstd), {}, ValueError),
        ("rstd object", bnorm.backward, (dy, x, mean, np.array([object()] * 4)), {}, TypeError),
        ("bwd gamma shape", bnorm.backward, (dy, x, mean, rstd, np.ones(2)), {}, ValueError),
        ("normalize rstd shape", bnorm.normalize, (x, mean, np.ones(3)), {}, ValueError),
        ("sum_dy not F", bnorm.backward_apply, (dy, x, mean, rstd, 1.0, mean, 6), {},
         ValueError),
        ("sum_dy_xmu not F", bnorm.backward_apply, (dy, x, mean, rstd, mean, mean[:2], 6), {},
         ValueError),
        # running statistics
        ("eval without running stats", bnorm.forward, (x,), dict(training=False), ValueError),
        ("eval running_mean shape", bnorm.forward, (x,),
         dict(training=False, running_mean=np.zeros(3), running_var=np.ones(4)), ValueError),
        ("eval running_var raises", bnorm.forward, (x,),
         dict(training=False, running_mean=np.zeros(4), running_var=ArrayRaises()),
         RuntimeError),
        ("running_mean list", bnorm.forward, (x,),
         dict(running_mean=[0.0] * 4, running_var=np.ones(4)), TypeError),
        ("running_var int", bnorm.forward, (x,),
         dict(running_mean=np.zeros(4), running_var=np.ones(4, int)), TypeError),
        ("running_mean shape", bnorm.forward, (x,),
         dict(running_mean=np.zeros((2, 4)), running_var=np.ones(4)), ValueError),
        ("running_var read-only", bnorm.forward, (x,),
         dict(running_mean=np.zeros(4), running_var=ro), ValueError),
        # out
        ("out list", bnorm.forward, (x,), dict(out=[0.0] * 24), TypeError),
        ("out shape", bnorm.forward, (x,), dict(out=np.empty((4, 6))), ValueError),
        ("out ndim", bnorm.forward, (x,), dict(out=np.empty(24)), ValueError),
        ("out dtype", bnorm.forward, (x,), dict(out=np.empty((6, 4), F32)), TypeError),
        ("out byte-swapped", bnorm.forward, (x,),
         dict(out=np.empty((6, 4), np.dtype(F64).newbyteorder())), TypeError),
        ("out read-only", bnorm.forward, (x,), dict(out=ro_out), ValueError),
        ("bwd out dtype", bnorm.backward, (dy, x32, mean, rstd), dict(out=np.empty((6, 4))),
         TypeError),
        ("normalize out shape", bnorm.normalize, (x, mean, rstd), dict(out=np.empty(3)),
         ValueError),
        ("backward_apply out", bnorm.backward_apply, (dy, x, mean, rstd, mean, mean, 6),
         dict(out=ro_out), ValueError),
        # empty batch
        ("M == 0 forward", bnorm.forward, (np.zeros((0, 4)),), {}, ValueError),
        ("M == 0 backward", bnorm.backward, (np.zeros((0, 4)), np.zeros((0, 4)), mean, rstd),
         {}, ValueError),
        # threads
        ("set_num_threads str", bnorm.set_num_threads, ("2",), {}, TypeError),
        ("set_num_threads 0", bnorm.set_num_threads, (0,), {}, ValueError),
        ("set_num_threads huge", bnorm.set_num_threads, (2**100,), {}, OverflowError),
        ("set_num_threads raises", bnorm.set_num_threads, (IndexRaises(),), {}, TypeError),
    ]
    return cases


def valid_cases():
    """(name, function, args, kwargs) on every success path worth leak-checking: conversions,
    casts and temporaries included."""
    rng = rng_for("valid_cases")
    x = rng.standard_normal((6, 4))
    x32 = x.astype(F32)
    dy = rng.standard_normal((6, 4))
    swapped = x.astype(np.dtype(F64).newbyteorder())
    y, mean, rstd = bnorm.forward(x)
    n, bmean, m2 = bnorm.batch_stats(x)
    sum_dy, sum_dy_xmu = bnorm.backward_sums(dy, x, bmean)
    g = np.linspace(0.5, 2, 4)
    return [
        ("forward", bnorm.forward, (x, g, 0.5), dict(running_mean=np.zeros(4),
                                                     running_var=np.ones(4))),
        ("forward list", bnorm.forward, (x.tolist(), g.tolist()), {}),
        ("forward swapped x", bnorm.forward, (swapped,), {}),
        ("forward long double params", bnorm.forward, (x, g.astype(np.longdouble)),
         dict(running_mean=np.zeros(4, np.longdouble), running_var=np.ones(4, np.float16))),
        ("forward broadcast gamma", bnorm.forward, (x, np.full((1,), 2.0), np.int64(1)), {}),
        ("forward eval", bnorm.forward, (x,), dict(training=False, running_mean=np.zeros(4),
                                                   running_var=np.ones(4))),
        ("forward out overlapping", bnorm.forward, (x.copy(),), {}),  # out set below
        ("forward axis list", bnorm.forward, (x,), dict(axis=[0])),
        ("backward", bnorm.backward, (dy, x, mean, rstd, g), {}),
        ("backward scalar gamma", bnorm.backward, (dy, x, mean, rstd, 1.5), {}),
        ("backward dy cast", bnorm.backward, (dy, x32, mean, rstd, g[::-1]), {}),
        ("backward eval", bnorm.backward, (dy, x, mean, rstd), dict(training=False)),
        ("backward out", bnorm.backward, (dy, x, mean, rstd), dict(out=np.empty_like(x))),
        ("batch_stats", bnorm.batch_stats, (x,), dict(axis=0)),
        ("batch_stats empty", bnorm.batch_stats, (np.zeros((0, 4)),), {}),
        ("normalize", bnorm.normalize, (x32, bmean, 1 / np.sqrt(m2 / n), g, 0.1), {}),
        ("backward_sums", bnorm.backward_sums, (dy, x, bmean), {}),
        ("backward_apply", bnorm.backward_apply, (dy, x, bmean, rstd, sum_dy, sum_dy_xmu, n, g),
         {}),
        ("get_num_threads", bnorm.get_num_threads, (), {}),
    ]


def _fix_overlapping(cases):
    out = []
    for name, f, args, kw in cases:
        if name == "forward out overlapping":
            kw = dict(out=args[0][::-1])  # overlaps x in another order: a temporary
        out.append((name, f, args, kw))
    return out


def run_case(f, args, kw, exc=None):
    if exc is None:
        return f(*args, **kw)
    try:
        f(*args, **kw)
    except exc:
        return None
    raise AssertionError(f"{f.__name__} did not raise {exc.__name__}")


def test_error_cases_raise_what_api_md_says():
    """The error table of the leak tests is right (so the leak tests run the paths they say):
    the exceptions docs/api.md names."""
    before = bnorm.get_num_threads()
    try:
        for name, f, args, kw, exc in error_cases():
            with pytest.raises(exc):
                f(*args, **kw)
    finally:
        bnorm.set_num_threads(before)
    assert bnorm.get_num_threads() == before


def watched_objects(args, kw):
    """Every argument, and the singletons a leaked reference would most likely be to."""
    objs = [a for a in list(args) + list(kw.values())]
    objs += [np.dtype(F32), np.dtype(F64), AxisError, TypeError, ValueError, None, True, False]
    return objs


def refcounts(objs):
    return [sys.getrefcount(o) for o in objs]


@pytest.mark.parametrize("kind", ["valid", "errors"])
def test_no_reference_leaks(kind):
    before_threads = bnorm.get_num_threads()
    if kind == "valid":
        cases = [(n, f, a, k, None) for n, f, a, k in _fix_overlapping(valid_cases())]
    else:
        cases = error_cases()
    gc.collect()
    try:
        for name, f, args, kw, exc in cases:
            objs = watched_objects(args, kw)
            for _ in range(5):  # warm caches (warnings registry, interned strings, ...)
                run_case(f, args, kw, exc)
            before = refcounts(objs)
            for _ in range(200):
                run_case(f, args, kw, exc)
            after = refcounts(objs)
            if after != before:  # (a full collection is slow: only to rule out cyclic garbage)
                gc.collect()
                after = refcounts(objs)
            grown = [(i, a - b) for i, (a, b) in enumerate(zip(after, before)) if a != b]
            # None/True/False are shared with everything else running: allow them to move a
            # little, never by the number of calls
            grown = [(i, d) for i, d in grown if not (i >= len(objs) - 3 and abs(d) < 50)]
            assert not grown, f"{name}: reference counts changed (index, delta): {grown}"
    finally:
        bnorm.set_num_threads(before_threads)


@pytest.mark.parametrize("kind", ["valid", "errors"])
def test_no_memory_leaks_tracemalloc(kind):
    """bnorm's PyMem scratch and NumPy's arrays are traced by tracemalloc: 300 rounds of every
    case must not leave memory behind (one leaked scratch block per call would be >= 300 * 100
    bytes per case, a leaked result array >= 300 * 200).  Measured over a second window of 300
    rounds: the first fills CPython's free lists (up to 2000 tuples of each size, which
    tracemalloc counts as allocated), a bounded cache, not a leak."""
    before_threads = bnorm.get_num_threads()
    if kind == "valid":
        cases = [(n, f, a, k, None) for n, f, a, k in _fix_overlapping(valid_cases())]
    else:
        cases = error_cases()
    tracemalloc.start()
    try:
        for _ in range(5):
            for name, f, args, kw, exc in cases:
                run_case(f, args, kw, exc)
        for window in range(2):
            gc.collect()
            start, _ = tracemalloc.get_traced_memory()
            for _ in range(300):
                for name, f, args, kw, exc in cases:
                    run_case(f, args, kw, exc)
            gc.collect()
            end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        bnorm.set_num_threads(before_threads)
    assert end - start < 16 * 1024, f"traced memory grew by {end - start} bytes"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_no_memory_leaks_rss():
    """Large enough to be split into pieces with partial sums (plain malloc, which tracemalloc
    does not see): the process's RSS stays flat over many rounds."""
    if asan_loaded():
        pytest.skip("AddressSanitizer keeps freed memory in quarantine: RSS grows by design")
    rng = rng_for("rss")
    x = rng.standard_normal((2048, 128)).astype(F32)  # 1 MiB: pieces with partial sums
    dy = rng.standard_normal((2048, 128)).astype(F32)
    xt = np.ascontiguousarray(x.T).T  # feature-major: the other split
    out = np.empty_like(x)
    before = bnorm.get_num_threads()
    try:
        bnorm.set_num_threads(2)

        def round_():
            for a in (x, xt):
                y, m, r = bnorm.forward(a)
                bnorm.backward(dy, a, m, r, out=out)
                bnorm.batch_stats(a, axis=0)
                try:
                    bnorm.forward(a, np.ones(3))
                except ValueError:
                    pass

        for _ in range(30):
            round_()
        gc.collect()
        start = rss_bytes()
        for _ in range(300):
            round_()
        gc.collect()
        grown = rss_bytes() - start
    finally:
        bnorm.set_num_threads(before)
    # one leaked result per round would be 300 MiB, one leaked set of partial sums 30+ MiB
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- threads
def problems():
    """(x, dy, gamma, beta, axis, running stats): small ones, and ones large enough for the
    kernels to split into pieces and use the pool."""
    rng = rng_for("problems")
    out = []
    for shape, axis, dtype in [((64, 16), -1, F32), ((8, 6, 5, 4), (1, 3), F64),
                               ((512, 256), -1, F32), ((64, 32, 8, 8), 1, F32),
                               ((256, 300), 0, F64), ((7,), (), F64)]:
        x = (3.0 + rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        F = fshape(shape, axis)
        g = rng.uniform(0.5, 2, F).astype(dtype)
        b = rng.standard_normal(F).astype(dtype)
        rm = rng.standard_normal(F).astype(dtype)
        rv = rng.uniform(0.5, 2, F).astype(dtype)
        for a in (x, dy, g, b, rm, rv):
            a.flags.writeable = False  # shared read-only between threads
        out.append((x, dy, g, b, axis, rm, rv))
    return out


def compute(p):
    """forward (training, with running stats) + backward (training and eval): all as bytes."""
    x, dy, g, b, axis, rm0, rv0 = p
    rm, rv = rm0.copy(), rv0.copy()
    y, mean, rstd = bnorm.forward(x, g, b, axis=axis, running_mean=rm, running_var=rv)
    dx, dg, db = bnorm.backward(dy, x, mean, rstd, g, axis=axis)
    ye, _, re = bnorm.forward(x, g, b, axis=axis, training=False, running_mean=rm0,
                              running_var=rv0)
    dxe, dge, dbe = bnorm.backward(dy, x, rm0, re, g, axis=axis, training=False)
    return [a.tobytes() for a in (y, mean, rstd, rm, rv, dx, dg, db, ye, re, dxe, dge, dbe)]


def test_threads_get_the_serial_bits():
    ps = problems()
    before = bnorm.get_num_threads()
    try:
        bnorm.set_num_threads(2)
        serial = [compute(p) for p in ps]
        # the problems differ: a thread that got another's result could not match
        assert len({s[0] for s in serial}) == len(ps)
        barrier = threading.Barrier(8)
        mismatches = []

        def work(i):
            order = list(range(len(ps)))
            random.Random(i).shuffle(order)
            # this thread's own copies (its own memory), besides the inputs all threads share
            own = [tuple(a.copy() if isinstance(a, np.ndarray) else a for a in p) for p in ps]
            barrier.wait()
            for r in range(4):
                for k in order:
                    if compute(own[k] if (r + i) % 2 else ps[k]) != serial[k]:
                        mismatches.append((i, k))

        run_threads(work, 8)
        assert not mismatches, mismatches
        # and the serial bits are right: the mean of a problem against NumPy
        x, axis = ps[2][0], ps[2][4]
        np.testing.assert_allclose(bnorm.forward(x, axis=axis)[1],
                                   x.astype(F64).mean(0), rtol=1e-6)
    finally:
        bnorm.set_num_threads(before)


def test_set_num_threads_while_other_threads_compute():
    ps = problems()
    before = bnorm.get_num_threads()
    try:
        bnorm.set_num_threads(1)
        serial = [compute(p) for p in ps]
        stop = threading.Event()
        seen = set()
        mismatches = []

        def setter():
            k = 0
            while not stop.is_set():
                n = 1 + k % 4
                bnorm.set_num_threads(n)
                seen.add(bnorm.get_num_threads())
                k += 1

        t = threading.Thread(target=setter, daemon=True)
        t.start()
        try:
            def work(i):
                for _ in range(6):
                    for k, p in enumerate(ps):
                        if compute(p) != serial[k]:
                            mismatches.append((i, k))

            run_threads(work, 4)
        finally:
            stop.set()
            t.join(60)
        assert not t.is_alive()
        assert not mismatches, mismatches
        assert seen <= {1, 2, 3, 4} and len(seen) > 1
    finally:
        bnorm.set_num_threads(before)
    assert bnorm.get_num_threads() == before


# --------------------------------------------------------------------------- large arrays
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F32])
def test_more_than_2_31_elements_zero_stride(dtype):
    """x[b1, b2, c] = base[b2, c] over b1 < B1, with B1 * B2 * C > 2**31 (and so M > 2**31): a
    zero-stride view, as are dy and out, so nothing of that size is allocated.  The statistics,
    y, dbeta, dgamma and dx have closed forms from base: each b2 is repeated B1 times."""
    rng = rng_for("2**31")
    B2, C = 3, 4
    B1 = 2**31 // (B2 * C) + 5
    base = (2.0 + rng.standard_normal((B2, C))).astype(dtype)
    dbase = rng.standard_normal((B2, C)).astype(dtype)
    S = (B1, B2, C)
    x = np.broadcast_to(base, S)
    dy = np.broadcast_to(dbase, S)
    assert x.size > 2**31 and x.strides[0] == 0
    ybuf, dxbuf = np.full((B2, C), np.nan, dtype), np.full((B2, C), np.nan, dtype)
    out = as_strided(ybuf, S, (0,) + ybuf.strides)
    dout = as_strided(dxbuf, S, (0,) + dxbuf.strides)
    gamma = np.array([0.5, 1.0, 1.5, 2.0], dtype)
    beta = np.array([0.25, -0.5, 0.0, 1.0], dtype)
    rm, rv = np.zeros(C), np.ones(C)

    y, mean, rstd = bnorm.forward(x, gamma, beta, out=out, running_mean=rm, running_var=rv,
                                  momentum=0.5)
    b64, d64, g64 = base.astype(F64), dbase.astype(F64), gamma.astype(F64)
    m = b64.mean(0)
    var = b64.var(0)
    r = 1 / np.sqrt(var + 1e-8)
    xhat = (b64 - m) * r
    tol = 16 * float(np.finfo(dtype).eps)
    assert y is out
    np.testing.assert_allclose(mean, m, rtol=tol)
    np.testing.assert_allclose(rstd, r, rtol=tol)
    np.testing.assert_allclose(ybuf, xhat * g64 + beta, rtol=tol, atol=tol)
    np.testing.assert_allclose(rm, 0.5 * m, rtol=tol)
    np.testing.assert_allclose(rv, 0.5 + 0.5 * var, rtol=tol)

    dx, dgamma, dbeta = bnorm.backward(dy, x, mean, rstd, gamma, out=dout)
    M = B1 * B2
    dbeta_exp = B1 * d64.sum(0)
    dgamma_exp = B1 * (d64 * xhat).sum(0)
    dx_exp = g64 * r * (d64 - dbeta_exp / M - xhat * dgamma_exp / M)
    assert dx is dout
    np.testing.assert_allclose(dbeta, dbeta_exp, rtol=tol)
    np.testing.assert_allclose(dgamma, dgamma_exp, rtol=tol)
    np.testing.assert_allclose(dxbuf, dx_exp, rtol=tol, atol=tol * np.abs(dx_exp).max())
    n, bmean, m2 = bnorm.batch_stats(x[:, :1], axis=-1)  # M = B1 alone, also > 2**31 / 12
    assert n == B1


def sparse_buffer(nbytes):
    """A zeroed buffer of nbytes that costs memory only where it is written (calloc'd pages)."""
    try:
        return np.zeros(nbytes, np.uint8)
    except MemoryError:
        pytest.skip(f"cannot map {nbytes / 2**30:.1f} GiB of address space here")


@pytest.mark.parametrize("dtype", [F32, F64])
def test_byte_offsets_past_2_31_and_2_32(dtype):
    """x's rows (and dy's, and out's) lie 2**31 + 4 KiB bytes apart in a sparse 4+ GiB buffer:
    every byte offset past the first row needs 64 bits (as does the 2-row span's 2**32).  Checked
    against the same call on compact copies, with negative strides too (to rounding: the compact
    layout is summed in another order), and the compact result against NumPy."""
    rng = rng_for(f"far {np.dtype(dtype).name}")
    tol = 16 * float(np.finfo(dtype).eps)
    step = 2**31 + 4096
    rows, C = 3, 5
    isz = np.dtype(dtype).itemsize
    buf = sparse_buffer((rows - 1) * step + 3 * C * isz)
    big = lambda k: np.ndarray((rows, C), dtype, buf, k * C * isz, (step, isz))  # noqa: E731
    x, dy, out = big(0), big(1), big(2)
    assert (rows - 1) * x.strides[0] > 2**32
    xc = (1.0 + rng.standard_normal((rows, C))).astype(dtype)
    dyc = rng.standard_normal((rows, C)).astype(dtype)
    x[...] = xc
    dy[...] = dyc
    for sl in [(slice(None), slice(None)), (slice(None, None, -1), slice(None, None, -1))]:
        for axis in (-1, 0, ()):
            exp = bnorm.forward(xc[sl], axis=axis)
            o = out[sl]
            got = bnorm.forward(x[sl], axis=axis, out=o)
            assert got[0] is o
            for g, e in zip(got, exp):
                np.testing.assert_allclose(g, e, rtol=tol, atol=tol * np.abs(e).max())
            _, mean, rstd = exp
            exp_b = bnorm.backward(dyc[sl], xc[sl], mean, rstd, axis=axis)
            got_b = bnorm.backward(dy[sl], x[sl], mean, rstd, axis=axis, out=o)
            assert got_b[0] is o
            # dx is a difference of terms up to |rstd * dy|, each rounded from sums taken in
            # another order: compared against those terms (with 3 rows dx can be far smaller)
            dx_terms = float(np.abs(dyc).max() * np.abs(rstd).max())
            for g, e in zip(got_b, exp_b):
                scale = max(np.abs(e).max(), dx_terms if g is o else 0.0)
                np.testing.assert_allclose(g, e, rtol=tol, atol=tol * scale)
    # and the compact results are right: the mean of each feature
    np.testing.assert_allclose(bnorm.forward(x)[1], xc.astype(F64).mean(0), rtol=1e-6)
    np.testing.assert_array_equal(x, xc)  # inputs untouched
    np.testing.assert_array_equal(dy, dyc)


# --------------------------------------------------------------------------- fuzzing
FUZZ_SEED = int(os.environ.get("BNORM_FUZZ_SEED", "20261125"))


def test_fuzzed_arguments_never_crash_or_raise_systemerror():
    """Odd objects as every argument of every public function, in a child process (so a crash is
    a failure here, not the end of the test run).  See fuzz_main below."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "fuzz", str(FUZZ_SEED)],
                          env=child_env(), capture_output=True, text=True, timeout=600, cwd=HERE)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, f"fuzz child exited with {proc.returncode}:\n{tail}"
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert not summary["bad"], summary["bad"][:20]
    # it really exercised both sides
    assert summary["calls"] > 5000 and summary["ok"] > 200 and summary["raised"] > 2000, summary


def fuzz_objects():
    """Odd values for any argument."""

    class Evil:
        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("__array__")

    class JunkArray:
        def __array__(self, dtype=None, copy=None):
            return "not an array"

    class EvilIndex:
        def __index__(self):
            raise ZeroDivisionError("__index__")

    class HugeIndex:
        def __index__(self):
            return 2**80

    class EvilFloat:
        def __float__(self):
            raise ArithmeticError("__float__")

    class EvilBool:
        def __bool__(self):
            raise RuntimeError("__bool__")

    class EvilSeq:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            raise KeyError(i)

    class LyingLen:
        def __len__(self):
            return 2**40

        def __getitem__(self, i):
            if i < 2:
                return 1.0
            raise IndexError(i)

    class Sub(np.ndarray):
        pass

    shared = []

    class ClearsList:
        """__index__ empties the list that holds it (an axis list: once a use after free)."""

        def __index__(self):
            shared.clear()
            gc.collect()
            return 0

    def axis_list():
        shared[:] = [ClearsList()] + [object() for _ in range(20)]
        return shared

    evil_objects = np.empty((6, 4), object)
    evil_objects.fill(Evil())  # an object array of array-likes that refuse
    recursive = []
    recursive.append(recursive)
    x = np.arange(24, dtype=F64).reshape(6, 4) / 7
    ro = x.copy()
    ro.flags.writeable = False
    unaligned = np.zeros(24 * 8 + 1, np.uint8)[1:].view(F64).reshape(6, 4)
    objs = [
        None, True, False, 0, 1, -1, 2, -5, 3, 2**31, 2**63, -2**63, 2**100, 0.0, 0.5, -0.5,
        1.0, 1e300, float("nan"), float("inf"), -float("inf"), 1j, "", "abc", "0", b"\x00" * 8,
        bytearray(8), [], [1.0], [[1.0, 2.0]], [[1.0], [2.0, 3.0]], (), (0,), (0, 1), (1, 1),
        (-1, 0), (5,), [0, 1], {}, {"a": 1}, {1.0}, frozenset(), object(), len, type,
        Exception("x"), Ellipsis, NotImplemented, slice(None), range(4), memoryview(b"abcdefgh"),
        recursive, Evil(), JunkArray(), EvilIndex(), HugeIndex(), EvilFloat(), EvilBool(),
        EvilSeq(), LyingLen(), np.float64(1.5), np.float32(-2), np.int8(3), np.bool_(True),
        np.array(2.0), np.array([]), np.zeros((0, 4)), np.zeros((6, 0)), np.zeros((0,)),
        np.ones((1,) * 32), np.ones((1,) * 64), np.ones((2, 1, 1, 1, 1, 1, 1, 4)),
        x, x.T, x[::-1, ::2], x.astype(F32), x.astype(np.float16), x.astype(np.longdouble),
        x.astype(np.dtype(">f8")), x.astype(np.dtype(">f4")), ro, unaligned,
        np.broadcast_to(x[:1], (6, 4)), as_strided(np.zeros(1), (2**40,), (0,)),
        np.arange(24).reshape(6, 4), np.ones((6, 4), np.uint64), np.ones((6, 4), bool),
        np.ones((6, 4), complex), np.array([[None] * 4] * 6, dtype=object),
        evil_objects, np.array(["a", "b"]),
        np.zeros(4, "datetime64[s]"), np.zeros(4, "timedelta64[s]"), np.zeros(4, "V8"),
        np.zeros(4, [("a", "f8")]), np.zeros(4, [("a", "f8"), ("b", "i4")]),
        np.ma.masked_array(x, x > 1), np.matrix(x[:2]), x.view(Sub), np.ones(4), np.ones(4, F32),
        np.ones((1, 4)), np.full(4, np.nan), np.full(4, -1.0), np.zeros(4),
    ]
    return objs, axis_list


def fuzz_main(seed):
    import warnings

    warnings.simplefilter("ignore")  # DeprecationWarnings of odd conversions are not the point
    objs, axis_list = fuzz_objects()
    rnd = random.Random(seed)
    x = np.arange(24, dtype=F64).reshape(6, 4) / 7 + np.sin(np.arange(24)).reshape(6, 4)
    dy = np.cos(np.arange(24.0)).reshape(6, 4)
    y, mean, rstd = bnorm.forward(x)
    n, bmean, m2 = bnorm.batch_stats(x)
    sdy, sdyx = bnorm.backward_sums(dy, x, bmean)
    F = np.ones(4)
    # function, positional baseline, keyword baseline (valid calls)
    funcs = {
        "forward": (bnorm.forward, [x, F, F * 0],
                    dict(axis=-1, eps=1e-5, training=True, running_mean=np.zeros(4),
                         running_var=np.ones(4), momentum=0.9, out=None)),
        "forward_eval": (bnorm.forward, [x, None, None],
                         dict(training=False, running_mean=np.zeros(4), running_var=np.ones(4))),
        "backward": (bnorm.backward, [dy, x, mean, rstd, F],
                     dict(axis=-1, training=True, out=None)),
        "batch_stats": (bnorm.batch_stats, [x], dict(axis=-1)),
        "combine_stats": (bnorm.combine_stats, [[n, n], [bmean, bmean], [m2, m2]], {}),
        "normalize": (bnorm.normalize, [x, bmean, 1 / np.sqrt(m2 / n), F, F],
                      dict(axis=-1, out=None)),
        "backward_sums": (bnorm.backward_sums, [dy, x, bmean], dict(axis=-1)),
        "backward_apply": (bnorm.backward_apply, [dy, x, bmean, rstd, sdy, sdyx, n, F],
                           dict(axis=-1, out=None)),
        "set_num_threads": (bnorm.set_num_threads, [2], {}),
        "BatchNorm": (bnorm.BatchNorm, [4], dict(axis=-1, eps=1e-5, momentum=0.9,
                                                 affine=True, dtype=F64)),
    }
    raw = [_bnorm.forward, _bnorm.backward, _bnorm.batch_stats, _bnorm.normalize,
           _bnorm.backward_sums, _bnorm.backward_apply, _bnorm.get_num_threads,
           _bnorm.set_num_threads]
    stats = {"calls": 0, "ok": 0, "raised": 0, "bad": []}

    def fresh(o):
        # in-place targets (running stats, out) must not carry one call's writes to the next
        return o.copy() if isinstance(o, np.ndarray) and o.flags.writeable and o.size < 10**6 \
            else o

    def call(label, f, args, kw):
        if f is bnorm.BatchNorm and any(isinstance(o, (int, np.integer)) and abs(int(o)) > 2**20
                                        for o in list(args) + list(kw.values())):
            return  # a layer of 2**31 features is a valid request for 16 GiB of parameters
        stats["calls"] += 1
        print(label, flush=True)  # the last line names the culprit if the process dies
        try:
            f(*[fresh(a) for a in args], **{k: fresh(v) for k, v in kw.items()})
            stats["ok"] += 1
        except SystemError as e:
            stats["bad"].append(f"{label}: SystemError {e}")
        except Exception:
            stats["raised"] += 1
        except BaseException as e:  # KeyboardInterrupt, SystemExit: not ours to raise
            stats["bad"].append(f"{label}: {type(e).__name__} {e}")
        finally:
            bnorm.set_num_threads(2)

    def describe(o):
        r = type(o).__name__
        if isinstance(o, np.ndarray):
            r += f"{o.shape}{o.dtype}"
        return r

    # 1. every argument of every function, one at a time, with every odd object
    for name, (f, args, kw) in funcs.items():
        call(f"{name} baseline", f, args, kw)
        for i in range(len(args)):
            for o in objs:
                a = list(args)
                a[i] = o
                call(f"{name} arg{i}={describe(o)}", f, a, kw)
        for k in kw:
            for o in objs:
                call(f"{name} {k}={describe(o)}", f, args, {**kw, k: o})
            if k == "axis":
                for _ in range(20):
                    call(f"{name} axis=list emptied by __index__", f, args,
                         {**kw, k: axis_list()})
    # 2. random combinations: several arguments odd at once (not the 2**40-element view: with
    # axis=() it would be a reduction over 2**40 elements)
    pool = [o for o in objs if not (isinstance(o, np.ndarray) and o.size >= 2**40)]
    for name, (f, args, kw) in funcs.items():
        for _ in range(300):
            a = [rnd.choice(pool) if rnd.random() < 0.4 else v for v in args]
            kw2 = {k: (rnd.choice(pool) if rnd.random() < 0.3 else v) for k, v in kw.items()}
            call(f"{name} random", f, a, kw2)
    # 3. the raw entry points with any number of arguments
    for f in raw:
        for nargs in range(0, 13):
            for _ in range(5):
                call(f"_bnorm.{f.__name__} nargs={nargs}", f,
                     [rnd.choice(pool + [x, dy, mean, None, -1]) for _ in range(nargs)], {})
    # 4. the layer's methods
    for _ in range(300):
        layer = bnorm.BatchNorm(4, dtype=F64)
        xo = rnd.choice(pool + [x])
        call("BatchNorm.forward", layer.forward, [xo], dict(training=rnd.choice(pool[:3])))
        call("BatchNorm.backward", layer.backward, [rnd.choice(pool + [dy])], {})
        call("BatchNorm.load_state_dict", layer.load_state_dict,
             [rnd.choice(pool + [layer.state_dict()])], {})
    print(json.dumps(stats), flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["fuzz"]:
    fuzz_main(int(sys.argv[2]))
