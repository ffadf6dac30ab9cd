"""Patch an ldm Stable Diffusion model with DaTo: per-step feature caching plus token pruning (spec 2-6).

`apply_patch(model, strategy)` swaps the class of the UNet (caching forward) and, when the strategy prunes,
of every `BasicTransformerBlock` (pruned self-attention), in the tomesd manner: each patched module keeps
its `_parent` class, and all run-time state lives in one `DatoState` on the UNet, shared by reference.
The samplers announce runs, steps and UNet calls through the model's typed `sampling_hooks`
(`ldm.models.diffusion.hooks`); the state is one of them.
"""
import math
from dataclasses import dataclass, field, replace
from os import PathLike
from typing import Dict, List, Optional, Tuple, Union

import torch

from ldm.models.diffusion.hooks import SamplingHook, SamplingHooks

from .dato import TokenSelection, diff_score, pool_score, select_tokens
from .strategy import Strategy, call_kind
from .utils import find_unet, is_class

FULL_DEPTH = 12
StrategyLike = Union[Strategy, str, PathLike, None]


@dataclass(frozen=True)
class DatoOptions:
    """The spec's options with its defaults (immutable; one set per patched model)."""

    diff_source: str = "features"  # spec 3: output_blocks[11] feature map ("features") or the UNet output ("eps")
    align_cfg: bool = True  # spec 4: both CFG halves share the reference half's base positions
    cfg_reference: str = "cond"  # spec 4: which half chooses ("uncond" reproduces the released code)
    recover_from: str = "base"  # spec 6: pruned tokens copy a base token ("kept": any kept token)
    max_downsample: int = 1  # spec 6: prune blocks with at least N_max / max_downsample^2 tokens
    prune_selfattn: bool = True
    prune_crossattn: bool = False
    prune_mlp: bool = False
    patch: Tuple[int, int] = (2, 2)  # spec 4: base-token patch (sy, sx)
    score_noise: Optional[Tuple[float, float]] = None  # spec 3: (diff weight, noise weight); released: (0.1, 0.1)
    seed: int = 0  # seeds every random draw of a run (random base tokens, score noise)

    def __post_init__(self) -> None:
        if self.diff_source not in ("features", "eps"):
            raise ValueError(f"diff_source must be 'features' or 'eps', got {self.diff_source!r}")
        if self.cfg_reference not in ("cond", "uncond"):
            raise ValueError(f"cfg_reference must be 'cond' or 'uncond', got {self.cfg_reference!r}")
        if self.recover_from not in ("base", "kept"):
            raise ValueError(f"recover_from must be 'base' or 'kept', got {self.recover_from!r}")
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"max_downsample must be 1, 2, 4 or 8, got {self.max_downsample}")
        if len(self.patch) != 2 or min(self.patch) < 1:
            raise ValueError(f"patch must be two positive sizes (sy, sx), got {self.patch}")
        if self.score_noise is not None:
            weights = tuple(float(w) for w in self.score_noise)
            if len(weights) != 2 or not all(math.isfinite(w) and w >= 0 for w in weights):
                raise ValueError(f"score_noise must be two finite weights >= 0 (diff, noise), got {self.score_noise}")
            object.__setattr__(self, "score_noise", weights)


# The options that reproduce behaviours of the authors' released code (spec 3, 4, 6). What the released code
# still does differently is listed in README.md ("Released-code parity preset") and docs/DATO_SPEC.md.
RELEASED_CODE_PARITY = dict(diff_source="eps", cfg_reference="uncond", recover_from="kept", score_noise=(0.1, 0.1))


@dataclass
class CallRecord:
    """One UNet call: the sampler step it served, the cache depth and prune ratio it ran with."""

    step: Optional[int]
    depth: int
    ratio: float

    @property
    def kind(self) -> str:
        return call_kind(self.depth)


@dataclass
class RunCache:
    """What one sampling run accumulates (spec 2, 3); a new run starts from an empty one."""

    generator: torch.Generator
    step: Optional[int] = None
    output_cache: List[Optional[torch.Tensor]] = field(default_factory=list)  # per output block, last output
    final_cache: Optional[torch.Tensor] = None  # the last computed UNet output
    cache_key: Optional[Tuple] = None  # (shape, dtype, device) of the calls the caches were filled by
    score_maps: List[torch.Tensor] = field(default_factory=list)  # the two newest DiffScore maps, oldest first
    calls: List[CallRecord] = field(default_factory=list)


@dataclass
class CallContext:
    """The UNet call in progress, as the pruning blocks need it."""

    ratio: float
    latent_hw: Tuple[int, int]
    cfg_halves: bool
    scores: Dict[Tuple[int, int], Optional[torch.Tensor]] = field(default_factory=dict)  # DiffScore per grid


