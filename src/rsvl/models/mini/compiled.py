"""The built-in models' frozen towers compiled once into rsvl's cache, so later loads of
mini-clip and mini-refer import neither timm nor transformers.

Measured with ``python -X importtime``: importing timm brings torchvision and torch._dynamo,
and transformers' BERT module brings its generation and kernel machinery; together they were
most of a mini-clip load after torch itself (``BENCHMARKS.md``). The towers never train in
mini-clip, so the first load builds them as usual (timm's EfficientNet-Lite0 with the
BatchNorms folded, transformers' MiniLM), checks a TorchScript version of each against them,
and writes it under ``$RSVL_CACHE/compiled/``; later loads read those archives with
``torch.jit.load`` and tokenise with the ``tokenizers`` library (the Rust tokenizer behind
transformers' fast tokenizers, reading MiniLM's own ``tokenizer.json``).

* Image tower: ``torch.jit.script`` of the fused :class:`~rsvl.models.mini.towers.Lite0Tower`
  (any input size, as the eager tower).
* Text tower: ``torch.jit.trace`` of MiniLM's BERT on a padded batch; before it is cached
  its word states must equal the eager model's (max abs diff <= 1e-5) on other batch sizes,
  lengths and padding, and :class:`FastTokenizer` must give transformers' ids and masks.

mini-clip uses both (``lite0-head`` and ``minilm``); mini-refer uses ``lite0-block6`` and the
same MiniLM archive.

The folder name holds a key of everything the archives depend on (torch, timm,
transformers and rsvl versions, the size and time of both weight files, :data:`FORMAT`);
when one changes, the next load compiles again. Archives are written under a temporary name
and renamed when complete. An archive that does not load (truncated, another torch) is
rebuilt, with a log message. ``RSVL_COMPILED_TOWERS=0`` turns the cache off (eager towers
on every load).

These archives are rsvl's own files in the user's cache, never a user-supplied checkpoint:
rsvl still refuses TorchScript archives given as ``--weights``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from rsvl.errors import RsvlError
from rsvl.models.mini.towers import MiniLMTower, lite0_weights_path, mean_pool, minilm_path
from rsvl.models.weights import cache_root

log = logging.getLogger(__name__)

#: bump when what is compiled changes in a way the versions in the key do not show
FORMAT = 1

#: sentences of other lengths and batch sizes the traced text tower must reproduce
_CHECK_TEXTS = (
    ["farmland"],
    ["a satellite image of a dense residential area", "river", "an airport with many airplanes next to a "
     "large parking lot and a highway interchange, seen from above in summer"],
    ["Überschwemmung: ein Fluss", "ships in a harbour", "3 storage tanks", "x"],
)


def enabled() -> bool:
    """False when ``RSVL_COMPILED_TOWERS`` is set to 0 / false / no / off."""
    return os.environ.get("RSVL_COMPILED_TOWERS", "1").strip().lower() not in {"0", "false", "no", "off"}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def cache_key() -> str:
    """A short hash of everything the compiled towers depend on."""
    parts = [f"format={FORMAT}", f"rsvl={_version('rsvl')}", f"torch={torch.__version__}",
             f"timm={_version('timm')}", f"transformers={_version('transformers')}"]
    for path in (lite0_weights_path(), minilm_path() / "model.safetensors", minilm_path() / "tokenizer.json"):
        st = path.stat()
        parts.append(f"{path.name}={st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_folder() -> Path:
    return cache_root() / "compiled" / f"mini-towers-{cache_key()}"


def _word_states(out: object) -> torch.Tensor:
    """The traced BERT's output (a dict when traced with ``strict=False``) -> (B, L, D)."""
    return out["last_hidden_state"] if isinstance(out, dict) else out[0]


class WordStates(NamedTuple):
    """What mini-refer reads from a BERT call (``.last_hidden_state``), as transformers' output."""

    last_hidden_state: torch.Tensor


