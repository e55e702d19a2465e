"""The download stage's functions: annotations, relabel overlay, start points, safe archives."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import zipfile
from pathlib import Path

import pytest

from stages import download
from testkit.fixture import ANNOTATIONS_ZIP, CHECKPOINT_TARBALL, RELABEL_ZIP
from testkit.fixture_server import FixtureServer
from testkit.keras_weights import KERAS_WEIGHTS_PATH
from trafficdet.architectures import ARCHITECTURES, KERAS_MOBILENET_V2_URL
from trafficdet.archive import extract_tar, extract_zip
from trafficdet.errors import PipelineError
from trafficdet.fetch import RetryPolicy, file_digest

FAST = RetryPolicy(retries=1, backoff_s=0.01, timeout_s=10)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # stage paths are relative to the repository root


def test_annotations_keep_only_instances(fixture_tree, server: FixtureServer) -> None:
    _, manifest = fixture_tree
    download.download_annotations(f"{server.url}/{ANNOTATIONS_ZIP}", manifest["checksums"][ANNOTATIONS_ZIP], FAST)
    out = Path("data/raw/annotations")
    assert sorted(p.name for p in out.iterdir()) == ["instances_train2017.json", "instances_val2017.json", "manifest.json"]
    record = json.loads((out / "manifest.json").read_text())["downloads"][0]
    assert record["file"] == "annotations_trainval2017.zip" and len(record["sha256"]) == 64


def test_relabel_overlay_and_its_off_switch(fixture_tree, server: FixtureServer) -> None:
    _, manifest = fixture_tree
    download.download_relabel(f"{server.url}/{RELABEL_ZIP}", manifest["checksums"][RELABEL_ZIP], FAST)
    names = sorted(p.name for p in Path("data/raw/relabel").iterdir())
    assert names == ["instances_train_traffic.json", "instances_val_traffic.json", "manifest.json"]
    download.download_relabel("", "", FAST)
    assert [p.name for p in Path("data/raw/relabel").iterdir()] == ["manifest.json"]


def test_checkpoint_unpacks_its_single_root_folder(fixture_tree, server: FixtureServer) -> None:
    _, manifest = fixture_tree
    download.download_checkpoint(
        "mobilenet_multi_avg", f"{server.url}/{CHECKPOINT_TARBALL}", manifest["checksums"][CHECKPOINT_TARBALL], FAST
    )
    files = sorted(p.name for p in Path("models/pretrained/mobilenet_multi_avg").iterdir())
    assert files == ["checkpoint", "ckpt-277200.data-00000-of-00001", "ckpt-277200.index"]
    download.download_checkpoint("scratch", "", "", FAST)
    assert json.loads(Path("models/pretrained/manifest.json").read_text()) == {"pretrained": "scratch"}


def test_checkpoint_403_is_one_line_naming_the_url_param_and_the_default_that_downloads(server: FixtureServer) -> None:
    server.inject(CHECKPOINT_TARBALL, "status:403")
    with pytest.raises(PipelineError) as raised:
        download.download_checkpoint("mobilenet_multi_avg", f"{server.url}/{CHECKPOINT_TARBALL}", "", FAST)
    message = str(raised.value)
    assert "\n" not in message
    assert re.search(r"HTTP 403.*set download\.checkpoint_url to a copy.*download\.pretrained: mobilenet_v2_imagenet", message)
    assert not Path("models/pretrained").exists()


def test_imagenet_weights_are_fetched_as_they_are_and_recorded(keras_weights: Path, server: FixtureServer) -> None:
    download.download_checkpoint("mobilenet_v2_imagenet", f"{server.url}/{KERAS_WEIGHTS_PATH}", "", FAST)
    manifest = json.loads(Path("models/pretrained/manifest.json").read_text())
    kept = Path("models/pretrained") / manifest["file"]
    assert kept.read_bytes() == keras_weights.read_bytes()
    assert manifest["pretrained"] == "mobilenet_v2_imagenet"
    assert manifest["downloads"][0]["sha256"] == file_digest(keras_weights)  # no published hash: the fetched one


def test_imagenet_default_url_is_the_one_keras_loads() -> None:
    """Our URL (and the fixture's path under it) is where the installed Keras fetches the no-top alpha-1.0 file."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from keras.src.applications import mobilenet_v2

    name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    assert mobilenet_v2.BASE_WEIGHT_PATH + name == KERAS_MOBILENET_V2_URL
    assert KERAS_MOBILENET_V2_URL.endswith("/" + KERAS_WEIGHTS_PATH)


def test_weights_file_pointing_outside_itself_is_refused(tmp_path: Path) -> None:
    import h5py

    served = tmp_path / "served"
    weights = served / KERAS_WEIGHTS_PATH
    weights.parent.mkdir(parents=True)
    with h5py.File(weights, "w") as handle:
        handle.attrs["layer_names"] = [b"Conv1"]
        handle["Conv1"] = h5py.ExternalLink("/etc/passwd", "/")
    with (
        FixtureServer(served) as srv,
        pytest.raises(PipelineError, match=r"/Conv1 is an HDF5 ExternalLink, which points elsewhere"),
    ):
        download.download_checkpoint("mobilenet_v2_imagenet", f"{srv.url}/{KERAS_WEIGHTS_PATH}", "", FAST)
    assert not Path("models/pretrained").exists()


def test_truncated_archive_is_clear_and_leaves_nothing(fixture_tree, tmp_path: Path) -> None:
    root, _ = fixture_tree
    data = (root / ANNOTATIONS_ZIP).read_bytes()
    served = tmp_path / "served"
    (served / "annotations").mkdir(parents=True)
    (served / ANNOTATIONS_ZIP).write_bytes(data[: len(data) // 2])
    with (
        FixtureServer(served) as srv,
        pytest.raises(PipelineError, match=r"annotations_trainval2017\.zip: truncated or corrupt zip"),
    ):
        download.download_annotations(f"{srv.url}/{ANNOTATIONS_ZIP}", "", FAST)
    assert not Path("data/raw/annotations").exists()
    assert [p.name for p in Path("data/raw").iterdir()] == []  # no temp folders left behind


def test_truncated_tarball_is_clear(fixture_tree, tmp_path: Path) -> None:
    root, _ = fixture_tree
    data = (root / CHECKPOINT_TARBALL).read_bytes()
    broken = tmp_path / "c.tar.gz"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match=r"c\.tar\.gz: truncated or corrupt tar"):
        extract_tar(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../evil.json", "/etc/evil.json", "a/../../evil.json"])
def test_zip_path_escapes_are_refused(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.json", "{}")
        zf.writestr(name, "{}")
    with pytest.raises(PipelineError, match="unsafe path"):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.json").exists()


def test_zip_symlink_members_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    info = zipfile.ZipInfo("link")
    info.external_attr = 0o120777 << 16  # a symlink, as Info-ZIP stores it
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(PipelineError, match="is a symlink"):
        extract_zip(archive, tmp_path / "out")


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink_out"])
def test_tar_escapes_are_refused(tmp_path: Path, kind: str) -> None:
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        if kind == "symlink_out":
            info = tarfile.TarInfo("root/link")
            info.type, info.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
            tf.addfile(info)
        else:
            info = tarfile.TarInfo("/tmp/evil" if kind == "absolute" else "root/../../evil")
            info.size = 2
            tf.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(PipelineError, match="unsafe"):
        extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_architecture_table_matches_model_maker() -> None:
    """Our TF-free copy of model_spec.py must agree with the installed Model Maker."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from mediapipe_model_maker.python.vision.object_detector import model_spec

    for arch in ARCHITECTURES.values():
        spec = model_spec.SupportedModels[arch.enum_name].value()
        assert spec.downloaded_files.url == arch.checkpoint_url
        assert spec.downloaded_files.path == arch.folder
        assert spec.input_image_shape[0] == arch.input_size
