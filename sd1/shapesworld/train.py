"""Training of the shapes model on this CPU: the VAE, then the UNet and the text encoder together.

Phases, each resumable (the state is saved atomically to `OUT/state.pt` every `save_every` steps and on Ctrl-C, and
a rerun of the same command goes on from there):
1. `vae`: the AutoencoderKL on shapes-world images: L1 + L2 reconstruction + a KL weight of 1e-6, as SD's VAE,
   without its perceptual and GAN losses; the pixels of objects (chroma above OBJECT_CHROMA) weigh
   1 + object_weight, since the objects are a few percent of the pixels and carry all the judge reads.
2. `pool`: `pool_size` scenes are drawn, rendered and encoded once (the posterior's mean and std kept); the
   latents' scale factor is 1 / their standard deviation, as CompVis' `scale_by_std`.
3. `diffusion`: the UNet and the CLIP text encoder on the pooled latents, each draw with a fresh caption of its
   scene (captions dropped to "" with probability `caption_dropout`, for classifier-free guidance): epsilon
   prediction on the SD 1.x noise schedule (the config's), Min-SNR-gamma loss weights (Hang et al. 2023), AdamW
   with a linear warm-up and cosine decay. The UNet's coordinate weights (ldm.modules.diffusionmodules.coordconv)
   are held at zero: this phase trains the plain SD UNet.
4. `layout`: the same, with the coordinate weights trained and `layout_share` of each batch drawn at the high
   noise levels (t >= `layout_from`) where the layout is decided, each with the x0 loss (epsilon loss / SNR,
   times `layout_x0_weight`), at a constant rate. The epsilon loss weighs those levels by their SNR (< 0.1), so
   the plain phase never learns where the caption puts an object. Starting at t = 700, where an object still
   shows faintly, lets the model tie the position words to the image.
5. `placement`: as `layout` at the highest noise levels (t >= `placement_from`), a larger share and weight, and a
   higher rate: there the model learns to place the object from the caption alone (a few hundred steps).
6. `polish`: a `polish_share` of high-noise draws and a cosine decay, so the details that the two phases
   before let slip come back.
Each diffusion-type phase keeps an EMA of the weights from its start; the last phase's is what ships.
Every random draw is a function of (seed, phase, step), so a resumed run continues exactly as an unbroken one.
`export_checkpoint` writes the model (EMA weights, float16) as a CompVis-layout .safetensors and its record.
"""
from __future__ import annotations

import functools
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

from .data import batch_scenes, scene_batch
from ldm.modules.diffusionmodules.coordconv import CoordConv2d
from .world import Scene, WorldConfig, caption

PHASES = ("vae", "pool", "diffusion", "layout", "placement", "polish", "done")
DIFFUSION_PHASES = ("diffusion", "layout", "placement", "polish")
PHASE_WARMUP = 20  # steps of linear warm-up of the phases after `diffusion`
OBJECT_CHROMA = 0.2  # in [-1, 1] units (25 of 255): backgrounds have none, objects about 1.4
STATE_FILE = "state.pt"
POOL_FILE = "pool.pt"


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights (recorded with them)."""

    config: str
    seed: int = 0
    vae_steps: int = 1600
    vae_batch: int = 16
    vae_lr: float = 1e-3
    object_weight: float = 10.0
    kl_weight: float = 1e-6
    pool_size: int = 16384
    pool_batch: int = 256
    steps: int = 3000
    batch: int = 48
    lr: float = 6e-4
    warmup: int = 100
    min_lr_share: float = 0.1
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    layout_steps: int = 600
    layout_lr: float = 3e-4
    layout_share: float = 0.5
    layout_from: int = 700
    layout_x0_weight: float = 0.3
    placement_steps: int = 500
    placement_lr: float = 1e-3
    placement_share: float = 0.75
    placement_from: int = 800
    placement_x0_weight: float = 1.0
    polish_steps: int = 400
    polish_lr: float = 3e-4
    polish_share: float = 0.25
    polish_from: int = 800
    polish_x0_weight: float = 1.0
    grad_clip: float = 1.0
    save_every: int = 100
    world: WorldConfig = field(default_factory=WorldConfig)

    def check(self) -> None:
        """ValueError naming the first setting out of range."""
        for name in ("vae_steps", "vae_batch", "pool_size", "pool_batch", "steps", "batch", "save_every",
                     "layout_steps", "placement_steps", "polish_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.object_weight >= 0.0:
            raise ValueError(f"--object-weight must be 0 or more, got {self.object_weight}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")
        for phase in DIFFUSION_PHASES[1:]:
            share, start, weight = (getattr(self, f"{phase}_{k}") for k in ("share", "from", "x0_weight"))
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"--{phase}-share must be in [0, 1], got {share}")
            if not 0 <= start < 1000:
                raise ValueError(f"--{phase}-from must be a timestep in [0, 1000), got {start}")
            if not weight >= 0.0:
                raise ValueError(f"--{phase}-x0-weight must be 0 or more, got {weight}")

    def plan(self, phase: str) -> "DiffusionPlan":
        """How the diffusion-type `phase` trains."""
        if phase == "diffusion":
            return DiffusionPlan(steps=self.steps, lr=self.lr, warmup=self.warmup, decay=True, high_noise_share=0.0,
                                 high_noise_from=0, x0_weight=0.0, train_coordinates=False)
        if phase not in DIFFUSION_PHASES:
            raise ValueError(f"{phase!r} is not a diffusion phase ({', '.join(DIFFUSION_PHASES)})")
        def setting(name: str):
            return getattr(self, f"{phase}_{name}")

        return DiffusionPlan(steps=setting("steps"), lr=setting("lr"), warmup=PHASE_WARMUP, decay=phase == "polish",
                             high_noise_share=setting("share"), high_noise_from=setting("from"),
                             x0_weight=setting("x0_weight"), train_coordinates=True)


@dataclass(frozen=True)
class DiffusionPlan:
    """One diffusion-type phase: its steps, peak rate, warm-up steps, whether the rate decays (cosine), the share of
    each batch drawn at high noise (t >= high_noise_from) with the x0 loss and that loss's weight, and whether the
    UNet's coordinate weights train."""

    steps: int
    lr: float
    warmup: int
    decay: bool
    high_noise_share: float
    high_noise_from: int
    x0_weight: float
    train_coordinates: bool


