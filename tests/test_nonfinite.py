"""Per-tensor statistics at seal and non-finite weights (issue 15, first half).

The statistics are taken as the bytes stream past the digests and must equal `tensorstats.stats_of`,
the reference; a checkpoint whose floating-point weights hold NaN or Inf is `nonfinite` at the
content tier (read) and the metadata tier (recorded), refused by `seal` (unless --force) and
`save_checkpoint` (unless allow_nonfinite), skipped by `latest`, refused by `load_checkpoint`, and
counted by `ckpt_verify_failures`. The weights come from real training runs on CPU.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import requests
import torch
from ckpts import tensor_offset, write_hf_checkpoint
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

import auditor.api
from auditor import digests, formats, tensorstats
from auditor.api import build_options
from auditor.config import Config
from auditor.daemon import Daemon
from auditor.errors import CheckpointRefused, UsageError
from auditor.http import Server
from auditor.manifest import MANIFEST_NAME, SIDECAR_SUFFIX, parse_manifest
from auditor.model import Tier
from auditor.storage import Reader
from auditor.tensorstats import FLOAT_DTYPES, stats_of
from auditor.training import load_checkpoint, save_checkpoint
from auditor.values import FLOAT_DTYPE_NAMES, NAMED_TENSORS, FloatTensor, ValueScan
from auditor.verify import Scanner, locate

pytestmark = pytest.mark.timeout(300)

REL = 1e-12  # l2: the reference sums in one dot product, the stream block by block


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auditor", *args], capture_output=True, text=True, timeout=180)


def verdict_of(url: str, tier: str | None = None) -> Any:
    (v,) = auditor.api.verify_url(url, tier=tier).verdicts
    return v


def errors(v: Any, code: str = "nonfinite_weights") -> list[Any]:
    return [f for f in v.findings if f.code == code and f.severity == "error"]


def assert_same(got: Any, ref: Any) -> None:
    assert (got.count, got.nan, got.inf, got.max_abs, got.sample) == (ref.count, ref.nan, ref.inf, ref.max_abs,
                                                                      ref.sample)
    assert math.isclose(got.l2, ref.l2, rel_tol=REL, abs_tol=0.0), (got.l2, ref.l2)


# ---------------------------------------------------------------- the streaming path equals the reference


def raw_values(dtype: str, shape: tuple[int, ...], nan: int = 0, inf: int = 0, seed: int = 0) -> bytes:
    """Little-endian bytes of a tensor of `dtype` (BF16 by truncating float32), with NaN/Inf planted."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape)) if shape else 1
    wide = {"F64": np.float64, "F16": np.float16}.get(dtype, np.float32)
    v = (rng.standard_normal(n) * 3).astype(wide)
    if dtype == "F16" and n >= 3:
        v[:3] = [6e-8, -65504, 1e-5]  # a subnormal and the largest magnitude: the exact widening is exercised
    where = rng.choice(n, size=min(n, nan + inf), replace=False)
    v[where[:nan]] = np.nan
    v[where[nan:]] = np.inf * rng.choice([-1, 1], size=len(where[nan:]))
    if dtype == "BF16":
        return (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return v.tobytes()


SHAPES = [(), (0,), (1,), (5,), (3, 7), (257, 129), (1_100_000,)]


def test_the_scanned_dtypes_are_the_reference_dtypes():
    assert FLOAT_DTYPE_NAMES == set(FLOAT_DTYPES)


def test_checking_values_does_not_load_numpy_until_a_float_tensor_is_read(tmp_path):
    # A metadata-tier scan, `auditor status`, the daemon's import floor: numpy stays out.
    code = ("import sys, auditor.cli, auditor.daemon, auditor.verify, auditor.sealing\n"
            "from auditor.values import ValueScan\n"
            "ValueScan([]).feed(b'x')\n"
            "assert 'numpy' not in sys.modules, 'numpy imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("dtype", sorted(FLOAT_DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("planted", [(0, 0), (2, 1), (0, 3)], ids=["finite", "nan+inf", "inf"])
def test_streamed_stats_equal_the_reference(dtype, shape, planted):
    raw = raw_values(dtype, shape, *planted)
    ref = stats_of(dtype, list(shape), raw)
    head = b"\x00" * 13  # an odd offset: elements straddle every chunk boundary below
    data = head + raw + b"tail"
    for chunk in (1, 3, 4099, 2**20 + 5, len(data)):
        if chunk < 64 and len(raw) > 20_000:
            continue
        tensors = [FloatTensor("t", dtype, shape, len(head), len(head) + len(raw))]
        # The seal's full statistics, and the content tier's NaN/Inf counts alone.
        scan, check = ValueScan(tensors), ValueScan(tensors, full=False)
        for i in range(0, len(data), chunk):
            scan.feed(data[i:i + chunk])
            check.feed(data[i:i + chunk])
        assert_same(scan.results()["t"], ref)
        counts = check.counts()["t"]
        assert (counts.count, counts.nan, counts.inf) == (ref.count, ref.nan, ref.inf) and check.results() == {}


@pytest.mark.parametrize("dtype", sorted(FLOAT_DTYPES))
def test_digest_read_takes_stats_on_the_helper_thread_from_the_streamed_header(tmp_path, dtype):
    """A real safetensors file past THREAD_MIN_BYTES, read through digest_chunks in odd-sized chunks:
    the header is parsed from the stream itself and every tensor's stats equal the reference."""
    shapes = {"big": (1_500_001,), "matrix": (300, 301), "empty": (0, 4), "scalar": ()}
    raws = {name: raw_values(dtype, shape, nan=1 if name == "matrix" else 0, seed=i)
            for i, (name, shape) in enumerate(shapes.items())}
    path = tmp_path / "m.safetensors"
    write_raw_safetensors(path, {n: (dtype, shapes[n], raws[n]) for n in shapes} | {"ids": ("I64", (9,), bytes(72))})
    data = path.read_bytes()
    assert len(data) > digests.THREAD_MIN_BYTES
    scan = formats.value_scan(str(path), len(data))
    got = digests.digest_chunks((data[i:i + 1_000_003] for i in range(0, len(data), 1_000_003)), values=scan)
    assert set(got.stats) == set(shapes), "the I64 tensor has no statistics"
    for name, shape in shapes.items():
        assert_same(got.stats[name], stats_of(dtype, list(shape), raws[name]))
    assert got.stats["matrix"].nan == 1


def write_raw_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    """A safetensors file from raw bytes (as the library lays it out), for dtypes numpy cannot hold (BF16)."""
    header: dict[str, Any] = {}
    pos = 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
        pos += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(raw for _, _, raw in tensors.values()))


# ---------------------------------------------------------------- a real diverging run


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def train(lr: float, steps: int, seed: int = 0) -> tuple[MLP, torch.optim.Optimizer, int]:
    """SGD on a fixed regression task; with a huge `lr` the weights blow up to Inf, then NaN.
    Returns the model, its optimizer and the step it stopped at (the first with non-finite weights)."""
    torch.manual_seed(seed)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = torch.randn(64, 8), torch.randn(64, 4)
    for step in range(1, steps + 1):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            return model, opt, step
    return model, opt, steps


@pytest.fixture(scope="module")
def diverged() -> tuple[MLP, torch.optim.Optimizer, int]:
    model, opt, step = train(lr=1e4, steps=200)
    assert not all(torch.isfinite(p).all() for p in model.parameters()), "the run did not diverge"
    return model, opt, step


def test_save_checkpoint_refuses_diverged_weights_unless_allowed(tmp_path, diverged):
    model, opt, step = diverged
    healthy, healthy_opt, _ = train(lr=1e-2, steps=3)
    run = tmp_path / "run"
    save_checkpoint(str(run / "step-1"), 1, healthy, healthy_opt)
    with pytest.raises(UsageError, match=r"non-finite.*nonfinite_weights.*model\.safetensors.*'body\.\d\.(weight|bias)'"
                       r".*(NaN|Inf) of \d+ values.*allow_nonfinite=True"):
        save_checkpoint(str(run / f"step-{step}"), step, model, opt)
    assert not (run / f"step-{step}").exists(), "nothing is committed"

    manifest = save_checkpoint(str(run / f"step-{step}"), step, model, opt, allow_nonfinite=True)
    weights = manifest.tensors["model.safetensors"]
    sealed_bad = {n for n, t in weights.items() if t.stats.nonfinite}
    actual_bad = {n for n, p in model.state_dict().items() if not torch.isfinite(p).all()}
    assert sealed_bad == actual_bad and sealed_bad
    for name, p in model.state_dict().items():
        assert weights[name].stats.nan == int(torch.isnan(p).sum())
        assert weights[name].stats.inf == int(torch.isinf(p).sum())

    v = verdict_of(str(run / f"step-{step}"))
    assert v.status == "nonfinite" and v.assurance == "sealed"
    (f,) = errors(v)
    assert f.file == "model.safetensors" and any(repr(n) in f.detail for n in sealed_bad), f.detail
    # The metadata tier reads no weights: the counts recorded at seal are the evidence.
    m = verdict_of(str(run / f"step-{step}"), tier="metadata")
    assert m.status == "nonfinite" and "recorded at seal" in errors(m)[0].detail

    latest = auditor.api.latest(str(tmp_path))
    assert latest is not None and latest["step"] == 1, latest
    with pytest.raises(CheckpointRefused, match="nonfinite.*nonfinite_weights"):
        load_checkpoint(str(run / f"step-{step}"), MLP(), torch.optim.SGD(MLP().parameters(), lr=0.1))


def test_seal_cli_refuses_diverged_weights_and_force_records_the_counts(tmp_path, diverged):
    model, opt, step = diverged
    d = write_hf_checkpoint(tmp_path / "run/checkpoint-10", step=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    r = cli("seal", str(d))
    assert r.returncode == 2, r.stderr
    assert "nonfinite_weights" in r.stderr and "model.safetensors" in r.stderr and "'body." in r.stderr, r.stderr
    assert "--force" in r.stderr and not (d / MANIFEST_NAME).exists()

    r = cli("seal", str(d), "--force")
    assert r.returncode == 0, r.stderr
    manifest = parse_manifest((d / MANIFEST_NAME).read_bytes())
    stats = {n: t.stats for n, t in manifest.tensors["model.safetensors"].items()}
    assert sum(s.nonfinite for s in stats.values()) == sum(int((~torch.isfinite(p)).sum())
                                                          for p in model.state_dict().values())
    r = cli("verify", str(d), "--json")
    assert r.returncode == 1, r.stderr
    (ck,) = json.loads(r.stdout)["checkpoints"]
    assert ck["status"] == "nonfinite"
    assert [f["file"] for f in ck["findings"] if f["code"] == "nonfinite_weights"] == ["model.safetensors"]


# ---------------------------------------------------------------- a NaN written into a good sealed checkpoint


def plant(folder: Path, tensor: str, index: int, value: float, stats: str, rel: str = "model.safetensors") -> None:
    """Write `value` into float32 element `index` of `tensor`, then recompute the manifest's digests of the
    file (sha256, crc32c, the tensor's sha256) so that only the values are wrong: the bytes match the manifest.

    `stats="dropped"`: the file's statistics are removed, as in a manifest sealed before they existed;
    `stats="recorded"`: they are those of the new bytes, as a seal of them (`--force`) records them."""
    path = folder / rel
    data = bytearray(path.read_bytes())
    at = tensor_offset(path, tensor) + 4 * index
    data[at:at + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(data))
    header = formats.parse_safetensors_header(Reader(fsspec.filesystem("file")), str(path), len(data))
    got = digests.digest_chunks([bytes(data)], header.spans())
    mpath = folder / MANIFEST_NAME
    manifest = parse_manifest(mpath.read_bytes())
    (entry,) = [f for f in manifest.files if f.path == rel]
    entry.sha256, entry.crc32c = got.sha256, got.crc32c
    for name, t in manifest.tensors[rel].items():
        t.sha256 = got.tensors[name]
        if stats == "dropped":
            t.stats = None
        elif t.stats is not None:
            lo, hi = _span(header, name)
            t.stats = tensorstats.stats_of(t.dtype, t.shape, bytes(data[lo:hi]))
    mpath.write_bytes(manifest.to_json())


def _span(header: formats.SafetensorsHeader, name: str) -> tuple[int, int]:
    (span,) = [s for s in header.spans() if s.name == name]
    return span.start, span.end


@pytest.mark.parametrize("stats", ["dropped", "recorded"])
def test_nan_written_into_a_sealed_checkpoint_fails_though_its_bytes_match(tmp_path, stats):
    """Bytes that match the manifest, values that are NaN. Without recorded statistics (a manifest sealed
    before they existed) the content tier reads the values; with them, the bytes are proven to be the
    ones whose counts the seal recorded, and those counts are the evidence at every tier."""
    prefix = tmp_path / "ckpts"
    run = prefix / "run"
    good = write_hf_checkpoint(run / "checkpoint-100", step=100)
    bad = write_hf_checkpoint(run / "checkpoint-200", step=200, seed=1)
    for d in (good, bad):
        auditor.api.seal(str(d))
    manifest = parse_manifest((bad / MANIFEST_NAME).read_bytes())
    weights = manifest.tensors["model.safetensors"]
    name = sorted(n for n, t in weights.items() if t.dtype == "F32")[0]
    assert weights[name].stats is not None and weights[name].stats.nonfinite == 0
    plant(bad, name, 1, float("nan"), stats)

    v = verdict_of(str(bad))
    assert v.status == "nonfinite", v.findings
    assert not [f for f in v.findings if f.code in ("digest_mismatch", "tensor_digest_mismatch")]
    (f,) = errors(v)
    assert f.file == "model.safetensors" and f"{name!r}" in f.detail and "1 NaN of" in f.detail, f.detail
    # The metadata tier reads no values: it has only what the seal recorded.
    assert verdict_of(str(bad), tier="metadata").status == ("ok" if stats == "dropped" else "nonfinite")

    assert auditor.api.latest(str(prefix))["url"] == str(good)
    r = cli("latest", "--prefix", str(prefix), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["url"] == str(good), r.stdout + r.stderr
    with pytest.raises(CheckpointRefused, match="nonfinite"):
        load_checkpoint(str(bad), torch.nn.Linear(1, 1), torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1))


def test_recorded_values_are_not_read_again(tmp_path):
    """A sealed file whose statistics are recorded and whose bytes match: its values are not scanned
    (and numpy is not loaded for them), in a fresh process as the CLI runs."""
    ck = write_hf_checkpoint(tmp_path / "run" / "checkpoint-100", step=100)
    auditor.api.seal(str(ck))
    code = ("import sys; from auditor import api; r = api.verify_url(sys.argv[1]); "
            "print(r.verdicts[0].status, 'auditor.tensorstats' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(ck)], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["ok", "False"], out.stdout + out.stderr
    # Dropping the statistics makes the same verify read the values.
    plant(ck, sorted(n for n, t in parse_manifest((ck / MANIFEST_NAME).read_bytes()).tensors["model.safetensors"]
                     .items() if t.dtype == "F32")[0], 0, 1.0, "dropped")
    out = subprocess.run([sys.executable, "-c", code, str(ck)], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["ok", "True"], out.stdout + out.stderr


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["BF16", "F16"])
def test_half_precision_nan_and_inf_are_caught(tmp_path, dtype):
    w = torch.randn(6, 5).to(dtype)
    w[0, 0], w[2, 3], w[4, 1] = float("nan"), float("inf"), float("-inf")
    path = tmp_path / "model.safetensors"
    save_file({"w": w, "b": torch.ones(5, dtype=dtype)}, str(path))
    with pytest.raises(UsageError, match=r"'w' \((BF16|F16)\[6, 5\]\): 1 NaN, 2 Inf of 30 values"):
        auditor.api.seal(str(path), step=1, allow_incomplete=True)
    auditor.api.seal(str(path), step=1, allow_incomplete=True, force=True)
    sealed = parse_manifest(Path(f"{path}{SIDECAR_SUFFIX}").read_bytes()).tensors["model.safetensors"]
    assert (sealed["w"].stats.nan, sealed["w"].stats.inf) == (1, 2)
    assert sealed["b"].stats.nonfinite == 0 and sealed["b"].stats.l2 == pytest.approx(math.sqrt(5))
    v = verdict_of(str(path))
    assert v.status == "nonfinite" and "1 NaN, 2 Inf of 30 values" in errors(v)[0].detail


def test_an_int_tensor_is_ignored(tmp_path):
    # Integer bits that read as NaN or Inf were they float32: not weights' values, never judged.
    ids = np.array([0x7FC00000, 0x7F800000, 3], dtype=np.int32)
    path = tmp_path / "model.safetensors"
    save_numpy({"ids": ids, "steps": np.arange(4, dtype=np.int64), "w": np.ones((2, 2), np.float32)}, str(path))
    manifest = auditor.api.seal(str(path), step=1, allow_incomplete=True)
    sealed = manifest.tensors["model.safetensors"]
    assert sealed["ids"].stats is None and sealed["steps"].stats is None
    assert sealed["w"].stats.l2 == 2.0 and sealed["w"].stats.max_abs == 1.0
    assert "stats" not in json.loads(manifest.to_json())["tensors"]["model.safetensors"]["ids"]
    assert verdict_of(str(path)).status == "ok"


# ---------------------------------------------------------------- a clean run


def test_clean_run_gets_stats_and_ok(tmp_path):
    model, opt, _ = train(lr=1e-2, steps=5)
    url = str(tmp_path / "run/step-5")
    manifest = save_checkpoint(url, 5, model, opt)
    weights = manifest.tensors["model.safetensors"]
    for name, p in model.state_dict().items():
        s = weights[name].stats
        assert s is not None and s.count == p.numel() and s.nonfinite == 0
        assert s.l2 == pytest.approx(float(torch.linalg.vector_norm(p.double())), rel=1e-12)
        assert s.max_abs == float(p.abs().max())
        assert len(s.sample) == min(16, p.numel())
        assert_same(s, stats_of("F32", list(p.shape), p.numpy().tobytes()))
    v = verdict_of(url)
    assert v.status == "ok" and v.assurance == "sealed" and not errors(v)
    assert verdict_of(url, tier="metadata").status == "ok"


def test_detail_names_the_first_tensors_then_how_many_more(tmp_path):
    n = NAMED_TENSORS + 2
    tensors = {f"layer{i}": torch.full((3,), float("nan")) for i in range(n)} | {"ok": torch.ones(2)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    v = verdict_of(str(path))
    (f,) = errors(v)
    assert f.detail.startswith(f"{n} of {n + 1} floating-point tensor(s) hold non-finite values: 'layer0'"), f.detail
    assert f.detail.endswith("; and 2 more") and f.detail.count("3 NaN of 3 values") == NAMED_TENSORS


# ---------------------------------------------------------------- unsealed, and the daemon


def test_unsealed_content_tier_reads_the_values(tmp_path, diverged):
    model, _, _ = diverged
    d = write_hf_checkpoint(tmp_path / "run/checkpoint-7", step=7)
    assert verdict_of(str(d)).status == "ok"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    v = verdict_of(str(d))
    assert v.status == "nonfinite" and v.assurance == "structural" and errors(v)[0].file == "model.safetensors"


@contextmanager
def daemon(state_url: str, prefix: str) -> Iterator[tuple[Daemon, str]]:
    """A Daemon on its own registry, passes run by the test, with its HTTP server (real /metrics)."""
    cfg = Config.model_validate({"state": {"url": state_url}, "prefixes": [{"url": prefix}],
                                 "scan": {"settle_time": "0s", "jobs": 2, "jitter": 0.0}})
    d = Daemon(cfg, CollectorRegistry())
    server = Server(d, "127.0.0.1:0", token="")
    server.start()
    try:
        yield d, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        d.shutdown(grace=5)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_daemon_counts_nonfinite_as_a_failure_and_latest_skips_it(tmp_path, diverged):
    model, opt, step = diverged
    prefix = tmp_path / "ckpts"
    healthy, healthy_opt, _ = train(lr=1e-2, steps=3)
    save_checkpoint(str(prefix / "run/step-1"), 1, healthy, healthy_opt)
    save_checkpoint(str(prefix / f"run/step-{step}"), step, model, opt, allow_nonfinite=True)
    # Unsealed, seen first by the daemon: its first-sight read digests the files and checks the values at once.
    unsealed = write_hf_checkpoint(prefix / "other/checkpoint-3", step=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(unsealed / "model.safetensors"))
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    key = str(prefix)
    with daemon(state_url, key) as (d, url):
        d.tick(key)
        scraped = scrape(url)
        assert scraped[("ckpt_verify_failures", (("prefix", key),))] == 2
        assert scraped[("ckpt_checkpoints", (("prefix", key), ("status", "nonfinite")))] == 2
        doc = requests.get(url + "/api/v1/checkpoints", params={"prefix": key}, timeout=10).json()
        status = {c["url"]: c["status"] for c in doc["checkpoints"]}
        assert status == {str(prefix / "run/step-1"): "ok", str(prefix / f"run/step-{step}"): "nonfinite",
                          str(unsealed): "nonfinite"}, status
    cfg = Config.model_validate({"state": {"url": state_url}, "prefixes": [{"url": key}]})
    assert auditor.api.latest(key, config=cfg)["url"] == str(prefix / "run/step-1")


def test_a_file_verified_span_by_span_elsewhere_is_judged_by_its_recorded_stats(tmp_path):
    """With scan.executor: dask a large file's spans are read on the workers, not here: its values are
    judged by what the seal recorded, as at the metadata tier."""
    w = torch.randn(64, 64)
    w[3, 3] = float("inf")
    path = tmp_path / "model.safetensors"
    save_file({"w": w}, str(path))
    auditor.api.seal(str(path), step=1, allow_incomplete=True, force=True, span_bytes=4096)
    spans_read: list[str] = []

    def span_digester(entry: Any, where: str) -> list[Any]:
        spans_read.append(entry.path)
        return []  # the spans matched, on some worker

    options = build_options(Tier.CONTENT)
    options.span_digester = span_digester
    fs = fsspec.filesystem("file")
    with Scanner(fs, options) as scanner:
        v = scanner.verify(locate(scanner.reader, str(path), str(path)))
    assert spans_read == ["model.safetensors"]
    assert v.status == "nonfinite" and errors(v)[0].detail.startswith("recorded at seal: 1 of 1"), v.findings
