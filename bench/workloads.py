"""Gradient workloads for the benchmark: shapes of real models built from their configs in code
(nothing is downloaded), plus synthetic ones that stress size and tensor count."""

from __future__ import annotations

import torch


def gpt2_shapes(n_layer=12, n_embd=768, vocab=50257, n_positions=1024) -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 (124M with the defaults), in ``model.parameters()`` order."""
    shapes = [(vocab, n_embd), (n_positions, n_embd)]
    for _ in range(n_layer):
        shapes += [(n_embd,), (n_embd,), (n_embd, 3 * n_embd), (3 * n_embd,), (n_embd, n_embd), (n_embd,),
                   (n_embd,), (n_embd,), (n_embd, 4 * n_embd), (4 * n_embd,), (4 * n_embd, n_embd), (n_embd,)]
    return shapes + [(n_embd,), (n_embd,)]


# name -> (shapes, dtype). The quick preset keeps every workload under ~300 MiB for 2 CPU cores.
WORKLOADS = {
    "gpt2-124m fp32": (gpt2_shapes(), torch.float32),
    "8 x 8M fp32 (256 MiB)": ([(8 * 2**20,)] * 8, torch.float32),
    "2000 x 8K fp32": ([(8192,)] * 2000, torch.float32),
    "2000 x 8K bf16": ([(8192,)] * 2000, torch.bfloat16),
}


def make_grads(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """Random gradients of these shapes (values near 1e-3, as typical late-training gradients)."""
    generator = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(s, generator=generator, device=device, dtype=torch.float32).mul_(1e-3).to(dtype) for s in shapes]
