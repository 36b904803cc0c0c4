"""The transformers zoo: every model type of transformers' causal-LM mapping, built tiny from its
default config, is exact or refused in one line before any job. For each kind the proof accepts
(ablate.proof, on the same tiny twin a download proves), the hook form equals the ablation done
by hand here, and so does the shared-prefix sweep where the proof keeps it on; each kind it
refuses is refused with one line naming the model type and the kind. Encoders and
encoder-decoders are refused as not decoder-only.

The README's supported-models table is this test's findings (``python tests/test_zoo.py``
writes it)."""

from __future__ import annotations

import copy
import functools
import gc
import logging
import re
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from ablate.ablations import Ablation, ablated
from ablate.anatomy import Anatomy, UnsupportedModel
from ablate.proof import FORMS, UNIT_KINDS, Proof, Refused, prove, representative_layers, twins
from ablate.sweep import sweep_loglikelihoods

ZOO = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
REQUESTS = [((5, 17, 33, 8, 91, 12), (44, 7)), ((5, 17, 33, 8, 91, 12), (63,)),
            ((40, 3, 77, 19), (26, 51, 88))]  # fmt: skip
NO_DEFAULT = "transformers' default config for it does not validate"
PROMPT = torch.tensor([[5, 17, 33, 8, 91, 12, 44, 7, 63, 21, 38, 9]])


def not_decoder_only(config) -> bool:
    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return getattr(config, "is_encoder_decoder", False) or (
        encoder and not getattr(config, "is_decoder", False)
    )


@functools.cache
def proven(model_type: str):
    """(proof, twin, source twin), or the one-line refusal of the whole model."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        config = CONFIG_MAPPING[model_type]()
    except Exception as error:  # the library's own default does not validate
        return f"{model_type}: {NO_DEFAULT} ({' '.join(str(error).split())[:120]})"
    try:
        model, source, stored = twins(config)
        return prove(model, UNIT_KINDS, dict(source.named_parameters()), stored), model, source
    except UnsupportedModel as error:
        return str(error)
    finally:
        logging.disable(logging.NOTSET)
        gc.collect()


# ----------------------------------------------------------------- ablations done by hand


class StandIn(torch.nn.Module):
    """Wraps a module; the model still reads the wrapped module's settings through it (a
    block's attention type, say)."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("wrapped"), name)


class Skipped(StandIn):
    """Stands where a block was: its output (in the block's own structure) is its input."""

    def forward(self, *args, **kwargs):
        output = self.wrapped(*args, **kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class Zeroed(StandIn):
    """Stands where a sublayer was: its (first) output is 0."""

    def forward(self, *args, **kwargs):
        output = self.wrapped(*args, **kwargs)
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)


def _replace(owner, name: str, make) -> None:
    parent, _, leaf = name.rpartition(".")
    holder = owner.get_submodule(parent) if parent else owner
    setattr(holder, leaf, make(getattr(holder, leaf)))


def by_hand(model, source, anatomy: Anatomy, unit: Ablation):
    """A copy of ``model`` with ``unit`` done by hand."""
    edited = copy.deepcopy(model)
    blocks = anatomy.blocks(edited)
    if unit.kind in ("layer", "layer_set"):
        for layer in unit.skipped_layers:
            blocks[layer] = Skipped(blocks[layer])
    elif unit.kind in ("attn", "mlp"):
        name = anatomy.attention if unit.kind == "attn" else anatomy.mlp
        _replace(blocks[unit.layer], name, Zeroed)
    elif unit.kind in ("head", "kv_group"):
        out = blocks[unit.layer].get_submodule(anatomy.attention_out)
        conv1d = type(out).__name__ == "Conv1D"
        width = out.weight.shape[0 if conv1d else 1] // anatomy.arch.num_heads
        per = 1 if unit.kind == "head" else anatomy.arch.num_heads // anatomy.arch.num_kv_heads
        columns = slice(unit.head * per * width, (unit.head + 1) * per * width)
        with torch.no_grad():
            (out.weight[columns, :] if conv1d else out.weight[:, columns]).zero_()
    else:
        with torch.no_grad():
            for layer in unit.replaced_layers:
                mine, theirs = blocks[layer], anatomy.blocks(source)[layer]
                if unit.kind.startswith("layer_swap"):
                    blocks[layer] = copy.deepcopy(theirs)
                else:
                    out = anatomy.attention_out
                    mine.get_submodule(out).weight.copy_(theirs.get_submodule(out).weight)
    return edited


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT, use_cache=False).logits.float()


def loglikelihoods(model) -> list[float]:
    scores = []
    with torch.no_grad():
        for context, continuation in REQUESTS:
            tokens = torch.tensor([context + continuation])
            log_probs = F.log_softmax(
                model(input_ids=tokens, use_cache=False).logits[0, :-1].float(), -1
            )
            targets = tokens[0, len(context) :]
            scores.append(float(log_probs[len(context) - 1 :].gather(1, targets[:, None]).sum()))
    return scores


