"""Bring your own models, end to end with real architectures: a ViT-B/16 governor (randomly
initialised and saved locally, so shapes, the 14×14 grid, preprocessing and tokenizer are the real
ones) from an open_clip file and from a Hugging Face-layout folder, and transformers captioners
(a tiny seq2seq and a tiny causal LM, built from config) loaded from local folders."""
import json

import pyarrow.parquet as pq
import pytest
import torch
from dagster import AssetCheckSeverity, AssetKey

from juicer_pipeline.definitions import GOVERNOR_JOB_NAME, RECIPES_JOB_NAME, build_definitions
from juicer_pipeline.settings import (CaptionSettings, ClassSettings, GovernorSettings, JuicerSettings,
                                      TrainingSettings)
from juicer_pipeline.world import DropConfig, generate_drop, generate_eval_set

from ..helpers import run_drop

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
SAMPLES = 8
# Every class prompt is a ViT-B/16 text pass, every image a pass at 224 px and one per region crop:
# one prompt template (the world's 10 shapes x 8 colours x 4 templates would be 320 prompts) and at
# most two regions per share (crop plans and prompts: test_class_extraction.py).
LEAN_CLASSES = dict(prompt_templates=["a photo of {}."], max_regions=2)
WORDS = "a an the red blue green star circle ring heart with and photo of picture".split()


def _word_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return len(vocab)


