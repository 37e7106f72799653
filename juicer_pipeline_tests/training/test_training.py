"""Kept-token training, equal budgets, metrics by hand, and training-set assembly."""
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from juicer_pipeline.training import config, schedule, trainer
from juicer_pipeline.training import loss as itc
from juicer_pipeline.training.config import StudentConfig, plan
from juicer_pipeline.training.trainer import TrainData, train_student
from juicer_pipeline.governance.metrics import (linear_probe_accuracy, per_class_accuracy, retrieval_recall,
                                                 zero_shot_accuracy)
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
    cfg = StudentConfig(batch_size=32, budget_tokens=65 * 32 * 97, rho=rho)
    full = plan(cfg, "all", 64)
    for patches in ("random", "saliency"):
        phases = plan(cfg, patches, 64)
        tokens = sum(p.steps * cfg.batch_size * p.tokens_per_image for p in phases)
        assert abs(tokens - cfg.budget_tokens) <= cfg.batch_size * 65
        # tokens per image count CLS: 65 on full images, ⌈ρN⌉ + 1 on pruned ones
        assert phases[-1].tokens_per_image == 65 and phases[0].tokens_per_image == int(np.ceil(rho * 64)) + 1
        assert sum(p.steps for p in phases) > full[0].steps  # more samples for the same vision compute
    assert abs(full[0].steps * 32 * 65 - cfg.budget_tokens) <= 32 * 65


def _spy_on_vision_input(monkeypatch):
    """Tokens (CLS included) that really entered the vision transformer, per training forward."""

    fed = []
    install = trainer.install_kept_tokens

    def spying(model):
        model.visual.transformer.register_forward_pre_hook(
            lambda m, args: fed.append(args[0].shape[0] * args[0].shape[1]) if m.training else None)
        return install(model)

    monkeypatch.setattr(trainer, "install_kept_tokens", spying)
    return fed


def _saliency_data(n=64, k=8):
    return TrainData(images=torch.randint(0, 255, (n, 3, 32, 32), dtype=torch.uint8),
                     tokens=torch.randint(1, 100, (n, 16)), kept=torch.arange(k).expand(n, k).to(torch.int16),
                     patches="saliency")


def test_training_counts_the_tokens_fed(monkeypatch):
    fed = _spy_on_vision_input(monkeypatch)
    data = _saliency_data()
    cfg = StudentConfig(arch=tiny_arch(), batch_size=16, budget_tokens=16 * 17 * 6, rho=0.5, eval_points=1,
                        warmup_steps=2)
    evaluations = []
    _, rec = train_student(data, cfg, seed=0, evaluate=lambda m: evaluations.append(1) or {"t2i_r@1": 0.0})
    assert [p["tokens_per_image"] for p in rec["phases"]] == [9, 17]  # CLS + 8 kept, CLS + all 16
    assert evaluations and rec["tokens_seen"] == sum(fed) and len(fed) == rec["steps"]  # evaluation not counted
    assert abs(rec["tokens_seen"] - cfg.budget_tokens) <= 16 * 17
    assert rec["samples_seen"] == rec["steps"] * 16
    fed.clear()
    _, rec_full = train_student(TrainData(data.images, data.tokens, None, "all"), cfg, seed=0)
    assert rec_full["tokens_seen"] == sum(fed)
    assert rec_full["samples_seen"] < rec["samples_seen"]
    assert abs(rec_full["tokens_seen"] - rec["tokens_seen"]) <= 16 * 17


def test_stored_k_that_differs_from_the_plan_fails_naming_both():
    data = _saliency_data(k=8)  # stored at ρ=0.5 of 16 patches
    cfg = StudentConfig(arch=tiny_arch(), batch_size=16, budget_tokens=16 * 17 * 4, rho=0.25, warmup_steps=1)
    with pytest.raises(ValueError, match=r"K=8 .*expects K=4"):
        train_student(data, cfg, seed=0)


