"""T-GATE (Liu et al., arXiv 2404.02747; github HaozheLiu-ST/T-GATE): cross-attention output stops changing
after a few steps, so from the gate step m on every `attn2` returns the output it computed last instead of
computing (no Q/K/V projection, no attention, no output projection).

Two variants, both with the released code's cross-attention gate:
- cross-attention only (`self_attention=None`, the paper's first version, TGATE-V1, arXiv 2404.02747v1):
  self-attention computes at every step.
- with the self-attention schedule (`self_attention=SelfAttentionSchedule()`, the released code's
  `tgate_scheduler` with its defaults warm_up=2, sp_interval=5, fi_interval=1; TGATE-V2, 2404.02747v2): every
  `attn1` also caches its output at some steps and returns it at others (`attention_plan`). Before the gate
  (semantics planning): steps i < warm_up compute, step warm_up and every step i % sp_interval == 0 compute
  and cache, the others reuse; at step m - 1 it computes and caches; after the gate (fidelity improving) steps
  i % fi_interval == 0 compute and cache, the others reuse. A layer with no cache yet computes. The reused
  output must match the queries, so the schedule does not combine with DaTo's token pruning or ToMeSD's
  merging (refused).

Steps before the first reuse compute exactly as the unpatched model (bit-identical); so does every attention
call the plan says to compute. The cross-attention cache of a layer is its output of the last call before the
gate (normally step m - 1; with DaTo / DeepCache, the last step that computed it). `cache`:
- "cfg_mean" (the paper and the released code): the caches filled at step m - 1 hold the mean of the
  unconditional and conditional halves, and after the gate the UNet runs on the unconditional half only, its
  output copied to both halves, so guidance cancels: what the T-GATE pipelines do by dropping CFG after the
  gate and calling the UNet on the negative prompt (and, on SDXL, its added conditions). This halves the UNet's
  batch on gated steps. It is a choice, not an identity: on SD 1.x / 2.x the two halves would give the same
  output (their latents and timesteps are equal and the gated cross-attention no longer reads the context),
  but on SDXL the vector conditioning `y` (pooled text embedding) differs between the halves, so the
  conditional half would not give the unconditional half's output.
- "per_half": each half keeps its own cached outputs; guidance stays in effect, the batch stays whole.

`apply_tgate(model, gate_step=10)` swaps the class of every `attn2` (and, with the schedule, every `attn1`;
tomesd manner, `_parent` kept) and adds forward hooks on the UNet for the halved batch, so it composes with
DaTo / DeepCache. All state is one `TGateState` on the UNet, shared by reference with its layers, and a
sampling hook of the model.
"""
import functools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .utils import (HookedState, cross_attention_layers, find_unet, is_class, patch_cross_attention,
                    self_attention_layers, unpatch_cross_attention)

CACHE_MODES = ("cfg_mean", "per_half")
COMPUTE, CACHE, REUSE = "compute", "cache", "reuse"  # what an attention layer does at a step (`attention_plan`)


def _check_count(name: str, value: object, least: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least} ({meaning}), got {value!r}")


@dataclass(frozen=True)
class SelfAttentionSchedule:
    """When `attn1` caches and reuses its output (the released code's `tgate_scheduler`, its defaults)."""

    warm_up: int = 2  # steps i < warm_up compute self-attention; step warm_up computes and caches
    sp_interval: int = 5  # before the gate: steps i % sp_interval == 0 compute and cache, the others reuse
    fi_interval: int = 1  # after the gate: steps i % fi_interval == 0 compute and cache, the others reuse

    def __post_init__(self) -> None:
        _check_count("warm_up", self.warm_up, 0, "the first steps that compute self-attention")
        _check_count("sp_interval", self.sp_interval, 1, "steps between self-attention caches before the gate")
        _check_count("fi_interval", self.fi_interval, 1, "steps between self-attention caches after the gate")


