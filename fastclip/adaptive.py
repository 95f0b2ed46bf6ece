"""Adaptive clipping thresholds with their state on the device: the threshold of each step is computed
from the history of gradient norms by tensor operations, so a step never waits for the host.

Each class follows one reference implementation (``../shared/CLIPPING-METHODS.md`` gives their exact
semantics and where sources disagree): :class:`RunningAverageClip` (Pascanu et al. 2013, as the
seed tutorial implements it), :class:`ZClip` (bluorion-com/ZClip, PyPI ``zclip`` 1.0.0),
:class:`QuantileClip` (AutoClip; PyPI ``autoclip`` 0.2.1 and the paper) and :class:`AdaGC` (per-tensor
thresholds; pytorch_optimizer 4.1.0). Every one computes the L2 norm (AdaGC: also each gradient's)
with fastclip's fused kernel (one read), its threshold and coefficient in float64 on the device, and
multiplies the gradients by the coefficient (AdaGC: each gradient by its own) with the backend's
``scale_by_``: one fused pass that, decided on the device, neither reads nor writes a gradient whose
coefficient is 1, so a step that does not clip costs one read. The arithmetic is torch's ``mul_`` by a
0-dim float64 tensor. ``state_dict()``/``load_state_dict()`` round-trip mid-run.
"""

from __future__ import annotations

import math
import numbers

import torch

from fastclip import api
from fastclip._device_state import FollowsDevice
from fastclip._dispatch import select_backend
from fastclip._inputs import TensorOrTensors, as_tensor_list, check_gradients, grads_of, summarize


# Scalar state is kept in one-element vectors, not 0-dim tensors: torch.compile (2.13) drops an
# in-place write to a 0-dim float64 tensor held outside the compiled function (the next call reads
# the old value), and handles a one-element vector correctly. The coefficient goes out as 0-dim.
_SCALAR = (1,)


def _positive(value, name: str, *, allow_none: bool = False, upper: float = math.inf):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < value < upper):
        bound = "" if upper == math.inf else f" and < {upper}"
        raise ValueError(f"{name} must be a number > 0{bound}, got {value!r}")
    return float(value)


