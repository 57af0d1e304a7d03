"""Issue 18's targets on the shipped demo model: it proves spacetime autoregression on the torus world.

Each test runs one task of :func:`infinitystar.demo.evaluate.evaluate_tasks` on a small fixed-seed sample (one video
per held-out prompt: the 12 held-out triples, seed 0) and asserts the issue's target for it (``TASK_TARGETS``).
They run only once the shipped weights declare the new world (``training_source.json`` with ``"world": "torus"``,
written by the demo recipe); a model trained on the former in-frame clips was never asked for any of this.

What each target allows on this sample (a fraction at or above the target passes):

* t2v-2s, 12 clips: colour 98 % and direction 98 % allow no miss (11/12 = 91.7 %), shape 90 % one (11/12);
* t2v-6s, 12 videos of 3 segments: direction 85 % of 36 segments allows 5 misses (31/36 = 86.1 %), colour and shape
  in every segment 90 % of 12 videos one miss;
* story, 12 stories of 3 segments: direction 80 % of 36 segments allows 7 misses (29/36 = 80.6 %);
* i2v, 12 videos: keeps colour and shape 90 % allows one miss;
* extension, 12 videos: continues 85 % allows one miss (10/12 = 83.3 % fails);
* long, 2 prompts of 30 s (15 segments each): every one of the 30 segments shows a moving object, no miss.

The judge these rest on is right on >= 99 % of ground truth of every kind (tests/test_demo_judge.py), so a miss
here is the model's, give or take about one per hundred items.
"""

from __future__ import annotations

import pytest

from infinitystar.demo import DEMO_WEIGHTS, demo_weights_shipped, model_world
from infinitystar.demo import evaluate as ev

pytestmark = pytest.mark.skipif(
    not demo_weights_shipped() or model_world(DEMO_WEIGHTS) != "torus",
    reason="the shipped demo weights do not declare the torus world (training_source.json has no \"world\": "
           "\"torus\"): issue 18's targets apply to the model trained on it")

SEED = 0


@pytest.fixture(scope="module")
def pipe():
    from infinitystar.pipeline import InfinityStarPipeline

    return InfinityStarPipeline.from_pretrained(DEMO_WEIGHTS)


def _assert_targets(report: ev.TaskReport, task: str) -> None:
    rows = [m for m in report.metrics if m.task == task and m.target is not None]
    assert rows, f"no target metric for {task}"
    failed = [f"{m.metric}: {m.shown()} {'>' if m.at_most else '<'} {m.target:g}" for m in rows if not m.met]
    judged = [f"{' / '.join(s.prompts)} -> {s.judged}" for s in report.samples if s.task == task]
    assert not failed, f"{task}: {'; '.join(failed)}\n" + "\n".join(judged)


@pytest.mark.parametrize("task", ["t2v-2s", "t2v-6s", "story", "i2v", "extension"])
def test_task_meets_the_issue_targets_on_held_out_prompts(pipe, task):
    report = ev.evaluate_tasks(pipe, task, n_per_prompt=1, seed=SEED)
    assert sum(s.task == task for s in report.samples) == len(ev.HELD_OUT)
    _assert_targets(report, task)


def test_30_second_videos_show_a_moving_object_in_every_segment(pipe):
    report = ev.evaluate_tasks(pipe, "long", n_per_prompt=1, seed=SEED, long_prompts=2)
    assert report.metric("long", "segments with a moving object").n == 2 * 15
    _assert_targets(report, "long")


@pytest.mark.slow  # two fresh processes, each loading the model and generating (about a minute on a CPU)
def test_peak_memory_of_a_30_second_video_is_that_of_a_6_second_one(pipe):
    """The generation loop's memory does not grow with the length and the streamed clips are kept as uint8 frames:
    a 30 s video's peak (measured after loading) is at most ``LONG_MEMORY_RATIO`` (1.05) times a 6 s video's. The
    longer output itself needs 2 bytes per extra value plus its latent, about 9.5 MiB at 64 x 64, 2 % of the ~430
    MiB peak; the other 3 % are for the allocator (freed blocks it keeps)."""
    from infinitystar.demo import run_model_name

    mem = ev._memory_comparison(pipe, run_model_name(None, None), ev.caption(ev.HELD_OUT[0], 0), SEED, 64, 64)
    ratio = [m for m in mem["metrics"] if m.metric.startswith("peak RSS ratio")][0]
    assert ratio.at_most and ratio.target == ev.LONG_MEMORY_RATIO
    assert ratio.met, mem["summary"]
