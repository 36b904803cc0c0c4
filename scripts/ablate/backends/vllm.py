"""The vLLM backend: generate-until evaluations with one engine per job, ablations as weight edits.

    python -m ablate.backends.vllm SPEC.json   (written and run by :func:`ablate.backends.run`)

vLLM runs the model in its own worker process and with its own kernels, so forward hooks cannot
reach it; each ablation is applied as its exact weight-edit form (``ablate.ablations.weight_edits``)
through vLLM's in-place weight reload, inside the running engine:

1. the worker reads the original tensors from the checkpoint (on CPU, vLLM repacks every linear
   weight into a oneDNN handle and leaves ``.weight`` empty, so an in-place ``weight.zero_()`` is a
   silent no-op), computes the edited ones and reloads them;
2. the worker runs every edited module on a fixed probe input and the job fails unless the output
   matches the edited weight, and differs from the unedited output where the edit changes it:
   baseline numbers are never written under an ablation's name;
3. the prefix cache is reset (its KV blocks are keyed by tokens, not weights);
4. a canary prompt runs through the engine's whole forward (CUDA graphs and compiled kernels
   included, which the per-module probe does not reach): its log-probabilities must move from the
   unablated model's, or a graph captured before the edit is still computing the old weights;
5. after the evaluation the original tensors are reloaded, checked the same way, the cache reset,
   and the canary must give the unablated model's log-probabilities again.

This module runs in the vLLM environment (``evaluation.vllm.python``), a separate interpreter: vLLM
pins its own transformers. Worker-side functions are module-level so the engine can pickle them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Iterator
from math import inf
from pathlib import Path
from typing import Any

import torch

from ablate.ablations import (
    Ablation,
    WeightEdit,
    check_weight_edits_exact,
    checkpoint_keys,
    load_tensors,
    weight_edits,
)
from ablate.anatomy import Anatomy, anatomy_from_config
from ablate.backends import read_spec, tensor_parallel
from ablate.job import Job
from ablate.models import load_model
from ablate.rule import job_logging
from ablate.unit_loop import Progress, evaluate_units

# Relative error of a probed module against the weight it should hold, by dtype (float noise of
# one matmul; a missed edit is off by O(1)).
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}
RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.inplace",
    "vllm.model_executor.model_loader.reload.layerwise",
)
# Environment every vLLM job needs: edits travel to the worker as pickled functions.
ENGINE_ENV = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


# Run through the whole engine before and after every edit (numbers and words: many tokens).
CANARY = (
    "At 06:45 on 12 March 1907, 31 canaries sang in the mine; by noon only 4 of them were left."
)


class EditNotApplied(RuntimeError):
    """A weight edit did not reach the kernels vLLM runs."""


# ---------------------------------------------------------------- worker side (inside the engine)


def _probe_error(module: torch.nn.Module, weight: torch.Tensor) -> float:
    """Relative error of ``module`` against ``weight`` on a fixed random input, through the
    kernel vLLM's forward calls (``quant_method.apply``).
    Under tensor parallelism each worker checks its own input-column shard of ``weight``."""
    rank, size = getattr(module, "tp_rank", 0), getattr(module, "tp_size", 1)
    width = weight.shape[1] // size
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    shard = weight[:, rank * width : (rank + 1) * width].to(device)
    probe = torch.randn(4, width, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=device, dtype=weight.dtype)
    with torch.inference_mode():
        output = module.quant_method.apply(module, probe, None)
    expected = probe @ shard.T
    return float((output - expected).abs().max() / expected.abs().max().clamp(min=1.0))


def edit_tensors(
    edits: list[WeightEdit], model_dir: str, source_dir: str | None, dtype: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(original, edited) tensors by checkpoint key, read from the checkpoints in ``dtype``."""
    runtime = getattr(torch, dtype)
    originals = {
        key: tensor.to(runtime)
        for key, tensor in load_tensors(Path(model_dir), [e.key for e in edits]).items()
    }
    wanted = [e.key for e in edits if e.from_source]
    sources = load_tensors(Path(source_dir), wanted) if wanted else {}
    return originals, {e.key: e.apply(originals[e.key], sources.get(e.key)) for e in edits}


def _stored_error(parameter: torch.Tensor, weight: torch.Tensor) -> float:
    """Relative error of a parameter vLLM computes with as stored (a norm's scale) against
    ``weight``."""
    got = parameter.detach().to(device="cpu", dtype=torch.float32)
    want = weight.to(torch.float32)
    return float((got - want).abs().max() / want.abs().max().clamp(min=1.0))


