"""Keras ``.h5`` checkpoints (the authors' released harmonized models) as timm state dicts.

Read with h5py alone (TensorFlow is not a dependency). A file is Keras 2's legacy HDF5
format, either a whole model (``model.save``: the weights under ``model_weights``, the
architecture in ``model_config``) or weights only (``model.save_weights``: the layers at the
root); both list their layers in ``layer_names`` and each layer's variables in
``weight_names``. Every variable is read under its own name without the ``:0`` suffix, e.g.
``block1_conv1/kernel``.

Each supported architecture has a mapping (:data:`KERAS_MAPPINGS`, keyed by the zoo row's
``timm_name`` without its tag) from those names onto the PyTorch model's state dict, with
the layout changes: a convolution kernel HWIO -> OIHW, a depthwise kernel HWC1 -> C1HW, a
dense kernel IO -> OI; BatchNorm gamma/beta/moving_mean/moving_variance -> weight/bias/
running_mean/running_var. Every variable of the file must be used and every tensor of the
model filled, with the same shape; the first one that is not is the one-line error.

What the importer cannot see from the weights alone is checked where the file says it:
the Keras version that wrote it (2.x: the layout read here) and, for whole models, the
final layer's activation (softmax would make the output probabilities: the importer takes
the logits before it and says so).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .io import PipelineError

log = logging.getLogger(__name__)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class KerasFile:
    """The variables of a legacy Keras HDF5 file: ``weights`` {name: array}, and what the file says
    about itself (``keras_version``, ``backend``, ``whole_model``, ``config``)."""

    def __init__(self, path: str | Path, where: str):
        import h5py

        self.path = Path(path)
        self.where = where
        try:
            handle = h5py.File(self.path, "r")
        except OSError as exc:
            with open(self.path, "rb") as raw:
                head = raw.read(16)
            reason = "an HTML page" if head.lstrip()[:1] == b"<" else f"starts with bytes {head[:8]!r}"
            raise PipelineError(f"{where}: {self.path} is not an HDF5 file ({reason}; {str(exc)[:80]})") from None
        try:
            with handle:
                self._read(handle, where)
        except (OSError, KeyError, RuntimeError) as exc:  # a truncated or damaged file, read past its end
            raise PipelineError(f"{where}: {self.path} is a damaged HDF5 file ({str(exc).splitlines()[0][:100]})") from None
        if not self.weights:
            raise PipelineError(f"{where}: {self.path} holds no Keras variables")

    def _read(self, handle, where: str) -> None:
        self.keras_version = _text(handle.attrs.get("keras_version", ""))
        self.backend = _text(handle.attrs.get("backend", ""))
        self.whole_model = "model_weights" in handle
        raw_config = handle.attrs.get("model_config")
        self.config = json.loads(_text(raw_config)) if raw_config is not None else None
        root = handle["model_weights"] if self.whole_model else handle
        if "layer_names" not in root.attrs:
            keras3 = "layers" in handle or "_layer_checkpoint_dependencies" in handle
            kind = "Keras 3's .weights.h5 layout" if keras3 else "no Keras layer list (attribute layer_names)"
            raise PipelineError(f"{where}: {self.path} is not a Keras 2 HDF5 model or weights file ({kind})")
        if not self.keras_version.startswith("2."):
            raise PipelineError(
                f"{where}: {self.path} was written by Keras {self.keras_version or '(no version)'}; "
                "the importer reads Keras 2's HDF5 layout (keras_version 2.x)"
            )
        self.weights: dict[str, np.ndarray] = {}
        for layer in root.attrs["layer_names"]:
            group = root[_text(layer)]
            for name in group.attrs.get("weight_names", []):
                name = _text(name)
                key = name[:-2] if name.endswith(":0") else name
                if key in self.weights:
                    raise PipelineError(f"{where}: {self.path} holds the Keras variable {key!r} twice")
                self.weights[key] = np.asarray(group[name])

    def final_activation(self) -> str | None:
        """The activation of the whole model's last layer (None for a weights-only file)."""
        if not self.config:
            return None
        layers = self.config.get("config", {}).get("layers", [])
        return layers[-1].get("config", {}).get("activation") if layers else None


