"""benchmarks/emoji_data.py on a tiny fixture in the npm packages' own layouts (no network): tarball integrity and
extraction, the splits training must never see, captions, label sets the evaluator accepts, and image sizes and
backgrounds."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reclip_ray.data.schema import read_dataset_json
from reclip_ray.data.shards import list_parquet_files
from reclip_ray.errors import DataError
from reclip_ray.evaluation.eval_set import check_eval_set

pytest.importorskip("cairosvg")  # in the dev extra: this skip is only for a checkout without it

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "emoji_data.py"
FULL = 96  # not the default 128, so a hard-coded size would show

# (unified, name, short names, category, subcategory, CLDR annotation, CLDR tags); every name is a distinct word
# sequence, none a substring of another, so a leak shows as the name itself in a caption.
EMOJI = [
    ("1F600", "GRINNING FACE", ["grinning"], "Smileys & Emotion", "face-smiling", "grinning face", "grin, happy"),
    ("1F62D", "LOUDLY CRYING FACE", ["sob"], "Smileys & Emotion", "face-concerned", "loudly crying face", "sob, tear"),
    ("1F44B", "WAVING HAND SIGN", ["wave"], "People & Body", "hand-fingers-open", "waving hand", "bye, hello"),
    ("1F468-200D-1F4BB", "MAN TECHNOLOGIST", ["male-technologist"], "People & Body", "person-role",
     "man technologist", "coder, developer"),
    ("1F34E", "RED APPLE", ["apple"], "Food & Drink", "food-fruit", "red apple", "fruit, ripe"),
    ("1F955", "CARROT", ["carrot"], "Food & Drink", "food-vegetable", "carrot", "vegetable"),
    ("1F35E", "BREAD", ["bread"], "Food & Drink", "food-prepared", "bread", "loaf"),
    ("2764-FE0F", "HEAVY BLACK HEART", ["heart"], "Smileys & Emotion", "heart", "red heart", "love"),
    ("0023-FE0F-20E3", "HASH KEY", ["hash"], "Symbols", "keycap", "keycap: #", "keycap"),
    ("1F40C", "SNAIL", ["snail"], "Animals & Nature", "animal-bug", "snail", "slow"),
    ("1F3FB", "EMOJI MODIFIER FITZPATRICK TYPE-1-2", ["skin-tone-2"], "Component", "skin-tone", "", ""),
]
PNG_VENDORS = ("apple", "google", "facebook")
MISSING = {("facebook", "1F955")}  # emoji-datasource-facebook has no image of this one
COLOURS = {"apple": (220, 30, 30), "google": (30, 160, 40), "facebook": (40, 60, 220), "twitter": (90, 90, 90)}


def _short_hex(unified: str) -> str:
    """twemoji's file names: lower case, no FE0F, no leading zeros ("0023-FE0F-20E3" -> "23-20e3")."""
    return "-".join(format(int(p, 16), "x") for p in unified.split("-") if p != "FE0F")


