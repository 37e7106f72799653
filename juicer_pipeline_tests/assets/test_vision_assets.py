"""The vision assets through Dagster, with a tiny governor built from config (no download)."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from juicer_pipeline.models.loader import cached_foundation_model, save_world_clip
from juicer_pipeline.models.world_clip import build_clip, tiny_arch
from juicer_pipeline.settings import ClassSettings, GovernorSettings, JuicerSettings, SaliencySettings
from juicer_pipeline.storage import Catalog
from juicer_pipeline.world import DropConfig, generate_drop

from ..helpers import code_versions, run_drop, run_governor


@pytest.fixture
def tiny_settings(data_dir) -> JuicerSettings:
    torch.manual_seed(0)
    arch = tiny_arch(image_size=64, conv_stem=True)
    path = data_dir / "tiny_governor.safetensors"
    save_world_clip(build_clip(arch), arch, path, {"note": "random init, for tests"})
    return JuicerSettings(governor=GovernorSettings(source=f"file:{path}", batch_size=64),
                          classes=ClassSettings(calibration_images=100))


@pytest.fixture
def juiced(data_dir, instance, tiny_settings):
    generate_drop(data_dir / "drops" / "v1", DropConfig(n_samples=80, broken_rate=0.05, seed=5))
    assert run_governor(data_dir, instance, tiny_settings).success
    fm = cached_foundation_model(tiny_settings.governor.source, "cpu")
    seen = []
    handle = fm.model.visual.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        result = run_drop(data_dir, instance, "v1", tiny_settings, assets=None)
    finally:
        handle.remove()
    return result, seen


def _meta(result, node):
    return {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}


def test_one_full_image_pass_per_image_across_all_stages(data_dir, juiced):
    result, seen = juiced
    saliency, classes = _meta(result, "patch_saliency"), _meta(result, "extracted_classes")
    valid = _meta(result, "raw_samples")["valid"]
    assert saliency["images"] == saliency["full_image_forward_passes"] == valid
    # every vision-tower call is either the one full-image pass or a counted region crop
    assert sum(seen) == valid + classes["region_crop_forward_passes"]
    assert _meta(result, "sieve_scores")["samples"] == valid


def test_outputs_and_catalog(data_dir, juiced):
    result, _ = juiced
    wh = data_dir / "warehouse"
    pruned = pq.read_table(wh / "pruned_images" / "v1.parquet").to_pandas()
    assert (pruned.n_kept == 32).all() and (pruned.n_patches == 64).all()
    assert pruned.kept.map(len).eq(32).all()
    meta = _meta(result, "pruned_images")
    assert meta["tokens_after"] == 32 * len(pruned) and meta["preview"].count("data:image/png;base64") == 4
    classes = pq.read_table(wh / "extracted_classes" / "v1.parquet").to_pandas()
    tau = _meta(result, "extracted_classes")["tau"]
    assert classes.classes.map(len).le(3).all()  # what gets extracted, and τ: test_class_extraction.py
    cat = Catalog(data_dir / "catalog.duckdb")
    models = cat.query("SELECT * FROM models")
    assert len(models) == 1 and models.role[0] == "governor" and models.tau[0] == tau
    lineage = cat.query("SELECT artifact, governor_id FROM lineage ORDER BY artifact")
    assert {"patch_saliency/v1", "pruned_images/v1", "extracted_classes/v1", "sieve_scores/v1", "governor"} <= set(
        lineage.artifact)
    assert lineage.governor_id.dropna().nunique() == 1
    # the catalog's views answer per-sample questions over the Parquet files
    joined = cat.query("SELECT count(*) AS n FROM pruned_images p JOIN sieve_scores s USING (sample_id)")
    assert joined.n[0] == len(pruned)


def test_changing_rho_changes_only_the_decision_stages(data_dir, tiny_settings):
    from juicer_pipeline.definitions import build_definitions

    a = build_definitions(tiny_settings, data_dir)
    b = build_definitions(tiny_settings.model_copy(update={"saliency": SaliencySettings(rho=0.25)}), data_dir)
    va, vb = code_versions(a), code_versions(b)
    changed = {k for k in va if va[k] != vb[k]}
    # flip's random K follows ρ too; the export writes the kept sets (resampled on extra grids by ρ)
    assert changed == {"pruned_images", "clip_checkpoint", "juiced_dataset"}
    c = build_definitions(tiny_settings.model_copy(update={"saliency": SaliencySettings(method="cls_attention")}),
                          data_dir)
    vc = code_versions(c)
    # classes cut regions from their own map; training reads the map itself when the student's
    # patch grid differs from the governor's (kept sets are then re-selected on the student's grid)
    assert {k for k in va if va[k] != vc[k]} == {"pruned_images", "clip_checkpoint", "juiced_dataset"}
    d = build_definitions(tiny_settings.model_copy(update={"classes": tiny_settings.classes.model_copy(
        update={"saliency_method": "cls_attention"})}), data_dir)
    vd = code_versions(d)
    # both τs are calibrated on those crops, and the addition τ decides what captions gain
    assert {k for k in va if va[k] != vd[k]} == {"extracted_classes", "governor", "enriched_captions"}


def test_corrupt_stored_embedding_fails_the_stage_loudly(data_dir, instance, juiced, tiny_settings):
    path = data_dir / "warehouse" / "patch_saliency" / "v1.parquet"
    table = pq.read_table(path)
    emb = table.column("embedding").to_pylist()
    emb[3] = emb[3][:5]
    pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding",
                                    pa.array(emb, pa.list_(pa.float32()))), path)
    result = run_drop(data_dir, instance, "v1", tiny_settings, assets=("sieve_scores",), raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    text = str(failure.step_failure_data.error.to_string())
    assert "embedding of sample" in text and "has 5 values" in text


def test_enriched_captions_and_truth_report(data_dir, juiced, tiny_settings):
    from juicer_pipeline.truth_report import truth_report
    from juicer_pipeline.storage import Warehouse

    result, _ = juiced
    meta = _meta(result, "enriched_captions")
    captions = pq.read_table(data_dir / "warehouse" / "enriched_captions" / "v1.parquet").to_pandas()
    assert len(captions) == meta["captions"] == _meta(result, "raw_samples")["valid"]
    assert captions.enriched_caption.str.len().gt(0).all()
    assert not captions.enriched_caption.str.contains("<|http|IMG_", regex=True).any()
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["coverage"].passed and checks["retention"].passed and checks["no_empty_caption"].passed
    _assert_enrichment_by_class(meta["enrichment_by_class"], captions,
                                pq.read_table(data_dir / "warehouse" / "extracted_classes" / "v1.parquet").to_pandas())
    report = truth_report(Warehouse(data_dir), "v1", 0.5, tiny_settings)
    print(report)
    for word in ("cls_attention", "attention_rollout", "smoothed_rollout", "token_distinctiveness", "random", "classes vs truth",
                 "captions mentioning every true object", "pooled-embedding alternative", "enrichment vs truth",
                 "added_false", "rectification vs truth", "noise:casing_upper", "boilerplate",
                 "clean captions changed by rectification"):
        assert word in report


def _assert_enrichment_by_class(table, captions, extracted):
    """The asset's per-class table (no truth) holds the counts the stored captions and classes give."""
    from collections import Counter

    from juicer_pipeline.assets.text import object_vocabulary

    rows = {r.data["class"]: r.data for r in table.records}
    assert [c.name for c in table.schema.columns] == ["class", "extracted", "added", "extracted_not_added",
                                                      "already_named"]
    added = Counter(c for used in captions.classes_used for c in used)
    got = Counter(c for cls in extracted[extracted.sample_id.isin(captions.sample_id)].classes for c in cls)
    ex_by_id = [set(extracted.set_index("sample_id").classes[sid]) for sid in captions.sample_id]
    assert {k: v["added"] for k, v in rows.items() if v["added"]} == dict(added)
    assert {k: v["extracted"] for k, v in rows.items() if v["extracted"]} == dict(got)
    # what is added is decided per region at its own τ: not always among the extracted classes
    assert all(v["extracted_not_added"] == len([1 for cls, used in zip(ex_by_id, captions.classes_used)
                                                 if k in cls and k not in used]) for k, v in rows.items())
    vocab = object_vocabulary(ClassSettings())
    named = Counter(c for text, used in zip(captions.enriched_caption, captions.classes_used)
                    for c in vocab.mentioned(text) - set(used))
    assert {k: v["already_named"] for k, v in rows.items() if v["already_named"]} == dict(named) != {}


