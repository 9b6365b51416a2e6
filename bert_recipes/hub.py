"""Push an export folder (``final/``, a fine-tuned ``best/``) to the Hugging Face Hub, and
tell local folders from Hub ids when loading (:func:`local_or_hub`).

``push_to_hub(folder, repo_id)`` creates the model repository if needed
(``HfApi.create_repo(exist_ok=True)``) and uploads the folder in one commit
(``HfApi.upload_folder``). The token comes from ``token=``, ``HF_TOKEN`` or ``hf auth login``.
Every failure (offline, not logged in, no permission, a malformed repo id, no network) is a
one-line :class:`UserError`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError, first_line


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


_REACHABLE: dict[str, bool] = {}


def ensure_hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub can be reached; when it cannot, switch this process to offline mode.

    One TCP connection to the Hub endpoint (``timeout`` seconds, answered at once when DNS
    fails); behind a proxy (``HTTPS_PROXY``, not bypassed by ``NO_PROXY``) it is assumed
    reachable. Unreachable: ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` are set (and the loaded
    libraries' flags), so loads use the local cache only and fail at once with one line,
    instead of minutes of retries printed twice. Cached per process; does nothing (False)
    when already offline.
    """
    if _offline():
        return False
    host, port = hub_address()
    if host not in _REACHABLE:
        import socket
        import urllib.request

        if urllib.request.getproxies().get("https" if port != 80 else "http") and not urllib.request.proxy_bypass(host):
            _REACHABLE[host] = True  # behind a proxy (HTTPS_PROXY) huggingface_hub connects through it: a direct
            # connection says nothing there (a push was refused where it would work: found by a helper)
        else:
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                _REACHABLE[host] = True
            except OSError:
                _REACHABLE[host] = False
    if not _REACHABLE[host]:
        go_offline()
    return _REACHABLE[host]


