"""A human-readable model card written beside trained weights."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path


def write_model_card(weights: Path, model_id: str, record: dict) -> Path:
    s = record.get("scores", {})
    cfg = record.get("config", {})
    lines = [
        f"# Model card: {Path(weights).name}",
        "",
        "A small open_clip CLIP (ViT with a convolutional stem) pretrained on the synthetic world's clean",
        "corpus, which is drawn from a distribution disjoint from the drops (other background families,",
        "other object sizes, its own seeds). It is the default *governor* of juicer-pipeline.",
        "",
        *_term_lines(cfg),
        f"- model id (sha256 of the weights file): `{model_id}`",
        f"- reproduce: `{record.get('command', 'juicer governor train')}`",
        f"- seed {cfg.get('seed')}, steps {record.get('steps_done')}, batch {cfg.get('batch_size')}, "
        f"lr {cfg.get('lr')}, corpus {record.get('corpus_images')} images",
        f"- wall time: {record.get('train_seconds')} s training, {record.get('total_seconds')} s in all "
        f"(2 CPU threads)",
        f"- architecture: `{json.dumps(cfg.get('arch', {}))}`",
        "",
        "## Corpus validation (what the governor is chosen on)",
        "",
        "Its own corpus generator, validation seeds: drop-like scenes (the drops' object sizes, the corpus's",
        "backgrounds) for retrieval, square crops around their objects for shape naming, crops of bare",
        "background for the abstain class, single corpus objects for zero-shot; `saliency_recall@0.5` is",
        "the share of the scenes' object patches among the top half of patches by smoothed attention",
        "rollout (what pruning keeps at ρ = 0.5); `maskclip_pointing` the share of (scene, shape in it) whose",
        "patch most like the shape's text embedding, read the MaskCLIP way, lies on that shape.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in s.items() if k != "step"]
    held = record.get("held_out_scores", {})
    if held:
        lines += ["", "## Held-out scores (the world's clean evaluation sets; reported, never used to choose)", "",
                  "| metric | value |", "|---|---|"]
        reported = ("semantic", "zeroshot", "saliency", "maskclip")
        lines += [f"| {k} | {v:.3f} |" for k, v in held.items() if k.startswith(reported)]
    if cfg.get("init"):
        lines += ["", f"Warm start: fine-tuned from `{cfg['init']}` (the previous governor, its own model card in "
                      "the repository history)."]
    lines += ["", "Semantic recall counts a retrieved item as a hit when it shows the same objects as the",
              "query (captions cannot tell such images apart); instance recall needs the exact pair.",
              "Zero-shot: 10 shape classes, prompts averaged over templates and colours.", ""]
    lines += ["## Learning curve (corpus validation, every evaluation)", "",
              "| step | sem. i2t R@1 | sem. t2i R@1 | zero-shot top-1 | crop shape top-1 | saliency recall "
              "| MaskCLIP pointing |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {e['step']} | {e['semantic_i2t_r@1']:.3f} | {e['semantic_t2i_r@1']:.3f} | {e['zeroshot_top1']:.3f} "
              f"| {e.get('crop_shape_top1', float('nan')):.3f} | {e.get('saliency_recall@0.5', float('nan')):.3f} "
              f"| {e.get('maskclip_pointing', float('nan')):.3f} |"
              for e in record.get("evals", [])]
    path = Path(weights).with_suffix(".md")
    path.write_text("\n".join(lines) + "\n")
    return path


# The training terms beside the contrastive loss a card names, by their config key.
_TERMS = (
    ("saliency_weight", "Objectness term", "beside the contrastive loss, the CLS attention rollout of each whole "
     "corpus scene is pulled towards the patches its objects cover (the render's own masks, never a drop's truth), "
     "so the saliency the pipeline prunes by follows objects."),
    ("dense_weight", "Dense word-patch term", "each whole corpus scene's patches, read the MaskCLIP way (the last "
     "block's value path), are pulled onto the class text of what fills them (a shape, or the background prompt), "
     "so its patch embeddings stay in the text's space while the objectness term reshapes its attention."),
)


def _term_lines(cfg: dict) -> list[str]:
    lines = []
    for key, name, what in _TERMS:
        if cfg.get(key):
            lines += [*textwrap.wrap(f"{name} (weight {cfg[key]}): {what}", 100), ""]
    return lines
