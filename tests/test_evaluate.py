"""Zero-shot and retrieval metrics on embeddings where the answer is known; dataset / checkpoint evaluation."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reclip_ray.errors import ReclipError
from reclip_ray.evaluation.checkpoint import evaluate_checkpoint
from reclip_ray.evaluation.metrics import retrieval_metrics, zero_shot_metrics

E = torch.eye(4)


def test_zero_shot_known_answers_and_ties():
    classifier = E[:3]  # 3 classes
    tie01 = F.normalize(E[0] + E[1], dim=0)
    images = torch.stack([E[0], E[1], E[2], tie01, E[1] * 0.9 + E[0] * 0.1])
    labels = torch.tensor([0, 1, 1, 0, 0])
    m = zero_shot_metrics(images, labels, classifier)
    # hits at top-1: rows 0, 1; row 2 (class 1 predicted 2), row 3 (tie: counts against), row 4 (predicts 1) miss
    assert m["top1"] == pytest.approx(2 / 5)
    assert m["top5"] == 1.0  # k clipped to the 3 classes
    # class 0: 1 of 3 rows right; class 1: 1 of 2
    assert m["mean_per_class_recall"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    # a collapsed model (all scores equal) gets nothing at top-1
    assert zero_shot_metrics(torch.ones(3, 4), torch.tensor([0, 1, 2]), classifier)["top1"] == 0.0


def test_a_tie_at_the_fifth_place_is_a_top5_miss():
    """README: a tie counts against the model in every metric, top-5 too: the correct class tied with the fifth
    best wrong one ranks sixth. The test above checks top-5 only with 3 classes (every rank a hit)."""
    classifier = torch.eye(7)[:6]  # 6 classes
    # scores: classes 1-4 at 1.0, class 0 (correct) and 5 at 0.5: four wrong ones above, one tied
    image = torch.tensor([[0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0]])
    assert zero_shot_metrics(image, torch.tensor([0]), classifier)["top5"] == 0.0
    ahead = image.clone()
    ahead[0, 0] = 0.6  # the fifth place alone: a hit
    assert zero_shot_metrics(ahead, torch.tensor([0]), classifier)["top5"] == 1.0


def test_retrieval_several_captions_and_ties():
    images = torch.stack([E[0], E[1], E[2]])
    # captions 0,1 -> image 0; caption 2 -> image 1; caption 3 -> image 2 (but looks like image 1);
    # caption 4 -> image 2, exactly tied between images 1 and 2.
    texts = torch.stack([E[3], E[0], E[1], E[1], F.normalize(E[1] + E[2], dim=0)])
    t2i = torch.tensor([0, 0, 1, 2, 2])
    m = retrieval_metrics(images, texts, t2i, ks=(1, 2))
    # image 0: best caption is 1 (score 1), nothing wrong scores >= 1 -> rank 0, hit.
    # image 1: caption 2 scores 1, but caption 3 (image 2's) also 1 -> tie against -> rank 1.
    # image 2: best own caption 4 scores .707; no wrong caption scores >= .707 -> rank 0.
    assert m["image_to_text_r@1"] == pytest.approx(2 / 3)
    assert m["image_to_text_r@2"] == 1.0
    # texts: 0 -> all images score 0: tie with 2 others -> rank 2; 1 -> hit; 2 -> hit; 3 -> image 1 wins and
    # image 0 ties with its 0 -> rank 2;
    # 4 -> tie between images 1 and 2 -> rank 1
    assert m["text_to_image_r@1"] == pytest.approx(2 / 5)
    assert m["text_to_image_r@2"] == pytest.approx(3 / 5)


def test_chunked_metrics_match_brute_force():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(37, 8, generator=g), dim=-1)
    txt = F.normalize(img.repeat(2, 1) + 0.8 * torch.randn(74, 8, generator=g), dim=-1)
    t2i = torch.arange(37).repeat(2)
    sims = (img @ txt.T).numpy()
    ref_i2t = np.mean([
        (np.sort(sims[i, t2i.numpy() != i])[::-1][:5] >= sims[i, t2i.numpy() == i].max()).sum() < 5
        for i in range(37)
    ])
    ref_t2i = np.mean([(sims[:, j] > sims[t2i[j], j]).sum() < 5 for j in range(74)])
    for chunk in (5, 1024):
        m = retrieval_metrics(img, txt, t2i, chunk=chunk)
        assert m["image_to_text_r@5"] == pytest.approx(ref_i2t)
        assert m["text_to_image_r@5"] == pytest.approx(ref_t2i)
    labels = torch.randint(0, 6, (37,), generator=g)
    cls = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    pred = (img @ cls.T).argmax(1)
    assert zero_shot_metrics(img, labels, cls, chunk=4)["top1"] == pytest.approx((pred == labels).float().mean().item())


def test_nan_features_are_misses_not_hits():
    """A diverged model (NaN features) scores like a collapsed one, not 1.0 everywhere; one NaN image among good
    ones costs exactly its own hits."""
    nan = torch.full((4, 4), float("nan"))
    assert zero_shot_metrics(nan, torch.tensor([0, 1, 2, 0]), E[:3])["top1"] == 0.0
    assert zero_shot_metrics(E, torch.arange(4), nan)["top1"] == 0.0
    m = retrieval_metrics(nan, nan, ks=(1, 3))
    assert (m["image_to_text_r@1"], m["text_to_image_r@1"]) == (0.0, 0.0)
    assert (m["image_to_text_r@3"], m["text_to_image_r@3"]) == (0.0, 0.0)
    images = E.clone()
    images[2] = float("nan")
    assert zero_shot_metrics(images, torch.arange(4), E)["top1"] == pytest.approx(3 / 4)
    m = retrieval_metrics(images, E, ks=(1,))
    # image 2 misses both ways; caption 2 scores NaN against image 2 only, so the other captions still hit
    assert (m["image_to_text_r@1"], m["text_to_image_r@1"]) == (pytest.approx(3 / 4), pytest.approx(3 / 4))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tokenizer_path):
    from reclip_ray.config import load_config
    from reclip_ray.data.tokenizer import load_tokenizer
    from reclip_ray.export import export_model
    from reclip_ray.model import build_model

    tok = load_tokenizer(tokenizer_path)
    cfg = load_config("tiny")
    torch.manual_seed(0)
    return export_model(build_model(cfg.model, tok.vocab_size), tok, cfg, tmp_path_factory.mktemp("exp") / "model")


def test_cli_eval_prints_json(export_dir, synth_dir, capsys):
    from reclip_ray.cli import main

    assert main(["eval", "--checkpoint", str(export_dir), "--data", str(synth_dir / "eval"), "--batch-size", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    m = out["metrics"]
    assert out["image_size"] == 64 and m["rows"] == 200
    for key in ("shape/top1", "shape/top5", "pattern/top1", "pattern/mean_per_class_recall",
                "image_to_text_r@1", "text_to_image_r@10"):
        assert 0.0 <= m[key] <= 1.0, key


def test_a_sweep_trial_without_its_finetune_is_evaluated_on_the_full_runs_task(tokenizer_path, synth_dir, tmp_path):
    """A trial with finetune_fraction 0 trains only its 32 px / 16-token phase; its export is scored as the full
    run's: 64 px and the finetune's 32 tokens (4.6 % of the synthetic eval captions are longer than 16 tokens),
    so the same weights score the same under either config."""
    from reclip_ray.config import apply_overrides, from_dict, load_raw
    from reclip_ray.data.tokenizer import load_tokenizer
    from reclip_ray.export import export_model
    from reclip_ray.model import build_model
    from reclip_ray.sweep import trial_raw

    tok = load_tokenizer(tokenizer_path)
    full = from_dict(apply_overrides(load_raw("tiny"), []))
    alone = from_dict(trial_raw(load_raw("tiny"), {"finetune_fraction": 0.0}, {"samples": 1000}))
    assert [(p.image_size, p.text_length) for p in alone.phases] == [(32, 16)]
    torch.manual_seed(0)
    model = build_model(full.model, tok.vocab_size)
    scored = {}
    for name, cfg in (("full", full), ("alone", alone)):
        out = evaluate_checkpoint(str(export_model(model, tok, cfg, tmp_path / name)), str(synth_dir / "eval"),
                                  batch_size=100, device="cpu")
        assert (out["image_size"], out["text_length"]) == (64, 32), name
        scored[name] = out["metrics"]
    assert scored["alone"] == pytest.approx(scored["full"], abs=1e-9)


def test_eval_errors_and_retrieval_only(export_dir, synth_dir, tmp_path, capsys):
    from reclip_ray.cli import main

    with pytest.raises(ReclipError, match="checkpoint not found"):
        evaluate_checkpoint(str(tmp_path / "missing"), str(synth_dir / "eval"))
    # zero-shot asked for on a dataset without labels
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(["circle", "square"]))
    with pytest.raises(ReclipError, match="no label column"):
        evaluate_checkpoint(str(export_dir), str(synth_dir / "train"), classes_path=str(classes), image_size=32)
    # classes file that does not match the labels (10 shapes in the data, 2 names given)
    with pytest.raises(ReclipError, match="outside the 2 classes"):
        evaluate_checkpoint(str(export_dir), str(synth_dir / "eval"), classes_path=str(classes), image_size=32)
    assert main(["eval", "--checkpoint", str(export_dir), "--data", str(synth_dir / "eval"),
                 "--classes", str(classes), "--image-size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "outside the 2 classes" in err
    # no labels and no classes: retrieval only
    m = evaluate_checkpoint(str(export_dir), str(synth_dir / "train"), image_size=32)["metrics"]
    assert m["rows"] == 600 and "image_to_text_r@1" in m and not any("top1" in k for k in m)


def test_eval_checks_the_labels_before_it_encodes_an_image(export_dir, synth_dir, tmp_path, monkeypatch):
    """`reclip-ray eval` found a label outside its set only after decoding and encoding every image of the set; it
    now runs the launch's labels-only check (``eval_set.check_label_values``) first: the line names the shard, and no
    image is decoded. Likewise for a --classes file that does not cover the labels."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    import reclip_ray.data.local as local
    from reclip_ray.errors import DataError

    bad = tmp_path / "eval"
    shutil.copytree(synth_dir / "eval", bad)
    shard = bad / "shard-00000.parquet"
    table = pq.read_table(shard)
    labels = table.column("label").to_pylist()
    labels[150] = 99
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int32())),
                   shard)
    decoded: list[int] = []
    decode = local.decode_image
    monkeypatch.setattr(local, "decode_image", lambda *a, **k: decoded.append(1) or decode(*a, **k))
    with pytest.raises(DataError, match=r"/eval/shard-00000\.parquet: label 99 in column 'label' is outside the 10 "
                                        r"classes of label set 'shape' in dataset\.json$"):
        evaluate_checkpoint(str(export_dir), str(bad), image_size=32)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(["circle", "square"]))
    with pytest.raises(DataError, match=r"shard-00000\.parquet: label \d in column 'label' is outside the 2 classes of "
                                        r"label set 'label' in the classes file \(classes file does not match"):
        evaluate_checkpoint(str(export_dir), str(synth_dir / "eval"), classes_path=str(classes), image_size=32)
    assert decoded == []
    evaluate_checkpoint(str(export_dir), str(synth_dir / "eval"), image_size=32)
    assert len(decoded) == 200  # the spy sees the decodes that do happen


