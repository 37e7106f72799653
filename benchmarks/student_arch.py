"""Which student learns enough within the CPU budget: `raw` trained straight on world data.

    .venv/bin/python benchmarks/student_arch.py                               # the default student
    .venv/bin/python benchmarks/student_arch.py --student benchmarks/student_configs/world-s-patchify.json --schedule constant
    .venv/bin/python benchmarks/student_arch.py --shared-colour 0 --budget 300 --samples 8000
    .venv/bin/python benchmarks/student_arch.py --patches saliency --tune-lr-scale 0   # salient patches, old tuning

Generates `--samples` web-like drop samples in memory (the drops' corruption, JPEG-decoded as
ingestion would) and the clean held-out sets, trains one student per seed with the recipe `raw`
(all patches, original captions) on a budget of full-patch steps, and prints the learning curve
(held-out t2i/i2t R@1 and zero-shot top-1 at each evaluation point) and the step time. With
`--patches saliency` (or `random`) the student is fed the governor-salient (or random) ⌈ρN⌉
patches, then tuned on full patches, as `juicer_vision_only` (or `flip`) would be. It skips
the pipeline (no Dagster; the governor only for `--patches saliency`), so one architecture or
schedule change costs one training run.

After training it also prints zero-shot top-1 per shape, and a linear probe: a logistic regression
fitted on the frozen image embeddings of `--probe-samples` labelled single-object images (a split
of their own) and scored on the held-out classification set. A probe far above zero-shot means the
image tower encodes shape and the text side does not name it; a probe near zero-shot means the
image tower has not learned it.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def world_train_data(n_samples: int, coverage: float, shared_colour: float, image_size: int, tokenizer,
                     hard_negatives: bool, size_jitter: tuple[float, float], coverage_shared_by: int):
    from juicer_pipeline.training import TrainData
    from juicer_pipeline.governance.images import to_uint8_chw
    from juicer_pipeline.world import DropConfig
    from juicer_pipeline.world.generate import drop_samples, jpeg_roundtrip
    from juicer_pipeline.world.vocabulary import load_vocabulary

    vocab = load_vocabulary()
    cfg = DropConfig(n_samples=n_samples, seed=100, object_coverage=coverage, shared_colour=shared_colour,
                     size_jitter=size_jitter, coverage_shared_by=coverage_shared_by)
    images, captions = [], []
    for s in drop_samples(cfg, "bench", vocab):
        if s.broken is None:  # ingestion would quarantine a broken file
            images.append(to_uint8_chw(jpeg_roundtrip(s.rendered.image, 92), image_size))
            captions.append(s.caption)
    data = TrainData(torch.stack(images), tokenizer(captions), None, "all")
    if hard_negatives:
        from juicer_pipeline.governance.hard_negatives import swap_negative_tokens

        data.negatives, data.has_negative = swap_negative_tokens(captions, list(vocab.shapes), tokenizer)
    return data


def world_eval_set(n: int, coverage: float, shared_colour: float, image_size: int, tokenizer,
                   coverage_shared_by: int):
    from juicer_pipeline.training import EvalSet
    from juicer_pipeline.training.evaluation import caption_key
    from juicer_pipeline.governance.images import to_uint8_chw
    from juicer_pipeline.world.generate import eval_spec, iter_clean_samples
    from juicer_pipeline.world.vocabulary import load_vocabulary

    vocab = load_vocabulary()
    split, spec = eval_spec("retrieval", image_size, coverage, shared_colour, coverage_shared_by)
    ret = list(iter_clean_samples(split, spec, n, 0, vocab))
    split, spec = eval_spec("classification", image_size, coverage)
    cls = list(iter_clean_samples(split, spec, n, 0, vocab))
    captions = [c for _, _, c in ret]
    return EvalSet(
        retrieval_images=torch.stack([to_uint8_chw(r.image) for _, r, _ in ret]),
        retrieval_tokens=tokenizer(captions),
        retrieval_keys=[caption_key(c, vocab.shapes, vocab.colour_names) for c in captions],
        class_images=torch.stack([to_uint8_chw(r.image) for _, r, _ in cls]),
        class_labels=np.array([vocab.shapes.index(s.objects[0].shape) for s, _, _ in cls]),
        class_names=list(vocab.shapes), class_attributes=vocab.colour_names)


def probe_set(n: int, coverage: float, image_size: int):
    """Labelled single objects drawn like the classification held-out set, from the probe split."""
    from juicer_pipeline.governance.images import to_uint8_chw
    from juicer_pipeline.world.generate import SPLIT_PROBE, eval_spec, iter_clean_samples
    from juicer_pipeline.world.vocabulary import load_vocabulary

    vocab = load_vocabulary()
    _, spec = eval_spec("classification", image_size, coverage)
    samples = list(iter_clean_samples(SPLIT_PROBE, spec, n, 0, vocab))
    return (torch.stack([to_uint8_chw(r.image) for _, r, _ in samples]),
            np.array([vocab.shapes.index(s.objects[0].shape) for s, _, _ in samples]))


@torch.inference_mode()
def print_zero_shot_by_object_size(model, tokenizer, ev, coverage: float, image_size: int, seed: int,
                                   n: int = 1000, factors=(0.5, 1.0, 2.0)) -> None:
    """Zero-shot top-1 on single objects drawn like the classification held-out set but at other
    object areas (× factor): how far the student's shape recognition carries across object size.
    Factor 1 is the held-out set's own size (its first n images)."""
    from juicer_pipeline.training import zero_shot_classifier
    from juicer_pipeline.governance.images import to_uint8_chw
    from juicer_pipeline.world.generate import eval_spec, iter_clean_samples
    from juicer_pipeline.world.governor_training import encode_images
    from juicer_pipeline.world.vocabulary import load_vocabulary

    vocab = load_vocabulary()
    model.eval()
    classes = zero_shot_classifier(model, tokenizer, ev)
    parts = []
    for factor in factors:
        split, spec = eval_spec("classification", image_size, coverage * factor)
        samples = list(iter_clean_samples(split, spec, n, 0, vocab))
        held = encode_images(model, torch.stack([to_uint8_chw(r.image) for _, r, _ in samples]))
        labels = torch.as_tensor([vocab.shapes.index(s.objects[0].shape) for s, _, _ in samples])
        accuracy = ((held @ classes.T).argmax(1) == labels).float().mean().item()
        parts.append(f"{factor:g}× area {100 * accuracy:.1f}")
    print(f"  seed {seed}: zero-shot top-1 by object size ({n} single objects each, held-out set's area = 1×): "
          + ", ".join(parts), flush=True)


