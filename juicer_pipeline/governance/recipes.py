"""Data recipes compared at an equal budget of vision tokens (docs/benchmarks.md has the comparison)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    name: str
    sieve: bool  # keep only the top sieve fraction of samples by governor image-text cosine
    patches: str  # 'all' | 'random' | 'saliency'
    caption: str  # 'original' | 'enriched'
    description: str


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("raw", False, "all", "original", "all valid samples, all patches, original captions"),
    Recipe("datasieve", True, "all", "original", "top sieve fraction by governor cosine (sample-level sieve)"),
    Recipe("flip", False, "random", "original", "random ⌈ρN⌉ patches per image and step (FLIP)"),
    Recipe("datajuicer", False, "saliency", "enriched", "top ⌈ρN⌉ salient patches, enriched captions"),
    Recipe("juicer_vision_only", False, "saliency", "original", "salient patches, original captions"),
    Recipe("juicer_text_only", False, "all", "enriched", "all patches, enriched captions"),
    Recipe("sieve_then_juice", True, "saliency", "enriched", "sieved samples, salient patches, enriched captions"),
]}
RECIPE_NAMES = list(RECIPES)
