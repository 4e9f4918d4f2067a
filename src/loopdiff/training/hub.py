"""``output.push_to_hub``: upload an export folder (the pipeline or LoRA weights with its model card) to a
Hugging Face Hub model repository, as diffusers' training scripts do (``create_repo`` then ``upload_folder``)."""

from __future__ import annotations

from pathlib import Path

from loopdiff.config import OutputConfig


class HubUploadError(RuntimeError):
    """The upload to the Hub failed; the export stays in the run folder."""


def hub_repo_id(output: OutputConfig) -> str:
    """The repository an export goes to: ``output.hub_model_id``, else the run folder's name."""
    return output.hub_model_id or Path(output.dir).resolve().name


def push_export(folder: Path, output: OutputConfig) -> str:
    """Create the model repository (if needed) and upload ``folder`` into it; returns the repository's URL.

    Raises HubUploadError (one line, naming the repository and keeping the export) when the Hub refuses."""
    from huggingface_hub import HfApi

    repo_id = hub_repo_id(output)
    api = HfApi()
    try:
        url = api.create_repo(repo_id=repo_id, private=output.hub_private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload the model fine-tuned with loopdiff")
    except Exception as error:  # network, authentication, permissions: all end the upload, not the run's work
        message = " ".join(str(error).split())[:300]
        raise HubUploadError(f"output.push_to_hub: uploading '{folder}' to the Hub repository '{repo_id}' failed "
                             f"({type(error).__name__}: {message}); the export is kept in '{folder}'") from error
    return str(url)
