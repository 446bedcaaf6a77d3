"""The training loop: one process (one rank under torchrun) from a fresh or restored state to
the model bundle, with a checkpoint after every epoch and on SIGTERM.

Every rank runs the same number of batches (DDP needs it); the ranks agree every
step on CPU (every 8 on CUDA) whether to stop (SIGTERM) and whether the loss is
still finite. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.io.bundle import save_bundle
from mrhscale.log import logger, note
from mrhscale.log import progress as log_progress
from mrhscale.nn.accel import compiled, one_line
from mrhscale.options import CACHE_MODES, RunOptions
from mrhscale.parallel.context import Context
from mrhscale.report.figures import training_curve
from mrhscale.results import TrainResult
from mrhscale.stores import Folder, atomic_write, write_text
from mrhscale.stores.legacy import stains_of
from mrhscale.stores.patches import identity as store_identity
from mrhscale.training.accel import choose as choose_numerics
from mrhscale.training.accel import from_checkpoint
from mrhscale.training.accel import requested as numerics_request
from mrhscale.training.augment import Augment
from mrhscale.training.augment import parse as parse_augment
from mrhscale.training.checkpoint import (
    load_checkpoint,
    rng_state,
    seed_all,
    set_rng_state,
    write_metrics,
)
from mrhscale.training.config import (
    CHECKPOINT,
    STOP_CHECK_EVERY_CUDA,
    TrainConfig,
    TrainingInterrupted,
)
from mrhscale.training.data import Batches, check_resume_store, open_data
from mrhscale.training.distributed import (
    all_reduce,
    barrier,
    dist_env,
    dist_on,
    init_distributed,
    replica_max_abs_diff,
)
from mrhscale.training.ood import training_input_distance
from mrhscale.training.optim import (
    clip_per_tensor_,
    loss_function,
    lr_factor,
    make_optimizer,
    scale_loss_function,
)


class StopFlag:
    """SIGTERM (what SLURM and Kubernetes send before a kill) as a flag the loop polls."""

    def __init__(self):
        self.stop = False
        self._old = None

    def install(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.stop = True

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


NAN_METRICS = {"val_loss": float("nan"), "val_rmse": float("nan"), "val_r": float("nan"), "val_patches": 0}


@torch.no_grad()
def validate(model: nn.Module, data: Batches, loss_fn, half: int, target_scale,
             amp_ctx, stains: list[str], limit: int | None = None, pick=None) -> dict:
    """Loss, centre-voxel RMSE (target units) and Pearson r over the (sharded) split, or
    over its first ``limit`` patches per rank (the store is shuffled: a fixed random subset):
    per stain (``val_r_<stain>``, over the patches that have it), and ``val_r``/``val_rmse``
    their means over the ``stains``."""
    model.eval()
    n_t = len(stains)
    acc = torch.zeros(n_t + 1, 6, dtype=torch.float64, device=data.device)  # per stain: n, sp, st, spp, stt, spt
    # the last row: patches, loss * patches
    seen = 0
    with contextlib.closing(data.batches(0)) as batches:  # a subset stops early: end the reader
        for x, t in batches:
            if limit is not None:
                x, t = x[: limit - seen], t[: limit - seen]
            with amp_ctx():
                p = model(x)
            p = (p if pick is None else pick(p)).float()
            n = x.shape[0]
            acc[:n_t] += _moments(p, t, half)
            acc[n_t, :2] += torch.stack([torch.tensor(float(n), dtype=torch.float64, device=acc.device),
                                         loss_fn(p, t).double() * n])
            seen += n
            if limit is not None and seen >= limit:
                break
    model.train()
    acc = all_reduce(acc).cpu().tolist()
    n, loss = acc[n_t][:2]
    if n == 0:
        return dict(NAN_METRICS)
    rows = [_centre_metrics(a, s) for a, s in zip(acc[:n_t], np.atleast_1d(target_scale), strict=True)]
    out = {"val_loss": loss / n, "val_rmse": _mean([r["val_rmse"] for r in rows]),
           "val_r": _mean([r["val_r"] for r in rows]), "val_patches": int(n)}
    for stain, r in zip(stains, rows, strict=True):
        out.update({f"val_rmse_{stain}": r["val_rmse"], f"val_r_{stain}": r["val_r"]})
    return out


def _mean(values: list[float]) -> float:
    """The mean over the stains that had validation patches (NaN if none had)."""
    ok = [v for v in values if math.isfinite(v)]
    return float(np.mean(ok)) if ok else float("nan")


def _moments(p: torch.Tensor, t: torch.Tensor, half: int) -> torch.Tensor:
    """[T, 6] sums of one batch at the patch centres, per stain over the samples that have it."""
    pc, tc = p[..., half, half].double(), t[..., half, half].double()
    ok = ~torch.isnan(tc)
    pc, tc = torch.where(ok, pc, 0.0), torch.where(ok, tc, 0.0)
    return torch.stack([ok.double().sum(0), pc.sum(0), tc.sum(0), (pc * pc).sum(0), (tc * tc).sum(0),
                        (pc * tc).sum(0)], 1)


def _centre_metrics(acc: list[float], target_scale: float) -> dict:
    n, sp, st, spp, stt, spt = acc
    if n == 0:
        return {"val_rmse": float("nan"), "val_r": float("nan")}
    mse = max((spp - 2 * spt + stt) / n, 0.0)
    cov = spt / n - sp * st / n**2
    var_p, var_t = spp / n - (sp / n) ** 2, stt / n - (st / n) ** 2
    r = cov / math.sqrt(var_p * var_t) if var_p > 0 and var_t > 0 else float("nan")
    return {"val_rmse": math.sqrt(mse) * float(target_scale), "val_r": r}


def output_picker(model_stains: list[str], store_stains: list[str]):
    """The network's outputs the patch store has targets for, in the store's order (a
    finetuned network may keep heads of stains the store lacks: they are not trained)."""
    if model_stains == store_stains:
        return lambda y: y
    idx = [model_stains.index(t) for t in store_stains]
    return lambda y: y[:, idx]


def resolve_device(device, local_rank: int) -> torch.device:
    if device is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MRHError(f"--device {device}: CUDA is not available on this machine")
    return dev


def progress(total, desc, quiet):
    if quiet:
        return None
    return log_progress(total=total, desc=desc, unit="batch", leave=False)


@contextlib.contextmanager
def run_folder(out_dir: str):
    """The run folder, held by this run: anything but a training run is refused untouched,
    and a second run on the same folder is refused while this one lives (rank 0 holds it)."""
    folder = Folder(out_dir, "mrhscale-run")
    folder.check()
    if dist_env()[0] != 0:
        yield folder
        return
    with folder.claim():
        yield folder


@dataclass
class Runtime:
    """How a run uses this machine (not part of what it learns): device, threads, loaders..."""

    device: str | None = None
    loader_workers: int = 0  # DataLoader processes per training process
    threads: int | None = None
    quiet: bool = False
    dist_timeout: float | None = None
    storage_options: dict | None = None
    keep_checkpoints: bool = False
    precision: str | None = None  # auto | fp32 | bf16 (None: $MRHSCALE_PRECISION, else auto)
    compile: str | bool | None = None  # auto | on | off (None: $MRHSCALE_COMPILE, else auto)
    cache: str = RunOptions.cache  # auto | on | off: hold the patches resident on the device (training/cache.py)

    def context(self) -> Context:
        """Where the run's data lives (its patch store's storage options), as a Context."""
        return Context(storage_options=self.storage_options, quiet=self.quiet)

    def timeout_s(self) -> float:
        """Seconds a rank waits for the others (--dist-timeout, $MRHSCALE_DIST_TIMEOUT, 1800)."""
        return self.dist_timeout or float(os.environ.get("MRHSCALE_DIST_TIMEOUT", "1800"))

    def validate(self) -> None:
        if self.loader_workers < 0:
            raise MRHError(f"--loader-workers {self.loader_workers}: must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise MRHError(f"--threads {self.threads}: must be >= 1")
        if self.cache not in CACHE_MODES:
            raise MRHError(f"--cache {self.cache!r}: must be {', '.join(CACHE_MODES)}")




class Trainer:
    """One training run in this process (one rank under torchrun): build, restore, the
    epochs, the bundle. ``build_model`` makes the (seeded) network; ``stream_norm`` the
    normalisation the batches are given in (None: the patch store's); ``bundle_norm``
    the one saved with the model."""

    def __init__(self, cfg: TrainConfig, out_dir: str, runtime: Runtime, *, store: dict, build_model,
                 stream_norm, bundle_norm, extra_provenance: dict | None = None, stains: list[str] | None = None):
        self.cfg, self.out_dir, self.rt, self.store = cfg, os.fspath(out_dir), runtime, store
        self.stains = stains or stains_of(store)  # the network's, in its order (finetune may add some)
        self.pick = output_picker(self.stains, stains_of(store))
        self.build_model, self.stream_norm, self.bundle_norm = build_model, stream_norm, bundle_norm
        self.extra_provenance = extra_provenance or {}
        self.ckpt_dir = os.path.join(self.out_dir, "checkpoints")
        self.ckpt_path = os.path.join(self.ckpt_dir, CHECKPOINT)
        self.folder = Folder(self.out_dir, "mrhscale-run")
        self.stop = StopFlag()

    def run(self, resume: bool) -> TrainResult:
        self._setup_process()
        started = init_distributed(self.world, self.local_rank, self.dist_timeout)
        try:
            self._build(resume)
            self.stop.install()
            self.net.train()
            for epoch in range(self.start_epoch, self.cfg.epochs):
                self._epoch(epoch)
            return self._finish()
        finally:
            self.stop.restore()
            if started:
                dist.destroy_process_group()

    # ---- set-up
    def _setup_process(self) -> None:
        self.rt.validate()
        self.rank, self.world, self.local_rank = dist_env()
        self.main = self.rank == 0
        if self.cfg.batch_size % self.world:
            raise MRHError(f"--batch-size {self.cfg.batch_size} (global) is not divisible by the "
                           f"{self.world} processes; choose a multiple of {self.world}")
        self.dist_timeout = self.rt.timeout_s()
        self.dev = resolve_device(self.rt.device, self.local_rank)
        if self.rt.threads:
            torch.set_num_threads(self.rt.threads)
        self.step_delay = float(os.environ.get("MRHSCALE_DEBUG_STEP_DELAY", "0") or 0)
        self.fail_after = int(os.environ.get("MRHSCALE_DEBUG_KILL_AFTER_EPOCH", "0") or 0)
        # test hooks: act as if SIGTERM came after the run's k-th step (counted from its first
        # epoch); append what every step trained on to a folder (tests of the data order)
        self.stop_after = int(os.environ.get("MRHSCALE_DEBUG_STOP_AFTER_STEP", "0") or 0)
        self.sample_log = os.environ.get("MRHSCALE_DEBUG_SAMPLE_LOG") or None

    def _build(self, resume: bool) -> None:
        cfg = self.cfg
        seed_all(cfg.seed)
        self.model = self.build_model().to(self.dev)
        self.opt = make_optimizer(cfg, self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.start_epoch, self.start_step, self.history, self.partial_loss = 0, 0, [], 0.0
        if resume:
            self._restore()
        elif self.main:
            self.folder.mark(kind=cfg.kind, patch_store=store_identity(self.store))
            write_text(os.path.join(self.out_dir, "config.json"),
                       json.dumps({**asdict(cfg), "world_size": self.world}, indent=1))
        self.net = self.model if self.world == 1 else nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.dev.index] if self.dev.type == "cuda" else None,
            gradient_as_bucket_view=True)
        self._open_data()
        self.augment = Augment(parse_augment(cfg.augment), cfg.seed, self.rank, self.world)
        self.accel = self._numerics(resume)
        if self.accel.compile:
            self.net = self._compiled_net()
        self.check_every = STOP_CHECK_EVERY_CUDA if self.dev.type == "cuda" else 1

    def _restore(self) -> None:
        ck = load_checkpoint(self.ckpt_path)
        check_resume_store(ck, self.store, self.cfg.patches, self.out_dir)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.start_epoch, self.start_step = int(ck["epoch"]), int(ck["step"])
        self.history = list(ck["history"])
        self.ckpt_numerics = ck.get("numerics")
        self.partial_loss = partial_loss(ck) if self.main else 0.0
        set_rng_state(ck["rng"])
        was = int(ck.get("world_size", self.world))
        if was != self.world and self.main:  # the data order is the same (stream.py)
            note(f"resuming a run of {was} process(es) with {self.world}: the same global batches from "
                 "here on; the weights differ from an uninterrupted run's by float rounding only "
                 "(gradients summed in another order)", self.rt.quiet)

    def _open_data(self) -> None:
        cfg, rt = self.cfg, self.rt
        self.half = int(self.store["patch"]["half"])
        self.loss_fn = loss_function(cfg.loss, self.half)  # validation, probes: this rank's batches alone
        self.train_loss = loss_function(cfg.loss, self.half, global_count=True)
        self.scale_loss = scale_loss_function(global_count=True)  # --aleatoric's head
        self.per_rank = cfg.batch_size // self.world
        shard = {"rank": self.rank, "world": self.world, "norm": self.stream_norm}
        self.train_data = open_data(cfg, rt, "train", self.per_rank, self.dev, workers=rt.loader_workers, **shard)
        self.val_data = None
        if int(self.store.get("n_val", 1)) > 0:
            self.val_data = open_data(cfg, rt, "val", max(self.per_rank, 256), self.dev, **shard)
        self.data_record = {name: d.cache.record() for name, d in (("train", self.train_data),
                                                                   ("val", self.val_data))
                            if d is not None and d.cache is not None}
        if self.main and self.data_record.get("train", {}).get("resident"):
            note(f"patches resident on {self.dev} ({self.data_record['train']['reason']})", self.rt.quiet)

    def amp_ctx(self):
        return self.accel.autocast(self.dev.type)

    def _numerics(self, resume: bool):
        """The precision and compilation this run uses (training.accel): a resumed run
        keeps its checkpoint's unless asked otherwise; else the only, cached or measured fastest."""
        req = numerics_request(self.rt.precision, self.rt.compile)
        kept = from_checkpoint(getattr(self, "ckpt_numerics", None), req) if resume else None
        if kept is not None:
            return kept
        shape = (self.per_rank, len(self.store["channels"]), 2 * self.half + 1, 2 * self.half + 1)
        return choose_numerics(req, self.dev, self.model, lambda m: make_optimizer(self.cfg, m), self.loss_fn,
                               shape, describe=(self.cfg.optimizer, self.cfg.loss, self.cfg.freeze_backbone),
                               rank=self.rank, quiet=self.rt.quiet)

    def _compiled_net(self):
        """The (DDP-wrapped, as torch documents) network compiled, tried on a zero batch
        (gradients cleared after); a failure falls back to eager, or is an error with --compile on."""
        net = compiled(self.net, inference=False)
        x = torch.zeros((self.per_rank, len(self.store["channels"]), 2 * self.half + 1, 2 * self.half + 1),
                        device=self.dev)
        try:
            with self.amp_ctx():
                y = net(x)
            y.float().sum().backward()
            failed = 0.0
        except Exception as e:  # inductor raises many kinds
            if numerics_request(self.rt.precision, self.rt.compile)[1] == "on":
                raise MRHError(f"--compile on: torch.compile failed ({one_line(e)})") from None
            logger.warning(f"mrhscale: torch.compile failed ({one_line(e)}); training eager")
            failed = 1.0
        self.opt.zero_grad(set_to_none=True)
        flag = all_reduce(torch.tensor([failed], device=self.dev), dist.ReduceOp.MAX if dist_on() else None)
        if flag.item() > 0:
            self.accel = self.accel.without_compile("eager: torch.compile failed")
            return self.net
        return net

    # ---- an epoch
    def _epoch(self, epoch: int) -> None:
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(cfg, epoch)
        steps = self._steps()
        first = self.start_step if epoch == self.start_epoch else 0
        t0 = time.perf_counter()
        done, loss_sum, interrupted = self._train_steps(epoch, first, steps)
        train_s = time.perf_counter() - t0
        total = all_reduce(loss_sum.clone()).item() / self.world + self.partial_loss  # sum of the steps' losses
        self.partial_loss = 0.0
        if interrupted:
            self.save_checkpoint(epoch, done, total if self.main else 0.0)
            barrier()
            raise TrainingInterrupted(
                f"stopped by SIGTERM at epoch {epoch + 1}, step {done}/{steps}; checkpoint "
                f"{self.ckpt_path}: rerun with --resume to continue", self.ckpt_path)
        row = self._epoch_row(epoch, steps, done - first, total, train_s, t0)
        self.history.append(row)
        if self.main:
            self.save_checkpoint(epoch + 1, 0, 0.0)
            write_metrics(self.out_dir, self.history)
            self._log(row)
        barrier()
        if self.fail_after and epoch + 1 == self.fail_after:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: a real crash after epoch k
        if self._stopping() and epoch + 1 < cfg.epochs:  # after the last epoch: just finish
            raise TrainingInterrupted(
                f"stopped by SIGTERM after epoch {epoch + 1}; checkpoint {self.ckpt_path}: "
                "rerun with --resume to continue", self.ckpt_path)

    def _steps(self) -> int:
        """Batches every rank runs this epoch: the same on all (or DDP hangs)."""
        steps_t = torch.tensor([self.train_data.stream.steps_per_epoch()], dtype=torch.int64, device=self.dev)
        steps = int(all_reduce(steps_t, dist.ReduceOp.MIN if dist_on() else None).item())
        if steps < 1:
            raise MRHError(f"{self.cfg.patches}: too few training patches for one batch of "
                           f"{self.per_rank} per process; lower --batch-size")
        return steps

    def _train_steps(self, epoch: int, first: int, steps: int):
        """The optimisation steps of an epoch: (steps done, loss sum, interrupted)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.dev)
        bar = progress(steps, f"epoch {epoch + 1}/{self.cfg.epochs}", self.rt.quiet or not self.main)
        if bar is not None and first:
            bar.update(first)
        it = self.train_data.batches(epoch, first)  # mid-epoch resume: from the first batch not done
        done, interrupted = first, False
        try:
            for step in range(first, steps):
                self._step(it, epoch, step, steps, loss_sum)
                done = step + 1
                if bar is not None:
                    bar.update(1)
                if self.step_delay:
                    time.sleep(self.step_delay)
                if self.stop_after and epoch * steps + done == self.stop_after:
                    self.stop.stop = True
                if (done % self.check_every == 0 or done == steps) and self._check(epoch, done, steps, loss_sum):
                    interrupted = done < steps
                    if interrupted:
                        break
        finally:
            it.close()
            if bar is not None:
                bar.close()
        return done, loss_sum, interrupted

    def _step(self, it, epoch: int, step: int, steps: int, loss_sum) -> None:
        try:
            x, t = next(it)
        except StopIteration:
            raise RuntimeError(f"rank {self.rank}: the patch stream ended after {step} of "
                               f"{steps} batches (equal-steps contract broken)") from None
        if self.sample_log:
            log_samples(self.sample_log, epoch, step, self.rank, self.world, x)
        if self.augment:
            x, t = self.augment(x, t, epoch, step)
        with self.amp_ctx():
            out = self.net(x, with_scale=True) if self.cfg.aleatoric else self.net(x)
        pred = self.pick(out[:, : self.model.n_stains])
        loss = self.train_loss(pred, t)
        nll = self.scale_loss(pred.detach(), self.pick(out[:, self.model.n_stains:]), t) if self.cfg.aleatoric else 0
        (loss + nll).backward()
        clip_per_tensor_(self.trainable, self.cfg.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss_sum += loss.detach()

    def _check(self, epoch: int, done: int, steps: int, loss_sum) -> bool:
        """All ranks agree: stop on SIGTERM (True), or fail on a non-finite loss."""
        flag = torch.stack([torch.tensor(1.0 if self.stop.stop else 0.0, device=self.dev),
                            (~torch.isfinite(loss_sum)).float()])
        stopping, diverged = all_reduce(flag, dist.ReduceOp.MAX if dist_on() else None).tolist()
        if diverged:
            raise diverged_error(epoch, done, steps, self.ckpt_path, self.cfg)
        return stopping > 0

    def _stopping(self) -> bool:
        flag = torch.tensor([1.0 if self.stop.stop else 0.0], device=self.dev)
        return all_reduce(flag, dist.ReduceOp.MAX if dist_on() else None).item() > 0

    def _epoch_row(self, epoch, steps, steps_done, total, train_s, t0) -> dict:
        store_stains = stains_of(self.store)
        scales = self.bundle_norm.target_arrays(np.float64)[1][[self.stains.index(t) for t in store_stains]]
        vm = (validate(self.model, self.val_data, self.loss_fn, self.half, scales, self.amp_ctx,
                       store_stains, self._val_limit(epoch), self.pick)
              if self.val_data is not None else dict(NAN_METRICS))
        n_patches = steps_done * self.cfg.batch_size
        return {"epoch": epoch + 1, "lr": self.cfg.lr * lr_factor(self.cfg, epoch),
                "train_loss": total / steps, **vm, "steps": steps,
                "train_patches": n_patches,
                "train_patches_per_s": n_patches / train_s if train_s > 0 else float("nan"),
                "epoch_s": time.perf_counter() - t0}

    def _val_limit(self, epoch: int) -> int | None:
        """Patches per rank to validate on: the recipe's subset, but all on the last epoch
        (the run's reported numbers are always on the whole val split)."""
        if self.cfg.val_patches is None or epoch + 1 >= self.cfg.epochs:
            return None
        return -(-self.cfg.val_patches // self.world)

    def _log(self, row: dict) -> None:
        note(f"epoch {row['epoch']:3d}/{self.cfg.epochs}  lr {row['lr']:.2e}  "
             f"train {row['train_loss']:.4g}  val {row['val_loss']:.4g}  "
             f"rmse {row['val_rmse']:.4g}  r {row['val_r']:.3f}  "
             f"{row['train_patches_per_s']:.0f} patches/s", self.rt.quiet)

    def save_checkpoint(self, epoch: int, step: int, loss_sum: float) -> None:
        if not self.main:
            return
        cfg = self.cfg
        state = {
            "format": "mrhscale-checkpoint", "config": asdict(cfg), "epoch": epoch, "step": step,
            "partial_loss": loss_sum, "history": self.history, "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "schedule": {"name": cfg.schedule, "epoch": epoch,
                         "lr_factor": lr_factor(cfg, min(epoch, cfg.epochs - 1))},
            "rng": rng_state(), "world_size": self.world, "workers": self.rt.loader_workers,
            "numerics": self.accel.record(),
            "patch_store": store_identity(self.store),
        }
        atomic_write(self.ckpt_path, lambda tmp: torch.save(state, tmp))
        if self.rt.keep_checkpoints and step == 0:
            atomic_write(os.path.join(self.ckpt_dir, f"epoch-{epoch:04d}.pt"),
                         lambda tmp: torch.save(state, tmp))

    # ---- the end
    def _finish(self) -> TrainResult:
        drift = replica_max_abs_diff(self.model)
        h = self.history
        summary = {"epochs": self.cfg.epochs, "final": h[-1] if h else {},
                   "best_val_loss": min((r["val_loss"] for r in h if math.isfinite(r["val_loss"])),
                                        default=float("nan")),
                   "world_size": self.world, "replica_max_abs_diff": drift}
        model_path = os.path.join(self.out_dir, "model.pt")
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise diverged_error(self.cfg.epochs - 1, 0, 0, self.ckpt_path, self.cfg)
        if self.main:
            self._save_bundle(model_path, summary, drift)
            write_metrics(self.out_dir, h, summary)
            training_curve(self.out_dir, h, f"{self.cfg.kind}: {self.store['target']} "
                                            f"(depth {self.model.depth})")
        barrier()
        return TrainResult(out_dir=self.out_dir, model=model_path, checkpoint=self.ckpt_path, history=h,
                           config=asdict(self.cfg), **summary)

    def _save_bundle(self, model_path: str, summary: dict, drift: float) -> None:
        cfg, store = self.cfg, self.store
        prov = {
            "stage": cfg.kind, "mrhscale_version": __version__, "torch_version": torch.__version__,
            "config": asdict(cfg), "patches": cfg.patches,
            "patch_store": {k: store.get(k) for k in ("n_train", "n_val", "subjects", "val_subjects",
                                                       "seed", "rules", "provenance")},
            "world_size": self.world, "device": self.dev.type, "numerics": self.accel.record(),
            "data_cache": self.data_record, "final_metrics": summary["final"],
            "replica_max_abs_diff": drift,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), **self.extra_provenance,
        }
        save_bundle(model_path, self.model, channels=list(store["channels"]), norm=self.bundle_norm,
                    patch=dict(store["patch"]),
                    provenance=json.loads(json.dumps(prov, default=str)),
                    ood=training_input_distance(cfg, self.rt, store, self.stream_norm, self.dev))


def log_samples(folder: str, epoch: int, step: int, rank: int, world: int, x: torch.Tensor) -> None:
    """One line per step and rank: a digest of each patch trained on (its normalised
    bits name it), so tests compare the sample history of runs of any world size."""
    import hashlib

    rows = x.detach().cpu().contiguous().numpy()
    digests = [hashlib.blake2b(r.tobytes(), digest_size=8).hexdigest() for r in rows]
    line = json.dumps({"epoch": epoch, "step": step, "rank": rank, "world": world, "rows": digests})
    with open(os.path.join(folder, f"rank{rank}.jsonl"), "a") as f:
        f.write(line + "\n")


def partial_loss(ck: dict) -> float:
    """A checkpoint's sum of the interrupted epoch's step losses (each the global batch's);
    older checkpoints summed every rank's (``partial_loss_sum``)."""
    if "partial_loss" in ck:
        return float(ck["partial_loss"])
    return float(ck.get("partial_loss_sum", 0.0)) / int(ck.get("world_size", 1))


def diverged_error(epoch: int, step: int, steps: int, ckpt_path: str, cfg: TrainConfig) -> MRHError:
    where = f"epoch {epoch + 1}, step {step}/{steps}" if steps else f"after epoch {epoch + 1}"
    kept = (f"the last good checkpoint ({ckpt_path}) is kept" if os.path.exists(ckpt_path)
            else "no checkpoint was written")
    return MRHError(f"training diverged: the loss became non-finite at {where} (lr {cfg.lr:g}); "
                    f"no model was saved and {kept}; lower --lr or --clip, check the inputs for "
                    "extreme values, and start again with another --out")
