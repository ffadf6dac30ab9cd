"""Command-line flags shared by the generation scripts, and their translation into registry names."""
import argparse
import math

from datosd.strategy import MAX_DEPTH

from ..compiled import COMPILE_MODES, Execution
from ..methods import Method, MethodError, parse_method
from ..resources import DEMO_CONFIG
from ..runtime import UsageError

DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
DATO_FLAGS = ("strategy", "dato_parity", "diff_source", "cfg_reference", "recover_from", "no_align_cfg",
              "max_downsample", "prune_crossattn", "prune_mlp", "score_noise")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--config, --ckpt, --ema, --demo, --device, --precision (CompVis names). Call resolve_model_args on the
    parsed options."""
    parser.add_argument("--config", type=str, default=None,
                        help=f"path to config which constructs model (default {DEFAULT_CONFIG}; with --demo the "
                             f"tiny demo config)")
    parser.add_argument("--ckpt", type=str, default=DEFAULT_CKPT,
                        help="path to checkpoint of model (.ckpt or .safetensors)")
    parser.add_argument("--ema", action="store_true",
                        help="use the checkpoint's EMA weights (model_ema.*) if it has them")
    parser.add_argument("--demo", action="store_true",
                        help="seeded random weights, no checkpoint: the built-in tiny SD model, or --config's model "
                             "(e.g. configs/stable-diffusion/tiny-demo-sdxl.yaml)")
    parser.add_argument("--device", type=str, choices=["auto", "cpu", "cuda"], default="auto",
                        help="where to run (auto: CUDA when available)")
    parser.add_argument("--precision", type=str, choices=["full", "autocast"], default="autocast",
                        help="autocast = float16 on CUDA, bfloat16 on CPU; full = float32")


def resolve_model_args(opt: argparse.Namespace) -> argparse.Namespace:
    """Fill in the default --config: the tiny demo config with --demo, else the SD 1.x inference config."""
    if opt.config is None:
        opt.config = str(DEMO_CONFIG) if opt.demo else DEFAULT_CONFIG
    return opt


def add_acceleration_args(parser: argparse.ArgumentParser) -> None:
    """The method flags: --method NAME, or --dato / --deepcache / --tome with their settings."""
    group = parser.add_argument_group("acceleration (DaTo and the paper's baselines)")
    group.add_argument("--method", type=str, default=None,
                       help="any method of the registry by name, e.g. 'dato:b1', 'deepcache-n3+tome-0.5', "
                            "'dato@last37' (see sdgen.methods); instead of the flags below")
    group.add_argument("--dato", action="store_true", help="DaTo: per-step token pruning + feature caching")
    group.add_argument("--strategy", type=str, default=None,
                       help="DaTo strategy: a YAML file or a shipped name (default b1, the paper's Table 6)")
    group.add_argument("--dato_parity", action="store_true",
                       help="the released-code parity preset: eps DiffScore, score noise, uncond CFG reference, "
                            "recovery from kept tokens (README lists what it still does differently)")
    group.add_argument("--diff_source", choices=["features", "eps"], default=None,
                       help="DiffScore source (default features, the paper's)")
    group.add_argument("--cfg_reference", choices=["cond", "uncond"], default=None,
                       help="CFG half that chooses the base tokens (default cond)")
    group.add_argument("--recover_from", choices=["base", "kept"], default=None,
                       help="pruned tokens copy their most similar base token (default) or kept token")
    group.add_argument("--no_align_cfg", action="store_true", help="choose base tokens per CFG half")
    group.add_argument("--max_downsample", type=int, default=None, choices=[1, 2, 4, 8],
                       help="prune transformer blocks down to this downsampling (default 1: highest resolution)")
    group.add_argument("--prune_crossattn", action="store_true", help="also prune around cross-attention")
    group.add_argument("--prune_mlp", action="store_true", help="also prune around the feed-forward")
    group.add_argument("--score_noise", type=float, nargs=2, default=None, metavar=("W_DIFF", "W_NOISE"),
                       help="the released code's score: +-W_DIFF * DiffScore + W_NOISE * N(0,1) (it uses 0.1 0.1)")
    group.add_argument("--deepcache", action="store_true", help="uniform DeepCache feature caching")
    group.add_argument("--cache_interval", type=int, default=3, help="DeepCache: every N-th step is full")
    group.add_argument("--cache_depth", type=int, default=1,
                       help="DeepCache: blocks computed at the cached steps (1 = shallowest branch, 0..12)")
    group.add_argument("--tome", action="store_true", help="ToMeSD token merging (tomesd package)")
    group.add_argument("--tome_ratio", type=float, default=0.5, help="ToMeSD merge ratio in [0, 1)")
    execution = parser.add_argument_group("execution (any method)")
    execution.add_argument("--compile", choices=COMPILE_MODES, default="none",
                           help="torch.compile the UNet calls: each DaTo/DeepCache (depth, ratio) variant is compiled "
                                "once per process; 'reduce-overhead' replays CUDA graphs on a GPU")
    execution.add_argument("--channels_last", action="store_true",
                           help="keep the UNet in channels-last memory (faster convolutions on recent GPUs)")
    text = parser.add_argument_group("cross-attention (prompt-token pruning, T-GATE; combine with the above)")
    text.add_argument("--prune_text", action="store_true",
                      help="prune prompt tokens by their cross-attention importance after a warm-up")
    text.add_argument("--text_warmup", type=float, default=0.2,
                      help="share of the steps that see every prompt token (default 0.2)")
    rule = text.add_mutually_exclusive_group()
    rule.add_argument("--text_threshold", type=float, default=None,
                      help="keep tokens whose mean cross-attention probability is at least this")
    rule.add_argument("--text_keep", type=int, default=None, help="keep this many tokens (BOS and EOS included)")
    text.add_argument("--text_mode", choices=["static", "dynamic"], default="static",
                      help="kept set frozen after the warm-up (static) or re-chosen each step (dynamic, threshold)")
    text.add_argument("--tgate_step", type=int, default=None,
                      help="T-GATE: from this step on, reuse the cached cross-attention output")
    text.add_argument("--tgate_cache", choices=["cfg_mean", "per_half"], default="cfg_mean",
                      help="T-GATE cache: the CFG halves' mean (the paper's) or each half its own")


def _dato_option_tokens(opt: argparse.Namespace) -> list:
    tokens = ["parity"] if opt.dato_parity else []
    for name in ("diff_source", "cfg_reference", "recover_from", "max_downsample"):
        if getattr(opt, name) is not None:
            tokens.append(f"{name}={getattr(opt, name)}")
    if opt.no_align_cfg:
        tokens.append("align_cfg=0")
    tokens += [name for name in ("prune_crossattn", "prune_mlp") if getattr(opt, name)]
    if opt.score_noise is not None:
        w_diff, w_noise = opt.score_noise
        tokens.append(f"score_noise={w_diff:g}/{w_noise:g}")
    return tokens


def method_name_from_args(opt: argparse.Namespace) -> str:
    """The registry name the acceleration flags describe (UsageError on contradictions)."""
    dato_flags = [f"--{name}" for name in DATO_FLAGS if getattr(opt, name) not in (None, False)]
    if opt.method is not None:
        given = dato_flags + [f"--{name}" for name in ("dato", "deepcache", "tome", "prune_text") if getattr(opt, name)]
        given += ["--tgate_step"] if opt.tgate_step is not None else []
        if given:
            raise UsageError(f"--method {opt.method} names the whole method; drop {', '.join(given)}")
        return opt.method
    if opt.dato and (opt.deepcache or opt.tome):
        raise UsageError("--dato already caches and prunes; do not combine it with --deepcache or --tome")
    if dato_flags and not opt.dato:
        raise UsageError(f"{', '.join(dato_flags)} set(s) DaTo: add --dato")
    parts = []
    if opt.deepcache:
        if opt.cache_interval < 1:
            raise UsageError(f"--cache_interval must be at least 1, got {opt.cache_interval}")
        if not 0 <= opt.cache_depth <= MAX_DEPTH:
            raise UsageError(f"--cache_depth must be in 0..{MAX_DEPTH}, got {opt.cache_depth}")
        parts.append(f"deepcache-n{opt.cache_interval}" + (f"-d{opt.cache_depth}" if opt.cache_depth != 1 else ""))
    if opt.dato:
        if opt.strategy is not None and any(c in opt.strategy for c in ",@+"):
            raise UsageError(f"--strategy {opt.strategy}: the path may not contain ',', '@' or '+'; rename it")
        name = "dato" + (f":{opt.strategy}" if opt.strategy is not None else "")
        tokens = _dato_option_tokens(opt)
        parts.append(name + ("," + ",".join(tokens) if tokens else ""))
    if opt.tome:
        if not (math.isfinite(opt.tome_ratio) and 0.0 <= opt.tome_ratio < 1.0):
            raise UsageError(f"--tome_ratio must be in [0, 1), got {opt.tome_ratio}")
        parts.append(f"tome-{opt.tome_ratio:g}")
    parts += _cross_attention_parts(opt)
    return "+".join(parts) or "original"


def _cross_attention_parts(opt: argparse.Namespace) -> list:
    """textprune-... / tgate-... from the cross-attention flags."""
    rule_given = opt.text_threshold is not None or opt.text_keep is not None
    if not opt.prune_text and (rule_given or opt.text_mode != "static"):
        raise UsageError("--text_threshold, --text_keep and --text_mode set prompt-token pruning: add --prune_text")
    if opt.prune_text and opt.tgate_step is not None:
        raise UsageError("--prune_text and --tgate_step both replace the cross-attention; use one of them")
    if opt.prune_text:
        if not rule_given:
            raise UsageError("--prune_text needs --text_threshold T or --text_keep K")
        rule = f"k{opt.text_keep}" if opt.text_keep is not None else f"t{opt.text_threshold:g}"
        return [f"textprune-{opt.text_warmup:g}-{rule}" + ("-dynamic" if opt.text_mode == "dynamic" else "")]
    if opt.tgate_step is not None:
        return [f"tgate-{opt.tgate_step}" + ("-perhalf" if opt.tgate_cache == "per_half" else "")]
    if opt.tgate_cache != "cfg_mean":
        raise UsageError("--tgate_cache sets T-GATE: add --tgate_step M")
    return []


def execution_from_args(opt: argparse.Namespace) -> Execution:
    """How the UNet calls run (--compile, --channels_last)."""
    return Execution(compile=opt.compile, channels_last=opt.channels_last)


def method_from_args(opt: argparse.Namespace) -> Method:
    """The Method the flags describe; MethodError/StrategyError/UsageError before any model is built."""
    try:
        return parse_method(method_name_from_args(opt))
    except MethodError as err:
        raise UsageError(str(err)) from None
