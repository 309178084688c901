"""Opening images the way scoring needs them: every failure a one-line reason (BadImage), the pixel
limits checked before decoding, EXIF rotation applied, 8-bit PNGs through libspng."""

import io
import os
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageFile, ImageOps

try:  # libspng decodes 8-bit PNGs faster than Pillow; without it Pillow decodes them all
    import pyspng
except ImportError:
    pyspng = None

from citytools.toolkit import MAX_PIXELS, first_line

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error row, not a half-grey image


class BadImage(Exception):
    """An input that cannot be scored; its message is the one-line reason in the error column."""


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


PNG_MODES = {0: "L", 2: "RGB", 6: "RGBA"}  # 8-bit colour types libspng hands back as Pillow reads them (not LA)


def decode_png(path):
    """A PNG file -> a PIL image with the pixels and mode Pillow decodes, through libspng (faster than
    Pillow: docs/speed.md), or None where Pillow must decode it:
    - no pyspng; not 8-bit L, RGB or RGBA; interlaced; transparency by tRNS; animation;
    - a chunk other than pixel data whose CRC fails (Pillow rejects those; pyspng ignores CRCs);
    - no IEND (truncated); a file far larger than its pixels (huge metadata); anything libspng refuses.
    Pillow then decodes the file and words its errors, as before. EXIF (eXIf) is kept in `info`."""
    if pyspng is None or not isinstance(path, (str, os.PathLike)):
        return None
    with open(path, "rb") as f:
        data = f.read(len(PNG_SIGNATURE) + 25)  # the signature and IHDR
        if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
            return None
        width, height = struct.unpack(">II", data[16:24])
        if os.fstat(f.fileno()).st_size > 2 * height * (4 * width + 1) + (16 << 20):
            return None  # far larger than its pixels (huge metadata): Pillow, which streams it, decides
        data += f.read()
    pos, header, exif = len(PNG_SIGNATURE), None, None
    while True:
        if pos + 12 > len(data):
            return None  # truncated before IEND
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if len(body) < length or pos + 12 + length > len(data):
            return None
        if kind != b"IDAT" and zlib.crc32(data[pos + 4 : pos + 8 + length]) != struct.unpack(
                ">I", data[pos + 8 + length : pos + 12 + length])[0]:
            return None
        if kind == b"IHDR":
            header = body
        elif kind in (b"tRNS", b"acTL"):
            return None
        elif kind == b"eXIf":
            exif = body
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or len(header) != 13 or header[8] != 8 or header[9] not in PNG_MODES or header[12] != 0:
        return None
    try:
        pixels = pyspng.load(data)
    except Exception:  # noqa: BLE001 - Pillow decodes it again and says what is wrong
        return None
    channels = len(PNG_MODES[header[9]])
    if pixels.dtype != np.uint8 or pixels.shape[:2] != (height, width) or \
            (pixels.shape[2] if pixels.ndim == 3 else 1) != channels:
        return None
    image = Image.fromarray(pixels if channels > 1 else pixels.reshape(height, width))  # L, RGB or RGBA
    if image.mode != PNG_MODES[header[9]]:
        return None
    if exif is not None:
        image.info["exif"] = exif
    return image


def error_text(error):
    """The error column's one-line reason for any exception met while opening or preparing an image."""
    return str(error) if isinstance(error, BadImage) else f"cannot process: {first_line(error)}"


def limit_hint(max_pixels):
    """" (see --flag)" when the limit came from a command line (`toolkit.PixelLimit`), else ""."""
    flag = getattr(max_pixels, "flag", None)
    return f" (see {flag})" if flag else ""


def load_image(path, max_pixels=MAX_PIXELS, draft_short=None, work_pixels=None):
    """Opens one file as the pipeline does (EXIF rotation applied, first frame of animations),
    keeping its mode for the processor. Raises BadImage with a one-line reason.

    Refused before decoding: more than `max_pixels` in the file, or in the largest image that
    scoring it would make (`work_pixels(width, height)`: a 10000x3 strip is resized to 1120000x336).

    draft_short(width, height) -> short side the scoring needs, or None: JPEGs are then decoded at
    a reduced scale (libjpeg's DCT scaling) that keeps at least that short side. Not exact."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow still raises above 2x
            with Image.open(path) as image:
                if image.width * image.height > max_pixels:
                    raise BadImage(f"decompression bomb: {image.width}x{image.height} pixels exceeds {int(max_pixels)}"
                                   f"{limit_hint(max_pixels)}")
                work = work_pixels(*image.size) if work_pixels else 0
                if work > max_pixels:
                    raise BadImage(f"too large to process: scoring {image.width}x{image.height} would make an image "
                                   f"of {work} pixels, over the {int(max_pixels)} limit{limit_hint(max_pixels)}")
                image.seek(0)
                size = image.size
                need = draft_short(*image.size) if draft_short and image.format == "JPEG" else None
                if need:
                    scale = need / min(image.size)
                    image.draft("RGB", (int(image.width * scale + 0.999), int(image.height * scale + 0.999)))
                decoded = decode_png(path) if image.format == "PNG" else None
                orientation = (image if decoded is None else decoded).getexif().get(0x0112, 1)
                if decoded is None:
                    image.load()
                    result = ImageOps.exif_transpose(image)  # a new image, detached from the file, rotated or not
                else:  # already detached: a copy only to rotate it
                    result = decoded if orientation == 1 else ImageOps.exif_transpose(decoded)
                if orientation in (5, 6, 7, 8):  # rotated by 90 degrees
                    size = size[::-1]
                result.info["picture_size"] = size  # (width, height) as stored, also when decoded at a reduced scale
                return result
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImage(f"decompression bomb: {first_line(error)}") from None
    except FileNotFoundError:
        kind = "broken symlink" if os.path.islink(path) else "file not found"
        raise BadImage(kind) from None
    except PermissionError:
        raise BadImage("permission denied") from None
    except IsADirectoryError:
        raise BadImage("is a directory") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error) as error:
        raise BadImage(f"cannot decode: {first_line(error)}") from None


def load_dataset_image(value, max_pixels=MAX_PIXELS, work_pixels=None):
    """A dataset cell opened as `load_image` opens a file (the same EXIF rotation, limits and one-line
    BadImage reasons): an Image(decode=False) value or a {bytes, path} struct (its bytes when there are
    any, even empty), raw bytes, a local path or a remote one (`hf://`, `https://`), or None."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if value is None:
        raise BadImage("no image in this sample")
    if isinstance(value, (bytes, bytearray)):
        return load_image(io.BytesIO(value), max_pixels, work_pixels=work_pixels)
    if isinstance(value, str) and not os.path.exists(value) and "://" in value:
        from datasets.utils.file_utils import xopen

        with xopen(value, "rb") as f:
            return load_image(io.BytesIO(f.read()), max_pixels, work_pixels=work_pixels)
    if isinstance(value, str):
        return load_image(value, max_pixels, work_pixels=work_pixels)
    raise BadImage(f"not an image: a {type(value).__name__} value")
