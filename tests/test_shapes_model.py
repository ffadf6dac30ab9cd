"""The shipped shapes model (models/shapes/shapes-demo.safetensors): loaded through the normal loader, it draws
the asked colors and shapes (not the positions: docs/shapes.md), with and without DaTo; `txt2img.py --demo` uses it."""
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
# float32 on the CPU), a few points below each, so that a regression, not noise, fails. The shipped model draws the
# asked color and shape but not the asked position (position accuracy is at chance, 1 in 9; docs/shapes.md says
# why), so its prompt accuracy (color, shape and position right) is about 6 % and is not held to a floor here.
FLOORS = {  # method: {attribute: floor}; measured original color 99.1, shape 80.6, count 92.6; DaTo b1 99.1, 77.8, 87.0
    "original": {"color": 95.0, "shape": 72.0, "count": 85.0},
    "dato": {"color": 95.0, "shape": 70.0, "count": 80.0},
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
def test_the_one_object_prompts_keep_their_measured_color_shape_and_count(model, method):
    scores = one_object_accuracy(model, method)
    for attribute, floor in FLOORS[method].items():
        assert scores[attribute] >= floor, (attribute, scores)


def test_demo_draws_the_prompts_color_and_shape(tmp_path, capsys):
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
    assert scores["color"] == 100.0 and scores["shape"] >= 75.0 and scores["count"] >= 75.0, scores
