"""The governor's objectness term: its loss, its targets, and a tiny training run that uses it."""
import numpy as np
import pytest
import torch

from juicer_pipeline.models import tiny_arch
from juicer_pipeline.training.loss import dense_word_patch_loss, objectness_loss
from juicer_pipeline.world.governor_training import (GovernorTrainConfig, flipped_patches, scene_patch_classes, train_governor)
from juicer_pipeline.world.generate import SPLIT_CORPUS_CROPS, drop_like_corpus_spec, iter_clean_samples
from juicer_pipeline.world.vocabulary import load_vocabulary
from juicer_pipeline.world.scenes import patch_coverage


def test_objectness_loss_is_zero_only_for_attention_spread_evenly_over_the_object_patches():
    patches = torch.tensor([[True, True, False, False], [False, False, False, True]])
    even = torch.tensor([[0.3, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])  # rows are renormalised
    assert objectness_loss(even, patches).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((2, 4), 0.25)
    # KL(target || uniform) = log(4 / object patches), averaged over rows: (log 2 + log 4) / 2
    assert objectness_loss(uniform, patches).item() == pytest.approx((np.log(2) + np.log(4)) / 2, rel=1e-5)
    on_background = torch.tensor([[0.01, 0.01, 0.49, 0.49], [0.3, 0.3, 0.3, 0.1]])
    assert objectness_loss(on_background, patches) > objectness_loss(uniform, patches)


def test_objectness_loss_leaves_out_images_without_objects_and_keeps_a_graph_when_none_has_one():
    attention = torch.full((2, 4), 0.25, requires_grad=True)
    patches = torch.tensor([[True, False, False, False], [False, False, False, False]])
    loss = objectness_loss(attention, patches)
    assert loss.item() == pytest.approx(np.log(4), rel=1e-5)  # the first row only
    loss.backward()
    assert attention.grad[1].abs().sum() == 0 and attention.grad[0].abs().sum() > 0
    empty = objectness_loss(attention, torch.zeros(2, 4, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


def test_patch_coverage_counts_each_patch_share_and_flipped_rows_mirror_their_images():
    mask = np.zeros((8, 8), bool)
    mask[0:4, 0:2] = True  # half of the top-left 4x4 patch
    assert patch_coverage(mask, (2, 2)).tolist() == [0.5, 0.0, 0.0, 0.0]
    patches = torch.tensor([[True, False, False, False], [True, False, False, True]])
    out = flipped_patches(patches, torch.tensor([True, False]), (2, 2))
    assert out.tolist() == [[False, True, False, False], [True, False, False, True]]
    assert patches[0].tolist() == [True, False, False, False]  # the corpus itself is untouched


def test_dense_word_patch_loss_prefers_patches_on_their_class_and_leaves_out_unlabelled_ones():
    classes = torch.eye(3)  # background, shape 1, shape 2
    labels = torch.tensor([[0, 1, 2, -1]])
    right = torch.eye(3)[[0, 1, 2, 1]][None]  # the unlabelled patch may point anywhere
    wrong = torch.eye(3)[[1, 2, 0, 1]][None]
    assert dense_word_patch_loss(right, classes, labels, 10.0) < 0.01
    assert dense_word_patch_loss(wrong, classes, labels, 10.0) > 5.0
    moved = right.clone()
    moved[0, 3] = torch.eye(3)[2]
    assert dense_word_patch_loss(moved, classes, labels, 10.0) == dense_word_patch_loss(right, classes, labels, 10.0)
    # a crop (no labelled patch) beside a scene: finite gradients, the crop's untouched
    mixed = torch.randn(2, 4, 3, requires_grad=True)
    dense_word_patch_loss(mixed, classes, torch.tensor([[-1, -1, -1, -1], [0, 1, 2, -1]]), 10.0).backward()
    assert torch.isfinite(mixed.grad).all() and not mixed.grad[0].any()
    none = torch.zeros(1, 4, 3, requires_grad=True)
    empty = dense_word_patch_loss(none, classes, torch.full((1, 4), -1), 10.0)
    empty.backward()
    assert empty.item() == 0.0 and none.grad is not None


def test_scene_patch_classes_label_the_patches_a_shape_or_the_background_fills():
    vocab = load_vocabulary()
    scene, rendered, _ = next(iter_clean_samples(SPLIT_CORPUS_CROPS, drop_like_corpus_spec(64, 0.35, 2), 1, 3, vocab))
    labels = scene_patch_classes(scene, rendered, vocab, 8)
    cover = patch_coverage(rendered.mask, (8, 8))
    assert labels.shape == cover.shape == (64,)
    assert set(labels.tolist()) <= {-1, 0, *[1 + vocab.shapes.index(o.shape) for o in scene.objects]}
    assert (labels > 0).any() and (labels == 0).any() and (labels == -1).any()
    assert (cover[labels > 0] >= 0.6).all()  # a shape fills at least 60 % of its patches
    assert (cover[labels == 0] <= 0.4).all()  # the background fills at least 60 % of its own


def _tiny_config(**overrides) -> GovernorTrainConfig:
    base = dict(arch=tiny_arch(), corpus_multi=96, corpus_single=16, crop_scenes=12, whole_crop_scenes=True,
                steps=40, batch_size=32, lr=3e-3, warmup=5, eval_every=40, eval_samples=48, validation_samples=48)
    return GovernorTrainConfig(**{**base, **overrides})


def test_the_objectness_term_moves_the_rollout_onto_objects_and_the_run_reports_saliency_recall():
    plain_model, plain = train_governor(_tiny_config(saliency_weight=0.0))
    model, record = train_governor(_tiny_config(saliency_weight=5.0))
    assert record["corpus_images"] > 96 + 16  # the crop scenes joined whole, beside their crops
    for r in (plain, record):
        assert 0.0 <= r["scores"]["saliency_recall@0.5"] <= 1.0
        assert 0.0 <= r["held_out_scores"]["saliency_recall@0.5"] <= 1.0
        assert [e["step"] for e in r["evals"]] == [40]
    assert record["scores"]["saliency_recall@0.5"] > plain["scores"]["saliency_recall@0.5"]
    # the capture that fed the term is gone: the model's blocks are open_clip's own again
    assert all("attention" not in blk.__dict__ for blk in model.visual.transformer.resblocks)
    assert record["config"]["saliency_weight"] == 5.0


def test_the_dense_term_runs_and_every_evaluation_reports_maskclip_pointing():
    plain_model, plain = train_governor(_tiny_config())
    model, record = train_governor(_tiny_config(dense_weight=5.0, saliency_weight=1.0))
    for r in (plain, record):
        assert 0.0 <= r["scores"]["maskclip_pointing"] <= 1.0
        assert 0.0 <= r["held_out_scores"]["maskclip_pointing"] <= 1.0
    assert record["scores"]["maskclip_pointing"] > plain["scores"]["maskclip_pointing"]
    assert record["config"]["dense_weight"] == 5.0
    # both hooks are gone after training
    last = model.visual.transformer.resblocks[-1]
    assert not last._forward_pre_hooks and all("attention" not in b.__dict__ for b in model.visual.transformer.resblocks)
