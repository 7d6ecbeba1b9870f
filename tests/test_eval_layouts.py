"""Evaluation on real eval layouts: COCO/Flickr (5 caption rows per image), classification-only sets, img2dataset
shards with failed downloads, and the pre-Ray eval-set checks. No Ray; the data is real JPEG/PNG bytes in Parquet.

The model is a stub whose features are known exactly: it reads an image's id back from the image's red channel
(each test image is one solid colour) and a caption's (image, variant) from a stub tokenizer, then looks the
features up in tables the test chooses. So the expected metrics can be computed independently, by a brute-force
loop over the similarity matrix of those tables.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reclip_ray.data.local import BadRowCount, iter_local_batches
from reclip_ray.data.schema import ColumnMap
from reclip_ray.errors import ReclipError
from reclip_ray.evaluation.dataset import evaluate_dataset
from reclip_ray.evaluation.eval_set import check_eval_set, eval_columns
from reclip_ray.pixels import CLIP_MEAN, CLIP_STD

N_IMAGES = 8
CAPTIONS_PER_IMAGE = 5
CLASSES = ["class0", "class1", "class2"]
RED_STEP, RED_BASE = 24, 16  # image i is solid RGB (16 + 24 i, 100, 50): ids survive JPEG and resizing


# --------------------------------------------------------------------------------------------------- stubs


def image_bytes(i: int, fmt: str = "JPEG") -> bytes:
    """A real encoded image (non-square, so the eval crop does work) whose red channel encodes ``i``."""
    buf = io.BytesIO()
    Image.new("RGB", (48 + i, 40), (RED_BASE + RED_STEP * i, 100, 50)).save(buf, format=fmt, quality=95)
    return buf.getvalue()


class StubTokenizer:
    """"image I caption J" -> [1, I, J]; a class prompt naming "classC" -> [2, C, 0]; anything else -> zeros."""

    def encode(self, texts, length: int) -> np.ndarray:
        out = np.zeros((len(texts), length), np.int64)
        for row, text in enumerate(texts):
            if m := re.search(r"image (\d+) caption (\d+)", text):
                out[row, :3] = [1, int(m[1]), int(m[2])]
            elif m := re.search(r"class(\d+)", text):
                out[row, :2] = [2, int(m[1])]
        return out


class StubModel(torch.nn.Module):
    """CLIP-shaped stub: features come from tables indexed by the image id / caption / class the input encodes."""

    def __init__(self, image_vecs: torch.Tensor, caption_vecs: torch.Tensor, class_vecs: torch.Tensor) -> None:
        super().__init__()
        self.image_vecs = F.normalize(image_vecs.float(), dim=-1)  # [N, D]
        self.caption_vecs = F.normalize(caption_vecs.float(), dim=-1)  # [N, 5, D]
        self.class_vecs = F.normalize(class_vecs.float(), dim=-1)  # [C, D]
        self.images_encoded = 0

    def image_ids(self, images: torch.Tensor) -> torch.Tensor:
        """Undo normalize_images on the red channel and read the id back."""
        red = images[:, 0].mean(dim=(1, 2)) * CLIP_STD[0] * 255 + CLIP_MEAN[0] * 255
        return torch.round((red - RED_BASE) / RED_STEP).long()

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        self.images_encoded += images.shape[0]
        return self.image_vecs[self.image_ids(images)]

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        out = []
        for kind, a, b in tokens[:, :3].tolist():
            assert kind in (1, 2), "the evaluator encoded an empty caption"
            out.append(self.caption_vecs[a, b] if kind == 1 else self.class_vecs[a])
        return torch.stack(out)


def labels_of(i: int) -> int:
    return i % len(CLASSES)


def perfect_model() -> StubModel:
    """Image i and all its captions -> e_i; class c -> the mean of its images' e_i: every metric is 1."""
    eye = torch.eye(N_IMAGES)
    classes = torch.stack([eye[[i for i in range(N_IMAGES) if labels_of(i) == c]].sum(0) for c in range(len(CLASSES))])
    return StubModel(eye, eye[:, None, :].repeat(1, CAPTIONS_PER_IMAGE, 1), classes)


def swapped_model() -> StubModel:
    """The perfect model except that images 0 and 1 look like each other."""
    model = perfect_model()
    model.image_vecs = model.image_vecs[[1, 0, *range(2, N_IMAGES)]]
    return model


