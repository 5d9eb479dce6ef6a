"""bnorm in processes forked after the parent ran its thread pool (multiprocessing's default on
Linux).  A child has none of the parent's workers: it must start its own instead of waiting for
them (GNU OpenMP hangs there), keep its thread count and give the same bits."""
import multiprocessing
import sys

import numpy as np
import pytest

import bnorm

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork start method is Linux's")

X = np.random.default_rng(0).standard_normal((512, 1024), dtype=np.float32)


def _child_forward(_):
    y, mean, rstd = bnorm.forward(X)
    return bnorm.get_num_threads(), y, mean, rstd


def test_forked_children_compute_the_same_bits_without_hanging():
    before = bnorm.get_num_threads()
    bnorm.set_num_threads(2)
    try:
        expected = bnorm.forward(X)  # large enough to start the thread pool in the parent
        with multiprocessing.get_context("fork").Pool(2) as pool:
            results = pool.map_async(_child_forward, range(4)).get(timeout=60)
        parent_threads = bnorm.get_num_threads()
    finally:
        bnorm.set_num_threads(before)
    assert parent_threads == 2  # the parent keeps its threads
    for threads, *got in results:
        assert threads == 2
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g, e)
