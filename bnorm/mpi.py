"""``SyncBatchNorm``: batch norm whose batch is split across MPI ranks (needs ``mpi4py``).

Each rank holds a slice of one global batch (any number of rows, zero included).  The layer gives
every rank what single-process ``bnorm.BatchNorm`` gives on the whole batch: its slice of ``y`` and
``dx``, the whole batch's ``dgamma``/``dbeta`` and the same running statistics, equal to
float32/float64 rounding.  No data is gathered: a training forward sums one packed float64 buffer
of ``2 * F + 5`` numbers (a count, and per feature the sums of ``x - shift`` and
``(x - shift)**2``) with one ``Allreduce``; a backward sums ``2 * F + 2`` numbers with one
``Allreduce``::

    from mpi4py import MPI
    from bnorm.mpi import SyncBatchNorm

    layer = SyncBatchNorm(MPI.COMM_WORLD, 64)   # then the arguments of bnorm.BatchNorm
    y = layer.forward(x_local)                  # x_local: this rank's rows of the global batch
    dx_local = layer.backward(dy_local)         # layer.dgamma, layer.dbeta: the global batch's

Exactness.  The moments are taken around a *shift* common to all ranks -- the previous training
step's global mean, zeros at first -- so the sums do not cancel when the data's mean is far from
zero (``1e4 + randn`` in float32).  When the shift is poor (the first training step on data far
from zero, or a jump of the data's mean by many standard deviations) the sums would cancel; every
rank sees that in the same reduced numbers, and they redo the sums around the mean just found,
from their local statistics (no second pass over the data): a second small ``Allreduce`` on those
steps only.  A checksum in the buffer checks that the ranks' shifts agree, so a layer whose history
differs on some rank cannot corrupt the result (the sums are then redone around zeros).

Collective rules.  As for any MPI collective, every rank of ``comm`` calls ``forward`` with the
same ``training`` flag, then ``backward``, in the same order.  ``forward(x, training=False)``
communicates nothing.  Bad input on one rank does not hang the others: the failing rank raises its
own error after the ``Allreduce`` and the others raise ``RuntimeError``; nothing is modified on
any rank.
"""
from __future__ import annotations

import zlib
from typing import Any, TypeVar

try:
    from mpi4py import MPI
# (a private name: type checkers take the exception's name for a module attribute)
except ImportError as _mpi4py_error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "bnorm.mpi needs mpi4py and an MPI library: `pip install mpi4py mpich` (or "
        "`pip install 'bnorm[mpi]'`), or mpi4py built against the system's MPI"
    ) from _mpi4py_error

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from . import _checks
from . import backward as _backward
from ._checks import Axis, FloatArray
from .layer import _BUFFERS, BatchNorm, _torch_layer_args
from .phases import backward_apply, backward_sums, batch_stats, normalize

__all__ = ["SyncBatchNorm", "allreduce_stats"]

_SyncLayer = TypeVar("_SyncLayer", bound="SyncBatchNorm")

# The sums are redone around the mean just found when sum((x - shift)**2) exceeds TAU times the
# sum of squared deviations m2: the cancellation would then cost more than log2(TAU) bits of
# float64 (relative error of m2 about (ranks + 3) * 2**-53 * TAU).  Float64 data gets a tight
# bound (errors ~1e-14); float32 data keeps float32 precision with a looser one (~1e-9 << 2**-24).
_TAU64 = 2.0 ** 6
_TAU32 = 2.0 ** 22

# Forward buffer: [failed ranks, ranks with float64 data, count, shift checksum, its square,
#                  sum(x - shift) (F), sum((x - shift)**2) (F)] -- the header holds integers,
# summed exactly in float64.
_H_ERR, _H_F64, _H_COUNT, _H_SUM, _H_SQ = range(5)
_FWD_HEADER = 5
# Backward buffer: [failed ranks, ranks whose forward was training, sum(dy) (F),
#                   sum(dy * (x - mean)) (F)].
_BWD_HEADER = 2


def _checksum(shift: np.ndarray) -> int:
    """A 16-bit integer of ``shift``'s bytes (its sums over ranks are exact)."""
    return zlib.crc32(np.ascontiguousarray(shift, dtype=np.float64).tobytes()) & 0xFFFF


