"""The HF backend: transformers with lm-eval's ``HFLM``, ablations as reversible hooks.

The model is loaded once per job and wrapped once in ``HFLM``; each ablation is applied as a hook
or weight swap around the unit's evaluation and removed afterwards. For log-likelihood chunks,
:class:`ablate.sweep.PrefixSweep` answers lm-eval's requests instead: each context runs once for
its options, the unablated layers below each unit once for all units (a one-unit chunk, such as
a baseline, shares contexts only), and every finished batch is kept in a progress file beside the
request caches, so a resubmitted chunk computes only what a kill cut off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

from ablate.ablations import Ablation, ablated, load_source_tensors
from ablate.anatomy import Anatomy
from ablate.backends import scores_given_text
from ablate.job import Job
from ablate.models import load_model
from ablate.proof import check_units
from ablate.sweep import PrefixSweep
from ablate.unit_loop import BudgetTracking, Progress, evaluate_units

log = logging.getLogger(__name__)
PROOF_LOG = "invariants proven on the loaded model for"  # make bench reads its cost from it


def budget_flags(
    generated: torch.Tensor, eos_id: int | None, decode, stop: list[str]
) -> list[bool]:
    """Per row of ``generated`` (new tokens only): it stopped for lack of budget (no EOS, no
    stop sequence)."""
    return [
        not (eos_id in row or any(s and s in decode(row) for s in stop))
        for row in generated.tolist()
    ]


def locked_environment() -> dict[str, str]:
    """The lock file this environment was installed from (``make setup``, envs/eval.yaml), by
    digest, for the provenance: every package's version, not only those it names."""
    lock = Path(__file__).resolve().parents[3] / "requirements.lock"
    if not lock.exists():
        return {}
    return {"requirements.lock": hashlib.sha256(lock.read_bytes()).hexdigest()[:16]}


def window_key(context: list[int], continuation: list[int]) -> tuple[str, str]:
    """A rolling log-likelihood window's key in the sweep's answers, as a request's strings."""
    return "rolling window", f"{context}{continuation}"


class AblationLM(BudgetTracking, HFLM):
    """lm-eval's HFLM that counts generations which used their whole ``max_gen_toks`` and, given
    a :class:`PrefixSweep` (``prefix_sweep``), takes its log-likelihoods from it.

    Budget hits are counted on the raw generation, before lm-eval strips a reasoning trace or a
    stop sequence, so a trace cut off mid-thought is seen as cut off.
    """

    prefix_sweep: PrefixSweep | None = None

    def loglikelihood(self, requests, disable_tqdm=False):
        # No progress bar (its \r updates garble a log): the job's Progress reports.
        if self.prefix_sweep is None:
            return super().loglikelihood(requests, disable_tqdm=True)
        # Tokenize and score only what no earlier unit of this job has computed.
        missing = self.prefix_sweep.missing([r.args for r in requests])
        if missing:
            super().loglikelihood([r for r in requests if r.args in missing], True)
        answers = self.prefix_sweep.answers([r.args for r in requests])
        for request, answer in zip(requests, answers, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, answer)  # request cache
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        if self.prefix_sweep is None:
            return super()._loglikelihood_tokens(requests, True, override_bs)
        # A rolling window has no request key (lm-eval passes None): its tokens are its key.
        keyed = [(key or window_key(context, continuation), context, continuation)
                 for key, context, continuation in requests]  # fmt: skip
        missing = self.prefix_sweep.missing([key for key, _, _ in keyed])
        self.prefix_sweep.compute([request for request in keyed if request[0] in missing])
        return self.prefix_sweep.answers([key for key, _, _ in keyed])

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        output = super()._model_generate(context, max_length, stop, **generation_kwargs)
        generated = output[:, context.shape[1] :]
        self.record_budget_hits(budget_flags(generated, self.eot_token_id, self.tok_decode, stop))
        return output


def build_lm(model, tokenizer, task: dict[str, Any], progress: Progress) -> AblationLM:
    return AblationLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=task.get("batch_size", 16),
        enable_thinking=task.get("enable_thinking"),
        think_end_token=task.get("think_end_token"),
        max_length=task.get("max_length"),
        progress=progress,
    )


@dataclass
class WholeModelUnits:
    """Each unit applied to the whole model (hooks, weight swaps) around its lm-eval run."""

    model: Any
    source: dict[str, torch.Tensor] | None
    anatomy: Anatomy

    @contextlib.contextmanager
    def applied(self, ablation: Ablation) -> Iterator[None]:
        with ablated(self.model, ablation, self.source, self.anatomy):
            yield

    def close(self) -> None:
        pass


@dataclass
class SweptUnits:
    """Every unit of the job answered by one :class:`PrefixSweep`, which the model's
    log-likelihood requests go to: whatever the first unit's lm-eval run asks, the sweep
    computes for every later unit too (each ablation on its own branch above the shared
    prefix), so a unit's run only selects its answers."""

    lm: AblationLM
    sweep: PrefixSweep

    def __post_init__(self) -> None:
        self.lm.prefix_sweep = self.sweep

    @contextlib.contextmanager
    def applied(self, ablation: Ablation) -> Iterator[None]:
        self.sweep.current = ablation
        yield
        self.sweep.finish(ablation)

    def close(self) -> None:
        """Every unit's request cache now holds all its answers: the progress file goes."""
        self.sweep.close(remove=True)


def evaluate(job: Job, ablations: list[tuple[Ablation, Path]]) -> None:
    """Evaluate ``job`` once per (ablation, output folder), with one model load and task build."""
    model, tokenizer = load_model(job.model_dir, job.model)
    anatomy = Anatomy.of(model)
    progress = Progress([a.id for a, _ in ablations])
    lm = build_lm(model, tokenizer, job.task, progress)
    source = None
    if any(a.replaced_layers for a, _ in ablations):  # moved next to what they replace, once
        tensors = load_source_tensors(job.source_dir, anatomy, [a for a, _ in ablations])
        source = {key: tensor.to(model.get_parameter(key)) for key, tensor in tensors.items()}
    units: WholeModelUnits | SweptUnits = WholeModelUnits(model, source, anatomy)
    ordered = [a for a, _ in ablations]
    # Each unit's invariants on the loaded model, before anything is scored (ablate.proof).
    start = time.perf_counter()
    sweep_off = check_units(model, ordered, source)
    log.info("%s %d units in %.2f s", PROOF_LOG, len(ordered), time.perf_counter() - start)
    if job.prefix_reuse and sweep_off is not None:
        log.info("prefix_reuse off for %s: %s; lm-eval's HFLM scores every unit",
                 job.model_dir, sweep_off)  # fmt: skip
    if job.prefix_reuse and sweep_off is None and scores_given_text(job.task["protocol"]):
        sweep = PrefixSweep(
            model, ordered, source, lm.batch_size, lm.max_length, lm.softmax_dtype,
            progress_path=job.sweep_progress(ordered, lm.batch_size, lm.max_length),
            on_progress=progress.step,
        )  # fmt: skip
        units = SweptUnits(lm, sweep)
    evaluate_units(lm, job, ablations, units.applied, lambda: (model, tokenizer), progress,
                   packages=locked_environment())  # fmt: skip
    units.close()
