"""Data-parallel training (torch DDP under torchrun, gloo on CPU) against the one-process run.

Tolerance. Two processes compute each half of the global batch's features in smaller matrix
products, gather them, and sum gradients in another order, so float32 results differ in the last
bits; the contrastive loss is the same function of the same batch and the same patch sets. Over the
ten steps here the per-step loss differs by at most 3e-7 relative (measured), so the test allows
1e-5. Parameters agree to 1.2e-7, except the attention *key* biases: their true gradient is exactly
zero (a softmax does not change when every logit of a query moves by q·b), so Adam turns float
noise of ~1e-9 into ±lr steps there; they cannot change any output, and the test compares the two
models' embeddings instead of those entries.
"""
import json

import numpy as np
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from juicer_pipeline.training import EvalSet, StudentConfig, TrainData, evaluate_student, train_student
from juicer_pipeline.training.distributed import DistributedTrainingError, train_student_processes
from juicer_pipeline.models.world_clip import tiny_arch

ENTRY = "juicer_pipeline_tests.ddp_entry"  # the real entry point, with a spy on the tokens fed
CFG = StudentConfig(arch=tiny_arch(), batch_size=8, budget_tokens=8 * 17 * 6, rho=0.5, warmup_steps=2,
                    eval_points=2, threads=1)  # random patches: 9 pruned steps + 1 full-patch step


def _data(patches="random", n=32):
    g = torch.Generator().manual_seed(0)
    return TrainData(torch.randint(0, 255, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.randint(1, 100, (n, 16), generator=g), None, patches)


def _eval_set():
    g = torch.Generator().manual_seed(1)
    tok = SimpleTokenizer(context_length=16)
    shapes = ["star", "ring", "arrow", "disc", "cross", "moon"]  # top-5 needs five classes or more
    captions = [f"a {c} {s}" for c in ("red", "blue") for s in shapes[:4]]
    return EvalSet(retrieval_images=torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8, generator=g),
                   retrieval_tokens=tok(captions), retrieval_keys=captions,
                   class_images=torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8, generator=g),
                   class_labels=np.arange(8) % 6, class_names=shapes,
                   class_attributes=("red", "blue"))


@pytest.fixture
def spy(tmp_path, monkeypatch):
    monkeypatch.setenv("JUICER_TEST_OUT", str(tmp_path))
    monkeypatch.delenv("JUICER_TEST_FAULT", raising=False)
    return tmp_path


