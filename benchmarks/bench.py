#!/usr/bin/env python
"""Benchmark bnorm against the blog post's NumPy code and PyTorch CPU.

Run after installing bnorm (``pip install .``; add ``'.[bench]'`` for PyTorch and the plot)::

    python benchmarks/bench.py                 # full suite, a few minutes
    python benchmarks/bench.py --quick         # float32 and half, a few shapes, about a minute
    python benchmarks/bench.py --threads 1 --markdown results.md --plot speedup.png
    python benchmarks/bench.py --scaling       # the training step from 4 KiB to 1 GiB: scaling.png

Peers, timed in the same process on the same arrays:

* ``bnorm``: ``bnorm.forward`` / ``bnorm.backward`` called as a user would (fresh outputs);
* ``bnorm (out=)``: the same with preallocated ``out=`` arrays (no allocation / page faults);
* ``NumPy (post)``: ``bnorm.reference.forward`` / ``backward``, the post's NumPy expressions;
* ``PyTorch``: ``torch.nn.functional.batch_norm`` on ``torch.from_numpy`` views of the same
  buffers (no copies: the NHWC cases are ``permute(0, 3, 1, 2)`` views in
  ``torch.channels_last``; design matrices are ``(N, C)``; the strided-view case is handed to
  torch as the strided view it is, so any copy torch makes is timed), with
  ``torch.set_num_threads(bnorm.get_num_threads())``.

Half precision (float16, and bfloat16 when ml_dtypes is installed): mixed precision as in a
training step, x and dy (and y, dx) half, gamma, beta and the running statistics float32 (mean and
rstd come back float32, dgamma and dbeta float32).  The half rows have a table and a summary of
their own, and their peers are:

* ``bnorm`` and ``bnorm (out=)`` on the half arrays;
* ``bnorm float32``: bnorm on the same values widened to float32 (same layout, a strided view of a
  widened base for the view case); ``float32/bnorm`` is its time / the half time, what half
  storage gains;
* ``NumPy (post)``: the post's code on float16 arrays (it computes in float16, its sums included;
  gamma and beta rounded to float16 by it).  Not for bfloat16 ("—"; NumPy has no bfloat16 of its
  own).  Its float16 sums overflow or drift on the larger cases: where its results fail the
  cross-check it is not timed (shown as "wrong", its errors listed under the table);
* ``PyTorch``: ``batch_norm`` on a ``torch.float16`` / ``torch.bfloat16`` tensor (views of the
  same buffers, laid out as for float32) with float32 weight, bias and running statistics.

ReLU rows (issue 16): the training step (fwd+bwd) of batch norm followed by a ReLU, float32 and
float64, on NHWC (64,56,56,64) and NCHW (64,64,56,56) axis=1 (``--quick``: NHWC (8,112,112,32)
float32; ``--relu-cases all``: every case run, ``none``: no ReLU rows).  A table and a summary of
their own, and their peers, each a forward + backward with fresh outputs:

* ``bnorm fused``: ``bnorm.forward(..., activation="relu")`` and
  ``bnorm.backward(..., beta=beta, activation="relu")`` (the mask recomputed from x);
* ``bnorm + NumPy ReLU``: what a user writes without the fusion, ``y = np.maximum(bnorm.forward(
  ...)[0], 0)`` and ``bnorm.backward(dy * (y > 0), ...)``;
* ``NumPy (post) + ReLU``: the post's code (``bnorm.reference``) with the same ``np.maximum`` and
  mask;
* ``PyTorch``: ``torch.relu(F.batch_norm(...))`` then ``torch.autograd.grad`` with dy, the
  tensors laid out as in the ``step`` rows.

Their cross-check: bnorm fused against bnorm + NumPy ReLU bit for bit (y everywhere; dx, dgamma,
dbeta in every feature without a pre-activation within rounding of zero, where the fused
backward's recomputed mask may fall on the other side: those features within what their
near-zero elements can change), and the other peers' y against bnorm's, their gradients against
bnorm's unfused backward through the peer's own mask (``y > 0`` of its y), with the tolerances of
the cross-check below.

Family rows (issue 15): layer norm and RMS norm on (4096,1024) and (32,512,768) (the last axis
normalized), group norm with 32 groups on (32,64,56,56) NCHW and on the same data NHWC
(``axis=-1``), float32 and float64, ops ``fwd``, ``bwd`` and ``step`` (``--quick``: LayerNorm
(4096,1024) and GroupNorm NCHW, float32; ``--family-cases small``: every kind on small shapes,
a smoke test; ``none``: no family rows).  eps 1e-5 everywhere.  A table and a summary of their
own, and their peers:

* ``bnorm``: ``bnorm.layer_norm`` / ``rms_norm`` / ``group_norm`` and their backwards, fresh
  outputs;
* ``NumPy``: the textbook code of ``bnorm.reference`` (``layer_norm_forward`` /
  ``layer_norm_backward`` with their cache tuple, the RMS norm and NCHW group norm alike); for
  NHWC group norm the user's transposes around it (``x.transpose(0, 3, 1, 2)`` in, the results
  transposed back as views);
* ``PyTorch``: ``F.layer_norm`` / ``F.rms_norm`` / ``F.group_norm`` under autograd (the NHWC case
  as a ``channels_last`` view of the same buffer), the same ops as for batch norm.

Their cross-check: every peer's y, dx, dgamma (and dbeta) against bnorm's, with the tolerances
of the cross-check below.  Bandwidth counts what a kernel that keeps a row (or a group) in cache
moves: fwd 2B (read x, write y), bwd 3B (read x and dy, write dx), step 5B.

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

Bandwidth: minimal bytes moved by a fused kernel, where ``B = x.size * itemsize`` (an itemsize
of 2 for the half rows): training forward 3B (read x twice, write y), backward 5B (read x and dy
twice, write dx), full step 8B, inference 2B (read x, write y).  ``copy GB/s`` is ``np.copyto``
between two contiguous arrays of x's size (and dtype), timed in turns with each operation's
contenders, counting 2B (read + write); NumPy's copy is single-threaded.

Large cases: x of at least 8 MiB; for the half rows, the shapes whose float32 x is, so that a shape
is large or small in every dtype.  ``--quick`` runs the float32 rows of five shapes and the half
rows of two of them, one large (NHWC (8,112,112,32)) and one small (NC (256,1024)), and the ReLU
rows of NHWC (8,112,112,32) float32.

Cross-check: before timing, each peer's y, dx, dgamma and dbeta are compared with bnorm's
(float32, float64 rows: max error relative to the largest value, 1e-3 for float32) or, for a half
row, with the post's code evaluated in float64 on the same half values (every peer, bnorm
included, within HALF_ULPS epsilons of the half dtype, relative to the largest value; the post's
float16 code within POST_HALF_ULPS).
"""
import argparse
import contextlib
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

try:
    import ml_dtypes
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:     # a bench/test extra, never required: no bfloat16 rows without it
    BFLOAT16 = None

OPS = ("fwd", "bwd", "step", "infer")
OP_NAMES = {"fwd": "train fwd", "bwd": "train bwd", "step": "fwd+bwd", "infer": "infer fwd"}
BYTES_PER_ELEM_PASS = {"fwd": 3, "bwd": 5, "step": 8, "infer": 2}
EPS = 1e-8            # bnorm's and the post's default
MOMENTUM = 0.9          # bnorm / post convention (weight of the old value); torch gets 1 - 0.9
LARGE_BYTES = 8 << 20   # cases with x at least this big count as "large" (half rows: see Large)
HALF_NAMES = ("float16", "bfloat16")
# cross-check tolerances of the half rows, in epsilons of the half dtype relative to the largest
# value: the peers that compute in float32 are within 0.5 of the float64 result (rounding), the
# post's code, which sums in float16, within 4 on 256 rows and beyond 40 on 4096
HALF_ULPS = 4
POST_HALF_ULPS = 8


# --------------------------------------------------------------------------------------------
# cases