@dataclass(frozen=True)
class TGateOptions:
    """T-GATE's options (immutable; one set per patched model). self_attention: None (the cross-attention gate
    only, TGATE-V1) or the schedule on which self-attention is cached and reused too (the released code)."""

    gate_step: int = 10  # steps i >= gate_step reuse the cross-attention output
    cache: str = "cfg_mean"  # "cfg_mean": the CFG halves' mean (the paper); "per_half": each half its own
    self_attention: Optional[SelfAttentionSchedule] = None

    def __post_init__(self) -> None:
        _check_count("gate_step", self.gate_step, 1, "steps before it compute cross-attention")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        if self.self_attention is not None and not isinstance(self.self_attention, SelfAttentionSchedule):
            raise ValueError(f"self_attention must be a SelfAttentionSchedule or None, got {self.self_attention!r}")


def attention_plan(step: int, options: TGateOptions) -> Tuple[str, str]:
    """(self-attention, cross-attention) action of sampler step `step`: COMPUTE, CACHE (compute and keep the
    output) or REUSE (return the kept output), as the released `tgate_scheduler` decides them. The caches of
    step gate_step - 1 hold the CFG halves' mean in "cfg_mean" mode."""
    gate, schedule = options.gate_step, options.self_attention
    cross = COMPUTE if step < gate - 1 else CACHE if step == gate - 1 else REUSE
    if schedule is None:
        return COMPUTE, cross
    if step < gate - 1:  # semantics planning
        if step < schedule.warm_up:
            return COMPUTE, cross
        if step == schedule.warm_up or step % schedule.sp_interval == 0:
            return CACHE, cross
        return REUSE, cross
    if step == gate - 1:
        return CACHE, cross
    return (CACHE if step % schedule.fi_interval == 0 else REUSE), cross  # fidelity improving


@dataclass
class TGateRun:
    """What one sampling run accumulates; a new run starts from an empty one."""

    step: Optional[int] = None
    last_output: Dict[int, Tuple[torch.Tensor, bool]] = field(default_factory=dict)  # layer -> (out, CFG batch)
    cache: Dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> the output reused after the gate
    self_cache: Dict[int, torch.Tensor] = field(default_factory=dict)  # attn1 layer -> its kept output
    checked: bool = False  # the UNet was checked for token pruning / merging (self-attention schedule)
    computed: int = 0  # attn2 calls that computed
    reused: int = 0  # attn2 calls that returned the cache
    self_computed: int = 0  # attn1 calls that computed (with the self-attention schedule)
    self_reused: int = 0  # attn1 calls that returned their kept output
    halved: int = 0  # UNet calls that ran one CFG half


