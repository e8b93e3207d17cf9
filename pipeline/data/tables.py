"""A competition's tables and image paths.

Ids are strings everywhere (`0001` stays `0001`); labels are compared as strings against the
competition's class list and turned into class indices (`target`) in one place, `load_train_table`.

CSVs are read as UTF-8 (a UTF-8 or UTF-16 byte-order mark is honoured). Anything else is refused
with the line of the first bad byte, rather than guessed as Latin-1: Latin-1 decodes every byte
sequence, so a wrong guess (cp1252, Shift-JIS) would silently misspell ids and labels, and an id
that no longer matches its image file name fails much later and more confusingly.

Image paths come from patterns (`data.image_path`, `data.test_image_path`) whose fields are `{id}`,
`{label}` and any other column of the table (`{patient}/{id}.jpeg`): `train_image_paths` and
`test_image_paths` resolve them for a list of ids. With `train_csv: null` the labelled table is
the listing of train/<class>/ for each class (`folder_table`).
"""

from __future__ import annotations

import io
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import pandas as pd
from PIL import Image

from pipeline.base.config import DataConfig, path_fields
from pipeline.base.task import class_index, targets_of
from pipeline.base.utils import PipelineError, make_command, summarize_offenders, warn


class DataError(PipelineError):
    """The competition's files are wrong; the message names the file, rows and remedy."""


Image.MAX_IMAGE_PIXELS = None
MAX_IMAGE_PIXELS = DataConfig.model_fields["max_image_pixels"].default


# --------------------------------------------------------------------------------------------
# Tables


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_csv_text(path: Path) -> str:
    """A CSV's text: UTF-8 (BOM or not) or UTF-16 with a BOM; anything else is a DataError that
    names the line of the first bad byte and says to save the file as UTF-8."""
    raw = path.read_bytes()
    if raw.startswith(UTF16_BOMS):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: starts like UTF-16 but does not decode as it ({err.reason} "
                            f"at byte {err.start}); save it as UTF-8") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        # absolute paths: the command works from wherever it is pasted
        source = Path(path).resolve()
        converted = source.with_name(source.name + ".utf8")
        here, there = shlex.quote(str(source)), shlex.quote(str(converted))
        raise DataError(f"{path}: not UTF-8 (byte {raw[err.start:err.start + 1]!r} on line "
                        f"{line}, perhaps Latin-1 or Windows-1252); save it as UTF-8, e.g. "
                        f"`iconv -f latin1 -t utf-8 {here} > {there} && mv {there} {here}`"
                        ) from None
    if "\x00" in text:
        raise DataError(f"{path}: holds NUL bytes, as UTF-16 without a byte-order mark does; "
                        f"save it as UTF-8")
    return text


