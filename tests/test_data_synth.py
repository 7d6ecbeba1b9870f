"""Synthetic captioned shapes, inspect, local batches, bad-fraction checks and the data CLI."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from reclip_ray.cli import main as cli_main
from reclip_ray.data import synth
from reclip_ray.data.inspect import inspect_dataset
from reclip_ray.data.local import BadRowCount, check_bad_fraction, iter_local_batches
from reclip_ray.data.schema import read_dataset_json
from reclip_ray.data.shards import list_parquet_files
from reclip_ray.data.tokenizer import load_tokenizer
from reclip_ray.errors import DataError


def test_synth_is_deterministic_per_seed(tmp_path):
    a = synth.make_synthetic(tmp_path / "a", train=30, eval=10, seed=3, shard_rows=16)
    synth.make_synthetic(tmp_path / "b", train=30, eval=10, seed=3, shard_rows=16)
    synth.make_synthetic(tmp_path / "c", train=30, eval=10, seed=4, shard_rows=16)
    assert a["train"]["shards"] == 2 and a["eval"]["rows"] == 10

    def table(root, split):
        return pa.concat_tables(pq.read_table(f) for f in list_parquet_files(str(root / split)))

    for split in ("train", "eval"):
        assert table(tmp_path / "a", split).equals(table(tmp_path / "b", split))
    assert table(tmp_path / "a", "train").column("image") != table(tmp_path / "c", "train").column("image")
    # train and eval are different streams: no eval image repeats a train image
    assert not set(table(tmp_path / "a", "eval").column("image").to_pylist()) & set(
        table(tmp_path / "a", "train").column("image").to_pylist())


def test_synth_rows_and_label_sets(synth_dir):
    meta = read_dataset_json(synth_dir / "eval")
    assert meta["classes"] == synth.SHAPES and meta["label_sets"]["shape"]["classes"] == synth.SHAPES
    assert meta["label_sets"]["pattern"] == {"column": "label_pattern", "classes": synth.PATTERNS,
                                             "templates": synth.PATTERN_TEMPLATES}
    assert meta["label_sets"]["position"] == {"column": "label_position", "classes": synth.POSITION_CLASSES,
                                              "templates": synth.POSITION_TEMPLATES}
    assert meta["label_sets"]["scene"] == {"column": "label_scene", "classes": synth.SCENE_CLASSES,
                                           "templates": synth.SCENE_TEMPLATES}
    assert set(meta["label_sets"]) == {"shape", "pattern", "colour", "position", "scene"}
    table = pq.read_table(list_parquet_files(str(synth_dir / "eval"))[0])
    assert all(table.schema.field(c).type == pa.int32()
               for c in ("label", "label_pattern", "label_colour", "label_position", "label_scene"))
    rows = table.to_pylist()
    for index, row in enumerate(rows):  # the shards hold what make_row makes
        assert row == synth.make_row(0, "eval", index), index
        img = Image.open(io.BytesIO(row["image"]))
        assert img.format == "JPEG" and img.size == (128, 128) == (row["width"], row["height"])
    assert len({r["caption"] for r in rows}) > 0.8 * len(rows)


def _scene(row: int) -> dict:
    """The object make_row(0, "eval", row) drew, and the background under it (same random stream)."""
    rng = np.random.default_rng([0, synth.SPLITS["eval"], row])
    obj = synth._sample_scene(rng, 128)[0]
    return obj | {"background": np.clip(synth._background(rng, 128, obj["scene"]) + 0.5, 0, 255)}


def _words(caption: str, vocabulary: list[str]) -> set[str]:
    """The phrases of ``vocabulary`` in the caption, less those inside a longer one found ("at the top" in "at the
    top left")."""
    found = {p for p in vocabulary if re.search(rf"\b{re.escape(p)}\b", caption)}
    return {p for p in found if not any(p != q and p in q for q in found)}


def test_captions_name_the_labelled_attributes():
    """Every attribute a caption names is the row's (colour, position, scene, shape, size, pattern); colour,
    position and scene are named in most captions, and some captions are short."""
    phrase_of = {p: pos for pos, phrases in synth._POSITION_WORDS.items() for p in phrases}
    size_of = {w: s for s, words in synth._SIZE_WORDS.items() for w in words}
    pattern_of = {w: p for p, words in {**synth._PATTERN_ADJ}.items() for w in words}
    pattern_of |= {w: p for p, words in synth._PATTERN_WITH.items() for w in words}
    named = {"colour": 0, "position": 0, "scene": 0, "shape": 0, "short": 0}
    n = 400
    for index in range(n):
        row, obj = synth.make_row(0, "eval", index), _scene(index)
        caption = row["caption"]
        colours = _words(caption, synth.COLOUR_NAMES)
        positions = {phrase_of[p] for p in _words(caption, list(phrase_of))}
        shapes = _words(caption, synth.SHAPES)
        scenes = _words(caption, synth.SCENE_CLASSES)
        assert scenes <= {synth.SCENE_CLASSES[row["label_scene"]]}, (caption, row["label_scene"])
        assert colours <= {synth.COLOUR_NAMES[row["label_colour"]]}, (caption, row["label_colour"])
        assert positions <= {synth.POSITIONS[row["label_position"]]}, (caption, row["label_position"])
        assert shapes <= {synth.SHAPES[row["label"]]}, (caption, row["label"])
        assert {size_of[w] for w in _words(caption, list(size_of))} <= {obj["size"]}, caption
        assert {pattern_of[w] for w in _words(caption, list(pattern_of))} <= {synth.PATTERNS[row["label_pattern"]]}
        named["colour"] += bool(colours)
        named["position"] += bool(positions)
        named["shape"] += bool(shapes)
        named["scene"] += bool(scenes)
        named["short"] += len(caption.split()) <= 4
    assert 0.65 * n < named["colour"] < 0.9 * n and 0.65 * n < named["position"] < 0.9 * n, named
    assert 0.5 * n < named["scene"] < 0.8 * n, named
    assert 0.4 * n < named["shape"] < 0.8 * n and 0.05 * n < named["short"] < 0.3 * n, named


def test_position_phrases_say_their_cell():
    """Each position's phrases (captions and zero-shot classes) use the words of its own cell and no other's, so a
    model that reads "at the top" learns the top middle cell."""
    synonyms = {"top": {"top", "upper"}, "bottom": {"bottom", "lower"}, "left": {"left"}, "right": {"right"},
                "centre": {"centre", "center", "middle"}}
    for position, phrases in synth._POSITION_WORDS.items():
        assert phrases[0] == synth.POSITION_CLASSES[synth.POSITIONS.index(position)]
        for phrase in phrases:
            said = {side for side, words in synonyms.items() if words & set(phrase.split())}
            assert said == set(position.split()), (position, phrase)


def test_position_colour_and_scene_labels_are_what_the_pixels_show():
    """From the JPEG make_row writes: the box around the pixels that differ from the background is centred in the
    labelled cell of the 3x3 grid (a box, not the mass: a crescent's mass lies off its centre), a solid object's
    inside is nearest the labelled colour (brightness jitter and JPEG included), and the pixels away from the object
    are nearest the labelled scene's tone and farther from every object colour than 45 (the object stands out)."""
    palette = np.array(list(synth.COLOURS.values()), np.float32)
    tones = np.array(list(synth.SCENES.values()), np.float32)
    counts, solid = np.zeros(len(synth.POSITIONS), int), 0
    for index in range(300):
        row, obj = synth.make_row(0, "eval", index), _scene(index)
        img = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"), np.float32)
        mask = np.abs(img - obj["background"]).sum(-1) > 45
        ys, xs = np.nonzero(mask)
        assert mask.sum() > 30, index
        far = ~np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(9)))  # 4 px clear of the object
        backdrop = np.median(img[far], 0)
        assert np.argmin(((tones - backdrop) ** 2).sum(-1)) == row["label_scene"], (index, row["caption"], backdrop)
        x, y = (xs.min() + xs.max() + 1) / 2 * 3 / 128, (ys.min() + ys.max() + 1) / 2 * 3 / 128  # in cells
        assert synth.POSITIONS[int(y) * 3 + int(x)] == synth.POSITIONS[row["label_position"]], (index, row["caption"])
        # the object's centre is far inside its cell (>= 0.08 image sides from its edges): never a guess
        col, line = synth._CELL[obj["position"]]
        for at, cell in ((obj["cx"], col), (obj["cy"], line)):
            assert cell / 3 + 0.08 < at / 128 < (cell + 1) / 3 - 0.08, (index, obj)
        counts[row["label_position"]] += 1
        if synth.PATTERNS[row["label_pattern"]] == "solid":
            inside = mask.copy()
            for shift in (1, -1, 2, -2):
                inside &= np.roll(mask, shift, 0) & np.roll(mask, shift, 1)
            if inside.sum() >= 5:
                solid += 1
                nearest = np.argmin(((palette - np.median(img[inside], 0)) ** 2).sum(-1))
                assert nearest == row["label_colour"], (index, row["caption"])
    assert counts.min() > 15 and solid > 50, (counts, solid)


