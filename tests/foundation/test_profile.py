"""Profile files: round trips, and one typed error for each kind of bad file."""

from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from steering_vectors import (
    ModelFingerprint,
    Profile,
    ProfileFormatError,
    ProfileLayerError,
    ProfileMismatchError,
    ProfileShapeError,
    ProfileValueError,
)
from steering_vectors.core.gguf_io import read_control_vector, write_control_vector
from steering_vectors.core.models import model_fingerprint
from tests.conftest import TINY_HIDDEN, TINY_LAYERS, TOY_GENERATION, make_tiny_llama


@pytest.fixture(scope="module")
def fingerprint(tiny_model) -> ModelFingerprint:
    return model_fingerprint(tiny_model)


def _profile(fingerprint: ModelFingerprint | None, layers=(1, 3), size=TINY_HIDDEN, **kwargs) -> Profile:
    gen = torch.Generator().manual_seed(0)
    return Profile(
        name=kwargs.pop("name", "helpful"),
        offsets={layer: torch.randn(size, generator=gen) for layer in layers},
        description="test profile",
        fingerprint=fingerprint,
        default_strength=1.25,
        position_mode="generated",
        method="rahf",
        provenance={"data": "unit", "pairs": 3},
        **kwargs,
    )


def _assert_same(a: Profile, b: Profile) -> None:
    assert a.summary() == b.summary()
    assert a.layers == b.layers
    for layer in a.layers:
        assert torch.equal(a.offsets[layer], b.offsets[layer])


def test_safetensors_round_trip(tmp_path, fingerprint):
    profile = _profile(fingerprint)
    path = profile.save(tmp_path / "helpful.safetensors")
    loaded = Profile.load(path)
    _assert_same(profile, loaded)
    assert loaded.validate_for(fingerprint) is loaded
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file
    assert path.stat().st_mode & 0o777 == 0o644  # readable by the server's user in a container


def test_the_same_profile_is_always_the_same_bytes(fingerprint):
    """safetensors writes its metadata map in hash order, new on every call: without a fixed header order the
    same profile saved twice had two digests (two replicas given one upload disagreed on its version)."""
    import hashlib
    import json
    import struct

    from safetensors.torch import load as st_load

    gen = torch.Generator().manual_seed(1)
    profile = _profile(fingerprint, low_rank={1: (torch.randn(2, TINY_HIDDEN, generator=gen),
                                                 torch.randn(TINY_HIDDEN, 2, generator=gen))})  # fmt: skip
    saves = [profile.to_bytes() for _ in range(4)] + [Profile.from_bytes(profile.to_bytes()).to_bytes()]
    assert len({hashlib.sha256(data).hexdigest() for data in saves}) == 1
    data = saves[0]
    (length,) = struct.unpack("<Q", data[:8])
    assert length % 8 == 0  # padded as safetensors pads its header
    header = json.loads(data[8 : 8 + length])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert [key for key in header if key != "__metadata__"] == sorted(
        (key for key in header if key != "__metadata__"), key=lambda key: header[key]["data_offsets"])
    tensors = st_load(data)  # still a plain safetensors file, tensor for tensor
    assert set(tensors) == {"offset.1", "offset.3", "down.1", "up.1"}
    assert torch.equal(tensors["up.1"], profile.low_rank[1][1]) and torch.equal(tensors["offset.3"], profile.offsets[3])


def test_shipped_profiles_are_stored_in_the_fixed_byte_order():
    """A shipped file's sha256 is the digest it is served under and the one a re-upload of it gets."""
    from pathlib import Path

    folder = Path(__file__).parents[2] / "profiles"
    # profiles/judges holds the generation judge's reward heads (docs/judge.md), which are not profiles
    shipped = sorted(p for p in folder.rglob("*.safetensors") if "judges" not in p.relative_to(folder).parts)
    assert len(shipped) >= 10  # the four top-level profiles, six baselines and the comparison's
    for path in shipped:
        data = path.read_bytes()
        assert Profile.from_bytes(data).to_bytes() == data, path


