"""Hub ids to local folders: `folder("EleutherAI/gpt-neo-125m")` downloads what a model needs
into huggingface_hub's cache and returns the snapshot folder; a local folder is returned as is.

The client is `huggingface_hub`'s: one listing call (`HfApi.model_info`) says which files the
revision has and its commit, then `hf_hub_download` fetches each needed file of that commit
(with its own progress bar) into the standard cache, shared with `transformers`:

- `config.json`;
- the preferred checkpoint the repository has, in `CHECKPOINT_FILES` order (the order the
  folder reader uses): `model.safetensors`, its sharding index and shards, `pytorch_model.bin`
  (sharded or not), `flax_model.msgpack` (sharded or not); never two formats;
- the `TOKENIZER_FILES` it has (tokenizers of every format, `generation_config.json`).

The environment is read on every call, not once at import as huggingface_hub's own constants
are: `HF_ENDPOINT` (passed as `endpoint=`), `HF_HUB_CACHE` / `HF_HOME` (passed as `cache_dir=`),
`HF_TOKEN` (passed as `token=`; else the token `hf auth login` stored), and `HF_HUB_OFFLINE`
(or `TRANSFORMERS_OFFLINE`): set, only the cache is read (`local_files_only=True`). An offline
setting seen when huggingface_hub was imported also counts, since its HTTP session then
refuses every request whatever the variable says later.

Without network, a revision downloaded before is loaded from the cache, with a
`CachedCopyWarning`. Every failure is one `HubError` line naming the problem.
"""

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .checkpoint.readers import CHECKPOINT_FILES, read_weight_map
from .errors import CheckpointError, HubError

CONFIG_NAME = "config.json"
#: Files beside the weights that a model folder may carry and a converted folder keeps: the
#: tokenizer (fast and slow formats) and the generation defaults. The hub downloads those a
#: repository has; the weight loaders never read them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
)
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
_TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub accepts as a set flag

Want = Literal["model", "tokenizer", "adapter"]
#: A PEFT adapter folder: its config, then its weights in the first format it has.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class CachedCopyWarning(UserWarning):
    """The hub could not be reached and a cached copy of the revision was used instead."""


@dataclass(frozen=True)
class HubSettings:
    """The hub settings of the environment, as read at one call."""

    endpoint: str
    cache: Path
    offline: bool
    #: an access token; `False` sends none (not even a stored one)
    token: str | bool | None
    #: fetch every file again even if the cache has it (a per-call option, as HF's `force_download`)
    force_download: bool = False


def settings() -> HubSettings:
    """The current environment's `HF_ENDPOINT`, cache folder, offline flag and token."""
    from huggingface_hub import constants, get_token

    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    if os.environ.get("HF_HUB_CACHE"):
        cache = Path(os.environ["HF_HUB_CACHE"])
    elif os.environ.get("HF_HOME"):
        cache = Path(os.environ["HF_HOME"]) / "hub"
    else:
        cache = Path(constants.HF_HUB_CACHE)
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    offline = any((flag or "").upper() in _TRUE for flag in flags) or constants.HF_HUB_OFFLINE
    return HubSettings(endpoint, Path(os.path.expandvars(cache)).expanduser(), offline, get_token())


def is_local(path_or_repo_id: str | os.PathLike) -> bool:
    """Whether `path_or_repo_id` names a local path rather than a hub id: a path object, a
    string starting with `.`, `/` or `~`, or anything that exists on disk."""
    if not isinstance(path_or_repo_id, str):
        return True
    return path_or_repo_id.startswith((".", "/", "~")) or os.path.lexists(path_or_repo_id)


def folder(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    want: Want = "model",
    env: HubSettings | None = None,
) -> Path:
    """The local folder of a model: `path_or_repo_id` itself when it is a local folder (see
    `is_local`), else the hub snapshot folder of that repository id at `revision` (a branch,
    tag or commit; default `main`), downloaded into the cache if needed.

    **Arguments:**

    - `path_or_repo_id`: a folder, or a hub id (`"EleutherAI/gpt-neo-125m"`, `"gpt2"`).
    - `revision`: hub ids only.
    - `want`: `"model"` fetches config, weights and tokenizer files; `"tokenizer"` only the
      config and tokenizer files; `"adapter"` a PEFT adapter's config and weights.
    - `env`: the hub settings; default `settings()`, the environment's at this call.

    **Returns:** the folder. Raises `HubError` (a `CheckpointError`) naming the problem.
    """
    if want not in ("model", "tokenizer", "adapter"):
        raise ValueError(f"want must be 'model', 'tokenizer' or 'adapter', got {want!r}")
    if is_local(path_or_repo_id):
        path = Path(path_or_repo_id).expanduser()
        if revision is not None:
            raise CheckpointError(f"revision {revision!r} applies to hub ids; {path_or_repo_id} is a local path")
        if not path.exists():
            raise CheckpointError(f"{path_or_repo_id} is not a folder (it does not exist)")
        if not path.is_dir():
            raise CheckpointError(f"{path_or_repo_id} is not a folder (a file; pass the folder holding the model)")
        return path
    return _from_hub(path_or_repo_id, revision or DEFAULT_REVISION, want, env or settings())


