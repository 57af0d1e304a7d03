"""Building blocks of the causal 3-D convolutional VAE.

Every block is causal in time and has no cross-frame statistics (norms are per position, there is
no attention), so a video can be processed in temporal chunks: each causal convolution keeps the
last ``k - 1`` frames it saw in a ``FeatureCache`` and prepends them to the next chunk. Chunked and
one-shot processing then agree up to float rounding.

Attribute names (``conv``, ``norm``, ``gamma``, ``norm_layer``, ``conv_y``, ``conv_b``, ``resnets``,
``downsamplers``/``upsamplers``) reproduce the reference's module tree so that the official state
dict loads key for key.

The ``first_chunk`` flag says whether a call sees the first frame of the sequence. The first
(pixel or latent) frame is the causal "image" frame: the encoder's samplers keep it alone instead
of pairing it with the next frame, and the decoder's temporal upsamplers turn it back into a single
frame. (The reference infers this from the parity of the chunk length plus a ``split_first`` flag;
an explicit flag gives the same result for every chunking the reference supports and stays right
for any chunk length.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Maps each causal convolution to the last (k - 1) input frames it has seen (its temporal context).
FeatureCache = dict[nn.Module, Tensor]


class CausalConv3d(nn.Module):
    """k x k x k convolution, causal in time, zero-padded in space, stride 1.

    The temporal context of the first frame is ``k - 1`` copies of that frame (replicate padding, as
    the reference does: not zeros). With a cache, the context is the previous chunk's last frames.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        # Spatial padding is done by the conv itself (zeros, same as an explicit constant pad).
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=(0, kernel_size // 2, kernel_size // 2))

    def forward(self, x_BCTHW: Tensor, cache: FeatureCache | None = None) -> Tensor:
        context = self.kernel_size - 1
        if context == 0:
            return self.conv(x_BCTHW)
        prev = cache.get(self) if cache is not None else None
        if prev is None:
            prev = x_BCTHW[:, :, :1].expand(-1, -1, context, -1, -1)
        x_ext = torch.cat([prev, x_BCTHW], dim=2)
        if cache is not None:
            # clone: a view would keep the whole (large) chunk alive until the next call.
            cache[self] = x_ext[:, :, -context:].clone()
        return self.conv(x_ext)


class RMSNorm3d(nn.Module):
    """Per-position L2 normalisation over channels, times sqrt(C) and a learned gain (no bias)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x_BCTHW: Tensor) -> Tensor:
        return F.normalize(x_BCTHW, dim=1) * self.scale * self.gamma


class SpatialNorm3d(nn.Module):
    """Decoder norm modulated by the decoder's input latent ``zq``: RMS(f) * conv_y(zq') + conv_b(zq').

    ``zq'`` is ``zq`` resized (nearest) to the feature's (T, H, W). In the chunk holding the first
    frame, latent frame 0 maps to feature frame 0 alone and the remaining latent frames are
    stretched over the remaining feature frames, mirroring the causal time layout.
    """

    def __init__(self, channels: int, zq_channels: int) -> None:
        super().__init__()
        self.norm_layer = RMSNorm3d(channels)
        self.conv_y = CausalConv3d(zq_channels, channels, kernel_size=1)
        self.conv_b = CausalConv3d(zq_channels, channels, kernel_size=1)

    def forward(self, f_BCTHW: Tensor, zq_BCTHW: Tensor, first_chunk: bool) -> Tensor:
        t, h, w = f_BCTHW.shape[2:]
        if first_chunk and t > 1 and zq_BCTHW.shape[2] > 1:
            head = F.interpolate(zq_BCTHW[:, :, :1], size=(1, h, w), mode="nearest")
            rest = F.interpolate(zq_BCTHW[:, :, 1:], size=(t - 1, h, w), mode="nearest")
            zq_BCTHW = torch.cat([head, rest], dim=2)
        else:
            zq_BCTHW = F.interpolate(zq_BCTHW, size=(t, h, w), mode="nearest")
        return self.norm_layer(f_BCTHW) * self.conv_y(zq_BCTHW) + self.conv_b(zq_BCTHW)


class ResBlock3d(nn.Module):
    """x + conv2(act(norm2(conv1(act(norm1(x)))))), width-preserving.

    With ``zq_channels`` the norms are ``SpatialNorm3d`` (decoder), otherwise ``RMSNorm3d`` (encoder).
    """

    def __init__(self, channels: int, zq_channels: int | None = None) -> None:
        super().__init__()
        self.spatial = zq_channels is not None
        if zq_channels is None:
            self.norm1: nn.Module = RMSNorm3d(channels)
            self.norm2: nn.Module = RMSNorm3d(channels)
        else:
            self.norm1 = SpatialNorm3d(channels, zq_channels)
            self.norm2 = SpatialNorm3d(channels, zq_channels)
        self.conv1 = CausalConv3d(channels, channels, 3)
        self.conv2 = CausalConv3d(channels, channels, 3)

    def _norm(self, norm: nn.Module, x: Tensor, zq: Tensor | None, first_chunk: bool) -> Tensor:
        return norm(x, zq, first_chunk) if self.spatial else norm(x)

    def forward(
        self, x: Tensor, cache: FeatureCache | None, zq: Tensor | None = None, first_chunk: bool = True
    ) -> Tensor:
        h = self.conv1(F.silu(self._norm(self.norm1, x, zq, first_chunk)), cache)
        h = self.conv2(F.silu(self._norm(self.norm2, h, zq, first_chunk)), cache)
        return x + h


# ----------------------------------------------------------------------------------------------
# Space(-time)-to-depth resampling
# ----------------------------------------------------------------------------------------------


def space_to_depth(u_BCTHW: Tensor) -> Tensor:
    """2x2 space-to-depth with channel index (py*2 + px)*C + c (c fastest, unlike pixel_unshuffle)."""
    b, c, t, h, w = u_BCTHW.shape
    u = u_BCTHW.reshape(b, c, t, h // 2, 2, w // 2, 2)
    return u.permute(0, 4, 6, 1, 2, 3, 5).reshape(b, 4 * c, t, h // 2, w // 2)


def group_frames_mean(u_BCTHW: Tensor, p: int, first_chunk: bool) -> Tensor:
    """Average consecutive groups of ``p`` frames; the sequence's first frame stays alone."""
    if p == 1:
        return u_BCTHW
    head = u_BCTHW[:, :, :1] if first_chunk else u_BCTHW[:, :, :0]
    rest = u_BCTHW[:, :, head.shape[2]:]
    b, c, t, h, w = rest.shape
    if t % p:
        raise ValueError(f"cannot group {t} frames in groups of {p} (first_chunk={first_chunk})")
    rest = rest.reshape(b, c, t // p, p, h, w).mean(dim=3)
    return torch.cat([head, rest], dim=2)


def depth_to_space(a_BCTHW: Tensor, out_channels: int, p: int) -> Tensor:
    """Inverse layout: channel ((qt*2 + py)*2 + px)*C_out + c -> [c, t*p + qt, 2y + py, 2x + px]."""
    b, _, t, h, w = a_BCTHW.shape
    a = a_BCTHW.reshape(b, p, 2, 2, out_channels, t, h, w)
    return a.permute(0, 4, 5, 1, 6, 2, 7, 3).reshape(b, out_channels, t * p, 2 * h, 2 * w)


class DCDown3d(nn.Module):
    """Downsampler: conv + space(-time)-to-depth, plus a parameter-free s2d shortcut (DC-AE style).

    Halves H and W; with ``compress_time`` also halves the number of frames after the first.
    """

    def __init__(self, in_channels: int, out_channels: int, compress_time: bool) -> None:
        super().__init__()
        if out_channels % 4 or (4 * in_channels) % out_channels:
            raise ValueError(
                f"DCDown3d needs out_channels % 4 == 0 and 4*in % out == 0, got {in_channels}->{out_channels}"
            )
        self.out_channels = out_channels
        self.time_factor = 2 if compress_time else 1
        self.norm = RMSNorm3d(in_channels)
        self.conv = CausalConv3d(in_channels, out_channels // 4, 3)

    def forward(self, h_BCTHW: Tensor, cache: FeatureCache | None, first_chunk: bool) -> Tensor:
        p = self.time_factor
        a = self.conv(F.silu(self.norm(h_BCTHW)), cache)
        x = group_frames_mean(space_to_depth(a), p, first_chunk)
        y = group_frames_mean(space_to_depth(h_BCTHW), p, first_chunk)
        b, c4, t, hh, ww = y.shape
        # Shortcut: average the 4*C_in s2d channels down to C_out (channel m*C_out + j -> j).
        y = y.reshape(b, c4 // self.out_channels, self.out_channels, t, hh, ww).mean(dim=1)
        return x + y


class DCUp3d(nn.Module):
    """Upsampler: conv + depth-to-space, plus a channel-tiling d2s shortcut.

    Doubles H and W; with ``compress_time`` doubles the frames, except that the sequence's first
    latent frame becomes a single frame (the mean of its ``p`` outputs).
    """

    def __init__(self, in_channels: int, out_channels: int, compress_time: bool) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.time_factor = 2 if compress_time else 1
        produced = out_channels * 4 * self.time_factor
        if produced % in_channels:
            raise ValueError(f"DCUp3d needs in_channels to divide 4*p*out_channels, got {in_channels}->{out_channels}")
        self.repeats = produced // in_channels
        self.norm = RMSNorm3d(in_channels)
        self.conv = CausalConv3d(in_channels, produced, 3)

    def _merge_first(self, u: Tensor) -> Tensor:
        p = self.time_factor
        return torch.cat([u[:, :, :p].mean(dim=2, keepdim=True), u[:, :, p:]], dim=2)

    def forward(self, h_BCTHW: Tensor, cache: FeatureCache | None, first_chunk: bool) -> Tensor:
        p = self.time_factor
        a = self.conv(F.silu(self.norm(h_BCTHW)), cache)
        x = depth_to_space(a, self.out_channels, p)
        y = depth_to_space(h_BCTHW.repeat(1, self.repeats, 1, 1, 1), self.out_channels, p)
        if p > 1 and first_chunk:
            x, y = self._merge_first(x), self._merge_first(y)
        return x + y


class SamplerSlot(nn.Module):
    """Holds a sampler as ``.conv``: only there so keys read ``downsamplers.0.conv.norm.gamma`` as upstream."""

    def __init__(self, sampler: nn.Module) -> None:
        super().__init__()
        self.conv = sampler

    def forward(self, h: Tensor, cache: FeatureCache | None, first_chunk: bool) -> Tensor:
        return self.conv(h, cache, first_chunk)