def _allreduce_moments(comm, count, mean, m2, shift, *, failed=False, float64=True, bufs=None):
    """The collective behind ``allreduce_stats`` and ``SyncBatchNorm.forward``.

    Returns ``(failed_ranks, n, mean, m2)``: ``failed_ranks > 0`` (then the rest is None) when a
    rank passed ``failed=True``; ``n == 0`` (mean, m2 None) when every rank is empty.
    """
    F = shift.shape
    nf = shift.size
    if bufs is None:
        bufs = (np.empty(_FWD_HEADER + 2 * nf), np.empty(_FWD_HEADER + 2 * nf))
    send, recv = bufs
    s1 = send[_FWD_HEADER:_FWD_HEADER + nf]
    s2 = send[_FWD_HEADER + nf:]

    def reduce_around(shift, failed, float64):
        h = _checksum(shift)
        send[:_FWD_HEADER] = (float(failed), float(float64), float(count), h, h * h)
        if count > 0:
            d = mean.reshape(-1) - shift.reshape(-1)
            np.multiply(d, count, out=s1)   # n_r * (mean_r - shift)
            np.multiply(s1, d, out=s2)      # n_r * (mean_r - shift)**2
            np.add(s2, m2.reshape(-1), out=s2)   # + m2_r: the rank's sum of (x - shift)**2
        else:
            s1.fill(0.0)
            s2.fill(0.0)
        comm.Allreduce(send, recv, op=MPI.SUM)
        n = int(round(recv[_H_COUNT]))
        S1 = recv[_FWD_HEADER:_FWD_HEADER + nf].reshape(F)
        S2 = recv[_FWD_HEADER + nf:].reshape(F)
        if n == 0:
            return n, None, None, S2
        d = S1 / n
        return n, shift + d, S2 - S1 * d, S2.copy()

    n, gmean, gm2, S2 = reduce_around(shift, failed, float64)
    nfailed = int(round(recv[_H_ERR]))
    if nfailed:
        return nfailed, None, None, None
    any64 = recv[_H_F64] > 0
    # All ranks' checksums h are equal iff size * sum(h**2) == sum(h)**2 (Cauchy-Schwarz), in
    # exact integers; every rank sees the same sums, so all take the same branch.
    if comm.Get_size() * int(recv[_H_SQ]) != int(recv[_H_SUM]) ** 2:
        shift = np.zeros(F)
        n, gmean, gm2, S2 = reduce_around(shift, False, any64)
    if n == 0:
        return 0, 0, None, None
    with np.errstate(invalid="ignore"):   # NaN/inf features compare False: nothing to save there
        ill = bool(np.any(S2 > (_TAU64 if any64 else _TAU32) * gm2))
    if ill:
        shift = np.where(np.isfinite(gmean), gmean, 0.0)
        n, gmean, gm2, _ = reduce_around(shift, False, any64)
    return 0, n, gmean, np.maximum(gm2, 0.0)


def allreduce_stats(comm: MPI.Comm, count: int, mean: ArrayLike, m2: ArrayLike, *,
                    shift: ArrayLike | None = None, precision: DTypeLike = np.float64
                    ) -> tuple[int, NDArray[np.float64] | None, NDArray[np.float64] | None]:
    """Combine every rank's ``bnorm.batch_stats`` into the global ``(count, mean, m2)``.

    A collective: each rank of ``comm`` passes its local ``count`` (an int, 0 allowed) and its
    ``mean`` and ``m2`` (float arrays of the feature shape ``F``, the same ``F`` on all ranks).
    One ``Allreduce`` of ``2 * F + 5`` float64 sums the moments around ``shift`` (shape ``F``,
    default zeros; if the ranks pass different shifts the sums are redone around zeros), plus a
    second one around the mean just found when the first cancels by more than what ``precision``
    (float64 or float32: the data's dtype) can afford.  Every rank gets the same float64 result,
    as ``bnorm.combine_stats`` of all ranks' statistics would give; when every rank is empty,
    ``(0, None, None)``.
    """
    mean = np.asarray(mean, dtype=np.float64)
    m2 = np.asarray(m2, dtype=np.float64)
    if m2.shape != mean.shape:
        raise ValueError(f"mean and m2 have shapes {mean.shape} and {m2.shape}")
    shift = np.zeros(mean.shape) if shift is None else np.asarray(shift, dtype=np.float64)
    if shift.shape != mean.shape:
        raise ValueError(f"shift has shape {shift.shape}, expected {mean.shape}")
    shift = np.where(np.isfinite(shift), shift, 0.0)
    float64 = np.dtype(precision) == np.float64
    _, n, gmean, gm2 = _allreduce_moments(comm, int(count), mean, m2, shift, float64=float64)
    return n, gmean, gm2


