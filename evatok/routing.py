"""Choosing each clip's token assignment: by the router, uniformly, from labels, under a mean-token
budget, or by an ElasticTok-style error threshold. Plain PyTorch; every choice is per clip.

Modes (``parse_mode``), the strings the ``tokenize`` stage and the evaluation take::

    router              argmax_a p(a | x) of the router (the EVATok default)
    uniform:<count>     the same count in every block (the fixed-length baseline), e.g. uniform:32
    labels              the max-reward labels of the label stage (the oracle; needs the labels)
    budget:<tokens>     budget-targeted routing: mean tokens per clip close to <tokens>, e.g. budget:200

Budget-targeted routing. Each clip picks ``argmax_a log p(a|x) - lam * L(a)``, with ``L(a)`` the
assignment's total token count and ONE scalar ``lam`` (nats per token) for all clips. ``lam`` is found
once, by bisection on a calibration split (``calibrate_lambda``), then frozen and recorded with the
output; the choice of a clip then depends on that clip and ``lam`` alone, never on the other clips of
its batch (AdapTok's integer program couples a batch's clips; this does not). The mean total over
clips is a non-increasing step function of ``lam`` (for each clip, the argmax's length can only fall
as ``lam`` grows), so bisection brackets the step that crosses the target; ``lam`` is then moved to
the middle of the constant stretch of the closer step, so a rounding difference in ``log p`` (a clip
routed alone or in a batch) cannot tip a clip that sits on a breakpoint. ``lam < 0`` buys more tokens
than the router's own choice, ``lam > 0`` fewer; ``lam = 0`` is the router.

Threshold baseline (ElasticTok-style, EVATok Fig. 5). Block by block, the smallest count whose block
error is at most the threshold, given the counts already chosen for the earlier blocks (the tokenizer
is block-causal: block t's reconstruction depends on counts 1..t); the largest count when none is.
``threshold_walk`` takes any ``errors(prefix_levels) -> [m] block errors``; ``BlockErrors`` computes
them with the tokenizer's prefix interface (one ``prefix_step`` per visited prefix, memoised, so a
sweep over many thresholds shares its walks).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from evatok.assignment import AssignmentSpace

MODES = ("router", "uniform", "labels", "budget")


class RoutingError(ValueError):
    pass


# ----------------------------------------------------------------------------- modes
@dataclass(frozen=True)
class Mode:
    kind: str                  # router | uniform | labels | budget
    value: float | None = None  # uniform: tokens per block; budget: mean tokens per clip

    def __str__(self) -> str:
        if self.value is None:
            return self.kind
        v = int(self.value) if float(self.value).is_integer() else self.value
        return f"{self.kind}:{v}"

    @property
    def needs_router(self) -> bool:
        return self.kind in ("router", "budget")


def parse_mode(text: str, counts: Sequence[int] | None = None, num_blocks: int = 4) -> Mode:
    """``router`` | ``uniform:<count>`` | ``labels`` | ``budget:<mean tokens>`` -> ``Mode``. With
    ``counts`` (the candidate counts per block) the value is checked against them."""
    kind, _, arg = str(text).strip().partition(":")
    if kind not in MODES:
        raise RoutingError(f"unknown assignment mode {text!r}; modes: router, uniform:<count>, labels, "
                           f"budget:<mean tokens>")
    if kind in ("router", "labels"):
        if arg:
            raise RoutingError(f"mode {kind!r} takes no value, got {text!r}")
        return Mode(kind)
    try:
        value = float(arg)
    except ValueError:
        raise RoutingError(f"mode {kind!r} needs a number ({kind}:<{'count' if kind == 'uniform' else 'tokens'}>), "
                           f"got {text!r}") from None
    if kind == "uniform":
        if not value.is_integer() or (counts is not None and int(value) not in tuple(counts)):
            raise RoutingError(f"uniform:<count> takes a candidate count per block {tuple(counts or ())}, got {text!r}")
        return Mode(kind, float(int(value)))
    if not math.isfinite(value) or value <= 0:
        raise RoutingError(f"budget:<mean tokens> takes a positive number, got {text!r}")
    if counts is not None and not num_blocks * min(counts) <= value <= num_blocks * max(counts):
        raise RoutingError(f"budget {value:g} is outside the reachable mean tokens per clip "
                           f"[{num_blocks * min(counts)}, {num_blocks * max(counts)}]")
    return Mode(kind, value)


# ----------------------------------------------------------------------------- router scores
@torch.no_grad()
def router_log_probs(router, clips: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """``log p(a | x)`` of every clip ``[N, 3, T, H, W]`` (model range) -> float64 ``[N, A]`` on the CPU."""
    p = next(router.parameters())
    out = [torch.log_softmax(router(clips[i:i + batch_size].to(p.device, p.dtype)).double(), -1).cpu()
           for i in range(0, clips.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, router.config.num_classes, dtype=torch.float64)


def budget_choice(log_probs: torch.Tensor, totals: torch.Tensor, lam: float) -> torch.Tensor:
    """``argmax_a log p(a|x) - lam * L(a)`` for each row of ``log_probs [N, A]`` -> LongTensor ``[N]``.
    Row by row: a clip's choice depends on its own row and ``lam`` only."""
    return (log_probs.double() - float(lam) * totals.double().to(log_probs.device)).argmax(-1)


