"""The tokenizer of a LISA / FSVLM folder: LLaMA's ``tokenizer.model`` plus the tokens added
after it (``[SEG]``, the image markers), read from the folder's own files.

Upstream adds ``[SEG]`` (and ``<im_start>``/``<im_end>`` or FSVLM's
``<|im_start|>``/``<|im_end|>``) with ``tokenizer.add_tokens`` and ``save_pretrained`` writes
them to ``added_tokens.json`` (and, in newer transformers, to ``added_tokens_decoder`` in
``tokenizer_config.json``). Their ids are read from there: LISA-7B-v1 has ``[SEG]`` = 32003
of 32004 (its LLaVA base already had three added tokens), FSVLM adds three tokens to its base;
``tokenizer("[SEG]")`` can give 29871 ("▁") with some transformers releases (LISA #55), so rsvl
never tokenises the string to find the id.

Encoding follows the slow LLaMA tokenizer of LISA's era (transformers 4.31, ``legacy``): the
text is split on added tokens first and, for added tokens that are not AddedToken objects with
their own strip rules, the whitespace on both sides is stripped (``"USER: <im_start>"`` ->
``"USER:"``, ``<im_end>\\n...`` -> no newline); each remaining segment is SentencePiece-encoded
on its own (:class:`~rsvl.models.llava.tokenizer.SentencePieceBPE`). [inf: read from
transformers 4.31's ``PreTrainedTokenizer.tokenize``; LISA pins that release.]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rsvl.errors import CheckpointMismatchError, WeightsNotFoundError
from rsvl.models.llava.tokenizer import SentencePieceBPE

SEG_TOKEN = "[SEG]"


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointMismatchError(
            f"{path} is not readable JSON ({exc}).",
            hint="Copy the file again from the model's folder (tokenizer.save_pretrained writes it).",
        ) from exc


def read_added_tokens(folder: str | Path) -> dict[str, int]:
    """Added tokens (text -> id) of a Hugging Face tokenizer folder: ``added_tokens.json``
    and ``tokenizer_config.json``'s ``added_tokens_decoder`` (they must agree)."""
    root = Path(folder)
    out: dict[str, int] = {}
    path = root / "added_tokens.json"
    if path.is_file():
        data = _read_json(path)
        if not isinstance(data, dict):
            raise CheckpointMismatchError(f"{path} does not hold a JSON object of token -> id.")
        for text, idx in data.items():
            out[str(text)] = int(idx)
    cfg_path = root / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = _read_json(cfg_path)
        decoder = cfg.get("added_tokens_decoder") if isinstance(cfg, dict) else None
        for idx, entry in (decoder or {}).items():
            text = entry.get("content") if isinstance(entry, dict) else None
            if text is None:
                continue
            if text in out and out[text] != int(idx):
                raise CheckpointMismatchError(
                    f"{root}: added_tokens.json gives {text!r} id {out[text]} but "
                    f"tokenizer_config.json gives {idx}.",
                    hint="The tokenizer files come from different saves; copy both again.",
                )
            out[text] = int(idx)
    return out


@dataclass
class LisaTokenizer:
    """LLaMA SentencePiece + added tokens, with LISA-era splitting (see the module doc)."""

    base: SentencePieceBPE
    #: added token text -> id (ids at or beyond the SentencePiece vocabulary)
    added: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.base)
        # control pieces of the base (<s>, </s>, <unk>) keep their own (no strip) handling
        self.added = {t: i for t, i in self.added.items() if not (i < n and self.base.pieces[i] == t)}
        for text, idx in self.added.items():
            if idx < n:
                raise CheckpointMismatchError(
                    f"added token {text!r} has id {idx}, inside the SentencePiece vocabulary of {n}.",
                    hint="The tokenizer files do not belong together; copy the model's folder again.",
                )
        ids = sorted(self.added.values())
        if ids != list(range(n, n + len(ids))):
            raise CheckpointMismatchError(
                f"added token ids {ids} do not follow the SentencePiece vocabulary of {n} without gaps.",
                hint="The tokenizer files do not belong together; copy the model's folder again.",
            )
        self.by_id = {i: t for t, i in self.added.items()}

    @classmethod
    def from_folder(cls, folder: str | Path) -> LisaTokenizer:
        root = Path(folder)
        path = root / "tokenizer.model"
        if not path.is_file():
            raise WeightsNotFoundError(
                f"{root} has no tokenizer.model.",
                hint="Place the model's tokenizer files (tokenizer.model, added_tokens.json, "
                "tokenizer_config.json) next to its config.json.",
            )
        return cls(SentencePieceBPE.from_file(path), read_added_tokens(root))

    def __len__(self) -> int:
        return len(self.base) + len(self.added)

    @property
    def bos_id(self) -> int:
        return self.base.bos_id

    @property
    def eos_id(self) -> int:
        return self.base.eos_id

    def token_id(self, text: str) -> int:
        """The id of an added token, or a :class:`CheckpointMismatchError` naming the file."""
        if text not in self.added:
            raise CheckpointMismatchError(
                f"The tokenizer has no {text!r} token (added tokens: {sorted(self.added) or 'none'}).",
                hint="A LISA / FSVLM folder's added_tokens.json names [SEG]; check that the folder "
                "is the merged model's, not its base LLaVA's.",
            )
        return self.added[text]

    @property
    def seg_id(self) -> int:
        return self.token_id(SEG_TOKEN)

    def add_tokens(self, texts: Sequence[str]) -> list[str]:
        """Append tokens not present yet (``tokenizer.add_tokens``, as upstream's training and
        merge scripts do on the base tokenizer); returns those added."""
        new = [t for t in texts if t not in self.added and t not in self.base.specials]
        for t in new:
            idx = len(self)
            self.added[t] = idx
            self.by_id[idx] = t
        return new

    # ------------------------------------------------------------------ encode / decode

    def _split(self, text: str) -> list[tuple[str, int | None]]:
        names = sorted(self.added, key=len, reverse=True)
        parts: list[tuple[str, int | None]] = []
        start = pos = 0
        while pos < len(text):
            hit = next((n for n in names if text.startswith(n, pos)), None)
            if hit is None:
                pos += 1
                continue
            parts.append((text[start:pos], None))
            parts.append((hit, self.added[hit]))
            pos += len(hit)
            start = pos
        parts.append((text[start:], None))
        # LISA-era rule: the text on both sides of an added token loses its whitespace there
        for i, (_piece, idx) in enumerate(parts):
            if idx is None:
                continue
            left, right = parts[i - 1], parts[i + 1]
            parts[i - 1] = (left[0].rstrip(), None)
            parts[i + 1] = (right[0].lstrip(), None)
        return parts

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        for piece, idx in self._split(text):
            if idx is not None:
                ids.append(idx)
            elif piece:
                ids.extend(self.base.encode(piece, add_bos=False))
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of ``ids``; added tokens (``[SEG]``) are spelled out, with a space before when
        text precedes them (as the slow tokenizer's ``decode`` joins them)."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.by_id:
                if run:
                    out.append(self.base.decode(run, skip_special=skip_special))
                    run = []
                out.append(self.by_id[i])
            else:
                run.append(int(i))
        if run:
            out.append(self.base.decode(run, skip_special=skip_special))
        return " ".join(p.strip() for p in out if p.strip()) if len(out) > 1 else "".join(out)


__all__ = ["SEG_TOKEN", "LisaTokenizer", "read_added_tokens"]
