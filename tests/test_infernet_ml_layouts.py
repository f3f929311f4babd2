"""Request and answer layouts of infernet-ml 1.x and 2.0 (api/infernet_ml_layouts.py): pure functions, no server.

Expected bytes are written out word by word (32-byte big-endian ABI words) with the IEEE bit patterns as literals,
not produced by the code under test; eth_abi is checked against the same bytes. The bit patterns can be checked by
hand: 41.0 = 1.28125 * 2**5 -> exponent 1023 + 5 = 0x404, fraction .28125 = 0x48/0x100 -> 0x4044800000000000;
322.0 = 1.2578125 * 2**8 -> 0x4074200000000000; -122.23 has the sign bit set (0xc05e...). The struct module
confirms each one below.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from eth_abi import encode

from core.model_ids import ModelIdError, encode_model_id_abi, parse_model_id
from core.terms import DTYPE_NAMES
from public.infernet_ml_layouts import (
    V1_NAMES,
    V2_CODE_OF,
    V2_CODES,
    Layout,
    LayoutError,
    Reply,
    decode_vector_v1,
    decode_vector_v2,
    describe_answer,
    detect_chain_layout,
    encode_chain_answer,
    encode_vector_v1,
    encode_vector_v2,
    format_offchain_answer,
    ours_to_vector_v2,
    parse_chain_layout,
    shortest_decimal,
    split_chain_request,
    split_request,
    vector_v2_to_ours,
)
from workflows.tensors import decode as decode_tensor

IRIS = [1.0380048, 0.5586108, 1.1037828, 1.712096]
HOUSING = [8.3252, 41.0, 6.984127, 1.02381, 322.0, 2.555556, 37.88, -122.23]
IRIS_BITS = ["3ff09baaebd174d2", "3fe1e023c1a6281d", "3ff1a918273e326b", "3ffb64bec679cc75"]
HOUSING_BITS = [
    "4020a6809d495183", "4044800000000000", "401befbefd00713f", "3ff061869835158c",
    "4074200000000000", "400471c75818c5ca", "4042f0a3d70a3d71", "c05e8eb851eb851f",
]  # fmt: skip
# SD59x18: each value times 10**18, exactly as written in decimal.
IRIS_FIXED = [1038004800000000000, 558610800000000000, 1103782800000000000, 1712096000000000000]
HOUSING_FIXED = [
    8325200000000000000, 41 * 10**18, 6984127000000000000, 1023810000000000000,
    322 * 10**18, 2555556000000000000, 37880000000000000000, -122230000000000000000,
]  # fmt: skip
MODEL = "huggingface/Ritual-Net/iris-classification:iris.torch"


def word(n: int) -> str:
    return n.to_bytes(32, "big", signed=n < 0).hex()


def bits_word(bits: str, signed: bool) -> str:
    """A 64-bit pattern in a word: zero-extended as uint64 (1.x), sign-extended as int64 (2.0)."""
    fill = "f" if signed and int(bits[0], 16) >= 8 else "0"
    return fill * 48 + bits


def v1_vector_hex(bits: list[str], shape: list[int]) -> str:
    # abi.encode(uint8 1 (double), uint16[] shape, uint64[] bits): head = dtype, offset of shape (3 words = 0x60),
    # offset of values (0x60 + length word + one word per dimension).
    values_at = 0x60 + 32 * (1 + len(shape))
    shape_hex = word(len(shape)) + "".join(word(d) for d in shape)
    return (
        word(1)
        + word(0x60)
        + word(values_at)
        + shape_hex
        + word(len(bits))
        + "".join(bits_word(b, False) for b in bits)
    )


def v2_vector_hex(bits: list[str], shape: list[int]) -> str:
    # abi.encode(uint8 0 (ieee), uint8 18, uint8 2 (float64), uint16[] shape, int64[] bits): head of 5 words (0xa0).
    values_at = 0xA0 + 32 * (1 + len(shape))
    shape_hex = word(len(shape)) + "".join(word(d) for d in shape)
    head = word(0) + word(18) + word(2) + word(0xA0) + word(values_at)
    return head + shape_hex + word(len(bits)) + "".join(bits_word(b, True) for b in bits)


def bytes_tail(hex_data: str) -> str:
    return word(len(hex_data) // 2) + hex_data.ljust(-(-len(hex_data) // 64) * 64, "0")


def v1_request_hex(vector_hex: str) -> str:
    # abi.encode(uint8 0, "", "", "", bytes vector): 5-word head (0xa0); each empty string is one length word.
    return word(0) + word(0xA0) + word(0xC0) + word(0xE0) + word(0x100) + word(0) * 3 + bytes_tail(vector_hex)


def v2_request_hex(model_hex: str, vector_hex: str) -> str:
    # abi.encode(bytes model_id, bytes vector): 2-word head (0x40), then each bytes' length word and padded data.
    model_tail = bytes_tail(model_hex) if model_hex else word(0)
    return word(0x40) + word(0x40 + len(model_tail) // 2) + model_tail + bytes_tail(vector_hex)


CASES = [("iris", IRIS, IRIS_BITS, IRIS_FIXED), ("housing", HOUSING, HOUSING_BITS, HOUSING_FIXED)]


def test_bit_patterns_are_the_values():
    for values, bits in ((IRIS, IRIS_BITS), (HOUSING, HOUSING_BITS)):
        assert [struct.pack(">d", v).hex() for v in values] == bits


def test_numberings():
    assert V1_NAMES == DTYPE_NAMES  # 1.x DataType numbers our names in the same order: float 0 ... bool 11
    assert [V2_CODES[c][0] for c in range(16)] == [
        "float16", "float32", "float64", "float128", "float256", "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64", "complex64", "complex128", "bool",
    ]  # fmt: skip
    assert {V2_CODES[V2_CODE_OF[name]][1] for name in V2_CODE_OF if name != "bfloat16"} == set(DTYPE_NAMES) - {
        "bfloat16"
    }


# ---- CHAIN, every layout, both test vectors ------------------------------------------------------------------------


@pytest.mark.parametrize(("label", "values", "bits", "fixed"), CASES)
def test_int256_layout(label, values, bits, fixed):
    expected = word(0x20) + word(len(values)) + "".join(word(f) for f in fixed)
    assert encode(["int256[]"], [fixed]).hex() == expected
    model, tensor, reply = split_chain_request(expected)
    assert (model, reply) == (None, Reply())
    assert tensor == {"dtype": "double", "shape": [1, len(values)], "values": values}


@pytest.mark.parametrize(("label", "values", "bits", "fixed"), CASES)
def test_v1_layout(label, values, bits, fixed):
    vector = v1_vector_hex(bits, [1, len(values)])
    request = v1_request_hex(vector)
    words = [int(b, 16) for b in bits]
    assert encode(["uint8", "uint16[]", "uint64[]"], [1, [1, len(values)], words]).hex() == vector
    assert (
        encode(["uint8", "string", "string", "string", "bytes"], [0, "", "", "", bytes.fromhex(vector)]).hex()
        == request
    )
    assert encode_vector_v1("double", [1, len(values)], values).hex() == vector
    model, tensor, reply = split_chain_request(request)
    assert model is None
    assert tensor == {"dtype": "double", "shape": [1, len(values)], "values": values}
    assert reply == Reply(Layout.V1, raw_input=request, dtype="double")
    assert decode_tensor(tensor).tolist() == [values]


@pytest.mark.parametrize(("label", "values", "bits", "fixed"), CASES)
def test_v2_layout_default_and_named_model(label, values, bits, fixed):
    vector = v2_vector_hex(bits, [1, len(values)])
    signed = [struct.unpack(">q", bytes.fromhex(b))[0] for b in bits]
    assert (
        encode(["uint8", "uint8", "uint8", "uint16[]", "int64[]"], [0, 18, 2, [1, len(values)], signed]).hex() == vector
    )
    assert encode_vector_v2("double", [1, len(values)], values).hex() == vector
    request = v2_request_hex("", vector)
    assert encode(["bytes", "bytes"], [b"", bytes.fromhex(vector)]).hex() == request
    model, tensor, reply = split_chain_request(request)
    assert (model, reply) == (None, Reply(Layout.V2))
    assert tensor == {"dtype": "double", "shape": [1, len(values)], "values": values}

    model_hex = encode_model_id_abi(parse_model_id(MODEL)).hex()  # its bytes are checked in tests/test_model_ids.py
    named = v2_request_hex(model_hex, vector)
    assert encode(["bytes", "bytes"], [bytes.fromhex(model_hex), bytes.fromhex(vector)]).hex() == named
    model, tensor, _ = split_chain_request(named)
    assert str(model) == MODEL
    assert decode_tensor(tensor).tolist() == [values]


def test_v1_layout_naming_a_model():
    vector = v1_vector_hex(IRIS_BITS, [1, 4])
    request = encode(
        ["uint8", "string", "string", "string", "bytes"],
        [2, "Ritual-Net/iris-classification", "iris.torch", "", bytes.fromhex(vector)],
    ).hex()
    model, _, _ = split_chain_request(request)
    assert str(model) == MODEL


def test_answers_in_each_layout():
    iris_class = {"dtype": "long", "shape": [1], "values": np.array([2])}
    # 1.x: abi.encode(uint8 10 (long), uint16[] [1], int64[] [2]); raw_input echoes the request, as 1.x did.
    v1 = word(10) + word(0x60) + word(0xA0) + word(1) + word(1) + word(1) + word(2)
    assert encode(["uint8", "uint16[]", "int64[]"], [10, [1], [2]]).hex() == v1
    assert encode_chain_answer(iris_class, Reply(Layout.V1, raw_input="ab")) == {
        "raw_input": "ab",
        "processed_input": "",
        "raw_output": v1,
        "processed_output": "",
        "proof": "",
    }
    # 2.0: abi.encode(uint8 0, uint8 18, uint8 8 (int64), uint16[] [1], int64[] [2]).
    v2 = word(0) + word(18) + word(8) + word(0xA0) + word(0xE0) + word(1) + word(1) + word(1) + word(2)
    assert encode(["uint8", "uint8", "uint8", "uint16[]", "int64[]"], [0, 18, 8, [1], [2]]).hex() == v2
    assert encode_chain_answer(iris_class, Reply(Layout.V2))["raw_output"] == v2

    price = {"dtype": "double", "shape": [1, 1], "values": np.array([[4.151943055154582]])}
    bits = struct.pack(">d", 4.151943055154582).hex()
    assert bits == "40109b96f5d2f918"
    ieee = (
        word(0)
        + word(18)
        + word(2)
        + word(0xA0)
        + word(0x100)
        + word(2)
        + word(1)
        + word(1)
        + word(1)
        + bits_word(bits, True)
    )
    assert encode_chain_answer(price, Reply(Layout.V2))["raw_output"] == ieee
    # fixed point: every vector becomes float128 (code 3, int128 words) of value * 10**decimals.
    fixed = word(1) + word(18) + word(3) + word(0xA0) + word(0x100) + word(2) + word(1) + word(1) + word(1)
    fixed += word(4151943055154582000)
    assert (
        encode(["uint8", "uint8", "uint8", "uint16[]", "int128[]"], [1, 18, 3, [1, 1], [4151943055154582000]]).hex()
        == fixed
    )
    assert encode_chain_answer(price, Reply(Layout.V2, fixed_point=True))["raw_output"] == fixed
    assert decode_vector_v2(bytes.fromhex(fixed)) == {"dtype": "double", "shape": [1, 1], "values": [4.151943055154582]}

    with pytest.raises(LayoutError, match="int256"):
        encode_chain_answer(price, Reply())
    with pytest.raises(LayoutError, match=r"holds 1 tensor \(an object with keys a\); a 1\.x CHAIN answer holds one"):
        encode_chain_answer({"a": price}, Reply(Layout.V1))


# ---- detection and the setting ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "layout"),
    [(0, Layout.V1), (1, Layout.V1), (2, Layout.V1), (0x20, Layout.CLASSIC), (0x40, Layout.V2), (0x80, Layout.V2)],
)
def test_detect(first, layout):
    assert detect_chain_layout(bytes.fromhex(word(first) + word(0))) == layout


@pytest.mark.parametrize(
    "blob", [b"", bytes(31), bytes.fromhex(word(3)), bytes.fromhex(word(0x41)), bytes.fromhex("ff" * 32)]
)
def test_detect_refuses_unknown_first_words(blob):
    with pytest.raises(LayoutError, match="data: "):
        detect_chain_layout(blob)


def test_setting_forces_one_layout():
    assert parse_chain_layout(None) == "auto"
    assert parse_chain_layout(" V2 ") == "v2"
    with pytest.raises(LayoutError, match=r"^CHAIN_LAYOUT: expected one of auto, int256, v1, v2"):
        parse_chain_layout("v3")
    int256 = encode(["int256[]"], [IRIS_FIXED]).hex()
    with pytest.raises(LayoutError, match=r"2\.0 layout"):
        split_chain_request(int256, "v2")
    v1 = v1_request_hex(v1_vector_hex(IRIS_BITS, [1, 4]))
    with pytest.raises(LayoutError, match="int256"):
        split_chain_request(v1, "int256")
    # Forced v1 takes a source beyond 0..2 with empty strings as the default model, as 1.x did.
    odd_source = encode(
        ["uint8", "string", "string", "string", "bytes"],
        [7, "", "", "", bytes.fromhex(v1_vector_hex(IRIS_BITS, [1, 4]))],
    )
    assert split_chain_request(odd_source.hex(), "v1")[0] is None
    with pytest.raises(LayoutError, match="fits no CHAIN layout"):
        split_chain_request(odd_source.hex())


def test_v2_optional_trailing_options_are_ignored_as_2_0_did():
    vector = bytes.fromhex(v2_vector_hex(IRIS_BITS, [1, 4]))
    request = encode(["bytes", "bytes", "uint8", "uint8"], [b"", vector, 1, 6]).hex()
    assert request[:64] == word(0x80)
    model, tensor, reply = split_chain_request(request)
    assert (model, reply, tensor["values"]) == (None, Reply(Layout.V2), IRIS)


# ---- malformed CHAIN data -----------------------------------------------------------------------------------------


def _v1_request(vector: bytes, source: int = 0) -> str:
    return encode(["uint8", "string", "string", "string", "bytes"], [source, "", "", "", vector]).hex()


def _v2_request(vector: bytes) -> str:
    return encode(["bytes", "bytes"], [b"", vector]).hex()


GOOD_V1 = bytes.fromhex(v1_vector_hex(IRIS_BITS, [1, 4]))
GOOD_V2 = bytes.fromhex(v2_vector_hex(IRIS_BITS, [1, 4]))


@pytest.mark.parametrize(
    ("hex_data", "says"),
    [
        (v1_request_hex(v1_vector_hex(IRIS_BITS, [1, 4]))[:-64], "1.x layout"),  # truncated
        (word(0) + word(0xC0) + v1_request_hex(v1_vector_hex(IRIS_BITS, [1, 4]))[128:], "1.x layout"),  # moved offset
        (_v1_request(GOOD_V1[:-32]), "truncated"),
        (_v1_request(bytes.fromhex(word(12)) + GOOD_V1[32:]), "dtype code 12 is unknown"),
        (_v1_request(bytes.fromhex(word(1) + word(0x80)) + GOOD_V1[64:]), "shape offset 128, expected 96"),
        (_v1_request(bytes.fromhex(word(1) + word(0x60) + word(0x100)) + GOOD_V1[96:]), "values offset 256"),
        (
            _v1_request(encode(["uint8", "uint16[]", "uint64[]"], [1, [1, 5], [1, 2, 3, 4]])),
            "holds 5 elements, values has 4",
        ),
        (_v1_request(encode(["uint8", "uint16[]", "uint64[]"], [1, [1] * 33, [1]])), "33 dimensions"),
        (_v1_request(bytes.fromhex(word(1) + word(0x60) + word(0x80) + word(0) + word(2**200))), "exceed the limit"),
        (_v1_request(encode(["uint8", "uint16[]", "uint64[]"], [1, [1], [0x7FF0000000000000]])), "NaN or infinite"),
        (_v1_request(encode(["uint8", "uint16[]", "uint64[]"], [1, [1], [0x7FF8000000000000]])), "NaN or infinite"),
        (_v1_request(bytes.fromhex(word(256)) + GOOD_V1[32:]), "not a uint8"),
        (
            encode(["uint8", "string", "string", "string", "bytes"], [0, "Org/repo", "", "", GOOD_V1]).hex(),
            "LOCAL",
        ),
        (
            encode(["uint8", "string", "string", "string", "bytes"], [2, "Org/repo", "", "", GOOD_V1]).hex(),
            "empty filename",
        ),
        (_v2_request(GOOD_V2[:-1]), "2.0 vector"),
        (_v2_request(bytes.fromhex(word(2)) + GOOD_V2[32:]), "arithmetic 2 is unknown"),
        (_v2_request(GOOD_V2[:64] + bytes.fromhex(word(16)) + GOOD_V2[96:]), "dtype code 16 is unknown"),
        (
            _v2_request(encode(["uint8", "uint8", "uint8", "uint16[]", "int128[]"], [0, 18, 3, [1], [2**100]])),
            "beyond 64 bits",
        ),
        (
            _v2_request(encode(["uint8", "uint8", "uint8", "uint16[]", "uint64[]"], [0, 18, 12, [1], [2**63]])),
            "does not fit long",
        ),
        (_v2_request(encode(["uint8", "uint8", "uint8", "uint16[]", "bool[]"], [0, 18, 15, [2], [True]])), "holds 2"),
        (encode(["bytes", "bytes"], [b"\x01", GOOD_V2]).hex(), "model_id"),
        (word(0x40) + word(0x60) + word(0) + word(2**64), "2.0 layout"),
        (word(0x20) + word(2**64), "exceed the limit"),
        (word(0x20) + word(0), "empty"),
        (word(0x20) + word(1), "int256"),
        ("zz", "not a hex string"),
    ],
)
def test_malformed_chain_data_is_a_layout_error(hex_data, says):
    with pytest.raises((LayoutError, ModelIdError), match=says) as caught:
        split_chain_request(hex_data)
    assert isinstance(caught.value, ValueError)


def test_element_limit_is_the_callers():
    request = v2_request_hex("", v2_vector_hex(HOUSING_BITS, [1, 8]))
    with pytest.raises(LayoutError, match="8 values exceed the limit of 4"):
        split_chain_request(request, max_elements=4)


# ---- vector codecs: every dtype round-trips --------------------------------------------------------------------


VALUES = {
    "float": [1.5, -2.25],
    "double": [1.0380048, -122.23],
    "half": [0.5, -65504.0],
    "bfloat16": [1.0, -3.0],
    "uint8": [0, 255],
    "int8": [-128, 127],
    "short": [-32768, 32767],
    "int": [-(2**31), 2**31 - 1],
    "long": [-(2**63), 2**63 - 1],
    "bool": [True, False],
    "cfloat": [[1.0, -2.0], [0.5, 3.0]],
    "cdouble": [[1.0380048, -2.0], [0.5, 3.0]],
}


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_v1_round_trip(name):
    back = decode_vector_v1(encode_vector_v1(name, [2], VALUES[name]))
    # bfloat16 is code 5 in IEEE half bits, as 1.x wrote it and reads it back
    assert back == {"dtype": name, "shape": [2], "values": VALUES[name]}


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_v2_round_trip(name):
    back = decode_vector_v2(encode_vector_v2(name, [2], VALUES[name]))
    assert back == {"dtype": "float" if name == "bfloat16" else name, "shape": [2], "values": VALUES[name]}
    assert decode_tensor(back).shape == (2,)


def test_v1_bfloat16_code_is_read_as_half_bits_as_1x_wrote_it():
    half_bits = struct.unpack(">H", struct.pack(">e", 1.5))[0]
    blob = encode(["uint8", "uint16[]", "uint16[]"], [5, [1], [half_bits]])
    assert decode_vector_v1(blob) == {"dtype": "bfloat16", "shape": [1], "values": [1.5]}


def test_v2_wide_and_unsigned_codes_map_to_our_dtypes():
    for code, solidity, word_value, expected in [
        (4, "int256", struct.unpack(">q", struct.pack(">d", -2.5))[0], ("double", -2.5)),
        (10, "uint16", 65535, ("int", 65535)),
        (11, "uint32", 2**32 - 1, ("long", 2**32 - 1)),
        (12, "uint64", 2**63 - 1, ("long", 2**63 - 1)),
    ]:
        blob = encode(["uint8", "uint8", "uint8", "uint16[]", f"{solidity}[]"], [0, 18, code, [1], [word_value]])
        assert decode_vector_v2(blob) == {"dtype": expected[0], "shape": [1], "values": [expected[1]]}


def test_v2_fixed_point_inputs():
    blob = encode(["uint8", "uint8", "uint8", "uint16[]", "int128[]"], [1, 18, 3, [1, 4], IRIS_FIXED])
    assert decode_vector_v2(blob)["values"] == IRIS
    blob = encode(["uint8", "uint8", "uint8", "uint16[]", "int64[]"], [1, 2, 8, [1], [7]])  # integers are not scaled
    assert decode_vector_v2(blob)["values"] == [7]
    re_im = ((-150 & 0xFFFFFFFF) << 32) | 25  # complex64: real -1.50 and imaginary 0.25 at 2 decimals
    blob = encode(["uint8", "uint8", "uint8", "uint16[]", "uint64[]"], [1, 2, 13, [1], [re_im]])
    assert decode_vector_v2(blob)["values"] == [[-1.5, 0.25]]


def test_answer_encoding_errors():
    with pytest.raises(LayoutError, match="uint16"):
        encode_vector_v1("double", [70000], np.zeros(70000))
    with pytest.raises(LayoutError, match="holds 3 elements"):
        encode_vector_v2("double", [3], [1.0, 2.0])
    with pytest.raises(LayoutError, match="no fixed-point encoding"):
        encode_vector_v2("cfloat", [1], [[1.0, 2.0]], fixed_point=True)
    with pytest.raises(LayoutError, match="does not fit int128"):
        encode_vector_v2("double", [1], [1e30], fixed_point=True)
    # Non-finite values and JSON nulls: the contract's one text in every 1.x and 2.0 CHAIN answer, fixed point too
    # (this path said "has no fixed-point form" for NaN and infinity, and a null was a TypeError, a 500).
    for values in ([float("nan")], [float("inf")], [-float("inf")], [None], [1.0, None]):
        for name in ("double", "float", "long"):
            with pytest.raises(LayoutError, match="a value is NaN or infinite"):
                encode_vector_v2(name, [len(values)], values, fixed_point=True)
    with pytest.raises(LayoutError, match=r"has no 1\.x dtype code"):
        encode_vector_v1("uint16", [1], [1])
    with pytest.raises(LayoutError, match=r"values\[0\]: 300 does not fit uint8 \[0, 255\]"):
        encode_vector_v1("uint8", [1], [300])
    # 1.x answers in the request's dtype: values are cast to it where nothing is lost, else a LayoutError (422)
    assert decode_vector_v1(encode_vector_v1("long", [2], np.array([1.0, 2.0], dtype=np.float32), "float")) == {
        "dtype": "long",
        "shape": [2],
        "values": [1, 2],
    }
    with pytest.raises(LayoutError, match=r"values\[1\]: 0.5 does not fit long"):
        encode_vector_v1("long", [2], np.array([1.0, 0.5]), "double")
    with pytest.raises(LayoutError, match="beyond half's range"):
        encode_vector_v1("half", [1], np.array([1e6]), "double")
    with pytest.raises(LayoutError, match=r"complex values \(cdouble\) cannot be written as float"):
        encode_vector_v1("float", [1], np.array([[1.0, 2.0]]), "cdouble")
    assert decode_vector_v1(encode_vector_v1("cfloat", [1], [2.0], "double"))["values"] == [[2.0, 0.0]]
    # A value beyond cfloat's float32 parts is refused as for the real dtypes (it was written as +inf, which the next
    # container's decoder refuses), whether the model answered a real or a complex dtype.
    for values, own in ((np.array([1e300]), "double"), (np.array([[1.0, -1e300]]), "cdouble")):
        with pytest.raises(LayoutError, match="beyond cfloat's range"):
            encode_vector_v1("cfloat", [1], values, own)
    assert decode_vector_v1(encode_vector_v1("cdouble", [1], np.array([[1e300, 0.0]]), "cdouble"))["values"] == [
        [1e300, 0.0]
    ]
    assert decode_vector_v1(encode_vector_v1("int", [2], np.array([True, False]), "bool"))["values"] == [1, 0]


# ---- OFFCHAIN ------------------------------------------------------------------------------------------------------


def test_todays_form_passes_unchanged():
    data = {"dtype": "double", "values": [IRIS], "bot": 1}
    assert split_request(data) == (None, data, Reply())
    assert split_request("not a dict") == (None, "not a dict", Reply())
    assert split_request({"values": [1]}) == (None, {"values": [1]}, Reply())


@pytest.mark.parametrize(("label", "values", "bits", "fixed"), CASES)
def test_v2_offchain(label, values, bits, fixed):
    data = {"model_id": MODEL, "input": {"dtype": 2, "shape": [1, len(values)], "values": values}}
    model, tensor, reply = split_request(data)
    assert str(model) == MODEL
    assert tensor == {"dtype": "double", "shape": [1, len(values)], "values": values}
    assert reply == Reply(Layout.V2)
    assert decode_tensor(tensor).tolist() == [values]
    answer = {"dtype": "double", "shape": [1, 1], "values": np.array([[4.151943055154582]])}
    out = format_offchain_answer(answer, reply)
    assert out["dtype"] == 2 and out["shape"] == [1, 1] and out["values"].tolist() == [4.151943055154582]
    bare = split_request({"dtype": 1, "shape": [len(values)], "values": values})
    assert bare[1]["dtype"] == "float" and bare[2] == Reply(Layout.V2)


def test_v2_offchain_default_model_and_output_options():
    data = {
        "model_id": None,
        "input": {"dtype": 8, "values": [1, 2]},
        "output_arithmetic": "fixed_point",
        "output_num_decimals": 6,
    }
    model, tensor, reply = split_request(data)
    assert model is None and tensor == {"dtype": "long", "shape": [2], "values": [1, 2]}
    assert reply == Reply(Layout.V2, fixed_point=True, decimals=6)
    assert split_request({"input": {"dtype": 1, "values": [1.0]}, "output_num_decimals": 0})[2].decimals == 18


@pytest.mark.parametrize(("label", "values", "bits", "fixed"), CASES)
def test_v1_offchain(label, values, bits, fixed):
    data = {
        "input": {"dtype": "double", "shape": [1, len(values)], "values": [values]},
        "model_source": 2,
        "load_args": {"repo_id": "Ritual-Net/iris-classification", "filename": "iris.torch"},
    }
    model, tensor, reply = split_request(data)
    assert str(model) == MODEL
    assert tensor == {"dtype": "double", "shape": [1, len(values)], "values": [values]}
    assert reply == Reply(Layout.V1, dtype="double")
    # 1.x answered the model's values flattened, labelled with the request's dtype (TorchInferenceResult.outputs)
    answer = {"dtype": "float", "shape": [1, 2], "values": np.array([[2, 0.1]], dtype=np.float32)}
    formatted = format_offchain_answer(answer, reply)
    assert formatted["dtype"] == "double" and formatted["shape"] == [1, 2]
    assert formatted["values"].tolist() == [2.0, 0.10000000149011612]  # 1.x's tolist() of a float32
    assert split_request({"input": data["input"]})[0] is None


def test_complex_offchain_v2_pairs():
    tensor = vector_v2_to_ours({"dtype": 13, "shape": [2], "values": [[1.0, 2.0], [3.0, -4.0]]})
    assert decode_tensor(tensor).tolist() == [1 + 2j, 3 - 4j]
    out = ours_to_vector_v2(
        {"dtype": "cfloat", "shape": [2], "values": np.array([[1.0, 2.0], [3.0, -4.0]], np.float32)}
    )
    assert out["dtype"] == 13 and out["values"].tolist() == [[1.0, 2.0], [3.0, -4.0]]
    assert ours_to_vector_v2({"dtype": "bfloat16", "shape": [1], "values": [1.5]}) == {
        "dtype": 1,
        "shape": [1],
        "values": [1.5],
    }
    out = ours_to_vector_v2({"dtype": "float", "shape": [2, 2], "values": torch.ones(2, 2).numpy()})
    assert out["values"].tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"model_id": None, "input": [1, 2]}, "input: expected an object"),
        ({"input": {"dtype": 16, "values": [1]}}, "input.dtype: 16 is not a 2.0 dtype code"),
        ({"input": {"dtype": -1, "values": [1]}}, "not a 2.0 dtype code"),
        ({"input": {"dtype": 2, "values": "1,2"}}, "input.values: expected a flat list"),
        ({"input": {"dtype": 2, "shape": [1, 3], "values": [1.0, 2.0]}}, "holds 3 elements, values has 2"),
        ({"input": {"dtype": 2, "shape": [2], "values": [[1.0], [2.0]]}}, "values are flat"),
        ({"input": {"dtype": 2, "shape": "2", "values": [1.0]}}, "input.shape"),
        ({"input": {"dtype": 2, "shape": [-1], "values": [1.0]}}, r"input.shape\[0\]"),
        ({"input": {"dtype": 2, "shape": [True], "values": [1.0]}}, r"input.shape\[0\]"),
        ({"input": {"dtype": 2, "shape": [1] * 33, "values": [1.0]}}, "33 dimensions exceed the limit of 32"),
        ({"input": {"dtype": 2, "shape": [10**9, 10**9], "values": [1.0]}}, "is not a dimension"),
        ({"input": {"dtype": 2, "values": [0.0] * 10}, "model_id": 3}, "expected a string"),
        ({"input": {"dtype": 2, "values": [1.0]}, "model_id": ""}, "parts"),
        # A local id is parsed here: public/app.py serves the default model by it, any other is a 400 (HTTP tests).
        ({"input": {"dtype": 2, "values": [1.0]}, "model_id": MODEL, "model_source": 2}, "one way"),
        ({"input": {"dtype": "double", "values": [1.0]}, "model_source": 2}, "model_source without load_args"),
        ({"input": {"dtype": 2, "values": [1.0]}, "output_arithmetic": "float"}, "output_arithmetic"),
        ({"input": {"dtype": 2, "values": [1.0]}, "output_arithmetic": True}, "output_arithmetic"),
        ({"input": {"dtype": 2, "values": [1.0]}, "output_num_decimals": 39}, "output_num_decimals"),
        ({"input": {"dtype": 2, "values": [1.0]}, "output_num_decimals": "6"}, "output_num_decimals"),
        ({"dtype": 99, "values": [1]}, "data.dtype: 99"),
    ],
)
def test_malformed_offchain(data, says):
    with pytest.raises((LayoutError, ModelIdError), match=says):
        split_request(data)


def test_offchain_element_limit():
    with pytest.raises(LayoutError, match="exceed the limit of 3"):
        split_request({"input": {"dtype": 2, "values": [1.0] * 4}}, max_elements=3)


@pytest.mark.parametrize(
    "data",
    [
        {"input": [[1.0380048, 0.5586108, 1.1037828, 1.712096]]},  # the original ONNX service's form
        {"input": {"text": "a custom workflow's own object"}},
        {"inputs": {"input": {"dtype": "float", "values": [[1, 2, 3, 4]]}}},  # the ONNX workflow's named inputs
        {"text": "no tensor at all"},
    ],
)
def test_a_workflows_own_data_is_not_taken_for_an_envelope(data):
    model, tensor, reply = split_request(data)
    assert (model, tensor, reply.layout) == (None, data, Layout.CLASSIC)


def test_an_input_that_names_a_model_must_be_a_vector():
    with pytest.raises(LayoutError, match="input: expected an object with dtype, shape and values"):
        split_request({"model_id": "huggingface/Org/repo:model.torch", "input": [[1, 2]]})


# ---- what the layouts hold, as a contract reads it -----------------------------------------------------------------


def test_shortest_decimal_is_the_values_own_dtype():
    from decimal import Decimal

    assert shortest_decimal(np.float32(0.1)) == Decimal("0.1")  # not 0.10000000149011612, its float64 widening
    assert shortest_decimal(np.float16(0.1)) == Decimal("0.1")  # half 0.0999755859375
    assert shortest_decimal(np.float64(0.1)) == Decimal("0.1")
    assert shortest_decimal(0.1) == Decimal("0.1")
    bfloat16_tenth = float(torch.tensor(0.1, dtype=torch.bfloat16).float())  # 0.10009765625
    assert shortest_decimal(np.float32(bfloat16_tenth), "bfloat16") == Decimal("0.1")
    assert shortest_decimal(np.float32(bfloat16_tenth)) == Decimal("0.100097656")  # float32 digits
    fixed = encode_vector_v2("float", [1], np.array([0.1], np.float32), fixed_point=True)
    assert fixed[-32:] == (10**17).to_bytes(32, "big")


@pytest.mark.parametrize(
    ("answer", "holds"),
    [
        ([{"dtype": "float", "shape": [1], "values": [1.0]}] * 2, "2 tensors (a list)"),
        ({"a": {"dtype": "float", "shape": [1], "values": [1.0]}, "b": 3}, "1 tensor (an object with keys a, b)"),
        ({"label": "cat"}, "an object with keys label"),
        ("cat", "a string"),
    ],
)
def test_describe_answer(answer, holds):
    assert describe_answer(answer) == holds


def test_a_2_0_answer_holds_one_vector_and_its_codes_range():
    tensor = {"dtype": "float", "shape": [1], "values": np.array([1.0], np.float32)}
    with pytest.raises(LayoutError, match=r"holds 2 tensors \(a list\); a 2\.0 answer holds one vector"):
        format_offchain_answer([tensor, tensor], Reply(Layout.V2))
    assert format_offchain_answer({"label": "cat"}, Reply(Layout.V2)) == {"label": "cat"}  # a workflow's own JSON
    with pytest.raises(LayoutError, match=r"values\[1\]: 300 does not fit uint8 \[0, 255\]"):
        ours_to_vector_v2({"dtype": "uint8", "shape": [2], "values": [1, 300]})
    assert ours_to_vector_v2({"dtype": "uint8", "shape": [2], "values": [1, 255]})["values"] == [1, 255]


def test_trailing_bytes_after_a_vector_are_ignored():
    assert decode_vector_v1(GOOD_V1 + bytes(32))["values"] == IRIS
    assert decode_vector_v2(GOOD_V2 + b"\x01")["values"] == IRIS
    request = v1_request_hex(v1_vector_hex(IRIS_BITS, [1, 4])) + word(0)
    assert split_chain_request(request)[1]["values"] == IRIS


def test_2_0_onnx_named_inputs_and_result_list():
    # C7: 2.0's ONNX service took {"model_id"?, "inputs": {name: RitualVector}} and answered {"result": [vectors]}.
    data = {
        "model_id": MODEL,
        "inputs": {"a": {"dtype": 1, "shape": [2], "values": [1.5, 2]}, "b": {"dtype": 8, "values": [3]}},
        "output_arithmetic": "fixed_point",
    }
    model, tensors, reply = split_request(data)
    assert str(model) == MODEL
    assert tensors == {
        "inputs": {
            "a": {"dtype": "float", "shape": [2], "values": [1.5, 2]},
            "b": {"dtype": "long", "shape": [1], "values": [3]},
        }
    }
    assert reply == Reply(Layout.V2, fixed_point=True, results=True)
    # Our own named inputs (1.x ONNX's form) stay the workflow's data; the model they name is still read.
    model, tensors, reply = split_request({"model_id": MODEL, "inputs": {"a": {"dtype": "float", "values": [1]}}})
    assert (str(model), tensors, reply) == (MODEL, {"inputs": {"a": {"dtype": "float", "values": [1]}}}, Reply())
    with pytest.raises(LayoutError, match=r"^inputs\.a\.dtype: 99 is not a 2\.0 dtype code"):
        split_request({"inputs": {"a": {"dtype": 99, "values": [1]}}})
    one = {"dtype": "float", "shape": [1], "values": np.array([0.5], dtype=np.float32)}
    two = {"dtype": "long", "shape": [1], "values": np.array([7])}
    answer = format_offchain_answer({"y": one, "n": two}, Reply(Layout.V2, results=True))
    assert [(v["dtype"], v["shape"], np.asarray(v["values"]).tolist()) for v in answer["result"]] == [
        (1, [1], [0.5]),
        (8, [1], [7]),
    ]
    with pytest.raises(LayoutError, match=r"2\.0's result is a list of vectors"):
        format_offchain_answer({"label": "cat"}, Reply(Layout.V2, results=True))
