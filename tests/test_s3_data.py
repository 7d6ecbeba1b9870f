"""Every data command, eval, export and init_from with s3:// paths, against a real S3 API (moto's server on localhost).

Each test reads back what it wrote through the object store and compares it with the same work done on the local
disk; the request log (``s3_requests``) pins what a code path costs there: one PUT per shard, no rename, no
folder-marker objects. No Ray: the Ray Data read path is exercised through the functions its tasks run.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reclip_ray import storage
from reclip_ray.cli import main
from reclip_ray.errors import CheckpointError, ReclipError


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24 + i, 32 + i, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _image_folder(root, n: int) -> tuple[str, str, list[bytes]]:
    """(folder, captions.csv, image bytes) of ``n`` JPEGs, local."""
    folder = root / "imgs"
    folder.mkdir(parents=True)
    images = [_jpeg(i) for i in range(n)]
    with open(root / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "caption"])
        writer.writeheader()
        for i, data in enumerate(images):
            (folder / f"{i}.jpg").write_bytes(data)
            writer.writerow({"file": f"{i}.jpg", "caption": f"photo number {i}"})
    return str(folder), str(root / "captions.csv"), images


def _rows(dataset: str, columns=None) -> list[dict]:
    """Every row of a dataset (local or URI), shard by shard, read through pyarrow's filesystem."""
    from reclip_ray.data.shards import list_parquet_files

    out = []
    for file in list_parquet_files(dataset):
        fs, inner = storage.filesystem(file)
        out += pq.read_table(inner, filesystem=fs, columns=columns).to_pylist()
    return out


