"""Duplicate images: exact copies (the same bytes) and near copies (perceptual hashes).

    hashes = image_hashes(paths)                       # one 64-bit perceptual hash per image
    pairs = near_pairs(hashes, max_distance=4)         # (i, j) of images that look alike
    groups = group_of_pairs(len(paths), pairs)         # a group number per image (-1: alone)

When copies of one image sit on both sides of a fold split, a model that memorises them scores a
CV the leaderboard never confirms (APTOS 2019 had hundreds). `make audit` finds them and writes
audit/<competition>/duplicates.csv; `make folds` then keeps each group in one fold
(`groups_for_folds`), and the folds' fingerprint includes the groups, so new ones make the folds,
and the runs trained on them, stale by the usual rule.

The hash: a perceptual hash (imagehash's `phash`, the DCT of a 32x32 grey image, 64 bits) of
every image, after an exact-bytes pass (the SHA-256 of base/fingerprints.py's `sha256_file`, the
one file hasher). Groups are scipy's connected components of the graph of pairs. Near copies are pairs within `max_distance`
bits (Hamming). Chosen by measurement on planted copies (shifted by a pixel, re-encoded as JPEG,
brightened) among distractors: bench/duplicates.py, recorded in bench/BENCHMARKS.md.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from pipeline.base.utils import summarize_offenders
from pipeline.data.images import ImageReadError, read_image_bytes
from pipeline.data.tables import MAX_IMAGE_PIXELS

# kind -> imagehash's function; imagehash and scipy (~0.6 s) are imported where an image is
# hashed or groups are found: every stage that reads the audit's duplicates.csv imports this module
HASHES = {"phash": "phash", "dhash": "dhash", "ahash": "average_hash", "whash": "whash"}
BLOCK = 256  # rows of the pairwise distances at a time: 256 x N uint64 (70 MB for 35k images)
# Images of one group drawn in a picture (the report shows as many): a group of 1,000 copies
# is one row of GROUP_IMAGES and "+994 more", not a figure 150,000 px wide.
GROUP_IMAGES = 6


def progress(items, total: int, desc: str, unit: str = "img"):
    """A progress bar over long work (every second at most); gone when the work is done."""
    return tqdm(items, total=total, desc=desc, unit=unit, leave=False, mininterval=1.0)


def perceptual_hash(path: Path, kind: str = "phash",
                    max_pixels: int = MAX_IMAGE_PIXELS) -> np.uint64:
    """A 64-bit perceptual hash of an image, read by the pipeline's reader (a missing or
    truncated file, or one over the pixel budget, is an ImageReadError that names it)."""
    import imagehash

    raw = read_image_bytes(path, max_pixels)
    try:
        with Image.open(io.BytesIO(raw)) as image:
            bits = getattr(imagehash, HASHES[kind])(image.convert("RGB")).hash.flatten()
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise ImageReadError(f"cannot decode image {path}: {err}; replace it, or set "
                             f"data.drop_bad_images=true to leave it out") from None
    return np.uint64(int("".join("1" if b else "0" for b in bits), 2))


def image_hashes(paths: Sequence[Path], kind: str = "phash", workers: int = 4,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """(N,) uint64 perceptual hashes, computed in threads (PIL releases the GIL as it decodes)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        hashes = pool.map(lambda p: perceptual_hash(p, kind, max_pixels), paths)
        return np.array(list(progress(hashes, len(paths), f"{kind} of each image")),
                        dtype=np.uint64)


