"""Kept-token training, equal budgets, metrics by hand, and training-set assembly."""
import numpy as np
import pandas as pd
import pytest
import torch

from juicer_pipeline.governance.clip_training import StudentConfig, TrainData, plan, train_student
from juicer_pipeline.governance.metrics import retrieval_recall, zero_shot_accuracy
from juicer_pipeline.governance.recipes import RECIPES
from juicer_pipeline.governance.training_set import assemble_training_set
from juicer_pipeline.models.kept_tokens import install_kept_tokens
from juicer_pipeline.models.world_clip import build_clip, tiny_arch


def test_kept_forward_equals_full_forward_when_rho_is_one():
    torch.manual_seed(0)
    model = build_clip(tiny_arch()).eval()
    x = torch.randn(4, 3, 32, 32)
    full = model.encode_image(x)
    kept = install_kept_tokens(model)
    kept.indices = torch.arange(16).expand(4, 16)
    assert torch.allclose(model.encode_image(x), full, atol=1e-6)


def test_pruned_step_feeds_fewer_tokens():
    model = build_clip(tiny_arch())
    kept = install_kept_tokens(model)
    seen = []
    model.visual.transformer.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    kept.indices = torch.tensor([[0, 5, 10, 15]] * 2)
    model.encode_image(torch.randn(2, 3, 32, 32))
    kept.indices = None
    model.encode_image(torch.randn(2, 3, 32, 32))
    assert seen == [(2, 5, 32), (2, 17, 32)]  # CLS + 4 kept patches, then CLS + all 16


@pytest.mark.parametrize("rho", [0.25, 0.5, 0.75])
def test_equal_budget_within_one_batch(rho):
    cfg = StudentConfig(batch_size=32, budget_tokens=64 * 32 * 97, rho=rho)
    full = plan(cfg, "all", 64)
    for patches in ("random", "saliency"):
        phases = plan(cfg, patches, 64)
        tokens = sum(p.steps * cfg.batch_size * p.tokens_per_image for p in phases)
        assert abs(tokens - cfg.budget_tokens) <= cfg.batch_size * 64
        assert phases[-1].tokens_per_image == 64 and phases[0].tokens_per_image == int(np.ceil(rho * 64))
        assert sum(p.steps for p in phases) > full[0].steps  # more samples for the same vision compute
    assert abs(full[0].steps * 32 * 64 - cfg.budget_tokens) <= 32 * 64


def test_training_counts_tokens_and_samples(monkeypatch):
    from juicer_pipeline.governance import clip_training

    fed = []  # patch tokens that really entered the vision transformer, per forward (CLS excluded)
    install = clip_training.install_kept_tokens

    def spying(model):
        model.visual.transformer.register_forward_pre_hook(lambda m, args: fed.append(args[0].shape[0] * (args[0].shape[1] - 1)))
        return install(model)

    monkeypatch.setattr(clip_training, "install_kept_tokens", spying)
    arch = tiny_arch()
    n = 64
    data = TrainData(images=torch.randint(0, 255, (n, 3, 32, 32), dtype=torch.uint8),
                     tokens=torch.randint(1, 100, (n, 16)), kept=torch.arange(8).expand(n, 8).to(torch.int16),
                     patches="saliency")
    cfg = StudentConfig(arch=arch, batch_size=16, budget_tokens=16 * 16 * 6, rho=0.5, eval_points=1, warmup_steps=2)
    _, rec = train_student(data, cfg, seed=0)
    assert [p["tokens_per_image"] for p in rec["phases"]] == [8, 16]
    assert rec["tokens_seen"] == sum(fed) and len(fed) == rec["steps"]  # counted = fed (no evaluation here)
    assert abs(rec["tokens_seen"] - cfg.budget_tokens) <= 16 * 16
    assert rec["samples_seen"] == rec["steps"] * 16
    _, rec_full = train_student(TrainData(data.images, data.tokens, None, "all"), cfg, seed=0)
    assert rec_full["samples_seen"] < rec["samples_seen"]
    assert abs(rec_full["tokens_seen"] - rec["tokens_seen"]) <= 16 * 16


