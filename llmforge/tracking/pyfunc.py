"""The MLflow ``python_function`` flavor of our models: load it back, and it generates.

MLflow pickles an instance of :class:`GPTPyfunc` by reference, so loading needs ``llmforge``
installed (its requirement is written into the logged model). The weights are the one artifact,
``checkpoint`` (a weights-only checkpoint); loading goes through
:func:`llmforge.model.generate.load_model` like every other command. Generation settings come from
the model config (``mlflow.pyfunc.load_model(uri, model_config={"max_new_tokens": 200})``)::

    m = mlflow.pyfunc.load_model("models:/my-gpt/1")
    m.predict(["def main(", "Once upon a time"])   # -> two completions (greedy, 64 new tokens)
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc

# what predict() does unless the model config says otherwise (greedy: the same text every time)
DEFAULTS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.0, "top_k": None, "top_p": None, "seed": None,
                            "device": "cpu"}


class GPTPyfunc(mlflow.pyfunc.PythonModel):
    """``predict(list of prompts) -> list of completions`` (the new text only, up to EOS)."""

    def load_context(self, context: Any) -> None:
        from llmforge.model.generate import load_model

        self.settings = {**DEFAULTS, **(context.model_config or {})}
        self.model, self.tok, self.meta = load_model(context.artifacts["checkpoint"], self.settings["device"])

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        import torch

        from llmforge.model.generate import generate

        s = {**self.settings, **(params or {})}
        device = next(self.model.parameters()).device
        out = []
        for i, prompt in enumerate(model_input):
            ids = self.tok.encode(prompt) if prompt else [self.tok.eos_id]
            idx = torch.tensor([ids], dtype=torch.long, device=device)
            res = generate(self.model, idx, int(s["max_new_tokens"]), temperature=float(s["temperature"]),
                           top_k=s["top_k"], top_p=s["top_p"], seed=None if s["seed"] is None else int(s["seed"]) + i,
                           eos_id=self.tok.eos_id, vocab_limit=self.tok.vocab_size)
            out.append(self.tok.decode([t for t in res[0, len(ids):].tolist() if t != self.tok.eos_id]))
        return out
