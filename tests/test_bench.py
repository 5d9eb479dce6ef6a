"""The benchmark is the README's main job: it must run and agree with itself.  A tiny run of
``benchmarks/bench.py`` in its own interpreter (it changes glibc's malloc thresholds), on the
smallest case, both dtypes, two runs of the suite (their medians reported), PyTorch included
when installed; the suite cross-checks every peer's y, dx, dgamma and dbeta against bnorm's
before timing and reports any difference."""
import importlib.util
import pathlib
import re
import subprocess
import sys

from helpers import child_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = ("train fwd", "train bwd", "fwd+bwd", "infer fwd")
CASE = "NC (32,64)"


def test_benchmark_runs_and_its_peers_agree(tmp_path):
    table = tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--case", CASE,
           "--dtype", "float32", "--dtype", "float64", "--budget", "0.01", "--rounds", "2",
           "--repeats", "2",
           "--markdown", str(table)]
    # the benchmark imports bnorm the way the test session does (installed or from the tree)
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env())
    assert run.returncode == 0, run.stderr
    text = table.read_text(encoding="utf-8")
    assert text == run.stdout
    assert "Cross-check problems" not in text

    rows = [[c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith(f"| {CASE} |")]
    assert sorted((r[1], r[2]) for r in rows) == sorted(
        (dtype, op) for dtype in ("float32", "float64") for op in OPS)
    torch_installed = importlib.util.find_spec("torch") is not None
    for r in rows:
        bnorm_t, out_t, numpy_t, torch_t = r[3:7]
        for t in (bnorm_t, out_t, numpy_t):
            assert re.fullmatch(r"[0-9.]+ (ns|µs|ms|s)", t), r
        assert (torch_t != "n/a") == torch_installed, r
        numpy_ratio = float(r[7].rstrip("x"))
        assert numpy_ratio > 0, r