def test_training_runs_at_its_thread_count_and_restores_the_callers():
    """torch's thread count is process-wide: a run at 1 thread must not leave the process at 1 (it would
    slow and change the float sums of whatever the process computes next)."""
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    seen = []
    cfg = StudentConfig(arch=tiny_arch(), batch_size=16, budget_tokens=16 * 17 * 2, rho=0.5, warmup_steps=1,
                        threads=wanted)
    train_student(_saliency_data(), cfg, seed=0, on_step=lambda step, loss: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {wanted} and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="expects K"):  # a failing run restores it too
        train_student(_saliency_data(k=8), replace(cfg, rho=0.25), seed=0)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("precision, kernels", [("bf16", (False, True)), ("fp32", None)])
def test_cpu_training_picks_the_attention_kernel_by_precision_and_restores_the_callers(precision, kernels):
    """The CPU flash-attention kernel's backward is slow under bf16 at a student's few dozen tokens;
    bf16 training switches to the math kernel for its steps only (the switch is process-wide, like
    threads). fp32 training keeps the caller's kernels, whatever they are."""
    flags = torch.backends.cuda
    before = (flags.flash_sdp_enabled(), flags.math_sdp_enabled())
    seen = []
    cfg = StudentConfig(arch=tiny_arch(), batch_size=16, budget_tokens=16 * 17 * 2, rho=0.5, warmup_steps=1,
                        precision=precision)
    train_student(_saliency_data(), cfg, seed=0,
                  on_step=lambda step, loss: seen.append((flags.flash_sdp_enabled(), flags.math_sdp_enabled())))
    assert seen and set(seen) == {kernels or before}
    assert (flags.flash_sdp_enabled(), flags.math_sdp_enabled()) == before


@pytest.mark.parametrize("timed, chosen", [({"fp32": 0.2, "bf16": 0.1}, "bf16"), ({"fp32": 0.1, "bf16": 0.3}, "fp32")])
def test_native_precision_trains_in_the_faster_one_and_records_it(monkeypatch, timed, chosen):
    monkeypatch.setattr(config, "_cpu_step_seconds", lambda arch, batch, threads: tuple(timed.items()))
    said = []
    cfg = StudentConfig(arch=tiny_arch(), batch_size=16, budget_tokens=16 * 17 * 2, rho=0.5, warmup_steps=1,
                        precision="native")
    _, rec = train_student(_saliency_data(), cfg, seed=0, progress=said.append)
    assert rec["config"]["precision"] == chosen
    assert any(f"fp32 {timed['fp32']:.3f} s, bf16 {timed['bf16']:.3f} s" in s and f"runs in {chosen}" in s
               for s in said)
    for fixed in ("fp32", "bf16"):  # a precision that is set is kept as it is, untimed
        assert config.with_native_precision(replace(cfg, precision=fixed)).precision == fixed


def test_native_precision_times_both_precisions_once_per_student():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = config._cpu_step_seconds(tiny_arch(), 8, 1, steps=1)
    assert torch.equal(torch.rand(3), expected)  # the caller's random state is untouched
    assert [p for p, _ in first] == ["fp32", "bf16"] and all(s > 0 for _, s in first)
    assert config._cpu_step_seconds(tiny_arch(), 8, 1, steps=1) is first  # cached: one choice per process


def test_training_settings_accept_native_precision_and_reject_others():
    from pydantic import ValidationError

    from juicer_pipeline.settings import TrainingSettings

    assert TrainingSettings(precision="native").precision == "native"
    with pytest.raises(ValidationError, match="precision"):
        TrainingSettings(precision="fp16")


