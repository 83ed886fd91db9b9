"""Reading the values of a file's floating-point tensors as its bytes stream past (issue 15).

`ValueScan` is fed a file's chunks in order (on the digests' helper thread) and hands each tensor's
bytes to a `tensorstats.Accumulator`, which computes the numbers `tensorstats.stats_of` defines. This
module itself is light: numpy is imported only when a scan starts on a file that has floating tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from auditor.manifest import TensorStats

if TYPE_CHECKING:
    from auditor.tensorstats import Accumulator

# The dtypes whose values are read: the keys of tensorstats.FLOAT_DTYPES (a test keeps them equal).
FLOAT_DTYPE_NAMES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class FloatTensor:
    """One floating-point tensor of a file: safetensors dtype, shape and absolute byte range [start, end)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Counts:
    """How many of a tensor's values are NaN and how many ±Inf: what the content tier judges."""

    count: int
    nan: int
    inf: int

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf


class ValueScan:
    """The statistics of a file's floating-point tensors, fed the file's bytes in order, chunk by chunk.

    Give it the tensors (from a parsed header), or `parse`: then the safetensors header is read from
    the stream's own first bytes (its 8-byte length, then the header), so checking the values needs no
    request of its own. `parse(header_bytes)` returns the tensors or raises ValueError; a header it
    refuses, or one longer than `limit`, ends the scan with no statistics (the format checks report
    the damage). Only tensors whose bytes all passed get statistics. With `full=False` only NaN and
    Inf are counted (`counts`; `results` is then empty): the content tier's check.
    """

    def __init__(self, tensors: Sequence[FloatTensor] = (), *,
                 parse: Callable[[bytes], Sequence[FloatTensor]] | None = None, limit: int = 0,
                 full: bool = True) -> None:
        self.full = full
        self.parse = parse
        self.limit = limit
        self.head = bytearray()
        self.failed: str | None = None
        self.pos = 0
        self.i = 0
        self.ordered: list[FloatTensor] = []
        self.accumulators: dict[str, Accumulator] = {}
        if parse is None:
            self._plan(tensors)

    def _plan(self, tensors: Sequence[FloatTensor]) -> None:
        self.ordered = sorted((t for t in tensors if t.dtype in FLOAT_DTYPE_NAMES), key=lambda t: t.start)
        if not self.ordered:
            return
        # Here, not at the top: numpy (tensorstats) loads only once some file's values are read, so a
        # metadata-tier scan, `auditor status` or the daemon's import floor never pay for it.
        from auditor import tensorstats

        self.accumulators = {t.name: tensorstats.Accumulator(t.dtype, t.shape, self.full) for t in self.ordered}

    def feed(self, chunk: bytes | memoryview) -> None:
        if self.failed is not None:
            return
        if self.parse is not None:
            chunk = self._read_head(chunk)
            if not chunk:
                return
        view = memoryview(chunk)
        pos, end, ordered = self.pos, self.pos + len(view), self.ordered
        while self.i < len(ordered) and ordered[self.i].end <= pos:
            self.i += 1
        j = self.i
        while j < len(ordered) and ordered[j].start < end:
            t = ordered[j]
            lo, hi = max(t.start, pos), min(t.end, end)
            if hi > lo:
                self.accumulators[t.name].feed(view[lo - pos : hi - pos])
            j += 1
        self.pos = end

    def _read_head(self, chunk: bytes | memoryview) -> bytes:
        """Gather the header from the stream; once parsed, return all the bytes so far to be fed from 0."""
        assert self.parse is not None
        self.head += chunk
        if len(self.head) < 8:
            return b""
        need = 8 + int.from_bytes(self.head[:8], "little")
        if need > self.limit + 8:
            self._fail(f"header of {need - 8} bytes is over the {self.limit}-byte limit")
            return b""
        if len(self.head) < need:
            return b""
        parse, self.parse = self.parse, None
        try:
            self._plan(parse(bytes(self.head[:need])))
        except ValueError as e:
            self._fail(str(e))
            return b""
        data, self.head = bytes(self.head), bytearray()
        return data

    def _fail(self, why: str) -> None:
        self.failed = why
        self.head = bytearray()
        self.accumulators = {}

    def labels(self) -> dict[str, str]:
        """Each floating tensor's dtype and shape, as findings print them."""
        return {t.name: label(t.dtype, t.shape) for t in self.ordered}

    def _done(self) -> list[FloatTensor]:
        # A tensor the stream did not fully pass (a short read, a refused header) gets nothing.
        return [t for t in self.ordered if (a := self.accumulators.get(t.name)) is not None and a.complete]

    def results(self) -> dict[str, TensorStats]:
        """Each floating tensor's statistics, in file order (none when not `full`)."""
        return {t.name: self.accumulators[t.name].result() for t in self._done()} if self.full else {}

    def counts(self) -> dict[str, Counts]:
        """Each floating tensor's NaN and Inf counts, in file order."""
        return {t.name: Counts(count=(a := self.accumulators[t.name]).count, nan=a.nan, inf=a.inf)
                for t in self._done()}


# How many tensors a non-finite finding or refusal names before "and N more".
NAMED_TENSORS = 5


def nonfinite_detail(stats: Mapping[str, TensorStats] | Mapping[str, Counts],
                     labels: Mapping[str, str] | None = None) -> str | None:
    """Describe the tensors of `stats` that hold NaN or Inf (the first few by name, then how many more),
    or None when every value is finite. `labels` adds a tensor's dtype and shape, e.g. "F32[4, 4]"."""
    bad = [(name, s) for name, s in stats.items() if s.nonfinite]
    if not bad:
        return None
    labels = labels or {}
    named = []
    for name, s in bad[:NAMED_TENSORS]:
        counts = [f"{n} {what}" for n, what in ((s.nan, "NaN"), (s.inf, "Inf")) if n]
        label = f" ({labels[name]})" if name in labels else ""
        named.append(f"{name!r}{label}: {', '.join(counts)} of {s.count} values")
    more = f"; and {len(bad) - NAMED_TENSORS} more" if len(bad) > NAMED_TENSORS else ""
    return (f"{len(bad)} of {len(stats)} floating-point tensor(s) hold non-finite values: "
            + "; ".join(named) + more)


def label(dtype: str, shape: Sequence[int]) -> str:
    """A tensor's dtype and shape as findings print them: F32[4, 4]."""
    return f"{dtype}{list(shape)}"
