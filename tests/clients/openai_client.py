"""The official `openai` Python package against `afinar serve`: models list, chat completion
(whole and streamed, which must agree), text completion, structured output (`response_format`
with a JSON schema), log-probabilities, and an unknown model's 404.

    python3 tests/clients/openai_client.py http://127.0.0.1:PORT

Run by tests/serve.rs (`cargo test`); exits non-zero with a message on any mismatch.
"""
import json
import sys

import openai

base = sys.argv[1].rstrip("/") + "/v1"
client = openai.OpenAI(base_url=base, api_key="unused")

ids = [m.id for m in client.models.list().data]
assert "smollm2" in ids, ids

messages = [{"role": "user", "content": "Name a colour."}]
whole = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=16)
text = whole.choices[0].message.content
assert text, whole
assert whole.choices[0].finish_reason in ("stop", "length"), whole
assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

stream = client.chat.completions.create(
    model="smollm2", messages=messages, temperature=0, max_tokens=16, stream=True,
    stream_options={"include_usage": True},
)
pieces, usage, reasons = [], None, []
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            reasons.append(c.finish_reason)
assert "".join(pieces) == text, ("".join(pieces), text)
assert reasons and reasons[-1] in ("stop", "length"), reasons
assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage

comp = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=8, temperature=0)
assert comp.choices[0].text, comp

schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}},
          "required": ["colour"], "additionalProperties": False}
js = client.chat.completions.create(
    model="smollm2", messages=messages, temperature=1, seed=7, max_tokens=32,
    response_format={"type": "json_schema", "json_schema": {"name": "colour", "schema": schema}},
)
obj = json.loads(js.choices[0].message.content)
assert set(obj) == {"colour"} and isinstance(obj["colour"], str), obj

lp = client.chat.completions.create(
    model="smollm2", messages=messages, temperature=0, max_tokens=8, logprobs=True, top_logprobs=2,
)
tokens = lp.choices[0].logprobs.content
assert len(tokens) == lp.usage.completion_tokens, (len(tokens), lp.usage)
assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens), tokens
assert "".join(t.token for t in tokens).startswith(lp.choices[0].message.content[:1]), tokens

multi = client.chat.completions.create(model="smollm2", messages=messages, temperature=1, seed=3,
                                       max_tokens=8, n=2)
assert [c.index for c in multi.choices] == [0, 1], multi

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("an unknown model must fail")
except openai.NotFoundError as e:
    assert e.status_code == 404

print("openai client: ok", len(pieces), "chunks")
