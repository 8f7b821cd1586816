"""Read the built book as a reader does: every page of _build/html in headless Chromium.

    python .ci/book_check_browser.py [--html _build/html] [--screenshots _build/screenshots]
    python .ci/book_check_browser.py --page runs/tiny/report.html     # one standalone page (dinolite-report's)

Fails (exit 1, one line per problem) on: an error or traceback output; an <img> that does not
load; an output block wider than the content column (a reader would have to scroll it); a code
cell or listing that scrolls sideways; raw TeX on a page (maths MathJax did not typeset: it must
load from the built site, offline); a visible nbval marker (NBVAL_...); a path
of the build machine in an output (home directories, /tmp, /work, the repository); a Python
object repr such as <... object at 0x...>; a widget output with no static figure beside it; a
book whose chapters hold no outputs at all (built without execution: run `make book` first).
--page checks standalone HTML files instead of the book (repeatable): the same checks on their
.cell_output blocks and images, without the book's "chapters have outputs" rule.
Saves one full-page screenshot per page, at 1280 px, to --screenshots for a person to look at.

Needs only the standard library and Debian's `chromium`; it drives the browser through the
DevTools protocol on a pipe (--remote-debugging-pipe), so no driver or network port is involved.
It imports nothing from dinolite: it checks the rendered HTML, whoever built it.
"""
import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTH, HEIGHT = 1280, 2000
MAX_SCREENSHOT_HEIGHT = 16000  # Chromium's limit for one capture is 16384 px
PAGE_TIMEOUT_S = 60

# Run in every page after it has loaded; returns what the checks need as one JSON value.
PAGE_SCRIPT = r"""
(() => {
  const article = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
  const column = article.getBoundingClientRect();
  const outputs = [...document.querySelectorAll('.cell_output')];
  const cellOf = el => el.closest('.cell') || el.parentElement;
  const describe = el => {
    const cell = cellOf(el);
    const source = cell && cell.querySelector('.cell_input pre');
    return (source ? source.innerText.trim().split('\n')[0] : el.innerText.trim().split('\n')[0]).slice(0, 80);
  };
  const wide = [];
  for (const out of outputs) {
    for (const el of out.querySelectorAll('pre, img, table, .output')) {
      const box = el.getBoundingClientRect();
      if (box.width === 0) continue;
      const scrolls = el.scrollWidth > el.clientWidth + 2 && getComputedStyle(el).overflowX !== 'visible';
      if (scrolls || box.right > column.right + 2) {
        wide.push({cell: describe(out), width: Math.round(Math.max(el.scrollWidth, box.width)),
                   column: Math.round(column.width), scrolls});
        break;
      }
    }
  }
  // text outputs wrap at the column (_static/outputs.css): count the wrapped lines for the report
  let wrapped = 0;
  for (const pre of document.querySelectorAll('.cell_output pre')) {
    const style = getComputedStyle(pre);
    const lineHeight = parseFloat(style.lineHeight) || 1.2 * parseFloat(style.fontSize);
    const height = pre.clientHeight - parseFloat(style.paddingTop) - parseFloat(style.paddingBottom);
    wrapped += Math.max(0, Math.round(height / lineHeight) - pre.innerText.replace(/\n$/, '').split('\n').length);
  }
  // code a reader would have to scroll: code cells, listings (literalinclude), code blocks in the text
  for (const pre of article.querySelectorAll('pre')) {
    if (pre.closest('.cell_output')) continue;
    const box = pre.getBoundingClientRect();
    if (box.width === 0) continue;
    const scrolls = pre.scrollWidth > pre.clientWidth + 2 && getComputedStyle(pre).overflowX !== 'visible';
    if (scrolls || box.right > column.right + 2) {
      const caption = pre.closest('.literal-block-wrapper, .cell_input, div[class*="highlight"]');
      const label = (caption && caption.querySelector('.caption-text')) ? caption.querySelector('.caption-text').innerText
                                                                         : pre.innerText.trim().split('\n')[0];
      wide.push({cell: 'code: ' + label.slice(0, 80), width: Math.round(Math.max(pre.scrollWidth, box.width)),
                 column: Math.round(column.width), scrolls});
    }
  }
  // raw TeX: a math element MathJax did not typeset, or a TeX command in the text outside code
  const rawTex = [];
  for (const el of article.querySelectorAll('.math')) {
    if (!el.querySelector('mjx-container') && !el.closest('mjx-container')) rawTex.push(el.textContent.trim().slice(0, 60));
  }
  const texCommand = /\\(frac|tfrac|mathcal|mathrm|mathbb|underbrace|operatorname|lVert|rVert|left|right|sum|cdot|times|hat|begin|end)\b|\$\$/;
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!parent || parent.closest('pre, code, script, style, mjx-container, .math, .highlight, .cell_output')) continue;
    if (!parent.getClientRects().length) continue;  // not shown
    const found = node.textContent.match(texCommand);
    if (found) rawTex.push(node.textContent.trim().slice(0, 60));
  }
  const markers = [...new Set((document.body.innerText.match(/[^\n]*NBVAL_\w+[^\n]*/g) || []).map(l => l.trim().slice(0, 80)))];
  const errors = [...document.querySelectorAll('.cell_output .traceback, .cell_output .output.error')].map(describe);
  for (const out of outputs) {
    if (/Traceback \(most recent call last\)/.test(out.innerText)) errors.push(describe(out));
  }
  const images = [...document.images].map(img => ({src: img.getAttribute('src'), ok: img.complete && img.naturalWidth > 0,
                                                     shown: Math.round(img.getBoundingClientRect().width),
                                                     natural: img.naturalWidth}));
  const widgets = [];
  for (const script of document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')) {
    const cell = cellOf(script);
    let previous = cell.previousElementSibling;
    while (previous && !previous.classList.contains('cell')) previous = previous.previousElementSibling;
    const hasFigure = c => !!(c && c.querySelector('.cell_output img'));
    widgets.push({cell: describe(script), fallback: hasFigure(cell) || hasFigure(previous)});
  }
  return {title: document.title, column: Math.round(column.width), n_outputs: outputs.length, wrapped,
          texts: outputs.map(o => ({cell: describe(o), text: o.innerText})), wide, errors: [...new Set(errors)], images, widgets,
          rawTex: [...new Set(rawTex)], markers, mathjax: window.__bookCheckMathJax || 'none',
          height: Math.ceil(Math.max(document.documentElement.scrollHeight, document.body.scrollHeight))};
})()
"""


