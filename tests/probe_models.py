"""Model factories for probe tests; the probe child imports them by `module:callable`."""

from __future__ import annotations

import torch

from ckpts import MLP


def mlp(width: int = 16, act: str = "gelu") -> torch.nn.Module:
    return MLP(width=width, act=act)


class TinyTransformer(torch.nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        layer = torch.nn.TransformerEncoderLayer(dim, heads, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(input_ids)))


def tiny_transformer(**kwargs: int) -> torch.nn.Module:
    return TinyTransformer(**kwargs)


def hog(gib: int = 4) -> torch.nn.Module:
    """Build a model whose construction needs far more memory than the probe allows."""
    block = torch.ones(gib * 2**28)  # float32: gib GiB
    return MLP(width=int(block[0].item()) * 16)
