"""DaTo for diffusers: `apply_patch(pipe)` on a Stable Diffusion 1.x / 2.x / XL pipeline or its UNet2DConditionModel.

The same algorithm, options and strategies as the ldm patch (`patch.py`): one `DatoState` holds the run, the one
caching forward (`caching.caching_forward`, through `DatoState.compute`, so compiled execution covers it) runs
the blocks, and the shared pruned sub-layer runs in diffusers' `BasicTransformerBlock`. What this module adds is
the diffusers side: the CompVis block map below (`DiffusersBlocks`), and step tracking from the pipeline's
scheduler.

CompVis blocks in diffusers (spec 2's ids: `input_blocks[k]` has id k, `output_blocks[j]` has id n - 1 - j;
L = len(down_blocks), R = layers_per_block; every row is one CompVis block, run in this order):

    input_blocks[0]                   conv_in
    input_blocks[1 + (R + 1) i + l]   down_blocks[i].resnets[l], then .attentions[l] if the level has attention
    input_blocks[(R + 1) (i + 1)]     down_blocks[i].downsamplers[0]                     (i < L - 1)
    middle_block                      mid_block
    output_blocks[(R + 1) i + l]      up_blocks[i].resnets[l] (its input: the skip concatenated), then
                                      .attentions[l], and for l = R the .upsamplers[0] (i < L - 1)
    out                               conv_norm_out, conv_act, conv_out

SD 1.x / 2.x (L = 4, R = 2): 12 input and 12 output blocks, exactly the CompVis UNet. SDXL (L = 3, R = 2): 9 and
9, so depth >= 9 computes everything there. The DiffScore map (spec 3) is the output of the last output block.
SDXL's highest-resolution level has no attention: pruning (spec 6) counts N_max at the highest-resolution level
that has transformer blocks (`DatoState.attention_downsample`: 1 on SD 1.x / 2.x, 2 on SDXL).

Steps (spec 1) come from the pipeline's scheduler, not from counting UNet calls: `scheduler.set_timesteps` starts
a run, `scheduler.step` advances it, and the run covers the positions of `scheduler.timesteps` that the pipeline
loops over, from the begin index it passes to `scheduler.set_begin_index` (img2img: t_start * order; a loop that
passes none begins at its first call's timestep) to the end. A strategy step is one solver step; the pipeline's
loop makes one UNet call and one `scheduler.step` per position, so a step has as many calls as its solver needs:

    DDIM, Euler, ...        1 call per step
    Heun, DPM2 (order 2)    2 calls per step (first-order, then correction); the run's last step has 1
    PNDM, skip_prk_steps    PLMS: step 0 has 2 calls (counter 0, then counter 1 redoes the step with the mean of
                            the two noise predictions), as the CompVis PLMS sampler; every later step 1 call
    PNDM, Runge-Kutta       3 steps of 4 calls (counter < len(prk_timesteps) = 12), then 1 call per PLMS step

PNDM numbers its calls by its `counter`, which set_timesteps resets: an img2img loop over timesteps[t_start:]
starts with the warm-up again, so with 10 inference steps and strength 0.8 its 9 calls are 8 steps (0, 0, 1, ..,
7). A Runge-Kutta step that the loop cuts short (img2img strength 0.2: 11 calls) still counts as a step. The other
schedulers number calls by position, and img2img begins at a step boundary. `StepMap` holds these rules. So img2img
`strength` runs the strategy over the steps that remain (int(num_inference_steps * strength) of them, bar a cut
Runge-Kutta step), and the run's hooks (`DatoState.hooks`, a `SamplingHooks`) see exactly those; the run is closed
after the loop's last `scheduler.step`. Several UNet calls at one position (classifier-free guidance run as two
calls) keep separate caches.
Whether a call's batch is [unconditional; conditional] (spec 4) is the pipeline's `do_classifier_free_guidance`;
a hand-written loop that calls the UNet once per half should patch with `align_cfg=False`.
A bare UNet2DConditionModel has no scheduler: drive `state` (a `SamplingHook`) yourself, as with an ldm UNet.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ldm.models.diffusion.hooks import SamplingHooks

from .caching import caching_forward, compute_blocks, pruned, token_selection
from .diffusers_version import check_diffusers_version
from .state import DatoConfig, DatoOptions, DatoState
from .strategy import StrategyError, StrategyLike, load_strategy
from .utils import check_not_merged, is_class

Block = Tuple[torch.nn.Module, ...]


def unet_and_pipeline(obj: Any) -> Tuple[torch.nn.Module, Any]:
    """(UNet2DConditionModel, its pipeline or None) of a pipeline or a bare UNet."""
    if is_class(obj, "UNet2DConditionModel"):
        return obj, None
    unet = getattr(obj, "unet", None)
    if not is_class(unet, "UNet2DConditionModel") or getattr(obj, "scheduler", None) is None:
        raise TypeError(f"expected a diffusers pipeline with a UNet2DConditionModel and a scheduler, or the UNet "
                        f"itself, got {type(obj).__name__}")
    return unet, obj


# --- the CompVis block map ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UNetLayout:
    """A UNet2DConditionModel cut into CompVis blocks (module docstring). Each block: its diffusers modules in order."""

    input_blocks: Tuple[Block, ...]
    output_blocks: Tuple[Block, ...]
    attention_downsample: int  # 2 ** (index of the first down block with attention)

    @classmethod
    def of(cls, unet: torch.nn.Module) -> "UNetLayout":
        """Map `unet`; a UNet with other block types than Stable Diffusion's raises TypeError."""
        if unet.config.addition_embed_type == "image_hint":
            raise TypeError("datosd does not support UNets with addition_embed_type='image_hint'")
        inputs: List[Block] = [(unet.conv_in,)]
        attn_levels = []
        for i, down in enumerate(unet.down_blocks):
            attentions = _layers(down, "attentions", "Transformer2DModel")
            resnets = _layers(down, "resnets", "ResnetBlock2D")
            if attentions:
                attn_levels.append(i)
                if len(attentions) != len(resnets):
                    raise TypeError(f"down_blocks[{i}] has {len(resnets)} resnets but {len(attentions)} attentions")
            inputs += [(resnet,) + ((attentions[l],) if attentions else ()) for l, resnet in enumerate(resnets)]
            inputs += [(sampler,) for sampler in _layers(down, "downsamplers", "Downsample2D")]
        outputs: List[Block] = []
        for i, up in enumerate(unet.up_blocks):
            attentions = _layers(up, "attentions", "Transformer2DModel")
            resnets = _layers(up, "resnets", "ResnetBlock2D")
            if attentions and len(attentions) != len(resnets):
                raise TypeError(f"up_blocks[{i}] has {len(resnets)} resnets but {len(attentions)} attentions")
            blocks = [(resnet,) + ((attentions[l],) if attentions else ()) for l, resnet in enumerate(resnets)]
            upsamplers = _layers(up, "upsamplers", "Upsample2D")
            if upsamplers:
                blocks[-1] += tuple(upsamplers)
            outputs += blocks
        if len(inputs) != len(outputs):
            raise TypeError(f"the UNet has {len(inputs)} input but {len(outputs)} output blocks; datosd needs the "
                            "symmetric Stable Diffusion layout")
        if not attn_levels:
            raise TypeError("the UNet has no attention levels")
        mid = unet.mid_block
        if mid is not None and not any(is_class(mid, name) for name in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")):
            raise TypeError(f"datosd does not support a {type(mid).__name__} mid block")
        return cls(tuple(inputs), tuple(outputs), 2 ** attn_levels[0])


def _layers(block: torch.nn.Module, name: str, class_name: str) -> List[torch.nn.Module]:
    """block.<name> as a list (empty when absent), every entry checked to be a `class_name`."""
    layers = list(getattr(block, name, None) or [])
    for layer in layers:
        if not is_class(layer, class_name):
            raise TypeError(f"datosd supports {class_name} in {type(block).__name__}.{name}, "
                            f"got {type(layer).__name__}")
    return layers


# --- apply / remove ----------------------------------------------------------------------------------------------
def apply_patch(pipe_or_unet: Any, strategy: StrategyLike = None, prune_ratio: float = 0.0, **options) -> DatoState:
    """Patch a diffusers pipeline (or its UNet2DConditionModel) in place and return its state.

    Arguments as `datosd.apply_patch`. With a pipeline, its scheduler drives the steps (module docstring); with a
    bare UNet, call the state's hooks yourself (no strategy step set: every call computes everything).
    """
    check_diffusers_version()
    unet, pipe = unet_and_pipeline(pipe_or_unet)
    layout = UNetLayout.of(unet)
    config = DatoConfig(strategy=load_strategy(strategy), options=DatoOptions(**options), prune_ratio=prune_ratio,
                        attention_downsample=layout.attention_downsample, n_blocks=len(layout.output_blocks))
    blocks = [m for m in unet.modules() if is_class(m, "BasicTransformerBlock")] if config.prunes else []
    remove_patch(pipe_or_unet)
    _drop_leftover_forward(unet)
    check_not_merged(unet, blocks)
    for block in blocks:
        if block.norm_type != "layer_norm" or block.pos_embed is not None or hasattr(block, "fuser"):
            raise TypeError(f"datosd prunes layer-norm transformer blocks without positional embeddings or GLIGEN; "
                            f"this UNet has norm_type={block.norm_type!r}")
    state = DatoState(config, compute_blocks)
    state.join_hooks(SamplingHooks())
    unet._dato = state
    unet._dato_blocks = DiffusersBlocks(unet, layout)
    unet.__class__ = _caching_unet_class(unet.__class__)
    for block in blocks:
        block._dato = state
        block.__class__ = _pruning_block_class(block.__class__)
    if pipe is not None:
        unet._dato_steps = SchedulerSteps(pipe, state)
    return state


def _drop_leftover_forward(unet: torch.nn.Module) -> None:
    """Refuse a UNet whose forward another tool wraps (the class swap would be bypassed); drop an instance
    `forward` that is only the class's own method (what `DeepCacheSDHelper.disable()` leaves behind)."""
    forward = vars(unet).get("forward")
    if forward is None:
        return
    if getattr(forward, "__self__", None) is unet and getattr(forward, "__func__", None) is type(unet).forward:
        del unet.forward
        return
    raise TypeError("the UNet's forward is wrapped by something else (DeepCache, accelerate offload hooks, ...); "
                    "apply datosd to the plain pipeline first")


def remove_patch(pipe_or_unet: Any) -> Any:
    """Undo `apply_patch`: original classes and scheduler methods, no state. Safe on an unpatched pipeline."""
    unet, _ = unet_and_pipeline(pipe_or_unet)
    state = getattr(unet, "_dato", None)
    if state is None:
        return pipe_or_unet
    steps = getattr(unet, "_dato_steps", None)
    if steps is not None:
        steps.unwrap()
        del unet._dato_steps
    for module in unet.modules():
        if getattr(module, "_dato", None) is state:
            module.__class__ = module._parent
            del module._dato
    del unet._dato_blocks
    return pipe_or_unet


# --- steps from the scheduler ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepMap:
    """Which solver step each UNet call of a scheduler belongs to.

    The scheduler numbers its calls k = 0, 1, ... by its own index: PNDM by its `counter` (scheduler.step calls since
    set_timesteps), every other scheduler by the call's position in `scheduler.timesteps` (its `step_index`). The
    first steps take `leading[i]` calls each, every later step `order` calls: call k is step `step_of(k)`.
    """

    leading: Tuple[int, ...]  # calls of each of the first steps (PLMS: (2,); PNDM's Runge-Kutta: (4, 4, 4))
    order: int  # calls of every later step (Heun, DPM2: 2; the last step of a run may have fewer)

    def step_of(self, k: int) -> int:
        """The step of call k (k >= 0)."""
        for step, calls in enumerate(self.leading):
            if k < calls:
                return step
            k -= calls
        return len(self.leading) + k // self.order

    @classmethod
    def of(cls, scheduler: Any) -> "StepMap":
        """The map of a diffusers scheduler (section "Steps" of the module docstring)."""
        order = int(getattr(scheduler, "order", 1))
        if not is_class(scheduler, "PNDMScheduler"):
            n = int(scheduler.num_inference_steps)
            if len(scheduler.timesteps) != order * (n - 1) + 1:
                raise ValueError(f"{type(scheduler).__name__} has {len(scheduler.timesteps)} timesteps for {n} "
                                 f"inference steps of {order} calls; datosd cannot tell which step each UNet call "
                                 f"belongs to (it expects {order * (n - 1) + 1}); use a PNDM, DDIM, Euler, Heun or "
                                 f"DPM2 scheduler")
            return cls((), order)
        if scheduler.config.skip_prk_steps:
            return cls((2,), 1)  # PLMS: counter 1 redoes the first step with the mean of two noise predictions
        return cls((4,) * (len(scheduler.prk_timesteps) // 4), 1)  # Runge-Kutta: 4 calls a step, then PLMS


@dataclass
class _Run:
    """Where the pipeline's current run stands: its calls numbered by the scheduler (`StepMap`) from `first` on."""

    steps: StepMap
    first: int  # the scheduler's index of the run's first call (PNDM: its counter; others: the begin position)
    calls: int  # scheduler positions the pipeline loops over: len(scheduler.timesteps) - begin
    stepped: int = 0  # scheduler.step calls so far
    calls_here: int = 0  # UNet calls at the current position (each has its own cache: `DatoState.use_slot`)

    def step_of(self, call: int) -> int:
        """The run's step (0 = its first) of its call-th position."""
        return self.steps.step_of(self.first + call) - self.steps.step_of(self.first)

    @property
    def num_steps(self) -> int:
        return self.step_of(self.calls - 1) + 1

    @property
    def step(self) -> int:
        return self.step_of(self.stepped)


class SchedulerSteps:
    """Announces a pipeline's runs and steps to the state's hooks, from its scheduler's `set_timesteps` / `step`.

    The scheduler gets instance attributes that wrap its methods (signatures kept, for the pipelines that inspect
    them); a scheduler swapped in after patching is wrapped at its first UNet call. `set_begin_index` is wrapped
    too, and added to a scheduler without it (DDIM, PNDM), so that img2img pipelines, which call it when it exists,
    tell where their loop over `scheduler.timesteps` begins.
    """

    def __init__(self, pipe: Any, state: DatoState) -> None:
        self.pipe = pipe
        self.state = state
        self.scheduler = None
        self.pending = False  # set_timesteps was called: the next UNet call starts a run
        self.begin: Optional[int] = None  # the pipeline's set_begin_index since set_timesteps
        self.run: Optional[_Run] = None
        self._wrap(pipe.scheduler)

    def _wrap(self, scheduler: Any) -> None:
        set_timesteps, step = scheduler.set_timesteps, scheduler.step
        own_set_begin_index = getattr(scheduler, "set_begin_index", None)

        @functools.wraps(set_timesteps)
        def set_timesteps_and_restart(*args, **kwargs):
            self._finish()
            self.pending = True
            self.begin = None
            return set_timesteps(*args, **kwargs)

        @functools.wraps(step)
        def step_and_advance(*args, **kwargs):
            out = step(*args, **kwargs)
            self._advance()
            return out

        def set_begin_index_and_record(begin_index: int = 0) -> None:
            """Record the position of scheduler.timesteps where the pipeline's loop begins (and set the
            scheduler's own begin index where it has one)."""
            self.begin = int(begin_index)
            if own_set_begin_index is not None:
                own_set_begin_index(begin_index)

        if own_set_begin_index is not None:
            set_begin_index_and_record = functools.wraps(own_set_begin_index)(set_begin_index_and_record)
        scheduler.set_timesteps = set_timesteps_and_restart
        scheduler.step = step_and_advance
        scheduler.set_begin_index = set_begin_index_and_record
        self.scheduler = scheduler

    def unwrap(self) -> None:
        """Give the scheduler its own methods back and end any open run."""
        self._finish()
        for name in ("set_timesteps", "step", "set_begin_index"):
            vars(self.scheduler).pop(name, None)

    def before_unet_call(self, timestep: Any) -> None:
        """Announce the run, step and call that a UNet call at `timestep` belongs to; select its cache slot."""
        scheduler = self.pipe.scheduler
        if scheduler is not self.scheduler:  # replaced after patching: it was set up just before this call
            self.unwrap()
            self._wrap(scheduler)
            self.pending = True
        hooks = self.state.hooks
        if self.pending:
            self.pending = False
            self.run = self._start(scheduler, timestep)
        run = self.run
        if run is None:  # a UNet call outside a pipeline run: no strategy step
            return
        if run.step != self.state.step:
            hooks.step_started(run.step)
        hooks.model_call(bool(getattr(self.pipe, "do_classifier_free_guidance", False)))
        self.state.use_slot(run.calls_here)
        run.calls_here += 1

    def after_unet_call(self) -> None:
        """Back to the run's own cache (the one the hooks and `state.calls` see)."""
        if self.run is not None:
            self.state.use_slot(0)

    def _start(self, scheduler: Any, timestep: Any) -> _Run:
        """The run that a UNet call at `timestep` opens; its strategy length checked against its steps."""
        if getattr(self.pipe, "denoising_end", None) is not None:
            raise ValueError("datosd cannot follow SDXL's denoising_end (the pipeline stops before the scheduler's "
                             "last step); run without it")
        steps = StepMap.of(scheduler)
        begin = self.begin if self.begin is not None else getattr(scheduler, "begin_index", None)
        if begin is None:  # a loop that sets no begin index (txt2img), or a scheduler swapped in after patching
            begin = _position_of(scheduler.timesteps, timestep)
        calls = len(scheduler.timesteps) - begin
        if calls < 1:
            raise ValueError(f"the pipeline begins at position {begin} of the scheduler's {len(scheduler.timesteps)} "
                             f"timesteps; nothing is left to run (raise img2img's strength or num_inference_steps)")
        first = int(scheduler.counter) if is_class(scheduler, "PNDMScheduler") else begin
        run = _Run(steps=steps, first=first, calls=calls)
        try:
            self.state.hooks.sampling_started(run.num_steps)
        except StrategyError as e:
            raise StrategyError(f"{e} (the pipeline's {type(scheduler).__name__} runs {run.num_steps} of its "
                                f"{scheduler.num_inference_steps} inference steps here, in {calls} scheduler calls: "
                                f"give it a strategy of {run.num_steps} steps)") from None
        return run

    def _advance(self) -> None:
        run = self.run
        if run is None:
            return
        run.stepped += 1
        run.calls_here = 0
        if run.stepped >= run.calls:
            self._finish()

    def _finish(self) -> None:
        if self.run is not None:
            self.state.use_slot(0)
            self.run = None
            self.state.hooks.sampling_finished()


def _position_of(timesteps: torch.Tensor, timestep: Any) -> int:
    """Position of `timestep` in the scheduler's `timesteps` (T,), for a loop that did not call set_begin_index.
    Of two equal timesteps the second, as diffusers' own `index_for_timestep` (with Heun and DPM2 it starts a step).
    """
    t = torch.as_tensor(timestep).flatten()[0].to(device=timesteps.device, dtype=timesteps.dtype)
    found = (timesteps == t).nonzero().flatten().tolist()
    if not found:
        raise ValueError(f"the UNet was called at timestep {t.item()}, which is not among the scheduler's "
                         f"timesteps; datosd follows the pipeline's scheduler")
    return found[1] if len(found) > 1 else found[0]


# --- the caching UNet ---------------------------------------------------------------------------------------------
@dataclass
class _Conditioning:
    """What every attention layer of one UNet call receives."""

    encoder_hidden_states: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    encoder_attention_mask: Optional[torch.Tensor]
    cross_attention_kwargs: Optional[Dict[str, Any]]

    def attention_kwargs(self) -> Dict[str, Any]:
        return dict(encoder_hidden_states=self.encoder_hidden_states, attention_mask=self.attention_mask,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    encoder_attention_mask=self.encoder_attention_mask)


@dataclass(frozen=True)
class DiffusersBlocks:
    """The CompVis blocks of a UNet2DConditionModel (`caching.UNetBlocks`, the module docstring's map). cond: the
    forward's keywords (timestep, encoder_hidden_states, class_labels, timestep_cond, attention_mask,
    cross_attention_kwargs, added_cond_kwargs, encoder_attention_mask)."""

    unet: torch.nn.Module
    layout: UNetLayout

    @property
    def n_blocks(self) -> int:
        return len(self.layout.output_blocks)

    def begin(self, sample: torch.Tensor, cond: Dict[str, Any]) -> Tuple[torch.Tensor, Tuple]:
        """(the input of input_blocks[0], (time embedding (B, C_emb), _Conditioning, whether upsampling must
        match the skips' sizes)), as UNet2DConditionModel.forward computes them."""
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=cond["timestep"]),
                                  cond["timestep_cond"])
        class_emb = unet.get_class_embed(sample=sample, class_labels=cond["class_labels"])
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        text = cond["encoder_hidden_states"]
        aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs=cond["added_cond_kwargs"])
        if aug_emb is not None:
            emb = emb + aug_emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        states = unet.process_encoder_hidden_states(encoder_hidden_states=text,
                                                    added_cond_kwargs=cond["added_cond_kwargs"])
        attention = _Conditioning(states, _mask_bias(cond["attention_mask"], sample.dtype),
                                  _mask_bias(cond["encoder_attention_mask"], sample.dtype),
                                  cond["cross_attention_kwargs"])
        resize = any(side % 2 ** unet.num_upsamplers for side in sample.shape[-2:])
        return sample, (emb, attention, resize)

    def input_block(self, k: int, h: torch.Tensor, ctx: Tuple) -> torch.Tensor:
        emb, attention, _ = ctx
        return _run_block(self.layout.input_blocks[k], h, emb, attention, None)

    def middle_block(self, h: torch.Tensor, ctx: Tuple) -> torch.Tensor:
        emb, attention, _ = ctx
        mid = self.unet.mid_block
        if mid is None:
            return h
        if getattr(mid, "has_cross_attention", False):
            return mid(h, emb, **attention.attention_kwargs())
        return mid(h, emb)

    def output_block(self, j: int, h: torch.Tensor, ctx: Tuple, next_skip: Optional[torch.Tensor]) -> torch.Tensor:
        emb, attention, resize = ctx
        upsample_size = next_skip.shape[2:] if resize and next_skip is not None else None
        return _run_block(self.layout.output_blocks[j], h, emb, attention, upsample_size)

    def out(self, h: torch.Tensor, ctx: Tuple) -> torch.Tensor:
        unet = self.unet
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h)


