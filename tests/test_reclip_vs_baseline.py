"""benchmarks/reclip_vs_baseline.py: arms, resume keys, summaries and FLOPs ratios (fast), and one real resumed
experiment on Ray (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from reclip_ray.config import load_config
from reclip_ray.flops import run_flops

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reclip_vs_baseline.py"


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """The script as a module, its results folder in tmp_path."""
    spec = importlib.util.spec_from_file_location("reclip_vs_baseline_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up while being defined
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results")
    return mod


def _args(bench, *argv):
    """The script's parsed arguments (via --dry-run's parser path, without running anything)."""
    captured = {}

    def fake_dry_run(arms, seeds, args):
        captured.update(arms=arms, seeds=seeds, args=args)
        return 0

    original = bench.dry_run
    bench.dry_run = fake_dry_run
    try:
        assert bench.main(["--dry-run", *argv]) == 0
    finally:
        bench.dry_run = original
    return captured["arms"], captured["seeds"], captured["args"]


# ------------------------------------------------------------------------------------------------ arms


def test_arm_names(bench):
    assert bench.share_label(0.1) == "10%"
    assert bench.share_label(0.05) == "5%"
    assert bench.share_label(0.075) == "7.5%"
    assert bench.arm_name("baseline", 0.1, 32) == "baseline"
    assert bench.arm_name("reclip", 0.1) == "reclip-10%"
    assert bench.arm_name("reclip", 0.05, 32) == "reclip-5%-pos32"
    assert "%" not in bench.run_name("reclip-5%-pos32", 1, "0123456789abcdef")
    assert bench.run_name("reclip-5%-pos32", 1, "0123456789abcdef") == "reclip-5pct-pos32-s1-01234567"


def test_plan_arms_crosses_shares_and_position_grids(bench):
    arms = bench.plan_arms("baseline,reclip,lowres", [0.05, 0.1], [32, 112])
    assert [a.name for a in arms] == ["baseline", "reclip-5%-pos32", "reclip-5%-pos112", "reclip-10%-pos32",
                                      "reclip-10%-pos112", "lowres"]
    assert [a.name for a in bench.plan_arms("reclip,baseline", [0.1], [])] == ["reclip-10%", "baseline"]
    with pytest.raises(SystemExit, match="unknown arm"):
        bench.plan_arms("baseline,fancy", [0.1], [])
    with pytest.raises(SystemExit, match=r"\(0, 1\)"):
        bench.plan_arms("reclip", [1.0], [])
    with pytest.raises(SystemExit, match="repeat"):
        bench.plan_arms("reclip", [0.1, 0.1], [])


def test_arm_configs_schedules_and_position_grid(bench):
    arms, _, args = _args(bench, "--low", "32", "--full", "112", "--finetune", "0.05", "--base-image-size", "32",
                          "--samples", "10000", "--set", "model.vision.base_image_size=112")
    cfgs = {a.name: bench.arm_config(a, 0, args) for a in arms}
    base, reclip, low = cfgs["baseline"], cfgs["reclip-5%-pos32"], cfgs["lowres"]
    assert [(p.image_size, p.text_length) for p in base.phases] == [(112, 32)]
    assert [(p.image_size, p.text_length) for p in reclip.phases] == [(32, 16), (112, 32)]
    assert reclip.phase_samples() == [9500, 500]
    assert reclip.phases[1].lr == 2.5e-4
    assert [p.image_size for p in low.phases] == [32] and low.eval.full_image_size == 112
    assert low.eval.full_text_length == 32 == base.phases[0].text_length  # scored on the baseline's task
    # the arm's grid wins over --set, which applies to the other arms
    assert reclip.model.vision.base_image_size == 32
    assert base.model.vision.base_image_size == low.model.vision.base_image_size == 112
    assert base.scaling.min_workers == base.scaling.max_workers == 2


def test_vit_b_16_on_one_gpu_worker_builds(bench):
    arms, _, args = _args(bench, "--config", "vit-b-16", "--low", "64", "--full", "224", "--workers", "1",
                          "--use-gpu", "true", "--finetune", "0.07", "--samples", "200000", "--batch", "256")
    cfg = bench.arm_config(arms[1], 0, args)
    assert cfg.model.name == "vit-b-16"
    assert [(p.image_size, p.text_length) for p in cfg.phases] == [(64, 16), (224, 32)]
    assert (cfg.scaling.min_workers, cfg.scaling.max_workers, cfg.scaling.use_gpu) == (1, 1, "true")
    # the synthetic data's columns and a small tokenizer, not the preset's web-data settings
    assert (cfg.data.image_column, cfg.data.caption_column, cfg.data.tokenizer, cfg.data.vocab_size) == \
        ("image", "caption", "", 1024)
    assert cfg.optim.warmup_samples == 0.05  # the preset's 5M-sample warmup would never end in 200k samples


# ------------------------------------------------------------------------------------------------ resume key


def test_run_key_is_the_runs_settings(bench):
    arms, _, args = _args(bench)
    cfg = bench.arm_config(arms[0], 0, args).to_dict()
    data = {"train": {"rows": 100, "image_size": 128}, "eval": {"rows": 10}}
    key = bench.run_key("baseline", 0, cfg, data)
    assert key == bench.run_key("baseline", 0, json.loads(json.dumps(cfg)), dict(data))
    moved = {**cfg, "run": {**cfg["run"], "storage_path": "/elsewhere"}, "tracking": {"uri": "sqlite:///x.db"}}
    assert bench.run_key("baseline", 0, moved, data) == key  # where it is stored/logged is not a setting
    assert bench.run_key("baseline", 0, {**cfg, "checkpoint": {"every_samples": 5000}}, data) == key
    assert bench.run_key("lowres", 0, cfg, data) != key
    assert bench.run_key("baseline", 1, cfg, data) != key
    assert bench.run_key("baseline", 0, {**cfg, "train": {**cfg["train"], "samples": 7}}, data) != key
    assert bench.run_key("baseline", 0, cfg, {**data, "train": {"rows": 100, "image_size": 256}}) != key


def test_load_rows_splits_finished_from_other(bench, tmp_path):
    path = tmp_path / "r.json"
    assert bench.load_rows(path, {"a"}) == ({}, [], {})
    path.write_text(json.dumps({"rows": [{"arm": "baseline", "key": "a"}, {"arm": "reclip"}],
                                "other_rows": [{"arm": "lowres", "key": "b"}]}))
    done, other, _ = bench.load_rows(path, {"a", "b", "c"})
    assert set(done) == {"a", "b"}
    assert other == [{"arm": "reclip"}]  # a row from before rows had keys: kept, never counted as done


# ------------------------------------------------------------------------------------------------ summary


def _row(arm, seed, train, image, **metrics):
    kind = arm.split("-")[0]
    return {"arm": arm, "kind": kind, "finetune": 0.1 if kind == "reclip" else 0.0, "base_image_size": 64,
            "seed": seed, "train_gflops": train, "image_gflops": image, "wall_s": 10.0 + seed, "samples_per_s": 1.0,
            **metrics}


def test_mean_half_range(bench):
    assert bench.mean_half_range([0.2, 0.4, 0.3]) == pytest.approx((0.3, 0.1))
    assert bench.mean_half_range([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in bench.mean_half_range([]))


def test_summary_savings_spread_and_targets(bench):
    sets = ["colour", "glyph"]
    metrics = bench.metric_names(sets)
    assert metrics == ["colour/top1", "glyph/top1", *bench.RETRIEVAL]
    full = dict.fromkeys(bench.RETRIEVAL, 0.5)
    rows = [
        _row("baseline", 0, 1000.0, 800.0, **{"colour/top1": 0.8, "glyph/top1": 0.10}, **full),
        _row("baseline", 1, 1000.0, 800.0, **{"colour/top1": 0.6, "glyph/top1": 0.12}, **full),
        _row("reclip-10%", 0, 150.0, 80.0, **{"colour/top1": 0.7, "glyph/top1": 0.05}, **full),
        _row("reclip-10%", 1, 150.0, 80.0, **{"colour/top1": 0.7, "glyph/top1": 0.05}, **full),
        _row("lowres", 0, 100.0, 50.0, **{"colour/top1": 0.35, "glyph/top1": 0.11},
             **dict.fromkeys(bench.RETRIEVAL, 0.2)),
    ]
    summary = {s["arm"]: s for s in bench.summarise(rows, metrics)}
    assert list(summary) == ["baseline", "reclip-10%", "lowres"]
    b, r, lo = summary["baseline"], summary["reclip-10%"], summary["lowres"]
    assert (b["seeds"], r["seeds"], lo["seeds"]) == (2, 2, 1)
    assert b["colour/top1"] == pytest.approx(0.7) and b["colour/top1_spread"] == pytest.approx(0.1)
    assert b["wall_s"] == pytest.approx(10.5) and b["wall_s_spread"] == pytest.approx(0.5)
    assert r["flops_saving"] == pytest.approx(1000 / 150) and r["image_flops_saving"] == pytest.approx(10.0)
    assert b["flops_saving"] == 1.0
    assert r["colour/top1_vs_baseline"] == pytest.approx(1.0)
    chance = {"colour/top1": 0.1, "glyph/top1": 0.1, **dict.fromkeys(bench.RETRIEVAL, 0.01)}
    t = {x["arm"]: x for x in bench.targets(list(summary.values()), chance, sets)}
    # glyph stays below 2x chance for the baseline: not a set it learned, so not held against RECLIP
    assert t["reclip-10%"]["learned_sets"] == ["colour"]
    assert t["reclip-10%"]["met"] and t["reclip-10%"]["worst_r5_kept"] == pytest.approx(1.0)
    assert not t["lowres"]["top1_ok"] and not t["lowres"]["r5_ok"] and t["lowres"]["flops_ok"]
    table = bench.markdown(list(summary.values()), chance, sets)
    for text in ("colour top-1", "glyph top-1", "i2t R@5", "t2i R@5", "| chance |", "6.67x", "10.00x",
                 "0.700 ± 0.100"):
        assert text in table, text
    assert "yes" in bench.targets_markdown(list(t.values()))


def test_flops_ratios_are_flops_py_ratios(bench):
    arms, _, args = _args(bench, "--low", "32", "--full", "112", "--finetune", "0.05,0.1", "--samples", "50000")
    cfgs = {a.name: bench.arm_config(a, 0, args) for a in arms}
    rows = [_row(name, 0, **{"train": bench.flops_of(c)["train_gflops"], "image": bench.flops_of(c)["image_gflops"]})
            for name, c in cfgs.items()]
    summary = {s["arm"]: s for s in bench.summarise(rows, [])}
    base = run_flops(cfgs["baseline"])
    for name, cfg in cfgs.items():
        f = run_flops(cfg)
        assert summary[name]["flops_saving"] == pytest.approx(base["total_train_gflops"] / f["total_train_gflops"])
        assert summary[name]["image_flops_saving"] == pytest.approx(
            base["total_image_train_gflops"] / f["total_image_train_gflops"])
    assert summary["reclip-5%"]["image_flops_saving"] > 8  # 16 vs 196 patches at 95% of the samples


def test_chance_levels_follow_the_eval_sets_label_sets(bench):
    meta = {"rows": 500, "label_sets": {"size": {"column": "label_size", "classes": ["s", "l"]},
                                        "glyph": {"column": "label_glyph", "classes": list("abcde")},
                                        "empty": {"column": "x", "classes": []}}}
    assert bench.label_sets_of(meta) == ["size", "glyph"]
    chance = bench.chance_levels(meta)
    assert chance["size/top1"] == 0.5 and chance["glyph/top1"] == 0.2
    assert chance["image_to_text_r@5"] == chance["text_to_image_r@5"] == 5 / 500
    assert chance["text_to_image_r@1"] == 1 / 500
    plain = {"rows": 10, "classes": ["x", "y", "z", "w"]}
    assert bench.label_sets_of(plain) == ["label"] and bench.chance_levels(plain)["label/top1"] == 0.25


def test_main_resumes_without_rerunning_finished_runs(bench, tmp_path, monkeypatch, capsys):
    """main() with a stand-in for training: the first call runs every planned run, an interrupted one is picked
    up, and a rerun with the same --name runs nothing."""
    calls = []

    def fake_run(arm, seed, cfg, key, args, label_sets):
        if len(calls) == 2 and not calls[-1].get("interrupted"):
            calls.append({"interrupted": True})
            raise KeyboardInterrupt
        calls.append({"arm": arm.name, "seed": seed})
        metrics = {f"eval/{args.full}px/{m}": 0.5 for m in bench.metric_names(label_sets)}
        return bench.make_row(arm, seed, key, cfg.model.vision.base_image_size, bench.flops_of(cfg),
                              {"samples": cfg.train.samples, **metrics}, 1.0, args.full, label_sets)

    monkeypatch.setattr(bench, "run_arm", fake_run)
    argv = ["--arms", "baseline,reclip", "--finetune", "0.05,0.1", "--seeds", "0,1", "--samples", "1000",
            "--synth-train", "40", "--synth-eval", "20", "--data", str(tmp_path / "data"), "--out",
            str(tmp_path / "out"), "--name", "resume"]
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    saved = json.loads((tmp_path / "results" / "resume.json").read_text())
    assert [r["arm"] for r in saved["rows"]] == ["baseline", "reclip-5%"]
    assert bench.main(argv) == 0
    ran = [(c["arm"], c["seed"]) for c in calls if "arm" in c]
    assert ran == [("baseline", 0), ("reclip-5%", 0), ("reclip-10%", 0), ("baseline", 1), ("reclip-5%", 1),
                   ("reclip-10%", 1)]
    before = len(calls)
    assert bench.main(argv) == 0
    assert len(calls) == before  # nothing left to run
    out = capsys.readouterr().out
    assert "6 of 6 runs already in" in out
    saved = json.loads((tmp_path / "results" / "resume.json").read_text())
    assert saved["label_sets"] == bench.label_sets_of(json.loads((tmp_path / "data/eval/dataset.json").read_text()))
    assert (tmp_path / "results" / "resume.csv").is_file() and (tmp_path / "results" / "resume.png").is_file()
    # other settings under the same name: the finished rows are kept aside (not summarised) and the new plan runs
    changed = list(argv)
    changed[changed.index("--samples") + 1] = "2000"
    assert bench.main(changed) == 0
    saved = json.loads((tmp_path / "results" / "resume.json").read_text())
    assert len(saved["rows"]) == 6 and len(saved["other_rows"]) == 6
    assert {r["samples"] for r in saved["rows"]} == {2000}
    assert len([c for c in calls if "arm" in c]) == 12


# ------------------------------------------------------------------------------------------------ eval splits


def test_long_finetune_arm_is_an_absolute_count_of_the_same_samples(bench):
    arms, _, args = _args(bench, "--full", "128", "--finetune", "0.05", "--long-finetune", "20000",
                          "--samples", "48000")
    assert [a.name for a in arms] == ["baseline", "reclip-5%", "reclip-ft20k", "lowres"]
    long = bench.arm_config(arms[2], 0, args)
    assert [(p.image_size, n) for p, n in zip(long.phases, long.phase_samples())] == [(32, 28000), (128, 20000)]
    assert long.phases[1].lr == 2.5e-4 and long.train.samples == 48000
    assert arms[2].finetune == pytest.approx(20000 / 48000)  # sorts among the shares
    assert bench.arm_name("reclip", 0.0, 32, 2500) == "reclip-ft2500-pos32"
    with pytest.raises(SystemExit, match="between 0 and --samples"):
        bench.plan_arms("reclip", [], [], [48000], 48000)


def test_lever_arms_drop_patches_in_the_low_phase_only_and_match_gflops(bench):
    arms, _, args = _args(bench, "--arms", "reclip", "--low", "32", "--full", "128", "--finetune", "0.05",
                          "--samples", "40000", "--batch", "64", "--low-patch-dropout", "0.5", "--equal-gflops",
                          "--losses", "clip,siglip", "--reference", "reclip-5%")
    assert [a.name for a in arms] == ["reclip-5%", "reclip-5%-pd50", "reclip-5%-pd50-eq", "reclip-5%-siglip"]
    cfgs = {a.name: bench.arm_config(a, 0, args) for a in arms}
    plain, pd, eq, sig = (cfgs[a.name] for a in arms)
    assert [p.patch_dropout for p in pd.phases] == [0.5, 0.0]  # the finetune sees every patch
    assert pd.phase_samples() == plain.phase_samples() == [38000, 2000]
    assert sig.train.loss == "siglip" and sig.model.init_logit_bias == -10 and plain.train.loss == "clip"
    # -eq: the same finetune, more low-phase samples, and as many training GFLOPs as the plain arm, counted by
    # flops.run_flops (the trainer's count) within one global batch of low-phase samples
    assert eq.phase_samples()[1] == 2000 and eq.phase_samples()[0] > 38000 and eq.train.samples == sum(eq.phase_samples())
    assert eq.phase_samples()[0] % 64 == 0
    f_plain, f_eq = run_flops(plain), run_flops(eq)
    per_batch = f_eq["phases"][0]["train_gflops"] / eq.phase_samples()[0] * 64
    assert abs(f_eq["total_train_gflops"] - f_plain["total_train_gflops"]) <= per_batch / 2
    assert run_flops(pd)["total_train_gflops"] < 0.9 * f_plain["total_train_gflops"]
    with pytest.raises(SystemExit, match="low-patch-dropout"):
        bench.plan_arms("reclip", [0.05], [], dropouts=[1.0])
    with pytest.raises(SystemExit, match="--losses"):
        bench.plan_arms("reclip", [0.05], [], losses=["hinge"])


def test_lever_targets_are_against_the_reference_arm(bench):
    sets = ["colour", "glyph"]
    metrics = bench.metric_names(sets)
    ret = dict.fromkeys(bench.RETRIEVAL, 0.5)
    rows = [_row("reclip-5%", 0, 300.0, 100.0, **{"colour/top1": 0.8, "glyph/top1": 0.1}, **ret),
            _row("reclip-5%-pd50", 0, 180.0, 50.0, **{"colour/top1": 0.79, "glyph/top1": 0.02},
                 **{**ret, "text_to_image_r@5": 0.49}),
            _row("reclip-5%-siglip", 0, 300.0, 100.0, **{"colour/top1": 0.7, "glyph/top1": 0.1}, **ret)]
    summary = bench.summarise(rows, metrics, "reclip-5%")
    chance = {"colour/top1": 0.1, "glyph/top1": 0.1, **dict.fromkeys(bench.RETRIEVAL, 0.01)}
    t = {x["arm"]: x for x in bench.lever_targets(summary, chance, sets, None, "reclip-5%")}
    assert list(t) == ["reclip-5%-pd50", "reclip-5%-siglip"]
    pd, sig = t["reclip-5%-pd50"], t["reclip-5%-siglip"]
    assert pd["flops_saving"] == pytest.approx(300 / 180) and pd["flops_ok"]
    # glyph is at chance for the reference: not held against the lever; colour 0.79/0.8 and t2i 0.49/0.5 kept
    assert set(pd["kept"]) == {"colour/top1", "image_to_text_r@5", "text_to_image_r@5"}
    assert pd["worst_kept"] == pytest.approx(0.98) and pd["met"]
    assert not sig["flops_ok"] and sig["worst_kept"] == pytest.approx(0.7 / 0.8) and not sig["met"]
    table = bench.lever_markdown(list(t.values()))
    assert "1.67x met" in table and "1.00x MISSED" in table and "87% MISSED" in table


def _split_data(root, splits=("eval_style", "eval_emoji"), rows=(100, 50)):
    """dataset.json files only: what the script reads before training (label sets, chance, fingerprint)."""
    sets = {"category": {"column": "label", "classes": list("abcdefghi")},
            "subcategory": {"column": "label_subcategory", "classes": [f"s{i}" for i in range(98)]}}
    for split, n in zip(("train", *splits), (1000, *rows)):
        (root / split).mkdir(parents=True)
        (root / split / "dataset.json").write_text(json.dumps({"rows": n, "source": "emoji:x", "label_sets": sets,
                                                                "classes": sets["category"]["classes"]}))
    return root


def test_split_metrics_names_chance_and_tables(bench, tmp_path):
    data = _split_data(tmp_path / "d")
    splits = ["eval_style", "eval_emoji"]
    sets, chance = bench.split_chance(str(data), splits)
    assert sets == ["category", "subcategory"]
    assert chance["eval_style/category/top1"] == pytest.approx(1 / 9)
    assert chance["eval_emoji/subcategory/top1"] == pytest.approx(1 / 98)
    assert chance["eval_style/image_to_text_r@5"] == pytest.approx(5 / 100)
    assert chance["eval_emoji/text_to_image_r@5"] == pytest.approx(5 / 50)  # each split's own rows
    names = bench.metric_names(sets, splits)
    assert names[:2] == ["eval_style/category/top1", "eval_style/subcategory/top1"]
    assert len(names) == 12 and names[-1] == "eval_emoji/text_to_image_r@5"
    assert bench.metric_names(sets, ["eval"]) == bench.metric_names(sets)  # the synthetic mode's names
    assert bench._label("eval_style/category/top1") == "style category top-1"
    assert bench._label("eval_emoji/image_to_text_r@5") == "emoji i2t R@5"
    assert bench._label("category/top1") == "category top-1" and bench._label("text_to_image_r@1") == "t2i R@1"
    # a split without the first split's label set: one line, naming the file and the set
    meta = json.loads((data / "eval_emoji" / "dataset.json").read_text())
    del meta["label_sets"]["subcategory"]
    (data / "eval_emoji" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match=r"eval_emoji/dataset.json: no label set 'subcategory'"):
        bench.split_chance(str(data), splits)


def test_split_targets_are_the_first_splits(bench):
    """Issue 23's targets are on the held-out style (the first split): a RECLIP arm that keeps the baseline there
    but not on the second split meets them; one that loses the first split's category does not."""
    sets, splits = ["category"], ["eval_style", "eval_emoji"]
    chance = {f"{sp}/{m}": c for sp in splits for m, c in
              (("category/top1", 1 / 9), *((r, 0.01) for r in bench.RETRIEVAL))}

    def metrics(style_cat, emoji_cat, r5=0.3):
        out = {f"eval_style/{r}": r5 for r in bench.RETRIEVAL} | {f"eval_emoji/{r}": r5 for r in bench.RETRIEVAL}
        return {**out, "eval_style/category/top1": style_cat, "eval_emoji/category/top1": emoji_cat}

    rows = [_row("baseline", 0, 1000.0, 900.0, **metrics(0.6, 0.6)),
            _row("reclip-5%", 0, 120.0, 90.0, **metrics(0.58, 0.3)),
            _row("reclip-10%", 0, 150.0, 100.0, **metrics(0.5, 0.6))]
    summary = bench.summarise(rows, bench.metric_names(sets, splits))
    t = {x["arm"]: x for x in bench.targets(summary, chance, sets, splits)}
    assert t["reclip-5%"]["met"] and t["reclip-5%"]["split"] == "eval_style"
    assert t["reclip-5%"]["kept"]["eval_style/category/top1"] == pytest.approx(0.58 / 0.6)
    assert not t["reclip-10%"]["top1_ok"]
    table = bench.markdown(summary, chance, sets, splits)
    for text in ("style category top-1", "emoji category top-1", "style i2t R@1", "emoji t2i R@5", "0.111"):
        assert text in table, text
    assert "category on eval_style" in bench.targets_markdown(list(t.values()))
    assert "emoji i2t R@5" in bench.per_run_markdown(rows, sets, splits)


