"""Prompts of the LLaVA family: the vicuna_v1 template, the task tags and LLaVA's chunked
tokenisation around ``<image>``.

Template (LLaVA's ``SeparatorStyle.TWO``, separators " " and "</s>")::

    {system} USER: <image>\\n{tagged question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT:

VHM uses ``conv_vicuna_v1`` (system sentence about a "curious user"); GeoChat's evaluation
uses ``conv_llava_v1`` (the same with "human"). The image placeholder goes at the start of
the first question, followed by a newline.

Task tags: VHM was fine-tuned with a tag in front of each question (RSEvalKit's
``convt_qa``): ``cls`` -> ``{CLS}``, ``vqa`` -> ``{VQA}``, ``vg`` -> ``{VG}``, ``idk`` ->
``{IDK}`` (presence / colour / position, the honesty family), ``it`` -> ``{IT}``. With
``task=None`` rsvl adds **no** tag: the question goes in as typed (a user may type a tag
themselves), because guessing the family from free text would silently change answers.
GeoChat's tags are ``[grounding]`` (describe with boxes), ``[refer]`` (locate one object) and
``[identify]`` (name the object in a box); the ``vg`` task gets ``[refer]``, the other kinds no
tag (GeoChat's scene and VQA evaluations use none). A question that already starts with a
tag of the model's style is left alone.

Tokenisation (LLaVA's ``tokenizer_image_token``): the prompt is split on ``<image>``, each
chunk is tokenised on its own with its BOS, the BOS is kept on the first chunk only, and one
image placeholder id goes between chunks. The chunk after the image therefore starts with
SentencePiece's "▁" + "\\n" pieces (ids 29871, 13 in LLaMA's vocabulary), which a processor
that tokenises the whole string at once does not reproduce.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rsvl.errors import PromptError
from rsvl.models.chat import TASK_KINDS

IMAGE_TOKEN = "<image>"

VHM_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
GEOCHAT_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
ROLES = ("USER", "ASSISTANT")
SEP, SEP2 = " ", "</s>"

#: task kind -> VHM's tag
VHM_TAGS: dict[str, str] = {
    "cls": "{CLS}",
    "vqa": "{VQA}",
    "vg": "{VG}",
    "idk": "{IDK}",
    "it": "{IT}",
}
#: GeoChat's own tags by name
GEOCHAT_TAG_NAMES: dict[str, str] = {
    "grounding": "[grounding]",
    "refer": "[refer]",
    "identify": "[identify]",
}
#: task kind -> GeoChat's tag (kinds not listed get none)
GEOCHAT_TAGS: dict[str, str] = {"vg": "[refer]"}

SYSTEMS: dict[str, str] = {"vhm": VHM_SYSTEM, "geochat": GEOCHAT_SYSTEM}


def tag_question(question: str, task: str | None, variant: str) -> str:
    """``question`` with the tag of ``task`` in front, in ``variant``'s style ("vhm" or
    "geochat"); see the module docstring for the mapping and for ``task=None``."""
    question = question.strip()
    if not question:
        raise PromptError("The question is empty.", hint="Type a question about the image.")
    if task is not None and task not in TASK_KINDS:
        raise PromptError(
            f"Unknown task kind {task!r}.", hint=f"Use one of {', '.join(TASK_KINDS)} or none."
        )
    if variant == "vhm":
        tag = VHM_TAGS.get(task or "")
        already = question.startswith("{") and any(
            question.startswith(t) for t in VHM_TAGS.values()
        )
    else:
        tag = GEOCHAT_TAGS.get(task or "")
        already = any(question.startswith(t) for t in GEOCHAT_TAG_NAMES.values())
    if tag is None or already:
        return question
    return f"{tag} {question}"


def build_prompt(
    question: str,
    *,
    variant: str = "vhm",
    task: str | None = None,
    history: Sequence[tuple[str, str]] = (),
) -> str:
    """The full prompt string: system, earlier turns, the new question, ``ASSISTANT:``.

    The image goes in front of the first user turn (the first of ``history`` when there is
    one); only the new question gets a task tag (earlier turns are kept as they were asked).
    """
    if variant not in SYSTEMS:
        raise ValueError(f"unknown LLaVA variant {variant!r}")
    turns = [(q.strip(), a.strip()) for q, a in history] + [
        (tag_question(question, task, variant), "")
    ]
    first_q, first_a = turns[0]
    turns[0] = (f"{IMAGE_TOKEN}\n{first_q}", first_a)
    ret = SYSTEMS[variant] + SEP
    for q, a in turns:
        ret += f"{ROLES[0]}: {q}{SEP}"
        ret += f"{ROLES[1]}: {a}{SEP2}" if a else f"{ROLES[1]}:"
    return ret


def tokenize_prompt(
    prompt: str,
    encode: Callable[[str], list[int]],
    bos_id: int,
    image_id: int,
) -> list[int]:
    """LLaVA's chunked tokenisation: ``encode(chunk)`` (SentencePiece, without BOS) of each
    piece between ``<image>`` markers, BOS once at the start, ``image_id`` at each marker."""
    ids = [bos_id]
    for i, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
        if i:
            ids.append(image_id)
        ids.extend(encode(chunk))
    return ids


__all__ = [
    "GEOCHAT_SYSTEM",
    "GEOCHAT_TAGS",
    "GEOCHAT_TAG_NAMES",
    "IMAGE_TOKEN",
    "VHM_SYSTEM",
    "VHM_TAGS",
    "build_prompt",
    "tag_question",
    "tokenize_prompt",
]
