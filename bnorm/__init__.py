"""bnorm: batch normalization, forward and backward, as C kernels over NumPy arrays.

The kernels walk arrays of any rank, any set of feature axes and any strides (views, transposes,
negative and zero strides) without copying them; float32 and float64.  See ``forward``,
``backward`` and ``BatchNorm``; layer, RMS and group norm (``layer_norm``, ``rms_norm``,
``group_norm`` and the layers ``LayerNorm``, ``RMSNorm``, ``GroupNorm``) run on the same engine;
``bnorm.reference`` is the blog post's NumPy code.
"""
from . import _bnorm, reference
from .phases import backward_apply, backward_sums, batch_stats, combine_stats, normalize

__version__ = "0.1.0"
__all__ = ["forward", "backward", "BatchNorm", "get_num_threads", "set_num_threads",
           "set_buffer_cache", "cpu_target", "reference",
           "batch_stats", "combine_stats", "normalize", "backward_sums", "backward_apply",
           "layer_norm", "layer_norm_backward", "rms_norm", "rms_norm_backward",
           "group_norm", "group_norm_backward", "LayerNorm", "RMSNorm", "GroupNorm",
           "__version__"]


# forward and backward are the C functions themselves (their docstrings are in csrc/module.c):
# a Python wrapper around them made a (32,64) forward 2.10 us instead of 1.80.
forward = _bnorm.forward
backward = _bnorm.backward
layer_norm = _bnorm.layer_norm
layer_norm_backward = _bnorm.layer_norm_backward
rms_norm = _bnorm.rms_norm
rms_norm_backward = _bnorm.rms_norm_backward
group_norm = _bnorm.group_norm
group_norm_backward = _bnorm.group_norm_backward

get_num_threads = _bnorm.get_num_threads
set_num_threads = _bnorm.set_num_threads
cpu_target = _bnorm.cpu_target


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

# Last: the layers call the functions above.
from .layer import BatchNorm  # noqa: E402
from .family import GroupNorm, LayerNorm, RMSNorm  # noqa: E402