def hub_address() -> tuple[str, int]:
    """The Hub endpoint's ``(host, port)`` (``HF_ENDPOINT``, default huggingface.co:443)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)


def go_offline() -> None:
    """Offline mode for the Hub libraries in this process (cache only, no retries)."""
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(datasets_config, name):
                setattr(datasets_config, name, True)


_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def check_local_folder(path: str, key: str, needs: str = "model") -> None:
    """A local ``name_or_path`` folder must hold what it is loaded for: ``config.json`` for a
    model, ``tokenizer.json``/``vocab.txt``/``tokenizer_config.json`` for a tokenizer.

    Raises:
        UserError: one line naming the key, the folder, what it lacks and the fix.
    """
    wanted = ("config.json",) if needs == "model" else _TOKENIZER_FILES
    if any(os.path.isfile(os.path.join(path, name)) for name in wanted):
        if needs == "model":
            check_weight_files(path, key)
        return
    held = sorted(os.listdir(path))
    what = "is empty" if not held else f"has no {' or '.join(wanted)} (it holds {', '.join(held[:6])}{' ...' if len(held) > 6 else ''})"
    raise UserError(f"{key}: local folder '{path}' {what}; expected a {needs} folder saved with save_pretrained, "
                    "e.g. runs/tiny/final from `make pretrain`, or a Hub id such as google-bert/bert-base-uncased")


def check_weight_files(path: str, key: str) -> None:
    """The weight files of a local model folder open: each ``*.safetensors`` file's header
    (which names every tensor's byte range, so a truncated or overwritten file fails here)
    and each ``*.bin`` zip archive's directory (``torch.save``'s format; a legacy pickle is not
    checked); a cheap look, no tensor is read.

    Raises:
        UserError: one line naming the key and the damaged file.
    """
    import zipfile

    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        try:
            if name.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(file, "pt") as weights:
                    weights.keys()
            elif name.endswith(".bin"):  # torch.save's zip archive (a legacy pickle is not checked)
                with open(file, "rb") as handle:
                    head = handle.read(4)
                if not head:
                    raise ValueError("empty file")
                if head.startswith(b"PK"):  # a zip whose directory at the end is gone: truncated
                    zipfile.ZipFile(file).close()
        except Exception as exc:  # SafetensorError, BadZipFile, OSError
            reason = " ".join(str(exc).split())
            raise UserError(f"{key}: cannot read the weights '{file}' ({reason}): the file is damaged or incomplete; "
                            "save or download the model again") from None


def local_or_hub(name_or_path: str, key: str) -> tuple[str, bool]:
    """``(path, is_local)`` for a ``name_or_path`` value: an existing folder, or a Hub id.

    A value that can only be a path (absolute, ``./``, ``../``, ``~``, more than one ``/``,
    or whose first component is an existing local folder, like ``runs/x``) but does not
    exist is an error at once, instead of a minute of Hub retries ending in "not a repo".

    Raises:
        UserError: ``{key}: local folder '...' not found``.
    """
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return path, True
    parts = name_or_path.replace("\\", "/").split("/")
    looks_local = (
        os.path.isabs(path) or name_or_path.startswith((".", "~")) or len(parts) > 2
        or (len(parts) == 2 and os.path.isdir(parts[0]))
    )
    if looks_local:
        what = "is a file, not a folder" if os.path.exists(path) else "not found"
        expected = ("a tokenizer folder with tokenizer.json or vocab.txt, e.g. runs/tiny/tokenizer" if "tokenizer" in key
                    else "an export folder with config.json, e.g. runs/tiny/final from `make pretrain`")
        raise UserError(f"{key}: local folder '{name_or_path}' {what} (expected {expected}, "
                        "or a Hub id such as google-bert/bert-base-uncased)")
    return name_or_path, False


def load_local_or_hub(loader, name_or_path: str, key: str, *, what: str = "", **kwargs):
    """``loader(path, local_files_only=..., **kwargs)`` (a ``from_pretrained``) on a local
    folder or a Hub id, see :func:`local_or_hub`.

    A Hub id is tried once: when the Hub is unreachable the process goes offline first
    (:func:`ensure_hub_reachable`), so an id not in the cache fails at once.

    Raises:
        UserError: one line, ``{key}: cannot load {what}local folder|Hub id '...': <reason>``,
            or a local folder without the files it is loaded for.
    """
    path, local = local_or_hub(name_or_path, key)
    if local:
        check_local_folder(path, key, "tokenizer" if what.startswith("tokenizer") else "model")
    else:
        ensure_hub_reachable()
    try:
        return loader(path, local_files_only=local, **kwargs)
    except Exception as exc:  # OSError, ValueError; a local folder's damaged files raise others (tokenizers, safetensors)
        if not (local or isinstance(exc, (OSError, ValueError))):
            raise
        if local:
            where = "local folder"
        elif _offline():
            where = "Hub id (not in the local cache, and the Hub is offline or unreachable)"
        else:
            where = "Hub id (no such repository, or no access?)"
        reason = " ".join(str(exc).split())  # transformers' messages span lines; keep all of it on one
        if len(reason) > 300:
            reason = reason[:297] + "..."
        raise UserError(f"{key}: cannot load {what}{where} '{name_or_path}': {reason}") from None


def check_push_target(repo_id: str, token: str | None = None, key: str = "--push-to-hub") -> None:
    """Fail fast, before any training, when a push could not work.

    Raises:
        UserError: a malformed repo id, offline mode, no token, or no connection to the Hub.
    """
    from huggingface_hub import get_token
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception as exc:  # HFValidationError
        raise UserError(f"{key}: '{repo_id}' is not a valid repo id (expected 'user-or-org/name'): {first_line(exc)}") from None
    if _offline():
        raise UserError(f"{key}: the Hub is offline (HF_HUB_OFFLINE is set); unset it to push, or upload {repo_id} later")
    if not (token or get_token()):
        raise UserError(f"{key}: not logged in to the Hub; run 'hf auth login' or set HF_TOKEN")
    if not ensure_hub_reachable():  # it failed after the training (found by a helper)
        host, port = hub_address()
        raise UserError(f"{key}: the Hub ({host}:{port}, HF_ENDPOINT) cannot be reached from here; push the export "
                        "later with bert_recipes.hub.push_to_hub(folder, repo_id)")


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
                commit_message: str | None = None) -> str:
    """Upload ``folder`` to the model repository ``repo_id``; return the commit URL.

    Raises:
        UserError: one line (folder missing, offline, not logged in, no permission, network).
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not an export folder (no config.json)")
    check_push_target(repo_id, token, key="push_to_hub")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model",
            commit_message=commit_message or f"Upload {folder.name} exported by bert-recipes",
        )
    except Exception as exc:  # HfHubHTTPError, OfflineModeIsEnabled, httpx errors, OSError
        raise UserError(f"push_to_hub: cannot upload {folder} to {repo_id}: {exc.__class__.__name__}: {first_line(exc)}") from None
    return getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
