"""LoRA training throughput and memory: Shoal's trainer against HF transformers + PEFT, one run.

Data: `--examples` random-token examples of 64-512 tokens, the last half of each a completion
(weight 1). Model: `$SHOAL_HOME/models/SmolLM2-135M-Instruct` when present, else random weights of
its shape (LlamaConfig, 30 layers, hidden 576, 9/3 heads, vocab 49152, tied) saved to a temp dir;
both sides load the same directory. Both train LoRA r=8, alpha=16 on all linear layers but
lm_head, AdamW, linear warmup/decay, grad clip 1.0, over the SAME batches (Shoal's epoch order).
Shoal: `Trainer.run` (packed, logits at targets only). HF: a plain PEFT loop (no `Trainer`
overhead), each batch right-padded to its longest example, `labels` -100 off the targets, SDPA.
Timing excludes the first step of each side (warm-up) and is reported as wall-clock tokens/s and
as tokens per CPU-second (steadier when other processes share the cores); memory is the peak RSS
during training above the RSS right before it (VmHWM reset via /proc/self/clear_refs, malloc_trim
between the sides). Both models stay loaded; `--hf-first` swaps the order.
Usage:
  python bench/train_throughput.py --steps 6 --batch-size 8 --threads 2 --dtype float32
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import tempfile
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> float:
    """Return freed heap to the OS, reset the peak RSS; returns the RSS now (MB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status("VmRSS:")


def model_dir(tmp: str) -> tuple[str, str]:
    """(path, description) of the real SmolLM2-135M-Instruct or a random model of its shape."""
    from shoal.paths import models_dir

    real = models_dir() / "SmolLM2-135M-Instruct"
    if (real / "config.json").is_file():
        return str(real), "SmolLM2-135M-Instruct"
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp)
    return tmp, "random weights, SmolLM2-135M shape"


