"""The dense evaluation: each scorer near its ceiling on features that carry the answer and near
chance on random ones; the feature extraction against open_clip's own outputs; MaskCLIP on the
trained world governor against its untrained twin; the whole evaluation of a tiny student."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from juicer_pipeline.governance.images import normalise_batch
from juicer_pipeline.models.kept_tokens import install_kept_tokens
from juicer_pipeline.models.loader import load_foundation_model
from juicer_pipeline.models.world_clip import ClipArch, build_clip, tiny_arch
from juicer_pipeline.training.dense_evaluation import (DENSE_METRICS, count_accuracy, evaluate_dense, mean_iou,
                                                       patch_class_shares, pixel_predictions, pointing_score,
                                                       segment_by_probe, segment_zero_shot, winoground_scores)
from juicer_pipeline.training.dense_features import extract_dense_features, student_images, value_path_embeddings
from juicer_pipeline.world import load_vocabulary
from juicer_pipeline.world.dense_sets import FIT, SCORE, DenseSetSizes, dense_sets

GRID = (8, 8)
N_CLASSES = 11


@pytest.fixture(scope="module")
def sets():
    return dense_sets(seed=0, sizes=DenseSetSizes(scenes=81, area_control=30, binding=10))


def _shares(sets, part):
    return patch_class_shares(sets.scenes[part].pixel_classes, GRID, N_CLASSES)


def _majority_ceiling(sets) -> dict:
    """mIoU of the true majority class of every patch, upsampled: the best any patch classifier
    can reach at this grid (objects are a few patches wide)."""
    one_hot = F.one_hot(torch.from_numpy(_shares(sets, SCORE).argmax(-1)), N_CLASSES).float()
    truth = sets.scenes[SCORE].pixel_classes
    return mean_iou(pixel_predictions(one_hot, GRID, truth.shape[1:]).numpy(), truth, N_CLASSES)


def _answer_features(shares: np.ndarray, gen: torch.Generator, extra_dims: int = 21) -> torch.Tensor:
    """Patch features that carry the patch's majority class (one-hot, scaled) under unit noise."""
    one_hot = 5.0 * F.one_hot(torch.from_numpy(shares.argmax(-1)), shares.shape[-1]).float()
    signal = torch.cat([one_hot, torch.zeros(*one_hot.shape[:-1], extra_dims)], -1)
    return signal + torch.randn(signal.shape, generator=gen)


def test_patch_class_shares_count_each_patch_pixels():
    labels = np.zeros((1, 4, 6), np.uint8)
    labels[0, :2, :3] = 2  # the top-left patch of a 2×2 grid: all class 2
    labels[0, 2:, 3:5] = 1  # bottom-right: 4 of 6 pixels class 1
    shares = patch_class_shares(labels, (2, 2), 3)
    assert np.allclose(shares.sum(-1), 1)
    assert np.allclose(shares[0, 0], [0, 0, 1]) and np.allclose(shares[0, 1], [1, 0, 0])
    assert np.allclose(shares[0, 3], [2 / 6, 4 / 6, 0])


