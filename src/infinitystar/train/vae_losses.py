"""Losses and metrics for training the video VAE: PSNR, a download-free structural term, a PatchGAN.

Pixels are float tensors in [-1, 1] (the models' convention), videos (B, 3, T, H, W); frame-wise
terms fold time into the batch.

Why a structural term instead of LPIPS: the reference trains with LPIPS, whose VGG16 weights must
be downloaded; this project must train offline. What LPIPS adds over L1/L2 is sensitivity to local
structure (edges, texture, contrast) rather than to per-pixel intensity; pure L1/L2 are minimised
by blurry averages. Two cheap, weight-free measures cover most of that for the footage this VAE is
trained on here (flat shapes on a plain background, and generally for fine-tuning):

* ``1 - SSIM`` on a 3-level image pyramid: SSIM compares local means, variances and covariance in a
  Gaussian window, so it penalises lost contrast and misplaced edges at several scales, and is
  insensitive to the small uniform offsets L1 punishes;
* L1 between the image gradients (finite differences along x, y and, for videos, t): this directly
  rewards sharp, correctly placed edges (blur spreads a gradient out and is penalised) and, along
  t, temporal flicker.

Both are differentiable, deterministic, and cost a few pooling/convolution passes over the frames.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------
# Metric


def psnr(pred: Tensor, target: Tensor, *, value_range: tuple[float, float] = (-1.0, 1.0),
         reduction: str = "mean") -> Tensor:
    """Peak signal-to-noise ratio in dB, per sample, of images/videos whose values span ``value_range``.

    Both tensors are mapped to [0, 1] (so the peak is 1) and ``pred`` is clamped there, as a decoded
    video is clamped before it is shown; then PSNR = 10 log10(1 / MSE) with the MSE over every value of
    one sample (dim 0 is the batch). The default range is the models' [-1, 1]; pass (0, 1) or (0, 255)
    for other data. ``reduction``: "mean" (mean of the per-sample PSNRs), "none" (one per sample).
    A perfect reconstruction gives +inf.
    """
    if pred.shape != target.shape:
        raise ValueError(f"psnr: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"psnr: value_range must be (low, high) with high > low, got {value_range}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"psnr: reduction must be 'mean' or 'none', got {reduction!r}")
    p = ((pred.detach().double() - lo) / (hi - lo)).clamp(0, 1)
    t = ((target.detach().double() - lo) / (hi - lo)).clamp(0, 1)
    mse = (p - t).pow(2).flatten(1).mean(1) if p.dim() > 1 else (p - t).pow(2).mean().reshape(1)
    out = 10 * torch.log10(1.0 / mse)
    return out.mean().float() if reduction == "mean" else out.float()


# ---------------------------------------------------------------------------------------------
# Structural ("perceptual") loss


def _frames(x: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W); 4-D input is returned as is."""
    if x.dim() == 4:
        return x
    if x.dim() != 5:
        raise ValueError(f"expected (B, C, T, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _gaussian_window(size: int, sigma: float, channels: int, like: Tensor) -> Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: Tensor, y: Tensor, *, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean structural similarity of two batches of images in [0, 1], (N, C, H, W) (Wang et al. 2004).

    Gaussian window (11, sigma 1.5) shrunk to the image size for small images (odd, >= 3), valid
    positions only, constants (0.01)^2 and (0.03)^2. Averaged over channels and positions.
    """
    c = x.shape[1]
    size = min(window, x.shape[-2], x.shape[-1])
    size = size if size % 2 else size - 1
    if size < 3:
        raise ValueError(f"ssim needs images of at least 3x3, got {tuple(x.shape[-2:])}")
    sigma = sigma * size / window
    k = _gaussian_window(size, sigma, c, x)

    def blur(v: Tensor) -> Tensor:
        return F.conv2d(v, k, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean()


def gradient_l1(pred: Tensor, target: Tensor) -> Tensor:
    """Mean L1 distance between finite differences along x and y (and t for (B, C, T, H, W) input)."""
    dims = [-1, -2] + ([2] if pred.dim() == 5 and pred.shape[2] > 1 else [])
    total = pred.new_zeros(())
    for d in dims:
        total = total + (torch.diff(pred, dim=d) - torch.diff(target, dim=d)).abs().mean()
    return total / len(dims)


def structural_loss(pred: Tensor, target: Tensor, *, levels: int = 3) -> Tensor:
    """The download-free perceptual term: mean over a ``levels``-deep 2x average-pooled pyramid of
    (1 - SSIM), plus the image/time-gradient L1 at full resolution. Inputs in [-1, 1], videos or images.

    Pyramid levels smaller than 8 pixels are skipped. The gradient term is computed on [0, 1] pixels
    like SSIM, so both are on the same scale (each is 0 for a perfect reconstruction).
    """
    if pred.shape != target.shape:
        raise ValueError(f"structural_loss: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    grad = gradient_l1((pred + 1) / 2, (target + 1) / 2)
    p, t = (_frames(pred) + 1) / 2, (_frames(target) + 1) / 2
    terms = []
    for level in range(levels):
        if level:
            p, t = F.avg_pool2d(p, 2), F.avg_pool2d(t, 2)
        if min(p.shape[-2:]) < 8:
            break
        terms.append(1 - ssim(p, t))
    if not terms:
        raise ValueError(f"structural_loss needs frames of at least 8x8 pixels, got {tuple(pred.shape[-2:])}")
    return torch.stack(terms).mean() + grad


# ---------------------------------------------------------------------------------------------
# Adversarial term


class PatchDiscriminator(nn.Module):
    """A PatchGAN on single frames (pix2pix style; the reference's defaults are 3 layers, 64 channels).

    ``layers`` stride-2 4x4 convolutions (width doubling, capped at 8x), one stride-1 conv, then a
    1-channel stride-1 conv: each output logit judges one receptive-field patch. GroupNorm instead of
    BatchNorm keeps the output of a sample independent of the rest of the batch.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        if layers < 1 or channels < 1:
            raise ValueError(f"PatchDiscriminator needs layers >= 1 and channels >= 1, got {layers}, {channels}")
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            nxt = channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            mods += [nn.Conv2d(width, nxt, 4, stride, 1, bias=False), nn.GroupNorm(_groups(nxt), nxt),
                     nn.LeakyReLU(0.2)]
            width = nxt
        mods.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Images (N, 3, H, W) or videos (B, 3, T, H, W) in [-1, 1] -> patch logits (N or B*T, 1, h, w)."""
        return self.net(_frames(x))


def _groups(channels: int) -> int:
    return math.gcd(channels, 32)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss 0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake))), as the reference."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator side: -mean D(fake)."""
    return -logits_fake.mean()


__all__ = [
    "PatchDiscriminator",
    "gradient_l1",
    "hinge_d_loss",
    "hinge_g_loss",
    "psnr",
    "ssim",
    "structural_loss",
]
