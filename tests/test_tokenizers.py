"""Real tokenizer conventions: a tiny Llama on Meta's own Llama 2 SentencePiece tokenizer (from
../shared, never copied into the project) renders Meta's reference chat format token for token; the
tiny GPT-J and Flan-T5 twins reproduce their families' tokenizer conventions."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from llmtune.config.schema import GenerationSection
from llmtune.data.templates import (
    IGNORE,
    ChatTemplate,
    encode_prompt,
    encode_sft_causal,
    install_chat_template,
)
from llmtune.modeling.generate import response_mask, sample
from llmtune.modeling.load import load_for_inference

LLAMA2 = ROOT.parent / "shared" / "tokenizers" / "llama-2" / "tokenizer.model"
LLAMA2_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
B_INST, E_INST, B_SYS, E_SYS = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"

DIALOG = [{"role": "system", "content": "Answer in one short sentence."},
          {"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "Paris is the capital of France."},
          {"role": "user", "content": "And of Italy?"},
          {"role": "assistant", "content": "Rome."}]


@pytest.fixture(scope="module")
def llama2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose tokenizer is Meta's Llama 2 tokenizer, saved as a model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    if not LLAMA2.exists():
        pytest.skip(f"Meta's Llama 2 tokenizer is not at {LLAMA2}")
    assert hashlib.sha256(LLAMA2.read_bytes()).hexdigest() == LLAMA2_SHA256
    src, out = tmp_path_factory.mktemp("llama2-spm"), tmp_path_factory.mktemp("tiny-llama2")
    (src / "tokenizer.model").symlink_to(LLAMA2)
    LlamaTokenizer.from_pretrained(src).save_pretrained(out)
    config = LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def meta_reference(dialog: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Meta's `chat_completion` formatting (llama/generation.py), straight on SentencePiece: (tokens, the
    positions of the answers' tokens, i.e. what SFT trains on)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2))
    if dialog[0]["role"] == "system":
        dialog = [{"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]},
                  *dialog[2:]]
    tokens: list[int] = []
    answer_positions: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        head = sp.encode(f"{B_INST} {prompt['content'].strip()} {E_INST}")
        turn = sp.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ")
        assert turn[:len(head)] == head
        start = len(tokens) + 1 + len(head)
        tokens += [sp.bos_id(), *turn, sp.eos_id()]
        answer_positions += list(range(start, len(tokens)))
    if len(dialog) % 2:
        tokens += [sp.bos_id(), *sp.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}")]
    return tokens, answer_positions


def test_llama2_template_renders_metas_reference_token_for_token(llama2: Path) -> None:
    model, tok, spec = load_for_inference(str(llama2))
    template = ChatTemplate.get("llama2")
    reference, answers = meta_reference(DIALOG)
    enc = encode_sft_causal(tok, template, DIALOG, max_length=512)
    assert enc["input_ids"] == reference
    assert [i for i, label in enumerate(enc["labels"]) if label != IGNORE] == answers
    assert all(enc["labels"][i] == reference[i] for i in answers)
    assert tok.decode([reference[i] for i in answers]) == "Paris is the capital of France. </s> Rome. </s>"

    prompt, _ = meta_reference(DIALOG[:-1])
    assert encode_prompt(tok, template, DIALOG[:-1], 512) == prompt
    assert prompt.count(tok.bos_token_id) == 2 and [1, 1] not in [prompt[i:i + 2] for i in range(len(prompt))]
    # The Jinja version of the template (what llmtune saves with the model) renders Meta's text.
    install_chat_template(tok, template)
    text = tok.apply_chat_template(DIALOG[:-1], tokenize=False, add_generation_prompt=True)
    assert text == "<s>[INST] <<SYS>>\nAnswer in one short sentence.\n<</SYS>>\n\nWhat is the capital of France? " \
        "[/INST] Paris is the capital of France. </s><s>[INST] And of Italy? [/INST]"


def test_llama2_left_truncation_keeps_bos_and_the_answer(llama2: Path) -> None:
    _, tok, _ = load_for_inference(str(llama2))
    template = ChatTemplate.get("llama2")
    full = encode_sft_causal(tok, template, DIALOG, max_length=512)
    short = encode_sft_causal(tok, template, DIALOG, max_length=24)
    assert len(short["input_ids"]) == 24 and short["input_ids"][0] == tok.bos_token_id
    assert short["input_ids"][1] != tok.bos_token_id  # BOS kept once, not doubled
    tail = [t for t in full["labels"] if t != IGNORE][-4:]
    assert [t for t in short["labels"] if t != IGNORE][-4:] == tail  # the final answer survives whole
    assert tok.decode(tail) == "Rome. </s>"
    assert short["input_ids"][-len(tail):] == full["input_ids"][-len(tail):]


def test_llama2_ppo_rollout_prompt_and_response_mask(llama2: Path) -> None:
    model, tok, spec = load_for_inference(str(llama2))
    template = ChatTemplate.get("llama2")
    prompts = [DIALOG[:2], DIALOG[:4]]
    torch.manual_seed(0)
    r = sample(model, tok, template, "causal", prompts, GenerationSection(max_new_tokens=6), 128)
    for row, dialog in enumerate(prompts):
        reference, _ = meta_reference(dialog)
        query = r.query_ids[row][r.query_mask[row].bool()].tolist()
        assert query == reference  # left padding never reaches into the prompt
    assert tok.pad_token_id == tok.eos_token_id == 2  # Llama 2 has no pad token: EOS stands in
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9]])  # EOS, then padding that is also EOS
    mask, ended = response_mask(ids, tok.eos_token_id)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]] and ended.tolist() == [True, False]


def test_gptj_twin_has_gptjs_tokenizer_conventions() -> None:
    """GPT-2 byte BPE, no pad token, <|endoftext|> as BOS = EOS, 50,400 embedding rows > 50,257 tokens;
    and what that means for training: EOS doubles as padding, yet the answer's EOS is still learned."""
    from transformers import AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from llmtune.registry.tiny import materialize

    shipped = AutoTokenizer.from_pretrained(materialize("tiny-gptj"))
    assert len(shipped) == 50257 and shipped.pad_token is None
    assert shipped.bos_token == shipped.eos_token == shipped.unk_token == "<|endoftext|>"
    assert shipped.eos_token_id == 50256 and shipped.backend_tokenizer.model.__class__.__name__ == "BPE"
    text = "Straße, naïve café: 東京 😀\n\nHuman: tabs\tand spaces  "
    assert shipped.decode(shipped(text)["input_ids"]) == text  # bytes: every text round-trips, no UNK

    model, tok, _ = load_for_inference("tiny-gptj")
    assert model.get_input_embeddings().weight.shape[0] == 50400 > len(tok)
    assert tok.pad_token_id == tok.eos_token_id == 50256  # llmtune's loader: EOS stands in for padding
    assert tok.decode([50300, 50399]) == ""  # rows the tokenizer never produces decode to nothing

    template = ChatTemplate.get("hh")
    rows = [encode_sft_causal(tok, template, [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                              64) for q, a in (("Hi", "Hello there."), ("What is the capital of France?", "Paris."))]
    assert all(r["labels"][-1] == 50256 and r["input_ids"].count(50256) == 1 for r in rows)
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(rows)
    short = batch["labels"][0].tolist()
    n = len(rows[0]["input_ids"])
    assert short[n - 1] == 50256 and set(short[n:]) == {-100}  # the EOS learned, the padding after it not
    assert set(batch["input_ids"][0, n:].tolist()) == {50256}


def test_flan_t5_twin_has_t5s_tokenizer_conventions() -> None:
    """SentencePiece (unigram, "▁" word starts), pad = 0 = the decoder start, EOS = 1 appended by the
    tokenizer, no BOS; llmtune's encoder inputs end with that EOS as T5's always did, once."""
    from llmtune.data.templates import encode_prompt_response
    from llmtune.modeling.generate import batch_prompts

    model, tok, spec = load_for_inference("tiny-t5")
    assert tok.backend_tokenizer.model.__class__.__name__ == "Unigram"
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token) == (0, 1, 2, None)
    assert model.config.decoder_start_token_id == model.config.pad_token_id == 0
    ids = tok("What is the capital of France?")["input_ids"]
    assert ids[-1] == 1 and ids.count(1) == 1  # the tokenizer appends EOS itself
    assert tok.convert_ids_to_tokens(ids)[0].startswith("▁")

    template = ChatTemplate.get(spec.template)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    enc = encode_prompt_response(tok, template, prompt, "Paris.", 64, "seq2seq")
    assert enc["input_ids"][-1] == 1 and enc["input_ids"].count(1) == 1
    assert enc["labels"][-1] == 1 and enc["labels"].count(1) == 1 and 0 not in enc["labels"]
    long = encode_prompt_response(tok, template, [{"role": "user", "content": "tell me more " * 40}], "No.", 24,
                                  "seq2seq")
    assert len(long["input_ids"]) <= 24 and long["input_ids"][-1] == 1  # trimmed from the left, EOS kept
    batch = batch_prompts(tok, template, [prompt, [{"role": "user", "content": "Hi"}]], 64, "seq2seq",
                          torch.device("cpu"))
    lengths = batch["attention_mask"].sum(1).tolist()
    assert [batch["input_ids"][i, n - 1].item() for i, n in enumerate(lengths)] == [1, 1]  # right-padded, EOS last
    assert batch["input_ids"][0, :lengths[0]].tolist() == enc["input_ids"]
