from stages import format as fmt
from stages.params import TemplateParams


def row(*turns, id="r1"):
    roles = ["user", "assistant"] * len(turns)
    return {"id": id, "messages": [{"role": r, "content": c} for r, c in zip(roles, turns)]}


def test_qa_template_is_the_seed_format():
    [out] = fmt.format_rows([row("How do I reset?", "Hold the button.")], TemplateParams(name="qa"), None)
    assert out == {"id": "r1", "prompt": "### Question: How do I reset?\n ### Answer:", "completion": " Hold the button."}
    assert out["prompt"] + out["completion"] == "### Question: How do I reset?\n ### Answer: Hold the button."


def test_multi_turn_trains_on_last_assistant_turn_with_history_as_context():
    [out] = fmt.format_rows([row("q1", "a1", "q2", "a2")], TemplateParams(name="qa"), None)
    assert out["completion"] == " a2"
    assert out["prompt"] == "### Question: q1\n ### Answer: a1\n### Question: q2\n ### Answer:"


def test_alpaca_template():
    [out] = fmt.format_rows([row("Translate hi", "salut")], TemplateParams(name="alpaca"), None)
    assert out["prompt"].startswith(fmt.ALPACA_PREAMBLE)
    assert out["prompt"].endswith("### Instruction:\nTranslate hi\n\n### Response:\n") and out["completion"] == "salut"


def test_chat_template_uses_the_base_tokenizer(tiny_base):
    [out] = fmt.format_rows([row("q1", "a1", "q2", "a2")], TemplateParams(name="chat", system_prompt="Be brief"),
                            tiny_base)
    assert out["prompt"] == ("<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n"
                             "<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n"
                             "<|im_start|>assistant\n")
    assert out["completion"] == "a2<|im_end|>"
