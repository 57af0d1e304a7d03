"""The ``infinitystar`` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinitystar", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_convert(subparsers)
    return parser


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
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from infinitystar.checkpoints import convert_vae_checkpoint

    if args.kind == "vae":
        out = convert_vae_checkpoint(args.src, args.dst)
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(f"unknown checkpoint kind {args.kind!r}")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
