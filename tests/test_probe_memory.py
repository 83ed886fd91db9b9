"""Probe memory: one copy of the weights, outputs reduced a micro-batch at a time, old baselines still verify.

Real probe children under their own memory limit (`scan.probe_memory_mb`, the child's RLIMIT_DATA),
real models: a tiny GPT-2 built from a transformers config (nothing downloaded) whose 50k-vocabulary
logits would not fit the limit whole, and small torch modules that exercise each fallback: a random
non-persistent buffer and random numbers in the forward pass (the meta build cannot stand in), outputs
that depend on how many samples run together (the recorded micro-batches must be followed, and an old
baseline's whole batch too), outputs that are not one row per sample (the batch runs whole), and a
model that writes into its own weights (the mapped file is copy-on-write: the checkpoint is untouched).
"""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file, save_model

import auditor.api
from auditor import probe
from auditor.config import ScanConfig
from auditor.digests import digest_chunks
from auditor.layouts import Checkpoint
from auditor.manifest import MANIFEST_NAME, Manifest
from auditor.probe import baselines
from auditor.storage import Reader

TESTS = str(Path(__file__).parent)
ALLOW = ["memmodels:*"]
SAMPLES, TOKENS, VOCAB = 16, 256, 50257
LIMIT_MB = 768  # the probe child's RLIMIT_DATA in the large-logits test

MODELS = '''
import torch


def gpt2(n_layer=1, n_embd=32, n_head=2, vocab_size=50257, n_positions=256):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                                      n_positions=n_positions, use_cache=False))


class Net(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lin = torch.nn.Linear(8, 4)
        if kind == "random_buffer":
            self.register_buffer("mix", torch.randn(8, 8), persistent=False)

    def forward(self, x):
        if self.kind == "random_buffer":
            x = x @ self.mix
        y = self.lin(x)
        if self.kind == "batch_scaled":  # depends on how many samples run together
            y = y * x.shape[0]
        elif self.kind == "noisy":  # random numbers in eval mode
            y = y + torch.randn(y.shape)
        elif self.kind == "transposed":  # one column per sample, not one row
            y = y.T
        elif self.kind == "writes_weights":
            self.lin.weight.mul_(2.0)
            y = self.lin(x) / 2
            self.lin.weight.div_(2.0)
        return y


def net(kind="plain"):
    return Net(kind)


class Resident(torch.nn.Module):
    """Appends how much of model.safetensors' mapping is resident in this process (smaps Rss, KiB)."""

    def __init__(self, record):
        super().__init__()
        self.record = record

    def forward(self, x):
        rss, inside = 0, False
        with open("/proc/self/smaps") as f:
            for line in f:
                if "-" in line.split(" ", 1)[0]:
                    inside = line.rstrip().endswith("model.safetensors")
                elif inside and line.startswith("Rss:"):
                    rss += int(line.split()[1])
        with open(self.record, "a") as out:
            out.write(f"{rss}\\n")
        return x


class Writer(torch.nn.Module):
    """Scales its weight in place around each use, as `Net("writes_weights")`, but over many pages."""

    def __init__(self, width=1024, in_place=True):
        super().__init__()
        self.lin = torch.nn.Linear(width, width, bias=False)
        self.in_place = in_place

    def forward(self, x):
        if not self.in_place:
            return self.lin(x * 2) / 2
        self.lin.weight.mul_(2.0)
        y = self.lin(x) / 2
        self.lin.weight.div_(2.0)
        return y


def writer(in_place=True):
    return Writer(in_place=in_place)


def stack(record, layers=8, width=1024):
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)],
                               Resident(record))
'''