@dataclass(eq=False)
class DatoState(SamplingHook):
    """All state of one patched model (no module-level state anywhere): its strategy and options, the cache
    of the current run, and the call in progress. It is a sampling hook of the model it patches."""

    strategy: Optional[Strategy]
    options: DatoOptions
    prune_ratio: float = 0.0  # used at every step when there is no strategy
    run: RunCache = field(init=False)
    call: Optional[CallContext] = None
    cfg_halves: bool = False  # the sampler's word on the next call's batch
    hooks: Optional[SamplingHooks] = field(default=None, repr=False)  # the model's hooks this state joined

    def __post_init__(self) -> None:
        self.reset()

    # --- sampling hooks (ldm.models.diffusion.hooks) ---
    def sampling_started(self, num_steps: int) -> None:
        """A new run: check the strategy length and empty every cache (spec 2: nothing shared between runs)."""
        if self.strategy is not None:
            self.strategy.check_steps(num_steps)
        self.reset()

    def step_started(self, step: int) -> None:
        self.run.step = step

    def model_call(self, cfg_halves: bool) -> None:
        self.cfg_halves = cfg_halves

    def sampling_finished(self) -> None:
        """Free the run's tensors; the call records stay readable until the next run."""
        self.run = RunCache(generator=self.run.generator, calls=self.run.calls)
        self.call = None

    # --- for users driving the UNet themselves ---
    def reset(self) -> None:
        """Start a new run: empty caches, the random draws seeded again."""
        self.run = RunCache(generator=torch.Generator().manual_seed(self.options.seed))
        self.call = None

    def set_step(self, step: Optional[int]) -> None:
        """Which sampler step the next UNet calls belong to (None: no strategy step, compute everything)."""
        self.run.step = step

    def reseed(self, seed: int) -> None:
        """Seed the random draws of the following runs with `seed` (base tokens, score noise)."""
        self.options = replace(self.options, seed=seed)
        self.reset()

    @property
    def calls(self) -> List[CallRecord]:
        """The UNet calls of the current (or last) run."""
        return self.run.calls

    def planned(self) -> Tuple[int, float]:
        """(cache depth, prune ratio) the current step asks for."""
        step = self.run.step
        if step is None or self.strategy is None:
            return FULL_DEPTH, self.prune_ratio
        if step >= self.strategy.steps:
            raise IndexError(f"step {step} is past the strategy's {self.strategy.steps} steps")
        return self.strategy.step_setting(step)

    def remember_scores(self, feature_map: torch.Tensor) -> None:
        """Keep the two most recent maps that DiffScore compares (spec 3)."""
        self.run.score_maps = (self.run.score_maps + [feature_map.detach()])[-2:]

    def score_for(self, hw: Tuple[int, int]) -> Optional[torch.Tensor]:
        """DiffScore (B, h, w) at a block grid, or None while fewer than two maps exist (random bases)."""
        scores = self.call.scores
        if hw not in scores:
            maps = self.run.score_maps
            if len(maps) < 2:
                scores[hw] = None
            else:
                score = diff_score(maps[1], maps[0])
                scores[hw] = score if tuple(score.shape[-2:]) == hw else pool_score(score, hw)
        return scores[hw]

    def noisy_score(self, score: torch.Tensor) -> torch.Tensor:
        """The released code's score (spec 3): +-w_diff * DiffScore + w_noise * N(0, 1), the sign flipped with
        probability 1/2; drawn per pruning block from the run's seeded CPU generator."""
        w_diff, w_noise = self.options.score_noise
        generator = self.run.generator
        sign = 1.0 if torch.randint(2, (1,), generator=generator).item() == 0 else -1.0
        noise = torch.randn(tuple(score.shape), generator=generator, dtype=torch.float32)
        return sign * w_diff * score + w_noise * noise.to(device=score.device, dtype=score.dtype)


def _resolve_strategy(strategy: StrategyLike) -> Optional[Strategy]:
    if strategy is None or isinstance(strategy, Strategy):
        return strategy
    return Strategy.load(strategy)


def apply_patch(model: torch.nn.Module, strategy: StrategyLike = None, prune_ratio: float = 0.0,
                **options) -> DatoState:
    """Patch a LatentDiffusion (or its UNetModel) in place and return its state.

    strategy: a Strategy, a strategy YAML path, or None (every step full, pruning at `prune_ratio`).
    options: the fields of `DatoOptions` (diff_source, align_cfg, cfg_reference, recover_from,
    max_downsample, prune_selfattn, prune_crossattn, prune_mlp, patch, score_noise, seed).
    """
    remove_patch(model)
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    unet = find_unet(model)
    state = DatoState(strategy=_resolve_strategy(strategy), options=DatoOptions(**options),
                      prune_ratio=prune_ratio)
    unet._dato = state
    unet.__class__ = _caching_unet_class(unet.__class__)
    prunes = prune_ratio > 0 or (state.strategy is not None and max(state.strategy.prune_ratio) > 0)
    if prunes:
        for module in unet.modules():
            if is_class(module, "BasicTransformerBlock"):
                module._dato = state
                module.__class__ = _pruning_block_class(module.__class__)
    hooks = getattr(model, "sampling_hooks", None)
    if hooks is not None:
        hooks.add(state)
        state.hooks = hooks
    return state


