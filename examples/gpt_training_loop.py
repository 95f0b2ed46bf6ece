"""A GPT-style decoder training loop with fastclip.clip_ and a ClipMonitor: the shapes of a small
GPT (built from its config in code, no downloads), synthetic token data, AdamW, gradient clipping
at 1.0, and the monitoring a real trainer logs (norm, running mean, clip fraction, spikes, the
largest per-layer norms from the same kernel pass).

    python examples/gpt_training_loop.py --steps 100
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

import fastclip


@dataclasses.dataclass
class GPTConfig:
    vocab: int = 512
    context: int = 64
    layers: int = 2
    heads: int = 4
    width: int = 128


class Block(torch.nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(c.width), torch.nn.LayerNorm(c.width)
        self.attn = torch.nn.MultiheadAttention(c.width, c.heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(c.width, 4 * c.width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * c.width, c.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        causal = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(torch.nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.tokens = torch.nn.Embedding(c.vocab, c.width)
        self.positions = torch.nn.Embedding(c.context, c.width)
        self.blocks = torch.nn.Sequential(*[Block(c) for _ in range(c.layers)])
        self.ln = torch.nn.LayerNorm(c.width)
        self.head = torch.nn.Linear(c.width, c.vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1]))
        return self.head(self.ln(self.blocks(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=20)
    args = parser.parse_args()
    config = GPTConfig()
    torch.manual_seed(0)
    model = GPT(config)
    names = [name for name, _ in model.named_parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = fastclip.ClipMonitor(max_norm=1.0, tensor_norms=True)
    generator = torch.Generator().manual_seed(1)
    # Synthetic "language": each token is the previous one plus a small random step, mod vocab.
    for step in range(args.steps):
        steps = torch.randint(-2, 3, (16, config.context + 1), generator=generator)
        tokens = steps.cumsum(dim=1) % config.vocab
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        monitor.clip_(model.parameters())  # clips like fastclip.clip_ and records
        optimizer.step()
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            top = torch.topk(monitor.last_tensor_norms, 2)
            layers = ", ".join(f"{names[i]} {v:.2f}" for v, i in zip(top.values.tolist(), top.indices.tolist()))
            print(f"step {step + 1:4d}  loss {loss.item():.3f}  grad norm {monitor.norms[-1]:.3f}  "
                  f"mean {monitor.running_mean:.3f}  clipped {monitor.clip_fraction:.0%}  "
                  f"spike {monitor.is_spike}  largest: {layers}")
    print(f"done: {monitor.steps} steps, {len(monitor.spikes)} spikes, {monitor.clip_fraction:.0%} clipped")


if __name__ == "__main__":
    main()
