"""A folder of small synthetic images to try ``dataset=image_folder`` on (the tests use it too).

    python -m datamodules.demo_images FOLDER [--count 200] [--grey] [--scenes N]

Writes ``count`` PNGs of random sizes (24..47 px, not square) with smooth stripes and a blob, in
three sub-folders; ``--grey`` writes 8-bit grey images, else RGB. ``--scenes N`` writes N scene
folders instead, each with 3 views (the image with a dark rectangle over part of it) and a
``target.png``: input for ``fusionvae-fuse``. Same arguments, same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def demo_image(grey: bool, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[H, W]`` or ``[H, W, 3]``: stripes and a bright disc, size and pattern from ``rng``."""
    h, w = (int(v) for v in rng.integers(24, 48, 2))
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    fx, fy, cx, cy = rng.uniform(0.1, 0.6), rng.uniform(0.1, 0.6), rng.uniform(0, w), rng.uniform(0, h)
    base = 90 + 50 * np.sin(fx * xx) * np.cos(fy * yy) + 110 * ((xx - cx) ** 2 + (yy - cy) ** 2 < (h / 4) ** 2)
    base = np.clip(base, 0, 255).astype(np.uint8)
    if grey:
        return base
    tint = rng.uniform(0.4, 1.0, 3)
    return (base[..., None] * tint).astype(np.uint8)


def write_demo(folder: str | Path, count: int = 200, grey: bool = False, seed: int = 0) -> list[Path]:
    """``count`` PNGs below ``folder`` (three sub-folders); returns their paths."""
    rng, folder = np.random.default_rng(seed), Path(folder)
    paths = []
    for i in range(count):
        path = folder / f"part{i % 3}" / f"img{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(demo_image(grey, rng)).save(path)
        paths.append(path)
    return paths


def write_scenes(folder: str | Path, scenes: int, size: int, grey: bool = False, seed: int = 0) -> list[Path]:
    """``scenes`` folders of ``size`` px images: ``view1..3.png`` (part of the image hidden) and ``target.png``."""
    rng, folder = np.random.default_rng(seed), Path(folder)
    out = []
    for s in range(scenes):
        target = np.asarray(Image.fromarray(demo_image(grey, rng)).resize((size, size)))
        scene = folder / f"scene{s:03d}"
        scene.mkdir(parents=True, exist_ok=True)
        Image.fromarray(target).save(scene / "target.png")
        for v in range(3):
            view = target.copy()
            top, left = (int(x) for x in rng.integers(0, size // 2, 2))
            view[top : top + size // 2, left : left + size // 2] = 0
            Image.fromarray(view).save(scene / f"view{v + 1}.png")
        out.append(scene)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--count", type=int, default=200, help="images to write (default 200)")
    parser.add_argument("--grey", action="store_true", help="grey images (default RGB)")
    parser.add_argument("--scenes", type=int, default=0, help="write this many scene folders instead")
    parser.add_argument("--size", type=int, default=32, help="side of the scene images (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.scenes:
        written = write_scenes(args.folder, args.scenes, args.size, args.grey, args.seed)
    else:
        written = write_demo(args.folder, args.count, args.grey, args.seed)
    print(f"wrote {len(written)} {'scenes' if args.scenes else 'images'} to {args.folder}")


if __name__ == "__main__":
    main()
