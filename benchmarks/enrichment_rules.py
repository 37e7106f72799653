#!/usr/bin/env python
"""Enrichment rules against truth, offline: what each rule would add to the captions of juiced world
drops, decided from the class scores `extracted_classes` already stored (the best region's
probability per class), without running the governor again.

    benchmarks/enrichment_rules.py --data-dir data --drops demo-00 demo-01

Per rule and drop it prints the share of captions mentioning a foreign object after enrichment, the
share mentioning every true object, and the true / false classes added. The rules:
- `tau=<t>`: one threshold on what is added (at most k classes per image, as the pipeline);
- `per-class τ (fit on <drop>)`: `calibrate_tau_per_class` on the first drop's additions against its
  *truth*, applied to every drop: an upper bound for per-class calibration, not a method;
- `conflict q=<q>`: no addition to a caption that names a class the governor also scores ≥ q;
- `claims <c>, τ=<t>` (drops juiced with `region_probs`): the pipeline's rule, `caption_additions`:
  a named class claims every region it scores ≥ c on, every other region adds its top class ≥ τ;
and, for misaligned captions, how many named-but-absent classes a score floor would catch against
how many named-and-present ones it would wrongly drop.

This reads the world's truth: it is a truth metric, like `juicer truth`; the pipeline never does.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from juicer_pipeline.governance.caption_refiner import strip_enrichment
from juicer_pipeline.governance.classes import NEVER, AdditionRule, calibrate_tau_per_class
from juicer_pipeline.world.truth_metrics import world_object_vocabulary, load_truth


@dataclass
class Drop:
    name: str
    scores: np.ndarray  # [N, C] stored class scores
    truth: list[set[str]]  # true classes per image
    named: list[set[str]]  # classes the rectified caption names (before enrichment)
    regions: list | None = None  # per image its regions' probabilities, where stored


def load_drop(data: Path, drop: str, vocab) -> Drop:
    truth = load_truth(data / "drops" / drop, drop)
    cls = pq.read_table(data / "warehouse" / "extracted_classes" / f"{drop}.parquet").to_pandas().set_index("sample_id")
    cap = pq.read_table(data / "warehouse" / "enriched_captions" / f"{drop}.parquet").to_pandas().set_index("sample_id")
    ids = [s for s in cap.index if s in truth.index and s in cls.index]
    named = [vocab.mentioned(strip_enrichment(cap.enriched_caption[s], list(cap.classes_used[s]))) for s in ids]
    regions = [np.asarray(list(cls.region_probs[s]), dtype=np.float64) for s in ids] if "region_probs" in cls else None
    return Drop(drop, np.stack([np.asarray(cls.scores[s]) for s in ids]),
                [set(truth.loc[s, "classes"]) for s in ids], named, regions)


def outcome(d: Drop, names: list[str], choose) -> tuple[float, float, int, int]:
    """(foreign share, every-true-object share, true added, false added) when `choose(i)` gives the
    classes image i would add."""
    foreign = covered = added_true = added_false = 0
    for i, (true, named) in enumerate(zip(d.truth, d.named)):
        add = choose(i) - named
        after = named | add
        foreign += bool(after - true)
        covered += true <= after
        added_true, added_false = added_true + len(add & true), added_false + len(add - true)
    return foreign / len(d.truth), covered / len(d.truth), added_true, added_false


def top_k(scores: np.ndarray, names: list[str], tau, k: int) -> set[str]:
    tau = np.broadcast_to(np.asarray(tau, dtype=np.float64), scores.shape)
    return {names[j] for j in np.argsort(-scores, kind="stable")[:k] if scores[j] >= tau[j]}


def per_class_tau(d: Drop, names: list[str], precision: float, min_support: int = 20) -> np.ndarray:
    """`calibrate_tau_per_class` on what would be *added*: a class a caption already names is never
    a candidate there, so each τ reaches `precision` on this drop's additions against its truth."""
    candidates = d.scores.copy()
    for i, named in enumerate(d.named):
        candidates[i, [names.index(n) for n in named]] = -1.0
    truth = [{names.index(n) for n in t} for t in d.truth]
    return calibrate_tau_per_class(candidates, truth, precision, min_support=min_support)


def print_row(rule: str, d: Drop, result) -> None:
    foreign, covered, t, f = result
    print(f"  {rule:42s} {d.name}: foreign {foreign:.3f}  every true object {covered:.3f}  added true {t} / false {f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--drops", nargs="+", required=True)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--taus", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    args = ap.parse_args()
    vocab = world_object_vocabulary()
    names = list(vocab.names)
    drops = [load_drop(args.data_dir, d, vocab) for d in args.drops]
    for d in drops:
        before = outcome(d, names, lambda i: set())
        print(f"{d.name}: {len(d.truth)} captions; before enrichment foreign {before[0]:.3f}, "
              f"every true object {before[1]:.3f}")
    for tau in args.taus:
        for d in drops:
            print_row(f"tau={tau}", d, outcome(d, names, lambda i, d=d: top_k(d.scores[i], names, tau, args.k)))
    for precision in (0.9, 0.95):
        taus = per_class_tau(drops[0], names, precision)
        print(f"per-class τ at precision {precision} (fit on {drops[0].name}'s truth): "
              + ", ".join(f"{n} {t:.3f}" if t < NEVER else f"{n} never" for n, t in zip(names, taus)))
        for d in drops:
            print_row(f"per-class τ {precision} (fit on {drops[0].name})", d,
                      outcome(d, names, lambda i, d=d: top_k(d.scores[i], names, taus, args.k)))
    for tau, q in ((0.7, 0.05), (0.7, 0.2), (0.9, 0.05)):
        for d in drops:
            def conflict_free(i, d=d):
                named_scores = [d.scores[i, names.index(n)] for n in d.named[i]]
                return set() if named_scores and max(named_scores) >= q else top_k(d.scores[i], names, tau, args.k)
            print_row(f"conflict q={q}, tau={tau}", d, outcome(d, names, conflict_free))
    for claim in (0.05, 0.1):
        for tau in args.taus:
            for d in drops:
                if d.regions is None:
                    continue
                rule = AdditionRule(tuple(names), tau, claim, args.k)
                print_row(f"claims {claim}, tau={tau}", d,
                          outcome(d, names, lambda i, d=d, rule=rule: set(rule.classes(d.regions[i], d.named[i]))))
    print("misaligned captions: named classes the governor scores below a floor")
    for d in drops:
        present = np.array([d.scores[i, names.index(n)] for i, t in enumerate(d.truth) for n in d.named[i] if n in t])
        absent = np.array([d.scores[i, names.index(n)] for i, t in enumerate(d.truth) for n in d.named[i] if n not in t])
        for floor in (0.001, 0.01, 0.1):
            print(f"  {d.name} floor {floor}: catches {(absent < floor).sum()} of {len(absent)} named-but-absent, "
                  f"drops {(present < floor).sum()} of {len(present)} named-and-present")


if __name__ == "__main__":
    main()