def test_math_attention_kernel_gives_the_default_kernels_loss_and_gradients():
    from juicer_pipeline.training.runtime import attention_kernels

    torch.manual_seed(0)
    model = build_clip(tiny_arch())
    images, tokens = torch.randn(8, 3, 32, 32), torch.randint(1, 400, (8, 16))

    def loss_and_grads():
        model.zero_grad()
        loss = itc.clip_loss(model, images, tokens)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    default_loss, default_grads = loss_and_grads()
    with attention_kernels(torch.device("cpu"), "bf16"):  # the kernel bf16 training uses, here in fp32
        math_loss, math_grads = loss_and_grads()
    assert math_loss == pytest.approx(default_loss, rel=1e-5)
    assert len(math_grads) == len(default_grads)
    for a, b in zip(math_grads, default_grads):
        # atol is torch's own float32 default: the kernels sum in different orders, and on an Intel
        # Xeon one gradient of 512 (0.0065) differed by 1.8e-6 where an AMD EPYC stayed within 1e-6
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_wallclock_budget_trains_for_the_measured_seconds(monkeypatch):
    fed = _spy_on_vision_input(monkeypatch)
    cfg = StudentConfig(arch=tiny_arch(), batch_size=16, budget_tokens=1, wallclock_s=1.5, rho=0.5, warmup_steps=2,
                        eval_points=2)
    _, rec = train_student(_saliency_data(), cfg, seed=0, evaluate=lambda m: {"t2i_r@1": 0.0})
    assert rec["budget"] == "wallclock" and [p["phase"] for p in rec["phases"]] == ["saliency_tokens", "full_tune"]
    # each phase trains until its share of the deadline has passed (90 % pruned, 10 % full-patch tuning)
    assert rec["phases"][0]["seconds"] >= 1.35 and rec["phases"][1]["seconds"] >= 0.15
    # how many steps fit in the seconds depends on the machine's load: each phase takes at least one
    assert rec["tokens_seen"] == sum(fed) and all(p["steps"] >= 1 for p in rec["phases"])
    assert rec["steps"] == sum(p["steps"] for p in rec["phases"])
    assert [p["train_seconds"] for p in rec["learning_curve"]] == sorted(p["train_seconds"] for p in rec["learning_curve"])


def test_schedule_is_linear_warmup_then_cosine_to_zero():
    cfg = StudentConfig(arch=tiny_arch(), lr=1.0, warmup_steps=10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = schedule.student_schedule(opt, cfg, total_steps=110, clock=trainer.TrainClock())
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.5)))  # half-way through the decay
    assert lrs[109] < 0.001


def test_full_patch_tuning_restarts_its_own_schedule():
    cfg = StudentConfig(arch=tiny_arch(), lr=1.0, tune_lr_scale=0.5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    opt.param_groups[0]["lr"] = 0.001  # where the run's own cosine left it
    phase = config.Phase("full_tune", steps=40, tokens_per_image=17)
    sched = schedule.tune_schedule(opt, cfg, phase, trainer.TrainClock(), 0.0)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5 * 0.25)  # restarted from the decayed rate, warm-up 1 of 4 steps
    assert max(lrs) == pytest.approx(0.5, rel=0.05) and lrs.index(max(lrs)) == 3  # peak after a 4-step warm-up
    assert lrs[-1] < 0.01


@pytest.mark.parametrize("scale, restarts", [(0.0, 0), (0.5, 1)])
def test_training_restarts_the_schedule_for_the_tuning_phase_only_when_asked(monkeypatch, scale, restarts):
    made = []
    original = trainer.tune_schedule
    monkeypatch.setattr(trainer, "tune_schedule",
                        lambda opt, cfg, phase, *a: made.append(phase.name) or original(opt, cfg, phase, *a))
    cfg = StudentConfig(arch=tiny_arch(), batch_size=16, budget_tokens=16 * 17 * 6, rho=0.5, warmup_steps=2,
                        tune_lr_scale=scale)
    train_student(_saliency_data(), cfg, seed=0)
    assert made == ["full_tune"] * restarts * 2  # one per optimizer (AdamW, and SparseAdam for the token table)


def test_library_clip_loss_equals_the_hand_written_symmetric_infonce():
    torch.manual_seed(0)
    model = build_clip(tiny_arch()).eval()
    images, tokens = torch.randn(6, 3, 32, 32), torch.randint(1, 100, (6, 16))
    img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    txt = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
    labels = torch.arange(6)
    by_hand = 0.5 * (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels))
    assert itc.clip_loss(model, images, tokens).item() == pytest.approx(by_hand.item(), abs=1e-6)