def test_two_processes_follow_the_one_process_loss_curve_and_count_every_token(spy):
    data, ev = _data(), _eval_set()
    tok = SimpleTokenizer(context_length=16)
    one, two = [], []
    model_1, rec_1 = train_student(data, CFG, seed=0, on_step=lambda s, loss: one.append(loss),
                                   evaluate=lambda m: evaluate_student(m, tok, ev))
    progress = []
    model_2, rec_2 = train_student_processes(data, CFG, 0, processes=2, eval_set=ev, progress=progress.append,
                                             on_step=lambda s, loss: two.append(loss), module=ENTRY)
    # the same steps over the same global batches, and the same loss at every step
    assert rec_2["steps"] == rec_1["steps"] == len(one) == len(two) == 10
    assert [p["phase"] for p in rec_2["phases"]] == ["random_tokens", "full_tune"]
    for step, (a, b) in enumerate(zip(one, two), start=1):  # shown with pytest -s
        print(f"step {step:2d}: one process {a:.8f}, two {b:.8f}, abs {abs(a - b):.1e}, rel {abs(a - b) / abs(a):.1e}")
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=0)
    # tokens: each rank counted what entered its vision transformer; the sum is the one-process count
    fed = [sum(json.loads((spy / f"fed-rank{r}.json").read_text())) for r in (0, 1)]
    assert rec_2["tokens_fed_per_process"] == fed == [rec_1["tokens_seen"] // 2] * 2
    assert rec_2["tokens_seen"] == sum(fed) == rec_1["tokens_seen"] == 8 * (9 * 9 + 1 * 17)
    assert rec_2["samples_seen"] == rec_1["samples_seen"] and rec_2["processes"] == 2
    # the learning curve: evaluated by rank 0 at the same points, with the global token count
    assert [(p["step"], p["tokens_seen"]) for p in rec_2["learning_curve"]] == \
        [(p["step"], p["tokens_seen"]) for p in rec_1["learning_curve"]]
    # the same model: equal embeddings; equal parameters except the inert key biases (module docstring)
    with torch.no_grad():
        images = (data.images[:8].float() / 255 - 0.5) / 0.25
        for encode in ("encode_image", "encode_text"):
            x = images if encode == "encode_image" else data.tokens[:8]
            torch.testing.assert_close(getattr(model_2, encode)(x), getattr(model_1, encode)(x), rtol=0, atol=1e-5)
    s1, s2 = model_1.state_dict(), model_2.state_dict()
    for name, value in s1.items():
        if name.endswith("attn.in_proj_bias"):
            w = len(value) // 3
            value, other = torch.cat([value[:w], value[2 * w:]]), torch.cat([s2[name][:w], s2[name][2 * w:]])
        else:
            other = s2[name]
        torch.testing.assert_close(other, value, rtol=0, atol=1e-5, msg=name)


def test_a_failing_rank_ends_the_run_with_its_error(spy, monkeypatch):
    monkeypatch.setenv("JUICER_TEST_FAULT", "raise:1:3")
    with pytest.raises(DistributedTrainingError, match=r"2 processes failed .*rank 1: RuntimeError: injected fault in rank 1"):
        train_student_processes(_data(), CFG, 0, processes=2, module=ENTRY)


@pytest.mark.slow
def test_a_rank_that_stops_answering_times_out_instead_of_hanging(spy, monkeypatch):
    import time

    monkeypatch.setenv("JUICER_TEST_FAULT", "hang:1:3")
    t0 = time.perf_counter()
    # 10 s: also the rendezvous' wait, which must outlast the two processes' import skew on a busy machine
    with pytest.raises(DistributedTrainingError, match=r"rank 0: \w+: .*Timed out waiting 10000ms"):
        train_student_processes(_data(), CFG, 0, processes=2, timeout_s=10, module=ENTRY)
    assert time.perf_counter() - t0 < 90  # the sleeping rank would hold it for 600 s


@pytest.mark.slow
def test_wallclock_budget_is_decided_on_rank_0s_clock(spy):
    """Phase ends, the time-driven learning rate and evaluation points follow rank 0's clock
    everywhere, so the processes never disagree on whether to take another step."""
    cfg = StudentConfig(**{**CFG.__dict__, "wallclock_s": 1.5})
    _, rec = train_student_processes(_data(), cfg, 0, processes=2, eval_set=_eval_set(), module=ENTRY)
    assert rec["budget"] == "wallclock" and [p["phase"] for p in rec["phases"]] == ["random_tokens", "full_tune"]
    assert rec["phases"][0]["seconds"] >= 1.35 and rec["phases"][1]["seconds"] >= 0.15
    fed = [sum(json.loads((spy / f"fed-rank{r}.json").read_text())) for r in (0, 1)]
    assert rec["tokens_fed_per_process"] == fed and fed[0] == fed[1] and rec["tokens_seen"] == sum(fed)
    assert len(rec["learning_curve"]) == 2


def test_batch_must_split_into_equal_shares():
    from pydantic import ValidationError

    from juicer_pipeline.settings import TrainingSettings

    with pytest.raises(ValueError, match="equal shares"):
        train_student_processes(_data(), StudentConfig(arch=tiny_arch(), batch_size=9), 0, processes=2)
    with pytest.raises(ValidationError, match="equal shares"):
        TrainingSettings(batch_size=30, processes=4)
    assert TrainingSettings(processes=2).config_hash() != TrainingSettings().config_hash()
    assert TrainingSettings(collective_timeout_s=5).config_hash() == TrainingSettings().config_hash()


@pytest.mark.slow
def test_clip_checkpoint_with_two_processes_matches_one(tmp_path):
    """The asset path: `training.processes = 2` launches torchrun from clip_checkpoint, and the
    catalog records the same budget and (within the tolerance above) the same losses."""
    from dagster import AssetKey, instance_for_test

    from juicer_pipeline.definitions import GOVERNOR_JOB_NAME, RECIPES_JOB_NAME, build_definitions
    from juicer_pipeline.models.loader import load_world_clip
    from juicer_pipeline.settings import ClassSettings, GovernorSettings, JuicerSettings, TrainingSettings
    from juicer_pipeline.storage import Catalog
    from juicer_pipeline.storage.lineage import trace_back
    from juicer_pipeline.world import DropConfig, generate_drop

    from ..helpers import run_drop, tiny_governor_world

    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    root = tmp_path / "data"
    tiny_governor_world(root, 40)
    generate_drop(root / "drops" / "d1", DropConfig(n_samples=80, seed=1))
    student = root / "student.json"
    student.write_text(json.dumps(tiny_arch(image_size=64, patch_size=16, vision_layers=1).to_dict()))

    def settings(processes):
        return JuicerSettings(
            governor=GovernorSettings(source=f"file:{root / 'tiny.safetensors'}", batch_size=64),
            classes=ClassSettings(calibration_images=20),
            training=TrainingSettings(seeds=[0], budget_full_steps=4, batch_size=16, student=str(student),
                                      eval_points=1, threads=1, processes=processes))

    def train(inst, processes):
        defs = build_definitions(settings(processes), root)
        run = defs.resolve_job_def(RECIPES_JOB_NAME).execute_in_process(
            instance=inst, partition_key="flip", run_config=quiet,
            asset_selection=[AssetKey("training_set"), AssetKey("clip_checkpoint")])
        assert run.success
        catalog = Catalog(root / "catalog.duckdb")
        row = catalog.query("SELECT checkpoint_id, tokens_seen, samples_seen, final_loss, record, path "
                            "FROM checkpoints WHERE recipe = 'flip'")
        assert len(row) == 1
        # lineage names the run that trained this checkpoint (the second run replaces the first's)
        own = trace_back(catalog, row.checkpoint_id[0])["lineage"].set_index("artifact").loc["clip_checkpoint/flip/seed0"]
        assert own.run_id == run.run_id
        return row.iloc[0], load_world_clip(row.path[0]).info  # the file is replaced by the next run

    with instance_for_test() as inst:
        assert build_definitions(settings(1), root).resolve_job_def(GOVERNOR_JOB_NAME).execute_in_process(
            instance=inst, run_config=quiet).success
        assert run_drop(root, inst, "d1", settings(1), assets=None).success
        (one, info_1), (two, info_2) = train(inst, 1), train(inst, 2)
    assert (two.tokens_seen, two.samples_seen) == (one.tokens_seen, one.samples_seen)
    assert two.final_loss == pytest.approx(one.final_loss, rel=1e-5)
    rec_1, rec_2 = json.loads(one.record), json.loads(two.record)
    assert rec_2["steps"] == rec_1["steps"] and rec_2["phases"][0]["phase"] == "random_tokens"
    assert [p["tokens_seen"] for p in rec_2["learning_curve"]] == [p["tokens_seen"] for p in rec_1["learning_curve"]]
    assert info_2["processes"] == 2 and sum(info_2["tokens_fed_per_process"]) == two.tokens_seen
    assert "processes" not in info_1  # the one-process record is as before