def noisy_model(seed: int = 0) -> StubModel:
    """Random image features; captions = their image's features plus noise: non-trivial fractions everywhere."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(N_IMAGES, 6, generator=g)
    captions = F.normalize(img, dim=-1)[:, None, :] + 0.9 * torch.randn(N_IMAGES, CAPTIONS_PER_IMAGE, 6, generator=g)
    return StubModel(img, captions, torch.randn(len(CLASSES), 6, generator=g))


# --------------------------------------------------------------------------------------------------- data


def write_set(folder, rows: list[dict], *, shards: int = 2, meta: dict | None = None, schema=None) -> str:
    """Rows (shuffled, so an image's caption rows are neither adjacent nor in one file) as Parquet shards."""
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(0).permutation(len(rows))
    rows = [rows[i] for i in order]
    per = -(-len(rows) // shards)
    for s in range(shards):
        part = rows[s * per : (s + 1) * per]
        pq.write_table(pa.Table.from_pylist(part, schema=schema), folder / f"part-{s:05d}.parquet")
    if meta is not None:
        (folder / "dataset.json").write_text(json.dumps(meta))
    return str(folder)


def coco_rows(with_image_id: bool = True) -> list[dict]:
    """COCO layout: one row per caption, the same image bytes on 5 rows; every third image is a PNG."""
    rows = []
    for i in range(N_IMAGES):
        data = image_bytes(i, "PNG" if i % 3 == 2 else "JPEG")
        for j in range(CAPTIONS_PER_IMAGE):
            row = {"key": f"{i}-{j}", "image": data, "caption": f"a photo: image {i} caption {j}",
                   "label": labels_of(i)}
            if with_image_id:
                row["image_id"] = 1000 + i
            rows.append(row)
    return rows


COCO_META = {"classes": CLASSES, "templates": ["a photo of a {}."]}


@pytest.fixture(params=["image_id", "bytes"])
def coco_dir(request, tmp_path) -> str:
    return write_set(tmp_path / "coco", coco_rows(request.param == "image_id"), meta=COCO_META)


def evaluate(model: StubModel, path: str) -> dict[str, float]:
    return evaluate_dataset(model, StubTokenizer(), path, image_size=32, text_length=8, batch_size=7)


# --------------------------------------------------------------------------------------------------- reference


def reference_retrieval(model: StubModel, k: int) -> tuple[float, float]:
    """(image->text, text->image) R@k by brute force over the unique images and all captions of the stub's tables."""
    img = model.image_vecs
    txt = model.caption_vecs.reshape(-1, model.caption_vecs.shape[-1])
    owner = [i for i in range(N_IMAGES) for _ in range(CAPTIONS_PER_IMAGE)]
    sims = (img @ txt.T).tolist()
    t2i_hits = 0
    for j, mine in enumerate(owner):
        wrong_at_least = sum(1 for i in range(N_IMAGES) if i != mine and sims[i][j] >= sims[mine][j])
        t2i_hits += wrong_at_least < k
    i2t_hits = 0
    for i in range(N_IMAGES):
        best = max(sims[i][j] for j in range(len(owner)) if owner[j] == i)
        wrong_at_least = sum(1 for j in range(len(owner)) if owner[j] != i and sims[i][j] >= best)
        i2t_hits += wrong_at_least < k
    return i2t_hits / N_IMAGES, t2i_hits / len(owner)


def reference_top1(model: StubModel, labels: list[int]) -> float:
    sims = (model.image_vecs @ model.class_vecs.T).tolist()
    hits = sum(all(sims[i][c] < sims[i][y] for c in range(len(CLASSES)) if c != y) for i, y in enumerate(labels))
    return hits / len(labels)


# --------------------------------------------------------------------------------------------------- tests


def test_coco_layout_perfect_model_scores_one(coco_dir):
    model = perfect_model()
    m = evaluate(model, coco_dir)
    # Before grouping, the 4 identical copies of a caption's image tied with it and a perfect model scored 0.
    for key in ("image_to_text_r@1", "text_to_image_r@1", "image_to_text_r@5", "text_to_image_r@10"):
        assert m[key] == 1.0, key
    assert m["label/top1"] == 1.0
    assert (m["rows"], m["images"], m["captions"]) == (N_IMAGES * CAPTIONS_PER_IMAGE, N_IMAGES,
                                                       N_IMAGES * CAPTIONS_PER_IMAGE)
    assert model.images_encoded == N_IMAGES  # each unique image encoded once


def test_coco_layout_swapped_images_match_hand_and_brute_force(coco_dir):
    model = swapped_model()
    m = evaluate(model, coco_dir)
    # By hand: image 0 now has features e_1. Its captions (e_0) score 0 against it and every other image scores
    # >= 0, so they rank N-1 = 7: misses at R@1 and R@5, hits at R@10; same for image 1 and its captions. Image
    # 0 scores 0 on its own captions, 1 on image 1's and 0 on the rest, so its best own caption ranks behind all
    # 5 (N-1) = 35 wrong ones: a miss at every k here; same for image 1.
    assert m["text_to_image_r@1"] == pytest.approx((N_IMAGES - 2) / N_IMAGES)
    assert m["text_to_image_r@5"] == pytest.approx((N_IMAGES - 2) / N_IMAGES)
    assert m["text_to_image_r@10"] == 1.0
    assert m["image_to_text_r@1"] == pytest.approx((N_IMAGES - 2) / N_IMAGES)
    assert m["image_to_text_r@10"] == pytest.approx((N_IMAGES - 2) / N_IMAGES)
    for k in (1, 5, 10):
        i2t, t2i = reference_retrieval(model, k)
        assert m[f"image_to_text_r@{k}"] == pytest.approx(i2t)
        assert m[f"text_to_image_r@{k}"] == pytest.approx(t2i)
    assert m["label/top1"] == pytest.approx(reference_top1(model, [labels_of(i) for i in range(N_IMAGES)]))


def test_coco_layout_noisy_model_matches_brute_force(coco_dir):
    model = noisy_model()
    m = evaluate(model, coco_dir)
    for k in (1, 5, 10):
        i2t, t2i = reference_retrieval(model, k)
        assert m[f"image_to_text_r@{k}"] == pytest.approx(i2t), k
        assert m[f"text_to_image_r@{k}"] == pytest.approx(t2i), k
    assert 0 < m["text_to_image_r@1"] < 1 and 0 < m["image_to_text_r@1"] < 1  # the check has teeth
    assert m["label/top1"] == pytest.approx(reference_top1(model, [labels_of(i) for i in range(N_IMAGES)]))


@pytest.mark.parametrize("kind", ["name", "fraction", "nan"])
def test_a_label_that_is_not_a_class_index_is_a_one_line_error(tmp_path, kind):
    """Class names as labels stopped evaluation with int()'s ValueError, and 2.5 was scored as class 2; both, and
    NaN, are refused in one line by the pre-Ray check and by the evaluation itself (file, column, key)."""
    value = {"name": lambda y: CLASSES[y], "fraction": lambda y: y + 0.5, "nan": lambda y: float("nan")}[kind]
    rows = coco_rows()
    for r in rows:
        r["label"] = value(r["label"])
    path = write_set(tmp_path / "d", rows, meta=COCO_META)
    shown = {"name": "'class", "fraction": "", "nan": "nan"}[kind]
    with pytest.raises(ReclipError, match=rf"part-0000\d\.parquet: label {shown}\S* in column 'label' at key=\d-\d "
                                          r"is not a class index \(an integer into the label set's classes\)$"):
        evaluate(perfect_model(), path)
    with pytest.raises(ReclipError, match=rf"label {shown}\S* in column 'label' \(label set 'label'\) is not a class "
                                          r"index") as info:
        check_eval_set(path, ColumnMap(), [32], 16)
    if kind == "name":
        assert re.search(r"\('class(\d)' is a class name: write its index, \1\)$", str(info.value))


def test_labels_that_hold_an_index_are_read_as_it(tmp_path):
    """Digits in a string column and whole floats (a pandas column with a gap) are the indices they hold."""
    model = noisy_model()
    want = evaluate(model, write_set(tmp_path / "int", coco_rows(), meta=COCO_META))
    for name, cast in (("str", str), ("float", float)):
        rows = [{**r, "label": cast(r["label"])} for r in coco_rows()]
        path = write_set(tmp_path / name, rows, meta=COCO_META)
        assert evaluate(model, path) == want
        assert check_eval_set(path, ColumnMap(), [32], 16)["label_sets"] == {"label": 3}


def test_rows_of_one_image_must_agree_on_the_label(tmp_path):
    rows = coco_rows(with_image_id=False)
    rows[3]["label"] = (rows[3]["label"] + 1) % len(CLASSES)
    path = write_set(tmp_path / "coco", rows, meta=COCO_META)
    with pytest.raises(ReclipError, match=r"part-0000\d\.parquet: rows showing image blake2b:\w+ disagree on 'label'"):
        evaluate(perfect_model(), path)


def classification_rows(caption: str) -> tuple[list[dict], pa.Schema]:
    """ImageNet-style rows: image + label, and a caption column that is absent, all-null string or null-typed."""
    fields = [("key", pa.string()), ("image", pa.binary()), ("label", pa.int32())]
    if caption == "string-null":
        fields.append(("caption", pa.string()))
    elif caption == "null-type":
        fields.append(("caption", pa.null()))
    rows = [{"key": f"k{i}", "image": image_bytes(i), "label": labels_of(i),
             **({} if caption == "none" else {"caption": None})} for i in range(N_IMAGES)]
    return rows, pa.schema(fields)


@pytest.mark.parametrize("caption", ["none", "string-null", "null-type"])
def test_classification_only_sets_get_zero_shot_without_retrieval(tmp_path, caption):
    rows, schema = classification_rows(caption)
    path = write_set(tmp_path / "cls", rows, meta=COCO_META, schema=schema)
    model = noisy_model(1)
    m = evaluate(model, path)
    assert m["label/top1"] == pytest.approx(reference_top1(model, [labels_of(i) for i in range(N_IMAGES)]))
    assert {"label/top5", "label/mean_per_class_recall"} <= set(m)
    assert not any("r@" in k for k in m) and m["captions"] == 0 and m["images"] == N_IMAGES
    assert evaluate(perfect_model(), path)["label/top1"] == 1.0
    summary = check_eval_set(path, ColumnMap(), [32], 16)
    assert summary == {"rows": N_IMAGES, "files": 2, "label_sets": {"label": 3}, "has_captions": False}
    # no captions and no classes: nothing to score, said in one line
    (tmp_path / "cls" / "dataset.json").unlink()
    with pytest.raises(ReclipError, match="nothing to evaluate: no captions and no label set"):
        evaluate(model, path)
    with pytest.raises(ReclipError, match="nothing to evaluate: no captions and no label set"):
        check_eval_set(path, ColumnMap(), [32], 16)


def img2dataset_rows() -> list[dict]:
    """img2dataset-style rows: jpg/txt/status/url/error_message; a failed download has a null jpg, and its caption
    is kept (img2dataset's parquet writer) or null (DESIGN.md's description): both are absent, not bad."""
    rows = []
    for i in range(N_IMAGES):
        ok = i % 4 != 1
        rows.append({"key": f"{i:09d}", "jpg": image_bytes(i) if ok else None,
                     "txt": f"image {i} caption 0" if ok or i == 1 else None, "url": f"http://x/{i}.jpg",
                     "status": "success" if ok else "failed_to_download",
                     "error_message": None if ok else "HTTP 404", "width": 48 + i, "height": 40})
    rows[2]["jpg"] = b"\xff\xd8 truncated jpeg"  # a real bad row, to show absent rows are counted apart
    return rows


def test_img2dataset_failed_downloads_are_absent_not_bad(tmp_path):
    path = write_set(tmp_path / "i2d", img2dataset_rows(), shards=1)
    columns = ColumnMap(image="jpg", caption="txt")
    absent = sum(i % 4 == 1 for i in range(N_IMAGES))
    for require_caption in (True, False):  # training's default read and evaluation's
        counts = BadRowCount()
        batches = list(iter_local_batches(path, image_size=32, text_length=8, tokenizer=StubTokenizer(),
                                          batch_size=4, columns=columns, bad_rows=counts,
                                          require_caption=require_caption))
        kept = sum(len(b["image"]) for b in batches)
        assert (counts.absent, counts.bad, counts.seen) == (absent, 1, N_IMAGES - absent)
        assert kept == N_IMAGES - absent - 1
        assert counts.fraction == pytest.approx(1 / (N_IMAGES - absent))  # absent rows are not in the fraction
        counts.check(0.2)
    m = evaluate_dataset(noisy_model(), StubTokenizer(), path, image_size=32, text_length=8, columns=columns)
    assert (m["absent_rows"], m["bad_rows"], m["images"], m["captions"]) == (absent, 1, 5, 5)


def test_status_column_marks_absent_even_with_bytes(tmp_path):
    rows = img2dataset_rows()
    rows[0]["status"] = "failed_to_resize"  # bytes present, but img2dataset says the sample failed
    path = write_set(tmp_path / "i2d", rows, shards=1)
    counts = BadRowCount()
    list(iter_local_batches(path, image_size=32, text_length=8, tokenizer=StubTokenizer(), batch_size=4,
                            columns=ColumnMap(image="jpg", caption="txt"), bad_rows=counts))
    assert counts.absent == 3 and counts.bad == 1


def test_require_caption_false_keeps_captionless_rows_with_empty_text(tmp_path):
    rows = coco_rows()[:6]
    rows[1]["caption"] = None
    rows[2]["caption"] = "   "
    path = write_set(tmp_path / "d", rows, shards=1)
    strict, relaxed = BadRowCount(), BadRowCount()
    kept = sum(len(b["image"]) for b in iter_local_batches(path, image_size=32, text_length=8,
                                                            tokenizer=StubTokenizer(), batch_size=4, bad_rows=strict))
    assert kept == 4 and strict.bad == 2  # training's default is unchanged: empty captions are bad rows
    batches = list(iter_local_batches(path, image_size=32, text_length=8, tokenizer=StubTokenizer(), batch_size=4,
                                      bad_rows=relaxed, require_caption=False, extra_columns=("caption",)))
    has = np.concatenate([b["has_caption"] for b in batches])
    captions = np.concatenate([b["caption"] for b in batches])
    assert relaxed.bad == 0 and len(has) == 6
    assert list(has) == [c is not None and bool(c.strip()) for c in captions]
    tokens = np.concatenate([b["tokens"] for b in batches])
    assert not tokens[~has].any()  # the stub tokenizer maps the "" marker to zeros


def test_check_eval_set_summary_and_errors(tmp_path, coco_dir):
    assert check_eval_set(coco_dir, ColumnMap(), [32, 64], 16) == {
        "rows": N_IMAGES * CAPTIONS_PER_IMAGE, "files": 2, "label_sets": {"label": 3}, "has_captions": True}
    with pytest.raises(ReclipError, match="eval image size 40 is not a multiple of the model's patch size 16"):
        check_eval_set(coco_dir, ColumnMap(), [32, 40], 16)

    rows = coco_rows()
    rows[7]["label"] = 3  # 3 classes: 0..2
    bad = write_set(tmp_path / "bad", rows, meta=COCO_META)
    with pytest.raises(ReclipError, match=r"part-0000\d\.parquet: label 3 in column 'label' is outside the 3 classes "
                                          r"of label set 'label' in dataset.json") as info:
        check_eval_set(bad, ColumnMap(), [32], 16)
    assert "\n" not in str(info.value)

    # label sets on other columns (dataset.json's label_sets) are checked on their own column
    rows = [{**r, "label_pattern": 5} for r in coco_rows()]
    meta = {"label_sets": {"label": {"classes": CLASSES},
                           "pattern": {"column": "label_pattern", "classes": ["a", "b"]}}}
    other = write_set(tmp_path / "other", rows, meta=meta)
    with pytest.raises(ReclipError, match="label 5 in column 'label_pattern' is outside the 2 classes of label set "
                                          "'pattern'"):
        check_eval_set(other, ColumnMap(), [32], 16)

    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("image", pa.binary()), ("caption", pa.string())])),
                   empty / "part-00000.parquet")
    with pytest.raises(ReclipError, match="no rows to evaluate"):
        check_eval_set(str(empty), ColumnMap(), [32], 16)
    with pytest.raises(ReclipError, match="no Parquet files"):
        check_eval_set(str(tmp_path / "nothing"), ColumnMap(), [32], 16)


