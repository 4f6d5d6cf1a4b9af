"""Scale rehearsal: `llmforge prepare` on an OpenWebText-shaped corpus of growing size.

    .venv/bin/python bench/scale_rehearsal.py                          # 0.5, 1 and 2 GB of text
    .venv/bin/python bench/scale_rehearsal.py --sizes 0.05,0.1,0.2     # a quick proof, ~10 min on 2 cores

The corpus (built once per size, cached under --out): the books of ../shared/corpus/gutenberg
(~250 MB of text) cut at paragraph ends into web-page-sized documents (lengths log-normal around
5 KB, OpenWebText's mean), written in the HF mirror's layout of OpenWebText: tars of `.xz`
sub-archives of ~400 `.txt` documents each (`urlsf_subsetNN.tar`, one parallel unit each, --tar-mb
of text per tar). Larger sizes repeat the books; copy r > 0 of a page is perturbed so that exact and
near-duplicate detection must not remove it: a quarter of its words (chosen by a seeded RNG per
copy and page) are rotated among themselves, which keeps the page's bag of words (so the quality
filters see the same statistics) and changes nearly every 5-word shingle (Jaccard ~0.1, far below
the 0.8 near-dup threshold). Planted on purpose, 1% of pages each, placed a few hundred documents
after their original: exact duplicates, near-duplicates (3 words replaced by other words of the
page) and junk (binary bytes, a line repeated, a short link list, markup).

Each size is prepared with the openwebtext spec's cleaning (profile web) and near-dup removal on,
2 worker processes (--workers), a Prefect server started once for the rehearsal, and the tokenizer
trained once beforehand (a warm-up run on the smallest corpus; its time is reported as the fixed
cost it is) so every measured run does the same work per byte. While a run goes, the process tree
is sampled (psutil) for each process's peak RSS, and the output directory for its peak size.

Printed: per size, the wall time, MB/s, per-stage seconds, peak RSS (the flow process, the
largest worker) and peak/final disk, with ratios to the smallest size; whether cost grows
linearly (the largest run's time ratio within [1.0, 1.15] x its size ratio: 4.0-4.6x for 0.5 ->
2 GB) and RSS stays flat (within 15%); the precision and recall of near-duplicate removal on the
planted near-duplicates, with its cost (MinHash signing in the clean workers, docs/s per worker;
the band passes in the flow process, seconds, candidate pairs and capped buckets); an extrapolation to OpenWebText (40 GB of text, 8.0M documents) on 2 and
16 cores, its disk and the flow process's memory; and whether the smallest corpus on a local Dask
cluster of two worker processes gives byte-identical shards. Results also go to --out/results.json.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml
import zstandard

REPO = Path(__file__).resolve().parents[1]
LLMFORGE = str(Path(sys.executable).parent / "llmforge")
OWT_TEXT_BYTES = 40e9  # configs/corpus/openwebtext.yaml: ~40 GB of text
OWT_DOCS = 8_013_769
OWT_DOWNLOAD = 12_880_027_468
OWT_HF_UNITS = 21  # the HF mirror's subset tars; the Skylion tar.xz is a single unit
DOCS_PER_SUB = 400
PLANT = 0.01  # share of pages with a planted exact duplicate, near duplicate and junk document each


# ---------------------------------------------------------------------------------------------
# the corpus


def load_pages(corpus: Path, seed: int) -> list[str]:
    """Every book of the shared corpus cut at paragraph ends into pages of web-page size."""
    rng = np.random.default_rng(seed)
    pages: list[str] = []
    for shard in sorted(corpus.glob("*.jsonl.zst")):
        with zstandard.open(shard, "rt", encoding="utf-8") as f:
            for line in f:
                book = json.loads(line)["text"].replace("\r\n", "\n")  # web pages have LF line ends
                pos = 0
                while pos < len(book):
                    want = int(np.clip(rng.lognormal(np.log(4000), 0.7), 400, 60_000))
                    end = book.find("\n\n", pos + want)
                    end = len(book) if end < 0 else end + 2
                    page = book[pos:end].strip()
                    pos = end
                    if len(page) >= 200:
                        pages.append(page)
    return pages


def distinct_pages(pages: list[str], cache: Path) -> list[str]:
    """The pages with natural exact and near duplicates removed (the same book in two editions,
    repeated front matter), found by the pipeline's own MinHash pass, so that every later
    near-duplicate flag is either a planted copy or a false positive. Cached by content hash."""
    from llmforge.pipeline.neardup import NearDupConfig, find_near_duplicates

    digest = hashlib.sha256("\x00".join(pages).encode()).hexdigest()[:16]
    path = cache / f"distinct-pages-{digest}.json"
    if path.is_file():
        keep = json.loads(path.read_text())
    else:
        seen: set[bytes] = set()
        exact = set()
        for i, page in enumerate(pages):
            h = hashlib.blake2b(page.encode(), digest_size=16).digest()
            if h in seen:
                exact.add(i)
            seen.add(h)
        near = find_near_duplicates(((i, p) for i, p in enumerate(pages) if i not in exact), NearDupConfig(enabled=True))
        keep = [i for i in range(len(pages)) if i not in exact and i not in near]
        cache.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(keep))
    return [pages[i] for i in keep]


def rotate_words(page: str, rng: np.random.Generator, share: float = 0.25) -> str:
    words = page.split(" ")
    idx = np.flatnonzero(rng.random(len(words)) < share)
    if len(idx) < 2:
        return page
    arr = np.array(words, dtype=object)
    arr[idx] = arr[np.roll(idx, 1)]
    return " ".join(arr.tolist())


def near_copy(page: str, rng: np.random.Generator) -> str:
    words = page.split(" ")
    for _ in range(3):
        i, j = rng.integers(len(words), size=2)
        if words[j] != words[i]:
            words[i] = words[j]
        else:
            words[i] = words[i] + "s"
    return " ".join(words)


def junk(rng: np.random.Generator) -> str | bytes:
    kind = int(rng.integers(4))
    if kind == 0:
        return rng.integers(0, 256, size=3000, dtype=np.uint8).tobytes()
    if kind == 1:
        return "Subscribe to our newsletter for more updates!\n" * 150
    if kind == 2:
        return "\n".join(f"Click here: http://example.com/{int(x)}" for x in rng.integers(10**6, size=12))
    return "<div class='nav'><a href='/'>Home</a> | <a href='/about'>About</a></div>\n" * 60


def doc_name(i: int, data: bytes) -> str:
    return f"{i:07d}-{hashlib.sha1(data).hexdigest()[:30]}.txt"


def build_corpus(pages: list[str], size_gb: float, out: Path, seed: int, tar_mb: float) -> dict:
    """Write the corpus for ``size_gb`` GB of text into ``out`` (cached: reused when its
    meta.json says it was built with the same settings); returns the meta."""
    params = {"size_gb": size_gb, "seed": seed, "tar_mb": tar_mb, "pages": len(pages), "version": 3}
    meta_path = out / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("params") == params:
        return json.loads(meta_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.tar"):
        old.unlink()
    target = int(size_gb * 1e9)
    rng = np.random.default_rng([seed, 1])
    pending: list[tuple[int, str, str | bytes, str | None]] = []  # (due index, kind, data, original)
    planted: dict[str, list] = {"exact": [], "near": [], "junk": []}
    total = docs = copies = 0
    tar_i = 0
    sub: list[tuple[str, bytes]] = []
    subs: list[tuple[str, bytes]] = []
    tar_text = 0

    def flush_sub() -> None:
        nonlocal sub
        if sub:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:xz", preset=0) as tf:
                for name, data in sub:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 1_560_000_000, 0o644
                    tf.addfile(info, io.BytesIO(data))
            subs.append((f"openwebtext/urlsf_subset{tar_i:02d}-{len(subs) + 1}_data.xz", buf.getvalue()))
            sub = []

    def flush_tar() -> None:
        nonlocal subs, tar_i, tar_text
        flush_sub()
        if subs:
            with tarfile.open(out / f"urlsf_subset{tar_i:02d}.tar", "w") as tf:
                for name, data in subs:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 1_560_000_000, 0o644
                    tf.addfile(info, io.BytesIO(data))
            tar_i += 1
            subs, tar_text = [], 0

    def emit(data: str | bytes) -> str:
        nonlocal total, docs, tar_text
        raw = data.encode("utf-8") if isinstance(data, str) else data
        name = doc_name(docs, raw)
        sub.append((name, raw))
        docs += 1
        total += len(raw)
        tar_text += len(raw)
        if len(sub) >= DOCS_PER_SUB:
            flush_sub()
        if tar_text >= tar_mb * 1e6:
            flush_tar()
        return name

    while total < target:
        for k, page in enumerate(pages):
            if total >= target:
                break
            text = page if copies == 0 else rotate_words(page, np.random.default_rng([seed, copies, k]))
            name = emit(text)
            u = rng.random(3)
            delay = docs + int(rng.integers(50, 500))
            if u[0] < PLANT:
                pending.append((delay, "exact", text, name))
            if u[1] < PLANT:
                pending.append((delay + 1, "near", near_copy(text, rng), name))
            if u[2] < PLANT:
                pending.append((delay + 2, "junk", junk(rng), None))
            while pending and pending[0][0] <= docs:
                pending.sort(key=lambda p: p[0])
                _, kind, data, orig = pending.pop(0)
                copy_name = emit(data)
                planted[kind].append([orig, copy_name] if orig else copy_name)
        copies += 1
    for _, kind, data, orig in sorted(pending, key=lambda p: p[0]):
        copy_name = emit(data)
        planted[kind].append([orig, copy_name] if orig else copy_name)
    flush_tar()
    meta = {"params": params, "text_bytes": total, "documents": docs, "copies": copies, "tars": tar_i,
            "file_bytes": sum(p.stat().st_size for p in out.glob("*.tar")), "planted": planted}
    meta_path.write_text(json.dumps(meta))
    return meta


# ---------------------------------------------------------------------------------------------
# running and watching `llmforge prepare`


def role(proc: psutil.Process, root_pid: int) -> str:
    if proc.pid == root_pid:
        return "flow"
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "other"
    if "distributed.cli.dask" in cmd or "dask" in cmd and "worker" in cmd:
        return "dask-worker"
    if "multiprocessing" in cmd or "spawn_main" in cmd or "forkserver" in cmd:
        return "worker"
    return "other"


def disk_usage(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def run_watched(cmd: list[str], env: dict, out: Path, interval: float = 0.25) -> dict:
    """Run ``cmd``; sample the RSS of every process in its tree and the size of ``out``."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()
    root = psutil.Process(p.pid)
    peak: dict[int, tuple[str, int]] = {}
    peak_total = peak_disk = 0
    last_disk = 0.0
    while p.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            procs = []
        total = 0
        for proc in procs:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            if rss > peak.get(proc.pid, ("", 0))[1]:
                peak[proc.pid] = (role(proc, p.pid), rss)
        peak_total = max(peak_total, total)
        if time.perf_counter() - last_disk > 1.0:
            peak_disk = max(peak_disk, disk_usage(out))
            last_disk = time.perf_counter()
        time.sleep(interval)
    reader.join(10)
    wall = time.perf_counter() - t0
    by_role: dict[str, int] = collections.defaultdict(int)
    for r, rss in peak.values():
        by_role[r] = max(by_role[r], rss)
    return {"rc": p.returncode, "wall": wall, "output": "".join(lines), "rss": dict(by_role),
            "rss_total": peak_total, "disk_peak": max(peak_disk, disk_usage(out)), "disk_final": disk_usage(out)}


