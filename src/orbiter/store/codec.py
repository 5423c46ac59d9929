"""How values and times become stored text, and back.

Payloads and results are JSON values (dict with str keys, list, str, int, float, bool,
None; tuples are stored as arrays and come back as lists). The default codec is strict
JSON: NaN and infinities are refused, so every stored value is valid for
``json_extract``. Reading a file never executes code: there is no pickle.
A custom :class:`Codec` can map richer types (e.g. pydantic models) to JSON text.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any, Protocol

from orbiter.errors import InvalidValueError

__all__ = ["Codec", "JsonCodec", "utc_now_text"]

TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def utc_now_text() -> str:
    """The current UTC time as stored: ``YYYY-MM-DD HH:MM:SS.ffffff``."""
    return datetime.now(UTC).strftime(TIMESTAMP_FORMAT)


class Codec(Protocol):
    """Turns values into JSON text and back. ``dumps`` raises on values it cannot store."""

    def dumps(self, value: Any) -> str:
        """Encode ``value`` as JSON text; raise ``TypeError``/``ValueError`` if impossible."""
        ...

    def loads(self, text: str) -> Any:
        """Decode JSON text written by :meth:`dumps`."""
        ...


def _check_json_value(value: Any, path: str) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first part JSON cannot round-trip."""
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path} is {value!r}, which strict JSON cannot store")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):  # pyright: ignore[reportUnknownVariableType]
            _check_json_value(item, f"{path}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():  # pyright: ignore[reportUnknownVariableType]
            if not isinstance(key, str):
                raise TypeError(
                    f"{path} has a key {key!r} of type {type(key).__name__}; JSON keys are strings"
                )
            _check_json_value(item, f"{path}[{key!r}]")
        return
    raise TypeError(f"{path} is of type {type(value).__name__}, which JSON cannot store")


class JsonCodec:
    """Strict JSON: dicts with str keys, lists, str, int, finite float, bool, None."""

    def dumps(self, value: Any) -> str:
        """Encode ``value``; raise ``TypeError``/``ValueError`` naming what cannot be stored."""
        _check_json_value(value, "value")
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    def loads(self, text: str) -> Any:
        """Decode JSON text."""
        return json.loads(text)


def encode_value(codec: Codec, value: Any, what: str, max_bytes: int) -> str:
    """Encode ``value`` with ``codec``, turning any failure into :class:`InvalidValueError`."""
    try:
        text = codec.dumps(value)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        message = str(exc).replace("value", what, 1)
        raise InvalidValueError(f"cannot store {what}: {message}") from exc
    if not isinstance(text, str):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise InvalidValueError(f"codec.dumps returned {type(text).__name__}, expected str")
    size = len(text.encode("utf-8")) if len(text) * 4 > max_bytes else len(text)
    if size > max_bytes:
        raise InvalidValueError(
            f"cannot store {what}: {size} bytes of JSON exceeds max_value_bytes={max_bytes}"
        )
    return text
