"""FIANet's text side: the BERT encoder's configuration, its masked pass as upstream runs it
(additive ``-10000`` mask), the three-pass features and the WordPiece vocabulary.

transformers is imported where a BERT is built: measured here with torch already loaded,
its BERT classes take 6.7 s to import, and :mod:`rsvl.models.registry` imports every family
when ``rsvl`` starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache
from torch import Tensor, nn

from rsvl.errors import CheckpointMismatchError, WeightsNotFoundError
from rsvl.models.fianet.cards import BERT_VOCAB_URL
from rsvl.models.fianet.config import FianetConfig

#: BERT's additive mask value in the transformers 3.0.2 copy that LAVT / FIANet vendor
BERT_MASK_VALUE = -10000.0
VOCAB_FILENAME = "vocab.txt"


@dataclass
class TextFeatures:
    """The three BERT passes: features (B, C, N) and masks (B, N, 1) as floats."""

    l: Tensor  # noqa: E741 - upstream's name
    l_mask: Tensor
    t: Tensor
    t_mask: Tensor
    p: Tensor
    p_mask: Tensor


def bert_config(cfg: FianetConfig) -> Any:
    from transformers import BertConfig  # lazy: 6.7 s measured (see the module docstring)

    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.text_hidden_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        intermediate_size=cfg.text_intermediate_size,
        max_position_embeddings=cfg.text_max_positions,
        type_vocab_size=cfg.text_type_vocab_size,
        hidden_dropout_prob=cfg.text_dropout,
        attention_probs_dropout_prob=cfg.text_dropout,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
    )


def masked_bert(bert: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """Word states of one BERT pass with ``mask`` applied as upstream's BERT does."""
    emb = bert.embeddings(input_ids=ids)
    additive = (1.0 - mask[:, None, None, :].to(emb.dtype)) * BERT_MASK_VALUE
    return bert.encoder(emb, attention_mask=additive).last_hidden_state


def read_vocab(path: str | Path) -> dict[str, int]:
    """A BERT ``vocab.txt`` (one token per line, id = line number) as a dict."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / VOCAB_FILENAME
    if not p.is_file():
        raise WeightsNotFoundError(
            f"BERT vocabulary not found: {p}",
            hint=f"Download bert-base-uncased's vocab.txt ({BERT_VOCAB_URL}) and place it there.",
        )
    vocab: dict[str, int] = {}
    with open(p, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            vocab.setdefault(line.rstrip("\n"), i)
    if not vocab:
        raise WeightsNotFoundError(f"{p} is empty.", hint=f"Use bert-base-uncased's vocab.txt ({BERT_VOCAB_URL}).")
    return vocab


def hf_cached_vocab() -> Path | None:
    """bert-base-uncased's ``vocab.txt`` if the Hugging Face cache already holds it (no
    network)."""
    for repo in ("google-bert/bert-base-uncased", "bert-base-uncased"):
        try:
            found = try_to_load_from_cache(repo, VOCAB_FILENAME)
        except Exception:  # a malformed cache must not break tokenizing
            continue
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def wordpiece_tokenizer(vocab: str | Path, vocab_size: int) -> Any:
    """A lower-casing BERT WordPiece tokenizer over ``vocab`` (which must fit ``vocab_size``)."""
    from transformers import BertTokenizer  # lazy: 6.7 s measured (see the module docstring)

    words = read_vocab(vocab)
    if len(words) > vocab_size:
        raise CheckpointMismatchError(
            f"{vocab} has {len(words)} tokens but the text encoder embeds {vocab_size}.",
            hint="Use the vocab.txt of the BERT the model was trained from (bert-base-uncased).",
        )
    return BertTokenizer(vocab=words, do_lower_case=True)


__all__ = [
    "BERT_MASK_VALUE",
    "VOCAB_FILENAME",
    "TextFeatures",
    "bert_config",
    "hf_cached_vocab",
    "masked_bert",
    "read_vocab",
    "wordpiece_tokenizer",
]
