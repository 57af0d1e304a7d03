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

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Maps each causal convolution to the last (k - 1) input frames it has seen (its temporal context).
FeatureCache = dict[nn.Module, Tensor]


# ----------------------------------------------------------------------------------------------
# How a CausalConv3d runs its convolution on CPU
# ----------------------------------------------------------------------------------------------
#
# For a float32 CPU input, ``F.conv3d`` calls oneDNN only when the batch is > 1 or B*C*T*H > 20480 (torch's
# backend heuristic); below that it runs torch's native im2col + GEMM kernel (``slow_conv3d``), 2-14x slower on
# the widths and chunk lengths of the demo decoder. Measured with 1 / 2 threads, AVX-512 (ms, native vs direct
# oneDNN call): 32 ch, 6 frames of 32x32: 7.2 / 5.7 vs 2.0 / 1.2; the 16 -> 3 output conv, 10 frames of 64x64:
# 50 / 38 vs 5.1 / 2.7; 64 ch at 16x16: 1.7 / 1.0 vs 0.9 / 0.5. With AVX2 (ATEN_CPU_CAPABILITY=avx2
# ONEDNN_MAX_CPU_ISA=AVX2) the same ordering: 52 / 35 vs 7.3 / 3.8 for the output conv. Hence the rule of "auto":
# call oneDNN directly for float32 CPU inputs with a kernel > 1 and frames of >= FAST_CONV_MIN_PLANE pixels.
# At 8x8 frames neither wins by much, either way (64 ch: 0.29 vs 0.24 ms, 16 -> 64 ch: 0.11 vs 0.14 ms, 64 -> 256
# ch with AVX2: 0.69 vs 0.79 ms), and 1x1x1 kernels are a plain GEMM there (16 -> 32 ch at 32x32: 0.08 vs 0.24
# ms), so those stay on F.conv3d. Where torch picks oneDNN itself the direct call runs the same kernel, bit for bit.
#
# Measured and not used: (1) the conv as ONE conv2d over the frames with the k time taps stacked into input
# channels ([T_out, k*C, H, W] * [O, k*C, k, k]): it reaches oneDNN too (its batch is T_out), but the stacking
# copy makes it 10-50% slower than the direct call on every decoder shape, and with oneDNN disabled it gains only
# 6-30% over F.conv3d; the direct call also needs no derived weight, so there is no cache to go stale. (2)
# channels-last: nothing in float32; in bfloat16 (where F.conv3d always runs oneDNN) converting each call's input
# to channels-last halved 64-384-channel convs at <= 16x16 frames but slowed 64x64 ones, and this VAE only runs
# float32 (the pipeline decodes ``latent.float()``), so no bfloat16 path is kept.

FAST_CONV_MIN_PLANE = 256  # H*W from which "auto" calls oneDNN directly (16x16 frames and larger)
CONV_IMPLS = ("auto", "conv3d", "onednn")
_conv_impl = "auto"


def set_conv_impl(impl: str) -> str:
    """Choose how every ``CausalConv3d`` convolves (process-wide, not per thread); returns the previous choice.

    ``"auto"`` (default): oneDNN called directly for float32 CPU inputs with a kernel > 1 and frames of
    >= ``FAST_CONV_MIN_PLANE`` pixels, ``F.conv3d`` otherwise (see the comment above for the measurements).
    ``"conv3d"``: always ``F.conv3d``, the plain path benchmarks print beside the new one. ``"onednn"``: oneDNN
    directly wherever it can run (float32 on CPU), for tests. All agree to float32 rounding, and gradients reach
    ``conv.weight``/``conv.bias`` on every path.
    """
    global _conv_impl
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}; got {impl!r}")
    previous, _conv_impl = _conv_impl, impl
    return previous


def get_conv_impl() -> str:
    """The current ``set_conv_impl`` choice."""
    return _conv_impl


@contextmanager
def conv_impl(impl: str) -> Iterator[None]:
    """``with conv_impl("conv3d"): ...`` runs the block with ``set_conv_impl(impl)``, restoring the choice after."""
    previous = set_conv_impl(impl)
    try:
        yield
    finally:
        set_conv_impl(previous)


