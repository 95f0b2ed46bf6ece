"""Gradient workloads for the benchmark: parameter shapes of real models built from their configs in
code (nothing is downloaded), sweeps over total size, tensor count and dtype, and the presets that
group them.

A workload is a list of (shape, dtype) pairs, in ``model.parameters()`` order.
"""

from __future__ import annotations

import dataclasses

import torch

MIB = 2**20
Spec = list[tuple[tuple[int, ...], torch.dtype]]


def gpt2_shapes(n_layer=12, n_embd=768, vocab=50257, n_positions=1024) -> list[tuple[int, ...]]:
    """GPT-2 (124M with the defaults): embeddings, then per block ln, attention, ln, MLP."""
    shapes = [(vocab, n_embd), (n_positions, n_embd)]
    for _ in range(n_layer):
        shapes += [(n_embd,), (n_embd,), (n_embd, 3 * n_embd), (3 * n_embd,), (n_embd, n_embd), (n_embd,),
                   (n_embd,), (n_embd,), (n_embd, 4 * n_embd), (4 * n_embd,), (4 * n_embd, n_embd), (n_embd,)]
    return shapes + [(n_embd,), (n_embd,)]


def llama_shapes(n_layer=32, dim=4096, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab=32000) -> list[tuple[int, ...]]:
    """A LLaMA-style decoder (7B with the defaults): untied embedding and output, RMSNorm weights,
    q/k/v/o projections (grouped-query k/v when n_kv_heads < n_heads) and a SwiGLU MLP, no biases."""
    kv_dim = dim // n_heads * n_kv_heads
    shapes = [(vocab, dim)]
    for _ in range(n_layer):
        shapes += [(dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, dim), (ffn_dim, dim), (ffn_dim, dim), (dim, ffn_dim),
                   (dim,), (dim,)]
    return shapes + [(dim,), (vocab, dim)]


def resnet50_shapes(num_classes=1000) -> list[tuple[int, ...]]:
    """ResNet-50 (torchvision layout): conv weights, batch-norm weight and bias, the classifier."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out_channels = 4 * width
            shapes += [(width, in_channels, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (out_channels, width, 1, 1), (out_channels,), (out_channels,)]
            if block == 0:  # the projection shortcut
                shapes += [(out_channels, in_channels, 1, 1), (out_channels,), (out_channels,)]
            in_channels = out_channels
    return shapes + [(num_classes, 2048), (num_classes,)]


def lstm_lm_shapes(vocab=33278, embedding=650, hidden=650, layers=2) -> list[tuple[int, ...]]:
    """The medium word-level LSTM language model (Zaremba et al.; PyTorch's word_language_model
    example on WikiText-2): embedding, nn.LSTM's four tensors per layer, the decoder."""
    shapes = [(vocab, embedding)]
    for layer in range(layers):
        inputs = embedding if layer == 0 else hidden
        shapes += [(4 * hidden, inputs), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,)]
    return shapes + [(vocab, hidden), (vocab,)]


def with_dtype(shapes: list[tuple[int, ...]], dtype: torch.dtype | str) -> Spec:
    """Shapes with a dtype; "mixed" gives bf16 matrices and fp32 vectors (norms, biases), as in
    mixed-precision training that keeps small parameters in fp32."""
    if dtype == "mixed":
        return [(s, torch.bfloat16 if len(s) > 1 else torch.float32) for s in shapes]
    return [(s, dtype) for s in shapes]


def equal_split(total_bytes: int, count: int, dtype: torch.dtype | str) -> Spec:
    """`count` 1-d tensors sharing `total_bytes`; "mixed" alternates bf16 and fp32 tensors."""
    dtypes = [torch.bfloat16, torch.float32] if dtype == "mixed" else [dtype]
    average_size = sum(d.itemsize for d in dtypes) / len(dtypes)
    numel = max(1, int(total_bytes / average_size / count))
    return [((numel,), dtypes[i % len(dtypes)]) for i in range(count)]


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    spec: Spec
    group: str  # "model", "target", "count sweep", "size sweep", "allocation order"
    dtype_label: str  # for the plot's lines
    # Gradients allocated last to first, as backward makes them: small ones then lie at descending
    # addresses down the list, which hardware prefetchers do not follow as they follow ascending ones.
    backward_order: bool = False

    @property
    def nbytes(self) -> int:
        return sum(torch.Size(s).numel() * d.itemsize for s, d in self.spec)

    @property
    def count(self) -> int:
        return len(self.spec)


