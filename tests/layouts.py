"""Test datasets laid out the way real tools write them, to prove that "any column layout trains".

``reclip_ray.data.synth`` writes the canonical layout, so tests built on it can never catch a reader that only
works on our own output. The writers here imitate other producers instead: img2dataset's Parquet and webdataset
output (column names, types, column order, failed downloads kept as rows, row groups of 100), our own folder
ingest with labels, and a hand-made "messy" export. Images are real JPEG/PNG/WebP bytes from PIL, non-square and
of varied sizes; captions name the colour and shape drawn, so a model can learn something from them.

Every writer returns :class:`Layout`, whose counts come from how the rows were generated (not from reading the
files back), so tests can compare a reader's counts with an independent truth.

Facts about img2dataset (read in its ``downloader.py`` / ``writer.py``) that these writers copy:

* The Parquet writer's schema is the input columns (``save_additional_columns``, then ``caption``, then ``url``),
  then ``key, status, error_message, width, height, original_width, original_height`` (int32), ``exif`` and
  ``sha256`` (strings), then the image column ``jpg`` (binary) last.
* The caption is in ``caption`` (the input's caption column, renamed); the ``txt`` field its writer builds is not
  in the schema and is dropped. So a failed row keeps its caption and only ``jpg`` is null.
* ``status`` is ``success``, ``failed_to_download`` or ``failed_to_resize``; every failed row has a null image,
  an ``error_message``, and null sizes/exif/sha256.
* ``--output_format webdataset`` writes ``NNNNN.tar`` with ``KEY.jpg``/``KEY.txt``/``KEY.json`` for successes only,
  and a sibling ``NNNNN.parquet`` with the metadata of every row and no image column, plus ``NNNNN_stats.json``.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10), "grey": (128, 128, 128)}
ERRORS = ("HTTP Error 404: Not Found", "<urlopen error [Errno -2] Name or service not known>", "timed out",
          "HTTP Error 403: Forbidden")
ROW_GROUP = 100  # img2dataset's BufferedParquetWriter flushes every 100 samples


@dataclass
class Layout:
    """What a writer produced. Keys name rows the way the writer did (a ``key`` column, else ``FILE#ROW``).

    ``valid_keys`` are the rows a reader must train on; ``absent_keys`` rows are not samples (null image or a failed
    ``status``); ``bad_keys`` rows are samples that cannot be used (corrupt bytes, empty caption).
    """

    path: Path
    files: list[str]
    image_column: str
    caption_column: str
    valid_keys: list[str]
    absent_keys: list[str] = field(default_factory=list)
    bad_keys: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.valid_keys) + len(self.absent_keys) + len(self.bad_keys)

    @property
    def absent(self) -> int:
        return len(self.absent_keys)

    @property
    def bad(self) -> int:
        return len(self.bad_keys)


# ------------------------------------------------------------------------------------------------ images


def draw(colour: str, shape: str, size: tuple[int, int], background: str = "white") -> Image.Image:
    """An RGB picture of one shape, centred, filling about half the shorter side."""
    img = Image.new("RGB", size, BACKGROUNDS[background])
    w, h = size
    r = min(w, h) // 4
    box = (w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r)
    pen = ImageDraw.Draw(img)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(box[0], box[3]), (box[2], box[3]), (w // 2, box[1])], fill=COLOURS[colour])
    return img


def photo(rng: np.random.Generator, w: int, h: int, fmt: str = "JPEG", noise: float = 6.0) -> bytes:
    """A photo-like image: two colour gradients, four flat blocks and Gaussian noise, so decoders and resamplers
    differ by what they would on photographs (not on flat drawings, where they all agree). JPEG at quality 90;
    other formats at PIL's defaults."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3) * (xx / w)[..., None] + rng.uniform(0, 255, 3) * (yy / h)[..., None] * 0.5
    img = np.clip(base + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        img[y0 : y0 + h // 4, x0 : x0 + w // 5] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def encode(img: Image.Image, fmt: str) -> bytes:
    """Encoded bytes as a downloader would have stored them (JPEG q=90, PNG, lossy WebP)."""
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def _random_picture(rng: np.random.Generator, fmt: str) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes, caption, (width, height)) of a random non-square picture."""
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    background = str(rng.choice(list(BACKGROUNDS)))
    w = int(rng.integers(48, 161))
    h = int(rng.integers(40, 141))
    if w == h:
        w += 1
    data = encode(draw(colour, shape, (w, h), background), fmt)
    return data, f"a {colour} {shape} on a {background} background", (w, h)


def _formats(rng: np.random.Generator, n: int) -> list[str]:
    """Mostly JPEG, with a few PNG and WebP (img2dataset keeps the source bytes when re-encoding is off)."""
    fmts = list(rng.choice(["JPEG", "PNG", "WEBP"], size=n, p=[0.8, 0.1, 0.1]))
    if n >= 3:  # at least one of each, wherever the random draw put them
        fmts[1], fmts[2] = "PNG", "WEBP"
    return [str(f) for f in fmts]


def _corrupt(data: bytes, i: int) -> bytes:
    """Bytes a download can really end up with: a truncated transfer, or an HTML error page saved as the image."""
    if i % 2 == 0:
        return data[: len(data) * 2 // 3]
    return b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>"


# ------------------------------------------------------------------------------------------------ img2dataset


def img2dataset_key(shard: int, index: int, samples_per_shard: int = 10000, shard_digits: int = 5) -> str:
    """img2dataset's ``compute_key``: shard id and index in one zero-padded number, e.g. shard 1 row 23 = 000010023."""
    sample_digits = len(str(samples_per_shard - 1))
    return f"{shard * 10 ** sample_digits + index:0{shard_digits + sample_digits}d}"


def _img2dataset_rows(rng: np.random.Generator, shard: int, n: int, failed: set[int], corrupt: set[int],
                      extra_columns: bool) -> list[dict]:
    """The metadata + image of one shard's rows, as img2dataset's downloader fills them."""
    fmts = _formats(rng, n)
    rows = []
    for i in range(n):
        data, caption, (w, h) = _random_picture(rng, fmts[i])
        row: dict = {}
        if extra_columns:  # save_additional_columns: copied from the input for every row, failed or not
            row["similarity"] = float(np.round(rng.uniform(0.2, 0.45), 4))
            row["tags"] = [str(t) for t in rng.choice(["photo", "stock", "shape", "art", "icon"], size=int(rng.integers(0, 3)), replace=False)]
            row["cls"] = int(rng.integers(0, 10))
        row["caption"] = caption
        row["url"] = f"https://img.example.com/{shard}/{i}/{caption.split()[2]}.jpg"
        row["key"] = img2dataset_key(shard, i)
        if i in failed:
            download = i % 5 != 4  # mostly download failures, some resize (decode) failures
            row.update(status="failed_to_download" if download else "failed_to_resize",
                       error_message=str(rng.choice(ERRORS)) if download else "cannot identify image file",
                       width=None, height=None, original_width=None, original_height=None, exif=None,
                       sha256=None, jpg=None)
        else:
            if i in corrupt:
                data = _corrupt(data, i)
            exif = "{}" if i % 3 else json.dumps({"Image Make": "Canon", "Image Orientation": "Horizontal (normal)"})
            row.update(status="success", error_message=None, width=w, height=h, original_width=w,
                       original_height=h, exif=exif, sha256=hashlib.sha256(data).hexdigest(), jpg=data)
        rows.append(row)
    return rows


def _img2dataset_schema(extra_columns: bool, with_image: bool) -> pa.Schema:
    """img2dataset's output schema: input columns, then its metadata, then (Parquet output only) ``jpg``."""
    fields = []
    if extra_columns:
        fields += [pa.field("similarity", pa.float64()), pa.field("tags", pa.list_(pa.string())),
                   pa.field("cls", pa.int64())]
    fields += [pa.field("caption", pa.string()), pa.field("url", pa.string()), pa.field("key", pa.string()),
               pa.field("status", pa.string()), pa.field("error_message", pa.string())]
    fields += [pa.field(n, pa.int32()) for n in ("width", "height", "original_width", "original_height")]
    fields += [pa.field("exif", pa.string()), pa.field("sha256", pa.string())]
    if with_image:
        fields.append(pa.field("jpg", pa.binary()))
    return pa.schema(fields)


def _write_buffered(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    """Like img2dataset's BufferedParquetWriter: one ParquetWriter, a table (row group) per 100 rows."""
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, len(rows), ROW_GROUP):
            chunk = rows[start : start + ROW_GROUP]
            writer.write_table(pa.Table.from_pydict({n: [r.get(n) for r in chunk] for n in schema.names}, schema))


def _write_stats(folder: Path, shard: int, rows: list[dict], output_format: str) -> None:
    """``NNNNN_stats.json``, which img2dataset writes next to every shard."""
    statuses = [r["status"] for r in rows]
    stats = {
        "count": len(rows), "successes": statuses.count("success"),
        "failed_to_download": statuses.count("failed_to_download"),
        "failed_to_resize": statuses.count("failed_to_resize"),
        "duration": 1.5, "start_time": 1700000000.0, "end_time": 1700000001.5,
        "status_dict": {r["error_message"]: 1 for r in rows if r["error_message"]},
        "config": {"output_format": output_format, "encode_format": "jpg", "resize_mode": "no",
                   "save_additional_columns": ["similarity", "tags", "cls"], "compute_hash": "sha256"},
    }
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))


