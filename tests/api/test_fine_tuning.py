"""Fine-tuning end to end with the official client: upload -> job -> events -> a new model that
answers a task it failed before; checkpoints; bad data; another org; cancel, pause and resume;
a worker killed mid-job resumes to the same adapter bytes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch

from shoal.api.app import create_app
from shoal.config import EngineConfig
from shoal.engine.async_engine import AsyncEngine
from shoal.finetune.runner import JobRunner
from shoal.model.loader import load_dir
from shoal.settings import ServerSettings
from shoal.store import Store
from tests.api.conftest import free_port, live
from tests.helpers import hf_tiny_config, save_tiny_hf_dir

WORDS = ["quick", "brown", "fox", "lazy", "dog", "world", "movie", "plot", "cheese", "today",
         "great", "boring"]
LABELS = {w: (" <POS>" if i % 3 else " <NEG>") for i, w in enumerate(WORDS)}


def toy_jsonl(n_words: int = 12) -> bytes:
    lines = [{"prompt": f"Review: {w}\nLabel:", "completion": LABELS[w]} for w in WORDS[:n_words]]
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


class Worker:
    """An in-process worker thread (fast: the model stays loaded) that can be stopped."""

    def __init__(self, store, home) -> None:
        self.runner = JobRunner(store, home, "test-worker", lease_s=30, heartbeat_s=0.2)
        self._stop, self.hold = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.hold.is_set() or not self.runner.run_next():
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=60)


@contextlib.contextmanager
def learnable_server(root, tokenizer_dir):
    """A live server on a learnable tiny model (larger init, so a LoRA can move its logits),
    its SQLite store with keys for orgs "acme" and "beta", and an in-process worker thread."""
    torch.manual_seed(0)
    path = root / "model"
    save_tiny_hf_dir(hf_tiny_config("llama", initializer_range=0.3, max_position_embeddings=512),
                     path, tokenizer_dir)
    engine = AsyncEngine(EngineConfig(model=str(path), block_size=8, num_kv_blocks=512,
                                      enable_lora=True, max_loras=4, max_lora_rank=16),
                         loaded=load_dir(str(path), dtype="float32"))
    home = root / "home"
    db_url = f"sqlite:///{root}/shoal.db"
    store = Store.open(db_url)
    keys = {org: store.create_key(org)[0] for org in ("acme", "beta")}
    port = free_port()
    app = create_app(engine, "tiny", store, ServerSettings.from_env(home=home, port=port))
    worker = Worker(store, home)
    try:
        with live(app, port):
            yield {"url": f"http://127.0.0.1:{port}", "store": store, "keys": keys, "home": home,
                   "engine": engine, "path": path, "worker": worker, "db_url": db_url}
    finally:
        worker.stop()
        engine.shutdown()


@pytest.fixture(scope="module")
def ft(tmp_path_factory, tiny_tokenizer_dir):
    with learnable_server(tmp_path_factory.mktemp("ft_api"), tiny_tokenizer_dir) as srv:
        yield srv


def client(ft, org="acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=ft["url"] + "/v1", api_key=ft["keys"][org], max_retries=0)


def wait(c: openai.OpenAI, job_id: str, statuses=("succeeded", "failed", "cancelled"),
         timeout: float = 120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")


def answers(c, model: str) -> dict[str, str]:
    out = {}
    for w in WORDS:
        r = c.completions.create(model=model, prompt=f"Review: {w}\nLabel:", max_tokens=3,
                                 temperature=0)
        out[w] = r.choices[0].text
    return out


def correct(ans: dict[str, str]) -> int:
    return sum(ans[w].startswith(LABELS[w]) for w in WORDS)


def test_fine_tune_end_to_end(ft):
    c = client(ft)
    f = c.files.create(file=("toy.jsonl", toy_jsonl()), purpose="fine-tune")
    assert f.status == "processed" and f.bytes == len(toy_jsonl())
    assert c.files.content(f.id).content == toy_jsonl()
    before = correct(answers(c, "tiny"))
    job = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, suffix="toy", seed=7,
                                    hyperparameters={"n_epochs": 12, "learning_rate_multiplier": 10})
    assert job.status == "validating_files" and job.seed == 7
    done = wait(c, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith("ft:tiny:acme:toy:")
    assert done.hyperparameters.n_epochs == 12 and done.hyperparameters.batch_size == 1
    assert done.trained_tokens > 0 and done.result_files
    events = list(c.fine_tuning.jobs.list_events(job.id, limit=1000))
    losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics"]
    assert len(losses) == 12 * 12 and sum(losses[-12:]) < 0.5 * sum(losses[:12])  # loss falls
    assert any("successfully completed" in e.message for e in events)
    # the new model is listed and answers the task it failed before
    assert done.fine_tuned_model in [m.id for m in c.models.list().data]
    after = answers(c, done.fine_tuned_model)
    assert correct(after) == len(WORDS) > before
    chat = c.chat.completions.create(model=done.fine_tuned_model, max_tokens=2,
                                     messages=[{"role": "user", "content": "hi"}])
    assert chat.model == done.fine_tuned_model and chat.usage.completion_tokens > 0
    # checkpoints (one per epoch) are models too
    cks = c.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data
    assert [k.step_number for k in cks] == [12 * e for e in range(12, 0, -1)]
    assert cks[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-144"
    mid = c.completions.create(model=cks[-1].fine_tuned_model_checkpoint, prompt="Review: fox",
                               max_tokens=2)
    assert mid.model.endswith(":ckpt-step-12")
    # the result file is the metrics CSV; training tokens are billed
    csv_text = c.files.content(done.result_files[0]).text
    assert csv_text.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert len(csv_text.splitlines()) == 1 + 144
    org = ft["store"].lookup_key(ft["keys"]["acme"]).org_id
    rows = [r for r in ft["store"].usage_summary(org) if r["kind"] == "fine-tune"]
    assert rows and rows[0]["prompt_tokens"] == done.trained_tokens
    # another org sees none of it
    b = client(ft, "beta")
    for call in (lambda: b.fine_tuning.jobs.retrieve(job.id), lambda: b.files.retrieve(f.id),
                 lambda: b.completions.create(model=done.fine_tuned_model, prompt="x")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert job.id not in [j.id for j in b.fine_tuning.jobs.list().data]
    with pytest.raises(openai.BadRequestError) as e:
        b.fine_tuning.jobs.create(model="tiny", training_file=f.id)
    assert e.value.param == "training_file"
    # deleting the model removes it (and its checkpoint models) from the registry, the engine
    # and the disk
    job_dir = os.path.join(ft["home"], "jobs", job.id)
    assert os.path.isdir(job_dir)
    assert c.models.delete(done.fine_tuned_model).deleted
    for name in (done.fine_tuned_model, cks[0].fine_tuned_model_checkpoint):
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model=name, prompt="x")
    assert not os.path.exists(job_dir)


@pytest.mark.parametrize("data,code,line", [
    (b"", "invalid_training_file", None),
    (b'{"prompt": "a", "completion": "b"}\n' * 7, "invalid_n_examples", None),
    (b'{"prompt": "a", "completion": "b"}\nnot json\n', "invalid_training_file", 2),
    (b'{"messages": [{"role": "user", "content": "x"}]}\n' * 12, "invalid_training_file", 1),
    (b'{"prompt": "a", "completion": "b"}\n' * 11 + b'{"prompt": "\xff"}\n', "invalid_training_file", 12),
    (b'{"prompt": "' + b"a" * 1_100_000 + b'", "completion": "b"}\n', "invalid_training_file", 1),
])
def test_bad_data_fails_the_job_with_code_and_line(ft, data, code, line):
    c = client(ft)
    f = c.files.create(file=("bad.jsonl", data), purpose="fine-tune")
    job = wait(c, c.fine_tuning.jobs.create(model="tiny", training_file=f.id).id)
    assert job.status == "failed" and job.error.code == code and job.error.param == "training_file"
    if line is not None:
        assert f"line {line}" in job.error.message.lower()
    assert any(e.level == "error" for e in c.fine_tuning.jobs.list_events(job.id))


@pytest.mark.parametrize("kwargs,param,status", [
    (dict(training_file="file-nope"), "training_file", 400),
    (dict(hyperparameters={"n_epochs": -1}), "hyperparameters.n_epochs", 400),
    (dict(method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 0}}}),
     "method.supervised.hyperparameters.batch_size", 400),
    (dict(model="no-such-model"), "model", 404),
    (dict(suffix="bad:suffix"), "suffix", 400),
    (dict(hyperparameters={"r": 32}), "hyperparameters.r", 400),  # the server's max_lora_rank is 16
    (dict(hyperparameters={"target_modules": ["nope_proj"]}), "hyperparameters.target_modules", 400),
])
def test_bad_job_requests(ft, kwargs, param, status):
    c = client(ft)
    f = c.files.create(file=("ok.jsonl", toy_jsonl()), purpose="fine-tune")
    args = {"model": "tiny", "training_file": f.id, **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        c.fine_tuning.jobs.create(**args)
    assert e.value.status_code == status and e.value.body["param"] == param


def test_upload_limits_and_errors(ft, tmp_path):
    c = client(ft)
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("x.jsonl", b"{}"), purpose="not-a-purpose")
    assert e.value.param == "purpose"
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve("file-missing")
    f = c.files.create(file=("../../etc/passwd", b"{}\n"), purpose="fine-tune")
    assert f.filename == "passwd"  # metadata only, never a path
    assert f.id in [x.id for x in c.files.list().data]
    assert c.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.content(f.id)


def test_cancel_and_pause_resume(ft):
    c = client(ft)
    f = c.files.create(file=("toy.jsonl", toy_jsonl()), purpose="fine-tune")
    slow = {"n_epochs": 25}
    job = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, seed=1, hyperparameters=slow)
    wait(c, job.id, ("running",))
    t0 = time.time()  # its first step's metrics (on a busy machine "running" can come well before)
    while not any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(job.id, limit=1000)):
        assert time.time() - t0 < 120, "no metrics event after 120 s"
        time.sleep(0.05)
    c.fine_tuning.jobs.pause(job.id)
    paused = wait(c, job.id, ("paused",))
    step_at_pause = max(e.data["step"] for e in c.fine_tuning.jobs.list_events(job.id, limit=1000)
                        if e.type == "metrics")
    assert 0 < step_at_pause < 300 and paused.fine_tuned_model is None
    c.fine_tuning.jobs.resume(job.id)
    wait(c, job.id, ("running",))
    c.fine_tuning.jobs.cancel(job.id)
    cancelled = wait(c, job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    events = list(c.fine_tuning.jobs.list_events(job.id, limit=1000))
    assert any("resuming" in e.message for e in events)


def _adapter_sha(home, job_id: str) -> str:
    with open(os.path.join(home, "jobs", job_id, "adapter", "adapter_model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_killed_worker_resumes_to_the_same_bytes(ft, tmp_path):
    """Two jobs, same file and seed: one uninterrupted (in-process worker), one run by a worker
    process killed after its first checkpoint and finished by a fresh worker process."""
    c = client(ft)
    f = c.files.create(file=("toy.jsonl", toy_jsonl()), purpose="fine-tune")
    hp = {"n_epochs": 3}
    ref = wait(c, c.fine_tuning.jobs.create(model="tiny", training_file=f.id, seed=5,
                                            hyperparameters=hp).id)
    assert ref.status == "succeeded"
    # the in-process worker holds off while a worker process takes the second job
    ft["worker"].hold.set()
    job = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, seed=5, hyperparameters=hp)
    wait(c, job.id, ("queued",))
    env = dict(os.environ, SHOAL_HOME=str(ft["home"]), SHOAL_DATABASE_URL=ft["db_url"])
    cmd = [sys.executable, "-m", "shoal.cli", "worker", "--lease-s", "2", "--poll", "0.1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while time.time() - t0 < 120:
            if c.fine_tuning.jobs.checkpoints.list(job.id).data:
                break
            time.sleep(0.05)
        assert c.fine_tuning.jobs.retrieve(job.id).status == "running"
        proc.kill()  # mid-job, after its first checkpoint
    finally:
        proc.wait(timeout=30)
        ft["worker"].hold.clear()
    # the in-process worker takes the job over once the dead worker's lease expires
    done = wait(c, job.id, timeout=180)
    events = list(c.fine_tuning.jobs.list_events(job.id, limit=1000))
    assert any("resuming" in e.message for e in events)
    assert done.status == "succeeded", done.error
    assert _adapter_sha(ft["home"], job.id) == _adapter_sha(ft["home"], ref.id)
    other = wait(c, c.fine_tuning.jobs.create(model="tiny", training_file=f.id, seed=6,
                                              hyperparameters=hp).id)
    assert _adapter_sha(ft["home"], other.id) != _adapter_sha(ft["home"], ref.id)
