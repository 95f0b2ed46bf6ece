"""``ClipMonitor``: clip every step and keep the gradient-norm statistics that the
gradient-clipping literature recommends watching (pre-clip norm history, how often clipping
happens, spikes), without a host-device synchronisation until a value is read."""

from __future__ import annotations

import math
import numbers
import types

import torch

from fastclip import api
from fastclip._inputs import TensorOrTensors, parse_max_norm, parse_norm_type
from fastclip.backends.torch_backend import clip_coefficient


class ClipMonitor:
    r"""Clips gradients like :func:`fastclip.clip_` and records each step's total norm.

    Norms are written into a device-resident buffer as they come (no host synchronisation); the
    statistics are computed on the host when first read after a step, which costs one
    synchronisation then.

    Example::

        monitor = fastclip.ClipMonitor(max_norm=1.0)
        for batch in loader:
            loss(model, batch).backward()
            monitor.clip_(model.parameters())
            optimizer.step()
            if step % 100 == 0:
                print(monitor.running_mean, monitor.clip_fraction, monitor.spikes[-5:])

    Args:
        max_norm (float): max norm of the gradients, as in :func:`fastclip.clip_`.
        norm_type (float or str): as in :func:`fastclip.clip_`. Default: 2.0
        window (int): the number of previous steps whose mean norm is the running mean. Default: 100
        spike_factor (float): a step is a spike when its norm exceeds ``spike_factor`` times the
            running mean of the steps before it. Default: 3.0
        tensor_norms (bool): also keep the last step's per-gradient norms, from the same kernel
            pass (no extra read of the gradients). Default: False
        backend (str): as in :func:`fastclip.clip_`. Default: ``"auto"``
    """

    _CHUNK = 4096  # norms per device buffer

    def __init__(
        self,
        max_norm: float,
        norm_type: float | str = 2.0,
        *,
        window: int = 100,
        spike_factor: float = 3.0,
        tensor_norms: bool = False,
        backend: str = "auto",
    ):
        self.max_norm = parse_max_norm(max_norm)
        self.norm_type = parse_norm_type(norm_type)
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if not spike_factor > 0:
            raise ValueError(f"spike_factor must be positive, got {spike_factor!r}")
        self.window = window
        self.spike_factor = float(spike_factor)
        self.track_tensor_norms = bool(tensor_norms)
        self.backend = backend
        self._buffers: list[torch.Tensor] = []
        self._steps = 0
        self._host: list[float] = []  # norms already copied to the host
        self._clipped: list[bool] = []  # per step, judged once
        self._spikes: list[int] = []
        self._last_names: list[str] | None = None
        self.last_tensor_norms: torch.Tensor | None = None
        """The last step's per-gradient norms (float64, on the gradients' device, in the order the
        gradients were given), when ``tensor_norms=True``."""

    def clip_(self, parameters: TensorOrTensors, *, error_if_nonfinite: bool = False,
              overflow_safe: bool = False) -> torch.Tensor:
        """Clip like :func:`fastclip.clip_` and record the norm.

        Args:
            parameters (Iterable[Tensor] or Tensor): as in :func:`fastclip.clip_`, or
                ``model.named_parameters()``: (name, parameter) pairs, whose names
                :meth:`layer_breakdown` then reports.
            error_if_nonfinite (bool): as in :func:`fastclip.clip_`. Default: False
            overflow_safe (bool): as in :func:`fastclip.clip_` (not with ``tensor_norms``).
                Default: False

        Returns:
            The total norm before clipping, a 0-dim tensor on the gradients' device.
        """
        parameters = self._strip_names(parameters)
        if self.track_tensor_norms:
            if error_if_nonfinite or overflow_safe:
                raise ValueError("ClipMonitor(tensor_norms=True) supports neither error_if_nonfinite nor overflow_safe")
            total, self.last_tensor_norms = api.clip_with_tensor_norms_(
                parameters, self.max_norm, self.norm_type, backend=self.backend)
        else:
            total = api.clip_(parameters, self.max_norm, self.norm_type, error_if_nonfinite,
                              overflow_safe=overflow_safe, backend=self.backend)
        self.record(total)
        return total

    def _strip_names(self, parameters):
        """The parameters of (name, parameter) pairs, keeping the names of those with gradients (in
        the order of the per-tensor norms); anything else is passed on as it is."""
        if isinstance(parameters, torch.Tensor):
            return parameters
        is_generator = isinstance(parameters, types.GeneratorType)
        items = list(parameters)
        if not items and is_generator:
            return (p for p in items)  # still a generator: clip_ warns about an empty one, as torch
        if items and all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in items):
            self._last_names = [name for name, p in items if isinstance(p, torch.Tensor) and p.grad is not None]
            return [p for _, p in items]
        return items

    def record(self, total_norm: torch.Tensor | float) -> None:
        """Record a norm computed elsewhere (e.g. by a distributed clip), without a host sync."""
        total_norm = torch.as_tensor(total_norm)
        slot = self._steps % self._CHUNK
        if slot == 0:
            self._buffers.append(torch.empty(self._CHUNK, dtype=torch.float64, device=total_norm.device))
        self._buffers[-1][slot].copy_(total_norm.reshape(()), non_blocking=True)
        self._steps += 1

    @property
    def steps(self) -> int:
        """The number of recorded steps."""
        return self._steps

    def _catch_up(self) -> None:
        """Copies the steps recorded since the last read to the host (one synchronisation) and
        judges each of them once: clipped or not, spike or not."""
        start = len(self._host)
        if start == self._steps:
            return
        first = start // self._CHUNK
        new = torch.cat(self._buffers[first:])[start - first * self._CHUNK:self._steps - first * self._CHUNK]
        self._clipped.extend((clip_coefficient(new, self.max_norm) < 1).tolist())
        self._host.extend(new.tolist())
        for step in range(start, self._steps):
            before = [n for n in self._host[max(0, step - self.window):step] if math.isfinite(n)]
            norm = self._host[step]
            if not math.isfinite(norm) or (before and norm > self.spike_factor * sum(before) / len(before)):
                self._spikes.append(step)

    @property
    def norms(self) -> list[float]:
        """Every recorded pre-clip total norm, oldest first (one synchronisation if there are new
        steps since the last read)."""
        self._catch_up()
        return list(self._host)

    @property
    def clipped(self) -> list[bool]:
        """For each step, whether clipping scaled the gradients (coefficient below 1, computed with
        torch's arithmetic in float64)."""
        self._catch_up()
        return list(self._clipped)

    @property
    def clip_fraction(self) -> float:
        """The fraction of steps that clipped (0.0 before the first step)."""
        self._catch_up()
        return sum(self._clipped) / len(self._clipped) if self._clipped else 0.0

    @property
    def running_mean(self) -> float:
        """The mean norm of the last ``window`` steps (NaN before the first step); non-finite
        norms are left out, so one overflow does not poison the statistic."""
        self._catch_up()
        finite = [n for n in self._host[-self.window:] if math.isfinite(n)]
        return sum(finite) / len(finite) if finite else math.nan

    @property
    def spikes(self) -> list[int]:
        """The steps (0-based) whose norm exceeded ``spike_factor`` times the mean of the up to
        ``window`` finite norms before them, or was not finite."""
        self._catch_up()
        return list(self._spikes)

    @property
    def is_spike(self) -> bool:
        """Whether the last recorded step was a spike."""
        self._catch_up()
        return bool(self._spikes) and self._spikes[-1] == self._steps - 1

    # --- choosing a threshold, and reporting -------------------------------------------------

    _STRATEGIES = {"conservative": 90.0, "moderate": 75.0, "aggressive": 50.0}

    def suggest_max_norm(self, percentile: float | str = 90.0, *, last: int | None = None) -> float:
        """A ``max_norm`` from the recorded pre-clip norms: their ``percentile``-th percentile
        (linear interpolation, as ``numpy.percentile`` and ``torch.quantile``), the usual recipe for
        setting a clipping threshold from a run without clipping (or with a loose one).

        Args:
            percentile (float or str): in (0, 100], or ``"conservative"`` (90: clips about one step in
                ten), ``"moderate"`` (75) or ``"aggressive"`` (50). Default: 90
            last (int, optional): use only the last ``last`` steps. Default: all

        Returns:
            The suggested max_norm (non-finite norms are left out).

        Raises:
            ValueError: a bad percentile, or no finite norm recorded.
        """
        if isinstance(percentile, str):
            if percentile not in self._STRATEGIES:
                raise ValueError(f"percentile must be a number or one of {sorted(self._STRATEGIES)}, got {percentile!r}")
            percentile = self._STRATEGIES[percentile]
        if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        self._catch_up()
        history = self._host if last is None else self._host[-last:]
        finite = [n for n in history if math.isfinite(n)]
        if not finite:
            raise ValueError("no finite gradient norm recorded yet: nothing to suggest from")
        return float(torch.quantile(torch.tensor(finite, dtype=torch.float64), percentile / 100))

    def layer_breakdown(self, top: int | None = None) -> list[tuple[str, float, float]]:
        """Which gradients dominate the last step's norm: (name, norm, share of the total's square)
        for each gradient, largest first. Needs ``tensor_norms=True`` and, for the names,
        ``clip_(model.named_parameters())``; otherwise names are ``"#i"`` (the i-th gradient).
        Reading synchronises once.

        Args:
            top (int, optional): only the ``top`` largest. Default: all

        Raises:
            RuntimeError: no per-tensor norms recorded (``tensor_norms=False``, or no step yet).
        """
        if self.last_tensor_norms is None:
            raise RuntimeError("layer_breakdown needs ClipMonitor(tensor_norms=True) and a clip_ step")
        norms = self.last_tensor_norms.tolist()
        names = self._last_names if self._last_names is not None and len(self._last_names) == len(norms) else [
            f"#{i}" for i in range(len(norms))]
        total = sum(n * n for n in norms if math.isfinite(n))
        rows = sorted(((name, n, n * n / total if total > 0 else math.nan) for name, n in zip(names, norms)),
                      key=lambda row: -row[1] if math.isfinite(row[1]) else -math.inf)
        return rows if top is None else rows[:top]

    def log_dict(self, prefix: str = "grad_norm/") -> dict[str, float]:
        """Scalars for TensorBoard (``writer.add_scalar(k, v, step)`` for each) or W&B
        (``wandb.log(monitor.log_dict())``): the last norm, the running mean, the fraction of steps
        clipped, the number of spikes and whether the last step was one. Reading synchronises once.
        """
        self._catch_up()
        return {
            f"{prefix}last": self._host[-1] if self._host else math.nan,
            f"{prefix}running_mean": self.running_mean,
            f"{prefix}clip_fraction": self.clip_fraction,
            f"{prefix}spikes": float(len(self._spikes)),
            f"{prefix}is_spike": float(self.is_spike),
            f"{prefix}max_norm": self.max_norm,
        }

    def plot(self, path: str) -> str:
        """Draws the recorded norms to a PNG: the norm per step (log scale), the threshold, the
        steps that clipped and the spikes. Needs matplotlib. Returns ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self._catch_up()
        steps = range(len(self._host))
        fig, ax = plt.subplots(figsize=(9, 4.5))
        ax.plot(steps, [n if math.isfinite(n) else math.nan for n in self._host], linewidth=1, label="pre-clip norm")
        ax.axhline(self.max_norm, color="black", linestyle="--", linewidth=1, label=f"max_norm {self.max_norm:g}")
        clipped = [s for s in steps if self._clipped[s]]
        ax.scatter(clipped, [self._host[s] for s in clipped], s=8, color="tab:orange", label="clipped", zorder=3)
        finite_spikes = [s for s in self._spikes if math.isfinite(self._host[s])]
        ax.scatter(finite_spikes, [self._host[s] for s in finite_spikes], s=30, marker="x", color="tab:red",
                   label="spike", zorder=4)
        for s in (s for s in self._spikes if not math.isfinite(self._host[s])):
            ax.axvline(s, color="tab:red", linewidth=0.8, linestyle=":")  # non-finite: no point to draw
        if any(math.isfinite(n) and n > 0 for n in self._host):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("gradient norm")
        ax.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def state_dict(self) -> dict:
        """The recorded history and settings, for a checkpoint (reading synchronises once)."""
        self._catch_up()
        return {"max_norm": self.max_norm, "norm_type": self.norm_type, "window": self.window,
                "spike_factor": self.spike_factor, "norms": list(self._host)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a history saved by :meth:`state_dict` (settings must match); statistics, spikes
        and suggestions continue as if the run had not stopped.

        Raises:
            ValueError: different settings, or a missing key (nothing changes then).
        """
        settings = {"max_norm": self.max_norm, "norm_type": self.norm_type, "window": self.window,
                    "spike_factor": self.spike_factor}
        missing = [k for k in (*settings, "norms") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks {missing}")
        saved = {k: state_dict[k] for k in settings}
        if saved != settings:
            raise ValueError(f"state_dict was saved with {saved}, this ClipMonitor has {settings}")
        self._buffers, self._steps, self._host, self._clipped, self._spikes = [], 0, [], [], []
        for norm in state_dict["norms"]:
            self.record(torch.tensor(float(norm), dtype=torch.float64))
        self._catch_up()
