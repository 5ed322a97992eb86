"""Suffix histories: the file format, its errors, warming the index, and the CLI flags."""

import gzip
import json

import pytest

from engine_helpers import load_benchmark
from specjax.drafters.suffix_history import HistoryError, load_history, save_history, tokenizer_fingerprint
from specjax.drafters.suffix_index import SuffixDecodingDrafter

RESPONSES = [[5, 6, 7, 8, 9], [5, 6, 1], [], [3]]


class FakeTokenizer:
    def __init__(self, text: str):
        self.text = text

    def to_str(self) -> str:
        return self.text


def test_round_trip_is_exact_and_byte_stable(tmp_path):
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    save_history(str(a), RESPONSES, vocab_size=10, tokenizer=FakeTokenizer("t"))
    save_history(str(b), RESPONSES, vocab_size=10, tokenizer=FakeTokenizer("t"))
    assert load_history(str(a), vocab_size=10, tokenizer=FakeTokenizer("t")) == RESPONSES
    assert a.read_bytes() == b.read_bytes()  # a rebuilt shipped file does not change


def _write_raw(path, lines):
    with gzip.open(path, "wt") as f:
        f.write("".join(line + "\n" for line in lines))


def _header(**over):
    header = {"format": "specjax-suffix-history", "version": 1, "vocab_size": 10, "tokenizer_sha256": None,
              "responses": 1}
    header.update(over)
    return json.dumps(header)


@pytest.mark.parametrize("lines, match", [
    ([json.dumps({"format": "other"}), "[1]"], "header"),
    ([_header(version=9), "[1]"], "version 9"),
    ([_header(vocab_size=11), "[1]"], "vocabulary of 11"),
    ([_header(), "[1, 10]"], "token id 10 outside the vocab"),
    ([_header(), "[1, -1]"], "token id -1 outside the vocab"),
    ([_header(), '["a"]'], "list of token ids"),
    ([_header(), "[1, 2"], "line 2: invalid JSON"),
    ([_header(responses=3), "[1]"], "promises 3 responses, found 1"),
    ([], "empty file"),
])
def test_bad_files_are_clear_errors(tmp_path, lines, match):
    path = tmp_path / "h.jsonl.gz"
    _write_raw(path, lines)
    with pytest.raises(HistoryError, match=match):
        load_history(str(path), vocab_size=10)


def test_missing_and_non_gzip_files_are_clear_errors(tmp_path):
    with pytest.raises(HistoryError, match="no such file"):
        load_history(str(tmp_path / "absent.jsonl.gz"), vocab_size=10)
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text(_header() + "\n[1]\n")
    with pytest.raises(HistoryError, match="not a gzip"):
        load_history(str(plain), vocab_size=10)


def test_another_tokenizer_is_refused(tmp_path):
    path = str(tmp_path / "h.jsonl.gz")
    save_history(path, RESPONSES, vocab_size=10, tokenizer=FakeTokenizer("bpe-a"))
    with pytest.raises(HistoryError, match="another tokenizer"):
        load_history(path, vocab_size=10, tokenizer=FakeTokenizer("bpe-b"))
    assert tokenizer_fingerprint(FakeTokenizer("bpe-a")) != tokenizer_fingerprint(FakeTokenizer("bpe-b"))


def test_remembered_responses_are_drafted_for_a_new_request():
    cold, warm = SuffixDecodingDrafter(), SuffixDecodingDrafter()
    warm.remember([[20, 21, 22, 23, 24, 25]])
    assert warm.history == [[20, 21, 22, 23, 24, 25]]
    for drafter in (cold, warm):
        drafter.start_request("r", [1, 2, 20, 21, 22])
    assert len(cold.propose("r", 8).tokens) == 0
    # A 3-token match drafts up to 3 tokens (SuffixDecoding's budget: factor 1 x match length).
    assert list(warm.propose("r", 8).tokens) == [23, 24, 25]


# ------------------------------------------------------------------ the command line

embedded = pytest.importorskip("specjax.models.embedded")


def _generate(capsys, *args):
    from specjax.engine.cli import main

    assert main(["generate", "--model", "tiny-sql", "--json", "--max-new-tokens", "24", "--num-demo-prompts", "3",
                 "--seed", "5", "--draft-capacity", "8", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_history_warms_the_index_and_stays_lossless(tmp_path, capsys):
    cold = _generate(capsys, "--drafter", "suffix", "--suffix-history", "none",
                     "--save-suffix-history", str(tmp_path / "run.jsonl.gz"))
    import jax.numpy as jnp

    from specjax.models.loading import load_model

    model = load_model(embedded.default_model_dir(), dtype=jnp.float32)
    saved = load_history(str(tmp_path / "run.jsonl.gz"), vocab_size=model.config.vocab_size,
                         tokenizer=model.tokenizer)
    assert saved == cold["token_ids"]  # an empty history, then this run's three answers
    warm = _generate(capsys, "--drafter", "suffix", "--suffix-history", str(tmp_path / "run.jsonl.gz"),
                     "--compare-baseline")
    assert warm["identical_to_baseline"] is True
    assert warm["token_ids"] == cold["token_ids"]
    # Every answer is in the history now: most tokens come from drafts.
    assert warm["tokens_per_pass"] > cold["tokens_per_pass"] + 1.0


def test_saving_a_history_needs_the_suffix_drafter(tmp_path):
    from specjax.engine.cli import main

    with pytest.raises(SystemExit, match="needs --drafter suffix"):
        main(["generate", "--drafter", "prompt-lookup", "--save-suffix-history", str(tmp_path / "h.jsonl.gz")])


def test_history_builder_leaves_out_demo_questions_and_answers():
    """The builder's filter (the shipped file itself: tests/test_embedded_honesty.py)."""
    build = load_benchmark("build_suffix_history")
    from specjax.models.embedded.toy_corpus import sql_examples

    demo = build.demo_examples()
    questions = build.candidate_questions(800, seed=1, demo=demo)
    by_prompt = {ex.prompt: ex for ex in sql_examples(800, 1, split="train")}
    assert questions and not {ex.prompt for ex in demo} & set(questions)
    assert not {ex.sql for ex in demo} & {by_prompt[q].sql for q in questions}
    assert len(questions) < 800, "the exclusion is untested: no training question is a demo one"
    assert build.contains_any("SELECT a FROM t; x", ["FROM t;"]) and not build.contains_any("SELECT a", ["b"])
