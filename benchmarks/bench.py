#!/usr/bin/env python
"""Benchmark bnorm against the blog post's NumPy code and PyTorch CPU.

Run after installing bnorm (``pip install .``; add ``'.[bench]'`` for PyTorch and the plot)::

    python benchmarks/bench.py                 # full suite, a few minutes
    python benchmarks/bench.py --quick         # float32, a few shapes, under a minute
    python benchmarks/bench.py --threads 1 --markdown results.md --plot speedup.png

Peers, timed in the same process on the same arrays:

* ``bnorm``: ``bnorm.forward`` / ``bnorm.backward`` called as a user would (fresh outputs);
* ``bnorm (out=)``: the same with preallocated ``out=`` arrays (no allocation / page faults);
* ``NumPy (post)``: ``bnorm.reference.forward`` / ``backward``, the post's NumPy expressions;
* ``PyTorch``: ``torch.nn.functional.batch_norm`` on ``torch.from_numpy`` views of the same
  buffers (no copies: the NHWC cases are ``permute(0, 3, 1, 2)`` views in
  ``torch.channels_last``; design matrices are ``(N, C)``; the strided-view case is handed to
  torch as the strided view it is, so any copy torch makes is timed), with
  ``torch.set_num_threads(bnorm.get_num_threads())``.

Operations (gamma and beta are per-feature arrays; training updates running statistics):

* ``fwd``: training forward.  PyTorch runs with grad enabled (``x``, weight and bias require
  grad) so it saves what its backward needs, as in a real training step.
* ``bwd``: training backward (dx, dgamma, dbeta) from a forward computed once before timing.
  PyTorch: ``torch.autograd.grad(y, (x, weight, bias), dy, retain_graph=True)`` on one retained
  graph, which runs only ``native_batch_norm_backward`` (``autograd.grad`` rather than
  ``y.backward`` so nothing is accumulated into ``.grad``).
* ``step``: forward + backward, each peer's own forward feeding its own backward.
* ``infer``: inference forward from running statistics (PyTorch under ``torch.inference_mode``).

Timing: each callable is warmed up, then called in batches (several calls per sample for tiny
cases, so each sample lasts >= ~1 ms); the reported time is the median per-call time over its
samples.  The contenders of one operation (bnorm, bnorm (out=), NumPy, PyTorch and the copy) take
turns: ``--rounds`` rounds, each giving every contender an equal share of the time budget after
20 ms of settling calls.  A machine that slows down for a second or two (a virtual machine's
neighbours, see the README) then slows every contender alike instead of whichever ran at the
time, and the medians pass over it.  Slower phases can outlast a case: ``--repeats N`` runs the
whole suite N times and reports the median of each time.  The garbage collector is off while
timing.

Memory: glibc returns freed memory to the system as it goes (it unmaps large blocks and trims
the top of its heap), so a NumPy or PyTorch temporary can cost a page fault per page on one call
and none on the next, depending on what ran before: the post's NumPy step on (256,1024) float32
took 1.6 ms in one run and 3.5 ms in another.  The suite fixes glibc's thresholds first
(``mallopt``: heap never trimmed, mmap only from 32 MiB) so that the peers keep their pages
between calls: steadier timings, and the peers at their best.  bnorm does not depend on it (its
outputs come from its own buffer cache).  ``--glibc-defaults`` leaves glibc as it is.

Bandwidth: minimal bytes moved by a fused kernel, where ``B = x.size * itemsize``: training
forward 3B (read x twice, write y), backward 5B (read x and dy twice, write dx), full step 8B,
inference 2B (read x, write y).  ``copy GB/s`` is ``np.copyto`` between two contiguous arrays of
x's size, timed in turns with each operation's contenders, counting 2B (read + write); NumPy's
copy is single-threaded.
"""
import argparse
import ctypes
import functools
import gc
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

import bnorm
from bnorm import reference

OPS = ("fwd", "bwd", "step", "infer")
OP_NAMES = {"fwd": "train fwd", "bwd": "train bwd", "step": "fwd+bwd", "infer": "infer fwd"}
BYTES_PER_ELEM_PASS = {"fwd": 3, "bwd": 5, "step": 8, "infer": 2}
EPS = 1e-8            # bnorm's and the post's default
MOMENTUM = 0.9          # bnorm / post convention (weight of the old value); torch gets 1 - 0.9
LARGE_BYTES = 8 << 20   # cases with x at least this big count as "large" in the summary


