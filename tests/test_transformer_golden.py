"""Parity of the transformer with the reference's golden cases (golden README sections 6, 7, 9).

Every case folder under golden/transformer/ is one test id. The model is built from the case's
config.json alone and loaded strictly through the official key mapping; every tensor the case
holds that the model computes is compared with the README's section-9 tolerances.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_cases
from infinitystar.checkpoints import (
    load_safetensors,
    transformer_key_to_official,
    transformer_state_dict_from_official,
)
from infinitystar.config import QuantizerConfig, TransformerConfig
from infinitystar.generation.sampling import apply_temperature, guide_logits
from infinitystar.generation.schedules import clip_layout, scales_per_clip, uses_semantic_head
from infinitystar.train.loss import LossWeighting, bit_loss_per_token, reduce_loss
from infinitystar.transformer.model import InfinityStarTransformer
from infinitystar.transformer.sequence import PackedSample, build_packed_layout
from infinitystar.vae.multiscale import CodeAccumulator, schedule_repetitions

CASES = golden_cases("transformer")
TRAIN_FILES = (("train_video.safetensors", "video"), ("train_image.safetensors", "image"))


def _config(case: Path) -> dict:
    return json.loads((case / "config.json").read_text())


def _model_config(c: dict) -> TransformerConfig:
    a, kw, oa = c["resulting_architecture"], c["constructor_kwargs"], c["other_args"]
    return TransformerConfig(
        depth=a["depth"], embed_dim=a["embed_dim"], num_heads=a["num_heads"],
        num_kv_heads=a["num_key_value_heads"], head_dim=a["head_dim"], mlp_intermediate=a["mlp_intermediate"],
        text_channels=a["text_channels"], text_maxlen=a["text_maxlen"], d_vae=a["d_vae"],
        detail_bits=a["head_out"] // 2, semantic_bits=a["semantic_head2_out"] // 2,
        norm_eps=kw["norm_eps"], pad_to_multiplier=kw["pad_to_multiplier"], block_chunks=a["block_chunks"],
        semantic_scales=oa["semantic_scales"], detail_scale_min_tokens=oa["detail_scale_min_tokens"],
        # The reference's RoPE frame table: int(video_frames / 4 + 1) rows.
        rope_max_frames=int(kw["video_frames"] / 4 + 1),
    )


def _build(case: Path) -> tuple[InfinityStarTransformer, dict]:
    c = _config(case)
    cfg = _model_config(c)
    model = InfinityStarTransformer(cfg)
    sd = transformer_state_dict_from_official(load_safetensors(case / "weights.safetensors"), cfg, str(case))
    model.load_state_dict(sd, strict=True)
    # The official count includes the dead sos_token (embed_dim values) that this model does not keep.
    assert model.num_parameters() + cfg.embed_dim == c["resulting_architecture"]["num_parameters"]
    return model, c


def _train_params():
    out = []
    for case in CASES:
        for fname, key in TRAIN_FILES:
            if (case / fname).is_file():
                out.append(pytest.param(case, fname, key, id=f"{case.name}-{key}"))
    return out


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize(("case", "fname", "key"), _train_params())
def test_training_forward(case: Path, fname: str, key: str) -> None:
    model, c = _build(case)
    cfg = model.cfg
    sub = c["cases"][key]
    g = load_file(str(case / fname))
    P = f"{key}."
    oa = c["other_args"]
    per_scale = sub["per_scale"]
    sample = PackedSample(
        schedule=sub["scale_schedule"],
        scale_ids=[p["scale_index"] for p in per_scale],
        real_si=[p["real_si (rope scale index)"] for p in per_scale],
        text_len=int(g[P + "text.lens"][0]),
        frames_inner_clip=oa["frames_inner_clip"],
    )
    layout = build_packed_layout([sample], cfg)

    # Layout: segments, segment mask and RoPE are exact.
    assert layout.segment_lengths == g[P + "scale_lengths"].tolist()
    assert torch.equal(layout.segment_mask, g[P + "querysid_refsid"].bool())
    half = cfg.head_dim // 2
    assert torch.equal(layout.rope, g[P + "rope_full"].reshape(2, -1, half))
    assert torch.equal(layout.rope[:, : layout.visual_len], g[P + "visual_rope_cache"].reshape(2, -1, half))
    assert layout.seq_len == sub["padded_seq_len"]

    # Forward through the dense-SDPA backend, with autograd (gradient norms are golden too).
    texts = [g[P + "text.kv_compact"]]
    out = model.forward_packed(g[P + "x_BLC"], texts, layout, backend="sdpa", return_block_outputs=True)
    rows = g[P + "block_out_rows"]
    for b in range(cfg.depth):
        assert _maxdiff(out.block_outputs[b][0, rows], g[P + f"block{b}.out_rows"]) <= 1e-4, f"block {b}"

    losses, accs = [], []
    for s, logits in enumerate(out.logits):
        assert _maxdiff(logits, g[P + f"scale{s:02d}.logits"]) <= 1e-4, f"scale {s} logits"
        loss, acc = bit_loss_per_token(logits, g[P + f"scale{s:02d}.gt_bits"].long())
        assert _maxdiff(loss.mean().reshape(1), g[P + f"scale{s:02d}.loss_mean"]) <= 1e-5, f"scale {s} loss"
        losses.append(loss[0])
        accs.append(acc[0])
    loss_L, acc_L = torch.cat(losses), torch.cat(accs)
    assert _maxdiff(loss_L, g[P + "loss_per_token"]) <= 1e-5
    assert torch.equal(acc_L, g[P + "acc_per_token"])

    weighting = LossWeighting(oa["reweight_loss_by_scale"], oa["max_reweight_value"])
    red = reduce_loss(loss_L, acc_L, layout.scales, layout.full_scales, weighting)
    assert _maxdiff(red.weights, g[P + "scale_weights"]) <= 1e-5
    assert _maxdiff(red.final_loss.reshape(1), g[P + "final_loss"]) <= 1e-5
    assert _maxdiff(red.final_acc.reshape(1), g[P + "final_acc"]) <= 1e-5
    assert abs(red.final_loss.item() - sub["final_loss"]) <= 1e-5

    red.final_loss.backward()
    grads = {transformer_key_to_official(n, cfg): p.grad for n, p in model.named_parameters()}
    stored = {k[len(P + "grad_norm."):]: v for k, v in g.items() if k.startswith(P + "grad_norm.")}
    assert set(stored) == set(grads), sorted(set(stored) ^ set(grads))
    for name, want in stored.items():
        got = grads[name].norm() if grads[name] is not None else torch.zeros(())
        torch.testing.assert_close(got.reshape(1), want, rtol=1e-4, atol=0, msg=f"grad norm of {name}")


@pytest.mark.parametrize("case", [c for c in CASES if (c / "infer.safetensors").is_file()], ids=lambda p: p.name)
def test_cached_inference(case: Path) -> None:
    model, c = _build(case)
    model.eval()
    cfg = model.cfg
    inf = c["cases"]["infer"]
    oa = c["other_args"]
    g = load_file(str(case / "infer.safetensors"))
    schedule = [tuple(s) for s in inf["scale_schedule"]]
    spc = scales_per_clip(schedule)
    layout = clip_layout(schedule, oa["frames_inner_clip"], oa["context_from_largest_no"])
    for si, info in enumerate(layout):
        ref = inf["context_info (get_scale_pack_info)"][str(si)]
        assert (info.frame_ss, list(info.ref_sids)) == (ref["frame_ss"], ref["ref_sids"])
    reps = schedule_repetitions(schedule, oa["image_scale_repetition"], oa["video_scale_repetition"])
    quant = QuantizerConfig(embed_dim=cfg.d_vae, semantic_dim=oa["semantic_scale_dim"],
                            detail_dim=oa["detail_scale_dim"], detail_scale_min_tokens=oa["detail_scale_min_tokens"])
    acc = CodeAccumulator(schedule, reps, quant, frames_inner_clip=oa["frames_inner_clip"])
    assert len(acc.steps) == inf["num_steps"]
    method = "apg" if oa["use_apg"] else "cfg"
    full_hw = schedule[-1][1:]

    diffs = {"cond/uncond": 0.0, "guided": 0.0}
    with torch.no_grad():
        cache = model.new_cache()
        model.prefill_text(g["infer.text.kv_compact"][: int(g["infer.text.lens"][0])], cache)
        x = acc.first_input()
        for step in acc.steps:
            si = step.scale_index
            meta = inf["steps"][step.index]
            assert (meta["scale_index"], meta["repeat_index"]) == (si, step.repeat_index)
            rope = model.step_rope(step.scale, step.index, layout[si].frame_ss, full_hw)
            semantic = uses_semantic_head(si, spc, cfg.semantic_scales)
            assert semantic == (meta["head"] == "semantic_head2")
            logits = model.step(x.flatten(2).transpose(1, 2), rope, cache, refs=layout[si].ref_sids,
                                store_as=si if step.is_last_repeat else None, semantic=semantic)
            logits = apply_temperature(logits, inf["tau_list"][si])
            name = f"infer.step{step.index:02d}"
            if name + ".cond_logits" in g:
                for row, which in ((0, "cond"), (1, "uncond")):
                    d = _maxdiff(logits[row:row + 1], g[f"{name}.{which}_logits"])
                    diffs["cond/uncond"] = max(diffs["cond/uncond"], d)
                    assert d <= 1e-4, f"step {step.index} {which} logits differ by {d}"
            guided = guide_logits(logits, inf["cfg_list"][si], method, oa["apg_norm_threshold"])
            d = _maxdiff(guided, g[name + ".guided_logits"])
            diffs["guided"] = max(diffs["guided"], d)
            assert d <= 1e-3, f"step {step.index} guided logits differ by {d}"
            x = acc.add_bits(g[name + ".bits"].long())
            if step.is_last_repeat:
                # Keep only what a later scale can still attend: the text and referenced earlier scales.
                later_refs = {r for info in layout[si + 1:] for r in info.ref_sids if r <= si}
                cache.keep_only({cache.TEXT, *later_refs})
    assert _maxdiff(acc.summed_codes, g["infer.summed_codes"]) <= 1e-5
