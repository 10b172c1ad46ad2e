"""The model-control parts of the configuration: ``version_policy``, ``warmup``, a
load's JSON ``config`` entry (``MandantConfig.with_model_entries``) and the load
parameters taken (``service.load_config_parameter``)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mandant import warmup
from mandant.config import MAX_WARMUP_ELEMENTS, WarmupConfig, WarmupTensorConfig, parse_config
from mandant.errors import ConfigError, InvalidInput
from mandant.service import MAX_LOAD_CONFIG_CHARS, load_config_parameter
from mandant.warmup import warmup_tensor

IO = {
    "factory": "m:f",
    "inputs": [{"name": "IN", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "OUT", "datatype": "FP32", "shape": [-1, 4]}],
}


def entry(name: str = "m", **extra: Any) -> dict[str, Any]:
    return {"name": name, **IO, **extra}


def config(*models: dict[str, Any]) -> Any:
    return parse_config({"tenants": [{"id": "acme"}], "models": list(models)})


def served(*models: dict[str, Any]) -> list[str]:
    return sorted(s.version for s in config(*models).model_specs(Path("/m")))


def test_without_a_policy_every_configured_version_is_served() -> None:
    assert served(*(entry(version=v) for v in (1, 2, 10))) == ["1", "10", "2"]


@pytest.mark.parametrize("order", [(1, 2), (2, 1)], ids=["v1 first", "v2 first"])
def test_a_tuned_variant_inherits_the_newest_version_its_base_serves(
    order: tuple[int, int],
) -> None:
    """Shared m serves only its newest version (v2): acme's variant inherits v2's
    model, whatever order the entries come in (it took the last entry listed: v1's,
    a version nobody else is served, when v1 came last)."""
    factories = {1: "m:doubles", 2: "m:triples"}
    shared = [entry(version=v, factory=factories[v], version_policy={"latest": 1}) for v in order]
    variant = {"name": "m", "tenant": "acme", "base": "m"}
    specs = config(*shared, variant).model_specs(Path("/m"))
    tuned = next(spec for spec in specs if spec.tenant == "acme")
    assert tuned.factory == "m:triples"
    assert [spec.version for spec in specs if spec.tenant is None] == ["2"]


def test_latest_serves_the_highest_versions_and_specific_the_listed_ones() -> None:
    latest = {"latest": 2}
    assert served(*(entry(version=v, version_policy=latest) for v in (1, 2, 10))) == ["10", "2"]
    # set on one entry, it is the model's
    assert served(entry(version=1), entry(version=2, version_policy={"latest": 1})) == ["2"]
    specific = {"specific": [1, 10]}
    assert served(*(entry(version=v, version_policy=specific) for v in (1, 2, 10))) == ["1", "10"]
    everything = {"all": {}}
    assert served(*(entry(version=v, version_policy=everything) for v in (1, 2))) == ["1", "2"]
    # another tenant's private model of the same name has its own versions and policy
    private = entry(version=3, tenant="acme")
    assert served(entry(version=1, version_policy={"latest": 1}), private) == ["1", "3"]


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({}, "exactly one of"),
        ({"latest": 1, "all": {}}, "exactly one of"),
        ({"latest": 0}, "greater than 0"),
        ({"specific": []}, "at least one version"),
        ({"all": {"x": 1}}, "'all' takes no settings"),
        ({"specific": [4]}, "version_policy names version 4, which has no entry"),
        ({"oldest": 1}, "Extra inputs"),
    ],
)
def test_a_bad_version_policy_is_refused(policy: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(entry(version_policy=policy))


def test_the_entries_of_one_model_agree_on_its_policy() -> None:
    with pytest.raises(ConfigError, match="different version_policy"):
        config(entry(version=1, version_policy={"latest": 1}), entry(version=2,
               version_policy={"all": {}}))  # fmt: skip


def test_warmup_is_validated_and_inherited_by_a_tuned_variant() -> None:
    warmup = [{"inputs": {"IN": {"datatype": "FP32", "shape": [1, 4], "random": True}}}]
    tuned = {"base": "m", "tenant": "acme", "factory": "m:g"}
    specs = config(entry(warmup=warmup), tuned).model_specs(Path("/m"))
    assert [s.warmup[0].count for s in specs] == [1, 1]
    assert config(entry()).model_specs(Path("/m"))[0].warmup == ()


def errors(*models: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as refused:
        config(*models)
    return refused.value.errors


def test_a_warmup_request_gives_the_model_its_declared_inputs_and_no_other() -> None:
    """check-config passed a misspelt input; the load then failed with "warm-up request
    0 failed: InvalidInput: missing input(s): IN", naming not the one misspelt."""
    tensor = {"datatype": "FP32", "shape": [1, 4]}
    second = {"name": "IN2", "datatype": "FP32", "shape": [-1, 4]}
    warmup = [{"inputs": {"IN": tensor}}, {"inputs": {"IN": tensor, "IN2": tensor, "NOPE": tensor}}]
    two_inputs = entry("n", inputs=[*IO["inputs"], second], warmup=warmup)
    assert errors(entry(), two_inputs) == [
        ("models.1.warmup.0.inputs", "missing input(s) IN2 (model 'n' has IN, IN2)"),
        ("models.1.warmup.1.inputs.NOPE", "no such input (model 'n' has IN, IN2)"),
    ]