def _caching_unet_class(unet_class: type) -> type:
    output_class = getattr(importlib.import_module(unet_class.__module__), "UNet2DConditionOutput")

    class DatoUNet2DConditionModel(unet_class):
        """UNet2DConditionModel whose forward follows the step's cache depth (spec 2) over the CompVis block map."""

        _parent = unet_class

        def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                    attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                    encoder_attention_mask=None, return_dict=True, down_block_additional_residuals=None,
                    mid_block_additional_residual=None, down_intrablock_additional_residuals=None):
            if any(r is not None for r in (down_block_additional_residuals, mid_block_additional_residual,
                                           down_intrablock_additional_residuals)):
                raise TypeError("datosd does not support ControlNet / T2I-Adapter residuals")
            if any(getattr(up, "s1", None) for up in self.up_blocks):
                raise TypeError("FreeU is enabled on this UNet; disable it (unet.disable_freeu()) to use datosd")
            if cross_attention_kwargs and cross_attention_kwargs.get("gligen") is not None:
                raise TypeError("datosd does not support GLIGEN")
            cond = dict(timestep=timestep, encoder_hidden_states=encoder_hidden_states, class_labels=class_labels,
                        timestep_cond=timestep_cond, attention_mask=attention_mask,
                        cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs,
                        encoder_attention_mask=encoder_attention_mask)
            steps: Optional[SchedulerSteps] = getattr(self, "_dato_steps", None)
            if steps is not None:
                steps.before_unet_call(timestep)
            try:
                out = caching_forward(self._dato, self._dato_blocks, sample, cond)
            finally:
                if steps is not None:
                    steps.after_unet_call()
            return output_class(sample=out) if return_dict else (out,)

    return DatoUNet2DConditionModel


