"""The state of one DaTo patch, in three parts: what it was applied with (`DatoConfig`, frozen: strategy,
options, the model's facts), what one sampling run accumulates (`RunCache`) and the UNet call in progress
(`CallContext`). `DatoState` holds them and is the only thing that changes them; it is a sampling hook of the
model it patches, and everything outside `datosd` uses its methods.
"""
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

from .dato import diff_score, pool_score
from .strategy import MAX_DEPTH, Strategy, call_kind
from .utils import HookedState

DIFF_SOURCES = ("features", "eps")
CFG_REFERENCES = ("cond", "uncond")
RECOVER_FROM = ("base", "kept")
MAX_DOWNSAMPLES = (1, 2, 4, 8)


def _option(about: str, **codec) -> dict:
    """Field metadata of a user-facing option: its one-line help (sdgen makes its flag and name token from it)
    and, for a choice, `choices`."""
    return {"help": about, **codec}


@dataclass(frozen=True)
class DatoOptions:
    """The spec's options with its defaults (immutable; one set per patched model). The fields with `help`
    metadata are the user-facing options (flags, method-name tokens), in the order they are written."""

    diff_source: str = field(default="features", metadata=_option(
        "DiffScore source: the output_blocks[11] feature map (features, the paper's: spec 3) or the UNet output "
        "(eps, the released code's)", choices=DIFF_SOURCES))
    cfg_reference: str = field(default="cond", metadata=_option(
        "CFG half that chooses the base tokens (spec 4; uncond reproduces the released code)",
        choices=CFG_REFERENCES))
    recover_from: str = field(default="base", metadata=_option(
        "pruned tokens copy their most similar base token (base, spec 6) or kept token (kept)",
        choices=RECOVER_FROM))
    align_cfg: bool = field(default=True, metadata=_option(
        "both CFG halves share the reference half's base positions (spec 4)"))
    max_downsample: int = field(default=1, metadata=_option(
        "prune transformer blocks down to this downsampling (spec 6; 1: highest resolution only)",
        choices=MAX_DOWNSAMPLES))
    prune_crossattn: bool = field(default=False, metadata=_option("also prune around cross-attention (spec 6)"))
    prune_mlp: bool = field(default=False, metadata=_option("also prune around the feed-forward (spec 6)"))
    score_noise: Optional[Tuple[float, float]] = field(default=None, metadata=_option(
        "the released code's score: +-W_DIFF * DiffScore + W_NOISE * N(0,1) (spec 3; it uses 0.1 0.1)",
        names=("W_DIFF", "W_NOISE")))
    patch: Tuple[int, int] = (2, 2)  # spec 4: base-token patch (sy, sx)
    seed: int = 0  # seeds every random draw of a run (random base tokens, score noise)

    def __post_init__(self) -> None:
        for name, allowed in (("diff_source", DIFF_SOURCES), ("cfg_reference", CFG_REFERENCES),
                              ("recover_from", RECOVER_FROM)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be {' or '.join(repr(a) for a in allowed)}, got "
                                 f"{getattr(self, name)!r}")
        if self.max_downsample not in MAX_DOWNSAMPLES:
            raise ValueError(f"max_downsample must be 1, 2, 4 or 8, got {self.max_downsample}")
        if len(self.patch) != 2 or min(self.patch) < 1:
            raise ValueError(f"patch must be two positive sizes (sy, sx), got {self.patch}")
        if self.score_noise is not None:
            weights = tuple(float(w) for w in self.score_noise)
            if len(weights) != 2 or not all(math.isfinite(w) and w >= 0 for w in weights):
                raise ValueError(f"score_noise must be two finite weights >= 0 (diff, noise), got {self.score_noise}")
            object.__setattr__(self, "score_noise", weights)


# The options that reproduce behaviours of the authors' released code (spec 3, 4, 6). What the released code
# still does differently is listed in docs/methods.md ("The released-code parity preset") and docs/DATO_SPEC.md.
RELEASED_CODE_PARITY = dict(diff_source="eps", cfg_reference="uncond", recover_from="kept", score_noise=(0.1, 0.1))


