"""Writes a synthetic chromatic-aberration dataset as a `datasets` image folder.

Clean sources are procedurally drawn anime-like illustrations (flat cel-shaded fills, dark
outlines, gradients, hair-like strokes, text) and crops of the few real photos that installed
packages ship; with --real-pictures, also the pictures of the Debian packages that
../shared/TRAINING_SOURCES.md allows (photos, painted portraits, clip art, pixel art, 3D renders,
cartoons: `--install` installs missing ones with apt-get; without them it refuses, as the pictures
would not be the recipe's), at their native resolution or scaled
down, transparent ones composited on varied backgrounds. Each real picture belongs to one split
for good, chosen by its source group (a wallpaper's folder, a stamp's or sprite's directory), so a
test split never holds a crop, a resolution or a sibling of a training picture.

Positives (label 1) add chromatic aberration: red/blue channel shifts, radial (lateral) aberration,
aberration on part of the image, with and without blur; with --more-geometries also one channel
moved alone and green moved against red and blue. Negatives (label 0) are the clean images
plus hard negatives taken from the original model's known weaknesses: HSV noise, rough sketches of
overlapping semi-transparent lines, JPEG/WebP artefacts, grayscale, saturated complementary colour
edges (red beside cyan) and screentone.

With --delivered, a share of the finished images (positives included) is saved once more the way
pictures travel, as a JPEG of quality 70-95 (--jpeg-quality lowers it) or a WebP of quality 75-95,
and stored as the decoded result: so that compression is not a sign of a clean picture, and fringes
are learnt as they look after chroma subsampling. With --resized, a share is shrunk first, clean and
aberrated alike (aberrated, then halved). With --blurred-negatives, a share of the negatives is
blurred as 30% of the positives' fringes are, so that softness is no sign of aberration; with
--upscaled, a share of the finished images is enlarged, clean and aberrated alike. --line-art adds
hard negatives of coloured line art (outlines in a shade of their fill, one-sided rim light),
--outlined of bright outlines (shapes edged on both sides with a thin saturated line);
--family-weights draws some picture families more often than others; --pixel-scaled shows a share
of the pixel art enlarged 2-4x by nearest neighbour, as games do. Each option draws from its own
random stream: a seed without it makes the dataset it always made.

Every positive shows its fringe: one whose aberration changed (almost) no pixel, on a blank picture
or over flat colour, is drawn again (`make_example`); --keep-invisible keeps it, as older datasets
did.

Layout (what `load_dataset("imagefolder", data_dir=OUT)` reads):
    OUT/{train,validation,test}/<label>_<effect>/<id>.png   e.g. train/1_shift/000123.png
    OUT/{train,validation,test}/metadata.csv                file_name, label, effect, strength, source, size,
                                                            family, width, height (, delivery, resized,
                                                            negative_blur, upscaled, pixel_scale)
Folder names follow the original's convention: the number before the first underscore is the label.
Everything is deterministic from --seed (and, with --real-pictures, the installed packages' files).
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
from PIL import Image, ImageFilter

from citytools.aberrations import channel_shift, green_shift, one_channel_shift, radial_aberration
from citytools.drawing import (
    coloured_line_art,
    complementary_edges,
    crop_photo,
    draw_illustration,
    halftone,
    hsv_noise,
    load_picture,
    outlined_shapes,
    recompress,
    rough_sketch,
    soft_mask,
)
from citytools.pictures import DEBIAN_RULES, MORE_RULES, MissingPackages, photo_sources, real_pictures, split_pictures
from citytools.toolkit import fraction, non_negative_int, positive_int

POSITIVES = ("shift", "radial", "partial")
MORE_GEOMETRIES = ("one_channel", "green")  # --more-geometries: drawn only then (older seeds stay as they were)
LABEL_1 = POSITIVES + MORE_GEOMETRIES
NEGATIVES = ("clean", "hsv_noise", "sketch", "jpeg", "webp", "grayscale", "complementary", "halftone")
HARD_NEGATIVES = NEGATIVES[1:]
MORE_NEGATIVES = ("lineart", "outlined")  # --line-art, --outlined: drawn only then (older seeds stay as they were)
DRAWN_ONLY = ("sketch", "complementary", "lineart", "outlined")  # effects that draw their own image, no real picture
LONG_EDGES = (256, 512, 768, 1024, 1536, 2048)
SPLIT_INDEX = {"train": 0, "validation": 1, "test": 2}  # in every random stream's seed
REAL_FAMILIES = tuple(dict.fromkeys(family for _, _, family in DEBIAN_RULES + MORE_RULES))  # --family-weights'


BLUR_RADIUS = (0.5, 1.5)  # px: 30% of the positives' fringes bleed; --blurred-negatives blurs negatives alike
VISIBLE_LEVEL = 16  # a fringe pixel moves some channel by more than this (of 255) ...
VISIBLE_PIXELS = 32  # ... and a positive has at least this many of them
VISIBLE_ATTEMPTS = 4  # draws of the same picture (other crops, strengths) before a drawn illustration


def make_example(seed, effect, photos, picture=None, backgrounds=(), keep_invisible=False, pixel_scale=1):
    """One (image, strength, source) for an effect, fully determined by `seed`: a drawn
    illustration, a packaged photo's crop, or `picture` (a real picture's path) when given.

    A positive must show its fringe: at least VISIBLE_PIXELS pixels where the aberration (before any
    blur, inside the partial mask) moved a channel by more than VISIBLE_LEVEL. A blank picture, or a
    fringe that fell on flat colour, would be a positive no one could see: it is drawn again from
    the same picture with another seed, and after VISIBLE_ATTEMPTS a drawn illustration (with its own
    source) takes its place. `keep_invisible` keeps the first draw whatever it shows, as datasets
    were made before this check (the first draw is the same either way). `pixel_scale` enlarges
    `picture` by that whole factor (nearest neighbour) before the effect, as games show pixel art."""
    for attempt in range(VISIBLE_ATTEMPTS + 1):  # the last draw is a drawn illustration's, kept whatever it shows
        rng = np.random.default_rng(seed if attempt == 0 else [seed, 19, attempt])
        image, strength, source, fringe = draw_example(
            rng, effect, photos, picture if attempt < VISIBLE_ATTEMPTS else None, backgrounds, pixel_scale)
        visible = fringe is None or (fringe > VISIBLE_LEVEL).sum() >= VISIBLE_PIXELS
        if keep_invisible or visible or attempt == VISIBLE_ATTEMPTS:
            return image, strength, source


def draw_example(rng, effect, photos, picture, backgrounds, pixel_scale=1):
    """make_example's one draw -> (image, strength, source, per-pixel largest channel change of the
    fringe (H, W), None for label-0 effects)."""
    long = int(rng.choice(LONG_EDGES))
    short = max(128, int(long * rng.uniform(0.5, 1.0)))
    w, h = (long, short) if rng.random() < 0.6 else (short, long)
    photo = photos[int(rng.integers(0, len(photos)))] if photos and rng.random() < 0.15 else None
    source = f"photo:{photo.name}" if photo else "drawn"
    strength = 0.0
    fringe = None
    if effect == "sketch":
        return rough_sketch(rng, w, h), strength, "sketch", fringe
    if effect == "complementary":
        return complementary_edges(rng, w, h), strength, "drawn", fringe
    if effect == "lineart":
        return coloured_line_art(rng, w, h), strength, "drawn", fringe
    if effect == "outlined":
        return outlined_shapes(rng, w, h), strength, "drawn", fringe
    if picture is not None:
        image, source = load_picture(rng, picture, backgrounds), str(picture)
        if pixel_scale > 1:
            image = image.resize((image.width * pixel_scale, image.height * pixel_scale), Image.NEAREST)
        w, h = image.size
    else:
        image = crop_photo(rng, photo, w, h) if photo else draw_illustration(rng, w, h)
    if effect in LABEL_1:
        strength = float(rng.choice([1, 1.5, 2, 3, 4, 5, 6, 8] if effect in POSITIVES else [0.75, 1, 1.5, 2, 3, 5, 8]))
        if effect == "radial":
            shifted = radial_aberration(image, rng, strength)
        elif effect == "one_channel":
            shifted = one_channel_shift(image, rng, strength)
        elif effect == "green":
            shifted = green_shift(image, rng, strength)
        else:
            shifted = channel_shift(image, rng, strength)
        fringe = np.abs(np.asarray(shifted, np.int16) - np.asarray(image, np.int16)).max(2)
        if rng.random() < 0.3:  # soft, bleeding fringes
            shifted = shifted.filter(ImageFilter.GaussianBlur(rng.uniform(*BLUR_RADIUS)))
        if effect == "partial":
            mask = Image.fromarray((soft_mask(rng, w, h) * 255).astype(np.uint8))
            shifted = Image.composite(shifted, image, mask)
            fringe = fringe * (np.asarray(mask) / 255.0)
        image = shifted
    elif effect == "hsv_noise":
        image = hsv_noise(image, rng)
    elif effect in ("jpeg", "webp"):
        image = recompress(image, rng, effect.upper())
    elif effect == "grayscale":
        image = image.convert("L").convert("RGB")
    elif effect == "halftone":
        image = halftone(image, rng)
    return image, strength, source, fringe


def deliver(image, seed, effect, fraction, jpeg_quality=70):
    """(image, how it was delivered): with probability `fraction`, `image` saved as a JPEG (quality
    `jpeg_quality`-95, 4:2:0 chroma subsampling in 70% of them, else 4:4:4) or, one time in four, a WebP (quality
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
        image.save(buffer, "JPEG", quality=int(rng.integers(jpeg_quality, 96)), subsampling=subsampling)
        kind = "jpeg 4:2:0" if subsampling == 2 else "jpeg 4:4:4"
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), kind


