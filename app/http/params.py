"""Request values that every protocol reads the same way."""

from __future__ import annotations

from app.errors import InvalidInput

INVALID_VERSION = "version must be a positive integer, got {value!r}"


def parse_version(value: object, *, strict: bool = False, invalid: str = INVALID_VERSION) -> int | None:
    """A model version from a JSON body, a query string or a URL path; None asks for the highest ready one.

    Args:
        value: None, a positive integer, or its decimal digits as text.
        strict: refuse `""` and digits with spaces around them (a lenient caller reads `""` as None and
            ignores the spaces).
        invalid: the message of the error; `{value!r}` is the value with its digits read as a number,
            `{given!r}` the value as sent.

    Raises:
        InvalidInput: anything else (`invalid`).
    """
    if value is None or (value == "" and not strict):
        return None
    given = value
    if isinstance(value, str):
        digits = value if strict else value.strip()
        if digits.isdecimal():
            value = int(digits)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(invalid.format(value=value, given=given))
    return value
