"""Builds the C extension bnorm._bnorm; everything else is in pyproject.toml.

Environment knobs (for developers, not users):
  BNORM_SANITIZE=1   compile with AddressSanitizer + UndefinedBehaviorSanitizer (see tests/README)
  BNORM_NO_OPENMP=1  build without OpenMP (single-threaded kernels)
"""
import os

import numpy
from setuptools import Extension, setup

sanitize = os.environ.get("BNORM_SANITIZE") == "1"
openmp = os.environ.get("BNORM_NO_OPENMP") != "1"

compile_args = ["-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
link_args = []
if sanitize:
    flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    compile_args += ["-O1", "-g"] + flags
    link_args += flags
else:
    # -O3 lets GCC vectorize the kernels' inner loops; no -ffast-math: the summation order is ours.
    compile_args += ["-O3", "-ffp-contract=fast"]
if openmp:
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")

setup(
    ext_modules=[
        Extension(
            "bnorm._bnorm",
            sources=["csrc/module.c", "csrc/kernels.c"],
            depends=["csrc/kernels.h", "csrc/kernels_impl.h"],
            include_dirs=[numpy.get_include(), "csrc"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_25_API_VERSION")],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ],
)
