"""4-axis rotary position embedding: (scale step, frame, height, width).

The ``head_dim / 2`` rotary pairs of every head are split into four equal groups, in the order
[scale-step axis | frame axis | height axis | width axis]. All four share one inverse-frequency
vector ``theta ** (-k / (head_dim / 8))``. Pairs are interleaved (``x[2i], x[2i+1]``, GPT-J style),
not the rotate-half layout of Hugging Face Qwen.

Positions (see :func:`text_positions`, :func:`visual_positions`):

* text token p of a prompt: ``(p, 0, 0, 0)``;
* visual token (f, i, j) of a step: ``(text_maxlen + real_si, frame_ss + f, round(i*H/h), round(j*W/w))``
  where ``real_si`` counts every repetition executed before (the "step" index), ``(H, W)`` is the last
  scale of the whole schedule and the rounding is half-to-even on a float32 product, exactly as the
  reference forms it (this matters for non-square schedules: 2.5 -> 2).

Angles are formed as ``float32(position) * float32(inv_freq)`` and cos/sin taken in float32, which
makes the tables bit-identical to the reference's (it builds them on the CPU in float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The shared per-axis inverse frequencies, ``[head_dim // 8]`` float32."""
    if head_dim % 8:
        raise ValueError(f"4-axis RoPE needs head_dim/2 divisible by 4, got head_dim={head_dim}")
    n = head_dim // 8
    return 1.0 / (theta ** (torch.arange(n, dtype=torch.float32) / n))


def text_positions(length: int) -> torch.Tensor:
    """Positions ``[length, 4]`` (int64) of a prompt's tokens: ``(p, 0, 0, 0)``."""
    pos = torch.zeros(length, 4, dtype=torch.long)
    pos[:, 0] = torch.arange(length)
    return pos


def visual_positions(
    scale: Sequence[int],
    real_si: int,
    frame_ss: int,
    full_hw: Sequence[int],
    text_maxlen: int,
    max_frames: int | None = None,
) -> torch.Tensor:
    """Positions ``[t*h*w, 4]`` (int64) of one visual step, tokens in (t, h, w) row-major order.

    ``full_hw`` is the (H, W) of the last scale of the schedule; ``max_frames`` (optional) is the
    number of latent frames the model's RoPE covers -- a step reaching past it raises.
    """
    t, h, w = (int(v) for v in scale)
    H, W = (int(v) for v in full_hw)
    if min(t, h, w) <= 0:
        raise ValueError(f"scale {tuple(scale)} must have positive (t, h, w)")
    if real_si < 0 or frame_ss < 0:
        raise ValueError(f"real_si={real_si} and frame_ss={frame_ss} must be >= 0")
    if max_frames is not None and frame_ss + t > max_frames:
        raise ValueError(f"scale {tuple(scale)} at frame_ss={frame_ss} reaches latent frame {frame_ss + t - 1}, "
                         f"but the RoPE covers only {max_frames} latent frames (rope_max_frames)")
    # int64 arange times a Python float -> float32 product, then round-half-to-even: the reference's recipe.
    ys = torch.round(torch.arange(h) * (H / h)).long()
    xs = torch.round(torch.arange(w) * (W / w)).long()
    fs = torch.arange(t) + frame_ss
    grid = torch.stack(torch.meshgrid(fs, ys, xs, indexing="ij"), dim=-1).reshape(-1, 3)
    step = torch.full((grid.shape[0], 1), text_maxlen + real_si, dtype=torch.long)
    return torch.cat([step, grid], dim=1)


def condition_positions(scale: Sequence[int], rope_scale_id: int, frames: Sequence[int], full_hw: Sequence[int],
                        text_maxlen: int) -> torch.Tensor:
    """Positions ``[t*h*w, 4]`` of an interactive condition block (``scale`` = (t, h, w)) on scale id
    ``rope_scale_id`` whose t frames carry the explicit, possibly non-contiguous, frame ids ``frames``.

    The generation loop's condition passes and the training sequence of an interactive turn both take their RoPE
    rows from here, so the two cannot drift apart.
    """
    t = int(scale[0])
    if len(frames) != t:
        raise ValueError(f"condition of {t} frames given {len(frames)} frame positions")
    per_frame = visual_positions((1, scale[1], scale[2]), rope_scale_id, 0, full_hw, text_maxlen)
    blocks = []
    for f in frames:
        p = per_frame.clone()
        p[:, 1] = int(f)
        blocks.append(p)
    return torch.cat(blocks)