def units_of(kind: str, model, anatomy: Anatomy) -> list[Ablation]:
    layer = representative_layers(model, anatomy, anatomy.attention_layers)[-1]
    last = anatomy.arch.num_layers - 1
    return {
        "layer": [Ablation("layer", last)],
        "layer_set": [Ablation("layer_set", layers=tuple(sorted({0, last})))],
        "attn": [Ablation("attn", layer)],
        "mlp": [Ablation("mlp", layer)],
        "head": [Ablation("head", layer, anatomy.arch.num_heads - 1)],
        "kv_group": [Ablation("kv_group", layer, anatomy.arch.num_kv_heads - 1)],
    }.get(kind, [Ablation(kind, layer, source="twin")])


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("model_type", ZOO)
def test_every_kind_is_exact_or_refused_in_one_line(model_type):
    found = proven(model_type)
    if isinstance(found, str) and NO_DEFAULT in found:
        pytest.skip(found)
    if isinstance(found, str):
        assert "\n" not in found and re.match(r"[\w-]+( \(\w+\))?: \S", found), found
        if not_decoder_only(CONFIG_MAPPING[model_type]()):
            assert "not decoder-only" in found or "decoder blocks" in found, found
        return
    proof, model, source = found
    anatomy = Anatomy.of(model)
    tol = 1e-4
    for kind in UNIT_KINDS:
        for form in FORMS:
            if kind in proof.refused and form in proof.refused[kind]:
                with pytest.raises(Refused) as refused:
                    proof.check(kind, form)
                message = str(refused.value)
                assert "\n" not in message and message.startswith(f"{proof.model_type}: {kind}")
        if "hook" in proof.refused.get(kind, {}):
            continue
        tensors = dict(source.named_parameters())
        for unit in units_of(kind, model, anatomy):
            expected = logits(by_hand(model, source, anatomy, unit))
            with ablated(model, unit, tensors, anatomy):
                got = logits(model)
            worst = float((got - expected).abs().max())
            assert worst <= tol * max(1.0, float(expected.abs().max())), (
                model_type,
                unit.id,
                worst,
            )


@pytest.mark.parametrize("model_type", ZOO)
def test_the_sweep_is_exact_wherever_the_proof_keeps_it(model_type):
    found = proven(model_type)
    if isinstance(found, str):
        pytest.skip("refused")
    proof, model, source = found
    anatomy = Anatomy.of(model)
    units = [
        unit
        for kind in UNIT_KINDS
        if kind not in proof.sweep_off and "hook" not in proof.refused.get(kind, {})
        for unit in units_of(kind, model, anatomy)
    ]
    if not units:
        pytest.skip("the sweep is off for every kind")
    tensors = dict(source.named_parameters())
    swept = sweep_loglikelihoods(model, REQUESTS, units, tensors, 4, 64)
    for unit in units:
        expected = loglikelihoods(by_hand(model, source, anatomy, unit))
        got = [ll for ll, _ in swept[unit.id]]
        assert got == pytest.approx(expected, abs=1e-3), (model_type, unit.id)


# ------------------------------------------------------------------- the README's table


def reason(why: str) -> str:
    """A refusal's reason without its numbers and place (the same for every layer)."""
    return re.sub(r" \(max [^)]*\)| at \S+( \d+)?$| \(.*$", "", why)


def supported_table() -> str:
    """Model type x form: the kinds exact with the shared-prefix sweep, exact through HFLM
    (hooks), exact as weight edits (vLLM's form); the kinds refused in both forms, by reason."""
    rows = ["| model type | hf, with the sweep | hf, via HFLM only | weight edits (vLLM) | "
            "refused, and why |", "|---|---|---|---|---|"]  # fmt: skip
    for model_type in ZOO:
        found = proven(model_type)
        if isinstance(found, str):
            rows.append(f"| {model_type} | | | | all: {reason(found.partition(': ')[2])} |")
            continue
        proof: Proof = found[0]
        hook = [k for k in UNIT_KINDS if "hook" not in proof.refused.get(k, {})]
        swept = [k for k in hook if k not in proof.sweep_off]
        edits = [k for k in UNIT_KINDS if "weight_edit" not in proof.refused.get(k, {})]
        by_reason: dict[str, list[str]] = {}
        for kind in UNIT_KINDS:
            if len(proof.refused.get(kind, {})) == len(FORMS):
                by_reason.setdefault(reason(proof.refused[kind]["hook"]), []).append(kind)
        refused = "; ".join(f"{', '.join(kinds)}: {why}" for why, kinds in by_reason.items())
        only_hflm = [k for k in hook if k not in swept]
        rows.append(f"| {model_type} | {', '.join(swept)} | {', '.join(only_hflm)} "
                    f"| {', '.join(edits)} | {refused} |")  # fmt: skip
    return "\n".join(rows)


def test_readme_supported_models_table_is_the_zoos():
    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    table = readme.split("<!-- supported-models -->\n")[1].split("\n<!-- /supported-models -->")[0]
    assert table == supported_table()


if __name__ == "__main__":
    sys.stdout.write(supported_table() + "\n")