# --------------------------------------------------------------------------- online


def _from_hub(repo_id: str, revision: str, want: Want, env: HubSettings) -> Path:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id
    from requests import ConnectionError, Timeout

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        detail = str(err).splitlines()[0]
        raise HubError(f"{repo_id!r} is neither a local folder nor a valid hub id ({detail})") from None
    if env.offline:
        return _cached(repo_id, revision, want, env, f"no folder {repo_id} here, HF_HUB_OFFLINE is set")
    api = HfApi(endpoint=env.endpoint, token=env.token)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=False)
    except HfHubHTTPError as err:
        raise _explain(err, repo_id, revision, env) from None
    except (ConnectionError, Timeout) as err:
        why = f"no folder {repo_id} here, cannot reach {env.endpoint} ({_reason(err)})"
        snapshot = _cached(repo_id, revision, want, env, why)
        warnings.warn(
            f"cannot reach {env.endpoint}: using the cached {repo_id}@{revision} (commit {snapshot.name})",
            CachedCopyWarning,
            stacklevel=3,
        )
        return snapshot
    names = {sibling.rfilename for sibling in info.siblings or ()}
    needed = _needed(names, want, repo_id, revision)
    # The first file is fetched by the revision's name, which records the branch or tag in
    # the cache (`refs/`) for offline use; the rest by the commit the listing gave.
    first = Path(_download(repo_id, needed[0], revision, env))
    snapshot = first.parent
    if snapshot.name != info.sha:
        raise HubError(
            f"{repo_id}@{revision} moved from commit {info.sha} to {snapshot.name} while downloading; run again"
        )
    for name in needed[1:]:
        _download(repo_id, name, info.sha, env)
        if name.endswith(".index.json"):
            shards = sorted(set(read_weight_map(snapshot / name).values()))
            absent = [shard for shard in shards if shard not in names]
            if absent:
                raise HubError(f"{repo_id}@{revision}: {name} lists shard(s) the repository lacks: {', '.join(absent)}")
            for shard in shards:
                _download(repo_id, shard, info.sha, env)
    return snapshot


def _needed(names: set[str], want: Want, repo_id: str, revision: str) -> list[str]:
    """The files to fetch, `config.json` first; shards are added after reading their index."""
    has = ", ".join(sorted(names)[:20]) + (" ..." if len(names) > 20 else "") if names else "no files"
    tokenizer = [name for name in TOKENIZER_FILES if name in names]
    if want == "tokenizer":
        if not tokenizer:
            looked_for = ", ".join(TOKENIZER_FILES)
            raise HubError(f"{repo_id}@{revision} has no tokenizer files (looked for {looked_for}); it has: {has}")
        return [CONFIG_NAME] * (CONFIG_NAME in names) + tokenizer
    if want == "adapter":
        weights = next((name for name in ADAPTER_WEIGHTS if name in names), None)
        if ADAPTER_CONFIG not in names or weights is None:
            raise HubError(
                f"{repo_id}@{revision} is not a PEFT adapter (it needs {ADAPTER_CONFIG} and "
                f"{' or '.join(ADAPTER_WEIGHTS)}); it has: {has}"
            )
        return [ADAPTER_CONFIG, weights]
    if CONFIG_NAME not in names:
        raise HubError(f"{repo_id}@{revision} has no {CONFIG_NAME}, so it is not a model we can load; it has: {has}")
    weights = next((name for name, _, _ in CHECKPOINT_FILES if name in names), None)
    if weights is None:
        looked_for = ", ".join(name for name, _, _ in CHECKPOINT_FILES)
        raise HubError(f"{repo_id}@{revision} has no supported weight file (looked for {looked_for}); it has: {has}")
    return [CONFIG_NAME, weights, *tokenizer]


