"""The GPU preset (deploy/gpu.toml): its settings load everywhere; its training step runs where a
CUDA device exists. Runs without Dagster, so a GPU machine needs only the model libraries."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from juicer_pipeline.training import StudentConfig, TrainData, student_config, train_student
from juicer_pipeline.governance.pruning import kept_count
from juicer_pipeline.settings import load_settings

PRESET = Path(__file__).resolve().parents[2] / "deploy" / "gpu.toml"


def test_gpu_preset_settings_load_and_describe_vit_b_16(tmp_path):
    settings = load_settings(PRESET, data_dir=tmp_path)
    cfg = student_config(settings)
    assert (settings.governor.device, settings.training.device) == ("cuda", "cuda")
    assert (settings.governor.precision, cfg.precision) == ("bf16", "bf16")
    # ViT-B/16: 224 px at patch 16 is a 14×14 grid; the budget counts CLS with every image
    assert (cfg.arch.image_size, cfg.arch.patch_size, cfg.arch.vision_width, cfg.arch.vision_layers) == (224, 16, 768, 12)
    assert cfg.budget_tokens == 3000 * 256 * (14 * 14 + 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU preset's training step needs a CUDA device")
def test_gpu_preset_trains_kept_tokens_in_bf16(tmp_path):
    base = student_config(load_settings(PRESET, data_dir=tmp_path))
    n, b, patches = 64, 16, 14 * 14
    k = kept_count(patches, base.rho)
    cfg = StudentConfig(arch=base.arch, batch_size=b, lr=base.lr, warmup_steps=1, budget_tokens=4 * b * (patches + 1),
                        full_tune_fraction=0.25, eval_points=1, device="cuda", precision="bf16", threads=base.threads)
    g = torch.Generator().manual_seed(0)
    data = TrainData(images=torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=g),
                     tokens=torch.randint(1, 49000, (n, cfg.arch.context_length), generator=g),
                     kept=torch.rand(n, patches, generator=g).argsort(1)[:, :k].sort(1).values.to(torch.int16),
                     patches="saliency")
    model, record = train_student(data, cfg, seed=0)
    assert [p["tokens_per_image"] for p in record["phases"]] == [k + 1, patches + 1]
    assert record["tokens_seen"] == sum(p["steps"] * b * p["tokens_per_image"] for p in record["phases"])
    assert next(model.parameters()).device.type == "cuda"
    assert all(torch.isfinite(torch.tensor(record["loss_curve"])))
