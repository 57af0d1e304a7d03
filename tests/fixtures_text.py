"""A tiny, fully offline Flan-T5 stand-in for tests.

A sentencepiece unigram model is trained on a small in-file corpus, wrapped as a transformers
``T5Tokenizer`` and saved next to a randomly initialised 2-layer ``T5ForConditionalGeneration``
(d_model 32, gated-GELU like Flan-T5) in a folder laid out like ``text_encoder/flan-t5-xl-official``
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json, spiece.model).

Use it from a test module with ``from fixtures_text import tiny_flan_t5_dir  # noqa: F401``; it is built
once per test session.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch

CORPUS = [
    "A red ball bounces on a wooden floor.",
    "The camera pans slowly across a green field at sunset.",
    "Two cats play with a blue string. One cat jumps onto the sofa.",
    "A small robot walks through a busy city street at night, neon lights reflecting on wet asphalt.",
    "Close-up on big objects, emphasize scale and detail.",
    "A white bird flies over the calm sea while waves roll onto the sandy beach.",
    "An old man reads a newspaper in a quiet cafe. Steam rises from his cup of coffee.",
    "Snow falls on a mountain village; smoke curls from the chimneys of small houses.",
    "A yellow square moves from left to right, then a circle grows in the center of the frame.",
    "The video shows a person riding a bicycle down a long road lined with tall trees.",
]

D_MODEL = 32
EXTRA_IDS = 8


def train_sentencepiece(model_file: Path, vocab_size: int = 160) -> None:
    """Train a T5-style unigram model (pad 0, </s> 1, <unk> 2, no <s>) on CORPUS.

    ``normalization_rule_name='identity'`` keeps the normaliser trivial so that the tokenizers-backed
    ``T5Tokenizer`` (built from the pieces and scores alone) segments exactly like sentencepiece.
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    model_file.write_bytes(buf.getvalue())


def build_tiny_flan_t5(folder: Path, seed: int = 0) -> Path:
    """Write the tiny tokenizer + T5 checkpoint into ``folder`` (created) and return it."""
    import sentencepiece as spm
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    spm_file = folder.parent / f"{folder.name}.spiece.model"
    train_sentencepiece(spm_file)
    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=EXTRA_IDS, model_max_length=512)
    tokenizer.save_pretrained(str(folder))
    shutil.copyfile(spm_file, folder / "spiece.model")

    vocab_size = -(-len(tokenizer) // 8) * 8  # rounded up like Flan-T5's 32100 tokens -> 32128 rows
    config = T5Config(
        vocab_size=vocab_size,
        d_model=D_MODEL,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=1,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_flan_t5_dir(tmp_path_factory) -> Path:
    """Folder ``<tmp>/text_encoder/flan-t5-xl-official`` holding the tiny T5 (built once per session)."""
    root = tmp_path_factory.mktemp("tiny_t5")
    return build_tiny_flan_t5(root / "text_encoder" / "flan-t5-xl-official")


@pytest.fixture(scope="session")
def tiny_spiece_model(tiny_flan_t5_dir: Path) -> Path:
    """The sentencepiece model file the tiny tokenizer was built from."""
    return tiny_flan_t5_dir / "spiece.model"
