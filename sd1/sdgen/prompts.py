"""Prompt files: one prompt per line, the line index being the prompt's index (the shipped sets are in `data/`,
see `data/README.md`); and the check that prompts fit the CLIP text encoder's 77 tokens."""
from pathlib import Path
from typing import Optional, Sequence, Union

PathLike = Union[str, Path]
CLIP_CONTEXT = 77  # the text encoders' tokens (SD 1.x, 2.x and SDXL): start, 75 of the prompt, end


def long_prompt_warning(prompts: Sequence[str], context: int = CLIP_CONTEXT) -> Optional[str]:
    """One line when some of `prompts` have more tokens than the text encoder reads (it keeps the first
    `context` - 2 and drops the rest, as Stable Diffusion always did): how many, and the longest; None when all
    fit. A prompt of at most `context` - 2 UTF-8 bytes fits without tokenizing (a BPE token covers one byte or
    more), so short prompt sets cost nothing."""
    candidates = {p for p in prompts if len(p.encode("utf-8")) > context - 2}
    if not candidates:
        return None
    from ldm.modules.encoders.modules import CLIPTokenizerHF

    tokenizer = CLIPTokenizerHF(max_length=context)
    long = sorted((n for n in (len(tokenizer.encode(p)) + 2 for p in candidates) if n > context), reverse=True)
    if not long:
        return None
    unique = len(set(prompts))
    return (f"{len(long)} of {unique} prompts are longer than the text encoder's {context} tokens (the longest "
            f"has {long[0]} tokens): only their first {context - 2} tokens are read, the rest is cut off")


def read_prompts(path: PathLike) -> list:
    """Read a prompt file: one prompt per line, UTF-8.

    Only the line terminator (`\\n`, or `\\r\\n`) is removed; other whitespace is kept
    as written. A final newline does not start an extra prompt.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, or has a blank line (a blank line would shift
            the prompt <-> image index pairing, so it is refused rather than kept).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text == "":
        raise ValueError(f"prompt file is empty: {path} (expected one prompt per line)")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start a new one
    prompts = [line[:-1] if line.endswith("\r") else line for line in lines]
    for i, prompt in enumerate(prompts):
        if prompt.strip() == "":
            raise ValueError(
                f"{path}: line {i + 1} is blank; a prompt file has one non-empty prompt per line"
            )
    return prompts
