"""Per-tensor statistics of floating-point tensors (issue 15): the definition every reader agrees on.

`stats_of` is the reference: the whole tensor in memory. The seal and the content tier compute the
same numbers on the bytes as they stream past (`Accumulator`, driven by `auditor.values.ValueScan`
inside the digests' read), and must agree with it.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np

from auditor.manifest import TensorStats

# How many values of each tensor are sampled (fewer if it has fewer elements).
SAMPLE_SIZE = 16
# safetensors dtype -> numpy dtype of its elements; BF16 is widened to float32 by hand (numpy has none).
FLOAT_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
}


def sample_positions(shape: list[int] | tuple[int, ...], k: int = SAMPLE_SIZE) -> list[int]:
    """Flat element indices sampled from a tensor of `shape`: they depend on the shape alone, so the same
    tensor of two checkpoints is sampled at the same places. Sorted, distinct, at most `k`."""
    count = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    if count <= k:
        return list(range(count))
    seed = zlib.crc32(",".join(str(int(d)) for d in shape).encode())
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(count, size=k, replace=False))


def as_float(dtype: str, raw: np.ndarray) -> np.ndarray:
    """The values of `raw` (elements of safetensors dtype `dtype`, as FLOAT_DTYPES reads them) as floats."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw


def stats_of(dtype: str, shape: list[int], data: bytes | memoryview) -> TensorStats | None:
    """The statistics of one tensor from its raw little-endian bytes; None for a dtype we do not decode."""
    np_dtype = FLOAT_DTYPES.get(dtype)
    if np_dtype is None:
        return None
    values = as_float(dtype, np.frombuffer(data, dtype=np_dtype)).astype(np.float64)
    finite = np.isfinite(values)
    nan = int(np.isnan(values).sum())
    inf = int(values.size - finite.sum()) - nan
    good = values[finite]
    sample = [float(values[i]) if finite[i] else None for i in sample_positions(shape)] if values.size else []
    return TensorStats(count=int(values.size), l2=float(np.sqrt(np.dot(good, good))) if good.size else 0.0,
                       max_abs=float(np.abs(good).max()) if good.size else 0.0, nan=nan, inf=inf, sample=sample)


# ---------------------------------------------------------------- the same numbers, as the bytes stream past

