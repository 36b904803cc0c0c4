"""Loading a HF checkpoint as the config selects: dtype, device placement, attention kernel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(model_dir: Path, spec: dict[str, Any]):
    """(model, tokenizer) of a checkpoint, in eval mode, placed on ``spec['device']``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": DTYPES[spec.get("dtype", "float32")]}
    if spec.get("attn_implementation"):
        kwargs["attn_implementation"] = spec["attn_implementation"]  # e.g. flash_attention_2
    check_weight_files(Path(model_dir))
    device = spec.get("device", "cpu")
    if device != "cpu":  # straight onto the GPU (auto: sharded over every visible one), not
        kwargs["device_map"] = device  # through host memory first
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def check_weight_files(model_dir: Path) -> None:
    """Raise one line naming a safetensors file that cannot be read (a download or copy cut
    short) and the fix, before transformers fails on it without a path."""
    from safetensors import safe_open

    for shard in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(shard, framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own SafetensorError
            raise RuntimeError(
                f"{shard}: unreadable checkpoint file ({error}); delete {model_dir} and rerun to "
                "fetch or convert it again"
            ) from None
