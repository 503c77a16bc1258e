"""Click parameter types that reject what the plain types let through (usage errors, exit 2)."""

from __future__ import annotations

import math
import re

import click

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class DeviceType(click.ParamType):
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; anything else is a usage error.
    (Whether the device exists is checked when the command starts: exit 1.)"""

    name = "device"

    def convert(self, value, param, ctx):
        text = str(value).strip().lower()
        if not _DEVICE.match(text):
            self.fail(f"{value!r} is not a device: use auto, cpu, cuda, cuda:N or mps", param, ctx)
        return text


class FiniteFloatRange(click.FloatRange):
    """:class:`click.FloatRange` that also refuses NaN and infinities (Click's range check
    lets NaN through, since every comparison with NaN is false)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


DEVICE = DeviceType()
