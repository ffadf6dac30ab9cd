"""scripts/tables/: two table scripts end to end in --smoke mode, all six as --dry-run, and their helpers.

A smoke run is ~3 Python processes per row (sampling, metrics, bookkeeping), each ~10 s of CPU, mostly
imports; all six scripts would take well over 3 minutes on 2 shared cores. So Table 4 (sample_prompts.py
path, DaTo option flags) and Table 5 (img2img path, FID + CLIP + IS) run fully, and every script, those two
included, is checked command by command with --dry-run.
"""
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import REPO_ROOT

TABLES = REPO_ROOT / "scripts" / "tables"
SETTINGS = ("OUT_DIR", "SD15_CKPT", "SD2_CKPT", "SD2_CONFIG", "SD15_CONFIG", "IMAGENET_REF", "COCO_REF",
            "INCEPTION_WEIGHTS", "CLIP_WEIGHTS", "CLIP_ARCH", "NPROC", "LIMIT", "BATCH_SIZE", "SEED", "SCALE",
            "STEPS", "FEW_STEPS", "TOME_RATIO", "DC_INTERVAL", "DC_DEPTH", "DATO_STRATEGY", "DATO_EXTRA",
            "DATASET", "METRICS", "RATIOS", "REPEATS", "PRECISION", "STRENGTH", "I2I_INIT_DIR", "I2I_PROMPTS", "I2I_REF", "H", "W")


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_env(**settings):
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **settings)
    return env


def run_table(script, *args, **env_settings):
    return subprocess.run(["bash", str(TABLES / script), *args], cwd=REPO_ROOT, env=table_env(**env_settings),
                          capture_output=True, text=True, timeout=900)


def read_rows(table_dir):
    return [json.loads(line) for line in (table_dir / "rows.jsonl").read_text().splitlines() if line.strip()]


def markdown_rows(text):
    """The body rows of the first markdown table in `text`, as lists of cells."""
    lines = [l for l in text.splitlines() if l.startswith("|")]
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]


