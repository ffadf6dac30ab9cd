"""Patch an ldm Stable Diffusion model with DaTo: per-step feature caching plus token pruning (spec 2-6).

`apply_patch(model, strategy)` swaps the class of the UNet (caching forward, `caching.caching_forward`) and,
when the strategy prunes, of every `BasicTransformerBlock` (pruned self-attention), in the tomesd manner: each
patched module keeps its `_parent` class, and all run-time state lives in one `DatoState` on the UNet, shared
by reference. The samplers announce runs, steps and UNet calls through the model's typed `sampling_hooks`
(`ldm.models.diffusion.hooks`); the state is one of them. A diffusers pipeline goes to `diffusers_patch`.

SDXL (an sgm DiffusionEngine, sampled with EulerEDMSampler(..., sampling_hooks=engine.sampling_hooks)): the
UNet has 9 input and 9 output blocks, so any depth >= 9 (12 included) is a full step and SD 1.5 strategies
transfer unchanged. Its latent-resolution level has no attention: a depth-1 step (input_blocks[0] and
output_blocks[8]) runs no attention at all (`utils.attention_depth` gives the first depth that does, 4), and
N_max is the token count of the highest-resolution level that has transformer blocks (64 x 64 at 1024 x 1024:
input_blocks 4-5 and output_blocks 3-5 prune).
"""
import functools
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from .caching import caching_forward, compute_blocks, pruned, token_selection
from .state import DatoConfig, DatoOptions, DatoState
from .strategy import StrategyLike, load_strategy
from .utils import (attention_downsample, check_not_merged, find_unet, is_class, is_diffusers_model,
                    sampling_hooks_of)


@dataclass(frozen=True)
class LdmBlocks:
    """The blocks of a CompVis / generative-models UNetModel (`caching.UNetBlocks`); cond: {'timesteps': (B,),
    'context': (B, M, D) or None, 'y': (B, V) or None}."""

    unet: torch.nn.Module

    @property
    def n_blocks(self) -> int:
        return len(self.unet.output_blocks)

    def begin(self, x: torch.Tensor, cond: Dict[str, Any]) -> Tuple[torch.Tensor, Tuple]:
        return x, (self.unet.embed_time(cond["timesteps"], cond["y"]), cond["context"])

    def input_block(self, k: int, h: torch.Tensor, ctx: Tuple) -> torch.Tensor:
        return self.unet.input_blocks[k](h, *ctx)

    def middle_block(self, h: torch.Tensor, ctx: Tuple) -> torch.Tensor:
        return self.unet.middle_block(h, *ctx)

    def output_block(self, j: int, h: torch.Tensor, ctx: Tuple, next_skip: Optional[torch.Tensor]) -> torch.Tensor:
        return self.unet.output_blocks[j](h, *ctx)

    def out(self, h: torch.Tensor, ctx: Tuple) -> torch.Tensor:
        return self.unet.out(h)


def apply_patch(model: torch.nn.Module, strategy: StrategyLike = None, prune_ratio: float = 0.0,
                **options) -> DatoState:
    """Patch a LatentDiffusion or SDXL DiffusionEngine (or its UNetModel) in place and return its state; a
    diffusers pipeline or its UNet2DConditionModel goes to `datosd.diffusers_patch.apply_patch` (same arguments).

    strategy: a Strategy, a strategy YAML path, a shipped strategy's name ('b1'), or None (every step full,
    pruning at `prune_ratio`). options: the fields of `DatoOptions` (diff_source, cfg_reference, recover_from,
    align_cfg, max_downsample, prune_crossattn, prune_mlp, score_noise, patch, seed).
    A bare UNetModel is driven by hand: call the returned state's sampling-hook methods around its calls.
    """
    if is_diffusers_model(model):
        from .diffusers_patch import apply_patch as apply_diffusers_patch

        return apply_diffusers_patch(model, strategy, prune_ratio=prune_ratio, **options)
    unet = find_unet(model)
    hooks = sampling_hooks_of(model)
    config = DatoConfig(strategy=load_strategy(strategy), options=DatoOptions(**options), prune_ratio=prune_ratio,
                        attention_downsample=attention_downsample(unet), n_blocks=len(unet.output_blocks))
    remove_patch(model)
    blocks = [m for m in unet.modules() if is_class(m, "BasicTransformerBlock")] if config.prunes else []
    check_not_merged(unet, blocks)
    state = DatoState(config, compute_blocks)
    unet._dato = state
    unet._dato_blocks = LdmBlocks(unet)
    unet.__class__ = _caching_unet_class(unet.__class__)
    for block in blocks:
        block._dato = state
        block.__class__ = _pruning_block_class(block.__class__)
    if hooks is not None:
        state.join_hooks(hooks)
    return state


def remove_patch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply_patch`: original classes, no state, no hook. Safe to call on an unpatched model."""
    if is_diffusers_model(model):
        from .diffusers_patch import remove_patch as remove_diffusers_patch

        return remove_diffusers_patch(model)
    unet = find_unet(model)
    state = getattr(unet, "_dato", None)
    if state is None:
        return model
    for module in unet.modules():
        if getattr(module, "_dato", None) is state:
            module.__class__ = module._parent
            del module._dato
    del unet._dato_blocks
    state.leave_hooks()
    return model


@functools.lru_cache(maxsize=None)
def _caching_unet_class(unet_class: type) -> type:
    """The caching subclass of unet_class, made once per class: compiled graphs guard on classes, so they
    survive removing and re-applying the patch."""

    class DatoUNetModel(unet_class):
        """UNetModel whose forward follows the step's cache depth (spec 2)."""

        _parent = unet_class

        def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
            """x: (B, C, H, W) -> (B, C_out, H, W)."""
            return caching_forward(self._dato, self._dato_blocks, x,
                                   {"timesteps": timesteps, "context": context, "y": y})

    return DatoUNetModel


@functools.lru_cache(maxsize=None)
def _pruning_block_class(block_class: type) -> type:
    """The pruning subclass of block_class, made once per class (see _caching_unet_class)."""

    class DatoBlock(block_class):
        """BasicTransformerBlock that runs attention on the kept tokens only (spec 6)."""

        _parent = block_class

        def _forward(self, x, context=None):
            selection = token_selection(self._dato, x)
            if selection is None:
                return super()._forward(x, context=context)
            options = self._dato.options
            self_context = context if self.disable_self_attn else None
            x = pruned(self.attn1, self.norm1, x, selection, True, context=self_context)
            x = pruned(self.attn2, self.norm2, x, selection, options.prune_crossattn, context=context)
            return pruned(self.ff, self.norm3, x, selection, options.prune_mlp)

    return DatoBlock
