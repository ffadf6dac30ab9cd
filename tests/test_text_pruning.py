"""Prompt-token pruning (datosd.text_pruning): selection on hand-built maps, the warm-up, BOS/EOS, exactness
at threshold 0, the dynamic mode, and composition with DaTo."""
import math

import pytest
import torch
import torch.nn.functional as F

import datosd
from datosd import Strategy, TextPruneOptions, apply_text_pruning, remove_text_pruning
from datosd.text_pruning import TextPruneState
from datosd.text_tokens import (CLIP_EOS_ID, kept_tokens, protected_positions, select_text_tokens,
                                token_importance)
from helpers import PROMPTS, golden_model
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.hooks import SamplingHook

STEPS = 8  # DDIM runs exactly 8 steps; warm-up 0.2 -> ceil(1.6) = 2 steps
HW = (8, 8)


@pytest.fixture(scope="module")
def model():
    return golden_model()


@pytest.fixture(scope="module")
def reference(model):
    """The unpatched model's sample of the first prompt."""
    return sample(model)


def sample(model, prompts=PROMPTS[:1], steps=STEPS, scale=7.5, seed=0):
    """DDIM samples with CFG; the conditioning is embedded here, after any patch (its encoder hook sees it)."""
    batch = len(prompts)
    with torch.no_grad():
        c = model.get_learned_conditioning(list(prompts))
        uc = model.get_learned_conditioning([""] * batch)
    x_T = torch.randn((batch, 4, *HW), generator=torch.Generator().manual_seed(seed))
    samples, _ = DDIMSampler(model).sample(
        S=steps, conditioning=c, batch_size=batch, shape=[4, *HW], unconditional_guidance_scale=scale,
        unconditional_conditioning=uc, x_T=x_T, verbose=False, disable_progress=True)
    return samples


class KeyRecorder(SamplingHook):
    """Records, per sampler step, the context rows every attn2.to_k projected and the context itself."""

    def __init__(self, model):
        self.model = model
        self.step = None
        self.rows = []  # (step, to_k input (B, m, D), context (B, M, D))
        unet = model.model.diffusion_model
        self.layers = [m.attn2 for m in unet.modules() if type(m).__name__.endswith("BasicTransformerBlock")]
        self.context = None
        self.handles = [layer.register_forward_pre_hook(self._context, with_kwargs=True) for layer in self.layers]
        self.handles += [layer.to_k.register_forward_pre_hook(self._keys) for layer in self.layers]

    def step_started(self, step):
        self.step = step

    def _context(self, module, args, kwargs):
        self.context = kwargs.get("context", args[1] if len(args) > 1 else None)

    def _keys(self, module, args):
        self.rows.append((self.step, args[0], self.context))

    def __enter__(self):
        self.model.sampling_hooks.add(self)
        return self

    def __exit__(self, *exc):
        self.model.sampling_hooks.remove(self)
        for handle in self.handles:
            handle.remove()


# --- pure functions ---

def test_hand_built_map_prunes_exactly_the_two_unimportant_tokens():
    batch, heads, queries, tokens = 2, 3, 10, 8
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, heads, queries, tokens, generator=g)
    weak = [(2, 5), (1, 6)]  # per row: the two tokens that receive almost nothing
    for row, pair in enumerate(weak):
        logits[row, :, :, list(pair)] = -30.0
    probs = logits.softmax(-1)
    importance = token_importance(probs)
    assert torch.allclose(importance, probs.mean(dim=(1, 2)))
    protected = torch.zeros(batch, tokens, dtype=torch.bool)
    protected[:, 0] = True
    for kept in (select_text_tokens(importance, protected, threshold=1e-6),
                 select_text_tokens(importance, protected, keep=tokens - 2)):
        for row, pair in enumerate(weak):
            assert set(torch.nonzero(~kept[row]).flatten().tolist()) == set(pair)


def test_protected_tokens_are_kept_whatever_their_importance():
    importance = torch.tensor([[0.0, 0.5, 0.3, 0.2, 0.0]])
    protected = torch.tensor([[True, False, False, False, True]])
    assert select_text_tokens(importance, protected, keep=3).tolist() == [[True, True, False, False, True]]
    assert select_text_tokens(importance, protected, keep=2).tolist() == [[True, False, False, False, True]]
    assert select_text_tokens(importance, protected, threshold=0.25).tolist() == [[True, True, True, False, True]]
    candidates = torch.tensor([[True, False, True, True, True]])
    assert select_text_tokens(importance, protected, keep=4, candidates=candidates).tolist() == [
        [True, False, True, True, True]]
    with pytest.raises(ValueError, match="exactly one"):
        select_text_tokens(importance, protected)


def test_protected_positions_are_bos_and_the_first_eos(model):
    tokens = model.cond_stage_model.tokenize(["a red fox", ""])
    protected = protected_positions(tokens)
    eos = [int((row == CLIP_EOS_ID).nonzero()[0]) for row in tokens]
    assert eos == [4, 1] and int((tokens[0] == CLIP_EOS_ID).sum()) == 77 - 4  # SD 1.x pads with EOS
    for row, position in enumerate(eos):
        assert torch.nonzero(protected[row]).flatten().tolist() == [0, position]


