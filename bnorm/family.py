"""The normalization family's layers, ``LayerNorm``, ``RMSNorm`` and ``GroupNorm``, over
``bnorm.layer_norm``, ``bnorm.rms_norm`` and ``bnorm.group_norm`` (the batch norm's C engine).

Each is PyTorch's module of the same name with ``BatchNorm``'s interface: ``forward(x)`` returns
``y`` and keeps a reference to ``x`` (no copy) with the per-row statistics, ``backward(dy)``
returns ``dx`` and sets ``dgamma`` (and ``dbeta``); ``gamma`` and ``beta`` are plain NumPy arrays;
``state_dict()``, ``load_state_dict(d)``, ``from_torch(module)`` and ``torch_state_dict()`` as
``BatchNorm`` has them.  None of them has running statistics: training and inference compute
the same thing.
"""
from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import _bnorm, _checks
from ._checks import FloatArray, Shape

try:
    from numpy.lib.array_utils import normalize_axis_index
except ImportError:  # NumPy < 2.0
    from numpy.core.multiarray import normalize_axis_index  # type: ignore[no-redef]

__all__ = ["LayerNorm", "RMSNorm", "GroupNorm"]

# bnorm's names of the parameters under PyTorch's (the modules' state_dict keys)
_TORCH_NAMES = {"gamma": "weight", "beta": "bias"}

_Layer = TypeVar("_Layer", bound="_Norm")


class _Norm:
    """What the three layers share: ``gamma`` (and ``beta``) of shape ``_param_shape``, the
    gradients, what ``forward`` saved for ``backward``, and the state dicts.

    A subclass sets ``_param_shape``, ``dtype``, ``affine`` and calls ``_init_params``; it
    implements ``forward``, ``backward`` (with ``_last_forward`` and ``_set_grads``) and
    ``_torch_args``.
    """

    _param_shape: Shape
    affine: bool
    dtype: np.dtype[Any]
    gamma: FloatArray | None
    beta: FloatArray | None
    dgamma: FloatArray | None
    dbeta: FloatArray | None
    _saved: tuple[Any, ...] | None

    def _init_params(self, affine: bool, bias: bool, dtype: DTypeLike) -> None:
        self.affine = bool(affine)
        self.dtype = _checks.check_layer_dtype(dtype)
        shape = self._param_shape
        self.gamma = np.ones(shape, self.dtype) if self.affine else None
        self.beta = np.zeros(shape, self.dtype) if self.affine and bias else None
        self.dgamma = None
        self.dbeta = None
        self._saved = None

    # ------------------------------------------------------------------ forward / backward
    def _last_forward(self) -> tuple[Any, ...]:
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward: there is "
                               f"no saved input")
        return self._saved

    def _set_grads(self, dgamma: FloatArray, dbeta: FloatArray | None) -> None:
        """Keep the gradients of the parameters the layer has, in its dtype."""
        self.dgamma = None if self.gamma is None else dgamma.astype(self.dtype, copy=False)
        self.dbeta = None if self.beta is None or dbeta is None else \
            dbeta.astype(self.dtype, copy=False)

    # ------------------------------------------------------------------ state
    def _param_names(self) -> tuple[str, ...]:
        return tuple(k for k in ("gamma", "beta") if getattr(self, k) is not None)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters: ``gamma`` and ``beta`` (those the layer has; none with
        ``affine=False``).  Plain ndarrays, so ``np.savez(f, **layer.state_dict())`` and
        ``layer.load_state_dict(np.load(f))`` round-trip.  The configuration is the
        constructor's arguments, shown by ``repr(layer)``."""
        return {k: getattr(self, k).copy() for k in self._param_names()}

    def load_state_dict(self, state: Mapping[str, ArrayLike], strict: bool = True) -> None:
        """Copy ``state`` into the layer's existing arrays (their identity is kept; values are
        cast to the layer's dtype), with ``BatchNorm.load_state_dict``'s checks: a missing entry,
        a shape other than the parameters' or, with ``strict``, an unexpected key raise
        ``ValueError``; an entry that is not real numbers raises ``TypeError``.  On error the
        layer is unchanged."""
        values = _checks.checked_state_arrays(state, self._param_names(), self._param_shape,
                                              strict=strict, known=self._param_names(),
                                              why_unexpected=self._why_not_state,
                                              shape_name="the parameters' shape")
        _checks.copy_state_arrays(self, values, self.dtype)

    def _why_not_state(self, unexpected: list[str]) -> str:
        if not self.affine and set(unexpected) & set(_TORCH_NAMES):
            return " (the layer has affine=False)"
        if "beta" in unexpected and self.gamma is not None:
            return f" ({type(self).__name__} has no beta here)"
        return ""

    # ------------------------------------------------------------------ PyTorch
    @classmethod
    def from_torch(cls: type[_Layer], module: Any) -> _Layer:
        """A layer equal to ``module`` (PyTorch's module of the same name) in outputs and
        gradients: its configuration, and its parameters copied (the layer shares no memory
        with the module) in their dtype, float32 or float64 (anything else is a
        ``TypeError``; so is a module of another class).  torch is imported here, never at
        ``import bnorm``."""
        import torch   # here only: bnorm does not need torch

        args, config, tensors = cls._torch_args(module, torch)
        state = _checks.torch_arrays(tensors, _TORCH_NAMES, torch)
        # the layer's dtype is its parameters'; a module without any gets bnorm's default
        first = next(iter(state.values()), None)
        config["dtype"] = np.float32 if first is None else first.dtype
        layer = cls(*args, **config)
        layer.load_state_dict(state)
        return layer

    @classmethod
    def _torch_args(cls, module: Any, torch: Any) -> tuple[tuple[Any, ...], dict[str, Any],
                                                           dict[str, Any]]:
        """(positional arguments, keyword arguments but dtype, {bnorm name: tensor}) of the
        layer equal to ``module``."""
        raise NotImplementedError

    def torch_state_dict(self) -> dict[str, np.ndarray]:
        """The state under PyTorch's names, as NumPy copies (``weight``, and ``bias`` when the
        layer has beta), for ``module.load_state_dict({k: torch.from_numpy(v) for k, v in
        d.items()})``."""
        return {_TORCH_NAMES[k]: v for k, v in self.state_dict().items()}


