#!/usr/bin/env python
"""Writes a synthetic chromatic-aberration dataset as a `datasets` image folder.

Clean sources are procedurally drawn anime-like illustrations (flat cel-shaded fills, dark
outlines, gradients, hair-like strokes, text) and crops of the few real photos that installed
packages ship; with --real-pictures, also the pictures of the Debian packages that
../shared/TRAINING_SOURCES.md allows (photos, painted portraits, clip art, pixel art, 3D renders,
cartoons: `--install` installs missing ones with apt-get), at their native resolution or scaled
down, transparent ones composited on varied backgrounds. Each real picture belongs to one split
for good, chosen by its source group (a wallpaper's folder, a stamp's or sprite's directory), so a
test split never holds a crop, a resolution or a sibling of a training picture.

Positives (label 1) add chromatic aberration: red/blue channel shifts, radial (lateral) aberration,
aberration on part of the image, with and without blur. Negatives (label 0) are the clean images
plus hard negatives taken from the original model's known weaknesses: HSV noise, rough sketches of
overlapping semi-transparent lines, JPEG/WebP artefacts, grayscale, saturated complementary colour
edges (red beside cyan) and screentone.

With --delivered, a share of the finished images (positives included) is saved once more the way
pictures travel, as a JPEG of quality 70-95 or a WebP of quality 75-95, and stored as the decoded
result: so that compression is not a sign of a clean picture, and fringes are learnt as they look
after chroma subsampling.

Layout (what `load_dataset("imagefolder", data_dir=OUT)` reads):
    OUT/{train,validation,test}/<label>_<effect>/<id>.png   e.g. train/1_shift/000123.png
    OUT/{train,validation,test}/metadata.csv                file_name, label, effect, strength, source, size,
                                                            family, width, height (, delivery)
Folder names follow the original's convention: the number before the first underscore is the label.
Everything is deterministic from --seed (and, with --real-pictures, the installed packages' files).
This script imports nothing else from the repo.
"""

import argparse
import csv
import hashlib
import io
import math
import os
import re
import subprocess
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from citytools.toolkit import fraction, non_negative_int, positive_int

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


# (Debian package, regular expression on the file's path, picture family): the first match wins and
# files that match none are left out (icons, UI parts, fonts, sprite sheets, masks).
FAMILIES = ("drawn", "photo", "painted", "clip art", "pixel art", "3D render", "sketch")
DEBIAN_RULES = (
    ("plasma-workspace-wallpapers", r"/wallpapers/(BytheWater|ColdRipple|ColorfulCups|DarkestHour|EveningGlow|"
     r"FallenLeaf|Grey|Kite|MilkyWay|OneStandsOut|Path|Volna|summer_1am)/contents/images/", "photo"),
    ("plasma-workspace-wallpapers", r"/wallpapers/(Canopee|Cascade|Cluster|Flow|Elarun|Opal|Shell|IceCold|"
     r"PastelHills|Kokkini|Patak)/contents/images/", "3D render"),
    ("plasma-workspace-wallpapers", r"/wallpapers/Autumn/contents/images/", "painted"),
    ("plasma-workspace-wallpapers", r"/wallpapers/(Altai|FlyingKonqui|Honeywave|Kay|SafeLanding)/contents/images/",
     "drawn"),
    ("tuxpaint-stamps-default", r"/cartoon/|/symbols/|/alphabets/", "clip art"),
    ("tuxpaint-stamps-default", r"/stamps/", "photo"),
    ("naev-data", r"/portraits/|/gfx/planet/exterior/|/gfx/loading/|/gfx/bkg/", "painted"),
    ("naev-data", r"/gfx/ship/|/gfx/outfit/|/gfx/commodity/|/gfx/planet/space/", "3D render"),
    ("hedgewars-data", r"/Themes/|/Forts/|/Missions/", "drawn"),
    ("desktop-base", r"/emblems/|/debian-logos/", "clip art"),
    ("desktop-base", r"/(plymouth|desktop-base)/", "drawn"),
    ("neverball-data", r"/shot-", "3D render"),
    ("freeciv-data", r"/freeciv/(amplio2|hexemplio|trident|isotrident|hex2t|isophex|alio|cimpletoon)/", "pixel art"),
    ("pingus-data", r"/groundpieces/|/images/(traps|special|entrances|hotspots)/", "pixel art"),
    ("pingus-data", r"/images/(textures|story)/", "drawn"),
)
MIN_PICTURE_SIDE = 128  # smaller files are icons and sprites
SPLIT_INDEX = {"train": 0, "validation": 1, "test": 2}  # in every random stream's seed


