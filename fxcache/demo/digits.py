"""A small class-conditional FLUX transformer trained on real handwritten digits, shipped with fxcache.

Random weights make every cache look either lossless or broken; a trained model shows the trade-off
users choose by, speed against image quality. No checkpoint can be downloaded here, so this module
trains one on scikit-learn's bundled handwritten digits (1,797 real 8x8 scans) with rectified flow /
flow matching, in a few minutes on a CPU, and ships the weights in ``fxcache/demo/data``.

Model: a diffusers ``FluxTransformer2DModel`` (2 double-stream + 2 single-stream blocks, width 64).
Images are upsampled to 16x16 and packed in 2x2 patches as the FLUX pipeline packs its latents, so
the model sees an 8x8 grid of 4-channel tokens (``patch_size=1``). The class enters through the text
inputs: each class (and a null class for classifier-free guidance) has learned text tokens
(``encoder_hidden_states``) and a learned pooled vector (``pooled_projections``).

Flow convention (FLUX's, the one :func:`fxcache.testing.models.euler_sample` integrates):
``x_sigma = (1 - sigma) * image + sigma * noise`` and the model predicts ``noise - image``.

Example::

    from fxcache.demo import digits
    from fxcache.testing import models

    denoiser = digits.load_digits_denoiser()
    labels = torch.arange(10)
    x = models.euler_sample(denoiser.model, digits.conditioned_on(denoiser, labels),
                            denoiser.noise(seed=0, batch=10), num_steps=20)
    images = digits.unpack(x)                      # (10, 1, 16, 16) in [-1, 1]

Train again (the command writes the shipped weights and ``docs/digits_loss.png``)::

    python -m fxcache.demo.digits train --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..testing.models import TinyDenoiser

__all__ = [
    "DigitsConfig", "NULL_CLASS", "NUM_CLASSES", "TrainResult", "WEIGHTS_PATH", "conditioned_on",
    "load_digits_denoiser", "load_images", "pack", "save_weights", "to_classifier_inputs", "train",
    "unpack",
]

NUM_CLASSES = 10
NULL_CLASS = 10  # the "no class" label: trained by label dropout, used as the unconditional branch of CFG
IMAGE_SIDE = 16
PATCH = 2  # FLUX packs 2x2 latent patches into one token; 16x16 images -> 8x8 tokens of 4 channels
GRID_SIDE = IMAGE_SIDE // PATCH
WEIGHTS_PATH = Path(__file__).parent / "data" / "digits_flux.safetensors"


@dataclass(frozen=True)
class DigitsConfig:
    """Shape of the digits transformer and of its class conditioning.

    Example::

        config = DigitsConfig(hidden=32, num_heads=2)      # a smaller model, e.g. for a quick test
    """

    num_layers: int = 2
    num_single_layers: int = 2
    hidden: int = 64
    num_heads: int = 4
    text_tokens: int = 4
    text_dim: int = 32

    def __post_init__(self):
        if self.hidden % self.num_heads or self.hidden // self.num_heads % 4 or self.hidden // self.num_heads < 8:
            raise ValueError(f"hidden={self.hidden} must split into {self.num_heads} heads of a size that is a "
                             "multiple of 4 and at least 8 (the three RoPE axes need even sizes)")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """FLUX's RoPE axes are (text position, row, column); the text ids here are all zero, so the
        image axes get the larger, even shares."""
        image_axis = 2 * (3 * self.head_dim // 16)
        return (self.head_dim - 2 * image_axis, image_axis, image_axis)

    def build(self) -> torch.nn.Module:
        """A freshly initialised ``FluxTransformer2DModel`` of this shape (seed it first)."""
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel(
            patch_size=1, in_channels=PATCH * PATCH, num_layers=self.num_layers,
            num_single_layers=self.num_single_layers, attention_head_dim=self.head_dim,
            num_attention_heads=self.num_heads, joint_attention_dim=self.text_dim,
            pooled_projection_dim=self.text_dim, axes_dims_rope=list(self.rope_axes),
        )


# -- data ------------------------------------------------------------------------------------------

def load_images(side: int = IMAGE_SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits as ``(N, 1, side, side)`` images in [-1, 1] (bilinear
    upsampling from 8x8) and their ``(N,)`` labels.

    Example::

        images, labels = load_images()          # (1797, 1, 16, 16), (1797,)
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0
    if side != images.shape[-1]:
        images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    return images, torch.tensor(digits.target, dtype=torch.long)


def pack(images: torch.Tensor) -> torch.Tensor:
    """``(B, 1, 16, 16)`` images -> ``(B, 64, 4)`` tokens, 2x2 patches, as the FLUX pipeline packs latents.

    Example::

        tokens = pack(torch.zeros(2, 1, 16, 16))        # (2, 64, 4)
    """
    b, c, h, w = images.shape
    patches = images.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(B, 64, 4)`` tokens -> ``(B, 1, 16, 16)`` images.

    Example::

        images = unpack(pack(images))
    """
    b, n, d = tokens.shape
    side, channels = math.isqrt(n), d // (PATCH * PATCH)
    patches = tokens.reshape(b, side, side, channels, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels, side * PATCH, side * PATCH)


