"""The README's screenshot of the web page: headless Chromium on a running `ard serve`, one pipeline example
picked and submitted.

  PYTHONPATH=src .venv/bin/python docs/serve_page_screenshot.py --url http://127.0.0.1:8000 --example t00009_00 \
      --out docs/serve_page.png
"""

from __future__ import annotations

import argparse
import shutil


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--example", default=None, help="tuple id of the example to pick (default: the first)")
    ap.add_argument("--out", default="docs/serve_page.png")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.goto(args.url + "/")
        page.wait_for_function("document.querySelectorAll('#example option').length > 1")
        if args.example:
            value = page.eval_on_selector("#example", "(s, t) => [...s.options].find(o => o.textContent.startsWith(t + ' ')).value",
                                          args.example)
            page.select_option("#example", value)
        else:
            page.select_option("#example", index=1)
        page.wait_for_function("document.getElementById('box').value !== ''")
        page.click("#submit")
        page.wait_for_function("document.getElementById('status').textContent.includes('results from')", timeout=120_000)
        page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=args.out, full_page=True)
        print(page.text_content("#status"))
        browser.close()
    from PIL import Image

    shot = Image.open(args.out).convert("RGB")  # 256 colours: a fifth of the size, the page's flat colours kept
    shot.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
