"""The LoRA trainer: learning, packing vs unpacked, micro-batches, reproducibility, resume, PEFT."""

from __future__ import annotations

import hashlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

from shoal.finetune.lora_train import TrainableLoRALinear, apply_trainable_lora
from shoal.finetune.packing import IGNORE, pack, run_batch, split_micro
from shoal.finetune.trainer import TrainConfig, Trainer, latest_checkpoint
from shoal.finetune.types import Example
from shoal.lora.layers import apply_lora
from shoal.lora.peft_format import load_adapter
from shoal.model.loader import load_dir
from tests.helpers import TINY_VOCAB, hf_tiny_config, save_tiny_hf_dir

SEP = 7
MAPPING = {10 + i: 200 + (i * 5) % 8 for i in range(8)}  # prompt token -> completion token


def toy_examples(n: int) -> list[Example]:
    """[bos, a, SEP] -> [f(a), eos]: only f(a) and eos are targets."""
    out = []
    for i in range(n):
        a = 10 + i % len(MAPPING)
        toks = [1, a, SEP, MAPPING[a], 2]
        out.append(Example(tuple(toks), (0, 0, 0, 1, 1), i + 1))
    return out


def random_examples(n: int, seed: int, lo: int = 5, hi: int = 30) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = int(torch.randint(lo, hi, (1,), generator=g))
        toks = torch.randint(3, TINY_VOCAB, (t,), generator=g).tolist()
        w = [0] * (t // 2) + [1] * (t - t // 2)
        out.append(Example(tuple(toks), tuple(w), i + 1))
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """family -> saved tiny HF model directory (random weights, seed 0)."""
    root = tmp_path_factory.mktemp("ft_models")
    dirs = {}
    for family in ("llama", "mistral", "gpt2"):
        torch.manual_seed(0)
        save_tiny_hf_dir(hf_tiny_config(family), root / family)
        dirs[family] = str(root / family)
    # the default init (std 0.02) caps a hidden-64 model's logits near +-1.5 whatever LoRA does
    # to the blocks (lm_head is frozen): a larger init lets the toy task reach a low loss
    torch.manual_seed(0)
    save_tiny_hf_dir(hf_tiny_config("llama", initializer_range=0.3), root / "learnable")
    dirs["learnable"] = str(root / "learnable")
    return dirs


def load(model_dirs, family="llama"):
    return load_dir(model_dirs[family], dtype="float32", with_tokenizer=False).model


def adapter_hash(result) -> str:
    with open(os.path.join(result.adapter_path, "adapter_model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


SMALL = dict(n_epochs=2, batch_size=4, learning_rate=5e-3, lora_r=4, lora_alpha=8, eval_every=2)


def test_pack_layout():
    exs = [Example((1, 5, 6), (0, 0, 1)), Example((1, 8, 9, 4), (0, 1, 1, 0))]
    b = pack(exs)
    assert b.input_ids.tolist() == [1, 5, 6, 1, 8, 9, 4]
    assert b.positions.tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert b.targets.tolist() == [IGNORE, 6, IGNORE, 8, 9, IGNORE, IGNORE]
    assert b.target_idx.tolist() == [1, 3, 4] and b.target_ids.tolist() == [6, 8, 9]
    assert [len(m) for m in split_micro(random_examples(6, 0, 10, 11), 25)] == [2, 2, 2]
    assert [len(m) for m in split_micro(exs, 2)] == [1, 1]  # longer than the budget: alone


@pytest.mark.parametrize("dtype,dropout", [(torch.float32, 0.0), (torch.float32, 0.5),
                                           (torch.bfloat16, 0.0)])
def test_lora_layer_matches_its_formula(dtype, dropout):
    from shoal.model.layers import Linear

    g = torch.Generator().manual_seed(0)
    base = Linear(24, 40, bias=True).to(dtype)
    layer = TrainableLoRALinear(base, r=4, lora_alpha=8, dropout=dropout, init=g,
                                dropout_gen=torch.Generator().manual_seed(1))
    torch.nn.init.normal_(layer.lora_B, generator=g)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    x = torch.randn(2, 5, 24, generator=g).to(dtype).requires_grad_()
    gy = torch.randn(2, 5, 40, generator=g)
    y = layer(x)
    assert y.dtype == dtype
    y.backward(gy.to(dtype))
    got = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    # reference: plain autograd on the formula, in float64, with the same dropout mask
    keep = torch.ones(2, 5, 24)
    if dropout:
        keep = torch.empty(2, 5, 24).bernoulli_(1 - dropout, generator=torch.Generator().manual_seed(1))
    x64 = x.detach().double().requires_grad_()
    a64, b64 = (layer.lora_A.detach().double().requires_grad_(), layer.lora_B.detach().double().requires_grad_())
    xd = x64 * keep.double() / (1 - dropout)
    want = x64 @ base.weight.double().t() + base.bias.double() + 2.0 * (xd @ a64.t()) @ b64.t()
    want.backward(gy.to(dtype).double())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(y.double(), want, **tol)
    for a, b in zip(got, (x64.grad, a64.grad, b64.grad)):
        torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_packed_loss_and_grads_equal_unpacked(model_dirs, family):
    model = load(model_dirs, family)
    lora = apply_trainable_lora(model, r=4, lora_alpha=8, seed=3)
    with torch.no_grad():  # nonzero B so that every LoRA weight gets a gradient
        g = torch.Generator().manual_seed(1)
        for m in lora.layers.values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    exs = random_examples(5, seed=2, lo=5, hi=20)  # mistral's window is 8: also exercised
    params = lora.parameters()

    def grads():
        out = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return out

    packed = run_batch(model, exs, 0)
    g_packed = grads()
    total = sum(sum(ex.weights[1:]) for ex in exs)
    loss_sum = 0.0
    for ex in exs:  # reference: one (1, T) row at a time, full logits, plain causal attention
        logits = model.logits(torch.tensor([ex.tokens]))[0, :-1]
        tgt = torch.tensor([t if w else IGNORE for t, w in zip(ex.tokens[1:], ex.weights[1:])])
        loss = F.cross_entropy(logits, tgt, ignore_index=IGNORE, reduction="sum")
        (loss / total).backward()
        loss_sum += loss.item()
    g_ref = grads()
    assert packed.loss == pytest.approx(loss_sum / total, rel=1e-5)
    for a, b in zip(g_packed, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    micro = run_batch(model, exs, 20)  # several micro-batches, accumulated
    assert micro.loss == pytest.approx(packed.loss, rel=1e-5)
    assert micro.accuracy == packed.accuracy
    for a, b in zip(grads(), g_packed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    lora.unwrap()
    assert not any(isinstance(m, TrainableLoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_bf16_base_trains_fp32_lora(model_dirs, tmp_path):
    model = load_dir(model_dirs["llama"], dtype="bfloat16", with_tokenizer=False).model
    res = Trainer(model, random_examples(6, seed=3), random_examples(2, seed=4),
                  TrainConfig(**{**SMALL, "n_epochs": 1}), str(tmp_path)).run()
    assert res.status == "succeeded" and all(math.isfinite(m["train_loss"]) for m in res.metrics)
    adapter = load_adapter(res.adapter_path)
    assert all(a.dtype == b.dtype == torch.float32 for a, b in adapter.weights.values())
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in model.parameters())


def test_loss_falls_and_adapter_learns_the_mapping(model_dirs, tmp_path):
    model = load(model_dirs, "learnable")
    train, valid = toy_examples(32), toy_examples(8)
    cfg = TrainConfig(n_epochs=12, batch_size=8, learning_rate=2e-2, lora_r=8, lora_alpha=16,
                      eval_every=8, seed=0)
    events = []
    res = Trainer(model, train, valid, cfg, str(tmp_path)).run(on_event=events.append)
    assert res.status == "succeeded" and res.steps == 48 == res.total_steps
    assert res.trained_tokens == sum(len(ex) for ex in train) * 12
    metrics = [e for e in events if e["type"] == "metrics"]
    assert len(metrics) == 48 and metrics[-1]["learning_rate"] > 0
    assert metrics[-1]["train_loss"] < 0.05 * metrics[0]["train_loss"]
    assert "valid_loss" in metrics[7] and "full_valid_loss" in metrics[3]
    assert metrics[-1]["full_valid_mean_token_accuracy"] == 1.0
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [4 * (i + 1) for i in range(12)]
    # the serving path: load the PEFT files, stack them into slot 0, greedy-decode
    adapter = load_adapter(res.adapter_path)
    mapping = apply_lora(model, max_loras=1, max_rank=8)
    for path, (a, b) in adapter.weights.items():
        mapping.layers[path].set_lora(0, a, b, adapter.scaling_for(path))
    with torch.no_grad():
        for a, want in MAPPING.items():
            ids = torch.tensor([[1, a, SEP]])
            mapping.set([0])
            assert model.logits(ids)[0, -1].argmax().item() == want
            mapping.clear()


def test_same_seed_same_bytes_other_seed_differs(model_dirs, tmp_path):
    train = random_examples(10, seed=4)
    hashes = []
    for i, seed in enumerate((0, 0, 1)):
        cfg = TrainConfig(**SMALL, seed=seed, lora_dropout=0.1)
        res = Trainer(load(model_dirs), train, None, cfg, str(tmp_path / str(i))).run()
        hashes.append(adapter_hash(res))
    assert hashes[0] == hashes[1] != hashes[2]


def test_pause_mid_epoch_and_crash_resume_bit_exactly(model_dirs, tmp_path):
    train, valid = random_examples(10, seed=5), random_examples(3, seed=6)
    cfg = TrainConfig(**SMALL, seed=7, lora_dropout=0.1)  # 3 steps per epoch, 6 in all
    full = Trainer(load(model_dirs), train, valid, cfg, str(tmp_path / "full")).run()
    want = adapter_hash(full)

    # pause after 4 steps (mid-epoch 2), then a new Trainer resumes
    polls = []
    model = load(model_dirs)
    paused = Trainer(model, train, valid, cfg, str(tmp_path / "p")).run(
        should_stop=lambda: polls.append(1) or ("pause" if len(polls) == 5 else None))
    assert paused.status == "paused" and paused.steps == 4 and paused.adapter_path is None
    assert latest_checkpoint(str(tmp_path / "p")).endswith("step-4")
    assert not any(isinstance(m, TrainableLoRALinear) for m in model.modules())
    resumed = Trainer(model, train, valid, cfg, str(tmp_path / "p")).run()
    assert resumed.status == "succeeded" and adapter_hash(resumed) == want
    assert resumed.trained_tokens == full.trained_tokens
    assert [m["step"] for m in resumed.metrics] == list(range(1, 7))
    assert [m["train_loss"] for m in resumed.metrics] == [m["train_loss"] for m in full.metrics]

    # crash right after the first (epoch-end) checkpoint: no pause checkpoint is written
    def crash(event):
        if event["type"] == "checkpoint":
            raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        Trainer(load(model_dirs), train, valid, cfg, str(tmp_path / "c")).run(on_event=crash)
    assert os.listdir(tmp_path / "c" / "checkpoints") == ["step-3"]
    resumed = Trainer(load(model_dirs), train, valid, cfg, str(tmp_path / "c")).run()
    assert adapter_hash(resumed) == want
    with pytest.raises(ValueError, match="seed"):  # a checkpoint of another config is refused
        Trainer(load(model_dirs), train, valid, TrainConfig(**SMALL, seed=8, lora_dropout=0.1),
                str(tmp_path / "c")).run()


def test_cancel_stops_within_one_step(model_dirs, tmp_path):
    polls = []
    events = []
    res = Trainer(load(model_dirs), random_examples(10, seed=1), None, TrainConfig(**SMALL),
                  str(tmp_path)).run(on_event=events.append,
                                     should_stop=lambda: polls.append(1) or ("cancel" if len(polls) > 1 else None))
    assert res.status == "cancelled" and res.steps == 1 and len(events) == 1
    assert not os.path.exists(tmp_path / "adapter") and latest_checkpoint(str(tmp_path)) is None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_adapter_matches_peft(model_dirs, tmp_path, family):
    import transformers
    from peft import PeftModel

    cfg = TrainConfig(**{**SMALL, "n_epochs": 1}, target_modules=None if family == "llama" else ["c_attn", "c_fc"])
    res = Trainer(load(model_dirs, family), random_examples(8, seed=9), None, cfg, str(tmp_path)).run()
    ids = torch.tensor([random_examples(1, seed=10, lo=12, hi=13)[0].tokens])
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dirs[family], attn_implementation="eager")
    with torch.no_grad():
        want = PeftModel.from_pretrained(hf, res.adapter_path).eval()(ids).logits
        adapter = load_adapter(res.adapter_path)  # the serving path accepts it
        assert max(b.abs().max().item() for _, b in adapter.weights.values()) > 0
        ours = load(model_dirs, family)
        lora = apply_trainable_lora(ours, r=4, lora_alpha=8, target_modules=cfg.target_modules)
        lora.load_state_dict({f"{p}.lora_{k}": t for p, (a, b) in adapter.weights.items()
                              for k, t in (("A", a), ("B", b))})
        got = ours.logits(ids)
        lora.unwrap()
        assert (got - want).abs().max().item() <= 1e-4
        before = load(model_dirs, family).logits(ids)
        assert (got - before).abs().max().item() > 1e-3  # the adapter does something
