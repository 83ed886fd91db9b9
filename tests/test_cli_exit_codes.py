"""Exit-code tables of the command line (docs/contract.md "Exit codes", SPEC §5), in-process with CliRunner.

Each row is a command line, the exit code the contract fixes for it and a substring its output must
carry (stdout and stderr together), run against real checkpoints written once per module:
0 no failure; 1 a checkpoint failed (`unverifiable` too with --strict / --require-assurance);
2 usage or configuration error, naming the flag or key (and `seal` refusing a failing checkpoint);
3 the scan could not complete (the prefix cannot be listed, storage unreachable).
"""

from __future__ import annotations

import pickle
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import fsspec
import pytest
from ckpts import flip_bit, write_hf_checkpoint, write_run
from click.testing import CliRunner

from auditor.cli import main
from auditor.manifest import MANIFEST_NAME

pytestmark = pytest.mark.timeout(300)

OK, FAILED, USAGE, STORAGE = 0, 1, 2, 3


class Canary:
    """Unpickling this would create the canary file: proof that a pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (self.path, "w"))


def _seal(folder: Path, *extra: str) -> None:
    r = CliRunner().invoke(main, ["seal", str(folder), *extra])
    assert r.exit_code == 0, r.output


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every checkpoint and file a row may name, written once (rows that write get their own copy)."""
    root = tmp_path_factory.mktemp("corpus")
    fs = fsspec.filesystem("file")
    clean = root / "clean"
    for d in write_run(clean / "run1", [100, 200]):
        _seal(d)
    corrupt = root / "corrupt"
    for d in write_run(corrupt / "run1", [100, 200]):
        _seal(d)
    flip_bit(fs, str(corrupt / "run1/checkpoint-200/model.safetensors"))
    allbad = root / "allbad"
    _seal(write_hf_checkpoint(allbad / "run1/checkpoint-100", step=100))
    flip_bit(fs, str(allbad / "run1/checkpoint-100/model.safetensors"))
    missing = write_hf_checkpoint(root / "missing/run1/checkpoint-100", step=100)
    _seal(missing)
    (missing / "optimizer.pt").unlink()
    unsealed = write_hf_checkpoint(root / "unsealed/run1/checkpoint-100", step=100)
    incomplete = write_hf_checkpoint(root / "incomplete/run1/checkpoint-100", step=100, rng=False)
    damaged = write_hf_checkpoint(root / "damaged/run1/checkpoint-100", step=100)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    unsafe = write_hf_checkpoint(root / "unsafe/run1/checkpoint-100", step=100)
    (unsafe / "extra_state.pkl").write_bytes(pickle.dumps(Canary(str(root / "canary"))))
    bad_config = root / "bad.yaml"
    bad_config.write_text("scan:\n  jobs: many\n")
    bad_yaml = root / "broken.yaml"
    bad_yaml.write_text("scan: [\n")
    bad_retention = root / "retention.yaml"
    bad_retention.write_text("retention:\n  stride: 0\n")
    return {
        "root": str(root), "clean": str(clean), "clean_ck": str(clean / "run1/checkpoint-100"),
        "corrupt": str(corrupt), "corrupt_ck": str(corrupt / "run1/checkpoint-200"), "allbad": str(allbad),
        "missing_ck": str(missing), "unsealed": str(root / "unsealed"), "unsealed_ck": str(unsealed),
        "incomplete_ck": str(incomplete), "damaged_ck": str(damaged), "unsafe_ck": str(unsafe),
        "no_prefix": str(root / "nope"), "unreachable": f"webhdfs://127.0.0.1:{_closed_port()}/ckpts",
        "bad_config": str(bad_config), "bad_yaml": str(bad_yaml), "no_config": str(root / "absent.yaml"),
        "bad_retention": str(bad_retention), "canary": str(root / "canary"),
    }


