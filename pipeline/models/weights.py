"""Pretrained weights: find a state_dict file (a timm model's fetched on first use), read it
safely, load it strictly.

Where the weights of model `name` are looked for, first hit wins:

1. `weights=` (config `model.weights`), an explicit file; it must exist.
2. `weights_dir` (config `model.weights_dir`, default `weights/`), by name, in suffix order
   .safetensors, .pth, .pt:
   - ours, e.g. `resnet18`:        weights/resnet18.safetensors|.pth|.pt
   - timm, e.g. `timm/resnet50`:   weights/timm-resnet50.*, then weights/resnet50.*
3. our resnet18..152: torch's hub cache ($TORCH_HOME/hub/checkpoints, else
   ~/.cache/torch/hub/checkpoints), where torchvision keeps its ImageNet weights (the same keys:
   our ResNet is torchvision's layout), under the name its weight registry gives; then, on first
   use, downloaded from that registry's URL (`get_model_weights(name).DEFAULT`, the newest
   weights) with torch.hub's progress bar and its SHA-256 check of the name's hash prefix.
   `PIPELINE_TORCHVISION_MIRROR` (a URL ending in /) serves the same file names from elsewhere.
3. timm names only: the local Hugging Face hub cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
   ~/.cache/huggingface/hub), i.e. the files `timm.create_model(name, pretrained=True)` leaves
   there when run once with internet.
4. timm names only, on first use: downloaded from the hub ($HF_ENDPOINT, else huggingface.co)
   into that cache, as timm's own loader does (`hf_hub_download` of the repo and file timm's
   pretrained_cfg names), with the hub's progress bar; later runs find it in step 3, offline.
   Not with HF_HUB_OFFLINE=1 (code competitions' notebooks have no internet: the weights travel
   in weights/ or the bundle; it stops torchvision's download too); a failed download is an
   error that says why and what to put where.

The cache is read with `huggingface_hub.try_to_load_from_cache`, a plain file lookup, and the
settings (HF_HUB_OFFLINE, HF_ENDPOINT, the cache folder) are read from the environment when the
weights are looked for: huggingface_hub reads them once at import (which timm triggers), so a
value set later in os.environ would otherwise have no effect. When nothing is found,
`WeightsNotFoundError` says where it looked and how to provide the weights.

Files are state_dicts as `model.state_dict()` writes them: .safetensors, or .pt/.pth read with
`torch.load(weights_only=True)` (a dict wrapping it under "state_dict" or "model" is unwrapped).
Loading is strict, except the classifier head: when its shape differs from the model's (another
class count) the file's head is dropped and the model's fresh head is kept.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.base.utils import PipelineError
from pipeline.models.names import TIMM_PREFIX

SUFFIXES = (".safetensors", ".pth", ".pt")
# our models whose ImageNet weights torchvision's registry has, in the same layout
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repos hold
_SHOW = 5  # keys named in an error message
logger = logging.getLogger(__name__)


class WeightsNotFoundError(PipelineError):
    """`pretrained: true` but no weights file was found; the message lists where it looked.

    A PipelineError (a RuntimeError): the command line prints it without a traceback.
    """


class WeightsMismatchError(PipelineError):
    """A weights file does not fit the model (missing/unexpected keys, wrong shapes)."""


class WeightsReadError(PipelineError):
    """A weights file cannot be read (truncated, corrupt, not a state_dict); names the file."""


def load_error_gist(err: Exception) -> str:
    """'UnpicklingError: Unsupported operand 60': a load error's type and the line that says why.

    torch wraps every weights_only refusal in a long "Weights only load failed" text; its gist is
    the WeightsUnpickler line ("Unsupported global: GLOBAL x.Y ..." for a pickled object, anything
    else, e.g. "Unsupported operand 60", for bytes that are no pickle at all).
    """
    text = str(err).strip()
    gist = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    detail = gist.group(1).strip() if gist else (text.splitlines()[0] if text else "")
    return f"{type(err).__name__}{': ' + detail if detail else ''}"


def _unreadable(path: Path, err: Exception) -> str:
    """The message for a weights file that does not load: file, size, the reader's own words."""
    reader = "safetensors" if path.suffix == ".safetensors" else "torch.load"
    return (f"cannot read weights file {path} ({path.stat().st_size} bytes; {reader}: "
            f"{load_error_gist(err)}). It is corrupt or "
            f"incomplete (an interrupted download?) or not a {reader.split('.')[0]} file: "
            f"download or save it again, or set model.pretrained=false")


