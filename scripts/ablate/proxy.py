"""Layer-importance proxies from forward passes of the unablated model (no ablation runs).

For decoder layer l with input h_in and output h_out at a token:

* block influence (ShortGPT, Men et al. 2024): 1 − mean cos(h_in, h_out);
* angular distance (Gromov et al. 2024, block size n = 1): mean arccos(cos(h_in, h_out)) / π;

both averaged over every non-padding token of every prompt. A high value means the layer
changes the residual stream a lot, i.e. it should matter more when skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import pandas as pd
import torch
from torch import nn

from ablate.ablations import decoder_layers


def layer_proxies(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> pd.DataFrame:
    """Block influence and angular distance of every decoder layer (columns layer, block_influence,
    angular_distance), from one forward pass per (input_ids, attention_mask) batch.

    Layer inputs and outputs are captured by forward hooks; only float64 running sums are kept.
    """
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    cos_sum = torch.zeros(len(layers), dtype=torch.float64, device=device)
    angle_sum = torch.zeros(len(layers), dtype=torch.float64, device=device)
    tokens = 0

    def capture(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output if isinstance(output, torch.Tensor) else output[0]
            cos = nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
            cos = cos[mask.to(cos.device)]  # layers may sit on other devices than the embedding
            cos_sum[index] += cos.sum().to(device)
            angle_sum[index] += (torch.arccos(cos.clamp(-1.0, 1.0)).sum() / math.pi).to(device)

        return hook

    handles = [
        layer.register_forward_hook(capture(index), with_kwargs=True)
        for index, layer in enumerate(layers)
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
    return pd.DataFrame(
        {
            "layer": range(len(layers)),
            "block_influence": (1.0 - cos_sum / tokens).cpu().numpy(),
            "angular_distance": (angle_sum / tokens).cpu().numpy(),
        }
    )


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
