"""Training loss: parity with the reference's recorded training forward, plus reduction properties.

Golden: for every transformer case and every ``train_video`` / ``train_image`` file present, from
the stored per-scale ``logits`` and ``gt_bits`` reproduce ``loss_per_token``, ``acc_per_token``
(exact), every ``scaleSS.loss_mean``, ``scale_weights``, ``final_loss`` and ``final_acc``
(atol 1e-5, golden README section 9), with the reweighting of the case's ``other_args``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import float32_rounding_tolerance, golden_cases
from infinitystar.train.loss import (
    LossWeighting,
    bit_loss_per_token,
    packed_scale_lists,
    raw_scale_weights,
    reduce_loss,
)

LOSS_ATOL = 1e-5

TRAIN_FILES = [
    (case, kind)
    for case in golden_cases("transformer")
    for kind in ("video", "image")
    if (case / f"train_{kind}.safetensors").is_file()
]


@pytest.mark.parametrize(("case", "kind"), TRAIN_FILES, ids=[f"{c.name}-{k}" for c, k in TRAIN_FILES])
def test_loss_reproduces_golden(case: Path, kind: str):
    config = json.loads((case / "config.json").read_text())
    section = config["cases"][kind]
    other = config["other_args"]
    weighting = LossWeighting(other["reweight_loss_by_scale"], other["max_reweight_value"])
    tensors = load_file(str(case / f"train_{kind}.safetensors"))
    prefix = f"{kind}."

    # The trained scales, in order, are the ones the file holds logits for.
    schedule = [tuple(s) for s in section["scale_schedule"]]
    trained = [si for si in range(len(schedule)) if f"{prefix}scale{si:02d}.logits" in tensors]
    assert trained, f"{case.name}/{kind}: no scale logits stored"
    scales = [schedule[si] for si in trained]

    diffs: dict[str, float] = {}
    losses, accs = [], []
    for si in trained:
        key = f"{prefix}scale{si:02d}"
        logits = tensors[f"{key}.logits"]
        labels = tensors[f"{key}.gt_bits"].long()
        loss, acc = bit_loss_per_token(logits, labels)
        assert loss.shape == (1, math.prod(schedule[si]))
        diff = (loss.mean() - tensors[f"{key}.loss_mean"].reshape(())).abs().item()
        diffs["loss_mean"] = max(diffs.get("loss_mean", 0.0), diff)
        assert diff <= LOSS_ATOL, f"{key}.loss_mean off by {diff:.3e}"
        losses.append(loss[0])
        accs.append(acc[0])
    loss_L, acc_L = torch.cat(losses), torch.cat(accs)

    diffs["loss_per_token"] = (loss_L - tensors[f"{prefix}loss_per_token"]).abs().max().item()
    assert diffs["loss_per_token"] <= LOSS_ATOL
    assert torch.equal(acc_L, tensors[f"{prefix}acc_per_token"]), "per-token accuracy must match exactly"

    out = reduce_loss(loss_L, acc_L, scales, [schedule[-1]] * len(scales), weighting)
    for name, ours in (("scale_weights", out.weights), ("final_loss", out.final_loss), ("final_acc", out.final_acc)):
        expected = tensors[f"{prefix}{name}"].reshape(ours.shape)
        diffs[name] = (ours - expected).abs().max().item()
        assert diffs[name] <= LOSS_ATOL, f"{name} off by {diffs[name]:.3e}"
    # The config's scalar copies agree with the tensors.
    assert abs(out.final_loss.item() - section["final_loss"]) <= LOSS_ATOL
    assert abs(out.final_acc.item() - section["final_acc"]) <= LOSS_ATOL
    print(f"{case.name}/{kind}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


# ----------------------------------------------------------------------------------------------
# Unit properties
# ----------------------------------------------------------------------------------------------


def test_bit_loss_matches_log_softmax_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 7, 16, 2, generator=g) * 4
    labels = torch.randint(0, 2, (1, 7, 16), generator=g)
    loss, acc = bit_loss_per_token(logits, labels)
    logp = logits.double().log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    # float32 against float64: the rounding of a 2-way log-sum-exp and a 16-bit mean, at the size of the largest
    # logit or per-bit loss involved.
    scale = max(logits.abs().max().item(), logp.abs().max().item())
    tol = float32_rounding_tolerance(scale, [2, logits.shape[-2]])
    torch.testing.assert_close(loss.double(), -logp.mean(-1), rtol=0, atol=tol)
    predicted = (logits[..., 1] > logits[..., 0]).long()
    torch.testing.assert_close(acc, (predicted == labels).float().mean(-1))


def test_weights_formula_and_cap():
    w = LossWeighting(4, 40)
    # (V/n)^(1/5): 1x1 scale of a 20x30x53 video -> 31800^0.2 = 7.94 (training.md section 4).
    raw = raw_scale_weights([1, 31800], [31800, 31800], w)
    assert raw[0] == pytest.approx(31800 ** 0.2)
    assert raw[1] == pytest.approx(31800.0)
    # The per-token factor is capped at max_reweight_value.
    assert raw_scale_weights([1], [10 ** 12], w) == [40.0]
    # No reweighting: plain token counts, so the final loss is the token mean.
    assert raw_scale_weights([3, 5], [100, 100], LossWeighting(0, 40)) == [3.0, 5.0]
    loss = torch.tensor([1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    out = reduce_loss(loss, torch.zeros(8), [(1, 1, 3), (1, 1, 5)], [(1, 1, 5)] * 2, LossWeighting(0, 40))
    torch.testing.assert_close(out.final_loss, loss.mean())


def test_packed_reduction_weights_samples_by_their_scale_weights():
    g = torch.Generator().manual_seed(1)
    w = LossWeighting(4, 40)
    sched_a = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    sched_b = [(1, 1, 1), (1, 3, 3), (2, 3, 3)]
    sel_a, sel_b = sched_a, [sched_b[0], sched_b[2]]
    n_a = sum(math.prod(s) for s in sel_a)
    n_b = sum(math.prod(s) for s in sel_b)
    loss_a, loss_b = torch.rand(n_a, generator=g), torch.rand(n_b, generator=g)
    acc_a, acc_b = torch.rand(n_a, generator=g), torch.rand(n_b, generator=g)

    out_a = reduce_loss(loss_a, acc_a, sel_a, [sched_a[-1]] * len(sel_a), w)
    out_b = reduce_loss(loss_b, acc_b, sel_b, [sched_b[-1]] * len(sel_b), w)
    scales, full = packed_scale_lists([sel_a, sel_b], [sched_a, sched_b])
    packed = reduce_loss(torch.cat([loss_a, loss_b]), torch.cat([acc_a, acc_b]), scales, full, w)

    total_a = sum(raw_scale_weights([math.prod(s) for s in sel_a], [math.prod(sched_a[-1])] * len(sel_a), w))
    total_b = sum(raw_scale_weights([math.prod(s) for s in sel_b], [math.prod(sched_b[-1])] * len(sel_b), w))
    expected_loss = (total_a * out_a.final_loss + total_b * out_b.final_loss) / (total_a + total_b)
    expected_acc = (total_a * out_a.final_acc + total_b * out_b.final_acc) / (total_a + total_b)
    torch.testing.assert_close(packed.final_loss, expected_loss)
    torch.testing.assert_close(packed.final_acc, expected_acc)
    assert packed.weights.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(packed.loss_per_scale, torch.cat([out_a.loss_per_scale, out_b.loss_per_scale]))


def test_loss_is_differentiable():
    logits = torch.randn(1, 4, 16, 2, requires_grad=True)
    loss, acc = bit_loss_per_token(logits, torch.zeros(1, 4, 16, dtype=torch.long))
    out = reduce_loss(loss[0], acc[0], [(1, 2, 2)], [(1, 2, 2)], LossWeighting())
    out.final_loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="visual tokens"):
        reduce_loss(torch.zeros(5), torch.zeros(5), [(1, 2, 2)], [(1, 2, 2)], LossWeighting())
    with pytest.raises(ValueError, match="match logits"):
        bit_loss_per_token(torch.zeros(1, 4, 16, 2), torch.zeros(1, 4, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="reweight_loss_by_scale"):
        LossWeighting(-1, 40)