class TracedBert(nn.Module):
    """The traced MiniLM BERT, called as transformers' ``BertModel`` is by rsvl's models."""

    def __init__(self, traced: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.traced = traced

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> WordStates:
        return WordStates(_word_states(self.traced(input_ids, attention_mask)))


class FastTokenizer:
    """MiniLM's ``tokenizer.json`` in the ``tokenizers`` library, called as transformers'
    tokenizer is by rsvl's models (``padding`` True / "longest" / "max_length", truncation
    to ``max_length``, ``return_tensors="pt"``); the same ids and masks (tested)."""

    def __init__(self, tokenizer_file: Path) -> None:
        from tokenizers import Tokenizer  # lazy: only on this path (Rust, fast to import)

        self._tok = Tokenizer.from_file(str(tokenizer_file))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.pad_id = self._tok.token_to_id("[PAD]") or 0
        self.vocab_size = self._tok.get_vocab_size()

    def __call__(self, texts: list[str], padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = "pt") -> dict[str, torch.Tensor]:
        enc = self._tok.encode_batch(list(texts))
        rows = [(e.ids, e.attention_mask) for e in enc]
        if truncation and max_length is not None:
            # keep [CLS] ... and end with [SEP], as transformers truncates a single sequence
            rows = [(ids[: max_length - 1] + ids[-1:], m[: max_length - 1] + m[-1:]) if len(ids) > max_length
                    else (ids, m) for ids, m in rows]
        if padding == "max_length" and max_length is not None:
            width = max_length
        elif padding:
            width = max(len(ids) for ids, _ in rows)
        else:
            width = None
        if width is None:
            if len({len(ids) for ids, _ in rows}) > 1:
                raise ValueError("sequences of different lengths need padding")
            width = len(rows[0][0])
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, m) in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(m)] = torch.tensor(m, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask}


class CompiledTextTower(nn.Module):
    """MiniLM from the traced BERT and :class:`FastTokenizer`: called on strings it returns
    the same mean-pooled (B, 384) embeddings as :class:`MiniLMTower`."""

    dim = 384

    def __init__(self, bert: TracedBert, tokenizer: FastTokenizer, max_length: int = 128) -> None:
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        self.max_length = max_length

    def train(self, mode: bool = True) -> CompiledTextTower:  # frozen, as MiniLMTower
        return super().train(False)

    @torch.inference_mode()
    def forward(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=self.max_length)
            hidden = self.bert(tok["input_ids"], tok["attention_mask"]).last_hidden_state
            out.append(mean_pool(hidden, tok["attention_mask"]))
        return torch.cat(out)


