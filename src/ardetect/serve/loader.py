"""The served model: an export folder, or a version of the registered model fetched from MLflow.

``load_model("models:/ardetect-detector@champion")`` resolves the alias to a version,
downloads that version's artifacts (the export folder the registry logged) into the
model cache and opens them with ``OnnxDetector``, which checks the manifest and every graph's SHA-256 and picks
the providers (TensorRT, CUDA, CPU: the first that can run here). A folder is opened as
it is. Either way ``LoadedModel`` says what was loaded and which providers run it.

The cache (``ARD_MODEL_CACHE``, else ``$XDG_CACHE_HOME/ardetect/models``, else
``~/.cache/ardetect/models``) keeps one folder a registered version, named by the model,
the version and the run that logged it, so every later start opens it without a download
and repeated starts take no more disk. A copy whose files fail the manifest's SHA-256 is
fetched again; a download goes to a temporary folder that is renamed into place only when
complete, so a killed download leaves no half copy.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ardetect.export.onnx_export import ExportError, sha256
from ardetect.export.runtime import OnnxDetector, load_manifest
from ardetect.tmpdirs import temp_dir_beside
from ardetect.tracking import TrackingStoreDamaged, check_store, sqlite_file

CACHE_KEEP = 3  # registered versions kept downloaded in the model cache
CACHE_MARK = ".ardetect-model-cache"  # in each version's folder: the pruning removes no folder without it
_ENTRY = re.compile(r"[A-Za-z0-9._-]+-v\d+-[A-Za-z0-9_]+")  # _entry_name's form
REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class ModelNotFound(LookupError):
    """The model source names no folder and no registered version; the message says which."""


@dataclass
class LoadedModel:
    detector: OnnxDetector
    source: str  # what was asked for: a folder or a models:/ URI
    folder: Path  # the export folder the sessions were opened from
    name: str | None = None  # registered name, version and alias (None for a folder)
    version: str | None = None
    alias: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def providers(self) -> dict[str, str]:
        return dict(self.detector.providers_used)

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self.detector.manifest)


def model_fingerprint(manifest: dict) -> str:
    """What an index's features depend on: the image encoder graph's SHA-256 and the input size."""
    enc = manifest["graphs"]["image_encoder"]["file"]
    return f"{manifest['sha256'][enc]}:{int(manifest['image_size'])}"


def find_export(root: Path) -> Path:
    """The folder holding manifest.json under ``root`` (a downloaded pyfunc model keeps it under artifacts/)."""
    root = Path(root)
    if (root / "manifest.json").is_file():
        return root
    found = sorted(p.parent for p in root.rglob("manifest.json") if (p.parent / "image_encoder.onnx").is_file())
    if not found:
        raise ModelNotFound(f"{root} holds no export (no manifest.json beside image_encoder.onnx)")
    return found[0]


def load_model(source: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
               tracking_uri: str | None = None, precision: str = "fp32", cache: Path | None = None) -> LoadedModel:
    """Open ``source``: an export folder, or ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` in the registry."""
    text = str(source)
    m = REGISTRY_URI.match(text)
    if m is None:
        folder = Path(text)
        if not folder.is_dir():
            raise ModelNotFound(f"model {text!r}: no such folder, and not a registry URI (models:/<name>@<alias> or models:/<name>/<version>)")
        det = OnnxDetector(folder, precision=precision, providers=providers, threads=threads)
        return LoadedModel(det, text, folder)
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias, version = m["name"], m["alias"], m["version"]
    store = sqlite_file(tracking_uri or mlflow.get_tracking_uri())
    if store is not None and not store.is_file():  # MLflow would make an empty store there, then find no model in it
        raise ModelNotFound(f"model {text!r}: there is no MLflow store at {store} (no pipeline has run there: `make run` or "
                            "`ard pipeline run` at the repository root makes it and registers the model); give an export "
                            "folder with --model, or run from the repository (or a folder in it)")
    if store is not None:
        try:
            check_store(store)
        except TrackingStoreDamaged as err:
            raise ModelNotFound(f"model {text!r}: {err}; or give an export folder with --model") from None
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as err:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise ModelNotFound(f"model {text!r}: the registry at {tracking_uri or mlflow.get_tracking_uri()} has no {what} of "
                            f"{name!r} ({str(err).splitlines()[0][:200]}); run the export stage, or give an export folder") from None
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    root = Path(cache) if cache is not None else model_cache()
    entry = root / _entry_name(name, str(mv.version), mv.run_id)
    folder = _fetch_version(name, str(mv.version), entry)
    det = OnnxDetector(folder, precision=precision, providers=providers, threads=threads, verify=False)  # _fetch_version checked every file
    return LoadedModel(det, text, folder, name, str(mv.version), alias, {"run_id": mv.run_id, "tags": dict(mv.tags)})


def model_cache() -> Path:
    """Where registered versions are kept once downloaded: ARD_MODEL_CACHE, else the user's cache folder."""
    if os.environ.get("ARD_MODEL_CACHE"):
        return Path(os.environ["ARD_MODEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ardetect" / "models"


def _entry_name(name: str, version: str, run_id: str | None) -> str:
    # the run that logged the version tells two stores' "version 1" apart (a new mlflow.db restarts the numbers)
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{name}-v{version}-{run_id or 'norun'}")


def _fetch_version(name: str, version: str, entry: Path) -> Path:
    """The export folder of a registered version in the cache, downloaded first when absent; either way every
    file the manifest lists has its SHA-256."""
    import mlflow

    if entry.is_dir():
        if _intact(entry):
            os.utime(entry)  # the last use, which the pruning goes by
            return find_export(entry)
        shutil.rmtree(entry, ignore_errors=True)  # altered or damaged since it was downloaded: fetched again
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_beside(entry)
    except OSError as err:
        raise ExportError(f"model cache {entry.parent}: cannot write there ({err.strerror}); "
                          "set ARD_MODEL_CACHE to a writable folder") from None
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
        find_export(tmp)  # a version without an export is refused before it takes the cache's name
        if not _intact(tmp):
            raise ExportError(f"models:/{name}/{version}: the downloaded files differ from its manifest's SHA-256")
        (tmp / CACHE_MARK).write_text(f"models:/{name}/{version}\n")
        try:
            tmp.rename(entry)
        except OSError:  # another process put the same version there first: theirs is as good
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(entry.parent, keep=CACHE_KEEP)
    return find_export(entry)


def _intact(entry: Path) -> bool:
    """Whether a cached copy holds an export whose every file has the SHA-256 its manifest lists."""
    try:
        folder = find_export(entry)
        listed = load_manifest(folder)["sha256"]
        return all((folder / f).is_file() and sha256(folder / f) == digest for f, digest in listed.items())
    except (ModelNotFound, ExportError, OSError, KeyError, TypeError, AttributeError):
        return False


def _ours(folder: Path) -> bool:
    """Whether ``folder`` is a version the cache downloaded: it holds the cache's mark (or, downloaded before the mark
    was written, it has the cache's name and an export in it). ``ARD_MODEL_CACHE`` may name a folder that holds
    other things too: nothing else is ever pruned."""
    if (folder / CACHE_MARK).is_file():
        return True
    if not _ENTRY.fullmatch(folder.name):
        return False
    try:
        find_export(folder)
    except (ModelNotFound, ExportError, OSError):
        return False
    return True


def _prune(root: Path, keep: int, stale_s: float = 86400.0) -> None:
    """Remove all but the ``keep`` most recently used versions (a process already serving one keeps its sessions),
    and the temporary folders of downloads killed more than ``stale_s`` ago; nothing that is not the cache's own."""
    now = time.time()
    folders = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    entries = sorted((p for p in folders if not p.name.startswith(".") and _ours(p)), key=lambda p: p.stat().st_mtime,
                     reverse=True)
    stale = [p for p in folders if p.name.startswith(".") and ".tmp-" in p.name and _ENTRY.fullmatch(p.name[1:].split(".tmp-")[0])
             and now - p.stat().st_mtime > stale_s]
    for old in entries[keep:] + stale:
        shutil.rmtree(old, ignore_errors=True)
