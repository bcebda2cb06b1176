"""Stage 3, cache: every frozen expert over the gate, val and test splits, once (the experts'
own train split is not scored: nothing reads it, and it is the largest).

Ray Data batch inference with an actor pool per expert writes, per sample, each expert's loss
(the gate's training signal) and score (additive under the task metric: the oracle's input)
and any task columns the metric needs, to cache/<task>/<split>.parquet under the root. Each
actor loads its expert's weights from the root itself, on whichever node it runs. A gate
sweep then never runs an expert: that is the main performance lever of the whole pipeline.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from pipelines.integrity import cache_damage, digest, expert_damage, shard_damage
from pipelines.prepare import require_manifest, shard_files
from pipelines.resources import cache_demand, require
from pipelines.runtime import RunConfig, UserError, ensure_ray
from pipelines.train_experts import load_expert
from storage import read_json, read_table, write_json, write_table
from tasks import SCORED_SPLITS, get_task

CACHE_ORDER = "gate-shards"  # rows in the order of the split's gate shards (older caches were sorted by id)
CACHE_SPLITS = "scored"  # SCORED_SPLITS only (older caches scored train too)


def cache(cfg: RunConfig, actors: int = 0, batch_size: int = 256) -> dict[str, str]:
    """Write the per-sample cache of every split; returns the file of each split. actors: the
    most scorer actors per expert (0: one per GPU of the cluster with --gpu, else one); the pool
    grows from one to that as Ray can place them."""
    import ray.data

    manifest = require_manifest(cfg, "cache")
    task = cfg.task()
    layout = cfg.layout
    experts = _expert_fingerprints(cfg, task)
    key = {"data": manifest["fingerprint"], "experts": experts, "order": CACHE_ORDER, "splits": CACHE_SPLITS}
    files = {split: layout.cache(split) for split in SCORED_SPLITS}
    stamp = read_json(layout.cache_stamp()) or {}
    if {k: v for k, v in stamp.items() if k != "files"} == key and all(f.exists() for f in files.values()):
        damaged = cache_damage(layout, stamp)
        if not damaged:
            print("cache: data and experts unchanged, cache kept")
            return {split: str(f) for split, f in files.items()}
        print(f"cache: {damaged[0]}: scoring again")
    if damaged := shard_damage(layout, manifest, SCORED_SPLITS):
        raise UserError(f"cache: {damaged[0]} ({len(damaged)} shard file(s) damaged): run `bmoe prepare` to make "
                        f"them again")

    ensure_ray(cfg)
    require(cache_demand(cfg.use_gpu))
    started = time.perf_counter()
    # rows in the gate shards' order (the manifest's), which sweep trials stream the inputs in
    tables = {split: pa.concat_tables([read_table(f, columns=["sample_id", "group", *task.meta_columns])
                                       for f in shard_files(layout, manifest, split, "gate")]).to_pandas()
              for split in SCORED_SPLITS}
    pool = actors or (max(1, int(ray.cluster_resources().get("GPU", 1))) if cfg.use_gpu else 1)
    for n in range(len(experts)):
        # one pass per expert over all splits: one actor pool, one model load per actor
        paths = [str(f) for split in SCORED_SPLITS for f in shard_files(layout, manifest, split, f"p{n}")]
        scored = ray.data.read_parquet(paths, include_paths=True).map_batches(
            _ExpertScorer,
            fn_constructor_kwargs={"task_name": cfg.task_name, "profile": cfg.profile, "options": cfg.task_options, "n": n,
                                   "weights": str(layout.weights(n)), "use_gpu": cfg.use_gpu},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool),
            batch_size=batch_size,
            batch_format="numpy",
            num_gpus=1 if cfg.use_gpu else 0,
        ).to_pandas()
        split_of = scored.pop("path").map(lambda p: p.rsplit("/", 3)[-3])  # .../<split>/p<n>/<file>
        scored = scored.rename(columns={c: f"{c}_{n}" for c in scored.columns if c != "sample_id"})
        for split in SCORED_SPLITS:
            part = scored[split_of == split]
            tables[split] = tables[split].merge(part, on="sample_id", how="left", validate="one_to_one")
        print(f"cache: expert {n}: {len(scored)} samples scored ({time.perf_counter() - started:.1f}s)")
    for split, table in tables.items():
        missing = table.filter(like="loss_").isna().any(axis=1)
        if missing.any():  # a bug, not user input: every prepared sample must be scored
            raise RuntimeError(f"cache: {int(missing.sum())} {split} samples were not scored by every expert")
        write_table(table, files[split])
    write_json(layout.cache_stamp(), {**key, "files": {split: digest(f) for split, f in files.items()}})
    print(f"cache: {', '.join(f'{s} {len(t)}' for s, t in tables.items())} samples x {len(experts)} experts "
          f"in {time.perf_counter() - started:.1f}s")
    return {split: str(f) for split, f in files.items()}


class _ExpertScorer:
    """Actor: holds one frozen expert and scores batches of its P_n shard."""

    def __init__(self, task_name: str, profile: str, options: dict, n: int, weights: str, use_gpu: bool):
        self.task = get_task(task_name, profile, options)
        self.n = n
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_expert(self.task, n, weights, self.device)  # read from the root on this node

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            columns = self.task.evaluate(self.n, self.model, batch, self.device)
        return {"sample_id": batch["sample_id"], "path": batch["path"], **columns}


def _expert_fingerprints(cfg: RunConfig, task) -> list[str]:
    prints = []
    for n in range(len(task.expert_names())):
        meta = read_json(cfg.layout.expert_meta(n))
        if meta is None:
            raise UserError(f"expert {n} of task {cfg.task_name} is not trained: run `bmoe train-experts` first")
        if problem := expert_damage(cfg.layout, n, meta):
            raise UserError(f"cache: {problem}: run `bmoe train-experts` to train expert {n} again")
        prints.append(meta["fingerprint"])
    return prints