def test_fingerprint_covers_every_split(bench, tmp_path):
    data = _split_data(tmp_path / "d")
    arms, _, args = _args(bench, "--data", str(data), "--eval-splits", "eval_style,eval_emoji")
    assert args.eval_splits == ["eval_style", "eval_emoji"]
    cfg = bench.arm_config(arms[0], 0, args)
    assert cfg.data.eval == f"{data}/eval_style"  # the trainer evaluates the first split at phase ends
    fp = bench.data_fingerprint(str(data), args.eval_splits)
    assert set(fp) == {"train", "eval_style", "eval_emoji"}
    key = bench.run_key("baseline", 0, cfg.to_dict(), fp)
    meta = json.loads((data / "eval_emoji" / "dataset.json").read_text())
    (data / "eval_emoji" / "dataset.json").write_text(json.dumps({**meta, "rows": 49}))
    assert bench.run_key("baseline", 0, cfg.to_dict(), bench.data_fingerprint(str(data), args.eval_splits)) != key
    assert bench.data_fingerprint(str(data)) == {"train": fp["train"], "eval": {}}  # the synthetic mode's, as before


def test_split_mode_needs_the_data_and_never_makes_it(bench, tmp_path):
    data = _split_data(tmp_path / "d", splits=("eval_style",), rows=(100,))
    with pytest.raises(SystemExit, match=r"/eval_emoji: no dataset .*emoji_data.py --out"):
        bench.main(["--data", str(data), "--eval-splits", "eval_style,eval_emoji", "--out", str(tmp_path / "o")])
    assert not (data / "eval").exists()  # no synthetic data made in its place
    with pytest.raises(SystemExit, match="distinct split names"):
        bench.main(["--data", str(data), "--eval-splits", "eval_style,eval_style", "--dry-run"])


