"""GPU memory of fine-tuning the official 8B transformer: full fine-tuning vs LoRA, computed from the configs.

Nothing runs on a GPU: the model is built on the meta device (shapes only) and every figure below is a count of
bytes. Printed side by side for ``official-8b-480p`` (one 480p 5 s sample) and ``official-8b-720p`` (one 720p 5 s
sample), for full fine-tuning and LoRA rank 16 / 64 on attention+mlp and on attention only:

    .venv/bin/python benchmarks/bench_lora_memory.py             # the tables
    .venv/bin/python benchmarks/bench_lora_memory.py --json      # the same numbers as JSON
    .venv/bin/python benchmarks/bench_lora_memory.py --lora-base fp32 --fsdp 4 --batch 1 2

Parameters and states (P = parameters; "blocks" = the 36 transformer blocks, "other" = embeddings, heads,
final norm, learned unconditional text):

* trainable: full = P; LoRA = sum over the adapted ``nn.Linear`` layers of ``r * (in + out)`` (``lora_A`` is
  ``r x in``, ``lora_B`` is ``out x r``; PEFT adds no bias), layers from ``transformer.lora.target_module_names``.
* weights as held: full = 4 B x P (the trainer's fp32 master weights; bf16 only inside autocast). LoRA (default
  ``--lora-base bf16``) = 2 B x P_blocks + 4 B x P_other (the pipeline's bf16 policy: blocks bf16, embeddings and
  heads fp32) + 4 B x P_lora (the adapter trains in fp32). ``--lora-base fp32`` holds the frozen blocks in fp32.
* gradients 4 B and AdamW state 2 x 4 B per trainable parameter (``optimizer.zero_grad(set_to_none=True)``, so
  gradients exist only from the backward pass to the step).
* autocast weight cache (measured on CPU with torch's autocast): a weight that trains (a leaf that requires grad)
  is cast to bf16 once per autocast region and the copy is kept until the region ends, activation checkpointing or
  not. ``train.step.packed_loss`` runs the whole forward in one region, so at the end of the forward full
  fine-tuning holds a bf16 copy of every block linear (2 B x P_block_linear), also under FSDP2 with fp32
  parameters (the cached copies are not sharded). Frozen weights are cast per use and not cached.

Activations of one packed sequence of L tokens (batch b = b samples packed; text 512 tokens per sample; total
padded to ``pad_to_multiplier``), with per-block activation checkpointing, under bf16 autocast. C = embed_dim,
H / Hk = query / key-value heads, D = head_dim, I = mlp_intermediate, r = rank. The residual stream stays fp32
(the embeddings run in fp32 and ``x + attn(...)`` promotes), so the saved block inputs are 4 B, not 2 B, per value:

* saved block inputs: L x C x 4 B x depth, plus the RoPE table (L x 4D B) shared by all blocks;
* outside the blocks: L x (8C + 16 x detail_bits) B (last block output and final norm output fp32, bit logits
  and their log-softmax fp32; counted for every token, an upper bound);
* one block's recompute (the forward again, its saved tensors kept for backward), per token, bytes:
  - norms: q_norm / k_norm keep their fp32 input (4HD + 4HkD), mlp_norm its fp32 input h (4C); when their
    weights train (full) also their fp32 outputs (4C + 4HD + 4HkD + 4C); rsqrt per row (4 + 4H + 4Hk + 4);
  - attention (flash / flex, no L x L matrix): q, out (2HD each), k, v (2HkD each) bf16, logsumexp 4H;
  - SwiGLU: gate output, silu output, up output bf16 (6I);
  - every linear whose weight trains or that carries an adapter keeps its bf16 input (2 x in; autocast casts
    the fp32 norm output once per projection: q, k, v and gate, up each keep a 2C copy; o keeps 2HD, down 2I);
    each adapter also keeps its ``lora_A`` output (2r);
  => full: 22C + 14HD + 12HkD + 8I (+ small); LoRA attn+mlp: 14C + 10HD + 8HkD + 8I + 14r; LoRA attn: 10C + 10HD
  + 8HkD + 6I + 8r. (Checked against autograd's saved tensors on CPU in tests/test_bench_lora_memory.py.)
* the block backward on top (estimate): the fp32 gradients of the block output and input (8C) plus the larger of
  the SwiGLU gradients (three bf16 L x I: 6I) and the attention gradients (dq, dk, dv, an fp32 dq accumulator and
  the row terms: 6HD + 4HkD + 4H); plus one block's bf16 weight copies where the block weights are fp32.
* the forward of one block (not saved, estimate): 6C + 6I per token.

Peak = the largest of three moments: end of forward (states + saved inputs + outside + one block's forward +
autocast cache), start of backward (+ one block's recompute and gradients), end of backward (all gradients, one
block's input and recompute). FSDP2 over N GPUs (``--fsdp``, batch per GPU): weights, gradients and AdamW state
divided by N, plus what FSDP gathers: two blocks (the running one and the prefetched one) in the held dtype and
the root's "other" parameters (kept gathered), and one block's unsharded fp32 gradients before reduce-scatter.
"Fits" compares the peak plus ``--reserve-gib`` (CUDA context, cuBLAS workspace, NCCL buffers, fragmentation)
with 24 / 48 / 80 GiB. Sequences use the full schedule; training draws scale subsets (shorter sequences), so the
activation figures are the longest case.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from infinitystar.config import TransformerConfig, get_preset
from infinitystar.generation.schedules import build_scale_schedule, nearest_h_div_w_template, visual_tokens
from infinitystar.transformer.lora import target_module_names
from infinitystar.transformer.model import InfinityStarTransformer

GIB = 2**30
TEXT_TOKENS = 512  # the text prefix of a sample (text_maxlen of the official presets)
FRAMES = 81  # 5 s at 16 fps
ASPECT = 9 / 16  # h / w of a 16:9 video
CAPACITIES_GIB = (24, 48, 80)
# Each official preset with the pixel budget it was trained for (pn of the official-480p / -720p pipelines).
PRESET_PN = {"official-8b-480p": "0.40M", "official-8b-720p": "0.90M"}


@dataclass(frozen=True)
class Method:
    """Full fine-tuning (``rank`` None) or one LoRA adapter on ``targets`` (groups of ``TARGET_GROUPS``)."""

    name: str
    rank: int | None = None
    targets: tuple[str, ...] = ()

    @property
    def lora(self) -> bool:
        return self.rank is not None


METHODS = (
    Method("full"),
    Method("lora r16 attn+mlp", 16, ("attention", "mlp")),
    Method("lora r64 attn+mlp", 64, ("attention", "mlp")),
    Method("lora r16 attn", 16, ("attention",)),
    Method("lora r64 attn", 64, ("attention",)),
)


@dataclass(frozen=True)
class ModelShapes:
    """Parameter counts of a transformer config, read from a meta-device model."""

    cfg: TransformerConfig
    total: int
    blocks: int  # all blocks
    block_linear: int  # the nn.Linear parameters of one block
    block_linears: dict[str, tuple[int, int]]  # one block's linear layers: name in the block -> (in, out)
    model: nn.Module  # the meta model, for target_module_names

    @property
    def other(self) -> int:
        return self.total - self.blocks

    @property
    def per_block(self) -> int:
        return self.blocks // self.cfg.depth


def model_shapes(cfg: TransformerConfig) -> ModelShapes:
    with torch.device("meta"):
        model = InfinityStarTransformer(cfg)
    block = model.blocks[0]
    linears = {name: (m.in_features, m.out_features) for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    block_linear = sum(p.numel() for m in block.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    return ModelShapes(cfg, total=sum(p.numel() for p in model.parameters()),
                       blocks=sum(p.numel() for p in model.blocks.parameters()), block_linear=block_linear,
                       block_linears=linears, model=model)


def adapted_layers(shapes: ModelShapes, method: Method) -> dict[str, tuple[int, int]]:
    """Full name -> (in, out) of every linear layer the method's adapter wraps (empty for full fine-tuning)."""
    if not method.lora:
        return {}
    modules = dict(shapes.model.named_modules())
    return {n: (modules[n].in_features, modules[n].out_features)
            for n in target_module_names(shapes.model, method.targets)}