def mean_tokens(choice: torch.Tensor, totals: torch.Tensor) -> float:
    return float(totals.double()[choice.cpu()].mean()) if len(choice) else float("nan")


@dataclass(frozen=True)
class Calibration:
    """A frozen budget: what ``budget_choice`` needs (``lam``) and how it was fitted."""
    target: float           # B, mean tokens per clip asked for
    lam: float              # nats per token
    achieved: float         # mean tokens per clip on the calibration clips at ``lam``
    clips: int              # calibration clips
    lam_interval: tuple[float, float]  # the stretch of lam giving the same choices (lam is its middle)
    iterations: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lam_interval"] = list(self.lam_interval)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(float(d["target"]), float(d["lam"]), float(d["achieved"]), int(d["clips"]),
                   tuple(float(x) for x in d["lam_interval"]), int(d["iterations"]))


def calibrate_lambda(log_probs: torch.Tensor, totals: torch.Tensor, target: float,
                     iterations: int = 64) -> Calibration:
    """The one ``lam`` whose budget choices on the calibration clips (``log_probs [N, A]``) come
    closest to ``target`` mean tokens per clip, by bisection (see the module doc)."""
    lp, tot = log_probs.double().cpu(), totals.double().cpu()
    if lp.ndim != 2 or lp.shape[0] == 0 or lp.shape[1] != tot.shape[0]:
        raise RoutingError(f"need log-probs [N >= 1, {tot.shape[0]}], got {tuple(lp.shape)}")
    lo_t, hi_t = float(tot.min()), float(tot.max())
    if not lo_t <= target <= hi_t:
        raise RoutingError(f"budget {target:g} is outside the reachable mean tokens per clip [{lo_t:g}, {hi_t:g}]")

    def mean_at(lam: float) -> float:
        return mean_tokens(budget_choice(lp, tot, lam), tot)

    # Past +-big every clip takes the shortest / longest total: a step of >= gap tokens moves the
    # objective by more than any spread of log p within a row.
    gaps = tot.unique().diff()
    gap = float(gaps.min()) if len(gaps) else 1.0
    big = float((lp.max(1).values - lp.min(1).values).max()) / gap + 1.0
    a, b = -big, big             # mean(a) >= target >= mean(b)
    n = 0
    for n in range(1, iterations + 1):
        mid = 0.5 * (a + b)
        if mean_at(mid) >= target:
            a = mid
        else:
            b = mid
    ma, mb = mean_at(a), mean_at(b)
    # The closer of the two steps around the crossing; then the middle of its constant stretch.
    side = a if abs(ma - target) <= abs(mb - target) else b
    same = lambda lam: (budget_choice(lp, tot, lam) == budget_choice(lp, tot, side)).all()  # noqa: E731
    lo, hi = -big, side          # the left end: same choices on (lo, side]
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if same(mid) else (mid, hi)
    left = hi
    lo, hi = side, big           # the right end
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if same(mid) else (lo, mid)
    right = lo
    lam = 0.5 * (left + right)
    return Calibration(float(target), lam, mean_at(lam), int(lp.shape[0]), (left, right), n)


# ----------------------------------------------------------------------------- assignments by mode
def uniform_choice(space: AssignmentSpace, count: int, n: int) -> torch.Tensor:
    return torch.full((n,), space.uniform_index(int(count)), dtype=torch.long)


