"""Tests that need a CUDA GPU (run by benchmarks/gpu_check.sh). Without one they are skipped, and not counted."""

from __future__ import annotations

import socket

import pytest
import torch

from reclip_ray.config import load_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_bf16_autocast_train_step_on_cuda():
    from reclip_ray.model import build_model
    from reclip_ray.schedule import build_optimizer
    from reclip_ray.train.step import autocast_dtype_for, read_step, train_step

    cfg = load_config("tiny")
    assert autocast_dtype_for("auto", "cuda") == torch.bfloat16
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=256).cuda()
    opt = build_optimizer(model, cfg.optim)
    images = torch.randint(0, 256, (32, 64, 64, 3), dtype=torch.uint8, device="cuda")
    tokens = torch.randint(3, 256, (32, 32), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        feats = model.encode_image(images.permute(0, 3, 1, 2).float() / 255.0, normalize=False)
    assert feats.dtype == torch.bfloat16  # the matmuls really ran in bf16
    losses = [read_step(train_step(model, opt, images, tokens, lr=1e-3, autocast_dtype=torch.bfloat16))["loss"]
              for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # the same batch five times: the loss must fall
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32


def test_nccl_process_group_with_one_rank_gathers_with_grad():
    import torch.distributed as dist

    from reclip_ray.loss import _AllGatherWithGrad, _gather_sizes

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        x = torch.randn(8, 16, device="cuda", requires_grad=True)
        assert _gather_sizes(8, x.device) == [8]
        y = _AllGatherWithGrad.apply(x, [8], 0)
        torch.testing.assert_close(y, x)
        (y * 3.0).sum().backward()
        torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
        t = torch.tensor([5], device="cuda")
        out = [torch.zeros_like(t)]
        dist.all_gather(out, t)
        assert out[0].item() == 5
    finally:
        dist.destroy_process_group()


def test_device_decode_on_cuda_matches_cpu():
    """data.decode_device=cuda: nvJPEG + roi_align on the GPU gives the CPU device's pixels (libjpeg + roi_align).

    Two kinds of JPEG: photo-like ones (``tests.layouts.photo``, as in tests/test_device_decode.py) and white
    noise, the worst case for the decoders' differences (IDCT rounding and 4:2:0 chroma upsampling). The first run
    on an H200 measured a mean difference of 3.26 levels of 255 on the noise images."""
    import io

    import numpy as np
    from PIL import Image

    from reclip_ray.data.device_decode import decode_on_device
    from tests.layouts import photo

    rng = np.random.default_rng(0)
    for kind, bound in (("photo", 2.0), ("noise", 5.0)):
        jpegs, boxes = [], []
        for _ in range(16):
            w, h = int(rng.integers(300, 600)), int(rng.integers(300, 600))
            if kind == "noise":
                buf = io.BytesIO()
                Image.fromarray(np.clip(rng.normal(128, 40, (h, w, 3)), 0, 255).astype(np.uint8)).save(
                    buf, "JPEG", quality=90)
                jpegs.append(buf.getvalue())
            else:
                jpegs.append(photo(rng, w, h))
            boxes.append([w * 0.05, h * 0.05, w * 0.95, h * 0.9])
        for size in (64, 224):
            gpu, stats = decode_on_device(jpegs, np.asarray(boxes), size, "cuda")
            cpu, _ = decode_on_device(jpegs, np.asarray(boxes), size, "cpu")
            assert gpu.is_cuda and stats == {"fallback": 0, "failed": 0}
            diff = float((gpu.cpu().float() - cpu.float()).abs().mean())
            print(f"device decode {kind} {size} px: mean abs difference cuda vs cpu {diff:.2f}")
            assert diff < bound, (kind, size, diff)


def test_a_pinned_batch_is_copied_to_the_gpu_without_waiting_for_its_queued_kernels():
    """``step.pinned_for``: the worker's batch, pinned, is queued by ``train_step``'s ``non_blocking`` copy while the
    GPU still runs the step before (here ~1 s of ``torch.cuda._sleep``), so the host goes on to queue the next
    step. The pageable copy's time is printed, not asserted: what CUDA does with it is the driver's business."""
    import time

    import numpy as np

    from reclip_ray.train.step import pinned_for

    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (512, 224, 224, 3), dtype=np.uint8))
    (pinned,) = pinned_for("cuda", batch)
    assert pinned.is_pinned() and not batch.is_pinned() and torch.equal(pinned, batch)
    on_gpu = torch.empty_like(batch, device="cuda")
    on_gpu.copy_(pinned)  # warm-up: the context and the copy engine
    torch.cuda.synchronize()
    times = {}
    for name, source in (("pinned", pinned), ("pageable", batch)):
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU clock cycles queued before the copy
        t0 = time.perf_counter()
        on_gpu.copy_(source, non_blocking=True)  # train_step's copy, into memory already held (no allocation)
        times[name] = time.perf_counter() - t0
        torch.cuda.synchronize()
        assert torch.equal(on_gpu.cpu(), batch)
        on_gpu.zero_()
    print(f"77 MB batch to the GPU behind ~1 s of queued kernels: the call returned after {times['pinned']:.4f} s "
          f"pinned, {times['pageable']:.4f} s pageable")
    assert times["pinned"] < 0.05, times


