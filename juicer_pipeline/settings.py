"""Typed pipeline settings and their stable hashes.

Settings come from a TOML file (``JUICER_CONFIG``, else ``<data dir>/juicer.toml`` when it exists,
else the defaults below). Each stage hashes only the section it uses, and that hash goes into
the stage's Dagster ``code_version``: change a threshold and exactly the stages that read it turn
unsynced in the UI.
"""
from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_ENV = "JUICER_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # keys that change no asset's output (they steer asset checks, or how fast a stage runs), so
    # they stay out of the hash: changing one never makes a stage unsynced
    _unhashed: ClassVar[frozenset[str]] = frozenset()

    def config_hash(self) -> str:
        payload = json.dumps(self.model_dump(mode="json", exclude=set(self._unhashed)), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    @model_validator(mode="after")
    def _no_nul_bytes(self):
        # Paths, sources and names end in os calls, which raise a bare "embedded null byte" on one
        # (TOML's \u0000 escape writes it): say which key holds it instead.
        for key in type(self).model_fields:
            value = getattr(self, key)
            for text in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(text, str) and "\x00" in text:
                    raise ValueError(f"{key} contains a NUL byte, which no path or name can hold")
        return self


class IngestSettings(_Section):
    """Bounds that decide whether a sample is valid."""

    min_side: int = Field(16, ge=1, description="images with a shorter side are quarantined as too_small")
    max_side: int = Field(8192, ge=1, description="images with a longer side are quarantined as too_large")
    max_pixels: int = Field(40_000_000, ge=1, description="width*height above this is too_large")
    max_caption_chars: int = Field(4000, ge=1, description="longer captions are quarantined")
    max_file_bytes: int = Field(50_000_000, ge=1, description="files and tar members larger than this are "
                                                              "quarantined as too_large before being read")
    batch_rows: int = Field(512, ge=1, description="rows per Parquet row group while streaming")
    quarantine_alarm: float = Field(0.5, gt=0.0, le=1.0, description="the raw_samples check `quarantine_share` "
                                                                      "fails when this share of a drop or more "
                                                                      "is quarantined (check only: not hashed)")
    workers: int = Field(2, ge=1, description="processes that decode, hash and fingerprint images (1: in the "
                                              "asset's own process; a pool starts only for drops over 512 "
                                              "records); rows and their order are the same for any value "
                                              "(not hashed)")

    _unhashed: ClassVar[frozenset[str]] = frozenset({"quarantine_alarm", "workers"})

    @model_validator(mode="after")
    def _sides_ordered(self):
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must not exceed max_side ({self.max_side})")
        return self


class GovernorSettings(_Section):
    """Which foundation model every stage uses, and how it runs."""

    source: str = Field("world", description="world | file:<path> | open_clip:<arch>:<file> | hf:<dir>")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="torch device of the governor's passes: "
                                                                       "cpu, cuda or cuda:<n>")
    # 64 on CPU: at 256 the governor's per-batch tensors (a 34 MB MLP activation among them) are
    # mapped anew or fragment glibc's heap, so patch_saliency ran 20 % slower and its memory crept
    # (peak 1453 vs 1200 MB over 100k images); a GPU wants larger batches (deploy/gpu.toml: 512).
    batch_size: int = Field(64, ge=1, description="images (or captions) per governor forward pass; deploy/gpu.toml "
                                                  "sets 512 for a GPU")
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="numeric precision of the governor's "
                                                                           "passes; fp16 and bf16 are for a GPU")
    shards: int = Field(1, ge=1, description="row-range shards one drop's patch_saliency is split into: each is "
                                             "its own step (own worker, own retries); the table is the same "
                                             "for any value (not hashed)")

    _unhashed: ClassVar[frozenset[str]] = frozenset({"shards"})


SaliencyMethod = Literal["cls_attention", "attention_rollout", "smoothed_rollout", "token_distinctiveness"]


class SaliencySettings(_Section):
    """Which patches of each image are kept."""

    # smoothed_rollout: best object-patch recall and ROC-AUC of the four on world drops (docs/benchmarks.md)
    method: SaliencyMethod = Field("smoothed_rollout", description="the saliency method whose map decides the kept "
                                                                   "patches; patch_saliency stores every method's "
                                                                   "map, so a change re-runs pruned_images only")
    rho: float = Field(0.5, gt=0.0, le=1.0, description="share of patches kept per image")


