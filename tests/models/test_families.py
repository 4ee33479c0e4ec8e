"""Every family package lists its cards at once and imports the rest on first use
(rsvl.models.lazy): every name it exports must still import, and loading a built-in model
must not import the libraries only other families need."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

from rsvl.models import registry


@pytest.mark.parametrize("family", sorted(registry.FAMILIES))
def test_every_exported_name_imports(family):
    module = registry.FAMILIES[family]
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{family}.{name}"
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_loading_mini_clip_imports_no_other_family_library():
    """open_clip and the other families' builders each cost seconds at start-up
    (bench/load_time.py); mini-clip's towers come from timm and transformers."""
    code = ("import sys, rsvl\nrsvl.load('mini-clip')\n"
            "print(sorted(m for m in ('open_clip', 'rsvl.models.clip.model', 'rsvl.models.llava.build', "
            "'rsvl.models.rsprompter.build', 'rsvl.models.fianet.build', 'rsvl.models.mini.chat',) "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_importing_a_submodule_does_not_hide_the_function_of_the_same_name():
    import importlib

    for family in ("fianet", "llava", "rsprompter", "sam"):
        importlib.import_module(f"rsvl.models.{family}.build")
        assert callable(registry.FAMILIES[family].build), family
