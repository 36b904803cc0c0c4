"""Evaluate one model under a sequence of ablations with lm-eval, loading the model once.

The model is wrapped once in lm-eval's ``HFLM`` and the task objects are built once; each
ablation is applied as a hook or weight swap around ``simple_evaluate`` and removed afterwards.
Jobs of ``backend: vllm`` tasks run in the vLLM environment instead (:mod:`ablate.vllm_backend`),
with the same per-unit loop and outputs.
For log-likelihood tasks with more than one ablation, :class:`ablate.sweep.PrefixSweep` answers
lm-eval's requests instead, sharing the unablated layers below each ablation. Results are written
atomically (temp file, then rename) so an interrupted job never leaves a file a later run would
trust.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ablate.ablations import Ablation, ablated, decoder_layers, load_o_proj_weights
from ablate.io import write_atomically
from ablate.metrics import acc_ce, mean_and_stderr
from ablate.proxy import layer_proxies, prompt_batches
from ablate.sweep import PrefixSweep

TASKS_DIR = Path(__file__).parent / "tasks"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Job:
    """Everything one evaluation needs, as plain data from the workflow config."""

    model_dir: Path
    model: dict[str, Any]  # config: models.<id>
    task: dict[str, Any]  # config: tasks.<id>
    data_dir: str
    seed: int = 1234
    source_dir: Path | None = None  # o_proj replacement source checkpoint
    cache_dir: Path | None = None  # lm-eval request caches, one per (model revision, ablation)
    prefix_reuse: bool = True  # log-likelihood chunks share the layers below each ablation
    backend: str = "hf"  # hf | vllm
    vllm: dict[str, Any] = dataclasses.field(default_factory=dict)  # config: evaluation.vllm

    def to_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> Job:
        paths = {"model_dir", "source_dir", "cache_dir"}
        return cls(**{k: Path(v) if k in paths and v else v for k, v in fields.items()})

    @property
    def model_revision(self) -> str | None:
        record = self.model_dir / "download.json"
        return json.loads(record.read_text()).get("commit") if record.exists() else None

    def request_cache(self, ablation: Ablation) -> str | None:
        """lm-eval ``use_cache`` prefix: a resubmitted job replays what it already computed."""
        if self.cache_dir is None:
            return None
        revision = re.sub(r"[^A-Za-z0-9_.=-]", "_", self.model_revision or "unknown")
        return str(self.cache_dir / revision / ablation.id)


def load_model(model_dir: Path, spec: dict[str, Any]):
    """Load a checkpoint with the dtype, device placement and attention kernel the config selects."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": DTYPES[spec.get("dtype", "float32")]}
    if spec.get("attn_implementation"):
        kwargs["attn_implementation"] = spec["attn_implementation"]  # e.g. flash_attention_2
    device = spec.get("device", "cpu")
    if device == "auto":
        kwargs["device_map"] = "auto"  # shard over every visible GPU
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    if device not in ("cpu", "auto"):
        model.to(device)
    return model, AutoTokenizer.from_pretrained(model_dir)


def budget_hits(generated: torch.Tensor, eos_id: int | None, decode, stop: list[str]) -> int:
    """Rows of ``generated`` (new tokens only) that stopped for lack of budget: no EOS, no stop."""
    hits = 0
    for row in generated.tolist():
        finished = eos_id in row or any(s and s in decode(row) for s in stop)
        hits += not finished
    return hits


def build_lm(model, tokenizer, task: dict[str, Any]):
    from lm_eval.models.huggingface import HFLM

    class AblationLM(HFLM):
        """HFLM that counts generations which used their whole ``max_gen_toks`` and can take its
        log-likelihoods from a :class:`PrefixSweep`.

        Budget hits are counted on the raw generation, before lm-eval strips a reasoning trace
        or a stop sequence, so a trace cut off mid-thought is seen as cut off.
        """

        hit_budget = 0
        prefix_sweep: PrefixSweep | None = None

        def loglikelihood(self, requests, disable_tqdm=False):
            if self.prefix_sweep is None:
                return super().loglikelihood(requests, disable_tqdm)
            # Tokenize and score only what no earlier unit of this job has computed.
            missing = self.prefix_sweep.missing([r.args for r in requests])
            if missing:
                super().loglikelihood([r for r in requests if r.args in missing], disable_tqdm)
            answers = self.prefix_sweep.answers([r.args for r in requests])
            for request, answer in zip(requests, answers, strict=True):
                self.cache_hook.add_partial("loglikelihood", request.args, answer)  # request cache
            return answers

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            if self.prefix_sweep is None:
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            self.prefix_sweep.compute(requests)
            return self.prefix_sweep.answers([request for request, _, _ in requests])

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            output = super()._model_generate(context, max_length, stop, **generation_kwargs)
            generated = output[:, context.shape[1] :]
            self.hit_budget += budget_hits(generated, self.eot_token_id, self.tok_decode, stop)
            return output

    return AblationLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=task.get("batch_size", 16),
        enable_thinking=task.get("enable_thinking"),
        think_end_token=task.get("think_end_token"),
        max_length=task.get("max_length"),
    )