def test_pattern_is_fine_detail():
    """Stripes are visible at 128 px and average out at 32 px (the point of the low-res phase)."""
    objects = [{"shape": "square", "colour": "red", "pattern": "striped", "size": "large", "position": "centre",
                "scene": "stone", "cx": 64, "cy": 64, "r": 40, "angle": 0.0, "brightness": 1.0, "variant": 0}]
    img = synth.render(objects, np.random.default_rng(0), 128).astype(np.float32)
    patch = img[48:80, 48:80].mean(-1)
    small = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((32, 32), Image.Resampling.BOX), np.float32)
    assert patch.std() > 30 and small[12:20, 12:20].mean(-1).std() < 3


def test_textured_rows_are_the_plain_rows_plus_a_named_texture():
    """textured=True keeps every scene and caption (the texture has its own random stream) and names the texture in
    most captions with the phrases the zero-shot classes use."""
    counts, named = [0] * len(synth.BACKGROUNDS), 0
    for row in range(160):
        plain, textured = synth.make_row(3, "eval", row), synth.make_row(3, "eval", row, textured=True)
        background = synth.BACKGROUNDS[textured["label_background"]]
        counts[textured["label_background"]] += 1
        assert textured["caption"].startswith(plain["caption"])
        suffix = textured["caption"][len(plain["caption"]):]
        if suffix:
            named += 1
            assert suffix.removeprefix(" on ") in synth.BACKGROUND_PHRASES[background], (row, suffix)
        assert (textured["image"] == plain["image"]) == (background == "plain")
        assert {k: v for k, v in textured.items() if k not in ("image", "caption", "label_background")} == \
            {k: v for k, v in plain.items() if k not in ("image", "caption")}
    assert min(counts) > 20 and 0.7 * 160 < named < 0.9 * 160