def test_mean_iou_by_hand():
    truth = np.array([[0, 0, 1, 1], [0, 0, 2, 2]])
    assert mean_iou(truth, truth, 3) == {"miou": 1.0, "miou_shapes": 1.0}
    wrong = np.array([[0, 0, 1, 2], [0, 0, 2, 2]])  # one class-1 pixel called class 2
    scores = mean_iou(wrong, truth, 4)  # class 3 absent from both: left out of the mean
    assert scores["miou"] == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert scores["miou_shapes"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_probe_segmentation_reaches_the_ceiling_on_true_labels_and_chance_on_noise(sets):
    gen = torch.Generator().manual_seed(0)
    fit, score = _shares(sets, FIT), _shares(sets, SCORE)
    truth = sets.scenes[SCORE].pixel_classes
    ceiling = _majority_ceiling(sets)
    told = segment_by_probe(_answer_features(fit, gen), fit, _answer_features(score, gen), truth, GRID)
    # near, not at, the ceiling: upsampled logits move the borders between patches of two classes
    # a little from where upsampled one-hot labels put them
    assert told["miou"] > 0.9 * ceiling["miou"] and told["miou_shapes"] > 0.9 * ceiling["miou_shapes"]
    noise = segment_by_probe(torch.randn(81, 64, 32, generator=gen), fit, torch.randn(81, 64, 32, generator=gen),
                             truth, GRID)
    # calling every pixel background alone scores 0.83 / 11 = 0.075
    assert noise["miou"] < 0.1 and noise["miou_shapes"] < 0.05


def _class_embeddings(gen, dim: int = 32) -> torch.Tensor:
    return F.normalize(torch.randn(N_CLASSES, dim, generator=gen), dim=-1)


def test_zero_shot_segmentation_and_pointing_on_aligned_vs_random_embeddings(sets):
    gen = torch.Generator().manual_seed(1)
    classes = _class_embeddings(gen)
    shares, truth = _shares(sets, SCORE), sets.scenes[SCORE].pixel_classes
    aligned = F.normalize(classes[torch.from_numpy(shares.argmax(-1))] + 0.1 * torch.randn(81, 64, 32, generator=gen),
                          dim=-1)
    ceiling = _majority_ceiling(sets)
    told = segment_zero_shot(aligned, classes, truth, GRID)
    assert told["miou"] > 0.95 * ceiling["miou"]
    assert pointing_score(aligned, classes[1:], shares) > 0.97
    random = F.normalize(torch.randn(81, 64, 32, generator=gen), dim=-1)
    assert segment_zero_shot(random, classes, truth, GRID)["miou"] < 0.1
    # chance: the share of patches holding some of the shape, over (image, shape present)
    present = shares[..., 1:].sum(1) >= 0.25
    chance = (shares[..., 1:] > 0).mean(1)[present].mean()
    assert abs(pointing_score(random, classes[1:], shares) - chance) < 0.08 and chance < 0.3


def test_count_probe_reads_a_count_that_is_there_and_not_one_that_is_not():
    gen = torch.Generator().manual_seed(2)
    counts = np.array([1, 2, 3] * 100)
    emb = F.one_hot(torch.from_numpy(counts - 1), 3).float() * 4 + torch.randn(300, 3, generator=gen)
    emb = torch.cat([emb, torch.randn(300, 29, generator=gen)], 1)
    assert count_accuracy(emb[:150], counts[:150], emb[150:], counts[150:]) > 0.9
    noise = torch.randn(300, 32, generator=gen)
    assert count_accuracy(noise[:150], counts[:150], noise[150:], counts[150:]) < 0.45


def test_winoground_scores_by_hand_and_at_chance():
    right = torch.tensor([[[0.9, 0.1], [0.2, 0.8]]])
    assert winoground_scores(right) == {"text": 1.0, "image": 1.0, "group": 1.0}
    # both images prefer caption 0: the text score fails, each caption still prefers its own image
    biased = torch.tensor([[[0.9, 0.5], [0.6, 0.55]]])
    assert winoground_scores(biased) == {"text": 0.0, "image": 1.0, "group": 0.0}
    chance = winoground_scores(torch.rand(20000, 2, 2, generator=torch.Generator().manual_seed(3)))
    assert chance["text"] == pytest.approx(0.25, abs=0.015) and chance["image"] == pytest.approx(0.25, abs=0.015)
    assert chance["group"] == pytest.approx(1 / 6, abs=0.015)


@pytest.mark.parametrize("block_type", ["default", "custom"])
def test_extracted_tokens_are_open_clips_own(block_type, sets):
    """Hooks on the blocks give open_clip's forward_intermediates tokens, and the value path is what
    attention returns for a token that attends to itself alone."""
    torch.manual_seed(0)
    model = build_clip(tiny_arch(image_size=64, block_type=block_type, vision_layers=3)).eval()
    kept = install_kept_tokens(model)
    kept.indices = torch.zeros(4, 2, dtype=torch.long)  # left over from salient-only inference: ignored
    images = sets.scenes[FIT].images[:4]
    feats = extract_dense_features(model, images)
    x = normalise_batch(student_images(images, 64))
    with torch.no_grad():
        ref = model.visual.forward_intermediates(x, output_fmt="NLC")
        assert len(feats.blocks) == 3 and feats.blocks[0].shape == (4, 64, 32)
        for mine, theirs in zip(feats.blocks, ref["image_intermediates"]):
            assert torch.allclose(mine, theirs, atol=1e-4)
        assert torch.allclose(feats.image_embeddings, F.normalize(ref["image_features"], dim=-1), atol=1e-4)
        block = model.visual.transformer.resblocks[-1]
        tokens = torch.randn(2, 5, 32)
        alone = torch.cat([_self_attention(block, tokens[:, t:t + 1]) for t in range(5)], 1)
        expected = F.normalize(model.visual.ln_post(alone) @ model.visual.proj, dim=-1)[:, 1:]
        assert torch.allclose(value_path_embeddings(model.visual, tokens), expected, atol=1e-5)


def _self_attention(block, token):
    normed = block.ln_1(token)
    out = block.attention(q_x=normed) if hasattr(block, "attention") else block.attn(normed)
    return block.ls_1(out)


def test_maskclip_finds_shapes_with_the_trained_governor_not_with_its_untrained_twin(sets):
    governor = load_foundation_model("world")
    torch.manual_seed(0)
    twin = build_clip(ClipArch.from_dict(governor.info["arch"])).eval()
    shapes = load_vocabulary().shapes
    scores = {}
    for name, model in (("trained", governor.model), ("untrained", twin)):
        feats = extract_dense_features(model, sets.scenes[SCORE].images)
        tokens = governor.tokenizer([f"a photo of a {s}." for s in shapes])
        with torch.no_grad():
            classes = F.normalize(model.encode_text(tokens), dim=-1)
        scores[name] = pointing_score(feats.value_embeddings, classes, _shares(sets, SCORE))
    assert scores["trained"] > scores["untrained"] + 0.1


def test_evaluate_dense_of_a_tiny_student(sets):
    from open_clip.tokenizer import SimpleTokenizer

    torch.manual_seed(0)
    model = build_clip(tiny_arch(image_size=64, block_type="custom")).eval()
    scores = evaluate_dense(model, SimpleTokenizer(context_length=16), sets, attributes=("red", "blue"))
    assert set(scores) == {f"dense_{m}" for m in DENSE_METRICS} | {"dense_seconds"}
    assert all(0.0 <= scores[f"dense_{m}"] <= 1.0 for m in DENSE_METRICS)
    assert scores["dense_seconds"] > 0


def test_the_comparison_names_every_dense_metric():
    from juicer_pipeline.storage.results import DENSE_HEADLINE

    assert DENSE_HEADLINE == [f"dense_{m}" for m in DENSE_METRICS]
