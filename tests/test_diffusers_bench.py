"""sdgen.diffusers_bench: the methods it compares run on a diffusers pipeline, and the table is built right."""
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from datosd import Strategy  # noqa: E402
from sdgen.diffusers_bench import B1, compare, every_nth_step, format_table  # noqa: E402
from diffusers_pipelines import GOLDEN_IMAGE_SIZE, golden_pipeline  # noqa: E402


def test_every_nth_step_keeps_the_schedule():
    b1 = Strategy.load(B1)
    ten = every_nth_step(b1, 10)
    assert ten.cache_depth == [b1.cache_depth[5 * i] for i in range(10)]
    assert ten.prune_ratio == [b1.prune_ratio[5 * i] for i in range(10)]
    with pytest.raises(ValueError, match="divisor of 50"):
        every_nth_step(b1, 7)


def test_compare_runs_every_method_and_skips_a_missing_one(monkeypatch):
    pytest.importorskip("DeepCache")
    pipe = golden_pipeline()
    strategy = Strategy([12, 1], [0.5, 0.5], name="tiny")
    rows = compare(pipe, steps=2, size=GOLDEN_IMAGE_SIZE, strategy=strategy, repeats=1, warmup=0,
                   deepcache=(2, 0))
    assert [row.method for row in rows] == ["original", "deepcache", "tomesd", "dato"]
    assert all(len(row.seconds) == 1 and row.speedup > 0 for row in rows)
    assert rows[0].speedup == 1.0
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"  # every method undid its patch
    assert "step" not in vars(pipe.scheduler) and "forward" not in vars(pipe.unet)
    table = format_table(rows)
    assert table.count("\n") == 5 and "datosd.apply_patch tiny" in table

    monkeypatch.setitem(sys.modules, "DeepCache", None)  # import DeepCache now raises ImportError
    rows = compare(pipe, steps=2, size=GOLDEN_IMAGE_SIZE, strategy=strategy, repeats=1, warmup=0,
                   methods=("original", "deepcache"))
    assert rows[1].skipped.startswith("not importable") and rows[1].seconds == []
    assert "skipped" in format_table(rows)
    with torch.no_grad():
        assert pipe.unet(torch.zeros(1, 4, 16, 16), 1, torch.zeros(1, 77, 16)).sample.shape == (1, 4, 16, 16)
