"""The VAE's fast CPU paths and its streaming decoder.

* ``CausalConv3d`` calls oneDNN directly where ``F.conv3d`` would take torch's slow native kernel
  (``set_conv_impl``): same numbers to float32 rounding, same gradients, no stale weights.
* ``VideoVAE.stream_decoder()`` decodes clip by clip with the causal cache carried over: the same frames as a whole
  decode, bit for bit when the clip cuts match the whole decode's chunks.

Tolerances. A float32 sum of n products (plus a bias) evaluated in any order, blocked, split or fused, errs from the
exact sum by at most gamma_n * (sum of the terms' magnitudes), gamma_n = n u / (1 - n u), u = 2^-24 (Wilkinson's
bound; Higham, Accuracy and Stability of Numerical Algorithms, 3.1). The tests compare each path with a float64
evaluation and that bound, computed per element from |x| and |w|; a wrong tap, padding, cache or bias moves an
output by at least one whole term, ~1/n of the magnitude sum, far above gamma_n (n u).

The speed figures behind the rule are in the comment block above ``set_conv_impl`` in vae/layers.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import float32_rounding_tolerance, layer_reductions, randomized_vae
from infinitystar.config import get_preset, replace
from infinitystar.vae import layers
from infinitystar.vae.layers import CausalConv3d, RMSNorm3d, conv_impl, get_conv_impl, set_conv_impl, use_fast_conv
from infinitystar.vae.model import VideoVAE

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits on a shared machine

U = 2.0**-24  # float32 unit roundoff

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _gamma(n: int) -> float:
    return n * U / (1 - n * U)


def _causal_input(x: torch.Tensor, prev: torch.Tensor | None, k: int) -> torch.Tensor:
    """The frames a k-tap causal conv sees: ``prev`` (the cached context) or k-1 copies of frame 0, then x."""
    if prev is None:
        prev = x[:, :, :1].expand(-1, -1, k - 1, -1, -1)
    return torch.cat([prev, x], dim=2)


def _reference(x_ext: torch.Tensor, conv: torch.nn.Conv3d) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 conv of the causal input, Wilkinson bound of a float32 evaluation) per output element."""
    w, b, pad = conv.weight.detach().double(), conv.bias.detach().double(), conv.padding
    exact = F.conv3d(x_ext.double(), w, b, padding=pad)
    magnitude = F.conv3d(x_ext.double().abs(), w.abs(), b.abs(), padding=pad)
    return exact, _gamma(w[0].numel() + 1) * magnitude


def _conv(c_in: int, c_out: int, k: int, seed: int) -> CausalConv3d:
    torch.manual_seed(seed)
    m = CausalConv3d(c_in, c_out, k)
    with torch.no_grad():
        m.conv.bias.normal_(0, 0.1)  # non-zero, so a dropped bias shows
    return m


def _spy(monkeypatch) -> list[tuple[int, ...]]:
    """Records the input shape of every direct oneDNN call."""
    calls: list[tuple[int, ...]] = []
    real = layers.onednn_conv

    def spy(x, conv):
        calls.append(tuple(x.shape))
        return real(x, conv)

    monkeypatch.setattr(layers, "onednn_conv", spy)
    return calls


# ----------------------------------------------------------------------------------------------
# The switch and the rule
# ----------------------------------------------------------------------------------------------


def test_conv_impl_switch_and_context_manager():
    assert get_conv_impl() == "auto"
    with conv_impl("conv3d"):
        assert get_conv_impl() == "conv3d"
        with pytest.raises(RuntimeError), conv_impl("onednn"):
            assert get_conv_impl() == "onednn"
            raise RuntimeError("restored even on error")
        assert get_conv_impl() == "conv3d"
    assert get_conv_impl() == "auto"
    assert set_conv_impl("conv3d") == "auto"
    assert set_conv_impl("auto") == "conv3d"
    with pytest.raises(ValueError, match=r"^conv impl must be one of \('auto', 'conv3d', 'onednn'\); got 'fast'$"):
        set_conv_impl("fast")
    assert get_conv_impl() == "auto"


