"""Prompt sets: the shipped files, read_prompts, the COCO builder and its CLI, image <-> prompt pairing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdeval.prompts import build_coco_prompts, normalize_caption, prompts_for_images
from sdgen.prompts import read_prompts

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


# --- shipped prompt sets (numbers from data/README.md) ---

def test_imagenet_prompts_are_the_1000_classes_in_order():
    prompts = read_prompts(DATA / "imagenet-class-prompts.txt")
    assert len(prompts) == 1000
    assert prompts[0] == "tench, Tinca tinca"
    assert prompts[207] == "golden retriever"
    assert prompts[999] == "toilet tissue, toilet paper, bathroom tissue"
    assert all(p == p.strip() and p for p in prompts)


def test_coco30k_prompts_have_30000_lines():
    prompts = read_prompts(DATA / "coco30k-prompts.txt")
    assert len(prompts) == 30000
    assert len(set(prompts)) == 29754
    assert all("\n" not in p and "\r" not in p and p.strip() for p in prompts)


# --- read_prompts ---

def test_read_prompts_strips_only_line_terminators(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"a cat \r\n  two  spaces\nlast line")
    assert read_prompts(f) == ["a cat ", "  two  spaces", "last line"]
    f.write_text("one\ntwo\n", encoding="utf-8")
    assert read_prompts(f) == ["one", "two"]  # a final newline adds no prompt


def test_read_prompts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_prompts(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_prompts(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text("a\n\nb\n")
    with pytest.raises(ValueError, match="line 2 is blank"):
        read_prompts(blank)


# --- pairing images with prompts ---

def test_prompts_for_images_uses_the_index_in_the_file_name():
    prompts = ["p0", "p1", "p2"]
    paths = [Path("x/2.png"), Path("x/00000.png"), Path("x/img_1.jpg")]
    assert prompts_for_images(paths, prompts) == ["p2", "p0", "p1"]
    with pytest.raises(ValueError, match="--prompts-cycle"):
        prompts_for_images([Path("00003.png")], prompts)
    assert prompts_for_images([Path("00003.png"), Path("00005.png")], prompts, cycle=True) == ["p0", "p2"]
    with pytest.raises(ValueError, match="integer index"):
        prompts_for_images([Path("cat.png")], prompts)
    with pytest.raises(ValueError, match="both have index 1"):
        prompts_for_images([Path("1.png"), Path("001.jpg")], prompts)


# --- COCO builder ---

def _write_captions(path, n_images=12, seed=123):
    """A COCO-style captions file: image i has 1..4 captions 'img{i} cap{j}', with stray whitespace."""
    rng = np.random.default_rng(seed)
    anns, ann_id = [], 1000
    for i in range(n_images):
        image_id = 500 + 7 * i
        for j in range(int(rng.integers(1, 5))):
            anns.append({"image_id": image_id, "id": ann_id, "caption": f"  img{image_id}\n cap{j}\t. "})
            ann_id += 1
    anns.append({"image_id": 9999, "id": 1, "caption": " \n "})  # empty after normalisation: dropped
    rng.shuffle(anns)  # the rule must not depend on the file's order
    images = [{"id": 500 + 7 * i, "file_name": f"{i}.jpg"} for i in range(n_images)]
    path.write_text(json.dumps({"images": images, "annotations": anns}), encoding="utf-8")
    return anns


def test_build_coco_prompts_one_caption_per_distinct_image(tmp_path):
    f = tmp_path / "captions.json"
    anns = _write_captions(f)
    prompts = build_coco_prompts(f, n=8, seed=0)
    assert len(prompts) == 8
    image_of = {}
    for a in anns:
        c = normalize_caption(a["caption"])
        if c:
            image_of[c] = a["image_id"]
    assert all(p in image_of for p in prompts)  # every prompt is a (normalised) caption ...
    assert len({image_of[p] for p in prompts}) == 8  # ... of a different image
    assert all("  " not in p and "\n" not in p and "\t" not in p and p == p.strip() for p in prompts)


def test_build_coco_prompts_follows_the_documented_rule(tmp_path):
    f = tmp_path / "captions.json"
    anns = _write_captions(f)
    by_image = {}
    for a in sorted(anns, key=lambda a: a["id"]):
        c = normalize_caption(a["caption"])
        if c:
            by_image.setdefault(a["image_id"], []).append(c)
    ids = sorted(by_image)
    rng = np.random.default_rng(5)
    chosen = [ids[k] for k in rng.permutation(len(ids))[:6]]
    expected = [by_image[i][int(rng.integers(len(by_image[i])))] for i in chosen]
    assert build_coco_prompts(f, n=6, seed=5) == expected


def test_build_coco_prompts_is_seeded(tmp_path):
    f = tmp_path / "captions.json"
    _write_captions(f)
    assert build_coco_prompts(f, n=8, seed=0) == build_coco_prompts(f, n=8, seed=0)
    assert build_coco_prompts(f, n=8, seed=0) != build_coco_prompts(f, n=8, seed=1)
    assert len(build_coco_prompts(f, n=12, seed=3)) == 12  # every captioned image once
    with pytest.raises(ValueError, match="n=13 exceeds the 12"):
        build_coco_prompts(f, n=13, seed=0)


def test_make_coco_prompts_cli_refuses_to_overwrite(tmp_path):
    f = tmp_path / "captions.json"
    _write_captions(f)
    out = tmp_path / "coco-custom.txt"
    cmd = [sys.executable, str(REPO / "scripts" / "make_coco_prompts.py"),
           "--captions", str(f), "--n", "5", "--seed", "0", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "sd1"))
    first = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert read_prompts(out) == build_coco_prompts(f, n=5, seed=0)

    out.write_text("keep me\n")
    second = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert second.returncode != 0
    assert "already exists" in second.stderr and "--force" in second.stderr
    assert out.read_text() == "keep me\n"

    from sdeval import make_coco_prompts as script

    script.main(["--captions", str(f), "--n", "5", "--seed", "0", "--out", str(out), "--force"])
    assert read_prompts(out) == build_coco_prompts(f, n=5, seed=0)
    with pytest.raises(SystemExit, match="exceeds"):
        script.main(["--captions", str(f), "--n", "50", "--seed", "0", "--out", str(tmp_path / "x.txt")])
    assert not (tmp_path / "x.txt").exists()


def test_make_coco_prompts_null_caption_is_one_clear_error(tmp_path, capsys):
    """A caption that is not a string (null) is named in one error line, and nothing is written."""
    from sdeval import make_coco_prompts as script

    f = tmp_path / "captions.json"
    anns = _write_captions(f)
    anns[3]["caption"] = None
    f.write_text(json.dumps({"annotations": anns}), encoding="utf-8")
    out = tmp_path / "prompts.txt"
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--captions", str(f), "--n", "5", "--out", str(out)])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert f"annotation {anns[3]['id']} has caption None, expected a string" in message
    assert not out.exists()
