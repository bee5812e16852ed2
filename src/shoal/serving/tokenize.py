"""POST /v1/tokenize and /v1/detokenize (our extension): what a prompt costs, token by token."""

from __future__ import annotations

from .chat import message_dicts
from .errors import ServingError


class TokenizeService:
    """The caller resolves `model` first (all of a base model's adapters share its tokenizer)."""

    def __init__(self, engine) -> None:
        self.engine, self.tok = engine, engine.tokenizer

    def tokenize(self, req) -> dict:
        if (req.prompt is None) == (req.messages is None):
            raise ServingError(400, "prompt: give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            ids = self.tok.encode_chat(message_dicts(req.messages))
        else:
            ids = self.tok.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        return {"tokens": ids, "token_strs": [self.tok.decode([t]) for t in ids], "count": len(ids),
                "max_model_len": self.engine.engine.max_model_len}

    def detokenize(self, req) -> dict:
        vocab = self.engine.engine.model_config.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ServingError(400, f"tokens: id {bad} is outside the vocabulary (0..{vocab - 1})",
                               param="tokens")
        return {"prompt": self.tok.decode(req.tokens)}
