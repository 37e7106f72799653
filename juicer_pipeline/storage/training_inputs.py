"""What a training set is assembled from: the juiced samples of every drop and the held-out images
it must not contain (DuckDB over the warehouse's Parquet), and the drops left out."""
from __future__ import annotations

import pandas as pd

from .catalog import Catalog

# the per-drop assets a training set reads, each partition a Parquet file keyed by sample_id
PER_DROP_INPUTS = ("raw_samples", "pruned_images", "enriched_captions", "sieve_scores")


def deleted_drops(catalog: Catalog) -> set[str]:
    """Drops whose folder the drop sensor found deleted (their rows stay in the catalog, marked)."""
    return set(catalog.query("SELECT drop_id FROM drops WHERE status = 'deleted'").drop_id)


def juiced_samples(wh, drops: list[str]) -> pd.DataFrame:
    """Every ingested sample of the drops, joined with its juice: caption versions, kept patches and
    sieve score."""
    files = {a: [wh.partition_path(a, d) for d in drops] for a in PER_DROP_INPUTS}
    with wh.duckdb() as con:
        return con.execute("""
            SELECT r.sample_id, r.drop_id, r.content_hash, r.status, r.caption, r.thumbprint,
                   c.enriched_caption, c.caption_version AS enriched_version, p.kept, s.sieve_score
            FROM read_parquet(?, union_by_name = true) r
            LEFT JOIN read_parquet(?) p USING (sample_id)
            LEFT JOIN read_parquet(?) c USING (sample_id)
            LEFT JOIN read_parquet(?) s USING (sample_id)""",
            [files["raw_samples"], files["pruned_images"], files["enriched_captions"], files["sieve_scores"]]).df()


def held_out_images(wh) -> pd.DataFrame:
    """content_hash and thumbprint of every held-out evaluation image (asset `eval_sets`)."""
    with wh.duckdb() as con:
        return con.execute("SELECT content_hash, thumbprint FROM read_parquet(?, union_by_name = true) "
                           "WHERE content_hash IS NOT NULL", [f"{wh.asset_dir('eval_sets')}/*.parquet"]).df()
