"""output.push_to_hub: the export folder with its model card goes to a Hub model repository (the Hub's two
calls replaced at their boundary, HfApi.create_repo and HfApi.upload_folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import HfApi

from loopdiff.training.hub import HubUploadError
from trainer_helpers import make_trainer


@pytest.fixture
def hub(monkeypatch):
    """The calls made to the Hub, with the files of each uploaded folder read at upload time."""
    calls: dict[str, list] = {"create_repo": [], "upload_folder": []}

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok,
                                     "repo_type": repo_type})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None, **kwargs):
        folder = Path(folder_path)
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        calls["upload_folder"].append({"repo_id": repo_id, "repo_type": repo_type, "files": files})

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_lora_export_and_model_card_are_uploaded(tmp_path, hub) -> None:
    trainer = make_trainer(tmp_path, "ppo", model={"device": "cpu", "lora": True},
                           output={"push_to_hub": True, "hub_model_id": "someone/loop-lora", "hub_private": True})
    trainer.train()
    path = trainer.export()
    assert hub["create_repo"] == [{"repo_id": "someone/loop-lora", "private": True, "exist_ok": True,
                                   "repo_type": "model"}]
    (upload,) = hub["upload_folder"]
    on_disk = {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert upload["repo_id"] == "someone/loop-lora" and upload["repo_type"] == "model"
    assert set(upload["files"]) == {"README.md", "pytorch_lora_weights.safetensors"}
    assert upload["files"] == on_disk
    card = upload["files"]["README.md"].decode()
    assert 'pipe.load_lora_weights("someone/loop-lora")' in card


def test_the_repository_defaults_to_the_run_folders_name(tmp_path, hub) -> None:
    trainer = make_trainer(tmp_path, "ppo", output={"push_to_hub": True})
    trainer.train()
    path = trainer.export()
    assert hub["create_repo"][0]["repo_id"] == "run-ppo" and not hub["create_repo"][0]["private"]
    assert "model_index.json" in hub["upload_folder"][0]["files"] and "unet/config.json" in hub["upload_folder"][0]["files"]
    assert (path / "unet").is_dir()


def test_no_upload_without_the_option(tmp_path, hub) -> None:
    trainer = make_trainer(tmp_path, "ppo")
    trainer.train()
    trainer.export()
    assert hub == {"create_repo": [], "upload_folder": []}


def test_a_refused_upload_is_one_error_that_keeps_the_export(tmp_path, monkeypatch) -> None:
    def refuse(self, repo_id, **kwargs):
        raise PermissionError("401 Unauthorized: invalid token")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    trainer = make_trainer(tmp_path, "ppo", output={"push_to_hub": True, "hub_model_id": "someone/x"})
    trainer.train()
    with pytest.raises(HubUploadError, match=r"repository 'someone/x' failed \(PermissionError: 401 Unauthorized"):
        trainer.export()
    assert (tmp_path / "run-ppo" / "final_pipeline" / "model_index.json").is_file()
