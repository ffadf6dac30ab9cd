"""SDXL (sgm, generative-models code paths): the golden tiny model reproduced through the reference calls of
tests/data/README.md, the full-size key layout, checkpoint loading and the sampler's hooks."""
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from conftest import DATA_DIR, REPO_ROOT, SDXL_CONFIG
from helpers import PROMPTS, EventRecorder, golden_sdxl_model, sdxl_batch
from ldm.checkpoint import CheckpointError, fit_state_dict, read_checkpoint
from ldm.models.diffusion.hooks import SamplingHooks
from ldm.util import instantiate_from_config, load_model_from_config
from sgm.modules.diffusionmodules.sampling import EulerEDMSampler

SINGLE_PASS = 1e-5
SAMPLED = 1e-3
XL_CONFIG = REPO_ROOT / "configs" / "stable-diffusion" / "sd_xl_base.yaml"
V1_CONFIG = REPO_ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
CLIP = "conditioner.embedders.0.transformer."
POSITION_IDS = CLIP + "text_model.embeddings.position_ids"
SIGMAS = "denoiser.sigmas"
BLOCKS = [f"input_blocks.{k}" for k in range(9)] + ["middle_block"] + [f"output_blocks.{j}" for j in range(9)]
DISCRETIZATION = {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}
CFG = {"target": "sgm.modules.diffusionmodules.guiders.VanillaCFG", "params": {"scale": 7.0}}


@pytest.fixture(scope="module")
def model(sdxl_weights):
    return golden_sdxl_model(sdxl_weights)


@pytest.fixture(scope="module")
def conditioning(model, sdxl_io):
    batch = sdxl_batch(sdxl_io)
    batch_uc = dict(batch, txt=["", ""])
    return model.conditioner.get_unconditional_conditioning(batch, batch_uc, force_uc_zero_embeddings=["txt"])


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def denoiser_fn(model):
    return lambda x, sigma, c: model.denoiser(model.model, x, sigma, c)


# ---------------------------------------------------------------- golden tiny SDXL


def test_regenerated_weights_are_the_reference_file(sdxl_weights):
    from golden_sdxl_weights import REFERENCE_SHA256, file_sha256

    assert file_sha256(sdxl_weights) == REFERENCE_SHA256
    assert len(load_file(str(sdxl_weights))) == 965


def test_token_ids_of_both_towers(model, sdxl_io):
    clip, openclip = model.conditioner.embedders[0], model.conditioner.embedders[1]
    assert torch.equal(clip.tokenize(PROMPTS), sdxl_io["cond.ids0"])
    assert torch.equal(openclip.tokenize(PROMPTS), sdxl_io["cond.ids1"])
    assert clip.tokenize(PROMPTS)[0, -1] == 49407 and openclip.tokenize(PROMPTS)[0, -1] == 0


def test_conditioning_c_uc_and_the_empty_prompt(model, conditioning, sdxl_io):
    c, uc = conditioning
    assert set(c) == set(uc) == {"crossattn", "vector"}
    for key in ("crossattn", "vector"):
        assert c[key].shape == sdxl_io[f"cond.{key}"].shape
        assert max_err(c[key], sdxl_io[f"cond.{key}"]) < SINGLE_PASS
        assert max_err(uc[key], sdxl_io[f"uncond.{key}"]) < SINGLE_PASS
    assert torch.count_nonzero(uc["crossattn"]) == 0 and torch.count_nonzero(uc["vector"][:, :16]) == 0
    assert torch.equal(uc["vector"][:, 16:], c["vector"][:, 16:])  # the size embeddings stay
    with torch.no_grad():
        empty = model.conditioner(dict(sdxl_batch(sdxl_io), txt=["", ""]))
    for key in ("crossattn", "vector"):
        assert max_err(empty[key], sdxl_io[f"empty.{key}"]) < SINGLE_PASS


def test_size_embedding_is_the_sinusoid_of_each_number(model, sdxl_io):
    """ConcatTimestepEmbedderND against an independent computation: [cos, sin] of n * 10000^(-k/4), k < 4."""
    numbers = sdxl_io["batch.original_size_as_tuple"]
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    args = numbers[..., None].float() * freqs
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).reshape(2, 16)
    assert max_err(model.conditioner.embedders[2](numbers), expected) < 1e-6