def test_classes_for_a_label_column_the_shards_lack_are_an_error_until_it_is_named(tmp_path):
    """dataset.json's classes on a set whose labels sit in ``cls`` (CLIP_benchmark's webdataset name): the pre-Ray
    check and the evaluation both dropped zero-shot without a word. Now one line names dataset.json, the column, the
    shard's columns and the key that names it; named, the set scores what it scores with its labels in ``label``."""
    rows = [{("cls" if k == "label" else k): v for k, v in r.items()} for r in coco_rows()]
    path = write_set(tmp_path / "cls", rows, meta=COCO_META)
    message = (r"/cls/dataset\.json: its 'classes' are for the label column 'label', which \S+/cls/part-00000\.parquet "
               r"lacks; columns are \['caption', 'cls', 'image', 'image_id', 'key'\] "
               r"\(try --set data\.label_column=cls\)$")
    with pytest.raises(ReclipError, match=message):
        check_eval_set(path, ColumnMap(), [32], 16)
    with pytest.raises(ReclipError, match=message):
        evaluate(noisy_model(), path)
    model = noisy_model()
    want = evaluate(model, write_set(tmp_path / "label", coco_rows(), meta=COCO_META))
    named = eval_columns(path, ColumnMap(label="cls"))  # as training and `reclip-ray eval` pick the columns
    assert named.label == "cls"
    assert evaluate_dataset(model, StubTokenizer(), path, image_size=32, text_length=8, batch_size=7,
                            columns=named) == want
    assert check_eval_set(path, named, [32], 16)["label_sets"] == {"label": 3}
    # a label_sets set on a column of its own that the shards lack: dataset.json names it, so it is fixed there
    meta = {"label_sets": {"label": {"classes": CLASSES}, "pattern": {"column": "label_pattern", "classes": ["a"]}}}
    other = write_set(tmp_path / "other", coco_rows(), meta=meta)
    with pytest.raises(ReclipError, match=r"/other/dataset\.json: label set 'pattern' is for column 'label_pattern', "
                                          r"which \S+ lacks; columns are \[.*\] \(add the column, or correct the set's "
                                          r"'column'\)$"):
        check_eval_set(other, ColumnMap(), [32], 16)


