"""A method: one or more components (method kinds) applied together; `AppliedMethod`: a method patched into a
model, a context manager that removes every patch again."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from datosd.state import DatoState
from datosd.strategy import MAX_DEPTH, Strategy, call_kind
from datosd.utils import model_family
from ldm.models.diffusion.hooks import SamplingHook

from ..compiled import EAGER, CompiledUNet, Execution
from ..samplers import first_step_calls
from .kind import MethodError, MethodKind, Patch

CALL_KINDS = ("full", "partial", "reused")


@dataclass(frozen=True, eq=False)
class Method:
    """An acceleration setting: its components in name order (a `Registry` builds and checks them). It is a
    value: `apply(model, steps, seed)` patches a model and returns an `AppliedMethod`."""

    components: Tuple[MethodKind, ...]

    @property
    def name(self) -> str:
        """The canonical registry name (parse_method(name) gives this method back)."""
        return "+".join(c.name for c in self.components)

    @property
    def label(self) -> str:
        """Readable description, e.g. 'DeepCache N=3 depth 1 + ToMeSD r=0.5'."""
        return " + ".join(c.label for c in self.components)

    @property
    def is_original(self) -> bool:
        return self.name == "original"

    def component(self, key: str) -> Optional[MethodKind]:
        """The component of kind `key` ('dato', 'tome', ...), or None."""
        return next((c for c in self.components if c.key == key), None)

    @property
    def forced_steps(self) -> Optional[int]:
        """The step count the method fixes (ddim<N>), or None."""
        return next((c.forced_steps() for c in self.components if c.forced_steps() is not None), None)

    def run_sampler(self, sampler: str) -> str:
        """The sampler a run of this method uses when the caller asks for `sampler`."""
        return next((c.forced_sampler() for c in self.components if c.forced_sampler() is not None), sampler)

    def run_steps(self, steps: int) -> int:
        """The step count a run of this method uses when the caller asks for `steps`."""
        forced = self.forced_steps
        return steps if forced is None else forced

    def patch_strategy(self, steps: int) -> Optional[Strategy]:
        """The caching/pruning strategy for a run of `steps` sampler steps (None: nothing caches)."""
        return next((s for s in (c.strategy(steps) for c in self.components) if s is not None), None)

    def for_last_steps(self, steps: int) -> "Method":
        """The method for a run of a schedule's last `steps` steps (img2img): a DaTo strategy named by no flag
        becomes its last `steps` steps (`MethodKind.for_last_steps`)."""
        return Method(tuple(c.for_last_steps(steps) for c in self.components))

    def check_steps(self, steps: int) -> None:
        """Raise StrategyError / MethodError, saying what to do, when a run of `steps` sampler steps cannot use
        a component (a DaTo strategy of another length, a T-GATE gate past the last step)."""
        for component in self.components:
            component.check_steps(steps)

    def call_plan(self, steps: int, sampler: str, n_blocks: int = MAX_DEPTH) -> List[Tuple[int, float]]:
        """(cache depth, prune ratio) of every UNet call of one run of `steps` steps under `sampler` (PLMS: step
        0 twice) on a UNet of `n_blocks` input blocks (full calls at MAX_DEPTH)."""
        steps, sampler = self.run_steps(steps), self.run_sampler(sampler)
        strategy = self.patch_strategy(steps) or Strategy.full(steps)
        return strategy.call_plan(first_step_calls(sampler), n_blocks)

    def call_counts(self, steps: int, sampler: str, n_blocks: int = MAX_DEPTH) -> Dict[str, int]:
        """UNet calls of one run by kind: {'full': ..., 'partial': ..., 'reused': ...}."""
        return count_calls(depth for depth, _ in self.call_plan(steps, sampler, n_blocks))

    # --- what the cost model knows of it ---------------------------------------------------------------------
    @property
    def cost_components(self) -> Tuple[MethodKind, ...]:
        """The components a cost table of this method's calls is measured with (they change a call's cost
        beyond its cache depth and prune ratio: ToMeSD)."""
        return tuple(c for c in self.components if c.changes_call_cost)

    @property
    def cost_group(self) -> Optional[str]:
        """Which cost table its calls are looked up in: the names of `cost_components` (None: the plain one)."""
        return "+".join(c.name for c in self.cost_components) or None

    @property
    def predicted(self) -> bool:
        """Whether the per-call cost table predicts its runs (not for methods that change calls it does not time)."""
        return all(c.predicted for c in self.components)

    def notes(self) -> List[str]:
        return [note for c in self.components for note in c.notes()]

    # --- the model -------------------------------------------------------------------------------------------
    def apply(self, model: torch.nn.Module, steps: int, seed: int = 0, execution: Execution = EAGER) -> "AppliedMethod":
        """Patch `model` for runs of `steps` sampler steps; every random draw of a run comes from `seed`.
        `execution`: eager, or compiled (and / or channels-last) UNet calls (sdgen.compiled)."""
        return AppliedMethod(self, model, steps, seed, execution)


def count_calls(depths) -> Dict[str, int]:
    """{'full': ..., 'partial': ..., 'reused': ...} of UNet calls at these cache depths (full: MAX_DEPTH)."""
    kinds = [call_kind(depth) for depth in depths]
    return {kind: kinds.count(kind) for kind in CALL_KINDS}


class AppliedMethod(SamplingHook):
    """A method patched into one model. Use as a context manager, or call `remove()`.

    It re-seeds every random draw of the method at the start of each sampling run (DaTo's base tokens and
    score noise, tomesd's random partition), so one seed gives the same images run after run.
    """

    def __init__(self, method: Method, model: torch.nn.Module, steps: int, seed: int = 0,
                 execution: Execution = EAGER):
        self.method = method
        self.model = model
        self.seed = seed
        family = model_family(model)
        for component in method.components:
            if family not in component.families:
                raise MethodError(f"{component.name} does not apply to {family} models (it applies to "
                                  f"{', '.join(sorted(component.families))})")
        method.check_steps(steps)
        self.patches: List[Patch] = []
        try:
            for component in method.components:
                patch = component.apply(model, steps, seed)
                if patch is not None:
                    self.patches.append(patch)
            self.dato_state: Optional[DatoState] = next(
                (p.dato_state for p in self.patches if p.dato_state is not None), None)
            fullgraph = self.dato_state is not None and all(c.compile_fullgraph for c in method.components)
            self.compiled = CompiledUNet(model, execution, self.dato_state, fullgraph=fullgraph)
        except BaseException:
            self._remove_patches()
            raise
        self.hooks = getattr(model, "sampling_hooks", None)
        if self.hooks is not None:
            self.hooks.add(self)

    def reseed(self, seed: int) -> None:
        """Draw the following runs' random choices from `seed`."""
        self.seed = seed
        for patch in self.patches:
            patch.reseed(seed)

    def sampling_started(self, num_steps: int) -> None:
        for patch in self.patches:
            patch.sampling_started(num_steps)

    def call_counts(self) -> Optional[Dict[str, int]]:
        """UNet calls of the last run by kind, as the patch recorded them (None when nothing caches)."""
        if self.dato_state is None:
            return None
        return count_calls(call.depth for call in self.dato_state.calls)

    def _remove_patches(self) -> None:
        while self.patches:
            self.patches.pop().remove()

    def remove(self) -> None:
        if self.hooks is not None and self in self.hooks:
            self.hooks.remove(self)
        self.compiled.remove()
        self._remove_patches()
        self.dato_state = None

    def __enter__(self) -> "AppliedMethod":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