# --------------------------------------------------------------------------------------------
# cases

class Case:
    """One benchmark input: x (maybe a strided view), dy, per-feature params, and its layout.

    layout is "nhwc" (features last, torch sees an NCHW channels_last view), "nchw" (axis=1) or
    "nc" (design matrix (N, C), axis=-1).
    """

    def __init__(self, name, group, shape, layout, dtype, view=None, seed=0):
        self.name, self.group, self.layout = name, group, layout
        self.dtype = np.dtype(dtype)
        rng = np.random.default_rng(seed)
        if view is None:
            self.base = None
            self.x = self._randn(rng, shape) * 2 + 0.5
        else:
            base_shape, index = view
            self.base = self._randn(rng, base_shape) * 2 + 0.5
            self.x = self.base[index]
            assert self.x.shape == tuple(shape) and not self.x.flags.c_contiguous
        self.dy = self._randn(rng, shape)
        self.axis = 1 if layout == "nchw" else -1
        c = shape[self.axis]
        self.gamma = (1 + 0.1 * self._randn(rng, (c,))).astype(self.dtype)
        self.beta = (0.1 * self._randn(rng, (c,))).astype(self.dtype)
        self.run_mean = (0.1 * self._randn(rng, (c,))).astype(self.dtype)
        self.run_var = (1 + 0.1 * np.abs(self._randn(rng, (c,)))).astype(self.dtype)

    def _randn(self, rng, shape):
        return rng.standard_normal(shape, dtype=self.dtype)

    @property
    def nbytes(self):
        return self.x.size * self.x.itemsize

    def stats(self):
        """Fresh copies of the running statistics (each peer updates its own in place)."""
        return self.run_mean.copy(), self.run_var.copy()


def shape_str(shape):
    return "(" + ",".join(map(str, shape)) + ")"


CASES = [
    # name, group, shape, layout, view, in --quick
    ("NHWC {}", "channels-last", (64, 56, 56, 64), "nhwc", None, False),
    ("NHWC {}", "channels-last", (256, 14, 14, 256), "nhwc", None, False),
    ("NHWC {}", "channels-last", (8, 112, 112, 32), "nhwc", None, True),
    ("NCHW {} axis=1", "channels-first", (64, 64, 56, 56), "nchw", None, True),
    ("NC {}", "design", (32, 64), "nc", None, True),
    ("NC {}", "design", (256, 1024), "nc", None, True),
    ("NC {}", "design", (4096, 1024), "nc", None, False),
    ("NHWC view {} = x[:, ::2] of (64,112,56,64)", "strided view", (64, 56, 56, 64), "nhwc",
     ((64, 112, 56, 64), (slice(None), slice(None, None, 2))), True),
]


def make_cases(quick, dtypes, only=None):
    """Case constructors (a case's arrays are built only when it runs, then freed); only: keep
    the cases whose name contains one of these strings."""
    for dtype in dtypes:
        for name, group, shape, layout, view, in_quick in CASES:
            full_name = name.format(shape_str(shape))
            if only and not any(o in full_name for o in only):
                continue
            if in_quick or not quick:
                yield functools.partial(Case, name.format(shape_str(shape)), group, shape,
                                        layout, dtype, view)


# --------------------------------------------------------------------------------------------
# peers: each returns {op: zero-argument callable} for a case, plus the outputs of one step for
# the cross-check (y, dx, dgamma, dbeta as NumPy arrays in x's layout)

