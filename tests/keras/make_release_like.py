"""Build the authors' seven released architectures in Keras with random weights and save each the
way the release was saved; write the Keras logits of random images beside it.

    TF_USE_LEGACY_KERAS=1 python tests/keras/make_release_like.py OUT_DIR [ARCH ...]

Runs in its own process (TensorFlow is a test-only dependency; the importer reads the files
with h5py alone). Keras 2 (tf_keras) is the Keras that wrote the release: legacy HDF5 files,
whole models for the keras.applications / efficientnet ones, weights only for the others.
For each ARCH it writes OUT_DIR/ARCH.h5 and OUT_DIR/ARCH.npz (x: NHWC inputs already
normalised with ImageNet mean/std, logits: the Keras model's output on them, computed in float64).
"""

import os
import sys
import types

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

# vit_keras 0.1.2 (tf.keras, as in the release) imports tensorflow_addons at the top for a gelu it
# uses only where tf.keras has none; tensorflow_addons no longer installs, and tf.keras has gelu.
sys.modules.setdefault("tensorflow_addons", types.ModuleType("tensorflow_addons"))


def _randomise(model, rng):
    """Every variable random: kernels He-scaled normal, every other variable
    (normalisation statistics and scales, biases, layer scales; embeddings and position biases at
    unit scale) is drawn here, so that a mis-mapped tensor shows in the logits."""
    for layer in model.layers:
        values = []
        for var, value in zip(layer.weights, layer.get_weights()):
            name = var.name.split("/")[-1].split(":")[0]
            if name in ("kernel", "depthwise_kernel") and value.ndim >= 2:
                # He-scaled normal: the input still shapes the logits after VGG's 16 ReLU layers
                fan_in = int(np.prod(value.shape[:-1])) if name == "kernel" else int(np.prod(value.shape[:2]))
                values.append((rng.standard_normal(value.shape) * np.sqrt(2.0 / fan_in)).astype(value.dtype))
            elif value.ndim >= 2:  # embeddings, class token, position biases: large enough to matter
                values.append(rng.standard_normal(value.shape).astype(value.dtype))
            elif "variance" in name:
                values.append(rng.uniform(0.5, 1.5, value.shape).astype(value.dtype))
            elif name in ("gamma", "weight") and value.ndim == 1:
                values.append(rng.uniform(0.5, 1.5, value.shape).astype(value.dtype))
            else:
                values.append((0.1 * rng.standard_normal(value.shape)).astype(value.dtype))
        layer.set_weights(values)


def build(arch):
    """(model, saved as a whole model?) for the release's loader of ``arch``."""
    if arch == "vgg16":
        return keras.applications.VGG16(weights=None, classifier_activation=None), True
    if arch == "resnet50v2":
        return keras.applications.ResNet50V2(weights=None, classifier_activation=None), True
    if arch == "efficientnet_b0":
        import efficientnet.tfkeras as efn

        model = efn.EfficientNetB0(weights=None)
        model.layers[-1].activation = keras.activations.linear  # the release outputs logits
        return model, True
    if arch == "vit_b16":
        from vit_keras import vit

        model = vit.vit_b16(image_size=224, activation="linear", pretrained=False, include_top=True,
                            pretrained_top=False)  # fmt: skip
        return model, False
    if arch == "convnext_tiny":
        from keras_cv_attention_models.convnext import ConvNeXtTiny

        return ConvNeXtTiny(classifier_activation=None, pretrained=None), False
    if arch == "maxvit_tiny":
        from keras_cv_attention_models.maxvit import MaxViT_Tiny

        return MaxViT_Tiny(classifier_activation=None, pretrained=None), False
    if arch == "levit128":
        from keras_cv_attention_models.levit import LeViT128

        return LeViT128(classifier_activation=None, use_distillation=False, pretrained=None), False
    raise SystemExit(f"unknown architecture {arch!r}")


ARCHS = ("vgg16", "resnet50v2", "efficientnet_b0", "vit_b16", "convnext_tiny", "maxvit_tiny", "levit128")


def main(out, archs):
    os.makedirs(out, exist_ok=True)
    for i, arch in enumerate(archs):
        rng = np.random.default_rng(i)
        keras.utils.set_random_seed(i)
        model, whole = build(arch)
        _randomise(model, rng)
        size = model.input_shape[1]
        x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
        path = os.path.join(out, f"{arch}.h5")
        if whole:
            model.save(path, save_format="h5")
        else:
            model.save_weights(path, save_format="h5")
        # The reference logits come from the same Keras model built in float64: with random weights
        # the float32 rounding of either framework alone moves MaxViT's logits by ~1e-4, which would
        # hide the mapping's own error (the file itself stays float32, as released).
        weights = model.get_weights()
        keras.backend.clear_session()
        keras.backend.set_floatx("float64")
        twin, _ = build(arch)
        twin.set_weights([w.astype(np.float64) for w in weights])
        logits = twin(x.astype(np.float64), training=False).numpy()
        keras.backend.set_floatx("float32")
        keras.backend.clear_session()
        np.savez(os.path.join(out, f"{arch}.npz"), x=x, logits=logits)
        print(arch, model.count_params(), logits.shape, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ARCHS)
