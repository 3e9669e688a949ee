"""tests/gpu_check.py, the check run by hand on a GPU machine, can fail: it refuses to run without
CUDA (unless --device cpu) and exits non-zero when the resumed stage differs from the
uninterrupted one in any bit."""

import json
import os
import subprocess
import sys

import pytest
import torch

import gpu_check
from helpers import REPO

GPU_CHECK = REPO / "tests" / "gpu_check.py"


def test_gpu_check_refuses_to_run_without_cuda_and_names_the_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU visible, also on a machine that has one
    result = subprocess.run([sys.executable, str(GPU_CHECK), str(out)], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "CUDA is not available" in result.stderr and "--device cpu" in result.stderr, result.stderr
    assert not out.exists()  # refused before doing anything


def flip_lowest_bit(tensor, index=0):
    """A copy of float32 `tensor` whose element `index` differs in the lowest bit of its mantissa."""
    copy = tensor.clone()
    copy.view(-1).view(torch.int32)[index] ^= 1
    return copy


@pytest.fixture
def stage_model(tmp_path):
    """A stage model file as train_stage writes it (the weights under "model") and its weights."""
    torch.manual_seed(0)
    weights = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).state_dict()
    path = tmp_path / "uninterrupted.pt"
    torch.save({"model": weights, "epoch": 4}, path)
    return path, weights


def test_gpu_check_passes_when_the_resumed_model_is_bitwise_equal(stage_model, tmp_path):
    path, weights = stage_model
    torch.save({"model": {k: v.clone() for k, v in weights.items()}, "epoch": 4}, tmp_path / "resumed.pt")
    assert gpu_check.check_resume(path, tmp_path / "resumed.pt", stops=3, expected_stops=3) == []


def test_gpu_check_fails_on_one_bit_of_one_tensor_and_names_it(stage_model, tmp_path):
    path, weights = stage_model
    resumed = dict(weights, **{"1.bias": flip_lowest_bit(weights["1.bias"], 1)})
    assert not torch.equal(resumed["1.bias"], weights["1.bias"])
    assert torch.allclose(resumed["1.bias"], weights["1.bias"], rtol=1e-6, atol=0)  # closer than any tolerance
    torch.save({"model": resumed, "epoch": 4}, tmp_path / "resumed.pt")
    problems = gpu_check.check_resume(path, tmp_path / "resumed.pt", stops=3, expected_stops=3)
    assert len(problems) == 1 and "1.bias: 1 of 2 values differ" in problems[0], problems
    assert "0.weight" not in problems[0]


def test_gpu_check_fails_when_a_tensor_is_missing_or_the_resume_was_not_exercised(stage_model, tmp_path):
    path, weights = stage_model
    torch.save({"model": {k: v for k, v in weights.items() if k != "0.bias"}}, tmp_path / "resumed.pt")
    problems = gpu_check.check_resume(path, tmp_path / "resumed.pt", stops=0, expected_stops=3)
    assert len(problems) == 2, problems
    assert "stopped 0 times, expected 3" in problems[0]
    assert "0.bias: only in the uninterrupted model" in problems[1]


def test_gpu_check_exits_1_with_the_problems_after_printing_the_report(capsys):
    with pytest.raises(SystemExit) as failed:
        gpu_check.finish({"device": "NVIDIA H200", "resume_stops": 3}, ["0.bias: 1 of 4 values differ"])
    assert failed.value.code == "gpu_check: FAILED on NVIDIA H200:\n0.bias: 1 of 4 values differ"  # printed, exit 1
    assert '"resume_stops": 3' in capsys.readouterr().out
    gpu_check.finish({"device": "NVIDIA H200"}, [])  # no problems: returns, exit 0
    assert "passed on NVIDIA H200" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu_stops_and_resumes_stage_0_and_passes(tmp_path):
    """The whole check with `--device cpu` (about 40 s): what runs on the GPU, so that it does not rot
    between the runs by hand, with 2 ranks on gloo. On the CPU each resumed stage equals its uninterrupted
    one bit for bit."""
    result = subprocess.run([sys.executable, str(GPU_CHECK), str(tmp_path / "out"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report, _ = json.JSONDecoder().raw_decode(result.stdout[result.stdout.index("{"):])
    assert report["device"] == "cpu"
    assert report["resume_stops"] == gpu_check.STAGE_0_EPOCHS - 1 and report["resumed_equals_uninterrupted"]
    assert report["ranks"] == 2 and report["ranks_resume_stops"] == gpu_check.STAGE_0_EPOCHS - 1
    assert report["ranks_resumed_equals_uninterrupted"]
    assert set(report["metrics"]["pp_ks_pvalue"]) == {"f0", "tau", "snr"}
    assert "gpu_check: passed on cpu" in result.stdout
