"""The supported diffusers range: an unsupported version is refused in one line before anything is patched, the
extras pin that range, and the diffusers tests pass under its oldest minor as well as under the newest (the one
installed, which the rest of the suite runs)."""
import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest

from conftest import REPO_ROOT
from datosd.diffusers_version import (DIFFUSERS_REQUIREMENT, NEWEST_DIFFUSERS, OLDEST_DIFFUSERS,
                                      check_diffusers_version, diffusers_minor)

# The oldest supported diffusers with the transformers / huggingface_hub of its time, made by this script.
PREPARE = ".ci/prepare_diffusers_oldest.sh"
OLDEST_DIR = REPO_ROOT / ".ci" / "diffusers-oldest"
DIFFUSERS_TESTS = ["tests/test_diffusers_patch.py", "tests/test_diffusers_bench.py"]


def setup_extras():
    """setup.py's extras_require, read without running setup.py."""
    tree = ast.parse((REPO_ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no extras_require")


@pytest.mark.parametrize("version", ["0.27.0", "0.27.2", "0.35.2", "0.42.1", "0.42.0.dev0"])
def test_supported_versions_pass(version):
    check_diffusers_version(version)


@pytest.mark.parametrize("version", ["0.26.3", "0.9.0", "0.43.0", "0.43.0.dev0", "1.0.0", "unknown"])
def test_unsupported_versions_are_refused_in_one_line(version):
    with pytest.raises(ImportError) as refused:
        check_diffusers_version(version)
    message = str(refused.value)
    assert "\n" not in message
    assert f"found diffusers {version}:" in message
    assert "supports diffusers 0.27 to 0.42.x" in message
    assert message.endswith("pip install 'diffusers>=0.27,<0.43'")


def test_minor_parsing():
    assert diffusers_minor("0.42.1") == (0, 42)
    assert diffusers_minor("0.100.0rc1") == (0, 100)
    assert diffusers_minor("dev") is None


def test_the_extras_pin_the_supported_range():
    extras = setup_extras()
    assert DIFFUSERS_REQUIREMENT == "diffusers>=0.27,<0.43"
    assert DIFFUSERS_REQUIREMENT in extras["diffusers"]
    newest = f"diffusers>={NEWEST_DIFFUSERS[0]}.{NEWEST_DIFFUSERS[1]},<{NEWEST_DIFFUSERS[0]}.{NEWEST_DIFFUSERS[1] + 1}"
    assert newest in extras["test"]  # the suite itself runs the newest minor
    assert OLDEST_DIFFUSERS < NEWEST_DIFFUSERS


def test_apply_patch_refuses_an_unsupported_diffusers_before_patching(monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    import datosd
    from datosd import Strategy
    from diffusers_pipelines import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    installed = diffusers.__version__
    scheduler_attributes = set(vars(pipe.scheduler))
    monkeypatch.setattr(diffusers, "__version__", "0.26.3")
    with pytest.raises(ImportError, match=r"found diffusers 0\.26\.3: pip install 'diffusers>=0\.27,<0\.43'$"):
        datosd.apply_patch(pipe, Strategy.full(4))
    with pytest.raises(ImportError, match="found diffusers 0.26.3"):
        datosd.apply_patch(pipe.unet, prune_ratio=0.5)
    assert type(pipe.unet) is diffusers.UNet2DConditionModel
    assert not any(hasattr(module, "_dato") for module in pipe.unet.modules())
    assert set(vars(pipe.scheduler)) == scheduler_attributes  # set_timesteps / step not wrapped
    monkeypatch.setattr(diffusers, "__version__", installed)
    state = datosd.apply_patch(pipe, Strategy.full(4))
    assert pipe.unet._dato is state
    datosd.remove_patch(pipe)


def oldest_environment():
    """The environment of a Python that imports the prepared oldest diffusers stack and this checkout's code."""
    if not (OLDEST_DIR / "diffusers").is_dir():
        pytest.skip(f"the oldest supported diffusers is not prepared: run {PREPARE} (it installs it from PyPI into "
                    f"{OLDEST_DIR.relative_to(REPO_ROOT)}; .ci/run does)")
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(OLDEST_DIR), str(REPO_ROOT / "sd1"), *inherited]))


def test_the_diffusers_tests_pass_under_the_oldest_supported_diffusers(tmp_path):
    env = oldest_environment()
    probe = subprocess.run([sys.executable, "-c", "import diffusers, transformers; "
                            "print(diffusers.__version__, diffusers.__file__, transformers.__version__)"],
                           env=env, capture_output=True, text=True, check=True)
    version, location, transformers_version = probe.stdout.split()
    assert diffusers_minor(version) == OLDEST_DIFFUSERS and location.startswith(str(OLDEST_DIR))
    assert transformers_version.startswith("4.")
    report = tmp_path / "junit.xml"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", f"--junitxml={report}", *DIFFUSERS_TESTS],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"under diffusers {version}:\n{run.stdout[-4000:]}{run.stderr[-2000:]}"
    suites = list(ElementTree.parse(report).getroot().iter("testsuite"))
    counts = {key: sum(int(suite.get(key)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] >= 20 and counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts
