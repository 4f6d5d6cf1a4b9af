"""How the command line feels: a first `llmforge prepare --corpus quickstart` offline (and whether
it printed any ERROR line), its re-runs, and how fast wrong usages fail.

    .venv/bin/python bench/cli_latency.py [--repeats 3]

Prints one table: what, runs, min / median / max seconds, and the check each row is held to
(re-run of a finished prepare under 3 s, wrong usage under 5 s, no ERROR line).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLMFORGE = [sys.executable, "-m", "llmforge"]


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(LLMFORGE + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    return time.perf_counter() - t0, r


def row(what: str, secs: list[float], target: str, ok: bool) -> str:
    lo, med, hi = min(secs), statistics.median(secs), max(secs)
    return f"| {what} | {len(secs)} | {lo:.2f} / {med:.2f} / {hi:.2f} | {target} | {'ok' if ok else 'FAIL'} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="llmforge-cli-") as tmp:
        work = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
        env["PREFECT_HOME"] = str(work / "prefect-home")  # a user's first run: no Prefect server, no profile
        first, r = timed(["prepare", "--corpus", "quickstart"], work, env)
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-3000:])
            return 1
        errors = [ln for ln in (r.stdout + r.stderr).splitlines() if "ERROR" in ln]
        reruns = [timed(["prepare", "--corpus", "quickstart"], work, env)[0] for _ in range(args.repeats)]
        wrong = []
        for bad in (["prepare", "--corpus", "quickstrat"], ["train", "--data", "nowhere"],
                    ["generate", "nowhere.pt", "--temperature", "-1"]):
            secs, r = timed(bad, work, env)
            wrong.append(secs)
            assert r.returncode == 2, r.stderr
        print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}\n")
        print("| what | runs | min / median / max s | target | |")
        print("|---|---:|---|---|---|")
        print(row("first `prepare --corpus quickstart` (offline, temporary Prefect server)", [first],
                  "no ERROR line", not errors))
        print(row("re-run of the finished prepare", reruns, "< 3 s", max(reruns) < 3))
        print(row("wrong usage (corpus, data dir, sampling option)", wrong, "< 5 s, exit 2", max(wrong) < 5))
        for ln in errors[:5]:
            print("ERROR line:", ln)
    return 0


if __name__ == "__main__":
    sys.exit(main())