class ClassSettings(_Section):
    """Which classes are extracted from each image, and how they are decided."""

    vocabulary: str | None = Field(None, description="class vocabulary file: one class per line, optionally "
                                                     "'name: synonym, synonym'; unset: the world's shapes")
    prompt_templates: list[str] | None = Field(None, min_length=1, description="zero-shot prompt templates, each "
                                                                                "with one '{}'; unset: the built-in four")
    k: int = Field(3, ge=1, description="at most k classes per image")
    target_precision: float = Field(0.9, gt=0.0, le=1.0, description="τ is calibrated to reach this precision")
    # The unsmoothed rollout separates neighbouring objects; blurred maps merge them into one region
    # (measured recall 0.44 with smoothed_rollout vs 0.71 with attention_rollout).
    saliency_method: SaliencyMethod = Field("attention_rollout", description="the saliency map regions are cut from")
    region_fractions: list[float] = Field(default_factory=lambda: [0.15, 0.25], min_length=1,
                                          description="shares of most salient patches whose connected regions are cropped")
    max_regions: int = Field(4, ge=1, description="at most this many regions per share")
    crop_margins: list[float] = Field(default_factory=lambda: [0.15, 0.3, 0.5], min_length=1,
                                      description="one view per region and margin (share of its longer side); a "
                                                  "region's probability is the mean over its views")
    crop_turns: Literal[1, 2, 4] | None = Field(None, description="quarter turns each crop is also seen at (1, 2 "
                                                                  "or 4); unset: 4 with the world's shapes, which "
                                                                  "are drawn at any rotation, 1 with a vocabulary file")
    abstain: bool = Field(True, description="classify each crop against a 'background' prompt too: a crop "
                                            "whose best match is the background names no class")
    caption_false_share: float = Field(0.03, gt=0.0, le=1.0, description="what enrichment adds is decided at a τ "
                                                                          "per class (never below the class τ, an "
                                                                          "equal share of this budget each) that "
                                                                          "gives at most this share of the "
                                                                          "calibration images (captions simulated, "
                                                                          "one object left out) a class not in them")
    caption_claim: float = Field(0.05, gt=0.0, le=1.0, description="a class the caption names claims every region "
                                                                   "the governor gives it at least this probability: "
                                                                   "such a region adds no class to the caption")
    fallback_tau: float = Field(0.9, gt=0.0, le=1.0, description="τ when the governor has no calibration set")
    calibration_images: int = Field(1800, ge=10, description="world-corpus validation images used to calibrate τ "
                                                          "(each class's addition τ rests on a few false "
                                                          "additions per class: 600 images left the circle's "
                                                          "unseen)")

    @property
    def turns(self) -> int:
        """`crop_turns`, or its default for the vocabulary."""
        return self.crop_turns or (4 if self.vocabulary is None else 1)

    @model_validator(mode="after")
    def _templates_have_a_slot(self):
        bad = [t for t in self.prompt_templates or [] if t.count("{}") != 1]
        if bad:
            raise ValueError(f"prompt_templates need exactly one '{{}}' for the class phrase: {bad}")
        return self

    @model_validator(mode="after")
    def _fractions_are_shares(self):
        if not all(0.0 < f <= 1.0 for f in self.region_fractions):
            raise ValueError(f"region_fractions must lie in (0, 1], got {self.region_fractions}")
        if not all(0.0 <= m <= 2.0 for m in self.crop_margins):
            raise ValueError(f"crop_margins must lie in [0, 2], got {self.crop_margins}")
        return self


class CaptionSettings(_Section):
    """How captions are rectified and enriched with the extracted classes."""

    backend: Literal["rules", "transformers"] = Field(
        "rules", description="rules: deterministic cleaning and enrichment; transformers: a local seq2seq or "
                             "causal LM (model_path), each output validated and replaced by the rules result "
                             "where it fails")
    model_path: str | None = Field(None, description="local folder of a seq2seq/instruct LM (transformers backend)")
    batch_size: int = Field(16, ge=1, description="captions per batch of the transformers backend")
    max_new_tokens: int = Field(48, ge=1, description="most tokens the transformers backend generates per caption")
    misaligned_below: float = Field(0.5, ge=0.0, lt=1.0, description="a caption the governor ranks, for its own "
                                                                      "image, below this share of the drop's other "
                                                                      "captions is taken to belong to another image "
                                                                      "and replaced by one of the image's extracted "
                                                                      "classes (only where the governor knows the "
                                                                      "drop's domain); 0 never replaces")

    @model_validator(mode="after")
    def _model_for_transformers(self):
        if self.backend == "transformers" and not self.model_path:
            raise ValueError("captions.backend = 'transformers' needs captions.model_path (a local folder)")
        return self


