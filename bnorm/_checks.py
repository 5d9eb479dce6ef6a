"""What ``BatchNorm`` (layer.py), ``SyncBatchNorm`` (mpi.py) and the family's layers (family.py)
check, the loading of their state dicts, and the running-average update that ``SyncBatchNorm``
does in Python.

The eps and momentum checks raise what the C ``bnorm.forward`` raises (ValueError for NaN, inf or
a value out of range, TypeError for what is not a real number) and reject bools too, so that the
two layers agree with each other and with the functions: ``BatchNorm`` finds a bad ``eps`` at
construction instead of at its first forward, and ``SyncBatchNorm``, which computes ``rstd``
itself, finds it at all.
"""
from __future__ import annotations

import math
import numbers
import operator
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

try:
    from numpy.lib.array_utils import normalize_axis_tuple
except ImportError:  # NumPy < 2.0
    from numpy.core.numeric import normalize_axis_tuple  # type: ignore[no-redef]

# Runtime aliases (Python 3.9 has no ``int | tuple`` outside annotations).
Axis = Union[int, Tuple[int, ...]]
Shape = Tuple[int, ...]
FloatArray = NDArray[np.floating[Any]]

LAYER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))


def axis_spec(axis: object) -> Axis:
    """``axis`` as an int or a tuple of ints, as given (negative axes are resolved against x)."""
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError("axis must be an int or a tuple of ints, got a bool")
    if isinstance(axis, numbers.Integral):
        return operator.index(axis)
    try:
        axes = tuple(operator.index(a) for a in axis)  # type: ignore[attr-defined]
    except TypeError:
        raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}") from None
    if len(set(axes)) != len(axes):
        # The same axis named twice (as written; -1 vs ndim-1 is caught at forward).
        raise ValueError(f"repeated axis in axis={axis!r}")
    return axes


def feature_shape(num_features: object, name: str = "num_features") -> Shape:
    """``num_features`` (an int or a tuple of ints) as the feature shape ``F`` (``name``: the
    argument's name in the errors, e.g. a layer norm's ``normalized_shape``)."""
    if isinstance(num_features, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int or a tuple of ints, got a bool")
    if isinstance(num_features, numbers.Integral):
        shape: Shape = (operator.index(num_features),)
    else:
        try:
            shape = tuple(operator.index(n) for n in num_features)  # type: ignore[attr-defined]
        except TypeError:
            raise TypeError(f"{name} must be an int or a tuple of ints, got "
                            f"{num_features!r}") from None
    if not shape or any(n < 1 for n in shape):
        raise ValueError(f"{name} must be a non-empty shape of positive sizes, got "
                         f"{num_features!r}")
    return shape


def check_axis_count(axis: Axis, num_features: Shape) -> None:
    """``axis`` names as many feature axes as ``num_features`` has dimensions."""
    naxes = 1 if isinstance(axis, int) else len(axis)
    if naxes != len(num_features):
        raise ValueError(f"axis={axis!r} names {naxes} feature axes but num_features="
                         f"{num_features} has {len(num_features)} dimensions")


def check_features(x: np.ndarray, axis: Axis, num_features: Shape) -> None:
    """``x``'s feature shape at ``axis`` is the layer's ``num_features``.

    AxisError for an axis out of range (or 0-d x), ValueError for a repeated axis or another
    feature shape.
    """
    axes = normalize_axis_tuple(axis, x.ndim)
    found = tuple(x.shape[a] for a in sorted(axes))
    if found != num_features:
        raise ValueError(f"x of shape {x.shape} has feature shape {found} at axis={axis!r}, "
                         f"but the layer has num_features={num_features}")


def check_dy(dy: ArrayLike, x: np.ndarray) -> np.ndarray:
    """``dy`` as an array of the last forward's ``x``'s shape."""
    if not isinstance(dy, np.ndarray):
        dy = np.asarray(dy)
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape} but the last forward's x has shape "
                         f"{x.shape}")
    return dy


def _real_number(name: str, value: object) -> float:
    # A bool is an int to Python and NumPy, but eps=True is a mistake rather than 1.0; a string
    # would pass float() but not the C forward's argument parsing.
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got a bool ({value!r})")
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        return float(value)
    raise TypeError(f"{name} must be a real number, got {value!r}")


