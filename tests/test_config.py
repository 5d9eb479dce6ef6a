"""The machine bnorm runs on (issue 17, part 1): ``bnorm.show_config`` prints the CPU target, the
data caches found at import and where from, the thread count and the size thresholds, which
follow from the caches as csrc/kernels.c (bn_tune_for) derives them; the expected thresholds are
computed here from the caches reported, never copied from bnorm.  ``BNORM_CACHES`` replaces the
cache sizes at import (child interpreters), and the thresholds change only how the passes walk
memory and store, never a result's bits."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from helpers import child_env

import bnorm

KEYS = ("l1_way", "line", "short_row_apply", "short_row_reduce", "long_row", "streamed",
        "stream_out", "stream_out_short_rows")
SOURCES = ("sysfs", "cpuid", "sysctl", "windows", "sysconf", "fallback", "BNORM_CACHES")


def expected_thresholds(caches):
    """The derivation documented in csrc/kernels.c and bnorm.show_config."""
    line = caches["line"]
    if line < 16 or line & (line - 1):
        line = 64
    ways, l1d = caches["l1d_ways"], caches["l1d"]
    l1_way = l1d // ways if ways > 0 and l1d % ways == 0 and l1d // ways >= line else 4096
    llc = caches["l3"] or caches["l2"]
    return {"l1_way": l1_way, "line": line, "short_row_apply": 2 * line,
            "short_row_reduce": 4 * line, "long_row": l1_way, "streamed": 4 * caches["l2"],
            "stream_out": llc // 4 * 3, "stream_out_short_rows": llc}


def child_config(caches_env):
    """bnorm's config in a child interpreter with BNORM_CACHES set (stderr too); run from /, so
    that a source tree in the working directory does not shadow the bnorm under test."""
    code = "import bnorm, json; print(json.dumps(bnorm.show_config(mode='dicts')))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=child_env(BNORM_CACHES=caches_env), cwd="/")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout), run.stderr


def test_show_config_prints_target_caches_threads_thresholds(capsys):
    assert bnorm.show_config() is None
    out = capsys.readouterr().out
    config = bnorm.show_config(mode="dicts")
    assert f"CPU target: {bnorm.cpu_target()}" in out
    assert f"threads: {bnorm.get_num_threads()}" in out
    assert f"data caches (from {config['caches']['source']})" in out
    for level in ("L1d:", "L2:", "L3:"):
        assert level in out
    for name in KEYS:
        assert f"  {name} " in out


def test_show_config_dicts():
    config = bnorm.show_config(mode="dicts")
    assert config["target"] == bnorm.cpu_target()
    assert config["threads"] == bnorm.get_num_threads()
    caches = config["caches"]
    assert caches["source"] in SOURCES
    assert caches["l1d"] > 0 and caches["l2"] > 0 and caches["l3"] >= 0
    assert tuple(config["thresholds"]) == KEYS
    with pytest.raises(ValueError, match="mode"):
        bnorm.show_config(mode="json")


def test_threads_are_the_current_count():
    n = bnorm.get_num_threads()
    try:
        bnorm.set_num_threads(1)
        assert bnorm.show_config(mode="dicts")["threads"] == 1
    finally:
        bnorm.set_num_threads(n)


def test_thresholds_follow_the_caches_reported():
    config = bnorm.show_config(mode="dicts")
    assert config["thresholds"] == expected_thresholds(config["caches"])


SYSFS = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")


@pytest.mark.skipif(not SYSFS.is_dir(), reason="no Linux sysfs cache information")
def test_sysfs_caches_are_read_as_the_kernel_reports_them():
    caches = bnorm.show_config(mode="dicts")["caches"]
    if caches["source"] != "sysfs":
        pytest.skip(f"caches from {caches['source']}")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    found = {}
    for index in sorted(SYSFS.glob("index*")):
        if (index / "type").read_text().strip() == "Instruction":
            continue
        size = (index / "size").read_text().strip()
        found[int((index / "level").read_text())] = (
            int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size))
    assert caches["l1d"] == found[1] and caches["l2"] == found[2]
    assert caches["l3"] == found.get(3, 0)


def test_environment_overrides_the_cache_sizes():
    config, _ = child_config("48K,2M,0")
    caches = config["caches"]
    assert caches["source"] == "BNORM_CACHES"
    assert (caches["l1d"], caches["l2"], caches["l3"]) == (48 << 10, 2 << 20, 0)
    # no L3: the L2 is the last level
    assert config["thresholds"] == expected_thresholds(caches)
    assert config["thresholds"]["stream_out_short_rows"] == 2 << 20


@pytest.mark.parametrize("text", ["32K,1M", "x", "0,1M,32M", "32K,1M,32M,", "32K,-1,3"])
def test_a_malformed_override_is_ignored_with_a_warning(text):
    config, stderr = child_config(text)
    assert "ignoring BNORM_CACHES" in stderr
    assert config["caches"]["source"] != "BNORM_CACHES"
    assert config["thresholds"] == expected_thresholds(config["caches"])


# Tiny caches make every pass below "large": row by row walking, streaming stores and L1-way
# grouping all switch on for arrays of a few hundred KiB.  The results must keep their bits.
CHECK = """
import sys, numpy as np, bnorm
rng = np.random.default_rng(1)
out = []
for shape, axis in (((512, 96), -1), ((256, 1024), -1), ((64, 16), -1), ((8, 24, 12, 20), 1)):
    for dtype in (np.float32, np.float64, np.float16):
        x = (3 + rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        y, mean, rstd = bnorm.forward(x, axis=axis)
        dx, dg, db = bnorm.backward(dy, x, mean, rstd, axis=axis)
        relu = bnorm.forward(x, axis=axis, activation="relu")[0]
        out += [y, mean, rstd, dx, dg, db, relu]
np.savez(sys.argv[1], *out)
"""


def test_thresholds_never_change_results(tmp_path):
    files = {}
    for name, env in (("tiny", "4K,16K,64K"), ("this machine", "")):
        files[name] = tmp_path / f"{len(files)}.npz"
        run = subprocess.run([sys.executable, "-c", CHECK, str(files[name])], capture_output=True,
                             text=True, timeout=300, env=child_env(BNORM_CACHES=env), cwd="/")
        assert run.returncode == 0, run.stderr
    a, b = np.load(files["tiny"]), np.load(files["this machine"])
    assert a.files == b.files
    for key in a.files:
        assert a[key].tobytes() == b[key].tobytes(), key