@dataclass(frozen=True)
class DatoConfig:
    """What a patch was applied with: the strategy (None: every step full, pruning at `prune_ratio`), the
    options, and the patched UNet's facts: its input-block count (a depth >= n_blocks computes everything; SD
    1.x 12, SDXL 9) and how far below the latent its first attention level is (SDXL: 2; N_max, spec 6)."""

    strategy: Optional[Strategy]
    options: DatoOptions
    prune_ratio: float = 0.0
    attention_downsample: int = 1
    n_blocks: int = MAX_DEPTH

    def __post_init__(self) -> None:
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")

    @property
    def prunes(self) -> bool:
        """True when some step prunes (the transformer blocks then need the pruning class)."""
        return self.prune_ratio > 0 or (self.strategy is not None and max(self.strategy.prune_ratio) > 0)

    def planned(self, step: Optional[int]) -> Tuple[int, float]:
        """(cache depth, prune ratio) that sampler step `step` asks for (None: no strategy step, full)."""
        if step is None or self.strategy is None:
            return MAX_DEPTH, self.prune_ratio
        if step >= self.strategy.steps:
            raise IndexError(f"step {step} is past the strategy's {self.strategy.steps} steps")
        return self.strategy.step_setting(step, self.n_blocks)

    def cached_blocks(self) -> FrozenSet[int]:
        """Output blocks whose outputs a later partial step reads: output_blocks[n - 1 - d] for each partial
        depth d of the strategy (every block when there is no strategy to tell)."""
        n = self.n_blocks
        if self.strategy is None:
            return frozenset(range(n))
        depths = {self.strategy.step_setting(i, n)[0] for i in range(self.strategy.steps)}
        return frozenset(n - 1 - d for d in depths if 0 < d < n)

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


@dataclass
class CallRecord:
    """One UNet call: the sampler step it served, the cache depth it ran with (MAX_DEPTH: full) and its ratio."""

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


# compute(blocks, x, cond, depth, cached) -> (UNet output, the outputs of the output blocks it ran), as
# `caching.compute_blocks`
Compute = Callable