def rope_table(positions_N4: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """cos/sin table ``[2, N, head_dim // 2]`` float32 for positions ``[N, 4]``; ``[0]`` cos, ``[1]`` sin.

    Pair index ``a * head_dim/8 + k`` rotates by ``pos[a] * inv_freq[k]``.
    """
    if positions_N4.dim() != 2 or positions_N4.shape[1] != 4:
        raise ValueError(f"positions must be [N, 4], got {tuple(positions_N4.shape)}")
    freqs = inv_freq(head_dim, theta)
    angles = (positions_N4.float()[:, :, None] * freqs[None, None, :]).reshape(positions_N4.shape[0], -1)
    return torch.stack([torch.cos(angles), torch.sin(angles)])


def pad_table(length: int, head_dim: int) -> torch.Tensor:
    """Table rows for padding tokens: cos = sin = 0, so their q and k become exactly zero."""
    return torch.zeros(2, length, head_dim // 2)


def apply_rope(x_BHLD: torch.Tensor, table_2LD: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [..., L, D]`` by the table ``[2, L, D/2]`` (or broadcastable).

    float32 inputs use the plain formula. Low-precision inputs reproduce the reference's in-place
    update, which rounds twice: ``x0' = low(float(low(x0*cos)) - x1*sin)`` (and likewise for x1,
    with the original x0), the products with sin taken in float32.
    """
    cos, sin = table_2LD[0].to(x_BHLD.device), table_2LD[1].to(x_BHLD.device)
    pairs = x_BHLD.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    if x_BHLD.dtype == torch.float32:
        out0 = x0 * cos - x1 * sin
        out1 = x1 * cos + x0 * sin
    else:
        dt = x_BHLD.dtype
        t1 = x1.float() * sin
        t2 = x0.float() * sin
        out0 = ((x0.float() * cos).to(dt).float() - t1).to(dt)
        out1 = ((x1.float() * cos).to(dt).float() + t2).to(dt)
    return torch.stack([out0, out1], dim=-1).flatten(-2)


class StepRopeTables:
    """The RoPE tables of a generation's visual steps, each scale's frame/height/width part computed once.

    A scale runs several times (its repetitions) at successive scale-axis positions ``text_maxlen + real_si``; only
    that one column group changes between them, and it is the same for every token of the step. So the table of a
    (scale, first frame) is built once with :func:`rope_table` and every later step of it only recomputes the
    ``head_dim / 8`` scale-axis angles. Each entry is formed exactly as :func:`rope_table` forms it (float32 position
    times float32 frequency, cos/sin in float32), so the tables are bit-identical. Tables live on ``device``.
    ``reuse=False`` builds every table from scratch (the former per-step path; benchmarks time both).
    """

    def __init__(self, head_dim: int, theta: float, text_maxlen: int, device: torch.device | str = "cpu",
                 reuse: bool = True) -> None:
        self.head_dim, self.theta, self.text_maxlen, self.reuse = head_dim, theta, text_maxlen, reuse
        self.device = torch.device(device)
        self._freqs = inv_freq(head_dim, theta)
        self._tables: dict[tuple, torch.Tensor] = {}

    def __call__(self, scale: Sequence[int], real_si: int, frame_ss: int, full_hw: Sequence[int]) -> torch.Tensor:
        """The table ``[2, t*h*w, head_dim // 2]`` of the positions ``visual_positions(scale, real_si, ...)``."""
        key = (tuple(int(v) for v in scale), int(frame_ss), tuple(int(v) for v in full_hw))
        table = self._tables.get(key)
        if table is None:
            pos = visual_positions(scale, real_si, frame_ss, full_hw, self.text_maxlen)
            table = rope_table(pos, self.head_dim, self.theta).to(self.device)
            if self.reuse:
                self._tables[key] = table
            return table
        if real_si < 0:
            raise ValueError(f"real_si={real_si} must be >= 0")
        angle = torch.tensor(float(self.text_maxlen + real_si), dtype=torch.float32) * self._freqs
        step = torch.stack([torch.cos(angle), torch.sin(angle)]).to(self.device)
        n = self._freqs.shape[0]
        out = table.clone()
        out[:, :, :n] = step[:, None, :]
        return out
