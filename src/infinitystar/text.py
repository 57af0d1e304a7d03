"""Text conditioning: text encoders behind one interface, and the reference's prompt handling.

Every encoder turns a list of prompts into :class:`TextEmbeddings`: the features of all prompts
concatenated along the token axis (``kv_compact`` [sum(lens), C]) plus the per-prompt lengths. This
"compact" form is what the transformer consumes as its text prefix (one prefix token per text token,
no pooling, no padding rows).

Prompt handling follows the reference (spec: inference.md 2.2, 5, 7; training.md 2.6, 2.7):

* inference (T2V/I2V/V2V): ``'<<<t={D}s>>>' + prompt + ', Close-up on big objects, emphasize scale and detail'``
  with D the requested length in whole seconds (5 or 10 for the released models);
* interactive turns: ``'<<<t=5s>>>' + prompt`` (no quality suffix);
* images: no duration prefix (images were trained without one);
* training captions: optional sentence truncation, `` ' ' + quality_prompt``, then the duration prefix;
* guidance: the unconditional branch is the learned ``cfg_uncond`` rows sliced to each prompt's length, or the
  features of a negative prompt; the transformer builds it (``InfinityStarTransformer.prefill_text`` at inference,
  ``forward_packed(uncond=...)`` for training's condition dropout, drawn by :func:`guidance_dropout_mask`).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import PrecisionPolicy
from .fileio import atomic_write_json

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "QUALITY_SUFFIX",
    "VIDEO_FPS",
    "FlanT5Encoder",
    "RandomT5Encoder",
    "TextEmbeddings",
    "TextEncoder",
    "TextEncoderFilesError",
    "VOCABULARY_FILE",
    "WordTextEncoder",
    "build_prompt",
    "duration_prefix",
    "duration_seconds_for_frames",
    "flan_t5_xl_config",
    "guidance_dropout_mask",
    "interactive_prompt",
    "maybe_truncate_sentences",
    "read_vocabulary",
    "unknown_words",
    "training_caption",
    "truncate_sentences",
    "word_tokens",
    "write_vocabulary",
]

DEFAULT_MAX_LENGTH = 512  # T5 max tokens (`tlen`), also the number of learned cfg_uncond rows (`text_maxlen`)
QUALITY_SUFFIX = ", Close-up on big objects, emphasize scale and detail"  # appended by the 720p/480p scripts
VIDEO_FPS = 16  # the frame rate the models were trained and sample at


# ---------------------------------------------------------------------------------------------------------------
# Compact text features
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEmbeddings:
    """Features of B prompts in the reference's compact layout.

    ``kv_compact`` holds prompt 0's ``lens[0]`` token rows, then prompt 1's, ... ([sum(lens), C]). Every
    row is a real token (padding rows were dropped); T5 features include the closing ``</s>``.
    """

    kv_compact: torch.Tensor
    lens: tuple[int, ...]

    def __post_init__(self) -> None:
        lens = tuple(int(n) for n in self.lens)
        object.__setattr__(self, "lens", lens)
        if self.kv_compact.ndim != 2:
            raise ValueError(f"kv_compact must be [sum(lens), C], got shape {tuple(self.kv_compact.shape)}")
        if not lens:
            raise ValueError("TextEmbeddings needs at least one prompt (lens is empty)")
        if any(n <= 0 for n in lens):
            raise ValueError(f"every prompt needs at least one token, got lens={list(lens)}")
        if sum(lens) != self.kv_compact.shape[0]:
            raise ValueError(f"sum(lens)={sum(lens)} does not match kv_compact rows {self.kv_compact.shape[0]}")

    @classmethod
    def from_features(cls, features: Sequence[torch.Tensor]) -> TextEmbeddings:
        """Build from one [L_i, C] tensor per prompt."""
        if not features:
            raise ValueError("from_features needs at least one [L, C] tensor")
        for i, f in enumerate(features):
            if f.ndim != 2:
                raise ValueError(f"features[{i}] must be [L, C], got shape {tuple(f.shape)}")
        return cls(torch.cat(list(features), dim=0), tuple(f.shape[0] for f in features))

    def split(self) -> list[torch.Tensor]:
        """One [L_i, C] view per prompt."""
        return list(torch.split(self.kv_compact, list(self.lens), dim=0))


# ---------------------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------------------


class TextEncoder(abc.ABC):
    """Anything that maps prompts to :class:`TextEmbeddings`.

    Implementations set ``width`` (feature channels C, the transformer's ``text_channels``) and
    ``max_length`` (longest token sequence a prompt may produce; longer prompts are truncated).
    """

    width: int
    max_length: int

    @abc.abstractmethod
    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        """Encode B prompts; the result has B entries in ``lens``, in order, features in float32."""

    def __call__(self, prompts: Sequence[str]) -> TextEmbeddings:
        return self.encode(prompts)


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError(f"encode takes a list of prompts, got a single string {prompts[:60]!r}; wrap it in a list")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode needs at least one prompt (got an empty list)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} must be a str, got {type(p).__name__}")
    return prompts


class TextEncoderFilesError(FileNotFoundError, ValueError):
    """The text-encoder folder is missing, incomplete or not a T5 checkpoint; the message names the folder."""


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def _check_t5_folder(folder: Path) -> None:
    """Fail early, naming the folder and the missing file, instead of letting a hub lookup or a half-load happen."""
    if not folder.exists():
        raise TextEncoderFilesError(f"text encoder folder {folder} does not exist (expected a local Flan-T5 folder "
                                    "such as text_encoder/flan-t5-xl-official; nothing is downloaded)")
    if not folder.is_dir():
        raise TextEncoderFilesError(f"text encoder path {folder} is not a folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise TextEncoderFilesError(f"text encoder folder {folder} is incomplete: missing config.json")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise TextEncoderFilesError(f"text encoder folder {folder}: cannot read config.json ({e})") from e
    if model_type != "t5":
        raise TextEncoderFilesError(f"text encoder folder {folder} holds model_type={model_type!r}, expected 't5'")
    weights = [name for name in _WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        raise TextEncoderFilesError(f"text encoder folder {folder} is incomplete: no weights "
                                    f"(looked for {', '.join(_WEIGHT_FILES)})")
    if weights[0].endswith(".index.json"):
        try:
            index = json.loads((folder / weights[0]).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TextEncoderFilesError(f"text encoder folder {folder}: cannot read {weights[0]} ({e})") from e
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise TextEncoderFilesError(f"text encoder folder {folder} is incomplete: missing weight shards {missing}")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise TextEncoderFilesError(f"text encoder folder {folder} is incomplete: no tokenizer "
                                    f"(looked for {', '.join(_TOKENIZER_FILES)})")


class FlanT5Encoder(TextEncoder):
    """The reference's Flan-T5(-XL) text encoder (spec: training.md 2.7, transformer.md 3.5).

    Tokenization: ``max_length=512``, ``padding='max_length'``, ``truncation=True``; the tokenizer appends
    ``</s>``. The encoder runs with the attention mask; ``last_hidden_state`` is cast to float32 and only
    the mask==1 rows are kept, so ``lens[i] = attention_mask[i].sum()`` (including ``</s>``) and padding
    rows never reach the transformer.

    Prompts longer than ``max_length`` tokens keep their first ``max_length - 1`` tokens plus ``</s>`` (the
    reference truncates silently; here a ``UserWarning`` names the prompt and its token count).

    dtypes: the reference loads T5 in float16 on the GPU. In its inference scripts the encoder runs inside
    the bf16 autocast region (pass ``autocast_dtype=torch.bfloat16`` for that parity); training runs it in
    plain fp16 (``autocast_dtype=None``). The features are returned in float32 either way.
    """

    def __init__(
        self,
        tokenizer,
        model: torch.nn.Module,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        pad_to_max_length: bool = True,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for one token and </s>), got {max_length}")
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # the compact layout keeps the *first* lens[i] rows
        self.model = model.eval().requires_grad_(False)
        self.width = int(model.config.d_model)
        self.max_length = int(max_length)
        # Padding to 512 is what the reference does; padding to the longest prompt gives the same valid rows
        # (masked keys get zero attention weight) up to float rounding, and is much cheaper on CPU.
        self.pad_to_max_length = pad_to_max_length
        self.autocast_dtype = autocast_dtype

    @classmethod
    def from_pretrained(
        cls,
        local_dir: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        max_length: int = DEFAULT_MAX_LENGTH,
        pad_to_max_length: bool = True,
        autocast_dtype: torch.dtype | None = None,
    ) -> FlanT5Encoder:
        """Load tokenizer and ``T5EncoderModel`` from a local folder (never the hub).

        ``dtype`` defaults to float16 on CUDA (the reference) and float32 elsewhere (fp16 matmuls on CPU are
        slow). A full encoder-decoder checkpoint (the official ``flan-t5-xl`` layout) is fine: the decoder
        weights are ignored. A missing *encoder* weight is an error (no silent random init).
        """
        from transformers import AutoTokenizer, T5EncoderModel

        folder = Path(local_dir).expanduser()
        _check_t5_folder(folder)
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(folder), legacy=True, local_files_only=True, model_max_length=max_length
            )
            model, info = T5EncoderModel.from_pretrained(
                str(folder), dtype=dtype, local_files_only=True, output_loading_info=True
            )
        except (OSError, ValueError, ImportError) as e:
            raise TextEncoderFilesError(f"cannot load the T5 text encoder from {folder}: {e}") from e
        missing = sorted(info.get("missing_keys", ()))
        if missing:
            raise TextEncoderFilesError(f"text encoder folder {folder}: weights missing for {len(missing)} "
                                        f"parameters: {missing[:20]}")
        if len(tokenizer) > model.config.vocab_size:
            raise TextEncoderFilesError(f"text encoder folder {folder}: tokenizer has {len(tokenizer)} tokens but "
                                        f"the model's vocab_size is {model.config.vocab_size}")
        return cls(tokenizer, model.to(device), max_length=max_length, pad_to_max_length=pad_to_max_length,
                   autocast_dtype=autocast_dtype)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> FlanT5Encoder:
        """Move the encoder's weights to ``device`` (the pipeline's ``to`` and CPU offload use this)."""
        self.model.to(device)
        return self

    def set_precision(self, policy: PrecisionPolicy) -> None:
        """Cast the weights to ``policy.text_weights`` and encode under ``policy.text_autocast``."""
        self.model.to(policy.text_dtype)
        self.autocast_dtype = policy.text_autocast_dtype

    def _token_ids(self, prompts: list[str]) -> tuple[list[list[int]], list[int]]:
        """One tokenizer pass: each prompt's ids as the reference feeds them, and its untruncated token count.

        Untruncated ids end in ``</s>``; a prompt over ``max_length`` keeps its first ``max_length - 1`` pieces and
        then ``</s>``, which is what the tokenizer's own ``truncation=True`` gives.
        """
        full = self.tokenizer(prompts, truncation=False, padding=False, verbose=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        kept = [ids if len(ids) <= self.max_length else [*ids[: self.max_length - 1], eos] for ids in full]
        return kept, [len(ids) for ids in full]

    def _padded(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(input_ids_BL, attention_mask_BL)`` to ``max_length`` (or the longest prompt)."""
        length = self.max_length if self.pad_to_max_length else max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for b, x in enumerate(ids):
            input_ids[b, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[b, : len(x)] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids_BL, attention_mask_BL)`` exactly as the reference tokenizes (on the model's device)."""
        return self._padded(self._token_ids(_check_prompts(prompts))[0])

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        prompts = _check_prompts(prompts)
        ids, lengths = self._token_ids(prompts)
        for i, n in enumerate(lengths):
            if n > self.max_length:
                warnings.warn(f"prompt {i} ({prompts[i][:60]!r}...) has {n} tokens; truncated to the first "
                              f"{self.max_length - 1} tokens + </s> (max_length={self.max_length})", stacklevel=2)
        input_ids_BL, mask_BL = self._padded(ids)
        if self.autocast_dtype is not None:
            ctx = torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            hidden_BLC = self.model(input_ids=input_ids_BL, attention_mask=mask_BL).last_hidden_state
        hidden_BLC = hidden_BLC.float()
        lens = mask_BL.sum(dim=-1).tolist()
        # Right padding: the valid rows are each prompt's first lens[i] rows; boolean indexing keeps them in
        # prompt order, which is exactly the concatenation of feat_i[:lens[i]].
        kv_compact = hidden_BLC[mask_BL.bool()]
        return TextEmbeddings(kv_compact, tuple(lens))


# ---------------------------------------------------------------------------------------------------------------
# Prompt templates
# ---------------------------------------------------------------------------------------------------------------


def duration_prefix(seconds: int | float) -> str:
    """``'<<<t={seconds}s>>>'``: the clip-length tag videos were trained and sampled with.

    Whole numbers print without a decimal point (``5`` and ``5.0`` both give ``'<<<t=5s>>>'``), as the
    reference's integer durations do.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0 or seconds != seconds:
        raise ValueError(f"duration must be a non-negative number of seconds, got {seconds!r}")
    text = str(int(seconds)) if float(seconds).is_integer() else str(seconds)
    return f"<<<t={text}s>>>"


def duration_seconds_for_frames(num_frames: int, fps: int = VIDEO_FPS) -> int:
    """Whole seconds of a ``num_frames``-frame video: ``(num_frames - 1) // fps`` (81 -> 5, 161 -> 10 at 16 fps)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    return (num_frames - 1) // fps


def build_prompt(prompt: str, *, duration_s: int | float | None, quality_suffix: str = QUALITY_SUFFIX) -> str:
    """The text the inference scripts encode: ``duration_prefix(D) + prompt + quality_suffix``.

    ``duration_s=None`` means an image (T2I): no prefix, since images were trained without one. Pass
    ``quality_suffix=''`` to leave the prompt as is after the prefix (the interactive model's format).
    """
    text = f"{prompt}{quality_suffix}"  # the prompt was checked at the front door (pipeline.check_inputs)
    return text if duration_s is None else duration_prefix(duration_s) + text


def interactive_prompt(prompt: str, clip_seconds: int = 5) -> str:
    """One interactive turn's text: ``'<<<t=5s>>>' + prompt`` (no quality suffix)."""
    return build_prompt(prompt, duration_s=clip_seconds, quality_suffix="")


# ---------------------------------------------------------------------------------------------------------------
# Training captions
# ---------------------------------------------------------------------------------------------------------------


def truncate_sentences(caption: str, generator: torch.Generator) -> str:
    """Keep the first k sentences, k uniform in [1, n] (the reference's dynamic-length prompts).

    Sentences are the pieces between '.'; captions with fewer than two sentences come back unchanged (and
    draw no random number). The kept pieces are re-joined with '.' and end with '.'. Deviation from the
    reference: pieces holding only whitespace (e.g. after a final '. ') are dropped like empty ones, so a
    trailing space never becomes an extra sentence ``' .'``.
    """
    pieces = [p for p in caption.split(".") if p.strip()]
    if len(pieces) < 2:
        return caption
    k = int(torch.randint(1, len(pieces) + 1, (), generator=generator))
    return ".".join(pieces[:k]) + "."


def maybe_truncate_sentences(caption: str, prob: float, generator: torch.Generator) -> str:
    """With probability ``prob`` (``short_cap_prob``, 0.3 in the release scripts), :func:`truncate_sentences`."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"sentence truncation probability must be in [0, 1], got {prob}")
    if prob > 0 and float(torch.rand((), generator=generator)) < prob:
        return truncate_sentences(caption, generator)
    return caption


def training_caption(
    caption: str,
    *,
    duration_s: int | float | None,
    quality_prompt: str | None = None,
    short_cap_prob: float = 0.0,
    generator: torch.Generator | None = None,
) -> str:
    """A training caption in the reference's order: truncate sentences, append ``' ' + quality_prompt``, prefix.

    ``duration_s`` is the clip's mapped whole-second duration (``None`` for images: no prefix).
    """
    if short_cap_prob > 0:
        if generator is None:
            raise ValueError("training_caption needs a generator when short_cap_prob > 0")
        caption = maybe_truncate_sentences(caption, short_cap_prob, generator)
    if quality_prompt:
        caption = f"{caption} {quality_prompt}"
    return caption if duration_s is None else duration_prefix(duration_s) + caption


# ---------------------------------------------------------------------------------------------------------------
# Condition dropout (training)
# ---------------------------------------------------------------------------------------------------------------


def guidance_dropout_mask(batch_size: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """bool [B]: which samples lose their text this step (``cond_drop_rate``, 0.1 in the reference)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"guidance dropout probability must be in [0, 1], got {p}")
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    return torch.rand(batch_size, generator=generator) < p


