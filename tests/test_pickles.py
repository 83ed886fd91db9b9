"""Tests for auditor.pickles: static pickle scanning and guarded torch loading."""

from __future__ import annotations

import io
import os
import pickle
import random
import subprocess
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
from fsspec import AbstractFileSystem

from auditor.pickles import (
    ALLOWED_GLOBALS,
    DCP_METADATA_MODULES,
    NUMPY_RNG_GLOBALS,
    TORCHSCRIPT_ARCHIVE,
    UNRESOLVED_STACK_GLOBAL,
    UnsafePickleError,
    _numpy_safe_globals,
    pickle_strings,
    safe_torch_load,
    scan_pickle,
    scan_torch_file,
)

# Raw opcodes for hand-written pickles.
PROTO4 = b"\x80\x04"
PROTO2 = b"\x80\x02"
MEMOIZE = b"\x94"
POP = b"0"
MARK = b"("
POP_MARK = b"1"
STACK_GLOBAL = b"\x93"
TUPLE1 = b"\x85"
EMPTY_TUPLE = b")"
REDUCE = b"R"
BINPERSID = b"Q"
STOP = b"."


def u(text: str) -> bytes:
    """Encode a SHORT_BINUNICODE push."""
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def binput(key: int) -> bytes:
    """Encode a BINPUT."""
    return b"q" + bytes([key])


def binget(key: int) -> bytes:
    """Encode a BINGET."""
    return b"h" + bytes([key])


