"""The default codec: strict JSON, whichever encoder (``orjson`` for plain values, the
``json`` module for everything else) writes a value. The stored text must decode to the
same value the ``json`` module would have written, and every value the ``json`` module
refuses is refused."""

from __future__ import annotations

import enum
import json
import math
import sys
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from orbiter._internal.background import BackgroundTaskError, BackgroundTaskHandler
from orbiter.store.codec import JsonCodec

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
