"""The method registry as a table of kinds (sdgen.methods): a kind defined here runs through every front end
once it is registered; every pair of kinds either works together (the effect of each is seen in the combined
run, and removing them restores the model) or is refused, with the same message by name and by flags."""
import itertools
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from datosd.utils import any_unet
from helpers import TINY_DEMO, golden_model
from ldm.models.diffusion.hooks import SamplingHook
from sdgen import generate as gen
from sdgen.benchmark import bench_entries, result_rows
from sdgen.cli import txt2img
from sdgen.cli.flags import method_from_args
from sdgen.costs import CostTable
from sdgen.methods import REGISTRY, Flag, MethodError, MethodKind, Patch, parse_method
from sdgen.settings import RunSettings

class HookPatch(Patch):
    def __init__(self, handle):
        self.handle = handle

    def remove(self):
        self.handle.remove()


@dataclass(frozen=True)
class UNetScale(MethodKind):
    """A kind defined in this test, nowhere else: every UNet output times `factor` (a forward hook)."""

    factor: float

    key = "unetscale"
    grammar = "unetscale-<f>"
    about = "every UNet output times f"
    order = 50
    title = "UNet output scaling"
    flags = (Flag("--unet_scale", dict(type=float, default=None, help="multiply every UNet output by this")),)
    switch = "unet_scale"
    pattern = re.compile(r"unetscale-(\d*\.?\d+)")

    @classmethod
    def from_match(cls, match, token):
        return cls(float(match.group(1)))

    @classmethod
    def from_flags(cls, values):
        return cls(values["unet_scale"])

    @property
    def name(self):
        return f"unetscale-{self.factor:g}"

    @property
    def label(self):
        return f"UNet output x {self.factor:g}"

    def apply(self, model, steps, seed):
        return HookPatch(any_unet(model).register_forward_hook(lambda module, args, out: out * self.factor))


WITH_SCALE = REGISTRY.with_kind(UNetScale)  # the one registration


def test_a_kind_defined_here_parses_once_registered():
    with pytest.raises(MethodError, match="unknown method 'unetscale-0.5'"):
        parse_method("unetscale-0.5")
    method = parse_method("unetscale-0.50+deepcache-n3", WITH_SCALE)
    assert method.name == "deepcache-n3+unetscale-0.5"  # its order puts it last
    assert method.label == "DeepCache N=3 depth 1 + UNet output x 0.5"
    assert parse_method(method.name, WITH_SCALE).name == method.name
    assert method.call_counts(10, "ddim") == {"full": 4, "partial": 6, "reused": 0}
    with pytest.raises(MethodError, match="at most one unetscale-<f>"):
        parse_method("unetscale-0.5+unetscale-2", WITH_SCALE)
    with pytest.raises(MethodError, match="'original' does not combine with other methods"):
        parse_method("original+unetscale-2", WITH_SCALE)
    assert "unetscale-<f>: every UNet output times f" in WITH_SCALE.grammar()


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image), image.text["method"]


def test_a_registered_kind_has_its_flag_in_txt2img(tmp_path, capsys):
    args = [*TINY_DEMO, "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "3", "--H", "64", "--W", "64",
            "--precision", "full", "--skip_grid", "--seed", "5"]
    assert txt2img.main([*args, "--outdir", str(tmp_path / "plain")], registry=WITH_SCALE) == 0
    assert txt2img.main([*args, "--unet_scale", "0.5", "--outdir", str(tmp_path / "scaled")],
                        registry=WITH_SCALE) == 0
    assert "method: unetscale-0.5 = UNet output x 0.5" in capsys.readouterr().out
    plain, plain_method = pixels(tmp_path / "plain/samples/00000.png")
    scaled, scaled_method = pixels(tmp_path / "scaled/samples/00000.png")
    assert (plain_method, scaled_method) == ("original", "unetscale-0.5")
    assert not (plain == scaled).all()
    options = txt2img.build_parser(WITH_SCALE).parse_args(["--unet_scale", "2", "--deepcache"])
    assert method_from_args(options).name == "deepcache-n3+unetscale-2"
    with pytest.raises(SystemExit):  # the built-in registry has no such flag
        txt2img.build_parser().parse_args(["--unet_scale", "2"])


