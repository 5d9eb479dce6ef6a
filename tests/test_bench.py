"""The benchmark is the README's main job: it must run and agree with itself.  A tiny run of
``benchmarks/bench.py`` in its own interpreter (it changes glibc's malloc thresholds), on the
smallest case, float32, float64 and the half dtypes (float16; bfloat16 when ml_dtypes is
installed), two runs of the suite (their medians reported), PyTorch included when installed, with
the ReLU rows (batch norm + ReLU, fwd+bwd) on it in float32 and float64; the suite cross-checks
every peer's y, dx, dgamma and dbeta (against bnorm's, for the half rows against a float64
evaluation within a few half epsilons, for the ReLU rows bnorm fused against bnorm + NumPy's ReLU
bit for bit) before timing and reports any difference."""
import importlib.util
import pathlib
import re
import subprocess
import sys

from helpers import child_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = ("train fwd", "train bwd", "fwd+bwd", "infer fwd")
CASE = "NC (32,64)"
FULL = ("float32", "float64")
HALVES = ("float16",) + (("bfloat16",) if importlib.util.find_spec("ml_dtypes") else ())
TIME = r"[0-9.]+ (ns|µs|ms|s)"


def tables(text):
    """Each Markdown table of text as a list of {column: cell} rows."""
    out, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.split("|")[1:-1]])
        elif block:
            out.append([dict(zip(block[0], cells)) for cells in block[2:]])
            block = []
    return out


def test_benchmark_runs_and_its_peers_agree(tmp_path):
    table = tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--case", CASE,
           "--budget", "0.01", "--rounds", "2", "--repeats", "2", "--relu-cases", "all",
           "--markdown", str(table)]
    # no re-runs on a busy machine: this checks results, not timings, and each re-run first waits
    # up to 60 s for a quiet second (another test session on 2 CPUs made it time out)
    cmd += ["--retries", "0"]
    for dtype in FULL + HALVES:
        cmd += ["--dtype", dtype]
    # the benchmark imports bnorm the way the test session does (installed or from the tree)
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env())
    assert run.returncode == 0, run.stderr
    text = table.read_text(encoding="utf-8")
    assert text == run.stdout
    assert "Cross-check problems" not in text
    # the post's float16 code is accurate enough on 32 rows: checked, and timed
    assert "not timed where its results are off" not in text

    full, relu, half = tables(text)
    assert "op" in full[0] and "bnorm float32" in half[0] and "bnorm fused" in relu[0]
    torch_installed = importlib.util.find_spec("torch") is not None
    assert sorted((r["dtype"], r["op"]) for r in full) == sorted(
        (dtype, op) for dtype in FULL for op in OPS)
    assert sorted((r["dtype"], r["op"]) for r in half) == sorted(
        (dtype, op) for dtype in HALVES for op in OPS)
    for r in full + half:
        assert r["case"] == CASE, r
        for col in ("bnorm", "bnorm (out=)"):
            assert re.fullmatch(TIME, r[col]), r
        assert (r["PyTorch"] != "n/a") == torch_installed, r
    for r in full:
        assert re.fullmatch(TIME, r["NumPy (post)"]), r
        assert float(r["NumPy/bnorm"].rstrip("x")) > 0, r
    for r in half:
        assert re.fullmatch(TIME, r["bnorm float32"]), r
        assert float(r["float32/bnorm"].rstrip("x")) > 0, r
        if r["dtype"] == "float16":
            assert re.fullmatch(TIME, r["NumPy (post)"]), r
            assert float(r["NumPy/bnorm"].rstrip("x")) > 0, r
        else:   # the post's code has no bfloat16
            assert r["NumPy (post)"] == r["NumPy/bnorm"] == "—", r
    for dtype in HALVES:
        assert re.search(rf"^- {dtype}, large cases .*vs bnorm float32 .*vs PyTorch ", text,
                         re.MULTILINE)

    # the ReLU rows: one per full dtype (half dtypes have none), every peer timed, its summary
    # lines, and the fused results equal to the unfused ones bit for bit
    assert sorted(r["dtype"] for r in relu) == sorted(FULL)
    for r in relu:
        assert r["case"] == CASE, r
        for col in ("bnorm fused", "bnorm + NumPy ReLU", "NumPy (post) + ReLU"):
            assert re.fullmatch(TIME, r[col]), r
        for col in ("unfused/fused", "NumPy/fused"):
            assert float(r[col].rstrip("x")) > 0, r
        assert (r["PyTorch"] != "n/a") == (r["PyTorch/fused"] != "n/a") == torch_installed, r
    for dtype in FULL + ("all",):
        assert re.search(rf"^- {dtype}: vs bnorm \+ NumPy ReLU .*vs NumPy \(post\) \+ ReLU "
                         rf".*vs PyTorch ", text, re.MULTILINE)
    for dtype in FULL:
        assert re.search(rf"^- {re.escape(CASE)} {dtype}: bnorm fused = bnorm \+ NumPy ReLU "
                         r"bit for bit;", text, re.MULTILINE), text