def tiny_seq2seq(folder):
    from transformers import T5Config, T5ForConditionalGeneration

    n = _word_tokenizer(folder)
    T5ForConditionalGeneration(T5Config(vocab_size=n, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).save_pretrained(folder)
    return folder


def tiny_causal(folder):
    from transformers import GPT2Config, GPT2LMHeadModel

    n = _word_tokenizer(folder)
    GPT2LMHeadModel(GPT2Config(vocab_size=n, n_positions=128, n_embd=16, n_layer=1, n_head=2, bos_token_id=1,
                               eos_token_id=1, pad_token_id=0)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory):
    """A randomly initialised open_clip ViT-B-16, saved both as a weights file and as an HF-layout folder."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("vitb16")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16")  # architecture only: nothing is downloaded
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, root / "vit_b_16.bin")
    folder = root / "hf"
    folder.mkdir()
    save_file(state, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("ViT-B-16"),
                                                              "preprocess_cfg": {}}))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("source, captioner", [("open_clip", "seq2seq"), ("hf", "causal")])
def test_real_architectures_run_the_whole_chain(data_dir, instance, vit_b16, tmp_path, source, captioner):
    gov = f"open_clip:ViT-B-16:{vit_b16 / 'vit_b_16.bin'}" if source == "open_clip" else f"hf:{vit_b16 / 'hf'}"
    lm = (tiny_seq2seq if captioner == "seq2seq" else tiny_causal)(tmp_path / captioner)
    for kind in ("retrieval", "classification"):
        generate_eval_set(data_dir / "world" / "evalsets" / kind, kind, 40)
    generate_drop(data_dir / "drops" / "d", DropConfig(n_samples=SAMPLES, seed=5, broken_rate=0))
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"image_size": 64, "patch_size": 8, "vision_width": 32, "vision_layers": 1,
                                   "vision_heads": 2, "text_width": 32, "text_layers": 1, "text_heads": 2,
                                   "context_length": 24, "embed_dim": 32, "conv_stem": True}))
    settings = JuicerSettings(
        governor=GovernorSettings(source=gov, batch_size=16),
        classes=ClassSettings(fallback_tau=0.2, **LEAN_CLASSES),
        captions=CaptionSettings(backend="transformers", model_path=str(lm), batch_size=8, max_new_tokens=8),
        training=TrainingSettings(seeds=[0], budget_full_steps=2, batch_size=4, student=str(student), eval_points=1))
    defs = build_definitions(settings, data_dir)  # a model folder is fingerprinted (no IsADirectoryError)
    assert defs.resolve_job_def(GOVERNOR_JOB_NAME).execute_in_process(instance=instance, run_config=QUIET).success
    result = run_drop(data_dir, instance, "d", settings, assets=None)
    assert result.success
    wh = data_dir / "warehouse"
    sal = pq.read_table(wh / "patch_saliency" / "d.parquet")
    assert (sal.column("grid_h")[0].as_py(), sal.column("grid_w")[0].as_py()) == (14, 14)  # ViT-B/16 at 224 px
    assert len(sal.column("embedding")[0].as_py()) == 512
    pruned = pq.read_table(wh / "pruned_images" / "d.parquet")
    assert all(len(k) == 98 for k in pruned.column("kept").to_pylist())  # ⌈0.5 × 196⌉ on the governor's grid
    captions = pq.read_table(wh / "enriched_captions" / "d.parquet").to_pandas()
    assert len(captions) == SAMPLES and captions.enriched_caption.map(bool).all()
    # a randomly initialised governor knows no domain: its similarity check can only warn
    similarity = {c.check_name: c for c in result.get_asset_check_evaluations()}["similarity_not_worse"]
    assert similarity.metadata["governor_knows_domain"].value is False
    assert similarity.severity == AssetCheckSeverity.WARN
    # one recipe through training: the student's 8×8 grid gets kept sets resampled from the 14×14 maps
    assert defs.resolve_job_def(RECIPES_JOB_NAME).execute_in_process(
        instance=instance, partition_key="datajuicer", run_config=QUIET).success
    from juicer_pipeline.storage import Catalog

    ck = Catalog(data_dir / "catalog.duckdb").query("SELECT record FROM checkpoints WHERE recipe = 'datajuicer'")
    phases = json.loads(ck.record[0])["phases"]
    assert phases[0]["tokens_per_image"] == 33  # ⌈0.5 × 64⌉ + CLS on the student's grid


def _juice_real_photos(data_dir, instance, settings) -> dict:
    defs = build_definitions(settings, data_dir)
    assert defs.resolve_job_def(GOVERNOR_JOB_NAME).execute_in_process(
        instance=instance, run_config=QUIET, asset_selection=[AssetKey("governor")]).success
    result = run_drop(data_dir, instance, "photos", settings, assets=None)
    assert result.success
    captions = pq.read_table(data_dir / "warehouse" / "enriched_captions" / "photos.parquet").to_pandas()
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    for row in captions.head(4).itertuples():  # an excerpt, shown with -s
        print(f"{row.sample_id}: {row.raw_caption!r} -> {row.enriched_caption!r} ({row.caption_version})")
    print({name: (c.passed, c.severity.value) for name, c in sorted(checks.items())})
    return {"captions": captions, "checks": checks,
            "raw": pq.read_table(data_dir / "warehouse" / "raw_samples" / "photos.parquet").to_pandas()}


@pytest.mark.slow
def test_real_photos_in_img2dataset_layout_are_juiced_end_to_end(data_dir, instance, vit_b16, tmp_path):
    """18 photographs (scikit-image, scikit-learn) as an img2dataset shard with hand-written
    captions: juiced by the bring-your-own models with a vocabulary of real classes, and by the world
    governor; neither governor knows these photos, so the similarity check can only warn."""
    from ..real_photos import PHOTOS, VOCABULARY, write_real_photo_drop

    write_real_photo_drop(data_dir / "drops" / "photos")
    vocabulary = tmp_path / "photo-classes.txt"
    vocabulary.write_text(VOCABULARY)
    byo = JuicerSettings(
        governor=GovernorSettings(source=f"open_clip:ViT-B-16:{vit_b16 / 'vit_b_16.bin'}", batch_size=8),
        classes=ClassSettings(vocabulary=str(vocabulary), fallback_tau=0.2, **LEAN_CLASSES),
        captions=CaptionSettings(backend="transformers", model_path=str(tiny_seq2seq(tmp_path / "lm")), batch_size=8,
                                 max_new_tokens=8))
    world = JuicerSettings(classes=ClassSettings(calibration_images=100))  # τ on 100 world images
    for settings in (byo, world):
        out = _juice_real_photos(data_dir, instance, settings)
        raw = out["raw"]
        assert len(raw) == len(PHOTOS) and (raw.status == "valid").all()  # grey JPEGs included
        assert set(raw["mode"]) == {"RGB", "L"}
        assert len(out["captions"]) == len(PHOTOS) and out["captions"].enriched_caption.map(str.strip).all()
        assert all(c.passed for name, c in out["checks"].items() if name != "similarity_not_worse")
        similarity = out["checks"]["similarity_not_worse"]
        assert similarity.metadata["governor_knows_domain"].value is False, similarity.metadata
        assert similarity.severity == AssetCheckSeverity.WARN
