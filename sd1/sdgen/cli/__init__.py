"""Command-line front ends (argument parsing plus library calls); scripts/*.py and the console commands
call their `main`."""
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..images import atomic_write_text

INTERRUPTED_EXIT = 130


def run(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None,
        resumable: bool = False) -> int:
    """Call main(argv); Ctrl-C prints one line (with the resume hint for resumable commands) and returns 130."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        hint = "; rerun the same command to resume" if resumable else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return INTERRUPTED_EXIT


def write_result(path, data: Any) -> None:
    """Write a measurement's numbers as JSON to `path` (its folder made, the file replaced in one rename) and say so."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps(data, indent=1))
    print(f"wrote {path}")
