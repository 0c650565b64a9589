"""Submission validation, one violation per invalid field."""

from __future__ import annotations

from scheduler.service.model import JobSpec
from scheduler.service.validation import (
    MAX_ALLOWED_REGIONS,
    MAX_BATCH_JOBS,
    MAX_CHECKPOINT_REF_BYTES,
    MAX_COMMAND_ARGS,
    MAX_ENV_BYTES,
    MAX_ENV_VALUE_BYTES,
    MAX_ENV_VARS,
    MAX_MODELS,
    MAX_REGIONS_SHOWN,
    validate_array_size,
    validate_batch_size,
    validate_spec,
)


def fields_of(spec: JobSpec) -> set[str]:
    return {v.field for v in validate_spec(spec)}


def valid_spec(**changes: object) -> JobSpec:
    values: dict[str, object] = {"name": "ok", "project_id": "p1", "command": ("true",)}
    values.update(changes)
    return JobSpec(**values)  # type: ignore[arg-type]


def test_valid_spec_has_no_violations() -> None:
    assert validate_spec(valid_spec()) == []


def test_each_invalid_field_is_named() -> None:
    cases = {
        "spec.project_id": valid_spec(project_id=""),
        "spec.command": valid_spec(command=()),
        "spec.task_count": valid_spec(task_count=0),
        "spec.accelerator_millis_per_task": valid_spec(accelerator_millis_per_task=2500),
        "spec.wall_time_seconds": valid_spec(wall_time_s=0),
        "spec.grace_seconds": valid_spec(grace_s=100_000),
        "spec.priority_class": valid_spec(priority="urgent"),
        "spec.accelerators.models[0]": valid_spec(models=("no such/model",)),
        "spec.allowed_regions[0]": valid_spec(allowed_regions=("eu-west",)),
        "spec.environment['1BAD']": valid_spec(env=(("1BAD", "x"),)),
    }
    for field, spec in cases.items():
        assert fields_of(spec) == {field}, field


def test_share_of_one_accelerator_is_valid() -> None:
    assert validate_spec(valid_spec(accelerator_millis_per_task=250)) == []


def test_unknown_jurisdiction_is_rejected_with_known_ones() -> None:
    spec = valid_spec(allowed_regions=("prov/reg", "jurisdiction:EU"))
    violations = validate_spec(spec, jurisdictions={"CN", "NO"})
    assert [v.field for v in violations] == ["spec.allowed_regions[1]"]
    assert "CN, NO" in violations[0].reason


def test_registered_jurisdiction_is_valid() -> None:
    spec = valid_spec(allowed_regions=("jurisdiction:EU",))
    assert validate_spec(spec, jurisdictions={"EU"}) == []


def test_jurisdiction_without_registry_checks_syntax_only() -> None:
    assert validate_spec(valid_spec(allowed_regions=("jurisdiction:EU",))) == []
    bad = validate_spec(valid_spec(allowed_regions=("jurisdiction:eu",)))
    assert [v.field for v in bad] == ["spec.allowed_regions[0]"]
    assert "capital letters" in bad[0].reason


def test_jurisdiction_with_no_registered_region_names_none() -> None:
    violations = validate_spec(
        valid_spec(allowed_regions=("jurisdiction:EU",)), jurisdictions=frozenset()
    )
    assert "registered: none" in violations[0].reason


def test_unknown_region_rejected_with_known_ones() -> None:
    spec = valid_spec(allowed_regions=("cloud-a/west", "nope/x"))
    violations = validate_spec(spec, regions={"cloud-a/west", "cloud-b/east"})
    assert [v.field for v in violations] == ["spec.allowed_regions[1]"]
    reason = violations[0].reason
    assert "no provider offers region 'nope/x'" in reason
    assert "known regions: cloud-a/west, cloud-b/east" in reason
    assert "acsp fleet providers" in reason


def test_known_region_list_is_capped() -> None:
    known = {f"p/r{i:02}" for i in range(MAX_REGIONS_SHOWN + 5)}
    violations = validate_spec(valid_spec(allowed_regions=("nope/x",)), regions=known)
    assert f"p/r{MAX_REGIONS_SHOWN - 1:02}" in violations[0].reason
    assert f"p/r{MAX_REGIONS_SHOWN:02}" not in violations[0].reason
    assert "and 5 more" in violations[0].reason


def test_region_with_empty_registry_names_none() -> None:
    violations = validate_spec(valid_spec(allowed_regions=("nope/x",)), regions=frozenset())
    assert "no region is registered yet" in violations[0].reason


def test_known_region_is_valid() -> None:
    spec = valid_spec(allowed_regions=("cloud-a/west", "jurisdiction:EU"))
    assert validate_spec(spec, jurisdictions={"EU"}, regions={"cloud-a/west"}) == []


