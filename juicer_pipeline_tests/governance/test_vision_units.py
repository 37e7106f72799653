"""Pure vision-branch pieces: pruning decisions, attention capture, regions, classes, τ, loading."""
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from juicer_pipeline.governance.classes import (NEVER, TAU_GRID, CropPlan, calibrate_addition_tau, calibrate_tau,
                                                calibrate_tau_per_class, crop_probs, decide_classes, image_regions,
                                                region_class_scores, region_crops, region_mask, salient_regions,
                                                square_box)
from juicer_pipeline.governance.pruning import keep_random, keep_top, kept_count
from juicer_pipeline.governance.saliency import VisionPass, _block_attention
from juicer_pipeline.governance.vision import CorruptStoredRow, stored_vectors
from juicer_pipeline.models import ModelNotFound, build_clip, load_foundation_model, tiny_arch


@pytest.mark.parametrize("n,rho", [(64, 0.5), (64, 0.25), (49, 0.5), (196, 0.3), (10, 0.01), (64, 1.0)])
def test_kept_count_is_ceil_rho_n(n, rho):
    sal = np.random.default_rng(0).random(n)
    kept = keep_top(sal, rho)
    assert len(kept) == math.ceil(rho * n) == kept_count(n, rho)
    assert len(keep_random(n, rho, np.random.default_rng(1))) == math.ceil(rho * n)
    assert (np.diff(kept) > 0).all()  # raster order, no repeats


def test_rho_one_keeps_everything_and_top_means_most_salient():
    sal = np.array([0.1, 0.9, 0.5, 0.7])
    assert keep_top(sal, 1.0).tolist() == [0, 1, 2, 3]
    assert keep_top(sal, 0.5).tolist() == [1, 3]
    with pytest.raises(ValueError):
        keep_top(sal, 0.0)


def test_captured_attention_matches_need_weights_true():
    torch.manual_seed(0)
    model = build_clip(tiny_arch()).eval()
    blk = model.visual.transformer.resblocks[-1]
    x = torch.randn(3, 17, 32)
    mine = _block_attention(blk, x)
    y = blk.ln_1(x)
    _, ref = blk.attn(y, y, y, need_weights=True, average_attn_weights=True)
    assert torch.allclose(mine, ref, atol=1e-6)


def test_vision_pass_gives_one_embedding_and_every_method_per_image():
    model = build_clip(tiny_arch()).eval()
    vp = VisionPass(model)
    out = vp.run(torch.randn(5, 3, 32, 32))
    assert out.embeddings.shape == (5, 32) and torch.allclose(out.embeddings.norm(dim=-1), torch.ones(5))
    assert set(out.saliency) == {"cls_attention", "attention_rollout", "smoothed_rollout", "token_distinctiveness"}
    assert all(v.shape == (5, 16) for v in out.saliency.values())
    assert vp.forward_calls == 5
    # the pooled embedding is exactly the model's own image embedding
    ref = torch.nn.functional.normalize(model.encode_image(torch.zeros(1, 3, 32, 32)), dim=-1)
    assert torch.allclose(vp.run(torch.zeros(1, 3, 32, 32)).embeddings, ref, atol=1e-5)
    vp.close()


def test_salient_regions_are_connected_components_largest_first():
    mask = np.zeros((6, 6), bool)
    mask[0:2, 0:2] = True  # 4 patches
    mask[4:6, 3:6] = True  # 6 patches
    mask[3, 0] = True  # single patch: dropped (min_size 2)
    regions = salient_regions(mask)
    assert [(g.r0, g.c0, g.r1, g.c1, g.size) for g in regions] == [(4, 3, 6, 6, 6), (0, 0, 2, 2, 4)]
    assert region_mask(np.arange(16.0), (4, 4), 0.25).sum() == 4


def test_square_boxes_keep_the_aspect_ratio_and_stay_inside():
    # a wide box becomes a square around its centre, with the margin on its longer side
    assert square_box((20, 30, 40, 34), 64, 64, margin=0.25) == (15, 17, 45, 47)
    # near an edge the square moves inside instead of being cut (which would stretch the object)
    x0, y0, x1, y1 = square_box((0, 0, 10, 10), 64, 64, margin=0.5)
    assert (x0, y0) == (0, 0) and x1 - x0 == y1 - y0 == 20
    # larger than the image: centred, padded (PIL pads outside with black)
    x0, y0, x1, y1 = square_box((0, 0, 64, 40), 64, 64, margin=0.5)
    assert x1 - x0 == y1 - y0 == 128 and x0 == y0 == -32


