"""What counts as the user's mistake, and how a CLI reports it: one line, a non-zero exit, no traceback.

Torch-free on purpose: every CLI imports this before its heavy modules, so a bad argument or a missing file is
answered before torch, diffusers or Lightning start up.
"""

from __future__ import annotations

import sys
from typing import NoReturn


class UserError(ValueError):
    """A mistake in the user's input, config or files whose message says what was wrong and what to do."""


# Every error class the project raises for a user's input derives from ValueError (UserError, AdapterError,
# ModelFolderError, PromptError, SchemaError, ...); the OS errors are files the user named.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def exit_with(prog: str, err: BaseException, code: int = 2) -> NoReturn:
    """Print ``<prog>: error: <message>`` on stderr and exit with ``code`` (2: bad input; 1: a run that failed)."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    sys.exit(code)