class Case:
    """One benchmark input: x (maybe a strided view), dy, per-feature params, and its layout.

    layout is "nhwc" (features last, torch sees an NCHW channels_last view), "nchw" (axis=1) or
    "nc" (design matrix (N, C), axis=-1).
    """

    def __init__(self, name, group, shape, layout, dtype, view=None, relu=False, seed=0):
        self.name, self.group, self.layout = name, group, layout
        self.relu = relu    # also time the ReLU rows' step
        self.dtype = np.dtype(dtype)
        self.half = self.dtype.name in HALF_NAMES
        # half rows: the values drawn in float32 (the same draws as the float32 row's) then
        # rounded to half; gamma, beta and the running statistics stay float32
        self.pdtype = np.dtype(np.float32) if self.half else self.dtype
        rng = np.random.default_rng(seed)
        self.index = None
        if view is None:
            self.base = None
            self.x = self._randn(rng, shape, 2, 0.5)
        else:
            base_shape, self.index = view
            self.base = self._randn(rng, base_shape, 2, 0.5)
            self.x = self.base[self.index]
            assert self.x.shape == tuple(shape) and not self.x.flags.c_contiguous
        self.dy = self._randn(rng, shape)
        self.axis = 1 if layout == "nchw" else -1
        c = shape[self.axis]
        pd = self.pdtype
        self.gamma = (1 + 0.1 * rng.standard_normal((c,), dtype=pd)).astype(pd)
        self.beta = (0.1 * rng.standard_normal((c,), dtype=pd)).astype(pd)
        self.run_mean = (0.1 * rng.standard_normal((c,), dtype=pd)).astype(pd)
        self.run_var = (1 + 0.1 * np.abs(rng.standard_normal((c,), dtype=pd))).astype(pd)

    def _randn(self, rng, shape, scale=1, shift=0):
        a = rng.standard_normal(shape, dtype=self.pdtype)
        if scale != 1 or shift != 0:
            a = a * scale + shift
        return a.astype(self.dtype, copy=False)

    def widened(self, dtype=np.float32):
        """x and dy widened to dtype, laid out as x and dy are (x a view of a widened base)."""
        if self.base is None:
            x = self.x.astype(dtype)
        else:
            x = self.base.astype(dtype)[self.index]
        return x, self.dy.astype(dtype)

    @property
    def nbytes(self):
        return self.x.size * self.x.itemsize

    @property
    def large(self):
        return self.x.size * (4 if self.half else self.x.itemsize) >= LARGE_BYTES

    def stats(self):
        """Fresh copies of the running statistics (each peer updates its own in place)."""
        return self.run_mean.copy(), self.run_var.copy()


def shape_str(shape):
    return "(" + ",".join(map(str, shape)) + ")"


FULL, HALF = "full", "half"     # what --quick runs a case in: float32/float64 rows, half rows
SUITE, QUICK = "suite", "quick"  # the runs in which a case has ReLU rows (float32/float64 only)
CASES = [
    # name, group, shape, layout, view, in --quick (float32 and/or half rows), ReLU rows in
    ("NHWC {}", "channels-last", (64, 56, 56, 64), "nhwc", None, (), (SUITE,)),
    ("NHWC {}", "channels-last", (256, 14, 14, 256), "nhwc", None, (), ()),
    ("NHWC {}", "channels-last", (8, 112, 112, 32), "nhwc", None, (FULL, HALF), (QUICK,)),
    ("NCHW {} axis=1", "channels-first", (64, 64, 56, 56), "nchw", None, (FULL,), (SUITE,)),
    ("NC {}", "design", (32, 64), "nc", None, (FULL,), ()),
    ("NC {}", "design", (256, 1024), "nc", None, (FULL, HALF), ()),
    ("NC {}", "design", (4096, 1024), "nc", None, (), ()),
    ("NHWC view {} = x[:, ::2] of (64,112,56,64)", "strided view", (64, 56, 56, 64), "nhwc",
     ((64, 112, 56, 64), (slice(None), slice(None, None, 2))), (FULL,), ()),
]


def make_cases(quick, dtypes, only=None, relu="default"):
    """Case constructors (a case's arrays are built only when it runs, then freed); only: keep
    the cases whose name contains one of these strings; relu: which float32/float64 cases get
    ReLU rows ("default": those of CASES for this run, "all", "none")."""
    for dtype in dtypes:
        kind = HALF if np.dtype(dtype).name in HALF_NAMES else FULL
        for name, group, shape, layout, view, in_quick, relu_in in CASES:
            full_name = name.format(shape_str(shape))
            if only and not any(o in full_name for o in only):
                continue
            if kind in in_quick or not quick:
                with_relu = kind == FULL and (relu == "all" or relu == "default" and
                                              (QUICK if quick else SUITE) in relu_in)
                yield functools.partial(Case, full_name, group, shape, layout, dtype, view,
                                        with_relu)


# --------------------------------------------------------------------------------------------
# peers: each returns {op: zero-argument callable} for a case, plus the outputs of one step for
# the cross-check (y, dx, dgamma, dbeta as NumPy arrays in x's layout)

def bnorm_ops(case, use_out=False, widen=False):
    """widen: on x and dy widened to float32 (the "bnorm float32" peer of a half row)."""
    x, dy, g, b, ax = case.x, case.dy, case.gamma, case.beta, case.axis
    if widen:
        x, dy = case.widened()
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


def torch_layout(case, torch):
    """(to_t, to_np): a case's NumPy array as the tensor torch gets (a view of the same buffer),
    and a tensor back as a NumPy array in x's layout."""
    bf16 = case.dtype == BFLOAT16

    def from_numpy(a):  # torch knows no ml_dtypes: bfloat16 goes through its bits
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if bf16 else \
            torch.from_numpy(a)

    def numpy_of(t):
        t = t.detach()
        return t.view(torch.int16).numpy().view(BFLOAT16) if t.dtype == torch.bfloat16 else \
            t.numpy()

    if case.layout == "nhwc":
        def to_t(a):    # NHWC buffer -> NCHW view, channels_last (no copy when contiguous)
            t = from_numpy(a).permute(0, 3, 1, 2)
            if a.flags.c_contiguous:
                t = t.contiguous(memory_format=torch.channels_last)
            return t

        def to_np(t):
            return numpy_of(t.permute(0, 2, 3, 1))
    else:
        to_t = from_numpy
        to_np = numpy_of
    return to_t, to_np


def torch_ops(case, torch):
    F = torch.nn.functional
    to_t, to_np = torch_layout(case, torch)
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


RELU_PEERS = ("bnorm fused", "bnorm + NumPy ReLU", "NumPy (post) + ReLU", "PyTorch")


def relu_ops(case, torch):
    """The ReLU rows' peers: {peer: training step (fwd+bwd) of batch norm + ReLU}, and {peer:
    callable giving one step's (y, dx, dgamma, dbeta) as NumPy arrays in x's layout}."""
    x, dy, g, b, ax = case.x, case.dy, case.gamma, case.beta, case.axis
    kw = dict(axis=ax, eps=EPS, momentum=MOMENTUM)
    steps = {}

    rm, rv = case.stats()

    def fused():
        y, m, r = bnorm.forward(x, g, b, running_mean=rm, running_var=rv, activation="relu",
                                **kw)
        return (y,) + bnorm.backward(dy, x, m, r, g, axis=ax, beta=b, activation="relu")
    steps["bnorm fused"] = fused

    def unfused(fwd, bwd):
        rm, rv = case.stats()

        def step():
            y, m, r = fwd(x, g, b, running_mean=rm, running_var=rv, **kw)
            y = np.maximum(y, 0)
            return (y,) + bwd(dy * (y > 0), x, m, r, g, axis=ax)
        return step
    steps["bnorm + NumPy ReLU"] = unfused(bnorm.forward, bnorm.backward)
    steps["NumPy (post) + ReLU"] = unfused(reference.forward, reference.backward)
    outputs = dict(steps)

    if torch is not None:
        F = torch.nn.functional
        to_t, to_np = torch_layout(case, torch)
        tdy = to_t(case.dy)
        xg = to_t(case.x).detach().requires_grad_()
        gg = torch.from_numpy(case.gamma.copy()).requires_grad_()
        bg = torch.from_numpy(case.beta.copy()).requires_grad_()
        trm, trv = (torch.from_numpy(a) for a in case.stats())
        inputs = (xg, gg, bg)

        def torch_step():
            y = torch.relu(F.batch_norm(xg, trm, trv, gg, bg, training=True,
                                        momentum=1 - MOMENTUM, eps=EPS))
            return (y,) + torch.autograd.grad(y, inputs, tdy)
        steps["PyTorch"] = torch_step

        def torch_outputs():
            y, dx, dg, db = torch_step()
            return to_np(y), to_np(dx), dg.numpy(), db.numpy()
        outputs["PyTorch"] = torch_outputs
    return steps, outputs


