"""The damage matrix (tests/matrix.py) on every writer of tests/writers, asserted per writer.

One test per writer and mode, not per cell, so pytest-xdist spreads writers over workers while the
cells of one writer run in-process against one sealed copy made once per session.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import time
import zipfile
from collections.abc import Callable

import matrix
import pytest
from writers import WRITERS, WriterUnavailable

NAMES = sorted(WRITERS)


@pytest.fixture(scope="session")
def prepared(writer_corpus, tmp_path_factory) -> Callable[[str], matrix.Prepared]:
    """`prepared(name)`: the writer's run folder copied twice, one copy sealed, both scanned clean.

    Sealed once per session (per xdist worker) and never damaged: cells copy it first.
    """
    root = tmp_path_factory.mktemp("matrix")
    cache: dict[str, matrix.Prepared | str] = {}

    def get(name: str) -> matrix.Prepared:
        if name not in cache:
            try:
                cache[name] = matrix.prepare(writer_corpus.get(name), root / name)
            except WriterUnavailable as e:
                cache[name] = str(e)
        got = cache[name]
        if isinstance(got, str):
            pytest.skip(f"writer {name} unavailable here: {got}")
        return got

    return get


def _report(prep: matrix.Prepared, cells: list[matrix.Cell], seconds: float) -> matrix.WriterReport:
    return matrix.WriterReport(prep.name, prep, clean=matrix.clean_problems(prep), cells=cells, seconds=seconds)


@pytest.mark.parametrize("name", NAMES)
def test_clean_fixture_is_ok_with_expected_assurance(prepared, name):
    prep = prepared(name)
    print(matrix.clean_table([_report(prep, [], 0.0)]))
    problems = matrix.clean_problems(prep)
    assert not problems, f"{name}: clean checkpoints do not hold:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "unsealed"])
@pytest.mark.parametrize("name", NAMES)
def test_damage_matrix(prepared, name, sealed, tmp_path, record_property):
    prep = prepared(name)
    t0 = time.monotonic()
    cells = matrix.run_cells(prep, sealed, tmp_path)
    seconds = time.monotonic() - t0
    files = sum(len(ck.files) for ck in prep.written.checkpoints)
    assert len(cells) == files * len(matrix.DAMAGES), "the matrix skipped cells"
    rep = _report(prep, cells, seconds)
    table = matrix.damage_table([rep])
    print(table)
    print(f"{name} {'sealed' if sealed else 'unsealed'}: {len(cells)} cells in {seconds:.1f} s")
    record_property("matrix", table)
    record_property("matrix_seconds", round(seconds, 2))
    bad = [c.describe() for c in cells if not c.holds]
    assert not bad, f"{len(bad)} of {len(cells)} cells do not hold:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# The harness's own judgement, on bytes made here: checksum coverage is computed, not tabulated.


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", b"x" * 64)
    return buf.getvalue()


def test_checksum_cover_zip_member_data_is_covered_and_headers_are_not():
    data = _zip_bytes()
    member_start = 30 + len("archive/data.pkl")  # first local header at 0, no extra field
    assert matrix.checksum_cover(data, member_start + 10) == "zip CRC-32 of archive/data.pkl"
    assert matrix.checksum_cover(data, 30) is None  # the member's name in its local header


def test_checksum_cover_json_only_where_the_flip_breaks_parsing():
    doc = b'{"global_step": 12, "x": "ab"}'
    lead, last = doc.index(b"12"), doc.index(b"12") + 1
    quote = doc.index(b'"ab"')
    assert matrix.checksum_cover(doc, last) is None  # '2' -> '3': still JSON, another number
    assert json.loads(matrix.flipped(doc, last))["global_step"] == 13
    assert matrix.checksum_cover(doc, lead) == "JSON syntax"  # '1' -> '0': "02" is not a JSON number
    assert matrix.checksum_cover(doc, quote) == "JSON syntax"  # '"' -> '#': not JSON


def test_checksum_cover_safetensors_data_and_raw_pickle_are_not_covered():
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    st = struct.pack("<Q", len(header)) + header + bytes(16)
    assert matrix.checksum_cover(st, len(st) - 4) is None  # tensor bytes
    brace = 8 + header.index(b"{")
    assert matrix.checksum_cover(st, brace) == "safetensors header JSON syntax"
    raw = pickle.dumps({"step": 3, "weights": list(range(50))}, protocol=4)
    assert matrix.checksum_cover(raw, len(raw) // 2) is None


@pytest.mark.parametrize("kind", matrix.DAMAGES)
def test_damage_changes_the_file(tmp_path, kind):
    f = tmp_path / "f.bin"
    f.write_bytes(bytes(range(200)))
    matrix.damage(f, kind)
    if kind == "delete":
        assert not f.exists()
    elif kind == "truncate":
        assert f.read_bytes() == bytes(range(100))
    else:
        got = f.read_bytes()
        assert len(got) == 200 and [i for i in range(200) if got[i] != i] == [100]


def test_judge_refuses_ok_sealed_and_stale_failures():
    """A cell holds only on a new failure: the harness must be able to fail."""
    clean = matrix.Seen("unsafe", "sealed", "megatron", (("unsafe_pickle", "error", "a.pt"),))
    cell = matrix.Cell("w", "ck", "a.pt", "flip", True, matrix.FAIL_NAMED, None, clean, clean)
    assert matrix.judge(cell, clean) == ["failing only with the findings the clean checkpoint already had"]
    ok_sealed = matrix.Seen("ok", "sealed", "hf-trainer", ())
    cell = matrix.Cell("w", "ck", "a.json", "flip", False, matrix.UNSEEN_OK, None, ok_sealed, None)
    assert "ok with assurance sealed on damaged bytes" in matrix.judge(cell, ok_sealed)
    hit = matrix.Seen("corrupt", "sealed", "hf-trainer", (("digest_mismatch", "error", "b.pt"),))
    cell = matrix.Cell("w", "ck", "a.pt", "flip", True, matrix.FAIL_NAMED, None, hit, None)
    assert matrix.judge(cell, hit) == ["no new error finding names a.pt"]


def test_script_prints_markdown_tables(writer_corpus, tmp_path, capsys):
    """`python tests/matrix.py` prints the README tables; one cheap writer keeps this fast."""
    rc = matrix.main([str(writer_corpus.root), "--writer", "accelerate"])
    out = capsys.readouterr().out
    assert "| writer | clean false failures | sealed truncate" in out
    assert "| `accelerate` |" in out
    assert rc in (0, 1)
    assert (rc == 0) == ("## Cells that do not hold" not in out)
