"""Compiled execution of a UNet under any method: torch.compile (and CUDA graphs with 'reduce-overhead') around
exactly the work of one UNet call, and channels-last memory.

What is compiled:
- a DaTo or DeepCache patch (`datosd`, on an ldm / sgm UNet or a diffusers pipeline): the blocks of a call
  (`DatoState.compute`, a pure function of its inputs). The step's cache depth and prune ratio, the DiffScore
  maps and the random base tokens are decided before it runs (`DatoState.begin_call`), so the compiled region
  has no graph break and each (depth, ratio, scores known or drawn) variant is compiled once per process, with
  static shapes (K = floor(r N) is a constant of the variant). A depth-0 call returns the cache without entering it.
- any other method (original, DDIM-N, ToMeSD, T-GATE, prompt-token pruning): the UNet's forward. Patches that
  draw random numbers or keep Python state inside the forward (tomesd's random partition) may split the graph;
  they still run correctly.

CUDA graphs reuse their output buffers on the next replay, so under 'reduce-overhead' the outputs a sampler or
a cache keeps are copied out of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from datosd.state import DatoState
from datosd.utils import any_unet

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
# Variants one UNet may compile before Dynamo falls back to eager: a searched strategy uses at most
# 3 depths x 5 ratios x (scores drawn / known) = 30 variants; CFG batches and image sizes add to it.
RECOMPILE_LIMIT = 128


class CompileError(ValueError):
    """A compile setting that cannot be used (raised before any model is patched)."""


@dataclass(frozen=True)
class Execution:
    """How UNet calls run.

    compile: one of COMPILE_MODES ('none' = eager).
    channels_last: keep the UNet's weights (and so its convolution outputs) in channels-last memory.
    backend: the torch.compile backend ('inductor'; tests use 'eager' or a counting callable).
    """

    compile: str = "none"
    channels_last: bool = False
    backend: Union[str, Callable] = "inductor"

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            raise CompileError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")

    @property
    def compiles(self) -> bool:
        return self.compile != "none"

    @property
    def cuda_graphs(self) -> bool:
        """True when compiled calls replay CUDA graphs (their outputs must be copied before the next call)."""
        return self.compile == "reduce-overhead" and self.backend == "inductor" and torch.cuda.is_available()

    @property
    def label(self) -> str:
        parts = [] if self.compiles else ["eager"]
        if self.compiles:
            parts.append(f"compiled ({self.compile})")
        if self.channels_last:
            parts.append("channels-last")
        return ", ".join(parts)


EAGER = Execution()


def _clone(value: Any) -> Any:
    """Copies of the tensors in value (a tensor, or nested lists / tuples of them)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


class CompiledCall:
    """fn compiled once; every call runs under Dynamo's recompile limit for per-variant graphs and, with CUDA
    graphs, starts a new graph step and returns copies of the outputs."""

    def __init__(self, fn: Callable, execution: Execution, fullgraph: bool):
        options = {"backend": execution.backend, "fullgraph": fullgraph, "dynamic": False}
        if execution.backend == "inductor" and execution.compile != "default":
            options["mode"] = execution.compile
        self.fn = fn
        self.compiled = torch.compile(fn, **options)
        self.cuda_graphs = execution.cuda_graphs

    def __call__(self, *args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            result = self.compiled(*args, **kwargs)
        return _clone(result) if self.cuda_graphs else result


class CompiledUNet:
    """The compiled execution of one model's UNet; `remove()` restores eager execution and the memory format.

    dato_state: the model's DaTo/DeepCache state when patched (its per-call blocks are compiled), else None
    (the UNet's forward is compiled). fullgraph: refuse graph breaks (the DaTo blocks, when nothing else
    patches the transformer blocks).
    """

    def __init__(self, model: torch.nn.Module, execution: Execution, dato_state: Optional[DatoState] = None,
                 fullgraph: bool = False):
        self.unet = any_unet(model)
        self.execution = execution
        self.dato_state = dato_state
        self._removed = False
        if execution.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if not execution.compiles:
            return
        if dato_state is not None:
            dato_state.use_compute(CompiledCall(dato_state.compute, execution, fullgraph),
                                   clone_outputs=execution.cuda_graphs)
        else:
            self.unet.forward = CompiledCall(self.unet.forward, execution, fullgraph)

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        if self.execution.compiles:
            if self.dato_state is not None:
                self.dato_state.use_compute(None)
            else:
                del self.unet.forward  # the instance attribute; the class's forward shows again
        if self.execution.channels_last:
            self.unet.to(memory_format=torch.contiguous_format)
