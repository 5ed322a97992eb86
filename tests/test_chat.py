"""Chat templates rendered as transformers renders them, and ``Engine.generate(messages=...)``."""

import dataclasses

import jinja2
import pytest

from specjax.models.chat import ChatTemplateError, render_chat, validate_messages

transformers = pytest.importorskip("transformers")

# SmolLM2-Instruct's template (chatml with a default system turn when the conversation has none).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Llama-3 style: BOS written by the template, headers, trimmed content; laid out over lines and
# indented, so trim_blocks / lstrip_blocks decide the output.
LLAMA3 = """{{ bos_token }}
{% for message in messages %}
    {% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}
    {{ content }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{% endif %}
"""

# A system-turn default, role alternation enforced with raise_exception, tool results as JSON,
# a date from strftime_now, namespace and loop controls.
SYSTEM_DEFAULT = """{% set ns = namespace(system='You are terse. Today is ' + strftime_now('%Y') + '.') %}
{% if messages[0]['role'] == 'system' %}
    {% set ns.system = messages[0]['content'] %}
    {% set messages = messages[1:] %}
{% endif %}
[SYS] {{ ns.system }} [/SYS]
{% for message in messages %}
    {% if message['role'] == 'tool' %}
        [TOOL] {{ {'result': message['content']} | tojson }} [/TOOL]
        {% continue %}
    {% endif %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        [INST] {{ message['content'] }} [/INST]
    {% else %}
        {{ message['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
"""

TEMPLATES = {"smollm2": SMOLLM2, "llama3": LLAMA3, "system-default": SYSTEM_DEFAULT}

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Rename x to count in: x = x + 1"}],
    "system + multi-turn": [
        {"role": "system", "content": "Answer in SQL."},
        {"role": "user", "content": "Table t(a, b). Rows where a < 3 & b > \"q\"?"},
        {"role": "assistant", "content": "SELECT * FROM t WHERE a < 3 AND b > 'q';"},
        {"role": "user", "content": "  Now only column b.  "},
    ],
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A tiny fast tokenizer carrying BOS / EOS, only for apply_chat_template's rendering."""
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "<unk>")),
                                                bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@dataclasses.dataclass
class _ChatModel:
    chat_template: str
    bos_token: str = "<s>"
    eos_token: str = "</s>"


def _reference(tokenizer, template, messages, add_generation_prompt):
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_render_equals_transformers(hf_tokenizer, name, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    expected = _reference(hf_tokenizer, TEMPLATES[name], messages, add_generation_prompt)
    assert render_chat(_ChatModel(TEMPLATES[name]), messages, add_generation_prompt) == expected


def test_tool_results_and_dates_render_as_transformers_does(hf_tokenizer):
    messages = [{"role": "user", "content": "Weather in Lagos?"}, {"role": "tool", "content": "<31 °C>"}]
    expected = _reference(hf_tokenizer, SYSTEM_DEFAULT, messages, True)
    assert "<31 °C>" in expected  # transformers' tojson neither escapes HTML nor non-ASCII
    assert render_chat(_ChatModel(SYSTEM_DEFAULT), messages) == expected


def test_negative_controls_each_setting_changes_the_output(hf_tokenizer):
    """Renderings that drop one of transformers' settings differ from it (so the tests above can fail)."""
    messages = CONVERSATIONS["system + multi-turn"]
    expected = _reference(hf_tokenizer, LLAMA3, messages, True)
    for options in ({"trim_blocks": False, "lstrip_blocks": True}, {"trim_blocks": True, "lstrip_blocks": False}):
        plain = jinja2.Environment(**options).from_string(LLAMA3)
        assert plain.render(messages=messages, add_generation_prompt=True, bos_token="<s>") != expected
    assert render_chat(_ChatModel(LLAMA3, bos_token="<bos>"), messages) != expected  # the model's own BOS counts
    tool = [{"role": "user", "content": "q"}, {"role": "tool", "content": "<b>"}]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(strftime_now=lambda f: "2026", raise_exception=None)
    jinja_tojson = env.from_string(SYSTEM_DEFAULT).render(messages=tool, add_generation_prompt=True)
    assert jinja_tojson != _reference(hf_tokenizer, SYSTEM_DEFAULT, tool, True)  # jinja's tojson escapes "<"


def test_template_errors_are_clear():
    bad_order = [{"role": "assistant", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="must alternate"):
        render_chat(_ChatModel(SYSTEM_DEFAULT), bad_order)
    with pytest.raises(ChatTemplateError, match="not valid jinja2"):
        render_chat("{% for m in messages %}", CONVERSATIONS["one turn"])
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        render_chat(_ChatModel(""), CONVERSATIONS["one turn"])


def test_the_sandbox_refuses_attribute_escapes():
    escape = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_chat(escape, CONVERSATIONS["one turn"])


@pytest.mark.parametrize("messages, problem", [
    ("hello", "list of"),
    ([], "is empty"),
    (["hello"], r"messages\[0\] must be a dict"),
    ([{"role": "user"}], r"messages\[0\] needs a string 'content'"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\] needs a string 'role'"),
    ([{"role": "user", "content": 3}], "needs a string 'content'"),
])
def test_malformed_messages_are_named(messages, problem):
    with pytest.raises(ChatTemplateError, match=problem):
        validate_messages(messages)


def test_none_values_are_dropped_as_transformers_does(hf_tokenizer):
    template = "{% for m in messages %}{{ m['name'] if 'name' in m else 'anon' }}:{{ m['content'] }};{% endfor %}"
    messages = [{"role": "user", "content": "a", "name": None}, {"role": "user", "content": "b", "name": "bo"}]
    assert render_chat(template, messages) == _reference(hf_tokenizer, template, messages, True) == "anon:a;bo:b;"


def test_extra_variables_reach_the_template(hf_tokenizer):
    template = "{% if enable_thinking %}<think>{% endif %}{{ messages[0]['content'] }}"
    messages = CONVERSATIONS["one turn"]
    assert render_chat(template, messages, enable_thinking=True) == hf_tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, enable_thinking=True)
    assert render_chat(template, messages).startswith("Rename")  # undefined -> false


# ------------------------------------------------------------------ Engine.generate(messages=...)

CHATML_WITH_BOS = "{{ bos_token }}" + SMOLLM2


@pytest.fixture(scope="module")
def chat_model():
    """The embedded tiny model given a template that writes BOS, and a tokenizer whose ``encode``
    also adds BOS (as Llama tokenizers do): a rendered chat must not get a second one."""
    import jax.numpy as jnp
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    from specjax.models.embedded import default_model_dir
    from specjax.models.loading import load_model

    model = load_model(default_model_dir(), dtype=jnp.float32)
    tokenizer = Tokenizer.from_str(model.tokenizer.to_str())
    tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    return dataclasses.replace(model, tokenizer=tokenizer, chat_template=CHATML_WITH_BOS,
                               bos_token="<|endoftext|>", eos_token="<|endoftext|>")


CHATS = [
    [{"role": "user", "content": "How many rows does orders have?"}],
    [{"role": "system", "content": "SQL only."}, {"role": "user", "content": "List the names."},
     {"role": "assistant", "content": "SELECT name FROM users;"}, {"role": "user", "content": "Sorted."}],
    [{"role": "user", "content": "SELECT count(*) FROM orders WHERE"}],
]


def test_chat_ids_have_one_bos_and_equal_transformers(chat_model):
    from specjax.engine.engine import Engine

    engine = Engine(chat_model, None)
    ids = engine.encode_chat(CHATS[1])
    assert ids[0] == 0 and ids[1] != 0
    text = render_chat(chat_model, CHATS[1])
    assert chat_model.tokenizer.encode(text).ids[:2] == [0, 0]  # negative control: encode() adds a second BOS
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=chat_model.tokenizer, bos_token="<|endoftext|>",
                                                     eos_token="<|endoftext|>")
    expected = reference.apply_chat_template(CHATS[1], chat_template=CHATML_WITH_BOS, add_generation_prompt=True,
                                             return_dict=False)
    assert ids == list(expected)


