"""Command-line front ends (argument parsing plus library calls); scripts/*.py and the console commands
call their `main`."""
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from datosd.strategy import StrategyError
from ldm.checkpoint import CheckpointError

from ..generate import NonFiniteLatents
from ..images import atomic_write_text
from ..methods import MethodError
from ..runtime import UsageError

INTERRUPTED_EXIT = 130
USAGE_EXIT = 2
FAILED_EXIT = 1


def run(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None,
        resumable: bool = False) -> int:
    """Call main(argv). Ctrl-C prints one line (with the resume hint for resumable commands) and returns 130;
    bad input that shows only once work has begun (a checkpoint that does not fit its config, found when the
    model loads) prints one 'error: ...' line and returns 2, sampling that ended in NaN latents one line and 1."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        hint = "; rerun the same command to resume" if resumable else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return INTERRUPTED_EXIT
    except (UsageError, CheckpointError, MethodError, StrategyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_EXIT
    except NonFiniteLatents as err:
        print(f"error: {err}", file=sys.stderr)
        return FAILED_EXIT


def write_result(path, data: Any) -> None:
    """Write a measurement's numbers as JSON to `path` (its folder made, the file replaced in one rename) and say so."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps(data, indent=1))
    print(f"wrote {path}")
