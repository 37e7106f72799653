"""Caption refiners: rectify a noisy web caption and mention the extracted classes.

One small interface, two backends:
- `RulesRefiner` (default): deterministic cleaning and enrichment;
- `TransformersRefiner`: a local seq2seq or instruct LM (never downloaded), batched; every output
  is validated and replaced by the rules result for that sample when invalid, with the reason.
"""
from __future__ import annotations

import html
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .prompts import with_article


@dataclass(frozen=True)
class ObjectVocabulary:
    """Class names with their synonyms, for mention detection and typo repair."""

    names: tuple[str, ...]
    synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    attributes: tuple[str, ...] = ()  # e.g. colours: repaired like names, never added

    def forms(self, name: str) -> list[str]:
        words = [name, *self.synonyms.get(name, ())]
        return [f for w in words for f in (w, _plural(w))]

    def mentioned(self, text: str) -> set[str]:
        low = text.lower()
        return {n for n in self.names if any(re.search(rf"\b{re.escape(f)}\b", low) for f in self.forms(n))}


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "sh", "ch")) else "s")


@dataclass
class Refined:
    text: str
    backend: str
    classes_used: list[str]
    fallback_reason: str | None = None


def caption_version(raw: str, refined: Refined) -> str:
    """What happened to a caption: `enriched` (at least one extracted class added), `cleaned`
    (the text changed, no class added) or `original` (unchanged)."""
    if refined.classes_used:
        return "enriched"
    return "original" if refined.text == raw else "cleaned"


# --- rules --------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]*>")
_ENTITY = re.compile(r"&[#\w]+;")
_URL = re.compile(r"\b(?:https?://|www\.)\S+", re.I)
_FILE = re.compile(r"\b[\w-]+\.(?:jpe?g|png|gif|webp|bmp|tiff?)\b", re.I)
_HASHTAG = re.compile(r"(?:^|\s)#\w+")
_BOILERPLATE = re.compile(
    r"(?<!\w)(?:free shipping[^.|]*|buy now[^.|]*|best price[^.|]*|click here[^.|]*|stock photo:?|"
    r"\(c\)[^.|]*|©[^.|]*|copyright[^.|]*|all rights reserved[^.|]*|download[^.|]*now|(?:&|and) more(?=\W*$))",
    re.I)
_SEPARATORS = re.compile(r"\s+[|–—-]\s+|\s*\|\s*")
_REPEATED = re.compile(r"([!?.,;:])(?:\s*[!?.,;:])+")
_SPACE_BEFORE = re.compile(r"\s+([,.;:!?])")


def clean_caption(text: str, vocab: ObjectVocabulary | None = None) -> str:
    """Strip markup, URLs, file names and SEO boilerplate; fix punctuation, spacing and casing."""
    text = html.unescape(_TAG.sub(" ", text))
    text = _ENTITY.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _FILE.sub(" ", text)
    text = _HASHTAG.sub(" ", text)
    # boilerplate often hangs off a separator: keep the segments that are not boilerplate
    segments = [s for s in _SEPARATORS.split(text) if s.strip() and not _BOILERPLATE.fullmatch(s.strip(" .!"))]
    text = " ".join(_BOILERPLATE.sub(" ", s) for s in segments)
    text = text.replace('"', " ").replace("“", " ").replace("”", " ")
    text = _REPEATED.sub(lambda m: m.group(1) if m.group(1) in ",;:" else ".", text)
    text = re.sub(r"\s+", " ", _SPACE_BEFORE.sub(r"\1", text)).strip(" ,;:-")
    if vocab is not None:
        text = _repair_words(text, vocab)
    letters = [c for c in text if c.isalpha()]
    if letters and sum(c.isupper() for c in letters) > 0.6 * len(letters):
        text = text.lower()  # SHOUTING
    text = text.strip()
    if not text or not any(c.isalnum() for c in text):
        return ""
    text = text[0].upper() + text[1:]
    if text[-1] not in ".!?":
        text += "."
    return re.sub(r"[.!?]+$", ".", text)


def _repair_words(text: str, vocab: ObjectVocabulary) -> str:
    """Fix one swapped or dropped letter in vocabulary words ("hexagno" → "hexagon")."""
    known = {f for n in vocab.names for f in vocab.forms(n)} | set(vocab.attributes)

    def fix(m: re.Match) -> str:
        word = m.group(0)
        low = word.lower()
        if low in known or len(low) < 4:
            return word
        for k in known:
            if _one_edit(low, k):
                return k
        return word

    return re.sub(r"[A-Za-z]+", fix, text)


