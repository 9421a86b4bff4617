"""python -m cascade.infer: deflare a folder of photographs with a Uformer or a cascade.

    python -m cascade.infer --checkpoint net_g_last.pth --input photos/ --output deflared/

writes `<output>/<stem>.png` (the deflared RGB image, same size as the input) for every image in
`--input`, and `<output>/metadata.json` recording the checkpoint, the architecture and every
inference setting (mode, tiling, base kind, light-source re-blend), so a folder of results says how
it was made. `--mode flare7k-large --base-kind flare7k|flare7kpp` reproduces Flare7K's
test_large.py; `--base-kind` alone (native mode) its test.py on 512x512 photos.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cascade.data.images import read_rgb, to_tensor, to_uint8, write_png
from cascade.device import resolve_device
from cascade.errors import UserError, cli_errors
from cascade.io import IMAGE_SUFFIXES, atomic_write_json, list_images
from cascade.model import (
    BASE_KINDS,
    DEFAULT_TILE,
    MODES,
    OFFICIAL_LIGHT_THRESHOLDS,
    CascadedFlareRemover,
    default_overlap,
    deflare,
    official_light_threshold,
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
    parser.add_argument("--mode", choices=MODES, default="native",
                        help="native: the photo at its own resolution, in overlapping cross-faded "
                             "--tile tiles (Flare7K's test.py for 512x512 photos); flare7k-large: "
                             "Flare7K's test_large.py: short side resized to 512, 512 px strips, "
                             "the predicted flare upsampled and subtracted at full resolution "
                             "(--tile/--overlap do not apply) (default: %(default)s)")
    parser.add_argument("--base-kind", choices=BASE_KINDS, default=None,
                        help="the released network the weights descend from (both have 6 output "
                             "channels, so the file cannot tell): flare7k (v1) re-blends the light "
                             "source as the official script of --mode does (test.py: 0.97, "
                             "test_large.py: 0.95), flare7kpp keeps channels 0:3 as they are. "
                             "Replaces --blend-light-source/--light-threshold (default: unset, "
                             "re-blend only with --blend-light-source)")
    parser.add_argument("--tile", type=int, default=None,
                        help=f"--mode native: tile side in pixels; larger images are processed in "
                             f"overlapping, cross-faded tiles (default: {DEFAULT_TILE})")
    parser.add_argument("--overlap", type=int, default=None,
                        help="--mode native: minimum overlap of neighbouring tiles in pixels "
                             "(default: a quarter of --tile)")
    parser.add_argument("--blend-light-source", action="store_true",
                        help="re-blend saturated light sources from the input as Flare7K's "
                             "blend_light_source does (off by default; for Flare7K v1 "
                             "checkpoints; --base-kind flare7k does it at the official threshold)")
    parser.add_argument("--light-threshold", type=float, default=None,
                        help="channel-mean level counted as saturated by --blend-light-source "
                             "(default: the official one for --mode: "
                             f"{OFFICIAL_LIGHT_THRESHOLDS['native']['flare7k']} native, "
                             f"{OFFICIAL_LIGHT_THRESHOLDS['flare7k-large']['flare7k']} "
                             "flare7k-large)")
    parser.add_argument("--device", default="cpu",
                        help="torch device: cpu, cuda, cuda:1, ... or auto (default: %(default)s)")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Deflare every image; returns the metadata written beside them."""
    tile: int | None = None
    overlap: int | None = None
    if args.mode == "native":
        tile = DEFAULT_TILE if args.tile is None else args.tile
        overlap = default_overlap(tile) if args.overlap is None else args.overlap
        if tile < 1 or not 0 <= overlap < tile:
            raise UserError(f"--tile {tile} --overlap {overlap}: need tile >= 1 and "
                            "0 <= overlap < tile")
    elif args.tile is not None or args.overlap is not None:
        raise UserError(f"--tile/--overlap: --mode {args.mode} uses test_large.py's fixed 512 px "
                        "strips; drop them")
    if args.base_kind is not None and (args.blend_light_source or args.light_threshold is not None):
        raise UserError(f"--base-kind {args.base_kind} sets the light-source re-blend as the "
                        "official script does; drop --blend-light-source/--light-threshold")
    if args.light_threshold is not None and not args.blend_light_source:
        raise UserError("--light-threshold only makes sense with --blend-light-source")
    if args.base_kind is not None:
        threshold = official_light_threshold(args.base_kind, args.mode)
    elif args.blend_light_source:
        threshold = (OFFICIAL_LIGHT_THRESHOLDS[args.mode]["flare7k"]
                     if args.light_threshold is None else args.light_threshold)
    else:
        threshold = None
    images = list_images(args.input, "input folder")
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
        "mode": args.mode,
        "base_kind": args.base_kind,
        "tile": tile,  # None in flare7k-large mode: 512 px strips every 256 px, fixed
        "overlap": overlap,
        "light_source_blend": ("none" if threshold is None else
                               "flare7k_test_py" if args.mode == "native" else
                               "flare7k_test_large_py"),
        "light_threshold": threshold,
        "device": str(device),
        "outputs": ("deflared RGB, channels 0:3 of the network output" if args.mode == "native"
                    else "deflared RGB as test_large.py: the input minus the predicted flare "
                         "(|resized input - deflared| in uint8, bicubic-upsampled)"),
        "images": [],
    }
    for path in tqdm(images, desc="deflare", unit="img"):
        x = to_tensor(read_rgb(path), device=device).unsqueeze(0)  # (1, 3, H, W)
        out = deflare(model, x, mode=args.mode, light_threshold=threshold,
                      tile=DEFAULT_TILE if tile is None else tile, overlap=overlap)
        target = args.output / f"{path.stem}.png"
        write_png(target, to_uint8(out[0]))
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
