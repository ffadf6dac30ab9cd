"""The settings of sampling runs as one type: `RunSettings` (sampler, steps, guidance scale, eta, precision,
image size, batch, seeds, device; for img2img the strength), resolved once for a method (`for_method`) and
checked in one place (`problems`, before any model is built: values, sizes the UNet can halve, the seed range,
the memory a run needs on its device, `sdgen.memory`); every front end and job carries one. Precision has one
vocabulary: 'full' (float32) or 'autocast' (float16 on CUDA, bfloat16 on CPU).
"""
import math
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

from .generate import ModelGeometry, SizeConditioning, check_sampler, img2img_steps, latent_shape
from .memory import estimate_run_memory, free_memory, size_text
from .methods import Method, MethodError
from .runtime import UsageError
from .samplers import sampler_info

PRECISIONS = ("full", "autocast")
MAX_STEPS = 1000  # the DDPM training timesteps
MAX_SEED = 2 ** 64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1 (negative ones alias to 2**64 + s)


@dataclass(frozen=True)
class SettingFlags:
    """How a front end names each setting in its messages (its flags, or its environment variables)."""

    sampler: str = "--sampler"
    steps: str = "--steps"
    scale: str = "--scale"
    eta: str = "--eta"
    precision: str = "--precision"
    size: str = "--H and --W"
    batch: str = "--batch"
    seed: str = "--seed"
    strength: str = "--strength"


