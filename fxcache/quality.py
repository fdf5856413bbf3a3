"""Image quality of cached generations: PSNR and SSIM against the uncached samples of the same seeds
(torchmetrics), and a task metric no cache can fake, the accuracy of a digit classifier trained on
the real scans, on samples of a requested class. :func:`compare_passes` runs them all on the shipped
digits model and draws the samples side by side.

Example::

    from fxcache import quality
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
from typing import Any, Mapping, Sequence

import torch

from . import digits
from .tiny_models import TinyDenoiser, euler_sample

__all__ = ["PassReport", "accuracy", "compare_passes", "digit_classifier", "generate", "psnr", "ssim"]

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
    upsample/average round trip that generated images take (:func:`fxcache.digits.to_classifier_inputs`).
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