def lora_parameters(layers: dict[str, tuple[int, int]], rank: int) -> int:
    """``r * (in + out)`` per adapted linear: lora_A [r, in] + lora_B [out, r]."""
    return sum(rank * (fin + fout) for fin, fout in layers.values())


def block_recompute_bytes_per_token(cfg: TransformerConfig, block_linears: dict[str, tuple[int, int]], *,
                                    base_trains: bool, adapted: Collection[str] = (), rank: int = 0) -> int:
    """Bytes per token one block keeps for its backward when recomputed under bf16 autocast (the module
    docstring's list; the block input itself excluded: the checkpoint already holds it). ``adapted``: the names
    within the block (``attn.q_proj``) of the linears that carry an adapter of ``rank``."""
    C, H, Hk, D, I = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_intermediate
    n = 4 * H * D + 4 * Hk * D + 4 * C  # fp32 inputs of q_norm, k_norm, mlp_norm (attn_norm's is the block input)
    n += 4 * (1 + H + Hk + 1)  # their rsqrt per row
    if base_trains:
        n += 4 * C + 4 * H * D + 4 * Hk * D + 4 * C  # fp32 norm outputs, for the norm weights' gradients
    n += 2 * H * D * 2 + 2 * Hk * D * 2 + 4 * H  # attention kernel: q, out, k, v (bf16), logsumexp (fp32)
    n += 3 * 2 * I  # SwiGLU: gate output, silu output, up output (bf16)
    for name, (fin, _) in block_linears.items():
        if base_trains or name in adapted:
            n += 2 * fin  # the linear's bf16 input, for its weight's (or its lora_A's) gradient
    return n + 2 * rank * sum(1 for name in block_linears if name in adapted)  # lora_A outputs