def test_regions_at_several_shares_are_merged_without_repeats():
    sal = np.zeros(16)
    sal[[0, 1]] = [0.9, 0.8]  # a strong region top-left
    sal[[14, 15]] = [0.5, 0.4]  # a weaker one bottom-right: only the larger share finds it
    small = image_regions(sal, (4, 4), 0.125, 4)
    both = image_regions(sal, (4, 4), (0.125, 0.25), 4)
    assert len(small) == 1 and len(both) == 2
    assert image_regions(sal, (4, 4), (0.25, 0.25), 4) == image_regions(sal, (4, 4), 0.25, 4)


class MeanColour(torch.nn.Module):  # a "model" whose image embedding is the crop's mean colour
    logit_scale = torch.tensor(math.log(10.0))

    def encode_image(self, x):
        return x.mean(dim=(2, 3))


def mean_colour_model():
    from types import SimpleNamespace

    def preprocess(im):  # every crop to one size, as a model's preprocessing does
        return torch.from_numpy(np.asarray(im.resize((8, 8)), np.float32) / 255).permute(2, 0, 1)

    return SimpleNamespace(model=MeanColour(), device="cpu", preprocess=preprocess)


def test_the_abstain_class_takes_mass_from_clutter_crops():
    from PIL import Image

    fm = mean_colour_model()
    classes = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), dim=-1)
    background = torch.nn.functional.normalize(torch.tensor([1.0, 1.0, 1.0]), dim=-1)
    red, grey = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (128, 128, 128))
    plain, abstaining = crop_probs(fm, [red, grey], classes), crop_probs(fm, [red, grey], classes, background)
    assert plain.shape == abstaining.shape == (2, 2)
    assert plain[1].max() == pytest.approx(0.5)  # a grey crop still gives half its mass to a class
    assert abstaining[1].max() < 0.3 and abstaining[0, 0] > 0.5  # with abstain it names nothing; red stays red


def test_each_region_is_seen_at_every_margin_and_turn_and_scored_by_their_mean():
    from PIL import Image

    image = Image.new("RGB", (32, 32), (0, 0, 0))
    image.paste((255, 0, 0), (8, 8, 16, 16))  # a red square filling one patch of a 4 × 4 grid
    image.paste((0, 255, 0), (16, 8, 24, 16))  # a green one beside it, only in the wider views
    sal = np.zeros((1, 16))
    sal[0, 5] = 1.0  # the red patch is the one salient patch: one region
    one = CropPlan((1 / 16,), 1, (0.0,), 1)
    views = CropPlan((1 / 16,), 1, (0.0, 1.0), 4)
    assert views.views == 8
    crops, owner, n_regions = region_crops([image], sal, (4, 4), views)
    assert len(crops) == 8 and owner == [0] * 8 and n_regions == [1]
    # the turns of one margin are the same square turned: same colours, turned pixels
    assert crops[1].tobytes() == crops[0].transpose(Image.Transpose.ROTATE_180).tobytes()
    fm = mean_colour_model()
    classes = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), dim=-1)
    tight, _ = region_class_scores(fm, [image], sal, (4, 4), classes, one)
    mean, _ = region_class_scores(fm, [image], sal, (4, 4), classes, views)
    wide = crop_probs(fm, [crops[4]], classes)[0]  # the margin-1 view: red and green both in it
    assert tight[0, 0] > 0.9
    # the mean of the two margins (a turned crop resizes to a few different pixels)
    assert mean[0] == pytest.approx((tight[0] + wide) / 2, abs=0.01)
    assert tight[0, 0] - mean[0, 0] > 0.1
    with pytest.raises(ValueError, match="turns"):
        CropPlan(turns=3)


def test_a_region_the_caption_already_names_adds_nothing():
    from juicer_pipeline.governance.classes import AdditionRule, caption_additions

    hexagon_as_pentagon = [0.05, 0.15, 0.80]  # classes: star, hexagon, pentagon
    lone_star = [0.90, 0.05, 0.05]
    regions = np.array([hexagon_as_pentagon, lone_star])
    # the caption names the hexagon: its region is claimed, the star's region is not
    assert caption_additions(regions, {1}, tau=0.7, claim=0.1, k=3) == [(0, pytest.approx(0.9))]
    # a caption naming nothing gains every region's top class that clears τ, best first
    assert [c for c, _ in caption_additions(regions, set(), tau=0.7, claim=0.1, k=3)] == [0, 2]
    assert [c for c, _ in caption_additions(regions, set(), tau=0.7, claim=0.1, k=1)] == [0]
    assert caption_additions(regions, {0}, tau=0.85, claim=0.5, k=3) == []  # the pentagon is below τ
    assert caption_additions(np.zeros((0, 3)), set(), 0.5, 0.1, 3) == caption_additions([], set(), 0.5, 0.1, 3) == []
    rule = AdditionRule(("star", "hexagon", "pentagon"), tau=0.7, claim=0.1, k=3)
    assert rule.classes(regions.tolist(), {"hexagon", "not-a-class"}) == ["star"]