def to_classifier_inputs(images: torch.Tensor):
    """Images of any side (a multiple of 8) -> ``(B, 64)`` numpy features: averaged back to 8x8, the
    resolution of the real scans the classifier in :mod:`fxcache.demo.quality` is trained on.

    Example::

        features = to_classifier_inputs(load_images()[0])     # (1797, 64)
    """
    images = images.float()
    if images.shape[-1] != 8:
        images = F.adaptive_avg_pool2d(images, 8)
    return images.reshape(images.shape[0], -1).clamp(-1, 1).cpu().numpy()


def _image_ids() -> torch.Tensor:
    ids = torch.zeros(GRID_SIDE, GRID_SIDE, 3)
    ids[..., 1] = torch.arange(GRID_SIDE)[:, None]
    ids[..., 2] = torch.arange(GRID_SIDE)[None, :]
    return ids.reshape(-1, 3)


def _labels(condition, batch: int) -> torch.Tensor:
    labels = torch.as_tensor(condition, dtype=torch.long).reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(batch)
    if labels.numel() != batch or labels.min() < 0 or labels.max() > NULL_CLASS:
        raise ValueError(f"condition must be one label or {batch} labels in 0..{NULL_CLASS} "
                         f"({NULL_CLASS} = no class), got {condition!r}")
    return labels


# -- model -----------------------------------------------------------------------------------------

class ClassConditioning(torch.nn.Module):
    """Learned text inputs per class: ``text_tokens`` tokens for ``encoder_hidden_states`` and one
    vector for ``pooled_projections``; row ``NULL_CLASS`` is the unconditional input."""

    def __init__(self, config: DigitsConfig):
        super().__init__()
        self.tokens = torch.nn.Parameter(torch.randn(NUM_CLASSES + 1, config.text_tokens, config.text_dim))
        self.pooled = torch.nn.Parameter(torch.randn(NUM_CLASSES + 1, config.text_dim))

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[labels], self.pooled[labels]


def _model_inputs(latents, timestep, labels, conditioning: ClassConditioning, image_ids) -> dict:
    tokens, pooled = conditioning(labels)
    return dict(hidden_states=latents, encoder_hidden_states=tokens, pooled_projections=pooled,
                timestep=timestep, img_ids=image_ids, txt_ids=torch.zeros(tokens.shape[1], 3),
                return_dict=False)


def _denoiser(model: torch.nn.Module, conditioning: ClassConditioning, config: DigitsConfig) -> TinyDenoiser:
    image_ids = _image_ids()
    conditioning = conditioning.eval().requires_grad_(False)

    def make_inputs(latents, timestep, condition):
        labels = _labels(condition, latents.shape[0])
        return _model_inputs(latents, timestep.to(latents.dtype), labels, conditioning, image_ids)

    return TinyDenoiser("digits", model.eval(), (1, GRID_SIDE * GRID_SIDE, PATCH * PATCH), make_inputs, 1.0,
                        conditioning={"config": config, "class_conditioning": conditioning})


