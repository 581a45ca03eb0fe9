"""One attribution query against the index: encode the query, shortlist, re-rank, rank.

``Attributor`` is what both the HTTP app and ``ard attribute`` call. The query goes
through ``prepare_image_and_box`` (evaluation's resize) and ``OnnxDetector``'s tokenizer
(the training's function); the candidates' features come from the index, and the scorer
re-ranks the shortlist. Candidates are always scored in index order and sorted by score
with ties in index order, so a shortlist that holds every image gives exactly the
ranking of scoring all of them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ardetect.export.runtime import clip_to_images
from ardetect.serve.index import CandidateIndex
from ardetect.serve.loader import LoadedModel
from ardetect.serve.requests import RequestError, check_box_in_image


@dataclass
class Attribution:
    results: list[dict]  # ranked: {rank, id, score, box, width, height, concept_id, concept_box}
    scored: int  # candidates the scorer ran on
    shortlist: int | None  # N of the shortlist; None when every image or an explicit list was scored
    timing_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"results": self.results, "scored": self.scored, "shortlist": self.shortlist, "timing_ms": self.timing_ms}


class Attributor:
    def __init__(self, model: LoadedModel, index: CandidateIndex, shortlist: int = 50):
        self.model, self.index, self.shortlist = model, index, int(shortlist)
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer refuses concurrent calls from threads

    def encode(self, image, box: list[float], prompt: str, phrase: str) -> tuple[dict, np.ndarray]:
        """(the query cache the scorer reads, the query embedding for the shortlist)."""
        from ardetect.export.runtime import prepare_image_and_box

        det = self.model.detector
        check_box_in_image(box, image.width, image.height)
        arr, qbox, _ = prepare_image_and_box(image, det.size, box)
        if not (qbox[2] > qbox[0] and qbox[3] > qbox[1]):
            raise RequestError("box", f"{box} has no area once the image is resized to {det.size}x{det.size}")
        try:
            with self._tokenizer_lock:
                query = det.encode_prepared_query(arr, qbox, prompt, phrase)
        except ValueError as err:
            msg = str(err)
            if "concept phrase" in msg and "contain" in msg:
                raise RequestError("phrase", f"{phrase!r} is not a run of the prompt's tokens ({msg})") from None
            if "max_text_len" in msg:
                raise RequestError("prompt", f"too long for the model: {msg}") from None
            raise RequestError("box" if "query_box" in msg else "prompt", msg) from None
        emb = self.index.query_embedding(query["query_region_map"], qbox, det.size)
        return query, emb

    def attribute(self, image, box: list[float], prompt: str, phrase: str, top_k: int = 10, shortlist: int | None = None,
                  candidates: list[str] | None = None, stop=None) -> Attribution:
        """The ``top_k`` best of the shortlist (or of ``candidates``) for the query; ``stop``
        (``ardetect.export.runtime.Stop``) ends the scoring early with ``Stopped``."""
        t0 = time.perf_counter()
        query, emb = self.encode(image, box, prompt, phrase)
        t1 = time.perf_counter()
        n = None
        if candidates is not None:
            positions = self.index.positions_of(candidates)
        else:
            n = int(shortlist or self.shortlist)
            positions = self.index.shortlist(emb, n)
            n = n if n < len(self.index) else None
        t2 = time.perf_counter()
        feats = self.index.candidates(positions)
        out = self.model.detector.score(feats, query, self.index.sizes[positions], stop=stop)  # chunks of the provider's size
        t3 = time.perf_counter()
        scores = out["scores"].astype(np.float64)
        order = np.argsort(-scores, kind="stable")[:top_k]
        boxes = clip_to_images(out["boxes"][order], self.index.sizes[positions[order]])
        results = []
        for rank, (i, b) in enumerate(zip(order, boxes), 1):
            k = int(positions[i])
            results.append({"rank": rank, "score": float(scores[i]), "box": [round(float(v), 3) for v in b], **self.index.info(k)})
        timing = {"encode_query": (t1 - t0) * 1e3, "shortlist": (t2 - t1) * 1e3, "score": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3}
        return Attribution(results, len(positions), n, {k: round(v, 2) for k, v in timing.items()})

    def describe(self) -> dict:
        m = self.model
        return {"name": m.name, "version": m.version, "alias": m.alias, "source": m.source, "folder": str(m.folder),
                "providers": m.providers, "precision": m.detector.precision, "image_size": m.detector.size,
                "index_size": len(self.index), "index": str(self.index.folder), "shortlist": self.shortlist,
                "score": m.detector.manifest.get("score", {})}
