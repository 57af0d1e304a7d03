"""The ``infinitystar`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from infinitystar import __version__
from infinitystar.checkpoints import convert_vae_checkpoint, load_vae
from infinitystar.config import get_preset, precision_for_dtype, replace
from infinitystar.demo import evaluate as demo_evaluate
from infinitystar.demo import load_pipeline, model_from_run_name, run_model_name
from infinitystar.demo.recipe import DEFAULT_CONFIG_DIR, RecipeOptions, run_recipe
from infinitystar.demo.synthetic import (
    MAX_SEGMENTS,
    NEW_SHAPE,
    NEW_WORDS,
    STORY_PROMPTS,
    STORY_REFERENCE,
    check_clip_shape,
    make_dataset,
    make_stories,
    make_videos,
    video_frames,
)
from infinitystar.errors import run_command
from infinitystar.memory import MEMORY_MODES
from infinitystar.outputs import RunRecord, now_iso, output_name, read_record, record_path, save_output_with_record
from infinitystar.pipeline import InfinityStarPipeline, draw_seed, read_pipeline_config
from infinitystar.train.commands import add_train_commands, add_train_vae_command
from infinitystar.train.config import DataConfig, config_from_dict, read_config_file
from infinitystar.train.features import extract_features
from infinitystar.web import serve

# Where generate and interactive write when no -o is given (relative to the working directory).
OUTPUT_DIR = Path("outputs")


def version_text() -> str:
    """``infinitystar <version> (torch <version>)``: what ``--version`` prints (bug reports want both)."""
    return f"infinitystar {__version__} (torch {torch.__version__})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinitystar", description=__doc__)
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of any error (may stand anywhere in the arguments)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_convert(subparsers)
    _add_generate(subparsers)
    _add_interactive(subparsers)
    _add_extract_features(subparsers)
    _add_make_demo_data(subparsers)
    _add_evaluate(subparsers)
    add_train_commands(subparsers)  # train, export
    add_train_vae_command(subparsers)
    _add_train_demo(subparsers)
    _add_train_demo_lora(subparsers)
    _add_serve(subparsers)
    return parser


# ----------------------------------------------------------------------------------------------
# generate / interactive
# ----------------------------------------------------------------------------------------------

def _add_model_options(p: argparse.ArgumentParser, seed_help: str = "sampling seed (default: the preset's)") -> None:
    p.add_argument("--model", metavar="DIR", help="model folder: our layout (model_index.json) or the official "
                   "download (infinitystar_videovae.pth, transformer shards, text_encoder/flan-t5-xl-official); "
                   "default: the embedded demo model")
    p.add_argument("--preset", help="with --model on an official download: which transformer to load "
                   "(official-720p, official-480p, interactive-480p); without --model: random weights of a preset")
    p.add_argument("--seed", type=int, default=None, help=seed_help)
    p.add_argument("--guidance", type=float, default=None, metavar="G",
                   help="guidance scale (default: the preset's; 1 disables guidance)")
    p.add_argument("--aspect", default=None, help="aspect ratio W:H, e.g. 16:9 (default: the preset's)")
    _add_device_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_lora_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA adapter folder (infinitystar train with [lora], then export) and its weight "
                   "(default 1); repeat for several, which add up")


def _add_device_options(p: argparse.ArgumentParser) -> None:
    """Where and how the model runs: device, dtype, memory mode, compile (every command that generates)."""
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help="where to compute (default: auto, CUDA when present)")
    p.add_argument("--dtype", "--precision", dest="precision", default=None, type=_precision_arg,
                   metavar="{bf16,fp32}", help="bf16 (= bfloat16): the reference's policy (transformer blocks bf16, "
                   "Flan-T5 fp16, under bf16 autocast); fp32 (= float32): everything float32 "
                   "(default: bf16 on CUDA; on a CPU bf16 where it is native and measured faster, else fp32; "
                   "INFINITYSTAR_CPU_PRECISION=fp32|bf16|auto overrides the CPU default)")
    p.add_argument("--memory-mode", default="plain", choices=list(MEMORY_MODES),
                   help="plain: all on the GPU; model_offload: each component on the GPU only while it works; "
                   "block_offload: transformer blocks streamed in groups; int8/fp8: weight-only quantized blocks "
                   "(torchao); smallest: block offload + int8 + tiled VAE decode (README: which mode for which card)")
    p.add_argument("--offload", action="store_const", const="model_offload", dest="memory_mode",
                   help=argparse.SUPPRESS)  # the flag before memory modes existed: --memory-mode model_offload
    p.add_argument("--request-limit", action="append", default=[], metavar="NAME=VALUE",
                   help="raise or lower a request limit (repeatable): max_frames, max_prompt_chars, max_segments, "
                   "max_videos, max_upload_bytes, max_upload_pixels, check_memory=false")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks (inductor: CUDA, or a CPU with a C++ compiler; the first "
                   "generation pays the compilation, tens of seconds)")


def _precision_arg(value: str) -> str:
    try:
        return precision_for_dtype(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: use bf16 (bfloat16) or fp32 (float32)") from exc


_SEED_HELP = "sampling seed (default: a random one; printed and stored in the run record)"


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """What generate and interactive share beyond the model options: the run record, re-running, overwriting."""
    p.add_argument("--from-json", metavar="RUN.json", default=None,
                   help="run again what this run record (the .json beside an output, or the .mp4/.png itself) "
                   "describes: same prompt, seed and settings; options given here override it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file (default: refuse)")
    # None = "not given", so that --from-json can tell an explicit option from a default (resolved in _settings).
    p.set_defaults(device=None, memory_mode=None)


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate an image or a video from a prompt",
                              description="Text-to-image (--frames 1), text-to-video, image-to-video (--image), "
                              "video extension (--video). Every output gets its run record (prompt, seed, "
                              "settings) inside the file and as <name>.json beside it; --from-json runs it again.")
    p.add_argument("prompt", metavar="PROMPT", nargs="?", default=None,
                   help="what to generate (optional with --from-json)")
    p.add_argument("-o", "--output", default=None, help="output file: .mp4 for videos, .png for images "
                   f"(default: {OUTPUT_DIR}/<time>_<prompt>_s<seed>.mp4 or .png)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--image", metavar="PATH", help="image-to-video: the first frame")
    p.add_argument("--video", metavar="PATH", help="video extension: continue this video (its first whole clips, "
                   "at most all but the output's last, sampled as the reference does)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, default=None, help="video length in seconds")
    length.add_argument("--frames", type=int, default=None, help="number of frames (1 = image, else 1 + 4k)")
    p.add_argument("--resolution", choices=["480p", "720p"], default=None,
                   help="must match the model (720p or 480p checkpoint)")
    _add_model_options(p, _SEED_HELP)
    _add_lora_option(p)
    _add_run_options(p)
    p.set_defaults(func=_run_generate)


def _add_interactive(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("interactive", help="interactive long video: one prompt per segment",
                              description="PROMPTS_FILE holds one prompt per line; each line generates the next "
                              "segment, continuing the previous one. The output gets its run record like generate's.")
    p.add_argument("prompts_file", metavar="PROMPTS_FILE", nargs="?", default=None,
                   help="one prompt per line (optional with --from-json)")
    p.add_argument("-o", "--output", default=None, help="output .mp4, all segments joined "
                   f"(default: {OUTPUT_DIR}/<time>_<first prompt>_s<seed>.mp4)")
    p.add_argument("--video", metavar="PATH", help="reference video for segment 0: its last clip, at the aspect "
                   "nearest its own unless --aspect is given (default: generate segment 0)")
    p.add_argument("--story", metavar="DIR", help="a story folder in the reference's interactive layout: "
                   f"DIR/{STORY_PROMPTS} (line 0 describes the reference video) and DIR/{STORY_REFERENCE} (the "
                   "reference video); instead of PROMPTS_FILE and --video")
    p.add_argument("--save-segments", action="store_true", help="also write OUTPUT_0000.mp4, ... per segment")
    _add_model_options(p, _SEED_HELP)
    _add_lora_option(p)
    _add_run_options(p)
    p.set_defaults(func=_run_interactive)


def _story_inputs(folder: str, args: argparse.Namespace) -> tuple[Path, str]:
    """(prompts file, reference video) of a story folder (``--story``), checked before any model loads."""
    if args.prompts_file is not None or args.video is not None:
        raise ValueError("--story DIR gives the prompts and the reference video: drop PROMPTS_FILE and --video")
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--story {root} is not a folder")
    prompts, video = root / STORY_PROMPTS, root / STORY_REFERENCE
    for path, what in ((prompts, "prompts, one per line"), (video, "reference video")):
        if not path.is_file():
            raise FileNotFoundError(f"story folder {root} has no {path.name} (its {what})")
    return prompts, str(video)


def _check_output(path: Path, is_image: bool) -> None:
    want = (".png",) if is_image else (".mp4",)
    if path.suffix.lower() not in want:
        kind = "an image (1 frame)" if is_image else "a video"
        raise ValueError(f"output {path} must end in {' or '.join(want)} for {kind}")


def _check_not_there(paths: list[Path], overwrite: bool) -> None:
    """Refuse to replace an output (or its record) before any model is loaded."""
    for path in paths:
        for p in (path, record_path(path)):
            if p.is_dir():  # not even --overwrite replaces a folder
                raise IsADirectoryError(f"output {p} is a folder; give a file name")
            if p.exists() and not overwrite:
                raise FileExistsError(f"{p} already exists; pass --overwrite to replace it")
            if p.parent.exists() and not p.parent.is_dir():
                raise NotADirectoryError(f"cannot write {p}: {p.parent} is a file, not a folder")


def _default_output(prompt: str, seed: int, created: str, ext: str) -> Path:
    """``outputs/<time>_<prompt>_s<seed>.<ext>``; when a run of the same prompt and seed in the same second (a quick
    ``--from-json``) already wrote that name, ``..._s<seed>-2.<ext>`` and so on: a name nobody chose never makes a
    run fail, and never replaces a file."""
    first = OUTPUT_DIR / output_name(prompt, seed, created, ext)
    path, k = first, 1
    while path.exists() or record_path(path).exists():
        k += 1
        path = first.with_name(f"{first.stem}-{k}{first.suffix}")
    return path


def _apply_record(args: argparse.Namespace, record: RunRecord, fields: dict[str, str]) -> None:
    """Fill every option the command line left unset (None) from ``record``; explicit options win."""
    for arg, field_name in fields.items():
        if getattr(args, arg) is None:
            setattr(args, arg, getattr(record, field_name))
    if args.model is None and args.preset is None:
        args.model, args.preset = model_from_run_name(record.model, record.preset)
    if not args.lora and record.loras:
        args.lora = list(record.loras)


# Options of both commands and the record fields they come from under --from-json.
_COMMON_FIELDS = {"seed": "seed", "guidance": "guidance_scale", "aspect": "aspect", "device": "device",
                  "precision": "precision", "memory_mode": "memory_mode"}


def _read_run(path: str, interactive: bool) -> RunRecord:
    record = read_record(path)
    if interactive != (record.task == "interactive"):
        other = "interactive" if record.task == "interactive" else "generate"
        raise ValueError(f"{path} records a {record.task} run: run it again with infinitystar {other} "
                         f"--from-json {path}")
    return record


def _settle_defaults(args: argparse.Namespace) -> None:
    """The defaults of options left unset (after --from-json filled what it holds)."""
    if args.seed is None:
        args.seed = draw_seed()  # before the model loads: the output's name carries it
    if args.device is None:
        args.device = "auto"
    if args.memory_mode is None:
        args.memory_mode = "plain"


def _load(args: argparse.Namespace) -> InfinityStarPipeline:
    return load_pipeline(args.model, args.preset, device=args.device, precision=args.precision,
                         memory_mode=args.memory_mode, compile_blocks=args.compile, limits=args.request_limit,
                         loras=getattr(args, "lora", ()))


def _write_progress(quiet: bool) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """A (done, total) callback that drives a tqdm bar while a file is written, and the bar's close."""
    if quiet:
        return None, lambda: None
    shown: list[tqdm] = []  # opened at the first report, when the total is known (no empty bar before it)

    def update(done: int, total: int) -> None:
        if not shown:
            shown.append(tqdm(desc="write", unit="frame", total=total, file=sys.stderr))
        bar = shown[0]
        if bar.total != total:
            bar.reset(total=total)
        bar.update(done - bar.n)

    def close() -> None:
        for bar in shown:
            bar.close()

    return update, close


