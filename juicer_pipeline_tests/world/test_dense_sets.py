import hashlib
import re
from dataclasses import replace

import numpy as np
import pytest

from juicer_pipeline.world import DropConfig, generate_drop, generate_eval_set, load_vocabulary
from juicer_pipeline.world.dense_sets import (COUNTS, FIT, SCORE, DenseSetSizes, binding_set, dense_sets,
                                              objects_separate)
from juicer_pipeline.world.scenes import render

SMALL = DenseSetSizes(scenes=60, area_control=60, binding=20)


@pytest.fixture(scope="module")
def sets():
    return dense_sets(seed=0, sizes=SMALL)


def _hashes(images: np.ndarray) -> set[str]:
    return {hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images}


def test_same_seed_same_sets_and_the_parts_differ(sets):
    again = dense_sets(seed=0, sizes=SMALL)
    assert np.array_equal(sets.scenes[SCORE].images, again.scenes[SCORE].images)
    assert np.array_equal(sets.binding.images, again.binding.images)
    assert not _hashes(sets.scenes[FIT].images) & _hashes(sets.scenes[SCORE].images)
    assert not _hashes(sets.area_control[FIT].images) & _hashes(sets.area_control[SCORE].images)
    other = dense_sets(seed=1, sizes=SMALL)
    assert not np.array_equal(sets.scenes[FIT].images, other.scenes[FIT].images)


def test_dense_images_are_never_drop_or_held_out_images(sets, tmp_path):
    """Seed spaces of their own: pixel for pixel, no dense image is a drop's or a held-out set's."""
    from PIL import Image

    folders = [generate_drop(tmp_path / "drop", DropConfig(n_samples=60, broken_rate=0, duplicate_rate=0,
                                                                  image_format="png")).path,
               generate_eval_set(tmp_path / "ret", "retrieval", 60).path]
    seen = _hashes(np.stack([np.asarray(Image.open(p).convert("RGB")) for f in folders
                             for p in sorted((f / "images").iterdir())]))
    dense = set().union(*(_hashes(s.images) for s in (*sets.scenes.values(), *sets.area_control.values())))
    dense |= _hashes(sets.binding.images.reshape(-1, *sets.binding.images.shape[2:]))
    assert len(seen) == 120 and not dense & seen


def test_segmentation_labels_cover_background_and_every_shape(sets):
    seg = sets.scenes[FIT]
    assert seg.images.shape[:3] == seg.pixel_classes.shape and seg.pixel_classes.dtype == np.uint8
    present = np.unique(np.concatenate([s.pixel_classes.ravel() for s in sets.scenes.values()]))
    assert list(present) == list(range(len(sets.class_names) + 1))
    assert 0.6 < (seg.pixel_classes == 0).mean() < 0.95  # the background is most, not all, of a drop image


def _area_only_count_accuracy(fit, score) -> float:
    """How well the union area alone tells the count: nearest mean area, fitted on one part."""
    means = np.array([fit.object_pixels[fit.counts == c].mean() for c in COUNTS])
    guess = np.array(COUNTS)[np.abs(score.object_pixels[:, None] - means[None]).argmin(1)]
    return float((guess == score.counts).mean())


def test_counting_sets_are_balanced_and_the_control_hides_the_count_in_the_area(sets):
    for family in (sets.scenes, sets.area_control):
        for part in (FIT, SCORE):
            assert np.bincount(family[part].counts).tolist() == [0, 20, 20, 20]
    plain = [sets.scenes[SCORE].object_pixels[sets.scenes[SCORE].counts == c].mean() for c in COUNTS]
    control = [sets.area_control[SCORE].object_pixels[sets.area_control[SCORE].counts == c].mean() for c in COUNTS]
    assert plain[0] * 2 < plain[2]  # the plain scenes: area grows with the count
    assert max(control) / min(control) < 1.03  # the control: the same total area for every count
    assert _area_only_count_accuracy(sets.scenes[FIT], sets.scenes[SCORE]) > 0.65
    assert _area_only_count_accuracy(sets.area_control[FIT], sets.area_control[SCORE]) < 0.5


def test_counting_objects_lie_apart_so_the_count_is_unambiguous(sets):
    for family in (sets.scenes, sets.area_control):
        for s in family.values():
            assert [len(sc.objects) for sc in s.scenes] == list(s.counts)
            assert all(objects_separate(sc.objects) for sc in s.scenes)


def test_binding_pairs_differ_only_in_colour():
    vocab = load_vocabulary()
    b = binding_set(DropConfig().spec, 25, 0, vocab)
    for (first, second), (cap_a, cap_b), images in zip(b.scenes, b.captions, b.images):
        (a1, a2), (b1, b2) = first.objects, second.objects
        assert a1.shape != a2.shape and a1.colour != a2.colour
        assert (b1.colour, b2.colour) == (a2.colour, a1.colour)
        assert [replace(o, colour="") for o in first.objects] == [replace(o, colour="") for o in second.objects]
        masks = [render(s, vocab).instances for s in (first, second)]
        assert np.array_equal(masks[0], masks[1])
        changed = (images[0] != images[1]).any(-1)
        assert changed.any() and not changed[masks[0] == 0].any()  # the background is untouched
        assert cap_a != cap_b and sorted(_words(cap_a)) == sorted(_words(cap_b))
        swapped = [{a1.colour: a2.colour, a2.colour: a1.colour}.get(w, w) for w in _words(cap_a)]
        assert swapped == _words(cap_b)


def _words(caption: str) -> list[str]:
    """The caption's words, articles alike ('a' and 'an' follow the colour, which moves)."""
    return ["a" if w == "an" else w for w in re.findall(r"[a-z]+", caption.lower())]