def bnorm_ops(case, use_out=False):
    x, dy, g, b, ax = case.x, case.dy, case.gamma, case.beta, case.axis
    rm, rv = case.stats()
    im, iv = case.stats()
    fwd, bwd = bnorm.forward, bnorm.backward
    if use_out:
        ybuf, dxbuf = np.empty_like(dy), np.empty_like(dy)
        kw_y, kw_dx = {"out": ybuf}, {"out": dxbuf}
    else:
        kw_y = kw_dx = {}
    _, mean, rstd = fwd(x, g, b, axis=ax, eps=EPS, running_mean=rm, running_var=rv,
                        momentum=MOMENTUM)

    def f_fwd():
        return fwd(x, g, b, axis=ax, eps=EPS, running_mean=rm, running_var=rv,
                   momentum=MOMENTUM, **kw_y)

    def f_bwd():
        return bwd(dy, x, mean, rstd, g, axis=ax, **kw_dx)

    def f_step():
        y, m, r = fwd(x, g, b, axis=ax, eps=EPS, running_mean=rm, running_var=rv,
                      momentum=MOMENTUM, **kw_y)
        return (y,) + bwd(dy, x, m, r, g, axis=ax, **kw_dx)

    def f_infer():
        return fwd(x, g, b, axis=ax, eps=EPS, training=False, running_mean=im,
                   running_var=iv, **kw_y)

    return {"fwd": f_fwd, "bwd": f_bwd, "step": f_step, "infer": f_infer}, \
        lambda: tuple(np.array(a) for a in f_step())


def numpy_ops(case):
    x, dy, g, b, ax = case.x, case.dy, case.gamma, case.beta, case.axis
    rm, rv = case.stats()
    im, iv = case.stats()
    fwd, bwd = reference.forward, reference.backward
    _, mean, rstd = fwd(x, g, b, axis=ax, eps=EPS, running_mean=rm, running_var=rv,
                        momentum=MOMENTUM)

    def f_fwd():
        return fwd(x, g, b, axis=ax, eps=EPS, running_mean=rm, running_var=rv,
                   momentum=MOMENTUM)

    def f_bwd():
        return bwd(dy, x, mean, rstd, g, axis=ax)

    def f_step():
        y, m, r = fwd(x, g, b, axis=ax, eps=EPS, running_mean=rm, running_var=rv,
                      momentum=MOMENTUM)
        return (y,) + bwd(dy, x, m, r, g, axis=ax)

    def f_infer():
        return fwd(x, g, b, axis=ax, eps=EPS, training=False, running_mean=im, running_var=iv)

    return {"fwd": f_fwd, "bwd": f_bwd, "step": f_step, "infer": f_infer}, f_step


def torch_ops(case, torch):
    F = torch.nn.functional
    if case.layout == "nhwc":
        def to_t(a):    # NHWC buffer -> NCHW view, channels_last (no copy when contiguous)
            t = torch.from_numpy(a).permute(0, 3, 1, 2)
            if a.flags.c_contiguous:
                t = t.contiguous(memory_format=torch.channels_last)
            return t

        def to_np(t):
            return t.detach().permute(0, 2, 3, 1).numpy()
    else:
        to_t = torch.from_numpy

        def to_np(t):
            return t.detach().numpy()
    x = to_t(case.x)
    dy = to_t(case.dy)
    assert x.data_ptr() == case.x.ctypes.data and dy.data_ptr() == case.dy.ctypes.data
    xg = x.detach().requires_grad_()
    g = torch.from_numpy(case.gamma.copy())
    b = torch.from_numpy(case.beta.copy())
    gg, bg = g.detach().requires_grad_(), b.detach().requires_grad_()
    rm, rv = (torch.from_numpy(a) for a in case.stats())
    im, iv = (torch.from_numpy(a) for a in case.stats())
    inputs = (xg, gg, bg)
    tmom = 1 - MOMENTUM

    def f_fwd():
        return F.batch_norm(xg, rm, rv, gg, bg, training=True, momentum=tmom, eps=EPS)

    y_retained = f_fwd()

    def f_bwd():
        return torch.autograd.grad(y_retained, inputs, dy, retain_graph=True)

    def f_step():
        y = F.batch_norm(xg, rm, rv, gg, bg, training=True, momentum=tmom, eps=EPS)
        return (y,) + torch.autograd.grad(y, inputs, dy)

    def f_infer():
        with torch.inference_mode():
            return F.batch_norm(x, im, iv, g, b, training=False, eps=EPS)

    def outputs():
        y, dx, dg, db = f_step()
        return to_np(y), to_np(dx), dg.numpy(), db.numpy()

    return {"fwd": f_fwd, "bwd": f_bwd, "step": f_step, "infer": f_infer}, outputs


