"""What a user can fix, and how the command lines report it.

`UserError` is the base of every error that a flag, a path, a file or the network causes and the user can
correct (a bad `--init`, a dataset that is not there, no network for a download, a corrupt weights file, ...).
The CLIs' `main` functions are wrapped in `cli`: a `UserError` prints as one line `error: ...` on stderr with
exit status 2; any other exception is a bug or a failure of the environment (XLA, memory, ...) and propagates
with its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """An error the user can fix; the CLIs print it as one line and exit with status 2."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A flag or a combination of flags that cannot work (also a `ValueError`, as argument errors are)."""


class CheckpointReadError(UserError, ValueError):
    """A checkpoint that cannot be read back: a PyTorch file truncated, corrupt or not a state dict, or an orbax
    step of a run whose files fail their checksums or that orbax cannot restore."""


def describe(e: BaseException) -> str:
    """'Type: message' of an exception from another library (PIL, orbax), for a one-line UserError."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def cli(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a CLI's `main(argv)`: a `UserError` becomes `error: <message>` on stderr and exit status 2, argparse's
    own exit (usage error: 2, --help: 0) a return value; everything else propagates with its traceback."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None, *args, **kwargs) -> int:
        try:
            return main(argv, *args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except SystemExit as e:  # argparse: --help, or a usage error already printed
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)

    return wrapped
