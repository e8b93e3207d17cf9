"""Kaggle's side of a submission, through the official `kaggle` package: the one module that
imports it.

    api = connect()                                            # authenticated, or PipelineError
    slug = kaggle_slug(config.data)                            # `kaggle:` of the competition's YAML
    ref = upload(api, slug, csv, "resnet18 cv=0.9123 ...")
    rows = scores_on_kaggle(api, slug)                         # ref, date, public, ...

The package authenticates when it is imported (`import kaggle` runs `api.authenticate()`):
without credentials kaggle 1.7-1.8 print a page of help and call exit(1), 1.5-1.6 raise OSError,
2.x go on unauthenticated (and then `authenticate()` exits). So it is imported here, lazily,
authenticated explicitly, and each way that fails becomes one message with the remedy; so do
the errors of its calls (requests' HTTPError with the status code, a connection that fails).
Both package generations are read: kagglesdk's `public_score` and the older `publicScore`.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.base.config import DataConfig
from pipeline.base.utils import PipelineError

CREDENTIALS = ("generate a token at https://www.kaggle.com/settings/api and export "
               "KAGGLE_API_TOKEN=<token> (or save it to ~/.kaggle/access_token), or run `kaggle "
               "auth login`; the older kaggle.json (~/.kaggle/kaggle.json, chmod 600) and "
               "KAGGLE_USERNAME/KAGGLE_KEY work too")
# Kaggle answers a submission past the day's allowance with a 400 whose text says so ("Your
# team has used its daily Submission allowance (5) today")
DAILY_LIMIT_WORDS = ("daily", "allowance")


def kaggle_slug(data: DataConfig) -> str:
    """The competition's name on Kaggle, from its YAML; the error says where to set it."""
    if not data.kaggle:
        where = data.config_file or f"configs/data/{data.name}.yaml"
        raise PipelineError(f"{where} does not name the competition on Kaggle: add "
                            f"`kaggle: <name>`, the name in its URL (kaggle.com/competitions/"
                            f"<name>), e.g. `kaggle: aptos2019-blindness-detection`")
    return data.kaggle


def connect() -> Any:
    """The `kaggle` package's authenticated API object. Its own help text (a page of it, on
    stdout) is held back: the one message below says what to do."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            import kaggle
            kaggle.api.authenticate()  # kaggle 2.x: an import without credentials goes on
    except ImportError as err:
        raise PipelineError(f"the `kaggle` package could not be imported ({err}): "
                            f"`.venv/bin/pip install kaggle` (and any module the error "
                            f"names)") from None
    except SystemExit:  # authenticate() prints its help and calls exit(1)
        raise PipelineError(f"Kaggle found no credentials: {CREDENTIALS}") from None
    except (OSError, ValueError) as err:  # kaggle 1.5-1.6; a kaggle.json without its key
        if from_requests(err):  # 2.x checks a token with Kaggle: no network, a proxy
            raise PipelineError(explained(err, status_of(err), "")) from None
        raise PipelineError(f"Kaggle could not authenticate ({err}): {CREDENTIALS}") from None
    return kaggle.api


def upload(api: Any, slug: str, csv: Path, message: str) -> str:
    """Submit `csv` to competition `slug`; Kaggle's reference of the submission ("" when the
    package's answer carries none, as the older ones do)."""
    answer = call(lambda: api.competition_submit(str(csv), message, slug, quiet=True), slug)
    said = str(getattr(answer, "message", "") or "")
    if "could not" in said.lower():  # the package's own word for an upload that failed
        raise PipelineError(f"Kaggle did not take {csv}: {said} (the package printed why above);"
                            f" fix that, then run the command again")
    ref = getattr(answer, "ref", None)
    return str(ref) if ref else ""


PAGE_SIZE, MAX_PAGES = 100, 50  # 5,000 submissions: more than any competition allows a team


