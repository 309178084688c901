"""The default model shipped at the repo root: it loads offline through remote code and does its job
on a clear case."""

import numpy as np

from conftest import REPO


def shipped_pipeline():
    from transformers import pipeline

    return pipeline("image-classification", model=str(REPO), trust_remote_code=True)


def test_shipped_model_loads_offline_and_scores_both_labels():
    pipe = shipped_pipeline()
    assert pipe.model.num_parameters() < 10_000_000
    result = pipe(str(REPO / "examples" / "aberration_shift.png"), top_k=None)
    assert {r["label"] for r in result} == {"Pass", "Chromatic Aberration"}
    assert abs(sum(r["score"] for r in result) - 1) < 1e-5


def test_shipped_model_ranks_an_aberrated_image_above_its_clean_original():
    import make_synthetic_data as m

    pipe = shipped_pipeline()
    rng = np.random.default_rng(7)
    margins = []
    for _ in range(3):
        clean = m.draw_illustration(rng, 1024, 768)
        aberrated = m.channel_shift(clean, rng, 6.0)
        score = {}
        for name, image in (("clean", clean), ("aberrated", aberrated)):
            score[name] = {r["label"]: r["score"] for r in pipe(image, top_k=None)}["Chromatic Aberration"]
        margins.append(score["aberrated"] - score["clean"])
    assert min(margins) > 0.05, margins
