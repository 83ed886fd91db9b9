"""Bounded JSON parsing for bytes read from a bucket: a size limit and a nesting limit.

The standard library's parser recurses once per `[` or `{`; a document nested 100,000 deep ends in
RecursionError (not a ValueError, so callers that catch bad JSON miss it). Here the nesting depth is
measured first, by a linear scan without recursion, and a document deeper than the limit is refused
with `JSONLimitExceeded` (a ValueError) before the parser sees it.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

# Deep enough for any manifest, trainer_state.json, config.json or shard index we have seen (they
# nest < 10 levels; a run config a few more); shallow enough that the recursive parser is safe.
DEFAULT_MAX_DEPTH = 100
DEFAULT_MAX_BYTES = 64 * 2**20

# A JSON string: quote, then runs of ordinary characters and escape pairs (unrolled, so the regex
# engine neither backtracks nor recurses on long strings).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class JSONLimitExceeded(ValueError):
    """A JSON document is larger or nested deeper than the caller allows."""


def nesting_depth(text: str) -> int:
    """Return the deepest nesting of arrays and objects in `text`, without recursion.

    Strings are removed first, so brackets inside them do not count. For invalid JSON the figure is
    an upper bound on how deep a parser gets before it stops at the error.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _text(data: bytes | bytearray | str) -> str:
    if isinstance(data, str):
        return data
    # As json.loads does for bytes: UTF-8, -16 or -32 by the first bytes.
    return bytes(data).decode(json.detect_encoding(data), "surrogatepass")


def loads(
    data: bytes | bytearray | str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    **kwargs: Any,
) -> Any:
    """Parse JSON like `json.loads`, refusing documents over `max_bytes` or nested over `max_depth`.

    `max_bytes` counts bytes, or characters when `data` is already a str. Every failure is a
    ValueError: JSONLimitExceeded, json.JSONDecodeError or UnicodeDecodeError (hooks aside).
    `kwargs` go to `json.loads` (object_pairs_hook, parse_int, ...).
    """
    if len(data) > max_bytes:
        raise JSONLimitExceeded(f"JSON document of {len(data)} bytes is over the {max_bytes}-byte limit")
    text = _text(data)
    # Counting opening brackets is cheap and bounds the depth; most documents stop here.
    if text.count("[") + text.count("{") > max_depth and (depth := nesting_depth(text)) > max_depth:
        raise JSONLimitExceeded(f"JSON nested {depth} levels deep, over the limit of {max_depth}")
    return json.loads(text, **kwargs)
