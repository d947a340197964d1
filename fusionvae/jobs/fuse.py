"""Fuse 0..k_max image files with a trained checkpoint into samples of the clean image.

    fusionvae-fuse --ckpt <run>/checkpoints/last.ckpt --out grid.png [--samples-dir DIR] \\
        [--samples 8] [--temperature 1.0] [--resize] [--device cpu] view1.png [view2.png view3.png]
    fusionvae-fuse --ckpt ... --out grid.png <scene folder>    # its images are the views

``fusionvae-fuse`` is ``python -m fusionvae.jobs.fuse``. A folder stands for the images in it (sorted by
name; a ``target.*`` image, the clean reference of a scene, is left out).

The grid has one row: the input views, the mean image (t = 0) and the samples. Images are loaded
with PIL and converted to the model's channels (L or RGB). They must have the model's image size;
images of the size of its central crop (e.g. 28x28 digits for the 32x32 MNIST model) are
zero-padded, and ``--resize`` resizes any other size (bilinear).

``--samples-dir`` also writes the mean image and each sample as its own PNG. ``--fit`` makes every
input as ``dataset=image_folder`` / ``multiview_folder`` store images: centre-cropped to a square
and area-resized (use it for models trained on them).

``--temperature`` t >= 0 scales the prior's standard deviations (t = 0: z = the prior means, the
samples differ only by the pixel noise of p(y | z)); ``--samples 0``: inputs and mean image only. Bad
arguments (also a ``--device`` this machine lacks) are refused in one line before anything is loaded.

Python API: ``fuse(module, views)`` on tensors, ``load_views(paths, module)``, ``fuse_files(...)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from fusionvae.errors import BadInputError, FusionVAEError
from fusionvae.files import replaced
from fusionvae.jobs.evaluate import load_model
from fusionvae.jobs.fuse_args import DEVICES, MAX_SEED, ArgumentParser, arg_type, check_device, check_temperature, whole
from fusionvae.model.sampling import draw, input_columns, mean_image, render_grid
from fusionvae.training.module import FusionVAEModule


@dataclass
class FusionResult:
    views: torch.Tensor  # [K, C, H, W] the inputs as the model saw them
    samples: torch.Tensor  # [N, C, H, W]
    mean: torch.Tensor  # [C, H, W] the mean image at t = 0
    k_max: int  # input slots of the model
    temperature: float

    def grid(self) -> torch.Tensor:
        """One labelled row (``fusionvae.model.sampling`` layout): input slots, mean image, samples."""
        inputs, labels = input_columns(self.views.unsqueeze(0), self.k_max)
        images = torch.cat([inputs[0], self.mean.unsqueeze(0), self.samples]).float().cpu()
        labels += ["mean"] + [f"t={self.temperature:g}"] * len(self.samples)
        return render_grid(images.unsqueeze(0), labels)


def load_image(path: str | Path, channels: int, image_size: int, crop: int = 0, resize: bool = False) -> torch.Tensor:
    """``[C, H, W]`` float image in [0, 1] from ``path``, converted to ``channels`` (1: L, 3: RGB)
    and checked against ``image_size`` (a central-crop-sized image is zero-padded by ``crop``)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if channels not in (1, 3):
        raise ValueError(f"the model has {channels} channels; only 1 (grey) and 3 (RGB) are supported")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, channels)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL: UnidentifiedImageError, truncated or broken files
        raise BadInputError(
            f"{path} is not an image file that can be read ({exc.__class__.__name__}); pass PNG or JPEG views"
        ) from None
    x = x.permute(2, 0, 1).float() / 255.0
    h, w = x.shape[1:]
    if (h, w) == (image_size, image_size):
        return x
    inner = image_size - 2 * crop
    if crop and (h, w) == (inner, inner):
        return F.pad(x, (crop, crop, crop, crop))
    if resize:
        return (
            F.interpolate(
                x.unsqueeze(0), size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
            )
            .squeeze(0)
            .clamp(0, 1)
        )
    sizes = f"{image_size}x{image_size}" + (f" (or {inner}x{inner}, zero-padded)" if crop else "")
    raise ValueError(
        f"{path}: image is {w}x{h} but the model expects {sizes}; pass --resize (resize=True) to resize it"
    )