@pytest.fixture(autouse=True)
def code(monkeypatch, tmp_path) -> Path:
    """The test factories, importable by the probe child as an operator's PYTHONPATH would make them."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "memmodels.py").write_text(textwrap.dedent(MODELS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), TESTS, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(folder))
    return folder


def export(d: Path, model: torch.nn.Module) -> Path:
    """A weights-only export (completeness asks for the model only), saved as save_pretrained would."""
    d.mkdir(parents=True)
    save_model(model, str(d / "model.safetensors"))  # a tied weight is stored once
    (d / "config.json").write_text("{}")
    return d


def sealed_net(tmp_path: Path, kind: str) -> Path:
    import memmodels

    torch.manual_seed(0)
    d = export(tmp_path / f"run/{kind}-1", memmodels.net(kind))
    torch.manual_seed(123)
    auditor.api.seal(str(d), step=1, model_factory="memmodels:net", model_kwargs={"kind": kind},
                     probe_batch={"x": torch.randn(SAMPLES, 8)})
    return d


def manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST_NAME).read_text())


def reference_metadata(d: Path) -> dict[str, str]:
    with safe_open(str(d / manifest(d)["probe"]["outputs"]["reference"]), framework="np") as f:
        return f.metadata()


def verify(d: Path, memory_mb: int = probe.DEFAULT_MEMORY_MB):
    r = auditor.api.verify_url(str(d), tier="probe", scan=ScanConfig(settle_time=0, probe_memory_mb=memory_mb),
                               allow_factories=ALLOW)
    (v,) = r.verdicts
    return v


def child(d: Path, tmp_path: Path, memory_mb: int = probe.DEFAULT_MEMORY_MB, **mode) -> dict:
    """Run the probe child on a sealed checkpoint as the parent would, in the given mode."""
    doc = manifest(d)
    out = tmp_path / "values.safetensors"
    result = probe.run_child(
        {"root": str(d), "model_files": ["model.safetensors"], "factory": doc["probe"]["model"]["factory"],
         "allowed": ALLOW, "kwargs": doc["probe"]["model"]["kwargs"], "threads": 2, "out": str(out),
         "batch": str(d / doc["probe"]["batch"]["path"]), **mode},
        timeout=300, memory_mb=memory_mb,
    )  # fmt: skip
    result["values"] = out.read_bytes() if out.exists() else None
    return result


# ---------------------------------------------------------------- large logits under the child's own limit


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT-2 (50k vocabulary) sealed with 16 x 256 tokens: logits of 823 MB, more than LIMIT_MB."""
    tmp_path = tmp_path_factory.mktemp("gpt2")
    code = tmp_path / "code"
    code.mkdir()
    (code / "memmodels.py").write_text(textwrap.dedent(MODELS))
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", os.pathsep.join([str(code), TESTS, os.environ.get("PYTHONPATH", "")]))
    mp.syspath_prepend(str(code))
    import memmodels

    torch.manual_seed(0)
    d = export(tmp_path / "run/gpt2-7", memmodels.gpt2())
    ids = torch.randint(0, VOCAB, (SAMPLES, TOKENS), generator=torch.Generator().manual_seed(1))
    auditor.api.seal(str(d), step=7, model_factory="memmodels:gpt2", probe_batch={"input_ids": ids})
    yield d
    mp.undo()


def test_large_logits_probe_stays_under_the_probe_memory_limit(gpt2_checkpoint, tmp_path):
    d = gpt2_checkpoint
    logits_bytes = SAMPLES * TOKENS * VOCAB * 4
    assert logits_bytes > LIMIT_MB * 2**20  # materialising the whole logits cannot fit the limit
    assert manifest(d)["probe"]["outputs"]["shape"] == [SAMPLES, TOKENS, VOCAB]
    meta = reference_metadata(d)
    # The seal chose micro-batches of at most OUTPUT_CHUNK_BYTES of outputs (or one sample) and recorded them.
    plan = [int(p) for p in meta["micro_batches"].split(",")]
    assert sum(plan) == SAMPLES and plan == [1] * SAMPLES, meta
    assert meta["weights"] == "mapped" and meta["reduction"] == "sample"

    v = verify(d, memory_mb=LIMIT_MB)
    assert v.status == "ok" and not v.findings, v.to_dict()


