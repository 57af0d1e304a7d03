"""The demo model's whole training recipe as one command: ``infinitystar train-demo OUT_DIR``.

Every stage is the project's ordinary command, run as a subprocess of this Python (so each has its own
log file and a killed recipe resumes where it stopped: finished stages are skipped, the trainers continue
from their newest checkpoints). The stages run one after another; each uses every core through
``processes`` data-parallel processes of one thread (``torchrun``; gloo on CPU), which on a 2-core
machine is 1.6-2x faster than one process of two threads:

1. ``make-demo-data OUT/data``: the torus world (``demo.synthetic``): 2048 training videos of 1 to 3 clips (2-6 s,
   60 of the 72 colour/shape/direction triples), 768 story videos of 2-3 segments whose direction changes at each
   boundary (one caption per segment, in the reference's interactive layout), and held-out videos of every length
   plus one story per held-out triple; 64x64 at 16 fps;
2. ``train-vae``: the demo VAE (``demo/configs/vae.toml``) on short training clips, PSNR on held-out clips;
   then ``train-vae`` of its decoder alone on whole 33-frame clips (``demo/configs/vae_decoder.toml``;
   the encoder, hence every latent and bit, stays as it is);
3. a base pipeline folder ``OUT/base``: the ``demo`` preset (random transformer, the word-level text
   encoder) with the trained VAE;
4. ``extract-features``: the latents of the first ``feature_clips`` training videos and ``feature_stories``
   stories under that VAE, in ``workers`` processes of one thread each;
5. ``train``: the transformer (``demo/configs/transformer.toml``) on the cached latents, every task at once:
   text-to-video of 1-3 clips, image-to-video and extension (given first frame / clips) and interactive turns
   of the stories (``train.tasks``);
   With ``demo/configs/transformer_stage2.toml`` present, a second stage continues from the first's export
   (``OUT/model_stage1``) with its own schedule and data mix (its ``[recipe]`` table: stories repeated
   ``story_repeats`` times, so interactive turns weigh more), run folder ``OUT/run_stage2``;
6. ``export``: the pipeline folder ``OUT/model``;
7. ``evaluate --tasks t2v-2s,t2v-6s,story,i2v,extension,long``: the demo judge on every task for the held-out
   triples against the issue's targets, the peak memory of a 30 s against a 6 s video, and the tokenizer's PSNR on
   the held-out videos of every length (``OUT/eval/report.md``).

``--ship`` finally writes ``OUT/model`` into the package (``infinitystar/demo/weights``), which is how
the weights that ship were made. The config files hold every hyper-parameter (``batch_size`` is per
process); the recipe only fills in the paths under OUT_DIR.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from infinitystar.checkpoints import load_vae
from infinitystar.config import replace
from infinitystar.demo import DEMO_WEIGHTS, model_world
from infinitystar.demo.evaluate import TASKS
from infinitystar.demo.synthetic import NEW_SHAPE, WORLD  # the recipe's data shows the world; its exports record it
from infinitystar.fileio import atomic_write_json, atomic_write_text
from infinitystar.pipeline import MODEL_INDEX, InfinityStarPipeline, read_pipeline_config
from infinitystar.text import VOCABULARY_FILE, write_vocabulary
from infinitystar.train.config import read_config_file
from infinitystar.train.data import caption_words

__all__ = ["DEFAULT_CONFIG_DIR", "SAMPLING_FILE", "RecipeOptions", "build_base", "run_recipe", "set_sampling_defaults",
           "ship", "stage2_config"]

# The recipe's committed hyper-parameters: infinitystar/demo/configs, package data (so train-demo also runs from an
# installed wheel, not only from a source tree).
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class RecipeOptions:
    """Sizes of the recipe; the defaults are the ones the shipped weights were trained with."""

    clips: int = 2048
    heldout_clips: int = 48
    # Story videos (interactive training) and held-out stories (12: one per held-out triple, its middle segment).
    stories: int = 768
    heldout_stories: int = 12
    # Videos of a diamond (synthetic.NEW_SHAPE) for both VAE stages only: no transformer caption names it, but the
    # tokenizer learns to draw it, so a LoRA adapter can teach the word (demo.lora). The shipped model was trained
    # with none: its VAE turns a third of the diamonds into circles, and a decoder stage with them (encoder frozen)
    # only moved that from 31 to 33 of 48 segments, so the encoder has to see them too (a full retraining).
    vae_diamond_videos: int = 0
    # Training clips whose latents the transformer trains on (the first N of train.jsonl; all 60 triples occur).
    feature_clips: int = 1024
    # Stories whose latents the transformer trains on (the first N of train_stories.jsonl).
    feature_stories: int = 512
    # Parallel single-thread extraction processes (the VAE encoder is fastest with one thread per process).
    workers: int = 2
    # Data-parallel processes of the two trainers (torchrun, one thread each). The configs' batch_size is per
    # process, so another count trains on another global batch: the shipped weights used 2.
    processes: int = 2
    # Videos per prompt and task of the final evaluation (``evaluate --tasks``: the 12 held-out triples).
    eval_clips_per_prompt: int = 4
    vae_steps: int | None = None  # None = the config file's
    transformer_steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("clips", "stories", "feature_clips", "feature_stories", "workers", "processes",
                     "eval_clips_per_prompt"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"RecipeOptions.{name} must be an int >= 1, got {v!r}")
        if self.heldout_clips < 1:
            raise ValueError(f"RecipeOptions.heldout_clips must be >= 1 (the VAE is evaluated on them), "
                             f"got {self.heldout_clips}")
        if self.feature_clips > self.clips:
            raise ValueError(f"RecipeOptions.feature_clips ({self.feature_clips}) exceeds clips ({self.clips})")
        if self.feature_stories > self.stories:
            raise ValueError(f"RecipeOptions.feature_stories ({self.feature_stories}) exceeds stories "
                             f"({self.stories})")
        for name in ("heldout_stories", "vae_diamond_videos"):
            if getattr(self, name) < 0:
                raise ValueError(f"RecipeOptions.{name} must be >= 0, got {getattr(self, name)}")


def _log(msg: str) -> None:
    print(f"[train-demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _set(config: dict[str, Any], section: str, **values: Any) -> None:
    """Set fields of one section of a config's plain data (the table is created if the file has none)."""
    config.setdefault(section, {}).update(values)


