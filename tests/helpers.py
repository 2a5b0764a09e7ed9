"""Builders the tests share: a well-formed cell result (``results.result_problem`` accepts it)."""
from nvfp4bench.results import SCHEMA_VERSION


def well_formed_result(status: str = "complete", config_hash: str = "0" * 16, *,
                       arch: str = "cnn", scale: str = "tiny", recipe: str = "baseline",
                       fold: int = 0, seed: int = 2026, split: str = "kfold",
                       metrics: dict | None = None, **extra) -> dict:
    """The smallest result the report, the grid and --resume accept, with ``extra`` keys."""
    metrics = {"auprc": 0.5} if metrics is None else metrics
    complete = status == "complete"
    return {"schema_version": SCHEMA_VERSION, "status": status, "error": None,
            "config": {"arch": arch, "scale": scale, "recipe": recipe, "fold": fold,
                       "seed": seed, "split": split},
            "config_hash": config_hash, "data": {"name": "synthetic", "fingerprint": None},
            "val": dict(metrics) if complete else None,
            "test": dict(metrics) if complete else None, **extra}
