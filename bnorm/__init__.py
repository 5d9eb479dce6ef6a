"""bnorm: batch normalization, forward and backward, as C kernels over NumPy arrays.

The kernels walk arrays of any rank, any set of feature axes and any strides (views, transposes,
negative and zero strides) without copying them; float32 and float64.  See ``forward``,
``backward`` and ``BatchNorm``; ``bnorm.reference`` is the blog post's NumPy code.
"""
from . import _bnorm, reference
from .phases import backward_apply, backward_sums, batch_stats, combine_stats, normalize

__version__ = "0.1.0"
__all__ = ["forward", "backward", "BatchNorm", "get_num_threads", "set_num_threads",
           "set_buffer_cache", "reference",
           "batch_stats", "combine_stats", "normalize", "backward_sums", "backward_apply",
           "__version__"]


def forward(x, gamma=None, beta=None, *, axis=-1, eps=1e-8, training=True,
            running_mean=None, running_var=None, momentum=0.9, out=None):
    """Batch-normalize ``x`` over every axis except the feature axes ``axis``.

    Returns ``(y, mean, rstd)``.  ``axis`` (int or tuple, negative allowed; ``()`` reduces over
    everything) names the feature axes that are kept; the feature shape ``F`` is their lengths in
    axis order.  ``mean`` and ``rstd = 1/sqrt(var + eps)`` have shape ``F`` and ``x``'s dtype;
    with ``x`` they are all that ``backward`` needs.

    training=True: batch statistics, with the biased variance.  If ``running_mean`` /
    ``running_var`` (writable float arrays of shape ``F``) are given they are updated in place as
    ``r = momentum * r + (1 - momentum) * batch_stat`` (momentum is the weight of the old value, as
    in the post and Keras; PyTorch's ``momentum=m`` is ours ``1 - m``); the running variance is the
    same biased variance used to normalize.
    training=False: ``running_mean`` / ``running_var`` (shape ``F``) are required and used as the
    statistics; the returned ``mean`` equals ``running_mean``.

    ``gamma`` / ``beta``: None (1 and 0), a scalar, or anything broadcasting to ``F``.
    ``y = (x - mean) * (rstd * gamma) + beta`` (never folded to ``x * a + b``, which cancels for data
    far from zero).  Statistics are accumulated in float64 from shifted data, so float32 input far
    from zero (``1e4 + randn``) is normalized to float32 precision.
    ``out``: an array of ``x``'s shape and dtype to write ``y`` into (``out=x`` works in place).

    Errors (nothing is modified when one is raised): TypeError for non-float dtypes, AxisError for
    0-d ``x`` or an axis out of range, ValueError for repeated axes, shapes that do not fit ``F``,
    an empty batch (M == 0) in training, missing running statistics when not training, read-only
    ``out`` or running statistics.  NaN and inf propagate only to the features they touch.
    """
    return _bnorm.forward(x, gamma, beta, axis, eps, training, running_mean, running_var,
                          momentum, out)


def backward(dy, x, mean, rstd, gamma=None, *, axis=-1, training=True, out=None):
    """Gradients of batch norm: returns ``(dx, dgamma, dbeta)``.

    ``dy`` has ``x``'s shape; ``mean`` and ``rstd`` are what ``forward`` returned, ``gamma`` what it
    got.  With ``xhat = (x - mean) * rstd`` and sums over the batch axes (``M`` elements each):
    ``dbeta = sum(dy)``, ``dgamma = sum(dy * xhat)`` and

    * training=True: ``dx = gamma * rstd * (dy - dbeta / M - xhat * dgamma / M)``;
    * training=False (the statistics were constants): ``dx = gamma * rstd * dy``.

    ``dgamma`` has ``gamma``'s shape (a scalar gamma gets a 0-d sum over everything it broadcast
    over; gamma None gives shape ``F``); ``dbeta`` has shape ``F``.  ``dy`` of the other float dtype
    is cast to ``x``'s.  In training mode ``mean`` is taken to be the batch mean of ``x``: the small
    residual between it and the exact batch mean (a float32 ``mean`` is rounded) is recomputed in
    float64, so gradients stay float32-accurate for data far from zero.  ``out`` as in ``forward``
    (``out=dy`` works in place).
    """
    return _bnorm.backward(dy, x, mean, rstd, gamma, axis, training, out)


get_num_threads = _bnorm.get_num_threads
set_num_threads = _bnorm.set_num_threads


def set_buffer_cache(max_bytes):
    """Keep at most ``max_bytes`` of freed outputs for reuse; returns the previous limit.

    Outputs of 128 KiB and more (``y``, ``dx`` made without ``out=``) come from a small cache: when
    such an array dies its memory is kept (up to 16 buffers, 512 MiB by default) and the next
    output of the same byte size reuses it.  A training loop asks for the same sizes every step,
    and fresh memory from the operating system costs a page fault per page on first write, which
    made a large forward pass up to 2x slower.  The outputs are ordinary arrays that own their
    data.  ``set_buffer_cache(0)`` releases what is kept and keeps nothing more.
    """
    return _bnorm.set_buffer_cache(max_bytes)

# Last: the layer calls the wrappers above.
from .layer import BatchNorm  # noqa: E402
