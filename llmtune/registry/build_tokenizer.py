"""Regenerate the tokenizer shipped with the built-in tiny models (`llmtune/registry/tokenizer/`).

Offline and deterministic: a byte-level BPE (every byte is representable, so any text
round-trips) trained on the quickstart demo set plus generic English built here from a
seeded generator. The vocabulary is kept small (~2k) so the tiny models stay tiny.

    python -m llmtune.registry.build_tokenizer [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

VOCAB_SIZE = 2000
MODEL_MAX_LENGTH = 1024
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, in this order
DEFAULT_OUT = Path(__file__).with_name("tokenizer")
DEMO = Path(__file__).resolve().parent.parent / "data" / "demo" / "quickstart.jsonl"

# A plain role-tagged template; `{% generation %}` marks assistant text so trainers can
# ask for an assistant-only loss mask (return_assistant_tokens_mask).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>\n{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}\n"
    "{% else %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_SUBJECTS = [
    "The cat",
    "A small dog",
    "My friend",
    "The teacher",
    "Our team",
    "The old man",
    "A young girl",
    "The model",
    "This program",
    "The river",
    "Every student",
    "The weather",
    "Your answer",
    "The library",
    "A good recipe",
    "The computer",
    "Her brother",
    "The garden",
    "The city",
    "We",
]
_VERBS = [
    "likes",
    "needs",
    "finds",
    "reads",
    "writes",
    "sees",
    "makes",
    "opens",
    "moves",
    "keeps",
    "helps",
    "answers",
    "learns",
    "builds",
    "changes",
    "follows",
    "starts",
    "brings",
    "shows",
    "uses",
]
_OBJECTS = [
    "a long letter",
    "the morning news",
    "some fresh bread",
    "the right answer",
    "a new idea",
    "the blue door",
    "three red apples",
    "the last train",
    "a quiet place",
    "the training data",
    "a short story",
    "the next question",
    "warm water",
    "the open window",
    "a simple rule",
    "the final result",
    "many small steps",
    "the whole day",
    "an important message",
    "the old map",
]
_ENDINGS = [
    "today",
    "every day",
    "in the evening",
    "after lunch",
    "before the test",
    "at home",
    "with care",
    "very quickly",
    "without a word",
    "again and again",
    "this week",
    "on Sunday",
]
_EXTRA = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "How vexingly quick daft zebras jump.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 365 1024 2024 3.14 -7 1,000,000",
    "Punctuation: . , ; : ! ? ' \" ( ) [ ] { } < > / \\ | @ # $ % ^ & * - _ + = ~ `",
    "def train(model, data):\n    return model.fit(data)\n",
    "for i in range(10):\n\tprint(i)\n",
    '{"key": "value", "list": [1, 2, 3], "ok": true}',
    "Q: What is the answer? A: The answer is yes.",
    "Email: someone@example.com, URL: https://example.org/path?x=1",
    "Yes. No. Maybe. Thank you! Please. Sorry? Hello, world!",
    "Café, naïve, résumé, Straße, ñandú, 東京, Привет, مرحبا, 😀",
]


_WORDS = """
about above across action after again against age ago agree air all allow almost alone along already also
although always among amount animal another answer any anyone anything appear apply area argue arm around
arrive art article ask attack attention author available away baby back bad bag ball bank base be beat
beautiful because become bed before begin behind believe best better between beyond big bill black blood
board body book born both box boy break bring brother budget build building business but buy call camera
campaign can cancer candidate capital car card care career carry case catch cause center central century
certain chair challenge chance change character charge check child choice choose church citizen city civil
claim class clear close coach cold collection college color come common community company compare computer
concern condition conference consider consumer contain continue control cost could country couple course
court cover create crime cultural culture cup current customer cut dark data daughter day dead deal death
debate decade decide decision deep defense degree democrat describe design despite detail determine develop
difference different difficult dinner direction director discover discuss disease do doctor door down draw
dream drive drop drug during each early east easy eat economic economy edge education effect effort eight
either election else employee end energy enjoy enough enter entire environment especially establish even
evening event ever every everybody everyone everything evidence exactly example executive exist expect
experience expert explain eye face fact factor fail fall family far fast father fear federal feel feeling
few field fight figure fill film final finally financial find fine finger finish fire firm first fish five
floor fly focus follow food foot force foreign forget form former forward four free friend from front full
fund future game garden gas general generation get girl give glass go goal good government great green
ground group grow growth guess gun guy hair half hand hang happen happy hard have he head health hear heart
heat heavy help her here herself high him himself his history hit hold home hope hospital hot hotel hour
house how however huge human hundred husband idea identify if image imagine impact important improve include
including increase indeed indicate individual industry information inside instead institution interest
interesting international interview into investment involve issue item its itself job join just keep key
kid kill kind kitchen know knowledge land language large last late later laugh law lawyer lay lead leader
learn least leave left leg legal less let letter level lie life light like likely line list listen little
live local long look lose loss lot love low machine magazine main maintain major majority make man manage
management manager many market marriage material matter may maybe me mean measure media medical meet meeting
member memory mention message method middle might military million mind minute miss mission model modern
moment money month more morning most mother mouth move movement movie much music must myself name nation
national natural nature near nearly necessary need network never new news newspaper next nice night no none
nor north not note nothing notice now number occur of off offer office officer official often oil ok old
on once one only onto open operation opportunity option or order organization other others our out outside
over own owner page pain painting paper parent part participant particular particularly partner party pass
past patient pattern pay peace people per perform performance perhaps period person personal phone physical
pick picture piece place plan plant play player point police policy political politics poor popular
population position positive possible power practice prepare present president pressure pretty prevent
price private probably problem process produce product production professional professor program project
property protect prove provide public pull purpose push put quality question quickly quite race radio raise
range rate rather reach read ready real reality realize really reason receive recent recently recognize
record red reduce reflect region relate relationship religious remain remember remove report represent
require research resource respond response rest result return reveal rich right rise risk road rock role
room rule run safe same save say scene school science scientist score sea season seat second section
security see seek seem sell send senior sense series serious serve service set seven several shake share
she shoot short shot should shoulder show side sign significant similar simple simply since sing single
sister sit site situation six size skill skin small smile so social society soldier some somebody someone
something sometimes son song soon sort sound source south southern space speak special specific speech
spend sport spring staff stage stand standard star start state statement station stay step still stock
stop store story strategy street strong structure student study stuff style subject success successful
such suddenly suffer suggest summer support sure surface system table take talk task tax teach teacher
team technology television tell ten tend term test than thank that the their them themselves then theory
there these they thing think third this those though thought thousand threat three through throughout throw
thus time to today together tonight too top total tough toward town trade traditional training travel treat
treatment tree trial trip trouble true truth try turn two type under understand unit until up upon us use
usually value various very victim view violence visit voice vote wait walk wall want war watch water way
we weapon wear week weight well west western what whatever when where whether which while white who whole
whom whose why wide wife will win wind window wish with within without woman wonder word work worker world
worry would write writer wrong yard yeah year yes yet you young your yourself
""".split()


def english_lines(n: int = 600, seed: int = 7) -> list[str]:
    """Generic, seeded English so the BPE learns common words beyond the demo set."""
    rng = random.Random(seed)
    lines = list(_EXTRA)
    for i in range(n):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."
        if rng.random() < 0.3:
            s += f" Then {rng.choice(_SUBJECTS).lower()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
        lines.append(s)
        words = rng.sample(_WORDS, rng.randint(6, 14))
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ","]))
        if i % 3 == 0:
            lines.append(" ".join(w.capitalize() if rng.random() < 0.5 else w for w in rng.sample(_WORDS, 8)))
    return lines


def corpus(demo: Path = DEMO) -> Iterator[str]:
    """Training text: demo messages (also rendered with the chat tags) and generic English."""
    with open(demo, encoding="utf-8") as f:
        for line in f:
            for m in json.loads(line)["messages"]:
                yield m["content"]
                yield f"<|{m['role']}|>\n{m['content']}\n"
    yield from english_lines()


def build(out: Path = DEFAULT_OUT, demo: Path = DEMO) -> Path:
    """Train and save a PreTrainedTokenizerFast directory; identical bytes on every run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus(demo)), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # Name the class transformers 4.x also knows (v5 maps it to TokenizersBackend), and
    # write special_tokens_map.json, which v5 no longer emits but older loaders read.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = p.parse_args(argv)
    print(build(args.out))


if __name__ == "__main__":
    main()
