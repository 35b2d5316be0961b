"""The importer of the authors' released Keras models (advalign.keras_import) is exact.

The released files themselves cannot be fetched here, so tests/keras/make_release_like.py
builds each of the seven architectures with the library and builder the release's loaders
use (keras.applications, qubvel's efficientnet, vit_keras, keras_cv_attention_models; Keras 2
through tf_keras), gives every variable random values, saves it the way the release was saved
(whole model or weights only, legacy HDF5) and records Keras's logits on random images (the
same model computed in float64, so that float32 rounding does not hide a mapping error). The
pipeline's own import path (``checkpoint_keys: keras`` in advalign.weights.import_checkpoint)
must then give the same logits to 1e-4 relative, and a file that is not the row's
architecture, not HDF5 or not Keras 2 must be refused in one line with nothing cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from advalign.io import PipelineError, torch_load
from advalign.models import _create_timm
from advalign.weights import import_checkpoint

REPO = Path(__file__).resolve().parents[1]
# release file stem -> (timm architecture, timm kwargs) of the zoo row that imports it
ARCHS = {
    "vgg16": ("vgg16", "{}"),
    "resnet50v2": ("keras_resnet50v2", "{}"),
    "efficientnet_b0": ("tf_efficientnet_b0", "{}"),
    "vit_b16": ("vit_base_patch16_224", "{}"),
    "convnext_tiny": ("convnext_tiny", "{}"),
    "maxvit_tiny": ("maxvit_tiny_tf_224", "{}"),
    "levit128": ("levit_128", '{"distilled": false}'),
}
TOLERANCE = 1e-4  # max |logit difference| / max |Keras logit|


# Every test here reads files that TensorFlow writes first (about a minute): not in make test-fast.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def release_like(tmp_path_factory) -> Path:
    """The seven Keras files with random weights, and Keras's logits (one TensorFlow process)."""
    out = tmp_path_factory.mktemp("keras_release")
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(REPO / "tests" / "keras" / "make_release_like.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _row(stem: str, checkpoint: Path) -> dict:
    arch, kwargs = ARCHS[stem]
    return {"model": f"released_{stem}", "timm_name": arch, "timm_kwargs": kwargs,
            "checkpoint": str(checkpoint), "checkpoint_keys": "keras"}  # fmt: skip


def _logits(row: dict, weights: Path, x_nhwc: np.ndarray) -> np.ndarray:
    """The imported model's logits, in float64 like the Keras reference (the weights are float32)."""
    model = _create_timm(row, None).eval()
    model.load_state_dict(torch_load(weights), strict=True)
    with torch.no_grad():
        return model.double()(torch.from_numpy(x_nhwc).double().permute(0, 3, 1, 2)).numpy()


@pytest.mark.parametrize("stem", list(ARCHS))
def test_import_matches_keras_logits(release_like, tmp_path, stem):
    row = _row(stem, release_like / f"{stem}.h5")
    out = import_checkpoint(row, row["checkpoint"], tmp_path / f"{row['model']}.pth")
    reference = np.load(release_like / f"{stem}.npz")
    ours = _logits(row, out, reference["x"])
    keras_logits = reference["logits"]
    assert ours.shape == keras_logits.shape == (2, 1000)
    assert np.abs(keras_logits).max() > 0.1  # random weights that reach the logits
    error = np.abs(ours - keras_logits).max() / np.abs(keras_logits).max()
    assert error < TOLERANCE, f"{stem}: relative logit error {error:.2e}"
    # The two images' logits differ, so the comparison is not between two constants.
    assert np.abs(keras_logits[0] - keras_logits[1]).max() > 100 * TOLERANCE * np.abs(keras_logits).max()


def test_a_misplaced_position_bias_is_seen(release_like, tmp_path):
    """The test is sharp enough for the subtlest mapping: MaxViT's relative position biases
    read in the wrong order (transposed) move the logits well beyond the tolerance."""
    row = _row("maxvit_tiny", release_like / "maxvit_tiny.h5")
    out = import_checkpoint(row, row["checkpoint"], tmp_path / "maxvit.pth")
    state = torch_load(out)
    state = {k: (v.transpose(-1, -2).contiguous() if "bias_table" in k else v) for k, v in state.items()}
    torch.save(state, tmp_path / "transposed.pth")
    reference = np.load(release_like / "maxvit_tiny.npz")
    logits = _logits(row, tmp_path / "transposed.pth", reference["x"])
    error = np.abs(logits - reference["logits"]).max() / np.abs(reference["logits"]).max()
    assert error > 10 * TOLERANCE


def _refused(row: dict, tmp_path: Path) -> str:
    out = tmp_path / "cache" / f"{row['model']}.pth"
    out.parent.mkdir(exist_ok=True)
    with pytest.raises(PipelineError) as caught:
        import_checkpoint(row, row["checkpoint"], out)
    assert not out.exists() and not list(out.parent.iterdir()), "nothing may be written to the cache"
    message = str(caught.value)
    assert "\n" not in message and row["model"] in message
    return message


def test_a_file_of_another_architecture_is_refused_in_one_line(release_like, tmp_path):
    # ConvNeXt's weights offered to the ViT row: the first variable the ViT mapping needs is missing.
    row = dict(_row("vit_b16", release_like / "convnext_tiny.h5"))
    message = _refused(row, tmp_path)
    assert "no Keras variable 'embedding/kernel'" in message and "not this architecture's file" in message
    # LeViT's file for the VGG row, and VGG's for ResNet50V2: refused the same way.
    assert "not this architecture's file" in _refused(_row("vgg16", release_like / "levit128.h5"), tmp_path)
    assert "not this architecture's file" in _refused(_row("resnet50v2", release_like / "vgg16.h5"), tmp_path)


def test_a_file_that_does_not_fit_names_the_tensor(release_like, tmp_path):
    # The same names with another shape: the classifier of a 10-class model.
    bad = tmp_path / "convnext_10.h5"
    with h5py.File(release_like / "convnext_tiny.h5", "r") as src, h5py.File(bad, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for name in src:
            src.copy(src[name], dst, name=name)
        del dst["predictions/predictions/kernel:0"]
        dst["predictions/predictions/kernel:0"] = np.zeros((768, 10), np.float32)
    message = _refused(_row("convnext_tiny", bad), tmp_path)
    assert "tensor 'head.fc.weight' does not fit: Keras file [10, 768] vs convnext_tiny [1000, 768]" in message


def test_malformed_and_foreign_files_are_refused_in_one_line(release_like, tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x00\x01 not an hdf5 file" * 100)
    assert "is not an HDF5 file" in _refused(_row("vgg16", junk), tmp_path)
    html = tmp_path / "page.h5"
    html.write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    assert "an HTML page" in _refused(_row("vgg16", html), tmp_path)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes((release_like / "levit128.h5").read_bytes()[:100_000])
    assert "is not an HDF5 file" in _refused(_row("levit128", truncated), tmp_path)
    # A saved-format version the importer does not read: the same file marked as written by Keras 3.
    keras3 = tmp_path / "keras3.h5"
    keras3.write_bytes((release_like / "levit128.h5").read_bytes())
    with h5py.File(keras3, "a") as handle:
        handle.attrs["keras_version"] = "3.4.1"
    assert "written by Keras 3.4.1" in _refused(_row("levit128", keras3), tmp_path)
    # An HDF5 file that is not a Keras one at all.
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as handle:
        handle["data"] = np.zeros(3)
    assert "not a Keras 2 HDF5 model or weights file" in _refused(_row("levit128", plain), tmp_path)


# --------------------------------------------------------------------------- downloads


FETCH = {"retries": 1, "backoff_s": 0.05, "timeout_s": 10}


def _served(bucket: Path, server, name: str) -> dict:
    row = _row("levit128", Path("unused"))
    row["checkpoint"] = server.url.split("/click-me/")[0] + f"/models/{name}"
    return row


def test_a_released_file_downloads_resumes_and_is_locked(release_like, tmp_path):
    """download_checkpoint against a real HTTP server on 127.0.0.1: a partial download is resumed
    with a Range request; the file is read in full before its atomic rename; its sha256 is locked,
    and a later change of the file is refused when it is imported, with nothing cached."""
    from shard_server import serving

    from advalign.weights import download_checkpoint

    original = (release_like / "levit128.h5").read_bytes()
    bucket = tmp_path / "bucket"
    (bucket / "models").mkdir(parents=True)
    (bucket / "models" / "levit_small_harmonized.h5").write_bytes(original)
    dest = tmp_path / "weights" / "downloads" / "released_levit128.h5"
    dest.parent.mkdir(parents=True)
    half = len(original) // 2
    dest.with_name(dest.name + ".part").write_bytes(original[:half])  # a fetch killed halfway
    with serving(bucket) as server:
        row = _served(bucket, server, "levit_small_harmonized.h5")
        download_checkpoint(row, dest, FETCH)
        ranges = [rng for path, rng, status in server.requests]
    assert ranges == [f"bytes={half}-"]  # resumed, not restarted
    assert dest.read_bytes() == original and not dest.with_name(dest.name + ".part").exists()
    lock = json.loads((dest.parent / "checkpoints.lock.json").read_text())
    assert lock[dest.name]["sha256"] == hashlib.sha256(original).hexdigest() and lock[dest.name]["url"] == row["checkpoint"]
    # The download imports exactly like the file itself.
    cached = import_checkpoint(row, dest, tmp_path / "weights" / "released_levit128.pth")
    reference = np.load(release_like / "levit128.npz")
    logits = _logits(row, cached, reference["x"])
    assert np.abs(logits - reference["logits"]).max() < TOLERANCE * np.abs(reference["logits"]).max()
    # A byte changed after the download: the import refuses it in one line, and caches nothing.
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0xFF
    dest.write_bytes(bytes(changed))
    row["checkpoint"] = str(dest)
    (tmp_path / "weights" / "released_levit128.pth").unlink()
    message = _refused(row, tmp_path)
    assert "sha256 differs" in message and "checkpoints.lock.json" in message


def test_a_damaged_or_changed_release_is_refused_in_one_line(release_like, tmp_path):
    from shard_server import serving

    from advalign.weights import download_checkpoint

    original = (release_like / "levit128.h5").read_bytes()
    bucket = tmp_path / "bucket"
    (bucket / "models").mkdir(parents=True)
    (bucket / "models" / "truncated.h5").write_bytes(original[: int(len(original) * 0.6)])
    (bucket / "models" / "levit.h5").write_bytes(original)
    (bucket / "models" / "other.h5").write_bytes((release_like / "efficientnet_b0.h5").read_bytes())
    downloads = tmp_path / "weights" / "downloads"
    with serving(bucket) as server:
        # A file cut short on the server: read in full before the rename, so it is refused.
        dest = downloads / "cut.h5"
        with pytest.raises(PipelineError) as caught:
            download_checkpoint(_served(bucket, server, "truncated.h5"), dest, FETCH)
        assert "\n" not in str(caught.value) and "truncated.h5" in str(caught.value)
        assert not dest.exists() and not dest.with_name("cut.h5.part").exists()
        # Not on the server: one line naming the URL.
        with pytest.raises(PipelineError, match=r"missing\.h5: HTTP 404"):
            download_checkpoint(_served(bucket, server, "missing.h5"), downloads / "missing.h5", FETCH)
        # The published file changed since the first fetch (the lock remembers): refused.
        dest = downloads / "levit.h5"
        download_checkpoint(_served(bucket, server, "levit.h5"), dest, FETCH)
        dest.unlink()
        (bucket / "models" / "levit.h5").write_bytes((release_like / "convnext_tiny.h5").read_bytes())
        with pytest.raises(PipelineError, match="differs from .* recorded in .*checkpoints.lock.json"):
            download_checkpoint(_served(bucket, server, "levit.h5"), dest, FETCH)
        assert not dest.exists() and not dest.with_name("levit.h5.part").exists()