@dataclass
class TrainState:
    """Where a training run stands: its phase, the step within it, the model's, optimizer's and EMA weights' states,
    the losses so far ({phase: [(step, loss)]}) and the seconds spent per phase."""

    phase: str = "vae"
    step: int = 0
    model: Dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: Dict[str, object] = field(default_factory=dict)
    ema: Dict[str, torch.Tensor] = field(default_factory=dict)
    losses: Dict[str, List[List[float]]] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    settings: Dict[str, object] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """Write atomically (a Ctrl-C during the write leaves the previous state)."""
        tmp = path.with_suffix(".tmp")
        torch.save(asdict(self), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "TrainState":
        return cls(**torch.load(path, map_location="cpu", weights_only=True))


def build_model(config_path: str, seed: int = 0) -> torch.nn.Module:
    """The LatentDiffusion of the config, its modules' default initialisation drawn from `seed` (the global torch
    generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return instantiate_from_config(OmegaConf.load(config_path).model)


def _generator(seed: int, phase: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, PHASES.index(phase), step]).integers(2**62)))


def _rng(seed: int, phase: str, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, PHASES.index(phase), step, 1])


def _trainable(module: torch.nn.Module) -> torch.nn.Module:
    module.train()
    for param in module.parameters():
        param.requires_grad_(True)
    return module


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def lr_at(step: int, plan: DiffusionPlan, min_lr_share: float) -> float:
    """Linear warm-up to `plan.lr`, then constant or (plan.decay) cosine decay to `min_lr_share * lr` at the last
    step."""
    if step < plan.warmup:
        return plan.lr * (step + 1) / plan.warmup
    if not plan.decay:
        return plan.lr
    progress = (step - plan.warmup) / max(1, plan.steps - plan.warmup)
    return plan.lr * (min_lr_share + (1 - min_lr_share) * 0.5 * (1 + math.cos(math.pi * progress)))


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) of timesteps t: (B,)."""
    return alphas_cumprod[t] / (1 - alphas_cumprod[t])


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights of the epsilon loss: min(SNR(t), gamma) / SNR(t): (B,)."""
    ratio = snr(alphas_cumprod, t)
    return torch.clamp(ratio, max=gamma) / ratio


def diffusion_loss(per_image: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, high: int,
                   min_snr_gamma: float, x0_weight: float) -> torch.Tensor:
    """The loss of a batch whose last `high` draws are at high noise: per_image (B,) epsilon MSEs at timesteps
    t (B,). The mean Min-SNR-weighted epsilon loss of the first B - high, plus `x0_weight` times the mean x0 loss
    (epsilon MSE / SNR, the MSE of the implied x0) of the last `high`."""
    uniform = len(per_image) - high
    loss = per_image.new_zeros(())
    if uniform:
        loss = loss + (min_snr_weights(alphas_cumprod, t[:uniform], min_snr_gamma)
                       * per_image[:uniform]).mean()
    if high:
        loss = loss + x0_weight * (per_image[uniform:] / snr(alphas_cumprod, t[uniform:])).mean()
    return loss


class Trainer:
    """Runs the phases of one training run in `out_dir`; `on_step(phase, step, loss)` sees every step."""

    def __init__(self, settings: TrainSettings, out_dir: Path, progress: bool = True) -> None:
        settings.check()
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.stop_asked = False
        self.model = build_model(settings.config, settings.seed)
        self.state = TrainState(settings=_plain(settings))
        path = self.out_dir / STATE_FILE
        if path.exists():
            self.state = TrainState.load(path)
            if self.state.settings != _plain(settings):
                changed = sorted(k for k in _plain(settings) if self.state.settings.get(k) != _plain(settings)[k])
                raise ValueError(f"{self.out_dir} holds a run with other settings ({', '.join(changed)}); use "
                                 f"another output folder or the same settings to resume it")
            self.model.load_state_dict(self.state.model)

    # --- driving ---------------------------------------------------------------------------------------------
    def run(self) -> TrainState:
        """Run (or resume) every phase to the end. Ctrl-C (SIGINT) takes effect at the end of the step in progress:
        the state is saved and KeyboardInterrupt raised, so a rerun goes on from exactly there."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        phases = {"vae": self._train_vae, "pool": self._build_pool,
                  **{name: functools.partial(self._train_diffusion, name) for name in DIFFUSION_PHASES}}
        previous = signal.signal(signal.SIGINT, self._ask_to_stop) if _main_thread() else None
        try:
            while self.state.phase != "done":
                started = time.perf_counter()
                phase = self.state.phase
                try:
                    phases[phase]()
                finally:
                    self.state.seconds[phase] = self.state.seconds.get(phase, 0.0) + time.perf_counter() - started
                self.state.phase, self.state.step = PHASES[PHASES.index(phase) + 1], 0
                self.state.optimizer = {}
                self._save()
        except KeyboardInterrupt:
            self._save()
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return self.state

    def _ask_to_stop(self, signum, frame) -> None:
        self.stop_asked = True

    def _stop_if_asked(self) -> None:
        if self.stop_asked:
            raise KeyboardInterrupt

    def _save(self) -> None:
        self.state.model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.state.save(self.out_dir / STATE_FILE)

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, initial=self.state.step, desc=desc, disable=not self.progress, dynamic_ncols=True)

    # --- phase 1: the VAE ------------------------------------------------------------------------------------
    def _train_vae(self) -> None:
        s = self.settings
        vae = _trainable(self.model.first_stage_model)
        optimizer = torch.optim.Adam(vae.parameters(), lr=s.vae_lr)
        if self.state.optimizer:
            optimizer.load_state_dict(self.state.optimizer)
        with self._bar(s.vae_steps, "VAE") as bar:
            while self.state.step < s.vae_steps:
                step = self.state.step
                images = scene_batch(s.seed, step, s.vae_batch, s.world).images
                for group in optimizer.param_groups:  # the last tenth at a tenth of the rate
                    group["lr"] = s.vae_lr * (0.1 if step >= 0.9 * s.vae_steps else 1.0)
                posterior = vae.encode(images)
                reconstruction = vae.decode(posterior.sample(generator=_generator(s.seed, "vae", step)))
                error = reconstruction - images
                weights = 1.0 + s.object_weight * object_mask(images)
                rec_loss = ((error.abs() + error.pow(2)) * weights).mean() / weights.mean()
                loss = rec_loss + s.kl_weight * posterior.kl().mean() / images[0].numel()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                self._log("vae", step, rec_loss.item(), bar, optimizer)
        _frozen(vae)

    # --- phase 2: the latent pool ----------------------------------------------------------------------------
    @torch.no_grad()
    def _build_pool(self) -> None:
        """Encode `pool_size` images (batch c of the stream seeded seed + 1 for chunk c); set the scale factor."""
        s = self.settings
        vae = _frozen(self.model.first_stage_model)
        chunks = -(-s.pool_size // s.pool_batch)
        means, stds = [], []
        for chunk in tqdm(range(chunks), desc="encode pool", disable=not self.progress, dynamic_ncols=True):
            self._stop_if_asked()
            posterior = vae.encode(scene_batch(s.seed + 1, chunk, s.pool_batch, s.world).images)
            means.append(posterior.mean)
            stds.append(posterior.std)
        mean, std = torch.cat(means)[: s.pool_size], torch.cat(stds)[: s.pool_size]
        sample = mean + std * torch.randn(mean.shape, generator=_generator(s.seed, "pool", 0))
        self.model.scale_factor.fill_(1.0 / sample.flatten().std().item())
        tmp = self.out_dir / (POOL_FILE + ".tmp")
        torch.save({"mean": mean, "std": std}, tmp)
        os.replace(tmp, self.out_dir / POOL_FILE)

    # --- phase 3: UNet + text encoder ------------------------------------------------------------------------
    def _train_diffusion(self, phase: str) -> None:
        s = self.settings
        plan = s.plan(phase)
        model = self.model
        unet, text = _trainable(model.model), _trainable(model.cond_stage_model)
        params = [p for m in (unet, text) for p in m.parameters()]
        names = [f"model.{n}" for n, _ in unet.named_parameters()] + \
                [f"cond_stage_model.{n}" for n, _ in text.named_parameters()]
        coordinate_convs = [m for m in unet.modules() if isinstance(m, CoordConv2d)]
        optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.01)
        if self.state.optimizer:
            optimizer.load_state_dict(self.state.optimizer)
        if self.state.step == 0:
            self.state.ema = {n: p.detach().clone() for n, p in zip(names, params)}
        pool = torch.load(self.out_dir / POOL_FILE, map_location="cpu", weights_only=True)
        mean, std = pool["mean"], pool["std"]
        scenes = _PoolScenes(s)
        high = round(s.batch * plan.high_noise_share)
        with self._bar(plan.steps, "UNet + text" if phase == "diffusion" else phase) as bar:
            while self.state.step < plan.steps:
                step = self.state.step
                rng, generator = _rng(s.seed, phase, step), _generator(s.seed, phase, step)
                index = torch.from_numpy(rng.integers(len(mean), size=s.batch))
                posterior = DiagonalGaussianDistribution(torch.cat([mean[index], 2 * std[index].log()], dim=1))
                z = model.scale_factor * posterior.sample(generator=generator)
                captions = ["" if rng.random() < s.caption_dropout else caption(scenes[int(i)], rng) for i in index]
                t = torch.randint(0, model.num_timesteps, (s.batch - high,), generator=generator)
                if high:
                    t = torch.cat([t, torch.randint(plan.high_noise_from, model.num_timesteps, (high,),
                                                    generator=generator)])
                noise = torch.randn(z.shape, generator=generator)
                prediction = model.apply_model(model.q_sample(z, t, noise), t, text(captions))
                per_image = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
                loss = diffusion_loss(per_image, t, model.alphas_cumprod, high, s.min_snr_gamma, plan.x0_weight)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, plan, s.min_lr_share)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if not plan.train_coordinates:
                    for conv in coordinate_convs:
                        conv.hold_coordinates()
                torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
                optimizer.step()
                decay = min(s.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for name, param in zip(names, params):
                        self.state.ema[name].lerp_(param.detach(), 1 - decay)
                self._log(phase, step, per_image.mean().item(), bar, optimizer)
        _frozen(unet)
        _frozen(text)

    def _log(self, phase: str, step: int, loss: float, bar: tqdm, optimizer: torch.optim.Optimizer) -> None:
        if not math.isfinite(loss):
            raise FloatingPointError(f"the {phase} loss is {loss} at step {step}; lower the learning rate")
        self.state.losses.setdefault(phase, []).append([step, loss])
        self.state.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if self.state.step % self.settings.save_every == 0 or self.stop_asked:
            self.state.optimizer = optimizer.state_dict()
            self._save()
        self._stop_if_asked()

    def ema_model(self) -> torch.nn.Module:
        """The model with the EMA weights of the UNet and text encoder."""
        model = build_model(self.settings.config, self.settings.seed)
        model.load_state_dict(self.model.state_dict())
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.state.ema:
                    param.copy_(self.state.ema[name])
        return model.eval()


class _PoolScenes:
    """The scenes of the pooled latents, drawn again chunk by chunk when first asked for."""

    def __init__(self, settings: TrainSettings) -> None:
        self.settings = settings
        self.chunks: Dict[int, tuple] = {}

    def __getitem__(self, index: int) -> Scene:
        s = self.settings
        chunk, offset = divmod(index, s.pool_batch)
        if chunk not in self.chunks:
            self.chunks[chunk] = batch_scenes(s.seed + 1, chunk, s.pool_batch, s.world)[0]
        return self.chunks[chunk][offset]


def object_mask(images: torch.Tensor) -> torch.Tensor:
    """1 where a pixel belongs to an object (chroma, max - min of R, G, B, above OBJECT_CHROMA), else 0:
    images (B, 3, H, W) in [-1, 1] -> (B, 1, H, W)."""
    chroma = images.max(dim=1, keepdim=True).values - images.min(dim=1, keepdim=True).values
    return (chroma > OBJECT_CHROMA).float()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _plain(settings: TrainSettings) -> Dict[str, object]:
    plain = asdict(settings)
    plain["world"] = {k: list(v) if isinstance(v, tuple) else v for k, v in plain["world"].items()}
    return plain