def backward_transient_bytes_per_token(cfg: TransformerConfig) -> int:
    """Gradients alive while one block runs backward (estimate; module docstring)."""
    C, H, Hk, D, I = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_intermediate
    return 8 * C + max(6 * I, 6 * H * D + 4 * Hk * D + 4 * H)


def forward_transient_bytes_per_token(cfg: TransformerConfig) -> int:
    return 6 * cfg.embed_dim + 6 * cfg.mlp_intermediate


def sample_tokens(pn: str) -> int:
    """Visual tokens of one 5 s 16:9 sample at pixel budget ``pn`` (the full schedule)."""
    return visual_tokens(build_scale_schedule(pn, nearest_h_div_w_template(ASPECT), FRAMES))


def sequence_tokens(cfg: TransformerConfig, visual: int, batch: int) -> int:
    total = batch * (visual + TEXT_TOKENS)
    return math.ceil(total / cfg.pad_to_multiplier) * cfg.pad_to_multiplier


@dataclass(frozen=True)
class States:
    """Bytes of the model states of one method (whole model, unsharded)."""

    trainable: int
    trainable_per_block: int
    weights: int
    block_weights: int  # one block as held (adapter included)
    other_weights: int
    grads: int
    adamw: int
    autocast_cache: int  # end of forward: bf16 copies of the trained weights
    block_weight_copies: int  # one block's bf16 copies during its recompute
    layers: dict[str, tuple[int, int]]


def method_states(shapes: ModelShapes, method: Method, lora_base_bytes: int) -> States:
    cfg = shapes.cfg
    if not method.lora:
        return States(trainable=shapes.total, trainable_per_block=shapes.per_block, weights=4 * shapes.total,
                      block_weights=4 * shapes.per_block, other_weights=4 * shapes.other, grads=4 * shapes.total,
                      adamw=8 * shapes.total, autocast_cache=2 * shapes.block_linear * cfg.depth,
                      block_weight_copies=2 * shapes.block_linear, layers={})
    assert method.rank is not None
    layers = adapted_layers(shapes, method)
    lora = lora_parameters(layers, method.rank)
    in_blocks = lora_parameters({n: s for n, s in layers.items() if n.startswith("blocks.")}, method.rank)
    per_block = in_blocks // cfg.depth
    base_copies = 2 * shapes.block_linear if lora_base_bytes == 4 else 0  # frozen fp32 weights, cast per use
    return States(trainable=lora, trainable_per_block=per_block,
                  weights=lora_base_bytes * shapes.blocks + 4 * shapes.other + 4 * lora,
                  block_weights=lora_base_bytes * shapes.per_block + 4 * per_block,
                  other_weights=4 * shapes.other + 4 * (lora - in_blocks), grads=4 * lora, adamw=8 * lora,
                  autocast_cache=2 * lora, block_weight_copies=base_copies + 2 * per_block, layers=layers)


