"""Serving hooks of the action task (tasks.base.Task, serving section).

The client POSTs a whole video file (AVI/MP4, anything PyAV decodes); the request is one routing
unit. The sensor side reads the codec's motion vectors (the gate input, which the sensor has
anyway) and the RGB frames with the very readers that prepared the training data, so every P_n
is exactly what expert n was trained on; only the chosen expert's P_n crosses. The response is
the predicted class with its top-5 probabilities.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tasks.action import frames as rgb
from tasks.action import motion_vectors as mv
from tasks.action import synthetic
from tasks.base import BadInput, ServedInput

if TYPE_CHECKING:
    from tasks.action.task import ActionTask

TOP = 5  # classes in the response
UCF101_CLASSES = (  # UCF-101's classInd.txt, in label order (label = its number - 1)
    "ApplyEyeMakeup", "ApplyLipstick", "Archery", "BabyCrawling", "BalanceBeam", "BandMarching", "BaseballPitch",
    "Basketball", "BasketballDunk", "BenchPress", "Biking", "Billiards", "BlowDryHair", "BlowingCandles",
    "BodyWeightSquats", "Bowling", "BoxingPunchingBag", "BoxingSpeedBag", "BreastStroke", "BrushingTeeth",
    "CleanAndJerk", "CliffDiving", "CricketBowling", "CricketShot", "CuttingInKitchen", "Diving", "Drumming",
    "Fencing", "FieldHockeyPenalty", "FloorGymnastics", "FrisbeeCatch", "FrontCrawl", "GolfSwing", "Haircut",
    "Hammering", "HammerThrow", "HandstandPushups", "HandstandWalking", "HeadMassage", "HighJump", "HorseRace",
    "HorseRiding", "HulaHoop", "IceDancing", "JavelinThrow", "JugglingBalls", "JumpingJack", "JumpRope", "Kayaking",
    "Knitting", "LongJump", "Lunges", "MilitaryParade", "Mixing", "MoppingFloor", "Nunchucks", "ParallelBars",
    "PizzaTossing", "PlayingCello", "PlayingDaf", "PlayingDhol", "PlayingFlute", "PlayingGuitar", "PlayingPiano",
    "PlayingSitar", "PlayingTabla", "PlayingViolin", "PoleVault", "PommelHorse", "PullUps", "Punch", "PushUps",
    "Rafting", "RockClimbingIndoor", "RopeClimbing", "Rowing", "SalsaSpin", "ShavingBeard", "Shotput",
    "SkateBoarding", "Skiing", "Skijet", "SkyDiving", "SoccerJuggling", "SoccerPenalty", "StillRings",
    "SumoWrestling", "Surfing", "Swing", "TableTennisShot", "TaiChi", "TennisSwing", "ThrowDiscus",
    "TrampolineJumping", "Typing", "UnevenBars", "VolleyballSpiking", "WalkingWithDog", "WallPushups",
    "WritingOnBoard", "YoYo",
)


def class_names(classes: int) -> list[str]:
    """Label -> name: the embedded data's classes or UCF-101's, by how many the experts predict
    (the run keeps no classInd.txt); any other count is named by its 1-based number."""
    if classes == len(synthetic.CLASSES):
        return [c.name for c in synthetic.CLASSES]
    if classes == len(UCF101_CLASSES):
        return list(UCF101_CLASSES)
    return [f"class_{k + 1}" for k in range(classes)]


def decode_request(task: ActionTask, body: bytes) -> ServedInput:
    """Video bytes -> one routing unit: its motion grid (the gate input) and every P_n.

    A clip with fewer frames of motion than F_t is zero-padded, as load() pads training clips.
    """
    if not body:
        raise BadInput("empty request body: POST the raw bytes of a video clip (AVI or MP4)")
    s = task.settings
    # decord reads only paths; PyAV and decord probe the container from its bytes, not its name
    with tempfile.TemporaryDirectory(prefix="bmoe-action-") as folder:
        path = Path(folder) / "request"
        path.write_bytes(body)
        try:
            grid = mv.motion_grids(path, s.F_t, scale=s.motion_scale)  # (F_t, 24, 24, 2) float32
            frames = rgb.rgb_frames(path, s.F_s, s.H_s, s.W_s)  # (F_s, H_s, W_s, 3) uint8
        except mv.NoMotion:
            raise BadInput(f"request body ({len(body)} bytes) carries no motion vectors (an image, or every "
                           "frame intra-coded); POST a video clip with inter-coded frames") from None
        except (mv.Undecodable, rgb.UnreadableFrames) as err:
            reason = str(err).replace(f"{path}: ", "").replace(f": '{path}'", "").replace(str(path), "request body")
            reason = " ".join(re.sub(r"\[Errno -?\d+\] ", "", reason).split())  # one line, no errno noise
            raise BadInput(f"request body ({len(body)} bytes) is not a readable video (AVI/MP4): {reason}") from None
    inputs = task.expert_inputs(grid, frames)  # x0, x1, x2 as training stored them
    return ServedInput(gate_input=grid[None], full_data_cost=float(task.data_costs()[-1]),
                       full_wire_bytes=int(grid.nbytes + frames.nbytes),
                       context={"inputs": [x[None] for x in inputs]})  # each (1, ...): one unit


def request_inputs(request: ServedInput, n: int, units: np.ndarray) -> np.ndarray:
    """(len(units), ...) P_n: temporal float32 grids, spatial uint8 frames, fusion packed uint8 rows."""
    return request.context["inputs"][n][units]


def serve_expert(task: ActionTask, n: int, model: torch.nn.Module, x: np.ndarray,
                 device: torch.device) -> list[np.ndarray]:
    """P_n of B clips -> one (classes,) float32 array of class probabilities per clip."""
    batch = torch.as_tensor(np.array(x), device=device)  # a writable copy of the wire's buffer
    with torch.no_grad():
        probs = torch.softmax(task.logits(n, model, batch).float(), dim=1)  # (B, classes)
    return list(probs.cpu().numpy())


def response(task: ActionTask, outputs: list[np.ndarray]) -> dict:
    """The clip's class (0-based index, as training labels) and its top-5 classes with names."""
    probs = np.asarray(outputs[0], dtype=np.float64)  # (classes,): the request's only unit
    names = class_names(task.settings.classes)
    top = np.argsort(-probs, kind="stable")[:TOP]
    return {"label": names[top[0]], "class_index": int(top[0]),
            "probabilities": [{"label": names[k], "class_index": int(k), "probability": float(probs[k])}
                              for k in top]}