@pytest.mark.parametrize("meta, entry", [(COCO_META, "'classes'"),
                                         ({"label_sets": {"shape": {"classes": CLASSES}}}, "label set 'shape'")])
def test_a_captions_only_set_with_leftover_classes_says_to_delete_them(tmp_path, meta, entry):
    """A captions-only set (no label column) whose dataset.json still names classes, copied from a labelled set: it
    ran retrieval and dropped the classes without a word; since dataset.json classes for a column the shards lack
    are an error, it fails. With no column to suggest, the one line says both ways out: name the label column, or
    delete the entry; deleted, the set scores the retrieval it scored before."""
    from reclip_ray.data.schema import OPTION_FLAG, column_flag

    rows = [{k: v for k, v in r.items() if k != "label"} for r in coco_rows()]
    path = write_set(tmp_path / "caps", rows, meta=meta)
    what = "its 'classes' are" if entry == "'classes'" else f"{entry} is"
    line = (rf"/caps/dataset\.json: {what} for the label column 'label', which \S+/caps/part-00000\.parquet lacks; "
            rf"columns are \['caption', 'image', 'image_id', 'key'\] \(name it with FLAG, or, for a set without "
            rf"labels, delete {entry} from dataset\.json\)$")
    config_line = line.replace("FLAG", r"--set data\.label_column=COLUMN")
    with pytest.raises(ReclipError, match=config_line):
        check_eval_set(path, ColumnMap(), [32], 16)
    with pytest.raises(ReclipError, match=config_line):
        evaluate(noisy_model(), path)
    with column_flag(OPTION_FLAG), pytest.raises(ReclipError, match=line.replace("FLAG", "--label-column COLUMN")):
        evaluate(noisy_model(), path)  # as `reclip-ray eval` names the flag
    (tmp_path / "caps" / "dataset.json").write_text(json.dumps({"templates": meta.get("templates", [])}))
    m = evaluate(noisy_model(), path)
    assert m == evaluate(noisy_model(), write_set(tmp_path / "bare", rows))
    assert "image_to_text_r@1" in m and not any(k.endswith("/top1") for k in m)
    assert check_eval_set(path, ColumnMap(), [32], 16)["label_sets"] == {}


