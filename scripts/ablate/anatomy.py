"""What a decoder LLM is made of, as ablations need it: the one owner of module names and shapes.

:class:`Architecture` holds the shapes, from a HF config alone (config checks, planning, vLLM's
driver). :class:`Anatomy` holds the modules, from a loaded model (or one built on the ``meta``
device from its config, in milliseconds and no memory: :func:`anatomy_from_config`): the text
decoder's blocks (a multimodal wrapper's language model, never its vision tower), each block's
attention and MLP sublayers, the projections that write their outputs into the residual stream,
the per-head width that projection reads, and each layer's attention window. Hooks, weight edits,
the shared-prefix sweep and the proxies read it; nothing else names a module.

Names are derived from the module tree; the small tables below list the names families give the
same part (LLaMA ``self_attn.o_proj`` / ``mlp.down_proj``, GPT-NeoX ``attention.dense`` /
``mlp.dense_4h_to_h``, GPT-2 ``attn.c_proj`` (Conv1D), OPT ``self_attn.out_proj`` / ``fc2``,
Falcon ``self_attention.dense``, Phi ``dense`` / ``fc2``, MoE ``experts.down_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
ATTENTION_OUT_NAMES = ("o_proj", "dense", "out_proj", "c_proj")
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "fc2")  # OPT's MLP ends in the block's fc2
# Parameters that write the MLP's (or every expert's, and a shared expert's) output.
MLP_OUT_NAMES = ("down_proj", "dense_4h_to_h", "c_proj", "fc2", "fc_out", "w2")
TUPLE_BLOCK_FAMILIES = frozenset({"falcon"})  # blocks that return (hidden states, attention)
# Attention kernels that take a mask of any shape, so the sweep can put options on a shared
# context (ablate.sweep); flash_attention_2 takes only padding masks.
CONTEXT_SHARING_KERNELS = ("sdpa", "eager", "flex_attention")
ATTENTION_TYPES = ("full_attention", "sliding_attention")  # what the sweep's masks express


class UnsupportedModel(ValueError):
    """A model whose parts an ablation needs cannot be found; the message says which."""


@dataclass(frozen=True)
class Architecture:
    """The shapes an ablation needs, read from a HF config (the text decoder's, for multimodal
    wrappers)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int

    @classmethod
    def from_config(cls, config) -> Architecture:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        try:
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
        except ValueError:  # several text configs: a text encoder beside the decoder
            raise UnsupportedModel(
                f"{config.model_type}: not decoder-only (a text encoder beside its decoder)"
            ) from None
        encoder = text.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(
            text, "is_decoder", False
        )
        if getattr(config, "is_encoder_decoder", False) or encoder:
            raise UnsupportedModel(
                f"{text.model_type}: not decoder-only (an encoder or encoder-decoder): the "
                "ablations remove blocks of a decoder's residual stream"
            )
        try:
            heads, layers = text.num_attention_heads, text.num_hidden_layers
        except Exception:  # a state-space model, or heads that vary by layer
            raise UnsupportedModel(
                f"{text.model_type}: its config gives no attention heads and layers "
                "(num_attention_heads, num_hidden_layers) for every layer alike"
            ) from None
        kv_heads = next(
            (getattr(text, name) for name in ("num_key_value_heads", "num_kv_heads")
             if _declared(text, name) and getattr(text, name, None)),
            None,
        )  # fmt: skip
        if getattr(text, "multi_query", False) and not getattr(
            text, "new_decoder_architecture", False
        ):
            kv_heads = 1  # Falcon's multi-query attention: one KV head for all query heads
        return cls(layers, heads, kv_heads or heads)

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def _declared(config, name: str) -> bool:
    """Whether ``config``'s class has the setting ``name``: a config keeps any keyword it is
    given, and a GPT-NeoX config with a stray num_key_value_heads still has no GQA."""
    import inspect

    declared = set(getattr(type(config), "__dataclass_fields__", {}))
    declared |= set(inspect.signature(type(config).__init__).parameters)
    return name in declared | set(getattr(config, "attribute_map", {}))


