"""llama.cpp runs our GGUF exports and agrees with llmforge: a check too slow to build for CI.

    python bench/llamacpp_check.py                  # builds llama-cpp-python once into the cache
    python bench/llamacpp_check.py --cache DIR --repeats 3

llama.cpp comes from PyPI as ``llama-cpp-python``, which compiles llama.cpp from its sdist: about
9 minutes on 2 cores, so it is installed once (``pip install --target``) into ``--cache``
(default ``~/.cache/llmforge/llama-cpp-python-<version>``) and reused; an already importable
``llama_cpp`` is used as it is. Nothing else is downloaded.

Two random models with sharpened weights (so greedy choices are not near-ties) and a real
SentencePiece tokenizer trained on Python standard-library sources are saved as checkpoints
and exported to GGUF as f32, f16, bf16 and q8_0. Each file is compared with two llmforge
models: ``file``, the same weights rounded as the file stores them (through the gguf package's
own quantizer) and matrix inputs rounded as llama.cpp's dot products take them (``as_stored``),
which llama.cpp should reproduce up to rounding, and ``fp32``, the original. Columns:

- greedy: of 5 prompts (``[EOS] + encode(prompt)``, as llmforge prompts), how many give the
  same 32 greedy tokens as llmforge's ``generate``;
- tie: where a continuation parts from ``file``'s, our model's lead of its token over llama.cpp's
  there, relative to the largest logit (the widest such lead; ``-`` when all 5 agree);
- top-1: the share of ~500 positions of held-out text where llama.cpp's most likely next token
  is llmforge's;
- max|dlogit|: the largest logit difference from ``file`` there, relative to the largest logit;
- tokenize: strings (hard cases and source files) where ``llm.tokenize`` gives llmforge's ids;
- tok/s: llama.cpp's greedy generation speed through the Python binding, and its ratio to
  llmforge's KV-cached ``generate`` on the same cores in the same run (min/median/max).

llama.cpp's KV cache is kept in f32 (``type_k=type_v=0``): its default f16 cache alone moves
logits by ~1e-3. Exit status 1 when an f32 file and its ``file`` model disagree on a greedy
continuation, when an f16 file's continuation parts from ``file``'s other than at a near-tie
(``tie`` above ``F16_TIE``: llama.cpp rounds activations to f16 for f16 weights, so exact
agreement is not to be had there), or when a string other than the known case (text holding a
literal U+2581) is tokenized differently.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmforge.model.checkpoint import capture_rng_state, save_checkpoint
from llmforge.model.export import ExportConfig, ExportStage, pack_gguf_tensor
from llmforge.model.generate import generate
from llmforge.model.gpt import GPT, GPTConfig
from llmforge.pipeline.tokenizer import META_SPACE, Tokenizer, TokenizerConfig, sample_texts, train_sentencepiece

VERSION = "0.3.36"
# llama.cpp multiplies an f16 matrix by activations rounded to f16 (its CPU dot product works in the
# weight's type), so an f16 file cannot give bit-equal logits, only equal ones up to ~2^-11
# relative: a greedy continuation may part from ours where our two best tokens are that close.
F16_TIE = 2e-3
KNOWN_TOKENIZE = ("  (known: llama.cpp turns spaces into U+2581 before merging, so a literal U+2581 is a "
                  "space to it; llmforge keeps it as its 3 UTF-8 bytes, which llama.cpp decodes back to it)")
PROMPTS = ["def main(", "class Foo:\n    ", "import os\n", "The quick brown fox", "    return self."]
HARD = ["  two leading spaces", "trailing   ", "\n\n\nnewlines", "\ttabs\t\t", "digits 0123456789",
        "日本語のテキスト", "emoji 🦊🚀 👩\u200d💻", "unknown \u0f00\U0001d11e", "a literal \u2581 meta symbol"]
MODULES = ["argparse", "textwrap", "difflib", "fractions", "statistics", "calendar", "string", "shlex", "heapq",
           "functools", "dataclasses", "pprint", "gettext", "random", "tempfile", "shutil", "contextlib", "queue"]


def llama_cpp_module(cache: Path):
    """``llama_cpp``, importable as is or built once into ``cache``; and the build's seconds."""
    try:
        import llama_cpp

        return llama_cpp, None
    except ImportError:
        pass
    built = None
    if not (cache / "llama_cpp").is_dir():
        print(f"building llama-cpp-python {VERSION} into {cache} (compiles llama.cpp; minutes)...", flush=True)
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target",
                        str(cache), f"llama-cpp-python=={VERSION}"], check=True)
        built = time.time() - t0
    sys.path.append(str(cache))  # after the venv: its numpy etc. win over copies pulled in here
    import llama_cpp

    return llama_cpp, built


def stdlib_texts() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / f"{m}.py").read_text(encoding="utf-8") for m in MODULES if (stdlib / f"{m}.py").is_file()]


def random_model(vocab: int, seed: int, **kw) -> GPT:
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=vocab, block_size=1024, n_layer=4, n_head=8, n_embd=256, mlp="swiglu", **kw)).eval()
    with torch.no_grad():
        for block in m.transformer.h:
            block.attn.c_attn.weight.mul_(3)
        m.lm_head.weight.mul_(10)
    return m


def as_stored(model: GPT, typ: str) -> GPT:
    """A copy of ``model`` close to what llama.cpp's CPU backend computes from a GGUF of ``typ``:
    every matrix rounded through the gguf package's own quantizer as the export stores it (norms
    stay f32; a q8_0 matrix whose rows do not fill whole blocks is f16, as in the file), and the
    input of every matrix product rounded to the type of llama.cpp's CPU dot product for that
    matrix (its ``vec_dot_type``: f16, bf16 or q8_0 blocks; nothing for f32). Row order does not
    matter to either, so our layout rounds as llama.cpp's does. Not exact: f16 logits still differ
    by ~3.5e-4 of the largest (4.5e-4 without the input rounding, 6e-7 for f32), also with the
    prompt fed one token at a time (``n_batch=1``), so the rest of llama.cpp's rounding is
    elsewhere, not found."""
    import gguf

    out = copy.deepcopy(model)
    stored_as = {}  # weight -> the type the file holds it in, which its products' inputs take too

    def unpacked(packed: np.ndarray, kind, shape) -> np.ndarray:
        return np.asarray(gguf.quants.dequantize(packed, kind), dtype=np.float32).reshape(shape)

    def round_input(kind):
        def hook(module, args):
            x = args[0].detach().float().numpy()
            y = unpacked(gguf.quants.quantize(x, kind), kind, x.shape)
            return (torch.from_numpy(y).to(args[0].dtype),) + args[1:]
        return hook

    with torch.no_grad():
        for p in out.parameters():
            if p.dim() == 2:
                packed, kind = pack_gguf_tensor(p.numpy(), typ)
                p.copy_(torch.from_numpy(unpacked(packed, kind, p.shape)))
                stored_as[p] = kind
        if typ != "f32":
            for m in out.modules():
                if isinstance(m, torch.nn.Linear):
                    m.register_forward_pre_hook(round_input(stored_as[m.weight]))
    return out


