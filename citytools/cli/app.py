"""A Gradio demo: drop an image, see each model's labels and scores, and where on the image the
aberration was found (the five tiles drawn with each tile's score).

  python app.py                               # the shipped model, http://127.0.0.1:7860
  python app.py --model models/ca-v1.16 models/compression-v1.5 --port 8000
"""

import argparse
import os

import numpy as np
from PIL import ImageDraw, ImageFont

from citytools.loading import collate
from citytools.scorer import Scorer
from citytools.tiling import TILE_COMBINES
from citytools.toolkit import ROOT, first_line

DEFAULT_MODEL = str(ROOT)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=[DEFAULT_MODEL], help="model folders or Hub ids")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    return parser.parse_args(argv)


def tile_colour(score):
    """Green for clean, through yellow, to red for aberrated."""
    return (int(255 * min(1, 2 * score)), int(255 * min(1, 2 * (1 - score))), 40)


def annotate(image, boxes, scores):
    """Draws each tile's box with its score on a copy of the image."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 300))
    font = ImageFont.load_default(size=max(12, round(max(canvas.size) / 30)))
    for index, (box, score) in enumerate(zip(boxes, scores)):
        draw.rectangle(box, outline=tile_colour(score), width=width)
        label = f"{'tile ' + str(index + 1) if len(boxes) > 1 else 'image'}: {score:.2f}"
        draw.text((box[0] + 2 * width, box[1] + 2 * width), label, fill=tile_colour(score), font=font, stroke_width=2,
                  stroke_fill=(0, 0, 0))
    return canvas


def original_boxes(image, processor, tiling=None):
    """The views' boxes in the uploaded image's coordinates (inclusive corners, for drawing)."""
    w, h = image.size
    (tw, th), boxes = processor.view_layout(w, h, tiling)
    sx, sy = w / tw, h / th
    return [(round(left * sx), round(top * sy), round(right * sx) - 1, round(bottom * sy) - 1)
            for left, top, right, bottom in boxes]


class Demo:
    def __init__(self, names, device="auto"):
        self.scorer = Scorer(names, device=device)

    def analyse(self, image, include_default, tiling, combine):
        """-> ({model: {label: score}} per model, the annotated image, a status line)."""
        if image is None:
            return [{}] * len(self.scorer.models) + [None, "Upload an image first."]
        try:
            _, grouped = collate([(None, self.scorer.preprocess(image, tiling=tiling))])
            outputs = list(self.scorer.outputs(grouped, combine=combine))
        except Exception as error:  # noqa: BLE001 - the page shows it instead of a stack trace
            return [{}] * len(self.scorer.models) + [None, f"Cannot score this image: {first_line(error)}"]
        labels, first_tiles = [], None
        for m, output, mask in outputs:
            names = list(m.model.config.id2label.values())
            scores = output.scores[0].float().cpu().numpy()
            shown = {name: float(s) for i, (name, s) in enumerate(zip(names, scores))
                     if include_default or i != 0 or len(names) == 1}
            labels.append(shown)
            if first_tiles is None:
                tiles = output.tile_scores[0].float().cpu().numpy()[mask[0].bool().cpu().numpy()]
                first_tiles = (m, tiles[:, -1] if len(names) > 1 else tiles[:, 0])
        m, tile_scores = first_tiles
        boxes = original_boxes(image, m.processor, tiling)
        positive = list(m.model.config.id2label.values())[-1]
        if len(boxes) > 1:
            status = f"Five tiles; each shows the {m.key} score for '{positive}'; combined by {combine}."
        elif not tiling:
            status = "Scored as one view: tiling is off."
        else:
            status = f"Scored as one view: tiling needs a short side above {2 * m.processor.size['shortest_edge']} px."
        return labels + [annotate(image, boxes, np.asarray(tile_scores)), status]

    def build(self):
        import gradio as gr

        with gr.Blocks(title="cityclassifier") as page:
            gr.Markdown("# cityclassifier\nChromatic aberration (and sibling artefacts) in anime images. "
                        "Large images are scored as five tiles; the picture shows where each tile scored.")
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="pil", label="image", image_mode=None)
                    include_default = gr.Checkbox(value=True, label="include the default class (Pass)")
                    tiling = gr.Checkbox(value=True, label="tiling (five crops on large images)")
                    combine = gr.Radio(list(TILE_COMBINES), value="mean", label="combine tiles by")
                    button = gr.Button("Analyse", variant="primary")
                with gr.Column():
                    outputs = [gr.Label(label=m.key, num_top_classes=10) for m in self.scorer.models]
                    tiles = gr.Image(type="pil", label="tiles", interactive=False)
                    status = gr.Markdown()
            inputs = [image, include_default, tiling, combine]
            button.click(self.analyse, inputs, outputs + [tiles, status])
            image.upload(self.analyse, inputs, outputs + [tiles, status])
        return page


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    Demo(args.model, args.device).build().launch(server_name=args.host, server_port=args.port, share=False)
