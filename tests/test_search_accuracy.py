"""The search's accuracy objective (--quality accuracy): 100 minus the shapes-world judge's prompt accuracy.

The checkpoint is the shapes architecture with seeded random weights, exported as the trained model is
(``shapesworld.export``): its images show nothing, so the plumbing is checked here and the numbers against
images whose verdicts are known (the world's own renders).
"""
import json
import random
import sqlite3

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


def query(run_dir, sql):
    db = sqlite3.connect(str(run_dir / "evals.sqlite"))
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


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


def test_min_speedup_constrains_the_front_and_seed_intervals_seed_faster_strategies(shapes_ckpt, tmp_path, capsys):
    """The shapes search's design at tiny scale: extra DeepCache seeds (every 8th step full) and a speed-up
    constraint; the front, the choice and best.yaml hold only strategies at >= the bound, and front.json keeps
    the unaccelerated model's point (the reference the accuracy drop is measured from)."""
    run_dir = tmp_path / "constrained"
    args = [*tiny(shapes_ckpt, run_dir), "--steps", "10", "--n-prompts", "2", "--batch-size", "2", "--pop", "6",
            "--gens", "2", "--seed-intervals", "2,3,8", "--min-speedup", "2"]
    assert main(args, mode="depth") == 0
    report = json.loads((run_dir / "front.json").read_text())
    costs = json.loads((run_dir / "costs.json").read_text())[0]["seconds"]

    def latency(depths):  # PLMS calls the UNet twice at step 0, which is full; a batch of 2 images
        return sum(costs["d0" if d == 0 else f"d{d}_r0.00"] for d in [12, 12] + depths[1:]) / 2

    full = latency([12] * 10)
    constraint = report["constraint"]
    assert constraint["min_speedup"] == 2.0 and constraint["max_latency"] == pytest.approx(full / 2, rel=1e-12)
    assert constraint["feasible_points"] > 0 and constraint["front_of"] == "feasible points"
    assert report["front"] and all(full / latency(p["cache_depth"]) >= 2.0 for p in report["front"])
    assert all(p["speedup"] >= 2.0 for p in [*report["front"], report["best"]])
    assert report["full_model"]["cache_depth"] == [12] * 10 and report["full_model"]["quality"] == 100.0
    # The first population: all-full, then every N-th step full for N = 2, 3, 8 at depth 1, then at depth 0.
    first = [json.loads(s)["cache_depth"] for (s,) in query(run_dir, "SELECT e.strategy FROM asks a JOIN evals e "
                                                                      "ON a.key = e.key WHERE a.generation = 1 "
                                                                      "ORDER BY a.position")]
    assert first == [[12] * 10] + [[12 if i % n == 0 else d for i in range(10)] for d in (1, 0) for n in (2, 3, 8)][:5]
    space = json.loads((run_dir / "search.json").read_text())
    assert space["space"]["seed_intervals"] == [2, 3, 8] and space["min_speedup"] == 2.0
    # Another bound is another search.
    capsys.readouterr()
    assert main([*args[:-1], "3"], mode="depth") == 2
    assert "min_speedup 2.0 -> 3.0" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--min-speedup", "1"], "--min-speedup must be a number above 1"),
    (["--min-speedup", "9", "--latency", "measured"], "--min-speedup needs --latency table"),
    (["--seed-intervals", "1,8"], "--seed-intervals '1,8': every N must be at least 2"),
    (["--seed-intervals", "8", "--mode", "ratio", "--steps", "50"], "--seed-intervals sets the cache-depth seeds"),
])
def test_bad_constraint_and_seed_options_are_one_line(shapes_ckpt, tmp_path, capsys, extra, message):
    run_dir = tmp_path / "run"
    assert main([*tiny(shapes_ckpt, run_dir), *extra], mode="depth") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not run_dir.exists()