def scores_on_kaggle(api: Any, slug: str) -> list[dict[str, Any]]:
    """Every submission of ours to competition `slug` as Kaggle lists it, newest first: ref,
    date, description, file, status (complete, pending, error), Kaggle's error text and the
    public and private scores (None until scored; the private one until the competition
    ends). Kaggle answers a page at a time."""
    found, seen = [], set()
    for page in range(1, MAX_PAGES + 1):
        batch = [s for s in call(lambda: listed_page(api, slug, page), slug) or [] if s is not None]
        refs = {str(field(s, "ref")) for s in batch}
        if not batch or refs <= seen:  # the end, or a package that ignores the page asked for
            break
        found += [s for s in batch if str(field(s, "ref")) not in seen]
        seen |= refs
        if len(batch) < PAGE_SIZE:
            break
    return [{"ref": str(field(s, "ref") or ""), "date": field(s, "date"),
             "description": str(field(s, "description") or ""),
             "file": str(field(s, "file_name", "fileName") or ""),
             "status": status_word(field(s, "status")),
             "error": str(field(s, "error_description", "errorDescription") or ""),
             "public": score(field(s, "public_score", "publicScore")),
             "private": score(field(s, "private_score", "privateScore"))}
            for s in found]


def listed_page(api: Any, slug: str, page: int) -> Any:
    """One page of the submissions list (kaggle 1.5-1.6 take no page number: one page)."""
    try:
        return api.competition_submissions(slug, page_number=page, page_size=PAGE_SIZE)
    except TypeError:
        return api.competition_submissions(slug) if page == 1 else []


def field(item: Any, *names: str) -> Any:
    """The first of `names` the item has (an object's attribute, or a dict's key)."""
    for name in names:
        value = item.get(name) if isinstance(item, dict) else getattr(item, name, None)
        if value is not None:
            return value
    return None


def status_word(status: Any) -> str:
    """complete, pending or error, from kagglesdk's SubmissionStatus.COMPLETE or a string."""
    return str(getattr(status, "name", status) or "").rsplit(".", 1)[-1].lower()


def score(value: Any) -> float | None:
    """A score as Kaggle gives it ("0.91234", "" or None before it is scored)."""
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def status_of(err: Exception) -> int | None:
    """The HTTP status of a requests error with an answer (None: no answer came)."""
    return getattr(getattr(err, "response", None), "status_code", None)


def from_requests(err: Exception) -> bool:
    """Whether `err` is one of requests' (or urllib3's): a call that failed on the way."""
    return type(err).__module__.split(".")[0] in ("requests", "urllib3")


def call(request: Callable[[], Any], slug: str) -> Any:
    """`request()`, with the ways Kaggle's API fails told apart, each with what to do."""
    try:
        return request()
    except Exception as err:  # noqa: BLE001 - requests' errors, without importing requests
        if status_of(err) is None and not (isinstance(err, OSError) or from_requests(err)):
            raise
        raise PipelineError(explained(err, status_of(err), slug)) from None


def explained(err: Exception, status: int | None, slug: str) -> str:
    """One message for each way a call fails: its cause in Kaggle's terms and the remedy."""
    page = f"https://www.kaggle.com/competitions/{slug}"
    text = str(getattr(getattr(err, "response", None), "text", "") or err).strip()
    if status is None:
        return (f"could not reach Kaggle ({type(err).__name__}: {err}): check the network (a "
                f"proxy: HTTPS_PROXY), then run the command again; after a failed upload, "
                f"`make lb` first shows whether Kaggle got it before you send it again")
    if status == 401:
        return f"Kaggle refused the credentials (401): {CREDENTIALS}"
    if status == 403:
        return (f"Kaggle refused (403): accept the competition's rules on {page}/rules (Join "
                f"Competition) with the account of your credentials")
    if status == 404:
        return (f"Kaggle knows no competition {slug!r} (404): set `kaggle:` in the competition's "
                f"YAML to the name in its URL ({page})")
    if status == 429:
        return "Kaggle asks for fewer requests (429): wait a minute, then run the command again"
    if status == 400 and any(word in text.lower() for word in DAILY_LIMIT_WORDS):
        return (f"Kaggle says the day's submissions are used up ({text[:200]}): submit again "
                f"after midnight UTC")
    return f"Kaggle answered {status}: {text[:300]}"
