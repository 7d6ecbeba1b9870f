"""Evaluation sharded over ranks (``evaluate_dataset(rank=, world_size=)``) gives single-rank numbers.

Two processes with torch.distributed's gloo backend, started by torch.multiprocessing (no Ray): each evaluates its
slice of the rows, the features are gathered, the metrics are computed once. Every job below is evaluated once in
this process (one rank, the reference) and once by the two ranks; both ranks must return the reference's dict.
The stub model's features are table lookups, so those numbers must match exactly; the real tiny CLIP encodes its
slices in other batches than one rank would, so its numbers are compared to 1e-6.

Equal dicts alone would not show that the work was shared (every rank evaluating every row returns them too), so
every model records what it encodes; each rank must have encoded exactly the images and captions of its own
contiguous block of rows, read here straight from the Parquet files, and the ranks' class prompts together exactly
the prompts one rank encodes.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gloo_ranks import join, leave, spawn
from reclip_ray.data.schema import ColumnMap
from reclip_ray.errors import ReclipError
from reclip_ray.evaluation.dataset import evaluate_dataset
from test_eval_layouts import (COCO_META, StubTokenizer, coco_rows, img2dataset_rows, noisy_model, perfect_model,
                               swapped_model, write_set)

WORLD = 2


# ------------------------------------------------------------------------------------------------ the jobs


def _tokenizer(job: dict) -> object:
    if job["model"] == "tiny":
        from reclip_ray.data.tokenizer import load_tokenizer

        return load_tokenizer(job["tokenizer"])
    return StubTokenizer()


def _model(job: dict) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) of a job, built the same way in every process."""
    if job["model"] == "tiny":
        from reclip_ray.config import load_config
        from reclip_ray.model import build_model

        tok = _tokenizer(job)
        torch.manual_seed(0)
        model = build_model(load_config("tiny").model, tokenizer=tok)
        return model, tok
    models = {"noisy": noisy_model, "perfect": perfect_model, "swapped": swapped_model, "faulty": _faulty_model}
    return models[job["model"]](), StubTokenizer()


SLOW_TEXT_S = 0.5
FAULT = "injected fault: rank 1 cannot encode its captions"


