"""The paper's baselines as method kinds: the original model, DDIM with fewer steps, ToMeSD (the real tomesd
package) and DeepCache's own helper (the DeepCache package, diffusers pipelines)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from datosd.strategy import Strategy
from datosd.utils import any_unet, attention_downsample

from ..runtime import UsageError
from .kind import ALL_FAMILIES, Flag, MethodError, MethodKind, MissingPackageError, Patch


@dataclass(frozen=True)
class Original(MethodKind):
    """The unaccelerated model."""

    key = "original"
    grammar = "original"
    about = "the unaccelerated model"
    order = 0
    families = ALL_FAMILIES
    conflicts = {"*": "'original' does not combine with other methods"}
    pattern = re.compile("original")

    @classmethod
    def from_match(cls, match: re.Match, token: str) -> "Original":
        return cls()

    @property
    def name(self) -> str:
        return "original"

    @property
    def label(self) -> str:
        return "original (no acceleration)"


@dataclass(frozen=True)
class Ddim(MethodKind):
    """DDIM with its own step count (the paper's few-step baseline)."""

    steps: int

    key = "ddim"
    grammar = "ddim<N>"
    about = "DDIM with N steps (the paper's few-step baseline), e.g. ddim10"
    order = 10
    families = frozenset({"ldm"})
    pattern = re.compile(r"ddim(\d+)")

    @classmethod
    def from_match(cls, match: re.Match, token: str) -> "Ddim":
        steps = int(match.group(1))
        if not 1 <= steps <= 1000:
            raise MethodError(f"{token}: the step count must be 1..1000")
        return cls(steps)

    @property
    def name(self) -> str:
        return f"ddim{self.steps}"

    @property
    def label(self) -> str:
        return f"DDIM {self.steps} steps"

    def forced_sampler(self) -> Optional[str]:
        return "ddim"

    def forced_steps(self) -> Optional[int]:
        return self.steps


def import_tomesd():
    try:
        import tomesd
    except ImportError:
        raise MissingPackageError("ToMeSD needs the tomesd package: pip install tomesd") from None
    return tomesd


class TomePatch(Patch):
    """tomesd on a model; its random partition is drawn from a generator seeded with the run's seed."""

    def __init__(self, model: torch.nn.Module, ratio: float, seed: int):
        self.tomesd = import_tomesd()
        self.model = model
        # tomesd merges in blocks down to max_downsample: reach the first level with attention (SDXL: 2).
        self.tomesd.apply_patch(model, ratio=ratio, max_downsample=attention_downsample(model))
        self.unet = any_unet(model)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.sampling_started(0)

    def sampling_started(self, num_steps: int) -> None:
        device = next(self.unet.parameters()).device
        self.unet._tome_info["args"]["generator"] = torch.Generator(device=device).manual_seed(self.seed)

    def remove(self) -> None:
        self.tomesd.remove_patch(self.model)


@dataclass(frozen=True)
class Tome(MethodKind):
    """ToMeSD token merging at a merge ratio, through the real tomesd package."""

    ratio: float

    key = "tome"
    grammar = "tome-<r>"
    about = "ToMeSD at merge ratio r, through the real tomesd package"
    order = 40
    families = ALL_FAMILIES
    title = "ToMeSD"
    flags = (Flag("--tome", dict(action="store_true", help="ToMeSD token merging (tomesd package)")),
             Flag("--tome_ratio", dict(type=float, default=0.5, help="ToMeSD merge ratio in [0, 1)")))
    switch = "tome"
    changes_call_cost = True
    cost_key = {"tome_ratio": None}
    compile_fullgraph = False  # tomesd draws its partition inside the forward
    pattern = re.compile(r"tome-(\d*\.?\d+)")

    @classmethod
    def from_match(cls, match: re.Match, token: str) -> "Tome":
        ratio = float(match.group(1))
        if not 0.0 <= ratio < 1.0:
            raise MethodError(f"{token}: the ToMeSD ratio must be in [0, 1)")
        return cls(ratio)

    @classmethod
    def from_flags(cls, values: Dict[str, Any]) -> "Tome":
        ratio = values["tome_ratio"]
        if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
            raise UsageError(f"--tome_ratio must be in [0, 1), got {ratio}")
        return cls(ratio)

    @property
    def name(self) -> str:
        return f"tome-{self.ratio:g}"

    @property
    def label(self) -> str:
        return f"ToMeSD r={self.ratio:g}"

    def cost_values(self) -> Dict[str, Any]:
        return {"tome_ratio": self.ratio}

    def apply(self, model: torch.nn.Module, steps: int, seed: int) -> Patch:
        return TomePatch(model, self.ratio, seed)


class HelperPatch(Patch):
    def __init__(self, helper):
        self.helper = helper

    def remove(self) -> None:
        self.helper.disable()


@dataclass(frozen=True)
class DeepCacheHelper(MethodKind):
    """DeepCache's own `DeepCacheSDHelper` on a diffusers pipeline (the DeepCache package): every `interval`-th
    step full, the others from the cached features below up-block branch `branch`."""

    interval: int
    branch: int = 0

    key = "deepcache-helper"
    grammar = "deepcache-helper-n<N>[-b<branch>]"
    about = ("DeepCache's own DeepCacheSDHelper on a diffusers pipeline (DeepCache package): cache_interval N, "
             "cache_branch_id b (0)")
    order = 20
    families = frozenset({"diffusers"})
    conflicts = {"*": "DeepCache's own helper wraps the forwards of the UNet and its blocks; time it alone"}
    predicted = False
    pattern = re.compile(r"deepcache-helper-n(\d+)(?:-b(\d+))?")

    @classmethod
    def from_match(cls, match: re.Match, token: str) -> "DeepCacheHelper":
        interval, branch = int(match.group(1)), int(match.group(2) or 0)
        if interval < 1:
            raise MethodError(f"{token}: DeepCache's cache interval must be at least 1")
        return cls(interval, branch)

    @property
    def name(self) -> str:
        return f"deepcache-helper-n{self.interval}" + (f"-b{self.branch}" if self.branch else "")

    @property
    def label(self) -> str:
        return f"DeepCacheSDHelper cache_interval={self.interval}, cache_branch_id={self.branch}"

    def strategy(self, steps: int) -> Strategy:
        """The helper's schedule as a uniform DeepCache strategy (spec 2), for a scheduler of one UNet call a step:
        a step whose index is a multiple of the interval is full, every other step runs branch b = 3 i + l (down
        block i, layer l; a level has 2 layers and its downsampler) and above, which are CompVis input_blocks[0..b]
        and their output blocks: cache depth b + 1 (branch 0: conv_in and the last up layer, depth 1)."""
        return Strategy.uniform(steps, self.interval, self.branch + 1, name=self.name)

    def apply(self, model: torch.nn.Module, steps: int, seed: int) -> Patch:
        try:
            from DeepCache import DeepCacheSDHelper
        except ImportError as err:
            raise MissingPackageError(f"DeepCache's helper needs the DeepCache package ({err}): "
                                      f"pip install DeepCache") from None
        helper = DeepCacheSDHelper(pipe=model)
        helper.set_params(cache_interval=self.interval, cache_branch_id=self.branch)
        helper.enable()
        return HelperPatch(helper)