@pytest.fixture
def emoji_data(monkeypatch):
    spec = importlib.util.spec_from_file_location("emoji_data_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up while being defined
    spec.loader.exec_module(mod)
    return mod


def _png(colour: tuple[int, int, int], radius: int = 20) -> bytes:
    """64 px RGBA: an opaque disc of ``colour``, a half-transparent black band at rows 0-3, fully transparent
    *black* elsewhere (what a naive RGB conversion would show as black)."""
    a = np.zeros((64, 64, 4), dtype=np.uint8)
    y, x = np.mgrid[0:64, 0:64]
    disc = (x - 32) ** 2 + (y - 32) ** 2 < radius**2
    a[disc] = (*colour, 255)
    a[:4, :, 3] = 128
    buf = io.BytesIO()
    Image.fromarray(a, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def _svg(fill: str, view: int, share: float = 0.3) -> str:
    """A square viewBox with a centred disc (radius ``share`` of the side); the corners are transparent."""
    c = view / 2
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {view} {view}">'
            f'<circle cx="{c}" cy="{c}" r="{view * share}" fill="{fill}"/></svg>')


def _radius(index: int) -> int:
    """Each emoji's disc has its own radius, so no two images of a style are the same bytes."""
    return 12 + index


def _datasource_entry(unified, name, short, category, sub, *_):
    entry = {"name": name, "unified": unified, "non_qualified": None, "image": unified.lower() + ".png",
             "short_name": short[0], "short_names": short, "category": category, "subcategory": sub,
             "sort_order": 0, "added_in": "1.0",
             **{f"has_img_{v}": True for v in ("apple", "google", "twitter", "facebook")}}
    if unified == "1F44B":  # skin tones live inside the base entry; their PNGs exist but must never be used
        entry["skin_variations"] = {"1F3FB": {"unified": "1F44B-1F3FB", "image": "1f44b-1f3fb.png"}}
    return entry


@pytest.fixture
def packages(tmp_path, emoji_data):
    """Extracted packages under tmp_path/packages, laid out as the real tarballs are."""
    root = tmp_path / "packages"
    entries = [_datasource_entry(*e) for e in EMOJI]
    for order, entry in enumerate(entries):
        entry["sort_order"] = order
    for vendor in PNG_VENDORS + ("twitter",):  # emoji-datasource-twitter: only read with --twitter png
        folder = root / emoji_data.PACKAGES[vendor].folder
        (folder / "img" / vendor / "64").mkdir(parents=True)
        (folder / "emoji.json").write_text(json.dumps(entries[::-1]))  # not in Unicode order on disk
        for i, e in enumerate(entries):
            if (vendor, e["unified"]) in MISSING:
                continue
            (folder / "img" / vendor / "64" / e["image"]).write_bytes(_png(COLOURS[vendor], _radius(i)))
        (folder / "img" / vendor / "64" / "1f44b-1f3fb.png").write_bytes(_png((0, 0, 0)))
    twemoji = root / emoji_data.PACKAGES["twemoji"].folder
    twemoji.mkdir()
    for i, (unified, *_) in enumerate(EMOJI):
        (twemoji / f"{_short_hex(unified)}.svg").write_text(_svg("#ffcc00", 36, _radius(i) / 64))
    om = root / emoji_data.PACKAGES["openmoji"].folder
    (om / "color" / "svg").mkdir(parents=True)
    (om / "data").mkdir()
    records = []
    for i, (unified, name, short, category, sub, annotation, tags) in enumerate(EMOJI):
        group = category.lower().replace(" & ", "-")
        records.append({"emoji": "", "hexcode": unified, "group": group, "subgroups": sub, "annotation": annotation,
                        "tags": tags, "openmoji_tags": "openmoji only words", "skintone": "",
                        "skintone_combination": "", "skintone_base_emoji": "", "skintone_base_hexcode": ""})
        (om / "color" / "svg" / f"{unified}.svg").write_text(_svg("#00aaff", 72, _radius(i) / 64))
    records.append({**records[2], "hexcode": "1F44B-1F3FB", "annotation": "waving hand: light skin tone",
                    "skintone": "1", "skintone_base_hexcode": "1F44B"})
    records.append({**records[0], "hexcode": "E000", "group": "extras-openmoji", "annotation": "openmoji extra"})
    for extra in ("1F44B-1F3FB", "E000"):
        (om / "color" / "svg" / f"{extra}.svg").write_text(_svg("#000000", 72))
    (om / "data" / "openmoji.json").write_text(json.dumps(records))
    return root


def _rows(path: Path) -> list[dict]:
    return [r for f in list_parquet_files(str(path)) for r in pq.read_table(f).to_pylist()]


def _pixels(row: dict) -> np.ndarray:
    img = Image.open(io.BytesIO(row["image"]))
    assert img.mode == "RGB"  # flattened: no alpha left for the pipeline to interpret
    return np.asarray(img)


def test_build_splits_captions_labels_and_images(tmp_path, packages, emoji_data):
    out = tmp_path / "emoji"
    assert emoji_data.main(["--out", str(out), "--packages-dir", str(packages), "--full-size", str(FULL),
                            "--workers", "1", "--shard-rows", "7", "--shrink", "32"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["eval_both", "eval_emoji", "eval_style", "train"]
    rows = {split: _rows(out / split) for split in emoji_data.SPLITS}
    by_key = {e[0]: e for e in EMOJI}
    unified_of = {_short_hex(u): u for u in by_key}  # row keys are STYLE/short hex

    def parse(row):
        style, key = row["key"].split("/")
        return style, unified_of[key]

    # The held-out names: exactly round(15 % of 10) = 2 (Component dropped), the same in every style.
    heldout = {parse(r)[1] for r in rows["eval_emoji"]}
    assert len(heldout) == 2
    assert {parse(r)[1] for r in rows["eval_both"]} == heldout
    seen = set(by_key) - heldout - {"1F3FB"}
    train = [parse(r) for r in rows["train"]]
    assert {u for _, u in train} == seen
    assert {s for s, _ in train} == {"apple", "google", "facebook", "twitter"}  # never openmoji
    assert {parse(r) for r in rows["eval_style"]} == {("openmoji", u) for u in seen}
    expected_train = {(s, u) for s in ("apple", "google", "facebook", "twitter") for u in seen} - MISSING
    assert sorted(train) == sorted(expected_train)  # one row per (style, emoji), none lost, none twice
    expected_emoji = {(s, u) for s in ("apple", "google", "facebook", "twitter") for u in heldout} - MISSING
    assert sorted(parse(r) for r in rows["eval_emoji"]) == sorted(expected_emoji)
    # No held-out name, CLDR name, OpenMoji-only tag, skin tone or Component reaches a training caption.
    train_text = " | ".join(r["caption"] for r in rows["train"])
    for u in heldout:
        assert by_key[u][1].lower() not in train_text and by_key[u][5] not in train_text
    assert "openmoji only" not in train_text and "skin" not in train_text and "fitzpatrick" not in train_text

    # Captions name their emoji (Unicode or CLDR name, ASCII-lowercased) and vary in form.
    for split in emoji_data.SPLITS:
        for r in rows[split]:
            _, u = parse(r)
            assert by_key[u][1].lower() in r["caption"] or by_key[u][5] in r["caption"], r
    assert len({r["caption"].replace(by_key[parse(r)[1]][1].lower(), "X").replace(by_key[parse(r)[1]][5], "X")
                for r in rows["train"]}) > 10

    # Label sets: the evaluator's own check passes, and each label is the emoji's category / subcategory.
    for split in ("eval_style", "eval_emoji", "eval_both", "train"):
        info = check_eval_set(str(out / split), None, [FULL], 8)
        assert info["has_captions"] and info["label_sets"] == {"category": 5, "subcategory": 10}
        meta = read_dataset_json(str(out / split))
        cats = meta["label_sets"]["category"]["classes"]
        subs = meta["label_sets"]["subcategory"]["classes"]
        assert cats == meta["classes"] == ["smileys and emotion", "people and body", "food and drink", "symbols",
                                           "animals and nature"]  # Unicode order, Component left out
        for r in rows[split]:
            _, _, _, category, sub, *_ = by_key[parse(r)[1]]
            assert cats[r["label"]] == category.lower().replace("&", "and")
            assert subs[r["label_subcategory"]] == sub.replace("-", " ")
        assert meta["rows"] == len(rows[split]) and sum(meta["rows_per_style"].values()) == len(rows[split])

    # Images: 64 px PNG styles stay 64 px, SVG styles are rendered at --full-size; alpha 0 became white, the
    # half-transparent band is half way to white, the art keeps its colour.
    for split in emoji_data.SPLITS:
        for r in rows[split]:
            style, u = parse(r)
            px = _pixels(r)
            size = 64 if style in PNG_VENDORS else FULL
            assert (r["width"], r["height"]) == (size, size) and px.shape == (size, size, 3)
            assert px[size - 1, 0].tolist() == [255, 255, 255]  # a corner: transparent in the source
            centre = px[size // 2, size // 2].tolist()
            if style in PNG_VENDORS:
                assert centre == list(COLOURS[style])
                assert abs(int(px[1, 0, 0]) - 127) <= 1  # black at alpha 128 over white
            else:
                assert centre == ([255, 204, 0] if style == "twitter" else [0, 170, 255])
    # --shrink wrote the train split's copies through `data shrink`.
    assert "image_32" in pq.read_schema(list_parquet_files(str(out / "train"))[0]).names
    assert not list((out).glob(".*"))  # no staging or temporary split left behind


def test_duplicate_images_are_dropped_so_every_split_evaluates(tmp_path, packages, emoji_data):
    """Vendors draw some emoji alike (Apple's families). One image under two subcategories is an error in the
    evaluator, and an eval image that training saw is not unseen: the later row of a split is dropped, and an eval
    row whose image is in train, and the counts are in the summary and dataset.json."""
    from reclip_ray.config import load_config
    from reclip_ray.data.tokenizer import train_tokenizer
    from reclip_ray.evaluation.dataset import evaluate_dataset
    from reclip_ray.model import build_model

    folders = emoji_data.packages_in(packages, emoji_data.needed())
    emoji = emoji_data.load_emoji(folders["apple"], folders["openmoji"])
    held, seen = [e for e in emoji if e.heldout], [e for e in emoji if not e.heldout]
    a = seen[0]
    b = next(e for e in seen if e.subcategory != a.subcategory)  # after a in Unicode order

    def png(vendor, e):
        return folders[vendor] / "img" / vendor / "64" / e.image

    png("apple", b).write_bytes(png("apple", a).read_bytes())  # train: one picture, two subcategories
    png("google", held[0]).write_bytes(png("google", a).read_bytes())  # eval_emoji: a picture training saw
    svgs = emoji_data.svg_files(folders["openmoji"], "color/svg")
    om = folders["openmoji"]
    (om / svgs[b.key]).write_text((om / svgs[a.key]).read_text())  # eval_style: one picture, two subcategories
    out = tmp_path / "emoji"
    summary = emoji_data.build(folders, out, full_size=FULL, log=lambda m: None)
    expected = {"train": (1, 0), "eval_style": (1, 0), "eval_emoji": (0, 1), "eval_both": (0, 0)}
    assert {s: (c["same_image_in_split"], c["same_image_as_train"]) for s, c in summary["duplicates"].items()} \
        == expected
    keys = {s: {r["key"] for r in _rows(out / s)} for s in emoji_data.SPLITS}
    assert f"apple/{a.key}" in keys["train"] and f"apple/{b.key}" not in keys["train"]
    assert f"google/{b.key}" in keys["train"]  # only the vendor that draws them alike loses a row
    assert f"google/{held[0].key}" not in keys["eval_emoji"] and f"apple/{held[0].key}" in keys["eval_emoji"]
    assert f"openmoji/{a.key}" in keys["eval_style"] and f"openmoji/{b.key}" not in keys["eval_style"]
    meta = read_dataset_json(str(out / "eval_style"))
    assert meta["duplicates_dropped"] == summary["duplicates"] and meta["rows"] == len(keys["eval_style"])
    tokenizer = train_tokenizer(str(out / "train"), 300)
    model = build_model(load_config("tiny").model, tokenizer=tokenizer)
    for split in emoji_data.SPLITS:
        metrics = evaluate_dataset(model, tokenizer, str(out / split), image_size=64, text_length=32)
        assert metrics["rows"] == metrics["images"] == len(keys[split]), split
        assert 0.0 <= metrics["subcategory/top1"] <= 1.0


def test_twitter_png_option_reads_emoji_datasource_twitter(tmp_path, packages, emoji_data):
    """--twitter png: Twitter's 64 px PNGs instead of the SVGs, so every training style is 64 px (the ablation)."""
    out = tmp_path / "emoji"
    assert emoji_data.main(["--out", str(out), "--packages-dir", str(packages), "--workers", "1",
                            "--twitter", "png"]) == 0
    twitter = [r for r in _rows(out / "train") if r["key"].startswith("twitter/")]
    assert twitter and all((r["width"], r["height"]) == (64, 64) for r in twitter)
    assert _pixels(twitter[0])[32, 32].tolist() == list(COLOURS["twitter"])
    assert read_dataset_json(str(out / "train"))["styles"]["twitter"] == {
        "package": "emoji-datasource-twitter", "kind": "png", "size": 64}


def test_heldout_choice_is_seeded_and_stable(emoji_data):
    names = [f"emoji number {i}" for i in range(200)]
    a = emoji_data.heldout_names(names, 0, 0.15)
    assert len(a) == 30 and a == emoji_data.heldout_names(list(reversed(names)) + names[:5], 0, 0.15)
    assert emoji_data.heldout_names(names, 1, 0.15) != a
    # a name that is not held out can come or go without changing which names are
    outside = next(n for n in names if n not in a)
    assert emoji_data.heldout_names([n for n in names if n != outside], 0, 0.15) == a


def test_canonical_code_points(emoji_data):
    assert emoji_data.canonical("0023-FE0F-20E3") == "23-20e3" == emoji_data.canonical("23-20e3")
    assert emoji_data.canonical("2764-FE0F") == emoji_data.canonical("2764")
    with pytest.raises(DataError, match="not a code point sequence"):
        emoji_data.canonical("1F600.png")


def _tgz(path: Path, files: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def test_fetch_verifies_integrity_and_extracts_only_what_it_needs(tmp_path, emoji_data, monkeypatch):
    """A registry served from a folder (file:// URL): the good tarball is verified and its kept files extracted;
    a tarball whose hash differs from the pinned one is a one-line error and leaves nothing in the cache."""
    registry = tmp_path / "registry"
    (registry / "emoji-datasource-apple" / "-").mkdir(parents=True)
    tgz = registry / "emoji-datasource-apple" / "-" / "emoji-datasource-apple-16.0.0.tgz"
    files = {"package/emoji.json": b"[]", "package/img/apple/64/1f600.png": _png((1, 2, 3)),
             "package/img/apple/32/1f600.png": b"x", "package/img/apple/sheets/64.png": b"big sheet"}
    integrity = _tgz(tgz, files)
    monkeypatch.setattr(emoji_data, "REGISTRY", registry.as_uri())
    pkg = emoji_data.Package("emoji-datasource-apple", "16.0.0", integrity, ("emoji.json", "img/apple/64/"))
    monkeypatch.setitem(emoji_data.PACKAGES, "apple", pkg)
    cache = tmp_path / "cache"
    folder = emoji_data.fetch(["apple"], cache, log=lambda m: None)["apple"]
    kept = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert kept == [".complete", "emoji.json", "img/apple/64/1f600.png"]
    assert (folder / "img/apple/64/1f600.png").read_bytes() == files["package/img/apple/64/1f600.png"]
    assert emoji_data.fetch(["apple"], cache, log=lambda m: None)["apple"] == folder  # cached: no second download

    bad = emoji_data.Package("emoji-datasource-apple", "16.0.0", "sha512-" + "A" * 86 + "==", pkg.keep)
    monkeypatch.setitem(emoji_data.PACKAGES, "apple", bad)
    with pytest.raises(DataError, match=r"/emoji-datasource-apple-16\.0\.0\.tgz: integrity mismatch: "
                                        r"expected sha512-AAAA") as err:
        emoji_data.fetch(["apple"], tmp_path / "cache2", log=lambda m: None)
    assert "\n" not in str(err.value)
    assert not [p for p in (tmp_path / "cache2").rglob("*") if p.is_file()]
    # the cached tarball is re-verified on every use: a tampered cache is caught too
    with pytest.raises(DataError, match="integrity mismatch"):
        emoji_data.fetch(["apple"], cache, log=lambda m: None)


def test_missing_package_and_bad_metadata_are_one_line_errors(tmp_path, packages, emoji_data, capsys):
    assert emoji_data.main(["--out", str(tmp_path / "o"), "--packages-dir", str(tmp_path / "nowhere")]) == 1
    assert "no emoji-datasource-apple-16.0.0" in capsys.readouterr().err
    meta = packages / emoji_data.PACKAGES["apple"].folder / "emoji.json"
    entries = json.loads(meta.read_text())
    del entries[4]["category"]
    meta.write_text(json.dumps(entries))
    assert emoji_data.main(["--out", str(tmp_path / "o"), "--packages-dir", str(packages), "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "emoji.json: entry 4" in err and "'category'" in err and "\n" not in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_failed_rebuild_keeps_every_old_split(tmp_path, packages, emoji_data, monkeypatch):
    """A rebuild with another seed that fails after writing one split must leave all the old splits (a new train
    next to old eval splits would put held-out emoji in training) and no temporary folders."""
    out = tmp_path / "emoji"
    args = ["--out", str(out), "--packages-dir", str(packages), "--workers", "1"]
    assert emoji_data.main(args) == 0
    before = {s: sorted(r["key"] for r in _rows(out / s)) for s in emoji_data.SPLITS}
    import reclip_ray.data.ingest as ingest

    real, calls = ingest.ingest_folder, []

    def fail_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise DataError("disk full (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(ingest, "ingest_folder", fail_second)
    assert emoji_data.main(args + ["--seed", "1"]) == 1
    assert {s: sorted(r["key"] for r in _rows(out / s)) for s in emoji_data.SPLITS} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(emoji_data.SPLITS)
    monkeypatch.setattr(ingest, "ingest_folder", real)
    assert emoji_data.main(args + ["--seed", "1"]) == 0
    assert sorted(r["key"] for r in _rows(out / "eval_emoji")) != before["eval_emoji"]


@pytest.mark.slow
def test_experiment_trains_an_arm_on_the_fixture_and_reports_every_split(ray_session, tmp_path, packages,
                                                                         emoji_data, monkeypatch):
    """Issue 23, item 3: the builder's output through benchmarks/reclip_vs_baseline.py. One short arm trains on
    Ray (the full-resolution baseline: one phase, one Ray Data pipeline, so the test stays short; the RECLIP arms'
    schedules are the fast tests'); the row has every metric of both eval splits at full resolution. The first
    split's numbers are the trainer's last evaluation and the second's the exported model's (evaluated in the
    driver, logged to the same MLflow run): each must be what evaluating that split from the export gives, so both
    paths score the same model, at the same size, on the split they are named after."""
    from mlflow.tracking import MlflowClient

    from conftest import fresh_mlflow_db
    from reclip_ray.evaluation.checkpoint import evaluate_checkpoint

    data = tmp_path / "emoji"
    assert emoji_data.main(["--out", str(data), "--packages-dir", str(packages), "--full-size", "64",
                            "--workers", "1", "--shrink", "40"]) == 0
    spec = importlib.util.spec_from_file_location("reclip_vs_baseline_for_emoji", SCRIPT.parent /
                                                  "reclip_vs_baseline.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    db = fresh_mlflow_db(tmp_path / "mlflow.db")
    splits = ["eval_style", "eval_emoji"]
    assert bench.main([
        "--data", str(data), "--eval-splits", ",".join(splits), "--arms", "baseline", "--samples", "64",
        "--batch", "16", "--low", "32", "--full", "64",
        "--workers", "1", "--use-gpu", "false", "--vocab-size", "300", "--out", str(tmp_path / "out"),
        "--tracking-uri", f"sqlite:///{db}", "--name", "emoji", "--set", "model.vision.depth=2",
        "--set", "model.text.depth=2", "--set", "scaling.cpus_per_worker=0.5", "--set", "data.shuffle_buffer=64",
        "--set", "data.block_mb=0",
    ]) == 0
    saved = json.loads((tmp_path / "results" / "emoji.json").read_text())
    assert saved["eval_splits"] == splits and saved["label_sets"] == ["category", "subcategory"]
    (row,) = saved["rows"]
    assert (row["arm"], row["samples"]) == ("baseline", 64)
    names = bench.metric_names(saved["label_sets"])
    for split in splits:
        assert saved["chance"][f"{split}/category/top1"] == pytest.approx(1 / 5)
        for m in names:
            assert 0.0 <= row[f"{split}/{m}"] <= 1.0, (split, m)  # measured, not NaN
    for split in splits:  # each split's own rows, scored by the model the run exported, at full resolution
        again = evaluate_checkpoint(f"{row['run_dir']}/model", str(data / split), image_size=64)["metrics"]
        assert {m: row[f"{split}/{m}"] for m in names} == pytest.approx({m: again[m] for m in names}, abs=1e-6)
        assert row[f"{split}/rows"] == read_dataset_json(str(data / split))["rows"]
        assert 0.0 <= row[f"{split}/subcategory/mean_per_class_recall"] <= 1.0
    logged = MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(row["mlflow_run_id"]).data.metrics
    assert logged["eval_emoji/64px/subcategory/top1"] == pytest.approx(row["eval_emoji/subcategory/top1"])
    assert logged["eval_emoji/64px/text_to_image_r_5"] == pytest.approx(row["eval_emoji/text_to_image_r@5"])
    assert logged["eval/64px/category/top1"] == pytest.approx(row["eval_style/category/top1"])
    assert (tmp_path / "results" / "emoji.png").is_file() and (tmp_path / "results" / "emoji.csv").is_file()
