#!/usr/bin/env python
"""A benchmark split of large pictures (issue #27 item 6: fringes found on 4 MP and more with the
default settings): drawn illustrations of 4096 x 3072 px, and crops of the large wallpapers of the
generator's *test* split (never trained on), half of each with a 1-5 px fringe of one of four
geometries (red and blue apart, one channel, green against magenta, radial). Writes DIR/test with
the metadata.csv benchmark.py reads (effect, strength, family, width, height); then, for example:

  python bench/large_pictures.py --out data/large --count 40
  python benchmark.py --model . runs/default_model_stage6 --dataset data/large --split test \\
      --passes tiling --out bench/stage6-large
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from citytools.aberrations import channel_shift, green_shift, one_channel_shift, radial_aberration  # noqa: E402
from citytools.drawing import draw_illustration  # noqa: E402
from citytools.pictures import real_pictures, split_pictures  # noqa: E402

EFFECTS = {"shift": channel_shift, "one_channel": one_channel_shift, "green": green_shift,
           "radial": radial_aberration}
SIZE = (4096, 3072)


def large_test_pictures(min_side=2500):
    """(path, family) of the generator's test-split pictures with a long side of `min_side` px or more."""
    found = []
    for family, entries in split_pictures(real_pictures(more_sources=True))["test"].items():
        for path, _ in entries:
            with Image.open(path) as image:
                if max(image.size) >= min_side:
                    found.append((path, family))
    return found


def picture(rng, sources, i):
    """(image, family): even i a drawn illustration, odd i a random crop (at least 4 MP) of a large
    test picture, flipped at random."""
    if i % 2 == 0 or not sources:
        return draw_illustration(rng, *SIZE), "drawn 4096x3072"
    path, family = sources[int(rng.integers(0, len(sources)))]
    image = Image.open(path).convert("RGB")
    width = int(min(image.width, max(2560, image.width * rng.uniform(0.8, 1.0))))
    height = int(min(image.height, max(1600, image.height * rng.uniform(0.8, 1.0))))
    left, top = int(rng.integers(0, image.width - width + 1)), int(rng.integers(0, image.height - height + 1))
    image = image.crop((left, top, left + width, top + height))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image, f"{family} wallpaper"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write (DIR/test)")
    parser.add_argument("--count", type=int, default=40, help="pictures (default: 40, half aberrated)")
    parser.add_argument("--seed", type=int, default=27)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    sources = large_test_pictures()
    split = args.out / "test"
    rows = ["file_name,effect,strength,family,width,height"]
    for i in range(args.count):
        image, family = picture(rng, sources, i)
        effect, strength = "clean", 0.0
        if (i // 2) % 2:
            effect = list(EFFECTS)[(i // 4) % len(EFFECTS)]
            strength = float(rng.choice([1, 1.5, 2, 3, 4, 5]))
            image = EFFECTS[effect](image, rng, strength)
        folder = f"{int(effect != 'clean')}_{'aberration' if effect != 'clean' else 'pass'}"
        (split / folder).mkdir(parents=True, exist_ok=True)
        name = f"{folder}/{i:03d}.png"
        image.save(split / name, compress_level=1)
        rows.append(f"{name},{effect},{strength},{family},{image.width},{image.height}")
        print(f"{name}: {family}, {effect} {strength} px, {image.width}x{image.height}", file=sys.stderr)
    (split / "metadata.csv").write_text("\n".join(rows) + "\n")
    print(f"wrote {args.count} pictures to {split}", file=sys.stderr)


if __name__ == "__main__":
    main()