def activations(shapes: ModelShapes, method: Method, states: States, tokens: int) -> dict[str, int]:
    """Activation bytes of one packed sequence of ``tokens`` tokens (module docstring)."""
    cfg = shapes.cfg
    in_block = {n.split(".", 2)[2] for n in states.layers if n.startswith("blocks.0.")}
    per_token = block_recompute_bytes_per_token(cfg, shapes.block_linears, base_trains=not method.lora,
                                                adapted=in_block, rank=method.rank or 0)
    return {
        "saved_block_inputs": tokens * (4 * cfg.embed_dim * cfg.depth + 4 * cfg.head_dim),
        "outside_blocks": tokens * (8 * cfg.embed_dim + 16 * cfg.detail_bits),
        "block_recompute": tokens * (per_token + backward_transient_bytes_per_token(cfg))
        + states.block_weight_copies,
        "block_forward": tokens * forward_transient_bytes_per_token(cfg),
        "one_block_input": tokens * (4 * cfg.embed_dim + 4 * cfg.head_dim),
    }


def peak(states: States, act: dict[str, int], world: int) -> tuple[int, str]:
    """(bytes, moment) of the largest of end of forward / start of backward / end of backward, per GPU."""
    sharded = (states.weights + states.adamw) // world
    gathered = 0 if world == 1 else 2 * states.block_weights + states.other_weights
    block_grads = 4 * states.trainable_per_block  # unsharded, before reduce-scatter (or the first block's, alone)
    all_grads = states.grads if world == 1 else states.grads // world + block_grads
    moments = {
        "forward": sharded + gathered + act["saved_block_inputs"] + act["outside_blocks"] + act["block_forward"]
        + states.autocast_cache,
        "backward start": sharded + gathered + act["saved_block_inputs"] + act["outside_blocks"]
        + act["block_recompute"] + block_grads,
        "backward end": sharded + gathered + all_grads + act["one_block_input"] + act["block_recompute"],
    }
    moment = max(moments, key=lambda k: moments[k])
    return moments[moment], moment


def estimate(preset: str, pn: str, *, batches: Sequence[int], world: int, lora_base_bytes: int,
             reserve_gib: float, methods: Sequence[Method] = METHODS) -> dict:
    cfg = get_preset("transformer", preset)
    shapes = model_shapes(cfg)
    visual = sample_tokens(pn)
    out: dict = {"pn": pn, "visual_tokens": visual, "text_tokens": TEXT_TOKENS,
                 "parameters": {"total": shapes.total, "blocks": shapes.blocks, "other": shapes.other},
                 "methods": {}}
    for method in methods:
        states = method_states(shapes, method, lora_base_bytes)
        per_sample = activations(shapes, method, states, sequence_tokens(cfg, visual, 1))
        row: dict = {"trainable": states.trainable, "fraction": states.trainable / shapes.total,
                     "bytes": {"weights": states.weights, "grads": states.grads, "adamw": states.adamw,
                               "autocast_cache": states.autocast_cache},
                     "activations_batch1": per_sample}
        for key, w in (("one_gpu", 1), (f"fsdp{world}", world)):
            row[key] = {}
            for b in batches:
                total, moment = peak(states, activations(shapes, method, states, sequence_tokens(cfg, visual, b)), w)
                fits = [c for c in CAPACITIES_GIB if total / GIB + reserve_gib <= c]
                row[key][b] = {"bytes": total, "gib": round(total / GIB, 2), "moment": moment, "fits_gib": fits}
        out["methods"][method.name] = row
    return out


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def print_tables(results: dict, batches: Sequence[int], world: int) -> None:
    a = results["assumptions"]
    print(f"LoRA base blocks {a['lora_base']}, full fine-tuning fp32 master weights; grads fp32, AdamW 2 x fp32 per "
          f"trainable parameter; bf16 autocast, per-block activation checkpointing; fits = peak + "
          f"{a['reserve_gib']} GiB reserve <= capacity.\n"
          "ac-cache: bf16 copies autocast keeps of the trained weights until the forward ends; saved in: the saved "
          "block inputs (fp32 residual stream); outside: final norm and logits; recomp: one block's recompute + "
          "backward.")
    for preset, r in results["presets"].items():
        p = r["parameters"]
        print(f"\n== {preset}: {p['total'] / 1e9:.3f} B parameters ({p['blocks'] / 1e9:.3f} B in blocks); one 5 s "
              f"sample at {r['pn']} = {r['visual_tokens']:,} visual + {r['text_tokens']} text tokens ==")
        print(f"{'method':<18} {'trainable':>13} {'% model':>8} | GiB: {'weights':>7} {'grads':>6} {'AdamW':>6} "
              f"{'ac-cache':>8} | b=1 act: {'saved in':>8} {'outside':>7} {'recomp':>6}")
        for name, m in r["methods"].items():
            b, a = m["bytes"], m["activations_batch1"]
            print(f"{name:<18} {m['trainable']:>13,} {100 * m['fraction']:>8.3f} | {'':4} {_gib(b['weights']):>7} "
                  f"{_gib(b['grads']):>6} {_gib(b['adamw']):>6} {_gib(b['autocast_cache']):>8} | {'':8} "
                  f"{_gib(a['saved_block_inputs']):>8} {_gib(a['outside_blocks']):>7} {_gib(a['block_recompute']):>6}")
        for key, title in (("one_gpu", "one GPU"), (f"fsdp{world}", f"FSDP2 over {world} GPUs, per GPU, batch "
                                                                     "per GPU")):
            print(f"-- {title}: peak GiB (fits of {'/'.join(map(str, CAPACITIES_GIB))} GiB) --")
            print(f"{'method':<18} " + " ".join(f"{'b=' + str(b):>16}" for b in batches))
            for name, m in r["methods"].items():
                cells = []
                for b in batches:
                    c = m[key][b]
                    fits = "/".join(map(str, c["fits_gib"])) or "-"
                    cells.append(f"{c['gib']:>7.1f} ({fits:>7})")
                print(f"{name:<18} " + " ".join(f"{cell:>16}" for cell in cells))


