"""The CPU targets the kernels are compiled for, and BNORM_CPU, which caps the one used.

Each target's kernels run in a subprocess started with BNORM_CPU set; their results must agree with
this process's (the best target the CPU has) to a few units in the last place: the targets differ
only in vector width and in fusing multiply-adds, never in the order of float64 sums.  (.ci/run also
runs the whole suite once per target below the best.)
"""
import os
import pickle
import platform
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import asan_loaded, child_env

import bnorm
from bnorm import _bnorm

TARGETS = _bnorm.compiled_targets
BEST = TARGETS.index(bnorm.cpu_target()) if "BNORM_CPU" not in os.environ else None

# Layouts through every kernel path: contiguous rows (features inner), NCHW (batch inner), a
# strided view with a negative stride, long rows (more than 16 lanes), both dtypes.
CASES_SCRIPT = """
import numpy as np
import bnorm

def cases():
    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64):
        base = rng.standard_normal((40, 12, 9, 6)).astype(dtype) * 3 + 100
        yield "nhwc", dtype, base, -1
        yield "nchw", dtype, np.ascontiguousarray(base.transpose(0, 3, 1, 2)), 1
        yield "view", dtype, base[::2, ::-3, :, 1:], (1, 3)
        yield "rows", dtype, rng.standard_normal((33, 70)).astype(dtype) - 5, -1

def run():
    results = {}
    for name, dtype, x, axis in cases():
        rng = np.random.default_rng(11)
        dy = rng.standard_normal(x.shape).astype(dtype)
        y, mean, rstd = bnorm.forward(x, 1.5, -0.5, axis=axis)
        dx, dgamma, dbeta = bnorm.backward(dy, x, mean, rstd, 1.5, axis=axis)
        inference = bnorm.forward(x, axis=axis, training=False, running_mean=mean,
                                  running_var=1 / rstd**2)[0]
        results[name, np.dtype(dtype).name] = dict(y=y, mean=mean, rstd=rstd, dx=dx,
                                                   dgamma=dgamma, dbeta=dbeta, inference=inference)
    return results
"""
namespace = {}
exec(CASES_SCRIPT, namespace)


def run_under(target, *, wrapper=()):
    """(cpu_target(), warnings printed, results) of a fresh interpreter with BNORM_CPU=target."""
    code = CASES_SCRIPT + textwrap.dedent("""
        import pickle, sys
        sys.stdout.buffer.write(pickle.dumps((bnorm.cpu_target(), run())))
    """)
    # from /, so that a source tree in the working directory does not shadow the bnorm under test
    proc = subprocess.run([*wrapper, sys.executable, "-c", code], env=child_env(BNORM_CPU=target),
                          cwd="/", capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    name, results = pickle.loads(proc.stdout)
    return name, proc.stderr.decode(), results


def assert_close_ulps(got, want, what, ulps=8):
    """Within `ulps` units in the last place of the largest magnitude involved."""
    scale = max(float(np.max(np.abs(want), initial=0)), np.finfo(want.dtype).tiny)
    tol = ulps * np.finfo(want.dtype).eps * scale
    err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)), initial=0))
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


needs_default_target = pytest.mark.skipif(
    BEST is None, reason="BNORM_CPU is set for this run: these tests compare against the best")


@needs_default_target
def test_names_and_default():
    # aarch64's baseline has AdvSIMD: it is named for it
    assert TARGETS[0] == ("neon" if platform.machine() in ("aarch64", "arm64") else "baseline")
    assert len(set(TARGETS)) == len(TARGETS)
    # without BNORM_CPU the best target the CPU has is used: the subprocess agrees with us
    env = {k: v for k, v in child_env().items() if k != "BNORM_CPU"}
    out = subprocess.run([sys.executable, "-c", "import bnorm; print(bnorm.cpu_target())"],
                         env=env, cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == TARGETS[BEST]
    assert out.stderr == ""


@needs_default_target
@pytest.mark.parametrize("target", TARGETS)
def test_every_target_agrees_with_the_best(target):
    if TARGETS.index(target) > BEST:
        pytest.skip(f"this CPU lacks {target} (test_missing_target_falls_back covers it)")
    name, stderr, results = run_under(target)
    assert name == target
    assert "RuntimeWarning" not in stderr
    want = namespace["run"]()
    assert results.keys() == want.keys()
    for case, arrays in want.items():
        for key, value in arrays.items():
            assert_close_ulps(results[case][key], value, f"{target} {case} {key}")


def test_unknown_target_warns_and_uses_the_best():
    name, stderr, results = run_under("x86-64-v9")
    assert "RuntimeWarning: bnorm: ignoring BNORM_CPU=x86-64-v9" in stderr
    if BEST is None:  # this process runs capped: the best is at least its target
        assert TARGETS.index(name) >= TARGETS.index(bnorm.cpu_target())
    else:
        assert name == TARGETS[BEST]


@pytest.mark.skipif(len(TARGETS) < 2, reason="this build has the baseline target only")
def test_missing_target_falls_back():
    """Asking for a target the CPU lacks: a warning, and the best the CPU has.  valgrind's CPU
    has no AVX-512, so under it x86-64-v4 is missing whatever the machine."""
    if BEST is not None and BEST < len(TARGETS) - 1:
        wrapper = ()
        fallback = TARGETS[BEST]
    elif asan_loaded():
        pytest.skip("valgrind cannot run a process with AddressSanitizer loaded (the plain run "
                    "of the suite covers this)")
    elif shutil.which("valgrind"):
        wrapper = ("valgrind", "--tool=none", "-q")
        fallback = "x86-64-v3"
    else:
        pytest.skip("this CPU has every target and valgrind is not installed")
    name, stderr, results = run_under(TARGETS[-1], wrapper=wrapper)
    assert f"BNORM_CPU={TARGETS[-1]}, but this CPU lacks it; using {fallback}" in stderr
    assert name == fallback
    y = results["rows", "float64"]["y"]
    assert np.allclose(y.mean(axis=0), -0.5, atol=1e-12)
