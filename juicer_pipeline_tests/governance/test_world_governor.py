"""The committed world governor: it loads offline and its saliency finds objects."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from juicer_pipeline.governance.pruning import keep_top
from juicer_pipeline.governance.saliency import VisionPass
from juicer_pipeline.models.loader import WORLD_GOVERNOR, load_foundation_model


@pytest.fixture(scope="module")
def governor():
    return load_foundation_model("world")


def _single_object(shape: str, colour, box, background=(128, 128, 128)) -> tuple[Image.Image, np.ndarray]:
    img = Image.new("RGB", (64, 64), background)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    else:
        d.rectangle(box, fill=colour)
    mask = np.asarray(img.convert("RGB"), dtype=int)
    obj = (np.abs(mask - np.array(background)).sum(-1) > 0)
    patches = obj.reshape(8, 8, 8, 8).mean(axis=(1, 3)).reshape(-1) >= 0.1
    return img, patches


@pytest.mark.parametrize("method", ["cls_attention", "attention_rollout", "smoothed_rollout", "token_distinctiveness"])
def test_kept_patches_lie_on_the_object_on_a_flat_background(governor, method):
    vision = VisionPass(governor.model)
    hits = kept_total = obj_total = 0
    cases = [("circle", (220, 40, 40), (6, 8, 30, 32)), ("square", (40, 80, 220), (34, 30, 58, 54)),
             ("circle", (235, 210, 40), (20, 36, 44, 60))]
    for shape, colour, box in cases:
        img, obj = _single_object(shape, colour, box)
        out = vision.run(governor.preprocess(img)[None])
        rho = obj.mean()  # keep exactly as many patches as the object covers
        kept = keep_top(out.saliency[method][0].numpy(), rho)
        hits += obj[kept].sum()
        kept_total += len(kept)
        obj_total += obj.sum()
    vision.close()
    assert hits / kept_total > 0.5, f"{method}: only {hits}/{kept_total} kept patches on the object"


def test_world_governor_is_small_and_identified(governor):
    assert WORLD_GOVERNOR.stat().st_size <= 20 * 2**20
    assert len(governor.model_id) == 64 and governor.grid == (8, 8)
    assert governor.info["scores"]["zeroshot_top1"] > 0.5  # the record travels with the weights
