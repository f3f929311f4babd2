"""Model ids of infernet-ml 1.x/2.0 and the ALLOWED_MODELS allow-list (api/model_ids.py): pure functions, no server.

The expected ABI bytes are written out word by word here (32-byte words, big-endian), not produced by the code under
test; eth_abi is checked against them too, so a wrong expectation cannot hide behind the same encoder.
"""

from __future__ import annotations

import pytest
from eth_abi import encode

from core.model_ids import (
    AllowListError,
    ModelId,
    ModelIdError,
    allowed,
    decode_model_id_abi,
    encode_model_id_abi,
    model_id_from_v1,
    model_id_from_v1_chain,
    parse_allowed_models,
    parse_model_id,
    version_spelled_out,
)

OWNER = "Aq3wNNz6cI2tH1lXoHc1OYmoJ_pyDQDbN3r5_dUsmq8"  # 43 characters, an Arweave wallet address's form
IRIS = "huggingface/Ritual-Net/iris-classification:iris.torch"


def word(n: int) -> str:
    return n.to_bytes(32, "big").hex()


def text(s: str) -> str:
    """A string's tail in ABI: its length word, then its UTF-8 bytes right-padded with zeros to whole words."""
    data = s.encode()
    return word(len(data)) + data.hex().ljust(-(-len(data) // 32) * 64, "0")


# ---- parsing -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "expected"),
    [
        (IRIS, ModelId("huggingface", "Ritual-Net", "iris-classification", "iris.torch")),
        (
            "huggingface/Ritual-Net/california-housing/main:california_housing.torch",
            ModelId("huggingface", "Ritual-Net", "california-housing", "california_housing.torch", "main"),
        ),
        (
            f"arweave/{OWNER}/iris-classification:iris.torch",
            ModelId("arweave", OWNER, "iris-classification", "iris.torch"),
        ),
        (f"arweave/{OWNER}/iris/1.0.2:iris.torch", ModelId("arweave", OWNER, "iris", "iris.torch", "1.0.2")),
        ("huggingface/Org/repo", ModelId("huggingface", "Org", "repo")),
        ("huggingface/Org/repo:sub/dir/model.pt2", ModelId("huggingface", "Org", "repo", "sub/dir/model.pt2")),
    ],
)
def test_parse_and_str_round_trip(model_id, expected):
    parsed = parse_model_id(model_id)
    assert parsed == expected
    assert str(parsed) == model_id
    assert parse_model_id(str(parsed)) == parsed


def test_model_id_is_frozen_and_hashable():
    m = parse_model_id(IRIS)
    with pytest.raises(AttributeError):
        m.repo = "other"  # type: ignore[misc]
    assert {m: 1}[parse_model_id(IRIS)] == 1
    assert m.repo_id == "Ritual-Net/iris-classification"
    assert m.storage_code == 2


@pytest.mark.parametrize(
    ("model_id", "says"),
    [
        ("", "parts"),
        ("huggingface", "parts"),
        ("huggingface/Org", "parts"),
        ("huggingface/a/b/c/d", "parts"),
        ("ftp/a/b:f", "unknown source"),
        ("HuggingFace/a/b:f", "unknown source"),
        ("huggingface/a/b:f:g", "more than one ':'"),
        ("huggingface/a/b:", "empty file name"),
        ("huggingface/a/b:x.torch,y.torch", "names 2 files"),
        ("huggingface/../b:f", "owner '..'"),
        ("huggingface/a/.hidden:f", "repo '.hidden'"),
        ("huggingface//b:f", "owner ''"),
        ("huggingface/a/b:../etc/passwd", "not a valid file name"),
        ("huggingface/a/b:/abs", "not a valid file name"),
        ("huggingface/a/b:dir//f", "not a valid file name"),
        ("huggingface/a/b:f\n", "not a valid file name"),
        ("huggingface/a b/c:f", "owner 'a b'"),
        ("huggingface/a/b/ver sion:f", "version"),
        ("arweave/not-an-address/b:f", "Arweave wallet address"),
        ("local/a/b:f", "cannot name a file on the server"),
        ("huggingface/" + "a" * 97 + "/b:f", "owner"),
        ("huggingface/a/b:" + "f" * 256, "longer than 255"),
        ("x" * 700, "longer than 600"),
    ],
)
def test_malformed_ids_name_the_id_and_the_fault(model_id, says):
    with pytest.raises(ModelIdError) as caught:
        parse_model_id(model_id)
    assert says in str(caught.value)
    assert isinstance(caught.value, ValueError)
    if len(model_id) < 600:
        assert repr(model_id) in str(caught.value)


@pytest.mark.parametrize("value", [None, 42, ["huggingface/a/b"], {"id": 1}])
def test_a_model_id_must_be_a_string(value):
    with pytest.raises(ModelIdError, match="expected a string"):
        parse_model_id(value)


def test_local_ids_only_where_the_caller_allows_them():
    assert parse_model_id("local/a/b:model.torch", allow_local=True) == ModelId("local", "a", "b", "model.torch")


# ---- the 1.x form ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [2, "HUGGINGFACE_HUB", "huggingface_hub", "huggingface"])
def test_v1_huggingface(source):
    load_args = {"repo_id": "Ritual-Net/california-housing", "filename": "california_housing.torch"}
    m = model_id_from_v1(source, load_args)
    assert str(m) == "huggingface/Ritual-Net/california-housing:california_housing.torch"


@pytest.mark.parametrize("source", [1, "ARWEAVE", "arweave"])
def test_v1_arweave_with_version_and_cache_path_ignored(source):
    load_args = {"repo_id": f"{OWNER}/iris", "filename": "iris.torch", "version": "2", "cache_path": "/etc"}
    assert model_id_from_v1(source, load_args) == ModelId("arweave", OWNER, "iris", "iris.torch", "2")


def test_v1_without_model_fields_is_the_default_model():
    assert model_id_from_v1(None, None) is None


@pytest.mark.parametrize(
    ("source", "load_args", "says"),
    [
        (0, {"path": "/etc/passwd"}, "LOCAL"),
        ("LOCAL", {"path": "/x"}, "LOCAL"),
        (3, {"repo_id": "a/b", "filename": "f"}, "3 is unknown"),
        (True, {"repo_id": "a/b", "filename": "f"}, "got true"),
        ("S3", {"repo_id": "a/b", "filename": "f"}, '"S3" is unknown'),
        (2, None, "model_source without load_args"),
        (None, {"repo_id": "a/b", "filename": "f"}, "load_args without model_source"),
        (2, ["a/b"], "load_args: expected an object"),
        (2, {"filename": "f"}, "load_args.repo_id"),
        (2, {"repo_id": "a/b"}, "load_args.filename"),
        (2, {"repo_id": "a/b", "filename": ""}, "load_args.filename"),
        (2, {"repo_id": "a/b", "filename": "f", "version": 3}, "load_args.version"),
        (2, {"repo_id": "ab", "filename": "f"}, "expected owner/name"),
        (2, {"repo_id": "a/b/c", "filename": "f"}, "expected owner/name"),
        (1, {"repo_id": "a/b", "filename": "f"}, "Arweave wallet address"),
    ],
)
def test_v1_malformed(source, load_args, says):
    with pytest.raises(ModelIdError, match=says):
        model_id_from_v1(source, load_args)


def test_v1_chain_fields():
    assert model_id_from_v1_chain(0, "", "", "") is None  # the 1.x service's default model, whatever the source
    assert model_id_from_v1_chain(7, "", "", "") is None
    assert str(model_id_from_v1_chain(2, "Org/repo", "m.torch", "")) == "huggingface/Org/repo:m.torch"
    assert str(model_id_from_v1_chain(2, "Org/repo", "m.torch", "v2")) == "huggingface/Org/repo/v2:m.torch"
    for source, says in ((0, "LOCAL"), (5, "unknown")):
        with pytest.raises(ModelIdError, match=says):
            model_id_from_v1_chain(source, "Org/repo", "m.torch", "")
    with pytest.raises(ModelIdError, match="empty filename"):
        model_id_from_v1_chain(2, "Org/repo", "", "v1")


# ---- the 2.0 ABI form ---------------------------------------------------------------------------------------------

# repo = abi.encode(uint8 2, string "Ritual-Net", string "iris-classification", string ""):
#   head: 2 (huggingface), then the three strings' offsets 0x80, 0xc0, 0x100 (each short string takes a length word
#   and one data word: 0x80 + 2 words = 0xc0, + 2 words = 0x100); tails: "Ritual-Net" (10 bytes),
#   "iris-classification" (19 bytes), "" (length 0, no data word). 4 + 2 + 2 + 1 = 9 words = 0x120 bytes.
IRIS_REPO_HEX = (
    word(2) + word(0x80) + word(0xC0) + word(0x100) + text("Ritual-Net") + text("iris-classification") + text("")
)
# model_id = abi.encode(bytes repo, string "iris.torch"): offsets 0x40 and 0x40 + 32 + 0x120 = 0x180.
IRIS_ABI_HEX = word(0x40) + word(0x180) + word(0x120) + IRIS_REPO_HEX + text("iris.torch")


def test_abi_form_matches_hand_computed_bytes():
    repo = encode(["uint8", "string", "string", "string"], [2, "Ritual-Net", "iris-classification", ""])
    assert repo.hex() == IRIS_REPO_HEX
    assert encode(["bytes", "string"], [repo, "iris.torch"]).hex() == IRIS_ABI_HEX
    assert encode_model_id_abi(parse_model_id(IRIS)).hex() == IRIS_ABI_HEX
    assert decode_model_id_abi(bytes.fromhex(IRIS_ABI_HEX)) == parse_model_id(IRIS)


@pytest.mark.parametrize(
    "model_id",
    [f"arweave/{OWNER}/iris/3:iris.torch", "huggingface/Org/repo", "huggingface/Org/repo/abc123:sub/m.pt2"],
)
def test_abi_round_trip(model_id):
    m = parse_model_id(model_id)
    assert decode_model_id_abi(encode_model_id_abi(m)) == m


def test_empty_abi_model_id_is_the_default_model():
    assert decode_model_id_abi(b"") is None


def _abi(storage: int, owner: str, name: str, version: str, files: str) -> bytes:
    return encode(
        ["bytes", "string"], [encode(["uint8", "string", "string", "string"], [storage, owner, name, version]), files]
    )


@pytest.mark.parametrize(
    ("blob", "says"),
    [
        (bytes.fromhex(IRIS_ABI_HEX)[:-32], "not an ABI encoding"),
        (bytes.fromhex(IRIS_ABI_HEX) + bytes(32), "not the canonical ABI encoding"),
        (bytes.fromhex(word(0x60) + word(0x1A0) + word(0) + IRIS_ABI_HEX[128:]), "model_id"),
        (bytes(31), "not an ABI encoding"),
        (_abi(0, "a", "b", "", "f"), "cannot name a file on the server"),
        (_abi(9, "a", "b", "", "f"), "storage 9 is unknown"),
        (_abi(2, "a", "b", "", "x,y"), "names 2 files"),
        (_abi(2, "a/b", "c", "", "f"), "owner 'a/b'"),
        (_abi(2, "a", "b", "", "../f"), "not a valid file name"),
        (bytes(3000), "more than 2048"),
    ],
)
def test_malformed_abi_model_ids(blob, says):
    with pytest.raises(ModelIdError, match=says):
        decode_model_id_abi(blob)


def test_abi_repo_with_bad_utf8_is_refused():
    repo = bytes.fromhex(
        word(2) + word(0x80) + word(0xC0) + word(0x100) + word(1) + "ff".ljust(64, "0") + text("b") + text("")
    )
    blob = encode(["bytes", "string"], [repo, "f"])
    with pytest.raises(ModelIdError, match="model_id repo"):
        decode_model_id_abi(blob)


# ---- ALLOWED_MODELS -----------------------------------------------------------------------------------------------


def test_setting_forms():
    assert parse_allowed_models(None) == ()
    assert parse_allowed_models("  ") == ()
    assert parse_allowed_models('["huggingface/Ritual-Net/*"]') == ("huggingface/Ritual-Net/*",)
    assert parse_allowed_models(f"huggingface/Ritual-Net/*, arweave/{OWNER}/*,") == (
        "huggingface/Ritual-Net/*",
        f"arweave/{OWNER}/*",
    )


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("[", "malformed JSON"),
        ('["a", 1]', "JSON list of model id patterns"),
        ('{"a": 1}', "expected source/owner/repo"),  # not a list: read as comma-separated text
        ("*", "expected source/owner/repo"),
        ("huggingface/*", "expected source/owner/repo"),
        ("huggingface/**/x", "'\\*\\*' is not supported"),
        ("*/Ritual-Net/*", "the source must be huggingface or arweave"),
        ("local/a/*", "the source must be huggingface or arweave"),
        ("huggingface/Ritual Net/*", "not a valid name"),
        ("huggingface/a/b:", "expected source/owner/repo"),
        ("huggingface/a/b:x,y", "pattern 'y'"),  # the comma separates patterns
        ("arweave/short/*", "not a valid arweave owner"),
        ("huggingface/a/b/c/d", "expected source/owner/repo"),
        ("huggingface/a/b:../x", "not a valid file part"),
    ],
)
def test_setting_errors_name_the_variable(raw, says):
    with pytest.raises(AllowListError, match=says) as caught:
        parse_allowed_models(raw)
    assert str(caught.value).startswith("ALLOWED_MODELS: ")


