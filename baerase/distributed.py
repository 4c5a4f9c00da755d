"""Sharding a scan's candidate classes over ``torch.distributed`` ranks.

Launch the same script on every rank (``torchrun --nproc_per_node N script.py``); ``baerase.scan``
notices the process group (or ``WORLD_SIZE > 1``), recovers only its share of the chunks and
gathers every class's evidence before flagging, because the anomaly index needs all classes. Each
chunk is seeded from its own classes, so with the same chunks the numbers, and hence the verdict,
equal those of a single-process scan.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import InputError
from .recover import families
from .recover.triggers import TriggerSet


def enabled() -> bool:
    """True when this process is one of several ranks of a scan."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> tuple[int, int]:
    """(rank, world size), creating the default process group from torchrun's environment if none
    exists: nccl for CUDA models, gloo otherwise."""
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shard(chunks: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """The chunks of ``rank``: round robin, so ranks get near-equal numbers of classes."""
    return chunks[rank::world]


def check_same_inputs(fingerprint: str) -> None:
    """Refuse to gather results computed on different models or data on different ranks."""
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, fingerprint)
    if len(set(seen)) != 1:
        raise InputError(
            "the ranks of a distributed scan hold different models or data; load the same "
            "model and hold-out set (same order) on every rank"
        )


def gather(
    chunks: list[list[int]],
    mine: list[list[int]],
    triggers: TriggerSet | None,
    success: torch.Tensor,
    device: torch.device,
) -> tuple[TriggerSet | None, torch.Tensor, torch.Tensor]:
    """Collect every rank's results in the order of ``chunks``.

    Returns (triggers, success [K], norms [K]) where success and norms are on every rank (so all
    ranks reach the same verdict) and the full TriggerSet only on rank 0 (None elsewhere), which
    writes the report.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    norms = triggers.norms() if triggers is not None else torch.zeros(0)
    local = {"chunks": mine, "success": success.detach().cpu(), "norms": norms.detach().cpu()}
    everyone = [None] * world
    dist.all_gather_object(everyone, local)
    states = [None] * world if rank == 0 else None
    state = None if triggers is None else (triggers.meta, {k: v.cpu() for k, v in triggers.state_dict().items()})
    dist.gather_object(state, states, dst=0)

    # Position of each chunk's rows inside the payload of the rank that computed it.
    where = {}
    for r, part in enumerate(everyone):
        offset = 0
        for piece in part["chunks"]:
            where[tuple(piece)] = (r, offset, offset + len(piece))
            offset += len(piece)
    rows = [where[tuple(piece)] for piece in chunks]
    success = torch.cat([everyone[r]["success"][a:b] for r, a, b in rows]).to(device)
    norms = torch.cat([everyone[r]["norms"][a:b] for r, a, b in rows]).to(device)
    if rank != 0:
        return None, success, norms
    sets = {r: families.from_state(*states[r]) for r in range(world) if states[r] is not None}
    pieces = [sets[r].select(list(range(a, b))) for r, a, b in rows]
    return families.concat(pieces).to(device), success, norms


def from_rank0(value):
    """``value`` as rank 0 holds it, on every rank (itself outside torchrun): one verdict for all."""
    if not enabled():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_values(
    chunks: list[list[int]], mine: list[list[int]], values: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Every rank's per-class ``values`` [k] in the order of ``chunks``, on every rank."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"chunks": mine, "values": values.detach().cpu()})
    where = {}
    for part in everyone:
        offset = 0
        for piece in part["chunks"]:
            where[tuple(piece)] = part["values"][offset : offset + len(piece)]
            offset += len(piece)
    return torch.cat([where[tuple(piece)] for piece in chunks]).to(device)


def check_ranks(model, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> None:
    """Under torchrun, every rank must scan the same model and data: their results are gathered."""
    from .report import sha256_model, sha256_tensors

    if enabled():
        setup(device)
        check_same_inputs(f"{sha256_model(model)}:{sha256_tensors(images, labels)}")
