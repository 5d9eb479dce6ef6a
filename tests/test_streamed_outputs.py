"""Elementwise passes over large arrays write their output with non-temporal stores when every
tile of it covers whole cache lines (csrc/kernels_impl.h, streams_out), and with plain stores
otherwise.  Each element's arithmetic is the same either way, so a large pass must give bitwise
what the same pass gives in small slices (which never stream), in every layout, into fresh,
aligned and misaligned outputs, in place, and on 1 or 2 threads; and it must write every element
(outputs start as NaN)."""
import numpy as np
import pytest

import bnorm

# float32 (3200, 1024): 12.5 MiB; normalize touches 25 MiB, above the 24 MiB from which it streams
# on the project's machine (3/4 of its 32 MiB L3: bnorm.show_config(); elsewhere other sizes
# stream, and tests/test_config.py runs these layouts with tiny caches).
# Short rows (16 features) stream from 32 MiB: in float32 backward_apply does (37.5 MiB) and
# normalize does not; in float64 both do.
ROWS, FEATURES = 3200, 1024
SHORT_ROW = 16
SLICE = 64  # rows per slice of the expected result: 256 KiB, far below the threshold


def misaligned_like(x, offset):
    """An uninitialised (NaN) array shaped like x whose data start `offset` bytes past 64."""
    raw = np.empty(x.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    a = raw[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    a.fill(np.nan)
    return a


def layouts(rng, dtype):
    """(name, x, dy, axis): channels-last, short channels-last rows, channels-first (axis=1),
    and a transposed view."""
    x = (3.0 + rng.standard_normal((ROWS, FEATURES))).astype(dtype)
    dy = rng.standard_normal((ROWS, FEATURES)).astype(dtype)
    yield "NC", x, dy, -1
    yield "NC short rows", x.reshape(-1, SHORT_ROW), dy.reshape(-1, SHORT_ROW), -1
    nchw = x.reshape(ROWS // 16, 16, 32, FEATURES // 32)
    yield "NCHW axis=1", nchw, dy.reshape(nchw.shape), 1
    yield "transposed", x.T, dy.T, 0


def sliced(fn, batch_axis_arrays, axis_len, batch_axis):
    """fn applied to slices of SLICE along the batch axis, stitched back together."""
    parts = []
    for lo in range(0, axis_len, SLICE):
        sl = [slice(None)] * batch_axis_arrays[0].ndim
        sl[batch_axis] = slice(lo, lo + SLICE)
        parts.append(fn(*(a[tuple(sl)] for a in batch_axis_arrays)))
    return np.concatenate(parts, axis=batch_axis)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_passes_equal_sliced_passes_bitwise(dtype, threads):
    rng = np.random.default_rng(11)
    before = bnorm.get_num_threads()
    bnorm.set_num_threads(threads)
    try:
        for name, x, dy, axis in layouts(rng, dtype):
            batch_axis = 0 if name != "transposed" else 1
            F = x.shape[axis]
            gamma = (1.0 + 0.1 * rng.standard_normal(F)).astype(dtype)
            beta = (0.1 * rng.standard_normal(F)).astype(dtype)
            n, mean, m2 = bnorm.batch_stats(x, axis=axis)
            rstd = 1 / np.sqrt(m2 / n + 1e-8)
            sum_dy, sum_dy_xmu = bnorm.backward_sums(dy, x, mean, axis=axis)

            def normalize(xs, out=None):
                return bnorm.normalize(xs, mean, rstd, gamma, beta, axis=axis, out=out)

            def backward_apply(dys, xs, out=None):
                return bnorm.backward_apply(dys, xs, mean, rstd, sum_dy, sum_dy_xmu, n, gamma,
                                            axis=axis, out=out)

            y_expected = sliced(normalize, [x], x.shape[batch_axis], batch_axis)
            dx_expected = sliced(backward_apply, [dy, x], x.shape[batch_axis], batch_axis)
            assert np.isfinite(y_expected).all() and np.isfinite(dx_expected).all()

            outputs = {"fresh": None}
            for offset in (0, 16, 32):
                outputs[f"out= {offset} bytes past a line"] = offset
            for label, offset in outputs.items():
                y_out = None if offset is None else misaligned_like(x, offset)
                dx_out = None if offset is None else misaligned_like(x, offset)
                y = normalize(x, out=y_out)
                dx = backward_apply(dy, x, out=dx_out)
                np.testing.assert_array_equal(y, y_expected, err_msg=f"{name}, {label}: normalize")
                np.testing.assert_array_equal(dx, dx_expected, err_msg=f"{name}, {label}: dx")
            # in place: the output is the input itself
            x_copy, dy_copy = x.copy(), dy.copy()
            np.testing.assert_array_equal(normalize(x_copy, out=x_copy), y_expected)
            np.testing.assert_array_equal(backward_apply(dy_copy, x, out=dy_copy), dx_expected)
    finally:
        bnorm.set_num_threads(before)


def test_forward_backward_large_match_float64():
    """The whole step on a large float32 batch against float64 NumPy: the streamed path is not
    only self-consistent but right."""
    rng = np.random.default_rng(12)
    x = (3.0 + rng.standard_normal((ROWS, FEATURES))).astype(np.float32)
    dy = rng.standard_normal((ROWS, FEATURES)).astype(np.float32)
    y, mean, rstd = bnorm.forward(x)
    dx, dgamma, dbeta = bnorm.backward(dy, x, mean, rstd)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mu, var = x64.mean(0), x64.var(0)
    xhat = (x64 - mu) / np.sqrt(var + 1e-8)
    dxhat = dy64
    dx64 = (dxhat - dxhat.mean(0) - xhat * (dxhat * xhat).mean(0)) / np.sqrt(var + 1e-8)
    eps32 = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(y, xhat, rtol=0, atol=8 * eps32 * np.abs(xhat).max())
    np.testing.assert_allclose(dx, dx64, rtol=0, atol=16 * eps32 * np.abs(dx64).max())
    np.testing.assert_allclose(dbeta, dy64.sum(0), rtol=1e-6)
