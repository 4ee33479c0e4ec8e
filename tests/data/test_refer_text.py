"""FIANet text-role masks: offline tagger, PP chunker, and masks on BERT WordPiece positions."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

from rsvl.data.refer_text import (
    PP_GRAMMAR,
    REFSEGRS_CLASS_NAMES,
    RRSISD_CLASS_NAMES,
    RegexpChunker,
    pos_tag,
    spatial_phrases,
    text_role_masks,
    word_tokenize,
)

# A vocabulary where some words split into several WordPieces, to exercise the offset quirk.
VOCAB = """[PAD] [UNK] [CLS] [SEP] [MASK] the a an ten ##nis court on left in upper right lower
ship harbor middle wind ##mill storage tank at bottom of three leftmost tanks next to largest
small vehicle . , top car street roof airplane near basketball base ##ball field road tree
and with two""".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import BertTokenizerFast

    path: Path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    params = inspect.signature(BertTokenizerFast.__init__).parameters
    if "vocab_file" in params:  # transformers 4.x
        tok = BertTokenizerFast(vocab_file=str(path), do_lower_case=True)
    else:  # transformers 5.x
        tok = BertTokenizerFast(vocab=str(path), do_lower_case=True)
    assert tok.tokenize("the tennis court") == ["the", "ten", "##nis", "court"]
    return tok


def _on(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)]


# ------------------------------------------------------------------ tokenizer and tagger

def test_word_tokenize() -> None:
    assert word_tokenize("The ship in the upper left.") == [
        "The", "ship", "in", "the", "upper", "left", "."]
    assert word_tokenize("the car, next to the road's edge") == [
        "the", "car", ",", "next", "to", "the", "road", "'s", "edge"]
    assert word_tokenize("an L-shaped building (white)") == [
        "an", "L-shaped", "building", "(", "white", ")"]
    assert word_tokenize("  ") == []


# Hand-tagged expressions (Penn Treebank tags; position words as NLTK's tagger treats them).
HAND_TAGGED = [
    "the/DT storage/NN tank/NN on/IN the/DT left/NN",
    "the/DT ship/NN in/IN the/DT upper/JJ left/NN",
    "the/DT airplane/NN in/IN the/DT lower/JJR left/VBD",
    "the/DT bridge/NN at/IN the/DT bottom/NN",
    "the/DT largest/JJS ship/NN",
    "the/DT small/JJ vehicle/NN",
    "the/DT ship/NN next/JJ to/TO the/DT harbor/NN",
    "the/DT leftmost/JJ of/IN the/DT three/CD storage/NN tanks/NNS",
    "the/DT tennis/NN court/NN in/IN the/DT middle/NN",
    "the/DT vehicle/NN near/IN the/DT bridge/NN",
    "a/DT white/JJ car/NN parked/VBN on/IN the/DT road/NN",
    "the/DT baseball/NN field/NN on/IN the/DT top/NN",
    "the/DT building/NN in/IN the/DT upper/JJ right/NN",
    "the/DT harbor/NN on/IN the/DT right/JJ side/NN",
    "two/CD airplanes/NNS at/IN the/DT airport/NN",
    "the/DT vehicle/NN beside/IN a/DT basketball/NN court/NN",
    "the/DT bus/NN on/IN the/DT left/JJ side/NN of/IN the/DT road/NN",
    "the/DT gray/JJ bridge/NN over/IN the/DT river/NN",
    "the/DT smallest/JJS storage/NN tank/NN at/IN the/DT bottom/NN",
    "a/DT ground/NN track/NN field/NN in/IN the/DT center/NN",
    "the/DT large/JJ ship/NN docked/VBN in/IN the/DT harbor/NN",
    "the/DT rightmost/JJ of/IN the/DT two/CD bridges/NNS",
    "the/DT expressway/NN service/NN area/NN at/IN the/DT top/JJ left/NN",
    "vehicles/NNS along/IN the/DT road/NN",
    "the/DT round/JJ chimney/NN and/CC the/DT dam/NN",
    "the/DT topmost/JJ of/IN the/DT five/CD vehicles/NNS",
    "the/DT long/JJ bridge/NN across/IN the/DT lake/NN",
    "the/DT tree/NN between/IN the/DT buildings/NNS",
    "low/JJ vegetation/NN near/IN the/DT sidewalk/NN",
    "the/DT trucks/NNS on/IN the/DT impervious/JJ surface/NN",
]


def test_tagger_accuracy_on_hand_tagged_expressions() -> None:
    total = right = 0
    wrong = []
    for line in HAND_TAGGED:
        pairs = [tok.rsplit("/", 1) for tok in line.split()]
        words = [w for w, _ in pairs]
        got = pos_tag(words)
        for (w, gold), (_, tag) in zip(pairs, got, strict=True):
            total += 1
            right += gold == tag
            if gold != tag:
                wrong.append(f"{w}: {tag} (gold {gold})")
    assert total > 150
    assert right / total >= 0.97, wrong


# "left" after a corner word, as NLTK's tagger reads it: a noun after "upper", "top" and
# "far", the verb VBD after "lower", "bottom" and "middle"; "right" is a noun after all six.
CORNER_TAGS = [("upper", "NN"), ("top", "NN"), ("far", "NN"), ("lower", "VBD"), ("bottom", "VBD"),
               ("middle", "VBD")]


@pytest.mark.parametrize("corner, left_tag", CORNER_TAGS)
def test_left_and_right_after_a_corner_word(corner: str, left_tag: str) -> None:
    for prep in ("in", "on", "at"):
        words = ["the", "ship", prep, "the", corner, "left"]
        tags = [t for _, t in pos_tag(words)]
        assert tags[:4] == ["DT", "NN", "IN", "DT"] and tags[-1] == left_tag
        assert pos_tag([*words[:-1], "right"])[-1] == ("right", "NN")


# ------------------------------------------------------------------ chunker

def _chunk_texts(tags: list[str]) -> list[tuple[int, int]]:
    tagged = [(f"w{i}", t) for i, t in enumerate(tags)]
    return [(c.start, c.end) for c in RegexpChunker(PP_GRAMMAR).parse(tagged)]


def test_chunker_follows_nltk_rule_order_and_greediness() -> None:
    # rule 1: IN DT? JJ.*? NN (NN exactly: NNS does not match)
    assert _chunk_texts(["DT", "NN", "IN", "DT", "NN"]) == [(2, 5)]
    assert _chunk_texts(["DT", "NN", "IN", "DT", "NNS"]) == []
    # rule 2 takes "in the upper" from IN DT JJ VBD before rule 3 can see it
    assert _chunk_texts(["DT", "NN", "IN", "DT", "JJ", "VBD"]) == [(2, 5)]
    # rule 3 fires when the modifier is JJR / JJS
    assert _chunk_texts(["DT", "NN", "IN", "DT", "JJR", "VBD"]) == [(2, 6)]
    # several non-overlapping matches
    assert _chunk_texts(["IN", "NN", "IN", "DT", "JJ", "NN"]) == [(0, 2), (2, 6)]
    # TO is not IN: "next to the harbor" has no PP
    assert _chunk_texts(["DT", "NN", "JJ", "TO", "DT", "NN"]) == []


def test_chunker_rejects_unsupported_grammar() -> None:
    with pytest.raises(ValueError):
        RegexpChunker("NP: }<DT>{")


def test_corner_phrases_keep_the_whole_spatial_phrase() -> None:
    # "left" a noun: IN DT JJ NN, one phrase with the position word
    assert spatial_phrases("the ship in the upper left") == ["in the upper left"]
    assert spatial_phrases("the car on the top left") == ["on the top left"]
    assert spatial_phrases("the car at the top left") == ["at the top left"]
    # "left" a verb: after JJR the third rule takes it; after JJ the second rule stops first
    assert spatial_phrases("the ship in the lower left") == ["in the lower left"]
    assert spatial_phrases("the ship at the bottom left") == ["at the bottom"]
    assert spatial_phrases("the ship in the middle left") == ["in the middle"]
    # "right" is a noun after every corner word
    for corner in ("upper", "top", "lower", "bottom", "middle"):
        assert spatial_phrases(f"the ship in the {corner} right") == [f"in the {corner} right"]


def test_spatial_phrases_drop_of_substring() -> None:
    assert spatial_phrases("the ship in the upper left") == ["in the upper left"]
    assert spatial_phrases("the storage tank in the lower left") == ["in the lower left"]
    assert spatial_phrases("the leftmost of the three tanks") == []
    # upstream drops any phrase containing the substring "of": "roof" too
    assert spatial_phrases("the car on the roof") == []
    assert spatial_phrases("the car on the road") == ["on the road"]


# ------------------------------------------------------------------ masks on BERT positions

def test_upstream_wordpiece_offset_quirk(tokenizer) -> None:
    # [CLS] the ten ##nis court on the left [SEP]
    #   0    1   2    3     4    5   6   7    8
    m = text_role_masks("the tennis court on the left", tokenizer)
    assert _on(m.attention_mask) == list(range(9))
    assert _on(m.target_mask) == [2, 3]        # words 1-2 +1: "ten ##nis", not "court"
    assert _on(m.position_mask) == [4, 5, 6]   # "on the left" lands on "court on the"
    assert m.phrases == ["on the left"] and not m.position_fallback
    c = text_role_masks("the tennis court on the left", tokenizer, alignment="corrected")
    assert _on(c.target_mask) == [2, 3, 4]
    assert _on(c.position_mask) == [5, 6, 7]
    assert (c.input_ids == m.input_ids).all()


def test_upstream_class_word_split_and_grammar(tokenizer) -> None:
    # [CLS] the wind ##mill in the upper left [SEP]
    m = text_role_masks("the windmill in the upper left", tokenizer)
    assert _on(m.target_mask) == [2]              # one word -> one position: "wind" only
    assert _on(m.position_mask) == [3, 4, 5, 6]   # "in the upper left" shifted onto "##mill in the upper"
    c = text_role_masks("the windmill in the upper left", tokenizer, alignment="corrected")
    assert _on(c.target_mask) == [2, 3]
    assert _on(c.position_mask) == [4, 5, 6, 7]


@pytest.mark.parametrize(
    "sentence, upstream, corrected",
    [
        # [CLS] the ship in the upper left [SEP]: the phrase covers all four words
        ("the ship in the upper left", [3, 4, 5, 6], [3, 4, 5, 6]),
        # [CLS] the car on the top left [SEP]
        ("the car on the top left", [3, 4, 5, 6], [3, 4, 5, 6]),
        # [CLS] the base ##ball field on the top left [SEP]: upstream shifts by one piece
        ("the baseball field on the top left", [4, 5, 6, 7], [5, 6, 7, 8]),
        # verb cases: "left" is VBD
        ("the ship in the lower left", [3, 4, 5, 6], [3, 4, 5, 6]),
        ("the ship at the bottom left", [3, 4, 5], [3, 4, 5]),
        ("the ship in the middle left", [3, 4, 5], [3, 4, 5]),
    ],
)
def test_corner_phrase_position_masks(tokenizer, sentence: str, upstream: list[int],
                                      corrected: list[int]) -> None:
    m = text_role_masks(sentence, tokenizer)
    assert not m.position_fallback
    assert _on(m.position_mask) == upstream
    assert _on(text_role_masks(sentence, tokenizer, alignment="corrected").position_mask) == corrected


def test_upstream_first_occurrence_and_multiple_classes(tokenizer) -> None:
    # [CLS] the ship in the harbor in the middle [SEP]
    s = "the ship in the harbor in the middle"
    m = text_role_masks(s, tokenizer)
    assert _on(m.target_mask) == [2, 5]        # "ship" and "harbor" are both listed classes
    assert m.phrases == ["in the harbor", "in the middle"]
    assert _on(m.position_mask) == [3, 4, 5]   # both phrases placed on the first "in"
    c = text_role_masks(s, tokenizer, alignment="corrected")
    assert _on(c.position_mask) == [3, 4, 5, 6, 7, 8]


def test_no_phrase_falls_back_to_attention(tokenizer) -> None:
    m = text_role_masks("the ship next to the harbor", tokenizer)
    assert m.position_fallback
    assert (m.position_mask == m.attention_mask).all()
    m = text_role_masks("the leftmost of the three storage tanks", tokenizer)
    assert m.position_fallback and _on(m.target_mask) == [6, 7]


def test_upstream_substring_and_case_quirks(tokenizer) -> None:
    # RefSegRS list: "tree" is a substring of "street" and marks it
    m = text_role_masks("the car on the street", tokenizer, class_names=REFSEGRS_CLASS_NAMES,
                        max_tokens=20)
    assert m.input_ids.shape == (20,)
    assert _on(m.target_mask) == [2, 5]
    c = text_role_masks("the car on the street", tokenizer, class_names=REFSEGRS_CLASS_NAMES,
                        max_tokens=20, alignment="corrected")
    assert _on(c.target_mask) == [2]
    # case-sensitive upstream: "Airplane" is not "airplane"
    m = text_role_masks("Airplane on the left", tokenizer, class_names=RRSISD_CLASS_NAMES)
    assert _on(m.target_mask) == []
    c = text_role_masks("Airplane on the left", tokenizer, alignment="corrected")
    assert _on(c.target_mask) == [1]


def test_truncation_clips_masks(tokenizer) -> None:
    s = "the ship in the harbor near the tennis court on the left"
    m = text_role_masks(s, tokenizer, max_tokens=8)
    assert m.input_ids.shape == (8,) and m.attention_mask.sum() == 8
    assert m.input_ids[-1] != tokenizer.sep_token_id  # upstream truncation drops [SEP]
    for arr in (m.target_mask, m.position_mask):
        assert arr.shape == (8,)
    c = text_role_masks(s, tokenizer, max_tokens=8, alignment="corrected")
    assert c.target_mask.shape == (8,) and c.target_mask[0] == 0


def test_bad_alignment(tokenizer) -> None:
    with pytest.raises(ValueError):
        text_role_masks("the ship", tokenizer, alignment="nope")  # type: ignore[arg-type]
