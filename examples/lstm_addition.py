"""The addition problem (Hochreiter & Schmidhuber 1997; used by Pascanu, Mikolov & Bengio 2013 to
study exploding gradients): an LSTM reads T=100 steps of (value, marker) pairs and must output the
sum of the two marked values. Trained twice from the same start, without and with gradient
clipping (fastclip.ClipMonitor), printing gradient-norm spikes and clip events. Synthetic data.

    python examples/lstm_addition.py --steps 300
"""

from __future__ import annotations

import argparse

import torch

import fastclip


def batch(size: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.rand(size, length, generator=generator)
    markers = torch.zeros(size, length)
    first = torch.randint(0, length // 2, (size,), generator=generator)
    second = torch.randint(length // 2, length, (size,), generator=generator)
    rows = torch.arange(size)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    target = (values * markers).sum(dim=1, keepdim=True)
    return torch.stack([values, markers], dim=2), target


class AdditionLSTM(torch.nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.lstm = torch.nn.LSTM(2, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def train(clip: bool, steps: int, length: int, seed: int) -> fastclip.ClipMonitor:
    torch.manual_seed(seed)
    model = AdditionLSTM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    # max_norm=inf records the norms without clipping: the same statistics for both runs.
    monitor = fastclip.ClipMonitor(max_norm=1.0 if clip else float("inf"))
    generator = torch.Generator().manual_seed(seed + 1)
    print(f"--- {'with' if clip else 'without'} clipping (max_norm={monitor.max_norm})")
    for step in range(steps):
        x, y = batch(32, length, generator)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        monitor.clip_(model.parameters())
        optimizer.step()
        if step % 50 == 49 or step == steps - 1:
            norms = monitor.norms  # reading syncs; done every 50 steps only
            spikes = [s for s in monitor.spikes if s > step - 50]
            print(f"step {step + 1:4d}  loss {loss.item():9.4f}  grad norm {norms[-1]:9.3f}  "
                  f"mean {monitor.running_mean:8.3f}  spikes {spikes}  clipped {monitor.clip_fraction:.0%}")
    return monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--length", type=int, default=100, help="sequence length T")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for clip in (False, True):
        monitor = train(clip, args.steps, args.length, args.seed)
        print(f"{len(monitor.spikes)} spikes, {sum(monitor.clipped)} of {monitor.steps} steps clipped, "
              f"largest norm {max(monitor.norms):.3f}")


if __name__ == "__main__":
    main()