def test_main_with_splits_saves_every_splits_metrics(bench, tmp_path, monkeypatch, capsys):
    """main() in split mode with a stand-in trainer: each row has every split's metrics, the results file says the
    splits and their chance levels, and the tables and plot are drawn."""
    data = _split_data(tmp_path / "d")

    def fake_run(arm, seed, cfg, key, args, label_sets):
        by_split = {s: {m: 0.1 * (i + 1) for m in bench.metric_names(label_sets)}
                    for i, s in enumerate(args.eval_splits)}
        return bench.make_row(arm, seed, key, cfg.model.vision.base_image_size, bench.flops_of(cfg),
                              {"samples": cfg.train.samples}, 1.0, args.full, label_sets, by_split=by_split,
                              eval_s=2.0)

    monkeypatch.setattr(bench, "run_arm", fake_run)
    assert bench.main(["--data", str(data), "--eval-splits", "eval_style,eval_emoji", "--arms", "baseline,reclip",
                       "--finetune", "0.05", "--long-finetune", "500", "--samples", "1000", "--full", "128",
                       "--out", str(tmp_path / "o"), "--name", "splits"]) == 0
    saved = json.loads((tmp_path / "results" / "splits.json").read_text())
    assert saved["eval_splits"] == ["eval_style", "eval_emoji"]
    assert [r["arm"] for r in saved["rows"]] == ["baseline", "reclip-5%", "reclip-ft500"]
    row = saved["rows"][2]
    assert row["eval_style/category/top1"] == pytest.approx(0.1) and row["eval_emoji/category/top1"] == 0.2
    assert row["finetune_samples"] == 500 and row["split_eval_s"] == 2.0
    assert saved["chance"]["eval_emoji/image_to_text_r@5"] == pytest.approx(0.1)
    assert (tmp_path / "results" / "splits.png").is_file()
    assert "emoji subcategory top-1" in capsys.readouterr().out
    assert bench.main(["--replot", "--name", "splits"]) == 0
    assert "style category top-1" in capsys.readouterr().out


