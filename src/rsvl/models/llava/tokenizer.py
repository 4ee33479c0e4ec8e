"""LLaMA's SentencePiece BPE tokenizer, read from ``tokenizer.model`` without the
``sentencepiece`` package.

VHM and GeoChat ship only ``tokenizer.model`` (no ``tokenizer.json``) and both upstream
loaders use the slow (SentencePiece) tokenizer. transformers needs the ``sentencepiece``
package to convert that file; this module reads the protobuf itself (the few fields BPE
needs) and applies SentencePiece's BPE rule: normalise (spaces -> "▁", a "▁" prefix), start
from characters, repeatedly merge the adjacent pair whose merged piece has the highest score
(leftmost on ties), and spell what remains outside the vocabulary as ``<0xXX>`` byte pieces.

Special tokens written in the text (``</s>`` closing an earlier answer in the template) are
split off first and each text segment is encoded on its own, as the slow LLaMA tokenizer
(``legacy=True``, the behaviour of the LLaVA era) does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from rsvl.errors import CheckpointMismatchError, InputNotFoundError

#: SentencePiece piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
#: SentencePiece model types
UNIGRAM, BPE = 1, 2
SPACE = "▁"


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, object]]:
    """(field number, wire type, value) of one protobuf message, in order."""
    out: list[tuple[int, int, object]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((num, wire, value))
        elif wire == 1:
            out.append((num, wire, buf[pos : pos + 8]))
            pos += 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("truncated field")
            out.append((num, wire, buf[pos : pos + size]))
            pos += size
        elif wire == 5:
            out.append((num, wire, buf[pos : pos + 4]))
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


@dataclass
class SentencePieceBPE:
    """A SentencePiece BPE vocabulary with LLaMA's encode / decode behaviour."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    byte_fallback: bool = True
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    #: texts that map to one id whatever surrounds them (control tokens, added tokens)
    specials: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vocab = {
            p: i for i, p in enumerate(self.pieces) if self.types[i] in (NORMAL, USER_DEFINED)
        }
        self.byte_ids = {
            int(p[3:5], 16): i
            for i, p in enumerate(self.pieces)
            if self.types[i] == BYTE and len(p) == 6
        }
        if not self.specials:
            self.specials = {p: i for i, p in enumerate(self.pieces) if self.types[i] == CONTROL}
            self.specials[self.pieces[self.unk_id]] = self.unk_id

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceBPE:
        """Read a ``tokenizer.model`` (SentencePiece ModelProto)."""
        p = Path(path)
        if not p.is_file():
            raise InputNotFoundError(
                f"Tokenizer file {p} does not exist.",
                hint="Place the model's tokenizer.model next to its config.json.",
            )
        try:
            return cls.from_bytes(p.read_bytes())
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            raise CheckpointMismatchError(
                f"{p} is not a SentencePiece model ({exc}).",
                hint="Use the tokenizer.model of the model's Hugging Face repository.",
            ) from exc

    @classmethod
    def from_bytes(cls, data: bytes) -> SentencePieceBPE:
        pieces: list[str] = []
        scores: list[float] = []
        types: list[int] = []
        spec: dict[int, int] = {}
        norm: dict[int, int] = {}
        for num, wire, value in _fields(data):
            if num == 1 and wire == 2:
                piece, score, kind = "", 0.0, NORMAL
                for n, w, v in _fields(value):  # type: ignore[arg-type]
                    if n == 1 and w == 2:
                        piece = bytes(v).decode("utf-8")  # type: ignore[arg-type]
                    elif n == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]  # type: ignore[arg-type]
                    elif n == 3 and w == 0:
                        kind = int(v)  # type: ignore[arg-type]
                pieces.append(piece)
                scores.append(score)
                types.append(kind)
            elif num == 2 and wire == 2:
                spec = {n: int(v) for n, w, v in _fields(value) if w == 0}  # type: ignore[arg-type]
            elif num == 3 and wire == 2:
                norm = {n: int(v) for n, w, v in _fields(value) if w == 0}  # type: ignore[arg-type]
        if not pieces:
            raise ValueError("no vocabulary pieces")
        if spec.get(3, UNIGRAM) != BPE:
            raise ValueError("only BPE SentencePiece models (LLaMA's) are supported")
        return cls(
            pieces=pieces,
            scores=scores,
            types=types,
            byte_fallback=bool(spec.get(35, 0)),
            add_dummy_prefix=bool(norm.get(3, 1)),
            remove_extra_whitespaces=bool(norm.get(4, 1)),
            unk_id=spec.get(40, 0),
            bos_id=spec.get(41, 1),
            eos_id=spec.get(42, 2),
        )

    def __len__(self) -> int:
        return len(self.pieces)

    # ------------------------------------------------------------------ encode

    def encode_piece_ids(self, text: str) -> list[int]:
        """SentencePiece ``encode(text)`` of one segment (no BOS, no special tokens)."""
        if self.remove_extra_whitespaces:
            text = " ".join(text.split())
        if not text:
            return []
        norm = text.replace(" ", SPACE)
        if self.add_dummy_prefix:
            norm = SPACE + norm
        symbols = list(norm)
        while len(symbols) > 1:
            best, best_score = -1, float("-inf")
            for i in range(len(symbols) - 1):
                idx = self.vocab.get(symbols[i] + symbols[i + 1])
                if idx is not None and self.scores[idx] > best_score:
                    best, best_score = i, self.scores[idx]
            if best < 0:
                break
            symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
        ids: list[int] = []
        for sym in symbols:
            idx = self.vocab.get(sym)
            if idx is not None:
                ids.append(idx)
            elif self.byte_fallback and self.byte_ids:
                ids.extend(self.byte_ids[b] for b in sym.encode("utf-8"))
            else:
                ids.append(self.unk_id)
        return ids

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``: special-token spellings become their ids, every text
        segment between them is encoded on its own; ``add_bos`` puts BOS first."""
        ids = [self.bos_id] if add_bos else []
        for segment, special in self._split_specials(text):
            ids.extend([special] if special is not None else self.encode_piece_ids(segment))
        return ids

    def _split_specials(self, text: str) -> list[tuple[str, int | None]]:
        out: list[tuple[str, int | None]] = []
        names = sorted(self.specials, key=len, reverse=True)
        start = pos = 0
        while pos < len(text):
            hit = next((n for n in names if n and text.startswith(n, pos)), None)
            if hit is None:
                pos += 1
                continue
            if pos > start:
                out.append((text[start:pos], None))
            out.append((hit, self.specials[hit]))
            pos += len(hit)
            start = pos
        if start < len(text):
            out.append((text[start:], None))
        return out

    # ------------------------------------------------------------------ decode

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        """Text of ``ids`` (byte pieces fused, "▁" -> space, the dummy-prefix space of the
        first piece removed, as SentencePiece decodes)."""
        out = bytearray()
        for i in ids:
            if not 0 <= i < len(self.pieces):
                continue
            kind = self.types[i]
            if kind == BYTE:
                out.append(int(self.pieces[i][3:5], 16))
            elif kind in (CONTROL, UNKNOWN):
                if not skip_special:
                    out.extend(self.pieces[i].encode("utf-8"))
            else:
                out.extend(self.pieces[i].replace(SPACE, " ").encode("utf-8"))
        text = out.decode("utf-8", errors="replace")
        if self.add_dummy_prefix and text.startswith(" "):
            text = text[1:]
        return text


__all__ = ["SentencePieceBPE"]
