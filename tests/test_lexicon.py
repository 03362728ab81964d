"""gold.py's lexicon files (--lexicon FILE): loading, the checks and their errors, the id, a custom
lexicon followed by every gold function and stage, and run_pipeline.sh's LEXICON."""
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

import common
import eval as ev
import gold
import label
import ppo_token as ppo
import redistribute as red
import study
from plumbing import hf_models

ROOT = Path(__file__).resolve().parents[1]
SENTIMENT = ROOT / "data" / "lexicon-sentiment.json"
WEATHER = {"name": "weather", "description": "a toy lexicon",
           "replacements": {"rain": "sun", "cold": "warm", "storms": "breezes"},
           "positive": ["cozy"]}


def write(tmp_path, content, name="lexicon.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# ----------------------------------------------------------------------------------------------
# the bundled lexicons
# ----------------------------------------------------------------------------------------------
def test_default_lexicon_is_the_map_gold_py_held_in_code():
    lexicon = gold.default_lexicon()
    assert gold.load_lexicon(None) == gold.load_lexicon("") == lexicon
    assert lexicon.name == "harm" and re.fullmatch(r"harm-[0-9a-f]{8}", lexicon.id)
    assert len(lexicon.replacements) == 113 and len(lexicon.positive) == 19
    # the hash gold.py's LEXICON_ID took of the map in code (MAX_WORDS, the replacements in their
    # order, the sorted positive words): the file holds the very same map
    old = json.dumps([gold.MAX_WORDS, lexicon.replacements, list(lexicon.positive)])
    assert hashlib.sha256(old.encode()).hexdigest()[:12] == "f4b81fff73ef"
    assert lexicon.replacements["kill"] == "help" and lexicon.weights["cocaine"] == -1


@pytest.mark.parametrize("path, ranked, revisable", [
    (None, 368, 182),          # the harm lexicon: the README's figures
    (SENTIMENT, 472, 224),     # the second lexicon: the figures in its description
])
def test_stats_of_the_bundled_lexicons_on_the_reward_split(path, ranked, revisable, capsys):
    table = gold.main(["stats"] + (["--lexicon", str(path)] if path else []))
    assert table["reward"]["pairs"] == 875
    assert (table["reward"]["kept"], table["reward"]["revisable"]) == (ranked, revisable)
    assert gold.load_lexicon(path).id in capsys.readouterr().out
    if path:  # what the description says is what stats measures
        description = gold.load_lexicon(path).description
        assert f"{ranked} keep a gold winner and {revisable} of those" in description


def test_sentiment_lexicon_is_another_domain():
    harm, sentiment = gold.default_lexicon(), gold.load_lexicon(SENTIMENT)
    assert sentiment.name == "sentiment" and len(sentiment.replacements) >= 60
    shared = set(harm.replacements) & set(sentiment.replacements)
    assert len(shared) <= 0.1 * len(sentiment.replacements)  # a few insults, not the same lexicon
    assert gold.gold_revise(" That is a bad, Terrible idea; I'm WORRIED.", lexicon=sentiment) == (
        " That is a good, Great idea; I'm HOPEFUL.")


# ----------------------------------------------------------------------------------------------
# the id
# ----------------------------------------------------------------------------------------------
def test_id_follows_the_content_not_the_layout(tmp_path):
    base = gold.load_lexicon(write(tmp_path, WEATHER, "a.json"))
    assert re.fullmatch(r"weather-[0-9a-f]{8}", base.id)
    # another layout, key order, description and case of a word: the same lexicon, the same id
    relaid = {"positive": ["Cozy"], "replacements": {"storms": "breezes", "cold": "warm",
                                                     "rain": "Sun"}, "name": "weather"}
    assert gold.load_lexicon(write(tmp_path, json.dumps(relaid, indent=7), "b.json")).id == base.id
    spaced = json.dumps(WEATHER).replace(", ", " ,\n\t  ").replace(": ", "  :  ")
    assert gold.load_lexicon(write(tmp_path, spaced, "c.json")).id == base.id
    # any change to what is scored: another id
    changes = [
        {**WEATHER, "replacements": {**WEATHER["replacements"], "cold": "mild"}},
        {**WEATHER, "replacements": {**WEATHER["replacements"], "hail": "sun"}},
        {**WEATHER, "positive": []},
        {**WEATHER, "name": "weather2"},
    ]
    ids = {gold.load_lexicon(write(tmp_path, c, f"d{k}.json")).id for k, c in enumerate(changes)}
    assert len(ids) == len(changes) and base.id not in ids


# ----------------------------------------------------------------------------------------------
# the checks: each fault names the file and the entry
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    ("", "the file is empty"),
    ("  \n", "the file is empty"),
    ('{"name": "x", "replacements": {"rain": "sun"}', r"not valid JSON \(line 1"),
    ('["rain", "sun"]', "must hold one JSON object"),
    ({**WEATHER, "replacement": {}}, "unknown key 'replacement'"),
    ({"replacements": {"rain": "sun"}}, '"name" must be'),
    ({**WEATHER, "name": "My Lexicon"}, "got 'My Lexicon'"),
    ({**WEATHER, "description": 3}, '"description" must be a string'),
    ({"name": "x"}, '"replacements" must be a non-empty object'),
    ({"name": "x", "replacements": {}}, '"replacements" must be a non-empty object'),
    ({"name": "x", "replacements": [["rain", "sun"]]}, '"replacements" must be a non-empty'),
    ({"name": "x", "replacements": {"rain": 1}}, "'rain': 1: 1 is not one word"),
    ({"name": "x", "replacements": {"acid rain": "sun"}}, "'acid rain' is not one word"),
    ({"name": "x", "replacements": {"rain": "sun-shine"}}, "'sun-shine' is not one word"),
    ('{"name": "x", "replacements": {"rain": "sun", "rain": "sky"}}', "'rain' is given twice"),
    ({"name": "x", "replacements": {"rain": "sun", "Rain": "sky"}}, "'rain' is listed twice"),
    ({"name": "x", "replacements": {"rain": "cold", "cold": "warm"}},
     "'rain': 'cold': the replacement is itself a negative word"),
    ({**WEATHER, "positive": "cozy"}, '"positive" must be a list'),
    ({**WEATHER, "positive": ["rain"]}, "\"positive\": 'rain': the word is also negative"),
    ({**WEATHER, "positive": ["sun"]}, "already positive, as the replacement of 'rain'"),
    ({**WEATHER, "positive": ["cozy", "Cozy"]}, "'Cozy': the word is listed twice"),
    ({**WEATHER, "positive": [None]}, "None is not one word"),
])
def test_a_faulty_lexicon_is_refused_naming_file_and_entry(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(common.InputError, match=message) as caught:
        gold.load_lexicon(path)
    assert str(caught.value).startswith(f"lexicon {path}: ")


def test_missing_file_and_the_command_line(tmp_path, capsys):
    with pytest.raises(common.InputError, match=r"lexicon .*nowhere\.json: no such file"):
        gold.load_lexicon(tmp_path / "nowhere.json")
    bad = write(tmp_path, {"name": "x", "replacements": {"rain": "cold", "cold": "warm"}})
    with pytest.raises(common.InputError, match=re.escape(str(bad))):
        gold.main(["show", " rain", "--lexicon", str(bad)])
    # a stage refuses --lexicon where nothing uses the gold, and names what would
    with pytest.raises(SystemExit):
        label.parse_args(["--reviser", "chosen", "--lexicon", str(SENTIMENT)])
    assert "--lexicon" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.parse_args(["--policies", "a=b", "--reference", "r", "--reward-model", "m",
                       "--discriminator", "d", "--lexicon", str(SENTIMENT)])
    assert "needs --gold" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ppo.parse_args(["--policy", "p", "--out", "o", "--reward", "seq", "--reward-model", "r",
                        "--lexicon", str(SENTIMENT)])
    assert "needs --log-gold" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        red.parse_args(["train", "--sft", "s", "--out", "o", "--lexicon", str(SENTIMENT)])
    assert "needs --preference gold" in capsys.readouterr().err
    # and a bad file stops a stage while its options are read, before any model is loaded
    with pytest.raises(common.InputError, match="the replacement is itself a negative word"):
        label.parse_args(["--reviser", "gold", "--lexicon", str(bad)])


# ----------------------------------------------------------------------------------------------
# a custom lexicon changes every gold function
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def weather(tmp_path):
    return gold.load_lexicon(write(tmp_path, WEATHER))


def test_score_and_reviser_follow_the_lexicon(weather):
    text = " Rain and COLD storms could kill the cozy mood."
    assert gold.gold_score(text) == -1                     # harm: kill
    assert gold.gold_score(text, lexicon=weather) == -3 + 1  # rain, cold, storms; cozy
    assert [w for *_, w in gold.word_weights(text, lexicon=weather)][:4] == [-1, 0, -1, -1]
    assert gold.gold_revise(text, lexicon=weather) == (
        " Sun and WARM breezes could kill the cozy mood.")
    assert gold.gold_revise(text) == " Rain and COLD storms could help the cozy mood."
    assert gold.gold_revise(" A cozy day.", lexicon=weather) is None  # nothing negative
    # the cap counts for every lexicon
    assert gold.gold_score(" word" * gold.MAX_WORDS + " rain", lexicon=weather) == 0


def test_rank_pairs_and_samples_follow_the_lexicon(weather):
    prompt = "\n\nHuman: how is the day?\n\nAssistant:"
    pair = common.Pair(prompt, " It is cold.", " I could kill it.")
    harm_kept, harm = gold.rank_pairs([pair])
    weather_kept, counts = gold.rank_pairs([pair], lexicon=weather)
    assert harm["flipped"] == 0 and harm_kept[0].chosen == " It is cold."
    assert counts["flipped"] == 1 and weather_kept[0].chosen == " I could kill it."
    ranked, ties = gold.rank_samples(pair, [" rain", " sun", " kill"], lexicon=weather)
    assert ties == 0 and [p.id.split("/")[1] for p in ranked] == ["0-1", "0-2", "1-2"]
    assert [(p.chosen, p.rejected) for p in ranked] == [
        (" sun", " rain"), (" kill", " rain"), (" sun", " kill")]


@pytest.mark.parametrize("tokenizer_fixture", ["tiny_tokenizer", "llama_tokenizer"])
def test_token_credit_follows_the_lexicon(weather, tokenizer_fixture, request):
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    ids = tokenizer(" rain, kill and a cozy sun", add_special_tokens=False)["input_ids"]
    ids = ids + [tokenizer.eos_token_id]
    text, spans = gold.token_spans(tokenizer, ids)
    weights = {"rain": -1, "kill": 0, "and": 0, "a": 0, "cozy": 1, "sun": 1}
    harm = {"rain": 0, "kill": -1, "and": 0, "a": 0, "cozy": 0, "sun": 0}
    for lexicon, expected in ((weather, weights), (None, harm)):
        credit, word_of_token = gold.token_credit(tokenizer, ids, lexicon=lexicon)
        found = gold.words(text)
        for k, (c, w) in enumerate(zip(credit, word_of_token)):
            assert c == (expected[found[w].group()] if w >= 0 else 0.0), (lexicon, k)
        assert {found[w].group() for w in word_of_token if w >= 0} == set(expected)
    # the prefix gold scores the reward model's prefix pairs learn from
    scores = red.prefix_gold_scores(tokenizer, " rain, kill and a cozy sun", 40, lexicon=weather)
    assert scores[-1] == -1 + 1 + 1 and min(scores) == -1
    assert red.prefix_gold_scores(tokenizer, " rain, kill and a cozy sun", 40)[-1] == -1


def test_score_responses_and_heldout_replies_follow_the_lexicon(weather, tiny_tokenizer):
    texts = [" rain and kill", " cozy sun"]
    rows = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    assert gold.score_responses(tiny_tokenizer, ids, mask, lexicon=weather) == [-1, 2]
    assert gold.score_responses(tiny_tokenizer, ids, mask) == [-1, 0]
    prompt = "\n\nHuman: hi\n\nAssistant:"
    pairs = [common.Pair(prompt, " A sunny day.", " Rain again."),
             common.Pair(prompt, " Kill it.", " Cold again.")]
    replies = ev.heldout_replies(pairs, weather)
    assert [(kind, text) for kind, _, text in replies if kind == "revised"] == [
        ("revised", " Sun again."), ("revised", " Warm again.")]
    assert [kind for kind, _, _ in ev.heldout_replies(pairs)].count("revised") == 1  # harm: Kill


# ----------------------------------------------------------------------------------------------
# the stages record the lexicon's id
# ----------------------------------------------------------------------------------------------
def test_label_py_ranks_and_revises_with_the_lexicon(tiny_dir, tmp_path, splits):
    out = tmp_path / "labels.jsonl"
    sentiment = gold.load_lexicon(SENTIMENT)
    argv = ["--reviser", "gold", "--preference", "gold", "--tokenizer", str(tiny_dir),
            "--out", str(out), "--max-response-len", "64", "--limit", "60"]
    summary = label.main(argv + ["--lexicon", str(SENTIMENT)])
    kept, counts = gold.rank_pairs(splits["reward"], lexicon=sentiment)
    revisable = [p for p in kept[:60] if gold.gold_revise(p.rejected, lexicon=sentiment)]
    assert summary["lexicon"] == summary["reviser_model"] == sentiment.id
    assert summary["skipped"]["gold tie"] == counts["ties"] and summary["done"] == len(revisable)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [p.id for p in revisable]
    assert all(r["revised"] == gold.gold_revise(r["rejected"], lexicon=sentiment)
               for r in records)
    # the same cache file, another lexicon: its revisions are never reused for this one
    harm = label.main(argv)
    assert harm["lexicon"] == gold.default_lexicon().id and harm["from_cache"] == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["revised"] == gold.gold_revise(r["rejected"]) for r in records)
    assert label.main(["--reviser", "chosen", "--tokenizer", str(tiny_dir), "--out",
                       str(tmp_path / "chosen.jsonl"), "--limit", "3"])["lexicon"] is None


