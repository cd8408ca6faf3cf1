"""What counts as the user's mistake, and how a CLI reports it: one line, a non-zero exit, no traceback; also for
a config that Hydra refuses to compose (:func:`run_hydra_app`).

Torch-free on purpose: every CLI imports this before its heavy modules, so a bad argument or a missing file is
answered before torch, diffusers or Lightning start up.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn


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


# Where Hydra says the error is: a command-line override, or a config file of the defaults list
_CONTEXT = re.compile(
    r"^(?:Error merging override (?P<override>\S+)"
    r"|To append to your config use \+(?P<added>\S+)"
    r"|In '(?P<file>[^']+)'.*)$"
)
_NOISE = ("full_key:", "object_type=", "reference_type=", "Could not override", "Set the environment variable")


def config_error(err: BaseException, prog: str, config: str) -> str:
    """A Hydra composition error in one line: the override or file at fault, what is wrong, what to do.
    ``config`` is the app's config file (``conf/infer.yaml``), ``prog`` its module (``svi_infer``)."""
    options = getattr(err, "options", None)
    if getattr(err, "missing_cfg_file", None) and options is not None:  # e.g. model=nope
        return f"there is no config {err.missing_cfg_file!r}; choose one of: {', '.join(options)}"
    text = "\n".join(str(e) for e in (err, err.__cause__) if e is not None)
    where, what, key = None, [], None
    for line in filter(None, map(str.strip, text.splitlines())):
        if match := _CONTEXT.match(line):
            where = match["override"] or match["added"] or f"{match['file']}.yaml"
        elif line.startswith("full_key:"):
            key = line.split(":", 1)[1].strip()
        elif not line.startswith(_NOISE):
            what.append(line.rstrip(".:"))
    if key and any(re.match(r"Key '[^']+' (not in|is not in struct)", line) for line in what):
        from svi_infer.variants import renamed_key_message

        if renamed := renamed_key_message(key):
            return f"{where + ': ' if where else ''}{renamed}"
        what = [f"unknown key {key}"]
        todo = f"check its spelling against {config} (python -m {prog} --cfg job prints every key)"
    else:
        todo = f"fix the value of {key}" if key else "fix the config"
        todo += f" ({config} says what each key takes)"
    return f"{where + ': ' if where else ''}{'; '.join(what)}; {todo}"


def run_hydra_app(main: Callable[[], Any], prog: str, config: str) -> None:
    """Call a ``@hydra.main`` function; a config Hydra refuses to compose (unknown key, wrong type, no such option)
    becomes one line and exit status 2, instead of Hydra's several lines and status 1."""
    from hydra.errors import HydraException

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises composition errors to us instead of printing them
    try:
        main()
    except HydraException as err:
        exit_with(prog, config_error(err, prog, config))
