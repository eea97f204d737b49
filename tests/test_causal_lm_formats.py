"""TRL's dataset formats for the causal-LM task: chat templates, assistant-only masks, token by token."""

from __future__ import annotations

from typing import Any

import pytest
from gradient_fixtures import gpt2_lm, lm_data, word_tokenizer

from datainf.data.formats import check_not_packed, lm_format, to_trl_records
from datainf.errors import DatasetError, TaskInputError
from datainf.tasks.causal_lm import CausalLMConfig, CausalLMTask, training_records
from datainf.testing import check_per_example_gradients

USER, BOT = "w90", "w91"  # the role markers the templates write (words of the tiny vocabulary)
# ids of the tiny word tokenizer: specials 0..5, then w<i> -> i + 6
PAD, BOS, EOS = 0, 4, 5
U, A = 96, 97

PLAIN = (
    "<s> {% for m in messages %}{{ 'w90' if m['role'] == 'user' else 'w91' }} {{ m['content'] }} </s> "
    "{% endfor %}{% if add_generation_prompt %}w91 {% endif %}"
)
# the same rendering, with {% generation %} markers around each assistant turn's content and end token
TAGGED = (
    "<s> {% for m in messages %}{% if m['role'] == 'assistant' %}w91 {% generation %}{{ m['content'] }} </s>"
    "{% endgeneration %} {% else %}w90 {{ m['content'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}w91 {% endif %}"
)


def chat_tokenizer(template: str | None = PLAIN) -> Any:
    tok = word_tokenizer("lm")
    tok.chat_template = template
    return tok


def w(i: int) -> int:
    return i + 6


CONVERSATION = [
    {"role": "user", "content": "w1 w2"},
    {"role": "assistant", "content": "w3"},
    {"role": "user", "content": "w4"},
    {"role": "assistant", "content": "w5 w6"},
]
# <s> U w1 w2 </s> A w3 </s> U w4 </s> A w5 w6 </s>
EXPECTED_IDS = [BOS, U, w(1), w(2), EOS, A, w(3), EOS, U, w(4), EOS, A, w(5), w(6), EOS]
EXPECTED_MASK = [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1]


def _encoded(task: CausalLMTask, record: dict[str, Any]) -> tuple[list[int], list[int]]:
    batch = task.collate([record], ["x"])
    ids = batch.inputs["input_ids"][0].tolist()
    mask = batch.inputs["loss_mask"][0].tolist()
    return ids, mask


@pytest.mark.parametrize("template", [PLAIN, TAGGED], ids=["prefix-renders", "generation-tags"])
def test_messages_mask_covers_assistant_turns_only(template: str) -> None:
    task = CausalLMTask(chat_tokenizer(template))
    ids, mask = _encoded(task, {"messages": CONVERSATION})
    assert ids == EXPECTED_IDS
    assert mask == EXPECTED_MASK
    # the loss tokens are exactly the assistant contents and their end-of-turn tokens
    assert [t for t, m in zip(ids, mask) if m] == [w(3), EOS, w(5), w(6), EOS]


def test_messages_loss_on_all_counts_every_token() -> None:
    task = CausalLMTask(chat_tokenizer(), CausalLMConfig(loss_on="all"))
    ids, mask = _encoded(task, {"messages": CONVERSATION})
    assert ids == EXPECTED_IDS and mask == [1] * len(ids)


def test_conversational_prompt_completion_masks_the_prompt() -> None:
    task = CausalLMTask(chat_tokenizer())
    record = {"prompt": CONVERSATION[:3], "completion": CONVERSATION[3:]}
    assert lm_format(record) == "conversational-completion"
    ids, mask = _encoded(task, record)
    assert ids == EXPECTED_IDS
    # only the last assistant turn is the completion; the earlier one is part of the prompt
    assert mask == [0] * 12 + [1, 1, 1]


def test_plain_prompt_completion_equals_prompt_response() -> None:
    tok = word_tokenizer("lm")
    task = CausalLMTask(tok)
    a = _encoded(task, {"prompt": "w1 w2", "completion": "w3 w4"})
    b = _encoded(task, {"prompt": "w1 w2", "response": "w3 w4"})
    assert a == b
    assert a == ([BOS, w(1), w(2), w(3), w(4), EOS], [0, 0, 0, 1, 1, 1])


def test_text_and_tokenized_rows() -> None:
    task = CausalLMTask(word_tokenizer("lm"))
    assert _encoded(task, {"text": "w1 w2"}) == ([BOS, w(1), w(2), EOS], [1, 1, 1, 1])
    labels = {"input_ids": [BOS, w(1), w(2), w(3)], "labels": [-100, -100, w(2), w(3)]}
    assert _encoded(task, labels)[1] == [0, 0, 1, 1]
    masked = {"input_ids": [BOS, w(1), w(2), w(3)], "completion_mask": [0, 0, 0, 1]}
    assert _encoded(task, masked)[1] == [0, 0, 0, 1]
    with pytest.raises(TaskInputError, match="labels differ from input_ids at positions \\[2\\]"):
        task.validate([{"input_ids": [BOS, w(1), w(2)], "labels": [-100, w(1), w(9)]}], ["bad"])