def near_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """(P, 2) index pairs i < j whose hashes differ in at most `max_distance` bits."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    found = []
    starts = range(0, len(hashes), BLOCK)
    for start in progress(starts, len(starts), f"pairs within {max_distance} bits", "block"):
        block = hashes[start:start + BLOCK]
        distance = np.bitwise_count(block[:, None] ^ hashes[None, :])  # (B, N) bits that differ
        rows, cols = np.nonzero(distance <= max_distance)
        rows = rows + start
        keep = rows < cols
        found.append(np.stack([rows[keep], cols[keep]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def exact_pairs(digests: Sequence[str]) -> np.ndarray:
    """(P, 2) index pairs of images with the same bytes."""
    by_digest: dict[str, list[int]] = {}
    for index, digest in enumerate(digests):
        by_digest.setdefault(digest, []).append(index)
    pairs = [(group[0], other) for group in by_digest.values() for other in group[1:]]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def group_of_pairs(n: int, pairs: np.ndarray) -> np.ndarray:
    """(n,) group numbers: images joined by `pairs`, directly or through others, share one
    (scipy's connected components); -1 for an image that has no copy. Groups are numbered 0, 1,
    ... in the order of their first image, so the numbers (duplicates.csv, the folds' `dup<k>`
    groups and their fingerprint) do not depend on how the components are found."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])),
                       shape=(n, n))
    count, component = connected_components(graph, directed=False)
    first_image = np.full(count, n)
    np.minimum.at(first_image, component, np.arange(n))
    shared = np.flatnonzero(np.bincount(component, minlength=count) > 1)  # of two images or more
    number = np.full(count, -1, dtype=np.int64)
    number[shared[np.argsort(first_image[shared])]] = np.arange(len(shared))
    return number[component]


def duplicate_table(ids: Sequence[str], parts: Sequence[str], labels: Sequence[str],
                    groups: np.ndarray, *, how: Sequence[str]) -> pd.DataFrame:
    """The rows in a group of two or more: group, part (train/test), id, label ('' for test),
    how the group was found (exact, near)."""
    frame = pd.DataFrame({"group": groups, "part": list(parts), "id": list(ids),
                          "label": list(labels), "found": list(how)})
    return frame[frame["group"] >= 0].sort_values(["group", "part", "id"], kind="stable")


def conflicts(table: pd.DataFrame) -> pd.DataFrame:
    """The groups whose labelled rows disagree: group -> the labels, for the report."""
    labelled = table[table["part"] == "train"]
    if labelled.empty:
        return pd.DataFrame({"group": [], "labels": []})
    by_group = labelled.groupby("group")["label"].agg(lambda labels: sorted(set(labels)))
    return by_group[by_group.map(len) > 1].rename("labels").reset_index()


def groups_for_folds(table: pd.DataFrame, ids: Sequence[str]) -> pd.Series:
    """For the labelled `ids`: the duplicate group each is in ('dup<k>'), '' for none."""
    labelled = table[table["part"] == "train"].set_index("id")["group"]
    return pd.Series([f"dup{labelled[i]}" if i in labelled.index else "" for i in ids],
                     index=list(ids), dtype=object)


def describe_conflicts(found: pd.DataFrame, table: pd.DataFrame) -> str:
    """'group 3 (0012, 0100: cat, dog), ...' for a message."""
    items = []
    for row in found.itertuples():
        members = table[(table["group"] == row.group) & (table["part"] == "train")]["id"]
        items.append(f"group {row.group} ({', '.join(members)}: {', '.join(row.labels)})")
    return summarize_offenders(items)


def merged_groups(ids: Sequence[str], *groupings: Sequence[str]) -> pd.Series:
    """One group per row such that rows sharing a value in any of `groupings` (a patient, a
    duplicate group; '' for none) share it: connected components, named by their first id."""
    ids = list(ids)
    index = {image_id: i for i, image_id in enumerate(ids)}
    pairs = []
    for grouping in groupings:
        first: dict[str, int] = {}
        for i, value in enumerate(grouping):
            if value == "":
                continue
            if value in first:
                pairs.append((first[value], i))
            else:
                first[value] = i
    groups = group_of_pairs(len(ids), np.array(pairs, dtype=np.int64).reshape(-1, 2))
    names: dict[int, str] = {}
    for i, group in enumerate(groups):
        names.setdefault(int(group), ids[i])
    return pd.Series([ids[i] if g < 0 else names[int(g)] for i, g in enumerate(groups)],
                     index=[index[i] for i in ids], dtype=object)


def read_duplicates(path: Path) -> pd.DataFrame | None:
    """audit/<competition>/duplicates.csv as `make audit` wrote it, or None without one."""
    if not Path(path).is_file():
        return None
    return pd.read_csv(path, dtype={"id": str, "label": str, "part": str, "found": str},
                       keep_default_na=False)