def test_a_class_named_twice_is_warned_about_once_and_still_ties(tmp_path, capsys):
    """Two classes with one name (open_clip's ImageNet list: 'missile', 'sunglasses') give one prompt: they tie, a tie
    counts against the model, so their images never score top-1. The rule stays; one line says so, once per eval
    set however often it is evaluated (a run evaluates at every phase end and size) or checked."""
    path = write_set(tmp_path / "twins", coco_rows(), meta={"classes": ["class0", "class1", "class1"]})
    capsys.readouterr()
    for _ in range(2):
        assert evaluate(perfect_model(), path)["label/top1"] == 3 / N_IMAGES  # only class 0's images (0, 3, 6) hit
    check_eval_set(path, ColumnMap(), [32], 16)
    err = capsys.readouterr().err
    assert err == (f"[reclip] WARNING: {path}: label set 'label' names 'class1' (classes 1, 2) more than once; their "
                   "prompts tie and a tie counts against the model, so their images are never top-1 hits\n")
    evaluate(perfect_model(), write_set(tmp_path / "once", coco_rows(), meta=COCO_META))
    assert capsys.readouterr().err == ""


def test_eval_columns_fall_back_to_canonical_names(coco_dir, tmp_path):
    """img2dataset-named training columns, canonical eval set: the eval set is read by its own names."""
    picked = eval_columns(coco_dir, ColumnMap(image="jpg", caption="txt"))
    assert (picked.image, picked.caption, picked.label) == ("image", "caption", "label")
    path = write_set(tmp_path / "i2d", img2dataset_rows(), shards=1)
    picked = eval_columns(path, ColumnMap(image="jpg", caption="txt"))
    assert (picked.image, picked.caption) == ("jpg", "txt")


