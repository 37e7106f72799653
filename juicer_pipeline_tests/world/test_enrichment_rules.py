"""benchmarks/enrichment_rules.py scores a rule's additions against truth as `juicer truth` does."""
import importlib.util
import sys
from pathlib import Path

import numpy as np

from juicer_pipeline.governance.classes import NEVER

_SPEC = importlib.util.spec_from_file_location(
    "enrichment_rules", Path(__file__).resolve().parents[2] / "benchmarks" / "enrichment_rules.py")
rules = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = rules  # dataclasses look their module up there
_SPEC.loader.exec_module(rules)

NAMES = ["circle", "heart", "star"]
# image 0: a circle the caption omits (the governor is sure); image 1: a star, named, with a heart
# the governor half-believes in; image 2: a circle the caption names, and nothing else
DROP = rules.Drop("d", np.array([[0.97, 0.02, 0.01], [0.01, 0.75, 0.24], [0.90, 0.05, 0.05]]),
                  truth=[{"circle"}, {"star"}, {"circle"}], named=[set(), {"star"}, {"circle"}])


def test_outcome_counts_foreign_coverage_and_additions():
    none = rules.outcome(DROP, NAMES, lambda i: set())
    assert none == (0.0, 2 / 3, 0, 0)  # image 0's circle is not named yet
    at_07 = rules.outcome(DROP, NAMES, lambda i: rules.top_k(DROP.scores[i], NAMES, 0.7, k=3))
    assert at_07 == (1 / 3, 1.0, 1, 1)  # the circle filled, the false heart added to image 1
    at_09 = rules.outcome(DROP, NAMES, lambda i: rules.top_k(DROP.scores[i], NAMES, 0.9, k=3))
    assert at_09 == (0.0, 1.0, 1, 0)  # image 2's named circle is never counted as an addition


def test_per_class_tau_calibrates_on_additions_only():
    taus = rules.per_class_tau(DROP, NAMES, precision=0.9, min_support=1)
    # circle candidates: image 0 (true, 0.97) and image 1 (false, 0.01); image 2 names it, so its
    # 0.90 is no candidate. The grid's smallest τ, 0.05, already leaves image 0 alone: precision 1.0
    assert taus[0] == 0.05
    assert taus[1] == NEVER and taus[2] == NEVER  # every heart and star candidate is false