def _cli(args: Sequence[str], log: Path, threads: int | None = None, processes: int = 1) -> subprocess.Popen:
    """Start ``python -m infinitystar.cli ARGS`` with its output in ``log``; with ``processes > 1`` under
    ``torchrun --standalone`` (a free local port, gloo on CPU)."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node",
                     str(processes)]
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "a", encoding="utf-8")  # noqa: SIM115 - closed by the waiter
    where = f"torchrun x{processes}: " if processes > 1 else ""
    handle.write(f"$ {where}infinitystar {' '.join(args)}\n")
    handle.flush()
    proc = subprocess.Popen([*launcher, "-m", "infinitystar.cli", *args], stdout=handle,
                            stderr=subprocess.STDOUT, env=env)
    proc._log_handle = handle  # type: ignore[attr-defined]
    proc._log_path = log  # type: ignore[attr-defined]
    return proc


def _wait(procs: Sequence[subprocess.Popen], what: str) -> None:
    failed = []
    for proc in procs:
        rc = proc.wait()
        proc._log_handle.close()  # type: ignore[attr-defined]
        if rc != 0:
            failed.append(f"{proc._log_path} (exit {rc})")  # type: ignore[attr-defined]
    if failed:
        raise RuntimeError(f"train-demo: {what} failed; see {', '.join(failed)}")


def _run(args: Sequence[str], log: Path, what: str, threads: int | None = None, processes: int = 1) -> float:
    t0 = time.perf_counter()
    where = f" ({processes} processes)" if processes > 1 else ""
    _log(f"{what}{where}: infinitystar {' '.join(args)}  (log: {log})")
    _wait([_cli(args, log, threads, processes)], what)
    seconds = time.perf_counter() - t0
    _log(f"{what}: done in {seconds:.0f} s")
    return seconds


def build_base(vae_weights: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """The base pipeline folder of the transformer run: the ``demo`` preset with the trained VAE."""
    pipe = InfinityStarPipeline.from_preset("demo", seed=seed)
    trained = load_vae(vae_weights, pipe.config.vae)
    pipe.vae.load_state_dict(trained.state_dict())
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


SAMPLING_FILE = "sampling.toml"


def set_sampling_defaults(model_dir: str | os.PathLike, values: dict[str, Any]) -> None:
    """Write sampling defaults (``SamplingConfig`` fields) into a model folder's ``model_index.json``, validated and
    atomically; a no-op when they are already there."""
    index = Path(model_dir) / MODEL_INDEX
    data = json.loads(index.read_text(encoding="utf-8"))
    config = read_pipeline_config(model_dir)
    sampling = asdict(replace(config.sampling, **values))  # unknown names and bad values raise here
    if data["config"].get("sampling") != sampling:
        data["config"]["sampling"] = sampling
        atomic_write_json(index, data)


def ship(model_dir: str | os.PathLike, dest: str | os.PathLike = DEMO_WEIGHTS,
         sampling: dict[str, Any] | None = None) -> Path:
    """Write a trained demo pipeline folder to ``dest`` (default: the package's ``demo/weights``), optionally
    with other sampling defaults (``guidance``, ``guidance_scale``, ``tau_image``, ``tau_video``); the VAE is
    stored in float16."""
    pipe = InfinityStarPipeline.from_pretrained(model_dir)
    if sampling:
        pipe.config = replace(pipe.config, sampling=replace(pipe.config.sampling, **sampling))
    # The VAE's weights are stored in float16 (the loader casts them back to float32): 8 MB instead of 16 MB,
    # so the package stays small; the transformer stays float32 (its loader keeps the stored dtype).
    pipe.vae.half()
    pipe.save_pretrained(dest)
    src_info = Path(model_dir) / "training_source.json"
    if src_info.is_file():
        info = json.loads(src_info.read_text(encoding="utf-8"))
        info.pop("run", None), info.pop("checkpoint", None)  # absolute paths of the machine that trained
        info["world"] = WORLD  # the demo world it learned (tests/test_demo_targets.py asserts its targets)
        atomic_write_json(Path(dest) / "training_source.json", info)
    return Path(dest)


def _record_world(model_dir: Path) -> None:
    if model_world(model_dir) != WORLD:
        info_file = model_dir / "training_source.json"
        info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
        atomic_write_json(info_file, {**info, "world": WORLD})


def _jsonl_lines(src: Path) -> list[str]:
    return [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]


def _subset_jsonl(src: Path, dest: Path, n: int) -> Path:
    lines = _jsonl_lines(src)
    if len(lines) < n:
        raise ValueError(f"{src} has {len(lines)} records, fewer than the {n} the features take")
    atomic_write_text(dest, "\n".join(lines[:n]) + "\n")
    return dest


def _repeat_jsonl(src: Path, times: int) -> Path:
    """``src`` itself (``times`` = 1) or a copy of it with its records ``times`` times over."""
    if times == 1:
        return src
    dest = src.with_name(f"{src.stem}_x{times}.jsonl")
    atomic_write_text(dest, "\n".join(_jsonl_lines(src) * times) + "\n")
    return dest


def stage2_config(path: str | os.PathLike, first_data: dict[str, Any], videos: Path, stories: Path,
                  out_dir: Path, first_model: Path) -> dict[str, Any]:
    """The plain data of the second transformer stage's TrainConfig: ``path`` (``transformer_stage2.toml``) with
    the first stage's data table under its own ``[data]``, the training videos and the stories (repeated as its
    ``[recipe] story_repeats`` says), the run folder ``out_dir`` and the first stage's export as the model."""
    cfg = read_config_file(path)
    story_repeats = cfg.pop("recipe", {}).get("story_repeats", 1)
    if not isinstance(story_repeats, int) or isinstance(story_repeats, bool) or story_repeats < 1:
        raise ValueError(f"{path}: [recipe] story_repeats must be an integer >= 1, got {story_repeats!r}")
    data = {**first_data, **cfg.get("data", {})}
    # Each repeat is its own record (its own source line, so its own task and caption draws).
    data["jsonl"] = [str(videos), str(_repeat_jsonl(stories, story_repeats))]
    cfg.update(out_dir=str(out_dir), data=data)
    _set(cfg, "model", pipeline=str(first_model))
    return cfg


