"""User-facing errors: one clear line naming the field and the valid choices.

Every bad name, value or file a user can type ends in a `UserError`. The CLI turns it into one line on
stderr and exit status 2; library callers get an ordinary `ValueError` subclass.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Iterable


class UserError(ValueError):
    """A bad input from the user (name, value, file). The message is one line."""


def unknown_choice(field: str, value: object, choices: Iterable[str], aliases: Iterable[str] = ()) -> UserError:
    """Build the error for `value` not being one of `choices`, naming the closest match (which may be an
    alias: accepted spellings that are not worth listing)."""
    choices = sorted(set(str(c) for c in choices))
    close = difflib.get_close_matches(str(value), [*choices, *aliases], n=1, cutoff=0.5)
    hint = f" (closest match: {close[0]!r})" if close else ""
    return UserError(f"unknown {field} {value!r}{hint}; valid choices: {', '.join(choices)}")


def read_toml(path: str | os.PathLike, what: str = "file") -> dict:
    """Parse a TOML file; a missing file or malformed TOML is a one-line UserError naming the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: malformed TOML: {' '.join(str(err).split())}") from None
