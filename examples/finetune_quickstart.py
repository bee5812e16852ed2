"""The whole loop with the official `openai` client against a local Shoal server:
upload examples -> fine-tune -> follow the job -> use the new model.

    bash scripts/run.sh                       # in one shell: the server (open mode on loopback)
    python examples/finetune_quickstart.py    # in another

Set OPENAI_BASE_URL / OPENAI_API_KEY for another server or a key made with `shoal keys create`.
"""

import os
import time
from pathlib import Path

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
                api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
base = client.models.list().data[0].id  # the served base model
data = Path(__file__).with_name("sentiment.jsonl")

f = client.files.create(file=data.open("rb"), purpose="fine-tune")
job = client.fine_tuning.jobs.create(model=base, training_file=f.id, suffix="sentiment", seed=42)
print(f"job {job.id}: {job.status}")
seen = set()
while job.status not in ("succeeded", "failed", "cancelled"):
    time.sleep(2)
    job = client.fine_tuning.jobs.retrieve(job.id)
    for e in reversed(client.fine_tuning.jobs.list_events(job.id, limit=50).data):
        if e.id not in seen and (e.type != "metrics" or e.data["step"] % 20 == 0):
            print(f"  {e.message}")
        seen.add(e.id)
if job.status != "succeeded":
    raise SystemExit(f"job {job.status}: {job.error.message if job.error else ''}")

messages = [{"role": "system", "content": "Classify the sentiment of the review as positive or negative."},
            {"role": "user", "content": "The battery died on the first day."}]
for model in (base, job.fine_tuned_model):
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0)
    print(f"{model}: {r.choices[0].message.content!r}")
