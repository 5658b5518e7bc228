"""The generic model walk: rewrite every eligible layer of a Functional or Sequential model, return a report.

The walk knows nothing about convolutions: it asks `rewrites.plan_layer` for each leaf layer (recursing into nested
Functional and Sequential models), clones the model with Keras' `clone_model` so that branches, merges, shared layers
and nested models keep their structure, then copies every weight: the planned ones for rewritten layers, the original
ones for everything else. The input model is only read.
"""

from __future__ import annotations

import keras

from sepconv.convert.errors import InvalidOptionError, UnsupportedModelError
from sepconv.convert.graph import leaf_layers
from sepconv.convert.keras_compat import is_graph_model, producer_name, sublayers
from sepconv.convert.separation.policy import DEFAULT_ENERGY, SeparationOptions  # noqa: F401  (re-exported)
from sepconv.convert.separation.report import SeparationReport
from sepconv.convert.separation.rewrites import CONV_LIKE, Plan, plan_layer, unsupported_row
from sepconv.deploy.files import first_line


def separate(model: keras.Model, *, rank=None, energy=None, include=None, exclude=None,
             only_if_smaller: bool = True, ranks=None, form: str = "depthwise"
             ) -> tuple[keras.Model, SeparationReport]:
    """Rewrite every eligible Conv2D of `model` into a SeparableConv2D started from the trained kernel's SVD (or, with
    form="spatial", into a kh x 1 and a 1 x kw Conv2D from its spatial SVD).

    Returns the new model (the input is left as it was) and a `SeparationReport` with a row per convolution-like
    layer. Options are those of `SeparationOptions` (`separate_with` takes the object); without rank and
    energy, energy=DEFAULT_ENERGY; `ranks` gives some layers their own choice (K, 0 to keep, or "s<r>").
    """
    options = SeparationOptions(rank=rank, energy=energy, include=include, exclude=exclude,
                                only_if_smaller=only_if_smaller, ranks=ranks, form=form)
    return separate_with(model, options)


def separate_with(model: keras.Model, options: SeparationOptions) -> tuple[keras.Model, SeparationReport]:
    """`separate` with a SeparationOptions object (what the pipeline and the budget search hold)."""
    _require_graph_model(model)
    plans = _plan(model, options)
    new_model = rebuild(model, plans)
    rows = tuple(plan.row for plan in plans.values() if plan.row is not None)
    report = SeparationReport(rows=rows, model_params_before=model.count_params(),
                              model_params_after=new_model.count_params(), policy=options.describe())
    return new_model, report


def rebuild(model: keras.Model, plans: dict) -> keras.Model:
    """A clone of `model` with each layer whose id is in `plans` made by its Plan (with the plan's weights), every
    other layer cloned with its own config and weights; structure (branches, shared layers, nested models) kept."""
    clones: list[tuple[keras.layers.Layer, keras.layers.Layer, Plan]] = []

    def clone_layer(layer):
        plan = plans.get(id(layer)) or Plan(row=None)
        try:
            new = plan.make_layer(layer)
        except Exception as error:  # a custom layer whose get_config/from_config do not round-trip
            raise UnsupportedModelError(
                f"Layer {layer.name!r} ({type(layer).__name__}) cannot be re-created from its config "
                f"({type(error).__name__}: {first_line(str(error))}); give the class "
                f"get_config() and from_config() that round-trip") from error
        clones.append((layer, new, plan))
        return new

    new_model = keras.models.clone_model(model, input_tensors=_named_inputs(model), clone_function=clone_layer,
                                         recursive=True)
    if not new_model.built:
        new_model.build(model.input_shape)
    for old, new, plan in clones:
        if not isinstance(old, keras.layers.Layer):
            continue  # a bare keras.ops operation in a Functional graph: it has no weights
        new.set_weights(list(plan.weights) if plan.layer_class else old.get_weights())
    return new_model


def _named_inputs(model: keras.Model):
    """Fresh inputs named like the model's input layers (clone_model would name them after tensors)."""
    if isinstance(model, keras.Sequential):
        return None  # clone_model keeps a Sequential's input layer name itself

    def fresh(tensor):
        return keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype, name=producer_name(tensor))

    return keras.tree.map_structure(fresh, model.input)


def _require_graph_model(model) -> None:
    if not isinstance(model, keras.Model):
        raise InvalidOptionError(f"Expected a keras.Model, got {type(model).__name__}; load one with "
                                 f"sepconv.convert.load(path)")
    if not is_graph_model(model):
        raise UnsupportedModelError(
            f"Model {model.name!r} is a subclassed model ({type(model).__name__}): its layers are wired in Python "
            f"code, so sepconv cannot rewrite them. Rebuild it as a Functional or Sequential model")


def _plan(model: keras.Model, options: SeparationOptions) -> dict[int, Plan]:
    """A plan for each leaf layer that is convolution-like, keyed by id (shared layers are planned once)."""
    plans: dict[int, Plan] = {}
    for path, layer in leaf_layers(model):
        if id(layer) in plans:
            continue
        plan = _opaque_plan(layer, path) if _has_sublayers(layer) else plan_layer(layer, options.context(path))
        if plan is not None:
            plans[id(layer)] = plan
    return plans


def _has_sublayers(layer) -> bool:
    return bool(sublayers(layer))


def _opaque_plan(layer, path: str) -> Plan | None:
    """A layer with sublayers wired in Python code: report any convolutions hidden inside, all in one row."""
    inner = [sub.name for sub in sublayers(layer) if isinstance(sub, CONV_LIKE)]
    if not inner:
        return None
    reason = (f"{len(inner)} convolution(s) inside {type(layer).__name__} ({', '.join(inner)}) are wired in Python "
              f"code; rebuild it as a Functional model to separate them")
    return Plan(row=unsupported_row(layer, path, reason))