# --------------------------------------------------------------------------------------------------- Hugging Face


def write_hf_set(folder, *, caption: str | None = None, labels=None, names=CLASSES, shards: int = 2) -> str:
    """Parquet written by ``datasets`` itself: Image() struct, ClassLabel ``label`` (``names``) and ``coarse`` (image
    parity), an optional caption column named ``caption``; class names only in the footers' metadata."""
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as HFImage

    labels = [labels_of(i) for i in range(N_IMAGES)] if labels is None else labels
    columns = {"image": [{"bytes": image_bytes(i, "PNG" if i % 3 == 2 else "JPEG"), "path": None}
                         for i in range(N_IMAGES)],
               "label": labels, "coarse": [i % 2 for i in range(N_IMAGES)]}
    features = {"image": HFImage(), "label": ClassLabel(names=list(names)),
                "coarse": ClassLabel(names=["class0", "class1"])}
    if caption:
        columns[caption] = [f"image {i} caption 0" for i in range(N_IMAGES)]
        features[caption] = Value("string")
    ds = Dataset.from_dict(columns, features=Features(features))
    folder.mkdir(parents=True)
    for s in range(shards):
        ds.shard(num_shards=shards, index=s, contiguous=True).to_parquet(str(folder / f"train-{s:05d}.parquet"))
    return str(folder)