def test_generate_messages_equals_generate_rendered_prompts_and_streams(chat_model):
    from specjax.drafters.prompt_lookup import PromptLookupDrafter
    from specjax.engine.engine import Engine

    engine = Engine(chat_model, PromptLookupDrafter(max_ngram=3, max_branches=4), draft_capacity=4, max_batch_size=2)
    streamed: dict[int, list] = {}
    chunks: list[int] = []

    def on_tokens(index, tokens):
        streamed.setdefault(index, []).extend(tokens)
        chunks.append(len(tokens))

    by_messages = engine.generate(messages=CHATS, max_new_tokens=24, on_tokens=on_tokens)
    by_ids = engine.generate([engine.encode_chat(c) for c in CHATS], max_new_tokens=24)
    assert [r.token_ids for r in by_messages] == [r.token_ids for r in by_ids]
    # Three requests over two batches (max_batch_size=2): indexes are the requests', not the batch rows'.
    assert streamed == {i: r.token_ids for i, r in enumerate(by_messages)}
    assert len(chunks) == sum(r.target_passes for r in by_messages)  # one chunk per step and request
    one = engine.generate(messages=CHATS[0], max_new_tokens=24)  # a single conversation
    assert one[0].token_ids == by_messages[0].token_ids


def test_generate_takes_prompts_or_messages(chat_model):
    from specjax.engine.engine import Engine

    engine = Engine(chat_model, None)
    with pytest.raises(ValueError, match="either prompts or messages"):
        engine.generate(["x"], messages=CHATS[0])
    with pytest.raises(ValueError, match="either prompts or messages"):
        engine.generate()
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        Engine(dataclasses.replace(chat_model, chat_template=None), None).generate(messages=CHATS[0])


def test_device_drafter_loops_stream_each_whole_output_once(chat_model):
    """Device drafters sync with the host every few steps: ``on_tokens`` gets each request's output once."""
    from specjax.drafters.token_recycling import TokenRecyclingDrafter
    from specjax.engine.engine import Engine

    engine = Engine(chat_model, TokenRecyclingDrafter(chat_model.config.vocab_size, capacity=8))
    calls = []
    results = engine.generate(messages=CHATS[:2], max_new_tokens=12, on_tokens=lambda i, ids: calls.append((i, ids)))
    assert calls == [(i, r.token_ids) for i, r in enumerate(results)]
    plain = Engine(chat_model, None).generate(messages=CHATS[:2], max_new_tokens=12)
    assert [r.token_ids for r in results] == [r.token_ids for r in plain]
