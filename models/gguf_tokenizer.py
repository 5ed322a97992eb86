"""The tokenizer a GGUF file describes, rebuilt as a ``tokenizers.Tokenizer``.

A GGUF carries no ``tokenizer.json``: llama.cpp stores the vocabulary, the BPE
merges, per-token types and the pre-tokenizer's name as metadata. This rebuilds
byte-level BPE ("gpt2", used by Llama 3, SmolLM, Qwen2/2.5/3) exactly as
transformers' GGUF conversion does (``transformers/integrations/gguf/
gguf_tokenizer_mapping.py``), so token ids agree with
``AutoTokenizer.from_pretrained(dir, gguf_file=...)``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the split regex its merges were learned with (transformers' table). Any other
# name (e.g. "smollm", "gpt-2", "default") keeps GPT-2's byte-level regex, as transformers does.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


class GGUFTokenizerError(ValueError):
    """The GGUF's tokenizer metadata is missing or of a kind specjax cannot rebuild."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet byte-level vocabularies are spelled in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(meta: Mapping[str, Any], source: str = "GGUF file") -> Tokenizer:
    """A ``Tokenizer`` from GGUF tokenizer metadata (``tokenizer.ggml.*`` keys, values already decoded)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFTokenizerError(
            f"{source}: tokenizer.ggml.model is {kind!r}; specjax rebuilds only byte-level BPE ('gpt2': Llama 3, "
            "SmolLM, Qwen2/3). Convert it once with transformers: AutoTokenizer.from_pretrained(dir, "
            "gguf_file=...).save_pretrained(out_dir)")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in meta:
            raise GGUFTokenizerError(f"{source}: metadata key {key!r} is missing")
    tokens: Sequence[str] = meta["tokenizer.ggml.tokens"]
    token_types: Sequence[int] = meta.get("tokenizer.ggml.token_type") or ()
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {_byte_level_spelling(t, alphabet, spelling): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, token_types) if kind == CONTROL and set(t) <= alphabet]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, kind in zip(tokens, token_types) if kind == USER_DEFINED and t in vocab]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    named = [t for t in (special_token(meta, k) for k in ("bos", "eos", "unknown", "padding")) if t is not None]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in named if t not in control])
    tok.post_processor = _post_processor(meta)
    return tok


def special_token(meta: Mapping[str, Any], name: str) -> Optional[str]:
    """The text of ``tokenizer.ggml.{name}_token_id`` ("bos", "eos", ...), or None if the file names none."""
    token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
    tokens = meta.get("tokenizer.ggml.tokens") or ()
    return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None


def eos_token_ids(meta: Mapping[str, Any]) -> tuple[int, ...]:
    """Every id that ends a turn: the EOS plus the end-of-turn / end-of-message ids the file names."""
    ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _byte_level_spelling(token: str, alphabet: set, spelling: dict[int, str]) -> str:
    # A token already in the byte alphabet is kept; any other (a raw special string) is re-spelled byte by byte.
    return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))


def _pre_tokenizer(pre: Optional[str]):
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _post_processor(meta: Mapping[str, Any]):
    """BOS / EOS around each sequence when the file says llama.cpp adds them (``add_bos_token``)."""
    bos = special_token(meta, "bos") if meta.get("tokenizer.ggml.add_bos_token") else None
    eos = special_token(meta, "eos") if meta.get("tokenizer.ggml.add_eos_token") else None
    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    ids = {t: int(meta[f"tokenizer.ggml.{k}_token_id"]) for t, k in ((bos, "bos"), (eos, "eos")) if t}
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))
