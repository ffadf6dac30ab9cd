"""The benchmark (sdgen.benchmark, sdgen.cli.benchmark) and the per-call timing (sdgen.cli.unet_calls) end to end
on the demo model: one untimed warm-up run per method before the timed runs, call counts and predictions from
the call plan, the cost table under --outdir, reused and replaced only with --remeasure."""
import json

import pytest
import torch

from ldm.models.diffusion.hooks import SamplingHook
from sdgen import generate
from sdgen.benchmark import bench_entries, spread_report
from sdgen.cli import benchmark, unet_calls
from sdgen.costs import CostTable
from sdgen.methods import AppliedMethod, MethodError
from sdgen.runtime import set_threads
from sdgen.settings import RunSettings
from helpers import TINY_DEMO

SMALL = [*TINY_DEMO, "--steps", "5", "--H", "64", "--W", "64", "--table-repeats", "1", "--threads", "1"]


@pytest.fixture(autouse=True)
def keep_threads():
    """The CLIs set the process's thread count (--threads 1); give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    set_threads(threads)


class RunRecorder(SamplingHook):
    """Records every sampling run of a model (the applied method's name, UNet calls) and the UNet calls made
    outside sampling runs (cost-table measurements)."""

    def __init__(self, model):
        self.model = model
        self.runs = []
        self.calls_outside_runs = 0
        self.active = False
        model.model.diffusion_model.register_forward_pre_hook(self.unet_called)

    def sampling_started(self, num_steps):
        names = [hook.method.name for hook in self.model.sampling_hooks if isinstance(hook, AppliedMethod)]
        self.runs.append([names, 0])
        self.active = True

    def sampling_finished(self):
        self.active = False

    def unet_called(self, module, args):
        if self.active:
            self.runs[-1][1] += 1
        else:
            self.calls_outside_runs += 1


@pytest.fixture
def recorder(monkeypatch):
    """The demo model the CLI builds, with a RunRecorder on it."""
    made = []
    build = generate.build_demo_model

    def recorded_build(device="cpu", config_path=generate.TINY_CONFIG):
        model = build(device, config_path)
        made.append(RunRecorder(model))
        model.sampling_hooks.add(made[-1])
        return model

    monkeypatch.setattr(generate, "build_demo_model", recorded_build)
    return made


def test_warm_up_then_rotating_timed_runs(tmp_path, recorder):
    code = benchmark.main([*SMALL, "--methods", "deepcache-n3,original,ddim10", "--repeats", "2",
                           "--outdir", str(tmp_path), "--name", "b"])
    assert code == 0
    runs = [(names[0], calls) for names, calls in recorder[0].runs]
    warm_up = [("original", 6), ("deepcache-n3", 6), ("ddim10", 10)]  # PLMS 5 steps: 6 calls; DDIM 10: 10
    # One untimed warm-up run per method, then 2 timed passes, the second starting one method later.
    assert runs == warm_up + warm_up + warm_up[1:] + warm_up[:1]
    data = json.loads((tmp_path / "b.json").read_text())
    rows = {row["method"]: row for row in data["rows"]}
    assert [row["method"] for row in data["rows"]] == ["original", "deepcache-n3", "ddim10"]
    assert all(len(row["seconds"]) == 2 for row in data["rows"])  # the warm-up run is not timed
    assert data["environment"]["warmup_runs"] == 1 and data["environment"]["threads"] == 1
    # Calls by kind: uniform N=3 depth 1 at 5 PLMS steps: steps 0 (twice) and 3 full, steps 1, 2, 4 partial.
    assert rows["original"]["calls"] == {"full": 6, "partial": 0, "reused": 0}
    assert rows["deepcache-n3"]["calls"] == {"full": 3, "partial": 3, "reused": 0}
    assert rows["ddim10"]["calls"] == {"full": 10, "partial": 0, "reused": 0}
    assert (rows["ddim10"]["sampler"], rows["ddim10"]["steps"]) == ("ddim", 10)
    # The cost table is stored under --outdir, keyed by what it depends on.
    (stored,) = json.loads((tmp_path / "costs.json").read_text())
    assert stored["key"]["latent"] == [8, 8] and stored["key"]["threads"] == 1
    assert stored["key"]["tome_ratio"] is None and stored["key"]["dtype"] == "float32"
    seconds = stored["seconds"]
    assert set(seconds) == {"d12_r0.00", "d1_r0.00"}
    assert data["cost_tables"]["None"]["seconds"] == seconds
    assert rows["original"]["predicted_s"] == pytest.approx(6 * seconds["d12_r0.00"])
    assert rows["deepcache-n3"]["predicted_s"] == pytest.approx(3 * seconds["d12_r0.00"] + 3 * seconds["d1_r0.00"])
    assert rows["ddim10"]["predicted_s"] == pytest.approx(10 * seconds["d12_r0.00"])
    original, deepcache = rows["original"], rows["deepcache-n3"]
    assert original["speedup"] == 1.0 and original["ideal_speedup"] == 1.0
    assert rows["ddim10"]["ideal_speedup"] == pytest.approx(6 / 10)
    assert deepcache["ideal_speedup"] > 1.5
    assert deepcache["speedup"] == pytest.approx(original["median_s"] / deepcache["median_s"])
    assert original["latent_mse"] == 0.0 and deepcache["latent_mse"] > 0
    table = (tmp_path / "b.md").read_text()
    assert "| original | plms 5 |" in table and "| deepcache-n3 | plms 5 |" in table and "| ddim10 | ddim 10 |" in table
    assert "ddim10: runs 10 steps: its name fixes the step count (--steps 5 applies" in table
    assert "NOT meaningful" in table
    assert (tmp_path / "b.png").stat().st_size > 10_000


def test_cost_table_reused_and_replaced_only_with_remeasure(tmp_path, recorder):
    args = [*SMALL, "--predict-only", "--outdir", str(tmp_path), "--name", "p"]
    assert benchmark.main([*args, "--methods", "original,deepcache-n3"]) == 0
    # One untimed pass, one timing pass and one MAC-counting pass, each two full calls, then one call per entry
    # (d12_r0.00, d1_r0.00).
    assert recorder[0].calls_outside_runs == 3 * 4 and recorder[0].runs == []
    first = json.loads((tmp_path / "costs.json").read_text())[0]
    assert set(first["macs"]) == {"d12_r0.00", "d1_r0.00"}
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert rows[1]["gmacs_per_image"] * 1e9 == 3 * first["macs"]["d12_r0.00"] + 3 * first["macs"]["d1_r0.00"]

    assert benchmark.main([*args, "--methods", "original,deepcache-n3"]) == 0
    assert recorder[1].calls_outside_runs == 0  # every entry stored: nothing measured
    assert json.loads((tmp_path / "costs.json").read_text())[0] == first

    assert benchmark.main([*args, "--methods", "original,deepcache-n3-d2"]) == 0
    assert recorder[2].calls_outside_runs == 3 * 3  # only the missing d2_r0.00, run untimed, timed and counted
    merged = json.loads((tmp_path / "costs.json").read_text())[0]
    assert set(merged["seconds"]) == set(merged["macs"]) == {"d12_r0.00", "d1_r0.00", "d2_r0.00"}
    assert all(merged["raw_seconds"][k] == first["raw_seconds"][k] for k in ("d12_r0.00", "d1_r0.00"))

    assert benchmark.main([*args, "--methods", "original", "--remeasure"]) == 0
    assert recorder[3].calls_outside_runs == 2 * 3  # d12_r0.00 run untimed, timed again and replaced (its MACs
    # are stored)
    remeasured = json.loads((tmp_path / "costs.json").read_text())[0]
    assert remeasured["raw_seconds"]["d1_r0.00"] == first["raw_seconds"]["d1_r0.00"]
    assert remeasured["raw_seconds"]["d12_r0.00"] != first["raw_seconds"]["d12_r0.00"]


def test_steps_apply_to_methods_without_a_step_count():
    entries = bench_entries(["ddim10", "dato@every5", "tome-0.5", "original"], RunSettings(sampler="plms", steps=10))
    assert [(e.name, e.sampler, e.steps) for e in entries] == [
        ("original", "plms", 10), ("ddim10", "ddim", 10), ("dato@every5", "plms", 10), ("tome-0.5", "plms", 10)]
    assert [len(e.call_plan()) for e in entries] == [11, 10, 11, 11]
    assert entries[2].note() == "strategy b1-every5: b1's every 5th step, a 10-step stand-in"
    with pytest.raises(MethodError, match="listed twice"):
        bench_entries(["tome-0.5", "tome-.5"], RunSettings(sampler="plms", steps=10))


@pytest.mark.parametrize("methods, message", [
    ("original,warp-speed", "unknown method 'warp-speed'"),
    ("original,tome", "'tome' is now called 'tome-0.5'"),
    ("dato", "b1' has 50 steps but the sampler runs 5"),
])
def test_bad_methods_are_rejected_before_anything_is_built(tmp_path, capsys, recorder, methods, message):
    outdir = tmp_path / "out"
    assert benchmark.main([*SMALL, "--methods", methods, "--outdir", str(outdir)]) == 2
    assert message in capsys.readouterr().err
    assert recorder == [] and not outdir.exists()


def test_unet_calls_on_the_demo_config(tmp_path, capsys):
    out = tmp_path / "calls.json"
    assert unet_calls.main(["--config", str(generate.TINY_CONFIG), "--H", "64", "--W", "64", "--ratios", "0.5",
                            "--repeats", "2", "--threads", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["raw"]) == {"dato_d12_r0.00", "dato_d12_r0.50", "dato_d1_r0.00", "dato_d1_r0.50",
                                "tome_d12_r0.50"}
    assert all(len(v) == 2 for v in data["raw"].values()) and data["threads"] == 1 and data["latent"] == [8, 8]
    assert "ratio 0.5: DaTo / ToMeSD time" in capsys.readouterr().out


def test_spread_report_flags_a_one_repeat_table_out_of_line_with_its_macs():
    entries = bench_entries(["deepcache-n3"], RunSettings(sampler="plms", steps=5))
    macs = {"d12_r0.00": 100_000, "d1_r0.00": 5_000}
    cold = CostTable(key={}, seconds={"d12_r0.00": 2.0, "d1_r0.00": 4.0}, raw_seconds={"d12_r0.00": [2.0],
                     "d1_r0.00": [4.0]}, macs=macs)
    lines, flagged = spread_report({None: cold}, entries)
    assert lines == ["cost table, spread of each entry's repeats: d12_r0.00 (1 repeat), d1_r0.00 (1 repeat)"]
    assert flagged == ["cost table entries d12_r0.00 / d1_r0.00: 0.50x the time for 20.00x the MACs"]
    steady = CostTable(key={}, seconds={"d12_r0.00": 2.0, "d1_r0.00": 0.4}, macs=macs)
    assert spread_report({None: steady}, entries)[1] == []


@pytest.mark.parametrize("content, reason", [
    ('{"entries": [', "Expecting value"),
    ("[1, 2]", ""),
    ("\xff\xfe not text", ""),
])
def test_a_cost_table_that_is_not_one_is_refused_before_anything_is_built(tmp_path, capsys, recorder, content,
                                                                           reason):
    table = tmp_path / "costs.json"
    table.write_bytes(content.encode("latin-1"))
    outdir = tmp_path / "out"
    assert benchmark.main([*SMALL, "--methods", "original", "--cost-table", str(table), "--outdir", str(outdir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --cost-table {table} is not a cost-table JSON file (") and reason in err
    assert err.count("\n") == 1 and recorder == [] and not outdir.exists()
    assert table.read_bytes() == content.encode("latin-1")


def test_a_size_that_cannot_fit_is_refused_before_anything_is_built(tmp_path, capsys, recorder, monkeypatch):
    monkeypatch.setattr(benchmark, "load", lambda *a, **k: pytest.fail("model built"))
    outdir = tmp_path / "out"
    assert benchmark.main([*SMALL, "--methods", "original", "--H", "99968", "--W", "99968", "--outdir",
                           str(outdir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: a run at 99968x99968 with --batch 1 (UNet rows doubled for guidance) needs at least")
    assert recorder == [] and not outdir.exists()


@pytest.mark.parametrize("model_args, side", [(["--demo"], 64), (["--random-weights"], 512)])
def test_the_image_size_defaults_to_the_models_own(tmp_path, model_args, side):
    argv = [*model_args, "--methods", "original", "--outdir", str(tmp_path / "bench")]
    opt = benchmark.resolve_model_args(benchmark.build_parser().parse_args(argv))
    _, settings, _, _, _ = benchmark.check_options(opt)
    assert (opt.H, opt.W) == (side, side) and (settings.height, settings.width) == (side, side)
