"""The pure method: ingestion, saliency, pruning, classes, captions, sieve, recipes, metrics.

No Dagster import here: every function can be called from a notebook, a test or a script.
"""
