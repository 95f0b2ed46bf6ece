"""Bad batches: a regression MLP trained with SGD + momentum on synthetic data, with a few corrupted
batches injected (targets scaled by 1e4, as a broken shard or a logging bug would). The same run,
from the same start, five ways: no clipping, fixed clipping (``fastclip.clip_``), ZClip,
AutoClip (``fastclip.QuantileClip``) and skipping the bad steps on the device
(``fastclip.SkipOnSpike`` through ``fastclip.clipped_step``). Prints each run's final loss on clean
data and, with ``--plot``, draws the training losses. Synthetic data, CPU, seconds.

    python examples/bad_batches.py --steps 400 --plot bad_batches.png
"""

from __future__ import annotations

import argparse
import math

import torch

import fastclip

BAD_STEPS_EVERY = 100  # steps 100, 200, ... get a corrupted batch


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 1))


def batch(step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(64, 16, generator=generator)
    y = torch.sin(x[:, :4].sum(dim=1, keepdim=True)) + 0.1 * x[:, 4:5]
    if step > 0 and step % BAD_STEPS_EVERY == 0:
        y = y * 1e4
    return x, y


def train(name: str, steps: int) -> tuple[list[float], float]:
    """(training loss per step, final loss on clean data) for one way of handling the gradients."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
    clipper = {"zclip": fastclip.ZClip(), "autoclip": fastclip.QuantileClip()}.get(name)
    skip = fastclip.SkipOnSpike(window=64, min_history=32) if name == "skip bad steps" else None
    generator = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        x, y = batch(step, generator)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if name == "no clipping":
            optimizer.step()
        elif name == "fixed clipping":
            fastclip.clip_(model.parameters(), max_norm=1.0)
            optimizer.step()
        elif skip is not None:
            fastclip.clipped_step(optimizer, max_norm=1.0, skip=skip, loss=loss.detach())
        else:
            clipper.clip_(model.parameters())
            optimizer.step()
        losses.append(loss.item())
    clean_x, clean_y = batch(-1, torch.Generator().manual_seed(2))
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(clean_x), clean_y).item()
    if skip is not None:
        print(f"    {name}: skipped {int(skip.skipped_steps)} steps, the last at step {int(skip.last_skipped_step)}")
    return losses, final


def plot(runs: dict[str, list[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for name, losses in runs.items():
        ax.plot([l if math.isfinite(l) else float("nan") for l in losses], label=name, linewidth=1)
    for step in range(BAD_STEPS_EVERY, len(next(iter(runs.values()))), BAD_STEPS_EVERY):
        ax.axvline(step, color="grey", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step (dotted: a corrupted batch)")
    ax.set_ylabel("training loss")
    ax.set_title("SGD + momentum with corrupted batches: no clipping, fixed, adaptive, skipped")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--plot", default=None, help="write the training losses to this PNG")
    args = parser.parse_args()
    runs = {}
    for name in ("no clipping", "fixed clipping", "zclip", "autoclip", "skip bad steps"):
        runs[name], final = train(name, args.steps)
        verdict = "diverged" if not math.isfinite(final) or final > 100 else "survived"
        print(f"{name:>15}: final clean loss {final:.4g} ({verdict})")
    if args.plot:
        plot(runs, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
