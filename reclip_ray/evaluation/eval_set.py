"""What an eval set holds, read without a model: its label sets, its columns, a ``--classes`` file; and the checks
``train`` runs before Ray starts, so that a bad eval set fails in seconds rather than at the first phase end.

A label set is ``{column, classes, templates, source}``: the column holding each row's class index, the class
names, the prompt templates, and where the names came from (named in errors). Zero-shot scores one per set.
"""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from reclip_ray.errors import DataError, ReclipError

if TYPE_CHECKING:
    from reclip_ray.data.schema import ColumnMap

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def class_prompt(template: str, classname: str) -> str:
    """A zero-shot prompt: ``classname`` put in the template's ``{}`` (open_clip's spelling) or ``{c}``
    (CLIP_benchmark's), or after a template that has neither ("a photo of a" -> "a photo of a circle", as
    templates written for that have always been read); ``check_templates`` has refused any other field."""
    if "{" not in template:
        return f"{template} {classname}"
    return template.format(classname, c=classname)


def check_templates(templates: Sequence[str], where: str) -> None:
    """Fail in one line on a template that ``str.format`` cannot fill with the class name alone (``{1}``,
    ``{cls}``, a lone brace): it would fail in the middle of an evaluation."""
    for template in templates:
        try:
            class_prompt(template, "A")
        except (IndexError, KeyError, ValueError) as exc:
            raise ReclipError(f"{where}: zero-shot template {template!r} takes the class name only as {{}} or {{c}} "
                              f"({type(exc).__name__}: {exc})") from None


def label_sets(meta: dict, names: Sequence[str], columns: ColumnMap, classes_override: dict | None,
               class_labels: dict[str, list[str]] | None = None, *, meta_path: str = "dataset.json",
               file: str = "the shard") -> dict[str, dict]:
    """{set name: {column, classes, templates, source}} from, first found: a --classes file (the main label),
    dataset.json's ``label_sets`` or ``classes``, the ClassLabel columns of a Hugging Face ``datasets`` export
    (``class_labels``, ``schema.class_label_sets``).

    A set's ``column`` is the shard column ``columns.source`` maps it to (``schema.ColumnMap``: ``label`` stands for
    the label column, ``data.label_column``), in every check here and in the reader. A ClassLabel column is named
    as dataset.json would name it: the label column is the set ``label``; any other is a set named after its column
    (CIFAR-100's ``fine_label`` and ``coarse_label``). A column whose name would read another column (one literally
    named ``label`` that is not the label column) is left out.

    Classes in dataset.json (``meta_path``) whose column ``file`` (a shard, whose columns are ``names``) lacks are a
    one-line error: dropped, a set whose labels are in ``cls`` (CLIP_benchmark's name) scored no zero-shot at all,
    and said nothing."""
    if classes_override is not None:
        return {"label": {"column": "label", **classes_override, "source": "the classes file"}}
    sets = _label_sets(meta, names, columns, class_labels, meta_path, file)
    for name, spec in sets.items():
        check_templates(spec["templates"], f"dataset.json (label set {name!r})")  # every set's come from there
    return sets


def _label_sets(meta: dict, names: Sequence[str], columns: ColumnMap, class_labels: dict[str, list[str]] | None,
                meta_path: str, file: str) -> dict[str, dict]:
    """``label_sets`` without a classes file: dataset.json's sets, else the ClassLabel columns."""
    sets: dict[str, dict] = {}
    if not isinstance(meta.get("label_sets"), dict) and not meta.get("classes"):
        for column, classes in (class_labels or {}).items():
            name = "label" if column == columns.label else column
            if column in names and columns.source(name) == column:
                sets[name] = {"column": name, "classes": classes, "templates": meta.get("templates", []),
                              "source": "the 'huggingface' metadata"}
        return dict(sorted(sets.items(), key=lambda kv: kv[0] != "label"))
    if isinstance(meta.get("label_sets"), dict):
        for name, spec in meta["label_sets"].items():
            column = spec.get("column", "label")
            if not spec.get("classes"):
                continue
            if columns.source(column) not in names:
                raise DataError(_missing_label_column(meta_path, f"label set {name!r}", column, columns.label,
                                                      names, file))
            sets[name] = {"column": column, "classes": spec["classes"], "templates": spec.get("templates", []),
                          "source": "dataset.json"}
    elif meta.get("classes"):
        if columns.source("label") not in names:
            raise DataError(_missing_label_column(meta_path, "'classes'", "label", columns.label, names, file))
        sets["label"] = {"column": "label", "classes": meta["classes"], "templates": meta.get("templates", []),
                         "source": "dataset.json"}
    return sets


