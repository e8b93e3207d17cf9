"""Model tests: every depth of the table, equivalence with timm/torchvision, offline weights.

    python -m pytest tests/test_models.py -q
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from pipeline.models.factory import create_model, is_timm_name, model_input_config
from pipeline.models.finetune import freeze_body, head_parameters, param_groups, unfreeze
from pipeline.models.resnet import ARCHS, CIFAR, BasicBlock, Bottleneck, create_resnet
from pipeline.models.weights import (
    WeightsMismatchError,
    WeightsNotFoundError,
    downloaded_file,
    torch_hub_checkpoints,
    torchvision_url,
)

IMAGENET_NAMES = [n for n, (_, _, family) in ARCHS.items() if family is not CIFAR]
CIFAR_NAMES = [n for n, (_, _, family) in ARCHS.items() if family is CIFAR]

# Exact counts with 1x1-conv projection shortcuts (option B), 10 classes; the paper's table (option
# A, parameter-free shortcuts) gives 0.27M, 0.46M, 0.66M, 0.85M, 1.7M.
CIFAR_PARAMS = {"resnet20": 272_474, "resnet32": 466_906, "resnet44": 661_338,
                "resnet56": 855_770, "resnet110": 1_730_714}
PAPER_PARAMS = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet44": 0.66e6,
                "resnet56": 0.85e6, "resnet110": 1.7e6}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def input_for(name: str) -> torch.Tensor:
    # Small inputs keep the suite fast: 64 px still leaves layer4 a 2x2 map on the ImageNet stem.
    size = 32 if name in CIFAR_NAMES else 64
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN random affine params and running stats.

    Fresh BNs are the identity in eval mode (mean 0, var 1) and timm zeroes each block's last
    gamma, so an equivalence check on a fresh model would skip whole residual branches.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


def save_weights(state_dict: dict, path) -> None:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point every cache at empty folders so the machine's real timm/HF cache cannot help."""
    folders = {"HF_HOME": "hf", "HF_HUB_CACHE": "hf/hub", "TORCH_HOME": "torch"}
    for variable, folder in folders.items():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(variable, str(tmp_path / folder))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# The depth table


@pytest.mark.parametrize("name", list(ARCHS))
def test_forward_backward_every_depth(name):
    torch.manual_seed(0)
    # zero_init_last=False: with gamma=0 a block's residual branch outputs 0 whatever its convs
    # hold, so conv1/conv2 (and bn1) get exactly zero gradient; "every parameter learns" would
    # then be false by construction. With the default the check below would only prove wiring.
    model = create_model(name, num_classes=7, zero_init_last=False)
    x = input_for(name)
    logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


@pytest.mark.parametrize("name", list(ARCHS))
def test_zero_init_last_zeroes_each_blocks_last_bn(name):
    model = create_model(name, num_classes=3)
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == sum(ARCHS[name][1])
    for block in blocks:
        last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        assert torch.count_nonzero(last.weight) == 0
        assert torch.count_nonzero(block.bn1.weight) == block.bn1.weight.numel()


@pytest.mark.parametrize("name", IMAGENET_NAMES)
def test_param_count_equals_torchvision(name):
    # Built on the meta device: shapes only, so even resnet152 costs nothing.
    with torch.device("meta"):
        ours = create_model(name, num_classes=1000)
        reference = getattr(torchvision.models, name)(weights=None)
    assert n_params(ours) == n_params(reference)
    assert list(ours.state_dict()) == list(reference.state_dict())  # same keys, same order
    if name == "resnet18":
        assert n_params(ours) == 11_689_512


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_param_count_cifar_matches_paper(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=10)
    assert n_params(model) == CIFAR_PARAMS[name]
    # Option-B projections add 2 convs + BNs: ~2-5% above the paper's option-A figures.
    assert n_params(model) == pytest.approx(PAPER_PARAMS[name], rel=0.05)


