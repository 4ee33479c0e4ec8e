"""``rsvl.models.llava.tokenizer``: LLaMA's SentencePiece BPE read from ``tokenizer.model``,
checked against the ``tokenizers`` library configured as transformers' LLaMA conversion
does (Metaspace with a "▁" prefix, byte fallback, merges ranked by piece score)."""

from __future__ import annotations

import pytest
from models.llava.tiny import tiny_pieces, write_tokenizer
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import BPE
from transformers.utils import sentencepiece_model_pb2_new as pb

from rsvl.errors import CheckpointMismatchError
from rsvl.models.llava.prompt import build_prompt, tokenize_prompt
from rsvl.models.llava.tokenizer import SentencePieceBPE

TEXTS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: <b> ASSISTANT:",
    "\n{CLS} What is in this image? ASSISTANT:",
    "héllo wörld  two  spaces",
    "plane?road",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> SentencePieceBPE:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    write_tokenizer(path)
    return SentencePieceBPE.from_file(path)


@pytest.fixture(scope="module")
def reference() -> Tokenizer:
    pieces = tiny_pieces()
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    scores = {p: s for p, s, kind in pieces if kind == 1}
    merges = []
    for piece in sorted(scores, key=lambda p: -scores[p]):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in scores and right in scores:
                merges.append((left, right))
    ref = Tokenizer(BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True))
    ref.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always", split=False
    )
    return ref


def test_the_file_is_read_with_llama_settings(tok):
    assert len(tok) == len(tiny_pieces())
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.byte_fallback and tok.add_dummy_prefix and not tok.remove_extra_whitespaces


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_matches_the_tokenizers_library(tok, reference, text):
    assert tok.encode(text, add_bos=False) == reference.encode(text).ids


def test_newline_after_the_image_is_the_space_piece_then_byte_0x0a(tok):
    ids = tok.encode("\n{CLS} What", add_bos=False)
    assert ids[:2] == [tok.pieces.index("▁"), tok.pieces.index("<0x0A>")]  # LLaMA: 29871, 13
    # no "▁" after the newline
    assert [tok.pieces[i] for i in ids[2:]] == ["{", "C", "L", "S", "}", "▁What"]


def test_a_leading_space_gives_an_extra_space_piece_as_sentencepiece_does(tok):
    # the slow LLaMA tokenizer encodes " Hello" as [29871, 15043]; tokenizers' Metaspace
    # does not add its prefix to text that already starts with a space
    ids = tok.encode(" USER:", add_bos=False)
    assert [tok.pieces[i] for i in ids] == ["▁", "▁USER:"]


def test_llava_chunked_tokenisation_of_a_whole_prompt(tok, reference):
    prompt = build_prompt("What is in this image?", variant="vhm", task="cls")
    ids = tokenize_prompt(prompt, lambda t: tok.encode(t, add_bos=False), tok.bos_id, image_id=999)
    before, after = prompt.split("<image>")
    assert ids == [1, *reference.encode(before).ids, 999, *reference.encode(after).ids]
    at = ids.index(999)
    assert [tok.pieces[i] for i in ids[at + 1 : at + 3]] == ["▁", "<0x0A>"]
    assert ids.count(tok.bos_id) == 1


def test_special_token_spellings_become_their_ids(tok):
    ids = tok.encode("yes</s>USER:")
    assert ids[0] == tok.bos_id and tok.eos_id in ids
    after = ids[ids.index(tok.eos_id) + 1 :]
    assert after == tok.encode("USER:", add_bos=False)  # each segment gets its own "▁" prefix


@pytest.mark.parametrize("text", TEXTS[:1] + TEXTS[3:])
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_skips_control_tokens_and_fuses_bytes(tok):
    ids = tok.encode("é", add_bos=False)
    assert [tok.pieces[i] for i in ids] == ["▁", "<0xC3>", "<0xA9>"]
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "é"
    assert tok.decode(ids[:2]).endswith("\ufffd")  # half a character: the caller waits for more


def test_files_that_are_no_bpe_sentencepiece_model_are_refused(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\xff\xff\xff")
    with pytest.raises(CheckpointMismatchError, match="not a SentencePiece model"):
        SentencePieceBPE.from_file(bad)
    unigram = pb.ModelProto()
    unigram.pieces.add().piece = "<unk>"
    unigram.trainer_spec.model_type = 1
    bad.write_bytes(unigram.SerializeToString())
    with pytest.raises(CheckpointMismatchError, match="only BPE"):
        SentencePieceBPE.from_file(bad)
