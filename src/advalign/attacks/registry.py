"""The attack registry: each attack declares once what the rest of the pipeline needs.

An attack file (``advalign/attacks/<name>.py``) calls :func:`register_attack` at import
with an :class:`Attack`: its name (the config key and the ``{attack}`` wildcard), the
norm its distances are measured in, whether it is a minimal-ε search over a fixed-ε
attack or a minimal-norm attack (foolbox's distinction), the JSON schema of its config
block, how to turn that block into its config object, how to run it on a batch, and
which models and images it is run on. The package imports every module in it
(``advalign.attacks.__init__``), so a new attack costs its file plus its config block:

* ``columns``/``stats`` read the names and the tolerance column from here,
* the workflow plans one job per enabled attack and model (``attack_models``),
* the config schema's ``attacks`` section gets one block per attack
  (``advalign.config.load_schema``),
* the attack job (``advalign.attacks.job``) dispatches through :meth:`Attack.run`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..io import PipelineError

if TYPE_CHECKING:  # planning reads the registry without importing torch
    import numpy as np
    import torch

NORMS = ("l2", "linf")
# minimal_epsilon: a fixed-ε attack searched over ε; minimal_norm: minimises the norm itself;
# fixed_epsilon: run once at a fixed ε, measuring robust accuracy (no tolerance).
KINDS = ("minimal_epsilon", "minimal_norm", "fixed_epsilon")


@dataclass
class AttackResult:
    """Per-image outcome of an attack over N images (all of which were attacked)."""

    success: np.ndarray  # bool [N]
    epsilon: np.ndarray  # float64 [N], NaN where not success
    censored: np.ndarray  # bool [N]: fooled at the lower bound, so the true ε is only known to be <= it
    lower: np.ndarray  # float64 [N]: largest ε tried that did not fool (NaN: none, i.e. failure or censored)
    perturbation: torch.Tensor  # float32 [N, 3, H, W] on the CPU: x_adv − x, zeros where not success
    adv_pred: np.ndarray  # int64 [N]: prediction on the kept example (on the upper-bound attack for failures)
    grad_evals: np.ndarray  # int64 [N]: forward+backward passes spent on the image
    trials: np.ndarray  # int64 [N]: attacks run (each followed by one forward pass to judge it)
    # The attack's own per-image columns (Attack.extra_columns), e.g. AutoAttack's broken_by.
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Attack:
    """What one attack declares. ``run(fn, x, y, config, *, batch_size, keys, progress)``
    returns an :class:`AttackResult`; ``keys`` (int64 [N]) seed per-image randomness."""

    name: str  # config key and {attack} wildcard, e.g. "pgd_l2"
    norm: str  # "l2" | "linf": the distance its epsilon and tolerance are measured in
    kind: str  # one of KINDS
    title: str  # short label for figures and logs, e.g. "l2 PGD"
    reference: str  # the paper it implements
    epsilon: str  # what the attack table's epsilon column holds for this attack
    make_config: Callable[[dict], Any]  # validated config block -> config object with .describe()
    run: Callable[..., AttackResult]
    schema: dict  # JSON schema of the config block (may $ref the config schema's $defs)
    # Which zoo models it runs on: (config block, zoo rows in zoo order) -> model ids; None = all.
    select_models: Callable[[dict, list], list] | None = None
    # How many stimuli it attacks (the first n, a fixed subset): config block -> n; None = all.
    n_images: Callable[[dict], int] | None = None
    enabled_by_default: bool = True
    position: int = 100  # where it comes in tables and figures (the paper's attacks: 0, 1, 2)
    # Called while planning when the attack is enabled: raises PipelineError if it cannot run here
    # (e.g. an optional library is missing).
    check_available: Callable[[], Any] | None = None
    # The package module that declares it (default: where ``run`` is defined): the code of its
    # jobs, beside the job's own (``advalign.provenance``).
    declared_in: str = ""
    # Per-image columns of its own, after columns.ATTACK_COLUMNS in its table (AttackResult.extra).
    extra_columns: tuple = ()

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"attack {self.name!r}: norm {self.norm!r} is not one of {NORMS}")
        if self.kind not in KINDS:
            raise ValueError(f"attack {self.name!r}: kind {self.kind!r} is not one of {KINDS}")

    @property
    def module(self) -> str:
        return self.declared_in or self.run.__module__

    @property
    def fixed_epsilon(self) -> bool:
        """Run at one ε: its table gives robust accuracy, not a tolerance (advalign.stats)."""
        return self.kind == "fixed_epsilon"

    @property
    def tolerance_column(self) -> str:
        """The per-image distance its tolerance averages (the attack table's l2 or linf)."""
        return self.norm

    def config(self, block: dict):
        """The config object of a (validated, merged) config block; errors name the attack."""
        return self.make_config(dict(block))

    def models(self, block: dict, rows: list) -> list:
        ids = [row["model"] for row in rows]
        if self.select_models is None:
            return ids
        chosen = set(self.select_models(block, rows))
        return [m for m in ids if m in chosen]


_REGISTRY: dict[str, Attack] = {}


def register_attack(attack: Attack) -> Attack:
    """Add an attack (at import of its module); a second attack of the same name is an error."""
    if attack.name in _REGISTRY and _REGISTRY[attack.name] is not attack:
        raise ValueError(f"attack {attack.name!r} is registered twice")
    _REGISTRY[attack.name] = attack
    return attack


def registered_attacks() -> tuple[Attack, ...]:
    """Registered attacks by position, then name: the order of tables and figures."""
    return tuple(sorted(_REGISTRY.values(), key=lambda a: (a.position, a.name)))


def attack_names() -> tuple[str, ...]:
    return tuple(a.name for a in registered_attacks())


def get_attack(name: str) -> Attack:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PipelineError(f"attack {name!r} is not one of {', '.join(attack_names())}") from None


def image_key(seed: int, attack: str, index: int) -> int:
    """The key an image's random starts derive from: (config seed, attack, stimulus index)."""
    digest = hashlib.sha256(f"advalign-image:{int(seed)}:{attack}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
