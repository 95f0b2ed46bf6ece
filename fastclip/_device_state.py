"""State that lives on the gradients' device but is created before that device is known."""

from __future__ import annotations

import torch


class FollowsDevice:
    """Mixin for objects whose state (``_allocate(device)``, ``state_dict``/``load_state_dict``) is
    first allocated on the CPU: the first step on another device moves it there, a copy queued on the
    stream, with no host wait. ``_device`` is where the state is now."""

    _device: torch.device

    def _allocate(self, device: torch.device) -> None:
        raise NotImplementedError

    def _follow(self, device: torch.device) -> None:
        if device != self._device:
            state = self.state_dict()
            self._device = device
            self._allocate(device)
            self.load_state_dict(state)
