"""Command-line front ends (argument parsing plus library calls); scripts/*.py and the console commands
call their `main`."""
import sys
from typing import Callable, Optional, Sequence

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
