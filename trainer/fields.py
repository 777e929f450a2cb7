"""One field of one data row, checked: the rules every row format shares (the task files of data.py and
the user's own sources of sources.py), and the error they raise."""

from __future__ import annotations

import json

MAX_TEXT_CHARS = 1_000_000  # per text field of a row (data.py's module docstring says why)


class DataError(ValueError):
    """Bad task data; the message names the file, row and field."""


def text_field(row: dict, key: str, where: str, optional: bool = False) -> str:
    """Field `key` of a row: a string, not blank (an optional field may be absent or empty), of at most
    MAX_TEXT_CHARS characters and valid Unicode."""
    if key not in row:
        if optional:
            return ""
        raise DataError(f"{where}: field '{key}' is missing")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {show_value(value)}")
    if not optional and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty; give it text or remove the row")
    if len(value) > MAX_TEXT_CHARS:
        raise DataError(f"{where}: field '{key}' has {len(value):,} characters, over the limit of {MAX_TEXT_CHARS:,}; "
                        f"shorten the text or remove the row")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: field '{key}' holds an unpaired surrogate {value[e.start]!r} at character "
                        f"{e.start}, which is not valid Unicode; fix that \\u escape") from None
    return value


def show_value(value) -> str:
    """A JSON value for an error message: its JSON type and a short excerpt."""
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
    if value is None:
        return kind
    text = json.dumps(value, ensure_ascii=False)
    return f"{kind} ({text if len(text) <= 40 else text[:37] + '...'})"
