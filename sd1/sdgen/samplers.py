"""The samplers a run can name, and what the rest of sdgen needs to know about each (read from the sampler
classes: their UNet calls in step 0, whether eta applies, how many steps a step count really runs)."""
from dataclasses import dataclass
from typing import Tuple

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from sgm.modules.diffusionmodules.sampling import EulerEDMSampler

from .runtime import UsageError


@dataclass(frozen=True)
class SamplerInfo:
    """A sampler by name: its label, the model family it samples ('ldm': CompVis LatentDiffusion, SD 1.x/2.x;
    'sgm': generative-models DiffusionEngine, SDXL) and its class."""

    name: str
    label: str
    family: str
    sampler_class: type

    @property
    def first_step_calls(self) -> int:
        """UNet calls of step 0 (CompVis PLMS: 2, a pseudo improved-Euler step); every later step makes one."""
        return self.sampler_class.first_step_model_calls

    @property
    def takes_eta(self) -> bool:
        return self.sampler_class.takes_eta

    def steps(self, asked: int) -> int:
        """How many steps the sampler really runs for `asked` (CompVis's uniform schedule adds some when `asked`
        does not divide 1000; EulerEDM runs exactly `asked`)."""
        if self.family == "sgm":
            return asked
        return len(make_ddim_timesteps("uniform", asked, 1000, verbose=False))


SAMPLERS = {info.name: info for info in (
    SamplerInfo("ddim", "DDIM", "ldm", DDIMSampler),
    SamplerInfo("plms", "PLMS", "ldm", PLMSSampler),
    SamplerInfo("euler", "EulerEDM", "sgm", EulerEDMSampler),
)}


def sampler_info(name: str) -> SamplerInfo:
    """The sampler called `name`; UsageError for an unknown one."""
    if name not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def family_samplers(family: str) -> Tuple[str, ...]:
    """Names of the samplers of a model family ('ldm' or 'sgm')."""
    return tuple(name for name, info in SAMPLERS.items() if info.family == family)


def sampler_steps(sampler: str, steps: int) -> int:
    """How many steps `sampler` really runs for `steps` (`SamplerInfo.steps`)."""
    return sampler_info(sampler).steps(steps)


def first_step_calls(sampler: str) -> int:
    """UNet calls of step 0 under `sampler` (`SamplerInfo.first_step_calls`)."""
    return sampler_info(sampler).first_step_calls
