"""The one registry of acceleration methods: every script, the benchmark, the search and the table driver
resolve method names and flags here.

Names are components joined with '+'; every kind (kind.py) owns its grammar, and `REGISTRY.grammar()` lists
them: original, ddim<N>, tome-<r>, deepcache-n<N>[-d<d>], dato[:<strategy>][@<derivation>...][,<option>...]
(options: parity and the fields of datosd.DatoOptions), textprune-..., tgate-<m>[-sa...][-perhalf], and for diffusers
pipelines deepcache-helper-n<N>[-b<b>] (DeepCache's own helper).

e.g. `deepcache-n3+tome-0.5` (the paper's naive combination), `dato:b1`, `dato:b1@last37`,
`dato:b1@r0.5,align_cfg=0`, `dato+tgate-20`. A `Method` is a value: `apply(model, steps, seed)` patches a model
and returns an `AppliedMethod` (a context manager) that `remove()`s the patches again. A kind that does not
combine with another says so, and flags and names get the same message (`Registry.combine`).
"""
from .kind import Flag, MethodError, MethodKind, MissingPackageError, Patch
from .method import AppliedMethod, Method, count_calls
from .registry import KINDS, REGISTRY, Registry, dato_method, parse_method, registry_of

__all__ = ["AppliedMethod", "Flag", "KINDS", "Method", "MethodError", "MethodKind", "MissingPackageError", "Patch",
           "REGISTRY", "Registry", "count_calls", "dato_method", "parse_method", "registry_of"]
