"""The truth report's caption metrics on hand-built truth, where every count is known."""
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from juicer_pipeline.governance.caption_refiner import RulesRefiner
from juicer_pipeline.world import CaptionCorruption, DropConfig, generate_drop
from juicer_pipeline.world.truth_metrics import world_object_vocabulary, enrichment_table, rectification_table


def _write(tmp_path, rows: list[dict]):
    """rows: sample truth (classes, corruptions, caption stages) plus the pipeline's caption columns."""
    truth = pd.DataFrame([{"sample_id": r["id"], "classes": r["classes"], "corruptions": r.get("corruptions", []),
                           "caption": r["raw"], "caption_content": r.get("content", r["raw"]),
                           "caption_before_boilerplate": r.get("before_bp", r.get("content", r["raw"]))}
                          for r in rows])
    drop = tmp_path / "d"
    drop.mkdir()
    truth.to_parquet(drop / "_truth.parquet", index=False)
    caps = pa.table({"sample_id": [f"d/{r['id']}" for r in rows], "raw_caption": [r["raw"] for r in rows],
                     "enriched_caption": [r["out"] for r in rows],
                     "classes_used": pa.array([r.get("used", []) for r in rows], pa.list_(pa.string()))})
    pq.write_table(caps, tmp_path / "caps.parquet")
    return drop, tmp_path / "caps.parquet"


ENRICHED = [
    dict(id="a", classes=["circle", "star"], raw="A red star.", out="A red star, with a circle.", used=["circle"]),
    dict(id="b", classes=["star"], raw="A red star.", out="A red star, with a square.", used=["square"]),
    dict(id="c", classes=["heart", "star"], raw="A red star.", out="A red star."),  # heart missed
    dict(id="d", classes=["ring"], raw="A blue ring.", out="A blue ring."),  # named already: nothing to do
    dict(id="e", classes=["heart"], raw="", out="A photo of a heart and a star.", used=["heart", "star"]),
]


def test_enrichment_table_counts_true_false_and_missed_per_class(tmp_path):
    t = enrichment_table(*_write(tmp_path, ENRICHED), "d").set_index("class")
    assert t.loc["total", ["added_true", "added_false", "missed"]].tolist() == [2, 2, 1]
    assert t.loc["circle", ["in_images", "lacking", "added_true", "added_false", "missed"]].tolist() == [1, 1, 1, 0, 0]
    assert t.loc["heart", ["in_images", "lacking", "added_true", "missed"]].tolist() == [2, 2, 1, 1]
    assert t.loc["heart", "filled"] == 0.5 and t.loc["heart", "precision"] == 1.0
    assert t.loc["star", ["in_images", "added_true", "added_false", "missed"]].tolist() == [3, 0, 1, 0]
    assert t.loc["star", "false_rate"] == pytest.approx(1 / 2)  # added to e, of the 2 captions without a star
    assert t.loc["square", "precision"] == 0.0 and t.loc["square", "false_rate"] == pytest.approx(1 / 5)
    assert pd.isna(t.loc["ring", "precision"])  # never added: no precision, not a perfect one
    assert t.loc["total", "precision"] == 0.5 and t.loc["total", "filled"] == pytest.approx(2 / 3)


