"""Layer-importance proxies from forward passes of the unablated model (no ablation runs).

For decoder layer l with input h_in and output h_out at a token:

* block influence (ShortGPT, Men et al. 2024): 1 − mean cos(h_in, h_out);
* angular distance (Gromov et al. 2024, block size n = 1): mean arccos(cos(h_in, h_out)) / π;

both averaged over every non-padding token of every prompt. A high value means the layer
changes the residual stream a lot, i.e. it should matter more when skipped. The same two
measures per sublayer (``attn_*``, ``mlp_*``) compare the residual stream before and after that
sublayer alone: h_in against h_mid = h_in + attention output, and h_mid against h_out. That
split exists where a block adds its sublayers' outputs as they are (h_out = h_in + attention +
MLP, sequential or parallel); where it normalizes them first (Gemma, OLMo-2) the sublayer
columns are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import pandas as pd
import torch
from torch import nn

from ablate.anatomy import Anatomy

PARTS = ("", "attn_", "mlp_")  # whole layer, attention sublayer, MLP sublayer


def layer_proxies(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> pd.DataFrame:
    """Block influence and angular distance of every decoder layer and of its attention and MLP
    sublayers (columns layer, block_influence, angular_distance, attn_block_influence, ...), from
    one forward pass per (input_ids, attention_mask) batch.

    Layer inputs, attention outputs and layer outputs are captured by forward hooks; only float64
    running sums are kept.
    """
    anatomy = Anatomy.of(model)
    layers = anatomy.blocks(model)
    device = next(model.parameters()).device
    sums = {
        (part, name): torch.zeros(len(layers), dtype=torch.float64, device=device)
        for part in PARTS
        for name in ("cos", "angle")
    }
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    split = [True] * len(layers)  # h_out = h_in + attention + MLP outputs at every token so far
    tokens = 0

    def add(part: str, index: int, before: torch.Tensor, after: torch.Tensor) -> None:
        cos = nn.functional.cosine_similarity(before.double(), after.double(), dim=-1)
        cos = cos[mask.to(cos.device)]  # layers may sit on other devices than the embedding
        sums[(part, "cos")][index] += cos.sum().to(device)
        angle = torch.arccos(cos.clamp(-1.0, 1.0)).sum() / math.pi
        sums[(part, "angle")][index] += angle.to(device)

    def keep(part: str, index: int):
        def hook(module: nn.Module, args: tuple, output) -> None:
            output = output[0] if isinstance(output, tuple) else output
            outputs[(part, index)] = output.clone()  # Falcon adds into its MLP output in place

        return hook

    def capture(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output if isinstance(output, torch.Tensor) else output[0]
            attention, mlp = outputs.pop(("attn", index)), outputs.pop(("mlp", index))
            h_mid = h_in + attention  # the residual stream between the sublayers
            add("", index, h_in, h_out)
            tolerance = 1e-3 * float(h_out.abs().max())
            split[index] &= torch.allclose(h_mid + mlp, h_out, rtol=1e-3, atol=tolerance)
            add("attn_", index, h_in, h_mid)
            add("mlp_", index, h_mid, h_out)

        return hook

    handles = [
        handle
        for index, layer in enumerate(layers)
        for handle in (
            layer.get_submodule(anatomy.attention).register_forward_hook(keep("attn", index)),
            layer.get_submodule(anatomy.mlp).register_forward_hook(keep("mlp", index)),
            layer.register_forward_hook(capture(index), with_kwargs=True),
        )
    ]
    try:
        with torch.no_grad():
            for input_ids, attention_mask in batches:
                mask = attention_mask.to(device=device, dtype=torch.bool)
                tokens += int(mask.sum())
                model(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    use_cache=False,
                )
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ValueError("no non-padding tokens in the batches")
    columns = {"layer": range(len(layers))}
    undefined = torch.tensor([not s for s in split], device=device)
    for part in PARTS:
        for name, value in (
            ("block_influence", 1.0 - sums[(part, "cos")] / tokens),
            ("angular_distance", sums[(part, "angle")] / tokens),
        ):
            if part:
                value = value.masked_fill(undefined, math.nan)
            columns[f"{part}{name}"] = value.cpu().numpy()
    return pd.DataFrame(columns)


def prompt_batches(
    tokenizer, prompts: list[str], batch_size: int, max_length: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches of ``prompts``, truncated to ``max_length`` tokens and
    right-padded (the pad id is irrelevant: padded positions are masked out)."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id or 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        encoded = tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]
        if any(not ids for ids in encoded):
            raise ValueError(f"a prompt of batch {start // batch_size} has no tokens")
        width = max(map(len, encoded))
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        yield input_ids, attention_mask
