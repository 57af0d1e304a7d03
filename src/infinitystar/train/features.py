"""VAE feature extraction and the latent cache (``infinitystar extract-features``).

Training reads pre-computed VAE latents, not pixels (training.md 1, 2.8). For every record this
module samples the clip (``train.data``), resizes/crops it to its resolution bucket, encodes it with
the frozen VAE and stores the latent ``[64, pt, h, w]`` (float32) as one safetensors file (tensor
``latent``) with its provenance in the header metadata.

Cache layout and keys (fixes the reference's stem-only md5 that collides, training.md 2.8/12.3)::

    cache_dir/<kk>/<clip>_<F>f_<H>x<W>_<tag>.safetensors

* ``clip`` = sha256 of the absolute source path and the native frame range (:func:`clip_key`), ``kk``
  its first two hex digits (a fan-out so no folder grows huge);
* ``F`` = pixel frames sampled at the pipeline's fps (``16 s + 1``; 1 for images), ``H x W`` the bucket;
* ``tag`` = the extraction's identity (:func:`feature_tag`): a hash of the VAE's config and weights,
  plus the posterior mode (``mean``, or ``s<seed>`` for a seeded posterior sample).

Writes are atomic (temp file + ``os.replace``), so an interrupted run leaves only complete files; a
second run skips every valid file. A file that fails to load, lacks the tensor, or whose shape or
metadata disagree with its name is reported and rebuilt (never silently used; the reference deletes it
during training instead). Training looks files up through :class:`FeatureIndex` (one scan of the cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from tqdm import tqdm

from infinitystar.checkpoints import save_safetensors
from infinitystar.config import PipelineConfig
from infinitystar.generation.schedules import latent_frames
from infinitystar.media import frames_to_tensor, read_image, read_video, resize_and_center_crop
from infinitystar.train.config import DataConfig
from infinitystar.train.data import Bucket, Record, bucket_for_size, bucket_for_template, bucket_sizes, load_records

logger = logging.getLogger(__name__)

__all__ = [
    "FEATURE_FORMAT",
    "CacheEntry",
    "CacheError",
    "ExtractionStats",
    "FeatureIndex",
    "cache_path",
    "clip_key",
    "encode_record",
    "extract_features",
    "feature_tag",
    "load_cached_latent",
    "load_record_pixels",
    "validate_cache_file",
    "vae_identity",
]

FEATURE_FORMAT = "infinitystar-latent"
LATENT_KEY = "latent"
# The reference accepts clip windows up to 0.2 s past the end of the video (training.md 2.4).
END_TOLERANCE_S = 0.2
_NAME_RE = re.compile(r"^(?P<clip>[0-9a-f]{32})_(?P<frames>\d+)f_(?P<h>\d+)x(?P<w>\d+)_(?P<tag>[0-9A-Za-z.-]+)"
                      r"\.safetensors$")


class CacheError(ValueError):
    """A cache file that cannot be used (unreadable, truncated, wrong shape or metadata)."""


# ----------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------


def clip_key(record: Record) -> str:
    """32 hex digits identifying the clip: absolute path + native frame range (+ kind).

    The training length is not part of it; it is in the file name (``F`` frames), so caches of the
    same clip at 5 s and 10 s live side by side (a longer one can serve a shorter clip: the VAE is
    causal, its first latent frames only see the first pixel frames).
    """
    ident = f"{record.kind}\0{os.path.abspath(record.path)}\0{record.begin_frame}\0{record.end_frame}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def vae_identity(vae: torch.nn.Module) -> str:
    """12 hex digits over the VAE's config and every parameter/buffer (name, shape, dtype, bytes)."""
    h = hashlib.sha256()
    config = getattr(vae, "config", None)
    if config is not None:
        h.update(repr(config).encode())
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:12]


def feature_tag(vae_id: str, sampling: str = "mean", seed: int = 0) -> str:
    """The extraction identity in file names: ``<vae_id>-mean`` or ``<vae_id>-s<seed>``."""
    if sampling not in ("mean", "sample"):
        raise ValueError(f"latent sampling must be 'mean' or 'sample', got {sampling!r}")
    if not re.fullmatch(r"[0-9A-Za-z.]+", vae_id):
        raise ValueError(f"vae_id must be letters, digits or dots, got {vae_id!r}")
    return f"{vae_id}-mean" if sampling == "mean" else f"{vae_id}-s{seed}"


def cache_name(clip: str, num_frames: int, bucket: Bucket, tag: str) -> str:
    return f"{clip}_{num_frames}f_{bucket.height}x{bucket.width}_{tag}.safetensors"


