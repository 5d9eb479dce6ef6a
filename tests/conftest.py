"""Hypothesis profiles for the property tests (tests/test_properties.py).

* ``ci`` (the default): a bounded number of examples per test, so the whole property file stays
  well under a minute on two cores; no deadline (timings vary on shared CI machines and under
  sanitizers).
* ``deep``: many more examples, for a long local or nightly hunt::

      HYPOTHESIS_PROFILE=deep python -m pytest -q tests/test_properties.py

A failure prints the falsifying example and a ``@reproduce_failure`` blob (print_blob).
"""
import os

from hypothesis import HealthCheck, settings

_common = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=300, **_common)
settings.register_profile("deep", max_examples=5000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config):
    import bnorm
    return f"bnorm {bnorm.__version__}: CPU target {bnorm.cpu_target()} (BNORM_CPU caps it), " \
           f"{bnorm.get_num_threads()} threads"
