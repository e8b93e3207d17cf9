import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import softmax

from pipeline.base.config import TTAConfig
from pipeline.data.augment import Normalizer
from pipeline.data.dataset import ImageDataset
from pipeline.inference.engine import make_loader, predict_logits
from pipeline.inference.predictor import reduce_views, tta_views
from tests.conftest import experiment_dir, predict, train
from tests.test_train import tiny


class PositionModel(torch.nn.Module):
    """Logits = mean intensity of each quadrant: flips, rotations and shifts all change them."""

    def forward(self, x):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        quads = [x[..., :h, :w], x[..., :h, w:], x[..., h:, :w], x[..., h:, w:]]
        return torch.stack([q.mean(dim=(1, 2, 3)) for q in quads], dim=1)


@pytest.fixture
def asymmetric_batch():
    return torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) ** 1.5


@pytest.mark.parametrize("views, count", [("none", 1), ("hflip", 2), ("vflip", 2), ("flips", 4),
                                          ("d4", 8), ("shifts", 5), ("scales", 3)])
def test_each_view_applied_exactly_once(views, count, asymmetric_batch):
    tta = tta_views(TTAConfig(views=views), image_size=8)
    assert len(tta) == count
    model = PositionModel()
    outputs = [model(view(asymmetric_batch)) for view in tta]
    # every view gives a different output: none is doubled, none is the identity twice
    for i in range(count):
        for j in range(i + 1, count):
            assert not torch.allclose(outputs[i], outputs[j]), (views, i, j)


def test_d4_views_are_the_eight_symmetries(asymmetric_batch):
    got = {tuple(view(asymmetric_batch)[0, 0].flatten().tolist()) for view in
           tta_views(TTAConfig(views="d4"), 8)}
    image = asymmetric_batch[0, 0]
    expected = {tuple(torch.rot90(im, k).flatten().tolist())
                for im in (image, image.flip(-1)) for k in range(4)}
    assert got == expected


def test_batched_tta_matches_views_one_by_one(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    paths = []
    for i, image in enumerate(images):
        path = tmp_path / f"{i}.npy"
        np.save(path, image)
        paths.append(path)
    dataset = ImageDataset(paths, None, None, loader=np.load)
    loader = make_loader(dataset, 2, None, {"num_workers": 0})
    normalizer = Normalizer([0.5] * 3, [0.25] * 3)
    views = tta_views(TTAConfig(views="shifts"), 8) + tta_views(TTAConfig(views="d4"), 8)
    model = PositionModel()
    logits = predict_logits(model, normalizer, loader, torch.device("cpu"), dtype=None, views=views)
    assert logits.shape == (13, 5, 4)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    for v, view in enumerate(views):
        np.testing.assert_allclose(logits[v], model(normalizer(view(batch))).numpy(), rtol=1e-5)
    probs = reduce_views(logits, "mean").probs
    np.testing.assert_allclose(probs, softmax(logits.astype(np.float64), axis=-1).mean(0), rtol=1e-6)
    geo = reduce_views(logits, "geomean").probs
    np.testing.assert_allclose(geo.sum(1), 1)


def test_predict_writes_test_and_oof_tta(tmp_path, capsys):
    config = tiny(tmp_path, extra=["train.epochs=1", "tta.views=flips"])
    train(config, None, force=False)
    predict(config, None, force=False)
    out = capsys.readouterr().out
    assert "without TTA" in out and "with flips TTA" in out
    for fold in (0, 1):
        test = pd.read_csv(experiment_dir(config) / f"fold{fold}" / "test_probs.csv", dtype={"id": str})
        assert test["id"].tolist() == ["t000", "t001", "t002", "t003"]
        assert list(test.columns) == ["id", "cat", "dog", "fox"]
        oof = pd.read_csv(experiment_dir(config) / f"fold{fold}" / "oof_tta.csv", dtype={"id": str})
        plain = pd.read_csv(experiment_dir(config) / f"fold{fold}" / "oof.csv", dtype={"id": str})
        assert oof["id"].tolist() == plain["id"].tolist()
    predict(config, None, force=False)  # current: skipped
    assert "predictions are current" in capsys.readouterr().out
