"""Which scales of a sample one training step trains: the reference's variable-length "outcomes".

With the release flags (``train_with_var_seq_len=1``, ``allow_less_one_elem_in_seq=1``) every
training sample trains a random subset of its space-time pyramid, drawn from a fixed table of
outcomes with probabilities ``video_var_len_prob`` (first N entries, renormalised). With
``sc`` = scales per clip, the tables are (scale indices into the full schedule):

two clips (5 s), ``drop_720p_last_scale=1``::

    0: range(sc)                       first-frame pyramid only (the T2I objective)
    1: range(sc + 8)                   + video scales 0..7
    2: range(sc + 11)                  + video scales 0..10
    3: range(sc + 11) + [sc + 11]
    4: range(sc + 11) + [sc + 12]
    5: range(sc + 8)  + [sc + 13]

two clips, ``drop_720p_last_scale=0``: outcomes 0..4 as above, then ``[sc-1, sc+13]`` and
``[sc-1, sc+14]`` (the last image scale is the context of the video clip).

three clips (10 s): outcomes 0..4 as above, ``range(sc + 11) + [sc + 13]`` (note: 11, not 8, in
upstream's 10 s table), then (6 and 7 identical)
``[sc-1, 2sc-1] + range(2sc, 2sc+11)`` twice, ``[sc-1, 2sc-1, 2sc+11]``, ``[sc-1, 2sc-1, 2sc+12]``,
``[sc-1, 2sc-1, 2sc+13]``.

Every outcome contains the context scale (last scale of the previous clip) of each clip it
trains, so attention never needs an untrained scale.

Deviations from the reference, on purpose:

* an image-only schedule (one clip) trains all its scales; upstream indexes the video table with it
  and crashes with IndexError about 60 % of the time;
* outcomes that name a scale beyond the schedule (upstream's hard-coded +11..+14 offsets on short
  pyramids, e.g. 480p with ``drop_720p_last_scale=0`` or small test schedules) are left out and the
  remaining probabilities renormalised, instead of crashing;
* an optional token budget (for packing several samples into one sequence) keeps only outcomes
  that fit; if none does, the longest prefix of the schedule that fits is trained, as upstream's
  packing truncates a sample to a prefix of its scales.

Randomness comes from the ``torch.Generator`` passed in (upstream: numpy's global RNG).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from infinitystar.config import ConfigError
from infinitystar.generation.schedules import clip_layout, scales_per_clip

# --video_var_len_prob of the release scripts.
VAR_LEN_PROB_480P: tuple[float, ...] = (40, 30, 20, 6, 3, 1, 60, 40, 12, 6, 2)
VAR_LEN_PROB_720P: tuple[float, ...] = (60, 20, 10, 6, 2, 1, 1)
# Which script's table a pixel budget gets: train_720p.sh runs pn 0.90M, train_480p.sh 0.40M. Other budgets (no
# released script) get the 480p table, the only one with outcomes for 10 s (three-clip) schedules.
_VAR_LEN_PROB_BY_PN: dict[str, tuple[float, ...]] = {"0.90M": VAR_LEN_PROB_720P, "0.40M": VAR_LEN_PROB_480P}


def var_len_prob_for(pn: str) -> tuple[float, ...]:
    """The reference's ``video_var_len_prob`` for a model of pixel budget ``pn`` (training.md 3.3 and 9)."""
    return _VAR_LEN_PROB_BY_PN.get(pn, VAR_LEN_PROB_480P)


