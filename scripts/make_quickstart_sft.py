"""Write configs/finetune/python-docs.jsonl: prompt/response pairs for the quickstart fine-tune.

Each pair asks what a standard-library module or function is for and answers with the first
paragraph of its docstring (CPython's own text). Deterministic; re-run to regenerate:

    .venv/bin/python scripts/make_quickstart_sft.py
"""

import importlib
import inspect
import json
import pkgutil
import sys
import warnings
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "python-docs.jsonl"
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "test", "ensurepip",
        "venv", "pydoc_data", "xxsubtype", "xxlimited", "_pydecimal"}


def first_paragraph(doc: str | None) -> str | None:
    if not isinstance(doc, str) or not doc:
        return None
    para = inspect.cleandoc(doc).split("\n\n")[0].strip()
    para = " ".join(para.split())
    return para if 40 <= len(para) <= 600 else None


def main() -> None:
    pairs = []
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names)
    for name in names:
        if name.startswith("_") or name in SKIP:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:
            continue
        if (doc := first_paragraph(mod.__doc__)):
            pairs.append({"prompt": f"What is the Python module `{name}` for?", "response": doc})
        for attr in sorted(getattr(mod, "__all__", []) or [])[:12]:
            obj = getattr(mod, attr, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and (doc := first_paragraph(obj.__doc__)):
                kind = "class" if inspect.isclass(obj) else "function"
                pairs.append({"prompt": f"What does the {kind} `{name}.{attr}` do?", "response": doc})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    print(f"{OUT}: {len(pairs)} pairs")


if __name__ == "__main__":
    main()