def _sweeps(dtypes, counts, count_total, sizes, size_count) -> list[Workload]:
    out = []
    for dtype in dtypes:
        label = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        for count in counts:
            out.append(Workload(f"{count} tensors, {count_total // MIB} MiB {label}", equal_split(count_total, count, dtype),
                                "count sweep", label))
        for size in sizes:
            out.append(Workload(f"{size_count} tensors, {size // MIB} MiB {label}", equal_split(size, size_count, dtype),
                                "size sweep", label))
    return out


# The CPU targets are read off these (see report.TARGETS).
TARGET_WORKLOADS = [
    Workload("8 x 8M fp32 (256 MiB)", with_dtype([(8 * MIB,)] * 8, torch.float32), "target", "float32"),
    Workload("2000 x 8K fp32", with_dtype([(8192,)] * 2000, torch.float32), "target", "float32"),
]


def preset(name: str, device: str) -> list[Workload]:
    """The workloads of a preset.

    quick (the README's main command): finishes in under 2 minutes on 2 CPU cores; models at
    moderate size (a 4-layer LLaMA-style stack on CPU), sweeps up to 64 MiB and 10,000 tensors.
    full: the real sizes (LLaMA 7B on a GPU), sweeps from 1 MiB to 1 GiB; meant for GPUs.
    """
    full = name == "full"
    llama = llama_shapes() if full and device == "cuda" else llama_shapes(n_layer=4, dim=1024, n_heads=16, n_kv_heads=4,
                                                                          ffn_dim=2816, vocab=32000)
    models = [
        Workload("gpt2-124m fp32", with_dtype(gpt2_shapes(), torch.float32), "model", "float32"),
        Workload("llama-7b bf16" if full and device == "cuda" else "llama-style 4 layers bf16",
                 with_dtype(llama, torch.bfloat16), "model", "bfloat16"),
        # fp16 has the same targets as bf16 (the CPU-speed issue); on CPU its conversions are other
        # instructions (F16C) than bf16's shifts, so it is measured on its own.
        Workload("llama-style 4 layers fp16", with_dtype(llama_shapes(n_layer=4, dim=1024, n_heads=16, n_kv_heads=4,
                                                                     ffn_dim=2816, vocab=32000), torch.float16),
                 "model", "float16"),
        Workload("resnet-50 fp32", with_dtype(resnet50_shapes(), torch.float32), "model", "float32"),
        Workload("lstm-lm mixed", with_dtype(lstm_lm_shapes(), "mixed"), "model", "mixed"),
    ]
    if full:
        sweeps = _sweeps([torch.float32, torch.bfloat16, "mixed"], [1, 10, 100, 1000, 10000], 256 * MIB,
                         [MIB, 16 * MIB, 256 * MIB, 1024 * MIB], 100)
    else:
        sweeps = _sweeps([torch.float32, torch.bfloat16], [1, 100, 1000, 10000], 16 * MIB, [MIB, 16 * MIB, 64 * MIB], 16)
    backward = Workload("10000 tensors, 16 MiB float32, allocated by backward", equal_split(16 * MIB, 10_000, torch.float32),
                        "allocation order", "float32", backward_order=True)
    return models + TARGET_WORKLOADS + sweeps + [backward]


def make_grads(spec: Spec, device: str, backward_order: bool = False) -> list[torch.Tensor]:
    """Random gradients (values near 1e-3, as typical late-training gradients), same on every run;
    with backward_order, the same values in tensors allocated last to first (see Workload)."""
    generator = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(s, generator=generator, device=device, dtype=torch.float32).mul_(1e-3).to(d) for s, d in spec]
    if not backward_order:
        return grads
    copies = {i: grads[i].clone() for i in reversed(range(len(grads)))}
    return [copies[i] for i in range(len(grads))]