def test_unet_output_and_every_block(model, sdxl_io):
    unet = model.model.diffusion_model
    outputs, handles = {}, []
    for name in BLOCKS:
        handles.append(unet.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: outputs.__setitem__(name, out)))
    try:
        with torch.no_grad():
            out = unet(sdxl_io["unet.x"], sdxl_io["unet.t"], context=sdxl_io["cond.crossattn"],
                       y=sdxl_io["cond.vector"])
    finally:
        for h in handles:
            h.remove()
    assert max_err(out, sdxl_io["unet.out"]) < SINGLE_PASS
    for name in BLOCKS:
        ref = sdxl_io[f"unet.block.{name}"]
        assert outputs[name].shape == ref.shape, name
        assert max_err(outputs[name], ref) < SINGLE_PASS * max(1.0, ref.abs().max().item()), name


@pytest.mark.parametrize("steps", [4, 7])
def test_euler_edm_samples_sigmas_timesteps_and_hooks(model, conditioning, sdxl_io, steps):
    c, uc = conditioning
    unet = model.model.diffusion_model
    timesteps = []
    handle = unet.register_forward_pre_hook(lambda m, a, kw: timesteps.append(kw["timesteps"]), with_kwargs=True)
    hooks, recorder = SamplingHooks(), EventRecorder()
    hooks.add(recorder)
    sampler = EulerEDMSampler(num_steps=steps, discretization_config=DISCRETIZATION, guider_config=CFG,
                              device="cpu")
    randn = sdxl_io[f"euler{steps}.randn"]
    try:
        with torch.no_grad():
            samples = sampler(denoiser_fn(model), randn.clone(), cond=c, uc=uc, sampling_hooks=hooks)
    finally:
        handle.remove()
    assert torch.equal(sampler.discretization(steps, device="cpu"), sdxl_io[f"euler{steps}.sigmas"])
    assert max_err(samples, sdxl_io[f"euler{steps}.samples"]) < SAMPLED
    assert [t.tolist() for t in timesteps] == [[t] * 4 for t in sdxl_io[f"euler{steps}.unet_timesteps"].tolist()]
    expected = [("started", steps)]
    for i in range(steps):
        expected += [("step", i), ("call", True)]
    assert recorder.events == expected + [("finished",)]


def test_sampler_without_guidance_reports_single_halves(model, conditioning, sdxl_io):
    c, _ = conditioning
    hooks, recorder = SamplingHooks(), EventRecorder()
    hooks.add(recorder)
    sampler = EulerEDMSampler(num_steps=2, discretization_config=DISCRETIZATION, device="cpu")
    with torch.no_grad():
        out = sampler(denoiser_fn(model), sdxl_io["euler4.randn"], cond=c, sampling_hooks=hooks)
    assert out.shape == sdxl_io["euler4.randn"].shape
    assert recorder.events == [("started", 2), ("step", 0), ("call", False), ("step", 1), ("call", False),
                               ("finished",)]


def test_decode_first_stage_divides_by_the_sdxl_scale(model, golden_io):
    """The first stage is golden-tiny's VAE: decode_first_stage(scale * z) is that golden decode of z."""
    assert model.scale_factor == 0.13025
    decoded = model.decode_first_stage(golden_io["vae.z"] * model.scale_factor)
    assert max_err(decoded, golden_io["vae.decoded"]) < SINGLE_PASS * golden_io["vae.decoded"].abs().max().item()


def test_encode_first_stage_samples_the_posterior_and_scales(model, golden_io):
    """sgm's encode returns a posterior sample: scale * (mean + std * eps), eps from the global RNG."""
    torch.manual_seed(3)
    z = model.encode_first_stage(golden_io["vae.image"])
    torch.manual_seed(3)
    eps = torch.randn(golden_io["vae.posterior_mean"].shape)
    std = torch.exp(0.5 * golden_io["vae.posterior_logvar"])
    expected = model.scale_factor * (golden_io["vae.posterior_mean"] + std * eps)
    assert max_err(z, expected) < SINGLE_PASS


# ---------------------------------------------------------------- full-size layout and checkpoints


