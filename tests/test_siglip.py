"""The sigmoid loss (``train.loss: siglip``): open_clip's ``SigLipLoss`` on 1 and N gloo ranks, exact gradients
across ranks, the paper's initialisation, the config rules and the FLOPs the logits cost.

Two references, computed other ways: open_clip's ``SigLipLoss`` (same rank, same local features: its own
neighbour exchange) and one process on the whole global batch (``SigLipLoss`` with one rank), against which rank r's
feature gradients must be ``N x`` the global ones (DDP then averages) and the mean over ranks of the loss and of the
scale / bias gradients must be the global ones.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from gloo_ranks import join, leave, spawn
from reclip_ray.config import ConfigError, load_config
from reclip_ray.loss import contrastive_loss, sigmoid_loss

DIM = 8
RTOL = 1e-5  # the target: loss and gradients within 1e-5 relative


def _features(total: int):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(total, DIM, generator=g), dim=-1)
    txt = F.normalize(torch.randn(total, DIM, generator=g), dim=-1)
    # Moderate logits (scale 5, bias -2) so that every pair's gradient matters.
    return img, txt, torch.tensor(5.0), torch.tensor(-2.0)


def _loss_and_grads(fn, img, txt, scale, bias) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in (img, txt, scale, bias)]
    loss = fn(*leaves)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|: relative to the tensor's scale, so near-zero entries do not blow it up."""
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


NAMES = ("loss", "image grad", "text grad", "scale grad", "bias grad")


def _assert_close(got: list[torch.Tensor], ref: list[torch.Tensor], what: str) -> float:
    errs = [rel_err(g, r) for g, r in zip(got, ref)]
    bad = [f"{n} {e:.1e}" for n, e in zip(NAMES, errs) if not e <= RTOL]
    assert not bad, f"{what}: relative error over {RTOL}: {', '.join(bad)}"
    return max(errs)


def test_one_rank_matches_open_clip():
    img, txt, scale, bias = _features(12)
    ours = _loss_and_grads(lambda *a: contrastive_loss(*a[:3], logit_bias=a[3]), img, txt, scale, bias)
    theirs = _loss_and_grads(SigLipLoss(), img, txt, scale, bias)
    print(f"1 rank: max relative error {_assert_close(ours, theirs, '1 rank'):.1e}")
    # Without a bias the same call is still the CLIP loss (what a clip run trains).
    assert contrastive_loss(img, txt, scale).item() != pytest.approx(ours[0].item(), rel=1e-2)


def _rank_worker(rank: int, sizes: list[int], init_file: str, out: str) -> None:
    world = len(sizes)
    join(rank, world, init_file)
    img, txt, scale, bias = _features(sum(sizes))
    start = sum(sizes[:rank])
    local = (img[start : start + sizes[rank]], txt[start : start + sizes[rank]], scale, bias)
    result = {"ours": _loss_and_grads(sigmoid_loss, *local)}
    # Both ways of learning the sizes: from the caller, and gathered.
    result["ours, sizes given"] = _loss_and_grads(
        lambda *a: sigmoid_loss(*a, local_batch_sizes=sizes), *local)
    if len(set(sizes)) == 1:  # open_clip divides by the local batch: the same share only when batches are equal
        result["open_clip"] = _loss_and_grads(SigLipLoss(rank=rank, world_size=world, dist_impl="bidir"), *local)
    torch.save(result, f"{out}.{rank}")
    leave()


@pytest.mark.parametrize("sizes", [[5, 5], [3, 3, 3, 3], [4, 2, 3]], ids=["2ranks", "4ranks", "3ranks-unequal"])
def test_ranks_match_open_clip_and_the_global_batch(tmp_path, sizes):
    """2 ranks: one one-way round; 4 ranks: a two-way round then a one-way one; 3 unequal ranks: two-way, padded
    sizes (checked against the global batch only: open_clip assumes equal local batches)."""
    out = str(tmp_path / "out")
    spawn(_rank_worker, len(sizes), sizes, str(tmp_path / "init"), out)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(len(sizes))]
    world, worst = len(sizes), 0.0
    for r, res in enumerate(ranks):
        assert all(torch.equal(a, b) for a, b in zip(res["ours"], res["ours, sizes given"]))
        if "open_clip" in res:
            worst = max(worst, _assert_close(res["ours"], res["open_clip"], f"rank {r} vs open_clip"))

    # The global batch in one process: the mean over ranks of loss, scale and bias gradients, and each rank's
    # feature gradients divided by N (what DDP's mean does to the parameters they feed).
    ref = _loss_and_grads(SigLipLoss(), *_features(sum(sizes)))
    mean = [sum(res["ours"][i] for res in ranks) / world for i in (0, 3, 4)]
    img_grad = torch.cat([res["ours"][1] for res in ranks]) / world
    txt_grad = torch.cat([res["ours"][2] for res in ranks]) / world
    got = [mean[0], img_grad, txt_grad, mean[1], mean[2]]
    worst = max(worst, _assert_close(got, ref, "ranks vs the global batch"))
    print(f"{sizes}: max relative error {worst:.1e}")


