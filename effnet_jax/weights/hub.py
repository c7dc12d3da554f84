"""timm checkpoints from the Hugging Face Hub: `--init hf-hub:timm/<name>[@revision]`.

timm publishes each EfficientNet as `model.safetensors` + `config.json` in a Hub repo. `hub_files` fetches both with
`huggingface_hub.hf_hub_download`, so they land in (and are found in) the standard HF cache that timm shares, and
`HF_ENDPOINT`, `HF_HUB_OFFLINE`, `HF_HOME`/`HF_HUB_CACHE` and `HF_TOKEN` behave as users know them. What this module
adds: each failure a user can fix is one `UserError` line saying what to do, an unreachable Hub fails (or falls back
to the cache) in seconds, and a file cut short or not what its name says is not left in the cache. Only safetensors
is read: no torch, no TensorFlow.
"""

from __future__ import annotations

import json
import pathlib
import time

import httpx2
import huggingface_hub
import safetensors
from huggingface_hub import constants
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import repo_folder_name

from effnet_jax.errors import ConfigError, UserError, describe
from effnet_jax.weights.timm_checkpoint import CONFIG_FILE, HUB_PREFIX, WEIGHTS_FILE

__all__ = ["HUB_PREFIX", "CONFIG_FILE", "WEIGHTS_FILE", "HubError", "HubOfflineError", "HubNotFoundError",
           "HubAccessError", "HubDownloadError", "HubFileError", "parse_hub_id", "hub_files"]

_EXAMPLE = "hf-hub:timm/tf_efficientnet_b0.ns_jft_in1k"
_OFFLINE_SET = "HF_HUB_OFFLINE is set"
# A `*.incomplete` blob untouched this long belongs to no live download (an active one writes every chunk, a stalled
# one gives up within about a minute): removed after a failed transfer; younger ones may be another process's.
_STALE_INCOMPLETE_S = 300


class HubError(UserError, RuntimeError):
    """A Hub checkpoint that cannot be had; the message says what to do."""


class HubOfflineError(HubError):
    """The Hub cannot be reached (or HF_HUB_OFFLINE is set) and the file is not in the cache."""


class HubNotFoundError(HubError):
    """The repo, the revision or the file does not exist (or the repo is private)."""


class HubAccessError(HubError):
    """The repo is gated, or the token was refused."""


class HubDownloadError(HubError):
    """A transfer failed (connection lost, server error); nothing of the file is kept."""


class HubFileError(HubError):
    """A downloaded file is not what its name says; it has been removed from the cache."""


def parse_hub_id(init: str) -> tuple[str, str | None]:
    """`"hf-hub:timm/name@rev"` -> `("timm/name", "rev")`; the revision is None without `@`."""
    if not init.startswith(HUB_PREFIX):
        raise ConfigError(f"{init!r} is not a Hub id: expected hf-hub:<org>/<name>[@revision], e.g. {_EXAMPLE}")
    repo_id, at, revision = init[len(HUB_PREFIX):].partition("@")
    if at and not revision:
        raise ConfigError(f"{init!r}: nothing after '@': give a branch, tag or commit, or leave out '@'")
    _validate(repo_id, init)
    return repo_id, revision or None


def hub_files(repo_id: str, revision: str | None = None) -> tuple[pathlib.Path, dict]:
    """The cached `model.safetensors` of a Hub repo and its parsed `config.json`, downloaded when missing or when
    the revision moved on; checked (JSON object, readable safetensors header), a bad file removed from the cache.
    Every failure the user can fix raises a `HubError` (a `UserError`: one line saying what to do)."""
    _validate(repo_id, repo_id)
    offline = _offline_reason(repo_id, revision)
    config_path = _download(repo_id, CONFIG_FILE, revision, offline)
    config = _read_config(config_path, repo_id)
    weights_path = _download(repo_id, WEIGHTS_FILE, revision, offline)
    _check_weights(weights_path, repo_id)
    return weights_path, config


def _validate(repo_id: str, given: str) -> None:
    try:
        huggingface_hub.utils.validate_repo_id(repo_id)
    except hf_errors.HFValidationError as e:
        raise ConfigError(f"{given!r} is not a Hub repo id ({_one_line(e)}), e.g. {_EXAMPLE}") from e


def _offline_reason(repo_id: str, revision: str | None) -> str | None:
    """Why the Hub cannot be asked, or None when it answers: one HEAD without retries. hf_hub_download retries an
    unreachable endpoint 5 times (backoff 1+2+4+8+8 s) before it fails; told offline, it goes to the cache at once."""
    if constants.is_offline_mode():
        return _OFFLINE_SET
    url = huggingface_hub.hf_hub_url(repo_id, CONFIG_FILE, revision=revision)
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except (httpx2.ConnectError, httpx2.TimeoutException, hf_errors.OfflineModeIsEnabled) as e:
        return f"the Hub at {constants.ENDPOINT} cannot be reached ({_one_line(e)})"
    except (httpx2.HTTPError, OSError):  # it answered: an HTTP error is hf_hub_download's to report
        pass
    return None


