"""The service's HTTP API through FastAPI's test client: every endpoint and its error paths."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_util import png_b64, png_bytes, shared_loader

from rsvl.serve.app import create_app
from rsvl.serve.safety import Limits


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve-state")


@pytest.fixture(scope="module")
def client(roots: dict[str, Path], state_dir: Path) -> TestClient:
    app = create_app([roots["root"]], state_dir=state_dir, model_loader=shared_loader)
    return TestClient(app, raise_server_exceptions=False)


def wait(client: TestClient, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def error_of(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# -- open endpoints, models, files ------------------------------------------------------------
def test_health_and_models(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["mini-clip"]["weights_present"] and "segment" in models["mini-clip"]["tasks"]
    assert "farmland" in models["mini-fsvlm"]["tasks"]
    assert models["fianet-rrsisd"]["weights"] == "bring your own" and not models["fianet-rrsisd"]["weights_present"]


def test_page_and_leaflet_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "/static/leaflet/leaflet.js" in page.text and "http" not in page.text.split("<body>")[1].split("</body>")[0].replace("http-equiv", "")
    assert client.get("/static/leaflet/leaflet.js").status_code == 200
    assert client.get("/static/app.js").status_code == 200


def test_files_lists_rasters_and_hides_links_out(client: TestClient) -> None:
    doc = client.get("/v1/files").json()
    names = {e["name"] for e in doc["entries"]}
    assert {"OSBS_029.tif", "small.png", "sub"} <= names
    assert "escape.tif" not in names
    assert client.get("/v1/files", params={"dir": "sub"}).json()["entries"] == []


@pytest.mark.parametrize("path, status, code", [
    ("../outside/secret.tif", 403, "access_denied"),
    ("sub/../../outside/secret.tif", 403, "access_denied"),
    ("escape.tif", 403, "access_denied"),
    ("sub/out/secret.tif", 403, "access_denied"),
    ("/etc/passwd", 403, "access_denied"),
    ("nope.tif", 404, "input_not_found"),
])
def test_paths_outside_the_roots_are_refused(client: TestClient, path: str, status: int, code: str) -> None:
    for resp in (client.post("/layers", json={"path": path}), client.post("/v1/info", json={"path": path}),
                 client.post("/jobs", json={"task": "segment", "source": path, "params": {"classes": "a, b"}})):
        error_of(resp, status, code)


def test_absolute_path_under_root_is_allowed(client: TestClient, roots: dict[str, Path]) -> None:
    doc = client.post("/v1/info", json={"path": str(roots["root"] / "OSBS_029.tif")}).json()
    assert doc["width"] == 400 and doc["path"] == "OSBS_029.tif"


def _vrt(target: str, relative: bool = False) -> str:
    rel = ' relativeToVRT="1"' if relative else ""
    return (f'<VRTDataset rasterXSize="400" rasterYSize="400"><VRTRasterBand dataType="Byte" band="1">'
            f'<SimpleSource><SourceFilename{rel}>{target}</SourceFilename><SourceBand>1</SourceBand>'
            f'</SimpleSource></VRTRasterBand></VRTDataset>')


def test_vrts_may_only_read_files_under_the_roots(client: TestClient, roots: dict[str, Path]) -> None:
    root, outside = roots["root"], roots["outside"]
    (root / "inside.vrt").write_text(_vrt("OSBS_029.tif", relative=True))
    (root / "inside_abs.vrt").write_text(_vrt(str(root / "OSBS_029.tif")))
    (root / "leak.vrt").write_text(_vrt(str(outside / "secret.tif")))
    (root / "leak_rel.vrt").write_text(_vrt("../outside/secret.tif", relative=True))
    (root / "leak_link.vrt").write_text(_vrt("escape.tif", relative=True))  # a link out of the root
    (root / "cwd.vrt").write_text(_vrt("OSBS_029.tif"))  # relative to the server's working folder
    (root / "remote.vrt").write_text(_vrt("/vsicurl/http://example.com/x.tif"))
    (root / "disguised.tif").write_text(_vrt(str(outside / "secret.tif")))  # GDAL opens by content
    (root / "wms.tif").write_text("<GDAL_WMS><Service name='TMS'><ServerUrl>http://example.com</ServerUrl></Service></GDAL_WMS>")
    for name in ("inside.vrt", "inside_abs.vrt"):
        assert client.post("/v1/info", json={"path": name}).json()["width"] == 400
    for name in ("leak.vrt", "leak_rel.vrt", "leak_link.vrt", "cwd.vrt", "remote.vrt", "disguised.tif", "wms.tif"):
        for resp in (client.post("/v1/info", json={"path": name}), client.post("/layers", json={"path": name}),
                     client.post("/jobs", json={"task": "segment", "source": name, "params": {"classes": "a, b"}})):
            error_of(resp, 403, "access_denied")
    # uploads cannot be VRTs, whatever their name
    error_of(client.post("/uploads", files={"file": ("x.vrt", _vrt("/etc/passwd").encode())}), 400)
    error_of(client.post("/uploads", files={"file": ("x.tif", _vrt(str(root / "OSBS_029.tif")).encode())}), 403,
             "access_denied")


# -- layers and tiles -----------------------------------------------------------------------

def tile_of(layer: dict[str, Any], z: int) -> tuple[int, int]:
    import math

    west, south, east, north = layer["bounds"]
    lon, lat = (west + east) / 2, (south + north) / 2
    n = 2**z
    x = int((lon + 180) / 360 * n)
    y = int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n)
    return x, y


def test_layer_tiles(client: TestClient) -> None:
    layer = client.post("/layers", json={"path": "OSBS_029.tif"}).json()
    assert layer["georeferenced"] and -82 < layer["bounds"][0] < -81.9
    assert client.get(f"/layers/{layer['id']}").json()["id"] == layer["id"]
    x, y = tile_of(layer, 20)
    png = client.get(f"/tiles/{layer['id']}/20/{x}/{y}.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    img = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGBA"))
    assert img.shape == (256, 256, 4) and img[..., 3].max() == 255 and img[..., :3].std() > 5
    empty = np.asarray(Image.open(io.BytesIO(client.get(f"/tiles/{layer['id']}/20/0/0.png").content)).convert("RGBA"))
    assert empty[..., 3].max() == 0
    error_of(client.get("/tiles/0123456789abcdef/1/0/0.png"), 404, "job_not_found")
    error_of(client.get("/tiles/../../etc/1/0/0.png"), 404)
    error_of(client.get(f"/tiles/{layer['id']}/3/99/0.png"), 400)


def test_upload(client: TestClient) -> None:
    layer = client.post("/uploads", files={"file": ("my scene.png", png_bytes(32))}).json()
    assert layer["title"] == "my_scene.png" and not layer["georeferenced"]
    error_of(client.get(f"/tiles/{layer['id']}/1/0/0.png"), 400, "no_c_r_s")
    error_of(client.post("/uploads", files={"file": ("evil.sh", b"#!/bin/sh")}), 400)
    error_of(client.post("/uploads", files={"file": ("bad.tif", b"not a tiff")}), 400, "raster_read")
    error_of(client.post("/uploads", json={}), 400)


def test_upload_and_pixel_limits(roots: dict[str, Path], tmp_path: Path) -> None:
    app = create_app([roots["root"]], state_dir=tmp_path,
                     limits=Limits(upload_bytes=20_000, image_pixels=50 * 50, raster_pixels=300 * 300),
                     model_loader=shared_loader)
    c = TestClient(app, raise_server_exceptions=False)
    error_of(c.post("/uploads", files={"file": ("big.png", png_bytes(200))}), 413, "request_too_large")
    error_of(c.post("/v1/classify", json={"image": png_b64(60), "classes": "a, b"}), 413, "request_too_large")
    # a decompression bomb: tiny file, huge image
    buf = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buf, format="PNG", optimize=True)
    assert len(buf.getvalue()) < 20_000
    error_of(c.post("/v1/classify", files={"file": ("bomb.png", buf.getvalue())}, data={"classes": "a, b"}),
             413, "request_too_large")
    error_of(c.post("/layers", json={"path": "OSBS_029.tif"}), 413, "request_too_large")  # 400 x 400 > 300 x 300


def test_token(roots: dict[str, Path], tmp_path: Path) -> None:
    c = TestClient(create_app([roots["root"]], "s3cret", state_dir=tmp_path), raise_server_exceptions=False)
    assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
    error_of(c.get("/v1/models"), 401, "unauthorized")
    error_of(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    error_of(c.post("/v1/chat/completions", json={"messages": []}), 401)
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    error_of(c.post("/session", json={"token": "nope"}), 401)
    assert c.post("/session", json={"token": "s3cret"}).status_code == 200  # sets the cookie
    assert c.get("/v1/models").status_code == 200


def test_cors_is_off_by_default(client: TestClient) -> None:
    resp = client.options("/v1/models", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in resp.headers


# -- synchronous tasks ------------------------------------------------------------------------------
def test_classify_json_and_multipart(client: TestClient) -> None:
    doc = client.post("/v1/classify", json={"image": png_b64(), "classes": "forest, water, road", "top_k": 2}).json()
    pred = doc["result"]["predictions"][0]
    assert doc["state"] == "done" and len(pred["topk"]) == 2 and pred["label"] in ("forest", "water", "road")
    doc = client.post("/v1/classify", files={"file": ("x.png", png_bytes())},
                      data={"classes": "forest, water, road", "top_k": "1"}).json()
    assert len(doc["result"]["predictions"][0]["topk"]) == 1
    doc = client.post("/v1/classify", json={"path": "small.png", "classes": "forest, water"}).json()
    assert doc["result"]["predictions"][0]["label"] in ("forest", "water")


def test_sync_errors(client: TestClient) -> None:
    error_of(client.post("/v1/classify", json={"image": png_b64(), "classes": "a, b", "model": "no-such-model"}),
             404, "unknown_model")
    error_of(client.post("/v1/classify", json={"image": png_b64(), "classes": "a, b", "model": "mini-chat"}),
             404, "unknown_model")
    error_of(client.post("/v1/classify", json={"classes": "a, b"}), 400, "prompt")
    error_of(client.post("/v1/classify", json={"image": png_b64(), "path": "small.png", "classes": "a"}), 400)
    error_of(client.post("/v1/classify", json={"image": "not base64!", "classes": "a"}), 400, "raster_read")
    error_of(client.post("/v1/classify", json={"image": "https://example.com/x.png", "classes": "a"}), 400)
    error_of(client.post("/v1/classify", json={"image": png_b64(), "classes": "a", "top_k": 0}), 422, "invalid_request")
    error_of(client.post("/v1/classify", json={"image": png_b64(), "classes": "a", "bogus": 1}), 422)
    error_of(client.post("/v1/classify", content=b"{", headers={"content-type": "application/json"}), 400)
    error_of(client.post("/v1/classify", json=[1, 2]), 400)
    error_of(client.get("/v1/nothing"), 404, "http_404")
    error_of(client.put("/health"), 405)


def test_missing_weights_is_a_clear_error(client: TestClient) -> None:
    err = error_of(client.post("/v1/farmland", json={"image": png_b64(), "request": "Please segment the farmland.",
                                                     "model": "fsvlm-7b"}), 503, "weights_not_found")
    assert "fsvlm-7b" in err["message"] and "rsvl fetch" in err["hint"]
    error_of(client.post("/jobs", json={"task": "refer", "model": "fianet-rrsisd", "source": "OSBS_029.tif",
                                        "params": {"expression": "the tree"}}), 503, "weights_not_found")


def test_farmland_sync_with_the_built_in_model(client: TestClient) -> None:
    doc = client.post("/v1/farmland", json={"image": png_b64(), "request": "Please segment the farmland."}).json()
    assert doc["state"] == "done" and doc["model"] == "mini-fsvlm"
    assert "[SEG]" in doc["result"]["answer"] and doc["result"]["target"] == "farmland"
    assert doc["layers"]["classes"]["legend"][1]["name"] == "farmland"
    tif = client.get(f"/jobs/{doc['id']}/files/{doc['outputs']['classes']}")
    assert tif.status_code == 200 and tif.content[:2] in (b"II", b"MM")
    error_of(client.post("/v1/farmland", json={"image": png_b64(), "request": "  "}), 400)
    # found by the schema fuzz: a model that is not a name is a clear 400, not a server error
    error_of(client.post("/v1/instances", json={"image": png_b64(), "model": {"<": []}}), 400)


def test_segment_image_sync_files(client: TestClient) -> None:
    doc = client.post("/v1/segment", json={"image": png_b64(64), "classes": "forest, water"}).json()
    # the shipped mini-clip adds its learned "other" as a background class
    assert doc["state"] == "done" and set(doc["result"]["class_fractions"]) == {"forest", "water", "background"}
    names = {f["name"] for f in doc["files"]}
    assert {"input_classes.tif", "input_overlay.png"} <= names
    png = client.get(f"/jobs/{doc['id']}/files/input_overlay.png")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    error_of(client.get(f"/jobs/{doc['id']}/files/../job.json"), 404)
    error_of(client.get(f"/jobs/{doc['id']}/files/nothing.tif"), 404, "job_not_found")


def test_refer_and_instances_sync(client: TestClient) -> None:
    doc = client.post("/v1/refer", json={"image": png_b64(64), "expression": "the building on the left"}).json()
    assert doc["state"] == "done", doc
    assert "overlay" in doc["outputs"]
    doc = client.post("/v1/instances", json={"image": png_b64(64), "score": 0.9}).json()
    assert doc["state"] == "done", doc
    assert "instances" in doc["outputs"]


def test_chat_sync_with_history_and_layer(client: TestClient) -> None:
    doc = client.post("/v1/chat", json={"image": png_b64(), "question": "What is this?", "max_tokens": 4}).json()
    assert isinstance(doc["result"]["answer"], str) and doc["result"]["settings"]["max_new_tokens"] == 4
    layer = client.post("/layers", json={"path": "OSBS_029.tif"}).json()
    doc = client.post("/v1/chat", json={"layer": layer["id"], "question": "Is there a road?", "max_tokens": 4,
                                        "history": [["What is this?", "A forest."]]}).json()
    assert doc["state"] == "done" and doc["result"]["kind"] == "yesno"
    form = client.post("/v1/chat", files={"file": ("x.png", png_bytes())},
                       data={"question": "Describe it.", "max_tokens": "3", "history": '[["a?", "b."]]'})
    assert form.status_code == 200, form.text


# -- jobs ---------------------------------------------------------------------------------------------
def test_segment_job_outputs_layers_features(client: TestClient) -> None:
    job = client.post("/jobs", json={"task": "segment", "source": "OSBS_029.tif",
                                     "params": {"classes": "trees, grass, road"}})
    assert job.status_code == 202 and job.json()["state"] == "queued"
    job = wait(client, job.json()["id"])
    assert job["state"] == "done" and job["done"] == job["total"] >= 1 and job["rate"] is not None
    assert [item["name"] for item in job["legend"]] == ["trees", "grass", "road", "background"]
    assert job["legend"][0]["color"].startswith("#")
    classes = job["layers"]["classes"]
    x, y = tile_of(classes, 20)
    tile = np.asarray(Image.open(io.BytesIO(client.get(f"/tiles/{classes['id']}/20/{x}/{y}.png").content)).convert("RGBA"))
    legend_rgb = {tuple(int(item["color"][i:i + 2], 16) for i in (1, 3, 5)) for item in job["legend"]}
    opaque = tile[tile[..., 3] == 255][:, :3]
    assert len(opaque) and {tuple(p) for p in np.unique(opaque, axis=0)} <= legend_rgb
    gj = client.get(job["features"]["polygons"]).json()
    assert gj["type"] == "FeatureCollection" and gj["features"]
    assert -82 < gj["features"][0]["geometry"]["coordinates"][0][0][0] < -81.9  # EPSG:4326
    tif = client.get(f"/jobs/{job['id']}/files/OSBS_029_classes.tif")
    assert tif.status_code == 200 and tif.content[:2] in (b"II", b"MM")
    assert any(j["id"] == job["id"] for j in client.get("/jobs").json()["jobs"])
    error_of(client.delete(f"/jobs/{job['id']}"), 409, "job_state")
    error_of(client.get(f"/jobs/{job['id']}/features/overlay"), 404)


def test_job_errors(client: TestClient) -> None:
    error_of(client.get("/jobs/0123456789abcdef"), 404, "job_not_found")
    error_of(client.get("/jobs/../../etc"), 404)
    error_of(client.delete("/jobs/zzz"), 404, "job_not_found")
    error_of(client.post("/jobs", json={"task": "segment", "source": "OSBS_029.tif", "params": {}}), 422)
    error_of(client.post("/jobs", json={"task": "explode", "source": "OSBS_029.tif"}), 422)
    error_of(client.post("/jobs", json={"task": "segment", "params": {"classes": "a"}}), 400)
    job = client.post("/jobs", json={"task": "segment", "source": "OSBS_029.tif",
                                     "params": {"classes": "a, a"}}).json()
    job = wait(client, job["id"])
    assert job["state"] == "failed" and job["error"]["type"] == "PromptError" and "Traceback" not in job["error"]["message"]


def test_cancel_and_resume_after_restart(roots: dict[str, Path], tmp_path: Path) -> None:
    # workers=0: jobs wait in the queue (a service that stops before running them)
    first = TestClient(create_app([roots["root"]], state_dir=tmp_path, workers=0, model_loader=shared_loader),
                       raise_server_exceptions=False)
    keep = first.post("/jobs", json={"task": "classify", "source": "OSBS_029.tif",
                                     "params": {"classes": "trees, road", "tile": 200}}).json()
    drop = first.post("/jobs", json={"task": "segment", "source": "OSBS_029.tif", "params": {"classes": "a, b"}}).json()
    cancelled = first.delete(f"/jobs/{drop['id']}").json()
    assert cancelled["state"] == "cancelled"
    # a job the last process was running when it died
    running = first.post("/jobs", json={"task": "segment", "source": "OSBS_029.tif", "params": {"classes": "trees, road"}}).json()
    import json as _json

    jf = tmp_path / "jobs" / running["id"] / "job.json"
    rec = _json.loads(jf.read_text())
    rec["state"] = "running"
    jf.write_text(_json.dumps(rec))

    second = TestClient(create_app([roots["root"]], state_dir=tmp_path, workers=1, model_loader=shared_loader),
                        raise_server_exceptions=False)
    done = wait(second, keep["id"])
    assert done["state"] == "done" and done["total"] == 4 and done["outputs"]["labels"].endswith("_tiles.tif")
    resumed = wait(second, running["id"])
    assert resumed["state"] == "done" and resumed["resumed"]
    assert second.get(f"/jobs/{drop['id']}").json()["state"] == "cancelled"


def test_cancel_running_job(roots: dict[str, Path], tmp_path: Path) -> None:
    gate = __import__("threading").Event()

    def slow_loader(name: str, device: str) -> Any:
        gate.wait(30)
        return shared_loader(name, device)

    c = TestClient(create_app([roots["root"]], state_dir=tmp_path, model_loader=slow_loader),
                   raise_server_exceptions=False)
    job = c.post("/jobs", json={"task": "classify", "source": "OSBS_029.tif",
                                "params": {"classes": "a, b", "tile": 100}}).json()
    while c.get(f"/jobs/{job['id']}").json()["state"] == "queued":
        time.sleep(0.05)
    assert c.delete(f"/jobs/{job['id']}").json()["state"] == "cancelling"
    gate.set()
    done = wait(c, job["id"])
    assert done["state"] == "cancelled" and not done["files"]


def test_index_job_and_search(client: TestClient) -> None:
    job = wait(client, client.post("/jobs", json={"task": "index", "source": "OSBS_029.tif",
                                                  "params": {"tile": 100, "gsd": 0}}).json()["id"])
    assert job["state"] == "done", job
    res = client.post("/v1/search", json={"index": job["id"], "text": "trees", "k": 3}).json()
    assert len(res["hits"]) == 3 and res["features"]["features"]
    res = client.post("/v1/search", json={"index": job["id"], "image": png_b64(), "k": 2}).json()
    assert len(res["hits"]) == 2
    error_of(client.post("/v1/search", json={"index": job["id"]}), 400, "prompt")
    error_of(client.post("/v1/search", json={"index": "0123456789abcdef", "text": "x"}), 404)
    error_of(client.post("/v1/search", json={"index": "../x", "text": "x"}), 403)


def test_cli_registers_serve() -> None:
    from typer.testing import CliRunner

    from rsvl.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"])
    assert out.exit_code == 0 and "--root" in out.output and "127.0.0.1" in out.output
    bad = CliRunner().invoke(app, ["serve", "--jobs", "0"])
    assert bad.exit_code == 2


def test_old_finished_jobs_and_uploads_are_deleted(roots: dict[str, Path], tmp_path: Path) -> None:
    first = TestClient(create_app([roots["root"]], state_dir=tmp_path, workers=0, model_loader=shared_loader),
                       raise_server_exceptions=False)
    queued = first.post("/jobs", json={"task": "segment", "source": "OSBS_029.tif", "params": {"classes": "a, b"}}).json()
    old = first.post("/jobs", json={"task": "segment", "source": "OSBS_029.tif", "params": {"classes": "a, b"}}).json()
    first.delete(f"/jobs/{old['id']}")  # cancelled while queued: finished now
    upload = first.post("/uploads", files={"file": ("old.png", png_bytes(16))}).json()
    record = tmp_path / "jobs" / old["id"] / "job.json"
    doc = json.loads(record.read_text())
    doc["finished"] = time.time() - 9 * 86400
    record.write_text(json.dumps(doc))
    (up_dir,) = (tmp_path / "uploads").iterdir()
    os.utime(up_dir, (time.time() - 9 * 86400,) * 2)
    kept = TestClient(create_app([roots["root"]], state_dir=tmp_path, workers=0, model_loader=shared_loader,
                                 keep_days=None), raise_server_exceptions=False)
    assert kept.get(f"/jobs/{old['id']}").status_code == 200 and up_dir.exists()
    second = TestClient(create_app([roots["root"]], state_dir=tmp_path, workers=0, model_loader=shared_loader,
                                   keep_days=7), raise_server_exceptions=False)
    error_of(second.get(f"/jobs/{old['id']}"), 404, "job_not_found")
    assert not (tmp_path / "jobs" / old["id"]).exists() and not up_dir.exists()
    assert second.get(f"/jobs/{queued['id']}").json()["state"] == "queued"  # never touched
    assert upload["id"]
