"""What the generator draws itself: anime-like illustrations, backgrounds, sketches, the hard
negatives' looks (HSV noise, screentone, red beside cyan, heavy compression), and real pictures
prepared as a user's image would look (transparent ones composited on a background)."""

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from citytools.pictures import MIN_PICTURE_SIDE, has_alpha


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


def coloured_line_art(rng, w, h):
    """Cel art of two anime conventions that look like a one-sided fringe but are drawn: coloured
    lines (colour trace: each outline a dark, saturated shade of its own fill, not black) and rim light
    (a thin band of one bright colour along one side of every shape, the side the scene's light comes
    from, so a picture's bands share a direction as a lateral shift's fringes do)."""
    image = gradient_background(rng, w, h)
    draw = ImageDraw.Draw(image)
    scale = max(w, h) / 512
    rim = random_color(rng)
    light = rng.uniform(0, 2 * math.pi)
    for _ in range(int(rng.integers(3, 10))):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.08, 0.35) * min(w, h)
        fill = random_color(rng)
        shape = blob(rng, cx, cy, r, int(rng.integers(5, 12)))
        trace = tuple(int(c * rng.uniform(0.35, 0.6)) for c in fill)
        if rng.random() < 0.7:  # rim light: the shape, moved 1-4 px towards the light, drawn first in its colour
            angle, offset = light + rng.normal(0, 0.2), rng.uniform(1, 4) * scale
            dx, dy = math.cos(angle) * offset, math.sin(angle) * offset
            draw.polygon([(x + dx, y + dy) for x, y in shape], fill=rim)
        draw.polygon(shape, fill=fill, outline=trace, width=max(1, int(rng.uniform(1, 3) * scale)))
        if rng.random() < 0.5:  # an inner rim: a lighter sliver inside the shape, on the lit side
            inner = [(cx + (x - cx) * 0.92, cy + (y - cy) * 0.92) for x, y in shape]
            dx, dy = math.cos(light) * 2 * scale, math.sin(light) * 2 * scale
            draw.polygon([(x + dx, y + dy) for x, y in inner], fill=tuple(min(255, int(c * 1.25) + 30) for c in fill))
            draw.polygon(inner, fill=fill)
    for _ in range(int(rng.integers(4, 16))):  # strands of hair, traced in a shade of their colour
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        angle, colour = rng.uniform(0, 2 * math.pi), random_color(rng)
        trace = tuple(int(c * 0.5) for c in colour)
        width = max(2, int(rng.uniform(2, 8) * scale))
        points = [(x, y)]
        for _ in range(int(rng.integers(8, 24))):
            angle += rng.normal(0, 0.15)
            x, y = x + math.cos(angle) * 12 * scale, y + math.sin(angle) * 12 * scale
            points.append((x, y))
        draw.line(points, fill=trace, width=width + 2)
        draw.line(points, fill=colour, width=width)
    return image


def outlined_shapes(rng, w, h):
    """Game and sticker art's bright outlines: dark or flat shapes and thick strokes (maze walls,
    sprites) edged on every side with a thin line of one saturated colour, on a flat or graded
    background, drawn without anti-aliasing and often at a low resolution shown 2-3x by nearest
    neighbour, as pixel art is. An outline on both sides of an edge has no direction: no fringe."""
    pixel = int(rng.choice([1, 1, 2, 3]))
    sw, sh = max(32, w // pixel), max(32, h // pixel)
    image = Image.new("RGB", (sw, sh), random_color(rng)) if rng.random() < 0.6 else gradient_background(rng, sw, sh)
    draw = ImageDraw.Draw(image)
    scale = max(sw, sh) / 512
    edge = random_color(rng)
    if rng.random() < 0.6:  # most often fully saturated: a pure blue, magenta or yellow line
        edge = Image.new("HSV", (1, 1), (int(rng.random() * 255), 255, 255)).convert("RGB").getpixel((0, 0))
    fill = random_color(rng, dark=True) if rng.random() < 0.7 else random_color(rng)
    rim = max(1, int(rng.uniform(1, 3) * scale))
    for _ in range(int(rng.integers(6, 24))):  # walls: straight thick strokes, edged on both sides
        x, y = rng.uniform(0, sw), rng.uniform(0, sh)
        length, width = rng.uniform(0.05, 0.4) * max(sw, sh), max(2, int(rng.uniform(3, 16) * scale))
        end = (x + length, y) if rng.random() < 0.5 else (x, y + length)
        draw.line([(x, y), end], fill=edge, width=width + 2 * rim)
        draw.line([(x, y), end], fill=fill, width=width)
    for _ in range(int(rng.integers(2, 8))):  # sprites: blobs and boxes with an outline all round
        cx, cy, r = rng.uniform(0, sw), rng.uniform(0, sh), rng.uniform(0.04, 0.2) * min(sw, sh)
        colour = random_color(rng, dark=rng.random() < 0.5)
        if rng.random() < 0.5:
            draw.rectangle([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=colour, outline=edge, width=rim)
        else:
            draw.polygon(blob(rng, cx, cy, r, int(rng.integers(5, 12))), fill=colour, outline=edge, width=rim)
    return image if pixel == 1 else image.resize((sw * pixel, sh * pixel), Image.NEAREST)