@torch.inference_mode()
def print_probe(model, tokenizer, ev, probe_images, probe_labels, seed: int) -> None:
    from juicer_pipeline.training import zero_shot_classifier
    from juicer_pipeline.governance.metrics import linear_probe_accuracy, per_class_accuracy
    from juicer_pipeline.world.governor_training import encode_images

    model.eval()
    held = encode_images(model, ev.class_images)
    classes = zero_shot_classifier(model, tokenizer, ev)
    per_class = per_class_accuracy(held, classes, ev.class_labels, ev.class_names)
    probe = linear_probe_accuracy(encode_images(model, probe_images), probe_labels, held, ev.class_labels)
    print(f"  seed {seed}: zero-shot top-1 per shape: " + ", ".join(f"{k} {100 * v:.0f}" for k, v in per_class.items()))
    print(f"  seed {seed}: linear probe top-1 {100 * probe:.1f} (fitted on {len(probe_labels)} probe-split images) "
          f"on the held-out classification set", flush=True)


def with_patches(data, ev, patches: str, cfg) -> None:
    """Feed the student pruned patches: the committed world governor's salient ⌈ρN⌉ of each
    training image (as `pruned_images` would store them) or random ones; the evaluation images get
    their salient patches too, for the salient-token score."""
    import torch

    from juicer_pipeline.governance.salient_eval import salient_kept
    from juicer_pipeline.models.loader import load_foundation_model
    from juicer_pipeline.settings import SaliencySettings

    governor = load_foundation_model("world", cfg.device)
    saliency, grid = SaliencySettings(rho=cfg.rho), (cfg.arch.grid, cfg.arch.grid)
    data.patches = patches
    if patches == "saliency":
        data.kept = salient_kept(governor, data.images, saliency, grid).to(torch.int16)
    ev.retrieval_kept = salient_kept(governor, ev.retrieval_images, saliency, grid)
    ev.class_kept = salient_kept(governor, ev.class_images, saliency, grid)


