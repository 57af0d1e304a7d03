"""Parity of the multi-scale BSQ tokenizer with the reference (golden README sections 8, 9).

Every case folder under golden/vae/ is one test id. From the stored ``P latent`` and the case's schedule,
repetitions and semantic/detail threshold (config.json), the tokenizer must reproduce every step's BSQ input
and output (atol 1e-5) and bit labels (exact), each clip's initial sum and the summed codes (atol 1e-5);
decoding the summed codes with the case's VAE must give ``P decoded_from_summed_codes`` (atol 1e-4).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_cases
from infinitystar.config import QuantizerConfig
from infinitystar.generation.schedules import clip_layout
from infinitystar.vae.multiscale import (
    CodeAccumulator,
    bits_to_summed_codes,
    build_steps,
    encode_to_bits,
    schedule_repetitions,
)

RUNTIME_KEY = "runtime_args_for_video_encode / video_decode (infinity/schedules/infinity_elegant.py)"
GLOBAL_KEY = "global_args (InfinityStar Args fields read by the VAE builder)"
CODE_ATOL = 1e-5  # section 9: "x_BLC, summed codes, BSQ inputs/outputs atol 1e-5"
PIXEL_ATOL = 1e-4  # section 9: "VAE encoder/decoder outputs atol 1e-4"
STEP_KEY = re.compile(r"^step(\d+)\.(lfq_input|lfq_quantized|bit_labels)$")
CLIP_KEY = re.compile(r"^clip(\d+)\.initial_summed_code$")

CASES = golden_cases("vae")


class Case:
    def __init__(self, case_dir: Path) -> None:
        self.dir = case_dir
        self.config = json.loads((case_dir / "config.json").read_text())
        self.tensors = load_file(str(case_dir / "case.safetensors"))
        rt = self.config[RUNTIME_KEY]
        ga = self.config[GLOBAL_KEY]
        self.runtime = rt
        self.qconfig = QuantizerConfig(
            semantic_dim=ga["semantic_scale_dim"],
            detail_dim=ga["detail_scale_dim"],
            detail_scale_min_tokens=rt["detail_scale_min_tokens"],
        )
        self.frames_inner_clip = rt["frames_inner_clip"]

    def subcases(self) -> list[str]:
        return sorted({k.split(".", 1)[0] for k in self.tensors if k.startswith(("video.", "image."))})

    def schedule(self, p: str) -> list[tuple[int, int, int]]:
        return [tuple(s) for s in self.config["cases"][p]["scale_schedule"]]

    def repetitions(self, p: str) -> list[int]:
        rt = self.runtime
        return schedule_repetitions(self.schedule(p), rt["image_scale_repetition"], rt["video_scale_repetition"])

    def names(self, p: str) -> list[str]:
        return [k[len(p) + 1:] for k in self.tensors if k.startswith(p + ".")]


@pytest.fixture(scope="module", params=CASES, ids=[p.name for p in CASES])
def case(request) -> Case:
    return Case(request.param)


def _close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != golden {tuple(want.shape)}"
    diff = (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
    assert diff <= atol, f"{name}: max abs diff {diff:.3e} > atol {atol:.0e}"


def _equal_bits(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != golden {tuple(want.shape)}"
    n_diff = int((got.long() != want.long()).sum())
    assert n_diff == 0, f"{name}: {n_diff} of {want.numel()} bits differ"


def test_steps_and_layout_match_config(case):
    """Our step list (scale, repeat, bit width) and clip layout are the reference's, and the file holds no
    step beyond it."""
    for p in case.subcases():
        cfg = case.config["cases"][p]
        sched = case.schedule(p)
        steps = build_steps(sched, case.repetitions(p), case.qconfig, case.frames_inner_clip)
        want = [(s["step"], s["scale_index"], s["repeat_index"], tuple(s["scale"]), s["bits"]) for s in cfg["steps"]]
        got = [(s.index, s.scale_index, s.repeat_index, s.scale, s.bits) for s in steps]
        assert got == want, f"{p}: step list differs from cases.{p}.steps"
        for s, ref in zip(steps, cfg["steps"]):
            assert ("detail" if s.bits == case.qconfig.detail_dim else "semantic") == ref["lfq"]
        layout = clip_layout(sched, case.frames_inner_clip)
        for si, info in enumerate(layout):
            ref = cfg["scale_pack_info"][str(si)]
            assert (info.clip_id, info.frame_ss, info.frame_ee) == (ref["clipid"], ref["frame_ss"], ref["frame_ee"])
        for name in case.names(p):
            m = STEP_KEY.match(name)
            if m:
                assert int(m.group(1)) < len(steps), f"{p}.{name}: no such step in our schedule"


def test_encode_matches_golden(case):
    for p in case.subcases():
        t = {n: case.tensors[f"{p}.{n}"] for n in case.names(p)}
        sched, reps = case.schedule(p), case.repetitions(p)
        enc = encode_to_bits(t["latent"], sched, reps, case.qconfig, frames_inner_clip=case.frames_inner_clip,
                             return_lfq=True)
        assert enc.lfq_inputs is not None and enc.quantized is not None
        checked = 0
        for name, want in t.items():
            m = STEP_KEY.match(name)
            if not m:
                continue
            k, kind = int(m.group(1)), m.group(2)
            if kind == "bit_labels":
                _equal_bits(f"{p}.{name}", enc.bits[k], want)
            else:
                got = enc.lfq_inputs[k] if kind == "lfq_input" else enc.quantized[k]
                _close(f"{p}.{name}", got, want, CODE_ATOL)
            checked += 1
        assert checked == 3 * len(enc.steps), f"{p}: expected 3 tensors per step, the file holds {checked}"

        clip_keys = [n for n in t if CLIP_KEY.match(n)]
        assert len(clip_keys) == len(enc.clip_initial_sums)
        for name in clip_keys:
            k = int(CLIP_KEY.match(name).group(1))
            _close(f"{p}.{name}", enc.clip_initial_sums[k], t[name], CODE_ATOL)

        # The encoder's own running sum (straight-through codes) and the decode path from its bits.
        _close(f"{p}.summed_codes (encoder sum)", enc.summed_codes, t["summed_codes"], CODE_ATOL)
        summed = bits_to_summed_codes(enc.bits, sched, reps, case.qconfig, frames_inner_clip=case.frames_inner_clip)
        _close(f"{p}.summed_codes (from our bits)", summed, t["summed_codes"], CODE_ATOL)


def test_summed_codes_from_golden_bits(case):
    """video_decode's reconstruction from the stored labels, batch and incremental (generation-loop) forms."""
    for p in case.subcases():
        sched, reps = case.schedule(p), case.repetitions(p)
        steps = build_steps(sched, reps, case.qconfig, case.frames_inner_clip)
        bits = [case.tensors[f"{p}.step{k:02d}.bit_labels"].long() for k in range(len(steps))]
        want = case.tensors[f"{p}.summed_codes"]
        _close(f"{p}.summed_codes", bits_to_summed_codes(bits, sched, reps, case.qconfig,
                                                         frames_inner_clip=case.frames_inner_clip), want, CODE_ATOL)
        acc = CodeAccumulator(sched, reps, case.qconfig, frames_inner_clip=case.frames_inner_clip)
        for b in bits:
            acc.add_bits(b)
        _close(f"{p}.summed_codes (accumulator)", acc.summed_codes, want, CODE_ATOL)