# ---------------------------------------------------------------------------------------------------------------
# A small encoder that needs no download
# ---------------------------------------------------------------------------------------------------------------


def _position_table(owner: str, width: int, max_length: int) -> torch.Tensor:
    """Sinusoidal position codes [max_length, width] of the built-in encoders (width even, max_length >= 2)."""
    if width <= 0 or width % 2:
        raise ValueError(f"{owner} width must be a positive even number, got {width}")
    if max_length < 2:
        raise ValueError(f"{owner} max_length must be >= 2, got {max_length}")
    pos = torch.arange(max_length, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, width, 2, dtype=torch.float32) / width)
    table = torch.zeros(max_length, width)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class ByteTextEncoder(TextEncoder, torch.nn.Module):
    """UTF-8 bytes -> learned embeddings + a sinusoidal position code, then one closing token.

    For the tiny presets and the demo model: no tokenizer file, no download, a few thousand parameters
    that live in the pipeline's ``text_encoder`` safetensors. Lower-cased text, so "Red" and "red" agree.
    """

    EOS = 256

    def __init__(self, width: int, max_length: int = 128, seed: int = 0) -> None:
        torch.nn.Module.__init__(self)
        table = _position_table(type(self).__name__, width, max_length)
        self.width = width
        self.max_length = max_length
        gen = torch.Generator().manual_seed(seed)
        self.embedding = torch.nn.Embedding(257, width)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.randn(257, width, generator=gen))
        self.register_buffer("positions", table, persistent=False)

    def token_ids(self, prompt: str) -> torch.Tensor:
        data = list(prompt.strip().lower().encode("utf-8"))[: self.max_length - 1]
        return torch.tensor([*data, self.EOS], dtype=torch.long)

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        prompts = _check_prompts(prompts)
        feats = []
        for p in prompts:
            ids = self.token_ids(p).to(self.embedding.weight.device)
            feats.append((self.embedding(ids) + self.positions[: ids.shape[0]]).float())
        return TextEmbeddings.from_features(feats)