def task_manager(task: dict[str, Any], data_dir: str):
    """Our task folder only for local tasks (indexing lm-eval's ~10k files costs seconds per job).

    ``metadata`` reaches every task's ``custom_dataset`` loader: it carries ``data_dir``.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=not task.get("local", True),
        metadata={"data_dir": data_dir},
    )


def amortize_lm_eval_overheads() -> None:
    """Pay two fixed costs of lm-eval once per process instead of once per document or call.

    lm-eval compiles a task's Jinja template for every document it renders (~1 ms each, seconds
    per evaluation), and every ``simple_evaluate`` collects environment info by spawning
    subprocesses (~0.6 s). Neither changes a score; a job evaluating many units pays them once.
    """
    import lm_eval.evaluator
    import lm_eval.utils

    compile_template = functools.lru_cache(maxsize=None)(lm_eval.utils.env.from_string)
    lm_eval.utils.apply_template = lambda template, doc: compile_template(template).render(**doc)
    collect_env_info, env_info = lm_eval.evaluator.add_env_info, {}

    def add_env_info(storage: dict) -> None:
        if not env_info:
            collect_env_info(env_info)
        storage.update(env_info)

    lm_eval.evaluator.add_env_info = add_env_info


def load_task(manager, name: str) -> list:
    """The task (or group of tasks) object, built once per job and re-evaluated per ablation."""
    loaded = manager.load([name])
    return [loaded["groups"].get(name) or loaded["tasks"][name]]


def run_lm_eval(lm, job: Job, manager, tasks: list, ablation: Ablation) -> dict[str, Any]:
    import lm_eval

    task = job.task
    cache = job.request_cache(ablation)
    if cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
    return lm_eval.simple_evaluate(
        model=lm,
        use_cache=cache,
        tasks=tasks,
        task_manager=manager,  # without one, lm-eval indexes its ~10k task files again
        num_fewshot=task.get("num_fewshot"),
        limit=task.get("limit"),
        gen_kwargs=task.get("gen_kwargs"),
        apply_chat_template=task.get("chat_template", False),
        fewshot_as_multiturn=task.get("chat_template", False),
        log_samples=True,
        bootstrap_iters=1000,  # mean metrics get lm-eval's closed-form stderr
        random_seed=job.seed,
        numpy_random_seed=job.seed,
        torch_random_seed=job.seed,
        fewshot_random_seed=job.seed,
    )


def add_sample_metrics(
    lm, output: dict[str, Any], task: dict[str, Any], lengths: dict[tuple[str, str], int]
) -> list[dict]:
    """Add acc_ce to every multiple-choice sample and its mean to the results.

    ``lengths`` memoizes, across the units of a job, how many tokens lm-eval scores for each
    (context, continuation) pair (its own encoding).
    """
    samples = [dict(s, task=name) for name, per_task in output["samples"].items() for s in per_task]
    results = output["results"][task["lm_eval_task"]]
    if task["protocol"] == "loglikelihood":
        for sample in samples:
            lls = [resp[0][0] for resp in sample["resps"]]
            for args in map(tuple, sample["arguments"]):
                if args not in lengths:
                    lengths[args] = len(lm._encode_pair(*args)[1])
            counts = [lengths[tuple(args)] for args in sample["arguments"]]
            sample["acc_ce"] = acc_ce(lls, counts, int(sample["target"]))
        mean, stderr = mean_and_stderr([s["acc_ce"] for s in samples])
        results["acc_ce,none"], results["acc_ce_stderr,none"] = mean, stderr
    return samples


def provenance(job: Job, ablation: Ablation, output: dict[str, Any]) -> dict[str, Any]:
    import lm_eval
    import transformers

    packages = {
        "lm_eval": lm_eval.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if job.backend == "vllm":
        import vllm

        packages["vllm"] = vllm.__version__
    return {
        "model": job.model.get("repo_id", "embedded"),
        "model_revision": job.model_revision,
        "ablation": ablation.id,
        "task": job.task["lm_eval_task"],
        "task_versions": output.get("versions", {}),
        "num_fewshot": job.task.get("num_fewshot"),
        "limit": job.task.get("limit"),
        "dtype": job.model.get("dtype", "float32"),
        "device": job.model.get("device", "cpu"),
        "seed": job.seed,
        "backend": job.backend,
        "packages": packages,
    }


SAMPLE_FIELDS = (
    "task",
    "doc_id",
    "filter",
    "target",
    "resps",
    "filtered_resps",
    "doc_hash",
    "prompt_hash",
)


def write_result(out_dir: Path, output: dict[str, Any], samples: list[dict], meta: dict) -> None:
    """Samples first, results.json last: results.json existing means the unit is complete."""
    lines = []
    for sample in samples:
        kept = {k: sample[k] for k in SAMPLE_FIELDS if k in sample}
        kept.update({m: sample[m] for m in sample["metrics"]})
        if "acc_ce" in sample:
            kept["acc_ce"] = sample["acc_ce"]
        lines.append(json.dumps(kept, default=str))
    write_atomically(out_dir / "samples.jsonl", "\n".join(lines) + "\n")
    record = {
        "results": output["results"],
        "n_samples": output.get("n-samples", {}),
        "configs": output.get("configs", {}),
        "provenance": meta,
    }
    write_atomically(out_dir / "results.json", json.dumps(record, indent=1, default=str))


def write_proxies(
    model, tokenizer, samples: list[dict], out_dir: Path, batch_size: int, max_length: int
) -> None:
    """Layer-importance proxies of the unablated HF ``model`` over the task's own prompts (each
    document's context, as lm-eval built it), beside the baseline's results."""
    contexts = list(dict.fromkeys(args[0] for s in samples for args in s["arguments"]))
    frame = layer_proxies(model, prompt_batches(tokenizer, contexts, batch_size, max_length))
    write_atomically(out_dir / "proxies.csv", frame.to_csv(index=False, float_format="%.6f"))


def evaluate_units(
    lm,
    job: Job,
    ablations: list[tuple[Ablation, Path]],
    applied: Callable[[Ablation], AbstractContextManager],
    unablated_hf_model: Callable[[], tuple[Any, Any]],
) -> None:
    """One lm-eval evaluation of ``lm`` per (ablation, output folder), inside ``applied(ablation)``;
    the baseline's folder also gets the layer proxies, after every unit, from the (model,
    tokenizer) ``unablated_hf_model()`` returns (proxies need hidden states; the vLLM backend
    frees its engine and loads one). Shared by both backends."""
    amortize_lm_eval_overheads()
    manager = task_manager(job.task, job.data_dir)
    tasks = load_task(manager, job.task["lm_eval_task"])
    lengths: dict[tuple[str, str], int] = {}
    baseline = None
    for ablation, out_dir in ablations:
        start = time.perf_counter()
        lm.hit_budget = 0
        with applied(ablation):
            output = run_lm_eval(lm, job, manager, tasks, ablation)
        samples = add_sample_metrics(lm, output, job.task, lengths)
        if job.task["protocol"] == "generate_until":
            output["results"][job.task["lm_eval_task"]]["hit_budget,none"] = lm.hit_budget
        meta = provenance(job, ablation, output)
        meta["eval_seconds"] = round(time.perf_counter() - start, 2)
        write_result(Path(out_dir), output, samples, meta)
        if ablation.kind == "base":
            baseline = samples, Path(out_dir)
    if baseline is not None:
        model, tokenizer = unablated_hf_model()
        batch_size = job.task.get("batch_size", 16)
        write_proxies(model, tokenizer, *baseline, batch_size, lm.max_length)


def evaluate(job: Job, ablations: Iterable[tuple[Ablation, Path]]) -> None:
    """Evaluate ``job`` once per (ablation, output folder), with one model load and task build."""
    ablations = list(ablations)
    if job.backend == "vllm":
        run_vllm_job(job, ablations)
        return
    model, tokenizer = load_model(job.model_dir, job.model)
    lm = build_lm(model, tokenizer, job.task)
    replaced = sorted({layer for a, _ in ablations for layer in a.replaced_layers})
    source = None
    if replaced:  # moved next to the weights they replace once, not on every swap
        targets = [layer.self_attn.o_proj.weight for layer in decoder_layers(model)]
        source = {
            index: weight.to(dtype=targets[index].dtype, device=targets[index].device)
            for index, weight in load_o_proj_weights(job.source_dir, replaced).items()
        }
    if job.prefix_reuse and job.task["protocol"] == "loglikelihood" and len(ablations) > 1:
        lm.prefix_sweep = PrefixSweep(
            model, [a for a, _ in ablations], source, lm.batch_size, lm.max_length, lm.softmax_dtype
        )

    @contextlib.contextmanager
    def applied(ablation: Ablation):
        if lm.prefix_sweep is None:
            with ablated(model, ablation, source):
                yield
            return
        lm.prefix_sweep.current = ablation  # the sweep applies each ablation to its own branch
        yield
        lm.prefix_sweep.finish(ablation)

    evaluate_units(lm, job, ablations, applied, lambda: (model, tokenizer))


def run_vllm_job(job: Job, ablations: list[tuple[Ablation, Path]]) -> None:
    """Run the job in the vLLM environment (``evaluation.vllm.python``; default: this interpreter),
    its output going to this process's log. The child needs its own ``__main__`` for vLLM's
    engine processes, and its own interpreter because vLLM pins its own transformers."""
    python = job.vllm.get("python") or sys.executable
    env = os.environ | {str(k): str(v) for k, v in (job.vllm.get("env") or {}).items()}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")])
    )
    spec = {"job": job.to_json(), "ablations": [(a.id, str(d)) for a, d in ablations]}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:
        json.dump(spec, handle)
        handle.flush()
        sys.stdout.flush()
        result = subprocess.run(
            [python, "-m", "ablate.vllm_backend", handle.name],
            env=env,
            stdout=sys.stdout,
            stderr=sys.stderr,
        )
    if result.returncode != 0:
        raise RuntimeError(f"vLLM job failed (exit {result.returncode}); see its output above")