class _AdaptiveClip(FollowsDevice):
    """The step common to every method: norm, threshold (subclass), coefficient, scaling."""

    _STATE: tuple[str, ...] = ()  # names of the device tensors that make up the state

    def __init__(self, backend: str):
        self.backend = backend
        self.last_coefficient: torch.Tensor | None = None  # the last step's, on the device
        self._device = torch.device("cpu")
        self._allocate(self._device)

    def _coefficient(self, norm: torch.Tensor) -> torch.Tensor:
        """Updates the state with this step's norm (float64, 0-dim) and returns the coefficient."""
        raise NotImplementedError

    @torch.no_grad()
    def clip_(self, parameters: TensorOrTensors) -> torch.Tensor:
        """Clip the gradients of ``parameters`` in place by this step's adaptive threshold.

        Args:
            parameters (Iterable[Tensor] or Tensor): tensors whose ``.grad`` will be clipped.

        Returns:
            Total L2 norm of the gradients before clipping, as ``clip_grad_norm_`` returns it.
        """
        grads = self._checked_grads(parameters)
        if not grads:
            return torch.tensor(0.0)
        norm = api.get_total_norm(grads, 2.0, backend=self.backend)
        self._follow(norm.device)
        self.last_coefficient = self._coefficient(norm.detach().to(torch.float64).reshape(_SCALAR)).reshape(())
        self._scale_by(grads, self.last_coefficient)
        return norm

    def _checked_grads(self, parameters: TensorOrTensors) -> list[torch.Tensor]:
        """The gradients of ``parameters``, refused before anything (state included) changes if they
        cannot be scaled in place; also picks the backend that will scale them."""
        grads = grads_of(as_tensor_list(parameters, "parameters", warn_empty_generator=True))
        summary = summarize(grads)
        check_gradients(grads, summary, "parameters", written=True)
        if grads:
            self._scaler = select_backend(self.backend, grads, None, summary, operation="scale_by_")
        return grads

    def _scale_by(self, grads: list[torch.Tensor], coefficients: torch.Tensor) -> None:
        """Multiply ``grads`` by ``coefficients`` with the backend :meth:`_checked_grads` picked."""
        self._scaler.scale_by_(grads, coefficients)

    def _config(self) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The configuration and copies of the device state."""
        return {**self._config(), **{name: getattr(self, name).clone() for name in self._STATE}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` saved; the configuration must match this object's.

        Raises:
            ValueError: a different configuration or a missing key (nothing changes then).
        """
        missing = [k for k in (*self._config(), *self._STATE) if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks {missing}")
        saved = {k: state_dict[k] for k in self._config()}
        if saved != self._config():
            raise ValueError(f"state_dict was saved with {saved}, this {type(self).__name__} has {self._config()}")
        for name in self._STATE:
            if getattr(self, name).shape != state_dict[name].shape:
                raise ValueError(f"state_dict's {name} has shape {tuple(state_dict[name].shape)}")
        for name in self._STATE:
            getattr(self, name).copy_(state_dict[name])


class RunningAverageClip(_AdaptiveClip):
    r"""Clips to a multiple of the running average of the gradient norm (Pascanu et al. 2013, as the
    seed tutorial implements it): ``ema = n`` on the first step, else ``alpha * ema + (1 - alpha) * n``
    with the raw norm, updated before the threshold; ``threshold = multiplier * ema``; the gradients
    are scaled by ``threshold / n`` when ``n > threshold`` (so the first step never clips).

    Args:
        alpha (float): weight of the previous average. Default: 0.95
        multiplier (float): the threshold as a multiple of the average. Default: 3.0
        eps (float): added to the norm in the coefficient, ``threshold / (n + eps)``; torch's
            ``clip_grad_norm_`` uses 1e-6. Default: 0.0 (the exact ratio, as the tutorial)
        backend (str): as in :func:`fastclip.clip_`, for the norm. Default: ``"auto"``
    """

    _STATE = ("average", "steps")

    def __init__(self, alpha: float = 0.95, multiplier: float = 3.0, eps: float = 0.0, backend: str = "auto"):
        self.alpha = _positive(alpha, "alpha", upper=1.0)
        self.multiplier = _positive(multiplier, "multiplier")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < math.inf:
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        self.eps = float(eps)
        super().__init__(backend)

    def _allocate(self, device):
        self.average = torch.zeros(_SCALAR, dtype=torch.float64, device=device)
        self.steps = torch.zeros(_SCALAR, dtype=torch.int64, device=device)

    def _config(self):
        return {"alpha": self.alpha, "multiplier": self.multiplier, "eps": self.eps}

    def _coefficient(self, norm):
        average = torch.where(self.steps == 0, norm, self.alpha * self.average + (1 - self.alpha) * norm)
        threshold = self.multiplier * average
        self.average.copy_(average)
        self.steps += 1
        return torch.where(norm > threshold, threshold / (norm + self.eps), 1.0)


class ZClip(_AdaptiveClip):
    r"""ZClip (bluorion-com/ZClip, PyPI ``zclip`` 1.0.0): z-score spike detection on an EMA of the
    gradient norm's mean and variance.

    Warm-up: the first ``warmup_steps`` norms are collected and clipped at ``max_grad_norm`` as
    ``clip_grad_norm_`` would; after the last of them the mean and population variance are set from
    them. Then, with ``std = sqrt(var)`` and ``z = (n - mean) / (std + eps)``, a step is a spike when
    ``z > z_thresh``; its threshold is ``(mean + z_thresh * std / (z / z_thresh)) * clip_factor``
    (``"adaptive_scaling"``; the reference multiplies the whole threshold by ``clip_factor``, though its
    docs say only the std term) or ``mean`` (``"mean"``). The effective threshold is that (or the norm,
    when no spike) capped at ``max_grad_norm``, and the gradients are scaled by
    ``effective / (n + 1e-6)`` when ``n > effective``. The EMA then takes the spike's threshold (before
    the cap) or the norm: ``mean = alpha * mean + (1 - alpha) * x``, ``var = alpha * var +
    (1 - alpha) * (x - mean)^2`` with the updated mean (unless ``skip_update_on_spike``).

    Args:
        alpha (float): EMA weight of the past. Default: 0.97
        z_thresh (float): z-score above which a norm is a spike. Default: 2.5
        max_grad_norm (float or None): the hard cap, on by default as in the reference. Default: 1.0
        eps (float): added to the std in the z-score. Default: 1e-6
        warmup_steps (int): norms collected before the EMA starts. Default: 25
        clip_option (str): ``"adaptive_scaling"`` or ``"mean"``. Default: ``"adaptive_scaling"``
        clip_factor (float): multiplies the adaptive threshold. Default: 1.0
        skip_update_on_spike (bool): leave the EMA unchanged on spikes. Default: False
        backend (str): as in :func:`fastclip.clip_`, for the norm. Default: ``"auto"``
    """

    _STATE = ("steps", "warmup_norms", "mean", "var")

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: float | None = 1.0,
                 eps: float = 1e-6, warmup_steps: int = 25, clip_option: str = "adaptive_scaling",
                 clip_factor: float = 1.0, skip_update_on_spike: bool = False, backend: str = "auto"):
        self.alpha = _positive(alpha, "alpha", upper=1.0)
        self.z_thresh = _positive(z_thresh, "z_thresh")
        self.max_grad_norm = _positive(max_grad_norm, "max_grad_norm", allow_none=True)
        self.eps = _positive(eps, "eps")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        if clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(f"clip_option must be 'adaptive_scaling' or 'mean', got {clip_option!r}")
        self.clip_option = clip_option
        self.clip_factor = _positive(clip_factor, "clip_factor")
        self.skip_update_on_spike = bool(skip_update_on_spike)
        super().__init__(backend)

    def _allocate(self, device):
        self.steps = torch.zeros(_SCALAR, dtype=torch.int64, device=device)
        self.warmup_norms = torch.zeros(self.warmup_steps, dtype=torch.float64, device=device)
        self.mean = torch.zeros(_SCALAR, dtype=torch.float64, device=device)
        self.var = torch.zeros(_SCALAR, dtype=torch.float64, device=device)

    def _config(self):
        return {"alpha": self.alpha, "z_thresh": self.z_thresh, "max_grad_norm": self.max_grad_norm, "eps": self.eps,
                "warmup_steps": self.warmup_steps, "clip_option": self.clip_option, "clip_factor": self.clip_factor,
                "skip_update_on_spike": self.skip_update_on_spike}

    def _coefficient(self, norm):
        warming_up = self.steps < self.warmup_steps
        # Warm-up: record the norm; after the last warm-up norm, the mean and population variance.
        slot = self.steps.clamp(max=self.warmup_steps - 1)
        kept = torch.where(warming_up, norm, self.warmup_norms.index_select(0, slot))
        self.warmup_norms.index_copy_(0, slot, kept)
        # Sums in the reference's order (Python's sum, left to right): a CPU cumsum is sequential.
        initial_mean = self.warmup_norms.cumsum(0)[-1:] / self.warmup_steps
        initial_var = (self.warmup_norms - initial_mean).square().cumsum(0)[-1:] / self.warmup_steps
        just_warmed = self.steps == self.warmup_steps - 1

        std = self.var.sqrt()
        z = (norm - self.mean) / (std + self.eps)
        spike = ~warming_up & (z > self.z_thresh)
        if self.clip_option == "adaptive_scaling":
            spike_threshold = (self.mean + self.z_thresh * std / (z / self.z_thresh)) * self.clip_factor
        else:
            spike_threshold = self.mean
        adaptive = torch.where(spike, spike_threshold, norm)
        effective = adaptive if self.max_grad_norm is None else adaptive.clamp(max=self.max_grad_norm)
        coefficient = torch.where(norm > effective, effective / (norm + 1e-6), 1.0)
        if self.max_grad_norm is not None:  # warm-up: clip_grad_norm_(max_grad_norm)'s coefficient
            warmup_coefficient = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        else:
            warmup_coefficient = torch.ones_like(norm)
        coefficient = torch.where(warming_up, warmup_coefficient, coefficient)

        x = adaptive
        new_mean = self.alpha * self.mean + (1 - self.alpha) * x
        new_var = self.alpha * self.var + (1 - self.alpha) * (x - new_mean).square()
        update = ~warming_up & ~(spike & self.skip_update_on_spike)
        self.mean.copy_(torch.where(just_warmed, initial_mean, torch.where(update, new_mean, self.mean)))
        self.var.copy_(torch.where(just_warmed, initial_var, torch.where(update, new_var, self.var)))
        self.steps += 1
        return coefficient