def _save(frames: Any, out: Path, record: RunRecord, fps: int, args: argparse.Namespace) -> Path:
    progress, close = _write_progress(args.quiet)
    try:
        return save_output_with_record(frames, out, record, fps=fps, overwrite=args.overwrite, progress=progress)
    finally:
        close()


def _run_generate(args: argparse.Namespace) -> int:
    if args.from_json is not None:
        record = _read_run(args.from_json, interactive=False)
        if args.prompt is None:
            args.prompt = record.prompt
        if args.frames is None and args.seconds is None:
            args.frames = record.num_frames
        _apply_record(args, record, {**_COMMON_FIELDS, "negative_prompt": "negative_prompt", "image": "input_image",
                                     "video": "input_video", "resolution": "resolution"})
    if args.prompt is None:
        raise ValueError("no PROMPT given (or --from-json RUN.json to run a recorded one again)")
    _settle_defaults(args)
    for name in ("image", "video"):
        value = getattr(args, name)
        if value is not None and not Path(value).is_file():
            raise FileNotFoundError(f"--{name} {value}: no such file")
    is_image = args.frames == 1 or (args.seconds == 0)
    created = now_iso()
    out = Path(args.output) if args.output else _default_output(args.prompt, args.seed, created,
                                                                 "png" if is_image else "mp4")
    _check_output(out, is_image)
    _check_not_there([out], args.overwrite)
    pipe = _load(args)
    t0 = time.perf_counter()
    result = pipe(args.prompt, args.negative_prompt, image=args.image, video=args.video, num_frames=args.frames,
                  seconds=args.seconds, resolution=args.resolution, aspect=args.aspect, guidance_scale=args.guidance,
                  seed=args.seed, progress=not args.quiet)
    frames = _uint8_frames(result.frames)
    t, h, w = frames.shape[:3]
    task = ("text-to-image" if t == 1 else "image-to-video" if args.image else "video-extension" if args.video
            else "text-to-video")
    record = RunRecord(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, task=task,
                       num_frames=t, fps=result.fps, height=h, width=w, guidance_scale=args.guidance,
                       aspect=args.aspect, resolution=args.resolution, model=run_model_name(args.model, args.preset),
                       preset=args.preset, precision=pipe.precision, memory_mode=args.memory_mode,
                       device=str(pipe.device), created=created, input_image=args.image, input_video=args.video,
                       loras=tuple(args.lora) or None)
    _save(frames, out, record, result.fps, args)
    print(f"wrote {out} ({t} frames, {w}x{h}, seed {args.seed}, {time.perf_counter() - t0:.1f} s); "
          f"run record {record_path(out)}")
    return 0


