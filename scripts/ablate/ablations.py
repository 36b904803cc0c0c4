"""In-process ablations of a loaded decoder LLM, as reversible hooks and weight swaps.

An ablation is named by a short id that is also its results folder:

===========================  ==================================================================
``base``                     the unablated model
``layer{L}``                 skip decoder layer L (its output is its input)
``head{L}.{H}``              silence query head H of layer L (its slice of the o_proj input is 0)
``kvgroup{L}.{G}``           silence every query head that reads KV head G of layer L (GQA group)
``oproj{L}_from_{M}``        layer L's ``self_attn.o_proj`` weight taken from model M
``oprojcum{L}_from_{M}``     ``self_attn.o_proj`` of layers 0..L taken from model M
===========================  ==================================================================

Layer and head indices are 0-based, as in ``model.model.layers[i]``.

Every ablation also has an exact weight-edit form (:func:`weight_edits`), for engines where hooks
cannot reach the forward pass (vLLM): a skipped layer's ``o_proj`` and ``down_proj`` are zeroed
(with no biases the block then adds exactly 0 to the residual stream), a silenced head's
``o_proj`` input columns are zeroed, a replaced ``o_proj`` is the source's tensor.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ABLATION_PATTERN = r"base|layer\d+|head\d+\.\d+|kvgroup\d+\.\d+|oproj(?:cum)?\d+_from_[a-z0-9_]+"
_PARSE = re.compile(
    r"^(?:(?P<base>base)|layer(?P<layer>\d+)|(?P<head_kind>head|kvgroup)(?P<hl>\d+)\.(?P<h>\d+)"
    r"|(?P<oproj_kind>oproj(?:cum)?)(?P<ol>\d+)_from_(?P<source>[a-z0-9_]+))$"
)


@dataclass(frozen=True)
class Ablation:
    """A parsed ablation id; ``kind`` is one of base, layer, head, kvgroup, oproj, oprojcum."""

    kind: str
    layer: int | None = None
    head: int | None = None
    source: str | None = None

    @classmethod
    def parse(cls, ablation_id: str) -> Ablation:
        match = _PARSE.match(ablation_id)
        if match is None:
            raise ValueError(f"ablation id {ablation_id!r} does not match {ABLATION_PATTERN}")
        if match["base"]:
            return cls("base")
        if match["layer"] is not None:
            return cls("layer", layer=int(match["layer"]))
        if match["head_kind"]:
            return cls(match["head_kind"], layer=int(match["hl"]), head=int(match["h"]))
        return cls(match["oproj_kind"], layer=int(match["ol"]), source=match["source"])

    @property
    def id(self) -> str:
        if self.kind == "base":
            return "base"
        if self.kind == "layer":
            return f"layer{self.layer}"
        if self.kind in ("head", "kvgroup"):
            return f"{self.kind}{self.layer}.{self.head}"
        return f"{self.kind}{self.layer}_from_{self.source}"

    @property
    def replaced_layers(self) -> range:
        """Layers whose o_proj the source model provides (empty for non-replacement kinds)."""
        if self.kind == "oproj":
            return range(self.layer, self.layer + 1)
        if self.kind == "oprojcum":
            return range(self.layer + 1)
        return range(0)

    def first_changed_layer(self, num_layers: int) -> int:
        """The lowest layer this ablation changes (``num_layers`` for base, which changes none):
        layers below it run exactly as in the unablated model."""
        if self.kind == "base":
            return num_layers
        return self.replaced_layers.start if self.replaced_layers else self.layer


@dataclass(frozen=True)
class Architecture:
    """The shapes an ablation needs, read from a HF config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> Architecture:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text_config.num_attention_heads
        return cls(
            num_layers=text_config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def silenced_heads(self, ablation: Ablation) -> range:
        """Query heads whose output an ablation zeroes."""
        if ablation.kind == "head":
            return range(ablation.head, ablation.head + 1)
        group = self.heads_per_group
        return range(ablation.head * group, (ablation.head + 1) * group)

    def check(self, ablation: Ablation) -> None:
        """Raise ValueError if ``ablation`` names a layer or head this architecture lacks."""
        if ablation.kind == "base":
            return
        if not 0 <= ablation.layer < self.num_layers:
            raise ValueError(
                f"{ablation.id}: layer {ablation.layer} out of range 0..{self.num_layers - 1}"
            )
        if ablation.kind == "head" and not 0 <= ablation.head < self.num_heads:
            raise ValueError(
                f"{ablation.id}: head {ablation.head} out of range 0..{self.num_heads - 1}"
            )
        if ablation.kind == "kvgroup":
            if self.num_kv_heads == self.num_heads:
                raise ValueError(
                    f"{ablation.id}: head mode kv_group needs grouped-query attention, "
                    f"but this model has {self.num_heads} query and {self.num_kv_heads} KV heads"
                )
            if not 0 <= ablation.head < self.num_kv_heads:
                raise ValueError(
                    f"{ablation.id}: KV group {ablation.head} out of range 0..{self.num_kv_heads - 1}"
                )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder block list of a HF causal LM (``model.model.layers`` for LLaMA/Qwen)."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"{type(model).__name__} has no '*.layers' ModuleList of decoder blocks")


def o_proj_key(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.o_proj.weight"


def down_proj_key(layer: int) -> str:
    return f"model.layers.{layer}.mlp.down_proj.weight"


@dataclass(frozen=True)
class WeightEdit:
    """One checkpoint tensor an ablation changes: zeroed whole, zeroed in its input columns
    ``columns`` (start, stop), or replaced by the source model's tensor of the same name."""

    key: str
    columns: tuple[int, int] | None = None
    from_source: bool = False

    @property
    def module(self) -> str:
        return self.key.removesuffix(".weight")

    def apply(self, original: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """The edited tensor (a new one; ``original`` is left as it was)."""
        if self.from_source:
            if source is None or source.shape != original.shape:
                shape = None if source is None else tuple(source.shape)
                raise ValueError(f"{self.key}: source tensor {shape}, {tuple(original.shape)} here")
            return source.to(dtype=original.dtype, device=original.device).clone()
        if self.columns is None:
            return torch.zeros_like(original)
        edited = original.clone()
        edited[:, self.columns[0] : self.columns[1]] = 0
        return edited


def weight_edits(ablation: Ablation, arch: Architecture) -> list[WeightEdit]:
    """The exact weight-edit form of ``ablation`` (empty for the baseline)."""
    arch.check(ablation)
    if ablation.kind == "layer":
        return [WeightEdit(o_proj_key(ablation.layer)), WeightEdit(down_proj_key(ablation.layer))]
    if ablation.kind in ("head", "kvgroup"):
        heads = arch.silenced_heads(ablation)
        columns = (heads.start * arch.head_dim, heads.stop * arch.head_dim)
        return [WeightEdit(o_proj_key(ablation.layer), columns=columns)]
    return [WeightEdit(o_proj_key(layer), from_source=True) for layer in ablation.replaced_layers]


def check_weight_edits_exact(model: nn.Module, edits: list[WeightEdit]) -> None:
    """Raise ValueError unless every edited module is a bias-free linear map, the condition
    under which zeroing its weight removes its whole contribution."""
    for edit in edits:
        try:
            module = model.get_submodule(edit.module)
        except AttributeError:
            raise ValueError(
                f"{type(model).__name__} has no module {edit.module}: weight-edit ablations "
                "need LLaMA-style self_attn.o_proj and mlp.down_proj (use backend: hf)"
            ) from None
        if not isinstance(module, nn.Linear) or module.bias is not None:
            raise ValueError(
                f"{edit.module} is not a bias-free linear layer, so zeroing its weight is not an "
                "exact ablation (use backend: hf, whose hooks are exact)"
            )


@contextlib.contextmanager
def weight_edited(
    model: nn.Module, ablation: Ablation, source: Mapping[str, torch.Tensor] | None = None
) -> Iterator[None]:
    """Apply ``ablation`` as weight edits for the duration of the block; the original tensors
    are put back on exit (bit-identical). ``source``: checkpoint key -> tensor, for o_proj kinds."""
    edits = weight_edits(ablation, Architecture.from_config(model.config))
    check_weight_edits_exact(model, edits)
    originals: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        for edit in edits:
            weight = model.get_submodule(edit.module).weight
            replacement = (source or {}).get(edit.key)
            originals.append((weight, weight.data))
            weight.data = edit.apply(weight.data, replacement)
        yield
    finally:
        for weight, original in originals:
            weight.data = original


def load_tensors(checkpoint_dir: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read only the named tensors from a safetensors checkpoint (no full model)."""
    from safetensors import safe_open

    wanted, found = set(keys), {}
    for shard in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            for key in wanted & set(handle.keys()):
                found[key] = handle.get_tensor(key)
    if missing := sorted(wanted - found.keys()):
        raise ValueError(f"{checkpoint_dir}: no tensor {', '.join(missing)}")
    return found


def load_o_proj_weights(checkpoint_dir: Path, layers: range) -> dict[int, torch.Tensor]:
    """The o_proj weights of ``layers`` from a safetensors checkpoint, by layer."""
    tensors = load_tensors(checkpoint_dir, map(o_proj_key, layers))
    return {layer: tensors[o_proj_key(layer)] for layer in layers}


def _skip_layer(module, args, kwargs, output):
    # The block's output becomes its input: identical to deleting the block.
    return args[0] if args else kwargs["hidden_states"]


def _zero_heads_hook(heads: range, head_dim: int):
    start, stop = heads.start * head_dim, heads.stop * head_dim

    def hook(module, args):
        hidden = args[0].clone()
        hidden[..., start:stop] = 0
        return (hidden, *args[1:])

    return hook


@contextlib.contextmanager
def ablated(
    model: nn.Module,
    ablation: Ablation,
    source_o_proj: Mapping[int, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Apply ``ablation`` to ``model`` for the duration of the block; always undone on exit."""
    arch = Architecture.from_config(model.config)
    arch.check(ablation)
    layers = decoder_layers(model)
    handles = []
    swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        if ablation.kind == "layer":
            block = layers[ablation.layer]
            handles.append(block.register_forward_hook(_skip_layer, with_kwargs=True))
        elif ablation.kind in ("head", "kvgroup"):
            o_proj = layers[ablation.layer].self_attn.o_proj
            hook = _zero_heads_hook(arch.silenced_heads(ablation), arch.head_dim)
            handles.append(o_proj.register_forward_pre_hook(hook))
        elif ablation.kind in ("oproj", "oprojcum"):
            if source_o_proj is None:
                raise ValueError(f"{ablation.id} needs the source model's o_proj weights")
            for layer in ablation.replaced_layers:
                weight = layers[layer].self_attn.o_proj.weight
                replacement = source_o_proj[layer]
                if replacement.shape != weight.shape:
                    raise ValueError(
                        f"{ablation.id}: o_proj of layer {layer} has shape "
                        f"{tuple(replacement.shape)} in {ablation.source}, {tuple(weight.shape)} here"
                    )
                swapped.append((weight, weight.data))
                weight.data = replacement.to(dtype=weight.dtype, device=weight.device)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for weight, original in swapped:
            weight.data = original
