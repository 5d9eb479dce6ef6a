"""Types of bnorm's C extension (csrc/module.c): the signatures its ``__text_signature__``s give.

Inputs are anything ``np.asarray`` takes; outputs are arrays of a floating dtype (x's for ``y``,
``dx``, ``mean``, ``rstd``, ``rrms``, float32 for half x's statistics; float64 for the split phases'
statistics and sums).
"""
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

_Floats = NDArray[np.floating[Any]]
_Float64s = NDArray[np.float64]
_Axis = int | tuple[int, ...]

# the CPU targets this build has kernels for, from the most widely runnable to the fastest
compiled_targets: tuple[str, ...]

def forward(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: _Axis = -1,
    eps: float = 1e-08,
    training: bool = True,
    running_mean: _Floats | None = None,
    running_var: _Floats | None = None,
    momentum: float = 0.9,
    running_var_ddof: int = 0,
    activation: str | None = None,
    out: _Floats | None = None,
) -> tuple[_Floats, _Floats, _Floats]: ...
def backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    rstd: ArrayLike,
    gamma: ArrayLike | None = None,
    *,
    axis: _Axis = -1,
    training: bool = True,
    beta: ArrayLike | None = None,
    activation: str | None = None,
    out: _Floats | None = None,
) -> tuple[_Floats, _Floats, _Floats]: ...
def batch_stats(x: ArrayLike, *, axis: _Axis = -1) -> tuple[int, _Float64s, _Float64s]: ...
def normalize(
    x: ArrayLike,
    mean: ArrayLike,
    rstd: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: _Axis = -1,
    activation: str | None = None,
    out: _Floats | None = None,
) -> _Floats: ...
def backward_sums(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    *,
    axis: _Axis = -1,
    rstd: ArrayLike | None = None,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    activation: str | None = None,
) -> tuple[_Float64s, _Float64s]: ...
def backward_apply(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    rstd: ArrayLike,
    sum_dy: ArrayLike,
    sum_dy_xmu: ArrayLike,
    count: int,
    gamma: ArrayLike | None = None,
    *,
    axis: _Axis = -1,
    beta: ArrayLike | None = None,
    activation: str | None = None,
    out: _Floats | None = None,
) -> _Floats: ...
def layer_norm(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: _Axis = -1,
    eps: float = 1e-05,
    activation: str | None = None,
    out: _Floats | None = None,
) -> tuple[_Floats, _Floats, _Floats]: ...
def layer_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    rstd: ArrayLike,
    gamma: ArrayLike | None = None,
    *,
    axis: _Axis = -1,
    beta: ArrayLike | None = None,
    activation: str | None = None,
    out: _Floats | None = None,
) -> tuple[_Floats, _Floats, _Floats]: ...
def rms_norm(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    *,
    axis: _Axis = -1,
    eps: float | None = None,
    out: _Floats | None = None,
) -> tuple[_Floats, _Floats]: ...
def rms_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    rrms: ArrayLike,
    gamma: ArrayLike | None = None,
    *,
    axis: _Axis = -1,
    out: _Floats | None = None,
) -> tuple[_Floats, _Floats]: ...
def group_norm(
    x: ArrayLike,
    num_groups: int,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-05,
    activation: str | None = None,
    out: _Floats | None = None,
) -> tuple[_Floats, _Floats, _Floats]: ...
def group_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    rstd: ArrayLike,
    num_groups: int,
    gamma: ArrayLike | None = None,
    *,
    axis: int = 1,
    beta: ArrayLike | None = None,
    activation: str | None = None,
    out: _Floats | None = None,
) -> tuple[_Floats, _Floats, _Floats]: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int, /) -> None: ...
def set_buffer_cache(max_bytes: int, /) -> int: ...
def cpu_target() -> str: ...
def _config() -> dict[str, Any]: ...