def test_cli_eval_scores_a_hugging_face_export_with_its_classlabel_names(export_dir, tmp_path, capsys):
    """`reclip-ray eval` on Parquet written by `datasets`: struct images, the ClassLabel names as label sets, the
    same numbers as the names given by --classes."""
    from layouts import write_hugging_face
    from reclip_ray.cli import main

    hf = write_hugging_face(tmp_path / "hf")
    assert main(["eval", "--checkpoint", str(export_dir), "--data", str(hf.path), "--image-size", "32"]) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]
    assert (m["rows"], m["absent_rows"], m["bad_rows"]) == (len(hf.valid_keys), hf.absent, hf.bad)
    assert (m["label/chance_top1"], m["colour/chance_top1"]) == (pytest.approx(1 / 3), 0.25)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(hf.extra["classes"]))
    given = evaluate_checkpoint(str(export_dir), str(hf.path), classes_path=str(classes), image_size=32)["metrics"]
    assert {k: v for k, v in m.items() if k.startswith("label/")} == {k: v for k, v in given.items()
                                                                      if k.startswith("label/")}
    # A Hub folder with a second split beside it: the folder is refused, a pattern scores the split it names.
    write_hugging_face(tmp_path / "hf", n_rows=5, shards=1, split="test", seed=4)
    assert main(["eval", "--checkpoint", str(export_dir), "--data", str(hf.path), "--image-size", "32"]) == 2
    assert "holds the splits train, test of a Hugging Face export" in capsys.readouterr().err
    pattern = str(hf.path / "data" / "train-*.parquet")
    assert main(["eval", "--checkpoint", str(export_dir), "--data", pattern, "--image-size", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == m


def test_caption_column_names_captions_the_run_config_does_not(export_dir, synth_dir, tmp_path, capsys):
    """An eval set whose captions sit in a column named neither like the run's ``data.caption_column`` nor
    ``caption`` is scored as captionless (zero-shot only) unless ``caption_column`` names it; named, it scores
    exactly what the same set with canonical names scores. A named column the shards lack is a one-line error."""
    import shutil

    import pyarrow.parquet as pq

    from reclip_ray.cli import main
    from reclip_ray.data.shards import list_parquet_files

    src = synth_dir / "eval"
    renamed = tmp_path / "eval"
    renamed.mkdir()
    for path in list_parquet_files(str(src)):
        table = pq.read_table(path)
        names = ["alt_text" if n == "caption" else n for n in table.column_names]
        pq.write_table(table.rename_columns(names), renamed / path.rsplit("/", 1)[-1])
    shutil.copy(src / "dataset.json", renamed / "dataset.json")

    reference = evaluate_checkpoint(str(export_dir), str(src), image_size=32)["metrics"]
    assert reference["text_to_image_r@1"] > 0 and reference["captions"] == reference["rows"] == 200
    blind = evaluate_checkpoint(str(export_dir), str(renamed), image_size=32)["metrics"]
    assert blind["captions"] == 0 and not any("_r@" in k for k in blind)
    named = evaluate_checkpoint(str(export_dir), str(renamed), image_size=32, caption_column="alt_text")["metrics"]
    assert named == reference
    missing = r"--caption-column 'nope': no such column in .*\.parquet; columns are .*'alt_text'"
    with pytest.raises(ReclipError, match=missing):
        evaluate_checkpoint(str(export_dir), str(renamed), image_size=32, caption_column="nope")
    # The same through `reclip-ray eval`, whose flag the error names.
    args = ["eval", "--checkpoint", str(export_dir), "--data", str(renamed), "--image-size", "32"]
    capsys.readouterr()
    assert main([*args, "--caption-column", "alt_text"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == reference
    assert main([*args, "--caption-column", "nope"]) == 2
    assert re.search(missing, capsys.readouterr().err)


def test_label_column_names_the_column_dataset_json_classes_are_for(export_dir, synth_dir, tokenizer_path, tmp_path,
                                                                   capsys):
    """An eval set whose labels sit in ``cls`` (CLIP_benchmark's name) while dataset.json's classes are for the label
    column: `reclip-ray eval` and the launch's check scored no zero-shot and said nothing. Each now stops in one line
    naming its own way to name the column (--label-column, --set data.label_column), and given it, scores the set
    as the same set with a ``label`` column."""
    import shutil

    import pyarrow.parquet as pq

    from reclip_ray.cli import main
    from reclip_ray.config import load_config
    from reclip_ray.data.shards import list_parquet_files
    from reclip_ray.errors import DataError
    from reclip_ray.train.prepare import prepare

    src = synth_dir / "eval"
    renamed = tmp_path / "eval"
    renamed.mkdir()
    for path in list_parquet_files(str(src)):
        table = pq.read_table(path)
        pq.write_table(table.rename_columns(["cls" if n == "label" else n for n in table.column_names]),
                       renamed / path.rsplit("/", 1)[-1])
    shutil.copy(src / "dataset.json", renamed / "dataset.json")
    reference = evaluate_checkpoint(str(export_dir), str(src), image_size=32)["metrics"]
    assert "shape/top1" in reference

    argv = ["eval", "--checkpoint", str(export_dir), "--data", str(renamed), "--image-size", "32"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--set" not in err
    assert re.search(r"/eval/dataset\.json: label set 'shape' is for the label column 'label', which \S+\.parquet "
                     r"lacks; columns are \[.*'cls'.*\] \(try --label-column cls\)$", err), err
    assert main([*argv, "--label-column", "cls"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == reference
    assert main([*argv, "--label-column", "nope"]) == 2
    assert "--label-column 'nope': no such column in" in capsys.readouterr().err

    def launch(*extra: str):
        return prepare(load_config("tiny", [
            f"data.train={synth_dir / 'train'}", f"data.eval={renamed}", f"data.tokenizer={tokenizer_path}",
            "data.synth_if_missing=false", f"run.storage_path={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra]))

    with pytest.raises(DataError, match=r"\(try --set data\.label_column=cls\)$"):
        launch()
    assert launch("data.label_column=cls").eval_set["label_sets"]["shape"] == 10


def test_zero_shot_templates_take_the_class_in_braces_or_as_c():
    """A template names the class as ``{}`` (open_clip) or ``{c}`` (CLIP_benchmark): both are filled
    (``"a photo of a {c}."`` was scored as ``"a photo of a {c}. circle"``); one with neither gets it appended."""
    from reclip_ray.evaluation.metrics import zero_shot_classifier

    seen: list[str] = []

    class Tok:
        def encode(self, texts, length):
            seen.extend(texts)
            return np.zeros((len(texts), length), np.int64)

    class Model(torch.nn.Module):
        def encode_text(self, tokens, normalize=False):
            return torch.ones(tokens.shape[0], 4)

    templates = ["a photo of a {c}.", "a {} shape.", "{c}, a {c}", "a drawing of a"]
    zero_shot_classifier(Model(), Tok(), ["circle", "star"], templates, text_length=8)
    assert seen == ["a photo of a circle.", "a circle shape.", "circle, a circle", "a drawing of a circle",
                    "a photo of a star.", "a star shape.", "star, a star", "a drawing of a star"]


def test_a_template_that_cannot_take_the_class_name_is_a_one_line_error(tmp_path):
    """A template with another field (``{1}``, ``{cls}``) or a lone brace would fail in the middle of an
    evaluation: it is refused at once, from a --classes file or dataset.json."""
    from reclip_ray.data.schema import ColumnMap
    from reclip_ray.evaluation.eval_set import check_templates, label_sets, read_classes

    for bad, fragment in (("a {0} and {1}", "takes the class name only as {} or {c} (IndexError"),
                          ("a {cls}", "takes the class name only as {} or {c} (KeyError: 'cls')"),
                          ("a {c} }", "takes the class name only as {} or {c} (ValueError")):
        with pytest.raises(ReclipError, match=re.escape(fragment)):
            check_templates([bad], "where")
    check_templates(["a photo of a", "a {}", "a {c}"], "where")
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"classes": ["circle"], "templates": ["a {cls}"]}))
    with pytest.raises(ReclipError, match=r"classes\.json: zero-shot template 'a \{cls\}' takes"):
        read_classes(str(path), {})
    meta = {"classes": ["circle"], "templates": ["a photo of a {}", "a {1}"]}
    with pytest.raises(ReclipError, match=r"^dataset\.json \(label set 'label'\): zero-shot template 'a \{1\}'"):
        label_sets(meta, ["image", "label"], ColumnMap(), None)


def test_eval_column_hints_name_its_own_options_which_then_work(export_dir, tmp_path, capsys):
    """`reclip-ray eval` has --image-column and --caption-column, not --set: on img2dataset shards (images in
    `jpg`) the missing-column line names --image-column, and the same command given it scores the set."""
    from layouts import write_img2dataset
    from reclip_ray.cli import build_parser, main

    i2d = write_img2dataset(tmp_path / "i2d", 12, failed_fraction=0.25, seed=1, shards=1)
    argv = ["eval", "--checkpoint", str(export_dir), "--data", str(i2d.path), "--image-size", "32"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing image column 'image'" in err and "--set" not in err
    hinted = list(re.search(r"\(try (--[\w-]+) (\S+)\)$", err).groups())
    assert hinted == ["--image-column", "jpg"]
    build_parser().parse_args(argv + hinted)  # a flag the same command's parser takes
    assert main(argv + hinted) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]
    assert (m["rows"], m["absent_rows"], m["captions"]) == (9, 3, 9)
    assert main(argv + ["--image-column", "url"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("has type string, expected binary (try --image-column jpg)")
    assert main(argv + ["--image-column", "nope"]) == 2
    assert "--image-column 'nope': no such column in" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--image-size", "-8"], "--image-size must be 0 (the model's full resolution) or a size in pixels, got -8"),
    (["--image-size", "12"], "--image-size 12 is not a multiple of the model's patch size 8"),
])
def test_eval_and_export_refuse_bad_sizes_in_one_line(export_dir, synth_dir, tmp_path, capsys, flags, message):
    from reclip_ray.cli import main

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(export_dir), "--data", str(synth_dir / "eval"), *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"reclip-ray: error: {message}\n"
    if flags[0] == "--image-size":
        out = tmp_path / "oc"
        assert main(["export", str(export_dir), "--out", str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("reclip-ray: error: ") and flags[1] in err
        assert not out.exists()


def test_a_runs_evaluation_and_eval_warn_once_of_a_class_named_twice(export_dir, tokenizer_path, synth_dir, tmp_path,
                                                                      capsys):
    """A phase's evaluation (at its own size and the full one) and `reclip-ray eval` each say once, on stderr (eval's
    stdout stays JSON), which classes of a label set share a name; a set without twins says nothing."""
    import shutil

    from reclip_ray.cli import main
    from reclip_ray.config import load_config
    from reclip_ray.data.tokenizer import load_tokenizer
    from reclip_ray.model import build_model
    from reclip_ray.schedule import Schedule
    from reclip_ray.train.phase_eval import evaluate_phase

    data = tmp_path / "eval"
    shutil.copytree(synth_dir / "eval", data)
    meta = json.loads((data / "dataset.json").read_text())
    shapes = meta["label_sets"]["shape"]["classes"]
    shapes[2] = shapes[1]
    (data / "dataset.json").write_text(json.dumps(meta))
    line = (f"[reclip] WARNING: {data}: label set 'shape' names '{shapes[1]}' (classes 1, 2) more than once; their "
            "prompts tie and a tie counts against the model, so their images are never top-1 hits\n")
    cfg = load_config("tiny", [f"data.eval={data}", "eval.batch_size=100"])
    tok = load_tokenizer(tokenizer_path)
    torch.manual_seed(0)
    plan = Schedule.from_config(cfg).phases[0]
    capsys.readouterr()
    got = evaluate_phase(cfg, build_model(cfg.model, tokenizer=tok), tok, plan, torch.device("cpu"))
    assert {"eval/32px/shape/top1", "eval/64px/shape/top1"} <= set(got)
    assert capsys.readouterr().err == line
    from reclip_ray.evaluation import eval_set

    eval_set._WARNED.clear()  # `reclip-ray eval` is a process of its own
    assert main(["eval", "--checkpoint", str(export_dir), "--data", str(data), "--image-size", "32"]) == 0
    out, err = capsys.readouterr()
    assert err == line and "shape/top1" in json.loads(out)["metrics"]
    assert main(["eval", "--checkpoint", str(export_dir), "--data", str(synth_dir / "eval"), "--image-size", "32"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("precision, expected", [("bf16", torch.bfloat16), ("fp32", None), ("auto", None)])
def test_a_training_runs_evaluation_encodes_at_its_training_precision(tokenizer_path, synth_dir, precision, expected):
    """``phase_eval.evaluate_phase`` (phase ends, compute milestones) runs both towers under ``train.precision``'s
    autocast, as the steps do (bf16 on a GPU: ``auto`` is fp32 on this CPU): every encode sees it, and bf16 scores
    the set as fp32 does, within a few rows."""
    from reclip_ray.config import load_config
    from reclip_ray.data.tokenizer import load_tokenizer
    from reclip_ray.model import build_model
    from reclip_ray.schedule import Schedule
    from reclip_ray.train.phase_eval import evaluate_phase

    cfg = load_config("tiny", [f"data.eval={synth_dir / 'eval'}", f"train.precision={precision}",
                               "eval.batch_size=100"])
    tok = load_tokenizer(tokenizer_path)
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer=tok)
    seen: list = []
    for name in ("encode_image", "encode_text"):
        def spy(*args, _encode=getattr(model, name), **kwargs):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return _encode(*args, **kwargs)
        setattr(model, name, spy)
    plan = Schedule.from_config(cfg).phases[-1]
    got = evaluate_phase(cfg, model, tok, plan, torch.device("cpu"))
    assert seen and set(seen) == {expected}, seen
    if expected is not None:
        cfg.train.precision = "fp32"
        fp32 = evaluate_phase(cfg, model, tok, plan, torch.device("cpu"))
        assert got.keys() == fp32.keys()
        for key, value in fp32.items():
            assert got[key] == pytest.approx(value, abs=0.05), key