# Column names other tools give the class index, most likely first: the candidates a missing label column suggests
# (CLIP_benchmark's webdataset ``cls``, torchvision's and timm's ``target``, Hugging Face's ``label``/``labels``).
LABEL_NAMES = ("label", "cls", "labels", "target", "class", "class_id", "class_idx", "category", "category_id", "y")


def _missing_label_column(meta_path: str, entry: str, column: str, label_column: str, names: Sequence[str],
                          file: str) -> str:
    """One line for dataset.json classes (``entry``: "'classes'" or "label set 'NAME'") on a ``column`` the shard
    lacks: the label column (``column`` 'label') is named by a flag or config key, which the hint gives; another by
    the set's own ``column`` in dataset.json. With no column to suggest, the set may have no labels at all (a
    captions-only set whose dataset.json kept the classes of the set it was copied from, which ran retrieval and
    said nothing before): the hint then also says to delete the entry."""
    from reclip_ray.data.schema import column_hint

    what = "its 'classes' are" if entry == "'classes'" else f"{entry} is"
    if column == "label":
        candidates = [n for n in LABEL_NAMES if n in names and n != label_column]
        hint = column_hint("label", candidates)
        if not candidates:
            hint += f", or, for a set without labels, delete {entry} from dataset.json"
        where = f"the label column {label_column!r}"
    else:
        hint = "add the column, or correct the set's 'column'"
        where = f"column {column!r}"
    return f"{meta_path}: {what} for {where}, which {file} lacks; columns are {sorted(names)} ({hint})"


def check_eval_set(path: str, columns: Any, image_sizes: list[int], patch_size: int) -> dict[str, Any]:
    """Checks of an eval set that need no model and no Ray, so ``train`` fails in seconds, not after a phase.

    Fails (one-line ReclipError / DataError) on: an eval image size that is not a multiple of the patch size, a
    shard without an image column (captions are optional: classification-only sets), no rows at all, a null
    label or one outside the classes of a label set in dataset.json, classes in dataset.json for a column the shards
    lack, and a set with neither captions nor labels. Reads Parquet footers, the label columns and at most the
    caption column, never the images. Returns ``{"rows", "files", "label_sets": {name: classes}, "has_captions"}``;
    a class named twice is a warning (``warn_duplicate_classes``), shown before training starts.
    """
    from reclip_ray.data.local import check_columns, read_shard
    from reclip_ray.data.schema import ColumnMap, count_rows, parquet_schema
    from reclip_ray.data.shards import list_parquet_files

    columns = columns or ColumnMap()
    for size in image_sizes:
        if int(size) % int(patch_size):
            raise ReclipError(f"eval image size {size} is not a multiple of the model's patch size {patch_size}")
    files = list_parquet_files(str(path))
    check_columns(files, columns, require_caption=False)
    rows = count_rows(files)
    if rows == 0:
        raise DataError(f"{path}: no rows to evaluate in its {len(files)} Parquet file(s)")

    sets = find_label_sets(path, files, columns, None)
    check_label_values(files, sets, columns)
    warn_duplicate_classes(path, sets)
    has_captions = False
    for file in files:
        if columns.caption in parquet_schema(file).names:
            captions = read_shard(file, [columns.caption]).column(columns.caption).to_pylist()
            if any(c is not None and str(c).strip() for c in captions):
                has_captions = True
                break
    if not sets and not has_captions:
        raise DataError(f"{path}: nothing to evaluate: no captions and no label set (dataset.json 'classes' or "
                        "'label_sets', or ClassLabel columns of Hugging Face datasets)")
    return {"rows": rows, "files": len(files), "label_sets": {n: len(s["classes"]) for n, s in sets.items()},
            "has_captions": has_captions}