def _uint8_frames(frames: Any) -> np.ndarray:
    """The pipeline's ``np`` output as one uint8 [T, H, W, 3] array (a list of PIL images is stacked)."""
    if isinstance(frames, list):
        frames = np.stack([np.asarray(f) for f in frames])
    return np.asarray(frames)


def _read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist" if not path.exists() else
                                f"prompts file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts file {path} is not UTF-8 text (byte {err.start} is not): one prompt per "
                         "line") from None
    if "\x00" in text:
        raise ValueError(f"prompts file {path} is a binary file, not text with one prompt per line")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompt (one per line)")
    return prompts


def _run_interactive(args: argparse.Namespace) -> int:
    if args.story is not None:
        args.prompts_file, args.video = _story_inputs(args.story, args)
    prompts = None if args.prompts_file is None else _read_prompts(Path(args.prompts_file))
    if args.from_json is not None:
        record = _read_run(args.from_json, interactive=True)
        prompts = prompts or list(record.prompts or ())
        _apply_record(args, record, {**_COMMON_FIELDS, "video": "input_video"})
    if prompts is None:
        raise ValueError("no PROMPTS_FILE given (or --from-json RUN.json to run a recorded one again)")
    _settle_defaults(args)
    created = now_iso()
    out = Path(args.output) if args.output else _default_output(prompts[0], args.seed, created, "mp4")
    _check_output(out, is_image=False)
    segment_paths = [_segment_path(out, i) for i in range(len(prompts))] if args.save_segments else []
    _check_not_there([out, *segment_paths], args.overwrite)
    pipe = _load(args)
    t0 = time.perf_counter()
    result = pipe.interactive(prompts, video=args.video, aspect=args.aspect, guidance_scale=args.guidance,
                              seed=args.seed, progress=not args.quiet)
    frames = _uint8_frames(result.frames)
    t, h, w = frames.shape[:3]
    record = RunRecord(prompt=prompts[0], seed=args.seed, task="interactive", num_frames=t, fps=result.fps,
                       height=h, width=w, guidance_scale=args.guidance, aspect=args.aspect,
                       model=run_model_name(args.model, args.preset), preset=args.preset, precision=pipe.precision,
                       memory_mode=args.memory_mode, device=str(pipe.device), created=created,
                       input_video=args.video, prompts=tuple(prompts), loras=tuple(args.lora) or None)
    _save(frames, out, record, result.fps, args)
    for path, seg in zip(segment_paths, result.segments):
        _save(_uint8_frames(seg), path, record, result.fps, args)  # each segment names the run it belongs to
    print(f"wrote {out} ({len(prompts)} segments, {t} frames, seed {args.seed}, "
          f"{time.perf_counter() - t0:.1f} s); run record {record_path(out)}")
    return 0


