"""Vocabulary-swap hard negatives: the captions they make, the loss they enter, training with them."""
import pytest
import torch

from juicer_pipeline.training import trainer
from juicer_pipeline.training import loss as itc
from juicer_pipeline.training.config import StudentConfig
from juicer_pipeline.training.trainer import TrainData, train_student
from juicer_pipeline.governance.hard_negatives import swap_negatives
from juicer_pipeline.models.world_clip import build_clip, tiny_arch

NAMES = ["circle", "star", "heart", "red panda"]


def test_one_class_name_is_swapped_for_another_and_the_rest_is_untouched():
    captions = ["A red star and a red heart.", "Stock photo: STAR on grass", "a starfish, no class here", "",
                "a red panda beside a circle"]
    negs = swap_negatives(captions, NAMES, seed=3)
    assert negs[2] is None and negs[3] is None  # whole words only: "starfish" names no class
    for caption, neg in zip([captions[0], captions[1], captions[4]], [negs[0], negs[1], negs[4]]):
        assert neg is not None and _one_name_swapped(caption, neg), (caption, neg)
    assert negs[1].endswith(" on grass") and negs[1].startswith("Stock photo: ")
    assert "star" not in negs[1].lower()  # the only name was swapped (case-insensitively found)
    assert swap_negatives(captions, NAMES, seed=3) == negs  # deterministic
    plurals = swap_negatives(["three purple circles", "two red crosses"], ["circle", "cross", "star"], seed=1)
    assert plurals[0] in ("three purple crosses", "three purple stars")
    assert plurals[1] in ("two red circles", "two red stars")
    red_panda = swap_negatives(["a red panda"] * 20, NAMES, seed=0)
    assert all(n.startswith("a ") and "red panda" not in n for n in red_panda)  # the two-word name is one name


def _one_name_swapped(caption: str, neg: str) -> bool:
    """neg is caption with exactly one occurrence of a class name replaced by another class name."""
    import re

    for name in NAMES:
        for m in re.finditer(re.escape(name), caption, re.IGNORECASE):
            for other in NAMES:
                if other != name and caption[:m.start()] + other + caption[m.end():] == neg:
                    return True
    return False


def test_a_negative_cut_off_by_the_context_is_no_negative():
    from open_clip.tokenizer import SimpleTokenizer

    from juicer_pipeline.governance.hard_negatives import swap_negative_tokens

    long = "Stock photo: " + "very " * 30 + "a red star."
    tokens, has = swap_negative_tokens(["a red star.", long, "no class"], NAMES, SimpleTokenizer(context_length=16))
    assert has.tolist() == [True, False, False] and tokens.shape == (3, 16)


def test_swap_needs_two_names():
    with pytest.raises(ValueError, match="two class names"):
        swap_negatives(["a star"], ["star"])


def test_loss_with_negatives_is_the_image_to_text_softmax_over_positives_and_negatives():
    torch.manual_seed(0)
    model = build_clip(tiny_arch()).eval()
    images, tokens, negatives = torch.randn(5, 3, 32, 32), torch.randint(1, 100, (5, 16)), torch.randint(1, 100, (3, 16))
    f = torch.nn.functional
    img = f.normalize(model.encode_image(images), dim=-1)
    txt = f.normalize(model.encode_text(tokens), dim=-1)
    neg = f.normalize(model.encode_text(negatives), dim=-1)
    scale = model.logit_scale.exp().clamp(max=100)
    labels = torch.arange(5)
    by_hand = 0.5 * (f.cross_entropy(scale * img @ torch.cat([txt, neg]).T, labels)
                     + f.cross_entropy(scale * txt @ img.T, labels))
    assert itc.clip_loss(model, images, tokens, negatives).item() == pytest.approx(by_hand.item(), abs=1e-6)
    # no negatives (or none in this batch) is exactly the plain loss
    plain = itc.clip_loss(model, images, tokens).item()
    assert itc.clip_loss(model, images, tokens, negatives[:0]).item() == pytest.approx(plain, abs=1e-7)
    assert by_hand.item() > plain  # the negatives compete with the positives


def test_training_feeds_only_the_rows_that_have_a_negative(monkeypatch):
    n = 32
    g = torch.Generator().manual_seed(0)
    data = TrainData(torch.randint(0, 255, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.randint(1, 100, (n, 16), generator=g), None, "all",
                     negatives=torch.randint(1, 100, (n, 16), generator=g),
                     has_negative=torch.arange(n) % 2 == 0)
    seen = []
    real = trainer.clip_loss
    monkeypatch.setattr(trainer, "clip_loss",
                        lambda model, images, tokens, negatives=None: seen.append(len(negatives)) or real(
                            model, images, tokens, negatives))
    cfg = StudentConfig(arch=tiny_arch(), batch_size=8, budget_tokens=8 * 17 * 4, eval_points=1, warmup_steps=1)
    _, rec = train_student(data, cfg, seed=0)
    assert rec["steps"] == 4 and sum(seen) == 16  # each epoch's 32 rows hold 16 with a negative


def test_hard_negatives_with_data_parallel_training_is_a_settings_error():
    from pydantic import ValidationError

    from juicer_pipeline.settings import TrainingSettings

    with pytest.raises(ValidationError, match="hard_negatives needs training.processes = 1"):
        TrainingSettings(hard_negatives=True, processes=2, batch_size=8)
    assert TrainingSettings(hard_negatives=True).hard_negatives
