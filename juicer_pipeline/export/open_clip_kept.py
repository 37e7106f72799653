"""open_clip_train fed only each image's kept patch tokens, everything else stock.

    python -m juicer_pipeline.export.open_clip_kept -- <open_clip_train.main arguments>

Three hooks into an unmodified open_clip_train run on a juicer export:
1. the model it builds gets the kept-token module in `visual.patch_dropout` (models/kept_tokens.py:
   open_clip applies that slot right after the positional embeddings, so the transformer sees CLS
   and the kept patches, each at its own position);
2. its training WebDataset pipeline carries each sample's `kept.<h>x<w>.npy` (h×w: the model's
   own patch grid) beside the image and the text;
3. its training loader hands each batch's indices to the module just before the batch is
   consumed, and passes (images, texts) on as stock.
A forward pre-hook on the vision transformer counts the tokens it is really fed; the count is
logged, and printed as one JSON line (`juicer-kept-tokens {...}`) when the run ends.
"""
from __future__ import annotations

import json
import logging
import sys

import numpy as np
import torch
import webdataset

from ..models.kept_tokens import install_kept_tokens

REPORT_PREFIX = "juicer-kept-tokens"


class KeptRun:
    """What the hooks share: the installed module, the kept file's name, the token audit."""

    def __init__(self):
        self.module = None
        self.kept_file: str | None = None
        self.adding_kept = False  # while open_clip_train builds its training pipeline
        self.batches, self.images, self.tokens = 0, 0, 0
        self.tokens_per_image: set[int] = set()

    def wrap_create(self, create):
        def create_with_kept_tokens(*args, **kwargs):
            model, preprocess_train, preprocess_val = create(*args, **kwargs)
            visual = model.visual
            if not hasattr(visual, "patch_dropout") or not hasattr(visual, "grid_size"):
                raise SystemExit(f"{REPORT_PREFIX}: {type(visual).__name__} is not an open_clip VisionTransformer: "
                                 f"kept tokens need its patch_dropout slot")
            self.module = install_kept_tokens(model)
            self.kept_file = f"kept.{visual.grid_size[0]}x{visual.grid_size[1]}.npy"
            visual.transformer.register_forward_pre_hook(self._count)
            logging.info(f"{REPORT_PREFIX}: kept-token module installed; each batch is fed its {self.kept_file}")
            return model, preprocess_train, preprocess_val
        return create_with_kept_tokens

    def _count(self, module, args) -> None:
        if module.training:
            x = args[0]
            self.batches += 1
            self.images += x.shape[0]
            self.tokens += x.shape[0] * x.shape[1]
            self.tokens_per_image.add(int(x.shape[1]))

    def wrap_wds_dataset(self, get_wds_dataset):
        def get_with_kept(args, preprocess_img, is_train, *rest, **kwargs):
            self.adding_kept = is_train
            try:
                info = get_wds_dataset(args, preprocess_img, is_train, *rest, **kwargs)
            finally:
                self.adding_kept = False
            if is_train:
                info.dataloader = FeedingLoader(info.dataloader, self)
            return info
        return get_with_kept

    def report(self) -> dict:
        out = {"batches": self.batches, "images": self.images, "vision_tokens": self.tokens,
               "tokens_per_image": sorted(self.tokens_per_image), "kept_file": self.kept_file,
               "module_tokens_fed": getattr(self.module, "tokens_fed", None)}
        logging.info(f"{REPORT_PREFIX}: {out}")
        print(f"{REPORT_PREFIX} {json.dumps(out)}", flush=True)
        return out


class KeptWebDataset:
    """`webdataset` as open_clip_train.data sees it, except that its training pipeline's
    `to_tuple("image", "text")` also takes the kept file."""

    def __init__(self, run: KeptRun):
        self._run = run

    def __getattr__(self, name):
        return getattr(webdataset, name)

    def to_tuple(self, *keys, **kwargs):
        if self._run.adding_kept and keys == ("image", "text"):
            keys = (*keys, self._run.kept_file)
        return webdataset.to_tuple(*keys, **kwargs)


class FeedingLoader:
    """The training loader: sets each batch's kept indices, yields the stock (images, texts)."""

    def __init__(self, loader, run: KeptRun):
        self._loader, self._run = loader, run

    def __getattr__(self, name):  # num_batches, num_samples, ...
        return getattr(self._loader, name)

    def __iter__(self):
        try:
            for images, texts, kept in self._loader:
                self._run.module.indices = torch.as_tensor(np.asarray(kept)).long()
                yield images, texts
        finally:
            self._run.module.indices = None  # evaluation sees whole images


def _check_args(argv: list[str]) -> None:
    from open_clip_train.params import parse_args

    args = parse_args(argv)
    if args.accum_freq != 1:
        raise SystemExit(f"{REPORT_PREFIX}: --accum-freq {args.accum_freq} re-runs cached batches after their "
                         f"indices have moved on; use --accum-freq 1")
    if args.force_patch_dropout:
        raise SystemExit(f"{REPORT_PREFIX}: --force-patch-dropout takes the slot the kept tokens need")
    if args.dataset_type != "webdataset":
        raise SystemExit(f"{REPORT_PREFIX}: kept tokens come with a juicer export: use --dataset-type webdataset")


def main(argv: list[str] | None = None) -> KeptRun:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    _check_args(argv)
    import open_clip_train.data as train_data
    import open_clip_train.main as train_main

    run = KeptRun()
    train_main.create_model_and_transforms = run.wrap_create(train_main.create_model_and_transforms)
    train_data.get_wds_dataset = run.wrap_wds_dataset(train_data.get_wds_dataset)
    train_data.wds = KeptWebDataset(run)
    try:
        train_main.main(argv)
    finally:
        run.report()
    return run


if __name__ == "__main__":
    main()
