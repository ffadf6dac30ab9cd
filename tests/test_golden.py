"""The golden tiny model: every reference tensor computed by the original CompVis code is reproduced
through the public API (tolerances from tests/data/README.md)."""
import pytest
import torch

from helpers import PROMPTS, golden_model
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.diffusionmodules.util import timestep_embedding

SINGLE_PASS = 1e-5
SAMPLED = 1e-3
DECODED = 1e-4


@pytest.fixture(scope="module")
def model():
    return golden_model()


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_unet_output_and_every_block(model, golden_io):
    unet = model.model.diffusion_model
    outputs = {}
    handles = []
    names = [f"input_blocks.{k}" for k in range(12)] + ["middle_block"] + [f"output_blocks.{j}" for j in range(12)]
    for name in names:
        module = unet.get_submodule(name)
        handles.append(module.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out)))
    with torch.no_grad():
        out = model.apply_model(golden_io["unet.x"], golden_io["unet.t"], golden_io["unet.context"])
    for h in handles:
        h.remove()
    assert max_err(out, golden_io["unet.out"]) < SINGLE_PASS
    for name in names:
        ref = golden_io[f"unet.block.{name}"]
        assert outputs[name].shape == ref.shape, name
        assert max_err(outputs[name], ref) < SINGLE_PASS * max(1.0, ref.abs().max().item()), name


def test_timestep_embedding(model, golden_io):
    unet = model.model.diffusion_model
    t_emb = timestep_embedding(golden_io["unet.t"], 32)
    assert max_err(t_emb, golden_io["unet.t_emb"]) < SINGLE_PASS
    with torch.no_grad():
        assert max_err(unet.embed_time(golden_io["unet.t"]), golden_io["unet.emb"]) < SINGLE_PASS


def test_text_ids_and_encoder(model, golden_io):
    encoder = model.cond_stage_model
    ids = encoder.tokenize(["a photograph of an astronaut riding a horse", ""])
    assert torch.equal(ids, golden_io["text.ids"])
    assert torch.equal(encoder.tokenize(PROMPTS), golden_io["sample.prompt_ids"])
    with torch.no_grad():
        out = model.get_learned_conditioning(["a photograph of an astronaut riding a horse", ""])
        assert max_err(out, golden_io["text.out"]) < SINGLE_PASS
        assert max_err(model.get_learned_conditioning(PROMPTS), golden_io["sample.c"]) < SINGLE_PASS
        assert max_err(model.get_learned_conditioning(["", ""]), golden_io["sample.uc"]) < SINGLE_PASS


def test_vae_encode_decode(model, golden_io):
    with torch.no_grad():
        posterior = model.encode_first_stage(golden_io["vae.image"])
        assert max_err(posterior.mean, golden_io["vae.posterior_mean"]) < SINGLE_PASS
        assert max_err(posterior.logvar, golden_io["vae.posterior_logvar"]) < SINGLE_PASS
        decoded = model.first_stage_model.decode(golden_io["vae.z"])
    # Values reach 5.5: a relative 1e-5 (tests/data/README.md: "rtol 1e-5 on these O(1) values").
    assert max_err(decoded, golden_io["vae.decoded"]) < SINGLE_PASS * golden_io["vae.decoded"].abs().max().item()


@pytest.mark.parametrize("name,sampler_class", [("ddim", DDIMSampler), ("plms", PLMSSampler)])
def test_samplers(model, golden_io, name, sampler_class):
    sampler = sampler_class(model)
    samples, intermediates = sampler.sample(
        S=5, conditioning=golden_io["sample.c"], batch_size=2, shape=[4, 16, 16],
        unconditional_guidance_scale=7.5, unconditional_conditioning=golden_io["sample.uc"], eta=0.0,
        x_T=golden_io["ddim.x_T"], log_every_t=1, verbose=False, disable_progress=True)
    assert sampler.ddim_timesteps[::-1].tolist() == golden_io[f"{name}.timesteps"].tolist()
    assert torch.allclose(torch.tensor(sampler.ddim_alphas), golden_io[f"{name}.ddim_alphas"], rtol=0, atol=1e-12)
    assert torch.allclose(torch.tensor(sampler.ddim_alphas_prev), golden_io[f"{name}.ddim_alphas_prev"],
                          rtol=0, atol=1e-12)
    assert max_err(samples, golden_io[f"{name}.samples"]) < SAMPLED
    assert max_err(torch.stack(intermediates["x_inter"]), golden_io[f"{name}.intermediates"]) < SAMPLED
    assert max_err(torch.stack(intermediates["pred_x0"]), golden_io[f"{name}.pred_x0"]) < SAMPLED


def test_decoded_samples(model, golden_io):
    decoded = model.decode_first_stage(golden_io["plms.samples"])
    assert decoded.shape == golden_io["decoded.samples"].shape
    assert max_err(decoded, golden_io["decoded.samples"]) < DECODED


def test_regenerated_weights_are_the_reference_bits(tmp_path):
    """The weights are rebuilt from their seed (golden_weights.py); one changed bit changes the digest."""
    from safetensors.torch import load_file, save_file

    from conftest import GOLDEN_WEIGHTS
    from golden_weights import REFERENCE_DIGEST, content_digest

    assert content_digest(GOLDEN_WEIGHTS) == REFERENCE_DIGEST
    tensors = load_file(str(GOLDEN_WEIGHTS))
    key = "model.diffusion_model.out.2.bias"
    tensors[key] = tensors[key].clone()
    tensors[key].view(torch.int32)[0] ^= 1
    save_file(tensors, str(tmp_path / "changed.safetensors"))
    assert content_digest(tmp_path / "changed.safetensors") != REFERENCE_DIGEST
