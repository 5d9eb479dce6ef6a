"""The cache of large output buffers (csrc/buffers.c, bnorm.set_buffer_cache): outputs that reuse
memory are still correct, never alias a live array, behave as ordinary NumPy arrays, and the
memory kept stays within the limit."""
import gc
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import BNORM_PARENT, asan_loaded, child_env, rss_bytes, run_threads

import bnorm

MIB = 2**20
get_handler_name = (np._core if hasattr(np, "_core") else np.core).multiarray.get_handler_name
# float32 (1024, 2048): 8 MiB, above the 128 KiB from which outputs come from the cache
SHAPE = (1024, 2048)


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    x = (2.0 + rng.standard_normal(SHAPE)).astype(np.float32)
    dy = rng.standard_normal(SHAPE).astype(np.float32)
    return x, dy


@pytest.fixture(autouse=True)
def default_limit():
    previous = bnorm.set_buffer_cache(512 * MIB)
    yield
    bnorm.set_buffer_cache(previous)


def expected(x, dy):
    """forward and backward into preallocated arrays: never from the cache"""
    y = np.empty_like(x)
    _, mean, rstd = bnorm.forward(x, out=y)
    dx = np.empty_like(x)
    bnorm.backward(dy, x, mean, rstd, out=dx)
    return y, dx


def test_a_freed_output_is_reused_and_fully_overwritten(data):
    x, dy = data
    y_ref, dx_ref = expected(x, dy)
    y, mean, rstd = bnorm.forward(x)
    address = y.ctypes.data
    y.fill(np.nan)  # what the next output finds in the reused memory
    del y
    dx, _, _ = bnorm.backward(dy, x, mean, rstd)
    assert dx.ctypes.data == address, "the freed output of the same size was not reused"
    np.testing.assert_array_equal(dx, dx_ref)
    del dx
    y, _, _ = bnorm.forward(x)
    np.testing.assert_array_equal(y, y_ref)


def test_live_outputs_never_share_memory(data):
    x, dy = data
    y_ref, dx_ref = expected(x, dy)
    live = []
    for _ in range(5):
        y, mean, rstd = bnorm.forward(x)
        dx, _, _ = bnorm.backward(dy, x, mean, rstd)
        live += [y, dx]
    assert len({a.ctypes.data for a in live}) == len(live)
    for y, dx in zip(live[::2], live[1::2]):
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(dx, dx_ref)


@pytest.mark.parametrize("order", ["C", "F"])
def test_cached_outputs_are_ordinary_arrays(data, order):
    x = np.asarray(data[0], order=order)
    y, _, _ = bnorm.forward(x)
    assert get_handler_name(y) == "bnorm_buffers"
    assert y.flags.owndata and y.base is None and y.flags.writeable
    assert y.flags.c_contiguous == x.flags.c_contiguous
    assert y.flags.f_contiguous == x.flags.f_contiguous
    assert y.ctypes.data % 64 == 0
    first = y.ravel(order="K")[:1000].copy()
    y.resize((y.size + 3,), refcheck=False)  # NumPy's realloc through the cache's handler
    np.testing.assert_array_equal(y[:1000], first)
    y.resize((10,), refcheck=False)
    np.testing.assert_array_equal(y, first[:10])


FAULTS_PER_STEP = """
import resource, numpy as np, bnorm
rng = np.random.default_rng(3)
x, dy = rng.standard_normal((2, 256, 1024))

def step():
    y, mean, rstd = bnorm.forward(x)
    return bnorm.backward(dy, x, mean, rstd)

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_training_steps_on_mid_sized_outputs_do_not_fault_pages():
    """(256, 1024) float64: 2 MiB outputs, which glibc serves from the top of its heap and trims
    off again when a step frees y and dx: 992 page faults per step (a 7x slower step) in a fresh
    interpreter before the cache took outputs from 128 KiB up.  With it, the pages stay mapped
    after the first step."""
    if asan_loaded():
        pytest.skip("AddressSanitizer's allocator keeps its own pages")
    # the bnorm this test imported, not a source tree in the working directory
    run = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP], capture_output=True, text=True,
                         env=child_env(BNORM_NUM_THREADS="1"), cwd=BNORM_PARENT, timeout=120)
    assert run.returncode == 0, run.stderr
    faults = float(run.stdout)
    assert faults < 50, f"{faults:.0f} page faults per step (a step's outputs are 1024 pages)"
    y, _, _ = bnorm.forward(np.ones((32, 1024)))  # 256 KiB: from the cache too
    assert get_handler_name(y) == "bnorm_buffers"


def test_small_outputs_do_not_use_the_cache():
    x = np.ones((64, 64), np.float32)
    y, mean, _ = bnorm.forward(x)
    assert get_handler_name(y) == get_handler_name(mean) == get_handler_name(x)


def test_set_buffer_cache_returns_the_previous_limit_and_checks_its_argument():
    assert bnorm.set_buffer_cache(0) == 512 * MIB
    assert bnorm.set_buffer_cache(123) == 0
    with pytest.raises(ValueError, match=">= 0"):
        bnorm.set_buffer_cache(-1)
    with pytest.raises(TypeError):
        bnorm.set_buffer_cache(1.5)
    assert bnorm.set_buffer_cache(512 * MIB) == 123


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_kept_memory_stays_within_the_limit():
    """Outputs of 12 sizes between 33 and 62 MiB (glibc maps and unmaps blocks that large itself,
    so RSS shows what the cache keeps), freed at once: with a 100 MiB limit at most 100 MiB stay
    (no limit would keep all 12, 570 MiB); after set_buffer_cache(0), none."""
    if asan_loaded():
        pytest.skip("AddressSanitizer keeps freed memory in quarantine: RSS grows by design")
    bnorm.set_buffer_cache(0)
    row = np.ones(1024, np.float32)
    xs = [np.broadcast_to(row, (n, 1024)) for n in range(8448, 16384, 660)]  # no memory
    gc.collect()
    start = rss_bytes()
    bnorm.set_buffer_cache(100 * MIB)
    for _ in range(2):
        for x in xs:
            bnorm.forward(x)
    gc.collect()
    kept = rss_bytes() - start
    assert 33 * MIB <= kept <= 100 * MIB + 4 * MIB, f"{kept / MIB:.1f} MiB kept"
    bnorm.set_buffer_cache(0)
    released = rss_bytes() - start
    assert released < 4 * MIB, f"{released / MIB:.1f} MiB still kept"


def test_threads_allocating_and_freeing_outputs_get_the_right_bits(data):
    x, dy = data
    y_ref, dx_ref = expected(x, dy)
    bnorm.set_buffer_cache(3 * 8 * MIB)  # fewer buffers than threads want: they evict and reuse

    def work(i):
        for _ in range(10):
            y, mean, rstd = bnorm.forward(x)
            dx, _, _ = bnorm.backward(dy, x, mean, rstd)
            assert np.array_equal(y, y_ref) and np.array_equal(dx, dx_ref), "wrong bits"

    run_threads(work, 4)
