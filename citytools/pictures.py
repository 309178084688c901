"""Where the training pictures come from: the Debian packages and Python sample images that
../shared/TRAINING_SOURCES.md allows, each file's picture family, and the fixed split of their
source groups (a test split never holds a sibling of a training picture)."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

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


# The four packages ../shared/TRAINING_SOURCES.md added (two 3D games, a 2D game, landscape panoramas),
# taken with --more-sources only: adding their groups to a family reorders its split ranking, so a
# dataset made without them stays as it was.
MORE_RULES = (  # the same table as DEBIAN_RULES: alike on purpose
    ("megaglest-data", r"/megaglest/(scenarios|tutorials)/|/megaglest/docs/images/", "3D render"),
    ("megaglest-data", r"/megaglest/data/menu/textures/|/megaglest/techs/factions/[^/]+/[^/]+\.(jpg|png)$", "painted"),
    ("warzone2100-data", r"/doc/warzone2100/images/", "3D render"),
    ("supertux-data", r"/supertux2/images/background/", "drawn"),
    ("supertux-data", r"/supertux2/images/(tiles/(?!auxiliary/)|worldmap/)", "pixel art"),
    ("stellarium-data", r"/stellarium/landscapes/", "photo"),
)
MIN_PICTURE_SIDE = 128  # smaller files are icons and sprites


class MissingPackages(Exception):
    """Debian packages a recipe's pictures come from are not installed (the message lists them)."""


def photo_sources():
    """Real photos shipped inside packages requirements.txt installs (scikit-learn, matplotlib). Not
    scikit-image's, although ../shared/TRAINING_SOURCES.md allows them: nothing installs it, so whether
    a machine happened to have it would change every split's photos (each photo is a group)."""
    found = []
    for module, pattern in (("sklearn.datasets", "images/*.jpg"), ("matplotlib", "mpl-data/sample_data/*.jpg")):
        try:
            package = __import__(module, fromlist=["__file__"])
        except ImportError:
            continue
        found += sorted(Path(package.__file__).parent.glob(pattern))
    return found


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


def real_pictures(install=False, more_sources=False, allow_missing=True):
    """[(path, family, group)] of the allowed Debian packages' pictures (MORE_RULES' too with
    `more_sources`), plus the packaged photos. A package not installed: its pictures are left out with
    a warning, or, without `allow_missing`, MissingPackages (the pictures would not be the recipe's)."""
    found, missing = [], []
    table = DEBIAN_RULES + (MORE_RULES if more_sources else ())
    for package in dict.fromkeys(rule[0] for rule in table):
        files = package_files(package, install)
        if files is None:
            missing.append(package)
            continue
        rules = [(re.compile(pattern), family) for name, pattern, family in table if name == package]
        for path in sorted(f for f in files if f.lower().endswith((".png", ".jpg", ".jpeg"))):
            family = next((family for pattern, family in rules if pattern.search(path)), None)
            if family and usable_picture(path):
                found.append((path, family, picture_group(path)))
    found += [(str(path), "photo", str(path)) for path in photo_sources()]
    if missing and not allow_missing:
        raise MissingPackages(", ".join(missing))
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
