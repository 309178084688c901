#!/usr/bin/env python
"""Writes a synthetic chromatic-aberration dataset as a `datasets` image folder.

Clean sources are procedurally drawn anime-like illustrations (flat cel-shaded fills, dark
outlines, gradients, hair-like strokes, text) and crops of the few real photos that installed
packages ship. Positives (label 1) add chromatic aberration: red/blue channel shifts, radial
(lateral) aberration, aberration on part of the image, with and without blur. Negatives (label 0)
are the clean images plus hard negatives taken from the original model's known weaknesses: HSV
noise, rough sketches of overlapping semi-transparent lines, JPEG/WebP artefacts, grayscale,
saturated complementary colour edges (red beside cyan) and screentone.

Layout (what `load_dataset("imagefolder", data_dir=OUT)` reads):
    OUT/{train,validation,test}/<label>_<effect>/<id>.png   e.g. train/1_shift/000123.png
    OUT/{train,validation,test}/metadata.csv                file_name, label, effect, strength, source, size
Folder names follow the original's convention: the number before the first underscore is the label.
Everything is deterministic from --seed. This script imports nothing else from the repo.
"""

import argparse
import csv
import io
import math
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

POSITIVES = ("shift", "radial", "partial")
NEGATIVES = ("clean", "hsv_noise", "sketch", "jpeg", "webp", "grayscale", "complementary", "halftone")
HARD_NEGATIVES = NEGATIVES[1:]
LONG_EDGES = (256, 512, 768, 1024, 1536, 2048)


def photo_sources():
    """Real photos shipped inside installed packages (scikit-learn, matplotlib, scikit-image)."""
    found = []
    for module, pattern in (("sklearn.datasets", "images/*.jpg"), ("matplotlib", "mpl-data/sample_data/*.jpg"),
                            ("skimage", "data/*.png")):
        try:
            package = __import__(module, fromlist=["__file__"])
        except ImportError:
            continue
        found += sorted(Path(package.__file__).parent.glob(pattern))
    return found


def random_color(rng, dark=False):
    hue, sat = rng.random(), rng.uniform(0.3, 1.0)
    val = rng.uniform(0.05, 0.3) if dark else rng.uniform(0.55, 1.0)
    rgb = Image.new("HSV", (1, 1), (int(hue * 255), int(sat * 255), int(val * 255))).convert("RGB")
    return rgb.getpixel((0, 0))


