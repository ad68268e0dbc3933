"""The model zoo: CNNs nobody here wrote, built offline with seeded random weights.

Each :class:`ZooEntry` says how to build the model and what convlens must answer
on it: which heatmap methods refuse (with which words), which preprocessing a
Keras model gets, and for the timm models a narrow early layer on which the
perturbation CAMs are compared with pytorch-grad-cam (they score one masked
input per channel, so the reference runs one forward pass per channel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

import convlens as cl
from convlens.models.loading import from_module

#: the one-line reasons of the refusals the zoo expects (a substring of the ConvlensError message)
NO_GAP_HEAD = "global average pooling and a linear head"
NO_RELU = "guided backpropagation needs ReLU layers"
#: what the ReLU-rewriting methods say on a model without ReLU modules
RELU_REFUSALS = {"guided_backprop": NO_RELU, "guided_gradcam": NO_RELU,
                 "deconvolution": "deconvolution needs ReLU layers"}
#: what DeepLIFT says on a Keras model whose convolutions apply their activation inside
FUSED = "needs each nonlinearity as a layer of its own"
DEEPLIFT_REFUSALS = {"deeplift": FUSED, "deeplift_shap": FUSED}


@dataclass(frozen=True)
class ZooEntry:
    name: str
    framework: str                      # "timm" or "keras"
    build: Callable[[], cl.Model]
    refuses: dict[str, str] = field(default_factory=dict)  # method -> words of its one-line reason
    narrow_layer: str | None = None     # timm: few channels, for Score-CAM / Ablation-CAM against the reference
    preprocessing: str | None = None    # keras: the mode convlens must choose by itself
    tokens: int = 0                     # a ViT: class tokens in front of its patch grid (the layers are token maps)
    output: int | str | None = None     # a model with several outputs: the one with the class scores

    def __str__(self) -> str:  # the test id: ``pytest -k timm`` or ``-k "not keras-"`` picks a side
        return f"{self.framework}-{self.name}"


def _jitter_norms(module: torch.nn.Module, seed: int) -> None:
    """Give every BatchNorm trained-looking statistics and affine parameters.

    timm initialises the last BatchNorm of each residual block with a zero scale
    (``zero_init_last``), so a fresh ResNet or RegNet is a chain of identities
    and many channels are exactly dead; that hides the numerics a trained model
    exercises. The draws are seeded, so every run builds the same model.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
                if norm.affine:
                    norm.weight.uniform_(0.5, 1.5, generator=generator)
                    norm.bias.uniform_(-0.2, 0.2, generator=generator)
                if norm.track_running_stats:
                    norm.running_mean.uniform_(-0.2, 0.2, generator=generator)
                    norm.running_var.uniform_(0.5, 1.5, generator=generator)


def timm_model(name: str, size: int = 96, classes: int = 10) -> Callable[[], cl.Model]:
    def build() -> cl.Model:
        import timm

        torch.manual_seed(0)
        module = timm.create_model(name, pretrained=False, num_classes=classes).eval()
        _jitter_norms(module, seed=0)
        return from_module(module, name=name, input_size=size)

    return build


class WithFeatures(torch.nn.Module):
    """A timm CNN that returns ``(logits, pooled features)``, as a detector or retrieval model would."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        features = self.net.forward_features(x)
        return self.net.forward_head(features), features.mean(dim=(2, 3))


def two_outputs(name: str, size: int = 96) -> Callable[[], cl.Model]:
    def build() -> cl.Model:
        model = timm_model(name, size)()
        return cl.load_model(WithFeatures(model.module), input_size=size, output=0)

    return build


def vit_model(name: str, size: int = 96, classes: int = 10) -> Callable[[], cl.Model]:
    def build() -> cl.Model:
        import timm

        torch.manual_seed(0)
        module = timm.create_model(name, pretrained=False, num_classes=classes, img_size=size).eval()
        _jitter_norms(module, seed=0)
        return from_module(module, name=name)  # the size comes from the ViT itself

    return build


def _jitter_keras_norms(keras_model, seed: int) -> None:
    """:func:`_jitter_norms` for Keras: without it a fresh MobileNetV2's logits are ~1e-12, all classes tied."""
    from convlens.models.keras import keras_layers

    rng = np.random.default_rng(seed)
    for layer in keras_layers(keras_model).values():
        if type(layer).__name__ == "BatchNormalization":
            for variable, (low, high) in ((layer.gamma, (0.5, 1.5)), (layer.beta, (-0.2, 0.2)),
                                          (layer.moving_mean, (-0.2, 0.2)), (layer.moving_variance, (0.5, 1.5))):
                if variable is not None:
                    variable.assign(rng.uniform(low, high, variable.shape).astype("float32"))


def keras_model(name: str, classes: int = 10) -> Callable[[], cl.Model]:
    def build() -> cl.Model:
        import keras

        keras.utils.set_random_seed(0)
        model = getattr(keras.applications, name)(weights=None, classes=classes)
        _jitter_keras_norms(model, seed=0)
        return cl.load_model(model)

    return build


