"""Reading checkpoints: one reader, one unwrapping rule, one strict load with one report.

A checkpoint is untrusted input. :func:`read_state_dict` reads ``.safetensors`` files with
safetensors and everything else with ``torch.load(weights_only=True)`` (memory-mapped where the
format allows, so a training file's optimizer state is never read into memory); nothing in a
file can run code. Upstream training files that pickle an ``argparse.Namespace`` or numpy
scalars next to the weights (FIANet, LAVT) are read with exactly those types allowed as data.

:func:`unwrap` finds the tensors inside the usual wrappers (``state_dict``, ``model``,
``module`` ...) and :func:`strip_prefixes` removes DDP / ``torch.compile`` prefixes.
:func:`check_keys` compares a state dict with a model's and raises one
:class:`~rsvl.errors.CheckpointMismatchError` naming every missing, unexpected and mis-shaped
key; :func:`load_strict` does that and then loads. Families map a published layout onto their
own key names first and pass the file's spelling of each key through ``shown`` so the report
speaks the file's language.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from rsvl.errors import CheckpointMismatchError, InputNotFoundError

#: keys under which training scripts nest the weights, tried in this order
WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model", "model_state_dict", "module")
#: prefixes added by DistributedDataParallel and torch.compile
PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
#: file names inside a Hugging Face style folder, in order of preference
FOLDER_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")


def looks_like_safetensors(path: Path) -> bool:
    """True for a ``.safetensors`` name or a file whose header is a safetensors header."""
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len < size and head[8:9] == b"{"


def _data_globals() -> list[Any]:
    """Types that upstream training files pickle as plain data next to the weights."""
    allowed: list[Any] = [argparse.Namespace, np.dtype]
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    scalar = getattr(getattr(core, "multiarray", None), "scalar", None)
    if scalar is not None:
        allowed.append(scalar)
    dtypes = getattr(np, "dtypes", None)
    allowed.extend(
        getattr(dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType") if hasattr(dtypes, n)
    )
    return allowed


def torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, memory-mapped when the format allows."""
    with torch.serialization.safe_globals(_data_globals()), warnings.catch_warnings():
        # torch warns about pickle protocols it did not write; the load itself decides
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (non-zip) serialisation cannot be mapped
                raise
        return torch.load(path, map_location="cpu", weights_only=True)


def resolve_file(path: str | Path, what: str = "Checkpoint") -> Path:
    """The checkpoint file ``path`` names: the file itself, or the weights file inside a
    Hugging Face style folder (``model.safetensors`` / ``pytorch_model.bin``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in FOLDER_FILES:
            if (p / name).is_file():
                return p / name
        raise InputNotFoundError(
            f"{what} folder {p} has no {' or '.join(FOLDER_FILES)}.",
            hint="Point at the checkpoint file itself, or at a save_pretrained folder.",
        )
    if not p.is_file():
        raise InputNotFoundError(f"{what} {p} does not exist.", hint="Check the path.")
    return p


#: what to do with a checkpoint that pickles Python objects, when its source is trusted
CONVERT_HINT = (
    "If the file comes from a source you trust, convert it once to a .safetensors file of "
    "its weights (unpickle it in your own Python, then safetensors.torch.save_file(state_dict, "
    "'model.safetensors')) and pass that file instead."
)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _torch_detail(exc: BaseException) -> str:
    """The line of torch's weights-only error that says what it met, without the advice
    around it."""
    text = str(exc)
    op = re.search(r"Unsupported operand (\d+)", text)
    if op:
        return f"pickle opcode {op.group(1)} is not accepted by the safe loader"
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)",
            "(2)", "WeightsUnpickler error: \n")
    for line in text.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(skip):
            return line[:200]
    return type(exc).__name__


def refused_objects(
    path: Path, what: str, exc: BaseException, hint: str | None = None
) -> CheckpointMismatchError:
    """The one-line error for a checkpoint that the safe (weights-only) loader refused: a
    pickle naming Python objects (classes, functions, ``__reduce__`` payloads), or bytes that
    are no checkpoint at all. torch's own multi-line text (which suggests turning the safety
    off) is not repeated."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    kind = _kind_of(path)
    if found or kind.startswith("a "):
        held = (f"Python objects ({found.group(1)}) that rsvl refuses to unpickle" if found
                else f"pickle data that rsvl refuses to unpickle ({_torch_detail(exc)})")
        return CheckpointMismatchError(
            f"{what} {path} holds {held}: rsvl loads only tensors and plain data and never "
            "executes code from a file.",
            hint=hint or CONVERT_HINT,
        )
    return CheckpointMismatchError(
        f"{what} {path} is not a PyTorch or safetensors checkpoint ({kind}: {_torch_detail(exc)}).",
        hint="Check the path; a truncated download gives this error: delete the file and "
        "download it again.",
    )