class QuantileClip(_AdaptiveClip):
    r"""AutoClip (Seetharaman et al. 2020): clips at a quantile of the history of gradient norms, kept
    in a device ring buffer of the last ``history`` norms.

    Defaults follow PyPI ``autoclip`` 0.2.1's ``QuantileClip`` with ``global_threshold=True``: the
    0.9 quantile of the last 1,000 norms, taken *before* the current norm is added (so the first step
    never clips). ``include_current=True`` with ``quantile=0.1`` and a history long enough to hold the
    whole run is the paper's version. The quantile interpolates linearly, as ``torch.quantile`` (and
    numpy's default) do; the gradients are scaled by ``min(1, threshold / (n + 1e-6))``, as
    ``clip_grad_norm_(threshold)`` scales them. autoclip's per-tensor thresholds
    (``global_threshold=False``) are not implemented.

    Args:
        quantile (float): in (0, 1). Default: 0.9
        history (int): how many recent norms are kept. Default: 1000
        include_current (bool): add the current norm before taking the quantile. Default: False
        backend (str): as in :func:`fastclip.clip_`, for the norm. Default: ``"auto"``
    """

    _STATE = ("norms", "count")

    def __init__(self, quantile: float = 0.9, history: int = 1000, include_current: bool = False,
                 backend: str = "auto"):
        self.quantile = _positive(quantile, "quantile", upper=1.0)
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be an int >= 1, got {history!r}")
        self.history = history
        self.include_current = bool(include_current)
        super().__init__(backend)

    def _allocate(self, device):
        self.norms = torch.zeros(self.history, dtype=torch.float64, device=device)
        self.count = torch.zeros(_SCALAR, dtype=torch.int64, device=device)
        self._positions = torch.arange(self.history, device=device)

    def _config(self):
        return {"quantile": self.quantile, "history": self.history, "include_current": self.include_current}

    def _record(self, norm):
        self.norms.index_copy_(0, self.count % self.history, norm)
        self.count += 1

    def _threshold(self):
        """torch.quantile's linear interpolation over the norms held, with no host read: unused slots
        sort last as +inf, and the two ranks are gathered by device indices."""
        held = self.count.clamp(max=self.history)
        ordered = torch.where(self._positions < held, self.norms, math.inf).sort().values
        rank = self.quantile * (held - 1).clamp(min=0).to(torch.float64)
        below, above = rank.floor(), rank.ceil()
        low = ordered.gather(0, below.to(torch.int64))
        high = ordered.gather(0, above.to(torch.int64))
        return torch.where(held > 0, torch.lerp(low, high, rank - below), math.inf)

    def _coefficient(self, norm):
        if self.include_current:
            self._record(norm)
        threshold = self._threshold()
        if not self.include_current:
            self._record(norm)
        return (threshold / (norm + 1e-6)).clamp(max=1.0)


