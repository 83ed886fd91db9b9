"""Per-tensor statistics of floating-point tensors (issue 15): the definition every reader agrees on.

`stats_of` is the reference: the whole tensor in memory. The seal and the content tier compute the
same numbers on the bytes as they stream past (digests), and must agree with it.
"""

from __future__ import annotations

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