def _segment_path(out: Path, i: int) -> Path:
    return out.with_name(f"{out.stem}_{i:04d}.mp4")


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an official checkpoint to safetensors",
        description="Convert an official pickled checkpoint (read with torch.load(weights_only=True)) to "
        "safetensors under the official key names, after a strict key/shape check.",
    )
    p.add_argument("src", metavar="SRC", help="official checkpoint, e.g. infinitystar_videovae.pth")
    p.add_argument("dst", metavar="DST", help="output .safetensors file (written atomically)")
    p.add_argument("--kind", choices=["vae"], default="vae", help="which model the checkpoint holds (default: vae)")
    p.add_argument("--preset", default="official", help="architecture preset of the checkpoint (default: official)")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    if args.kind == "vae":
        out = convert_vae_checkpoint(args.src, args.dst, get_preset("vae", args.preset))
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(f"unknown checkpoint kind {args.kind!r}")
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------------------------
# make-demo-data / evaluate (the demo domain: infinitystar.demo)
# ----------------------------------------------------------------------------------------------


def _add_make_demo_data(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-demo-data", help="write the synthetic demo dataset (mp4 videos, stories + jsonl)",
        description="Render captioned videos of one coloured shape moving on a torus (what leaves one edge re-enters "
        "at the opposite one; infinitystar.demo.synthetic) as mp4 files plus train.jsonl and heldout.jsonl in the "
        "reference's metadata format: videos of --segments 2 s segments. --stories adds story videos whose "
        "direction changes at every segment boundary, one caption per segment, in the reference's interactive "
        "layout (stories/<id>/prompt.txt, 0000_refine_720p.mp4, story.mp4) and train_stories.jsonl. The 12 "
        "held-out (colour, shape, direction) triples appear only in the held-out files. Deterministic by seed. "
        "--frames N writes the former one-clip dataset of in-frame straight paths instead.")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--clips", type=int, default=2048, help="training videos (default: 2048)")
    p.add_argument("--heldout-clips", type=int, default=48, help="held-out videos (default: 48; 0 = none)")
    p.add_argument("--segments", default=None, metavar="LIST",
                   help="segment counts of the videos, drawn uniformly (default: 1,2,3 = 2, 4 or 6 s)")
    p.add_argument("--stories", type=int, default=0, help="training stories (default: 0)")
    p.add_argument("--heldout-stories", type=int, default=0,
                   help="held-out stories: one per held-out triple, its direction in the middle segment (12 = all)")
    p.add_argument("--story-segments", default=None, metavar="LIST", help="segment counts of the training stories "
                   "(default: 2,3; held-out stories have 3)")
    p.add_argument("--diamond-videos", type=int, default=0,
                   help="videos of a diamond, a shape no training caption names, in diamond.jsonl: data for the VAE "
                   "only (train-demo's vae_diamond_videos), so the tokenizer can draw a shape a LoRA adapter then "
                   "teaches (default: 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (default: 64)")
    p.add_argument("--frames", type=int, default=None,
                   help="the former dataset: one clip of this many frames per video, in-frame straight paths")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--crf", type=int, default=0, help="libx264 quality, 0 = lossless (default)")
    p.set_defaults(func=_run_make_demo_data)