def expand_views(paths: Sequence[str | Path]) -> list[Path]:
    """View files: a folder stands for its image files (a scene: sorted by name, ``target.*`` left out)."""
    from datamodules.folder_scan import IMAGE_SUFFIXES

    files = []
    for path in map(Path, paths):
        if not path.is_dir():
            files.append(path)
            continue
        views = sorted(
            f
            for f in path.iterdir()
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES and f.stem != "target"
        )
        if not views:
            raise BadInputError(f"scene folder {path} holds no view images (PNG / JPEG files other than target.*)")
        files += views
    return files


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write ``image`` as a PNG atomically (a temporary file in the same folder, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced(path, "wb") as f:
        save_image(image, f, format="png")


def fitted_image(path: str | Path, channels: int, image_size: int) -> torch.Tensor:
    """``[C, H, W]`` image in [0, 1] made as ``dataset=image_folder`` / ``multiview_folder`` store
    theirs: centre-cropped to a square and area-resized (``datamodules.folder_scan.fit_image``)."""
    from datamodules.folder_scan import UNREADABLE, fit_image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        pixels = fit_image(path, image_size, channels)
    except UNREADABLE as exc:
        raise BadInputError(
            f"{path} is not an image file that can be read ({exc.__class__.__name__}); pass PNG or JPEG views"
        ) from None
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0


def load_views(
    paths: Sequence[str | Path], module: FusionVAEModule, resize: bool = False, fit: bool = False
) -> torch.Tensor:
    """``[K, C, H, W]`` views for ``module`` from image files (K may be 0); ``fit``: centre-crop and
    area-resize every image (``fitted_image``), else ``load_image``."""
    hp = module.hparams
    if len(paths) > hp.k_max:
        raise ValueError(f"{len(paths)} images given but the model fuses at most k_max={hp.k_max} views")
    channels, size = module.net.config.channels, module.net.config.image_size
    if fit:
        images = [fitted_image(p, channels, size) for p in paths]
    else:
        images = [load_image(p, channels, size, hp["crop"], resize) for p in paths]
    return torch.stack(images) if images else torch.zeros(0, channels, size, size)


def check_views(module: FusionVAEModule, views: torch.Tensor) -> None:
    """Refuse views the model cannot take: their count, size and channels, and non-image values."""
    hp, net = module.hparams, module.net.config
    shape = (net.channels, net.image_size, net.image_size)
    if views.shape[0] > hp.k_max or tuple(views.shape[1:]) != shape:
        raise BadInputError(
            f"views are {tuple(views.shape)} but the model takes [K <= {hp.k_max}, {shape[0]}, "
            f"{shape[1]}, {shape[2]}] (K, C, H, W); load files with load_views() to convert them"
        )
    if not views.is_floating_point() or (
        views.numel() and not (torch.isfinite(views).all() and 0 <= views.min() and views.max() <= 1)
    ):
        raise BadInputError(f"views must be float images in [0, 1] (got {views.dtype}); divide 8-bit images by 255")


@torch.no_grad()
def fuse(
    module: FusionVAEModule, views: torch.Tensor, num_samples: int = 8, temperature: float = 1.0, decode: str = "sample"
) -> FusionResult:
    """``num_samples`` fused images and the mean image (t = 0) from ``views [K, C, H, W]`` in
    [0, 1] (eval mode, fp32). ``decode``: ``sample`` draws each image from p(y | z), ``mean``
    takes the likelihood's mean image for each z."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    temperature = check_temperature(temperature)
    if views.dim() != 4:
        raise ValueError(f"views must be [K, C, H, W], got {tuple(views.shape)}")
    check_views(module, views)
    module.eval()
    device = next(module.parameters()).device
    x = views.to(device, torch.float32).unsqueeze(0)
    mean = mean_image(module.net, x)[0]
    samples = (
        draw(module.net, x, num_samples, temperature, decode)[0] if num_samples else mean.new_zeros(0, *mean.shape)
    )
    result = FusionResult(views.float().cpu(), samples.cpu(), mean.cpu(), module.hparams.k_max, temperature)
    if not (torch.isfinite(result.samples).all() and torch.isfinite(result.mean).all()):
        raise FloatingPointError("the model produced non-finite pixels")
    return result


def fuse_files(
    ckpt: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    num_samples: int = 8,
    temperature: float = 1.0,
    resize: bool = False,
    device: str = "cpu",
    seed: int | None = 0,
    decode: str = "sample",
    samples_dir: str | Path | None = None,
    fit: bool = False,
) -> FusionResult:
    """Load ``ckpt``, fuse the image files (a folder: its images) and write the grid (inputs | mean |
    samples) to ``out``, and with ``samples_dir`` the mean image and each sample as PNGs there."""
    device = check_device(device)  # before anything is loaded
    check_temperature(temperature)
    if seed is not None:
        torch.manual_seed(whole(seed, "seed", 0, MAX_SEED))
    module = load_model(str(ckpt)).to(device).eval()
    views = load_views(expand_views(images), module, resize, fit)
    result = fuse(module, views, num_samples, temperature, decode)
    save_png(result.grid(), Path(out))
    if samples_dir is not None:
        save_png(result.mean, Path(samples_dir) / "mean.png")
        for i, sample in enumerate(result.samples):
            save_png(sample, Path(samples_dir) / f"sample_{i:03d}.png")
    return result


def main(argv: Sequence[str] | None = None) -> Path:
    parser = ArgumentParser(prog="python -m fusionvae.jobs.fuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", help="0..k_max input views: image files, or a scene folder of them")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (<run>/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="grid image file to write (e.g. grid.png)")
    parser.add_argument("--samples-dir", help="also write mean.png and sample_<i>.png to this folder")
    parser.add_argument(
        "--samples",
        type=arg_type(whole, "--samples", 0),
        default=8,
        help="number of fused samples (default 8; 0: the inputs and the mean image only)",
    )
    parser.add_argument(
        "--temperature",
        type=arg_type(check_temperature),
        default=1.0,
        help="prior temperature of the samples: a finite number >= 0 (default 1; 0: z = the prior means)",
    )
    parser.add_argument(
        "--decode",
        choices=("sample", "mean"),
        default="sample",
        help="sample: draw each image from p(y|z); mean: its mean image (default sample)",
    )
    parser.add_argument("--resize", action="store_true", help="resize inputs of another size to the model's size")
    parser.add_argument(
        "--fit",
        action="store_true",
        help="centre-crop and area-resize every input, as dataset=image_folder / multiview_folder store images",
    )
    parser.add_argument("--device", type=arg_type(check_device), default="cpu", help=f"{DEVICES} (default cpu)")
    parser.add_argument(
        "--seed", type=arg_type(whole, "--seed", 0, MAX_SEED), default=0, help="random seed (default 0)"
    )
    args = parser.parse_args(argv)
    try:
        fuse_files(
            args.ckpt,
            args.images,
            args.out,
            args.samples,
            args.temperature,
            args.resize,
            args.device,
            args.seed,
            args.decode,
            args.samples_dir,
            args.fit,
        )
    except (FileNotFoundError, ValueError, FusionVAEError) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {args.out}" + (f" and the samples in {args.samples_dir}" if args.samples_dir else ""))
    return Path(args.out)


def console_main() -> None:
    """The ``fusionvae-fuse`` console script (``main`` returns the path, which is no exit status)."""
    main()


if __name__ == "__main__":
    main()
