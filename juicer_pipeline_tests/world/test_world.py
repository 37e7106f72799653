import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from juicer_pipeline.world import (CaptionCorruption, DropConfig, generate_corpus, generate_drop, generate_eval_set,
                                   load_vocabulary)
from juicer_pipeline.world.scenes import (CORPUS_BACKGROUNDS, DROP_BACKGROUNDS, Scene, SceneObject, SceneSpec,
                                          pixel_classes, render, sample_scene)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("fmt", ["folder", "wds"])
def test_same_seed_gives_same_bytes(tmp_path, fmt):
    cfg = DropConfig(n_samples=40, seed=7, format=fmt)
    a = generate_drop(tmp_path / "a" / "d", cfg).path
    b = generate_drop(tmp_path / "b" / "d", cfg).path
    c = generate_drop(tmp_path / "c" / "d", replace(cfg, seed=8)).path
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_truth_objects_lie_inside_their_images(tmp_path):
    path = generate_drop(tmp_path / "d", DropConfig(n_samples=60, broken_rate=0.0)).path
    truth = pd.read_parquet(path / "_truth.parquet")
    assert len(truth) == 60
    for row in truth.itertuples():
        mask = np.unpackbits(np.frombuffer(row.object_mask, np.uint8))[: row.width * row.height]
        mask = mask.reshape(row.height, row.width).astype(bool)
        assert 1 <= len(row.objects) <= 3
        assert sorted({o["shape"] for o in row.objects}) == list(row.classes)
        for o in row.objects:
            assert 0 <= o["x0"] < o["x1"] <= row.width and 0 <= o["y0"] < o["y1"] <= row.height
            assert mask[o["y0"]:o["y1"], o["x0"]:o["x1"]].any()
        # every object pixel lies inside some object's box
        ys, xs = np.nonzero(mask)
        inside = np.zeros(len(ys), bool)
        for o in row.objects:
            inside |= (xs >= o["x0"]) & (xs < o["x1"]) & (ys >= o["y0"]) & (ys < o["y1"])
        assert inside.all()


def test_rendered_object_pixels_carry_the_object_colour():
    vocab = load_vocabulary()
    scene = sample_scene(np.random.default_rng(0), SceneSpec(min_objects=1, max_objects=1), vocab)
    r = render(scene, vocab)
    pixels = np.asarray(r.image)[r.mask].astype(int)
    target = np.array(vocab.colours[scene.objects[0].colour])
    assert np.abs(pixels.mean(0) - target).max() < 30


def test_clean_drop_captions_name_every_object(tmp_path):
    cfg = DropConfig(n_samples=50, captions=CaptionCorruption(0, 0, 0, 0), duplicate_rate=0, broken_rate=0,
                     empty_caption_rate=0)
    path = generate_drop(tmp_path / "d", cfg).path
    truth = pd.read_parquet(path / "_truth.parquet")
    manifest = pd.read_parquet(path / "captions.parquet")
    assert (manifest.caption.values == truth.true_caption.values).all()
    for row in truth.itertuples():
        for o in row.objects:
            assert o["shape"] in row.true_caption and o["colour"] in row.true_caption.lower()


def test_corruption_rates_are_honoured(tmp_path):
    cfg = DropConfig(n_samples=400, captions=CaptionCorruption(boilerplate=0.5, noise=0.0, omit=0.0, misaligned=0.0),
                     duplicate_rate=0.1, broken_rate=0.05)
    truth = pd.read_parquet(generate_drop(tmp_path / "d", cfg).path / "_truth.parquet")
    tags = truth.corruptions.explode().value_counts()
    assert 0.4 < tags["boilerplate"] / 400 < 0.6
    assert 0.05 < tags["duplicate"] / 400 < 0.15
    broken = sum(v for k, v in tags.items() if str(k).startswith("broken:"))
    assert 5 <= broken <= 40
    assert "noise" not in tags and "misaligned" not in tags


def test_truth_records_caption_stages_and_noise_kinds(tmp_path):
    from juicer_pipeline.world.captions import NOISE_KINDS

    cfg = DropConfig(n_samples=300, captions=CaptionCorruption(boilerplate=0.5, noise=0.5, omit=0.3, misaligned=0.1),
                     empty_caption_rate=0)
    truth = pd.read_parquet(generate_drop(tmp_path / "d", cfg).path / "_truth.parquet")
    tags = set(truth.corruptions.explode().dropna())
    assert {f"noise:{k}" for k in NOISE_KINDS} <= tags and "noise" not in tags
    for row in truth.itertuples():
        kinds = set(row.corruptions)
        if not kinds & {"misaligned", "omitted_object"}:
            assert row.caption_content == row.true_caption
        if not any(k.startswith("noise:") for k in kinds):
            assert row.caption_before_boilerplate == row.caption_content
        if "boilerplate" in kinds:
            assert row.caption_before_boilerplate in row.caption
        else:
            assert row.caption == row.caption_before_boilerplate


def test_object_coverage_parameter_controls_object_share(tmp_path):
    shares = []
    for cov in (0.1, 0.4):
        cfg = DropConfig(n_samples=80, object_coverage=cov, broken_rate=0, duplicate_rate=0)
        truth = pd.read_parquet(generate_drop(tmp_path / f"c{cov}", cfg).path / "_truth.parquet")
        shares.append(truth.object_pixel_share.mean())
    assert shares[1] > 2.5 * shares[0]