def _segment_counts(text: str | None, flag: str, default: tuple[int, ...], lowest: int) -> tuple[int, ...]:
    """The segment counts of ``flag`` ("1,2,3"), checked before anything is rendered (a bad --story-segments must
    not surface after the videos took their minutes)."""
    if text is None:
        return default
    try:
        counts = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated whole numbers like 1,2,3, got {text!r}") from None
    bad = [c for c in counts if not lowest <= c <= MAX_SEGMENTS]
    if bad:
        raise ValueError(f"{flag} counts must be in {lowest}..{MAX_SEGMENTS} segments, got {bad[0]} in {text!r}")
    return counts


def _run_make_demo_data(args: argparse.Namespace) -> int:
    for flag, value in (("--clips", args.clips), ("--heldout-clips", args.heldout_clips), ("--stories", args.stories),
                        ("--heldout-stories", args.heldout_stories), ("--diamond-videos", args.diamond_videos)):
        if value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    if not args.clips:
        raise ValueError("--clips must be >= 1 (the training videos)")
    t0 = time.perf_counter()
    if args.frames is not None:
        torus = [flag for flag, value in (("--stories", args.stories), ("--heldout-stories", args.heldout_stories),
                                          ("--segments", args.segments), ("--story-segments", args.story_segments))
                 if value]
        if torus:
            raise ValueError(f"--frames writes the former one-clip dataset, which has no segments or stories: drop "
                             f"{torus[0]}")
        common = dict(seed=args.seed, size=args.size, frames=args.frames, fps=args.fps, crf=args.crf)

        def clips(n: int, split: str) -> Path:
            return make_dataset(args.out_dir, n, split=split, **common)

        jobs = [("train", args.clips, clips, "clips"), ("heldout", args.heldout_clips, clips, "clips"),
                (NEW_SHAPE, args.diamond_videos, clips, "clips")]
    else:
        segments = _segment_counts(args.segments, "--segments", (1, 2, 3), 1)
        story_segments = _segment_counts(args.story_segments, "--story-segments", (2, 3), 2)
        check_clip_shape(args.size, video_frames(max(segments + story_segments)))
        common = dict(seed=args.seed, size=args.size, fps=args.fps, crf=args.crf)

        def videos(n: int, split: str) -> Path:
            return make_videos(args.out_dir, n, split=split, segments=segments, **common)

        def stories(n: int, split: str) -> Path:
            return make_stories(args.out_dir, n, split=split, segments=story_segments, **common)

        jobs = [("train", args.clips, videos, "videos"), ("heldout", args.heldout_clips, videos, "videos"),
                ("train", args.stories, stories, "stories"), ("heldout", args.heldout_stories, stories, "stories"),
                (NEW_SHAPE, args.diamond_videos, videos, "videos")]
    for split, n, write, what in jobs:
        if n:
            print(f"wrote {write(n, split)} ({n} {what})")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score a model on the demo domain (seen and held-out prompts, or the tasks of issue 18)",
        description="Generate clips for 12 seen and the 12 held-out demo prompts and judge colour, shape and "
        "direction from the frames (infinitystar.demo.evaluate). Writes report.md (table), report.json and "
        "contact_sheet.png to --out. --tasks instead runs tasks on the 12 held-out triples (t2v-2s, t2v-6s, story, "
        "i2v, extension, long) and writes report.md (task, metric, value, target, met?), report.json and one "
        "contact_<task>.png per task. --check-judge N instead measures the judge on ground truth of every kind.")
    p.add_argument("--clips-per-prompt", type=int, default=4, metavar="N",
                   help="clips (with --tasks: videos of each task) per prompt (default: 4)")
    p.add_argument("--tasks", default=None, metavar="T1,T2,...",
                   help=f"run these tasks instead of the seen/held-out clips: {', '.join(demo_evaluate.TASKS)}")
    p.add_argument("--long-prompts", type=int, default=None, metavar="K",
                   help="with --tasks long: 30 s videos for the first K prompts only (default: every prompt)")
    p.add_argument("--no-memory", action="store_true",
                   help="with --tasks long: skip the peak-memory comparison of a 6 s and a 30 s video (two fresh "
                   "processes)")
    p.add_argument("--out", default="outputs/evaluate", metavar="DIR", help="report folder")
    p.add_argument("--frames", type=int, default=33, help="frames per clip (default: 33 = 2 s; not with --tasks)")
    p.add_argument("--limit", type=int, default=None, metavar="K", help="only the first K prompts of each set")
    p.add_argument("--template", type=int, default=0, help="caption template of the prompts (default: 0)")
    p.add_argument("--save-clips", action="store_true", help="also write every clip as mp4 under OUT/clips")
    p.add_argument("--check-judge", type=int, default=None, metavar="N",
                   help="no model: report the judge's accuracy on about N ground-truth items of every kind (plain "
                   "2 s and 6 s videos per segment, stories, shapes across the edges, image-to-video, extension, "
                   "H.264 round trip), and on N in-frame clips")
    p.add_argument("--vae-data", default=None, metavar="JSONL",
                   help="also measure the tokenizer's reconstruction PSNR on the clips of this demo jsonl "
                   "(e.g. heldout.jsonl of make-demo-data)")
    p.add_argument("--vae-clips", type=int, default=None, metavar="N", help="only the first N clips of --vae-data")
    _add_model_options(p)
    p.set_defaults(func=_run_evaluate)


