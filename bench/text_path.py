"""What a generated token costs on the engine's text side, by the output's length: its text
(incremental detokenization, whole UTF-8 characters) and the stop checks (eos and stop ids, a
stop string across token boundaries, the length limit), as `OutputProcessor.check_stop` runs
them for every row of every step. Baseline in the same run: HF transformers' `TextStreamer`
(`put`, one token at a time, as `generate(streamer=...)` feeds it), which re-decodes the tokens
since its last emitted line every token.

    python bench/text_path.py [--lengths 200,2000,8000] [--repeat 5] [--model SmolLM2-135M-Instruct]

Tokens are random ids of the model's vocabulary without newlines (the streamer's cost then
grows with the whole output, as with prose that has few line breaks).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--lengths", default="200,2000,8000")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import torch
    from transformers import TextStreamer

    from shoal.engine.output_processor import OutputProcessor
    from shoal.engine.sampling_params import SamplingParams
    from shoal.engine.sequence import Sequence
    from shoal.model.registry import ModelRegistry
    from shoal.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(str(ModelRegistry().resolve(args.model)))
    rng = random.Random(0)
    vocab = [i for i in range(len(tok.hf)) if "\n" not in tok.decode([i]) and i not in tok.special_ids]

    class Quiet(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            pass

    results: dict[str, dict[str, float]] = {}
    print(f"{'tokens':>7s} {'shoal us/tok':>13s} {'shoal+stop us/tok':>18s} {'HF TextStreamer us/tok':>23s} {'ratio':>6s}")
    for n in (int(x) for x in args.lengths.split(",")):
        ids = [rng.choice(vocab) for _ in range(n)]
        for t in ids:  # (both sides warm: the tokenizer's caches filled)
            tok.token_bytes(t)
            if hasattr(tok, "token_text"):  # (commits before it: no such cache)
                tok.token_text(t)
        runs: dict[str, list[float]] = {"shoal": [], "shoal_stop": [], "hf": []}
        for _ in range(args.repeat):
            for name, stop in (("shoal", None), ("shoal_stop", ["\n\n"])):
                op = OutputProcessor(tok, tok.stop_token_ids, 1 << 30)
                seq = Sequence("r", [1], SamplingParams(max_tokens=None, stop=stop))
                state = op.new_state(seq)
                t0 = time.perf_counter()
                for t in ids:
                    seq.token_ids.append(t)
                    op.check_stop(seq, state, t)
                runs[name].append((time.perf_counter() - t0) / n * 1e6)
            streamer = Quiet(tok.hf)
            tensors = [torch.tensor([t]) for t in ids]  # (made outside the timing)
            t0 = time.perf_counter()
            for t in tensors:
                streamer.put(t)
            runs["hf"].append((time.perf_counter() - t0) / n * 1e6)
        us = {k: statistics.median(v) for k, v in runs.items()}
        results[str(n)] = us
        print(f"{n:7d} {us['shoal']:13.2f} {us['shoal_stop']:18.2f} {us['hf']:23.2f} {us['hf'] / us['shoal']:6.1f}")
    print(json.dumps({"model": args.model, "repeat": args.repeat, "us_per_token": results}))


if __name__ == "__main__":
    main()