def _download(repo_id: str, filename: str, revision: str | None, offline: str | None) -> pathlib.Path:
    """`hf_hub_download` (from the cache only when `offline` says why), its errors turned into one-line messages."""
    repo = HUB_PREFIX + repo_id + (f"@{revision}" if revision else "")
    cache = constants.HF_HUB_CACHE
    try:
        return pathlib.Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision,
                                                            local_files_only=offline is not None))
    except hf_errors.LocalEntryNotFoundError as e:
        cause = e.__cause__
        if offline is None and not isinstance(cause, (httpx2.TransportError, hf_errors.OfflineModeIsEnabled)):
            raise HubDownloadError(f"could not get {filename} of {repo} from {constants.ENDPOINT} "
                                   f"({_one_line(cause or e)}), and it is not in the Hugging Face cache {cache}") from e
        fetch = f"hf download {repo_id} {WEIGHTS_FILE} {CONFIG_FILE}" + (f" --revision {revision}" if revision else "")
        mirror = "unset HF_HUB_OFFLINE, or set HF_ENDPOINT to a Hub mirror" if offline == _OFFLINE_SET \
            else "set HF_ENDPOINT to a Hub mirror"
        raise HubOfflineError(
            f"cannot download {repo}: {offline or _one_line(cause)}, and its {filename} is not in the Hugging Face "
            f"cache {cache}. To fetch it: on a machine with internet run `{fetch}` and copy that machine's cache "
            f"(~/.cache/huggingface/hub, or its HF_HUB_CACHE) to {cache}; or {mirror}; or pass a local .safetensors "
            "file instead") from e
    except hf_errors.GatedRepoError as e:
        raise HubAccessError(
            f"{repo} is gated: accept its conditions on {constants.ENDPOINT}/{repo_id} while logged in, and give "
            "this machine your token: set HF_TOKEN or run `hf auth login`") from e
    except hf_errors.RepositoryNotFoundError as e:
        raise HubNotFoundError(
            f"{repo}: no such model repo on {constants.ENDPOINT} (check the name, e.g. {_EXAMPLE}; a private repo "
            "needs a token: set HF_TOKEN or run `hf auth login`)") from e
    except hf_errors.RevisionNotFoundError as e:
        raise HubNotFoundError(f"{repo}: the repo has no revision {revision!r} (a branch, tag or commit)") from e
    except hf_errors.RemoteEntryNotFoundError as e:
        if filename == WEIGHTS_FILE:
            raise HubNotFoundError(
                f"{repo} has no {WEIGHTS_FILE}: only safetensors checkpoints are read (no torch, so not "
                "pytorch_model.bin); pick a timm repo that has one") from e
        raise HubNotFoundError(f"{repo} has no {filename}: is it a timm model repo?") from e
    except hf_errors.HfHubHTTPError as e:
        status = e.response.status_code
        if status in (401, 403):
            raise HubAccessError(f"{repo}: {constants.ENDPOINT} refused access to {filename} (HTTP {status}): "
                                 "check the token in HF_TOKEN or from `hf auth login`") from e
        raise HubDownloadError(f"could not download {filename} of {repo} ({_one_line(e)})") from e
    except (httpx2.HTTPError, OSError) as e:  # the transfer broke off, came short, or the disk is full
        _remove_stale_incomplete(repo_id)
        raise HubDownloadError(f"the download of {filename} of {repo} failed ({_one_line(e)}); nothing of it was "
                               f"kept in the Hugging Face cache {cache}: run again to retry") from e


def _read_config(path: pathlib.Path, repo_id: str) -> dict:
    try:
        config = json.loads(path.read_bytes())
        problem = None if isinstance(config, dict) else f"a JSON {type(config).__name__}, not an object"
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        problem = _one_line(e)
    if problem is not None:
        _discard(path)
        raise HubFileError(f"{CONFIG_FILE} of {HUB_PREFIX}{repo_id} is not a timm config ({problem}); removed it "
                           "from the Hugging Face cache: run again to download it anew")
    return config


def _check_weights(path: pathlib.Path, repo_id: str) -> None:
    """Open the file's safetensors header (cheap: the tensors are not read)."""
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            problem = None if list(f.keys()) else "it holds no tensors"
    except (safetensors.SafetensorError, OSError) as e:
        problem = _one_line(e)
    if problem is not None:
        _discard(path)
        raise HubFileError(f"{WEIGHTS_FILE} of {HUB_PREFIX}{repo_id} is not a safetensors file ({problem}); removed "
                           "it from the Hugging Face cache: run again to download it anew")


def _discard(path: pathlib.Path) -> None:
    """Remove a cached file: its snapshot entry and the blob it links to, so the next call downloads it again."""
    blob = path.resolve() if path.is_symlink() else None
    path.unlink(missing_ok=True)
    if blob is not None:
        blob.unlink(missing_ok=True)


def _remove_stale_incomplete(repo_id: str) -> None:
    """hf_hub_download removes its own partial file when a transfer fails (a name unique to the download); a
    process killed mid-transfer leaves its `*.incomplete` behind for good: remove those of this repo."""
    blobs = pathlib.Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"
    for path in blobs.glob("*.incomplete"):
        try:
            if time.time() - path.stat().st_mtime > _STALE_INCOMPLETE_S:
                path.unlink()
        except OSError:  # gone meanwhile
            pass


def _one_line(e: BaseException) -> str:
    return " ".join(describe(e).split())