def test_library_zero_shot_classifier_equals_prompt_ensembling_by_hand():
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from juicer_pipeline.governance.prompts import class_embeddings, zero_shot_templates

    torch.manual_seed(0)
    model = build_clip(tiny_arch()).eval()
    tok = SimpleTokenizer(context_length=16)
    names, attrs = ["star", "ring", "arrow"], ("red", "orange")
    with torch.no_grad():
        by_hand = class_embeddings(lambda t: torch.nn.functional.normalize(model.encode_text(tok(t)), dim=-1), names, attrs)
        library = build_zero_shot_classifier(model, tok, names, zero_shot_templates(attrs), num_classes_per_batch=None).T
    assert torch.allclose(library, by_hand, atol=1e-5)


def test_normalisation_uses_open_clips_constants():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from juicer_pipeline.governance.images import normalise_batch

    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    assert torch.allclose(normalise_batch(x), (x.float() / 255 - mean) / std)


def test_resampled_saliency_keeps_exactly_rho_n_of_the_students_patches():
    from juicer_pipeline.governance.pruning import kept_on_grid

    maps = np.zeros((3, 14 * 14), np.float32)
    maps[:, :] = np.random.default_rng(0).random((3, 196)) * 0.1
    blob = np.zeros((14, 14), np.float32)
    blob[:5, :5] = 1.0  # a salient object in the top-left corner of a 14×14 (ViT-B/16) grid
    maps[0] += blob.ravel()
    for rho in (0.1, 0.25, 0.5):
        kept = kept_on_grid(maps, (14, 14), (8, 8), rho)
        for k in kept:
            assert len(k) == len(set(k.tolist())) == int(np.ceil(rho * 64)) and 0 <= k.min() and k.max() < 64
    top = kept_on_grid(maps, (14, 14), (8, 8), 0.1)[0]  # 7 patches: all inside the blob's 8×8 footprint
    assert all(divmod(int(i), 8)[0] < 3 and divmod(int(i), 8)[1] < 3 for i in top)
    with pytest.raises(ValueError, match="14x14"):
        kept_on_grid(maps[:, :100], (14, 14), (8, 8), 0.5)


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


def test_per_class_accuracy_names_each_class():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    acc = per_class_accuracy(images, torch.eye(3)[:, :2], [0, 0, 1], ["star", "ring", "cross"])
    assert acc["star"] == pytest.approx(0.5) and acc["ring"] == pytest.approx(1.0)
    assert np.isnan(acc["cross"])  # no image of that class


def test_linear_probe_reads_what_the_embedding_encodes():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=gen)
    centres = torch.randn(4, 16, generator=gen) * 3
    emb = centres[labels] + torch.randn(400, 16, generator=gen)
    train, test = slice(0, 300), slice(300, 400)
    assert linear_probe_accuracy(emb[train], labels[train], emb[test], labels[test]) > 0.95
    # labels the embedding does not encode: near chance (1/4), however well the probe fits its training set
    shuffled = labels[torch.randperm(400, generator=gen)]
    assert linear_probe_accuracy(emb[train], shuffled[train], emb[test], shuffled[test]) < 0.45
    with torch.inference_mode():  # the student benchmark calls it while evaluating under inference mode
        inference_emb = emb * 1.0
        assert linear_probe_accuracy(inference_emb[train], labels[train], inference_emb[test], labels[test]) > 0.95


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


