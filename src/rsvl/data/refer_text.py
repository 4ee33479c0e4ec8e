"""FIANet's text-role masks: which BERT positions name the ground object and the spatial phrase.

FIANet (Lei et al., TGRS 2024) runs BERT three times on the same token ids with three
attention masks: the whole sentence (``attention_mask``), the *ground-object* words
(``target_mask``, "t_mask") and the *spatial-position* phrases (``position_mask``,
"p_mask"). This module builds the two role masks the way the upstream dataset classes
(``data/dataset_refer_bert*.py`` of Shaosifan/FIANet) do, without NLTK and its downloadable
data: :func:`word_tokenize`, :func:`pos_tag` and :class:`RegexpChunker` are small offline
stand-ins that are sufficient for referring expressions.

Upstream behaviour reproduced by ``alignment="upstream"`` (the default)
-----------------------------------------------------------------------
Input ids: ``tokenizer.encode(sentence, add_special_tokens=True)[:max_tokens]``, zero
padded. A sentence longer than ``max_tokens`` loses its trailing ``[SEP]``.

Ground object (t_mask), for every class name of the fixed list:

1. ``re.findall(name, sentence)``: a *case-sensitive substring* test on the raw sentence
   ("dam" matches "damaged", "tree" matches "street", "Airplane" does not match
   "airplane");
2. ``first = name.split()[0]``; ``index`` = the first *word* (NLTK token) of the sentence
   that contains ``first`` as a substring (0 when none does);
3. ``mask[index + 1 : index + 1 + n_words(name)] = 1``. The ``+ 1`` skips ``[CLS]``.

Spatial phrase (p_mask): the words are POS-tagged and chunked with the grammar
:data:`PP_GRAMMAR`; a chunk whose text contains the *substring* ``"of"`` is dropped
("of the", but also "roof", "offshore"); for each remaining phrase, ``index`` = the first
word of the sentence *equal* to the phrase's first word (0 when none),
``mask[index + 1 : index + 1 + n_words(phrase)] = 1``. When no phrase survives, the
position mask is the attention mask.

**The word-vs-WordPiece offset quirk.** Both masks are computed on *word* indices (NLTK
tokens) but applied to *WordPiece* positions of the BERT input. Every word before the
match that BERT splits into several pieces (``windmill`` -> ``wind ##mill``, ``2nd`` ->
``2 ##nd``) shifts the mask one position too early per extra piece; a multi-piece class
word is covered only by as many positions as it has words. Example with a vocabulary
where ``tennis`` -> ``ten ##nis``: "the tennis court on the left" gives WordPieces
``[CLS] the ten ##nis court on the left [SEP]``; upstream marks positions 2-3
(``ten ##nis``) as the ground object (not ``court``) and positions 4-6 (``court on the``)
as the spatial phrase "on the left". A second phrase starting with the same preposition
as an earlier word ("in the harbor in the middle") is placed on the *first* occurrence.

Two more upstream details are documented rather than reproduced: (a) a mask slice that
runs past ``max_tokens`` *extends* the Python list upstream (a longer tensor that breaks
batching); here it is clipped to ``max_tokens``; (b) for references with several
sentences, upstream tests only the first sentence's position mask for emptiness and then
aliases the position list to the attention list; here the fallback is per sentence, which
is identical for the one-sentence references of RRSIS-D and RefSegRS.

``alignment="corrected"``
-------------------------
Same tagger and grammar, but: class names are matched case-insensitively as whole words
(a final plural ``s``/``es`` allowed), at every occurrence; each phrase is placed on the
words the chunker found (no first-occurrence search); every word is mapped to *all* its
WordPiece positions (the tokenizer is asked for each word's pieces); masks are limited to
real (non-padding) positions.

Class-name lists are copied from upstream's ``target_cls`` sets (order is irrelevant: the
masks are unions).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

__all__ = [
    "NWPU_VHR10_CLASS_NAMES",
    "PP_GRAMMAR",
    "REFSEGRS_CLASS_NAMES",
    "REFSEGRS_MAX_TOKENS",
    "RRSISD_CLASS_NAMES",
    "RRSISD_MAX_TOKENS",
    "Chunk",
    "RegexpChunker",
    "TextRoleMasks",
    "WordPieceTokenizer",
    "ground_object_word_spans",
    "pos_tag",
    "spatial_phrases",
    "text_role_masks",
    "word_tokenize",
]

# --------------------------------------------------------------------------------------
# Upstream constants (Shaosifan/FIANet, data/dataset_refer_bert*.py)
# --------------------------------------------------------------------------------------

#: ``target_cls`` of FIANet's RRSIS-D dataset class (the 20 DIOR classes, spelled out).
RRSISD_CLASS_NAMES: tuple[str, ...] = (
    "airplane", "airport", "golf field", "expressway service area", "baseball field",
    "stadium", "ground track field", "storage tank", "basketball court", "chimney",
    "tennis court", "overpass", "train station", "ship", "expressway toll station",
    "dam", "harbor", "bridge", "vehicle", "windmill",
)  # fmt: skip

#: ``target_cls`` of FIANet's RefSegRS dataset class.
REFSEGRS_CLASS_NAMES: tuple[str, ...] = (
    "road", "vehicle", "car", "van", "building", "truck", "trailer", "bus",
    "road marking", "bikeway", "sidewalk", "tree", "low vegetation", "impervious surface",
)  # fmt: skip

#: rsvl's own list for expressions generated from NWPU VHR-10 (not an upstream list):
#: the ten NWPU classes as they are written in :mod:`rsvl.data.refgen` sentences.
NWPU_VHR10_CLASS_NAMES: tuple[str, ...] = (
    "airplane", "ship", "storage tank", "baseball diamond", "tennis court",
    "basketball court", "ground track field", "harbor", "bridge", "vehicle",
)  # fmt: skip

RRSISD_MAX_TOKENS = 22
REFSEGRS_MAX_TOKENS = 20

#: Upstream's chunk grammar for spatial prepositional phrases (NLTK RegexpParser syntax).
PP_GRAMMAR = r"""
PP: {<IN><DT>?<JJ.*>?<NN>}
    {<IN><DT>?<JJ.*>?<JJ>}
    {<IN><DT>?<JJ.*><VBD>}
