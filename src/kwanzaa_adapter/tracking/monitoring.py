"""Where a run's metrics go: TensorBoard, MLflow and Weights & Biases, and the training-curve picture.

Step metrics reach every enabled backend through the Trainer's own reporting integrations
(`TensorBoardCallback`, `MLflowCallback`, `WandbCallback`). `RunMonitor` starts the MLflow and
W&B runs those callbacks log into (so that they carry this run's names, directories and resolved
config), adds what is known only after training (behavioral metrics, the artifact, its registry
entry) and closes the runs. Whether each backend can run here is checked in step 1, before
anything is written.
"""

from __future__ import annotations

import importlib.util
import logging
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from kwanzaa_adapter.config import ConfigError, KwanzaaConfig

log = logging.getLogger(__name__)

# Backend name -> (module it needs, package extra that installs it).
BACKEND_REQUIREMENTS = {"tensorboard": ("tensorboard", None), "mlflow": ("mlflow", "mlflow"),
                        "wandb": ("wandb", "wandb")}


# --- pre-flight --------------------------------------------------------------------------------


def wandb_mode(config: KwanzaaConfig) -> str:
    return config.monitoring.wandb.mode or os.environ.get("WANDB_MODE", "online")


def wandb_logged_in() -> bool:
    """An API key in the environment or in netrc for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def check_backends(config: KwanzaaConfig) -> None:
    """Every enabled backend is installed and, for W&B online, logged in; else one ConfigError."""
    problems = []
    for name in config.monitoring.report_to:
        module, extra = BACKEND_REQUIREMENTS[name]
        if importlib.util.find_spec(module) is None:
            fix = f"pip install 'kwanzaa-adapter[{extra}]'" if extra else f"pip install {module}"
            problems.append(f"monitoring.report_to: '{name}' needs the {module} package, which is not "
                            f"installed: {fix}, or remove '{name}'")
    if ("wandb" in config.monitoring.report_to and not problems and wandb_mode(config) == "online"
            and not wandb_logged_in()):
        problems.append("monitoring.report_to: 'wandb' runs online but there is no W&B login: run `wandb login` "
                        "or set WANDB_API_KEY; or set monitoring.wandb.mode: offline (or WANDB_MODE=offline)")
    if problems:
        raise ConfigError(problems)


# --- the run's backends ------------------------------------------------------------------------


def _tensorboard_callback(run):
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(run.tensorboard_path)  # instead of <output_dir>/runs/<date>
    return callback


def _mlflow_callback(run):
    from transformers.integrations import MLflowCallback

    return MLflowCallback()


def _wandb_callback(run):
    from transformers.integrations import WandbCallback

    return WandbCallback()


REPORTERS = {"tensorboard": _tensorboard_callback, "mlflow": _mlflow_callback, "wandb": _wandb_callback}


def _numbers(tree: dict, prefix: str) -> dict[str, float]:
    from kwanzaa_adapter.tracking.registry import flatten

    return {f"{prefix}/{k.replace('.', '/')}": float(v) for k, v in flatten(tree).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunMonitor:
    """The enabled backends of one run; inactive (reports nothing) on all but the main process."""

    def __init__(self, config: KwanzaaConfig, run, active: bool = True):
        self.config, self.run, self.active = config, run, active
        self.backends = tuple(config.monitoring.report_to) if active else ()
        self.wandb_run = None
        self.mlflow_run = None
        self.published: dict = {}

    def __enter__(self) -> "RunMonitor":
        if "wandb" in self.backends:
            import wandb

            w = self.config.monitoring.wandb
            self.wandb_run = wandb.init(
                project=w.project, entity=w.entity, dir=str(self.run.path), config=self.config.to_dict(),
                name=f"{self.config.run.name}-v{self.run.version}", tags=list(self.config.artifacts.tags),
                **({"mode": w.mode} if w.mode else {}))
        if "mlflow" in self.backends:
            from kwanzaa_adapter.tracking.registry import start_mlflow_run

            self.mlflow_run = start_mlflow_run(self.config, self.run.path, self.run.version)
        return self

    def __exit__(self, exc_type, *_) -> None:
        failed = exc_type is not None
        if self.mlflow_run is not None:
            import mlflow

            mlflow.end_run(status="FAILED" if failed else "FINISHED")
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)

    def callbacks(self) -> list:
        """The Trainer's reporting callbacks for the enabled backends."""
        return [REPORTERS[name](self.run) for name in self.backends]

    def record_behavior(self, behavior, step: int) -> dict[str, float]:
        """Behavioral rates (base and adapter) into every backend, at the last training step."""
        if behavior is None or not self.backends:
            return {}
        metrics = _numbers(behavior.as_json(), "behavior")
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(log_dir=str(self.run.tensorboard_path)) as writer:
                for key, value in metrics.items():
                    writer.add_scalar(key, value, step)
        if self.mlflow_run is not None:
            import mlflow

            mlflow.log_metrics(metrics, step=step)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics)
            self.wandb_run.summary.update(metrics)
        return metrics

    def publish(self, artifact_dir: Path) -> dict:
        """The verified artifact to the MLflow run and registry; its manifest digest to W&B."""
        if self.mlflow_run is not None:
            from kwanzaa_adapter.tracking.registry import publish_artifact

            self.published = publish_artifact(self.config, artifact_dir)
            if "model_version" in self.published:
                log.info("registered %s version %s in %s", self.published["registered_model"],
                         self.published["model_version"], self.published["tracking_uri"])
        if self.wandb_run is not None:
            from kwanzaa_adapter.tracking.registry import version_tags

            self.wandb_run.summary.update({f"artifact/{k}": v for k, v in version_tags(artifact_dir).items()})
        return self.published


# --- pictures ----------------------------------------------------------------------------------


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], h[key]) for h in history if h.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _last(values: list[float]) -> str:
    return f" (last {values[-1]:.3g})" if values else ""


PANELS = (("learning_rate", "Learning rate", "tab:green"), ("grad_norm", "Gradient norm (before clipping)", "tab:red"),
          ("tokens_per_second", "Training tokens/s", "tab:purple"))


def training_curves_figure(history: list[dict], title: str = ""):
    """Train and eval loss, learning rate, gradient norm and tokens/s per optimizer step: one matplotlib
    Figure (the object-oriented API renders with Agg without touching pyplot's global state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 3.6))
    # a fixed layout: half the drawing time of a constrained one, paid by every run
    fig.subplots_adjust(left=0.045, right=0.99, bottom=0.14, top=0.84 if title else 0.9, wspace=0.25)
    axes = fig.subplots(1, 4)
    loss_ax = axes[0]
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        steps, values = _series(history, key)
        if steps:
            loss_ax.plot(steps, values, style, label=label + _last(values), markersize=4)
    loss_ax.set_title("Loss (lower is better)")
    loss_ax.set_ylabel("cross-entropy per token")
    if loss_ax.get_legend_handles_labels()[0]:
        loss_ax.legend()
    for ax, (key, name, color) in zip(axes[1:], PANELS):
        steps, values = _series(history, key)
        ax.plot(steps, values, "-", color=color, label=key + _last(values))
        ax.set_title(name)
        if steps:
            ax.legend()
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_training_curves(history: list[dict], path: Path, title: str = "") -> Path:
    """`training_curves_figure` as one PNG."""
    training_curves_figure(history, title).savefig(path, dpi=110, metadata={"Software": None})
    return path
