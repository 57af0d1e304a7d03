"""The InfinityStar video VAE: a causal 3-D conv encoder/decoder with an absorbed 2x2 patchify.

``VideoVAE`` maps a video in [-1, 1] of shape (B, 3, T, H, W), T = 1 + 4k, H and W multiples of 16,
to a continuous latent (B, 64, 1 + (T-1)/4, H/16, W/16) and back. Its module tree reproduces the
official checkpoint's key names (``encoder.*``, ``decoder.*``, ``proj_down``, ``proj_up``,
``proj_down_two``, ``proj_up_two``, ``scale_learnable_parameters``); the reference's quantizer
``mask`` buffers carry no information and are not kept (``checkpoints.py`` drops them).

Long videos are processed in temporal chunks with a causal-conv feature cache (``chunked=True``),
so activation memory does not grow with the frame count; ``chunked=False`` runs one shot. Both give
the same numbers up to float rounding. Large frames can be decoded in overlapping spatial tiles
(``tile_size``), blended linearly: an approximation, see ``decode``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinitystar.config import ConfigError, VAEConfig
from infinitystar.vae.layers import (
    CausalConv3d,
    DCDown3d,
    DCUp3d,
    FeatureCache,
    ResBlock3d,
    RMSNorm3d,
    SamplerSlot,
    SpatialNorm3d,
)

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class _Blocks(nn.Module):
    """A stage: width-preserving resnets, then an optional sampler (``resnets``/``*samplers`` as upstream)."""

    def __init__(self, resnets: list[ResBlock3d], sampler: nn.Module | None, sampler_attr: str | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.sampler_attr = sampler_attr
        if sampler is not None:
            assert sampler_attr is not None
            setattr(self, sampler_attr, nn.ModuleList([SamplerSlot(sampler)]))

    def forward(self, x: Tensor, cache: FeatureCache | None, first_chunk: bool, zq: Tensor | None = None) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache, zq, first_chunk)
        if self.sampler_attr is not None and hasattr(self, self.sampler_attr):
            for sampler in getattr(self, self.sampler_attr):
                x = sampler(x, cache, first_chunk)
        return x


def _check_widths(config: VAEConfig) -> None:
    widths = config.block_out_channels
    n_blocks = len(widths) - 1
    for i in range(len(config.spatial_compression), n_blocks):
        if widths[i] != widths[i + 1]:
            raise ConfigError(
                f"VAEConfig.block_out_channels={widths}: block {i} has no sampler, so its width {widths[i]} "
                f"cannot change to {widths[i + 1]}"
            )


class Encoder(nn.Module):
    """Pixels (B, 3, T, H, W) -> (B, 2*latent_channels, 1+(T-1)/4, H/8, W/8): [mean | logvar]."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        _check_widths(config)
        widths = config.block_out_channels
        n_blocks = len(widths) - 1
        self.conv_in = CausalConv3d(config.in_channels, widths[0], 3)
        blocks = []
        for i in range(n_blocks):
            resnets = [ResBlock3d(widths[i]) for _ in range(config.layers_per_block)]
            sampler = None
            if i < len(config.spatial_compression):
                sampler = DCDown3d(widths[i], widths[i + 1], compress_time=i < len(config.temporal_compression))
            blocks.append(_Blocks(resnets, sampler, "downsamplers"))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = _Blocks([ResBlock3d(widths[-1]) for _ in range(2)], None, None)
        self.norm_out = RMSNorm3d(widths[-1])
        self.conv_out = CausalConv3d(widths[-1], 2 * config.latent_channels, 3)

    def forward(self, x: Tensor, cache: FeatureCache | None = None, first_chunk: bool = True) -> Tensor:
        h = self.conv_in(x, cache)
        for block in self.down_blocks:
            h = block(h, cache, first_chunk)
        h = self.mid_block(h, cache, first_chunk)
        return self.conv_out(F.silu(self.norm_out(h)), cache)