class SyncBatchNorm(BatchNorm):
    """``bnorm.BatchNorm`` over a batch split across the ranks of an MPI communicator.

    ``SyncBatchNorm(comm, num_features, *, axis=-1, eps=1e-8, momentum=0.9, affine=True,
    dtype=np.float32, track_running_stats=True, running_var_ddof=0, activation=None)``: ``comm``
    is an mpi4py intracommunicator (``MPI.COMM_WORLD`` or a sub-communicator: a process group);
    the other
    arguments, the attributes (``gamma``, ``beta``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``, ``dgamma``, ``dbeta``) and ``state_dict`` / ``load_state_dict``
    are ``BatchNorm``'s, with the *global* batch in place of the batch: ``momentum=None``
    averages the global batches' statistics, ``running_var_ddof=1`` folds in
    ``var * M / (M - 1)`` with ``M`` the global number of values per feature, and training
    needs ``M >= 2`` globally (one value per feature in the whole batch is a ``ValueError`` on
    every rank, nothing modified anywhere; a rank may hold a single row, or none).

    ``forward(x, training=True)``: ``x`` is this rank's part of the global batch, split along any
    batch axis (any length, 0 included).  Training normalizes with the global batch's mean and
    biased variance and updates the running statistics with them (identical on every rank): one
    ``Allreduce`` (two on steps where the previous mean is a poor shift, see the module's doc).
    ``training=False`` uses the running statistics and communicates nothing -- except with
    ``track_running_stats=False``, where it normalizes with the global batch's statistics as
    training does (a collective then, updating nothing).

    ``backward(dy)``: this rank's part of ``dx``, and ``dgamma``/``dbeta`` of the *whole* batch,
    identical on every rank (so an optimizer must not sum or average them across ranks again):
    one ``Allreduce``, in both modes.

    Keep ``gamma``, ``beta`` and the running statistics the same on all ranks (update them with
    the same gradients; ``broadcast_state`` copies one rank's to all).
    """

    def __init__(self, comm: MPI.Comm, num_features: int | tuple[int, ...], *,
                 axis: Axis = -1, eps: float = 1e-8, momentum: float | None = 0.9,
                 affine: bool = True, dtype: DTypeLike = np.float32,
                 track_running_stats: bool = True, running_var_ddof: int = 0,
                 activation: str | None = None) -> None:
        if not all(hasattr(comm, m) for m in ("Allreduce", "Get_size")):
            raise TypeError(f"comm must be an mpi4py communicator, got {type(comm).__name__}")
        super().__init__(num_features, axis=axis, eps=eps, momentum=momentum, affine=affine,
                         dtype=dtype, track_running_stats=track_running_stats,
                         running_var_ddof=running_var_ddof, activation=activation)
        self.comm = comm
        nf = int(np.prod(self.num_features))
        self._fwd_bufs = (np.empty(_FWD_HEADER + 2 * nf), np.empty(_FWD_HEADER + 2 * nf))
        self._bwd_bufs = (np.empty(_BWD_HEADER + 2 * nf), np.empty(_BWD_HEADER + 2 * nf))
        self._shift = np.zeros(self.num_features)   # the last training step's global mean
        # (x, mean, rstd, gamma, beta, training, count) of the last forward
        self._ctx: (tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None,
                          np.ndarray | None, bool, int | None] | None) = None

    # ------------------------------------------------------------------ forward / backward
    def forward(self, x: ArrayLike, training: bool = True) -> FloatArray:
        """Normalize this rank's ``x`` with the global batch's statistics; returns its ``y``.

        A collective when it uses the batch's statistics (training, or any forward with
        ``track_running_stats=False``: every rank calls it); see the class doc.
        """
        if training or not self.track_running_stats:
            return self._forward_batch_stats(x, updates_running=bool(training)
                                             and self.track_running_stats)
        return self._forward_eval(x)

    __call__ = forward   # BatchNorm's __call__ is bound to BatchNorm.forward

    def _forward_batch_stats(self, x: ArrayLike, updates_running: bool) -> FloatArray:
        F = self.num_features
        failed = None
        try:
            if not isinstance(x, np.ndarray):
                x = np.asarray(x)
            _checks.check_features(x, self.axis, self.num_features)
            # checked again, as bnorm.forward checks BatchNorm's: eps, momentum and
            # running_var_ddof are plain attributes, and eps=inf would make every y beta
            _checks.check_eps(self.eps)
            momentum = _checks.step_momentum(_checks.check_layer_momentum(self.momentum),
                                             self.num_batches_tracked or 0)
            ddof = _checks.check_running_var_ddof(self.running_var_ddof)
            if updates_running:
                for name in _BUFFERS:
                    _checks.check_writable(f"layer.{name}", getattr(self, name))
            count, mean_r, m2_r = batch_stats(x, axis=self.axis)
            x_is_float64 = x.dtype == np.float64
        except Exception as exc:   # take part in the Allreduce anyway, then raise it
            failed = exc
            count, mean_r, m2_r, x_is_float64 = 0, np.zeros(F), np.zeros(F), False
        # float64 data or statistics get the tight cancellation bound (see _TAU64)
        float64 = self.dtype == np.float64 or x_is_float64
        nfailed, n, mean, m2 = _allreduce_moments(
            self.comm, count, mean_r, m2_r, self._shift, failed=failed is not None,
            float64=float64, bufs=self._fwd_bufs)
        if failed is not None:
            raise failed
        assert isinstance(x, np.ndarray)   # for mypy: the try, which did not fail, converted it
        if nfailed:
            raise RuntimeError(f"SyncBatchNorm.forward: {nfailed} other rank(s) failed (see "
                               f"their errors); nothing was modified")
        if n == 0:
            raise ValueError("SyncBatchNorm.forward: training with zero elements to reduce over "
                             "(the global batch is empty on every rank)")
        if n == 1:
            # every rank sees the same reduced count, so every rank raises, before any write
            raise ValueError(f"SyncBatchNorm.forward: training needs more than one value per "
                             f"feature, but the global batch has one per feature (x of shape "
                             f"{x.shape} on this rank, feature shape {F})")
        var = m2 / n
        rstd = 1.0 / np.sqrt(var + self.eps)
        gamma, beta = self.gamma, self.beta
        y = normalize(x, mean, rstd, gamma, beta, axis=self.axis, activation=self.activation)
        if updates_running:
            assert self.running_mean is not None and self.running_var is not None   # for mypy
            _checks.update_running_averages(momentum, [
                ("layer.running_mean", self.running_mean, mean),
                ("layer.running_var", self.running_var, m2 / (n - ddof))])
            self.num_batches_tracked = (self.num_batches_tracked or 0) + 1
        self._shift = np.where(np.isfinite(mean), mean, 0.0)
        self._ctx = (x, mean, rstd, gamma, beta, True, n)
        return y

    def _forward_eval(self, x: ArrayLike) -> FloatArray:
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        _checks.check_features(x, self.axis, self.num_features)
        _checks.check_eps(self.eps)
        assert self.running_mean is not None and self.running_var is not None   # tracked
        mean = self.running_mean.astype(np.float64)
        rstd = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
        gamma, beta = self.gamma, self.beta
        y = normalize(x, mean, rstd, gamma, beta, axis=self.axis, activation=self.activation)
        self._ctx = (x, mean, rstd, gamma, beta, False, None)
        return y

    def backward(self, dy: ArrayLike) -> FloatArray:
        """This rank's ``dx`` for its ``dy``; sets ``dgamma``/``dbeta`` of the whole batch.

        A collective (one ``Allreduce``, in both modes); see the class doc.
        """
        F = self.num_features
        nf = int(np.prod(F))
        send, recv = self._bwd_bufs
        ctx = self._ctx
        failed = None
        training = False
        try:
            if ctx is None:
                raise RuntimeError("SyncBatchNorm.backward called before forward: there is no "
                                   "saved input")
            x, mean, rstd, gamma, beta, training, n = ctx
            dy = _checks.check_dy(dy, x)
            if training or self.affine:
                sum_dy, sum_dy_xmu = backward_sums(dy, x, mean, axis=self.axis, rstd=rstd,
                                                   gamma=gamma, beta=beta,
                                                   activation=self.activation)
                send[_BWD_HEADER:_BWD_HEADER + nf] = sum_dy.reshape(-1)
                send[_BWD_HEADER + nf:] = sum_dy_xmu.reshape(-1)
            else:
                send[_BWD_HEADER:] = 0.0
        except Exception as exc:
            failed = exc
            send[_BWD_HEADER:] = 0.0
        send[0] = 1.0 if failed is not None else 0.0
        send[1] = 1.0 if failed is None and training else 0.0
        self.comm.Allreduce(send, recv, op=MPI.SUM)
        if failed is not None:
            raise failed
        nfailed = int(round(recv[0]))
        if nfailed:
            raise RuntimeError(f"SyncBatchNorm.backward: {nfailed} other rank(s) failed (see "
                               f"their errors); nothing was modified")
        ntrain, size = int(round(recv[1])), self.comm.Get_size()
        if ntrain not in (0, size):
            raise RuntimeError(f"SyncBatchNorm.backward: the last forward was in training mode "
                               f"on {ntrain} of {size} ranks; all ranks must use the same mode")
        sum_dy = recv[_BWD_HEADER:_BWD_HEADER + nf].reshape(F).copy()
        sum_dy_xmu = recv[_BWD_HEADER + nf:].reshape(F).copy()
        if training:
            assert n is not None   # for mypy: a training forward saved its global count
            dx = backward_apply(dy, x, mean, rstd, sum_dy, sum_dy_xmu, n, gamma, axis=self.axis,
                                beta=beta, activation=self.activation)
        else:   # constant statistics: dx = gamma * rstd * dy (through the ReLU's mask), local
            dx = _backward(dy, x, mean, rstd, gamma, axis=self.axis, training=False, beta=beta,
                           activation=self.activation)[0]
        if self.affine:
            self.dgamma = (rstd * sum_dy_xmu).astype(self.dtype)
            self.dbeta = sum_dy.astype(self.dtype)
        else:
            self.dgamma = self.dbeta = None
        return dx

    # ------------------------------------------------------------------ state
    def broadcast_state(self, root: int = 0) -> None:
        """Copy rank ``root``'s ``gamma``, ``beta``, running statistics and
        ``num_batches_tracked`` to every rank, in place (one ``Bcast``; a collective).  Use it
        after initializing or loading on one rank."""
        names = self._array_names()
        arrays = [getattr(self, k) for k in names] + [self._shift]
        # the count rides along as a float64: exact up to 2**53 batches
        count = float(self.num_batches_tracked or 0)
        buf = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]
                             + [np.array([count])])
        self.comm.Bcast(buf, root=root)
        parts = np.split(buf[:-1], len(arrays))
        for k, part in zip(names, parts):
            target = getattr(self, k)
            if target.flags.writeable:
                np.copyto(target, part.reshape(self.num_features), casting="unsafe")
            else:
                setattr(self, k, part.reshape(self.num_features).astype(self.dtype))
        self._shift = parts[-1].reshape(self.num_features).copy()
        if self.track_running_stats:
            self.num_batches_tracked = int(buf[-1])

    # ------------------------------------------------------------------ PyTorch
    @classmethod
    def from_torch(cls: type[_SyncLayer], module: Any,
                   comm: MPI.Comm | None = None) -> _SyncLayer:
        """``BatchNorm.from_torch`` over ``comm``: a SyncBatchNorm equal to ``module`` (a
        ``torch.nn.SyncBatchNorm`` or ``BatchNorm1d/2d/3d``), its batch split across the ranks
        of ``comm`` (required: PyTorch's process group does not translate to MPI)."""
        if comm is None:
            raise TypeError("SyncBatchNorm.from_torch(module, comm): comm, the mpi4py "
                            "communicator the batch is split across, is required")
        num_features, config, state = _torch_layer_args(module)
        layer = cls(comm, num_features, **config)
        layer.load_state_dict(state)
        return layer

    # ------------------------------------------------------------------ helpers
    def __repr__(self) -> str:
        return (f"SyncBatchNorm(<comm of {self.comm.Get_size()} ranks>, "
                f"{self._num_features_repr()}, {self._config_repr()})")
