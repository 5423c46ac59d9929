"""How values and times become stored text, and back.

Payloads and results are JSON values (dict with str keys, list, str, int, float, bool,
None; tuples are stored as arrays and come back as lists). The default codec is strict
JSON: NaN and infinities are refused, so every stored value is valid for
``json_extract``. Reading a file never executes code: there is no pickle.
A custom :class:`Codec` can map richer types (e.g. pydantic models) to JSON text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any, Protocol

import orjson

from orbiter.errors import InvalidValueError

__all__ = [
    "Codec",
    "JsonCodec",
    "check_id",
    "encode_value",
    "is_unicode_text",
    "utc_now_text",
    "utf8_size",
    "writes_checked_json",
]

TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


#: The text of the last second asked for, as ``(second since the epoch, "YYYY-MM-DD
#: HH:MM:SS.")``: one tuple, replaced whole, so a thread always reads a matching pair.
_LAST_SECOND: list[tuple[int, str]] = [(-1, "")]


def utc_now_text() -> str:
    """The current UTC time as stored: ``YYYY-MM-DD HH:MM:SS.ffffff``.

    Every write takes one, so the date and time of day are formatted once per second
    and only the microseconds each time (~0.45 us, against ~1.6 us for
    ``datetime.now(UTC)...isoformat()``).
    """
    second, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
    last = _LAST_SECOND[0]
    if last[0] != second:
        last = (second, time.strftime("%Y-%m-%d %H:%M:%S.", time.gmtime(second)))
        _LAST_SECOND[0] = last
    return f"{last[1]}{nanoseconds // 1000:06d}"


class Codec(Protocol):
    """Turns values into JSON text and back. ``dumps`` raises on values it cannot store."""

    def dumps(self, value: Any) -> str:
        """Encode ``value`` as JSON text; raise ``TypeError``/``ValueError`` if impossible."""
        ...

    def loads(self, text: str) -> Any:
        """Decode JSON text written by :meth:`dumps`."""
        ...


_CONTAINERS = (dict, list, tuple)


def _check_keys(value: Any) -> None:
    """Raise ``TypeError`` for a dict key that is not a str, anywhere in ``value``.

    ``json.dumps`` itself refuses values it cannot encode and (with ``allow_nan=False``)
    NaN and infinities, but it silently turns int, float, bool and None keys into strings,
    which would not round-trip; this walk catches those, touching containers only.
    """
    stack = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, dict):
            for key, item in current.items():  # pyright: ignore[reportUnknownVariableType]
                if type(key) is not str:
                    raise TypeError(
                        f"a dict key {key!r} is of type {type(key).__name__}; JSON keys are strings"
                    )
                if isinstance(item, _CONTAINERS):
                    stack.append(item)
        elif isinstance(current, list | tuple):
            stack.extend(item for item in current if isinstance(item, _CONTAINERS))  # pyright: ignore[reportUnknownVariableType]


#: One encoder for every call (``json.dumps`` with options builds a new one each time).
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
#: For the rare str holding a lone surrogate (text decoded with ``surrogateescape``, say):
#: UTF-8 cannot hold it, a ``\udcff`` escape can, and it decodes back to the same str.
_ASCII_ENCODER = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def is_unicode_text(text: str) -> bool:
    """Whether ``text`` can be stored as UTF-8 (it holds no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_size(text: str) -> int:
    """Bytes ``text`` takes as UTF-8 (raises ``UnicodeEncodeError`` on a lone surrogate)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def check_id(value: object, name: str) -> str:
    """``value`` if it can be a task or run id (a non-empty str that UTF-8 can hold)."""
    if not isinstance(value, str):
        raise InvalidValueError(f"{name} must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidValueError(f"{name} must not be empty")
    if not value.isascii() and not is_unicode_text(value):
        raise InvalidValueError(f"{name} {value!r} is not valid Unicode text (a lone surrogate)")
    return value


_NONE = type(None)
#: Deeper values go to the ``json`` module (``orjson`` stops at 255 levels); the bound
#: also ends the walk of a value that contains itself.
_MAX_PLAIN_DEPTH = 200


class _NotPlain(Exception):
    """Raised inside :func:`_plain_copy` when the value is not plain JSON."""


def _plain_copy(value: Any, depth: int = 0) -> Any:
    """A private copy of ``value`` if it is built only of the exact JSON types (no
    subclasses), with str keys and finite floats, at most ``_MAX_PLAIN_DEPTH`` containers
    deep; raises :class:`_NotPlain` otherwise.

    Runs no code of the value's (types are compared by identity; containers are copied
    by their exact built-in types, in C, and the copy is what is checked). ``orjson`` is
    given the copy, which no other thread can change while it is being encoded; the
    leaves are immutable and shared.
    """
    kind = type(value)
    if kind is str or kind is int or kind is bool or kind is _NONE:
        return value
    if kind is float:
        if value - value != 0.0:  # NaN or an infinity
            raise _NotPlain
        return value
    if depth >= _MAX_PLAIN_DEPTH:
        raise _NotPlain
    depth += 1
    copy: Any
    if kind is dict:
        copy = value.copy()
        slots: Iterable[tuple[Any, Any]] = copy.items()  # values replaced in place
    elif kind is list or kind is tuple:
        copy = list(value)
        slots = enumerate(copy)
    else:
        raise _NotPlain
    for slot, item in slots:
        if kind is dict and type(slot) is not str:
            raise _NotPlain
        leaf = type(item)  # the common leaves inline: a call per item costs more
        if leaf is str or leaf is int or leaf is bool or leaf is _NONE:
            continue
        if leaf is float:
            if item - item != 0.0:
                raise _NotPlain
            continue
        copy[slot] = _plain_copy(item, depth)
    return copy


def _stdlib_dumps(value: Any) -> str:
    """Encode with the ``json`` module, which decides every case ``orjson`` does not."""
    text = _ENCODER.encode(value)
    if isinstance(value, _CONTAINERS):
        _check_keys(value)
    if not text.isascii() and not is_unicode_text(text):
        text = _ASCII_ENCODER.encode(value)
    return text


#: Maps each digit byte to ``0`` and every other byte to a space, so that 19 digits in a
#: row (maybe an int beyond 64 bits, which ``orjson`` would decode as a float without a
#: word; any shorter int fits) show as :data:`_LONG_RUN`. Faster than a regex by 4x.
_DIGITS_ONLY = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_RUN = b"0" * 19


def _has_long_digit_run(text: str) -> bool:
    """Whether ``text`` holds 19 or more ASCII digits in a row."""
    # find(), not ``in``: ``bytes in bytes`` first tries the operand as an int and raises
    # (and clears) a TypeError every time, which costs more than the search itself.
    return text.encode("utf-8", "surrogatepass").translate(_DIGITS_ONLY).find(_LONG_RUN) != -1


class JsonCodec:
    """Strict JSON: dicts with str keys, lists, str, int, finite float, bool, None.

    Plain values (the exact types above, as payloads and results nearly always are) are
    encoded by ``orjson``, several times faster than the ``json`` module; only a checked
    private copy of a plain value reaches it. Anything else goes to the ``json`` module,
    which refuses what JSON cannot hold (``orjson`` itself would quietly write NaN as
    ``null`` and a UUID or an enum as text) and stores what ``orjson`` cannot (ints
    beyond 64 bits, lone surrogates). Both write the same JSON values; only the spelling
    of some floats differs (``1e-7`` for ``1e-07``, ``0.00001`` for ``1e-05``), which can
    move a value's size, as ``max_value_bytes`` counts it, by a few bytes.
    """

    def dumps(self, value: Any) -> str:
        """Encode ``value``; raise ``TypeError``/``ValueError`` naming what cannot be stored."""
        try:
            plain = _plain_copy(value)
        except _NotPlain:
            return _stdlib_dumps(value)
        try:
            return orjson.dumps(plain).decode()  # the copy holds exact JSON types only
        except orjson.JSONEncodeError:  # beyond orjson: an int past 64 bits, a lone surrogate
            return _stdlib_dumps(value)

    def loads(self, text: str) -> Any:
        """Decode JSON text: by ``orjson`` when it decodes it exactly as the ``json`` module
        would, else by the ``json`` module (which also raises the errors)."""
        if type(text) is str and not _has_long_digit_run(text):
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:
                pass  # NaN, 1e400, an escaped lone surrogate, or not JSON: json decides
        return json.loads(text)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def writes_checked_json(codec: Codec) -> bool:
    """Whether ``codec`` writes JSON the way :class:`JsonCodec` does (checked as it is
    made); the text of any other codec must be checked by :func:`encode_value`."""
    return getattr(type(codec), "dumps", None) is JsonCodec.dumps  # (a module has none)


def encode_value(
    codec: Codec, value: Any, what: str, max_bytes: int, *, check_json: bool = True
) -> str:
    """Encode ``value`` with ``codec``, turning any failure into :class:`InvalidValueError`.

    If ``check_json`` (a codec for which :func:`writes_checked_json` is False), its text
    is checked to be JSON: what the stored form promises, and what ``json_extract``
    reads."""
    try:
        text = codec.dumps(value)
    except Exception as exc:  # a codec of the caller's may raise anything
        raise InvalidValueError(f"cannot store {what}: {exc}") from exc
    if not isinstance(text, str):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise InvalidValueError(f"codec.dumps returned {type(text).__name__}, expected str")
    if check_json:
        try:
            json.loads(text, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:
            raise InvalidValueError(
                f"cannot store {what}: codec.dumps returned text that is not JSON ({exc})"
            ) from exc
    try:
        size = utf8_size(text)
    except UnicodeEncodeError as exc:
        raise InvalidValueError(f"cannot store {what}: codec.dumps returned {exc}") from exc
    if size > max_bytes:
        raise InvalidValueError(
            f"cannot store {what}: {size} bytes of JSON exceeds max_value_bytes={max_bytes}"
        )
    return text
