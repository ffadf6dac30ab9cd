"""What txt2img and img2img share: the checked start (flags, files, model, seed), the prompt batches of --prompt /
--from-file, and the CompVis loop that samples --n_iter passes over them under one applied method and writes
every image and the grid."""
import os
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

from ldm.checkpoint import CheckpointError
from tqdm import tqdm, trange

from .. import generate as gen
from ..images import SampleWriter, to_uint8_images
from ..methods import AppliedMethod, Method, MethodError
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
    if opt.demo:
        print(f"*** {gen.DEMO_LABEL}: images are noise-like by design ***")
    return checked, model


def read_prompt_batches(opt) -> List[List[str]]:
    """Prompt batches: --n_samples copies of --prompt, or the non-blank lines of --from-file in chunks."""
    if not opt.from_file:
        return [opt.n_samples * [opt.prompt]]
    if not os.path.isfile(opt.from_file):
        raise UsageError(f"--from-file {opt.from_file} does not exist")
    try:
        with open(opt.from_file, "r", encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--from-file {opt.from_file}: cannot read it ({err})") from None
    if not prompts:
        raise UsageError(f"--from-file {opt.from_file} holds no prompt")
    return gen.batches(prompts, opt.n_samples)


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
