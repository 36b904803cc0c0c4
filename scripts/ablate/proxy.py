"""Layer-importance proxies from forward passes of the unablated model (no ablation runs).

For decoder layer l with input h_in and output h_out at a token:

* block influence (ShortGPT, Men et al. 2024): 1 − mean cos(h_in, h_out);
* angular distance (Gromov et al. 2024, block size n = 1): mean arccos(cos(h_in, h_out)) / π;

both averaged over every non-padding token of every prompt. For multi-layer removal,
:func:`block_distances` gives Gromov et al.'s angular distance between the input of layer l and
that of layer l + n (the output of the last layer for l + n = L) for every block, at each
prompt's last token as they measure it, averaged over prompts; :func:`resolved_units` turns the
units of a proxy-ordered removal sweep into the layer sets these files pick. A high value means the layer
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
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ablate.ablations import Ablation, resolved
from ablate.anatomy import Anatomy
from ablate.paths import BLOCK_DISTANCES, PROXIES
from ablate.proxy_files import read_block_distances, read_proxies

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


def block_distances(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> pd.DataFrame:
    """Mean angular distance arccos(cos(x_l, x_{l+n})) / π over prompts, at each prompt's last
    token, between the residual stream entering layer l and the one entering layer l + n
    (leaving the last layer for l + n = L): columns start, size, angular_distance, one row per
    contiguous block of 1..L layers."""
    anatomy = Anatomy.of(model)
    layers = anatomy.blocks(model)
    count = len(layers)
    device = next(model.parameters()).device
    sums = torch.zeros(count + 1, count + 1, dtype=torch.float64, device=device)
    states: list[torch.Tensor] = []
    prompts = 0

    def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
        states.append((args[0] if args else kwargs["hidden_states"])[rows, last].double())

    def keep_output(module: nn.Module, args: tuple, output) -> None:
        states.append(
            (output if isinstance(output, torch.Tensor) else output[0])[rows, last].double()
        )

    handles = [layer.register_forward_pre_hook(keep, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(keep_output))
    try:
        with torch.no_grad():
            for input_ids, attention_mask in batches:
                rows = torch.arange(len(input_ids), device=device)
                last = (attention_mask.sum(dim=1) - 1).to(device)
                states.clear()
                model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                      use_cache=False)  # fmt: skip
                unit = nn.functional.normalize(torch.stack([s.to(device) for s in states]), dim=-1)
                cos = torch.einsum("ipd,jpd->ijp", unit, unit).clamp(-1.0, 1.0)
                sums += (torch.arccos(cos) / math.pi).sum(dim=-1)
                prompts += len(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    if prompts == 0:
        raise ValueError("no prompts in the batches")
    rows_out = [
        {
            "start": start,
            "size": size,
            "angular_distance": float(sums[start, start + size]) / prompts,
        }
        for size in range(1, count + 1)
        for start in range(count - size + 1)
    ]
    return pd.DataFrame(rows_out)


def resolved_units(units: list[Ablation], baseline_dir: Path, num_layers: int) -> list[Ablation]:
    """Units as they run: a proxy-ordered layer_set becomes the layer set that the baseline's
    proxies (in ``baseline_dir``, validated for a model of ``num_layers`` layers) pick; the
    others stay as they are."""
    if all(unit.order is None for unit in units):
        return units
    influence = read_proxies(baseline_dir / PROXIES, num_layers)["block_influence"]
    distance = read_block_distances(baseline_dir / BLOCK_DISTANCES, num_layers)
    return [resolved(unit, influence.tolist(), distance) for unit in units]


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
