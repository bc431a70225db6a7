"""Runtime settings: where things live and which services to talk to, as opposed to
`goalrank_core.config.GoalRankConfig`, which says what is computed and is hashed into manifests.

One precedence order, highest first:

    command-line flag  >  environment variable  >  config file `settings:` section  >  default

A config file holds both, side by side:

    settings:   {storage: s3://goalrank/pipeline, experiment: goalrank}
    protocol:   {slate_len: 6}
    generator:  {d_model: 64}

Secrets (AWS keys) are read from the environment only: a flag would show in `ps` and a file
gets committed. `Settings.masked()` is the only form meant for printing or logging.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

from goalrank_core.errors import ConfigError

MASK = "****"
# A field whose name contains one of these is a secret: masked, never taken from a file or flag.
SECRET_WORDS = ("key", "token", "password", "secret")


def _s(help: str, env: str, default: Any = None, *, deploy: bool = False, secret: bool = False,
       aliases: tuple[str, ...] = ()) -> Any:
    """A settings field: `env` is the variable it is read from (then `aliases`, in order);
    `deploy` marks the variables a production deployment must set for every process that runs
    goalrank code (checked against infra/compose.yaml and infra/k8s by
    tests/test_infra_manifests.py)."""
    return field(default=default, metadata={"help": help, "env": env, "aliases": aliases, "deploy": deploy,
                                            "secret": secret})


@dataclass
class Settings:
    """Effective runtime settings. Build with `resolve_settings`, not directly, so that each
    value records where it came from (`source_of`)."""

    storage: str = _s("root URI of stage outputs: a local folder or s3://bucket/prefix", "GOALRANK_STORAGE", deploy=True)
    data_dir: str | None = _s("folder holding the public data sets (ml-100k, ...)", "GOALRANK_DATA_DIR")
    tracking_uri: str = _s("MLflow tracking URI (sqlite:///..., http://host:port)", "MLFLOW_TRACKING_URI", deploy=True)
    experiment: str = _s("MLflow experiment name", "GOALRANK_EXPERIMENT", "goalrank")
    model_name: str = _s("MLflow registered model name", "GOALRANK_MODEL_NAME", "goalrank")
    prefect_api_url: str | None = _s("Prefect API URL (http://host:port/api); unset = ephemeral server",
                                     "PREFECT_API_URL", deploy=True)
    ray_address: str | None = _s("Ray cluster address (host:port, auto, ray://...); unset = local Ray",
                                 "RAY_ADDRESS", deploy=True)
    ray_num_cpus: int | None = _s("logical CPUs for a local Ray runtime (unset = Ray's own count)",
                                  "GOALRANK_RAY_NUM_CPUS")
    schedule_cron: str = _s("cron of the daily deployment", "GOALRANK_SCHEDULE_CRON", "0 3 * * *")
    schedule_timezone: str = _s("time zone of the cron", "GOALRANK_SCHEDULE_TIMEZONE", "UTC")
    s3_endpoint_url: str | None = _s("S3 endpoint for non-AWS stores (MinIO, moto)", "AWS_ENDPOINT_URL_S3", deploy=True,
                                     aliases=("AWS_ENDPOINT_URL",))
    mlflow_s3_endpoint_url: str | None = _s("S3 endpoint MLflow uses for artifacts it reads or writes itself",
                                            "MLFLOW_S3_ENDPOINT_URL", deploy=True)
    aws_region: str = _s("S3 region", "AWS_DEFAULT_REGION", "us-east-1", deploy=True, aliases=("AWS_REGION",))
    aws_access_key_id: str | None = _s("S3 access key id", "AWS_ACCESS_KEY_ID", deploy=True, secret=True)
    aws_secret_access_key: str | None = _s("S3 secret key", "AWS_SECRET_ACCESS_KEY", deploy=True, secret=True)
    aws_session_token: str | None = _s("temporary S3 session token", "AWS_SESSION_TOKEN", secret=True)

    _sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        _validate(self)

    def source_of(self, name: str) -> str:
        """'flag --storage', 'env GOALRANK_STORAGE', 'file <path>' or 'default'."""
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting '{name}'; known: {', '.join(_FIELDS)}")
        return self._sources.get(name, "default")

    def masked(self) -> dict[str, Any]:
        """Every setting, safe to print or log: secrets replaced by '****' and passwords inside
        URIs (postgresql://user:pw@host) hidden."""
        out: dict[str, Any] = {}
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None and is_secret(name):
                out[name] = MASK
            elif isinstance(value, str):
                out[name] = mask_uri(value)
            else:
                out[name] = value
        return out

    def env(self) -> dict[str, str]:
        """The environment variables that hand these settings to a child process (a Prefect
        worker, a Ray worker via runtime_env). Contains secrets: pass it on, never log it."""
        out = {}
        for name, spec in _FIELDS.items():
            value = getattr(self, name)
            if value is not None:
                out[spec["env"]] = str(value)
        return out


_FIELDS: dict[str, Mapping[str, Any]] = {f.name: f.metadata for f in fields(Settings) if not f.name.startswith("_")}
# Every variable the code reads for settings; tests check the manifests against these.
ENV_VARS: dict[str, str] = {name: meta["env"] for name, meta in _FIELDS.items()}
DEPLOY_ENV_VARS: tuple[str, ...] = tuple(meta["env"] for meta in _FIELDS.values() if meta["deploy"])
ENV_ALIASES: dict[str, tuple[str, ...]] = {name: tuple(meta["aliases"]) for name, meta in _FIELDS.items()}
_INT_FIELDS = ("ray_num_cpus",)

# Resource knobs read where they act (often inside Ray workers), from the environment only;
# not Settings fields because nothing about a run's location depends on them.
TUNING_ENV_VARS: dict[str, str] = {
    "GOALRANK_RAY_TMPDIR": "temp folder of a local Ray runtime (default Ray's own)",
    "GOALRANK_RAY_ACTOR_CPUS": "CPUs per Ray Data actor (default 0.5: leaves room for read tasks)",
    "GOALRANK_DATA_ACTORS": "actors per Ray Data actor pool (default 2)",
    "GOALRANK_POLICY_TASK_CPUS": "CPUs of the policy-training task (default 1)",
    "GOALRANK_TRAIN_MAX_FAILURES": "Ray Train FailureConfig.max_failures (default 1)",
    "GOALRANK_TRAIN_PLACEMENT": "placement of the DDP workers: PACK (default, Ray Train's) or SPREAD over the "
                                "cluster's nodes (STRICT_PACK, STRICT_SPREAD)",
    "GOALRANK_USE_GPU": "0 keeps everything on CPU even where a GPU exists",
    "GOALRANK_DATA_ORDERED": "0 lets Ray Data stages write rows in the order batches finish; runs are then no longer identical (default on)",
    "GOALRANK_WORKER_MALLOC": "0 starts Ray's workers without the glibc malloc settings of tasks/ray_runtime.py (default on)",
    "GOALRANK_S3_MAX_ATTEMPTS": "attempts of each S3 request inside the client before a stage fails (default 6)",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "a local Ray binds to 127.0.0.1 only unless this is 1 (default 0)",
    "RAY_API_SERVER_ADDRESS": "set by tasks/ray_runtime.py when GOALRANK_RAY_DASHBOARD=1: the local dashboard "
                              "that Ray's State API client (and Ray Train's controller checks) should ask",
}


def is_secret(name: str) -> bool:
    """A setting or variable name that holds a credential."""
    meta = _FIELDS.get(name)
    return bool(meta and meta["secret"]) or any(w in name.lower() for w in SECRET_WORDS)


def mask_uri(value: str) -> str:
    """Hide the password of `scheme://user:password@host/...`; other strings unchanged."""
    if "://" not in value or "@" not in value:
        return value
    parts = urlsplit(value)
    if parts.password is None:
        return value
    netloc = f"{parts.username}:{MASK}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


SECRET_ENV_VARS: tuple[str, ...] = tuple(meta["env"] for name, meta in _FIELDS.items() if is_secret(name))


def defaults(workspace: str | Path | None = None) -> dict[str, Any]:
    """Defaults for one machine: everything under the workspace (the current folder)."""
    ws = Path(workspace or os.getcwd()).resolve()
    out = {name: Settings.__dataclass_fields__[name].default for name in _FIELDS}
    out["storage"] = str(ws / "artifacts")
    out["tracking_uri"] = f"sqlite:///{ws / 'mlflow.db'}"
    return out


def resolve_settings(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file_settings: Mapping[str, Any] | None = None,
    *,
    file_name: str = "config file",
    workspace: str | Path | None = None,
) -> Settings:
    """Merge the four layers. `cli` maps field names to values, None meaning 'flag not given';
    `env` is os.environ or a test's dict (empty strings count as unset); `file_settings` is the
    `settings:` section of a config file. Unknown names in `cli` or the file are errors."""
    cli = dict(cli or {})
    env = os.environ if env is None else env
    file_settings = dict(file_settings or {})
    for layer, data in (("flag", cli), (f"{file_name} settings", file_settings)):
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"unknown setting(s) in {layer}: {', '.join(unknown)}; known: {', '.join(_FIELDS)}")
    for name in file_settings:
        if is_secret(name):
            raise ConfigError(f"setting '{name}' in {file_name} is a secret: set env {ENV_VARS[name]} instead")
    for name, value in cli.items():
        if value is not None and is_secret(name):
            raise ConfigError(f"setting '{name}' is a secret: set env {ENV_VARS[name]}, not a flag")

    values = defaults(workspace)
    sources: dict[str, str] = {}
    for name, meta in _FIELDS.items():
        var = next((v for v in (meta["env"], *meta["aliases"]) if env.get(v)), None)
        if cli.get(name) is not None:
            values[name], sources[name] = _parse(name, cli[name], "flag"), f"flag --{name.replace('_', '-')}"
        elif var:
            values[name], sources[name] = _parse(name, env[var], f"env {var}"), f"env {var}"
        elif file_settings.get(name) is not None:
            values[name], sources[name] = _parse(name, file_settings[name], file_name), f"file {file_name}"
    if _is_local_path(values["storage"]):
        # Relative to where the command runs; Ray workers need the absolute path.
        values["storage"] = str(Path(values["storage"]).expanduser().resolve())
    if values["data_dir"]:
        values["data_dir"] = str(Path(values["data_dir"]).expanduser().resolve())
    return Settings(**values, _sources=sources)


