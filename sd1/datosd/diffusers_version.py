"""The diffusers versions that datosd's diffusers patch supports, and the check that refuses any other.

0.27 is the oldest: the patch's UNet forward calls the embedding methods that 0.27 split out of
`UNet2DConditionModel.forward` (`get_time_embed`, `get_class_embed`, `get_aug_embed`,
`process_encoder_hidden_states`), and img2img runs start at the schedulers' `begin_index` (`set_begin_index`, also
0.27). 0.42 is the newest minor tested. The test suite runs the diffusers tests under both
(tests/test_diffusers_versions.py; .ci/prepare_diffusers_oldest.sh installs the oldest).
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

OLDEST_DIFFUSERS: Tuple[int, int] = (0, 27)
NEWEST_DIFFUSERS: Tuple[int, int] = (0, 42)
DIFFUSERS_REQUIREMENT = (f"diffusers>={OLDEST_DIFFUSERS[0]}.{OLDEST_DIFFUSERS[1]},"
                         f"<{NEWEST_DIFFUSERS[0]}.{NEWEST_DIFFUSERS[1] + 1}")


def diffusers_minor(version: str) -> Optional[Tuple[int, int]]:
    """(major, minor) of a version string such as "0.42.1" or "0.43.0.dev0"; None when it has none."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return None if match is None else (int(match[1]), int(match[2]))


def check_diffusers_version(version: Optional[str] = None) -> None:
    """Raise ImportError, in one line (the version found, the supported range, what to install), unless `version`
    (default: the installed `diffusers.__version__`) is a supported diffusers minor."""
    if version is None:
        import diffusers

        version = str(diffusers.__version__)
    minor = diffusers_minor(version)
    if minor is None or not OLDEST_DIFFUSERS <= minor <= NEWEST_DIFFUSERS:
        oldest, newest = (".".join(map(str, v)) for v in (OLDEST_DIFFUSERS, NEWEST_DIFFUSERS))
        raise ImportError(f"datosd's diffusers patch supports diffusers {oldest} to {newest}.x, found diffusers "
                          f"{version}: pip install '{DIFFUSERS_REQUIREMENT}'")