class DatoState(HookedState):
    """All state of one patched model (no module-level state anywhere): `config` (frozen), the current run's
    `run` cache and the `call` in progress. The samplers drive it through its sampling-hook methods; a user
    driving the UNet by hand calls them too (`sampling_started`, `step_started`, `model_call`).

    compute: what runs the blocks of one call (`caching.compute_blocks`, or a compiled version of it, set with
    `use_compute`).
    """

    def __init__(self, config: DatoConfig, compute: Compute):
        self.config = config
        self._eager_compute = compute
        self._compute = compute
        self._clone_outputs = False  # keep copies of cached outputs (CUDA graphs reuse their output buffers)
        self.cfg_halves = False  # the sampler's word on the next call's batch
        self.call: Optional[CallContext] = None
        self.reset()

    @property
    def strategy(self) -> Optional[Strategy]:
        return self.config.strategy

    @property
    def options(self) -> DatoOptions:
        return self.config.options

    @property
    def attention_downsample(self) -> int:
        return self.config.attention_downsample

    @property
    def compute(self) -> Compute:
        return self._compute

    @property
    def step(self) -> Optional[int]:
        """The sampler step the current calls belong to (None outside a strategy step)."""
        return self.run.step

    @property
    def calls(self) -> List[CallRecord]:
        """The UNet calls of the current (or last) run."""
        return self.run.calls

    # --- sampling hooks (ldm.models.diffusion.hooks) ---
    def sampling_started(self, num_steps: int) -> None:
        """A new run: check the strategy length and empty every cache (spec 2: nothing shared between runs)."""
        if self.strategy is not None:
            self.strategy.check_steps(num_steps)
        self.reset()

    def step_started(self, step: int) -> None:
        self.run.step = step

    def model_call(self, cfg_halves: bool) -> None:
        """Whether the next UNet call's batch is [unconditional; conditional] (spec 4)."""
        self.cfg_halves = cfg_halves

    def sampling_finished(self) -> None:
        """Free the run's tensors; the call records stay readable until the next run."""
        self._use_run(RunCache(generator=self._slots[0].generator, calls=self._slots[0].calls))

    # --- set up by the patch and its users ---
    def reset(self) -> None:
        """Start a new run: empty caches, the random draws seeded again."""
        self._use_run(RunCache(generator=torch.Generator().manual_seed(self.options.seed)))

    def reseed(self, seed: int) -> None:
        """Seed the random draws of the following runs with `seed` (base tokens, score noise)."""
        self.config = replace(self.config, options=replace(self.options, seed=seed))
        self.reset()

    def use_compute(self, compute: Optional[Compute], clone_outputs: bool = False) -> None:
        """Run the blocks of every call with `compute` (None: the eager blocks); clone_outputs: keep copies of
        what the caches hold (compute's outputs are overwritten by its next call, as with CUDA graphs)."""
        self._compute = self._eager_compute if compute is None else compute
        self._clone_outputs = clone_outputs and compute is not None

    def use_slot(self, index: int) -> None:
        """Make the cache of the index-th UNet call at one sampler position current (0: the run's own one,
        which the hooks and `calls` see). Calls at one position that are not one batch (guidance run as two
        calls) each keep their own features; every slot shares the run's generator, step and call records."""
        first = self._slots[0]
        while len(self._slots) <= index:
            self._slots.append(RunCache(generator=first.generator, calls=first.calls))
        self.run = self._slots[index]
        self.run.step = first.step

    def _use_run(self, run: RunCache) -> None:
        self.run = run
        self._slots = [run]
        self.call = None

    # --- one UNet call: decided and prepared before the blocks run, stored after ---
    def planned(self) -> Tuple[int, float]:
        """(cache depth, prune ratio) the current step asks for."""
        return self.config.planned(self.run.step)

    def begin_call(self, x: torch.Tensor) -> int:
        """Decide the cache depth of the call on x: (B, C, H, W), record it, and prepare what its pruning
        blocks read (CallContext). Returns the depth: 0 = `reused_output()`, MAX_DEPTH = full."""
        run, n_blocks = self.run, self.config.n_blocks
        depth, ratio = self.planned()
        key = (tuple(x.shape), x.dtype, x.device)
        if run.cache_key is not None and key != run.cache_key:
            run.score_maps = []  # spec 3 compares feature maps of equally shaped calls
        if depth >= n_blocks or key != run.cache_key or run.final_cache is None:
            depth = MAX_DEPTH
        elif 0 < depth and run.output_cache[n_blocks - 1 - depth] is None:
            depth = MAX_DEPTH
        run.calls.append(CallRecord(run.step, depth, ratio))
        if depth > 0:
            self.call = self._call_context(ratio, x)
        return depth

    def reused_output(self) -> torch.Tensor:
        """The last computed UNet output: what a depth-0 call returns (spec 2)."""
        return self.run.final_cache

    def cached_input(self, depth: int) -> Optional[torch.Tensor]:
        """What a call at `depth` feeds its first output block: the last output of output_blocks[n - 1 - depth]
        (None for a full call)."""
        if depth >= self.config.n_blocks:
            return None
        return self.run.output_cache[self.config.n_blocks - 1 - depth]

    def end_call(self, x: torch.Tensor, depth: int, outputs: List[torch.Tensor], out: torch.Tensor) -> None:
        """Store what later calls reuse: `outputs` = the output blocks' outputs this call computed (the last
        ones; the newest is the DiffScore feature map), `out` = the UNet output (spec 2, 3)."""
        run, n_blocks = self.run, self.config.n_blocks
        if depth >= n_blocks:
            run.output_cache = [None] * n_blocks
        keep = self.config.cached_blocks()
        for j, h in zip(range(n_blocks - len(outputs), n_blocks), outputs):
            if j in keep:
                run.output_cache[j] = self._kept(h)
        self._remember_scores(outputs[-1] if self.options.diff_source == "features" else out)
        run.final_cache = self._kept(out)
        run.cache_key = (tuple(x.shape), x.dtype, x.device)
        self.call = None

    def _kept(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone() if self._clone_outputs else t

    def _remember_scores(self, feature_map: torch.Tensor) -> None:
        """Keep the two most recent maps that DiffScore compares (spec 3)."""
        self.run.score_maps = (self.run.score_maps + [self._kept(feature_map.detach())])[-2:]

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
        for hw in self.config.pruning_grids(call.latent_hw):
            if newest is None:
                call.scores[hw] = None
                patches = (hw[0] // sy) * (hw[1] // sx)
                call.random_local[hw] = torch.randint(sy * sx, (rows, patches), generator=self.run.generator
                                                      ).to(x.device)
                continue
            score = newest if tuple(newest.shape[-2:]) == hw else pool_score(newest, hw)
            call.scores[hw] = self._noisy_score(score) if options.score_noise is not None else score
        return call

    def _noisy_score(self, score: torch.Tensor) -> torch.Tensor:
        """The released code's score (spec 3): +-w_diff * DiffScore + w_noise * N(0, 1), the sign flipped with
        probability 1/2; drawn per call and grid from the run's seeded CPU generator."""
        w_diff, w_noise = self.options.score_noise
        generator = self.run.generator
        sign = 1.0 if torch.randint(2, (1,), generator=generator).item() == 0 else -1.0
        noise = torch.randn(tuple(score.shape), generator=generator, dtype=torch.float32)
        return sign * w_diff * score + w_noise * noise.to(device=score.device, dtype=score.dtype)
