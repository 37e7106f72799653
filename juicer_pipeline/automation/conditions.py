"""Declarative automation: what re-materialises by itself, and when.

- Per-drop stages re-run for a drop when an upstream stage of that drop updated (`eager`) or when
  their code version changed (a setting they read changed); the drop sensor handles new drops.
- The governor re-resolves when missing or when its settings or weights changed.
- Training is not triggered by drops: the nightly schedule requests the stale recipes only.
- The comparison follows its scores.
"""
from dagster import AutomationCondition

_NOT_BUSY = ~AutomationCondition.in_progress() & ~AutomationCondition.any_deps_in_progress()
RERUN_ON_SETTINGS = AutomationCondition.code_version_changed() & _NOT_BUSY
PER_DROP = AutomationCondition.eager() | RERUN_ON_SETTINGS
SHARED = AutomationCondition.on_missing() | RERUN_ON_SETTINGS
FOLLOW_UPSTREAM = AutomationCondition.eager()