@dataclass(frozen=True)
class RunSettings:
    """What every sampling run of a job shares.

    sampler: 'ddim', 'plms' (SD 1.x / 2.x) or 'euler' (SDXL); steps: the step count given to the sampler (a
    method's own replaces the asked one: `asked_steps`); height, width: the image size (None: an img2img init
    image decides it); batch: images per sampler call; seed: the run's seed, of which it uses seed_count
    consecutive ones (image or batch k: seed + k); strength: img2img's share of the schedule (None: text to
    image); geometry: the model's (`generate.model_geometry`); device: where the model runs ('cpu', 'cuda',
    'cuda:1'; its free memory is checked, None: not checked).
    """

    sampler: str = "plms"
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    precision: str = "autocast"
    height: Optional[int] = None
    width: Optional[int] = None
    batch: int = 1
    seed: int = 0
    strength: Optional[float] = None
    geometry: ModelGeometry = ModelGeometry()
    asked_steps: Optional[int] = None
    asked_sampler: Optional[str] = None
    seed_count: int = 1
    device: Optional[str] = None

    @classmethod
    def resolve(cls, method: Optional[Method] = None, flags: SettingFlags = SettingFlags(),
                **values) -> "RunSettings":
        """The checked settings of `values`, and with a method, for that method (`for_method`). Raises
        UsageError / MethodError / StrategyError, naming the settings as `flags` does."""
        run = cls(**values)
        run.validate(flags)
        return run if method is None else run.for_method(method, flags)

    # --- checks: the one place ---------------------------------------------------------------------------------
    def validate(self, flags: SettingFlags = SettingFlags()) -> None:
        """Raise UsageError for the first setting that cannot be used (one line, saying what to do)."""
        for problem in self.problems(flags):
            raise UsageError(problem)

    def problems(self, flags: SettingFlags = SettingFlags()) -> List[str]:
        """Every setting that cannot be used, one line each."""
        problems = []
        if self.steps < 1:
            problems.append(f"{flags.steps} must be at least 1, got {self.steps}")
        elif self.steps > MAX_STEPS:
            problems.append(f"{flags.steps} must be at most {MAX_STEPS} (the number of training timesteps)")
        if not math.isfinite(self.scale):
            problems.append(f"{flags.scale} must be a finite number, got {self.scale}")
        if not math.isfinite(self.eta) or self.eta < 0:
            problems.append(f"{flags.eta} must be a finite number >= 0, got {self.eta}")
        if self.precision not in PRECISIONS:
            problems.append(f"{flags.precision} must be 'full' or 'autocast', got {self.precision!r}")
        if self.batch < 1:
            problems.append(f"{flags.batch} must be at least 1, got {self.batch}")
        highest = MAX_SEED - (self.seed_count - 1)
        if not 0 <= self.seed <= highest:
            uses = f" (this run uses seeds {flags.seed} to {flags.seed} + {self.seed_count - 1})" \
                if self.seed_count > 1 else ""
            problems.append(f"{flags.seed} must be in 0..{highest}{uses}: torch's generators take seeds up to "
                            f"2**64 - 1, got {self.seed}")
        try:
            check_sampler(self.geometry, self.sampler)
            info = sampler_info(self.sampler)
            if self.eta != 0 and not info.takes_eta:
                problems.append(f"{info.label} sampling is deterministic: {flags.eta} must be 0 with "
                                f"{flags.sampler}")
            if self.height is not None or self.width is not None:
                latent_shape(self.geometry, self.height or 0, self.width or 0, flags.size)
            if self.strength is not None:
                if self.sampler != "ddim":
                    problems.append(f"img2img samples with DDIM, not {self.sampler}")
                img2img_steps(self.strength, self.steps, flags.strength, flags.steps)
        except UsageError as err:
            problems.append(str(err))
        if not problems:
            problems += self.memory_problems(flags)
        return problems

    def memory_problems(self, flags: SettingFlags = SettingFlags()) -> List[str]:
        """The run's size, when it needs more memory than `device` has free (`sdgen.memory`: a lower bound from
        the geometry; nothing is allocated). Empty without a device or an image size."""
        if self.device is None or self.height is None or self.width is None:
            return []
        need = estimate_run_memory(self.geometry, self.height, self.width, self.batch, self.scale != 1.0,
                                   self.precision)
        free, where = free_memory(self.device)
        if need.total <= free:
            return []
        guidance = " (UNet rows doubled for guidance)" if self.scale != 1.0 else ""
        return [f"a run at {self.height}x{self.width} with {flags.batch} {self.batch}{guidance} needs at least "
                f"{size_text(need.total)} ({need.describe()}), more than the {size_text(free)} {where}; lower "
                f"{flags.size} or {flags.batch}"]

    def for_method(self, method: Method, flags: SettingFlags = SettingFlags()) -> "RunSettings":
        """These settings for a run of `method`: its own sampler and step count (ddim<N>), checked against the
        model, and the method checked against the run (a DaTo strategy's length, a T-GATE gate step)."""
        if self.strength is not None and method.forced_steps is not None:
            raise MethodError(f"img2img samples with DDIM over --strength x {flags.steps} steps; {method.name} sets "
                              f"its own sampler and steps")
        run = replace(self, sampler=method.run_sampler(self.sampler), steps=method.run_steps(self.steps),
                      asked_steps=self.steps, asked_sampler=self.sampler)
        check_sampler(run.geometry, run.sampler)
        method.check_steps(run.sampler_steps)
        return run

    def method_note(self, method: Method, flags: SettingFlags = SettingFlags()) -> Optional[str]:
        """One line when `method` (these settings are `for_method` of it) runs its own sampler or step count
        instead of the asked ones (ddim10 with --ddim_steps 5 runs 10 steps), else None."""
        changed = []
        if self.asked_sampler is not None and self.asked_sampler != self.sampler:
            changed.append(f"the {self.sampler} sampler, not {self.asked_sampler} ({flags.sampler})")
        if self.asked_steps is not None and self.asked_steps != self.steps:
            changed.append(f"{self.steps} steps, not {flags.steps} {self.asked_steps}")
        if not changed:
            return None
        return f"{method.name} sets its own sampling: it runs {' and '.join(changed)}"

    # --- what follows from them --------------------------------------------------------------------------------
    @property
    def schedule_steps(self) -> int:
        """The steps of the sampler's schedule for `steps` (CompVis adds some when `steps` does not divide 1000)."""
        return sampler_info(self.sampler).steps(self.steps)

    @property
    def sampler_steps(self) -> int:
        """The steps a run really runs: the schedule's, or img2img's last int(strength * steps) of them."""
        if self.strength is None:
            return self.schedule_steps
        return min(img2img_steps(self.strength, self.steps), self.schedule_steps)

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        """(C, H/f, W/f) of the image size."""
        return latent_shape(self.geometry, self.height, self.width)

    @property
    def size(self) -> SizeConditioning:
        return SizeConditioning(self.height, self.width)

    def call_plan(self, method: Method) -> List[Tuple[int, float]]:
        """(cache depth, prune ratio) of every UNet call of one run of `method` on this model."""
        return method.call_plan(self.sampler_steps, self.sampler, self.geometry.blocks)
