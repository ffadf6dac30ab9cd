"""The shipped shapes model (models/shapes/shapes-demo.safetensors): loaded through the normal loader, it draws
the asked colors and shapes at the asked places, with and without DaTo; `txt2img.py --demo` uses it."""
import json

import numpy as np
import pytest
import torch

from sdgen import generate as gen
from sdgen.cli import txt2img
from sdgen.images import to_uint8_tensor
from sdgen.methods import parse_method
from sdgen.resources import SHAPES_CONFIG, SHAPES_WEIGHTS
from shapesworld.evaluate import one_object_prompts, prompt_accuracy

pytestmark = pytest.mark.skipif(not SHAPES_WEIGHTS.is_file(), reason=f"{SHAPES_WEIGHTS} is missing")

SCALE = 7.5
# Floors set from the measured accuracies (docs/shapes.md: PLMS-50 on the 108 one-object prompts, seeds 0..107,
# float32 on the CPU), a few points below each, so that a regression, not noise, fails (1 image is 0.9 points).
# The issue asks for a prompt accuracy of 85 %; the model reaches 74.1 % (its shapes hold it back: docs/shapes.md).
# Measured (prompt / color / shape / position / count): original 74.1 / 99.1 / 74.1 / 99.1 / 99.1,
# DaTo b1 76.9 / 99.1 / 76.9 / 99.1 / 99.1.
FLOORS = {  # method: {attribute: floor}
    "original": {"prompt": 68.0, "color": 95.0, "shape": 68.0, "position": 95.0, "count": 95.0},
    "dato": {"prompt": 70.0, "color": 95.0, "shape": 70.0, "position": 95.0, "count": 95.0},
}


@pytest.fixture(scope="module")
def model():
    return gen.load_model(SHAPES_CONFIG, SHAPES_WEIGHTS, verbose=False)


def one_object_accuracy(model, method: str) -> dict:
    """The judge's accuracies (prompt, color, shape, position, count; percent) of `method` on the 108 one-object
    prompts, PLMS 50 steps, image k with seed k."""
    prompts = one_object_prompts()
    geometry = gen.model_geometry(gen.read_config(SHAPES_CONFIG))
    shape = gen.latent_shape(geometry, 64, 64)
    images = []
    with parse_method(method).apply(model, 50, seed=0) as applied:
        for start in range(0, len(prompts), 36):
            batch = prompts[start:start + 36]
            cond = gen.encode_prompts(model, batch, SCALE)
            x_T = gen.start_noise(range(start, start + len(batch)), shape)
            result = gen.sample_latents(model, cond, x_T, sampler="plms", steps=50, scale=SCALE, seed=start,
                                        method=applied)
            images.append(to_uint8_tensor(gen.decode(model, result.latents)))
    return prompt_accuracy(torch.cat(images), prompts)[0]


def test_the_shipped_file_and_its_record():
    record = json.loads(SHAPES_WEIGHTS.with_suffix(".json").read_text())
    assert SHAPES_WEIGHTS.stat().st_size == record["bytes"] <= 25 * 10 ** 6
    for key in ("command", "seed", "commit", "steps", "final_losses_mean_of_last_100", "seconds", "sha256"):
        assert key in record
    from sdgen.image_jobs import file_sha256

    assert file_sha256(SHAPES_WEIGHTS) == record["sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(FLOORS))
def test_the_one_object_prompts_keep_their_measured_accuracies(model, method):
    scores = one_object_accuracy(model, method)
    for attribute, floor in FLOORS[method].items():
        assert scores[attribute] >= floor, (attribute, scores)


def test_demo_draws_the_prompts_color_and_shape_at_its_place(tmp_path, capsys):
    prompt = "a blue square at the bottom right"
    code = txt2img.main(["--demo", "--prompt", prompt, "--n_samples", "4", "--n_iter", "1", "--plms",
                         "--precision", "full", "--device", "cpu", "--outdir", str(tmp_path), "--skip_grid"])
    assert code == 0
    assert "shapes model" in capsys.readouterr().out
    from PIL import Image

    files = sorted((tmp_path / "samples").glob("*.png"))
    assert len(files) == 4
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                          for f in files])
    assert images.shape == (4, 3, 64, 64)
    scores, _ = prompt_accuracy(images, [prompt] * 4)
    assert scores["color"] == 100.0 and scores["position"] == 100.0, scores
    assert scores["shape"] >= 75.0 and scores["count"] >= 75.0, scores


def test_the_diffusers_conversion_keeps_the_coordinate_input(model):
    """diffusers' UNet of the converted shapes model sees the same coordinates: its output is ldm's."""
    pytest.importorskip("diffusers")
    from safetensors.torch import load_file

    from ldm.modules.diffusionmodules.coordconv import CoordConv2d
    from sdgen.diffusers_models import pipeline_from_ldm

    pipe = pipeline_from_ldm(gen.read_config(SHAPES_CONFIG), load_file(str(SHAPES_WEIGHTS)), image_size=64)
    assert isinstance(pipe.unet.conv_in, CoordConv2d)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([981, 301])
    with torch.no_grad():
        context = model.get_learned_conditioning(["a red circle at the top left", "a blue square at the bottom"])
        ours = model.apply_model(x, t, context)
        theirs = pipe.unet(x, t, encoder_hidden_states=context).sample
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
