"""Chat prompts: a checkpoint's Jinja template renders as Hugging Face renders it; models without
one get the documented plain form."""

from __future__ import annotations

import pytest

from disaggserve_worker.router.chat_template import ChatTemplate
from disaggserve_worker.router.errors import APIError

# The shape of Llama-3's template (header tokens, bos, generation prompt, raise_exception).
LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role ' + message['role'] + ' is not supported') }}{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "}]


def test_matches_transformers_rendering() -> None:
    transformers = pytest.importorskip("transformers")
    from disaggserve_worker.model.builtin_tokenizer import builtin_tokenizer

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=builtin_tokenizer(), bos_token="<s>",
                                              eos_token="</s>")
    hf.chat_template = LLAMA3_LIKE
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ours = ChatTemplate(LLAMA3_LIKE, bos_token="<s>", eos_token="</s>").render(MESSAGES)
    assert ours == expected
    assert ours.startswith("<s><|start_header_id|>system")


def test_template_refusal_is_a_client_error() -> None:
    with pytest.raises(APIError) as info:
        ChatTemplate(LLAMA3_LIKE).render([{"role": "tool", "content": "x"}])
    assert info.value.status == 400 and "role tool is not supported" in info.value.message


def test_plain_template_is_the_documented_one() -> None:
    plain = ChatTemplate(None)
    assert plain.is_plain
    assert plain.render(MESSAGES) == "<|system|>\nBe brief.\n<|user|>\n Hi there \n<|assistant|>\n"
    assert plain.render(MESSAGES[:1], add_generation_prompt=False) == "<|system|>\nBe brief.\n"