def test_addition_tau_bounds_the_share_of_images_given_a_class_they_lack():
    from juicer_pipeline.governance.classes import caption_additions, simulated_named

    rng = np.random.default_rng(0)
    truth, regions = [], []
    for _ in range(600):
        true = set(rng.choice(4, size=int(rng.integers(1, 3)), replace=False).tolist())
        rows = []
        for c in true:  # one region per object, the object's class mostly on top
            p = rng.random(4) * 0.3
            p[c] = rng.uniform(0.35, 1.0)
            rows.append(p / max(1.0, p.sum()))
        clutter = rng.random(4) * 0.6  # and a clutter region that names something at times,
        clutter[3] += 0.3  # class 3 most of all (the confusable one, as hearts are in the world)
        rows.append(clutter)
        truth.append(true)
        regions.append(np.array(rows))
    named = simulated_named(truth)
    CLAIM = 0.35  # above the other classes' share of an object's region: a left-out object is never claimed
    assert all(n <= t and len(t - n) == (len(t) > 1) for n, t in zip(named, truth))
    result = calibrate_addition_tau(regions, truth, 0.03, claim=CLAIM, floor=0.3)
    taus = np.array(result["tau"])
    assert result["reached"] and result["false_share"] <= 0.03 and len(taus) == 4
    assert (taus >= 0.3).all() and (taus < 1.0).all()
    assert taus[3] > taus[:3].max()  # the class clutter is read as needs more to be added
    false = np.mean([bool({c for c, _ in caption_additions(r, n, taus, CLAIM, 3)} - t)
                     for r, n, t in zip(regions, named, truth)])
    assert false == pytest.approx(result["false_share"])
    one_tau = min(t for t in TAU_GRID if np.mean([bool({c for c, _ in caption_additions(r, n, t, CLAIM, 3)} - tr)
                                                  for r, n, tr in zip(regions, named, truth)]) <= 0.03)
    filled_one = sum(len({c for c, _ in caption_additions(r, n, one_tau, CLAIM, 3)} & (t - n))
                     for r, n, t in zip(regions, named, truth)) / sum(len(t - n) for n, t in zip(named, truth))
    assert result["filled"] > filled_one  # per class fills more than one τ for all, at the same budget
    looser = calibrate_addition_tau(regions, truth, 0.2, claim=CLAIM, floor=0.3)
    assert (np.array(looser["tau"]) <= taus).all() and looser["filled"] > result["filled"] > 0
    # a class that is falsely on top wherever it shows is never added; the others still can be
    never = calibrate_addition_tau([np.array([[0.0, 1.0, 0, 0]])] * 10, [{0}] * 10, 0.01, claim=0.5)
    assert never["tau"][1] == NEVER and never["false_share"] == 0.0 and never["reached"]
    # a governor whose class τ reached no target (floor NEVER) adds nothing
    none = calibrate_addition_tau(regions, truth, 0.03, claim=CLAIM, floor=NEVER)
    assert none["tau"] == [NEVER] * 4 and not none["reached"]