def reference_top1_of(model: StubModel, labels: list[int], n_classes: int) -> float:
    """Top-1 by brute force over the stub's first ``n_classes`` class vectors (ties are misses)."""
    sims = (model.image_vecs @ model.class_vecs[:n_classes].T).tolist()
    return sum(all(sims[i][c] < sims[i][y] for c in range(n_classes) if c != y)
               for i, y in enumerate(labels)) / len(labels)


def test_hugging_face_classlabels_are_the_label_sets(tmp_path):
    """An image + ClassLabel set exported by ``datasets``, no dataset.json: each ClassLabel column is a label set
    (the label column is ``label``, others keep their column's name), scored zero-shot with its names."""
    path = write_hf_set(tmp_path / "hf")
    model = noisy_model(2)
    m = evaluate(model, path)
    labels = [labels_of(i) for i in range(N_IMAGES)]
    assert m["label/top1"] == pytest.approx(reference_top1_of(model, labels, 3))
    assert m["coarse/top1"] == pytest.approx(reference_top1_of(model, [i % 2 for i in range(N_IMAGES)], 2))
    assert (m["label/chance_top1"], m["coarse/chance_top1"]) == (pytest.approx(1 / 3), 0.5)
    assert 0 < m["label/top1"] < 1 and m["images"] == N_IMAGES and not any("r@" in k for k in m)
    assert evaluate(perfect_model(), path)["label/top1"] == 1.0
    assert check_eval_set(path, ColumnMap(), [32], 16) == {"rows": N_IMAGES, "files": 2,
                                                          "label_sets": {"label": 3, "coarse": 2},
                                                          "has_captions": False}
    # dataset.json's templates (without classes) are used with the ClassLabel names
    (tmp_path / "hf" / "dataset.json").write_text(json.dumps({"templates": ["itap of a {}."]}))
    seen: list[str] = []

    class Recording(StubTokenizer):
        def encode(self, texts, length):
            seen.extend(texts)
            return super().encode(texts, length)

    evaluate_dataset(model, Recording(), path, image_size=32, text_length=8)
    assert {"itap of a class2.", "itap of a class1."} <= set(seen) and not any("photo" in t for t in seen)
    # dataset.json, when it names classes, says otherwise: its classes (here in another order) and only its sets
    (tmp_path / "hf" / "dataset.json").write_text(json.dumps({"classes": ["class1", "class2", "class0"]}))
    m = evaluate(model, path)
    assert not any(k.startswith("coarse/") for k in m)
    shifted = StubModel(model.image_vecs, model.caption_vecs, model.class_vecs[[1, 2, 0]])
    assert m["label/top1"] == pytest.approx(reference_top1_of(shifted, labels, 3))


