"""One kind of event for both lanes: a timed step along the highway.

A lane yields one `Step` per thing it does (tokenize, prefill, each decode step; encode, each
denoising step, decode). The lanes add their own fields (the token chosen, the x0 preview...);
what every step has is here: where it is on the highway, how long it took on the device, how much
work it was, and the shapes of the tensors that flowed through it.

Depends on studio.profiling only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from studio.profiling import StepTiming


@dataclass(kw_only=True)
class Step:
    phase: str  # e.g. "prefill", "decode", "denoise"
    index: int  # position of this step within its phase, from 0
    timing: StepTiming | None = None  # device time, resolved when first read (no sync before)
    flops: int | None = None  # analytic count of floating-point operations
    bytes: int | None = None  # analytic count of bytes moved to and from device memory
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # stage -> tensor shape

    @property
    def ms(self) -> float | None:
        """Device milliseconds of this step (reading it waits for the step to finish)."""
        return self.timing.ms if self.timing is not None else None