def _faulty_model() -> torch.nn.Module:
    """The noisy stub, slow on rank 0 (``SLOW_TEXT_S`` per caption batch) and failing at rank 1's first one."""
    import torch.distributed as dist

    model = noisy_model()
    plain = model.encode_text

    def encode_text(tokens: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if dist.get_rank() == 1:
            raise ReclipError(FAULT)
        time.sleep(SLOW_TEXT_S)
        return plain(tokens, *args, **kwargs)

    model.encode_text = encode_text
    return model


def _record_encodes(model: torch.nn.Module, log: dict[str, list]) -> None:
    """Wrap the model's encoders to append what each call gets, in call order: every image (a digest of its pixels)
    to ``log["images"]``, every token row to ``log["texts"]``."""
    encode_image, encode_text = model.encode_image, model.encode_text

    def recorded_image(images: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        log["images"] += [hashlib.sha1(x.numpy().tobytes()).hexdigest()[:16] for x in images.detach().cpu()]
        return encode_image(images, *args, **kwargs)

    def recorded_text(tokens: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        log["texts"] += tokens.cpu().tolist()
        return encode_text(tokens, *args, **kwargs)

    model.encode_image, model.encode_text = recorded_image, recorded_text


def run_job(job: dict, rank: int = 0, world_size: int = 1, log: dict[str, list] | None = None) -> dict:
    """The job's metrics, or {"error": message} for an evaluation that raises a ReclipError. ``log``: filled with
    what the model encoded (``_record_encodes``)."""
    model, tok = _model(job)
    if log is not None:
        log.update(images=[], texts=[])
        _record_encodes(model, log)
    try:
        return evaluate_dataset(model, tok, job["path"], image_size=job.get("image_size", 32),
                                text_length=job.get("text_length", 8), batch_size=job.get("batch_size", 7),
                                columns=ColumnMap(**job.get("columns", {})), rank=rank, world_size=world_size)
    except ReclipError as exc:
        return {"error": str(exc)}


def _rank_main(rank: int, init_file: str, jobs_file: str, out_dir: str) -> None:
    """One rank: join the gloo group, run every job, write the results (and a direct check of gather_rows)."""
    from reclip_ray.evaluation.gather import gather_rows

    join(rank, WORLD, init_file, timeout_s=120)
    jobs = json.loads(Path(jobs_file).read_text())
    results, seconds, encoded = {}, {}, {}
    for name, job in jobs.items():
        start = time.monotonic()
        encoded[name] = {}
        results[name] = run_job(job, rank, WORLD, log=encoded[name])
        seconds[name] = time.monotonic() - start
    results["_seconds"], results["_encoded"] = seconds, encoded
    # uneven rows, and a rank without any: rank 0 sends 3 rows, rank 1 none
    mine = torch.arange(6, dtype=torch.float32).view(3, 2) if rank == 0 else None
    gathered = gather_rows(mine, WORLD, "cpu")
    results["_gather_rows"] = [t.tolist() for t in gathered]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    leave()


# ------------------------------------------------------------------------------------------------ data


def _odd(rows: list[dict]) -> list[dict]:
    assert len(rows) % 2 == 0
    return rows[:-1]


def _tiny_eval_set(synth_dir: Path, out: Path, n_rows: int = 101, shards: int = 3) -> str:
    """``n_rows`` rows of the synthetic eval set in ``shards`` files (row groups of 16), with its dataset.json."""
    table = pq.read_table(next((synth_dir / "eval").glob("*.parquet"))).slice(0, n_rows)
    out.mkdir(parents=True)
    per = -(-n_rows // shards)
    for s in range(shards):
        pq.write_table(table.slice(s * per, per), out / f"part-{s:05d}.parquet", row_group_size=16)
    (out / "dataset.json").write_text((synth_dir / "eval" / "dataset.json").read_text())
    return str(out)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, synth_dir, tokenizer_path) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("sharded")
    out: dict[str, dict] = {}
    # COCO layout, 8 images x 5 captions shuffled over 2 shards: an image's rows sit in both ranks' slices.
    coco = write_set(root / "coco_id", coco_rows(True), meta=COCO_META)
    out["coco_image_id_noisy"] = {"path": coco, "model": "noisy"}
    out["coco_image_id_swapped"] = {"path": coco, "model": "swapped"}
    out["coco_bytes_noisy"] = {"path": write_set(root / "coco_bytes", coco_rows(False), meta=COCO_META),
                               "model": "noisy"}
    # 39 rows: the slices are 19 and 20 rows
    out["coco_odd_rows"] = {"path": write_set(root / "coco_odd", _odd(coco_rows(True)), shards=3, meta=COCO_META),
                            "model": "noisy", "batch_size": 4}
    # img2dataset: absent rows (failed downloads) and a bad row are counted the same
    out["img2dataset"] = {"path": write_set(root / "i2d", img2dataset_rows(), shards=1), "model": "noisy",
                          "columns": {"image": "jpg", "caption": "txt"}}
    # one row: rank 0's slice is empty
    out["one_row"] = {"path": write_set(root / "one", coco_rows(True)[:1], shards=1, meta=COCO_META),
                      "model": "perfect"}
    # rows of one image (in different slices) disagree on the label: the same one-line error as one rank's
    rows = coco_rows(True)
    rows[3]["label"] = (rows[3]["label"] + 1) % 3
    out["labels_disagree"] = {"path": write_set(root / "disagree", rows, meta=COCO_META), "model": "noisy"}
    # a null label: the same error, naming the same file and key
    schema = pa.schema([("key", pa.string()), ("image", pa.binary()), ("caption", pa.string()),
                        ("label", pa.int32()), ("image_id", pa.int64())])
    rows = coco_rows(True)
    rows[-1]["label"] = None
    out["null_label"] = {"path": write_set(root / "null", rows, shards=1, meta=COCO_META, schema=schema),
                         "model": "noisy"}
    # class names where class indices belong: the same one-line error as one rank's, naming the same row
    rows = [{**r, "label": ["class0", "class1", "class2"][r["label"]]} for r in coco_rows(True)]
    out["class_name_labels"] = {"path": write_set(root / "names", rows, meta=COCO_META), "model": "noisy"}
    # rank 1 fails at its first caption batch while rank 0 has 20 slow ones (batch 1): 10 s before its next collective
    out["fault_on_rank1"] = {"path": coco, "model": "faulty", "batch_size": 1}
    # the real tiny CLIP on 101 rows of the synthetic eval set (3 label sets, captions), 3 shards
    out["tiny_clip_101_rows"] = {"path": _tiny_eval_set(synth_dir, root / "synth101"), "model": "tiny",
                                 "tokenizer": str(tokenizer_path), "image_size": 32, "text_length": 16,
                                 "batch_size": 16}
    return out


@pytest.fixture(scope="module")
def sharded_results(jobs) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="reclip-sharded-") as tmp:
        jobs_file = Path(tmp, "jobs.json")
        jobs_file.write_text(json.dumps(jobs))
        spawn(_rank_main, WORLD, str(Path(tmp, "init")), str(jobs_file), tmp)  # each rank on one thread (join)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(WORLD)]


# ------------------------------------------------------------------------------------------------ tests


EXACT = ["coco_image_id_noisy", "coco_image_id_swapped", "coco_bytes_noisy", "coco_odd_rows", "img2dataset",
         "one_row", "labels_disagree", "null_label", "class_name_labels"]


@pytest.mark.parametrize("name", EXACT)
def test_two_ranks_equal_one_rank_exactly(name, jobs, sharded_results):
    reference = run_job(jobs[name])
    for rank, results in enumerate(sharded_results):
        assert results[name] == reference, (name, rank)


def _blocks(job: dict) -> list[pa.Table]:
    """Each rank's rows as ``evaluate_dataset`` promises them: one contiguous block of the rows in file order,
    block sizes within one of each other. Read here with plain pyarrow, not the evaluator's reader."""
    table = pa.concat_tables([pq.read_table(f) for f in sorted(Path(job["path"]).glob("*.parquet"))])
    n = table.num_rows
    return [table.slice(n * r // WORLD, n * (r + 1) // WORLD - n * r // WORLD) for r in range(WORLD)]


def assert_each_rank_encoded_its_block(name: str, job: dict, reference: dict[str, list],
                                       sharded_results: list[dict]) -> None:
    """Rank r encoded exactly the captions of its block (in row order) and one image per distinct image of its
    block; the ranks' class prompts, in rank order, are the prompts one rank encodes (each prompt batch encoded by
    one rank). ``reference``: what one rank encoded. Rows here all have an image and a caption."""
    columns = ColumnMap(**job.get("columns", {}))
    tok = _tokenizer(job)
    captions, prompts = [], []
    for rank, (block, results) in enumerate(zip(_blocks(job), sharded_results)):
        got = results["_encoded"][name]
        want = tok.encode(block.column(columns.caption).to_pylist(), job.get("text_length", 8)).tolist()
        assert got["texts"][:len(want)] == want, f"{name}: rank {rank} did not encode the captions of its block"
        ids = block.column("image_id" if "image_id" in block.column_names else columns.image).to_pylist()
        assert len(got["images"]) == len(set(ids)), f"{name}: rank {rank} encoded {len(got['images'])} images, " \
                                                    f"its block shows {len(set(ids))}"
        captions += got["texts"][:len(want)]
        prompts.append(got["texts"][len(want):])
    assert captions == reference["texts"][:len(captions)], name  # one rank's captions, each encoded once
    one_rank = Counter(map(tuple, reference["texts"][len(captions):]))
    for rank, mine in enumerate(prompts):  # after its captions a rank encodes class prompts, nothing else
        assert Counter(map(tuple, mine)) <= one_rank, f"{name}: rank {rank} encoded more than its captions"
    # and its class prompts, each once (each label set's prompt batches are split in blocks: compared as multisets)
    assert sorted(sum(prompts, [])) == sorted(reference["texts"][len(captions):]), name
    if len(reference["texts"]) - len(captions) > job.get("batch_size", 7):  # more than one prompt batch: shared
        assert all(p for p in prompts), (name, [len(p) for p in prompts])
    assert {d for results in sharded_results for d in results["_encoded"][name]["images"]} == set(reference["images"])


SHARED = ["coco_image_id_noisy", "coco_image_id_swapped", "coco_bytes_noisy", "coco_odd_rows", "one_row"]


@pytest.mark.parametrize("name", SHARED)
def test_each_rank_encodes_only_its_block(name, jobs, sharded_results):
    reference: dict[str, list] = {}
    assert "error" not in run_job(jobs[name], log=reference)
    assert_each_rank_encoded_its_block(name, jobs[name], reference, sharded_results)


def test_rows_without_an_image_are_not_encoded_on_any_rank(jobs, sharded_results):
    """img2dataset (absent and bad rows): together the ranks encoded what one rank encodes, nothing twice."""
    reference: dict[str, list] = {}
    run_job(jobs["img2dataset"], log=reference)
    got = [results["_encoded"]["img2dataset"] for results in sharded_results]
    assert sorted(sum((g["texts"] for g in got), [])) == sorted(reference["texts"])
    assert sorted(sum((g["images"] for g in got), [])) == sorted(reference["images"])
    assert all(g["images"] for g in got)


def test_the_jobs_cover_what_they_claim(jobs):
    """The reference numbers are not trivial and the layouts are what the test names say (teeth for the above)."""
    m = run_job(jobs["coco_image_id_noisy"])
    assert (m["rows"], m["images"], m["captions"]) == (40, 8, 40)
    assert 0 < m["text_to_image_r@1"] < 1 and 0 < m["image_to_text_r@1"] < 1
    assert run_job(jobs["coco_odd_rows"])["rows"] == 39
    i2d = run_job(jobs["img2dataset"])
    assert i2d["absent_rows"] == 2 and i2d["bad_rows"] == 1
    assert run_job(jobs["one_row"])["images"] == 1
    assert "disagree on 'label'" in run_job(jobs["labels_disagree"])["error"]
    assert "null label" in run_job(jobs["null_label"])["error"]
    assert "is not a class index" in run_job(jobs["class_name_labels"])["error"]


def test_tiny_clip_two_ranks_match_one_rank(jobs, sharded_results):
    encoded: dict[str, list] = {}
    reference = run_job(jobs["tiny_clip_101_rows"], log=encoded)
    assert_each_rank_encoded_its_block("tiny_clip_101_rows", jobs["tiny_clip_101_rows"], encoded, sharded_results)
    assert reference["rows"] == 101 and {"colour/top1", "shape/top1", "image_to_text_r@1"} <= set(reference)
    for results in sharded_results:
        got = results["tiny_clip_101_rows"]
        assert set(got) == set(reference)
        for key, value in reference.items():
            assert got[key] == pytest.approx(value, abs=1e-6), key


def test_an_error_on_one_rank_is_raised_on_every_rank_at_once(sharded_results):
    """The ranks agree after every batch, so rank 0 stops after its first slow batch instead of finishing its slice
    (20 x 0.5 s) and only then finding out; with a slice longer than the collective timeout, rank 1 would have
    died waiting."""
    errors = [results["fault_on_rank1"].get("error") for results in sharded_results]
    assert errors == [f"evaluation failed on rank 1: ReclipError: {FAULT}", FAULT]
    seconds = [results["_seconds"]["fault_on_rank1"] for results in sharded_results]
    print("\n[eval-sharded] fault on rank 1: ranks raised after", [round(x, 2) for x in seconds], "s")
    assert max(seconds) < 4, seconds


def test_gather_rows_uneven_and_empty(sharded_results):
    for results in sharded_results:
        assert results["_gather_rows"] == [[[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], []]


def test_row_range_reads_only_its_rows(tmp_path):
    """The slices of ``iter_local_batches(row_range=)`` partition the rows, keys and bad-row positions unchanged."""
    from reclip_ray.data.local import BadRowCount, iter_local_batches

    rows = [dict(r) for r in img2dataset_rows() * 3]
    for i, r in enumerate(rows):
        r["key"] = f"{i:03d}"
    path = write_set(tmp_path / "d", rows, shards=2)
    files = sorted(Path(path).glob("*.parquet"))
    for f in files:  # small row groups, so a slice starts inside one
        pq.write_table(pq.read_table(f), f, row_group_size=5)
    kw = dict(image_size=32, text_length=8, tokenizer=StubTokenizer(), batch_size=4,
              columns=ColumnMap(image="jpg", caption="txt"), require_caption=False)
    whole = BadRowCount()
    keys = [k for b in iter_local_batches(path, bad_rows=whole, **kw) for k in b["key"]]
    n = len(rows)
    parts, counts = [], []
    for lo, hi in ((0, 7), (7, 7), (7, 13), (13, n)):
        c = BadRowCount()
        parts += [k for b in iter_local_batches(path, bad_rows=c, row_range=(lo, hi), **kw) for k in b["key"]]
        counts.append(c)
    assert parts == keys
    assert sum(c.absent for c in counts) == whole.absent and sum(c.bad for c in counts) == whole.bad > 0
    assert sorted(e["row"] for c in counts for e in c.examples) == sorted(e["row"] for e in whole.examples)
    assert sum(c.seen for c in counts) == whole.seen