def _run_check_judge(args: argparse.Namespace) -> int:
    acc, misses = demo_evaluate.check_judge(args.check_judge, seed=args.seed or 0, frames=args.frames)
    print(f"judge on {acc['n']} ground-truth clips: colour {acc['colour']:.1%}, shape {acc['shape']:.1%}, "
          f"direction {acc['direction']:.1%}, all three {acc['all']:.1%}")
    for truth, j in misses[:10]:
        print(f"  miss: {' '.join(truth)} judged {j.colour} {j.shape} {j.direction}")
    kinds, kind_misses = demo_evaluate.check_judge_all(args.check_judge, seed=args.seed or 0)
    for kind, scores in kinds.items():
        parts = ", ".join(f"{k} {v:.1%}" for k, v in scores.items() if k != "n")
        print(f"judge on {kind} ({scores['n']} {'videos' if kind in ('i2v', 'extension') else 'segments'}): {parts}")
    for m in kind_misses[:10]:
        print(f"  miss: {m}")
    return 0


def _run_evaluate_tasks(args: argparse.Namespace) -> int:
    tasks = demo_evaluate.check_tasks(args.tasks)  # before loading anything
    if args.frames != 33:
        raise ValueError("--frames does not apply to --tasks (each task has its own length)")
    if args.long_prompts is not None and args.long_prompts < 1:
        raise ValueError(f"--long-prompts must be >= 1, got {args.long_prompts}")
    pipe = _load(args)
    kwargs = {k: v for k, v in (("guidance_scale", args.guidance), ("aspect", args.aspect)) if v is not None}
    memory_model = None if args.no_memory else run_model_name(args.model, args.preset)
    done = []

    def report_sample(s: demo_evaluate.TaskSample) -> None:
        done.append(s)
        if not args.quiet:
            judged = "; ".join(" ".join(str(x) for x in j) for j in s.judged)
            scores = ", ".join(f"{k} {h}/{c}" for k, (h, c) in s.scores.items())
            print(f"[{len(done)}] {s.task}: {' / '.join(s.prompts)} (seed {s.seed}): {judged} -- {scores} "
                  f"({s.seconds:.1f} s)", flush=True)

    t0 = time.perf_counter()
    report = demo_evaluate.evaluate_tasks(pipe, tasks, args.clips_per_prompt, args.seed or 0, limit=args.limit,
                                          memory_model=memory_model, long_prompts=args.long_prompts,
                                          on_sample=report_sample, **kwargs)
    if args.vae_data is not None:
        report.metrics += demo_evaluate.tokenizer_metrics(
            demo_evaluate.reconstruction_psnr(pipe, args.vae_data, args.vae_clips))
    paths = report.save(Path(args.out))
    print(report.table())
    if report.memory is not None:
        print(report.memory["summary"])
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - t0:.1f} s")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    if args.clips_per_prompt < 1:
        raise ValueError(f"--clips-per-prompt must be >= 1, got {args.clips_per_prompt}")
    if args.check_judge is not None:
        if args.check_judge < 1:
            raise ValueError(f"--check-judge must be >= 1, got {args.check_judge}")
        return _run_check_judge(args)
    if args.vae_data is not None:  # a missing or broken jsonl fails now, not after the whole evaluation
        demo_evaluate.read_ground_truth(args.vae_data)
    if args.tasks is not None:
        return _run_evaluate_tasks(args)
    prompts = demo_evaluate.default_prompts(args.template)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        prompts = {g: ps[: args.limit] for g, ps in prompts.items()}
    pipe = load_pipeline(args.model, args.preset, device=args.device, precision=args.precision,
                         memory_mode=args.memory_mode, compile_blocks=args.compile, limits=args.request_limit)
    kwargs = {k: v for k, v in (("guidance_scale", args.guidance), ("aspect", args.aspect)) if v is not None}
    out = Path(args.out)
    total = sum(len(ps) for ps in prompts.values()) * args.clips_per_prompt
    done = []

    def report_clip(r: demo_evaluate.ClipResult) -> None:
        done.append(r)
        if not args.quiet:
            j = r.judgement
            print(f"[{len(done)}/{total}] [{r.group}] {r.prompt} (seed {r.seed}): {j.colour} {j.shape} "
                  f"{j.direction} ({r.seconds:.1f} s)", flush=True)

    report = demo_evaluate.evaluate_pipeline(pipe, prompts, args.clips_per_prompt, args.seed or 0,
                                             num_frames=args.frames, on_clip=report_clip,
                                             clips_dir=out / "clips" if args.save_clips else None, **kwargs)
    if args.vae_data is not None:
        report.reconstruction = demo_evaluate.reconstruction_psnr(pipe, args.vae_data, args.vae_clips)
    paths = report.save(out)
    print(report.table())
    if report.reconstruction is not None:
        r = report.reconstruction
        print(f"tokenizer reconstruction: {r['psnr_db']:.2f} dB PSNR over {r['clips']} clips of {args.vae_data}")
    print(f"wrote {paths['markdown']}, {paths['json']}, {paths['contact_sheet']}")
    return 0


