"""The shapes tables (table1_shapes, table3_shapes, table4_shapes; `python -m dato_tables shapes`): the prompt
file, the accuracy and fidelity metrics against computations of their own, the plans, and a smoke run of
table1_shapes end to end on the shapes architecture with seeded random weights.

Cost: the smoke run is in-process on one CPU thread (7 rows of 4 images, 5 steps, random-init Inception), about
a minute and a half on a busy 2-core CPU. The slow test needs the shipped weights and skips without them.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from dato_tables import cli, report
from dato_tables.evaluation import PSNR_CAP_DB, Evaluator, GeneratedReference, fidelity, folder_fidelity
from dato_tables.plan import PlanError, make_plan
from dato_tables.records import read_table
from dato_tables.settings import Options
from dato_tables.spec import load_specs
from sdgen.prompt_set import latent_path, save_latent
from sdgen.resources import SHAPES_WEIGHTS, packaged
from shapesworld.evaluate import one_object_prompts, reference_images
from shapesworld.world import COLORS, POSITIONS

SPECS = load_specs()
SHAPES_TABLES = ("table1_shapes", "table3_shapes", "table4_shapes")
ACCURACY_FIELDS = ("accuracy", "accuracy_color", "accuracy_shape", "accuracy_position", "accuracy_count")


def dry_plan(table, env=None, **options):
    return make_plan(SPECS, SPECS.tables[table], Options(dry_run=True, **options), env or {})


def write_folder(folder, images, latents=None):
    """images (N, 3, H, W) uint8 as folder/{k:06d}.png, latents (N, C, h, w) as the prompt set keeps them."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{k:06d}.png")
        if latents is not None:
            save_latent(latents[k], latent_path(folder, k))
    return folder


# --- the prompt file --------------------------------------------------------------------------------------

def test_prompt_file_is_the_108_one_object_prompts():
    shipped = REPO_ROOT / "data" / "shapes-prompts.txt"
    assert shipped.read_text(encoding="utf-8") == "".join(p + "\n" for p in one_object_prompts())
    plan = dry_plan("table1_shapes")
    assert plan.source.prompts == tuple(one_object_prompts()) and len(plan.source.prompts) == 108
    assert Path(plan.source.prompt_file) == packaged("data", "shapes-prompts.txt")


# --- fidelity ---------------------------------------------------------------------------------------------

def test_fidelity_of_identical_images_is_capped_and_of_a_known_change_is_the_formula():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(20, 236, (3, 3, 64, 64), generator=g, dtype=torch.uint8)
    latents = torch.randn(3, 4, 16, 16, generator=g)
    same = fidelity(images, images.clone(), latents, latents.clone())
    assert same == {"psnr": PSNR_CAP_DB, "latent_rms": 0.0}
    changed = images.clone()
    changed[1, 0, :8, :] += 10  # 512 values of 36864 off by 10 levels
    mse = 10 ** 2 * 512 / images.numel()
    scaled = fidelity(changed, images, 1.1 * latents, latents)
    assert scaled["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / mse), rel=1e-12)
    assert scaled["latent_rms"] == pytest.approx(10.0, rel=1e-6)  # z = 1.1 z0 (float32): 10% of z0's RMS
    z0, z = latents.numpy().astype(np.float64), latents.numpy().astype(np.float64) + 0.5
    expected = 100 * np.sqrt(np.mean((z - z0) ** 2)) / np.sqrt(np.mean(z0 ** 2))
    assert fidelity(images, images, torch.from_numpy(z), latents)["latent_rms"] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="do not pair up"):
        fidelity(images[:2], images, latents, latents)


def test_folder_fidelity_pairs_images_by_index_and_needs_the_latents(tmp_path):
    images = reference_images(one_object_prompts()[:4])
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    original = write_folder(tmp_path / "original", images, latents)
    row = write_folder(tmp_path / "row", images.flip(0), latents.flip(0))  # image k is the original's 3 - k
    paths = sorted(row.glob("*.png"))
    assert folder_fidelity(paths, original) == fidelity(images.flip(0), images, latents.flip(0), latents)
    assert folder_fidelity(sorted(original.glob("*.png")), original) == {"psnr": PSNR_CAP_DB, "latent_rms": 0.0}
    latent_path(original, 2).unlink()
    with pytest.raises(ValueError, match="1 missing, e.g. .*original/latents/000002.npy"):
        folder_fidelity(paths, original)


# --- accuracy ---------------------------------------------------------------------------------------------

def _swap(prompt, table):
    """The prompt with its color or position replaced by the next one of `table`."""
    names = sorted(table, key=len, reverse=True)  # 'top left' before 'top'
    found = next(n for n in names if (f" {n} " in f" {prompt} "))
    order = list(table)
    return prompt.replace(found, order[(order.index(found) + 1) % len(order)], 1)


