"""`juicer` console entry: argument parsing and one small function per command."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import duckdb

from .storage import Catalog, CatalogLocked, CommitLog, Warehouse, default_data_dir
from .world import CaptionCorruption, DropConfig, generate_corpus, generate_drop, generate_eval_set

log = logging.getLogger("juicer")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Dagster's instance migrations are noise here
    args = _parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"juicer: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (CatalogLocked, duckdb.Error, OSError, RuntimeError) as exc:  # a locked or broken catalog, a full disk...
        print(f"juicer: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="juicer", description="Token-level governance of image-text data.")
    sub = p.add_subparsers(required=True, metavar="command")
    for add in (_add_demo, _add_world, _add_governor, _add_truth, _add_lineage, _add_export, _add_report, _add_status, _add_catalog):
        add(sub)
    return p


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="generate the demo world (if absent) and juice its drops")
    demo.add_argument("--drops", type=int, default=2, help="number of demo drops (default 2)")
    demo.add_argument("--samples", type=int, default=1500, help="samples per demo drop (default 1500)")
    demo.add_argument("--eval-samples", type=int, default=2000, help="images per held-out set (default 2000)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--skip-training", action="store_true", help="juice the drops but train no recipe")
    demo.set_defaults(func=cmd_demo)


def _add_world(sub) -> None:
    world = sub.add_parser("world", help="generate synthetic-world data").add_subparsers(required=True, metavar="what")
    drop = world.add_parser("drop", help="a web-like corrupted drop with its _truth.parquet")
    drop.add_argument("out", type=Path, help="drop folder to create (e.g. data/drops/my-drop)")
    drop.add_argument("--samples", type=int, default=1000)
    drop.add_argument("--seed", type=int, default=0)
    drop.add_argument("--index", type=int, default=0, help="drop index: distinct drops of one world")
    drop.add_argument("--format", choices=["folder", "wds"], default="folder")
    drop.add_argument("--manifest", choices=["parquet", "csv", "jsonl"], default="parquet")
    drop.add_argument("--image-format", choices=["jpg", "png"], default="jpg")
    drop.add_argument("--image-size", type=int, default=64)
    drop.add_argument("--coverage", type=float, default=0.25, help="object coverage: share of the image on objects")
    base = CaptionCorruption()
    for name in ("boilerplate", "noise", "omit", "misaligned"):
        drop.add_argument(f"--{name}", type=float, default=getattr(base, name), help=f"{name} caption rate")
    drop.add_argument("--shared-colour", type=float, default=DropConfig.shared_colour,
                      help="probability that all objects of a scene share one colour")
    drop.add_argument("--coverage-shared-by", type=int, default=DropConfig.coverage_shared_by,
                      help="size every object as one of this many sharing --coverage, whatever the scene's count "
                           "(0: the scene's objects share it, so a lone object has twice the area of each of two)")
    drop.add_argument("--duplicates", type=float, default=DropConfig.duplicate_rate)
    drop.add_argument("--broken", type=float, default=DropConfig.broken_rate)
    drop.add_argument("--empty-captions", type=float, default=DropConfig.empty_caption_rate)
    drop.set_defaults(func=cmd_world_drop)
    corpus = world.add_parser("corpus", help="the governor's clean corpus (disjoint distribution)")
    corpus.add_argument("out", type=Path)
    corpus.add_argument("--samples", type=int, default=20000)
    corpus.add_argument("--seed", type=int, default=0)
    corpus.set_defaults(func=cmd_world_corpus)
    evalsets = world.add_parser("evalsets", help="clean held-out retrieval and classification sets")
    evalsets.add_argument("out", type=Path, help="folder that receives retrieval/ and classification/")
    evalsets.add_argument("--samples", type=int, default=2000)
    evalsets.add_argument("--seed", type=int, default=0)
    evalsets.set_defaults(func=cmd_world_evalsets)


def _add_governor(sub) -> None:
    gov = sub.add_parser("governor", help="the world governor").add_subparsers(required=True, metavar="what")
    train = gov.add_parser("train", help="pretrain the world governor on the clean corpus (a long CPU run)")
    train.add_argument("--out", type=Path, default=None,
                       help="weights file (default: <data dir>/models/world_governor.safetensors; the packaged "
                            "governor is replaced only when named here explicitly)")
    train.add_argument("--steps", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--warmup", type=int, default=None)
    train.add_argument("--eval-every", type=int, default=None)
    train.add_argument("--crop-scenes", type=int, default=None,
                       help="drop-like corpus scenes whose object and background crops join the corpus")
    train.add_argument("--init", default=None, help="warm start from these weights (a world CLIP file)")
    train.add_argument("--jpeg-rate", type=float, default=None, help="share of images re-encoded as JPEG")
    train.add_argument("--saliency-weight", type=float, default=None,
                       help="weight of the objectness term: the CLS attention rollout (the pipeline's saliency) is "
                            "pulled towards the patches each corpus scene's objects cover (default 0: off)")
    train.add_argument("--dense-weight", type=float, default=None,
                       help="weight of the dense word-patch term: each corpus scene's patches, read the MaskCLIP way, "
                            "are pulled onto the class text of what fills them (default 0: off)")
    train.add_argument("--crop-coverage-shared-by", type=int, default=None,
                       help="how the crop scenes size objects: 0 shares the coverage among a scene's objects "
                            "(default), 2 sizes them as today's drops do")
    train.add_argument("--whole-crop-scenes", action="store_true", default=None,
                       help="the drop-like scenes that object crops are cut from also join the corpus whole")
    train.set_defaults(func=cmd_governor_train)


def _add_truth(sub) -> None:
    truth = sub.add_parser("truth", help="truth metrics of a juiced world drop (saliency and classes)")
    truth.add_argument("drop", help="drop name (partition key) under the data dir's drops/")
    truth.add_argument("--rho", type=float, default=None, help="ρ to evaluate (default: the configured one)")
    truth.set_defaults(func=cmd_truth)


def _add_lineage(sub) -> None:
    lineage = sub.add_parser("lineage", help="trace a score/checkpoint to its samples, or a sample forward")
    lineage.add_argument("ident", nargs="?", help="checkpoint id (or prefix) or score id '<checkpoint>:<metric>'")
    lineage.add_argument("--sample", help="trace this sample id forward instead")
    lineage.add_argument("--export", metavar="ID_OR_UID", help="trace an export (its id or a prefix) to its samples, "
                                                               "or an exported uid back to its sample")
    lineage.add_argument("--limit", type=int, default=10, help="member rows to print")
    lineage.set_defaults(func=cmd_lineage)


def _add_export(sub) -> None:
    export = sub.add_parser("export", help="a recipe's training set as WebDataset shards (img2dataset's layout) "
                                           "for open_clip_train and DataComp-style tools")
    export.add_argument("--recipe", required=True, help="the recipe whose training set to export")
    export.add_argument("--out", required=True, help="output folder (a local path or an fsspec URL such as s3://b/x); "
                                                     "an earlier export there is replaced whole")
    export.add_argument("--lossless", action="store_true", help="PNG images instead of JPEG (quality 95)")
    export.add_argument("--grid", action="append", default=[], metavar="HxW",
                        help="also write kept patch indices on this patch grid (repeatable; saliency recipes)")
    export.add_argument("--uids-only", action="store_true", default=None,
                        help="write uids.npy (DataComp's subset format) without shards; a sample filter "
                             "(datasieve) is always exported this way")
    export.add_argument("--samples-per-shard", type=int, default=1000)
    export.set_defaults(func=cmd_export)


def _add_report(sub) -> None:
    report = sub.add_parser("report", help="write one static HTML page of the latest recipe comparison")
    report.add_argument("--out", type=Path, default=None, help="default: <data dir>/report.html")
    report.set_defaults(func=cmd_report)


def _add_status(sub) -> None:
    status = sub.add_parser("status", help="drops, sample counts and quarantine reasons from the catalog")
    status.set_defaults(func=cmd_status)


def _add_catalog(sub) -> None:
    catalog = sub.add_parser("catalog", help="the catalog's commit records").add_subparsers(required=True,
                                                                                          metavar="what")
    fold = catalog.add_parser("fold", help="fold pending commit records into the catalog (what the "
                                           "catalog_committer sensor does), once or every --every seconds")
    fold.add_argument("--every", type=float, default=None, help="keep folding at this interval until stopped")
    fold.set_defaults(func=cmd_catalog_fold)


def cmd_catalog_fold(a) -> None:
    """The committer outside the Dagster daemon: run only one per catalog (folds are idempotent, but
    a second committer only adds lock waits)."""
    import json
    import signal

    storage = _storage(writes="commit_records")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    while True:
        report = storage.fold_commits()
        print(json.dumps({"folded": report.folded, "already": report.already, "pending": report.pending,
                          "lock_backoffs": report.lock_backoffs}), flush=True)
        if a.every is None or stop:
            return
        time.sleep(a.every)


def cmd_world_drop(a) -> None:
    cfg = DropConfig(
        n_samples=a.samples, seed=a.seed, drop_index=a.index, format=a.format, manifest_format=a.manifest,
        image_format=a.image_format, image_size=a.image_size, object_coverage=a.coverage,
        shared_colour=a.shared_colour, coverage_shared_by=a.coverage_shared_by, captions=CaptionCorruption(boilerplate=a.boilerplate, noise=a.noise, omit=a.omit, misaligned=a.misaligned),
        duplicate_rate=a.duplicates, broken_rate=a.broken, empty_caption_rate=a.empty_captions,
    )
    r = generate_drop(a.out, cfg)
    print(f"wrote {r.n_samples} samples to {r.path} in {r.seconds:.1f}s ({r.images_per_second:.0f} images/s)")


def cmd_world_corpus(a) -> None:
    r = generate_corpus(a.out, a.samples, a.seed)
    print(f"wrote {r.n_samples} corpus images to {r.path} in {r.seconds:.1f}s ({r.images_per_second:.0f} images/s)")


def cmd_world_evalsets(a) -> None:
    for kind in ("retrieval", "classification"):
        r = generate_eval_set(a.out / kind, kind, a.samples, a.seed)
        print(f"wrote {r.n_samples} {kind} images to {r.path} ({r.images_per_second:.0f} images/s)")


def cmd_governor_train(a) -> None:
    from dataclasses import replace as _replace

    from .world.governor_training import GovernorTrainConfig, train_governor
    from .models.governor_output import GovernorOutput, default_governor_path

    cfg = GovernorTrainConfig(seed=a.seed, threads=a.threads)
    given = {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "warmup": a.warmup, "eval_every": a.eval_every,
             "crop_scenes": a.crop_scenes, "init": a.init, "jpeg_rate": a.jpeg_rate,
             "saliency_weight": a.saliency_weight, "dense_weight": a.dense_weight,
             "whole_crop_scenes": a.whole_crop_scenes, "crop_coverage_shared_by": a.crop_coverage_shared_by}
    cfg = _replace(cfg, **{k: v for k, v in given.items() if v is not None})
    data_dir = default_data_dir()
    command = "juicer governor train " + " ".join(sys.argv[3:] if len(sys.argv) > 3 else [])
    out = GovernorOutput(a.out or default_governor_path(data_dir), cfg.arch, command.strip())
    print(f"training; periodic checkpoints go to {out.partial}, the final weights to {out.path}")
    model, record = train_governor(cfg, checkpoint=out.checkpoint)
    model_id, card = out.finish(model, record)
    print(f"governor {model_id[:12]} written to {out.path} (model card {card}); scores: {record['scores']}")
    print(governor_usage(out.path, data_dir))


def governor_usage(weights: Path, data_dir: Path) -> str:
    return (f"use it: in {data_dir / 'juicer.toml'} (or $JUICER_CONFIG) set\n"
            f"  [governor]\n  source = \"file:{Path(weights).resolve()}\"")


def cmd_demo(a) -> int:
    from .demo import run_demo

    return run_demo(default_data_dir(), a.drops, a.samples, a.eval_samples, a.seed, train=not a.skip_training)


def cmd_truth(a) -> None:
    from .settings import load_settings
    from .truth_report import truth_report

    data_dir = default_data_dir()
    rho = a.rho if a.rho is not None else load_settings(data_dir=data_dir).saliency.rho
    print(truth_report(Warehouse(data_dir), a.drop, rho))


def cmd_lineage(a) -> None:
    from .storage.lineage import trace_back, trace_forward

    cat = _snapshot_catalog(_storage().warehouse)
    try:
        if a.export:
            _print_export_trace(cat, a.export, a.limit)
            return
        if a.sample:
            out = trace_forward(cat, a.sample)
            print("sample:", out["sample"])
            arts = out["artifacts"]
            print(arts.to_string(index=False) if len(arts) else "in no training set")
            if out["excluded"] is not None and len(out["excluded"]):
                print("left out of:")
                print(out["excluded"].to_string(index=False))
            return
        if not a.ident:
            raise ValueError("give a checkpoint or score id, or --sample <sample id>")
        out = trace_back(cat, a.ident)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from exc
    m = out["members"]
    print(f"checkpoint {out['checkpoint_id']} (recipe {out['recipe']}, seed {out['seed']})")
    print(f"training set {out['training_set_id']}: {len(m)} samples from drops {', '.join(out['drops'])}")
    print("caption versions:", m.caption_version.value_counts().to_dict(),
          " governor:", ", ".join(sorted(set(m.governor_id.dropna()))) or "n/a")
    print(m[["sample_id", "caption_version", "kept_patches", "caption"]].head(a.limit).to_string(index=False))
    print("artifacts (code version, config hash, governor, Dagster run):")
    print(out["lineage"].to_string(index=False))
    if len(out["scores"]):
        print("scores:", {r.metric: round(r.value, 4) for r in out["scores"].itertuples()})


def cmd_export(a) -> None:
    from .assets.export import export_request, export_summary, record_export
    from .export import export_training_set, parse_grid
    from .export.webdataset_export import open_clip_train_command
    from .settings import load_settings

    storage = _storage()
    wh = storage.warehouse
    settings = load_settings(data_dir=default_data_dir())
    out = a.out if "://" in a.out else str(Path(a.out).resolve())
    same_store = "://" in out and wh.url and out.split("://")[0] == wh.url.split("://")[0]
    request, governor = export_request(settings, storage, a.recipe, grids=[parse_grid(g) for g in a.grid],
                                       lossless=a.lossless, uids_only=a.uids_only,
                                       samples_per_shard=a.samples_per_shard)
    t0 = time.perf_counter()
    result = export_training_set(wh, out, request, governor, wh.storage_options if same_store else None,
                                 progress=log.info)
    seconds = time.perf_counter() - t0
    record_export(storage, result, run_id=None)
    s = export_summary(result)
    print(f"exported {s['samples']} samples of recipe {s['recipe']} to {out} in {seconds:.1f}s "
          f"({s['samples'] / max(seconds, 1e-9):.0f} samples/s): {s['shards']} shard(s), {s['bytes']} bytes, "
          f"K per grid {s['k_per_grid'] or '(all patches)'}; export id {result.export_id[:16]}")
    if result.manifest["uids_only"]:
        print(f"uids only (DataComp's subset format): {out}/uids.npy selects these samples from any export of "
              f"the pool, e.g. `juicer export --recipe raw`")
        return
    print("train a stock open_clip CLIP on it (the model config beside the shards, no download):")
    print(f"  {open_clip_train_command(out, result.manifest)}")
    if result.manifest["grids"]:
        print("the same run fed only the kept patch tokens of each image:")
        print(f"  {open_clip_train_command(out, result.manifest, kept=True)}")


def _print_export_trace(cat: Catalog, ident: str, limit: int) -> None:
    from .storage.lineage import trace_export

    out = trace_export(cat, ident)
    if "uid" in out:
        print(f"uid {out['uid']} is sample {out['sample']}")
        print(out["exports"].to_string(index=False))
        return
    m = out["members"]
    print(f"export {out['export_id']} (recipe {out['recipe']}) at {out['out']}")
    print(f"training set {out['training_set_id']}: {len(m)} samples from drops {', '.join(out['drops'])}")
    print(m.head(limit).to_string(index=False))
    print("artifacts as of the export (code version, config hash, governor, run):")
    print(out["lineage"].to_string(index=False))


def cmd_report(a) -> None:
    from .report import write_report

    print(f"wrote {write_report(_storage().warehouse, a.out)}")


def _storage(**override):
    """The storage resource of the data root and its settings (warehouse location, catalog mode)."""
    from .assets.resources import StorageResource
    from .settings import load_settings

    data_dir = default_data_dir()
    return StorageResource.from_settings(data_dir, load_settings(data_dir=data_dir), **override)


def _snapshot_catalog(wh: Warehouse) -> Catalog:
    """A fresh snapshot of the catalog to read from: a long query or an open reader never holds
    the lock that pipeline writers need (the live file is locked only while it is copied)."""
    if not wh.catalog_path.exists():
        raise FileNotFoundError(f"no catalog at {wh.catalog_path}: run `make demo` or materialise a drop first")
    storage = _storage()
    fs = None if storage.warehouse.is_local else storage.warehouse.filesystem  # views read the tables
    live = Catalog(wh.catalog_path, lock_timeout_s=storage.lock_timeout_s, filesystem=fs)
    if storage.uses_commit_records and live.snapshot_path.exists():
        # the committer publishes it after every fold: the live file stays the committer's own
        return Catalog(live.snapshot_path, filesystem=fs)
    return Catalog(live.snapshot(), filesystem=fs)


def cmd_status(a) -> None:
    from .demo import reader_recipe
    from .storage.records import drop_counts, quarantine_reasons

    wh = _storage().warehouse
    cat = _snapshot_catalog(wh)  # read the copy: no lock on the live catalog while printing
    snap = cat.path
    print(drop_counts(cat).to_string(index=False))
    print(quarantine_reasons(cat).to_string(index=False))
    pending = CommitLog(wh.commits_dir).pending()
    if pending:
        print(f"{len(pending)} commit record(s) not yet folded into the catalog (catalog_committer sensor, "
              f"or `juicer catalog fold`)")
    print(reader_recipe(wh, snap))


if __name__ == "__main__":
    sys.exit(main())
