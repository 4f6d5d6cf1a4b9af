"""Open the MLflow UI in a real headless browser, as a person would, and check what it shows.

    python bench/mlflow_ui_check.py --store mlruns                 # an existing store (mlflow.db + artifacts/)
    python bench/mlflow_ui_check.py --make-store                   # build a tiny store with llmforge first
    python bench/mlflow_ui_check.py --make-store --keep            # ... and keep it (path printed) for --store
    python bench/mlflow_ui_check.py --store mlruns --metrics val/loss,val/bpb

It starts `mlflow server` on 127.0.0.1 (a free port) over the store, starts Debian's `chromium`
headless with a fresh profile (a first visit: nothing remembered from an earlier session) and
drives it over the Chrome DevTools Protocol (a websocket on 127.0.0.1; the `websockets` package
Prefect already depends on). The UI is a single-page app that keeps fetching after the first
paint, so each step waits for the text it needs instead of a fixed virtual-time budget.

Pages, each saved as a PNG under --out (default bench/out/mlflow-ui/):
  01-experiments.png   the experiments list (#/experiments)
  02-landing.png       what a click on the experiment's name in that list lands on
  03-runs.png          the runs table (#/experiments/<id>/runs?workflowType=machine_learning)
  04-columns.png       its "Columns" picker, open
  05-metrics.png       the runs table with the compared metric columns ticked in that picker

Checks, all read from the rendered page text (the REST API only says what to expect):
  * the experiment is listed;
  * the click lands on the runs table, not MLflow 3's GenAI traces overview;
  * the runs table shows every run name of the experiment, and the names are distinct;
  * each metric of --metrics can be found in the Columns picker and shows as a column when ticked.
One row is read from the store, not the page: the experiment's `mlflow.experimentKind` tag.
Prints a table (check, expected, found, ok) and exits 1 if any check fails, 2 on a setup error.

How MLflow 3.17's UI picks the experiment view: not from the tag. The kind comes from a global
"workflow type" switch (GenAI | Model training, top left): the URL's ?workflowType= if present,
else what this browser chose last (localStorage `mlflow.workflowType_v1`), else "genai". A plain
#/experiments/<id> then redirects to .../overview (genai) or .../runs (machine_learning).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "out" / "mlflow-ui"
# the stable metric names issue 7 asks for: what a user compares across runs
DEFAULT_METRICS = ("val/loss", "val/bpb", "train/loss", "tokens_per_s")
KIND_TAG = "mlflow.experimentKind"
TABLE_PAGE = 100  # runs the MLflow runs table shows before "Load more"
VERBOSE = False


# --------------------------------------------------------------------------------------------
# The store. The only part that knows llmforge's CLI: adapt it here when the CLI changes.
# --------------------------------------------------------------------------------------------

TINY_MODEL = ["--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.n_head=2"]

MINI_CORPUS = """\
# a few hundred standard-library sources: offline, prepared in seconds
name: ui-check
description: Python standard library sources, first {max_docs} files (offline)
sources:
  - url: file://${{python_stdlib}}
    format: dir
    include: ["*.py"]
    exclude: ["site-packages/*", "test/*", "*/test/*", "*/tests/*", "idlelib/*", "lib2to3/*", "*/__pycache__/*"]
max_documents: {max_docs}
clean:
  quality: false
  min_chars: 200
split:
  val_fraction: 0.1
  part_bytes: 1000000
tokenizer:
  vocab_size: 512