def make_examples(n: int, vocab: int, seed: int):
    from shoal.finetune.types import Example

    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = rng.randint(64, 512)
        toks = tuple(rng.randrange(3, vocab) for _ in range(t))
        out.append(Example(toks, tuple([0] * (t // 2) + [1] * (t - t // 2)), i + 1))
    return out


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def summarize(times: list[tuple[float, float]], t0: tuple[float, float], batches) -> dict:
    """Throughput over steps 2..N (step 1 is warm-up) when there are at least 3 steps.
    `cpu_s` is process CPU time: less noisy than wall time on a shared box (1 thread)."""
    skip = 1 if len(times) >= 3 else 0
    start = times[skip - 1] if skip else t0
    dt, cpu = times[-1][0] - start[0], times[-1][1] - start[1]
    toks = sum(len(ex) for b in batches[skip:] for ex in b)
    tgts = sum(sum(ex.weights[1:]) for b in batches[skip:] for ex in b)
    return {"seconds": dt, "cpu_s": cpu, "steps_timed": len(times) - skip, "tokens": toks,
            "tok_s": toks / dt, "target_tok_s": tgts / dt, "tok_per_cpu_s": toks / cpu}


def make_trainer(path: str, data, args, dtype):
    from shoal.finetune.trainer import TrainConfig, Trainer
    from shoal.model.loader import load_dir

    model = load_dir(path, dtype=dtype, with_tokenizer=False).model
    cfg = TrainConfig(n_epochs=1, batch_size=args.batch_size, learning_rate=2e-4, lora_r=8,
                      lora_alpha=16, eval_every=0, seed=0,
                      max_tokens_per_micro=args.max_tokens_per_micro)
    out = tempfile.mkdtemp(prefix="shoal-train-bench-")
    return Trainer(model, data[:args.steps * args.batch_size], None, cfg, out)


def run_shoal(trainer, batches) -> dict:
    base = reset_peak()
    times: list[tuple[float, float]] = []
    losses = []

    def on_event(e):
        if e["type"] == "metrics":
            times.append(clock())
            losses.append(e["train_loss"])

    t0 = clock()
    trainer.run(on_event=on_event, resume=False)
    r = summarize(times, t0, batches)
    r.update(peak_mb=_status("VmHWM:") - base, first_loss=losses[0], last_loss=losses[-1])
    return r


def run_hf(path: str, batches, args, dtype) -> dict:
    import transformers
    from peft import LoraConfig, get_peft_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, foreach=False)
    warm = max(1, round(0.1 * len(batches)))
    sched = transformers.get_linear_schedule_with_warmup(opt, warm, len(batches))
    pad = hf.config.pad_token_id or 0
    padded = 0
    base = reset_peak()
    times: list[tuple[float, float]] = []
    losses = []
    t0 = clock()
    for batch in batches:
        t = max(len(ex) for ex in batch)
        ids = torch.full((len(batch), t), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), t), dtype=torch.long)
        labels = torch.full((len(batch), t), -100, dtype=torch.long)
        for i, ex in enumerate(batch):
            n = len(ex)
            ids[i, :n] = torch.tensor(ex.tokens)
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor([tok if w else -100 for tok, w in zip(ex.tokens, ex.weights)])
        padded += ids.numel()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(clock())
    r = summarize(times, t0, batches)
    r.update(peak_mb=_status("VmHWM:") - base, padded_tokens=padded, first_loss=losses[0],
             last_loss=losses[-1])
    del model, hf, opt
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-tokens-per-micro", type=int, default=4096)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-first", action="store_true", help="run the HF baseline before Shoal")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    tmp = tempfile.mkdtemp(prefix="shoal-train-bench-model-")
    path, desc = model_dir(tmp)
    data = make_examples(max(args.examples, args.steps * args.batch_size), 49152, seed=0)
    trainer = make_trainer(path, data, args, dtype)
    batches = [trainer.batch_at(s) for s in range(trainer.total_steps)]
    results = {}
    if args.hf_first and not args.skip_hf:
        results["hf_peft"] = run_hf(path, batches, args, dtype)
    results["shoal"] = run_shoal(trainer, batches)
    if not args.hf_first and not args.skip_hf:
        results["hf_peft"] = run_hf(path, batches, args, dtype)
    print(f"\nmodel: {desc}; {args.dtype}; {args.threads} threads; batch {args.batch_size}; "
          f"{args.steps} steps (first excluded)")
    print(f"{'run':10s} {'tok/s':>8s} {'target tok/s':>13s} {'tok/cpu-s':>10s} {'wall s':>7s} "
          f"{'peak MB':>8s} {'loss first->last':>18s}")
    for k, r in results.items():
        print(f"{k:10s} {r['tok_s']:8.1f} {r['target_tok_s']:13.1f} {r['tok_per_cpu_s']:10.1f} "
              f"{r['seconds']:7.1f} {r['peak_mb']:8.0f} {r['first_loss']:8.3f}->{r['last_loss']:.3f}")
    if "hf_peft" in results:
        s, h = results["shoal"], results["hf_peft"]
        results["ratio_tok_s"] = s["tok_s"] / h["tok_s"]
        results["ratio_tok_per_cpu_s"] = s["tok_per_cpu_s"] / h["tok_per_cpu_s"]
        results["ratio_peak_mb"] = s["peak_mb"] / h["peak_mb"]
        print(f"Shoal / HF+PEFT: {results['ratio_tok_s']:.2f}x tokens/s (wall), "
              f"{results['ratio_tok_per_cpu_s']:.2f}x tokens per CPU-second, "
              f"{results['ratio_peak_mb']:.2f}x peak memory")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min) on "
          f"{os.cpu_count()} CPUs: other processes slow both sides")
    out = {"date": time.strftime("%Y-%m-%d"), "model": desc, "dtype": args.dtype, "loadavg": load,
           "threads": args.threads, "batch_size": args.batch_size, "steps": args.steps,
           "torch": torch.__version__, "results": results}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
