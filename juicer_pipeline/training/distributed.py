"""Data-parallel student training: torch's DistributedDataParallel under `torchrun`.

Every process builds the same student from the same seed and draws the same *global* batches and
patch sets (one generator, as in one process); each trains on its contiguous share of every global
batch. open_clip's `ClipLoss(gather_with_grad=True)` gathers the image and text features of all
processes with their gradients, so the contrastive loss is the one over the global batch, the same
number on every process (`loss.clip_loss`, gathered). DDP averages the dense gradients. The text
token table's gradient is sparse (`SparseAdam` updates only the rows a batch uses), which DDP cannot all-reduce on NCCL, so
DDP ignores that one parameter and `Replicas.average_sparse_grad` averages its rows with two plain
collectives. The loss curve then equals the one-process run's of the same global batch and seed
up to float summation order.

`train_student_distributed` runs under an initialised process group (any launcher);
`train_student_processes` launches `torchrun` on this module (`main`) and returns what
`train_student` returns. No Dagster here.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, fields
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss
from torch.nn.parallel import DistributedDataParallel

from ..models.kept_tokens import install_kept_tokens
from ..models.world_clip import ClipArch, build_clip
from .config import StudentConfig, with_native_precision
from .evaluation import EvalSet, evaluate_student
from .trainer import TrainClock, TrainData, train

PROGRESS = "[juicer-ddp] "  # rank 0's progress lines on stdout, passed on by the launcher
SPARSE_PARAMETER = "token_embedding.weight"


class DistributedTrainingError(RuntimeError):
    pass


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


class Replicas:
    """This process's part in a data-parallel run: its share of each batch and the exchanges
    with the others. Needs an initialised default process group."""

    def __init__(self, device: str):
        if not dist.is_initialized():
            raise RuntimeError("data-parallel training needs an initialised process group (run under torchrun)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):  # one GPU per process: the local rank's
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device(device)
        self.comm_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        self._loss = ClipLoss(gather_with_grad=True, rank=self.rank, world_size=self.world)

    def wrap(self, model, batch_size: int):
        if batch_size % self.world:
            raise ValueError(f"batch_size {batch_size} does not split into {self.world} equal shares")
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [SPARSE_PARAMETER])
        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                       broadcast_buffers=False)  # the only buffer is the constant text mask

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of a global batch (rank order = batch order)."""
        size = len(batch) // self.world
        return batch[self.rank * size:(self.rank + 1) * size]

    def loss(self, ddp_model, images, tokens):
        """The contrastive loss over the global batch: features gathered from every process with
        their gradients (open_clip's loss, as its distributed training uses it)."""
        image_features, text_features, scale = ddp_model(images, tokens)  # normalised, as in clip_loss
        return self._loss(image_features, text_features, scale.clamp(max=100))

    def average_sparse_grad(self, weight: torch.nn.Parameter, tokens: torch.Tensor) -> None:
        """Average the token table's sparse gradient over processes, on exactly the rows the
        global batch used (the rows one process would update, zero-gradient rows included)."""
        grad = weight.grad
        if grad is None:
            return
        everyone = [torch.empty_like(tokens) for _ in range(self.world)]
        dist.all_gather(everyone, tokens.contiguous())
        rows = torch.unique(torch.cat(everyone))  # sorted
        local = grad.coalesce()
        values = torch.zeros(len(rows), weight.shape[1], dtype=local.dtype, device=local.device)
        values[torch.searchsorted(rows, local.indices()[0])] = local.values()
        dist.all_reduce(values)
        weight.grad = torch.sparse_coo_tensor(rows[None], values / self.world, weight.shape, is_coalesced=True)

    def sum(self, count: int) -> int:
        t = torch.tensor([count], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t)
        return int(t.item())

    def gather(self, count: int) -> list[int]:
        everyone = [torch.zeros(1, dtype=torch.int64, device=self.comm_device) for _ in range(self.world)]
        dist.all_gather(everyone, torch.tensor([count], dtype=torch.int64, device=self.comm_device))
        return [int(t.item()) for t in everyone]

    def barrier(self) -> None:
        dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()

    def clock(self) -> "SharedClock":
        return SharedClock(self)


