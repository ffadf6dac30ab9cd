"""Builders shared by the tests (tiny models from the golden config)."""
from omegaconf import OmegaConf

from conftest import GOLDEN_CONFIG, GOLDEN_WEIGHTS
from ldm.util import instantiate_from_config, load_model_from_config

PROMPTS = ["a photograph of an astronaut riding a horse", "a painting of a fox sitting in a field at sunrise"]


def golden_model():
    """The golden tiny LatentDiffusion with its reference weights, in eval mode."""
    return load_model_from_config(OmegaConf.load(str(GOLDEN_CONFIG)), str(GOLDEN_WEIGHTS))


def tiny_unet_config(**overrides):
    """The golden UNet config with some parameters changed."""
    config = OmegaConf.load(str(GOLDEN_CONFIG)).model.params.unet_config
    for key, value in overrides.items():
        config.params[key] = value
    return config


def build(config):
    return instantiate_from_config(config)