def test_device_decode_never_writes_memory_that_queued_kernels_still_read():
    """torchvision's nvJPEG decode writes its outputs from its own stream without waiting for the caller's: a block
    that the caching allocator hands it can still be read by kernels queued on the caller's stream (a block freed on
    a stream is reused at once for that stream), and is overwritten under them (pytorch/vision#9606: 134 of 200
    iterations corrupted on an H100). ``decode_jpegs`` waits for the stream first. Here: tensors of exactly the
    decoded images' size, read by reductions queued behind ~50 ms of GPU sleep, freed before the decode."""
    import numpy as np

    from reclip_ray.data.device_decode import decode_jpegs
    from tests.layouts import photo

    rng = np.random.default_rng(0)
    jpegs = [photo(rng, 256, 256) for _ in range(8)]  # baseline JPEGs: nvJPEG's hardware path where the GPU has one
    decode_jpegs(jpegs, torch.device("cuda"))  # warm-up: nvJPEG's handles and buffers
    torch.cuda.synchronize()
    wrong = 0
    for _ in range(20):
        held = [torch.full((3, 256, 256), 7, dtype=torch.uint8, device="cuda") for _ in jpegs]
        torch.cuda._sleep(100_000_000)
        sums = [t.sum(dtype=torch.int64) for t in held]  # queued behind the sleep
        del held  # freed while the sums that read them are still queued
        decode_jpegs(jpegs, torch.device("cuda"))
        wrong += sum(int(s) != 7 * 3 * 256 * 256 for s in sums)
    assert wrong == 0, f"{wrong} of {20 * len(jpegs)} reductions read memory the decoder had overwritten"


def test_a_train_step_waits_for_the_gpu_nowhere_fresh_or_resumed(tmp_path):
    """Under ``torch.cuda.set_sync_debug_mode("error")`` any call that makes the host wait for the GPU raises: a
    blocking copy of host values (the normalisation constants, once built per step), a ``.item()``, or AdamW's
    step counters restored onto the GPU (each read back twice a step). The host must queue step after step."""
    from reclip_ray.model import build_model
    from reclip_ray.schedule import build_optimizer
    from reclip_ray.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
    from reclip_ray.train.step import train_step

    cfg = load_config("tiny")
    images = torch.randint(0, 256, (32, 64, 64, 3), dtype=torch.uint8, device="cuda")
    tokens = torch.randint(3, 256, (32, 32), device="cuda")

    def fresh():
        torch.manual_seed(0)
        model = build_model(cfg.model, vocab_size=256).cuda()
        return model, build_optimizer(model, cfg.optim)

    model, opt = fresh()
    train_step(model, opt, images, tokens, lr=1e-3, autocast_dtype=torch.bfloat16)  # state and constants made
    torch.cuda.synchronize()
    save_checkpoint(tmp_path, model, opt, TrainState(step=1), "name: x\n")
    resumed, resumed_opt = fresh()
    load_checkpoint(tmp_path, resumed, resumed_opt)
    for m, o in ((model, opt), (resumed, resumed_opt)):
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                train_step(m, o, images, tokens, lr=1e-3, autocast_dtype=torch.bfloat16)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_micro_batches_replay_the_cuda_generator_so_patch_dropout_drops_the_same_patches():
    """Gradient accumulation on the GPU: each micro-batch's CUDA generator state (``step._rng_state``, the branch no
    CPU test runs) is saved before its no-grad encode and restored before its re-encode, so patch dropout drops the
    same patches twice and the gradients are those of the loss on the cached features: the reference is built by
    hand, as ``tests/test_patch_dropout.py`` does on the CPU (without the replay 48 of its tensors differ there)."""
    from test_patch_dropout import check_micro_batch_replay

    check_micro_batch_replay("cuda", rows=4, rtol=1e-3, atol=1e-4)


def test_an_evaluation_at_bf16_encodes_under_cuda_autocast_and_returns_fp32():
    """A training run's evaluations encode at ``train.precision`` (``phase_eval``): on a GPU under bf16 autocast
    (``metrics.towers_autocast`` with the device given as a string, as ``reclip-ray eval`` gives it); the class
    embeddings leave it as fp32, close to fp32's."""
    import numpy as np

    from reclip_ray.evaluation.metrics import zero_shot_classifier
    from reclip_ray.model import build_model

    class Tok:
        def encode(self, texts, length):
            return np.stack([np.random.default_rng(sum(map(ord, t))).integers(3, 256, length) for t in texts])

    torch.manual_seed(0)
    model = build_model(load_config("tiny").model, vocab_size=256).cuda().eval()
    seen = []
    encode = model.encode_text

    def spy(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None)
        return encode(*args, **kwargs)

    model.encode_text = spy
    got = {dtype: zero_shot_classifier(model, Tok(), ["circle", "star", "square"], ["a {}.", "a photo of a {}."],
                                       text_length=16, device="cuda", autocast_dtype=dtype)
           for dtype in (None, torch.bfloat16)}
    assert seen == [None, torch.bfloat16]
    assert got[torch.bfloat16].dtype == torch.float32 and got[torch.bfloat16].is_cuda
    assert torch.nn.functional.cosine_similarity(got[torch.bfloat16], got[None]).min() > 0.99
