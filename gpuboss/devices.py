"""From a GPU's identity (its UUID, or a MIG instance's UUID) to this process's CUDA ordinal, and back.

A GPU is named by its UUID everywhere in gpuboss; ``cuda:N`` only means something inside one process, because
CUDA numbers the devices it can see, and what it sees and in which order depends on that process's
environment:

``CUDA_DEVICE_ORDER``
    ``PCI_BUS_ID`` numbers the GPUs in PCI bus order, the order of ``nvidia-smi`` and NVML. The default,
    ``FASTEST_FIRST``, puts the fastest GPU first by a heuristic of the driver; on a host whose GPUs are all
    the same model that is PCI bus order again, but on a host of mixed models no one outside CUDA can say
    for sure which is first. gpuboss then makes its best guess (newer compute capability, then more
    memory, first) and says so in a warning that tells the fix.

``CUDA_VISIBLE_DEVICES``
    Unset: every GPU is visible. Set: a comma-separated list, and the process sees exactly those devices, in
    the list's order. An entry is an index into the order above (``"0,2"``), a GPU UUID (``"GPU-8932f937-..."``)
    or a MIG instance's UUID (``"MIG-..."``, or the older ``"MIG-GPU-<uuid>/<gi>/<ci>"``); a UUID may be
    shortened to any prefix that names one device. An empty value, or one whose first entry is invalid
    (``"-1"``), hides every GPU. An invalid entry (out of range, unknown, ambiguous, or of the other kind than
    the first entry) hides itself and every entry after it; a device listed twice hides every device.

MIG
    CUDA 11 and 12 enumerate at most one MIG instance per process. When the visible list names MIG instances,
    the first one named is the process's only device (``cuda:0``); otherwise a listed GPU with MIG enabled
    stands for its first MIG instance, and if there is one, it is the only device. A GPU with MIG enabled is
    never a CUDA device itself.

Listing GPUs by UUID makes the ordinal certain whatever the order, which is why :func:`child_env` hands a
child process ``CUDA_VISIBLE_DEVICES=<uuid>``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from gpuboss.errors import InvalidRequest
from gpuboss.nvml import MigInstance, PhysicalGpu

ENV_VISIBLE = "CUDA_VISIBLE_DEVICES"
ENV_ORDER = "CUDA_DEVICE_ORDER"
PCI_BUS_ID = "PCI_BUS_ID"
FASTEST_FIRST = "FASTEST_FIRST"

Unit = PhysicalGpu | MigInstance
U = TypeVar("U", PhysicalGpu, MigInstance)

_PCI_RE = re.compile(r"^(?:([0-9A-Fa-f]{1,8}):)?([0-9A-Fa-f]{1,2}):([0-9A-Fa-f]{1,2})\.([0-7])$")
_INDEX_RE = re.compile(r"^[+-]?\d+")
_LEGACY_MIG_RE = re.compile(r"^MIG-(GPU-[^/]+)/(\d+)/(\d+)$")
_UNKNOWN_PCI = (1 << 32, 1 << 8, 1 << 8, 8)
_KIND_TEXT = {"index": "an index", "uuid": "a UUID"}
_KIND_PLURAL = {"index": "indices", "uuid": "UUIDs"}


def pci_key(bus_id: str) -> tuple[int, int, int, int]:
    """``"00000000:01:00.0"`` (or ``"0000:01:00.0"``, ``"01:00.0"``) as (domain, bus, device, function);
    an unreadable bus id sorts last."""
    m = _PCI_RE.match(bus_id.strip())
    if m is None:
        return _UNKNOWN_PCI
    domain, bus, device, function = m.groups()
    return (int(domain or "0", 16), int(bus, 16), int(device, 16), int(function))


@dataclass(frozen=True)
class Visibility:
    """The devices this process's CUDA sees, by UUID, in ordinal order (``uuids[N]`` is ``cuda:N``)."""

    uuids: tuple[str, ...]
    #: The order CUDA numbers devices in: ``"PCI_BUS_ID"`` or ``"FASTEST_FIRST"``.
    order: str
    #: False when the ordinals rest on a guess of CUDA's fastest-first order; ``warning`` then says the fix.
    certain: bool = True
    warning: str | None = None
    #: What the environment hid, and why, one sentence each.
    notes: tuple[str, ...] = ()

    def ordinal(self, uuid: str) -> int | None:
        try:
            return self.uuids.index(uuid)
        except ValueError:
            return None