def stage_seconds(output: str) -> dict[str, float]:
    """Seconds per stage from the summary table prepare prints."""
    out = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in ("download", "extract+clean", "train_tokenizer", "tokenize"):
            try:
                out[cells[0]] = float(cells[4])
            except ValueError:
                pass
    return out


def write_spec(path: Path, name: str, corpus: Path, part_mb: float, vocab: int, sample_mb: float) -> Path:
    spec = {"name": name, "description": "OpenWebText-shaped rehearsal corpus (bench/scale_rehearsal.py)",
            "sources": [{"url": str(corpus), "format": "dir", "include": ["*.tar"]}],
            "clean": {"profile": "web"}, "neardup": {"enabled": True},
            "split": {"val_fraction": 0.0005, "part_bytes": int(part_mb * 1e6)},
            "tokenizer": {"vocab_size": vocab, "sample_bytes": int(sample_mb * 1e6)}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def prepare(spec: Path, out: Path, env: dict, workers: int, *extra: str) -> dict:
    cmd = [LLMFORGE, "prepare", "--corpus", str(spec), "--out", str(out), "--no-progress", "--workers",
           str(workers), *extra]
    r = run_watched(cmd, env, out)
    if r["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r['rc']}):\n{r['output'][-4000:]}")
    r["stages"] = stage_seconds(r["output"])
    r["clean_dir"] = next(out.glob("*/clean-*"))
    r["tokens_dir"] = next(out.glob("*/tokens-*"))
    r["clean"] = json.loads((r["clean_dir"] / "manifest.json").read_text())
    r["tokens"] = json.loads((r["tokens_dir"] / "manifest.json").read_text())
    return r


def kept_names(clean_dir: Path, manifest: dict) -> set[str]:
    import pyarrow.parquet as pq

    names = set()
    for split, info in manifest["splits"].items():
        for part in info["parts"]:
            for i in pq.read_table(clean_dir / split / part["file"], columns=["id"]).column("id").to_pylist():
                names.add(i.rsplit("/", 1)[-1])
    return names


def neardup_quality(run: dict, meta: dict) -> dict:
    kept = kept_names(run["clean_dir"], run["clean"])
    pairs = [(o, c) for o, c in meta["planted"]["near"] if o in kept]
    caught = sum(c not in kept for _, c in pairs)
    counts = run["clean"]["stats"]["counts"]
    dropped = int(counts.get("dropped.near_duplicate", 0))
    signed = [json.loads(p.read_text()).get("minhash") for p in run["clean_dir"].glob("units/unit-*.json")]
    signed = [m for m in signed if m]
    return {"sign_docs": sum(m["documents"] for m in signed), "sign_s": sum(m["seconds"] for m in signed),
            "pass_s": run["clean"]["stats"].get("neardup_seconds", float("nan")),
            "candidate_pairs": int(counts.get("neardup.candidate_pairs", 0)),
            "capped_buckets": int(counts.get("neardup.capped_buckets", 0)),"planted": len(meta["planted"]["near"]), "scored": len(pairs), "caught": caught,
            "recall": caught / len(pairs) if pairs else float("nan"),
            "flagged": dropped, "precision": caught / dropped if dropped else float("nan"),
            "exact_planted": len(meta["planted"]["exact"]), "exact_dropped": int(counts.get("dropped.duplicate", 0)),
            "junk_planted": len(meta["planted"]["junk"]),
            "junk_dropped": sum(j not in kept for j in meta["planted"]["junk"])}


def shard_digests(tokens_dir: Path) -> dict[str, str]:
    files = sorted(tokens_dir.glob("*/shard-*.arrow")) + [tokens_dir / "manifest.json"]
    return {str(p.relative_to(tokens_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---------------------------------------------------------------------------------------------
# the report


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def span(xs: list[float]) -> str:
    return f"{min(xs):.1f} / {statistics.median(xs):.1f} / {max(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def extrapolate(run: dict, workers: int, tok_secs: float, tok_sample: float, rss_per_doc: float) -> dict:
    """OpenWebText on 2 and 16 cores from the largest run's measured rates."""
    text = run["clean"]["stats"].get("read", {}).get("bytes") or run["text_bytes"]
    fin = run["clean"]["stats"]["finalize_seconds"]
    clean_wall = run["stages"]["extract+clean"]
    unit_rate = text / max((clean_wall - fin) * workers, 1e-9)  # bytes per core-second, parallel part
    fin_rate = text / max(fin, 1e-9)  # the serial dedup/near-dup/repack pass
    kept = run["clean"]["splits"]["train"]["text_bytes"] + run["clean"]["splits"]["val"]["text_bytes"]
    tok_rate = kept / max(run["stages"]["tokenize"] * workers, 1e-9)
    scale = OWT_TEXT_BYTES / text
    parts = run["clean"]["disk_bytes"] * scale
    units_peak = (run["clean"]["disk_bytes_peak"] - run["clean"]["disk_bytes"]) * scale
    tokens = run["tokens"]["disk_bytes"] * scale
    tokenizer = tok_secs * 200e6 / max(tok_sample, 1)  # the openwebtext spec samples 200 MB
    out = {"tokenizer_s": tokenizer, "disk_peak": max(OWT_DOWNLOAD + units_peak + parts, OWT_DOWNLOAD + parts + tokens),
           "disk_final": OWT_DOWNLOAD + parts + tokens, "parts": parts, "tokens": tokens,
           "flow_rss": rss_per_doc * OWT_DOCS}
    for cores in (2, 16):
        clean = OWT_TEXT_BYTES / (unit_rate * min(cores, OWT_HF_UNITS)) + OWT_TEXT_BYTES / fin_rate
        tok = OWT_TEXT_BYTES * kept / text / (tok_rate * cores)
        out[cores] = {"clean_s": clean, "finalize_s": OWT_TEXT_BYTES / fin_rate, "tokenize_s": tok,
                      "total_s": clean + tok + tokenizer}
    return out


def linear_fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x`` through ``points``: (a, b, the largest |residual| / y)."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    a = my - b * mx
    return a, b, max(abs(y - (a + b * x)) / y for x, y in points)


def hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5,1,2", help="GB of text per corpus, comma-separated (default 0.5,1,2)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes per prepare (default 2)")
    ap.add_argument("--repeats", type=int, default=1, help="prepare runs per size (min/median/max; default 1)")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "scale"), help="working directory")
    ap.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus" / "gutenberg"))
    ap.add_argument("--tar-mb", type=float, default=64, help="MB of text per subset tar (one unit each)")
    ap.add_argument("--part-mb", type=float, default=32, help="MB of text per cleaned part (= per shard)")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--tokenizer-sample-mb", type=float, default=200)
    ap.add_argument("--base-mb", type=float, default=None,
                    help="use only the first MB of distinct pages (default: all ~250 MB), so that small sizes "
                         "already repeat them (perturbed)")
    ap.add_argument("--no-dask", action="store_true", help="skip the Dask byte-identity check")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = sorted(float(s) for s in args.sizes.split(","))
    work = Path(args.out).resolve()
    corpus = Path(args.corpus)
    if not corpus.is_dir():
        print(f"{corpus}: the shared corpus is not here", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from llmforge.flows.services import PrefectServer

    print(f"building corpora {sizes} GB from {corpus} ...", flush=True)
    t0 = time.perf_counter()
    pages = load_pages(corpus, args.seed)
    n_pages = len(pages)
    pages = distinct_pages(pages, work)
    print(f"  {n_pages:,} pages cut from the books, {n_pages - len(pages):,} of them natural (near-)duplicates "
          f"left out", flush=True)
    if args.base_mb is not None:
        sizes_cum = np.cumsum([len(p.encode()) for p in pages])
        pages = pages[: max(1, int(np.searchsorted(sizes_cum, args.base_mb * 1e6)))]
    metas = {s: build_corpus(pages, s, work / f"corpus-{s:g}gb", args.seed, args.tar_mb) for s in sizes}
    build_corpus(pages, 0.001, work / "corpus-overhead", args.seed, args.tar_mb)
    del pages
    print(f"  done in {time.perf_counter() - t0:.0f}s: " + ", ".join(
        f"{s:g} GB = {m['documents']:,} docs, {m['copies']} cop{'y' if m['copies'] == 1 else 'ies'} of the books, "
        f"{m['tars']} tars ({mb(m['file_bytes'])})" for s, m in metas.items()), flush=True)

    server = PrefectServer(work / "prefect-home").start()
    env = {**os.environ, **server.env, "LLMFORGE_MLRUNS": str(work / "mlruns"), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    results: dict = {"sizes": {}, "workers": args.workers, "cpu_count": os.cpu_count()}
    try:
        # warm-up on the smallest corpus, which also trains the tokenizer every measured run reuses
        small = sizes[0]
        spec = write_spec(work / f"spec-{small:g}.yaml", f"owt-{small:g}gb", work / f"corpus-{small:g}gb",
                          args.part_mb, args.vocab_size, args.tokenizer_sample_mb)
        warm_out = work / "warmup"
        if warm_out.exists():
            subprocess.run(["rm", "-rf", str(warm_out)], check=True)
        print("warm-up run (trains the tokenizer) ...", flush=True)
        warm = prepare(spec, warm_out, env, args.workers)
        tok_model = next(warm_out.glob("*/tokenizer-*/tokenizer.model"))
        tok_manifest = json.loads((tok_model.parent / "manifest.json").read_text())
        tok_sample = tok_manifest.get("stats", {}).get("sample_bytes", 0)
        tok_secs = warm["stages"].get("train_tokenizer", float("nan"))
        results["tokenizer"] = {"seconds": tok_secs, "sample_bytes": tok_sample, "rss": warm["rss"].get("flow")}

        # what every prepare costs whatever its size (processes, imports, flow runs): a 1 MB corpus
        spec = write_spec(work / "spec-overhead.yaml", "owt-overhead", work / "corpus-overhead", args.part_mb,
                          args.vocab_size, args.tokenizer_sample_mb)
        walls = []
        for _ in range(2):
            if (work / "overhead").exists():
                subprocess.run(["rm", "-rf", str(work / "overhead")], check=True)
            walls.append(prepare(spec, work / "overhead", env, args.workers, "--tokenizer", str(tok_model))["wall"])
        results["overhead_s"] = overhead = min(walls)
        print(f"fixed cost of a prepare (1 MB corpus): {overhead:.1f}s", flush=True)

        for s in sizes:
            spec = write_spec(work / f"spec-{s:g}.yaml", f"owt-{s:g}gb", work / f"corpus-{s:g}gb", args.part_mb,
                              args.vocab_size, args.tokenizer_sample_mb)
            runs = []
            for rep in range(args.repeats):
                out = work / f"run-{s:g}gb"
                if out.exists():
                    subprocess.run(["rm", "-rf", str(out)], check=True)
                print(f"prepare {s:g} GB (run {rep + 1}/{args.repeats}) ...", flush=True)
                r = prepare(spec, out, env, args.workers, "--tokenizer", str(tok_model))
                r["text_bytes"] = metas[s]["text_bytes"]
                runs.append(r)
                print(f"  {r['wall']:.0f}s, {metas[s]['text_bytes'] / r['wall'] / 1e6:.1f} MB/s, peak RSS flow "
                      f"{mb(r['rss'].get('flow', 0))}, worker {mb(r['rss'].get('worker', 0))}, "
                      f"peak disk {mb(r['disk_peak'])}", flush=True)
            best = min(runs, key=lambda r: r["wall"])
            best["walls"] = [r["wall"] for r in runs]
            best["neardup"] = neardup_quality(best, metas[s])
            results["sizes"][s] = best

        if not args.no_dask:
            s = sizes[0]
            out = work / f"dask-{s:g}gb"
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            print(f"prepare {s:g} GB on a local Dask cluster of {args.workers} worker processes ...", flush=True)
            d = prepare(work / f"spec-{s:g}.yaml", out, env, args.workers, "--tokenizer", str(tok_model),
                        "--task-runner", "dask")
            a, b = shard_digests(results["sizes"][s]["tokens_dir"]), shard_digests(d["tokens_dir"])
            results["dask"] = {"size": s, "identical": a == b, "files": len(a), "wall": d["wall"]}
    finally:
        server.stop()

    # --- tables ------------------------------------------------------------------------------------
    base_s = sizes[0]
    base = results["sizes"][base_s]
    print(f"\nprepare on an OpenWebText-shaped corpus, {args.workers} workers, {os.cpu_count()} cores "
          f"(wall s: min / median / max of {args.repeats})\n")
    print("| text | docs | wall s | MB/s | clean s | tokenize s | flow RSS | worker RSS | peak disk | final disk |"
          " time ratio | size ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, r in results["sizes"].items():
        st = r["stages"]
        print(f"| {s:g} GB | {metas[s]['documents']:,} | {span(r['walls'])} | {r['text_bytes'] / r['wall'] / 1e6:.1f} | "
              f"{st.get('extract+clean', 0):.0f} | {st.get('tokenize', 0):.0f} | {mb(r['rss'].get('flow', 0))} | "
              f"{mb(r['rss'].get('worker', 0))} | {mb(r['disk_peak'])} | {mb(r['disk_final'])} | "
              f"{r['wall'] / base['wall']:.2f}x | {r['text_bytes'] / base['text_bytes']:.2f}x |")
    top_s = sizes[-1]
    top = results["sizes"][top_s]
    size_ratio = top["text_bytes"] / base["text_bytes"]
    time_ratio = top["wall"] / base["wall"]
    net_ratio = (top["wall"] - overhead) / max(base["wall"] - overhead, 1e-9)
    linear = net_ratio / size_ratio <= 1.15
    rss_ratio = {k: top["rss"].get(k, 0) / max(base["rss"].get(k, 1), 1) for k in ("flow", "worker")}
    print(f"\ncost: {time_ratio:.2f}x for {size_ratio:.2f}x the text; net of the fixed {overhead:.0f}s of a prepare "
          f"{net_ratio:.2f}x ({net_ratio / size_ratio:.2f} per unit of size; linear: at most 1.15, i.e. "
          f"{size_ratio:.1f}-{1.15 * size_ratio:.1f}x): {'LINEAR' if linear else 'NOT LINEAR'}")
    if len(sizes) >= 3:  # the per-run cost is more than a 1 MB prepare's: each stage ends on one busy core
        a, b, worst = linear_fit([(results["sizes"][s]["text_bytes"] / 1e9, results["sizes"][s]["wall"]) for s in sizes])
        print(f"fit over the {len(sizes)} sizes: wall = {a:.0f} s + {b:.0f} s per GB of text, every size within "
              f"{100 * worst:.1f}% of it ({'linear' if worst <= 0.05 else 'NOT a line'}: a per-run cost of {a:.0f} s "
              f"and a constant cost per byte)")
    for k, v in rss_ratio.items():
        print(f"peak RSS, {k} process: {v:.2f}x from {base_s:g} to {top_s:g} GB: "
              f"{'flat (within 15%)' if abs(v - 1) <= 0.15 else 'NOT FLAT'}")
    docs_delta = metas[top_s]["documents"] - metas[base_s]["documents"]
    rss_per_doc = max(top["rss"].get("flow", 0) - base["rss"].get("flow", 0), 0) / max(docs_delta, 1)
    print(f"  (the flow process runs the near-duplicate pass; its peak RSS grows by "
          f"{rss_per_doc / 1e3:.2f} KB per document)")

    print("\nnear-duplicate removal on the planted near-duplicates (3 words changed):\n")
    print("| text | planted | caught | recall | flagged in all | precision | exact dups planted / dropped "
          "| junk planted / dropped | signing docs/s per worker | band passes s | candidate pairs | capped buckets |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, r in results["sizes"].items():
        q = r["neardup"]
        sign = f"{q['sign_docs'] / q['sign_s']:,.0f}" if q.get("sign_s") else "-"  # (before signing moved to workers)
        print(f"| {s:g} GB | {q['scored']} | {q['caught']} | {q['recall']:.3f} | {q['flagged']} | {q['precision']:.3f} | "
              f"{q['exact_planted']} / {q['exact_dropped']} | {q['junk_planted']} / {q['junk_dropped']} | {sign} | "
              f"{q['pass_s']:.1f} | {q['candidate_pairs']:,} | {q['capped_buckets']} |")

    ext = extrapolate(top, args.workers, results["tokenizer"]["seconds"], results["tokenizer"]["sample_bytes"],
                      rss_per_doc)
    results["openwebtext"] = ext
    print(f"\nOpenWebText extrapolated from the {top_s:g} GB run (40 GB of text, 8.0M documents, HF mirror "
          f"layout: {OWT_HF_UNITS} parallel units; the single Skylion tar.xz is one unit, so its clean "
          f"stage runs on one core):\n")
    print("| cores | extract+clean | of which serial dedup/near-dup/repack | train_tokenizer (200 MB) | tokenize | total |")
    print("|---:|---:|---:|---:|---:|---:|")
    for cores in (2, 16):
        e = ext[cores]
        print(f"| {cores} | {hours(e['clean_s'])} | {hours(e['finalize_s'])} | {hours(ext['tokenizer_s'])} | "
              f"{hours(e['tokenize_s'])} | {hours(e['total_s'])} |")
    print(f"\ndisk: download {mb(OWT_DOWNLOAD)} + cleaned parts {mb(ext['parts'])} + token shards "
          f"{mb(ext['tokens'])} = {mb(ext['disk_final'])} at the end; peak {mb(ext['disk_peak'])} "
          f"({'fits' if ext['disk_peak'] < 64 * 2**30 * 0.95 else 'does NOT fit'} a 64 GiB disk)")
    print(f"memory: the flow process's peak RSS grows by ~{mb(ext['flow_rss'])} for 8.0M documents (linear "
          f"extrapolation of its growth from {base_s:g} to {top_s:g} GB)")
    if "dask" in results:
        dk = results["dask"]
        print(f"\nDask (local cluster, {args.workers} worker processes) on {dk['size']:g} GB: "
              f"{'byte-identical' if dk['identical'] else 'DIFFERENT'} shards and manifest ({dk['files']} files), "
              f"{dk['wall']:.0f}s")
    for r in results["sizes"].values():
        for k in ("output", "clean_dir", "tokens_dir", "clean", "tokens"):
            r.pop(k, None)
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults: {work / 'results.json'}")
    return 0 if linear and (not results.get("dask") or results["dask"]["identical"]) else 1


if __name__ == "__main__":
    sys.exit(main())
