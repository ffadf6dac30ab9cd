"""Command-line flags shared by the generation scripts: the model, and the methods (made by the registry from
its kinds)."""
import argparse

from ..compiled import COMPILE_MODES, Execution
from ..methods import REGISTRY, Method, MethodError, Registry, registry_of
from ..resources import SHAPES_CONFIG, SHAPES_WEIGHTS
from ..runtime import UsageError

DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--config, --ckpt, --ema, --demo, --device, --precision (CompVis names). Call resolve_model_args on the
    parsed options."""
    parser.add_argument("--config", type=str, default=None,
                        help=f"path to config which constructs model (default {DEFAULT_CONFIG}; with --demo the "
                             f"shapes model's)")
    parser.add_argument("--ckpt", type=str, default=DEFAULT_CKPT,
                        help="path to checkpoint of model (.ckpt or .safetensors)")
    parser.add_argument("--ema", action="store_true",
                        help="use the checkpoint's EMA weights (model_ema.*) if it has them")
    parser.add_argument("--demo", action="store_true",
                        help="no checkpoint needed: the built-in shapes model (trained on this repository's shapes "
                             "world, weights shipped); with --config, that model with seeded random weights (e.g. "
                             "configs/stable-diffusion/tiny-demo.yaml, tiny-demo-sdxl.yaml)")
    parser.add_argument("--device", type=str, choices=["auto", "cpu", "cuda"], default="auto",
                        help="where to run (auto: CUDA when available)")
    parser.add_argument("--precision", type=str, choices=["full", "autocast"], default="autocast",
                        help="autocast = float16 on CUDA, bfloat16 on CPU; full = float32")


def resolve_model_args(opt: argparse.Namespace) -> argparse.Namespace:
    """Fill in the model: --demo alone is the shapes model (its config and shipped checkpoint, loaded like any
    checkpoint); --demo with --config is that config with seeded random weights; else --config defaults to the
    SD 1.x inference config."""
    if opt.demo and opt.config is None:
        opt.config, opt.ckpt, opt.demo = str(SHAPES_CONFIG), str(SHAPES_WEIGHTS), False
    elif opt.config is None:
        opt.config = DEFAULT_CONFIG
    return opt


def add_acceleration_args(parser: argparse.ArgumentParser, registry: Registry = REGISTRY) -> None:
    """The method flags of every kind of `registry` (--method NAME, or --dato / --deepcache / --tome / ... with
    their settings), and the execution flags (--compile, --channels_last)."""
    registry.add_flags(parser)
    execution = parser.add_argument_group("execution (any method)")
    execution.add_argument("--compile", choices=COMPILE_MODES, default="none",
                           help="torch.compile the UNet calls: each DaTo/DeepCache (depth, ratio) variant is compiled "
                                "once per process; 'reduce-overhead' replays CUDA graphs on a GPU")
    execution.add_argument("--channels_last", action="store_true",
                           help="keep the UNet in channels-last memory (faster convolutions on recent GPUs)")


def execution_from_args(opt: argparse.Namespace) -> Execution:
    """How the UNet calls run (--compile, --channels_last)."""
    return Execution(compile=opt.compile, channels_last=opt.channels_last)


def method_from_args(opt: argparse.Namespace) -> Method:
    """The Method the flags describe, through the registry the parser was built with; UsageError /
    StrategyError before any model is built."""
    try:
        return registry_of(opt).from_flags(opt)
    except MethodError as err:
        raise UsageError(str(err)) from None


def method_name_from_args(opt: argparse.Namespace) -> str:
    """The registry name the acceleration flags describe."""
    return method_from_args(opt).name
