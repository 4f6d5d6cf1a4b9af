"""Fine-tuning: the SFT data path (template, loss mask, batches) and real fine-tunes, full and LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmforge.errors import ConfigError
from llmforge.model import sft
from llmforge.model.checkpoint import load_checkpoint
from llmforge.model.finetune import FinetuneConfig, FinetuneStage
from llmforge.model.generate import load_for_inference
from llmforge.model.gpt import GPT
from llmforge.pipeline.fsutil import read_json
from test_evaluate import fit, make_dataset, make_texts, make_tokenizer, save_model, tiny_config

torch.set_num_threads(1)
DATA = Path(__file__).parent / "data"
SFT_FILE = DATA / "sft_facts.jsonl"


@pytest.fixture(scope="module")
def tok():
    # the sample includes the template and the SFT text so that sequences stay short
    examples, _ = sft.load_sft_jsonl(SFT_FILE)
    return make_tokenizer(extra_text="".join(e.prompt_text() + e.response + "\n" for e in examples), vocab_size=400)


@pytest.fixture
def mlruns(new_mlruns, monkeypatch):
    monkeypatch.setenv("LLMFORGE_MLRUNS", str(new_mlruns))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LLMFORGE_PARENT_RUN_ID", raising=False)
    return new_mlruns


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tok) -> dict:
    """Weights of a tiny model trained briefly on the facts corpus (knows the words, not the template)."""
    ds = make_dataset(tmp_path_factory.mktemp("pre") / "ds", tok, {"train": [make_texts(300, seed=1)]})
    torch.manual_seed(0)
    return fit(GPT(tiny_config(tok.vocab_size, block_size=32)), ds, steps=80).state_dict()


def base_checkpoint(tmp_path: Path, tok, *, block_size: int = 32, state: dict | None = None,
                    tie: bool = True) -> tuple[Path, str]:
    """A base model with an MLflow run of its own, like `llmforge train` leaves behind."""
    from llmforge import tracking

    with tracking.stage_run("train-base", stage="train") as r:
        run_id = r.run_id
    torch.manual_seed(0)
    model = GPT(tiny_config(tok.vocab_size, block_size=block_size).model_copy(update={"tie_embeddings": tie}))
    if state is not None:
        model.load_state_dict(state)
    return save_model(tmp_path / "base.pt", model, tok, run_id=run_id), run_id


def quick(mode: str, steps: int = 40, lr: float = 3e-3, **kw) -> dict:
    train = dict(max_steps=steps, batch_size=8, lr=lr, warmup_steps=2, eval_every=0, ckpt_every=0, device="cpu")
    return dict(mode=mode, val_fraction=0.2, train=train, **kw)


def finetune(base: Path, *, out_dir: Path, cfg: dict, sft_file: Path | None = None, data_dir: Path | None = None):
    config = FinetuneConfig.load({**cfg, "sft": str(sft_file) if sft_file else None,
                                  "data": str(data_dir) if data_dir else None})
    stage = FinetuneStage(base, config, out_dir=out_dir)
    return stage.completed() or stage.run()


# ---------------------------------------------------------------------------------------------
# the data path


def test_chat_template_and_loss_mask_cover_only_response_and_eos(tok):
    ex = sft.SFTExample(prompt="What did the cat do?", response="The cat chased the mouse.")
    ids, n_prompt = sft.encode_example(tok, ex, tok.eos_id)
    assert tok.decode(ids[:n_prompt]) == "### Instruction:\nWhat did the cat do?\n\n### Response:\n"
    assert tok.decode(ids[n_prompt:-1]) == "The cat chased the mouse." and ids[-1] == tok.eos_id

    rows = sft.build_rows([ex], tok, block_size=96, eos_id=tok.eos_id)
    x, y = rows.x[0], rows.y[0]
    n = len(ids) - 1
    assert x[:n].tolist() == ids[:-1]
    # y[i] is the target for input i, i.e. token i+1: prompt tokens 1..n_prompt-1 are masked
    assert (y[: n_prompt - 1] == -100).all()
    assert y[n_prompt - 1 : n].tolist() == ids[n_prompt:]  # every response token and the EOS
    assert (y[n:] == -100).all()  # padding carries no loss
    assert rows.stats["loss_tokens"] == len(ids) - n_prompt


def test_alpaca_records_use_the_input_section(tok):
    examples, _ = sft.load_sft_jsonl(SFT_FILE)
    alpaca = [e for e in examples if e.input]
    assert alpaca and alpaca[0].prompt_text() == (
        "### Instruction:\nFinish the sentence.\n\n### Input:\nThe cat chased\n\n### Response:\n")


def test_sft_loader_counts_and_names_bad_lines(tmp_path):
    examples, bad = sft.load_sft_jsonl(SFT_FILE)
    assert len(examples) == 20
    assert [b.line for b in bad] == [4, 10, 13]
    assert "invalid JSON" in bad[0].reason and "empty 'response'" in bad[1].reason and "JSON object" in bad[2].reason
    p = tmp_path / "all_bad.jsonl"
    p.write_text('{"prompt": "x"}\n[1]\n')
    with pytest.raises(ValueError, match=r"all_bad\.jsonl: no usable prompt/response records \(2 bad lines"):
        sft.load_sft_jsonl(p)


def test_packing_keeps_every_example_and_its_mask(tok):
    examples, _ = sft.load_sft_jsonl(SFT_FILE)
    padded = sft.build_rows(examples, tok, 96, tok.eos_id)
    packed = sft.build_rows(examples, tok, 96, tok.eos_id, pack=True)
    assert padded.stats["rows"] == len(examples) > packed.stats["rows"]
    assert packed.stats["loss_tokens"] == padded.stats["loss_tokens"]
    assert sorted(packed.y[packed.y != -100].tolist()) == sorted(padded.y[padded.y != -100].tolist())


def test_overlong_examples_are_cut_or_dropped_and_counted(tok):
    long_prompt = sft.SFTExample(prompt="cat " * 80, response="mouse")
    long_answer = sft.SFTExample(prompt="cat", response="mouse " * 80)
    rows = sft.build_rows([long_prompt, long_answer], tok, 32, tok.eos_id)
    assert rows.stats["too_long"] == 1 and rows.stats["truncated"] == 1 and rows.stats["rows"] == 1
    assert (rows.y[0] != -100).sum() > 0


def test_sft_batches_depend_only_on_step_and_survive_resume(tok):
    examples, _ = sft.load_sft_jsonl(SFT_FILE)
    rows = sft.build_rows(examples, tok, 96, tok.eos_id)
    a = sft.SFTBatcher(rows, 4, seed=7)
    b = sft.SFTBatcher(rows, 4, seed=7)
    b.load_state_dict(a.state_dict())
    for step in (0, 5, 3):
        xa, ya = a.get_batch(step, 1)
        xb, yb = b.get_batch(step, 1)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.get_batch(0, 0)[0], a.get_batch(1, 0)[0])
    other = sft.SFTBatcher(sft.build_rows(examples[:5], tok, 96, tok.eos_id), 4, seed=7)
    with pytest.raises(ValueError, match="different data"):
        other.load_state_dict(a.state_dict())


# ---------------------------------------------------------------------------------------------
# fine-tunes


def response_loss_of(checkpoint: Path, tok) -> float:
    examples, _ = sft.load_sft_jsonl(SFT_FILE)
    model, _, _ = load_for_inference(checkpoint, "cpu")
    rows = sft.build_rows(examples, tok, model.config.block_size, tok.eos_id)
    return sft.response_loss(model, rows)


def test_sft_full_finetune_lowers_response_loss_and_links_base_run(tmp_path, mlruns, tok):
    base, base_run = base_checkpoint(tmp_path, tok)
    out = tmp_path / "ft"
    summary = finetune(base, sft_file=SFT_FILE, out_dir=out, cfg=quick("full"))

    before, after = response_loss_of(base, tok), response_loss_of(out / "model.pt", tok)
    assert after < 0.6 * before, (before, after)
    assert summary["data"]["bad_lines"] == 3 and summary["data"]["examples"] == 20
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt["optimizer_state"] is None and ckpt["tokenizer"] is not None
    assert ckpt["lineage"]["base_checkpoint"] == str(base)
    assert ckpt["lineage"]["base_checkpoint_sha256"] == summary["base_checkpoint_sha256"]

    from llmforge import tracking

    run = tracking.client().get_run(summary["mlflow_run_id"])
    assert run.info.run_id != base_run
    assert run.data.tags["llmforge.base_run_id"] == base_run
    assert run.data.tags["llmforge.stage"] == "finetune"
    assert run.data.params["finetune.mode"] == "full"
    assert read_json(out / "finetune.json")["key"] == summary["key"]

    # a second call with the same inputs finds the finished stage and does nothing
    mtime = (out / "model.pt").stat().st_mtime_ns
    again = finetune(base, sft_file=SFT_FILE, out_dir=out, cfg=quick("full"))
    assert again == summary and (out / "model.pt").stat().st_mtime_ns == mtime


def test_lora_finetune_trains_adapters_and_saves_a_merged_plain_checkpoint(tmp_path, mlruns, tok, pretrained):
    # LoRA adapts a model that already knows something (a random base with a frozen, tied
    # embedding has nothing for low-rank updates to steer)
    base, _ = base_checkpoint(tmp_path, tok, state=pretrained)
    out = tmp_path / "lora"
    summary = finetune(base, sft_file=SFT_FILE, out_dir=out, cfg=quick("lora", steps=40, lora_r=4, lora_alpha=8,
                                                                          lr=1e-2))  # noqa
    assert summary["mode"] == "lora"
    before, after = response_loss_of(base, tok), response_loss_of(out / "model.pt", tok)
    assert after < 0.6 * before, (before, after)

    merged = load_checkpoint(out / "model.pt")["model_state"]
    base_sd = load_checkpoint(base)["model_state"]
    assert set(merged) == set(base_sd)  # plain GPT keys: the adapters are folded in
    # frozen weights outside the adapted layers are bit-identical to the base
    assert torch.equal(merged["transformer.wte.weight"], base_sd["transformer.wte.weight"])
    assert torch.equal(merged["transformer.h.0.ln_1.weight"], base_sd["transformer.h.0.ln_1.weight"])
    assert not torch.equal(merged["transformer.h.0.attn.c_attn.weight"], base_sd["transformer.h.0.attn.c_attn.weight"])
    adapter = torch.load(out / "lora_adapter.pt", weights_only=True)
    assert adapter["settings"]["r"] == 4 and adapter["lora"]
    # the merged weight is exactly base + (alpha / r) * B @ A
    A = adapter["lora"]["transformer.h.0.attn.c_attn.lora_A"]
    B = adapter["lora"]["transformer.h.0.attn.c_attn.lora_B"]
    torch.testing.assert_close(merged["transformer.h.0.attn.c_attn.weight"],
                               base_sd["transformer.h.0.attn.c_attn.weight"] + 2.0 * B @ A, rtol=1e-5, atol=1e-6)


def test_lora_on_an_untied_head_trains_through_the_chunked_loss_and_merges_into_it(tmp_path, mlruns, tok,
                                                                                   pretrained):
    # the head's adapter is trained through model/loss.py's head_loss (its product's operands), with
    # the adapters' dropout on; the merged head is the base head plus (alpha / r) * B @ A
    base, _ = base_checkpoint(tmp_path, tok, state=pretrained, tie=False)
    out = tmp_path / "lora-head"
    finetune(base, sft_file=SFT_FILE, out_dir=out,
             cfg=quick("lora", steps=40, lora_r=4, lora_alpha=8, lr=1e-2, lora_dropout=0.1,
                       lora_targets=["attn", "mlp", "lm_head"]))
    before, after = response_loss_of(base, tok), response_loss_of(out / "model.pt", tok)
    assert after < 0.6 * before, (before, after)
    merged = load_checkpoint(out / "model.pt")["model_state"]
    base_sd = load_checkpoint(base)["model_state"]
    adapter = torch.load(out / "lora_adapter.pt", weights_only=True)["lora"]
    assert adapter["lm_head.lora_B"].abs().max() > 0  # the head's adapter learned
    torch.testing.assert_close(merged["lm_head.weight"],
                               base_sd["lm_head.weight"] + 2.0 * adapter["lm_head.lora_B"] @ adapter["lm_head.lora_A"],
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(merged["transformer.wte.weight"], base_sd["transformer.wte.weight"])


def test_lora_refuses_a_tied_head(tmp_path, mlruns, tok, pretrained):
    base, _ = base_checkpoint(tmp_path, tok, state=pretrained)  # tied: the head is the token embedding
    with pytest.raises(ConfigError, match="LoRA target lm_head: its weight is tied to transformer.wte.weight"):
        finetune(base, sft_file=SFT_FILE, out_dir=tmp_path / "tied",
                 cfg=quick("lora", steps=4, lora_targets=["attn", "lm_head"]))


def test_text_finetune_trains_on_shards_made_with_the_base_tokenizer(tmp_path, mlruns, tok):
    base, _ = base_checkpoint(tmp_path, tok, block_size=32)
    ds = make_dataset(tmp_path / "ds", tok, {"train": [make_texts(100, seed=4)], "val": [make_texts(5, seed=5)]})
    summary = finetune(base, data_dir=ds.root, out_dir=tmp_path / "ft", cfg=quick("full", steps=20))
    assert summary["data"]["kind"] == "text" and summary["train"]["val_loss"] is not None
    ckpt = load_checkpoint(tmp_path / "ft" / "model.pt")
    assert ckpt["lineage"]["dataset_fingerprint"] == ds.fingerprint
    assert ckpt["step"] == 20


def test_text_finetune_refuses_shards_from_another_tokenizer(tmp_path, mlruns, tok):
    base, _ = base_checkpoint(tmp_path, tok, block_size=32)
    other = make_tokenizer(extra_text="zebra quagga okapi " * 50)
    ds = make_dataset(tmp_path / "ds", other, {"train": [make_texts(20, seed=4)]})
    with pytest.raises(ValueError, match=r"tokenized with tokenizer .* but .*base\.pt uses tokenizer"):
        finetune(base, data_dir=ds.root, out_dir=tmp_path / "ft", cfg=quick("full", steps=2))
    assert not (tmp_path / "ft").exists()


def test_finetune_needs_exactly_one_data_source(tmp_path, tok):
    base, _ = base_checkpoint(tmp_path, tok)
    with pytest.raises(ValueError, match="fine-tuning needs data"):
        FinetuneStage(base, FinetuneConfig.load(quick("full")))
    with pytest.raises(ValueError, match="exactly one data source, got sft and data"):
        FinetuneConfig.load({**quick("full"), "sft": str(SFT_FILE), "data": str(tmp_path)})


def test_finetune_train_section_keeps_the_fine_tuning_defaults():
    cfg = FinetuneConfig.load({"mode": "lora", "train": {"max_steps": 7}})
    assert cfg.train.max_steps == 7 and cfg.train.lr == 1e-3 and cfg.train.weight_decay == 0.0  # LoRA defaults
    assert FinetuneConfig.load({}).train.lr == 1e-4 and FinetuneConfig.load({}).train.max_steps == 500


@pytest.mark.slow
def test_finetune_command_then_flow_skips_the_finished_fine_tune(tmp_path, prefect_server, tok, pretrained):
    from test_evaluate import cli, cli_env

    env = cli_env(prefect_server, tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMFORGE_MLRUNS", env["LLMFORGE_MLRUNS"])
        base, base_run = base_checkpoint(tmp_path, tok, state=pretrained)
    args = ["finetune", str(base), "--sft", str(SFT_FILE), "--mode", "lora", "--lora-r", "4", "--max-steps", "10",
            "--lr", "1e-2", "--device", "cpu", "--eval-every", "5"]
    first = cli([*args, "--no-prefect"], env, tmp_path)
    assert "3 bad line(s) skipped" in first.stdout and base_run in first.stdout
    (out,) = (tmp_path / "runs").glob("finetune-lora-*")
    assert (out / "model.pt").is_file() and (out / "lora_adapter.pt").is_file()
    mtime = (out / "model.pt").stat().st_mtime_ns

    second = cli(args, env, tmp_path)  # as a Prefect flow: same key, so nothing is trained
    assert "already fine-tuned" in second.stdout
    assert (out / "model.pt").stat().st_mtime_ns == mtime

    gen = cli(["generate", str(out / "model.pt"), "--prompt", sft.format_prompt("What did the cat do?"),
               "--max-new-tokens", "5", "--seed", "1", "--device", "cpu"], env, tmp_path)
    assert gen.stdout.startswith("### Instruction:")