# --- smoke runs ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    """Both smoke runs at once (each is a chain of single-threaded processes), in two OUT_DIRs."""
    out = tmp_path_factory.mktemp("tables")
    procs = {}
    for script in ("table4_diffscore.sh", "table5_img2img.sh"):
        procs[script] = subprocess.Popen(["bash", str(TABLES / script), "--smoke", "--out", str(out / script)],
                                         cwd=REPO_ROOT, env=table_env(), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
    results = {}
    for script, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        results[script] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out, results


def test_table4_smoke_end_to_end(smoke_out):
    out, results = smoke_out
    result = results["table4_diffscore.sh"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = out / "table4_diffscore.sh" / "table4_diffscore"
    rows = read_rows(table)
    assert [r["row"] for r in rows] == ["original", "dato_features", "dato_eps", "dato_released"]
    assert [r["baseline"] for r in rows] == [True, False, False, False]
    for r in rows:
        assert r["images"] == 4 and math.isfinite(r["fid"]) and r["fid"] >= 0 and r["latency"] > 0, r
        assert len(list((table / r["row"] / "images").glob("*.png"))) == 4
    # each row really ran with its own DaTo options
    options = {r["row"]: json.loads((table / r["row"] / "images" / "manifest.json").read_text())
               ["settings"]["acceleration"]["dato_options"] for r in rows}
    assert options["original"] is None
    assert options["dato_features"]["diff_source"] == "features" and options["dato_features"]["align_cfg"]
    assert options["dato_eps"]["diff_source"] == "eps"
    assert options["dato_released"] == {**options["dato_released"], "diff_source": "eps",
                                        "cfg_reference": "uncond", "recover_from": "kept"}

    md = (table / "results.md").read_text()
    assert "Smoke run" in md
    body = markdown_rows(md)
    assert [b[0] for b in body] == ["Original (PLMS, 5 steps)", "DaTo, DiffScore from features (paper)",
                                    "DaTo, DiffScore from noise prediction",
                                    "DaTo, released-code choices (--dato_parity)"]
    assert body[0][3] == "1.00x"
    for b, r in zip(body, rows):  # Method | FID | Latency | Speed-up | Images
        assert b[1] == f"{r['fid']:.2f}" and b[4] == "4"
        assert b[3] == f"{rows[0]['latency'] / r['latency']:.2f}x"


def test_table5_smoke_end_to_end(smoke_out):
    out, results = smoke_out
    result = results["table5_img2img.sh"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = out / "table5_img2img.sh" / "table5_img2img"
    rows = read_rows(table)
    assert [r["row"] for r in rows] == ["original", "tome", "deepcache", "deepcache_tome", "dato"]
    for r in rows:
        assert r["images"] == 4 and r["latency"] > 0
        for metric in ("fid", "clip", "is"):
            assert math.isfinite(r[metric]), (r["row"], metric)
        assert 0 <= r["clip"] <= 100 and r["is"] >= 1 - 1e-6
    assert "ToMeSD r=0.5" in rows[1]["method"] and rows[2]["method"].startswith("DeepCache")
    assert rows[4]["method"].startswith("DaTo [smoke5-last4: 4 steps")  # strength 0.8 of 5 steps = 4 steps
    header = [l for l in (table / "results.md").read_text().splitlines() if l.startswith("| Method")][0]
    assert header == "| Method | FID | CLIP | IS | Latency (s/img) | Speed-up | Images |"
    # each output is an img2img of its own init image, with its own prompt
    from PIL import Image

    with Image.open(table / "dato" / "images" / "000002.png") as img:
        assert img.text["init_img"].endswith("000002.png") and img.text["seed"] == "2"
        assert img.size == (64, 64)


def test_collect_renders_both_smoke_tables_next_to_the_paper(smoke_out, tmp_path):
    out, results = smoke_out
    assert all(r.returncode == 0 for r in results.values())
    report = tmp_path / "report.md"
    # a table folder, and an OUT_DIR holding one
    paths = [str(out / "table4_diffscore.sh" / "table4_diffscore"), str(out / "table5_img2img.sh")]
    result = subprocess.run([sys.executable, str(TABLES / "collect.py"), *paths, "--out", str(report)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = report.read_text()
    assert text.strip() == result.stdout.strip()
    assert "## Table 4: DiffScore source" in text and "## Table 5: image-to-image" in text
    t5 = text.split("## Table 5")[1]
    assert "| Method | FID | FID (paper) | CLIP | CLIP (paper) | IS | IS (paper) | Latency (s/img) | Speed-up |" in t5
    body = markdown_rows(t5)
    assert [b[0] for b in body][0] == "Original (DDIM, 4 of 5 steps)" and body[0][-1] == "1.00x"
    assert len(body) == 5


# --- dry runs --------------------------------------------------------------------------------------------

def dry_run(script, **env):
    result = run_table(script, "--dry-run", **env)
    assert result.returncode == 0, result.stderr
    rows, current = {}, None
    for line in result.stdout.splitlines():
        if line.startswith("## row "):
            current = line[len("## row "):].split(":")[0]
            rows[current] = []
        elif line.startswith("+ ") and "make_strategy.py" not in line:  # those are checked separately
            rows.setdefault(current, []).append(shlex.split(line[2:]))
    return rows, result.stdout


def flags_after(cmd, script_name):
    """The arguments after the script path in a command."""
    i = next(i for i, a in enumerate(cmd) if a.endswith(script_name))
    return cmd[i + 1:]


def value(args, flag):
    return args[args.index(flag) + 1]


REAL = dict(OUT_DIR="/data/out", SD15_CKPT="/w/sd15.safetensors", IMAGENET_REF="/w/imagenet.npz",
            COCO_REF="/w/coco.npz", INCEPTION_WEIGHTS="/w/pt_inception-2015-12-05-6726825d.pth",
            CLIP_WEIGHTS="/w/clip.bin", SD2_CKPT="/w/sd2.ckpt", I2I_INIT_DIR="/w/init", I2I_PROMPTS="/w/p.txt")


@pytest.mark.parametrize("script, prompts, repeats", [
    ("table1_imagenet_sd15.sh", "imagenet-class-prompts.txt", "2"),
    ("table1_coco30k_sd15.sh", "coco30k-prompts.txt", "1"),
    ("table1_sd2.sh", "imagenet-class-prompts.txt", "2"),
])
def test_table1_dry_runs(script, prompts, repeats):
    rows, _ = dry_run(script, NPROC="2", **REAL)
    assert list(rows) == ["original", "ddim_few", "tome", "deepcache", "deepcache_tome", "dato_b1"]
    sample = {}
    for row, cmds in rows.items():
        assert len(cmds) == 3  # sample, evaluate, record
        launch, evaluate, record = cmds
        assert launch[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        args = flags_after(launch, "sample_prompts.py")
        sample[row] = args
        assert value(args, "--from-file").endswith("data/" + prompts) and value(args, "--repeats") == repeats
        assert value(args, "--outdir") == f"/data/out/{script[:-3]}/{row}/images"
        ckpt = "/w/sd2.ckpt" if "sd2" in script else "/w/sd15.safetensors"
        assert value(args, "--ckpt") == ckpt and value(args, "--H") == "512"
        assert value(args, "--config").endswith("v2-inference.yaml" if "sd2" in script else "v1-inference.yaml")
        ev = flags_after(evaluate, "eval_fid.py")
        assert value(ev, "--samples") == value(args, "--outdir") and value(ev, "--metrics") == "fid"
        assert value(ev, "--ref") == ("/w/coco.npz" if "coco" in script else "/w/imagenet.npz")
        assert value(ev, "--inception-weights") == REAL["INCEPTION_WEIGHTS"]
        rec = flags_after(record, "add_row.py")
        assert value(rec, "--row") == row and ("--baseline" in rec) == (row == "original")
    accel = {"--tome", "--deepcache", "--dato"}
    assert "--plms" in sample["original"] and value(sample["original"], "--ddim_steps") == "50"
    assert not accel & set(sample["original"])
    assert "--plms" not in sample["ddim_few"] and value(sample["ddim_few"], "--ddim_steps") == "10"
    assert value(sample["tome"], "--tome_ratio") == "0.5" and not {"--deepcache", "--dato"} & set(sample["tome"])
    assert value(sample["deepcache"], "--cache_interval") == "3" and "--tome" not in sample["deepcache"]
    assert {"--deepcache", "--tome"} <= set(sample["deepcache_tome"])
    assert "--dato" in sample["dato_b1"] and value(sample["dato_b1"], "--strategy").endswith("configs/dato/b1.yaml")


def test_table3_dry_run_pairs_aligned_and_per_half_rows():
    rows, out = dry_run("table3_cfg_alignment.sh", RATIOS="0.3 0.7", **REAL)
    assert list(rows) == ["original", "dato_r0.3_aligned", "dato_r0.3_per_half", "dato_r0.7_aligned",
                          "dato_r0.7_per_half"]
    makes = [shlex.split(l[2:]) for l in out.splitlines() if "make_strategy.py" in l]
    assert [value(m, "--ratio") for m in makes] == ["0.3", "0.7"]
    assert all(value(m, "--base").endswith("configs/dato/b1.yaml") for m in makes)
    for r in ("0.3", "0.7"):
        aligned = flags_after(rows[f"dato_r{r}_aligned"][0], "sample_prompts.py")
        per_half = flags_after(rows[f"dato_r{r}_per_half"][0], "sample_prompts.py")
        assert value(aligned, "--strategy") == value(per_half, "--strategy") == \
            f"/data/out/table3_cfg_alignment/strategies/ratio-{r}.yaml"
        assert "--no_align_cfg" not in aligned and "--no_align_cfg" in per_half


def test_table4_dry_run_flags():
    rows, out = dry_run("table4_diffscore.sh", **REAL)
    args = {row: flags_after(cmds[0], "sample_prompts.py") for row, cmds in rows.items()}
    assert value(args["dato_features"], "--diff_source") == "features"
    assert value(args["dato_eps"], "--diff_source") == "eps"
    assert "--dato_parity" in args["dato_released"] and "--dato" not in args["original"]


def test_table5_dry_run_uses_img2img_and_the_last_steps_of_b1():
    rows, out = dry_run("table5_img2img.sh", **REAL)
    assert list(rows) == ["original", "tome", "deepcache", "deepcache_tome", "dato"]
    make = [shlex.split(l[2:]) for l in out.splitlines() if "make_strategy.py" in l]
    assert len(make) == 1 and value(make[0], "--last") == "37"  # int(0.75 * 50)
    for row, (gen, evaluate, _) in rows.items():
        args = flags_after(gen, "img2img_batch.py")
        assert value(args, "--init-dir") == "/w/init" and value(args, "--prompts") == "/w/p.txt"
        i2i = args[args.index("--") + 1:]
        assert value(i2i, "--strength") == "0.75" and value(i2i, "--ddim_steps") == "50"
        assert value(i2i, "--ckpt") == "/w/sd15.safetensors"
        ev = flags_after(evaluate, "eval_fid.py")
        assert value(ev, "--metrics") == "fid,clip,is" and value(ev, "--clip-weights") == "/w/clip.bin"
        assert value(ev, "--prompts") == "/w/p.txt" and value(ev, "--ref") == "/w/init"  # default I2I_REF
        assert "--prompts-cycle" not in ev
    dato = flags_after(rows["dato"][0], "img2img_batch.py")
    assert value(dato, "--strategy") == value(make[0], "--out")


def test_dry_run_without_settings_shows_placeholders():
    rows, out = dry_run("table1_imagenet_sd15.sh")
    assert "# dry run: OUT_DIR SD15_CKPT IMAGENET_REF INCEPTION_WEIGHTS not set" in out
    args = flags_after(rows["original"][0], "sample_prompts.py")
    assert value(args, "--ckpt") == "<SD15_CKPT>"


def test_missing_settings_are_all_reported_before_anything_runs(tmp_path):
    result = run_table("table1_imagenet_sd15.sh")
    assert result.returncode == 2 and result.stdout == ""
    for name in ("OUT_DIR is not set", "SD15_CKPT is not set", "IMAGENET_REF is not set",
                 "INCEPTION_WEIGHTS is not set", "--smoke"):
        assert name in result.stderr
    out = tmp_path / "out"
    result = run_table("table5_img2img.sh", OUT_DIR=str(out), SD15_CKPT=str(tmp_path / "nope.ckpt"))
    assert result.returncode == 2 and f"SD15_CKPT={tmp_path / 'nope.ckpt'} is not a file" in result.stderr
    assert "I2I_INIT_DIR is not set" in result.stderr and "CLIP_WEIGHTS is not set" in result.stderr
    assert not out.exists()
    result = run_table("table1_imagenet_sd15.sh", "--smoke", "--nproc", "zero")
    assert result.returncode == 2 and "--nproc must be a positive integer" in result.stderr


# --- helpers ---------------------------------------------------------------------------------------------

def test_add_row_replaces_rows_and_computes_speedups(tmp_path):
    add_row = load("add_row_script", TABLES / "add_row.py")

    def record(row, latency, fid, baseline=False):
        samples = tmp_path / row
        samples.mkdir(exist_ok=True)
        (samples / "manifest.json").write_text(json.dumps({"seconds_per_image": latency, "count": 10,
                                                           "method": row}))
        metrics = tmp_path / f"{row}.jsonl"
        metrics.write_text(json.dumps({"metric": "fid", "value": fid + 1}) + "\n" +
                           json.dumps({"metric": "fid", "value": fid}) + "\n")  # the last one counts
        argv = ["--table-dir", str(tmp_path / "t"), "--table", "t", "--title", "T", "--row", row, "--label",
                row.upper(), "--samples", str(samples), "--metrics-file", str(metrics)]
        assert add_row.main(argv + (["--baseline"] if baseline else [])) == 0

    record("original", 2.0, 10.0, baseline=True)
    record("fast", 0.5, 12.5)
    record("fast", 0.25, 11.0)  # re-run: replaces the row
    rows = read_rows(tmp_path / "t")
    assert [(r["row"], r["fid"], r["latency"]) for r in rows] == [("original", 10.0, 2.0), ("fast", 11.0, 0.25)]
    body = markdown_rows((tmp_path / "t" / "results.md").read_text())
    assert body == [["ORIGINAL", "10.00", "2.000", "1.00x", "10"], ["FAST", "11.00", "0.250", "8.00x", "10"]]
    assert add_row.main(["--table-dir", str(tmp_path / "t"), "--table", "t", "--title", "T", "--row", "x",
                         "--label", "X", "--samples", str(tmp_path / "none"), "--metrics-file",
                         str(tmp_path / "none.jsonl")]) == 2


def test_make_strategy_derivations(tmp_path):
    make = load("make_strategy_script", TABLES / "make_strategy.py")
    b1 = yaml.safe_load((REPO_ROOT / "configs" / "dato" / "b1.yaml").read_text())
    assert make.main(["--base", str(REPO_ROOT / "configs/dato/b1.yaml"), "--last", "37",
                      "--out", str(tmp_path / "l.yaml")]) == 0
    last = yaml.safe_load((tmp_path / "l.yaml").read_text())
    assert last["steps"] == 37 and last["cache_depth"] == b1["cache_depth"][-37:]
    assert last["prune_ratio"] == b1["prune_ratio"][-37:]
    assert make.main(["--base", str(REPO_ROOT / "configs/dato/b1.yaml"), "--ratio", "0.7",
                      "--out", str(tmp_path / "r.yaml")]) == 0
    ratio = yaml.safe_load((tmp_path / "r.yaml").read_text())
    assert ratio["prune_ratio"] == [0.7] * 50 and ratio["cache_depth"] == b1["cache_depth"]
    assert make.main(["--base", "smoke", "--steps", "5", "--ratio", "1.0", "--out", str(tmp_path / "x.yaml")]) == 2
    assert not (tmp_path / "x.yaml").exists()


def test_img2img_batch_checks_inputs_before_loading(tmp_path, capsys):
    batch = load("img2img_batch_script", TABLES / "img2img_batch.py")
    from PIL import Image

    init = tmp_path / "init"
    init.mkdir()
    for k in range(3):
        Image.new("RGB", (64, 64)).save(init / f"{k}.png")
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    code = batch.main(["--init-dir", str(init), "--prompts", str(prompts), "--outdir", str(tmp_path / "o"),
                       "--", "--demo", "--seed", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "3 init images but only 2 prompts" in err and "--seed: set by this script" in err
    assert not (tmp_path / "o").exists()