def read_file(path: str | Path, what: str = "Checkpoint", hint: str | None = None) -> Any:
    """The object stored in a checkpoint file (safetensors or safe ``torch.load``), wrappers
    and all. ``hint`` replaces the default advice for a file that pickles Python objects."""
    p = resolve_file(path, what)
    try:
        if looks_like_safetensors(p):
            return load_file(str(p), device="cpu")
        return torch_load(p)
    except pickle.UnpicklingError as exc:
        raise refused_objects(p, what, exc, hint) from exc
    except Exception as exc:  # corrupt zip, truncated download, TorchScript archive ...
        if "TorchScript" in str(exc):
            raise CheckpointMismatchError(
                f"{what} {p} is a TorchScript (JIT) archive, which rsvl does not load.",
                hint="Use the JIT-free state-dict file of the same model instead (for OpenAI "
                "CLIP: open_clip_pytorch_model.bin, which `rsvl fetch openai-vit-b16` downloads).",
            ) from exc
        raise CheckpointMismatchError(
            f"{what} {p} cannot be read ({type(exc).__name__}: {_first_line(exc)}).",
            hint="The file is probably truncated or corrupt: delete it and download it again.",
        ) from exc


def _kind_of(path: Path) -> str:
    """What a file that is not safetensors looks like, for messages."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return "unreadable"
    if not head:
        return "the file is empty"
    if head.startswith(b"PK"):
        return "a PyTorch (.pt/.bin) zip checkpoint"
    if head[:1] == b"\x80":
        return "a pickle (legacy PyTorch checkpoint)"
    return "corrupt, truncated or another format"


def read_safetensors(
    path: str | Path, what: str = "Checkpoint", hint: str | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` file (nothing else is accepted): one
    :class:`~rsvl.errors.CheckpointMismatchError` line for a pickle, a truncated file or a
    header that lies about its sizes."""
    p = resolve_file(path, what)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - no items()
    except Exception as exc:  # safetensors raises its own error types
        kind = _kind_of(p)
        detail = f"it is {kind}" if kind.startswith("a ") else f"{kind}: {_first_line(exc)}"
        raise CheckpointMismatchError(
            f"{what} {p} is not a readable safetensors file ({detail}).", hint=hint
        ) from exc
    return tensors, meta


def unwrap(
    obj: Any,
    source: str = "The checkpoint",
    *,
    wrappers: Sequence[str] = WRAPPER_KEYS,
    tolerated: Collection[str] = (),
) -> dict[str, Tensor]:
    """The flat ``{name: tensor}`` dict inside ``obj``.

    Descends through ``wrappers`` (``{'state_dict': {'model': {...}}}`` at worst) until a
    mapping of tensors is found. Non-tensor entries beside the tensors are dropped when their
    names are in ``tolerated`` (OpenAI files carry ``input_resolution`` ...) or when the
    mapping came from a wrapper; anything else is refused as "not a state dict".
    """
    nested = False
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        inner = next((obj[k] for k in wrappers if isinstance(obj.get(k), Mapping) and obj[k]), None)
        if inner is None:
            break
        obj, nested = inner, True
    if isinstance(obj, Mapping):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
        others = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
        if tensors and (nested or all(k in tolerated for k in others)):
            return tensors
        raise CheckpointMismatchError(
            f"{source} is not a state dict: top-level entries {sorted(map(str, obj))[:10]} hold "
            f"no model weights rsvl recognises (looked for a flat tensor dict or one under "
            f"{list(wrappers)}).",
        )
    raise CheckpointMismatchError(f"{source} holds a {type(obj).__name__}, not a state dict.")