def test_accuracy_of_the_worlds_own_images_and_of_wrong_prompts(tmp_path):
    """The shapes world's images judged against their own prompts are all right; against prompts with another
    color, every attribute of the color is wrong; with another position, only the position is."""
    prompts = one_object_prompts()[::9][:12]  # every color, shape and position
    folder = write_folder(tmp_path / "images", reference_images(prompts, seed=3))
    evaluator = Evaluator(["accuracy"])
    right = evaluator.evaluate(folder, prompts=prompts)
    assert right == {f: 100.0 for f in ACCURACY_FIELDS}
    other_color = evaluator.evaluate(folder, prompts=[_swap(p, COLORS) for p in prompts])
    assert other_color == dict(accuracy=0.0, accuracy_color=0.0, accuracy_shape=0.0, accuracy_position=0.0,
                               accuracy_count=100.0)
    other_place = evaluator.evaluate(folder, prompts=[_swap(p, POSITIONS) for p in prompts])
    assert other_place == dict(accuracy=0.0, accuracy_color=100.0, accuracy_shape=100.0, accuracy_position=0.0,
                               accuracy_count=100.0)
    half = [p if k % 2 else _swap(p, POSITIONS) for k, p in enumerate(prompts)]
    assert evaluator.evaluate(folder, prompts=half)["accuracy"] == 50.0
    # two passes over 6 prompts: image k is judged against prompt k mod 6
    cycled = evaluator.evaluate(write_folder(tmp_path / "cycled", reference_images(prompts[:6] * 2)),
                                prompts=prompts[:6], prompts_cycle=True)
    assert cycled["accuracy"] == 100.0


# --- plans ------------------------------------------------------------------------------------------------

def test_shapes_table_plans(tmp_path):
    t1, t3, t4 = (dry_plan(name, {"OUT_DIR": str(tmp_path)}) for name in SHAPES_TABLES)
    assert [r.method.name for r in t1.rows] == ["original", "ddim10", "tome-0.5", "deepcache-n3",
                                                "deepcache-n3+tome-0.5", "dato", "dato:b1-table-order"]
    assert [r.id for r in t3.rows] == [r.id for r in dry_plan("table3_cfg_alignment").rows]
    assert [r.method.name for r in t3.rows] == [r.method.name for r in dry_plan("table3_cfg_alignment").rows]
    assert [r.method.name for r in t4.rows] == ["original", "dato,diff_source=features", "dato,diff_source=eps",
                                                "dato,parity"]
    for plan in (t1, t3, t4):
        assert plan.model.ckpt == str(SHAPES_WEIGHTS) and plan.model.config.endswith("shapes-demo.yaml")
        assert (plan.values["height"], plan.values["width"], plan.values["precision"]) == (64, 64, "full")
        assert plan.values["batch_size"] == 36 and plan.values["scale"] == 7.5
        assert plan.run.sampler == "plms" and plan.run.steps == 50 and plan.total == 108
        e = plan.evaluation
        assert e.metrics == ("fid", "accuracy", "fidelity") and not e.prompts_cycle  # one pass: image k, prompt k
        assert e.original == tmp_path / plan.spec.key / "original" / "images"
        assert isinstance(e.reference, GeneratedReference) and e.reference.generator == "shapesworld"
        assert e.reference.prompts == tuple(one_object_prompts()) and e.inception_weights is None
        assert sum(r.baseline for r in plan.rows) == 1 and plan.rows[0].baseline
    assert "SHAPES_CKPT" not in t1.placeholders and "against 108 images of the shapesworld generator" in \
        cli.describe_plan(t1)


def test_shapes_checkpoint_setting_and_refusals(tmp_path, capsys):
    ckpt = tmp_path / "mine.safetensors"
    ckpt.write_bytes(b"x")
    plan = dry_plan("table1_shapes", {"SHAPES_CKPT": str(ckpt), "REPEATS": "1", "BATCH_SIZE": "12"})
    assert plan.model.ckpt == str(ckpt) and plan.total == 108 and plan.run.batch == 12
    assert len(plan.evaluation.reference.prompts) == 108
    missing = dict(OUT_DIR=str(tmp_path / "out"), SHAPES_CKPT=str(tmp_path / "none.safetensors"))
    with pytest.raises(PlanError, match="SHAPES_CKPT=.*none.safetensors is not a file"):
        make_plan(SPECS, SPECS.tables["table1_shapes"], Options(), missing)
    if not SHAPES_WEIGHTS.is_file():
        with pytest.raises(PlanError, match="SHAPES_CKPT is not set and its default .*shapes-demo.safetensors is not "
                                            "a file"):
            make_plan(SPECS, SPECS.tables["table1_shapes"], Options(), {"OUT_DIR": str(tmp_path / "out")})
    with pytest.raises(PlanError, match="METRICS: accuracy, fidelity only on tables that measure them"):
        dry_plan("table4_diffscore", {"METRICS": "fid,accuracy,fidelity"})
    assert cli.main(["shapes", "--dry-run"], env={"OUT_DIR": str(tmp_path / "out")}) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("# shapes: ")] == [
        f"# shapes: {name}" for name in SHAPES_TABLES]
    assert "## row dato_b1_table_order: DaTo (b1-table-order)" in out and not (tmp_path / "out").exists()


