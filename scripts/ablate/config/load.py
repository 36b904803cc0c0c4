"""Reading a config file as Snakemake does (a key given twice and a syntax error named by file and
line), the JSON-schema check (workflow/schemas/config.schema.yaml: one line naming the key), and
the checks beyond it (:mod:`ablate.config.checks`, :mod:`ablate.config.tasks`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ablate.config.checks import check_config
from ablate.config.errors import ConfigError, listed
from ablate.config.tasks import resolve_task_files


def schema_error(config: dict[str, Any], schema: dict[str, Any]) -> str | None:
    """The most relevant JSON-schema violation as one line: key path, problem, allowed values."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is None:
        return None
    key = ".".join(str(part) for part in error.absolute_path) or "<top level>"
    allowed = ""
    if error.validator == "enum":
        allowed = f" (allowed: {listed(error.validator_value)})"
    elif error.validator == "additionalProperties":
        allowed = f" (allowed: {listed(error.schema.get('properties', {}))})"
    return f"{key}: {error.message}{allowed}"


SCHEMA = Path(__file__).resolve().parents[3] / "workflow/schemas/config.schema.yaml"


def load_config(configfile: Path) -> dict[str, Any]:
    """The config as the workflow sees it: validated, the schema's defaults filled in; a key
    given twice or a syntax error is a ConfigError naming the file and line."""
    config = load_config_file(configfile)
    validate_config(config)
    return config


def validate_config(config: dict[str, Any]) -> None:
    """Check ``config`` against the schema (one line naming the key), fill the schema's
    defaults in place, then the cross-key checks. Raises ConfigError."""
    from snakemake.utils import validate

    schema = yaml.safe_load(SCHEMA.read_text())
    if problem := schema_error(config, schema):
        raise ConfigError(problem)
    validate(config, schema=str(SCHEMA), set_default=True)
    resolve_task_files(config)
    check_config(config)


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping key given twice (PyYAML keeps the last, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges; keys given beside it may override it
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:
                continue  # an unhashable key: super() names it
            if first is not None:
                raise ConfigError(f"duplicate key {key!r} (lines {first} and {line})")
            lines[key] = line
        return super().construct_mapping(node, deep)


def load_config_file(path: Path | str) -> Any:
    """A config file as Snakemake reads it (JSON or YAML), or ConfigError naming the file: a key
    given twice and both its lines, or the line, column and reason of a syntax error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.MarkedYAMLError as error:
        try:
            return json.loads(text)  # Snakemake reads JSON first; tab-indented JSON is no YAML
        except ValueError:
            raise ConfigError(f"{path}:{_yaml_reason(error)}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: {' '.join(str(error).split())}") from None


def _yaml_reason(error: yaml.MarkedYAMLError) -> str:
    """``line:column: problem (context at line n)`` of a PyYAML error, one line, 1-based."""
    mark = error.problem_mark or error.context_mark
    where = f"{mark.line + 1}:{mark.column + 1}:" if mark else ""
    reason = f"{where} {error.problem or error.context}"
    if error.problem and error.context:
        reason += f" ({error.context}"
        if error.context_mark:
            reason += f" at line {error.context_mark.line + 1}"
        reason += ")"
    return reason
