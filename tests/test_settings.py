"""Runtime settings: one precedence order (flag > env > file > default), validation, masking."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from goalrank.cli import main
from flows.settings import (
    DEPLOY_ENV_VARS,
    ENV_ALIASES,
    ENV_VARS,
    MASK,
    SECRET_ENV_VARS,
    TUNING_ENV_VARS,
    load,
    mask_uri,
    resolve_settings,
    split_config_file,
)
from goalrank_core.errors import ConfigError, GoalRankInputError

ROOT = Path(__file__).resolve().parent.parent


# (flag, env, file) for `experiment` -> expected value and source. None = layer not given.
PRECEDENCE = [
    ("cli", "env", "file", "cli", "flag --experiment"),
    (None, "env", "file", "env", "env GOALRANK_EXPERIMENT"),
    (None, None, "file", "file", "file cfg.yaml"),
    (None, None, None, "goalrank", "default"),
    ("cli", None, "file", "cli", "flag --experiment"),
    ("cli", None, None, "cli", "flag --experiment"),
    (None, "env", None, "env", "env GOALRANK_EXPERIMENT"),
    (None, "", "file", "file", "file cfg.yaml"),  # an empty variable counts as unset
]


@pytest.mark.parametrize("flag,env,file,value,source", PRECEDENCE)
def test_precedence_flag_env_file_default(flag, env, file, value, source, tmp_path):
    s = resolve_settings(
        cli={"experiment": flag},
        env={} if env is None else {"GOALRANK_EXPERIMENT": env},
        file_settings={} if file is None else {"experiment": file},
        file_name="cfg.yaml",
        workspace=tmp_path,
    )
    assert s.experiment == value
    assert s.source_of("experiment") == source


@pytest.mark.parametrize("name", sorted(n for n in ENV_VARS if n not in ("aws_access_key_id", "aws_secret_access_key",
                                                                          "aws_session_token", "ray_num_cpus")))
def test_every_string_setting_follows_the_same_order(name, tmp_path):
    # Each field, not just one: values valid for every string field.
    vals = {"storage": ("s3://a/x", "s3://b/x", "s3://c/x"), "tracking_uri": ("http://a:1", "http://b:1", "http://c:1"),
            "prefect_api_url": ("http://a/api", "http://b/api", "http://c/api"), "ray_address": ("a:1", "b:1", "c:1"),
            "s3_endpoint_url": ("http://a", "http://b", "http://c"),
            "mlflow_s3_endpoint_url": ("http://a", "http://b", "http://c"),
            "schedule_cron": ("1 * * * *", "2 * * * *", "3 * * * *"),
            "data_dir": (str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"))}
    f, e, c = vals.get(name, ("from-flag", "from-env", "from-file"))
    env = {ENV_VARS[name]: e}
    assert getattr(resolve_settings({name: f}, env, {name: c}, workspace=tmp_path), name) == f
    assert getattr(resolve_settings({}, env, {name: c}, workspace=tmp_path), name) == e
    assert getattr(resolve_settings({}, {}, {name: c}, workspace=tmp_path), name) == c


def test_defaults_live_under_the_workspace(tmp_path):
    s = resolve_settings({}, {}, {}, workspace=tmp_path)
    assert s.storage == str(tmp_path.resolve() / "artifacts")
    assert s.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert (s.experiment, s.model_name, s.prefect_api_url, s.ray_address) == ("goalrank", "goalrank", None, None)
    assert s.schedule_cron == "0 3 * * *" and s.schedule_timezone == "UTC"
    assert all(s.source_of(n) == "default" for n in ENV_VARS)


def test_relative_storage_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = resolve_settings({"storage": "out/runs"}, {}, {})
    assert s.storage == str(tmp_path.resolve() / "out" / "runs")


def test_env_aliases_are_read_after_the_primary_variable(tmp_path):
    assert ENV_ALIASES["aws_region"] == ("AWS_REGION",)
    s = resolve_settings({}, {"AWS_REGION": "eu-west-1"}, {}, workspace=tmp_path)
    assert s.aws_region == "eu-west-1" and s.source_of("aws_region") == "env AWS_REGION"
    s = resolve_settings({}, {"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-west-2"}, {}, workspace=tmp_path)
    assert s.aws_region == "us-west-2"


def test_int_settings_parse_from_env_and_reject_junk(tmp_path):
    assert resolve_settings({}, {"GOALRANK_RAY_NUM_CPUS": "8"}, {}, workspace=tmp_path).ray_num_cpus == 8
    with pytest.raises(ConfigError, match="ray_num_cpus.*GOALRANK_RAY_NUM_CPUS.*integer"):
        resolve_settings({}, {"GOALRANK_RAY_NUM_CPUS": "eight"}, {}, workspace=tmp_path)
    with pytest.raises(ConfigError, match="ray_num_cpus.*>= 1"):
        resolve_settings({"ray_num_cpus": 0}, {}, {}, workspace=tmp_path)


@pytest.mark.parametrize("layer", ["cli", "file"])
def test_unknown_keys_are_rejected_with_their_name(layer, tmp_path):
    kw = {"cli": {}, "file_settings": {}}
    kw["cli" if layer == "cli" else "file_settings"] = {"storag": "x"}
    with pytest.raises(ConfigError, match="unknown setting.*storag.*known: storage"):
        resolve_settings(kw["cli"], {}, kw["file_settings"], workspace=tmp_path)


@pytest.mark.parametrize("field,value,match", [
    ("storage", "ftp://host/x", "storage.*local folder or one of"),
    ("storage", "s3://", "storage.*bucket"),
    ("tracking_uri", "mlruns", "tracking_uri.*scheme"),
    ("prefect_api_url", "localhost:4200", "prefect_api_url.*http"),
    ("ray_address", "not an address", "ray_address.*host:port"),
    ("schedule_cron", "daily", "schedule_cron.*5 fields"),
    ("s3_endpoint_url", "127.0.0.1:9000", "s3_endpoint_url.*http"),
    ("experiment", "", "experiment.*must not be empty"),  # in a file, empty is a mistake, not 'unset'
])
def test_bad_values_name_the_setting_and_its_source(field, value, match, tmp_path):
    with pytest.raises(GoalRankInputError, match=match) as err:
        resolve_settings({}, {}, {field: value}, file_name="bad.yaml", workspace=tmp_path)
    assert "file bad.yaml" in str(err.value)


def test_secrets_come_from_the_environment_only(tmp_path):
    with pytest.raises(ConfigError, match="secret.*AWS_SECRET_ACCESS_KEY"):
        resolve_settings({}, {}, {"aws_secret_access_key": "x"}, workspace=tmp_path)
    with pytest.raises(ConfigError, match="secret.*AWS_ACCESS_KEY_ID"):
        resolve_settings({"aws_access_key_id": "x"}, {}, {}, workspace=tmp_path)
    with pytest.raises(ConfigError, match="set together"):
        resolve_settings({}, {"AWS_ACCESS_KEY_ID": "AKIA123"}, {}, workspace=tmp_path)


def test_masked_hides_every_secret_and_uri_passwords(tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID0000", "AWS_SECRET_ACCESS_KEY": "fake/secret+value",
           "AWS_SESSION_TOKEN": "fake-session-token", "MLFLOW_TRACKING_URI": "postgresql://ml:hunter2@db:5432/mlflow"}
    s = resolve_settings({}, env, {}, workspace=tmp_path)
    masked = s.masked()
    blob = json.dumps(masked)
    for secret in ("AKIAFAKEKEYID0000", "fake/secret+value", "fake-session-token", "hunter2"):
        assert secret not in blob and secret not in repr(masked)
    assert masked["aws_secret_access_key"] == MASK and masked["aws_session_token"] == MASK
    assert masked["tracking_uri"] == f"postgresql://ml:{MASK}@db:5432/mlflow"
    assert set(SECRET_ENV_VARS) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    # env() hands the real values to child processes.
    assert s.env()["AWS_SECRET_ACCESS_KEY"] == "fake/secret+value"


def test_mask_uri_leaves_uris_without_password_alone():
    assert mask_uri("s3://bucket/prefix") == "s3://bucket/prefix"
    assert mask_uri("http://user@host:80/x") == "http://user@host:80/x"
    assert mask_uri("https://u:p@h/x") == f"https://u:{MASK}@h/x"


def test_split_config_file_separates_settings_from_model_sections():
    s, m = split_config_file({"settings": {"storage": "s3://b/p"}, "group": {"size": 4}})
    assert s == {"storage": "s3://b/p"} and m == {"group": {"size": 4}}
    assert split_config_file(None) == ({}, {})
    with pytest.raises(ConfigError, match="settings.*mapping"):
        split_config_file({"settings": ["storage"]})
    with pytest.raises(ConfigError, match="mapping of sections"):
        split_config_file([1, 2])


def test_load_reads_yaml_and_builds_both_configs(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("settings:\n  experiment: exp-file\ngroup:\n  size: 4\n")
    settings, model = load(cfg, cli={"model_name": "m"}, env={"GOALRANK_EXPERIMENT": "exp-env"})
    assert settings.experiment == "exp-env" and settings.model_name == "m" and model.group.size == 4
    cfg.write_text("settings: {}\ngroup: {sise: 4}\n")
    with pytest.raises(ConfigError, match="sise"):
        load(cfg, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.yaml", env={})
    cfg.write_text("settings: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(cfg, env={})


def test_config_show_prints_sources_and_masks_secrets(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("settings:\n  storage: s3://goalrank/pipeline\n  experiment: from-file\ngroup: {size: 7}\n")
    monkeypatch.setenv("GOALRANK_EXPERIMENT", "from-env")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASHOWTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    assert main(["config", "show", "--config", str(cfg), "--model-name", "from-flag"]) == 0
    out = capsys.readouterr().out
    assert "very-secret-value" not in out and "AKIASHOWTEST" not in out
    assert re.search(r"storage\s+s3://goalrank/pipeline\s+\[file .*cfg.yaml\]", out)
    assert re.search(r"experiment\s+from-env\s+\[env GOALRANK_EXPERIMENT\]", out)
    assert re.search(r"model_name\s+from-flag\s+\[flag --model-name\]", out)
    assert re.search(r"aws_secret_access_key\s+\*\*\*\*\s+\[env AWS_SECRET_ACCESS_KEY\]", out)
    assert "group.size = 7" in out
    assert main(["config", "show", "--config", str(cfg), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["aws_access_key_id"]["value"] == MASK and data["model_config"]["group"]["size"] == 7


def test_config_show_bad_file_exits_2_with_one_line(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("settings:\n  aws_secret_access_key: leaked\n")
    assert main(["config", "show", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "leaked" not in err and "AWS_SECRET_ACCESS_KEY" in err and len(err.strip().splitlines()) == 1


# Variables some library reads for itself, not a goalrank setting.
_EXTERNAL = {"XDG_CACHE_HOME", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "PREFECT_HOME",
             "PREFECT_SERVER_ANALYTICS_ENABLED", "TQDM_MININTERVAL", "CUDA_VISIBLE_DEVICES"}
_READ = re.compile(r"""(?:os\.environ(?:\.get)?|os\.getenv|environ\.get)\(\s*["']([A-Z][A-Z0-9_]+)["']"""
                   r"""|os\.environ\[\s*["']([A-Z][A-Z0-9_]+)["']\s*\]""")


def test_every_variable_the_code_reads_is_declared_in_settings():
    declared = set(ENV_VARS.values()) | {a for al in ENV_ALIASES.values() for a in al} | set(TUNING_ENV_VARS)
    read: dict[str, str] = {}
    for pkg in ("goalrank_core", "tasks", "flows", "goalrank", "bench"):
        for path in (ROOT / pkg).rglob("*.py"):
            for m in _READ.finditer(path.read_text()):
                read.setdefault(m.group(1) or m.group(2), str(path.relative_to(ROOT)))
    assert "GOALRANK_DATA_DIR" in read  # the scan finds what it should
    undeclared = {v: f for v, f in read.items() if v not in declared and v not in _EXTERNAL}
    assert not undeclared, f"declare these in flows/settings.py (Settings or TUNING_ENV_VARS): {undeclared}"
    assert set(DEPLOY_ENV_VARS) <= set(ENV_VARS.values())
