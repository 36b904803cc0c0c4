"""The GPU path, proven on the paper models' exact shapes with random weights: no network, no
download, no lm-eval (a GPU host may have only torch and transformers).

    python -m ablate.gpu_check [--out gpu_check.json]        # make gpu-check: one GPU, bf16
    python -m ablate.gpu_check --device cpu --tiny --kernels sdpa   # what the CPU test runs

For each shape (``shapes/<name>.json``: Llama-3.1-8B and Qwen3-8B) the model is built with random
weights on the device, then per attention kernel (sdpa's 4D masks; flex_attention's block masks)
and request shape (MMLU-like: a 128-token context and four one-token letters; HellaSwag-like: 64
tokens and four 32-token endings) at the config's batch size:

* **exact**: the shared-prefix sweep (base and nine units of eight kinds in one pass) against
  one plain forward per unit with the ablation's hooks, each option a full sequence (lm-eval's
  way): the largest log-likelihood difference per continuation token, and greedy flags that
  differ where the plain forward's margin between its best token and the next one exceeds the
  tolerance;
* **speed**: plain-forward prefill tokens per second (the model's forward alone), and the
  sweep's seconds over a whole layer sweep against one plain forward per layer;
* **memory**: peak device memory.

The JSON written holds each measurement and ``rates``: seconds per (token x billion parameters) of
HF prefill on this device, which the planner reads as its calibration (ablate.cost). It exits 1
when a check fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ablate.ablations import Ablation, ablated, weight_edits
from ablate.anatomy import Anatomy
from ablate.sweep import sweep_loglikelihoods

SHAPES_DIR = Path(__file__).parent / "shapes"
SHAPES = ("llama31_8b", "qwen3_8b")
# (context tokens, options, tokens per option), as the paper's log-likelihood tasks count them.
REQUEST_SHAPES = {"mmlu": (128, 4, 1), "hellaswag": (64, 4, 32)}
BATCH_SIZE = 32  # config.yaml's log-likelihood tasks
# bf16 keeps 8 bits of mantissa: a log-probability near -12 moves by up to ~0.05 when the same
# sums are added in another order (shared prefix vs full sequence); float32 moves by ~1e-5.
TOLERANCE = {torch.bfloat16: 0.1, torch.float32: 1e-4}
UNITS = ("layer0", "layer{mid}", "layer{last}", "attn{mid}", "mlp{mid}", "head{mid}.0",
         "kvgroup{mid}.0", "oproj{mid}_from_perturbed", "layerswap{mid}_from_perturbed")  # fmt: skip


def build(shape: str, tiny: bool, dtype: torch.dtype, device: str, attention: str):
    """Random-weight model of ``shape`` (``tiny``: 4 layers, width 256, vocabulary 4096)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = json.loads((SHAPES_DIR / f"{shape}.json").read_text())
    if tiny:
        settings |= {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                     "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
                     "vocab_size": 4096, "bos_token_id": 0, "eos_token_id": 1}  # fmt: skip
    # Weights of std 2/sqrt(width): a unit-RMS input gives projections of RMS 2 at any width, so
    # every layer moves the residual stream (and the log-probabilities) as a trained one does.
    settings["initializer_range"] = 2 / settings["hidden_size"] ** 0.5
    config = AutoConfig.for_model(**settings)
    config._attn_implementation = attention
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def requests(shape: tuple[int, int, int], documents: int, vocab: int, seed: int):
    """Random-token requests: per document one context and its options."""
    context_len, options, option_len = shape
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(documents):
        context = torch.randint(vocab, (context_len,), generator=generator).tolist()
        for _ in range(options):
            option = torch.randint(vocab, (option_len,), generator=generator).tolist()
            out.append((tuple(context), tuple(option)))
    return out


@torch.no_grad()
def with_greedy_options(model, batch, options: int):
    """Every other document's first option replaced by the model's own greedy continuation, so
    greedy flags are compared where they are true as well as false."""
    out = list(batch)
    for index in range(0, len(batch), 2 * options):
        context, option = batch[index]
        ids = torch.tensor([context], device=model.device)
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=len(option), min_new_tokens=len(option))  # fmt: skip
        out[index] = (context, tuple(generated[0, len(context) :].tolist()))
    return out


@torch.no_grad()
def forward(model, batch: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> torch.Tensor:
    """Logits of one full right-padded sequence per option (lm-eval's way)."""
    rows = [list(context + option)[:-1] for context, option in batch]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=model.device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
    return model(input_ids=ids, attention_mask=mask).logits


def plain(model, batch: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]):
    """Per request: log-likelihood, greedy flag and smallest best-vs-next margin."""
    device = model.device
    log_probs = F.log_softmax(forward(model, batch).float(), dim=-1)
    out = []
    for row, (context, option) in enumerate(batch):
        positions = torch.arange(len(context) - 1, len(context) - 1 + len(option), device=device)
        scores = log_probs[row, positions]
        targets = torch.tensor(option, device=device)
        top2 = scores.topk(2, dim=-1).values
        hits = scores.gather(1, targets[:, None])[:, 0]
        out.append((float(hits.sum()), bool((hits == top2[:, 0]).all()),
                    float((top2[:, 0] - top2[:, 1]).min())))  # fmt: skip
    return out


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def exactness(model, anatomy: Anatomy, units, source, batch, tolerance: float) -> dict[str, Any]:
    """The sweep of ``units`` against one plain forward per unit, with the hooks."""
    base = plain(model, batch)
    swept = sweep_loglikelihoods(model, batch, units, source, BATCH_SIZE, 4096, torch.float32)
    worst, flips = 0.0, 0
    effects = {}  # per unit: what a sweep that ignored it would be off by
    for unit in units:
        with ablated(model, unit, source, anatomy):
            reference = base if unit.kind == "base" else plain(model, batch)
        for (ll, greedy, margin), (got, got_greedy), (_, option) in zip(
            reference, swept[unit.id], batch, strict=True
        ):
            worst = max(worst, abs(ll - got) / len(option))
            flips += greedy != got_greedy and margin > tolerance
        effects[unit.id] = max(abs(r[0] - b[0]) / len(o)
                               for r, b, (_, o) in zip(reference, base, batch, strict=True))  # fmt: skip
    greedy_options = sum(greedy for _, greedy, _ in base)
    layer_effect = min(e for u, e in effects.items() if Ablation.parse(u).kind == "layer")
    return {
        "max_loglik_diff_per_token": worst,
        "greedy_flips_beyond_tolerance": flips,
        "greedy_options_of_base": greedy_options,
        "unit_effects_per_token": effects,
        # The check has power: skipping any layer moves a log-likelihood beyond tolerance.
        "exact": worst <= tolerance < layer_effect and flips == 0 and greedy_options > 0,
    }