@dataclass(frozen=True)
class ScaleSubsetConfig:
    """How a training sample's scales are subsampled."""

    # Relative probabilities of the outcomes (the first len(table) entries are used). None (a training config's
    # default) = the release script's table for the pipeline's pixel budget, set by `for_pn` once it is known.
    var_len_prob: tuple[float, ...] | None = VAR_LEN_PROB_480P
    # 1 in both release scripts: the full-resolution video scale of a 2-clip video is never trained.
    drop_720p_last_scale: bool = True
    # False: train every scale of every sample (the golden cases' setting, allow_less_one_elem_in_seq=0).
    var_len: bool = True

    def __post_init__(self) -> None:
        if self.var_len_prob is None:
            return
        object.__setattr__(self, "var_len_prob", tuple(float(p) for p in self.var_len_prob))
        if any(p < 0 for p in self.var_len_prob) or not any(p > 0 for p in self.var_len_prob):
            raise ConfigError(f"scale_subsets.var_len_prob must be non-negative with a positive entry, got "
                              f"{self.var_len_prob}")

    def for_pn(self, pn: str) -> ScaleSubsetConfig:
        """These settings with ``var_len_prob`` filled in: the release script's table for pixel budget ``pn``
        when it is None."""
        return self if self.var_len_prob is not None else dataclasses.replace(self, var_len_prob=var_len_prob_for(pn))


def outcome_table(num_scales: int, scales_in_clip: int, drop_720p_last_scale: bool = True) -> list[list[int]]:
    """The reference's outcome table for a schedule of ``num_scales`` scales, ``scales_in_clip`` per clip.

    Entries may name scales beyond the schedule (upstream's fixed offsets); see
    :func:`valid_outcomes`.
    """
    sc = scales_in_clip
    if sc <= 0 or num_scales <= 0 or num_scales % sc:
        raise ValueError(f"schedule of {num_scales} scales is not a whole number of {sc}-scale clips")
    if num_scales == sc:
        return [list(range(sc))]
    head = [
        list(range(sc)),
        list(range(sc + 8)),
        list(range(sc + 11)),
        list(range(sc + 11)) + [sc + 11],
        list(range(sc + 11)) + [sc + 12],
    ]
    if num_scales == 3 * sc:
        ctx = [sc - 1, 2 * sc - 1]
        return head + [
            list(range(sc + 11)) + [sc + 13],
            ctx + list(range(2 * sc, 2 * sc + 11)),
            ctx + list(range(2 * sc, 2 * sc + 11)),
            ctx + [2 * sc + 11],
            ctx + [2 * sc + 12],
            ctx + [2 * sc + 13],
        ]
    if drop_720p_last_scale:
        return head + [list(range(sc + 8)) + [sc + 13]]
    return head + [[sc - 1, sc + 13], [sc - 1, sc + 14]]


def valid_outcomes(
    num_scales: int, scales_in_clip: int, var_len_prob: Sequence[float], drop_720p_last_scale: bool = True
) -> tuple[list[list[int]], list[float]]:
    """Outcomes that stay inside the schedule, with their renormalised probabilities."""
    table = outcome_table(num_scales, scales_in_clip, drop_720p_last_scale)
    if num_scales == scales_in_clip:
        return table, [1.0]
    if len(var_len_prob) < len(table):
        raise ValueError(f"var_len_prob has {len(var_len_prob)} entries but the {num_scales}-scale schedule "
                         f"has {len(table)} outcomes")
    kept = [(o, float(p)) for o, p in zip(table, var_len_prob) if max(o) < num_scales and p > 0]
    if not kept:
        raise ValueError(f"no outcome of the {num_scales}-scale schedule ({scales_in_clip} per clip) fits in it "
                         f"with probabilities {list(var_len_prob)}")
    total = sum(p for _, p in kept)
    return [o for o, _ in kept], [p / total for _, p in kept]


def _tokens(schedule: Sequence[Sequence[int]], indices: Sequence[int]) -> int:
    return sum(math.prod(schedule[i]) for i in indices)


def longest_prefix_within(schedule: Sequence[Sequence[int]], max_tokens: int) -> list[int]:
    """Indices of the longest prefix of ``schedule`` holding at most ``max_tokens`` tokens."""
    out, used = [], 0
    for si, scale in enumerate(schedule):
        used += math.prod(scale)
        if used > max_tokens:
            break
        out.append(si)
    return out


