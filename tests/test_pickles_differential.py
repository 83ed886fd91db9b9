"""Differential test: our skeleton reader against torch.load(weights_only=True), file by file.

Two corpora, generated here: hostile files (classic opcode tricks, persistent-id and zip tricks,
rebuilt PoCs of published torch weights_only, picklescan and fickling advisories) and benign real
files (state dicts, optimizers, schedulers, RNG states as the HF Trainer writes them, sparse and
quantized tensors, Counter). The rules:

- anything torch refuses, we refuse;
- anything we allow, torch loads (weights_only=True), and even a plain unpickler
  (weights_only=False) runs nothing from it;
- every hostile file is refused by us, every benign file allowed;
- no payload ever runs: each would touch its own canary file.

torch runs in one child process, so a payload that somehow ran could not touch the test process.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import subprocess
import sys
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
from ckpts import Hostile

from auditor.pickles import TORCH_LEGACY_MAGIC, TORCH_LEGACY_PROTOCOL, UnsafePickleError, read_torch_skeleton

ROOT = Path(__file__).resolve().parents[1]
LOCAL = fsspec.filesystem("file")


def u(text: str) -> bytes:
    """BINUNICODE (in torch's opcode set), as torch.save writes strings."""
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def su(text: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4)."""
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def torch_zip(data_pkl: bytes, *, extra: dict[str, bytes] | None = None, first: dict[str, bytes] | None = None,
              compress: int = zipfile.ZIP_STORED, bad_crc: bool = False) -> bytes:
    """A real torch.save zip (one float tensor of 4 elements, storage '0') with data.pkl replaced."""
    buffer = io.BytesIO()
    torch.save({"t": torch.ones(4)}, buffer)
    with zipfile.ZipFile(buffer) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, content in (first or {}).items():
            zf.writestr(name, content)
        for name, content in members:
            is_pkl = name.endswith("/data.pkl")
            zf.writestr(name, data_pkl if is_pkl else content, compress_type=compress if is_pkl else zipfile.ZIP_STORED)
        for name, content in (extra or {}).items():
            zf.writestr(name, content)
    data = out.getvalue()
    if bad_crc:
        # Corrupt the CRC recorded for data.pkl in the central directory (torch never checks it).
        # data.pkl is the first member, so its central record comes first; the CRC is at +16.
        at = data.index(b"PK\x01\x02") + 16
        data = data[:at] + bytes(b ^ 0xFF for b in data[at:at + 4]) + data[at + 4:]
    return data


def torch_bytes(obj: Any, *, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def tensor_pickle(pid: tuple[Any, ...] | None, size: tuple[int, ...] = (4,), stride: tuple[int, ...] = (1,),
                  tail: bytes = b"", hooks: OrderedDict[Any, Any] | None = None) -> bytes:
    """data.pkl of {'t': tensor} with a chosen persistent id; `tail` is spliced in after the tensor."""

    class Storage:
        pass

    class Rebuild:
        def __reduce__(self) -> tuple[Any, ...]:
            return (torch._utils._rebuild_tensor_v2, (Storage(), 0, size, stride, False, hooks or OrderedDict()))

    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.persistent_id = lambda obj: pid if isinstance(obj, Storage) else None  # type: ignore[method-assign]
    pickler.dump({"t": Rebuild()})
    data = buffer.getvalue()
    if tail:
        at = data.rindex(b"R")
        data = data[: at + 1] + tail + data[at + 1:]
    return data


STORAGE = ("storage", torch.FloatStorage, "0", "cpu", 4)


def call(module: str, name: str, arg: str, *, proto: int = 2) -> bytes:
    """A pickle calling module.name(arg): GLOBAL below protocol 4, STACK_GLOBAL (dotted names) at 4."""
    if proto >= 4:
        return b"\x80\x04" + su(module) + su(name) + b"\x93" + su(arg) + b"\x85R."
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + u(arg) + b"\x85R."


# Published scanner bypasses: callables that run code (or write files) which blocklists missed.
ADVISORY_CALLS = [
    ("pip", "main", 2),  # CVE-2025-1716 (picklescan)
    ("asyncio.unix_events", "_UnixSubprocessTransport", 2),  # CVE-2025-10157
    ("bdb", "Bdb.run", 4),  # GHSA-46h3-79wf-xr6c
    ("pdb", "run", 2),
    ("cProfile", "runctx", 2),  # GHSA-9w88-8rmg-7g2p
    ("profile", "Profile.runctx", 4),
    ("trace", "Trace.runctx", 4),
    ("timeit", "timeit", 2),
    ("doctest", "debug_script", 2),  # GHSA-fqq6-7vqf-w3fg
    ("ensurepip", "_run_pip", 2),  # GHSA-xp4f-hrf8-rxw7
    ("idlelib.pyshell", "ModifiedInterpreter.runcode", 4),  # GHSA-3gf5-cxq9-w223
    ("lib2to3.pgen2.grammar", "Grammar.loads", 4),
    ("code", "InteractiveInterpreter.runcode", 4),
    ("torch.utils.bottleneck.__main__", "run_autograd_prof", 2),  # GHSA-4whj-rm5r-c2v8
    ("numpy.f2py.crackfortran", "getlincoef", 2),
    ("pty", "spawn", 2),  # fickling #108
    ("runpy", "_run_code", 2),
    ("_operator", "attrgetter", 2),  # GHSA-m273-6v24-x4m4
    ("functools", "partial", 2),
    ("builtins", "getattr", 2),
    ("shutil", "rmtree", 2),
    ("_io", "FileIO", 2),  # CVE-2025-10156
    ("distutils.file_util", "write_file", 2),  # CVE-2025-10155
    ("torch.storage", "_load_from_bytes", 2),
    ("torch.serialization", "load", 2),
    ("torch.hub", "load", 2),
    ("torch.jit", "load", 2),
    ("numpy", "load", 2),
    ("numpy.testing._private.utils", "runstring", 2),
]


def hostile_corpus(canary: Path) -> dict[str, bytes]:
    """name -> file content; a live payload touches canary/<name>."""

    def live(name: str) -> Hostile:
        return Hostile((os.system, (f"touch {canary / name}",)))

    def cmd(name: str) -> str:
        return f"touch {canary / name}"

    corpus: dict[str, bytes] = {}

    def add(name: str, build: Callable[[str], bytes]) -> None:
        corpus[name] = build(name)

    # Classic opcode tricks.
    add("global_reduce_p0", lambda n: pickle.dumps(live(n), protocol=0))
    add("global_reduce_p2", lambda n: pickle.dumps(live(n), protocol=2))
    add("inst", lambda n: b"(S'" + cmd(n).encode() + b"'\nios\nsystem\n.")
    add("obj", lambda n: b"(cos\nsystem\nS'" + cmd(n).encode() + b"'\no.")
    add("newobj_ex", lambda n: b"\x80\x04" + su("subprocess") + su("Popen") + b"\x93]" + su("touch")
        + su(str(canary / n)) + b"e\x85}\x92.")
    add("memo_stack_global", lambda n: b"\x80\x04" + su("posix") + b"\x94" + su("system") + b"\x94" + b"00"
        + b"h\x00h\x01\x93" + su(cmd(n)) + b"\x85R.")
    # picklescan #14: BINPUT and MEMOIZE mixed so that memo[0] is not what a naive tracker thinks.
    add("memo_confusion", lambda n: b"\x80\x04" + su("posix") + b"q\x00" + su("system") + b"q\x01"
        + su("torch._utils") + b"\x94" + su("_rebuild_tensor_v2") + b"\x94" + b"0000"
        + b"h\x00h\x01\x93" + su(cmd(n)) + b"\x85R.")
    # picklescan #22: memo written out of order.
    add("memo_out_of_order", lambda n: b"Vposix\np2\n0Vsystem\np3\n0Vtorch\np0\n0VLongStorage\np1\n0"
        + b"g2\ng3\n\x93(V" + cmd(n).encode() + b"\ntR.")
    add("load_from_bytes", lambda n: pickle.dumps(Hostile((torch.storage._load_from_bytes,
                                                           (torch_bytes(live(n)),))), protocol=2))
    add("nested_pickle_loads", lambda n: pickle.dumps(Hostile((pickle.loads, (pickle.dumps(live(n)),))),
                                                      protocol=2))
    add("ext1", lambda n: b"\x80\x02\x82\x07" + u(cmd(n)) + b"\x85R.")
    add("build_on_global", lambda n: b"\x80\x02ctorch\nSize\n}b.")
    add("build_on_list", lambda n: b"\x80\x02]}b.")
    add("append_to_dict", lambda n: b"\x80\x02}K\x01a.")
    add("setitem_on_list", lambda n: b"\x80\x02]K\x01K\x02s.")
    # Broken streams: the payload runs before the break (fickling #138: nullifAI).
    add("nullifai", lambda n: pickle.dumps(live(n), protocol=2)[:-1] + b"X\x10\x00\x00\x00ab.")
    add("no_stop", lambda n: pickle.dumps(live(n), protocol=2)[:-1])
    add("bad_opcode", lambda n: pickle.dumps(live(n), protocol=2)[:-1] + b"\xff")
    # fickling #322: an opcode a scanner does not decode (FLOAT) ahead of the payload.
    add("float_prefix", lambda n: b"}F1.0\n0cos\nsystem\n(S'" + cmd(n).encode() + b"'\ntR.")
    for module, name, proto in ADVISORY_CALLS:
        add(f"advisory_{module}.{name}", lambda n, m=module, a=name, p=proto: call(m, a, cmd(n), proto=p))
    # Legacy streams: payload past the first STOP, and the object-array magic number.
    add("legacy_payload", lambda n: torch_bytes({"w": torch.ones(2), "x": live(n)}, legacy=True))
    add("legacy_object_magic", lambda n: b"".join([
        pickle.dumps(np.array(TORCH_LEGACY_MAGIC, dtype=object), protocol=2),
        pickle.dumps(np.array(TORCH_LEGACY_PROTOCOL, dtype=object), protocol=2),
        pickle.dumps({}, protocol=2), pickle.dumps({"w": live(n)}, protocol=2), pickle.dumps([], protocol=2)]))
    # Not hostile, but a file torch cannot load: a legacy stream of a uint16 tensor (untyped storage).
    add("legacy_untyped_storage", lambda n: torch_bytes({"u16": torch.arange(4, dtype=torch.int32).to(torch.uint16)},
                                                        legacy=True))
    add("legacy_module_persid", lambda n: b"".join([
        pickle.dumps(TORCH_LEGACY_MAGIC, protocol=2), pickle.dumps(TORCH_LEGACY_PROTOCOL, protocol=2),
        pickle.dumps({}, protocol=2),
        b"\x80\x02(" + u("module") + b"cbuiltins\neval\nNNtQ" + u(f"__import__('os').system({cmd(n)!r})")
        + b"\x85R.", pickle.dumps([], protocol=2)]))
    # Zip tricks.
    add("zip_payload", lambda n: torch_zip(pickle.dumps({"t": live(n)}, protocol=2)))
    add("zip_deflated", lambda n: torch_zip(pickle.dumps(live(n), protocol=2), compress=zipfile.ZIP_DEFLATED))
    add("zip_bzip2", lambda n: torch_zip(pickle.dumps(live(n), protocol=2), compress=zipfile.ZIP_BZIP2))
    add("zip_broken_crc", lambda n: torch_zip(pickle.dumps(live(n), protocol=2), bad_crc=True))
    add("zip_hidden_member", lambda n: torch_zip(tensor_pickle(STORAGE),
                                                 extra={"archive/extra.pkl": pickle.dumps(live(n), protocol=2)}))
    add("zip_case_twin", lambda n: torch_zip(tensor_pickle(STORAGE),
                                             extra={"archive/DATA.PKL": pickle.dumps(live(n), protocol=2)}))
    add("zip_first_prefix", lambda n: torch_zip(tensor_pickle(STORAGE),
                                                first={"evil/data.pkl": pickle.dumps(live(n), protocol=2)}))
    add("zip_no_data_pkl", lambda n: torch_zip(b"", first={"evil/other.pkl": pickle.dumps(live(n), protocol=2)}))
    # Persistent-id tricks.
    add("persid_not_storage", lambda n: torch_zip(tensor_pickle(("module", torch.FloatStorage, "0", "cpu", 4))))
    add("persid_int", lambda n: torch_zip(b"\x80\x02K\x00Q."))
    add("persid_global_type", lambda n: torch_zip(tensor_pickle(("storage", os.system, "0", "cpu", 4))))
    add("persid_called", lambda n: torch_zip(b"\x80\x02(" + u("storage") + b"ctorch\nFloatStorage\n" + u("0")
                                             + u("cpu") + b"K\x04tQ" + u(cmd(n)) + b"\x85R."))
    # CVE-2026-24747: SETITEM on a non-dict, and a storage larger than its record.
    add("setitem_on_tensor", lambda n: torch_zip(tensor_pickle(STORAGE, tail=u("k") + b"K\x01s")))
    add("storage_larger_than_record", lambda n: torch_zip(tensor_pickle(("storage", torch.FloatStorage, "0",
                                                                          "cpu", 1000), size=(1000,))))
    add("view_outside_storage", lambda n: torch_zip(tensor_pickle(STORAGE, size=(3,), stride=(2,))))
    add("tensor_backward_hooks", lambda n: torch_zip(tensor_pickle(STORAGE, hooks=OrderedDict({1: 2}))))
    return corpus


class WarmupLambda:
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup

    def __call__(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / self.warmup)


def _optimizer(kind: str = "adamw") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = (torch.optim.AdamW(net.parameters(), lr=1e-3) if kind == "adamw"
           else torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    return net, opt


def _scheduler(kind: str) -> dict[str, Any]:
    _, opt = _optimizer()
    lr = torch.optim.lr_scheduler
    sched = {
        "step": lambda: lr.StepLR(opt, 10),
        "cosine": lambda: lr.CosineAnnealingLR(opt, 10),
        "lambda": lambda: lr.LambdaLR(opt, WarmupLambda(10)),
        "plateau": lambda: lr.ReduceLROnPlateau(opt),
        "onecycle": lambda: lr.OneCycleLR(opt, max_lr=0.1, total_steps=10),
        "sequential": lambda: lr.SequentialLR(opt, [lr.LinearLR(opt), lr.ExponentialLR(opt, 0.9)], milestones=[2]),
    }[kind]()
    opt.step()
    sched.step(1.0) if kind == "plateau" else sched.step()
    return sched.state_dict()


def _rng() -> dict[str, Any]:
    # As transformers.Trainer._save_rng_state writes it on a CPU machine.
    return {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}


def _shared_views() -> dict[str, Any]:
    base = torch.arange(12.0)
    return {"a": base[:6], "b": base[6:], "t": base.view(3, 4).t(), "empty": torch.empty(0), "scalar": torch.tensor(3)}


def benign_corpus() -> dict[str, bytes]:
    net, adamw = _optimizer()
    _, sgd = _optimizer("sgd")
    i = torch.tensor([[0, 1], [1, 0]])
    cases: dict[str, Callable[[], Any]] = {
        "state_dict": net.state_dict,
        "state_dict_keep_vars": lambda: net.state_dict(keep_vars=True),
        "adamw": adamw.state_dict,
        "sgd_momentum": sgd.state_dict,
        **{f"scheduler_{k}": (lambda k=k: _scheduler(k))
           for k in ("step", "cosine", "lambda", "plateau", "onecycle", "sequential")},
        "grad_scaler": lambda: torch.amp.GradScaler("cpu").state_dict(),
        "rng_state": _rng,
        "sparse": lambda: {"coo": torch.sparse_coo_tensor(i, torch.tensor([1.0, 2.0]), (2, 2)),
                           "csr": torch.eye(3).to_sparse_csr()},
        "quantized": lambda: {"q": torch.quantize_per_tensor(torch.rand(4), 0.1, 3, torch.quint8),
                              "qc": torch.quantize_per_channel(torch.rand(2, 3), torch.tensor([0.1, 0.2]),
                                                               torch.tensor([1, 2]), 0, torch.qint8)},
        "counter": lambda: {"tokens": Counter({"a": 3, "b": 1}), "empty": Counter()},
        "values": lambda: {"size": torch.Size([2, 3]), "device": torch.device("cpu"), "dtype": torch.bfloat16,
                           "set": {1, 2}, "bytes": b"\x00\xff", "bytearray": bytearray(b"ab"), "complex": 1 + 2j,
                           "nested": [(1, "x"), {"k": None}], "big": 2**70, "float": float("inf")},
        "v3_dtypes": lambda: {"u16": torch.arange(4, dtype=torch.int32).to(torch.uint16),
                              "f8": torch.zeros(4).to(torch.float8_e4m3fn)},
        "shared_views": _shared_views,
        "parameter": lambda: {"p": torch.nn.Parameter(torch.ones(2, 2))},
    }
    corpus = {name: torch_bytes(build()) for name, build in cases.items()}
    for name in ("state_dict", "adamw", "rng_state", "scheduler_plateau", "counter", "sparse", "quantized", "values",
                 "shared_views", "parameter", "grad_scaler"):
        corpus[f"legacy_{name}"] = torch_bytes(cases[name](), legacy=True)
    # A list holding itself (fickling #196): odd, harmless, and torch loads it.
    corpus["self_referential_list"] = torch_zip(b"\x80\x02]q\x00h\x00a.")
    return corpus


TORCH_SIDE = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import torch
from auditor.pickles import _numpy_safe_globals
request = json.load(open(sys.argv[1]))
out = {}
with torch.serialization.safe_globals(_numpy_safe_globals()):
    for name, path in request["weights_only"].items():
        try:
            torch.load(path, weights_only=True, map_location="cpu")
            out[name] = "loaded"
        except BaseException as e:
            out[name] = f"refused: {type(e).__name__}: {str(e)[:160]}"
for name, path in request["plain"].items():
    try:
        torch.load(path, weights_only=False, map_location="cpu")
        out[name + "#plain"] = "loaded"
    except BaseException as e:
        out[name + "#plain"] = f"refused: {type(e).__name__}: {str(e)[:160]}"
print(json.dumps(out))
"""


def ours(path: Path) -> str:
    try:
        read_torch_skeleton(LOCAL, str(path))
    except UnsafePickleError as e:
        return f"refused: {e}"
    except ValueError as e:
        return f"refused (not a torch file): {e}"
    return "allowed"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_differential_against_torch_weights_only(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    files = tmp_path / "files"
    files.mkdir()
    corpus = {**{f"hostile/{k}": v for k, v in hostile_corpus(canary).items()},
              **{f"benign/{k}": v for k, v in benign_corpus().items()}}
    paths: dict[str, str] = {}
    for index, (name, data) in enumerate(sorted(corpus.items())):
        path = files / f"{index:03d}.pt"
        path.write_bytes(data)
        paths[name] = str(path)
    verdicts = {name: ours(Path(p)) for name, p in paths.items()}
    assert not list(canary.iterdir())

    request = tmp_path / "request.json"
    allowed = {n: p for n, p in paths.items() if verdicts[n] == "allowed"}
    request.write_text(json.dumps({"weights_only": paths, "plain": allowed}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", TORCH_SIDE, str(request)], capture_output=True, text=True,
                         env=env, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    torch_side = json.loads(out.stdout.strip().splitlines()[-1])

    problems = []
    for name in sorted(paths):
        mine, theirs = verdicts[name], torch_side[name]
        if theirs.startswith("refused") and mine == "allowed":
            problems.append(f"{name}: torch refuses ({theirs}), we allow")
        if mine == "allowed" and torch_side[name + "#plain"] != "loaded":
            problems.append(f"{name}: we allow, a plain torch.load fails: {torch_side[name + '#plain']}")
        if name.startswith("hostile/") and mine == "allowed":
            problems.append(f"{name}: hostile, and we allow it")
        if name.startswith("benign/") and mine != "allowed":
            problems.append(f"{name}: benign, and we refuse it: {mine[:300]}")
    assert not problems, "\n".join(problems)
    assert not list(canary.iterdir()), "a payload ran"
    # The corpus is what it claims: torch refuses most hostile files itself, and loads every benign one.
    assert all(torch_side[n] == "loaded" for n in paths if n.startswith("benign/"))
    refused_by_torch = [n for n in paths if n.startswith("hostile/") and torch_side[n].startswith("refused")]
    assert len(refused_by_torch) >= len([n for n in paths if n.startswith("hostile/")]) - 5, torch_side
    assert torch_side["hostile/legacy_untyped_storage"].startswith("refused")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_hostile_corpus_is_live(tmp_path: Path) -> None:
    # Control for the test above: unpickled plainly, the payloads do run.
    canary = tmp_path / "canary"
    canary.mkdir()
    corpus = hostile_corpus(canary)
    for name in ("global_reduce_p2", "inst", "obj", "memo_stack_global", "memo_confusion", "nullifai", "float_prefix"):
        try:
            pickle.loads(corpus[name])
        except Exception:  # noqa: BLE001, S110 - broken streams raise after the payload ran
            pass
        assert (canary / name).exists(), name


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(out))
        roll = rng.random()
        if roll < 0.6:
            out[at] = rng.randrange(256)
        elif roll < 0.8:
            del out[at]
        else:
            out.insert(at, rng.randrange(256))
    return bytes(out)


def _data_pkl(zipped: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(zipped)) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))


def _with_data_pkl(zipped: bytes, data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(zipped)) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, content in members:
            zf.writestr(name, data if name.endswith("/data.pkl") else content)
    return out.getvalue()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_mutants_we_allow_torch_loads(tmp_path: Path) -> None:
    # Randomly damaged pickles of real files: whatever the reader still allows must load in torch.
    rng = random.Random(20261201)
    seeds = {k: v for k, v in benign_corpus().items() if k in ("adamw", "rng_state", "values", "sparse", "quantized",
                                                                "shared_views", "legacy_adamw", "legacy_values")}
    paths: dict[str, str] = {}
    refused = 0
    for i in range(600):
        name = rng.choice(sorted(seeds))
        seed = seeds[name]
        data = _mutate(seed, rng) if name.startswith("legacy_") else _with_data_pkl(seed, _mutate(_data_pkl(seed), rng))
        path = tmp_path / f"m{i:03d}.pt"
        path.write_bytes(data)
        if ours(path) == "allowed":
            paths[f"{name}#{i}"] = str(path)
        else:
            refused += 1
    assert refused > 100 and len(paths) > 20  # the mutations do both
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"weights_only": paths, "plain": {}}))
    out = subprocess.run([sys.executable, "-c", TORCH_SIDE, str(request)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    torch_side = json.loads(out.stdout.strip().splitlines()[-1])
    failed = {n: r for n, r in torch_side.items() if r != "loaded"}
    assert not failed, json.dumps(failed, indent=1)[:4000]
