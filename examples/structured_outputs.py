"""Structured Outputs with the official `openai` client against a local Shoal server: the answer
parsed into a pydantic model (the client sends its JSON Schema; the server constrains every token
to it), and JSON mode for a free-form object.

    bash scripts/run.sh                        # in one shell: the server (open mode on loopback)
    python examples/structured_outputs.py      # in another

Set OPENAI_BASE_URL / OPENAI_API_KEY for another server or a key made with `shoal keys create`.
"""

import json
import os

from openai import OpenAI
from pydantic import BaseModel


class Order(BaseModel):
    order: int
    items: list[str]
    city: str


client = OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
                api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
model = client.models.list().data[0].id  # the served base model
text = "Order #1042: two blue mugs and a teapot, shipped to Lyon on 3 May."

r = client.chat.completions.parse(
    model=model, temperature=0, max_tokens=120, response_format=Order,
    messages=[{"role": "system", "content": "Extract the order from the user's message."},
              {"role": "user", "content": text}])
order = r.choices[0].message.parsed  # an Order (the client raises if the answer was cut short)
print(order)

r = client.chat.completions.create(
    model=model, temperature=0, max_tokens=200, response_format={"type": "json_object"},
    messages=[{"role": "user", "content": f"Give the order number, items and city of this as JSON: {text}"}])
c = r.choices[0]  # one JSON object, or with finish_reason "length" the start of one
print(json.loads(c.message.content) if c.finish_reason == "stop" else f"(cut short) {c.message.content}")
