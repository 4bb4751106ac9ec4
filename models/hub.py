"""Finding model weights: a local folder, the Hugging Face cache, or the hub, and a clear error when
they are nowhere (the missing-weights message names the model id, what was tried and how to fix it).

Every loader of the project (video models, GLIGEN adapters, upsamplers, OWL-ViT) shares these rules:
cache first, ``HF_HUB_OFFLINE`` respected at call time, a fast failure without network.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

try:  # the HTTP client huggingface_hub uses (renamed httpx2 in recent releases)
    from httpx2 import HTTPError as _HubTransportError
except ImportError:  # pragma: no cover - older huggingface_hub
    from httpx import HTTPError as _HubTransportError

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

# Seconds to wait for the hub before concluding it is unreachable (a black-holed network or a
# hanging DNS lookup would otherwise block for minutes).
HUB_PROBE_TIMEOUT_S = 5.0
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


class MissingWeightsError(FileNotFoundError):
    """Model weights are neither in the given folder nor in the local cache, and cannot be downloaded."""


def is_hub_offline() -> bool:
    """Offline mode, read at call time (huggingface_hub reads HF_HUB_OFFLINE only at import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in _TRUE_VALUES


def default_hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, from the environment at call time (same rules as huggingface_hub)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface")
    return Path(os.path.expandvars(hf_home)).expanduser() / "hub"


def hub_endpoint() -> str:
    """The hub URL, from HF_ENDPOINT at call time."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def select_hub_files(filenames: Sequence[str]) -> list[str]:
    """The files of a hub repo that a load needs: configs, tokenizer and code files, and one weight
    format per folder (non-variant safetensors, else non-variant .bin, else whatever weights exist).

    This avoids downloading both .bin and .safetensors, and the fp16 variants, of a 1.7B model.
    """
    selected = [name for name in filenames
                if name.endswith((".json", ".txt", ".py", ".model")) and not name.startswith(".")]
    weights_by_folder: dict[str, list[str]] = {}
    for name in filenames:
        if name.endswith(WEIGHT_SUFFIXES):
            weights_by_folder.setdefault(os.path.dirname(name), []).append(name)
    for names in weights_by_folder.values():
        chosen: list[str] = []
        for suffix in WEIGHT_SUFFIXES:
            # A variant ("model.fp16.safetensors") has an extra dot-separated part before the suffix.
            chosen = [n for n in names if n.endswith(suffix) and "." not in os.path.basename(n)[:-len(suffix)]]
            if chosen:
                break
        selected.extend(chosen or names)
    return sorted(selected)


def find_missing_files(folder: Path, required_files: Sequence[str] = (),
                       weight_folders: Sequence[str] = ()) -> list[str]:
    """Entries of ``required_files`` (glob patterns relative to ``folder``) that match nothing, plus
    ``<folder>/*.safetensors|bin`` for each of ``weight_folders`` that holds no weight file."""
    missing = [pattern for pattern in required_files if not any(folder.glob(pattern))]
    for sub in weight_folders:
        sub_dir = folder / sub if sub else folder
        has_weights = sub_dir.is_dir() and any(path.name.endswith(WEIGHT_SUFFIXES) for path in sub_dir.iterdir())
        if not has_weights:
            missing.append(f"{sub + '/' if sub else ''}*.safetensors|*.bin")
    return missing


def _call_with_deadline(fn: Callable[[], _T], timeout_s: float) -> _T:
    """``fn()``, or TimeoutError after ``timeout_s`` seconds.

    Runs in a daemon thread because not every stall honours the HTTP timeout (DNS lookups do not);
    an abandoned call finishes or dies in the background without blocking exit.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _missing_weights_message(model_id: str | None, tried: Sequence[str], reason: str,
                             revision: str | None = None, path_flag: str = "--model-path") -> str:
    """What was looked for, where, why it failed, and the ways to fix it; ``path_flag`` is the caller's
    command-line flag for a local folder (``--model-path``, the detector's ``--detector-path``)."""
    name = model_id or "the model"
    fixes = []
    if model_id:
        download = f"hf download {model_id}" + (f" --revision {revision}" if revision else "")
        fixes.append(f"download it on a machine with internet (`{download}`, the huggingface_hub "
                     "CLI) and copy the HF cache here or point HF_HUB_CACHE at the copy")
        fixes.append(f"or download it to a folder (`{download} --local-dir DIR`) and pass "
                     f"`{path_flag} DIR`")
    else:
        fixes.append(f"pass `{path_flag} DIR` pointing at a folder with the model files")
    if model_id and is_hub_offline():
        fixes.append("or unset HF_HUB_OFFLINE to download it now")
    return (f"weights for {name} not found: {reason}. Tried: {'; '.join(tried)}. "
            f"To fix: {'; '.join(fixes)}.")


def resolve_model_folder(model_id: str | None, model_path: str | os.PathLike | None = None,
                         revision: str | None = None, *, required_files: Sequence[str] = (),
                         weight_folders: Sequence[str] = ("",), local_files_only: bool = False,
                         cache_dir: str | os.PathLike | None = None,
                         hub_timeout_s: float = HUB_PROBE_TIMEOUT_S, path_flag: str = "--model-path") -> Path:
    """The local folder holding ``model_id``'s files; raises `MissingWeightsError` within seconds otherwise.

    Order: ``model_path`` if given (must contain the files, no fallback); the HF cache; a download,
    unless HF_HUB_OFFLINE is set or ``local_files_only``. Without network the hub probe fails within
    ``hub_timeout_s`` (+1 s). ``required_files`` are glob patterns that must exist in the folder;
    ``weight_folders`` are subfolders ("" = the top) that must each hold a .safetensors or .bin file.
    ``path_flag`` is the caller's flag for a local folder, named in the error message.
    """
    message = functools.partial(_missing_weights_message, revision=revision, path_flag=path_flag)
    if model_path is not None:
        folder = Path(model_path).expanduser()
        if not folder.is_dir():
            raise MissingWeightsError(message(
                model_id, [f"model path {folder}"], "the model path is not a folder"))
        missing = find_missing_files(folder, required_files, weight_folders)
        if missing:
            raise MissingWeightsError(message(
                model_id, [f"model path {folder}"], "missing " + ", ".join(missing)))
        return folder

    if not model_id:
        raise MissingWeightsError(message(None, ["nothing"], "no model id and no model path given"))
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_hub_cache_dir()
    cache_entry = cache_dir / ("models--" + model_id.replace("/", "--"))
    tried = [f"HF cache {cache_entry}" + (f" (revision {revision})" if revision else "")]

    cached_problem = "not in the cache"
    try:
        folder = Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        folder = None
    except HFValidationError as exc:
        raise MissingWeightsError(message(
            model_id, tried, f"{model_id!r} is not a valid hub model id ({exc})")) from exc
    if folder is not None:
        missing = find_missing_files(folder, required_files, weight_folders)
        if not missing:
            return folder
        cached_problem = "the cached copy lacks " + ", ".join(missing)

    if local_files_only or is_hub_offline():
        mode = "HF_HUB_OFFLINE is set" if is_hub_offline() else "local_files_only=True"
        raise MissingWeightsError(message(model_id, tried, f"{cached_problem} and {mode}"))

    endpoint = hub_endpoint()
    tried.append(f"hub {endpoint}/{model_id}")
    try:
        # A short, single request first: without network this fails fast instead of retrying.
        info = _call_with_deadline(
            lambda: HfApi(endpoint=endpoint).model_info(model_id, revision=revision, timeout=hub_timeout_s),
            hub_timeout_s + 1.0)
    except (HfHubHTTPError, _HubTransportError, OSError, ValueError) as exc:
        raise MissingWeightsError(message(
            model_id, tried, f"{cached_problem} and the hub is unreachable or refused ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})")) from exc
    filenames = [sibling.rfilename for sibling in (info.siblings or [])]
    logger.info("downloading %s (%d files) into %s", model_id, len(select_hub_files(filenames)), cache_dir)
    try:
        folder = Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir, endpoint=endpoint,
                                        allow_patterns=select_hub_files(filenames)))
    except (HfHubHTTPError, _HubTransportError, OSError, ValueError) as exc:
        raise MissingWeightsError(message(
            model_id, tried, f"{cached_problem} and the download failed ({type(exc).__name__}: {exc})")) from exc
    missing = find_missing_files(folder, required_files, weight_folders)
    if missing:
        raise MissingWeightsError(message(
            model_id, tried + [f"downloaded copy {folder}"], "the repo lacks " + ", ".join(missing)))
    return folder
