"""Training step: the scale-subset sampler (reference outcome tables, token budget, seeding).

The model-level tests (loss falls under AdamW; packed step == weighted combination of the samples)
are further below and need the transformer.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import GOLDEN_DIR, float32_rounding_tolerance, layer_reductions
from infinitystar.train.scale_subsets import (
    VAR_LEN_PROB_480P,
    VAR_LEN_PROB_720P,
    ScaleSubsetConfig,
    outcome_table,
    plan_packed_step,
    remap_refs,
    sample_scale_subset,
    valid_outcomes,
)


def _official_schedule(frames_key: str, pn: str, pt: int, template: str = "0.562") -> list[tuple[int, int, int]]:
    tables = json.loads((GOLDEN_DIR / "scale_schedules.json").read_text())["tables"]
    entry = tables["infinity_elegant_clip20frames_v2"][frames_key][template][pn]
    return [tuple(s) for s in entry["pt2scale_schedule"][str(pt)]]


def _tokens(schedule, indices) -> int:
    return sum(math.prod(schedule[i]) for i in indices)


@pytest.mark.parametrize(
    ("pn", "expected_tokens", "probs"),
    [
        # training.md section 3.3, 16:9, drop_720p_last_scale=1.
        ("0.40M", [3899, 7919, 17919, 29439, 38559, 39719], [40, 30, 20, 6, 3, 1]),
        ("0.90M", [7499, 11519, 21519, 33039, 42159, 43319], [60, 20, 10, 6, 2, 1]),
    ],
)
def test_release_outcome_tables_match_spec(pn, expected_tokens, probs):
    schedule = _official_schedule("video_frames=81", pn, 21)
    prob_list = VAR_LEN_PROB_480P if pn == "0.40M" else VAR_LEN_PROB_720P
    outcomes, p = valid_outcomes(len(schedule), len(schedule) // 2, prob_list, drop_720p_last_scale=True)
    assert [_tokens(schedule, o) for o in outcomes] == expected_tokens
    assert p == pytest.approx([x / sum(probs) for x in probs])
    for o in outcomes:  # every outcome carries its clips' context scales
        remap_refs(schedule, sorted(o))


def test_ten_second_table_and_max_tokens():
    schedule = _official_schedule("video_frames=161", "0.40M", 41)
    sc = len(schedule) // 3
    outcomes, p = valid_outcomes(len(schedule), sc, VAR_LEN_PROB_480P)
    assert len(outcomes) == 11 and p == pytest.approx([x / 220 for x in VAR_LEN_PROB_480P])
    assert max(_tokens(schedule, o) for o in outcomes) == 65190  # "max ~65 k visual tokens"
    for o in outcomes:
        remap_refs(schedule, sorted(o))


def test_out_of_range_outcomes_are_dropped_and_images_train_everything():
    # 480p with drop_720p_last_scale=0 names scale sc+14 = 28, beyond the 28-scale schedule.
    table = outcome_table(28, 14, drop_720p_last_scale=False)
    outcomes, p = valid_outcomes(28, 14, VAR_LEN_PROB_720P, drop_720p_last_scale=False)
    assert len(table) == 7 and len(outcomes) == 6 and [27] not in outcomes
    assert sum(p) == pytest.approx(1.0)
    image = [(1, h, h) for h in (1, 2, 3, 4)]
    assert sample_scale_subset(image, ScaleSubsetConfig()) == [0, 1, 2, 3]


def test_sampler_reproducible_by_seed_and_follows_probabilities():
    schedule = _official_schedule("video_frames=81", "0.40M", 21)
    cfg = ScaleSubsetConfig()

    def draw(seed: int) -> list[tuple[int, ...]]:
        g = torch.Generator().manual_seed(seed)
        return [tuple(sample_scale_subset(schedule, cfg, g)) for _ in range(400)]

    a, b, c = draw(0), draw(0), draw(1)
    assert a == b and a != c
    outcomes, probs = valid_outcomes(len(schedule), 14, cfg.var_len_prob)
    counts = [a.count(tuple(o)) for o in outcomes]
    # 400 draws: each frequency within 5 standard errors of its probability.
    for n, p in zip(counts, probs):
        assert abs(n / 400 - p) <= 5 * math.sqrt(p * (1 - p) / 400) + 1e-9


def test_token_budget_is_respected():
    schedule = _official_schedule("video_frames=81", "0.40M", 21)
    cfg = ScaleSubsetConfig()
    g = torch.Generator().manual_seed(3)
    for budget in (3899, 10000, 20000, 30000):
        for _ in range(50):
            subset = sample_scale_subset(schedule, cfg, g, max_tokens=budget)
            assert _tokens(schedule, subset) <= budget
    # Nothing in the table fits: the longest fitting prefix.
    # Image scales hold 1, 6, 8, 15, 28, 32, 45, ... tokens: 90 fit in 100, 135 do not.
    assert sample_scale_subset(schedule, cfg, g, max_tokens=100) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="budget"):
        sample_scale_subset(schedule, cfg, g, max_tokens=0)


def test_packed_plan_respects_budget_and_seed():
    s480 = _official_schedule("video_frames=81", "0.40M", 21)
    s_img = _official_schedule("video_frames=81", "0.40M", 1)
    cfg = ScaleSubsetConfig()
    for seed in range(20):
        plan = plan_packed_step([s480, s480, s_img], [40, 60, 30], cfg, torch.Generator().manual_seed(seed),
                                max_tokens=40000)
        assert plan.total_tokens <= 40000
        assert plan.total_tokens == sum(plan.visual_tokens) + 130
        again = plan_packed_step([s480, s480, s_img], [40, 60, 30], cfg, torch.Generator().manual_seed(seed),
                                 max_tokens=40000)
        assert again == plan
    with pytest.raises(ValueError, match="exhausted"):
        plan_packed_step([s_img], [50], cfg, max_tokens=40)


def test_selected_without_context_raises():
    schedule = _official_schedule("video_frames=81", "0.40M", 21)
    with pytest.raises(ValueError, match="context"):
        remap_refs(schedule, [0, 20])


# ----------------------------------------------------------------------------------------------
# The training step on a tiny model
# ----------------------------------------------------------------------------------------------

from infinitystar.config import QuantizerConfig, TransformerConfig  # noqa: E402
from infinitystar.train.loss import LossWeighting, raw_scale_weights  # noqa: E402
from infinitystar.train.step import (  # noqa: E402
    TrainSample,
    make_optimizer,
    packed_loss,
    prepare_packed_batch,
    tokenize_sample,
    train_step,
)
from infinitystar.transformer.model import InfinityStarTransformer  # noqa: E402

# Two clips of 3 scales: image (1,1,1) (1,2,2) (1,4,4), video (2,1,1) (2,2,2) (2,4,4); 4x4 = 16 tokens is "detail".
VIDEO = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (2, 1, 1), (2, 2, 2), (2, 4, 4)]
IMAGE = [(1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 4, 4)]
QCFG = QuantizerConfig(detail_scale_min_tokens=16)
TEXT_CH = 16


def _tiny_model(seed: int = 0) -> InfinityStarTransformer:
    cfg = TransformerConfig(depth=2, embed_dim=64, num_heads=2, num_kv_heads=1, head_dim=32, mlp_intermediate=128,
                            text_channels=TEXT_CH, text_maxlen=32, block_chunks=1, semantic_scales=2,
                            detail_scale_min_tokens=16, rope_max_frames=8)
    torch.manual_seed(seed)
    return InfinityStarTransformer(cfg)


def _latent(schedule, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = 1 + (schedule[-1][0] if len(schedule) > 4 else 0)
    h, w = schedule[-1][1:]
    return torch.randn(1, 64, t, h, w, generator=g)


def _sample(schedule, seed: int, text_len: int, scale_ids=None) -> TrainSample:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(text_len, TEXT_CH, generator=g)
    reps = [2] * len(schedule)
    ids = range(len(schedule)) if scale_ids is None else scale_ids
    return tokenize_sample(_latent(schedule, seed), text, schedule, reps, QCFG, ids, g)


def test_tokenized_sample_matches_model_heads_and_is_seeded():
    a = _sample(VIDEO, 3, 5)
    b = _sample(VIDEO, 3, 5)
    assert a.scale_ids == tuple(range(6))
    assert [y.shape[-1] for y in a.labels] == [16, 16, 64, 16, 16, 64]
    for x, y, xb, yb in zip(a.inputs, a.labels, b.inputs, b.labels):
        assert torch.equal(x, xb) and torch.equal(y, yb)
    # Two repetitions per scale: the RoPE step index of scale k is 2k + (trained repetition).
    assert all(r - 2 * k in (0, 1) for k, r in enumerate(a.real_si))


def test_loss_falls_with_adamw_on_a_fixed_batch():
    model = _tiny_model()
    batch = [_sample(VIDEO, 1, 5), _sample(IMAGE, 2, 7)]
    opt = make_optimizer(model, lr=3e-3)
    losses = [train_step(model, opt, batch, LossWeighting(4, 40)).loss for _ in range(20)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}"
    assert losses[-1] < min(losses[:5])


def test_packed_step_is_the_weighted_combination_of_its_samples():
    weighting = LossWeighting(4, 40)
    a = _sample(VIDEO, 11, 5)
    b = _sample(IMAGE, 12, 9, scale_ids=[0, 1, 3])  # a scale subset

    def run(samples):
        model = _tiny_model(seed=5)
        metrics = train_step(model, None, samples, weighting, grad_clip=0)
        return metrics, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    m_ab, g_ab = run([a, b])
    m_a, g_a = run([a])
    m_b, g_b = run([b])
    w_a = sum(raw_scale_weights([math.prod(a.schedule[i]) for i in a.scale_ids],
                                [math.prod(a.schedule[-1])] * len(a.scale_ids), weighting))
    w_b = sum(raw_scale_weights([math.prod(b.schedule[i]) for i in b.scale_ids],
                                [math.prod(b.schedule[-1])] * len(b.scale_ids), weighting))
    fa, fb = w_a / (w_a + w_b), w_b / (w_a + w_b)
    # Loss and accuracy are short float32 reductions of values ~1: rel 1e-5 is ~100 ulps.
    assert m_ab.loss == pytest.approx(fa * m_a.loss + fb * m_b.loss, rel=1e-5, abs=1e-6)
    assert m_ab.acc == pytest.approx(fa * m_a.acc + fb * m_b.acc, rel=1e-5, abs=1e-6)
    assert set(g_ab) == set(g_a) == set(g_b)
    # The packed sequence and the two single ones sum the same terms in other orders and shapes, so each gradient
    # differs by the float32 rounding of the backward's sums (the forward's layers and attention, then the sum over
    # the packed tokens), at the scale of that parameter's gradient. An element-wise rtol does not hold: an element
    # that nearly cancels keeps the rounding of its large terms.
    model = _tiny_model(seed=5)
    seq_len = sum(sum(x.shape[1] for x in smp.inputs) + smp.text.shape[0] for smp in (a, b))
    path = layer_reductions(model) + [model.cfg.head_dim, seq_len, seq_len] * model.cfg.depth + [seq_len]
    for name in g_ab:
        part_a, part_b = fa * g_a[name], fb * g_b[name]
        combined = part_a + part_b
        scale = max(g_ab[name].abs().max().item(), part_a.abs().max().item() + part_b.abs().max().item())
        torch.testing.assert_close(g_ab[name], combined, rtol=0, atol=float32_rounding_tolerance(scale, path),
                                   msg=lambda m, n=name: f"{n}: {m}")
    # Per-scale accuracies are reported per (sample, scale).
    assert [(s[0], s[1]) for s in m_ab.per_scale] == [(0, i) for i in range(6)] + [(1, 0), (1, 1), (1, 3)]
    assert sum(s[5] for s in m_ab.per_scale) == pytest.approx(1.0)


def test_condition_dropout_uses_the_unconditional_text():
    model = _tiny_model()
    s = _sample(IMAGE, 4, 6)
    dropped = train_step(model, None, [s], cond_drop_rate=1.0, backward=False)
    with torch.no_grad():
        manual = TrainSample(s.schedule, s.scale_ids, s.inputs, s.labels, s.real_si, model.uncond_text[:6].clone())
        ref, _ = packed_loss(model, [manual], LossWeighting())
        cond, _ = packed_loss(model, [s], LossWeighting())
    assert dropped.loss == pytest.approx(float(ref.final_loss), abs=1e-6)
    assert abs(dropped.loss - float(cond.final_loss)) > 1e-6


def test_prepare_packed_batch_budget_and_seed():
    texts = [torch.randn(5, TEXT_CH), torch.randn(7, TEXT_CH)]
    lats = [_latent(VIDEO, 0), _latent(IMAGE, 1)]
    reps = [[2] * len(VIDEO), [2] * len(IMAGE)]
    cfg = ScaleSubsetConfig(var_len=False)

    def prep(seed):
        return prepare_packed_batch(lats, texts, [VIDEO, IMAGE], reps, QCFG, cfg, torch.Generator().manual_seed(seed),
                                    max_tokens=60)

    a, b = prep(0), prep(0)
    assert sum(s.visual_tokens for s in a) + 12 <= 60
    assert [s.scale_ids for s in a] == [s.scale_ids for s in b]
    for sa, sb in zip(a, b):
        for x, y in zip(sa.inputs + sa.labels, sb.inputs + sb.labels):
            assert torch.equal(x, y)


# ----------------------------------------------------------------------------------------------
# Golden: raw latent -> tokenizer (recorded flips and repeats) -> train_step == the reference's step
# ----------------------------------------------------------------------------------------------

import re  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from conftest import golden_cases  # noqa: E402
from infinitystar.checkpoints import (  # noqa: E402
    load_safetensors,
    transformer_key_to_official,
    transformer_state_dict_from_official,
)
from infinitystar.train.self_correction import GivenFlipMasks, tokenize_for_training  # noqa: E402
from infinitystar.train.step import train_sample_from_tokens  # noqa: E402
from infinitystar.vae.multiscale import schedule_repetitions  # noqa: E402

GOLDEN_TRAIN = [(c, k) for c in golden_cases("transformer") for k in ("video", "image")
                if (c / f"train_{k}.safetensors").is_file()]


def _golden_model(config: dict, case) -> InfinityStarTransformer:
    a, kw, oa = config["resulting_architecture"], config["constructor_kwargs"], config["other_args"]
    cfg = TransformerConfig(
        depth=a["depth"], embed_dim=a["embed_dim"], num_heads=a["num_heads"], num_kv_heads=a["num_key_value_heads"],
        head_dim=a["head_dim"], mlp_intermediate=a["mlp_intermediate"], text_channels=a["text_channels"],
        text_maxlen=a["text_maxlen"], d_vae=a["d_vae"], detail_bits=a["head_out"] // 2,
        semantic_bits=a["semantic_head2_out"] // 2, norm_eps=kw["norm_eps"], pad_to_multiplier=kw["pad_to_multiplier"],
        block_chunks=a["block_chunks"], semantic_scales=oa["semantic_scales"],
        detail_scale_min_tokens=oa["detail_scale_min_tokens"], rope_max_frames=int(kw["video_frames"] / 4 + 1),
    )
    model = InfinityStarTransformer(cfg)
    state = transformer_state_dict_from_official(load_safetensors(case / "weights.safetensors"), cfg, str(case))
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize(("case", "kind"), GOLDEN_TRAIN, ids=[f"{c.name}-{k}" for c, k in GOLDEN_TRAIN])
def test_train_step_from_raw_latent_matches_golden(case, kind):
    config = json.loads((case / "config.json").read_text())
    section, oa = config["cases"][kind], config["other_args"]
    t = {k[len(kind) + 1:]: v for k, v in load_file(str(case / f"train_{kind}.safetensors")).items()}
    schedule = [tuple(s) for s in section["scale_schedule"]]
    reps = schedule_repetitions(schedule, oa["image_scale_repetition"], oa["video_scale_repetition"])
    selected = [p["selected_repeat_idx"] for p in section["per_scale"]]
    flips = {int(m.group(1)): v for k, v in t.items() if (m := re.match(r"^bsc_call(\d+)\.flip_mask$", k))}
    qcfg = QuantizerConfig(semantic_dim=oa["semantic_scale_dim"], detail_dim=oa["detail_scale_dim"],
                           detail_scale_min_tokens=oa["detail_scale_min_tokens"])
    tokens = tokenize_for_training(t["raw_features"], schedule, reps, selected, qcfg, GivenFlipMasks(flips),
                                   frames_inner_clip=oa["frames_inner_clip"])
    sample = train_sample_from_tokens(tokens, schedule, t["text.kv_compact"])
    assert list(sample.real_si) == [p["real_si (rope scale index)"] for p in section["per_scale"]]

    model = _golden_model(config, case)
    weighting = LossWeighting(oa["reweight_loss_by_scale"], oa["max_reweight_value"])
    metrics = train_step(model, None, [sample], weighting, grad_clip=0)
    assert metrics.seq_len == section["padded_seq_len"]
    assert abs(metrics.loss - t["final_loss"].item()) <= 1e-5, f"final_loss {metrics.loss} vs {t['final_loss']}"
    assert abs(metrics.acc - t["final_acc"].item()) <= 1e-5
    torch.testing.assert_close(torch.tensor([s[5] for s in metrics.per_scale]), t["scale_weights"], rtol=0, atol=1e-5)
    stored = {k[len("grad_norm."):]: v for k, v in t.items() if k.startswith("grad_norm.")}
    grads = {transformer_key_to_official(n, model.cfg): p.grad for n, p in model.named_parameters()}
    assert set(stored) == set(grads)
    for name, want in stored.items():
        got = grads[name].norm() if grads[name] is not None else torch.zeros(())
        torch.testing.assert_close(got.reshape(1), want, rtol=1e-4, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    # The step's reported pre-clip norm is the global norm of those gradients.
    total = torch.stack([v.double().reshape(()) for v in stored.values()]).norm().item()
    assert metrics.grad_norm == pytest.approx(total, rel=1e-4)