"""

# --------------------------------------------------------------------------------------
# Word tokenizer (the subset of NLTK's Treebank behaviour that referring expressions need)
# --------------------------------------------------------------------------------------

_EDGE_PUNCT = "\"'`()[]{}<>,;:!?"
_CLITIC = re.compile(r"^(.+?)('s|'S|n't|N'T|'re|'ve|'ll|'d|'m)$")


def word_tokenize(text: str) -> list[str]:
    """Split ``text`` into words like NLTK's ``word_tokenize`` does on short phrases.

    Whitespace separates words; leading and trailing punctuation becomes its own token
    (a final ``.`` too); clitics (``'s``, ``n't``) are split off; hyphenated words and
    decimal numbers stay whole. Quotes are kept as typed (NLTK rewrites ``"`` to ``` `` ```,
    which changes no mask).
    """
    out: list[str] = []
    for chunk in text.split():
        lead: list[str] = []
        trail: list[str] = []
        while chunk and chunk[0] in _EDGE_PUNCT:
            lead.append(chunk[0])
            chunk = chunk[1:]
        while chunk and (chunk[-1] in _EDGE_PUNCT or chunk[-1] == "."):
            if chunk[-1] == "." and len(chunk) > 1 and chunk[:-1].replace(".", "").isalpha() \
                    and "." in chunk[:-1]:
                break  # abbreviation like "e.g."
            trail.append(chunk[-1])
            chunk = chunk[:-1]
        out.extend(lead)
        if chunk:
            m = _CLITIC.match(chunk)
            if m:
                out.extend([m.group(1), m.group(2)])
            else:
                out.append(chunk)
        out.extend(reversed(trail))
    return out


# --------------------------------------------------------------------------------------
# Offline part-of-speech tagger (Penn Treebank tags, as NLTK's pos_tag emits)
# --------------------------------------------------------------------------------------

def _words(tag: str, text: str) -> dict[str, str]:
    return {w: tag for w in text.split()}


_LEXICON: dict[str, str] = {}
_LEXICON.update(_words("DT", "the a an this these those each every all both another some "
                       "any no either neither"))
_LEXICON.update(_words("IN", "in on at of near beside besides by with from above below under "
                       "over behind between among amid along alongside across around inside "
                       "outside within into onto toward towards through throughout than like "
                       "about against beneath underneath upon via per after before during "
                       "except beyond without among amongst"))
_LEXICON.update(_words("TO", "to"))
_LEXICON.update(_words("CC", "and or but nor"))
_LEXICON.update(_words("CD", "one two three four five six seven eight nine ten eleven twelve "
                       "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty "
                       "thirty forty fifty hundred"))
_LEXICON.update(_words("PRP", "it they them its"))
_LEXICON.update(_words("PRP$", "its their"))
_LEXICON.update(_words("WDT", "which whose"))
_LEXICON.update(_words("WP", "who what"))
_LEXICON.update(_words("VBZ", "is has lies sits stands appears looks"))
_LEXICON.update(_words("VBP", "are have lie sit stand appear look"))
_LEXICON.update(_words("VB", "be"))
_LEXICON.update(_words("MD", "can could may might will would should"))
_LEXICON.update(_words("EX", "there"))
_LEXICON.update(_words("RB", "very also only almost nearly slightly far closely directly "
                       "just not too quite mostly partly here"))
_LEXICON.update(_words("JJ", "large small big little tiny huge long short wide narrow tall "
                       "white black gray grey red blue green yellow brown orange purple dark "
                       "bright round circular rectangular oval square triangular irregular "
                       "empty full other same single double whole central middle upper outer low high "
                       "inner nearby adjacent next first second third fourth fifth last "
                       "leftmost rightmost topmost bottommost uppermost lowermost "
                       "northernmost southernmost easternmost westernmost northern southern "
                       "eastern western horizontal vertical diagonal straight curved parallel "
                       "isolated separate main big-sized medium medium-sized large-sized "
                       "small-sized several many few"))
_LEXICON.update(_words("JJR", "larger smaller bigger longer shorter wider narrower taller "
                       "lower darker brighter closer nearer further farther"))
_LEXICON.update(_words("JJS", "largest smallest biggest longest shortest widest narrowest "
                       "tallest darkest brightest closest nearest furthest farthest"))
_LEXICON.update(_words("VBN", "parked docked moored anchored located situated surrounded "
                       "covered connected attached berthed painted built placed positioned "
                       "arranged lined aligned"))
_LEXICON.update(_words("VBG", "crossing spanning facing including containing running "
                       "leading adjoining"))
_LEXICON.update(_words("NN", "airplane plane aircraft airport ship boat vessel storage tank "
                       "oil baseball field diamond tennis court basketball ground track "
                       "harbor harbour port pier dock bridge vehicle car van truck bus "
                       "trailer road street highway expressway overpass service area toll "
                       "station train railway golf stadium chimney dam windmill building "
                       "house roof river lake sea water coast shore land grass tree forest "
                       "parking lot runway apron terminal image picture scene photo center "
                       "centre middle top bottom side corner edge part end half border "
                       "region area row line group cluster pair lane bank marking bikeway "
                       "sidewalk vegetation surface container crane roundabout "
                       "helicopter pool soccer ball playground factory farmland"))

#: nouns ending in "s" that are singular (so the plural rule leaves them alone)
_SINGULAR_S = set("bus gas grass overpass class glass canvas campus status terminus access "
                  "chassis lens cross moss mass bypass compass surplus".split())

_POSITION_HEADS = {"left", "right", "top", "bottom", "middle", "center", "centre", "front",
                   "back", "rear"}
_CORNER_MODIFIERS = {"upper", "lower", "top", "bottom", "far", "middle", "center", "centre",
                     "leftmost", "rightmost", "topmost", "bottommost"}
#: corner words after which NLTK's tagger reads "left" as a noun (after the other corner words,
#: "lower", "bottom", "middle", it reads it as the verb VBD)
_LEFT_NOUN_AFTER = {"upper", "top", "far"}
_PUNCT_TAGS = {".": ".", ",": ",", ":": ":", ";": ":", "!": ".", "?": ".", "(": "(",
               ")": ")", "\"": "''", "'": "''", "`": "``", "-": ":", "--": ":"}


def _base_tag(word: str) -> str | None:
    if word in _PUNCT_TAGS:
        return _PUNCT_TAGS[word]
    if re.fullmatch(r"[-+]?\d+([.,]\d+)*", word):
        return "CD"
    if re.fullmatch(r"\d+(st|nd|rd|th)", word):
        return "JJ"
    return _LEXICON.get(word)


def _suffix_tag(word: str) -> str:
    if word in _SINGULAR_S:
        return "NN"
    if word.endswith("ing") and len(word) > 4:
        return "VBG"
    if word.endswith("ed") and len(word) > 3:
        return "VBN"
    if word.endswith("ly") and len(word) > 3:
        return "RB"
    if word.endswith("est") and len(word) > 4:
        return "JJS"
    if word.endswith("most") and len(word) > 5:
        return "JJ"
    if re.search(r"(ous|ful|ive|able|ible|al|ic|less|ish|ular|ary|shaped|colored|coloured)$",
                 word) and len(word) > 4:
        return "JJ"
    if "-" in word:
        return "JJ"
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        stem = word[:-2] if word.endswith("es") and _LEXICON.get(word[:-2]) == "NN" else word[:-1]
        if _LEXICON.get(stem, "NN") == "NN":
            return "NNS"
    return "NN"


def pos_tag(words: Sequence[str]) -> list[tuple[str, str]]:
    """Penn Treebank tags for ``words``: a lexicon, suffix rules and a few context rules.

    Built to give NLTK's ``pos_tag`` answer on the words that decide upstream's spatial
    grammar (prepositions, determiners, adjectives, nouns, position words). Position words
    follow what NLTK's perceptron tagger does with them: a position word after a determiner
    is a noun ("on the left" -> IN DT NN), one that modifies a following noun or position
    word is an adjective ("the left side", "the top left"). "left" after a corner word is a
    noun after "upper", "top" and "far" ("in the upper left" -> IN DT JJ NN, one phrase) but
    the verb VBD after "lower", "bottom" and "middle" ("in the lower left" -> IN DT JJR VBD,
    which is why upstream's grammar has a ``<JJ.*><VBD>`` rule; "at the bottom left" ->
    IN DT JJ VBD, whose phrase stops at "bottom"); "right" after a corner word is a noun.
    The corner rule was checked against NLTK's tags on rsvl's generated expressions; the
    other context rules are best guesses, not confirmed against NLTK's data.
    """
    lowered = [w.lower() for w in words]
    tags: list[str] = []
    for i, w in enumerate(lowered):
        prev = lowered[i - 1] if i > 0 else ""
        nxt = lowered[i + 1] if i + 1 < len(lowered) else ""
        prev_tag = tags[i - 1] if i > 0 else ""
        nxt_base = _base_tag(nxt) if nxt else None
        nxt_nounish = bool(nxt) and (nxt_base == "NN" or (nxt_base is None and _suffix_tag(nxt)
                                                            in ("NN", "NNS")))
        tag: str | None
        if w in ("left", "right"):
            if prev in _CORNER_MODIFIERS:
                tag = "VBD" if w == "left" and prev not in _LEFT_NOUN_AFTER else "NN"
            elif nxt_nounish and nxt not in _POSITION_HEADS:
                tag = "JJ"  # "the left side", "the right bank"
            else:
                tag = "NN"
        elif w in ("top", "bottom", "middle", "center", "centre", "front", "back", "rear"):
            if nxt in ("left", "right") or (nxt_nounish and nxt not in ("of",)):
                tag = "JJ"  # "the top left", "the bottom part"
            else:
                tag = "NN"
        elif w == "that":
            tag = "WDT" if prev_tag.startswith("NN") else "DT"
        elif w == "square":
            tag = "JJ" if nxt_nounish else "NN"
        elif w == "close":
            tag = "RB" if nxt == "to" else "JJ"
        elif w == "next":
            tag = "JJ"
        elif w == "near":
            tag = "IN"
        else:
            tag = _base_tag(w)
            if tag is None:
                tag = _suffix_tag(w)
        tags.append(tag)
    return list(zip(words, tags, strict=True))


# --------------------------------------------------------------------------------------
# Regexp chunker (NLTK RegexpParser semantics for chunk rules)
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """A chunk found by :class:`RegexpChunker`: words ``start`` to ``end`` (exclusive)."""

    label: str
    start: int
    end: int


def _tag_pattern_to_regex(pattern: str) -> str:
    # Same translation as NLTK: each <TAG> is one bracketed tag; '.' never crosses one.
    pattern = re.sub(r"\s", "", pattern)
    if not re.fullmatch(r"([^{}<>]|<[^{}<>]+>)*", pattern):
        raise ValueError(f"bad tag pattern: {pattern!r}")
    pattern = pattern.replace("<", "(?:<(?:").replace(">", ")>)")
    return pattern.replace(".", r"[^{}<>]")


class RegexpChunker:
    """Chunk rules over POS tags, with NLTK ``RegexpParser`` semantics.

    Only chunk rules (``{...}``) are supported, which is all upstream's grammar uses. The
    rules of a label are applied in order over the whole sentence; each rule chunks the
    leftmost non-overlapping matches among the tags not yet chunked (regex greediness and
    backtracking included, so ``{<IN><DT>?<JJ.*>?<JJ>}`` takes "in the upper" from
    ``IN DT JJ VBD`` before the third rule can see it).
    """

    def __init__(self, grammar: str = PP_GRAMMAR) -> None:
        self.stages: list[tuple[str, list[re.Pattern[str]]]] = []
        label: str | None = None
        rules: list[re.Pattern[str]] = []
        for raw in grammar.splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.match(r"^([A-Za-z_][\w-]*)\s*:(.*)$", line)
            if m:
                if label is not None:
                    self.stages.append((label, rules))
                label, rules, line = m.group(1), [], m.group(2).strip()
            if label is None:
                raise ValueError(f"grammar rule without a label: {raw!r}")
            for body in re.findall(r"\{([^{}]*)\}", line):
                rx = _tag_pattern_to_regex(body)
                rules.append(re.compile(rf"(?P<chunk>{rx})(?=[^}}]*(?:{{|$))"))
            if re.sub(r"\{[^{}]*\}", "", line).strip():
                raise ValueError(f"only chunk rules {{...}} are supported: {raw!r}")
        if label is not None:
            self.stages.append((label, rules))

    def parse(self, tagged: Sequence[tuple[str, str]]) -> list[Chunk]:
        """Chunks of ``tagged`` in sentence order (chunks of later stages cannot overlap)."""
        chunks: list[Chunk] = []
        taken = [False] * len(tagged)
        for label, rules in self.stages:
            s = "".join(f"<{t}>" if not taken[i] else "<\x00>" for i, (_, t) in enumerate(tagged))
            for rule in rules:
                s = rule.sub(lambda m: "{" + m.group("chunk") + "}", s)
            idx = 0
            start = None
            i = 0
            while i < len(s):
                c = s[i]
                if c == "{":
                    start = idx
                    i += 1
                elif c == "}":
                    chunks.append(Chunk(label, start if start is not None else idx, idx))
                    start = None
                    i += 1
                else:  # a bracketed tag
                    i = s.index(">", i) + 1
                    idx += 1
            for ch in chunks:
                for k in range(ch.start, ch.end):
                    taken[k] = True
        return sorted(chunks, key=lambda c: c.start)


_DEFAULT_CHUNKER: RegexpChunker | None = None


def _default_chunker() -> RegexpChunker:
    global _DEFAULT_CHUNKER
    if _DEFAULT_CHUNKER is None:
        _DEFAULT_CHUNKER = RegexpChunker(PP_GRAMMAR)
    return _DEFAULT_CHUNKER


def spatial_phrases(sentence: str, *, with_spans: bool = False) -> list:
    """Upstream's spatial phrases of ``sentence``: PP chunks whose text lacks "of".

    Returns the phrase strings (words joined by spaces), or ``(phrase, start, end)`` word
    spans with ``with_spans=True``.
    """
    words = word_tokenize(sentence)
    chunks = _default_chunker().parse(pos_tag(words))
    out = []
    for ch in chunks:
        if ch.label != "PP":
            continue
        phrase = " ".join(words[ch.start:ch.end])
        if "of" in phrase:  # upstream: re.findall("of", phrase), a substring test
            continue
        out.append((phrase, ch.start, ch.end) if with_spans else phrase)
    return out


def ground_object_word_spans(
    sentence: str,
    class_names: Sequence[str] = RRSISD_CLASS_NAMES,
    *,
    alignment: Literal["upstream", "corrected"] = "upstream",
) -> list[tuple[int, int]]:
    """Word spans ``(start, end)`` that the ground-object mask covers (before the +1)."""
    words = word_tokenize(sentence)
    spans: list[tuple[int, int]] = []
    for name in class_names:
        name_words = word_tokenize(name)
        if not name_words:
            continue
        n = len(name_words)
        if alignment == "upstream":
            if not re.findall(name, sentence):
                continue
            index = 0
            for i, w in enumerate(words):
                if re.findall(name_words[0], w):
                    index = i
                    break
            spans.append((index, index + n))
        else:
            low = [w.lower() for w in words]
            target = [w.lower() for w in name_words]
            for i in range(len(low) - n + 1):
                head_ok = low[i:i + n - 1] == target[:-1]
                last = low[i + n - 1]
                if head_ok and last in (target[-1], target[-1] + "s", target[-1] + "es"):
                    spans.append((i, i + n))
    return spans


# --------------------------------------------------------------------------------------
# Masks on BERT positions
# --------------------------------------------------------------------------------------

class WordPieceTokenizer(Protocol):
    """What is needed of a BERT tokenizer (``transformers.BertTokenizer[Fast]`` fits)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def tokenize(self, text: str) -> list[str]: ...