@needs_onednn
@pytest.mark.parametrize(
    "impl, c, k, hw, dtype, expected",
    [
        ("auto", 16, 3, (16, 16), torch.float32, True),  # the demo decoder's slow native-conv3d shapes
        ("auto", 16, 3, (16, 24), torch.float32, True),
        ("auto", 64, 3, (8, 8), torch.float32, False),  # small frames: F.conv3d's native kernel is as fast
        ("auto", 16, 1, (32, 32), torch.float32, False),  # 1x1x1: a GEMM in F.conv3d, faster
        ("auto", 16, 3, (32, 32), torch.bfloat16, False),  # F.conv3d already runs oneDNN in bf16
        ("conv3d", 16, 3, (32, 32), torch.float32, False),
        ("onednn", 16, 1, (8, 8), torch.float32, True),
    ],
)
def test_rule(impl, c, k, hw, dtype, expected):
    x = torch.zeros(1, c, 3, *hw, dtype=dtype)
    w = torch.zeros(c, c, k, k, k, dtype=dtype)
    with conv_impl(impl):
        assert use_fast_conv(x, w) is expected
        enabled, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False  # (flags() warns on TF32)
        try:
            assert use_fast_conv(x, w) is False  # the user's switch wins
        finally:
            torch.backends.mkldnn.enabled = enabled
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert use_fast_conv(x, w) is False  # F.conv3d would autocast; the direct call would not


def test_module_tree_and_state_dict_unchanged():
    """The checkpoint layout: ``conv.weight`` stays the 5-D Conv3d weight, nothing else is registered."""
    m = CausalConv3d(16, 32, 3)
    sd = m.state_dict()
    assert list(sd) == ["conv.weight", "conv.bias"]
    assert sd["conv.weight"].shape == (32, 16, 3, 3, 3)
    assert [n for n, _ in m.named_modules()] == ["", "conv"]
    assert [n for n, _ in m.named_buffers()] == []


# ----------------------------------------------------------------------------------------------
# Numbers, gradients, weight updates
# ----------------------------------------------------------------------------------------------


@needs_onednn
@pytest.mark.parametrize("impl", ["conv3d", "auto", "onednn"])
@pytest.mark.parametrize(
    "b, c_in, c_out, k, t, h, w",
    [
        (1, 16, 16, 3, 4, 16, 16),
        (1, 8, 3, 3, 3, 16, 20),  # few output channels (the decoder's conv_out), non-square
        (2, 16, 32, 3, 1, 16, 16),  # batch 2, one frame
        (1, 16, 32, 1, 2, 16, 16),  # 1x1x1 (SpatialNorm3d's)
        (1, 32, 8, 3, 2, 8, 8),
    ],
)
def test_paths_match_float64_reference(monkeypatch, impl, b, c_in, c_out, k, t, h, w):
    """Every path, first chunk (replicated frame 0) and cached chunk, is within Wilkinson's bound of float64."""
    calls = _spy(monkeypatch)
    m = _conv(c_in, c_out, k, seed=c_in + k)
    g = torch.Generator().manual_seed(t)
    x1, x2 = torch.randn(b, c_in, t, h, w, generator=g), torch.randn(b, c_in, t + 1, h, w, generator=g)
    cache: layers.FeatureCache = {}
    with torch.no_grad(), conv_impl(impl):
        y1, y2 = m(x1, cache), m(x2, cache)
        fast = use_fast_conv(x1, m.conv.weight)
    ext1 = _causal_input(x1, None, k)
    ext2 = _causal_input(x2, ext1[:, :, ext1.shape[2] - (k - 1):] if k > 1 else None, k)
    for y, ext in ((y1, ext1), (y2, ext2)):
        exact, bound = _reference(ext, m.conv)
        assert y.shape == exact.shape
        assert ((y.double() - exact).abs() <= bound).all(), f"max excess {((y.double() - exact).abs() - bound).max()}"
        assert bound.max() < 1e-3 * exact.abs().max()  # the bound is tight enough to see a wrong term
    assert len(calls) == (2 if fast else 0)