class AdaGC(_AdaptiveClip):
    r"""AdaGC (arXiv 2502.11034), as pytorch_optimizer 4.1.0 defines it, as a clipper: each gradient
    keeps its own threshold ``gamma``, an EMA of its clipped norms.

    Warm-up (steps 1 .. ``warmup_steps - 1``): every gradient is scaled by ``min(1, lambda_abs /
    (N + eps))``, with N the global norm, and ``gamma`` is the smallest of its clipped norms so far.
    Then each gradient is scaled by ``h = min(1, lambda_rel * max(gamma, eps) / max(||g||, eps))`` and
    ``gamma = beta * gamma + (1 - beta) * ||h g||``. Two choices differ from the reference, both
    within rounding: the arithmetic is float64 (the reference's is the gradients' dtype), and
    ``||h g||`` is taken as ``h * ||g||`` rather than by reading the scaled gradient again. The
    authors' Megatron patch differs more (``1.04 / 0.99``, warm-up through step 100, eps 1e-6, the
    threshold fed to the EMA): pass those values to approach it.

    Args:
        lambda_rel (float): relative threshold. Default: 1.05
        beta (float): EMA weight of the past. Default: 0.98
        lambda_abs (float): the global-norm threshold of the warm-up. Default: 1.0
        warmup_steps (int): the warm-up runs while the step (from 1) is below it. Default: 100
        eps (float): floor of the norms in the ratio. Default: 1e-8
        backend (str): as in :func:`fastclip.clip_`, for the norms. Default: ``"auto"``
    """

    _STATE = ("steps", "gamma")

    def __init__(self, lambda_rel: float = 1.05, beta: float = 0.98, lambda_abs: float = 1.0, warmup_steps: int = 100,
                 eps: float = 1e-8, backend: str = "auto"):
        self.lambda_rel = _positive(lambda_rel, "lambda_rel")
        self.beta = _positive(beta, "beta", upper=1.0)
        self.lambda_abs = _positive(lambda_abs, "lambda_abs")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.eps = _positive(eps, "eps")
        self.num_tensors: int | None = None  # fixed by the first step: gamma has one entry per gradient
        super().__init__(backend)

    def _allocate(self, device):
        self.steps = torch.zeros(_SCALAR, dtype=torch.int64, device=device)
        self.gamma = torch.zeros(self.num_tensors or 0, dtype=torch.float64, device=device)

    def _config(self):
        return {"lambda_rel": self.lambda_rel, "beta": self.beta, "lambda_abs": self.lambda_abs,
                "warmup_steps": self.warmup_steps, "eps": self.eps, "num_tensors": self.num_tensors}

    @torch.no_grad()
    def clip_(self, parameters: TensorOrTensors) -> torch.Tensor:
        """Clip each gradient of ``parameters`` in place by its own adaptive threshold.

        Args:
            parameters (Iterable[Tensor] or Tensor): tensors whose ``.grad`` will be clipped, the same
                ones, in the same order, every step.

        Returns:
            Total L2 norm of the gradients before clipping.

        Raises:
            ValueError: a different number of gradients than on the first step.
        """
        grads = self._checked_grads(parameters)
        if not grads:
            return torch.tensor(0.0)
        if self.num_tensors is None:
            self.num_tensors = len(grads)
            self._allocate(self._device)
        elif len(grads) != self.num_tensors:
            raise ValueError(f"AdaGC keeps one threshold per gradient: {self.num_tensors} on its first step, "
                             f"{len(grads)} now")
        # One fused read for the total and every gradient's norm, writing nothing: a NaN or inf in one
        # gradient must reach only that gradient's coefficient (after warm-up), as in the reference.
        total, norms = api.get_tensor_norms(grads, 2.0, backend=self.backend)
        self._follow(total.device)
        coefficients = self._coefficients(total.detach().to(torch.float64), norms.to(self._device))
        self._scale_by(grads, coefficients)
        self.last_coefficient = coefficients
        return total

    def load_state_dict(self, state_dict: dict) -> None:
        """As for every clipper; a new AdaGC takes the number of gradients from the state.

        Raises:
            ValueError: a different configuration or number of gradients, or a missing key
                (nothing changes then).
        """
        count = state_dict.get("num_tensors")
        if self.num_tensors is None and count is not None:
            # Checked on a new AdaGC of that size first, so that a refused state changes nothing here.
            candidate = AdaGC(self.lambda_rel, self.beta, self.lambda_abs, self.warmup_steps, self.eps, self.backend)
            candidate.num_tensors = count
            candidate._allocate(self._device)
            candidate.load_state_dict(state_dict)
            self.num_tensors = count
            self._allocate(self._device)
        super().load_state_dict(state_dict)

    def _coefficients(self, total, norms):
        step = self.steps + 1  # this step, counted from 1 as the reference counts it
        warming_up = step < self.warmup_steps
        warmup_h = (self.lambda_abs / (total + self.eps)).clamp(max=1.0).expand_as(norms)
        relative_h = (self.lambda_rel * self.gamma.clamp(min=self.eps) / norms.clamp(min=self.eps)).clamp(max=1.0)
        h = torch.where(warming_up, warmup_h, relative_h)
        clipped = h * norms
        warmup_gamma = torch.where(step == 1, clipped, torch.minimum(self.gamma, clipped))
        ema_gamma = self.beta * self.gamma + (1 - self.beta) * clipped
        self.gamma.copy_(torch.where(warming_up, warmup_gamma, ema_gamma))
        self.steps += 1
        return h
