"""``BatchNorm``: a stateful batch-norm layer over ``bnorm.forward`` / ``bnorm.backward``.

A drop-in for the blog post's NumPy layer (``bnorm.reference.PostBatchNorm``): same math, same
defaults (eps 1e-8, momentum 0.9 as the weight of the old running value, biased running variance,
channels-last), but the layer owns its parameters and the work is done by the C kernels.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import _checks, backward as _backward, forward as _forward
from ._checks import Axis, FloatArray, Shape

__all__ = ["BatchNorm"]

_PARAMS = ("gamma", "beta")
_BUFFERS = ("running_mean", "running_var")
_COUNT = "num_batches_tracked"
# bnorm's names of the state under PyTorch's (torch.nn.BatchNorm*d's state_dict keys)
_TORCH_NAMES = {"gamma": "weight", "beta": "bias", "running_mean": "running_mean",
                "running_var": "running_var", _COUNT: _COUNT}

_Layer = TypeVar("_Layer", bound="BatchNorm")


class BatchNorm:
    """Batch normalization layer with learnable ``gamma``/``beta`` and running statistics.

    Parameters
    ----------
    num_features : int or tuple of ints
        The feature shape ``F``: the lengths of the kept axes ``axis``, in increasing axis order
        (as ``bnorm.forward`` defines ``F``).  An int ``n`` means ``(n,)``.
    axis : int or tuple of ints, keyword-only, default -1
        The feature axes that are kept; every other axis is reduced over.  ``-1`` is channels-last
        (``(n, f)`` design matrices, NHWC), ``1`` is NCHW.  Must name ``len(F)`` axes.
    eps : float, default 1e-8
        Added to the variance: ``rstd = 1 / sqrt(var + eps)``.
    momentum : float in [0, 1] or None, default 0.9
        Weight of the *old* running value: ``r = momentum * r + (1 - momentum) * batch_stat``
        (the post's and Keras's convention; PyTorch's ``momentum=m`` is ours ``1 - m``).
        ``None``: the cumulative moving average, the plain mean of the statistics of every
        training batch so far (PyTorch's ``momentum=None``; the first batch replaces the initial
        values).
    affine : bool, default True
        With ``affine=False`` there is no ``gamma``/``beta`` (they, ``dgamma`` and ``dbeta`` are
        ``None``) and the layer only normalizes.
    dtype : float32, float64, float16 or bfloat16, default float32
        dtype of the parameters and running statistics.  Half-precision ``x`` through a float32
        layer is the mixed-precision setup (``y`` and ``dx`` half, parameters, gradients and
        running statistics float32); a half layer keeps them as narrow as the data.
    track_running_stats : bool, default True
        With ``False`` the layer keeps no running statistics (``running_mean``,
        ``running_var`` and ``num_batches_tracked`` are None and not in the state dict) and
        normalizes with the batch's statistics in training and inference alike, as PyTorch's
        layer: inference then needs two or more values per feature too, and ``backward`` after
        it is the training-mode gradient (the statistics depend on ``x``).
    running_var_ddof : 0 or 1, default 0
        The variance folded into ``running_var``: 0 the biased batch variance (the post, Keras,
        Flax), 1 the unbiased one, ``var * M / (M - 1)`` for ``M`` values per feature
        (PyTorch).  Normalization always uses the biased variance.
    activation : None or "relu", default None
        ``"relu"``: the layer is batch norm followed by a ReLU, fused: ``forward`` writes
        ``max(0, bn(x))`` in the same pass and ``backward`` recomputes the ReLU's mask from
        ``x`` (nothing more is saved).

    Attributes
    ----------
    gamma, beta : ndarray of shape ``F`` (ones, zeros), or None when ``affine=False``.
        Plain arrays: update them in place (``layer.gamma -= lr * layer.dgamma``) or replace them.
    running_mean, running_var : ndarray of shape ``F`` (zeros, ones), or None when
        ``track_running_stats=False``.
        Updated *in place* by every training forward, so references to them stay valid.
    num_batches_tracked : int, or None when ``track_running_stats=False``.
        The number of training forwards that updated the running statistics (counted whatever
        the momentum; with ``momentum=None`` it sets the next batch's weight).
    dgamma, dbeta : ndarray of shape ``F`` and the layer's dtype, set by ``backward``
        (None before the first backward, and always None when ``affine=False``).

    Notes
    -----
    ``forward`` keeps a reference to ``x`` (no copy) plus the batch's ``mean`` and ``rstd`` (shape
    ``F``); nothing else of ``x``'s size is stored.  Do not modify ``x`` in place between
    ``forward`` and ``backward``.  ``y`` and ``dx`` have ``x``'s dtype (as ``bnorm.forward``),
    so a float64 ``x`` through a float32 layer gives float64 outputs.

    ``BatchNorm.from_torch(module)`` makes the layer equal to a PyTorch batch norm, and
    ``layer.torch_state_dict()`` gives the state back under PyTorch's names.
    """

    num_features: Shape
    axis: Axis
    eps: float
    momentum: float | None
    affine: bool
    dtype: np.dtype[Any]
    track_running_stats: bool
    running_var_ddof: int
    gamma: FloatArray | None
    beta: FloatArray | None
    running_mean: FloatArray | None
    running_var: FloatArray | None
    num_batches_tracked: int | None
    dgamma: FloatArray | None
    dbeta: FloatArray | None

    def __init__(self, num_features: int | tuple[int, ...], *, axis: Axis = -1,
                 eps: float = 1e-8, momentum: float | None = 0.9, affine: bool = True,
                 dtype: DTypeLike = np.float32, track_running_stats: bool = True,
                 running_var_ddof: int = 0, activation: str | None = None) -> None:
        self.num_features = _checks.feature_shape(num_features)
        self.axis = _checks.axis_spec(axis)
        _checks.check_axis_count(self.axis, self.num_features)
        self.eps = _checks.check_eps(eps)
        self.momentum = _checks.check_layer_momentum(momentum)
        self.affine = bool(affine)
        self.dtype = _checks.check_layer_dtype(dtype)
        self.track_running_stats = _checks.check_flag("track_running_stats", track_running_stats)
        self.running_var_ddof = _checks.check_running_var_ddof(running_var_ddof)
        self.activation = _checks.check_activation(activation)

        F = self.num_features
        tracked = self.track_running_stats
        self.gamma = np.ones(F, self.dtype) if self.affine else None
        self.beta = np.zeros(F, self.dtype) if self.affine else None
        self.running_mean = np.zeros(F, self.dtype) if tracked else None
        self.running_var = np.ones(F, self.dtype) if tracked else None
        self.num_batches_tracked = 0 if tracked else None
        self.dgamma = None
        self.dbeta = None
        # (x, mean, rstd, gamma, beta, training) of the last forward
        self._saved: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None,
                           np.ndarray | None, bool] | None
        self._saved = None

    # ------------------------------------------------------------------ forward / backward
    def forward(self, x: ArrayLike, training: bool = True) -> FloatArray:
        """Normalize ``x`` (shape ``S``, feature shape ``F`` at ``axis``); returns ``y``.

        training=True uses the batch statistics and updates ``running_mean``/``running_var`` in
        place (and counts the batch in ``num_batches_tracked``); training=False uses the running
        statistics and updates nothing.  With ``track_running_stats=False`` both use the batch
        statistics and update nothing.
        """
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        _checks.check_features(x, self.axis, self.num_features)
        training = bool(training)
        uses_batch_stats = training or not self.track_running_stats
        updates_running = training and self.track_running_stats
        gamma, beta = self.gamma, self.beta
        # Without tracking, no running statistics go to the C: training=True there then means
        # "normalize with the batch's statistics", in inference too.
        y, mean, rstd = _forward(x, gamma, beta, axis=self.axis, eps=self.eps,
                                 training=uses_batch_stats, running_mean=self.running_mean,
                                 running_var=self.running_var,
                                 momentum=_checks.step_momentum(self.momentum,
                                                                self.num_batches_tracked or 0),
                                 running_var_ddof=self.running_var_ddof,
                                 activation=self.activation)
        if updates_running:
            self.num_batches_tracked = (self.num_batches_tracked or 0) + 1
        # gamma (and beta, for a fused ReLU's mask) are saved by reference too: backward needs the
        # ones this forward used.  An optimizer updating them in place before backward would
        # change them (as in the post's layer).
        self._saved = (x, mean, rstd, gamma, beta, uses_batch_stats)
        return y

    __call__ = forward

    def backward(self, dy: ArrayLike) -> FloatArray:
        """Gradient w.r.t. the last ``forward``'s ``x``; sets ``self.dgamma`` and ``self.dbeta``.

        After a forward that used the batch statistics (training, or any forward with
        ``track_running_stats=False``) their dependence on ``x`` is included; after an inference
        forward with the running statistics (constants) ``dx = gamma * rstd * dy``.
        """
        if self._saved is None:
            raise RuntimeError("BatchNorm.backward called before forward: there is no saved input")
        x, mean, rstd, gamma, beta, training = self._saved
        dy = _checks.check_dy(dy, x)
        dx, dgamma, dbeta = _backward(dy, x, mean, rstd, gamma, axis=self.axis, training=training,
                                      beta=beta, activation=self.activation)
        if self.affine:
            self.dgamma = dgamma.astype(self.dtype, copy=False)
            self.dbeta = dbeta.astype(self.dtype, copy=False)
        else:
            self.dgamma = self.dbeta = None
        return dx

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the layer's state: ``gamma``, ``beta`` (only when ``affine``),
        ``running_mean``, ``running_var`` and ``num_batches_tracked`` (only when
        ``track_running_stats``; the count as a 0-d int64 array, as PyTorch stores it).

        Plain ndarrays, so ``np.savez(f, **layer.state_dict())`` and
        ``layer.load_state_dict(np.load(f))`` round-trip.  The configuration (axis, eps, momentum,
        ...) is not state: it is the constructor's arguments, shown by ``repr(layer)``.
        """
        state = {k: getattr(self, k).copy() for k in self._array_names()}
        if self.track_running_stats:
            state[_COUNT] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, ArrayLike], strict: bool = True) -> None:
        """Copy ``state`` (a mapping such as ``state_dict()``'s or an ``np.load`` result) into the
        layer's existing arrays (their identity is kept; values are cast to the layer's dtype).

        Every entry is validated before anything is written: a missing entry, a shape other than
        ``F`` or, with ``strict``, an unexpected key raise ``ValueError``; an entry that is not
        real numbers (integers or floats: not bools, complex numbers or objects) raises
        ``TypeError``.  ``num_batches_tracked`` must be one integer >= 0 (``TypeError`` for a
        bool, a float or anything else, ``ValueError`` for a negative count or an array).  It may
        be missing, as in bnorm 0.1's state dicts and PyTorch's before its count existed: the
        layer's count is then kept (it matters only for ``momentum=None``).  On error the layer
        is unchanged.
        """
        values = _checks.checked_state_arrays(state, self._array_names(), self.num_features,
                                              strict=strict, known=self._state_names(),
                                              why_unexpected=self._why_not_state)
        count = None
        if self.track_running_stats and _COUNT in state.keys():
            count = _checks.check_num_batches_tracked(state[_COUNT])
        _checks.copy_state_arrays(self, values, self.dtype)
        if count is not None:
            self.num_batches_tracked = count

    # ------------------------------------------------------------------ PyTorch
    @classmethod
    def from_torch(cls: type[_Layer], module: Any) -> _Layer:
        """A layer equal to ``module``, a ``torch.nn.BatchNorm1d/2d/3d`` or
        ``torch.nn.SyncBatchNorm``: the same outputs, gradients and running-statistics updates,
        with PyTorch's conventions spelled in bnorm's arguments.

        ``axis=1`` (channels-first; a BatchNorm1d's ``(N, C)`` input has it last, which is the
        same axis), the module's ``eps``, ``momentum=1 - m`` (ours weights the old value,
        PyTorch's the new; ``None`` stays ``None``), ``running_var_ddof=1`` (PyTorch's running
        variance is unbiased), ``affine`` and ``track_running_stats`` as the module's.  Its
        parameters and buffers are copied (the layer shares no memory with the module), in their
        dtype: float32 or float64, anything else is a ``TypeError``; so is a module that is not
        one of those batch norms.  Call ``forward(x, training=module.training)`` as the module
        would run.  torch is imported here, never at ``import bnorm``.
        """
        num_features, config, state = _torch_layer_args(module)
        layer = cls(num_features, **config)
        layer.load_state_dict(state)
        return layer

    def torch_state_dict(self) -> dict[str, np.ndarray]:
        """The state under PyTorch's names, as NumPy copies: ``weight`` and ``bias`` (when
        ``affine``), ``running_mean``, ``running_var`` and ``num_batches_tracked`` (a 0-d int64
        array; when ``track_running_stats``): exactly the keys such a torch batch norm has, for
        ``module.load_state_dict({k: torch.from_numpy(v) for k, v in d.items()})``.

        PyTorch's batch norms have one feature axis: a layer of several (``num_features`` a
        tuple of two or more) is a ``ValueError``.  The conventions (``eps``, ``momentum`` as
        ``1 - m``, ``running_var_ddof=1``) are the module's arguments, not state.
        """
        if len(self.num_features) != 1:
            raise ValueError(f"torch_state_dict: PyTorch's batch norms have one feature axis, "
                             f"this layer has num_features={self.num_features}")
        return {_TORCH_NAMES[k]: v for k, v in self.state_dict().items()}

    # ------------------------------------------------------------------ helpers
    def _array_names(self) -> tuple[str, ...]:
        """The state held in arrays of shape ``F``."""
        return ((_PARAMS if self.affine else ())
                + (_BUFFERS if self.track_running_stats else ()))

    def _state_names(self) -> tuple[str, ...]:
        return self._array_names() + ((_COUNT,) if self.track_running_stats else ())

    def _why_not_state(self, unexpected: list[str]) -> str:
        """Why keys a layer of another configuration would have are unexpected here."""
        if not self.affine and set(unexpected) & set(_PARAMS):
            return " (the layer has affine=False)"
        if not self.track_running_stats and set(unexpected) & {*_BUFFERS, _COUNT}:
            return " (the layer has track_running_stats=False)"
        return ""

    def _config_repr(self) -> str:
        """The constructor's arguments after ``num_features``, as ``repr`` shows them."""
        return (f"axis={self.axis!r}, eps={self.eps!r}, momentum={self.momentum!r}, "
                f"affine={self.affine!r}, dtype={self.dtype.name}, "
                f"track_running_stats={self.track_running_stats!r}, "
                f"running_var_ddof={self.running_var_ddof!r}"
                + (f", activation={self.activation!r}" if self.activation else ""))

    def _num_features_repr(self) -> str:
        nf = self.num_features
        return repr(nf[0] if len(nf) == 1 else nf)

    def __repr__(self) -> str:
        return f"BatchNorm({self._num_features_repr()}, {self._config_repr()})"