def check_eps(eps: object) -> float:
    """``eps`` as a float: a finite number >= 0 (NaN and inf are ValueErrors, as in forward)."""
    value = _real_number("eps", eps)
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


def check_momentum(momentum: object) -> float:
    """``momentum`` as a float in [0, 1] (NaN is a ValueError, as in forward)."""
    value = _real_number("momentum", momentum)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return value


def check_layer_momentum(momentum: object) -> float | None:
    """A layer's ``momentum``: a float in [0, 1], or None for the cumulative moving average."""
    return None if momentum is None else check_momentum(momentum)


def step_momentum(momentum: float | None, num_batches_tracked: int) -> float:
    """The weight of the old running value for the next training batch.

    ``momentum`` itself (as given: ``bnorm.forward`` validates it, and ``SyncBatchNorm`` calls
    ``check_layer_momentum``; a check here would cost the layer's small calls 10%), or for
    ``momentum=None`` (PyTorch's cumulative moving average) ``1 - 1/n`` for the ``n``-th batch
    (``n = num_batches_tracked + 1``): ``(1 - 1/n) * r + (1/n) * batch`` is the mean of all ``n``
    batches' statistics, and the first batch replaces the initial values (weight 0), as in
    PyTorch.  Expressed as a momentum, the update stays the one call into ``bnorm.forward`` (or
    ``update_running_averages``) that a fixed momentum makes.
    """
    if momentum is None:
        return 1.0 - 1.0 / (num_batches_tracked + 1)
    return momentum


def check_flag(name: str, value: object) -> bool:
    """A True/False switch (Python's or NumPy's bool): ``track_running_stats=None`` or ``="no"``
    is a slip that ``bool()`` would silently read one way or the other."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_activation(activation: object) -> str | None:
    """An activation fused after the normalization: None or "relu" (``bnorm.forward``'s
    ValueError for anything else)."""
    if activation is not None and not (isinstance(activation, str) and activation == "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation


def check_running_var_ddof(ddof: object) -> int:
    """``running_var_ddof``: 0 (biased) or 1 (unbiased), with ``bnorm.forward``'s errors:
    TypeError for what is not an integer, ValueError for other integers.  As in the C (and
    NumPy's ``ddof``), anything with ``__index__`` is an integer, True included."""
    try:
        value = operator.index(ddof)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"running_var_ddof must be the int 0 or 1, got {ddof!r}") from None
    if value not in (0, 1):
        raise ValueError(f"running_var_ddof must be 0 (biased) or 1 (unbiased), got {ddof!r}")
    return value


def check_num_batches_tracked(value: object) -> int:
    """A state dict's ``num_batches_tracked``: an integer >= 0 (a Python or NumPy int, or a 0-d
    integer array as ``np.load`` returns it).  TypeError for bools, floats and anything else that
    is not an integer; ValueError for a negative count or more than one value."""
    found = np.asarray(value)
    if found.dtype.kind not in "iu":
        raise TypeError(f"state dict entry 'num_batches_tracked' must be an integer, got "
                        f"{value!r} of dtype {found.dtype}")
    if found.ndim != 0:
        raise ValueError(f"state dict entry 'num_batches_tracked' must be a single integer, got "
                         f"shape {found.shape}")
    count = int(found)
    if count < 0:
        raise ValueError(f"state dict entry 'num_batches_tracked' must be >= 0, got {count}")
    return count


def check_layer_dtype(dtype: DTypeLike) -> np.dtype[Any]:
    """The dtype of a layer's parameters and running statistics: float32 or float64, or a half
    type (float16, ml_dtypes' bfloat16) for parameters as narrow as the data."""
    found = np.dtype(dtype)
    if found not in LAYER_DTYPES and not is_bfloat16(found):
        raise TypeError(f"dtype must be float32, float64, float16 or bfloat16, got {found}")
    return found


def is_bfloat16(dtype: np.dtype[Any]) -> bool:
    """ml_dtypes' bfloat16 (without importing ml_dtypes: a dtype of it means it is imported)."""
    ml_dtypes = sys.modules.get("ml_dtypes")
    return ml_dtypes is not None and dtype == np.dtype(ml_dtypes.bfloat16)