def test_re_encoded_or_resized_evaluation_images_are_held_out():
    from PIL import Image

    from juicer_pipeline.governance.near_duplicates import thumbprint
    from juicer_pipeline.world.generate import eval_spec, iter_clean_samples, jpeg_roundtrip
    from juicer_pipeline.world.vocabulary import load_vocabulary

    vocab = load_vocabulary()
    split, spec = eval_spec("retrieval")
    images = [r.image for _, r, _ in iter_clean_samples(split, spec, 60, 0, vocab)]
    held_out, others = images[:30], images[30:]  # `others` are distinct images of the same world
    copies = [jpeg_roundtrip(held_out[0], 40), held_out[1].resize((96, 96), Image.BICUBIC),
              jpeg_roundtrip(held_out[2].resize((48, 48), Image.BICUBIC), 60)]
    drop = copies + others
    samples = pd.DataFrame([{"sample_id": f"d/{i}", "drop_id": "d", "content_hash": f"h{i}", "status": "valid",
                             "caption": "c", "enriched_caption": "c", "kept": None, "sieve_score": 0.5,
                             "thumbprint": thumbprint(im)} for i, im in enumerate(drop)])
    members, excluded = assemble_training_set(RECIPES["raw"], samples, set(), 1.0,
                                              eval_prints=[thumbprint(im) for im in held_out])
    assert dict(zip(excluded.sample_id, excluded.reason)) == {"d/0": "held_out", "d/1": "held_out", "d/2": "held_out"}
    assert len(members) == len(others)  # no distinct image is mistaken for an evaluation image


def test_a_valid_copy_of_a_quarantined_sample_is_not_a_duplicate():
    samples = pd.DataFrame([
        {"sample_id": "d1/a", "drop_id": "d1", "content_hash": "h1", "status": "quarantined", "caption": None,
         "enriched_caption": None, "kept": None, "sieve_score": None},  # e.g. its caption was empty
        {"sample_id": "d2/a", "drop_id": "d2", "content_hash": "h1", "status": "valid", "caption": "a",
         "enriched_caption": "A.", "kept": None, "sieve_score": 0.5},
        {"sample_id": "d2/b", "drop_id": "d2", "content_hash": "h1", "status": "valid", "caption": "a again",
         "enriched_caption": "A.", "kept": None, "sieve_score": 0.5},
    ])
    members, excluded = assemble_training_set(RECIPES["raw"], samples, set(), 1.0)
    assert list(members.sample_id) == ["d2/a"]
    assert dict(zip(excluded.sample_id, excluded.reason)) == {"d1/a": "quarantined", "d2/b": "duplicate"}


def test_salient_only_evaluation_feeds_only_the_kept_patches():
    from open_clip.tokenizer import SimpleTokenizer

    from juicer_pipeline.training.evaluation import EvalSet, evaluate_student

    torch.manual_seed(0)
    model = build_clip(tiny_arch()).eval()
    seen = []
    model.visual.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    tok = SimpleTokenizer(context_length=16)
    ev = EvalSet(retrieval_images=torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8),
                 retrieval_tokens=tok(["a red star."] * 6), retrieval_keys=list(range(6)),
                 class_images=torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8),
                 class_labels=np.array([0, 1, 2, 4]), class_names=["star", "ring", "heart", "cross", "arrow"], class_attributes=("red",),
                 retrieval_kept=torch.arange(4).expand(6, 4), class_kept=torch.arange(4).expand(4, 4))
    full = evaluate_student(model, tok, ev)
    assert set(seen) == {17} and full["images_per_second"] > 0
    seen.clear()
    salient = evaluate_student(model, tok, ev, salient_only=True)
    assert set(seen) == {5}  # CLS + the 4 kept patches, for every evaluation image
    assert set(salient) == set(full)
    with pytest.raises(ValueError, match="kept patches"):
        evaluate_student(model, tok, EvalSet(**{**ev.__dict__, "class_kept": None}), salient_only=True)


def test_salient_kept_selects_rho_n_patches_per_image_with_the_governor():
    from juicer_pipeline.governance.salient_eval import salient_kept
    from juicer_pipeline.models.loader import load_foundation_model
    from juicer_pipeline.settings import SaliencySettings

    governor = load_foundation_model("world")
    images = torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8)
    kept = salient_kept(governor, images, SaliencySettings(rho=0.25), (4, 4))  # a student with a coarser grid
    assert kept.shape == (3, 4) and int(kept.max()) < 16