def test_failing_check_names_the_offending_samples(data_dir, instance, juiced, tiny_settings):
    path = data_dir / "warehouse" / "extracted_classes" / "v1.parquet"
    table = pq.read_table(path).to_pandas()
    victim = table.sample_id[2]
    pq.write_table(pa.Table.from_pandas(table.drop(index=2), preserve_index=False), path)
    result = run_drop(data_dir, instance, "v1", tiny_settings, assets=("enriched_captions",))
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks["coverage"].passed
    assert victim in checks["coverage"].metadata["missing_extracted_classes"].value


def test_rho_change_makes_automation_rerun_only_pruned_images(data_dir, instance, juiced, tiny_settings):
    """Declarative automation after a juiced drop: nothing to do; after ρ changes, exactly the
    pruned_images partition is requested (saliency, classes, captions are not recomputed)."""
    from dagster import AssetKey, AssetSelection, evaluate_automation_conditions

    from juicer_pipeline.definitions import build_definitions

    per_drop = ["raw_samples", "patch_saliency", "pruned_images", "extracted_classes", "sieve_scores",
                "enriched_captions"]
    selection = AssetSelection.assets(*per_drop)
    before = build_definitions(tiny_settings, data_dir)
    first = evaluate_automation_conditions(before, instance, asset_selection=selection)
    again = evaluate_automation_conditions(before, instance, asset_selection=selection, cursor=first.cursor)
    assert again.total_requested == 0  # nothing changed: nothing recomputed
    after = build_definitions(tiny_settings.model_copy(update={"saliency": SaliencySettings(rho=0.25)}), data_dir)
    changed = evaluate_automation_conditions(after, instance, asset_selection=selection, cursor=again.cursor)
    requested = {a: changed.get_requested_partitions(AssetKey(a)) for a in per_drop}
    assert requested["pruned_images"] == {"v1"}
    assert all(not v for a, v in requested.items() if a != "pruned_images")


def test_every_crop_pass_is_counted_with_several_margins(data_dir, instance, tiny_settings):
    settings = tiny_settings.model_copy(update={"classes": tiny_settings.classes.model_copy(
        update={"crop_margins": [0.2, 0.45]})})
    generate_drop(data_dir / "drops" / "m2", DropConfig(n_samples=30, broken_rate=0.0, seed=6))
    assert run_governor(data_dir, instance, settings).success
    run_drop(data_dir, instance, "m2", settings, assets=("raw_samples", "patch_saliency"))
    fm = cached_foundation_model(settings.governor.source, "cpu")
    seen = []
    handle = fm.model.visual.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        result = run_drop(data_dir, instance, "m2", settings, assets=("extracted_classes",))
    finally:
        handle.remove()
    meta = _meta(result, "extracted_classes")
    assert meta["region_crop_forward_passes"] == sum(seen) > 0
    # two margins at four quarter turns (the world's shapes are drawn at any rotation): 8 crops per region
    assert meta["region_crop_forward_passes"] % 8 == 0