class Decoder(nn.Module):
    """f8 latent (B, latent_channels, T', H/8, W/8) -> pixels (B, 3, 1+4(T'-1), H, W); mirror of ``Encoder``.

    Every norm is a ``SpatialNorm3d`` modulated by the decoder's own input chunk.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        _check_widths(config)
        widths = tuple(reversed(config.block_out_channels))
        n_blocks = len(widths) - 1
        zc = config.latent_channels
        self.conv_in = CausalConv3d(zc, widths[0], 3)
        self.mid_block = _Blocks([ResBlock3d(widths[0], zc) for _ in range(2)], None, None)
        blocks = []
        for i in range(n_blocks):
            resnets = [ResBlock3d(widths[i], zc) for _ in range(config.layers_per_block + 1)]
            sampler = None
            if i >= n_blocks - len(config.spatial_compression):
                compress_time = i >= n_blocks - len(config.temporal_compression)
                sampler = DCUp3d(widths[i], widths[i + 1], compress_time=compress_time)
            blocks.append(_Blocks(resnets, sampler, "upsamplers"))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = SpatialNorm3d(widths[-1], zc)
        self.conv_out = CausalConv3d(widths[-1], config.out_channels, 3)

    def forward(self, z: Tensor, cache: FeatureCache | None = None, first_chunk: bool = True) -> Tensor:
        h = self.conv_in(z, cache)
        h = self.mid_block(h, cache, first_chunk, zq=z)
        for block in self.up_blocks:
            h = block(h, cache, first_chunk, zq=z)
        return self.conv_out(F.silu(self.norm_out(h, z, first_chunk)), cache)


def chunk_bounds(length: int, batch: int) -> list[tuple[int, int]]:
    """Temporal chunks: the first frame plus the remainder, then ``batch`` frames each.

    e.g. 17 frames, batch 8 -> [(0, 1), (1, 9), (9, 17)]; 5 latents, batch 2 -> [(0, 1), (1, 3), (3, 5)].
    Non-first chunks hold exactly ``batch`` frames, so (batch a multiple of the time stride) every
    chunk boundary falls on a latent boundary.
    """
    first = 1 + (length - 1) % batch
    bounds = [(0, first)]
    for start in range(first, length, batch):
        bounds.append((start, start + batch))
    return bounds


def _nearest_multiples(n: int, m: int) -> str:
    lo = (n // m) * m
    return f"{lo} or {lo + m}" if lo > 0 else f"{m}"


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)  # the last tile ends at the border, keeping every tile full-size
    return starts


def _edge_weights(length: int, overlap: int, rise: bool, fall: bool) -> Tensor:
    """1-D blend weight of a tile along one axis, over ``overlap`` samples at each edge shared with a neighbour.

    The outer 3/8 of the overlap gets weight 0 (those pixels saw the tile's zero padding within their
    receptive field), the middle quarter a linear ramp, the rest 1. The neighbour mirrors it, so
    every pixel keeps a positive total weight. (A ramp over the whole overlap, as in the
    reference's unused tiled decode, is ~20x less accurate at the same cost: measured on random
    weights, tile 16 / overlap 8 cells, mean error 3.7e-3 vs 3.5e-5.)
    """
    w = torch.ones(length)
    if overlap > 0:
        ramp = max(overlap // 4, 1)
        margin = (overlap - ramp) // 2
        ramp_w = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
        edge = torch.cat([torch.zeros(margin), ramp_w, torch.ones(overlap - margin - ramp)])
        if rise:
            w[:overlap] = torch.minimum(w[:overlap], edge)
        if fall:
            w[-overlap:] = torch.minimum(w[-overlap:], edge.flip(0))
    return w


class VideoVAE(nn.Module):
    """Encoder + decoder + absorbed patchify + latent projections + latent scale.

    Public API: ``encode`` and ``decode``; the steps of ``encode`` (``encode_features``,
    ``encode_posterior``, ``sample_posterior``, ``project_latent``) and of ``decode``
    (``latent_to_decoder_input``) are public too, for parity tests and feature extraction.
    """

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or VAEConfig()
        d = config.embed_dim
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.proj_down = nn.Linear(d, d)
        self.proj_up = nn.Linear(d, d)
        # Present in the official checkpoint but unused by inference (training leftovers of upstream).
        self.proj_down_two = nn.Linear(d, d)
        self.proj_up_two = nn.Linear(d, d)
        # Only element 0 (the latent scale) is used; the others belong to upstream's dead training path.
        self.scale_learnable_parameters = nn.Parameter(torch.full((4,), float(config.latent_scale_init)))
        for module in self.modules():
            if isinstance(module, CausalConv3d):
                module.set_spatial_padding(config.spatial_padding)

    # ------------------------------------------------------------------------------------------
    # Input validation
    # ------------------------------------------------------------------------------------------

    def _check_video(self, video: Tensor) -> Tensor:
        cfg = self.config
        if not isinstance(video, Tensor):
            raise ValueError(f"video must be a torch.Tensor, got {type(video).__name__}")
        if video.ndim == 4:
            video = video.unsqueeze(2)  # image (B, C, H, W) -> one frame
        if video.ndim != 5:
            raise ValueError(
                f"video must be (B, C, T, H, W) or an image batch (B, C, H, W); got shape {tuple(video.shape)}"
            )
        b, c, t, h, w = video.shape
        if c != cfg.in_channels:
            raise ValueError(
                f"video must have {cfg.in_channels} channels (RGB) on dim 1; got {c} (shape {tuple(video.shape)})"
            )
        ts = cfg.time_stride
        if t < 1 or (t - 1) % ts:
            k = max((t - 1) // ts, 0)
            raise ValueError(
                f"frame count must be 1 + {ts}k (1, {1 + ts}, {1 + 2 * ts}, ...); got {t}. "
                f"Nearest valid: {1 + ts * k}" + (f" or {1 + ts * (k + 1)}" if t > 1 else "")
            )
        s = cfg.space_stride
        for name, n in (("height", h), ("width", w)):
            if n < s or n % s:
                raise ValueError(
                    f"video {name} must be a multiple of {s}; got {n} (shape {tuple(video.shape)}). "
                    f"Nearest valid: {_nearest_multiples(n, s)}"
                )
        if not video.is_floating_point():
            raise ValueError(f"video must be a floating tensor in [-1, 1]; got dtype {video.dtype}")
        return video

    def _check_latent(self, latent: Tensor) -> Tensor:
        d = self.config.embed_dim
        if not isinstance(latent, Tensor):
            raise ValueError(f"latent must be a torch.Tensor, got {type(latent).__name__}")
        if latent.ndim == 4:
            latent = latent.unsqueeze(2)
        if latent.ndim != 5:
            raise ValueError(f"latent must be (B, {d}, T', h, w) or (B, {d}, h, w); got shape {tuple(latent.shape)}")
        if latent.shape[1] != d:
            raise ValueError(
                f"latent must have {d} channels on dim 1; got {latent.shape[1]} (shape {tuple(latent.shape)})"
            )
        if min(latent.shape[2:]) < 1:
            raise ValueError(f"latent has an empty dimension: shape {tuple(latent.shape)}")
        return latent

    # ------------------------------------------------------------------------------------------
    # Encode
    # ------------------------------------------------------------------------------------------

    def encode_features(self, video: Tensor, chunked: bool = True) -> Tensor:
        """Encoder output before patchify: (B, 2*latent_channels, T', H/8, W/8) = [mean | logvar]."""
        video = self._check_video(video)
        if not chunked:
            return self.encoder(video)
        cache: FeatureCache = {}
        outs = [
            self.encoder(video[:, :, s:e], cache, first_chunk=(s == 0))
            for s, e in chunk_bounds(video.shape[2], self.config.encode_frame_batch)
        ]
        return torch.cat(outs, dim=2)

    def encode_posterior(self, video: Tensor, chunked: bool = True) -> tuple[Tensor, Tensor]:
        """Posterior (mean, logvar), each (B, 64, T', H/16, W/16); logvar clamped to [-30, 20].

        The absorbed patchify is a per-frame ``pixel_unshuffle(2)`` (channel = c*4 + py*2 + px), so
        the first 64 channels are the 16 mean channels unshuffled and the last 64 the logvar.
        """
        h = self.encode_features(video, chunked=chunked)
        b, c, t, hh, ww = h.shape
        h = F.pixel_unshuffle(h.transpose(1, 2).reshape(b * t, c, hh, ww), 2)
        h = h.reshape(b, t, 4 * c, hh // 2, ww // 2).transpose(1, 2)
        mean, logvar = h.chunk(2, dim=1)
        return mean.contiguous(), logvar.clamp(LOGVAR_MIN, LOGVAR_MAX).contiguous()

    def encode(
        self,
        video: Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        chunked: bool = True,
    ) -> Tensor:
        """Video (B, 3, T, H, W) or image (B, 3, H, W) in [-1, 1] -> latent (B, 64, T', H/16, W/16).

        ``z`` is the posterior mean by default. ``sample=True`` draws ``z = mean + std * eps`` with eps
        from ``generator`` (the reference always samples, from the global RNG); ``noise`` supplies eps
        explicitly (and implies sampling). Then ``proj_down`` over channels and times the latent scale.
        """
        mean, logvar = self.encode_posterior(video, chunked=chunked)
        z = self.sample_posterior(mean, logvar, sample=sample, generator=generator, noise=noise)
        return self.project_latent(z)

    def sample_posterior(
        self,
        mean: Tensor,
        logvar: Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """``mean`` (default), or ``mean + exp(logvar / 2) * eps`` with eps = ``noise`` or drawn from ``generator``."""
        if noise is not None:
            if tuple(noise.shape) != tuple(mean.shape):
                raise ValueError(f"noise must have the posterior's shape {tuple(mean.shape)}; got {tuple(noise.shape)}")
            eps = noise.to(mean)
        elif sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        else:
            if generator is not None:
                raise ValueError("a generator was given but sample=False: pass sample=True to draw from the posterior")
            return mean
        return mean + torch.exp(0.5 * logvar) * eps

    def project_latent(self, z: Tensor) -> Tensor:
        """Posterior sample (B, 64, T', h, w) -> latent: ``proj_down`` over channels, times the latent scale."""
        z = self.proj_down(z.movedim(1, -1)).movedim(-1, 1)
        return (z * self.scale_learnable_parameters[0]).contiguous()

    # ------------------------------------------------------------------------------------------
    # Decode
    # ------------------------------------------------------------------------------------------

    def latent_to_decoder_input(self, latent: Tensor) -> Tensor:
        """(B, 64, T', h, w) latent -> (B, latent_channels, T', 2h, 2w): /scale, proj_up, pixel_shuffle."""
        latent = self._check_latent(latent)
        z_BThwC = (latent / self.scale_learnable_parameters[0]).movedim(1, -1)
        # proj_up one frame at a time: a GEMM may round a row differently with the row count, and per frame every
        # frame's rows round the same in a whole latent and in a clip of it (StreamDecoder's bitwise equality).
        z = torch.stack([self.proj_up(z_BThwC[:, i]) for i in range(z_BThwC.shape[1])], dim=1).movedim(-1, 1)
        b, c, t, h, w = z.shape
        z = F.pixel_shuffle(z.transpose(1, 2).reshape(b * t, c, h, w), 2)
        return z.reshape(b, t, c // 4, 2 * h, 2 * w).transpose(1, 2).contiguous()

    def _decoder_chunks(self, z: Tensor, chunked: bool) -> list[tuple[int, int]]:
        """The temporal chunks :meth:`_run_decoder` decodes ``z`` in (one for an unchunked decode)."""
        return chunk_bounds(z.shape[2], self.config.decode_latent_batch) if chunked else [(0, z.shape[2])]

    def _run_decoder(self, z: Tensor, chunked: bool, after_chunk: Callable[[], None] | None = None) -> Tensor:
        if not chunked:
            out = self.decoder(z)
            if after_chunk is not None:
                after_chunk()
            return out
        cache: FeatureCache = {}
        # Every latent count works, T'=2 included (the reference crashes there): chunks 1, then batches.
        outs = []
        for s, e in self._decoder_chunks(z, chunked):
            outs.append(self.decoder(z[:, :, s:e], cache, first_chunk=(s == 0)))
            if after_chunk is not None:
                after_chunk()
        return torch.cat(outs, dim=2)

    def stream_decoder(self) -> StreamDecoder:
        """A decoder for one latent video fed clip by clip: see :class:`StreamDecoder`."""
        return StreamDecoder(self)

    def decode(
        self,
        latent: Tensor,
        *,
        chunked: bool = True,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """Latent (B, 64, T', h, w) -> video (B, 3, 1 + 4(T'-1), 16h, 16w), NOT clamped.

        ``tile_size`` (in latent cells, 1 cell = 16 pixels; square tiles) decodes the frame in
        overlapping spatial tiles so that activation memory is bounded by the tile size rather than
        the frame size. ``tile_overlap`` (latent cells, default ``tile_size // 4``) is where
        neighbouring tiles are blended: each tile's outer 3/8 of the overlap is discarded and the
        middle quarter is a linear cross-fade. Tiling is not exact: pixels near a tile border see the
        tile's zero padding where the full frame had neighbours (the decoder's receptive field is
        ~12 latent cells); the larger the overlap, the smaller the error (see tests/test_vae_model.py
        for measured figures). ``tile_size`` >= the latent size decodes untiled.

        ``on_chunk(done, total)`` reports progress: once with ``done=0`` before the first decoder chunk, then after
        every temporal chunk of every tile (``total`` = tiles x chunks). An exception it raises stops the decode
        there, so a front door's Stop does not wait for the whole video.
        """
        z = self.latent_to_decoder_input(latent)
        tiled = tile_size is not None and (tile_size < latent.shape[-2] or tile_size < latent.shape[-1])
        if tile_size is not None:
            if tile_size < 1:
                raise ValueError(f"tile_size must be >= 1 latent cell; got {tile_size}")
            overlap = tile_size // 4 if tile_overlap is None else tile_overlap
            if not 0 <= overlap < tile_size:
                raise ValueError(f"tile_overlap must be in [0, tile_size={tile_size}); got {overlap}")
        if tiled and self.config.spatial_padding != "zeros":
            # A tile is not a whole frame: wrapping its borders around would join pixels that are not neighbours.
            raise ValueError(f"tiled decoding needs a zero-padded VAE; this one pads {self.config.spatial_padding!r} "
                             "(decode without tile_size)")
        after_chunk = None
        if on_chunk is not None:
            tiles = 1
            if tiled:  # the tile layout of _decode_tiled (sizes in f8 cells)
                tiles = math.prod(len(_tile_starts(n, 2 * tile_size, 2 * overlap)) for n in z.shape[3:])
            total = tiles * len(self._decoder_chunks(z, chunked))
            done = [0]

            def after_chunk() -> None:
                done[0] += 1
                on_chunk(done[0], total)

            on_chunk(0, total)
        if not tiled:
            return self._run_decoder(z, chunked, after_chunk)
        return self._decode_tiled(z, 2 * tile_size, 2 * overlap, chunked, after_chunk)

    def _decode_tiled(self, z: Tensor, tile: int, overlap: int, chunked: bool,
                      after_chunk: Callable[[], None] | None = None) -> Tensor:
        """Tiles over the f8 latent ``z`` (sizes here in f8 cells); blend in pixel space."""
        up = self.config.space_stride // 2  # pixels per f8 cell
        h, w = z.shape[3:]
        ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
        out: Tensor | None = None
        weight: Tensor | None = None
        for y0 in ys:
            for x0 in xs:
                th, tw = min(tile, h), min(tile, w)
                part = self._run_decoder(z[:, :, :, y0:y0 + th, x0:x0 + tw], chunked, after_chunk)
                if out is None:
                    b, c, t = part.shape[:3]
                    out = part.new_zeros(b, c, t, h * up, w * up)
                    weight = part.new_zeros(h * up, w * up)
                wy = _edge_weights(th * up, overlap * up, rise=y0 > 0, fall=y0 + th < h)
                wx = _edge_weights(tw * up, overlap * up, rise=x0 > 0, fall=x0 + tw < w)
                w2 = (wy[:, None] * wx[None, :]).to(part)
                py, px = slice(y0 * up, (y0 + th) * up), slice(x0 * up, (x0 + tw) * up)
                out[..., py, px] += part * w2
                weight[py, px] += w2
        assert out is not None and weight is not None
        assert bool((weight > 0).all()), "tiling left pixels without weight"  # guaranteed by the tile layout
        return out / weight


class StreamDecoder:
    """Decodes one latent video clip by clip, keeping the decoder's causal ``FeatureCache`` between calls.

    ``decode(latent_chunk)`` takes the next latent frames (B, 64, t, h, w), the first call starting at latent frame
    0, and returns their pixel frames: ``1 + 4(t-1)`` for the first call (latent frame 0 is the single causal
    image frame), ``4t`` for every later one. Decoding the clips of a video one after another (the first-frame
    latent, then clips of ``frames_inner_clip`` latents, as generation produces them) therefore shows frames as
    soon as each clip's codes exist, and the concatenated outputs equal ``vae.decode(whole_latent)`` to float
    rounding. They are equal bit for bit when both runs cut the same decoder chunks: the first call holds
    ``1 + (T' - 1) % decode_latent_batch`` latents (``1`` whenever ``T' - 1`` is a multiple of the batch, as in the
    pipelines' layouts with the default batch 2) and every later call a multiple of ``decode_latent_batch``.

    Within a call the decoder runs ``decode_latent_batch`` latents at a time, as :meth:`VideoVAE.decode` does,
    so activation memory is bounded by that batch, not by the clip. No spatial tiling: every call decodes whole
    frames (use ``VideoVAE.decode(tile_size=...)`` on the whole latent for frames too large for memory).

    The chunking rule, checked on every call (one-line ``ValueError``): a chunk is a latent of the VAE's
    ``embed_dim`` channels with at least one frame; all chunks share the first one's batch size, latent height
    and width, dtype and device (the cached frames are concatenated with the new ones); and with ``start`` given,
    a chunk starts right after the frames already decoded (catches a skipped or repeated clip).
    """

    def __init__(self, vae: VideoVAE) -> None:
        self.vae = vae
        self.cache: FeatureCache = {}
        self.latent_frames_done = 0  # latent frames decoded so far
        self.pixel_frames_done = 0  # pixel frames returned so far
        self._layout: tuple[int, int, int, torch.dtype, torch.device] | None = None  # (B, h, w, dtype, device)

    def decode(self, latent_chunk: Tensor, *, start: int | None = None) -> Tensor:
        """The next latent frames (B, 64, t, h, w) -> their pixel frames (B, 3, t_pix, 16h, 16w), NOT clamped.

        ``start`` (optional): the latent frame index the chunk begins at, checked against the frames decoded so
        far. A 4-D (B, 64, h, w) chunk is one latent frame.
        """
        latent = self.vae._check_latent(latent_chunk)
        b, _, t, h, w = latent.shape
        layout = (b, h, w, latent.dtype, latent.device)
        if self._layout is not None and layout != self._layout:
            first = self._layout
            raise ValueError(
                f"latent chunk has batch {b}, latent size {h}x{w}, {latent.dtype} on {latent.device}; this stream "
                f"started with batch {first[0]}, {first[1]}x{first[2]}, {first[3]} on {first[4]} (one stream decodes "
                f"one video: call vae.stream_decoder() for another)"
            )
        if start is not None and start != self.latent_frames_done:
            raise ValueError(
                f"latent chunk starts at latent frame {start} but the stream has decoded {self.latent_frames_done} "
                f"latent frames: chunks must follow each other, the first at frame 0"
            )
        first_call = self.latent_frames_done == 0
        z = self.vae.latent_to_decoder_input(latent)
        batch = self.vae.config.decode_latent_batch
        # The first call cuts as VideoVAE.decode cuts a whole latent (remainder with frame 0); later calls in
        # whole batches from their first frame, the remainder last.
        bounds = chunk_bounds(t, batch) if first_call else [(s, min(s + batch, t)) for s in range(0, t, batch)]
        outs = [self.vae.decoder(z[:, :, s:e], self.cache, first_chunk=first_call and s == 0) for s, e in bounds]
        video = torch.cat(outs, dim=2)
        self._layout = layout
        self.latent_frames_done += t
        self.pixel_frames_done += video.shape[2]
        return video


__all__ = ["Decoder", "Encoder", "StreamDecoder", "VideoVAE", "chunk_bounds"]
