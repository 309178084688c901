"""The default model shipped at the repo root loads offline and does its job on a clear case."""

import numpy as np

from conftest import REPO


def test_shipped_model_ranks_an_aberrated_image_above_its_clean_original():
    from transformers import pipeline

    import make_synthetic_data as m

    pipe = pipeline("image-classification", model=str(REPO), trust_remote_code=True)
    assert pipe.model.num_parameters() < 10_000_000
    rng = np.random.default_rng(7)
    margins = []
    for _ in range(3):
        clean = m.draw_illustration(rng, 1024, 768)
        aberrated = m.channel_shift(clean, rng, 6.0)
        score = {}
        for name, image in (("clean", clean), ("aberrated", aberrated)):
            score[name] = {r["label"]: r["score"] for r in pipe(image, top_k=None)}["Chromatic Aberration"]
        margins.append(score["aberrated"] - score["clean"])
    assert min(margins) > 0, margins
