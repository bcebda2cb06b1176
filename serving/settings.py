"""How a served mixture is deployed: frozen dataclasses, one per deployment kind.

Defaults suit a laptop (fractional CPUs so several replicas fit on 2 cores, no GPU); on a GPU
cluster set the experts' Scaling.num_gpus (e.g. 0.25: four expert replicas per GPU; `bmoe serve
--expert-gpus`), the router's for its gate (`--router-gpus`), and raise max_replicas. A replica
runs on CUDA only when Ray gave it a GPU (serving.loading.replica_device).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from bmoe.stream import DEFAULT_WINDOW
from tasks.typed_values import check_known, typed_fields


@dataclass(frozen=True)
class Scaling:
    """Replicas, resources and batching of one deployment (the router or an expert)."""

    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    metrics_interval_s: float = 2.0
    look_back_period_s: float = 10.0
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    max_ongoing_requests: int = 16
    max_batch_size: int = 16  # experts: requests run in one forward pass (the router ignores it)
    batch_wait_timeout_s: float = 0.0  # experts: 0 batches what is queued and never waits for more
    health_check_period_s: float = 2.0

    def __post_init__(self):
        for key in ("num_cpus", "num_gpus"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be 0 or more (a share of a device per replica), got {getattr(self, key)}")

    def autoscaling_config(self) -> dict:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests, "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s, "metrics_interval_s": self.metrics_interval_s,
                "look_back_period_s": self.look_back_period_s}

    def ray_actor_options(self) -> dict:
        options = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            options["num_gpus"] = self.num_gpus
        return options

    def deployment_options(self, name: str) -> dict:
        """Serve's .options() for a deployment scaled by this."""
        return {"name": name, "autoscaling_config": self.autoscaling_config(),
                "ray_actor_options": self.ray_actor_options(), "max_ongoing_requests": self.max_ongoing_requests,
                "health_check_period_s": self.health_check_period_s}


# The router awaits the experts most of the time: many requests per replica, few replicas.
ROUTER_SCALING = Scaling(max_replicas=2, target_ongoing_requests=16, max_ongoing_requests=64)


@dataclass(frozen=True)
class ServeSettings:
    """One served task: where its models come from, its budget and its deployments."""

    task: str = "superres"
    root: str = "bmoe-runs"
    target_cost: float | None = None  # bytes per routing unit; None: d_max / 2 (or from bias)
    bias: tuple[float, ...] | None = None  # b: target = b . d (the paper's eq. 6 budget)
    gate_file: str | None = None  # None: the gate of the task's latest sweep
    expert_uris: tuple[str, ...] | None = None  # MLflow model URIs instead of the root's checkpoints
    tracking_uri: str | None = None  # for expert_uris; None: sqlite:///<root>/mlflow.db
    max_body_bytes: int = 16 * 1024 * 1024  # larger bodies get HTTP 413
    max_units: int = 16384  # routing units per request (superres: 64x64 patches); more get HTTP 413
    chunk_units: int = 256  # units the gate and an expert see per call: memory per request stays bounded
    router_threads: int = 2  # per router replica: decoding, gate, P_n and encoding run there, off the event loop
    window: int = DEFAULT_WINDOW  # units the budget repays an overspend over (and /stats' running window)
    retries: int = 5  # calls to an expert that died mid-request are retried this often
    retry_backoff_s: float = 0.2
    router: Scaling = field(default_factory=lambda: ROUTER_SCALING)
    expert: Scaling = field(default_factory=Scaling)
    experts: tuple[Scaling, ...] = ()  # per expert, overriding `expert`; empty: all use `expert`

    def scaling(self, n: int) -> Scaling:
        return self.experts[n] if n < len(self.experts) else self.expert

    @classmethod
    def from_args(cls, args: dict) -> "ServeSettings":
        """From `serve run serving.app:build_app key=value ...` or a config file's `args:`
        (strings or YAML values); scaling keys go under `router` and `expert` (dicts)."""
        args = dict(args)
        check_known(cls, args, "serve argument")
        router = _scaling(args.pop("router", None) or {}, ROUTER_SCALING, "router")
        expert = _scaling(args.pop("expert", None) or {}, Scaling(), "expert")
        experts = tuple(_scaling(e, Scaling(), "expert") for e in args.pop("experts", None) or ())
        out = cls(router=router, expert=expert, experts=experts)
        given = {k: v for k, v in args.items() if v is not None and v != ""}  # unset: the default
        typed = typed_fields(cls, given, "serve argument")
        for key, value in typed.items():
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:  # sizes, counts, window
                raise ValueError(f"{key} must be at least 1, got {args[key]}")
        return replace(out, **{**{k: None for k in args if k not in given}, **typed})

    def as_dict(self) -> dict:
        return asdict(self)


def _scaling(values: dict, base: Scaling, kind: str) -> Scaling:
    typed = typed_fields(base, values, f"{kind} scaling key")
    try:
        return replace(base, **typed)
    except ValueError as err:  # a negative share, a value that is not a number
        raise ValueError(f"{kind} scaling: {err}") from None
