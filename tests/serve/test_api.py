"""The HTTP API: answers as the attributor does, refuses every malformed request with a 4xx naming the field
and stays healthy, converts unusual images, answers 503 with Retry-After when its queue is full, and guards
every route but /health with the bearer token when one is set."""

from __future__ import annotations

import io
import threading
import time
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ardetect.config import ServeConfig
from ardetect.export.runtime import Stopped
from ardetect.images import decode_image, to_rgb
from ardetect.serve.app import create_app

CFG = ServeConfig(max_pixels=1_000_000, max_upload_bytes=200_000, max_prompt_chars=120, max_top_k=20, max_candidates=8,
                  workers=1, queue_size=1, request_timeout_s=30)


def png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def query(served):
    t = served.tuples[served.tuples["split"] == "test"].iloc[0]
    data = (served.data / t["query_image"]).read_bytes()
    box = ",".join(f"{v:g}" for v in t["query_box"])
    return {"data": data, "box": box, "prompt": t["prompt"], "phrase": t["concept_phrase"], "tuple": t}


@pytest.fixture(scope="module")
def client(attributor):
    with TestClient(create_app(attributor, CFG)) as c:
        yield c


def post(client, query, image=None, headers=None, files=None, **fields):
    form = {"box": query["box"], "prompt": query["prompt"], "phrase": query["phrase"], "top_k": "5"}
    form.update({k: v for k, v in fields.items() if v is not None})
    form = {k: v for k, v in form.items() if v is not ...}
    files = files if files is not None else {"image": ("q.png", query["data"] if image is None else image, "image/png")}
    return client.post("/attribute", data=form, files=files, headers=headers or {})


def test_attribute_answers_as_the_attributor(client, attributor, query):
    r = post(client, query, shortlist="16")
    assert r.status_code == 200, r.text
    body = r.json()
    img = decode_image(query["data"], CFG.max_pixels)
    box = [float(v) for v in query["box"].split(",")]
    direct = attributor.attribute(img, box, query["prompt"], query["phrase"], top_k=5, shortlist=16)
    assert [x["id"] for x in body["results"]] == [x["id"] for x in direct.results]
    np.testing.assert_allclose([x["score"] for x in body["results"]], [x["score"] for x in direct.results], atol=1e-6)
    assert [x["rank"] for x in body["results"]] == [1, 2, 3, 4, 5]
    assert all(len(x["box"]) == 4 for x in body["results"]) and body["scored"] == 16
    assert body["timing_ms"]["request"] >= body["timing_ms"]["total"] > 0
    # the default shortlist (5 here), and an explicit candidate list
    assert post(client, query).json()["scored"] == 5
    ids = attributor.index.ids[:3]
    r = post(client, query, candidates=",".join(ids))
    assert r.status_code == 200 and sorted(x["id"] for x in r.json()["results"]) == sorted(ids)


def test_clip_to_images_keeps_a_box_inside_its_own_image():
    from ardetect.export.runtime import clip_to_images

    boxes = np.array([[-5.0, 10.0, 170.0, 200.0], [20.0, 30.0, 60.0, 80.0], [150.0, -3.0, 231.5, 90.0]])
    sizes = np.array([[150, 160], [150, 160], [100, 230]])  # (h, w)
    np.testing.assert_array_equal(clip_to_images(boxes, sizes), [[0, 10, 160, 150], [20, 30, 60, 80], [150, 0, 230, 90]])


def test_answered_regions_lie_in_their_images_and_are_the_detectors_boxes_clipped(client, attributor, query, monkeypatch):
    """The detector's box may run past its image's edge (96 of the 3,120 top-10 boxes of the default world's test
    split, by up to 29 px); a region shown to a user was then partly outside the image it names. Every answered region
    is now the detector's box clipped to its image: the same box wherever it was inside."""
    from ardetect.export.runtime import clip_to_images

    every = len(attributor.index)
    r = post(client, query, shortlist=str(every), top_k=str(min(every, CFG.max_top_k)))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    for x in results:
        x0, y0, x1, y1 = x["box"]
        assert 0 <= x0 < x1 <= x["width"] and 0 <= y0 < y1 <= x["height"], x
    box = [float(v) for v in query["box"].split(",")]
    q, _ = attributor.encode(decode_image(query["data"], CFG.max_pixels), box, query["prompt"], query["phrase"])
    positions = attributor.index.positions_of([x["id"] for x in results])
    raw = attributor.model.detector.score(attributor.index.candidates(positions), q, attributor.index.sizes[positions])["boxes"]
    want = dict(zip((attributor.index.ids[k] for k in positions), clip_to_images(raw, attributor.index.sizes[positions])))
    np.testing.assert_allclose([x["box"] for x in results], [want[x["id"]] for x in results], atol=1e-3)
    # this tiny detector's boxes all lie inside: a scorer whose boxes run past the right and bottom edges
    real = attributor.model.detector.score

    def past_the_edge(*args, **kwargs):
        out = dict(real(*args, **kwargs))
        out["boxes"] = out["boxes"] + np.array([0.0, 0.0, 1000.0, 1000.0])
        return out

    monkeypatch.setattr(attributor.model.detector, "score", past_the_edge)
    shifted = post(client, query, shortlist=str(every), top_k=str(min(every, CFG.max_top_k))).json()["results"]
    for x in shifted:
        x0, y0, x1, y1 = x["box"]
        assert (x1, y1) == (x["width"], x["height"]) and [x0, y0] == pytest.approx(list(want[x["id"]][:2]), abs=1e-3), x


