"""The default model shipped at the repo root: it loads offline through remote code and does its job
on a clear case."""

import json

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
    from citytools.cli import make_synthetic_data as m

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


def test_documented_training_configs_rebuild_the_shipped_architecture():
    """configs/default_model.json builds a model that, with the fringe measurements stage 4 adds,
    has the shipped weights' shapes and labels, and each later stage fine-tunes the previous stage's
    output, backbone unfrozen, on images of its own (stage 5's output is then averaged with stage 4:
    average_models.py)."""
    import safetensors.torch

    from citytools.cli import train_hf

    data, model_args, training = train_hf.parse_args([str(REPO / "configs" / "default_model.json")])
    names = data.class_names.split(",")
    model, processor, train_backbone = train_hf.build_model(model_args, [0, 1], names)
    assert train_backbone
    assert not model_args.fringe_features
    model.add_fringe_features()  # what stage 4 (--fringe_features) does to stage 3's model
    shipped = safetensors.torch.load_file(str(REPO / "model.safetensors"))
    built = model.state_dict()
    assert {k: tuple(v.shape) for k, v in built.items()} == {k: tuple(v.shape) for k, v in shipped.items()}
    shipped_config = json.loads((REPO / "config.json").read_text())
    assert shipped_config["id2label"] == {"0": names[0], "1": names[1]}
    assert shipped_config["stem"] == model.config.stem
    assert shipped_config["fringe_features"] == model.config.fringe_features
    assert json.loads((REPO / "preprocessor_config.json").read_text())["crop_size"] == processor.crop_size

    datasets = [data.dataset_name]
    for stage in ("default_model_stage2.json", "default_model_stage3.json", "default_model_stage4.json",
                  "default_model_stage5.json"):
        stage_data, stage_model, stage_training = train_hf.parse_args([str(REPO / "configs" / stage)])
        assert stage_model.model_name_or_path == training.output_dir  # starts from the previous stage
        assert stage_model.train_backbone is True
        assert stage_data.dataset_name not in datasets  # fresh images, not another pass over the same ones
        datasets.append(stage_data.dataset_name)
        assert stage_model.fringe_features == (stage == "default_model_stage4.json")
        training = stage_training
    # stage 5 trains with the original CA model's loss weights, and the shipped config says so
    assert training.output_dir.endswith("default_model_stage5_finetuned")
    assert stage_model.label_loss_weights == "1.0,0.5" and shipped_config["label_loss_weights"] == [1.0, 0.5]
