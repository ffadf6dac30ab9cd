"""What txt2img and img2img share: the prompt batches of --prompt / --from-file, and the CompVis loop that samples
--n_iter passes over them under one applied method and writes every image and the grid."""
import os
from typing import Callable, List, Sequence

from tqdm import tqdm, trange

from .. import generate as gen
from ..compiled import Execution
from ..images import SampleWriter, to_uint8_images
from ..methods import AppliedMethod, Method
from ..runtime import UsageError
from ..settings import RunSettings


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


def sample_passes(model, method: Method, settings: RunSettings, execution: Execution, batches: Sequence[List[str]],
                  n_iter: int, writer: SampleWriter,
                  sample_batch: Callable[[List[str], AppliedMethod, int], gen.SampleResult]) -> None:
    """`n_iter` passes over `batches` with `method` applied once: sample_batch(prompts, applied, seed) gives a
    batch's latents (run k of the passes uses seed settings.seed + k), which are decoded and written."""
    run_index = 0
    with method.apply(model, settings.sampler_steps, seed=settings.seed, execution=execution) as applied:
        for _ in trange(n_iter, desc="Sampling"):
            for prompts in tqdm(batches, desc="data"):
                result = sample_batch(prompts, applied, settings.seed + run_index)
                writer.add(to_uint8_images(gen.decode(model, result.latents, settings.precision)), result.seconds)
                run_index += 1