def _atomic_save(module: torch.jit.ScriptModule, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        torch.jit.save(module, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a.numel() == 0 or float((a - b).abs().max()) <= 1e-5)


def _compile_image(path: Path, tower: nn.Module) -> None:
    with torch.inference_mode():
        scripted = torch.jit.script(tower)
        x = torch.randn(2, 3, 72, 104)
        if not all(_close(a, b) for a, b in zip(tower(x), scripted(x), strict=True)):
            raise RuntimeError("the scripted image tower differs from the eager one")
    _atomic_save(scripted, path)


def _compile_text(path: Path) -> None:
    eager = MiniLMTower()
    tok = eager.tokenizer(["a satellite image of farmland", "river"], padding=True, return_tensors="pt")
    with torch.inference_mode(), warnings.catch_warnings():
        # the tracer warns about shape-dependent branches in the mask code; the checks below
        # run other batch sizes, lengths and padding through the trace instead
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(eager.bert, (tok["input_ids"], tok["attention_mask"]), strict=False,
                                 check_trace=False)
    fast = FastTokenizer(minilm_path() / "tokenizer.json")
    with torch.inference_mode():
        for texts in _CHECK_TEXTS:
            for kw in ({"padding": True}, {"padding": "max_length", "max_length": 20}):
                ref = eager.tokenizer(texts, truncation=True, return_tensors="pt",
                                      **{"max_length": eager.max_length, **kw})
                got = fast(texts, truncation=True, **{"max_length": eager.max_length, **kw})
                if not all(torch.equal(got[k], ref[k]) for k in ("input_ids", "attention_mask")):
                    raise RuntimeError("tokenizers and transformers tokenise differently")
                a = eager.bert(input_ids=got["input_ids"], attention_mask=got["attention_mask"]).last_hidden_state
                if not _close(a, _word_states(traced(got["input_ids"], got["attention_mask"]))):
                    raise RuntimeError("the traced text tower differs from the eager one")
    _atomic_save(traced, path)


def _cached(path: Path, compile_fn, load_fn, what: str):
    """``load_fn(path)``, compiling first (``compile_fn(path)``) when missing or broken; None
    when the cache is off or compiling fails."""
    if not enabled():
        return None
    with warnings.catch_warnings():
        # torch 2.9+ marks TorchScript deprecated (FutureWarning on every jit call); should a
        # later torch drop it, loading or compiling fails here and the eager towers are used
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        return _cached_inner(path, compile_fn, load_fn, what)


def _cached_inner(path: Path, compile_fn, load_fn, what: str):
    if path.is_file():
        try:
            return load_fn(path)
        except Exception as exc:  # noqa: BLE001 - a broken cache entry is rebuilt, not fatal
            log.warning("compiled %s in %s did not load (%s: %s); compiling it again.", what, path,
                        type(exc).__name__, exc)
            path.unlink(missing_ok=True)
    failed = path.with_name(path.name + ".failed")
    if failed.is_file():  # compiling failed before with these versions and weights: not again
        log.warning("%s: compiling failed before (%s), so it runs uncompiled (slower to load); "
                    "delete that file to try again.", what, failed)
        return None
    try:
        compile_fn(path)
        return load_fn(path)
    except RsvlError:  # the user's input (weights that do not fit...): theirs to fix, not a cache failure
        raise
    except Exception as exc:  # noqa: BLE001 - the eager towers are always there
        log.warning("could not compile %s into %s (%s: %s); using it uncompiled. Delete %s to try again.",
                    what, path, type(exc).__name__, exc, failed)
        path.unlink(missing_ok=True)
        try:  # every later load would pay the failed attempt (up to ~15 s) again otherwise
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{type(exc).__name__}: {exc}\n")
        except OSError:
            pass
        return None


def compiled_image_tower(variant: str, build: Callable[[], nn.Module]) -> nn.Module | None:
    """A frozen Lite0 tower (``variant`` names its shape: ``"lite0-head"`` for mini-clip,
    ``"lite0-block6"`` for mini-refer) from the cache, scripted from ``build()`` (the fused
    eager tower) the first time. None: use the eager tower."""
    def load(path: Path) -> nn.Module:
        return torch.jit.load(str(path), map_location="cpu").to(memory_format=torch.channels_last).eval()

    return _cached(cache_folder() / f"{variant}.ts", lambda path: _compile_image(path, build()), load,
                   f"the {variant} image tower")


def compiled_minilm() -> tuple[TracedBert, FastTokenizer] | None:
    """MiniLM's BERT (traced) and tokenizer without transformers; None: use the eager ones."""
    def load(path: Path) -> tuple[TracedBert, FastTokenizer]:
        bert = TracedBert(torch.jit.load(str(path), map_location="cpu").eval())
        return bert, FastTokenizer(minilm_path() / "tokenizer.json")

    return _cached(cache_folder() / "minilm.ts", _compile_text, load, "the MiniLM text tower")


__all__ = [
    "FORMAT",
    "CompiledTextTower",
    "FastTokenizer",
    "TracedBert",
    "WordStates",
    "cache_folder",
    "cache_key",
    "compiled_image_tower",
    "compiled_minilm",
    "enabled",
]
