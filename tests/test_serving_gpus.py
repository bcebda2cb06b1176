"""GPUs where Ray gives them, never elsewhere: the replicas' device decision, the GPU knobs of
`bmoe serve` and of the Serve config, and the num_gpus the built application asks Ray for.
No Serve, no GPU: the decision takes Ray's assigned ids and CUDA's presence as arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serving.loading import ServedRun, assigned_device
from tasks import TaskRef
from serving.settings import Scaling, ServeSettings

PROJECT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("gpu_ids, cuda, device", [
    ([], True, "cpu"),  # num_gpus 0 on a GPU node: CUDA is visible, yet the GPU is another's
    ([], False, "cpu"),
    ([0], True, "cuda"),  # Ray gave the replica GPU 0 (it is the only one visible to it)
    (["3"], True, "cuda"),
    ([0], False, "cpu"),  # a GPU assigned, but a CPU-only PyTorch build
])
def test_a_replica_uses_cuda_only_when_ray_assigned_it_a_gpu(gpu_ids, cuda, device):
    assert assigned_device(gpu_ids, cuda).type == device


def test_gpu_shares_reach_the_scaling_and_negative_ones_are_one_line_errors():
    settings = ServeSettings.from_args({"expert": {"num_gpus": "0.25"}, "router": {"num_gpus": 1}})
    assert settings.scaling(0).ray_actor_options() == {"num_cpus": 0.25, "num_gpus": 0.25}
    assert settings.router.ray_actor_options()["num_gpus"] == 1.0
    assert "num_gpus" not in ServeSettings().router.ray_actor_options()  # CPU by default
    with pytest.raises(ValueError, match="^expert scaling: num_gpus must be 0 or more"):
        ServeSettings.from_args({"expert": {"num_gpus": -0.5}})
    with pytest.raises(ValueError, match="num_cpus must be 0 or more"):
        Scaling(num_cpus=-1)


def _run(names=("espcn_x4", "espcn_x3", "espcn_x2")) -> ServedRun:
    """A served run by reference: build() binds references only, it reads no file."""
    return ServedRun(ref=TaskRef("superres", "smoke"), root="/nowhere", tracking_uri="sqlite:///x.db",
                     expert_names=tuple(names), d=(3072.0, 5461.3, 12288.0), gate_file="/nowhere/gate.pt",
                     gate_method="soft", expert_sources=tuple(f"/nowhere/{n}.pt" for n in names))


@pytest.mark.parametrize("expert_gpus, router_gpus", [(0.25, 0.5), (0.0, 1.0), (0.0, 0.0)])
def test_the_built_application_asks_ray_for_the_gpus_given(expert_gpus, router_gpus):
    from serving.app import build

    settings = ServeSettings.from_args({"expert": {"num_gpus": expert_gpus}, "router": {"num_gpus": router_gpus}})
    router = build(settings, _run())._bound_deployment
    experts = [app._bound_deployment for app in router.init_args[3]]  # Router(run, settings, target, experts)
    assert router.ray_actor_options.get("num_gpus", 0.0) == router_gpus
    assert [e.ray_actor_options.get("num_gpus", 0.0) for e in experts] == [expert_gpus] * 3
    assert [e.name for e in experts] == ["superres-expert-0-espcn_x4", "superres-expert-1-espcn_x3",
                                         "superres-expert-2-espcn_x2"]


def test_the_serve_config_has_the_gpu_knobs_of_the_cli():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((PROJECT / "serving" / "serve_config.yaml").read_text())
    args = ServeDeploySchema.model_validate(raw).applications[0].args
    assert {"num_gpus"} <= set(args["router"]) and {"num_gpus"} <= set(args["expert"])
    settings = ServeSettings.from_args(args)
    assert settings.router.num_gpus == 0 and settings.expert.num_gpus == 0.25


@pytest.mark.parametrize("flag", ["--expert-gpus", "--router-gpus"])
def test_serve_refuses_a_negative_gpu_share_in_one_line(flag, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    out = CliRunner().invoke(app, ["serve", "--root", str(tmp_path), flag, "-1"])
    assert out.exit_code == 2 and flag in out.output and "Traceback" not in out.output
    fine = CliRunner().invoke(app, ["serve", "--root", str(tmp_path), flag, "0.5"])  # accepted: the run is missing
    assert fine.exit_code == 1 and "run `bmoe sweep --task superres` first" in fine.output