def cache_path(cache_dir: str | os.PathLike, clip: str, num_frames: int, bucket: Bucket, tag: str) -> Path:
    return Path(cache_dir) / clip[:2] / cache_name(clip, num_frames, bucket, tag)


@dataclass(frozen=True)
class CacheEntry:
    """A cache file, as its name describes it."""

    path: Path
    clip: str
    num_frames: int
    height: int
    width: int
    tag: str

    @property
    def latent_frames(self) -> int:
        return latent_frames(self.num_frames)

    @classmethod
    def from_path(cls, path: Path) -> CacheEntry | None:
        m = _NAME_RE.match(path.name)
        if m is None:
            return None
        return cls(path, m["clip"], int(m["frames"]), int(m["h"]), int(m["w"]), m["tag"])


class FeatureIndex:
    """All cache files under a folder, by clip key: one directory scan instead of a stat per record."""

    def __init__(self, entries: Iterable[CacheEntry], sizes: Iterable[tuple[int, int]] | None = None) -> None:
        self._by_clip: dict[str, list[CacheEntry]] = {}
        allowed = set(sizes) if sizes is not None else None
        for e in entries:
            if allowed is None or (e.height, e.width) in allowed:
                self._by_clip.setdefault(e.clip, []).append(e)

    @classmethod
    def scan(cls, cache_dir: str | os.PathLike, pipeline: PipelineConfig | None = None) -> FeatureIndex:
        """Index ``cache_dir`` (a missing folder is an empty cache); with ``pipeline``, only its bucket sizes."""
        root = Path(cache_dir)
        entries = []
        if root.is_dir():
            for sub in os.scandir(root):
                if sub.is_dir():
                    for f in os.scandir(sub.path):
                        entry = CacheEntry.from_path(Path(f.path))
                        if entry is not None:
                            entries.append(entry)
        return cls(entries, bucket_sizes(pipeline) if pipeline is not None else None)

    def tags(self) -> set[str]:
        return {e.tag for es in self._by_clip.values() for e in es}

    def __len__(self) -> int:
        return sum(len(es) for es in self._by_clip.values())

    def find(self, clip: str, num_frames: int, tag: str | None = None) -> CacheEntry | None:
        """The shortest cached clip with at least ``num_frames`` frames (exact length first)."""
        fits = [e for e in self._by_clip.get(clip, []) if e.num_frames >= num_frames and (tag is None or e.tag == tag)]
        return min(fits, key=lambda e: (e.num_frames, e.height, e.width), default=None)


# ----------------------------------------------------------------------------------------------
# Pixels and encoding
# ----------------------------------------------------------------------------------------------


def load_record_pixels(record: Record, pipeline: PipelineConfig) -> tuple[torch.Tensor, Bucket]:
    """Decode, sample, bucket and transform a record: float32 ``[3, F, H, W]`` in [-1, 1] and its bucket.

    Videos: ``F = 16 s + 1`` frames sampled by timestamp from ``begin_frame / native_fps``; the bucket is
    the nearest template of the decoded frame size. Raises ``FileNotFoundError`` / ``MediaError`` /
    ``ValueError`` naming the record when the clip cannot be read in full.
    """
    if record.kind == "image":
        img = read_image(record.path)
        bucket = bucket_for_size(img.height, img.width, pipeline)
        frame = np.asarray(resize_and_center_crop(img, bucket.height, bucket.width))
        return frames_to_tensor(frame[None]), bucket
    frames_THW3, _ = read_video(record.path, fps=pipeline.fps, max_frames=record.num_frames,
                                start_time=record.start_time, end_tolerance=END_TOLERANCE_S)
    if frames_THW3.shape[0] != record.num_frames:
        raise ValueError(f"{record.source}: {record.path} gives {frames_THW3.shape[0]} frames at {pipeline.fps} fps "
                         f"from t={record.start_time:.3f}s, the {record.seconds} s clip needs {record.num_frames}")
    bucket = bucket_for_size(int(frames_THW3.shape[1]), int(frames_THW3.shape[2]), pipeline)
    return frames_to_tensor(resize_and_center_crop(frames_THW3, bucket.height, bucket.width)), bucket