# ----------------------------------------------------------------------------------------------
# extract-features
# ----------------------------------------------------------------------------------------------


# The released 480p pipeline (pixel budget 0.40M with all its scales, 16 fps, 20-frame clips): what extraction cut
# before it took a pipeline.
DEFAULT_EXTRACT_PIPELINE = "official-480p"


def _add_extract_features(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract-features",
        help="encode training clips with the VAE into the latent cache",
        description="Sample every jsonl record's clip at the pipeline's fps, resize/crop it to its resolution "
        "bucket (the pipeline's pixel budget and scales), encode it with the VAE and store the latent as safetensors "
        "under a collision-free key. "
        "Resumable: valid cached files are skipped, corrupt ones rebuilt; bad rows are reported with file:line.",
    )
    p.add_argument("jsonl", nargs="*", metavar="JSONL", help="jsonl files, folders or glob patterns")
    p.add_argument("--config", metavar="FILE", help="DataConfig as TOML or JSON (the flags below override it)")
    p.add_argument("--cache-dir", help="output folder of the latent cache")
    p.add_argument("--vae", required=True, metavar="PATH", help="VAE checkpoint (official .pth or our safetensors)")
    p.add_argument("--vae-preset", default=None, help="architecture preset of --vae (default: from the file)")
    p.add_argument("--video-root", default=None, help="folder that relative media paths are resolved against")
    p.add_argument("--pipeline", default=DEFAULT_EXTRACT_PIPELINE, metavar="PRESET_OR_DIR",
                   help="the pipeline the latents are for (preset name or model folder; only its configuration is "
                   "read): its fps, pixel budget and scales per clip fix the sampling and the buckets (default: "
                   f"{DEFAULT_EXTRACT_PIPELINE}, pixel budget 0.40M; the training config's model.pipeline)")
    p.add_argument("--pipeline-preset", default=None,
                   help="with --pipeline on an official download holding several transformers: which one")
    p.add_argument("--max-seconds", type=int, default=None, help="clamp clips to this many whole seconds")
    p.add_argument("--sample", action="store_true",
                   help="store a posterior sample instead of the mean (the reference's training features; use it "
                   "with the official VAE), reproducible per clip from --seed and the clip")
    p.add_argument("--seed", type=int, default=None, help="base seed of --sample (the training config's data.seed)")
    p.add_argument("--rank", type=int, default=0, help="this process's share: records RANK::WORLD_SIZE")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--device", default="cpu", help="torch device for the VAE")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_extract_features)


def _run_extract_features(args: argparse.Namespace) -> int:
    config = DataConfig()
    if args.config:
        config = config_from_dict(DataConfig, read_config_file(args.config))
    changes = {"jsonl": tuple(args.jsonl) or None, "cache_dir": args.cache_dir, "video_root": args.video_root,
               "max_seconds": args.max_seconds, "seed": args.seed,
               "latent_sampling": "sample" if args.sample else None}
    config = replace(config, **{k: v for k, v in changes.items() if v is not None})
    if not config.jsonl:
        raise ValueError("no jsonl given (positional JSONL or \"jsonl\" in --config)")
    pipeline = read_pipeline_config(args.pipeline, args.pipeline_preset)
    vae = load_vae(args.vae, get_preset("vae", args.vae_preset) if args.vae_preset else None).to(args.device)
    stats = extract_features(config, pipeline, vae, rank=args.rank, world_size=args.world_size, device=args.device,
                             progress=not args.quiet)
    print(f"extract-features: {stats.summary()} -> {config.cache_dir}")
    for line in stats.failures:
        print(f"  failed: {line}", file=sys.stderr)
    return 1 if stats.failed else 0