def _one_edit(a: str, b: str) -> bool:
    """True when a and b differ by one adjacent transposition, insertion or deletion."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def enrich(text: str, classes: list[str], vocab: ObjectVocabulary) -> tuple[str, list[str]]:
    """Mention the classes the caption does not already mention, in a natural phrase."""
    missing = [c for c in classes if c not in vocab.mentioned(text)]
    if not missing:
        return text, []
    phrase = _join([with_article(c) for c in missing])
    if not text:
        return f"A photo of {phrase}.", missing
    return f"{text.rstrip('.!?')}, with {phrase}.", missing


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def strip_enrichment(text: str, classes_used: list[str]) -> str:
    """The rectified caption before `enrich` added `classes_used`: what rectification alone made
    of the web caption, so that it can be scored apart from enrichment. A text that does not end
    in the rules' phrase (an LM's own sentence) is returned whole: its rectification and
    enrichment cannot be told apart."""
    if not classes_used:
        return text
    phrase = _join([with_article(c) for c in classes_used])
    if text == f"A photo of {phrase}.":
        return ""
    suffix = f", with {phrase}."
    return text[: -len(suffix)] + "." if text.endswith(suffix) else text


def enrichment_by_class(extracted: list[list[str]], refined: list[Refined], vocab: ObjectVocabulary) -> list[dict]:
    """Per class, over a drop's captions, what enrichment did without any ground truth: how many
    captions the class was extracted for, added to (the addition rule decides per region, at its
    own τ, so an added class need not be among the extracted ones), extracted for but not added to
    (the caption named it, or its region was claimed or below the addition τ), and how many
    captions named it themselves (extracted or not). Classes with no count are left out: a real
    vocabulary has far more classes than a drop shows."""
    counts: dict[str, Counter] = {}
    for classes, r in zip(extracted, refined):
        added = set(r.classes_used)
        own = vocab.mentioned(r.text) - added  # what the rectified caption names by itself
        for key, names in (("extracted", set(classes)), ("added", added),
                           ("extracted_not_added", set(classes) - added), ("already_named", own)):
            for c in names:
                counts.setdefault(c, Counter())[key] += 1
    keys = ("extracted", "added", "extracted_not_added", "already_named")
    rows = [{"class": c, **{k: int(counts[c][k]) for k in keys}} for c in counts]
    return sorted(rows, key=lambda r: (-r["added"], r["class"]))


class RulesRefiner:
    name = "rules"

    def __init__(self, vocab: ObjectVocabulary):
        self.vocab = vocab
        self.fallbacks: Counter = Counter()

    def refine_one(self, caption: str, classes: list[str]) -> Refined:
        cleaned = clean_caption(caption, self.vocab)
        text, used = enrich(cleaned, classes, self.vocab)
        reason = None
        if not text:
            text, reason = "An image.", "empty_after_cleaning"
            self.fallbacks[reason] += 1
        return Refined(text, self.name, used, reason)

    def refine(self, captions: list[str], classes: list[list[str]]) -> list[Refined]:
        return [self.refine_one(c, k) for c, k in zip(captions, classes)]


# --- transformers ------------------------------------------------------------------

PROMPT = ("Rewrite this image caption as one clean, grammatical sentence. Remove web boilerplate. "
          "Mention these objects: {objects}. Do not mention any other object.\nCaption: {caption}\nRewritten:")


def validate(output: str, prompt: str, caption: str, classes: list[str], vocab: ObjectVocabulary,
             max_chars: int = 300) -> str | None:
    """Why an LM output cannot be used (a short reason), or None when it can."""
    text = output.strip()
    if not text:
        return "empty"
    if text in prompt and len(text) > 0.5 * len(prompt) or text.startswith("Rewrite this image caption"):
        return "copied_prompt"
    if len(text) < 3 or len(text) > max_chars:
        return "length"
    mentioned = vocab.mentioned(text)
    if any(c not in mentioned for c in classes):
        return "missing_class"
    if mentioned - set(classes) - vocab.mentioned(caption):
        return "new_object"
    return None


class TransformersRefiner:
    """A local seq2seq (T5-style) or causal instruct LM, loaded from a path only."""

    name = "transformers"

    def __init__(self, model_path: str | Path, vocab: ObjectVocabulary, batch_size: int = 16,
                 max_new_tokens: int = 48, device: str = "cpu"):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        path = Path(model_path)
        if not path.is_dir():
            raise FileNotFoundError(f"caption model folder not found: {path}. Put a local seq2seq or instruct "
                                    f"LM there (config.json, weights, tokenizer files); nothing is downloaded.")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        cls = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        self.model = cls.from_pretrained(path, local_files_only=True).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not self.seq2seq:
            self.tokenizer.padding_side = "left"  # causal generation continues from the right end
        self.torch, self.device = torch, device
        self.vocab, self.batch_size, self.max_new_tokens = vocab, batch_size, max_new_tokens
        self.rules = RulesRefiner(vocab)
        self.fallbacks: Counter = Counter()
        self.generate_calls = 0

    def _generate(self, prompts: list[str]) -> list[str]:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=256).to(self.device)
        with self.torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        self.generate_calls += 1
        if not self.seq2seq:
            out = out[:, enc["input_ids"].shape[1]:]
        return [t.strip().split("\n")[0] for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def refine(self, captions: list[str], classes: list[list[str]]) -> list[Refined]:
        results: list[Refined] = []
        for start in range(0, len(captions), self.batch_size):
            caps, cls = captions[start:start + self.batch_size], classes[start:start + self.batch_size]
            # the LM sees the rules-cleaned caption: markup and URLs are not worth its tokens
            cleaned = [clean_caption(c, self.vocab) for c in caps]
            prompts = [PROMPT.format(objects=", ".join(k) or "none", caption=c) for c, k in zip(cleaned, cls)]
            for caption, k, prompt, output in zip(caps, cls, prompts, self._generate(prompts)):
                reason = validate(output, prompt, caption, k, self.vocab)
                if reason is None:
                    text = clean_caption(output)
                    results.append(Refined(text, self.name, [c for c in k if c not in self.vocab.mentioned(caption)]))
                else:
                    self.fallbacks[reason] += 1
                    fallback = self.rules.refine_one(caption, k)
                    results.append(Refined(fallback.text, "rules", fallback.classes_used, reason))
        return results
