"""One loader for every foundation model the pipeline uses. Local files only, never a download.

Sources:
- ``world``: the committed world governor (``weights/world_governor.safetensors``);
- ``file:<path.safetensors>``: a world-style CLIP saved by ``juicer governor train --out``;
- ``open_clip:<arch>:<weights file>``: a pretrained open_clip architecture from a local file;
- ``hf:<directory>``: an open_clip model in Hugging Face layout (``open_clip_config.json`` plus
  ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), e.g. a snapshot folder of
  the offline HF cache.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from safetensors.torch import load_file, save_file
from open_clip.tokenizer import SimpleTokenizer

from ..storage.warehouse import sha256_file
from .world_clip import ClipArch, build_clip

WEIGHTS_DIR = Path(__file__).with_name("weights")
WORLD_GOVERNOR = WEIGHTS_DIR / "world_governor.safetensors"
# The normalisation every model here was trained with: open_clip's (OpenAI's) dataset statistics.
OPENAI_MEAN = tuple(OPENAI_DATASET_MEAN)
OPENAI_STD = tuple(OPENAI_DATASET_STD)


class ModelNotFound(FileNotFoundError):
    pass


@dataclass
class FoundationModel:
    """A CLIP with what every stage needs beside it."""

    model: open_clip.CLIP
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    model_id: str  # sha256 of the weights file
    source: str
    info: dict  # architecture and training record as stored with the weights
    device: torch.device

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.model.visual.grid_size)

    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised text embeddings, in inference mode."""
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[i:i + batch_size]).to(self.device)
                out.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1))
        dim = self.model.text_projection.shape[-1] if self.model.text_projection is not None else 0
        return torch.cat(out) if out else torch.empty(0, dim)


def simple_preprocess(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's own inference transform: RGB, bicubic resize to image_size × image_size (no
    crop: world images are square already), OpenAI normalisation."""
    return open_clip.image_transform(image_size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD,
                                     resize_mode="squash")


def save_world_clip(model: open_clip.CLIP, arch: ClipArch, path: Path, record: dict) -> str:
    """Save weights as fp16 safetensors with the architecture and training record as metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"arch": json.dumps(arch.to_dict()), "record": json.dumps(record)})
    tmp.replace(path)
    return sha256_file(path)


def load_world_clip(path: Path, device: str = "cpu") -> FoundationModel:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"governor weights not found: {path}. The world governor is created by "
                            f"`juicer governor train --out {WORLD_GOVERNOR}` (without --out it writes "
                            f"<data dir>/models/world_governor.safetensors).")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "arch" not in meta:
        raise ModelNotFound(f"{path} has no 'arch' metadata: not a world CLIP saved by juicer")
    arch = ClipArch.from_dict(json.loads(meta["arch"]))
    model = build_clip(arch)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    dev = torch.device(device)
    model.to(dev).eval()
    info = {"arch": arch.to_dict(), **json.loads(meta.get("record", "{}"))}
    return FoundationModel(model, simple_preprocess(arch.image_size), SimpleTokenizer(context_length=arch.context_length),
                           sha256_file(path), f"file:{path}", info, dev)


def load_foundation_model(source: str = "world", device: str = "cpu") -> FoundationModel:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this machine")
    if source == "world":
        fm = load_world_clip(WORLD_GOVERNOR, device)
        fm.source = "world"
        return fm
    kind, _, rest = source.partition(":")
    if kind == "file":
        return load_world_clip(Path(rest), device)
    if kind == "open_clip":
        arch, _, weights = rest.partition(":")
        if not arch or not weights:
            raise ValueError(f"open_clip source must be 'open_clip:<arch>:<weights file>', got {source!r}")
        if not Path(weights).exists():
            raise ModelNotFound(f"open_clip weights not found: {weights}. Download them once on a machine with "
                                f"internet (e.g. the {arch} checkpoint) and pass the local file path.")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights, device=device)
        model.eval()
        return FoundationModel(model, preprocess, open_clip.get_tokenizer(arch), sha256_file(Path(weights)),
                               source, {"arch": arch}, torch.device(device))
    if kind == "hf":
        return _load_hf_dir(Path(rest), device, source)
    raise ValueError(f"unknown governor source {source!r}: use world, file:<path>, open_clip:<arch>:<file> "
                     f"or hf:<directory>")


def _load_hf_dir(folder: Path, device: str, source: str) -> FoundationModel:
    config = folder / "open_clip_config.json"
    weights = next((folder / n for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
                    if (folder / n).exists()), None)
    if not config.exists() or weights is None:
        raise ModelNotFound(f"no open_clip model in {folder}: expected open_clip_config.json and "
                            f"open_clip_model.safetensors (or open_clip_pytorch_model.bin). Point hf: at a "
                            f"snapshot folder of the offline Hugging Face cache.")
    cfg = json.loads(config.read_text())
    model = open_clip.CLIP(**cfg["model_cfg"])
    state = load_file(str(weights)) if weights.suffix == ".safetensors" else torch.load(weights, map_location="cpu")
    model.load_state_dict(state)
    model.to(device).eval()
    pp = cfg.get("preprocess_cfg", {})
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False,
                                           mean=pp.get("mean"), std=pp.get("std"))
    tokenizer = SimpleTokenizer(context_length=cfg["model_cfg"].get("text_cfg", {}).get("context_length", 77))
    return FoundationModel(model, preprocess, tokenizer, sha256_file(weights), source, {"config": cfg},
                           torch.device(device))


def weights_path(source: str) -> Path | None:
    """The weights file behind a source (None for hf: directories without one)."""
    if source == "world":
        return WORLD_GOVERNOR
    kind, _, rest = source.partition(":")
    if kind == "file":
        return Path(rest)
    if kind == "open_clip":
        return Path(rest.partition(":")[2])
    if kind == "hf":
        folder = Path(rest)
        return next((folder / n for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
                     if (folder / n).exists()), None)
    return None


def model_fingerprint(source: str) -> str:
    """sha256 of the weights (the model id), or of a model folder's files (names and contents),
    or 'missing' when nothing is there yet: the stage that needs it then fails with ModelNotFound,
    while the code location still loads."""
    path = weights_path(source)
    if path is not None and path.is_dir():
        return folder_fingerprint(path)
    return sha256_file(path) if path is not None and path.exists() else "missing"


def folder_fingerprint(folder: Path) -> str:
    """sha256 over every file of a model folder (relative name and content, in name order): a
    local transformers or open_clip folder changes identity when any of its files does."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


_CACHE: dict[tuple[str, str], FoundationModel] = {}


def cached_foundation_model(source: str, device: str = "cpu") -> FoundationModel:
    """One load per process and (source, device): every asset of a step shares it."""
    key = (source, device)
    if key not in _CACHE:
        _CACHE[key] = load_foundation_model(source, device)
    return _CACHE[key]
