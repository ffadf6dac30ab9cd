"""What txt2img and img2img share: the checked start (flags, files, model, seed), the prompt batches of --prompt /
--from-file, and the CompVis loop that samples --n_iter passes over them under one applied method and writes
every image and the grid."""
import math
import os
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

from ldm.checkpoint import CheckpointError
from tqdm import tqdm, trange

from .. import generate as gen
from ..images import SampleWriter, to_uint8_images
from ..methods import AppliedMethod, Method, MethodError
from ..prompts import long_prompt_warning
from ..runtime import UsageError, pick_device, seed_everything
from ..settings import RunSettings
from .flags import execution_from_args


def checked_start(opt, check: Callable, model=None) -> Optional[Tuple[Any, Any]]:
    """(check(opt), the model: `model`, or the one of --config / --ckpt / --demo loaded on --device), or None
    after one 'error: ...' line when a flag or a file cannot be used. Then the run is seeded (--seed)."""
    try:
        checked = check(opt)
        device = pick_device(opt.device)
        if model is None:
            model = gen.load_model(opt.config, opt.ckpt, device, use_ema=opt.ema, demo=opt.demo)
    except (UsageError, CheckpointError, MethodError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    seed_everything(opt.seed)
    if (banner := gen.model_banner(opt.config, opt.demo)) is not None:
        print(banner)
    return checked, model


DEFAULT_PROMPT = "a painting of a virus monster playing guitar"


def add_prompt_args(parser) -> None:
    """--prompt and --from-file (CompVis names; one or the other)."""
    parser.add_argument("--prompt", type=str, nargs="?", default=None,
                        help=f"the prompt to render (default {DEFAULT_PROMPT!r}; with the shapes model "
                             f"{gen.SHAPES_PROMPT!r})")
    parser.add_argument("--from-file", type=str, help="if specified, load prompts from this file (one per line)")


def read_prompt_list(opt) -> List[str]:
    """The prompts of a run: --prompt (or the default prompt), or the non-blank lines of --from-file (the two
    together are refused). Prints one warning when prompts are longer than the text encoder reads."""
    if opt.from_file and opt.prompt is not None:
        raise UsageError(f"--prompt and --from-file were both given: the run takes its prompts from one of them; "
                         f"drop --prompt to render the lines of {opt.from_file}, or drop --from-file")
    if not opt.from_file:
        default = gen.SHAPES_PROMPT if gen.is_shapes_config(opt.config) else DEFAULT_PROMPT
        prompts = [default if opt.prompt is None else opt.prompt]
    else:
        if not os.path.isfile(opt.from_file):
            raise UsageError(f"--from-file {opt.from_file} does not exist")
        try:
            with open(opt.from_file, "r", encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--from-file {opt.from_file}: cannot read it ({err})") from None
        if not prompts:
            raise UsageError(f"--from-file {opt.from_file} holds no prompt")
    warning = long_prompt_warning(prompts)
    if warning is not None:
        print(f"warning: {warning}", file=sys.stderr)
    return prompts


def sampler_calls(opt, prompts: Sequence[str]) -> int:
    """Sampler calls of a run (each gets its own seed): --n_iter passes over the batches of `prompts`."""
    per_pass = math.ceil(len(prompts) / max(opt.n_samples, 1)) if opt.from_file else 1
    return opt.n_iter * per_pass


def prompt_batches(opt, prompts: Sequence[str]) -> List[List[str]]:
    """Prompt batches: --n_samples copies of --prompt, or the lines of --from-file in chunks of --n_samples
    (call it once the run settings are checked: it holds --n_samples strings)."""
    if not opt.from_file:
        return [opt.n_samples * list(prompts)]
    return gen.batches(list(prompts), opt.n_samples)


SampleBatch = Callable[[List[str], AppliedMethod, int], gen.SampleResult]


def sample_passes(model, method: Method, settings: RunSettings, opt, batches: Sequence[List[str]],
                  writer: SampleWriter, sample_batch: SampleBatch) -> int:
    """--n_iter passes over `batches` with `method` applied once (run as --compile / --channels_last say):
    sample_batch(prompts, applied, seed) gives a batch's latents (run k of the passes uses seed settings.seed + k),
    which are decoded and written; then the grid of --n_rows images per row. Returns the exit code, 0."""
    run_index = 0
    execution = execution_from_args(opt)
    with method.apply(model, settings.sampler_steps, seed=settings.seed, execution=execution) as applied:
        for _ in trange(opt.n_iter, desc="Sampling"):
            for prompts in tqdm(batches, desc="data"):
                result = sample_batch(prompts, applied, settings.seed + run_index)
                writer.add(to_uint8_images(gen.decode(model, result.latents, settings.precision)), result.seconds)
                run_index += 1
    writer.finish(opt.n_rows if opt.n_rows > 0 else opt.n_samples)
    return 0
