"""python -m cascade.infer: deflare a folder of photographs with a Uformer or a cascade.

    python -m cascade.infer --checkpoint net_g_last.pth --input photos/ --output deflared/

writes `<output>/<stem>.png` (the deflared RGB image, same size as the input) for every image in
`--input`, and `<output>/metadata.json` recording the checkpoint, the architecture and every
inference setting (tiling, light-source re-blend), so a folder of results says how it was made.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cascade.data.images import read_rgb, to_tensor, to_uint8, write_png
from cascade.errors import UserError, cli_errors
from cascade.io import IMAGE_SUFFIXES, atomic_write_json, image_files
from cascade.model import (
    DEFAULT_LIGHT_THRESHOLD,
    DEFAULT_TILE,
    CascadedFlareRemover,
    default_overlap,
    remove_flare,
)
from cascade.uformer import load_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cascade.infer",
        description="Remove lens flare from every image in a folder with a Flare7K(++) Uformer "
                    "checkpoint (or flaresweep's own), optionally as the cascade of Song & Bae. "
                    "Writes <output>/<stem>.png and <output>/metadata.json.",
    )
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="Uformer weights: a Flare7K/Flare7K++ .pth (params_ema preferred over "
                             "params) or a flaresweep checkpoint")
    parser.add_argument("--input", required=True, type=Path,
                        help=f"folder of images ({', '.join(IMAGE_SUFFIXES)}); not recursive")
    parser.add_argument("--output", required=True, type=Path,
                        help="folder for the deflared PNGs (created if missing)")
    parser.add_argument("--cascade", action="store_true",
                        help="run the cascade negative -> anchor (--checkpoint is the anchor) and "
                             "write the anchor's output")
    parser.add_argument("--negative", type=Path, default=None,
                        help="with --cascade: weights of the frozen negative network (e.g. the "
                             "released base) when --checkpoint holds a fine-tuned anchor "
                             "(default: --checkpoint itself)")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE,
                        help="tile side in pixels; larger images are processed in overlapping, "
                             "cross-faded tiles (default: %(default)s)")
    parser.add_argument("--overlap", type=int, default=None,
                        help="minimum overlap of neighbouring tiles in pixels (default: a quarter "
                             "of --tile)")
    parser.add_argument("--blend-light-source", action="store_true",
                        help="re-blend saturated light sources from the input as Flare7K's test.py "
                             "does (off by default; for Flare7K v1 checkpoints)")
    parser.add_argument("--light-threshold", type=float, default=DEFAULT_LIGHT_THRESHOLD,
                        help="channel-mean level counted as saturated by --blend-light-source "
                             "(default: %(default)s)")
    parser.add_argument("--device", default="cpu",
                        help="torch device: cpu, cuda, cuda:1, ... or auto (default: %(default)s)")
    return parser


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else must be a usable torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device (try cpu, cuda or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name; UserError if there are none."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such input folder")
    files = image_files(folder)
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    stems = [p.stem for p in files]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise UserError(f"{folder}: several images share the name {clashes[0]!r}; outputs would "
                        "overwrite each other")
    return files


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Deflare every image; returns the metadata written beside them."""
    overlap = default_overlap(args.tile) if args.overlap is None else args.overlap
    if args.tile < 1 or not 0 <= overlap < args.tile:
        raise UserError(f"--tile {args.tile} --overlap {overlap}: need tile >= 1 and "
                        "0 <= overlap < tile")
    images = list_images(args.input)
    if args.output.resolve() == args.input.resolve():
        raise UserError(f"{args.output}: the output folder must differ from the input folder")
    device = resolve_device(args.device)
    uformer = load_checkpoint(args.checkpoint)
    if args.negative is not None and not args.cascade:
        raise UserError("--negative only makes sense with --cascade")
    if args.negative is not None:
        model = CascadedFlareRemover(load_checkpoint(args.negative), uformer)
    elif args.cascade:
        model = CascadedFlareRemover.from_uformer(uformer)
    else:
        model = uformer
    model = model.to(device).eval()

    metadata: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "arch": uformer.arch,
        "cascade": bool(args.cascade),
        "negative_checkpoint": str(args.negative or args.checkpoint) if args.cascade else None,
        "tile": args.tile,
        "overlap": overlap,
        "light_source_blend": "flare7k_test_py" if args.blend_light_source else "none",
        "light_threshold": args.light_threshold if args.blend_light_source else None,
        "device": str(device),
        "outputs": "deflared RGB, channels 0:3 of the network output",
        "images": [],
    }
    for path in tqdm(images, desc="deflare", unit="img"):
        x = to_tensor(read_rgb(path), device=device).unsqueeze(0)  # (1, 3, H, W)
        out = remove_flare(model, x, tile=args.tile, overlap=overlap,
                           blend_light=args.blend_light_source, light_threshold=args.light_threshold)
        target = args.output / f"{path.stem}.png"
        write_png(target, to_uint8(out[0, :3]))
        metadata["images"].append({"input": path.name, "output": target.name})
    atomic_write_json(args.output / "metadata.json", metadata)
    return metadata


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
