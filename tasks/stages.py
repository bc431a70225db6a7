"""The pipeline stages (docs/architecture.md, "Stage API"): each a plain function from input
URIs and a GoalRankConfig to a StageResult(uri, manifest, skipped). Flows call them inside
Prefect tasks and pass URIs only; `stage_uri(storage, dataset, run_id, stage)` builds the
output folder of each."""
from tasks.candidates import generate_candidates
from tasks.evaluate import evaluate
from tasks.generator import train_generator
from tasks.policies import train_policies
from tasks.prepare import DataSource, prepare
from tasks.ray_runtime import ensure_ray
from tasks.reward import train_reward_model
from tasks.score import score
from tasks.storage import StageResult, read_manifest, stage_uri

__all__ = [
    "DataSource", "StageResult", "ensure_ray", "evaluate", "generate_candidates", "prepare", "read_manifest",
    "score", "stage_uri", "train_generator", "train_policies", "train_reward_model",
]