class LayerNorm(_Norm):
    """Layer normalization over the trailing axes, as ``torch.nn.LayerNorm``.

    Parameters
    ----------
    normalized_shape : int or tuple of ints
        The shape ``G`` of the trailing axes normalized over (PyTorch's ``normalized_shape``):
        ``x``'s last ``len(G)`` axes must have these lengths.
    eps : float, default 1e-5
        Added to the variance: ``rstd = 1 / sqrt(var + eps)``.
    affine : bool, default True
        ``gamma`` (ones) and ``beta`` (zeros) of shape ``G``; with False neither (they,
        ``dgamma`` and ``dbeta`` are None).  PyTorch's ``elementwise_affine``.
    bias : bool, default True
        With False there is no ``beta`` (PyTorch's ``bias=False``).
    dtype : float32, float64, float16 or bfloat16, default float32
        dtype of the parameters and their gradients; half-precision ``x`` through a float32
        layer is the mixed-precision setup.
    activation : None or "relu", default None
        ``"relu"``: layer norm followed by a ReLU, fused in the same pass; ``backward``
        recomputes the ReLU's mask from ``x`` (nothing more is saved).

    ``forward(x)`` returns ``y`` of x's shape and dtype and keeps a reference to ``x`` (do not
    modify it before ``backward``) and the per-row ``mean`` and ``rstd`` (x's shape without
    ``G``); ``backward(dy)`` returns ``dx`` and sets ``dgamma`` and ``dbeta`` (shape ``G``).
    """

    normalized_shape: Shape
    axis: tuple[int, ...]
    eps: float
    activation: str | None

    def __init__(self, normalized_shape: int | tuple[int, ...], *, eps: float = 1e-5,
                 affine: bool = True, bias: bool = True, dtype: DTypeLike = np.float32,
                 activation: str | None = None) -> None:
        self.normalized_shape = _checks.feature_shape(normalized_shape, "normalized_shape")
        self._param_shape = self.normalized_shape
        self.axis = tuple(range(-len(self.normalized_shape), 0))
        self.eps = _checks.check_eps(eps)
        self.activation = _checks.check_activation(activation)
        self._init_params(affine, _checks.check_flag("bias", bias), dtype)

    def forward(self, x: ArrayLike, training: bool = True) -> FloatArray:
        """Normalize ``x`` over its trailing axes ``normalized_shape``; returns ``y``.
        ``training`` is accepted for a network's uniform calls and changes nothing."""
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        _check_trailing(x, self.normalized_shape)
        gamma, beta = self.gamma, self.beta
        y, mean, rstd = _bnorm.layer_norm(x, gamma, beta, axis=self.axis, eps=self.eps,
                                          activation=self.activation)
        # gamma and beta by reference, as BatchNorm: backward needs the ones forward used
        self._saved = (x, mean, rstd, gamma, beta)
        return y

    __call__ = forward

    def backward(self, dy: ArrayLike) -> FloatArray:
        """Gradient w.r.t. the last ``forward``'s ``x``; sets ``dgamma`` and ``dbeta``."""
        x, mean, rstd, gamma, beta = self._last_forward()
        dy = _checks.check_dy(dy, x)
        dx, dgamma, dbeta = _bnorm.layer_norm_backward(
            dy, x, mean, rstd, gamma, axis=self.axis,
            beta=beta if self.activation else None, activation=self.activation)
        self._set_grads(dgamma, dbeta)
        return dx

    @classmethod
    def _torch_args(cls, module: Any, torch: Any) -> tuple[tuple[Any, ...], dict[str, Any],
                                                           dict[str, Any]]:
        _check_torch_class(cls, module, torch.nn.LayerNorm)
        affine = bool(module.elementwise_affine)
        bias = module.bias is not None
        tensors = {"gamma": module.weight} if affine else {}
        if affine and bias:
            tensors["beta"] = module.bias
        config = dict(eps=float(module.eps), affine=affine, bias=bias or not affine)
        return (tuple(module.normalized_shape),), config, tensors

    def __repr__(self) -> str:
        ns = self.normalized_shape
        return (f"LayerNorm({ns[0] if len(ns) == 1 else ns!r}, eps={self.eps!r}, "
                f"affine={self.affine!r}"
                + (", bias=False" if self.affine and self.beta is None else "")
                + f", dtype={self.dtype.name}"
                + (f", activation={self.activation!r}" if self.activation else "") + ")")


