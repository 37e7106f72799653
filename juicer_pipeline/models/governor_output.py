"""Where `juicer governor train` writes: a file under the data dir by default (never the installed
package), with periodic checkpoints kept apart and the final weights and model card moved into
place only when training has finished."""
from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from .loader import save_world_clip
from .model_card import write_model_card
from .world_clip import ClipArch


def default_governor_path(data_dir: Path) -> Path:
    return Path(data_dir) / "models" / "world_governor.safetensors"


@dataclass(frozen=True)
class GovernorOutput:
    path: Path
    arch: ClipArch
    command: str = "juicer governor train"

    @property
    def partial(self) -> Path:
        """Periodic checkpoints: a sibling, so a cut-off run leaves the final file (and its card)
        as they were, and the partial weights can still warm-start a new run (`--init`)."""
        return self.path.with_name(f"{self.path.stem}.partial{self.path.suffix}")

    @property
    def card(self) -> Path:
        return self.path.with_suffix(".md")

    def checkpoint(self, model: torch.nn.Module, record: dict) -> str:
        return save_world_clip(model, self.arch, self.partial, self._record(record))

    def finish(self, model: torch.nn.Module, record: dict) -> tuple[str, Path]:
        """Stage weights and card in a hidden sibling folder, then rename them into place. The old
        card goes first, so a crash between the renames leaves weights without a card, never
        beside a card that describes other weights."""
        staging = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.staging")
        staging.mkdir(parents=True)
        try:
            model_id = save_world_clip(model, self.arch, staging / self.path.name, self._record(record))
            card = write_model_card(staging / self.path.name, model_id, self._record(record))
            self.card.unlink(missing_ok=True)
            os.replace(staging / self.path.name, self.path)
            os.replace(card, self.card)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.partial.unlink(missing_ok=True)
        return model_id, self.card

    def _record(self, record: dict) -> dict:
        return {**record, "command": self.command}
