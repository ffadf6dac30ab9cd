"""Prompt-token importance and selection for cross-attention pruning: pure tensor functions, no model.

Shapes: B batch (each CFG half its own rows), M context tokens (77 for CLIP), m kept tokens, h heads,
N query tokens (latent pixels), d head width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["CLIP_EOS_ID", "KeptTokens", "attention_probabilities", "kept_tokens", "protected_positions",
           "select_text_tokens", "token_importance"]

CLIP_EOS_ID = 49407  # end of text in the CLIP BPE vocabulary (SD 1.x tokenizer and open_clip alike)


@dataclass(frozen=True)
class KeptTokens:
    """The context tokens each row keeps.

    mask: (B, M) bool, True where a token is kept.
    index: (B, m) kept positions, ascending, m = the largest per-row count; a row with fewer kept tokens is
        padded with positions it does not keep, marked False in `valid`.
    valid: (B, m) bool, or None when every row keeps exactly m tokens.
    """

    mask: torch.Tensor
    index: torch.Tensor
    valid: Optional[torch.Tensor]

    @property
    def keeps_all(self) -> bool:
        """True when every row keeps every token (the attention is then the unpruned one)."""
        return self.valid is None and self.index.shape[1] == self.mask.shape[1]

    def gather(self, context: torch.Tensor) -> torch.Tensor:
        """context: (B, M, D) -> (B, m, D), the rows `index` of each sample."""
        if context.shape[:2] != self.mask.shape:
            raise ValueError(f"the kept tokens were chosen for a (B, M) = {tuple(self.mask.shape)} context, "
                             f"got a context of shape {tuple(context.shape)}")
        return torch.gather(context, 1, self.index.unsqueeze(-1).expand(-1, -1, context.shape[-1]))

    def attention_mask(self) -> Optional[torch.Tensor]:
        """(B, 1, 1, m) bool mask for scaled_dot_product_attention (True = attend), or None."""
        return None if self.valid is None else self.valid[:, None, None, :]

    def counts(self) -> torch.Tensor:
        """(B,) number of kept tokens per row."""
        return self.mask.sum(dim=1)


def kept_tokens(mask: torch.Tensor) -> KeptTokens:
    """Index form of a (B, M) bool kept mask (see KeptTokens)."""
    counts = mask.sum(dim=1)
    width = int(counts.max())
    # Stable sort on "not kept": kept positions first, each group ascending.
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    uniform = bool((counts == width).all())
    valid = None if uniform else torch.arange(width, device=mask.device) < counts[:, None]
    return KeptTokens(mask=mask, index=order, valid=valid)


def protected_positions(tokens: torch.Tensor, eos_id: int = CLIP_EOS_ID) -> torch.Tensor:
    """Positions never pruned: BOS (position 0) and the first EOS of each row.

    tokens: (B, M) token ids -> (B, M) bool. A row without EOS protects only BOS. SD 1.x pads with EOS after
    the first one; those padding positions are not protected: they are ranked by importance like words.
    """
    protected = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
    protected[:, 0] = True
    is_eos = tokens == eos_id
    has_eos = is_eos.any(dim=1)
    first_eos = is_eos.to(torch.uint8).argmax(dim=1)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    protected[rows[has_eos], first_eos[has_eos]] = True
    return protected


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, scale: float,
                            attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T * scale) in float32: q (B, h, N, d), k (B, h, m, d) -> (B, h, N, m).

    attn_mask: (B, 1, 1, m) bool (True = attend) or None; masked tokens get probability 0.
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(dim=-1)


def token_importance(probs: torch.Tensor) -> torch.Tensor:
    """Mean attention probability of each context token over heads and queries: (B, h, N, m) -> (B, m)."""
    return probs.mean(dim=(1, 2))


def select_text_tokens(importance: torch.Tensor, protected: torch.Tensor, threshold: Optional[float] = None,
                       keep: Optional[int] = None, candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The tokens to keep, per row: (B, M) bool.

    importance: (B, M) mean attention probability (token_importance, averaged over layers);
    protected: (B, M) bool, always kept; candidates: (B, M) bool, the tokens that may be kept (None: all).
    threshold: keep the candidates whose importance is >= threshold. keep: keep the `keep` candidates of
    highest importance, the protected ones counted among them (ties: the lower position); protected tokens
    are kept even beyond `keep`. Give exactly one of threshold and keep.
    """
    if (threshold is None) == (keep is None):
        raise ValueError("give exactly one of threshold and keep")
    if importance.shape != protected.shape:
        raise ValueError(f"importance {tuple(importance.shape)} and protected {tuple(protected.shape)} differ")
    if candidates is None:
        candidates = torch.ones_like(protected)
    if threshold is not None:
        return (candidates & (importance >= threshold)) | protected
    score = importance.float().masked_fill(protected, float("inf")).masked_fill(~candidates, float("-inf"))
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :keep]
    top = torch.zeros_like(protected).scatter_(1, order, True)
    return (top & candidates) | protected
