"""Model factories for probe tests; the probe child imports them by `module:callable`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

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


# ---------------------------------------------------------------- sandbox probes (tests/test_probe_sandbox.py)


def _sandbox_facts() -> dict:
    import resource

    def limit(name: str) -> list[int]:
        return list(resource.getrlimit(getattr(resource, name)))

    return {
        "environ": dict(os.environ),
        "cwd": os.getcwd(),
        "stdin": os.path.realpath("/proc/self/fd/0"),
        "sid": os.getsid(0),
        "pid": os.getpid(),
        "limits": {n: limit(n) for n in ("RLIMIT_DATA", "RLIMIT_CPU", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_NPROC")},
    }


def env_dump(path: str, width: int = 16) -> torch.nn.Module:
    """Write what the probe child sees (environment, cwd, stdin, session, limits) to `path`, then build the MLP."""
    Path(path).write_text(json.dumps(_sandbox_facts()))
    return MLP(width=width)


def _sleep_forever(pid_dir: str) -> None:
    Path(pid_dir, f"pid-{os.getpid()}").write_text(str(os.getpid()))
    while True:
        time.sleep(1)


def spawner(pid_dir: str, depth: int = 2, fanout: int = 2) -> torch.nn.Module:
    """Fork a small tree of sleepers (some leave the process group with setsid, one is orphaned), then hang."""
    def grow(level: int) -> None:
        for i in range(fanout):
            if os.fork() == 0:
                if i == 0:
                    os.setsid()  # out of the child's process group: killpg alone does not reach it
                if level < depth:
                    grow(level + 1)
                if level == depth and i == 1 and os.fork() != 0:
                    os._exit(0)  # the grandchild is orphaned and reparented away from the tree
                _sleep_forever(pid_dir)
    grow(1)
    _sleep_forever(pid_dir)
    raise AssertionError("unreachable")