def conditioned_on(denoiser: TinyDenoiser, labels: Sequence[int] | torch.Tensor) -> TinyDenoiser:
    """The same denoiser with ``euler_sample``'s conventions: condition 0 (the conditional context)
    generates ``labels`` (one per batch row) and condition 1 (the unconditional context of CFG) the
    null class.

    Example::

        labels = torch.arange(10)
        x = euler_sample(denoiser.model, conditioned_on(denoiser, labels),
                         denoiser.noise(seed=0, batch=10), num_steps=20,
                         contexts=("cond", "uncond"), guidance=2.0)
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    base = denoiser.make_inputs

    def make_inputs(latents, timestep, condition):
        if condition not in (0, 1):
            raise ValueError(f"condition is 0 (the requested labels) or 1 (no class), got {condition!r}")
        return base(latents, timestep, labels if condition == 0 else NULL_CLASS)

    return dataclasses.replace(denoiser, make_inputs=make_inputs)


# -- training --------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What :func:`train` returns: the trained modules, the loss of every step and the settings."""

    model: torch.nn.Module
    conditioning: ClassConditioning
    config: DigitsConfig
    losses: list[float]
    seconds: float
    settings: dict

    def denoiser(self) -> TinyDenoiser:
        """The trained model as a :class:`~fxcache.testing.models.TinyDenoiser`."""
        return _denoiser(self.model, self.conditioning, self.config)


def train(steps: int = 1000, *, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
          config: DigitsConfig = DigitsConfig(), label_dropout: float = 0.1, warmup: int = 50,
          threads: int | None = 1, log_every: int = 0) -> TrainResult:
    """Train the digits transformer with flow matching; reproducible from ``seed`` (same thread count).

    Each step draws ``batch_size`` real digits, a uniform ``sigma`` per sample and Gaussian noise, and
    regresses the velocity ``noise - image`` at ``x = (1 - sigma) image + sigma noise`` (mean squared
    error). ``label_dropout`` of the labels become the null class so classifier-free guidance works.
    AdamW with a linear warm-up and a cosine decay to zero. ``threads`` sets torch's intra-op threads
    for the run (restored after): one, because two stall on a shared 2-core CPU (measured 0.35 s/step
    with one thread against 1.2-2 s with two while other jobs ran).

    Example::

        result = train(steps=20, batch_size=16, config=DigitsConfig(hidden=32, num_heads=2))
        result.losses[-1] < result.losses[0]
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.enable_grad():
            return _train(steps, batch_size, lr, seed, config, label_dropout, warmup, log_every)
    finally:
        torch.set_num_threads(previous_threads)


def _train(steps, batch_size, lr, seed, config, label_dropout, warmup, log_every) -> TrainResult:
    images, labels = load_images()
    latents = pack(images)
    torch.manual_seed(seed)
    model = config.build().train()
    conditioning = ClassConditioning(config)
    generator = torch.Generator().manual_seed(seed)
    parameters = [*model.parameters(), *conditioning.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = min(warmup, steps // 2)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: (i + 1) / (warmup + 1) if i < warmup
        else 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup))))
    image_ids = _image_ids()
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        index = torch.randint(0, latents.shape[0], (batch_size,), generator=generator)
        clean, label = latents[index], labels[index].clone()
        label[torch.rand(batch_size, generator=generator) < label_dropout] = NULL_CLASS
        noise = torch.randn(clean.shape, generator=generator)
        sigma = torch.rand(batch_size, generator=generator)
        noisy = (1 - sigma[:, None, None]) * clean + sigma[:, None, None] * noise
        prediction = model(**_model_inputs(noisy, sigma, label, conditioning, image_ids))[0]
        loss = F.mse_loss(prediction, noise - clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            print(f"step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    seconds = time.perf_counter() - start
    settings = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, label_dropout=label_dropout,
                    warmup=warmup, threads=torch.get_num_threads(), torch=torch.__version__)
    return TrainResult(model.eval(), conditioning.eval(), config, losses, seconds, settings)


# -- weights ---------------------------------------------------------------------------------------

def save_weights(result: TrainResult, path: str | Path = WEIGHTS_PATH) -> Path:
    """Write the model, the class inputs, the config and the training settings to one safetensors file.

    Example::

        save_weights(train(steps=1000), "digits_flux.safetensors")
    """
    from safetensors.torch import save_file

    tensors = {f"transformer.{k}": v.detach().contiguous() for k, v in result.model.state_dict().items()}
    tensors.update({f"conditioning.{k}": v.detach().contiguous()
                    for k, v in result.conditioning.state_dict().items()})
    tail = result.losses[-100:]
    metadata = {"config": json.dumps(dataclasses.asdict(result.config)),
                "training": json.dumps({**result.settings, "seconds": round(result.seconds, 1),
                                        "final_loss": round(sum(tail) / len(tail), 5)})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_digits_denoiser(path: str | Path = WEIGHTS_PATH) -> TinyDenoiser:
    """The shipped (or a saved) digits model as a :class:`~fxcache.testing.models.TinyDenoiser`.

    ``condition`` is the class: one label 0-9 for the whole batch, one label per row, or
    ``NULL_CLASS`` for no class. :func:`conditioned_on` adapts it to ``euler_sample``'s contexts.

    Example::

        denoiser = load_digits_denoiser()
        velocity = denoiser.model(**denoiser.inputs(denoiser.noise(batch=3), sigma=1.0,
                                                    condition=[3, 1, 4]))[0]
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no digits weights at {path}; train them with `python -m fxcache.demo.digits train`")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = DigitsConfig(**json.loads(metadata["config"]))
    model = config.build()
    model.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("transformer.")})
    conditioning = ClassConditioning(config)
    conditioning.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items()
                                  if k.startswith("conditioning.")})
    denoiser = _denoiser(model, conditioning, config)
    denoiser.conditioning["training"] = json.loads(metadata.get("training", "{}"))
    return denoiser