# --------------------------------------------------------------------------------------------
# the family (issue 15): layer norm, RMS norm, group norm

FAMILY_OPS = ("fwd", "bwd", "step")
FAMILY_OP_NAMES = {"fwd": "fwd", "bwd": "bwd", "step": "fwd+bwd"}
FAMILY_BYTES = {"fwd": 2, "bwd": 3, "step": 5}   # read x (and dy) once, write once
FAMILY_EPS = 1e-5
SMALL = "small"     # --family-cases small: every kind on small shapes
FAMILY_CASES = [
    # name, kind, shape (NCHW for group norm: its NHWC case is the same data transposed),
    # layout, groups, the runs it is in
    ("LayerNorm {}", "layer norm", (4096, 1024), "rows", None, (SUITE, QUICK)),
    ("LayerNorm {}", "layer norm", (32, 512, 768), "rows", None, (SUITE,)),
    ("RMSNorm {}", "RMS norm", (4096, 1024), "rows", None, (SUITE,)),
    ("RMSNorm {}", "RMS norm", (32, 512, 768), "rows", None, (SUITE,)),
    ("GroupNorm NCHW {} groups=32", "group norm", (32, 64, 56, 56), "nchw", 32, (SUITE, QUICK)),
    ("GroupNorm NHWC {} groups=32 axis=-1", "group norm", (32, 64, 56, 56), "nhwc", 32,
     (SUITE,)),
    ("LayerNorm {}", "layer norm", (64, 256), "rows", None, (SMALL,)),
    ("RMSNorm {}", "RMS norm", (4, 16, 96), "rows", None, (SMALL,)),
    ("GroupNorm NCHW {} groups=4", "group norm", (4, 16, 8, 8), "nchw", 4, (SMALL,)),
    ("GroupNorm NHWC {} groups=4 axis=-1", "group norm", (4, 16, 8, 8), "nhwc", 4, (SMALL,)),
]


class FamilyCase:
    """One family benchmark input: x, dy (NHWC: the NCHW draws transposed, made contiguous),
    gamma and beta, in float32 or float64."""

    def __init__(self, name, kind, shape, layout, groups, dtype, seed=0):
        self.name, self.group, self.kind, self.layout = name, kind, kind, layout
        self.groups = groups
        self.dtype = np.dtype(dtype)
        rng = np.random.default_rng(seed)
        x = (rng.standard_normal(shape, dtype=self.dtype) * 2 + 0.5).astype(self.dtype)
        dy = rng.standard_normal(shape, dtype=self.dtype)
        if layout == "nhwc":
            x, dy = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (x, dy))
        self.x, self.dy = x, dy
        self.axis = {"rows": -1, "nchw": 1, "nhwc": -1}[layout]
        n = x.shape[self.axis]
        self.gamma = (1 + 0.1 * rng.standard_normal((n,))).astype(self.dtype)
        self.beta = (0.1 * rng.standard_normal((n,))).astype(self.dtype)

    @property
    def nbytes(self):
        return self.x.size * self.x.itemsize

    @property
    def large(self):
        return self.nbytes >= LARGE_BYTES


def make_family_cases(quick, dtypes, only=None, which="default"):
    """FamilyCase constructors for this run (float32/float64 of dtypes; only: as make_cases)."""
    if which == "none":
        return
    run = SMALL if which == SMALL else QUICK if quick else SUITE
    for dtype in dtypes:
        if np.dtype(dtype).name not in ("float32", "float64"):
            continue
        for name, kind, shape, layout, groups, runs in FAMILY_CASES:
            shown = shape if layout != "nhwc" else (shape[0],) + shape[2:] + (shape[1],)
            full_name = name.format(shape_str(shown))
            if run not in runs or only and not any(o in full_name for o in only):
                continue
            yield functools.partial(FamilyCase, full_name, kind, shape, layout, groups, dtype)


def family_bnorm_ops(case):
    x, dy, g, b, ax, G = case.x, case.dy, case.gamma, case.beta, case.axis, case.groups
    if case.kind == "layer norm":
        def fwd():
            return bnorm.layer_norm(x, g, b, axis=ax, eps=FAMILY_EPS)

        def bwd_of(y, mean, rstd):
            return bnorm.layer_norm_backward(dy, x, mean, rstd, g, axis=ax)
    elif case.kind == "RMS norm":
        def fwd():
            return bnorm.rms_norm(x, g, axis=ax, eps=FAMILY_EPS)

        def bwd_of(y, rrms):
            return bnorm.rms_norm_backward(dy, x, rrms, g, axis=ax)
    else:
        def fwd():
            return bnorm.group_norm(x, G, g, b, axis=ax, eps=FAMILY_EPS)

        def bwd_of(y, mean, rstd):
            return bnorm.group_norm_backward(dy, x, mean, rstd, G, g, axis=ax)
    saved = fwd()

    def step():
        out = fwd()
        return (out[0],) + bwd_of(*out)

    return {"fwd": fwd, "bwd": lambda: bwd_of(*saved), "step": step}, step


def family_numpy_ops(case):
    """The textbook NumPy code of bnorm.reference; NHWC group norm through transposed views."""
    x, dy, g, b, G = case.x, case.dy, case.gamma, case.beta, case.groups
    if case.kind == "layer norm":
        def fwd():
            return reference.layer_norm_forward(x, g, b, FAMILY_EPS)
        bwd_of = reference.layer_norm_backward
    elif case.kind == "RMS norm":
        def fwd():
            return reference.rms_norm_forward(x, g, FAMILY_EPS)
        bwd_of = reference.rms_norm_backward
    elif case.layout == "nchw":
        def fwd():
            return reference.group_norm_forward(x, g, b, G, FAMILY_EPS)
        bwd_of = reference.group_norm_backward
    else:
        to_nchw, to_nhwc = (0, 3, 1, 2), (0, 2, 3, 1)

        def fwd():
            y, cache = reference.group_norm_forward(x.transpose(to_nchw), g, b, G, FAMILY_EPS)
            return y.transpose(to_nhwc), cache

        def bwd_of(dy, cache):
            dx, dgamma, dbeta = reference.group_norm_backward(dy.transpose(to_nchw), cache)
            return dx.transpose(to_nhwc), dgamma, dbeta
    saved = fwd()[1]

    def step():
        y, cache = fwd()
        return (y,) + bwd_of(dy, cache)

    return {"fwd": fwd, "bwd": lambda: bwd_of(dy, saved), "step": step}, step


