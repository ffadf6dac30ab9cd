"""Prompt-token pruning: after a warm-up, cross-attention attends only to the prompt tokens that matter.

Importance of context token j at sampler step i: its cross-attention probability averaged over heads, query
positions and every cross-attention call that ran in step i (the `attn2` of every transformer block in
every UNet call of the step, each call weighted equally; a block that a cache skipped adds nothing), for
every batch row separately, so the two CFG halves keep their own token sets.

- Warm-up, the first ceil(warmup * S) steps: every token is attended and importance is measured.
- After it each row attends to its kept tokens only (K and V are projected for those rows alone). `static`:
  the set is chosen once, from the newest warm-up step's importance, and frozen. `dynamic`: re-chosen after
  every computed step from that step's importance, over the tokens still kept (probabilities renormalised
  over them); a pruned token is not scored again, since scoring it would need its keys. Dynamic needs a
  threshold (with `keep` it would keep the same tokens).
- Selection: `threshold` keeps the tokens whose mean probability is >= threshold; `keep` keeps the `keep`
  most important tokens (BOS and EOS counted among them).
- Never pruned: BOS and the first EOS of each prompt. SD 1.x pads the prompt with EOS to 77 tokens; those
  padding positions carry real attention mass, but keeping them all would leave nothing to prune for a
  short prompt, so they are ranked by importance like words. Which positions are BOS/EOS is read from the
  token ids of the prompts the model embedded, matched to the context rows by value: a hook on an ldm model's
  `cond_stage_model`, or on an SDXL DiffusionEngine's `conditioner` (its "crossattn" output; SDXL's two text
  towers, CLIP ViT-L and OpenCLIP bigG, tokenize with the same CLIP BPE to the same 77 positions, and the
  conditioner concatenates their hidden states along the channels, so one tower's token ids give the
  positions of both). `TextPruneState.register_prompts` adds embeddings made elsewhere. An unmatched row
  protects BOS only (with a warning).

`apply_text_pruning(model, keep=20)` swaps the class of every `attn2` (tomesd manner, `_parent` kept), so it
composes with DaTo / DeepCache, which patch the UNet forward and the transformer blocks. All state is one
`TextPruneState` on the UNet, shared by reference with its layers, and a sampling hook of the model.
"""
import functools
import math
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, List, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange

from .text_tokens import (KeptTokens, attention_probabilities, kept_tokens, protected_positions,
                          select_text_tokens, token_importance)
from .utils import HookedState, find_unet, patch_cross_attention, unpatch_cross_attention

MODES = ("static", "dynamic")
REGISTERED_ROWS = 64  # prompt embeddings remembered for finding BOS/EOS (about 15 MB for SD 1.x)