def test_region_without_registry_checks_syntax_only() -> None:
    assert validate_spec(valid_spec(allowed_regions=("nope/x",))) == []


def test_array_size_bounds() -> None:
    assert validate_array_size(0) == []
    assert validate_array_size(10_000) == []
    assert [v.field for v in validate_array_size(10_001)] == ["spec.array_size"]


def test_oversized_environment_is_rejected() -> None:
    ten_large = tuple((f"K{i}", "x" * 120_000) for i in range(10))
    violations = validate_spec(valid_spec(env=ten_large))
    fields = [v.field for v in violations]
    assert fields.count("spec.environment['K0']") == 1
    assert "spec.environment" in fields
    assert f"at most {MAX_ENV_BYTES}" in violations[0].reason
    assert f"at most {MAX_ENV_VALUE_BYTES}" in violations[1].reason


def test_environment_bounds() -> None:
    too_many = tuple((f"K{i}", "") for i in range(MAX_ENV_VARS + 1))
    assert fields_of(valid_spec(env=too_many)) == {"spec.environment"}
    at_limit = tuple((f"K{i}", "") for i in range(MAX_ENV_VARS))
    assert validate_spec(valid_spec(env=at_limit)) == []
    one_max_value = (("K", "x" * MAX_ENV_VALUE_BYTES),)
    assert validate_spec(valid_spec(env=one_max_value)) == []
    # Five values at the per-value maximum pass one by one but not together.
    five = tuple((f"K{i}", "x" * MAX_ENV_VALUE_BYTES) for i in range(5))
    violations = validate_spec(valid_spec(env=five))
    assert [v.field for v in violations] == ["spec.environment"]
    assert f"at most {MAX_ENV_BYTES}" in violations[0].reason


def test_long_environment_key_is_cut_in_field() -> None:
    violations = validate_spec(valid_spec(env=(("K" * 5000, "x"),)))
    assert len(violations) == 1
    assert len(violations[0].field) < 120
    assert "(5000 characters)" in violations[0].field


def test_command_argument_count_is_bounded() -> None:
    spec = valid_spec(command=("true",) * (MAX_COMMAND_ARGS + 1))
    violations = validate_spec(spec)
    assert [v.field for v in violations] == ["spec.command"]
    assert f"at most {MAX_COMMAND_ARGS}" in violations[0].reason


def test_checkpoint_reference_is_bounded() -> None:
    spec = valid_spec(checkpoint_ref="s3://b/" + "c" * MAX_CHECKPOINT_REF_BYTES)
    assert fields_of(spec) == {"spec.checkpoint_reference"}


def test_start_command_size_follows_max_payload() -> None:
    env = tuple((f"K{i}", "x" * 20_000) for i in range(4))
    spec = valid_spec(env=env)
    assert validate_spec(spec) == []
    violations = validate_spec(spec, max_payload=128 * 1024)
    assert [v.field for v in violations] == ["spec.command"]
    assert "65536 bytes" in violations[0].reason
    assert "max_payload of 131072" in violations[0].reason


def test_simulated_run_time_must_be_finite() -> None:
    for value in (float("inf"), float("-inf"), float("nan"), -1.0):
        assert fields_of(valid_spec(simulated_run_s=value)) == {"spec.simulated_run_seconds"}
    assert validate_spec(valid_spec(simulated_run_s=30.0)) == []


def test_batch_size_counts_array_elements() -> None:
    assert validate_batch_size([0, 1, MAX_BATCH_JOBS - 2]) == []
    violations = validate_batch_size([MAX_BATCH_JOBS, 1])
    assert [v.field for v in violations] == ["jobs"]
    assert f"would create {MAX_BATCH_JOBS + 1} jobs" in violations[0].reason


def test_constraint_lists_bounded() -> None:
    regions = tuple(f"p/r{i}" for i in range(MAX_ALLOWED_REGIONS + 1))
    models = ("A100-SXM4-80GB",) * (MAX_MODELS + 1)
    assert fields_of(valid_spec(allowed_regions=regions)) == {"spec.allowed_regions"}
    assert fields_of(valid_spec(models=models)) == {"spec.accelerators.models"}
    assert validate_spec(valid_spec(allowed_regions=regions[:MAX_ALLOWED_REGIONS])) == []


def test_invalid_environment_name_says_valid_form() -> None:
    [violation] = validate_spec(valid_spec(env=(("", "x"),)))
    assert violation.field == "spec.environment['']"
    assert "is not a valid environment variable name" in violation.reason
    assert "ASCII letters, digits and underscores" in violation.reason
    assert "e.g. OMP_NUM_THREADS" in violation.reason