def remove_patch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply_patch`: original classes, no state, no hook. Safe to call on an unpatched model."""
    unet = find_unet(model)
    state = getattr(unet, "_dato", None)
    if state is None:
        return model
    for module in unet.modules():
        if getattr(module, "_dato", None) is state:
            module.__class__ = module._parent
            del module._dato
    if state.hooks is not None:
        state.hooks.remove(state)
    return model


def _caching_unet_class(unet_class: type) -> type:
    class DatoUNetModel(unet_class):
        """UNetModel whose forward follows the step's cache depth (spec 2)."""

        _parent = unet_class

        def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
            return _caching_forward(self, x, timesteps, context, y)

    return DatoUNetModel


def _caching_forward(unet, x, timesteps, context, y):
    """x: (B, C, H, W) -> (B, C_out, H, W), computing only the blocks the step's depth asks for."""
    state: DatoState = unet._dato
    run = state.run
    depth, ratio = state.planned()
    key = (tuple(x.shape), x.dtype, x.device)
    n_blocks = len(unet.output_blocks)
    if run.cache_key is not None and key != run.cache_key:
        run.score_maps = []  # spec 3 compares feature maps of equally shaped calls (T-GATE halves the batch)
    if depth >= n_blocks or key != run.cache_key or run.final_cache is None:
        depth = FULL_DEPTH
    elif 0 < depth < FULL_DEPTH and run.output_cache[n_blocks - 1 - depth] is None:
        depth = FULL_DEPTH
    run.calls.append(CallRecord(run.step, depth, ratio))
    if depth == 0:
        return run.final_cache  # spec 2: every block reused, so the prediction is the last computed one
    state.call = CallContext(ratio=ratio, latent_hw=(x.shape[-2], x.shape[-1]), cfg_halves=state.cfg_halves)
    emb = unet.embed_time(timesteps, y)
    if depth >= FULL_DEPTH:
        run.output_cache = [None] * n_blocks
    hs = []
    h = x
    for k in range(min(depth, len(unet.input_blocks))):
        h = unet.input_blocks[k](h, emb, context)
        hs.append(h)
    if depth >= FULL_DEPTH:
        h = unet.middle_block(h, emb, context)
        first_output = 0
    else:
        first_output = n_blocks - depth
        h = run.output_cache[first_output - 1]
    for j in range(first_output, n_blocks):
        h = torch.cat([h, hs.pop()], dim=1)
        h = unet.output_blocks[j](h, emb, context)
        run.output_cache[j] = h
    if state.options.diff_source == "features":
        state.remember_scores(h)
    out = unet.out(h)
    if state.options.diff_source == "eps":
        state.remember_scores(out)
    run.final_cache = out
    run.cache_key = key
    state.call = None
    return out


def _pruning_block_class(block_class: type) -> type:
    class DatoBlock(block_class):
        """BasicTransformerBlock that runs attention on the kept tokens only (spec 6)."""

        _parent = block_class

        def _forward(self, x, context=None):
            selection = _selection_for(self._dato, x)
            if selection is None:
                return super()._forward(x, context=context)
            options = self._dato.options
            self_context = context if self.disable_self_attn else None
            x = _pruned(self.attn1, self.norm1, x, selection, options.prune_selfattn, context=self_context)
            x = _pruned(self.attn2, self.norm2, x, selection, options.prune_crossattn, context=context)
            x = _pruned(self.ff, self.norm3, x, selection, options.prune_mlp)
            return x

    return DatoBlock


def _pruned(layer, norm, x, selection: TokenSelection, prune: bool, **kwargs) -> torch.Tensor:
    """Residual sub-layer x + layer(norm(x)), on the kept tokens when `prune` (outputs copied to pruned ones)."""
    if not prune:
        return layer(norm(x), **kwargs) + x
    return selection.recover(layer(norm(selection.prune(x)), **kwargs)) + x


def _selection_for(state: DatoState, x: torch.Tensor) -> Optional[TokenSelection]:
    """The token selection of one block input x: (B, N, C), or None when this block does not prune."""
    call = state.call
    if call is None or call.ratio <= 0:
        return None
    height, width = call.latent_hw
    n_tokens = x.shape[1]
    if n_tokens * state.options.max_downsample ** 2 < height * width:
        return None
    downsample = 1
    while (height // downsample) * (width // downsample) > n_tokens:
        downsample *= 2
    hw = (height // downsample, width // downsample)
    if hw[0] * hw[1] != n_tokens:
        raise RuntimeError(f"cannot place {n_tokens} tokens on the grid of a {height}x{width} latent")
    options = state.options
    score = state.score_for(hw)
    if score is not None and options.score_noise is not None:
        score = state.noisy_score(score)
    return select_tokens(x, score, call.ratio, hw, patch=options.patch,
                         cfg_halves=options.align_cfg and call.cfg_halves, cfg_reference=options.cfg_reference,
                         recover_from=options.recover_from, generator=state.run.generator)
