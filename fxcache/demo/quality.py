"""Image quality of cached generations: PSNR and SSIM against the uncached samples of the same seeds
(torchmetrics), and a task metric no cache can fake, the accuracy of a digit classifier trained on
the real scans, on samples of a requested class. :func:`compare_passes` runs them all on the shipped
digits model and draws the samples side by side.

Example::

    from fxcache.demo import quality
    from fxcache.passes import FirstBlockCache

    reports = quality.compare_passes({"FBC 0.1": FirstBlockCache(threshold=0.1)}, "grid.png")
    for r in reports:
        print(r.name, r.speedup, r.flop_fraction, r.psnr, r.ssim, r.accuracy)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from . import digits
from ..flops import count_flops
from ..testing.models import TinyDenoiser, euler_sample
from .peers import end_generation

__all__ = ["PassReport", "accuracy", "compare_passes", "TimestepClock", "digit_classifier", "generate", "psnr",
           "save_grid", "ssim"]

DATA_RANGE = 2.0  # images live in [-1, 1]
SSIM_KERNEL = 7  # 16x16 images: the usual 11-wide window would leave only the central 6x6 positions


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = DATA_RANGE) -> float:
    """Peak signal-to-noise ratio in dB of ``images`` against ``reference`` (both ``(B, C, H, W)``),
    from the mean squared error over the whole batch; ``inf`` when they are identical.

    Example::

        psnr(x, x)                 # inf
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_pair(images, reference)
    value = peak_signal_noise_ratio(images.float(), reference.float(), data_range=data_range)
    return float(value)


def ssim(images: torch.Tensor, reference: torch.Tensor, data_range: float = DATA_RANGE) -> float:
    """Mean structural similarity of ``images`` and ``reference`` (both ``(B, C, H, W)``, at least
    7x7): Gaussian window of 7, sigma 1.5; 1 when identical.

    Example::

        ssim(x, x)                 # 1.0
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(images, reference)
    value = structural_similarity_index_measure(images.float(), reference.float(), data_range=data_range,
                                                kernel_size=SSIM_KERNEL)
    return float(value)


def _check_pair(images: torch.Tensor, reference: torch.Tensor) -> None:
    if images.shape != reference.shape or images.dim() != 4:
        raise ValueError(f"compare two (B, C, H, W) batches of one shape, got {tuple(images.shape)} "
                         f"and {tuple(reference.shape)}")


@functools.lru_cache(maxsize=1)
def digit_classifier():
    """An RBF support-vector classifier (C=3) fitted on all 1,797 real digits, at 8x8 after the same
    upsample/average round trip that generated images take (:func:`fxcache.demo.digits.to_classifier_inputs`).
    Its 5-fold cross-validated accuracy on real digits is 0.969 (logistic regression: 0.924).
    Deterministic; fitted once per process (0.05 s).

    Example::

        predicted = digit_classifier().predict(digits.to_classifier_inputs(images))
    """
    from sklearn.svm import SVC

    images, labels = digits.load_images()
    return SVC(C=3.0).fit(digits.to_classifier_inputs(images), labels.numpy())


def accuracy(images: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Fraction of ``images`` (``(B, 1, H, W)`` in [-1, 1]) that :func:`digit_classifier` reads as the
    requested ``labels``.

    Example::

        accuracy(*digits.load_images())          # 0.998 on the digits it was fitted on
    """
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.numel() != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.numel()} labels")
    predicted = digit_classifier().predict(digits.to_classifier_inputs(images))
    return float((torch.as_tensor(predicted) == labels).float().mean())


# -- generation and comparison ---------------------------------------------------------------------

def generate(model: torch.nn.Module, denoiser: TinyDenoiser, labels: Sequence[int] | torch.Tensor, *,
             seed: int = 0, num_steps: int = 20, guidance: float | None = None,
             clock: "TimestepClock | None" = None) -> torch.Tensor:
    """One generation of digits ``labels`` (one per row) with ``model`` (the plain transformer, an
    :func:`fxcache.transform` result or a diffusers model with hooks) from the noise of ``seed``;
    ``(B, 1, 16, 16)`` images in [-1, 1]. Cache state is reset first, so calls are independent.
    ``guidance`` runs classifier-free guidance in contexts ``"cond"`` and ``"uncond"``. While it runs,
    ``clock`` (a :class:`TimestepClock`) tells the timestep of the call in progress.

    Example::

        denoiser = digits.load_digits_denoiser()
        images = generate(denoiser.model, denoiser, labels=range(10), num_steps=20)
    """
    labels = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels)
    end_generation(model)
    contexts = ("cond",) if guidance is None else ("cond", "uncond")
    noise = denoiser.noise(seed=seed, batch=labels.numel())
    recorded = model if clock is None else _TimestepRecorder(model, denoiser.timestep_scale, clock)
    latents = euler_sample(recorded, digits.conditioned_on(denoiser, labels), noise, num_steps, contexts=contexts,
                           guidance=1.0 if guidance is None else guidance, step_fields=True)
    end_generation(model)
    return digits.unpack(latents).clamp(-1, 1)


