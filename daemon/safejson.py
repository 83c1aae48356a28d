"""JSON from sources we do not control (registry values, local files), decoded within bounds.

Python's decoder recurses once per nesting level, so a value of a few thousand `[` raises RecursionError from
deep inside it; and a multi-megabyte value costs memory and time in every daemon that lists it. Both limits are
checked before decoding, and every failure is a ValueError with a reason fit for a one-line log.
"""

from __future__ import annotations

import json
import re
from typing import Any

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def loads(data: bytes | str, *, max_bytes: int, max_depth: int) -> Any:
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise ValueError(f"{len(raw)} bytes, more than the {max_bytes} allowed")
    if _depth(raw) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    try:
        return json.loads(raw.decode())
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _depth(raw: bytes) -> int:
    """The deepest bracket nesting, ignoring brackets inside strings."""
    depth = deepest = 0
    for byte in _STRING.sub(b'""', raw):
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest
