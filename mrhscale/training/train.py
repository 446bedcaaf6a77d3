"""Training and transfer learning for MRH-Net: one process, torchrun/DDP, or multi-node.

The default recipe is the paper's (MRH_training.m): SGD momentum 0.9, lr 0.1,
x0.1 every 10 epochs, L2 1e-4 on weights (not biases), gradient L2-norm clip 0.01
applied to each parameter tensor separately, mini-batch 128, Glorot init, and
MATLAB's regression loss (half the sum of squared errors over the PxP outputs,
averaged over the batch). The loss scale is part of the recipe: with torch's
element-mean MSE the same lr and clip threshold mean 9x smaller gradients.

Distributed: launched under ``torchrun`` (RANK/WORLD_SIZE in the environment) the
trainer joins a process group (nccl on CUDA, gloo on CPU), wraps the model in
DDP and lets the PatchStream shard the data by rank. ``batch_size`` is the
GLOBAL batch (each rank takes batch_size / world_size), so lr and clip keep
their meaning whatever the number of processes.

Run directory::

    RUNDIR/config.json        resolved parameters
    RUNDIR/checkpoints/last.pt  model, optimiser, schedule position, RNG, history (atomic)
    RUNDIR/metrics.csv|json    one row per epoch
    RUNDIR/curve.png           training curve
    RUNDIR/model.pt            the model bundle (mrhscale.io.bundle)

A checkpoint is written after every epoch and on SIGTERM (after the current
step, then the process exits non-zero so a batch scheduler can requeue it);
``resume=True`` continues from it and ends where an uninterrupted run would:
the data order is a function of (seed, epoch) and the step within the epoch is
skipped forward.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import inspect
import io
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mrhscale.errors import MRHError
from mrhscale.nn.model import MRHNet
from mrhscale.ops.norm import Normalisation
from mrhscale.report.figures import training_curve
from mrhscale.stores import atomic_write, write_text

LOSSES = ("matlab", "mse", "centre-mse")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("piecewise", "cosine")
INITS = ("glorot", "torch")

CHECKPOINT = "last.pt"
_STOP_CHECK_EVERY_CUDA = 8  # CPU checks every step: a 1-element gloo all-reduce is ~0.1 ms


class TrainingInterrupted(Exception):
    """The run stopped on SIGTERM after writing a checkpoint; rerun with resume to continue."""

    def __init__(self, message: str, checkpoint: str):
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class TrainConfig:
    """Everything that determines the result of a run (saved in config.json and checkpoints)."""

    kind: str = "train"  # train | finetune
    patches: str = ""
    depth: int = 5
    width: int = 64
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "piecewise"
    drop_period: int = 10
    drop_factor: float = 0.1
    clip: float = 0.01
    loss: str = "matlab"
    init: str = "glorot"
    seed: int = 0
    amp: bool = True
    base_model: str | None = None
    head_lr_factor: float = 1.0
    freeze_backbone: bool = False
    shuffle_buffer: int | None = None

    def validate(self) -> None:
        def bad(opt, val, want):
            raise MRHError(f"--{opt} {val!r}: {want}")

        if self.loss not in LOSSES:
            bad("loss", self.loss, f"choose one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", self.optimizer, f"choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            bad("schedule", self.schedule, f"choose one of {', '.join(SCHEDULES)}")
        if self.init not in INITS:
            bad("init", self.init, f"choose one of {', '.join(INITS)}")
        if self.epochs < 1:
            bad("epochs", self.epochs, "must be at least 1")
        if self.batch_size < 1:
            bad("batch-size", self.batch_size, "must be at least 1")
        if self.depth < 0 or self.width < 1:
            bad("depth", self.depth, "depth must be >= 0 and width >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad("lr", self.lr, "must be a positive number")
        if not (math.isfinite(self.clip) and self.clip >= 0):
            bad("clip", self.clip, "must be >= 0 (0 disables clipping)")
        if self.weight_decay < 0 or not (0 <= self.momentum < 1):
            bad("weight-decay", self.weight_decay, "weight decay must be >= 0 and momentum in [0, 1)")
        if self.drop_period < 1 or not (0 < self.drop_factor <= 1):
            bad("drop-period", self.drop_period, "drop period >= 1 and drop factor in (0, 1]")
        if self.head_lr_factor <= 0:
            bad("head-lr-factor", self.head_lr_factor, "must be positive")


# Settings a resumed run may change; everything else must match the checkpoint.
_RESUMABLE_CHANGES = {"epochs", "patches"}


# ---------------------------------------------------------------- building blocks


def loss_function(name: str, half: int = 1):
    """``loss(pred[B,P,P], target[B,P,P]) -> scalar`` (computed in float32)."""
    if name == "matlab":
        # MATLAB regressionLayer: 0.5 * sum of squared errors over the outputs, mean over the batch.
        return lambda p, t: 0.5 * (p.float() - t).square().flatten(1).sum(1).mean()
    if name == "mse":
        return lambda p, t: nn.functional.mse_loss(p.float(), t)
    if name == "centre-mse":
        return lambda p, t: nn.functional.mse_loss(p[:, half, half].float(), t[:, half, half])
    raise MRHError(f"--loss {name!r}: choose one of {', '.join(LOSSES)}")


def init_weights(modules, how: str = "glorot") -> None:
    """MATLAB's convolution2dLayer defaults: Glorot-uniform weights, zero biases."""
    if how == "torch":
        for m in modules:
            m.reset_parameters()
        return
    for m in modules:
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)


def param_groups(model: MRHNet, lr: float, weight_decay: float, head_lr_factor: float = 1.0,
                 freeze_backbone: bool = False) -> list[dict]:
    """Weights get L2 decay, biases none (MATLAB BiasL2Factor 0); the head may get an lr factor."""
    head = {id(p) for p in model.head_parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        is_head = id(p) in head
        if freeze_backbone and not is_head:
            p.requires_grad_(False)
            continue
        groups.setdefault((is_head, name.endswith("bias")), []).append(p)
    out = []
    for (is_head, is_bias), params in sorted(groups.items()):
        factor = head_lr_factor if is_head else 1.0
        out.append({
            "params": params, "lr": lr * factor, "base_lr": lr * factor,
            "weight_decay": 0.0 if is_bias else weight_decay,
            "name": f"{'head' if is_head else 'backbone'}.{'bias' if is_bias else 'weight'}",
        })
    return out


def make_optimizer(cfg: TrainConfig, model: MRHNet) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.head_lr_factor, cfg.freeze_backbone)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Learning-rate multiplier of (0-based) ``epoch``: a pure function, so resume is exact."""
    if cfg.schedule == "piecewise":
        return cfg.drop_factor ** (epoch // cfg.drop_period)
    return 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))


def clip_per_tensor_(params, max_norm: float) -> None:
    """Scale each gradient tensor whose L2 norm exceeds ``max_norm`` down to it.

    MATLAB's GradientThresholdMethod 'l2norm' clips every learnable parameter
    separately (unlike torch's clip_grad_norm_, which uses one global norm).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    coef = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-30), torch.ones_like(norms))
    torch._foreach_mul_(grads, list(coef.unbind()))


# ---------------------------------------------------------------- distributed


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise MRHError("RANK/WORLD_SIZE/LOCAL_RANK in the environment are not integers") from None
    return rank, max(world, 1), local


def init_distributed(world: int, local_rank: int, timeout_s: float) -> bool:
    """Join the process group if launched with WORLD_SIZE > 1; returns whether this call did."""
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=_dt.timedelta(seconds=timeout_s))
    return True


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if _dist_on():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _barrier():
    if _dist_on():
        dist.barrier()


def replica_max_abs_diff(model: nn.Module) -> float:
    """Largest parameter difference between any rank and rank 0 (0.0 when in sync)."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    if not _dist_on():
        return 0.0
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flat)
    return float(max((q - parts[0]).abs().max() for q in parts))


# ---------------------------------------------------------------- data


def read_patch_store_attrs(url: str, storage_options: dict | None = None) -> dict:
    """Root attrs of a COMPLETE patch store, or an MRHError saying what is wrong."""
    from mrhscale.stores import PatchStore

    store = PatchStore.open(url, storage_options)
    store.split("train")
    return store.attrs


def check_resume_store(ckpt: dict, store: dict, patches: str, out_dir: str) -> None:
    """A run resumes only on the patch store it was trained on (it may have moved)."""
    from mrhscale.stores.patches import identity

    was, now = ckpt.get("patch_store"), identity(store)
    if was and was.get("fingerprint") != now["fingerprint"]:
        raise MRHError(
            f"--resume: {out_dir} was trained on another patch store (target {was.get('target')!r}, "
            f"{was.get('fingerprint', '?')[:19]}); {patches} holds target {now['target']!r} "
            f"({now['fingerprint'][:19]}); resume with the run's own patches, or start a new run "
            "with another --out")


def _stream_class():
    """The PatchStream class; MRHSCALE_STREAM=module:Class substitutes another (tests, plugins)."""
    spec = os.environ.get("MRHSCALE_STREAM")
    if spec:
        import importlib

        mod, _, name = spec.partition(":")
        return getattr(importlib.import_module(mod), name or "PatchStream")
    from mrhscale.training.stream import PatchStream

    return PatchStream


class _Failed:
    def __init__(self, exc):
        self.exc = exc


def prefetched(iterable, depth: int = 3):
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead, order preserved.

    Reading and normalising the next batch (zarr + numpy, which release the GIL)
    overlaps the forward/backward of the current one without worker processes.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iterable:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # re-raised in the consumer
            put(_Failed(e))

    th = threading.Thread(target=work, name="mrhscale-prefetch", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        th.join(timeout=10)


def _spare_core(device: torch.device) -> bool:
    """Whether a prefetch thread can run beside the compute without stalling it.

    On CPU, torch's OpenMP threads spin at barriers: one more busy thread on a
    fully used machine slowed training 10x in measurements, so prefetch only
    when this node's processes leave a core free (always on GPU).
    """
    if device.type == "cuda":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return torch.get_num_threads() * local_world < cores


class _Data:
    """A stream plus an optional per-channel affine correction to the model's normalisation."""

    def __init__(self, stream, correction, device, workers, pin):
        self.stream, self.device = stream, device
        self.a, self.b = (None, None) if correction is None else correction
        if self.a is not None:
            self.a = self.a.to(device).view(1, -1, 1, 1)
            self.b = self.b.to(device).view(1, -1, 1, 1)
        self.workers, self.pin = workers, pin

    def batches(self, epoch: int):
        self.stream.set_epoch(epoch)
        if self.workers > 0:
            src = torch.utils.data.DataLoader(
                self.stream, batch_size=None, num_workers=self.workers, pin_memory=self.pin,
                prefetch_factor=4, persistent_workers=False)
        elif _spare_core(self.device):
            src = prefetched(self.stream)
        else:
            src = self.stream
        try:
            for x, t in src:
                x = torch.as_tensor(x).to(self.device, non_blocking=True)
                t = torch.as_tensor(t).to(self.device, non_blocking=True)
                if self.a is not None:
                    x = torch.addcmul(self.b, x, self.a)
                yield x, t
        finally:
            if hasattr(src, "close"):
                src.close()  # stop a prefetch thread early (SIGTERM mid-epoch)


def _open_data(url, split, batch, cfg, rank, world, norm, device, workers, storage_options):
    cls = _stream_class()
    params = inspect.signature(cls).parameters
    kw: dict[str, Any] = {"split": split, "batch_size": batch, "shuffle": split == "train",
                          "seed": cfg.seed, "rank": rank, "world_size": world}
    if storage_options is not None:
        kw["storage_options"] = storage_options
    if split != "train" and "drop_last" in params:
        kw["drop_last"] = False
    if cfg.shuffle_buffer and "shuffle_buffer" in params:
        kw["shuffle_buffer"] = cfg.shuffle_buffer
    if "read_ahead" in params:  # a reader thread only where it cannot stall torch's threads
        kw["read_ahead"] = workers == 0 and _spare_core(device)
    correction = None
    if norm is not None and "norm" in params:
        kw["norm"] = norm
        stream = cls(url, **kw)
    else:
        stream = cls(url, **kw)
        if norm is not None:
            # Stream normalised with its store's stats s: x_s = (x - o_s)/s_s. The model
            # wants (x - o_m)/s_m = x_s * s_s/s_m + (o_s - o_m)/s_m. Targets keep the store's.
            sn = stream.norm
            o_s, s_s = np.asarray(sn.offset, np.float64), np.asarray(sn.scale, np.float64)
            o_m, s_m = np.asarray(norm.offset, np.float64), np.asarray(norm.scale, np.float64)
            correction = (torch.tensor(s_s / s_m, dtype=torch.float32),
                          torch.tensor((o_s - o_m) / s_m, dtype=torch.float32))
    return _Data(stream, correction, device, workers, device.type == "cuda")


# ---------------------------------------------------------------- files


def _rng_state() -> dict:
    np_state = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], np.uint32), *n[2:]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MRHError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


_METRIC_KEYS = ["epoch", "lr", "train_loss", "val_loss", "val_rmse", "val_r", "steps",
                "train_patches", "train_patches_per_s", "epoch_s"]


def write_metrics(out_dir: str, history: list[dict], summary: dict | None = None) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_METRIC_KEYS, extrasaction="ignore")
    w.writeheader()
    w.writerows(history)
    write_text(os.path.join(out_dir, "metrics.csv"), buf.getvalue())
    doc = {"epochs": history, **({"summary": summary} if summary else {})}
    write_text(os.path.join(out_dir, "metrics.json"), json.dumps(doc, indent=1, default=float))


# ---------------------------------------------------------------- the loop


class _StopFlag:
    def __init__(self):
        self.stop = False
        self._old = None

    def install(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.stop = True

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


@torch.no_grad()
def evaluate(model: nn.Module, data: _Data, loss_fn, half: int, target_scale: float,
             amp_ctx) -> dict:
    """Loss, centre-voxel RMSE (target units) and Pearson r over the (sharded) split."""
    model.eval()
    acc = torch.zeros(7, dtype=torch.float64, device=data.device)  # n, loss*n, sp, st, spp, stt, spt
    for x, t in data.batches(0):
        with amp_ctx():
            p = model(x)
        p = p.float()
        n = x.shape[0]
        pc, tc = p[:, half, half].double(), t[:, half, half].double()
        acc += torch.stack([
            torch.tensor(float(n), dtype=torch.float64, device=acc.device),
            loss_fn(p, t).double() * n, pc.sum(), tc.sum(), (pc * pc).sum(), (tc * tc).sum(),
            (pc * tc).sum()])
    model.train()
    acc = _all_reduce(acc).cpu().tolist()
    n, ls, sp, st, spp, stt, spt = acc
    if n == 0:
        return {"val_loss": float("nan"), "val_rmse": float("nan"), "val_r": float("nan")}
    mse = max((spp - 2 * spt + stt) / n, 0.0)
    cov = spt / n - sp * st / n**2
    var_p, var_t = spp / n - (sp / n) ** 2, stt / n - (st / n) ** 2
    r = cov / math.sqrt(var_p * var_t) if var_p > 0 and var_t > 0 else float("nan")
    return {"val_loss": ls / n, "val_rmse": math.sqrt(mse) * target_scale, "val_r": r}


def _resolve_device(device, local_rank: int) -> torch.device:
    if device is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MRHError(f"--device {device}: CUDA is not available on this machine")
    return dev


def _progress(total, desc, quiet):
    if quiet:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, file=sys.stderr)


def _run(cfg: TrainConfig, out_dir: str, *, resume: bool, build_model, stream_norm,
         bundle_norm, store: dict, device=None, workers: int = 0, threads: int | None = None,
         quiet: bool = False, dist_timeout: float | None = None, storage_options=None,
         keep_checkpoints: bool = False, extra_provenance: dict | None = None) -> dict:
    out_dir = os.fspath(out_dir)
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    ckpt_path = os.path.join(ckpt_dir, CHECKPOINT)
    if workers < 0:
        raise MRHError(f"--workers {workers}: must be >= 0")
    if threads is not None and threads < 1:
        raise MRHError(f"--threads {threads}: must be >= 1")
    rank, world, local_rank = dist_env()
    if cfg.batch_size % world:
        raise MRHError(f"--batch-size {cfg.batch_size} (global) is not divisible by the "
                       f"{world} processes; choose a multiple of {world}")
    if dist_timeout is None:
        dist_timeout = float(os.environ.get("MRHSCALE_DIST_TIMEOUT", "1800"))
    dev = _resolve_device(device, local_rank)
    if threads:
        torch.set_num_threads(threads)

    from mrhscale.stores import Folder
    from mrhscale.stores.patches import identity as store_identity

    folder = Folder(out_dir, "mrhscale-run")
    started = init_distributed(world, local_rank, dist_timeout)
    stop = _StopFlag()
    try:
        main = rank == 0
        _seed_all(cfg.seed)
        model = build_model().to(dev)
        opt = make_optimizer(cfg, model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        start_epoch, start_step, history, partial_loss = 0, 0, [], 0.0
        if resume:
            ck = load_checkpoint(ckpt_path)
            check_resume_store(ck, store, cfg.patches, out_dir)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            start_epoch, start_step = int(ck["epoch"]), int(ck["step"])
            history = list(ck["history"])
            partial_loss = float(ck.get("partial_loss_sum", 0.0)) if main else 0.0
            _set_rng_state(ck["rng"])
            was = (int(ck.get("world_size", world)), int(ck.get("workers", workers)))
            if was != (world, workers) and main and not quiet:
                print(f"mrhscale: resuming a run of {was[0]} process(es) x {was[1]} loader "
                      f"worker(s) with {world} x {workers}: the data order from here on "
                      "differs from the original run's", file=sys.stderr)
        elif main:
            folder.mark(kind=cfg.kind, patch_store=store_identity(store))
            write_text(os.path.join(out_dir, "config.json"),
                        json.dumps({**asdict(cfg), "world_size": world}, indent=1))
        net = model
        if world > 1:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None,
                gradient_as_bucket_view=True)
        half = int(store["patch"]["half"])
        loss_fn = loss_function(cfg.loss, half)
        per_rank = cfg.batch_size // world
        train_data = _open_data(cfg.patches, "train", per_rank, cfg, rank, world, stream_norm, dev,
                                workers, storage_options)
        val_data = None
        if int(store.get("n_val", 1)) > 0:
            val_data = _open_data(cfg.patches, "val", max(per_rank, 256), cfg, rank, world,
                                  stream_norm, dev, 0, storage_options)
        amp = cfg.amp and dev.type == "cuda"

        def amp_ctx():
            if amp:
                return torch.autocast("cuda", dtype=torch.bfloat16)
            return contextlib.nullcontext()

        target_scale = float(bundle_norm.target_scale)
        check_every = _STOP_CHECK_EVERY_CUDA if dev.type == "cuda" else 1
        step_delay = float(os.environ.get("MRHSCALE_DEBUG_STEP_DELAY", "0") or 0)
        fail_after = int(os.environ.get("MRHSCALE_DEBUG_KILL_AFTER_EPOCH", "0") or 0)

        def save_checkpoint(epoch, step, loss_sum):
            if not main:
                return
            state = {
                "format": "mrhscale-checkpoint", "config": asdict(cfg), "epoch": epoch,
                "step": step, "partial_loss_sum": loss_sum, "history": history,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "schedule": {"name": cfg.schedule, "epoch": epoch,
                             "lr_factor": lr_factor(cfg, min(epoch, cfg.epochs - 1))},
                "rng": _rng_state(), "world_size": world, "workers": workers,
                "patch_store": store_identity(store),
            }
            atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))
            if keep_checkpoints and step == 0:
                atomic_write(os.path.join(ckpt_dir, f"epoch-{epoch:04d}.pt"),
                              lambda tmp: torch.save(state, tmp))

        stop.install()
        net.train()
        for epoch in range(start_epoch, cfg.epochs):
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(cfg, epoch)
            steps_t = torch.tensor([train_data.stream.steps_per_epoch()], dtype=torch.int64,
                                   device=dev)
            steps = int(_all_reduce(steps_t, dist.ReduceOp.MIN if _dist_on() else None).item())
            if steps < 1:
                raise MRHError(f"{cfg.patches}: too few training patches for one batch of "
                               f"{per_rank} per process; lower --batch-size")
            first = start_step if epoch == start_epoch else 0
            loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
            bar = _progress(steps, f"epoch {epoch + 1}/{cfg.epochs}", quiet or not main)
            if bar is not None and first:
                bar.update(first)
            it = train_data.batches(epoch)
            for _ in range(first):  # mid-epoch resume: same order, skip what was done
                next(it)
            t0 = time.perf_counter()
            done = first
            interrupted = False
            for step in range(first, steps):
                try:
                    x, t = next(it)
                except StopIteration:
                    raise RuntimeError(f"rank {rank}: the patch stream ended after {step} of "
                                       f"{steps} batches (equal-steps contract broken)") from None
                with amp_ctx():
                    pred = net(x)
                loss = loss_fn(pred, t)
                loss.backward()
                clip_per_tensor_(trainable, cfg.clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                done = step + 1
                if bar is not None:
                    bar.update(1)
                if step_delay:
                    time.sleep(step_delay)
                if done % check_every == 0 or done == steps:
                    flag = torch.stack([torch.tensor(1.0 if stop.stop else 0.0, device=dev),
                                        (~torch.isfinite(loss_sum)).float()])
                    stopping, diverged = _all_reduce(flag, dist.ReduceOp.MAX if _dist_on() else None).tolist()
                    if diverged:
                        raise _diverged(epoch, done, steps, ckpt_path, cfg)
                    if stopping > 0:
                        interrupted = done < steps
                        if interrupted:
                            break
            train_s = time.perf_counter() - t0
            it.close()
            if bar is not None:
                bar.close()
            total = _all_reduce(loss_sum.clone()).item() + partial_loss
            partial_loss = 0.0
            if interrupted:
                save_checkpoint(epoch, done, total if main else 0.0)
                _barrier()
                raise TrainingInterrupted(
                    f"stopped by SIGTERM at epoch {epoch + 1}, step {done}/{steps}; checkpoint "
                    f"{ckpt_path}: rerun with --resume to continue", ckpt_path)
            vm = (evaluate(model, val_data, loss_fn, half, target_scale, amp_ctx)
                  if val_data is not None else
                  {"val_loss": float("nan"), "val_rmse": float("nan"), "val_r": float("nan")})
            n_patches = (done - first) * cfg.batch_size
            row = {"epoch": epoch + 1, "lr": cfg.lr * lr_factor(cfg, epoch),
                   "train_loss": total / (steps * world), **vm, "steps": steps,
                   "train_patches": n_patches,
                   "train_patches_per_s": n_patches / train_s if train_s > 0 else float("nan"),
                   "epoch_s": time.perf_counter() - t0}
            history.append(row)
            if main:
                save_checkpoint(epoch + 1, 0, 0.0)
                write_metrics(out_dir, history)
                if not quiet:
                    print(f"epoch {row['epoch']:3d}/{cfg.epochs}  lr {row['lr']:.2e}  "
                          f"train {row['train_loss']:.4g}  val {row['val_loss']:.4g}  "
                          f"rmse {row['val_rmse']:.4g}  r {row['val_r']:.3f}  "
                          f"{row['train_patches_per_s']:.0f} patches/s", file=sys.stderr)
            _barrier()
            if fail_after and epoch + 1 == fail_after:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: a real crash after epoch k
            flag = torch.tensor([1.0 if stop.stop else 0.0], device=dev)
            stopping = _all_reduce(flag, dist.ReduceOp.MAX if _dist_on() else None).item() > 0
            if stopping and epoch + 1 < cfg.epochs:  # after the last epoch: just finish
                raise TrainingInterrupted(
                    f"stopped by SIGTERM after epoch {epoch + 1}; checkpoint {ckpt_path}: "
                    "rerun with --resume to continue", ckpt_path)

        drift = replica_max_abs_diff(model)
        summary = {
            "epochs": cfg.epochs, "final": history[-1] if history else {},
            "best_val_loss": min((h["val_loss"] for h in history if math.isfinite(h["val_loss"])),
                                 default=float("nan")),
            "world_size": world, "replica_max_abs_diff": drift,
        }
        model_path = os.path.join(out_dir, "model.pt")
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise _diverged(cfg.epochs - 1, 0, 0, ckpt_path, cfg)
        if main:
            from mrhscale import __version__
            from mrhscale.io.bundle import save_bundle

            prov = {
                "stage": cfg.kind, "mrhscale_version": __version__, "torch_version": torch.__version__,
                "config": asdict(cfg), "patches": cfg.patches,
                "patch_store": {k: store.get(k) for k in
                                ("n_train", "n_val", "subjects", "val_subjects", "seed", "rules",
                                 "provenance")},
                "world_size": world, "device": dev.type, "final_metrics": summary["final"],
                "replica_max_abs_diff": drift,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                **(extra_provenance or {}),
            }
            save_bundle(model_path, model, channels=list(store["channels"]),
                        norm=bundle_norm, target=store["target"], patch=dict(store["patch"]),
                        provenance=json.loads(json.dumps(prov, default=str)))
            write_metrics(out_dir, history, summary)
            training_curve(out_dir, history, f"{cfg.kind}: {store['target']} (depth {model.depth})")
        _barrier()
        return {"out_dir": out_dir, "model": model_path, "checkpoint": ckpt_path,
                "history": history, "config": asdict(cfg), **summary}
    finally:
        stop.restore()
        if started:
            dist.destroy_process_group()


@contextlib.contextmanager
def run_folder(out_dir: str):
    """The run folder, held by this run: anything but a training run is refused untouched,
    and a second run on the same folder is refused while this one lives (rank 0 holds it)."""
    from mrhscale.stores import Folder

    folder = Folder(out_dir, "mrhscale-run")
    folder.check()
    if dist_env()[0] != 0:
        yield folder
        return
    with folder.claim():
        yield folder


def _diverged(epoch: int, step: int, steps: int, ckpt_path: str, cfg: TrainConfig) -> MRHError:
    where = f"epoch {epoch + 1}, step {step}/{steps}" if steps else f"after epoch {epoch + 1}"
    kept = (f"the last good checkpoint ({ckpt_path}) is kept" if os.path.exists(ckpt_path)
            else "no checkpoint was written")
    return MRHError(f"training diverged: the loss became non-finite at {where} (lr {cfg.lr:g}); "
                    f"no model was saved and {kept}; lower --lr or --clip, check the inputs for "
                    "extreme values, and start again with another --out")


# ---------------------------------------------------------------- public API


def _prepare(cfg: TrainConfig, out_dir: str, resume: bool, given: dict) -> TrainConfig:
    """New run: check the directory is free. Resume: take the checkpoint's config."""
    ckpt_path = os.path.join(os.fspath(out_dir), "checkpoints", CHECKPOINT)
    if not resume:
        if os.path.exists(ckpt_path) or os.path.exists(os.path.join(os.fspath(out_dir), "model.pt")):
            raise MRHError(f"{out_dir}: already holds a training run; pass --resume to continue it "
                           "or choose another --out")
        cfg.validate()
        return cfg
    if not os.path.exists(ckpt_path):
        raise MRHError(f"--resume: no checkpoint at {ckpt_path}; start the run without --resume")
    saved = load_checkpoint(ckpt_path).get("config", {})
    names = {f.name for f in fields(TrainConfig)}
    old = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    for k, v in given.items():
        if v is None or k not in names:
            continue
        if k in _RESUMABLE_CHANGES:
            setattr(old, k, v)
        elif getattr(old, k) != v:
            raise MRHError(f"--resume: {k}={v!r} differs from the checkpointed run's "
                           f"{getattr(old, k)!r}; a resumed run keeps its own settings")
    old.validate()
    return old


def train(patches: str, out_dir: str, *, depth: int | None = None, width: int | None = None,
          epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
          optimizer: str | None = None, schedule: str | None = None, loss: str | None = None,
          clip: float | None = None, weight_decay: float | None = None,
          momentum: float | None = None, drop_period: int | None = None,
          drop_factor: float | None = None, init: str | None = None, seed: int | None = None,
          amp: bool | None = None, shuffle_buffer: int | None = None, workers: int = 0,
          resume: bool = False, device: str | None = None, threads: int | None = None,
          quiet: bool = False, dist_timeout: float | None = None,
          storage_options: dict | None = None, keep_checkpoints: bool = False) -> dict:
    """Train MRH-Net on a patch store; returns a summary (paths, per-epoch history, config).

    Options left as None take the paper's recipe (see TrainConfig) or, with
    ``resume=True``, the checkpointed run's own value. ``batch_size`` is global.
    Raises TrainingInterrupted after checkpointing if SIGTERM arrives.
    """
    from mrhscale.stores import resolve

    patches, out_dir = resolve(patches, "patches"), resolve(out_dir, "--out")
    given = dict(patches=patches, depth=depth, width=width, epochs=epochs, batch_size=batch_size,
                 lr=lr, optimizer=optimizer, schedule=schedule, loss=loss, clip=clip,
                 weight_decay=weight_decay, momentum=momentum, drop_period=drop_period,
                 drop_factor=drop_factor, init=init, seed=seed, amp=amp,
                 shuffle_buffer=shuffle_buffer)
    cfg = TrainConfig(kind="train", **{k: v for k, v in given.items() if v is not None})
    if optimizer == "adamw" and lr is None:
        cfg.lr = 1e-3
    with run_folder(out_dir):
        return _train(cfg, out_dir, resume, given, workers=workers, device=device, threads=threads,
                      quiet=quiet, dist_timeout=dist_timeout, storage_options=storage_options,
                      keep_checkpoints=keep_checkpoints)


def _train(cfg, out_dir, resume, given, **kw) -> dict:
    cfg = _prepare(cfg, out_dir, resume, given)
    store = read_patch_store_attrs(cfg.patches, kw["storage_options"])
    norm = Normalisation.from_dict(store["norm"])
    n_ch = len(store["channels"])

    def build():
        m = MRHNet(n_ch, cfg.depth, cfg.width)
        init_weights([mod for mod in m.modules() if isinstance(mod, nn.Conv2d)], cfg.init)
        return m

    return _run(cfg, out_dir, resume=resume, build_model=build, stream_norm=None,
                bundle_norm=norm, store=store, **kw)


def check_compatible(meta: dict, store: dict, model_path: str, patches: str) -> None:
    """The data must feed the model the channels, in the order, and the patch it was trained on."""
    mch, sch = list(meta["channels"]), list(store["channels"])
    if mch != sch:
        missing = [c for c in mch if c not in sch]
        extra = [c for c in sch if c not in mch]
        what = (f"missing {missing[:5]}" if missing else "") + \
               (f"{'; ' if missing else ''}unexpected {extra[:5]}" if extra else "")
        raise MRHError(f"{patches}: channels do not match model {model_path} "
                       f"({len(sch)} vs {len(mch)} channels; {what or 'same names, different order'}); "
                       "extract patches with the model's contrasts")
    mp, sp = meta["patch"], store["patch"]
    for k in ("half", "size", "axis"):
        if k in mp and k in sp and mp[k] != sp[k]:
            raise MRHError(f"{patches}: patch {k}={sp[k]!r} but model {model_path} was trained "
                           f"with {k}={mp[k]!r}; extract patches with the model's patch spec")


def finetune(model_path: str, patches: str, out_dir: str, *, epochs: int | None = None,
             batch_size: int | None = None, lr: float | None = None,
             head_lr_factor: float | None = None, freeze_backbone: bool | None = None,
             optimizer: str | None = None, schedule: str | None = None, loss: str | None = None,
             clip: float | None = None, weight_decay: float | None = None,
             momentum: float | None = None, drop_period: int | None = None,
             drop_factor: float | None = None, init: str | None = None, seed: int | None = None,
             amp: bool | None = None, shuffle_buffer: int | None = None, workers: int = 0,
             resume: bool = False, device: str | None = None, threads: int | None = None,
             quiet: bool = False, dist_timeout: float | None = None,
             storage_options: dict | None = None, keep_checkpoints: bool = False) -> dict:
    """Transfer learning (MRH_training_Trans): fresh Conv4/Conv5 with lr factor 10, base lr 1e-4.

    The new bundle keeps the MODEL's input normalisation (the backbone was trained
    with it) and takes the new stain's target scaling from the patch store.
    ``freeze_backbone=True`` trains only the head.
    """
    from mrhscale.stores import resolve

    model_path, patches = resolve(model_path, "model"), resolve(patches, "patches")
    out_dir = resolve(out_dir, "--out")
    given = dict(patches=patches, epochs=epochs, batch_size=batch_size, lr=lr,
                 head_lr_factor=head_lr_factor, freeze_backbone=freeze_backbone,
                 optimizer=optimizer, schedule=schedule, loss=loss, clip=clip,
                 weight_decay=weight_decay, momentum=momentum, drop_period=drop_period,
                 drop_factor=drop_factor, init=init, seed=seed, amp=amp,
                 shuffle_buffer=shuffle_buffer, base_model=os.path.abspath(model_path))
    defaults = {"lr": 1e-4, "head_lr_factor": 10.0, "freeze_backbone": False}
    cfg = TrainConfig(kind="finetune", **{**defaults,
                                          **{k: v for k, v in given.items() if v is not None}})
    with run_folder(out_dir):
        return _finetune(cfg, model_path, out_dir, resume, given, workers=workers, device=device,
                         threads=threads, quiet=quiet, dist_timeout=dist_timeout,
                         storage_options=storage_options, keep_checkpoints=keep_checkpoints)


def _finetune(cfg, model_path, out_dir, resume, given, **kw) -> dict:
    from mrhscale.io.bundle import model_from_bundle, read_bundle

    cfg = _prepare(cfg, out_dir, resume, given)
    bundle = read_bundle(cfg.base_model if resume else model_path)
    base_norm = Normalisation.from_dict(bundle["norm"])
    store = read_patch_store_attrs(cfg.patches, kw["storage_options"])
    check_compatible(bundle, store, model_path, cfg.patches)
    arch = bundle["arch"]
    cfg.depth, cfg.width = int(arch["depth"]), int(arch.get("width", 64))
    store_norm = Normalisation.from_dict(store["norm"])
    norm = Normalisation(base_norm.mode, list(base_norm.offset), list(base_norm.scale),
                         store_norm.target_offset, store_norm.target_scale,
                         {**base_norm.meta, "target_from": cfg.patches})

    def build():
        m = model_from_bundle(bundle)
        init_weights([m.conv4, m.conv5], cfg.init)  # fresh head, seeded
        return m

    prov = {"base_model": {"path": cfg.base_model, "target": bundle.get("target"),
                           "provenance": bundle.get("provenance", {})}}
    return _run(cfg, out_dir, resume=resume, build_model=build, stream_norm=norm,
                bundle_norm=norm, store=store, extra_provenance=prov, **kw)