def _torch_layer_args(module: Any) -> tuple[int, dict[str, Any], dict[str, np.ndarray]]:
    """``(num_features, keyword arguments, state dict)`` of the bnorm layer equal to a PyTorch
    batch norm (see ``BatchNorm.from_torch``)."""
    import torch   # here only: bnorm does not need torch

    batch_norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                   torch.nn.SyncBatchNorm)
    if not isinstance(module, batch_norms):
        raise TypeError(f"from_torch takes a torch.nn.BatchNorm1d, BatchNorm2d, BatchNorm3d or "
                        f"SyncBatchNorm, got {type(module).__name__}")
    affine, tracked = bool(module.affine), bool(module.track_running_stats)
    tensors: dict[str, Any] = {}
    if affine:
        tensors.update(gamma=module.weight, beta=module.bias)
    if tracked:
        tensors.update(running_mean=module.running_mean, running_var=module.running_var)
    state = _checks.torch_arrays(tensors, _TORCH_NAMES, torch)
    if tracked:
        count = module.num_batches_tracked
        state[_COUNT] = np.array(0 if count is None else int(count), dtype=np.int64)
    # The layer's dtype is its parameters' (or, with affine=False, its running statistics');
    # a module with neither holds no state, and bnorm's default dtype serves.
    first = next(iter(tensors), None)
    dtype = state[first].dtype if first is not None else np.dtype(np.float32)
    m = module.momentum
    config = dict(axis=1, eps=float(module.eps), momentum=None if m is None else 1.0 - m,
                  affine=affine, dtype=dtype, track_running_stats=tracked, running_var_ddof=1)
    return int(module.num_features), config, state
