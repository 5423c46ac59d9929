"""The default codec: strict JSON, whichever encoder (``orjson`` for plain values, the
``json`` module for everything else) writes a value. The stored text must decode to the
same value the ``json`` module would have written, and every value the ``json`` module
refuses is refused."""

from __future__ import annotations

import enum
import json
import math
import random
import struct
import sys
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from orbiter._internal.background import BackgroundTaskError, BackgroundTaskHandler
from orbiter.store.codec import TIMESTAMP_FORMAT, JsonCodec, utc_now_text

CODEC = JsonCodec()


def _stdlib(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _nested(depth: int) -> list[Any]:
    outer: list[Any] = []
    current = outer
    for _ in range(depth):
        inner: list[Any] = []
        current.append(inner)
        current = inner
    return outer


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Name(enum.StrEnum):
    ADA = "ada"


class Text(str):
    pass


class Number(float):
    pass


@dataclass
class Point:
    x: int


@dataclass(slots=True)
class Unfinished:
    """A slots dataclass whose field was never set (``orjson`` 3.13 crashed on one)."""

    score: float = field(init=False)


class Unreadable(enum.Enum):
    A = 1

    @property
    def value(self) -> Any:
        raise KeyError("no value")


class _LooksLikeStr(type):
    def __eq__(cls, other: object) -> bool:
        return other is str or type.__eq__(cls, other)

    def __hash__(cls) -> int:
        return hash(str)


class Impostor(metaclass=_LooksLikeStr):
    """A type equal to ``str`` (and hashing like it): a type check must compare identity."""


STORABLE: list[Any] = [
    None,
    True,
    0,
    -(2**63),
    2**64 - 1,
    2**70,  # beyond orjson's 64 bits: the json module writes it
    -(2**100),
    0.1,
    -0.0,
    1e-7,
    5e-324,
    1e300,
    1.7976931348623157e308,
    "",
    "naïve ☃ 😀",
    "nul \x00 and control \x1f",
    "lone \udcff surrogate",  # stored as its \\u escape
    [],
    {},
    (1, "two", 3.0),
    {"a": [1, {"b": None, "c": [True, False]}], "d": "é"},
    _nested(300),  # deeper than orjson goes
    Level.HIGH,  # int and str subclasses are written as their values, as json does
    Name.ADA,
    {"k": Text("v")},
    [Number(1.5)],
    OrderedDict(z=1, a=2),
]

UNSTORABLE: list[Any] = [
    math.nan,
    -math.inf,
    [1.0, math.inf],
    {"x": {"y": math.nan}},
    uuid.UUID(int=7),  # orjson would write these as text; JSON has no such type
    Colour.RED,
    datetime(2026, 1, 1, tzinfo=UTC),
    Point(1),
    {Text("k"): 1},  # keys must be exactly str (a str subclass key does not round-trip)
    {1: "int key"},
    {None: "none key"},
    {"ok": 1, "bad": {2: 3}},
    object(),
    {1, 2},
    b"bytes",
    {"summary": Unfinished()},
    [Unreadable.A],
    {"v": Impostor()},
    [[[Point(1)]]],
]


@pytest.mark.parametrize("value", STORABLE, ids=lambda v: type(v).__name__)
def test_storable_values_decode_to_what_the_json_module_writes(value: Any) -> None:
    text = CODEC.dumps(value)
    assert isinstance(text, str)
    assert json.loads(text) == json.loads(_stdlib(value))
    assert CODEC.loads(text) == json.loads(text)


@pytest.mark.parametrize("value", UNSTORABLE, ids=lambda v: type(v).__name__)
def test_values_json_cannot_hold_are_refused(value: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        CODEC.dumps(value)


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_a_circular_value_is_refused(kind: str) -> None:
    loop: Any = [] if kind == "list" else {}
    if kind == "list":
        loop.append([1, loop])
    else:
        loop["self"] = {"again": loop}
    with pytest.raises(ValueError, match="Circular"):
        CODEC.dumps(loop)


def test_plain_values_are_written_compact_and_utf8() -> None:
    assert CODEC.dumps({"a": [1, 2.5, None], "b": "é"}) == '{"a":[1,2.5,null],"b":"é"}'


@pytest.mark.parametrize("value", [Colour.RED, uuid.UUID(int=7), math.nan, {Text("k"): 1}])
async def test_a_handler_refuses_them_before_writing(db_path: Path, value: Any) -> None:
    async with BackgroundTaskHandler(database=db_path) as handler:
        with pytest.raises(BackgroundTaskError, match="cannot store payload"):
            handler.submit("a", "run", payload=value)
        handler.submit("b", "run")
        with pytest.raises(BackgroundTaskError, match="cannot store result"):
            await handler.handle_result("b", {"v": value}, is_main_running=False)
        assert handler.get_task("a") is None
        assert handler.pending_queue.size == 0


async def test_every_storable_value_round_trips_through_a_file(db_path: Path) -> None:
    async with BackgroundTaskHandler(database=db_path) as handler:
        for index, value in enumerate(STORABLE):
            handler.submit(f"t{index}", "run", payload=value)
            await handler.handle_result(f"t{index}", value, is_main_running=False)
    async with BackgroundTaskHandler(database=db_path) as handler:
        drained = [task async for task in handler.drain_pending()]
    assert [task.task_id for task in drained] == [f"t{i}" for i in range(len(STORABLE))]
    for task, value in zip(drained, STORABLE, strict=True):
        expected = json.loads(_stdlib(value))
        assert task.result == expected
        assert task.payload == expected


@pytest.mark.parametrize("bad", [math.nan, uuid.UUID(int=7), Colour.RED], ids=repr)
def test_a_value_changed_by_another_thread_while_encoding_is_never_stored_unchecked(
    bad: Any,
) -> None:
    # Another thread replaces an item the check has already passed. What is stored is the
    # value as it was read (0) or a refusal, never NaN as null nor a UUID or enum as text
    # (and the process does not crash: orjson 3.13 does on some such values).
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so the change lands mid-encode
    try:
        for _ in range(10):
            value: list[Any] = [0] + [1] * 200_000
            go = threading.Event()

            def change(value: list[Any] = value, go: threading.Event = go) -> None:
                go.wait()
                value[0] = bad

            changer = threading.Thread(target=change)
            changer.start()
            go.set()
            try:
                text = CODEC.dumps(value)
            except (TypeError, ValueError):
                text = None
            changer.join()
            if text is not None:
                assert json.loads(text)[0] == 0
    finally:
        sys.setswitchinterval(old_interval)


#: Stored texts whose decoding could differ between ``orjson`` and the ``json`` module.
DECODE_EDGES: list[Any] = [
    "999999999999999999",  # 18 digits: fits 64 bits
    "-999999999999999999",
    str(2**63 - 1),
    str(2**63),
    str(2**64 - 1),
    str(2**64),  # orjson: a float
    str(-(2**63) - 1),
    str(10**30),
    f'{{"id": {2**70}, "n": [1, {-(2**65)}]}}',
    '"a string 12345678901234567890 of digits"',
    "0.12345678901234567890123",
    "1e400",  # the json module: inf; orjson refuses
    "1e-400",
    "-0.0",
    "NaN",  # not strict JSON, but the json module reads it (a file edited by hand)
    "[Infinity, -Infinity]",
    '"\\udcff lone surrogate escape"',
    '"\\ud83d\\ude00 pair"',
    '"naïve ☃"',
    '{"a": 1, "a": 2}',
    "[" * 500 + "]" * 500,
    "[" * 1100 + "]" * 1100,  # deeper than either decodes
]


def _typed(value: Any) -> Any:
    """``value`` with every leaf tagged by its type (``1 == 1.0`` must not pass)."""
    if isinstance(value, dict):
        return {key: _typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_typed(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    return (type(value).__name__, value)


def _outcome(loads: Any, text: str | bytes) -> Any:
    try:
        return _typed(loads(text))
    except RecursionError:
        return RecursionError


@pytest.mark.parametrize("text", DECODE_EDGES, ids=lambda t: t[:24])
def test_stored_text_decodes_exactly_as_the_json_module_reads_it(text: str) -> None:
    expected = _outcome(json.loads, text)
    assert _outcome(CODEC.loads, text) == expected
    assert _outcome(CODEC.loads, text.encode()) == expected  # a BLOB column


@pytest.mark.parametrize("text", ["", "[1,]", "nan", '"\t"', "01", "1 2", "{'a': 1}"])
def test_text_that_is_not_json_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        CODEC.loads(text)


def test_random_values_decode_exactly_as_the_json_module_reads_them() -> None:
    rng = random.Random(20261207)

    def number() -> Any:
        choice = rng.randrange(4)
        if choice == 0:
            return rng.randrange(-(10 ** rng.randrange(1, 25)), 10 ** rng.randrange(1, 25))
        if choice == 1:
            return struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if choice == 2:
            return rng.uniform(-1e6, 1e6)
        return "".join(rng.choice("0123456789 x.é😀") for _ in range(rng.randrange(30)))

    def value(depth: int) -> Any:
        if depth > 3 or rng.random() < 0.3:
            return number()
        if rng.random() < 0.5:
            return [value(depth + 1) for _ in range(rng.randrange(5))]
        return {f"k{i}": value(depth + 1) for i in range(rng.randrange(5))}

    for _ in range(3000):
        item = value(0)
        text = json.dumps(item, allow_nan=True)
        assert _typed(CODEC.loads(text)) == _typed(json.loads(text)), text


def test_utc_now_text_is_the_wall_clock_in_the_stored_form() -> None:
    # (datetime.now() rounds to the microsecond; the stored form truncates.)
    before = datetime.now(UTC).replace(tzinfo=None) - timedelta(microseconds=1)
    text = utc_now_text()
    after = datetime.now(UTC).replace(tzinfo=None)
    assert len(text) == 26
    assert before <= datetime.strptime(text, TIMESTAMP_FORMAT) <= after


def test_utc_now_text_formats_each_second_anew(monkeypatch: pytest.MonkeyPatch) -> None:
    # It formats the date and time of day once per second: the cached text must never
    # outlive its second, and the microseconds are truncated, never rounded up into
    # the next second.
    clock = iter(
        [
            1_700_000_000_999_999_999,  # 2023-11-14 22:13:20.999999999
            1_700_000_001_000_000_000,
            1_700_000_001_000_000_999,
            1_700_003_600_123_456_000,  # an hour later
            86_400_000_000_000 * 20_000,  # 2024-10-04, midnight
        ]
    )
    monkeypatch.setattr("orbiter.store.codec.time.time_ns", lambda: next(clock))
    assert [utc_now_text() for _ in range(5)] == [
        "2023-11-14 22:13:20.999999",
        "2023-11-14 22:13:21.000000",
        "2023-11-14 22:13:21.000000",
        "2023-11-14 23:13:20.123456",
        "2024-10-04 00:00:00.000000",
    ]
