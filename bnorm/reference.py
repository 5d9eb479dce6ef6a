"""The blog post's NumPy batch norm, kept faithful, for tests and benchmarks.

Two things live here:

* ``PostBatchNorm``: the post's layer line for line (channels-last, biased variance, eps 1e-8,
  moving averages with momentum 0.9, no beta, backward returning ``(dx, dgamma)``).
* ``forward`` / ``backward``: the same NumPy expressions, generalised only as far as bnorm's API
  needs (any set of kept feature axes, beta, gamma broadcasting, explicit running statistics,
  inference-mode backward as ``dx = gamma * rstd * dy``), so the tests and benchmarks can call the
  post's code with bnorm's signature.  Nothing is optimised: this is the "NumPy user's own layer".
"""
import numpy as np

try:
    from numpy.lib.array_utils import normalize_axis_tuple
except ImportError:  # NumPy < 2.0
    from numpy.core.numeric import normalize_axis_tuple  # type: ignore[no-redef]

__all__ = ["MovingAverage", "PostBatchNorm", "forward", "backward"]


class MovingAverage:
    """The post's ``_mv_mean`` / ``_mv_var``: ``val = momentum * val + (1 - momentum) * new``."""

    def __init__(self, val, momentum=0.9):
        self.val = val
        self.momentum = momentum

    def apply_update(self, new):
        self.val = self.momentum * self.val + (1.0 - self.momentum) * new


class PostBatchNorm:
    """The post's layer: normalises over every axis but the last (channels-last)."""

    def __init__(self, num_features, ndim=2, momentum=0.9, dtype=np.float32):
        self._fd = tuple(range(ndim - 1))
        self._mv_mean = MovingAverage(np.zeros(num_features, dtype), momentum)
        self._mv_var = MovingAverage(np.ones(num_features, dtype), momentum)

    # --- the post's code, verbatim but for `self` plumbing ---
    def forward(self, x, gamma, is_training):
        if is_training:
            mean = x.mean(self._fd)
            var = x.var(self._fd)
            self._mv_mean.apply_update(mean)
            self._mv_var.apply_update(var)
        else:
            mean = self._mv_mean.val
            var = self._mv_var.val
        self._rstd = 1. / np.sqrt(var + 1e-8)
        self._normed = (x - mean) * self._rstd
        self._gamma = gamma
        return self._normed * gamma

    def backward(self, grad):
        N = np.prod(grad.shape[:-1])
        g_gamma = np.multiply(grad, self._normed)
        g_gamma = g_gamma.sum(self._fd)
        x_ = grad - self._normed * g_gamma * 1. / N
        x_ = self._rstd * self._gamma * x_
        return x_ - x_.mean(self._fd), g_gamma


def _axes(x, axis):
    """(reduced axes, feature shape) as bnorm's API defines them."""
    kept = sorted(normalize_axis_tuple(axis, x.ndim))
    reduced = tuple(a for a in range(x.ndim) if a not in kept)
    return reduced, tuple(x.shape[a] for a in kept)


def _to_x(v, reduced, fshape, dtype):
    """A per-feature quantity (scalar, or broadcastable to F) laid out to broadcast against x."""
    v = np.broadcast_to(np.asarray(v, dtype=dtype), fshape)
    return np.expand_dims(v, reduced)


def forward(x, gamma=None, beta=None, *, axis=-1, eps=1e-8, training=True,
            running_mean=None, running_var=None, momentum=0.9):
    """The post's forward with bnorm's signature; returns ``(y, mean, rstd)``."""
    x = np.asarray(x)
    red, fshape = _axes(x, axis)
    if training:
        mean = x.mean(red)
        var = x.var(red)
        if running_mean is not None:
            running_mean[...] = momentum * running_mean + (1.0 - momentum) * mean
        if running_var is not None:
            running_var[...] = momentum * running_var + (1.0 - momentum) * var
    else:
        mean = np.asarray(running_mean, dtype=x.dtype)
        var = np.asarray(running_var, dtype=x.dtype)
    rstd = (1. / np.sqrt(var + eps)).astype(x.dtype)
    mean = np.asarray(mean, dtype=x.dtype)
    normed = (x - _to_x(mean, red, fshape, x.dtype)) * _to_x(rstd, red, fshape, x.dtype)
    y = normed * _to_x(1 if gamma is None else gamma, red, fshape, x.dtype)
    if beta is not None:
        y = y + _to_x(beta, red, fshape, x.dtype)
    return y.astype(x.dtype, copy=False), mean, rstd


def _sum_to(g, shape):
    """Sum a feature-shaped gradient down to ``shape`` (the shape gamma broadcast from)."""
    lead = g.ndim - len(shape)
    g = g.sum(tuple(range(lead)))
    ones = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(ones, keepdims=True).reshape(shape)


def backward(dy, x, mean, rstd, gamma=None, *, axis=-1, training=True):
    """The post's backward with bnorm's signature; returns ``(dx, dgamma, dbeta)``."""
    x = np.asarray(x)
    dy = np.asarray(dy)
    red, fshape = _axes(x, axis)
    g = 1 if gamma is None else gamma
    normed = (x - _to_x(mean, red, fshape, x.dtype)) * _to_x(rstd, red, fshape, x.dtype)
    N = np.prod([x.shape[a] for a in red], dtype=np.int64)
    g_gamma = np.multiply(dy, normed).sum(red)
    if training:
        x_ = dy - normed * _to_x(g_gamma, red, fshape, x.dtype) * 1. / N
        x_ = _to_x(rstd, red, fshape, x.dtype) * _to_x(g, red, fshape, x.dtype) * x_
        dx = x_ - x_.mean(red, keepdims=True)
    else:
        dx = _to_x(rstd, red, fshape, x.dtype) * _to_x(g, red, fshape, x.dtype) * dy
    dbeta = dy.sum(red)
    dgamma = g_gamma if gamma is None else _sum_to(g_gamma, np.shape(gamma))
    return dx.astype(x.dtype, copy=False), np.asarray(dgamma, x.dtype), np.asarray(dbeta, x.dtype)