# (command line, exit code, a substring of the output); {name} is a path of the corpus, {fresh_name}
# a private copy of it for rows that write (seal, retention apply).
TABLE: list[tuple[str, int, str]] = [
    # verify
    ("verify {clean_ck}", OK, "ok (sealed)"),
    ("verify {clean_ck} --json", OK, '"status": "ok"'),
    ("verify {clean}", OK, "2 ok"),
    ("verify {clean_ck} --tier metadata", OK, "ok"),
    ("verify {clean_ck} --require-assurance sealed", OK, "ok (sealed)"),
    ("verify {unsealed_ck}", OK, "ok (structural)"),
    ("verify {unsealed_ck} --tier metadata", OK, "unverifiable"),
    ("verify {unsealed_ck} --tier metadata --strict", FAILED, "unverifiable"),
    ("verify {unsealed_ck} --require-assurance sealed", FAILED, "assurance_below_required"),
    ("verify {corrupt_ck}", FAILED, "digest_mismatch"),
    ("verify {corrupt}", FAILED, "1 corrupt"),
    ("verify {missing_ck}", FAILED, "missing"),
    ("verify {incomplete_ck}", FAILED, "rng_state_missing"),
    ("verify {unsafe_ck}", FAILED, "unsafe"),
    ("verify {damaged_ck}", FAILED, "corrupt"),
    ("verify", USAGE, "Missing argument 'CHECKPOINT_URL'"),
    ("verify {clean_ck} --tier deepest", USAGE, "--tier"),
    ("verify {clean_ck} --require-assurance bogus", USAGE, "--require-assurance"),
    ("verify {clean_ck} --jobs 0", USAGE, "--jobs"),
    ("verify {clean_ck} --file-timeout soon", USAGE, "--file-timeout"),
    ("verify {clean_ck} --checkpoint-timeout 0s", USAGE, "--checkpoint-timeout"),
    ("verify {clean_ck} --allow-factory nocolon", USAGE, "--allow-factory"),
    ("verify {clean_ck} -o novalue", USAGE, "--storage-option"),
    ("verify {clean_ck} --no-such-flag", USAGE, "--no-such-flag"),
    ("verify nosuchproto://bucket/ck", USAGE, "nosuchproto"),
    ("verify {no_prefix}", STORAGE, "does not exist"),
    ("verify {unreachable}/run1/checkpoint-100", STORAGE, "ConnectionError"),
    # rescan
    ("rescan --prefix {clean}", OK, "2 ok"),
    ("rescan --prefix {clean} --json --jobs 1", OK, '"summary"'),
    ("rescan --prefix {corrupt} --tier metadata", OK, "2 ok"),  # a flipped bit keeps the size
    ("rescan --prefix {clean} --require-assurance sealed", OK, "ok (sealed)"),
    ("rescan --prefix {unsealed}", OK, "ok (structural)"),
    ("rescan --prefix {unsealed} --require-assurance sealed", FAILED, "assurance_below_required"),
    ("rescan --prefix {unsealed} --tier metadata --strict", FAILED, "unverifiable"),
    ("rescan --prefix {corrupt}", FAILED, "digest_mismatch"),
    ("rescan --prefix {corrupt} --settle-time 0s", FAILED, "1 corrupt"),
    ("rescan", USAGE, "Missing option '--prefix'"),
    ("rescan --prefix {clean} --tier deepest", USAGE, "--tier"),
    ("rescan --prefix {clean} --require-assurance bogus", USAGE, "--require-assurance"),
    ("rescan --prefix {clean} --settle-time soon", USAGE, "--settle-time"),
    ("rescan --prefix {clean} --jobs 0", USAGE, "--jobs"),
    ("rescan --prefix {clean} --file-timeout -5s", USAGE, "--file-timeout"),
    ("rescan --prefix {clean} --daemon http://127.0.0.1:9 --allow-factory m:f", USAGE, "--allow-factory"),
    ("rescan --prefix {clean} --config {bad_config}", USAGE, "scan.jobs"),
    ("rescan --prefix {clean} --config {bad_yaml}", USAGE, "not valid YAML"),
    ("rescan --prefix {clean} --config {no_config}", USAGE, "absent.yaml"),
    ("rescan --prefix {no_prefix}", STORAGE, "does not exist"),
    ("rescan --prefix {unreachable}", STORAGE, "ConnectionError"),
    # seal
    ("seal {fresh_unsealed_ck}", OK, "sealed"),
    ("seal {fresh_incomplete_ck} --allow-incomplete", OK, "sealed"),
    ("seal {fresh_damaged_ck} --force", OK, "sealed"),
    ("seal {clean_ck}", USAGE, "--force"),  # already sealed
    ("seal {incomplete_ck}", USAGE, "--allow-incomplete"),
    ("seal {damaged_ck}", USAGE, "refusing to seal"),
    ("seal {unsafe_ck}", USAGE, "unsafe"),
    ("seal {unsafe_ck} --force --allow-incomplete", USAGE, "extra_state.pkl"),
    ("seal", USAGE, "Missing argument 'CHECKPOINT_URL'"),
    ("seal {unsealed_ck} --model-kwargs notjson", USAGE, "--model-kwargs"),
    ("seal {unsealed_ck} --model-kwargs [1]", USAGE, "--model-kwargs"),
    ("seal {unsealed_ck} --model probe_models:mlp", USAGE, "--probe-batch"),
    ("seal {unsealed_ck} --jobs 0", USAGE, "--jobs"),
    ("seal {unsealed_ck} --step many", USAGE, "--step"),
    ("seal {no_prefix}", USAGE, "does not exist"),
    ("seal {unreachable}/run1/checkpoint-100", STORAGE, "ConnectionError"),
    # latest
    ("latest --prefix {clean}", OK, "checkpoint-200"),
    ("latest --prefix {clean} --run run1 --json", OK, '"step": 200'),
    ("latest --prefix {corrupt}", OK, "checkpoint-100"),  # the newest ok, passing over the damaged one
    ("latest --prefix {clean} --run nope", FAILED, "no verified-ok checkpoint"),
    ("latest --prefix {allbad}", FAILED, "no verified-ok checkpoint"),
    ("latest", USAGE, "Missing option '--prefix'"),
    ("latest --prefix {clean} --config {bad_config}", USAGE, "scan.jobs"),
    ("latest --prefix {clean} --daemon http://127.0.0.1:9 --allow-factory m:f", USAGE, "--allow-factory"),
    ("latest --prefix {no_prefix}", STORAGE, "does not exist"),
    ("latest --prefix {unreachable}", STORAGE, "ConnectionError"),
    # retention
    ("retention plan --prefix {clean}", OK, "keep 2, delete 0"),
    ("retention plan --prefix {clean} --json", OK, '"summary"'),
    ("retention apply --prefix {fresh_clean} --yes", OK, "deleted 0 checkpoint(s)"),
    ("retention plan", USAGE, "Missing option '--prefix'"),
    ("retention plan --prefix {clean} --stride 0", USAGE, "retention stride"),
    ("retention plan --prefix {clean} --head-fraction 2", USAGE, "retention head_fraction"),
    ("retention plan --prefix {clean} --keep-newest-ok many", USAGE, "--keep-newest-ok"),
    ("retention plan --prefix {clean} --config {bad_retention}", USAGE, "retention.stride"),
    ("retention plan --prefix {clean} --config {bad_config}", USAGE, "scan.jobs"),
    ("retention apply --prefix {clean}", USAGE, "--yes"),
    ("retention apply --prefix {clean} --yes --tail-fraction -1", USAGE, "retention tail_fraction"),
    ("retention plan --prefix {no_prefix}", STORAGE, "does not exist"),
    ("retention apply --prefix {no_prefix} --yes", STORAGE, "does not exist"),
    ("retention plan --prefix {unreachable}", STORAGE, "ConnectionError"),
]