def family_torch_ops(case, torch):
    F = torch.nn.functional
    if case.layout == "nhwc":   # an NCHW view of the NHWC buffer: channels_last, no copy
        def to_t(a):
            return torch.from_numpy(a).permute(0, 3, 1, 2)

        def to_np(t):
            return t.detach().permute(0, 2, 3, 1).numpy()
    else:
        to_t = torch.from_numpy

        def to_np(t):
            return t.detach().numpy()
    x, dy = to_t(case.x), to_t(case.dy)
    assert x.data_ptr() == case.x.ctypes.data and dy.data_ptr() == case.dy.ctypes.data
    xg = x.detach().requires_grad_()
    w = torch.from_numpy(case.gamma.copy()).requires_grad_()
    b = torch.from_numpy(case.beta.copy()).requires_grad_()
    shape = case.x.shape[-1:]
    if case.kind == "layer norm":
        def fwd():
            return F.layer_norm(xg, shape, w, b, FAMILY_EPS)
        inputs = (xg, w, b)
    elif case.kind == "RMS norm":
        def fwd():
            return F.rms_norm(xg, shape, w, FAMILY_EPS)
        inputs = (xg, w)
    else:
        def fwd():
            return F.group_norm(xg, case.groups, w, b, FAMILY_EPS)
        inputs = (xg, w, b)
    retained = fwd()

    def step():
        y = fwd()
        return (y,) + torch.autograd.grad(y, inputs, dy)

    def outputs():
        y, dx, *grads = step()
        return (to_np(y), to_np(dx)) + tuple(g.numpy() for g in grads)

    return {"fwd": fwd, "bwd": lambda: torch.autograd.grad(retained, inputs, dy,
                                                           retain_graph=True),
            "step": step}, outputs


def check_family(case, outputs):
    """Each peer's (y, dx, dgamma[, dbeta]) against bnorm's; returns a list of problems."""
    ref = [np.asarray(a, np.float64) for a in outputs["bnorm"]]
    rtol = 1e-3 if case.dtype == np.float32 else 1e-9
    problems = []
    for peer, outs in outputs.items():
        if peer == "bnorm":
            continue
        if len(outs) != len(ref):
            problems.append(f"{case.name} {case.dtype}: {peer} gives {len(outs)} results, "
                            f"bnorm {len(ref)}")
        for n, a, r in zip(OUTPUT_NAMES, outs, ref):
            err = max_rel_err(np.asarray(a, np.float64), r)
            if not err <= rtol:
                problems.append(f"{case.name} {case.dtype}: {peer} {n} differs from bnorm "
                                f"(max rel err {err:.2g})")
    return problems


def time_family_case(case, args, torch):
    """{op: {contender: seconds per call}} of one family case and the cross-check's problems
    (time_case's shape: no half-precision errors, no note)."""
    peers, outputs = {}, {}
    peers["bnorm"], outputs["bnorm"] = family_bnorm_ops(case)
    peers["NumPy"], outputs["NumPy"] = family_numpy_ops(case)
    if torch is not None:
        peers["PyTorch"], outputs["PyTorch"] = family_torch_ops(case, torch)
    problems = []
    if not args.no_check:
        problems = check_family(case, {k: f() for k, f in outputs.items()})
    copy = copy_op(case)
    times = {}
    for op in FAMILY_OPS:
        fns = {name: ops[op] for name, ops in peers.items()}
        fns["copy"] = copy
        times[op] = measure(fns, args.budget, args.rounds)
    return times, problems, [], None


def family_rows(meta, times):
    rows = []
    for op in FAMILY_OPS:
        t = times[op]
        tb = t["bnorm"]
        copy_bw = 2 * meta["nbytes"] / t["copy"] / 1e9
        bw = FAMILY_BYTES[op] * meta["nbytes"] / tb / 1e9
        rows.append({"case": meta["name"], "group": meta["group"], "dtype": meta["dtype"],
                     "op": op, "large": meta["large"], "bnorm": tb, "numpy": t.get("NumPy"),
                     "torch": t.get("PyTorch"), "vs_numpy": ratio(t.get("NumPy"), tb),
                     "vs_torch": ratio(t.get("PyTorch"), tb), "bw": bw, "copy_bw": copy_bw,
                     "pct": 100 * bw / copy_bw})
    return rows


FAMILY_TARGETS = {"vs_torch": 1.5, "vs_numpy_step": 10.0}


def family_lines(rows):
    """The family rows' introduction, table and summary (issue 15's targets)."""
    out = ["Normalization family (layer norm, RMS norm, group norm), eps 1e-5: `NumPy` is the "
           "textbook code of `bnorm.reference` (cache tuple, hand-written backward; NHWC group "
           "norm through transposes), PyTorch `F.layer_norm` / `F.rms_norm` / `F.group_norm` "
           "under autograd (NHWC: channels_last). Speed-ups are peer time / bnorm time. "
           "Bandwidth: fwd 2B (read x, write y), bwd 3B (read x, dy, write dx), fwd+bwd 5B.", ""]
    cols = ["case", "dtype", "op", "bnorm", "NumPy", "PyTorch", "NumPy/bnorm", "PyTorch/bnorm",
            "bnorm GB/s", "copy GB/s", "% copy"]
    out += ["| " + " | ".join(cols) + " |",
            "|" + "|".join("---" if i < 3 else "---:" for i in range(len(cols))) + "|"]
    for r in rows:
        out.append("| " + " | ".join([
            r["case"], r["dtype"], FAMILY_OP_NAMES[r["op"]], fmt_time(r["bnorm"]),
            fmt_time(r["numpy"]),
            fmt_time(r["torch"]), fmt_ratio(r["vs_numpy"]), fmt_ratio(r["vs_torch"]),
            f"{r['bw']:.1f}", f"{r['copy_bw']:.1f}", f"{r['pct']:.0f}%"]) + " |")

    def stat(sel, key):
        vals = [r[key] for r in sel if r[key] is not None]
        return "n/a" if not vals else f"{statistics.median(vals):.2f}x [{min(vals):.2f}x]"

    out += ["", "Summary of the family rows: median [min] speed-up of bnorm over every op, and "
            "over the full step (fwd+bwd) alone. Issue 15's targets, on 2 threads: >= "
            f"{FAMILY_TARGETS['vs_torch']:g}x over PyTorch on every row, >= "
            f"{FAMILY_TARGETS['vs_numpy_step']:g}x over the NumPy baseline on the full step.",
            ""]
    for label, sel in [(k, [r for r in rows if r["group"] == k])
                       for k in dict.fromkeys(r["group"] for r in rows)] + [("all", rows)]:
        steps = [r for r in sel if r["op"] == "step"]
        out.append(f"- {label}: vs NumPy {stat(sel, 'vs_numpy')}, vs PyTorch "
                   f"{stat(sel, 'vs_torch')}; full step vs NumPy {stat(steps, 'vs_numpy')}, vs "
                   f"PyTorch {stat(steps, 'vs_torch')}")
    missed = [f"{r['case']} {r['dtype']} {FAMILY_OP_NAMES[r['op']]} (vs PyTorch "
              f"{r['vs_torch']:.2f}x)"
              for r in rows if r["vs_torch"] is not None
              and r["vs_torch"] < FAMILY_TARGETS["vs_torch"]]
    missed += [f"{r['case']} {r['dtype']} fwd+bwd (vs NumPy {r['vs_numpy']:.2f}x)"
               for r in rows if r["op"] == "step" and r["vs_numpy"] is not None
               and r["vs_numpy"] < FAMILY_TARGETS["vs_numpy_step"]]
    out += ["", "Rows below issue 15's targets: " + ("; ".join(missed) if missed else "none")
            + "."]
    return out


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

OUTPUT_NAMES = ("y", "dx", "dgamma", "dbeta")


def max_rel_err(a, r):
    """Max |a - r| relative to r's largest magnitude (at least 1: dgamma, dbeta are sums of M
    terms); a and r float64."""
    scale = max(np.abs(r).max(), 1.0)
    return np.abs(a - r).max() / scale if a.shape == r.shape else np.inf


def check(case, outputs):
    """Compare each peer's (y, dx, dgamma, dbeta) with bnorm's; return a list of problems."""
    ref_name, ref = next(iter(outputs.items()))
    ref = [np.asarray(a, np.float64) for a in ref]
    rtol = 1e-3 if case.dtype == np.float32 else 1e-9
    problems = []
    for peer, outs in list(outputs.items())[1:]:
        for n, a, r in zip(OUTPUT_NAMES, outs, ref):
            err = max_rel_err(np.asarray(a, np.float64), r)
            if not err <= rtol:
                problems.append(f"{case.name} {case.dtype}: {peer} {n} differs from {ref_name} "
                                f"(max rel err {err:.2g})")
    return problems


