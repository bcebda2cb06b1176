"""Stage 2, train-experts: one Ray Train TorchTrainer run per expert, reading its P_n shards.

Workers and GPUs come from the run config (CPU here, CUDA on a cluster with no code change).
Ray Train keeps each fit's checkpoints (model, optimizer, epoch) under the root's ray-train/
storage path: a fit that fails or is interrupted resumes from its last epoch, on this machine
or another that sees the root. The final weights go to experts/<task>/<n>/model.pt with the
settings that made them; metrics per epoch and the model are logged to MLflow. An expert
whose data and settings are unchanged is not trained again.

With one worker per expert a fit is reproducible: the run's seed fixes the initialisation, the
block order and the local shuffle of every epoch, and Ray Data keeps the blocks in that order
(with the default unordered streaming, two demos with one seed gave action routing
efficiencies 0.50 and 0.35, measured).
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipelines import registry
from pipelines.expert_rows import expert_dataset
from pipelines.integrity import digest, expert_damage
from pipelines.manifest import read_manifest, require_manifest, require_targets
from pipelines.resources import require, train_demand
from pipelines.runtime import RunConfig, ensure_mlflow, ensure_ray
from storage import AnyPath, as_path, load_torch, read_json, save_torch, write_json
from tasks.base import settings_repr

WEIGHTS = "model.pt"  # inside a Ray Train checkpoint: the model's state_dict
OPTIMIZER = "optimizer.pt"  # and the optimizer's, so a resumed fit continues where it stopped
HISTORY = "history.json"  # one row per finished epoch
MAX_FAILURES = 2  # worker or node failures a fit survives (it restarts from its last checkpoint)
SHUFFLE_BATCHES = 16  # batches' worth of rows mixed in the local shuffle buffer, across blocks of several files


def train_experts(cfg: RunConfig) -> list[dict]:
    """Train every expert of the task; returns one summary per expert.

    The experts' TorchTrainer runs are launched together (each fit() from a zero-CPU Ray task),
    so Ray schedules their workers as resources free up instead of one expert at a time.
    """
    import ray

    manifest = require_manifest(cfg, "train-experts")
    task = cfg.task()
    summaries: dict[int, dict] = {}
    todo = []
    for n, name in enumerate(task.expert_names()):
        fingerprint = _fingerprint(manifest, task, n, cfg)
        meta = read_json(cfg.layout.expert_meta(n), {})
        problem = expert_damage(cfg.layout, n, meta) if cfg.layout.weights(n).exists() else "missing"
        if meta.get("fingerprint") == fingerprint and not problem:
            print(f"train-experts: expert {n} ({name}) unchanged, kept {cfg.layout.weights(n)}")
            summaries[n] = meta
        else:
            if meta.get("fingerprint") == fingerprint:
                print(f"train-experts: expert {n} ({name}): {problem}: training it again")
            todo.append((n, fingerprint))
    if todo:
        require_targets(cfg.layout, manifest)  # kept experts need no shards: an earlier layout is fine for them
        ensure_ray(cfg)
        task.check_pretrained()  # pretrained parts it cannot get: one line here, not a traceback from a worker
        require(train_demand(todo[0][0], cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker))
        limit = _concurrent_fits(cfg, len(todo))
        running: dict = {}
        while todo and limit == 1:  # one at a time: fit from the driver, no extra process
            n, fingerprint = todo.pop(0)
            _announce(task, n, cfg)
            started = time.perf_counter()
            state, history = _fit_task(cfg, n, fingerprint)
            summaries[n] = _record(cfg, task, n, fingerprint, state, history, time.perf_counter() - started)
        while todo or running:
            while todo and len(running) < limit:
                n, fingerprint = todo.pop(0)
                _announce(task, n, cfg)
                running[_fit.remote(cfg, n, fingerprint)] = (n, fingerprint, time.perf_counter())
            done, _ = ray.wait(list(running), num_returns=1)
            n, fingerprint, started = running.pop(done[0])
            state, history = ray.get(done[0])
            summaries[n] = _record(cfg, task, n, fingerprint, state, history, time.perf_counter() - started)
    return [summaries[n] for n in sorted(summaries)]


def _announce(task, n: int, cfg: RunConfig) -> None:
    training = task.expert_training(n)
    print(f"train-experts: expert {n} ({task.expert_names()[n]}): {training.epochs} epochs, "
          f"batch {training.batch_size}, {cfg.num_workers} worker(s), gpu={cfg.use_gpu}")


def _concurrent_fits(cfg: RunConfig, pending: int) -> int:
    """How many experts train at once: cfg.concurrent_fits when set; on GPUs every pending fit
    (those that find no GPU wait for one, and their pending demand is what makes an autoscaler
    start GPU nodes); on CPUs what the cluster holds now, leaving a CPU for Ray Data's read tasks
    (a trainer whose data tasks cannot get a CPU waits forever)."""
    import ray

    if cfg.concurrent_fits:
        return cfg.concurrent_fits
    if cfg.use_gpu:
        return max(1, pending)
    per_fit = cfg.num_workers * (1.0 if cfg.cpus_per_worker is None else cfg.cpus_per_worker)
    return max(1, int((ray.cluster_resources().get("CPU", 1) - 1) // max(per_fit, 1e-9)))


def architecture(task, n: int) -> torch.nn.Module:
    """Expert n's modules on the meta device: names and shapes without allocating or initialising
    a weight (a VGG16 SSD takes 1.6 s to build on 2 cores, 0.02 s here)."""
    with torch.device("meta"):
        return task.build_expert(n)


def load_expert(task, n: int, weights: str | AnyPath, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The frozen expert n from its weights file (any path or URI), in eval mode, on `device`."""
    model = task.build_expert(n)
    model.load_state_dict(load_torch(as_path(weights)))
    return model.to(device).eval()