class TimestepClock:
    """The timestep of the model call :func:`generate` is making, on the 0-1000 scale of diffusers
    schedulers (what a FLUX pipeline's ``current_timestep`` holds); ``None`` outside a call. Hand it
    to ``PyramidAttentionBroadcast`` (ours or diffusers') as ``current_timestep_callback`` and to
    :func:`generate` / :func:`compare_passes` as ``clock``: each run owns its clock.

    Example::

        clock = TimestepClock()
        config = PyramidAttentionBroadcast(spatial_attention_block_skip_range=2, current_timestep_callback=clock)
        compare_passes({"PAB 2": config}, clock=clock)
    """

    def __init__(self):
        self.value: float | None = None

    def __call__(self) -> float | None:
        return self.value


class _TimestepRecorder:
    """Calls the model and sets its timestep on a :class:`TimestepClock`, as a pipeline keeps
    ``current_timestep``; every other attribute (``cache_context``) is the model's."""

    def __init__(self, model, timestep_scale: float, clock: TimestepClock):
        self._model, self._to_scheduler_scale, self._clock = model, 1000.0 / timestep_scale, clock

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, **inputs):
        self._clock.value = float(inputs["timestep"].reshape(-1)[0]) * self._to_scheduler_scale
        try:
            return self._model(**inputs)
        finally:
            self._clock.value = None