def test_model_health_images_docs(client, attributor, served):
    m = client.get("/model").json()
    assert m["index_size"] == 16 and m["providers"] == {k: "CPUExecutionProvider" for k in ("image_encoder", "query_encoder", "scorer")}
    assert m["name"] is None and m["source"] == str(served.export)  # a folder: no registered name
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert client.get("/docs").status_code == 200 and "/attribute" in client.get("/openapi.json").json()["paths"]
    k = attributor.index.ids[0]
    plain = client.get(f"/images/{k}")
    assert plain.status_code == 200 and plain.content == attributor.index.path_of(k).read_bytes()
    drawn = client.get(f"/images/{k}", params={"box": "2,2,30,30", "concept": "true"})
    assert drawn.status_code == 200 and drawn.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(drawn.content)).convert("RGB"))
    assert tuple(pixels[2, 10]) == (0xE4, 0x00, 0x3A)  # the box's top edge, in the predicted region's colour
    cx0, cy0, cx1, _ = (round(float(v)) for v in attributor.index.info(0)["concept_box"])
    edge = pixels[max(cy0 - 1, 0):cy0 + 2, (cx0 + cx1) // 2]  # the concept's box: its top edge, in green
    assert any(tuple(p) == (0x00, 0xB0, 0x50) for p in edge), edge
    ex = client.get("/examples").json()
    assert len(ex) == len(served.tuples) and ex[0]["train_id"] in attributor.index.position
    first = client.get("/examples/0/image")
    assert first.status_code == 200 and client.get("/examples/999/image").status_code == 404
    assert first.content == (served.data / attributor.index.examples["query_image"].iloc[0]).read_bytes()  # example 0's own


def test_an_indexed_image_missing_or_unreadable_on_disk_is_named(client, attributor, monkeypatch, tmp_path):
    """The index outlives its files (a container without the data mounted, a file removed): a clear answer, not a 500."""
    k = attributor.index.ids[0]
    monkeypatch.setattr(attributor.index, "path_of", lambda image_id: tmp_path / "gone.png")
    for params in ({}, {"box": "2,2,30,30"}):
        r = client.get(f"/images/{k}", params=params)
        assert r.status_code == 404 and r.json()["field"] == "image_id", r.text
        assert f"{k!r}: its file is missing from" in r.json()["detail"]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    monkeypatch.setattr(attributor.index, "path_of", lambda image_id: tmp_path / "broken.png")
    r = client.get(f"/images/{k}", params={"box": "2,2,30,30"})
    assert r.status_code == 500 and r.json()["field"] == "image_id" and "broken.png cannot be read" in r.json()["detail"], r.text
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("path", [
    "/images/../../../etc/passwd", "/images/%2e%2e/%2e%2e/etc/passwd", "/images//etc/passwd", "/images/img/x0.png",
    "/images/x0/../../secret", "/images/%00",
])
def test_images_cannot_leave_the_index(client, path):
    r = client.get(path)
    assert r.status_code == 404 and "root:" not in r.text
    assert client.get("/health").status_code == 200


def test_index_rows_that_would_leave_the_root_are_refused(attributor):
    with pytest.raises(KeyError):
        attributor.index.file_under_root("../../etc/passwd", "x")
    with pytest.raises(KeyError):
        attributor.index.file_under_root("/etc/passwd", "x")


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _corrupt(data: bytes) -> bytes:
    i = data.index(b"IDAT") + 8
    return data[:i] + bytes(b ^ 0xFF for b in data[i : i + 40]) + data[i + 40 :]


def _bomb() -> bytes:
    """A PNG of a few kilobytes whose header announces 20000 x 20000 greyscale pixels (400 million): it must be
    refused from the header alone, before anything is decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    w = h = 20_000
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    rows = zlib.compress(b"\x00" * (w + 1) * 64, 9)  # only 64 rows present: decoding would fail late, reading the header does not
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


MALFORMED = [
    # (name, image bytes or a function of the query's bytes, form fields, status, field, words in the message)
    ("not an image", b"this is not an image at all", {}, 422, "image", "not an image"),
    ("truncated png", _truncated, {}, 422, "image", "truncated or corrupt"),
    ("corrupt png", _corrupt, {}, 422, "image", "truncated or corrupt"),
    ("zero bytes", b"", {}, 422, "image", "empty (0 bytes)"),
    ("over the pixel limit", lambda d: png(Image.new("1", (2000, 2000))), {}, 413, "image", "4,000,000 pixels exceeds the limit of 1,000,000"),
    ("decompression bomb", lambda d: _bomb(), {}, 413, "image", "decompression bomb"),
    ("box outside", None, {"box": "10,10,200,40"}, 422, "box", "outside the 64x64"),
    ("box without area", None, {"box": "10,10,10,40"}, 422, "box", "no area"),
    ("box of three numbers", None, {"box": "1,2,3"}, 422, "box", "four numbers"),
    ("box not numbers", None, {"box": "a,b,c,d"}, 422, "box", "four numbers"),
    ("box not finite", None, {"box": "0,0,nan,9"}, 422, "box", "not finite"),
    ("empty prompt", None, {"prompt": "   "}, 422, "prompt", "empty"),
    ("missing prompt", None, {"prompt": ...}, 422, "prompt", "empty"),
    ("oversized prompt", None, {"prompt": "A photo of V* cat " + "and more " * 40}, 422, "prompt", "more than the limit of 120"),
    ("phrase not in prompt", None, {"phrase": "V* dragon"}, 422, "phrase", "does not occur in the prompt"),
    ("phrase of no tokens", None, {"prompt": "A photo of V* cat at a cafe\u0301.", "phrase": "\u0301"}, 422, "phrase", "has no tokens"),
    ("control character", None, {"prompt": "A photo of V* cat\x07 on the beach."}, 422, "prompt", "control or format character"),
    ("right-to-left override", None, {"prompt": "A photo of V* cat \u202eon the beach."}, 422, "prompt", "control or format"),
    ("right-to-left text", None, {"prompt": "A photo of V* cat \u05e9\u05dc\u05d5\u05dd on the beach."}, 422, "prompt", "right-to-left"),
    ("unknown candidates", None, {"candidates": "x0,nope1,nope2"}, 422, "candidates", "2 unknown ids"),
    ("too many candidates", None, {"candidates": ",".join(f"x{i}" for i in range(9))}, 422, "candidates", "limit of 8"),
    ("malformed candidate", None, {"candidates": "../etc/passwd"}, 422, "candidates", "malformed ids"),
    ("top_k zero", None, {"top_k": "0"}, 422, "top_k", "outside 1..20"),
    ("top_k too large", None, {"top_k": "21"}, 422, "top_k", "outside 1..20"),
    ("top_k not a number", None, {"top_k": "ten"}, 422, "top_k", "integer"),
    ("shortlist zero", None, {"shortlist": "0"}, 422, "shortlist", "outside 1..1000"),
    ("shortlist too large", None, {"shortlist": "1001"}, 422, "shortlist", "outside 1..1000"),
]


@pytest.mark.parametrize("name,image,fields,status,field,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_gets_a_4xx_naming_the_field(client, query, name, image, fields, status, field, words):
    data = image(query["data"]) if callable(image) else image
    fields = {k: v for k, v in fields.items()}
    if "phrase" not in fields and "prompt" in fields and fields["prompt"] is not ...:
        fields["phrase"] = query["phrase"] if query["phrase"] in fields["prompt"] else None
    r = post(client, query, image=data, **fields)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["field"] == field and words in body["detail"] and body["detail"].startswith(field), body
    assert client.get("/health").status_code == 200


def test_missing_image_and_oversized_body(client, query):
    r = post(client, query, files={})
    assert r.status_code == 422 and r.json()["field"] == "image" and "missing" in r.json()["detail"]
    big = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)  # ~480 kB as PNG: over 200 kB
    r = post(client, query, image=png(Image.fromarray(big)))
    assert r.status_code == 413 and r.json()["field"] == "body" and "upload limit of 200,000 bytes" in r.json()["detail"]
    # the same body streamed without a Content-Length (chunked transfer) is cut as it arrives, with the same answer
    req = client.build_request("POST", "/attribute", data={"box": query["box"], "prompt": query["prompt"], "phrase": query["phrase"]},
                               files={"image": ("q.png", png(Image.fromarray(big)), "image/png")})
    body = req.read()
    r = client.post("/attribute", content=(body[i:i + 8192] for i in range(0, len(body), 8192)),
                    headers={"content-type": req.headers["content-type"]})
    assert r.status_code == 413 and r.json()["field"] == "body" and "upload limit of 200,000 bytes" in r.json()["detail"], r.text
    # not multipart at all, and a broken multipart body
    r = client.post("/attribute", json={"box": query["box"], "prompt": query["prompt"]})
    assert r.status_code == 422 and r.json()["field"] == "image"
    r = client.post("/attribute", content=b"--xx\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a",
                    headers={"content-type": "multipart/form-data; boundary=xx"})
    assert 400 <= r.status_code < 500, r.text
    assert client.get("/health").status_code == 200


def test_unusual_images_are_converted(client, query):
    rgb = decode_image(query["data"], CFG.max_pixels)
    one = png(Image.new("RGB", (1, 1), (200, 10, 10)))
    r = post(client, query, image=one, box="0,0,1,1")
    assert r.status_code == 200 and len(r.json()["results"]) == 5, r.text
    grey_alpha = png(rgb.convert("LA"))
    cmyk = png(rgb.convert("CMYK"), "JPEG", quality=95)
    deep_img = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    assert deep_img.mode == "I;16"
    deep = png(deep_img)
    palette = png(rgb.convert("P"))
    for name, data in (("greyscale+alpha", grey_alpha), ("CMYK JPEG", cmyk), ("16-bit PNG", deep), ("palette", palette)):
        r = post(client, query, image=data)
        assert r.status_code == 200 and len(r.json()["results"]) == 5, (name, r.text)
    # a photo whose EXIF says "rotate 90": the box is read in the turned image, as a browser shows it
    exif = Image.Exif()
    exif[0x0112] = 6
    wide = rgb.resize((64, 32))
    turned = png(wide, "JPEG", exif=exif.tobytes())
    assert decode_image(turned, CFG.max_pixels).size == (32, 64)
    r = post(client, query, image=turned, box="2,40,30,62")  # inside 32x64, outside the stored 64x32
    assert r.status_code == 200, r.text
    # a 16-bit image is scaled to 8 bits, not clipped to white
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(sixteen))[0, :, 0].tolist() == [0, 128, 255]
    assert decode_image(cmyk, CFG.max_pixels).mode == "RGB" and decode_image(deep, CFG.max_pixels).size == rgb.size


def test_full_queue_answers_503_with_retry_after(attributor, query):
    cfg = CFG.model_copy(update={"workers": 1, "queue_size": 1})
    app = create_app(attributor, cfg)
    release = threading.Event()
    with TestClient(app) as c:
        gate = app.state.gate
        held = [gate.submit(release.wait), gate.submit(release.wait)]  # one running, one waiting: the queue is full
        r = post(c, query)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1 and r.json()["field"] == "queue"
        assert c.get("/health").status_code == 200 and c.get("/health").json()["queue"]["refused"] == 1
        release.set()
        for f in held:
            f.result(timeout=10)
        r = post(c, query)
        assert r.status_code == 200, r.text


def test_concurrent_requests_beyond_the_queue_get_503_not_latency(attributor, query, monkeypatch):
    """Real requests in parallel: with one worker and one waiting place, of six at once at most two are answered 200."""
    cfg = CFG.model_copy(update={"workers": 1, "queue_size": 1})
    app = create_app(attributor, cfg)
    real = attributor.attribute

    def slow(*a, **kw):
        time.sleep(0.5)
        return real(*a, **kw)

    monkeypatch.setattr(attributor, "attribute", slow)
    codes = []
    with TestClient(app) as c:
        threads = [threading.Thread(target=lambda: codes.append(post(c, query).status_code)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert c.get("/health").status_code == 200
    assert sorted(codes).count(200) <= 2 and codes.count(503) >= 4 and set(codes) <= {200, 503}, codes


def test_request_timeout_answers_504_and_frees_the_worker(attributor, query, monkeypatch):
    cfg = CFG.model_copy(update={"request_timeout_s": 0.2})
    app = create_app(attributor, cfg)
    seen = {}

    def slow(*args, stop=None, **kwargs):  # scores until it is told to stop (10 s at most)
        start = time.perf_counter()
        while not stop.is_set() and time.perf_counter() - start < 10:
            time.sleep(0.01)
        seen["ran_s"] = time.perf_counter() - start
        raise Stopped("scoring stopped")

    monkeypatch.setattr(attributor, "attribute", slow)
    with TestClient(app) as c:
        r = post(c, query)
        assert r.status_code == 504 and r.json()["field"] == "timeout"
        deadline = time.perf_counter() + 5
        while c.get("/health").json()["queue"]["in_flight"] and time.perf_counter() < deadline:
            time.sleep(0.02)
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["queue"]["in_flight"] == 0
    assert seen["ran_s"] < 3  # stopped at the timeout, not after its 10 s


def test_stop_terminates_scorer_calls_in_flight(served, monkeypatch):
    from ardetect.export.runtime import Stop
    from ardetect.serve.index import CandidateIndex

    det = served.model.detector
    index = CandidateIndex(served.index, served.model.fingerprint)
    positions = np.arange(len(index))
    feats, sizes = index.candidates(positions), index.sizes[positions]
    q = served.tuples[served.tuples["split"] == "test"].iloc[0]
    query = det.encode_query(served.data / q["query_image"], q["query_box"], q["prompt"], q["concept_phrase"])
    want = det.score(feats, query, sizes)
    got = det.score(feats, query, sizes, stop=Stop())  # a stop never set changes nothing
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    real, stop, calls = det.sessions["scorer"], Stop(), []

    class TimedOutWhileRunning:  # the stop comes while a call runs: onnxruntime sees its terminate flag and ends it
        def __getattr__(self, name):
            return getattr(real, name)

        def run(self, names, feeds, opts=None):
            calls.append(opts)
            stop.set()
            return real.run(names, feeds, opts)

    monkeypatch.setitem(det.sessions, "scorer", TimedOutWhileRunning())
    with pytest.raises(Stopped):
        det.score(feats, query, sizes, stop=stop)
    assert calls and all(o.terminate for o in calls)
    n = len(calls)
    with pytest.raises(Stopped):  # once set, no further call starts
        det.score(feats, query, sizes, stop=stop)
    assert len(calls) == n


def test_bearer_token_guards_every_route_but_health(attributor, query):
    with TestClient(create_app(attributor, CFG, token="s3cret-token")) as c:
        assert c.get("/health").status_code == 200
        for path in ("/model", "/", "/docs", "/openapi.json", f"/images/{attributor.index.ids[0]}", "/examples", "/static/app.js"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", path
        assert post(c, query).status_code == 401
        assert c.get("/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = {"Authorization": "Bearer s3cret-token"}
        assert c.get("/model", headers=ok).status_code == 200 and post(c, query, headers=ok).status_code == 200
        # the page: /?token=... sets a cookie the browser sends with every later request
        r = c.get("/", params={"token": "s3cret-token"}, follow_redirects=False)
        assert r.status_code == 303 and "ard_token" in r.headers["set-cookie"] and "HttpOnly" in r.headers["set-cookie"]
        assert c.get("/").status_code == 200 and c.get("/model").status_code == 200
    with TestClient(create_app(attributor, CFG, token="s3cret-token")) as c:
        assert c.get("/", params={"token": "guess"}, follow_redirects=False).status_code == 401


def test_the_page_token_is_not_logged():
    import logging

    from ardetect.serve.app import RedactToken, uvicorn_log_config

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", "/?token=s3cret-token&x=1", "1.1", 303), None)
    assert RedactToken().filter(record) and "s3cret" not in record.getMessage() and "token=***&x=1" in record.getMessage()
    assert uvicorn_log_config()["handlers"]["access"]["filters"] == ["redact_token"]


def test_no_cors_unless_configured(attributor):
    origin = {"Origin": "http://elsewhere.example"}
    with TestClient(create_app(attributor, CFG)) as c:
        r = c.get("/health", headers=origin)
        assert "access-control-allow-origin" not in r.headers
        pre = c.options("/attribute", headers={**origin, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
    cfg = CFG.model_copy(update={"cors_origins": ["http://elsewhere.example"]})
    with TestClient(create_app(attributor, cfg)) as c:
        assert c.get("/health", headers=origin).headers["access-control-allow-origin"] == "http://elsewhere.example"
        assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": "http://other.example"}).headers
