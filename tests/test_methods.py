"""The method registry (sdgen.methods): names, call plans, application, seeding; and the shipped b1."""
import re

import pytest
import torch
import yaml

import datosd
from dato_tables.spec import PAPER_FILE
from datosd.strategy import Strategy, StrategyError
from helpers import golden_model
from ldm.models.diffusion.hooks import SamplingHook
from sdgen import generate as gen
from sdgen.methods import MethodError, parse_method
from datosd.strategy import STRATEGY_DIR


@pytest.fixture(scope="module")
def model():
    return golden_model()


@pytest.fixture(scope="module")
def cond(model):
    return gen.encode_prompts(model, ["a red fox", "a blue bird"], scale=7.5)


def test_b1_is_table6_read_right_to_left():
    table = yaml.safe_load(PAPER_FILE.read_text())["table6_b1"]  # the paper's numbers, shipped with the tables
    b1 = Strategy.load(STRATEGY_DIR / "b1.yaml")
    in_table_order = Strategy.load(STRATEGY_DIR / "b1-table-order.yaml")
    assert b1.cache_depth == table["cache_depth"][::-1] and b1.prune_ratio == table["prune_ratio"][::-1]
    assert in_table_order.cache_depth == table["cache_depth"]
    assert in_table_order.prune_ratio == table["prune_ratio"]
    # Step 0 always computes everything (its depth 0 is overridden); PLMS calls it twice.
    assert b1.step_setting(0) == (12, 0.5)
    assert parse_method("dato").call_counts(50, "plms") == {"full": 7, "partial": 38, "reused": 6}
    assert parse_method("dato:b1-table-order").call_counts(50, "plms") == {"full": 7, "partial": 37, "reused": 7}


@pytest.mark.parametrize("name,canonical,label", [
    ("original", "original", "original (no acceleration)"),
    ("ddim10", "ddim10", "DDIM 10 steps"),
    ("tome-0.50", "tome-0.5", "ToMeSD r=0.5"),
    ("deepcache-n3", "deepcache-n3", "DeepCache N=3 depth 1"),
    ("deepcache-n5-d2", "deepcache-n5-d2", "DeepCache N=5 depth 2"),
    ("tome-0.5+deepcache-n3-d1", "deepcache-n3+tome-0.5", "DeepCache N=3 depth 1 + ToMeSD r=0.5"),
    ("dato:b1", "dato", "DaTo [b1: 50 steps, 6 full / 38 partial / 6 reused"),
    ("dato@last37", "dato@last37", "DaTo [b1-last37: 37 steps"),
    ("dato@r0.3,align_cfg=0", "dato@r0.3,align_cfg=0", "(align_cfg=False)"),
    ("dato,parity", "dato,parity", "score_noise=(0.1, 0.1)"),
    ("dato,diff_source=eps,cfg_reference=uncond,recover_from=kept,score_noise=0.1/0.1", "dato,parity", "DaTo"),
])
def test_names_parse_to_canonical_methods(name, canonical, label):
    method = parse_method(name)
    assert method.name == canonical
    assert label in method.label
    assert parse_method(method.name).name == canonical  # the canonical name reads back to itself


@pytest.mark.parametrize("name,message", [
    ("fastest", "unknown method"),
    ("tome-1.5", "ToMeSD ratio must be in [0, 1)"),
    ("dato+deepcache-n3", "use one of them"),
    ("original+tome-0.5", "does not combine"),
    ("dato@last99", "last(99)"),
    ("dato,align_cfg=2", "takes 0 or 1"),
    ("dato,colour=red", "unknown DaTo option"),
    ("dato:missing.yaml", "strategy file not found"),
])
def test_bad_names_are_refused(name, message):
    with pytest.raises((MethodError, StrategyError, ValueError), match=re.escape(message)):
        parse_method(name)


def test_call_plans_follow_the_sampler_and_forced_steps():
    assert parse_method("original").call_counts(50, "plms") == {"full": 51, "partial": 0, "reused": 0}
    assert parse_method("ddim10").call_counts(50, "plms") == {"full": 10, "partial": 0, "reused": 0}
    assert parse_method("deepcache-n3").call_counts(10, "ddim") == {"full": 4, "partial": 6, "reused": 0}
    plan = parse_method("deepcache-n3").call_plan(4, "plms")
    assert plan == [(12, 0.0), (12, 0.0), (1, 0.0), (1, 0.0), (12, 0.0)]
    with pytest.raises(StrategyError, match="dato:b1@last20"):
        parse_method("dato").check_steps(20)