def resize_after(image, seed, fraction):
    """(image, factor): with probability `fraction`, the finished image scaled by 0.25-0.75 (never
    under 128 px), as pictures are shrunk after the effect was added, clean ones as much as the
    aberrated; else (image, 1.0). Its own random stream: datasets made without it are unchanged."""
    rng = np.random.default_rng([seed, 17])
    if rng.random() >= fraction:
        return image, 1.0
    factor = max(rng.uniform(0.25, 0.75), 128 / min(image.size))
    if factor >= 1:
        return image, 1.0
    size = (round(image.width * factor), round(image.height * factor))
    return image.resize(size, Image.LANCZOS if rng.random() < 0.5 else Image.BILINEAR), round(factor, 3)


UPSCALE = (1.25, 2.5)  # --upscaled: the enlargement drawn
UPSCALED_MAX_SIDE = 4096  # never past this long side


def upscale_after(image, seed, fraction):
    """(image, factor): with probability `fraction`, the finished image enlarged by 1.25-2.5 (Lanczos
    or bicubic, never past UPSCALED_MAX_SIDE px), as collections gather upscaled pictures, clean and
    aberrated alike; else (image, 1.0). Its own random stream: datasets made without it are unchanged."""
    rng = np.random.default_rng([seed, 29])
    if rng.random() >= fraction:
        return image, 1.0
    factor = min(rng.uniform(*UPSCALE), UPSCALED_MAX_SIDE / max(image.size))
    if factor <= 1:
        return image, 1.0
    size = (round(image.width * factor), round(image.height * factor))
    return image.resize(size, Image.LANCZOS if rng.random() < 0.5 else Image.BICUBIC), round(factor, 3)