def picture_group(path):
    """What a picture's split is decided by: a wallpaper's folder (all its resolutions), else the
    file's directory (a ship's renders, a theme's pieces, a stamp category)."""
    parts = Path(path).parts
    if "wallpapers" in parts:
        return "/".join(parts[: parts.index("wallpapers") + 2])
    return str(Path(path).parent)


def package_files(package, install=False):
    """The files of a Debian package (installed with apt-get first when `install`), or None."""
    listed = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    if listed.returncode != 0 and install:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", package], check=False,
                       stdout=subprocess.DEVNULL)
        listed = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    return listed.stdout.splitlines() if listed.returncode == 0 else None


def real_pictures(install=False):
    """[(path, family, group)] of the allowed Debian packages' pictures, plus the packaged photos."""
    found, missing = [], []
    for package in dict.fromkeys(rule[0] for rule in DEBIAN_RULES):
        files = package_files(package, install)
        if files is None:
            missing.append(package)
            continue
        rules = [(re.compile(pattern), family) for name, pattern, family in DEBIAN_RULES if name == package]
        for path in sorted(f for f in files if f.lower().endswith((".png", ".jpg", ".jpeg"))):
            family = next((family for pattern, family in rules if pattern.search(path)), None)
            if family and usable_picture(path):
                found.append((path, family, picture_group(path)))
    found += [(str(path), "photo", str(path)) for path in photo_sources()]
    if missing:
        print(f"warning: Debian package(s) not installed, their pictures left out: {', '.join(missing)} "
              "(--install installs them)", file=sys.stderr)
    return found


def has_alpha(image):
    """Whether a PIL image has transparency (an alpha channel or a transparent palette entry)."""
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def usable_picture(path):
    """At least MIN_PICTURE_SIDE on both sides, and not mostly transparent."""
    try:
        with Image.open(path) as image:
            if min(image.size) < MIN_PICTURE_SIDE:
                return False
            if has_alpha(image):
                alpha = np.asarray(image.convert("RGBA").getchannel("A"))
                return (alpha > 128).mean() > 0.2
            return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def split_pictures(pictures):
    """{split: {family: [(path, group)]}}: per family, the groups sorted by a hash of their name,
    every tenth at ranks 2 and 7 to test, at rank 5 to validation, the rest to train. Fixed: it
    depends on the files only, never on --seed."""
    by_family = {}
    for path, family, group in pictures:
        by_family.setdefault(family, {}).setdefault(group, []).append(path)
    splits = {"train": {}, "validation": {}, "test": {}}
    for family, groups in sorted(by_family.items()):
        ranked = sorted(groups, key=lambda g: hashlib.sha1(g.encode()).hexdigest())
        for rank, group in enumerate(ranked):
            split = "test" if rank % 10 in (2, 7) else "validation" if rank % 10 == 5 else "train"
            splits[split].setdefault(family, []).extend((path, group) for path in sorted(groups[group]))
    return splits


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