def test_gguf_round_trip_keeps_tensors_and_metadata(fingerprint):
    profile = _profile(fingerprint)
    data = write_control_vector(profile)
    assert data[:4] == b"GGUF"
    _assert_same(profile, read_control_vector(data, name="helpful"))


def test_gguf_layout_follows_llama_cpp_convention(tmp_path, fingerprint):
    profile = _profile(fingerprint, layers=(1, 3))
    path = tmp_path / "cv.gguf"
    path.write_bytes(write_control_vector(profile))
    reader = gguf.GGUFReader(path)
    names = sorted(t.name for t in reader.tensors)
    assert names == ["direction.1", "direction.3"]
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    count = reader.fields["controlvector.layer_count"]
    assert int(count.parts[count.data[0]][0]) == 2
    tensor = next(t for t in reader.tensors if t.name == "direction.3")
    assert np.array_equal(np.asarray(tensor.data).reshape(-1), profile.offsets[3].numpy())


def test_foreign_gguf_control_vector_imports_without_fingerprint(tmp_path):
    path = tmp_path / "foreign.gguf"
    writer = gguf.GGUFWriter(path, "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 2)
    vectors = {2: np.arange(TINY_HIDDEN, dtype=np.float32), 3: -np.ones(TINY_HIDDEN, dtype=np.float32)}
    for layer, vector in vectors.items():
        writer.add_tensor(f"direction.{layer}", vector)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    profile = read_control_vector(path.read_bytes(), name="foreign")
    assert profile.fingerprint is None and profile.layers == [2, 3]
    assert torch.equal(profile.offsets[2], torch.arange(TINY_HIDDEN, dtype=torch.float32))


def _control_vector(tmp_path, tensors: dict[str, np.ndarray]) -> bytes:
    path = tmp_path / "cv.gguf"
    writer = gguf.GGUFWriter(path, "controlvector")
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_gguf_directions_must_be_float_vectors(tmp_path):
    flat = np.ones(TINY_HIDDEN, dtype=np.float32)
    with pytest.raises(ProfileShapeError, match=r"'direction.2' has shape \(2, 32\), expected 1-D"):
        read_control_vector(_control_vector(tmp_path, {"direction.2": flat.reshape(2, -1)}), name="x")
    with pytest.raises(ProfileFormatError, match="'direction.2' is int32; directions are floating point"):
        read_control_vector(_control_vector(tmp_path, {"direction.2": flat.astype(np.int32)}), name="x")
    half = read_control_vector(_control_vector(tmp_path, {"direction.2": flat.astype(np.float16)}), name="x")
    assert half.offsets[2].dtype == torch.float32 and torch.equal(half.offsets[2], torch.ones(TINY_HIDDEN))


def test_gguf_export_refuses_layer_zero(fingerprint):
    with pytest.raises(ProfileLayerError, match="layer 0"):
        write_control_vector(_profile(fingerprint, layers=(0, 2)))


@pytest.mark.parametrize("cut", [4, 40, -10])
def test_truncated_files_raise_format_error(fingerprint, cut):
    data = _profile(fingerprint).to_bytes()
    with pytest.raises(ProfileFormatError):
        Profile.from_bytes(data[:cut])
    gguf_data = write_control_vector(_profile(fingerprint))
    with pytest.raises(ProfileFormatError):
        read_control_vector(gguf_data[:cut], name="x")


def test_not_a_profile_raises_format_error():
    with pytest.raises(ProfileFormatError, match="metadata"):
        Profile.from_bytes(st_save({"offset.1": torch.zeros(4)}))
    with pytest.raises(ProfileFormatError):
        Profile.from_bytes(b"hello world, not a profile")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_raise_value_error(fingerprint, bad):
    profile = _profile(fingerprint)
    tensors = {f"offset.{layer}": t.clone() for layer, t in profile.offsets.items()}
    tensors["offset.3"][5] = bad
    with pytest.raises(ProfileValueError, match="NaN or Inf"):
        Profile.from_bytes(st_save(tensors, metadata=profile.metadata()))


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.uint8])
def test_non_float_offsets_raise_format_error(fingerprint, dtype):
    profile = _profile(fingerprint)
    tensors = {f"offset.{layer}": t.clone() for layer, t in profile.offsets.items()}
    tensors["offset.3"] = tensors["offset.3"].to(dtype)
    with pytest.raises(ProfileFormatError, match=f"'offset.3' is {dtype}; offsets are floating point"):
        Profile.from_bytes(st_save(tensors, metadata=profile.metadata()))
    tensors["offset.3"] = tensors["offset.1"].half()  # any float width is fine: stored as float32
    loaded = Profile.from_bytes(st_save(tensors, metadata=profile.metadata()))
    assert loaded.offsets[3].dtype == torch.float32
    assert torch.equal(loaded.offsets[3], profile.offsets[1].half().float())