PIXEL_SCALES = (2, 3, 4)  # --pixel-scaled: the whole factors drawn
PIXEL_SCALED_MAX_SIDE = 2048  # never past this long side


def draw_pixel_scale(picture, family, seed, fraction):
    """The whole factor (2-4, nearest neighbour) a pixel-art picture is shown at, with probability
    `fraction`, as games and screenshots show pixel art; never past PIXEL_SCALED_MAX_SIDE px; 1 for
    the rest. Its own random stream: datasets made without it are unchanged."""
    rng = np.random.default_rng([seed, 31])
    if family != "pixel art" or rng.random() >= fraction:
        return 1
    factor = int(rng.choice(PIXEL_SCALES))
    with Image.open(picture) as image:
        long_side = max(image.size)
    return max(1, min(factor, PIXEL_SCALED_MAX_SIDE // long_side))


def blur_negative(image, seed, effect, fraction):
    """(image, radius): with probability `fraction`, a negative blurred as the positives' soft fringes
    are (Gaussian, BLUR_RADIUS px), so that softness is no sign of aberration; else (image, 0.0).
    Positives are left alone. Its own random stream: datasets made without it are unchanged."""
    rng = np.random.default_rng([seed, 23])
    if effect in LABEL_1 or rng.random() >= fraction:
        return image, 0.0
    radius = round(float(rng.uniform(*BLUR_RADIUS)), 1)
    return image.filter(ImageFilter.GaussianBlur(radius)), radius


def write_one(job):
    """(seed, effect, path, photos, picture, family, backgrounds, options) -> the image's metadata row
    (path, effect, strength, source, size, family, width, height, delivery, resized factor, negative
    blur, upscaled factor, pixel scale), the image written to `path`. `options`: main's {keep_invisible,
    pixel_scaled (before the effect), blurred_negatives, resized, upscaled, delivered, jpeg_quality}: its
    optional steps, in that order after the effect (a picture shrunk by --resized is not enlarged)."""
    seed, effect, path, photos, picture, family, backgrounds, options = job
    scale = 1
    if picture is not None and options.get("pixel_scaled", 0) > 0:
        scale = draw_pixel_scale(picture, family, seed, options["pixel_scaled"])
    image, strength, source = make_example(seed, effect, photos, picture, backgrounds, options["keep_invisible"],
                                           scale)
    if picture is not None and source != str(picture):
        family, scale = None, 1  # an invisible fringe's stand-in: a drawn illustration
    shrunk = delivery = blur = enlarged = None
    if options["blurred_negatives"] > 0:
        image, blur = blur_negative(image, seed, effect, options["blurred_negatives"])
    if options["resized"] > 0:
        image, shrunk = resize_after(image, seed, options["resized"])
    if options["upscaled"] > 0:  # a shrunk picture is not enlarged (its stream is drawn all the same)
        image, enlarged = upscale_after(image, seed, options["upscaled"] if shrunk in (None, 1.0) else 0.0)
    if options["delivered"] > 0:
        image, delivery = deliver(image, seed, effect, options["delivered"], options["jpeg_quality"])
    if family is None:
        family = "sketch" if effect == "sketch" else "photo" if source.startswith("photo:") else "drawn"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, compress_level=1)
    return (path, effect, strength, source, max(image.size), family, image.width, image.height, delivery, shrunk,
            blur, enlarged, scale)


def pick_pictures(planned, split, seed, pictures, real_fraction, family_weights=None):
    """Per planned (seed, effect): (picture path, family) or (None, None) for a generated image. A
    real picture is taken with probability `real_fraction` (never for the effects that draw their own
    image): first a family, uniformly or by `family_weights` ({family: weight}, 1 for those not named),
    then one of its pictures in this split."""
    rng = np.random.default_rng([seed, SPLIT_INDEX[split], 7])
    families = sorted(pictures)
    weights = None
    if family_weights:
        weights = np.array([family_weights.get(f, 1.0) for f in families], np.float64)
        weights /= weights.sum()
    chosen = []
    for _, effect in planned:
        if families and effect not in DRAWN_ONLY and rng.random() < real_fraction:
            if weights is None:
                family = families[int(rng.integers(0, len(families)))]
            else:
                family = families[int(rng.choice(len(families), p=weights))]
            path, _ = pictures[family][int(rng.integers(0, len(pictures[family])))]
            chosen.append((path, family))
        else:
            chosen.append((None, None))
    return chosen


def plan(split, count, seed, positive_fraction, hard_negatives=HARD_NEGATIVES, positives=POSITIVES):
    """(seed, effect) pairs: the positives spread over `positives`; 40% of the negatives clean, the
    rest spread over the hard kinds."""
    rng = np.random.default_rng([seed, SPLIT_INDEX[split]])
    jobs = []
    for _ in range(count):
        if rng.random() < positive_fraction:
            effect = positives[int(rng.integers(0, len(positives)))]
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
    parser.add_argument("--allow-missing-packages", action="store_true",
                        help="with --real-pictures, leave out the pictures of packages that are not installed "
                             "(a warning) instead of refusing: the dataset is then not the one its seed and "
                             "options make on a machine that has them")
    parser.add_argument(
        "--hard-negatives", type=hard_negative_kinds, default=HARD_NEGATIVES,
        help="comma-separated hard-negative kinds to draw from, e.g. jpeg,webp to mine a model's false "
             f"positives (default: all of {', '.join(HARD_NEGATIVES)})")
    parser.add_argument("--delivered", type=fraction, default=0.0, metavar="FRACTION",
                        help="share of the images, positives included, saved once more as a JPEG (quality 70-95) "
                             "or WebP (75-95) the way pictures are shared, and stored decoded; a `delivery` "
                             "column says how (default: 0, every image stored losslessly as made)")
    parser.add_argument("--more-sources", action="store_true",
                        help="with --real-pictures, also the four packages added to the allowed sources (MegaGlest "
                             "and Warzone 2100 renders, SuperTux backgrounds and tiles, Stellarium landscapes); "
                             "without it a seed makes the dataset it always made")
    parser.add_argument("--more-geometries", action="store_true",
                        help="positives also of one channel moved (red or blue alone) and of green moved against "
                             "red and blue (green/magenta fringes), 0.75-8 px (default: red and blue apart, radial, "
                             "partial only)")
    parser.add_argument("--resized", type=fraction, default=0.0, metavar="FRACTION",
                        help="share of the finished images, clean and aberrated alike, scaled by 0.25-0.75 before "
                             "delivery (aberrated, then shrunk); a `resized` column gives the factor (default: 0)")
    parser.add_argument("--blurred-negatives", type=fraction, default=0.0, metavar="FRACTION",
                        help="share of the negatives blurred as the positives' soft fringes are (Gaussian, "
                             "0.5-1.5 px; 30%% of the positives are), so that a soft picture is not taken for an "
                             "aberrated one; a `negative_blur` column gives the radius (default: 0)")
    parser.add_argument("--upscaled", type=fraction, default=0.0, metavar="FRACTION",
                        help="share of the finished images, clean and aberrated alike, enlarged by 1.25-2.5 "
                             "(Lanczos or bicubic, at most 4096 px) before delivery, as collections hold upscaled "
                             "pictures; one shrunk by --resized is not; an `upscaled` column gives the factor "
                             "(default: 0)")
    parser.add_argument("--jpeg-quality", type=int, default=70, metavar="Q",
                        help="with --delivered, the lowest JPEG quality (default: 70; up to 95)")
    parser.add_argument("--line-art", action="store_true",
                        help="hard negatives of coloured line art too (drawn: outlines in a shade of their fill, "
                             "one-sided rim light), two anime conventions that look like a one-sided fringe; a "
                             "`0_lineart` folder (default: off, so a seed makes the dataset it always made)")
    parser.add_argument("--outlined", action="store_true",
                        help="hard negatives of bright outlines too (drawn: maze walls, sprites and boxes edged on "
                             "both sides with a thin saturated line, often as low-resolution pixel art), common in "
                             "game art and stickers; a `0_outlined` folder (default: off)")
    parser.add_argument("--family-weights", type=family_weights, default=None, metavar="FAMILY=W,...",
                        help="with --real-pictures, how often each picture family is drawn, e.g. "
                             "'pixel art=2,3D render=1.5' (clean and aberrated alike; 1 for families not named; "
                             f"families: {', '.join(REAL_FAMILIES)}) (default: all alike)")
    parser.add_argument("--pixel-scaled", type=fraction, default=0.0, metavar="FRACTION",
                        help="with --real-pictures, share of the pixel-art pictures enlarged 2-4x by nearest "
                             "neighbour before the effect, as games show them (at most 2048 px); a `pixel_scale` "
                             "column gives the factor (default: 0)")
    parser.add_argument("--keep-invisible", action="store_true",
                        help="keep positives whose fringe changed (almost) no pixel, e.g. on a blank picture, as "
                             "datasets were made before 2026-12-04 (default: such a positive is drawn again, then "
                             "replaced by a drawn illustration)")
    return parser.parse_args(argv)


def hard_negative_kinds(text):
    """--hard-negatives "jpeg, webp" -> ("jpeg", "webp"); unknown kinds are a usage error."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    known = HARD_NEGATIVES + MORE_NEGATIVES
    unknown = sorted(set(kinds) - set(known))
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown kind(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return kinds


def family_weights(text):
    """--family-weights "pixel art=2, 3D render=1.5" -> {"pixel art": 2.0, "3D render": 1.5}; an
    unknown family or a weight that is not a positive number is a usage error."""
    weights = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        family, _, weight = item.rpartition("=")
        family = family.strip()
        if family not in REAL_FAMILIES:
            raise argparse.ArgumentTypeError(
                f"unknown family {family!r} in {item!r}; choose from {', '.join(REAL_FAMILIES)}")
        try:
            weights[family] = float(weight)
        except ValueError:
            weights[family] = math.nan
        if not (math.isfinite(weights[family]) and weights[family] > 0):
            raise argparse.ArgumentTypeError(f"{item!r}: the weight must be a positive number, e.g. '{family}=2'")
    if not weights:
        raise argparse.ArgumentTypeError("no family given, e.g. 'pixel art=2'")
    return weights


def main(argv=None):
    args = parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out}: is a file, not a folder", file=sys.stderr)
        return 2
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out}: output folder exists and is not empty", file=sys.stderr)
        return 2
    try:
        pictures = (split_pictures(real_pictures(args.install, args.more_sources, args.allow_missing_packages))
                    if args.real_pictures > 0 else None)
    except MissingPackages as missing:
        print(f"error: --real-pictures: Debian package(s) not installed: {missing} (--install installs them; "
              "--allow-missing-packages makes a dataset without their pictures, unlike the recipe's)",
              file=sys.stderr)
        return 2
    # With real pictures, the packaged photos are real pictures too, each in one split only.
    photos = [] if args.no_photos or pictures is not None else photo_sources()
    if pictures is not None and not pictures["train"]:
        print("error: --real-pictures: no pictures found (install the packages, or pass --install)", file=sys.stderr)
        return 2
    from tqdm import tqdm

    hard_negatives = tuple(dict.fromkeys(args.hard_negatives + (("lineart",) if args.line_art else ())
                                         + (("outlined",) if args.outlined else ())))
    with Pool(args.workers) as pool:
        for split in ("train", "validation", "test"):
            count = getattr(args, split)
            if count <= 0:
                continue
            folder = args.out / split
            jobs = []
            planned = plan(split, count, args.seed, args.positive_fraction, hard_negatives,
                           LABEL_1 if args.more_geometries else POSITIVES)
            chosen = (pick_pictures(planned, split, args.seed, pictures[split], args.real_pictures,
                                    args.family_weights) if pictures else [(None, None)] * len(planned))
            backgrounds = [path for family in (pictures or {}).get(split, {}).values() for path, _ in family]
            options = {k: getattr(args, k) for k in ("keep_invisible", "pixel_scaled", "blurred_negatives", "resized",
                                                     "upscaled", "delivered", "jpeg_quality")}
            pick = np.random.default_rng([args.seed, 0, 11])  # backgrounds: the same stream in every split
            for i, ((seed, effect), (picture, family)) in enumerate(zip(planned, chosen)):
                label = 1 if effect in LABEL_1 else 0
                path = folder / f"{label}_{effect}" / f"{i:06d}.png"
                others = [backgrounds[int(k)] for k in pick.integers(0, len(backgrounds), 4)] if picture else ()
                jobs.append((seed, effect, path, photos, picture, family, others, options))
            rows = list(tqdm(pool.imap(write_one, jobs, chunksize=4), total=len(jobs), desc=split, unit="img"))
            with open(folder / "metadata.csv", "w", newline="") as f:
                writer = csv.writer(f)
                optional = [("delivery", args.delivered > 0), ("resized", args.resized > 0),
                            ("negative_blur", args.blurred_negatives > 0), ("upscaled", args.upscaled > 0),
                            ("pixel_scale", args.pixel_scaled > 0)]
                writer.writerow(["file_name", "label", "effect", "strength", "source", "size", "family", "width",
                                 "height", *(name for name, on in optional if on)])
                for path, effect, strength, source, size, family, width, height, *steps in rows:
                    label = int(effect in LABEL_1)
                    writer.writerow([path.relative_to(folder).as_posix(), label, effect, strength, source, size,
                                     family, width, height, *(v for v, (_, on) in zip(steps, optional) if on)])
    real = sum(len(v) for split in (pictures or {}).values() for v in split.values())
    print(f"wrote {args.out} ({len(photos)} packaged photos used as sources"
          + (f", {real} real pictures" if pictures else "") + ")")
    return 0
