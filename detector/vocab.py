"""Visual Genome vocabularies of the released detector: 1600 object and 400 attribute names.

Each line of detector/data/{objects,attributes}_vocab.txt lists the synonyms of one class
("gray,grey"); the first one is its display name. Index i is class i of the detector (0-based,
background / "no attribute" excluded: they are the last score column).
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

NUM_OBJECTS = 1600
NUM_ATTRIBUTES = 400


@lru_cache(maxsize=None)
def _synonyms(kind: str) -> tuple[tuple[str, ...], ...]:
    text = resources.files("detector").joinpath("data", f"{kind}_vocab.txt").read_text(encoding="utf-8")
    entries = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        names = tuple(n.strip() for n in line.split(",") if n.strip())
        if not names:
            raise ValueError(f"detector/data/{kind}_vocab.txt line {lineno} is empty")
        entries.append(names)
    return tuple(entries)


def object_synonyms() -> tuple[tuple[str, ...], ...]:
    return _synonyms("objects")


def attribute_synonyms() -> tuple[tuple[str, ...], ...]:
    return _synonyms("attributes")


def object_names() -> list[str]:
    """Display names of the 1600 VG object classes."""
    return [s[0] for s in object_synonyms()]


def attribute_names() -> list[str]:
    """Display names of the 400 VG attributes."""
    return [s[0] for s in attribute_synonyms()]


def object_name(index: int) -> str:
    """Name of class `index`; the background index (1600) is "background"."""
    names = object_names()
    if index == len(names):
        return "background"
    if not 0 <= index < len(names):
        raise IndexError(f"object class index {index} is outside 0..{len(names)}")
    return names[index]


def attribute_name(index: int) -> str:
    """Name of attribute `index`; index 400 is "no attribute"."""
    names = attribute_names()
    if index == len(names):
        return "no attribute"
    if not 0 <= index < len(names):
        raise IndexError(f"attribute index {index} is outside 0..{len(names)}")
    return names[index]