def _fit_task(cfg: RunConfig, n: int, fingerprint: str) -> tuple[dict, list[dict]]:
    """Ray Train fit of expert n; returns its final weights and per-epoch history."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray(cfg)  # applies the Ray Data settings inside this task too
    task = cfg.task()

    manifest = read_manifest(cfg.layout)  # train_experts checked it, and the root's identity, before any fit

    def read(split: str):  # the manifest's files: a prepare that failed half-way left others beside them
        return expert_dataset(cfg.layout, manifest, [split], n, ["x", *(task.train_columns or task.target_columns)])

    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # blocks in their (seeded) order, not as their reads finish
    # The same name and storage path as an interrupted fit: Ray Train resumes from its checkpoint.
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"ref": cfg.ref, "n": n},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=_worker_resources(cfg)),
        datasets={  # tensors only: sample ids, groups and targets the expert does not train on stay behind
            # rows are stored image by image: mix the files, in another order every epoch
            "train": read("train").randomize_block_order(seed=_data_seed(cfg.seed, n)),
            "val": read("val"),
        },
        dataset_config=DataConfig(execution_options=ingest),
        run_config=TrainRunConfig(name=f"{cfg.task_name}-expert-{n}-{fingerprint[:8]}",
                                  storage_path=cfg.layout.train_storage(),
                                  failure_config=FailureConfig(max_failures=MAX_FAILURES),
                                  checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"expert {n}: the fit ended without a checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        state = torch.load(Path(ckpt) / WEIGHTS, map_location="cpu", weights_only=True)
        history = json.loads((Path(ckpt) / HISTORY).read_text())
    return state, history


def _worker_resources(cfg: RunConfig) -> dict | None:
    """A Train worker's resources: Ray Train's default unless --cpus-per-worker is given."""
    if cfg.cpus_per_worker is None:
        return None
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}


def _remote_fit():
    import ray

    return ray.remote(num_cpus=0)(_fit_task)


class _LazyRemote:
    """`_fit.remote(...)` without decorating at import time (no Ray side effects on import)."""

    def remote(self, *args):
        return _remote_fit().remote(*args)


_fit = _LazyRemote()


def _record(cfg: RunConfig, task, n: int, fingerprint: str, state: dict, history: list[dict], seconds: float) -> dict:
    """Save the weights under the run root, log them to MLflow and register them as a version
    of bmoe-<task>-expert-<n> (pipelines/registry.py)."""
    import mlflow

    name = task.expert_names()[n]
    layout = cfg.layout
    save_torch(state, layout.weights(n))
    architecture(task, n).load_state_dict(state, assign=True)  # the weights fit the architecture they are registered as
    ensure_mlflow(cfg)
    with mlflow.start_run(run_name=f"expert-{n}-{name}") as run:
        mlflow.set_tags({"bmoe.stage": "train-experts", "bmoe.expert": n})
        mlflow.log_params({**cfg.as_params(), "expert": name, "data_cost_bytes": float(task.data_costs()[n]),
                           **{f"training.{k}": v for k, v in asdict(task.expert_training(n)).items()}})
        for row in history:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        mlflow.log_metric("train_seconds", seconds)
        with tempfile.TemporaryDirectory(prefix="bmoe-expert-") as tmp:  # plain weights: no code in the store
            torch.save(state, Path(tmp) / "weights.pt")
            mlflow.log_artifact(str(Path(tmp) / "weights.pt"), registry.EXPERT_ARTIFACT)
        run_id = run.info.run_id
    version = registry.register(mlflow.MlflowClient(), registry.expert_model(task.name, n), run_id,
                                registry.EXPERT_ARTIFACT, tags={"expert": name, "fingerprint": fingerprint,
                                                                "profile": cfg.profile})
    summary = {"expert": n, "name": name, "fingerprint": fingerprint, "weights": layout.relative(layout.weights(n)),
               "weights_digest": digest(layout.weights(n)),  # checked before the weights are trusted (integrity.py)
               "mlflow_run_id": run_id,
               "registered": f"models:/{version.name}/{version.version}", "seconds": round(seconds, 2), "final": history[-1] if history else {}}
    write_json(layout.expert_meta(n), summary)
    print(f"train-experts: expert {n} ({name}) done in {seconds:.1f}s: {summary['final']}")
    return summary


def cosine_lr(lr: float, epoch: int, epochs: int) -> float:
    """The learning rate of epoch 1..epochs: lr decayed along half a cosine (the last epoch at
    a few per cent of lr). A constant rate left the demo's few-epoch experts at a noisy last step (a
    75 px detector scored below the 50 px one); it is set per epoch, so a resumed fit needs no
    scheduler state."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / max(epochs, 1)))


