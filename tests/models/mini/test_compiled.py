"""mini-clip's towers compiled into rsvl's cache: the same outputs as the eager towers, read
back without importing timm or transformers, rebuilt when broken, off on request."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from rsvl.models.mini import compiled
from rsvl.models.mini.clip import image_tower_for_clip
from rsvl.models.mini.towers import MiniLMTower

TEXTS = ["farmland", "a satellite image of a harbour with ships", "Überschwemmung am Fluss",
         " ".join(["a very long caption"] * 60)]  # > 128 tokens: truncated alike


def _build():
    return image_tower_for_clip().fuse_for_inference()


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsvl-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("RSVL_CACHE", str(root))
    image = compiled.compiled_image_tower("lite0-head", _build)
    text = compiled.compiled_minilm()
    mp.undo()
    assert image is not None and text is not None
    return root, (image, compiled.CompiledTextTower(*text))


def test_compiled_towers_match_the_eager_ones(warm_cache):
    _, (image, text) = warm_cache
    assert isinstance(image, torch.jit.ScriptModule)
    eager_text = MiniLMTower()
    assert (text(TEXTS) - eager_text(TEXTS)).abs().max() <= 1e-5
    for kw in ({"padding": True, "max_length": 128}, {"padding": "max_length", "max_length": 20}):
        ref = eager_text.tokenizer(TEXTS, truncation=True, return_tensors="pt", **kw)
        got = text.tokenizer(TEXTS, truncation=True, **kw)
        assert torch.equal(got["input_ids"], ref["input_ids"])
        assert torch.equal(got["attention_mask"], ref["attention_mask"])
    x = torch.randn(2, 3, 96, 136)
    with torch.inference_mode():
        for a, b in zip(_build()(x), image(x), strict=True):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-5


def test_second_load_reads_the_cache(warm_cache, monkeypatch):
    root, _ = warm_cache
    monkeypatch.setenv("RSVL_CACHE", str(root))
    monkeypatch.setattr(compiled, "_compile_image", lambda *a: pytest.fail("compiled again"))
    monkeypatch.setattr(compiled, "_compile_text", lambda *a: pytest.fail("compiled again"))
    assert compiled.compiled_image_tower("lite0-head", lambda: pytest.fail("built the eager tower")) is not None
    bert, tok = compiled.compiled_minilm()
    assert bert(**tok(["river"], padding=True)).last_hidden_state.shape == (1, 3, 384)


def test_a_broken_archive_is_rebuilt(warm_cache, tmp_path, monkeypatch, caplog):
    root, _ = warm_cache
    shutil.copytree(root, tmp_path / "cache")
    monkeypatch.setenv("RSVL_CACHE", str(tmp_path / "cache"))
    archive = compiled.cache_folder() / "lite0-head.ts"
    archive.write_bytes(archive.read_bytes()[:1000])  # truncated
    with caplog.at_level(logging.WARNING, logger="rsvl.models.mini.compiled"):
        tower = compiled.compiled_image_tower("lite0-head", _build)
    assert tower is not None and "compiling it again" in caplog.text
    assert archive.stat().st_size > 1_000_000
    assert not list(compiled.cache_folder().glob("*.part"))


def test_a_failed_compile_is_not_retried_on_every_load(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RSVL_CACHE", str(tmp_path))
    calls = []

    def fails():
        calls.append(1)
        raise RuntimeError("cannot script this")

    with caplog.at_level(logging.WARNING, logger="rsvl.models.mini.compiled"):
        assert compiled.compiled_image_tower("lite0-head", fails) is None
    assert "cannot script this" in caplog.text and "to try again" in caplog.text
    assert compiled.compiled_image_tower("lite0-head", fails) is None
    assert len(calls) == 1  # the second load went straight to the eager tower
    marker = compiled.cache_folder() / "lite0-head.ts.failed"
    assert "cannot script this" in marker.read_text()
    marker.unlink()  # as the warning says: deleting it tries again
    assert compiled.compiled_image_tower("lite0-head", fails) is None and len(calls) == 2


def test_the_cache_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("RSVL_COMPILED_TOWERS", "0")
    assert compiled.compiled_image_tower("lite0-head", lambda: pytest.fail("built")) is None
    assert compiled.compiled_minilm() is None


def _heavy_imports_after(load: str, root) -> str:
    """Which of the libraries a load should not need (timm, transformers, torchvision; and
    geopandas, scipy, FAISS, which only tasks writing vectors or indexes import) a fresh
    process has imported after ``load`` (Python code), with ``RSVL_CACHE`` at ``root``."""
    heavy = ("timm", "transformers", "torchvision", "geopandas", "scipy", "faiss")
    code = f"import sys, rsvl, numpy as np; {load}; print(sorted(k for k in {heavy!r} if k in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RSVL_CACHE": str(root)})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_loading_from_the_cache_imports_neither_timm_nor_transformers(warm_cache):
    """mini-clip (loaded, then classifying a chip), then mini-refer (whose image tower is
    compiled by its first load)."""
    root, _ = warm_cache
    chip = "m.classify(np.zeros((64, 64, 3), np.uint8), 'forest, water')"
    assert _heavy_imports_after(f"m = rsvl.load('mini-clip'); m.encode_text(['farmland']); {chip}", root) == "[]"
    _heavy_imports_after("rsvl.load('mini-refer')", root)  # compiles lite0-block6
    assert _heavy_imports_after("rsvl.load('mini-refer')", root) == "[]"


def test_weights_that_do_not_fit_are_the_users_error_not_a_cache_failure(tmp_path, monkeypatch):
    from rsvl.errors import CheckpointMismatchError

    monkeypatch.setenv("RSVL_CACHE", str(tmp_path / "cache"))

    def build():
        raise CheckpointMismatchError("heads.safetensors does not match mini-clip")

    with pytest.raises(CheckpointMismatchError, match="does not match"):
        compiled.compiled_image_tower("lite0-head", build)
    assert not list((tmp_path / "cache").rglob("*.failed"))  # and no marker: the next load tries again