def test_reward_model_ranks_with_the_lexicon_records_it_and_resumes_only_with_it(
        tiny_dir, tmp_path, splits):
    from test_redistribute import train_argv

    sentiment = gold.load_lexicon(SENTIMENT)
    out = tmp_path / "rm"
    argv = train_argv(tiny_dir, out, "--preference", "gold", "--save-every", "100")
    train_pairs, eval_pairs = red.select_pairs(red.parse_args(argv + ["--lexicon", str(SENTIMENT)]),
                                               quiet=True)
    ranked, _ = gold.rank_pairs(splits["reward"], lexicon=sentiment)
    assert {p.id for p in train_pairs + eval_pairs} == {p.id for p in ranked[:24]}
    assert all(gold.gold_score(p.chosen, lexicon=sentiment) >
               gold.gold_score(p.rejected, lexicon=sentiment) for p in train_pairs)
    assert red.main(argv + ["--lexicon", str(SENTIMENT), "--stop-after", "2"]) is None
    # the checkpoint belongs to the sentiment gold: another lexicon does not continue it
    with pytest.raises(common.InputError,
                       match=f"--lexicon was '{sentiment.id}', now '{gold.default_lexicon().id}'"):
        red.main(argv)
    result = red.main(argv + ["--lexicon", str(SENTIMENT)])  # the same lexicon resumes
    assert result["lexicon"] == sentiment.id
    assert json.loads((out / "token_rlhf.json").read_text())["lexicon"] == sentiment.id