@dataclass(frozen=True)
class TextPruneOptions:
    """How text tokens are pruned (immutable; one set per patched model). Give threshold or keep."""

    warmup: float = 0.2  # share of the steps that attend to every token: the first ceil(warmup * S)
    threshold: Optional[float] = None  # keep tokens whose mean attention probability is >= threshold
    keep: Optional[int] = None  # or keep this many tokens per row (BOS and EOS included)
    mode: str = "static"  # "static": chosen at the end of the warm-up; "dynamic": re-chosen every step

    def __post_init__(self) -> None:
        if not (isinstance(self.warmup, (int, float)) and 0.0 < self.warmup <= 1.0):
            raise ValueError(f"warmup must be in (0, 1] (the share of steps that see every token), "
                             f"got {self.warmup!r}")
        if (self.threshold is None) == (self.keep is None):
            raise ValueError("give exactly one of threshold (mean attention probability) and keep (tokens)")
        if self.threshold is not None and not (math.isfinite(self.threshold) and 0.0 <= self.threshold <= 1.0):
            raise ValueError(f"threshold is a mean attention probability in [0, 1], got {self.threshold!r}")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, int)
                                      or self.keep < 2):
            raise ValueError(f"keep must be an integer >= 2 (BOS and EOS are always kept), got {self.keep!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "dynamic" and self.keep is not None:
            raise ValueError("mode 'dynamic' re-chooses among the kept tokens, so with keep=k it would keep the "
                             "same k tokens at extra cost: use mode 'static' with keep, or a threshold")

    def warmup_steps(self, num_steps: int) -> int:
        """ceil(warmup * num_steps), robust to float rounding (0.1 * 30 is 3, not 4)."""
        return min(num_steps, math.ceil(self.warmup * num_steps - 1e-9))


@dataclass
class StepImportance:
    """The importance one step measured: (B, M) mean probabilities and (B, M) protected positions."""

    step: int
    importance: torch.Tensor
    protected: torch.Tensor


@dataclass
class TextPruneRun:
    """What one sampling run accumulates; a new run starts from an empty one."""

    num_steps: Optional[int] = None
    step: Optional[int] = None
    kept: Optional[KeptTokens] = None  # the kept set of the steps after the warm-up
    chosen_from: Optional[int] = None  # the step whose importance chose `kept`
    step_sum: Optional[torch.Tensor] = None  # (B, M) summed importance of this step's calls
    step_calls: int = 0
    step_protected: Optional[torch.Tensor] = None
    latest: Optional[StepImportance] = None  # the newest finished step that measured importance
    history: List[Tuple[int, Optional[torch.Tensor]]] = field(default_factory=list)  # (step, (B,) kept counts)


@dataclass(eq=False)
class TextPruneState(HookedState):
    """All state of one text-pruned model: options, the current run, the prompts whose BOS/EOS are known."""

    options: TextPruneOptions
    run: TextPruneRun = field(default_factory=TextPruneRun)
    prompts: Deque[Tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=lambda: deque(maxlen=REGISTERED_ROWS), repr=False)  # (embedding (M, D), protected (M,))
    encoder_hook: Optional[torch.utils.hooks.RemovableHandle] = field(default=None, repr=False)
    _protected_cache: Optional[Tuple[Tuple, torch.Tensor]] = field(default=None, repr=False)

    # --- sampling hooks ---
    def sampling_started(self, num_steps: int) -> None:
        if num_steps < 1:
            raise ValueError(f"a sampling run needs at least one step, got {num_steps}")
        self.run = TextPruneRun(num_steps=num_steps)

    def step_started(self, step: int) -> None:
        self._close_step()
        self.run.step = step
        self._choose()
        kept = self.run.kept if step >= self.warmup_steps else None
        self.run.history.append((step, None if kept is None else kept.counts()))

    def model_call(self, cfg_halves: bool) -> None:
        self._protected_cache = None

    def sampling_finished(self) -> None:
        """Free the run's tensors; the kept-token history stays readable until the next run."""
        self.run = TextPruneRun(num_steps=self.run.num_steps, history=self.run.history)
        self._protected_cache = None

    # --- the run ---
    @property
    def warmup_steps(self) -> int:
        num_steps = self.run.num_steps
        return 0 if num_steps is None else self.options.warmup_steps(num_steps)

    def call_plan(self, context: torch.Tensor) -> Tuple[Optional[KeptTokens], bool]:
        """(kept tokens or None for all, whether to measure importance) for a cross-attention call now."""
        run = self.run
        if run.step is None or run.num_steps is None:
            return None, False
        if run.step < self.warmup_steps:
            return None, True
        kept = run.kept
        if kept is None:  # no step measured anything yet: attend to all and measure
            return None, True
        if kept.mask.shape[0] != context.shape[0]:
            raise RuntimeError(f"the kept prompt tokens were chosen for a batch of {kept.mask.shape[0]} rows, "
                               f"but this cross-attention call has {context.shape[0]}")
        return (None if kept.keeps_all else kept), self.options.mode == "dynamic"

    def record(self, importance: torch.Tensor, kept: Optional[KeptTokens], context: torch.Tensor) -> None:
        """Add one call's importance: (B, m) over the attended tokens (all M when kept is None)."""
        importance = importance.detach().float()
        batch, length = context.shape[:2]
        if kept is not None:
            if kept.valid is not None:
                importance = importance * kept.valid
            importance = importance.new_zeros(batch, length).scatter_add_(1, kept.index, importance)
        run = self.run
        if run.step_sum is None or run.step_sum.shape != importance.shape:
            run.step_sum, run.step_calls = torch.zeros_like(importance), 0
        run.step_sum += importance
        run.step_calls += 1
        run.step_protected = self.protected_for(context)

    def _close_step(self) -> None:
        run = self.run
        if run.step_calls > 0 and run.step is not None:
            run.latest = StepImportance(run.step, run.step_sum / run.step_calls, run.step_protected)
        run.step_sum, run.step_calls, run.step_protected = None, 0, None

    def _choose(self) -> None:
        """Choose the kept set for the step that starts, when the options ask for a new one."""
        run, options = self.run, self.options
        latest = run.latest
        if run.step < self.warmup_steps or latest is None:
            return
        if run.kept is not None and (options.mode == "static" or latest.step == run.chosen_from):
            return
        candidates = None
        if run.kept is not None and run.kept.mask.shape == latest.importance.shape:
            candidates = run.kept.mask
        mask = select_text_tokens(latest.importance, latest.protected, threshold=options.threshold,
                                  keep=options.keep, candidates=candidates)
        run.kept = kept_tokens(mask)
        run.chosen_from = latest.step

    def kept_counts(self) -> List[Tuple[int, Optional[List[int]]]]:
        """(step, kept tokens per batch row) of the current or last run; None: every token (warm-up)."""
        return [(step, None if counts is None else counts.tolist()) for step, counts in self.run.history]

    # --- BOS / EOS positions ---
    def register_prompts(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> None:
        """Remember which context positions of these prompt embeddings are BOS/EOS.

        embeddings: (B, M, D) text-encoder output; tokens: (B, M) its token ids.
        """
        if embeddings.dim() != 3 or tuple(tokens.shape) != tuple(embeddings.shape[:2]):
            raise ValueError(f"expected embeddings (B, M, D) and tokens (B, M), got {tuple(embeddings.shape)} "
                             f"and {tuple(tokens.shape)}")
        protected = protected_positions(tokens).cpu()
        for row, row_protected in zip(embeddings.detach(), protected):
            if self._find_prompt(row) is None:
                self.prompts.append((row, row_protected))

    def _find_prompt(self, row: torch.Tensor) -> Optional[torch.Tensor]:
        for embedding, protected in self.prompts:
            if embedding.shape == row.shape and torch.equal(embedding.to(row.device, row.dtype), row):
                return protected
        return None

    def protected_for(self, context: torch.Tensor) -> torch.Tensor:
        """(B, M) bool: the never-pruned positions of each context row (B, M, D)."""
        key = (context.data_ptr(), tuple(context.shape), context.dtype, context.device)
        if self._protected_cache is not None and self._protected_cache[0] == key:
            return self._protected_cache[1]
        rows = []
        for row in context:
            protected = self._find_prompt(row)
            if protected is None:
                warnings.warn("text pruning: a context row matches no prompt the text encoder embedded, so only "
                              "its BOS (position 0) is protected; pass its token ids to "
                              "TextPruneState.register_prompts to protect its EOS too")
                protected = torch.zeros(context.shape[1], dtype=torch.bool)
                protected[0] = True
            rows.append(protected)
        protected = torch.stack(rows).to(context.device)
        self._protected_cache = (key, protected)
        return protected


@functools.lru_cache(maxsize=None)
def _pruned_cross_attention_class(attention_class: type) -> type:
    class TextPrunedCrossAttention(attention_class):
        """CrossAttention that attends to the kept context tokens only (and measures their importance)."""

        _parent = attention_class

        def forward(self, x, context=None, mask=None):
            if context is None or mask is not None:
                return super().forward(x, context=context, mask=mask)
            kept, measure = self._text_prune.call_plan(context)
            return _cross_attention(self, x, context, kept, self._text_prune if measure else None)

    return TextPrunedCrossAttention


def _cross_attention(attn, x: torch.Tensor, context: torch.Tensor, kept: Optional[KeptTokens],
                     recorder: Optional[TextPruneState]) -> torch.Tensor:
    """x: (B, N, C), context: (B, M, D) -> (B, N, C), attending to the `kept` rows of context (None: all,
    the same operations as CrossAttention.forward); `recorder` receives the attended tokens' importance."""
    rows = context if kept is None else kept.gather(context)
    q, k, v = attn.to_q(x), attn.to_k(rows), attn.to_v(rows)
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=attn.heads) for t in (q, k, v))
    attn_mask = None if kept is None else kept.attention_mask()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=attn.scale)
    if recorder is not None:
        recorder.record(token_importance(attention_probabilities(q, k, attn.scale, attn_mask)), kept, context)
    out = rearrange(out, "b h n d -> b n (h d)")
    return attn.to_out(out)


