"""`juicer governor train` writes under the data dir by default, never into the installed package,
and moves the final weights and model card into place only when training ends. Nothing is
trained: a fake `train_governor` hands back a tiny CLIP."""
import functools
import hashlib

import pytest
import torch

import juicer_pipeline.world.governor_training as governor_training
import juicer_pipeline.models.loader as loader
from juicer_pipeline.cli import main
from juicer_pipeline.models.governor_output import GovernorOutput
from juicer_pipeline.models.loader import load_world_clip
from juicer_pipeline.models.world_clip import build_clip, tiny_arch

RECORD = {"scores": {"zeroshot_top1": 0.5}, "config": {"seed": 0}, "steps_done": 2}


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_training(monkeypatch, interrupt: bool = False, seed: int = 0):
    """train_governor that checkpoints once, then returns (or is cut off like a killed run)."""
    def train(cfg, progress=None, checkpoint=None):
        torch.manual_seed(seed)
        model = build_clip(cfg.arch)
        checkpoint(model, {**RECORD, "steps_done": 1})
        if interrupt:
            raise KeyboardInterrupt
        return model, RECORD

    monkeypatch.setattr(governor_training, "train_governor", train)
    monkeypatch.setattr(governor_training, "GovernorTrainConfig",
                        functools.partial(governor_training.GovernorTrainConfig, arch=tiny_arch()))


@pytest.fixture
def packaged(tmp_path, monkeypatch):
    """Stand-in for the installed governor, so even a regression cannot touch the real file."""
    path = tmp_path / "package" / "world_governor.safetensors"
    path.parent.mkdir()
    monkeypatch.setattr(loader, "WORLD_GOVERNOR", path)
    return path


def test_default_output_is_under_the_data_dir(data_dir, packaged, monkeypatch, capsys):
    _fake_training(monkeypatch)
    assert main(["governor", "train"]) == 0
    out = data_dir / "models" / "world_governor.safetensors"
    assert out.exists() and not packaged.exists()
    fm = load_world_clip(out)
    card = out.with_suffix(".md").read_text()
    assert fm.model_id in card and fm.info["command"].startswith("juicer governor train")
    assert not out.with_name("world_governor.partial.safetensors").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["world_governor.md", "world_governor.safetensors"]
    printed = capsys.readouterr().out
    assert f'source = "file:{out}"' in printed and "[governor]" in printed


def test_explicit_out_is_honoured(data_dir, tmp_path, packaged, monkeypatch):
    _fake_training(monkeypatch)
    assert main(["governor", "train", "--out", str(tmp_path / "g.safetensors")]) == 0
    assert (tmp_path / "g.safetensors").exists() and (tmp_path / "g.md").exists()
    assert not (data_dir / "models").exists() and not packaged.exists()


def test_interrupted_run_leaves_the_previous_weights_and_card(data_dir, packaged, monkeypatch):
    _fake_training(monkeypatch)
    main(["governor", "train"])
    out = data_dir / "models" / "world_governor.safetensors"
    before = (_digest(out), out.with_suffix(".md").read_text())
    _fake_training(monkeypatch, interrupt=True, seed=1)
    with pytest.raises(KeyboardInterrupt):
        main(["governor", "train"])
    assert (_digest(out), out.with_suffix(".md").read_text()) == before
    partial = out.with_name("world_governor.partial.safetensors")
    assert load_world_clip(partial).info["steps_done"] == 1  # the cut-off run's state, kept apart
    assert not packaged.exists()


def test_finish_moves_weights_and_card_into_place(tmp_path):
    arch = tiny_arch()
    out = GovernorOutput(tmp_path / "g.safetensors", arch, "juicer governor train --steps 2")
    out.checkpoint(build_clip(arch), RECORD)
    assert out.partial.exists() and not out.path.exists() and not out.card.exists()
    model_id, card = out.finish(build_clip(arch), RECORD)
    assert load_world_clip(out.path).model_id == model_id and model_id in card.read_text()
    assert "# Model card: g.safetensors" in card.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.md", "g.safetensors"]  # no partial, no staging
