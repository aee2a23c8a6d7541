"""Exceptions with messages meant for users. The CLI prints them as one line, without a traceback."""

from __future__ import annotations

from collections.abc import Iterable


class GradtailError(Exception):
    """Base class of every error gradtail raises on purpose."""


class ConfigError(GradtailError, ValueError):
    """A configuration or constructor argument is wrong (unknown key, bad value, missing counts)."""


class DataError(GradtailError):
    """A data file is missing, truncated, corrupt, or fails its checksum; or labels are invalid."""


class InputError(GradtailError, ValueError):
    """A tensor handed to a loss, metric or model has the wrong shape, dtype, range or is non-finite."""


class TrainingError(GradtailError, RuntimeError):
    """Training cannot go on (a non-finite loss, a statistics hook that never fired)."""


class OutputError(GradtailError):
    """An output cannot be written (read-only or full disk, a path that cannot be created), or a run
    directory already holds a run that would be replaced (see :mod:`gradtail.rundir`)."""


def did_you_mean(name: object, choices: Iterable[str], before: str = "; ") -> str:
    """``before + "did you mean 'x'?"`` for the closest of ``choices`` to a misspelled ``name``, else
    ``""``.

    Example:
        >>> did_you_mean("tua", ["tau", "gamma"])
        "; did you mean 'tau'?"
        >>> did_you_mean("xyz", ["tau", "gamma"])
        ''
    """
    import difflib

    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f"{before}did you mean {close[0]!r}?" if close else ""
