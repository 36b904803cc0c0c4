"""The exactness matrix: every ablation kind in every form (hook, weight edit, shared-prefix
sweep) on tiny random-weight models of many decoder families, against the ablation done by hand
(layer deleted, sublayer output zeroed, the head's o_proj input features zeroed, o_proj
swapped): logits and greedy generation with a KV cache equal, or the form refused with one
line before anything runs."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.flex_attention import WrappedFlexAttention

from ablate.ablations import (
    Ablation,
    ablated,
    check_weight_edits_exact,
    silenced_heads,
    weight_edited,
    weight_edits,
)
from ablate.anatomy import Anatomy, anatomy_from_config
from ablate.proof import check_units
from ablate.proxy import layer_proxies
from ablate.sweep import shares_contexts, sweep_loglikelihoods
from conftest import REPO
from families import (
    FAMILIES,
    WINDOW,
    build,
    family_config,
    supported_table,
    with_heads_zeroed,
    with_layers_from,
    with_o_proj_from,
    without_layer,
    without_sublayer,
)

UNITS = (
    "layer1",
    "attn1",
    "mlp1",
    "head1.1",
    "kvgroup1.0",
    "oproj1_from_src",
    "oprojcum1_from_src",
    "layerswap1_from_src",
    "layerswapcum1_from_src",
    "layers0+2",
)
PROMPT = torch.tensor([[5, 17, 33, 8, 91, 12, 44, 7, 63, 21, 38, 9, 70, 15]])  # > WINDOW tokens
# Requests whose context + continuation is longer than WINDOW; contexts shared by options.
CONTEXTS = [(5, 17, 33, 8, 91, 12, 44, 7, 63, 21), (40, 3, 77, 19, 26, 51, 88, 14)]
CONTINUATIONS = [(11,), (23, 57), (30, 6, 99)]
REQUESTS = [(c, o) for c in CONTEXTS for o in CONTINUATIONS]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT).logits


def greedy(model) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=PROMPT, max_new_tokens=5, do_sample=False,
                              use_cache=True, pad_token_id=0)  # fmt: skip


def reference(model, source, anatomy: Anatomy, ablation: Ablation):
    """The ablation done by hand on a copy of the model."""
    if ablation.kind in ("layer", "layer_set"):
        pruned = model
        for layer in sorted(ablation.skipped_layers, reverse=True):  # indices above stay put
            pruned = without_layer(pruned, anatomy, layer)
        return pruned
    if ablation.kind in ("attn", "mlp"):
        return without_sublayer(model, anatomy, ablation.kind, ablation.layer)
    if ablation.kind in ("head", "kv_group"):
        heads = silenced_heads(ablation, anatomy.arch)
        return with_heads_zeroed(model, anatomy, ablation.layer, heads)
    if ablation.kind in ("layer_swap", "layer_swap_cumulative"):
        return with_layers_from(model, anatomy, source, ablation.replaced_layers)
    return with_o_proj_from(model, anatomy, source, ablation.replaced_layers)


def source_tensors(source, anatomy: Anatomy, units) -> dict:
    """The source model's tensors the units take, by state-dict key."""
    return {
        edit.key: source.get_parameter(edit.key)
        for unit in units
        for edit in weight_edits(unit, anatomy)
        if edit.from_source
    }


def loglikelihoods(model) -> list[float]:
    """Each request scored as its own sequence, as lm-eval scores it."""
    scores = []
    with torch.no_grad():
        for context, continuation in REQUESTS:
            tokens = torch.tensor([context + continuation])
            log_probs = F.log_softmax(model(input_ids=tokens).logits[0, :-1], dim=-1)
            targets = tokens[0, len(context) :]
            scores.append(float(log_probs[len(context) - 1 :].gather(1, targets[:, None]).sum()))
    return scores


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0, atol=1e-5)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    model, source = build(request.param), build(request.param, seed=1)
    return request.param, model, source, Anatomy.of(model)


def test_anatomy_from_config_is_the_loaded_models(family):
    name, model, _, anatomy = family
    assert anatomy_from_config(family_config(name)) == anatomy
    assert len(anatomy.blocks(model)) == anatomy.arch.num_layers == 3
    for layer, width in enumerate(anatomy.head_widths):
        out = anatomy.blocks(model)[layer].get_submodule(anatomy.attention_out)
        assert width * anatomy.arch.num_heads == out.weight.shape[0 if anatomy.conv1d_out else 1]


