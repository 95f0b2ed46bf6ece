"""Gradients from real models (forward and backward on synthetic data), not just random tensors:
their shapes, magnitudes and tensor counts are what users clip."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastclip
from harness import assert_norm_error_bound, assert_same, exact_clause


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab=97, hidden=48):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def loss(self, generator):
        tokens = torch.randint(0, self.head.out_features, (4, 21), generator=generator)
        out, _ = self.lstm(self.embedding(tokens[:, :-1]))
        logits = self.head(out).float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


class SmallTransformer(nn.Module):
    def __init__(self, vocab=101, width=32):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def loss(self, generator):
        tokens = torch.randint(0, self.head.out_features, (3, 17), generator=generator)
        mask = nn.Transformer.generate_square_subsequent_mask(16, dtype=self.head.weight.dtype)
        logits = self.head(self.encoder(self.embedding(tokens[:, :-1]), mask=mask, is_causal=True)).float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, 10)

    def loss(self, generator):
        dtype = self.head.weight.dtype
        images = torch.randn(4, 3, 16, 16, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (4,), generator=generator)
        return nn.functional.cross_entropy(self.head(self.features(images).flatten(1)).float(), labels)


def _model_with_gradients(model_class, dtype, seed=0):
    torch.manual_seed(seed)
    model = model_class().to(dtype)
    model.loss(torch.Generator().manual_seed(seed)).backward()
    return model


@pytest.mark.parametrize("max_norm", [0.05, 1e3], ids=["clips", "no_clip"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("model_class", [LSTMLanguageModel, SmallTransformer, ConvNet], ids=lambda c: c.__name__)
def test_model_gradients(backend, model_class, dtype, norm_type, max_norm):
    reference = _model_with_gradients(model_class, dtype)
    model = _model_with_gradients(model_class, dtype)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm, norm_type)
    norm = fastclip.clip_(model.parameters(), max_norm, norm_type, backend=backend)
    clause = exact_clause(backend, norm_type, values_exact=False)
    if clause:
        assert_same(norm, expected, f"[{clause}] norm")
        for (name, p), r in zip(model.named_parameters(), reference.parameters()):
            assert_same(p.grad, r.grad, f"[{clause}] gradient of {name}")
        return
    # E3 and E5, as in harness.check_clip.
    rescaled = _model_with_gradients(model_class, dtype)
    assert_norm_error_bound(norm, expected, [p.grad for p in rescaled.parameters()], norm_type)
    torch.nn.utils.clip_grads_with_norm_(rescaled.parameters(), max_norm, norm)
    for (name, p), r in zip(model.named_parameters(), rescaled.parameters()):
        assert_same(p.grad, r.grad, f"[E3] gradient of {name}")
