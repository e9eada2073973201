"""The scheduling policy as the Lua scripts read it: the configuration turned into the fields of the
namespace's ``policy`` hash (``lua/policy-3.lua`` stores them; ``lua/includes/state.lua`` reads them).

Pure: no I/O. Time windows are turned into absolute intervals of Unix milliseconds (from yesterday to two weeks
ahead, in each window's own time zone, so daylight-saving changes are exact), because the scripts evaluate
them against Redis time and Lua has no time-zone database. A boss re-applies the policy once a day.

Fields (each written only when the configuration sets it; ``""`` removes a field):

``pause``     list of {class, while, evict}
``classes``   {class: rank}, for aging
``aging``     {every_ms, max_boost}
``queueing``  "strict" or "backfill"
``overtake``  how many times a request that does not fit may be passed by later ones (absent: 0)
``windows``   list of {class, from, to} (ms, Redis time)
``caps``      {services: {name: {leases, mib}}, classes: {name: {leases}}}
``max_hold``  {class: {ms, action}}
"""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from gpuboss.config import DAYS, BossConfig, Window, gb_to_mib

#: Days of windows written ahead; a boss refreshes them daily, so this only matters if none runs for weeks.
DAYS_AHEAD = 14


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def window_intervals(window: Window, today: date) -> list[dict[str, Any]]:
    """The paused intervals of one window from the day before ``today`` to DAYS_AHEAD days after."""
    zone = ZoneInfo(window.tz)
    start_s, end_s = window.pause.split("-")
    sh, sm = (int(x) for x in start_s.split(":"))
    eh, em = (int(x) for x in end_s.split(":"))
    out = []
    for offset in range(-1, DAYS_AHEAD + 1):
        day = today + timedelta(days=offset)
        if DAYS[day.weekday()] not in window.days:
            continue
        begin = datetime.combine(day, time(sh, sm), tzinfo=zone)
        end_day = day if (eh, em) > (sh, sm) else day + timedelta(days=1)
        end = datetime.combine(end_day, time(0, 0), tzinfo=zone) + timedelta(hours=eh, minutes=em)
        out.append({"class": window.paused, "from": _ms(begin), "to": _ms(end)})
    return out


def _ms(moment: datetime) -> int:
    return math.floor(moment.astimezone(UTC).timestamp() * 1000)


def policy_fields(config: BossConfig, today: date | None = None) -> list[tuple[str, str]]:
    """The (field, JSON) pairs this configuration sets in the policy hash."""
    today = today or datetime.now(UTC).date()
    fields: list[tuple[str, str]] = []
    if config.pause is not None:
        rules = [r.to_lua() for r in config.pause]
        fields.append(("pause", _dump(rules) if rules else ""))
    if config.aging is False:
        fields += [("classes", ""), ("aging", "")]
    elif config.aging is not None:
        fields.append(("classes", _dump(config.priorities)))
        aging = {"every_ms": math.ceil(config.aging.every_s * 1000), "max_boost": config.aging.max_boost}
        fields.append(("aging", _dump(aging)))
    if config.queueing is not None:
        fields.append(("queueing", config.queueing))
    if config.overtake is not None:
        fields.append(("overtake", str(config.overtake) if config.overtake > 0 else ""))
    if config.windows is not None:
        intervals = [i for w in config.windows for i in window_intervals(w, today)]
        fields.append(("windows", _dump(intervals) if intervals else ""))
    if config.caps is not None:
        caps: dict[str, Any] = {"services": {}, "classes": {}}
        for name, cap in config.caps.services.items():
            entry: dict[str, int] = {}
            if cap.max_leases is not None:
                entry["leases"] = cap.max_leases
            if cap.max_vram_gb is not None:
                entry["mib"] = gb_to_mib(cap.max_vram_gb)
            caps["services"][name] = entry
        for name, ccap in config.caps.classes.items():
            caps["classes"][name] = {"leases": ccap.max_leases}
        fields.append(("caps", _dump(caps)))
    if config.max_hold is not None:
        holds = {c: {"ms": math.ceil(h.seconds * 1000), "action": h.action} for c, h in config.max_hold.items()}
        fields.append(("max_hold", _dump(holds) if holds else ""))
    return fields
