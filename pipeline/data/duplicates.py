"""Duplicate images: exact copies (the same bytes) and near copies (aligned thumbnails).

    thumbs = thumbnails(paths)                         # (N, S, S) grey thumbnails
    found = near_pairs(thumbs)                         # pairs that look alike, and the cut used
    groups = group_of_pairs(len(paths), found.pairs)   # a group number per image (-1: alone)

When copies of one image sit on both sides of a fold split, a model that memorises them scores a
CV the leaderboard never confirms (APTOS 2019 had hundreds). `make folds` finds them itself
(the same finding as `make audit`: audit/<competition>/duplicates.csv) and keeps each group in
one fold (`groups_for_folds`); the folds' fingerprint includes the groups, so new ones make the
folds, and the runs trained on them, stale by the usual rule.

How near copies are found (issue 27; measured on a suite of contents, sizes and kinds of copy:
bench/duplicates.py, recorded in bench/BENCHMARKS.md):
- every image becomes a grey THUMBNAIL x THUMBNAIL thumbnail, lightly blurred; a pair's score
  is the normalised cross-correlation of the two at the best of the small shifts up to
  MAX_SHIFT (brightness and contrast cancel, a shifted, cropped, rotated or rescaled copy still
  lines up), in two views (VIEWS): the thumbnail, and its detail without the smooth layout
  that a competition's images may share;
- only candidate pairs are scored: each image's NEIGHBOURS nearest images in two indexes
  (scikit-learn's nearest neighbours: the coarse layout, and the spectrum of the fine detail,
  which a shift leaves alone), so the scoring grows linearly; the search itself is brute force
  (quadratic, but in 32 dimensions: 547 s at 35,000 images);
- the cut comes from the competition's own images, not a constant: the same search run against
  the mirrored images (pairs known to be distinct, with the competition's own sizes, content
  and noise) says how alike distinct images get here; the cut lets through at most
  FALSE_PAIR_RATE of them, in each view;
- a group is not built by chaining alone: a group of copies is a star (an original near each of
  its copies), and a group without such a centre is cut into stars (`split_chains`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.base.utils import summarize_offenders
from pipeline.data.images import read_image
from pipeline.data.tables import MAX_IMAGE_PIXELS

# names the detector and its constants in the finding's fingerprint: a new one finds again
DETECTOR = "aligned thumbnails and detail 32 px, shifts 3, mirror tail cut 1e-5, stars"
THUMBNAIL = 32  # px: the side of the grey thumbnails compared
BLUR = 0.7  # px of the thumbnail: a Gaussian that forgives JPEG blocks and noise
MAX_SHIFT = 3  # px of the thumbnail (a tenth of it): the alignments tried for each pair
NEIGHBOURS = 16  # candidates per image in each index: more than a group of copies holds
SEARCH_DIMS = 32  # principal components the nearest-neighbour search runs in
FALSE_PAIR_RATE = 1e-5  # distinct pairs let through by the cut (1 in 100,000)
TAIL = 50  # the most alike mirrored pairs whose tail the cut extends
BLOCK = 8192  # candidate pairs scored at a time (memory: BLOCK x THUMBNAIL^2 floats, a few)
# Images of one group drawn in a picture (the report shows as many): a group of 1,000 copies
# is one row of GROUP_IMAGES and "+994 more", not a figure 150,000 px wide.
GROUP_IMAGES = 6


def progress(items, total: int, desc: str, unit: str = "img"):
    """A progress bar over long work (every second at most); gone when the work is done."""
    return tqdm(items, total=total, desc=desc, unit=unit, leave=False, mininterval=1.0)


# --------------------------------------------------------------------------------------------
# Thumbnails


def thumbnail(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """(THUMBNAIL, THUMBNAIL) float32 grey thumbnail of an image, read by the pipeline's reader
    (a missing, truncated or undecodable file, or one over the pixel budget, is an
    ImageReadError that names it; a large JPEG is decoded at a fraction of its size)."""
    return thumbnail_of(read_image(path, min_side=THUMBNAIL, max_pixels=max_pixels))


def thumbnail_of(rgb: np.ndarray) -> np.ndarray:
    """The thumbnail of an RGB uint8 image (H, W, 3)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    small = cv2.resize(grey, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(small, (0, 0), BLUR)


def thumbnails(paths: Sequence[Path], workers: int = 4,
               max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """(N, THUMBNAIL, THUMBNAIL) thumbnails, read in threads (OpenCV releases the GIL)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = pool.map(lambda path: thumbnail(path, max_pixels), paths)
        found = list(progress(done, len(paths), "thumbnails of the images"))
    return np.stack(found) if found else np.zeros((0, THUMBNAIL, THUMBNAIL), np.float32)


def _standardised(rows: np.ndarray) -> np.ndarray:
    """Each row with zero mean and unit length: a dot product of two is their correlation."""
    rows = rows - rows.mean(axis=-1, keepdims=True)
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-6)


# --------------------------------------------------------------------------------------------
# Candidates and scores


def detail_of(thumbs: np.ndarray) -> np.ndarray:
    """The thumbnails without their smooth layout (a Gaussian of 2 px taken out): where a
    competition's images share one layout (a retina's disc, a digit's stroke in the middle),
    the detail is what tells one image from another."""
    return np.stack([t - cv2.GaussianBlur(t, (0, 0), 2.0) for t in thumbs])


def _layout_features(thumbs: np.ndarray) -> np.ndarray:
    """The coarse layout (8 x 8): near for copies whose pixels barely moved."""
    small = np.stack([cv2.resize(t, (8, 8), interpolation=cv2.INTER_AREA) for t in thumbs])
    return _standardised(small.reshape(len(thumbs), -1))


def _detail_spectrum(thumbs: np.ndarray) -> np.ndarray:
    """The magnitude spectrum of the fine detail, its lower frequencies: a shift moves the
    detail, not its spectrum, and the shared layout of a competition's images (a retina's disc)
    is taken out first."""
    spectrum = np.log1p(np.abs(np.fft.rfft2(detail_of(thumbs))))
    low = np.concatenate([spectrum[:, :8, :8], spectrum[:, -7:, :8]], axis=1)
    return _standardised(low.reshape(len(thumbs), -1))


def _neighbours(queries: np.ndarray, index: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) the k nearest rows of `index` for each query, in at most SEARCH_DIMS principal
    components (fitted on a sample of the index). scikit-learn searches these dimensions by
    brute force: Q x len(index) distances, the one step of the pass that grows with the square
    (most of its 547 s at 35,000 images, bench/BENCHMARKS.md)."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    if index.shape[1] > SEARCH_DIMS and len(index) > SEARCH_DIMS:
        sample = np.random.default_rng(0).permutation(len(index))[:5000]
        pca = PCA(SEARCH_DIMS, random_state=0).fit(index[sample])
        queries, index = pca.transform(queries), pca.transform(index)
    k = min(k, len(index))
    return NearestNeighbors(n_neighbors=k).fit(index).kneighbors(queries, return_distance=False)


def candidate_pairs(thumbs: np.ndarray, others: np.ndarray | None = None) -> np.ndarray:
    """(P, 2) pairs (i, j) worth scoring: j among the NEIGHBOURS nearest of i in either index.
    Within one set: i < j, each pair once; against `others` (the mirrored images): (i, j) with
    j an index into `others`, never i's own mirror (searched as the pairs within are, so that
    the cut and the pairs it judges come from the same search)."""
    within = others is None
    others = thumbs if within else others
    found = []
    for features in (_layout_features, _detail_spectrum):
        near = _neighbours(features(thumbs), features(others), NEIGHBOURS + 1)
        rows = np.repeat(np.arange(len(thumbs)), near.shape[1])
        found.append(np.stack([rows, near.reshape(-1)], axis=1))
    pairs = np.concatenate(found)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    if within:
        pairs = np.sort(pairs, axis=1)
    return np.unique(pairs, axis=0)


def aligned_scores(thumbs: np.ndarray, pairs: np.ndarray,
                   others: np.ndarray | None = None) -> np.ndarray:
    """(P,) for each pair (i, j): the best normalised correlation of i's centre (the thumbnail
    less MAX_SHIFT px on each side) with j's window of the same size at every shift up to
    MAX_SHIFT. All shifts of a pair at once, as a cross-correlation by FFT of spectra computed
    once per image, divided by each window's own spread (from integral images)."""
    others = thumbs if others is None else others
    centres, spectra = _centre_spectra(thumbs), np.fft.rfft2(others)
    spread = _window_spread(others)
    scores = np.empty(len(pairs), np.float32)
    for start in range(0, len(pairs), BLOCK):
        i, j = pairs[start:start + BLOCK, 0], pairs[start:start + BLOCK, 1]
        correlation = np.fft.irfft2(centres[i] * spectra[j], s=thumbs.shape[1:])
        valid = correlation[:, :2 * MAX_SHIFT + 1, :2 * MAX_SHIFT + 1] / spread[j]
        scores[start:start + BLOCK] = valid.reshape(len(i), -1).max(axis=1)
    return np.clip(scores, -1.0, 1.0)