def choose(mode: Mode, space: AssignmentSpace, *, log_probs: torch.Tensor | None = None,
           labels: Sequence[int] | torch.Tensor | None = None, lam: float | None = None,
           n: int | None = None) -> torch.Tensor:
    """Assignment indices ``[N]`` for ``mode``: ``router``/``budget`` from ``log_probs [N, A]`` (budget
    with its frozen ``lam``), ``labels`` from the given label indices, ``uniform`` for ``n`` clips."""
    if mode.kind == "uniform":
        size = n if n is not None else (len(labels) if labels is not None else len(log_probs))
        return uniform_choice(space, int(mode.value), size)
    if mode.kind == "labels":
        if labels is None:
            raise RoutingError("mode 'labels' needs the label stage's labels")
        out = torch.as_tensor(labels, dtype=torch.long)
        if bool(((out < 0) | (out >= space.size)).any()):
            raise RoutingError(f"label indices must be in [0, {space.size})")
        return out
    if log_probs is None:
        raise RoutingError(f"mode {mode} needs the router's log-probabilities")
    if mode.kind == "router":
        return log_probs.argmax(-1)
    if lam is None:
        raise RoutingError("budget mode needs a calibrated lambda (calibrate_lambda)")
    return budget_choice(log_probs, space.totals, lam)


# ----------------------------------------------------------------------------- threshold baseline
def pick_level(errors: Sequence[float], threshold: float) -> int:
    """The smallest level whose error is at most ``threshold``; the last (most tokens) when none is."""
    for level, e in enumerate(errors):
        if float(e) <= threshold:
            return level
    return len(errors) - 1


def threshold_walk(errors: Callable[[tuple[int, ...]], Sequence[float]], num_blocks: int,
                   threshold: float) -> tuple[int, ...]:
    """Levels of one clip, block by block: ``errors(prefix)`` gives the block errors of the next block
    at every level, given the levels ``prefix`` chosen for the earlier blocks."""
    levels: tuple[int, ...] = ()
    for _ in range(num_blocks):
        levels += (pick_level(errors(levels), threshold),)
    return levels


class BlockErrors:
    """Block MSE (frames in [0, 1], reconstruction clamped, mean over the block's frames and pixels) of
    one clip ``[1, 3, T, H, W]`` under every count of the next block, for a prefix of levels: the
    tokenizer's ``prefix_step``, memoised by prefix."""

    def __init__(self, tokenizer, clip: torch.Tensor):
        c = tokenizer.config
        self.tok, self.pt = tokenizer, c.patch_t
        self.clip = clip + 0.5
        self.states = {(): tokenizer.prefix_init(clip)}
        self.cache: dict[tuple[int, ...], list[float]] = {}
        self.steps = 0

    @torch.no_grad()
    def __call__(self, prefix: tuple[int, ...]) -> list[float]:
        if prefix not in self.cache:
            recon, _, children = self.tok.prefix_step(self.states[prefix])  # [m, 1, 3, pt, H, W]
            self.steps += 1
            t = len(prefix)
            target = self.clip[:, :, t * self.pt:(t + 1) * self.pt]
            err = (recon.float().clamp(-0.5, 0.5) + 0.5 - target).square().flatten(1).mean(1)
            self.cache[prefix] = [float(e) for e in err]
            for level, child in enumerate(children):
                self.states[prefix + (level,)] = child
        return self.cache[prefix]


@torch.no_grad()
def threshold_assignments(tokenizer, clips: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """ElasticTok-style assignments of clips ``[N, 3, T, H, W]`` (model range) for every threshold (block
    MSE): LongTensor ``[len(thresholds), N]`` of assignment indices."""
    c = tokenizer.config
    place = len(c.counts) ** torch.arange(c.num_blocks - 1, -1, -1)
    p = next(tokenizer.parameters())
    out = torch.zeros(len(thresholds), clips.shape[0], dtype=torch.long)
    for i in range(clips.shape[0]):
        errs = BlockErrors(tokenizer, clips[i:i + 1].to(p.device, p.dtype))
        for j, thr in enumerate(thresholds):
            levels = threshold_walk(errs, c.num_blocks, float(thr))
            out[j, i] = int((torch.tensor(levels) * place).sum())
    return out