def _first_child(module: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if hasattr(module, name)), None)


@dataclass(frozen=True)
class Anatomy:
    """Module names of a loaded model's text decoder, relative to the model (``layers``) or to a
    block (the rest), and the shapes and windows ablations need."""

    model_type: str
    layers: str  # the block list, e.g. model.layers, model.language_model.layers, transformer.h
    attention: str  # a block's attention sublayer, e.g. self_attn
    attention_out: str  # the projection writing its output, e.g. self_attn.o_proj
    attention_out_params: tuple[str, ...]  # its weight (and bias), e.g. self_attn.o_proj.weight
    mlp: str  # the module whose output is the MLP's, e.g. mlp (OPT: fc2)
    # Per layer, the parameters writing the MLP's output (every expert's), e.g. mlp.down_proj.weight,
    # mlp.experts.down_proj, mlp.shared_expert.down_proj.weight (DeepSeek: dense, then MoE layers)
    mlp_out: tuple[tuple[str, ...], ...]
    block_params: tuple[tuple[str, ...], ...]  # per layer, every parameter of its block
    arch: Architecture
    attention_layers: tuple[int, ...]  # layers with an attention sublayer (hybrids: not all)
    # Per layer, input columns of attention_out per query head (MLA: v_head_dim; families with
    # two head widths: each layer's own); None where they are not the heads' (or no attention).
    head_widths: tuple[int | None, ...]
    conv1d_out: bool  # attention_out is a GPT-2 Conv1D: its weight is (in, out)
    windows: tuple[int | None, ...]  # each layer's sliding window (None: full attention)
    attention_types: tuple[str, ...]  # each layer's attention type, as the config names it
    post_norm_residual: bool  # the residual stream is normalized after each add (post-LN OPT)
    tuple_blocks: bool  # a block returns (hidden states, ...), not the hidden states alone

    @classmethod
    def of(cls, model: nn.Module) -> Anatomy:
        from torch import nn

        config = model.config
        text = config.get_text_config()
        arch = Architecture.from_config(config)
        name = type(model).__name__
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        path = next((name for name, m in model.named_modules() if m is decoder), "")
        lists = [
            name
            for name, m in decoder.named_modules()
            if isinstance(m, nn.ModuleList)
            and len(m) == arch.num_layers
            and any(_first_child(block, ATTENTION_NAMES) for block in m)
        ]
        if not lists:
            raise UnsupportedModel(
                f"{text.model_type} ({name}): no list of {arch.num_layers} decoder blocks with an "
                f"attention module ({', '.join(ATTENTION_NAMES)})"
            )
        block = decoder.get_submodule(lists[0])
        attention = next(filter(None, (_first_child(b, ATTENTION_NAMES) for b in block)))
        attention_layers = tuple(i for i, b in enumerate(block) if hasattr(b, attention))
        first = block[attention_layers[0]]
        out = _first_child(first.get_submodule(attention), ATTENTION_OUT_NAMES)
        mlp = next(filter(None, (_first_child(b, MLP_NAMES) for b in block)), None)
        if out is None or mlp is None:
            missing = "attention output projection" if out is None else "MLP"
            raise UnsupportedModel(f"{text.model_type} ({name}): no {missing} in its blocks")
        out_modules = [
            b.get_submodule(attention).get_submodule(out) if hasattr(b, attention) else None
            for b in block
        ]
        if any(m is not None and not hasattr(m, "weight") for m in out_modules):
            raise UnsupportedModel(
                f"{text.model_type} ({name}): its attention output projection {out} has no weight"
            )
        conv1d = type(out_modules[attention_layers[0]]).__name__ == "Conv1D"
        mlp_out = tuple(
            tuple(
                f"{mlp}.{name}"
                for name, _ in layer.get_submodule(mlp).named_parameters()
                if mlp in MLP_OUT_NAMES or _writes_mlp_output(name)
            )
            if hasattr(layer, mlp)
            else ()
            for layer in block
        )
        types = tuple(
            getattr(text, "layer_types", None)
            or ["sliding_attention" if getattr(text, "sliding_window", None) else "full_attention"]
            * arch.num_layers
        )
        window = getattr(text, "sliding_window", None)
        return cls(
            model_type=text.model_type,
            layers=f"{path}.{lists[0]}".strip("."),
            attention=attention,
            attention_out=f"{attention}.{out}",
            attention_out_params=tuple(
                f"{attention}.{out}.{name}"
                for name, _ in out_modules[attention_layers[0]].named_parameters()
            ),
            mlp=mlp,
            mlp_out=mlp_out,
            block_params=tuple(
                tuple(name for name, _ in layer.named_parameters()) for layer in block
            ),
            arch=arch,
            attention_layers=attention_layers,
            head_widths=tuple(
                None if o is None else _head_width(b.get_submodule(attention), o, conv1d, arch)
                for b, o in zip(block, out_modules, strict=True)
            ),
            conv1d_out=conv1d,
            windows=tuple(window if t == "sliding_attention" else None for t in types),
            attention_types=types,
            post_norm_residual=getattr(text, "do_layer_norm_before", True) is False,
            tuple_blocks=text.model_type in TUPLE_BLOCK_FAMILIES,
        )

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def block_name(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def attention_out_weight(self, layer: int) -> str:
        """The state-dict key of layer ``layer``'s attention output projection weight."""
        return f"{self.block_name(layer)}.{self.attention_out}.weight"

    def block_parameters(self, layer: int) -> list[str]:
        """State-dict keys of every parameter of block ``layer`` (a whole-layer swap's)."""
        return [f"{self.block_name(layer)}.{name}" for name in self.block_params[layer]]

    def out_parameters(self, layer: int, sublayer: str) -> list[str]:
        """State-dict keys of the parameters that write ``sublayer``'s (attn or mlp) output into
        the residual stream at ``layer``: zeroed together, that sublayer adds exactly 0."""
        names = self.attention_out_params if sublayer == "attn" else self.mlp_out[layer]
        return [f"{self.block_name(layer)}.{name}" for name in names]

    @property
    def sweep_blocker(self) -> str | None:
        """Why the shared-prefix sweep's masks cannot express this model's attention (None:
        they can; whether its answers are exact is proven on the model: ablate.proof). (An
        attention kernel without 4D masks, flash attention, only stops it from sharing a
        context among options: :func:`ablate.sweep.shares_contexts`.)"""
        if unknown := sorted(set(self.attention_types) - set(ATTENTION_TYPES)):
            return f"attention type {', '.join(unknown)} has no shared-context mask"
        return None


def _head_width(
    attention: nn.Module, out: nn.Module, conv1d: bool, arch: Architecture
) -> int | None:
    """Input features of ``out`` per query head: the attention module's own head width where it
    states one (a family may give layers of two types two widths), if the heads cover the
    projection's input exactly; None where they do not (head units cannot be placed)."""
    features = out.weight.shape[0 if conv1d else 1]
    stated = getattr(attention, "v_head_dim", None) or getattr(attention, "head_dim", None)
    width = stated if isinstance(stated, int) else features // arch.num_heads
    return width if width * arch.num_heads == features else None


def _writes_mlp_output(parameter: str) -> bool:
    """``down_proj.weight``, ``experts.down_proj`` (fused experts), ``experts.down_proj_bias``,
    ``shared_expert.down_proj.weight``: a parameter of an output projection."""
    parts = parameter.split(".")
    return any(part in MLP_OUT_NAMES for part in parts[:-1]) or any(
        parts[-1] in (name, f"{name}_bias") for name in MLP_OUT_NAMES
    )


def anatomy_from_config(config) -> Anatomy:
    """The anatomy of the model ``config`` describes, built on the meta device (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return Anatomy.of(model)
