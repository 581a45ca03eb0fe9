"""Where named weights are: a local folder, or a hub id already in the local Hugging Face cache.

Nothing is downloaded. Every failure is a :class:`WeightsError` naming the parameter and its value.
"""

from __future__ import annotations

from pathlib import Path


class WeightsError(FileNotFoundError):
    """Weights named by a parameter are missing or are not what the parameter says."""


def resolve(value: str | None, field: str) -> tuple[str, bool]:
    """(what to pass to ``from_pretrained``, whether it is a local folder); raise naming ``field`` if neither."""
    if value is None or not str(value).strip():
        raise WeightsError(f"{field} is not set; give a local folder or a hub id already in the local Hugging Face cache")
    p = Path(value).expanduser()
    if p.exists():
        if not p.is_dir():
            raise WeightsError(f"{field}={value!r} is a file; a from_pretrained folder is needed")
        return str(p), True
    if value.startswith(("/", ".", "~")) or value.count("/") != 1:
        raise WeightsError(f"{field}={value!r} does not exist on this machine (and is not a hub id 'owner/name')")
    return value, False


def local_folder(value: str | None, field: str, marker: str) -> Path:
    """The folder ``value`` names: itself, or the hub id's snapshot in the local cache. It must hold
    ``marker`` (``config.json`` of a transformers model, ``model_index.json`` of a diffusers pipeline)."""
    name, local = resolve(value, field)
    if local:
        folder = Path(name)
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(name, local_files_only=True))
        except Exception as err:  # LocalEntryNotFoundError and kin: the hub's errors have no common base
            raise WeightsError(f"{field}={value!r} is not in the local Hugging Face cache (nothing is downloaded; "
                               f"{type(err).__name__})") from None
    if not (folder / marker).is_file():
        raise WeightsError(f"{field}={value!r}: {folder} has no {marker}")
    return folder