@dataclass(eq=False)
class TGateState(HookedState):
    """All state of one gated model: its options, the current run and the call in progress."""

    options: TGateOptions
    run: TGateRun = field(default_factory=TGateRun)
    cfg_halves: bool = False  # the sampler's word on the next call's batch
    halving: bool = False  # the UNet call in progress runs one CFG half
    handles: List[torch.utils.hooks.RemovableHandle] = field(default_factory=list, repr=False)

    def sampling_started(self, num_steps: int) -> None:
        self.run = TGateRun()

    def step_started(self, step: int) -> None:
        self.run.step = step

    def model_call(self, cfg_halves: bool) -> None:
        self.cfg_halves = cfg_halves

    def sampling_finished(self) -> None:
        """Free the cached outputs; the call counts stay readable until the next run."""
        run = self.run
        self.run = TGateRun(computed=run.computed, reused=run.reused, self_computed=run.self_computed,
                            self_reused=run.self_reused, halved=run.halved)
        self.halving = False

    @property
    def gated(self) -> bool:
        """True when the current step reuses cross-attention (step >= gate_step)."""
        return self.run.step is not None and self.run.step >= self.options.gate_step

    @property
    def cfg_batch(self) -> bool:
        """True when the call in progress runs both CFG halves."""
        return self.cfg_halves and not self.halving

    def remember(self, layer: int, output: torch.Tensor) -> None:
        """Keep a layer's newest output before the gate (a reference, no copy)."""
        if self.run.step is not None:
            self.run.last_output[layer] = (output.detach(), self.cfg_batch)
        self.run.computed += 1

    def cached(self, layer: int, batch: int, tokens: int) -> torch.Tensor:
        """The output a gated layer returns for a (batch, tokens, C) query."""
        run = self.run
        if layer not in run.cache:
            if layer not in run.last_output:
                raise RuntimeError(f"T-GATE: cross-attention layer {layer} never ran before gate step "
                                   f"{self.options.gate_step}, so it has no output to reuse")
            output, cfg_batch = run.last_output.pop(layer)
            run.cache[layer] = self._kept(output, cfg_batch)
        cache = self._fitted(run.cache[layer], "cross", layer, batch, tokens,
                             "T-GATE needs the cross-attention queries unpruned (DaTo's prune_crossattn off)")
        run.reused += 1
        return cache

    # --- the self-attention schedule ---
    def self_attention_action(self) -> str:
        """What `attn1` does in the current step (COMPUTE outside a sampler step or without the schedule)."""
        if self.run.step is None or self.options.self_attention is None:
            return COMPUTE
        return attention_plan(self.run.step, self.options)[0]

    def computed_self(self, layer: int, output: torch.Tensor, keep: bool) -> None:
        """A self-attention layer computed `output`; keep it (a reference, no copy) when asked: the mean of the
        CFG halves at gate step m - 1 in "cfg_mean" mode, else the output itself."""
        self.run.self_computed += 1
        if keep:
            gate_step = self.run.step == self.options.gate_step - 1
            self.run.self_cache[layer] = self._kept(output.detach(), self.cfg_batch and gate_step)

    def kept_self(self, layer: int, batch: int, tokens: int) -> Optional[torch.Tensor]:
        """The kept output a self-attention layer returns for a (batch, tokens, C) query; None when it has none
        yet (it then computes)."""
        kept = self.run.self_cache.get(layer)
        if kept is None:
            return None
        kept = self._fitted(kept, "self", layer, batch, tokens,
                            "T-GATE's self-attention schedule needs every token (no DaTo pruning, no ToMeSD)")
        self.run.self_reused += 1
        return kept

    def _kept(self, output: torch.Tensor, cfg_batch: bool) -> torch.Tensor:
        if self.options.cache == "cfg_mean" and cfg_batch:
            uncond, cond = output.chunk(2)
            return (uncond + cond) / 2
        return output

    @staticmethod
    def _fitted(cache: torch.Tensor, kind: str, layer: int, batch: int, tokens: int, token_advice: str
                ) -> torch.Tensor:
        """cache: (b, tokens, C) for a (batch, tokens, C) query: itself, or twice over for a CFG batch of a
        CFG mean."""
        if cache.shape[1] != tokens:
            raise RuntimeError(f"T-GATE: {kind}-attention layer {layer} cached {cache.shape[1]} query tokens but is "
                               f"called with {tokens}; {token_advice}")
        if cache.shape[0] == batch:
            return cache
        if 2 * cache.shape[0] == batch:  # CFG mean, but this call's halves differ: both get the mean
            return torch.cat([cache, cache])
        raise RuntimeError(f"T-GATE: {kind}-attention layer {layer} cached a batch of {cache.shape[0]}, called "
                           f"with {batch}")


@functools.lru_cache(maxsize=None)
def _gated_cross_attention_class(attention_class: type) -> type:
    class GatedCrossAttention(attention_class):
        """CrossAttention that returns its cached output from the gate step on."""

        _parent = attention_class

        def forward(self, x, context=None, mask=None):
            state = self._tgate
            if state.gated:
                return state.cached(self._tgate_layer, x.shape[0], x.shape[1])
            out = super().forward(x, context=context, mask=mask)
            state.remember(self._tgate_layer, out)
            return out

    return GatedCrossAttention


@functools.lru_cache(maxsize=None)
def _scheduled_self_attention_class(attention_class: type) -> type:
    class ScheduledSelfAttention(attention_class):
        """CrossAttention (as `attn1`) that computes, caches or reuses its output as the schedule says."""

        _parent = attention_class

        def forward(self, x, context=None, mask=None):
            state = self._tgate
            action = state.self_attention_action()
            if action == REUSE:
                kept = state.kept_self(self._tgate_layer, x.shape[0], x.shape[1])
                if kept is not None:
                    return kept
            out = super().forward(x, context=context, mask=mask)
            state.computed_self(self._tgate_layer, out, keep=action == CACHE)
            return out

    return ScheduledSelfAttention


def _equal_halves(t: object) -> bool:
    if not torch.is_tensor(t) or t.dim() == 0 or t.shape[0] % 2:
        return False
    first, second = t.chunk(2)
    return torch.equal(first, second)