def test_background_texture_shows_at_112_px_and_not_at_32_px():
    """Through the pipeline's own decode, against the same scene without texture: the lines add many times the
    plain image's edge energy across them at 112 px (the eval crop), and almost nothing at 32 px from the 40 px copy
    the low phase reads (a random train crop, the same for both), where issue 14 needs a 32 px model to be blind."""
    import random

    from reclip_ray.data.images import decode_image, make_copy

    def across(image: bytes, size: int, row: int, axis: int) -> float:
        pixels = (decode_image(image, 112, train=False) if size == 112 else
                  decode_image(make_copy(image, 40), 32, train=True, rng=random.Random(row)))
        return float(np.abs(np.diff(pixels.astype(np.float32).mean(-1), axis=axis)).mean())

    added: dict[int, list[float]] = {32: [], 112: []}
    plain_112, along_112 = [], []
    for row in range(120):
        textured, plain = synth.make_row(0, "train", row, textured=True), synth.make_row(0, "train", row)
        background = synth.BACKGROUNDS[textured["label_background"]]
        if background not in ("horizontal", "vertical"):
            continue
        axis = 0 if background == "horizontal" else 1  # horizontal lines: the edges are between rows
        for size in (32, 112):
            added[size].append(across(textured["image"], size, row, axis) - across(plain["image"], size, row, axis))
        plain_112.append(across(plain["image"], 112, row, axis))
        along_112.append(across(textured["image"], 112, row, 1 - axis) / across(plain["image"], 112, row, 1 - axis))
    assert len(plain_112) > 40
    # 3x: the default objects cover up to 0.68 image sides, so less backdrop shows its texture (3.9x measured)
    assert np.mean(added[112]) > 3 * np.mean(plain_112) and np.mean(along_112) < 1.2, (added, along_112)
    assert np.mean(added[32]) < 0.03 * np.mean(added[112]), added  # 1 % measured


def test_textured_dataset_has_the_background_label_set(tmp_path, capsys):
    out = tmp_path / "ds"
    assert cli_main(["data", "synth", "--out", str(out), "--train", "8", "--eval", "12", "--textured"]) == 0
    capsys.readouterr()
    meta = read_dataset_json(str(out / "eval"))
    assert meta["label_sets"]["background"]["classes"] == synth.BACKGROUND_CLASSES
    assert set(meta["label_sets"]) == {"shape", "pattern", "colour", "position", "scene", "background"}
    table = pq.read_table(list_parquet_files(str(out / "eval"))[0])
    assert table.column("label_background").to_pylist() == [
        synth.make_row(0, "eval", r, textured=True)["label_background"] for r in range(12)]
    assert "label_background" not in pq.read_schema(list_parquet_files(str(out / "train"))[0]).names


