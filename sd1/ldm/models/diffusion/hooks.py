"""Typed observers of a sampling run: what the samplers tell a patch (such as datosd) about runs, steps and
UNet calls.

A model holds one `SamplingHooks` (`model.sampling_hooks`); a patch adds a `SamplingHook` to it. Every sampler
(DDIM, PLMS, and the SDXL EulerEDM sampler, which does not hold the model and so takes them as its call keyword
`sampling_hooks=engine.sampling_hooks`) announces, in order:

    sampling_started(num_steps)       once, before the first step
    step_started(step)                before step i = 0 .. num_steps - 1 (0 is the noisiest)
    model_call(cfg_halves)            before every UNet call of the step (PLMS calls twice in step 0);
                                      cfg_halves: the batch is [unconditional; conditional]
    sampling_finished()               once, at the end (also when a step raised)

Methods are looked up by name on a typed class, so a misspelled event fails loudly instead of doing nothing.
"""
from contextlib import contextmanager
from typing import Iterator, List


class SamplingHook:
    """Base class of a sampling observer; override what you need (every default does nothing)."""

    def sampling_started(self, num_steps: int) -> None:
        """A run of `num_steps` sampler steps starts."""

    def step_started(self, step: int) -> None:
        """Sampler step `step` (0 = the noisiest) starts."""

    def model_call(self, cfg_halves: bool) -> None:
        """The sampler is about to call the UNet; `cfg_halves`: its batch is [unconditional; conditional]."""

    def sampling_finished(self) -> None:
        """The run ended (normally or by an exception)."""


class SamplingHooks:
    """The hooks registered on one model. Samplers call the `SamplingHook` methods on this object, which
    forwards each call to every registered hook in the order they were added."""

    def __init__(self) -> None:
        self._hooks: List[SamplingHook] = []

    def add(self, hook: SamplingHook) -> None:
        if not isinstance(hook, SamplingHook):
            raise TypeError(f"a sampling hook must subclass SamplingHook, got {type(hook).__name__}")
        self._hooks.append(hook)

    def remove(self, hook: SamplingHook) -> None:
        """Remove `hook` if it is registered (no error otherwise)."""
        if hook in self._hooks:
            self._hooks.remove(hook)

    def __contains__(self, hook: object) -> bool:
        return hook in self._hooks

    def __iter__(self) -> Iterator[SamplingHook]:
        return iter(list(self._hooks))

    def __len__(self) -> int:
        return len(self._hooks)

    def sampling_started(self, num_steps: int) -> None:
        for hook in list(self._hooks):
            hook.sampling_started(num_steps)

    def step_started(self, step: int) -> None:
        for hook in list(self._hooks):
            hook.step_started(step)

    def model_call(self, cfg_halves: bool) -> None:
        for hook in list(self._hooks):
            hook.model_call(cfg_halves)

    def sampling_finished(self) -> None:
        for hook in list(self._hooks):
            hook.sampling_finished()

    @contextmanager
    def run(self, num_steps: int):
        """`sampling_started(num_steps)` on entry, `sampling_finished()` on exit (also on an exception)."""
        self.sampling_started(num_steps)
        try:
            yield self
        finally:
            self.sampling_finished()