def test_setting_bounds_the_pattern_count():
    with pytest.raises(AllowListError, match="more than 256"):
        parse_allowed_models(",".join(f"huggingface/o{i}/*" for i in range(300)))


@pytest.mark.parametrize(
    ("pattern", "model_id", "expected"),
    [
        ("huggingface/Ritual-Net/*", IRIS, True),
        ("huggingface/Ritual-Net/*", "huggingface/Ritual-Net/iris/v1:iris.torch", True),
        ("huggingface/Ritual-Net/*", "huggingface/Ritual-Net/iris", True),
        ("huggingface/Ritual-Net/*", "huggingface/ritual-net/iris:iris.torch", False),  # case-sensitive
        ("huggingface/Ritual-Net/*", "huggingface/Ritual-Net-evil/iris:iris.torch", False),
        ("huggingface/Ritual-Net/*", f"arweave/{OWNER}/iris:iris.torch", False),
        ("huggingface/Ritual-*/*", "huggingface/Ritual-Net/iris:iris.torch", True),
        ("huggingface/*/iris", "huggingface/evil/x/iris", False),  # '*' never crosses '/': no shifted segments
        ("huggingface/*/iris", "huggingface/anyone/iris:m.torch", True),
        ("huggingface/Org/repo", "huggingface/Org/repo/v2:m.torch", True),  # no version in the pattern: any
        ("huggingface/Org/repo/v2", "huggingface/Org/repo/v2:m.torch", True),
        ("huggingface/Org/repo/v2", "huggingface/Org/repo/v3:m.torch", False),
        ("huggingface/Org/repo/v2", "huggingface/Org/repo:m.torch", False),
        ("huggingface/Org/repo/*", "huggingface/Org/repo:m.torch", False),  # a version segment needs a version
        ("huggingface/Org/repo/*", "huggingface/Org/repo/abc:m.torch", True),
        ("huggingface/Org/repo:m.torch", "huggingface/Org/repo:m.torch", True),
        ("huggingface/Org/repo:m.torch", "huggingface/Org/repo:n.torch", False),
        ("huggingface/Org/repo:m.torch", "huggingface/Org/repo", False),
        ("huggingface/Org/repo:*.pt2", "huggingface/Org/repo:m.pt2", True),
        ("huggingface/Org/repo:*.pt2", "huggingface/Org/repo:sub/m.pt2", False),  # '*' stays in one file part
        ("huggingface/Org/repo:*/*.pt2", "huggingface/Org/repo:sub/m.pt2", True),
        ("huggingface/Org/repo:*.pt2", "huggingface/Org/repo:m.pt2x", False),
        (f"arweave/{OWNER}/*", f"arweave/{OWNER}/iris/1:iris.torch", True),
        (f"arweave/{OWNER}/*", f"arweave/{OWNER[:-1]}x/iris:iris.torch", False),
        ("huggingface/Org/re.po", "huggingface/Org/reXpo", False),  # '.' is a letter here, not a wildcard
    ],
)
def test_allowed(pattern, model_id, expected):
    assert parse_allowed_models(pattern) == (pattern,)
    assert allowed(parse_model_id(model_id), (pattern,)) is expected


