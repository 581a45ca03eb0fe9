"""The export as an MLflow model in the model registry, with the ``champion`` alias.

``log_and_register`` logs the export folder (graphs, tokenizer, manifest) as a pyfunc
model (``AttributionModel``: a query and its candidate images in, the candidates ranked
with their boxes out) with a signature and an input example, registers it, tags the
version with the metrics it earned, and moves ``champion`` to it only when its test
Recall@10 beats the current champion's (the first version becomes champion); otherwise
the version gets ``challenger`` and the reason is recorded on the version and the run.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

MODEL_NAME = "ardetect-detector"
CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_TAG = "test_recall_at_10"  # the version tag the champion is judged by
INPUT_COLUMNS = ("query_image", "x0", "y0", "x1", "y1", "prompt", "concept_phrase", "candidates")


class RegistryError(LookupError):
    """A registry request that cannot be met (unknown model or version); the message says which."""


try:  # mlflow is a dependency; the class must exist where the pyfunc model is loaded
    from mlflow.pyfunc import PythonModel as _PythonModel
except ImportError:  # pragma: no cover
    _PythonModel = object


class AttributionModel(_PythonModel):
    """pyfunc face of an export: each input row is a query (image path, box x0..y1 in its pixels,
    prompt, concept phrase) and its candidate image paths; the output has one row per candidate,
    ranked within its query: query, rank, candidate, score, box x0..y1 in the candidate's pixels."""

    def load_context(self, context) -> None:
        from ardetect.export.runtime import OnnxDetector

        self.detector = OnnxDetector(context.artifacts["export"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import numpy as np

        from ardetect.export.runtime import clip_to_images, prepare_image

        missing = [c for c in INPUT_COLUMNS if c not in model_input.columns]
        if missing:
            raise ValueError(f"model input lacks the columns {missing} (needs {list(INPUT_COLUMNS)})")
        rows = []
        for qi, r in enumerate(model_input.itertuples(index=False)):
            q = self.detector.encode_query(r.query_image, [r.x0, r.y0, r.x1, r.y1], r.prompt, r.concept_phrase)
            cands = [str(c) for c in r.candidates]
            prepared = [prepare_image(c, self.detector.size) for c in cands]
            feats = self.detector.encode_images(np.stack([a for a, _ in prepared]))
            sizes = np.array([s for _, s in prepared])
            out = self.detector.score(feats, q, sizes)
            order = np.argsort(-out["scores"], kind="stable")
            boxes = clip_to_images(out["boxes"], sizes)  # in the candidate, as the service answers
            for rank, i in enumerate(order, 1):
                x0, y0, x1, y1 = (float(v) for v in boxes[i])
                rows.append({"query": qi, "rank": rank, "candidate": cands[i], "score": float(out["scores"][i]),
                             "x0": x0, "y0": y0, "x1": x1, "y1": y1})
        return pd.DataFrame(rows)


@dataclass
class Registration:
    name: str
    version: str
    alias: str
    reason: str
    model_uri: str


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def champion_of(client, name: str):
    """The version holding ``champion``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def decide_alias(client, name: str, version: str, value: float) -> tuple[str, str]:
    """(alias, reason): ``champion`` when ``value`` (test Recall@10) beats the champion's, else ``challenger``."""
    if not math.isfinite(value):
        raise ValueError(f"test Recall@10 = {value!r}: a version needs a finite metric to be judged")
    champ = champion_of(client, name)
    if champ is None:
        return CHAMPION, f"first version of {name}: champion (test Recall@10 {value:.4f})"
    if str(champ.version) == str(version):
        return CHAMPION, "already champion"
    held = float(champ.tags.get(METRIC_TAG, "nan"))
    if not math.isfinite(held) or value > held:
        return CHAMPION, f"test Recall@10 {value:.4f} > champion v{champ.version}'s {held:.4f}: champion moves"
    return CHALLENGER, f"test Recall@10 {value:.4f} <= champion v{champ.version}'s {held:.4f}: champion stays, this version is challenger"


def apply_alias(client, name: str, version: str, value: float) -> tuple[str, str]:
    alias, reason = decide_alias(client, name, version, value)
    client.set_registered_model_alias(name, alias, str(version))
    client.set_model_version_tag(name, str(version), "ard.alias_reason", reason)
    return alias, reason


def log_and_register(folder: Path, uri: str, metrics: dict[str, float], name: str = MODEL_NAME, example: pd.DataFrame | None = None) -> Registration:
    """Log ``folder`` as a pyfunc model in the active MLflow run, register it as ``name`` and set its alias.

    ``metrics`` must hold ``METRIC_TAG`` (the test Recall@10 the alias is decided by); all of them
    become version tags. ``example``: an input example (``INPUT_COLUMNS``) for the signature.
    """
    import mlflow
    from mlflow.models import infer_signature

    if METRIC_TAG not in metrics:
        raise ValueError(f"metrics lack {METRIC_TAG!r}: the champion is judged by it")
    signature, input_example = None, None
    if example is not None:
        class _Ctx:  # the model's own load_context, on the folder about to be logged
            artifacts = {"export": str(folder)}

        probe = AttributionModel()
        probe.load_context(_Ctx())
        with warnings.catch_warnings():  # its integer columns (query, rank) are never missing: MLflow's hint is not for them
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
            signature = infer_signature(example, probe.predict(None, example))
        input_example = example
    mlflow.set_registry_uri(uri)  # register where the alias is decided, whatever MLFLOW_REGISTRY_URI says
    info = mlflow.pyfunc.log_model(  # the model as code (pyfunc_code.py), not a pickled object
        name="detector", python_model=str(Path(__file__).with_name("pyfunc_code.py")), artifacts={"export": str(folder)},
        signature=signature, input_example=input_example,
        registered_model_name=name, pip_requirements=["ardetect", "onnxruntime-gpu", "transformers", "pandas"],
    )
    version = str(info.registered_model_version)
    client = _client(uri)
    for k, v in metrics.items():
        client.set_model_version_tag(name, version, k, str(v))
    alias, reason = apply_alias(client, name, version, float(metrics[METRIC_TAG]))
    mlflow.set_tags({"ard.registered_version": version, "ard.alias": alias, "ard.alias_reason": reason})
    return Registration(name, version, alias, reason, f"models:/{name}/{version}")


def list_versions(uri: str, name: str = MODEL_NAME) -> pd.DataFrame:
    """Every version of ``name``: version, aliases, test Recall@10, run id, creation time (newest first)."""
    client = _client(uri)
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise RegistryError(f"no registered model {name!r} at {uri} (run the export stage first)")
    held: dict[str, list[str]] = {}  # search results leave the aliases out: read them off the registered model
    for alias, v in (client.get_registered_model(name).aliases or {}).items():
        held.setdefault(str(v), []).append(alias)
    rows = [{
        "version": int(v.version), "aliases": ",".join(sorted(held.get(str(v.version), []))) or "-", METRIC_TAG: v.tags.get(METRIC_TAG, "-"),
        "paper_recall_at_10": v.tags.get("test_paper_recall_at_10", "-"), "run_id": v.run_id,
        "created": pd.Timestamp(v.creation_timestamp, unit="ms").strftime("%Y-%m-%d %H:%M"),
    } for v in versions]
    return pd.DataFrame(rows).sort_values("version", ascending=False).reset_index(drop=True)


def promote(uri: str, version: str, name: str = MODEL_NAME) -> str:
    """Move ``champion`` to ``version`` by hand; returns the reason recorded."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"{name!r} has no version {version!r} at {uri} (`ard models list` shows them)") from None
    before = champion_of(client, name)
    reason = f"promoted by hand (champion was v{before.version})" if before is not None else "promoted by hand"
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_model_version_tag(name, str(version), "ard.alias_reason", reason)
    return reason