def test_summary_is_strict_json_with_non_finite_provenance(fingerprint):
    # the calibration records NaN accuracy for strengths it skipped; a summary must still be strict JSON
    profile = _profile(fingerprint)
    calibration = {"rows": [{"accuracy": float("nan")}], "limit": float("inf"), "pairs": (1, 2.5)}
    profile.provenance = {"calibration": calibration}
    loaded = Profile.from_bytes(profile.to_bytes())
    summary = json.loads(json.dumps(loaded.summary(), allow_nan=False))
    assert summary["provenance"] == {"calibration": {"rows": [{"accuracy": None}], "limit": None, "pairs": [1, 2.5]}}
    assert loaded.provenance["calibration"]["limit"] == float("inf")  # the stored record itself is untouched


def test_a_generation_section_travels_with_the_file_and_leaves_the_tensors_alone(fingerprint, generation_record):
    profile = _profile(fingerprint)
    assert profile.generation is None and profile.summary()["generation"] is None  # older files: no section
    annotated = Profile.from_bytes(profile.with_generation(generation_record).to_bytes())
    assert annotated.generation == generation_record
    assert annotated.provenance == {**profile.provenance, "generation": TOY_GENERATION}
    assert annotated.format_version == profile.format_version == 1  # older readers keep reading it
    shown = json.loads(json.dumps(annotated.summary(), allow_nan=False))["generation"]
    assert [row["perplexity_change"] for row in shown["strengths"]] == pytest.approx([0.1, 0.5])
    assert {k: v for k, v in shown.items() if k != "strengths"} == {
        k: v for k, v in TOY_GENERATION.items() if k != "strengths"}
    # the same tensors, byte for byte: only the header differs
    before, after = profile.to_bytes(), annotated.to_bytes()
    assert before != after and profile.tensor_digest() == annotated.tensor_digest()
    assert before[-len(profile.offsets) * TINY_HIDDEN * 4 :] == after[-len(profile.offsets) * TINY_HIDDEN * 4 :]
    _assert_same(profile, Profile.from_bytes(before))
    # keys this version does not know are kept in the file and left out of the record
    extra = {**TOY_GENERATION, "judged_by": "someone"}
    kept = Profile("x", dict(profile.offsets), provenance={"generation": extra})
    assert Profile.from_bytes(kept.to_bytes()).provenance["generation"] == extra
    assert kept.generation is not None and "judged_by" not in kept.summary()["generation"]
    # how the replies were made, where it is not the default: the profile's decoding defaults, conditions honoured
    made = {**TOY_GENERATION, "decoding": {"repetition_penalty": 1.15}, "conditions": "honoured"}
    stored = Profile("x", dict(profile.offsets), provenance={"generation": made}).to_bytes()
    record = Profile.from_bytes(stored).generation
    assert record is not None and (record.decoding, record.conditions) == ({"repetition_penalty": 1.15}, "honoured")
    assert record.to_json() == made and "decoding" not in annotated.generation.to_json()