class TrainingSettings(_Section):
    """Student CLIPs trained per recipe. The defaults are the CPU preset. There is no `preset` key
    (unknown keys are rejected): the GPU preset is a settings file, `deploy/gpu.toml` (`device =
    "cuda"`, `precision = "bf16"`, `student = "vit-b-16"`, ...)."""

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="one student per seed and budget for "
                                                                           "every recipe; the comparison shows mean "
                                                                           "± std over seeds")
    sieve_fraction: float = Field(0.5, gt=0.0, le=1.0, description="share of samples the sieve keeps")
    student: str = Field("world-s", description="student architecture: a packaged config "
                                                "(juicer_pipeline/models/student_configs) or a JSON file")
    # 600 steps of 64 rather than 300 of 128: the same vision tokens and about the same CPU time,
    # but twice the updates; in the world the students learn more from them (benchmarks/student_arch.py:
    # raw 22.1 / 35.4 % t2i R@1 / zero-shot against 18.1 / 26.2 %).
    budget_full_steps: int = Field(600, ge=1, description="vision-token budget, in full-patch steps")
    wallclock_s: float | None = Field(None, gt=0, description="also train every recipe for this many measured "
                                                              "seconds (the equal wall-clock comparison)")
    batch_size: int = Field(64, ge=2, description="images per training step (the global batch when processes > 1); "
                                                  "the budget counts budget_full_steps × batch_size images")
    lr: float = Field(1e-3, gt=0, description="peak learning rate, reached at the end of the warm-up")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps before the schedule")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="learning rate after warm-up")
    hard_negatives: bool = Field(False, description="add to each caption a hard negative: the caption with one "
                                                    "vocabulary class name swapped for another (NegCLIP), in "
                                                    "the image→text loss; every recipe alike. Needs processes = 1")
    full_tune_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of the budget that pruned recipes "
                                                                       "spend on full-patch tuning at the end")
    tune_lr_scale: float = Field(0.5, ge=0.0, le=1.0, description=(
        "peak learning rate of the pruned recipes' full-patch tuning phase, as a share of lr: the phase "
        "restarts a short warm-up and its own cosine. 0: it continues the run's cosine, near zero by then"))
    eval_points: int = Field(3, ge=1, description="learning-curve evaluations over the budget")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="torch device of student training: cpu, "
                                                                       "cuda or cuda:<n> (the GPU preset is "
                                                                       "deploy/gpu.toml)")
    # fp32 by default, so that a run repeats bit for bit on any machine; the demo trains "native".
    precision: Literal["fp32", "bf16", "native"] = Field(
        "fp32", description="bf16: the training step runs under autocast; native: whichever of the two runs the "
                            "student's step faster on this machine (timed when training starts; the checkpoint "
                            "records the one used); evaluation stays fp32")
    threads: int = Field(2, ge=1, description="CPU threads for student training, per process")
    processes: int = Field(1, ge=1, description="data-parallel training processes on this machine: 1 trains in the "
                                                "asset's process; N > 1 runs torch DDP under torchrun with N processes "
                                                "(gloo on CPU; NCCL on CUDA, one GPU each). batch_size stays the global "
                                                "batch and must split into N equal shares")
    collective_timeout_s: float = Field(1800.0, gt=0, description="with processes > 1: how long a process waits for "
                                                                   "the others (a collective, or rank 0's evaluation) "
                                                                   "before the run fails (not hashed)")
    schedule_cron: str = Field("0 2 * * *", description="when the retraining schedule runs (stale recipes only)")
    retrieval_set: str | None = Field(None, description="held-out retrieval set: a drop folder (manifest or "
                                                        "shards) of image + caption; unset: the world's")
    classification_set: str | None = Field(None, description="held-out classification set: a drop folder of "
                                                             "image + caption + label (a vocabulary class); "
                                                             "unset: the world's")

    _unhashed: ClassVar[frozenset[str]] = frozenset({"collective_timeout_s"})

    @model_validator(mode="after")
    def _hard_negatives_in_one_process(self):
        if self.hard_negatives and self.processes > 1:
            raise ValueError("training.hard_negatives needs training.processes = 1 (the data-parallel loss "
                             "gathers in-batch captions only)")
        return self

    @model_validator(mode="after")
    def _batch_splits_over_processes(self):
        if self.batch_size % self.processes:
            raise ValueError(f"batch_size ({self.batch_size}) must split into processes ({self.processes}) equal shares")
        return self

    @model_validator(mode="after")
    def _student_exists(self):
        from .models.students import load_student_arch

        load_student_arch(self.student)  # a clear error at load time, not at training
        return self


