"""WHU label rasters are opened through rsvl.geo.raster.open_dataset: a label that is a VRT
with a raw raster band (which would read any local file as pixels) is refused."""

from __future__ import annotations

import pytest

from rsvl.data.instances import whu_to_coco
from rsvl.errors import RasterReadError


def test_whu_label_raw_band_vrt_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("RSVL_ALLOW_VRT_RAW", raising=False)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"\xff" * 64)
    for sub in ("image", "label"):
        (tmp_path / "whu" / "train" / sub).mkdir(parents=True)
    vrt = ('<VRTDataset rasterXSize="16" rasterYSize="4">\n'
           '  <VRTRasterBand dataType="Byte" band="1" subClass="VRTRawRasterBand">\n'
           f'    <SourceFilename relativetoVRT="0">{secret}</SourceFilename>\n'
           "    <ImageOffset>0</ImageOffset><PixelOffset>1</PixelOffset><LineOffset>16</LineOffset>\n"
           "  </VRTRasterBand>\n</VRTDataset>\n")
    (tmp_path / "whu" / "train" / "image" / "a.vrt").write_text(vrt)
    (tmp_path / "whu" / "train" / "label" / "a.vrt").write_text(vrt)
    with pytest.raises(RasterReadError, match="raw raster band"):
        whu_to_coco(tmp_path / "whu", "train", image_suffixes=(".vrt",))