def read_table(path: Path, required: Sequence[str], id_column: str) -> pd.DataFrame:
    """Read a CSV with every column as a string, checking that `required` columns exist."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        text = read_csv_text(path)
    except OSError as err:
        raise DataError(f"{path}: cannot read it: {err.strerror or err}") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; it needs a header line "
                        f"({', '.join(required)}) and one row per image")
    try:
        # dtype=str + keep_default_na=False: ids like 0001 and labels like "NA" survive unchanged.
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path}: not a valid CSV: {str(err).strip()}; fix the file (every row "
                        f"needs as many fields as the header)") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns are {list(frame.columns)}. "
                        f"Fix the CSV or the column names in the competition config.")
    frame[id_column] = frame[id_column].str.strip()
    return frame


def duplicated_ids(ids: pd.Series) -> list[str]:
    return sorted(set(ids[ids.duplicated()]))


def group_of(data: DataConfig, frame: pd.DataFrame) -> pd.Series | None:
    """The group of each row (both eyes of one patient), from a column or a regex on the id."""
    if data.group_column:
        return frame[data.group_column].astype(str)
    if data.group_pattern:
        groups = frame[data.id_column].str.extract(data.group_pattern, expand=False)
        if isinstance(groups, pd.DataFrame):  # several capture groups: the first is the group
            groups = groups.iloc[:, 0]
        unmatched = frame.loc[groups.isna(), data.id_column].tolist()
        if unmatched:
            raise DataError(f"group_pattern {data.group_pattern!r} does not match id(s) "
                            f"{summarize_offenders(unmatched)}; fix the pattern in the config.")
        return groups
    return None


def _id_regex(pattern: str) -> re.Pattern:
    """'{id}.png' -> a regex whose group `id` takes what {id} stands for in a file name (one path
    component: a file in a deeper folder than the pattern's is no row)."""
    pieces, seen_id = [], False
    for part in re.split(r"(\{id(?::[^}]*)?\})", pattern):
        if part.startswith("{id"):
            pieces.append("(?P=id)" if seen_id else "(?P<id>[^/]+)")  # {id} twice: the same id
            seen_id = True
        else:
            pieces.append(re.escape(part.replace("{{", "{").replace("}}", "}")))
    return re.compile("".join(pieces))


def _class_folders(data: DataConfig) -> tuple[Path, str]:
    """(the folder holding one sub-folder per class, the pattern below a class folder)."""
    folder = train_image_dir(data)
    parts = PurePosixPath(data.image_path).parts
    label_at = [i for i, part in enumerate(parts) if "{label}" in part]
    if (len(label_at) != 1 or parts[label_at[0]] != "{label}"
            or "{id" in "/".join(parts[:label_at[0]])):
        raise DataError(f"train_csv: null needs '{{label}}' as one whole folder of image_path, "
                        f"e.g. '{{label}}/{{id}}.png'; got {data.image_path!r}")
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (train_csv: null reads the labels from its "
                        f"sub-folders); fix data.root / data.train_images")
    parent = folder.joinpath(*parts[:label_at[0]])
    folders = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [name for name in folders if name not in data.classes]
    if unknown:
        raise DataError(f"{parent}: folder(s) {summarize_offenders(unknown)} are not in the class "
                        f"list {data.classes}; add them to `classes` in the competition config, "
                        f"or move them out of {parent}")
    return parent, "/".join(parts[label_at[0] + 1:])


def _list_classes(data: DataConfig, parent: Path, rest: str) -> list[tuple[str, str]]:
    """(id, label) of every file under parent/<class>/ that fits `rest`; warns of classes
    without a folder and of files that do not fit."""
    id_regex = _id_regex(rest)
    rows, ignored, missing_classes = [], [], []
    for label in data.classes:
        class_dir = parent / label
        if not class_dir.is_dir():
            missing_classes.append(label)
            continue
        for path in sorted(class_dir.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            match = id_regex.fullmatch(path.relative_to(class_dir).as_posix())
            if match is None:
                ignored.append(str(path.relative_to(train_image_dir(data))))
            else:
                rows.append((match["id"], label))
    if missing_classes:
        warn(f"{parent}: no folder for class(es) {summarize_offenders(missing_classes)}")
    if ignored:
        warn(f"{parent}: ignored {len(ignored)} file(s) that do not fit {data.image_path!r}: "
             f"{summarize_offenders(ignored)}")
    return rows


def folder_table(data: DataConfig) -> pd.DataFrame:
    """`train_csv: null`: the labelled rows (id, label columns as named in the config) from the
    folders of `image_path` ('{label}/{id}.png' lists train/<class>/*.png for each class).

    Raises DataError for folders that are no class, ids found under two classes and an empty
    listing; warns of classes without a folder and files that do not fit the pattern.
    """
    parent, rest = _class_folders(data)
    frame = pd.DataFrame(_list_classes(data, parent, rest),
                         columns=[data.id_column, data.label_column], dtype=object)
    collisions = frame[frame[data.id_column].duplicated(keep=False)]
    if len(collisions):
        named = [f"{i} ({', '.join(g[data.label_column])})"
                 for i, g in collisions.groupby(data.id_column, sort=True)]
        raise DataError(f"{parent}: id(s) found under several class folders: "
                        f"{summarize_offenders(named)}; an image has one label: remove the copies "
                        f"or rename them apart")
    if frame.empty:
        raise DataError(f"{parent}: no image fits {data.image_path!r} in the class folders "
                        f"{data.classes}; check data.image_path and data.train_images")
    return frame


def train_source(data: DataConfig) -> Path:
    """Where the labelled rows come from: the train CSV, or the image folder (train_csv: null)."""
    return data.root_path / data.train_csv if data.train_csv else train_image_dir(data)


def labelled_frame(data: DataConfig) -> pd.DataFrame:
    """The labelled rows as read (every column of the train CSV, or of `folder_table`), with the
    id and label stripped, and with at least one row."""
    path = train_source(data)
    if data.train_csv is None:
        frame = folder_table(data)
    else:
        required = [data.id_column, data.label_column] + \
            ([data.group_column] if data.group_column else [])
        frame = read_table(path, required, data.id_column)
    frame[data.label_column] = frame[data.label_column].astype(str).str.strip()
    if frame.empty:
        raise DataError(f"{path}: has a header but no rows: no labelled images to train on; "
                        f"add the rows (id, label) or point data.train_csv at the right file")
    return frame


def shown_label(label: str) -> str:
    """A label as a message shows it: an empty one as "" (a blank reads as nothing at all)."""
    return label if label else '""'


def load_train_table(data: DataConfig) -> pd.DataFrame:
    """The labelled rows: `id`, `label` (as spelled), `target` (class index), `group` if any.

    Raises DataError for missing columns, no rows, duplicated ids and labels outside the class
    list. The rows come from the train CSV, or the class folders when `train_csv` is null.
    """
    path = train_source(data)
    frame = labelled_frame(data)
    problems = []
    dupes = duplicated_ids(frame[data.id_column])
    if dupes:
        problems.append(f"duplicated ids: {summarize_offenders(dupes)}; each image must appear once")
    index = class_index(data.classes)
    unknown = frame.loc[~frame[data.label_column].isin(index), data.label_column]
    if len(unknown):
        rows = (unknown.index[:5] + 2).tolist()  # +2: header line and 1-based line numbers
        problems.append(
            f"labels outside the class list {data.classes}: "
            f"{summarize_offenders([shown_label(u) for u in sorted(set(unknown))])}"
            f" (lines {rows}{'...' if len(unknown) > 5 else ''}, {len(unknown)} rows); fix the rows or "
            f"add the class to `classes` in the competition config")
    if problems:
        raise DataError(f"{path}:\n  " + "\n  ".join(problems))
    table = pd.DataFrame({
        "id": frame[data.id_column].to_numpy(),
        "label": frame[data.label_column].to_numpy(),
        "target": targets_of(frame[data.label_column], data.classes),
    })
    groups = group_of(data, frame)
    if groups is not None:
        table["group"] = groups.to_numpy()
    return table


def test_source(data: DataConfig) -> Path:
    return data.root_path / (data.test_csv or data.sample_submission)


def load_test_table(data: DataConfig) -> pd.DataFrame:
    """The test CSV (or the sample submission when there is none), every column a string, with
    at least one row and no duplicated id."""
    path = test_source(data)
    frame = read_table(path, [data.id_column], data.id_column)
    if frame.empty:
        raise DataError(f"{path}: has a header but no rows: no test ids to predict")
    dupes = duplicated_ids(frame[data.id_column])
    if dupes:
        raise DataError(f"{path}: duplicated ids {summarize_offenders(dupes)}")
    return frame


def load_test_ids(data: DataConfig) -> list[str]:
    """Test ids in the order of the test CSV (or the sample submission when there is none)."""
    return load_test_table(data)[data.id_column].tolist()


# --------------------------------------------------------------------------------------------
# Paths and images


def image_paths(folder: Path, pattern: str, ids: Sequence[str]) -> list[Path]:
    """Map ids to files inside `folder` with an `{id}`-only pattern; an id that would escape it
    (`../x`, `/etc/x`) is refused. Patterns with other fields need the rows: `row_image_paths`
    (or `train_image_paths` / `test_image_paths`, which find them)."""
    others = sorted(path_fields(pattern) - {"id"})
    if others:
        raise DataError(f"image path {pattern!r} uses {others}, which ids alone do not give; "
                        f"resolve it with train_image_paths / test_image_paths")
    return row_image_paths(folder, pattern, [{"id": image_id} for image_id in ids])


def row_image_paths(folder: Path, pattern: str, rows: Sequence[Mapping[str, str]]) -> list[Path]:
    """Map rows ({'id': ..., 'label': ..., other columns}) to files inside `folder` by `pattern`.

    Refuses paths that escape the folder (`..` or a leading `/`, from the id or any other field)
    and empty field values, naming the ids.
    """
    paths, escaping, empty = [], [], []
    fields = path_fields(pattern)
    for row in rows:
        values = {name: str(row[name]) for name in fields}
        if any(value == "" for value in values.values()):
            empty.append(row["id"])
        # string checks, one path made per row: pathlib's parsing of each had taken 1 s at
        # 35,000 rows
        relative = pattern.format(**values).replace("\\", "/")
        if relative.startswith("/") or ".." in relative.split("/"):
            escaping.append(row["id"])
        paths.append(folder / relative)
    if empty:
        raise DataError(f"id(s) {summarize_offenders(empty)} have an empty value for a field of "
                        f"the image path {pattern!r}; fill it in the CSV")
    if escaping:
        raise DataError(f"id(s) {summarize_offenders(escaping)} would point outside the image folder "
                        f"{folder}; ids (and the other fields of {pattern!r}) must be plain "
                        f"names (no '..', no leading '/').")
    return paths


def _rows_for(ids: Sequence[str], table: pd.DataFrame, fields: dict[str, str],
              source: Path, *, remedy: str) -> list[dict[str, str]]:
    """The path fields of each id: {field: value}, `fields` mapping a field to its table column."""
    id_column = fields["id"]
    by_id = table.drop_duplicates(id_column).set_index(id_column, drop=False)
    unknown = [i for i in ids if i not in by_id.index]
    if unknown:
        raise DataError(f"id(s) {summarize_offenders(unknown)} are not in {source}, which the "
                        f"image path's fields are read from; {remedy}")
    columns = by_id.loc[list(ids), list(fields.values())]
    columns.columns = list(fields)
    return columns.to_dict("records")


def _field_columns(pattern: str, data: DataConfig) -> dict[str, str]:
    """{field: column}: {id} and {label} stand for the configured columns, others for themselves."""
    named = {"id": data.id_column, "label": data.label_column}
    return {name: named.get(name, name) for name in sorted(path_fields(pattern))}


def train_image_paths(data: DataConfig, ids: Sequence[str] | None = None) -> list[Path]:
    """The training image of each id (all labelled rows when `ids` is None), by `image_path`."""
    if ids is not None and path_fields(data.image_path) <= {"id"}:
        return image_paths(train_image_dir(data), data.image_path, ids)  # no table to read
    frame = labelled_frame(data)
    ids = frame[data.id_column].tolist() if ids is None else list(ids)
    fields = _field_columns(data.image_path, data)
    missing = [column for column in fields.values() if column not in frame.columns]
    if missing:
        raise DataError(f"image_path {data.image_path!r} uses column(s) {missing}, which "
                        f"{train_source(data)} lacks; its columns are {list(frame.columns)}")
    rows = _rows_for(ids, frame, fields, train_source(data),
                     remedy="the folds were made from other rows: run "
                            f"`{make_command('folds', data.name)}` again")
    return row_image_paths(train_image_dir(data), data.image_path, rows)


def test_image_paths(data: DataConfig, ids: Sequence[str] | None = None) -> list[Path]:
    """The test image of each id (all test ids when `ids` is None), by `data.test_path_pattern`.

    The test side has no labels: a pattern with {label} or another column the test CSV lacks is
    refused with the remedy (data.test_image_path).
    """
    pattern = data.test_path_pattern
    if ids is not None and path_fields(pattern) <= {"id"}:
        return image_paths(test_image_dir(data), pattern, ids)
    frame = load_test_table(data)
    ids = frame[data.id_column].tolist() if ids is None else list(ids)
    fields = _field_columns(pattern, data)
    source = test_source(data)
    others = sorted(set(fields) - {"id"})
    setting = "data.test_image_path" if data.test_image_path else \
        "data.image_path (used for the test images too)"
    if others and data.test_csv is None:
        raise DataError(f"{setting} {pattern!r} uses {others}, but test_csv is null: the test ids "
                        f"come from {source}, whose columns are predictions, not paths. Set "
                        f"data.test_image_path to the test images' layout, e.g. '{{id}}.png'")
    missing = [column for column in fields.values() if column not in frame.columns]
    if missing:
        raise DataError(f"{setting} {pattern!r} uses column(s) {missing}, which {source} lacks "
                        f"(its columns: {list(frame.columns)}); the test set has no labels. Set "
                        f"data.test_image_path to the test images' layout, e.g. '{{id}}.png'")
    rows = _rows_for(ids, frame, fields, source,
                     remedy="the predictions are of another test set: run "
                            f"`{make_command('predict', data.name, MODEL='<model>')}` again")
    return row_image_paths(test_image_dir(data), pattern, rows)


def train_image_dir(data: DataConfig) -> Path:
    return data.root_path / data.train_images


def test_image_dir(data: DataConfig) -> Path:
    return data.root_path / data.test_images