def _prompt_texts(text) -> Optional[List[str]]:
    """The prompts an embedder was given, as a list of strings (None when they are not text)."""
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return list(text)
    return None


def _register_if_text(state: TextPruneState, tokenizer: torch.nn.Module, text: Optional[List[str]],
                      context: object) -> None:
    """Register `text`'s token ids (by `tokenizer.tokenize`) for `context` (B, M, D) when there is text and the ids
    line up with the context's positions."""
    if text is None or not (torch.is_tensor(context) and context.dim() == 3):
        return
    tokens = tokenizer.tokenize(text)
    if tuple(tokens.shape) == tuple(context.shape[:2]):
        state.register_prompts(context, tokens)


def _encoder_hook(state: TextPruneState):
    """Forward hook of an ldm text encoder (`cond_stage_model`): registers the token ids of every list of
    prompts it embeds. Its output (B, M, D) is the cross-attention context."""

    def hook(module, args, output):
        _register_if_text(state, module, _prompt_texts(args[0]) if args else None, output)

    return hook


def _conditioner_hook(state: TextPruneState, tower: torch.nn.Module):
    """Forward hook of an sgm `GeneralConditioner`: registers the prompts of the batch key that `tower` (a text
    embedder with `tokenize`) reads, by that tower's token ids, for the "crossattn" context (B, M, D) of the
    output (every text tower's M positions are the same positions, see the module docstring)."""

    def hook(module, args, output):
        text = _prompt_texts(args[0].get(tower.input_key)) if args and isinstance(args[0], dict) else None
        _register_if_text(state, tower, text, output.get("crossattn") if isinstance(output, dict) else None)

    return hook