def engine_tensors(model: torch.nn.Module, keys: list[str]) -> dict[str, list[str]]:
    """vLLM's parameter each checkpoint key loads into, with the keys it holds in order: vLLM
    fuses q/k/v and gate/up projections into one module (its ``packed_modules_mapping``)."""
    fused = getattr(model, "packed_modules_mapping", None) or {}
    modules = {name for name, _ in model.named_modules()}
    held: dict[str, list[str]] = {}
    for key in keys:
        module, _, parameter = key.rpartition(".")
        parent, _, name = module.rpartition(".")
        packed = next((p for p, parts in fused.items() if name in parts), None)
        if packed is None or module in modules:
            held[key] = [key]
        else:
            parts = fused[packed]
            held[f"{parent}.{packed}.{parameter}"] = [f"{parent}.{p}.{parameter}" for p in parts]
    return held


def probe_report(
    model: torch.nn.Module,
    edits: list[WeightEdit],
    intended: dict[str, torch.Tensor],
    other: dict[str, torch.Tensor],
) -> dict[str, tuple[float, float]]:
    """Per edited vLLM module (a fused one whole): (error against the ``intended`` weight,
    error against the ``other`` one; inf where the two are equal). Linear weights are probed
    through the kernel vLLM's forward calls; other weights (norms) are compared as stored."""
    report = {}
    for name, keys in engine_tensors(model, [e.key for e in edits]).items():
        if missing := [key for key in keys if key not in intended]:
            raise ValueError(
                f"{name} fuses {', '.join(keys)}, and the edit leaves {', '.join(missing)} "
                "out: its check needs them all (use backend: hf)"
            )
        want, alternative = (torch.cat([tensors[k] for k in keys]) for tensors in (intended, other))
        module_name, _, parameter = name.rpartition(".")
        module = model.get_submodule(module_name)
        if parameter == "weight" and hasattr(module, "quant_method"):  # may be repacked
            error = functools.partial(_probe_error, module)
        else:
            error = functools.partial(_stored_error, module.get_parameter(parameter))
        same = torch.equal(want, alternative)
        report[module_name] = (error(want), inf if same else error(alternative))
    return report


def load_edits(
    worker,
    edits: list[WeightEdit],
    model_dir: str,
    source_dir: str | None,
    dtype: str,
    restore: bool,
) -> dict[str, tuple[float, float]]:
    """Reload the edited tensors (``restore``: the originals) in place through vLLM's weight
    reload, then probe each module (:func:`probe_report`; the driver checks the report)."""
    originals, edited = edit_tensors(edits, model_dir, source_dir, dtype)
    intended, other = (originals, edited) if restore else (edited, originals)
    for name in RELOAD_LOGGERS:  # a partial reload warns about every module it leaves as is
        logging.getLogger(name).setLevel(logging.ERROR)
    worker.reload_weights(weights_iterator=list(intended.items()), is_checkpoint_format=True)
    return probe_report(worker.model_runner.get_model(), edits, intended, other)


# ---------------------------------------------------------------- driver side


def check_report(report: dict[str, tuple[float, float]], dtype: str, what: str) -> None:
    """Raise :class:`EditNotApplied` unless every module computes with its intended weight."""
    tolerance = PROBE_TOLERANCE[getattr(torch, dtype)]
    for module, (error, other_error) in report.items():
        if error > tolerance or other_error <= error:
            raise EditNotApplied(
                f"{what}: {module} still computes with the wrong weight (relative error "
                f"{error:.2g} against the intended weight, {other_error:.2g} against the other; "
                f"tolerance {tolerance}): this vLLM version did not reload it in place"
            )


