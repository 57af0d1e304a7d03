"""Packed-training attention that computes only the (query, key) pairs a segment rule lets through.

The dense SDPA path of :func:`~infinitystar.transformer.attention.attend` scores all ``L^2`` pairs of a packed
sequence and masks most of them away: at the official schedules only 20-26 % are visible (a scale sees itself,
its sample's text and at most the last scale of the previous clip), so it does 4-5x the needed work. Here the
query segments that see the same key set form a *group*; each group's queries and keys are gathered and run
through one unmasked SDPA, and the outputs are put back in token order. Rows that see nothing (padding) are
zero, as in the dense path and FlexAttention.

Gathering is autograd-friendly: the sequence is cut once (``split``, views) at every boundary any group needs,
and a group's tokens are the concatenation of its pieces (no copy when they are one piece). The backward of a
split is one concatenation of the pieces' gradients, where slicing per group would allocate a zero-filled
``[B, H, L, D]`` gradient per group. Only when the segment ids change so often along the sequence that the
pieces would be counted in thousands (not the packed layout, whose segments are contiguous) do groups fall
back to ``index_select`` of token indices.

The plan (groups, pieces) depends only on the mask; it is built once per :class:`SegmentMask` object and
reused by every block of a forward (:func:`sparse_attention_plan`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


class MaskView(Protocol):
    """What this module reads of :class:`~infinitystar.transformer.attention.SegmentMask` (defined there; this
    module sits below it, so that attention.py can import it)."""

    segment_ids: torch.Tensor
    rule: torch.Tensor

    @property
    def length(self) -> int: ...


def kv_groups_in_kernel(q_BHLD: torch.Tensor, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor) -> bool:
    """Whether SDPA should expand the kv heads itself (``enable_gqa``) rather than take repeated K/V.

    Always on accelerators (no repeated K/V in memory). On CPU only when no K/V gradient will be taken: the
    forward is bit-identical either way, but the backward of the repeat sums a group's K/V gradients in
    another order than the kernel does, which would move the CPU training numbers by a rounding.
    """
    if q_BHLD.device.type != "cpu":
        return True
    return not (torch.is_grad_enabled() and (k_BHLD.requires_grad or v_BHLD.requires_grad))


# Above this many runs of equal segment ids, groups gather by token index instead of by slices.
MAX_SLICED_RUNS = 1024


@dataclass(frozen=True)
class _SlicedGroup:
    q_pieces: tuple[int, ...]  # indices into the query pieces, in token order
    q_lengths: tuple[int, ...]  # their lengths
    k_atoms: tuple[int, ...]  # indices into the key atoms, in token order


@dataclass(frozen=True)
class _IndexedGroup:
    q_index: torch.Tensor  # [n_q] int64 token positions, ascending
    k_index: torch.Tensor  # [n_k] int64 token positions, ascending


@dataclass(frozen=True)
class SparsePlan:
    """How :func:`segment_sparse_attention` cuts one mask's sequence into unmasked attention problems.

    Sliced plans (contiguous segments) use ``q_piece_lengths`` (the query side cut into runs of one group
    each; ``piece_group[i]`` is the group of piece i, -1 for rows that see nothing), ``atom_lengths`` (the
    key side cut at every boundary of a group's visible key runs) and ``groups`` of :class:`_SlicedGroup`.
    Indexed plans use ``groups`` of :class:`_IndexedGroup` and ``inverse`` (token position -> row of the
    concatenated group outputs followed by the blind rows).
    """

    length: int
    groups: tuple[_SlicedGroup, ...] | tuple[_IndexedGroup, ...]
    visible_pairs: int  # sum over groups of queries x keys: the pairs computed
    blind_rows: int
    sliced: bool
    q_piece_lengths: tuple[int, ...] = ()
    piece_group: tuple[int, ...] = ()
    atom_lengths: tuple[int, ...] = ()
    inverse: torch.Tensor | None = None

    @property
    def visible_fraction(self) -> float:
        """Fraction of the ``L^2`` (query, key) pairs that are computed (the dense path computes all)."""
        return self.visible_pairs / max(self.length, 1) ** 2


def _build_plan(segment_ids: torch.Tensor, rule: torch.Tensor) -> SparsePlan:
    if segment_ids.dim() != 1 or segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise ValueError(f"segment_ids must be a 1-D integer tensor, got {segment_ids.dtype} "
                         f"{tuple(segment_ids.shape)}")
    if rule.dim() != 2 or rule.shape[0] != rule.shape[1]:
        raise ValueError(f"the segment rule must be a square [S, S] matrix, got {tuple(rule.shape)}")
    L, S = int(segment_ids.shape[0]), int(rule.shape[0])
    seg = segment_ids.to(torch.int64)
    if L and (int(seg.min()) < 0 or int(seg.max()) >= S):
        raise ValueError(f"segment ids range over [{int(seg.min())}, {int(seg.max())}], outside the rule's {S} "
                         "segments")
    run_seg_t, run_len_t = torch.unique_consecutive(seg, return_counts=True)
    present = torch.zeros(S, dtype=torch.bool, device=seg.device)
    present[run_seg_t] = True
    # A segment only sees keys that exist: allowed segments without tokens contribute nothing.
    eff = rule.to(torch.bool) & present[None, :]
    eff_rows = eff.cpu().tolist()
    # Present segments with the same non-empty visible set share one group; the others see nothing.
    group_of_seg: dict[int, int] = {}
    group_rows: list[list[bool]] = []
    row_key: dict[tuple[bool, ...], int] = {}
    for s in run_seg_t.cpu().tolist():
        if s in group_of_seg or not any(eff_rows[s]):
            continue
        key = tuple(eff_rows[s])
        group_of_seg[s] = row_key.setdefault(key, len(group_rows))
        if group_of_seg[s] == len(group_rows):
            group_rows.append(eff_rows[s])
    n_runs = int(run_seg_t.shape[0])
    if n_runs <= MAX_SLICED_RUNS:
        return _sliced_plan(L, run_seg_t.cpu().tolist(), run_len_t.cpu().tolist(), group_of_seg, group_rows)
    return _indexed_plan(seg, S, group_of_seg, group_rows)


def _sliced_plan(L: int, run_seg: list[int], run_len: list[int], group_of_seg: dict[int, int],
                 group_rows: list[list[bool]]) -> SparsePlan:
    starts = [0]
    for n in run_len:
        starts.append(starts[-1] + n)
    # Query side: consecutive runs of one group (or of blind rows) merge into one piece.
    piece_len: list[int] = []
    piece_group: list[int] = []
    for s, n in zip(run_seg, run_len):
        g = group_of_seg.get(s, -1)
        if piece_group and piece_group[-1] == g:
            piece_len[-1] += n
        else:
            piece_len.append(n)
            piece_group.append(g)
    # Key side: each group's visible runs, merged where adjacent, as [start, end) token spans.
    spans: list[list[tuple[int, int]]] = []
    for row in group_rows:
        mine: list[tuple[int, int]] = []
        for r, s in enumerate(run_seg):
            if not row[s]:
                continue
            if mine and mine[-1][1] == starts[r]:
                mine[-1] = (mine[-1][0], starts[r + 1])
            else:
                mine.append((starts[r], starts[r + 1]))
        spans.append(mine)
    # Atoms: the key side cut at every span boundary of every group; a span is a run of whole atoms.
    bounds = sorted({0, L} | {b for mine in spans for span in mine for b in span})
    atom_of_bound = {b: i for i, b in enumerate(bounds)}
    atom_lengths = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    pieces_of_group: list[list[int]] = [[] for _ in group_rows]
    for i, g in enumerate(piece_group):
        if g >= 0:
            pieces_of_group[g].append(i)
    groups = []
    visible = 0
    for g, mine in enumerate(spans):
        atoms = tuple(a for lo, hi in mine for a in range(atom_of_bound[lo], atom_of_bound[hi]))
        q_lengths = tuple(piece_len[i] for i in pieces_of_group[g])
        groups.append(_SlicedGroup(tuple(pieces_of_group[g]), q_lengths, atoms))
        visible += sum(q_lengths) * sum(hi - lo for lo, hi in mine)
    blind = sum(n for n, g in zip(piece_len, piece_group) if g < 0)
    return SparsePlan(length=L, groups=tuple(groups), visible_pairs=visible, blind_rows=blind, sliced=True,
                      q_piece_lengths=tuple(piece_len), piece_group=tuple(piece_group), atom_lengths=atom_lengths)


def _indexed_plan(seg: torch.Tensor, S: int, group_of_seg: dict[int, int],
                  group_rows: list[list[bool]]) -> SparsePlan:
    L = int(seg.shape[0])
    dev = seg.device
    seg_group = torch.full((S,), -1, dtype=torch.int64)
    for s, g in group_of_seg.items():
        seg_group[s] = g
    token_group = seg_group.to(dev)[seg]
    groups = []
    order = []
    visible = 0
    for g, row in enumerate(group_rows):
        q_index = torch.nonzero(token_group == g).flatten()
        k_index = torch.nonzero(torch.tensor(row, device=dev)[seg]).flatten()
        groups.append(_IndexedGroup(q_index, k_index))
        order.append(q_index)
        visible += int(q_index.shape[0]) * int(k_index.shape[0])
    blind_index = torch.nonzero(token_group < 0).flatten()
    order.append(blind_index)
    perm = torch.cat(order)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(L, device=dev)
    return SparsePlan(length=L, groups=tuple(groups), visible_pairs=visible, blind_rows=int(blind_index.shape[0]),
                      sliced=False, inverse=inverse)


# id(mask) -> (weak reference to the mask, its segment ids and rule with their versions, plan). An entry leaves
# with its mask (weakref.finalize); SegmentMask is an unhashable dataclass, hence the id key.
_PLANS: dict[int, tuple[weakref.ref, torch.Tensor, int, torch.Tensor, int, SparsePlan]] = {}


def sparse_attention_plan(mask: MaskView) -> SparsePlan:
    """The grouping plan of ``mask``, built on first use and cached for the mask's lifetime.

    The cache checks that the mask still holds the same segment-id and rule tensors, unmodified in place
    (tensor version counters), so a mask whose tensors were replaced or edited gets a fresh plan.
    """
    seg, rule = mask.segment_ids, mask.rule
    entry = _PLANS.get(id(mask))
    if (entry is not None and entry[0]() is mask and entry[1] is seg and entry[2] == seg._version
            and entry[3] is rule and entry[4] == rule._version):
        return entry[5]
    plan = _build_plan(seg, rule)
    if entry is None or entry[0]() is not mask:
        weakref.finalize(mask, _PLANS.pop, id(mask), None)
    _PLANS[id(mask)] = (weakref.ref(mask), seg, seg._version, rule, rule._version, plan)
    return plan


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def segment_sparse_attention(
    q_BHLD: torch.Tensor,
    k_BHLD: torch.Tensor,
    v_BHLD: torch.Tensor,
    mask: MaskView,
    scale: float,
) -> torch.Tensor:
    """Self-attention of a packed sequence under ``mask``, computing only the visible pairs; ``[B, H, L, Dv]``.

    Same contract as ``attend(q, k, v, mask, "sdpa")``: query token i sees key token j iff
    ``rule[seg[i], seg[j]]``, rows that see nothing are zero, ``k``/``v`` may have fewer heads (kv head j serves
    query heads ``j*g .. j*g+g-1``). The results equal the dense path's up to float32 rounding (other key
    orders and lengths in the sums). GQA follows the dense path: the kernel expands the kv heads
    (``enable_gqa``), except on CPU when K/V need a gradient, where they are repeated first.

    A row whose rule allows only segments without tokens sees nothing and is zero too (the dense path would leave
    it fully masked: NaN). If no row sees anything the result is a constant zero tensor (no autograd graph).
    """
    if q_BHLD.dim() != 4 or k_BHLD.dim() != 4 or v_BHLD.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, L, D], got {tuple(q_BHLD.shape)}, {tuple(k_BHLD.shape)}, "
                         f"{tuple(v_BHLD.shape)}")
    B, heads, L, _ = q_BHLD.shape
    kv_heads = k_BHLD.shape[1]
    if k_BHLD.shape[:3] != (B, kv_heads, L) or v_BHLD.shape[:3] != (B, kv_heads, L):
        raise ValueError(f"k and v must be [{B}, kv_heads, {L}, D] like q {tuple(q_BHLD.shape)}, got "
                         f"{tuple(k_BHLD.shape)} and {tuple(v_BHLD.shape)}")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    if mask.length != L:
        raise ValueError(f"the mask covers {mask.length} tokens, the sequence has {L}")
    plan = sparse_attention_plan(mask)
    gqa = heads != kv_heads
    if gqa and not kv_groups_in_kernel(q_BHLD, k_BHLD, v_BHLD):
        k_BHLD = k_BHLD.repeat_interleave(heads // kv_heads, dim=1)
        v_BHLD = v_BHLD.repeat_interleave(heads // kv_heads, dim=1)
        gqa = False

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)

    def zeros(n: int) -> torch.Tensor:
        return q_BHLD.new_zeros(B, heads, n, v_BHLD.shape[-1])

    if not plan.sliced:
        outs = [attention(q_BHLD.index_select(2, g.q_index), k_BHLD.index_select(2, g.k_index),
                          v_BHLD.index_select(2, g.k_index)) for g in plan.groups]
        if plan.blind_rows:
            outs.append(zeros(plan.blind_rows))
        return _join(outs).index_select(2, plan.inverse)

    q_pieces = q_BHLD.split(plan.q_piece_lengths, dim=2)
    k_atoms = k_BHLD.split(plan.atom_lengths, dim=2)
    v_atoms = v_BHLD.split(plan.atom_lengths, dim=2)
    out_pieces: list[torch.Tensor | None] = [None] * len(plan.q_piece_lengths)
    for g in plan.groups:
        o = attention(_join([q_pieces[i] for i in g.q_pieces]), _join([k_atoms[a] for a in g.k_atoms]),
                      _join([v_atoms[a] for a in g.k_atoms]))
        parts = (o,) if len(g.q_pieces) == 1 else o.split(g.q_lengths, dim=2)
        for i, part in zip(g.q_pieces, parts):
            out_pieces[i] = part
    return _join([p if p is not None else zeros(n) for p, n in zip(out_pieces, plan.q_piece_lengths)])