# --- a smoke run ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def table1_smoke(tmp_path_factory):
    """table1_shapes --smoke (the shapes config with seeded random weights, 4 images a row, 5 steps, one
    thread): the output folder and the table's folder."""
    out = tmp_path_factory.mktemp("shapes")
    assert cli.main(["table1_shapes", "--smoke", "--out", str(out)], env={}) == 0
    return out, out / "table1_shapes"


def test_table1_shapes_smoke_rows(table1_smoke):
    _, table = table1_smoke
    meta, rows = read_table(table)
    assert meta["metrics"] == ["fid", "accuracy", "fidelity"] and meta["smoke"]
    assert meta["fid_reference"].startswith("4 images of the shapesworld generator")
    assert [r["row"] for r in rows] == ["original", "ddim_few", "tome", "deepcache", "deepcache_tome", "dato_b1",
                                        "dato_b1_table_order"]
    assert rows[-1]["method"] == "dato:b1-table-order@every10"
    for r in rows:
        assert r["images"] == 4 and isinstance(r["latency"], float) and r["latency"] > 0
        assert isinstance(r["fid"], float) and math.isfinite(r["fid"]) and r["fid"] >= 0
        for field in ACCURACY_FIELDS:
            assert isinstance(r[field], float) and 0 <= r[field] <= 100, (r["row"], field)
        assert r["accuracy"] <= min(r["accuracy_color"], r["accuracy_count"])
        assert isinstance(r["psnr"], float) and 0 < r["psnr"] <= 100
        assert isinstance(r["latent_rms"], float) and r["latent_rms"] >= 0
        assert r["clip"] is None and r["is"] is None
        images = table / r["row"] / "images"
        for k in range(4):
            assert np.load(latent_path(images, k)).shape == (4, 16, 16)
        assert json.loads((images / "manifest.json").read_text())["settings"]["latents"] is True
    original = rows[0]
    assert original["psnr"] == PSNR_CAP_DB and original["latent_rms"] == 0.0
    assert all(r["latent_rms"] > 0 and r["psnr"] < PSNR_CAP_DB for r in rows[1:])  # every method changes the images
    text = (table / "results.md").read_text()
    assert "| Method | Accuracy (%) | Color (%) | Shape (%) | Position (%) | Count (%) | FID | PSNR (dB) |" in text
    assert "Setup: smoke: demo model, 64 x 64, guidance 7.5; seed 0 + image index; batch size 2" in text


def test_collect_shows_the_shapes_tables_without_paper_numbers(table1_smoke, capsys):
    out, table = table1_smoke
    assert report.main([str(out)]) == 0
    text = capsys.readouterr().out
    t1 = text.split("## Table 1 on the shapes model")[1].split("\n## ")[0]
    assert report.NO_PAPER_NOTE in t1 and "Smoke run" in t1 and "(paper)" not in t1
    _, rows = read_table(table)
    lines = [line for line in t1.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0].lstrip("| ") for line in lines] == [r["label"] for r in rows]
    t3 = text.split("## Table 3 on the shapes model")[1].split("\n## ")[0]  # not run: its rows, empty cells
    assert "| DaTo r=0.4, CFG-aligned base tokens |  |" in t3 and report.NO_PAPER_NOTE in t3


# --- the shipped weights ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not SHAPES_WEIGHTS.is_file(), reason="needs the trained shapes model (models/shapes/)")
def test_shipped_shapes_model_in_table1_shapes(tmp_path):
    """Two rows of table1_shapes with the shipped weights, one batch of 36 at 50 PLMS steps: the Original draws
    the asked colors (the model does not place objects, docs/shapes.md), and DaTo stays close to it, faster."""
    env = {"OUT_DIR": str(tmp_path), "LIMIT": "36", "METRICS": "accuracy,fidelity"}
    assert cli.main(["table1_shapes", "--rows", "original,dato_b1"], env=env) == 0
    original, dato = read_table(tmp_path / "table1_shapes")[1]
    assert original["accuracy_color"] > 90 and original["latent_rms"] == 0.0
    assert 0 <= dato["accuracy"] <= 100 and dato["psnr"] > 12 and dato["latency"] < original["latency"]