def test_decoded_from_summed_codes(case):
    """``video_decode``: the VAE decodes the summed codes of the stored labels, clamped to [-1, 1]."""
    from infinitystar.checkpoints import load_vae
    from test_vae_golden import vae_config_from_case

    model = load_vae(case.dir / "weights.safetensors", vae_config_from_case(case.dir))
    for p in case.subcases():
        sched, reps = case.schedule(p), case.repetitions(p)
        n_steps = len(build_steps(sched, reps, case.qconfig, case.frames_inner_clip))
        bits = [case.tensors[f"{p}.step{k:02d}.bit_labels"] for k in range(n_steps)]
        summed = bits_to_summed_codes(bits, sched, reps, case.qconfig, frames_inner_clip=case.frames_inner_clip)
        with torch.no_grad():
            video = model.decode(summed).clamp(-1, 1)
        _close(f"{p}.decoded_from_summed_codes", video, case.tensors[f"{p}.decoded_from_summed_codes"], PIXEL_ATOL)


INFER = [d for d in golden_cases("transformer") if (d / "infer.safetensors").is_file()]


@pytest.mark.parametrize("case_dir", INFER, ids=[d.name for d in INFER])
def test_generation_summed_codes_from_sampled_bits(case_dir):
    """Golden README section 7 "Codes": the running sums of a KV-cached generation, from its sampled bits
    (clip 0 at the clip-0 full scale, video clips at the last scale) equal ``infer.summed_codes``."""
    config = json.loads((case_dir / "config.json").read_text())
    args, infer = config["other_args"], config["cases"]["infer"]
    tensors = load_file(str(case_dir / "infer.safetensors"))
    qc = QuantizerConfig(semantic_dim=args["semantic_scale_dim"], detail_dim=args["detail_scale_dim"],
                         detail_scale_min_tokens=args["detail_scale_min_tokens"])
    sched = [tuple(s) for s in infer["scale_schedule"]]
    reps = schedule_repetitions(sched, args["image_scale_repetition"], args["video_scale_repetition"])
    acc = CodeAccumulator(sched, reps, qc, frames_inner_clip=args["frames_inner_clip"])
    assert len(acc.steps) == infer["num_steps"]
    assert [(s.scale_index, s.repeat_index) for s in acc.steps] == [
        (s["scale_index"], s["repeat_index"]) for s in infer["steps"]]
    for k in range(len(acc.steps)):
        nxt = acc.add_bits(tensors[f"infer.step{k:02d}.bits"])
        if nxt is not None:  # the next input has the next step's scale
            assert tuple(nxt.shape[2:]) == acc.steps[k + 1].scale
    want = tensors["infer.summed_codes"]
    assert list(want.shape) == infer["summed_codes_shape"]
    _close("infer.summed_codes", acc.summed_codes, want, CODE_ATOL)