def test_whole_logits_exceed_the_same_limit(gpt2_checkpoint, tmp_path):
    """Control: the same probe computed as before micro-batches (the whole batch in one call) does not fit."""
    with pytest.raises(probe.ProbeError, match="(?i)memory|allocate"):
        child(gpt2_checkpoint, tmp_path, memory_mb=LIMIT_MB, build="real", weights="copied")


def test_meta_build_reproduces_the_gpt2_baseline_bit_for_bit(gpt2_checkpoint, tmp_path):
    d = gpt2_checkpoint
    mode = baselines.recorded_mode(Reader(fsspec.filesystem("file")), checkpoint(d), Manifest.model_validate(
        manifest(d)).probe)
    assert mode == {"weights": "mapped", "micro_batches": [1] * SAMPLES}
    result = child(d, tmp_path, memory_mb=LIMIT_MB, build="meta", **mode)
    # The factory's parameters were never allocated, the tied lm_head took the file's tensor.
    assert result["build"] == "meta" and "meta_unusable" not in result, result
    assert result["sha256"] == manifest(d)["probe"]["outputs"]["sha256"]


# ---------------------------------------------------------------- when the meta build cannot stand in


@pytest.mark.parametrize(("kind", "why"), [("random_buffer", "random"), ("noisy", "random")])
def test_random_state_the_meta_build_would_change_falls_back_to_the_real_build(tmp_path, kind, why):
    d = sealed_net(tmp_path, kind)
    result = child(d, tmp_path, build="meta", weights="mapped", micro_batches=[1, SAMPLES - 1])
    assert result["build"] == "real" and why in result["meta_unusable"], result
    assert result["sha256"] == manifest(d)["probe"]["outputs"]["sha256"]
    v = verify(d)
    assert v.status == "ok" and not v.findings, v.to_dict()


def test_recorded_micro_batches_are_followed(tmp_path):
    d = sealed_net(tmp_path, "batch_scaled")
    assert reference_metadata(d)["micro_batches"] == f"1,{SAMPLES - 1}"
    v = verify(d)
    assert v.status == "ok" and not v.findings, v.to_dict()


def test_outputs_not_one_row_per_sample_run_the_batch_whole(tmp_path):
    d = sealed_net(tmp_path, "transposed")
    meta = reference_metadata(d)
    assert "micro_batches" not in meta and manifest(d)["probe"]["outputs"]["shape"] == [4, SAMPLES], meta
    v = verify(d)
    assert v.status == "ok" and not v.findings, v.to_dict()


def test_a_model_writing_its_weights_never_writes_the_checkpoint(tmp_path):
    d = sealed_net(tmp_path, "writes_weights")
    weights = d / "model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    for _ in range(2):
        v = verify(d)
        assert v.status == "ok" and not v.findings, v.to_dict()
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before


def test_a_model_writing_its_weights_runs_as_plain_pytorch_does(tmp_path):
    # Mapped weights give their pages back after each module's forward, except pages a write made
    # private: dropping those would undo the write, and from the second micro-batch on the outputs
    # would be half what they are. Reference: the same product without writing the weights.
    import memmodels

    torch.manual_seed(0)
    d = export(tmp_path / "run/writer-1", memmodels.writer())
    auditor.api.seal(str(d), step=1, model_factory="memmodels:writer", probe_batch={"x": torch.randn(4, 1024)})
    writes = child(d, tmp_path, build="meta", weights="mapped", micro_batches=[1] * 4)
    reads = child(d, tmp_path, build="meta", weights="mapped", micro_batches=[1] * 4, kwargs={"in_place": False})
    assert writes["sha256"] == reads["sha256"], (writes, reads)