"""


def make_store(work: Path, log=print) -> Path:
    """Build an MLflow store the way a user does: one `llmforge pipeline` and two `llmforge train` runs.

    Tiny settings (2x64 model, tens of steps, a few hundred source files), a few minutes on 2 CPU
    cores. Prefect flows report to a private Prefect server started here and stopped by PID.
    Returns the store directory (LLMFORGE_MLRUNS): ``work/mlruns``.
    """
    from llmforge.flows.services import PrefectServer

    work.mkdir(parents=True, exist_ok=True)
    spec = work / "ui-check.yaml"
    spec.write_text(MINI_CORPUS.format(max_docs=300))
    store = work / "mlruns"
    prefect = PrefectServer(work / "prefect-home").start()
    try:
        env = {**os.environ, **prefect.env, "LLMFORGE_MLRUNS": str(store), "MLFLOW_TRACKING_URI": "",
               "PREFECT_LOGGING_LEVEL": "WARNING"}

        def llmforge(*args: str) -> None:
            t0 = time.time()
            log(f"  $ llmforge {' '.join(args)}")
            r = subprocess.run([sys.executable, "-m", "llmforge", *args], env=env, cwd=work,
                               capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                raise RuntimeError(f"llmforge {args[0]} exited with {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            log(f"    done in {time.time() - t0:.0f}s")

        llmforge("pipeline", "--corpus", str(spec), "--preset", "tiny", "--max-steps", "20",
                 "--batch-size", "8", "--eval-every", "0", "--eval-tokens", "16384", *TINY_MODEL,
                 "--set", "eval.max_tokens=20000", "--task-runner", "thread", "--workers", "2",
                 "--shards", str(work / "shards"), "--runs", str(work / "runs"))
        data = sorted((work / "shards").glob("*/tokens-*/manifest.json"))
        if not data:
            raise RuntimeError(f"no token dataset under {work / 'shards'} after `llmforge pipeline`")
        for steps in (10, 30):
            llmforge("train", "--data", str(data[0].parent), "--preset", "tiny", *TINY_MODEL,
                     "--max-steps", str(steps), "--batch-size", "8", "--eval-every", "0", "--eval-tokens", "16384")
    finally:
        prefect.stop()
    return store


# --------------------------------------------------------------------------------------------
# What to expect: read from the server's REST API (the page is then checked against it).
# --------------------------------------------------------------------------------------------

@dataclass
class Expected:
    experiment_id: str
    kind_tag: str | None
    run_names: list[str]      # one per run, in the server's order (duplicates kept)
    metric_keys: list[str]    # every metric key logged in the experiment


def rest(url: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def expected_from_server(base: str, experiment: str) -> Expected:
    q = urllib.parse.urlencode({"experiment_name": experiment})
    exp = rest(f"{base}/api/2.0/mlflow/experiments/get-by-name?{q}")["experiment"]
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    runs, token = [], None
    while True:
        body = {"experiment_ids": [exp["experiment_id"]], "max_results": 1000, "run_view_type": "ACTIVE_ONLY",
                "order_by": ["attributes.start_time DESC"]}
        if token:
            body["page_token"] = token
        page = rest(f"{base}/api/2.0/mlflow/runs/search", body)
        runs += page.get("runs", [])
        if not (token := page.get("next_page_token")):
            break
    # the table loads the newest TABLE_PAGE runs first ("Load more" for the rest): expect those
    names = [r["info"].get("run_name", "") for r in runs[:TABLE_PAGE]]
    keys = sorted({m["key"] for r in runs for m in r["data"].get("metrics", [])})
    return Expected(exp["experiment_id"], tags.get(KIND_TAG), names, keys)


# --------------------------------------------------------------------------------------------
# The browser: Debian's chromium, headless, driven over the DevTools protocol.
# --------------------------------------------------------------------------------------------

class Browser:
    """Headless chromium with a fresh profile; a minimal CDP client on its first tab."""

    def __init__(self, binary: str, profile: Path, log: Path, size: tuple[int, int] = (1600, 1000)):
        self.binary, self.profile, self.log, self.size = binary, profile, log, size
        self.proc: subprocess.Popen | None = None
        self.ws = None
        self._ids = itertools.count(1)

    def start(self, timeout: float = 60) -> "Browser":
        from websockets.sync.client import connect

        self.profile.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--headless=new", "--disable-gpu",
                "--no-sandbox",  # chromium refuses to start as root with its sandbox on (CI runs as root)
                f"--user-data-dir={self.profile}",  # fresh: no remembered workflow type, no cookies
                "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",  # port written to the profile
                f"--window-size={self.size[0]},{self.size[1]}", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "about:blank"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.time() + timeout
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"chromium did not start (exit {self.proc.poll()}):\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=20, proxy=None)
        self.cmd("Page.enable")
        # the layout viewport itself, so screenshots are exactly size[0] x size[1]
        self.cmd("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                 deviceScaleFactor=1, mobile=False)
        return self

    def cmd(self, method: str, **params) -> dict:
        i = next(self._ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:  # skip events until our answer
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expr: str):
        r = self.cmd("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"in page: {r['exceptionDetails'].get('exception', {}).get('description', r)}")
        return r["result"].get("value")

    def goto(self, url: str) -> None:
        self.cmd("Page.navigate", url=url)

    @property
    def href(self) -> str:
        return self.js("location.href")

    def text(self, selector: str | None = None) -> str:
        sel = json.dumps(selector) if selector else "null"
        return self.js(f"(() => {{ const els = {sel} ? [...document.querySelectorAll({sel})] : [document.body];"
                       f" return els.filter(Boolean).map(e => e.innerText).join('\\n'); }})()") or ""

    def wait(self, predicate, timeout: float = 30, settle: float = 0.7) -> bool:
        """Poll until predicate(href, text) holds and the page text has stopped changing for
        ``settle`` seconds (the SPA renders in several rounds of fetches). False on timeout."""
        t0 = time.time()
        deadline, last, since = t0 + timeout, None, t0
        while time.time() < deadline:
            href, text = self.href, self.text()
            if text != last:
                last, since = text, time.time()
            if predicate(href, text) and time.time() - since >= settle:
                if VERBOSE:
                    print(f"    [{time.time() - t0:4.1f}s] {route(href)[:90]}", flush=True)
                return True
            time.sleep(0.2)
        if VERBOSE:
            print(f"    [timed out after {timeout}s] {route(self.href)[:90]}", flush=True)
        return False

    def click_at(self, x: float, y: float) -> None:
        # real mouse events: the design system's menus open on pointer events, not element.click()
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.cmd("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def click(self, selector: str, text: str | None = None, within: str | None = None) -> bool:
        """Click the centre of the first visible ``selector`` (whose own text is ``text``, if given)."""
        box = self.js(f"""(() => {{
            const root = {json.dumps(within)} ? [...document.querySelectorAll({json.dumps(within)})].pop() : document;
            if (!root) return null;
            const want = {json.dumps(text)};
            const el = [...root.querySelectorAll({json.dumps(selector)})].find(e =>
                e.getClientRects().length && (want === null || (e.innerText || e.textContent).trim() === want));
            if (!el) return null;
            el.scrollIntoView({{block: 'nearest'}});
            const b = el.getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2];
        }})()""")
        if box is None:
            return False
        self.click_at(*box)
        return True

    def type_into(self, selector: str, text: str) -> bool:
        if not self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                       f" if (!e) return false; e.focus(); e.select(); return true; }})()"):
            return False
        self.cmd("Input.insertText", text=text)  # replaces the selection, as typing does
        return True

    def key(self, key: str, code: str, keycode: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.cmd("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=keycode)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.cmd("Page.captureScreenshot", format="png")["data"]))
        return path

    def stop(self) -> None:
        from llmforge.flows.services import stop_tree

        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:
                pass
        if self.proc is not None:
            stop_tree(self.proc, timeout=10)  # chromium and the helpers it started, by PID


def find_chromium(explicit: str | None) -> str | None:
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------

@dataclass
class Check:
    name: str
    expected: str
    found: str
    ok: bool


GENAI_TABS = ("/overview", "/traces", "/chat-sessions")
LANDING = "click on experiment lands on"


def route(href: str) -> str:
    """``http://h:p/#/experiments/1/runs?x=y`` -> ``#/experiments/1/runs?x=y``."""
    return "#" + href.split("#", 1)[1] if "#" in href else href