def load_picture(rng, path, backgrounds):
    """A real picture as RGB, at its native size or scaled down (to 35-100%, never under
    MIN_PICTURE_SIDE); a transparent one on a flat colour, a gradient, a drawn illustration or
    another picture of `backgrounds`, as a user's image would look."""
    with Image.open(path) as image:
        image.load()
        transparent = has_alpha(image)
        image = image.convert("RGBA") if transparent else image.convert("RGB")
    if rng.random() < 0.5:
        factor = max(rng.uniform(0.35, 1.0), MIN_PICTURE_SIDE / min(image.size))
        if factor < 1:
            image = image.resize((round(image.width * factor), round(image.height * factor)), Image.LANCZOS)
    if transparent:
        w, h = image.size
        kind = int(rng.integers(0, 4)) if backgrounds else int(rng.integers(0, 3))
        if kind == 0:
            background = Image.new("RGB", (w, h), random_color(rng))
        elif kind == 1:
            background = gradient_background(rng, w, h)
        elif kind == 2:
            background = draw_illustration(rng, w, h)
        else:
            background = crop_photo(rng, backgrounds[int(rng.integers(0, len(backgrounds)))], w, h)
        background.paste(image, mask=image.getchannel("A"))
        image = background
    return image


def make_example(seed, effect, photos, picture=None, backgrounds=()):
    """One (image, strength, source) for an effect, fully determined by `seed`: a drawn
    illustration, a packaged photo's crop, or `picture` (a real picture's path) when given."""
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
    if picture is not None:
        image, source = load_picture(rng, picture, backgrounds), str(picture)
        w, h = image.size
    else:
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


def deliver(image, seed, effect, fraction):
    """(image, how it was delivered): with probability `fraction`, `image` saved as a JPEG (quality
    70-95, 4:2:0 chroma subsampling in 70% of them, else 4:4:4) or, one time in four, a WebP (quality
    75-95) and decoded again; "none" otherwise and for the JPEG/WebP hard negatives, which are
    compressed already. Drawn from its own stream, so that a dataset made without it is unchanged."""
    rng = np.random.default_rng([seed, 13])
    if effect in ("jpeg", "webp") or rng.random() >= fraction:
        return image, "none"
    buffer = io.BytesIO()
    if rng.random() < 0.25:
        image.save(buffer, "WEBP", quality=int(rng.integers(75, 96)))
        kind = "webp"
    else:
        subsampling = 2 if rng.random() < 0.7 else 0
        image.save(buffer, "JPEG", quality=int(rng.integers(70, 96)), subsampling=subsampling)
        kind = "jpeg 4:2:0" if subsampling == 2 else "jpeg 4:4:4"
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), kind


def write_one(job):
    seed, effect, path, photos, picture, family, backgrounds, delivered = job
    image, strength, source = make_example(seed, effect, photos, picture, backgrounds)
    delivery = None
    if delivered > 0:
        image, delivery = deliver(image, seed, effect, delivered)
    if family is None:
        family = "sketch" if effect == "sketch" else "photo" if source.startswith("photo:") else "drawn"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, compress_level=1)
    return path, effect, strength, source, max(image.size), family, image.width, image.height, delivery


def pick_pictures(planned, split, seed, pictures, real_fraction):
    """Per planned (seed, effect): (picture path, family) or (None, None) for a generated image. A
    real picture is taken with probability `real_fraction` (never for sketches and red/cyan edges,
    which are drawn): first a family, uniformly, then one of its pictures in this split."""
    rng = np.random.default_rng([seed, SPLIT_INDEX[split], 7])
    families = sorted(pictures)
    chosen = []
    for _, effect in planned:
        if families and effect not in ("sketch", "complementary") and rng.random() < real_fraction:
            family = families[int(rng.integers(0, len(families)))]
            path, _ = pictures[family][int(rng.integers(0, len(pictures[family])))]
            chosen.append((path, family))
        else:
            chosen.append((None, None))
    return chosen