def find_label_sets(data: str, files: Sequence[str], columns: Any, classes: dict | None) -> dict[str, dict]:
    """The label sets of the eval set ``data`` (its Parquet ``files``): ``label_sets`` of its first shard's columns,
    its dataset.json and its ClassLabel metadata, or the one set of ``classes`` (a --classes file's), which needs
    the label column. What every evaluation and check of an eval set scores."""
    from reclip_ray.data.schema import class_label_sets, dataset_json_path, parquet_schema, read_dataset_json

    names = parquet_schema(files[0]).names
    if classes is not None and columns.source("label") not in names:
        raise ReclipError(f"{data}: --classes given but the dataset has no label column {columns.label!r}")
    return label_sets(read_dataset_json(data), names, columns, classes, class_label_sets(files),
                      meta_path=dataset_json_path(data), file=files[0])


def check_label_values(files: Sequence[str], sets: dict[str, dict], columns: ColumnMap) -> None:
    """Every shard has each set's column, and its every label is a class index of the set (``_check_labels``).
    Reads the label columns only, so a bad label fails in seconds: the launch's check runs it, and ``reclip-ray
    eval`` before it encodes any image (it found one only after encoding the whole set)."""
    from reclip_ray.data.local import read_shard
    from reclip_ray.data.schema import parquet_schema

    source = {name: columns.source(spec["column"]) for name, spec in sets.items()}
    wanted = sorted(set(source.values()))
    if not wanted:
        return
    for file in files:
        names = parquet_schema(file).names
        for column in wanted:
            if column not in names:
                raise DataError(f"{file}: missing label column {column!r}; columns are {sorted(names)}")
        table = read_shard(file, wanted)
        for name, spec in sets.items():
            _check_labels(file, source[name], name, spec, table.column(source[name]))


_WARNED: set[tuple[str, str, tuple[str, ...]]] = set()  # (eval set, label set, names): warned in this process


def warn_duplicate_classes(data: str, sets: dict[str, dict]) -> None:
    """One line on stderr per label set that names a class twice, once per eval set in a process (a training run
    evaluates at every phase end and size). Both names give one prompt, so they tie on every image, and a tie
    counts against the model (``metrics``): their images are never top-1 hits. The rule stays (open_clip's ImageNet
    list has 'missile' and 'sunglasses' twice, and CLIP_benchmark scores it as it is); the user learns why."""
    for name, spec in sets.items():
        where: dict[str, list[int]] = {}
        for i, c in enumerate(spec["classes"]):
            where.setdefault(str(c), []).append(i)
        twins = {c: ids for c, ids in where.items() if len(ids) > 1}
        key = (str(data), name, tuple(twins))
        if not twins or key in _WARNED:
            continue
        _WARNED.add(key)
        listed = ", ".join(f"{c!r} (classes {', '.join(map(str, ids))})" for c, ids in twins.items())
        print(f"[reclip] WARNING: {data}: label set {name!r} names {listed} more than once; their prompts tie and a "
              f"tie counts against the model, so their images are never top-1 hits", file=sys.stderr, flush=True)