def test_estimate_adds_phases_at_their_rates(bench):
    arms, _, args = _args(bench, "--full", "128", "--finetune", "0.1", "--samples", "10000")
    rates = bench.parse_rates("32=100,128=10")
    assert bench.estimate_s(bench.arm_config(arms[1], 0, args), rates, 5.0) == pytest.approx(
        9000 / 100 + 1000 / 10 + 5 * 3)
    assert bench.estimate_s(bench.arm_config(arms[0], 0, args), rates, 0.0) == pytest.approx(1000)
    with pytest.raises(SystemExit, match="no rate for 128 px"):
        bench.estimate_s(bench.arm_config(arms[0], 0, args), {32: 1.0}, 0.0)


# ------------------------------------------------------------------------------------------------ on Ray


def test_gpu_check_evidence_plans_the_textured_comparison(tmp_path):
    """`gpu_check.sh --evidence` (here its CPU sizes and --dry-run, so no Ray) hands its settings to the script: the
    arms, the sizes, and the textured data whose background set only full resolution shows."""
    import os
    import subprocess

    env = {**os.environ, "EVIDENCE_CPU": "1", "DRY_RUN": "1", "PYTHON": sys.executable,
           "EVIDENCE_DIR": str(tmp_path / "ev")}
    env.pop("OUT", None)
    script = SCRIPT.parent / "gpu_check.sh"
    done = subprocess.run(["bash", str(script), "--evidence"], env=env, capture_output=True, text=True,
                          cwd=SCRIPT.parents[1], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| baseline | 64px x 4096 |" in done.stdout
    assert "| reclip-10% | 32px x 3686 -> 64px x 410 |" in done.stdout
    assert "2000 + 500 rows of textured captioned shapes at 128 px" in done.stdout
    plain = subprocess.run(["bash", str(script), "--evidence"], env={**env, "TEXTURED": "0"}, capture_output=True,
                           text=True, cwd=SCRIPT.parents[1], timeout=120)
    assert plain.returncode == 0 and "rows of captioned shapes" in plain.stdout, plain.stderr[-2000:]
    assert not (tmp_path / "ev").exists()  # a dry run makes nothing


@pytest.mark.slow
def test_experiment_runs_then_resumes(ray_session, bench, tmp_path, synth_dir, tokenizer_path, monkeypatch, capsys):
    """The script's main() trains a RECLIP arm on Ray; a rerun trains nothing (no run_arm call, no new MLflow run);
    the table lists every label set with its chance level, and the row the GFLOPs of flops.py. One arm: a second
    run costs another worker-group start-up (~25 s), and the ratios to a baseline row are checked by the fast tests
    above (hand-made rows, flops.py, and main() with a stand-in trainer)."""
    from mlflow.tracking import MlflowClient

    from conftest import fresh_mlflow_db

    db = fresh_mlflow_db(tmp_path / "mlflow.db")
    argv = ["--arms", "reclip", "--finetune", "0.25", "--seeds", "0", "--samples", "512", "--batch", "64",
            "--low", "32", "--full", "64", "--workers", "1", "--use-gpu", "false", "--data", str(synth_dir),
            "--out", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{db}", "--name", "slow",
            "--set", f"data.tokenizer={tokenizer_path}", "--set", "model.vision.depth=2", "--set", "model.text.depth=2",
            "--set", "scaling.cpus_per_worker=0.5", "--set", "data.shuffle_buffer=128",
            "--set", "data.block_mb=0"]
    assert bench.main(argv) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("reclip_vs_baseline")
    assert len(client.search_runs([exp.experiment_id])) == 1
    saved = json.loads((tmp_path / "results" / "slow.json").read_text())
    assert [r["arm"] for r in saved["rows"]] == ["reclip-25%"]

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(bench, "run_arm", must_not_train)
    capsys.readouterr()
    assert bench.main(argv) == 0
    assert len(client.search_runs([exp.experiment_id])) == 1
    out = capsys.readouterr().out
    assert "1 of 1 runs already in" in out

    meta = json.loads((synth_dir / "eval" / "dataset.json").read_text())
    sets = bench.label_sets_of(meta)
    assert sets and saved["label_sets"] == sets
    chance_row = next(line for line in out.splitlines() if line.startswith("| chance |"))
    for name in sets:
        assert f"{name} top-1" in out
        assert f"{1 / len(meta['label_sets'][name]['classes']):.3f}" in chance_row
        assert all(0.0 <= r[f"{name}/top1"] <= 1.0 for r in saved["rows"])  # measured, not NaN
    for r in saved["rows"]:
        assert all(0.0 <= r[m] <= 1.0 for m in bench.RETRIEVAL)
    # the same schedule written out by hand, counted by flops.py
    same = ["train.samples=512", "train.batch_size=64", "model.vision.depth=2", "model.text.depth=2"]
    reclip = run_flops(load_config("tiny", same + [
        "phases=[{name: l, image_size: 32, text_length: 16, samples: 384}, "
        "{name: f, image_size: 64, text_length: 32, samples: 128}]"]))
    row = saved["rows"][0]
    assert row["train_gflops"] == pytest.approx(reclip["total_train_gflops"])
    assert row["image_gflops"] == pytest.approx(reclip["total_image_train_gflops"])
    assert row["gflops_logged"] == pytest.approx(reclip["total_train_gflops"], rel=0.01)  # what the run logged


def _section(title: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "BENCHMARKS.md").read_text()
    start = text.index(title)
    return text[start:text.index("\n## ", start + 1)]


def test_benchmarks_lever_table_is_the_saved_rows(bench):
    """BENCHMARKS' issue-25 tables are what the script prints from its saved rows (not hand-edited numbers), and the
    prose's FLOPs arithmetic is flops.run_flops's."""
    saved = json.loads((SCRIPT.parent / "results" / "emoji_levers.json").read_text())
    sets, splits, ref = saved["label_sets"], saved["eval_splits"], saved["args"]["reference"]
    summary = bench.summarise(saved["rows"], bench.metric_names(sets, splits), ref)
    section = _section("## Beyond RECLIP")
    assert bench.markdown(summary, saved["chance"], sets, splits) in section
    assert bench.lever_markdown(bench.lever_targets(summary, saved["chance"], sets, splits, ref)) in section
    assert {r["arm"] for r in saved["rows"]} == {"reclip-5%", "reclip-5%-pd50", "reclip-5%-pd50-eq",
                                                 "reclip-5%-siglip"}
    assert all(r["gflops_logged"] == pytest.approx(r["train_gflops"], rel=1e-9) for r in saved["rows"])
    # the ceiling: dropping a share of the 32 px phase's patches against reclip-5%'s GFLOPs
    argv = ["--arms", "reclip", "--finetune", "0.05", "--low", "32", "--full", "128", "--samples", "80000",
            "--batch", "128", "--set", "model.vision.base_image_size=128"]
    for rate, text in ((0.5, "(1.20x)"), (0.75, "75% would give 1.33x")):
        arms, _, args = _args(bench, *argv, "--low-patch-dropout", str(rate))
        plain, dropped = (run_flops(bench.arm_config(a, 0, args))["total_train_gflops"] for a in arms)
        assert f"{plain / dropped:.2f}x" in text and text in section
    f = run_flops(bench.arm_config(arms[0], 0, args))
    every_patch = f["total_train_gflops"] / (f["total_train_gflops"] - f["phases"][0]["image_train_gflops"])
    assert f"every patch, an upper bound, {every_patch:.2f}x" in section
