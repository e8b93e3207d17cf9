"""A command reads the competition's files once (fingerprints.remembered, entered by
pipeline/__main__.py): `make runs` and `make report` stat the training and test images once,
however many experiments and submissions ask, and outside a command every ask sees the files as
they are now."""

from __future__ import annotations

import os

from pipeline.base.fingerprints import once, remembered
from pipeline.data import tables
from pipeline.experiments import freshness
from pipeline.experiments.freshness import labelled_rows, read_test_set, train_images_fingerprint


def touch_later(path) -> None:
    """Give a file a later modification time, as an edit would."""
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_inside_a_command_each_key_is_computed_once_and_outside_every_time():
    calls = []

    def compute() -> int:
        calls.append(1)
        return len(calls)

    with remembered():
        assert [once("k", compute), once("k", compute)] == [1, 1]
        with remembered():  # a nested block shares what the command read
            assert once("k", compute) == 1
        assert once("other", compute) == 2
    assert [once("k", compute), once("k", compute)] == [3, 4]


def test_a_command_fingerprints_the_images_once_and_the_next_one_sees_the_edit(tiny_config):
    data = tiny_config.data
    ids = labelled_rows(data)["id"].tolist()
    train_image = tables.train_image_paths(data, ids[:1])[0]
    test_image = tables.test_image_paths(data, freshness.test_ids(data)[:1])[0]
    with remembered():
        train_then, test_then = train_images_fingerprint(data, ids), read_test_set(data)[1]
        touch_later(train_image)
        touch_later(test_image)
        assert train_images_fingerprint(data, ids) == train_then
        assert read_test_set(data)[1] == test_then
        # another id list is another key: computed from the files as they are now
        assert train_images_fingerprint(data, ids[:1]) != train_images_fingerprint(data, ids[1:])
    assert train_images_fingerprint(data, ids) != train_then
    assert read_test_set(data)[1] != test_then


def test_what_is_read_once_is_a_copy_each_caller_owns(tiny_config):
    data = tiny_config.data
    with remembered():
        rows, ids = labelled_rows(data), freshness.test_ids(data)
        rows["label"] = "changed by a caller"
        ids.clear()
        assert (labelled_rows(data)["label"] != "changed by a caller").all()
        assert len(freshness.test_ids(data)) == 4
