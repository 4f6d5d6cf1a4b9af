"""llmforge: build your own GPT from a raw text corpus, locally.

The installed distribution is this one package. Its subpackages live at the top of the
repository and are mapped under it by ``pyproject.toml``:

    llmforge.pipeline  <- pipeline/   data stages: download, readers, clean, tokenizer, shards
    llmforge.model     <- model/      GPT, loader, train, evaluate, finetune, generate
    llmforge.flows     <- flows/      Prefect flows and the command line (thin wiring only)
    llmforge.configs   <- configs/    presets, recipes, corpus specs (package data)

The modules here are what every stage shares: ``errors`` (the user-facing error family),
``config`` (typed configs, YAML recipes, ``--set``), ``stage`` (the stage contract) and
``tracking`` (the one module that talks to MLflow).
"""

__version__ = "0.2.0"