def strip_prefixes(
    sd: Mapping[str, Tensor], prefixes: Sequence[str] = PREFIXES
) -> dict[str, Tensor]:
    """Remove every prefix in ``prefixes`` that all keys share, repeatedly
    (``module._orig_mod.x`` -> ``x``)."""
    out = dict(sd)
    changed = True
    while changed and out:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def read_state_dict(
    source: str | Path | Mapping[str, Any],
    what: str = "Checkpoint",
    *,
    wrappers: Sequence[str] = WRAPPER_KEYS,
    tolerated: Collection[str] = (),
    hint: str | None = None,
) -> dict[str, Tensor]:
    """Read, unwrap and de-prefix a checkpoint: a file, a Hugging Face style folder or an
    in-memory mapping. ``what`` names the file in messages ("SAM checkpoint")."""
    if isinstance(source, Mapping):
        obj, shown = source, f"The {what[:1].lower()}{what[1:]}"
    else:
        p = resolve_file(source, what)
        obj, shown = read_file(p, what, hint), f"{what} {p}"
    return strip_prefixes(unwrap(obj, shown, wrappers=wrappers, tolerated=tolerated))


def _some(items: Sequence[str], limit: int = 12) -> str:
    items = sorted(items)
    more = f", … (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def mismatch_report(
    expected: Mapping[str, Tensor],
    state_dict: Mapping[str, Tensor],
    *,
    optional: Collection[str] = (),
    shown: Callable[[str], str] = str,
) -> str:
    """"" when ``state_dict`` fits ``expected`` exactly (keys and shapes), else one sentence
    per kind of problem: missing, unexpected, mis-shaped keys, each spelled by ``shown``."""
    missing = [shown(k) for k in expected if k not in state_dict and k not in optional]
    unexpected = [shown(k) for k in state_dict if k not in expected]
    wrong = [
        f"{shown(k)}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_some(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_some(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatch(es): {_some(wrong)}")
    return "; ".join(parts)


def check_keys(
    expected: Mapping[str, Tensor],
    state_dict: Mapping[str, Tensor],
    *,
    what: str,
    optional: Collection[str] = (),
    shown: Callable[[str], str] = str,
    hint: str | None = None,
) -> None:
    """Raise :class:`~rsvl.errors.CheckpointMismatchError` unless ``state_dict`` has exactly
    the keys and shapes of ``expected`` (keys in ``optional`` may be absent).

    ``what`` starts the message ("Checkpoint x.pt does not fit model 'sam-vit-b'").
    """
    report = mismatch_report(expected, state_dict, optional=optional, shown=shown)
    if report:
        raise CheckpointMismatchError(
            f"{what}: {report}.",
            hint=hint
            or "Check that --weights points at this model's file (`rsvl models` lists each "
            "model's file), or pick the model whose architecture matches the file.",
        )


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    what: str,
    optional: Collection[str] = (),
    shown: Callable[[str], str] = str,
    hint: str | None = None,
    assign: bool = False,
) -> nn.Module:
    """:func:`check_keys`, then load every tensor (cast to the module's dtypes).

    ``optional`` keys the file lacks keep the module's values (derivable buffers such as
    ``num_batches_tracked``). With ``assign=True`` the file's tensors replace the module's
    (a model built on the meta device is materialised by the load).
    """
    expected = module.state_dict()
    check_keys(expected, state_dict, what=what, optional=optional, shown=shown, hint=hint)
    converted = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
    absent = [k for k in optional if k in expected and k not in converted]
    module.load_state_dict(converted, strict=not absent, assign=assign)
    return module
