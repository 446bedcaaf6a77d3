"""Precision and compilation: the network in bf16 on the machine's matrix units, compiled by
``torch.compile``, where the device does that well; eager fp32 (the reference) otherwise.

``request`` parses a ``Numerics`` once at the boundary; ``plan`` is what a job on a
device runs, an ``Acceleration``. ``resolve`` turns a request (``auto|fp32|bf16`` and ``auto|on|off``, or the
``MRHSCALE_PRECISION`` / ``MRHSCALE_COMPILE`` defaults) into the ``Acceleration`` a
device gets; ``InferenceModel`` applies it to inference (static batch, frozen weights,
warmed up once at load) and ``training.accel`` to training. What cannot compile falls
back to eager with one log line, and outputs record the mode actually used
(``Acceleration.record``). See docs/precision.md for what ``auto`` chooses and its cost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import os
import shutil
import threading

import torch

from mrhscale.errors import MRHError
from mrhscale.options import COMPILE_MODES, PRECISIONS, Numerics

ENV_PRECISION, ENV_COMPILE = "MRHSCALE_PRECISION", "MRHSCALE_COMPILE"
AUTO_COMPILE_MIN_PATCHES = 300_000
logger = logging.getLogger("mrhscale")
_COMPILE_LOCK = threading.Lock()  # dynamo compiles one graph at a time per process


@dataclasses.dataclass(frozen=True)
class Acceleration:
    """The numerics a run uses: ``precision`` fp32 or bf16 (autocast: weights, loss and
    optimiser state stay fp32), ``compile`` by torch.compile or eager; ``why`` says how
    ``auto`` decided or why it fell back."""

    precision: str = "fp32"
    compile: bool = False
    why: str = ""

    @property
    def eager_fp32(self) -> bool:
        return self.precision == "fp32" and not self.compile

    @property
    def label(self) -> str:
        return f"{self.precision} {'compiled' if self.compile else 'eager'}"

    def record(self) -> dict:
        return {"precision": self.precision, "compile": self.compile, "why": self.why}

    def autocast(self, device_type: str):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=torch.bfloat16)

    def without_compile(self, why: str) -> Acceleration:
        return dataclasses.replace(self, compile=False, why=why)


def requested(precision: str | None = None, compile: str | bool | None = None) -> tuple[str, str]:
    """The request: the arguments, else the environment's defaults, else ``auto``; checked."""
    if isinstance(compile, bool):
        compile = "on" if compile else "off"
    p = str(precision or os.environ.get(ENV_PRECISION) or "auto").lower()
    c = str(compile or os.environ.get(ENV_COMPILE) or "auto").lower()
    if p not in PRECISIONS:
        raise MRHError(f"--precision {p}: choose one of {', '.join(PRECISIONS)}")
    if c not in COMPILE_MODES:
        raise MRHError(f"--compile {c}: choose one of {', '.join(COMPILE_MODES)}")
    return p, c


def request(numerics: Numerics | None = None) -> Numerics:
    """The request parsed once, at the boundary: ``auto`` takes ``$MRHSCALE_PRECISION`` /
    ``$MRHSCALE_COMPILE`` where set, a bool compile is on/off; bad values are the user's error."""
    n = numerics or Numerics()
    p, c = requested(None if n.precision == "auto" else n.precision, None if n.compile == "auto" else n.compile)
    return Numerics(p, c)


def plan(numerics: Numerics, device, patches: int) -> Acceleration:
    """What a job of ``patches`` forward passes runs on ``device``: the parsed request resolved
    for the device's hardware, compiled only where a compile pays for itself."""
    return worth_compiling(resolve(numerics.precision, numerics.compile, device), numerics.compile, patches)


def resolve(precision: str | None = None, compile: str | bool | None = None, device="cpu") -> Acceleration:
    """What ``device`` gets for inference: ``auto`` is bf16 where it has bf16 matrix units
    and compiled where a working compiler is found. An explicit ``on`` without a
    compiler is an error; ``bf16`` without the units runs (emulated, slowly) with a warning."""
    p, c = requested(precision, compile)
    dev = torch.device(device)
    units = bf16_units(dev)
    missing = compiler_check(c, dev.type)
    if p == "bf16" and not units:
        logger.warning(f"mrhscale: --precision bf16 on {dev.type} without bf16 matrix units: "
                       "emulated, likely slower than fp32")
    use_bf16 = p == "bf16" or (p == "auto" and bool(units))
    use_compile = c == "on" or (c == "auto" and not missing)
    why = []
    if p == "auto":
        why.append(f"bf16: {units}" if units else f"fp32: no bf16 matrix units on this {dev.type}")
    if c == "auto":
        why.append(f"eager: {missing}" if missing else "compiled: compiler found")
    return Acceleration("bf16" if use_bf16 else "fp32", use_compile, "; ".join(why))


