"""Captions/s of each refiner backend on CPU, with the mean governor similarity gain.

    .venv/bin/python benchmarks/caption_throughput.py --samples 2000 [--lm /path/to/local/seq2seq]

Juices a fresh world drop (ingest → governor → saliency → classes) in a temporary data dir, then
times each backend's `refine` on the same captions and classes and scores before/after with the
governor's stored image embeddings. Without --lm the transformers backend runs a tiny T5 built
from config (random weights, so every output fails validation and falls back to rules): that
measures the backend's batching/validation overhead, not a real LM's quality.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def tiny_t5(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    words = "a an the red blue star circle ring with and photo of".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    cfg = T5Config(vocab_size=len(vocab), d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--lm", type=Path, default=None, help="local seq2seq/instruct LM folder")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        os.environ["JUICER_DATA_DIR"] = str(data)
        from dagster import AssetKey, DagsterInstance

        from juicer_pipeline.assets.text import object_vocabulary
        from juicer_pipeline.settings import ClassSettings
        from juicer_pipeline.definitions import DROP_JOB_NAME, GOVERNOR_JOB_NAME, build_definitions
        from juicer_pipeline.governance.caption_refiner import RulesRefiner, TransformersRefiner
        from juicer_pipeline.models.loader import cached_foundation_model
        from juicer_pipeline.storage import Warehouse
        from juicer_pipeline.world import DropConfig, generate_drop

        generate_drop(data / "drops" / "bench", DropConfig(n_samples=a.samples, seed=21))
        defs = build_definitions(data_dir=data)
        quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
        with DagsterInstance.ephemeral() as inst:
            defs.resolve_job_def(GOVERNOR_JOB_NAME).execute_in_process(
                instance=inst, run_config=quiet, asset_selection=[AssetKey("governor")])
            inst.add_dynamic_partitions("drops", ["bench"])
            defs.resolve_job_def(DROP_JOB_NAME).execute_in_process(instance=inst, partition_key="bench",
                                                                    run_config=quiet)
        wh = Warehouse(data)
        caps = wh.read_table("enriched_captions", "bench", ["sample_id", "raw_caption"]).to_pydict()
        cls = dict(zip(*wh.read_table("extracted_classes", "bench", ["sample_id", "classes"]).to_pydict().values()))
        emb_t = wh.read_table("patch_saliency", "bench", ["sample_id", "embedding"]).to_pydict()
        emb = dict(zip(emb_t["sample_id"], emb_t["embedding"]))
        ids, before = caps["sample_id"], caps["raw_caption"]
        classes = [cls.get(s, []) for s in ids]
        image_emb = np.array([emb[s] for s in ids], dtype=np.float32)
        fm = cached_foundation_model("world")
        sim_before = (image_emb * fm.encode_text(before).numpy()).sum(-1).mean()
        vocab = object_vocabulary(ClassSettings())
        lm = a.lm or tiny_t5(Path(tmp) / "tiny_t5")
        backends = [("rules", RulesRefiner(vocab)), ("transformers", TransformersRefiner(lm, vocab, batch_size=16))]
        print(f"{len(ids)} captions of a {a.samples}-sample world drop; governor {fm.model_id[:12]}; "
              f"mean similarity before {sim_before:.4f}")
        for name, refiner in backends:
            t0 = time.perf_counter()
            out = refiner.refine(before, classes)
            seconds = time.perf_counter() - t0
            sim_after = (image_emb * fm.encode_text([o.text for o in out]).numpy()).sum(-1).mean()
            print(f"{name:13s}: {len(out) / seconds:9.1f} captions/s   similarity after {sim_after:.4f} "
                  f"(gain {sim_after - sim_before:+.4f})   fallbacks {dict(refiner.fallbacks)}"
                  + ("" if name == "rules" or a.lm else "   [tiny random T5: overhead only]"))


if __name__ == "__main__":
    main()