def test_retrieval_and_zero_shot_match_hand_computed_cases():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7071, 0.7071]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # sims rows (image): i0 -> t0 best (hit); i1 -> t2 best (miss, t1 second); i2 -> t1 best (miss)
    r = retrieval_recall(img, txt, ks=(1, 2))
    assert r["i2t_r@1"] == pytest.approx(1 / 3) and r["i2t_r@2"] == pytest.approx(2 / 3)
    # text side: t0 -> i0 (hit); t1 -> i2 (miss) then i1; t2 -> i1 (miss) then i2 (hit at 2)
    assert r["t2i_r@1"] == pytest.approx(1 / 3) and r["t2i_r@2"] == pytest.approx(1.0)
    # with keys, items sharing a key count as hits
    rk = retrieval_recall(img, txt, ks=(1,), keys=["a", "b", "b"])
    assert rk["i2t_r@1"] == pytest.approx(1.0)
    z = zero_shot_accuracy(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), torch.eye(2), [0, 0, 1], ks=(1, 2))
    assert z["top1"] == pytest.approx(2 / 3) and z["top2"] == pytest.approx(1.0)


def _samples(eval_hash):
    return pd.DataFrame([
        {"sample_id": "d1/a", "drop_id": "d1", "content_hash": "h1", "status": "valid", "caption": "a",
         "enriched_caption": "A, with a star.", "enriched_version": "enriched", "kept": [1, 2], "sieve_score": 0.9},
        {"sample_id": "d1/b", "drop_id": "d1", "content_hash": eval_hash, "status": "valid", "caption": "b",
         "enriched_caption": "B.", "kept": [1, 2], "sieve_score": 0.8},
        {"sample_id": "d1/c", "drop_id": "d1", "content_hash": None, "status": "quarantined", "caption": None,
         "enriched_caption": None, "kept": None, "sieve_score": None},
        {"sample_id": "d2/a", "drop_id": "d2", "content_hash": "h1", "status": "valid", "caption": "a again",
         "enriched_caption": "A again.", "kept": [3, 4], "sieve_score": 0.7},
        {"sample_id": "d2/e", "drop_id": "d2", "content_hash": eval_hash, "status": "valid", "caption": "e",
         "enriched_caption": "E.", "kept": [0, 1], "sieve_score": 0.95},  # the evaluation image again
        {"sample_id": "d2/f", "drop_id": "d2", "content_hash": "h6", "status": "valid", "caption": "f",
         "enriched_caption": "F.", "enriched_version": "cleaned", "kept": [5, 6], "sieve_score": 0.1},
    ])


def test_evaluation_images_never_enter_a_training_set_even_when_dropped_again():
    for name, recipe in RECIPES.items():
        members, excluded = assemble_training_set(recipe, _samples("EVAL"), {"EVAL"}, sieve_fraction=1.0)
        assert "EVAL" not in set(members.content_hash), name
        why = dict(zip(excluded.sample_id, excluded.reason))
        assert why["d1/b"] == why["d2/e"] == "held_out"
        assert why["d1/c"] == "quarantined" and why["d2/a"] == "duplicate"


def test_recipes_choose_captions_patches_and_samples():
    members, excluded = assemble_training_set(RECIPES["sieve_then_juice"], _samples("EVAL"), {"EVAL"}, 0.5)
    assert list(members.sample_id) == ["d1/a"] and members.train_caption[0] == "A, with a star."
    assert list(members.kept[0]) == [1, 2] and members.caption_version[0] == "enriched"
    assert dict(zip(excluded.sample_id, excluded.reason))["d2/f"] == "sieved_out"
    raw, _ = assemble_training_set(RECIPES["raw"], _samples("EVAL"), {"EVAL"}, 0.5)
    assert list(raw.sample_id) == ["d1/a", "d2/f"] and raw.train_caption.tolist() == ["a", "f"]
    assert raw.kept.isna().all() and set(raw.caption_version) == {"original"}
    juiced, _ = assemble_training_set(RECIPES["datajuicer"], _samples("EVAL"), {"EVAL"}, 0.5)
    # each sample says what enrichment really did: a caption that was only cleaned is not "enriched"
    assert dict(zip(juiced.sample_id, juiced.caption_version)) == {"d1/a": "enriched", "d2/f": "cleaned"}