@pytest.fixture(params=["file", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[AbstractFileSystem, str]]:
    """Yield a filesystem and an empty folder on it."""
    if request.param == "file":
        yield fsspec.filesystem("file"), str(tmp_path)
        return
    fs = fsspec.filesystem("memory")
    root = f"/test-pickles/{tmp_path.name}"
    fs.mkdir(root)
    yield fs, root
    fs.rm(root, recursive=True)


def save(fs: AbstractFileSystem, path: str, obj: Any, **kwargs: Any) -> str:
    """torch.save obj to path on fs."""
    with fs.open(path, "wb") as f:
        torch.save(obj, f, **kwargs)
    return path


def assert_same(actual: Any, expected: Any) -> None:
    """Compare nested checkpoint content, tensors and arrays by value."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor)
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        # Compare bytes: some dtypes have no equality kernel.
        assert torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))
    elif isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray) and actual.dtype == expected.dtype
        assert np.array_equal(actual, expected)
    elif isinstance(expected, dict):
        assert type(actual) is type(expected) and list(actual) == list(expected)
        for key in expected:
            assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e)
    else:
        assert actual == expected


def model() -> torch.nn.Module:
    """Build a small model with parameters and buffers."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))


def stepped_optimizer() -> torch.optim.Optimizer:
    """Return an AdamW optimizer that has taken one step."""
    net = model()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    net(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return optimizer


class WarmupLambda:
    """A callable LambdaLR factor, whose attributes LambdaLR.state_dict saves."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup

    def __call__(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / self.warmup)


def lambda_scheduler_state() -> dict[str, Any]:
    """Return LambdaLR state with a plain function and a callable object."""
    optimizer = stepped_optimizer()
    optimizer.param_groups.append({**optimizer.param_groups[0], "params": [torch.nn.Parameter(torch.zeros(1))]})
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda epoch: 0.9**epoch, WarmupLambda(10)])
    optimizer.step()
    scheduler.step()
    state = scheduler.state_dict()
    # A plain function is saved as None; a callable object as a copy of its __dict__.
    assert state["lr_lambdas"] == [None, {"warmup": 10}]
    return state


def cosine_scheduler_state() -> dict[str, Any]:
    """Return CosineAnnealingLR state after a step."""
    optimizer = stepped_optimizer()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    optimizer.step()
    scheduler.step()
    return scheduler.state_dict()


def rng_state() -> dict[str, Any]:
    """Return RNG state shaped like Hugging Face Trainer's rng_state.pth."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}


CLEAN_STATES: dict[str, Callable[[], Any]] = {
    "model": lambda: model().state_dict(),
    "model_keep_vars": lambda: {k: v for k, v in model().state_dict(keep_vars=True).items()},
    "adamw": lambda: stepped_optimizer().state_dict(),
    "lambda_lr": lambda_scheduler_state,
    "cosine_lr": cosine_scheduler_state,
    "rng": rng_state,
    "values": lambda: {"size": torch.Size([2, 3]), "device": torch.device("cpu"), "dtype": torch.bfloat16, "set": {1}},
}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", sorted(CLEAN_STATES))
def test_torch_save_scans_clean_and_loads_equal(
    store: tuple[AbstractFileSystem, str], name: str, legacy: bool
) -> None:
    fs, root = store
    state = CLEAN_STATES[name]()
    path = save(fs, f"{root}/{name}.pt", state, _use_new_zipfile_serialization=not legacy)

    assert scan_torch_file(fs, path) == []
    assert_same(safe_torch_load(fs, path), state)


def test_loaded_rng_state_restores_generators(store: tuple[AbstractFileSystem, str]) -> None:
    fs, root = store
    path = save(fs, f"{root}/rng_state.pth", rng_state())
    expected = (random.random(), np.random.random(), torch.rand(1))

    loaded = safe_torch_load(fs, path)
    random.setstate(loaded["python"])
    np.random.set_state(loaded["numpy"])
    torch.random.set_rng_state(loaded["cpu"])

    assert (random.random(), np.random.random()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


# Deduplicated: torch.float and torch.float32 are one dtype.
ALLOWED_DTYPES = sorted(
    {v for v in vars(torch).values() if isinstance(v, torch.dtype) and str(v) in ALLOWED_GLOBALS}, key=str
)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", ALLOWED_DTYPES, ids=str)
def test_every_allowed_dtype_round_trips(store: tuple[AbstractFileSystem, str], dtype: torch.dtype) -> None:
    fs, root = store
    # Bytes viewed as the dtype: no arithmetic, which some of these dtypes lack.
    tensor = torch.arange(16, dtype=torch.uint8).view(dtype)
    path = save(fs, f"{root}/t.pt", {"t": tensor, "dtype": dtype})

    assert scan_torch_file(fs, path) == []
    assert_same(safe_torch_load(fs, path), {"t": tensor, "dtype": dtype})


def test_allow_list_is_accepted_by_torch_weights_only() -> None:
    # Private, but the point is to notice when a torch upgrade drops one of our entries.
    from torch._weights_only_unpickler import _get_allowed_globals

    assert ALLOWED_GLOBALS - NUMPY_RNG_GLOBALS <= set(_get_allowed_globals())
    assert {name for _, name in _numpy_safe_globals()} == NUMPY_RNG_GLOBALS


# Each payload creates the target file when unpickled.
PAYLOADS: dict[str, Callable[[Path], tuple[Any, ...]]] = {
    "posix.system": lambda target: (os.system, (f"touch {target}",)),
    "subprocess.Popen": lambda target: (subprocess.Popen, (["touch", str(target)],)),
    "builtins.exec": lambda target: (exec, (f"open({str(target)!r}, 'w').close()",)),
    "builtins.eval": lambda target: (eval, (f"open({str(target)!r}, 'w').close()",)),
    # builtins.open is io.open, and pickles under that name.
    "io.open": lambda target: (open, (str(target), "w")),
}


class Hostile:
    """Run a payload when unpickled."""

    def __init__(self, reduced: tuple[Any, ...]) -> None:
        self.reduced = reduced

    def __reduce__(self) -> tuple[Any, ...]:
        return self.reduced


def write_zip(fs: AbstractFileSystem, path: str, members: dict[str, bytes]) -> str:
    """Write a zip archive with the given members, stored like torch.save does."""
    with fs.open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def wrap_torch_zip(fs: AbstractFileSystem, path: str, evil: Hostile) -> str:
    return save(fs, path, {"weight": torch.ones(2), "evil": evil})


def wrap_torch_legacy(fs: AbstractFileSystem, path: str, evil: Hostile) -> str:
    return save(fs, path, {"weight": torch.ones(2), "evil": evil}, _use_new_zipfile_serialization=False)


def wrap_hand_zip(fs: AbstractFileSystem, path: str, evil: Hostile) -> str:
    return write_zip(fs, path, {"archive/data.pkl": pickle.dumps(evil, protocol=2), "archive/version": b"3\n"})


def wrap_second_member(fs: AbstractFileSystem, path: str, evil: Hostile) -> str:
    # torch only reads data.pkl, but its reader matches names case-insensitively: scan them all.
    benign = pickle.dumps({"a": 1}, protocol=2)
    return write_zip(fs, path, {"archive/data.pkl": benign, "archive/Other.PKL": pickle.dumps(evil, protocol=2)})


def wrap_raw_proto2(fs: AbstractFileSystem, path: str, evil: Hostile) -> str:
    fs.pipe_file(path, pickle.dumps(evil, protocol=2))
    return path


def wrap_raw_proto4(fs: AbstractFileSystem, path: str, evil: Hostile) -> str:
    # Protocol 4 names globals with STACK_GLOBAL over memoized strings.
    fs.pipe_file(path, pickle.dumps(evil, protocol=4))
    return path


WRAPPERS: dict[str, Callable[[AbstractFileSystem, str, Hostile], str]] = {
    "torch_zip": wrap_torch_zip,
    "torch_legacy": wrap_torch_legacy,
    "hand_zip": wrap_hand_zip,
    "second_member": wrap_second_member,
    "raw_proto2": wrap_raw_proto2,
    "raw_proto4": wrap_raw_proto4,
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_hostile_pickle_is_named_and_never_run(
    store: tuple[AbstractFileSystem, str], tmp_path: Path, payload: str, wrapper: str
) -> None:
    fs, root = store
    target = tmp_path / "pwned"
    path = WRAPPERS[wrapper](fs, f"{root}/evil.pt", Hostile(PAYLOADS[payload](target)))

    assert payload in scan_torch_file(fs, path)
    with pytest.raises(UnsafePickleError) as caught:
        safe_torch_load(fs, path)

    assert payload in caught.value.globals
    assert caught.value.path == path
    assert not target.exists()


def test_hostile_payload_is_live(tmp_path: Path) -> None:
    # Control for the test above: unpickled, the payload does create its target.
    target = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Hostile(PAYLOADS["io.open"](target)), protocol=2)).close()
    assert target.exists()


def test_unsafe_pickle_error() -> None:
    error = UnsafePickleError("s3://b/ckpt.pt", ["posix.system", "builtins.eval"])

    assert isinstance(error, ValueError)
    assert "s3://b/ckpt.pt" in str(error) and "posix.system" in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.globals) == (error.path, error.globals)


HAND_PICKLES: dict[str, tuple[bytes, list[str]]] = {
    # Strings stored, their pushes popped, then fetched back from the memo.
    "memoized": (
        PROTO4 + u("os") + MEMOIZE + u("system") + MEMOIZE + POP + POP
        + binget(0) + binget(1) + STACK_GLOBAL + u("id") + TUPLE1 + REDUCE + STOP,
        ["os.system"],
    ),
    # Allowed strings pushed last and popped: a "last two strings" heuristic would read them.
    "popped_decoy": (
        PROTO4 + u("os") + u("system") + u("collections") + u("OrderedDict") + POP + POP
        + STACK_GLOBAL + EMPTY_TUPLE + REDUCE + STOP,
        ["os.system"],
    ),
    # Decoys inside a MARK frame that POP_MARK discards.
    "mark_decoy": (
        PROTO4 + u("posix") + u("system") + MARK + u("collections") + u("OrderedDict") + POP_MARK
        + STACK_GLOBAL + EMPTY_TUPLE + REDUCE + STOP,
        ["posix.system"],
    ),
    # Memo key 0 is overwritten; the unpickler reads the later value.
    "memo_overwrite": (
        PROTO4 + u("collections") + binput(0) + u("system") + binput(1) + POP + POP
        + u("posix") + binput(0) + POP + binget(0) + binget(1) + STACK_GLOBAL + EMPTY_TUPLE + REDUCE + STOP,
        ["posix.system"],
    ),
    "allowed_stack_global": (
        PROTO4 + u("collections") + MEMOIZE + u("OrderedDict") + MEMOIZE + STACK_GLOBAL + EMPTY_TUPLE + REDUCE + STOP,
        [],
    ),
    # Protocol 2 Python 2 names are renamed by the unpickler, as here.
    "py2_builtin": (PROTO2 + b"c__builtin__\neval\n" + u("1") + TUPLE1 + REDUCE + STOP, ["builtins.eval"]),
    "inst": (b"(S'id'\nios\nsystem\n.", ["os.system"]),
    # The module comes from persistent_load: not knowable statically.
    "persistent_module": (PROTO4 + u("x") + BINPERSID + u("system") + STACK_GLOBAL + STOP, [UNRESOLVED_STACK_GLOBAL]),
    "persistent_callable": (
        PROTO4 + u("x") + BINPERSID + EMPTY_TUPLE + REDUCE + STOP,
        ["<REDUCE of a non-global callable>"],
    ),
    "extension_code": (PROTO2 + b"\x82\x07" + EMPTY_TUPLE + REDUCE + STOP, ["<extension code 7>"]),
    # From protocol 4 a dotted name walks attributes: named with a colon, it extends no allowed name.
    "dotted_attribute": (
        PROTO4 + u("torch.distributed.checkpoint.metadata") + u("Metadata.__class__") + STACK_GLOBAL + STOP,
        ["torch.distributed.checkpoint.metadata:Metadata.__class__"],
    ),
    "dotted_allowed_path": (
        PROTO4 + u("torch") + u("_utils._rebuild_tensor_v2") + STACK_GLOBAL + STOP,
        ["torch:_utils._rebuild_tensor_v2"],
    ),
    "build_on_global": (PROTO2 + b"ctorch\nSize\n" + b"}" + b"b" + STOP, ["<BUILD on a global>"]),
}


@pytest.mark.parametrize("name", sorted(HAND_PICKLES))
def test_scan_hand_written_pickle(name: str) -> None:
    data, expected = HAND_PICKLES[name]
    assert scan_pickle(data) == expected


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_dcp_metadata_needs_only_dcp_globals(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": model().state_dict(), "step": 5}, checkpoint_id=str(tmp_path), no_dist=True)
    data = (tmp_path / ".metadata").read_bytes()

    assert [g for g in scan_pickle(data) if not g.startswith(DCP_METADATA_MODULES)] == []
    assert "model.0.weight" in pickle_strings(data)


def test_dcp_names_do_not_cover_hostile_metadata() -> None:
    found = scan_pickle(pickle.dumps(Hostile((os.system, ("true",))), protocol=4))
    assert [g for g in found if not g.startswith(DCP_METADATA_MODULES)] == ["posix.system"]
    data, _ = HAND_PICKLES["dotted_attribute"]
    assert not any(g.startswith(DCP_METADATA_MODULES) for g in scan_pickle(data))


def test_pickle_strings_refuses_malformed_and_oversize() -> None:
    assert pickle_strings(pickle.dumps({"a": ["b", 1]}, protocol=2)) == ["a", "b"]
    with pytest.raises(ValueError, match="malformed"):
        pickle_strings(b"\xff.")
    with pytest.raises(ValueError, match="limit"):
        pickle_strings(pickle.dumps("x" * 100), max_bytes=10)


class RecordingUnpickler(pickle.Unpickler):
    """CPython's unpickler with imports replaced by a record: nothing is imported or called."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.found: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        self.found.append(f"{module}.{name}")
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("name", ["memoized", "popped_decoy", "mark_decoy", "memo_overwrite", "allowed_stack_global"])
def test_scan_agrees_with_cpython_resolution(name: str) -> None:
    data, expected = HAND_PICKLES[name]
    oracle = RecordingUnpickler(data)
    oracle.load()
    assert [g for g in oracle.found if g not in ALLOWED_GLOBALS] == expected


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_flagged(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "scripted.pt")
    with fs.open(path, "wb") as f:
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), f)

    assert TORCHSCRIPT_ARCHIVE in scan_torch_file(fs, path)
    with pytest.raises(UnsafePickleError):
        safe_torch_load(fs, path)


def truncated_raw(fs: AbstractFileSystem, path: str) -> None:
    fs.pipe_file(path, pickle.dumps({"a": [1, 2, 3], "b": "text"}, protocol=2)[:-4])


def truncated_zip(fs: AbstractFileSystem, path: str) -> None:
    buffer = io.BytesIO()
    torch.save(model().state_dict(), buffer)
    fs.pipe_file(path, buffer.getvalue()[: len(buffer.getvalue()) // 2])


def truncated_member(fs: AbstractFileSystem, path: str) -> None:
    write_zip(fs, path, {"archive/data.pkl": pickle.dumps({"a": 1}, protocol=2)[:-3]})


def truncated_legacy(fs: AbstractFileSystem, path: str) -> None:
    buffer = io.BytesIO()
    torch.save(model().state_dict(), buffer, _use_new_zipfile_serialization=False)
    fs.pipe_file(path, buffer.getvalue()[:200])


def random_bytes(fs: AbstractFileSystem, path: str) -> None:
    data = random.Random(1234).randbytes(4096)
    assert not data.startswith(b"PK")
    fs.pipe_file(path, data)


def empty_file(fs: AbstractFileSystem, path: str) -> None:
    fs.pipe_file(path, b"")


def zip_without_pickle(fs: AbstractFileSystem, path: str) -> None:
    write_zip(fs, path, {"archive/data/0": b"\x00" * 16})


def legacy_tar(fs: AbstractFileSystem, path: str) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        payload = pickle.dumps({"a": 1}, protocol=2)
        info = tarfile.TarInfo("pickle")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    fs.pipe_file(path, buffer.getvalue())


MALFORMED: dict[str, Callable[[AbstractFileSystem, str], None]] = {
    "truncated_raw": truncated_raw,
    "truncated_zip": truncated_zip,
    "truncated_member": truncated_member,
    "truncated_legacy": truncated_legacy,
    "random_bytes": random_bytes,
    "empty_file": empty_file,
    "zip_without_pickle": zip_without_pickle,
    "legacy_tar": legacy_tar,
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_file_raises_value_error(store: tuple[AbstractFileSystem, str], name: str) -> None:
    fs, root = store
    path = f"{root}/bad.pt"
    MALFORMED[name](fs, path)

    with pytest.raises(ValueError):
        scan_torch_file(fs, path)
    with pytest.raises(ValueError):
        safe_torch_load(fs, path)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (pickle.dumps([1, 2, 3], protocol=2)[:-1], "STOP"),
        (b"\xff.", "unknown"),
        (PROTO2 + b"h\x05.", "memo key 5"),
        (PROTO2 + REDUCE + STOP, "stack"),
    ],
    ids=["no_stop", "unknown_opcode", "unset_memo", "stack_underflow"],
)
def test_scan_pickle_names_the_problem(data: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        scan_pickle(data)


def test_oversize_pickle_member_is_refused_fast(store: tuple[AbstractFileSystem, str]) -> None:
    fs, root = store
    big = pickle.dumps("x" * (3 * 2**20), protocol=2)
    path = write_zip(fs, f"{root}/big.pt", {"archive/data.pkl": big})

    started = time.monotonic()
    with pytest.raises(ValueError, match="limit"):
        scan_torch_file(fs, path, max_pickle_bytes=2**20)
    with pytest.raises(ValueError, match="limit"):
        safe_torch_load(fs, path, max_pickle_bytes=2**20)
    assert time.monotonic() - started < 1.0
    assert scan_torch_file(fs, path, max_pickle_bytes=4 * 2**20) == []


def test_oversize_raw_pickle_is_refused(store: tuple[AbstractFileSystem, str]) -> None:
    fs, root = store
    path = f"{root}/big.pkl"
    fs.pipe_file(path, pickle.dumps("x" * 2**20, protocol=2))

    with pytest.raises(ValueError, match="limit"):
        scan_torch_file(fs, path, max_pickle_bytes=2**16)
    with pytest.raises(ValueError, match="limit"):
        scan_pickle(pickle.dumps("x" * 2**20, protocol=2), max_bytes=2**16)


def test_forged_length_is_not_allocated(store: tuple[AbstractFileSystem, str]) -> None:
    fs, root = store
    path = f"{root}/forged.pkl"
    # BINBYTES8 claiming 2**62 bytes in a tiny file: the reader must not try to allocate it.
    fs.pipe_file(path, b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"abc")

    with pytest.raises(ValueError):
        scan_torch_file(fs, path)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Flip, drop or insert a few bytes."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        index = rng.randrange(len(out))
        choice = rng.random()
        if choice < 0.6:
            out[index] = rng.randrange(256)
        elif choice < 0.8:
            del out[index]
        else:
            out.insert(index, rng.randrange(256))
    return bytes(out)


# pickletools warns on a protocol 0 string with an invalid escape, which mutation produces.
@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")
def test_corrupted_input_only_ever_raises_value_error(store: tuple[AbstractFileSystem, str]) -> None:
    fs, root = store
    rng = random.Random(7)
    seeds = []
    for legacy in (False, True):
        buffer = io.BytesIO()
        torch.save({"w": torch.ones(2), "s": {1}, "b": b"xy"}, buffer, _use_new_zipfile_serialization=not legacy)
        seeds.append(buffer.getvalue())
    pickles = [pickle.dumps({"a": [1, (2, "x")], "b": frozenset([1]), "c": 2**70}, protocol=p) for p in range(6)]

    for _ in range(300):
        path = f"{root}/fuzz.pt"
        fs.pipe_file(path, mutate(rng.choice(seeds), rng))
        try:
            assert isinstance(scan_torch_file(fs, path), list)
        except ValueError:
            pass
    for _ in range(2000):
        try:
            assert isinstance(scan_pickle(mutate(rng.choice(pickles), rng)), list)
        except ValueError:
            pass
