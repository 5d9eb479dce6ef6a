"""Batch norm in phases, for statistics and gradients reduced across several workers.

``bnorm.forward`` and ``bnorm.backward`` are these phases run back to back on one worker (the same
C steps).  Across workers (MPI ranks, processes, devices), run the local phase, reduce its small
per-feature result, and run the elementwise phase with the global numbers::

    n, mean, m2 = bnorm.batch_stats(x, axis=axis)              # local, C
    n, mean, m2 = bnorm.combine_stats(all_n, all_mean, all_m2)  # exact merge (Chan et al.)
    rstd = 1 / np.sqrt(m2 / n + eps)
    y = bnorm.normalize(x, mean, rstd, gamma, beta, axis=axis)

    sum_dy, sum_dy_xmu = bnorm.backward_sums(dy, x, mean, axis=axis)   # local, C
    # ... sum both over all workers ...
    dx = bnorm.backward_apply(dy, x, mean, rstd, sum_dy, sum_dy_xmu, n, gamma, axis=axis)
    dgamma, dbeta = rstd * sum_dy_xmu, sum_dy

Statistics are float64 whatever the data's dtype, so combining them loses nothing; a worker may
hold any number of rows, zero included.
"""
import numpy as np

from . import _bnorm

__all__ = ["batch_stats", "combine_stats", "normalize", "backward_sums", "backward_apply"]

# The local phases are the C functions themselves (signatures and docstrings in csrc/module.c),
# called with the same arguments as here.
batch_stats = _bnorm.batch_stats
normalize = _bnorm.normalize
backward_sums = _bnorm.backward_sums
backward_apply = _bnorm.backward_apply


def combine_stats(counts, means, m2s):
    """Merge per-worker ``(count, mean, m2)`` into the statistics of the union, exactly.

    ``counts`` has one entry per worker; ``means`` and ``m2s`` stack the workers' float arrays along
    a new first axis.  Workers with count 0 contribute nothing.  Uses Chan, Golub and LeVeque's
    pairwise update, weighted by counts, in worker order (deterministic).  Returns
    ``(count, mean, m2)`` with float64 arrays.
    """
    given = np.asarray(counts)
    # element counts: integers (or integral floats, as an Allreduce in float64 delivers them);
    # 2.5 is a mistake, not 2
    if not (np.issubdtype(given.dtype, np.integer) or
            (np.issubdtype(given.dtype, np.floating) and np.all(np.isfinite(given))
             and np.array_equal(given, np.round(given)))):
        raise TypeError(f"bnorm: combine_stats needs integer counts, got {given!r}")
    counts = given.astype(np.int64)
    means = np.asarray(means, dtype=np.float64)
    m2s = np.asarray(m2s, dtype=np.float64)
    if counts.ndim != 1 or means.shape[:1] != counts.shape or m2s.shape != means.shape:
        raise ValueError(f"bnorm: combine_stats needs counts of shape (k,) and means, m2s of "
                         f"shape (k, *F); got {counts.shape}, {means.shape}, {m2s.shape}")
    if (counts < 0).any():
        raise ValueError("bnorm: counts must be >= 0")
    n = 0
    mean = np.zeros(means.shape[1:])
    m2 = np.zeros(means.shape[1:])
    for n_b, mean_b, m2_b in zip(counts.tolist(), means, m2s):
        if n_b == 0:
            continue
        total = n + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta * delta * (n * n_b / total)
        n = total
    return n, mean, m2
