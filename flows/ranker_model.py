"""The served ranker as an MLflow "model from code": MLflow copies this file into the logged
model and runs it on load, so the model holds no pickled Python object (the weights are the
bundle's state dicts, loaded with torch.load(weights_only=True))."""
import mlflow.models

from flows.tracking import GoalRankRanker

mlflow.models.set_model(GoalRankRanker())