@needs_onednn
@pytest.mark.parametrize("k, hw", [(3, 16), (1, 16), (3, 8)])
def test_gradients_match_conv3d_path(k, hw):
    """Training through both paths: the same gradients for the weight, the bias and the input (through the cache)."""
    grads = {}
    for impl in ("conv3d", "onednn"):
        m = _conv(16, 8, k, seed=3).train()
        g = torch.Generator().manual_seed(5)
        x1 = torch.randn(1, 16, 2, hw, hw, generator=g, requires_grad=True)
        x2 = torch.randn(1, 16, 3, hw, hw, generator=g, requires_grad=True)
        go1, go2 = torch.randn(1, 8, 2, hw, hw, generator=g), torch.randn(1, 8, 3, hw, hw, generator=g)
        cache: layers.FeatureCache = {}
        with conv_impl(impl):
            loss = (m(x1, cache) * go1).sum() + (m(x2, cache) * go2).sum()
        loss.backward()
        grads[impl] = [m.conv.weight.grad, m.conv.bias.grad, x1.grad, x2.grad]
        if impl == "conv3d":
            # float64 reference and magnitude sums (the same computation on |.|, giving sum |g||x| etc.)
            ref, mag = [], []
            for absolute in (False, True):
                m64 = copy.deepcopy(m).double()
                xs = [x1.detach().double(), x2.detach().double()]
                gos = [go1.double(), go2.double()]
                if absolute:
                    with torch.no_grad():
                        for p in m64.parameters():
                            p.abs_()
                    xs, gos = [v.abs() for v in xs], [v.abs() for v in gos]
                m64.zero_grad()
                xs = [v.requires_grad_() for v in xs]
                c64: layers.FeatureCache = {}
                ((m64(xs[0], c64) * gos[0]).sum() + (m64(xs[1], c64) * gos[1]).sum()).backward()
                (mag if absolute else ref).append([m64.conv.weight.grad, m64.conv.bias.grad, xs[0].grad, xs[1].grad])
    # Longest sum behind a gradient element: the weight/bias gradients sum over every output position of both
    # chunks (2 + 3 frames x hw^2); an input gradient over k^3 * 8 taps times up to k frame copies (frame 0's).
    n = max(5 * hw * hw, k**3 * 8 * k) + 1
    for name, fast, plain, exact, magnitude in zip(("weight", "bias", "x1", "x2"), grads["onednn"], grads["conv3d"],
                                                   ref[0], mag[0], strict=True):
        for got in (fast, plain):
            assert ((got.double() - exact).abs() <= _gamma(n) * magnitude).all(), name
        assert (fast - plain).abs().max() <= 2 * _gamma(n) * magnitude.max(), name


@needs_onednn
def test_weight_updates_are_seen():
    """An optimizer step and a load_state_dict both change the next output (nothing derived is cached)."""
    m = _conv(16, 16, 3, seed=7).train()
    x = torch.randn(1, 16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ext = _causal_input(x, None, 3)
    with conv_impl("onednn"):
        y0 = m(x).detach()
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(x).square().mean().backward()
        opt.step()
        y1 = m(x).detach()
        stepped = copy.deepcopy(m.conv)
        other = _conv(16, 16, 3, seed=8)
        m.load_state_dict(other.state_dict())
        y2 = m(x).detach()
    for y, conv in ((y1, stepped), (y2, other.conv)):
        exact, bound = _reference(ext, conv)
        assert ((y.double() - exact).abs() <= bound).all()
    exact0, bound0 = _reference(ext, _conv(16, 16, 3, seed=7).conv)
    assert ((y0.double() - exact0).abs() <= bound0).all()
    assert (y1 - y0).abs().max() > 1e3 * bound0.max()  # the step moved the output, far beyond rounding


def test_rms_norm_is_normalize_times_gain():
    """The written-out norm equals F.normalize(x) * sqrt(C) * gamma; an all-zero position gives 0 and, in training,
    F.normalize's finite gradient (no NaN from the sqrt at 0)."""
    norm = RMSNorm3d(16)
    with torch.no_grad():
        norm.gamma.normal_(1, 0.2)
    x = torch.randn(1, 16, 2, 4, 5, generator=torch.Generator().manual_seed(1))
    x[:, :, 1, 2, 3] = 0
    x.requires_grad_()
    y = norm(x)
    x64 = x.detach().double().requires_grad_()
    want = F.normalize(x64, dim=1) * 4.0 * norm.gamma.detach().double()
    # Relative error of each output: 16 squares summed (gamma_16), then the sqrt, the division and two products (one
    # rounding each, the sqrt halving its input's error): within gamma_21.
    assert ((y.double() - want).abs() <= _gamma(21) * want.abs()).all()
    assert (y[:, :, 1, 2, 3] == 0).all()
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y * go).sum().backward()
    (want * go.double()).sum().backward()
    assert torch.isfinite(x.grad).all()
    # dL/dx = (G - x (x.G) / ||x||^2) / ||x|| with G = go * sqrt(C) * gamma (G / 1e-12 at the zero position): two
    # 16-term sums and a few single roundings, so within gamma_40 of the magnitudes of its terms.
    g64 = go.double() * 4.0 * norm.gamma.detach().double()
    nx = x64.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)
    magnitude = (g64.abs() + x64.detach().abs() * (g64 * x64.detach()).abs().sum(1, keepdim=True) / nx**2) / nx
    assert ((x.grad.double() - x64.grad).abs() <= _gamma(40) * magnitude).all()


