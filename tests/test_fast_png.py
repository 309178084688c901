"""PNGs decoded by libspng (decoding.decode_png) are the images Pillow decodes: the same mode, size
and pixels, the same EXIF rotation, and every file Pillow refuses is still refused with Pillow's
words (those files go to Pillow)."""

import io
import platform
import struct
import sys
import zlib

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from citytools import images as decoding
from citytools.images import BadImage, load_image


def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def chunks(data):
    """PNG bytes -> [(kind, body)] (CRCs dropped: `png` writes them anew)."""
    pos, out = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        out.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def png(parts):
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunk(kind, body) for kind, body in parts)


def saved(image, **options):
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


def exif_rotated(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def variants():
    """name -> PNG bytes: the modes and chunks a collection holds, and broken files."""
    rgb = make_image(37, 23, seed=1)
    files = {
        "RGB": saved(rgb),
        "RGBA": saved(rgb.convert("RGBA")),
        "L": saved(rgb.convert("L")),
        "LA": saved(rgb.convert("LA")),
        "P": saved(rgb.convert("P")),
        "P with transparency": saved(rgb.convert("P"), transparency=3),
        "1-bit": saved(rgb.convert("1")),
        "16-bit grey": saved(Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257))),
        "RGB with tRNS": saved(rgb, transparency=(10, 20, 30)),
        "RGB, EXIF rotated before the pixels": saved(rgb, exif=exif_rotated(6)),
    }
    parts = chunks(files["RGB"])
    idat = [i for i, (kind, _) in enumerate(parts) if kind == b"IDAT"]
    files["RGB, EXIF rotated after the pixels"] = png(parts[:-1] + [(b"eXIf", exif_rotated(8)), parts[-1]])
    files["RGB, a text chunk after the pixels"] = png(parts[:-1] + [(b"tEXt", b"k\x00v"), parts[-1]])
    files["RGB, 17 MB of text after the pixels"] = png(parts[:-1] + [(b"tEXt", b"k\x00" + bytes(17 << 20)),
                                                                     parts[-1]])
    bad_crc = png(parts[:-1] + [(b"tEXt", b"k\x00v"), parts[-1]])
    position = bad_crc.index(b"tEXt") + 4 + 3  # the CRC after the text's 3 bytes
    files["RGB, a text chunk with a bad CRC"] = bad_crc[:position] + bytes([bad_crc[position] ^ 0xFF]) + \
        bad_crc[position + 1 :]
    files["RGB, truncated in the pixels"] = files["RGB"][: len(files["RGB"]) // 2]
    files["RGB, no IEND"] = png(parts[:-1])
    kind, body = parts[idat[0]]
    scrambled = body[:2] + bytes(b ^ 0x5A for b in body[2:])  # the zlib header kept, the stream broken
    files["RGB, broken compressed pixels"] = png(parts[: idat[0]] + [(kind, scrambled)] + parts[idat[0] + 1 :])
    files["a JPEG named .png"] = (lambda b: (rgb.save(b, "JPEG"), b.getvalue())[1])(io.BytesIO())
    return files


def decode_both(path, monkeypatch):
    """(libspng's outcome, Pillow's outcome) of load_image: (mode, size, file size, pixels) or the error."""
    outcomes, library = [], decoding.pyspng
    for decoder in (library, None):
        monkeypatch.setattr(decoding, "pyspng", decoder)
        try:
            image = load_image(str(path))
            outcomes.append((image.mode, image.size, image.info["picture_size"], np.asarray(image).tobytes()))
        except BadImage as error:
            outcomes.append(("error", str(error)))
    monkeypatch.setattr(decoding, "pyspng", library)
    return outcomes


needs_pyspng = pytest.mark.skipif(decoding.pyspng is None and not (sys.platform == "linux" and platform.machine()
                                                                   == "x86_64"),
                                  reason="pyspng has no wheel for this platform; Pillow decodes every PNG")


@needs_pyspng
def test_pyspng_is_installed_where_requirements_put_it():
    assert decoding.pyspng is not None  # requirements.txt installs it on x86-64 Linux


@needs_pyspng
@pytest.mark.parametrize("name", list(variants()))
def test_libspng_decodes_as_pillow_does_or_leaves_the_file_to_pillow(name, tmp_path, monkeypatch):
    path = tmp_path / "image.png"
    path.write_bytes(variants()[name])
    fast, pillow = decode_both(path, monkeypatch)
    assert fast == pillow, name
    used = decoding.decode_png(str(path)) is not None
    plain = name in ("RGB", "RGBA", "L", "RGB, a text chunk after the pixels") or name.startswith("RGB, EXIF")
    assert used == plain, f"{name}: libspng {'used' if used else 'not used'}"
    if "rotated" in name:
        assert fast[1] == (23, 37) and fast[2] == (23, 37)  # turned by 90 degrees, its size with it


@needs_pyspng
def test_a_collection_decoded_by_libspng_scores_exactly_as_by_pillow(converted, tmp_path, monkeypatch):
    from citytools.loading import collate
    from citytools.scorer import Scorer

    scorer = Scorer([str(converted["ca"])], device="cpu", dtype="float32")
    paths = []
    for i, size in enumerate([(90, 80), (200, 150), (700, 690)]):  # the last one tiled
        paths.append(tmp_path / f"{i}.png")
        make_image(*size, seed=i).save(paths[-1])
    scores = []
    for decoder in (decoding.pyspng, None):
        monkeypatch.setattr(decoding, "pyspng", decoder)
        items = [(None, scorer.preprocess(load_image(str(p)))) for p in paths]
        scores.append([row[f"{scorer.models[0].key}:Chromatic Aberration"] for row in scorer.score(collate(items)[1])])
    assert scores[0] == scores[1]