def test_synth_cli_image_size_draws_at_that_size_and_out_of_range_is_one_line(tmp_path, capsys):
    """A 224 px phase needs sources of at least 224 px: ``--image-size 256`` draws them (no upscaling), in the
    JPEG bytes and the width/height columns alike."""
    out = tmp_path / "ds"
    assert cli_main(["data", "synth", "--out", str(out), "--train", "6", "--eval", "2", "--image-size", "256",
                     "--workers", "1"]) == 0
    table = pq.read_table(list_parquet_files(str(out / "train"))[0])
    with Image.open(io.BytesIO(table.column("image")[0].as_py())) as im:
        assert im.size == (256, 256)
    assert set(table.column("width").to_pylist()) == set(table.column("height").to_pylist()) == {256}
    capsys.readouterr()
    assert cli_main(["data", "synth", "--out", str(tmp_path / "bad"), "--train", "6", "--image-size", "512"]) == 2
    assert "synthetic image_size must be between 32 and 256, got 512" in capsys.readouterr().err


def test_inspect_reports_bad_rows(tmp_path, synth_dir):
    good = pq.read_table(list_parquet_files(str(synth_dir / "train"))[0]).slice(0, 20).to_pylist()
    good[3]["image"] = good[3]["image"][:300]
    good[7]["caption"] = ""
    good[9]["image"] = b"junk"
    (tmp_path / "d").mkdir()
    pq.write_table(pa.Table.from_pylist(good), tmp_path / "d" / "shard-00000.parquet")
    report = inspect_dataset(str(tmp_path / "d"))
    json.dumps(report)
    assert report["rows"] == 20 and report["shards"] == 1 and report["bad_rows"] == 3
    assert [(e["row"], e["key"]) for e in report["bad_examples"]] == [(3, good[3]["key"]), (7, good[7]["key"]),
                                                                       (9, good[9]["key"])]
    assert report["bad_examples"][1]["reason"] == "empty caption"
    assert report["image_size"]["width"] == {"min": 128, "median": 128.0, "max": 128}
    with pytest.raises(DataError, match="missing caption column 'text'"):
        inspect_dataset(str(tmp_path / "d"), caption_column="text")


def test_local_batches_and_bad_fraction(tmp_path, synth_dir, tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    rows = pq.read_table(list_parquet_files(str(synth_dir / "eval"))[0]).slice(0, 50).to_pylist()
    rows[5]["image"] = b"\x89PNG broken"
    rows[6]["caption"] = "  "
    (tmp_path / "d").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d" / "shard-00003.parquet")
    bad = BadRowCount()
    batches = list(iter_local_batches(str(tmp_path / "d"), image_size=48, text_length=12, tokenizer=tok,
                                      batch_size=16, extra_columns=("label", "caption"), bad_rows=bad))
    assert [len(b["image"]) for b in batches] == [16, 16, 16]
    b = batches[0]
    assert b["image"].shape == (16, 48, 48, 3) and b["image"].dtype == np.uint8 and b["tokens"].shape == (16, 12)
    assert b["tokens"].dtype == np.int64 and list(b["label"][:5]) == [r["label"] for r in rows[:5]]
    assert list(b["caption"][:5]) == [r["caption"] for r in rows[:5]]
    assert (bad.seen, bad.bad) == (50, 2) and bad.fraction == pytest.approx(0.04)
    with pytest.raises(DataError, match=r"2 of 50 rows \(4.0%\) bad rows \(> 1.0%.*shard-00003\.parquet row 5 "
                                        r"key=eval-00000005: cannot identify image"):
        bad.check(0.01)
    bad.check(0.05)
    check_bad_fraction(100, 1, 0.01)


def test_cli_data_commands(tmp_path, capsys):
    out = tmp_path / "ds"
    assert cli_main(["data", "synth", "--out", str(out), "--train", "40", "--eval", "20", "--shard-rows", "20"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["shards"] == 2
    assert cli_main(["data", "inspect", str(out / "train")]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 40
    assert cli_main(["data", "tokenizer", "--data", str(out / "train"), "--vocab-size", "300",
                     "--out", str(tmp_path / "tok.json")]) == 0
    assert (tmp_path / "tok.json").exists()
    capsys.readouterr()
    assert cli_main(["data", "inspect", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Parquet files under" in err and "Traceback" not in err
    assert cli_main(["data", "ingest", "--images", str(tmp_path), "--captions", str(tmp_path / "x.csv"),
                     "--out", str(tmp_path / "o")]) == 2
    assert "captions file not found" in capsys.readouterr().err