@dataclass
class PassReport:
    """One row of :func:`compare_passes`: a method against the uncached run of the same seeds.

    ``speedup`` is uncached seconds / these seconds (best of ``repeats``); ``flop_fraction`` the FLOPs
    executed over the uncached run's (:func:`fxcache.flops.count_flops`); ``psnr``/``ssim`` against the
    uncached images; ``accuracy`` of the digit classifier on the requested classes."""

    name: str
    seconds: float
    speedup: float
    flops: int
    flop_fraction: float
    psnr: float
    ssim: float
    accuracy: float
    images: torch.Tensor = dataclasses.field(repr=False)
    stats: dict | None = dataclasses.field(default=None, repr=False)

    def row(self) -> dict[str, Any]:
        """The numbers, without the images (for tables and JSON)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("images", "stats")}


def _flops(run) -> int:
    return count_flops(run)[1]


def _timed(run, repeats: int, timer: Callable[[], float]) -> tuple[float, torch.Tensor]:
    best, images = math.inf, None
    for _ in range(repeats):
        start = timer()
        images = run()
        best = min(best, timer() - start)
    return best, images


def _cached(model: torch.nn.Module, method, backend: str):
    """``method`` is fxcache passes (one pass or a list), a diffusers cache config, or a function that
    takes the plain model and returns the model to run (a peer applied to a copy)."""
    import fxcache
    from fxcache.passes import CachePass

    if isinstance(method, CachePass) or (isinstance(method, (list, tuple))
                                          and all(isinstance(p, CachePass) for p in method)):
        return fxcache.transform(model, [method] if isinstance(method, CachePass) else list(method),
                                 backend=backend)
    if type(method).__module__.startswith("diffusers"):
        hooked = copy.deepcopy(model)
        hooked.enable_cache(method)
        return hooked
    if callable(method):
        return method(model)
    raise TypeError(f"compare a fxcache pass (e.g. FirstBlockCache(threshold=0.1)), a diffusers cache "
                    f"config (e.g. FirstBlockCacheConfig(threshold=0.1)) or a function that returns the model "
                    f"to run, got {type(method).__name__}")


def compare_passes(methods: Mapping[str, Any] | Sequence[Any], path: str | Path | None = None, *,
                   denoiser: TinyDenoiser | None = None, samples_per_class: int = 4, num_steps: int = 20,
                   guidance: float | None = None, seed: int = 0, backend: str = "eager",
                   repeats: int = 2, timer: Callable[[], float] = time.perf_counter,
                   clock: TimestepClock | None = None, errors: dict[str, str] | None = None,
                   on_report: Callable[[PassReport], None] | None = None) -> list[PassReport]:
    """Generate the same grid of digits (every class ``samples_per_class`` times, one batch, noise of
    ``seed``) uncached and with each method; measure speed, FLOPs and quality; optionally save all
    grids side by side as one PNG at ``path``. Returns the uncached report first, then one per method.

    ``methods`` maps a name to fxcache passes (a pass or a list of passes, applied with
    :func:`fxcache.transform` and ``backend``) or to a diffusers cache config (applied with
    ``enable_cache`` to a deep copy, for a side-by-side with diffusers' hooks); a plain sequence is
    named by ``repr``. ``denoiser`` defaults to the shipped digits model. Each method is run once to
    warm up (capture and compile) and then timed ``repeats`` times with ``timer`` (best kept;
    ``time.process_time`` measures a CPU run on a machine shared with other jobs far more steadily
    than wall time, but misses GPU work, so keep the default there); FLOPs are counted on
    one more run, forced eager (:func:`fxcache.flops.count_flops`), with the same decisions. With an
    ``errors`` dict, a method that raises is recorded there (name: error) and left out instead of
    ending the comparison; ``on_report`` is called with each report as it is measured.

    Example::

        from diffusers import FirstBlockCacheConfig
        from fxcache.passes import FirstBlockCache

        reports = compare_passes({"fxcache FBC 0.1": FirstBlockCache(threshold=0.1),
                                  "diffusers FBC 0.1": FirstBlockCacheConfig(threshold=0.1)},
                                 "digits_grid.png")
        print(reports[1].speedup, reports[1].flop_fraction, reports[1].psnr, reports[1].accuracy)
    """
    if not isinstance(methods, Mapping):
        methods = {repr(m): m for m in methods}
    if samples_per_class < 1 or num_steps < 1 or repeats < 1:
        raise ValueError("samples_per_class, num_steps and repeats must be positive")
    denoiser = denoiser or digits.load_digits_denoiser()
    labels = torch.arange(digits.NUM_CLASSES).repeat_interleave(samples_per_class)
    plain = denoiser.model

    def runner(model):
        return lambda: generate(model, denoiser, labels, seed=seed, num_steps=num_steps, guidance=guidance,
                                clock=clock)

    with torch.no_grad():
        run = runner(plain)
        run()  # warm-up: first calls allocate and initialise
        seconds, reference = _timed(run, repeats, timer)
        flops = _flops(run)
        reports = [PassReport("uncached", seconds, 1.0, flops, 1.0, math.inf, 1.0,
                              accuracy(reference, labels), reference)]
        for name, method in methods.items():
            try:
                report = _measure(name, method, plain, backend, runner, repeats, timer, reports[0], labels)
            except Exception as error:
                if errors is None:
                    raise
                errors[name] = f"{type(error).__name__}: {error}"
                continue
            reports.append(report)
            if on_report is not None:
                on_report(report)
    if path is not None:
        save_grid(reports, path, samples_per_class)
    return reports


def _measure(name, method, plain, backend, runner, repeats, timer, uncached: PassReport, labels) -> PassReport:
    model = _cached(plain, method, backend)
    run = runner(model)
    run()  # warm-up: capture and compile happen here
    seconds, images = _timed(run, repeats, timer)
    method_flops = _flops(run)
    stats = model.stats() if hasattr(model, "stats") else None
    return PassReport(name, seconds, uncached.seconds / seconds, method_flops, method_flops / uncached.flops,
                      psnr(images, uncached.images), ssim(images, uncached.images), accuracy(images, labels), images,
                      stats)


def save_grid(reports: Sequence[PassReport], path: str | Path, samples_per_class: int) -> Path:
    """Every report's images as a grid (a column per class), side by side in one PNG, each titled
    with its speed-up, FLOP fraction, PSNR and accuracy.

    Example::

        save_grid(compare_passes([FirstBlockCache(threshold=0.1)]), "grid.png", samples_per_class=4)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(reports))
    rows = math.ceil(len(reports) / columns)
    panel_width = 3.4  # inches; a panel's image is 10 digits wide and samples_per_class high
    panel_height = panel_width * samples_per_class / digits.NUM_CLASSES + 0.75  # + three title lines
    fig, axes = plt.subplots(rows, columns, figsize=(panel_width * columns, panel_height * rows), dpi=110,
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, report in zip(axes.flat, reports):
        # (classes * samples, H, W), class-major; a 1-pixel background border keeps digits apart
        images = torch.nn.functional.pad(report.images[:, 0], (1, 1, 1, 1), value=-1.0)
        side = images.shape[-1]
        tiles = images.reshape(digits.NUM_CLASSES, samples_per_class, side, side)
        grid = tiles.permute(1, 2, 0, 3).reshape(samples_per_class * side, digits.NUM_CLASSES * side)
        ax.imshow(grid.numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        quality_line = "reference" if report.name == "uncached" else \
            f"PSNR {report.psnr:.1f} dB  SSIM {report.ssim:.3f}"
        ax.set_title(f"{report.name}\n{report.speedup:.2f}x speed-up, {report.flop_fraction:.0%} of FLOPs\n"
                     f"{quality_line}  acc {report.accuracy:.0%}", fontsize=8)
    fig.tight_layout()
    from .plots import save_figure

    return save_figure(fig, path)