TIMM = [
    ZooEntry("resnet18d", "timm", timm_model("resnet18d"), narrow_layer="layer1"),
    ZooEntry("efficientnet_b0", "timm", timm_model("efficientnet_b0"), narrow_layer="blocks.2",
             refuses={**RELU_REFUSALS}),
    # the classifier reads a 1x1 conv after the pooling, not the pooled features
    ZooEntry("mobilenetv3_small_050", "timm", timm_model("mobilenetv3_small_050"), narrow_layer="blocks.2",
             refuses={"cam": NO_GAP_HEAD}),
    ZooEntry("regnetx_002", "timm", timm_model("regnetx_002"), narrow_layer="s1"),
    # pooling, then LayerNorm, then the linear layer; GELU everywhere
    ZooEntry("convnext_atto", "timm", timm_model("convnext_atto"), narrow_layer="stages.0",
             refuses={"cam": NO_GAP_HEAD, **RELU_REFUSALS}),
    # in-place ReLUs and concatenations: the classic trap for hooks
    ZooEntry("densenet121", "timm", timm_model("densenet121"), narrow_layer="features.pool0"),
    ZooEntry("ghostnet_050", "timm", timm_model("ghostnet_050"), narrow_layer="blocks.3",
             refuses={"cam": NO_GAP_HEAD}),
    ZooEntry("repvgg_a0", "timm", timm_model("repvgg_a0"), narrow_layer="stages.0"),
]

#: models nobody would call CNNs, through the same API: two outputs, a ViT, a hybrid ViT (ResNet stem)
OTHERS = [
    ZooEntry("resnet18d-two-outputs", "timm", two_outputs("resnet18d"), narrow_layer="net.layer1", output=0),
    # class token read by LayerNorm + linear head; GELU
    ZooEntry("vit_tiny_patch16", "timm", vit_model("vit_tiny_patch16_224"), narrow_layer="blocks.0.norm1",
             tokens=1, refuses={"cam": NO_GAP_HEAD, **RELU_REFUSALS}),
    ZooEntry("vit_tiny_r_s16_p8", "timm", vit_model("vit_tiny_r_s16_p8_224"), narrow_layer="blocks.0.norm1",
             tokens=1, refuses={"cam": NO_GAP_HEAD}),
]

KERAS = [
    ZooEntry("ResNet50", "keras", keras_model("ResNet50"), preprocessing="rescale"),
    ZooEntry("MobileNetV2", "keras", keras_model("MobileNetV2"), preprocessing="rescale"),
    # Rescaling(1/255) + Normalization at the input: the model takes 0-255 pixels; SiLU, no ReLU
    ZooEntry("EfficientNetB0", "keras", keras_model("EfficientNetB0"), preprocessing="raw",
             refuses={**RELU_REFUSALS, **DEEPLIFT_REFUSALS}),  # its squeeze-excitation convolutions apply SiLU
    # Normalization with 0-255 ImageNet statistics; pooling, then LayerNorm, then Dense; GELU
    ZooEntry("ConvNeXtTiny", "keras", keras_model("ConvNeXtTiny"), preprocessing="raw",
             refuses={"cam": NO_GAP_HEAD, **RELU_REFUSALS}),
    ZooEntry("Xception", "keras", keras_model("Xception"), preprocessing="rescale"),
    ZooEntry("DenseNet121", "keras", keras_model("DenseNet121"), preprocessing="rescale"),
]

#: FullGrad reads torch Conv2d/BatchNorm2d biases; a Keras model's layers are not those
NO_TORCH_BIASES = "which a Keras model does not have"
for _entry in KERAS:
    _entry.refuses.setdefault("fullgrad", NO_TORCH_BIASES)

ZOO = TIMM + OTHERS + KERAS


def flatten_dense_keras(size: int = 32, preprocessing_layers: tuple = (), name: str | None = None):
    """A small Keras classifier that takes ``size`` x ``size`` only: its Dense layer reads a Flatten."""
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((size, size, 3)), *preprocessing_layers,
                             keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                             keras.layers.MaxPooling2D(2, name="pool"),
                             keras.layers.Flatten(name="flatten"),
                             keras.layers.Dense(3, name="logits")], name=name)


#: LRP's refusal (a layer without a rule: SiLU, Hardswish, LayerNorm, a BatchNorm after a concatenation, attention,
#: a product of two activations, Keras layers) on every zoo model but the ReLU ResNets and RegNet, which it explains
NO_LRP_RULE = "LRP has no rule"
LRP_EXPLAINS = {"resnet18d", "regnetx_002", "resnet18d-two-outputs"}
for _entry in ZOO:
    if _entry.name not in LRP_EXPLAINS:
        _entry.refuses.update({m: NO_LRP_RULE for m in ("lrp", "lrp_epsilon_gamma_box", "lrp_alpha_beta")})
