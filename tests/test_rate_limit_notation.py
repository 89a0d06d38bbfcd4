"""RATE_LIMIT_* settings are checked without importing `limits` (config.rate_limit_items), so gunicorn's master can
check every setting before it listens. That check must never be wider than `limits.parse_many`, which each worker's
rate limiter uses on the same strings: a string accepted at start and refused by the limiter would stop the worker
after Render saw the deploy healthy. Compared here over many strings, generated and hand-picked."""
from __future__ import annotations

import random

import pytest
from limits import parse_many

from callweaver.config import RATE_ITEM_RE, RATE_SEPARATORS_RE, RATE_WINDOWS_S, Settings, rate_limit_items

GENERATED = 30000
# Pieces of rate limit strings, right and wrong: what an operator types, what `limits`' own grammar allows
# (no space around "per", a ':' before a separator, leading zeros) and what Unicode adds (case-folding letters,
# non-ASCII spaces, full-width digits).
PIECES = ["1", "10", "30", "0", "00", "05", "2", "999999999999", "\uff13", "/", "per", "PER", "Per", "pre", " ", "  ",
          "\t", "\n", "\u00a0", "\u2003", "second", "seconds", "Minute", "MINUTES", "hour", "hours", "day", "days",
          "month", "months", "year", "years", "week", "sec", "min", "\u017fecond", "minu\u212ae", "s", ";", ",", "|",
          ":", "-", "x"]


def their_items(value: str) -> tuple[tuple[int, int], ...] | None:
    """What `limits` reads: (amount, window in seconds) per item, or None when it refuses the string."""
    try:
        return tuple((item.amount, item.get_expiry()) for item in parse_many(value))
    except ValueError:
        return None


def well_formed(rng: random.Random) -> str:
    """A string close to the notation, so that many are accepted by one side or both."""
    items = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        parts = [rng.choice(("1", "10", "30", "0", "05", "123")), rng.choice(("", " ", "  ", "\t", "\u00a0")),
                 rng.choice(("/", "per", "PER", " per ", "per ")), rng.choice(("", " ", "2", " 2 ", "0", "05 ")),
                 rng.choice(("second", "minutes", "Hour", "DAYS", "month", "year", "years", "week", "\u017fecond")),
                 rng.choice(("", " ", "s", "\n", ":"))]
        items.append("".join(parts))
    return rng.choice((";", ",", "|", "; ", ":;", ";;")).join(items)


def generated() -> list[str]:
    rng = random.Random(20261201)
    strings = []
    for _ in range(GENERATED):
        if rng.random() < 0.5:
            strings.append(well_formed(rng))
        else:
            strings.append("".join(rng.choice(PIECES) for _ in range(rng.randint(1, 8))))
    return strings


HAND_PICKED = ["30 per minute", "60 per minute", "10/second", "1 per 2 hours", "5/second;100/day", "5/second, 100/day",
               "5/second|100/day", "10 PER Minutes", "30per minute", "30 perminute", "30/2minutes", "1 per year",
               "1 per 2 years", "0 per minute", "1 per 0 minutes", "1 per 05 minutes", " 30 per minute ", "30 per week",
               "30", "per minute", "30 per", "", ";", "30 per minute;", "1/second:;2/minute", "1 per \u017fecond",
               "1\u00a0per minute", "\uff13\uff10 per minute", "30 per minute\n",
               # more digits than Python's int() reads (4300): both must refuse it, neither may raise otherwise
               "1" * 5000 + " per minute", "1 per " + "2" * 5000 + " minutes"]


def test_every_string_the_start_check_accepts_limits_reads_the_same_way():
    accepted = narrower = 0
    for value in HAND_PICKED + generated():
        ours, theirs = rate_limit_items(value), their_items(value)
        if ours is not None:
            accepted += 1
            assert theirs == ours, f"{value!r}: checked at start as {ours}, read by limits as {theirs}"
        elif theirs is not None:
            narrower += 1
            assert narrower_on_purpose(value), f"{value!r}: refused at start, but limits reads {theirs}"
    assert accepted > 3000 and narrower > 100, "the comparison must cover many strings of either kind"


def narrower_on_purpose(value: str) -> bool:
    """The strings `limits` reads and the start check refuses (config.RATE_ITEM_RE): non-ASCII spaces, a ':' before a
    separator, a window of 0 units (which `limits` reads as 1)."""
    if ":" in value or not value.isascii():
        return True
    items = [RATE_ITEM_RE.fullmatch(part) for part in RATE_SEPARATORS_RE.split(value)]
    return all(items) and any(int(item[2] or 1) == 0 for item in items)


@pytest.mark.parametrize("value", ["30 per minute", "10/second", "1 per 2 hours", "5/second;100/day",
                                   "60 per minute"])
def test_the_documented_examples_are_read(value):
    assert rate_limit_items(value) == their_items(value) and rate_limit_items(value)
    assert Settings.from_env({"RATE_LIMIT_CHAT": value}).rate_limit_chat == value


def test_the_windows_are_limits_own():
    """A month is 30 days and a year 12 of them in `limits`: the year-long window check must use its lengths."""
    for unit, seconds in RATE_WINDOWS_S.items():
        assert their_items(f"1 per {unit}") == ((1, seconds),)


def test_every_rate_limit_setting_is_checked_in_this_notation():
    """Each RATE_LIMIT_* setting (RATE_LIMIT_OPS_AUTH included) is read by the start check: a value `limits` cannot
    read stops the service naming it, and each default is one `limits` reads as the start check does."""
    from dataclasses import fields

    from callweaver.config import ConfigError

    names = [f.name for f in fields(Settings) if f.name.startswith("rate_limit_")]
    assert "rate_limit_ops_auth" in names
    defaults = Settings.from_env({})
    for name in names:
        assert rate_limit_items(getattr(defaults, name)) == their_items(getattr(defaults, name))
        with pytest.raises(ConfigError, match=name.upper()):
            Settings.from_env({name.upper(): "ten per minute"})
