"""Loading a folder of images: ``ImageFolderDataModule`` (decoded once into a uint8 cache) against
torchvision's ``datasets.ImageFolder`` + ``DataLoader`` (decodes every image every epoch).

The folder is generated once under ``--scratch`` (default ``benchmarks/runs/loader/``, ignored by
git) and reused by later runs: ``--num-images`` RGB images of smooth random colour blobs in 10
class sub-folders, of mixed source sizes (40x48, 64x64, 48x40, 96x72) and formats (PNG, JPEG), so
that decoding and resizing cost what they cost on a real folder of small photos.

Measured, each as images/s of one full pass over the training split (batches of
``--batch-size``, shuffled, every batch's float tensor touched):
- data module, epoch 1: from constructing ``ImageFolderDataModule(root, image_size,
  cache_dir=...)`` (empty cache) through ``setup`` (listing, decoding, writing the cache) to the
  end of the first pass;
- data module, epoch 2: a second pass over the same data module (images already in memory);
- data module, fresh from the cache: a new data module reading the cache file, construction to
  the end of its first pass (what a second run of a config pays);
- torchvision, epochs 1 and 2: ``ImageFolder`` with Resize(image_size, bicubic) +
  CenterCrop(image_size) + ToTensor (RGB, as its loader converts), over the same number of
  images, for each of ``--workers`` (persistent workers: epoch 1 includes starting them, epoch 2
  does not). Bicubic, because the data module resizes with it; torchvision's default would be
  bilinear, which is slightly cheaper.
- ratio = data module epoch-2 images/s (0 workers: its batches are cut from memory) / torchvision
  epoch-2 images/s, against each ``--workers`` setting.

    python benchmarks/loader.py --num-images 5000 --image-size 32 --threads 1 --output benchmarks/results/loader.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from datamodules import ImageFolderDataModule

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from arguments import apply_threads, count, count_or_zero  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
SOURCE_SIZES = [(40, 48), (64, 64), (48, 40), (96, 72)]  # (width, height)
FORMATS = [".png", ".jpg"]
FOLDER_VERSION = 1  # bump when the generated images change, so that old folders are not reused


def blob_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A smooth RGB image: a random background plus three Gaussian blobs of random colours."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.broadcast_to(rng.uniform(0, 255, 3).astype(np.float32), (height, width, 3)).copy()
    for _ in range(3):
        centre = rng.uniform(0, 1, 2) * (width, height)
        radius = rng.uniform(0.1, 0.4) * min(width, height)
        weight = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * radius**2))[..., None]
        image = image * (1 - weight) + rng.uniform(0, 255, 3).astype(np.float32) * weight
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def make_folder(scratch: Path, num_images: int) -> Path:
    """The generated folder for ``num_images`` (written once; a ``.complete`` marker, written last,
    tells a later run that the folder is whole and can be reused)."""
    root = scratch / f"images_{num_images}_v{FOLDER_VERSION}"
    if (root / ".complete").is_file():
        return root
    if root.exists():
        shutil.rmtree(root)  # an interrupted write: start again
    rng = np.random.default_rng(0)
    for i in range(num_images):
        folder = root / f"class_{i % NUM_CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        suffix = FORMATS[i % len(FORMATS)]
        image = blob_image(rng, SOURCE_SIZES[(i // len(FORMATS)) % len(SOURCE_SIZES)])
        image.save(folder / f"{i:06d}{suffix}", **({"quality": 90} if suffix == ".jpg" else {}))
    (root / ".complete").write_text(f"{num_images} images\n")
    return root


def one_pass(loader) -> int:
    """Iterate over every batch, touching the float images (so lazy work is not left out);
    returns the number of images seen."""
    seen = 0
    for x, _ in loader:
        x.sum()
        seen += len(x)
    return seen


def time_data_module(root: Path, cache_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """images/s: epoch 1 (construction + setup + decode + cache write + pass), epoch 2, and a
    fresh data module reading the cache file (construction + setup + pass)."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    options = {"image_size": args.image_size, "batch_size": args.batch_size, "cache_dir": str(cache_dir)}
    start = time.perf_counter()
    data = ImageFolderDataModule(str(root), **options)
    data.setup("fit")
    seen = one_pass(data.train_dataloader())
    epoch_1 = seen / (time.perf_counter() - start)
    start = time.perf_counter()
    seen = one_pass(data.train_dataloader())
    epoch_2 = seen / (time.perf_counter() - start)
    if not any(cache_dir.glob("imagefolder-*.pt")):
        raise RuntimeError(f"no cache file was written in {cache_dir}: check that it is writable")
    start = time.perf_counter()
    fresh = ImageFolderDataModule(str(root), **options)
    fresh.setup("fit")
    seen = one_pass(fresh.train_dataloader())
    from_cache = seen / (time.perf_counter() - start)
    return {"train_images": len(data.train_set), "epoch_1": epoch_1, "epoch_2": epoch_2,
            "from_cache": from_cache}


