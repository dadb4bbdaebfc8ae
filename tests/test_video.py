"""predict on video: a video file, a folder of frames with ``video=true``, Ctrl-C, and the inputs that cannot be
read (a damaged file, a stream nobody serves, a camera that is not there). The tests write their own video with
PyAV, the library predict reads and writes it with, and use a checkpoint of random weights: ``score_thresh=0`` keeps
its many weak boxes, so each frame's detections are many numbers to compare with the image path's."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_checkpoint
from PIL import Image
from runs import REPO, compose_config

av = pytest.importorskip("av")

from lightning_det.tools import predict as predict_tool  # noqa: E402 - after the skip when PyAV is missing
from lightning_det.tools.video import VideoError, reader_arguments  # noqa: E402

SIDE, FPS, FRAMES = 96, 12, 16


def painted_frames(count: int) -> list[np.ndarray]:
    """``[H, W, 3]`` frames of a gray background with a red rectangle moving down and to the right."""
    frames = []
    for k in range(count):
        frame = np.full((SIDE, SIDE, 3), 60, np.uint8)
        frame[10 + 2 * k: 50 + 2 * k, 8 + 3 * k: 40 + 3 * k] = (220, 40, 40)
        frames.append(frame)
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: int) -> Path:
    container = av.open(str(path), mode="w")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = SIDE, SIDE, "yuv420p"
    for frame in frames:
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode(None))
    container.close()
    return path


def read_video(path: Path) -> tuple[list[np.ndarray], Fraction]:
    """Every frame of ``path`` (RGB) and its stated frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)], stream.average_rate


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_detections(found: dict, expected: dict) -> None:
    assert found["labels"] == expected["labels"] and len(found["scores"]) > 0
    assert np.allclose(found["scores"], expected["scores"], atol=1e-6)
    assert np.allclose(found["boxes"], expected["boxes"], atol=1e-4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("video") / "model.ckpt")


@pytest.fixture
def video(tmp_path) -> Path:
    return write_video(tmp_path / "clip.mp4", painted_frames(FRAMES), FPS)


def run_predict(tmp_path: Path, checkpoint: Path, *overrides: str) -> Path:
    """``python -m lightning_det.tools.predict`` in this process (score_thresh=0, batches of 3); its run folder."""
    output = tmp_path / "predict"
    cfg = compose_config("predict", f"ckpt_path={checkpoint}", "score_thresh=0.0", "batch_size=3", *overrides,
                         run_dir=output)
    output.mkdir(parents=True, exist_ok=True)
    predict_tool.run(cfg)
    return output


def test_a_video_gives_an_annotated_video_at_its_rate_and_a_line_per_frame(tmp_path, checkpoint, video):
    """16 frames in batches of 3 (the last one short): the same frame count, size and rate out, each frame's line
    in order with its time, and detections equal to the image path's on the same decoded frames in the same batches
    (batches of other sizes compute in another order, and near-equal scores at score_thresh=0 swap places)."""
    output = run_predict(tmp_path, checkpoint, f"input={video}")
    drawn, fps = read_video(output / "video.mp4")
    assert len(drawn) == FRAMES and drawn[0].shape == (SIDE, SIDE, 3) and fps == FPS
    lines = read_lines(output / "detections.jsonl")
    assert [line["frame"] for line in lines] == list(range(FRAMES))
    assert np.allclose([line["time"] for line in lines], np.arange(FRAMES) / FPS)

    decoded, _ = read_video(video)
    frames = tmp_path / "decoded"
    frames.mkdir()
    for k, frame in enumerate(decoded):
        Image.fromarray(frame).save(frames / f"{k:03d}.png")
    expected = predict_tool.predict(str(checkpoint), sorted(frames.iterdir()), 0.0, batch_size=3, device="cpu")
    for line, image in zip(lines, expected.values(), strict=True):
        assert_same_detections(line, image)
        assert np.asarray(line["boxes"]).min() >= 0 and np.asarray(line["boxes"]).max() <= SIDE
    # the boxes are drawn: the annotated frame is far from the input, beyond what re-encoding changes
    assert np.abs(drawn[0].astype(int) - decoded[0].astype(int)).mean() > 5