# Whether a chunk is all finite is one reduction, and only a chunk that is not gets its NaN and Inf
# counted. F64/F32: max and min, which propagate NaN (no temporary array). F16/BF16 (numpy has no
# BF16, and its float16 max is a slow scalar loop): a value is finite exactly when the bits of its
# magnitude (sign cleared) are below those of +Inf, and among finite values a larger magnitude has
# larger bits, so one AND and one max over the raw integers give both finiteness and max |x|.
# dtype -> (numpy type of the raw bits, magnitude mask, bits of +Inf)
_BITS: dict[str, tuple[type[np.unsignedinteger[Any]], int, int]] = {
    "F64": (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    "F32": (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
    "F16": (np.uint16, 0x7FFF, 0x7C00),
    "BF16": (np.uint16, 0x7FFF, 0x7F80),
}
# Elements per block of the sum of squares: a float64 block of 512 KiB stays in L2 while it is
# widened and dotted (widening a whole chunk at once is several times slower, bound by memory).
BLOCK = 65536
# A finite F16 magnitude's bits shifted left by 13 are the float32 bits of that magnitude times
# 2**-112 (normal and subnormal alike): widening by shift, then scaling each block's sum of
# squares by 2**224, is exact and much faster than numpy's float16 -> float64 cast.
_F16_SHIFT, _F16_SQUARE_SCALE = 13, 2.0**224


class Accumulator:
    """The statistics of one tensor, fed its bytes in order in pieces of any length.

    Agrees with `stats_of` on count, nan, inf, max_abs and sample exactly, and on l2 up to the
    order of a float64 sum (the reference sums in one dot product, this block by block). With
    `full=False` it only counts NaN and Inf: one integer pass, a fraction of the sha256 beside it.
    """

    def __init__(self, dtype: str, shape: tuple[int, ...], full: bool = True) -> None:
        self.full = full
        self.dtype = dtype
        self.np_dtype = FLOAT_DTYPES[dtype]
        self.itemsize = self.np_dtype.itemsize
        self.bits, self.mask, self.inf_bits = _BITS[dtype]
        self.count = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        self.positions = sample_positions(list(shape))
        self.next_sample = 0
        self.sample: list[float | None] = []
        self.seen = 0  # elements consumed
        self.carry = b""  # the start of an element cut by a chunk boundary
        self.sumsq = 0.0
        self.max_abs = 0.0  # of the finite values
        self._magnitude: np.ndarray | None = None  # 16-bit dtypes: the chunk's magnitude bits
        self.nan = 0
        self.inf = 0
        self._wide: np.ndarray | None = None  # float64 block buffer
        self._u32: np.ndarray | None = None  # uint32 block buffer (16-bit dtypes)

    def feed(self, data: memoryview) -> None:
        if self.carry:
            take = min(self.itemsize - len(self.carry), len(data))
            self.carry += bytes(data[:take])
            data = data[take:]
            if len(self.carry) < self.itemsize:
                return
            self._values(np.frombuffer(self.carry, dtype=self.np_dtype))
            self.carry = b""
        whole = len(data) - len(data) % self.itemsize
        if whole:
            self._values(np.frombuffer(data[:whole], dtype=self.np_dtype))
        if whole < len(data):
            self.carry = bytes(data[whole:])

    def _values(self, raw: np.ndarray) -> None:
        base, n = self.seen, len(raw)
        self.seen = base + n
        if self.full:
            self._take_samples(raw, base, n)
        magnitude = None
        if self.itemsize == 2 and not self.full:
            # Counting only: NaN/Inf bits are the largest positives as int16 and, with the sign set, the
            # largest as uint16, so two max reductions tell, with no temporary array.
            bits = raw.view(np.uint16)
            finite = int(bits.view(np.int16).max()) < self.inf_bits and int(bits.max()) < 0x8000 | self.inf_bits
            largest = 0.0
        elif self.itemsize == 2:
            magnitude = self._magnitudes(raw)
            top = int(magnitude.max())
            finite = top < self.inf_bits
            largest = _bits_value(self.dtype, top) if finite else 0.0
        else:
            high, low = float(raw.max()), float(raw.min())
            finite = math.isfinite(high) and math.isfinite(low)
            largest = max(high, -low) if finite else 0.0
        if finite:
            # The fast path (the usual case): no masks, no counting.
            if self.full:
                self.max_abs = max(self.max_abs, largest)
                self.sumsq += self._sum_squares(raw, magnitude)
        elif self.full:
            self._nonfinite(raw)
        else:
            bits = magnitude if magnitude is not None else np.bitwise_and(raw.view(self.bits), self.bits(self.mask))
            self.inf += int(np.count_nonzero(bits == self.inf_bits))
            self.nan += int(np.count_nonzero(bits > self.inf_bits))

    def _magnitudes(self, raw: np.ndarray) -> np.ndarray:
        """The magnitude bits of 16-bit `raw`, in a buffer kept across chunks (no allocation per chunk)."""
        if self._magnitude is None or len(self._magnitude) < len(raw):
            self._magnitude = np.empty(len(raw), dtype=np.uint16)
        out = self._magnitude[: len(raw)]
        np.bitwise_and(raw.view(np.uint16), np.uint16(self.mask), out=out)
        return out

    def _take_samples(self, raw: np.ndarray, base: int, n: int) -> None:
        positions = self.positions
        while self.next_sample < len(positions) and positions[self.next_sample] < base + n:
            at = positions[self.next_sample] - base
            value = float(as_float(self.dtype, raw[at:at + 1])[0])
            self.sample.append(value if np.isfinite(value) else None)
            self.next_sample += 1

    def _sum_squares(self, raw: np.ndarray, magnitude: np.ndarray | None) -> float:
        # Squared and summed by numpy's own loops, never np.dot: OpenBLAS threads a long dot product
        # and, on a busy machine, its spinning threads made this 30x slower than the sha256 beside it.
        if self._wide is None:
            self._wide = np.empty(BLOCK, dtype=np.float64)
            if self.itemsize == 2:
                self._u32 = np.empty(BLOCK, dtype=np.uint32)
        total = 0.0
        for lo in range(0, len(raw), BLOCK):
            hi = min(lo + BLOCK, len(raw))
            wide = self._wide[: hi - lo]
            if self.itemsize == 2:
                # 16-bit floats: the magnitude's bits, moved to float32's place (sign is moot when squaring).
                assert self._u32 is not None and magnitude is not None
                u32 = self._u32[: hi - lo]
                np.left_shift(magnitude[lo:hi], 16 if self.dtype == "BF16" else _F16_SHIFT, out=u32,
                              dtype=np.uint32)
                np.copyto(wide, u32.view(np.float32))
            else:
                np.copyto(wide, raw[lo:hi])
            np.multiply(wide, wide, out=wide)
            square = float(wide.sum())
            total += square * _F16_SQUARE_SCALE if self.dtype == "F16" else square
        return total

    def _nonfinite(self, raw: np.ndarray) -> None:
        # Rare: some value is NaN or Inf. Count them, and sum the rest as the reference does.
        values = as_float(self.dtype, raw).astype(np.float64)
        finite = np.isfinite(values)
        nan = int(np.isnan(values).sum())
        self.nan += nan
        self.inf += int(values.size - finite.sum()) - nan
        good = values[finite]
        if good.size:
            self.max_abs = max(self.max_abs, float(np.abs(good).max()))
            self.sumsq += float(np.einsum("i,i->", good, good))  # not np.dot: see _sum_squares

    @property
    def complete(self) -> bool:
        return self.seen == self.count and not self.carry

    def result(self) -> TensorStats:
        return TensorStats(count=self.count, l2=float(np.sqrt(self.sumsq)), max_abs=self.max_abs,
                           nan=self.nan, inf=self.inf, sample=self.sample)


def _bits_value(dtype: str, bits: int) -> float:
    """The value of a 16-bit float stored as `bits`."""
    raw = np.array([bits], dtype=np.uint16)
    return float(as_float(dtype, raw if dtype == "BF16" else raw.view(np.float16))[0])
