"""datosd.apply_patch on diffusers pipelines: equal to the ldm path, steps from the scheduler, SD 1.x and SDXL."""
import pytest
import torch

pytest.importorskip("diffusers")

import diffusers  # noqa: E402

import datosd  # noqa: E402
import datosd.caching as caching_module  # noqa: E402
from datosd import Strategy, StrategyError  # noqa: E402
from diffusers_pipelines import SDXL_LATENT, golden_pipeline, tiny_sdxl_pipeline  # noqa: E402
from helpers import EventRecorder, golden_model  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402

PROMPTS = ["a photograph of an astronaut riding a horse"]
LATENT = (4, 16, 16)
STEPS = 10  # the runs compared with the ldm path
SHORT = 4  # the other runs
# Caching (full, shallow, reuse-all and mid depths) and pruning at every step.
DATO = Strategy([12, 1, 1, 12, 0, 3, 1, 12, 5, 1], [0.5, 0.6, 0.3, 0.5, 0.4, 0.7, 0.5, 0.3, 0.6, 0.5], name="mixed")
# float32: the code paths order a few reductions differently (observed: 5e-5 absolute on latents of size ~40)
TOLERANCE = dict(atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def model():
    return golden_model()


@pytest.fixture(scope="module")
def pipe():
    return golden_pipeline()


@pytest.fixture(scope="module")
def conditioning(model):
    with torch.no_grad():
        return model.get_learned_conditioning(PROMPTS), model.get_learned_conditioning([""] * len(PROMPTS))


@pytest.fixture(scope="module")
def x_T():
    return torch.randn((len(PROMPTS), *LATENT), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def unpatched_latents(pipe, conditioning, x_T):
    return pipe_latents(pipe, conditioning, x_T)


@pytest.fixture(autouse=True)
def unpatched(pipe):
    """Every test starts and ends with the plain pipeline and its CompVis DDIM scheduler."""
    scheduler = pipe.scheduler
    yield
    datosd.remove_patch(pipe)
    pipe.scheduler = scheduler


def ldm_latents(model, conditioning, x_T, steps=STEPS):
    c, uc = conditioning
    with torch.no_grad():
        samples, _ = DDIMSampler(model).sample(
            S=steps, conditioning=c, batch_size=len(c), shape=list(LATENT), unconditional_guidance_scale=7.5,
            unconditional_conditioning=uc, eta=0.0, x_T=x_T, verbose=False, disable_progress=True)
    return samples


def pipe_latents(pipe, conditioning, x_T, steps=STEPS, **kwargs):
    c, uc = conditioning
    with torch.no_grad():
        return pipe(prompt_embeds=c, negative_prompt_embeds=uc, num_inference_steps=steps, guidance_scale=7.5,
                    latents=x_T.clone(), output_type="latent", **kwargs).images


def spy_selections(monkeypatch):
    """Record (base_index, pruned_index) of every select_tokens call made by either patch."""
    records = []
    select = caching_module.select_tokens

    def recording(*args, **kwargs):
        selection = select(*args, **kwargs)
        records.append((selection.base_index, selection.pruned_index))
        return selection

    monkeypatch.setattr(caching_module, "select_tokens", recording)
    return records


# --- equal to the ldm path (issue 14, 4a / 4b) ----------------------------------------------------------------------
def test_converted_pipeline_runs_compvis_ddim(pipe):
    pipe.scheduler.set_timesteps(STEPS)
    assert pipe.scheduler.timesteps.tolist() == list(range(901, 0, -100))  # CompVis: 1, 101, ..., 901


def test_unpatched_latents_equal_ddim_sampler(model, conditioning, x_T, unpatched_latents):
    expected = ldm_latents(model, conditioning, x_T)
    got = unpatched_latents
    assert expected.abs().max() > 1.0  # the run moved far from zero: a real comparison
    torch.testing.assert_close(got, expected, **TOLERANCE)


def test_dato_picks_the_same_tokens_and_latents_as_the_ldm_path(model, pipe, conditioning, x_T, unpatched_latents,
                                                               monkeypatch):
    records = spy_selections(monkeypatch)
    ldm_state = datosd.apply_patch(model, DATO, seed=3)
    try:
        expected = ldm_latents(model, conditioning, x_T)
    finally:
        datosd.remove_patch(model)
    ldm_records, records[:] = list(records), []
    state = datosd.apply_patch(pipe, DATO, seed=3)
    got = pipe_latents(pipe, conditioning, x_T)
    assert [(c.step, c.depth, c.ratio) for c in state.calls] == [(c.step, c.depth, c.ratio) for c in ldm_state.calls]
    assert {c.kind for c in state.calls} == {"full", "partial", "reused"}
    assert len(records) == len(ldm_records) > 0
    assert any(pruned.shape[1] > 0 for _, pruned in records)
    for (base, pruned), (ldm_base, ldm_pruned) in zip(records, ldm_records):
        assert torch.equal(base, ldm_base)
        # The same pruned tokens; their order (by similarity) may swap where two similarities tie within 1e-6.
        assert torch.equal(pruned.sort(dim=1).values, ldm_pruned.sort(dim=1).values)
    assert (got - unpatched_latents).abs().max() > 0.1  # DaTo changed the result ...
    torch.testing.assert_close(got, expected, **TOLERANCE)  # ... exactly as it does on the ldm path


# --- invariants --------------------------------------------------------------------------------------------------
def test_full_strategy_is_bit_identical_and_remove_patch_restores(pipe, conditioning, x_T):
    def latents():
        return pipe_latents(pipe, conditioning, x_T, steps=SHORT)

    unpatched = latents()
    scheduler_methods = dict(vars(pipe.scheduler))
    state = datosd.apply_patch(pipe, Strategy.full(SHORT))
    assert type(pipe.unet).__name__ == "DatoUNet2DConditionModel"
    assert torch.equal(latents(), unpatched)
    assert len(state.calls) == SHORT and all(c.kind == "full" for c in state.calls)
    datosd.apply_patch(pipe, prune_ratio=0.0)
    assert torch.equal(latents(), unpatched)
    datosd.apply_patch(pipe, Strategy([12, 1, 0, 12], [0.5] * SHORT))
    assert not torch.equal(latents(), unpatched)
    datosd.remove_patch(pipe)
    assert type(pipe.unet) is diffusers.UNet2DConditionModel
    assert not any(hasattr(m, "_dato") for m in pipe.unet.modules())
    assert dict(vars(pipe.scheduler)).keys() == scheduler_methods.keys()
    assert torch.equal(latents(), unpatched)


def test_two_calls_with_one_seed_give_identical_images(pipe):
    state = datosd.apply_patch(pipe, Strategy([12, 1, 0, 2], [0.5, 0.5, 0.5, 0.7]), seed=5)

    def image():
        with torch.no_grad():
            return pipe(PROMPTS, num_inference_steps=SHORT, generator=torch.Generator().manual_seed(7),
                        output_type="pt").images

    first, second = image(), image()
    assert first.shape == (1, 3, 128, 128)
    assert torch.equal(first, second)
    assert [c.kind for c in state.calls] == ["full", "partial", "reused", "partial"]


def test_patching_the_bare_unet_leaves_steps_to_the_caller(pipe, conditioning, x_T):
    state = datosd.apply_patch(pipe.unet, Strategy.uniform(STEPS, 3, 1))
    c, uc = conditioning
    with torch.no_grad():
        state.sampling_started(STEPS)
        for step in (0, 1):
            state.step_started(step)
            state.model_call(True)
            pipe.unet(torch.cat([x_T, x_T]), 901, torch.cat([uc, c]))
    assert [(c.step, c.kind) for c in state.calls] == [(0, "full"), (1, "partial")]


# --- steps from the scheduler ------------------------------------------------------------------------------------
def test_wrong_strategy_length_fails_before_the_first_unet_call(pipe, conditioning, x_T):
    state = datosd.apply_patch(pipe, Strategy.full(SHORT + 1))
    with pytest.raises(StrategyError, match=r"5 steps but the sampler runs 4.*DDIMScheduler runs 4 of its 4"):
        pipe_latents(pipe, conditioning, x_T, steps=SHORT)
    assert state.calls == []


def test_heun_two_unet_calls_per_step(pipe, conditioning, x_T):
    pipe.scheduler = diffusers.HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    recorder = EventRecorder()
    state = datosd.apply_patch(pipe, Strategy.uniform(5, 2, 1, ratio=0.5))
    state.hooks.add(recorder)
    pipe_latents(pipe, conditioning, x_T, steps=5)
    assert recorder.events[0] == ("started", 5) and recorder.events[-1] == ("finished",)
    assert recorder.steps() == [0, 1, 2, 3, 4]
    assert [c.step for c in state.calls] == [0, 0, 1, 1, 2, 2, 3, 3, 4]  # 2 * 5 - 1 calls, the last one Euler
    assert [c.kind for c in state.calls[::2]] == ["full", "partial", "full", "partial", "full"]
    assert all(e[1] for e in recorder.events if e[0] == "call")  # the pipeline batches [uncond; cond]


@pytest.mark.parametrize("skip_prk_steps, steps", [
    (True, [0, 0, 1, 2, 3, 4]),  # PLMS: the warm-up's two calls are step 0, as CompVis PLMS
    (False, [0] * 4 + [1] * 4 + [2] * 4 + [3, 4]),  # three Runge-Kutta steps of 4 calls, then PLMS
])
def test_pndm_warm_up_calls_belong_to_their_step(pipe, conditioning, x_T, skip_prk_steps, steps):
    pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=skip_prk_steps)
    recorder = EventRecorder()
    state = datosd.apply_patch(pipe, Strategy.full(5))
    state.hooks.add(recorder)
    pipe_latents(pipe, conditioning, x_T, steps=5)
    assert [c.step for c in state.calls] == steps
    assert recorder.events[0] == ("started", 5) and recorder.events[-1] == ("finished",)


# img2img: the pipeline loops over scheduler.timesteps[t_start * order:] and PNDM's counter restarts there.
IMG2IMG_STEPS = 10
SCHEDULERS = {  # name: (diffusers class, config overrides)
    "pndm-plms": ("PNDMScheduler", dict(skip_prk_steps=True)),
    "pndm-prk": ("PNDMScheduler", dict(skip_prk_steps=False)),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
}


def starts_a_step(scheduler):
    """Whether the UNet call the scheduler is about to receive begins a new solver step, read from the scheduler's
    own state: PNDM's PLMS redoes its first step with the averaged noise at counter 1, its Runge-Kutta warm-up takes
    4 calls per step while counter < len(prk_timesteps); Heun and DPM2 start a step in their first-order state."""
    if isinstance(scheduler, diffusers.PNDMScheduler):
        k = scheduler.counter
        if scheduler.config.skip_prk_steps:
            return k != 1
        return k >= len(scheduler.prk_timesteps) or k % 4 == 0
    if hasattr(scheduler, "state_in_first_order"):
        return bool(scheduler.state_in_first_order)
    return True


def img2img_run(pipe, kind, strength):
    """An img2img pipeline over the golden components with scheduler `kind`, and the keywords of one run."""
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    name, overrides = SCHEDULERS[kind]
    img2img.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand((1, 3, 128, 128), generator=torch.Generator().manual_seed(1))
    return img2img, dict(prompt=PROMPTS, image=image, strength=strength, num_inference_steps=IMG2IMG_STEPS,
                         output_type="latent", generator=torch.Generator().manual_seed(2))


def solver_steps_of_calls(img2img, run):
    """The solver step of every UNet call of an unpatched run, counted from the scheduler's state at each call."""
    starts = []
    handle = img2img.unet.register_forward_pre_hook(lambda module, args: starts.append(
        starts_a_step(img2img.scheduler)))
    try:
        with torch.no_grad():
            img2img(**run)
    finally:
        handle.remove()
    assert starts[0]
    return [sum(starts[:i + 1]) - 1 for i in range(len(starts))]


@pytest.mark.parametrize("strength", [0.3, 0.6, 0.8, 1.0])
@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_img2img_steps_follow_the_scheduler(pipe, kind, strength):
    """The run announces the solver steps the pipeline makes, every UNet call gets its step, the run is closed."""
    img2img, run = img2img_run(pipe, kind, strength)
    expected = solver_steps_of_calls(img2img, run)
    steps = expected[-1] + 1
    assert steps == int(IMG2IMG_STEPS * strength)  # the pipeline's own count: whole steps from t_start on
    recorder = EventRecorder()
    state = datosd.apply_patch(img2img, Strategy.uniform(steps, 2, 1, ratio=0.4))
    state.hooks.add(recorder)
    with torch.no_grad():
        img2img(**run)
    assert recorder.events[0] == ("started", steps) and recorder.events[-1] == ("finished",)
    assert recorder.steps() == list(range(steps))
    assert [c.step for c in state.calls] == expected
    assert state.calls[0].kind == "full" and "partial" in {c.kind for c in state.calls}
    datosd.apply_patch(img2img, Strategy.full(steps + 1))
    with pytest.raises(StrategyError, match=f"use a {steps}-step strategy.*runs {steps} of its {IMG2IMG_STEPS} "
                                            "inference steps"):
        img2img(**run)


def test_img2img_pndm_runge_kutta_step_cut_short_is_a_step(pipe):
    """At strength 0.2 the loop's 11 calls stop inside PNDM's third Runge-Kutta step: it still counts."""
    img2img, run = img2img_run(pipe, "pndm-prk", 0.2)
    state = datosd.apply_patch(img2img, Strategy.full(3))
    with torch.no_grad():
        img2img(**run)
    assert [c.step for c in state.calls] == [0] * 4 + [1] * 4 + [2] * 3
    datosd.remove_patch(img2img)
    assert solver_steps_of_calls(img2img, run) == [c.step for c in state.calls]


def test_scheduler_swapped_after_patching_is_followed(pipe, conditioning, x_T):
    state = datosd.apply_patch(pipe, Strategy.uniform(4, 2, 1))
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe_latents(pipe, conditioning, x_T, steps=4)
    assert [(c.step, c.kind) for c in state.calls] == [(0, "full"), (1, "partial"), (2, "full"), (3, "partial")]
    datosd.remove_patch(pipe)
    assert "step" not in vars(pipe.scheduler)


def test_unbatched_guidance_keeps_one_cache_per_half(pipe, conditioning, x_T):
    """Guidance run as two UNet calls per step (uncond, then cond) gives the batched pipeline's latents: each
    call at a scheduler position reuses the features of its own half."""
    caching = Strategy.uniform(SHORT, 3, 2)
    datosd.apply_patch(pipe, caching)
    batched = pipe_latents(pipe, conditioning, x_T, steps=SHORT)
    state = datosd.apply_patch(pipe, caching)
    c, uc = conditioning
    scheduler = pipe.scheduler
    scheduler.set_timesteps(SHORT)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            e_u, e_c = (pipe.unet(x, t, encoder_hidden_states=e).sample for e in (uc, c))
            x = scheduler.step(e_u + 7.5 * (e_c - e_u), t, x).prev_sample
    assert [(call.step, call.kind) for call in state.calls] == [
        (0, "full"), (0, "full"), (1, "partial"), (1, "partial"), (2, "partial"), (2, "partial"), (3, "full"),
        (3, "full")]
    torch.testing.assert_close(x, batched, **TOLERANCE)


def test_no_guidance_single_image(pipe):
    recorder = EventRecorder()
    state = datosd.apply_patch(pipe, Strategy([12, 1, 12, 1], [0.5] * SHORT))
    state.hooks.add(recorder)
    with torch.no_grad():
        pipe(PROMPTS, num_inference_steps=SHORT, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    assert not any(e[1] for e in recorder.events if e[0] == "call")
    assert [c.kind for c in state.calls] == ["full", "partial", "full", "partial"]


# --- SDXL --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline()


def self_attention_lengths(unet):
    """Token counts seen by every self-attention (attn1) call, recorded per call."""
    lengths = []
    handles = [block.attn1.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
               for block in unet.modules() if type(block).__name__.endswith("BasicTransformerBlock")]
    return lengths, handles


def test_sdxl_prunes_its_highest_resolution_attention_level(sdxl):
    datosd.remove_patch(sdxl)
    ratio, steps = 0.5, 4
    n_top = (SDXL_LATENT // 2) ** 2  # down_blocks[0] has no attention: the top attention level is 2x down
    n_low = (SDXL_LATENT // 4) ** 2
    state = datosd.apply_patch(sdxl, Strategy([12, 1, 12, 12], [ratio, ratio, 0.0, ratio]))
    assert state.attention_downsample == 2
    lengths, handles = self_attention_lengths(sdxl.unet)
    try:
        with torch.no_grad():
            sdxl("a fox", num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        for handle in handles:
            handle.remove()
        datosd.remove_patch(sdxl)
    # Per full step: the top attention level (1 transformer block per attention) runs 2 down and 3 up blocks; the
    # low level (2 per attention) 4 down, 2 in the middle and 6 up. Step 1 (depth 1) runs no attention at all.
    def step(top):
        return [top] * 2 + [n_low] * (4 + 2 + 6) + [top] * 3

    pruned_step, unpruned_step = step(n_top - int(ratio * n_top)), step(n_top)
    assert lengths == pruned_step + unpruned_step + pruned_step
    assert [c.kind for c in state.calls] == ["full", "partial", "full", "full"]


def test_sdxl_full_strategy_bit_identical_and_img2img_steps(sdxl):
    datosd.remove_patch(sdxl)

    def latents(pipeline, **kwargs):
        with torch.no_grad():
            return pipeline("a fox", num_inference_steps=4, output_type="latent",
                            generator=torch.Generator().manual_seed(0), **kwargs).images

    unpatched = latents(sdxl)
    datosd.apply_patch(sdxl, Strategy.full(4))
    assert torch.equal(latents(sdxl), unpatched)
    datosd.remove_patch(sdxl)
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**sdxl.components)
    recorder = EventRecorder()
    state = datosd.apply_patch(img2img, Strategy.uniform(3, 2, 1, ratio=0.5))
    state.hooks.add(recorder)
    try:
        image = torch.rand((1, 3, 2 * SDXL_LATENT, 2 * SDXL_LATENT), generator=torch.Generator().manual_seed(1))
        latents(img2img, image=image, strength=0.75)
    finally:
        datosd.remove_patch(img2img)
    assert recorder.events[0] == ("started", 3)
    assert [c.kind for c in state.calls] == ["full", "partial", "full"]


def test_sdxl_denoising_end_is_refused_before_the_first_unet_call(sdxl):
    state = datosd.apply_patch(sdxl, Strategy.full(4))
    try:
        with pytest.raises(ValueError, match="denoising_end"), torch.no_grad():
            sdxl("a fox", num_inference_steps=4, denoising_end=0.5, output_type="latent")
    finally:
        datosd.remove_patch(sdxl)
    assert state.calls == []


def test_unsupported_unet_is_refused_clearly(sdxl):
    sdxl.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        datosd.apply_patch(sdxl, Strategy.full(2))
        with pytest.raises(TypeError, match="FreeU"):
            with torch.no_grad():
                sdxl("a fox", num_inference_steps=2, output_type="latent")
    finally:
        sdxl.unet.disable_freeu()
        datosd.remove_patch(sdxl)


# --- with other tools, the registry, compiled execution ------------------------------------------------------------
def test_tomesd_first_then_dato_is_refused_like_deepcache_first(pipe):
    """A UNet another tool patched first is refused when DaTo is applied, before any pipeline call (tomesd's
    diffusers block takes no added_cond_kwargs and would drop DaTo's pruning)."""
    import tomesd

    pruning = Strategy([12, 1, 1, 12], [0.5] * SHORT)
    tomesd.apply_patch(pipe, ratio=0.5)
    try:
        with pytest.raises(TypeError, match="patched by tomesd"):
            datosd.apply_patch(pipe, pruning)
        assert type(pipe.unet).__name__ == "UNet2DConditionModel" and not hasattr(pipe.unet, "_dato")
    finally:
        tomesd.remove_patch(pipe)
    deepcache = pytest.importorskip("DeepCache")
    helper = deepcache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=2, cache_branch_id=0)
    helper.enable()
    try:
        with pytest.raises(TypeError, match="wrapped by something else"):
            datosd.apply_patch(pipe, pruning)
    finally:
        helper.disable()


def test_registry_methods_on_a_pipeline(pipe, conditioning, x_T):
    """Uniform DeepCache and ToMeSD, the one pair of the pipeline kinds that combines, each show their effect;
    kinds for ldm models only are refused."""
    from sdgen.methods import MethodError, parse_method

    tokens = []
    handles = [m.attn1.register_forward_pre_hook(lambda m, args, kwargs: tokens.append(args[0].shape[1]),
                                                 with_kwargs=True)
               for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    plain = pipe_latents(pipe, conditioning, x_T, steps=SHORT)
    try:
        tokens.clear()
        with parse_method("deepcache-n2+tome-0.5").apply(pipe, SHORT, seed=0) as applied:
            pipe_latents(pipe, conditioning, x_T, steps=SHORT)
            assert applied.call_counts() == {"full": 2, "partial": 2, "reused": 0}
    finally:
        for handle in handles:
            handle.remove()
    assert 16 * 16 // 2 in tokens  # ToMeSD merged half of the 256 highest-resolution tokens
    assert type(pipe.unet) is diffusers.UNet2DConditionModel
    assert torch.equal(pipe_latents(pipe, conditioning, x_T, steps=SHORT), plain)
    with pytest.raises(MethodError, match="textprune-0.2-k10 does not apply to diffusers models"):
        parse_method("textprune-0.2-k10").apply(pipe, SHORT)


def test_compiled_dato_covers_the_pipeline(pipe, conditioning, x_T):
    """--compile reaches the diffusers caching forward: DatoState.compute runs the blocks compiled, each (depth,
    ratio) variant without a graph break, and gives the eager latents."""
    from helpers import CountingBackend, graph_breaks
    from sdgen.compiled import CompiledCall, Execution
    from sdgen.methods import dato_method

    method = dato_method(Strategy([12, 1, 1, 12], [0.5, 0.3, 0.3, 0.5], name="mixed"))
    with method.apply(pipe, SHORT, seed=3):
        eager = pipe_latents(pipe, conditioning, x_T, steps=SHORT)
    backend = CountingBackend()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with method.apply(pipe, SHORT, seed=3, execution=Execution("default", backend=backend)) as applied:
        assert isinstance(applied.dato_state.compute, CompiledCall)
        compiled = pipe_latents(pipe, conditioning, x_T, steps=SHORT)
        assert [c.kind for c in applied.dato_state.calls] == ["full", "partial", "partial", "full"]
    assert graph_breaks() == 0 and backend.graphs > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert type(pipe.unet) is diffusers.UNet2DConditionModel