def test_hugging_face_classlabels_with_another_label_column_read_that_column(tmp_path):
    """``data.label_column=coarse`` on a ``datasets`` export: the set ``label`` is the ``coarse`` column, in the check
    and in the scores alike (``ColumnMap.source``, one rule for both), and the column literally named ``label``,
    which ``label`` no longer stands for, is no set at all."""
    path = write_hf_set(tmp_path / "hf")
    columns = ColumnMap(label="coarse")
    assert check_eval_set(path, columns, [32], 16)["label_sets"] == {"label": 2}
    model = noisy_model(2)
    m = evaluate_dataset(model, StubTokenizer(), path, image_size=32, text_length=8, columns=columns)
    assert [k for k in m if k.endswith("/top1")] == ["label/top1"] and m["label/chance_top1"] == 0.5
    assert m["label/top1"] == pytest.approx(reference_top1_of(model, [i % 2 for i in range(N_IMAGES)], 2))
    assert m["label/top1"] == evaluate(model, path)["coarse/top1"]


def test_hugging_face_image_text_set_gets_retrieval_too(tmp_path):
    path = write_hf_set(tmp_path / "hf", caption="text")
    m = evaluate_dataset(perfect_model(), StubTokenizer(), path, image_size=32, text_length=8,
                         columns=ColumnMap(caption="text"))
    assert m["captions"] == N_IMAGES and m["image_to_text_r@1"] == 1.0 and m["label/top1"] == 1.0


def test_hugging_face_label_errors_name_the_metadata(tmp_path):
    unlabelled = write_hf_set(tmp_path / "test_split", labels=[-1] * N_IMAGES)  # datasets' "no label"
    with pytest.raises(ReclipError, match=r"label -1 in column 'label' is outside the 3 classes of label set 'label' "
                                          r"in the 'huggingface' metadata \(-1 is how datasets marks a missing"):
        check_eval_set(unlabelled, ColumnMap(), [32], 16)
    # reclip-ray eval (no pre-Ray check) says the same, not "classes file does not match" with no classes file
    with pytest.raises(ReclipError, match=r"test_split: label -1 in column 'label' is outside the 3 classes of label "
                                          r"set 'label' in the 'huggingface' metadata \(-1 is how datasets marks a "
                                          r"missing label: an unlabelled split\?\)$"):
        evaluate(perfect_model(), unlabelled)
    with pytest.raises(ReclipError, match=r"label 2 in column 'label' is outside the 2 classes of label set 'label' "
                                          r"in the classes file \(classes file does not match the dataset\?\)$"):
        evaluate_dataset(perfect_model(), StubTokenizer(), write_hf_set(tmp_path / "hf"), image_size=32,
                         text_length=8, classes={"classes": ["class0", "class1"], "templates": ["a {}"]})
    mixed = write_hf_set(tmp_path / "mixed", shards=1)
    write_hf_set(tmp_path / "other", names=["class0", "class1", "class9"], shards=1)
    (tmp_path / "other" / "train-00000.parquet").rename(tmp_path / "mixed" / "train-00001.parquet")
    with pytest.raises(ReclipError, match=r"train-00001\.parquet: ClassLabel names in its 'huggingface' metadata "
                                          r"differ from those of .*train-00000\.parquet"):
        evaluate(perfect_model(), mixed)
    with pytest.raises(ReclipError, match=r"train-00001\.parquet: ClassLabel names .* differ"):
        check_eval_set(mixed, ColumnMap(), [32], 16)
