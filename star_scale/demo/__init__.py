"""`star-scale demo` (the pipeline end to end on generated images) and `star-scale repro` (the loss ablation)."""


def __getattr__(name):  # star_scale.demo was one module before the folders: its names resolve for one release
    import importlib
    import warnings

    run = importlib.import_module("star_scale.demo.run")
    if name.startswith("_") or not hasattr(run, name):
        raise AttributeError(f"module 'star_scale.demo' has no attribute {name!r}")
    warnings.warn(f"star_scale.demo.{name} has moved to star_scale.demo.run.{name}; the old path will be removed "
                  "in star-scale 0.3", DeprecationWarning, stacklevel=2)
    globals()[name] = value = getattr(run, name)  # warn once
    return value
