"""The code examples of README.md and docs/ run (issue 23): a documented demo command that fails fails this test.

Marking convention: the line right before a fenced block (blank lines allowed in between) is an HTML comment that
says what the block needs; it does not show on a rendered page, so the text around a block that is not run says
in words what it needs (a checkpoint, a GPU, data).

    <!-- example: runs -->              run by this test; needs nothing but the checkout (the tiny random-weight
                                        models, the shapes world, the package's files)
    <!-- example: runs, shapes -->      the same, and needs the shipped shapes model (plain `--demo`): skipped, with
                                        the reason, while models/shapes/shapes-demo.safetensors is missing, and a
                                        failure like any other once it is there
    <!-- example: slow -->              run by this test under the `slow` marker (about 30 s or more on 2 busy cores;
    <!-- example: slow, shapes -->      `pytest -m "not slow"` leaves it out; CI runs the whole suite)
    <!-- example: needs checkpoint -->  not run: needs real Stable Diffusion weights
    <!-- example: needs GPU -->         not run: needs a CUDA GPU
    <!-- example: needs data -->        not run: needs image sets or metric weights that are not shipped
    <!-- example: skip: REASON -->      not run, for the reason given (e.g. the command runs this test suite)

Every ```bash, ```sh, ```shell, ```console and ```python block of README.md and docs/**/*.md must carry a
marker (test_every_block_is_marked); other blocks (yaml, plain text) are not run.

How a block runs: in a fresh temporary folder as the working directory, holding links to the checkout's
scripts/, configs/ and data/ (the paths the commands name, as from a checkout), nothing else; so `outputs/...`
starts empty. A shell block runs as one `bash -e -o pipefail` script after dropping every `pip install ...`
command from its `&&` chains (the test runs in the installed environment; the rest of such a line runs). A
python block runs as a script file. `python` is this interpreter, PYTHONPATH starts with the checkout's sd1/,
and torch uses one CPU thread (OMP_NUM_THREADS=1: on shared busy cores, more threads are many times slower
for these tiny models). The commands run as written, at the demo models' own sizes: the docs write demo
commands small (e.g. `--n_samples 1 --n_iter 1`); their step counts are not shrunk, because a DaTo strategy
fixes its step count (b1: 50), and a demo model's step takes tens of milliseconds. Measured 2026-12-06 on the
2-core development machine while a training run kept both cores busy: `pytest tests/test_docs_examples.py -m "not
slow"` took 2 min 49 s, most of it starting Python and loading models.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAPES_WEIGHTS = REPO / "models" / "shapes" / "shapes-demo.safetensors"
RUN_LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "console": "bash", "python": "python", "py": "python"}
RUN_KINDS = ("runs", "slow")
SKIP_KINDS = {"needs checkpoint": "needs a real Stable Diffusion checkpoint",
              "needs gpu": "needs a CUDA GPU",
              "needs data": "needs image sets or metric weights that are not shipped"}
MARKER = re.compile(r"^\s*<!--\s*example:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
PIP_INSTALL = re.compile(r"^(python3?\s+-m\s+)?pip3?\s+install\b")
LINKED = ("scripts", "configs", "data")
TIMEOUT_S = 900


@dataclass(frozen=True)
class Example:
    """One fenced block: where it is, its language ('bash', 'python' or the fence's word), its code, and its
    marker: kind ('runs', 'slow', 'skip', 'unmarked'), whether it needs the shapes weights, why it is skipped."""

    source: str
    line: int
    lang: str
    code: str
    kind: str
    shapes: bool = False
    reason: str = ""

    @property
    def runnable_lang(self) -> bool:
        return self.lang in ("bash", "python")

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line}"


def parse_marker(text: str) -> Tuple[str, bool, str]:
    """The text of an `<!-- example: ... -->` comment -> (kind, needs the shapes weights, skip reason).
    ValueError for anything else, so a mistyped marker fails instead of skipping its block."""
    if text.lower().startswith("skip:"):
        reason = text[5:].strip()
        if not reason:
            raise ValueError("'skip:' needs a reason")
        return "skip", False, reason
    if text.lower() in SKIP_KINDS:
        return "skip", False, SKIP_KINDS[text.lower()]
    words = [w.strip() for w in text.split(",")]
    if words[0] in RUN_KINDS and all(w == "shapes" for w in words[1:]) and len(words) <= 2:
        return words[0], len(words) == 2, ""
    raise ValueError(f"unknown example marker {text!r}: use runs, slow (each optionally ', shapes'), "
                     f"{', '.join(SKIP_KINDS)} or 'skip: REASON'")


def extract_examples(text: str, source: str = "<text>") -> List[Example]:
    """Every fenced block of a markdown text with its marker. Blocks of a language this test runs carry kind
    'unmarked' when no marker precedes them; a marker that no fence follows is a ValueError."""
    lines = text.splitlines()
    examples: List[Example] = []
    pending: Optional[Tuple[int, str]] = None  # (line, marker text) waiting for its fence
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER.match(line)
        if marker:
            if pending is not None:
                raise ValueError(f"{source}:{pending[0]}: example marker not followed by a code block")
            pending = (i + 1, marker.group(1))
            i += 1
            continue
        fence = FENCE.match(line)
        if not fence:
            if line.strip() and pending is not None:
                raise ValueError(f"{source}:{pending[0]}: example marker not followed by a code block")
            i += 1
            continue
        indent, ticks, word = fence.groups()
        start = i + 1
        body: List[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(ticks):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        lang = RUN_LANGS.get(word.lower(), word.lower())
        if pending is not None:
            kind, shapes, reason = parse_marker(pending[1])
        else:
            kind, shapes, reason = ("unmarked", False, "")
        examples.append(Example(source, start, lang, "\n".join(body) + "\n", kind, shapes, reason))
        pending = None
    if pending is not None:
        raise ValueError(f"{source}:{pending[0]}: example marker not followed by a code block")
    return examples


def drop_pip_installs(code: str) -> str:
    """A shell block without its `pip install ...` commands: each logical line (backslash continuations joined)
    is split at ' && ', its pip-install parts dropped and the rest put one per line (so that `bash -e` stops at
    any of them that fails: it does not stop inside an && list); a line left empty goes."""
    logical: List[str] = []
    for raw in code.splitlines():
        if logical and logical[-1].endswith("\\"):
            logical[-1] = logical[-1][:-1].rstrip() + " " + raw.strip()
        else:
            logical.append(raw)
    out = []
    for line in logical:
        parts = [p for p in line.split(" && ") if not PIP_INSTALL.match(p.strip())]
        out.extend(p.strip() for p in parts if p.strip())
    return "\n".join(out) + "\n"


def example_env(bin_dir: Path) -> dict:
    """The environment of a block: this interpreter as `python`, the checkout's sd1/ first on PYTHONPATH,
    one torch thread."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3"):
        link = bin_dir / name
        if not link.exists():
            link.symlink_to(sys.executable)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "sd1"), env.get("PYTHONPATH")) if p)
    env["PYTHON"] = sys.executable
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    return env


