"""``data.decode_device=cuda``: the CPU side (bytes + crop boxes) and the device side, run here on the CPU device.

The CUDA run of the same function is ``tests/test_gpu.py::test_device_decode_on_cuda_matches_cpu``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from reclip_ray.config import ConfigError, load_config
from reclip_ray.data.device_decode import decode_on_device
from reclip_ray.data.feed import PhaseFeed
from reclip_ray.data.pipeline import decode_batch
from reclip_ray.data.stream import BAD, OK
from reclip_ray.data.tokenizer import train_tokenizer
from tests.layouts import photo


_photo = photo  # noise 6: the tolerances below were measured on these images


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("captions")
    pq.write_table(pa.table({"caption": [f"a photo of thing {i}" for i in range(50)]}), folder / "c.parquet")
    return train_tokenizer(str(folder), vocab_size=300).to_json()


def _batch(images: list[bytes]) -> dict[str, np.ndarray]:
    n = len(images)
    return {"image": np.asarray(images, dtype=object), "caption": np.asarray([f"a photo of thing {i}" for i in range(n)], dtype=object),
            "key": np.asarray([f"k{i}" for i in range(n)], dtype=object), "_marker": np.zeros(n, bool),
            "_pass": np.zeros(n, np.int32), "_pos": np.arange(n), "_unit": np.zeros(n, np.int64),
            "_unit_rows": np.full(n, n, np.int32), "_unit_absent": np.zeros(n, np.int32),
            "_file": np.asarray(["f.parquet"] * n, dtype=object), "_row": np.arange(n)}


@pytest.mark.parametrize("size", [64, 224])
def test_device_path_gives_the_cpu_path_crops(size, tokenizer_json):
    rng = np.random.default_rng(0)
    images = [_photo(rng, int(rng.integers(300, 600)), int(rng.integers(300, 600))) for _ in range(10)]
    images += [_photo(rng, 320, 240, "PNG"), _photo(rng, 260, 300, "WEBP")]  # not for nvJPEG: re-encoded on the CPU
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(_photo(rng, 300, 280))).convert("CMYK").save(cmyk, "JPEG", quality=95)
    images.append(cmyk.getvalue())  # a JPEG nvJPEG does not take (four components): also decoded on the CPU
    kw = dict(image_size=size, text_length=8, tokenizer_json=tokenizer_json, train=True, seed=5)
    cpu = decode_batch(_batch(images), **kw)
    dev = decode_batch(_batch(images), **kw, on_device=True)
    assert "image" not in dev and dev["jpeg"].shape == (13,) and dev["box"].shape == (13, 4)
    assert np.array_equal(dev["tokens"], cpu["tokens"]) and np.array_equal(dev["_ok"], cpu["_ok"])
    assert dev["jpeg"][0] == images[0]  # a JPEG travels as it is ...
    assert Image.open(io.BytesIO(dev["jpeg"][10])).size == (size, size)  # ... a PNG as a JPEG of its crop
    assert Image.open(io.BytesIO(dev["jpeg"][12])).mode == "RGB" and dev["box"][12].tolist() == [0, 0, size, size]
    pixels, stats = decode_on_device(dev["jpeg"], dev["box"], size, "cpu")
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (13, size, size, 3)
    assert stats == {"fallback": 0, "failed": 0}
    diff = np.abs(pixels.numpy().astype(np.float32) - cpu["image"].astype(np.float32)).mean(axis=(1, 2, 3))
    # The same crop box; only the resampling differs (PIL's draft-mode DCT scaling + its bicubic vs roi_align's
    # area filter). Measured: mean 1.04 / max 1.41 at 64 px, 0.91 / 2.33 (the PNG) at 224 px, in levels of 255.
    assert diff.mean() < 2.0 and diff.max() < 4.0, diff
    assert diff[10:].max() < 3.0  # the re-encoded PNG/WebP/CMYK crops: quality-95 JPEG error only


def test_bad_rows_are_flagged_before_the_device_and_undecodable_ones_are_counted(tokenizer_json):
    rng = np.random.default_rng(1)
    good = [_photo(rng, 200, 160) for _ in range(3)]
    broken_tail = good[0][:200] + b"\x00" * 50  # a valid header whose data is gone: passes the header check
    images = [good[0], b"<html>404</html>", good[1], broken_tail, good[2]]
    dev = decode_batch(_batch(images), image_size=32, text_length=8, tokenizer_json=tokenizer_json, train=False,
                       seed=0, on_device=True)
    assert dev["_ok"].tolist() == [OK, BAD, OK, OK, OK]
    assert "cannot identify image" in dev["_bad"][1] and dev["jpeg"][1] == b""
    keep = dev["_ok"] == OK
    pixels, stats = decode_on_device(dev["jpeg"][keep], dev["box"][keep], 32, "cpu")
    cpu = decode_batch(_batch(good), image_size=32, text_length=8, tokenizer_json=tokenizer_json, train=False, seed=0)
    # The broken row decodes on neither decoder: it trains black and is counted; the batch's other rows are intact.
    assert stats["failed"] + stats["fallback"] >= 1
    if stats["failed"]:
        assert pixels[2].sum() == 0
    for i, j in ((0, 0), (1, 1), (3, 2)):
        assert np.abs(pixels[i].numpy().astype(float) - cpu["image"][j].astype(float)).mean() < 6.0


def test_the_feed_serves_bytes_and_boxes_with_their_positions(tokenizer_json):
    rng = np.random.default_rng(2)
    images = [_photo(rng, 120, 100) for _ in range(6)]
    block = decode_batch(_batch(images), image_size=32, text_length=8, tokenizer_json=tokenizer_json, train=True,
                         seed=0, on_device=True)
    feed = PhaseFeed(iter([block]), buffer_rows=0, seed=0)
    out = feed.take(6)
    order = out["_pos"]
    assert sorted(order.tolist()) == list(range(6))
    assert [bytes(b) for b in out["jpeg"]] == [images[p] for p in order]
    assert np.array_equal(out["box"], block["box"][order])


def test_decode_device_is_validated():
    with pytest.raises(ConfigError, match="'data.decode_device' must be cpu or cuda"):
        load_config("tiny", ["data.decode_device=gpu"])
    with pytest.raises(ConfigError, match="scaling.use_gpu=false"):
        load_config("tiny", ["data.decode_device=cuda", "scaling.use_gpu=false"])
    assert load_config("tiny", ["data.decode_device=cuda"]).data.decode_device == "cuda"


def test_crop_batches_are_bounded_and_cover_every_image(monkeypatch):
    """One huge source must not pad the whole batch to its size: groups stay under PAD_ELEMENTS."""
    from reclip_ray.data import device_decode

    monkeypatch.setattr(device_decode, "PAD_ELEMENTS", 3 * 100 * 100 * 4)
    shapes = [(80, 96)] * 9 + [(1000, 800)] + [(60, 80), (100, 100)]
    groups = device_decode._chunks(shapes)
    assert sorted(i for g in groups for i in g) == list(range(len(shapes)))
    assert [9] in groups  # the big one alone
    for g in groups:
        if len(g) > 1:
            h, w = max(shapes[i][0] for i in g), max(shapes[i][1] for i in g)
            assert 3 * h * w * len(g) <= device_decode.PAD_ELEMENTS
    # The same pixels whichever way the batch is grouped.
    rng = np.random.default_rng(4)
    images = [_photo(rng, int(rng.integers(90, 200)), int(rng.integers(90, 200))) for _ in range(6)]
    boxes = np.asarray([[0, 0, 80, 80], [5, 5, 85, 70], [10, 0, 90, 90], [0, 3, 88, 88], [1, 1, 60, 60],
                        [2, 2, 89, 89]], np.float32)
    small, _ = decode_on_device(images, boxes, 32, "cpu")
    monkeypatch.setattr(device_decode, "PAD_ELEMENTS", 1 << 26)
    whole, _ = decode_on_device(images, boxes, 32, "cpu")
    assert torch.equal(small, whole)


def test_out_of_memory_on_the_device_is_raised_not_decoded_by_pil(monkeypatch):
    """A decoder failure that is the device's, not the image's, must not turn every batch into a PIL decode in the
    training process: out of memory is raised."""
    import torchvision.io

    from reclip_ray.data.device_decode import decode_jpegs

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", oom)
    with pytest.raises(torch.OutOfMemoryError):
        decode_jpegs([_photo(np.random.default_rng(0), 64, 48)], torch.device("cpu"))


def test_the_worker_says_once_when_the_device_decoder_refuses_images_and_counts_them(monkeypatch):
    """Rows the device decoder refused are decoded by PIL in the training process: fine for a few, a crawl for
    every batch. The worker says so at the first, counts them, and rank 0 logs ``data_rows_decode_fallback``."""
    import types

    from reclip_ray.data import device_decode
    from reclip_ray.train.worker import Worker

    stats = iter([{"fallback": 3, "failed": 0}, {"fallback": 0, "failed": 0}, {"fallback": 2, "failed": 0}])
    monkeypatch.setattr(device_decode, "decode_on_device",
                        lambda jpegs, boxes, size, device: (torch.zeros((len(jpegs), size, size, 3)), next(stats)))
    said: list[str] = []
    worker = types.SimpleNamespace(device=torch.device("cpu"), rank=1, decode_failed=0, decode_fallback=0,
                                   say=said.append)
    batch = {"jpeg": np.asarray([b"x"] * 4, dtype=object), "box": np.zeros((4, 4), np.float32)}
    for _ in range(3):
        Worker.images(worker, batch, 8)
    assert worker.decode_fallback == 5 and worker.decode_failed == 0
    assert len(said) == 1 and "refused 3 of 4 image(s) on rank 1" in said[0] and "data.decode_device=cpu" in said[0]

    # Rank 0 logs its count with each log window.
    from reclip_ray import tracking
    from reclip_ray.train import worker as worker_module
    from reclip_ray.train.checkpoint import TrainState

    logged = []
    monkeypatch.setattr(tracking, "log_metrics", lambda uri, run_id, metrics, step: logged.append(metrics))
    monkeypatch.setattr(worker_module, "board_update", lambda *args: None)
    worker.__dict__.update(
        rank=0, world=1, state=TrainState(step=3), cfg=load_config("tiny"), missing_actor=None, already_logged=0,
        tracking_uri="unused", run_id="r", schedule=None, board=types.SimpleNamespace(update=types.SimpleNamespace(
            remote=lambda update: None)),
        feed=types.SimpleNamespace(recorded=12, available=0, bad=0),
        checkpoint_clock=types.SimpleNamespace(due=lambda: False))
    window = types.SimpleNamespace(metrics=lambda *args: {"loss": 1.0})
    Worker.log_window(worker, None, window, {}, 1e-3, [12])
    assert logged and logged[-1]["data_rows_decode_fallback"] == 5 and logged[-1]["data_rows_seen"] == 12


def test_the_device_decode_waits_for_the_training_stream_before_nvjpeg_writes(monkeypatch):
    """torchvision's nvJPEG decode writes from its own stream into blocks that kernels still queued on ours may read
    (pytorch/vision#9606): ``decode_jpegs`` waits for our stream before every decode on a GPU. Here, without a GPU,
    the stream and the decoder are stand-ins that record the order of the calls; ``tests/test_gpu.py`` runs the race
    itself on a GPU."""
    import torchvision.io

    from reclip_ray.data.device_decode import decode_jpegs

    calls = []

    class Stream:
        def synchronize(self):
            calls.append("wait")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda data, mode, device: calls.append("decode") or
                        [torch.zeros((3, 2, 2), dtype=torch.uint8) for _ in data])
    images, fallback = decode_jpegs([b"\xff\xd8 one", b"\xff\xd8 two"], torch.device("cuda"))
    assert calls == ["wait", "decode"] and len(images) == 2 and fallback == 0
    calls.clear()
    decode_jpegs([b"\xff\xd8 one"], torch.device("cpu"))  # the CPU decoder has no stream to wait for
    assert calls == ["decode"]


def test_a_jpeg_neither_decoder_reads_trains_black_and_the_worker_counts_and_says_it(monkeypatch):
    """README: a row that neither nvJPEG nor PIL decodes "trains as a black image and is counted
    (``data_rows_decode_failed``, with a warning)"; the rows beside it are unharmed."""
    from reclip_ray.train import worker
    from reclip_ray.train.checkpoint import TrainState

    rng = np.random.default_rng(3)
    good = _photo(rng, 120, 100)
    unreadable = b"\xff\xd8\xff\xe0" + bytes(200)  # a JPEG's first bytes, then nothing a decoder can use
    box = np.asarray([[0.0, 0.0, 100.0, 100.0]] * 3, dtype=np.float32)
    pixels, stats = decode_on_device([good, unreadable, good], box, 32, "cpu")
    assert stats == {"fallback": 0, "failed": 1}
    assert pixels[1].sum() == 0 and pixels[0].float().std() > 0 and torch.equal(pixels[0], pixels[2])

    rank0 = object.__new__(worker.Worker)  # just what images() reads: rank 0 of a CPU run at step 7
    rank0.device, rank0.rank, rank0.decode_failed, rank0.decode_fallback = torch.device("cpu"), 0, 0, 0
    rank0.tracking_uri, rank0.run_id, rank0.state = "sqlite:///unused.db", "run", TrainState(step=7)
    said: list[str] = []
    logged: list[tuple[int, dict]] = []
    monkeypatch.setattr(rank0, "say", said.append, raising=False)
    monkeypatch.setattr(worker.tracking, "log_metrics", lambda uri, run, metrics, step: logged.append((step, metrics)))
    for _ in range(2):
        images = rank0.images({"jpeg": [good, unreadable, good], "box": box}, 32)
        assert torch.equal(images, pixels)
    assert rank0.decode_failed == 2 and logged == [(7, {"data_rows_decode_failed": 1}),
                                                   (7, {"data_rows_decode_failed": 2})]
    assert said == [f"WARNING: 1 image(s) failed to decode on rank 0 and trained as black images ({n} so far)"
                    for n in (1, 2)]


def test_the_wait_for_the_step_queued_before_is_not_data_time(monkeypatch):
    """With ``data.decode_device=cuda`` the decode first waits for the GPU to finish the step queued before (above):
    the step's time, not the data's. ``Worker.step`` waits before its data clock counts the decode, so the window's
    ``data_wait_fraction`` does not read ~1 whenever the GPU decodes. Stand-ins: a stream whose first wait is the
    queued step's 0.3 s (then the GPU is idle), and a decode that waits for it as ``decode_jpegs`` does."""
    import time
    import types

    from reclip_ray.data import device_decode
    from reclip_ray.train import worker as worker_module
    from reclip_ray.train.checkpoint import TrainState
    from reclip_ray.train.progress import Window

    queued = [0.3]

    class Stream:
        def synchronize(self):
            time.sleep(queued.pop() if queued else 0.0)

    def decode(jpegs, boxes, size, device):
        torch.cuda.current_stream(device).synchronize()
        return torch.zeros((len(jpegs), size, size, 3), dtype=torch.uint8), {"fallback": 0, "failed": 0}

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(device_decode, "decode_on_device", decode)
    monkeypatch.setattr(worker_module, "pinned_for", lambda device, *tensors: tensors)
    monkeypatch.setattr(worker_module, "train_step", lambda *args, **kwargs: {"loss": torch.tensor(1.0)})
    w = object.__new__(worker_module.Worker)  # just what step() reads: rank 0 of 1 on a GPU
    w.device, w.rank, w.world, w.decode_failed, w.decode_fallback = torch.device("cuda"), 0, 1, 0, 0
    w.cfg, w.state, w.ddp_model, w.optimizer = load_config("tiny"), TrainState(), None, None
    w.autocast, w.local_loss, w.micro_batch = None, False, 0
    w.schedule = types.SimpleNamespace(lr_at=lambda samples: 1e-3)
    w.feed = types.SimpleNamespace(take=lambda n: {"jpeg": np.asarray([b"x"] * n, dtype=object),
                                                   "box": np.zeros((n, 4), np.float32),
                                                   "tokens": np.zeros((n, 8), np.int64)})
    plan = types.SimpleNamespace(name="p", start_sample=0, end_sample=8, batch_size=4, batch_at=lambda s: 4,
                                 image_size=8)
    window = Window()
    w.step(plan, window, 1.0)
    assert not queued and window.steps == 1  # the queued step was waited for
    assert window.data_s < 0.25, window.data_s