class _Take:
    """Hands out the file's variables in PyTorch layout and remembers which were used."""

    def __init__(self, keras: KerasFile):
        self.keras = keras
        self.used: set[str] = set()
        self.state: dict = {}

    def raw(self, name: str) -> np.ndarray:
        if name not in self.keras.weights:
            first = ", ".join(list(self.keras.weights)[:3])
            raise PipelineError(
                f"{self.keras.where}: {self.keras.path} has no Keras variable {name!r} "
                f"(its first are {first}): not this architecture's file"
            )
        self.used.add(name)
        return self.keras.weights[name]

    def put(self, key: str, array: np.ndarray):
        import torch

        self.state[key] = torch.from_numpy(np.ascontiguousarray(array))

    def conv(self, key: str, layer: str, bias: bool = True):
        self.put(f"{key}.weight", self.raw(f"{layer}/kernel").transpose(3, 2, 0, 1))
        if bias:
            self.put(f"{key}.bias", self.raw(f"{layer}/bias"))

    def depthwise(self, key: str, layer: str, bias: bool = True):
        kernel = self.raw(f"{layer}/depthwise_kernel")  # [kh, kw, C, multiplier]
        kh, kw, c, m = kernel.shape
        self.put(f"{key}.weight", kernel.transpose(2, 3, 0, 1).reshape(c * m, 1, kh, kw))
        if bias:
            self.put(f"{key}.bias", self.raw(f"{layer}/bias"))

    def dense(self, key: str, layer: str, bias: bool = True):
        self.put(f"{key}.weight", self.raw(f"{layer}/kernel").T)
        if bias:
            self.put(f"{key}.bias", self.raw(f"{layer}/bias"))

    def bn(self, key: str, layer: str):
        for torch_name, keras_name in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                                       ("running_var", "moving_variance")):  # fmt: skip
            self.put(f"{key}.{torch_name}", self.raw(f"{layer}/{keras_name}"))

    def ln(self, key: str, layer: str):
        self.put(f"{key}.weight", self.raw(f"{layer}/gamma"))
        self.put(f"{key}.bias", self.raw(f"{layer}/beta"))


# ---------------------------------------------------------------------------
# The mappings, one per released architecture
# ---------------------------------------------------------------------------


