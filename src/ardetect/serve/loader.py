"""The served model: an export folder, or a version of the registered model fetched from MLflow.

``load_model("models:/ardetect-detector@champion")`` resolves the alias to a version,
downloads that version's artifacts (the export folder the registry logged) and opens
them with ``OnnxDetector``, which checks the manifest and every graph's SHA-256 and picks
the providers (TensorRT, CUDA, CPU: the first that can run here). A folder is opened as
it is. Either way ``LoadedModel`` says what was loaded and which providers run it.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ardetect.export.runtime import OnnxDetector

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
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as err:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise ModelNotFound(f"model {text!r}: the registry at {tracking_uri or mlflow.get_tracking_uri()} has no {what} of "
                            f"{name!r} ({str(err).splitlines()[0][:200]}); run the export stage, or give an export folder") from None
    dst = Path(tempfile.mkdtemp(prefix=f"ard-{name}-v{mv.version}-", dir=cache))
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dst))
    folder = find_export(Path(local))
    det = OnnxDetector(folder, precision=precision, providers=providers, threads=threads)
    return LoadedModel(det, text, folder, name, str(mv.version), alias, {"run_id": mv.run_id, "tags": dict(mv.tags)})
