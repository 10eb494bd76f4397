"""Smoothed quadratic model of the training loss used by CREST to decide when to re-select coresets.

At a coreset selection with parameters ``w0`` CREST approximates the loss by the second-order model

.. math::

    F(\\delta) = L_0 + g^\\top \\delta + \\tfrac{1}{2} \\delta^\\top \\operatorname{diag}(H) \\delta,

where ``g`` is the (weighted) coreset gradient and ``diag(H)`` a Hutchinson estimate of the Hessian
diagonal. Both are smoothed AdaHessian-style over the whole run: ``g`` by an exponential moving average
(EMA) with ``beta1``, the *squared* Hessian diagonal by an EMA with ``beta2``, both bias-corrected, and the
curvature used is ``sqrt(bias-corrected EMA of diag(H)^2) + eps``.

Every ``T1`` steps the trainer measures the real parameter change ``delta = w_now - w0`` (exact whatever
the optimizer does: momentum, Adam, weight decay), evaluates :meth:`QuadraticModel.predict`, and compares it
with the actual loss on a random sample via :func:`relative_error`; it re-selects when the error exceeds
``tau``. After each re-selection the interval adapts as ``T1 = ceil(h * ||H_ref|| / ||H_t||)``
(:meth:`QuadraticModel.check_interval`): the paper takes ``H_ref = H_0``, the curvature at the first anchor, and
:class:`~lightning_crest.CrestCallback` the sharpest smoothed curvature met so far.

Everything is kept as one flat ``float32`` vector (``parameters_to_vector`` layout) so that a check costs a
couple of fused vector operations, independent of the number of parameter tensors. The module is pure
torch; which parameters are modelled (all, or only the last layer) is decided by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["QuadraticModel", "hutchinson_diagonal", "rademacher_like", "relative_error"]

# Denominator floor of :func:`relative_error`. Losses are O(1e-3 .. 1e1); 1e-12 only matters when the
# actual loss is (numerically) zero, where it turns a division by zero into a huge, finite error.
_TINY = 1e-12

# Relative slack used before ``ceil`` in :meth:`QuadraticModel.check_interval`: the norms are float32
# reductions (relative error ~1e-7), so a ratio that is mathematically an integer must not be bumped up
# by one because it came out as ``2.0000001``.
_CEIL_SLACK = 1e-6

_STATE_VERSION = 1


def rademacher_like(tensors: Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """Draw Rademacher (``+-1``) tensors matching ``tensors``.

    All entries are drawn in a single call on the generator's device (CPU when ``generator`` is ``None``)
    and then split and moved, so a CPU generator also works for CUDA parameters and the draws do not
    depend on where the parameters live.

    Args:
        tensors: Reference tensors; only their shapes, dtypes and devices are used.
        generator: Source of randomness. ``None`` uses torch's default CPU generator (no reseeding).

    Returns:
        One tensor per input with the same shape, dtype and device, entries in ``{-1, +1}``.
    """
    if len(tensors) == 0:
        return []
    numels = [t.numel() for t in tensors]
    draw_device = generator.device if generator is not None else torch.device("cpu")
    # One draw for everything: fewer kernel launches / RNG calls than drawing per tensor.
    bits = torch.randint(0, 2, (sum(numels),), generator=generator, device=draw_device, dtype=torch.int8)
    signs = bits.mul_(2).sub_(1)
    devices = {t.device for t in tensors}
    if len(devices) == 1:  # one copy to the parameters' device rather than one per tensor
        signs = signs.to(devices.pop())
    return [
        chunk.reshape(t.shape).to(device=t.device, dtype=t.dtype)
        for chunk, t in zip(torch.split(signs, numels), tensors, strict=True)
    ]


def hutchinson_diagonal(
    grads: Sequence[Tensor | None],
    params: Sequence[Tensor],
    generator: torch.Generator | None = None,
    *,
    retain_graph: bool = False,
) -> list[Tensor]:
    """One Hutchinson probe of the Hessian diagonal, ``z * (H z)`` with Rademacher ``z``.

    ``E[z * (H z)] = diag(H)`` because ``E[z_i z_j] = [i == j]``; for a diagonal Hessian a single probe is
    exact since ``z_i^2 = 1``.

    Args:
        grads: ``torch.autograd.grad(loss, params, create_graph=True)``, one per parameter (shape of the
            parameter). Entries that are ``None`` or carry no graph (the gradient does not depend on the
            parameters, e.g. a linear term) contribute nothing to ``H z``.
        params: The parameters the gradients were taken with respect to.
        generator: Generator for the probe vector (see :func:`rademacher_like`).
        retain_graph: Keep the double-backward graph, e.g. to draw several probes from the same ``grads``
            or to call ``loss.backward()`` afterwards.

    Returns:
        One detached ``float32`` tensor per parameter (same shape and device). Parameters on which the
        gradients do not depend (or that do not require grad) get zeros.

    Raises:
        ValueError: If the lengths or shapes of ``grads`` and ``params`` differ.
    """
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
    for i, (g, p) in enumerate(zip(grads, params, strict=True)):
        if g is not None and g.shape != p.shape:
            raise ValueError(f"gradient {i} has shape {tuple(g.shape)}, parameter has {tuple(p.shape)}")

    zs = rademacher_like(params, generator)
    out: list[Tensor | None] = [None] * len(params)

    outputs: list[Tensor] = []
    grad_outputs: list[Tensor] = []
    for g, z in zip(grads, zs, strict=True):
        if g is not None and g.requires_grad:
            outputs.append(g)
            grad_outputs.append(z)
    in_idx = [i for i, p in enumerate(params) if p.requires_grad]

    if outputs and in_idx:
        # H z = d(g . z) / dw: a single vector-Jacobian product through the gradient graph.
        hz = torch.autograd.grad(
            outputs,
            [params[i] for i in in_idx],
            grad_outputs=grad_outputs,
            retain_graph=retain_graph,
            allow_unused=True,
            materialize_grads=True,
        )
        for k, i in enumerate(in_idx):
            # A sparse product (through `nn.Embedding(sparse=True)`) as the dense one, laid out as its parameter.
            product = hz[k].to_dense() if hz[k].is_sparse else hz[k]
            out[i] = (zs[i] * product).detach().to(torch.float32)

    return [
        o if o is not None else torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        for o, p in zip(out, params, strict=True)
    ]


def relative_error(predicted: float, actual: float) -> float:
    """Relative error ``|predicted - actual| / |actual|`` of the quadratic model (CREST's ``rho``).

    The denominator is floored at ``1e-12`` so that a zero actual loss gives a large finite error (a
    prediction that is off when the true loss vanishes should trigger a re-selection) instead of a
    ``ZeroDivisionError``; when both are zero the error is ``0``.

    Args:
        predicted: Loss predicted by :meth:`QuadraticModel.predict`.
        actual: Loss measured on a random sample at the current parameters.

    Returns:
        The non-negative relative error.
    """
    return abs(float(predicted) - float(actual)) / max(abs(float(actual)), _TINY)


def _flatten(tensors: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """Concatenate ``tensors`` into one detached flat ``float32`` vector (``parameters_to_vector`` order).

    ``torch.cat`` always allocates, so the result never aliases the inputs (needed for ``w0``).

    Args:
        tensors: Tensors of any shapes.
        device: Target device; defaults to that of the first tensor.

    Returns:
        Tensor of shape ``(sum(t.numel()),)``.
    """
    if len(tensors) == 0:
        raise ValueError("expected at least one tensor, got an empty sequence")
    target = device if device is not None else tensors[0].device
    return torch.cat([t.detach().reshape(-1).to(device=target, dtype=torch.float32) for t in tensors])


class QuadraticModel:
    """Smoothed quadratic model of the loss around the last selection point.

    Typical use: at every coreset batch call :meth:`update` with the coreset gradient and one Hutchinson
    probe; at a selection call :meth:`anchor`; every ``T1`` steps compare :meth:`predict` with the measured
    loss. The EMAs persist over the whole run (they are not reset by :meth:`anchor`).

    Internally the EMAs are stored already bias-corrected, using the equivalent recursion
    ``m_hat_t = m_hat_{t-1} + (1 - beta) / (1 - beta^t) * (x_t - m_hat_{t-1})``. This equals
    ``m_t / (1 - beta^t)`` with ``m_t = beta m_{t-1} + (1 - beta) x_t``, ``m_0 = 0``, but the first update
    is exact (weight 1) and early steps with ``beta2 = 0.999`` avoid dividing a tiny EMA by a tiny factor.

    Args:
        beta1: EMA factor of the gradient, in ``[0, 1)``.
        beta2: EMA factor of the squared Hessian diagonal, in ``[0, 1)``.
        eps: Positive offset added to the curvature; also keeps ``||H_t|| > 0`` in :meth:`check_interval`.

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-4) -> None:
        _check_hparams(beta1, beta2, eps)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self._step = 0
        self._hess_step = 0  # updates that carried a Hessian probe
        self._grad_avg: Tensor | None = None  # bias-corrected EMA of g, shape (P,)
        self._hess_sq_avg: Tensor | None = None  # bias-corrected EMA of diag(H)^2, shape (P,)
        self._w0: Tensor | None = None  # parameters at the last anchor, shape (P,)
        self._loss0: float | None = None
        self._ref_norm: float | None = None  # ||H_0||, curvature norm at the first anchor

    # ------------------------------------------------------------------ properties
    @property
    def step(self) -> int:
        """Number of :meth:`update` calls so far."""
        return self._step

    @property
    def curvature_steps(self) -> int:
        """Number of :meth:`update` calls that carried a Hessian probe."""
        return self._hess_step

    @property
    def is_anchored(self) -> bool:
        """Whether :meth:`anchor` has been called."""
        return self._w0 is not None

    @property
    def anchor_loss(self) -> float | None:
        """``L0``, the loss recorded at the last anchor (``None`` before the first)."""
        return self._loss0

    @property
    def reference_norm(self) -> float | None:
        """``||H_0||``, the curvature norm recorded at the first anchor after an update (else ``None``)."""
        return self._ref_norm

    @property
    def gradient(self) -> Tensor:
        """Bias-corrected smoothed gradient, shape ``(P,)``, float32.

        Raises:
            RuntimeError: Before the first :meth:`update`.
        """
        return self._require_stats()[0]

    @property
    def hessian(self) -> Tensor:
        """Smoothed Hessian diagonal ``sqrt(bias-corrected EMA of diag(H)^2) + eps``, shape ``(P,)``.

        Raises:
            RuntimeError: Before the first :meth:`update`.
        """
        return self._require_stats()[1].sqrt().add_(self.eps)

    # ------------------------------------------------------------------ updates
    def update(self, grads: Sequence[Tensor], hess_diag: Sequence[Tensor] | None = None) -> None:
        """Fold one gradient, and one Hutchinson probe when given, into the EMAs.

        Each EMA keeps its own step count for the bias correction, so updates without a probe leave the curvature
        average exactly as it was. (AdaHessian's ``update_each`` also probes only every few steps, but feeds the
        stale probe into its average at every step.) The curvature changes slowly, and a probe costs a double
        backward.

        Args:
            grads: Coreset gradient per parameter (any shapes; detached here).
            hess_diag: Hessian-diagonal estimate per parameter, e.g. from :func:`hutchinson_diagonal`; ``None``
                updates the gradient alone (not allowed for the first update).

        Raises:
            ValueError: If the flattened sizes differ from each other or from earlier updates, or if the first
                update has no probe.
        """
        device = self._grad_avg.device if self._grad_avg is not None else None
        g = _flatten(grads, device)
        self._check_size(g.numel(), "update")
        h = None if hess_diag is None else _flatten(hess_diag, g.device)
        if h is not None and g.numel() != h.numel():
            raise ValueError(f"gradient has {g.numel()} entries but Hessian diagonal has {h.numel()}")
        if h is None and self._hess_sq_avg is None:
            raise ValueError("the first update() needs a Hessian diagonal: pass `hess_diag`")

        self._step += 1
        # The bias-corrected weight of a first observation is exactly 1: the average becomes the observation.
        if self._grad_avg is None:
            self._grad_avg = g
        else:
            self._grad_avg.lerp_(g, (1.0 - self.beta1) / (1.0 - self.beta1**self._step))
        if h is None:
            return
        self._hess_step += 1
        if self._hess_sq_avg is None:
            self._hess_sq_avg = h.square()
        else:
            self._hess_sq_avg.lerp_(h.square_(), (1.0 - self.beta2) / (1.0 - self.beta2**self._hess_step))

    def anchor(self, params: Sequence[Tensor], loss: float | Tensor) -> None:
        """Record the selection point ``w0`` and its loss ``L0``.

        The first anchor that follows at least one :meth:`update` also records the reference curvature
        norm ``||H_0||`` used by :meth:`check_interval`; later anchors leave it unchanged.

        Args:
            params: Current parameters (same list/order as given to :meth:`update`).
            loss: Loss at ``params`` (a Python float or a scalar tensor).

        Raises:
            ValueError: If the flattened size differs from the one seen by :meth:`update`.
        """
        device = self._grad_avg.device if self._grad_avg is not None else None
        w0 = _flatten(params, device)
        self._check_size(w0.numel(), "anchor")
        self._w0 = w0
        self._loss0 = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        if self._ref_norm is None and self._step > 0:
            self._ref_norm = self.curvature_norm()

    # ------------------------------------------------------------------ queries
    def delta(self, params: Sequence[Tensor]) -> Tensor:
        """Real parameter change since the last anchor.

        Args:
            params: Current parameters.

        Returns:
            ``flat(params) - w0``, shape ``(P,)``, float32.

        Raises:
            RuntimeError: Before :meth:`anchor`.
            ValueError: If the flattened size differs from ``w0``.
        """
        if self._w0 is None:
            raise RuntimeError("QuadraticModel.delta() called before anchor(); no selection point recorded")
        w = _flatten(params, self._w0.device)
        if w.numel() != self._w0.numel():
            raise ValueError(f"params have {w.numel()} entries, the anchor has {self._w0.numel()}")
        return w.sub_(self._w0)

    def predict(self, params: Sequence[Tensor]) -> float:
        """Quadratic prediction ``F(delta) = L0 + g^T delta + 1/2 delta^T diag(H) delta``.

        Args:
            params: Current parameters (same list/order as the anchor).

        Returns:
            The predicted loss.

        Raises:
            RuntimeError: Before :meth:`anchor` or before any :meth:`update`.
            ValueError: If the flattened size differs from the anchor.
        """
        if self._w0 is None or self._loss0 is None:
            raise RuntimeError(
                "QuadraticModel.predict() called before anchor(); record a selection point first"
            )
        self._require_stats()
        d = self.delta(params)
        g = self.gradient
        hd = self.hessian.mul_(d)
        value = torch.dot(g, d) + 0.5 * torch.dot(hd, d)
        return self._loss0 + float(value)

    def curvature_norm(self) -> float:
        """L2 norm of :attr:`hessian` (``||H_t||``).

        Raises:
            RuntimeError: Before the first :meth:`update`.
        """
        return float(torch.linalg.vector_norm(self.hessian))

    def check_interval(self, h: float, reference: float | None = None) -> int:
        """Adaptive check interval ``T1 = ceil(h * ||H_ref|| / ||H_t||)``, at least 1.

        Args:
            h: Positive base interval.
            reference: The curvature norm ``||H_ref||`` to compare with (CrestCallback passes the sharpest so far);
                ``None`` uses the paper's ``||H_0||``, from the first anchor.

        Returns:
            Number of steps until the next quadratic-model check.

        Raises:
            ValueError: If ``h`` is not a positive finite number.
            RuntimeError: If no reference curvature exists yet (no :meth:`anchor` after an :meth:`update`).
        """
        if not (math.isfinite(h) and h > 0):
            raise ValueError(f"h must be a positive finite number, got {h!r}")
        reference = self._ref_norm if reference is None else reference
        if reference is None:
            raise RuntimeError(
                "QuadraticModel.check_interval() needs the reference curvature ||H_0||; "
                "call update() and then anchor() first"
            )
        # eps > 0 guarantees a non-zero denominator.
        value = h * reference / self.curvature_norm()
        return max(1, math.ceil(value * (1.0 - _CEIL_SLACK)))

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Serializable state: only tensors and plain Python values (``torch.load(weights_only=True)``-safe).

        Returns:
            Dict with the format version, hyperparameters, the step counts (updates, and those with a probe), the
            bias-corrected EMAs (``None`` before the first update), ``w0``/``L0`` (``None`` before the first anchor)
            and the reference norm.
        """
        return {
            "version": _STATE_VERSION,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "step": self._step,
            "hess_step": self._hess_step,
            "grad_avg": None if self._grad_avg is None else self._grad_avg.clone(),
            "hess_sq_avg": None if self._hess_sq_avg is None else self._hess_sq_avg.clone(),
            "w0": None if self._w0 is None else self._w0.clone(),
            "loss0": self._loss0,
            "ref_norm": self._ref_norm,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` (hyperparameters included).

        Tensors keep the device they were loaded on; use :meth:`to` to move them.

        Args:
            state: The state dict.

        Raises:
            ValueError: If the state is malformed or inconsistent.
        """
        version = state.get("version")
        if version != _STATE_VERSION:
            raise ValueError(
                f"QuadraticModel state of version {version!r}; this library reads version {_STATE_VERSION} (the "
                "state was saved by another version of lightning-crest)"
            )
        missing = QuadraticModel().state_dict().keys() - state.keys()  # what this version writes
        if missing:
            raise ValueError(f"QuadraticModel state is missing keys {sorted(missing)}")
        beta1, beta2, eps = float(state["beta1"]), float(state["beta2"]), float(state["eps"])
        _check_hparams(beta1, beta2, eps)
        step = int(state["step"])
        grad_avg, hess_sq_avg, w0 = state["grad_avg"], state["hess_sq_avg"], state["w0"]
        for name, t in (("grad_avg", grad_avg), ("hess_sq_avg", hess_sq_avg), ("w0", w0)):
            if t is not None and (not isinstance(t, Tensor) or t.dim() != 1):
                raise ValueError(f"state[{name!r}] must be None or a 1-D tensor")
        if (grad_avg is None) != (hess_sq_avg is None) or (grad_avg is None) != (step == 0):
            raise ValueError("inconsistent state: EMAs must be present exactly when step > 0")
        hess_step = int(state["hess_step"])
        if (step == 0) != (hess_step == 0) or not 0 <= hess_step <= step:
            raise ValueError(f"inconsistent state: {hess_step} curvature probes in {step} updates")
        sizes = {t.numel() for t in (grad_avg, hess_sq_avg, w0) if t is not None}
        if len(sizes) > 1:
            raise ValueError(f"inconsistent state: tensor sizes differ {sorted(sizes)}")
        if (w0 is None) != (state["loss0"] is None):
            raise ValueError("inconsistent state: w0 and loss0 must both be set or both be None")

        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self._step, self._hess_step = step, hess_step
        self._grad_avg = None if grad_avg is None else grad_avg.detach().to(torch.float32).clone()
        self._hess_sq_avg = None if hess_sq_avg is None else hess_sq_avg.detach().to(torch.float32).clone()
        self._w0 = None if w0 is None else w0.detach().to(torch.float32).clone()
        self._loss0 = None if state["loss0"] is None else float(state["loss0"])
        self._ref_norm = None if state["ref_norm"] is None else float(state["ref_norm"])

    def to(self, device: torch.device | str) -> QuadraticModel:
        """Move all stored vectors to ``device`` (in place).

        Args:
            device: Target device.

        Returns:
            ``self``.
        """
        if self._grad_avg is not None:
            self._grad_avg = self._grad_avg.to(device)
        if self._hess_sq_avg is not None:
            self._hess_sq_avg = self._hess_sq_avg.to(device)
        if self._w0 is not None:
            self._w0 = self._w0.to(device)
        return self

    # ------------------------------------------------------------------ helpers
    def _require_stats(self) -> tuple[Tensor, Tensor]:
        if self._grad_avg is None or self._hess_sq_avg is None:
            raise RuntimeError("QuadraticModel has no gradient/Hessian statistics yet; call update() first")
        return self._grad_avg, self._hess_sq_avg

    def _check_size(self, numel: int, where: str) -> None:
        for ref in (self._grad_avg, self._w0):
            if ref is not None and ref.numel() != numel:
                raise ValueError(
                    f"QuadraticModel.{where}() got {numel} entries but the model tracks {ref.numel()}; "
                    "pass the same parameter list every time"
                )

    def __repr__(self) -> str:
        return (
            f"QuadraticModel(beta1={self.beta1}, beta2={self.beta2}, eps={self.eps}, step={self._step}, "
            f"curvature_steps={self._hess_step}, anchored={self.is_anchored})"
        )


def _check_hparams(beta1: float, beta2: float, eps: float) -> None:
    """Validate the hyperparameters (``not (a <= x < b)`` also rejects NaN)."""
    if not (0.0 <= beta1 < 1.0):
        raise ValueError(f"beta1 must be in [0, 1), got {beta1!r}")
    if not (0.0 <= beta2 < 1.0):
        raise ValueError(f"beta2 must be in [0, 1), got {beta2!r}")
    if not (math.isfinite(eps) and eps > 0.0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