@pytest.mark.parametrize(("change", "message"), [
    ({"set": ""}, "set and judge"),
    ({"replies": "elsewhere"}, "replies 'elsewhere'"),
    ({"judge_sha256": "abc"}, "judge_sha256"),
    ({"half_b": 3}, "half A"),
    ({"chosen_strength": 0.5}, "chosen strength 0.5"),
    ({"unsteered": {"loop_rate": 1.5}}, "loop_rate 1.5 is not a share"),
    ({"strengths": []}, "at least one"),
    ({"strengths": [{**TOY_GENERATION["strengths"][1]}, {**TOY_GENERATION["strengths"][0]}]}, "sorted"),
    ({"strengths": [{**TOY_GENERATION["strengths"][0], "low": 0.9, "high": 0.6}]}, "reversed"),
    ({"strengths": [{**TOY_GENERATION["strengths"][0], "strength": 0}]}, "unsteered row"),
    ({"strengths": [{**TOY_GENERATION["strengths"][0], "win_rate": "high"}]}, "not a number"),
    ({"prompts": None}, "not a count"),
    ({"conditions": "sometimes"}, "conditions 'sometimes'"),
    ({"decoding": {"repetition_penalty": "high"}}, "not an object of finite numbers"),
    ({"decoding": [1.15]}, "not an object of finite numbers"),
])  # fmt: skip
def test_a_malformed_generation_section_is_refused(fingerprint, change, message):
    from safetensors.torch import load as st_load

    profile = _profile(fingerprint)
    metadata = {**profile.metadata(), "provenance": json.dumps({"generation": {**TOY_GENERATION, **change}})}
    with pytest.raises(ProfileFormatError, match=f"generation section of the provenance: .*{message}"):
        Profile.from_bytes(st_save(st_load(profile.to_bytes()), metadata=metadata))
    with pytest.raises(ProfileFormatError, match="generation section"):
        Profile("x", dict(profile.offsets), provenance={"generation": {**TOY_GENERATION, **change}})


def test_wrong_hidden_size_raises_shape_error(fingerprint):
    other = _profile(None, size=TINY_HIDDEN * 2)
    with pytest.raises(ProfileShapeError, match="hidden size"):
        Profile.from_bytes(other.to_bytes()).validate_for(fingerprint)


def test_layer_out_of_range_raises_layer_error(fingerprint):
    profile = _profile(None, layers=(1, TINY_LAYERS))
    with pytest.raises(ProfileLayerError, match=f"layers \\[{TINY_LAYERS}\\]"):
        Profile.from_bytes(profile.to_bytes()).validate_for(fingerprint)


def test_other_models_fingerprint_raises_mismatch_error(fingerprint):
    other_weights = model_fingerprint(make_tiny_llama(seed=123))
    assert other_weights.digest != fingerprint.digest
    profile = Profile.from_bytes(_profile(other_weights).to_bytes())
    with pytest.raises(ProfileMismatchError, match="other weights"):
        profile.validate_for(fingerprint)
    assert profile.validate_for(fingerprint, check_digest=False) is profile
    other_arch = ModelFingerprint("gpt2", TINY_HIDDEN, TINY_LAYERS, fingerprint.digest)
    with pytest.raises(ProfileMismatchError, match="gpt2"):
        _profile(other_arch).validate_for(fingerprint)


def test_fingerprint_is_dtype_independent_and_sees_the_tokenizer(tiny_model, fingerprint):
    as_bf16 = make_tiny_llama(seed=0).to(torch.bfloat16)
    assert model_fingerprint(as_bf16) == fingerprint

    class Tok:
        chat_template = ""

        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    assert model_fingerprint(tiny_model, Tok({"a": 0})).digest != model_fingerprint(tiny_model, Tok({"b": 0})).digest


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 65, "bad name"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ProfileFormatError, match="invalid profile name"):
        Profile(name=name, offsets={0: torch.zeros(4)})


