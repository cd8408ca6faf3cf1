"""Prompt streams: which prompt each clip of a long video gets."""

from __future__ import annotations

import json
from pathlib import Path


class PromptError(ValueError):
    """The prompt source cannot be read or holds no prompt."""


def parse_prompts(text: str, source: str = "<text>") -> list[str]:
    """A JSON list of strings, or one prompt per line with blank lines and ``#`` comments skipped."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise PromptError(f"{source} looks like a JSON list but does not parse: {err}") from None
        if not all(isinstance(p, str) for p in items):
            raise PromptError(f"{source}: a JSON prompt list must hold strings only")
        prompts = [p.strip() for p in items if p.strip()]
    else:
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise PromptError(f"{source} holds no prompt (one per line, '#' comments, or a JSON list of strings)")
    return prompts


def load_prompts(source: str | list[str]) -> list[str]:
    """Prompts from a file path (``.txt`` / ``.json``), a list, or a literal prompt string.

    A string that names no existing file but ends in ``.txt`` / ``.json`` is treated as a missing file,
    so a typo in a path is reported instead of becoming a prompt.
    """
    if isinstance(source, (list, tuple)):
        return parse_prompts(json.dumps(list(source)), "prompt list")
    path = Path(source).expanduser()
    if path.suffix.lower() in {".txt", ".json"} or path.is_file():
        try:
            return parse_prompts(path.read_text(encoding="utf-8"), str(path))
        except FileNotFoundError:
            raise PromptError(f"prompt file {path} does not exist; check the path, or give the prompt itself") from None
        except (OSError, UnicodeDecodeError) as err:
            raise PromptError(f"cannot read prompt file {path}: {err}") from None
    return parse_prompts(source, "prompt")


def prompt_for_clip(prompts: list[str], clip: int, repeat_times: int = 1, first_only: bool = False) -> str:
    """Clip ``clip``'s prompt: each prompt is used ``repeat_times`` clips in a row; the stream loops."""
    if first_only:
        return prompts[0]
    return prompts[(clip // max(repeat_times, 1)) % len(prompts)]
