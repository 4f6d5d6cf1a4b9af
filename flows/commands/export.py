"""Export a checkpoint as a Llama model: a Hugging Face directory (safetensors, config.json,
tokenizer, model card) that transformers loads without custom code, or one GGUF file for
llama.cpp / ollama.

The model must have the Llama shape: trained with --set model.mlp=swiglu (grouped-query
attention and an untied head are fine; QK-norm is not). The output goes to --out (default
<checkpoint dir>/export/<checkpoint>-hf-<key>/ or <checkpoint>-<type>-<key>.gguf); the same
checkpoint and settings again reports the finished export instead of redoing it.

With --register NAME the export is also recorded in MLflow: an `export` run (child of nothing,
tagged with the checkpoint's training run) holding the exported files and the weights as an
MLflow model, registered as a new version of NAME with its lineage (dataset and tokenizer
fingerprints, validation bits per byte); `llmforge generate models:/NAME/VERSION` then works.

examples:
  llmforge export runs/train-tiny-XXXX/best.pt --format hf --out my-model
  llmforge export best.pt --format hf --register my-gpt
  llmforge export best.pt --format hf --out my-model-bf16 --dtype bfloat16
  llmforge export best.pt --format gguf --out my-model.gguf --type q8_0
"""

from __future__ import annotations

import argparse

from llmforge.flows.options import add_flags

HELP = "export a checkpoint for Hugging Face transformers (safetensors) or llama.cpp (GGUF)"


def configure(p: argparse.ArgumentParser) -> None:
    from llmforge.model.export import ExportConfig

    p.add_argument("checkpoint", help="a checkpoint file (best.pt, ckpt-*.pt, a fine-tune's model.pt) or run directory")
    p.add_argument("--out", default=None, metavar="DIR_OR_FILE.gguf",
                   help="where to write: a directory for hf, a .gguf file for gguf (default: next to the checkpoint)")
    p.add_argument("--register", default=None, metavar="NAME",
                   help="also log the export to MLflow and register the model as a new version of NAME")
    p.add_argument("--experiment", default="llmforge", help="MLflow experiment (default: llmforge)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="an export field, e.g. --set export.type=q8_0; repeatable")
    add_flags(p, ExportConfig, "export", title="export options (also --set export.NAME=VALUE)")


def build(args: argparse.Namespace):
    from llmforge.errors import ConfigError
    from llmforge.flows.options import settings
    from llmforge.model.export import ExportOptions, ExportStage

    opts, given = settings(args, {}, lambda d, src: ExportOptions.load(d, source=src), "defaults")
    cfg = opts.export
    given = given.get("export", {})
    if cfg.format == "hf" and "type" in given:
        raise ConfigError(f"--type {given['type']}: applies to --format gguf; an hf export takes --dtype")
    if cfg.format == "gguf" and ("dtype" in given or "max_shard_size" in given):
        raise ConfigError("--dtype / --max-shard-size: apply to --format hf; a gguf export takes --type")
    return ExportStage(args.checkpoint, cfg, out=args.out)


def run(args: argparse.Namespace) -> int:
    from llmforge.console import say

    stage = build(args)
    result = stage.completed()
    if result is not None:
        say(f"already exported with these inputs: {result['out']}")
    else:
        result = stage.run()
        what = f"hf ({stage.config.dtype})" if stage.config.format == "hf" else f"gguf ({stage.config.type})"
        say(f"exported {what} in {result['seconds']:.1f}s: {result['out']} ({result['bytes'] / 1e6:.1f} MB)")
    if args.register:
        version = register(stage, result, args.register, args.experiment)
        say(f"registered {version['uri']}" + ("" if version.get("created", True) else " (already there)")
            + f"; try: llmforge generate {version['uri']} --prompt ...")
    if stage.config.format == "hf":
        say("load it with transformers: AutoModelForCausalLM.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR)")
    else:
        say("run it with llama.cpp: llama-cli -m FILE.gguf (prompts start after the EOS token; see the README)")
    return 0


def register(stage, result: dict, name: str, experiment: str) -> dict:
    """The export as an MLflow run (its files, and the weights as the run's model) and a new
    version of registered model ``name`` carrying the checkpoint's lineage."""
    from pathlib import Path

    from llmforge import tracking
    from llmforge.model.checkpoint import load_checkpoint
    from llmforge.tracking import registry

    lineage = load_checkpoint(stage.checkpoint).get("lineage") or {}
    source = lineage.get("mlflow_run_id")
    bpb = None
    if source:
        try:
            bpb = tracking.client().get_run(source).data.metrics.get(tracking.VAL_BPB)
        except Exception:  # the training run is in another store: the version simply lacks it
            bpb = None
    cfg = stage.config
    what = f"hf {cfg.dtype}" if cfg.format == "hf" else f"gguf {cfg.type}"
    version_tags = {registry.TAG_VAL_BPB: bpb, registry.TAG_SOURCE_RUN: source,
                    "llmforge.export": f"{what}: {result['out']}"}
    c = tracking.client()
    earlier = c.search_runs([tracking.experiment_id(experiment)],
                            f"tags.`llmforge.export_key` = '{stage.key}' and attributes.status = 'FINISHED'", max_results=1)
    if earlier:  # this export was registered before: its run already holds the files and the model
        return tracking.StageRun(c, earlier[0].info.run_id, experiment).model(stage.checkpoint, register=name,
                                                                              tags=version_tags)
    tags = {tracking.TAG_CHECKPOINT: str(stage.checkpoint.resolve()), tracking.TAG_MODEL_RUN: source,
            tracking.TAG_DATASET: lineage.get("dataset_fingerprint"),
            tracking.TAG_TOKENIZER: lineage.get("tokenizer_fingerprint"), "llmforge.export_key": stage.key}
    with tracking.stage_run(tracking.run_name("export", stage.checkpoint.parent.name, stage.checkpoint.stem, what),
                            stage="export", experiment=experiment, tags=tags) as run:
        run.params({"export": cfg.key_dict()})
        run.artifact(Path(result["out"]), "export")
        return run.model(stage.checkpoint, register=name, tags=version_tags)
