"""Writing an export's tar shards, each with its Parquet table and stats (img2dataset's layout)."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from ..storage.warehouse import sha256_file
from .samples import ExportPlan, Sample
from .staging import Stage

# the fields of KEY.json and of the per-shard Parquet file
SAMPLE_SCHEMA = pa.schema([
    ("key", pa.string()), ("uid", pa.string()), ("sample_id", pa.string()), ("drop", pa.string()),
    ("content_hash", pa.string()), ("caption", pa.string()), ("caption_version", pa.string()),
    ("original_caption", pa.string()), ("classes", pa.list_(pa.string())), ("class_probs", pa.list_(pa.float32())),
    ("rho", pa.float32()), ("saliency_method", pa.string()), ("governor_id", pa.string()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("width", pa.int32()), ("height", pa.int32()),
    ("url", pa.string()), ("status", pa.string()),
])


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class Shards:
    """Tar shards of at most `samples_per_shard` samples, each with its Parquet table and stats,
    published as soon as it is complete (one shard's rows in memory at a time)."""

    def __init__(self, stage: Stage, plan: ExportPlan):
        self.stage, self.plan = stage, plan
        self.image_ext = "png" if plan.request.lossless else "jpg"
        self.done: list[dict] = []
        self.members = {"uid": [], "key": [], "shard": [], "sample_id": []}
        self._writer, self._rows = None, []

    def add(self, sample: Sample) -> None:
        if self._writer is None:
            self._name = f"{len(self.done):05d}"
            self._path = self.stage.file(f"shards/{self._name}.tar")
            self._writer = wds.TarWriter(str(self._path), encoder=False, mtime=0)  # reproducible bytes
        record = {"__key__": sample.key, self.image_ext: sample.image, "txt": sample.fields["caption"].encode(),
                  "json": json.dumps(sample.fields, sort_keys=True).encode(),
                  "saliency.npy": npy_bytes(sample.saliency)}
        record.update({f"kept.{g}.npy": npy_bytes(k) for g, k in sample.kept.items()})
        self._writer.write(record)
        self._rows.append(sample.fields)
        for col, value in (("uid", sample.fields["uid"]), ("key", sample.key), ("shard", f"{self._name}.tar"),
                           ("sample_id", sample.fields["sample_id"])):
            self.members[col].append(value)
        if len(self._rows) == self.plan.request.samples_per_shard:
            self.close_shard()

    def close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        digest, size = sha256_file(self._path), self._path.stat().st_size
        self.stage.publish(f"shards/{self._name}.tar")
        pq.write_table(pa.Table.from_pylist(self._rows, SAMPLE_SCHEMA), self.stage.file(f"shards/{self._name}.parquet"))
        self.stage.publish(f"shards/{self._name}.parquet")
        stats = {"count": len(self._rows), "successes": len(self._rows), "failed_to_download": 0,
                 "failed_to_resize": 0, "status_dict": {"success": len(self._rows)}, "tar_bytes": size,
                 "sha256": digest}
        self.stage.write_bytes(f"shards/{self._name}_stats.json", json.dumps(stats, indent=1).encode())
        self.done.append({"name": f"{self._name}.tar", "samples": len(self._rows), "bytes": size, "sha256": digest})
        self._writer, self._rows = None, []
