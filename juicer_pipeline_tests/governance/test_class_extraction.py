"""Classes reach captions: the committed world governor on hand-made world scenes, end to end."""
import io

import numpy as np
import pyarrow.parquet as pq
import pytest

from juicer_pipeline.world.calibration import calibrate_world_governor
from juicer_pipeline.governance.classes import NEVER, CropPlan, calibrate_tau
from juicer_pipeline.governance.prompts import abstain_embedding, class_embeddings
from juicer_pipeline.models.loader import load_foundation_model
from juicer_pipeline.settings import ClassSettings, JuicerSettings
from juicer_pipeline.world.scenes import Scene, SceneObject, render
from juicer_pipeline.world.vocabulary import load_vocabulary

from ..helpers import run_drop, run_governor, write_folder_drop

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "hexagon", "arrow")
COLOURS = ("red", "blue", "yellow", "green", "purple", "orange", "cyan", "pink")


def _clear_scene(i: int, shape: str, colour: str) -> bytes:
    """One mid-sized object, centred-ish, on a drop background: the clearest case there is."""
    scene = Scene(background=("noise", "gradient", "stripes")[i % 3], bg_seed=1000 + i,
                  objects=(SceneObject(shape, colour, cx=30.0 + 3 * (i % 3), cy=33.0 - 2 * (i % 2), size=14.0,
                                       rotation=0.3 * i),), image_size=64, n_specks=8)
    buf = io.BytesIO()
    render(scene, load_vocabulary()).image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world_governor():
    return load_foundation_model("world")


@pytest.fixture(scope="module")
def clear_drop(tmp_path_factory):
    """The clear scenes juiced once for the tests that read them."""
    from dagster import instance_for_test

    data_dir = tmp_path_factory.mktemp("clear") / "data"
    with pytest.MonkeyPatch.context() as mp, instance_for_test() as instance:
        mp.setenv("JUICER_DATA_DIR", str(data_dir))
        mp.delenv("JUICER_CONFIG", raising=False)
        return _juice_clear_drop(data_dir, instance)


def _juice_clear_drop(data_dir, instance):
    files, rows = {}, []
    for i, (shape, colour) in enumerate(zip(SHAPES, COLOURS)):
        files[f"img/{i}.png"] = _clear_scene(i, shape, colour)
        # captions that name no object: whatever class reaches them came from the image
        rows.append({"image": f"img/{i}.png", "caption": "<p>IMG_2041.JPG - my new picture | buy now!!</p>",
                     "sample_id": shape})
    write_folder_drop(data_dir / "drops" / "clear", files, rows)
    settings = JuicerSettings(classes=ClassSettings(calibration_images=300))
    assert run_governor(data_dir, instance, settings).success
    result = run_drop(data_dir, instance, "clear", settings, assets=None)
    assert result.success
    wh = data_dir / "warehouse"
    classes = pq.read_table(wh / "extracted_classes" / "clear.parquet").to_pandas().set_index("sample_id")
    captions = pq.read_table(wh / "enriched_captions" / "clear.parquet").to_pandas().set_index("sample_id")
    tau = result.asset_materializations_for_node("extracted_classes")[0].metadata["tau"].value
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    return classes, captions, tau, checks["similarity_not_worse"]


def test_clear_single_objects_get_their_class_into_the_caption(clear_drop):
    classes, captions, tau, similarity = clear_drop
    assert tau < NEVER  # calibration reached its target: classes can be extracted at all
    for shape in SHAPES:
        sid = f"clear/{shape}"
        assert shape in classes.classes[sid], f"{shape}: extracted {list(classes.classes[sid])}"
        assert shape in captions.enriched_caption[sid].lower()
        assert captions.caption_version[sid] == "enriched" and shape in captions.classes_used[sid]
    # naming the object brings caption and image closer in the governor's own space
    assert similarity.passed and similarity.metadata["mean_after"].value > similarity.metadata["mean_before"].value
    assert (captions.sim_after > captions.sim_before).mean() >= 0.75


def test_a_class_below_tau_never_lands_in_a_caption(clear_drop):
    classes, captions, tau, _ = clear_drop
    names = list(load_vocabulary().shapes)
    below_seen = 0
    for sid, row in classes.iterrows():
        scores = np.asarray(row.scores)
        below = {names[i] for i in np.where(scores < tau)[0]}
        below_seen += len(below)
        assert not below & set(row.classes)
        assert not below & set(captions.classes_used[sid])
        # and what was added is exactly the extracted classes the caption did not mention
        assert set(captions.classes_used[sid]) <= set(row.classes)
    assert below_seen > 0  # the assertion above was exercised


def test_calibration_reports_the_tau_it_chose(world_governor):
    vocab = load_vocabulary()
    class_emb = class_embeddings(world_governor.encode_text, list(vocab.shapes), vocab.colour_names)
    defaults = ClassSettings()
    result = calibrate_world_governor(world_governor, class_emb, "attention_rollout", CropPlan(), 0.9, 3,
                                      n_images=300, abstain_emb=abstain_embedding(world_governor.encode_text),
                                      addition=(defaults.caption_false_share, defaults.caption_claim))
    assert result["reached"] and result["tau"] < NEVER and result["precision"] >= 0.9
    assert result["recall"] > 0.3 and result["n_images"] == 300


def test_calibration_picks_the_smallest_tau_that_reaches_the_target():
    # three images, one true class each; the third image's score for a wrong class is 0.6
    scores = np.array([[0.95, 0.0], [0.0, 0.7], [0.6, 0.5]])
    truth = [{0}, {1}, {1}]
    chosen = calibrate_tau(scores, truth, target_precision=0.99, k=1)
    assert chosen["reached"] and chosen["tau"] == pytest.approx(0.61) and chosen["recall"] == pytest.approx(2 / 3)
    never = calibrate_tau(np.array([[0.9, 0.95]]), [{0}], target_precision=0.9, k=1)
    assert not never["reached"] and never["tau"] == NEVER