def read_manifest(name):
    rows = {}
    for line in (DATA_DIR / name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows[key] = (eval(shape), dtype)
    return rows


def checkpoint_naming(key):
    """Our key -> the naming of real SDXL files (the CLIP text model under `text_model.`, transformers 4)."""
    if key.startswith(CLIP) and not key.startswith(CLIP + "text_model."):
        return CLIP + "text_model." + key[len(CLIP):]
    return key


@pytest.fixture(scope="module")
def xl_meta():
    with torch.device("meta"):
        return instantiate_from_config(OmegaConf.load(str(XL_CONFIG)).model)


def test_full_sdxl_config_has_the_manifest_keys_and_shapes(xl_meta):
    manifest = read_manifest("sd-xl-state-dict.tsv")
    ours = {checkpoint_naming(k): (list(v.shape), str(v.dtype).replace("torch.", ""))
            for k, v in xl_meta.state_dict().items()}
    assert ours == {k: v for k, v in manifest.items() if k != POSITION_IDS}
    unet = xl_meta.model.diffusion_model
    assert (len(unet.input_blocks), len(unet.output_blocks)) == (9, 9)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684


def manifest_state_dict(name, drop=()):
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    return {k: torch.empty(shape, dtype=dtypes[dtype], device="meta")
            for k, (shape, dtype) in read_manifest(name).items() if k not in drop}


@pytest.mark.parametrize("drop", [(), (SIGMAS,), (POSITION_IDS,), (SIGMAS, POSITION_IDS)])
def test_full_size_checkpoint_fits_with_or_without_optional_keys(xl_meta, drop):
    fitted, notes = fit_state_dict(xl_meta, manifest_state_dict("sd-xl-state-dict.tsv", drop))
    expected = set(xl_meta.state_dict()) - ({SIGMAS} if SIGMAS in drop else set())
    assert set(fitted) == expected
    assert notes == []


def test_sd1_checkpoint_with_the_sdxl_config_names_the_mismatch(xl_meta):
    with pytest.raises(CheckpointError) as err:
        fit_state_dict(xl_meta, manifest_state_dict("sd-v1-state-dict.tsv"), path="v1-5.ckpt")
    message = str(err.value)
    assert ("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight: checkpoint [640, 768] vs config [640, 2048]"
            in message)
    assert "label_emb.0.0.weight" in message  # named among the missing tensors
    assert "v1-inference.yaml" in message


def test_sdxl_checkpoint_with_the_sd1_config_points_to_the_sdxl_config():
    with torch.device("meta"):
        v1 = instantiate_from_config(OmegaConf.load(str(V1_CONFIG)).model)
    with pytest.raises(CheckpointError, match="sd_xl_base.yaml"):
        fit_state_dict(v1, manifest_state_dict("sd-xl-state-dict.tsv"), path="sd_xl_base_1.0.safetensors")


@pytest.fixture(scope="module")
def tiny_sd(sdxl_weights):
    return read_checkpoint(sdxl_weights)


@pytest.mark.parametrize("with_sigmas", [False, True])
@pytest.mark.parametrize("with_position_ids", [False, True])
def test_tiny_checkpoint_variants_load(tmp_path, tiny_sd, model, with_sigmas, with_position_ids):
    sd = {k: v for k, v in tiny_sd.items() if with_sigmas or k != SIGMAS}
    if with_position_ids:
        sd[POSITION_IDS] = torch.arange(77)[None]
    path = tmp_path / "tiny.safetensors"
    save_file(sd, str(path))
    loaded = load_model_from_config(OmegaConf.load(str(SDXL_CONFIG)), str(path))
    ours = loaded.state_dict()
    assert all(not t.is_meta for t in ours.values())
    for key, value in model.state_dict().items():
        assert torch.equal(ours[key], value), key
    attn_mask = loaded.conditioner.embedders[1].model.attn_mask
    assert torch.equal(attn_mask, torch.full((77, 77), float("-inf")).triu(1))


def test_load_in_bfloat16_keeps_buffers_float32(sdxl_weights, model, sdxl_io):
    loaded = load_model_from_config(OmegaConf.load(str(SDXL_CONFIG)), str(sdxl_weights), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.denoiser.sigmas.dtype == torch.float32
    assert torch.equal(loaded.denoiser.sigmas, model.denoiser.sigmas)
    unet = loaded.model.diffusion_model
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(sdxl_io["unet.x"], sdxl_io["unet.t"], context=sdxl_io["cond.crossattn"], y=sdxl_io["cond.vector"])
    assert max_err(out, sdxl_io["unet.out"]) < 0.1 * sdxl_io["unet.out"].abs().max().item()


def test_truncated_sdxl_file_is_refused(tmp_path, sdxl_weights):
    path = tmp_path / "sd_xl_base_1.0.safetensors"
    data = sdxl_weights.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model_from_config(OmegaConf.load(str(SDXL_CONFIG)), str(path))


def test_unet_without_vector_is_refused(model, sdxl_io):
    with pytest.raises(ValueError, match="needs y"):
        model.model.diffusion_model(sdxl_io["unet.x"], sdxl_io["unet.t"], context=sdxl_io["cond.crossattn"])