PICKLE_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)")
PICKLE_PROTOCOLS = (b"\x80\x03", b"\x80\x04", b"\x80\x05")  # a bare pickle, not torch's zip


def pickle_refusal(path: Path, err: Exception) -> str | None:
    """The message for a file that torch.load(weights_only=True) refused because it holds
    pickled Python objects (which could run code on loading), or None when it is merely corrupt.
    torch words the refusal of a global in two ways, and a bare pickle of a newer protocol fails
    on its first opcode instead."""
    found = PICKLE_GLOBAL.search(str(err))
    try:
        bare = Path(path).read_bytes()[:2] in PICKLE_PROTOCOLS
    except OSError:
        bare = False
    if found is None and not bare:
        return None
    what = f"pickled Python objects ({found.group(1)})" if found else "a bare pickle"
    return (f"{path} is not a tensor file: it holds {what}, which torch.load(weights_only=True) "
            f"refused to unpickle (unpickling can run code). Use a .safetensors file, or a "
            f"state_dict saved with torch.save(model.state_dict(), ...) from a source you trust")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from .safetensors or a torch file, on the CPU, without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except Exception as err:  # SafetensorError, OSError: a truncated or foreign file
            raise WeightsReadError(_unreadable(path, err)) from None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsReadError(pickle_refusal(path, err) or _unreadable(path, err)) from None
    except Exception as err:  # RuntimeError (not a zip archive), EOFError: truncated or corrupt
        raise WeightsReadError(_unreadable(path, err)) from None
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
    if not isinstance(content, dict) or not all(torch.is_tensor(v) for v in content.values()):
        raise WeightsMismatchError(f"{path} holds no state_dict of tensors "
                                   f"(nor one under 'state_dict' or 'model')")
    return content


def local_candidates(name: str, weights_dir: str | Path) -> list[Path]:
    """The files in `weights_dir` that may hold `name`'s weights, in lookup order."""
    weights_dir = Path(weights_dir)
    if name.startswith(TIMM_PREFIX):
        bare = name[len(TIMM_PREFIX):]
        stems = [f"timm-{bare}", bare]
    else:
        stems = [name]
    return [weights_dir / f"{stem}{suffix}" for stem in stems for suffix in SUFFIXES]


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, resolved from the environment now, not at import."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.environ[variable])).expanduser()
    default_home = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    home = os.environ.get("HF_HOME") or default_home
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _hub_files(pretrained_cfg: dict) -> tuple[str, str, list[str]] | None:
    """(repo, revision, the file names to try) of a timm model's hub weights, as its
    pretrained_cfg names them; None when timm knows no hub weights for it."""
    hub_id = pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        return None
    repo_id, _, revision = hub_id.partition("@")  # timm spells a revision as repo@rev
    filenames = [pretrained_cfg["hf_hub_filename"]] if pretrained_cfg.get("hf_hub_filename") \
        else list(HUB_FILENAMES)
    return repo_id, revision, filenames


def timm_cached_file(pretrained_cfg: dict) -> tuple[Path | None, str]:
    """(file in the hub cache or None, where it was looked for) for a timm model's weights."""
    from huggingface_hub import try_to_load_from_cache

    files = _hub_files(pretrained_cfg)
    if files is None:
        return None, "(no Hugging Face hub weights known to timm for this model)"
    repo_id, revision, filenames = files
    cache = hf_hub_cache()
    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache,
                                       revision=revision or None)
        if isinstance(found, str):  # not None and not the "known missing" marker
            return Path(found), str(cache)
    return None, f"{cache} (repo {repo_id}: {', '.join(filenames)})"


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value, read now."""
    return any(os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on")
               for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def downloaded_timm_weights(pretrained_cfg: dict) -> tuple[Path | None, str]:
    """(the file, or None, and what happened) of a timm model's weights fetched from the hub into
    its cache, as timm's loader fetches them: the repo and file of its pretrained_cfg."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    files = _hub_files(pretrained_cfg)
    if files is None:
        return None, "no Hugging Face hub weights known to timm for this model"
    repo_id, revision, filenames = files
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: the hub's own copy is stale
    for filename in filenames:
        try:
            found = hf_hub_download(repo_id, filename, revision=revision or None,
                                    cache_dir=hf_hub_cache(), endpoint=endpoint,
                                    library_name="timm")
        except Exception as err:  # noqa: BLE001 - no network, 401/403, a proxy: said, not raised
            if isinstance(err, EntryNotFoundError) and \
                    not isinstance(err, LocalEntryNotFoundError):
                continue  # the hub answered: the repo holds the other file name
            return None, (f"the download from {endpoint or 'huggingface.co'} ({repo_id}) failed: "
                          f"{what_failed(err)}")
        return Path(found), f"downloaded {repo_id}/{filename}"
    return None, f"{repo_id} holds none of {', '.join(filenames)}"


