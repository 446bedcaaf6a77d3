"""Precision and compilation (mrhscale.nn.accel): what auto resolves to, fall-backs, and the
compiled bf16 network against eager fp32."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from mrhscale.errors import MRHError
from mrhscale.nn import accel as A
from mrhscale.nn.model import MRHNet


def small_net(seed=0):
    torch.manual_seed(seed)
    return MRHNet(5, depth=1, width=16).eval()


def test_request_from_arguments_then_environment_then_auto(monkeypatch):
    monkeypatch.delenv(A.ENV_PRECISION, raising=False)
    monkeypatch.delenv(A.ENV_COMPILE, raising=False)
    assert A.requested() == ("auto", "auto")
    monkeypatch.setenv(A.ENV_PRECISION, "BF16")
    monkeypatch.setenv(A.ENV_COMPILE, "off")
    assert A.requested() == ("bf16", "off")
    assert A.requested("fp32", True) == ("fp32", "on")
    with pytest.raises(MRHError, match="--precision fp16: choose one of auto, fp32, bf16"):
        A.requested("fp16")
    with pytest.raises(MRHError, match="--compile yes"):
        A.requested(None, "yes")


def test_auto_follows_the_hardware_and_the_compiler(monkeypatch):
    monkeypatch.setattr(A, "cpu_bf16_units", lambda: "avx512_bf16")
    monkeypatch.setattr(A, "compiler_missing", lambda kind: None)
    a = A.resolve("auto", "auto", "cpu")
    assert (a.precision, a.compile) == ("bf16", True) and "avx512_bf16" in a.why
    monkeypatch.setattr(A, "cpu_bf16_units", lambda: None)
    monkeypatch.setattr(A, "compiler_missing", lambda kind: "no C++ compiler (g++/c++/clang++ not found)")
    a = A.resolve("auto", "auto", "cpu")
    assert a.eager_fp32 and "no bf16 matrix units" in a.why and "no C++ compiler" in a.why
    with pytest.raises(MRHError, match="--compile on: no C\\+\\+ compiler"):
        A.resolve("auto", "on", "cpu")
    assert A.resolve("fp32", "off", "cpu").record() == {"precision": "fp32", "compile": False, "why": ""}


def test_a_missing_compiler_is_found_by_the_check(monkeypatch):
    import torch._inductor.config  # noqa: F401 (it reads CXX once, at import: not the fake one)

    monkeypatch.setenv("CXX", "/nonexistent/g++")
    assert "CXX=/nonexistent/g++ not found" in A.compiler_missing("cpu")
    monkeypatch.delenv("CXX")
    assert A.compiler_missing("cpu") is None  # g++ is on this machine and on CI's


def test_cpu_bf16_units_are_read_from_the_cpu_flags():
    flags = open("/proc/cpuinfo").read()
    want = "amx_bf16" if "amx_bf16" in flags else ("avx512_bf16" if "avx512_bf16" in flags else None)
    assert A.cpu_bf16_units() == want


def test_eager_fp32_is_the_module_itself():
    net = small_net()
    x = torch.randn(37, 5, 3, 3)
    run = A.InferenceModel(net, A.Acceleration(), "cpu", 16).warm_up()
    with torch.inference_mode():
        assert torch.equal(run(x), net(x))


def test_compiled_bf16_matches_fp32_and_pads_to_one_shape():
    net = small_net()
    run = A.InferenceModel(net, A.Acceleration("bf16", True), "cpu", 64, example=(5, 3)).warm_up(strict=True)
    assert run.accel.compile  # compiled on this machine (a compiler is there)
    x = torch.randn(150, 5, 3, 3)  # two full batches and a padded one
    with torch.inference_mode():
        ref, got, one = net(x), run(x), run(x[:7])
    assert got.dtype == torch.float32 and got.shape == ref.shape and one.shape == (7, 1, 3, 3)
    r = np.corrcoef(ref.flatten().numpy(), got.flatten().numpy())[0, 1]
    assert r >= 0.9999
    assert torch.allclose(one, got[:7], atol=1e-6)  # a padded batch gives the same numbers
    assert float((ref - got).abs().max()) <= 0.02 * float(ref.max() - ref.min())


def test_a_failing_compile_falls_back_with_one_line(monkeypatch, caplog):
    def broken(module, inference):
        def fn(x):
            raise RuntimeError("inductor: C++ compile failed\nlong compiler output")
        return fn

    monkeypatch.setattr(A, "compiled", broken)
    net = small_net()
    run = A.InferenceModel(net, A.Acceleration("fp32", True), "cpu", 8, example=(5, 3))
    with caplog.at_level(logging.WARNING, logger="mrhscale"):
        run.warm_up()
    assert not run.accel.compile and "torch.compile failed (RuntimeError: inductor" in run.accel.why
    assert len([r for r in caplog.records if "running eager" in r.getMessage()]) == 1
    x = torch.randn(5, 5, 3, 3)
    with torch.inference_mode():
        assert torch.equal(run(x), net(x))
    strict = A.InferenceModel(net, A.Acceleration("fp32", True), "cpu", 8, example=(5, 3))
    with pytest.raises(MRHError, match="--compile on: torch.compile failed"):
        strict.warm_up(strict=True)


def test_a_numerics_request_is_parsed_once_and_planned_per_job(monkeypatch):
    from mrhscale.options import Numerics

    monkeypatch.setenv(A.ENV_PRECISION, "bf16")
    monkeypatch.delenv(A.ENV_COMPILE, raising=False)
    assert A.request() == Numerics("bf16", "auto")  # the environment overrides auto
    assert A.request(Numerics("fp32", True)) == Numerics("fp32", "on")
    with pytest.raises(MRHError, match="--compile maybe"):
        A.request(Numerics(compile="maybe"))
    monkeypatch.setattr(A, "cpu_bf16_units", lambda: None)
    monkeypatch.setattr(A, "compiler_missing", lambda kind: None)
    small, large = (A.plan(Numerics("fp32", "auto"), "cpu", n) for n in (10, 10**6))
    assert not small.compile and "under the 300000" in small.why and large.compile