def sample_scale_subset(
    schedule: Sequence[Sequence[int]],
    config: ScaleSubsetConfig,
    generator: torch.Generator | None = None,
    max_tokens: int | None = None,
) -> list[int]:
    """Draw the sorted indices of the scales of ``schedule`` that this step trains.

    ``max_tokens`` (visual tokens) restricts the draw to outcomes that fit; if none does, the
    longest fitting prefix is returned. Raises ValueError if not even the first scale fits.
    """
    if not schedule:
        raise ValueError("empty scale schedule")
    num = len(schedule)
    if not config.var_len:
        candidates, probs = [list(range(num))], [1.0]
    else:
        if config.var_len_prob is None:
            raise ValueError("ScaleSubsetConfig.var_len_prob is None: resolve it with for_pn(pn) first")
        candidates, probs = valid_outcomes(num, scales_per_clip(schedule), config.var_len_prob,
                                           config.drop_720p_last_scale)
    if max_tokens is not None:
        fits = [(o, p) for o, p in zip(candidates, probs) if _tokens(schedule, o) <= max_tokens]
        if not fits:
            prefix = longest_prefix_within(schedule, max_tokens)
            if not prefix:
                raise ValueError(f"token budget {max_tokens} is smaller than the first scale {tuple(schedule[0])}")
            return prefix
        candidates, probs = [o for o, _ in fits], [p for _, p in fits]
    if len(candidates) == 1:
        return sorted(candidates[0])
    pick = int(torch.multinomial(torch.tensor(probs, dtype=torch.float64), 1, generator=generator))
    return sorted(candidates[pick])


def remap_refs(schedule: Sequence[Sequence[int]], selected: Sequence[int], frames_inner_clip: int = 20,
               context_from_largest_no: int = 1) -> list[tuple[int, ...]]:
    """For each selected scale, its context scales as positions in ``selected``.

    Raises ValueError if a selected scale's context scale was not selected (the attention mask
    would then reference a scale that is not in the sequence).
    """
    layout = clip_layout(schedule, frames_inner_clip, context_from_largest_no)
    position = {si: k for k, si in enumerate(selected)}
    out = []
    for si in selected:
        missing = [r for r in layout[si].ref_sids if r not in position]
        if missing:
            raise ValueError(f"scale {si} is selected without its context scale(s) {missing}")
        out.append(tuple(position[r] for r in layout[si].ref_sids))
    return out


@dataclass(frozen=True)
class PackPlan:
    """The scales each sample contributes to one packed training sequence."""

    selected: list[list[int]]  # per sample, sorted scale indices into its schedule
    visual_tokens: list[int]  # per sample
    total_tokens: int  # visual + text of all samples (before padding)


def plan_packed_step(
    schedules: Sequence[Sequence[Sequence[int]]],
    text_lens: Sequence[int],
    config: ScaleSubsetConfig,
    generator: torch.Generator | None = None,
    max_tokens: int | None = None,
) -> PackPlan:
    """Draw the scale subsets of several samples sharing one sequence of at most ``max_tokens`` tokens.

    Samples are visited in order; each draws from the outcomes that fit in what the earlier
    samples left (text tokens count against the budget, as upstream's ``tokens_remain``).
    """
    if len(schedules) != len(text_lens):
        raise ValueError(f"{len(schedules)} schedules but {len(text_lens)} text lengths")
    if not schedules:
        raise ValueError("plan_packed_step needs at least one sample")
    selected, visual = [], []
    remaining = None if max_tokens is None else int(max_tokens)
    for k, (schedule, text_len) in enumerate(zip(schedules, text_lens)):
        budget = None
        if remaining is not None:
            budget = remaining - int(text_len)
            if budget <= 0:
                raise ValueError(f"token budget {max_tokens} is exhausted before sample {k} "
                                 f"(its text alone needs {text_len})")
        subset = sample_scale_subset(schedule, config, generator, budget)
        n = _tokens(schedule, subset)
        selected.append(subset)
        visual.append(n)
        if remaining is not None:
            remaining -= n + int(text_len)
    return PackPlan(selected, visual, sum(visual) + sum(int(t) for t in text_lens))