def copy_op(case):
    src = np.ascontiguousarray(case.dy)
    dst = np.empty_like(src)
    return lambda: np.copyto(dst, src)


# --------------------------------------------------------------------------------------------
# timing

def calls_per_sample(fn, budget, sample_floor=1e-3):
    """Warm fn up (at least one call, up to ~5% of the budget for fast functions); returns how
    many calls make a sample of at least sample_floor seconds."""
    clock = time.perf_counter
    t_start = clock()
    calls = 0
    while True:
        t0 = clock()
        fn()
        t_one = clock() - t0
        calls += 1
        if calls >= 2 and clock() - t_start >= max(0.05 * budget, 0.02) or calls >= 5000 \
                or t_one > max(0.05 * budget, 0.02):
            return max(1, int(math.ceil(sample_floor / max(t_one, 1e-9))))


def settle(fn, seconds=0.02):
    """Call fn for `seconds` (once at least): lets the previous contender's idle threads stop
    spinning and brings fn's own data back into cache."""
    t_end = time.perf_counter() + seconds
    fn()
    while time.perf_counter() < t_end:
        fn()


def samples_for(fn, number, budget, min_samples):
    """Per-call seconds of batches of `number` calls, for about `budget` seconds."""
    clock = time.perf_counter
    samples = []
    t_end = clock() + budget
    while len(samples) < min_samples or clock() < t_end:
        t0 = clock()
        for _ in range(number):
            fn()
        samples.append((clock() - t0) / number)
    return samples


def measure(fns, budget, rounds, min_samples=3):
    """Median seconds per call of each of fns (a dict), spending about `budget` seconds on each,
    in `rounds` turns (see Timing)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        numbers = {name: calls_per_sample(fn, budget) for name, fn in fns.items()}
        samples = {name: [] for name in fns}
        per_round = max(1, math.ceil(min_samples / rounds))
        for _ in range(rounds):
            for name, fn in fns.items():
                settle(fn)
                samples[name] += samples_for(fn, numbers[name], budget / rounds, per_round)
        return {name: statistics.median(s) for name, s in samples.items()}
    finally:
        if gc_was_enabled:
            gc.enable()


class LoadMonitor:
    """CPUs' worth of time spent by *other* processes between start() and stop().

    The kernels' threads synchronise, so on a 2-core machine a single busy neighbour (a compiler,
    a test run) makes multithreaded timings (bnorm's and torch's) jump by scheduler quanta; the
    suite re-runs such cases and flags them.  Linux only (reads /proc/stat); elsewhere 0.
    """

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _snap(self):
        try:
            with open("/proc/stat") as f:
                v = [int(a) for a in f.readline().split()[1:9]]
        except (OSError, ValueError):
            v = [0] * 8
        return sum(v) - v[3] - v[4], time.process_time(), time.perf_counter()

    def start(self):
        self.t0 = self._snap()

    def wait_quiet(self, max_load, timeout, window=1.0):
        """Sleep until other processes used at most max_load CPUs over a window (or timeout)."""
        t_end = time.perf_counter() + timeout
        while time.perf_counter() < t_end:
            self.start()
            time.sleep(window)
            if self.stop() <= max_load:
                return True
        return False

    def stop(self):
        busy1, own1, wall1 = self._snap()
        busy0, own0, wall0 = self.t0
        return max(0.0, ((busy1 - busy0) / self.tick - (own1 - own0)) / max(wall1 - wall0, 1e-9))


# --------------------------------------------------------------------------------------------
# cross-check: all peers compute the same thing on the same arrays

def check(case, outputs):
    """Compare each peer's (y, dx, dgamma, dbeta) with bnorm's; return a list of problems."""
    names = ("y", "dx", "dgamma", "dbeta")
    ref_name, ref = next(iter(outputs.items()))
    ref = [np.asarray(a, np.float64) for a in ref]
    rtol = 1e-3 if case.dtype == np.float32 else 1e-9
    problems = []
    for peer, outs in list(outputs.items())[1:]:
        for n, a, r in zip(names, outs, ref):
            a = np.asarray(a, np.float64)
            scale = max(np.abs(r).max(), 1.0)   # dgamma, dbeta are sums of M terms
            err = np.abs(a - r).max() / scale if a.shape == r.shape else np.inf
            if not err <= rtol:
                problems.append(f"{case.name} {case.dtype}: {peer} {n} differs from {ref_name} "
                                f"(max rel err {err:.2g})")
    return problems


# --------------------------------------------------------------------------------------------
# driver

def fmt_time(t):
    if t is None:
        return "n/a"
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t * 1e9:.3g} ns"


def fmt_ratio(r):
    return "n/a" if r is None else f"{r:.2f}x"


def ratio(a, b):
    return None if a is None or b is None else a / b


def time_case(case, args, torch):
    """{op: {contender: seconds per call}} for one case, and the cross-check's problems."""
    peers = {}
    ops, outs = bnorm_ops(case)
    peers["bnorm"] = ops
    outputs = {"bnorm": outs}
    if not args.no_out:
        peers["bnorm (out=)"], outputs["bnorm (out=)"] = bnorm_ops(case, use_out=True)
    peers["NumPy (post)"], outputs["NumPy (post)"] = numpy_ops(case)
    if torch is not None:
        peers["PyTorch"], outputs["PyTorch"] = torch_ops(case, torch)
    problems = [] if args.no_check else check(case, {k: f() for k, f in outputs.items()})
    copy = copy_op(case)
    times = {}
    for op in OPS:
        fns = {name: ops[op] for name, ops in peers.items()}
        fns["copy"] = copy
        times[op] = measure(fns, args.budget, args.rounds)
    return times, problems


