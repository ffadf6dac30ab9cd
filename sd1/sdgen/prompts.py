"""Prompt files: one prompt per line, the line index being the prompt's index (the shipped sets are in `data/`,
see `data/README.md`)."""
from pathlib import Path
from typing import Union

PathLike = Union[str, Path]


def read_prompts(path: PathLike) -> list:
    """Read a prompt file: one prompt per line, UTF-8.

    Only the line terminator (`\\n`, or `\\r\\n`) is removed; other whitespace is kept
    as written. A final newline does not start an extra prompt.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, or has a blank line (a blank line would shift
            the prompt <-> image index pairing, so it is refused rather than kept).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text == "":
        raise ValueError(f"prompt file is empty: {path} (expected one prompt per line)")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start a new one
    prompts = [line[:-1] if line.endswith("\r") else line for line in lines]
    for i, prompt in enumerate(prompts):
        if prompt.strip() == "":
            raise ValueError(
                f"{path}: line {i + 1} is blank; a prompt file has one non-empty prompt per line"
            )
    return prompts