def class_index(value: Any) -> int | None:
    """A label cell as a class index: an int, or a float or string that holds one exactly; None for anything
    else (a class name, 2.5, NaN), which ``int`` would raise on deep in an evaluation or truncate to a wrong class."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def not_an_index(value: Any, file: str, where: str, classes: Sequence[str] = ()) -> str:
    """The one-line error for a label that ``class_index`` refuses; ``where``: its column and key or label set."""
    value = value.item() if isinstance(value, np.generic) else value
    hint = (f" ({value!r} is a class name: write its index, {list(classes).index(value)})"
            if isinstance(value, str) and value in classes else "")
    return f"{file}: label {value!r} {where} is not a class index (an integer into the label set's classes){hint}"


def _check_labels(file: str, column: str, set_name: str, spec: dict, values: Any) -> None:
    """Raise naming the file, column and label set when a label is null, not a class index or outside
    ``range(n_classes)``."""
    import pyarrow as pa

    n_classes = len(spec["classes"])
    if values.null_count:
        raise DataError(f"{file}: null label in column {column!r} (label set {set_name!r})")
    if pa.types.is_integer(values.type):
        y = np.asarray(values.to_numpy(), dtype=np.int64)
    else:
        cells = values.to_pylist()
        y = [class_index(v) for v in cells]
        if None in y:
            raise DataError(not_an_index(cells[y.index(None)], file, f"in column {column!r} (label set {set_name!r})",
                                         spec["classes"]))
        y = np.asarray(y, dtype=np.int64)
    bad = y[(y < 0) | (y >= n_classes)]
    if bad.size:
        raise DataError(outside_classes(file, int(bad[0]), column, set_name, spec))


def outside_classes(where: str, label: int, column: str, set_name: str, spec: dict) -> str:
    """The one-line error for a label outside its set's classes, with the hint its source suggests (``reclip-ray
    eval`` blamed a classes file for an unlabelled Hugging Face split it had been given no classes file for)."""
    hint = " (classes file does not match the dataset?)" if spec["source"] == "the classes file" else ""
    if label == -1 and "huggingface" in spec["source"]:
        hint = " (-1 is how datasets marks a missing label: an unlabelled split?)"
    return (f"{where}: label {label} in column {column!r} is outside the {len(spec['classes'])} classes of label set "
            f"{set_name!r} in {spec['source']}{hint}")


def eval_columns(data: str, configured: Any) -> Any:
    """The training config's column names, falling back to the canonical ones the eval shards actually have.

    Training shards are often img2dataset's (``jpg``/``txt``) while the eval set is a canonical one (``image``/
    ``caption``); the CLI, the pre-Ray check and the phase-end evaluation should all read it with these columns.
    """
    from reclip_ray.data.schema import ColumnMap, parquet_schema
    from reclip_ray.data.shards import list_parquet_files

    names = parquet_schema(list_parquet_files(data)[0]).names
    canonical = ColumnMap()
    picked = {}
    for field in ("image", "caption", "label", "key"):
        mine = getattr(configured, field)
        picked[field] = mine if mine in names or getattr(canonical, field) not in names else getattr(canonical, field)
    return ColumnMap(**picked)


def read_classes(path: str, meta: dict) -> dict:
    """A ``--classes`` file as a label set's ``{classes, templates}``: a JSON list of class names (templates from
    dataset.json, else the default) or ``{"classes": [...], "templates": [...]}``; one-line errors otherwise."""
    from reclip_ray import storage

    p = str(path)
    try:
        raw = json.loads(storage.read_text(p))
    except FileNotFoundError:
        raise ReclipError(f"classes file not found: {p}") from None
    except ValueError as exc:
        raise ReclipError(f"{p}: not valid JSON ({exc})") from None
    if isinstance(raw, list):
        raw = {"classes": raw, "templates": meta.get("templates") or list(DEFAULT_TEMPLATES)}
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), list) or not raw["classes"]:
        raise ReclipError(f"{p}: expected a JSON list of class names or {{\"classes\": [...], \"templates\": [...]}}")
    templates = [str(t) for t in raw.get("templates") or meta.get("templates") or DEFAULT_TEMPLATES]
    check_templates(templates, p if raw.get("templates") else f"{p} (templates from dataset.json)")
    return {"classes": [str(c) for c in raw["classes"]], "templates": templates}
