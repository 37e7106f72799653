"""`juicer report`: one static HTML page of the latest recipe comparison and its lineage."""
from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path

from .storage import Catalog, Warehouse, atomic_path
from .storage.records import checkpoints_overview, current_governor, training_sets_overview
from .storage.results import HEADLINE, comparison_table


def write_report(wh: Warehouse, out: Path | None = None) -> Path:
    cat = Catalog(wh.catalog_path)
    table = comparison_table(cat)
    sets, ckpts, gov = training_sets_overview(cat), checkpoints_overview(cat), current_governor(cat)
    chart = wh.object_path("recipe_comparison", "learning_curves_tokens.png")
    img = (f'<img alt="learning curves" src="data:image/png;base64,'
           f'{base64.b64encode(wh.filesystem.cat_file(chart)).decode()}">' if wh.exists(chart) else "")
    rows = "".join(
        "<tr>" + f"<td>{html.escape(r['recipe'])}</td><td>{r['seeds']}</td><td>{r['tokens_seen']:,}</td>"
        f"<td>{r['samples_seen']:,}</td><td>{r['step_seconds']:.3f}</td>"
        + "".join(f"<td>{100 * r[m + '_mean']:.1f} ± {100 * r[m + '_std']:.1f}</td>" for m in HEADLINE) + "</tr>"
        for r in table.to_dict("records"))
    lineage = "".join(
        f"<tr><td>{html.escape(s.recipe)}</td><td><code>{s.training_set_id[:16]}</code></td><td>{s.n_members}</td>"
        f"<td>{html.escape(', '.join(json.loads(s.drops)))}</td><td>{html.escape(s.excluded)}</td></tr>"
        for s in sets.itertuples())
    checkpoints = "".join(
        f"<tr><td>{html.escape(c.recipe)}</td><td>{c.seed}</td><td><code>{c.checkpoint_id[:16]}</code></td>"
        f"<td>{c.tokens_seen:,}</td><td>{c.samples_seen:,}</td><td>{c.wall_seconds:.0f}</td></tr>"
        for c in ckpts.itertuples())
    governor = (f"<p>Governor <code>{gov.model_id[0]}</code> ({html.escape(gov.source[0])}), τ = {gov.tau[0]:.2f}</p>"
                if len(gov) else "")
    head = "".join(f"<th>{m}</th>" for m in HEADLINE)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>juicer-pipeline recipe comparison</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head><body>
<h1>Recipe comparison</h1><p>Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} from {html.escape(str(wh.catalog_path))}.
Held-out scores in %, mean ± std over seeds, every recipe at the same vision-token budget.</p>{governor}
<table><tr><th>recipe</th><th>seeds</th><th>tokens seen</th><th>samples seen</th><th>step s</th>{head}</tr>{rows}</table>
{img}<h2>Lineage</h2><p>Trace any checkpoint to its samples with <code>juicer lineage &lt;checkpoint id&gt;</code>.</p>
<table><tr><th>recipe</th><th>training set</th><th>members</th><th>drops</th><th>excluded</th></tr>{lineage}</table>
<table><tr><th>recipe</th><th>seed</th><th>checkpoint</th><th>tokens</th><th>samples</th><th>wall s</th></tr>{checkpoints}</table>
</body></html>"""
    out = out or wh.root / "report.html"
    with atomic_path(out) as tmp:
        tmp.write_text(page)
    return out