def main(argv: Sequence[str] | None = None) -> dict:
    """Compute (and print) the estimates; returns the JSON-ready results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", action="append", help="transformer preset (repeatable; default: both official 8B)")
    ap.add_argument("--pn", help="pixel budget of the sample (default: the preset's: 0.40M for 480p, 0.90M for 720p)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4], help="samples per GPU")
    ap.add_argument("--fsdp", type=int, default=8, help="GPUs of the FSDP2 table")
    ap.add_argument("--lora-base", choices=["bf16", "fp32"], default="bf16",
                    help="dtype of the frozen block weights of a LoRA run")
    ap.add_argument("--reserve-gib", type=float, default=1.0, help="added to the peak before comparing with a GPU")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = ap.parse_args(argv)
    presets = args.preset or list(PRESET_PN)
    if any(b < 1 for b in args.batch):
        ap.error(f"--batch values must be >= 1, got {args.batch}")
    if args.fsdp < 2:
        ap.error(f"--fsdp must be >= 2 GPUs, got {args.fsdp}")
    if args.reserve_gib < 0:
        ap.error(f"--reserve-gib must be >= 0, got {args.reserve_gib}")
    results: dict = {"assumptions": {
        "lora_base": args.lora_base, "reserve_gib": args.reserve_gib, "fsdp_world": args.fsdp,
        "text_tokens": TEXT_TOKENS, "frames": FRAMES, "aspect_h_div_w": ASPECT,
        "full_weights": "fp32 master", "grads": "fp32, trainable only", "adamw": "2 x fp32 per trainable",
        "residual_stream": "fp32 (saved block inputs 4 B per value)"}, "presets": {}}
    for preset in presets:
        pn = args.pn or PRESET_PN.get(preset)
        if pn is None:
            ap.error(f"--pn is needed for preset {preset!r} (known defaults: {PRESET_PN})")
        try:
            results["presets"][preset] = estimate(preset, pn, batches=args.batch, world=args.fsdp,
                                                  lora_base_bytes=2 if args.lora_base == "bf16" else 4,
                                                  reserve_gib=args.reserve_gib)
        except (ValueError, KeyError) as err:
            ap.error(str(err).strip("'\""))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print_tables(results, args.batch, args.fsdp)
    return results


if __name__ == "__main__":
    main()