def _mask_bias(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A (B, N) keep mask as an additive (B, 1, N) bias, as UNet2DConditionModel.forward makes it."""
    return None if mask is None else ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


def _run_block(block: Block, h: torch.Tensor, emb: torch.Tensor, cond: _Conditioning,
               upsample_size: Optional[torch.Size]) -> torch.Tensor:
    """One CompVis block: its diffusers modules in order. h: (B, C, H, W) -> (B, C', H', W')."""
    for module in block:
        if is_class(module, "ResnetBlock2D"):
            h = module(h, emb)
        elif is_class(module, "Transformer2DModel"):
            h = module(h, return_dict=False, **cond.attention_kwargs())[0]
        elif is_class(module, "Upsample2D"):
            h = module(h, upsample_size)
        else:  # conv_in, Downsample2D
            h = module(h)
    return h


# --- the pruning transformer block -------------------------------------------------------------------------------
def _pruning_block_class(block_class: type) -> type:
    class DatoBasicTransformerBlock(block_class):
        """diffusers BasicTransformerBlock that runs attention on the kept tokens only (spec 6)."""

        _parent = block_class

        def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                    encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
                    added_cond_kwargs=None):
            selection = token_selection(self._dato, hidden_states)
            if selection is None:
                return super().forward(hidden_states, attention_mask=attention_mask,
                                       encoder_hidden_states=encoder_hidden_states,
                                       encoder_attention_mask=encoder_attention_mask, timestep=timestep,
                                       cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels,
                                       added_cond_kwargs=added_cond_kwargs)
            if attention_mask is not None:
                raise TypeError("datosd cannot prune self-attention under an attention_mask")
            options = self._dato.options
            extra = cross_attention_kwargs or {}
            x = pruned(self.attn1, self.norm1, hidden_states, selection, True,
                        encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None, **extra)
            if self.attn2 is not None:
                x = pruned(self.attn2, self.norm2, x, selection, options.prune_crossattn,
                            encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask,
                            **extra)
            return pruned(self.ff, self.norm3, x, selection, options.prune_mlp)

    return DatoBasicTransformerBlock