def _add_train_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-demo", help="retrain the embedded demo model (the whole recipe, CPU, under 3 hours)",
        description="Run the demo model's whole recipe into OUT_DIR with the ordinary commands: make-demo-data -> "
        "train-vae (vae.toml, then vae_decoder.toml) -> extract-features -> train (transformer.toml, then "
        "transformer_stage2.toml) -> export (OUT_DIR/model, with sampling.toml's defaults) -> evaluate "
        "(OUT_DIR/eval); the configs ship in the package (infinitystar/demo/"
        "configs). The two trainers run as --processes data-parallel processes under torchrun. Resumable: run it "
        "again to continue. --ship "
        "writes the model into the package (infinitystar/demo/weights), where `generate` without --model finds it.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="working folder (data, logs, runs, model, eval)")
    p.add_argument("--config-dir", default=None, help="folder with vae.toml and transformer.toml "
                   f"(default: {DEFAULT_CONFIG_DIR}, shipped in the package)")
    p.add_argument("--clips", type=int, default=2048, help="training clips (default: 2048)")
    p.add_argument("--feature-clips", type=int, default=1024,
                   help="training clips the transformer sees (the first N; default: 1024)")
    p.add_argument("--stories", type=int, default=768, help="story videos (interactive training; default: 768)")
    p.add_argument("--feature-stories", type=int, default=512,
                   help="stories the transformer sees (the first N; default: 512)")
    p.add_argument("--workers", type=int, default=2, help="parallel feature-extraction processes (default: 2)")
    p.add_argument("--processes", type=int, default=2,
                   help="data-parallel processes of train-vae and train, one thread each (default: 2; the configs' "
                   "batch_size is per process, so another count trains on another global batch)")
    p.add_argument("--vae-steps", type=int, default=None, help="override the VAE config's steps")
    p.add_argument("--vae-diamond-videos", type=int, default=0,
                   help="diamond videos (a shape no caption names) in the VAE's data only, so the tokenizer can draw "
                   "the shape train-demo-lora teaches (default: 0, as the shipped model)")
    p.add_argument("--steps", type=int, default=None, help="override the transformer config's steps")
    p.add_argument("--ship", action="store_true", help="write the trained model into infinitystar/demo/weights")
    p.set_defaults(func=_run_train_demo)


def _add_train_demo_lora(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-demo-lora", help="teach the demo model a new word (still or diamond) with a LoRA adapter (CPU, minutes)",
        description="Render videos of a word the demo model never saw (--word: 'still', a shape that does not move, "
        "or 'diamond', a shape its VAE cannot draw well) plus replay videos of the demo world, extract their latents "
        "with the demo model's VAE, train a LoRA adapter on the frozen demo transformer, export it (OUT_DIR/adapter) "
        "and judge the base model and base + adapter on the same seeds: the new word and the old vocabulary "
        "(OUT_DIR/report.json). Resumable: run it again to continue.")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--base", default=None, metavar="DIR", help="base model folder (default: the shipped demo model)")
    p.add_argument("--word", choices=NEW_WORDS, default=NEW_WORDS[0],
                   help=f"the word to teach (default: {NEW_WORDS[0]})")
    p.add_argument("--videos", type=int, default=384, help="videos of the new word (default: 384)")
    p.add_argument("--replay", type=int, default=384, help="videos of the base world mixed in (default: 384)")
    p.add_argument("--steps", type=int, default=1200, help="training steps (default: 1200)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    p.add_argument("--clips-per-prompt", type=int, default=2, help="evaluation clips per prompt (default: 2)")
    p.set_defaults(func=_run_train_demo_lora)


def _run_train_demo_lora(args: argparse.Namespace) -> int:
    from infinitystar.demo.lora import LoRADemoOptions, run_lora_demo

    options = LoRADemoOptions(word=args.word, videos=args.videos, replay=args.replay, steps=args.steps, rank=args.rank,
                              eval_clips_per_prompt=args.clips_per_prompt)
    result = run_lora_demo(args.out_dir, options, **({"base": args.base} if args.base else {}))
    print(json.dumps(result, indent=2))
    return 0


def _run_train_demo(args: argparse.Namespace) -> int:
    options = RecipeOptions(clips=args.clips, feature_clips=args.feature_clips, stories=args.stories,
                            feature_stories=args.feature_stories, workers=args.workers,
                            processes=args.processes, vae_steps=args.vae_steps, transformer_steps=args.steps,
                            vae_diamond_videos=args.vae_diamond_videos)
    result = run_recipe(args.out_dir, options, args.config_dir or DEFAULT_CONFIG_DIR, do_ship=args.ship)
    print(json.dumps(result, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------
# serve (the web page: infinitystar.web, optional extra [web])
# ----------------------------------------------------------------------------------------------


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="a local web page over the pipeline (needs the [web] extra: Gradio)",
        description="Load the model once and serve a Gradio page: text-to-image, text-to-video, image-to-video, "
        "video extension and interactive videos, one request at a time through a queue. Binds to 127.0.0.1: only "
        "this machine can open it. --host 0.0.0.0 exposes it to the network: the page has no login, so anyone "
        "who can reach the port can run the model on this machine and see what it generates.")
    p.add_argument("--model", metavar="DIR", help="model folder (default: the embedded demo model)")
    p.add_argument("--preset", help="with --model on an official download: which transformer; without --model: "
                   "random weights of a preset")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only; "
                   "0.0.0.0 exposes the page, without login, to every machine that can reach this one)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where results are written (default: a new temporary folder)")
    _add_device_options(p)
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("infinitystar serve: error: the web page needs Gradio: pip install 'infinitystar[web]' "
              "(or ./dev, which installs it)", file=sys.stderr)
        return 2
    serve(args.model, args.preset, host=args.host, port=args.port, device=args.device, precision=args.precision,
          memory_mode=args.memory_mode, compile_blocks=args.compile, output_dir=args.output_dir,
          limits=args.request_limit)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure ends as one line (see :mod:`infinitystar.errors`). ``--debug`` (anywhere in
    the arguments) prints tracebacks instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return run_command(args.command, lambda: args.func(args), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
