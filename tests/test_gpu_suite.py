"""`make test-gpu`'s CPU mode: the whole GPU suite at tiny sizes, so that it cannot rot between GPU loans."""

import importlib.util
import json
from pathlib import Path

import pytest

from egrpo.methods import METHODS
from egrpo.rollout import ODE_SOLVERS

ROOT = Path(__file__).resolve().parents[1]


def test_every_check_of_the_gpu_suite_passes_at_tiny_sizes_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    out = tmp_path / "suite.json"
    # inductor's CPU compile takes minutes here; tests/test_regional_compile.py runs it (slow) and the rest of compile
    code = suite.main(["--tiny", "--device", "cpu", "--out", str(out), "--work", str(tmp_path / "work"),
                       "--skip", "/compile"])
    report = json.loads(out.read_text())
    failed = [(c["check"], c.get("error")) for c in report["checks"] if c["status"] != "ok"]
    assert code == 0 and not failed, failed
    checks = {c["check"]: c for c in report["checks"]}
    for kind in ("flux", "sd3"):
        assert {f"{kind}/{m}" for m in METHODS} | {f"{kind}/egrpo-fast/{s}" for s in ODE_SOLVERS} <= set(checks)
        assert f"{kind}/lora" in checks
    assert {"qwen-image/egrpo", "qwen-image/egrpo-fast", "qwen-image/lora"} <= set(checks)
    assert {"torchrun/ddp", "torchrun/fsdp", "cli/eval+sample+figures-completion", "reward/served-clip",
            "reward/hps-fp16", "wan/full", "wan/lora"} <= set(checks)
    assert checks["torchrun/fsdp"]["iterations"] == 2 and checks["torchrun/fsdp"]["tensors_compared"] > 0
    # On the CPU every run repeats itself, with or without train.deterministic, and training did move the weights.
    for variant in ("deterministic", "default"):
        exactness = checks["resume/exactness"][variant]
        assert exactness["two_runs_max_diff"] == exactness["resume_max_diff"] == 0.0
        assert exactness["trained_max_change"] > 0


def test_a_machine_without_cuda_is_told_how_to_run_the_cpu_mode(capsys):
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    assert suite.main(["--out", "unused.json"]) == 2
    assert "--tiny --device cpu" in capsys.readouterr().err


@pytest.mark.slow
def test_the_gpu_suites_compile_checks_pass_at_tiny_sizes_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    out = tmp_path / "suite.json"
    assert suite.main(["--tiny", "--device", "cpu", "--out", str(out), "--only", "/compile"]) == 0
    checks = json.loads(out.read_text())["checks"]
    assert [c["check"] for c in checks] == ["flux/compile", "sd3/compile", "qwen-image/compile", "wan/compile"]
    assert all(c["status"] == "ok" and c["compile_seconds"] > 0 for c in checks), checks
