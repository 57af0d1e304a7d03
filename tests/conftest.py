"""Shared test fixtures: the golden directory of reference numbers."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The reference's numbers ship with the tests (tests/golden, a byte-identical copy of the project's shared golden
# folder; tests/test_golden_copy.py keeps the two from drifting). INFINITYSTAR_GOLDEN points at another copy, e.g.
# one that holds more cases of each kind.
VENDORED_GOLDEN_DIR = REPO_ROOT / "tests" / "golden"
SHARED_GOLDEN_DIR = REPO_ROOT.parent / "shared" / "golden"
GOLDEN_DIR = Path(os.environ.get("INFINITYSTAR_GOLDEN", VENDORED_GOLDEN_DIR))
# CPU runs default to bf16 where the CPU has native bf16 and measures it faster (infinitystar.hardware); the suite's
# numbers must not depend on the machine CI lands on, so it pins fp32 (for the subprocesses it starts too). Tests of
# the choice itself set the variable themselves.
os.environ["INFINITYSTAR_CPU_PRECISION"] = "fp32"


def golden_cases(kind: str) -> list[Path]:
    """Every case folder under golden/<kind>/ (vae, transformer, interactive, frontend, output), sorted by name."""
    root = GOLDEN_DIR / kind
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir())


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip on machines without a CUDA GPU (they run on the GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The golden numbers were produced with 2 threads; keep tests reproducible across machines.
    torch.set_num_threads(2)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread (request it with ``pytestmark = pytest.mark.usefixtures("one_thread")``): for tiny models,
    where extra threads on a shared 2-core machine only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.fail(f"golden directory {GOLDEN_DIR} is missing (set INFINITYSTAR_GOLDEN)")
    return GOLDEN_DIR


def adam_step_bound(betas: tuple[float, float], t: int) -> float:
    """Largest |m_hat| / sqrt(v_hat) of Adam's step t over all gradient sequences (a step is at most lr times it).

    m_t = sum_i (1-b1) b1^(t-i) g_i and v_t = sum_i (1-b2) b2^(t-i) g_i^2, so by Cauchy-Schwarz
    |m_t| <= sqrt(sum_i ((1-b1) b1^(t-i))^2 / ((1-b2) b2^(t-i))) sqrt(v_t); then the bias corrections.
    """
    b1, b2 = betas
    s = sum(((1 - b1) * b1 ** (t - i)) ** 2 / ((1 - b2) * b2 ** (t - i)) for i in range(1, t + 1))
    return math.sqrt(1 - b2**t) / (1 - b1**t) * math.sqrt(s)


FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def layer_reductions(model: torch.nn.Module) -> list[int]:
    """Length of the sum behind each output element of every conv/linear layer (its fan-in) and norm (its width)."""
    lengths = []
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            lengths.append(m.weight[0].numel())
        elif "Norm" in type(m).__name__ and isinstance(getattr(m, "weight", None), torch.Tensor):
            lengths.append(m.weight.numel())
    return lengths


def float32_rounding_tolerance(scale: float, reductions: list[int], spread: float = 6.0) -> float:
    """How far two float32 evaluations of the same formula may drift apart when they round differently (other
    kernels or ISA, summation order, batch/chunk/padding shapes, thread count).

    Model (Higham's probabilistic rounding analysis): a sum of n terms errs by ~sqrt(n) unit roundoffs (2^-24)
    of the magnitudes involved (at most `scale`, the largest value compared); the independent errors of the
    successive sums of a path (`reductions`, their lengths) add in quadrature; the difference of two evaluations
    has sqrt(2) times the error of one. `spread` standard deviations: 6 is exceeded with probability ~2e-9 per
    element under the model. A real bug (a wrong mask, position, slice or weight) changes values by a sizeable
    fraction of `scale`, far above this.
    """
    return spread * math.sqrt(2) * FLOAT32_UNIT_ROUNDOFF * scale * math.sqrt(sum(reductions))


def transformer_rounding_path(model: torch.nn.Module, seq_len: int) -> list[int]:
    """Lengths of the float32 sums behind an InfinityStarTransformer output: every layer's, and per block the
    attention's (scores over head_dim, softmax and weighted sum over up to `seq_len` keys)."""
    return layer_reductions(model) + [model.cfg.head_dim, seq_len, seq_len] * model.cfg.depth


def realistic_transformer(cfg, seed: int = 0):
    """A transformer of ``cfg`` with weights of realistic scale, in eval mode: linear weights N(0, 1)/sqrt(fan_in)
    (unit-gain activations), norm gains 1 + 0.2 N(0, 1), other vectors 0.1 N(0, 1); drawn from a generator seeded
    ``seed``. The tests that compare kernels, precisions or placements use it so that a real bug moves the outputs
    by a sizeable fraction, not by a rounding."""
    from infinitystar.transformer.model import InfinityStarTransformer

    model = InfinityStarTransformer(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 2 and name != "uncond_text":
                p.copy_(noise / math.sqrt(p.shape[1]))
            elif "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
    return model.eval()


def kv_cached_step_logits(model, schedule, *, negative_len: int | None = None, seed: int = 1,
                          device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Every step's logits of a KV-cached generation of ``schedule`` (a list of (t, h, w) scales forming clips), as
    the generation loop drives the model: prefill with guidance (a negative prompt of ``negative_len`` tokens, of
    another length than the prompt's 5, pads a text row: a key mask), then each step on fixed random codes. The
    inputs are drawn on the CPU from ``seed`` and moved to ``device``, so every device sees the same numbers."""
    from infinitystar.generation.schedules import clip_layout

    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(5, cfg.text_channels, generator=gen).to(device)
    negative = None
    if negative_len is not None:
        negative = torch.randn(negative_len, cfg.text_channels, generator=gen).to(device)
    info = clip_layout(schedule)
    out = []
    with torch.no_grad():
        cache = model.new_cache()
        model.prefill_text(text, cache, negative_LC=negative)
        for si, scale in enumerate(schedule):
            x = (torch.randn(1, math.prod(scale), cfg.d_vae, generator=gen) * 0.3).to(device)
            rope = model.step_rope(scale, si, info[si].frame_ss, schedule[-1][1:])
            out.append(model.step(x, rope, cache, refs=info[si].ref_sids, store_as=si))
    return out


def randomized_vae(model, seed: int, trainable: bool = False):
    """``model`` (a VideoVAE) with seeded weights: fan-in gain 1, norm gains 1 + 0.2 N(0, 1), biases 0.05 N(0, 1) and a
    latent scale of 1.37 (so bugs cannot hide behind 1s and 0s); in eval mode, frozen unless ``trainable``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name == "scale_learnable_parameters":
                p.copy_(torch.tensor([1.37, 0.83, 1.21, 0.91]))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5)
    return model.eval().requires_grad_(trainable)
