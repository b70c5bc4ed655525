"""Run configuration: YAML files loaded into frozen, validated pydantic models.

One YAML tree per run, with the sections ``model``, ``data``, ``train``, ``eval`` and
``imports``; every key, its range and its meaning is a field of :mod:`detfocal.config.schema`.

Loading rules:
    - YAML 1.2 scalars in files and ``--set`` values alike (``parse_override_value``): ``1e-4``
      is a float, only true/false are booleans (``amp: off`` stays "off"), ints are decimal
      (``010`` is ten), and there are no ``<<`` merge keys or dates. A key given twice in one
      mapping is refused with its line. A tree of more than ``MAX_NODES`` values (an alias
      counts each time it is used) or ``MAX_DEPTH`` levels, or an integer of more than
      ``MAX_INT_DIGITS`` digits, is refused, so a few hundred bytes cannot expand or stall.
    - ``_base_: other.yaml`` (relative to the file) is loaded first and the file's keys are
      deep-merged over it: mappings merge key by key, anything else (lists included) replaces.
      ``--set key.sub=value`` overrides are merged next, in order, by the same rules.
    - A mapping replaces the one below it instead of merging when it sets ``type`` to another
      value than the one it meets (default included), so ``--set model.head.type=vfl`` drops
      the focal head's alpha and gamma; ``_delete_: true`` in a mapping (mmdetection's marker)
      replaces too.
    - Every key, type and range is checked (nanoGPT's strictness): an unknown key, a wrong type,
      a non-finite float or a value past its bound is a one-line ``ValueError`` naming the
      dotted key, the value and what was expected. Missing keys take the schema's defaults.
    - ``model.head`` holds ``type``, ``norm`` and the keyword parameters of that head. Whether
      the types are registered and the parameters fit the head's signature needs the model
      code: ``detfocal.modeling.validate.check_model_config`` checks that before any work.
    - ``imports`` are imported by ``load_config`` (a file the user chose), never for a dict
      from a checkpoint: nothing read from a checkpoint is imported.

Classes never see a ``Config``: the ``*_kwargs`` functions map it to the plain keyword
arguments of ``build_retinanet``, ``CocoDetection``, ``build_transforms``, ``build_optimizer``,
``build_lr_schedule`` and ``shapes.ensure_dataset``.

Modules: ``parsing`` (bounded YAML 1.2), ``loading`` (files, ``_base_``, ``--set``, imports),
``schema`` (the sections), ``errors`` (one-line messages), ``kwargs`` (Config -> arguments).
"""
from detfocal.config.errors import ConfigError
from detfocal.config.kwargs import (data_paths, dataset_kwargs, model_kwargs, optimizer_kwargs, scheduler_kwargs,
                                    shapes_kwargs, transform_kwargs)
from detfocal.config.loading import (apply_overrides, config_from_dict, config_to_dict, config_to_yaml, deep_merge,
                                     import_modules, load_config, load_yaml_tree)
from detfocal.config.parsing import MAX_DEPTH, MAX_INT_DIGITS, MAX_NODES, parse_override_value, parse_yaml
from detfocal.config.schema import (AugmentConfig, Config, DataConfig, EmaConfig, EvalConfig, ModelConfig,
                                    ScheduleConfig, ShapesConfig, SplitConfig, SubsetConfig, TrainConfig)

__all__ = ["AugmentConfig", "Config", "ConfigError", "DataConfig", "EmaConfig", "EvalConfig", "MAX_DEPTH",
           "MAX_INT_DIGITS", "MAX_NODES", "ModelConfig", "ScheduleConfig", "ShapesConfig", "SplitConfig",
           "SubsetConfig", "TrainConfig", "apply_overrides", "config_from_dict", "config_to_dict", "config_to_yaml",
           "data_paths", "dataset_kwargs", "deep_merge", "import_modules", "load_config", "load_yaml_tree",
           "model_kwargs", "optimizer_kwargs", "parse_override_value", "parse_yaml", "scheduler_kwargs",
           "shapes_kwargs", "transform_kwargs"]