@dataclass(frozen=True)
class Ordinal:
    """Where one GPU is in this process: ``ordinal`` (None when the process cannot see it)."""

    uuid: str
    ordinal: int | None
    certain: bool = True
    #: Set when ``certain`` is false: the ordinal is a best guess, and how to make it certain.
    warning: str | None = None
    #: Set when ``ordinal`` is None: why this process cannot see the GPU.
    reason: str | None = None

    @property
    def device(self) -> str | None:
        """``"cuda:N"``, or None when the GPU is not visible to this process."""
        return None if self.ordinal is None else f"cuda:{self.ordinal}"


def _model(gpu: PhysicalGpu) -> tuple[str, tuple[int, int] | None]:
    return (gpu.name, gpu.compute_capability)


def is_mixed(gpus: Sequence[PhysicalGpu]) -> bool:
    """True when the GPUs are not all of one model (so fastest-first order is not PCI bus order)."""
    return len({_model(g) for g in gpus}) > 1


def cuda_order(gpus: Sequence[PhysicalGpu], order: str) -> tuple[list[PhysicalGpu], bool]:
    """The physical GPUs in CUDA's enumeration order, and whether that order is certain."""
    by_pci = sorted(gpus, key=lambda g: (pci_key(g.pci_bus_id), g.index))
    if order == PCI_BUS_ID or not is_mixed(by_pci):
        return by_pci, True

    def speed(g: PhysicalGpu) -> tuple[int, int, int]:
        major, minor = g.compute_capability or (0, 0)
        return (-major, -minor, -g.memory_total_mib)

    return sorted(by_pci, key=speed), False  # stable: ties stay in PCI bus order


def _order_of(env: Mapping[str, str], notes: list[str]) -> str:
    raw = env.get(ENV_ORDER)
    if raw is None or raw == FASTEST_FIRST:
        return FASTEST_FIRST
    if raw == PCI_BUS_ID:
        return PCI_BUS_ID
    notes.append(f"{ENV_ORDER}={raw!r} is not {PCI_BUS_ID!r} or {FASTEST_FIRST!r}: CUDA uses {FASTEST_FIRST}")
    return FASTEST_FIRST


def _by_prefix(prefix: str, candidates: Iterable[U]) -> tuple[U | None, str]:
    found = [c for c in candidates if c.uuid.startswith(prefix)]
    if len(found) == 1:
        return found[0], ""
    if not found:
        return None, "no device of this host has that UUID"
    return None, "the prefix names several devices (" + ", ".join(f.uuid for f in found) + ")"


def _resolve_uuid(entry: str, physical: Sequence[PhysicalGpu]) -> tuple[Unit | None, str]:
    migs = [m for g in physical for m in g.mig]
    legacy = _LEGACY_MIG_RE.match(entry)
    if legacy is not None:
        parent, why = _by_prefix(legacy.group(1), physical)
        if parent is None:
            return None, why
        gi, ci = int(legacy.group(2)), int(legacy.group(3))
        for m in parent.mig:
            if m.gpu_instance_id == gi and m.compute_instance_id == ci:
                return m, ""
        return None, f"{parent.uuid} has no MIG instance with GPU instance {gi} and compute instance {ci}"
    if entry.startswith("MIG-"):
        return _by_prefix(entry, migs)
    return _by_prefix(entry, physical)


