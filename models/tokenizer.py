"""Tokenizer: a HF `tokenizers.Tokenizer` plus the special-token facts and chat template that
transformers keeps beside it, loaded from an HF folder or rebuilt from GGUF metadata.

`eos_token_ids` (what generation stops on) is:
- HF folder: the tokenizer_config `eos_token` plus every id in generation_config.json's
  `eos_token_id` (an int or a list), as vLLM does.
- GGUF: `tokenizer.ggml.eos_token_id`, plus `tokenizer.ggml.eot_token_id` / `eom_token_id` when
  present, plus any end-of-turn control token (`<|im_end|>`, `<|eot_id|>`, `<|end|>`,
  `<end_of_turn>`, `<|eom_id|>`) that the chat template writes.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import TYPE_CHECKING, Any, Iterable

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from models.atomic_files import atomic_write_json, atomic_write_text

if TYPE_CHECKING:  # imported lazily in compile_chat_template: `make gpu-check` runs without jinja2
    import jinja2

# llama.cpp `tokenizer.ggml.pre` values whose regex is "\p{N}" then GPT-2's: HF writes these as
# Digits(individual_digits=True) followed by a regex ByteLevel pre-tokenizer.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SUPPORTED_GGUF_PRE = ("gpt2", "default", *_DIGIT_SPLIT_PRE, "qwen2", "llama-bpe", "llama3")
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")
# llama_token_type in GGUF: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer:
    """Encode/decode and chat templates with transformers' semantics.

    `hf` is the raw `tokenizers.Tokenizer` (for `tokenizers.decoders.DecodeStream`).
    """

    def __init__(self, hf: HFTokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, chat_template: str | None = None,
                 add_bos_token: bool = False, extra_eos_token_ids: Iterable[int] = (),
                 special_tokens: dict[str, str] | None = None):
        self.hf = hf
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template
        self.bos_token_id = hf.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_id = hf.token_to_id(eos_token) if eos_token is not None else None
        self.eos_token_ids = set(extra_eos_token_ids)
        if self.eos_token_id is not None:
            self.eos_token_ids.add(self.eos_token_id)
        # Special tokens the template sees (bos_token, eos_token, unk_token, pad_token, ...).
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.special_tokens.setdefault("bos_token", bos_token)
        self.special_tokens.setdefault("eos_token", eos_token)
        added = hf.get_added_tokens_decoder()
        special_ids = {i for i, token in added.items() if token.special}
        for token in self.special_tokens.values():
            if token is not None and hf.token_to_id(token) is not None:
                special_ids.add(hf.token_to_id(token))
        self.all_special_ids = sorted(special_ids)
        # Prepend BOS ourselves only when asked to and tokenizer.json's post-processor does not.
        self._prepend_bos = bool(add_bos_token and self.bos_token_id is not None
                                 and self.bos_token_id not in hf.encode("a").ids)
        self._template: jinja2.Template | None = None

    @classmethod
    def word_level(cls, vocab_size: int, eos_id: int = 1) -> "Tokenizer":
        """For random-weight models: id 0 "<unk>", `eos_id` "<eos>", every other id i the word
        "w<i>"; text splits on whitespace and decodes with spaces between words."""
        from tokenizers import models, pre_tokenizers

        vocab = {"<unk>": 0, "<eos>": eos_id, **{f"w{i}": i for i in range(vocab_size) if i not in (0, eos_id)}}
        hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        hf.pre_tokenizer = pre_tokenizers.Whitespace()
        return cls(hf, eos_token="<eos>")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while Rust works (encode holds it): a 4 MB prompt
        # tokenized on a worker thread no longer stalls the engine thread for seconds.
        ids = self.hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self._prepend_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.hf.id_to_token(ids)
        return [self.hf.id_to_token(i) for i in ids]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Render `messages` as transformers does; token ids (no extra special tokens) when
        `tokenize`. Extra kwargs (`tools`, `documents`, `enable_thinking`, ...) reach the template."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template; pass a template or a prompt "
                             "string instead of messages")
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        variables = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        rendered = self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt, **variables)
        if tokenize:
            return self.encode(rendered, add_special_tokens=False)
        return rendered

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json so that `from_folder(path)` rebuilds
        this tokenizer; eos ids beyond `eos_token` go to generation_config.json when that file
        does not exist yet."""
        os.makedirs(path, exist_ok=True)
        atomic_write_text(os.path.join(path, "tokenizer.json"), self.hf.to_str(pretty=True))
        config = {**self.special_tokens, "add_bos_token": self._prepend_bos,
                  "chat_template": self.chat_template}
        atomic_write_json(os.path.join(path, "tokenizer_config.json"),
                          {k: v for k, v in config.items() if v is not None}, indent=2, ensure_ascii=False)
        generation_path = os.path.join(path, "generation_config.json")
        if self.eos_token_ids != {self.eos_token_id} and not os.path.exists(generation_path):
            atomic_write_json(generation_path, {"eos_token_id": sorted(self.eos_token_ids)}, indent=2)

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "Tokenizer":
        """tokenizer.json + tokenizer_config.json (+ chat_template.jinja, generation_config.json)."""
        hf = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        generation = _read_json(os.path.join(path, "generation_config.json"))
        tokens = {key: _token_content(config.get(key))
                  for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
        eos_ids = generation.get("eos_token_id")
        eos_ids = eos_ids if isinstance(eos_ids, list) else ([] if eos_ids is None else [eos_ids])
        return cls(hf, bos_token=tokens["bos_token"], eos_token=tokens["eos_token"],
                   chat_template=_folder_chat_template(path, config),
                   add_bos_token=bool(config.get("add_bos_token", False)),
                   extra_eos_token_ids=eos_ids, special_tokens=tokens)

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any]) -> "Tokenizer":
        """Rebuild the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`).

        Supports byte-level BPE (`tokenizer.ggml.model == "gpt2"`) with the pre-tokenizers in
        `SUPPORTED_GGUF_PRE`; SentencePiece ("llama") GGUF tokenizers are not supported yet.
        """
        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise NotImplementedError(
                f"GGUF tokenizer.ggml.model {kind!r} is not supported yet; only byte-level BPE "
                f"('gpt2') is. Load the model's HF folder for its tokenizer.json instead")
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        token_types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        pre = metadata.get("tokenizer.ggml.pre", "default")
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
        hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                    ignore_merges=pre in ("llama-bpe", "llama3")))
        _set_byte_level_pipeline(hf, pre)
        added = [AddedToken(tokens[i], special=t == _CONTROL, normalized=False)
                 for i, t in enumerate(token_types) if t in (_CONTROL, _USER_DEFINED)]
        hf.add_special_tokens([a for a in added if a.special])
        hf.add_tokens([a for a in added if not a.special])

        def token(key: str) -> str | None:
            i = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos, eos = token("bos"), token("eos")
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        pieces = [bos] if add_bos and bos else []
        pieces += ["$A"] + ([eos] if add_eos and eos else [])
        if len(pieces) > 1:
            hf.post_processor = processors.TemplateProcessing(
                single=" ".join(pieces),
                special_tokens=[(t, hf.token_to_id(t)) for t in pieces if t != "$A"])
        template = metadata.get("tokenizer.chat_template")
        extra_eos = [metadata[f"tokenizer.ggml.{k}_token_id"] for k in ("eot", "eom")
                     if f"tokenizer.ggml.{k}_token_id" in metadata]
        for text in _END_OF_TURN_TOKENS:
            if template and text in template and hf.token_to_id(text) is not None:
                extra_eos.append(hf.token_to_id(text))
        return cls(hf, bos_token=bos, eos_token=eos, chat_template=template, add_bos_token=False,
                   extra_eos_token_ids=extra_eos,
                   special_tokens={"bos_token": bos, "eos_token": eos, "unk_token": token("unknown"),
                                   "pad_token": token("padding")})


def _set_byte_level_pipeline(hf: HFTokenizer, pre: str) -> None:
    """Pre-tokenizer, normalizer and decoder matching HF's tokenizer.json for llama.cpp's `pre`."""
    if pre in ("gpt2", "default"):
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _DIGIT_SPLIT_PRE:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in ("qwen2", "llama-bpe", "llama3"):
        regex = _QWEN2_REGEX if pre == "qwen2" else _LLAMA3_REGEX
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if pre == "qwen2":
            hf.normalizer = normalizers.NFC()
    else:
        raise NotImplementedError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported yet; "
                                  f"supported: {', '.join(SUPPORTED_GGUF_PRE)}")
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)


def compile_chat_template(chat_template: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTracker(jinja2.ext.Extension):
        """Accept transformers' `{% generation %}...{% endgeneration %}`; render its body as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # transformers' filter: no HTML escaping (unlike jinja's), unicode kept as is.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(chat_template)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(token: Any) -> str | None:
    """tokenizer_config stores a special token as a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _folder_chat_template(path: str | os.PathLike, config: dict[str, Any]) -> str | None:
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template") or _read_json(
        os.path.join(path, "chat_template.json")).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template
