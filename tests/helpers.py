"""Builders shared by the tests (tiny models from the golden config)."""
from omegaconf import OmegaConf

from conftest import GOLDEN_CONFIG, GOLDEN_WEIGHTS
from ldm.models.diffusion.hooks import SamplingHook
from ldm.util import instantiate_from_config, load_model_from_config

# --demo with the tiny SD 1.x config: that model with seeded random weights (plain --demo is the shapes model)
TINY_DEMO = ["--demo", "--config", "configs/stable-diffusion/tiny-demo.yaml"]
PROMPTS = ["a photograph of an astronaut riding a horse", "a painting of a fox sitting in a field at sunrise"]


def golden_model():
    """The golden tiny LatentDiffusion with its reference weights, in eval mode."""
    return load_model_from_config(OmegaConf.load(str(GOLDEN_CONFIG)), str(GOLDEN_WEIGHTS))


def tgate_gated_halves(unet, x, t, cond):
    """A UNet under "cfg_mean" T-GATE with gate step 1, driven by hand: step 0 on the CFG batch fills the caches,
    then at gated step 1 (the CFG batch, x and t with equal halves; cond: its conditioning keywords, halves
    [uncond; cond]) -> (the CFG batch's output (2B, ...), the conditional half's output run alone (B, ...))."""
    import torch

    from datosd import apply_tgate, remove_tgate

    state = apply_tgate(unet, gate_step=1)
    half = x.shape[0] // 2
    try:
        with torch.no_grad():
            state.sampling_started(2)
            state.step_started(0)
            state.model_call(True)
            unet(x, t, **cond)
            state.step_started(1)
            state.model_call(True)
            batch = unet(x, t, **cond)
            assert state.run.halved == 1
            state.model_call(False)
            conditional = unet(x[half:], t[half:], **{k: v[half:] for k, v in cond.items()})
            state.sampling_finished()
    finally:
        remove_tgate(unet)
    return batch, conditional


def tiny_unet_config(**overrides):
    """The golden UNet config with some parameters changed."""
    config = OmegaConf.load(str(GOLDEN_CONFIG)).model.params.unet_config
    for key, value in overrides.items():
        config.params[key] = value
    return config


def build(config):
    return instantiate_from_config(config)


def golden_sdxl_model(weights):
    """The golden tiny SDXL DiffusionEngine with its reference weights, loaded as a user would."""
    from conftest import SDXL_CONFIG

    return load_model_from_config(OmegaConf.load(str(SDXL_CONFIG)), str(weights))


def sdxl_batch(io, prompts=PROMPTS):
    """The golden SDXL conditioner batch: the two prompts and the stored size conditioning."""
    return {"txt": list(prompts), "original_size_as_tuple": io["batch.original_size_as_tuple"],
            "crop_coords_top_left": io["batch.crop_coords_top_left"],
            "target_size_as_tuple": io["batch.target_size_as_tuple"]}


class CountingBackend:
    """A torch.compile backend that runs the captured graph as it is and counts the graphs it was given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def graph_breaks():
    """Graph breaks Dynamo counted since its counters were last cleared."""
    import torch

    return sum(torch._dynamo.utils.counters["graph_break"].values())


class EventRecorder(SamplingHook):
    """Records every sampling-hook event: ('started', num_steps), ('step', i), ('call', cfg_halves), ('finished',)."""

    def __init__(self):
        self.events = []

    def sampling_started(self, num_steps):
        self.events.append(("started", num_steps))

    def step_started(self, step):
        self.events.append(("step", step))

    def model_call(self, cfg_halves):
        self.events.append(("call", cfg_halves))

    def sampling_finished(self):
        self.events.append(("finished",))

    def steps(self):
        return [e[1] for e in self.events if e[0] == "step"]