def _vgg16(t: _Take, target: dict):
    """keras.applications VGG16 -> timm vgg16. Keras flattens the 7x7x512 map in HWC order before
    fc1; timm's fc1 is a 7x7 convolution, so fc1's rows become a [4096, 512, 7, 7] kernel."""
    convs = sorted({int(k.split(".")[1]) for k in target if k.startswith("features.")})
    names = [f"block{b}_conv{c}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for c in range(1, n + 1)]
    if len(convs) != len(names):
        raise PipelineError(f"{t.keras.where}: the VGG16 mapping needs timm's vgg16 (13 convolutions)")
    for index, name in zip(convs, names):
        t.conv(f"features.{index}", name)
    fc1 = t.raw("fc1/kernel")  # [7*7*512, 4096], rows in (h, w, c) order
    t.put("pre_logits.fc1.weight", fc1.reshape(7, 7, -1, fc1.shape[1]).transpose(3, 2, 0, 1))
    t.put("pre_logits.fc1.bias", t.raw("fc1/bias"))
    fc2 = t.raw("fc2/kernel")
    t.put("pre_logits.fc2.weight", fc2.T[:, :, None, None])
    t.put("pre_logits.fc2.bias", t.raw("fc2/bias"))
    t.dense("head.fc", "predictions")


def _resnet50v2(t: _Take, target: dict):
    """keras.applications ResNet50V2 -> advalign.keras_archs.keras_resnet50v2 (same layer order)."""
    t.conv("conv1", "conv1_conv")
    for s, depth in enumerate((3, 4, 6, 3)):
        for b in range(depth):
            key, name = f"stages.{s}.{b}", f"conv{s + 2}_block{b + 1}"
            t.bn(f"{key}.preact_bn", f"{name}_preact_bn")
            if b == 0:
                t.conv(f"{key}.shortcut", f"{name}_0_conv")
            t.conv(f"{key}.conv1", f"{name}_1_conv", bias=False)
            t.bn(f"{key}.bn1", f"{name}_1_bn")
            t.conv(f"{key}.conv2", f"{name}_2_conv", bias=False)
            t.bn(f"{key}.bn2", f"{name}_2_bn")
            t.conv(f"{key}.conv3", f"{name}_3_conv")
    t.bn("post_bn", "post_bn")
    t.dense("fc", "predictions")


def _efficientnet_b0(t: _Take, target: dict):
    """qubvel's efficientnet (the release's loader imports efficientnet.keras) EfficientNetB0 ->
    timm tf_efficientnet_b0 (TF 'same' padding, BatchNorm eps 1e-3, as in Keras)."""
    t.conv("conv_stem", "stem_conv", bias=False)
    t.bn("bn1", "stem_bn")
    stages = sorted({int(k.split(".")[1]) for k in target if k.startswith("blocks.")})
    for s in stages:
        blocks = sorted({int(k.split(".")[2]) for k in target if k.startswith(f"blocks.{s}.")})
        for b in blocks:
            key, name = f"blocks.{s}.{b}", f"block{s + 1}{chr(ord('a') + b)}"
            if f"{key}.conv_pwl.weight" in target:  # inverted residual: expand, depthwise, SE, project
                t.conv(f"{key}.conv_pw", f"{name}_expand_conv", bias=False)
                t.bn(f"{key}.bn1", f"{name}_expand_bn")
                t.depthwise(f"{key}.conv_dw", f"{name}_dwconv", bias=False)
                t.bn(f"{key}.bn2", f"{name}_bn")
                t.conv(f"{key}.se.conv_reduce", f"{name}_se_reduce")
                t.conv(f"{key}.se.conv_expand", f"{name}_se_expand")
                t.conv(f"{key}.conv_pwl", f"{name}_project_conv", bias=False)
                t.bn(f"{key}.bn3", f"{name}_project_bn")
            else:  # depthwise separable (expansion 1): depthwise, SE, project
                t.depthwise(f"{key}.conv_dw", f"{name}_dwconv", bias=False)
                t.bn(f"{key}.bn1", f"{name}_bn")
                t.conv(f"{key}.se.conv_reduce", f"{name}_se_reduce")
                t.conv(f"{key}.se.conv_expand", f"{name}_se_expand")
                t.conv(f"{key}.conv_pw", f"{name}_project_conv", bias=False)
                t.bn(f"{key}.bn2", f"{name}_project_bn")
    t.conv("conv_head", "top_conv", bias=False)
    t.bn("bn2", "top_bn")
    t.dense("classifier", "probs")


def _vit_b16(t: _Take, target: dict):
    """vit_keras vit_b16 -> timm vit_base_patch16_224; query/key/value are concatenated into qkv."""
    t.conv("patch_embed.proj", "embedding")
    t.put("cls_token", t.raw("class_token/cls"))
    t.put("pos_embed", t.raw("Transformer/posembed_input/pos_embedding"))
    depth = len({k.split(".")[1] for k in target if k.startswith("blocks.")})
    for i in range(depth):
        key, name = f"blocks.{i}", f"Transformer/encoderblock_{i}"
        attention = f"{name}/MultiHeadDotProductAttention_1"
        t.ln(f"{key}.norm1", f"{name}/LayerNorm_0")
        parts = [t.raw(f"{attention}/{p}/kernel").T for p in ("query", "key", "value")]
        t.put(f"{key}.attn.qkv.weight", np.concatenate(parts, axis=0))
        t.put(f"{key}.attn.qkv.bias", np.concatenate([t.raw(f"{attention}/{p}/bias") for p in ("query", "key", "value")]))
        t.dense(f"{key}.attn.proj", f"{attention}/out")
        t.ln(f"{key}.norm2", f"{name}/LayerNorm_2")
        t.dense(f"{key}.mlp.fc1", f"{name}/Dense_0")
        t.dense(f"{key}.mlp.fc2", f"{name}/Dense_1")
    t.ln("norm", "Transformer/encoder_norm")
    t.dense("head", "head")


def _convnext_tiny(t: _Take, target: dict):
    """keras_cv_attention_models ConvNeXtTiny -> timm convnext_tiny."""
    t.conv("stem.0", "stem_conv")
    t.ln("stem.1", "stem_ln")
    for s in range(4):
        if s > 0:
            t.ln(f"stages.{s}.downsample.0", f"stack{s + 1}_downsample_ln")
            t.conv(f"stages.{s}.downsample.1", f"stack{s + 1}_downsample_conv")
        blocks = sorted({int(k.split(".")[3]) for k in target if k.startswith(f"stages.{s}.blocks.")})
        for b in blocks:
            key, name = f"stages.{s}.blocks.{b}", f"stack{s + 1}_block{b + 1}"
            t.depthwise(f"{key}.conv_dw", f"{name}_dw_conv")
            t.ln(f"{key}.norm", f"{name}_ln")
            t.dense(f"{key}.mlp.fc1", f"{name}_up_dense")
            t.dense(f"{key}.mlp.fc2", f"{name}_down_dense")
            t.put(f"{key}.gamma", t.raw(f"{name}_gamma/weight"))
    t.ln("head.norm", "head_ln")
    t.dense("head.fc", "predictions")


def _levit_128(t: _Take, target: dict):
    """keras_cv_attention_models LeViT128 (use_distillation=False) -> timm levit_128 with
    distilled=False. Keras keeps each attention's position biases as [offsets, heads]."""

    def linear_bn(key: str, layer: str, bn_layer: str):
        t.dense(f"{key}.linear", layer, bias=False)
        t.bn(f"{key}.bn", bn_layer)

    def mlp(key: str, name: str):
        linear_bn(f"{key}.ln1", f"{name}_mlp_1_dense", f"{name}_mlp_1_bn")
        linear_bn(f"{key}.ln2", f"{name}_mlp_2_dense", f"{name}_mlp_2_bn")

    stem = sorted({k.split(".")[1] for k in target if k.startswith("stem.conv")})
    for i, conv in enumerate(stem, start=1):
        t.conv(f"stem.{conv}.linear", f"stem_{i}_conv", bias=False)
        t.bn(f"stem.{conv}.bn", f"stem_{i}_bn")
    stages = sorted({int(k.split(".")[1]) for k in target if k.startswith("stages.")})
    for s in stages:
        if f"stages.{s}.downsample.mlp.ln1.linear.weight" in target:
            key, name = f"stages.{s}.downsample", f"stack{s}_downsample"
            t.put(f"{key}.attn_downsample.attention_biases", t.raw(f"{name}_attn_pos/positional_embedding").T)
            linear_bn(f"{key}.attn_downsample.kv", f"{name}_kv", f"{name}_kv_bn")
            linear_bn(f"{key}.attn_downsample.q.ln", f"{name}_q", f"{name}_q_bn")
            linear_bn(f"{key}.attn_downsample.proj.ln", f"{name}_out", f"{name}_out_bn")
            mlp(f"{key}.mlp", name)
        blocks = sorted({int(k.split(".")[3]) for k in target if k.startswith(f"stages.{s}.blocks.")})
        for b in blocks:
            key, name = f"stages.{s}.blocks.{b}", f"stack{s + 1}_block{b + 1}"
            t.put(f"{key}.attn.attention_biases", t.raw(f"{name}_attn_pos/positional_embedding").T)
            linear_bn(f"{key}.attn.qkv", f"{name}_qkv", f"{name}_qkv_bn")
            linear_bn(f"{key}.attn.proj.ln", f"{name}_out", f"{name}_out_bn")
            mlp(f"{key}.mlp", name)
    t.bn("head.bn", "head_bn")
    t.dense("head.linear", "head")


def _maxvit_tiny(t: _Take, target: dict):
    """keras_cv_attention_models MaxViT_Tiny -> timm maxvit_tiny_tf_224 (the TensorFlow MaxViT's
    port: TF 'same' padding, BatchNorm eps 1e-3). Keras keeps the relative position biases flat,
    [heads, (2w-1)^2] with the offsets in reverse order, and the qkv projection as a 1x1 convolution."""
    t.conv("stem.conv1", "stem_1_conv")
    t.bn("stem.norm1", "stem_1_bn")
    t.conv("stem.conv2", "stem_2_conv")
    stages = sorted({int(k.split(".")[1]) for k in target if k.startswith("stages.")})
    for s in stages:
        blocks = sorted({int(k.split(".")[3]) for k in target if k.startswith(f"stages.{s}.blocks.")})
        for b in blocks:
            key, name = f"stages.{s}.blocks.{b}", f"stack_{s + 1}_block_{b + 1}"
            mb = f"{name}/mbconv"
            if f"{key}.conv.shortcut.expand.weight" in target:
                t.conv(f"{key}.conv.shortcut.expand", f"{mb}/shortcut_conv")
            t.bn(f"{key}.conv.pre_norm", f"{mb}/preact_bn")
            t.conv(f"{key}.conv.conv1_1x1", f"{mb}/expand_conv", bias=False)
            t.bn(f"{key}.conv.norm1", f"{mb}/expand_bn")
            t.depthwise(f"{key}.conv.conv2_kxk", f"{mb}/MB_dw_conv", bias=False)
            t.bn(f"{key}.conv.norm2", f"{mb}/MB_dw_bn")
            t.conv(f"{key}.conv.se.fc1", f"{mb}/se/1_conv")
            t.conv(f"{key}.conv.se.fc2", f"{mb}/se/2_conv")
            t.conv(f"{key}.conv.conv3_1x1", f"{mb}/MB_pw_conv")
            for part, kind in (("attn_block", "block"), ("attn_grid", "grid")):
                attn, mhsa = f"{key}.{part}", f"{name}/{kind}_window_mhsa"
                t.ln(f"{attn}.norm1", f"{name}/{kind}_attn_preact_ln")
                t.put(f"{attn}.attn.qkv.weight", t.raw(f"{mhsa}/qkv_conv/kernel")[0, 0].T)
                t.put(f"{attn}.attn.qkv.bias", t.raw(f"{mhsa}/qkv_conv/bias"))
                table = target[f"{attn}.attn.rel_pos.relative_position_bias_table"]
                flat = t.raw(f"{mhsa}/pos_emb/positional_embedding")  # offsets in the opposite order
                t.put(f"{attn}.attn.rel_pos.relative_position_bias_table",
                      flat.reshape(tuple(table.shape))[:, ::-1, ::-1])  # fmt: skip
                t.dense(f"{attn}.attn.proj", f"{mhsa}/output")
                t.ln(f"{attn}.norm2", f"{name}/{kind}_ffn_preact_ln")
                t.dense(f"{attn}.mlp.fc1", f"{name}/{kind}_ffn/1_dense")
                t.dense(f"{attn}.mlp.fc2", f"{name}/{kind}_ffn/2_dense")
    t.ln("head.norm", "post_ln")
    t.dense("head.pre_logits.fc", "features")
    t.dense("head.fc", "predictions")


# timm architecture -> (mapping, the release's Keras builder, as the error messages and docs name it)
KERAS_MAPPINGS = {
    "vgg16": (_vgg16, "keras.applications.VGG16"),
    "keras_resnet50v2": (_resnet50v2, "keras.applications.ResNet50V2"),
    "tf_efficientnet_b0": (_efficientnet_b0, "efficientnet.keras.EfficientNetB0"),
    "vit_base_patch16_224": (_vit_b16, "vit_keras.vit.vit_b16"),
    "convnext_tiny": (_convnext_tiny, "keras_cv_attention_models ConvNeXtTiny"),
    "levit_128": (_levit_128, "keras_cv_attention_models LeViT128"),
    "maxvit_tiny_tf_224": (_maxvit_tiny, "keras_cv_attention_models MaxViT_Tiny"),
}


def keras_state_dict(keras: KerasFile, arch: str, target: dict) -> dict:
    """The file's variables as the state dict ``target`` (the timm model's own): every variable of
    the file used, every tensor of the model filled with its shape; else a one-line error."""
    if arch not in KERAS_MAPPINGS:
        raise PipelineError(
            f"{keras.where}: no Keras mapping for architecture {arch!r} (mappings: {', '.join(KERAS_MAPPINGS)})"
        )
    take = _Take(keras)
    KERAS_MAPPINGS[arch][0](take, target)
    unused = [name for name in keras.weights if name not in take.used]
    if unused:
        raise PipelineError(
            f"{keras.where}: {keras.path}: Keras variable {unused[0]!r} {list(keras.weights[unused[0]].shape)} has no "
            f"place in {arch} ({len(unused)} unused): not this architecture's file"
        )
    state = {}
    for name, tensor in target.items():
        if name.endswith("num_batches_tracked") and name not in take.state:
            state[name] = tensor.clone()
            continue
        if name not in take.state:
            raise PipelineError(f"{keras.where}: {arch}'s tensor {name!r} is not filled by the Keras file")
        value = take.state[name]
        if tuple(value.shape) != tuple(tensor.shape):
            raise PipelineError(
                f"{keras.where}: tensor {name!r} does not fit: Keras file {list(value.shape)} vs "
                f"{arch} {list(tensor.shape)}"
            )
        state[name] = value.to(tensor.dtype).contiguous()
    extra = [name for name in take.state if name not in target]
    if extra:
        raise PipelineError(f"{keras.where}: the mapping fills {extra[0]!r}, which {arch} does not have")
    activation = keras.final_activation()
    if activation not in (None, "linear"):
        log.warning("%s: %s's last layer applies %s; the imported model outputs the logits before it",
                    keras.where, keras.path, activation)  # fmt: skip
    return state
