"""What a sweep runs: `MethodSpec` (a registry method, its config parameters, its label), the forms
`run_sweep(methods=...)` accepts (`method_specs`), and each cell's config (`make_config`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from .cells import registry
from .seeds import derive_seed


@dataclass(frozen=True)
class MethodSpec:
    """One column of a sweep: a registry method, its config parameters, and its label.

    method: the registry name ("soft", "hard", "free_bound", "norm_bound", "layer_bound").
    params: config field overrides (plain values), applied to the method's config class.
    label: the `variant` column (default: the method name); lets one method appear with several
        configs in a sweep, e.g. {"soft_L1": ("soft", {"prompt_length": 1}), "soft_L10": ...}.
    """

    method: str
    params: Mapping = field(default_factory=dict)
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.method


def method_specs(methods) -> list[MethodSpec]:
    """The MethodSpecs of `methods`, in one of three forms (labels name the rows' `variant`):

    - ["soft", "free_bound"]: registry names, default parameters, each labelled by its name;
    - {"soft": {"steps": 100}, "free_bound": {}}: name → config parameters (a dict, or a config instance);
    - {"soft_L10": ("soft", {"prompt_length": 10})}: label → (name, parameters), for two variants of one method.
    The two mapping forms mix freely.
    """
    if isinstance(methods, str):
        raise TypeError(f"methods={methods!r}: pass a list of method names, e.g. [{methods!r}], or a mapping "
                        "{name: parameters}")
    specs = []
    if isinstance(methods, Mapping):
        for label, value in methods.items():
            method, params = value if isinstance(value, tuple) else (label, value)
            specs.append(MethodSpec(method, params if params is not None else {}, label))
    else:
        for item in methods:
            if not isinstance(item, str):
                raise TypeError(f"cannot read method {item!r} in a list: a list holds method names; give "
                                "parameters as a mapping {name: parameters} or {label: (name, parameters)}")
            specs.append(MethodSpec(item, {}, item))
    labels = [s.name for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"method labels must be unique, got {labels}; give variants distinct labels")
    if not specs:
        raise ValueError("methods is empty: name at least one method, e.g. ['soft', 'free_bound']")
    return specs


def make_config(spec: MethodSpec, seed: int):
    """The config instance of one cell: the spec's params, with the cell seed where the config has one."""
    methods, configs = registry()
    if spec.method not in methods:
        raise KeyError(f"unknown method {spec.method!r}; registered: {sorted(methods)}")
    params = spec.params
    cls = configs.get(spec.method)  # None: a registered method without a config (e.g. one a test adds)
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        config = params
    elif cls is None:
        if params:
            raise ValueError(f"method {spec.method!r} has no config class; cannot apply {dict(params)}")
        return None
    else:
        config = cls(**dict(params))
    if any(f.name == "seed" for f in dataclasses.fields(config)):
        config = dataclasses.replace(config, seed=derive_seed(seed, spec.method))
    return config
