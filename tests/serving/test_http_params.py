"""`parse_version`, the one reader of a model version (JSON bodies, query strings, URL paths)."""

from __future__ import annotations

import pytest

from app.errors import InvalidInput
from app.http.params import parse_version


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), (" ", "error"), (3, 3), ("3", 3), (" 3 ", 3), ("03", 3), ("0", "error")],
)
def test_lenient_reads_blank_as_latest_and_ignores_spaces(value: object, expected: object) -> None:
    if expected == "error":
        with pytest.raises(InvalidInput):
            parse_version(value)
    else:
        assert parse_version(value) == expected


@pytest.mark.parametrize("value", ["", " 3", "3 ", "x"])
def test_strict_refuses_blank_and_spaces(value: str) -> None:
    assert parse_version("3", strict=True) == 3
    assert parse_version(None, strict=True) is None
    with pytest.raises(InvalidInput, match="version must be a positive integer"):
        parse_version(value, strict=True)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "version must be a positive integer, got 0"),  # digits are shown as the number
        ("abc", "version must be a positive integer, got 'abc'"),
        (True, "version must be a positive integer, got True"),
        (1.5, "version must be a positive integer, got 1.5"),
        ("²", "version must be a positive integer, got '²'"),  # a digit that is not decimal
    ],
)
def test_message_names_the_value(value: object, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_version(value)
    assert caught.value.message == message


def test_message_can_name_the_value_as_sent() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_version("0", strict=True, invalid="model version {given!r} is not a positive integer")
    assert caught.value.message == "model version '0' is not a positive integer"