def checked_state_arrays(state: Mapping[str, ArrayLike], names: tuple[str, ...], shape: Shape, *,
                         strict: bool, known: Iterable[str],
                         why_unexpected: Callable[[list[str]], str],
                         shape_name: str = "the feature shape") -> dict[str, np.ndarray]:
    """The arrays ``names`` of a layer's state dict ``state``, each checked, before the layer
    writes any of them: a missing entry, a shape other than ``shape`` or, with ``strict``, a key
    not in ``known`` raise ``ValueError`` (``why_unexpected(keys)`` is appended to the message);
    an entry that is not real numbers (integers or floats: not bools, complex numbers or objects)
    raises ``TypeError``."""
    keys = set(state.keys())
    missing = [k for k in names if k not in keys]
    if missing:
        raise ValueError(f"state dict is missing {missing}")
    if strict:
        unexpected = sorted(keys - set(known))
        if unexpected:
            raise ValueError(f"unexpected keys in state dict: {unexpected}"
                             f"{why_unexpected(unexpected)}")
    values = {}
    for k in names:
        v = np.asarray(state[k])
        if v.dtype.kind not in "iuf" and not is_bfloat16(v.dtype):
            raise TypeError(f"state dict entry {k!r} has dtype {v.dtype}, expected an array "
                            f"of real numbers (integers or floats)")
        if v.shape != shape:
            raise ValueError(f"state dict entry {k!r} has shape {v.shape}, expected "
                             f"{shape_name} {shape}")
        values[k] = v
    return values


def copy_state_arrays(layer: object, values: Mapping[str, np.ndarray],
                      dtype: np.dtype[Any]) -> None:
    """Write ``checked_state_arrays``' result into the layer's arrays of those names, keeping
    their identity (cast to ``dtype``); an array a user replaced by a read-only one is replaced
    by a copy."""
    for k, v in values.items():
        target = getattr(layer, k)
        if not target.flags.writeable:
            setattr(layer, k, v.astype(dtype, copy=True))
        else:
            np.copyto(target, v, casting="unsafe")


def torch_arrays(tensors: Mapping[str, Any], torch_names: Mapping[str, str],
                 torch: Any) -> dict[str, np.ndarray]:
    """NumPy copies of a PyTorch module's parameters and buffers ``{bnorm name: tensor}``: float32
    or float64 only (bnorm's layers hold no other dtype from PyTorch), else ``TypeError`` naming
    the tensor by ``torch_names``."""
    arrays = {}
    for name, tensor in tensors.items():
        if tensor.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"from_torch: the module's {torch_names[name]} has dtype "
                            f"{tensor.dtype}; bnorm's layers hold float32 or float64")
        arrays[name] = tensor.detach().cpu().numpy().copy()
    return arrays


def check_writable(name: str, array: np.ndarray) -> None:
    if not array.flags.writeable:
        raise ValueError(f"{name} is read-only")


def update_running_averages(momentum: float,
                            updates: Iterable[tuple[str, np.ndarray, ArrayLike]]) -> None:
    """``r = momentum * r + (1 - momentum) * batch_stat`` in place, for each
    ``(name, r, batch_stat)``, as ``bnorm.forward`` updates its running statistics: computed in
    float64 and cast to ``r``'s dtype.

    Every check and every new value (its cast too, which raises under ``np.errstate(over=
    "raise")`` when a float16 statistic overflows) comes before the first write, so on an
    exception no ``r`` has changed.
    """
    new = []
    for name, r, stat in updates:
        if not (isinstance(r, np.ndarray) and r.dtype.kind == "f"):
            raise TypeError(f"{name} must be a float array to be updated in place, got "
                            f"{type(r).__name__} of dtype {np.asarray(r).dtype}")
        check_writable(name, r)
        batch = np.asarray(stat, np.float64)
        if r.shape != batch.shape:
            raise ValueError(f"{name} has shape {r.shape} but the batch statistic has shape "
                             f"{batch.shape}")
        new.append((r, (momentum * r.astype(np.float64) + (1.0 - momentum) * batch)
                    .astype(r.dtype)))
    for r, value in new:
        np.copyto(r, value)   # same shape and dtype: cannot fail
