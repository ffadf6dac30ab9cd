"""SDXL through the generation API, the registry and txt2img: EulerEDM sampling, the methods on SDXL."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SDXL_CONFIG
from sdgen import generate as gen
from sdgen.cli import txt2img
from sdgen.methods import parse_method

TINY_SDXL = ["--H", "128", "--W", "128", "--ddim_steps", "4", "--n_samples", "1", "--n_iter", "1",
             "--precision", "full", "--skip_grid", "--scale", "7.0"]


@pytest.fixture(scope="module")
def engine(sdxl_weights):
    return gen.load_model(str(SDXL_CONFIG), str(sdxl_weights), verbose=False)


def cli_args(sdxl_weights, outdir, *extra):
    return ["--config", str(SDXL_CONFIG), "--ckpt", str(sdxl_weights), *TINY_SDXL, "--outdir", str(outdir), *extra]


def pixels(folder):
    with Image.open(folder / "samples/00000.png") as image:
        return np.asarray(image)


def test_txt2img_samples_sdxl_with_every_method(sdxl_weights, tmp_path, capsys):
    runs = {"original": [], "dato": ["--method", "dato@every13"], "deepcache": ["--deepcache", "--cache_interval", "2"],
            "tome": ["--tome"], "dato-ratio0": ["--method", "dato@every13@r0"]}
    for name, flags in runs.items():
        assert txt2img.main(cli_args(sdxl_weights, tmp_path / name, *flags)) == 0, capsys.readouterr().err
        assert pixels(tmp_path / name).shape == (128, 128, 3)
    out = capsys.readouterr().out
    assert "method: dato@every13 = DaTo [b1-every13: 4 steps" in out
    for name in ("dato", "deepcache", "tome"):
        assert not np.array_equal(pixels(tmp_path / name), pixels(tmp_path / "original")), name
    # b1@every13 keeps b1's depths: a ratio-0 variant caches, so it differs from the original too, but
    # an all-full, ratio-0 run is the unpatched model (checked at the latent level in test_sdxl_accel.py).
    assert not np.array_equal(pixels(tmp_path / "dato-ratio0"), pixels(tmp_path / "dato"))


@pytest.mark.parametrize("flags,message", [
    (["--plms"], "--plms and --ddim_eta do not apply"),
    (["--method", "ddim10"], "sampler 'ddim' does not apply to an SDXL model"),
    (["--H", "120"], "multiples of 32"),
])
def test_compvis_sampler_flags_are_refused_for_sdxl(sdxl_weights, tmp_path, capsys, flags, message):
    assert txt2img.main(cli_args(sdxl_weights, tmp_path / "out", *flags)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_size_flags_are_sdxl_only(tmp_path, capsys):
    assert txt2img.main(["--demo", "--outdir", str(tmp_path / "out"), "--target_size", "64", "64"]) == 2
    assert "SDXL size conditioning" in capsys.readouterr().err


def test_tome_merges_tokens_in_sdxl_attention(engine):
    """The registry gives tomesd the max_downsample that reaches SDXL's first attention level."""
    unet = engine.model.diffusion_model
    seen = []
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
               for name, m in unet.named_modules() if name.endswith("attn1") and "input_blocks.4" in name]
    size = gen.SizeConditioning(128, 128)
    cond = gen.encode_prompts(engine, ["a red fox"], 7.0, size=size)
    x_T = gen.start_noise([0], (4, 16, 16))
    try:
        gen.sample_latents(engine, cond, x_T, sampler="euler", steps=2, scale=7.0)
        plain = list(seen)
        seen.clear()
        with parse_method("tome-0.5").apply(engine, 2, seed=0) as applied:
            gen.sample_latents(engine, cond, x_T, sampler="euler", steps=2, scale=7.0, method=applied)
    finally:
        for handle in handles:
            handle.remove()
    assert plain and set(plain) == {64}  # 8 x 8 tokens at the first attention level of a 16 x 16 latent
    assert set(seen) == {32}  # half merged away


def test_sdxl_seed_gives_identical_latents(engine):
    size = gen.SizeConditioning(128, 128)
    cond = gen.encode_prompts(engine, ["a red fox"], 7.0, size=size)
    x_T = gen.start_noise([3], (4, 16, 16))
    with parse_method("deepcache-n2+tome-0.5").apply(engine, 3, seed=1) as applied:
        a = gen.sample_latents(engine, cond, x_T, sampler="euler", steps=3, scale=7.0, seed=1, method=applied)
        b = gen.sample_latents(engine, cond, x_T, sampler="euler", steps=3, scale=7.0, seed=1, method=applied)
    assert torch.equal(a.latents, b.latents)
    assert a.calls == {"full": 2, "partial": 1, "reused": 0}