def test_unknown_depth_lists_valid_names():
    with pytest.raises(ValueError, match="resnet18.*resnet110"):
        create_resnet("resnet19")


def test_features_head_split_and_classifier():
    model = create_model("resnet50", num_classes=4).eval()
    x = input_for("resnet50")
    features = model.forward_features(x)
    assert features.shape == (2, model.num_features, 2, 2) and model.num_features == 2048
    assert model.forward_head(features, pre_logits=True).shape == (2, 2048)
    assert torch.equal(model.forward_head(features), model(x))
    assert model.get_classifier() is model.fc
    model.reset_classifier(9)
    assert model(x).shape == (2, 9)
    cifar = create_model("resnet20", num_classes=10)
    assert cifar.forward_features(input_for("resnet20")).shape == (2, 64, 8, 8)


def test_drop_rate_acts_in_training_only():
    model = create_model("resnet20", num_classes=10, drop_rate=0.5)
    x = input_for("resnet20")
    torch.manual_seed(0)
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_model_input_config_follows_the_weights():
    assert model_input_config(create_model("resnet18", 2)) == {
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "input_size": (3, 224, 224)}
    cifar = model_input_config(create_model("resnet20", 2))
    assert cifar["input_size"] == (3, 32, 32) and cifar["mean"] == (0.4914, 0.4822, 0.4465)
    timm_cfg = model_input_config(create_model("timm/resnet18", 2))
    assert timm_cfg["input_size"] == (3, 224, 224) and timm_cfg["std"] == (0.229, 0.224, 0.225)
    with pytest.raises(TypeError, match="pretrained_cfg"):
        model_input_config(nn.Linear(2, 2))


def test_unknown_names_say_what_is_valid():
    with pytest.raises(ValueError, match=r"resnet18.*resnet110.*timm/<name>"):
        create_model("resnet19", 10)
    with pytest.raises(ValueError, match="use 'timm/convnext_tiny'"):
        create_model("convnext_tiny", 10)
    with pytest.raises(ValueError, match="timm has no model 'resnet19x'"):
        create_model("timm/resnet19x", 10)
    assert is_timm_name("timm/resnet18") and not is_timm_name("resnet18")


# ---------------------------------------------------------------------------------------------
# Pretrained weights: equivalence with the reference implementations


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_weights_give_timm_logits(name, suffix, tmp_path):
    torch.manual_seed(1)
    reference = randomise_bn(timm.create_model(name, pretrained=False))
    path = tmp_path / f"{name}{suffix}"
    save_weights(reference.state_dict(), path)

    ours = create_model(name, 1000, pretrained=True, weights=path).eval()
    x = input_for(name)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert expected.std() > 0  # a meaningful comparison, not two vectors of zeros
    assert torch.allclose(got, expected, atol=1e-5)


def test_torchvision_weights_load_one_to_one(tmp_path):
    torch.manual_seed(2)
    reference = randomise_bn(torchvision.models.resnet18(weights=None))
    path = tmp_path / "resnet18.pth"
    # Wrapped the way training checkpoints are: {"model": state_dict, ...}.
    torch.save({"model": reference.state_dict(), "epoch": 3}, path)
    ours = create_model("resnet18", 1000, weights=path).eval()
    x = input_for("resnet18")
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x), atol=1e-5)


@pytest.mark.parametrize("filename", ["timm-resnet18.safetensors", "resnet18.pth"])
def test_timm_model_from_weights_dir_with_new_head(filename, empty_caches):
    torch.manual_seed(3)
    source = timm.create_model("resnet18", pretrained=False)
    weights_dir = empty_caches / "weights"
    weights_dir.mkdir()
    save_weights(source.state_dict(), weights_dir / filename)

    model = create_model("timm/resnet18", 10, pretrained=True, weights_dir=weights_dir)
    assert model.get_classifier().out_features == 10
    loaded, original = model.state_dict(), source.state_dict()
    body = [k for k in original if not k.startswith("fc.")]
    assert all(torch.equal(loaded[k], original[k]) for k in body)


