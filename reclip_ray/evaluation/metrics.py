"""The numbers: zero-shot top-k and mean per-class recall, image <-> text recall@k, in bounded memory.

Features are accumulated (N x D floats: 100 MB for 50k images at D=512) and every similarity matrix is computed
in row chunks, so memory stays at ``chunk x N`` instead of ``N x N``.

Ranking rule, used by every metric here: the rank of the correct answer is the number of *wrong* candidates that
score greater than **or equal to** it, and a top-k hit means rank < k. Ties count against the model, which makes
the metrics independent of the order of candidates and gives a collapsed model (all scores equal) zero, not chance
or full credit. A NaN score (a diverged model's features) counts as lower than any real one, so a NaN correct
answer is a miss: compared as it is, NaN loses every ``>=``, and a model whose features were all NaN scored 1.0
everywhere. For image -> text with several captions per image, an image's score is that of its best caption (a
hit if any of its captions ranks high enough); images with no caption are left out of that direction.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from reclip_ray.evaluation.eval_set import DEFAULT_TEMPLATES, class_prompt
from reclip_ray.evaluation.gather import agree, block, gather_rows, run_steps

CHUNK = 1024


def towers_autocast(device: str | torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The towers' autocast in an evaluation: ``dtype`` on ``device`` (a training run passes its ``train.precision``,
    bf16 on a GPU: the model as it trained, on tensor cores, where fp32 matmuls run several times slower); None: fp32.
    The features leave it as fp32, so the metrics are computed alike either way."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@torch.no_grad()
def zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer: Any,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    text_length: int,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """[C, D] class embeddings: each class's normalised template embeddings averaged, then re-normalised. A
    template takes the class name in ``{}`` or ``{c}`` (``eval_set.class_prompt``).

    With ``world_size`` > 1 (every rank calls it) each rank encodes a contiguous block of the same batches that one
    rank would encode, and the features are gathered: ImageNet's 1000 classes x 80 templates are 80k captions,
    and a batch encodes to the same numbers whichever rank runs it. ``autocast_dtype``: see ``towers_autocast``.
    """
    model = getattr(model, "module", model)
    templates = list(templates) or list(DEFAULT_TEMPLATES)
    texts = [class_prompt(t, c) for c in classnames for t in templates]
    starts = list(range(0, len(texts), batch_size))
    lo, hi = block(len(starts), rank, world_size)

    def encode() -> Iterator[None]:  # one prompt batch per step (see gather.agree)
        feats = []
        for i in starts[lo:hi]:
            tokens = torch.from_numpy(tokenizer.encode(texts[i : i + batch_size], text_length)).to(device)
            with towers_autocast(device, autocast_dtype):
                feats.append(model.encode_text(tokens, normalize=True).float())
            yield
        return feats

    if world_size == 1:
        feats = run_steps(encode())
    else:
        mine = agree(encode(), world_size, device)
        feats = [t.to(device) for t in gather_rows(torch.cat(mine) if mine else None, world_size, device)]
    per_template = torch.cat(feats).view(len(classnames), len(templates), -1)
    return torch.nn.functional.normalize(per_template.mean(dim=1), dim=-1)


def _nan_last(scores: torch.Tensor) -> torch.Tensor:
    """NaN scores as -inf, below every real score and tied with each other (see the module's ranking rule)."""
    return scores.masked_fill(scores.isnan(), -torch.inf)


def _rank_of(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Number of candidates other than the correct one scoring >= it (ties count against the model)."""
    scores = _nan_last(scores)
    target = scores.gather(1, correct[:, None])
    return (scores >= target).sum(dim=1) - 1


def zero_shot_metrics(
    image_features: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.Tensor,
    *,
    chunk: int = CHUNK,
) -> dict[str, float]:
    """top-1, top-5 (k clipped to the number of classes) and mean per-class recall (top-1, classes present)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    num_classes = classifier.shape[0]
    k5 = min(5, num_classes)
    ranks = torch.cat([
        _rank_of(image_features[i : i + chunk].float() @ classifier.float().T, labels[i : i + chunk])
        for i in range(0, image_features.shape[0], chunk)
    ]).cpu()
    labels = labels.cpu()
    hit1 = (ranks < 1).float()
    present = torch.unique(labels)
    per_class = torch.stack([hit1[labels == c].mean() for c in present])
    return {
        "top1": hit1.mean().item(),
        "top5": (ranks < k5).float().mean().item(),
        "mean_per_class_recall": per_class.mean().item(),
    }


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor | None = None,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = CHUNK,
) -> dict[str, float]:
    """Recall@k both ways; ``text_to_image[j]`` is the image of caption j (default: caption j <-> image j)."""
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    if text_to_image is None:
        if n_img != n_txt:
            raise ValueError("text_to_image is required when there are not exactly one caption per image")
        text_to_image = torch.arange(n_txt)
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=image_features.device)
    img, txt = image_features.float(), text_features.float()

    text_ranks = torch.cat([
        _rank_of(txt[j : j + chunk] @ img.T, t2i[j : j + chunk]) for j in range(0, n_txt, chunk)
    ]).cpu()

    image_ranks = []
    for i in range(0, n_img, chunk):
        sims = _nan_last(img[i : i + chunk] @ txt.T)  # [c, n_txt]
        ids = torch.arange(i, min(i + chunk, n_img), device=sims.device)
        mine = t2i[None, :] == ids[:, None]
        best = torch.where(mine, sims, torch.full_like(sims, -torch.inf)).amax(dim=1)
        rank = ((sims >= best[:, None]) & ~mine).sum(dim=1)
        image_ranks.append(rank[mine.any(dim=1)])
    image_ranks = torch.cat(image_ranks).cpu()

    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text_r@{k}"] = (image_ranks < k).float().mean().item()
    for k in ks:
        out[f"text_to_image_r@{k}"] = (text_ranks < k).float().mean().item()
    return out