def test_a_registered_kind_goes_through_the_benchmark_row_builder():
    entries = bench_entries(["unetscale-0.5", "deepcache-n3+unetscale-2"], RunSettings(sampler="plms", steps=5),
                            registry=WITH_SCALE)
    assert [e.name for e in entries] == ["original", "unetscale-0.5", "deepcache-n3+unetscale-2"]
    assert [e.planned_calls() for e in entries] == [{"full": 6, "partial": 0, "reused": 0}] * 2 + [
        {"full": 3, "partial": 3, "reused": 0}]  # PLMS calls step 0 twice; N=3: steps 0 and 3 full
    table = CostTable(key={}, seconds={"d12_r0.00": 2.0, "d1_r0.00": 0.5}, macs={"d12_r0.00": 100, "d1_r0.00": 10})
    for entry, seconds in zip(entries, (12.0, 12.0, 6.0)):
        entry.seconds = [seconds]
    rows = result_rows(entries, {None: table}, batch=1)
    assert [r["label"] for r in rows] == ["original (no acceleration)", "UNet output x 0.5",
                                          "DeepCache N=3 depth 1 + UNet output x 2"]
    assert [r["predicted_s"] for r in rows] == [12.0, 12.0, 3 * 2.0 + 3 * 0.5]
    assert [r["speedup"] for r in rows] == [1.0, 1.0, 2.0]
    assert rows[2]["ideal_speedup"] == pytest.approx(600 / 330)


# --- every pair of kinds ------------------------------------------------------------------------------------------
REFUSED = {
    ("dato", "deepcache"): "DaTo and DeepCache both patch the UNet forward; use one of them",
    ("dato", "tome"): "DaTo and ToMeSD do not combine: tomesd's transformer block forward replaces the one DaTo "
                      "prunes in, so DaTo's pruning would be lost; use one of them",
    ("textprune", "tgate"): "prompt-token pruning and T-GATE both replace the cross-attention; use one of them",
}
KINDS = [kind.key for kind in REGISTRY.kinds]
PAIRS = list(itertools.combinations(KINDS, 2))
STEPS = 5  # asked of every run (ddim4 runs 4)


def refusal(a, b):
    """The reason the registry must give for a pair (None: the pair must work)."""
    if "original" in (a, b):
        return "'original' does not combine with other methods"
    if "deepcache-helper" in (a, b):
        return "DeepCache's own helper wraps the forwards of the UNet and its blocks; time it alone"
    return REFUSED.get(tuple(sorted((a, b))))


def sample_name(kind, steps):
    """A name of each kind for a run of `steps` DDIM steps."""
    return {"original": "original", "ddim": "ddim4", "tome": "tome-0.5", "deepcache": "deepcache-n2",
            "dato": "dato@every13" if steps == 4 else "dato@every10", "textprune": "textprune-0.25-k10",
            "tgate": "tgate-2", "deepcache-helper": "deepcache-helper-n2"}[kind]


FLAGS = {"tome": ["--tome"], "deepcache": ["--deepcache", "--cache_interval", "2"], "dato": ["--dato"],
         "textprune": ["--prune_text", "--text_keep", "10", "--text_warmup", "0.25"], "tgate": ["--tgate_step", "2"]}
FLAG_NAMES = {"tome": "tome-0.5", "deepcache": "deepcache-n2", "dato": "dato", "textprune": "textprune-0.25-k10",
              "tgate": "tgate-2"}


@pytest.mark.parametrize("a,b", PAIRS)
def test_every_pair_is_refused_alike_by_names_and_flags_or_combines(a, b):
    reason = refusal(a, b)
    names = [sample_name(a, STEPS), sample_name(b, STEPS)]
    if reason is not None:
        for order in (names, names[::-1]):
            with pytest.raises(MethodError) as refused:
                parse_method("+".join(order))
            assert str(refused.value) == f"{'+'.join(order)}: {reason}"
    else:
        method = parse_method("+".join(names))
        assert sorted(c.key for c in method.components) == sorted((a, b))
    if a in FLAGS and b in FLAGS:
        options = txt2img.build_parser().parse_args([*FLAGS[a], *FLAGS[b]])
        by_name = "+".join(c.name for c in sorted((REGISTRY.component(FLAG_NAMES[k]) for k in (a, b)),
                                                  key=lambda c: c.order))
        if reason is None:
            assert method_from_args(options).name == parse_method(by_name).name
        else:
            with pytest.raises(ValueError) as by_flags:
                method_from_args(options)
            with pytest.raises(MethodError) as by_names:
                parse_method(by_name)
            assert str(by_flags.value) == str(by_names.value) == f"{by_name}: {reason}"