def gradient_background(rng, w, h):
    a, b = np.array(random_color(rng), np.float32), np.array(random_color(rng), np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (x * math.cos(angle) + y * math.sin(angle)) / (abs(w * math.cos(angle)) + abs(h * math.sin(angle)) + 1)
    t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    return Image.fromarray((a + (b - a) * t[..., None]).astype(np.uint8))


def blob(rng, cx, cy, r, points=9):
    angles = np.sort(rng.uniform(0, 2 * math.pi, points))
    radii = r * rng.uniform(0.6, 1.0, points)
    return [(cx + rr * math.cos(a), cy + rr * math.sin(a)) for a, rr in zip(angles, radii)]


def draw_illustration(rng, w, h):
    """Flat fills with dark outlines, cel shadows, hair-like strokes, highlights and text."""
    image = gradient_background(rng, w, h)
    draw = ImageDraw.Draw(image)
    scale = max(w, h) / 512
    outline = random_color(rng, dark=True)
    line = max(1, int(rng.uniform(1.5, 4) * scale))
    for _ in range(rng.integers(3, 9)):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.08, 0.35) * min(w, h)
        fill = random_color(rng)
        shape = blob(rng, cx, cy, r, int(rng.integers(5, 12)))
        draw.polygon(shape, fill=fill, outline=outline, width=line)
        shade = tuple(int(c * 0.72) for c in fill)  # cel shading: a darker flat band inside the shape
        draw.polygon(blob(rng, cx + r * 0.25, cy + r * 0.25, r * 0.5, 6), fill=shade)
    for _ in range(rng.integers(4, 20)):  # hair-like strokes: smooth curves, thick to thin
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        angle, colour = rng.uniform(0, 2 * math.pi), random_color(rng, dark=rng.random() < 0.5)
        width = max(1, int(rng.uniform(1, 8) * scale))
        for step in range(int(rng.integers(8, 30))):
            angle += rng.normal(0, 0.15)
            nx, ny = x + math.cos(angle) * 12 * scale, y + math.sin(angle) * 12 * scale
            draw.line([(x, y), (nx, ny)], fill=colour, width=max(1, width - step // 6))
            x, y = nx, ny
    for _ in range(rng.integers(0, 6)):  # specular highlights
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(2, 12) * scale
        draw.ellipse([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=(255, 255, 255))
    if rng.random() < 0.5:
        font = ImageFont.load_default(size=max(10, int(rng.uniform(14, 48) * scale)))
        text = "".join(rng.choice(list("ABCDEFGHKMNPRSTWXYZ!?")) for _ in range(rng.integers(3, 10)))
        draw.text((rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.9)), text, fill=random_color(rng, dark=True),
                  font=font)
    return image


def crop_photo(rng, path, w, h):
    photo = Image.open(path).convert("RGB")
    zoom = max(w / photo.width, h / photo.height) * rng.uniform(1.0, 1.6)
    photo = photo.resize((max(w, round(photo.width * zoom)), max(h, round(photo.height * zoom))), Image.BICUBIC)
    x, y = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
    return photo.crop((int(x), int(y), int(x) + w, int(y) + h))


def transform_channel(channel, coeffs, pad):
    """PIL affine transform (output x, y -> input a*x + b*y + c, d*x + e*y + f) with edges replicated,
    so that no coloured border gives the effect away."""
    a, b, c, d, e, f = coeffs
    padded = Image.fromarray(np.pad(np.asarray(channel), pad, mode="edge"))
    coeffs = (a, b, c + pad - (a + b) * pad, d, e, f + pad - (d + e) * pad)
    moved = padded.transform(padded.size, Image.AFFINE, coeffs, Image.BICUBIC)
    return moved.crop((pad, pad, pad + channel.width, pad + channel.height))


def shift_channel(channel, dx, dy):
    """Moves a channel by a sub-pixel offset."""
    return transform_channel(channel, (1, 0, -dx, 0, 1, -dy), int(math.ceil(max(abs(dx), abs(dy)))) + 2)


def channel_shift(image, rng, strength):
    """Red moves one way, blue the other, by `strength` px each, in a random direction."""
    angle = rng.uniform(0, 2 * math.pi)
    dx, dy = strength * math.cos(angle), strength * math.sin(angle)
    r, g, b = image.split()
    return Image.merge("RGB", (shift_channel(r, dx, dy), g, shift_channel(b, -dx, -dy)))


def radial_aberration(image, rng, strength):
    """Lateral aberration: R and B magnified differently about the centre; `strength` px at the corners."""
    w, h = image.size
    k = strength / math.hypot(w / 2, h / 2)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h

    def scaled(channel, s):  # output (x, y) samples input (cx + (x - cx) / s, ...)
        return transform_channel(channel, (1 / s, 0, cx - cx / s, 0, 1 / s, cy - cy / s), int(strength * 1.3) + 2)

    r, g, b = image.split()
    return Image.merge("RGB", (scaled(r, 1 + k), g, scaled(b, 1 - k)))


def soft_mask(rng, w, h):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    rx, ry = rng.uniform(0.2, 0.5) * w, rng.uniform(0.2, 0.5) * h
    d = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    inside = np.clip((1.3 - d) / 0.6, 0, 1)
    return inside if rng.random() < 0.5 else 1 - inside  # the subject, or the background around it


def hsv_noise(image, rng):
    hsv = np.asarray(image.convert("HSV")).astype(np.int16)
    hsv[..., 0] += rng.integers(-40, 41, hsv.shape[:2], dtype=np.int16)
    hsv[..., 1] += rng.integers(-90, 91, hsv.shape[:2], dtype=np.int16)
    hsv[..., 2] += rng.integers(-50, 51, hsv.shape[:2], dtype=np.int16)
    hsv[..., 0] %= 256
    return Image.fromarray(np.clip(hsv, 0, 255).astype(np.uint8), "HSV").convert("RGB")


def rough_sketch(rng, w, h):
    """Many semi-transparent overlapping pencil lines on paper, sometimes in colour."""
    paper = Image.new("RGBA", (w, h), tuple(int(v) for v in rng.integers(225, 256, 3)) + (255,))
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    scale = max(w, h) / 512
    colours = [(40, 40, 40), (200, 60, 60), (60, 90, 200), (60, 160, 60)]
    for _ in range(int(rng.integers(30, 120))):
        colour = colours[0] if rng.random() < 0.7 else colours[int(rng.integers(1, 4))]
        x, y, angle = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, 2 * math.pi)
        points = []
        for _ in range(int(rng.integers(3, 10))):
            angle += rng.normal(0, 0.3)
            x, y = x + math.cos(angle) * 20 * scale, y + math.sin(angle) * 20 * scale
            points.append((x, y))
        draw.line(points, fill=colour + (int(rng.integers(40, 140)),), width=max(1, int(rng.uniform(1, 3) * scale)))
    return Image.alpha_composite(paper, layer).convert("RGB")


def complementary_edges(rng, w, h):
    """Saturated red beside cyan (and blue beside yellow) bands: real edges that look like fringes."""
    image = gradient_background(rng, w, h)
    draw = ImageDraw.Draw(image)
    pairs = [((255, 0, 0), (0, 255, 255)), ((0, 0, 255), (255, 255, 0)), ((255, 0, 255), (0, 255, 0))]
    for _ in range(int(rng.integers(3, 10))):
        a, b = pairs[int(rng.integers(0, 3))]
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        length, width = rng.uniform(0.2, 0.8) * max(w, h), max(2, int(rng.uniform(2, 10) * max(w, h) / 512))
        angle = rng.uniform(0, math.pi)
        dx, dy = math.cos(angle) * length, math.sin(angle) * length
        nx, ny = -math.sin(angle) * width, math.cos(angle) * width
        draw.line([(x, y), (x + dx, y + dy)], fill=a, width=width)
        draw.line([(x + nx, y + ny), (x + dx + nx, y + dy + ny)], fill=b, width=width)
    return image


def halftone(image, rng):
    """Screentone: the luminance as a dot screen, optionally tinted."""
    w, h = image.size
    period = int(rng.integers(4, 10))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = math.radians(rng.choice([0, 15, 45]))
    u, v = x * math.cos(angle) + y * math.sin(angle), -x * math.sin(angle) + y * math.cos(angle)
    dist = np.hypot((u % period) - period / 2, (v % period) - period / 2) / (period / 2)
    lum = np.asarray(image.convert("L"), np.float32) / 255
    dots = (dist > (1 - lum) * 1.2).astype(np.float32)
    ink = np.array(random_color(rng, dark=True), np.float32)
    return Image.fromarray((ink + (255 - ink) * dots[..., None]).astype(np.uint8))


def recompress(image, rng, fmt):
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=int(rng.integers(5, 40)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def make_example(seed, effect, photos):
    """One (image, strength, source) for an effect, fully determined by `seed`."""
    rng = np.random.default_rng(seed)
    long = int(rng.choice(LONG_EDGES))
    short = max(128, int(long * rng.uniform(0.5, 1.0)))
    w, h = (long, short) if rng.random() < 0.6 else (short, long)
    photo = photos[int(rng.integers(0, len(photos)))] if photos and rng.random() < 0.15 else None
    source = f"photo:{photo.name}" if photo else "drawn"
    strength = 0.0
    if effect == "sketch":
        return rough_sketch(rng, w, h), strength, "sketch"
    if effect == "complementary":
        return complementary_edges(rng, w, h), strength, "drawn"
    image = crop_photo(rng, photo, w, h) if photo else draw_illustration(rng, w, h)
    if effect in POSITIVES:
        strength = float(rng.choice([1, 1.5, 2, 3, 4, 5, 6, 8]))
        if effect == "radial":
            shifted = radial_aberration(image, rng, strength)
        else:
            shifted = channel_shift(image, rng, strength)
        if rng.random() < 0.3:  # soft, bleeding fringes
            shifted = shifted.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
        if effect == "partial":
            mask = Image.fromarray((soft_mask(rng, w, h) * 255).astype(np.uint8))
            shifted = Image.composite(shifted, image, mask)
        image = shifted
    elif effect == "hsv_noise":
        image = hsv_noise(image, rng)
    elif effect in ("jpeg", "webp"):
        image = recompress(image, rng, effect.upper())
    elif effect == "grayscale":
        image = image.convert("L").convert("RGB")
    elif effect == "halftone":
        image = halftone(image, rng)
    return image, strength, source


def write_one(job):
    seed, effect, path, photos = job
    image, strength, source = make_example(seed, effect, photos)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, compress_level=1)
    return path, effect, strength, source, max(image.size)


def plan(split, count, seed, positive_fraction, hard_negatives=HARD_NEGATIVES):
    """(seed, effect) pairs: 40% of the negatives clean, the rest spread over the hard kinds."""
    rng = np.random.default_rng([seed, {"train": 0, "validation": 1, "test": 2}[split]])
    jobs = []
    for _ in range(count):
        if rng.random() < positive_fraction:
            effect = POSITIVES[int(rng.integers(0, len(POSITIVES)))]
        elif rng.random() < 0.4:
            effect = "clean"
        else:
            effect = hard_negatives[int(rng.integers(0, len(hard_negatives)))]
        jobs.append((int(rng.integers(0, 2**63)), effect))
    return jobs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    parser.add_argument("--train", type=int, default=6000, help="train images (default: 6000)")
    parser.add_argument("--validation", type=int, default=600, help="validation images (default: 600)")
    parser.add_argument("--test", type=int, default=2000, help="test images (default: 2000)")
    parser.add_argument("--positive-fraction", type=float, default=0.4, help="share of label-1 images (default: 0.4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same dataset (default: 0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    parser.add_argument("--no-photos", action="store_true", help="only drawn images, no packaged photos")
    parser.add_argument(
        "--hard-negatives", type=hard_negative_kinds, default=HARD_NEGATIVES,
        help="comma-separated hard-negative kinds to draw from, e.g. jpeg,webp to mine a model's false "
             f"positives (default: all of {', '.join(HARD_NEGATIVES)})")
    return parser.parse_args(argv)


def hard_negative_kinds(text):
    """--hard-negatives "jpeg, webp" -> ("jpeg", "webp"); unknown kinds are a usage error."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(HARD_NEGATIVES))
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown kind(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(HARD_NEGATIVES)}")
    return kinds


def main(argv=None):
    args = parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out}: output folder exists and is not empty", file=sys.stderr)
        return 2
    photos = [] if args.no_photos else photo_sources()
    from tqdm import tqdm

    with Pool(args.workers) as pool:
        for split in ("train", "validation", "test"):
            count = getattr(args, split)
            if count <= 0:
                continue
            folder = args.out / split
            jobs = []
            planned = plan(split, count, args.seed, args.positive_fraction, args.hard_negatives)
            for i, (seed, effect) in enumerate(planned):
                label = 1 if effect in POSITIVES else 0
                jobs.append((seed, effect, folder / f"{label}_{effect}" / f"{i:06d}.png", photos))
            rows = list(tqdm(pool.imap(write_one, jobs, chunksize=4), total=len(jobs), desc=split, unit="img"))
            with open(folder / "metadata.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["file_name", "label", "effect", "strength", "source", "size"])
                for path, effect, strength, source, size in rows:
                    label = int(effect in POSITIVES)
                    writer.writerow([path.relative_to(folder).as_posix(), label, effect, strength, source, size])
    print(f"wrote {args.out} ({len(photos)} packaged photos used as sources)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