def _run(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _names(uri: str) -> list[str]:
    return [u[len(uri) + 1:] for u in storage.list_files(uri)]


def test_ingest_inspect_shrink_tokenizer_on_s3(tmp_path, s3_prefix, s3_requests, capsys):
    """The whole data preparation with every input and output on S3: ingest (images, captions and shards all in
    the bucket), inspect, shrink in place and to another prefix, tokenizer to S3 and to a local file."""
    from reclip_ray.data.shards import footer_copies
    from reclip_ray.data.tokenizer import load_tokenizer, train_tokenizer

    folder, captions, images = _image_folder(tmp_path, 7)
    raw = storage.join(s3_prefix, "raw")
    storage.upload_dir(folder, storage.join(raw, "imgs"))
    storage.write_bytes(storage.join(raw, "captions.csv"), open(captions, "rb").read())
    ds = storage.join(s3_prefix, "ds")

    s3_requests.clear()
    summary = _run(capsys, "data", "ingest", "--images", storage.join(raw, "imgs"), "--captions",
                   storage.join(raw, "captions.csv"), "--out", ds, "--shard-rows", "3")
    assert (summary["rows"], summary["shards"], summary["out"]) == (7, 3, ds)
    assert _names(ds) == ["dataset.json", "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    # One PUT per object written, nothing else under the output: no temp object, no copy-and-delete "rename",
    # no multipart upload (each object is under the 10 MB part size), no folder marker.
    writes = Counter(m for m, p in s3_requests if "/ds" in p and m != "GET" and m != "HEAD")
    assert writes == {"PUT": 4}, s3_requests
    assert [r["image"] for r in _rows(ds)] == images
    assert [r["caption"] for r in _rows(ds)] == [f"photo number {i}" for i in range(7)]

    report = _run(capsys, "data", "inspect", ds)
    assert (report["rows"], report["shards"], report["rows_bad"], report["dataset_json"]["rows"]) == (7, 3, 0, 7)
    some = _run(capsys, "data", "inspect", storage.join(ds, "shard-0000[02].parquet"))  # a pattern on S3
    assert (some["rows"], some["shards"], some["dataset_json"]["rows"]) == (4, 2, 7)

    other = storage.join(s3_prefix, "small")
    moved = _run(capsys, "data", "shrink", ds, "--sizes", "16", "--out", other, "--workers", "1")
    assert (moved["out"], moved["shards"], moved["copies_made"]) == (other, 3, 7)
    assert _names(other) == _names(ds)  # dataset.json travels with the shards
    assert storage.read_json(storage.join(other, "dataset.json"))["copies"]["sizes"] == [16]
    source_footer = pq.ParquetFile(io.BytesIO(storage.read_bytes(storage.join(ds, "shard-00000.parquet")))).metadata
    assert footer_copies(source_footer, "image") == ((), ())  # the source is untouched
    assert [r["image"] for r in _rows(other)] == images

    in_place = _run(capsys, "data", "shrink", ds, "--sizes", "16,24", "--workers", "2")  # spawned workers on S3
    assert (in_place["copies_made"], in_place["shards_skipped"]) == (14, 0)
    assert 0 < in_place["bytes_per_sample"]["16"] < in_place["bytes_per_sample"]["24"]
    copies = _run(capsys, "data", "inspect", ds)["copies"]
    assert copies["sizes"] == {"16": {"shards": 3, "stale": 0}, "24": {"shards": 3, "stale": 0}}
    assert _run(capsys, "data", "shrink", ds, "--sizes", "16", "--workers", "1")["shards_skipped"] == 3

    tok_uri = storage.join(s3_prefix, "tok", "tokenizer.json")
    local_tok = str(tmp_path / "tokenizer.json")
    for out in (tok_uri, local_tok):
        assert _run(capsys, "data", "tokenizer", "--data", ds, "--out", out, "--vocab-size", "300")["out"] == out
    reference = train_tokenizer(storage.download_dir(ds, str(tmp_path / "copy")), vocab_size=300)
    assert load_tokenizer(tok_uri).to_json() == reference.to_json() == load_tokenizer(local_tok).to_json()
    assert load_tokenizer(storage.join(s3_prefix, "tok")).vocab_size == reference.vocab_size  # the folder works too


def _tar(path, samples: list[tuple[str, bytes, str]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            for ext, data in (("jpg", image), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_and_synth_on_s3(tmp_path, s3_prefix, capsys):
    images = [_jpeg(i) for i in range(5)]
    samples = [(f"{i:05d}", images[i], f"caption {i}") for i in range(5)]
    _tar(tmp_path / "00000.tar", samples[:3])
    _tar(tmp_path / "00001.tar", samples[3:])
    tars = storage.join(s3_prefix, "wds")
    for name in ("00000.tar", "00001.tar"):
        storage.write_bytes(storage.join(tars, name), (tmp_path / name).read_bytes())
    out = storage.join(s3_prefix, "from-wds")
    summary = _run(capsys, "data", "ingest", "--webdataset", tars + "/{00000..00001}.tar", "--out", out,
                   "--shard-rows", "2")
    assert (summary["rows"], summary["shards"]) == (5, 3)
    assert [(r["key"], r["image"], r["caption"]) for r in _rows(out)] == samples
    assert main(["data", "ingest", "--webdataset", tars + "/{00000..00002}.tar", "--out", out]) == 2
    assert capsys.readouterr().err == f"reclip-ray: error: webdataset shard not found: {tars}/00002.tar\n"

    synth = storage.join(s3_prefix, "synth")
    made = _run(capsys, "data", "synth", "--out", synth, "--train", "6", "--eval", "4", "--shard-rows", "4")
    assert made["train"] == {"path": storage.join(synth, "train"), "rows": 6, "shards": 2}
    assert _names(synth) == ["eval/dataset.json", "eval/shard-00000.parquet", "train/dataset.json",
                             "train/shard-00000.parquet", "train/shard-00001.parquet"]
    from reclip_ray.data.synth import make_synthetic

    make_synthetic(tmp_path / "synth", train=6, eval=4, shard_rows=4)
    assert _rows(storage.join(synth, "eval")) == _rows(str(tmp_path / "synth" / "eval"))


@pytest.fixture(params=["local", "s3"])
def out_root(request, tmp_path) -> str:
    return str(tmp_path / "out") if request.param == "local" else request.getfixturevalue("s3_prefix")


@pytest.mark.parametrize("failure", ["unreadable image", "write fails mid-shard"])
def test_an_interrupted_ingest_leaves_only_whole_shards(tmp_path, monkeypatch, out_root, failure):
    """Ingest fails while making its second shard: the first shard is there, whole, and nothing else is; no
    dataset.json either (the set is not complete). The mid-write case is the one that matters on S3: pyarrow's
    writer closes its sink on an exception, footer and all, so writing straight to the bucket would leave a valid
    shard holding only the rows before the error."""
    from reclip_ray.data.ingest import ingest_folder

    folder, captions, images = _image_folder(tmp_path, 6)
    if failure == "unreadable image":
        read_bytes = storage.read_bytes

        def flaky(path: str, **kwargs) -> bytes:
            if path.endswith("/3.jpg"):
                raise PermissionError(13, "Permission denied", path)
            return read_bytes(path, **kwargs)

        monkeypatch.setattr(storage, "read_bytes", flaky)
        match = "captions.csv row 4: cannot read .*3.jpg"
    else:
        write_table = pq.write_table
        calls = []

        def dies_mid_write(table, where, **kwargs):
            calls.append(1)
            if len(calls) < 2:
                return write_table(table, where, **kwargs)
            with pq.ParquetWriter(where, table.schema) as writer:  # the first row written, then the error
                writer.write_table(table.slice(0, 1))
                raise OSError("connection reset")

        monkeypatch.setattr(pq, "write_table", dies_mid_write)
        match = "connection reset"
    with pytest.raises((ReclipError, OSError), match=match):
        ingest_folder(folder, captions, out_root, shard_rows=2)
    assert _names(out_root) == ["shard-00000.parquet"]
    assert [r["image"] for r in _rows(out_root)] == images[:2]


def test_the_ray_data_read_path_reads_s3_shards_as_local_ones(tmp_path, s3_prefix, s3_requests):
    """What a phase's Ray Data tasks run (footers, ``read_groups``, ``decode_batch`` with the tokenizer given as
    an s3:// path), on a dataset in the bucket and on its local copy: the same rows, pixels and tokens."""
    from reclip_ray.data.pipeline import decode_batch, read_groups
    from reclip_ray.data.schema import ColumnMap
    from reclip_ray.data.shards import clear_footer_cache, list_parquet_files, read_footers
    from reclip_ray.data.stream import PhaseStream
    from reclip_ray.data.synth import make_synthetic
    from reclip_ray.data.tokenizer import train_tokenizer

    local = str(tmp_path / "synth")
    make_synthetic(local, train=40, eval=0, shard_rows=10)
    remote = storage.join(s3_prefix, "synth")
    storage.upload_dir(local, remote)
    tok = storage.join(s3_prefix, "tokenizer.json")
    train_tokenizer(storage.join(remote, "train"), vocab_size=300, out=tok)

    def phase(root: str, tokenizer: str) -> list[dict]:
        clear_footer_cache()
        files = list_parquet_files(storage.join(root, "train"))
        items = PhaseStream(read_footers(files), seed=5, passes=1, group_shards=2, chunk_rows=4).items()
        out = []
        for item in items:
            for table in read_groups(pa.Table.from_pylist([item]), columns=ColumnMap(), chunk_rows=4, seed=5):
                batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
                decoded = decode_batch(batch, image_size=32, text_length=12, tokenizer_json=tokenizer, train=True,
                                       seed=5, keep_keys=True)
                out += [{"key": k, "pos": p, "pixels": x.tobytes(), "tokens": t.tolist()} for k, p, x, t in
                        zip(decoded["key"], decoded["_pos"], decoded["image"], decoded["tokens"])]
        return out

    s3_requests.clear()
    remote_rows = phase(remote, tok)
    requests = Counter(m for m, _ in s3_requests)
    local_rows = phase(local, _local_file(tok, tmp_path))
    assert len(remote_rows) == 40 and remote_rows == local_rows
    assert set(requests) <= {"GET", "HEAD"}  # reading never writes
    # What a read costs per shard: the footer once on the driver (``read_footers``), then in the read task the
    # footer again and one ranged GET per needed column chunk (image, caption, key); a HEAD before each open.
    for shard in list_parquet_files(storage.join(remote, "train")):
        path = shard[len("s3:/"):]
        assert sum(p == path and m == "GET" for m, p in s3_requests) <= 2 + 3, (shard, s3_requests)
        assert sum(p == path and m == "HEAD" for m, p in s3_requests) <= 2, (shard, s3_requests)


def _local_file(uri: str, tmp_path) -> str:
    path = str(tmp_path / storage.name(uri))
    with open(path, "wb") as f:
        f.write(storage.read_bytes(uri))
    return path


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tokenizer_path):
    """A tiny model (random weights, no training), exported locally: the reference for the S3 copies."""
    import torch

    from reclip_ray.config import load_config
    from reclip_ray.data.tokenizer import load_tokenizer
    from reclip_ray.export import export_model
    from reclip_ray.model import build_model

    cfg = load_config("tiny")
    tok = load_tokenizer(tokenizer_path)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=tok.vocab_size).eval()
    return model, tok, cfg, export_model(model, tok, cfg, tmp_path_factory.mktemp("exp") / "model")


def test_eval_export_and_init_from_read_models_on_s3(tmp_path, s3_prefix, synth_dir, tiny_export, capsys):
    """``eval --checkpoint s3://... --data s3://...`` gives the numbers of the local model on the local data;
    ``export`` reads and writes S3; ``model.init_from=s3://...`` loads the same tensors as the local folder."""
    import torch

    from reclip_ray.config import ConfigError
    from reclip_ray.export import export_model, load_model
    from reclip_ray.init_weights import check_init_from, read_state

    model, tok, cfg, local_model = tiny_export
    remote_model = storage.join(s3_prefix, "model")
    assert export_model(model, tok, cfg, remote_model) == remote_model
    assert _names(remote_model) == [".reclip-folder.json", "config.yaml", "model.safetensors", "tokenizer.json"]
    loaded, _ = load_model(remote_model)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))

    remote_eval = storage.join(s3_prefix, "eval")
    storage.upload_dir(str(synth_dir / "eval"), remote_eval)
    args = ["--batch-size", "100", "--image-size", "32"]
    remote = _run(capsys, "eval", "--checkpoint", remote_model, "--data", remote_eval, *args)
    local = _run(capsys, "eval", "--checkpoint", str(local_model), "--data", str(synth_dir / "eval"), *args)
    assert (remote["checkpoint"], remote["data"]) == (remote_model, remote_eval)
    assert remote["metrics"] == local["metrics"] and remote["metrics"]["rows"] == 200

    oc = storage.join(s3_prefix, "open_clip")
    summary = _run(capsys, "export", remote_model, "--out", oc, "--image-size", "32")
    assert summary["out"] == oc and "open_clip" not in summary  # `local-dir:` names a local folder only
    assert "open_clip_config.json" in _names(oc)
    with pytest.raises(CheckpointError, match="holds config.yaml, model.safetensors, which an export would delete"):
        export_model(model, tok, cfg, remote_model, format="open_clip")  # not over the model it came from
    assert _names(remote_model) == [".reclip-folder.json", "config.yaml", "model.safetensors", "tokenizer.json"]
    assert _run(capsys, "eval", "--checkpoint", oc, "--data", remote_eval, *args)["metrics"]["rows"] == 200

    assert check_init_from(remote_model) == remote_model
    remote_state, kind = read_state(remote_model)
    local_state, _ = read_state(str(local_model))
    assert kind == "reclip-ray" and remote_state.keys() == local_state.keys()
    assert all(torch.equal(remote_state[k], local_state[k]) for k in local_state)
    weights = storage.join(remote_model, "model.safetensors")  # a single remote file works too
    assert read_state(weights)[0].keys() == local_state.keys()
    with pytest.raises(ConfigError, match=r"^'model.init_from' not found: s3://\S+/nothing \(a reclip-ray"):
        check_init_from(storage.join(s3_prefix, "nothing"))
    assert main(["eval", "--checkpoint", storage.join(s3_prefix, "nothing"), "--data", remote_eval]) == 2
    assert capsys.readouterr().err == f"reclip-ray: error: checkpoint not found: {s3_prefix}/nothing\n"