def run(model, cond, method, seed, steps=4):
    x_T = gen.start_noise([0, 1], (4, 16, 16))
    with method.apply(model, steps, seed=seed) as applied:
        first = gen.sample_latents(model, cond, x_T, sampler="ddim", steps=steps, seed=seed, method=applied)
        second = gen.sample_latents(model, cond, x_T, sampler="ddim", steps=steps, seed=seed, method=applied)
    return first, second


@pytest.mark.parametrize("name", ["tome-0.5", "deepcache-n2+tome-0.5", "dato:b1@every12"])
def test_one_seed_gives_identical_latents_in_one_process(model, cond, name):
    method = parse_method(name)
    steps = 5 if name.startswith("dato") else 4
    first, second = run(model, cond, method, seed=3, steps=steps)
    assert torch.equal(first.latents, second.latents)
    _, other = run(model, cond, method, seed=4, steps=steps)
    assert not torch.equal(first.latents, other.latents)


def test_applied_method_removes_its_patches(model, cond):
    x_T = gen.start_noise([0, 1], (4, 16, 16))
    plain = gen.sample_latents(model, cond, x_T, sampler="ddim", steps=4, seed=0)
    with parse_method("deepcache-n2+tome-0.5").apply(model, 4, seed=0) as applied:
        patched = gen.sample_latents(model, cond, x_T, sampler="ddim", steps=4, seed=0, method=applied)
        assert patched.calls == {"full": 2, "partial": 2, "reused": 0}
    after = gen.sample_latents(model, cond, x_T, sampler="ddim", steps=4, seed=0)
    assert not torch.equal(patched.latents, plain.latents)
    assert torch.equal(after.latents, plain.latents)
    assert len(model.sampling_hooks) == 0
    assert type(model.model.diffusion_model).__name__ == "UNetModel"


def test_eta_noise_comes_from_the_seed(model, cond):
    x_T = gen.start_noise([0, 1], (4, 16, 16))
    a = gen.sample_latents(model, cond, x_T, sampler="ddim", steps=4, eta=0.5, seed=7)
    torch.manual_seed(123)  # the global RNG plays no part
    b = gen.sample_latents(model, cond, x_T, sampler="ddim", steps=4, eta=0.5, seed=7)
    c = gen.sample_latents(model, cond, x_T, sampler="ddim", steps=4, eta=0.5, seed=8)
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents)


@pytest.mark.parametrize("name,canonical", [
    ("textprune-0.2-k20", "textprune-0.2-k20"),
    ("textprune-0.25-t0.010-dynamic", "textprune-0.25-t0.01-dynamic"),
    ("tgate-20", "tgate-20"),
    ("tgate-10-perhalf+dato", "dato+tgate-10-perhalf"),
    ("tgate-10-sa", "tgate-10-sa"),
    ("tgate-10-sa-w2-p5-f1", "tgate-10-sa"),  # the released schedule's values are its defaults
    ("tgate-10-sa-p3-perhalf+deepcache-n3", "deepcache-n3+tgate-10-sa-p3-perhalf"),
    ("textprune-0.2-k10+deepcache-n3", "deepcache-n3+textprune-0.2-k10"),
])
def test_cross_attention_methods_parse(name, canonical):
    assert parse_method(name).name == canonical


@pytest.mark.parametrize("name,message", [
    ("textprune-0.2-k20+tgate-10", "use one"),
    ("textprune-0.2-k1", "keep must be an integer >= 2"),
    ("textprune-0-k20", "warmup must be in (0, 1]"),
    ("dato+tgate-10-sa", "which DaTo's pruned tokens would not match"),
    ("tgate-10-sa+tome-0.5", "which ToMeSD's merged tokens would not match"),
    ("tgate-10-sa-p0", "sp_interval must be an integer >= 1"),
])
def test_bad_cross_attention_methods_are_refused(name, message):
    with pytest.raises(MethodError, match=re.escape(message)):
        parse_method(name)