def float64_step(case):
    """(y, dx, dgamma, dbeta) of one training step, the post's code in float64 on the case's
    values (half x and dy widened exactly, float32 gamma and beta): a half row's oracle."""
    x, dy = case.widened(np.float64)
    g, b = case.gamma.astype(np.float64), case.beta.astype(np.float64)
    y, mean, rstd = reference.forward(x, g, b, axis=case.axis, eps=EPS)
    return (y,) + reference.backward(dy, x, mean, rstd, g, axis=case.axis)


def check_half(case, outputs):
    """A half row: each peer's (y, dx, dgamma, dbeta) against float64_step, within HALF_ULPS
    (the post's code: POST_HALF_ULPS) epsilons of the half dtype; returns {peer: problem} for
    the peers that are off."""
    ref = float64_step(case)
    finfo = np.finfo if case.dtype == np.float16 else ml_dtypes.finfo
    off = {}
    for peer, outs in outputs.items():
        ulps = POST_HALF_ULPS if peer == "NumPy (post)" else HALF_ULPS
        rtol = ulps * float(finfo(case.dtype).eps)
        errs = [(n, max_rel_err(np.asarray(a, np.float64), r))
                for n, a, r in zip(OUTPUT_NAMES, outs, ref)]
        bad = [f"{n} {err:.2g}" for n, err in errs if not err <= rtol]
        if bad:
            off[peer] = (f"{case.name} {case.dtype}: {peer} differs from float64, max rel err "
                         f"{', '.join(bad)} (tolerance {rtol:.2g})")
    return off


def check_relu(case, outputs):
    """The ReLU rows' cross-check (see the module's docstring): returns a line saying how bnorm
    fused compares with bnorm + NumPy ReLU, and a list of problems."""
    x, dy, g, b, ax = case.x, case.dy, case.gamma, case.beta, case.axis
    rtol = 1e-3 if case.dtype == np.float32 else 1e-9
    label = f"{case.name} {case.dtype}"
    fused = outputs["bnorm fused"]
    y0, mean, rstd = bnorm.forward(x, g, b, axis=ax, eps=EPS)     # the pre-activation
    # per-feature arrays broadcast against x; the axes a feature's sums run over
    shape = [n if a == ax % x.ndim else 1 for a, n in enumerate(x.shape)]
    reduced = tuple(a for a in range(x.ndim) if a != ax % x.ndim)
    f64 = functools.partial(np.asarray, dtype=np.float64)
    scale = np.abs(f64(rstd) * f64(g)).reshape(shape)
    xhat = (f64(x) - f64(mean).reshape(shape)) * f64(rstd).reshape(shape)
    # within rounding of zero: a few units in the last place of the terms it is made of
    terms = (np.abs(f64(x)) + np.abs(f64(mean)).reshape(shape)) * scale + \
        np.abs(f64(b)).reshape(shape)
    near = np.abs(f64(y0)) <= 8 * float(np.finfo(case.dtype).eps) * terms
    del terms
    n_near = int(near.sum())
    clean = ~near.any(axis=reduced)                 # per feature
    problems = []

    # bnorm fused against bnorm + NumPy ReLU: to the bit, but in the features holding a near-zero
    # pre-activation, where dgamma and dbeta may differ by those elements' terms and dx elsewhere
    # through them
    unf = outputs["bnorm + NumPy ReLU"]
    if not np.array_equal(fused[0], unf[0]):
        problems.append(f"{label}: bnorm fused y differs from bnorm + NumPy ReLU's")
    clean_x = np.broadcast_to(clean.reshape(shape), x.shape)
    if not np.array_equal(fused[1][clean_x], unf[1][clean_x]):
        problems.append(f"{label}: bnorm fused dx differs from bnorm + NumPy ReLU's in a feature "
                        "with no pre-activation within rounding of zero")
    if n_near and max_rel_err(f64(fused[1])[~near], f64(unf[1])[~near]) > rtol:
        problems.append(f"{label}: bnorm fused dx differs from bnorm + NumPy ReLU's")
    abs_dy_near = np.where(near, np.abs(f64(dy)), 0)
    for n, i, slack in (("dgamma", 2, (abs_dy_near * np.abs(xhat)).sum(axis=reduced)),
                        ("dbeta", 3, abs_dy_near.sum(axis=reduced))):
        a, r = f64(fused[i]).ravel(), f64(unf[i]).ravel()
        if not np.array_equal(a[clean], r[clean]):
            problems.append(f"{label}: bnorm fused {n} differs from bnorm + NumPy ReLU's in a "
                            "feature with no pre-activation within rounding of zero")
        if not np.all(np.abs(a - r) <= slack.ravel() + rtol * max(np.abs(r).max(), 1.0)):
            problems.append(f"{label}: bnorm fused {n} differs from bnorm + NumPy ReLU's by "
                            "more than its near-zero elements can make")
    del abs_dy_near, xhat
    differ = [n for n, a, r in zip(OUTPUT_NAMES, fused, unf) if not np.array_equal(a, r)]
    note = (f"{label}: bnorm fused = bnorm + NumPy ReLU bit for bit" +
            (f", but for {', '.join(differ)} in the features holding a pre-activation within "
             "rounding of zero" if differ else "") +
            f"; {n_near} pre-activation{'' if n_near == 1 else 's'} within rounding of zero, in "
            f"{int((~clean).sum())} of {clean.size} features")

    # the other peers: y against bnorm's; gradients against bnorm's backward through their mask
    for peer in ("NumPy (post) + ReLU", "PyTorch"):
        if peer not in outputs:
            continue
        outs = outputs[peer]
        err = max_rel_err(f64(outs[0]), f64(fused[0]))
        if not err <= rtol:
            problems.append(f"{label}: {peer} y differs from bnorm fused (max rel err {err:.2g})")
        mask = np.asarray(outs[0]) > 0
        ref = bnorm.backward(dy * mask, x, mean, rstd, g, axis=ax)
        for n, a, r in zip(OUTPUT_NAMES[1:], outs[1:], ref):
            err = max_rel_err(f64(a), f64(r))
            if not err <= rtol:
                problems.append(f"{label}: {peer} {n} differs from bnorm's through its mask "
                                f"(max rel err {err:.2g})")
        flips = int(np.count_nonzero(mask != (fused[0] > 0)))
        if flips:
            note += f"; {peer}'s mask differs from bnorm's at {flips} elements"
    return note, problems


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
    """{op: {contender: seconds per call}} for one case (op "relu": the ReLU rows' step), the
    cross-check's problems, (half rows) the post's code's errors where they keep it from being
    timed, and the ReLU rows' cross-check note."""
    # the post's float16 sums overflow on the larger cases (NumPy warns)
    with np.errstate(over="ignore", invalid="ignore") if case.half else contextlib.nullcontext():
        peers = {}
        ops, outs = bnorm_ops(case)
        peers["bnorm"] = ops
        outputs = {"bnorm": outs}
        if not args.no_out:
            peers["bnorm (out=)"], outputs["bnorm (out=)"] = bnorm_ops(case, use_out=True)
        if case.half:
            peers["bnorm float32"], outputs["bnorm float32"] = bnorm_ops(case, widen=True)
        if case.dtype != BFLOAT16:
            peers["NumPy (post)"], outputs["NumPy (post)"] = numpy_ops(case)
        if torch is not None:
            peers["PyTorch"], outputs["PyTorch"] = torch_ops(case, torch)
        problems, wrong = [], []
        if not args.no_check:
            results = {k: f() for k, f in outputs.items()}
            if not case.half:
                problems = check(case, results)
            else:
                off = check_half(case, results)
                if "NumPy (post)" in off:
                    wrong = [off.pop("NumPy (post)")]
                    del peers["NumPy (post)"]
                problems = list(off.values())
            del results
        copy = copy_op(case)
        times = {}
        for op in OPS:
            fns = {name: ops[op] for name, ops in peers.items()}
            fns["copy"] = copy
            times[op] = measure(fns, args.budget, args.rounds)
    note = None
    if case.relu:
        fns, outputs = relu_ops(case, torch)
        if args.no_check:
            note = f"{case.name} {case.dtype}: not checked (--no-check)"
        else:
            results = {k: tuple(np.asarray(a) for a in f()) for k, f in outputs.items()}
            note, pr = check_relu(case, results)
            problems += pr
            del results
        fns["copy"] = copy
        times["relu"] = measure(fns, args.budget, args.rounds)
    return times, problems, wrong, note


