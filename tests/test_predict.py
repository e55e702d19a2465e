"""`make predict` on bad input (one line, no run folder), and a quiet terminal that still shows real errors.

What predict finds on good input is checked against the evaluate stage's own detections with
a model that learned (tests/test_learned_model.py: the session's tiny model finds nothing).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ops.predict import predict
from testkit.fixture import write_video
from tests.conftest import PipelineRun, stage_env
from tests.stage_checks import native_noise, one_error_line
from trafficdet.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]

# What MediaPipe, TFLite and the converter print on a healthy run, verbatim (the summary shortened).
NOISE = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1796236837.142168    9683 task_runner.cc:85] GPU suport is not available: INTERNAL: ; "
    b"RET_CHECK failure (mediapipe/gpu/gl_context_egl.cc:84) egl_initializedUnable to initialize EGL\n"
    b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
    b"W0000 00:00:1796236837.159055    9806 inference_feedback_manager.cc:114] Feedback manager requires a model "
    b"with a single signature inference. Disabling support for feedback tensors.\n"
)
NOISE += b"""Summary on the non-converted ops:
---------------------------------
 * Accepted dialects: tfl, builtin, func
 * Non-Converted Ops: 296, Total Ops 671, % non-converted = 44.11 %
 * 296 ARITH ops

- arith.constant:  296 occurrences  (f32: 255, i32: 41)



  (f32: 34)
  (i1: 1)
  (uq_8: 111)
"""
ERRORS = b"""E0000 00:00:1796236837.142168    9683 calculator_graph.cc:887] INVALID_ARGUMENT: a real error
ERROR: The model is not a valid Flatbuffer buffer
F0000 00:00:1796236837.142168    9683 tensor.cc:1] Check failed: size > 0
"""


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=stage_env(), capture_output=True, text=True)


def test_native_noise_is_filtered_and_errors_pass_even_from_a_crashing_process() -> None:
    """Written to fd 2 as C++ writes, between Python's own stderr lines, then the process aborts."""
    code = f"""
import os, sys
from trafficdet.quiet import filter_native_logs
filter_native_logs()
os.write(2, {NOISE!r})
print("python: before", file=sys.stderr)
os.write(2, {ERRORS!r})
print("python: after", file=sys.stderr)
os.abort()  # what a C++ CHECK failure does
"""
    result = python(code)
    assert result.returncode < 0  # killed by SIGABRT
    assert native_noise(result.stderr) == []
    lines = result.stderr.splitlines()
    assert sorted(lines) == sorted(["python: before", "python: after", *ERRORS.decode().splitlines()])


def test_a_real_native_error_still_shows(tmp_path: Path) -> None:
    """MediaPipe handed a broken model: TFLite's own ERROR line reaches the terminal, the routine lines do not."""
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(bytes(range(256)) * 4)
    code = f"""
from trafficdet.quiet import quiet_libraries
quiet_libraries()
from trafficdet.app import AppDetector
try:
    AppDetector({str(broken)!r})
except Exception as err:
    print("raised", type(err).__name__)
"""
    result = python(code)
    assert "raised" in result.stdout, result.stderr
    assert "ERROR: " in result.stderr, result.stderr  # TFLite's own words on the file
    assert native_noise(result.stderr) == [], result.stderr


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline: PipelineRun) -> dict[str, Path]:
    """One of each kind of bad input a user can hand predict, beside the session's (good) model."""
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("bad")
    val_image = next((tiny_pipeline.repo / "data/images").glob("*.jpg"))
    (folder / "notes.jpg").write_text("not a picture\n")
    (folder / "empty").mkdir()
    (folder / "mixed").mkdir()
    (folder / "mixed/a.jpg").write_bytes(val_image.read_bytes())
    (folder / "mixed/b.jpg").write_bytes(val_image.read_bytes()[:500])  # cut short
    clip = write_video(folder / "clip.mp4", frames=3)
    (folder / "broken.mp4").write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])  # MPEG-4 index is at the end
    (folder / "random.tflite").write_bytes(bytes(range(256)) * 20)

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32)])
    def double(x: tf.Tensor) -> tf.Tensor:
        return 2 * x

    plain = tf.lite.TFLiteConverter.from_concrete_functions([double.get_concrete_function()]).convert()
    (folder / "plain.tflite").write_bytes(plain)  # a real TFLite file, no MediaPipe metadata
    return {"folder": folder, "model": tiny_pipeline.repo / "models/model.tflite", "clip": clip}


@pytest.mark.parametrize(
    ("source", "model", "message"),
    [
        ("missing.jpg", None, r"missing\.jpg: not found"),
        ("notes.jpg", None, r"notes\.jpg: not an image TensorFlow can decode"),
        ("mixed", None, r"b\.jpg: not an image TensorFlow can decode"),  # a.jpg before it was fine
        ("empty", None, r"empty: no images in it"),
        ("broken.mp4", None, r"broken\.mp4: not a video OpenCV can read"),
        ("clip.mp4", "missing.tflite", r"missing\.tflite: not found"),
        ("clip.mp4", "random.tflite", r"random\.tflite: not a TFLite model"),
        ("clip.mp4", "plain.tflite", r"plain\.tflite: a TFLite model without MediaPipe metadata"),
    ],
)
def test_bad_input_is_one_error_and_no_run_folder(
    bad_inputs: dict[str, Path], tmp_path: Path, source: str, model: str | None, message: str
) -> None:
    folder = bad_inputs["folder"]
    runs = tmp_path / "runs"
    with pytest.raises(PipelineError, match=message):
        predict(folder / source, folder / model if model else bad_inputs["model"], 0.25, runs)
    assert not runs.exists() or list(runs.iterdir()) == []  # no run folder, no temp folder left


def test_the_command_prints_one_line_for_a_broken_clip(bad_inputs: dict[str, Path], tmp_path: Path) -> None:
    """As `make predict` runs it: exit 1, one `error:` line and nothing else (not FFmpeg's own complaint)."""
    clip = bad_inputs["folder"] / "broken.mp4"
    cmd = [sys.executable, "-m", "ops.predict", str(clip), "--model", str(bad_inputs["model"]), "--out", str(tmp_path / "runs")]
    result = subprocess.run(cmd, cwd=ROOT, env=stage_env(), capture_output=True, text=True)
    one_error_line(result, str(clip), "not a video")
    assert result.stderr.strip().count("\n") == 0 and result.stdout == "", result.stderr
    assert not (tmp_path / "runs").exists()  # told before anything is made