def canary(llm, prompt_ids: list[int]) -> list[float]:
    """The engine's log-probability of each canary token after the first, one-token request."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    [output] = llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)
    return [
        entry[token].logprob
        for entry, token in zip(output.prompt_logprobs[1:], prompt_ids[1:], strict=True)
    ]


def check_canary(got: list[float], base: list[float], dtype: str, what: str, edited: bool) -> None:
    """Raise :class:`EditNotApplied` if an edited engine still gives the unablated model's
    canary log-probabilities bit for bit, or a restored one does not give them back."""
    moved = max(abs(a - b) for a, b in zip(got, base, strict=True))
    if edited and moved == 0.0:
        raise EditNotApplied(
            f"{what}: the engine gives the unablated model's log-probabilities on the canary "
            "prompt bit for bit: its compiled forward did not see the edit (a CUDA graph "
            "captured before it?); set evaluation.vllm.engine_args.enforce_eager: true"
        )
    if not edited and moved > PROBE_TOLERANCE[getattr(torch, dtype)]:
        raise EditNotApplied(
            f"{what}: the canary's log-probabilities moved {moved:.2g} from the unablated "
            "model's: the original weights did not come back"
        )


def check_engine_edits(ablation: Ablation, anatomy: Anatomy, checkpoint: set[str]) -> None:
    """Refuse (one line) an ablation whose exact weight edits vLLM cannot load and probe: each
    must be a weight (of a linear or norm module) stored under its name in the checkpoint (no
    biases, no experts fused in memory but stored one by one)."""
    for edit in check_weight_edits_exact(ablation, anatomy, checkpoint):
        if not edit.key.endswith(".weight"):
            change = "replaced" if edit.from_source else "zeroed"
            raise ValueError(
                f"{ablation.id}: the vllm backend edits weights only, and "
                f"{anatomy.model_type} needs {edit.key} {change} too (use backend: hf)"
            )


@contextlib.contextmanager
def engine_edited(
    llm, job, ablation: Ablation, anatomy: Anatomy, canary_ids: list[int], base: list[float]
) -> Iterator[None]:
    """Apply ``ablation`` inside the running engine for the duration of the block; ``base``:
    the unablated engine's log-probabilities of the ``canary_ids`` prompt."""
    edits = weight_edits(ablation, anatomy)
    if not edits:
        yield
        return
    dtype = job.model.get("dtype", "float32")
    load = functools.partial(
        load_edits,
        edits=edits,
        model_dir=str(job.model_dir),
        source_dir=str(job.source_dir) if job.source_dir else None,
        dtype=dtype,
    )
    try:
        for report in llm.collective_rpc(functools.partial(load, restore=False)):
            check_report(report, dtype, ablation.id)
        llm.reset_prefix_cache()
        check_canary(canary(llm, canary_ids), base, dtype, ablation.id, edited=True)
        llm.reset_prefix_cache()
        yield
    finally:
        what = f"restoring after {ablation.id}"
        for report in llm.collective_rpc(functools.partial(load, restore=True)):
            check_report(report, dtype, what)
        llm.reset_prefix_cache()
        check_canary(canary(llm, canary_ids), base, dtype, what, edited=False)
        llm.reset_prefix_cache()


def build_lm(job, progress: Progress) -> Any:
    """lm-eval's ``VLLM`` model on the job's checkpoint and engine settings."""
    from ablate.backends.vllm_lm import AblationVLLM

    task, model = job.task, job.model
    engine = dict(job.backend_options.get("engine_args") or {})
    engine["tensor_parallel_size"] = tensor_parallel(model, job.backend_options)
    if task.get("max_length"):  # the task's context cap, as HFLM's max_length on hf
        engine["max_model_len"] = task["max_length"]
    return AblationVLLM(
        pretrained=str(job.model_dir),
        dtype=model.get("dtype", "float32"),
        batch_size="auto",  # vLLM schedules the whole request list itself
        seed=job.seed,
        enable_thinking=task.get("enable_thinking"),
        think_end_token=task.get("think_end_token"),
        progress=progress,
        **engine,
    )


def evaluate(job: Job, ablations: list[tuple[Ablation, Path]]) -> None:
    """Evaluate ``job`` once per (ablation, output folder) inside one engine."""
    from transformers import AutoConfig

    anatomy = anatomy_from_config(AutoConfig.from_pretrained(job.model_dir))
    keys = checkpoint_keys(job.model_dir)
    for ablation, _ in ablations:  # before the engine starts
        check_engine_edits(ablation, anatomy, keys)
    progress = Progress([a.id for a, _ in ablations])
    lm = build_lm(job, progress)
    from ablate.backends.vllm_lm import VERSION

    canary_ids = lm.tokenizer(CANARY).input_ids
    base = canary(lm.model, canary_ids)

    def unablated_hf_model():
        lm.model.llm_engine.engine_core.shutdown()  # free the engine's memory first
        return load_model(job.model_dir, job.model)

    evaluate_units(
        lm,
        job,
        ablations,
        lambda a: engine_edited(lm.model, job, a, anatomy, canary_ids, base),
        unablated_hf_model,
        progress,
        packages={"vllm": VERSION},
    )


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m ablate.backends.vllm SPEC.json")
    os.environ.update(ENGINE_ENV)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # tail -f the log
    job_logging(sys.stderr)
    evaluate(*read_spec(sys.argv[1]))


if __name__ == "__main__":  # vLLM's engine processes re-import the main module
    main()