def llama_greedy(llm, ids: list[int], n: int, vocab: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        logits = np.array(llm.scores[llm.n_tokens - 1])
        logits[vocab:] = -np.inf  # padded rows, as llmforge's vocab_limit
        out.append(int(logits.argmax()))
        llm.eval([out[-1]])
    return out


def check(llama_cpp, path: Path, model: GPT, stored: GPT, tok: Tokenizer, text_ids: list[int],
          texts: list[str], repeats: int) -> dict:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=os.cpu_count() or 1, logits_all=True,
                          type_k=0, type_v=0, verbose=False)
    vocab = tok.vocab_size
    refs = {"file": stored, "fp32": model}
    greedy = dict.fromkeys(refs, 0)
    margin = 0.0  # the widest top-1 margin (ours) at which llama.cpp chose another token than `file`
    for p in PROMPTS:
        ids = [tok.eos_id] + tok.encode(p)
        got = llama_greedy(llm, ids, 32, vocab)
        for name, m in refs.items():
            want = generate(m, torch.tensor([ids]), 32, temperature=0, vocab_limit=vocab)[0, len(ids):].tolist()
            greedy[name] += got == want
            if name == "file" and got != want:
                k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
                with torch.no_grad():
                    logits = m(torch.tensor([ids + want[:k]]))[0][0, -1, :vocab]
                margin = max(margin, float((logits[want[k]] - logits[got[k]]) / logits.abs().max()))
    llm.reset()
    llm.eval(text_ids)
    theirs = np.array(llm.scores[: len(text_ids)])[:, :vocab]
    x = torch.tensor([text_ids])
    with torch.no_grad():
        ours = {name: m(x, x)[0][0, :, :vocab].numpy() for name, m in refs.items()}
    top1 = {name: float((theirs.argmax(-1) == o.argmax(-1)).mean()) for name, o in ours.items()}
    dlogit = float(np.abs(theirs - ours["file"]).max() / np.abs(ours["file"]).max())
    strings = HARD + [t[:3000] for t in texts[-4:]]
    tok_bad = [s for s in strings if llm.tokenize(s.encode(), add_bos=False, special=False) != tok.encode(s)]
    speeds, base = [], []
    ids = [tok.eos_id] + tok.encode(PROMPTS[0])
    llama_greedy(llm, ids, 8, vocab)  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        llama_greedy(llm, ids, 64, vocab)
        speeds.append(64 / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        generate(model, torch.tensor([ids]), 64, temperature=0, vocab_limit=vocab)
        base.append(64 / (time.perf_counter() - t0))
    ratios = sorted(s / b for s, b in zip(speeds, base))
    return {"greedy": greedy, "margin": margin, "top1": top1, "dlogit": dlogit, "tokenize": (len(strings) - len(tok_bad), len(strings)), "tokenize_bad": tok_bad,
            "tok_s": statistics.median(speeds), "ratio": (ratios[0], statistics.median(ratios), ratios[-1])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "llmforge" / f"llama-cpp-python-{VERSION}")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    llama_cpp, built = llama_cpp_module(args.cache)
    print(f"llama-cpp-python {llama_cpp.__version__}" + (f" (built in {built:.0f}s)" if built else ""))
    torch.set_num_threads(os.cpu_count() or 1)
    texts = stdlib_texts()
    cfg = TokenizerConfig(vocab_size=2000, threads=os.cpu_count())
    tok = Tokenizer(train_sentencepiece(sample_texts(texts[:-4], sum(len(t) for t in texts), cfg), cfg))
    text_ids = [tok.eos_id] + tok.encode(texts[-1])[:511]
    shapes = {"gqa-untied": dict(n_kv_head=2, tie_embeddings=False), "mha-tied": dict(tie_embeddings=True)}
    failed, tok_bad = [], set()
    print(f"\n{'':<17} {'greedy (of 5)':>13} {'top-1 share':>13}")
    print(f"{'model':<11} {'type':<5} {'file':>6} {'fp32':>6} {'tie':>7} {'file':>6} {'fp32':>6} {'max|dlogit|':>11} "
          f"{'tokenize':>8} {'tok/s':>6}  tok/s vs llmforge min/med/max")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, kw) in enumerate(shapes.items()):
            model = random_model(tok.vocab_size + 48, seed=i, **kw)  # padded vocabulary: [PAD] rows in GGUF
            ckpt = save_checkpoint(Path(tmp) / name / "best.pt", model_state=model.state_dict(), optimizer_state=None,
                                   scheduler_state=None, step=0, data_state={}, rng_state=capture_rng_state(),
                                   config={"model": model.config.to_dict()}, lineage={}, tokenizer=tok.proto)
            for typ in ("f32", "f16", "bf16", "q8_0"):
                out = ExportStage(ckpt, ExportConfig(format="gguf", type=typ)).run()["out"]
                r = check(llama_cpp, Path(out), model, as_stored(model, typ), tok, text_ids, texts, args.repeats)
                g, t1, (lo, med, hi) = r["greedy"], r["top1"], r["ratio"]
                if typ == "f32" and g["file"] < len(PROMPTS):
                    failed.append(f"{name} f32: {len(PROMPTS) - g['file']} greedy continuations differ")
                if typ == "f16" and r["margin"] > F16_TIE:
                    failed.append(f"{name} f16: llama.cpp chose another token where ours led by {r['margin']:.1e} "
                                  f"of the largest logit (> {F16_TIE:.0e}: not a near-tie)")
                tok_bad.update(r["tokenize_bad"])
                tie = f"{r['margin']:.1e}" if g["file"] < len(PROMPTS) else "-"
                print(f"{name:<11} {typ:<5} {g['file']:>6} {g['fp32']:>6} {tie:>7} {t1['file']:>6.3f} {t1['fp32']:>6.3f} "
                      f"{r['dlogit']:>11.2e} {r['tokenize'][0]:>5}/{r['tokenize'][1]:<2} {r['tok_s']:>6.0f}  "
                      f"{lo:.2f} / {med:.2f} / {hi:.2f}", flush=True)
    for s in sorted(tok_bad):
        known = META_SPACE in s
        print(f"tokenized differently by llama.cpp: {s[:60]!r}" + (KNOWN_TOKENIZE if known else ""))
        if not known:
            failed.append(f"tokenization differs: {s[:60]!r}")
    for f in failed:
        print(f"FAILED: {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
