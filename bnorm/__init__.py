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
           "set_buffer_cache", "cpu_target", "show_config", "reference",
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

# How each size threshold follows from the caches (csrc/kernels.c, bn_tune_for, says why), in
# show_config's words; "LLC" is the L3, or the L2 where there is none.
_DERIVATIONS = {
    "l1_way": "L1d size / ways (4 KiB if unknown): rows this far apart share L1 sets",
    "line": "the L1d line (64 B if unknown): streamed outputs cover whole lines",
    "short_row_apply": "2 lines: shorter rows are short in elementwise passes",
    "short_row_reduce": "4 lines: shorter rows are short in reductions",
    "long_row": "1 L1 way: longer rows are each a stream of their own",
    "streamed": "4 x L2: larger passes walk middling rows one at a time",
    "stream_out": "3/4 x LLC: passes touching more write with streaming stores",
    "stream_out_short_rows": "1 x LLC: the same, for passes over short rows",
}


def _size(n):
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << (shift - 4)) == 0:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def show_config(mode="stdout"):
    """Print the machine bnorm runs on, as numpy.show_config does: the CPU target whose kernels
    are in use, the data caches found at import and where from (Linux's sysfs, CPUID, macOS's
    sysctl, Windows, sysconf, the environment variable ``BNORM_CACHES`` or, when none reports
    them, the fallback: the caches of the machine bnorm was tuned on), the thread count and the
    size thresholds derived from the caches.

    ``mode="dicts"`` returns the same as a dict instead of printing (``target``, ``threads``,
    ``caches`` and ``thresholds`` in bytes; a cache of 0 bytes was not reported).
    """
    config = _bnorm._config()
    if mode == "dicts":
        return config
    if mode != "stdout":
        raise ValueError(f"bnorm.show_config: mode must be 'stdout' or 'dicts', got {mode!r}")
    caches, thresholds = config["caches"], config["thresholds"]
    lines = [f"bnorm {__version__}",
             f"CPU target: {config['target']} (compiled: {', '.join(_bnorm.compiled_targets)}; "
             "BNORM_CPU caps it)",
             f"threads: {config['threads']}",
             f"data caches (from {caches['source']}):"]
    l1 = f"  L1d: {_size(caches['l1d'])}"
    details = [f"{caches['l1d_ways']}-way" if caches["l1d_ways"] else "",
               f"{caches['line']}-byte lines" if caches["line"] else ""]
    if any(details):
        l1 += f" ({', '.join(d for d in details if d)})"
    lines.append(l1)
    lines.append(f"  L2: {_size(caches['l2'])}")
    lines.append(f"  L3: {_size(caches['l3']) if caches['l3'] else 'none reported'}")
    lines.append("size thresholds (derived from the caches):")
    width = max(map(len, thresholds))
    for name, value in thresholds.items():
        lines.append(f"  {name:<{width}}  {_size(value):>8}  {_DERIVATIONS[name]}")
    print("\n".join(lines))
    return None


# Last: the layers call the functions above.
from .layer import BatchNorm  # noqa: E402
from .family import GroupNorm, LayerNorm, RMSNorm  # noqa: E402