class RMSNorm(_Norm):
    """RMS normalization over the trailing axes, as ``torch.nn.RMSNorm``:
    ``y = x / sqrt(mean(x**2) + eps) * gamma``.

    Parameters
    ----------
    normalized_shape : int or tuple of ints
        The shape ``G`` of the trailing axes normalized over.
    eps : float or None, default None
        Added to the mean square; None is the epsilon of x's dtype at each call
        (``np.finfo(x.dtype).eps``, PyTorch's default).
    affine : bool, default True
        ``gamma`` (ones, shape ``G``); with False none (PyTorch's ``elementwise_affine``).
        There is no ``beta`` (``beta`` and ``dbeta`` are always None), as in PyTorch.
    dtype : float32, float64, float16 or bfloat16, default float32
        dtype of ``gamma`` and ``dgamma``.

    ``forward(x)`` keeps a reference to ``x`` and the per-row ``rrms``; ``backward(dy)``
    returns ``dx`` and sets ``dgamma``.
    """

    normalized_shape: Shape
    axis: tuple[int, ...]
    eps: float | None

    def __init__(self, normalized_shape: int | tuple[int, ...], *, eps: float | None = None,
                 affine: bool = True, dtype: DTypeLike = np.float32) -> None:
        self.normalized_shape = _checks.feature_shape(normalized_shape, "normalized_shape")
        self._param_shape = self.normalized_shape
        self.axis = tuple(range(-len(self.normalized_shape), 0))
        self.eps = None if eps is None else _checks.check_eps(eps)
        self._init_params(affine, False, dtype)

    def forward(self, x: ArrayLike, training: bool = True) -> FloatArray:
        """Normalize ``x`` over its trailing axes ``normalized_shape``; returns ``y``.
        ``training`` is accepted for a network's uniform calls and changes nothing."""
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        _check_trailing(x, self.normalized_shape)
        gamma = self.gamma
        y, rrms = _bnorm.rms_norm(x, gamma, axis=self.axis, eps=self.eps)
        self._saved = (x, rrms, gamma)
        return y

    __call__ = forward

    def backward(self, dy: ArrayLike) -> FloatArray:
        """Gradient w.r.t. the last ``forward``'s ``x``; sets ``dgamma``."""
        x, rrms, gamma = self._last_forward()
        dy = _checks.check_dy(dy, x)
        dx, dgamma = _bnorm.rms_norm_backward(dy, x, rrms, gamma, axis=self.axis)
        self._set_grads(dgamma, None)
        return dx

    @classmethod
    def _torch_args(cls, module: Any, torch: Any) -> tuple[tuple[Any, ...], dict[str, Any],
                                                           dict[str, Any]]:
        _check_torch_class(cls, module, torch.nn.RMSNorm)
        affine = bool(module.elementwise_affine)
        eps = None if module.eps is None else float(module.eps)
        tensors = {"gamma": module.weight} if affine else {}
        return (tuple(module.normalized_shape),), dict(eps=eps, affine=affine), tensors

    def __repr__(self) -> str:
        ns = self.normalized_shape
        return (f"RMSNorm({ns[0] if len(ns) == 1 else ns!r}, eps={self.eps!r}, "
                f"affine={self.affine!r}, dtype={self.dtype.name})")