def what_failed(err: BaseException) -> str:
    """The error in a line, with what caused it: the hub client reports a proxy's 403 or a
    refused connection as 'not in the local cache', and its HTTP error carries the server's
    own words. Each link once (a chain can loop), a context hidden by `from None` left out."""
    def line(e: BaseException) -> str:
        text = next((t.strip() for t in str(e).splitlines() if t.strip()), "")
        return f"{type(e).__name__}: {text}" if text else type(e).__name__

    chain, seen, link = [], set(), err
    while link is not None and id(link) not in seen and len(chain) < 4:
        seen.add(id(link))
        chain.append(line(link))
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    return chain[0] + (f" (because of {' <- '.join(chain[1:])})" if len(chain) > 1 else "")


def torchvision_url(name: str) -> str | None:
    """The URL of torchvision's default ImageNet weights for our model `name` (resnet18..152),
    a mirror's when PIPELINE_TORCHVISION_MIRROR is set; None for a model torchvision lacks."""
    if name not in TORCHVISION_RESNETS:
        return None
    from torchvision.models import get_model_weights

    url = get_model_weights(name).DEFAULT.url
    mirror = os.environ.get("PIPELINE_TORCHVISION_MIRROR")
    return mirror.rstrip("/") + "/" + url.rsplit("/", 1)[1] if mirror else url


def torch_hub_checkpoints() -> Path:
    """torch.hub's checkpoint folder, from $TORCH_HOME read now."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def downloaded_file(url: str, folder: Path) -> tuple[Path | None, str]:
    """(the file, or None, and what happened) of `url` fetched into `folder` under its own name,
    as torchvision fetches its weights: torch.hub's download (a temporary file renamed into
    place, a progress bar) with the SHA-256 check of the hash prefix in the name
    (`resnet18-f37072fd.pth`); a file that fails it is deleted."""
    target = folder / url.rsplit("/", 1)[1]
    prefix = torch.hub.HASH_REGEX.search(target.name)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), prefix.group(1) if prefix else None,
                                       progress=True)
    except Exception as err:  # noqa: BLE001 - no network, 404, a hash mismatch: said, not raised
        target.unlink(missing_ok=True)
        return None, (f"the download of {url} failed: {type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}")
    return target, f"downloaded {url}"


def find_weights(name: str, weights: str | Path | None, weights_dir: str | Path,
                 pretrained_cfg: dict | None = None) -> Path:
    """Resolve the weights file of model `name` (see the module docstring for the order)."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsNotFoundError(f"model.weights={path} does not exist; give the path of a "
                                       f".safetensors/.pth/.pt state_dict")
        return path
    candidates = local_candidates(name, weights_dir)
    for path in candidates:
        if path.is_file():
            return path
    looked = [str(p) for p in candidates]
    url = torchvision_url(name)
    if url is not None:
        cached = torch_hub_checkpoints() / url.rsplit("/", 1)[1]
        if cached.is_file():
            return cached
        looked.append(f"torchvision's weights in torch's cache: {cached}")
        if offline():
            looked.append("no download: HF_HUB_OFFLINE is set")
        else:
            fetched, what = downloaded_file(url, cached.parent)
            if fetched is not None:
                logger.info("%s: %s into %s", name, what, cached.parent)
                return fetched
            looked.append(what)
    if name.startswith(TIMM_PREFIX):
        cached, where = timm_cached_file(pretrained_cfg or {})
        if cached is not None:
            return cached
        looked.append(f"the timm/Hugging Face cache {where}")
        if offline():
            looked.append("no download: HF_HUB_OFFLINE is set")
        else:
            fetched, what = downloaded_timm_weights(pretrained_cfg or {})
            if fetched is not None:
                logger.info("%s: %s into %s", name, what, hf_hub_cache())
                return fetched
            looked.append(what)
    raise WeightsNotFoundError(_not_found_message(name, weights_dir, looked))