def _pick(rng: np.random.Generator, candidates: list[int], count: int) -> set[int]:
    return {int(i) for i in rng.choice(candidates, size=min(count, len(candidates)), replace=False)}


def write_img2dataset(out: str | Path, n_rows: int, failed_fraction: float = 0.3, seed: int = 0, shards: int = 2,
                      extra_columns: bool = True, corrupt: int = 0, caption_column: str = "caption") -> Layout:
    """img2dataset ``--output_format parquet`` output: ``00000.parquet``... plus ``00000_stats.json``...

    ``round(n_rows * failed_fraction)`` rows are failed downloads (null ``jpg``, kept in the file); ``corrupt``
    successful rows hold unusable bytes (a truncated transfer, an HTML error page). Rows are split over ``shards``
    files as evenly as possible. ``caption_column="txt"`` renames the caption column and nulls it on failed rows,
    which is what shards re-exported from webdataset tars look like; the default is what img2dataset writes.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_failed = round(n_rows * failed_fraction)
    failed_global = _pick(rng, list(range(n_rows)), n_failed)
    corrupt_global = _pick(rng, [i for i in range(n_rows) if i not in failed_global], corrupt)
    layout = Layout(out, [], "jpg", caption_column, [])
    captions: dict[str, str] = {}
    bounds = np.linspace(0, n_rows, shards + 1).astype(int)
    for shard in range(shards):
        lo, hi = int(bounds[shard]), int(bounds[shard + 1])
        rows = _img2dataset_rows(rng, shard, hi - lo, {i - lo for i in failed_global if lo <= i < hi},
                                 {i - lo for i in corrupt_global if lo <= i < hi}, extra_columns)
        schema = _img2dataset_schema(extra_columns, with_image=True)
        if caption_column != "caption":
            for r in rows:
                caption = r.pop("caption")
                r[caption_column] = caption if r["jpg"] is not None else None
            schema = schema.set(schema.get_field_index("caption"), pa.field(caption_column, pa.string()))
        path = out / f"{shard:05d}.parquet"
        _write_buffered(rows, schema, path)
        _write_stats(out, shard, rows, "parquet")
        layout.files.append(str(path))
        for j, r in enumerate(rows):
            if r["status"] != "success":
                layout.absent_keys.append(r["key"])
            elif j + lo in corrupt_global:
                layout.bad_keys.append(r["key"])
            else:
                layout.valid_keys.append(r["key"])
                captions[r["key"]] = r[caption_column]
    layout.extra["captions"] = captions  # of the valid rows: to check a reader pairs images with the right text
    return layout


def write_webdataset_sibling(out: str | Path, n_rows: int = 12, failed_fraction: float = 0.25, seed: int = 0,
                             shards: int = 1) -> Layout:
    """img2dataset ``--output_format webdataset`` output: ``00000.tar`` + metadata-only ``00000.parquet`` + stats.

    The tar holds ``KEY.jpg``, ``KEY.txt`` and ``KEY.json`` (the row's metadata) for successful downloads only; the
    Parquet beside it lists every row, failed ones too, with no image column. ``extra["pattern"]`` is the brace
    pattern of the tars for ``reclip-ray data ingest --webdataset``; ``valid_keys`` are the samples in the tars.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    layout = Layout(out, [], "jpg", "txt", [])
    per_shard = int(np.ceil(n_rows / shards))
    for shard in range(shards):
        n = min(per_shard, n_rows - shard * per_shard)
        rows = _img2dataset_rows(rng, shard, n, _pick(rng, list(range(n)), round(n * failed_fraction)), set(),
                                 extra_columns=False)
        with tarfile.open(out / f"{shard:05d}.tar", "w") as tar:
            for r in rows:
                if r["jpg"] is None:
                    layout.absent_keys.append(r["key"])
                    continue
                meta = {k: v for k, v in r.items() if k != "jpg"}
                for ext, payload in (("jpg", r["jpg"]), ("txt", r["caption"].encode()),
                                     ("json", json.dumps(meta, indent=4).encode())):
                    _add_member(tar, f"{r['key']}.{ext}", payload)
                layout.valid_keys.append(r["key"])
        path = out / f"{shard:05d}.parquet"
        _write_buffered(rows, _img2dataset_schema(False, with_image=False), path)
        _write_stats(out, shard, rows, "webdataset")
        layout.files.append(str(path))
    last = f"{shards - 1:05d}"
    layout.extra["pattern"] = str(out / ("00000.tar" if shards == 1 else f"{{00000..{last}}}.tar"))
    return layout


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """A regular file member with the read-only mode and fixed mtime webdataset's TarWriter uses."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o444
    info.mtime = 1700000000
    tar.addfile(info, io.BytesIO(payload))


# ------------------------------------------------------------------------------------------------ canonical


def write_labelled_folder_dataset(out: str | Path, n_rows: int = 12, seed: int = 0, shard_rows: int = 5) -> Layout:
    """What ``reclip-ray data ingest --images DIR --captions FILE.csv`` writes for a CSV with a ``label`` column.

    Runs the real ingest on a folder of PNG/JPEG/WebP files (some in a subfolder). Labels index
    ``extra["classes"]`` (the shape names); ``extra["labels"]`` maps each key to its label.
    """
    from reclip_ray.data.ingest import ingest_folder

    out = Path(out)
    source = out.parent / (out.name + "_source")
    (source / "images" / "more").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fmts = _formats(rng, n_rows)
    records = []
    for i in range(n_rows):
        shape = SHAPES[i % len(SHAPES)]
        colour = str(rng.choice(list(COLOURS)))
        size = (int(rng.integers(48, 129)), int(rng.integers(40, 97)))
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmts[i]]
        rel = f"{'more/' if i % 2 else ''}img{i:03d}.{ext}"
        (source / "images" / rel).write_bytes(encode(draw(colour, shape, size), fmts[i]))
        records.append({"file": rel, "caption": f"a {colour} {shape}", "label": SHAPES.index(shape),
                        "key": f"photo-{i:04d}"})
    captions = source / "captions.csv"
    with open(captions, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "caption", "label", "key"])
        writer.writeheader()
        writer.writerows(records)
    summary = ingest_folder(source / "images", captions, out, shard_rows=shard_rows)
    files = sorted(str(p) for p in out.glob("*.parquet"))
    assert summary["rows"] == n_rows, summary
    return Layout(out, files, "image", "caption", [r["key"] for r in records],
                  extra={"classes": list(SHAPES), "labels": {r["key"]: r["label"] for r in records}})


def write_messy(out: str | Path, n_rows: int = 16, seed: int = 0) -> Layout:
    """Canonical column names, but a hand-made export's mess: no ``key`` column, null and empty captions, a null
    image cell, PNG/WebP/JPEG of odd sizes (including 1-pixel-wide and tall ones), and extra columns of types a
    reader must not choke on (struct, list, timestamp with time zone, dictionary-encoded string).

    Row 0 has a null image (absent, and its caption is null too, so it must count once, as absent), row 1 a null
    caption, row 2 an empty caption and row 3 a whitespace caption (all three bad), the rest are valid. Keys are
    ``FILE#ROW`` since the file has none. ``n_rows`` must be at least 6.
    """
    if n_rows < 6:
        raise ValueError("write_messy needs n_rows >= 6")
    out = Path(out)
    (out / "part=a").mkdir(parents=True, exist_ok=True)  # a hive-style subfolder: shards at any nesting
    rng = np.random.default_rng(seed)
    fmts = ["PNG", "WEBP"] + _formats(rng, n_rows - 2)
    images, captions = [], []
    for i in range(n_rows):
        size = (1, 37) if i == 4 else (61, 1) if i == 5 else (int(rng.integers(33, 120)), int(rng.integers(20, 90)))
        data, caption, _ = _random_picture(rng, fmts[i]) if i > 5 else (None, None, None)
        if data is None:
            colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
            data = encode(draw(colour, shape, size), fmts[i] if size[0] > 1 and size[1] > 1 else "PNG")
            caption = f"a thin {colour} {shape}"
        images.append(data)
        captions.append(caption)
    images[0], captions[0] = None, None
    captions[1], captions[2], captions[3] = None, "", "   "
    table = pa.table({
        "caption": pa.array(captions, pa.string()),
        "meta": pa.array([{"source": "scrape", "score": float(i) / n_rows, "ok": bool(i % 2)} for i in range(n_rows)]),
        "labels": pa.array([[int(x) for x in rng.integers(0, 5, size=i % 3)] for i in range(n_rows)],
                           pa.list_(pa.int32())),
        "fetched": pa.array([dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(hours=i)
                             for i in range(n_rows)], pa.timestamp("us", tz="UTC")),
        "site": pa.array([["a.example", "b.example"][i % 2] for i in range(n_rows)]).dictionary_encode(),
        "image": pa.array(images, pa.binary()),
    })
    half = n_rows // 2
    paths = [out / "messy-0.parquet", out / "part=a" / "messy-1.parquet"]
    pq.write_table(table.slice(0, half), paths[0])
    pq.write_table(table.slice(half), paths[1])
    keys = [f"{paths[0].name}#{i}" for i in range(half)] + [f"{paths[1].name}#{i}" for i in range(n_rows - half)]
    return Layout(out, [str(p) for p in paths], "image", "caption", keys[4:], absent_keys=keys[:1],
                  bad_keys=keys[1:4])


# ------------------------------------------------------------------------------------------------ Hugging Face


def write_hugging_face(out: str | Path, n_rows: int = 14, *, shards: int = 2, seed: int = 0,
                       image_column: str = "image", caption_column: str | None = "caption",
                       null: tuple[int, ...] = (3,), path_only: tuple[int, ...] = (8,),
                       corrupt: tuple[int, ...] = (5,), split: str = "train") -> Layout:
    """Parquet written by the ``datasets`` library itself, as a Hub export: ``Dataset.shard`` + ``to_parquet`` into
    ``data/SPLIT-0000S-of-0000N.parquet`` (every split of a Hub dataset in that one folder).

    ``datasets`` stores an ``Image()`` feature as ``struct<bytes: binary, path: string>`` and a ``ClassLabel`` as
    int64, the class names living only in the footer's ``huggingface`` metadata; there is no key column, so keys are
    ``FILE#ROW``. Two ClassLabels: ``label`` (the shape, ``extra["classes"]``) and ``colour``
    (``extra["colours"]``). Rows ``null`` have no image (a null struct) and rows ``path_only`` an image that
    ``to_parquet`` did not embed (bytes null, path set): both absent. Rows ``corrupt`` hold truncated bytes (bad).
    ``extra["images"]`` maps each valid key to the encoded bytes it stores.
    """
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as HFImage

    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fmts = _formats(rng, n_rows)
    colours = list(COLOURS)
    images, labels, colour_ids, captions = [], [], [], []
    for i in range(n_rows):
        shape, colour = SHAPES[i % len(SHAPES)], colours[int(rng.integers(len(colours)))]
        size = (int(rng.integers(48, 129)), int(rng.integers(40, 97)))
        data = encode(draw(colour, shape, size), fmts[i])
        if i in null:
            images.append(None)
        elif i in path_only:
            file = out / f"local-{i}.png"
            file.write_bytes(data)
            images.append({"bytes": None, "path": str(file)})
        else:
            images.append({"bytes": data[: len(data) // 2] if i in corrupt else data, "path": None})
        labels.append(SHAPES.index(shape))
        colour_ids.append(colours.index(colour))
        captions.append(f"a {colour} {shape}")
    features = {image_column: HFImage(), "label": ClassLabel(names=list(SHAPES)),
                "colour": ClassLabel(names=colours)}
    columns = {image_column: images, "label": labels, "colour": colour_ids}
    if caption_column:
        features[caption_column] = Value("string")
        columns[caption_column] = captions
    ds = Dataset.from_dict(columns, features=Features(features))
    files, keys, start = [], [], 0
    for s in range(shards):
        part = ds.shard(num_shards=shards, index=s, contiguous=True)
        path = out / "data" / f"{split}-{s:05d}-of-{shards:05d}.parquet"
        part.to_parquet(str(path))
        files.append(str(path))
        keys += [(i, f"{path.name}#{i - start}") for i in range(start, start + part.num_rows)]
        start += part.num_rows
    valid = [k for i, k in keys if i not in (*null, *path_only, *corrupt)]
    return Layout(out, files, image_column, caption_column or "", valid,
                  absent_keys=[k for i, k in keys if i in (*null, *path_only)],
                  bad_keys=[k for i, k in keys if i in corrupt],
                  extra={"classes": list(SHAPES), "colours": colours,
                         "labels": {k: labels[i] for i, k in keys},
                         "colour_labels": {k: colour_ids[i] for i, k in keys},
                         "images": {k: images[i]["bytes"] for i, k in keys if k in valid}})


def write_broken_eval_set(out: str | Path, like: str | Path) -> Path:
    """A copy of the eval set ``like`` (its first shard) that passes the checks before Ray (footers, labels and
    dataset.json are fine) but where no image decodes: every evaluation on it fails."""
    out, like = Path(out), Path(like)
    out.mkdir(parents=True)
    (out / "dataset.json").write_text((like / "dataset.json").read_text())
    table = pq.read_table(sorted(like.glob("*.parquet"))[0])
    bad = pa.array([b"not an image"] * table.num_rows, pa.binary())
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", bad), out / "part-0.parquet")
    return out
