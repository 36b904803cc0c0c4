"""Layer-importance proxies from forward passes of the unablated model (no ablation runs).

For decoder layer l with input h_in and output h_out at a token:

* block influence (ShortGPT, Men et al. 2024): 1 − mean cos(h_in, h_out);
* angular distance (Gromov et al. 2024, block size n = 1): mean arccos(cos(h_in, h_out)) / π;

both averaged over every non-padding token of every prompt. A high value means the layer
changes the residual stream a lot, i.e. it should matter more when skipped. The same two
measures per sublayer (``attn_*``, ``mlp_*``) compare the residual stream before and after that
sublayer alone: h_in against h_mid = h_in + attention output, and h_mid against h_out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import pandas as pd
import torch
from torch import nn

from ablate.ablations import decoder_layers

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
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    sums = {
        (part, name): torch.zeros(len(layers), dtype=torch.float64, device=device)
        for part in PARTS
        for name in ("cos", "angle")
    }
    attention: dict[int, torch.Tensor] = {}
    tokens = 0

    def add(part: str, index: int, before: torch.Tensor, after: torch.Tensor) -> None:
        cos = nn.functional.cosine_similarity(before.double(), after.double(), dim=-1)
        cos = cos[mask.to(cos.device)]  # layers may sit on other devices than the embedding
        sums[(part, "cos")][index] += cos.sum().to(device)
        angle = torch.arccos(cos.clamp(-1.0, 1.0)).sum() / math.pi
        sums[(part, "angle")][index] += angle.to(device)

    def keep_attention(index: int):
        def hook(module: nn.Module, args: tuple, output) -> None:
            attention[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def capture(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output if isinstance(output, torch.Tensor) else output[0]
            h_mid = h_in + attention.pop(index)  # the residual stream between the sublayers
            add("", index, h_in, h_out)
            add("attn_", index, h_in, h_mid)
            add("mlp_", index, h_mid, h_out)

        return hook

    handles = [
        handle
        for index, layer in enumerate(layers)
        for handle in (
            layer.self_attn.register_forward_hook(keep_attention(index)),
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
    for part in PARTS:
        columns[f"{part}block_influence"] = (1.0 - sums[(part, "cos")] / tokens).cpu().numpy()
        columns[f"{part}angular_distance"] = (sums[(part, "angle")] / tokens).cpu().numpy()
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
