"""The export stage's library code: export, parity gate, registration, then the swap into place.

Everything is written to a temp folder beside the target first; only an export whose
fp32 parity holds (and, when asked, whose registration succeeded) replaces the files of
the previous one, so a failed export leaves ``out`` as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ardetect.export.onnx_export import GRAPHS, ExportError, export_detector
from ardetect.tmpdirs import swap_into_place, temp_dir_beside

PARITY_FILE = "parity.json"


@dataclass
class ExportOptions:
    identity_weight: float
    grid: int
    top_k: int
    opset: int = 17
    fp16: bool = True
    int8: bool = True
    parity_queries: int = 32
    variant_queries: int = 8  # fp16 scorer's parity tuples (the first of parity_queries)
    score_tolerance: float = 1e-4
    box_tolerance_px: float = 0.5
    iou_threshold: float = 0.5
    tie_rechecks: int = 32
    int8_queries: int | None = None  # int8 scorer's parity tuples; None = every parity tuple
    class_weight: float = 0.0  # the re-ranking's class-match exponent (a detector with a region classifier)


def identity_of(details_path: Path, row: str = "ARD") -> tuple[float, int, float]:
    """The identity weight, pooling grid and class weight ``evaluate`` fitted for ``row`` (``reports/details.json``)."""
    details_path = Path(details_path)
    if not details_path.is_file():
        raise FileNotFoundError(f"{details_path} not found: run the evaluate stage first, or give --identity-weight and --grid")
    try:
        details = json.loads(details_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"--details {details_path}: not JSON ({err}); give evaluate's reports/details.json, or "
                          "--identity-weight and --grid") from None
    fit = (details.get("identity_fit") or {}).get(row) if isinstance(details, dict) else None
    if not fit:
        raise ExportError(f"{details_path} holds no identity fit for the row {row!r}")
    return float(fit["weight"]), int(fit["grid"]), float(fit.get("class_weight", 0.0))


def recorded_scores(details_path: Path, phase2: Path, opts: ExportOptions) -> tuple[pd.DataFrame | None, str]:
    """The ARD row's scores ``evaluate`` recorded (``reports/ard_scores.parquet``, named in ``details.json``), when
    they come from ``phase2`` (same SHA-256) with the same identity weight, grid and top-k; else None. Also says why."""
    from ardetect.digest import file_sha256

    rec = json.loads(Path(details_path).read_text()).get("ard_scores") if Path(details_path).is_file() else None
    if not rec:
        return None, f"{details_path} names no recorded scores"
    path = Path(details_path).parent / rec["file"]
    want = {"phase2_sha256": file_sha256(phase2), "identity_weight": opts.identity_weight, "grid": opts.grid, "top_k": opts.top_k,
            "class_weight": opts.class_weight}
    differ = [k for k, v in want.items() if rec.get(k) != v]
    if differ:
        return None, f"{path} was recorded with another {', '.join(differ)}"
    if not path.is_file():
        return None, f"{path} not found"
    return pd.read_parquet(path), f"{path}"


def load_pair(phase2: Path, phase1: Path | None = None):
    """The phase-2 detector; with ``phase1``, also checks that the two share every weight but the adapters."""
    from ardetect.model.detector import check_variants
    from ardetect.train.phases import load_model

    for name, p in (("--phase2", phase2), ("--phase1", phase1)):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"{name} {p}: no such checkpoint")
    model = load_model(Path(phase2), phase=2, what="--phase2").eval()
    if phase1 is not None:
        first = load_model(Path(phase1), phase=1, what="--phase1").eval()
        if first.cfg != model.cfg:
            raise ExportError(f"--phase1 {phase1} is a {first.cfg.size!r} detector, --phase2 {phase2} a {model.cfg.size!r} one: not a pair")
        try:
            check_variants(model, {"phase1": first})
        except ValueError as err:
            raise ExportError(f"--phase1 {phase1} and --phase2 {phase2} are not one training's pair: {err}") from None
    return model


EXPORT_ENTRIES = frozenset({*(f"{g}.onnx" for g in GRAPHS), "tokenizer", "variants", "manifest.json", PARITY_FILE})


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file, or a folder holding anything an export does not write (a user's folder, the
    repository's root): the new export's files would be mixed with them, and its folders replace theirs."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: a file, not a folder for the export")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_ENTRIES and not p.name.startswith(".")) \
        if out.is_dir() else []
    if foreign:
        raise ExportError(f"--out {out} holds {len(foreign)} entries that are not an export's (the first: {foreign[0]}): "
                          "choose an empty or new folder, or an export's own")


def _install(tmp: Path, out: Path) -> None:
    """Move the new export's files over the old ones (graphs and folders first, manifest and parity last), and
    remove what the old export had and the new one has not (its parity.json, when the new one ran none: it
    described the old graphs)."""
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in tmp.iterdir())
    last = [n for n in ("manifest.json", PARITY_FILE) if n in names]
    for name in [n for n in names if n not in last] + last:
        src, dst = tmp / name, out / name
        if src.is_dir():
            swap_into_place(src, dst)
        else:
            os.replace(src, dst)
    for stale in sorted(EXPORT_ENTRIES - set(names)):
        if (out / stale).is_file():
            (out / stale).unlink()


def build_export(
    phase2: Path, out: Path, opts: ExportOptions, phase1: Path | None = None, tuples: pd.DataFrame | None = None,
    negatives: pd.DataFrame | None = None, data_root: Path | None = None, metrics: dict | None = None,
    register: bool = False, uri: str | None = None, model_name: str = "ardetect-detector", progress: bool = False,
    reference: pd.DataFrame | None = None,
) -> dict:
    """Export ``phase2`` to ``out``; with ``tuples``, gate on parity first (``ardetect.export.parity``);
    with ``register``, log and register the export in the active MLflow run.

    ``reference``: PyTorch's scores for this checkpoint recorded by ``evaluate`` (``recorded_scores``),
    which parity holds the export against instead of scoring again.

    Returns {"manifest", "parity" (or None), "registration" (or None), "seconds" (wall time of
    "graphs", each parity side, "registration")}. Raises ``ExportError``
    when parity fails, before anything in ``out`` is touched.
    """
    out = Path(out)
    check_out(out)
    lock = hold_export_lock(out)
    try:
        return _build_export(phase2, out, opts, phase1, tuples, negatives, data_root, metrics, register, uri, model_name,
                             progress, reference)
    finally:
        lock.close()


def hold_export_lock(out: Path):
    """Hold the lock of exports to ``out`` (an OS lock on a file in the temp folder, named by ``out``'s absolute path:
    nothing is left in the user's folders; the file is removed when the export ends). ``ExportError`` naming the export that holds it: two exports to one folder
    at once would each install their files over the other's, and the folder could end with a mix of both."""
    import hashlib
    import tempfile

    from ardetect.tmpdirs import LockHeld, hold_lock

    key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
    try:
        return hold_lock(Path(tempfile.gettempdir()) / f"ardetect-export-{key}.lock", f"ard export --out {out}",
                         remove_on_release=True)
    except LockHeld as held:
        raise ExportError(f"--out {out}: another export is writing it ({held.who()}): wait for it to end{held.kill_hint()}; "
                          "two at once would mix their files") from None


def _build_export(
    phase2: Path, out: Path, opts: ExportOptions, phase1: Path | None, tuples: pd.DataFrame | None,
    negatives: pd.DataFrame | None, data_root: Path | None, metrics: dict | None, register: bool, uri: str | None,
    model_name: str, progress: bool, reference: pd.DataFrame | None,
) -> dict:
    from ardetect.export.parity import run_parity

    model = load_pair(phase2, phase1)
    sources = {"phase2": Path(phase2), **({"phase1": Path(phase1)} if phase1 is not None else {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_dir_beside(out)
    tmp = staging / "export"  # the registered model's artifact takes this folder's name
    tmp.mkdir()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    try:
        manifest = export_detector(model, tmp, opts.identity_weight, opts.grid, opts.top_k, opset=opts.opset, sources=sources,
                                   metrics=metrics, fp16=opts.fp16, int8=opts.int8, class_weight=opts.class_weight)
        seconds["graphs"] = time.perf_counter() - start
        parity = None
        if tuples is not None:
            precisions = tuple(p for p, on in (("fp16", opts.fp16), ("int8", opts.int8)) if on)
            parity = run_parity(model, tmp, tuples, negatives, data_root, opts.identity_weight, opts.grid, opts.top_k,
                                queries=opts.parity_queries, variant_queries={"fp16": opts.variant_queries, "int8": opts.int8_queries}, score_tol=opts.score_tolerance, box_tol=opts.box_tolerance_px,
                                iou_threshold=opts.iou_threshold, precisions=precisions, progress=progress, seconds=seconds,
                                reference=reference, tie_rechecks=opts.tie_rechecks, class_weight=opts.class_weight)
            (tmp / PARITY_FILE).write_text(json.dumps(parity, indent=2, sort_keys=True) + "\n")
            if not parity["passed"]:
                f = parity["fp32"]
                raise ExportError(
                    f"parity failed on {parity['queries']} test tuples: score max diff {f['score_max_abs_diff']:.3g} "
                    f"(bound {opts.score_tolerance:g}), box max diff {f['box_max_abs_diff_px']:.3g} px (bound {opts.box_tolerance_px:g}), "
                    f"recalls ONNX {[f[k] for k in ('recall@1', 'recall@5', 'recall@10')]} vs PyTorch "
                    f"{[parity['pytorch'][k] for k in ('recall@1', 'recall@5', 'recall@10')]}{recheck_line(f, ' (', ')')}; {out} is left as it was"
                )
        registration = None
        if register:
            from ardetect.export.registry import log_and_register

            if uri is None:
                raise ValueError("register=True needs the tracking uri")
            start = time.perf_counter()
            example = input_example(tuples, negatives, data_root) if tuples is not None else None
            registration = log_and_register(tmp, uri, _version_metrics(metrics or {}, parity), model_name, example)
            seconds["registration"] = time.perf_counter() - start
        _install(tmp, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    missing = [f"{g}.onnx" for g in GRAPHS if not (out / f"{g}.onnx").is_file()]
    if missing:  # pragma: no cover - a failed rename raises before this
        raise ExportError(f"{out} lacks {missing} after the install")
    return {"manifest": manifest, "parity": parity, "registration": registration, "seconds": seconds}


def _version_metrics(metrics: dict, parity: dict | None) -> dict[str, float]:
    flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if parity is not None:
        flat["parity_score_max_abs_diff"] = parity["fp32"]["score_max_abs_diff"]
        flat["parity_box_max_abs_diff_px"] = parity["fp32"]["box_max_abs_diff_px"]
    return flat


def input_example(tuples: pd.DataFrame, negatives: pd.DataFrame, data_root: Path) -> pd.DataFrame:
    """The first test tuple as the registered model's input: its query and two candidates (its own image first)."""
    from ardetect.export.parity import parity_queries

    t, negs = parity_queries(tuples, negatives, 1)
    q = t.iloc[0]
    root = Path(data_root).resolve()
    others = sorted(negs["neg_image"].astype(str))[:1]
    x0, y0, x1, y1 = (float(v) for v in q["query_box"])
    return pd.DataFrame([{
        "query_image": str(root / q["query_image"]), "x0": x0, "y0": y0, "x1": x1, "y1": y1, "prompt": str(q["prompt"]),
        "concept_phrase": str(q["concept_phrase"]), "candidates": [str(root / q["train_image"]), *(str(root / o) for o in others)],
    }])


def recheck_line(row: dict, before: str = "", after: str = "") -> str:
    """Words on the fp32 row's tie re-check (``ardetect.export.parity``), or "" when none was needed."""
    checks = row.get("tie_rechecks")
    if not checks:
        return ""
    if isinstance(checks, str):
        return f"{before}tie re-check: {checks}{after}"
    ok = [c for c in checks if c["explained"]]
    raw = row["before_recheck"]
    runs = "; ".join(f"{c['tuple_id']} x {c['candidate']}: {c['matched']['run']}" for c in ok)
    return (f"{before}{len(checks)} pair{'' if len(checks) == 1 else 's'} beyond the bounds (score diff {raw['score_max_abs_diff']:.2e}, box diff "
            f"{raw['box_max_abs_diff_px']:.2e} px), {len(ok)} of them PyTorch's own answer when a selection-order tie goes the "
            f"other way{' (' + runs + ')' if runs else ''}{after}")


def variant_line(row: dict) -> str:
    """One line on a scorer variant's parity row (``run_parity``): its drift from fp32 and its recalls."""
    ref = row.get("pytorch_same_queries")
    vs = row["vs_fp32"]
    line = (f"on {row['queries']} test tuples, score diff {vs['score_max_abs_diff']:.2e} from fp32, "
            f"{100 * vs['box_changed_share']:.1f} % of chosen boxes changed; Recall@1/5/10 "
            f"{[round(row[k], 4) for k in ('recall@1', 'recall@5', 'recall@10')]}")
    if ref is not None:
        line += f" (PyTorch on those tuples {[round(ref[k], 4) for k in ('recall@1', 'recall@5', 'recall@10')]})"
    return line