# Resolves when MathJax has typeset the page, or at once where MathJax never started (no maths, or not loaded).
MATHJAX_WAIT = r"""
(async () => {
  const started = window.MathJax && window.MathJax.startup && window.MathJax.startup.promise;
  if (!started) { window.__bookCheckMathJax = 'not loaded'; return false; }
  const timeout = new Promise(resolve => setTimeout(() => resolve('timeout'), 20000));
  window.__bookCheckMathJax = await Promise.race([window.MathJax.startup.promise.then(() => 'typeset'), timeout]);
  return true;
})()
"""


class Browser:
    """Headless Chromium driven over the DevTools pipe (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="book-check-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--hide-scrollbars", "--allow-file-access-from-files",
                 f"--user-data-dir={self.profile}", f"--window-size={WIDTH},{HEIGHT}", "--remote-debugging-pipe"]

        def child_fds():  # the browser expects the pipe on fds 3 and 4
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.process = subprocess.Popen([binary, *flags, "about:blank"], preexec_fn=child_fds, pass_fds=(3, 4),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = PAGE_TIMEOUT_S):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout: float = PAGE_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        for i, event in enumerate(self.events):
            if event.get("method") == method and event.get("sessionId") == session:
                del self.events[i]
                return
        while True:
            event = self._read(deadline)
            if event.get("method") == method and event.get("sessionId") == session:
                return
            self.events.append(event)

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("the browser did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser exited")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def machine_paths(repository: Path) -> re.Pattern:
    """Paths that belong to the machine that built the book, never to a reader's."""
    parts = [r"/home/\w", r"/root/", r"/Users/\w", r"/tmp/", r"/var/folders/", r"/work/", r"[A-Z]:\\Users\\"]
    parts += [re.escape(str(p)) for p in (repository, Path.home()) if len(Path(p).parts) > 1]  # never "/" alone
    return re.compile("|".join(parts))


