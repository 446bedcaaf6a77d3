"""Training numerics: which of eager/compiled and fp32/bf16 a run uses, measured not guessed.

On a GPU with bf16 tensor cores ``auto`` is bf16 compiled. On a CPU the fastest training
mode depends on the chip: bf16 forward passes win wherever there are bf16 units, but
the backward pass of small convolutions can be slower in bf16 than fp32 (see
docs/precision.md). So where ``auto`` leaves more than one candidate, a short probe
times a few steps of each on a copy of the model, picks the fastest (eager fp32 unless
another is >= 5% faster) and caches the choice per machine and shape, so a second run
does not measure again. Under torchrun rank 0's choice is every rank's. Loss,
gradients, optimiser state, checkpoints and bundles stay fp32.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist

from mrhscale.nn.accel import (
    Acceleration,
    bf16_units,
    cache_dir,
    compiled,
    compiler_check,
    one_line,
)
from mrhscale.nn.accel import requested as requested_mode
from mrhscale.stores import write_json

logger = logging.getLogger("mrhscale")
PROBE_STEPS, PROBE_REPEATS, MIN_GAIN = 4, 3, 1.05


def candidates(precision: str, compile: str, dev: torch.device) -> list[Acceleration]:
    """The modes a request allows on ``dev``, eager fp32 first when allowed."""
    units, missing = bf16_units(dev), compiler_check(compile, dev.type)
    precs = {"fp32": ["fp32"], "bf16": ["bf16"], "auto": ["fp32", "bf16"] if units else ["fp32"]}[precision]
    comps = {"off": [False], "on": [True], "auto": [False, True] if not missing else [False]}[compile]
    if dev.type == "cuda" and units:  # tensor cores: no need to measure what is known
        precs = ["bf16"] if precision == "auto" else precs
        comps = [True] if compile == "auto" and not missing else comps
    return [Acceleration(p, c) for p in precs for c in comps]


def choose(request: tuple[str, str], dev: torch.device, model, make_optimizer, loss_fn, batch_shape,
           *, describe=(), rank: int = 0, quiet: bool = False) -> Acceleration:
    """The run's mode: the only candidate, else the cached or measured fastest.
    ``describe``: what else the timing depends on (optimiser, loss...), for the cache key."""
    options = candidates(*request, dev)
    if len(options) == 1:
        return Acceleration(options[0].precision, options[0].compile, "as requested or the only option")
    key = probe_key(dev, model, describe, batch_shape)
    best = _cached(key, options)
    if best is None:
        rates = {o: measure(o, dev, model, make_optimizer, loss_fn, batch_shape) for o in options}
        best = fastest(rates)
        if rank == 0:
            _store(key, best, rates)
    best = _agree(best, options)
    if rank == 0 and not quiet:
        logger.info(f"mrhscale: training numerics {best.label} ({best.why})")
    return best


def fastest(rates: dict[Acceleration, float]) -> Acceleration:
    """The fastest mode; eager fp32 (the reference numerics) unless beaten by MIN_GAIN."""
    shown = ", ".join(f"{o.label} {r:.0f}" for o, r in rates.items())
    best = max(rates, key=rates.get)
    ref = next((o for o in rates if o.eager_fp32), None)
    if ref is not None and rates[best] < MIN_GAIN * rates[ref]:
        best = ref
    return Acceleration(best.precision, best.compile, f"measured patches/s: {shown}")


def measure(mode: Acceleration, dev, model, make_optimizer, loss_fn, batch_shape) -> float:
    """Training patches/s of ``mode`` on a copy of the model (median of a few timings
    after the compile); a mode that fails to compile counts as 0."""
    net = copy.deepcopy(model).to(dev).train()
    opt = make_optimizer(net)
    fn = compiled(net, inference=False) if mode.compile else net
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_shape, generator=g).to(dev)
    t = torch.randn((batch_shape[0], model.n_stains, *batch_shape[2:]), generator=g).to(dev)

    def steps(n):
        for _ in range(n):
            with mode.autocast(dev.type):
                y = fn(x)
            loss_fn(y.float(), t).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    try:
        steps(2)
    except Exception as e:  # a compiler failure: not a candidate here
        logger.warning(f"mrhscale: {mode.label} training does not work here ({one_line(e)})")
        return 0.0
    times = []
    for _ in range(PROBE_REPEATS):
        t0 = time.perf_counter()
        steps(PROBE_STEPS)
        times.append(time.perf_counter() - t0)
    return PROBE_STEPS * batch_shape[0] / statistics.median(times)


def probe_key(dev, model, describe, batch_shape) -> str:
    """What the timing depends on: machine, software, threads, model, optimiser, shape."""
    what = [platform.processor() or platform.machine(), _cpu_model(), torch.__version__, dev.type,
            torch.get_num_threads(), os.environ.get("WORLD_SIZE", "1"), getattr(model, "config", None),
            list(describe), list(batch_shape)]
    if dev.type == "cuda":
        what.append(torch.cuda.get_device_name(dev))
    return hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()[:16]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return ""


def _cache_path() -> str:
    return os.path.join(cache_dir(), "training-modes.json")


def _cached(key: str, options: list[Acceleration]) -> Acceleration | None:
    """The fastest of ``options`` by the rates cached for ``key``; None where a mode of them was
    not measured (a ``--compile off`` run's probe does not answer an ``auto`` request)."""
    try:
        with open(_cache_path()) as f:
            rates = json.load(f)[key]["rates"]
        mine = {o: float(rates[o.label]) for o in options}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    best = fastest(mine)
    return Acceleration(best.precision, best.compile, f"cached: {best.why}")


def _store(key: str, best: Acceleration, rates: dict) -> None:
    """Add this choice to the cache file (atomically; a lost race only costs a re-measure)."""
    path = _cache_path()
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    table[key] = {**best.record(), "rates": {o.label: r for o, r in rates.items()},
                  "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, table)
    except OSError as e:
        logger.debug(f"mrhscale: could not cache the training mode ({e})")


def _agree(best: Acceleration, options: list[Acceleration]) -> Acceleration:
    """Under torchrun every rank takes rank 0's choice."""
    if not (dist.is_available() and dist.is_initialized()):
        return best
    idx = next(i for i, o in enumerate(options) if (o.precision, o.compile) == (best.precision, best.compile))
    t = torch.tensor([idx if dist.get_rank() == 0 else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, 0)
    chosen = options[int(t.item())]
    if (chosen.precision, chosen.compile) == (best.precision, best.compile):
        return best
    return Acceleration(chosen.precision, chosen.compile, "rank 0's choice")


def requested(precision: str | None, compile) -> tuple[str, str]:
    """The run's request (the Runtime's precision and compile, the only place training's
    numerics are asked for; ``$MRHSCALE_PRECISION``/``$MRHSCALE_COMPILE`` fill what is None)."""
    return requested_mode(precision, compile)


def from_checkpoint(record: dict | None, request: tuple[str, str]) -> Acceleration | None:
    """A resumed run keeps its checkpoint's numerics when the request leaves it open
    (``auto``), so a resume is exact; an explicit other request is honoured, with a warning."""
    if not record:
        return None
    old = Acceleration(record["precision"], bool(record["compile"]), "as the checkpointed run")
    p, c = request
    if p in ("auto", old.precision) and c in ("auto", "on" if old.compile else "off"):
        return old
    logger.warning(f"mrhscale: resuming a {old.label} run as requested ({p}, compile {c}): the numerics "
                   "from here on differ from the original run's")
    return None
