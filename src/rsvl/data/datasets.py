"""Benchmark dataset readers, in one namespace.

Every reader indexes paths and labels and reads pixels only on demand, so a dataset never
sits in memory. A missing file or an unexpected layout raises
:class:`rsvl.errors.DatasetError` naming the layout it expected.

=========================================  =============================================
reader                                     layout
=========================================  =============================================
:class:`UCMJsonDataset`                    ``ucm.json`` (classes, samples with image,
                                           label, split, captions)
:class:`SceneFolderDataset`                one folder per class
:class:`SceneCsvDataset`                   SkyScript CSV ``filepath,label`` + class names
:class:`KarpathyCaptionDataset`            ``dataset_*.json`` (RSICD, RSITMD, UCM)
:class:`RetrievalCsvDataset`               FarSLIP ``*_img_txt_pairs_test.csv``
:class:`SegmentationDataset`               mmseg ``img_dir/ann_dir``, ``images/labels``
:func:`segmentation_preset`                LoveDA / Potsdam / Vaihingen / WHU building
:class:`CocoInstanceDataset`               COCO instances JSON (1-based category ids)
=========================================  =============================================
"""

from __future__ import annotations

from rsvl.data.captions import (
    FARSLIP_CAPTION_PREFIX,
    CaptionSample,
    KarpathyCaptionDataset,
    RetrievalCsvDataset,
    RetrievalSet,
)
from rsvl.data.coco import CocoInstanceDataset, CocoSample
from rsvl.data.scenes import (
    SceneCsvDataset,
    SceneDataset,
    SceneFolderDataset,
    SceneSample,
    UCMJsonDataset,
    read_class_names,
    read_rgb,
)
from rsvl.data.segmentation import (
    SEG_PRESETS,
    SegmentationDataset,
    SegPreset,
    SegSample,
    segmentation_preset,
)

__all__ = [
    "FARSLIP_CAPTION_PREFIX",
    "SEG_PRESETS",
    "CaptionSample",
    "CocoInstanceDataset",
    "CocoSample",
    "KarpathyCaptionDataset",
    "RetrievalCsvDataset",
    "RetrievalSet",
    "SceneCsvDataset",
    "SceneDataset",
    "SceneFolderDataset",
    "SceneSample",
    "SegPreset",
    "SegSample",
    "SegmentationDataset",
    "UCMJsonDataset",
    "read_class_names",
    "read_rgb",
    "segmentation_preset",
]
