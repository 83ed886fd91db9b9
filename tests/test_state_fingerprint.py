"""The state keeps a bounded digest of each checkpoint's listing, and still recognises the full listing
summaries that an older auditor stored (no false "rewritten" for every checkpoint after an upgrade)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from auditor.layouts import Checkpoint
from auditor.model import Status, Verdict
from auditor.state import _listing_summary, fingerprint, open_state

PREFIX = "/data/ckpts"


def checkpoint(files: int, size: int = 100) -> Checkpoint:
    return Checkpoint(url=f"{PREFIX}/run/checkpoint-5", path=f"{PREFIX}/run/checkpoint-5", run="run",
                      layout="hf-trainer", kind="dir", step=5, manifest_path=f"{PREFIX}/run/checkpoint-5/m.json",
                      files={f"shard-{i:05d}.safetensors": {"size": size, "ETag": f'"{i}"'} for i in range(files)})


def stored(url: str) -> str:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT fingerprint FROM checkpoints")).scalar_one()
    finally:
        engine.dispose()


def test_fingerprint_is_bounded_and_tells_listings_apart() -> None:
    big, small = fingerprint(checkpoint(10_000)), fingerprint(checkpoint(3))
    assert len(big) == len(small) == len("sha256:") + 64
    assert fingerprint(checkpoint(3, size=101)) != small  # a size change is a different listing
    assert fingerprint(checkpoint(3)) == small


@pytest.mark.parametrize("state_url", ["sqlite", "postgresql"], indirect=True)
def test_an_old_full_summary_is_recognised_then_rewritten(state_url: str) -> None:
    ck = checkpoint(4)
    state = open_state(state_url)
    try:
        state.observe(PREFIX, [ck], now=1.0)
        state.record(PREFIX, Verdict(ck.url, ck.run, ck.step, ck.layout, Status.OK))
        # What an auditor before the digest wrote: the listing summary itself.
        engine = sa.create_engine(state_url)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE checkpoints SET fingerprint = :fp"), {"fp": _listing_summary(ck)})
        engine.dispose()
        known = state.observe(PREFIX, [ck], now=2.0)
        assert not known[ck.url].suspect  # same listing: not taken for a rewrite
        assert stored(state_url) == fingerprint(ck)
        rewritten = checkpoint(4, size=999)
        known = state.observe(PREFIX, [rewritten], now=3.0)
        assert known[ck.url].suspect  # a real change still is
    finally:
        state.close()