def test_per_class_addition_tau_applies_each_class_its_own():
    from juicer_pipeline.governance.classes import AdditionRule, caption_additions

    regions = np.array([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    assert [c for c, _ in caption_additions(regions, set(), (0.5, 0.5, 0.8), claim=0.1, k=3)] == [0]
    assert [c for c, _ in caption_additions(regions, set(), (0.65, 0.5, 0.6), claim=0.1, k=3)] == [2]
    rule = AdditionRule(("star", "hexagon", "pentagon"), tau=(0.5, 0.5, 0.8), claim=0.1, k=3)
    assert rule.classes(regions.tolist(), set()) == ["star"]


def test_per_class_tau_reaches_the_target_per_class():
    rng = np.random.default_rng(0)
    truth = [{int(rng.integers(3))} for _ in range(600)]
    scores = rng.random((600, 3)) * 0.5
    for s, t in zip(scores, truth):
        s[list(t)] = rng.uniform(0.3, 1.0)
    scores[:, 2] = np.where([2 in t for t in truth], 0.2, 0.9)  # class 2 is anti-correlated: never reachable
    taus = calibrate_tau_per_class(scores, truth, 0.9)
    for c in (0, 1):
        pred = scores[:, c] >= taus[c]
        assert np.mean([c in t for t, p in zip(truth, pred) if p]) >= 0.9 and taus[c] < 1.0
    assert taus[2] == NEVER
    assert decide_classes(np.array([0.95, 0.5, 0.99]), ["a", "b", "c"], 3, np.array([0.9, 0.4, NEVER])) == [
        ("a", pytest.approx(0.95)), ("b", pytest.approx(0.5))]


def test_classes_respect_k_and_tau():
    names = ["a", "b", "c", "d"]
    scores = np.array([0.95, 0.2, 0.97, 0.91])
    assert decide_classes(scores, names, k=3, tau=0.9) == [("c", pytest.approx(0.97)), ("a", pytest.approx(0.95)),
                                                          ("d", pytest.approx(0.91))]
    assert [c for c, _ in decide_classes(scores, names, k=2, tau=0.9)] == ["c", "a"]
    assert [c for c, _ in decide_classes(scores, names, k=3, tau=0.96)] == ["c"]
    assert decide_classes(scores, names, k=3, tau=0.99) == []


def test_tau_calibration_reaches_the_target_precision():
    rng = np.random.default_rng(0)
    truth = [{int(rng.integers(5))} for _ in range(400)]
    scores = rng.random((400, 5)) * 0.6
    for s, t in zip(scores, truth):
        s[list(t)] = rng.uniform(0.5, 1.0)  # true classes score higher, with overlap
    result = calibrate_tau(scores, truth, target_precision=0.9, k=3)
    assert result["reached"] and result["precision"] >= 0.9 and 0.4 < result["tau"] < 1.0
    looser = calibrate_tau(scores, truth, target_precision=0.5, k=3)
    assert looser["tau"] <= result["tau"] and looser["recall"] >= result["recall"]


def test_corrupt_stored_rows_fail_loudly():
    good = pa.table({"sample_id": ["a", "b"], "embedding": [[1.0, 0.0], [0.0, 1.0]]})
    assert stored_vectors(good, "embedding").shape == (2, 2)
    short = pa.table({"sample_id": ["a", "b"], "embedding": [[1.0, 0.0], [0.5]]})
    with pytest.raises(CorruptStoredRow, match="sample 'b' has 1 values, expected 2"):
        stored_vectors(short, "embedding")
    nan = pa.table({"sample_id": ["a", "b"], "embedding": [[1.0, 0.0], [float("nan"), 1.0]]})
    with pytest.raises(CorruptStoredRow, match="'b' holds NaN"):
        stored_vectors(nan, "embedding")


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFound, match="governor weights not found: .*nothing.safetensors"):
        load_foundation_model(f"file:{tmp_path / 'nothing.safetensors'}")
    with pytest.raises(ModelNotFound, match="open_clip weights not found: .*ViT-B-16.bin"):
        load_foundation_model(f"open_clip:ViT-B-16:{tmp_path / 'ViT-B-16.bin'}")
    with pytest.raises(ModelNotFound, match="no open_clip model in"):
        load_foundation_model(f"hf:{tmp_path}")
    with pytest.raises(ValueError, match="unknown governor source"):
        load_foundation_model("ftp://model")


def test_vision_pass_attention_equals_recomputed_attention_and_is_removed_on_close():
    torch.manual_seed(1)
    model = build_clip(tiny_arch()).eval()
    captured = []
    hook = model.visual.transformer.resblocks[-1].register_forward_pre_hook(lambda m, a, kw=None: captured.append(a[0]))
    vp = VisionPass(model)
    out = vp.run(torch.randn(2, 3, 32, 32))
    with torch.inference_mode():
        ref = _block_attention(model.visual.transformer.resblocks[-1], captured[0])
    assert torch.allclose(out.saliency["cls_attention"], ref[:, 0, 1:], atol=1e-6)
    vp.close()
    hook.remove()
    assert all("attention" not in blk.__dict__ for blk in model.visual.transformer.resblocks)


def test_smoothing_keeps_flat_maps_flat_and_spreads_a_peak_to_its_neighbours():
    from juicer_pipeline.governance.saliency import smooth

    flat = torch.full((2, 16), 0.3)
    assert torch.allclose(smooth(flat, (4, 4)), flat)
    peak = torch.zeros(1, 16)
    peak[0, 5] = 1.0  # row 1, column 1 of a 4×4 grid
    out = smooth(peak, (4, 4)).reshape(4, 4)
    assert out[1, 1] == pytest.approx(0.25) and out[0, 1] == pytest.approx(0.125) and out[0, 0] == pytest.approx(0.0625)
    assert out[3, 3] == 0 and out.sum() == pytest.approx(1.0)
