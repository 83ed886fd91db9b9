"""Real CPU training runs for the run-series rule (issue 15): tests/test_series_runs.py and
benchmarks/bench_series.py share them.

A small MLP (with LayerNorms, whose zero-initialised biases are the hard case for a norm rule) learns
a fixed random teacher with AdamW; every `every` steps the run is "sealed": the model's state as
safetensors bytes, each tensor's statistics by `auditor.tensorstats.stats_of` on exactly those bytes
(the numbers the seal writes into the manifest), and the probe reference outputs of a frozen batch
(the model in eval mode under inference_mode, float32, flattened: what the probe child stores in
ckpt-probe-reference.safetensors). `product_points` makes the same points through the product's own
path (save_checkpoint with a probe, the reference read back with safetensors' `np_load`), so the
fast in-process points can be checked against it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import torch
from safetensors.numpy import load as np_load
from safetensors.torch import save as st_save

import auditor.training
from auditor import series, tensorstats
from auditor.manifest import (
    Environment,
    Manifest,
    Probe,
    ProbeBatch,
    ProbeModel,
    ProbeOutputs,
    TensorEntry,
    TrainingState,
)
from auditor.probe.baselines import BATCH_NAME, REFERENCE_NAME, batch_bytes

IN, HIDDEN, OUT = 16, 64, 8
STEPS = 200
EVERY = 10
LR = 3e-3
WARMUP = 50
BATCH = 32
SPIKE_FACTOR = 100.0
SPIKE_STEPS = 3
SEEDS = (0, 1, 2, 3, 4)
SCHEDULES = ("constant", "cosine", "warmup")
# Where each seed's spike starts: spread over the run, never on a checkpoint step.
SPIKE_AT = {0: 85, 1: 105, 2: 125, 3: 145, 4: 165}


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(IN, HIDDEN)
        self.norm1 = torch.nn.LayerNorm(HIDDEN)
        self.mid = torch.nn.Linear(HIDDEN, HIDDEN)
        self.norm2 = torch.nn.LayerNorm(HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.gelu(self.norm1(self.inp(x)))
        x = torch.nn.functional.gelu(self.norm2(self.mid(x)))
        return self.out(x)


def build_model() -> Net:
    """Probe factory (`series_runs:build_model`)."""
    return Net()


def _teacher() -> Net:
    with torch.random.fork_rng():  # the teacher's seed must not reset the run's generator
        torch.manual_seed(999)
        return Net().eval()


def lr_factor(schedule: str, step: int) -> float:
    """The multiplier of LR at `step` (0-based) for a schedule."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / STEPS))
    if schedule == "warmup":
        return min(1.0, (step + 1) / WARMUP)
    raise ValueError(f"unknown schedule {schedule!r}")


@dataclass
class Run:
    """One training run's knobs; `saves_at` (sorted steps) overrides the even spacing."""

    seed: int
    schedule: str = "constant"
    model: str = "mlp"  # a key of TASKS
    spike_at: int | None = None
    diverge_at: int | None = None  # from this step the LR is huge and the optimizer plain SGD: NaN follows
    batch_change_at: int | None = None  # checkpoints from this step on are sealed with another probe batch
    saves_at: Sequence[int] | None = None
    steps: int = STEPS
    losses: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        parts = [self.model, self.schedule, f"seed{self.seed}"]
        parts += [f"spike{self.spike_at}"] if self.spike_at is not None else []
        parts += [f"diverge{self.diverge_at}"] if self.diverge_at is not None else []
        return "-".join(parts)

    def save_steps(self) -> list[int]:
        return sorted(self.saves_at) if self.saves_at is not None else list(range(EVERY, self.steps + 1, EVERY))


def uneven_steps(seed: int, total: int = STEPS) -> tuple[int, ...]:
    """Save steps 1 to 30 apart: crowded stretches next to long gaps."""
    rng = random.Random(seed)
    steps: list[int] = []
    step = 0
    while True:
        step += rng.choice([1, 2, 3, 5, 10, 10, 15, 20, 30])
        if step > total:
            return tuple(steps)
        steps.append(step)