def worth_compiling(accel: Acceleration, compile_request: str, patches: int) -> Acceleration:
    """``--compile auto`` compiles an inference job only when it is large enough to pay for
    the compile (5-25 s per process): at least ``$MRHSCALE_COMPILE_MIN_PATCHES`` patches
    (default 300,000, about two mouse brains; docs/precision.md)."""
    least = int(os.environ.get("MRHSCALE_COMPILE_MIN_PATCHES") or AUTO_COMPILE_MIN_PATCHES)
    if compile_request != "auto" or not accel.compile or patches >= least:
        return accel
    why = accel.why.replace("compiled: compiler found", f"eager: {patches} patches, under the {least} "
                            "a compile pays for")
    return dataclasses.replace(accel, compile=False, why=why)


def bf16_units(device: torch.device) -> str | None:
    """A name for the device's native bf16 matrix units, or None."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(device)
        return f"bf16 tensor cores (sm_{major}{minor})" if major >= 8 else None
    if device.type == "cpu":
        return cpu_bf16_units()
    return None


@functools.lru_cache(maxsize=1)
def cpu_bf16_units() -> str | None:
    """``amx_bf16`` or ``avx512_bf16`` when this CPU computes bf16 natively and torch's
    oneDNN can use it (Linux /proc/cpuinfo flags), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return None
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return None
    return next((u for u in ("amx_bf16", "avx512_bf16") if u in flags), None)


def compiler_check(compile: str, device_type: str) -> str | None:
    """Why the request cannot compile here (None: it may, or ``off``); an explicit ``on``
    without a compiler is the user's error."""
    missing = compiler_missing(device_type) if compile != "off" else None
    if compile == "on" and missing:
        raise MRHError(f"--compile on: {missing}; use --compile auto or off")
    return missing


def compiler_missing(device_type: str) -> str | None:
    """Why torch.compile cannot work here (None: it may): a C++ compiler for CPU code
    (inductor's ``CXX``), Triton for CUDA. Cheap on purpose (no dynamo import, ~2.5 s):
    anything else that breaks a compile is caught by the warm-up, which falls back."""

    if device_type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed for this GPU"
    cxx = os.environ.get("CXX")
    found = shutil.which(cxx) if cxx else next(filter(None, map(shutil.which, ("g++", "c++", "clang++"))), None)
    return None if found else f"no C++ compiler ({'CXX=' + cxx if cxx else 'g++/c++/clang++'} not found)"


def cache_dir() -> str:
    """mrhscale's machine-local cache: ``$MRHSCALE_CACHE_DIR``, else ``~/.cache/mrhscale``."""
    return os.environ.get("MRHSCALE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mrhscale")


def compile_cache_dir() -> str:
    """Where torch.compile keeps its on-disk caches: ``TORCHINDUCTOR_CACHE_DIR`` if set,
    else ``<cache_dir>/torch-compile``, set for this process and the workers it starts,
    so a second run or worker reuses the compiled kernels."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_dir(), "torch-compile")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def compiled(module: torch.nn.Module, *, inference: bool) -> torch.nn.Module:
    """``torch.compile`` with static shapes; inference also freezes the weights into
    the graph (constant folding, oneDNN weight prepacking on CPU)."""
    compile_cache_dir()
    return torch.compile(module, dynamic=False, options={"freezing": True} if inference else None)


class InferenceModel:
    """The network as inference runs it. Eager fp32 calls the module exactly as before;
    other modes autocast and/or call the compiled module on batches padded to
    ``batch_size`` (one static shape: it never recompiles mid-run). Outputs are fp32.
    ``ood``: the bundle's out-of-distribution score (``nn.ood``), run eager in fp32 beside it."""

    ood: torch.nn.Module | None = None

    def __init__(self, model: torch.nn.Module, accel: Acceleration, device, batch_size: int,
                 example: tuple[int, int] | None = None):
        self.model, self.accel = model.eval(), accel
        self.device, self.batch_size = torch.device(device), int(batch_size)
        self.example = example  # (channels, patch size) of the warm-up batch
        self._fn = compiled(model, inference=True) if accel.compile else model
        self._warm = not accel.compile

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.accel.eager_fp32:
            return self.model(x)
        n = x.shape[0]
        if self.accel.compile and n != self.batch_size:
            if n > self.batch_size:
                return torch.cat([self(x[a : a + self.batch_size]) for a in range(0, n, self.batch_size)])
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        with self.accel.autocast(self.device.type):
            y = self._fn(x)
        return y[:n].float()

    def warm_up(self, strict: bool = False) -> InferenceModel:
        """Compile now (once), on a dummy batch, not in the first real task; a compile
        failure falls back to eager with one log line, or raises with ``strict`` (``--compile on``)."""
        with _COMPILE_LOCK:
            if self._warm:
                return self
            channels, size = self.example or (self.model.in_channels, 3)
            dummy = torch.zeros((self.batch_size, channels, size, size), device=self.device)
            try:
                with torch.inference_mode():
                    self(dummy)
            except Exception as e:  # inductor raises many kinds (compiler, codegen, backend)
                if strict:
                    raise MRHError(f"--compile on: torch.compile failed ({one_line(e)})") from None
                self.fall_back(f"eager: torch.compile failed ({one_line(e)})")
            self._warm = True
        return self

    def fall_back(self, why: str) -> None:
        logger.warning(f"mrhscale: {why}; running eager")
        self.accel, self._fn = self.accel.without_compile(why), self.model


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