def plan(split, count, seed, positive_fraction, hard_negatives=HARD_NEGATIVES):
    """(seed, effect) pairs: 40% of the negatives clean, the rest spread over the hard kinds."""
    rng = np.random.default_rng([seed, SPLIT_INDEX[split]])
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
    parser.add_argument("--train", type=non_negative_int, default=6000, help="train images (default: 6000)")
    parser.add_argument("--validation", type=non_negative_int, default=600, help="validation images (default: 600)")
    parser.add_argument("--test", type=non_negative_int, default=2000, help="test images (default: 2000)")
    parser.add_argument("--positive-fraction", type=fraction, default=0.4,
                        help="share of label-1 images (default: 0.4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same dataset (default: 0)")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count(), help="processes (default: all cores)")
    parser.add_argument("--no-photos", action="store_true", help="only drawn images, no packaged photos")
    parser.add_argument("--real-pictures", type=fraction, default=0.0, metavar="FRACTION",
                        help="share of images made from the allowed Debian packages' pictures and the packaged "
                             "photos, at native resolution or scaled down, each picture in one split for good "
                             "(default: 0, only generated images and crops of the packaged photos)")
    parser.add_argument("--install", action="store_true",
                        help="with --real-pictures, apt-get install the Debian packages that are missing")
    parser.add_argument(
        "--hard-negatives", type=hard_negative_kinds, default=HARD_NEGATIVES,
        help="comma-separated hard-negative kinds to draw from, e.g. jpeg,webp to mine a model's false "
             f"positives (default: all of {', '.join(HARD_NEGATIVES)})")
    parser.add_argument("--delivered", type=fraction, default=0.0, metavar="FRACTION",
                        help="share of the images, positives included, saved once more as a JPEG (quality 70-95) "
                             "or WebP (75-95) the way pictures are shared, and stored decoded; a `delivery` "
                             "column says how (default: 0, every image stored losslessly as made)")
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
    if args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out}: is a file, not a folder", file=sys.stderr)
        return 2
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out}: output folder exists and is not empty", file=sys.stderr)
        return 2
    pictures = split_pictures(real_pictures(args.install)) if args.real_pictures > 0 else None
    # With real pictures, the packaged photos are real pictures too, each in one split only.
    photos = [] if args.no_photos or pictures is not None else photo_sources()
    if pictures is not None and not pictures["train"]:
        print("error: --real-pictures: no pictures found (install the packages, or pass --install)", file=sys.stderr)
        return 2
    from tqdm import tqdm

    with Pool(args.workers) as pool:
        for split in ("train", "validation", "test"):
            count = getattr(args, split)
            if count <= 0:
                continue
            folder = args.out / split
            jobs = []
            planned = plan(split, count, args.seed, args.positive_fraction, args.hard_negatives)
            chosen = (pick_pictures(planned, split, args.seed, pictures[split], args.real_pictures) if pictures
                      else [(None, None)] * len(planned))
            backgrounds = [path for family in (pictures or {}).get(split, {}).values() for path, _ in family]
            pick = np.random.default_rng([args.seed, 0, 11])  # backgrounds: the same stream in every split
            for i, ((seed, effect), (picture, family)) in enumerate(zip(planned, chosen)):
                label = 1 if effect in POSITIVES else 0
                path = folder / f"{label}_{effect}" / f"{i:06d}.png"
                others = [backgrounds[int(k)] for k in pick.integers(0, len(backgrounds), 4)] if picture else ()
                jobs.append((seed, effect, path, photos, picture, family, others, args.delivered))
            rows = list(tqdm(pool.imap(write_one, jobs, chunksize=4), total=len(jobs), desc=split, unit="img"))
            with open(folder / "metadata.csv", "w", newline="") as f:
                writer = csv.writer(f)
                delivery_column = ["delivery"] if args.delivered > 0 else []
                writer.writerow(["file_name", "label", "effect", "strength", "source", "size", "family", "width",
                                 "height", *delivery_column])
                for path, effect, strength, source, size, family, width, height, delivery in rows:
                    label = int(effect in POSITIVES)
                    writer.writerow([path.relative_to(folder).as_posix(), label, effect, strength, source, size,
                                     family, width, height, *([delivery] if delivery_column else [])])
    real = sum(len(v) for split in (pictures or {}).values() for v in split.values())
    print(f"wrote {args.out} ({len(photos)} packaged photos used as sources"
          + (f", {real} real pictures" if pictures else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
