"""Running one claimed fine-tuning job: load the base model and the job's data, train with a
heartbeat keeping the lease, record events and checkpoints, and on success register the model
so the API serves it at once.

Everything a job writes is keyed so a rerun after a lost lease writes it once: checkpoints and
models are registered only if missing, and the trainer resumes from its newest checkpoint in the
job's directory, ending with the same adapter bytes as an uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import threading
import time

from ..blobs import BlobStore
from .hyperparams import learning_rate, resolve_hyperparameters
from .jobs import TRAIN_MAX_LEN, checkpoint_name, fine_tuned_name, load_job_data
from .trainer import TrainConfig, Trainer

log = logging.getLogger("shoal.worker")
CSV_FIELDS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")


class Lease:
    """Keeps a job's lease alive from a thread; remembers cancel/pause requests and loss."""

    def __init__(self, store, job_id: str, worker_id: str, lease_s: float, every_s: float) -> None:
        self.store, self.job_id, self.worker_id = store, job_id, worker_id
        self.lease_s, self.every_s = lease_s, every_s
        self.lost = self.cancel = self.pause = False
        self._last = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="shoal-heartbeat", daemon=True)

    def __enter__(self) -> "Lease":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every_s + 5)

    def poll(self, every_s: float = 0.5) -> None:
        """A fresh heartbeat when the last is older than `every_s` (called between steps, so a
        cancel or pause takes effect within about one step)."""
        if time.monotonic() - self._last >= every_s:
            self.beat()

    def beat(self) -> None:
        self._last = time.monotonic()
        try:
            row = self.store.heartbeat(self.job_id, self.worker_id, self.lease_s)
        except Exception:  # a database hiccup: try again next beat; the lease has slack
            log.exception("heartbeat for %s failed", self.job_id)
            return
        if row is None:
            self.lost = True
        else:
            self.cancel, self.pause = bool(row.cancel_requested), bool(row.pause_requested)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            self.beat()
            if self.lost:
                return