def test_eval_sets_and_corpus(tmp_path):
    cls = generate_eval_set(tmp_path / "cls", "classification", 30).path
    ret = generate_eval_set(tmp_path / "ret", "retrieval", 30).path
    corpus = generate_corpus(tmp_path / "corpus", 30).path
    m = pd.read_parquet(cls / "captions.parquet")
    truth = pd.read_parquet(cls / "_truth.parquet")
    assert m.label.notna().all() and (truth.objects.map(len) == 1).all()
    assert list(m.label) == [o[0]["shape"] for o in truth.objects]
    assert len(pd.read_parquet(ret / "captions.parquet")) == 30
    # disjoint seed spaces: no image is shared between corpus, eval sets and a drop
    drop = generate_drop(tmp_path / "drop", DropConfig(n_samples=30, broken_rate=0)).path
    hashes = [{hashlib.sha256(p.read_bytes()).hexdigest() for p in (d / "images").iterdir()}
              for d in (cls, ret, corpus, drop)]
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            assert not hashes[i] & hashes[j]


def test_corpus_distribution_differs_from_drops():
    vocab = load_vocabulary()
    rng = np.random.default_rng(0)
    corpus = [sample_scene(rng, SceneSpec(backgrounds=CORPUS_BACKGROUNDS), vocab).background for _ in range(50)]
    drop = [sample_scene(rng, SceneSpec(), vocab).background for _ in range(50)]
    assert set(corpus) <= set(CORPUS_BACKGROUNDS) and set(drop) <= set(DROP_BACKGROUNDS)
    assert not set(CORPUS_BACKGROUNDS) & set(DROP_BACKGROUNDS)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="broken_rate"):
        DropConfig(broken_rate=1.5)
    with pytest.raises(ValueError, match="format"):
        generate_drop(Path("/tmp/never-written"), DropConfig(n_samples=1, format="zip"))
    with pytest.raises(ValueError, match="size_jitter"):
        DropConfig(size_jitter=(1.2, 0.8))
    with pytest.raises(ValueError, match="coverage_shared_by"):
        DropConfig(coverage_shared_by=-1)


def test_size_jitter_sets_the_spread_of_object_sizes():
    """The drop's objects vary in size by the configured factor around the coverage's size (the
    student benchmark's `--size-jitter` world lever)."""
    vocab = load_vocabulary()
    rng = np.random.default_rng(0)

    def sizes(jitter):
        spec = replace(DropConfig(size_jitter=jitter), shared_colour=0.0).spec
        return [o.size / (spec.object_coverage * 64 * 64 / spec.coverage_shared_by / 3.2) ** 0.5
                for sc in (sample_scene(rng, spec, vocab) for _ in range(200)) for o in sc.objects]

    fixed, wide = np.array(sizes((1.0, 1.0))), np.array(sizes((0.5, 1.5)))
    assert np.allclose(fixed, 1.0)
    assert wide.min() >= 0.5 - 1e-9 and wide.max() <= 1.5 + 1e-9 and wide.std() > 0.2


def test_coverage_shared_by_sizes_objects_whatever_their_count():
    """By default every object has the size of one of two, as the held-out classification set's
    single objects do; with coverage_shared_by=0 a lone object takes the whole coverage (twice
    the area of each of two)."""
    vocab = load_vocabulary()
    rng = np.random.default_rng(1)

    def radii_by_count(**kw):
        spec = DropConfig(size_jitter=(1.0, 1.0), **kw).spec
        out: dict[int, set[float]] = {}
        for _ in range(120):
            scene = sample_scene(rng, spec, vocab)
            out.setdefault(len(scene.objects), set()).update(round(o.size, 6) for o in scene.objects)
        return out

    shared, fixed = radii_by_count(coverage_shared_by=0), radii_by_count()
    assert set(shared) == set(fixed) == {1, 2, 3}
    assert len({r for rs in fixed.values() for r in rs}) == 1
    assert min(shared[1]) > max(shared[2]) > max(shared[3])
    assert fixed[1] == shared[2]


def test_instance_map_splits_the_union_mask_into_the_objects():
    """The instance map covers exactly the union mask, each object's visible pixels lie inside its
    unoccluded box, and the class map names each object's shape."""
    vocab = load_vocabulary()
    rng = np.random.default_rng(3)
    spec = SceneSpec(min_objects=2, max_objects=3, object_coverage=0.5)
    for _ in range(40):
        scene = sample_scene(rng, spec, vocab)
        r = render(scene, vocab)
        assert r.instances.dtype == np.uint8 and r.instances.max() <= len(scene.objects)
        objects = [r.object_mask(i) for i in range(len(scene.objects))]
        assert np.array_equal(np.logical_or.reduce(objects), r.mask)
        assert (np.sum(objects, axis=0) <= 1).all()  # one object per pixel: the top-most
        for m, (x0, y0, x1, y1) in zip(objects, r.boxes):
            ys, xs = np.nonzero(m)
            assert ((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)).all()
        classes = pixel_classes(scene, r, vocab.shapes)
        assert np.array_equal(classes > 0, r.mask)
        for i, o in enumerate(scene.objects):
            assert (classes[objects[i]] == vocab.shapes.index(o.shape) + 1).all()


def test_the_later_of_two_overlapping_objects_owns_their_overlap():
    vocab = load_vocabulary()
    below = SceneObject("square", "red", 28.0, 32.0, 12.0, 0.0)
    above = SceneObject("circle", "blue", 36.0, 32.0, 12.0, 0.0)
    r = render(Scene("noise", 5, (below, above), 64, n_specks=0), vocab)
    overlap = render(Scene("noise", 5, (below,), 64), vocab).mask & r.object_mask(1)
    assert overlap.sum() > 50 and not r.object_mask(0)[overlap].any()
    pixels = np.asarray(r.image)[overlap].astype(int)
    assert np.abs(pixels.mean(0) - np.array(vocab.colours["blue"])).max() < 30