class Observer(SamplingHook):
    """What one run did: its sampler steps, the token count of every self-attention call, the step of every
    cross-attention key projection (hooks on the module instances, which every patch keeps)."""

    def __init__(self, model):
        self.step, self.steps, self.attn1_tokens, self.to_k_steps = None, [], [], []
        blocks = [m for m in model.modules() if any(c.__name__ == "BasicTransformerBlock" for c in type(m).__mro__)]
        self.handles = [b.attn1.register_forward_pre_hook(self._attn1, with_kwargs=True) for b in blocks]
        self.handles += [b.attn2.to_k.register_forward_hook(lambda *a: self.to_k_steps.append(self.step))
                         for b in blocks]

    def _attn1(self, module, args, kwargs):
        self.attn1_tokens.append(args[0].shape[1])

    def step_started(self, step):
        self.step = step
        self.steps.append(step)

    def close(self):
        for handle in self.handles:
            handle.remove()


LEVEL_TOKENS = {16 * 16, 8 * 8, 4 * 4, 2 * 2}  # the golden UNet's attention levels at a 16 x 16 latent


def evidence(kind, run, observer, applied, model):
    """Whether the effect of `kind` shows in the run (the planned steps are `run`'s)."""
    method = applied.method
    if kind == "ddim":
        return observer.steps == list(range(4))  # DDIM 4 although 5 steps were asked
    if kind == "tome":  # some self-attention ran on fewer tokens than its level has
        return any(n not in LEVEL_TOKENS for n in observer.attn1_tokens)
    if kind in ("deepcache", "dato"):
        # Every call ran at its planned depth, or in full where the cache was refilled (T-GATE's halved CFG batch
        # changes the call's shape); some ran partial; DaTo's self-attention ran on fewer tokens.
        plan = method.call_plan(run.sampler_steps, run.sampler)
        depths = [call.depth for call in applied.dato_state.calls]
        cached = (len(depths) == len(plan) and all(d in (p, 12) for d, (p, _) in zip(depths, plan))
                  and applied.call_counts()["partial"] > 0)
        return cached and (kind == "deepcache" or any(n not in LEVEL_TOKENS for n in observer.attn1_tokens))
    if kind == "textprune":
        kept = [counts for _, counts in model.model.diffusion_model._text_prune.kept_counts() if counts is not None]
        return bool(kept) and all(counts == [10] * 4 for counts in kept)  # 4 rows: the CFG batch of 2 prompts
    if kind == "tgate":
        return bool(observer.to_k_steps) and max(observer.to_k_steps) < 2  # no key projection from the gate on
    raise AssertionError(kind)


PROMPTS = ["a red fox", "a blue bird"]


@pytest.fixture(scope="module")
def golden():
    model = golden_model()
    cond = gen.encode_prompts(model, PROMPTS, scale=7.5)
    x_T = gen.start_noise([0, 1], (4, 16, 16))
    plain = gen.sample_latents(model, cond, x_T, sampler="ddim", steps=STEPS, seed=0).latents
    return model, cond, x_T, plain


@pytest.mark.parametrize("a,b", [pair for pair in PAIRS if refusal(*pair) is None])
def test_every_pair_that_combines_shows_both_effects_and_is_removed(golden, a, b):
    model, cond, x_T, plain = golden
    steps = 4 if "ddim" in (a, b) else STEPS
    method = parse_method(f"{sample_name(a, steps)}+{sample_name(b, steps)}")
    run = RunSettings(sampler="ddim", steps=STEPS, height=128, width=128, batch=2).for_method(method)
    observer = Observer(model)
    model.sampling_hooks.add(observer)
    try:
        with method.apply(model, run.sampler_steps, seed=0) as applied:
            patched_cond = gen.encode_prompts(model, PROMPTS, scale=7.5)  # text pruning reads the prompts' tokens
            gen.sample_latents(model, patched_cond, x_T, sampler=run.sampler, steps=run.steps, seed=0, method=applied)
            shown = {kind: evidence(kind, run, observer, applied, model) for kind in (a, b)}
    finally:
        model.sampling_hooks.remove(observer)
        observer.close()
    assert shown == {a: True, b: True}
    assert len(model.sampling_hooks) == 0 and type(model.model.diffusion_model).__name__ == "UNetModel"
    assert torch.equal(gen.sample_latents(model, cond, x_T, sampler="ddim", steps=STEPS, seed=0).latents, plain)


def test_kinds_refuse_the_model_families_they_do_not_patch(golden):
    model = golden[0]
    with pytest.raises(MethodError, match="deepcache-helper-n2 does not apply to ldm models"):
        parse_method("deepcache-helper-n2").apply(model, 4)
    assert len(model.sampling_hooks) == 0