@pytest.mark.parametrize("unit", UNITS)
def test_hook_and_weight_edit_equal_the_ablation_by_hand(family, unit):
    name, model, source, anatomy = family
    ablation = Ablation.parse(unit)
    if ablation.kind == "kv_group" and anatomy.arch.num_kv_heads == anatomy.arch.num_heads:
        with pytest.raises(ValueError, match="needs grouped-query attention"):
            weight_edits_of(model, ablation)
        return
    by_hand = reference(model, source, anatomy, ablation)
    expected, expected_tokens = logits(by_hand), greedy(by_hand)
    assert not close(expected, logits(model)), f"{name}: {unit} changes nothing here"
    with ablated(model, ablation, source_tensors(source, anatomy, [ablation])):
        assert close(logits(model), expected), f"{name}: hook {unit}"
        assert torch.equal(greedy(model), expected_tokens), f"{name}: hook {unit} generation"
    edits = weight_edits_of(model, ablation)  # exact on every family of the matrix
    by_key = {edit.key: dict(source.named_parameters())[edit.key] for edit in edits}
    with weight_edited(model, ablation, by_key):
        assert close(logits(model), expected), f"{name}: weight edit {unit}"
        assert torch.equal(greedy(model), expected_tokens), f"{name}: weight edit {unit} generation"


def weight_edits_of(model, ablation: Ablation):
    return check_weight_edits_exact(ablation, Anatomy.of(model), dict(model.named_parameters()))


def test_sweep_equals_each_ablation_scored_alone(family):
    name, model, source, anatomy = family
    units = [Ablation.parse("base"), *(Ablation.parse(u) for u in UNITS)]
    if anatomy.arch.num_kv_heads == anatomy.arch.num_heads:
        units = [u for u in units if u.kind != "kv_group"]
    assert check_units(model, units[1:], source_tensors(source, anatomy, units)) is None, name
    swept = sweep_loglikelihoods(model, REQUESTS, units, source_tensors(source, anatomy, units),
                                 4, 64)  # fmt: skip
    for unit in units:
        by_hand = model if unit.kind == "base" else reference(model, source, anatomy, unit)
        expected = loglikelihoods(by_hand)
        got = [ll for ll, _ in swept[unit.id]]
        assert got == pytest.approx(expected, abs=1e-4), f"{name}: sweep {unit.id}"


def test_proxies_read_the_text_decoder(family):
    name, model, _, anatomy = family
    proxies = layer_proxies(model, [(PROMPT, torch.ones_like(PROMPT))])
    assert len(proxies) == anatomy.arch.num_layers
    assert proxies["block_influence"].notna().all()
    # Sublayer proxies exist where the block adds raw sublayer outputs (not under post-norms).
    post_norm = any(
        hasattr(anatomy.blocks(model)[0], norm)
        for norm in ("post_feedforward_layernorm", "post_mlp_layernorm")
    )
    assert proxies["attn_block_influence"].isna().all() == post_norm, name


def test_windows_are_shorter_than_the_matrix_contexts():
    assert all(len(c) > WINDOW for c in CONTEXTS)


def test_docs_supported_models_table_is_the_generated_one():
    ablations_doc = (REPO / "docs" / "ablations.md").read_text()
    table = ablations_doc.split("<!-- supported-models -->\n")[1]
    table = table.split("\n<!-- /supported-models -->")[0]
    assert table == supported_table()


@pytest.mark.parametrize(
    "name", ["Llama", "Mistral (all layers sliding)", "Gemma-2 (mixed windows, soft-capping)"]
)
def test_flex_attention_sweep_shares_contexts_exactly(name, monkeypatch):
    """Under flex_attention the sweep puts options on shared contexts with block masks (per
    layer window, soft-capping through the kernel's score hook): each unit equals the ablation
    done by hand, scored with sdpa as lm-eval scores it. Compiled with the eager backend:
    torch 2.13's inductor emits CPU code for flex attention that g++ rejects for some shapes
    (the config refuses flex_attention on CPU); the kernel's inputs and masks are the same."""
    compile_eagerly = functools.partial(torch.compile, backend="eager")
    monkeypatch.setattr(torch, "compile", compile_eagerly)
    monkeypatch.setattr(WrappedFlexAttention, "_is_flex_compiled", False)
    model, source = build(name), build(name, seed=1)
    anatomy = Anatomy.of(model)
    units = [Ablation.parse("base"), *(Ablation.parse(u) for u in UNITS)]
    source_weights = source_tensors(source, anatomy, units)
    expected = {
        unit.id: loglikelihoods(
            model if unit.kind == "base" else reference(model, source, anatomy, unit)
        )
        for unit in units
    }
    model.set_attn_implementation("flex_attention")
    assert shares_contexts(model)
    swept = sweep_loglikelihoods(model, REQUESTS, units, source_weights, 4, 64)
    for unit in units:
        got = [ll for ll, _ in swept[unit.id]]
        assert got == pytest.approx(expected[unit.id], abs=1e-4), f"{name}: flex sweep {unit.id}"
