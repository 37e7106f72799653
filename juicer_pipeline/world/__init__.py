"""Synthetic image-text world with ground truth (no Dagster import)."""
from .captions import CaptionCorruption
from .generate import (DropConfig, GenerationReport, demo_drop_configs, generate_corpus, generate_drop,
                       generate_eval_set)
from .vocabulary import Vocabulary, load_vocabulary
from .writers import READY_MARKER, TRUTH_FILE

__all__ = ["CaptionCorruption", "DropConfig", "GenerationReport", "READY_MARKER", "TRUTH_FILE", "Vocabulary",
           "demo_drop_configs", "generate_corpus", "generate_drop", "generate_eval_set", "load_vocabulary"]