class SharedClock(TrainClock):
    """Rank 0's training clock, read by every process: phase ends, the wall-clock schedule and
    evaluation points are then decided alike everywhere (a collective per reading)."""

    def __init__(self, replicas: Replicas):
        super().__init__()
        self.replicas = replicas

    def elapsed(self) -> float:
        t = torch.tensor([super().elapsed()], dtype=torch.float64, device=self.replicas.comm_device)
        dist.broadcast(t, src=0)
        return float(t.item())


def train_student_distributed(data: TrainData, cfg: StudentConfig, seed: int, evaluate=None, progress=None,
                              on_step=None):
    """`train_student` as one process of a data-parallel run (the process group initialised, e.g.
    by torchrun). Every process gets the model and the same record: losses and the budget are
    the global batch's; `tokens_seen` sums what each process fed (`tokens_fed_per_process`).
    `evaluate` runs on rank 0 only (the others wait); pass it on every rank all the same."""
    return train(data, cfg, seed, evaluate, progress, on_step, replicas=Replicas(cfg.device))


# --- the torchrun entry point and its launcher --------------------------------------------------

def _config_dict(cfg: StudentConfig) -> dict:
    return {**asdict(cfg), "arch": cfg.arch.to_dict()}


def _config(d: dict) -> StudentConfig:
    return StudentConfig(**{**d, "arch": ClipArch.from_dict(d["arch"])})


def _save_eval_set(ev: EvalSet, path: Path) -> None:
    values = {f.name: getattr(ev, f.name) for f in fields(ev)}
    values["class_labels"] = torch.from_numpy(np.asarray(values["class_labels"]))
    torch.save(values, path)