class GroupNorm(_Norm):
    """Group normalization, as ``torch.nn.GroupNorm``; ``num_groups == num_channels`` is
    instance norm, ``num_groups == 1`` layer norm over everything but the samples.

    Parameters
    ----------
    num_groups : int
        The channels split into this many groups of consecutive channels; it must divide
        ``num_channels``.  Statistics per sample and group, over the group's channels and every
        axis but 0 (the samples).
    num_channels : int
        ``C``, the length of the channel axis.
    axis : int, default 1
        The channel axis: 1 is NCHW (PyTorch's), -1 channels-last (NHWC).  Not 0 (the samples).
    eps : float, default 1e-5
        Added to the variance.
    affine : bool, default True
        ``gamma`` (ones) and ``beta`` (zeros) per channel, shape ``(C,)``; with False neither.
    dtype : float32, float64, float16 or bfloat16, default float32
        dtype of the parameters and their gradients.
    activation : None or "relu", default None
        ``"relu"``: group norm followed by a ReLU, fused (as ``LayerNorm``'s).

    ``forward(x)`` keeps a reference to ``x`` and the ``(N, num_groups)`` ``mean`` and
    ``rstd``; ``backward(dy)`` returns ``dx`` and sets ``dgamma`` and ``dbeta``.
    """

    num_groups: int
    num_channels: int
    axis: int
    eps: float
    activation: str | None

    def __init__(self, num_groups: int, num_channels: int, *, axis: int = 1, eps: float = 1e-5,
                 affine: bool = True, dtype: DTypeLike = np.float32,
                 activation: str | None = None) -> None:
        self.num_groups = _positive_int("num_groups", num_groups)
        self.num_channels = _positive_int("num_channels", num_channels)
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_groups={self.num_groups} does not divide num_channels="
                             f"{self.num_channels}")
        if isinstance(axis, (bool, np.bool_)):
            raise TypeError("axis must be an int (the channel axis), got a bool")
        self.axis = operator.index(axis)
        if self.axis == 0:
            raise ValueError("axis=0 is the samples' axis; the channel axis is another (1: NCHW, "
                             "-1: NHWC)")
        self._param_shape = (self.num_channels,)
        self.eps = _checks.check_eps(eps)
        self.activation = _checks.check_activation(activation)
        self._init_params(affine, True, dtype)

    def forward(self, x: ArrayLike, training: bool = True) -> FloatArray:
        """Normalize ``x`` (samples on axis 0, channels on ``axis``); returns ``y``.
        ``training`` is accepted for a network's uniform calls and changes nothing."""
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        axis = normalize_axis_index(self.axis, x.ndim) if x.ndim else self.axis
        if x.ndim < 2 or axis == 0 or x.shape[axis] != self.num_channels:
            raise ValueError(f"x of shape {x.shape} does not have num_channels="
                             f"{self.num_channels} channels on axis={self.axis} (and samples on "
                             f"axis 0)")
        gamma, beta = self.gamma, self.beta
        y, mean, rstd = _bnorm.group_norm(x, self.num_groups, gamma, beta, axis=self.axis,
                                          eps=self.eps, activation=self.activation)
        self._saved = (x, mean, rstd, gamma, beta)
        return y

    __call__ = forward

    def backward(self, dy: ArrayLike) -> FloatArray:
        """Gradient w.r.t. the last ``forward``'s ``x``; sets ``dgamma`` and ``dbeta``."""
        x, mean, rstd, gamma, beta = self._last_forward()
        dy = _checks.check_dy(dy, x)
        dx, dgamma, dbeta = _bnorm.group_norm_backward(
            dy, x, mean, rstd, self.num_groups, gamma, axis=self.axis,
            beta=beta if self.activation else None, activation=self.activation)
        self._set_grads(dgamma, dbeta)
        return dx

    @classmethod
    def _torch_args(cls, module: Any, torch: Any) -> tuple[tuple[Any, ...], dict[str, Any],
                                                           dict[str, Any]]:
        _check_torch_class(cls, module, torch.nn.GroupNorm)
        affine = bool(module.affine)
        tensors = {"gamma": module.weight, "beta": module.bias} if affine else {}
        config = dict(axis=1, eps=float(module.eps), affine=affine)
        return (int(module.num_groups), int(module.num_channels)), config, tensors

    def __repr__(self) -> str:
        return (f"GroupNorm({self.num_groups}, {self.num_channels}, axis={self.axis}, "
                f"eps={self.eps!r}, affine={self.affine!r}, dtype={self.dtype.name}"
                + (f", activation={self.activation!r}" if self.activation else "") + ")")


def _check_torch_class(cls: type, module: Any, expected: type) -> None:
    if not isinstance(module, expected):
        raise TypeError(f"{cls.__name__}.from_torch takes a torch.nn.{expected.__name__}, got "
                        f"{type(module).__name__}")


def _check_trailing(x: np.ndarray, normalized_shape: Shape) -> None:
    """``x``'s trailing axes are ``normalized_shape`` (ValueError naming both shapes)."""
    k = len(normalized_shape)
    if x.ndim < k or x.shape[x.ndim - k:] != normalized_shape:
        raise ValueError(f"x of shape {x.shape} does not end in the layer's normalized_shape "
                         f"{normalized_shape}")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got a bool")
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{name} must be at least 1, got {n}")
    return n