def test_ppo_log_gold_scores_with_the_lexicon_and_records_its_id(tiny_dir, tmp_path, monkeypatch):
    from test_ppo_token import cli, toy_reward

    used = []
    score = gold.score_responses

    def spy(*args, lexicon=None):
        used.append(lexicon.id)
        return score(*args, lexicon=lexicon)

    monkeypatch.setattr(gold, "score_responses", spy)
    out = tmp_path / "ppo"
    ppo.main(cli(tiny_dir, out, 2, "--log-gold", "--lexicon", str(SENTIMENT)), reward_fn=toy_reward)
    sentiment = gold.load_lexicon(SENTIMENT)
    assert used == [sentiment.id] * 2
    saved = json.loads((out / "args.json").read_text())
    assert saved["lexicon_id"] == sentiment.id and saved["lexicon"] == str(SENTIMENT)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("gold_score" in r for r in log)


def test_eval_gold_scores_with_the_lexicon_and_records_its_id(tiny_dir, tmp_path, splits):
    argv_base = [
        "--policies", f"sft={tiny_dir}", "--reference", str(tiny_dir),
        "--reward-model", str(tmp_path / "rm"), "--discriminator", str(tmp_path / "disc"),
        "--num-prompts", "4", "--eval-batch-size", "4", "--max-new-tokens", "10",
        "--show-prompts", "1", "--device", "cpu", "--gold", "--credit-response-len", "32",
        "--judge", "none",
    ]
    tokenizer = hf_models.load_tokenizer(tiny_dir)
    torch.manual_seed(0)
    for name, kind, bias in (("rm", "sequence", False), ("disc", "token", True)):
        hf_models.save_score_model(hf_models.new_score_model(tiny_dir, bias=bias), tokenizer,
                                   tmp_path / name, kind)
    harm = ev.main(argv_base + ["--out", str(tmp_path / "harm")])
    assert harm["lexicon"] == gold.default_lexicon().id
    texts = [json.loads(line)["response"]
             for line in (tmp_path / "harm" / "responses.jsonl").read_text().splitlines()]
    # a lexicon that fires on what this policy says: the sentiment words and, as extra positive
    # words, the words of its replies that no list holds
    sentiment = json.loads(SENTIMENT.read_text())
    listed = set(sentiment["replacements"]) | set(sentiment["replacements"].values())
    said = sorted({gold.normalise(m.group()) for t in texts for m in gold.words(t)} - listed)
    assert said
    path = write(tmp_path, {**sentiment, "name": "mine", "positive": said})
    mine = gold.load_lexicon(path)
    results = ev.main(argv_base + ["--out", str(tmp_path / "mine"), "--lexicon", str(path)])
    assert results["lexicon"] == mine.id
    assert f"Gold lexicon: {mine.id}." in (tmp_path / "mine" / "results.md").read_text()
    rows = [json.loads(line)
            for line in (tmp_path / "mine" / "responses.jsonl").read_text().splitlines()]
    assert [r["response"] for r in rows] == texts  # the same replies, scored by another gold
    assert [r["gold_score"] for r in rows] == [gold.gold_score(t, lexicon=mine) for t in texts]
    assert results["policies"]["sft"]["gold_score"] > harm["policies"]["sft"]["gold_score"]
    # the held-out replies: the sentiment lexicon ranks and revises them
    ranked, _ = gold.rank_pairs(splits["test"][:4], lexicon=mine)
    revised = sum(gold.gold_revise(p.rejected, lexicon=mine) is not None for p in ranked)
    assert results["credit"]["heldout"]["replies"]["revised"] == revised