def test_pruned_attention_equals_full_attention_with_pruned_tokens_masked():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(3, 9, generator=g) > 0.5
    mask[:, 0] = True
    kept = kept_tokens(mask)
    assert kept.valid is not None and kept.counts().tolist() == mask.sum(1).tolist()
    context = torch.randn(3, 9, 4, generator=g)
    gathered = kept.gather(context)
    for row in range(3):
        count = int(mask[row].sum())
        assert torch.equal(gathered[row, :count], context[row, mask[row]])
    q = torch.randn(3, 2, 5, 4, generator=g)
    k = torch.randn(3, 2, 9, 4, generator=g)
    v = torch.randn(3, 2, 9, 4, generator=g)
    index = kept.index[:, None, :, None].expand(-1, 2, -1, 4)
    pruned = F.scaled_dot_product_attention(q, k.gather(2, index), v.gather(2, index),
                                            attn_mask=kept.attention_mask())
    reference = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1) @ v
    assert torch.allclose(pruned, reference, atol=1e-6)


def test_dynamic_mode_rechooses_among_the_kept_tokens():
    state = TextPruneState(options=TextPruneOptions(warmup=0.5, threshold=0.15, mode="dynamic"))
    protected = torch.tensor([[True, False, False, False, False, True]])
    state.protected_for = lambda context: protected
    context = torch.zeros(1, 6, 2)
    state.sampling_started(4)  # warm-up: steps 0 and 1
    state.step_started(0)
    assert state.call_plan(context) == (None, True)
    state.step_started(1)
    state.record(torch.tensor([[0.3, 0.3, 0.2, 0.1, 0.05, 0.05]]), None, context)
    state.record(torch.tensor([[0.3, 0.2, 0.2, 0.1, 0.1, 0.1]]), None, context)  # mean .3 .25 .2 .1 .075 .075
    state.step_started(2)
    kept, measure = state.call_plan(context)
    assert kept.mask.tolist() == [[True, True, True, False, False, True]] and measure
    state.record(torch.tensor([[0.5, 0.4, 0.05, 0.05]]), kept, context)  # over the kept tokens 0, 1, 2, 5
    state.step_started(3)
    kept, _ = state.call_plan(context)
    assert kept.mask.tolist() == [[True, True, False, False, False, True]]
    assert state.kept_counts() == [(0, None), (1, None), (2, [4]), (3, [3])]


def test_bad_options_are_rejected():
    for kwargs in (dict(), dict(threshold=0.1, keep=5), dict(keep=1), dict(threshold=-0.1),
                   dict(keep=5, warmup=0.0), dict(keep=5, mode="sometimes"), dict(keep=5, mode="dynamic")):
        with pytest.raises(ValueError):
            TextPruneOptions(**kwargs)
    assert TextPruneOptions(keep=5, warmup=0.1).warmup_steps(30) == 3


# --- on the tiny model ---

def test_warmup_sees_all_tokens_then_only_the_kept_ones_with_bos_and_eos(model):
    state = apply_text_pruning(model, keep=20)
    try:
        with KeyRecorder(model) as recorder:
            sample(model, prompts=PROMPTS[:2])
    finally:
        remove_text_pruning(model)
    warmup = math.ceil(0.2 * STEPS)
    tokens = torch.cat([model.cond_stage_model.tokenize([""] * 2), model.cond_stage_model.tokenize(PROMPTS[:2])])
    eos = [int((row == CLIP_EOS_ID).nonzero()[0]) for row in tokens]
    steps_seen = {step for step, _, _ in recorder.rows}
    assert steps_seen == set(range(STEPS))
    for step, keys, context in recorder.rows:
        if step < warmup:
            assert keys.shape[1] == 77 and torch.equal(keys, context)
            continue
        assert keys.shape[1] == 20
        for row in range(4):  # [uncond x2; cond x2]: each row's BOS and EOS among the projected rows
            for position in (0, eos[row]):
                assert (keys[row] == context[row, position]).all(dim=-1).any()
    assert state.kept_counts() == [(i, None) for i in range(warmup)] + [(i, [20] * 4) for i in range(warmup, STEPS)]


@pytest.mark.parametrize("options", [dict(threshold=0.0), dict(keep=77), dict(threshold=0.0, mode="dynamic")])
def test_keeping_every_token_is_bit_identical(model, reference, options):
    apply_text_pruning(model, **options)
    try:
        assert torch.equal(sample(model), reference)
    finally:
        remove_text_pruning(model)


def test_pruning_changes_the_sample_a_little_and_remove_restores(model, reference):
    apply_text_pruning(model, keep=10)
    try:
        pruned = sample(model)
    finally:
        remove_text_pruning(model)
    error = ((pruned - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.5
    assert torch.equal(sample(model), reference)
    assert not any(hasattr(m, "_text_prune") for m in model.modules())


def test_composes_with_dato_and_both_removals_restore(model, reference):
    strategy = Strategy([12, 1, 12, 1, 0, 12, 1, 12], [0.5] * STEPS)
    dato = datosd.apply_patch(model, strategy)
    dato_only = sample(model)
    text = apply_text_pruning(model, keep=12)
    try:
        combined = sample(model)
        assert [c.depth for c in dato.calls] == [12, 1, 12, 1, 0, 12, 1, 12]
        assert text.kept_counts()[-1] == (STEPS - 1, [12, 12])
        assert not torch.equal(combined, dato_only)
        remove_text_pruning(model)
        assert torch.equal(sample(model), dato_only)
    finally:
        remove_text_pruning(model)
        datosd.remove_patch(model)
    assert torch.equal(sample(model), reference)


def test_text_pruning_and_tgate_exclude_each_other(model):
    apply_text_pruning(model, keep=20)
    try:
        with pytest.raises(ValueError, match="text pruning"):
            datosd.apply_tgate(model, gate_step=3)
    finally:
        remove_text_pruning(model)