def speed(model, anatomy: Anatomy, batch, device: str) -> dict[str, Any]:
    """A whole layer sweep: the sweep's seconds against one plain pass per layer."""
    units = [Ablation.parse(f"layer{i}") for i in range(anatomy.arch.num_layers)]
    warm = batch[:BATCH_SIZE]  # kernels compiled and tuned (flex attention) outside the timing
    sweep_loglikelihoods(model, warm, units[:2], None, BATCH_SIZE, 4096, torch.float32)
    forward(model, warm)
    _, sweep_s = timed(
        lambda: sweep_loglikelihoods(model, batch, units, None, BATCH_SIZE, 4096, torch.float32),
        device,
    )
    per_unit_s = 0.0
    for unit in units:
        with ablated(model, unit, anatomy=anatomy):
            for chunk in chunks(batch, BATCH_SIZE):
                per_unit_s += timed(lambda chunk=chunk: forward(model, chunk), device)[1]
    tokens = sum(len(context) + len(option) - 1 for context, option in batch)
    return {
        "prefill_tokens_per_s": round(tokens * len(units) / per_unit_s),
        "sweep_over_per_unit_forwards": round(sweep_s / per_unit_s, 3),
    }


def check_shape(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    model = build(shape, args.tiny, dtype, args.device, "sdpa")
    anatomy = Anatomy.of(model)
    layers = anatomy.arch.num_layers
    params_b = sum(p.numel() for p in model.parameters()) / 1e9
    units = [Ablation.parse("base")] + [
        Ablation.parse(u.format(mid=layers // 2, last=layers - 1)) for u in UNITS
    ]
    source = {  # a source model of the same shapes: this model's tensors, perturbed
        edit.key: model.get_parameter(edit.key) * 1.01
        for unit in units
        for edit in weight_edits(unit, anatomy)
        if edit.from_source
    }
    result: dict[str, Any] = {"params_b": round(params_b, 3), "layers": layers, "kernels": {}}
    batches = {}
    for name, request_shape in REQUEST_SHAPES.items():
        batch = requests(request_shape, args.documents, model.config.vocab_size, seed=1)
        batches[name] = with_greedy_options(model, batch, request_shape[1])
    for kernel in args.kernels:  # the sweep shares contexts under each (ablate.sweep)
        model.set_attn_implementation(kernel)
        tasks = result["kernels"][kernel] = {}
        for name, batch in batches.items():
            tasks[name] = exactness(model, anatomy, units, source, batch, TOLERANCE[dtype])
            tasks[name] |= speed(model, anatomy, batch, args.device)
    if args.device.startswith("cuda"):
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    slowest = min(task["prefill_tokens_per_s"] for task in result["kernels"]["sdpa"].values())
    result["prefill_s_per_token_b"] = 1 / (params_b * slowest)  # the workflow's default kernel
    return result


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="4 layers, width 256 (CPU test)")
    parser.add_argument("--kernels", nargs="+", default=["sdpa", "flex_attention"],
                        choices=["sdpa", "flex_attention"],
                        help="attention kernels (flex_attention: GPU only, see ablate.config)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (--device cpu runs the same code on the CPU)")
    if not args.device.startswith("cuda") and "flex_attention" in args.kernels:
        sys.exit("gpu_check: flex_attention is checked on the GPU only (--kernels sdpa on cpu)")
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else platform.processor() or "cpu")  # fmt: skip
    report: dict[str, Any] = {
        "device": device_name, "dtype": args.dtype, "tiny": args.tiny,
        "torch": torch.__version__, "shapes": {},
    }  # fmt: skip
    for shape in args.shapes:
        report["shapes"][shape] = check_shape(shape, args)
        print(shape, json.dumps(report["shapes"][shape]), flush=True)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    report["rates"] = {  # the planner's calibration: the slowest shape's prefill
        f"{kind}/hf/prefill": max(s["prefill_s_per_token_b"] for s in report["shapes"].values())
    }
    args.out.write_text(json.dumps(report, indent=1))
    failed = [f"{shape} {kernel} {task}" for shape, result in report["shapes"].items()
              for kernel, tasks in result["kernels"].items()
              for task, checks in tasks.items() if not checks["exact"]]  # fmt: skip
    if failed:
        sys.exit(f"gpu_check: the sweep differs from plain forwards beyond tolerance: {failed}")
    print(f"gpu_check: every shape exact; written {args.out}")


if __name__ == "__main__":
    main()