def _check_full_tokens(unet: torch.nn.Module) -> None:
    """Refuse DaTo's token pruning and ToMeSD's merging under the self-attention schedule: a kept attn1 output
    belongs to the tokens of the step that computed it."""
    dato = getattr(unet, "_dato", None)
    if dato is not None and dato.config.prunes:
        raise ValueError("T-GATE's self-attention schedule reuses attn1 outputs, which DaTo's pruned tokens would not "
                         "match: remove DaTo (datosd.remove_patch), use a strategy that does not prune (e.g. uniform "
                         "DeepCache), or T-GATE without the self-attention schedule")
    if any(is_class(module, "ToMeBlock") for module in unet.modules()):
        raise ValueError("T-GATE's self-attention schedule reuses attn1 outputs, which ToMeSD's merged tokens would "
                         "not match: remove ToMeSD (tomesd.remove_patch) or use T-GATE without the schedule")


def _halve_batch(unet, args, kwargs):
    """UNet forward pre-hook: on a gated "cfg_mean" step of a CFG batch whose halves have equal latents and
    timesteps, run only the first (unconditional) half (every tensor argument cut to its first half). With the
    self-attention schedule, the first call of a run checks that no patch prunes or merges tokens."""
    state: TGateState = unet._tgate
    state.halving = False
    if state.options.self_attention is not None and not state.run.checked:
        _check_full_tokens(unet)
        state.run.checked = True
    if not (state.gated and state.options.cache == "cfg_mean" and state.cfg_halves and args):
        return None
    x = args[0]
    timesteps = args[1] if len(args) > 1 else kwargs.get("timesteps")
    if not (_equal_halves(x) and _equal_halves(timesteps)):
        return None
    half = x.shape[0] // 2

    def first_half(value):
        return value[:half] if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == 2 * half else value

    state.halving = True
    state.run.halved += 1
    dato = getattr(unet, "_dato", None)
    if dato is not None:  # a DaTo patch on this UNet: the call it sees is no longer a CFG batch
        dato.model_call(cfg_halves=False)
    return tuple(first_half(a) for a in args), {k: first_half(v) for k, v in kwargs.items()}


def _copy_half(unet, args, kwargs, output):
    """UNet forward hook: the halved call's output, copied to both halves."""
    state: TGateState = unet._tgate
    if not state.halving:
        return None
    state.halving = False
    return torch.cat([output, output])


def apply_tgate(model: torch.nn.Module, options: Optional[TGateOptions] = None, **kwargs) -> TGateState:
    """Gate the cross-attention (and, with options.self_attention, schedule the self-attention) of a
    LatentDiffusion or an SDXL DiffusionEngine (or their UNetModel) in place and return its state.

    options: a TGateOptions, or its fields as keywords (gate_step, cache, self_attention).
    """
    if options is None:
        options = TGateOptions(**kwargs)
    elif kwargs:
        raise TypeError("pass either options or its fields as keywords, not both")
    remove_tgate(model)
    unet = find_unet(model)
    if options.self_attention is not None:
        _check_full_tokens(unet)
    state = TGateState(options=options)
    layers = patch_cross_attention(model, "_tgate", state, _gated_cross_attention_class, "gate", {
        "_text_prune": "this model has text pruning applied, which also replaces the cross-attention "
                       "layers; remove it (datosd.remove_text_pruning) before applying T-GATE"})
    for index, layer in enumerate(layers):
        layer._tgate_layer = index
    if options.self_attention is not None:
        for index, layer in enumerate(self_attention_layers(unet)):
            layer._tgate = state
            layer._tgate_layer = index
            layer.__class__ = _scheduled_self_attention_class(layer.__class__)
    state.handles = [unet.register_forward_pre_hook(_halve_batch, with_kwargs=True),
                     unet.register_forward_hook(_copy_half, with_kwargs=True)]
    return state


def remove_tgate(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply_tgate`: original classes, no state, no hooks. Safe on an unpatched model."""
    unet = find_unet(model)
    for layer in cross_attention_layers(unet) + self_attention_layers(unet):
        if hasattr(layer, "_tgate_layer"):
            del layer._tgate_layer
    state = unpatch_cross_attention(model, "_tgate")
    if state is not None:
        for handle in state.handles:
            handle.remove()
    return model
