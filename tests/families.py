"""Tiny random-weight models of many decoder families, built from ``transformers`` configs (no
download, milliseconds each), and the by-hand forms of each ablation they are checked against.

Shared by the exactness matrix (test_families.py) and the supported-models table of
docs/ablations.md (``python tests/families.py``), so the table is what the matrix proves.
"""

from __future__ import annotations

import copy
import sys

import torch
import transformers as T

from ablate.anatomy import Anatomy

WINDOW = 6  # sliding window of the windowed families: the matrix's contexts are longer
COMMON = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0,
    bos_token_id=1, eos_token_id=2,
)  # fmt: skip
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
# family -> (config class, settings beyond COMMON), one row of the matrix each.
FAMILIES = {
    "Llama": (T.LlamaConfig, {}),
    "Mistral (all layers sliding)": (T.MistralConfig, dict(sliding_window=WINDOW)),
    "Qwen2 (sliding)": (
        T.Qwen2Config,
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
    ),
    "Qwen3": (T.Qwen3Config, dict(head_dim=16)),
    "Mixtral (MoE)": (T.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
    "Qwen2-MoE (shared expert)": (
        T.Qwen2MoeConfig,
        dict(MOE, num_experts=4, shared_expert_intermediate_size=48),
    ),
    "Qwen3-MoE": (T.Qwen3MoeConfig, dict(MOE, num_experts=4, head_dim=16)),
    "Gemma-2 (mixed windows, soft-capping)": (
        T.Gemma2Config,
        dict(head_dim=16, sliding_window=WINDOW, final_logit_softcapping=0.5),
    ),
    "Gemma-3 text": (T.Gemma3TextConfig, dict(head_dim=16, sliding_window=WINDOW)),
    "Phi-3 (sliding)": (T.Phi3Config, dict(sliding_window=WINDOW)),
    "OLMo-2 (post-norm)": (T.Olmo2Config, {}),
    "GPT-NeoX / Pythia (parallel residual)": (T.GPTNeoXConfig, dict(rotary_pct=0.25)),
    "GPT-2 (Conv1D)": (T.GPT2Config, dict(n_embd=64, n_layer=3, n_head=4, n_positions=256)),
    "OPT": (T.OPTConfig, dict(ffn_dim=96, word_embed_proj_dim=64)),
    "Falcon (multi-query)": (T.FalconConfig, dict(multi_query=True)),
    "Falcon (new decoder)": (T.FalconConfig, dict(new_decoder_architecture=True, num_kv_heads=2)),
    "Cohere (logit scale)": (T.CohereConfig, dict(logit_scale=0.5)),
    "Granite (logit scaling)": (T.GraniteConfig, dict(logits_scaling=2.0)),
    "DeepSeek-V3 (MLA, MoE)": (
        T.DeepseekV3Config,
        dict(
            MOE,
            num_key_value_heads=4,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=12,
            n_routed_experts=4,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
    ),
    "GPT-OSS (sinks, MoE, mixed windows)": (
        T.GptOssConfig,
        dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    ),
    "Starcoder2 (sliding, biases)": (T.Starcoder2Config, dict(sliding_window=WINDOW)),
    "Phi-2": (T.PhiConfig, {}),
    "Gemma-3 multimodal wrapper": (None, {}),
}


def gemma3_multimodal_config():
    text = dict(COMMON, vocab_size=300, head_dim=16, sliding_window=WINDOW)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
    return T.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        image_token_index=299, boi_token_index=297, eoi_token_index=298,
    )  # fmt: skip


def family_config(family: str, **overrides):
    config_class, settings = FAMILIES[family]
    if config_class is None:
        return gemma3_multimodal_config()
    return config_class(**(COMMON | settings | overrides))


def build(family: str, seed: int = 0, **overrides):
    """A float32 model of ``family`` in eval mode, its weights from ``seed`` (``overrides``:
    config settings, such as a tokenizer's vocabulary size)."""
    torch.manual_seed(seed)
    config = family_config(family, **overrides)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random biases and norm weights, so that each one matters
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or parameter.dim() == 1:
                parameter.normal_(0, 0.2).add_(1.0 if "norm" in name else 0.0)
    return model


# ------------------------------------------------------------------------ by-hand references


def without_layer(model, anatomy: Anatomy, layer: int):
    """A copy with decoder block ``layer`` deleted (the other blocks keep their attention types
    and cache slots)."""
    pruned = copy.deepcopy(model)
    blocks = anatomy.blocks(pruned)
    del blocks[layer]
    for index, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    text = pruned.config.get_text_config()
    text.num_hidden_layers -= 1
    if getattr(text, "layer_types", None):
        text.layer_types = [t for i, t in enumerate(text.layer_types) if i != layer]
    return pruned


class Removed(torch.nn.Module):
    """Stands where a sublayer was; its output, in the sublayer's own structure, is 0."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        self.original = original

    def forward(self, *args, **kwargs):
        output = self.original(*args, **kwargs)
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)


def without_sublayer(model, anatomy: Anatomy, sublayer: str, layer: int):
    removed = copy.deepcopy(model)
    block = anatomy.blocks(removed)[layer]
    name = anatomy.attention if sublayer == "attn" else anatomy.mlp
    parent, _, leaf = name.rpartition(".")
    owner = block.get_submodule(parent) if parent else block
    setattr(owner, leaf, Removed(getattr(owner, leaf)))
    return removed


def head_width(config) -> int:
    """Input features of the attention output projection per query head, from the config."""
    text = config.get_text_config()
    return (
        getattr(text, "v_head_dim", None)
        or getattr(text, "head_dim", None)
        or (text.hidden_size // text.num_attention_heads)
    )


def with_heads_zeroed(model, anatomy: Anatomy, layer: int, heads: range):
    edited = copy.deepcopy(model)
    out = anatomy.blocks(edited)[layer].get_submodule(anatomy.attention_out)
    width = head_width(model.config)
    columns = slice(heads.start * width, heads.stop * width)
    with torch.no_grad():
        if type(out).__name__ == "Conv1D":  # (in, out): input features are rows
            out.weight[columns, :] = 0
        else:
            out.weight[:, columns] = 0
    return edited


def with_o_proj_from(model, anatomy: Anatomy, source, layers: range):
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for layer in layers:
            target = anatomy.blocks(edited)[layer].get_submodule(anatomy.attention_out)
            target.weight.copy_(
                anatomy.blocks(source)[layer].get_submodule(anatomy.attention_out).weight
            )
    return edited


def with_layers_from(model, anatomy: Anatomy, source, layers: range):
    """The model with its decoder blocks ``layers`` replaced by the source model's, as the
    paper's released layer_change.py swaps them."""
    edited = copy.deepcopy(model)
    for layer in layers:
        anatomy.blocks(edited)[layer] = copy.deepcopy(anatomy.blocks(source)[layer])
    return edited


KINDS = ("layer", "attn", "mlp", "head", "oproj", "layer_swap")


def refusals(check, anatomy: Anatomy, keys) -> str:
    """'exact', or the kinds ``check`` refuses and the first reason."""
    from ablate.ablations import Ablation

    refused = {}
    units = ("layer1", "attn1", "mlp1", "head1.0", "oproj1_from_x", "layerswap1_from_x")
    for kind, unit in zip(KINDS, units, strict=True):
        try:
            check(Ablation.parse(unit), anatomy, keys)
        except ValueError as error:
            refused[kind] = str(error).partition(": ")[2].split(" (")[0]
    if not refused:
        return "exact"
    return f"{', '.join(refused)} refused: {next(iter(refused.values()))}"


def proven(proof, form: str) -> str:
    """'exact', or the kinds the proof refuses in ``form`` and the first reason."""
    refused = {kind: forms[form] for kind, forms in proof.refused.items() if form in forms}
    refused = {kind: why for kind, why in refused.items() if kind in KINDS}
    if not refused:
        return "exact"
    return f"{', '.join(refused)} refused: {next(iter(refused.values())).split(' (')[0]}"


def supported_table() -> str:
    """The supported-models table of docs/ablations.md: family x form, as the proof
    (ablate.proof, on the family's own tiny model) and vLLM's checkpoint check decide it (the
    matrix in test_families.py checks each 'exact' against the ablation done by hand)."""
    import tempfile

    from ablate.ablations import checkpoint_keys
    from ablate.backends.vllm import check_engine_edits
    from ablate.proof import prove

    rows = [
        "| family (tiny config in `tests/families.py`) | hooks (hf) | weight edits | vLLM | "
        "shared-prefix sweep |",
        "|---|---|---|---|---|",
    ]
    for family in FAMILIES:
        model = build(family)
        anatomy = Anatomy.of(model)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            stored = checkpoint_keys(folder)
        proof = prove(model, KINDS, dict(build(family, seed=1).named_parameters()), stored)
        engine = refusals(check_engine_edits, anatomy, stored)
        off = next(iter(proof.sweep_off.values()), None)
        sweep = "exact" if off is None else f"off ({off}): HFLM scores, exact"
        rows.append(
            f"| {family} | {proven(proof, 'hook')} | {proven(proof, 'weight_edit')} | {engine} "
            f"| {sweep} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(supported_table() + "\n")