def split_config_file(data: Any, file_name: str = "config file") -> tuple[dict[str, Any], dict[str, Any]]:
    """A parsed config file -> (settings section, model config sections for GoalRankConfig)."""
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file_name} must be a mapping of sections, got {type(data).__name__}")
    model = dict(data)
    settings = model.pop("settings", None) or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"config 'settings' in {file_name} must be a mapping, got {type(settings).__name__}")
    return settings, model


def load_config_file(path: str | Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a YAML config file and split it; no file -> two empty sections."""
    if path is None:
        return {}, {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    return split_config_file(data, str(p))


def load(config_path: str | Path | None = None, cli: Mapping[str, Any] | None = None,
         env: Mapping[str, str] | None = None):
    """Settings and model config from a config file, flags and the environment in one call.
    Returns (Settings, GoalRankConfig)."""
    from goalrank_core.config import GoalRankConfig

    file_settings, model = load_config_file(config_path)
    settings = resolve_settings(cli, env, file_settings, file_name=str(config_path or "config file"))
    return settings, GoalRankConfig.from_dict(model)


def add_settings_flags(parser, only: tuple[str, ...] | None = None) -> None:
    """Add `--storage`, `--tracking-uri`, ... (no secrets) to an argparse parser; read them
    back with `cli_values(args)`. `only` restricts the set, for commands that need few."""
    for name, meta in _FIELDS.items():
        if is_secret(name) or (only is not None and name not in only):
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", dest=f"setting_{name}", default=None,
                            type=int if name in _INT_FIELDS else str, help=f"{meta['help']} (env {meta['env']})")


def cli_values(args) -> dict[str, Any]:
    """The settings flags present on parsed args (None where not given)."""
    return {name: getattr(args, f"setting_{name}") for name in _FIELDS if hasattr(args, f"setting_{name}")}


# --- validation --------------------------------------------------------------------------

_STORAGE_SCHEMES = ("s3", "gs", "gcs", "file", "hdfs", "abfs", "abfss")
_TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "databricks")
_CRON = re.compile(r"^\S+(\s+\S+){4}$")


def _is_local_path(uri: str) -> bool:
    return "://" not in uri


def _parse(name: str, value: Any, where: str) -> Any:
    if name in _INT_FIELDS:
        try:
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"setting '{name}' from {where} must be an integer, got {value!r}") from None
    if not isinstance(value, str):
        raise ConfigError(f"setting '{name}' from {where} must be a string, got {value!r}")
    return value.strip()


def _check(cond: bool, settings: Settings, name: str, msg: str) -> None:
    if not cond:
        src = settings._sources.get(name, "default")
        raise ConfigError(f"setting '{name}' ({src}) {msg}")


def _validate(s: Settings) -> None:
    for name in ("storage", "tracking_uri"):
        _check(isinstance(getattr(s, name), str) and bool(getattr(s, name)), s, name,
               "must be a non-empty string (build Settings with resolve_settings)")
    scheme = s.storage.split("://", 1)[0] if "://" in s.storage else ""
    _check(not scheme or scheme in _STORAGE_SCHEMES, s, "storage",
           f"must be a local folder or one of {', '.join(x + '://' for x in _STORAGE_SCHEMES)}, got {s.storage!r}")
    _check(scheme != "s3" or len(s.storage) > len("s3://"), s, "storage", f"needs a bucket, got {s.storage!r}")
    t_scheme = s.tracking_uri.split(":", 1)[0].split("+", 1)[0]
    _check("://" in s.tracking_uri and t_scheme in _TRACKING_SCHEMES, s, "tracking_uri",
           f"must be a URI with a scheme in {', '.join(_TRACKING_SCHEMES)}, got {mask_uri(s.tracking_uri)!r}")
    for name in ("experiment", "model_name", "aws_region", "schedule_timezone"):
        _check(bool(getattr(s, name)), s, name, "must not be empty")
    if s.prefect_api_url is not None:
        _check(s.prefect_api_url.startswith(("http://", "https://")), s, "prefect_api_url",
               f"must be an http(s) URL ending in /api, got {s.prefect_api_url!r}")
    for name in ("s3_endpoint_url", "mlflow_s3_endpoint_url"):
        v = getattr(s, name)
        _check(v is None or v.startswith(("http://", "https://")), s, name, f"must be an http(s) URL, got {v!r}")
    if s.ray_address is not None:
        ok = s.ray_address in ("auto", "local") or s.ray_address.startswith("ray://") or re.fullmatch(
            r"[\w.\-]+:\d+", s.ray_address) is not None
        _check(ok, s, "ray_address", f"must be host:port, auto, local or ray://host:port, got {s.ray_address!r}")
    _check(s.ray_num_cpus is None or s.ray_num_cpus >= 1, s, "ray_num_cpus", f"must be >= 1, got {s.ray_num_cpus}")
    _check(bool(_CRON.match(s.schedule_cron)), s, "schedule_cron",
           f"must have 5 fields (minute hour day month weekday), got {s.schedule_cron!r}")
    _check((s.aws_access_key_id is None) == (s.aws_secret_access_key is None), s, "aws_access_key_id",
           "and aws_secret_access_key must be set together (env AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
