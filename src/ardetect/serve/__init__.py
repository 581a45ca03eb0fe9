"""The attribution service: the exported detector on onnxruntime, a candidate index with a shortlist,
an HTTP API with its web page, and the ``ard index build`` / ``ard serve`` / ``ard attribute`` commands."""

from ardetect.serve.attribution import Attribution, Attributor
from ardetect.serve.index import CandidateIndex, IndexMismatch, IndexUnusable, build_index
from ardetect.serve.loader import LoadedModel, ModelNotFound, load_model

__all__ = ["Attribution", "Attributor", "CandidateIndex", "IndexMismatch", "IndexUnusable", "LoadedModel", "ModelNotFound",
           "build_index", "load_model", "open_attributor"]


def open_attributor(cfg, model: str | None = None, index: str | None = None, tracking_uri: str | None = None) -> Attributor:
    """The model (``cfg.model`` unless given) and its index (``cfg.index``), checked to belong together."""
    m = load_model(model or cfg.model, providers=cfg.providers, threads=cfg.threads, tracking_uri=tracking_uri)
    idx = CandidateIndex(index or cfg.index, fingerprint=m.fingerprint)
    return Attributor(m, idx, shortlist=cfg.shortlist)