def time_torchvision(root: Path, num_train: int, workers: int, args: argparse.Namespace) -> dict[str, float]:
    """images/s of torchvision's ImageFolder over ``num_train`` of the images, epochs 1 and 2."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize(args.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(args.image_size),
        transforms.ToTensor(),
    ])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:num_train]
    loader = DataLoader(Subset(dataset, chosen.tolist()), batch_size=args.batch_size, shuffle=True,
                        num_workers=workers, persistent_workers=workers > 0)
    rates = {}
    for epoch in ("epoch_1", "epoch_2"):
        start = time.perf_counter()
        seen = one_pass(loader)
        rates[epoch] = seen / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=count, default=5000)
    parser.add_argument("--image-size", type=count, default=32)
    parser.add_argument("--batch-size", type=count, default=128)
    parser.add_argument("--workers", type=count_or_zero, nargs="+", default=[0, 2],
                        help="torchvision DataLoader num_workers settings to measure")
    parser.add_argument("--threads", type=count_or_zero, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--scratch", type=Path, default=REPO / "benchmarks" / "runs" / "loader",
                        help="folder for the generated images and the cache")
    parser.add_argument("--output", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args()
    if args.num_images < 20:
        parser.error("--num-images must be >= 20 (10 classes, and val/test splits of 10% each)")
    apply_threads(args.threads)

    start = time.perf_counter()
    root = make_folder(args.scratch, args.num_images)
    print(f"image folder {root} ready in {time.perf_counter() - start:.1f} s", flush=True)
    load_start = os.getloadavg()[0]

    module = time_data_module(root, args.scratch / "cache", args)
    rows = [(f"| ImageFolderDataModule (uint8 cache) | 0 | {module['epoch_1']:.0f} | {module['epoch_2']:.0f} "
             f"| {module['from_cache']:.0f} |")]
    print(rows[-1], flush=True)
    torchvision_rates = {}
    for workers in args.workers:
        rates = time_torchvision(root, module["train_images"], workers, args)
        torchvision_rates[workers] = rates
        rows.append(f"| torchvision ImageFolder + DataLoader | {workers} | {rates['epoch_1']:.0f} "
                    f"| {rates['epoch_2']:.0f} | - |")
        print(rows[-1], flush=True)
    load_end = os.getloadavg()[0]

    ratios = [f"{module['epoch_2'] / rates['epoch_2']:.1f}x against {workers} worker(s)"
              for workers, rates in torchvision_rates.items()]
    cpus = os.cpu_count()
    hardware = f"{platform.machine()} CPU, {cpus} core(s), torch {torch.get_num_threads()} thread(s)"
    table = (f"\n{datetime.date.today()}, {hardware}, load average {load_start:.1f} at the start, "
             f"{load_end:.1f} at the end; {args.num_images} images ({module['train_images']} in the "
             f"training split), image_size {args.image_size}, batch {args.batch_size}\n\n"
             "| loader | num_workers | epoch 1 img/s | epoch 2 img/s | fresh module from cache img/s |\n"
             "|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
             f"epoch 2, data module / torchvision: {'; '.join(ratios)}\n")
    print(table)
    if args.output is not None:
        with open(args.output, "a") as stream:
            stream.write(table)


if __name__ == "__main__":
    main()
