"""`make gpu-check`'s script, run on the CPU on tiny shapes: the same code path as on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

from ablate.ablations import Ablation
from ablate.cost import gpu_check_rates
from conftest import REPO


def test_gpu_check_runs_and_proves_the_sweep_exact_in_bf16(tmp_path):
    out = tmp_path / "gpu_check.json"
    # 8 documents: half get an option generated greedily with a KV cache, which a full bf16
    # forward need not find greedy (with 4, none stayed greedy under today's packages).
    command = [sys.executable, "-m", "ablate.gpu_check", "--device", "cpu", "--tiny",
               "--documents", "8", "--kernels", "sdpa", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dtype"] == "bfloat16" and set(report["shapes"]) == {"llama31_8b", "qwen3_8b"}
    for shape in report["shapes"].values():
        for task in shape["kernels"]["sdpa"].values():
            assert task["exact"] and task["greedy_options_of_base"] > 0
            # Power: skipping a layer moves log-likelihoods far beyond the bf16 tolerance.
            skips = [e for u, e in task["unit_effects_per_token"].items()
                     if Ablation.parse(u).kind == "layer"]  # fmt: skip
            assert min(skips) > 0.1
            assert task["prefill_tokens_per_s"] > 0 and task["sweep_over_per_unit_forwards"] > 0
    assert set(report["rates"]) == {"cpu/hf/prefill"}
    assert gpu_check_rates(out) == {}  # a tiny shape calibrates nothing


def test_gpu_check_refuses_without_a_gpu_in_one_line(tmp_path):
    command = [sys.executable, "-m", "ablate.gpu_check", "--out", str(tmp_path / "x.json")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "gpu_check: no CUDA device here (--device cpu runs the same code on the CPU)"
    )
