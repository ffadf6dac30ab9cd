"""The search's accuracy objective (--quality accuracy): 100 minus the shapes-world judge's prompt accuracy.

The checkpoint is the shapes architecture with seeded random weights, exported as the trained model is
(``shapesworld.export``): its images show nothing, so the plumbing is checked here and the numbers against
images whose verdicts are known (the world's own renders).
"""
import json
import random

import pytest
import torch

from dato_search.cli import main
from dato_search.evaluator import StrategyEvaluator
from dato_search.objectives import AccuracyObjective, ObjectiveError, QualitySpec, build_objective
from sdgen.generate import ModelRef
from sdgen.resources import SHAPES_CONFIG
from shapesworld.evaluate import one_object_prompts, prompt_accuracy, reference_images
from shapesworld.export import write_checkpoint

pytest.importorskip("pymoo")


def judged(prompts, images):
    """The judge's scores of uint8 images (N, 3, H, W), computed directly."""
    return prompt_accuracy(images, list(prompts))[0]


def as_decode(images):
    """A decode that returns uint8 images (N, 3, H, W) as the [-1, 1] floats a VAE gives (they round back)."""
    return lambda latents: images.float() / 127.5 - 1.0


def score(prompts, images):
    objective = build_objective(QualitySpec(kind="accuracy"), prompts, torch.device("cpu"))
    return objective.score(torch.zeros(len(prompts), 4, 16, 16), as_decode(images))


def test_accuracy_is_100_minus_the_judges_prompt_accuracy():
    prompts = one_object_prompts()[::9]  # 12 prompts, every color and shape
    images = reference_images(prompts, seed=1)
    assert score(prompts, images) == (0.0, {"prompt_accuracy": 100.0, "color_accuracy": 100.0,
                                           "shape_accuracy": 100.0, "position_accuracy": 100.0,
                                           "count_accuracy": 100.0})
    shuffled = prompts[1:] + prompts[:1]  # image i judged against the next image's prompt
    quality, extras = score(shuffled, images)
    assert quality >= 90.0
    # Half right, half wrong: the value is exactly 100 - the judge's own prompt accuracy, the extras its scores.
    mixed = prompts[:6] + shuffled[6:]
    quality, extras = score(mixed, images)
    expected = judged(mixed, images)
    assert 0.0 < quality < 100.0
    assert quality == 100.0 - expected["prompt"]
    assert extras == {f"{name}_accuracy": value for name, value in expected.items()}


@pytest.fixture(scope="module")
def shapes_ckpt(tmp_path_factory):
    """The shapes model's architecture with seeded random weights, as a CompVis .safetensors."""
    path = tmp_path_factory.mktemp("shapes") / "random.safetensors"
    write_checkpoint(ModelRef(str(SHAPES_CONFIG), demo=True).load(verbose=False), path, {"what": "test stand-in"})
    return path


def tiny(ckpt, run_dir, *extra):
    return ["--config", str(SHAPES_CONFIG), "--ckpt", str(ckpt), "--H", "64", "--W", "64", "--steps", "4",
            "--n-prompts", "3", "--batch-size", "3", "--precision", "full", "--table-repeats", "1",
            "--quality", "accuracy", "--run-dir", str(run_dir), *extra]


def test_accuracy_search_on_the_shapes_model_records_the_judge(shapes_ckpt, tmp_path, monkeypatch):
    """A tiny search with --quality accuracy and no --prompts: the one-object shapes prompts; front.json holds
    the accuracy quality of every point, equal to 100 - the judge's accuracy of that strategy's images."""
    scored = []
    evaluate = StrategyEvaluator.evaluate

    def keep_images(self, strategy, measure_latency=False):
        latents, _ = self.sampler.sample(strategy)
        scored.append((strategy.cache_depth, self.sampler.sampling.prompts, self.sampler.decode(latents)))
        return evaluate(self, strategy, measure_latency)

    monkeypatch.setattr(StrategyEvaluator, "evaluate", keep_images)
    run_dir = tmp_path / "search"
    assert main([*tiny(shapes_ckpt, run_dir), "--pop", "3", "--gens", "2"], mode="depth") == 0
    report = json.loads((run_dir / "front.json").read_text())
    assert report["quality"]["kind"] == "accuracy" and report["quality"]["units"] == AccuracyObjective.units
    record = json.loads((run_dir / "search.json").read_text())
    prompts = record["sampling"]["prompts"]
    assert prompts == [one_object_prompts()[i] for i in random.Random(0).sample(range(108), 3)]
    assert "one_object_prompts" in record["prompt_source"] and record["quality"]["kind"] == "accuracy"
    assert len(record["quality"]["judge_sha256"]) == 64
    from sdgen.images import to_uint8_tensor

    by_depths = {json.dumps(depths): judged(p, to_uint8_tensor(images)) for depths, p, images in scored}
    assert report["front"]
    for point in report["front"]:
        expected = by_depths[json.dumps(point["cache_depth"])]
        assert point["quality"] == 100.0 - expected["prompt"]
        assert point["extras"] == {f"{name}_accuracy": value for name, value in expected.items()}
    assert (run_dir / "front.png").exists() and (run_dir / "best.yaml").exists()


def test_non_shapes_prompts_are_refused_in_one_line_before_any_work(shapes_ckpt, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square at the left\na red car\na photo of a cat\n")
    monkeypatch.setattr(ModelRef, "load", lambda *a, **k: pytest.fail("the model was built"))
    run_dir = tmp_path / "refused"
    # scripts/search_ratio.py (its default cache strategy, b1, has 50 steps)
    assert main(tiny(shapes_ckpt, run_dir, "--prompts", str(prompts), "--steps", "50"), mode="ratio") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: --quality accuracy judges shapes-world prompts only; prompt ")
    assert "(and 1 more of the 3 prompts)" in line and "leave --prompts out" in line
    assert not run_dir.exists()
    # The shapes prompts themselves are accepted by the check; other objectives keep the ImageNet default.
    AccuracyObjective.check_prompts(one_object_prompts())
    with pytest.raises(ObjectiveError):
        AccuracyObjective.check_prompts(["tench, Tinca tinca"])
