"""T-GATE-style gating of cross-attention (Liu et al., "Faster Diffusion Through Temporal Attention
Decomposition", arXiv 2404.02747): cross-attention output stops changing after a few steps, so from the
gate step m on every `attn2` returns the output it computed last instead of computing (no Q/K/V projection,
no attention, no output projection). Self-attention is unchanged.

Steps i < m compute normally (bit-identical to the unpatched model). Each layer's cache is its output of the
last call before the gate (normally step m - 1; with DaTo / DeepCache, the last step that computed it).
`cache`:
- "cfg_mean" (the paper): the cache is the mean of the unconditional and conditional halves. Both halves
  then see the same cross-attention output and, their latents and timesteps being equal, the same UNet
  output: guidance cancels, and the UNet runs once on one half and the result is copied to the other (what
  the T-GATE pipelines do by dropping CFG after the gate). This halves the UNet's batch on gated steps.
- "per_half": each half keeps its own cached output; guidance stays in effect, the batch stays whole.

`apply_tgate(model, gate_step=10)` swaps the class of every `attn2` (tomesd manner, `_parent` kept) and adds
forward hooks on the UNet for the halved batch, so it composes with DaTo / DeepCache. All state is one
`TGateState` on the UNet, shared by reference with its layers, and a sampling hook of the model.
"""
import functools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .utils import HookedState, cross_attention_layers, find_unet, patch_cross_attention, unpatch_cross_attention

CACHE_MODES = ("cfg_mean", "per_half")


@dataclass(frozen=True)
class TGateOptions:
    """T-GATE's options (immutable; one set per patched model)."""

    gate_step: int = 10  # steps i >= gate_step reuse the cross-attention output
    cache: str = "cfg_mean"  # "cfg_mean": the CFG halves' mean (the paper); "per_half": each half its own

    def __post_init__(self) -> None:
        if isinstance(self.gate_step, bool) or not isinstance(self.gate_step, int) or self.gate_step < 1:
            raise ValueError(f"gate_step must be an integer >= 1 (steps before it compute cross-attention), "
                             f"got {self.gate_step!r}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")


@dataclass
class TGateRun:
    """What one sampling run accumulates; a new run starts from an empty one."""

    step: Optional[int] = None
    last_output: Dict[int, Tuple[torch.Tensor, bool]] = field(default_factory=dict)  # layer -> (out, CFG batch)
    cache: Dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> the output reused after the gate
    computed: int = 0  # attn2 calls that computed
    reused: int = 0  # attn2 calls that returned the cache
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
        self.run = TGateRun(computed=run.computed, reused=run.reused, halved=run.halved)
        self.halving = False

    @property
    def gated(self) -> bool:
        """True when the current step reuses cross-attention (step >= gate_step)."""
        return self.run.step is not None and self.run.step >= self.options.gate_step

    def remember(self, layer: int, output: torch.Tensor) -> None:
        """Keep a layer's newest output before the gate (a reference, no copy)."""
        if self.run.step is not None:
            self.run.last_output[layer] = (output.detach(), self.cfg_halves and not self.halving)
        self.run.computed += 1

    def cached(self, layer: int, batch: int, tokens: int) -> torch.Tensor:
        """The output a gated layer returns for a (batch, tokens, C) query."""
        run = self.run
        if layer not in run.cache:
            if layer not in run.last_output:
                raise RuntimeError(f"T-GATE: cross-attention layer {layer} never ran before gate step "
                                   f"{self.options.gate_step}, so it has no output to reuse")
            output, cfg_batch = run.last_output.pop(layer)
            if self.options.cache == "cfg_mean" and cfg_batch:
                uncond, cond = output.chunk(2)
                output = (uncond + cond) / 2
            run.cache[layer] = output
        cache = run.cache[layer]
        if cache.shape[1] != tokens:
            raise RuntimeError(f"T-GATE: layer {layer} cached {cache.shape[1]} query tokens but is called with "
                               f"{tokens}; T-GATE needs the cross-attention queries unpruned "
                               f"(DaTo's prune_crossattn off)")
        run.reused += 1
        if cache.shape[0] == batch:
            return cache
        if 2 * cache.shape[0] == batch:  # CFG mean, but this call's halves differ: both get the mean
            return torch.cat([cache, cache])
        raise RuntimeError(f"T-GATE: layer {layer} cached a batch of {cache.shape[0]}, called with {batch}")


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


def _equal_halves(t: object) -> bool:
    if not torch.is_tensor(t) or t.dim() == 0 or t.shape[0] % 2:
        return False
    first, second = t.chunk(2)
    return torch.equal(first, second)


def _halve_batch(unet, args, kwargs):
    """UNet forward pre-hook: on a gated "cfg_mean" step of a CFG batch whose halves have equal latents and
    timesteps, run only the first half (every tensor argument cut to its first half)."""
    state: TGateState = unet._tgate
    state.halving = False
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
    """Gate the cross-attention of a LatentDiffusion (or its UNetModel) in place and return its state.

    options: a TGateOptions, or its fields as keywords (gate_step, cache).
    """
    if options is None:
        options = TGateOptions(**kwargs)
    elif kwargs:
        raise TypeError("pass either options or its fields as keywords, not both")
    remove_tgate(model)
    state = TGateState(options=options)
    layers = patch_cross_attention(model, "_tgate", state, _gated_cross_attention_class, "gate", {
        "_text_prune": "this model has text pruning applied, which also replaces the cross-attention "
                       "layers; remove it (datosd.remove_text_pruning) before applying T-GATE"})
    for index, layer in enumerate(layers):
        layer._tgate_layer = index
    unet = find_unet(model)
    state.handles = [unet.register_forward_pre_hook(_halve_batch, with_kwargs=True),
                     unet.register_forward_hook(_copy_half, with_kwargs=True)]
    return state


def remove_tgate(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply_tgate`: original classes, no state, no hooks. Safe on an unpatched model."""
    for layer in cross_attention_layers(find_unet(model)):
        if hasattr(layer, "_tgate_layer"):
            del layer._tgate_layer
    state = unpatch_cross_attention(model, "_tgate")
    if state is not None:
        for handle in state.handles:
            handle.remove()
    return model
