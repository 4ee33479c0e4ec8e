"""Class lists: the one syntax every rsvl task uses to name classes.

Inline (CLI options, API strings, the web page)::

    "farmland|cropland, forest|trees, river, residential"

classes are separated by commas, the synonyms of one class by ``|``.

In a file (``--classes-file``), one class per line with its synonyms separated by commas,
exactly as the upstream OVSS class files (SegEarth-OV / RS-OVSS ``configs/cls_*.txt``)::

    background
    building,roof,house
    tree,forest

``|`` is also accepted between synonyms in a file. Blank lines and lines starting with
``#`` are skipped.

Every synonym of a class is a prompt for that class: open-vocabulary segmentation embeds
each synonym, scores them all and keeps the maximum per class (SegEarth-OV's protocol).

The OVSS class files of the eight benchmark datasets ship with rsvl
(:func:`builtin_class_file`). No torch here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from rsvl.errors import InputNotFoundError, PromptError

__all__ = [
    "BUILTIN_CLASS_FILES",
    "ClassSpec",
    "builtin_class_file",
    "expand_synonyms",
    "format_class_list",
    "load_classes",
    "parse_class_list",
    "read_class_file",
]

#: OVSS benchmark class files shipped under ``rsvl/assets/classes/<name>.txt``; the content
#: is SegEarth-OV's / RS-OVSS's ``configs/cls_<name>.txt`` (iSAID's is ``cls_iSAID.txt``);
#: ``whu_building`` (background, building) is rsvl's own, for the WHU building preset.
BUILTIN_CLASS_FILES: tuple[str, ...] = (
    "loveda",
    "openearthmap",
    "potsdam",
    "vaihingen",
    "udd5",
    "vdd",
    "uavid",
    "isaid",
    "whu_building",
)

_INLINE_EXAMPLE = '"farmland|cropland, forest|trees, river, residential"'
_FILE_EXAMPLE = "one class per line, synonyms separated by commas (e.g. 'tree,forest')"
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class ClassSpec:
    """One class: its display ``name`` and every text that names it.

    ``synonyms`` always starts with ``name`` (``synonyms[0] == name``), so iterating
    ``synonyms`` gives every prompt of the class.
    """

    name: str
    synonyms: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.synonyms or self.synonyms[0] != self.name:
            object.__setattr__(
                self, "synonyms", (self.name, *[s for s in self.synonyms if s != self.name])
            )


def _clean(term: str) -> str:
    return _WS.sub(" ", term).strip()


def _build(groups: Sequence[Sequence[str]], *, where: str, how: str) -> list[ClassSpec]:
    """Validate raw synonym groups and turn them into ClassSpecs."""
    specs: list[ClassSpec] = []
    seen: dict[str, int] = {}
    for i, group in enumerate(groups):
        terms = [_clean(t) for t in group]
        if not any(terms):
            raise PromptError(f"Class {i + 1} of {where} is empty.", hint=f"Type {how}.")
        if not all(terms):
            raise PromptError(
                f"Class {i + 1} of {where} ({' / '.join(t for t in terms if t)!r}) has an empty "
                "synonym (a doubled or trailing separator).",
                hint=f"Type {how}.",
            )
        unique: list[str] = []
        for t in terms:
            key = t.casefold()
            if key in seen:
                if seen[key] == i:
                    continue  # the same synonym twice in one class: harmless, keep one
                raise PromptError(
                    f"{t!r} appears in class {seen[key] + 1} and class {i + 1} of {where}; "
                    "a name must belong to one class only.",
                    hint="Remove the duplicate or merge the two classes with '|'.",
                )
            seen[key] = i
            unique.append(t)
        specs.append(ClassSpec(unique[0], tuple(unique)))
    if not specs:
        raise PromptError(f"The class list ({where}) is empty.", hint=f"Type {how}.")
    return specs


def parse_class_list(text: str) -> list[ClassSpec]:
    """Parse an inline class list: classes separated by ``,``, synonyms by ``|``.

    ``"farmland|cropland, forest|trees, river"`` ->
    ``[ClassSpec("farmland", ("farmland", "cropland")), ClassSpec("forest", ...), ...]``.
    Raises :class:`~rsvl.errors.PromptError` for an empty list, an empty class or synonym,
    or a name used by two classes.
    """
    how = f"the classes separated by commas and synonyms joined with '|', e.g. {_INLINE_EXAMPLE}"
    if not isinstance(text, str) or not text.strip():
        raise PromptError("The class list is empty.", hint=f"Type {how}.")
    if "\n" in text.strip():
        raise PromptError(
            "An inline class list must be on one line.",
            hint=f"Type {how}, or put one class per line in a file and pass it as a class file.",
        )
    raw = text.strip().rstrip(",")  # tolerate one trailing comma: "a, b,"
    groups = [part.split("|") for part in raw.split(",")]
    return _build(groups, where="the inline class list", how=how)


def _parse_file_text(text: str, where: str) -> list[ClassSpec]:
    groups = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        groups.append(re.split(r"[,|]", s))
    if not groups:
        raise PromptError(f"The class file {where} has no classes.", hint=f"Write {_FILE_EXAMPLE}.")
    return _build(groups, where=f"the class file {where}", how=_FILE_EXAMPLE)


def read_class_file(path: str | Path | Traversable) -> list[ClassSpec]:
    """Read a class file: one class per line, comma-separated synonyms (``tree,forest``).

    Raises :class:`~rsvl.errors.InputNotFoundError` when the file does not exist and
    :class:`~rsvl.errors.PromptError` when it is empty or malformed.
    """
    p: Path | Traversable = Path(path) if isinstance(path, str | Path) else path
    if not p.is_file():
        builtin = ", ".join(BUILTIN_CLASS_FILES)
        raise InputNotFoundError(
            f"Class file not found: {path}.",
            hint=f"Give the path of a text file with {_FILE_EXAMPLE}, "
            f"or the name of a built-in class file ({builtin}).",
        )
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptError(
            f"The class file {path} is not UTF-8 text.",
            hint=f"Save it as UTF-8 with {_FILE_EXAMPLE}.",
        ) from e
    return _parse_file_text(text, str(path))


def builtin_class_file(name: str) -> Traversable:
    """The shipped OVSS class file of a benchmark (``loveda``, ``potsdam``, ``isaid``...).

    Case-insensitive; ``cls_iSAID`` / ``iSAID.txt`` are accepted too.
    """
    key = name.strip().lower()
    key = key.removeprefix("cls_").removesuffix(".txt")
    if key not in BUILTIN_CLASS_FILES:
        raise PromptError(
            f"No built-in class file named {name!r}.",
            hint=f"Use one of: {', '.join(BUILTIN_CLASS_FILES)}; or give the path of your own file.",
        )
    return resources.files("rsvl").joinpath("assets", "classes", f"{key}.txt")


def load_classes(
    inline: str | None = None,
    file: str | Path | None = None,
    *,
    builtin: str | None = None,
) -> list[ClassSpec]:
    """Load a class list from exactly one source: an inline string, a file, or a built-in.

    ``file`` may also be the name of a built-in class file (``"loveda"``) when no file of
    that name exists.
    """
    given = [x for x in (inline, file, builtin) if x is not None]
    if not given:
        raise PromptError(
            "No classes given.",
            hint=f"Pass an inline list such as {_INLINE_EXAMPLE}, or a class file with {_FILE_EXAMPLE}.",
        )
    if len(given) > 1:
        raise PromptError(
            "Classes were given more than once (inline, file and/or built-in).",
            hint="Give either an inline class list or a class file, not both.",
        )
    if inline is not None:
        return parse_class_list(inline)
    if builtin is not None:
        return read_class_file(builtin_class_file(builtin))
    assert file is not None
    p = Path(file)
    if (
        not p.exists()
        and str(file).strip().lower().removeprefix("cls_").removesuffix(".txt")
        in BUILTIN_CLASS_FILES
    ):
        return read_class_file(builtin_class_file(str(file)))
    return read_class_file(p)


def expand_synonyms(specs: Iterable[ClassSpec]) -> tuple[list[str], list[int]]:
    """Flatten classes to (prompts, class index of each prompt), in file order.

    This is the (names, indices) pair that OVSS scores: one text query per synonym, then a
    max over the queries of each class.
    """
    names: list[str] = []
    index: list[int] = []
    for i, spec in enumerate(specs):
        names.extend(spec.synonyms)
        index.extend([i] * len(spec.synonyms))
    return names, index


def format_class_list(specs: Iterable[ClassSpec]) -> str:
    """The inline form of a class list (round-trips through :func:`parse_class_list`)."""
    return ", ".join("|".join(s.synonyms) for s in specs)
