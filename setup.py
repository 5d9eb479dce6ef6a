"""Builds the C extension bnorm._bnorm; everything else is in pyproject.toml.

Environment knobs (for developers, not users):
  BNORM_SANITIZE=1   compile with AddressSanitizer + UndefinedBehaviorSanitizer (see .ci/sanitize,
                     which builds and tests it in its own venv; importing it needs libasan in
                     LD_PRELOAD).  Such builds go to build/sanitize/, not build/: setuptools skips
                     an extension whose file in the build directory is newer than its sources, so
                     a shared directory would hand a sanitized build to a later plain
                     `pip install .`, or the plain one to a sanitized build.
"""
import os
import subprocess

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sanitize = os.environ.get("BNORM_SANITIZE") == "1"

compile_args = ["-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
link_args = []
if sanitize:
    flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    # -fno-wrapv: CPython's CFLAGS carry -fwrapv, which makes signed overflow defined and so
    # silently switches off UBSan's signed-integer-overflow check (npy_intp index arithmetic).
    compile_args += ["-O1", "-g", "-fno-wrapv"] + flags
    link_args += flags
else:
    # -O3 lets GCC vectorize the kernels' inner loops; no -ffast-math: the summation order is ours.
    # -fno-math-errno: sqrt without errno's branch, so that rstd's loop vectorizes (bnorm never
    # reads errno; IEEE results are unchanged).  -fno-trapping-math: bnorm never unmasks
    # floating-point traps nor reads the exception flags, and GCC otherwise keeps a conversion
    # that could trap out of vector selects: with it, the fused ReLU's backward sums and every
    # half-precision reduction vectorize for AVX2 (results unchanged; clang assumes the same by
    # default).  clang takes these flags as GCC does.
    compile_args += ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math"]
# Debug information (CPython's flags ask for it) in DWARF 4: valgrind 3.19 cannot read clang 14's
# DWARF 5 and ends the process it runs (tests/test_cpu_targets.py runs bnorm under it).
compile_args.append("-gdwarf-4")
# The kernels' thread pool (csrc/pool.c) is pthreads (Win32's threads on Windows).
compile_args.append("-pthread")
link_args.append("-pthread")
# Flags that not every GCC-like compiler takes, used where it does (see BuildExt):
#  -fopenmp-simd honours the kernels' `omp simd` loop hints (independent lanes, no reassociation)
#    without OpenMP's runtime.
#  -Wno-pass-failed (clang): clang warns for each `omp simd` loop it left scalar; those are the
#    copies for a run-time tail length or loops it unrolled whole and vectorized as straight code.
optional_args = ["-fopenmp-simd", "-Wno-pass-failed"]
# MSVC (Windows wheels): C11 for `restrict`; its own pragmas only (C4068: `omp simd` unknown
# without /openmp); no threads library to name: the pool uses Win32's threads there.
msvc_args = ["/std:c11", "/O2", "/wd4068"]


class BuildExt(build_ext):
    """The flags above for GCC and clang (the optional ones a compiler rejects left out), or
    MSVC's."""

    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            extra, link = msvc_args, []
        else:
            extra = compile_args + [flag for flag in optional_args if self._accepts(flag)]
            link = link_args
        for ext in self.extensions:
            ext.extra_compile_args = extra
            ext.extra_link_args = link
        super().build_extensions()

    def _accepts(self, flag):
        # GCC takes any -Wno-X silently (it complains only once another warning comes up), so
        # ask about -WX, which it rejects when unknown; clang's warning for an unknown flag is
        # made an error.
        probe = "-W" + flag[5:] if flag.startswith("-Wno-") else flag
        command = self.compiler.compiler_so + ["-Werror", probe, "-x", "c", "-c", "-", "-o", os.devnull]
        try:
            return subprocess.run(command, input="", text=True, capture_output=True).returncode == 0
        except OSError:
            return False

setup(
    cmdclass={"build_ext": BuildExt},
    options={"build": {"build_base": os.path.join("build", "sanitize")}} if sanitize else {},
    ext_modules=[
        Extension(
            "bnorm._bnorm",
            sources=[
                "csrc/module.c", "csrc/args.c", "csrc/passes.c", "csrc/iter.c", "csrc/pool.c",
                "csrc/kernels.c", "csrc/buffers.c", "csrc/caches.c",
            ],
            depends=[
                "csrc/args.h", "csrc/passes.h", "csrc/iter.h", "csrc/pool.h", "csrc/kernels.h",
                "csrc/kernels_target.h", "csrc/kernels_impl.h", "csrc/buffers.h", "csrc/threads.h",
                "csrc/caches.h",
            ],
            include_dirs=[numpy.get_include(), "csrc"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_25_API_VERSION")],
        )
    ],
)
