"""Caption refiners: the rules table, and the transformers backend with a tiny local model."""
import math

import numpy as np
import pytest

from juicer_pipeline.assets.text import object_vocabulary
from juicer_pipeline.settings import ClassSettings
from juicer_pipeline.governance.caption_refiner import (Refined, RulesRefiner, TransformersRefiner, caption_version,
                                                       clean_caption, enrichment_by_class, strip_enrichment,
                                                       validate)

VOCAB = object_vocabulary(ClassSettings())

RULES_TABLE = [
    # (raw caption, extracted classes, expected rules output)
    ("<p>A red star.</p>", [], "A red star."),
    ("&quot;A purple arrow on a striped background.</div>", [], "A purple arrow on a striped background."),
    ("http://cdn.example-shop.com/img/5.jpg A pink heart. https://www.example.com/p/1", [], "A pink heart."),
    ("IMG_2043.JPG a blue ring", [], "A blue ring."),
    ("DSC1234.jpg - a blue star - buy now, best price!!", [], "A blue star."),
    ("A cyan triangle. (c) 2019 All rights reserved", [], "A cyan triangle."),
    ("A red star | Free shipping on orders over $50", [], "A red star."),
    ("Stock photo: a green cross #art #design #shapes", [], "A green cross."),
    ("A PHOTO OF A BLUE RING AND AN ORANGE PENTAGON.", [], "A photo of a blue ring and an orange pentagon."),
    ("a photo of an orange hexagon...", [], "A photo of an orange hexagon."),
    ("a  red   star  ,  and a circle !!!", [], "A red star, and a circle."),
    ("A red hexagno.", [], "A red hexagon."),  # one swapped letter in a vocabulary word
    ("A red star.", ["star"], "A red star."),  # already mentioned: not repeated
    ("Two red stars.", ["star"], "Two red stars."),  # plural form counts as a mention
    ("A blue disk.", ["circle"], "A blue disk."),  # synonym counts as a mention
    ("A red star.", ["star", "circle"], "A red star, with a circle."),
    ("A photo of a ring.", ["arrow", "heart"], "A photo of a ring, with an arrow and a heart."),
    ("IMG_1.JPG", ["star"], "A photo of a star."),  # empty after cleaning, classes known
]


@pytest.mark.parametrize("raw,classes,expected", RULES_TABLE)
def test_rules_table(raw, classes, expected):
    assert RulesRefiner(VOCAB).refine_one(raw, classes).text == expected


def test_caption_version_says_what_happened():
    refiner = RulesRefiner(VOCAB)
    cases = {"A red star.": ([], "original"), "<p>a red star</p>": ([], "cleaned"),
             "A red star, really.": (["star"], "original"),  # the class is already there: nothing added
             "A red thing.": (["star"], "enriched"), "<p>IMG_1.JPG</p>": (["heart"], "enriched")}
    for raw, (classes, version) in cases.items():
        assert caption_version(raw, refiner.refine_one(raw, classes)) == version, raw


def test_caption_empty_after_cleaning_without_classes_is_counted():
    refiner = RulesRefiner(VOCAB)
    out = refiner.refine(["<p></p>", "www.example.com", "A star."], [[], [], []])
    assert [o.text for o in out] == ["An image.", "An image.", "A star."]
    assert refiner.fallbacks == {"empty_after_cleaning": 2}
    assert clean_caption("   ") == ""


@pytest.mark.parametrize("raw,classes", [("<p>A red thing.</p>", ["star"]), ("a red star", ["heart", "ring", "arrow"]),
                                         ("<p>IMG_1.JPG</p>", ["heart", "star"]), ("A blue ring!!", [])])
def test_strip_enrichment_gives_back_the_rectified_caption(raw, classes):
    out = RulesRefiner(VOCAB).refine_one(raw, classes)
    cleaned = clean_caption(raw, VOCAB)
    assert strip_enrichment(out.text, out.classes_used) == cleaned
    # an LM's own sentence is not the rules' phrase: it stays whole
    assert strip_enrichment("A heart beside a star.", ["heart", "star"]) == "A heart beside a star."


