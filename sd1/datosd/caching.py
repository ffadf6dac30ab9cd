"""The one caching forward of every UNet family (spec 2) and the pruned sub-layer of every transformer block
(spec 6). A family (the CompVis / generative-models UNetModel in `patch.py`, diffusers' UNet2DConditionModel in
`diffusers_patch.py`) gives its blocks as a `UNetBlocks`; the forward and the token selection are shared, and
every call's blocks run through `DatoState.compute`, so whatever runs them (eager, compiled) covers every family.
"""
from typing import Any, List, Optional, Protocol, Tuple

import torch

from .dato import TokenSelection, select_tokens
from .state import DatoState


class UNetBlocks(Protocol):
    """A UNet seen as spec 2's blocks: input_blocks[0 .. n-1], the middle block, output_blocks[0 .. n-1], out.

    begin(x, cond) -> (h, ctx): the input of input_blocks[0] and what every block needs (time embedding, text
    states); input_block(k, h, ctx); middle_block(h, ctx); output_block(j, h, ctx, next_skip): h is the previous
    output concatenated with its skip, next_skip the skip the next output block takes (None after the last);
    out(h, ctx): the head.
    """

    n_blocks: int

    def begin(self, x: torch.Tensor, cond: Any) -> Tuple[torch.Tensor, Any]: ...

    def input_block(self, k: int, h: torch.Tensor, ctx: Any) -> torch.Tensor: ...

    def middle_block(self, h: torch.Tensor, ctx: Any) -> torch.Tensor: ...

    def output_block(self, j: int, h: torch.Tensor, ctx: Any, next_skip: Optional[torch.Tensor]) -> torch.Tensor: ...

    def out(self, h: torch.Tensor, ctx: Any) -> torch.Tensor: ...


def caching_forward(state: DatoState, blocks: UNetBlocks, x: torch.Tensor, cond: Any) -> torch.Tensor:
    """x: (B, C, H, W) -> (B, C_out, H, W), computing only the blocks the step's cache depth asks for (spec 2).
    cond: the family's conditioning of the call (what `blocks.begin` reads)."""
    depth = state.begin_call(x)
    if depth == 0:
        return state.reused_output()  # spec 2: every block reused, so the prediction is the last computed one
    out, outputs = state.compute(blocks, x, cond, depth, state.cached_input(depth))
    state.end_call(x, depth, outputs, out)
    return out


def compute_blocks(blocks: UNetBlocks, x: torch.Tensor, cond: Any, depth: int,
                   cached: Optional[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The blocks of one call at cache depth `depth` (spec 2), a pure function of its inputs (compilable).

    x: (B, C, H, W); cached: the output of output_blocks[n - 1 - depth] of the last computed call (None for a
    full call). Returns (UNet output (B, C_out, H, W), the outputs of the output blocks it ran, in order). The
    skip connections of the computed output blocks come from the freshly computed input blocks.
    """
    n = blocks.n_blocks
    h, ctx = blocks.begin(x, cond)
    hs = []
    for k in range(min(depth, n)):
        h = blocks.input_block(k, h, ctx)
        hs.append(h)
    if cached is None:
        h = blocks.middle_block(h, ctx)
        first_output = 0
    else:
        first_output = n - depth
        h = cached
    outputs = []
    for j in range(first_output, n):
        h = torch.cat([h, hs.pop()], dim=1)
        h = blocks.output_block(j, h, ctx, hs[-1] if hs else None)
        outputs.append(h)
    return blocks.out(h, ctx), outputs


def pruned(layer, norm, x: torch.Tensor, selection: TokenSelection, prune: bool, **kwargs) -> torch.Tensor:
    """Residual sub-layer x + layer(norm(x)), on the kept tokens when `prune` (outputs copied to pruned ones)."""
    if not prune:
        return layer(norm(x), **kwargs) + x
    return selection.recover(layer(norm(selection.prune(x)), **kwargs)) + x


def token_selection(state: DatoState, x: torch.Tensor) -> Optional[TokenSelection]:
    """The token selection of one transformer block's input x: (B, N, C), or None when it does not prune."""
    call = state.call
    if call is None or call.ratio <= 0:
        return None
    top = state.attention_downsample
    height, width = call.latent_hw[0] // top, call.latent_hw[1] // top  # the N_max grid (spec 6)
    n_tokens = x.shape[1]
    options = state.options
    if n_tokens * options.max_downsample ** 2 < height * width:
        return None
    downsample = 1
    while (height // downsample) * (width // downsample) > n_tokens:
        downsample *= 2
    hw = (height // downsample, width // downsample)
    if hw not in call.scores:
        raise RuntimeError(f"cannot place {n_tokens} tokens on a pruning grid of a {height}x{width} attention level")
    return select_tokens(x, call.scores[hw], call.ratio, hw, patch=options.patch,
                         cfg_halves=options.align_cfg and call.cfg_halves, cfg_reference=options.cfg_reference,
                         recover_from=options.recover_from, random_local=call.random_local.get(hw))