class CatalogSettings(_Section):
    """How catalog writers share the DuckDB file. Changing it changes no asset's output."""

    lock_timeout_s: float = Field(120.0, gt=0, description="how long a writer backs off (jittered, exponential) "
                                                            "on lock or write conflicts before CatalogLocked")
    memory_limit: str = Field("64MB", pattern=r"^\d+(\.\d+)?\s*(KB|MB|GB|KiB|MiB|GiB)$",
                              description="DuckDB memory limit of catalog connections: a writer replacing a big "
                                          "drop's rows spills to disk beyond it instead of growing with the drop")
    writes: Literal["direct", "commit_records"] = Field(
        "direct", description="direct: each per-drop step writes the catalog itself (one machine). "
                              "commit_records: it writes a commit record beside its Parquet, and the "
                              "catalog_committer sensor folds records into the catalog, the only writer "
                              "(workers on many machines; see docs/architecture.md)")
    commit_interval_s: int = Field(5, ge=1, description="how often the catalog_committer sensor folds records")


class WarehouseSettings(_Section):
    """Where the Parquet tables live. Moving them changes no asset's output."""

    url: str | None = Field(None, description="unset: <data dir>/warehouse; or an fsspec URL every worker "
                                               "reaches, e.g. s3://bucket/juicer (needs s3fs)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="passed to fsspec, e.g. "
                                                                              "endpoint_url, key, secret")

    @model_validator(mode="after")
    def _protocol_available(self):
        if self.url:
            import fsspec

            protocol = fsspec.core.split_protocol(self.url)[0] or "file"
            try:
                fsspec.get_filesystem_class(protocol)
            except (ImportError, ValueError) as exc:
                raise ValueError(f"warehouse.url {self.url!r}: no filesystem for {protocol!r} ({exc}); for s3:// "
                                 f"install the distributed extra: pip install -e '.[distributed]'") from exc
        return self


class ExecutionSettings(_Section):
    """Which Dagster executor runs the steps of every job. Changes no asset's output."""

    executor: Literal["multiprocess", "in_process", "celery", "k8s"] = Field(
        "multiprocess", description="multiprocess: Dagster's default, one process per step on this machine; "
                                    "celery: dagster-celery workers behind a broker; k8s: one Kubernetes "
                                    "job per step (dagster-k8s)")
    config: dict[str, Any] = Field(default_factory=dict, description="the executor's own config block, "
                                                                     "validated against its schema at load")


class JuicerSettings(_Section):
    ingest: IngestSettings = IngestSettings()
    governor: GovernorSettings = GovernorSettings()
    saliency: SaliencySettings = SaliencySettings()
    classes: ClassSettings = ClassSettings()
    captions: CaptionSettings = CaptionSettings()
    training: TrainingSettings = TrainingSettings()
    catalog: CatalogSettings = CatalogSettings()
    warehouse: WarehouseSettings = WarehouseSettings()
    execution: ExecutionSettings = ExecutionSettings()


class SettingsError(ValueError):
    pass


def load_settings(path: str | Path | None = None, data_dir: Path | None = None) -> JuicerSettings:
    """Read settings; a missing explicit file or an invalid key is a clear error, never ignored."""
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    if path is None and data_dir is not None and (Path(data_dir) / "juicer.toml").exists():
        path = Path(data_dir) / "juicer.toml"
    if path is None:
        return JuicerSettings()
    path = Path(path)
    if not path.exists():
        raise SettingsError(f"settings file {path} does not exist (set by {CONFIG_ENV} or passed explicitly)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"settings file {path} is not valid TOML: {exc}") from exc
    try:
        return JuicerSettings.model_validate(raw)
    except ValidationError as exc:
        raise SettingsError(f"settings file {path} is invalid:\n{exc}") from exc


def code_version(revision: str, *parts: "_Section | str") -> str:
    """A stage's Dagster code_version: its own code revision plus the hash of the settings it
    reads (and only those) and of the models it uses, so a change makes exactly its dependants
    unsynced."""
    return "+".join([revision, *(p.config_hash() if isinstance(p, _Section) else str(p)[:12] for p in parts)])
