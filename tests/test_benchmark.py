"""scripts/benchmark.py end to end on the demo model: table, JSON and plot, with consistent numbers."""
import importlib.util
import json

import pytest

from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("benchmark_script", REPO_ROOT / "scripts" / "benchmark.py")
BENCHMARK = importlib.util.module_from_spec(spec)
spec.loader.exec_module(BENCHMARK)


def test_two_methods_one_repeat(tmp_path):
    code = BENCHMARK.main(["--demo", "--steps", "5", "--H", "64", "--W", "64", "--methods", "original,deepcache-n3",
                           "--repeats", "1", "--table-repeats", "1", "--outdir", str(tmp_path), "--name", "b",
                           "--cost-table", str(tmp_path / "costs.json")])
    assert code == 0
    table = (tmp_path / "b.md").read_text()
    assert "| original | plms 5 |" in table and "| deepcache-n3 | plms 5 |" in table
    assert "NOT meaningful" in table
    assert (tmp_path / "b.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "b.json").read_text())
    original, deepcache = data["rows"]
    # PLMS 5 steps: 6 calls; uniform N=3 depth 1: steps 0 (twice) and 3 full, steps 1, 2, 4 partial.
    assert original["calls"] == {"full": 6, "partial": 0, "reused": 0}
    assert deepcache["calls"] == {"full": 3, "partial": 3, "reused": 0}
    seconds = data["cost_tables"]["None"]["seconds"]
    assert original["predicted_s"] == pytest.approx(6 * seconds["d12_r0.00"])
    assert deepcache["predicted_s"] == pytest.approx(3 * seconds["d12_r0.00"] + 3 * seconds["d1_r0.00"])
    assert original["speedup"] == 1.0 and original["ideal_speedup"] == 1.0
    assert deepcache["ideal_speedup"] > 1.5
    assert deepcache["speedup"] == pytest.approx(original["median_s"] / deepcache["median_s"])
    assert original["latent_mse"] == 0.0 and deepcache["latent_mse"] > 0
    assert data["environment"]["precision"] == "float32"


def test_bad_method_is_rejected(tmp_path, capsys):
    assert BENCHMARK.main(["--demo", "--methods", "original,warp-speed", "--outdir", str(tmp_path)]) == 2
    assert "unknown method 'warp-speed'" in capsys.readouterr().err