def test_newer_format_version_is_refused(fingerprint):
    profile = _profile(fingerprint)
    meta = profile.metadata() | {"format_version": "99"}
    data = st_save({f"offset.{k}": v for k, v in profile.offsets.items()}, metadata=meta)
    with pytest.raises(ProfileFormatError, match="newer"):
        Profile.from_bytes(data)


def test_header_length_past_end_is_format_error():
    data = struct.pack("<Q", 10_000) + json.dumps({"__metadata__": {}}).encode()
    with pytest.raises(ProfileFormatError, match="truncated"):
        Profile.from_bytes(data)


# -- low-rank (input-dependent) terms ---------------------------------------------------------------


def _low_rank(layers=(1, 3), rank=2, seed=1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        layer: (torch.randn(rank, TINY_HIDDEN, generator=gen), torch.randn(TINY_HIDDEN, rank, generator=gen))
        for layer in layers
    }


def test_low_rank_round_trip_writes_version_2(fingerprint):
    plain = Profile.from_bytes(_profile(fingerprint).to_bytes())
    assert plain.format_version == 1 and plain.low_rank == {} and plain.summary()["low_rank"] == {}
    profile = _profile(fingerprint, low_rank=_low_rank())
    loaded = Profile.from_bytes(profile.to_bytes())
    assert loaded.format_version == 2 and loaded.ranks() == {1: 2, 3: 2}
    assert loaded.summary()["low_rank"] == {"1": 2, "3": 2}
    _assert_same(profile, loaded)
    for layer in (1, 3):
        assert all(torch.equal(a, b) for a, b in zip(profile.low_rank[layer], loaded.low_rank[layer], strict=True))
    assert loaded.renamed("other").low_rank.keys() == loaded.low_rank.keys()


def test_low_rank_terms_are_validated(fingerprint):
    # terms that do not fit the file's own offsets are format errors (400 on upload), not model mismatches
    with pytest.raises(ProfileFormatError, match="no offset"):
        _profile(fingerprint, low_rank=_low_rank(layers=(2,)))
    down, up = _low_rank()[1]
    with pytest.raises(ProfileFormatError, match="expected"):
        _profile(fingerprint, low_rank={1: (down, up[:, :1])})
    with pytest.raises(ProfileFormatError, match="expected"):
        _profile(fingerprint, low_rank={1: (down[:, :8], up)})
    with pytest.raises(ProfileValueError, match="NaN or Inf"):
        _profile(fingerprint, low_rank={1: (down, up * float("inf"))})
    # files: a down without its up, and a 1-D down
    profile = _profile(fingerprint)
    tensors = {f"offset.{k}": v for k, v in profile.offsets.items()}
    with pytest.raises(ProfileFormatError, match="only one of"):
        Profile.from_bytes(st_save({**tensors, "down.1": down}, metadata=profile.metadata()))
    with pytest.raises(ProfileShapeError, match="expected 2-D"):
        Profile.from_bytes(st_save({**tensors, "down.1": down[0], "up.1": up}, metadata=profile.metadata()))


def test_gguf_export_refuses_low_rank_terms(fingerprint):
    with pytest.raises(ProfileFormatError, match="low-rank"):
        write_control_vector(_profile(fingerprint, low_rank=_low_rank()))


