"""Fuzz the service against its own OpenAPI schema (schemathesis): whatever a client sends,
the answer is never a server error, and every error is the JSON ``{"error": {...}}`` shape.
Bounded: a few examples per operation and no shrinking, so the whole run takes seconds."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, Phase, settings
from serve_util import shared_loader

from rsvl.serve.app import create_app
from rsvl.serve.safety import Limits


def _app() -> object:
    """The service over a root with the sample raster (built at import: the schema is read
    when the tests are collected)."""
    base = Path(tempfile.mkdtemp(prefix="rsvl-fuzz-"))
    (base / "root").mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "examples" / "OSBS_029.tif", base / "root")
    return create_app([base / "root"], state_dir=base / "state", workers=0,
                      limits=Limits(upload_bytes=2_000_000, image_pixels=512 * 512), model_loader=shared_loader)


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@schema.parametrize()
@settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    response = case.call()
    # 503 is the one 5xx a client can cause: a model whose weights are not on this machine
    assert response.status_code < 500 or (response.status_code == 503 and "weights" in response.text), f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body.get("error"), dict) and body["error"]["message"], response.text[:500]
        assert "Traceback" not in response.text