def time_case_when_quiet(case, label, args, torch, monitor, timer=None):
    """timer (time_case by default), re-run (after waiting for a quiet second) while other
    processes kept the CPUs busy; also returns their load during the last attempt."""
    timer = timer or time_case
    for attempt in range(args.retries + 1):
        print(f"# {label} ...", end="", file=sys.stderr, flush=True)
        monitor.start()
        times, problems, wrong, note = timer(case, args, torch)
        load = monitor.stop()
        print(f" other processes used {load:.2f} CPUs", file=sys.stderr, flush=True)
        if load <= args.max_load:
            break
        if attempt < args.retries:
            monitor.wait_quiet(args.max_load, timeout=60)
    return times, problems, wrong, note, load


def median_times(runs):
    """The median over runs (lists of time_case's results) of each op's and contender's time."""
    return {op: {name: statistics.median(r[op][name] for r in runs) for name in runs[0][op]}
            for op in runs[0]}


def case_rows(meta, times):
    """Table rows of one case from its times; meta: the case's name, group, dtype, nbytes,
    whether it is large and a half row."""
    rows = []
    for op in OPS:
        t = times[op]
        copy_bw = 2 * meta["nbytes"] / t["copy"] / 1e9
        tb = t["bnorm"]
        bw = BYTES_PER_ELEM_PASS[op] * meta["nbytes"] / tb / 1e9
        tout = t.get("bnorm (out=)")
        tnp = t.get("NumPy (post)")
        rows.append({
            "case": meta["name"], "group": meta["group"], "dtype": meta["dtype"], "op": op,
            "large": meta["large"], "half": meta["half"],
            "bnorm": tb, "bnorm_out": tout, "numpy": tnp,
            # a half row's NumPy cell when the post's code is not timed
            "numpy_cell": None if tnp is not None else
            "—" if meta["dtype"] == "bfloat16" else "wrong",
            "f32": t.get("bnorm float32"), "torch": t.get("PyTorch"),
            "vs_f32": ratio(t.get("bnorm float32"), tb),
            "vs_numpy": ratio(tnp, tb), "vs_torch": ratio(t.get("PyTorch"), tb),
            "bw": bw, "copy_bw": copy_bw, "pct": 100 * bw / copy_bw,
            "pct_out": None if tout is None else
            100 * BYTES_PER_ELEM_PASS[op] * meta["nbytes"] / tout / 1e9 / copy_bw,
        })
    return rows


def relu_row(meta, times):
    """The ReLU table's row of one case (None if it has no ReLU rows)."""
    t = times.get("relu")
    if t is None:
        return None
    tb = t["bnorm fused"]
    copy_bw = 2 * meta["nbytes"] / t["copy"] / 1e9
    bw = BYTES_PER_ELEM_PASS["step"] * meta["nbytes"] / tb / 1e9
    return {"case": meta["name"], "dtype": meta["dtype"], "large": meta["large"],
            **{peer: t.get(peer) for peer in RELU_PEERS},
            **{f"vs {peer}": ratio(t.get(peer), tb) for peer in RELU_PEERS[1:]},
            "bw": bw, "copy_bw": copy_bw, "pct": 100 * bw / copy_bw}


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