@dataclass
class TextRoleMasks:
    """Inputs of FIANet's three BERT passes for one sentence (arrays of ``max_tokens``)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    target_mask: np.ndarray
    position_mask: np.ndarray
    words: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    phrases: list[str] = field(default_factory=list)
    #: True when no spatial phrase was found and position_mask is the attention mask
    position_fallback: bool = False


def _set(mask: np.ndarray, start: int, end: int) -> None:
    start = max(start, 0)
    end = min(end, mask.shape[0])
    if end > start:
        mask[start:end] = 1


def text_role_masks(
    sentence: str,
    tokenizer: WordPieceTokenizer,
    *,
    class_names: Sequence[str] = RRSISD_CLASS_NAMES,
    max_tokens: int = RRSISD_MAX_TOKENS,
    alignment: Literal["upstream", "corrected"] = "upstream",
) -> TextRoleMasks:
    """Token ids, attention mask and FIANet's ground-object / spatial-phrase masks.

    ``alignment="upstream"`` reproduces FIANet's masks bit for bit, word-vs-WordPiece
    offset included (see the module docstring); ``"corrected"`` maps words to their
    WordPiece positions. Use ``class_names=REFSEGRS_CLASS_NAMES, max_tokens=20`` for
    RefSegRS.
    """
    if alignment not in ("upstream", "corrected"):
        raise ValueError(f"alignment must be 'upstream' or 'corrected', not {alignment!r}")
    full_ids = list(tokenizer.encode(sentence, add_special_tokens=True))
    ids = full_ids[:max_tokens]
    input_ids = np.zeros(max_tokens, dtype=np.int64)
    attention = np.zeros(max_tokens, dtype=np.int64)
    input_ids[: len(ids)] = ids
    attention[: len(ids)] = 1
    target = np.zeros(max_tokens, dtype=np.int64)
    position = np.zeros(max_tokens, dtype=np.int64)

    words = word_tokenize(sentence)
    tagged = pos_tag(words)
    phrase_spans = spatial_phrases(sentence, with_spans=True)
    obj_spans = ground_object_word_spans(sentence, class_names, alignment=alignment)

    if alignment == "upstream":
        for start, end in obj_spans:
            _set(target, start + 1, end + 1)
        for phrase, _s, _e in phrase_spans:
            pw = word_tokenize(phrase)
            index = 0
            for i, w in enumerate(words):
                if w == pw[0]:
                    index = i
                    break
            _set(position, index + 1, index + 1 + len(pw))
    else:
        # position of each word's pieces: [CLS] is 0, pieces follow in order
        starts: list[int] = []
        ends: list[int] = []
        pos = 1
        for w in words:
            starts.append(pos)
            pos += len(tokenizer.tokenize(w))
            ends.append(pos)
        for start, end in obj_spans:
            _set(target, starts[start], ends[end - 1])
        for _phrase, s, e in phrase_spans:
            _set(position, starts[s], ends[e - 1])
        # only on real word pieces: never [CLS], [SEP] or padding
        real = attention.copy()
        real[0] = 0
        if len(full_ids) <= max_tokens:
            real[len(full_ids) - 1] = 0
        target &= real
        position &= real

    fallback = int(position.sum()) == 0
    if fallback:
        position = attention.copy()
    return TextRoleMasks(
        input_ids=input_ids,
        attention_mask=attention,
        target_mask=target,
        position_mask=position,
        words=words,
        tags=[t for _, t in tagged],
        phrases=[p for p, _s, _e in phrase_spans],
        position_fallback=fallback,
    )