def _onednn_usable(x: Tensor, weight: Tensor) -> bool:
    """oneDNN can run this conv: float32 on CPU, oneDNN built in and enabled, and no CPU autocast (``F.conv3d``
    would run in the autocast dtype; the direct call would not)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
    )


def onednn_conv(x: Tensor, conv: nn.Conv3d) -> Tensor:
    """``conv(x)`` computed by oneDNN's convolution called directly, bypassing ``F.conv3d``'s backend choice.

    ``aten::mkldnn_convolution`` is the op ``F.conv3d`` itself dispatches to when it picks oneDNN; it has its
    own autograd formula (gradients to ``x``, ``conv.weight`` and ``conv.bias``)."""
    return torch.ops.aten.mkldnn_convolution(
        x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups
    )


def use_fast_conv(x_BCTHW: Tensor, weight: Tensor) -> bool:
    """The rule of ``set_conv_impl``: whether a conv of ``weight`` over ``x_BCTHW`` calls oneDNN directly."""
    if _conv_impl == "conv3d" or not _onednn_usable(x_BCTHW, weight):
        return False
    if _conv_impl == "onednn":
        return True
    # 1x1x1 kernels (SpatialNorm3d's) are a plain GEMM in F.conv3d, 3x faster than oneDNN's call.
    return weight.shape[-1] > 1 and x_BCTHW.shape[-2] * x_BCTHW.shape[-1] >= FAST_CONV_MIN_PLANE


SPATIAL_PADDINGS = ("zeros", "circular")


class CausalConv3d(nn.Module):
    """k x k x k convolution, causal in time, padded in space (zeros, or circular: see below), stride 1.

    The temporal context of the first frame is ``k - 1`` copies of that frame (replicate padding, as
    the reference does: not zeros). With a cache, the context is the previous chunk's last frames.

    ``spatial_padding="circular"`` wraps each frame around (its left neighbour of column 0 is the last column):
    the convolution of a frame drawn on a torus, as the demo world is. The reference, and every official preset,
    pads with zeros. The weights are the same either way; only the border arithmetic differs.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 spatial_padding: str = "zeros") -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size)
        self.spatial_padding = "zeros"
        self.set_spatial_padding(spatial_padding)

    def set_spatial_padding(self, mode: str) -> None:
        """Switch between zero padding (done by the conv itself) and circular padding (an explicit wrap first)."""
        if mode not in SPATIAL_PADDINGS:
            raise ValueError(f"spatial_padding must be one of {SPATIAL_PADDINGS}, got {mode!r}")
        self.spatial_padding = mode
        half = self.kernel_size // 2
        self.conv.padding = (0, half, half) if mode == "zeros" else (0, 0, 0)

    def forward(self, x_BCTHW: Tensor, cache: FeatureCache | None = None) -> Tensor:
        context = self.kernel_size - 1
        if context == 0:
            return self._convolve(x_BCTHW)
        prev = cache.get(self) if cache is not None else None
        if prev is None:
            prev = x_BCTHW[:, :, :1].expand(-1, -1, context, -1, -1)
        x_ext = torch.cat([prev, x_BCTHW], dim=2)
        if cache is not None:
            # clone: a view would keep the whole (large) chunk alive until the next call.
            cache[self] = x_ext[:, :, -context:].clone()
        return self._convolve(x_ext)

    def _convolve(self, x_BCTHW: Tensor) -> Tensor:
        """``self.conv(x)``, or the same convolution called in oneDNN directly (see ``set_conv_impl``).

        The direct call takes ``conv.weight``/``conv.bias`` themselves (nothing derived or cached), so weight
        updates are always seen and autograd reaches the parameters as through ``nn.Conv3d``.
        """
        half = self.kernel_size // 2
        if self.spatial_padding == "circular" and half:
            x_BCTHW = F.pad(x_BCTHW, (half, half, half, half, 0, 0), mode="circular")
        if use_fast_conv(x_BCTHW, self.conv.weight):
            return onednn_conv(x_BCTHW, self.conv)
        return self.conv(x_BCTHW)


class RMSNorm3d(nn.Module):
    """Per-position L2 normalisation over channels, times sqrt(C) and a learned gain (no bias).

    ``F.normalize(x, dim=1)`` written out: its ``vector_norm`` over the strided channel dim is 10-13x slower on
    CPU than ``square().sum(1)`` (3.8 vs 0.28 ms for 16 channels x 8 frames of 64x64), and was a third of the
    demo decode. Same formula, ``x / max(||x||, 1e-12)``; the sums may round differently. The clamp comes before
    the sqrt so that an all-zero position has a finite gradient, as through ``F.normalize``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x_BCTHW: Tensor) -> Tensor:
        norm_B1THW = x_BCTHW.square().sum(dim=1, keepdim=True).clamp_min(1e-24).sqrt()
        return x_BCTHW / norm_B1THW * (self.gamma * self.scale)


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
        return torch.addcmul(self.conv_b(zq_BCTHW), self.norm_layer(f_BCTHW), self.conv_y(zq_BCTHW))


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
        # d2s(a) + d2s(h tiled over channels), as one d2s of the sum: d2s is a permutation and the first-frame
        # merge a mean, both linear; the tiling is a broadcast (channel m*C_in + c of the tiled h is h's c).
        b, c, t, hh, ww = h_BCTHW.shape
        summed = (a.view(b, self.repeats, c, t, hh, ww) + h_BCTHW.unsqueeze(1)).view(b, self.repeats * c, t, hh, ww)
        x = depth_to_space(summed, self.out_channels, p)
        return self._merge_first(x) if p > 1 and first_chunk else x


class SamplerSlot(nn.Module):
    """Holds a sampler as ``.conv``: only there so keys read ``downsamplers.0.conv.norm.gamma`` as upstream."""

    def __init__(self, sampler: nn.Module) -> None:
        super().__init__()
        self.conv = sampler

    def forward(self, h: Tensor, cache: FeatureCache | None, first_chunk: bool) -> Tensor:
        return self.conv(h, cache, first_chunk)