def test_a_warmup_input_has_its_declared_datatype_and_shape() -> None:
    """check-config passed them; the load then failed with torch's words ("expected
    scalar type Float but found Long", "shapes cannot be multiplied")."""
    warmup = [
        {
            "inputs": {
                "IN": {"datatype": "INT64", "shape": [1, 4]},
                "IN2": {"datatype": "FP32", "shape": [2, 255]},
            }
        },
        {"inputs": {"IN": {"datatype": "FP32", "shape": [3, 4]}, "IN2": {"datatype": "FP32",
                    "shape": [1, 256]}}},
    ]  # fmt: skip
    second = {"name": "IN2", "datatype": "FP32", "shape": [-1, 256]}
    assert errors(entry("n", inputs=[*IO["inputs"], second], warmup=warmup)) == [
        ("models.0.warmup.0.inputs.IN.datatype", "INT64 where model 'n' declares FP32"),
        ("models.0.warmup.0.inputs.IN2.shape",
         "[2, 255] where model 'n' declares [-1, 256] (-1: any size)"),
    ]  # fmt: skip


def test_a_tuned_variant_s_warmup_is_checked_against_its_inputs_as_inherited() -> None:
    """The variant's own warmup against its base's inputs, its base's warmup against
    its own inputs; a model that declares no inputs (Triton's) is not checked."""
    warmup = [{"inputs": {"IN": {"datatype": "FP32", "shape": [1, 4]}}}]
    other = [{"inputs": {"X": {"datatype": "FP32", "shape": [1, 4]}}}]
    renamed = [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]
    variant = {"name": "m", "tenant": "acme", "base": "m"}
    assert errors(entry(warmup=warmup), {**variant, "warmup": other}) == [
        ("models.1.warmup.0.inputs.X", "no such input (model 'm' has IN)"),
        ("models.1.warmup.0.inputs", "missing input(s) IN (model 'm' has IN)"),
    ]
    inherited = ", in the warmup of its base 'm'"
    assert errors(entry(warmup=warmup), {**variant, "inputs": renamed}) == [
        ("models.1.warmup.0.inputs.IN", f"no such input (model 'm' has X){inherited}"),
        ("models.1.warmup.0.inputs", f"missing input(s) X (model 'm' has X){inherited}"),
    ]
    config(entry(warmup=warmup), {**variant, "inputs": renamed, "warmup": other})
    triton = {"name": "t", "backend": "triton", "triton": {"url": "h:8001", "model": "t"}}
    config({**triton, "warmup": other})


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"datatype": "FP32", "shape": [1], "value": 1, "random": True}, "not both"),
        ({"datatype": "BYTES", "shape": [1], "random": True}, "numeric datatypes"),
        ({"datatype": "FP33", "shape": [1]}, "unknown datatype"),
        ({"datatype": "FP32", "shape": [-1]}, "greater than 0"),
        ({"datatype": "FP32", "shape": [MAX_WARMUP_ELEMENTS, 2]}, "more than"),
    ],
)
def test_a_bad_warmup_tensor_is_refused(tensor: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(entry(warmup=[{"inputs": {"IN": tensor}}]))


@pytest.mark.parametrize(
    ("request_", "message"), [({"inputs": {}}, "at least one input"), ({"inputs": {
        "IN": {"datatype": "FP32", "shape": [1]}}, "count": 0}, "greater than 0")],
)  # fmt: skip
def test_a_bad_warmup_request_is_refused(request_: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(entry(warmup=[request_]))


@pytest.mark.parametrize(
    ("datatype", "value", "message"),
    [
        ("UINT8", 300, "out of UINT8's range"),
        ("INT32", 0.5, "INT32 takes an integer"),
        ("FP32", "abc", "FP32 takes a number"),
        ("FP16", 1e10, "out of FP16's range"),
        ("BOOL", "no", "BOOL takes true or false"),
        ("BYTES", True, "BYTES takes text"),
    ],
)
def test_a_warmup_value_its_datatype_cannot_hold_is_refused(
    datatype: str, value: Any, message: str
) -> None:
    """check-config passed them; the load then failed (numpy's OverflowError) or ran a
    warm-up with another value than given ("no" as true, 1e10 as infinity)."""
    tensor = {"datatype": datatype, "shape": [1], "value": value}
    with pytest.raises(ConfigError, match=message):
        config(entry(warmup=[{"inputs": {"IN": tensor}}]))
    fits = {"BYTES": "x", "BOOL": False}.get(datatype, 1)  # one of its own is taken
    WarmupTensorConfig(datatype=datatype, shape=(1,), value=fits)


def test_a_warmup_request_s_inputs_are_bounded_together() -> None:
    """Each input within the bound, many of them not: 2 GiB per request validated."""
    half = {"datatype": "FP32", "shape": [MAX_WARMUP_ELEMENTS // 2 + 1]}
    with pytest.raises(ConfigError, match="elements in all"):
        config(entry(warmup=[{"inputs": {"IN": half, "OTHER": half}}]))


def test_warmup_tensors() -> None:
    rng = np.random.default_rng(0)
    filled = warmup_tensor(WarmupTensorConfig(datatype="INT32", shape=(2, 3), value=7), rng)
    assert filled.dtype == np.dtype("<i4") and filled.shape == (2, 3) and (filled == 7).all()
    zeros = warmup_tensor(WarmupTensorConfig(datatype="FP16", shape=(4,)), rng)
    assert zeros.dtype == np.float16 and not zeros.any()
    noise = warmup_tensor(WarmupTensorConfig(datatype="FP32", shape=(1000,), random=True), rng)
    assert noise.dtype == np.float32 and noise.min() >= 0 and noise.max() < 1
    assert len(set(noise.tolist())) > 1
    bits = warmup_tensor(WarmupTensorConfig(datatype="BOOL", shape=(100,), random=True), rng)
    assert bits.dtype == np.bool_ and bits.any() and not bits.all()
    text = warmup_tensor(WarmupTensorConfig(datatype="BYTES", shape=(2,), value="hi"), rng)
    assert text.tolist() == [b"hi", b"hi"]


async def test_warm_up_makes_its_tensors_off_the_event_loop_once_per_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """2²⁴ random values take 0.36 s to make, ``count`` times each: made on the event
    loop, a model's load held every tenant's calls. Made once per request, in a
    thread; the backend gets the same inputs ``count`` times."""
    made_in: list[int] = []

    def recording(tensor: WarmupTensorConfig, rng: np.random.Generator) -> np.ndarray:
        made_in.append(threading.get_ident())
        return warmup_tensor(tensor, rng)

    monkeypatch.setattr(warmup, "warmup_tensor", recording)
    sent: list[dict[str, np.ndarray]] = []

    class Backend:
        async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            sent.append(inputs)
            return inputs

    request = WarmupConfig(
        inputs={"IN": WarmupTensorConfig(datatype="FP32", shape=(4,), random=True)}, count=3
    )
    await warmup.warm_up(Backend(), [request])  # type: ignore[arg-type]
    assert len(made_in) == 1 and made_in[0] != threading.get_ident()
    assert len(sent) == 3 and all(inputs is sent[0] for inputs in sent)


def test_a_load_entry_replaces_the_model_s_entries_and_is_validated_like_the_file() -> None:
    base = config(entry(version=1), entry(version=2), entry("other"))
    replaced = base.with_model_entries("m", json.dumps(entry(version=5, factory="m:g")))
    specs = {(s.name, s.version): s for s in replaced.model_specs(Path("/m"))}
    assert sorted(specs) == [("m", "5"), ("other", "1")]
    assert specs[("m", "5")].factory == "m:g"
    listed = base.with_model_entries("m", json.dumps([entry(version=1), entry(version=3)]))
    assert sorted(s.version for s in listed.model_specs(Path("/m")) if s.name == "m") == [
        "1", "3"
    ]  # fmt: skip
    new = base.with_model_entries("fresh", json.dumps(entry("fresh", tenant="acme")))
    assert [s.tenant for s in new.model_specs(Path("/m")) if s.name == "fresh"] == ["acme"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", r"\(json\)"),
        ("3", "a model entry or a list"),
        ("[]", "a model entry or a list"),
        (json.dumps(entry("other")), "must name the model loaded"),
        (json.dumps({"name": "m", "platform": "onnxruntime_onnx"}), "Extra inputs"),
        (json.dumps(entry(tenant="nobody")), "unknown tenant"),
        (json.dumps([entry(), entry()]), "defined twice"),
        (json.dumps(entry(version="x")), "positive integers"),
    ],
)
def test_a_bad_load_entry_is_a_config_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(entry()).with_model_entries("m", text)


def test_load_parameters_take_config_only() -> None:
    assert load_config_parameter({}) is None
    assert load_config_parameter({"config": "{}"}) == "{}"
    with pytest.raises(InvalidInput, match="'file:' overrides are not supported"):
        load_config_parameter({"file:1/model.pt": b"x"})
    with pytest.raises(InvalidInput, match="is a string") as caught:
        load_config_parameter({"config": 3})
    with pytest.raises(InvalidInput, match="longer than") as caught:
        load_config_parameter({"config": "x" * (MAX_LOAD_CONFIG_CHARS + 1)})
    with pytest.raises(InvalidInput, match="unknown model load parameter") as caught:
        load_config_parameter({"y" * 10_000: True})
    assert len(str(caught.value)) < 200  # client text is cut, not echoed whole


def test_inline_is_auto_unless_never_and_a_tuned_variant_inherits_it() -> None:
    tuned = {"base": "m", "tenant": "acme", "factory": "m:g"}
    specs = config(entry(inline="never"), tuned, entry("n")).model_specs(Path("/m"))
    assert [s.inline for s in specs] == [False, False, True]
    assert errors(entry(inline="sometimes"))[0][0] == "models.0.inline"


@pytest.mark.parametrize(
    ("entries", "errors"),
    [
        (
            [{**entry(), "factory": None}],  # no path, no factory: found making the specs
            [("0", "torch models need a 'path' (TorchScript or weights) or a 'factory'")],
        ),
        (
            [entry(version=2), entry(version=2)],
            [("1.version", "model 'm' version 2 is defined twice (also 0)")],
        ),
    ],
    ids=["incomplete", "a version twice"],
)
def test_a_load_entry_s_errors_name_the_request_s_own_entries(
    entries: list[dict[str, Any]], errors: list[tuple[str, str]]
) -> None:
    """They named the entry's place in the whole configuration (``models.4``), which
    the admin never sent, under "configuration"."""
    base = config(entry("a", factory="m:f"), entry("b", factory="m:f"), entry(factory="m:f"))
    with pytest.raises(ConfigError) as refused:
        base.entry_specs("m", json.dumps(entries), Path("/m"))
    assert refused.value.source == "the load request's 'config'"
    assert refused.value.errors == errors