def table(rows, show_out, half=False):
    """The Markdown table; half: the half rows' (with the bnorm float32 columns)."""
    cols = ["case", "dtype", "op", "bnorm"]
    if show_out:
        cols.append("bnorm (out=)")
    if half:
        cols.append("bnorm float32")
    cols += ["NumPy (post)", "PyTorch"]
    if half:
        cols.append("float32/bnorm")
    cols += ["NumPy/bnorm", "PyTorch/bnorm", "bnorm GB/s", "copy GB/s", "% copy"]
    if show_out:
        cols.append("% copy (out=)")
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(cols))) + "|"]
    for r in rows:
        cells = [r["case"], r["dtype"], OP_NAMES[r["op"]], fmt_time(r["bnorm"])]
        if show_out:
            cells.append(fmt_time(r["bnorm_out"]))
        if half:
            cells.append(fmt_time(r["f32"]))
        cells += [r["numpy_cell"] or fmt_time(r["numpy"]), fmt_time(r["torch"])]
        if half:
            cells.append(fmt_ratio(r["vs_f32"]))
        cells += [r["numpy_cell"] or fmt_ratio(r["vs_numpy"]),
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


def half_lines(rows, show_out, wrong):
    """The half rows' introduction, table and summary; wrong: the post's code's errors where it
    was not timed."""
    def stat(sel, key):
        vals = [r[key] for r in sel if r[key] is not None]
        return "n/a" if not vals else f"{statistics.median(vals):.2f}x [{min(vals):.2f}x]"

    out = ["Half precision (mixed: x, dy, y, dx half; gamma, beta, running statistics float32). "
           "`bnorm float32`: bnorm on the same values widened to float32, `float32/bnorm` its "
           "time / the half time; PyTorch in the same half dtype with float32 weight and bias; "
           "the post's code in float16 only (— for bfloat16; `wrong` where its float16 sums "
           "fail the cross-check, see below). Bandwidth with 2-byte elements.", ""]
    out += table(rows, show_out, half=True) + [""]
    out += ["Summary of the half rows: median [min] speed-up of bnorm's half full step (fwd+bwd) "
            "over bnorm float32 and over PyTorch in the same dtype. Issue 14's targets, on 2 "
            "threads: >= 1.6x over bnorm float32 on the large cases, >= 1.5x over PyTorch on "
            "every case.", ""]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        steps = [r for r in rows if r["dtype"] == dtype and r["op"] == "step"]
        large = [r for r in steps if r["large"]]
        out.append(f"- {dtype}, large cases (float32 x >= 8 MiB): vs bnorm float32 "
                   f"{stat(large, 'vs_f32')}, vs PyTorch {stat(large, 'vs_torch')}; "
                   f"every case: vs bnorm float32 {stat(steps, 'vs_f32')}, vs PyTorch "
                   f"{stat(steps, 'vs_torch')}")
    slower = [(r, who, v) for r in rows for who, v in (("vs bnorm float32", r["vs_f32"]),
                                                        ("vs NumPy", r["vs_numpy"]),
                                                        ("vs PyTorch", r["vs_torch"]))
              if v is not None and v < 1]
    steps = [f"{r['case']} {r['dtype']} ({who} {v:.2f}x)" for r, who, v in slower
             if r["op"] == "step"]
    out += ["", f"bnorm half slower than a peer: {len(slower)} times over all rows and peers; "
            "full step: " + ("; ".join(steps) if steps else "none") + "."]
    if wrong:
        out += ["", "The post's code in float16, not timed where its results are off (its sums "
                "are float16):"] + [f"- {s}" for s in wrong]
    return out


RELU_RATIOS = {"bnorm + NumPy ReLU": "unfused/fused", "NumPy (post) + ReLU": "NumPy/fused",
               "PyTorch": "PyTorch/fused"}


def relu_lines(rows, notes):
    """The ReLU rows' introduction, table, summary and cross-check notes."""
    out = ["Batch norm + ReLU, training step (fwd+bwd): `bnorm fused` is `forward(..., "
           "activation=\"relu\")` + `backward(..., beta=beta, activation=\"relu\")`; "
           "`bnorm + NumPy ReLU` is `np.maximum(y, 0)` after bnorm's forward and bnorm's "
           "backward of `dy * (y > 0)`; `NumPy (post) + ReLU` the same around the post's code; "
           "PyTorch `torch.relu(F.batch_norm(...))` and `autograd.grad` with dy. Speed-ups are "
           "peer time / fused time; bandwidth as for fwd+bwd (8B).", ""]
    cols = ["case", "dtype"] + list(RELU_PEERS) + list(RELU_RATIOS.values()) + \
        ["fused GB/s", "copy GB/s", "% copy"]
    out += ["| " + " | ".join(cols) + " |",
            "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"]
    for r in rows:
        cells = [r["case"], r["dtype"]] + [fmt_time(r[p]) for p in RELU_PEERS] + \
            [fmt_ratio(r[f"vs {p}"]) for p in RELU_RATIOS] + \
            [f"{r['bw']:.1f}", f"{r['copy_bw']:.1f}", f"{r['pct']:.0f}%"]
        out.append("| " + " | ".join(cells) + " |")

    def stat(sel, peer):
        vals = [r[f"vs {peer}"] for r in sel if r[f"vs {peer}"] is not None]
        return "n/a" if not vals else f"{statistics.median(vals):.2f}x [{min(vals):.2f}x]"

    out += ["", "Summary of the ReLU rows: median [min] speed-up of bnorm's fused step over each "
            "peer. Issue 16's targets, on 2 threads: >= 1.5x over bnorm + NumPy ReLU and >= 2x "
            "over PyTorch.", ""]
    for label, sel in [(d, [r for r in rows if r["dtype"] == d])
                       for d in dict.fromkeys(r["dtype"] for r in rows)] + [("all", rows)]:
        out.append(f"- {label}: " + ", ".join(f"vs {p} {stat(sel, p)}" for p in RELU_RATIOS))
    slower = [f"{r['case']} {r['dtype']} (vs {p} {r[f'vs {p}']:.2f}x)" for r in rows
              for p in RELU_RATIOS if r[f"vs {p}"] is not None and r[f"vs {p}"] < 1]
    out += ["", "bnorm fused slower than a peer: " + ("; ".join(slower) if slower else "none")
            + "."]
    out += ["", "Cross-check of the ReLU rows (fused against unfused, bit for bit but where a "
            "pre-activation is within rounding of zero):"] + [f"- {n}" for n in notes]
    return out


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    bars = [("vs_numpy", "NumPy (post) / bnorm"), ("vs_torch", "PyTorch / bnorm")]
    if any(r["vs_f32"] is not None for r in rows):
        bars.append(("vs_f32", "bnorm float32 / bnorm half"))
    short = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(8, 0.55 * len(rows) / len(ops) + 3),
                                                   3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        sel = [r for r in rows if r["op"] == op]
        pos = np.arange(len(sel))
        w = 0.8 / len(bars)
        for k, (key, label) in enumerate(bars):
            vals = [r[key] if r[key] is not None else np.nan for r in sel]
            ax.bar(pos + (k - (len(bars) - 1) / 2) * w, vals, w, label=label)
        ax.axhline(1, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("speed-up (>1: bnorm faster)")
        ax.set_title(OP_NAMES[op])
        ax.set_xticks(pos)
        ax.set_xticklabels([f"{r['case'].split(' = ')[0]} {short.get(r['dtype'], r['dtype'])}"
                            for r in sel],
                           rotation=30, ha="right", fontsize=7)
        ax.grid(axis="y", which="both", alpha=0.3)
    # one legend above the charts, where it hides no bar
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(bars), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------
# scaling (--scaling): the float32 training step against the size of x

SCALING_FEATURES = 64


def parse_bytes(text):
    """'4K', '1M', '1G' or a plain number of bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def fmt_bytes(n):
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def scaling_sizes(lo, hi):
    """Powers of 2 in bytes from lo to hi (a float32 x of SCALING_FEATURES features needs at
    least 2 rows)."""
    size = 1 << max(int(lo).bit_length() - 1, 0)
    size = max(size, 2 * SCALING_FEATURES * 4)
    while size <= hi:
        if size >= lo:
            yield size
        size *= 2


def scaling_run(args, torch):
    """{size: {peer: seconds per step}} and the shapes: each size's x is (n, 64) float32,
    channels-last (NHWC flattened: bnorm and the post's code see the same memory either way)."""
    results, shapes, loads = {}, {}, {}
    monitor = LoadMonitor()
    for nbytes in scaling_sizes(args.scaling_min, args.scaling_max):
        n = nbytes // (4 * SCALING_FEATURES)
        case = Case(f"NC ({n},{SCALING_FEATURES})", "scaling", (n, SCALING_FEATURES), "nc",
                    np.float32)
        fns = {"bnorm": bnorm_ops(case)[0]["step"]}
        if torch is not None:
            fns["PyTorch"] = torch_ops(case, torch)[0]["step"]
        if nbytes <= args.scaling_numpy_max:
            fns["NumPy (post)"] = numpy_ops(case)[0]["step"]
        # large arrays: a call lasts long enough, the budget's minimum of calls is plenty
        budget = args.budget if nbytes < (64 << 20) else 0
        # as the suite: a size timed while other processes were busy is timed again, after
        # waiting (here up to 10 s) for a quiet second; the load is reported in the table
        for attempt in range(args.retries + 1):
            if attempt:
                monitor.wait_quiet(args.max_load, 10)
            monitor.start()
            results[nbytes] = measure(fns, budget, args.rounds)
            loads[nbytes] = monitor.stop()
            if loads[nbytes] <= args.max_load:
                break
        shapes[nbytes] = (n, SCALING_FEATURES)
        print(f"  {fmt_bytes(nbytes)}: " + ", ".join(
            f"{k} {fmt_time(v)}" for k, v in results[nbytes].items()), file=sys.stderr)
        del case, fns
        gc.collect()
    return results, shapes, loads


def scaling_lines(args, torch, results, shapes, loads, config):
    peers = ["bnorm", "PyTorch", "NumPy (post)"]
    caches = config["caches"]
    lines = header_lines(args, torch)[:1] + [
        "",
        f"Scaling: the float32 training step (forward + backward, fresh outputs) on x of shape "
        f"(n, {SCALING_FEATURES}) (channels-last), time per element of x (ns). The post's NumPy "
        f"code is timed up to {fmt_bytes(args.scaling_numpy_max)} of x (`--scaling-numpy-max`: "
        f"larger arrays take it seconds per step and several times x's size in temporaries). "
        f"bnorm's buffer cache is raised to hold a step's outputs at every size "
        f"(`bnorm.set_buffer_cache`); the peers' temporaries from 32 MiB are mapped afresh by "
        f"glibc on every call. Caches ({caches['source']}): L1d {fmt_bytes(caches['l1d'])}, "
        f"L2 {fmt_bytes(caches['l2'])}"
        + (f", L3 {fmt_bytes(caches['l3'])}" if caches["l3"] else ", no L3") + "; "
        f"bnorm's elementwise passes use streaming stores past "
        f"{fmt_bytes(config['thresholds']['stream_out'])} touched.",
        "",
        "| x size | shape | " + " | ".join(f"{p} ns/elem" for p in peers)
        + " | bnorm step | PyTorch/bnorm | NumPy/bnorm | others' CPUs |",
        "|" + "---|" * 2 + "---:|" * (len(peers) + 4),
    ]
    for nbytes, times in results.items():
        elems = shapes[nbytes][0] * shapes[nbytes][1]
        cells = [f"{times[p] / elems * 1e9:.3g}" if p in times else "n/a" for p in peers]
        ratios = [fmt_ratio(ratio(times.get(p), times["bnorm"])) for p in peers[1:]]
        lines.append(f"| {fmt_bytes(nbytes)} | {shape_str(shapes[nbytes])} | "
                     + " | ".join(cells) + f" | {fmt_time(times['bnorm'])} | "
                     + " | ".join(ratios) + f" | {loads[nbytes]:.2f} |")
    lines += ["", f"`others' CPUs`: CPUs' worth of time other processes used while the size was "
              f"timed (after up to {args.retries} re-runs): above {args.max_load}, the "
              f"multithreaded timings (bnorm's, PyTorch's) are unreliable."]
    return lines


def scaling_plot(results, shapes, config, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    sizes = list(results)
    for peer, style in (("bnorm", "o-"), ("PyTorch", "s-"), ("NumPy (post)", "^-")):
        pts = [(b, results[b][peer] / (shapes[b][0] * shapes[b][1]) * 1e9)
               for b in sizes if peer in results[b]]
        if pts:
            ax.plot(*zip(*pts), style, label=peer, ms=4)
    caches, thr = config["caches"], config["thresholds"]
    marks = [("L1d", caches["l1d"], "-"), ("L2", caches["l2"], "-"), ("L3", caches["l3"], "-"),
             # the step's elementwise passes touch 2 (forward: x, y) and 3 (backward: x, dy, dx)
             # times x's size: they stream their output from these sizes of x
             ("bwd streams", thr["stream_out"] // 3, ":"),
             ("fwd streams", thr["stream_out"] // 2, ":")]
    for label, at, style in marks:
        if at and sizes[0] <= at <= sizes[-1]:
            ax.axvline(at, color="gray", ls=style, lw=1)
            ax.text(at, 0.98, f" {label} {fmt_bytes(at)}", rotation=90, va="top", fontsize=7,
                    color="dimgray", transform=ax.get_xaxis_transform())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes[::2])
    ax.set_xticklabels([fmt_bytes(b).replace(" ", "") for b in sizes[::2]], fontsize=7)
    ax.set_xlabel(f"size of x (float32, (n, {SCALING_FEATURES}))")
    ax.set_ylabel("ns per element (forward + backward)")
    ax.set_title("Training step time per element against the size of x")
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def scaling_main(args, torch):
    config = bnorm.show_config(mode="dicts")
    # y and dx of the largest step, and room
    bnorm.set_buffer_cache(max(3 * args.scaling_max, 512 << 20))
    results, shapes, loads = scaling_run(args, torch)
    if not results:
        print("no sizes in the range given", file=sys.stderr)
        return 1
    text = "\n".join(scaling_lines(args, torch, results, shapes, loads, config)) + "\n"
    sys.stdout.write(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)
    path = args.plot or os.path.join(os.path.dirname(os.path.abspath(__file__)), "scaling.png")
    try:
        scaling_plot(results, shapes, config, path)
    except ImportError:
        print("no matplotlib: the table only, no plot", file=sys.stderr)
    else:
        print(f"plot: {path}", file=sys.stderr)
    return 0


def import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="float32 and half precision, a few shapes only (about a minute)")
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
    p.add_argument("--dtype", choices=("float32", "float64") + HALF_NAMES, action="append",
                   help="restrict to this dtype (repeatable; bfloat16 needs ml_dtypes)")
    p.add_argument("--case", action="append", metavar="TEXT",
                   help="only the cases whose name contains TEXT, e.g. 'NC (4096' (repeatable)")
    p.add_argument("--relu-cases", choices=("default", "all", "none"), default="default",
                   help="which float32/float64 cases get the ReLU rows (batch norm + ReLU, "
                   "fwd+bwd): the default ones (NHWC (64,56,56,64) and NCHW (64,64,56,56); "
                   "--quick: NHWC (8,112,112,32)), every case run, or none")
    p.add_argument("--family-cases", choices=("default", SMALL, "none"), default="default",
                   help="the normalization family's rows (layer norm, RMS norm, group norm; "
                   "float32/float64): the default ones (--quick: LayerNorm (4096,1024) and "
                   "GroupNorm NCHW float32), every kind on small shapes (a smoke test), or none")
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
    p.add_argument("--scaling", action="store_true",
                   help="instead of the suite: the float32 training step against x's size "
                   "(powers of 2 from --scaling-min to --scaling-max), a table and a plot "
                   "(--plot, default benchmarks/scaling.png; without matplotlib, the table)")
    p.add_argument("--scaling-min", type=parse_bytes, default=4 << 10, metavar="BYTES",
                   help="smallest x for --scaling (default 4K)")
    p.add_argument("--scaling-max", type=parse_bytes, default=1 << 30, metavar="BYTES",
                   help="largest x for --scaling (default 1G)")
    p.add_argument("--scaling-numpy-max", type=parse_bytes, default=256 << 20, metavar="BYTES",
                   help="largest x on which --scaling times the post's NumPy code (default 256M)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        p.error("--rounds and --repeats must be at least 1")
    if args.budget is None:
        args.budget = 0.1 if args.quick else 0.3
    halves = ["float16"] + (["bfloat16"] if BFLOAT16 is not None else [])
    dtypes = args.dtype or (["float32"] if args.quick else ["float32", "float64"]) + halves
    if "bfloat16" in dtypes and BFLOAT16 is None:
        p.error("bfloat16 needs ml_dtypes (pip install ml_dtypes)")
    dtypes = [BFLOAT16 if d == "bfloat16" else np.dtype(d) for d in dtypes]

    args.kept_memory = not args.glibc_defaults and keep_freed_memory()
    if args.threads is not None:
        bnorm.set_num_threads(args.threads)
    torch = None if args.no_torch else import_torch()
    if torch is not None:
        torch.set_num_threads(bnorm.get_num_threads())

    if args.scaling:
        return scaling_main(args, torch)

    t0 = time.perf_counter()
    runs, fruns, problems, wrong, busy, notes = {}, {}, [], [], [], {}
    monitor = LoadMonitor()
    for repeat in range(args.repeats):
        for make in make_cases(args.quick, dtypes, args.case, args.relu_cases):
            case = make()
            label = f"{case.name} {case.dtype}" + \
                (f" (run {repeat + 1}/{args.repeats})" if args.repeats > 1 else "")
            times, pr, wr, note, load = time_case_when_quiet(case, label, args, torch, monitor)
            if load > args.max_load:
                busy.append(f"{label} ({load:.2f} CPUs)")
            meta = {"name": case.name, "group": case.group, "dtype": str(case.dtype),
                    "nbytes": case.nbytes, "large": case.large, "half": case.half}
            runs.setdefault((meta["name"], meta["dtype"]), (meta, []))[1].append(times)
            problems += [p for p in pr if p not in problems]
            wrong += [w for w in wr if w not in wrong]
            if note is not None:
                notes.setdefault((meta["name"], meta["dtype"]), note)
            del case
        for make in make_family_cases(args.quick, dtypes, args.case, args.family_cases):
            case = make()
            label = f"{case.name} {case.dtype}" + \
                (f" (run {repeat + 1}/{args.repeats})" if args.repeats > 1 else "")
            times, pr, _, _, load = time_case_when_quiet(case, label, args, torch, monitor,
                                                         timer=time_family_case)
            if load > args.max_load:
                busy.append(f"{label} ({load:.2f} CPUs)")
            meta = {"name": case.name, "group": case.group, "dtype": str(case.dtype),
                    "nbytes": case.nbytes, "large": case.large}
            fruns.setdefault((meta["name"], meta["dtype"]), (meta, []))[1].append(times)
            problems += [p for p in pr if p not in problems]
            del case
    medians = [(meta, median_times(times)) for meta, times in runs.values()]
    rows = [row for meta, times in medians for row in case_rows(meta, times)]
    relu = [r for r in (relu_row(meta, times) for meta, times in medians) if r is not None]
    family = [row for meta, times in fruns.values()
              for row in family_rows(meta, median_times(times))]
    elapsed = time.perf_counter() - t0

    full = [r for r in rows if not r["half"]]
    half = [r for r in rows if r["half"]]
    lines = header_lines(args, torch)
    if full:
        lines += [""] + table(full, not args.no_out) + [""] + summary(full)
    if relu:
        lines += [""] + relu_lines(relu, list(notes.values()))
    if half:
        lines += [""] + half_lines(half, not args.no_out, wrong)
    if family:
        lines += [""] + family_lines(family)
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
    if args.plot and rows:
        try:
            plot(rows, args.plot)
        except ImportError:
            print("--plot needs matplotlib", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