def run_example(example: Example, workdir: Path, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a block in `workdir` (links to the checkout's scripts/, configs/, data/ are made there); raise
    AssertionError with the output's tail when it exits non-zero."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if not (workdir / name).exists():
            (workdir / name).symlink_to(REPO / name)
    env = example_env(workdir / ".example-bin")
    if example.lang == "python":
        script = workdir / ".example.py"
        script.write_text(example.code)
        cmd = [sys.executable, str(script)]
    elif example.lang == "bash":
        script = workdir / ".example.sh"
        script.write_text(drop_pip_installs(example.code))
        cmd = ["bash", "-e", "-o", "pipefail", str(script)]
    else:
        raise ValueError(f"{example.id}: a {example.lang!r} block is not run")
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise AssertionError(f"{example.id}: the documented example exited {proc.returncode}:\n"
                             f"{script.read_text()}\n--- output (tail) ---\n{tail}")
    return proc


def doc_files() -> List[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def all_examples() -> List[Example]:
    return [e for path in doc_files()
            for e in extract_examples(path.read_text(), str(path.relative_to(REPO)))]


def _params():
    params = []
    for e in all_examples():
        if not e.runnable_lang or e.kind not in RUN_KINDS:
            continue
        marks = [pytest.mark.slow] if e.kind == "slow" else []
        params.append(pytest.param(e, id=e.id, marks=marks))
    return params


@pytest.mark.parametrize("example", _params())
def test_documented_example_runs(example: Example, tmp_path):
    if example.shapes and not SHAPES_WEIGHTS.is_file():
        pytest.skip(f"needs the shapes model's weights, {SHAPES_WEIGHTS.relative_to(REPO)} (not in this checkout; "
                    f"scripts/train_shapes.py makes them)")
    run_example(example, tmp_path / "work")


def test_every_block_is_marked():
    unmarked = [e.id for e in all_examples() if e.runnable_lang and e.kind == "unmarked"]
    assert not unmarked, ("code blocks without an '<!-- example: ... -->' marker (see tests/test_docs_examples.py): "
                          + ", ".join(unmarked))


def test_there_are_examples_to_run():
    runnable = [e for e in all_examples() if e.runnable_lang and e.kind in RUN_KINDS]
    assert any(e.source == "README.md" and e.lang == "python" for e in runnable), "the README's Python snippet"
    assert any(e.source == "README.md" and e.lang == "bash" for e in runnable)


def test_readme_length():
    assert len((REPO / "README.md").read_text()) <= 16000, "README.md is limited to 16,000 characters (issue 23)"


def without_comments(text: str) -> str:
    """`text` with its HTML comments blanked out, line numbers kept (a placeholder's commented-out image)."""
    return re.sub(r"<!--.*?-->", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)


def heading_anchors(path: Path) -> set:
    """The anchors GitHub gives the headings of a markdown file (lower case, punctuation dropped, spaces to '-')."""
    anchors, in_code = set(), False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return anchors


def test_relative_links_resolve():
    """Every relative link and image of README.md and docs/ (outside code and HTML comments) names a file or
    folder of the checkout, and a '#anchor' into a markdown file names one of its headings."""
    link = re.compile(r"\]\(([^)\s]+)\)")
    broken = []
    for path in doc_files():
        in_code = False
        for n, line in enumerate(without_comments(path.read_text()).splitlines(), 1):
            if FENCE.match(line):
                in_code = not in_code
            if in_code:
                continue
            for target in link.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue
                file, _, anchor = target.partition("#")
                dest = path.parent / file if file else path
                if not dest.exists():
                    broken.append(f"{path.relative_to(REPO)}:{n}: {target}")
                elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest):
                    broken.append(f"{path.relative_to(REPO)}:{n}: {target} (no such heading)")
    assert not broken, "broken links: " + ", ".join(broken)


# ---- the extractor and runner themselves, on small inputs (so this test can fail) ----

SAMPLE = """# Title

<!-- example: runs -->
```bash
pip install torch==2.14.1 && pip install -e . && python scripts/txt2img.py --demo \\
    --n_iter 1
echo done
```

<!-- example: needs checkpoint -->

```python
model = load("v1-5.safetensors")
```

```yaml
steps: 50
```

```sh
echo unmarked
```

<!-- example: slow, shapes -->
~~~bash
python scripts/search_depth.py --demo
~~~
"""


def test_extractor_on_a_small_text():
    examples = extract_examples(SAMPLE, "sample.md")
    assert [(e.line, e.lang, e.kind, e.shapes) for e in examples] == [
        (4, "bash", "runs", False), (12, "python", "skip", False), (16, "yaml", "unmarked", False),
        (20, "bash", "unmarked", False), (25, "bash", "slow", True)]
    assert examples[0].code.startswith("pip install torch==2.14.1 && ")
    assert examples[1].reason == SKIP_KINDS["needs checkpoint"]
    assert examples[4].code == "python scripts/search_depth.py --demo\n"
    assert drop_pip_installs(examples[0].code) == "python scripts/txt2img.py --demo --n_iter 1\necho done\n"
    assert drop_pip_installs("pip install -e '.[test]'\npython -m pip install x && ls\n") == "ls\n"
    assert drop_pip_installs("mkdir -p out && ls out  # note\n") == "mkdir -p out\nls out  # note\n"


@pytest.mark.parametrize("text", ["<!-- example: run -->\n```bash\nls\n```\n",
                                  "<!-- example: runs, gpu -->\n```bash\nls\n```\n",
                                  "<!-- example: skip: -->\n```bash\nls\n```\n",
                                  "<!-- example: runs -->\nSome text.\n```bash\nls\n```\n",
                                  "<!-- example: runs -->\n"])
def test_extractor_refuses_bad_markers(text):
    with pytest.raises(ValueError):
        extract_examples(text)


def test_a_failing_example_fails(tmp_path):
    ok = Example("t.md", 1, "bash", "test -d scripts && test -d configs\npython -c 'import sdgen'\n", "runs")
    run_example(ok, tmp_path / "ok")
    bad = Example("t.md", 2, "bash", "echo before\nfalse\necho after\n", "runs")
    with pytest.raises(AssertionError, match="exited 1"):
        run_example(bad, tmp_path / "bad")
    pipe = Example("t.md", 3, "bash", "false | cat\n", "runs")
    with pytest.raises(AssertionError):
        run_example(pipe, tmp_path / "pipe")
    chain = Example("t.md", 3, "bash", "false && echo never\necho after\n", "runs")
    with pytest.raises(AssertionError):
        run_example(chain, tmp_path / "chain")
    py = Example("t.md", 4, "python", "raise SystemExit(3)\n", "runs")
    with pytest.raises(AssertionError, match="exited 3"):
        run_example(py, tmp_path / "py")
