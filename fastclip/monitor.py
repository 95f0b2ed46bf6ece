"""``ClipMonitor``: clip every step and keep the gradient-norm statistics that the
gradient-clipping literature recommends watching (pre-clip norm history, how often clipping
happens, spikes), without a host-device synchronisation until a value is read."""

from __future__ import annotations

import math

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
        self.last_tensor_norms: torch.Tensor | None = None
        """The last step's per-gradient norms (float64, on the gradients' device, in the order the
        gradients were given), when ``tensor_norms=True``."""

    def clip_(self, parameters: TensorOrTensors, *, error_if_nonfinite: bool = False,
              overflow_safe: bool = False) -> torch.Tensor:
        """Clip like :func:`fastclip.clip_` and record the norm.

        Args:
            parameters (Iterable[Tensor] or Tensor): as in :func:`fastclip.clip_`.
            error_if_nonfinite (bool): as in :func:`fastclip.clip_`. Default: False
            overflow_safe (bool): as in :func:`fastclip.clip_` (not with ``tensor_norms``).
                Default: False

        Returns:
            The total norm before clipping, a 0-dim tensor on the gradients' device.
        """
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
