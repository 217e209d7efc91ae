"""Built-in tiny models, their shipped tokenizer, and the quickstart demo dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmtune.registry.tiny import MARKER_FILE, TINY_MODELS, TOKENIZER_DIR, is_tiny, materialize

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "llmtune" / "data" / "demo" / "quickstart.jsonl"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Materialize every tiny model once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: materialize(name, root) for name in TINY_MODELS}


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_materialize_loads_with_auto_classes_and_generates(built: dict[str, Path], name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = built[name]
    assert path.name == name and (path / "model.safetensors").is_file()
    assert json.loads((path / MARKER_FILE).read_text())["llmtune_tiny"] == name
    spec = TINY_MODELS[name]
    auto = AutoModelForSeq2SeqLM if spec["task"] == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == spec["architecture"]
    # The family's own conventions (tests/test_tokenizers.py checks each in depth).
    expected = {"tiny-llama": (len(tok), 0, 1, 2), "tiny-gptj": (50400, None, 50256, 50256),
                "tiny-t5": (len(tok), 0, None, 1)}[name]
    c = model.config
    assert (c.vocab_size, c.pad_token_id, c.bos_token_id, c.eos_token_id) == expected
    if spec["task"] == "seq2seq":
        assert model.config.decoder_start_token_id == 0
        assert model.config.feed_forward_proj == "gated-gelu"
        # transformers 5 always ties T5's lm_head and maps tie_word_embeddings=False to
        # "no decoder-output scaling" (the T5 v1.1 / Flan-T5 behaviour); 4.x keeps the flag.
        cfg = model.config
        assert getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings) is False
    else:
        assert not model.config.tie_word_embeddings
        assert (
            model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
        )
    enc = tok("What is 7 plus 5?", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    prompt_len = 0 if spec["task"] == "seq2seq" else enc["input_ids"].shape[1]
    assert out.shape[1] >= prompt_len + 4
    assert isinstance(tok.decode(out[0], skip_special_tokens=True), str)


def test_materialize_is_deterministic_and_cached(built: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    name = "tiny-llama"
    again = materialize(name, tmp_path)
    a, b = load_file(built[name] / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert materialize(name, tmp_path) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_cached_materialize_does_not_import_torch(built: dict[str, Path]) -> None:
    root = built["tiny-t5"].parent
    code = (
        "import sys; from pathlib import Path; from llmtune.registry.tiny import materialize; "
        f"p = materialize('tiny-t5', Path({str(root)!r})); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(p)"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(built["tiny-t5"])


def test_incomplete_build_is_replaced(tmp_path: Path) -> None:
    partial = tmp_path / "tiny-gptj"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    path = materialize("tiny-gptj", tmp_path)
    assert (path / MARKER_FILE).is_file() and (path / "model.safetensors").is_file()


def test_is_tiny_and_unknown_name(tmp_path: Path) -> None:
    from llmtune.errors import ConfigError

    assert is_tiny("tiny-llama") and is_tiny("tiny-t5") and not is_tiny("gpt2")
    with pytest.raises(ConfigError, match="tiny-llama"):
        materialize("tiny-lama", tmp_path)


def test_tokenizer_special_ids_and_unicode_round_trip() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert [tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert 1500 <= len(tok) <= 2500 and tok.model_max_length == 1024
    for s in [
        "What is 7 plus 5?",
        "  leading and trailing  ",
        "Straße, naïve café: 東京 😀 \u200b\x00\x7f",
        "tabs\tand\nnewlines\r\n",
        "مرحبا بالعالم",
        "def f(x):\n    return x ** 2  # ok",
    ]:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == s
    size = sum(f.stat().st_size for f in TOKENIZER_DIR.iterdir())
    assert size < 1_000_000


def test_tokenizer_chat_template_marks_assistant_tokens() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    msgs = [
        {"role": "user", "content": "Say hello to Anna."},
        {"role": "assistant", "content": "Hello, Anna!"},
    ]
    out = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello, Anna!</s>"


def test_build_tokenizer_is_deterministic(tmp_path: Path) -> None:
    from llmtune.registry.build_tokenizer import build

    out = build(tmp_path / "tok")
    shipped = sorted(f.name for f in TOKENIZER_DIR.iterdir())
    assert sorted(f.name for f in out.iterdir()) == shipped
    for name in shipped:
        assert (out / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name


def test_demo_dataset_rows_are_well_formed() -> None:
    rows = [json.loads(line) for line in DEMO.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 250
    multi = system = 0
    for row in rows:
        msgs = row["messages"]
        roles = [m["role"] for m in msgs]
        if roles[0] == "system":
            system += 1
            roles = roles[1:]
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2), roles
        assert all(isinstance(m["content"], str) and m["content"] for m in msgs)
        multi += len(roles) > 2
    assert multi >= 10 and system >= 10


def test_make_quickstart_regenerates_identically(tmp_path: Path) -> None:
    out = tmp_path / "q.jsonl"
    script = REPO / "llmtune" / "data" / "demo" / "make_quickstart.py"
    subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, capture_output=True)
    assert out.read_bytes() == DEMO.read_bytes()