RECTIFIED = [
    dict(id="c1", classes=["star"], raw="A red star.", out="A red star."),
    dict(id="c2", classes=["ring", "star"], raw="A photo of a blue ring.", out="A photo of a blue ring, with a star.",
         used=["star"]),  # enrichment alone: the rectified caption is unchanged
    dict(id="c3", classes=["star"], raw="A red star.", out="A red sta."),  # rectification damaged a clean caption
    dict(id="n1", classes=["star"], corruptions=["noise:casing_upper"], raw="A RED STAR.", content="A red star.",
         out="A red star."),
    dict(id="n2", classes=["square"], corruptions=["noise:typos"], raw="A red sqaure.", content="A red square.",
         out="A red sqaure."),
    dict(id="n3", classes=["star"], corruptions=["noise:punctuation"], raw="A red star!!!", content="A red star.",
         out="A red star!!!"),
    dict(id="n4", classes=["star"], corruptions=["noise:punctuation"], raw="A red star...", content="A red star.",
         out="A red star."),
    dict(id="b1", classes=["star"], corruptions=["boilerplate"], raw="<p>A red star.</p>", content="A red star.",
         out="A red star."),
    dict(id="b2", classes=["star"], corruptions=["boilerplate"], raw="A red star. Click here to download.",
         content="A red star.", out="A red star. Click here."),  # boilerplate words left
    dict(id="b3", classes=["star"], corruptions=["boilerplate"], raw="Stock photo: A red star.", content="A red star.",
         out="Red star."),  # an intact word went with the boilerplate
    dict(id="o1", classes=["circle", "star"], corruptions=["omitted_object"], raw="A red star.", content="A red star.",
         out="A red star, with a circle.", used=["circle"]),
    dict(id="o2", classes=["circle", "star"], corruptions=["omitted_object"], raw="A red star.", content="A red star.",
         out="A red star."),
    dict(id="o3", classes=["star"], corruptions=["omitted_object"], raw="A red star.", content="A red star.",
         out="A red star."),  # a second star was omitted: its class is still named, nothing to repair
    dict(id="m1", classes=["ring"], corruptions=["misaligned"], raw="A red star.", out="A red star, with a ring.",
         used=["ring"]),  # the foreign star stays
    dict(id="e1", classes=["star"], corruptions=["boilerplate", "empty_caption"], raw="", content="A red star.",
         out="A photo of a star.", used=["star"]),  # empty replaced the text: only empty_caption counts
    dict(id="x1", classes=["star"], corruptions=["duplicate", "broken:truncated"], raw="A red star.",
         out="A red star."),  # image damage only: a clean caption
]


def test_rectification_table_scores_each_damage_and_counts_damaged_clean_captions(tmp_path):
    r = rectification_table(*_write(tmp_path, RECTIFIED), "d")
    got = {row.damage: (row.captions, row.repaired) for row in r["kinds"].itertuples()}
    assert got == {"noise:casing_upper": (1, 1), "noise:typos": (1, 0), "noise:punctuation": (2, 1),
                   "boilerplate": (3, 1), "omitted_object": (2, 1), "misaligned": (1, 0), "empty_caption": (1, 1)}
    assert (r["clean"], r["clean_changed"]) == (4, 1)
    assert r["clean_changed_share"] == 0.25 and r["examples"] == [("A red star.", "A red sta.")]


def test_rules_refiner_on_a_world_drop_leaves_clean_captions_alone(tmp_path):
    """The metric and the refiner against each other on generated truth: casing and punctuation
    are the rules' to repair in full, clean captions must come out unchanged."""
    cfg = DropConfig(n_samples=300, seed=3, captions=CaptionCorruption(boilerplate=0.3, noise=0.4, omit=0.3))
    drop = generate_drop(tmp_path / "d", cfg).path
    truth = pd.read_parquet(drop / "_truth.parquet")
    refined = RulesRefiner(world_object_vocabulary()).refine(list(truth.caption), [list(c) for c in truth.classes])
    pq.write_table(pa.table({"sample_id": [f"d/{s}" for s in truth.sample_id], "raw_caption": list(truth.caption),
                             "enriched_caption": [x.text for x in refined],
                             "classes_used": [x.classes_used for x in refined]}), tmp_path / "caps.parquet")
    r = rectification_table(drop, tmp_path / "caps.parquet", "d")
    share = r["kinds"].set_index("damage").share
    assert r["clean"] > 50 and r["clean_changed"] == 0
    assert share["noise:casing_upper"] == share["noise:casing_lower"] == share["noise:punctuation"] == 1.0
    assert share["omitted_object"] == 1.0  # oracle classes: every lost class is added back
    assert 0 < share["noise:typos"] < 1  # the rules repair vocabulary words only


def test_old_truth_without_caption_stages_is_said_so(tmp_path):
    drop, caps = _write(tmp_path, ENRICHED)
    pd.read_parquet(drop / "_truth.parquet").drop(columns=["caption_content"]).to_parquet(drop / "_truth.parquet")
    assert rectification_table(drop, caps, "d") is None