def test_profiles_list_shows_low_rank_terms_and_decoding_defaults(tmp_path, fingerprint, capsys):
    from steering_vectors.cli import main

    _profile(fingerprint, name="flat").save(tmp_path / "flat.safetensors")
    _profile(fingerprint, name="rich", low_rank=_low_rank(rank=3)).save(tmp_path / "rich.safetensors")
    from steering_vectors.core.profile import Condition

    gated = Condition(layer=1, direction=torch.ones(TINY_HIDDEN), threshold=0.5)
    _profile(fingerprint, name="tuned", decoding={"repetition_penalty": 1.15}, condition=gated).save(
        tmp_path / "tuned.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    assert main(["profiles", "list", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bad.safetensors") and "INVALID" in lines[0]
    assert lines[1].split() == ["flat", "layers=[1,", "3]", "method=rahf", "strength=1.25"]
    assert lines[2].split() == ["rich", "layers=[1,", "3]", "method=rahf", "strength=1.25", "low-rank=3"]
    assert lines[3].split() == ["tuned", "layers=[1,", "3]", "method=rahf", "strength=1.25", "condition",
                              "repetition_penalty=1.15"]


# -- conditions (format version 4) ------------------------------------------------------------------------


def _conditional(**condition_kwargs) -> Profile:
    from steering_vectors.core.profile import Condition

    g = torch.Generator().manual_seed(0)
    kwargs = {"layer": 2, "direction": torch.randn(8, generator=g), "threshold": 0.25, **condition_kwargs}
    return Profile(name="c", offsets={1: torch.randn(8, generator=g), 3: torch.randn(8, generator=g)},
                   condition=Condition(**kwargs))


def test_a_condition_round_trips_and_makes_version_4() -> None:
    profile = _conditional(comparison="<", reads="last")
    loaded = Profile.from_bytes(profile.to_bytes())
    cond = loaded.condition
    assert loaded.format_version == 4 and cond is not None
    assert (cond.layer, cond.threshold, cond.comparison, cond.reads) == (2, 0.25, "<", "last")
    assert torch.equal(cond.direction, profile.condition.direction)
    assert loaded.to_bytes() == Profile.from_bytes(loaded.to_bytes()).to_bytes()
    assert loaded.summary()["condition"] == {"layer": 2, "threshold": 0.25, "comparison": "<", "reads": "last",
                                             "score": "cosine"}
    assert cond.fires(0.0) and not cond.fires(0.5)
    assert cond.score(cond.direction * 3) == pytest.approx(1.0)


def test_profiles_without_a_condition_keep_their_version() -> None:
    plain = Profile(name="p", offsets={1: torch.ones(8)})
    again = Profile.from_bytes(plain.to_bytes())
    assert again.format_version == 1 and again.condition is None and again.summary()["condition"] is None
    assert "condition" not in again.metadata()


@pytest.mark.parametrize("kwargs, error", [
    ({"direction": torch.zeros(8)}, "not zero"),
    ({"direction": torch.full((8,), float("nan"))}, "finite"),
    ({"threshold": float("inf")}, "finite number"),
    ({"comparison": ">="}, "comparison"),
    ({"reads": "first"}, "reads"),
    ({"layer": -1}, "non-negative"),
    ({"direction": torch.ones(5)}, "direction has 5 values"),
])
def test_bad_conditions_are_typed_errors(kwargs, error) -> None:
    from steering_vectors.core.errors import ProfileError

    with pytest.raises(ProfileError, match=error):
        _conditional(**kwargs)


def test_malformed_condition_files_are_refused() -> None:
    from steering_vectors.core.errors import ProfileFormatError

    profile = _conditional()
    meta = profile.metadata()
    tensors = {"offset.1": profile.offsets[1], "condition.2": profile.condition.direction}
    with pytest.raises(ProfileFormatError, match="without the 'condition' metadata"):
        Profile.from_bytes(st_save(tensors, metadata={k: v for k, v in meta.items() if k != "condition"}))
    with pytest.raises(ProfileFormatError, match="without a condition"):
        Profile.from_bytes(st_save({"offset.1": profile.offsets[1]}, metadata=meta))
    with pytest.raises(ProfileFormatError, match="at most one"):
        Profile.from_bytes(st_save({**tensors, "condition.3": profile.condition.direction.clone()}, metadata=meta))
    with pytest.raises(ProfileFormatError, match="malformed|threshold"):
        Profile.from_bytes(st_save(tensors, metadata={**meta, "condition": '{"comparison": ">"}'}))