def check_page(browser: Browser, path: Path, html_root: Path, screenshots: Path, paths: re.Pattern) -> tuple[list, dict]:
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    try:
        browser.send("Page.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session=session)
        browser.send("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired", session)
        time.sleep(0.5)  # let the theme's scripts settle
        # wait until MathJax has typeset the page (it is loaded from the built site; with no MathJax, raw TeX stays)
        browser.send("Runtime.evaluate", {"expression": MATHJAX_WAIT, "awaitPromise": True, "returnByValue": True},
                     session=session)
        result = browser.send("Runtime.evaluate", {"expression": PAGE_SCRIPT, "returnByValue": True}, session=session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('text')}")
        info = result["result"]["value"]
        height = min(info["height"], MAX_SCREENSHOT_HEIGHT)
        # a viewport as tall as the page, scrolled to the origin: the capture shows the layout a reader sees
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        browser.send("Runtime.evaluate", {"expression": "window.scrollTo(0, 0)"}, session=session)
        time.sleep(0.3)
        shot = browser.send("Page.captureScreenshot", {"format": "png",
                                                        "clip": {"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1}},
                            session=session)
        name = str(path.relative_to(html_root).with_suffix("")).replace(os.sep, "__") + ".png"
        (screenshots / name).write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.send("Target.closeTarget", {"targetId": target})

    page = str(path.relative_to(html_root))
    problems = []
    for cell in info["errors"]:
        problems.append(f"{page}: error output in cell starting {cell!r}")
    for image in info["images"]:
        if not image["ok"]:
            problems.append(f"{page}: image does not load: {image['src']}")
    for wide in info["wide"]:
        how = "scrolls horizontally" if wide["scrolls"] else "sticks out of the column"
        problems.append(f"{page}: output {wide['width']} px wide {how} (column {wide['column']} px), "
                        f"cell starting {wide['cell']!r}")
    for output in info["texts"]:
        found = paths.search(output["text"])
        if found:
            line = next(line for line in output["text"].splitlines() if found.group(0) in line)
            problems.append(f"{page}: machine path in the output of cell starting {output['cell']!r}: {line.strip()[:120]!r}")
        stray = re.search(r"<[\w.]+ (object )?at 0x[0-9a-f]+>", output["text"])
        if stray:
            problems.append(f"{page}: stray object repr {stray.group(0)!r} in cell starting {output['cell']!r}")
    for tex in info["rawTex"]:
        problems.append(f"{page}: raw TeX on the page (MathJax: {info['mathjax']}): {tex!r}")
    for marker in info["markers"]:
        problems.append(f"{page}: nbval marker visible to readers (use the cell tag nbval-check-output): {marker!r}")
    for widget in info["widgets"]:
        if not widget["fallback"]:
            problems.append(f"{page}: widget with no static figure beside it, cell starting {widget['cell']!r}")
    return problems, info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", default="_build/html", type=Path)
    parser.add_argument("--screenshots", default="_build/screenshots", type=Path)
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    parser.add_argument("--page", action="append", type=Path, default=[],
                        help="check this standalone HTML file instead of the book (repeatable)")
    args = parser.parse_args(argv)

    if args.page:
        missing = [str(p) for p in args.page if not p.is_file()]
        if missing:
            print(f"error: no such page: {', '.join(missing)}")
            return 2
        pages = [p.resolve() for p in args.page]
        args.html = Path(os.path.commonpath([p.parent for p in pages]))
    else:
        pages = sorted(p for p in args.html.rglob("*.html")
                       if not any(part.startswith("_") for part in p.relative_to(args.html).parts)
                       and p.name != "search.html" and p.name != "genindex.html")
    if not pages:
        print(f"error: no pages under {args.html}; build the book first (make book)")
        return 2
    if not shutil.which(args.chromium):
        print("error: chromium not found; install it (Debian/Ubuntu: apt-get install -y chromium) or pass --chromium PATH")
        return 2
    args.screenshots.mkdir(parents=True, exist_ok=True)
    paths = machine_paths(Path.cwd().resolve())
    browser = Browser(args.chromium)
    problems, chapter_outputs = [], 0
    try:
        browser.send("Target.setDiscoverTargets", {"discover": False})
        for page in pages:
            page_problems, info = check_page(browser, page, args.html, args.screenshots, paths)
            problems += page_problems
            if re.match(r"\d\d_", page.name):
                chapter_outputs += info["n_outputs"]
            figures = [i for i in info["images"] if i["src"] and "_images/" in i["src"]]
            print(f"{str(page.relative_to(args.html)):32s} {info['n_outputs']:3d} outputs, {len(figures):2d} figures, "
                  f"{len(info['widgets'])} widgets, {info['wrapped']:3d} wrapped output lines, {len(page_problems)} problems")
    finally:
        browser.close()
    if chapter_outputs == 0 and not args.page:
        problems.append("no chapter has outputs: the book was built without executing it; run `make book` first")
    print(f"screenshots: {args.screenshots}/ ({len(pages)} pages at {WIDTH} px)")
    for problem in problems:
        print("FAIL", problem)
    print(f"{len(problems)} problems on {len(pages)} pages" if problems else f"all {len(pages)} pages pass")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