FAMILY_CASES = ("LayerNorm (64,256)", "RMSNorm (4,16,96)", "GroupNorm NCHW (4,16,8,8) groups=4",
                "GroupNorm NHWC (4,8,8,16) groups=4 axis=-1")
FAMILY_OPS = ("fwd", "bwd", "fwd+bwd")


def test_family_rows_run_and_their_peers_agree(tmp_path):
    """The normalization family's rows on their small shapes (--family-cases small), float32
    and float64: every peer timed, its results cross-checked against bnorm's, the summary
    against issue 15's targets printed."""
    table = tmp_path / "family.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--family-cases", "small",
           "--budget", "0.01", "--rounds", "1", "--retries", "0", "--markdown", str(table)]
    for case in ("LayerNorm", "RMSNorm", "GroupNorm"):   # no batch-norm case has these names
        cmd += ["--case", case]
    for dtype in FULL:
        cmd += ["--dtype", dtype]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env())
    assert run.returncode == 0, run.stderr
    text = table.read_text(encoding="utf-8")
    assert "Cross-check problems" not in text, text
    (family,) = tables(text)
    assert sorted((r["case"], r["dtype"], r["op"]) for r in family) == sorted(
        (case, dtype, op) for case in FAMILY_CASES for dtype in FULL for op in FAMILY_OPS)
    torch_installed = importlib.util.find_spec("torch") is not None
    for r in family:
        for col in ("bnorm", "NumPy"):
            assert re.fullmatch(TIME, r[col]), r
        assert float(r["NumPy/bnorm"].rstrip("x")) > 0, r
        assert (r["PyTorch"] != "n/a") == (r["PyTorch/bnorm"] != "n/a") == torch_installed, r
    for kind in ("layer norm", "RMS norm", "group norm", "all"):
        assert re.search(rf"^- {kind}: vs NumPy .*vs PyTorch .*full step vs NumPy ", text,
                         re.MULTILINE), text
    assert re.search(r"^Rows below issue 15's targets: ", text, re.MULTILINE)


def test_scaling_runs(tmp_path):
    """``--scaling`` on a tiny range (4 to 16 KiB, the post's code up to 8 KiB): a table row per
    size with every peer's time per element, and the plot when matplotlib is installed."""
    table, png = tmp_path / "scaling.md", tmp_path / "scaling.png"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--scaling",
           "--scaling-min", "4K", "--scaling-max", "16K", "--scaling-numpy-max", "8K",
           "--budget", "0.01", "--rounds", "1", "--retries", "0", "--markdown", str(table),
           "--plot", str(png)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env())
    assert run.returncode == 0, run.stderr
    text = table.read_text(encoding="utf-8")
    assert text == run.stdout
    (rows,) = tables(text)
    assert [(r["x size"], r["shape"]) for r in rows] == [
        ("4 KiB", "(16,64)"), ("8 KiB", "(32,64)"), ("16 KiB", "(64,64)")]
    torch_installed = importlib.util.find_spec("torch") is not None
    for r in rows:
        assert float(r["bnorm ns/elem"]) > 0, r
        assert re.fullmatch(TIME, r["bnorm step"]), r
        assert (r["PyTorch ns/elem"] != "n/a") == torch_installed, r
        assert (r["NumPy (post) ns/elem"] != "n/a") == (r["x size"] != "16 KiB"), r
        assert float(r["others' CPUs"]) >= 0, r
    assert "Caches (" in text and "L1d " in text
    assert png.exists() == (importlib.util.find_spec("matplotlib") is not None)
