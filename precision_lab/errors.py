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


def unknown_choice(field: str, value: object, choices: Iterable[str], aliases: Iterable[str] = (),
                   patterns: Iterable[str] = ()) -> UserError:
    """Build the error for `value` not being one of `choices`, naming the closest match (which may be an
    alias: accepted spellings that are not worth listing). `patterns` describe further accepted forms
    (e.g. "eXmY (custom, e.g. e5m7)"): listed with the choices, never offered as a match, since they are
    not names one can type as they are."""
    choices = sorted(set(str(c) for c in choices))
    close = difflib.get_close_matches(str(value), [*choices, *aliases], n=1, cutoff=0.5)
    hint = f" (closest match: {close[0]!r})" if close else ""
    return UserError(f"unknown {field} {value!r}{hint}; valid choices: {', '.join([*choices, *patterns])}")


def read_toml(path: str | os.PathLike, what: str = "file") -> dict:
    """Parse a TOML file; a missing, unreadable or binary file, a folder or malformed TOML is a one-line
    UserError naming the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; expected a TOML {what}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a text file (byte {err.start} is not UTF-8); expected a TOML {what}") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the {what}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: malformed TOML: {' '.join(str(err).split())}") from None