def _centre_spectra(thumbs: np.ndarray) -> np.ndarray:
    """The conjugate spectra of each thumbnail's centre, standardised, at the top left of a
    zero thumbnail: multiplied by another's spectrum, the cross-correlation at every shift."""
    m, side = MAX_SHIFT, thumbs.shape[1]
    inner = side - 2 * m
    centres = _standardised(thumbs[:, m:side - m, m:side - m].reshape(len(thumbs), -1))
    padded = np.zeros_like(thumbs)
    padded[:, :inner, :inner] = centres.reshape(len(thumbs), inner, inner)
    return np.conj(np.fft.rfft2(padded))


def _window_spread(thumbs: np.ndarray) -> np.ndarray:
    """(N, 2 MAX_SHIFT + 1, 2 MAX_SHIFT + 1) the root of the summed squared deviations of each
    window a centre is compared with (its norm once its mean is taken out)."""
    shifts, inner = 2 * MAX_SHIFT + 1, thumbs.shape[1] - 2 * MAX_SHIFT

    def window_sums(values: np.ndarray) -> np.ndarray:
        total = np.pad(values.astype(np.float64), ((0, 0), (1, 0), (1, 0))).cumsum(1).cumsum(2)
        y, x = np.arange(shifts)[:, None], np.arange(shifts)[None, :]
        return (total[:, y + inner, x + inner] - total[:, y, x + inner]
                - total[:, y + inner, x] + total[:, y, x])

    first, second = window_sums(thumbs), window_sums(thumbs ** 2)
    return np.sqrt(np.maximum(second - first ** 2 / inner ** 2, 1e-6)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The cut, from the competition's own distinct pairs


def adaptive_cut(thumbs: np.ndarray) -> float:
    """The score above which a pair is taken for a copy. The images against their mirror
    images (distinct by construction, alike in size, content and noise) give how alike
    distinct images get here; the cut is where FALSE_PAIR_RATE of the N x (N - 1) mirrored
    pairs would lie above it. A few hundred images have too few pairs to see that far: the
    tail of the most alike TAIL mirrored pairs is extended (exponential in Fisher's z, the
    usual peaks-over-threshold model), which for many images comes out at the same place as
    the rank."""
    mirrored = thumbs[:, :, ::-1].copy()
    pairs = candidate_pairs(thumbs, mirrored)
    scores = np.sort(aligned_scores(thumbs, pairs, mirrored))[::-1]
    if len(scores) < 2:
        return 1.0
    n_pairs = len(thumbs) * (len(thumbs) - 1)  # every (image, another's mirror)
    z = np.arctanh(np.clip(scores[:TAIL], -0.999999, 0.999999))
    threshold, excess = z[-1], max(float(np.mean(z - z[-1])), 1e-4)
    beyond = excess * np.log(len(z) / n_pairs / FALSE_PAIR_RATE)
    extended = float(np.tanh(threshold + max(beyond, 0.0)))
    # never below the mirrored pair of that rank (for a few hundred images: the most alike one)
    return max(extended, float(scores[min(int(FALSE_PAIR_RATE * n_pairs), len(scores) - 1)]))


@dataclass(frozen=True)
class NearPairs:
    pairs: np.ndarray  # (P, 2) i < j
    scores: np.ndarray  # (P,) their aligned correlation, in the first view that found them
    cuts: dict[str, float]  # each view's cut, from the competition's own mirror images


# The two views a pair is judged in, each with its own cut: the whole thumbnail (which tells
# apart images whose layouts differ, and forgives crops and rescaling at large sizes) and its
# detail (which tells apart images that share a layout). A pair above either cut is a copy.
VIEWS = {"thumbnail": lambda thumbs: thumbs, "detail": detail_of}


def near_pairs(thumbs: np.ndarray) -> NearPairs:
    """The pairs of images that look alike in either view, above that view's own cut."""
    found, scores, cuts = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.float32)], {}
    if len(thumbs) < 2:
        return NearPairs(found[0], scores[0], cuts)
    for view, seen in VIEWS.items():
        looked = seen(thumbs)
        cuts[view] = adaptive_cut(looked)
        pairs = candidate_pairs(looked)
        score = aligned_scores(looked, pairs)
        found.append(pairs[score > cuts[view]])
        scores.append(score[score > cuts[view]])
    pairs, first = np.unique(np.concatenate(found), axis=0, return_index=True)
    return NearPairs(pairs, np.concatenate(scores)[first], cuts)


def split_chains(found: NearPairs, n: int) -> NearPairs:
    """The near pairs without those that only chaining would join. A group of copies is a star:
    an image (the original) near each of the others, whose copies of different kinds need not
    be near one another. A group without such a centre (a - b - c - d, each near the next) is
    cut into stars, largest first (the image with the most near pairs and those pairs), and the
    pairs between the stars are dropped."""
    groups = group_of_pairs(n, found.pairs)
    star = np.arange(n)  # images of one star share a number
    for group in np.unique(groups[groups >= 0]):
        members = set(np.flatnonzero(groups == group).tolist())
        inside = found.pairs[np.isin(found.pairs[:, 0], list(members))]
        while members:
            near = {m: set() for m in members}
            for a, b in inside.tolist():
                if a in members and b in members:
                    near[a].add(b)
                    near[b].add(a)
            centre = max(sorted(members), key=lambda m: len(near[m]))
            part = {centre, *near[centre]}
            star[list(part)] = centre
            members -= part
    keep = star[found.pairs[:, 0]] == star[found.pairs[:, 1]]
    return NearPairs(found.pairs[keep], found.scores[keep], found.cuts)


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