class JobRunner:
    """Runs claimed jobs for one worker; base models stay loaded between jobs."""

    def __init__(self, store, home, worker_id: str, *, lease_s: float = 60.0,
                 heartbeat_s: float = 5.0) -> None:
        self.store, self.worker_id = store, worker_id
        self.home = str(home)
        self.blobs = BlobStore(os.path.join(self.home, "files"))
        self.lease_s, self.heartbeat_s = lease_s, heartbeat_s
        self.shutting_down = False  # set by SIGTERM: checkpoint, requeue, exit
        self._models: dict[str, object] = {}

    def job_dir(self, job_id: str) -> str:
        return os.path.join(self.home, "jobs", job_id)

    def base(self, source: str):
        if source not in self._models:
            from ..model.registry import ModelRegistry

            self._models[source] = ModelRegistry().load(source, dtype="float32")
        return self._models[source]

    def run_next(self) -> bool:
        """Claim and run one job; False when the queue was empty."""
        job = self.store.claim_job(self.worker_id, self.lease_s)
        if job is None:
            return False
        with Lease(self.store, job.id, self.worker_id, self.lease_s, self.heartbeat_s) as lease:
            try:
                self.run(job, lease)
            except Exception as e:
                log.exception("job %s failed", job.id)
                if not lease.lost:
                    err = {"code": "server_error", "message": f"{type(e).__name__}: {e}", "param": None}
                    if self.store.release_job(job.id, self.worker_id, status="failed", error=err,
                                              finished_at=time.time()):
                        self.store.add_event(job.id, f"Fine-tuning failed: {err['message']}",
                                             level="error")
        return True

    def run(self, job, lease: Lease) -> None:
        store, extra = self.store, job.extra or {}
        base_name, org_name = job.model, extra.get("org_name") or job.org_id
        name = fine_tuned_name(base_name, org_name, job.suffix, job.id)
        loaded = self.base(extra.get("model_source") or base_name)
        max_len = min(loaded.config.max_position_embeddings, TRAIN_MAX_LEN)
        data = load_job_data(store, self.blobs, job, loaded.tokenizer, max_len)
        if data.error is not None:
            if store.release_job(job.id, self.worker_id, status="failed", error=data.error,
                                 finished_at=time.time()):
                store.add_event(job.id, data.error["message"], level="error")
            return
        h = job.resolved or resolve_hyperparameters(job.hyperparameters, len(data.train))
        cfg = TrainConfig(n_epochs=h["n_epochs"], batch_size=h["batch_size"],
                          learning_rate=learning_rate(h), lora_r=h["r"], lora_alpha=h["lora_alpha"],
                          target_modules=None if h["target_modules"] == "all-linear"
                          else h["target_modules"], seed=job.seed)
        trainer = Trainer(loaded.model, data.train, data.valid, cfg, self.job_dir(job.id),
                          base_model_name_or_path=base_name)
        resumed = job.attempts > 1 or job.resolved is not None and os.path.isdir(
            os.path.join(self.job_dir(job.id), "checkpoints"))
        store.add_event(job.id, "Fine-tuning job started" + (" (resuming from its last checkpoint)"
                                                             if resumed else ""))
        last_eta = [0.0]

        def on_event(ev: dict) -> None:
            if lease.lost:
                return
            if ev["type"] == "metrics":
                self._metrics(job, ev, last_eta)
            elif ev["type"] == "checkpoint":
                self._checkpoint(job, name, ev)

        def should_stop() -> str | None:
            lease.poll()
            if lease.lost or lease.cancel:
                return "cancel"
            if lease.pause or self.shutting_down:
                return "pause"
            return None

        lease.beat()  # pick up a cancel/pause that arrived between claim and start
        result = trainer.run(on_event, should_stop, resume=True)
        if lease.lost:
            log.warning("job %s: lease lost; another worker owns it now", job.id)
            return
        if result.status == "cancelled":
            if store.release_job(job.id, self.worker_id, status="cancelled", finished_at=time.time(),
                                 cancel_requested=False):
                store.add_event(job.id, "Job cancelled")
            return
        if result.status == "paused":
            status = "queued" if self.shutting_down and not lease.pause else "paused"
            if store.release_job(job.id, self.worker_id, status=status, pause_requested=False):
                store.add_event(job.id, f"Job paused at step {result.steps}/{result.total_steps}"
                                if status == "paused" else "Worker stopping; job requeued")
            return
        self._succeed(job, name, result)

    def _metrics(self, job, ev: dict, last_eta: list[float]) -> None:
        keys = ("step", "train_loss", "train_mean_token_accuracy", "valid_loss",
                "valid_mean_token_accuracy", "full_valid_loss", "full_valid_mean_token_accuracy")
        data = {k: ev[k] for k in keys if ev.get(k) is not None}
        msg = f"Step {ev['step']}/{ev['total_steps']}: training loss={ev['train_loss']:.4f}"
        if ev.get("valid_loss") is not None:
            msg += f", validation loss={ev['valid_loss']:.4f}"
        self.store.add_event(job.id, msg, type="metrics", data=data)
        now = time.time()
        if now - last_eta[0] > 2.0 and ev["step"] > 0:
            left = ev["elapsed_s"] / ev["step"] * (ev["total_steps"] - ev["step"])
            self.store.update_job(job.id, estimated_finish=now + left)
            last_eta[0] = now

    def _checkpoint(self, job, name: str, ev: dict) -> None:
        step, path = ev["step"], os.path.join(ev["path"], "adapter")
        ck_name = checkpoint_name(name, step)
        if self.store.get_model(ck_name) is None:
            self.store.add_model(ck_name, job.org_id, job.model, path, job_id=job.id,
                                 checkpoint_step=step)
            self.store.add_checkpoint(job.id, step, ck_name, ev.get("metrics") or {}, path)
            self.store.add_event(job.id, f"Checkpoint created at step {step}: {ck_name}")

    def _result_file(self, job, metrics: list[dict]) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_FIELDS)
        for m in metrics:
            w.writerow([m.get("step"), m.get("train_loss"), m.get("train_mean_token_accuracy"),
                        m.get("valid_loss", ""), m.get("valid_mean_token_accuracy", "")])
        data = buf.getvalue().encode()
        sha, size = self.blobs.put_bytes(data)
        row = self.store.add_file(job.org_id, "step_metrics.csv", "fine-tune-results", size, sha)
        return row.id

    def _succeed(self, job, name: str, result) -> None:
        store = self.store
        for ck in result.checkpoints:  # any a crash kept from being registered
            self._checkpoint(job, name, {"step": ck["step"], "path": ck["path"],
                                         "metrics": ck.get("metrics")})
        if store.get_model(name) is None:
            store.add_model(name, job.org_id, job.model, result.adapter_path, job_id=job.id)
        store.add_event(job.id, f"New fine-tuned model created: {name}")
        result_file = self._result_file(job, result.metrics)
        if store.release_job(job.id, self.worker_id, status="succeeded", fine_tuned_model=name,
                             trained_tokens=result.trained_tokens, result_files=[result_file],
                             finished_at=time.time(), estimated_finish=None):
            # billed once: only the worker whose release succeeded records the training tokens
            store.record_usage(job.org_id, None, name, job.model, "fine-tune",
                               result.trained_tokens, 0, request_id=job.id)
            store.add_event(job.id, "The job has successfully completed")