def view_of(href: str, text: str) -> str:
    """Name what the experiment page shows, from its route and its text."""
    path = route(href).split("?")[0]
    has_table = "Run Name" in text and "matching run" in text
    if path.endswith("/runs"):
        return "runs table" if has_table else "runs tab without a table"
    if any(tab in path for tab in GENAI_TABS):
        lines = text.splitlines()
        n = next((lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln == "Traces" and lines[i + 1].isdigit()), "?")
        return f"GenAI traces {'overview' if '/overview' in path else 'list'}, {n} traces"
    return "runs table" if has_table else "unknown view"


def grid_text(b: Browser) -> str:
    return b.text(".ag-root-wrapper") or b.text("[role=grid]")


# ag-grid draws a row once per pinned/centre section: count distinct row indexes
ROWS_JS = "new Set([...document.querySelectorAll('.ag-row')].map(r => r.getAttribute('row-index'))).size"
# the [+] / [-] button in the Run Name cell of a run that has child runs (llmforge's pipeline stages)
EXPANDER = 'button[data-component-id*="runnamecellrenderer"]'


def expand_parent_runs(b: Browser, limit: int = 50) -> int:
    """Click every parent run's [+] so its child runs show, as a person would; returns how many opened."""
    opened = i = 0
    while i < min(limit, b.js(f"document.querySelectorAll({json.dumps(EXPANDER)}).length")):
        before = b.js(ROWS_JS)
        box = b.js(f"""(() => {{ const e = document.querySelectorAll({json.dumps(EXPANDER)})[{i}];
            e.scrollIntoView({{block: 'nearest'}}); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        b.click_at(*box)
        b.wait(lambda h, t: b.js(ROWS_JS) != before, timeout=5, settle=0.3)
        after = b.js(ROWS_JS)
        if after < before:  # it was open already: put it back
            b.click_at(*box)
            b.wait(lambda h, t: b.js(ROWS_JS) == before, timeout=5, settle=0.3)
        elif after > before:
            opened += 1
        i += 1
    return opened


def metric_columns(b: Browser, metrics: list[str], shots: dict[str, Path], out: Path) -> list[Check]:
    """Open the Columns picker; for each metric, search it, tick it if it is there; then look for its column."""
    checks: list[Check] = []
    if not b.click("button", "Columns"):
        return [Check(f"metric column {m}", "in the Columns picker", "no Columns button on the page", False)
                for m in metrics]
    b.wait(lambda h, t: "Metrics" in b.text("[role=dialog]"), timeout=10, settle=0.5)
    shots["04-columns"] = b.screenshot(out / "04-columns.png")
    listed: dict[str, bool] = {}
    for m in metrics:
        before = b.text("[role=dialog]")
        b.type_into('[role=dialog] input[placeholder*="Search"]', m)
        b.wait(lambda h, t: b.text("[role=dialog]") != before, timeout=3, settle=0.3)  # the tree filters as you type
        # the tree re-renders a matching leaf with the match highlighted: find it by its text
        node = b.js(f"""(() => {{
            const t = [...document.querySelectorAll('[role=dialog] .du-bois-light-tree-title')]
                .find(e => e.innerText.trim() === {json.dumps(m)});
            if (!t) return null;
            const n = t.closest('.du-bois-light-tree-treenode'), b = t.getBoundingClientRect();
            return {{checked: n.className.includes('checkbox-checked'), x: b.x + b.width / 2, y: b.y + b.height / 2}};
        }})()""")
        listed[m] = node is not None
        if node and not node["checked"]:
            b.click_at(node["x"], node["y"])
            time.sleep(0.3)
    b.type_into('[role=dialog] input[placeholder*="Search"]', "")
    b.key("Escape", "Escape", 27)  # close the picker as a person would
    b.wait(lambda h, t: not b.text("[role=dialog]"), timeout=5, settle=0.5)
    headers = [h.strip() for h in b.js("[...document.querySelectorAll('[role=columnheader]')].map(e => e.innerText)")]
    shots["05-metrics"] = b.screenshot(out / "05-metrics.png")
    for m in metrics:
        if not listed[m]:
            found = "not in the Columns picker"
        else:
            found = "ticked; column in the table" if m in headers else "ticked; no such column header"
        checks.append(Check(f"metric column {m}", "in the Columns picker, shown when ticked", found,
                            listed[m] and m in headers))
    return checks


def short(items, limit: int = 70) -> str:
    s = ", ".join(items) if not isinstance(items, str) else items
    return s if len(s) <= limit else s[: limit - 1] + "…"


def check_ui(base: str, exp: Expected, experiment: str, metrics: list[str], chromium: str, out: Path,
             tmp: Path) -> tuple[list[Check], dict[str, Path]]:
    checks: list[Check] = []
    shots: dict[str, Path] = {}
    b = Browser(chromium, tmp / "chromium-profile", tmp / "chromium.log").start()
    try:
        # (a) the experiments list, as the UI opens on it
        b.goto(f"{base}/#/experiments")
        ok = b.wait(lambda h, t: experiment in t.split("\n"), timeout=45)
        shots["01-experiments"] = b.screenshot(out / "01-experiments.png")
        checks.append(Check("experiments list shows the experiment", experiment,
                            experiment if ok else f"not listed ({route(b.href)})", ok))

        # (b) click the experiment's name: wherever the UI redirects is where a user lands
        clicked = b.click("a", experiment)
        if clicked:
            # until the redirect is done and the view is recognisable (the overview's trace count drawn)
            b.wait(lambda h, t: route(h).split("?")[0] != f"#/experiments/{exp.experiment_id}"
                   and view_of(h, t) != "unknown view" and "?" not in view_of(h, t), timeout=30, settle=1.0)
        shots["02-landing"] = b.screenshot(out / "02-landing.png")
        href, text = b.href, b.text()
        view = view_of(href, text) if clicked else "could not click the experiment"
        checks.append(Check(LANDING, "runs table", f"{view} at {short(route(href), 60)}",
                            view == "runs table"))

        # (c) the runs table, at the URL that shows it whatever this browser remembers
        b.goto(f"{base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
        names = sorted(set(exp.run_names))
        b.wait(lambda h, t: "matching run" in t, timeout=45)
        # the assistant side panel opens by itself and takes a quarter of the width: close it
        b.click('[data-component-id="mlflow.assistant.chat_panel.close"]')
        b.wait(lambda h, t: "matching run" in t, timeout=10)
        view = view_of(b.href, b.text())
        checks.append(Check("runs URL shows the runs table", "runs table", view, view == "runs table"))
        # child runs (a pipeline's stages) are folded under their parent: unfold them
        opened = expand_parent_runs(b)
        shots["03-runs"] = b.screenshot(out / "03-runs.png")
        cells = set(grid_text(b).splitlines())
        missing = [n for n in names if n not in cells]
        unfolded = f" (unfolded {opened} parent run{'s' * (opened != 1)})" if opened else ""
        checks.append(Check("every run name in the table", f"{len(exp.run_names)} runs, {len(names)} names",
                            ("all shown" if not missing else f"missing: {short(missing, 50)}") + unfolded,
                            not missing))
        dupes = sorted({n for n in exp.run_names if exp.run_names.count(n) > 1} & cells)
        checks.append(Check("run names tell runs apart", "no name shared by two runs",
                            "all distinct" if not dupes else
                            "; ".join(f"{exp.run_names.count(n)}x {n}" for n in dupes), not dupes))
        checks += metric_columns(b, metrics, shots, out)
    finally:
        b.stop()
    checks.append(Check(f"experiment tag {KIND_TAG} (store)", "custom_model_development", str(exp.kind_tag),
                        exp.kind_tag == "custom_model_development"))
    return checks, shots


def print_table(checks: list[Check]) -> None:
    rows = [("check", "expected", "found", "ok")] + [(c.name, c.expected, c.found, "ok" if c.ok else "FAIL")
                                                     for c in checks]
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for k, r in enumerate(rows):
        print("  ".join(v.ljust(w[i]) for i, v in enumerate(r)).rstrip())
        if k == 0:
            print("  ".join("-" * x for x in w))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", type=Path, metavar="DIR", help="MLflow store: DIR/mlflow.db and DIR/artifacts/")
    src.add_argument("--make-store", action="store_true",
                     help="build a store first in a temp dir (llmforge pipeline + 2x llmforge train, tiny; minutes)")
    p.add_argument("--keep", action="store_true", help="with --make-store: keep the temp dir and print its path")
    p.add_argument("--experiment", default="llmforge", help="experiment to open (default: llmforge)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated metric columns a user compares (default: {','.join(DEFAULT_METRICS)})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="screenshot folder (default: bench/out/mlflow-ui)")
    p.add_argument("--chromium", default=None, help="browser binary (default: chromium on PATH)")
    p.add_argument("-v", "--verbose", action="store_true", help="print each wait on the page and how long it took")
    args = p.parse_args(argv)
    global VERBOSE
    VERBOSE = args.verbose

    from llmforge.flows.services import MlflowServer

    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("error: no chromium found (Debian: apt-get install chromium; or pass --chromium PATH)", file=sys.stderr)
        return 2
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="mlflow-ui-check-"))
    try:
        try:
            if args.make_store:
                print(f"making a store in {tmp / 'work'} (llmforge pipeline + 2x train, tiny settings)")
                store = make_store(tmp / "work")
                print(f"store made in {time.time() - t_start:.0f}s: {store}")
            else:
                store = args.store.resolve()
                if not (store / "mlflow.db").is_file():
                    print(f"error: no {store / 'mlflow.db'}", file=sys.stderr)
                    return 2
            args.out.mkdir(parents=True, exist_ok=True)
            t_ui = time.time()
            server = MlflowServer(store, log=tmp / "mlflow-server.log").start()
        except (RuntimeError, TimeoutError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            print(f"mlflow server {server.url} (pid {server.proc.pid}) over {store}")
            try:
                exp = expected_from_server(server.url, args.experiment)
            except urllib.error.HTTPError as e:
                print(f"error: experiment {args.experiment!r} not found in {store} ({e})", file=sys.stderr)
                return 2
            metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
            checks, shots = check_ui(server.url, exp, args.experiment, metrics, chromium, args.out, tmp)
        finally:
            server.stop()
        print(f"\nMLflow UI at {server.url}, experiment {args.experiment!r} (id {exp.experiment_id})")
        print(f"  run names:  {', '.join(sorted(set(exp.run_names)))}")
        compared = [k for k in exp.metric_keys if any(w in k for w in ("loss", "bpb", "ppl", "tokens_per_s"))]
        print(f"  metrics:    {len(exp.metric_keys)} keys; of those a user compares: {', '.join(compared) or '-'}\n")
        print_table(checks)
        print("\nscreenshots:")
        for path in shots.values():
            print(f"  {path}")
        failed = [c for c in checks if not c.ok]
        if any(c.name == LANDING and not c.ok for c in checks):
            print(f"\nnote: MLflow 3.17 picks the experiment view from this browser's GenAI | Model training switch\n"
                  f"(?workflowType=, else localStorage, else genai), not from the {KIND_TAG} tag. The runs table\n"
                  f"whatever the browser remembers: <server>/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
        print(f"\n{len(checks) - len(failed)} passed, {len(failed)} failed "
              f"(UI check {time.time() - t_ui:.0f}s, total {time.time() - t_start:.0f}s)")
        return 1 if failed else 0
    finally:
        if args.make_store and args.keep:
            print(f"kept: {tmp} (store: {tmp / 'work' / 'mlruns'})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