@dataclass(frozen=True)
class Task:
    """What a run trains: its model (a probe factory), one step's loss, its frozen probe batch."""

    factory: str  # "module:callable", as save_checkpoint's model_factory
    build: Callable[[], torch.nn.Module]
    loss: Callable[[torch.nn.Module, torch.Generator], torch.Tensor]
    probe: Callable[[int], dict[str, torch.Tensor]]  # seed -> the frozen batch


@functools.cache
def _teacher_net() -> Net:
    return _teacher()


def _mlp_loss(model: torch.nn.Module, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(BATCH, IN, generator=gen)
    with torch.no_grad():
        y = _teacher_net()(x) + 0.1 * torch.randn(BATCH, OUT, generator=gen)
    return torch.nn.functional.mse_loss(model(x), y)


def _mlp_probe(seed: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(16, IN, generator=torch.Generator().manual_seed(seed))}


# The tiny GPT-2 (from a config: nothing downloaded) learns a fixed random Markov chain over its vocabulary.
VOCAB, SEQ = 64, 32


def build_gpt2() -> torch.nn.Module:
    """Probe factory (`series_runs:build_gpt2`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


@functools.cache
def _chain() -> torch.Tensor:
    return torch.softmax(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(7)) * 3, dim=1)


def _tokens(gen: torch.Generator, n: int = 16) -> torch.Tensor:
    x = torch.zeros(n, SEQ, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (n,), generator=gen)
    for t in range(1, SEQ):
        x[:, t] = torch.multinomial(_chain()[x[:, t - 1]], 1, generator=gen).squeeze(1)
    return x


def _gpt2_loss(model: torch.nn.Module, gen: torch.Generator) -> torch.Tensor:
    x = _tokens(gen)
    loss: torch.Tensor = model(input_ids=x, labels=x).loss
    return loss


def _gpt2_probe(seed: int) -> dict[str, torch.Tensor]:
    return {"input_ids": _tokens(torch.Generator().manual_seed(seed))}


TASKS: dict[str, Task] = {
    "mlp": Task("series_runs:build_model", build_model, _mlp_loss, _mlp_probe),
    "gpt2": Task("series_runs:build_gpt2", build_gpt2, _gpt2_loss, _gpt2_probe),
}


def train(run: Run, on_save: Callable[[int, torch.nn.Module], None]) -> None:
    """Train `run`, calling `on_save(step, model)` after each step in its save steps."""
    task = TASKS[run.model]
    torch.manual_seed(run.seed)
    model = task.build()
    opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1000 + run.seed)
    saves = set(run.save_steps())
    for step in range(run.steps):
        lr = LR * lr_factor(run.schedule, step)
        if run.spike_at is not None and run.spike_at <= step < run.spike_at + SPIKE_STEPS:
            lr *= SPIKE_FACTOR
        if run.diverge_at is not None and step == run.diverge_at:
            opt = torch.optim.SGD(model.parameters(), lr=1.0)
        if run.diverge_at is not None and step >= run.diverge_at:
            lr = 50.0
        for group in opt.param_groups:
            group["lr"] = lr
        loss = task.loss(model, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.losses.append(float(loss.detach()))
        if step + 1 in saves:
            on_save(step + 1, model)


# ---------------------------------------------------------------- points, the fast way


_ENV = Environment(python="test", platform="test")


def _batch_for(run: Run, step: int) -> dict[str, torch.Tensor]:
    changed = run.batch_change_at is not None and step >= run.batch_change_at
    return TASKS[run.model].probe(54321 if changed else 12345)


def tensor_entries(data: bytes) -> dict[str, TensorEntry]:
    """The manifest's tensor entries of a safetensors file's bytes, each with the statistics the seal
    stores (`tensorstats.stats_of` on the tensor's own bytes)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    body = memoryview(data)[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        lo, hi = meta["data_offsets"]
        raw = body[lo:hi]
        out[name] = TensorEntry(dtype=meta["dtype"], shape=meta["shape"], sha256=hashlib.sha256(raw).hexdigest(),
                                stats=tensorstats.stats_of(meta["dtype"], meta["shape"], raw))
    return out


def model_bytes(model: torch.nn.Module) -> bytes:
    """The model's state as save_checkpoint writes it to model.safetensors (tied weights once)."""
    return st_save(auditor.training.model_tensors(model), metadata={"format": "pt"})


def reference_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The probe outputs as the child computes them (eval, inference_mode, the logits of a transformers
    model, float32)."""
    was = model.training
    model.eval()
    with torch.inference_mode():
        out = model(**batch)
    model.train(was)
    tensor = out if isinstance(out, torch.Tensor) else out.logits
    return tensor.to(torch.float32)


def fast_point(run: Run, step: int, model: torch.nn.Module) -> series.Point:
    batch = _batch_for(run, step)
    blob = batch_bytes(batch)
    outputs = reference_outputs(model, batch)
    values = outputs.flatten()[:series.PROBE_VALUES].tolist()
    manifest = Manifest(
        schema="ckpt-auditor/manifest/v1", step=step, created_at=datetime.now(UTC), files=[],
        tensors={"model.safetensors": tensor_entries(model_bytes(model))}, training_state=TrainingState(),
        probe=Probe(batch=ProbeBatch(path=BATCH_NAME, sha256=hashlib.sha256(blob).hexdigest()),
                    model=ProbeModel(factory=TASKS[run.model].factory),
                    outputs=ProbeOutputs(sha256="-", dtype="float32", shape=list(outputs.shape),
                                         reference=REFERENCE_NAME, atol=1e-5, rtol=1e-4)),
        environment=_ENV)
    point = series.point_from_manifest(f"mem://runs/{run.name}/step-{step}", manifest, values)
    assert point is not None
    return point


def points(run: Run) -> list[series.Point]:
    """Train `run` and return one point per save (on one thread: the same numbers on any machine, and
    the 2 shared cores of CI are not fought over)."""
    out: list[series.Point] = []
    with one_thread():
        train(run, lambda step, model: out.append(fast_point(run, step, model)))
    return out


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- points, the product's way


def product_points(run: Run, folder: str) -> list[series.Point]:
    """Train `run`, save every checkpoint with save_checkpoint and the frozen probe batch, and read the
    points back from what was written: the manifest, the safetensors file, the reference outputs."""
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.abspath(__file__)), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    out: list[series.Point] = []

    def save(step: int, model: torch.nn.Module) -> None:
        url = f"{folder}/step-{step}"
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the optimizer's state is not what is compared
        manifest = auditor.training.save_checkpoint(url, step, model, opt, probe_batch=_batch_for(run, step),
                                                    model_factory=TASKS[run.model].factory)
        assert manifest.probe is not None and manifest.tensors is not None
        entries = manifest.tensors["model.safetensors"]
        if all(e.stats is None for e in entries.values()):
            # Until the seal writes stats (helper `nonfinite`): the same definition on the saved bytes.
            with open(f"{url}/model.safetensors", "rb") as f:
                stats = {k: e.stats for k, e in tensor_entries(f.read()).items()}
            manifest = manifest.model_copy(update={"tensors": {"model.safetensors": {
                k: e.model_copy(update={"stats": stats[k]}) for k, e in entries.items()}}})
        assert manifest.probe is not None
        with open(f"{url}/{manifest.probe.outputs.reference}", "rb") as f:
            values = np_load(f.read())["values"].astype(float).tolist()
        point = series.point_from_manifest(url, manifest, values)
        assert point is not None
        out.append(point)

    with one_thread():
        train(run, save)
    return out


def relabel(points: list[series.Point], prefix: str) -> list[series.Point]:
    return [replace(p, url=f"{prefix}/step-{p.step}") for p in points]