def test_siglip_config_initialises_as_the_paper_and_exports_in_its_config():
    from reclip_ray.model import build_model

    cfg = load_config("tiny", ["train.loss=siglip"])
    assert cfg.model.init_logit_bias == -10.0 and cfg.model.init_logit_scale == pytest.approx(math.log(10))
    model = build_model(cfg.model, vocab_size=64)
    assert model.logit_bias.item() == -10.0 and model.logit_scale.exp().item() == pytest.approx(10.0)
    assert "logit_bias" in dict(model.named_parameters())
    # The CLIP loss keeps its parameter set (an unused bias would also stop DDP).
    clip = build_model(load_config("tiny").model, vocab_size=64)
    assert clip.logit_bias is None and "logit_bias" not in dict(clip.named_parameters())
    # Keys the user sets win; the saved config reloads to the same model config.
    mine = load_config("tiny", ["train.loss=siglip", "model.init_logit_bias=-5", "model.init_logit_scale=2.0"])
    assert (mine.model.init_logit_bias, mine.model.init_logit_scale) == (-5, 2.0)
    from reclip_ray.config import from_dict

    assert from_dict(cfg.to_dict()).model == cfg.model


@pytest.mark.parametrize("overrides,message", [
    (["train.loss=sigmoid"], "'train.loss' must be clip or siglip, got 'sigmoid'"),
    (["model.init_logit_bias=-10"], "'model.init_logit_bias' (-10) is the sigmoid loss's bias; set train.loss=siglip"),
    (["train.loss=siglip", "model.init_logit_bias=null"], "'train.loss=siglip' needs 'model.init_logit_bias'"),
    (["train.loss=siglip", "model.init_logit_bias=low"], "'model.init_logit_bias' must be a number, got 'low'"),
])
def test_loss_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_flops_of_the_sigmoid_loss_are_the_counted_logits():
    """What ``reclip_ray.flops`` counts for the logits (2 B D per sample, B samples) is what the sigmoid loss runs
    on one rank (on N ranks each runs its b x B share once), forward and backward (3x)."""
    from torch.utils.flop_counter import FlopCounterMode

    from reclip_ray.flops import logits_forward_flops

    total = 16
    img, txt, scale, bias = (t.requires_grad_() for t in _features(total))
    with FlopCounterMode(display=False) as counter:
        loss = sigmoid_loss(img, txt, scale, bias)
    assert counter.get_total_flops() == total * logits_forward_flops(DIM, total)
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    assert counter.get_total_flops() == 2 * total * logits_forward_flops(DIM, total)


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_the_trained_bias_is_logged_next_to_the_scale(loss):
    """What rank 0 logs to MLflow at each logging window (``Window.metrics``, logged whole by ``Worker.log_window``)
    and prints without a display (``console_line``) carries the sigmoid loss's ``logit_bias`` after the step, as it
    carries ``logit_scale``; the CLIP loss has no bias and logs none."""
    from reclip_ray.model import build_model
    from reclip_ray.schedule import Schedule
    from reclip_ray.train.checkpoint import TrainState
    from reclip_ray.train.progress import Window, console_line
    from reclip_ray.train.step import read_step, train_step

    cfg = load_config("tiny", [f"train.loss={loss}", "model.vision.depth=1", "model.text.depth=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=64)
    images, tokens = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8), torch.randint(3, 64, (4, 16))
    out = read_step(train_step(model, torch.optim.SGD(model.parameters(), lr=0.5), images, tokens, lr=0.5,
                               grad_clip=0.0))
    schedule = Schedule.from_config(cfg)
    state = TrainState(samples=4, step=1)
    metrics = Window().metrics(schedule.phases[0], state, out, 0.5, 4, 1)
    line = console_line(metrics, schedule.phases[0], state, schedule)
    assert metrics["logit_scale"] == out["logit_scale"]
    if loss == "clip":
        assert "logit_bias" not in metrics and " bias " not in line
        return
    assert metrics["logit_bias"] == model.logit_bias.item() != -10.0  # the trained value, not the initial one
    assert f" bias {model.logit_bias.item():.2f} " in line
