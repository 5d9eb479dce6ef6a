"""The blog post's NumPy batch norm, kept faithful, for tests and benchmarks.

Two things live here:

* ``PostBatchNorm``: the post's layer line for line (channels-last, biased variance, eps 1e-8,
  moving averages with momentum 0.9, no beta, backward returning ``(dx, dgamma)``).
* ``forward`` / ``backward``: the same NumPy expressions, generalised only as far as bnorm's API
  needs (any set of kept feature axes, beta, gamma broadcasting, explicit running statistics,
  inference-mode backward as ``dx = gamma * rstd * dy``), so the tests and benchmarks can call the
  post's code with bnorm's signature.  Nothing is optimised: this is the "NumPy user's own layer".

And, not from the post, the rest of the family as NumPy users write it, the baselines that
``bnorm.layer_norm``, ``rms_norm`` and ``group_norm`` are benchmarked against:

* ``layer_norm_forward`` / ``layer_norm_backward``: over the last axis, with a cache tuple, the
  way every "GPT in NumPy" writes it (Karpathy's llm.c ``layernorm.py``, picoGPT);
* ``rms_norm_forward`` / ``rms_norm_backward``: the same for RMS norm (LLaMA's);
* ``group_norm_forward`` / ``group_norm_backward``: NCHW, the channels in ``num_groups``
  consecutive groups, as CS231n's spatial group norm.

They compute in x's dtype (float32 sums for float32 data) and return ``(y, cache)`` and the
gradients.
"""
import numpy as np

try:
    from numpy.lib.array_utils import normalize_axis_tuple
except ImportError:  # NumPy < 2.0
    from numpy.core.numeric import normalize_axis_tuple  # type: ignore[no-redef]

__all__ = ["MovingAverage", "PostBatchNorm", "forward", "backward",
           "layer_norm_forward", "layer_norm_backward", "rms_norm_forward",
           "rms_norm_backward", "group_norm_forward", "group_norm_backward"]


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


# ---------------------------------------------------------------------------------------------
# The family, textbook NumPy (not from the post).

def layer_norm_forward(x, gamma, beta, eps=1e-5):
    """Layer norm over the last axis; returns ``(y, cache)``."""
    C = x.shape[-1]
    mean = x.sum(-1, keepdims=True) / C
    xshift = x - mean
    var = (xshift ** 2).sum(-1, keepdims=True) / C
    rstd = (var + eps) ** -0.5
    norm = xshift * rstd
    y = norm * gamma + beta
    cache = (x, gamma, mean, rstd)
    return y, cache


def layer_norm_backward(dy, cache):
    """Gradients ``(dx, dgamma, dbeta)`` of ``layer_norm_forward``."""
    x, gamma, mean, rstd = cache
    batch = tuple(range(x.ndim - 1))
    norm = (x - mean) * rstd
    dbeta = dy.sum(batch)
    dgamma = (dy * norm).sum(batch)
    dnorm = dy * gamma
    dx = dnorm - dnorm.mean(-1, keepdims=True) - (dnorm * norm).mean(-1, keepdims=True) * norm
    dx *= rstd
    return dx, dgamma, dbeta


def rms_norm_forward(x, gamma, eps=1e-6):
    """RMS norm over the last axis; returns ``(y, cache)``."""
    rrms = 1.0 / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)
    y = x * rrms * gamma
    cache = (x, gamma, rrms)
    return y, cache


def rms_norm_backward(dy, cache):
    """Gradients ``(dx, dgamma)`` of ``rms_norm_forward``."""
    x, gamma, rrms = cache
    norm = x * rrms
    dgamma = (dy * norm).sum(tuple(range(x.ndim - 1)))
    dnorm = dy * gamma
    dx = rrms * (dnorm - norm * (dnorm * norm).mean(-1, keepdims=True))
    return dx, dgamma


def group_norm_forward(x, gamma, beta, num_groups, eps=1e-5):
    """Group norm of NCHW ``x`` (any number of trailing spatial axes), gamma and beta of shape
    ``(C,)``; returns ``(y, cache)``."""
    N, C = x.shape[:2]
    xg = x.reshape(N, num_groups, -1)
    mean = xg.mean(-1, keepdims=True)
    var = xg.var(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    norm = ((xg - mean) * rstd).reshape(x.shape)
    per_channel = (1, C) + (1,) * (x.ndim - 2)
    y = norm * gamma.reshape(per_channel) + beta.reshape(per_channel)
    cache = (x, gamma, mean, rstd, num_groups)
    return y, cache


def group_norm_backward(dy, cache):
    """Gradients ``(dx, dgamma, dbeta)`` of ``group_norm_forward``."""
    x, gamma, mean, rstd, num_groups = cache
    N, C = x.shape[:2]
    per_channel = (1, C) + (1,) * (x.ndim - 2)
    reduced = (0,) + tuple(range(2, x.ndim))
    norm = (x.reshape(N, num_groups, -1) - mean) * rstd
    dgamma = (dy * norm.reshape(x.shape)).sum(reduced)
    dbeta = dy.sum(reduced)
    dnorm = (dy * gamma.reshape(per_channel)).reshape(N, num_groups, -1)
    dx = rstd * (dnorm - dnorm.mean(-1, keepdims=True)
                 - norm * (dnorm * norm).mean(-1, keepdims=True))
    return dx.reshape(x.shape), dgamma, dbeta