def _parse_visible(raw: str, base: Sequence[PhysicalGpu], notes: list[str]) -> tuple[list[Unit], str | None]:
    """The devices a ``CUDA_VISIBLE_DEVICES`` value lists, before the MIG rule; and the kind of its entries
    (``"index"``, ``"uuid"``, or None when it lists nothing)."""
    listed: list[Unit] = []
    kind: str | None = None
    entries = raw.split(",")
    for position, entry in enumerate(entries):
        text = entry.strip()
        number = _INDEX_RE.match(text)
        this_kind = "index" if number is not None else "uuid" if text.startswith(("GPU-", "MIG-")) else None
        unit: Unit | None = None
        why = ""
        if this_kind is None:
            why = "it is neither an index nor a GPU-/MIG- UUID"
        elif kind is not None and this_kind != kind:
            why = f"it is {_KIND_TEXT[this_kind]} in a list of {_KIND_PLURAL[kind]}"
        elif number is not None:
            index = int(number.group())
            if 0 <= index < len(base):
                unit = base[index]
            else:
                why = f"index {index} is out of range (this host has {len(base)} GPUs: 0 to {len(base) - 1})"
        else:
            unit, why = _resolve_uuid(text, base)
        if unit is None:
            rest = " and every entry after it" if position < len(entries) - 1 else ""
            notes.append(f"{ENV_VISIBLE} entry {position} ({entry!r}) is invalid ({why}): CUDA hides it{rest}")
            break
        kind = kind or this_kind
        listed.append(unit)
    seen: set[str] = set()
    for unit in listed:
        if unit.uuid in seen:
            notes.append(f"{ENV_VISIBLE}={raw!r} lists {unit.uuid} twice: CUDA then sees no device at all")
            return [], kind
        seen.add(unit.uuid)
    return listed, kind


def _apply_mig(listed: Sequence[Unit], notes: list[str]) -> list[Unit]:
    named = [u for u in listed if isinstance(u, MigInstance)]
    if named:
        chosen = named[0]
    else:
        implicit = [g.mig[0] for g in listed if isinstance(g, PhysicalGpu) and g.mig_enabled and g.mig]
        for g in listed:
            if isinstance(g, PhysicalGpu) and g.mig_enabled and not g.mig:
                notes.append(f"{g.uuid} has MIG enabled but no MIG instance: CUDA cannot use it")
        if not implicit:
            return [g for g in listed if not (isinstance(g, PhysicalGpu) and g.mig_enabled)]
        chosen = implicit[0]
    stands_for = {chosen.uuid, chosen.parent_uuid}
    hidden = [u.uuid for u in listed if u.uuid not in stands_for]
    if hidden:
        notes.append(
            f"CUDA enumerates one MIG instance per process: {chosen.uuid} is the only device; "
            f"hidden: {', '.join(hidden)}"
        )
    return [chosen]


def _warning(base: Sequence[PhysicalGpu]) -> str:
    models = ", ".join(sorted({g.name for g in base}))
    return (
        f"this host has GPUs of different models ({models}) and {ENV_ORDER} is not {PCI_BUS_ID}, so CUDA "
        "numbers them fastest first by a heuristic gpuboss can only guess: the cuda:N given here may name "
        f"another card. Fix: set {ENV_ORDER}={PCI_BUS_ID} in the environment of every process that uses the "
        f"GPUs (before CUDA starts), or select GPUs by UUID ({ENV_VISIBLE}=GPU-...)"
    )


def visible_devices(gpus: Sequence[PhysicalGpu], env: Mapping[str, str] | None = None) -> Visibility:
    """What CUDA will see in a process with this environment (default: this process's), as UUIDs."""
    environ: Mapping[str, str] = os.environ if env is None else env
    notes: list[str] = []
    order = _order_of(environ, notes)
    base, order_certain = cuda_order(gpus, order)
    raw = environ.get(ENV_VISIBLE)
    if raw is None:
        listed: list[Unit] = list(base)
        kind: str | None = None
    elif not raw.strip():
        notes.append(f"{ENV_VISIBLE} is set but empty: CUDA sees no device")
        listed, kind = [], None
    else:
        listed, kind = _parse_visible(raw, base, notes)
    units = _apply_mig(listed, notes) if listed else []
    # UUID entries fix the order themselves; indices, or everything visible, rest on CUDA's order.
    guessed = not order_certain and (kind == "index" or (kind is None and raw is None and len(units) > 1))
    return Visibility(
        uuids=tuple(u.uuid for u in units),
        order=order,
        certain=not guessed,
        warning=_warning(base) if guessed else None,
        notes=tuple(notes),
    )


def find_unit(uuid: str, gpus: Sequence[PhysicalGpu]) -> Unit | None:
    """The GPU or MIG instance with this UUID on this host, or None."""
    for g in gpus:
        if g.uuid == uuid:
            return g
        for m in g.mig:
            if m.uuid == uuid:
                return m
    return None


