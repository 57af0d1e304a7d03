"""Layout of a packed training sequence: segments, the segment-level attention rule, RoPE rows.

A packed sequence (batch dim 1) holds, in this order::

    [ visual tokens of the selected scales of sample 0, of sample 1, ... |
      text tokens of sample 0 | text tokens of sample 1 | ... | zero padding ]

Each scale, each prompt and the padding is one *segment*. Query segment q may attend key segment k
iff ``segment_mask[q, k]``:

* a visual scale sees itself, its own sample's text, and -- for a scale of clip c >= 1 -- the last
  (full-resolution) scale of clip c-1 of the same sample (never the coarser scales of its own clip);
* a sample may carry condition blocks (an interactive turn's semantic and detail conditions,
  :class:`ConditionBlock`), packed just before its scales: each sees only itself, and every scale of that
  sample sees all of them -- what the interactive generation's KV cache gives each step;
* a text segment sees itself only;
* the padding sees nothing (its rows are zero after attention).

The total is padded to a multiple of ``pad_to_multiplier``. The same rule drives the KV cache at
inference (see ``attention.KVCache``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..config import TransformerConfig
from ..generation.schedules import Scale, clip_layout, uses_detail_lfq
from .rope import condition_positions, pad_table, rope_table, text_positions, visual_positions


@dataclass(frozen=True)
class ConditionBlock:
    """Visual tokens a sample's scales attend besides the text: an interactive turn's semantic or detail condition.

    ``scale`` = (t, h, w) of the block; RoPE on scale id ``rope_scale_id`` with the explicit frame ids ``frames``
    (:func:`~infinitystar.transformer.rope.condition_positions`).
    """

    scale: Scale
    rope_scale_id: int
    frames: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return self.scale[0] * self.scale[1] * self.scale[2]


@dataclass(frozen=True)
class PackedSample:
    """One sample of a packed sequence.

    ``schedule`` is the sample's full scale schedule (it fixes the clip layout, the RoPE grid and
    the loss weights); ``scale_ids`` the indices of the scales actually in the sequence (in order);
    ``real_si[k]`` the RoPE step index of the trained repetition of ``scale_ids[k]``.
    """

    schedule: tuple[Scale, ...]
    scale_ids: tuple[int, ...]
    real_si: tuple[int, ...]
    text_len: int
    frames_inner_clip: int = 20
    conditions: tuple[ConditionBlock, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", tuple(tuple(int(v) for v in s) for s in self.schedule))
        object.__setattr__(self, "scale_ids", tuple(int(v) for v in self.scale_ids))
        object.__setattr__(self, "real_si", tuple(int(v) for v in self.real_si))
        if not self.schedule:
            raise ValueError("PackedSample needs a non-empty schedule")
        if len(self.scale_ids) != len(self.real_si):
            raise ValueError(f"{len(self.scale_ids)} scale_ids but {len(self.real_si)} real_si entries")
        if list(self.scale_ids) != sorted(set(self.scale_ids)):
            raise ValueError(f"scale_ids must be strictly increasing, got {self.scale_ids}")
        for si in self.scale_ids:
            if not 0 <= si < len(self.schedule):
                raise ValueError(f"scale id {si} is outside the schedule of {len(self.schedule)} scales")
        if self.text_len <= 0:
            raise ValueError(f"text_len must be > 0, got {self.text_len}")


@dataclass
class PackedLayout:
    """Everything the model needs to run one packed sequence (built by :func:`build_packed_layout`)."""

    segment_lengths: list[int]  # visual scales (sample-major), texts, then the pad segment if any
    segment_mask: torch.Tensor  # [S, S] bool, query segment -> key segment
    scales: list[Scale]  # the visual scales in packed order
    semantic: list[bool]  # per visual scale: semantic head (True) or detail head
    full_scales: list[Scale]  # per visual scale: the last scale of its sample's schedule (loss weights)
    text_lens: list[int]
    visual_len: int  # every visual token: the scales and any condition blocks
    pad_len: int
    rope: torch.Tensor  # [2, L, head_dim/2]
    scale_offsets: list[int] = field(default_factory=list)  # per visual scale: its first token in the sequence
    _segment_ids: torch.Tensor | None = field(default=None, repr=False)

    @property
    def seq_len(self) -> int:
        return sum(self.segment_lengths)

    @property
    def text_len(self) -> int:
        return sum(self.text_lens)

    def segment_ids(self) -> torch.Tensor:
        """Segment index of every token ``[L]`` (int64)."""
        if self._segment_ids is None:
            lengths = torch.tensor(self.segment_lengths)
            self._segment_ids = torch.repeat_interleave(torch.arange(len(self.segment_lengths)), lengths)
        return self._segment_ids


def build_packed_layout(samples: Sequence[PackedSample], cfg: TransformerConfig) -> PackedLayout:
    """Segments, segment mask, padding and RoPE rows of a packed sequence of ``samples``."""
    if not samples:
        raise ValueError("a packed sequence needs at least one sample")
    seg_lengths: list[int] = []
    scales: list[Scale] = []
    semantic: list[bool] = []
    full: list[Scale] = []
    rope_rows: list[torch.Tensor] = []
    # Per visual segment (scales and condition blocks): owner sample, the visual segments it also sees, and
    # whether it sees its sample's text (condition blocks do not).
    owner: list[int] = []
    sees: list[list[int]] = []
    sees_text: list[bool] = []
    offsets: list[int] = []
    for b, sample in enumerate(samples):
        layout = clip_layout(sample.schedule, sample.frames_inner_clip)
        last = sample.schedule[-1]
        condition_segs = []
        for block in sample.conditions:
            condition_segs.append(len(seg_lengths))
            owner.append(b)
            sees.append([])
            sees_text.append(False)
            seg_lengths.append(block.tokens)
            pos = condition_positions(block.scale, block.rope_scale_id, block.frames, last[1:], cfg.text_maxlen)
            rope_rows.append(rope_table(pos, cfg.head_dim, cfg.rope_theta))
        first_seg = len(seg_lengths)
        seg_of_scale = {si: first_seg + k for k, si in enumerate(sample.scale_ids)}
        for si, rsi in zip(sample.scale_ids, sample.real_si):
            scale = sample.schedule[si]
            info = layout[si]
            refs = list(condition_segs)
            for r in info.ref_sids:
                if r not in seg_of_scale:
                    raise ValueError(f"sample {b}: scale {si} attends scale {r} (last scale of the previous clip), "
                                     f"which is not among the packed scales {list(sample.scale_ids)}")
                refs.append(seg_of_scale[r])
            sees.append(refs)
            sees_text.append(True)
            owner.append(b)
            offsets.append(sum(seg_lengths))
            seg_lengths.append(scale[0] * scale[1] * scale[2])
            scales.append(scale)
            semantic.append(not uses_detail_lfq(scale, cfg.detail_scale_min_tokens))  # training's head rule
            full.append(last)
            pos = visual_positions(scale, rsi, info.frame_ss, last[1:], cfg.text_maxlen, cfg.rope_max_frames)
            rope_rows.append(rope_table(pos, cfg.head_dim, cfg.rope_theta))
    n_vis_seg = len(seg_lengths)
    visual_len = sum(seg_lengths)
    text_lens = [s.text_len for s in samples]
    for length in text_lens:
        if length > cfg.text_maxlen:
            raise ValueError(f"text of {length} tokens exceeds text_maxlen {cfg.text_maxlen}")
        seg_lengths.append(length)
        rope_rows.append(rope_table(text_positions(length), cfg.head_dim, cfg.rope_theta))
    total = sum(seg_lengths)
    pad = (-total) % cfg.pad_to_multiplier
    if pad:
        seg_lengths.append(pad)
        rope_rows.append(pad_table(pad, cfg.head_dim))
    n_seg = len(seg_lengths)
    mask = torch.zeros(n_seg, n_seg, dtype=torch.bool)
    for s in range(n_vis_seg):
        mask[s, s] = True
        if sees_text[s]:
            mask[s, n_vis_seg + owner[s]] = True
        for r in sees[s]:
            mask[s, r] = True
    for b in range(len(samples)):
        mask[n_vis_seg + b, n_vis_seg + b] = True
    return PackedLayout(
        segment_lengths=seg_lengths, segment_mask=mask, scales=scales, semantic=semantic, full_scales=full,
        text_lens=text_lens, visual_len=visual_len, pad_len=pad, rope=torch.cat(rope_rows, dim=1),
        scale_offsets=offsets,
    )