def test_enrichment_by_class_counts_what_was_added_and_what_the_caption_named():
    extracted = [["star", "circle"], ["star"], ["heart"], []]
    refined = [Refined("A red star, with a circle.", "rules", ["circle"]), Refined("A red star.", "rules", []),
               Refined("A red star, with a heart.", "rules", ["heart"]), Refined("A blue ring.", "rules", [])]
    rows = {r["class"]: r for r in enrichment_by_class(extracted, refined, VOCAB)}
    assert rows["star"] == {"class": "star", "extracted": 2, "added": 0, "extracted_not_added": 2, "already_named": 3}
    assert rows["circle"] == {"class": "circle", "extracted": 1, "added": 1, "extracted_not_added": 0,
                              "already_named": 0}
    assert rows["ring"]["already_named"] == 1 and rows["ring"]["extracted"] == 0  # named, never extracted
    assert set(rows) == {"star", "circle", "heart", "ring"}  # classes with no count are left out


def test_validation_reasons():
    prompt = "Rewrite ... Caption: a red star\nRewritten:"
    assert validate("A red star and a circle.", prompt, "a red star", ["circle"], VOCAB) is None
    assert validate("", prompt, "a red star", ["circle"], VOCAB) == "empty"
    assert validate("A red star.", prompt, "a red star", ["circle"], VOCAB) == "missing_class"
    assert validate("A red star, a circle and a heart.", prompt, "a red star", ["circle"], VOCAB) == "new_object"
    assert validate("x" * 400 + " circle", prompt, "a red star", ["circle"], VOCAB) == "length"
    assert validate(prompt, prompt, "a red star", [], VOCAB) == "copied_prompt"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A T5 built from config with a word-level tokenizer: no download, random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    words = "a an the red blue star circle ring with and photo of caption rewritten mention objects".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    cfg = T5Config(vocab_size=len(vocab), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    folder = tmp_path_factory.mktemp("tiny_t5")
    T5ForConditionalGeneration(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_transformers_backend_batches_and_falls_back_per_sample(tiny_lm):
    refiner = TransformersRefiner(tiny_lm, VOCAB, batch_size=4, max_new_tokens=8)
    captions = [f"<p>a red star number {i}</p>" for i in range(10)]
    out = refiner.refine(captions, [["circle"]] * 10)
    assert refiner.generate_calls == math.ceil(10 / 4)
    assert len(out) == 10
    # a random tiny model cannot write valid captions: every sample falls back to rules, with a reason
    assert all(o.backend == "rules" and o.fallback_reason for o in out)
    assert sum(refiner.fallbacks.values()) == 10
    assert out[0].text == RulesRefiner(VOCAB).refine_one(captions[0], ["circle"]).text


def test_transformers_backend_keeps_valid_outputs(tiny_lm, monkeypatch):
    refiner = TransformersRefiner(tiny_lm, VOCAB, batch_size=8)
    monkeypatch.setattr(refiner, "_generate", lambda prompts: ["a red star and a blue circle", "", "a heart"])
    out = refiner.refine(["a red star", "a red star", "a red star"], [["circle"], ["circle"], ["circle"]])
    assert out[0].backend == "transformers" and out[0].text == "A red star and a blue circle."
    assert out[0].classes_used == ["circle"]
    assert [o.fallback_reason for o in out[1:]] == ["empty", "missing_class"]


def test_transformers_backend_needs_a_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="caption model folder not found"):
        TransformersRefiner(tmp_path / "nope", VOCAB)


def test_matched_caption_percentile_tells_a_domain_model_from_chance():
    from juicer_pipeline.governance.metrics import matched_caption_percentile

    rng = np.random.default_rng(0)
    images = rng.normal(size=(300, 32))
    aligned = images + 0.3 * rng.normal(size=images.shape)  # a model that knows the pairs
    assert matched_caption_percentile(images, aligned) > 0.95
    unrelated = rng.normal(size=images.shape)  # a model that does not: chance
    assert abs(matched_caption_percentile(images, unrelated) - 0.5) < 0.05
    same = np.tile(rng.normal(size=(1, 32)), (300, 1))  # one caption for every image: ties count half
    assert matched_caption_percentile(images, same) == 0.5
    assert np.isnan(matched_caption_percentile(images[:1], aligned[:1]))
    # bounded cost: a subset spread over the set, still deciding the same way
    assert matched_caption_percentile(images, aligned, max_samples=50) > 0.9


def test_caption_percentiles_put_a_caption_of_another_image_low():
    from juicer_pipeline.governance.metrics import caption_percentiles, matched_caption_percentile

    rng = np.random.default_rng(1)
    images = rng.normal(size=(400, 32))
    captions = images + 0.3 * rng.normal(size=images.shape)
    captions[7] = captions[8]  # image 7 carries image 8's caption
    pct = caption_percentiles(images, captions, chunk=64)  # several chunks: the same as one
    assert pct.shape == (400,) and np.allclose(pct, caption_percentiles(images, captions))
    assert pct[7] < 0.9 and np.median(np.delete(pct, 7)) > 0.99
    assert np.isclose(np.mean(pct), matched_caption_percentile(images, captions, max_samples=400))
    assert np.isnan(caption_percentiles(images[:1], captions[:1])).all()


class CaptionIndexModel:
    """A governor stand-in whose text embedding of "Caption i." is image i's embedding plus noise:
    it knows which caption fits which image, as a governor of the domain does."""

    def __init__(self, image_emb: np.ndarray, knows_domain: bool = True):
        self.image_emb, self.knows_domain = image_emb, knows_domain
        self.rng = np.random.default_rng(3)

    def encode_text(self, texts, batch_size=None):
        import re

        import torch

        out = []
        for t in texts:
            m = re.search(r"\d+", t)
            base = self.image_emb[int(m.group())] if m and self.knows_domain else self.rng.normal(size=self.image_emb.shape[1])
            out.append(base + 0.2 * self.rng.normal(size=len(base)))
        v = np.stack(out) if out else np.zeros((0, self.image_emb.shape[1]))
        return torch.from_numpy(v / np.linalg.norm(v, axis=1, keepdims=True)).float()


def test_a_caption_of_another_image_is_replaced_by_its_classes():
    from juicer_pipeline.assets.text import MISALIGNED, enrich_captions

    rng = np.random.default_rng(0)
    image_emb = rng.normal(size=(120, 16))
    image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
    ids = [f"s{i}" for i in range(120)]
    captions = {s: f"<p>Caption {i}.</p>" for i, s in enumerate(ids)}
    captions["s5"] = "Caption 77."  # a web caption copied from another page
    captions["s6"] = "IMG_9.JPG"  # empty after cleaning: nothing to replace, enriched as before
    classes = {"s5": ["star"], "s6": ["ring"], "s8": ["heart"]}
    named = {}

    def choose(sid, names):  # what the pipeline's AdditionRule decides, here: every class not named
        named[sid] = names
        return [c for c in classes.get(sid, []) if c not in names]

    r = enrich_captions(CaptionIndexModel(image_emb), RulesRefiner(VOCAB), ids, image_emb, captions, classes, 64,
                        choose, misaligned_below=0.5)
    by_id = {s: (v, x) for s, v, x in zip(ids, r.versions, r.refined)}
    assert r.replaced == 1 and by_id["s5"][0] == "replaced"
    assert by_id["s5"][1].text == "A photo of a star." and by_id["s5"][1].fallback_reason == MISALIGNED
    assert named["s5"] == set()  # a replaced caption names nothing: it claims no region
    assert r.caption_percentile[5] < 0.5 < np.median(r.caption_percentile)
    assert by_id["s6"][1].text == "A photo of a ring." and by_id["s6"][0] == "enriched"
    assert by_id["s8"][1].text == "Caption 8, with a heart." and by_id["s8"][0] == "enriched"
    assert r.table.column("caption_percentile").to_pylist()[5] == pytest.approx(r.caption_percentile[5])
    # a governor that does not know the domain ranks every caption at chance: nothing is replaced
    blind = enrich_captions(CaptionIndexModel(image_emb, knows_domain=False), RulesRefiner(VOCAB), ids, image_emb,
                            captions, classes, 64, choose, misaligned_below=0.5)
    assert blind.replaced == 0 and blind.refined[5].text == "Caption 77, with a star."
    # 0 never replaces
    assert enrich_captions(CaptionIndexModel(image_emb), RulesRefiner(VOCAB), ids, image_emb, captions, classes, 64,
                           choose, misaligned_below=0.0).replaced == 0