def cuda_ordinal(uuid: str, gpus: Sequence[PhysicalGpu], env: Mapping[str, str] | None = None) -> Ordinal:
    """This process's CUDA ordinal for the GPU (or MIG instance) with this UUID.

    ``gpus`` are the host's GPUs as NVML discovered them (:func:`gpuboss.nvml.discover`); ``env`` defaults to
    this process's environment. The result says whether the ordinal is certain and, when not, warns with the fix.
    """
    unit = find_unit(uuid, gpus)
    if unit is None:
        return Ordinal(uuid, None, reason=f"{uuid} is not a GPU of this host")
    if isinstance(unit, PhysicalGpu) and unit.mig_enabled:
        return Ordinal(uuid, None, reason=f"{uuid} has MIG enabled: CUDA uses its MIG instances, not the GPU")
    vis = visible_devices(gpus, env)
    ordinal = vis.ordinal(uuid)
    if ordinal is None:
        environ = os.environ if env is None else env
        shown = environ.get(ENV_VISIBLE)
        why = f"{ENV_VISIBLE}={shown!r} does not make it visible" if shown is not None else "CUDA does not see it"
        detail = "; ".join(vis.notes)
        return Ordinal(uuid, None, vis.certain, vis.warning, f"{why}{f' ({detail})' if detail else ''}")
    return Ordinal(uuid, ordinal, vis.certain, vis.warning)


def child_env(uuids: str | Iterable[str]) -> dict[str, str]:
    """The environment that gives a child process exactly these GPUs, by UUID (so its ordinals are certain):
    ``{"CUDA_VISIBLE_DEVICES": "<uuid>[,<uuid>]"}``. Merge it into the child's environment:
    ``subprocess.run(cmd, env={**os.environ, **child_env(lease.uuid)})``. The child sees them as
    ``cuda:0``, ``cuda:1``, ... in the order given."""
    items = [uuids] if isinstance(uuids, str) else list(uuids)
    if not items:
        raise InvalidRequest("uuids", items, "must name at least one GPU (an empty list would hide every GPU)")
    for u in items:
        if not isinstance(u, str) or not u.startswith(("GPU-", "MIG-")) or "," in u or u != u.strip():
            raise InvalidRequest("uuids", u, "each must be a GPU UUID ('GPU-...') or a MIG UUID ('MIG-...')")
    if len(set(items)) != len(items):
        raise InvalidRequest("uuids", items, "must not repeat a GPU (CUDA then hides every GPU)")
    migs = [u for u in items if u.startswith("MIG-")]
    if migs and len(items) > 1:
        raise InvalidRequest(
            "uuids", items, "a MIG instance must be alone: CUDA enumerates one MIG instance per process"
        )
    return {ENV_VISIBLE: ",".join(items)}


#: More significant digits than any CUDA index has; ``int()`` refuses 4300+ digits.
CUDA_INDEX_DIGITS = 18


def cuda_index(device: object) -> int | None:
    """N of ``"cuda:N"``, N in ASCII decimal digits (leading zeros allowed), or None for anything else and for
    an N of more than :data:`CUDA_INDEX_DIGITS` significant digits (no GPU has such an index)."""
    text = device[5:] if isinstance(device, str) and device.startswith("cuda:") else ""
    if not (text.isascii() and text.isdigit()):
        return None
    significant = text.lstrip("0") or "0"
    return int(significant) if len(significant) <= CUDA_INDEX_DIGITS else None


def child_env_for_device(device: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that gives a child process the GPU this process calls ``device`` (``"cuda:N"``), for GPUs
    known only by their CUDA index (declared GPUs, no UUID): this process's ``CUDA_VISIBLE_DEVICES`` entry N
    when it is set, else ``N``. The child must inherit ``CUDA_DEVICE_ORDER``; with the GPU's UUID, use
    :func:`child_env` instead, which does not depend on it."""
    ordinal = cuda_index(device)
    if ordinal is None:
        raise InvalidRequest("device", device, "must be 'cuda:N' with N >= 0")
    environ: Mapping[str, str] = os.environ if env is None else env
    raw = environ.get(ENV_VISIBLE)
    if raw is None:
        return {ENV_VISIBLE: str(ordinal)}
    entries = [e.strip() for e in raw.split(",") if e.strip()]
    if ordinal >= len(entries):
        raise InvalidRequest(
            "device", device, f"is not visible to this process ({ENV_VISIBLE}={raw!r} lists {len(entries)} devices)"
        )
    return {ENV_VISIBLE: entries[ordinal]}