def test_our_model_from_weights_dir(empty_caches):
    weights_dir = empty_caches / "weights"
    weights_dir.mkdir()
    source = create_model("resnet20", 10, zero_init_last=False)
    torch.save({"state_dict": source.state_dict()}, weights_dir / "resnet20.pt")
    model = create_model("resnet20", 5, pretrained=True, weights_dir=weights_dir)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 5


def test_timm_model_from_the_local_hub_cache(empty_caches):
    # The layout huggingface_hub leaves after one online run: refs/main -> snapshots/<sha>/.
    torch.manual_seed(4)
    source = timm.create_model("resnet18", pretrained=False)
    repo = empty_caches / "hf/hub/models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text("0123abc")
    (repo / "snapshots/0123abc").mkdir(parents=True)
    save_weights(source.state_dict(), repo / "snapshots/0123abc/model.safetensors")

    model = create_model("timm/resnet18", 1000, pretrained=True, weights_dir=empty_caches / "none")
    assert torch.equal(model.fc.weight, source.fc.weight)  # same class count: head loaded too


@pytest.mark.parametrize("name", ["timm/resnet18", "resnet18"])
def test_missing_weights_fail_fast_and_say_how_to_fix(name, empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a notebook without internet: no download
    weights_dir = empty_caches / "weights"
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as error:
        create_model(name, 10, pretrained=True, weights_dir=weights_dir)
    assert time.monotonic() - start < 5  # no network wait
    message = str(error.value)
    assert str(weights_dir) in message and "model.weights" in message
    assert ("timm cache" in message) == name.startswith("timm/")
    assert ("torch's cache" in message) == (name == "resnet18")  # torchvision's weights
    assert "HF_HUB_OFFLINE is set" in message
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        create_model(name, 10, weights=empty_caches / "nope.safetensors")


COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(BaseHTTPRequestHandler):
    """The two answers `hf_hub_download` asks the Hugging Face hub for: a HEAD with the file's
    commit, ETag and size, then a GET of its bytes (`server.files`: URL path -> bytes)."""

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        if getattr(self.server, "refuse", None):  # a proxy or the hub saying no to everything
            self.send_response(self.server.refuse)
            self.end_headers()
            return
        data = self.server.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def fake_hub(empty_caches, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.files = {}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server
    server.shutdown()
    server.server_close()


def test_timm_weights_download_on_first_use_then_load_offline(fake_hub, empty_caches,
                                                              monkeypatch):
    """`pretrained: true` for a timm name with nothing local fetches the file timm's
    pretrained_cfg names from the hub ($HF_ENDPOINT: here a local server in the hub's shape)
    into the hub cache; the next run finds it there with the network gone."""
    torch.manual_seed(5)
    source = timm.create_model("resnet18", pretrained=False)
    save_weights(source.state_dict(), empty_caches / "served.safetensors")
    hub_id = timm.create_model("resnet18", pretrained=False).pretrained_cfg["hf_hub_id"]
    fake_hub.files[f"/{hub_id}/resolve/main/model.safetensors"] = \
        (empty_caches / "served.safetensors").read_bytes()

    model = create_model("timm/resnet18", 1000, pretrained=True, weights_dir=empty_caches / "no")
    assert torch.equal(model.fc.weight, source.fc.weight)
    cached = list((empty_caches / "hf/hub").rglob("model.safetensors"))
    assert len(cached) == 1 and hub_id.replace("/", "--") in str(cached[0])

    fake_hub.shutdown()  # offline from now on: the cache serves
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = create_model("timm/resnet18", 7, pretrained=True, weights_dir=empty_caches / "no")
    assert torch.equal(again.conv1.weight, source.conv1.weight)


def test_make_weights_fetches_ahead_into_a_folder_a_notebook_reads_offline(fake_hub, empty_caches,
                                                                          monkeypatch):
    """`make weights MODEL=timm/resnet18 OUT=folder` downloads on a machine with internet and
    writes the folder a code competition's notebook reads with no internet and no cache."""
    from pipeline.__main__ import main as cli

    torch.manual_seed(6)
    source = timm.create_model("resnet18", pretrained=False)
    save_weights(source.state_dict(), empty_caches / "served.safetensors")
    hub_id = source.pretrained_cfg["hf_hub_id"]
    fake_hub.files[f"/{hub_id}/resolve/main/model.safetensors"] = \
        (empty_caches / "served.safetensors").read_bytes()
    out = empty_caches / "kaggle-weights"
    assert cli(["weights", "--model", "timm/resnet18", "--out", str(out)]) == 0
    assert (out / "timm-resnet18.safetensors").is_file()

    fake_hub.shutdown()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(empty_caches / "a-notebook-has-no-cache"))
    model = create_model("timm/resnet18", 5, pretrained=True, weights_dir=out)
    assert torch.equal(model.conv1.weight, source.conv1.weight)


def test_a_refused_download_says_why_and_what_to_put_where(fake_hub, empty_caches):
    fake_hub.refuse = 403  # answered at once (a refused connection is retried: the slow test)
    with pytest.raises(WeightsNotFoundError) as error:
        create_model("timm/resnet18", 10, pretrained=True, weights_dir=empty_caches / "weights")
    message = str(error.value)
    assert f"the download from http://127.0.0.1:{fake_hub.server_port}" in message
    assert "failed" in message and "because of HfHubHTTPError: 403 Forbidden" in message
    assert "timm-resnet18.safetensors" in message  # the file to put into weights/


@pytest.mark.slow  # the hub client retries a refused connection for about 23 s
def test_a_failed_download_says_why_and_what_to_put_where(empty_caches, monkeypatch):
    with socket.socket() as closed:  # a port nothing listens on: the connection is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as error:
        create_model("timm/resnet18", 10, pretrained=True, weights_dir=empty_caches / "weights")
    message = str(error.value)
    assert f"the download from http://127.0.0.1:{port}" in message and "failed" in message
    assert "because of" in message and "Connect" in message  # the cause: nothing answered
    assert "timm-resnet18.safetensors" in message  # the file to put into weights/
    assert time.monotonic() - start < 60  # the hub client retries for about 23 s, once


def test_unexpected_key_is_named(tmp_path):
    state = create_model("resnet18", 10).state_dict()
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "extra.safetensors"))
    with pytest.raises(WeightsMismatchError, match="unexpected keys: layer5.0.conv1.weight"):
        create_model("resnet18", 10, weights=tmp_path / "extra.safetensors")


