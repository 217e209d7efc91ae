"""Data layer on real files: raw fixtures in each hub dataset's own format, plus the real HH sample
(and the recipe checks of data entries, which live in the schema)."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from llmtune.config.load import recipe_from_dict
from llmtune.data.converters import CONVERTERS, render_hh
from llmtune.data.load import load_mixture, load_rows, preview
from llmtune.data.raw import read_records
from llmtune.data.registry import FORMATS, PACKAGE_DIR, get_entry, list_entries
from llmtune.errors import ConfigError, DataError

RAW = Path(__file__).parent / "fixtures" / "raw"
HH_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared/data/hh-harmless-sample.jsonl.gz"


def u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def raw_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- registry -----------------------------------------------------------------------------------


def test_registry_entries_and_packaged_symlink() -> None:
    entries = list_entries()
    assert {"hh", "shp", "dolly", "oasst", "demo"} <= entries.keys()
    assert entries["hh"].hub_id == "Anthropic/hh-rlhf" and entries["hh"].splits == {
        "train": "train",
        "test": "test",
    }
    assert "red-team-attempts" not in entries["hh"].subsets
    assert entries["shp"].options == {"min_score_ratio": None}
    assert entries["oasst"].options == {"lang": None}
    assert entries["dolly"].splits == {"train": "train"}
    assert all(e.format in FORMATS and set(CONVERTERS) == FORMATS for e in entries.values())
    packaged = PACKAGE_DIR / "data" / "data_registry.json"
    assert packaged.is_symlink() and json.loads(packaged.read_text()).keys() == entries.keys()


def test_unknown_dataset_suggests_near_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown dataset 'dolyy'.*did you mean 'dolly'"):
        get_entry("dolyy")


def test_user_registry_from_env_adds_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "qa.csv").write_text((RAW / "columns" / "qa.csv").read_text())
    reg = tmp_path / "my_registry.json"
    reg.write_text(
        json.dumps(
            {
                "myqa": {
                    "path": "qa.csv",
                    "format": "columns",
                    "shapes": ["sft", "prompt"],
                    "options": {"columns": {"prompt": "q", "response": "good"}},
                },
                "dolly": {"hub_id": "me/dolly-fork", "format": "dolly", "shapes": ["sft"]},
            }
        )
    )
    monkeypatch.setenv("LLMTUNE_DATA_REGISTRY", str(reg))
    assert get_entry("dolly").hub_id == "me/dolly-fork"
    rows = load_rows("myqa", None, shape="sft").rows  # path resolved relative to the registry file
    assert rows[0]["messages"] == [u("What is 3 times 4?"), a("12")]
    reg.write_text("{broken")
    with pytest.raises(ConfigError, match="my_registry.json"):
        list_entries()


def test_package_prefix_resolves_inside_package() -> None:
    entry = get_entry("demo")
    assert entry.path == "package:data/demo/quickstart.jsonl" and entry.format == "canonical"
    rows = preview("demo", None, n=2)
    assert len(rows) == 2 and all(r["messages"][-1]["role"] == "assistant" for r in rows)


# --- raw readers -------------------------------------------------------------------------------


def test_read_records_formats_and_errors(tmp_path: Path) -> None:
    (tmp_path / "rows.json").write_text(json.dumps({"data": [{"x": 1}, {"x": 2}]}))
    with gzip.open(tmp_path / "more.jsonl.gz", "wt") as f:
        f.write('{"x": 3}\n')
    records = list(read_records(tmp_path))
    assert [(Path(s).name, n, r["x"]) for s, n, r in records] == [
        ("more.jsonl.gz", 1, 3),
        ("rows.json", 1, 1),
        ("rows.json", 2, 2),
    ]
    with pytest.raises(DataError, match="not found"):
        list(read_records(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unsupported.*\.parquet"):
        list(read_records(tmp_path / "x.txt"))


def test_directory_split_picks_named_files() -> None:
    train = load_rows("hh", str(RAW / "hh"), shape="preference").rows
    test = load_rows("hh", str(RAW / "hh"), split="test", shape="preference").rows
    assert len(train) == 3 and len(test) == 1 and test[0]["chosen"] == [a("Usually blue in daylight.")]
    with pytest.raises(DataError, match="no 'validation' split"):
        load_rows("hh", str(RAW / "hh" / "train.jsonl"), split="validation", shape="sft")
    with pytest.raises(DataError, match="no files named validation"):
        load_rows("hh", str(RAW / "hh"), split="validation", shape="sft")


def test_parquet_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["Why?"], "answer": ["Because."]}), tmp_path / "t.parquet")
    rows = load_rows(
        None, str(tmp_path / "t.parquet"), shape=None, columns={"prompt": "question", "response": "answer"}
    ).rows
    assert rows == [{"messages": [u("Why?"), a("Because.")]}]


def test_hub_offline_points_to_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="set `path:`"):
        load_rows("dolly", None, shape="sft")


# --- converters --------------------------------------------------------------------------------


def test_hh_single_multi_turn_and_round_trip() -> None:
    path = RAW / "hh" / "train.jsonl"
    rows = load_rows("hh", str(path), shape="preference").rows
    assert rows[0] == {
        "prompt": [u("How do I boil an egg?")],
        "chosen": [a("Put it in boiling water for nine minutes.")],
        "rejected": [a("Eggs are overrated.")],
    }
    assert rows[1]["prompt"] == [u("Name a prime number."), a("Seven."), u("And a bigger one?")]
    assert rows[1]["chosen"] == [a("Eleven is the next prime after seven.")] and rows[1]["rejected"] == [
        a("Nine.")
    ]
    assert rows[2]["chosen"] == [a("")]  # empty replies exist in real HH; kept since they round-trip
    for row, raw in zip(rows, raw_rows(path)):
        assert render_hh(row["prompt"] + row["chosen"]) == raw["chosen"]
        assert render_hh(row["prompt"] + row["rejected"]) == raw["rejected"]


def test_hh_final_assistant_tag_without_space_is_an_empty_reply(tmp_path: Path) -> None:
    """Real HH transcripts may end in "\\n\\nAssistant:" with no trailing space: the pair is kept with an
    empty reply instead of being dropped as malformed."""
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": "\n\nHuman: Tell me a secret.\n\nAssistant:",
                                "rejected": "\n\nHuman: Tell me a secret.\n\nAssistant: Your password is 1234."}) + "\n")
    loaded = load_rows("hh", str(path), shape="preference")
    assert loaded.report.failed == 0
    assert loaded.rows == [{"prompt": [u("Tell me a secret.")], "chosen": [a("")],
                            "rejected": [a("Your password is 1234.")]}]


def test_hh_shape_derivation_and_subset_source() -> None:
    path = str(RAW / "hh" / "train.jsonl")
    sft = load_rows("hh", path, shape="sft", subset="helpful-base").rows
    assert sft[1]["messages"][-2:] == [u("And a bigger one?"), a("Eleven is the next prime after seven.")]
    assert sft[1]["source"] == "helpful-base"
    prompts = load_rows("hh", path, shape="prompt").rows
    assert prompts[1] == {"prompt": [u("Name a prime number."), a("Seven."), u("And a bigger one?")]}
    with pytest.raises(ConfigError, match=r"data\.subset: unknown subset 'harmles-base'.*harmless-base"):
        recipe_from_dict({"stage": "sft", "model": {"name": "tiny-llama"},
                          "data": {"name": "hh", "path": path, "subset": "harmles-base"}})


def test_shp_label_order_source_and_filter() -> None:
    path = str(RAW / "shp" / "train.jsonl")
    rows = load_rows("shp", path, shape="preference").rows
    assert rows[0]["chosen"] == [a("Your dough probably needs a longer proof.")]  # labels=1: A preferred
    assert rows[0]["rejected"] == [a("Buy bread instead.")]
    assert rows[1]["chosen"] == [a("Rayleigh scattering favours short wavelengths.")]  # labels=0: B preferred
    assert rows[1]["prompt"] == [u("Why is the sky blue?")] and rows[1]["source"] == "askphysics_train"
    result = load_rows("shp", path, shape="preference", options={"min_score_ratio": 2.0})
    assert len(result.rows) == 2 and result.report.filtered == 1 and result.report.failed == 0
    with pytest.raises(ConfigError, match=r"data\.options\.min_score: unknown option 'min_score'.*min_score_ratio"):
        recipe_from_dict({"stage": "rm", "model": {"name": "tiny-llama"},
                          "data": {"name": "shp", "path": path, "options": {"min_score": 2}}})


def test_dolly_context_and_no_preference() -> None:
    path = str(RAW / "dolly" / "train.jsonl")
    rows = load_rows("dolly", path, shape="sft").rows
    assert rows[0] == {
        "messages": [u("What is a haiku?"), a("A short poem of three lines with 5, 7 and 5 syllables.")],
        "source": "open_qa",
    }
    assert rows[1]["messages"][0] == u(
        "How tall is the tower?\n\nThe Blue Tower is a 120 metre radio mast built in 1961."
    )
    assert load_rows("dolly", path, shape="prompt").rows[1]["prompt"] == [rows[1]["messages"][0]]
    with pytest.raises(ConfigError, match=r"data\.name: dataset 'dolly' cannot give preference rows"):
        recipe_from_dict({"stage": "dpo", "model": {"name": "tiny-llama"}, "data": {"name": "dolly", "path": path}})
    with pytest.raises(DataError, match="cannot become 'preference'"):
        load_rows(None, path, format="dolly", shape="preference")


def test_oasst_tree_paths_pairs_and_drops() -> None:
    path = str(RAW / "oasst" / "train.jsonl")
    sft = load_rows("oasst", path, shape="sft")
    assert [r["messages"] for r in sft.rows] == [
        [
            u("Explain photosynthesis."),
            a("Plants turn light, water and CO2 into sugar."),
            u("Where does the oxygen come from?"),
            a("From splitting water molecules."),
        ],
        [u("Wie spät ist es?"), a("Ich kenne die Uhrzeit nicht.")],
    ]
    assert [r["source"] for r in sft.rows] == ["en", "de"]
    assert sft.report.failed == 1 and "orphan: parent gone-0000" in str(sft.report.errors[0])
    assert sft.report.errors[0].line == 15
    assert sft.report.filtered == 2  # the deleted reply and the follow-up under it

    pairs = load_rows("oasst", path, shape="preference").rows
    assert pairs == [
        {
            "prompt": [u("Explain photosynthesis.")],
            "chosen": [a("Plants turn light, water and CO2 into sugar.")],
            "rejected": [a("No idea.")],
            "source": "en",
        },
        {
            "prompt": [
                u("Explain photosynthesis."),
                a("It is how plants eat sunlight."),
                u("Can you say more?"),
            ],
            "chosen": [a("Chlorophyll absorbs red and blue light.")],
            "rejected": [a("Not really.")],
            "source": "en",
        },
    ]
    prompts = load_rows("oasst", path, shape="prompt", options={"lang": "en"})
    assert [r["prompt"][-1]["content"] for r in prompts.rows] == [
        "Explain photosynthesis.",
        "Where does the oxygen come from?",
        "Thanks!",
        "Can you say more?",
    ]
    assert prompts.report.filtered == 4


def test_oasst_keeps_what_the_official_loader_keeps() -> None:
    """As OpenAssistant's load_oasst_export: only ready_for_export trees, only prompts that passed review,
    no synthetic messages; the rest is counted as filtered, not silently trained on."""
    path = RAW / "oasst-export" / "train.jsonl"
    loaded = load_rows("oasst", str(path), shape="sft")
    assert [r["messages"] for r in loaded.rows] == [[u("Name a primary colour."), a("Red is a primary colour.")]]
    assert loaded.report.failed == 0 and loaded.report.filtered == 7
    _, errors = CONVERTERS["oasst"].convert(read_records(path), "sft", {})
    reasons = [e.reason for e in errors]
    assert all(e.filtered for e in errors) and len(reasons) == 7, reasons
    assert "synthetic message" in reasons and "tree_state 'growing' is not ready_for_export" in reasons
    assert "prompt review_result is False" in reasons and "prompt review_result is None" in reasons
    pairs, _ = CONVERTERS["oasst"].convert(read_records(path), "preference", {})
    assert pairs == []  # the synthetic reply was the only other ranked one


def test_canonical_detects_shapes_and_derives() -> None:
    path = str(RAW / "canonical" / "mixed.jsonl")
    native = load_rows(None, path, shape=None).rows
    assert native[0]["source"] == "greetings" and native[0]["messages"][0] == {
        "role": "system",
        "content": "Be brief.",
    }
    assert native[1]["chosen"] == [a("4")] and native[2] == {"prompt": [u("Tell me a joke.")]}
    prompts = load_rows(None, path, shape="prompt").rows
    assert [p["prompt"][-1]["content"] for p in prompts] == ["Hi", "2+2?", "Tell me a joke."]
    sft = load_rows(None, path, shape="sft")
    assert [r["messages"][-1] for r in sft.rows] == [a("Hello."), a("4")]
    assert sft.report.failed == 1 and "prompt row cannot become a sft row" in str(sft.report.errors[0])


def test_columns_csv_sft_with_system_and_preference() -> None:
    path = str(RAW / "columns" / "qa.csv")
    sft = load_rows(
        None, path, shape="sft", columns={"prompt": "q", "response": "good", "system": "sys"}
    ).rows
    assert sft[0]["messages"] == [
        {"role": "system", "content": "You are a calculator."},
        u("What is 3 times 4?"),
        a("12"),
    ]
    assert sft[1]["messages"] == [u('Spell "cat" backwards.'), a("tac")]
    pref = preview(None, path, n=1, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert pref == [{"prompt": [u("What is 3 times 4?")], "chosen": [a("12")], "rejected": [a("7")]}]
    with pytest.raises(ConfigError, match="unknown column role 'answer'.*response"):
        load_rows(None, path, shape="sft", columns={"prompt": "q", "answer": "good"})


# --- reports, failures, mixing ------------------------------------------------------------------


def test_bad_rows_reported_with_file_and_line(caplog: pytest.LogCaptureFixture) -> None:
    path = RAW / "canonical" / "some_bad.jsonl"
    with caplog.at_level(logging.WARNING, logger="llmtune.data"):
        result = load_rows(None, str(path), shape="sft")
    report = result.report
    assert (report.read, report.converted, report.failed) == (6, 4, 2)
    assert f"{path}:5: invalid JSON" in report.summary() and f"{path}:6: 'messages'[0]" in report.summary()
    assert "failed 2" in caplog.text


def test_mostly_bad_file_raises() -> None:
    with pytest.raises(DataError, match=r"(?s)more than half.*mostly_bad.jsonl:2: invalid JSON"):
        load_rows(None, str(RAW / "canonical" / "mostly_bad.jsonl"), shape="sft")


def test_num_samples_takes_first_rows_in_file_order() -> None:
    result = load_rows("shp", str(RAW / "shp" / "train.jsonl"), shape="sft", num_samples=2)
    assert [r["source"] for r in result.rows] == ["askculinary_train", "askphysics_train"]
    assert (result.report.converted, result.report.kept) == (3, 2)


def test_mixture_weights_eval_fraction_deterministic(tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_text(
        "".join(json.dumps({"messages": [u(f"q{i}"), a(f"r{i}")], "source": "big"}) + "\n" for i in range(40))
    )
    specs = [
        {"path": str(big), "weight": 0.5, "eval_fraction": 0.25},
        {"name": "dolly", "path": str(RAW / "dolly" / "train.jsonl"), "weight": 2.5},
    ]
    train, evals = load_mixture(specs, shape="sft", seed=3)
    assert len(evals) == 10 and all(r["source"] == "big" for r in evals)
    assert sum(r["source"] == "big" for r in train) == 15  # round(0.5 * 30)
    assert sum(r["source"] != "big" for r in train) == 5  # round(2.5 * 2): two copies + one sampled
    held = {r["messages"][0]["content"] for r in evals}
    assert not held & {r["messages"][0]["content"] for r in train}
    assert load_mixture(specs, shape="sft", seed=3) == (train, evals)
    assert load_mixture(specs, shape="sft", seed=4)[0] != train


def test_mixture_eval_split_and_bad_keys() -> None:
    train, evals = load_mixture(
        [{"name": "hh", "path": str(RAW / "hh")}], shape="preference", eval_split="test"
    )
    assert len(train) == 3 and [r["chosen"] for r in evals] == [[a("Usually blue in daylight.")]]
    with pytest.raises(ConfigError, match=r"data\.datasets\[0\]\.wieght: unknown key.*weight"):
        recipe_from_dict({"stage": "sft", "model": {"name": "tiny-llama"},
                          "data": {"datasets": [{"name": "hh", "wieght": 2}]}})


def test_real_hh_sample_converts_and_round_trips() -> None:
    if not HH_SAMPLE.is_file():
        pytest.skip(f"real HH sample not found at {HH_SAMPLE} (CI keeps ../shared beside the repo)")
    result = load_rows("hh", str(HH_SAMPLE), shape="preference")
    raw = [json.loads(line) for line in gzip.open(HH_SAMPLE, "rt", encoding="utf-8")]
    assert len(raw) == 1800 and result.report.read == 1800
    assert len(result.rows) == 1800 and result.report.failed == 0
    for row, src in zip(result.rows, raw):
        assert row["prompt"][-1]["role"] == "user"
        assert render_hh(row["prompt"] + row["chosen"]) == src["chosen"]
        assert render_hh(row["prompt"] + row["rejected"]) == src["rejected"]
