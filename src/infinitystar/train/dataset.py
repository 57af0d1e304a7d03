"""The training dataset over cached latents: a seeded order sharded by rank, a resumable position.

:class:`LatentDataset` reads the latents that ``infinitystar extract-features`` cached (``train.features``);
records (``train.data``) without a cache are counted and left out (or encoded online when a VAE is given).
Order and randomness are functions of ``(seed, epoch, record)`` only:

* each epoch is one global permutation seeded by ``seed + epoch`` (the same on every rank), then
  sharded by *record* ``perm[rank::world_size]`` and cut to the same length on every rank;
* caption choice, sentence truncation and condition dropout of a record in an epoch come from a
  generator seeded by ``(seed, epoch, record uid)`` (``train.data.draw_caption``), so they do not depend on the
  rank, the worker or where a run was resumed;
* :class:`DataPosition` ``(epoch, index)`` is the next sample of this rank; a resumed run that starts
  there yields exactly the samples the interrupted run would have yielded.

Imports ``train.data`` (records, buckets, captions) and ``train.features`` (the latent cache); neither imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from infinitystar.config import ConfigError, PipelineConfig
from infinitystar.generation.schedules import Scale
from infinitystar.text import guidance_dropout_mask, interactive_prompt
from infinitystar.train.config import DataConfig
from infinitystar.train.data import (
    Bucket,
    ParseStats,
    Record,
    draw_caption,
    load_records,
    record_generator,
    sample_schedule,
)
from infinitystar.train.features import FeatureIndex, clip_key, encode_record, load_cached_latent

logger = logging.getLogger(__name__)

__all__ = ["TRAIN_TASKS", "DataPosition", "DataSample", "LatentDataset", "draw_task"]


@dataclass(frozen=True)
class DataPosition:
    """The next sample of one rank: ``index`` into the rank's order of ``epoch``. Save it, restore it."""

    epoch: int = 0
    index: int = 0

    def __post_init__(self) -> None:
        if self.epoch < 0 or self.index < 0:
            raise ValueError(f"DataPosition needs epoch >= 0 and index >= 0, got ({self.epoch}, {self.index})")

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DataPosition:
        try:
            return cls(int(state["epoch"]), int(state["index"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a DataPosition state dict: {state!r} ({err})") from None


@dataclass
class DataSample:
    """One training sample.

    ``latent_CTHW`` is the cached latent ``[64, pt, h, w]`` (float32, already cut to ``pt`` frames);
    ``schedule`` its full scale pyramid; ``caption`` the processed caption of this epoch; ``drop_text``
    whether the trainer should replace its text by the unconditional rows (condition dropout, drawn per
    sample from the seed). ``position`` is this sample's place; a checkpoint taken after training on it
    stores :attr:`next_position`.

    ``task`` (:data:`TRAIN_TASKS`, drawn per record and epoch like the caption): ``"text-to-video"``;
    ``"image-to-video"`` (the first frame given); ``"video-extension"`` (the first frame and ``given_clips``
    whole clips given); ``"interactive"`` (a story record: clip ``turn`` >= 1 generated from the clip before it,
    ``caption`` is that clip's).
    """

    latent_CTHW: torch.Tensor
    schedule: list[Scale]
    caption: str
    drop_text: bool
    record: Record
    bucket: Bucket
    cache_file: str | None
    position: DataPosition
    task: str = "text-to-video"
    given_clips: int = 0
    turn: int = 0

    @property
    def next_position(self) -> DataPosition:
        return DataPosition(self.position.epoch, self.position.index + 1)


TRAIN_TASKS = ("text-to-video", "image-to-video", "video-extension", "interactive")


def draw_task(record: Record, config: DataConfig, pipeline: PipelineConfig,
              generator: torch.Generator) -> tuple[str, int, int]:
    """``(task, given_clips, turn)`` of ``record`` for one epoch (see :class:`DataSample`).

    A story is an interactive turn, its turn uniform in 1..clips-1. A video is image-to-video with probability
    ``config.image_to_video_prob``, else (two clips or more) video extension with ``config.extension_prob``,
    given clips uniform in 1..clips-1, else text-to-video. Images are always text-to-image (``text-to-video``).
    """
    # Clips of the schedule after the first frame (the last one may be short).
    clips = -(-(record.latent_frames - 1) // pipeline.frames_inner_clip) if record.kind == "video" else 0
    if record.is_story:
        return "interactive", 0, 1 + int(torch.randint(0, clips - 1, (), generator=generator))
    if record.kind != "video":
        return "text-to-video", 0, 0
    u = float(torch.rand((), generator=generator))
    if u < config.image_to_video_prob:
        return "image-to-video", 0, 0
    if clips >= 2 and u < config.image_to_video_prob + config.extension_prob:
        return "video-extension", 1 + int(torch.randint(0, clips - 1, (), generator=generator)), 0
    return "text-to-video", 0, 0


@dataclass(frozen=True)
class _Skipped:
    position: DataPosition
    reason: str


def _identity(x: Any) -> Any:
    return x


class LatentDataset:
    """Cached latents of the records of a :class:`DataConfig`, in a seeded order, sharded by rank; sampled,
    bucketed and cut into scale schedules as ``pipeline`` generates (its fps and pyramid).

    ``feature_tag`` selects which extraction to read when the cache holds several (VAE identity and
    posterior mode, see ``train.features.feature_tag``); None accepts the only one present. ``vae``
    (optional) encodes records without a cache online (slow; for small experiments).

    Use :meth:`iterate` (optionally from a saved :class:`DataPosition`) for a stream of
    :class:`DataSample`; ``len(ds)`` is the number of samples per rank per epoch.
    """

    def __init__(
        self,
        config: DataConfig,
        pipeline: PipelineConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        feature_tag: str | None = None,
        vae: torch.nn.Module | None = None,
        records: Sequence[Record] | None = None,
    ) -> None:
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.config, self.pipeline, self.rank, self.world_size, self.vae = config, pipeline, rank, world_size, vae
        if records is None:
            records, self.stats = load_records(config, pipeline)
        else:
            self.stats = ParseStats(videos=sum(r.kind == "video" for r in records),
                                    images=sum(r.kind == "image" for r in records))
        if not config.cache_dir and vae is None:
            raise ConfigError("DataConfig.cache_dir is empty and no VAE was given: nothing to read latents from")
        index = FeatureIndex.scan(config.cache_dir, pipeline) if config.cache_dir else None
        if index is not None and feature_tag is None:
            tags = index.tags()
            if len(tags) > 1:
                raise ConfigError(f"the cache {config.cache_dir} holds latents of several extractions {sorted(tags)}; "
                                  "pass feature_tag to choose one")
            feature_tag = next(iter(tags), None)
        self.feature_tag = feature_tag
        self.records: list[Record] = []
        self.cache_files: list[str | None] = []
        self.missing_cache = 0
        for rec in records:
            entry = index.find(clip_key(rec), rec.num_frames, feature_tag) if index is not None else None
            if entry is None and vae is None:
                self.missing_cache += 1
                continue
            self.records.append(rec)
            self.cache_files.append(str(entry.path) if entry is not None else None)
        if self.missing_cache:
            logger.warning("%d of %d record(s) have no cached latent in %s and are left out (run "
                           "`infinitystar extract-features`)", self.missing_cache, len(records), config.cache_dir)
        if len(self.records) < world_size:
            raise ValueError(f"{len(self.records)} usable record(s) for {world_size} rank(s): every rank needs at "
                             f"least one ({self.missing_cache} without cache, {self.stats.bad} bad rows)")
        self.skipped = 0
        self._order_cache: tuple[int, list[int]] | None = None

    # -- order ------------------------------------------------------------------------------------

    def _uid(self, i: int) -> str:
        rec = self.records[i]
        return f"{rec.path}|{rec.begin_frame}|{rec.end_frame}|{rec.source}"

    def epoch_order(self, epoch: int) -> list[int]:
        """Record indices of this rank's samples in ``epoch`` (the same length on every rank)."""
        cached = self._order_cache
        if cached is not None and cached[0] == epoch:
            return cached[1]
        order = self._mixed(record_generator(self.config.seed, epoch, "", "epoch-order"))
        per_rank = len(order) // self.world_size
        if per_rank == 0:
            raise ValueError(f"epoch {epoch} has {len(order)} sample(s) for {self.world_size} rank(s)")
        mine = order[self.rank::self.world_size][:per_rank]
        self._order_cache = (epoch, mine)
        return mine

    def _mixed(self, gen: torch.Generator) -> list[int]:
        frac = self.config.image_fraction
        if frac is None:
            return torch.randperm(len(self.records), generator=gen).tolist()
        videos = [i for i, r in enumerate(self.records) if r.kind == "video"]
        images = [i for i, r in enumerate(self.records) if r.kind == "image"]
        if frac > 0 and not images:
            raise ValueError(f"image_fraction={frac} but no image record is usable")
        if frac < 1 and not videos:
            raise ValueError(f"image_fraction={frac} but no video record is usable")
        n_img = len(images) if frac == 1 else round(frac / (1 - frac) * len(videos))
        picked = []
        while len(picked) < n_img:  # images repeated (each pass reshuffled) or subsampled to reach the fraction
            picked += [images[j] for j in torch.randperm(len(images), generator=gen).tolist()]
        pool = (videos if frac < 1 else []) + picked[:n_img]
        return [pool[j] for j in torch.randperm(len(pool), generator=gen).tolist()]

    def __len__(self) -> int:
        return len(self.epoch_order(0))  # the same every epoch

    # -- samples ----------------------------------------------------------------------------------

    def load_latent(self, i: int) -> tuple[torch.Tensor, Bucket]:
        """The latent ``[64, pt, h, w]`` of record ``i`` (cut to its ``pt``) and its bucket."""
        rec, path = self.records[i], self.cache_files[i]
        if path is not None:
            latent, bucket = load_cached_latent(path, self.pipeline)
        else:
            assert self.vae is not None
            latent, bucket = encode_record(self.vae, rec, self.config, self.pipeline)
        return latent[:, : rec.latent_frames].contiguous(), bucket

    def sample(self, epoch: int, index: int) -> DataSample:
        """Sample ``index`` of this rank in ``epoch`` (raises on an unreadable latent)."""
        order = self.epoch_order(epoch)
        if not 0 <= index < len(order):
            raise IndexError(f"index {index} out of range for {len(order)} samples per epoch")
        i = order[index]
        rec = self.records[i]
        latent, bucket = self.load_latent(i)
        task, given_clips, turn = draw_task(rec, self.config, self.pipeline,
                                            record_generator(self.config.seed, epoch, self._uid(i), "task"))
        if task == "interactive":
            clip_seconds = self.pipeline.frames_inner_clip * self.pipeline.vae.time_stride // self.pipeline.fps
            caption = interactive_prompt(rec.segment_captions[turn], clip_seconds)  # as the turn is prompted
        else:
            caption = draw_caption(rec, self.config, record_generator(self.config.seed, epoch, self._uid(i)))
        drop = bool(guidance_dropout_mask(1, self.config.cond_dropout,
                                          record_generator(self.config.seed, epoch, self._uid(i), "dropout"))[0])
        return DataSample(latent, sample_schedule(bucket, latent.shape[1], self.pipeline), caption, drop, rec, bucket,
                          self.cache_files[i], DataPosition(epoch, index), task, given_clips, turn)

    def _try_sample(self, epoch: int, index: int) -> DataSample | _Skipped:
        try:
            return self.sample(epoch, index)
        except (ValueError, OSError, RuntimeError) as err:
            return _Skipped(DataPosition(epoch, index), f"{self.records[self.epoch_order(epoch)[index]].source}: {err}")

    def iterate(self, start: DataPosition | None = None, *, epochs: int | None = None,
                num_workers: int | None = None) -> Iterator[DataSample]:
        """Samples from ``start`` on, epoch after epoch (``epochs`` = how many to run to the end of; None = forever).

        With ``num_workers > 0`` a ``DataLoader`` decodes in worker processes; samples still come in
        index order. A sample whose latent cannot be read is logged with its record's ``file:line`` and
        skipped (its index is consumed, so resuming stays exact).
        """
        pos = start or DataPosition()
        workers = self.config.num_workers if num_workers is None else num_workers
        last_epoch = None if epochs is None else pos.epoch + epochs - 1
        while last_epoch is None or pos.epoch <= last_epoch:
            for item in self._epoch_items(pos.epoch, pos.index, workers):
                if isinstance(item, _Skipped):
                    self.skipped += 1
                    logger.warning("skipping sample %s: %s", item.position, item.reason)
                    continue
                yield item
            pos = DataPosition(pos.epoch + 1, 0)

    def _epoch_items(self, epoch: int, start: int, workers: int) -> Iterator[DataSample | _Skipped]:
        n = len(self.epoch_order(epoch))
        if workers <= 0:
            for index in range(start, n):
                yield self._try_sample(epoch, index)
            return
        loader = torch.utils.data.DataLoader(_EpochStream(self, epoch, start, n), batch_size=None,
                                             num_workers=workers, collate_fn=_identity)
        yield from loader

    def state_dict(self, position: DataPosition) -> dict[str, Any]:
        """What a checkpoint stores to resume the stream exactly (checked by :meth:`resume_position`)."""
        return {**position.state_dict(), "seed": self.config.seed, "world_size": self.world_size,
                "num_records": len(self.records)}

    def resume_position(self, state: dict[str, Any]) -> DataPosition:
        """The saved position, after checking that seed, world size and record count still match."""
        for key, mine in (("seed", self.config.seed), ("world_size", self.world_size),
                          ("num_records", len(self.records))):
            if key in state and state[key] != mine:
                raise ValueError(f"cannot resume the data stream exactly: checkpoint has {key}={state[key]}, "
                                 f"this run has {key}={mine}")
        return DataPosition.from_state_dict(state)


class _EpochStream(torch.utils.data.IterableDataset):
    """Worker w yields indices start + w, start + w + W, ...: the DataLoader's round robin restores index order."""

    def __init__(self, dataset: LatentDataset, epoch: int, start: int, stop: int) -> None:
        self.dataset, self.epoch, self.start, self.stop = dataset, epoch, start, stop

    def __iter__(self) -> Iterator[DataSample | _Skipped]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in range(self.start + wid, self.stop, nw):
            yield self.dataset._try_sample(self.epoch, index)