def _load_eval_set(path: Path) -> EvalSet:
    values = torch.load(path, weights_only=True)
    values["class_labels"] = values["class_labels"].numpy()
    return EvalSet(**values)


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _run(job: Path) -> None:
    from open_clip.tokenizer import SimpleTokenizer
    from safetensors.torch import save_file

    spec = json.loads((job / "job.json").read_text())
    cfg = _config(spec["config"])
    rank = int(os.environ["RANK"])
    if spec["backend"] == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(spec["backend"], timeout=timedelta(seconds=spec["timeout_s"]))
    stored = torch.load(job / "data.pt", mmap=True, weights_only=True)  # pages shared by the processes
    data = TrainData(stored["images"], stored["tokens"], stored["kept"], stored["patches"])
    evaluate = None
    if spec["evaluate"]:
        if rank == 0:
            ev = _load_eval_set(job / "eval.pt")
            tokenizer = SimpleTokenizer(context_length=cfg.arch.context_length)
            device = f"cuda:{os.environ['LOCAL_RANK']}" if spec["backend"] == "nccl" else cfg.device
            evaluate = lambda m: evaluate_student(m, tokenizer, ev, device)  # noqa: E731
        else:
            evaluate = lambda m: {}  # noqa: E731  (never called: rank 0 evaluates)
    losses: list[float] = []
    say = (lambda msg: print(PROGRESS + msg, flush=True)) if rank == 0 else None
    model, record = train_student_distributed(data, cfg, spec["seed"], evaluate, say,
                                              on_step=lambda step, loss: losses.append(loss))
    if rank == 0:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        _write_atomically(job / "model.safetensors", lambda p: save_file(state, str(p)))
        _write_atomically(job / "result.json", lambda p: p.write_text(json.dumps(
            {"record": record, "step_losses": losses})))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """torchrun's entry: `python -m juicer_pipeline.training.distributed <job dir>`.
    The job dir holds job.json, data.pt and eval.pt as `train_student_processes` writes them."""
    from torch.distributed.elastic.multiprocessing.errors import record

    job = Path((sys.argv[1:] if argv is None else argv)[0])

    @record
    def run():
        try:
            _run(job)
        except BaseException as exc:  # the launcher names the failing rank and its error
            rank = os.environ.get("RANK", "?")
            (job / f"error-rank{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
            raise

    run()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(cfg: StudentConfig) -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # this package's code, whatever the caller's path
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    if "lo" in {name for _, name in socket.if_nameindex()}:  # collectives over the loopback only
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return env


def _failure(job: Path, rc: int, processes: int, tail) -> str:
    errors = sorted(job.glob("error-rank*.txt"), key=lambda p: p.stat().st_mtime)  # first failure first
    causes = "; ".join(f"rank {p.stem.removeprefix('error-rank')}: {p.read_text()[:2000]}" for p in errors)
    return (f"data-parallel training with {processes} processes failed (torchrun exit {rc}): "
            f"{causes or 'no rank reported an error (killed?)'}\n--- last output ---\n" + "\n".join(tail))


def train_student_processes(data: TrainData, cfg: StudentConfig, seed: int, processes: int,
                            eval_set: EvalSet | None = None, progress=None, on_step=None,
                            timeout_s: float = 1800.0, scratch: Path | None = None, module: str = __name__):
    """`train_student` on `processes` data-parallel processes: `torchrun --nproc-per-node` on this
    machine, rendezvous on 127.0.0.1 at a free port, gloo on CPU and NCCL on CUDA (one GPU per
    process). Returns (model, record) as `train_student` does; with `eval_set`, rank 0 evaluates
    the learning curve with `evaluate_student`. A rank that fails, or waits longer than
    `timeout_s` for the others in a collective, ends the run with a `DistributedTrainingError`
    that names it. The processes read the data from a temporary folder under `scratch` (default: the
    system's), mapped into memory once for all of them. `module` is the entry point torchrun runs
    (tests wrap `main`)."""
    from safetensors.torch import load_file

    if processes < 2:
        raise ValueError("train_student_processes is for 2 or more processes; use train_student for one")
    cfg = with_native_precision(cfg, progress)  # once, here: every process must train in the same precision
    if cfg.batch_size % processes:
        raise ValueError(f"batch_size {cfg.batch_size} does not split into {processes} equal shares")
    backend = backend_for(cfg.device)
    if backend == "nccl" and torch.cuda.device_count() < processes:
        raise ValueError(f"{processes} processes need {processes} GPUs, this machine has {torch.cuda.device_count()}")
    if scratch is not None:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="juicer-ddp-", dir=scratch) as tmp:
        job = Path(tmp)
        torch.save({"images": data.images, "tokens": data.tokens, "kept": data.kept, "patches": data.patches},
                   job / "data.pt")
        if eval_set is not None:
            _save_eval_set(eval_set, job / "eval.pt")
        (job / "job.json").write_text(json.dumps({"config": _config_dict(cfg), "seed": seed, "backend": backend,
                                                  "timeout_s": timeout_s, "evaluate": eval_set is not None}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={processes}",
               "--max-restarts=0", "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
               "-m", module, str(job)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=_environment(cfg), start_new_session=True)
        tail: deque[str] = deque(maxlen=40)
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.startswith(PROGRESS):
                    if progress:
                        progress(line[len(PROGRESS):])
                else:
                    tail.append(line)
            rc = proc.wait()
        except BaseException:  # interrupted (e.g. the run was cancelled): take the processes down too
            _stop(proc)
            raise
        if rc != 0 or not (job / "result.json").exists():
            raise DistributedTrainingError(_failure(job, rc, processes, tail))
        result = json.loads((job / "result.json").read_text())
        model = build_clip(cfg.arch)
        install_kept_tokens(model)
        model.load_state_dict(load_file(str(job / "model.safetensors")))
    model.to(torch.device(cfg.device)).eval()
    if on_step is not None:
        for step, loss in enumerate(result["step_losses"], start=1):
            on_step(step, loss)
    return model, result["record"]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


if __name__ == "__main__":
    main()