def time_case_when_quiet(case, label, args, torch, monitor):
    """time_case, re-run (after waiting for a quiet second) while other processes kept the CPUs
    busy; also returns their load during the last attempt."""
    for attempt in range(args.retries + 1):
        print(f"# {label} ...", end="", file=sys.stderr, flush=True)
        monitor.start()
        times, problems = time_case(case, args, torch)
        load = monitor.stop()
        print(f" other processes used {load:.2f} CPUs", file=sys.stderr, flush=True)
        if load <= args.max_load:
            break
        if attempt < args.retries:
            monitor.wait_quiet(args.max_load, timeout=60)
    return times, problems, load


def median_times(runs):
    """The median over runs (lists of time_case's results) of each op's and contender's time."""
    return {op: {name: statistics.median(r[op][name] for r in runs) for name in runs[0][op]}
            for op in runs[0]}


def case_rows(meta, times):
    """Table rows of one case from its times; meta: the case's name, group, dtype and nbytes."""
    rows = []
    for op in OPS:
        t = times[op]
        copy_bw = 2 * meta["nbytes"] / t["copy"] / 1e9
        tb = t["bnorm"]
        bw = BYTES_PER_ELEM_PASS[op] * meta["nbytes"] / tb / 1e9
        tout = t.get("bnorm (out=)")
        rows.append({
            "case": meta["name"], "group": meta["group"], "dtype": meta["dtype"], "op": op,
            "large": meta["nbytes"] >= LARGE_BYTES,
            "bnorm": tb, "bnorm_out": tout, "numpy": t["NumPy (post)"],
            "torch": t.get("PyTorch"),
            "vs_numpy": ratio(t["NumPy (post)"], tb), "vs_torch": ratio(t.get("PyTorch"), tb),
            "bw": bw, "copy_bw": copy_bw, "pct": 100 * bw / copy_bw,
            "pct_out": None if tout is None else
            100 * BYTES_PER_ELEM_PASS[op] * meta["nbytes"] / tout / 1e9 / copy_bw,
        })
    return rows