def main() -> None:
    from juicer_pipeline.models.students import STUDENTS

    ap = argparse.ArgumentParser()
    ap.add_argument("--student", default=None, help=f"student config: {', '.join(STUDENTS)} or a JSON file")
    ap.add_argument("--budget", type=int, default=None, help="budget in full-patch steps (default: settings)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--schedule", choices=["cosine", "constant"], default=None)
    ap.add_argument("--samples", type=int, default=10000, help="training pool (drop samples)")
    ap.add_argument("--coverage", type=float, default=0.25)
    ap.add_argument("--shared-colour", type=float, default=None, help="world: P(all objects share a colour)")
    ap.add_argument("--size-jitter", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                    help="world: range of the factor on each drop object's size (default: DropConfig's)")
    ap.add_argument("--coverage-shared-by", type=int, default=None, metavar="K",
                    help="world: size every drop (and held-out retrieval) object as one of K sharing --coverage, "
                         "whatever the scene's count; 0: the scene's objects share it, so a lone object has twice the "
                         "area of each of two (default: DropConfig's)")
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--eval-points", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="bf16: training steps under autocast")
    ap.add_argument("--hard-negatives", action="store_true", help="vocabulary-swap hard negative captions")
    ap.add_argument("--probe-samples", type=int, default=2000, help="linear-probe training images (0: no probe)")
    ap.add_argument("--patches", choices=["all", "saliency", "random"], default="all",
                    help="what the vision tower is fed: all patches (raw), the governor-salient ⌈ρN⌉ "
                         "(vision-only juicing) or random ⌈ρN⌉ (FLIP), then the full-patch tuning phase")
    ap.add_argument("--tune-lr-scale", type=float, default=None, help="full-patch tuning phase's peak lr / lr")
    a = ap.parse_args()

    from open_clip.tokenizer import SimpleTokenizer

    from juicer_pipeline.training import student_config
    from juicer_pipeline.training import evaluate_student, train_student
    from juicer_pipeline.settings import JuicerSettings, TrainingSettings
    from juicer_pipeline.world import DropConfig

    defaults = TrainingSettings()
    training = TrainingSettings(**{k: v for k, v in dict(
        student=a.student, budget_full_steps=a.budget, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup,
        schedule=a.schedule, seeds=a.seeds, eval_points=a.eval_points, device=a.device,
        tune_lr_scale=a.tune_lr_scale, precision=a.precision).items() if v is not None})
    world = DropConfig()
    shared_colour = world.shared_colour if a.shared_colour is None else a.shared_colour
    size_jitter = world.size_jitter if a.size_jitter is None else tuple(a.size_jitter)
    sizing = world.coverage_shared_by if a.coverage_shared_by is None else a.coverage_shared_by
    cfg = student_config(JuicerSettings(training=training))
    tokenizer = SimpleTokenizer(context_length=cfg.arch.context_length)
    t0 = time.perf_counter()
    data = world_train_data(a.samples, a.coverage, shared_colour, cfg.arch.image_size, tokenizer, a.hard_negatives,
                            size_jitter, sizing)
    ev = world_eval_set(a.eval_samples, a.coverage, shared_colour, cfg.arch.image_size, tokenizer, sizing)
    if a.patches != "all":
        with_patches(data, ev, a.patches, cfg)
    print(f"data: {len(data.images)} training pairs, {len(ev.retrieval_images)} retrieval + "
          f"{len(ev.class_images)} classification held-out images, {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"student {training.student} {cfg.arch.to_dict()}, params "
          f"{sum(p.numel() for p in __import__('juicer_pipeline.models.world_clip', fromlist=['x']).build_clip(cfg.arch).parameters()) / 1e6:.2f}M; "
          f"batch {cfg.batch_size}, lr {cfg.lr}, warmup {cfg.warmup_steps}, schedule {cfg.schedule}, {cfg.precision}, "
          f"budget {training.budget_full_steps} full-patch steps, world shared_colour {shared_colour}, size jitter "
          f"{size_jitter}, coverage shared by {sizing} "
          f"(defaults: {defaults.student}, {defaults.budget_full_steps} steps)", flush=True)
    probe = probe_set(a.probe_samples, a.coverage, cfg.arch.image_size) if a.probe_samples else None
    finals = []
    for seed in a.seeds:
        model, rec = train_student(data, cfg, seed, evaluate=lambda m: evaluate_student(m, tokenizer, ev, cfg.device))
        for p in rec["learning_curve"]:
            print(f"  seed {seed} step {p['step']:4d} ({p['train_seconds']:6.1f}s): t2i R@1 {100 * p['t2i_r@1']:5.1f}  "
                  f"i2t R@1 {100 * p['i2t_r@1']:5.1f}  zero-shot top-1 {100 * p['top1']:5.1f}", flush=True)
        if a.patches != "all":
            s = evaluate_student(model, tokenizer, ev, cfg.device, salient_only=True)
            print(f"  seed {seed}: on the governor-salient ⌈ρN⌉ tokens only: t2i R@1 {100 * s['t2i_r@1']:5.1f}  "
                  f"zero-shot top-1 {100 * s['top1']:5.1f}", flush=True)
        finals.append(rec["learning_curve"][-1])
        print(f"  seed {seed}: {rec['steps']} steps, {rec['wall_seconds']:.0f}s training, "
              f"{rec['phases'][0]['step_seconds']:.3f} s/step, final loss {rec['final_loss']:.3f}", flush=True)
        if probe is not None:
            print_probe(model, tokenizer, ev, *probe, seed)
            print_zero_shot_by_object_size(model, tokenizer, ev, a.coverage, cfg.arch.image_size, seed,
                                           n=min(1000, a.eval_samples))
    for m in ("t2i_r@1", "i2t_r@1", "top1"):
        v = np.array([f[m] for f in finals]) * 100
        print(f"final {m}: {v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}")


if __name__ == "__main__":
    main()