def _argv(line: str, corpus: dict[str, str], tmp_path: Path) -> list[str]:
    """Split a table line and resolve its {name} / {fresh_name} placeholders."""
    out = []
    for word in line.split():
        if word.startswith("{"):
            name, _, rest = word[1:].partition("}")
            if name.startswith("fresh_"):
                source = Path(corpus[name.removeprefix("fresh_")])
                copy = tmp_path / source.relative_to(corpus["root"])
                shutil.copytree(source, copy)
                word = str(copy) + rest
            else:
                word = corpus[name] + rest
        out.append(word)
    return out


@pytest.mark.parametrize(("line", "code", "says"), TABLE, ids=[row[0] for row in TABLE])
def test_exit_code(corpus: dict[str, str], tmp_path: Path, line: str, code: int, says: str) -> None:
    argv = _argv(line, corpus, tmp_path)
    target = Path(argv[1]) if argv[0] == "seal" and len(argv) > 1 else None
    sealed_before = target is not None and (target / MANIFEST_NAME).exists()
    r = CliRunner().invoke(main, argv)
    # A crash is never an exit code: CliRunner reports an uncaught exception as exit 1 with r.exception set.
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == code, r.output
    assert says in r.output, r.output
    assert not Path(corpus["canary"]).exists(), "a pickle was executed"
    if target is not None and not sealed_before:
        # seal writes its manifest exactly when it exits 0; a refusal leaves the checkpoint as it was.
        assert (target / MANIFEST_NAME).exists() == (code == OK), r.output
