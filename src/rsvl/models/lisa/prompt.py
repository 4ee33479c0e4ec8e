"""LISA's prompt: the llava_v1 conversation with the image between its markers.

Upstream (``chat.py`` / FSVLM's ``test.py``): the request becomes ``"<image>\\n" + request``,
``<image>`` is replaced by ``<im_start><image><im_end>`` (``mm_use_im_start_end``; FSVLM
spells the markers ``<|im_start|>``/``<|im_end|>``), and the llava_v1 template
(``SeparatorStyle.TWO``, separators " " and "</s>", roles USER / ASSISTANT, the "curious
human" system sentence) wraps it::

    {system} USER: <im_start><image><im_end>\\n{request} ASSISTANT:

Tokenisation is LLaVA's ``tokenizer_image_token``: the prompt is split on ``<image>``, each
chunk is tokenised on its own, BOS once at the start, one image placeholder between chunks
(:func:`rsvl.models.llava.prompt.tokenize_prompt`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rsvl.errors import PromptError
from rsvl.models.llava.prompt import GEOCHAT_SYSTEM, IMAGE_TOKEN, ROLES, SEP, tokenize_prompt

#: llava_v1's system sentence (the same as GeoChat's evaluation template)
LLAVA_V1_SYSTEM = GEOCHAT_SYSTEM
#: LLaVA's placeholder id for the image in a token list (replaced by the projected features)
IMAGE_TOKEN_INDEX = -200


def build_prompt(request: str, markers: Sequence[str] | None = ("<im_start>", "<im_end>")) -> str:
    """The llava_v1 prompt of one request about one image (see the module doc)."""
    request = (request or "").strip()
    if not request:
        raise PromptError("the segmentation request is empty.",
                          hint='Ask e.g. "This is a 1 m image of irrigated fields. Please segment the farmland."')
    image = IMAGE_TOKEN if not markers else f"{markers[0]}{IMAGE_TOKEN}{markers[1]}"
    return f"{LLAVA_V1_SYSTEM}{SEP}{ROLES[0]}: {image}\n{request}{SEP}{ROLES[1]}:"


def prompt_ids(request: str, encode: Callable[[str], list[int]], bos_id: int,
               markers: Sequence[str] | None = ("<im_start>", "<im_end>")) -> list[int]:
    """Token ids of the prompt with one :data:`IMAGE_TOKEN_INDEX` where the image goes."""
    return tokenize_prompt(build_prompt(request, markers), encode, bos_id, IMAGE_TOKEN_INDEX)


__all__ = ["IMAGE_TOKEN_INDEX", "LLAVA_V1_SYSTEM", "build_prompt", "prompt_ids"]