_WORD_TOKEN = re.compile(r"[a-z0-9]+|[^a-z0-9\s]+")
# The file of a pipeline folder's ``text_encoder/`` that lists the words a word encoder was trained on.
VOCABULARY_FILE = "vocabulary.json"


def word_tokens(prompt: str) -> list[str]:
    """The tokens :class:`WordTextEncoder` gives ``prompt`` one vector each: the lower-cased text's words (runs of
    letters and digits) and punctuation runs, in order."""
    return _WORD_TOKEN.findall(prompt.strip().lower())


def unknown_words(vocabulary: Sequence[str] | None, tokens: Sequence[str]) -> list[str]:
    """The distinct ``tokens`` outside ``vocabulary``, in order of appearance; none for an open vocabulary (None)."""
    if vocabulary is None:
        return []
    known = set(vocabulary)
    return list(dict.fromkeys(w for w in tokens if w not in known))


def write_vocabulary(folder: str | os.PathLike, words: Sequence[str]) -> Path:
    """Write ``folder/vocabulary.json`` (``{"words": [...]}``, sorted): the words a word encoder's model knows."""
    path = Path(folder) / VOCABULARY_FILE
    atomic_write_json(path, {"words": sorted(set(words))})
    return path


def read_vocabulary(folder: str | os.PathLike) -> tuple[str, ...] | None:
    """The words of ``folder/vocabulary.json`` (None when there is no such file: an open vocabulary)."""
    path = Path(folder) / VOCABULARY_FILE
    if not path.is_file():
        return None
    try:
        words = json.loads(path.read_text(encoding="utf-8"))["words"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a vocabulary file ({{\"words\": [...]}}): {exc}") from None
    if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
        raise ValueError(f"{path}: 'words' must be a list of non-empty strings")
    return tuple(words)


class WordTextEncoder(TextEncoder, torch.nn.Module):
    """Words -> fixed pseudo-random vectors + a sinusoidal position code, then one closing token.

    The demo model's encoder: no download and no parameters. Lower-cased text is split
    into words (runs of letters and digits) and punctuation runs (:func:`word_tokens`); each distinct word maps to a
    unit-variance Gaussian vector seeded by a hash of the word and ``seed``, so every machine computes the same
    features and an unseen word still gets a vector. One vector per word (instead of one per byte, as
    :class:`ByteTextEncoder`) means a small transformer only has to learn what "red" or "left" mean, not
    also how to spell them: the demo transformer learned prompts within its CPU budget this way.

    Any word gets a vector, but a model only learned the vectors of the words of its training captions: that list
    is ``vocabulary`` (None: not recorded). A word outside it conditions the model on a vector it never saw, so the
    pipeline warns about it (:meth:`unknown_words`).
    """

    def __init__(self, width: int, max_length: int = 128, seed: int = 0,
                 vocabulary: Sequence[str] | None = None) -> None:
        torch.nn.Module.__init__(self)
        table = _position_table(type(self).__name__, width, max_length)
        self.width = width
        self.max_length = max_length
        self.seed = seed
        self.vocabulary: tuple[str, ...] | None = None if vocabulary is None else tuple(sorted(set(vocabulary)))
        self._vectors: dict[str, torch.Tensor] = {}
        self.register_buffer("positions", table, persistent=False)

    def words(self, prompt: str) -> list[str]:
        """The prompt's tokens, truncated to leave room for the closing token."""
        return word_tokens(prompt)[: self.max_length - 1]

    def unknown_words(self, prompt: str) -> list[str]:
        """The distinct tokens of ``prompt`` outside :attr:`vocabulary`, in order of appearance (none when the
        vocabulary is not recorded)."""
        return unknown_words(self.vocabulary, self.words(prompt))

    def vector(self, word: str) -> torch.Tensor:
        """The word's fixed vector (a cache keeps each one computed once per encoder)."""
        vec = self._vectors.get(word)
        if vec is None:
            digest = hashlib.blake2b(f"{self.seed}\x00{word}".encode(), digest_size=8).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
            vec = self._vectors[word] = torch.randn(self.width, generator=gen)
        return vec

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        prompts = _check_prompts(prompts)
        feats = []
        for p in prompts:
            # "\x00" never survives tokenisation, so the closing token cannot collide with a word.
            vecs = torch.stack([self.vector(w) for w in self.words(p)] + [self.vector("\x00")])
            vecs = vecs.to(self.positions.device)
            feats.append(vecs + self.positions[: vecs.shape[0]])
        return TextEmbeddings.from_features(feats)


# ---------------------------------------------------------------------------------------------------------------
# A random stand-in of Flan-T5-XL's encoder (benchmarks and 8B runs with nothing downloaded)
# ---------------------------------------------------------------------------------------------------------------


def flan_t5_xl_config(d_model: int = 2048, num_layers: int = 24):
    """A ``transformers.T5Config`` shaped like Flan-T5-XL's encoder (d_model 2048, 24 layers, 32 heads of 64, gated-GELU
    feed-forward of 5120, vocabulary 32128); ``d_model`` follows the transformer's ``text_channels``."""
    from transformers import T5Config

    return T5Config(d_model=d_model, d_kv=64, d_ff=5120, num_layers=num_layers, num_heads=32, vocab_size=32128,
                    feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)


class _ByteTokenizer:
    """UTF-8 bytes -> ids (pad 0, ``</s>`` 1, bytes from 3 on, modulo the vocabulary) with the slice of the
    Hugging Face tokenizer interface :class:`FlanT5Encoder` calls: deterministic, no vocabulary file."""

    pad_token_id = 0
    eos_token_id = 1

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.padding_side = "right"

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, prompts: Sequence[str], **_: object) -> dict[str, list[list[int]]]:
        return {"input_ids": [[(3 + b) % self.vocab_size for b in p.encode("utf-8")] + [self.eos_token_id]
                              for p in prompts]}


class RandomT5Encoder(FlanT5Encoder):
    """A ``T5EncoderModel`` of ``config``'s shape with random weights and a byte tokenizer, used exactly like
    :class:`FlanT5Encoder` (``encode``, ``to``, ``set_precision``, ``device``).

    For benchmarks and memory checks of the official presets without the Flan-T5-XL download: the features mean
    nothing, but the weights, their dtype and the encoder's compute match the real one's. The model is built on the
    meta device and allocated straight on ``device`` in ``dtype`` (no host copy). Init (seeded): linear weights
    N(0, 1/fan_in), token embeddings N(0, 1), relative position biases N(0, 1/d_model), norm gains 1: every
    activation stays of unit scale, finite in fp16.
    """

    def __init__(self, config, device: torch.device | str = "cpu", *, dtype: torch.dtype = torch.float32,
                 max_length: int = DEFAULT_MAX_LENGTH, pad_to_max_length: bool = True,
                 autocast_dtype: torch.dtype | None = None, seed: int = 0) -> None:
        from transformers import T5EncoderModel

        with torch.device("meta"):
            model = T5EncoderModel(config)
        model.to(dtype)
        model.to_empty(device=device)
        # to_empty gives each module its own storage, which unties the encoder's token embedding from ``shared``
        # (one table in T5, 66M parameters at XL): tie them again before anything is initialised.
        model.encoder.embed_tokens.weight = model.shared.weight
        self._init_weights(model, seed)
        super().__init__(_ByteTokenizer(config.vocab_size), model, max_length=max_length,
                         pad_to_max_length=pad_to_max_length, autocast_dtype=autocast_dtype)

    @staticmethod
    @torch.no_grad()
    def _init_weights(model: torch.nn.Module, seed: int) -> None:
        device = next(model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed)
        d_model = model.config.d_model
        for name, p in model.named_parameters():  # tied parameters are listed once
            if name.endswith("relative_attention_bias.weight"):
                p.normal_(0.0, d_model ** -0.5, generator=gen)
            elif p.ndim == 1:
                p.fill_(1.0)
            elif "embed" in name or name.startswith("shared"):
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