def test_mapped_weights_are_not_all_resident_at_once(tmp_path):
    # Eight 4 MiB layers, the batch in micro-batches of one: without the pages given back, all 32 MiB
    # of the mapped file are resident from the first micro-batch on.
    record = tmp_path / "resident.txt"
    import memmodels

    torch.manual_seed(0)
    d = export(tmp_path / "run/stack-1", memmodels.stack(str(record)))
    auditor.api.seal(str(d), step=1, model_factory="memmodels:stack", model_kwargs={"record": str(record)},
                     probe_batch={"x": torch.randn(4, 1024)})
    record.unlink()
    v = verify(d)
    assert v.status == "ok", v.to_dict()
    resident_kib = [int(x) for x in record.read_text().split()]
    layer_kib = 1024 * 1024 * 4 // 1024
    assert len(resident_kib) >= 2, resident_kib  # micro-batches
    assert max(resident_kib) <= 2 * layer_kib, resident_kib  # at most the last layer or two, of 8


# ---------------------------------------------------------------- baselines sealed before micro-batches


def checkpoint(d: Path) -> Checkpoint:
    return Checkpoint(url=str(d), path=str(d), run="run", layout="hf", kind="dir",
                      files={p.name: {"size": p.stat().st_size, "type": "file"} for p in d.iterdir()})


def as_old_baseline(d: Path, tmp_path: Path) -> str:
    """Rewrite a seal's probe baseline as one sealed before micro-batches: the whole batch in one call,
    the weights copied into the factory's model, a reference file with the reduction's metadata only."""
    old = child(d, tmp_path, build="real", weights="copied")
    with safe_open(str(tmp_path / "values.safetensors"), framework="pt") as f:
        values, meta = f.get_tensor("values"), f.metadata()
    doc = manifest(d)
    ref = doc["probe"]["outputs"]["reference"]
    save_file({"values": values}, str(d / ref), metadata={k: meta[k] for k in ("reduction", "seed", "count")
                                                           if k in meta})
    digest = digest_chunks([(d / ref).read_bytes()])
    (entry,) = [f for f in doc["files"] if f["path"] == ref]
    entry.update(size=digest.size, sha256=digest.sha256, crc32c=digest.crc32c)
    doc["probe"]["outputs"]["sha256"] = old["sha256"]
    (d / MANIFEST_NAME).write_text(json.dumps(doc))
    return old["sha256"]


def test_old_baseline_is_computed_as_it_was_sealed(tmp_path):
    d = sealed_net(tmp_path, "batch_scaled")
    new = manifest(d)["probe"]["outputs"]["sha256"]
    old = as_old_baseline(d, tmp_path)
    assert old != new  # this model's outputs show whether the batch ran whole or split
    assert baselines.recorded_mode(Reader(fsspec.filesystem("file")), checkpoint(d),
                                   Manifest.model_validate(manifest(d)).probe) == {"weights": "copied",
                                                                                   "micro_batches": None}
    v = verify(d)
    assert v.status == "ok" and not v.findings, v.to_dict()


def test_old_gpt2_baseline_still_verifies(gpt2_checkpoint, tmp_path):
    """A GPT-2 baseline sealed the old way verifies (within the default limit: the logits are whole)."""
    d = tmp_path / "old-gpt2"
    fsspec.filesystem("file").copy(str(gpt2_checkpoint), str(d), recursive=True)
    as_old_baseline(d, tmp_path)
    v = verify(d)
    assert v.status == "ok" and not v.findings, v.to_dict()


@pytest.mark.parametrize("text", ["", "0,16", "1,,15", "a,b", "\u00b2", "-1,17", "1" * 12, ",".join(["1"] * 5000)])
def test_a_malformed_recorded_plan_means_the_whole_batch(text):
    assert baselines.parse_plan(text) is None


def test_a_recorded_plan_parses():
    assert baselines.parse_plan("1,2,13") == [1, 2, 13]


def test_an_unreadable_reference_header_means_computing_as_before(tmp_path):
    d = sealed_net(tmp_path, "plain")
    doc = manifest(d)
    (d / doc["probe"]["outputs"]["reference"]).write_bytes(b"\xff" * 64)
    mode = baselines.recorded_mode(Reader(fsspec.filesystem("file")), checkpoint(d),
                                   Manifest.model_validate(doc).probe)
    assert mode == {"weights": "copied", "micro_batches": None}
