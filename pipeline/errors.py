"""The project's error classes: one base, so the CLI maps any of them to a one-line reason and an exit code.

`InputError` (exit 2) is a mistake the user can fix by changing what they passed: a bad flag value, a missing
file, an unknown config key, a corrupt input. `PneumoError` itself (exit 1) is a failure at run time with good
input: a store that does not answer, a full disk, a study whose every trial failed. Every module's own error
class derives from one of the two, so `cli.main` needs no list of them and imports nothing heavy to name them.
"""

from __future__ import annotations


class PneumoError(Exception):
    """A failure with a one-line, user-facing reason (exit status 1)."""

    exit_code = 1


class InputError(PneumoError, ValueError):
    """Bad input the user can fix: a flag value, a file, a config key (exit status 2)."""

    exit_code = 2


def one_line(e: BaseException) -> str:
    """The exception's message on one line (MLflow and OS errors carry newlines and indentation)."""
    return " ".join(str(e).split()) or type(e).__name__