def _register_prompt_hook(model: torch.nn.Module, state: TextPruneState) -> None:
    """Hook what embeds the model's prompts (ldm: `cond_stage_model`; sgm: the first text tower of its
    `conditioner`); a bare UNet has nothing to hook."""
    encoder = getattr(model, "cond_stage_model", None)
    if encoder is not None and callable(getattr(encoder, "tokenize", None)):
        state.encoder_hook = encoder.register_forward_hook(_encoder_hook(state))
        return
    conditioner = getattr(model, "conditioner", None)
    towers = [embedder for embedder in getattr(conditioner, "embedders", ())
              if callable(getattr(embedder, "tokenize", None)) and getattr(embedder, "input_key", None) is not None]
    if towers:
        state.encoder_hook = conditioner.register_forward_hook(_conditioner_hook(state, towers[0]))


def apply_text_pruning(model: torch.nn.Module, options: Optional[TextPruneOptions] = None,
                       **kwargs) -> TextPruneState:
    """Prune prompt tokens in the cross-attention of a LatentDiffusion, an SDXL DiffusionEngine (or their
    UNetModel), in place.

    options: a TextPruneOptions, or its fields as keywords (warmup, threshold, keep, mode).
    """
    if options is None:
        options = TextPruneOptions(**kwargs)
    elif kwargs:
        raise TypeError("pass either options or its fields as keywords, not both")
    remove_text_pruning(model)
    unet = find_unet(model)
    state = TextPruneState(options=options)
    patch_cross_attention(model, "_text_prune", state, _pruned_cross_attention_class, "prune", {
        "_tgate": "this model has T-GATE applied, which also replaces the cross-attention layers; "
                  "remove it (datosd.remove_tgate) before applying text pruning"})
    if model is not unet:
        _register_prompt_hook(model, state)
    return state


def remove_text_pruning(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply_text_pruning`: original classes, no state, no hooks. Safe on an unpatched model."""
    state = unpatch_cross_attention(model, "_text_prune")
    if state is not None and state.encoder_hook is not None:
        state.encoder_hook.remove()
    return model