def test_existing_prompt_response_encoding_unchanged() -> None:
    # the pre-existing format: prompt with special tokens, response without, then EOS
    task = CausalLMTask(word_tokenizer("lm"))
    for record in lm_data(4, seed=3):
        prompt = word_tokenizer("lm")(record["prompt"])["input_ids"]
        response = word_tokenizer("lm")(record["response"], add_special_tokens=False)["input_ids"] + [EOS]
        ids, mask = _encoded(task, record)
        assert ids == prompt + response
        assert mask == [0] * len(prompt) + [1] * len(response)


def test_messages_gradients_match_the_loop() -> None:
    model = gpt2_lm()
    task = CausalLMTask(chat_tokenizer())
    data = to_trl_records(lm_data(4, seed=5), "messages")
    assert all(lm_format(r) == "messages" for r in data)
    report = check_per_example_gradients(model, task, data, rtol=1e-4)
    assert report.ok and report.max_error < 1e-4


def test_to_trl_records_round_trip() -> None:
    records = [{"id": "a", "prompt": "w1", "response": " w2", "class": 3}]
    msgs = to_trl_records(records, "messages")
    assert msgs == [
        {"id": "a", "class": 3, "messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}
    ]
    assert lm_format(msgs[0]) == "messages"
    assert lm_format(to_trl_records(records, "prompt-completion")[0]) == "prompt-completion"
    with pytest.raises(DatasetError, match="Unknown TRL format"):
        to_trl_records(records, "chosen-rejected")


# ---------------------------------------------------------------------------------------------- bad input


def test_none_of_the_formats_names_fields_and_formats() -> None:
    task = CausalLMTask(word_tokenizer("lm"))
    with pytest.raises(TaskInputError) as err:
        task.validate([{"question": "w1", "answer": "w2"}, {"prompt": "w1", "response": "w2"}], ["q1", "ok"])
    text = str(err.value)
    assert "'q1'" in text and "'ok'" not in text
    assert "['answer', 'question']" in text
    for fmt in ("messages", "prompt-completion", "prompt-response", "text", "tokenized"):
        assert fmt in text


def test_chat_template_missing() -> None:
    task = CausalLMTask(chat_tokenizer(None))
    with pytest.raises(TaskInputError, match="'c7'.*has no chat template"):
        task.validate([{"messages": CONVERSATION}], ["c7"])


def test_response_cut_away_by_the_length_limit_names_the_ids() -> None:
    task = CausalLMTask(word_tokenizer("lm"), CausalLMConfig(max_length=4))
    records = [{"prompt": "w1 w2 w3 w4 w5", "response": "w6"}, {"prompt": "w1", "response": "w2"}]
    with pytest.raises(TaskInputError) as err:
        task.validate(records, ["long", "short"])
    text = str(err.value)
    assert "'long'" in text and "'short'" not in text
    assert "cut the whole response away" in text


def test_packed_rows_are_refused() -> None:
    task = CausalLMTask(word_tokenizer("lm"))
    packed = {"input_ids": [BOS, w(1), BOS, w(2)], "labels": [BOS, w(1), BOS, w(2)], "position_ids": [0, 1, 0, 1]}
    with pytest.raises(DatasetError, match="packed.*'p1'"):
        task.validate([packed], ["p1"])
    with pytest.raises(DatasetError, match="packed"):
        check_not_packed([{"input_ids": [1, 2], "seq_lengths": [1, 1]}], ["p2"])
    check_not_packed([{"input_ids": [1, 2], "position_ids": [0, 1]}], ["single"])  # one sequence: fine


def test_training_records_accept_trl_formats() -> None:
    records = [{"id": 1, "messages": CONVERSATION}, {"id": 2, "prompt": "w1", "completion": "w2"}]
    out = training_records(records)
    assert [r["id"] for r in out] == ["1", "2"]
    assert out[0]["messages"] == CONVERSATION
    with pytest.raises(DatasetError, match="none of the causal-LM formats.*\\['label', 'sentence'\\]"):
        training_records([{"id": 3, "sentence": "w1", "label": 0}])


def test_describe_is_unchanged_by_a_chat_template() -> None:
    # store fingerprints and cache keys stay those of earlier versions
    assert CausalLMTask(chat_tokenizer()).describe() == CausalLMTask(chat_tokenizer(None)).describe()
