"""Hostile and odd pickles through the skeleton reader and the content tier: fail closed, never run.

Every payload is generated here; one that would run code touches a canary file, and each test
asserts the canary is absent after the auditor looked at the file. Where it matters, a control
shows that the payload is live under the loader torch (or DCP) would use.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import subprocess
import sys
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
from ckpts import MLP, Hostile, write_hf_checkpoint

import auditor.api
from auditor import pickles
from auditor.pickles import (
    TORCH_LEGACY_MAGIC,
    TORCH_LEGACY_PROTOCOL,
    Opaque,
    ScanLimits,
    StorageRef,
    TensorRef,
    UnknownFormatError,
    UnsafePickleError,
    read_skeleton,
    read_torch_skeleton,
    scan_torch_file,
)

ROOT = Path(__file__).resolve().parents[1]
LOCAL = fsspec.filesystem("file")


def touch(target: Path) -> Hostile:
    return Hostile((os.system, (f"touch {target}",)))


def verdict(run: Path, tier: str = "content") -> Any:
    result = auditor.api.rescan(str(run), tier=tier)
    assert len(result.verdicts) == 1, result.to_dict()
    return result.verdicts[0]


def findings(v: Any, code: str) -> list[Any]:
    return [f for f in v.findings if f.code == code]


def run_python(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter that imports this worktree's auditor."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def torch_load_unsafely(path: Path) -> None:
    """Control: what torch.load(weights_only=False) does with the file, in a child process."""
    run_python("import sys, torch\ntry: torch.load(sys.argv[1], weights_only=False)\nexcept Exception: pass",
               str(path))


def replace_data_pkl(path: Path, data: bytes, *, compress: int = zipfile.ZIP_STORED) -> None:
    """Rewrite a torch.save zip with its data.pkl replaced (other members kept as they are)."""
    with zipfile.ZipFile(path) as zf:
        members = [(info.filename, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in members:
            zf.writestr(name, data if name.endswith("/data.pkl") else content,
                        compress_type=compress if name.endswith("/data.pkl") else zipfile.ZIP_STORED)


def legacy_stream(*pickled: bytes, tail: bytes = b"") -> bytes:
    return b"".join(pickled) + tail


def hf_run(tmp_path: Path) -> tuple[Path, Path]:
    folder = write_hf_checkpoint(tmp_path / "run/checkpoint-100", step=100)
    return tmp_path / "run", folder


# ---------------------------------------------------------------- row 2: legacy framing


def object_magic_file(path: Path, target: Path) -> None:
    """A legacy stream whose magic and protocol are 0-d numpy object arrays: they compare equal."""
    path.write_bytes(legacy_stream(
        pickle.dumps(np.array(TORCH_LEGACY_MAGIC, dtype=object), protocol=2),
        pickle.dumps(np.array(TORCH_LEGACY_PROTOCOL, dtype=object), protocol=2),
        pickle.dumps({}, protocol=2),
        pickle.dumps({"w": touch(target)}, protocol=2),
        pickle.dumps([], protocol=2),
    ))


def test_legacy_object_array_magic_is_unsafe_and_never_run(tmp_path: Path) -> None:
    run, folder = hf_run(tmp_path)
    target = tmp_path / "pwned"
    object_magic_file(folder / "optimizer.pt", target)

    with pytest.raises(UnsafePickleError, match="magic"):
        read_torch_skeleton(LOCAL, str(folder / "optimizer.pt"))
    assert scan_torch_file(LOCAL, str(folder / "optimizer.pt")) != []
    v = verdict(run)
    assert v.status == "unsafe"
    (f,) = findings(v, "unsafe_pickle")
    assert f.file == "optimizer.pt" and "magic" in f.detail
    assert not target.exists()
    # Control: torch's legacy loader compares the array, finds it "equal" and runs the payload.
    torch_load_unsafely(folder / "optimizer.pt")
    assert target.exists()


@pytest.mark.parametrize("case", ["protocol", "sys_info", "keys", "missing_keys", "extra_storage"])
def test_legacy_framing_must_be_exactly_torchs(tmp_path: Path, case: str) -> None:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buffer, _use_new_zipfile_serialization=False)
    good = buffer.getvalue()
    path = tmp_path / "state.pt"
    path.write_bytes(good)
    skeleton = read_torch_skeleton(LOCAL, str(path))
    assert skeleton.format == "legacy" and isinstance(skeleton.value["w"], TensorRef)
    # Split the good stream into its five pickles.
    reader = io.BytesIO(good)
    parts = []
    for _ in range(5):
        start = reader.tell()
        for _ in pickletools.genops(reader):
            pass
        parts.append(good[start:reader.tell()])
    data = good[reader.tell():]
    if case == "protocol":
        parts[1] = pickle.dumps(1000, protocol=2)
    elif case == "sys_info":
        parts[2] = pickle.dumps(Counter(a=1), protocol=2)
    elif case == "keys":
        parts[4] = pickle.dumps(("0",), protocol=2)
    elif case == "missing_keys":
        parts[4] = pickle.dumps([], protocol=2)
    else:
        # The storage data the keys promise is not in the file.
        data = data[:10]
    path.write_bytes(b"".join(parts) + data)

    with pytest.raises(UnsafePickleError, match="legacy framing|declare"):
        read_torch_skeleton(LOCAL, str(path))


# ---------------------------------------------------------------- row 3: fail closed


def broken_after_payload(target: Path, how: str) -> bytes:
    live = pickle.dumps(touch(target), protocol=2)
    if how == "bad_opcode":
        return live[:-1] + b"\xff"
    if how == "no_stop":
        return live[:-1]
    # nullifAI: a BINUNICODE that claims more bytes than follow, just before the STOP.
    return live[:-1] + b"X\x10\x00\x00\x00ab."


@pytest.mark.parametrize("how", ["bad_opcode", "no_stop", "nullifai"])
def test_payload_then_broken_stream_is_unsafe(tmp_path: Path, how: str) -> None:
    run, folder = hf_run(tmp_path)
    target = tmp_path / "pwned"
    (folder / "rng_state.pth").write_bytes(broken_after_payload(target, how))

    v = verdict(run)
    assert v.status == "unsafe", v.findings
    (f,) = findings(v, "unsafe_pickle")
    assert f.file == "rng_state.pth" and "cannot be parsed completely" in f.detail and "posix.system" in f.detail
    assert not findings(v, "pickle_unreadable")
    assert not target.exists()
    # Control: a plain unpickler runs the payload before it meets the break.
    torch_load_unsafely(folder / "rng_state.pth")
    assert target.exists()


def test_bzip2_pickle_member_is_unsafe(tmp_path: Path) -> None:
    run, folder = hf_run(tmp_path)
    path = folder / "optimizer.pt"
    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    replace_data_pkl(path, data, compress=zipfile.ZIP_BZIP2)

    v = verdict(run)
    assert v.status == "unsafe"
    (f,) = findings(v, "unsafe_pickle")
    assert f.file == "optimizer.pt" and "compression method 12" in f.detail


def test_opcode_outside_torchs_set_is_refused() -> None:
    # SHORT_BINUNICODE is ordinary pickle, but torch's weights_only unpickler does not implement it.
    data = pickle.dumps({"a": 1}, protocol=4)
    with pytest.raises(UnsafePickleError, match="weights_only unpickler does not implement"):
        read_skeleton(data, torch_ops=True)
    assert read_skeleton(data).value == {"a": 1}


# ---------------------------------------------------------------- row 11: bombs


def test_bytearray_bomb_is_refused_without_allocating(tmp_path: Path) -> None:
    run, folder = hf_run(tmp_path)
    bomb = pickle.dumps(Hostile((bytearray, (2**31,))), protocol=2)
    assert len(bomb) < 64
    (folder / "rng_state.pth").write_bytes(bomb)
    # In a child, so its peak memory is its own: on main the check loaded this, 2 GiB.
    out = run_python(
        "import json, resource, sys, auditor.api\n"
        "v = auditor.api.rescan(sys.argv[1], tier='content').verdicts[0]\n"
        "print(json.dumps({'status': v.status, 'codes': [f.code for f in v.findings],"
        " 'detail': [f.detail for f in v.findings], 'torch': 'torch' in sys.modules,"
        # VmHWM is this process's own peak; ru_maxrss keeps the forking parent's across exec.
        " 'rss_kib': next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))}))",
        str(run),
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["status"] == "unsafe" and "unsafe_pickle" in report["codes"]
    assert any("bytearray of 2147483648 bytes" in d for d in report["detail"])
    assert report["rss_kib"] < 400 * 1024 and not report["torch"]


@pytest.mark.parametrize("op", [b"\x94", b"r"], ids=["MEMOIZE", "LONG_BINPUT"])
def test_memo_bomb_is_refused_within_limits(tmp_path: Path, op: bytes) -> None:
    count = 50_000
    if op == b"\x94":
        body = op * count
    else:
        body = b"".join(op + i.to_bytes(4, "little") for i in range(count))
    data = b"\x80\x02]" + body + b"."
    limits = ScanLimits(max_memo=10_000)
    with pytest.raises(UnsafePickleError, match="memo (entries|index)"):
        read_skeleton(data, limits=limits)
    # Below the limit the same shape is only a list.
    assert read_skeleton(b"\x80\x02]" + body[: len(body) // 10] + b".", limits=limits).value == []


def test_far_memo_index_is_refused() -> None:
    # CPython's unpickler sizes its memo array by the largest index: LONG_BINPUT 2**32-1 is a bomb.
    with pytest.raises(UnsafePickleError, match="memo index 4294967295"):
        read_skeleton(b"\x80\x02]r\xff\xff\xff\xff.")


def test_integer_tensor_requiring_grad_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"t": torch.ones(4)}, path)
    data = storage_pickle(4, (4,), (1,)).replace(b"ctorch\nFloatStorage", b"ctorch\nLongStorage")
    replace_data_pkl(path, data.replace(b"\x89", b"\x88"))  # requires_grad False -> True
    with pytest.raises(UnsafePickleError, match="int64 tensor that requires grad"):
        read_torch_skeleton(LOCAL, str(path))


def test_default_limits_stop_a_memo_bomb_file(tmp_path: Path) -> None:
    run, folder = hf_run(tmp_path)
    (folder / "rng_state.pth").write_bytes(b"\x80\x02]" + b"\x94" * 1_100_000 + b".")
    v = verdict(run)
    assert v.status == "unsafe"
    (f,) = findings(v, "unsafe_pickle")
    assert "memo entries (scan limit)" in f.detail


@pytest.mark.parametrize("limit", ["max_ops", "max_stack", "max_elements"])
def test_scan_limits_bound_time_and_memory(limit: str) -> None:
    data = pickle.dumps([[i] for i in range(2000)], protocol=2)
    with pytest.raises(UnsafePickleError, match="scan limit"):
        read_skeleton(data, limits=ScanLimits(**{limit: 500}))
    deep = b"\x80\x02" + b"(" * 600 + b"N."
    with pytest.raises(UnsafePickleError, match="scan limit"):
        read_skeleton(deep, limits=ScanLimits(max_stack=500))


def test_deeply_nested_tuple_key_is_refused_not_crashing() -> None:
    # Hashing a tuple nested a million deep would overflow the C stack.
    data = b"\x80\x02}N" + b"\x85" * 1000 + b"Ns."
    with pytest.raises(UnsafePickleError, match="nested deeper"):
        read_skeleton(data)


def storage_pickle(numel: int, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> bytes:
    """A data.pkl of one float tensor whose storage claims `numel` elements."""

    class Rebuild:
        def __reduce__(self) -> tuple[Any, ...]:
            return (torch._utils._rebuild_tensor_v2, (StorageStub(), offset, size, stride, False, OrderedDict()))

    class StorageStub:
        pass

    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.persistent_id = lambda obj: (  # type: ignore[method-assign]
        ("storage", torch.FloatStorage, "0", "cpu", numel) if isinstance(obj, StorageStub) else None)
    pickler.dump({"t": Rebuild()})
    return buffer.getvalue()


def test_storage_bigger_than_its_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"t": torch.ones(4)}, path)
    replace_data_pkl(path, storage_pickle(2**40, (2**40,), (1,)))
    with pytest.raises(UnsafePickleError, match="declares 4398046511104 bytes, its record holds 16"):
        read_torch_skeleton(LOCAL, str(path))


def test_tensor_view_outside_its_storage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"t": torch.ones(4)}, path)
    replace_data_pkl(path, storage_pickle(4, (3,), (2,)))  # elements 0, 2, 4 of a 4-element storage
    with pytest.raises(UnsafePickleError, match="view of 5 elements on a storage of 4"):
        read_torch_skeleton(LOCAL, str(path))
    replace_data_pkl(path, storage_pickle(4, (2,), (2,)))
    t = read_torch_skeleton(LOCAL, str(path)).value["t"]
    assert (t.shape, t.numel, t.dtype) == ((2,), 2, "float32")


def test_setitem_on_a_tensor_is_refused(tmp_path: Path) -> None:
    # CVE-2026-24747: SETITEM applied to something that is not a dict.
    path = tmp_path / "w.pt"
    torch.save({"t": torch.ones(4)}, path)
    data = storage_pickle(4, (4,), (1,))
    # Insert `key value SETITEM` right after the tensor's REDUCE (the dict's value).
    at = data.rindex(b"R")
    data = data[: at + 1] + b"X\x01\x00\x00\x00kK\x01s" + data[at + 1:]
    replace_data_pkl(path, data)
    with pytest.raises(UnsafePickleError, match="SETITEM on a TensorRef"):
        read_torch_skeleton(LOCAL, str(path))


# ---------------------------------------------------------------- row 12: DCP


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_hostile_dcp_metadata_is_unsafe_at_the_content_tier(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "run/step-40"
    dcp.save({"model": MLP().state_dict()}, checkpoint_id=str(folder), no_dist=True)
    target = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(touch(target), protocol=4))

    v = verdict(tmp_path / "run")
    assert v.layout == "dcp" and v.status == "unsafe", v.findings
    (f,) = findings(v, "unsafe_pickle")
    assert f.file == ".metadata" and "posix.system" in f.detail
    assert not target.exists()
    # Control: DCP reads .metadata with plain pickle.load.
    with pytest.raises(Exception):  # noqa: B017 - whatever the payload's return value breaks
        dcp.FileSystemReader(str(folder)).read_metadata()
    assert target.exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_hostile_dcp_byte_item_is_refused_by_scan_and_probe(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from auditor.probe.child import _dcp_into

    torch.manual_seed(0)
    model = MLP()
    folder = tmp_path / "run/step-40"
    target = tmp_path / "pwned"
    # DCP saves a non-tensor value as a byte item: torch.save of it, which pickles the payload.
    dcp.save({"model": model.state_dict(), "extra": touch(target)}, checkpoint_id=str(folder), no_dist=True)
    assert not target.exists()

    v = verdict(tmp_path / "run")
    assert v.status == "unsafe", v.findings
    (f,) = findings(v, "unsafe_pickle")
    assert f.file == "__0_0.distcp" and "posix.system" in f.detail
    with pytest.raises(UnsafePickleError, match="posix.system"):
        _dcp_into(MLP(), str(folder))
    assert not target.exists()
    # Control: dcp.load unpickles byte items with torch.load(weights_only=False).
    dcp.load({"model": model.state_dict(), "extra": None}, checkpoint_id=str(folder), no_dist=True)
    assert target.exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_clean_dcp_folder_reads_keys_and_byte_items(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "run/step-40"
    dcp.save({"model": MLP().state_dict(), "step": 40, "extra": {"a": [1, 2]}}, checkpoint_id=str(folder),
             no_dist=True)
    checkpoint = pickles.read_dcp_checkpoint(LOCAL, str(folder))
    assert checkpoint.keys["model.head.weight"] == "tensor" and checkpoint.keys["step"] == "bytes"
    assert sorted(s.value for s in checkpoint.byte_items.values() if isinstance(s.value, int)) == [40]
    assert verdict(tmp_path / "run").status != "unsafe"


def test_dcp_metadata_pointing_outside_the_folder_is_refused(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step-1"
    with pytest.warns(UserWarning):
        dcp.save({"step": 1}, checkpoint_id=str(folder), no_dist=True)
    data = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(data.replace(b"__0_0.distcp", b"../../0.dist"))
    with pytest.raises(UnsafePickleError, match="names '../../0.dist'"):
        pickles.read_dcp_checkpoint(LOCAL, str(folder))


# ---------------------------------------------------------------- row 19: what torch loads safely


def sparse_quantized_counter() -> dict[str, Any]:
    i = torch.tensor([[0, 1], [1, 0]])
    return {
        "coo": torch.sparse_coo_tensor(i, torch.tensor([1.0, 2.0]), (2, 2)),
        "csr": torch.eye(3).to_sparse_csr(),
        "q": torch.quantize_per_tensor(torch.rand(4), 0.1, 3, torch.quint8),
        "qc": torch.quantize_per_channel(torch.rand(2, 3), torch.tensor([0.1, 0.2]), torch.tensor([1, 2]), 0,
                                         torch.qint8),
        "counts": Counter({"a": 2, "b": 1}),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sparse_quantized_and_counter_are_allowed_and_load(tmp_path: Path) -> None:
    run, folder = hf_run(tmp_path)
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    state["extra"] = sparse_quantized_counter()
    torch.save(state, folder / "optimizer.pt")

    skeleton = read_torch_skeleton(LOCAL, str(folder / "optimizer.pt"))
    extra = skeleton.value["extra"]
    assert (extra["coo"].kind, extra["coo"].shape) == ("sparse", (2, 2))
    assert (extra["qc"].kind, extra["qc"].dtype, extra["qc"].shape) == ("quantized", "qint8", (2, 3))
    assert extra["counts"] == Counter({"a": 2, "b": 1})
    loaded = pickles.safe_torch_load(LOCAL, str(folder / "optimizer.pt"))
    assert torch.equal(loaded["extra"]["coo"].to_dense(), extra_dense())
    v = verdict(run)
    assert v.status == "ok" and not findings(v, "unsafe_pickle"), v.findings


def extra_dense() -> torch.Tensor:
    return torch.tensor([[0.0, 1.0], [2.0, 0.0]])


# ---------------------------------------------------------------- every pickle, judged by content


def test_hostile_pkl_file_in_a_checkpoint_is_unsafe(tmp_path: Path) -> None:
    run, folder = hf_run(tmp_path)
    target = tmp_path / "pwned"
    (folder / "extra_state.pkl").write_bytes(pickle.dumps(touch(target), protocol=2))
    v = verdict(run)
    assert v.status == "unsafe"
    assert [f.file for f in findings(v, "unsafe_pickle")] == ["extra_state.pkl"]
    assert not target.exists()


def test_plain_data_pkl_is_allowed_but_not_as_a_torch_file(tmp_path: Path) -> None:
    run, folder = hf_run(tmp_path)
    # Protocol 5, Python's own: opcodes torch does not implement, but a .pkl is for pickle.load.
    (folder / "vocab.pkl").write_bytes(pickle.dumps({"tokens": ["a", "b"], "ids": (1, 2)}, protocol=5))
    assert read_torch_skeleton(LOCAL, str(folder / "vocab.pkl"), plain_pickle=True).value["ids"] == (1, 2)
    with pytest.raises(UnsafePickleError, match="not torch's legacy framing"):
        read_torch_skeleton(LOCAL, str(folder / "vocab.pkl"))
    v = verdict(run)
    assert v.status == "ok", v.findings


def test_raw_data_bin_is_an_info_finding(tmp_path: Path) -> None:
    run, folder = hf_run(tmp_path)
    (folder / "embeddings.bin").write_bytes(np.arange(64, dtype=np.float32).tobytes())
    with pytest.raises(UnknownFormatError):
        read_torch_skeleton(LOCAL, str(folder / "embeddings.bin"))
    v = verdict(run)
    assert v.status == "ok", v.findings
    assert [f.file for f in findings(v, "not_a_pickle")] == ["embeddings.bin"]


def test_bin_that_opens_like_a_pickle_and_breaks_is_unsafe(tmp_path: Path) -> None:
    run, folder = hf_run(tmp_path)
    (folder / "embeddings.bin").write_bytes(b"\x80\x02" + bytes(range(3, 200)))
    v = verdict(run)
    assert v.status == "unsafe"
    assert [f.file for f in findings(v, "unsafe_pickle")] == ["embeddings.bin"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_content_tier_never_imports_torch(tmp_path: Path) -> None:
    # HF Trainer-like checkpoint written by real torch; the rescan runs in a fresh interpreter.
    run, folder = hf_run(tmp_path)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], 0.1))
    sched.step(1.0)
    torch.save(sched.state_dict(), folder / "extra_plateau.pt")
    out = run_python(
        "import json, sys, auditor.api\n"
        "v = auditor.api.rescan(sys.argv[1], tier='content').verdicts[0]\n"
        "print(json.dumps({'status': v.status, 'codes': sorted({f.code for f in v.findings}),"
        " 'torch': 'torch' in sys.modules}))",
        str(run),
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report == {"status": "ok", "codes": ["structural_only"], "torch": False}


def test_skeleton_serves_completeness_checks(tmp_path: Path) -> None:
    run, folder = hf_run(tmp_path)
    optimizer = read_torch_skeleton(LOCAL, str(folder / "optimizer.pt")).value
    entry = optimizer["state"][0]
    assert isinstance(entry["exp_avg"], TensorRef) and entry["exp_avg"].shape == (16, 16)
    rng = read_torch_skeleton(LOCAL, str(folder / "rng_state.pth")).value
    assert set(rng) == {"python", "numpy", "cpu"}
    assert isinstance(rng["numpy"][1], Opaque) and rng["numpy"][1].args == ((624,), "u4")
    assert isinstance(rng["cpu"], TensorRef) and rng["cpu"].dtype == "uint8"
    storages = read_torch_skeleton(LOCAL, str(folder / "optimizer.pt")).storages
    assert all(isinstance(s, StorageRef) for s in storages.values()) and storages
    # A cold parameter is still named through the skeleton.
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    del state["state"][1]
    torch.save(state, folder / "optimizer.pt")
    v = verdict(run)
    assert v.status == "incomplete" and findings(v, "cold_optimizer_params")
