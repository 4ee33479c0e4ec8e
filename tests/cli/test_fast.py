"""``--fast`` reaches the model loader from every command that has it, and the registry
gives it to the families that have a fast path (CLIP, SAM, RSPrompter) and logs for the others."""

from __future__ import annotations

import logging

import pytest
from conftest import REPO
from tiny_ucm import tiny_ucm

from rsvl.cli import main
from rsvl.models import registry

SAMPLE = REPO / "examples" / "OSBS_029.tif"


class Loaded(Exception):
    pass


@pytest.fixture
def calls(monkeypatch):
    seen: list[dict] = []

    def load(name, weights=None, device="cpu", **kwargs):
        seen.append({"name": getattr(name, "name", name), **kwargs})
        raise Loaded

    monkeypatch.setattr(registry, "load", load)
    return seen


@pytest.mark.parametrize("args", [
    ["classify", SAMPLE, "-l", "forest, water", "--fast", "-o", "{tmp}/c"],
    ["segment", SAMPLE, "forest, water", "--fast", "-o", "{tmp}/s"],
    ["index", "build", SAMPLE, "-o", "{tmp}/idx", "--fast"],
    ["instances", SAMPLE, "-o", "{tmp}/i", "--fast"],
    ["eval", "zeroshot", "{ucm}", "--fast"],
    ["eval", "retrieval", "{ucm}", "--fast"],
])
def test_fast_reaches_the_loader(args, calls, tmp_path):
    ucm = tiny_ucm(tmp_path / "ucm") if "{ucm}" in args else ""
    args = [str(a).replace("{tmp}", str(tmp_path)).replace("{ucm}", str(ucm)) for a in args]
    main(args)  # main turns the loader's exception into an exit status
    assert len(calls) == 1 and calls[0].get("fast") is True
    main([a for a in args if a != "--fast"] + (["--overwrite"] if args[0] != "eval" else []))
    assert len(calls) == 2 and calls[1].get("fast") is False


def test_registry_passes_fast_to_clip_and_sam_only(monkeypatch, caplog):
    seen = {}

    def fake_load(family):
        def load(card, weights=None, device="cpu", **options):
            seen[family] = options
            return type("Net", (), {"name": card.name})()
        return load

    monkeypatch.setattr(registry.FAMILIES["clip"], "load", fake_load("clip"))
    monkeypatch.setattr(registry.FAMILIES["sam"], "load", fake_load("sam"))
    monkeypatch.setattr(registry.FAMILIES["fianet"], "load", fake_load("fianet"))
    registry.load("openai-vit-b16", fast=True)
    assert seen["clip"] == {"fast": True}
    registry.load("sam-vit-b", fast=True)
    assert seen["sam"] == {"fast": True}
    with caplog.at_level(logging.WARNING, logger="rsvl.models.registry"):
        registry.load("fianet-rrsisd", fast=True)
    assert seen["fianet"] == {} and "no separate fast path" in caplog.text
    registry.load("openai-vit-b16")
    assert seen["clip"] == {}