def test_a_folder_of_frames_is_a_video_with_video_true_and_images_without(tmp_path, checkpoint):
    frames = tmp_path / "frames"
    frames.mkdir()
    for k, frame in enumerate(painted_frames(7)):
        Image.fromarray(frame).save(frames / f"frame_{k:02d}.png")
    (frames / "notes.png").write_text("not an image")  # skipped, with a warning, as the image path does

    output = run_predict(tmp_path, checkpoint, f"input={frames}", "video=true", "fps=5")
    drawn, fps = read_video(output / "video.mp4")
    assert len(drawn) == 7 and drawn[0].shape == (SIDE, SIDE, 3) and fps == 5
    lines = read_lines(output / "detections.jsonl")
    assert [line["time"] for line in lines] == [k / 5 for k in range(7)]
    expected = predict_tool.predict(str(checkpoint), sorted(frames.glob("frame_*.png")), 0.0, 3, "cpu")
    for line, image in zip(lines, expected.values(), strict=True):
        assert_same_detections(line, image)

    images = run_predict(tmp_path / "images", checkpoint, f"input={frames}")
    assert not (images / "video.mp4").exists() and not (images / "detections.jsonl").exists()
    assert len(json.loads((images / "detections.json").read_text())) == 7
    assert sorted(p.name for p in images.glob("*.png")) == sorted(p.name for p in frames.glob("frame_*.png"))


@pytest.mark.parametrize("how, written", [("signal", 5), ("keyboard_interrupt", 3)])
def test_ctrl_c_stops_with_a_playable_video_and_a_line_for_each_of_its_frames(tmp_path, checkpoint, video,
                                                                              monkeypatch, caplog, how, written):
    """Ctrl-C while frame 5 is read. As a signal (the user's Ctrl-C) it stops reading: the 5 frames read are
    written. As a ``KeyboardInterrupt`` (a second Ctrl-C) it stops at once: the 3 frames of the last whole batch
    are written, not the two read for the next. Either way both files end at the same frame."""
    real_open = predict_tool.open_video
    handler_before = signal.getsignal(signal.SIGINT)  # Python's default; ignored in a shell's background job

    def interrupted(source: str, fallback_fps: float):
        frames = real_open(source, fallback_fps)
        decoded = frames.images

        def images():
            for k, frame in enumerate(decoded):
                if k == 5:
                    if how == "signal":
                        signal.raise_signal(signal.SIGINT)
                    else:
                        raise KeyboardInterrupt
                yield frame

        frames.images = images()
        return frames

    monkeypatch.setattr(predict_tool, "open_video", interrupted)
    output = run_predict(tmp_path, checkpoint, f"input={video}")
    drawn, fps = read_video(output / "video.mp4")
    assert len(drawn) == written and fps == FPS
    assert [line["frame"] for line in read_lines(output / "detections.jsonl")] == list(range(written))
    assert f"stopped at frame {written} (Ctrl-C)" in caplog.text
    assert signal.getsignal(signal.SIGINT) is handler_before  # Ctrl-C means what it meant before


def test_a_damaged_video_file_is_one_clear_error(tmp_path, checkpoint):
    broken = tmp_path / "holiday.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))  # an MP4 header, then nothing of a video
    done = subprocess.run([sys.executable, "-m", "lightning_det.tools.predict", f"ckpt_path={checkpoint}",
                           f"input={broken}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (f"Error: input={broken} could not be opened as a video (Invalid data found when processing input): "
            "check that a video player opens it") in done.stderr
    with pytest.raises(VideoError, match="no such file; check the path"):
        run_predict(tmp_path, checkpoint, f"input={tmp_path / 'missing.mp4'}")


def closed_port() -> int:
    """A local TCP port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("scheme", ["rtsp", "http"])
def test_a_stream_nobody_serves_names_the_input_and_the_fix(tmp_path, checkpoint, scheme):
    url = f"{scheme}://127.0.0.1:{closed_port()}/camera"
    with pytest.raises(VideoError) as error:
        run_predict(tmp_path, checkpoint, f"input={url}")
    assert str(error.value).startswith(f"input={url} could not be opened as a video (Connection refused): ")
    assert "the camera or server is running and reachable from this machine" in str(error.value)
    assert not (tmp_path / "predict" / "video.mp4").exists()


def test_a_camera_index_reaches_the_platform_capture_device(tmp_path, checkpoint, monkeypatch):
    assert reader_arguments("rtsp://cam.local/live") == {"file": "rtsp://cam.local/live"}
    assert reader_arguments("clip.mp4") == {"file": "clip.mp4"}
    for platform, expected in [("linux", {"file": "/dev/video2", "format": "v4l2"}),
                               ("darwin", {"file": "2", "format": "avfoundation"})]:
        monkeypatch.setattr(sys, "platform", platform)
        assert reader_arguments("2") == expected
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(VideoError, match=r"input=2: camera indices .* pass its URL \(input=rtsp://"):
        reader_arguments("2")
    monkeypatch.undo()
    if sys.platform != "linux":
        return
    # the command line's input=57 (an integer to Hydra) opened through v4l2 on this machine, which has no camera 57
    with pytest.raises(VideoError, match=r"input=57 could not be opened .*check that camera 57 \(/dev/video57\) is "
                                         "connected"):
        run_predict(tmp_path, checkpoint, "input=57")


def test_without_pyav_video_asks_for_the_extra(tmp_path, checkpoint, video, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"pip install 'lightning_det\[video\]'"):
        run_predict(tmp_path, checkpoint, f"input={video}")