PATCH_LOCAL_STEMS = {"hmlp": dict(hmlp_stem=True), "patch conv": dict(conv_stem=True, patch_local_stem=True)}


@pytest.mark.parametrize("stem", PATCH_LOCAL_STEMS)
def test_patch_local_stem_embeds_only_the_kept_patches_with_the_same_result(stem):
    torch.manual_seed(0)
    model = build_clip(tiny_arch(**PATCH_LOCAL_STEMS[stem])).eval()
    kept = install_kept_tokens(model)
    x = torch.randn(3, 3, 32, 32)
    idx = torch.tensor([[0, 5, 10, 15], [1, 2, 3, 4], [0, 7, 14, 15]])
    embedded = []
    first_layer = next(m for m in model.visual.conv1.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    first_layer.register_forward_hook(lambda m, args, out: embedded.append(out.shape[0]))
    kept.indices = idx
    pruned = model.encode_image(x)  # the stem embeds 3 x 4 patches only
    model.visual.conv1.kept_source = None  # now it embeds all 3 x 16, and the kept ones are gathered after
    reference = model.encode_image(x)
    assert embedded == [12, 48]
    assert torch.allclose(pruned, reference, atol=1e-5)


def _token_change_when_top_left_patch_changes(**stem_arch) -> torch.Tensor:
    """How much each token of a 2x2 patch grid changes when only the top-left patch's pixels do."""
    torch.manual_seed(0)
    stem_module = build_clip(tiny_arch(image_size=16, **stem_arch)).visual.conv1.eval()
    x = torch.randn(1, 3, 16, 16)
    y = x.clone()
    y[:, :, :8, :8] += 1.0
    return (stem_module(x) - stem_module(y)).abs().sum(dim=1)[0]


@pytest.mark.parametrize("stem", PATCH_LOCAL_STEMS)
def test_patch_local_stem_is_patch_local(stem):
    diff = _token_change_when_top_left_patch_changes(**PATCH_LOCAL_STEMS[stem])
    assert diff[0, 0] > 0 and diff[0, 1] == diff[1, 0] == diff[1, 1] == 0


def test_whole_image_conv_stem_sees_across_patch_borders():
    # the contrast that makes the patch-local variant a different model, not a faster same one
    diff = _token_change_when_top_left_patch_changes(conv_stem=True)
    assert diff[0, 1] > 0 and diff[1, 0] > 0


def test_patch_local_stem_trains_a_pruned_step_in_bf16():
    torch.manual_seed(0)
    model = build_clip(tiny_arch(conv_stem=True, patch_local_stem=True)).train()
    kept = install_kept_tokens(model)
    kept.indices = torch.tensor([[0, 5, 10, 15], [1, 2, 3, 4]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = itc.clip_loss(model, torch.randn(2, 3, 32, 32), torch.randint(1, 1000, (2, 16)))
    loss.backward()
    assert torch.isfinite(loss) and model.visual.conv1.conv.net[0].weight.grad.abs().sum() > 0


def test_stem_choices_are_checked():
    with pytest.raises(ValueError, match="one stem"):
        build_clip(tiny_arch(hmlp_stem=True, conv_stem=True))
    with pytest.raises(ValueError, match="needs conv_stem"):
        build_clip(tiny_arch(patch_local_stem=True))


def test_library_preprocessing_equals_the_hand_written_one():
    from PIL import Image

    from juicer_pipeline.models.loader import OPENAI_MEAN, OPENAI_STD, simple_preprocess

    rng = np.random.default_rng(0)
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    for size in ((64, 64), (80, 48)):  # already at size, and resized
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        resized = img if img.size == (64, 64) else img.resize((64, 64), Image.BICUBIC)
        by_hand = (torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1) - mean) / std
        assert torch.allclose(simple_preprocess(64)(img), by_hand, atol=1e-6)