def _sample_generator(seed: int, clip: str, device: torch.device) -> torch.Generator:
    # Per clip, not per run: the same clip gets the same posterior sample whatever the order or resume point.
    value = int.from_bytes(hashlib.sha256(f"{seed}\0{clip}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator(device=device).manual_seed(value)


@torch.no_grad()
def encode_record(vae: torch.nn.Module, record: Record, config: DataConfig, pipeline: PipelineConfig,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, Bucket]:
    """The latent ``[64, pt, h, w]`` (float32, CPU) of one record, and its bucket.

    Posterior mean by default; ``config.latent_sampling == "sample"`` draws a posterior sample from a
    generator seeded by ``(config.seed, clip key)``.
    """
    pixels_3FHW, bucket = load_record_pixels(record, pipeline)
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    x = pixels_3FHW[None].to(device)
    if config.latent_sampling == "sample":
        latent = vae.encode(x, sample=True, generator=_sample_generator(config.seed, clip_key(record), device))
    else:
        latent = vae.encode(x)
    return latent[0].float().cpu().contiguous(), bucket


# ----------------------------------------------------------------------------------------------
# Reading and checking cache files
# ----------------------------------------------------------------------------------------------


def validate_cache_file(path: str | os.PathLike, embed_dim: int | None = None) -> tuple[torch.Tensor, dict[str, str]]:
    """Load a cache file and check it against its own name; :class:`CacheError` says what is wrong.

    Checks: readable safetensors holding ``latent``, 4-D float32, ``[C, pt, H/16, W/16]`` as the name
    says (and ``C == embed_dim`` when given), finite values, and metadata agreeing with the name.
    """
    p = Path(path)
    entry = CacheEntry.from_path(p)
    if entry is None:
        raise CacheError(f"{p}: not a cache file name (<clip>_<F>f_<H>x<W>_<tag>.safetensors)")
    # One read into memory (not a memory map): a later in-place truncation of the file cannot change a
    # latent already read, and it is ~10x faster than copying out of a fresh mmap.
    try:
        data = p.read_bytes()
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
        tensors = load_bytes(data)
    except Exception as err:  # safetensors reports truncation/corruption with its own error types
        raise CacheError(f"{p}: unreadable ({type(err).__name__}: {err})") from err
    if LATENT_KEY not in tensors:
        raise CacheError(f"{p}: no '{LATENT_KEY}' tensor (keys: {sorted(tensors)})")
    latent = tensors[LATENT_KEY]
    want = (latent.shape[0], entry.latent_frames, entry.height // 16, entry.width // 16)
    if latent.ndim != 4 or tuple(latent.shape) != want or (embed_dim is not None and latent.shape[0] != embed_dim):
        raise CacheError(f"{p}: latent has shape {tuple(latent.shape)}, the name says "
                         f"[{embed_dim or 'C'}, {entry.latent_frames}, {want[2]}, {want[3]}]")
    if latent.dtype != torch.float32:
        raise CacheError(f"{p}: latent dtype {latent.dtype}, expected float32")
    # NaN/inf propagate through a sum; ~20x cheaper than isfinite().all() (only |x| ~ 1e32 could false-alarm).
    if not math.isfinite(float(latent.sum())):
        raise CacheError(f"{p}: latent holds NaN/inf values")
    expect_meta = {"format": FEATURE_FORMAT, "clip_key": entry.clip, "num_frames": str(entry.num_frames),
                   "height": str(entry.height), "width": str(entry.width), "tag": entry.tag,
                   "shape": json.dumps(list(latent.shape))}
    wrong = {k: (meta.get(k), v) for k, v in expect_meta.items() if meta.get(k) != v}
    if wrong:
        raise CacheError(f"{p}: metadata disagrees with the file name/shape: " +
                         ", ".join(f"{k}={got!r} (expected {exp!r})" for k, (got, exp) in sorted(wrong.items())))
    return latent, meta


def load_cached_latent(path: str | os.PathLike, pipeline: PipelineConfig) -> tuple[torch.Tensor, Bucket]:
    """A checked cached latent ``[C, pt, h, w]`` and its bucket (raises :class:`CacheError`)."""
    latent, meta = validate_cache_file(path)
    h, w = int(meta["height"]), int(meta["width"])
    try:
        bucket = bucket_for_template(float(meta["template"]), pipeline)
    except (KeyError, ValueError) as err:
        raise CacheError(f"{path}: no valid h/w template in the metadata ({err})") from None
    if (bucket.height, bucket.width) != (h, w):
        raise CacheError(f"{path}: bucket {h}x{w} is not the template {bucket.template}'s bucket "
                         f"{bucket.height}x{bucket.width} for pn={pipeline.pn!r}, num_scales={pipeline.num_scales}")
    return latent, bucket


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------


@dataclass
class ExtractionStats:
    """Counts of one extraction run (this rank's share)."""

    records: int = 0
    written: int = 0
    skipped: int = 0  # a valid file was already there
    rebuilt: int = 0  # a corrupt file was found and written again (also counted in written)
    failed: int = 0  # the clip could not be read or encoded (logged with file:line)
    bad_rows: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.records} record(s): {self.written} written ({self.rebuilt} rebuilt), {self.skipped} "
                f"already cached, {self.failed} failed, {self.bad_rows} bad row(s), {self.seconds:.1f} s")


def _write_latent(path: Path, latent: torch.Tensor, record: Record, bucket: Bucket, clip: str, tag: str,
                  config: DataConfig, pipeline: PipelineConfig, vae_id: str) -> None:
    meta = {
        "format": FEATURE_FORMAT, "clip_key": clip, "num_frames": str(record.num_frames),
        "height": str(bucket.height), "width": str(bucket.width), "template": str(bucket.template),
        "tag": tag, "shape": json.dumps(list(latent.shape)), "source": record.path, "kind": record.kind,
        "begin_frame": str(record.begin_frame), "end_frame": str(record.end_frame),
        "native_fps": str(record.native_fps), "seconds": str(record.seconds), "fps": str(pipeline.fps),
        "pn": pipeline.pn, "num_scales": str(pipeline.num_scales), "vae_id": vae_id,
        "latent_sampling": config.latent_sampling, "seed": str(config.seed), "record": record.source,
    }
    save_safetensors({LATENT_KEY: latent}, path, metadata=meta)


def _existing_entry(cache_dir: Path, clip: str, record: Record, tag: str, sizes: set) -> tuple[CacheEntry | None,
                                                                                                   list[Path]]:
    """A valid cache file of this clip (any bucket of the config, exact frame count), and the corrupt ones."""
    folder = cache_dir / clip[:2]
    if not folder.is_dir():
        return None, []
    corrupt = []
    prefix = f"{clip}_{record.num_frames}f_"
    for f in sorted(folder.iterdir()):
        if not f.name.startswith(prefix):
            continue
        entry = CacheEntry.from_path(f)
        if entry is None or entry.tag != tag or (entry.height, entry.width) not in sizes:
            continue
        try:
            validate_cache_file(f)
        except CacheError as err:
            logger.warning("corrupt cache file (%s): %s; rebuilding it", record.source, err)
            corrupt.append(f)
            continue
        return entry, corrupt
    return None, corrupt


def extract_features(
    config: DataConfig,
    pipeline: PipelineConfig,
    vae: torch.nn.Module,
    *,
    vae_id: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> ExtractionStats:
    """Encode every record of ``config.jsonl`` into ``config.cache_dir`` (records ``rank::world_size``), sampled
    and bucketed as ``pipeline`` generates (fps, pixel budget, scales per clip); ``vae`` must have its time stride.

    Resumable: a record whose valid cache file exists is skipped without decoding; corrupt files are
    reported and rebuilt; unreadable clips are logged with ``file:line`` and counted, never fatal.
    """
    if not config.cache_dir:
        raise ValueError("DataConfig.cache_dir is empty: where should the latents go?")
    stride = pipeline.vae.time_stride
    vae_stride = getattr(getattr(vae, "config", None), "time_stride", stride)
    if vae_stride != stride:
        raise ValueError(f"VAE temporal stride {vae_stride} != pipeline {pipeline.name!r}'s VAE time stride {stride}")
    if not (0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    t0 = time.perf_counter()
    vae = vae.eval()
    vae_id = vae_id or vae_identity(vae)
    tag = feature_tag(vae_id, config.latent_sampling, config.seed)
    records, parse_stats = load_records(config, pipeline)
    mine = records[rank::world_size]
    stats = ExtractionStats(records=len(mine), bad_rows=parse_stats.bad)
    cache_dir = Path(config.cache_dir)
    sizes = bucket_sizes(pipeline)
    bar = tqdm(mine, desc="extract-features", unit="clip", disable=not progress)
    for record in bar:
        clip = clip_key(record)
        entry, corrupt = _existing_entry(cache_dir, clip, record, tag, sizes)
        if entry is not None:
            stats.skipped += 1
            continue
        try:
            latent, bucket = encode_record(vae, record, config, pipeline, device)
        except (OSError, ValueError, RuntimeError) as err:
            stats.failed += 1
            msg = f"{record.source}: {record.path}: {err}"
            stats.failures.append(msg)
            logger.warning("cannot extract features: %s", msg)
            continue
        path = cache_path(cache_dir, clip, record.num_frames, bucket, tag)
        _write_latent(path, latent, record, bucket, clip, tag, config, pipeline, vae_id)
        stats.written += 1
        if corrupt:
            stats.rebuilt += 1
            for f in corrupt:  # a corrupt file under another bucket name would otherwise be found again
                if f != path and f.exists():
                    f.unlink()
        bar.set_postfix(written=stats.written, skipped=stats.skipped, failed=stats.failed)
    stats.seconds = time.perf_counter() - t0
    logger.info("extract-features: %s", stats.summary())
    return stats