def test_wrong_body_shape_and_missing_key_are_named(tmp_path):
    state = create_model("resnet18", 10).state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    del state["layer4.1.bn2.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsMismatchError) as error:
        create_model("resnet18", 10, weights=tmp_path / "bad.pth")
    assert "shape mismatch: layer1.0.conv1.weight (64, 64, 1, 1)" in str(error.value)
    assert "missing keys: layer4.1.bn2.bias" in str(error.value)


def test_cifar_weights_do_not_fit_an_imagenet_resnet(tmp_path):
    torch.save(create_model("resnet20", 10).state_dict(), tmp_path / "r20.pth")
    with pytest.raises(WeightsMismatchError, match="missing keys: .*layer4"):
        create_model("resnet18", 10, weights=tmp_path / "r20.pth")


# ---------------------------------------------------------------------------------------------
# Two-stage fine-tuning


@pytest.mark.parametrize("name", ["resnet20", "timm/resnet18"])
def test_param_groups_split_lr_and_decay(name):
    model = create_model(name, 10)
    groups = param_groups(model, lr=0.1, body_lr_mult=0.1, weight_decay=5e-4)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["head", "head_no_decay", "body", "body_no_decay"]
    assert by_name["head"]["params"] == [model.get_classifier().weight]
    assert by_name["head_no_decay"]["params"] == [model.get_classifier().bias]
    assert by_name["head"]["lr"] == by_name["head_no_decay"]["lr"] == 0.1
    assert by_name["body"]["lr"] == by_name["body_no_decay"]["lr"] == pytest.approx(0.01)
    assert by_name["head"]["weight_decay"] == by_name["body"]["weight_decay"] == 5e-4
    assert by_name["head_no_decay"]["weight_decay"] == by_name["body_no_decay"]["weight_decay"] == 0
    assert all(p.ndim == 1 for p in by_name["body_no_decay"]["params"])
    assert all(p.ndim > 1 for p in by_name["body"]["params"])
    everything = [id(p) for g in groups for p in g["params"]]
    assert sorted(everything) == sorted(id(p) for p in model.parameters())  # each exactly once
    torch.optim.SGD(groups, lr=0.1)  # a valid optimizer spec


def test_freeze_body_trains_only_the_head():
    model = create_model("resnet20", 10, zero_init_last=False)
    freeze_body(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in trainable] == [id(p) for p in head_parameters(model)]
    model(input_for("resnet20")).sum().backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert model.fc.weight.grad is not None
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


def _torchvision_file(tmp_path, seed: int) -> tuple[dict, bytes]:
    """Our resnet18's weights as torchvision's registry serves its own: a torch .pth."""
    torch.manual_seed(seed)
    state = create_resnet("resnet18", 1000).state_dict()
    torch.save(state, tmp_path / "served.pth")
    return state, (tmp_path / "served.pth").read_bytes()


def test_torchvision_weights_download_with_their_hash_checked(fake_hub, empty_caches):
    """torchvision's way: the file's name carries the start of its SHA-256, checked on the
    download; a file that fails the check is deleted, never left in the cache."""
    _, data = _torchvision_file(empty_caches, 7)
    name = f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    base = f"http://127.0.0.1:{fake_hub.server_port}/models"
    fake_hub.files[f"/models/{name}"] = data
    fake_hub.files["/models/resnet18-00000000.pth"] = data  # the wrong content for its name
    cache = torch_hub_checkpoints()
    assert cache == empty_caches / "torch" / "hub" / "checkpoints"  # $TORCH_HOME, read now
    path, what = downloaded_file(f"{base}/{name}", cache)
    assert path == cache / name and path.read_bytes() == data and what.startswith("downloaded")
    path, what = downloaded_file(f"{base}/resnet18-00000000.pth", cache)
    assert path is None and "hash" in what
    assert sorted(p.name for p in cache.iterdir()) == [name]


def test_our_resnet_loads_torchvision_weights_from_torch_cache_offline(empty_caches, monkeypatch,
                                                                      fake_hub):
    """resnet18 with `pretrained: true` and nothing in weights/: torchvision's ImageNet file in
    torch's cache, under the registry's name, loads (a fresh head for 5 classes) with the
    network off; with the file missing, the download from a mirror serving other bytes under
    that name is refused by the hash check, and the error says what to do."""
    state, data = _torchvision_file(empty_caches, 8)
    registry_name = torchvision_url("resnet18").rsplit("/", 1)[1]  # resnet18-f37072fd.pth
    monkeypatch.setenv("PIPELINE_TORCHVISION_MIRROR",
                       f"http://127.0.0.1:{fake_hub.server_port}/models/")
    fake_hub.files[f"/models/{registry_name}"] = data
    with pytest.raises(WeightsNotFoundError, match=r"(?s)hash.*make weights MODEL=resnet18"):
        create_model("resnet18", 5, pretrained=True, weights_dir=empty_caches / "no")
    assert not any(torch_hub_checkpoints().iterdir())

    (torch_hub_checkpoints() / registry_name).write_bytes(data)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = create_model("resnet18", 5, pretrained=True, weights_dir=empty_caches / "no")
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert model.fc.out_features == 5