# ----------------------------------------------------------------------------------------------
# run_pipeline.sh and study.py pass the lexicon on
# ----------------------------------------------------------------------------------------------
FAKE_PYTHON = """#!/usr/bin/env bash
# records each stage's command line; eval.py leaves the results.md the pipeline prints
echo "$*" >> "$FAKE_LOG"
if [ "$1" = eval.py ]; then mkdir -p "$RUN/eval"; echo "| sft |" > "$RUN/eval/results.md"; fi
"""


def dry_pipeline(tmp_path, cwd=ROOT, **settings):
    """run_pipeline.sh with a PYTHON that only records the commands: (exit code, stderr, commands
    as argument lists)."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "commands.log"
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "LEXICON"}
    env.update(PYTHON=str(fake), FAKE_LOG=str(log), RUN=str(tmp_path / "run"), SIZE="smoke",
               **settings)
    done = subprocess.run(["bash", str(ROOT / "run_pipeline.sh")], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)
    lines = log.read_text().splitlines() if log.exists() else []
    return done.returncode, done.stderr, [line.split() for line in lines]


def lexicon_of(command):
    return command[command.index("--lexicon") + 1] if "--lexicon" in command else None


def test_run_pipeline_passes_lexicon_to_every_stage_that_uses_the_gold(tmp_path):
    gold_stages = {"gold_samples.py", "label.py", "redistribute.py", "ppo_token.py", "eval.py"}
    # the default: the harm lexicon, named on every gold stage's command line
    code, err, commands = dry_pipeline(tmp_path, LAB_DATA="samples")
    assert code == 0, err
    assert [c[0] for c in commands] == ["sft.py", "gold_samples.py", "label.py", "discriminator.py",
                                        "redistribute.py", *["ppo_token.py"] * 5, "eval.py"]
    for command in commands:
        expected = "data/lexicon-harm.json" if command[0] in gold_stages else None
        assert lexicon_of(command) == expected, command
    # LEXICON=FILE, given from another folder: the path as meant there, on every gold stage
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write(elsewhere, WEATHER, "mine.json")
    code, err, commands = dry_pipeline(tmp_path, cwd=elsewhere, LEXICON="mine.json")
    assert code == 0, err
    assert {c[0] for c in commands if lexicon_of(c)} == gold_stages - {"gold_samples.py"}
    assert {lexicon_of(c) for c in commands if lexicon_of(c)} == {str(elsewhere / "mine.json")}
    # an empty LEXICON is the default; with TASK=human it is refused (no stage uses the gold)
    code, err, commands = dry_pipeline(tmp_path, LEXICON="")
    assert code == 0 and lexicon_of(commands[1]) == "data/lexicon-harm.json"
    code, err, commands = dry_pipeline(tmp_path, TASK="human", LEXICON=str(SENTIMENT))
    assert code == 2 and "LEXICON are lab settings (TASK=gold)" in err and commands == []
    code, err, commands = dry_pipeline(tmp_path, TASK="human")
    assert code == 0 and all(lexicon_of(c) is None for c in commands)


def test_study_passes_lexicon_to_its_pipelines_and_records_its_id(tmp_path, monkeypatch):
    args = study.parse_args(["--lexicon", str(SENTIMENT), "--out", str(tmp_path)])
    assert study.pipeline_env(args)["LEXICON"] == str(SENTIMENT.resolve())
    assert args.lexicon_id == gold.load_lexicon(SENTIMENT).id
    default = study.parse_args(["--out", str(tmp_path)])
    monkeypatch.setenv("LEXICON", "/somewhere/else.json")  # the study's choice wins
    assert study.pipeline_env(default)["LEXICON"] == ""  # run_pipeline.sh: the default
    assert default.lexicon_id == gold.default_lexicon().id
    for name in ("study_markdown", "frontier_svg", "study_html"):  # only study.json is read here
        monkeypatch.setattr(study, name, lambda *a: "")
    study.write_outputs(args, {"summary": {}}, [])  # (args, study, runs)
    assert json.loads((tmp_path / "study.json").read_text())["config"]["lexicon"] == (
        gold.load_lexicon(SENTIMENT).id)
