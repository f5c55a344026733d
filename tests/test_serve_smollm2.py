"""Acceptance on the default model (SmolLM2-135M-Instruct): the openai client's chat and completion answers,
streamed and not, are `llamazoo generate`'s greedy tokens, token for token, with the right usage."""
from __future__ import annotations

import json

import openai
import pytest

from llamazoo.cli import main
from serve_helpers import running_server

pytestmark = pytest.mark.usefixtures("one_thread")
NEW = 16


def generate(tmp_path, capsys, prompt: str, chat: bool) -> dict:
    code = main(["generate", f"generation.prompts={json.dumps([prompt])}", f"generation.max_new_tokens={NEW}",
                 f"generation.chat={str(chat).lower()}", "generation.output_format=jsonl", "generation.threads=1",
                 f"generation.output_dir={tmp_path / 'gen'}"])
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out.splitlines()[0])


def test_openai_client_equals_generate_on_smollm2(default_model_dir, tmp_path, capsys):
    completion_ref = generate(tmp_path, capsys, "The three primary colors are", chat=False)
    chat_ref = generate(tmp_path, capsys, "What is the capital of France?", chat=True)
    assert chat_ref["stop_reason"] == "eos" and "Paris" in chat_ref["completion"]  # ends before max tokens
    with running_server(default_model_dir, "serve.max_concurrent=2") as (url, state):
        tok = state.tokenizer
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        assert model == "SmolLM2-135M-Instruct"

        r = client.completions.create(model=model, prompt=completion_ref["prompt"], max_tokens=NEW, logprobs=0)
        assert r.choices[0].logprobs.tokens == [tok.decode([t]) for t in completion_ref["token_ids"]]
        assert r.choices[0].text == completion_ref["completion"] and r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(completion_ref["prompt_token_ids"]), NEW)
        chunks = list(client.completions.create(model=model, prompt=completion_ref["prompt"], max_tokens=NEW,
                                                stream=True, logprobs=0, stream_options={"include_usage": True}))
        assert [t for ch in chunks if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.tokens] == r.choices[0].logprobs.tokens
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == completion_ref["completion"]
        assert chunks[-1].usage.completion_tokens == NEW

        messages = [{"role": "user", "content": chat_ref["prompt"]}]
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=NEW, logprobs=True)
        assert [x.token for x in r.choices[0].logprobs.content] == [tok.decode([t]) for t in chat_ref["token_ids"]]
        assert r.choices[0].message.content == chat_ref["completion"] and r.choices[0].finish_reason == "stop"
        assert r.usage.prompt_tokens == len(chat_ref["prompt_token_ids"])
        assert r.usage.completion_tokens == len(chat_ref["token_ids"])  # the EOS token counts, as in generate
        chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=NEW, stream=True,
                                                     logprobs=True, stream_options={"include_usage": True}))
        assert [x.token for ch in chunks if ch.choices and ch.choices[0].logprobs
                for x in ch.choices[0].logprobs.content] == [x.token for x in r.choices[0].logprobs.content]
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat_ref["completion"]
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert chunks[-1].usage.total_tokens == r.usage.total_tokens