def _download(repo_id: str, name: str, revision: str, env: HubSettings) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return hf_hub_download(
            repo_id,
            name,
            revision=revision,
            cache_dir=env.cache,
            endpoint=env.endpoint,
            token=env.token,
            force_download=env.force_download,
        )
    except LocalEntryNotFoundError as err:  # the request failed and the file is not cached
        raise HubError(
            f"cannot download {name} of {repo_id}@{revision} from {env.endpoint} ({_reason(err.__cause__ or err)})"
        ) from None
    except HfHubHTTPError as err:
        raise _explain(err, repo_id, revision, env, name) from None


# --------------------------------------------------------------------------- offline


def _cached(repo_id: str, revision: str, want: Want, env: HubSettings, why: str) -> Path:
    """The cached snapshot of `repo_id@revision`, checked to hold what `want` needs."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=env.cache, local_files_only=True))
    except LocalEntryNotFoundError:
        raise HubError(
            f"{why}, and the cache {env.cache} holds no copy of {repo_id}@{revision} (download it once online)"
        ) from None
    missing = _missing(snapshot, want)
    if missing:
        raise HubError(
            f"{why}, and the cached copy of {repo_id}@{revision} (commit {snapshot.name}) lacks {missing} "
            "(download it once online)"
        )
    return snapshot


def _missing(snapshot: Path, want: Want) -> str | None:
    """What a cached snapshot lacks for `want`, or None."""
    if want == "tokenizer":
        present = any((snapshot / name).is_file() for name in TOKENIZER_FILES)
        return None if present else "its tokenizer files"
    if want == "adapter":
        if not (snapshot / ADAPTER_CONFIG).is_file():
            return ADAPTER_CONFIG
        return None if any((snapshot / name).is_file() for name in ADAPTER_WEIGHTS) else "its adapter weights"
    if not (snapshot / CONFIG_NAME).is_file():
        return CONFIG_NAME
    weights = next((name for name, _, _ in CHECKPOINT_FILES if (snapshot / name).is_file()), None)
    if weights is None:
        return "its weights"
    if weights.endswith(".index.json"):
        shards = sorted(set(read_weight_map(snapshot / weights).values()))
        absent = [shard for shard in shards if not (snapshot / shard).is_file()]
        if absent:
            return "the shard(s) " + ", ".join(absent)
    return None


# --------------------------------------------------------------------------- errors


def _reason(err: BaseException) -> str:
    """The last line of a network error's message, which names the cause."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:200]


def _explain(err: Exception, repo_id: str, revision: str, env: HubSettings, name: str | None = None) -> HubError:
    """One line for a hub refusal, from huggingface_hub's typed errors and the status code."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{env.endpoint}/{repo_id}"
    token = "the token in HF_TOKEN" if os.environ.get("HF_TOKEN") else "the stored token"
    if isinstance(err, RevisionNotFoundError):
        return HubError(f"revision {revision!r} not found in {repo_id} on {env.endpoint}")
    if isinstance(err, GatedRepoError):  # before RepositoryNotFoundError, its base class
        if env.token is None:
            return HubError(
                f"{repo_id} is gated: accept its conditions at {page}, then set HF_TOKEN to an access token"
            )
        return HubError(f"{repo_id} is gated and {token} has no access: accept its conditions at {page}")
    if isinstance(err, RepositoryNotFoundError):
        private = "if it is private, set HF_TOKEN" if env.token is None else f"or {token} cannot see it"
        return HubError(f"no folder {repo_id} here and no repository {repo_id} on {env.endpoint} ({private})")
    if isinstance(err, EntryNotFoundError):
        return HubError(f"{repo_id}@{revision} lists {name} but the hub has no such file")
    status = getattr(err.response, "status_code", None)
    if status in (401, 403):
        fix = "set HF_TOKEN to a token with access" if env.token is None else f"{token} has no access"
        return HubError(f"{env.endpoint} refused access to {repo_id} (HTTP {status}): {fix}")
    return HubError(f"{env.endpoint} answered HTTP {status} for {repo_id}@{revision}: {_reason(err)}")


__all__ = [
    "CONFIG_NAME",
    "TOKENIZER_FILES",
    "CachedCopyWarning",
    "HubSettings",
    "folder",
    "is_local",
    "settings",
]
