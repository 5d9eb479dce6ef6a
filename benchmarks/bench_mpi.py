"""Benchmark: a SyncBatchNorm training step on 2 MPI ranks (loopback) against single-process.

    python benchmarks/bench_mpi.py [--reps 20] [--rounds 5] [--ranks 2]

A step is ``forward(x)`` + ``backward(dy)`` in training mode.  The single-process rows run
``bnorm.BatchNorm`` on the whole batch with 1 and with 2 threads; the MPI row launches
``mpiexec -n 2`` on this script, each rank holding half of the batch (1 thread each) and running
``bnorm.mpi.SyncBatchNorm``: its time is the slowest rank's, per step, median over the steps.
Rounds interleave the columns (each the median over rounds), against a load that comes and goes.
The Allreduce column is the two Allreduce calls of a step alone (forward's and backward's buffers,
same sizes, no compute).  Prints a Markdown table.  Needs mpi4py and an mpiexec (``bash
.ci/mpi-setup``).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# (global shape, feature axis, what it is)
SHAPES = [
    ((64, 56, 56, 64), -1, "NHWC conv activations"),
    ((64, 64, 56, 56), 1, "NCHW conv activations"),
    ((256, 1024), -1, "(batch, features) MLP"),
]


def _batch(shape, axis, lo, hi, dtype, seed):
    """Rows lo:hi (along axis 0) of the global batch: x, dy."""
    rng = np.random.default_rng(seed + lo)
    part = (hi - lo,) + tuple(shape[1:])
    x = (rng.standard_normal(part, dtype=np.float32) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(part, dtype=np.float32).astype(dtype)
    return x, dy


def _nfeat(shape, axis):
    return shape[axis]


def _median_step(step, reps, sync=None):
    step()   # warm-up (thread pool, page faults)
    step()
    times = []
    for _ in range(reps):
        if sync is not None:
            sync.Barrier()
        t = time.perf_counter()
        step()
        dt = time.perf_counter() - t
        if sync is not None:
            from mpi4py import MPI
            dt = sync.allreduce(dt, op=MPI.MAX)   # the step ends when the slowest rank does
        times.append(dt)
    return float(np.median(times))


def single_process(shape, axis, dtype, threads, reps):
    import bnorm
    bnorm.set_num_threads(threads)
    x, dy = _batch(shape, axis, 0, shape[0], dtype, seed=0)
    layer = bnorm.BatchNorm(_nfeat(shape, axis), axis=axis, dtype=dtype)

    def step():
        layer.forward(x)
        layer.backward(dy)
    return _median_step(step, reps)


def worker(reps, dtype):
    """Run by every rank: SyncBatchNorm on this rank's half; rank 0 prints JSON."""
    from mpi4py import MPI

    import bnorm
    from bnorm.mpi import SyncBatchNorm
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    bnorm.set_num_threads(1)
    rows = []
    for shape, axis, _ in SHAPES:
        cuts = np.linspace(0, shape[0], size + 1).astype(int)
        x, dy = _batch(shape, axis, cuts[rank], cuts[rank + 1], dtype, seed=0)
        F = _nfeat(shape, axis)
        layer = SyncBatchNorm(comm, F, axis=axis, dtype=dtype)

        def step():
            layer.forward(x)
            layer.backward(dy)
        t_step = _median_step(step, reps, sync=comm)
        fs, fr = np.zeros(2 * F + 5), np.zeros(2 * F + 5)
        bs, br = np.zeros(2 * F + 2), np.zeros(2 * F + 2)

        def comm_only():
            comm.Allreduce(fs, fr, op=MPI.SUM)
            comm.Allreduce(bs, br, op=MPI.SUM)
        t_comm = _median_step(comm_only, max(reps, 50), sync=comm)
        rows.append({"shape": shape, "t_step": t_step, "t_comm": t_comm})
        del x, dy
    if rank == 0:
        lib = MPI.Get_library_version().splitlines()[0].split(",")[0]
        print("RESULT " + json.dumps({"rows": rows, "mpi": " ".join(lib.split())}), flush=True)


def _mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file():
        return str(beside)
    return shutil.which("mpiexec")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20, help="steps timed per run (default 20)")
    ap.add_argument("--rounds", type=int, default=5, help="runs of each column (default 5)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtype = np.dtype(args.dtype)
    if args.worker:
        worker(args.reps, dtype)
        return

    mpiexec = _mpiexec()
    if mpiexec is None:
        sys.exit("bench_mpi: no mpiexec (bash .ci/mpi-setup installs MPICH and mpi4py)")
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout
    cmd = [mpiexec] + (["--oversubscribe"] if "Open MPI" in version else [])
    cmd += ["-n", str(args.ranks), sys.executable, __file__, "--worker", "--reps",
            str(args.reps), "--dtype", dtype.name]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               BNORM_NUM_THREADS="1")
    import bnorm
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(bnorm.__file__).resolve().parent.parent), env.get("PYTHONPATH"))
        if p)

    # Rounds interleave the MPI job and the single-process runs, so that a load that comes and
    # goes on the machine hits all columns alike; each number is the median over rounds.
    t1 = [[] for _ in SHAPES]
    t2 = [[] for _ in SHAPES]
    tm = [[] for _ in SHAPES]
    tc = [[] for _ in SHAPES]
    for _ in range(args.rounds):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            sys.exit(f"bench_mpi: {' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n"
                     f"{out.stderr}")
        res = json.loads(lines[-1][len("RESULT "):])
        for i, ((shape, axis, _), row) in enumerate(zip(SHAPES, res["rows"])):
            tm[i].append(row["t_step"])
            tc[i].append(row["t_comm"])
            t1[i].append(single_process(shape, axis, dtype, 1, args.reps))
            t2[i].append(single_process(shape, axis, dtype, 2, args.reps))

    med = lambda v: float(np.median(v))  # noqa: E731
    load = ", load average %.1f (other work on the machine)" % os.getloadavg()[0] \
        if hasattr(os, "getloadavg") else ""
    print(f"SyncBatchNorm training step (forward + backward), {dtype.name}; median over "
          f"{args.rounds} rounds of the median of {args.reps} steps; {os.cpu_count()} cores; "
          f"{res['mpi']}, {args.ranks} ranks on loopback, 1 thread each, batch split evenly"
          f"{load}.\n")
    print(f"| global batch (axis) | single process, 1 thread | single process, 2 threads | "
          f"SyncBatchNorm, {args.ranks} ranks x 1 thread | of which 2 Allreduce |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for i, (shape, axis, what) in enumerate(SHAPES):
        a, b, m, c = med(t1[i]), med(t2[i]), med(tm[i]), med(tc[i])
        print(f"| {what} {tuple(shape)} (axis={axis}) | {_ms(a)} | {_ms(b)} | {_ms(m)} | "
              f"{_ms(c)} |")


def _ms(t):
    return f"{t * 1e3:.3f} ms" if t < 0.01 else f"{t * 1e3:.1f} ms"


if __name__ == "__main__":
    main()
