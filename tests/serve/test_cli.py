"""`ard index build` over a folder of images, `ard attribute` in-process (JSON and a PNG grid), `ard serve`'s defaults."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ardetect.cli import app


@pytest.mark.slow
def test_index_a_folder_then_attribute(served, tmp_path):
    folder = tmp_path / "images"
    (folder / "sub dir").mkdir(parents=True)
    train = sorted(set(served.tuples["train_image"]))
    for i, rel in enumerate(train[:5]):
        shutil.copy(served.data / rel, (folder / "sub dir" if i % 2 else folder) / f"im {i}.png")
    grey = np.asarray(Image.open(served.data / train[5]).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(folder / "deep.png")  # a 16-bit PNG is indexed like any other
    (folder / "notes.txt").write_text("not an image")
    params = tmp_path / "params.yaml"  # absent: the serve section's defaults
    runner = CliRunner()
    built = runner.invoke(app, ["index", "build", "--images", str(folder), "--model", str(served.export), "--out", str(tmp_path / "idx"),
                                "--batch", "4", "--params", str(params)])
    assert built.exit_code == 0, built.output
    assert "6 images" in built.output and "wrote" in built.output
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["count"] == 6 and meta["source"] == "folder"
    t = served.tuples[served.tuples["split"] == "test"].iloc[0]
    query = [str(served.data / t["query_image"]), "--box", ",".join(f"{v:g}" for v in t["query_box"]), "--prompt", t["prompt"],
             "--phrase", t["concept_phrase"], "--model", str(served.export), "--index", str(tmp_path / "idx"), "--params", str(params)]
    out = runner.invoke(app, ["attribute", *query, "--json", "--top-k", "4"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    ids = [r["id"] for r in result["results"]]
    assert len(ids) == 4 and set(ids) <= {"im_0", "sub_dir/im_1", "im_2", "sub_dir/im_3", "im_4", "deep"}  # ids: paths made safe
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True) and result["scored"] == 6
    grid = tmp_path / "grid.png"
    drawn = runner.invoke(app, ["attribute", *query, "--grid", str(grid), "--truth", ids[0]])
    assert drawn.exit_code == 0 and "<- the true training image" in drawn.output, drawn.output
    assert Image.open(grid).size[0] > 5 * 192
    bad = runner.invoke(app, ["attribute", *query[:5], "--phrase", "V* dragon", *query[7:]])
    assert bad.exit_code == 2 and "phrase: 'V* dragon' does not occur in the prompt" in bad.output
    outside = runner.invoke(app, ["attribute", query[0], "--box", "0,0,500,20", *query[3:]])
    assert outside.exit_code == 2 and "box: [0.0, 0.0, 500.0, 20.0] lies outside the 64x64" in outside.output
    for given, said in ((tmp_path / "absent.png", "no such file"), (folder, "a folder, not an image file")):
        wrong = runner.invoke(app, ["attribute", str(given), *query[1:]])
        assert wrong.exit_code == 2 and f"image: {given}: {said}" in wrong.output, wrong.output
    # a folder as --grid was a traceback, after a try to write a temp file in the folder above it; a .jpg got PNG bytes
    for given, said in ((folder, f"a folder; give the PNG file to write (e.g. {folder / 'grid.png'})"),
                        (tmp_path / "grid.jpg", "the grid is written as a PNG; name it .png")):
        wrong = runner.invoke(app, ["attribute", *query, "--grid", str(given)])
        assert wrong.exit_code == 2 and f"grid: {given}: {said}" in wrong.output, wrong.output
    assert not (tmp_path / "grid.jpg").exists()


def test_serve_binds_loopback_unless_told(served, tmp_path, monkeypatch):
    import socket

    import uvicorn

    import ardetect.cli as cli

    calls = []
    monkeypatch.setattr(cli, "_listening_socket", lambda host, port: calls.append((host, port)) or socket.socket())
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: calls.append((self.config.host, self.config.port, sockets)))
    monkeypatch.delenv("ARD_SERVE_TOKEN", raising=False)
    runner = CliRunner()
    base = ["serve", "--model", str(served.export), "--index", str(served.index), "--params", str(tmp_path / "params.yaml")]
    first = runner.invoke(app, base)
    assert first.exit_code == 0, first.output
    assert calls[-2] == ("127.0.0.1", 8000) and calls[-1][:2] == ("127.0.0.1", 8000) and len(calls[-1][2]) == 1
    assert "no token" in first.output
    monkeypatch.setenv("ARD_SERVE_TOKEN", "t0ken")
    second = runner.invoke(app, [*base, "--host", "0.0.0.0", "--port", "9123"])
    assert calls[-1][:2] == ("0.0.0.0", 9123) and "bearer token required" in second.output
    wrong = runner.invoke(app, ["serve", "--model", str(tmp_path / "missing"), "--index", str(served.index), "--params", str(tmp_path / "p.yaml")])
    assert wrong.exit_code == 1 and "no such folder" in wrong.output


def test_serve_refuses_a_port_in_use_before_loading_and_serves_on_a_free_one(served, tmp_path):
    """`ard serve` binds its socket before it loads the model: a port in use (a second `ard serve`), an address the
    machine does not have, or a host name that does not resolve is refused at once with the option to change (uvicorn
    said so only after the model had loaded, below the line announcing the service). Then the real command, in its own
    process, serves on a free port until SIGINT."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    runner = CliRunner()
    missing = ["--model", str(tmp_path / "missing"), "--index", str(served.index), "--params", str(tmp_path / "p.yaml")]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = runner.invoke(app, ["serve", *missing, "--port", str(port)])
    assert busy.exit_code == 1 and "no such folder" not in busy.output, busy.output  # refused before the model
    assert (f"serve failed: cannot listen on 127.0.0.1:{port}: the port is in use (another `ard serve`, or another "
            "service): choose one with --port") in busy.output
    absent = runner.invoke(app, ["serve", *missing, "--host", "192.0.2.1", "--port", str(port)])  # TEST-NET-1
    assert absent.exit_code == 1 and "this machine has no such address: choose one with --host" in absent.output
    unknown = runner.invoke(app, ["serve", *missing, "--host", "no-such-host.invalid", "--port", str(port)])
    assert unknown.exit_code == 1 and "--host 'no-such-host.invalid' does not resolve" in unknown.output

    ard = Path(sys.executable).with_name("ard")
    proc = subprocess.Popen([str(ard), "serve", "--model", str(served.export), "--index", str(served.index),
                             "--params", str(tmp_path / "p.yaml"), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "ARD_SERVE_TOKEN": ""},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's session has it
    try:
        deadline, health = time.monotonic() + 120, None
        while health is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                    health = json.loads(reply.read())
            except OSError:
                time.sleep(0.5)
        assert health is not None, proc.communicate(timeout=30)[0]
        count = json.loads((served.index / "index.json").read_text())["count"]
        assert health["status"] == "ok" and health["index_size"] == count > 0, health
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (130, -signal.SIGINT), out  # uvicorn shuts down, then ends as SIGINT ends a program
    assert f"at http://127.0.0.1:{port}/ (no token)" in out and "Finished server process" in out
