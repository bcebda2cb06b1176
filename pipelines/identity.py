"""One recorded identity per run root and task: the profile, the task's settings (the profile's
with the -o overrides applied) and the seed that `prepare` made the shards with.

Every later stage compares its own before it reads or writes anything, and a second prepare
with other settings is refused too, so a stage run with other settings never overwrites what a
finished one made (experts trained on x4 shards under the x2 name, a seed-1 sweep over seed-0
experts, a demo-profile cache of a smoke root). The settings are compared after -o is applied:
`-o scales=2,3,4` on a root made with the default scales is the same identity.
"""

from __future__ import annotations

import json
from pipelines.runtime import RunConfig, UserError
from tasks.base import settings_record

__all__ = ["identity", "check_identity"]


def identity(cfg: RunConfig) -> dict:
    """{profile, seed, settings}: what the shards, and so everything after them, depend on."""
    values = settings_record(cfg.task().settings)
    return {"profile": cfg.profile, "seed": int(cfg.seed), "settings": json.loads(json.dumps(values, default=str))}


def check_identity(cfg: RunConfig, manifest: dict, stage: str) -> None:
    """UserError in one line, naming both identities and the two ways out, when `cfg` is not the
    identity `manifest` recorded (a manifest from before identities were recorded passes)."""
    recorded = manifest.get("identity")
    if recorded is None:
        return
    mine = identity(cfg)
    if mine == recorded:
        return
    raise UserError(f"{stage}: {cfg.root} holds {cfg.task_name} made with {_describe(recorded, mine)}; this run asks for "
                    f"{_describe(mine, recorded)}: rerun with the root's settings, or give another --root")


def _describe(this: dict, other: dict) -> str:
    """The flags in which `this` differs from `other` (the profile alone when profiles differ:
    every setting follows from it)."""
    parts = []
    if this["profile"] != other["profile"]:
        parts.append(f"--profile {this['profile']}")
    else:
        for key in sorted(this["settings"]):
            if this["settings"][key] != other["settings"].get(key):
                parts.append(f"-o {key}={_flag_value(this['settings'][key])}")
    if this["seed"] != other["seed"]:
        parts.append(f"--seed {this['seed']}")
    text = ", ".join(parts) or "other settings"
    return text if len(text) <= 160 else text[:157] + "..."


def _flag_value(value) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)
