"""The attacks: a registry of minimal-ε and minimal-norm attacks, and the workflow job.

One attack per file, each registering itself (``registry.register_attack``):

* ``pgd.py``: PGD, ℓ2 and ℓ∞, at a fixed ε, searched over ε by ``search.py`` (the paper's
  Algorithm 1, batched: the minimal-ε search over any fixed-ε attack);
* ``cw.py``: Carlini–Wagner ℓ2 with a per-image search over c.

Shared parts: ``function.py`` (the attacked function), ``registry.py`` (what an attack
declares, ``AttackResult``), ``store.py`` (the resumable chunk store) and ``job.py``
(one model × attack job of the workflow). Every other module in this package is
imported here, so dropping a new attack file into it registers the attack;
``advalign.provenance`` counts all of them as code of anything that imports the package.
"""

from __future__ import annotations

import importlib
import pkgutil

from .cw import CWConfig, carlini_wagner_l2
from .function import PRECISIONS, AttackedFunction, batches
from .job import check_job, job_hash, load_stimuli, run_attack_job
from .pgd import PGDConfig, minimal_epsilon_search, pgd_attack, pgd_step, project_l2, project_linf
from .search import FixedEpsilonAttack, SearchConfig, minimal_epsilon, minimal_epsilon_attack
from .registry import Attack, AttackResult, attack_names, get_attack, image_key, register_attack, registered_attacks
from .store import ChunkStore, chunk_dir_for

# Read by advalign.provenance: this package imports all of its modules at run time.
DISCOVERS_SUBMODULES = True
_INFRASTRUCTURE = {"registry", "function", "store", "job", "search", "pgd", "cw"}

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "PRECISIONS",
    "Attack",
    "AttackResult",
    "AttackedFunction",
    "CWConfig",
    "ChunkStore",
    "FixedEpsilonAttack",
    "PGDConfig",
    "SearchConfig",
    "attack_names",
    "batches",
    "carlini_wagner_l2",
    "check_job",
    "chunk_dir_for",
    "get_attack",
    "image_key",
    "job_hash",
    "load_stimuli",
    "minimal_epsilon",
    "minimal_epsilon_attack",
    "minimal_epsilon_search",
    "pgd_attack",
    "pgd_step",
    "project_l2",
    "project_linf",
    "register_attack",
    "registered_attacks",
    "run_attack_job",
]