# ----------------------------------------------------------------------------------------------
# Streaming decoder
# ----------------------------------------------------------------------------------------------


def _random_vae(preset: str, seed: int, **changes) -> VideoVAE:
    """A VAE of ``preset`` (with ``changes``) of seeded, unit-gain weights (conftest.randomized_vae), trainable."""
    return randomized_vae(VideoVAE(replace(get_preset("vae", preset), **changes)), seed, trainable=True)


@pytest.fixture(scope="module")
def tiny_vae() -> VideoVAE:
    return _random_vae("tiny-test", seed=2)


def _latent(t: int, h: int = 2, w: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 64, t, h, w, generator=torch.Generator().manual_seed(seed))


def _stream(vae: VideoVAE, latent: torch.Tensor, clips: list[int]) -> tuple[torch.Tensor, list[int]]:
    stream, outs, start = vae.stream_decoder(), [], 0
    for n in clips:
        outs.append(stream.decode(latent[:, :, start:start + n], start=start))
        start += n
    assert stream.latent_frames_done == latent.shape[2]
    assert stream.pixel_frames_done == sum(o.shape[2] for o in outs)
    return torch.cat(outs, dim=2), [o.shape[2] for o in outs]


@pytest.mark.parametrize("clips", [[1, 8], [1, 2, 6], [3, 4, 2], [9]])
def test_stream_is_bitwise_whole_decode_on_aligned_clips(tiny_vae, clips):
    """decode_latent_batch=2, 9 latents: whole decode chunks [0,1) [1,3) [3,5) ...; clips cut on those bounds."""
    z = _latent(9)
    with torch.no_grad():
        whole = tiny_vae.decode(z)
        streamed, frames = _stream(tiny_vae, z, clips)
    assert frames == [1 + 4 * (clips[0] - 1)] + [4 * n for n in clips[1:]]
    assert torch.equal(streamed, whole)


@pytest.mark.parametrize("clips", [[1, 3, 5], [2, 7], [1, 1, 1, 6]])
def test_stream_matches_whole_decode_on_other_clips(tiny_vae, clips):
    """Other cuts run other decoder chunk shapes, so kernels may round differently: equal to rounding."""
    z = _latent(9, seed=1)
    with torch.no_grad():
        whole = tiny_vae.decode(z)
        streamed, _ = _stream(tiny_vae, z, clips)
    scale = max(whole.abs().max().item(), streamed.abs().max().item())
    assert (streamed - whole).abs().max().item() <= float32_rounding_tolerance(scale, layer_reductions(tiny_vae))


def test_stream_of_demo_sized_vae_is_bitwise_whole_decode():
    """The shipped demo's architecture and clip layout: the first-frame latent, then one 8-latent clip (64x64)."""
    vae = _random_vae("demo", seed=3)
    z = _latent(9, 4, 4, seed=4)
    with torch.no_grad():
        whole = vae.decode(z)
        streamed, frames = _stream(vae, z, [1, 8])
    assert frames == [1, 32]
    assert torch.equal(streamed, whole)


@pytest.mark.parametrize(
    "second, kwargs, message",
    [
        (_latent(2, 2, 4), {}, r"latent size 2x4.*started with batch 1, 2x3"),
        (torch.cat([_latent(2), _latent(2)]), {}, r"has batch 2.*started with batch 1"),
        (_latent(2).double(), {}, r"torch\.float64.*torch\.float32"),
        (_latent(2), {"start": 0}, r"starts at latent frame 0 but the stream has decoded 1 latent frames"),
        (_latent(2)[:, :32], {}, r"latent must have 64 channels on dim 1; got 32"),
        (_latent(2)[:, :, :0], {}, r"latent has an empty dimension"),
    ],
    ids=["size", "batch", "dtype", "start", "channels", "empty"],
)
def test_stream_rejects_chunks_breaking_the_rule(tiny_vae, second, kwargs, message):
    stream = tiny_vae.stream_decoder()
    with torch.no_grad():
        stream.decode(_latent(1), start=0)
        with pytest.raises(ValueError, match=message) as err:
            stream.decode(second, **kwargs)
    assert "\n" not in str(err.value)
    assert stream.latent_frames_done == 1  # a rejected chunk changes nothing
