"""Patch an ldm Stable Diffusion model with DaTo: per-step feature caching plus token pruning (spec 2-6).

`apply_patch(model, strategy)` swaps the class of the UNet (caching forward) and, when the strategy prunes,
of every `BasicTransformerBlock` (pruned self-attention), in the tomesd manner: each patched module keeps
its `_parent` class, and all run-time state lives in one `DatoState` on the UNet, shared by reference.
The samplers announce runs, steps and UNet calls through the model's typed `sampling_hooks`
(`ldm.models.diffusion.hooks`); the state is one of them.

SDXL (an sgm DiffusionEngine, sampled with EulerEDMSampler(..., sampling_hooks=engine.sampling_hooks)): the
UNet has 9 input and 9 output blocks, so any depth >= 9 (12 included) is a full step and SD 1.5 strategies
transfer unchanged. Its latent-resolution level has no attention: a depth-1 step (input_blocks[0] and
output_blocks[8]) runs no attention at all (`utils.attention_depth` gives the first depth that does, 4), and
N_max is the token count of the highest-resolution level that has transformer blocks (64 x 64 at 1024 x 1024:
input_blocks 4-5 and output_blocks 3-5 prune).
"""
import functools
import math
from dataclasses import dataclass, field, replace
from os import PathLike
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple, Union

import torch

from ldm.models.diffusion.hooks import SamplingHook, SamplingHooks

from .dato import TokenSelection, diff_score, pool_score, select_tokens
from .strategy import Strategy, call_kind
from .utils import attention_downsample, find_unet, is_class, is_diffusers_model

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
    # Per pruning grid (h, w), decided before the blocks run, so the blocks only read (compile-safe):
    scores: Dict[Tuple[int, int], Optional[torch.Tensor]] = field(default_factory=dict)  # (B, h, w), or None
    random_local: Dict[Tuple[int, int], torch.Tensor] = field(default_factory=dict)  # drawn bases where None