@pytest.mark.parametrize(
    ("patterns", "model_id", "expected"),
    [
        (["huggingface/Org/repo"], "huggingface/Org/repo/abc:m.torch", False),  # "every version": checked
        (["huggingface/Org/repo/*"], "huggingface/Org/repo/abc:m.torch", False),
        (["huggingface/Org/repo/ab*"], "huggingface/Org/repo/abc:m.torch", False),
        (["huggingface/Org/repo/abc"], "huggingface/Org/repo/abc:m.torch", True),  # the operator chose it
        (["huggingface/Org/*/abc:m.torch"], "huggingface/Org/repo/abc:m.torch", True),
        (["huggingface/Org/repo", "huggingface/Org/other/abc"], "huggingface/Org/repo/abc", False),  # not its repo
        (["huggingface/Org/repo/abc:n.torch"], "huggingface/Org/repo/abc:m.torch", False),  # does not allow it
        (["huggingface/Org/repo"], "huggingface/Org/repo:m.torch", False),  # no version: nothing to spell out
    ],
)
def test_version_spelled_out(patterns, model_id, expected):
    assert version_spelled_out(parse_model_id(model_id), patterns) is expected


def test_nothing_is_allowed_by_default_and_any_pattern_suffices():
    m = parse_model_id(IRIS)
    assert allowed(m, ()) is False
    assert allowed(m, ("huggingface/Other/*", "huggingface/Ritual-Net/iris-classification")) is True
