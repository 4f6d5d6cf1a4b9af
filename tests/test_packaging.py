"""The package as users get it: one top-level `llmforge` in site-packages with its presets and specs
as package data, runnable from any directory; files written with the user's umask; MLflow behind
one module."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("llmforge", "pipeline", "model", "flows")


def test_only_the_tracking_package_imports_mlflow():
    importers = []
    for d in SOURCE_DIRS:
        for path in sorted((REPO / d).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                    importers.append(str(path.relative_to(REPO)))
    assert importers and all(p.startswith("llmforge/tracking/") for p in importers), sorted(set(importers))


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_output_files_follow_the_umask(tmp_path, umask, mode):
    script = tmp_path / "write.py"
    script.write_text(f"import os\nos.umask({umask:#o})\n"
                      "from llmforge.pipeline.fsutil import atomic_dir, atomic_write_text\n"
                      f"atomic_write_text({str(tmp_path / 'f.txt')!r}, 'x')\n"
                      f"with atomic_dir({str(tmp_path / 'd')!r}):\n    pass\n")
    subprocess.run([sys.executable, str(script)], check=True)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "d").stat().st_mode & 0o777 == mode | (mode & 0o444) >> 2  # dirs: x where r


@pytest.mark.slow
def test_wheel_installs_one_package_and_runs_prepare_and_train_outside_the_repo(tmp_path, prefect_server):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("llmforge-*.whl")
    import zipfile

    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"llmforge"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "llmforge/configs/model/tiny.yaml" in names and "llmforge/configs/corpus/quickstart.yaml" in names
    assert any(n.startswith("llmforge/configs/train/") for n in names)

    # a fresh venv: llmforge comes from the wheel alone; its dependencies are this venv's
    # (installing torch, prefect and mlflow again would only re-download the same files)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # adds the path; its .pth files (our
    # editable install among them) are not processed, so the repo is not importable through it
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=300)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "LLMFORGE_"))}
    # the session's Prefect server (a temporary one per command is tested in test_train; each costs ~20 s here)
    env.update(prefect_server.env, OMP_NUM_THREADS="1")

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        r = subprocess.run([str(env_dir / "bin" / "llmforge"), *args], cwd=work, env=env, capture_output=True,
                           text=True, timeout=timeout)
        assert r.returncode == 0, f"llmforge {args[0]}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    where = subprocess.run([str(py), "-c", "import llmforge; print(llmforge.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(site)), where
    for shadowable in ("model", "pipeline", "flows"):
        r = subprocess.run([str(py), "-c", f"import {shadowable}"], cwd=work, env=env, capture_output=True, text=True)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, (shadowable, r.stderr)

    prep = run("prepare", "--corpus", "quickstart", "--workers", "2")
    assert "ERROR" not in prep.stdout + prep.stderr
    (data,) = (work / "shards" / "quickstart").glob("tokens-*")
    train = run("train", "--data", str(data), "--preset", "tiny", "--max-steps", "20", "--batch-size", "4",
                "--block-size", "64", "--eval-every", "0", "--eval-tokens", "4096", "--log-every", "10")
    assert "completed at step 20 (budget 20 steps" in train.stdout
    assert list((work / "runs").glob("train-tiny-*/ckpt-00000020.pt"))
