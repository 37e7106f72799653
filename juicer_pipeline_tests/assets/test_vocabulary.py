"""A class vocabulary of one's own: the file format, its errors, and the stages that use it."""
import pyarrow.parquet as pq
import pytest

from juicer_pipeline.assets.vocabulary import class_vocabulary
from juicer_pipeline.governance.prompts import TEMPLATES
from juicer_pipeline.governance.vocabulary import read_vocabulary_file
from juicer_pipeline.settings import ClassSettings, JuicerSettings

from ..helpers import run_drop, run_governor, write_folder_drop
from ..governance.test_class_extraction import _clear_scene

COCO_STYLE = """# a COCO-style vocabulary: class, then synonyms
star: starfish shape
ring: donut, hoop
Traffic   Light
"""


def test_vocabulary_file_lines_synonyms_and_comments(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text(COCO_STYLE)
    vocab = read_vocabulary_file(path, ("a photo of {}.",))
    assert vocab.names == ("star", "ring", "traffic light")
    assert vocab.synonyms == {"star": ("starfish shape",), "ring": ("donut", "hoop"), "traffic light": ()}
    assert vocab.attributes == () and vocab.templates == ("a photo of {}.",)


@pytest.mark.parametrize("text, message", [("", "at least one class"), ("cat\ndog\ncat\n", "repeat: cat"),
                                           (": kitty\n", "no class name")])
def test_bad_vocabulary_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "classes.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_vocabulary_file(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_vocabulary_file(tmp_path / "absent.txt")


def test_prompt_templates_need_one_slot():
    with pytest.raises(ValueError, match="exactly one"):
        ClassSettings(prompt_templates=["a photo of a thing."])
    default = class_vocabulary(ClassSettings())
    assert "star" in default.names and "red" in default.attributes and default.templates == TEMPLATES


def test_extraction_and_captions_use_the_configured_vocabulary(data_dir, instance, tmp_path):
    vocab_file = tmp_path / "classes.txt"
    vocab_file.write_text("star: starfish shape\nheart\ncircle: disc\n")
    files, rows = {}, []
    for i, (shape, colour) in enumerate([("star", "red"), ("heart", "blue"), ("circle", "yellow"), ("square", "green")]):
        files[f"{i}.png"] = _clear_scene(i, shape, colour)
        rows.append({"image": f"{i}.png", "caption": "my new picture", "sample_id": shape})
    write_folder_drop(data_dir / "drops" / "own", files, rows)
    settings = JuicerSettings(classes=ClassSettings(vocabulary=str(vocab_file), fallback_tau=0.5,
                                                    prompt_templates=["a photo of {}.", "{}."]))
    assert run_governor(data_dir, instance, settings).success
    result = run_drop(data_dir, instance, "own", settings, assets=None)
    assert result.success
    meta = result.asset_materializations_for_node("extracted_classes")[0].metadata
    assert meta["tau"].value == 0.5  # the world's calibration split is labelled with other classes
    classes = pq.read_table(data_dir / "warehouse" / "extracted_classes" / "own.parquet").to_pandas()
    assert all(len(s) == 3 for s in classes.scores)  # one score per configured class
    assert set(c for cs in classes.classes for c in cs) <= {"star", "heart", "circle"}
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["classes_in_vocabulary"].passed


def test_held_out_sets_from_folders_of_ones_own(data_dir, instance, tmp_path):
    from dagster import AssetKey
    from open_clip.tokenizer import SimpleTokenizer

    from juicer_pipeline.definitions import GOVERNOR_JOB_NAME, build_definitions
    from juicer_pipeline.training.evaluation import load_eval_set
    from juicer_pipeline.settings import TrainingSettings

    shapes = [("star", "red"), ("heart", "blue"), ("circle", "yellow"), ("star", "green")]
    files = {f"{i}.png": _clear_scene(i, s, c) for i, (s, c) in enumerate(shapes)}
    retrieval = write_folder_drop(tmp_path / "ret", files, [
        {"image": f"{i}.png", "caption": f"a {c} {s}", "sample_id": str(i)} for i, (s, c) in enumerate(shapes)])
    classification = write_folder_drop(tmp_path / "cls", files, [
        {"image": f"{i}.png", "caption": s, "label": s, "sample_id": str(i)} for i, (s, _) in enumerate(shapes)],
        manifest="csv")
    settings = JuicerSettings(training=TrainingSettings(retrieval_set=str(retrieval),
                                                        classification_set=str(classification)))
    defs = build_definitions(settings, data_dir)
    result = defs.resolve_job_def(GOVERNOR_JOB_NAME).execute_in_process(
        instance=instance, asset_selection=[AssetKey("eval_sets")],
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
    assert result.success
    meta = result.asset_materializations_for_node("eval_sets")[0].metadata
    assert meta["retrieval_images"].value == meta["classification_images"].value == 4
    wh = data_dir / "warehouse" / "eval_sets"
    ev = load_eval_set(wh / "retrieval.parquet", wh / "classification.parquet", SimpleTokenizer(context_length=24), 64,
                       ("star", "heart", "circle"), ())
    assert len(ev.retrieval_images) == 4 and ev.class_labels.tolist() == [0, 1, 2, 0]
