"""File names of what the stages write, defined once: every module that reads another stage's output takes the
name from here (the directories come from params.yaml)."""

# <train.model_dir>/
CHECKPOINT = "tcn.ckpt"  # train: the best checkpoint
TRAIN_REPORT = "train.json"  # train: run id, logged model URI, tags, split sizes
FOREST_MODEL = "forest.joblib"  # baseline: the random forest
FOREST_REPORT = "forest.json"  # baseline: objects per class, seconds
REGISTERED_REPORT = "registered.json"  # register: name, version, run id
PROMOTION_REPORT = "promotion.json"  # promote: the decision and both scores

# <evaluate.metrics_dir>/
HEADLINE = "headline.json"  # evaluate: the DVC metrics, a dozen headline numbers (dvc metrics show / diff)
METRICS = "evaluate.json"  # evaluate: every number per model and set (a plain output; register reads it)
EVALUATION_REPORT = "report.json"  # evaluate: everything, with confusion matrices and set fingerprints

# Within an MLflow run: the logged model's name.
LOGGED_MODEL = "model"