def keep_freed_memory():
    """glibc only: never trim the heap, map blocks of their own only from 32 MiB (its largest
    mmap threshold), and stop adjusting both; see "Memory" above.  True if glibc took them."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def header_lines(args, torch):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    tv = torch.__version__ if torch is not None else "not installed (n/a)"
    return [
        f"bnorm {bnorm.__version__}, NumPy {np.__version__}, PyTorch {tv}, Python "
        f"{platform.python_version()}; CPU: {cpu}, {os.cpu_count()} logical CPUs; "
        f"threads: bnorm {bnorm.get_num_threads()}, torch "
        f"{torch.get_num_threads() if torch is not None else 'n/a'}; glibc "
        f"{'thresholds fixed (peers keep their pages)' if args.kept_memory else 'as it is'}.",
        "",
        f"Times: median per call after warm-up; an operation's contenders (and the copy) take "
        f"turns, {args.rounds} rounds"
        + (f"; each time the median of {args.repeats} runs of the suite" if args.repeats > 1
           else "") + ". Speed-ups are peer time / bnorm time "
        "(**> 1 means bnorm is faster**); bnorm is called as a user would (fresh outputs); "
        "`bnorm (out=)` writes into preallocated arrays.",
        "Bandwidth: minimal bytes / bnorm time, with B = bytes of x: train fwd 3B (read x twice, "
        "write y), train bwd 5B (read x and dy twice, write dx), fwd+bwd 8B, infer fwd 2B "
        "(read x, write y). Copy: `np.copyto` between two contiguous arrays of x's size, timed "
        "with the operation, 2B (read + write), single-threaded. `% copy` = bnorm GB/s / copy "
        "GB/s (`out=`: the same with the out= time).",
    ]


def table(rows, show_out):
    cols = ["case", "dtype", "op", "bnorm"]
    if show_out:
        cols.append("bnorm (out=)")
    cols += ["NumPy (post)", "PyTorch", "NumPy/bnorm", "PyTorch/bnorm", "bnorm GB/s",
             "copy GB/s", "% copy"]
    if show_out:
        cols.append("% copy (out=)")
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(cols))) + "|"]
    for r in rows:
        cells = [r["case"], r["dtype"], OP_NAMES[r["op"]], fmt_time(r["bnorm"])]
        if show_out:
            cells.append(fmt_time(r["bnorm_out"]))
        cells += [fmt_time(r["numpy"]), fmt_time(r["torch"]), fmt_ratio(r["vs_numpy"]),
                  fmt_ratio(r["vs_torch"]), f"{r['bw']:.1f}", f"{r['copy_bw']:.1f}",
                  f"{r['pct']:.0f}%"]
        if show_out:
            cells.append(f"{r['pct_out']:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary(rows):
    def stat(sel, key, with_min=True):
        vals = [r[key] for r in sel if r[key] is not None]
        if not vals:
            return "n/a"
        return f"{statistics.median(vals):.2f}x" + (f" [{min(vals):.2f}x]" if with_min else "")

    out = ["Summary: median [min] speed-up of bnorm over all ops and dtypes of a group; then the "
           "median for the full step (fwd+bwd) alone and its median % of copy bandwidth.", ""]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    for label, sel in [(g, [r for r in rows if r["group"] == g]) for g in groups] + \
            [("large cases (x >= 8 MiB)", [r for r in rows if r["large"]]),
             ("small cases", [r for r in rows if not r["large"]]), ("all", rows)]:
        steps = [r for r in sel if r["op"] == "step"]
        if not steps:
            continue
        out.append(f"- {label}: vs NumPy {stat(sel, 'vs_numpy')}, vs PyTorch "
                   f"{stat(sel, 'vs_torch')}; full step vs NumPy "
                   f"{stat(steps, 'vs_numpy', False)}, vs PyTorch "
                   f"{stat(steps, 'vs_torch', False)}, "
                   f"{statistics.median(r['pct'] for r in steps):.0f}% of copy")
    slower = [f"{r['case']} {r['dtype']} {OP_NAMES[r['op']]} ({who} {v:.2f}x)"
              for r in rows for who, v in (("vs NumPy", r["vs_numpy"]),
                                           ("vs PyTorch", r["vs_torch"]))
              if v is not None and v < 1]
    out += ["", "bnorm slower than a peer: " + ("; ".join(slower) if slower else "none") + "."]
    return out


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(8, 0.55 * len(rows) / len(ops) + 3),
                                                   3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        sel = [r for r in rows if r["op"] == op]
        pos = np.arange(len(sel))
        w = 0.4
        for k, (key, label) in enumerate((("vs_numpy", "NumPy (post) / bnorm"),
                                          ("vs_torch", "PyTorch / bnorm"))):
            vals = [r[key] if r[key] is not None else np.nan for r in sel]
            ax.bar(pos + (k - 0.5) * w, vals, w, label=label)
        ax.axhline(1, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("speed-up (>1: bnorm faster)")
        ax.set_title(OP_NAMES[op])
        ax.set_xticks(pos)
        ax.set_xticklabels([f"{r['case'].split(' = ')[0]} f{r['dtype'][5:]}" for r in sel],
                           rotation=30, ha="right", fontsize=7)
        ax.grid(axis="y", which="both", alpha=0.3)
    # one legend above the charts, where it hides no bar
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=120)


def import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="float32 and a few shapes only (under a minute)")
    p.add_argument("--threads", type=int, help="threads for bnorm and torch")
    p.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    p.add_argument("--plot", metavar="PNG", help="bar chart of the speed-ups (needs matplotlib)")
    p.add_argument("--budget", type=float, help="seconds per measurement (default 0.3, "
                   "--quick 0.1)")
    p.add_argument("--rounds", type=int, default=3,
                   help="turns the contenders of an operation take at the budget (see Timing)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the suite this many times and report each time's median (a "
                   "machine's slow phases last longer than one case)")
    p.add_argument("--dtype", choices=("float32", "float64"), action="append",
                   help="restrict to this dtype (repeatable)")
    p.add_argument("--case", action="append", metavar="TEXT",
                   help="only the cases whose name contains TEXT, e.g. 'NC (4096' (repeatable)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    p.add_argument("--glibc-defaults", action="store_true",
                   help="leave glibc's trim and mmap thresholds as they are (see Memory)")
    p.add_argument("--no-out", action="store_true", help="skip the bnorm (out=) column")
    p.add_argument("--no-check", action="store_true",
                   help="skip the cross-check of the peers' results")
    p.add_argument("--max-load", type=float, default=0.1,
                   help="re-run a case if other processes used more CPUs than this meanwhile")
    p.add_argument("--retries", type=int, default=2,
                   help="re-runs of a case on a busy machine (each after waiting, up to 60 s, "
                   "for a quiet second)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        p.error("--rounds and --repeats must be at least 1")
    if args.budget is None:
        args.budget = 0.1 if args.quick else 0.3
    dtypes = args.dtype or (["float32"] if args.quick else ["float32", "float64"])

    args.kept_memory = not args.glibc_defaults and keep_freed_memory()
    if args.threads is not None:
        bnorm.set_num_threads(args.threads)
    torch = None if args.no_torch else import_torch()
    if torch is not None:
        torch.set_num_threads(bnorm.get_num_threads())

    t0 = time.perf_counter()
    runs, problems, busy = {}, [], []
    monitor = LoadMonitor()
    for repeat in range(args.repeats):
        for make in make_cases(args.quick, dtypes, args.case):
            case = make()
            label = f"{case.name} {case.dtype}" + \
                (f" (run {repeat + 1}/{args.repeats})" if args.repeats > 1 else "")
            times, pr, load = time_case_when_quiet(case, label, args, torch, monitor)
            if load > args.max_load:
                busy.append(f"{label} ({load:.2f} CPUs)")
            meta = {"name": case.name, "group": case.group, "dtype": str(case.dtype),
                    "nbytes": case.nbytes}
            runs.setdefault((meta["name"], meta["dtype"]), (meta, []))[1].append(times)
            problems += [p for p in pr if p not in problems]
            del case
    rows = [row for meta, times in runs.values() for row in case_rows(meta, median_times(times))]
    elapsed = time.perf_counter() - t0

    lines = header_lines(args, torch) + [""] + table(rows, not args.no_out) + [""] + \
        summary(rows)
    if busy:
        lines += ["", f"**Other processes were busy (> {args.max_load} CPUs on average) while "
                  f"timing, even after {args.retries} retries; these rows are unreliable:** "
                  + "; ".join(busy) + "."]
    if problems:
        lines += ["", "**Cross-check problems:**"] + [f"- {s}" for s in problems]
    lines += ["", f"Suite time: {elapsed:.0f} s."]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)
    if args.plot:
        try:
            plot(rows, args.plot)
        except ImportError:
            print("--plot needs matplotlib", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