def _data_seed(seed: int, n: int) -> int:
    """The seed of expert n's data order: its block order; times 1000 plus the epoch, each
    epoch's local shuffle."""
    return seed * 1000 + n


def build_optimizer(model: torch.nn.Module, training) -> torch.optim.Optimizer:
    """The expert's optimizer from its recipe (tasks.base.ExpertTraining)."""
    if training.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=training.lr, momentum=training.momentum,
                               weight_decay=training.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)


def step_lr(training, epoch: int, step: int) -> float:
    """The rate of a step: cosine_lr of its epoch, times a linear warm-up from 1/1000 over the
    recipe's first warmup_steps steps (torchvision's detection references warm up SSD this way;
    without it, SGD at 2e-3 on a fresh SSD head can blow up in its first steps)."""
    lr = cosine_lr(training.lr, epoch, training.epochs)
    if step < training.warmup_steps:
        lr *= 1e-3 + (1.0 - 1e-3) * step / training.warmup_steps
    return lr


def _train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    ref, n = config["ref"], config["n"]
    task = ref.task()
    torch.manual_seed(ref.seed + n)
    training = task.expert_training(n)
    device = ray.train.torch.get_device()
    model = task.initial_expert(n)
    optimizer = build_optimizer(model, training)
    history = []
    checkpoint = ray.train.get_checkpoint()  # set when this fit resumes after a failure or interruption
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt:
            model.load_state_dict(torch.load(Path(ckpt) / WEIGHTS, map_location="cpu", weights_only=True))
            optimizer.load_state_dict(torch.load(Path(ckpt) / OPTIMIZER, map_location="cpu", weights_only=True))
            history = json.loads((Path(ckpt) / HISTORY).read_text())
        print(f"train-experts: expert {n} resumes after epoch {len(history)} from its checkpoint")
    resumed_after = len(history)
    step = history[-1].get("steps", 0) if history else 0  # optimizer steps so far (the warm-up's clock)
    model = ray.train.torch.prepare_model(model)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(len(history) + 1, training.epochs + 1):
        model.train()
        total, count = 0.0, 0
        for batch in train_shard.iter_torch_batches(batch_size=training.batch_size, device=device,
                                                    local_shuffle_buffer_size=SHUFFLE_BATCHES * training.batch_size,
                                                    local_shuffle_seed=_data_seed(ref.seed, n) * 1000 + epoch):
            for group in optimizer.param_groups:  # cosine decay per epoch, warm-up per step
                group["lr"] = step_lr(training, epoch, step)
            loss = task.train_loss(n, model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"expert {n}: the training loss is {float(loss)} at step {step + 1} "
                                         f"(epoch {epoch}): lower -o lr or raise the warm-up")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            size = len(batch["x"])
            total, count = total + float(loss.detach()) * size, count + size
        model.eval()
        val_total, val_count = 0.0, 0
        with torch.no_grad():
            for batch in val_shard.iter_torch_batches(batch_size=training.batch_size, device=device):
                size = len(batch["x"])
                val_total += float(task.train_loss(n, model, batch)) * size
                val_count += size
        row = {"epoch": epoch, "steps": step, "train_loss": total / max(count, 1),
               "val_loss": val_total / max(val_count, 1)}
        if resumed_after and epoch == resumed_after + 1:  # the first epoch of a resumed fit says so
            row["resumed_after"] = resumed_after
        history.append(row)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if ray.train.get_context().get_world_rank() == 0:
                unwrapped = model.module if hasattr(model, "module") else model
                torch.save(unwrapped.state_dict(), Path(tmp) / WEIGHTS)
                torch.save(optimizer.state_dict(), Path(tmp) / OPTIMIZER)
                (Path(tmp) / HISTORY).write_text(json.dumps(history))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(row, checkpoint=checkpoint)


def _fingerprint(manifest: dict, task, n: int, cfg: RunConfig) -> str:
    """What an expert's weights depend on: its data, recipe, settings, seed and architecture (the
    names and shapes of its parameters: weights of another architecture are never kept)."""
    shapes = [(k, list(v.shape)) for k, v in architecture(task, n).state_dict().items()]
    payload = {"data": manifest["fingerprint"], "training": asdict(task.expert_training(n)),
               "expert": task.expert_names()[n], "seed": cfg.seed,
               "settings": settings_repr(task.settings), "architecture": shapes}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
