"""Loading the video diffusion model (UNet3D, VAE, CLIP text encoder, tokenizer, DPM scheduler).

`load_video_model` builds a `VideoModel` for a `RunModelSpec`: tiny specs are built in memory,
others come from a local folder (`model_path`) or the Hugging Face cache / hub.
`resolve_model_folder` holds the rules for finding weights (cache first, offline mode, a fast
failure without network) so other model loaders (OWL-ViT, upsampler, GLIGEN) can share them.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet3DConditionModel
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from transformers import CLIPTextModel, CLIPTokenizer

from models.registry import GLIGEN_CROSS_ATTENTION_DIM, RunModelSpec
from models.tokenizer import load_tokenizer

try:  # the HTTP client huggingface_hub uses (renamed httpx2 in recent releases)
    from httpx2 import HTTPError as _HubTransportError
except ImportError:  # pragma: no cover - older huggingface_hub
    from httpx import HTTPError as _HubTransportError

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

# Seconds to wait for the hub before concluding it is unreachable (a black-holed network or a
# hanging DNS lookup would otherwise block for minutes).
HUB_PROBE_TIMEOUT_S = 5.0
# A hub-like video model folder (the layout of damo-vilab/text-to-video-ms-1.7b).
VIDEO_MODEL_CONFIG_FILES = (
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)
VIDEO_MODEL_WEIGHT_FOLDERS = ("unet", "vae", "text_encoder")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


class MissingWeightsError(FileNotFoundError):
    """Model weights are neither in the given folder nor in the local cache, and cannot be downloaded."""


@dataclasses.dataclass(frozen=True)
class VideoModel:
    """The components of a text-to-video diffusion model, on one device and dtype, frozen, in eval mode.

    `scheduler` is stateful (`set_timesteps`); a sampling run should use `make_scheduler()`.
    `source` says where the weights came from (for the run's config JSON).
    """

    unet: UNet3DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DPMSolverMultistepScheduler
    device: torch.device
    dtype: torch.dtype
    spec: RunModelSpec | None
    source: str

    def make_scheduler(self) -> DPMSolverMultistepScheduler:
        """A fresh scheduler with this model's config (no timesteps or solver state carried over)."""
        return DPMSolverMultistepScheduler.from_config(self.scheduler.config)


# ---------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``name`` as a torch.device; None picks CUDA when available, else CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {name!r} (expected e.g. 'cpu', 'cuda', 'cuda:1')") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """``name`` ("fp16", "bf16", "fp32" or a torch dtype) as a torch.dtype.

    None gives fp16 on CUDA (as the reference) and fp32 elsewhere (fp16 on CPU is slow and lossy).
    """
    device = torch.device(device)
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        key = str(name).lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected one of fp16, bf16, fp32 (or a torch dtype)")
        dtype = _DTYPES[key]
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported model dtype {dtype}; expected float16, bfloat16 or float32")
    if dtype == torch.float16 and device.type == "cpu":
        logger.warning("fp16 on CPU is slow and some kernels are missing; consider fp32 or bf16")
    return dtype


# ---------------------------------------------------------------------------------------------
# Finding weights


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
                             revision: str | None = None) -> str:
    """What was looked for, where, why it failed, and the ways to fix it."""
    name = model_id or "the model"
    fixes = []
    if model_id:
        download = f"hf download {model_id}" + (f" --revision {revision}" if revision else "")
        fixes.append(f"download it on a machine with internet (`{download}`, the huggingface_hub "
                     "CLI) and copy the HF cache here or point HF_HUB_CACHE at the copy")
        fixes.append(f"or download it to a folder (`{download} --local-dir DIR`) and pass "
                     "`--model-path DIR` (model_path=DIR)")
    else:
        fixes.append("pass `--model-path DIR` (model_path=DIR) pointing at a folder with the model files")
    if model_id and is_hub_offline():
        fixes.append("or unset HF_HUB_OFFLINE to download it now")
    return (f"weights for {name} not found: {reason}. Tried: {'; '.join(tried)}. "
            f"To fix: {'; '.join(fixes)}.")


def resolve_model_folder(model_id: str | None, model_path: str | os.PathLike | None = None,
                         revision: str | None = None, *, required_files: Sequence[str] = (),
                         weight_folders: Sequence[str] = ("",), local_files_only: bool = False,
                         cache_dir: str | os.PathLike | None = None,
                         hub_timeout_s: float = HUB_PROBE_TIMEOUT_S) -> Path:
    """The local folder holding ``model_id``'s files; raises `MissingWeightsError` within seconds otherwise.

    Order: ``model_path`` if given (must contain the files, no fallback); the HF cache; a download,
    unless HF_HUB_OFFLINE is set or ``local_files_only``. Without network the hub probe fails within
    ``hub_timeout_s`` (+1 s). ``required_files`` are glob patterns that must exist in the folder;
    ``weight_folders`` are subfolders ("" = the top) that must each hold a .safetensors or .bin file.
    """
    message = functools.partial(_missing_weights_message, revision=revision)
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


# ---------------------------------------------------------------------------------------------
# Building the VideoModel


def cast_module(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating-point parameters and buffers to ``dtype`` (no-op when they already are).

    Uses half()/float()/bfloat16(): diffusers' `.to(dtype)` logs a spurious fp32-modules warning.
    """
    if all(t.dtype == dtype for t in module.parameters() if t.is_floating_point()):
        return module
    cast = {torch.float16: module.half, torch.float32: module.float, torch.bfloat16: module.bfloat16}[dtype]
    return cast()


def prepare_modules(modules: Sequence[torch.nn.Module], device: torch.device, dtype: torch.dtype) -> None:
    """Move to device/dtype, switch to eval mode and freeze parameters (guidance needs gradients
    w.r.t. latents only)."""
    for module in modules:
        cast_module(module, dtype)
        module.to(device=device)
        module.eval()
        module.requires_grad_(False)


def assemble_video_model(components: dict[str, Any], device: torch.device, dtype: torch.dtype,
                         spec: RunModelSpec | None, source: str) -> VideoModel:
    """A `VideoModel` from freshly built or loaded components (moved, frozen, VAE slicing on)."""
    prepare_modules([components["unet"], components["vae"], components["text_encoder"]], device, dtype)
    # Decode one frame per VAE call to bound memory (spec 1.5: every LVD-family model has slicing on).
    components["vae"].enable_slicing()
    return VideoModel(unet=components["unet"], vae=components["vae"], text_encoder=components["text_encoder"],
                      tokenizer=components["tokenizer"], scheduler=components["scheduler"],
                      device=device, dtype=dtype, spec=spec, source=source)


def load_dpm_scheduler(folder: str | os.PathLike) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ built from the model's own (DDIM) scheduler config (spec 5.1).

    DDIM keys DPM does not know are dropped; keys the file lacks (timestep_spacing) take DPM's defaults.
    """
    config = DPMSolverMultistepScheduler.load_config(str(folder), subfolder="scheduler")
    return DPMSolverMultistepScheduler.from_config(config)


def load_components_from_folder(folder: Path, dtype: torch.dtype, *, grounded: bool = False,
                                cross_attention_dim: int | None = None) -> dict[str, Any]:
    """Load unet / vae / text_encoder / tokenizer / scheduler from a hub-like folder (no network).

    ``grounded``: the UNet is the GLIGEN one of LVD-GLIGEN / LVD-plus (models/gligen.py, loaded
    strictly; its config must say ``attention_type: "gated"`` and, unless None, ``cross_attention_dim``).
    """
    try:
        if grounded:
            from models.gligen import load_grounded_unet  # lazy: models.gligen imports this module

            unet = load_grounded_unet(folder, dtype, cross_attention_dim=cross_attention_dim)
        else:
            unet = UNet3DConditionModel.from_pretrained(str(folder), subfolder="unet", dtype=dtype,
                                                        local_files_only=True)
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", dtype=dtype, local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), dtype=dtype,
                                                     local_files_only=True)
    except OSError as exc:  # diffusers / transformers raise OSError (EnvironmentError) for missing files
        raise MissingWeightsError(f"could not load model weights from {folder}: {exc}") from exc
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder,
            "tokenizer": load_tokenizer(folder / "tokenizer"), "scheduler": load_dpm_scheduler(folder)}


def resolve_video_model_folder(spec: RunModelSpec, model_path: str | os.PathLike | None = None, *,
                               local_files_only: bool = False,
                               cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder of ``spec``'s video model (see `resolve_model_folder`)."""
    return resolve_model_folder(spec.model_id, model_path, spec.revision, required_files=VIDEO_MODEL_CONFIG_FILES,
                                weight_folders=VIDEO_MODEL_WEIGHT_FOLDERS, local_files_only=local_files_only,
                                cache_dir=cache_dir)


def load_video_model(spec: RunModelSpec, model_path: str | os.PathLike | None = None,
                     device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, *,
                     local_files_only: bool = False, cache_dir: str | os.PathLike | None = None,
                     seed: int = 0) -> VideoModel:
    """Load the video model of ``spec`` on ``device`` (default: CUDA if available) in ``dtype``
    (default: fp16 on CUDA, fp32 on CPU).

    Tiny specs are built in memory from ``seed`` unless ``model_path`` is given. Others are loaded
    from ``model_path`` or the HF cache / hub; `MissingWeightsError` says what was tried and how to fix it.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if spec.tiny and model_path is None:
        from models import tiny  # lazy: models.tiny imports this module
        components = tiny.build_tiny_components(seed, grounded=spec.grounded)
        source = f"tiny random weights (seed {seed})"
    else:
        folder = resolve_video_model_folder(spec, model_path, local_files_only=local_files_only,
                                            cache_dir=cache_dir)
        logger.info("loading %s from %s (%s, %s)", spec.model_id or spec.name, folder, device, dtype)
        components = load_components_from_folder(
            folder, dtype, grounded=spec.grounded,
            cross_attention_dim=None if spec.tiny else GLIGEN_CROSS_ATTENTION_DIM)  # published adapters: 1024
        source = str(folder)
    return assemble_video_model(components, device, dtype, spec, source)