def _not_found_message(name: str, weights_dir: str | Path, looked: list[str]) -> str:
    stem = local_candidates(name, weights_dir)[0].stem
    remedies = [f"put {stem}.safetensors (or .pth) into {Path(weights_dir)}/",
                "or set model.weights=/path/file"]
    if name.startswith(TIMM_PREFIX):
        remedies.append("or run once with internet (HF_HUB_OFFLINE unset) to fill the timm "
                        "cache ($HF_HOME)")
    elif name in TORCHVISION_RESNETS:
        remedies.append("or run once with internet (HF_HUB_OFFLINE unset) to fill torch's "
                        f"cache ($TORCH_HOME), or `make weights MODEL={name}` on a machine with it")
    remedies.append("or set model.pretrained=false to train from scratch")
    return (f"pretrained weights for {name} not found; looked at:\n  " + "\n  ".join(looked)
            + "\nTo fix: " + ", ".join(remedies) + ".")


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _is_head_key(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key.startswith(prefix + ".") for prefix in prefixes)


def _listed(keys: list[str]) -> str:
    more = f" ... ({len(keys)} in all)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def load_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "") -> str:
    """Load strictly, except a head of another shape, which is dropped; returns what was loaded.

    Raises WeightsMismatchError naming the first few missing/unexpected/mis-shaped keys. The check
    runs before anything is copied, so a failed load leaves the model untouched.
    """
    own = model.state_dict()
    heads = _classifier_prefixes(model)
    dropped = [k for k in state_dict
               if _is_head_key(k, heads) and (k not in own or own[k].shape != state_dict[k].shape)]
    state_dict = {k: v for k, v in state_dict.items() if k not in dropped}

    problems = []
    unexpected = [k for k in state_dict if k not in own]
    # Old checkpoints lack BN's num_batches_tracked: a counter, not a weight; BN fills it in.
    missing = [k for k in own if k not in state_dict and not _is_head_key(k, heads)
               and not k.endswith("num_batches_tracked")]
    shapes = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if shapes:
        problems.append(f"shape mismatch: {_listed(shapes)}")
    if problems:
        raise WeightsMismatchError(f"weights {source} do not fit {type(model).__name__}:\n  "
                                   + "\n  ".join(problems))

    model.load_state_dict(state_dict, strict=False)
    if dropped:
        head = "classifier head left fresh (the file's has another class count)"
    elif any(_is_head_key(k, heads) for k in state_dict):
        head = "classifier head loaded"
    else:
        head = "classifier head left fresh (none in the file)"
    return f"loaded {len(state_dict)} tensors from {source}; {head}"


def load_pretrained(model: nn.Module, name: str, weights: str | Path | None = None,
                    weights_dir: str | Path = "weights") -> str:
    """Find and load `name`'s weights into `model`; returns a one-line summary."""
    path = find_weights(name, weights, weights_dir, getattr(model, "pretrained_cfg", None))
    return load_state_dict(model, read_state_dict(path), source=str(path))


def timm_pretrained_cfg(name: str) -> dict:
    """The pretrained_cfg timm gives model `timm/<bare>` (its hub repo and file), from a model
    built on the meta device: no memory, no weights."""
    import timm

    with torch.device("meta"):
        return dict(timm.create_model(name[len(TIMM_PREFIX):], pretrained=False).pretrained_cfg)


def weights_file(name: str, weights: str | Path | None, weights_dir: str | Path) -> Path:
    """The weights file of model `name` as `model.pretrained: true` finds it (a timm model's
    downloaded on first use): what `make weights` fetches ahead."""
    cfg = timm_pretrained_cfg(name) if name.startswith(TIMM_PREFIX) else None
    return find_weights(name, weights, weights_dir, cfg)
