"""``SkipOnSpike``: decide on the device, without a host synchronisation, whether a training step is
an outlier that should be skipped (OLMo-core's skip-step rule), so the decision can go to a fused
optimizer's ``found_inf`` (see :func:`fastclip.clipped_step`)."""

from __future__ import annotations

import math
import numbers

import torch

from fastclip._device_state import FollowsDevice


def _is_positive_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and value > 0


class _Histories:
    """The last ``window`` finite values of the gradient norm (row 0) and of the loss (row 1), in one
    float64 ring buffer on the device, and the count of values each row ever recorded. Both rows are
    tested and recorded by the same few device ops (a step without a loss uses row 0 alone): on a GPU
    every op is a launch, and testing the two quantities one after the other took 94 ops a step.
    Slots not yet written hold NaN, which the sums skip, so no mask is built. Nothing is read to the
    host."""

    def __init__(self, window: int, device: torch.device):
        self.values = torch.full((2, window), math.nan, dtype=torch.float64, device=device)
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)
        self._positions = torch.arange(window, device=device)

    def is_spike(self, rows: int, x: torch.Tensor, sigma: float, min_history: int) -> torch.Tensor:
        """Per row (of the first ``rows``): True iff ``x - mean > sigma * std`` over the values held,
        with the unbiased standard deviation, once ``min_history`` values are held counting ``x``."""
        values = self.values[:rows]
        held = self.counts[:rows].clamp(max=self.values.shape[1])
        mean = values.nansum(1) / held.clamp(min=1)
        # Two passes (mean, then squared deviations) in float64: no cancellation for norms whose
        # spread is small against their size.
        std = ((values - mean.unsqueeze(1)).square().nansum(1) / (held - 1).clamp(min=1)).sqrt()
        return (held >= min_history - 1) & (x - mean > sigma * std)

    def record(self, rows: int, x: torch.Tensor, finite: torch.Tensor) -> None:
        """Append each row's value where it is finite (a NaN would poison every later mean),
        overwriting the oldest value once the window is full."""
        values, counts = self.values[:rows], self.counts[:rows]
        slot = (counts % self.values.shape[1]).unsqueeze(1)
        written = (self._positions == slot) & finite.unsqueeze(1)
        values.copy_(torch.where(written, x.unsqueeze(1), values))
        counts += finite

    def tensors(self, row: int) -> dict[str, torch.Tensor]:
        """Copies of one row's state, as saved since the first release: slots not yet written hold 0."""
        return {"values": self.values[row].nan_to_num(nan=0.0), "count": self.counts[row].clone()}

    def load(self, row: int, values: torch.Tensor, count: torch.Tensor) -> None:
        if values.shape != self.values[row].shape:
            raise ValueError(f"state_dict holds a window of {values.numel()} values, this SkipOnSpike has "
                             f"{self.values.shape[1]}")
        values = values.to(self.values.device, torch.float64)
        count = count.to(self.counts.device)
        written = self._positions < count.clamp(max=self.values.shape[1])
        self.values[row].copy_(torch.where(written, values, math.nan))
        self.counts[row].copy_(count)


