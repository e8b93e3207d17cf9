"""Duplicate images: exact copies (the same bytes) and near copies (aligned thumbnails).

    thumbs = np.stack([thumbnail_of(rgb) for rgb in images])  # (N, S, S) grey thumbnails
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
  (FEATURES: the coarse layout, and the spectrum of the fine detail, which a shift leaves
  alone), so the scoring grows linearly; the search is exact up to EXACT_SEARCH images and
  approximate beyond (faiss's inverted-file index, N^1.5): the detector takes about 21 s of
  43,750 small images on 2 cores (bench/BENCHMARKS.md);
- the cut comes from the competition's own images, not a constant: the same search run for
  mirrored images (pairs known to be distinct, with the competition's own sizes, content and
  noise; MIRROR_QUERIES of them at most) says how alike distinct images get here; the cut
  lets through at most FALSE_PAIR_RATE of them, in each view;
- a group is not built by chaining alone: a group of copies is a star (an original near each of
  its copies), and a group without such a centre is cut into stars (`split_chains`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.base.utils import summarize_offenders

# names the detector and its constants in the finding's fingerprint: a new one finds again
DETECTOR = ("aligned thumbnails and detail 32 px, shifts 3, mirror tail cut 1e-5 from 4,000, "
            "stars, faiss IVF beyond 10,000, thumbnails of the whole decode")
THUMBNAIL = 32  # px: the side of the grey thumbnails compared
BLUR = 0.7  # px of the thumbnail: a Gaussian that forgives JPEG blocks and noise
MAX_SHIFT = 3  # px of the thumbnail (a tenth of it): the alignments tried for each pair
NEIGHBOURS = 16  # candidates per image in each index: more than a group of copies holds
SEARCH_DIMS = 32  # principal components the nearest-neighbour search runs in
EXACT_SEARCH = 10_000  # images searched exactly; beyond, an approximate (IVF) index
PROBE_CELLS = 8  # cells of the IVF index each query looks in (of sqrt(N))
MIRROR_QUERIES = 4000  # images whose mirror pairs make the null: plenty for a 1e-5 tail
FALSE_PAIR_RATE = 1e-5  # distinct pairs let through by the cut (1 in 100,000)
TAIL = 50  # the most alike mirrored pairs whose tail the cut extends
BLOCK = 4096  # candidate pairs scored at a time, per thread (a block's spectra: 18 MB each)
CHUNK = 2048  # images whose spectra are prepared at a time
# Images of one group drawn in a picture (the report shows as many): a group of 1,000 copies
# is one row of GROUP_IMAGES and "+994 more", not a figure 150,000 px wide.
GROUP_IMAGES = 6


# --------------------------------------------------------------------------------------------
# Thumbnails


def thumbnail_of(rgb: np.ndarray) -> np.ndarray:
    """The thumbnail of an RGB uint8 image (H, W, 3)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    small = cv2.resize(grey, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(small, (0, 0), BLUR)


def _rfft2(images: np.ndarray, workers: int = -1) -> np.ndarray:
    """The real 2-D FFT of each image, on every core (-1) unless told, float32 in, complex64 out
    (scipy's, read on first use: `make runs` and the report import this module and never need
    it)."""
    import scipy.fft

    return scipy.fft.rfft2(images, workers=workers)


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
    detail = np.empty_like(thumbs)
    for start in range(0, len(thumbs), STACKED):
        part = thumbs[start:start + STACKED]
        # OpenCV blurs each channel of an image: the thumbnails side by side as its channels
        blurred = cv2.GaussianBlur(np.ascontiguousarray(part.transpose(1, 2, 0)), (0, 0), 2.0)
        blurred = blurred.reshape(*part.shape[1:], -1)  # one channel comes back as (S, S)
        detail[start:start + STACKED] = part - blurred.transpose(2, 0, 1)
    return detail


STACKED = 128  # thumbnails blurred as one image's channels (OpenCV's most)


def _layout_features(thumbs: np.ndarray) -> np.ndarray:
    """The coarse layout (8 x 8): near for copies whose pixels barely moved."""
    small = np.stack([cv2.resize(t, (8, 8), interpolation=cv2.INTER_AREA) for t in thumbs])
    return _standardised(small.reshape(len(thumbs), -1))


def _detail_spectrum(thumbs: np.ndarray) -> np.ndarray:
    """The magnitude spectrum of the fine detail, its lower frequencies: a shift moves the
    detail, not its spectrum, and the shared layout of a competition's images (a retina's disc)
    is taken out first."""
    def low_frequencies(part: np.ndarray) -> tuple[np.ndarray]:
        spectrum = _rfft2(detail_of(part))
        low = np.concatenate([spectrum[:, :8, :8], spectrum[:, -7:, :8]], axis=1)
        return (_standardised(np.log1p(np.abs(low)).reshape(len(part), -1)),)

    return _by_chunks(low_frequencies, thumbs)[0]


# The two indexes candidates are searched in: the coarse layout (near for copies whose pixels
# barely moved) and the spectrum of the fine detail (which a shift leaves alone).
FEATURES = (_layout_features, _detail_spectrum)


class NeighbourIndex:
    """The competition's images in one kind of features (FEATURES), searched for each query's
    nearest: in at most SEARCH_DIMS principal components (fitted on a sample), by faiss; every
    distance up to EXACT_SEARCH images, beyond that an inverted-file index (faiss's IVF: k-means
    cells, a query looks in the PROBE_CELLS nearest), which grows with N^1.5 rather than N^2.
    A copy sits far nearer to its original than distinct images sit to one another, so the
    cells rarely part them."""

    def __init__(self, thumbs: np.ndarray, features: Callable[[np.ndarray], np.ndarray]):
        import faiss
        from sklearn.decomposition import PCA

        self.features, indexed = features, features(thumbs)
        self.pca = None
        if indexed.shape[1] > SEARCH_DIMS and len(indexed) > SEARCH_DIMS:
            sample = np.random.default_rng(0).permutation(len(indexed))[:5000]
            self.pca = PCA(SEARCH_DIMS, random_state=0).fit(indexed[sample])
        self.indexed = indexed = self._projected(indexed)
        self.size, dims = indexed.shape
        self.index = self.exact = faiss.IndexFlatL2(dims)  # kept: the IVF index's cell finder
        if self.size > EXACT_SEARCH:
            cells = int(np.sqrt(self.size))
            self.index = faiss.IndexIVFFlat(self.exact, dims, cells)
            # faiss's own rule: about 40 training points per cell
            self.index.train(indexed[np.random.default_rng(0).permutation(self.size)[:40 * cells]])
            self.index.nprobe = PROBE_CELLS
        self.index.add(indexed)

    def _projected(self, features: np.ndarray) -> np.ndarray:
        projected = features if self.pca is None else self.pca.transform(features)
        return np.ascontiguousarray(projected, np.float32)

    def nearest(self, thumbs: np.ndarray | None, k: int) -> np.ndarray:
        """(Q, k) for each of these thumbnails (None: the indexed images themselves), the k
        nearest indexed images (-1: fewer than k in the cells an approximate search saw)."""
        queries = self.indexed if thumbs is None else self._projected(self.features(thumbs))
        return self.index.search(queries, min(k, self.size))[1]


def candidate_pairs(indexes: Sequence[NeighbourIndex], queries: np.ndarray | None,
                    own: np.ndarray) -> np.ndarray:
    """(P, 2) pairs (q, j) worth scoring: indexed image j among the NEIGHBOURS nearest of query
    q in any of the indexes (`queries` None: the indexed images themselves), never `own[q]`
    (the query itself, or the original of a mirrored query).
    The images' own pairs and the mirrored queries' come from the same search, so that the cut
    and the pairs it judges are found alike."""
    found = []
    for index in indexes:
        near = index.nearest(queries, NEIGHBOURS + 1)
        found.append(np.stack([np.repeat(np.arange(len(near)), near.shape[1]),
                               near.reshape(-1)], axis=1))
    pairs = np.concatenate(found)
    pairs = pairs[(pairs[:, 1] >= 0) & (own[pairs[:, 0]] != pairs[:, 1])]
    return _unique_pairs(pairs, max(len(own), indexes[0].size))


def pairs_within(indexes: Sequence[NeighbourIndex], thumbs: np.ndarray) -> np.ndarray:
    """(P, 2) candidate pairs i < j among the indexed images themselves, each once."""
    pairs = np.sort(candidate_pairs(indexes, None, np.arange(len(thumbs))), axis=1)
    return _unique_pairs(pairs, len(thumbs))


def _unique_pairs(pairs: np.ndarray, width: int) -> np.ndarray:
    """(P, 2) each pair once, in order: as one number per pair, sorted, each kept where it
    differs from the one before (numpy 2's np.unique hashes instead: 1.8 s for 1.5 million
    pairs against 0.05 s; a unique of rows sorts slower still)."""
    keys = np.sort(pairs[:, 0] * width + pairs[:, 1])
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if len(keys) else keys
    return np.stack([keys // width, keys % width], axis=1)


class AlignedScores:
    """A view's thumbnails made ready to score pairs, once for the pairs among them and the
    mirrored images' pairs with them: the spectra and window spreads of each image (what a
    centre is compared with).
    A pair's (i, j) score is the best normalised correlation of i's centre (the thumbnail less
    MAX_SHIFT px on each side) with j's window of the same size at every shift up to
    MAX_SHIFT: all shifts of a pair at once, the product of their spectra taken back at the
    small shifts alone (`_at_small_shifts`), divided by each window's own spread."""

    def __init__(self, thumbs: np.ndarray):
        self.thumbs = thumbs
        self.spectra, self.spread = _by_chunks(_window_terms, thumbs)

    def __call__(self, pairs: np.ndarray, queries: np.ndarray | None = None) -> np.ndarray:
        """(P,) the scores of pairs (i, j): i a row of `queries` (None: these thumbnails; else
        others, such as mirrored images), j one of these thumbnails. The centres' spectra are
        made block by block for the rows the block pairs (the pairs come sorted by i: a few
        hundred of them), not kept for every image (190 MB at 43,750 images)."""
        queries = self.thumbs if queries is None else queries
        scores = np.empty(len(pairs), np.float32)

        def score_block(start: int) -> None:
            i, j = pairs[start:start + BLOCK, 0], pairs[start:start + BLOCK, 1]
            rows, which = np.unique(i, return_inverse=True)
            centres = _centre_spectra(queries[rows], workers=1)  # the blocks share the cores
            valid = _at_small_shifts(centres[which] * self.spectra[j]) / self.spread[j]
            scores[start:start + BLOCK] = valid.reshape(len(i), -1).max(axis=1)

        # numpy lets go of the GIL in each block's products: blocks side by side use every core
        with ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, 8)) as pool:
            list(pool.map(score_block, range(0, len(pairs), BLOCK)))
        return np.clip(scores, -1.0, 1.0)


def _at_small_shifts(product: np.ndarray) -> np.ndarray:
    """(B, 2 MAX_SHIFT + 1, 2 MAX_SHIFT + 1) the inverse real FFT of half spectra (B, S,
    S // 2 + 1) at the small shifts alone: two small matrix products (the inverse DFT's rows
    and columns for those shifts) in place of a whole S x S inverse transform."""
    rows, columns = _inverse_dft(product.shape[1])
    return (rows @ product @ columns).real


@functools.cache
def _inverse_dft(side: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse DFT of a real side x side signal, its rows and columns at shifts 0 to
    2 MAX_SHIFT: x[y, x] = Re(sum_k rows[y, k] sum_l X[k, l] columns[l, x]), where the half
    spectrum's inner columns count twice (they stand for their mirror halves too)."""
    shifts, frequencies = np.arange(2 * MAX_SHIFT + 1), np.arange(side // 2 + 1)
    rows = np.exp(2j * np.pi * np.outer(shifts, np.arange(side)) / side)
    twice = np.where((frequencies == 0) | (2 * frequencies == side), 1.0, 2.0)
    columns = twice[:, None] * np.exp(2j * np.pi * np.outer(frequencies, shifts) / side)
    return rows.astype(np.complex64), (columns / side ** 2).astype(np.complex64)


def _by_chunks(prepare: Callable[[np.ndarray], tuple], images: np.ndarray) -> tuple:
    """prepare(images), CHUNK images at a time, each part written into the whole: the same
    arrays with a CHUNK-sized share of the temporaries (at 43,750 images a whole-set float copy
    is 180 MB, its spectra 190 MB)."""
    first = prepare(images[:CHUNK])
    whole = tuple(np.empty((len(images), *part.shape[1:]), part.dtype) for part in first)
    for start in range(0, len(images), CHUNK):
        parts = first if start == 0 else prepare(images[start:start + CHUNK])
        for array, part in zip(whole, parts):
            array[start:start + CHUNK] = part
    return whole


def _window_terms(others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(spectra, window spreads) of the images compared with the centres. A correlation is
    blind to each image's brightness and contrast: the pixels become z-scores first."""
    paired = _standardised(others.reshape(len(others), -1)).reshape(others.shape)
    paired *= others.shape[1]
    return _rfft2(paired), _window_spread(paired)


def _centre_spectra(thumbs: np.ndarray, workers: int = -1) -> np.ndarray:
    """The conjugate spectra of each thumbnail's centre, standardised, at the top left of a
    zero thumbnail: multiplied by another's spectrum, the cross-correlation at every shift."""
    m, side = MAX_SHIFT, thumbs.shape[1]
    inner = side - 2 * m
    centres = _standardised(thumbs[:, m:side - m, m:side - m].reshape(len(thumbs), -1))
    padded = np.zeros_like(thumbs)
    padded[:, :inner, :inner] = centres.reshape(len(thumbs), inner, inner)
    return np.conj(_rfft2(padded, workers))


def _window_spread(thumbs: np.ndarray) -> np.ndarray:
    """(N, 2 MAX_SHIFT + 1, 2 MAX_SHIFT + 1) the root of the summed squared deviations of each
    window a centre is compared with (its norm once its mean is taken out), from running sums
    down the rows then along the columns (float32 is exact enough: the thumbnails come
    standardised, so the sums stay small)."""
    shifts, inner = 2 * MAX_SHIFT + 1, thumbs.shape[1] - 2 * MAX_SHIFT

    def window_sums(values: np.ndarray) -> np.ndarray:
        rows = np.pad(values, ((0, 0), (1, 0), (0, 0))).cumsum(axis=1)
        rows = rows[:, inner:inner + shifts] - rows[:, :shifts]  # (N, shifts, S)
        both = np.pad(rows, ((0, 0), (0, 0), (1, 0))).cumsum(axis=2)
        return both[:, :, inner:inner + shifts] - both[:, :, :shifts]

    first, second = window_sums(thumbs), window_sums(thumbs ** 2)
    return np.sqrt(np.maximum(second - first ** 2 / inner ** 2, 1e-6)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The cut, from the competition's own distinct pairs


def adaptive_cut(thumbs: np.ndarray, indexes: Sequence[NeighbourIndex],
                 scores_of: AlignedScores) -> float:
    """The score above which a pair is taken for a copy. Mirrored images against the images
    (distinct by construction, alike in size, content and noise) give how alike distinct
    images get here; the cut is where FALSE_PAIR_RATE of the mirrored pairs would lie above
    it. MIRROR_QUERIES mirrored images of a larger competition see that far, for a fraction
    of the search; a few hundred images have too few pairs: the tail of the most alike TAIL
    mirrored pairs is extended (exponential in Fisher's z, the usual peaks-over-threshold
    model), which for many images comes out at the same place as the rank. (A mirrored image
    against an image scores and searches as the image against the other's mirror: the
    features and the shifts are symmetric, so the images' own indexes serve.)"""
    sample = np.sort(np.random.default_rng(0).permutation(len(thumbs))[:MIRROR_QUERIES])
    mirrored = thumbs[sample][:, :, ::-1].copy()
    pairs = candidate_pairs(indexes, mirrored, own=sample)
    scores = np.sort(scores_of(pairs, mirrored))[::-1]
    if len(scores) < 2:
        return 1.0
    n_pairs = len(sample) * (len(thumbs) - 1)  # every (mirrored image, another image)
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
        pairs, score, cuts[view] = _near_in_view(seen(thumbs))
        found.append(pairs)
        scores.append(score)
    pairs, first = np.unique(np.concatenate(found), axis=0, return_index=True)
    return NearPairs(pairs, np.concatenate(scores)[first], cuts)


def _near_in_view(looked: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(pairs, their scores, the cut) of the thumbnails as one view sees them; its indexes and
    spectra are let go before the next view makes its own."""
    indexes = [NeighbourIndex(looked, features) for features in FEATURES]
    scores_of = AlignedScores(looked)
    cut = adaptive_cut(looked, indexes, scores_of)
    pairs = pairs_within(indexes, looked)
    score = scores_of(pairs)
    return pairs[score > cut], score[score > cut], cut


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
