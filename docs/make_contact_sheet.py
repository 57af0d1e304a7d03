"""Render docs/demo.png, the README's first picture: the shipped demo model's videos for a few prompts.

    .venv/bin/python docs/make_contact_sheet.py

Each row is one prompt (seed 0): five frames of its 2 s video (frames 0, 8, 16, 24, 32), upscaled 3x with crisp
pixels, the prompt written above. Held-out prompts (combinations never seen in training) are marked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from infinitystar.demo.synthetic import HELD_OUT, caption
from infinitystar.fileio import atomic_output
from infinitystar.pipeline import InfinityStarPipeline

TRIPLES = [("red", "circle", "right"), ("blue", "triangle", "up"), ("yellow", "square", "down"),
           ("green", "triangle", "down")]
FRAMES = (0, 8, 16, 24, 32)
SCALE, GAP, LABEL = 2, 6, 18
OUT = Path(__file__).with_name("demo.png")


def main() -> None:
    pipe = InfinityStarPipeline.from_pretrained(str(Path(__file__).parents[1] / "src/infinitystar/demo/weights"))
    rows = []
    for triple in TRIPLES:
        prompt = caption(triple, 0)
        video = pipe(prompt, seed=0, progress=False).frames  # [T, H, W, 3] uint8
        tiles = [np.kron(video[i], np.ones((SCALE, SCALE, 1), np.uint8)) for i in FRAMES]
        rows.append((prompt + ("   (held out: never seen in training)" if triple in HELD_OUT else ""), tiles))
    save_sheet(rows, OUT, GAP, LABEL)


def save_sheet(rows: list[tuple[str, list[np.ndarray]]], out: Path, gap: int, label: int) -> None:
    """Labelled rows of equal-size tiles on a dark background, written atomically as png (docs/make_*.py)."""
    th, tw = rows[0][1][0].shape[:2]
    columns = max(len(tiles) for _, tiles in rows)
    width = columns * tw + (columns + 1) * gap
    height = len(rows) * (th + label + gap) + gap
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    y = gap
    for text, tiles in rows:
        draw.text((gap, y), text, fill=(230, 230, 230))
        for j, tile in enumerate(tiles):
            sheet.paste(Image.fromarray(tile), (gap + j * (tw + gap), y + label))
        y += th + label + gap
    with atomic_output(out) as tmp:
        sheet.save(tmp, format="PNG")
    print(f"wrote {out} ({width}x{height})")

if __name__ == "__main__":
    main()