@dataclass(eq=False)
class DatoState(SamplingHook):
    """All state of one patched model (no module-level state anywhere): its strategy and options, the cache
    of the current run, and the call in progress. It is a sampling hook of the model it patches."""

    strategy: Optional[Strategy]
    options: DatoOptions
    prune_ratio: float = 0.0  # used at every step when there is no strategy
    attention_downsample: int = 1  # the highest-resolution attention level is latent / this (SDXL: 2); N_max
    run: RunCache = field(init=False)
    call: Optional[CallContext] = None
    cfg_halves: bool = False  # the sampler's word on the next call's batch
    hooks: Optional[SamplingHooks] = field(default=None, repr=False)  # the model's hooks this state joined
    compute: Callable = field(default=None, repr=False)  # the blocks of one call (eager, or compiled)
    clone_outputs: bool = False  # keep copies of cached outputs (CUDA graphs reuse their output buffers)

    def __post_init__(self) -> None:
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")
        self.reset()

    @property
    def prunes(self) -> bool:
        """True when some step prunes (the transformer blocks then need the pruning class)."""
        return self.prune_ratio > 0 or (self.strategy is not None and max(self.strategy.prune_ratio) > 0)

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
        kept = feature_map.detach().clone() if self.clone_outputs else feature_map.detach()
        self.run.score_maps = (self.run.score_maps + [kept])[-2:]

    # --- one UNet call: decided and prepared before the blocks run, stored after ---
    def begin_call(self, x: torch.Tensor, n_blocks: int) -> int:
        """Decide the cache depth of the call on x: (B, C, H, W), record it, and prepare what its pruning
        blocks read (CallContext). Returns the depth: 0 = return `run.final_cache`, >= n_blocks = full."""
        run = self.run
        depth, ratio = self.planned()
        key = (tuple(x.shape), x.dtype, x.device)
        if run.cache_key is not None and key != run.cache_key:
            run.score_maps = []  # spec 3 compares feature maps of equally shaped calls
        if depth >= n_blocks or key != run.cache_key or run.final_cache is None:
            depth = FULL_DEPTH
        elif 0 < depth < FULL_DEPTH and run.output_cache[n_blocks - 1 - depth] is None:
            depth = FULL_DEPTH
        run.calls.append(CallRecord(run.step, depth, ratio))
        if depth > 0:
            self.call = self._call_context(ratio, x)
        return depth

    def end_call(self, x: torch.Tensor, depth: int, outputs: List[torch.Tensor], out: torch.Tensor) -> None:
        """Store what later calls reuse: `outputs` = the output blocks' outputs this call computed (the last
        ones; the newest is the DiffScore feature map), `out` = the UNet output (spec 2, 3)."""
        run = self.run
        if depth >= FULL_DEPTH:
            run.output_cache = [None] * len(outputs)
        n_blocks = len(run.output_cache)
        keep = self._cached_blocks(n_blocks)
        for j, h in zip(range(n_blocks - len(outputs), n_blocks), outputs):
            if j in keep:
                run.output_cache[j] = h.clone() if self.clone_outputs else h
        if self.options.diff_source == "features":
            self.remember_scores(outputs[-1])
        else:
            self.remember_scores(out)
        run.final_cache = out.clone() if self.clone_outputs else out
        run.cache_key = (tuple(x.shape), x.dtype, x.device)
        self.call = None

    def _cached_blocks(self, n_blocks: int) -> FrozenSet[int]:
        """Output blocks whose outputs a later partial step reads: output_blocks[n - 1 - d] for each partial
        depth d of the strategy (every block when there is no strategy to tell)."""
        if self.strategy is None:
            return frozenset(range(n_blocks))
        depths = {self.strategy.step_setting(i)[0] for i in range(self.strategy.steps)}
        return frozenset(n_blocks - 1 - d for d in depths if 0 < d < n_blocks)

    def pruning_grids(self, latent_hw: Tuple[int, int]) -> List[Tuple[int, int]]:
        """Token grids (h, w) of the transformer blocks that prune (spec 6): the highest-resolution attention
        level (latent / attention_downsample) and the levels below it down to max_downsample."""
        top = self.attention_downsample
        height, width = latent_hw[0] // top, latent_hw[1] // top
        grids, downsample = [], 1
        while downsample <= self.options.max_downsample and height // downsample and width // downsample:
            grids.append((height // downsample, width // downsample))
            downsample *= 2
        return grids

    def _call_context(self, ratio: float, x: torch.Tensor) -> CallContext:
        """The call's per-grid scores (DiffScore, pooled, with the released code's noise when asked) or, before
        two feature maps exist, its random base positions, drawn from the run's seeded CPU generator (spec 3,
        4). One draw per grid and call: every pruning block of a grid in a call uses the same bases."""
        call = CallContext(ratio=ratio, latent_hw=(x.shape[-2], x.shape[-1]), cfg_halves=self.cfg_halves)
        if ratio <= 0:
            return call
        options, maps = self.options, self.run.score_maps
        batch = x.shape[0]
        aligned = options.align_cfg and call.cfg_halves and batch % 2 == 0
        rows = batch // 2 if aligned else batch
        (sy, sx), newest = options.patch, None
        if len(maps) == 2:
            newest = diff_score(maps[1], maps[0])
        for hw in self.pruning_grids(call.latent_hw):
            if newest is None:
                call.scores[hw] = None
                patches = (hw[0] // sy) * (hw[1] // sx)
                call.random_local[hw] = torch.randint(sy * sx, (rows, patches), generator=self.run.generator
                                                      ).to(x.device)
                continue
            score = newest if tuple(newest.shape[-2:]) == hw else pool_score(newest, hw)
            call.scores[hw] = self.noisy_score(score) if options.score_noise is not None else score
        return call

    def noisy_score(self, score: torch.Tensor) -> torch.Tensor:
        """The released code's score (spec 3): +-w_diff * DiffScore + w_noise * N(0, 1), the sign flipped with
        probability 1/2; drawn per call and grid from the run's seeded CPU generator."""
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
    """Patch a LatentDiffusion (or its UNetModel) in place and return its state; a diffusers pipeline or its
    UNet2DConditionModel goes to `datosd.diffusers_patch.apply_patch` (same arguments).

    strategy: a Strategy, a strategy YAML path, or None (every step full, pruning at `prune_ratio`).
    options: the fields of `DatoOptions` (diff_source, align_cfg, cfg_reference, recover_from,
    max_downsample, prune_selfattn, prune_crossattn, prune_mlp, patch, score_noise, seed).
    """
    if is_diffusers_model(model):
        from .diffusers_patch import apply_patch as apply_diffusers_patch

        return apply_diffusers_patch(model, strategy, prune_ratio=prune_ratio, **options)
    remove_patch(model)
    unet = find_unet(model)
    state = DatoState(strategy=_resolve_strategy(strategy), options=DatoOptions(**options),
                      prune_ratio=prune_ratio, attention_downsample=attention_downsample(unet),
                      compute=compute_blocks)
    unet._dato = state
    unet.__class__ = _caching_unet_class(unet.__class__)
    if state.prunes:
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
    if state.hooks is not None:
        state.hooks.remove(state)
    return model


@functools.lru_cache(maxsize=None)
def _caching_unet_class(unet_class: type) -> type:
    """The caching subclass of unet_class, made once per class: compiled graphs guard on classes, so they
    survive removing and re-applying the patch."""

    class DatoUNetModel(unet_class):
        """UNetModel whose forward follows the step's cache depth (spec 2)."""

        _parent = unet_class

        def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
            return _caching_forward(self, x, timesteps, context, y)

    return DatoUNetModel


def _caching_forward(unet, x, timesteps, context, y):
    """x: (B, C, H, W) -> (B, C_out, H, W), computing only the blocks the step's depth asks for."""
    state: DatoState = unet._dato
    n_blocks = len(unet.output_blocks)
    depth = state.begin_call(x, n_blocks)
    if depth == 0:
        return state.run.final_cache  # spec 2: every block reused, so the prediction is the last computed one
    cached = None if depth >= FULL_DEPTH else state.run.output_cache[n_blocks - 1 - depth]
    out, outputs = state.compute(unet, x, timesteps, context, y, depth, cached)
    state.end_call(x, depth, outputs, out)
    return out


def compute_blocks(unet, x, timesteps, context, y, depth: int, cached: Optional[torch.Tensor]):
    """The blocks of one call at cache depth `depth` (spec 2), a pure function of its inputs (compilable).

    x: (B, C, H, W); cached: the output of output_blocks[n - 1 - depth] of the last computed call (None for a
    full call). Returns (UNet output (B, C_out, H, W), the outputs of the output blocks it ran, in order).
    """
    emb = unet.embed_time(timesteps, y)
    n_blocks = len(unet.output_blocks)
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
        h = cached
    outputs = []
    for j in range(first_output, n_blocks):
        h = torch.cat([h, hs.pop()], dim=1)
        h = unet.output_blocks[j](h, emb, context)
        outputs.append(h)
    return unet.out(h), outputs


@functools.lru_cache(maxsize=None)
def _pruning_block_class(block_class: type) -> type:
    """The pruning subclass of block_class, made once per class (see _caching_unet_class)."""

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
    top = state.attention_downsample
    height, width = call.latent_hw[0] // top, call.latent_hw[1] // top  # the N_max grid (spec 6)
    n_tokens = x.shape[1]
    if n_tokens * state.options.max_downsample ** 2 < height * width:
        return None
    downsample = 1
    while (height // downsample) * (width // downsample) > n_tokens:
        downsample *= 2
    hw = (height // downsample, width // downsample)
    if hw not in call.scores:
        raise RuntimeError(f"cannot place {n_tokens} tokens on a pruning grid of a {height}x{width} attention level")
    options = state.options
    return select_tokens(x, call.scores[hw], call.ratio, hw, patch=options.patch,
                         cfg_halves=options.align_cfg and call.cfg_halves, cfg_reference=options.cfg_reference,
                         recover_from=options.recover_from, random_local=call.random_local.get(hw))