def test_a_condition_past_the_models_layers_is_refused_and_gguf_cannot_carry_one() -> None:
    from steering_vectors.core.errors import ProfileFormatError, ProfileLayerError

    profile = _conditional(layer=6)
    with pytest.raises(ProfileLayerError, match="condition reads layer 6"):
        profile.validate_for(ModelFingerprint("llama", 8, 4))
    profile.validate_for(ModelFingerprint("llama", 8, 7))
    with pytest.raises(ProfileFormatError, match="condition"):
        write_control_vector(profile)


def test_the_shipped_profiles_load_unchanged() -> None:
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[2] / "profiles").glob("*.safetensors")):
        profile = Profile.load(path)
        # a file's version is the newest feature it uses: decoding defaults (5), a condition (4), LoRA (3), low rank
        expected = (5 if profile.decoding else 4 if profile.condition else 3 if profile.lora
                    else 2 if profile.low_rank else 1)  # fmt: skip
        assert profile.format_version == expected, path.name


# -- decoding defaults (format version 5) -----------------------------------------------------------------


def test_decoding_defaults_round_trip_and_make_version_5() -> None:
    from steering_vectors.core.profile import FORMAT_VERSION

    profile = Profile(name="d", offsets={1: torch.ones(8)}, decoding={"repetition_penalty": 1.15})
    loaded = Profile.from_bytes(profile.to_bytes())
    assert loaded.format_version == 5 == FORMAT_VERSION and loaded.decoding == {"repetition_penalty": 1.15}
    assert json.loads(loaded.metadata()["decoding"]) == {"repetition_penalty": 1.15}
    assert loaded.summary()["decoding"] == {"repetition_penalty": 1.15}
    plain = Profile.from_bytes(Profile(name="p", offsets={1: torch.ones(8)}).to_bytes())
    assert plain.format_version == 1 and plain.decoding == {} and "decoding" not in plain.metadata()


@pytest.mark.parametrize("decoding, error", [
    ({"temperature": 0.7}, "not one of"),
    ({"repetition_penalty": 0.9}, r"in \[1, 10\]"),
    ({"repetition_penalty": float("nan")}, r"in \[1, 10\]"),
    ({"repetition_penalty": True}, "must be a number"),
    ({"repetition_penalty": "1.1"}, "must be a number"),
    ([("repetition_penalty", 1.1)], "must be an object"),
])
def test_bad_decoding_defaults_are_typed_errors(decoding, error) -> None:
    from steering_vectors.core.errors import ProfileError

    with pytest.raises(ProfileError, match=error):
        Profile(name="d", offsets={1: torch.ones(8)}, decoding=decoding)
    meta = Profile(name="d", offsets={1: torch.ones(8)}).metadata()
    with pytest.raises(ProfileError, match=error):  # and in a file
        Profile.from_bytes(st_save({"offset.1": torch.ones(8)}, metadata={**meta, "decoding": json.dumps(decoding)}))


def test_merged_decoding_takes_the_largest_penalty_of_the_acting_profiles() -> None:
    from steering_vectors.core.profile import merged_decoding

    def p(name: str, **decoding: float) -> Profile:
        return Profile(name=name, offsets={1: torch.ones(8)}, decoding=decoding)

    strong, mild, none = p("s", repetition_penalty=1.3), p("m", repetition_penalty=1.1), p("n")
    assert merged_decoding([(mild, 1.0), (strong, -0.5), (none, 2.0)]) == {"repetition_penalty": 1.3}
    assert merged_decoding([(strong, 0.0), (mild, 1.0)]) == {"repetition_penalty": 1.1}  # strength 0: not acting
    assert merged_decoding([(none, 1.0)]) == {} and merged_decoding([]) == {}