def run_recipe(out_dir: str | os.PathLike, options: RecipeOptions | None = None,
               config_dir: str | os.PathLike = DEFAULT_CONFIG_DIR, *, do_ship: bool = False) -> dict[str, Any]:
    """Run the whole demo recipe into ``out_dir`` (resumable) and return the timings and the eval summary."""
    opts = options or RecipeOptions()
    out = Path(out_dir).resolve()
    cfg_dir = Path(config_dir)
    logs = out / "logs"
    gen = out / "configs"
    gen.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    data = out / "data"

    # 1. data (the diamond videos are the VAE's only)
    data_files = ["train.jsonl", "heldout.jsonl", "train_stories.jsonl"]
    vae_paths = [str(data / "train.jsonl")]
    if opts.vae_diamond_videos:
        data_files.append(f"{NEW_SHAPE}.jsonl")
        vae_paths.append(str(data / f"{NEW_SHAPE}.jsonl"))
    if not all((data / name).is_file() for name in data_files):
        timings["make_demo_data"] = _run(
            ["make-demo-data", str(data), "--clips", str(opts.clips), "--heldout-clips", str(opts.heldout_clips),
             "--stories", str(opts.stories), "--heldout-stories", str(opts.heldout_stories),
             "--diamond-videos", str(opts.vae_diamond_videos), "--seed", str(opts.seed)],
            logs / "make_demo_data.log", "make-demo-data")

    # One thread per trainer process when several share the cores; a single process keeps every thread (the VAE
    # configs may still pin their own `threads`).
    trainer_threads = 1 if opts.processes > 1 else None

    # 2. VAE
    vae_cfg = read_config_file(cfg_dir / "vae.toml")
    vae_cfg["out_dir"] = str(out / "vae")
    _set(vae_cfg, "data", paths=vae_paths, eval_paths=[str(data / "heldout.jsonl")])
    if opts.vae_steps is not None:
        _set(vae_cfg, "training", steps=opts.vae_steps)
    atomic_write_json(gen / "vae.json", vae_cfg)
    vae_weights = out / "vae" / "vae.safetensors"
    if not vae_weights.is_file():
        timings["train_vae"] = _run(["train-vae", str(gen / "vae.json"), "--quiet"], logs / "train_vae.log",
                                    "train-vae", threads=trainer_threads, processes=opts.processes)

    # 2b. the decoder alone on whole clips (demo/configs/vae_decoder.toml, optional): the encoder -- so the
    # latents and the bits -- stays as it is.
    if (cfg_dir / "vae_decoder.toml").is_file():
        dec_cfg = read_config_file(cfg_dir / "vae_decoder.toml")
        dec_cfg["out_dir"] = str(out / "vae_decoder")
        _set(dec_cfg, "data", paths=vae_paths, eval_paths=[str(data / "heldout.jsonl")])
        _set(dec_cfg, "model", init_checkpoint=str(vae_weights))
        atomic_write_json(gen / "vae_decoder.json", dec_cfg)
        vae_weights = out / "vae_decoder" / "vae.safetensors"
        if not vae_weights.is_file():
            timings["train_vae_decoder"] = _run(["train-vae", str(gen / "vae_decoder.json"), "--quiet"],
                                                logs / "train_vae_decoder.log", "train-vae (decoder)",
                                                threads=trainer_threads, processes=opts.processes)

    # 3. base pipeline
    base = out / "base"
    if not (base / "model_index.json").is_file():
        build_base(vae_weights, base, seed=opts.seed)

    # 4. features (one thread per process: batch-1 3-D convolutions gain nothing from more)
    tr_cfg = read_config_file(cfg_dir / "transformer.toml")
    data_cfg = dict(tr_cfg.get("data", {}))
    subset = _subset_jsonl(data / "train.jsonl", data / f"train_first{opts.feature_clips}.jsonl", opts.feature_clips)
    stories = _subset_jsonl(data / "train_stories.jsonl", data / f"train_stories_first{opts.feature_stories}.jsonl",
                            opts.feature_stories)
    cache = out / "cache"
    done_marker = cache / f".complete_{opts.feature_clips}_{opts.feature_stories}"
    if not done_marker.is_file():
        t0 = time.perf_counter()
        args = ["extract-features", str(subset), str(stories), "--cache-dir", str(cache), "--vae",
                str(base / "vae" / "model.safetensors"), "--pipeline", str(base),
                "--max-seconds", str(data_cfg.get("max_seconds", 2)), "--quiet"]
        _log(f"extract-features: {opts.workers} process(es) over {opts.feature_clips} videos and "
             f"{opts.feature_stories} stories")
        procs = [_cli([*args, "--rank", str(r), "--world-size", str(opts.workers)],
                      logs / f"extract_features_{r}.log", threads=1) for r in range(opts.workers)]
        _wait(procs, "extract-features")
        atomic_write_text(done_marker, "ok\n")
        timings["extract_features"] = time.perf_counter() - t0
        _log(f"extract-features: done in {timings['extract_features']:.0f} s")

    # 5. transformer, 6. export
    data_cfg.update(jsonl=[str(subset), str(stories)], cache_dir=str(cache))
    tr_cfg.update(out_dir=str(out / "run"), data=data_cfg)
    _set(tr_cfg, "model", pipeline=str(base))
    if opts.transformer_steps is not None:
        _set(tr_cfg, "training", steps=opts.transformer_steps)
    atomic_write_json(gen / "transformer.json", tr_cfg)
    model = out / "model"
    stage2_file = cfg_dir / "transformer_stage2.toml"
    first_model = out / "model_stage1" if stage2_file.is_file() else model
    if not (model / "model_index.json").is_file() and not (first_model / "model_index.json").is_file():
        timings["train"] = _run(["train", str(gen / "transformer.json"), "--quiet"], logs / "train.log", "train",
                                threads=trainer_threads, processes=opts.processes)
        timings["export"] = _run(["export", str(out / "run"), str(first_model)], logs / "export.log", "export")

    # 5b. the optional second transformer stage, from the first stage's weights
    if stage2_file.is_file() and not (model / "model_index.json").is_file():
        st2_cfg = stage2_config(stage2_file, data_cfg, subset, stories, out / "run_stage2", first_model)
        atomic_write_json(gen / "transformer_stage2.json", st2_cfg)
        timings["train_stage2"] = _run(["train", str(gen / "transformer_stage2.json"), "--quiet"],
                                       logs / "train_stage2.log", "train (stage 2)", threads=trainer_threads,
                                       processes=opts.processes)
        timings["export_stage2"] = _run(["export", str(out / "run_stage2"), str(model)], logs / "export_stage2.log",
                                        "export (stage 2)")
    for folder in {first_model, model}:  # the world the model learned (demo.lora draws an adapter's data from it)
        _record_world(folder)
    if (cfg_dir / SAMPLING_FILE).is_file():  # the sampling defaults the model is evaluated and shipped with
        set_sampling_defaults(model, read_config_file(cfg_dir / SAMPLING_FILE).get("sampling", {}))
    if not (model / "text_encoder" / VOCABULARY_FILE).is_file():
        # The word encoder's closed vocabulary: every word of the captions the transformer trained on. The pipeline
        # reads it back (capabilities.vocabulary) and warns about prompt words outside it.
        write_vocabulary(model / "text_encoder", sorted(set(caption_words(subset)) | set(caption_words(stories))))

    # 7. evaluation
    report = out / "eval"
    if not (report / "report.json").is_file():
        timings["evaluate"] = _run(["evaluate", "--model", str(model), "--out", str(report), "--tasks", ",".join(TASKS),
                                    "--clips-per-prompt", str(opts.eval_clips_per_prompt),
                                    "--vae-data", str(data / "heldout.jsonl"), "--quiet"],
                                   logs / "evaluate.log", "evaluate")
    summary = json.loads((report / "report.json").read_text(encoding="utf-8"))
    if do_ship:
        dest = ship(model)
        _log(f"shipped {model} -> {dest}")
    result = {"out_dir": str(out), "timings_s": timings,
              "evaluation": [{k: m[k] for k in ("task", "metric", "value", "target", "n", "unit", "met")}
                             for m in summary["metrics"]]}
    atomic_write_json(out / "recipe_result.json", result)
    return result