def test_tgate_through_the_registry_gates_after_its_step(model, cond):
    """From the gate step on no cross-attention projection runs (hook count); before it the run is the
    unpatched one, so a gate at the last step changes only the last step."""
    layers = [m.attn2.to_k for m in model.modules() if type(m).__name__ == "BasicTransformerBlock"]
    calls = []
    handles = [layer.register_forward_hook(lambda *a: calls.append(1)) for layer in layers]
    x_T = gen.start_noise([0, 1], (4, 16, 16))
    try:
        plain = gen.sample_latents(model, cond, x_T, sampler="ddim", steps=4, seed=0)
        plain_calls = len(calls)
        calls.clear()
        with parse_method("tgate-2").apply(model, 4, seed=0) as applied:
            gated = gen.sample_latents(model, cond, x_T, sampler="ddim", steps=4, seed=0, method=applied)
    finally:
        for handle in handles:
            handle.remove()
    assert plain_calls == 4 * len(layers) and len(calls) == 2 * len(layers)  # steps 0, 1 only
    assert not torch.equal(gated.latents, plain.latents)
    with pytest.raises(MethodError, match="gate step 4"):
        parse_method("tgate-4").apply(model, 4)


def test_tgate_self_attention_schedule_through_the_registry(model, cond):
    """tgate-3-sa-w0-p2 at 4 DDIM steps: self-attention cached at step 0 (the warm-up's end), reused at step 1,
    cached at gate step - 1 = 2 and (fi_interval 1) at step 3; cross-attention computed at steps 0-2 only."""
    method = parse_method("tgate-3-sa-w0-p2")
    (component,) = method.components
    assert component.options.self_attention == datosd.SelfAttentionSchedule(warm_up=0, sp_interval=2)
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicTransformerBlock"]
    steps = {"attn1": [], "attn2": []}
    recorder = StepRecorder()
    model.sampling_hooks.add(recorder)
    handles = [getattr(b, kind).to_q.register_forward_hook(lambda *a, kind=kind: steps[kind].append(recorder.step))
               for b in blocks for kind in steps]
    try:
        with method.apply(model, 4, seed=0) as applied:
            gen.sample_latents(model, cond, gen.start_noise([0, 1], (4, 16, 16)), sampler="ddim", steps=4, seed=0,
                               method=applied)
    finally:
        model.sampling_hooks.remove(recorder)
        for handle in handles:
            handle.remove()
    assert sorted(set(steps["attn1"])) == [0, 2, 3] and len(steps["attn1"]) == 3 * len(blocks)
    assert sorted(set(steps["attn2"])) == [0, 1, 2] and len(steps["attn2"]) == 3 * len(blocks)
    assert not any(hasattr(m, "_tgate") for m in model.modules())


class StepRecorder(SamplingHook):
    step = None

    def step_started(self, step):
        self.step = step


def test_cross_attention_flags_map_to_names():
    from sdgen.cli import txt2img
    from sdgen.cli.flags import method_name_from_args

    parser = txt2img.build_parser()
    name = lambda *args: method_name_from_args(parser.parse_args(list(args)))  # noqa: E731
    assert name("--prune_text", "--text_keep", "20") == "textprune-0.2-k20"
    assert name("--prune_text", "--text_threshold", "0.01", "--text_mode", "dynamic", "--text_warmup", "0.3") == \
        "textprune-0.3-t0.01-dynamic"
    assert name("--dato", "--tgate_step", "20") == "dato+tgate-20"
    assert name("--tgate_step", "10", "--tgate_self_attn") == "tgate-10-sa"
    assert name("--tgate_step", "10", "--tgate_self_attn", "--tgate_warm_up", "0", "--tgate_sp_interval", "1",
                "--tgate_cache", "per_half") == "tgate-10-sa-w0-p1-perhalf"
    with pytest.raises(ValueError, match="--tgate_sp_interval set.* add --tgate_self_attn"):
        name("--tgate_step", "10", "--tgate_sp_interval", "3")
    with pytest.raises(ValueError, match="needs --text_threshold T or --text_keep K"):
        name("--prune_text")
    with pytest.raises(ValueError, match="add --prune_text"):
        name("--text_keep", "5")
