"""Text encoders and prompt handling (src/infinitystar/text.py) against the tiny offline T5."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from conftest import float32_rounding_tolerance, layer_reductions
from fixtures_text import D_MODEL, tiny_flan_t5_dir, tiny_spiece_model  # noqa: F401
from infinitystar.text import (
    QUALITY_SUFFIX,
    FlanT5Encoder,
    TextEmbeddings,
    TextEncoderFilesError,
    build_prompt,
    duration_prefix,
    duration_seconds_for_frames,
    guidance_dropout_mask,
    interactive_prompt,
    maybe_truncate_sentences,
    training_caption,
    truncate_sentences,
)

PROMPTS = [
    "A red ball bounces.",
    "<<<t=5s>>>Two cats play with a blue string on the sofa, Close-up on big objects, emphasize scale and detail",
    "",
    "zebra quartz!",
]


@pytest.fixture(scope="module")
def encoder(tiny_flan_t5_dir: Path) -> FlanT5Encoder:  # noqa: F811
    return FlanT5Encoder.from_pretrained(tiny_flan_t5_dir)


@pytest.fixture(scope="module")
def sp(tiny_spiece_model: Path):  # noqa: F811
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tiny_spiece_model))


@pytest.fixture(scope="module")
def raw_t5(tiny_flan_t5_dir: Path):  # noqa: F811
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(str(tiny_flan_t5_dir), local_files_only=True).eval()


def _t5_atol(model, ref: torch.Tensor) -> float:
    """T5 run on other shapes (padded to 512 or not, batched or alone) sums in other orders: float32 rounding along
    its layers' sums and each layer's attention (scores over d_kv, softmax and weighted sum over up to 512 keys)."""
    cfg = model.config
    path = layer_reductions(model) + [cfg.d_kv, 512, 512] * cfg.num_layers
    return float32_rounding_tolerance(ref.abs().max().item(), path)


def _direct_features(raw_t5, ids: list[int]) -> torch.Tensor:
    """T5 run on one unpadded sequence, no mask: the reference rows must equal these."""
    with torch.no_grad():
        return raw_t5(input_ids=torch.tensor([ids])).last_hidden_state[0].float()


# ------------------------------------------------------------------------------------------ encoder round trip


def test_round_trip_shape_lens_and_values(encoder, sp, raw_t5):
    assert encoder.width == D_MODEL and encoder.max_length == 512
    for prompt in PROMPTS:
        emb = encoder.encode([prompt])
        ids = sp.encode(prompt) + [1]  # sentencepiece pieces + </s>
        assert emb.lens == (len(ids),)
        assert emb.kv_compact.shape == (len(ids), D_MODEL)
        assert emb.kv_compact.dtype == torch.float32
        want = _direct_features(raw_t5, ids)
        torch.testing.assert_close(emb.kv_compact, want, atol=_t5_atol(raw_t5, want), rtol=0)


def test_encode_is_deterministic(tiny_flan_t5_dir, encoder):  # noqa: F811
    a = encoder.encode(PROMPTS)
    b = encoder.encode(PROMPTS)
    c = FlanT5Encoder.from_pretrained(tiny_flan_t5_dir).encode(PROMPTS)
    assert a.lens == b.lens == c.lens
    assert torch.equal(a.kv_compact, b.kv_compact)
    assert torch.equal(a.kv_compact, c.kv_compact)


def test_batch_equals_single_prompts(encoder, sp):
    emb = encoder.encode(PROMPTS)
    expected_lens = [len(sp.encode(p)) + 1 for p in PROMPTS]
    assert list(emb.lens) == expected_lens
    assert emb.kv_compact.shape == (sum(expected_lens), D_MODEL)
    for i, prompt in enumerate(PROMPTS):
        alone = encoder.encode([prompt]).kv_compact
        torch.testing.assert_close(emb.split()[i], alone, atol=_t5_atol(encoder.model, alone), rtol=0)


def test_padding_to_longest_gives_same_rows(tiny_flan_t5_dir):  # noqa: F811
    full_encoder = FlanT5Encoder.from_pretrained(tiny_flan_t5_dir)
    full = full_encoder.encode(PROMPTS)
    short = FlanT5Encoder.from_pretrained(tiny_flan_t5_dir, pad_to_max_length=False).encode(PROMPTS)
    assert full.lens == short.lens
    torch.testing.assert_close(full.kv_compact, short.kv_compact, atol=_t5_atol(full_encoder.model, short.kv_compact),
                               rtol=0)


def test_tokenize_pads_to_max_length_with_pad_id(encoder, sp):
    ids, mask = encoder.tokenize(["A red ball bounces."])
    n = len(sp.encode("A red ball bounces.")) + 1
    assert ids.shape == mask.shape == (1, 512)
    assert mask[0, :n].all() and not mask[0, n:].any()
    assert ids[0, n - 1].item() == 1 and (ids[0, n:] == 0).all()


def test_over_long_prompt_truncated_with_warning(encoder, sp, raw_t5):
    long_prompt = " ".join(["a red ball bounces on the floor."] * 120)
    full_ids = sp.encode(long_prompt)
    assert len(full_ids) + 1 > 512
    with pytest.warns(UserWarning, match=r"truncated"):
        emb = encoder.encode([long_prompt, "A red ball."])
    assert emb.lens[0] == 512
    ids, _ = encoder.tokenize([long_prompt])
    assert ids[0].tolist() == full_ids[:511] + [1]  # first 511 pieces, then </s>
    want = _direct_features(raw_t5, full_ids[:511] + [1])
    torch.testing.assert_close(emb.split()[0], want, atol=_t5_atol(raw_t5, want), rtol=0)


def test_short_prompt_does_not_warn(encoder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode(["A red ball."])


def test_smaller_max_length_truncates(tiny_flan_t5_dir, sp):  # noqa: F811
    enc = FlanT5Encoder.from_pretrained(tiny_flan_t5_dir, max_length=6)
    with pytest.warns(UserWarning):
        emb = enc.encode([PROMPTS[1]])
    assert emb.lens == (6,)
    assert enc.tokenize([PROMPTS[1]])[0][0].tolist() == sp.encode(PROMPTS[1])[:5] + [1]


def test_encode_rejects_bare_string(encoder):
    with pytest.raises(ValueError, match="list of prompts"):
        encoder.encode("A red ball.")
    with pytest.raises(ValueError, match="at least one prompt"):
        encoder.encode([])


# ------------------------------------------------------------------------------------------ loading errors


def test_missing_folder_error_names_path(tmp_path):
    missing = tmp_path / "text_encoder" / "flan-t5-xl-official"
    with pytest.raises(TextEncoderFilesError, match="does not exist") as info:
        FlanT5Encoder.from_pretrained(missing)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("removed", ["model.safetensors", "config.json"])
def test_incomplete_folder_error_names_path_and_file(tiny_flan_t5_dir, tmp_path, removed):  # noqa: F811
    broken = tmp_path / "flan-t5-broken"
    shutil.copytree(tiny_flan_t5_dir, broken)
    (broken / removed).unlink()
    with pytest.raises(TextEncoderFilesError, match="incomplete") as info:
        FlanT5Encoder.from_pretrained(broken)
    assert str(broken) in str(info.value)


def test_missing_tokenizer_error(tiny_flan_t5_dir, tmp_path):  # noqa: F811
    broken = tmp_path / "flan-t5-notok"
    shutil.copytree(tiny_flan_t5_dir, broken)
    for name in ("tokenizer.json", "spiece.model"):
        (broken / name).unlink()
    with pytest.raises(TextEncoderFilesError, match="no tokenizer") as info:
        FlanT5Encoder.from_pretrained(broken)
    assert str(broken) in str(info.value)


def test_missing_encoder_weight_is_an_error(tiny_flan_t5_dir, tmp_path):  # noqa: F811
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "flan-t5-partial"
    shutil.copytree(tiny_flan_t5_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    dropped = "encoder.block.1.layer.0.SelfAttention.q.weight"
    assert dropped in state
    del state[dropped]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TextEncoderFilesError, match="missing") as info:
        FlanT5Encoder.from_pretrained(broken)
    assert dropped in str(info.value) and str(broken) in str(info.value)


# ------------------------------------------------------------------------------------------ TextEmbeddings


def test_text_embeddings_split_and_validation():
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    emb = TextEmbeddings.from_features([a, b])
    assert emb.lens == (3, 5) and emb.kv_compact.shape == (8, 4)
    first, second = emb.split()
    assert torch.equal(first, a) and torch.equal(second, b)
    with pytest.raises(ValueError, match="does not match"):
        TextEmbeddings(torch.randn(7, 4), (3, 5))
    with pytest.raises(ValueError, match="at least one token"):
        TextEmbeddings(torch.randn(3, 4), (3, 0))


# ------------------------------------------------------------------------------------------ prompt templates


@pytest.mark.parametrize(("seconds", "expected"), [(5, "<<<t=5s>>>"), (10, "<<<t=10s>>>"), (1, "<<<t=1s>>>"),
                                                   (0, "<<<t=0s>>>"), (5.0, "<<<t=5s>>>"), (2.5, "<<<t=2.5s>>>")])
def test_duration_prefix(seconds, expected):
    assert duration_prefix(seconds) == expected


@pytest.mark.parametrize("bad", [-1, float("nan"), "5", None, True])
def test_duration_prefix_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="duration"):
        duration_prefix(bad)


@pytest.mark.parametrize(("frames", "seconds"), [(81, 5), (161, 10), (17, 1), (1, 0), (97, 6)])
def test_duration_seconds_for_frames(frames, seconds):
    assert duration_seconds_for_frames(frames) == seconds


def test_video_image_and_interactive_prompt_strings():
    assert QUALITY_SUFFIX == ", Close-up on big objects, emphasize scale and detail"
    assert build_prompt("a cat", duration_s=5) == (
        "<<<t=5s>>>a cat, Close-up on big objects, emphasize scale and detail")
    assert build_prompt("a cat", duration_s=10) == (
        "<<<t=10s>>>a cat, Close-up on big objects, emphasize scale and detail")
    assert build_prompt("a cat", duration_s=None) == "a cat, Close-up on big objects, emphasize scale and detail"
    assert build_prompt("a cat", duration_s=None, quality_suffix="") == "a cat"
    assert interactive_prompt("the cat jumps") == "<<<t=5s>>>the cat jumps"


# ------------------------------------------------------------------------------------------ training captions

CAPTION = "A dog runs. It jumps over a log. Then it barks"
PREFIXES = ["A dog runs.", "A dog runs. It jumps over a log.", "A dog runs. It jumps over a log. Then it barks."]


def test_truncate_sentences_keeps_a_prefix_uniformly():
    g = torch.Generator().manual_seed(0)
    counts = {p: 0 for p in PREFIXES}
    for _ in range(600):
        out = truncate_sentences(CAPTION, g)
        assert out in counts
        counts[out] += 1
    assert all(150 <= c <= 250 for c in counts.values()), counts


def test_truncate_sentences_edge_cases():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert truncate_sentences("One sentence only.", g) == "One sentence only."
    assert truncate_sentences("no period at all", g) == "no period at all"
    assert torch.equal(g.get_state(), state)  # nothing drawn for < 2 sentences
    for _ in range(20):
        assert truncate_sentences("First.  Second. ", g) in ("First.", "First.  Second.")


def test_sentence_truncation_is_reproducible_and_probabilistic():
    out_a = [maybe_truncate_sentences(CAPTION, 0.3, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(out_a)) == 1
    g = torch.Generator().manual_seed(1)
    outs = [maybe_truncate_sentences(CAPTION, 0.3, g) for _ in range(3000)]
    assert abs(sum(o != CAPTION for o in outs) / len(outs) - 0.3) < 0.03  # no final '.': every draw changes it
    full = PREFIXES[-1]  # ends with '.', so keeping all 3 sentences gives it back unchanged
    outs = [maybe_truncate_sentences(full, 0.3, g) for _ in range(3000)]
    assert abs(sum(o != full for o in outs) / len(outs) - 0.3 * 2 / 3) < 0.03
    assert maybe_truncate_sentences(CAPTION, 0.0, g) == CAPTION
    with pytest.raises(ValueError, match="probability"):
        maybe_truncate_sentences(CAPTION, 1.5, g)


def test_training_caption_order():
    assert training_caption("A dog runs.", duration_s=5, quality_prompt="high quality") == (
        "<<<t=5s>>>A dog runs. high quality")
    assert training_caption("A dog runs.", duration_s=None) == "A dog runs."
    g = torch.Generator().manual_seed(3)
    out = training_caption(CAPTION, duration_s=2, quality_prompt="hq", short_cap_prob=1.0, generator=g)
    assert out in [f"<<<t=2s>>>{p} hq" for p in PREFIXES]
    with pytest.raises(ValueError, match="generator"):
        training_caption(CAPTION, duration_s=2, short_cap_prob=0.5)


# ------------------------------------------------------------------------------------------ guidance dropout


def test_guidance_dropout_rate_and_reproducibility():
    drop = guidance_dropout_mask(20000, 0.1, torch.Generator().manual_seed(0))
    # Binomial rate: standard error sqrt(0.1 * 0.9 / 20000) = 0.0021, so 0.01 is 4.7 of them (false alarm ~3e-6;
    # the seeded CPU generator makes the draw the same on every machine anyway).
    assert drop.dtype == torch.bool and abs(drop.float().mean().item() - 0.1) < 0.01
    again = guidance_dropout_mask(20000, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(drop, again)
    other = guidance_dropout_mask(20000, 0.1, torch.Generator().manual_seed(1))
    assert not torch.equal(drop, other)
    g = torch.Generator().manual_seed(0)
    assert not guidance_dropout_mask(100, 0.0, g).any() and guidance_dropout_mask(100, 1.0, g).all()
    with pytest.raises(ValueError, match="probability"):
        guidance_dropout_mask(4, -0.1, g)


# ------------------------------------------------------------------------------------------ dtypes


def test_fp16_weights_and_bf16_autocast_still_return_fp32(tiny_flan_t5_dir, encoder):  # noqa: F811
    ref = encoder.encode(PROMPTS)
    half = FlanT5Encoder.from_pretrained(tiny_flan_t5_dir, dtype=torch.float16)
    assert half.model.shared.weight.dtype == torch.float16  # the reference's T5 dtype
    out16 = half.encode(PROMPTS)
    bf16 = FlanT5Encoder.from_pretrained(tiny_flan_t5_dir, autocast_dtype=torch.bfloat16)
    out_bf = bf16.encode(PROMPTS)
    # Each low-precision matmul (q, k, v, o, the three feed-forward projections, and per layer the attention's two)
    # perturbs its output by about one unit roundoff u of the low dtype (fp32 accumulation); the norms keep
    # activations at the output's scale; the perturbations add up along the path: |out - ref| <= rounds * u * scale.
    rounds = sum(isinstance(m, torch.nn.Linear) for m in half.model.modules()) + 2 * half.model.config.num_layers
    scale = ref.kv_compact.abs().max().item()
    for out, low in ((out16, torch.float16), (out_bf, torch.bfloat16)):
        assert out.kv_compact.dtype == torch.float32 and out.lens == ref.lens
        assert not torch.equal(out.kv_compact, ref.kv_compact)  # the lower precision really ran
        tol = rounds * torch.finfo(low).eps / 2 * scale
        torch.testing.assert_close(out.kv_compact, ref.kv_compact, atol=tol, rtol=0)


# --- the demo's word-level encoder -----------------------------------------------------------------------------


def test_word_encoder_one_vector_per_word_plus_closing_token():
    from infinitystar.text import WordTextEncoder

    enc = WordTextEncoder(32, max_length=16)
    assert enc.words("<<<t=2s>>>A Red circle, moving LEFT") == [
        "<<<", "t", "=", "2s", ">>>", "a", "red", "circle", ",", "moving", "left"]
    feats = enc(["a red circle", "a blue circle"]).split()
    assert [f.shape for f in feats] == [(4, 32), (4, 32)]
    # Same word at the same position -> same feature; a different word -> a different one.
    assert torch.equal(feats[0][0], feats[1][0]) and torch.equal(feats[0][2], feats[1][2])
    assert not torch.allclose(feats[0][1], feats[1][1])
    # Position codes: the same word at two positions differs exactly by the position table.
    two = enc(["red red"]).split()[0]
    assert torch.allclose(two[1] - two[0], enc.positions[1] - enc.positions[0], atol=1e-6)


def test_word_encoder_is_the_same_on_every_instance_and_seeded():
    from infinitystar.text import WordTextEncoder

    a, b, c = WordTextEncoder(16), WordTextEncoder(16), WordTextEncoder(16, seed=1)
    assert torch.equal(a(["a green square"]).kv_compact, b(["a green square"]).kv_compact)
    assert not torch.allclose(a(["a green square"]).kv_compact, c(["a green square"]).kv_compact)
    # Unit-variance word vectors: the features do not shrink or explode with the width.
    v = torch.stack([WordTextEncoder(256).vector(w) for w in ("red", "green", "blue", "up", "down")])
    # 1280 unit-variance values: their sample std has standard error 1 / sqrt(2 * 1280) = 0.02, 0.3 is 15 of them.
    assert 0.7 < v.std().item() < 1.3


def test_word_encoder_truncates_and_validates():
    from infinitystar.text import WordTextEncoder

    enc = WordTextEncoder(8, max_length=4)
    assert enc(["one two three four five"]).split()[0].shape == (4, 8)
    assert enc.state_dict() == {}  # nothing to train or ship
    with pytest.raises(ValueError, match="width"):
        WordTextEncoder(7)
    with pytest.raises(ValueError, match="max_length"):
        WordTextEncoder(8, max_length=1)


def test_word_encoder_vocabulary_names_the_words_it_was_not_trained_on():
    from infinitystar.text import WordTextEncoder, word_tokens

    assert word_tokens("  A Red circle, moving LEFT!! ") == ["a", "red", "circle", ",", "moving", "left", "!!"]
    open_vocab = WordTextEncoder(8)
    assert open_vocab.vocabulary is None and open_vocab.unknown_words("anything goes") == []
    enc = WordTextEncoder(8, vocabulary=["red", "a", "circle", "red"])
    assert enc.vocabulary == ("a", "circle", "red")
    assert enc.unknown_words("A purple circle, a PURPLE one") == ["purple", ",", "one"]
    # The vocabulary says what the model learned; the features are the same with or without it.
    assert torch.equal(enc(["a purple circle"]).kv_compact, open_vocab(["a purple circle"]).kv_compact)


def test_vocabulary_file_round_trip_and_errors(tmp_path):
    from infinitystar.text import read_vocabulary, write_vocabulary

    assert read_vocabulary(tmp_path) is None  # no file: not recorded
    path = write_vocabulary(tmp_path, ["red", "a", "red"])
    assert path == tmp_path / "vocabulary.json" and read_vocabulary(tmp_path) == ("a", "red")
    path.write_text("not json")
    with pytest.raises(ValueError, match=r"vocabulary.json is not a vocabulary file"):
        read_vocabulary(tmp_path)
    path.write_text('{"words": ["ok", ""]}')
    with pytest.raises(ValueError, match="'words' must be a list of non-empty strings"):
        read_vocabulary(tmp_path)