def plot_losses(losses: Sequence[float], path: str | Path, title: str = "") -> Path:
    """The training loss of every step (faint) and its 50-step moving average, as a PNG.

    Example::

        plot_losses(result.losses, "docs/digits_loss.png")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = min(50, len(losses))
    running = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(range(1, len(losses) + 1), losses, color="tab:blue", alpha=0.25, lw=0.8, label="per step")
    ax.plot(range(window, len(losses) + 1), running, color="tab:blue", lw=1.8, label=f"{window}-step mean")
    ax.set(xlabel="training step", ylabel="flow-matching loss (MSE)", yscale="log", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    from .plots import save_figure

    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fxcache.demo.digits",
                                     description="Train the shipped digits model (flow matching, CPU).")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("train", help="train, then write the weights and the loss curve")
    command.add_argument("--steps", type=int, default=1000)
    command.add_argument("--batch-size", type=int, default=64)
    command.add_argument("--lr", type=float, default=1e-3)
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--threads", type=int, default=1)
    command.add_argument("--out", default=str(WEIGHTS_PATH))
    command.add_argument("--plot", default="docs/digits_loss.png")
    args = parser.parse_args(argv)

    result = train(args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   threads=args.threads, log_every=100)
    weights = save_weights(result, args.out)
    tail = result.losses[-100:]
    title = (f"digits FLUX ({result.config.num_layers}+{result.config.num_single_layers} blocks, "
             f"width {result.config.hidden}): {result.seconds:.0f} s on CPU")
    plot = plot_losses(result.losses, args.plot, title)
    print(f"trained {args.steps} steps in {result.seconds:.1f} s; loss {sum(tail) / len(tail):.4f} "
          f"(mean of the last {len(tail)}); {weights} ({weights.stat().st_size / 1e6:.2f} MB); {plot}")


if __name__ == "__main__":
    main()