class SkipOnSpike(FollowsDevice):
    r"""Skips a step whose gradient norm (or loss) is an outlier against the recent ones, or is not
    finite, deciding on the device so that no step waits for the host.

    The rule is OLMo-core's skip-step optimizer's (``SkipStepAdamW``): keep the last ``window``
    values, and once ``min_history`` are held counting the current one, skip iff
    ``value - mean > sigma * std`` over the values held before it (unbiased std; one-sided, so an
    unusually *small* norm never skips; equality proceeds). The gradient norm and, when given, the
    loss are tested alike; either one skips. A skipped step's values stay in the window, so a spike
    raises later thresholds, as in OLMo-core. Two things differ from OLMo-core, both on purpose: a
    non-finite norm or loss always skips (OLMo-core's comparisons are False for NaN, so it would step),
    and it is not recorded (one NaN in the window would make every later mean NaN and switch the rule
    off for ``window`` steps).

    The decision is a 0-dim bool tensor on the norm's device. :func:`fastclip.clipped_step` hands it
    to a fused optimizer as ``found_inf``, which makes the whole update a no-op on the device:
    parameters, moments and step count stay exactly as if ``step()`` had not been called.

    Example::

        skip = fastclip.SkipOnSpike()
        optimizer = torch.optim.AdamW(model.parameters(), fused=True)
        for batch in loader:
            loss = model(batch).mean()
            loss.backward()
            fastclip.clipped_step(optimizer, max_norm=1.0, skip=skip, loss=loss.detach())
            optimizer.zero_grad()
        print(int(skip.skipped_steps))  # reading it synchronises; recording never does

    Megatron-LM's rule, ``grad_norm_skip_threshold``, is ``norm_threshold``: skip iff the norm is above
    it (strict). It can be combined with the statistical rule or used alone (``sigma=None``).

    Args:
        window (int): how many recent values the mean and std are taken over. Default: 128
        sigma (float or None): how many standard deviations above the mean a value must be to skip;
            None turns the statistical rule off. Default: 6.0
        min_history (int): the rule acts once this many values are held, counting the current one
            (OLMo-core: ``max(20, window // 2)``). Default: 64
        norm_threshold (float, optional): also skip iff the norm is above this. Default: None

    Attributes:
        steps (Tensor): steps decided so far (0-dim int64, on the device).
        skipped_steps (Tensor): of those, how many were skipped.
        last_skipped_step (Tensor): index (from 0) of the last skipped step, -1 if none.
    """

    def __init__(self, window: int = 128, sigma: float | None = 6.0, min_history: int = 64,
                 norm_threshold: float | None = None):
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an int >= 2, got {window!r}")
        if isinstance(min_history, bool) or not isinstance(min_history, int) or not 3 <= min_history <= window + 1:
            # 3: the standard deviation needs two values held before the current one.
            raise ValueError(f"min_history must be an int in [3, window + 1] = [3, {window + 1}], got {min_history!r}")
        if sigma is not None and not _is_positive_number(sigma):
            raise ValueError(f"sigma must be a finite number > 0 or None, got {sigma!r}")
        if norm_threshold is not None and not _is_positive_number(norm_threshold):
            raise ValueError(f"norm_threshold must be a finite number > 0 or None, got {norm_threshold!r}")
        self.window, self.min_history = window, min_history
        self.sigma = None if sigma is None else float(sigma)
        self.norm_threshold = None if norm_threshold is None else float(norm_threshold)
        self._device = torch.device("cpu")
        self._allocate(self._device)

    def _allocate(self, device: torch.device) -> None:
        self._histories = _Histories(self.window, device)
        self.steps = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.last_skipped_step = torch.full((), -1, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, total_norm: torch.Tensor, loss: torch.Tensor | None = None) -> torch.Tensor:
        """Decide whether this step is skipped, and record its values.

        Args:
            total_norm (Tensor): the step's gradient norm before clipping (0-dim; unscaled, when a
                ``GradScaler`` is in use).
            loss (Tensor, optional): the step's loss (0-dim), tested by the same rule.

        Returns:
            A 0-dim bool tensor on ``total_norm``'s device: True to skip the step.
        """
        if not isinstance(total_norm, torch.Tensor) or total_norm.numel() != 1:
            raise TypeError(f"total_norm must be a one-element tensor, got {total_norm!r}")
        if loss is not None and (not isinstance(loss, torch.Tensor) or loss.numel() != 1):
            raise TypeError(f"loss must be a one-element tensor or None, got {loss!r}")
        self._follow(total_norm.device)
        norm = total_norm.detach().reshape(()).to(torch.float64)
        if loss is None:
            rows, x = 1, norm.reshape(1)
        else:
            rows, x = 2, torch.stack([norm, loss.detach().reshape(()).to(self._device, torch.float64)])
        # x - x is 0 for a finite x and NaN for +-inf or NaN: two ops, where isfinite() is four.
        difference = x - x
        finite, skip_each = difference == 0, difference != 0
        if self.sigma is not None:
            skip_each |= self._histories.is_spike(rows, x, self.sigma, self.min_history)
        skip = skip_each.any()
        if self.norm_threshold is not None:
            skip |= norm > self.norm_threshold
        self._histories.record(rows, x, finite)
        self.skipped_steps += skip
        self.last_skipped_step.copy_(torch.where(skip, self.steps, self.last_skipped_step))
        self.steps += 1
        return skip

    def _config(self) -> dict:
        return {"window": self.window, "sigma": self.sigma, "min_history": self.min_history,
                "norm_threshold": self.norm_threshold}

    def state_dict(self) -> dict:
        """The configuration and the device state (copies), for a checkpoint: a run resumed from it
        decides the next steps exactly as the uninterrupted run would."""
        return {
            **self._config(),
            **{f"norms.{k}": v for k, v in self._histories.tensors(0).items()},
            **{f"losses.{k}": v for k, v in self._histories.tensors(1).items()},
            "steps": self.steps.clone(), "skipped_steps": self.skipped_steps.clone(),
            "last_skipped_step": self.last_skipped_step.clone(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` saved. The configuration must match this object's.

        Raises:
            ValueError: the configuration differs, or a key is missing (nothing is changed then).
        """
        config = self._config()
        missing = [k for k in self.state_dict() if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks {missing}")
        saved = {k: state_dict[k] for k in config}
        if saved != config:
            raise ValueError(f"state_dict was saved with {saved}, this SkipOnSpike has {config}")
        for row, name in enumerate(("norms", "losses")):
            self._histories.load(row, state_dict[f"{name}.values"], state_dict[f"{name}.count"])
        self.steps.copy_(state_dict["steps"])
        self.skipped_steps.copy_(state_dict["skipped_steps"])
        self.last_skipped_step.copy_(state_dict["last_skipped_step"])
